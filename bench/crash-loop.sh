#!/usr/bin/env bash
# Crash safety under load: bench/crash-loop.sh [ROUNDS]   (default 20)
# Each round starts the relay, runs `coexist load` against it, and `kill -9`s the relay at a
# random moment. At the end the relay runs once more until its spool is empty, and every
# queue id that got a 250 must have reached a sink (at least once; duplicates are counted).
# Loopback only; every process is stopped by PID; each round is bounded in time.
ROUNDS=${1:-20}
source "$(dirname "$0")/lib.sh"
$B directory generate --count 10000 --domains 1 --cloud-share 0.5 --out "$W/directory.csv" >/dev/null
bench_config 28 -e 's#min_backoff = "300s"#min_backoff = "1s"#; s#max_backoff = "4000s"#max_backoff = "2s"#'
$B sink --listen 127.0.0.1:28601 --record "$W/onprem.rec" 2>/dev/null & PIDS+=($!)
$B sink --listen 127.0.0.1:28602 --record "$W/cloud.rec" 2>/dev/null & PIDS+=($!)

for round in $(seq 1 "$ROUNDS"); do
    RUST_LOG=error $B serve --config "$W/coexist.toml" 2>>"$W/serve.log" & RELAY=$!
    wait_port 28525
    secs=$((RANDOM % 3 + 2))
    $B load --target 127.0.0.1:28525 --directory "$W/directory.csv" --messages 1000000 --concurrency 8 \
        --max-rcpts 1 --max-seconds "$secs" --ids "$W/ids.$round" >"$W/load.$round" 2>&1 & LOAD=$!
    sleep "0.$((RANDOM % 9 + 1))"; sleep "$((RANDOM % 2))"
    kill -9 "$RELAY"; wait "$RELAY" 2>/dev/null || true
    wait "$LOAD" || true
    echo "round $round: killed after load start; acknowledged $(wc -l < "$W/ids.$round" 2>/dev/null || echo 0) so far, spool holds $(spooled)"
done

# Final run: deliver everything left in the spool.
RUST_LOG=error $B serve --config "$W/coexist.toml" 2>>"$W/serve.log" & RELAY=$!
PIDS+=("$RELAY")
wait_port 28525
for _ in $(seq 1 1200); do
    left=$(spooled)
    [ "$left" = 0 ] && break
    sleep 0.1
done
sleep 1
cat "$W"/ids.* 2>/dev/null | grep -v '^$' | sort -u > "$W/acked"
cat "$W"/onprem.rec "$W"/cloud.rec | awk '{print $1}' | sort > "$W/delivered.all"
sort -u "$W/delivered.all" > "$W/delivered"
lost=$(comm -23 "$W/acked" "$W/delivered" | wc -l)
dups=$(( $(wc -l < "$W/delivered.all") - $(wc -l < "$W/delivered") ))
failed=$(ls "$W/spool/failed" 2>/dev/null | grep -c '\.msg$' || true)
echo "== $ROUNDS kill -9 rounds: acknowledged $(wc -l < "$W/acked"), delivered $(wc -l < "$W/delivered") distinct, lost $lost, duplicates $dups, failed $failed, still queued $left"
[ "$lost" = 0 ] || { echo "LOST:"; comm -23 "$W/acked" "$W/delivered" | head; exit 1; }
