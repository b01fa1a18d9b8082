#!/usr/bin/env bash
# Issue 13: a base import of 2,000,000 addresses into a fleet, and what a node pays to join
# from PostgreSQL. Starts node mx1 (no directory file), imports COUNT addresses through it
# (`coexist directory import`: parse, merge, COPY into PostgreSQL, apply), then starts node
# mx2, which loads the base from PostgreSQL before it listens, then restarts mx2 (local
# snapshot, nothing to fetch). Uses the local PostgreSQL (PG, default
# postgresql://postgres@127.0.0.1:5432/test) in a schema of its own, dropped at the end.
# Usage: bench/fleet-import.sh [COUNT]
source "$(dirname "$0")/lib.sh"
COUNT=${1:-2000000}
PG=${PG:-postgresql://postgres@127.0.0.1:5432/test}
SCHEMA=coexist_bench_$$
trap 'cleanup; psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true' EXIT

$B directory generate --count "$COUNT" --domains 20 --out "$W/directory.csv" >/dev/null
node_config() { # NAME BASE
    bench_config "$2" -e "s#^file = .*##"
    mv "$W/coexist.toml" "$W/$1.toml"
    sed -i "s#$W/store#$W/store-$1#; s#$W/spool#$W/spool-$1#" "$W/$1.toml"
    printf '\n[fleet]\npostgres = "%s"\nschema = "%s"\nnode = "%s"\n' "$PG" "$SCHEMA" "$1" >> "$W/$1.toml"
}
node_config mx1 46
node_config mx2 47

# start NAME BASE: starts a node (its PID in PIDS and LAST) and sets UP to the seconds until
# it listens. Not in a subshell, so that PIDS reaches the cleanup.
start() {
    local t0; t0=$(date +%s.%N)
    $B serve --config "$W/$1.toml" >>"$W/$1.log" 2>&1 &
    LAST=$!
    PIDS+=("$LAST")
    wait_port "${2}525"
    UP=$(echo "$(date +%s.%N) - $t0" | bc)
}
start mx1 46
echo "mx1 (empty fleet) listening after $UP s"
t0=$(date +%s.%N)
$B directory import "$W/directory.csv" --config "$W/mx1.toml"
echo "import of $COUNT addresses: $(echo "$(date +%s.%N) - $t0" | bc) s wall (CLI upload included)"
psql "$PG" -Atc "SELECT 'base_rows in PostgreSQL: ' || count(*) FROM $SCHEMA.base_rows"
start mx2 47
echo "mx2 (joins: loads the base from PostgreSQL) listening after $UP s"
kill "$LAST"; wait "$LAST" 2>/dev/null || true
start mx2 47
echo "mx2 restarted (local snapshot) listening after $UP s"
$B fleet status --config "$W/mx1.toml"
grep -h 'fleet: base loaded\|fleet: base imported' "$W"/mx*.log | sed 's/^/  log: /' | cut -c1-220
