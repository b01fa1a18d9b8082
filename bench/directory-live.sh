#!/usr/bin/env bash
# Directory at national scale while mail flows (issue 3's targets), on the real binary:
#   bench/directory-live.sh [COUNT]        (default 2,000,000 addresses)
# Start-up time to a ready directory, resident memory, and an 83,000-mailbox batch applied
# through the CLI while `coexist load` keeps sending. Everything runs on loopback, is bounded,
# and every process started here is stopped by PID at the end.
COUNT=${1:-2000000}
source "$(dirname "$0")/lib.sh"
$B directory generate --count "$COUNT" --domains 1 --cloud-share 0.5 --out "$W/directory.csv" >/dev/null
bench_config 27
$B sink --listen 127.0.0.1:27601 2>/dev/null & PIDS+=($!)
$B sink --listen 127.0.0.1:27602 2>/dev/null & PIDS+=($!)

start_relay() {
    local t0 t1
    t0=$(date +%s.%N)
    RUST_LOG=warn $B serve --config "$W/coexist.toml" 2>"$W/serve.log" & RELAY=$!
    PIDS+=("$RELAY")
    for _ in $(seq 1 600); do
        if $B directory lookup user1@nhs.test --config "$W/coexist.toml" >/dev/null 2>&1; then break; fi
        sleep 0.05
    done
    t1=$(date +%s.%N)
    echo "$1: directory ready in $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s (includes CLI polling), RSS $(awk '/VmRSS/{printf "%.0f MB", $2/1024}' /proc/$RELAY/status)"
}

echo "== $COUNT addresses, $(nproc) CPUs, $(date -u +%F)"
start_relay "first start (parse CSV, write snapshot)"
kill "$RELAY"; wait "$RELAY" 2>/dev/null || true
start_relay "restart (snapshot)"

# 83,000 mailboxes, every 24th address, as a New-MigrationBatch CSV.
awk -F, 'NR>1 && (NR-2)%24==0 && n<83000 {print $1; n++}' "$W/directory.csv" | sed '1i EmailAddress' > "$W/weekend.csv"
$B load --target 127.0.0.1:27525 --directory "$W/directory.csv" --messages 20000 --concurrency 16 --max-seconds 120 > "$W/load.txt" & LOAD=$!
PIDS+=("$LOAD")
sleep 2
echo "== applying an 83,000-row batch during load"
TIMEFORMAT="CLI wall time %R s"
time $B directory apply "$W/weekend.csv" --state cloud --config "$W/coexist.toml"
wait "$LOAD" || true
echo "== load during the batch"
cat "$W/load.txt"
echo "relay RSS after: $(awk '/VmRSS/{printf "%.0f MB", $2/1024}' /proc/$RELAY/status)"
