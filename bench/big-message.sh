#!/usr/bin/env bash
# Peak memory for large messages: bench/big-message.sh [SESSIONS] [MB] [BUDGET]
# (defaults 1, 45, the config default). SESSIONS clients at once each send one MB-megabyte
# message made only of `a:` header lines (the worst case for header scanning) through the
# relay to a sink; reports the relay's peak RSS (VmHWM) and each client's final reply.
# With BUDGET (server.max_inflight_bytes) below SESSIONS x MB, the sessions over budget get
# 452 4.3.1 instead of growing memory. SINK_DELAY_MS=N makes the next hop answer slowly and
# CONCURRENCY=N sets the routes' concurrency: messages waiting for a route slot hold no body.
# SEQUENTIAL=1 sends the messages one after another instead of at once.
# Loopback only; bounded; stops what it starts by PID.
SESSIONS=${1:-1}
MB=${2:-45}
BUDGET=${3:-}
source "$(dirname "$0")/lib.sh"
printf 'address,state\nuser1@nhs.test,cloud\n' > "$W/directory.csv"
extra=()
[ -n "$BUDGET" ] && extra=(-e "s#^max_errors = 20#max_errors = 20\nmax_inflight_bytes = $BUDGET#")
[ -n "${CONCURRENCY:-}" ] && extra+=(-e "s#^concurrency = 20#concurrency = $CONCURRENCY#")
bench_config 27 "${extra[@]}"
$B sink --listen 127.0.0.1:27602 --delay-ms "${SINK_DELAY_MS:-0}" 2>/dev/null & PIDS+=($!)
RUST_LOG=warn $B serve --config "$W/coexist.toml" 2>"$W/serve.log" & RELAY=$!
PIDS+=("$RELAY")
wait_port 27525
sleep 0.5
kb() { awk "/$1/{print \$2}" "/proc/$RELAY/status"; }
before=$(kb VmRSS)
timeout 300 python3 - "$SESSIONS" "$MB" <<'PY'
import os, socket, sys, threading
n, mb = int(sys.argv[1]), int(sys.argv[2])
body = b"a:\r\n" * (mb * 1024 * 1024 // 4) + b"\r\nbody\r\n.\r\n"
def one(i, out):
    s = socket.create_connection(("127.0.0.1", 27525), timeout=120)
    f = s.makefile("rb")
    def reply():
        while True:
            l = f.readline()
            if l[3:4] != b"-":
                return l.decode().strip()
    reply()
    for cmd in (b"EHLO big.test", b"MAIL FROM:<x@example.org>", b"RCPT TO:<user1@nhs.test>", b"DATA"):
        s.sendall(cmd + b"\r\n")
        r = reply()
        if not r.startswith(("250", "354")):
            out[i] = r
            return
    s.sendall(body)
    out[i] = reply()
out = [None] * n
if os.environ.get("SEQUENTIAL"):
    for i in range(n):
        one(i, out)
else:
    ts = [threading.Thread(target=one, args=(i, out)) for i in range(n)]
    [t.start() for t in ts]
    [t.join() for t in ts]
for i, r in enumerate(out):
    print(f"session {i}: {r}")
PY
for _ in $(seq 1 600); do [ "$(spooled)" = 0 ] && break; sleep 0.5; done
echo "relay RSS before $((before / 1024)) MB; peak (VmHWM) $(( $(kb VmHWM) / 1024 )) MB; now $(( $(kb VmRSS) / 1024 )) MB; $SESSIONS x $MB MB messages of header lines"
