# Shared set-up for the bench/ scripts (sourced, not run). Builds the release binary into $B
# (COEXIST_BIN=path: that binary, no build; the build honours CARGO_TARGET_DIR), makes a
# work directory $W removed on exit, stops every PID in PIDS on exit, and writes a
# config for ports ${BASE}525 (SMTP), ${BASE}601/${BASE}602 (on-prem/cloud sinks), ${BASE}080
# (admin) with all paths in $W (the admin token file too: `serve` writes it, the CLI reads it).
set -euo pipefail
if [ -n "${COEXIST_BIN:-}" ]; then COEXIST_BIN=$(realpath "$COEXIST_BIN"); fi
cd "$(dirname "$0")/.."
if [ -n "${COEXIST_BIN:-}" ]; then
    B=$COEXIST_BIN
else
    cargo build --release --quiet
    B=$(realpath "${CARGO_TARGET_DIR:-target}")/release/coexist
fi
W=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

# bench_config BASE [extra sed expressions...]: writes $W/coexist.toml (and certificates).
# The shipped cloud route verifies Exchange Online's certificate (tls = "verify"); the sinks
# standing in for it here have none, so the cloud route gets the on-premises route's
# opportunistic TLS (before the extra expressions, which may change both).
bench_config() {
    local base=$1; shift
    $B gen-certs --out "$W" >/dev/null
    sed -e "s#127.0.0.1:2525#127.0.0.1:${base}525#; s#127.0.0.1:2601#127.0.0.1:${base}601#; s#127.0.0.1:2602#127.0.0.1:${base}602#" \
        -e 's#^tls = "verify"#tls = "opportunistic"#' \
        -e "s#127.0.0.1:8025#127.0.0.1:${base}080#; s#certs/server#$W/server#; s#var/spool#$W/spool#" \
        -e "s#config/directory.csv#$W/directory.csv#; s#var/admin.token#$W/admin.token#" \
        "$@" config/coexist.toml > "$W/coexist.toml"
}

# wait_port PORT: until something listens on 127.0.0.1:PORT (20 s at most).
wait_port() { for _ in $(seq 1 400); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

# spooled: how many messages the spool under $W/spool holds (read from its log; the relay may
# be running or stopped).
spooled() { $B queue spooled --spool "$W/spool" 2>/dev/null | head -1 | awk '{print $1}'; }

# cpu_ms PID: the CPU time (user + system) a process has used, in ms.
cpu_ms() { awk -v t="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / t)}' "/proc/$1/stat"; }

# start_sinks NAME BASE: the two next hops (on ${BASE}601 and ${BASE}602), recording what they
# take in $W/NAME.onprem and $W/NAME.cloud; stop_sinks stops them; delivered NAME counts the
# recipients they took.
start_sinks() {
    $B sink --listen "127.0.0.1:${2}601" --record "$W/$1.onprem" >/dev/null 2>&1 & PIDS+=($!); SINK1=$!
    $B sink --listen "127.0.0.1:${2}602" --record "$W/$1.cloud" >/dev/null 2>&1 & PIDS+=($!); SINK2=$!
    wait_port "${2}601"; wait_port "${2}602"
}
stop_sinks() { kill "$SINK1" "$SINK2"; wait "$SINK1" "$SINK2" 2>/dev/null || true; }
delivered() { cat "$W/$1.onprem" "$W/$1.cloud" 2>/dev/null | awk '{n+=$2} END {print n+0}'; }
