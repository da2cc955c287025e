#!/usr/bin/env bash
# Throwaway three-master Redis Cluster on free loopback ports, for the cluster tests
# (BRIEF.md section 6, issue 6).
#
#   scripts/redis-cluster.sh start        STATE_DIR     start three `redis-server
#                        --cluster-enabled yes` masters (installing Debian's redis-server if
#                        missing), join them with `redis-cli --cluster create` (16384 slots
#                        over the three, no replicas), wait for cluster_state:ok on every node;
#                        last stdout line: redis://127.0.0.1:P1,redis://127.0.0.1:P2,...
#   scripts/redis-cluster.sh stop         STATE_DIR     stop every node; idempotent, never fails
#   scripts/redis-cluster.sh restart-node STATE_DIR N   kill -9 (a crash) node N (1..3) and
#                        start it again on the same ports, nodes.conf and AOF; wait until the
#                        cluster is ok again; prints the node list again
#
# STATE_DIR/nodeN holds each node's redis.conf, port, bus-port (cluster bus, chosen free
# rather than port+10000), pid, redis.log, nodes.conf and the AOF; STATE_DIR/created marks a
# cluster that `redis-cli --cluster create` finished (a second `start` then only starts the
# nodes that are down, on the same ports). AOF with fsync on every write means an acked write
# survives the kill -9 of `restart-node`. Every node binds and announces 127.0.0.1 only.
# Without replicas a down master's slots are unavailable until it is back: restart-node
# brings it back within the node timeout, so the others never even mark it failed.
# Progress goes to stderr so that callers can capture the node list from stdout.
# Tunables: REDIS_CLUSTER_START_TIMEOUT (seconds, default 30, per wait).
set -euo pipefail

readonly START_TIMEOUT=${REDIS_CLUSTER_START_TIMEOUT:-30}
readonly NODES=3
# Time a node may be unreachable before the others mark it failed (and, without replicas,
# the cluster goes down); a kill -9 + restart takes well under a second.
readonly NODE_TIMEOUT_MS=5000
readonly PROG=redis-cluster.sh

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/redis-common.sh
. "$SCRIPT_DIR/lib/redis-common.sh"

usage() {
  echo "usage: $0 start|stop STATE_DIR | $0 restart-node STATE_DIR N (N in 1..$NODES)" >&2
  exit 2
}

node_dir() { echo "$STATE/node$1"; }
node_port() { cat "$STATE/node$1/port"; }

write_conf() {
  local dir=$1 port=$2 bus=$3
  cat >"$dir/redis.conf" <<EOC
# Written by scripts/redis-cluster.sh: a test cluster node, loopback only.
bind 127.0.0.1
port $port
dir "$dir"
daemonize no
# Logs go to stdout, which the script appends to $dir/redis.log.
logfile ""
# Persistence for the crash/restart tests: every acked write is on disk.
appendonly yes
appendfsync always
save ""

cluster-enabled yes
# Relative to dir; the node rewrites it on every cluster change, restart-node reuses it.
cluster-config-file nodes.conf
# An explicit bus port (the default is port+10000, which may be taken or out of range).
cluster-port $bus
# Advertise loopback in CLUSTER SLOTS/NODES and MOVED redirects, whatever the interfaces.
cluster-announce-ip 127.0.0.1
cluster-node-timeout $NODE_TIMEOUT_MS
EOC
}

# Prints why the cluster is not (yet) ok, as seen from every node; prints nothing when every
# node reports cluster_state:ok, all 16384 slots assigned and ok, all nodes known, and no node
# flagged failing, handshaking or disconnected.
cluster_problems() {
  local n port info nodes
  for n in $(seq 1 "$NODES"); do
    port=$(node_port "$n")
    if ! info=$(redis-cli -h 127.0.0.1 -p "$port" cluster info 2>&1 | tr -d '\r'); then
      echo "node $n (port $port): $info"
      continue
    fi
    if ! printf '%s\n' "$info" | grep -qx 'cluster_state:ok' ||
      ! printf '%s\n' "$info" | grep -qx 'cluster_slots_assigned:16384' ||
      ! printf '%s\n' "$info" | grep -qx 'cluster_slots_ok:16384' ||
      ! printf '%s\n' "$info" | grep -qx "cluster_known_nodes:$NODES"; then
      echo "node $n (port $port): $(printf '%s\n' "$info" |
        grep -E '^cluster_(state|slots_assigned|slots_ok|slots_pfail|slots_fail|known_nodes):' |
        tr '\n' ' ')"
      continue
    fi
    nodes=$(redis-cli -h 127.0.0.1 -p "$port" cluster nodes 2>&1 | tr -d '\r') || true
    if printf '%s\n' "$nodes" | awk '$3 ~ /fail|handshake|noaddr/ || $8 != "connected" { f = 1 }
        END { exit !f }'; then
      echo "node $n (port $port) sees:"
      printf '%s\n' "$nodes"
    fi
  done
}

wait_cluster_ok() {
  local deadline problems n
  deadline=$((SECONDS + START_TIMEOUT))
  while true; do
    problems=$(cluster_problems)
    [ -n "$problems" ] || return 0
    [ "$SECONDS" -lt "$deadline" ] || break
    sleep 0.2
  done
  printf '%s\n' "$problems" >&2
  for n in $(seq 1 "$NODES"); do
    echo "--- tail of $(node_dir "$n")/redis.log" >&2
    tail -n 15 "$(node_dir "$n")/redis.log" >&2
  done
  die "the cluster is not ok after ${START_TIMEOUT}s (state above)"
}

urls() {
  local n list=
  for n in $(seq 1 "$NODES"); do
    list+=${list:+,}redis://127.0.0.1:$(node_port "$n")
  done
  echo "$list"
}

stop_all() {
  local n
  for n in $(seq 1 "$NODES"); do
    redis_stop "$(node_dir "$n")"
  done
}

cmd_start() {
  local n dir taken=() port bus addrs=()
  ensure_redis
  if [ -f "$STATE/created" ]; then
    # Created by an earlier run of this STATE_DIR: keep its ports, nodes.conf and data.
    for n in $(seq 1 "$NODES"); do
      dir=$(node_dir "$n")
      if redis_pid "$dir" >/dev/null; then continue; fi
      log "starting node $n on 127.0.0.1:$(node_port "$n")..."
      redis_launch "$dir" "$(node_port "$n")" "$START_TIMEOUT"
    done
  else
    # Nothing or a half-made cluster: start from scratch.
    stop_all
    for n in $(seq 1 "$NODES"); do
      dir=$(node_dir "$n")
      rm -rf "$dir"
      mkdir -p "$dir"
      port=$(free_port "${taken[@]}")
      bus=$(free_port "${taken[@]}" "$port")
      taken+=("$port" "$bus")
      echo "$port" >"$dir/port"
      echo "$bus" >"$dir/bus-port"
      write_conf "$dir" "$port" "$bus"
      addrs+=("127.0.0.1:$port")
    done
    log "starting $NODES cluster nodes on ${addrs[*]} (state in $STATE)..."
    for n in $(seq 1 "$NODES"); do
      redis_launch "$(node_dir "$n")" "$(node_port "$n")" "$START_TIMEOUT"
    done
    log "creating the cluster..."
    if ! timeout "$START_TIMEOUT" redis-cli --cluster create "${addrs[@]}" \
      --cluster-replicas 0 --cluster-yes </dev/null >"$STATE/create.log" 2>&1; then
      tail -n 30 "$STATE/create.log" >&2
      die "redis-cli --cluster create failed (log above: $STATE/create.log)"
    fi
    touch "$STATE/created"
  fi
  wait_cluster_ok
  log "cluster ok"
  urls
}

cmd_stop() {
  local n any=
  for n in $(seq 1 "$NODES"); do
    if redis_pid "$(node_dir "$n")" >/dev/null; then any=1; fi
  done
  stop_all
  if [ -n "$any" ]; then log "stopped"; fi
}

cmd_restart_node() {
  local n=$1 dir port
  [ -f "$STATE/created" ] || die "$STATE has no created cluster; run start first"
  dir=$(node_dir "$n")
  port=$(node_port "$n")
  ensure_redis
  redis_crash "$dir"
  log "restarting node $n on 127.0.0.1:$port..."
  redis_launch "$dir" "$port" "$START_TIMEOUT"
  wait_cluster_ok
  log "cluster ok"
  urls
}

[ $# -ge 2 ] || usage
mkdir -p "$2"
STATE=$(cd "$2" && pwd)
readonly STATE

case $1 in
  start) [ $# -eq 2 ] || usage; cmd_start ;;
  stop) [ $# -eq 2 ] || usage; cmd_stop ;;
  restart-node)
    [ $# -eq 3 ] || usage
    case $3 in [1-9]) [ "$3" -le "$NODES" ] || usage ;; *) usage ;; esac
    cmd_restart_node "$3"
    ;;
  *) usage ;;
esac
