#!/usr/bin/env bash
# Throwaway RabbitMQ node on a free loopback port, for the test suite (issue 18).
#
#   scripts/rabbitmq.sh start   STATE_DIR   start (installing Debian's rabbitmq-server if
#                                           missing); last stdout line is
#                                           amqp://guest:guest@127.0.0.1:PORT/%2f
#   scripts/rabbitmq.sh stop    STATE_DIR   stop it; idempotent, never fails
#   scripts/rabbitmq.sh restart STATE_DIR   kill -9 (a crash) and start again on the same
#                                           port and data; last stdout line is the URL again
#
# Everything lives in STATE_DIR: the config, ports, pid, logs, the node's database and its
# Erlang cookie. The node has its own name and its own port mapper (epmd) on a port of its
# own, so it neither meets a system RabbitMQ nor another test node. `guest` may only connect
# from loopback, which is where the tests are: the URL carries no secret worth keeping.
# A message the broker confirmed is on disk (durable queue, persistent message), so it
# survives the kill -9 of `restart`.
# Progress goes to stderr so that callers can capture the URL from stdout.
# Tunable: RABBITMQ_START_TIMEOUT (seconds, default 60: an Erlang node boots slowly on 2 cores).
set -euo pipefail

readonly START_TIMEOUT=${RABBITMQ_START_TIMEOUT:-60}
readonly PROG=rabbitmq.sh
# Not /usr/sbin's wrappers: under root they switch to the `rabbitmq` user and drop the
# environment that points the node at STATE_DIR. These run it as whoever calls them.
readonly SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
readonly CTL=/usr/lib/rabbitmq/bin/rabbitmqctl

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"

usage() {
  echo "usage: $0 start|stop|restart STATE_DIR" >&2
  exit 2
}

ensure_rabbitmq() {
  [ -x "$SERVER" ] && return
  apt_install rabbitmq-server rabbitmq-server "rabbitmq-server >= 3.10"
  # The package also leaves a port mapper on 4369, which nothing here uses.
  env -u ERL_EPMD_PORT epmd -kill >/dev/null 2>&1 || true
  [ -x "$SERVER" ] || die "RabbitMQ still missing after apt-get install"
}

# The environment every RabbitMQ and Erlang command of this node runs with.
node_env() {
  local port epmd
  port=$(cat "$STATE/port")
  epmd=$(cat "$STATE/epmd-port")
  export HOME=$STATE/home
  export ERL_EPMD_PORT=$epmd
  export RABBITMQ_NODENAME=rabbit-$port@localhost
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$port
  export RABBITMQ_DIST_PORT=$(cat "$STATE/dist-port")
  export RABBITMQ_CONFIG_FILE=$STATE/rabbitmq.conf
  export RABBITMQ_ENABLED_PLUGINS_FILE=$STATE/enabled_plugins
  export RABBITMQ_MNESIA_BASE=$STATE/mnesia
  export RABBITMQ_LOG_BASE=$STATE/log
  export RABBITMQ_PID_FILE=$STATE/pid
  # Loopback only: the node's port mapper and its distribution port listen on every
  # interface by default.
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

write_conf() {
  mkdir -p "$STATE/home" "$STATE/log" "$STATE/mnesia"
  chmod 700 "$STATE/home"
  cat >"$STATE/rabbitmq.conf" <<EOC
# Written by scripts/rabbitmq.sh: a test instance, loopback only.
listeners.tcp.1 = 127.0.0.1:$(cat "$STATE/port")
loopback_users.guest = true
# Tests fill queues on purpose; the default 50 MB free-disk alarm would block publishers on a
# full CI disk before anything else notices.
disk_free_limit.absolute = 10MB
EOC
  echo "[]." >"$STATE/enabled_plugins"
}

server_pid() {
  local pid
  pid=$(cat "$STATE/pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && alive "$pid" && echo "$pid"
}

url() {
  echo "amqp://guest:guest@127.0.0.1:$(cat "$STATE/port")/%2f"
}

# Waits until the node says it has booted (all its listeners open).
wait_ready() {
  local launcher=$1 deadline=$((SECONDS + START_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    alive "$launcher" || {
      tail -n 30 "$STATE/rabbitmq.log" >&2
      die "the RabbitMQ node exited during start (log above)"
    }
    if "$CTL" -q await_startup --timeout 2 >/dev/null 2>&1; then
      return
    fi
    sleep 0.5
  done
  tail -n 30 "$STATE/rabbitmq.log" >&2
  die "RabbitMQ did not start on 127.0.0.1:$(cat "$STATE/port") within ${START_TIMEOUT}s (log above)"
}

launch() {
  local launcher
  node_env
  setsid "$SERVER" >>"$STATE/rabbitmq.log" 2>&1 </dev/null &
  launcher=$!
  wait_ready "$launcher"
}

# Stops this node's own epmd: each node here has one, on a port of its own.
stop_epmd() {
  local epmd
  epmd=$(cat "$STATE/epmd-port" 2>/dev/null) || return 0
  ERL_EPMD_PORT=$epmd epmd -kill >/dev/null 2>&1 || true
}

cmd_start() {
  local port
  ensure_rabbitmq
  if server_pid >/dev/null; then
    log "already running on port $(cat "$STATE/port")"
  else
    # Reuse the ports of an earlier run of this STATE_DIR so that its URL stays valid.
    if [ ! -s "$STATE/port" ]; then
      port=$(free_port)
      echo "$port" >"$STATE/port"
      free_port "$port" >"$STATE/epmd-port"
      free_port "$port" "$(cat "$STATE/epmd-port")" >"$STATE/dist-port"
    fi
    write_conf
    log "starting RabbitMQ on 127.0.0.1:$(cat "$STATE/port") (state in $STATE)..."
    launch
  fi
  url
}

cmd_stop() {
  local pid
  if pid=$(server_pid); then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 300; then
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 50 || true
    fi
    log "stopped"
  fi
  rm -f "$STATE/pid"
  stop_epmd
}

cmd_restart() {
  local pid
  if [ ! -s "$STATE/port" ] || [ ! -s "$STATE/rabbitmq.conf" ]; then
    die "$STATE has no started instance; run start first"
  fi
  if pid=$(server_pid); then
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 || die "the RabbitMQ node (pid $pid) survived kill -9"
  fi
  rm -f "$STATE/pid"
  ensure_rabbitmq
  log "restarting RabbitMQ on 127.0.0.1:$(cat "$STATE/port")..."
  launch
  url
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
