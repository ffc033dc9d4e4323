#!/usr/bin/env bash
# Install PostgreSQL from Debian's packages (if missing), start a cluster, create the test role and database,
# and print the SQLAlchemy URL the `postgres`-marked tests read from LOOP_TEST_POSTGRES_URL.
#   usage: export LOOP_TEST_POSTGRES_URL="$(.ci/postgres.sh)"
# Everything but the URL goes to stderr. Safe to run again: it only creates what is missing.
set -euo pipefail
PGUSER_NAME="${LOOP_PG_USER:-loop}"
PGPASS="${LOOP_PG_PASSWORD:-loop}"
PGDB="${LOOP_PG_DB:-loop_test}"
PGPORT="${LOOP_PG_PORT:-5432}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "installing postgresql from Debian's packages..." >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi

VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main"' | grep -q .; then
  as_root pg_createcluster "$VERSION" main --port "$PGPORT" >&2
fi
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
  as_root pg_ctlcluster "$VERSION" main start >&2
fi
PORT="$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $3}')"

psql_pg() { as_root su postgres -c "psql -p $PORT -v ON_ERROR_STOP=1 -qtAc \"$1\""; }
for _ in $(seq 1 30); do psql_pg "select 1" >/dev/null 2>&1 && break; sleep 1; done
if [ "$(psql_pg "select 1 from pg_roles where rolname = '$PGUSER_NAME'")" != 1 ]; then
  psql_pg "create role $PGUSER_NAME login password '$PGPASS'" >&2
fi
if [ "$(psql_pg "select 1 from pg_database where datname = '$PGDB'")" != 1 ]; then
  psql_pg "create database $PGDB owner $PGUSER_NAME" >&2
fi
echo "postgresql+psycopg://$PGUSER_NAME:$PGPASS@127.0.0.1:$PORT/$PGDB"
