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
# Tunable: REDIS_START_TIMEOUT (seconds, default 20).
set -euo pipefail

readonly START_TIMEOUT=${REDIS_START_TIMEOUT:-20}

log() { echo "redis.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  echo "usage: $0 start|stop|restart STATE_DIR" >&2
  exit 2
}

# Root runs apt-get directly; anyone else needs passwordless sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

ensure_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "redis-server is missing and apt-get is not available; install Redis >= 7"
  log "installing Debian's redis-server package (output in $STATE/apt.log)..."
  if ! { as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
    >"$STATE/apt.log" 2>&1; then
    tail -n 30 "$STATE/apt.log" >&2
    die "apt-get install redis-server failed (log above)"
  fi
  # The package may start a system redis on 6379. We never use it; stop it so it does not
  # hold memory or a port, but do not fail where there is no init system to ask.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now redis-server >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/redis-server ]; then
    as_root /etc/init.d/redis-server stop >/dev/null 2>&1 || true
  fi
  command -v redis-server >/dev/null || die "redis-server still missing after apt-get install"
}

# A port nobody is bound to. Drawn below the kernel's ephemeral range so that outgoing
# connections cannot take it between a crash and the restart on the same port.
free_port() {
  local low port i files=(/proc/net/tcp)
  [ -r /proc/net/tcp6 ] && files+=(/proc/net/tcp6)
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 11000 ] || low=32768
  for i in $(seq 1 200); do
    port=$((10000 + (RANDOM * 32768 + RANDOM) % (low - 10000)))
    # Any TCP socket (IPv4 or IPv6, any state) with this local port? /proc needs no tools.
    if ! awk -v p="$(printf ':%04X' "$port")" 'FNR > 1 && substr($2, length($2) - 4) == p { f = 1 }
        END { exit !f }' "${files[@]}"; then
      echo "$port"
      return
    fi
  done
  die "no free port found after $i tries"
}

# True while PID runs. A zombie counts as gone: once setsid'd, the server's parent is PID 1,
# which in a container may reap late or never.
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# PID from STATE_DIR/pid if that process is still our redis-server (guards against pid reuse).
live_pid() {
  local pid
  pid=$(cat "$STATE/pid" 2>/dev/null) || return 1
  if [ -z "$pid" ] || ! alive "$pid"; then return 1; fi
  grep -q redis "/proc/$pid/comm" 2>/dev/null || return 1
  echo "$pid"
}

wait_gone() {
  local pid=$1 tenths=$2
  while alive "$pid" && [ "$tenths" -gt 0 ]; do
    sleep 0.1
    tenths=$((tenths - 1))
  done
  ! alive "$pid"
}

write_conf() {
  local port=$1
  cat >"$STATE/redis.conf" <<EOF
# Written by scripts/redis.sh: a test instance, loopback only.
bind 127.0.0.1
port $port
dir "$STATE"
daemonize no
# Logs go to stdout, which the script appends to $STATE/redis.log.
logfile ""
# Persistence for the crash/restart tests: every acked write is on disk.
appendonly yes
appendfsync always
save ""
EOF
}

# Runs redis-server in its own session (so the caller's Ctrl-C or process-group kill does not
# hit it, and a caller capturing our stdout does not wait for it), then waits for PONG.
launch() {
  local port pid deadline
  port=$(cat "$STATE/port")
  echo "--- $(date '+%F %T') redis.sh launching on port $port ---" >>"$STATE/redis.log"
  rm -f "$STATE/pid"
  # shellcheck disable=SC2016  # $$ and $0 belong to the inner sh
  setsid sh -c 'echo $$ >"$0"; exec redis-server "$1"' "$STATE/pid" "$STATE/redis.conf" \
    </dev/null >>"$STATE/redis.log" 2>&1 &
  deadline=$((SECONDS + START_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    pid=$(cat "$STATE/pid" 2>/dev/null || true)
    if [ -n "$pid" ] && ! alive "$pid"; then
      tail -n 30 "$STATE/redis.log" >&2
      die "redis-server exited during startup (log above: $STATE/redis.log)"
    fi
    # Ready once the server on the port answers and is ours, not some other redis that
    # holds the port (our own then fails to bind and exits, caught above).
    if [ -n "$pid" ] && redis-cli -h 127.0.0.1 -p "$port" info server 2>/dev/null |
      tr -d '\r' | grep -qx "process_id:$pid"; then
      return
    fi
    sleep 0.1
  done
  tail -n 30 "$STATE/redis.log" >&2
  die "redis-server did not answer on 127.0.0.1:$port within ${START_TIMEOUT}s (log above)"
}

cmd_start() {
  local port
  ensure_redis
  if live_pid >/dev/null; then
    port=$(cat "$STATE/port")
    log "already running on port $port"
  else
    # Reuse the port of an earlier run of this STATE_DIR so that its URL stays valid.
    if [ -s "$STATE/port" ]; then port=$(cat "$STATE/port"); else port=$(free_port); fi
    echo "$port" >"$STATE/port"
    write_conf "$port"
    log "starting redis-server on 127.0.0.1:$port (state in $STATE)..."
    launch
  fi
  echo "redis://127.0.0.1:$port"
}

cmd_stop() {
  local pid
  pid=$(live_pid) || { rm -f "$STATE/pid"; return 0; }
  # SIGTERM = clean shutdown (AOF is already fsynced); escalate if it hangs.
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" 100; then
    log "redis-server $pid ignored SIGTERM for 10s; killing"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 || true
  fi
  rm -f "$STATE/pid"
  log "stopped"
}

cmd_restart() {
  local pid port
  if [ ! -s "$STATE/port" ] || [ ! -s "$STATE/redis.conf" ]; then
    die "$STATE has no started instance; run start first"
  fi
  port=$(cat "$STATE/port")
  if pid=$(live_pid); then
    # A crash, not a shutdown: only what was fsynced to the AOF survives.
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 100 || die "redis-server $pid survived SIGKILL"
  fi
  ensure_redis
  log "restarting redis-server on 127.0.0.1:$port..."
  launch
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
