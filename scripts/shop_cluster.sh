#!/usr/bin/env bash
# The distributed shop on loopback (docs/shop.md, "Distributed"): each of the six services as
# its own process with its own database and HTTP port, their saga nodes talking over the TCP
# transport or NATS JetStream, behind nginx as the one base URL.
#
# usage: scripts/shop_cluster.sh start [--transport tcp|nats] [--payment-limit N] [--insecure-plaintext] [--otlp URL] [--python-payment]
#        scripts/shop_cluster.sh stop | status
#        scripts/shop_cluster.sh restart SERVICE [--kill]
#
#   start    builds the shop if needed (in build/cluster), picks free loopback ports, makes a
#            throwaway CA and a certificate per saga node (scripts/make_pki.sh, in run/pki),
#            starts nats-server (with --transport nats), the six services and nginx, waits for
#            each /healthz and prints the base URL. Default transport: tcp; payment limit 5000.
#            TCP: mutual TLS, every route naming its node's identity, and an access list per
#            node (docs/shop.md, "Security of the distributed shop"); --insecure-plaintext runs
#            without TLS or access lists (anyone who reaches a port can run any handler).
#            NATS: nats-server over TLS with a user per service (random passwords in
#            run/secrets) whose permissions let it publish only to the subjects it sends to and
#            use only its own consumers and reply subjects.
#            --otlp URL: every service exports its spans to the OpenTelemetry collector at URL
#            (OTLP over HTTP/JSON, URL/v1/traces; docs/shop.md, "Tracing").
#            --python-payment: the payment service is examples/shop/payment.py (the Python
#            binding, bindings/python) instead of the shop binary's, with the same command
#            line, database, channel and HTTP API (docs/shop.md, "A participant in Python").
#   stop     stops everything started (SIGTERM, then SIGKILL after 10 s).
#   status   says what runs and asks each /healthz.
#   restart  stops one service (SIGTERM, or SIGKILL with --kill) and starts it again on the
#            same database and ports.
#
# Environment: SHOP_CLUSTER_RUN   the run folder (default build/cluster-run): pids, ports,
#                                 logs, databases, nginx's prefix, the base URL in ./url
#              SHOP_BIN           a shop binary to use instead of building one
#              SHOP_JWT_SECRET    the shared token secret (default: a random one per start)
#              SHOP_CLUSTER_EXTRA_CERTS  more names the CA signs certificates for (tools, tests;
#                                 they are on no access list and have no NATS user)
#              SHOP_PYTHON        the python3 that runs payment.py (default python3)
#              LIBSAGA_LIBRARY    the libsaga payment.py loads (default: the one the shop
#                                 binary is linked with)
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

# The access list of a saga node over TCP: who may send to which of its channels. Commands
# come from the orchestrator only; the orchestrator takes purchase requests (on
# orchestrator.requests) from the purchase node and replies (on orchestrator) from the three
# participants; the purchase node takes the replies to its requests and the purchase events
# from the orchestrator.
allow_of() {
  case "$1" in
    product|order|payment) printf '%s\n' --tls-allow "orchestrator=$1" ;;
    orchestrator)
      printf '%s\n' --tls-allow purchase=orchestrator.requests --tls-allow product=orchestrator \
        --tls-allow order=orchestrator --tls-allow payment=orchestrator ;;
    purchase) printf '%s\n' --tls-allow orchestrator=purchase --tls-allow orchestrator=purchase.events ;;
  esac
}

# NATS: the subjects a service publishes to (its channels' subjects) and the channels it
# consumes (one durable consumer each, named as the adapter names them).
nats_sends() {
  case "$1" in
    product|order|payment) echo saga.orchestrator ;;
    purchase) echo saga.orchestrator.requests ;;
    orchestrator) echo saga.product saga.order saga.payment saga.purchase saga.purchase.events ;;
  esac
}
nats_consumes() {
  case "$1" in
    orchestrator) echo orchestrator orchestrator.requests ;;
    purchase) echo purchase purchase.events ;;
    *) echo "$1" ;;
  esac
}
# The adapter's consumer name for a channel: the channel when it is only [A-Za-z0-9_-],
# otherwise those characters with the rest as '_' and the FNV-1a hash of the channel.
consumer_name() {
  local ch=$1 out="" c i h=2166136261 changed=0
  for ((i = 0; i < ${#ch}; i++)); do
    c=${ch:i:1}
    if [[ "$c" =~ [A-Za-z0-9_-] ]]; then out+=$c; else out+=_; changed=1; fi
  done
  if [ $changed = 1 ]; then
    for ((i = 0; i < ${#ch}; i++)); do
      printf -v c '%d' "'${ch:i:1}"
      h=$(( ((h ^ c) * 16777619) & 0xffffffff ))
    done
    printf -v out '%s_%08x' "$out" "$h"
  fi
  echo "$out"
}

# nats-server's configuration: TLS with the cluster's CA, JetStream, one user per service.
nats_conf() {
  local s ch c pw q='"'
  echo "listen: 127.0.0.1:$(port_of nats)"
  echo "jetstream { store_dir: $q$run/nats$q }"
  echo "tls { cert_file: $q$run/pki/nats.pem$q, key_file: $q$run/pki/nats.key$q, ca_file: $q$run/pki/ca.pem$q, timeout: 5 }"
  echo "authorization { users = ["
  for s in product order payment orchestrator purchase; do
    pw=$(cat "$run/secrets/$s")
    local -a pub=()
    for ch in $(nats_sends "$s"); do pub+=("$q$ch$q"); done
    pub+=("$q\$JS.API.INFO$q" "$q\$JS.API.STREAM.INFO.SAGA$q" "$q\$JS.API.STREAM.CREATE.SAGA$q")
    for ch in $(nats_consumes "$s"); do
      c=$(consumer_name "$ch")
      pub+=("$q\$JS.API.CONSUMER.*.SAGA.$c$q" "$q\$JS.API.CONSUMER.*.*.SAGA.$c$q"
        "$q\$JS.API.CONSUMER.CREATE.SAGA.$c.>$q" "$q\$JS.ACK.SAGA.$c.>$q")
    done
    local IFS=,
    echo "  {user: $s, password: $q$pw$q, permissions: {publish: {allow: [${pub[*]}]}, subscribe: {allow: [${q}_INBOX.$s.>$q]}}}"
    unset IFS
  done
  echo "] }"
}

start() {
  local transport=tcp limit=5000 plaintext=0 otlp="" python_payment=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --python-payment) python_payment=1; shift ;;
      --transport) [ $# -ge 2 ] || usage; transport=$2; shift 2 ;;
      --otlp) [ $# -ge 2 ] || usage; otlp=$2; shift 2 ;;
      --payment-limit) [ $# -ge 2 ] || usage; limit=$2; shift 2 ;;
      --insecure-plaintext) plaintext=1; shift ;;
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
    cmake --build "$build" -j2 --target shop shop_demo shop_traces sagactl >/dev/null
    bin="$build/examples/shop/shop"
  fi
  [ -x "$bin" ] || die "no shop binary at $bin"
  local -a payment_cmd=("$bin")
  if [ $python_payment = 1 ]; then
    local py=${SHOP_PYTHON:-python3} lib=${LIBSAGA_LIBRARY:-}
    command -v "$py" >/dev/null || die "--python-payment: $py is missing"
    if [ -z "$lib" ]; then
      lib=$(ldd "$bin" | sed -n 's/^[[:space:]]*libsaga\.so[^ ]* => \([^ ]*\) .*/\1/p' | head -n 1)
      [ -n "$lib" ] || die "--python-payment: cannot tell which libsaga $bin uses; set LIBSAGA_LIBRARY"
    fi
    payment_cmd=(env "LIBSAGA_LIBRARY=$lib")
    # A sanitizer build of libsaga: python3 is not instrumented, so the runtimes go first.
    local asan ubsan
    asan=$(ldd "$lib" | sed -n 's/^[[:space:]]*libasan\.so[^ ]* => \([^ ]*\) .*/\1/p' | head -n 1)
    ubsan=$(ldd "$lib" | sed -n 's/^[[:space:]]*libubsan\.so[^ ]* => \([^ ]*\) .*/\1/p' | head -n 1)
    if [ -n "$asan" ]; then
      payment_cmd+=("LD_PRELOAD=$asan${ubsan:+:$ubsan}" "ASAN_OPTIONS=detect_leaks=0")
    fi
    payment_cmd+=("$py" "$root/examples/shop/payment.py")
  fi

  rm -rf "$run"
  mkdir -p "$run/pids" "$run/logs" "$run/cmd" "$run/data" "$run/nginx/tmp"
  local secret=${SHOP_JWT_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
  # A throwaway CA and a certificate per saga node (and nats-server), made at each start.
  # shellcheck disable=SC2086
  bash "$root/scripts/make_pki.sh" "$run/pki" product order payment orchestrator purchase nats \
    ${SHOP_CLUSTER_EXTRA_CERTS:-} || die "could not make the certificates (scripts/make_pki.sh)"
  (umask 077 && mkdir -p "$run/secrets" && for s in product order payment orchestrator purchase; do
    head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$run/secrets/$s"; done)

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
    nats_conf >"$run/nats.conf"
    printf '%s\n' "$nats_bin" -c "$run/nats.conf" >"$run/cmd/nats"
    launch nats
    # Ready once it says so (a probe connection would fail its TLS handshake, in its log).
    for _ in $(seq 100); do
      if grep -q "Server is ready" "$run/logs/nats.log" 2>/dev/null; then break; fi
      alive "$(pid_of nats)" || { tail -n 20 "$run/logs/nats.log" >&2; die "nats-server did not start"; }
      sleep 0.1
    done
  fi

  # Every node gets the same route table: channel -> its node's TCP listener (and, with TLS,
  # the identity that node must prove).
  local -a routes=()
  for s in product order payment orchestrator purchase; do
    if [ $plaintext = 1 ]; then
      routes+=(--tcp-route "$s=127.0.0.1:$(port_of "tcp_$s")")
    else
      routes+=(--tcp-route "$s=127.0.0.1:$(port_of "tcp_$s")@$s")
    fi
  done
  for s in "${services[@]}"; do
    mkdir -p "$run/data/$s"
    {
      if [ "$s" = payment ]; then printf '%s\n' "${payment_cmd[@]}"; else printf '%s\n' "$bin"; fi
      printf '%s\n' --service "$s" --data "$run/data/$s" --port "$(port_of "$s")" \
        --secret "$secret" --payment-limit "$limit"
      if [ "$s" != account ]; then
        if [ "$transport" = tcp ]; then
          printf '%s\n' --transport tcp --tcp-listen "127.0.0.1:$(port_of "tcp_$s")" "${routes[@]}"
          if [ $plaintext = 1 ]; then
            printf '%s\n' --insecure-plaintext
          else
            printf '%s\n' --tls-ca "$run/pki/ca.pem" --tls-cert "$run/pki/$s.pem" \
              --tls-key "$run/pki/$s.key"
            allow_of "$s"
          fi
        else
          printf '%s\n' --transport nats --nats "tls://127.0.0.1:$(port_of nats)" \
            --nats-user "$s" --nats-password-file "$run/secrets/$s" \
            --nats-tls-ca "$run/pki/ca.pem" --nats-tls-hostname nats
        fi
      fi
      if [ "$s" = purchase ]; then
        printf '%s\n' --product-url "http://127.0.0.1:$(port_of product)"
      fi
      if [ -n "$otlp" ]; then
        printf '%s\n' --otlp "$otlp"
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
  if [ "$transport" = tcp ] && [ $plaintext = 1 ]; then
    echo "shop_cluster: tcp WITHOUT TLS (--insecure-plaintext), run folder $run"
  elif [ "$transport" = tcp ]; then
    echo "shop_cluster: tcp over mutual TLS with access lists (CA and certificates in $run/pki), run folder $run"
  else
    echo "shop_cluster: nats over TLS with a user per service, run folder $run"
  fi
  if [ $python_payment = 1 ]; then echo "shop_cluster: payment is the Python service (examples/shop/payment.py)"; fi
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
