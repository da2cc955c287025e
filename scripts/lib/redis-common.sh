# shellcheck shell=bash
# Redis helpers shared by scripts/redis.sh and scripts/redis-cluster.sh (sourced, not run).
# Needs lib/common.sh, and STATE (where apt.log goes).

# Installs Debian's redis-server (which brings redis-cli) if either is missing.
ensure_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return
  fi
  apt_install redis-server redis-server "Redis >= 7"
  command -v redis-server >/dev/null || die "redis-server still missing after apt-get install"
}

# PID from DIR/pid if that process is still a redis-server (guards against pid reuse).
redis_pid() {
  local pid
  pid=$(cat "$1/pid" 2>/dev/null) || return 1
  if [ -z "$pid" ] || ! alive "$pid"; then return 1; fi
  grep -q redis "/proc/$pid/comm" 2>/dev/null || return 1
  echo "$pid"
}

# Whether the redis-server with PID answers on PORT with its data loaded.
# redis_ready PORT PID
redis_ready() {
  local info
  info=$(redis-cli -h 127.0.0.1 -p "$1" info 2>/dev/null | tr -d '\r') || return 1
  grep -qx "process_id:$2" <<<"$info" && grep -qx "loading:0" <<<"$info"
}

# Starts redis-server DIR/redis.conf in its own session (so the caller's Ctrl-C or
# process-group kill does not hit it, and a caller capturing our stdout does not wait for
# it), output appended to DIR/redis.log, and waits until it answers on PORT.
# redis_launch DIR PORT TIMEOUT
redis_launch() {
  local dir=$1 port=$2 timeout=$3 pid deadline
  echo "--- $(date '+%F %T') $PROG launching on port $port ---" >>"$dir/redis.log"
  rm -f "$dir/pid"
  # shellcheck disable=SC2016  # $$ and $0 belong to the inner sh
  setsid sh -c 'echo $$ >"$0"; exec redis-server "$1"' "$dir/pid" "$dir/redis.conf" \
    </dev/null >>"$dir/redis.log" 2>&1 &
  deadline=$((SECONDS + timeout))
  while [ "$SECONDS" -lt "$deadline" ]; do
    pid=$(cat "$dir/pid" 2>/dev/null || true)
    if [ -n "$pid" ] && ! alive "$pid"; then
      tail -n 30 "$dir/redis.log" >&2
      die "redis-server exited during startup (log above: $dir/redis.log)"
    fi
    # Ready once the server on the port answers, is ours (not some other redis that holds
    # the port; our own then fails to bind and exits, caught above), and has loaded its
    # data: INFO answers while the AOF is still loading, when every other command gets
    # LOADING.
    if [ -n "$pid" ] && redis_ready "$port" "$pid"; then
      return
    fi
    sleep 0.1
  done
  tail -n 30 "$dir/redis.log" >&2
  die "redis-server did not answer on 127.0.0.1:$port within ${timeout}s (log above)"
}

# Stops the redis-server of DIR: SIGTERM (clean shutdown; the AOF is already fsynced), SIGKILL
# if it still runs after 10 s. Never fails.
redis_stop() {
  local dir=$1 pid
  pid=$(redis_pid "$dir") || { rm -f "$dir/pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" 100; then
    log "redis-server $pid ignored SIGTERM for 10s; killing"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 || true
  fi
  rm -f "$dir/pid"
}

# kill -9 (a crash: only what was fsynced to the AOF survives) the redis-server of DIR.
redis_crash() {
  local dir=$1 pid
  if pid=$(redis_pid "$dir"); then
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 100 || die "redis-server $pid survived SIGKILL"
  fi
}
