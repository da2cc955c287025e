#!/usr/bin/env bash
# Throwaway redis-server on a free loopback port, for the test suite (BRIEF.md section 6).
#
#   scripts/redis.sh start   STATE_DIR   start (installing Debian's redis-server if missing);
#                                        last stdout line is redis://127.0.0.1:PORT
#   scripts/redis.sh stop    STATE_DIR   stop it; idempotent, never fails
#   scripts/redis.sh restart STATE_DIR   kill -9 (a crash) and start again on the same port
#                                        and data; last stdout line is the URL again
#
# Everything lives in STATE_DIR: redis.conf, port, pid, redis.log and the AOF.
# AOF with fsync on every write means an acked write survives the kill -9 of `restart`.
# Progress goes to stderr so that callers can capture the URL from stdout.
# Tunable: REDIS_START_TIMEOUT (seconds, default 20); REDIS_PERSISTENCE=none starts it
# without the AOF (for benchmarks measuring CPU rather than the disk; restart then loses data).
# Three-master Redis Cluster: scripts/redis-cluster.sh.
set -euo pipefail

readonly START_TIMEOUT=${REDIS_START_TIMEOUT:-20}
readonly PROG=redis.sh

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/redis-common.sh
. "$SCRIPT_DIR/lib/redis-common.sh"

usage() {
  echo "usage: $0 start|stop|restart STATE_DIR" >&2
  exit 2
}

write_conf() {
  local port=$1 appendonly=yes
  case "${REDIS_PERSISTENCE:-aof}" in
    aof) ;;
    none) appendonly=no ;;
    *) die "REDIS_PERSISTENCE must be aof or none, not '$REDIS_PERSISTENCE'" ;;
  esac
  cat >"$STATE/redis.conf" <<EOC
# Written by scripts/redis.sh: a test instance, loopback only.
bind 127.0.0.1
port $port
dir "$STATE"
daemonize no
# Logs go to stdout, which the script appends to $STATE/redis.log.
logfile ""
# Persistence for the crash/restart tests: every acked write is on disk.
appendonly $appendonly
appendfsync always
save ""
EOC
}

cmd_start() {
  local port
  ensure_redis
  if redis_pid "$STATE" >/dev/null; then
    port=$(cat "$STATE/port")
    log "already running on port $port"
  else
    # Reuse the port of an earlier run of this STATE_DIR so that its URL stays valid.
    if [ -s "$STATE/port" ]; then port=$(cat "$STATE/port"); else port=$(free_port); fi
    echo "$port" >"$STATE/port"
    write_conf "$port"
    log "starting redis-server on 127.0.0.1:$port (state in $STATE)..."
    redis_launch "$STATE" "$port" "$START_TIMEOUT"
  fi
  echo "redis://127.0.0.1:$port"
}

cmd_stop() {
  redis_pid "$STATE" >/dev/null || { rm -f "$STATE/pid"; return 0; }
  redis_stop "$STATE"
  log "stopped"
}

cmd_restart() {
  local port
  if [ ! -s "$STATE/port" ] || [ ! -s "$STATE/redis.conf" ]; then
    die "$STATE has no started instance; run start first"
  fi
  port=$(cat "$STATE/port")
  redis_crash "$STATE"
  ensure_redis
  log "restarting redis-server on 127.0.0.1:$port..."
  redis_launch "$STATE" "$port" "$START_TIMEOUT"
  echo "redis://127.0.0.1:$port"
}

[ $# -eq 2 ] || usage
mkdir -p "$2"
STATE=$(cd "$2" && pwd)
readonly STATE

case $1 in
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_restart ;;
  *) usage ;;
esac
