#!/usr/bin/env bash
# A throwaway PostgreSQL server on localhost for the multi-worker tests (tests/test_workers.py).
#
#   eval "$(bash .ci/postgres.sh)"    # install if missing, start (or reuse) a server, export URL
#   bash .ci/postgres.sh stop         # stop the server kept in the same folder
#
# stdout carries only `export ...` lines (M2N2_TEST_POSTGRES_URL, M2N2_PG_STARTED=1 when this
# call started the server, 0 when it was already running); messages go to stderr. Idempotent:
# PostgreSQL is installed from Debian's package only when no initdb is found, and a server
# already running from $M2N2_PG_DIR is reused. The server listens on 127.0.0.1 only, on a free
# port, with trust authentication and fsync off: a test fixture, never a place for real data.
set -euo pipefail

PGDIR=${M2N2_PG_DIR:-${TMPDIR:-/tmp}/m2n2-postgres}
DATA=$PGDIR/data
DB=m2n2_test
ROLE=m2n2

log() { echo "postgres.sh: $*" >&2; }
die() {
  log "$*"
  exit 1
}
find_bin() { find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1; }

BIN=$(find_bin || true)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  log "no PostgreSQL found: installing Debian's postgresql package"
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    die "not root and no sudo: cannot install postgresql (apt-get install -y postgresql)"
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq >&2 || log "apt-get update failed; trying the install anyway"
  "${SUDO[@]}" apt-get install -y -qq postgresql >&2 || die "apt-get install postgresql failed"
  BIN=$(find_bin || true)
  [ -n "$BIN" ] && [ -x "$BIN/initdb" ] || die "postgresql installed but no initdb found"
fi

# PostgreSQL refuses to run as root: then the server runs as the package's `postgres` user.
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || die "running as root, but there is no 'postgres' user"
  AS_SERVER=(runuser -u postgres --)
else
  AS_SERVER=()
fi
server() { "${AS_SERVER[@]}" "$@"; }

if [ "${1:-}" = "stop" ]; then
  if [ -f "$DATA/postmaster.pid" ]; then
    server "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2 || die "pg_ctl stop failed"
  else
    log "no server running in $DATA"
  fi
  exit 0
fi

mkdir -p "$PGDIR"
if [ "$(id -u)" -eq 0 ]; then
  chown postgres: "$PGDIR"
fi
chmod 700 "$PGDIR"

if [ ! -f "$DATA/PG_VERSION" ]; then
  log "initdb in $DATA"
  server "$BIN/initdb" -D "$DATA" -U "$ROLE" --auth=trust --no-locale -E UTF8 >"$PGDIR/initdb.log" 2>&1 ||
    die "initdb failed (see $PGDIR/initdb.log)"
  cat >>"$DATA/postgresql.conf" <<EOF
# m2n2 test server: localhost only, no durability (a throwaway fixture).
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PGDIR'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
fi

STARTED=0
if server "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  PORT=$(sed -n 4p "$DATA/postmaster.pid")
  log "reusing the server on port $PORT"
else
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  server "$BIN/pg_ctl" -D "$DATA" -l "$PGDIR/server.log" -o "-p $PORT" -w -t 60 start >&2 ||
    die "the server did not start (see $PGDIR/server.log)"
  STARTED=1
fi

if ! "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$ROLE" -d postgres -tAc \
  "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
  "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$ROLE" "$DB" || die "createdb $DB failed"
fi

echo "export M2N2_TEST_POSTGRES_URL=postgresql+psycopg2://$ROLE@127.0.0.1:$PORT/$DB"
echo "export M2N2_PG_STARTED=$STARTED"
