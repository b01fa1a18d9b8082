#!/usr/bin/env bash
# coexist and Postfix side by side, same routing, same load, same sinks, one run:
#   bench/vs-postfix.sh [DIRECTORY_SIZE] [MESSAGES] [CONCURRENCY]   (defaults 2000000 20000 16)
# Installs Postfix if missing (Debian package, "No configuration"; no system instance is
# started). Builds a separate Postfix instance under a temp dir on loopback with
# transport_maps holding the same directory (every address -> its sink), runs
# `coexist load` against Postfix and against coexist, checks at the sinks that every
# recipient reached the sink of its state, and prints both results and the ratios.
# Writes the side-by-side report of the two `coexist load` runs (summary with ratios,
# charts, parameters; self-contained HTML) to $REPORT (default
# target/vs-postfix-DATE.html, relative to the repository) and its chart to the same name
# with .png; coexist's run includes its deliveries per route, scraped from its /metrics.
# Every process started here is stopped by PID (Postfix with `postfix stop`).
# The same run also measures the machine's ceiling for each load: the same client straight
# into the next hop, no relay at all (`smtp-source` into Postfix's `smtp-sink`, `coexist
# load` into one `coexist sink`). A relay receives and sends every message, so half of
# that is the most any relay can reach here; each MTA's rate is printed as a share of it.
set -euo pipefail
COUNT=${1:-2000000}
MESSAGES=${2:-20000}
CONC=${3:-16}
# Both MTAs are loaded with DATA: Postfix 3.7 answers our client's pipelined BDAT about
# 40 ms late per message (a delayed-ACK interplay that smtp-source with DATA does not
# see), which would flatter coexist. LOAD_OPTS= (empty) to load with BDAT instead.
LOAD_OPTS=${LOAD_OPTS---no-chunking}
if ! command -v postfix >/dev/null 2>&1; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
source "$(dirname "$0")/lib.sh"
REPORT=${REPORT:-target/vs-postfix-$(date -u +%F).html}
mkdir -p "$(dirname "$REPORT")"
PF=$W/pf
cleanup_pf() { postfix -c "$PF" stop >/dev/null 2>&1 || true; }
trap 'cleanup_pf; cleanup' EXIT

echo "== $(date -u +%F), $(nproc) CPUs, directory $COUNT addresses, $MESSAGES messages, $CONC sessions"
$B directory generate --count "$COUNT" --domains 1 --cloud-share 0.5 --out "$W/directory.csv" >/dev/null
# Plain SMTP on both legs for both MTAs (Postfix below has TLS off too).
# No directory file watch: the sinks' record files share the folder with the directory file,
# and Postfix watches nothing either (its transport map is re-read by postmap).
bench_config 31 -e 's#tls = "opportunistic"#tls = "none"#; s#min_backoff = "300s"#min_backoff = "1s"#; s#^watch = true#watch = false#'

# --- Postfix instance: same routing as a transport map, both sinks as next hops.
mkdir -p "$PF/queue" "$PF/data"
chown postfix "$PF/data"
chmod 755 "$W" "$PF"   # Postfix daemons (user postfix) read the transport map here
awk -F, 'NR>1 { printf "%s smtp:[127.0.0.1]:%s\n", $1, ($2=="cloud" ? 31602 : 31601) }' "$W/directory.csv" > "$PF/transport"
cat > "$PF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.postfix.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = nhs.test
transport_maps = hash:$PF/transport
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
message_size_limit = 52428800
# Throughput as a competent admin would set it for a gateway (and equal to coexist's):
default_process_limit = 200
default_destination_concurrency_limit = 20
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
in_flow_delay = 0
smtp_connection_cache_on_demand = yes
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = $PF/maillog
maillog_file_prefixes = /var, /dev/stdout, /tmp
biff = no
EOF
sed -e 's#^smtp      inet .*#127.0.0.1:31526 inet n - n - - smtpd#' /etc/postfix/master.cf > "$PF/master.cf"
grep -q '^postlog' "$PF/master.cf" || echo 'postlog   unix-dgram n  -       n       -       1       postlogd' >> "$PF/master.cf"
# A second instance must be listed in the default instance's alternate_config_directories.
[ -f /etc/postfix/main.cf ] || { cp /etc/postfix/main.cf.proto /etc/postfix/main.cf; echo "inet_interfaces = loopback-only" >> /etc/postfix/main.cf; }
grep -q "^alternate_config_directories" /etc/postfix/main.cf || echo "alternate_config_directories =" >> /etc/postfix/main.cf
postconf -e "alternate_config_directories = $PF"
t0=$(date +%s.%N)
postmap -c "$PF" "hash:$PF/transport"
echo "postmap of $COUNT transport entries: $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"

sinks() {
    $B sink --listen 127.0.0.1:31601 --record "$W/$1.onprem" >"$W/$1.onprem.out" 2>/dev/null & PIDS+=($!); SINK1=$!
    $B sink --listen 127.0.0.1:31602 --record "$W/$1.cloud" >"$W/$1.cloud.out" 2>/dev/null & PIDS+=($!); SINK2=$!
    wait_port 31601; wait_port 31602
}
stop_sinks() { kill "$SINK1" "$SINK2"; wait "$SINK1" "$SINK2" 2>/dev/null || true; }
delivered() { cat "$W/$1.onprem" "$W/$1.cloud" 2>/dev/null | awk '{n+=$2} END {print n+0}'; }
# Memory (kB) right after the run: proportional set size (shared pages split between
# processes), summed over the given PIDs, so Postfix's many processes are not overcounted.
pss() { for p in "$@"; do cat "/proc/$p/smaps_rollup" 2>/dev/null; done | awk '/^Pss:/{s+=$2} END {print s+0}'; }

# cpu_ms PID: CPU time (user + system) the process has used so far, in ms.
cpu_ms() { awk -v t="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / t)}' "/proc/$1/stat"; }

# source_run NAME PORT: Postfix's own smtp-source as the client (SRC_SESSIONS sessions,
# MESSAGES messages of SRC_SIZE bytes, one recipient from the directory each, DATA), then
# waits for the sinks; records the end-to-end time.
SRC_SESSIONS=${SRC_SESSIONS:-20}
SRC_SIZE=${SRC_SIZE:-5120}
declare -A SRC
source_run() {
    local name=$1 port=$2 t0 rcpt
    rcpt=$(awk -F, 'NR==2 {print $1}' "$W/directory.csv")
    sinks "src-$name"
    t0=$(date +%s.%N)
    timeout 900 smtp-source -s "$SRC_SESSIONS" -m "$MESSAGES" -l "$SRC_SIZE" -f x@example.org -t "$rcpt" "127.0.0.1:$port" >/dev/null || true
    local sent
    sent=$(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $t0}")
    for _ in $(seq 1 6000); do [ "$(delivered "src-$name")" -ge "$MESSAGES" ] && break; sleep 0.1; done
    SRC[$name]="$(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $t0}") $sent $(delivered "src-$name")"
    stop_sinks
}

# run NAME PORT [LOAD OPTIONS...]: load, then wait for the sinks; prints a result line.
# The load's report document goes to $W/NAME.json.
run() {
    local name=$1 port=$2 t0 t1 want
    shift 2
    sinks "$name"
    t0=$(date +%s.%N)
    $B load --target "127.0.0.1:$port" --directory "$W/directory.csv" --messages "$MESSAGES" \
        --concurrency "$CONC" --max-rcpts 3 --size 4096 --max-seconds 600 $LOAD_OPTS \
        --label "$name" --json "$W/$name.json" "$@" > "$W/$name.load"
    want=$(awk '/accepted \(/{gsub(/\(/,""); for(i=1;i<=NF;i++) if($i=="recipients),") print $(i-1)}' "$W/$name.load")
    for _ in $(seq 1 3000); do [ "$(delivered "$name")" -ge "${want:-0}" ] && break; sleep 0.1; done
    t1=$(date +%s.%N)
    E2E[$name]=$(awk "BEGIN{printf \"%.2f\", $t1 - $t0}")
    WANT[$name]=$want
    GOT[$name]=$(delivered "$name")
    # Routing check: every recipient at the sink of its directory state.
    MIS[$name]=$(awk -F, 'NR==FNR { if (FNR>1) s[$1]=$2; next }
        { split(FILENAME, p, "."); side=p[length(p)]; n=split($0, f, " "); split(f[3], r, ",");
          for (i in r) if (s[r[i]] != side) bad++ } END { print bad+0 }' "$W/directory.csv" "$W/$name.onprem" "$W/$name.cloud")
    stop_sinks
}
declare -A E2E WANT GOT MIS RSS

# --- Postfix
postfix -c "$PF" check || true
postfix -c "$PF" start
wait_port 31526
run postfix 31526
source_run postfix 31526
MASTER=$(head -1 "$PF/queue/pid/master.pid" | tr -d ' ')
RSS[postfix]=$(pss "$MASTER" $(pgrep -P "$MASTER"))
cleanup_pf

# --- coexist
RUST_LOG=warn $B serve --config "$W/coexist.toml" 2>"$W/serve.log" & RELAY=$!
PIDS+=("$RELAY")
wait_port 31525
c0=$(cpu_ms "$RELAY")
run coexist 31525 --metrics-url http://127.0.0.1:31080/metrics --metrics-token-file "$W/admin.token"
c1=$(cpu_ms "$RELAY")
source_run coexist 31525
c2=$(cpu_ms "$RELAY")
RSS[coexist]=$(pss "$RELAY")
kill "$RELAY"; wait "$RELAY" 2>/dev/null || true

# --- The ceiling: no relay. `coexist load` into one sink (it takes every recipient), and
# `smtp-source` into Postfix's `smtp-sink` (which keeps nothing), same parameters.
$B sink --listen 127.0.0.1:31611 --record "$W/ceiling.rec" >/dev/null 2>&1 & PIDS+=($!); CSINK=$!
wait_port 31611
$B load --target 127.0.0.1:31611 --directory "$W/directory.csv" --messages "$MESSAGES" \
    --concurrency "$CONC" --max-rcpts 3 --size 4096 --max-seconds 600 $LOAD_OPTS \
    --label ceiling > "$W/ceiling.load"
kill "$CSINK"; wait "$CSINK" 2>/dev/null || true
smtp-sink -u postfix 127.0.0.1:31612 1000 >/dev/null 2>&1 & PIDS+=($!); PSINK=$!
wait_port 31612
p0=$(cpu_ms "$PSINK")
t0=$(date +%s.%N)
timeout 900 smtp-source -s "$SRC_SESSIONS" -m "$MESSAGES" -l "$SRC_SIZE" -f x@example.org \
    -t "$(awk -F, 'NR==2 {print $1}' "$W/directory.csv")" 127.0.0.1:31612 >/dev/null || true
SRC_CEILING=$(awk "BEGIN{printf \"%.0f\", $MESSAGES / ($(date +%s.%N) - $t0)}")
# What the receiving half alone costs: smtp-sink takes each session (connect, EHLO, MAIL,
# RCPT, DATA, QUIT) and keeps nothing: no disk, no onward delivery.
SINK_CPU=$(awk "BEGIN{printf \"%.3f\", ($(cpu_ms "$PSINK") - $p0) / $MESSAGES}")
kill "$PSINK"; wait "$PSINK" 2>/dev/null || true

echo
for name in postfix coexist; do
    echo "== $name"
    cat "$W/$name.load"
    echo "end to end: ${E2E[$name]} s (first message sent to last recipient at the sinks), delivered ${GOT[$name]}/${WANT[$name]} recipients, misrouted ${MIS[$name]}, memory (PSS after the run) $(( ${RSS[$name]} / 1024 )) MB"
done
rate() { awk '/^acceptance:/{print $2}' "$W/$1.load"; }
p99() { awk '/^acceptance:/{for(i=1;i<=NF;i++) if($i=="p99") print $(i+1)}' "$W/$1.load"; }
echo "coexist CPU per relayed message: $(awk "BEGIN{printf \"%.3f\", ($c1 - $c0) / $MESSAGES}") ms per message ($(awk "BEGIN{printf \"%.3f\", ($c1 - $c0) / ${WANT[coexist]:-1}}") per recipient) with coexist load; $(awk "BEGIN{printf \"%.3f\", ($c2 - $c1) / $MESSAGES}") ms per message with smtp-source"
for name in postfix coexist; do
    read -r e2e sent got <<<"${SRC[$name]}"
    echo "== smtp-source ($SRC_SESSIONS sessions, $MESSAGES x $SRC_SIZE B, 1 recipient) against $name: sent in $sent s, end to end $e2e s ($(awk "BEGIN{printf \"%.0f\", $MESSAGES / $e2e}") msg/s), delivered $got"
done
read -r pe _ _ <<<"${SRC[postfix]}"; read -r ce _ _ <<<"${SRC[coexist]}"
echo "== smtp-source ratio: end to end $(awk "BEGIN{printf \"%.2f\", $pe / $ce}")x faster"
# Shares of the ceiling: a relay's end-to-end rate against half the no-relay rate.
share() { awk "BEGIN{printf \"%.2f\", $1 / ($2 / 2)}"; }
echo "== ceiling (no relay), smtp-source into smtp-sink: $SRC_CEILING msg/s; a relay can reach at most $(( SRC_CEILING / 2 )) msg/s;" \
     "coexist $(awk "BEGIN{printf \"%.0f\", $MESSAGES / $ce}") msg/s = $(share "$MESSAGES / $ce" "$SRC_CEILING") of that," \
     "postfix $(awk "BEGIN{printf \"%.0f\", $MESSAGES / $pe}") msg/s = $(share "$MESSAGES / $pe" "$SRC_CEILING")"
echo "== receiving only: smtp-sink used $SINK_CPU ms of CPU per message in that run (no disk, no onward delivery); coexist, which receives, syncs and delivers, used $(awk "BEGIN{printf \"%.3f\", ($c2 - $c1) / $MESSAGES}")"
echo "== ceiling (no relay), coexist load into one sink: $(rate ceiling) msg/s accepted; a relay can reach at most half;" \
     "coexist acceptance $(rate coexist) msg/s = $(share "$(rate coexist)" "$(rate ceiling)") of that," \
     "postfix $(rate postfix) msg/s = $(share "$(rate postfix)" "$(rate ceiling)")"
echo
echo "== ratio coexist / postfix: acceptance $(awk "BEGIN{printf \"%.2f\", $(rate coexist) / $(rate postfix)}")x," \
     "end to end $(awk "BEGIN{printf \"%.2f\", ${E2E[postfix]} / ${E2E[coexist]}}")x faster," \
     "p99 $(p99 coexist) ms vs $(p99 postfix) ms," \
     "memory $(( ${RSS[coexist]} / 1024 )) MB vs $(( ${RSS[postfix]} / 1024 )) MB"
$B report "$W/postfix.json" "$W/coexist.json" --html "$REPORT" --chart "${REPORT%.html}.png" >/dev/null
echo "== side-by-side report: $REPORT (chart ${REPORT%.html}.png)"
