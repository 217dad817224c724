#!/usr/bin/env bash
# The test command: finds (or starts) PostgreSQL, then runs the whole suite.
#
# PostgreSQL: $DATABASE_URL, else postgres://postgres@127.0.0.1:5432/test. If nothing
# answers there and PostgreSQL server binaries are installed, a throwaway cluster is
# started on a free port for the run and removed afterwards.
# PostgreSQL with wal_level = logical (WAL capture tests): $LOGICAL_DATABASE_URL, else
# postgres://postgres@127.0.0.1:5433/test
# when that has wal_level = logical, else a throwaway cluster with it started on a free
# port for the run. Replication slots the tests left behind (outboxd_t_...) are dropped.
# MySQL/MariaDB: $MYSQL_URL, else mysql://root@127.0.0.1:3306/test; for the default, the
# `test` database is created if missing, and a local MariaDB that is down is started.
# SQLite: files in temporary directories; nothing to prepare.
# Kafka: the tests start librdkafka's mock cluster in process; nothing to prepare.
# Python: the CloudEvents SDK for the http batch tests' receiver, installed if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

answers() {
    psql "$1" -qAtc 'SELECT 1' >/dev/null 2>&1
}

pgbin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT

# Starts a throwaway PostgreSQL with the extra server settings given (after the name of
# the variable to receive its URL) and creates its `test` database.
throwaway() {
    local into="$1"
    shift
    if [[ -z "$pgbin" ]]; then
        echo "test.sh: no PostgreSQL server binaries to start one" >&2
        exit 1
    fi
    local dir port as=()
    dir="$(mktemp -d /tmp/outboxd-pg.XXXXXX)"
    port=$((20000 + RANDOM % 20000))
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres "$dir"
        as=(runuser -u postgres --)
    fi
    echo "test.sh: starting a throwaway PostgreSQL ($*) in $dir on port $port" >&2
    "${as[@]}" "$pgbin/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
    "${as[@]}" "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 $*" start >/dev/null
    cleanup+=("${as[*]} $pgbin/pg_ctl -D $dir/data -m immediate stop >/dev/null; rm -rf $dir")
    psql "postgres://postgres@127.0.0.1:$port/postgres" -qc 'CREATE DATABASE test'
    export "$into=postgres://postgres@127.0.0.1:$port/test"
}

if ! answers "$DATABASE_URL"; then
    throwaway DATABASE_URL
fi

logical() {
    [[ "$(psql "$LOGICAL_DATABASE_URL" -qAtc 'SHOW wal_level' 2>/dev/null)" == logical ]]
}
if [[ -z "${LOGICAL_DATABASE_URL:-}" ]]; then
    # The machine's own cluster on 5433 when it was made for this (see the README).
    export LOGICAL_DATABASE_URL="postgres://postgres@127.0.0.1:5433/test"
    if ! logical; then
        throwaway LOGICAL_DATABASE_URL -c wal_level=logical -c max_replication_slots=64 -c max_wal_senders=64
    fi
fi
if ! logical; then
    echo "test.sh: no PostgreSQL with wal_level = logical at $LOGICAL_DATABASE_URL" >&2
    exit 1
fi
psql "$LOGICAL_DATABASE_URL" -qAtc "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name LIKE 'outboxd\_t\_%' AND NOT active" >/dev/null

if [[ -z "${MYSQL_URL:-}" ]]; then
    export MYSQL_URL="mysql://root@127.0.0.1:3306/test"
    mysql_ok() { mysql -uroot -h127.0.0.1 -P3306 -e 'CREATE DATABASE IF NOT EXISTS test' >/dev/null 2>&1; }
    if ! mysql_ok && [[ "$(id -u)" == 0 ]] && command -v service >/dev/null; then
        echo "test.sh: no MariaDB answers on 127.0.0.1:3306; starting the local one" >&2
        service mariadb start >/dev/null 2>&1 || true
        for _ in $(seq 1 30); do mysql_ok && break; sleep 1; done
    fi
    if ! mysql_ok; then
        echo "test.sh: no MySQL/MariaDB answers at $MYSQL_URL (set MYSQL_URL)" >&2
        exit 1
    fi
fi

# The http batch tests' receiver parses CloudEvents with the Python SDK.
if ! python3 -c 'import cloudevents.core.formats.json' >/dev/null 2>&1; then
    echo "test.sh: installing the CloudEvents Python SDK (pip install cloudevents)" >&2
    python3 -m pip install --quiet --disable-pip-version-check 'cloudevents>=2,<3'
fi

# The fault suite runs the mock broker as a process of its own (examples/mock_broker.rs).
cargo build --examples

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast
else
    cargo test --no-fail-fast
fi
