#!/usr/bin/env bash
# Memory held by idle SMTP sessions: bench/idle-connections.sh [N]   (default 10000)
# Starts the relay with room for N sessions, opens N connections from a Python asyncio client
# that reads the greeting and then stays idle, and reports the relay's RSS before and after.
# Loopback only; bounded; every process started here is stopped by PID.
N=${1:-10000}
source "$(dirname "$0")/lib.sh"
want=$((N + 1024)); hard=$(ulimit -Hn); [ "$hard" = unlimited ] || [ "$want" -le "$hard" ] || want=$hard; ulimit -n "$want"
printf 'address,state\nuser1@nhs.test,cloud\n' > "$W/directory.csv"
bench_config 29 -e "s#max_connections = 1000#max_connections = $((N + 100))#; s#max_connections_per_ip = 50#max_connections_per_ip = 0#"
RUST_LOG=warn $B serve --config "$W/coexist.toml" 2>"$W/serve.log" & RELAY=$!
PIDS+=("$RELAY")
wait_port 29525
sleep 0.5
rss() { awk '/VmRSS/{print $2}' "/proc/$RELAY/status"; }
before=$(rss)
python3 - "$N" "$W/ready" 2>"$W/client.log" <<'PY' & CLIENT=$!
import asyncio, sys
n, ready = int(sys.argv[1]), sys.argv[2]
async def one(conns):
    r, w = await asyncio.open_connection("127.0.0.1", 29525)
    line = await r.readline()
    assert line.startswith(b"220"), line
    conns.append(w)
async def main():
    conns = []
    for i in range(0, n, 100):
        await asyncio.gather(*(one(conns) for _ in range(min(100, n - i))))
    open(ready, "w").write(str(len(conns)))
    await asyncio.sleep(30)
asyncio.run(main())
PY
PIDS+=("$CLIENT")
for _ in $(seq 1 600); do [ -f "$W/ready" ] && break; sleep 0.1; done
[ -f "$W/ready" ] || { echo "client failed:"; tail -5 "$W/client.log"; tail -5 "$W/serve.log"; exit 1; }
sleep 1
after=$(rss)
echo "idle sessions held: $(cat "$W/ready"); relay RSS before $((before / 1024)) MB, with them $((after / 1024)) MB: $(( (after - before) / $(cat "$W/ready") )) KB per idle session"
$B status --config "$W/coexist.toml" | sed 's/^/status: /' || true
