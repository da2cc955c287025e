#!/usr/bin/env bash
# Throwaway PostgreSQL on a free loopback port, for the test suite (issue 16: dedup stores
# and the transactional outbox).
#
#   scripts/postgres.sh start   STATE_DIR   start (installing Debian's postgresql if missing);
#                                           last stdout line is postgres://postgres@127.0.0.1:PORT/postgres
#   scripts/postgres.sh stop    STATE_DIR   stop it; idempotent, never fails
#   scripts/postgres.sh restart STATE_DIR   kill -9 (a crash) and start again on the same port
#                                           and data; last stdout line is the URL again
#
# Everything lives in STATE_DIR: the data directory, the socket, port, postgres.log. The
# server trusts loopback connections (a test instance: no password to leak). PostgreSQL
# refuses to run as root, so under root it runs as the `postgres` user the package creates.
# Progress goes to stderr so that callers can capture the URL from stdout.
# Tunable: POSTGRES_START_TIMEOUT (seconds, default 30).
set -euo pipefail

readonly START_TIMEOUT=${POSTGRES_START_TIMEOUT:-30}
readonly PROG=postgres.sh

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"

usage() {
  echo "usage: $0 start|stop|restart STATE_DIR" >&2
  exit 2
}

# The newest installed server's bin directory (Debian keeps them per major version).
bin_dir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/postgres" ] && echo "$dir"
}

ensure_postgres() {
  if bin_dir >/dev/null; then
    return
  fi
  apt_install postgresql postgresql "PostgreSQL >= 13"
  bin_dir >/dev/null || die "PostgreSQL still missing after apt-get install"
}

# Runs a server binary as the user the server must run as.
as_server() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

server_pid() {
  local pid
  pid=$(head -n 1 "$STATE/data/postmaster.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && alive "$pid" && echo "$pid"
}

url() {
  echo "postgres://postgres@127.0.0.1:$(cat "$STATE/port")/postgres"
}

# The server runs as `postgres` under root: every directory above STATE must let that user
# through, and the one `scripts/test.sh` makes with mktemp is 0700. Grants passage only
# (o+x, not listing) to the directories that lack it.
open_path() {
  [ "$(id -u)" -eq 0 ] || return 0
  local dir=$STATE
  while [ "$dir" != "/" ]; do
    dir=$(dirname "$dir")
    if ! runuser -u postgres -- test -x "$dir"; then
      log "letting the postgres user through $dir (chmod o+x)"
      chmod o+x "$dir"
    fi
  done
}

start() {
  mkdir -p "$STATE"
  ensure_postgres
  open_path
  local bin port
  bin=$(bin_dir)
  if [ ! -f "$STATE/data/PG_VERSION" ]; then
    mkdir -p "$STATE/data"
    [ "$(id -u)" -ne 0 ] || chown -R postgres:postgres "$STATE"
    log "initialising a data directory in $STATE/data..."
    as_server "$bin/initdb" -D "$STATE/data" -U postgres --auth=trust --no-sync \
      >"$STATE/initdb.log" 2>&1 || { tail -n 20 "$STATE/initdb.log" >&2; die "initdb failed"; }
  fi
  if [ -f "$STATE/port" ]; then
    port=$(cat "$STATE/port")
  else
    port=$(free_port)
    echo "$port" >"$STATE/port"
  fi
  if server_pid >/dev/null; then
    url
    return
  fi
  [ "$(id -u)" -ne 0 ] || chown -R postgres:postgres "$STATE"
  # A crash leaves postmaster.pid behind; the server checks and replaces a stale one.
  log "starting PostgreSQL on 127.0.0.1:$port..."
  as_server "$bin/pg_ctl" -D "$STATE/data" -l "$STATE/postgres.log" -w -t "$START_TIMEOUT" \
    -o "-p $port -k $STATE -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
    start >/dev/null || { tail -n 20 "$STATE/postgres.log" >&2; die "PostgreSQL did not start"; }
  url
}

stop() {
  [ -d "$STATE/data" ] || return 0
  local bin
  bin=$(bin_dir) || return 0
  as_server "$bin/pg_ctl" -D "$STATE/data" -m fast -w -t 20 stop >/dev/null 2>&1 || true
  local pid
  if pid=$(server_pid); then
    kill -9 "$pid" 2>/dev/null || true
  fi
}

restart() {
  local pid
  if pid=$(server_pid); then
    log "killing PostgreSQL (pid $pid and its backends) with SIGKILL..."
    # The backends go too, as in a machine crash: alone they would keep the shared memory.
    pkill -9 -P "$pid" 2>/dev/null || true
    kill -9 "$pid"
    wait_gone "$pid" 100 || die "PostgreSQL pid $pid did not die"
    # Where nothing reaps the killed server, its zombie still answers to kill -0, which the
    # new server takes for a live one in postmaster.pid. It is dead: the file goes.
    rm -f "$STATE/data/postmaster.pid" "$STATE"/.s.PGSQL.*.lock
  fi
  start
}

[ $# -eq 2 ] || usage
STATE=$(mkdir -p "$2" && cd "$2" && pwd)
readonly STATE
case $1 in
  start) start ;;
  stop) stop ;;
  restart) restart ;;
  *) usage ;;
esac
