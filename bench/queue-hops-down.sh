#!/usr/bin/env bash
# A queue built up while both next hops are down, kept across kill -9, then drained:
#   bench/queue-hops-down.sh [MESSAGES] [SIZE_KB]   (defaults 20000 20)
# 1. The relay runs with no sink listening (both routes' next hops down) while `coexist load`
#    (SESSIONS=20 sessions, one recipient per message, DATA or BDAT as offered) sends MESSAGES
#    messages of SIZE_KB KB. Reports the relay's RSS (VmRSS) and peak (VmHWM) with the
#    messages queued, the queue by state (admin /metrics), delivery attempts made while the
#    hops were down, and the spool's size on disk.
# 2. kill -9 of the relay, then a restart: time from start to the SMTP port listening, time
#    until /metrics shows the whole queue again, RSS after restart.
# 3. Both sinks started: time to the first delivery and until every acknowledged queue id is
#    recorded at a sink (`coexist sink --record`: one line per delivered message, its queue
#    id first), the drain rate, duplicates (deliveries beyond one per id: at-least-once) and
#    lost ids (acknowledged, never delivered).
# Ends with a summary table for the README. Queue settings: min_backoff MIN_BACKOFF (1s),
# max_backoff MAX_BACKOFF (10s), probe_interval PROBE_INTERVAL (2s; only if
# crates/core/src/config/schema.rs has the key, else a commented line). Each phase is bounded by
# PHASE_TIMEOUT seconds (default: 300, or 2 h per million messages if more), after which the
# script reports what it got and goes on or stops. Loopback only; stops by PID what it starts.
# bench/queue-million.sh runs this at 1,000,000 x 5 KB.
set -euo pipefail
MESSAGES=${1:-20000}
SIZE_KB=${2:-20}
SESSIONS=${SESSIONS:-20}
BASE=${BASE:-33}
MIN_BACKOFF=${MIN_BACKOFF:-1s}
MAX_BACKOFF=${MAX_BACKOFF:-10s}
PROBE_INTERVAL=${PROBE_INTERVAL:-2s}
SETTLE=${SETTLE:-5}   # seconds with the queue full (hops down) before measuring memory
LABEL=${LABEL:-queue-hops-down.sh}
scaled=$(( MESSAGES * 7200 / 1000000 ))
PHASE_TIMEOUT=${PHASE_TIMEOUT:-$(( scaled > 300 ? scaled : 300 ))}
source "$(dirname "$0")/lib.sh"

SMTP=${BASE}525 ONPREM=${BASE}601 CLOUD=${BASE}602 ADMIN=${BASE}080
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$RELAY/status" 2>/dev/null || echo 0; }
mb() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
spool_mb() { du -sm "$W/spool" 2>/dev/null | awk '{ print $1 }'; }
alive() { kill -0 "$RELAY" 2>/dev/null; }
# stop PID... (SIGNAL in $SIG, default TERM), wait for them and drop them from PIDS.
stop() {
    local p q keep=()
    kill -"${SIG:-TERM}" "$@" 2>/dev/null || true
    wait "$@" 2>/dev/null || true
    for q in "${PIDS[@]}"; do for p in "$@"; do [ "$q" = "$p" ] && continue 2; done; keep+=("$q"); done
    PIDS=("${keep[@]}")
}
# metric NAME: the admin API's /metrics, summed over labels per `state` (or all when no state).
metrics() { curl -sf -m 10 -H "Authorization: Bearer $(cat "$W/admin.token" 2>/dev/null)" "http://127.0.0.1:$ADMIN/metrics" 2>/dev/null || true; }
queued() { metrics | awk '/^coexist_queue_messages\{/ { n += $NF } END { print n + 0 }'; }
queue_states() {
    metrics | awk '/^coexist_queue_messages\{/ { match($0, /state="[a-z]+"/); s[substr($0, RSTART + 7, RLENGTH - 8)] = $NF }
        END { printf "active %d, deferred %d, held %d", s["active"], s["deferred"], s["held"] }'
}
counter() { metrics | awk -v m="$1" 'index($0, m) == 1 && $1 !~ /_bucket|_sum|_count/ { n += $NF } END { printf "%d", n }'; }
fail_tail() { echo "--- last lines of the relay's log:"; tail -n 20 "$W/serve.log" || true; }
start_relay() { RUST_LOG=warn $B serve --config "$W/coexist.toml" 2>>"$W/serve.log" & RELAY=$!; PIDS+=("$RELAY"); }
# wait_listen SECONDS: until the SMTP port accepts (fails early if the relay exits).
wait_listen() {
    local end=$(( $(date +%s) + $1 ))
    while [ "$(date +%s)" -lt "$end" ]; do
        (exec 3<>"/dev/tcp/127.0.0.1/$SMTP") 2>/dev/null && return 0
        alive || return 1
        sleep 0.01
    done
    return 1
}

need_kb=$(( MESSAGES * SIZE_KB * 2 + 1048576 ))
avail_kb=$(df -Pk "$W" | awk 'NR == 2 { print $4 }')
if [ "$avail_kb" -lt "$need_kb" ]; then
    echo "not enough disk in $W: $(( avail_kb / 1024 )) MB free, want ~$(( need_kb / 1024 )) MB (spool + sink records)"; exit 1
fi

$B directory generate --count 10000 --domains 1 --cloud-share 0.5 --out "$W/directory.csv" >/dev/null
if grep -q 'probe_interval' crates/core/src/config/schema.rs; then
    if grep -q '^probe_interval' config/coexist.toml; then
        probe=(-e "s#^probe_interval = \"[^\"]*\"#probe_interval = \"$PROBE_INTERVAL\"#")
    else
        probe=(-e "s#^max_backoff = .*#&\nprobe_interval = \"$PROBE_INTERVAL\"#")
    fi
    probe_note="probe_interval $PROBE_INTERVAL"
else
    probe=(-e "s|^probe_interval|# probe_interval|" \
           -e "s|^max_backoff = .*|&\n# probe_interval = \"$PROBE_INTERVAL\"   (no such key in crates/core/src/config/schema.rs yet)|")
    probe_note="no probe_interval key"
fi
# Plain SMTP on both legs (the sinks offer no STARTTLS anyway); short backoffs.
bench_config "$BASE" -e 's#tls = "opportunistic"#tls = "none"#' \
    -e "s#^min_backoff = .*#min_backoff = \"$MIN_BACKOFF\"#; s#^max_backoff = \"[^\"]*\"#max_backoff = \"$MAX_BACKOFF\"#" "${probe[@]}"
grep -q "^min_backoff = \"$MIN_BACKOFF\"" "$W/coexist.toml" || { echo "could not set queue.min_backoff in the config"; exit 1; }
case $probe_note in probe_interval*) grep -q "^probe_interval = \"$PROBE_INTERVAL\"" "$W/coexist.toml" || { echo "could not set queue.probe_interval in the config"; exit 1; } ;; esac
for p in "$SMTP" "$ONPREM" "$CLOUD" "$ADMIN"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "port $p already in use (BASE=$BASE)"; exit 1; fi
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
echo "== $LABEL $MESSAGES x $SIZE_KB KB, $SESSIONS sessions; $(date -u +%F), $(nproc) CPUs, commit $commit"
echo "   queue: min_backoff $MIN_BACKOFF, max_backoff $MAX_BACKOFF, $probe_note; phase timeout ${PHASE_TIMEOUT}s"

# --- 1. Hops down: queue MESSAGES messages.
start_relay
wait_listen 60 || { echo "relay did not start"; fail_tail; exit 1; }
sleep 0.5
rss_idle=$(kb VmRSS)
echo "relay up (no sink listening), RSS $(mb "$rss_idle") MB; loading..."
t0=$(now)
timeout $(( PHASE_TIMEOUT + 60 )) $B load --target "127.0.0.1:$SMTP" --directory "$W/directory.csv" \
    --messages "$MESSAGES" --concurrency "$SESSIONS" --max-rcpts 1 --size $(( SIZE_KB * 1024 )) \
    --max-seconds "$PHASE_TIMEOUT" --ids "$W/ids" >"$W/load.out" 2>&1 || echo "(load exited with $?)"
load_s=$(since "$t0")
sed 's/^/   /' "$W/load.out"
sort -u "$W/ids" 2>/dev/null | grep -v '^$' > "$W/acked" || true
ACKED=$(wc -l < "$W/acked")
rate=$(awk '/^acceptance:/ { print $2 }' "$W/load.out")
p99=$(awk '/^acceptance:/ { for (i = 1; i <= NF; i++) if ($i == "p99") print $(i + 1) }' "$W/load.out")
alive || { echo "relay exited during the load"; fail_tail; exit 1; }
sleep "$SETTLE"
rss_q=$(kb VmRSS); hwm_q=$(kb VmHWM)
q_before=$(queued); states_q=$(queue_states)
attempts=$(counter coexist_delivery_attempts_total); conns=$(counter coexist_delivery_connections_total)
down_s=$(since "$t0")
per_msg=$(awk -v a="$rss_q" -v b="$rss_idle" -v n="$ACKED" 'BEGIN { if (n > 0) printf "%.0f", (a - b) * 1024 / n; else print "-" }')
spool_q=$(spool_mb)
echo "queued: $ACKED acknowledged; queue $states_q; relay RSS $(mb "$rss_q") MB (idle $(mb "$rss_idle") MB, ~$per_msg B per message; anonymous $(mb "$(kb RssAnon)") MB, file $(mb "$(kb RssFile)") MB), VmHWM $(mb "$hwm_q") MB; spool $spool_q MB; $attempts delivery attempts, $conns connections in ${down_s}s with the hops down"

# --- 2. kill -9 and restart, hops still down.
SIG=KILL stop "$RELAY"
segs=$(find "$W/spool" -type f 2>/dev/null | wc -l)
t0=$(now)
start_relay
listen_s=-; restored_s=-; q_after=0
if wait_listen "$PHASE_TIMEOUT"; then
    listen_s=$(since "$t0")
    want=$(( q_before > 0 ? q_before : ACKED ))
    end=$(( $(date +%s) + PHASE_TIMEOUT ))
    while [ "$(date +%s)" -lt "$end" ] && alive; do
        q_after=$(queued)
        [ "$q_after" -ge "$want" ] && { restored_s=$(since "$t0"); break; }
        sleep 0.05
    done
fi
rss_r=$(kb VmRSS); hwm_r=$(kb VmHWM)
echo "restart after kill -9 ($segs files in the spool): listening after ${listen_s}s, queue restored ($q_after of $q_before) after ${restored_s}s; RSS $(mb "$rss_r") MB (anonymous $(mb "$(kb RssAnon)") MB, file $(mb "$(kb RssFile)") MB), VmHWM $(mb "$hwm_r") MB"
alive || { echo "relay exited after the restart"; fail_tail; exit 1; }
[ "$listen_s" = - ] && { echo "relay not listening after ${PHASE_TIMEOUT}s"; fail_tail; exit 1; }

# --- 3. Hops back: start both sinks, wait until every acknowledged id is at a sink.
# (A sink creates its record file when it starts: until then there is nothing to read.)
records() { cat "$W/onprem.rec" "$W/cloud.rec" 2>/dev/null || true; }
delivered_lines() { records | wc -l; }
distinct() { records | awk '!s[$1]++ { n++ } END { print n + 0 }'; }
t0=$(now)
$B sink --listen "127.0.0.1:$ONPREM" --record "$W/onprem.rec" >"$W/onprem.out" 2>/dev/null & SINK1=$!; PIDS+=("$SINK1")
$B sink --listen "127.0.0.1:$CLOUD" --record "$W/cloud.rec" >"$W/cloud.out" 2>/dev/null & SINK2=$!; PIDS+=("$SINK2")
first_s=-; drain_s=-; end=$(( $(date +%s) + PHASE_TIMEOUT ))
while [ "$(date +%s)" -lt "$end" ]; do
    n=$(delivered_lines)
    echo "$(since "$t0") $n" >> "$W/progress"
    [ "$first_s" = - ] && [ "$n" -gt 0 ] && first_s=$(since "$t0")
    if [ "$n" -ge "$ACKED" ] && [ "$(distinct)" -ge "$ACKED" ]; then drain_s=$(since "$t0"); break; fi
    alive || { echo "relay exited while draining"; fail_tail; break; }
    [ "$n" -ge "$ACKED" ] && [ "$(queued)" = 0 ] && break   # queue empty, some ids missing
    sleep 0.2
done
if [ "$drain_s" = - ]; then
    drain_cell="not all within ${PHASE_TIMEOUT} s: $(delivered_lines) deliveries of $ACKED by then"
    echo "$drain_cell (or stopped early); reporting what arrived"
else
    drain_cell="${drain_s} s"
fi
sleep 1   # late duplicates, if any
left=$(queued); rss_d=$(kb VmRSS); hwm_d=$(kb VmHWM)
stop "$SINK1" "$SINK2"
cat "$W/onprem.rec" "$W/cloud.rec" 2>/dev/null | awk '{ print $1 }' | sort > "$W/delivered.all"
sort -u "$W/delivered.all" > "$W/delivered"
LINES=$(wc -l < "$W/delivered.all"); DISTINCT=$(wc -l < "$W/delivered")
DUPS=$(( LINES - DISTINCT ))
LOST=$(comm -23 "$W/acked" "$W/delivered" | wc -l)
# When 10 %, 50 %, 90 % of the acknowledged messages had arrived (deliveries, polled every 0.2 s).
marks=$(awk -v a="$ACKED" '{ for (i = 1; i <= 3; i++) if (!(i in t) && $2 >= a * f[i]) t[i] = $1 }
    BEGIN { f[1] = 0.1; f[2] = 0.5; f[3] = 0.9 }
    END { printf "10%% %s s, 50%% %s s, 90%% %s s", (1 in t) ? t[1] : "-", (2 in t) ? t[2] : "-", (3 in t) ? t[3] : "-" }' "$W/progress" 2>/dev/null)
drain_rate=$(awk -v n="$DISTINCT" -v s="$drain_s" 'BEGIN { if (s != "-" && s > 0) printf "%.0f", n / s; else print "-" }')
# The same from the first delivery on (leaves out the wait for the relay to notice the hops).
drain_rate1=$(awk -v n="$DISTINCT" -v s="$drain_s" -v f="$first_s" 'BEGIN { if (s != "-" && f != "-" && s > f) printf "%.0f", n / (s - f); else print "-" }')
echo "drain: first delivery after ${first_s}s, $DISTINCT of $ACKED distinct ids delivered, all after: $drain_cell ($drain_rate msg/s; $drain_rate1 msg/s from the first delivery); $LINES deliveries, $DUPS duplicates, $LOST not delivered, $left still queued; relay RSS $(mb "$rss_d") MB, VmHWM $(mb "$hwm_d") MB"
echo "   arrived: $marks"
echo "   sinks: $(tail -n 1 "$W/onprem.out" 2>/dev/null) | $(tail -n 1 "$W/cloud.out" 2>/dev/null)"
stop "$RELAY"

echo
echo "== $LABEL $MESSAGES x $SIZE_KB KB ($(date -u +%F), commit $commit, $(nproc) CPUs; $SESSIONS sessions; min_backoff $MIN_BACKOFF, max_backoff $MAX_BACKOFF, $probe_note)"
echo
echo "| measure (both next hops down while loading) | result |"
echo "|---|---|"
echo "| accepted | $ACKED of $MESSAGES in ${load_s} s (${rate:--} msg/s, p99 ${p99:--} ms) |"
echo "| relay RSS with the queue full / VmHWM | $(mb "$rss_q") MB / $(mb "$hwm_q") MB (idle $(mb "$rss_idle") MB; ~$per_msg B per queued message) |"
echo "| queue (admin /metrics) | $states_q |"
echo "| spool on disk | $spool_q MB |"
echo "| delivery attempts while down (${down_s} s) | $attempts attempts, $conns connections |"
echo "| kill -9, restart: start to listening | ${listen_s} s |"
echo "| restart: start to queue restored | ${restored_s} s ($q_after of $q_before) |"
echo "| RSS after restart / VmHWM | $(mb "$rss_r") MB / $(mb "$hwm_r") MB |"
echo "| hops back: first delivery | ${first_s} s |"
echo "| hops back: all delivered (drain rate) | $drain_cell ($drain_rate msg/s; $drain_rate1 msg/s from the first delivery) |"
echo "| hops back: share arrived by | $marks |"
echo "| delivered distinct / duplicates / lost / still queued | $DISTINCT / $DUPS / $LOST / $left |"
echo "| RSS after the drain / VmHWM | $(mb "$rss_d") MB / $(mb "$hwm_d") MB |"
