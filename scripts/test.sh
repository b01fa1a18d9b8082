#!/usr/bin/env bash
# The test command of the README (and what .ci/run runs): installs what the tests need when
# it is missing (Debian packages: PostgreSQL, OpenLDAP's slapd, NATS, Prometheus's promtool,
# Chromium and chromedriver; as root, or through sudo), checks the shipped alerting rules,
# formatting and lints, and runs every test of the workspace. Extra arguments go to `cargo test` (e.g. `bash scripts/test.sh --test fleet`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "scripts/test.sh: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# The interop test drives Python's smtplib (python3 is on the machine image; install if not).
if ! command -v python3 >/dev/null 2>&1; then
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3
fi

# The fleet tests (tests/fleet.rs, the fleet demo) need PostgreSQL on 127.0.0.1:5432 with
# trust auth for loopback and a database `test`. Where one already runs, it is used as it is;
# where none does, Debian's is installed if missing, configured for that, and started.
ensure_postgres() {
    if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        return 0
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client
    fi
    local ver
    ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
    if [ -z "$ver" ]; then
        ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
        as_root pg_createcluster "$ver" main
    fi
    local conf=/etc/postgresql/$ver/main
    if ! grep -q 'coexist-ci' "$conf/pg_hba.conf"; then
        as_root sed -i '1i host all all 127.0.0.1/32 trust # coexist-ci\nhost all all ::1/128 trust # coexist-ci' "$conf/pg_hba.conf"
    fi
    as_root sed -i "s/^#\?port = .*/port = 5432/; s/^#\?listen_addresses = .*/listen_addresses = 'localhost'/" "$conf/postgresql.conf"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main restart
    for _ in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 1
    done
    if ! psql -h 127.0.0.1 -U postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
        psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test"
    fi
}
ensure_postgres

# tests/fleet_tls.rs starts a PostgreSQL of its own with TLS on (initdb and postgres from
# Debian's server package), also where the shared server above is not Debian's.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi

# The LDAP source's tests (tests/ldap.rs) run Debian's OpenLDAP server (slapd, slapadd) on a
# loopback port of their own.
if [ ! -x /usr/sbin/slapd ] || [ ! -x /usr/sbin/slapadd ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slapd
fi

# The Active Directory tests (tests/active_directory.rs) run Samba's AD DC (Debian's samba,
# samba-ad-dc; ldb-tools and the samba Python bindings prepare it, openssl its test CA),
# one per test on its own loopback address, from tests/samba/recipe.sh. Packages only: the
# services Debian would start at install are held back (policy-rc.d), the tests start their
# own DCs.
if ! command -v samba >/dev/null 2>&1 || ! command -v ldbmodify >/dev/null 2>&1 \
    || ! command -v samba-tool >/dev/null 2>&1; then
    as_root apt-get update -qq
    hold=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        hold=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        samba samba-ad-dc samba-ad-provision samba-dsdb-modules winbind ldb-tools openssl
    if [ -n "$hold" ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
fi

# The shadow tests (tests/shadow.rs) start NATS JetStream servers of their own (Debian's
# nats-server) on loopback ports.
if ! command -v nats-server >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server
fi

# The weekend under fire (tests/weekend.rs, its smoke size) builds network namespaces with
# iproute2's ip and tc (it needs root, as CI runs) and starts PostgreSQL as the `postgres`
# user through setpriv (util-linux).
if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2
fi

# The alerting rules shipped in ops/prometheus are checked (and their unit tests run) with
# promtool, from Debian's prometheus package (no Prometheus server is started here).
if ! command -v promtool >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi

# The console's browser tests (tests/console.rs) drive Debian's headless Chromium through
# chromedriver (packages chromium and chromium-driver).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi

promtool check rules ops/prometheus/coexist-alerts.yml
promtool test rules ops/prometheus/coexist-alerts.test.yml
cargo fmt --check
cargo clippy --workspace --all-targets -- -D warnings
# Every program of the workspace first: the load tool's report tests run `coexist-report`
# beside the `coexist` under test, and `cargo test` alone builds only test harnesses of it.
cargo build --bins
# Every crate of the workspace (the root's default members), unit and end-to-end tests.
cargo test "$@"
