#!/usr/bin/env bash
# Makes a development CA and a server certificate in certs/ (ca.crt, server.crt, server.key)
# for the default config. Development only: the key never leaves this machine and is
# ignored by git. Usage: certs/make-dev-certs.sh [HOSTNAME]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release -- gen-certs --out certs --hostname "${1:-mx1.coexist.test}"
