#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for the feedback store's tests and print the line that points them at it:
#
#   eval "$(bash .ci/start-postgres.sh)"     # sets MOSS_RLHF_TEST_POSTGRES_URL
#
# Needs root and Debian's `postgresql` package (apt-get install -y postgresql). The cluster lives in a fresh temp
# directory owned by the `postgres` user, listens on 127.0.0.1 only, on a free port, with password authentication for
# one role and one database. Progress goes to stderr; stdout carries only the export line (and the stop command as a
# comment). Stop it with: runuser -u postgres -- PG_CTL -D DATADIR stop -m fast
set -euo pipefail

log() { echo "start-postgres: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "run me as root (I start the server as the postgres user)"; exit 1
fi
bindir=""
for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
  if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then bindir="$dir"; break; fi
done
if [ -z "$bindir" ]; then
  log "no PostgreSQL found under /usr/lib/postgresql (apt-get install -y postgresql)"; exit 1
fi
id postgres >/dev/null 2>&1 || { log "no 'postgres' user (the postgresql package creates it)"; exit 1; }

as_pg() { runuser -u postgres -- "$@"; }

# A free TCP port on 127.0.0.1 (ask the kernel, then release it just before the server binds).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')

base=$(mktemp -d /tmp/moss-rlhf-pg.XXXXXX)
chown postgres:postgres "$base"
chmod 700 "$base"
data="$base/data"
sock="$base/run"
as_pg mkdir -p "$sock"

user="moss_rlhf"
db="moss_rlhf_test"
password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')

log "initdb ($bindir) in $data"
as_pg "$bindir/initdb" -D "$data" -U postgres --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 \
  --locale=C.UTF-8 >&2

log "starting on 127.0.0.1:$port"
as_pg "$bindir/pg_ctl" -D "$data" -l "$base/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $sock -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
  start >&2 || { cat "$base/server.log" >&2; exit 1; }

as_pg "$bindir/psql" -h "$sock" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -q >&2 <<SQL
CREATE ROLE $user LOGIN PASSWORD '$password';
CREATE DATABASE $db OWNER $user;
SQL

log "ready: database $db, role $user (log: $base/server.log)"
echo "export MOSS_RLHF_TEST_POSTGRES_URL=postgresql+psycopg://$user:$password@127.0.0.1:$port/$db"
echo "# stop: runuser -u postgres -- $bindir/pg_ctl -D $data stop -m fast"
