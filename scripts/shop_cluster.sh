#!/usr/bin/env bash
# The distributed shop on loopback (docs/shop.md, "Distributed"): each of the six services as
# its own process with its own database and HTTP port, their saga nodes talking over the TCP
# transport or NATS JetStream, behind nginx as the one base URL.
#
# usage: scripts/shop_cluster.sh start [--transport tcp|nats] [--payment-limit N]
#        scripts/shop_cluster.sh stop | status
#        scripts/shop_cluster.sh restart SERVICE [--kill]
#
#   start    builds the shop if needed (in build/cluster), picks free loopback ports, starts
#            nats-server (with --transport nats), the six services and nginx, waits for each
#            /healthz and prints the base URL. Default transport: tcp; payment limit 5000.
#   stop     stops everything started (SIGTERM, then SIGKILL after 10 s).
#   status   says what runs and asks each /healthz.
#   restart  stops one service (SIGTERM, or SIGKILL with --kill) and starts it again on the
#            same database and ports.
#
# Environment: SHOP_CLUSTER_RUN   the run folder (default build/cluster-run): pids, ports,
#                                 logs, databases, nginx's prefix, the base URL in ./url
#              SHOP_BIN           a shop binary to use instead of building one
#              SHOP_JWT_SECRET    the shared token secret (default: a random one per start)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
run=${SHOP_CLUSTER_RUN:-$root/build/cluster-run}
services=(account product order payment orchestrator purchase)

usage() {
  sed -n '6,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "shop_cluster: $*" >&2
  exit 1
}

# A pid is alive unless gone or a zombie (nobody may reap our orphans).
alive() {
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || return 1
  local state
  state=$(sed 's/^[0-9]* (.*) \([A-Z]\) .*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] && [ "$state" != X ]
}

pid_of() { cat "$run/pids/$1.pid" 2>/dev/null || true; }

# Stops one process by its pid file: SIGTERM (or the given signal), then SIGKILL after 10 s.
stop_one() {
  local name=$1 sig=${2:-TERM} pid
  pid=$(pid_of "$name")
  if alive "$pid"; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      echo "shop_cluster: $name ($pid) did not stop within 10 s; SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    fi
  fi
  rm -f "$run/pids/$name.pid"
}

# Waits (up to 60 s) until url answers 200; fails with the log of name otherwise.
wait_healthy() {
  local name=$1 url=$2 pid
  pid=$(pid_of "$name")
  for _ in $(seq 600); do
    if curl -fsS -m 2 -o /dev/null "$url" 2>/dev/null; then return 0; fi
    if ! alive "$pid"; then break; fi
    sleep 0.1
  done
  echo "shop_cluster: $name did not become healthy ($url); its log:" >&2
  tail -n 30 "$run/logs/$name.log" >&2 || true
  return 1
}

# Starts a service from its saved command line (run/cmd/NAME), in the background.
launch() {
  local name=$1
  local -a cmd
  mapfile -t cmd <"$run/cmd/$name"
  setsid "${cmd[@]}" </dev/null >>"$run/logs/$name.out" 2>>"$run/logs/$name.log" &
  echo $! >"$run/pids/$name.pid"
}

port_of() { sed -n "s/^$1=//p" "$run/ports"; }

start() {
  local transport=tcp limit=5000
  while [ $# -gt 0 ]; do
    case "$1" in
      --transport) [ $# -ge 2 ] || usage; transport=$2; shift 2 ;;
      --payment-limit) [ $# -ge 2 ] || usage; limit=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  case "$transport" in tcp|nats) ;; *) die "--transport must be tcp or nats" ;; esac
  [[ "$limit" =~ ^[0-9]+$ ]] || die "--payment-limit must be a non-negative integer"
  for s in "${services[@]}" nginx nats; do
    if alive "$(pid_of "$s")"; then die "already running ($s; run dir $run): stop it first"; fi
  done
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || die "nginx is missing (scripts/deps.sh installs it)"
  nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
  if [ "$transport" = nats ]; then
    command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || die "nats-server is missing (scripts/deps.sh installs it)"
  fi

  local bin=${SHOP_BIN:-}
  if [ -z "$bin" ]; then
    bash "$root/scripts/deps.sh" >/dev/null
    local build="$root/build/cluster"
    echo "shop_cluster: building in $build"
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAGA_BUILD_TESTS=OFF >/dev/null
    cmake --build "$build" -j2 --target shop shop_demo >/dev/null
    bin="$build/examples/shop/shop"
  fi
  [ -x "$bin" ] || die "no shop binary at $bin"

  rm -rf "$run"
  mkdir -p "$run/pids" "$run/logs" "$run/cmd" "$run/data" "$run/nginx/tmp"
  local secret=${SHOP_JWT_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}

  # Ports: six HTTP, five TCP transport listeners, nginx, nats.
  local -a p
  mapfile -t p < <("$bin" --free-ports 13)
  [ ${#p[@]} -eq 13 ] || die "could not find free ports"
  local i=0
  for s in "${services[@]}"; do echo "$s=${p[$i]}" >>"$run/ports"; i=$((i + 1)); done
  for s in product order payment orchestrator purchase; do
    echo "tcp_$s=${p[$i]}" >>"$run/ports"; i=$((i + 1))
  done
  echo "nginx=${p[11]}" >>"$run/ports"
  echo "nats=${p[12]}" >>"$run/ports"
  echo "$transport" >"$run/transport"

  if [ "$transport" = nats ]; then
    local nats_bin
    nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
    printf '%s\n' "$nats_bin" -a 127.0.0.1 -p "$(port_of nats)" -js -sd "$run/nats" >"$run/cmd/nats"
    launch nats
    for _ in $(seq 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$(port_of nats)") 2>/dev/null; then break; fi
      sleep 0.1
    done
  fi

  # Every node gets the same route table: channel -> its node's TCP listener.
  local -a routes=()
  for s in product order payment orchestrator purchase; do
    routes+=(--tcp-route "$s=127.0.0.1:$(port_of "tcp_$s")")
  done
  for s in "${services[@]}"; do
    mkdir -p "$run/data/$s"
    {
      printf '%s\n' "$bin" --service "$s" --data "$run/data/$s" --port "$(port_of "$s")" \
        --secret "$secret" --payment-limit "$limit"
      if [ "$s" != account ]; then
        if [ "$transport" = tcp ]; then
          printf '%s\n' --transport tcp --tcp-listen "127.0.0.1:$(port_of "tcp_$s")" "${routes[@]}"
        else
          printf '%s\n' --transport nats --nats "nats://127.0.0.1:$(port_of nats)"
        fi
      fi
      if [ "$s" = purchase ]; then
        printf '%s\n' --product-url "http://127.0.0.1:$(port_of product)"
      fi
    } >"$run/cmd/$s"
    launch "$s"
  done
  for s in "${services[@]}"; do
    wait_healthy "$s" "http://127.0.0.1:$(port_of "$s")/healthz" || { stop_all; exit 1; }
  done

  sed -e "s|@PREFIX@|$run/nginx|g" -e "s|@PORT@|$(port_of nginx)|g" \
      -e "s|@ACCOUNT@|127.0.0.1:$(port_of account)|g" -e "s|@PRODUCT@|127.0.0.1:$(port_of product)|g" \
      -e "s|@ORDER@|127.0.0.1:$(port_of order)|g" -e "s|@PAYMENT@|127.0.0.1:$(port_of payment)|g" \
      -e "s|@ORCHESTRATOR@|127.0.0.1:$(port_of orchestrator)|g" \
      -e "s|@PURCHASE@|127.0.0.1:$(port_of purchase)|g" \
      "$root/examples/shop/nginx.conf.in" >"$run/nginx/nginx.conf"
  printf '%s\n' "$nginx_bin" -p "$run/nginx" -c "$run/nginx/nginx.conf" -e "$run/nginx/error.log" \
    >"$run/cmd/nginx"
  launch nginx
  local url="http://127.0.0.1:$(port_of nginx)"
  wait_healthy nginx "$url/healthz/purchase" || { cat "$run/nginx/error.log" >&2 || true; stop_all; exit 1; }
  echo "$url" >"$run/url"
  echo "shop_cluster: $transport, run folder $run"
  echo "shop_cluster: base URL $url"
}

stop_all() {
  [ -d "$run/pids" ] || { echo "shop_cluster: nothing started (run dir $run)"; return 0; }
  stop_one nginx
  for s in purchase orchestrator payment order product account; do stop_one "$s"; done
  stop_one nats
  echo "shop_cluster: stopped"
}

status() {
  [ -f "$run/ports" ] || { echo "shop_cluster: not started (run dir $run)"; return 3; }
  local rc=0
  for s in "${services[@]}" nginx nats; do
    local pid
    pid=$(pid_of "$s")
    [ -n "$pid" ] || continue
    if alive "$pid"; then
      local h=""
      case "$s" in
        nginx) h=$(curl -sS -m 2 "http://127.0.0.1:$(port_of nginx)/healthz" 2>&1 || true) ;;
        nats) h="" ;;
        *) h=$(curl -sS -m 2 "http://127.0.0.1:$(port_of "$s")/healthz" 2>&1 || true) ;;
      esac
      printf '%-13s running (pid %s) %s\n' "$s" "$pid" "$h"
    else
      printf '%-13s stopped\n' "$s"
      rc=1
    fi
  done
  [ -f "$run/url" ] && echo "base URL $(cat "$run/url")"
  return $rc
}

restart() {
  local name=${1:-} sig=TERM
  [ -n "$name" ] || usage
  [ "${2:-}" = --kill ] && sig=KILL
  [ -f "$run/cmd/$name" ] || die "unknown service '$name' (or nothing started; run dir $run)"
  stop_one "$name" "$sig"
  launch "$name"
  case "$name" in
    nginx) wait_healthy nginx "$(cat "$run/url")/healthz" ;;
    nats) ;;
    *) wait_healthy "$name" "http://127.0.0.1:$(port_of "$name")/healthz" ;;
  esac
  echo "shop_cluster: $name restarted (pid $(pid_of "$name"))"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  start) start "$@" ;;
  stop) [ $# -eq 0 ] || usage; stop_all ;;
  status) [ $# -eq 0 ] || usage; status ;;
  restart) [ $# -ge 1 ] && [ $# -le 2 ] || usage; restart "$@" ;;
  *) usage ;;
esac
