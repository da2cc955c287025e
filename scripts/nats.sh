#!/usr/bin/env bash
# Throwaway nats-server with JetStream on a free loopback port, for the test suite (issue 18).
#
#   scripts/nats.sh start   STATE_DIR   start (installing Debian's nats-server if missing);
#                                       last stdout line is nats://127.0.0.1:PORT
#   scripts/nats.sh stop    STATE_DIR   stop it; idempotent, never fails
#   scripts/nats.sh restart STATE_DIR   kill -9 (a crash) and start again on the same port
#                                       and store; last stdout line is the URL again
#
# Everything lives in STATE_DIR: nats.conf, port, pid, nats.log and the JetStream store.
# JetStream writes each acknowledged message to its store files before the acknowledgement;
# a kill -9 of the process (`restart`) leaves them in the kernel's page cache, so nothing
# acknowledged is lost. (Debian's 2.9 has no `sync_interval`: a machine crash is not
# covered, and no test here crashes the machine.)
# Progress goes to stderr so that callers can capture the URL from stdout.
# Tunable: NATS_START_TIMEOUT (seconds, default 20).
set -euo pipefail

readonly START_TIMEOUT=${NATS_START_TIMEOUT:-20}
readonly PROG=nats.sh

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"

usage() {
  echo "usage: $0 start|stop|restart STATE_DIR" >&2
  exit 2
}

ensure_nats() {
  command -v nats-server >/dev/null && return
  apt_install nats-server nats-server "nats-server >= 2.9"
  command -v nats-server >/dev/null || die "nats-server still missing after apt-get install"
}

write_conf() {
  local port=$1
  cat >"$STATE/nats.conf" <<EOC
# Written by scripts/nats.sh: a test instance, loopback only.
listen: 127.0.0.1:$port
server_name: test-$port
jetstream {
  store_dir: "$STATE/store"
}
EOC
}

server_pid() {
  local pid
  pid=$(cat "$STATE/pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && alive "$pid" && echo "$pid"
}

# Waits until the server answers on its port with an INFO line that says JetStream is on.
wait_ready() {
  local port=$1 pid=$2 deadline=$((SECONDS + START_TIMEOUT)) info
  while [ "$SECONDS" -lt "$deadline" ]; do
    alive "$pid" || {
      tail -n 20 "$STATE/nats.log" >&2
      die "nats-server exited during start (log above)"
    }
    # The server speaks first: one INFO line, ending in CRLF.
    if info=$(timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && head -n 1 <&3" 2>/dev/null) &&
      [[ $info == INFO* ]] && [[ $info == *'"jetstream":true'* ]]; then
      return
    fi
    sleep 0.1
  done
  tail -n 20 "$STATE/nats.log" >&2
  die "nats-server did not answer on 127.0.0.1:$port within ${START_TIMEOUT}s (log above)"
}

launch() {
  local port=$1 pid
  setsid nats-server -c "$STATE/nats.conf" >>"$STATE/nats.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$STATE/pid"
  wait_ready "$port" "$pid"
}

cmd_start() {
  local port
  ensure_nats
  if server_pid >/dev/null; then
    port=$(cat "$STATE/port")
    log "already running on port $port"
  else
    # Reuse the port of an earlier run of this STATE_DIR so that its URL stays valid.
    if [ -s "$STATE/port" ]; then port=$(cat "$STATE/port"); else port=$(free_port); fi
    echo "$port" >"$STATE/port"
    write_conf "$port"
    log "starting nats-server with JetStream on 127.0.0.1:$port (state in $STATE)..."
    launch "$port"
  fi
  echo "nats://127.0.0.1:$port"
}

cmd_stop() {
  local pid
  pid=$(server_pid) || { rm -f "$STATE/pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" 100; then
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 || true
  fi
  rm -f "$STATE/pid"
  log "stopped"
}

cmd_restart() {
  local port pid
  if [ ! -s "$STATE/port" ] || [ ! -s "$STATE/nats.conf" ]; then
    die "$STATE has no started instance; run start first"
  fi
  port=$(cat "$STATE/port")
  if pid=$(server_pid); then
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 || die "nats-server (pid $pid) survived kill -9"
  fi
  ensure_nats
  log "restarting nats-server on 127.0.0.1:$port..."
  launch "$port"
  echo "nats://127.0.0.1:$port"
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
