#!/usr/bin/env bash
# The example shop (docs/shop.md): installs what is missing, builds the shop and its demo
# client, starts the shop (every service in one process) on a free port with a fresh data
# folder and a payment limit of 5000, runs the scripted purchase flow against it (a purchase
# that succeeds, one that fails on inventory, one refused at payment and compensated) and
# stops the shop.
#
# usage: scripts/shop_demo.sh [--stay] [--distributed [--transport tcp|nats]]
#   --stay         keep the shop running after the demo and print curl commands to try; Ctrl-C
#                  stops it
#   --distributed  run the demo against the distributed shop instead: six processes behind
#                  nginx, started with scripts/shop_cluster.sh (TCP over mutual TLS with
#                  access lists by default, or NATS JetStream over TLS with a user per
#                  service) in a temporary run folder, and stopped afterwards
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build/demo"
limit=5000

stay=0
distributed=0
transport=tcp
usage() { echo "usage: $0 [--stay] [--distributed [--transport tcp|nats]]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --stay) stay=1; shift ;;
    --distributed) distributed=1; shift ;;
    --transport)
      if [ $# -lt 2 ] || { [ "$2" != tcp ] && [ "$2" != nats ]; }; then usage; fi
      transport=$2; shift 2 ;;
    *) usage ;;
  esac
done
if [ $distributed = 0 ] && [ "$transport" != tcp ]; then
  echo "$0: --transport applies with --distributed" >&2; exit 2
fi

bash "$root/scripts/deps.sh"

# The shop's own libraries (HTTP server, JSON, JWT, argon2id; libcurl for the demo client).
shop_pkgs=(libmicrohttpd-dev libjansson-dev libjwt-dev libsodium-dev libcurl4-openssl-dev)
if command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${shop_pkgs[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
      missing+=("$p")
    fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    echo "shop: installing ${missing[*]}"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
  fi
else
  echo "shop: not a Debian-based system; make sure these (or equivalents) are installed: ${shop_pkgs[*]}"
fi

echo "shop: building in $build"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAGA_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j2 --target shop shop_demo >/dev/null
bin="$build/examples/shop"
if [ ! -x "$bin/shop" ] || [ ! -x "$bin/shop_demo" ]; then
  echo "shop: the build produced no shop or shop_demo (see the cmake output above)" >&2
  exit 1
fi

tmp=$(mktemp -d)
pid=
cluster=0
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  if [ $cluster = 1 ]; then
    SHOP_CLUSTER_RUN="$tmp/cluster" bash "$root/scripts/shop_cluster.sh" stop >/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo; exit 130' INT
trap 'exit 143' TERM

if [ $distributed = 1 ]; then
  # Six processes behind nginx, in a run folder of their own (databases, logs, nginx prefix).
  cluster=1
  chmod 755 "$tmp"
  SHOP_BIN="$bin/shop" SHOP_CLUSTER_RUN="$tmp/cluster" \
    bash "$root/scripts/shop_cluster.sh" start --transport "$transport" --payment-limit "$limit"
  url=$(cat "$tmp/cluster/url")
  if [ "$transport" = tcp ]; then
    echo "shop: distributed over TCP (mutual TLS, access lists) behind nginx at $url (payment limit $limit)"
  else
    echo "shop: distributed over NATS (TLS, a user per service) behind nginx at $url (payment limit $limit)"
  fi
  echo
else
  # Port 0: the shop takes a free port and prints "listening on PORT".
  "$bin/shop" --data "$tmp/data" --port 0 --payment-limit "$limit" >"$tmp/out" 2>"$tmp/log" &
  pid=$!
  port=
  for _ in $(seq 300); do
    port=$(sed -n 's/^listening on \([0-9][0-9]*\)$/\1/p' "$tmp/out" 2>/dev/null || true)
    [ -n "$port" ] && break
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if [ -z "$port" ]; then
    echo "shop: the server did not start; its log:" >&2
    cat "$tmp/log" >&2
    exit 1
  fi
  url="http://127.0.0.1:$port"
  echo "shop: serving $url (data in $tmp/data, payment limit $limit)"
  echo
fi

email=demo@shop.example
password=demo-password-1
if ! "$bin/shop_demo" --url "$url" --payment-limit "$limit" --email "$email" --password "$password"; then
  echo "shop: the demo failed; the server's log:" >&2
  if [ $distributed = 1 ]; then tail -n 20 "$tmp"/cluster/logs/*.log >&2; else cat "$tmp/log" >&2; fi
  exit 1
fi

if [ $stay = 0 ]; then
  exit 0
fi

cat <<EOF

The shop stays up at $url until Ctrl-C. Try:

  URL=$url
  # log in as the demo customer and keep the access token
  export TOKEN=\$(curl -s -X POST \$URL/api/account/auth/login \\
      -d '{"email":"$email","password":"$password"}' | sed 's/.*"access_token":"\\([^"]*\\)".*/\\1/')
  curl -s -H "Authorization: Bearer \$TOKEN" \$URL/api/account/info/person
  curl -s "\$URL/api/products?offset=0&size=10"
  curl -s -X POST \$URL/api/product \\
      -d '{"name":"Cable","description":"USB-C","brand_name":"Wire","price":15,"inventory":100}'
  # the result stream (leave it running in a second terminal, with TOKEN exported there too)
  curl -sN -H "Accept: text/event-stream" -H "Authorization: Bearer \$TOKEN" \$URL/api/purchase/result
  # buy: 201 {purchase_id}; the statuses appear on the stream
  curl -s -X POST -H "Authorization: Bearer \$TOKEN" \$URL/api/purchase \\
      -d '{"purchase_items":[{"product_id":1,"amount":1}],"payment":{"currency_code":"US"}}'
  curl -s -H "Authorization: Bearer \$TOKEN" \$URL/api/order/PURCHASE_ID
  curl -s -H "Authorization: Bearer \$TOKEN" \$URL/api/payment/PURCHASE_ID

Access tokens expire after a few minutes: log in again, or POST {"refresh_token": ...} to
\$URL/api/account/auth/refresh.
EOF
if [ $distributed = 1 ]; then
  echo "Each service's log is in $tmp/cluster/logs, its metrics at \$URL/metrics/SERVICE."
  echo "Ctrl-C stops the cluster."
  # Wait for Ctrl-C (or for nginx to stop).
  while kill -0 "$(cat "$tmp/cluster/pids/nginx.pid")" 2>/dev/null; do sleep 1; done
  exit 0
fi
echo "The server's log is $tmp/log."
# Wait for Ctrl-C (or for the server to stop on its own).
wait "$pid" || true
pid=
