#!/usr/bin/env bash
# A million messages queued with the next hops down: bench/queue-million.sh [MESSAGES]
# (default 1000000; 5 KB each, 20 sessions). bench/queue-hops-down.sh at scale: queues
# MESSAGES messages while both sinks are down and reports the relay's RSS (VmRSS, VmHWM)
# and the spool's disk use (du), then kill -9 and restart (time to listening, time until the
# queue is restored, RSS), then starts the sinks and reports the drain (time, msg/s,
# duplicates, lost). Each phase has a hard timeout of 2 h per million messages (at least
# 300 s; PHASE_TIMEOUT=seconds to change it), after which it reports what it got. Needs
# about MESSAGES x 10 KB of free disk under $TMPDIR (checked first); the work directory is
# removed at the end. Loopback only; stops by PID what it starts.
set -euo pipefail
MESSAGES=${1:-1000000}
scaled=$(( MESSAGES * 7200 / 1000000 ))
export PHASE_TIMEOUT=${PHASE_TIMEOUT:-$(( scaled > 300 ? scaled : 300 ))}
export LABEL=${LABEL:-queue-million.sh}
export BASE=${BASE:-34}
export SESSIONS=${SESSIONS:-20}
# Longer settle at scale: memory is read once the queue has sat with the hops down.
export SETTLE=${SETTLE:-10}
exec "$(dirname "$0")/queue-hops-down.sh" "$MESSAGES" 5
