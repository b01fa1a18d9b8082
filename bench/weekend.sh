#!/usr/bin/env bash
# The weekend under fire, full size: bench/weekend.sh [SEED] [--random]   (about 10 minutes, as root)
# Three coexist nodes with [fleet], [shadow] and [directory.ldap] in network namespaces, a
# PostgreSQL primary and standby, three NATS JetStream servers, OpenLDAP with 200,000
# mailboxes and two next hops; a day's curve of mail (peak 80 msg/s) through all three MX
# nodes for 8 minutes while an 83,000-mailbox batch from a migration report, three evening
# batches of 22,000 and LDAP changes are applied, and every kind of fault is injected (the
# fixed schedule of crates/weekend/src/plan.rs, or with --random one drawn from SEED).
# Writes the history and report.html to a folder under /tmp and prints the checker's
# verdict; exits non-zero on any violation. Release build (reused from target/).
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-1}
shift || true
cargo build --release --quiet --bins
OUT=${WEEKEND_OUT:-/tmp/coexist-weekend-$(date -u +%Y%m%dT%H%M%S)}
exec "${CARGO_TARGET_DIR:-target}/release/coexist-weekend" run --seed "$SEED" --out "$OUT" "$@"
