#!/usr/bin/env bash
# Shadow copies (issue 26): the same load through one coexist node of a fleet, without
# [shadow] and then with [shadow] on a three-server NATS JetStream cluster (R3) started here
# on loopback, and the throughput, acceptance latency and CPU of each:
#   bench/shadow.sh [MESSAGES] [CONCURRENCY] [REPLICAS]     (defaults 20000 16 3)
# Needs PostgreSQL on 127.0.0.1:5432 (trust, database test; the fleet's tables go in a schema
# of their own, dropped at the end) and `nats-server` (Debian package nats-server). Every
# process started here is stopped by PID. The NATS servers share this machine's cores and
# disk with the relay, the load client and the sinks.
set -euo pipefail
MESSAGES=${1:-20000}
CONC=${2:-16}
REPLICAS=${3:-3}
source "$(dirname "$0")/lib.sh"
SCHEMA=bench_shadow_$$
drop_schema() { psql -h 127.0.0.1 -U postgres -d test -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true; }
trap 'drop_schema; cleanup' EXIT

echo "== $(date -u +%F), $(nproc) CPUs, $MESSAGES messages, $CONC sessions, JetStream R$REPLICAS"
$B directory generate --count 200000 --domains 1 --cloud-share 0.5 --out "$W/directory.csv" >/dev/null
bench_config 32 -e 's#tls = "opportunistic"#tls = "none"#; s#min_backoff = "300s"#min_backoff = "1s"#; s#^watch = true#watch = false#'
cat >> "$W/coexist.toml" <<TOML

[fleet]
postgres = "postgresql://postgres@127.0.0.1:5432/test"
schema = "$SCHEMA"
node = "mx1"
TOML

# --- the JetStream cluster: three servers on loopback, each its own store.
ROUTES=nats-route://127.0.0.1:32431,nats-route://127.0.0.1:32432,nats-route://127.0.0.1:32433
for i in 1 2 3; do
    nats-server -a 127.0.0.1 -p "3242$i" -n "n$i" -js -sd "$W/nats$i" \
        --cluster_name bench --cluster "nats://127.0.0.1:3243$i" --routes "$ROUTES" \
        >"$W/nats$i.log" 2>&1 & PIDS+=($!)
done
for i in 1 2 3; do wait_port "3242$i"; done
NATS_PIDS=("${PIDS[@]}")
nats_cpu() { local t=0; for p in "${NATS_PIDS[@]}"; do t=$((t + $(cpu_ms "$p"))); done; echo "$t"; }

# run NAME CONFIG: a relay on CONFIG, the load, the sinks; prints the load's summary and the
# relay's CPU per message.
run() {
    local name=$1 cfg=$2 relay c0 c1 want t0
    rm -rf "$W/spool"
    start_sinks "$name" 32
    RUST_LOG=warn $B serve --config "$cfg" 2>"$W/$name.serve.log" & relay=$!
    PIDS+=("$relay")
    wait_port 32525
    c0=$(cpu_ms "$relay"); n0=$(nats_cpu)
    t0=$(date +%s.%N)
    $B load --target 127.0.0.1:32525 --directory "$W/directory.csv" --messages "$MESSAGES" \
        --concurrency "$CONC" --max-rcpts 3 --size 4096 --max-seconds 600 --no-chunking \
        --label "$name" --json "$W/$name.json" > "$W/$name.load"
    want=$(awk '/accepted \(/{gsub(/\(/,""); for(i=1;i<=NF;i++) if($i=="recipients),") print $(i-1)}' "$W/$name.load")
    for _ in $(seq 1 3000); do [ "$(delivered "$name")" -ge "${want:-0}" ] && break; sleep 0.1; done
    c1=$(cpu_ms "$relay"); n1=$(nats_cpu)
    echo "--- $name"
    grep -E '^(acceptance|accepted|refused)' "$W/$name.load" || cat "$W/$name.load"
    echo "end to end $(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $t0}") s; delivered $(delivered "$name") of $want recipients; relay CPU $(awk "BEGIN{printf \"%.3f\", ($c1 - $c0) / $MESSAGES}") ms per message; the three nats-servers $(awk "BEGIN{printf \"%.3f\", ($n1 - $n0) / $MESSAGES}") ms per message"
    kill "$relay"; wait "$relay" 2>/dev/null || true
    stop_sinks
}

run plain "$W/coexist.toml"
cp "$W/coexist.toml" "$W/shadow.toml"
cat >> "$W/shadow.toml" <<TOML

[shadow]
nats = ["nats://127.0.0.1:32421", "nats://127.0.0.1:32422", "nats://127.0.0.1:32423"]
stream = "$SCHEMA"
replicas = $REPLICAS
TOML
run shadow "$W/shadow.toml"
rate() { awk '/^acceptance:/{print $2}' "$W/$1.load"; }
p99() { awk '/^acceptance:/{for(i=1;i<=NF;i++) if($i=="p99") print $(i+1)}' "$W/$1.load"; }
echo "== with [shadow] R$REPLICAS: $(awk "BEGIN{printf \"%.0f\", 100 * $(rate shadow) / $(rate plain)}") % of the throughput without; acceptance p99 $(p99 shadow) ms vs $(p99 plain) ms"
