#!/usr/bin/env bash
# Tracking log (issue 27): what the log costs at full load. The same load through one
# coexist node with [tracking] off and on, alternating (ROUNDS each, default 3), and the
# throughput, acceptance latency and relay CPU of each:
#   bench/tracking.sh [MESSAGES] [CONCURRENCY] [ROUNDS]     (defaults 20000 16 3)
# Every process started here is stopped by PID. The load client and the sinks share this
# machine's cores with the relay.
set -euo pipefail
MESSAGES=${1:-20000}
CONC=${2:-16}
ROUNDS=${3:-3}
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT

echo "== $(date -u +%F), $(nproc) CPUs, $MESSAGES messages, $CONC sessions, $ROUNDS rounds each"
$B directory generate --count 200000 --domains 1 --cloud-share 0.5 --out "$W/directory.csv" >/dev/null
bench_config 33 -e 's#tls = "opportunistic"#tls = "none"#; s#min_backoff = "300s"#min_backoff = "1s"#; s#^watch = true#watch = false#'
sed -e 's#^enabled = true#enabled = false#' "$W/coexist.toml" > "$W/off.toml"
cp "$W/coexist.toml" "$W/on.toml"
grep -q '^enabled = false' "$W/off.toml"

# run NAME CONFIG: prints the load's summary, the relay's CPU per message and, with the log
# on, its size.
run() {
    local name=$1 cfg=$2 relay c0 c1 want t0
    rm -rf "$W/spool"
    start_sinks "$name" 33
    RUST_LOG=warn $B serve --config "$cfg" 2>"$W/$name.serve.log" & relay=$!
    PIDS+=("$relay")
    wait_port 33525
    c0=$(cpu_ms "$relay")
    t0=$(date +%s.%N)
    $B load --target 127.0.0.1:33525 --directory "$W/directory.csv" --messages "$MESSAGES" \
        --concurrency "$CONC" --max-rcpts 3 --size 4096 --max-seconds 600 --no-chunking \
        --label "$name" --json "$W/$name.json" > "$W/$name.load"
    want=$(awk '/accepted \(/{gsub(/\(/,""); for(i=1;i<=NF;i++) if($i=="recipients),") print $(i-1)}' "$W/$name.load")
    for _ in $(seq 1 3000); do [ "$(delivered "$name")" -ge "${want:-0}" ] && break; sleep 0.1; done
    c1=$(cpu_ms "$relay")
    echo "--- $name"
    grep -E '^(acceptance|accepted|refused)' "$W/$name.load" || cat "$W/$name.load"
    echo "end to end $(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $t0}") s; delivered $(delivered "$name") of $want recipients; relay CPU $(awk "BEGIN{printf \"%.3f\", ($c1 - $c0) / $MESSAGES}") ms per message"
    kill "$relay"; wait "$relay" 2>/dev/null || true
    if [ -d "$W/spool/tracking" ]; then
        echo "tracking log: $(du -sb "$W/spool/tracking" | cut -f1) bytes for $MESSAGES messages"
    fi
    stop_sinks
}

for r in $(seq 1 "$ROUNDS"); do
    run "off$r" "$W/off.toml"
    run "on$r" "$W/on.toml"
done
