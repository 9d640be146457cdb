#!/usr/bin/env bash
# A repair, end to end, in the distributed shop (docs/operating.md, "A repair, end to end"):
# the order service goes down, a purchase gets stuck at its order step, an operator finds it
# and explains it with sagactl, cancels it, the order service comes back, the purchase ends
# COMPENSATED (its product reservation released), and its trace is drawn across the services
# by shop_traces, the shop's OTLP collector. Prints each command and what it printed.
#
# usage: scripts/shop_repair_demo.sh
#
# Runs its own cluster in build/repair-demo (SHOP_CLUSTER_RUN overrides it) and stops it at
# the end; exits non-zero when any step does not end as described. Builds what it needs in
# build/cluster, unless SHOP_BIN, SAGACTL_BIN and SHOP_TRACES_BIN name built programs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export SHOP_CLUSTER_RUN=${SHOP_CLUSTER_RUN:-$root/build/repair-demo}
run=$SHOP_CLUSTER_RUN
build=$root/build/cluster
cluster="bash $root/scripts/shop_cluster.sh"

die() { echo "shop_repair_demo: $*" >&2; exit 1; }
say() { printf '\n## %s\n' "$*"; }
# Shows a command as an operator would type it (with $DB for the orchestrator's database),
# then runs it.
show() {
  local shown="$*"
  shown=${shown//$sagactl/sagactl}
  echo "\$ ${shown//$db/\$DB}"
  "$@"
}

if [ -n "${SHOP_BIN:-}" ] && [ -n "${SAGACTL_BIN:-}" ] && [ -n "${SHOP_TRACES_BIN:-}" ]; then
  sagactl=$SAGACTL_BIN traces_bin=$SHOP_TRACES_BIN # built already (the ctest test_repair_demo)
  if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    echo "shop_repair_demo: nginx is not installed (scripts/deps.sh installs it): skipped"
    exit 77
  fi
else
  bash "$root/scripts/deps.sh" >/dev/null
  echo "shop_repair_demo: building in $build"
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAGA_BUILD_TESTS=OFF >/dev/null
  cmake --build "$build" -j2 --target shop shop_demo shop_traces sagactl >/dev/null
  export SHOP_BIN=$build/examples/shop/shop
  sagactl=$build/sagactl traces_bin=$build/examples/shop/shop_traces
fi
[ -x "$sagactl" ] || die "no sagactl at $sagactl"
[ -x "$traces_bin" ] || die "no shop_traces at $traces_bin"

mkdir -p "$run"
traces_pid=""
cleanup() {
  $cluster stop >/dev/null 2>&1 || true
  if [ -n "$traces_pid" ]; then kill "$traces_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

# The collector, on a free port: its first line names its URL.
"$traces_bin" --port 0 >"$run/traces.log" 2>&1 &
traces_pid=$!
otlp=""
for _ in $(seq 100); do
  otlp=$(grep -o 'http://[0-9.]*:[0-9]*' "$run/traces.log" 2>/dev/null | head -1 || true)
  [ -n "$otlp" ] && break
  kill -0 "$traces_pid" 2>/dev/null || die "shop_traces did not start: $(cat "$run/traces.log")"
  sleep 0.1
done
[ -n "$otlp" ] || die "shop_traces did not start within 10 s"

say "the distributed shop (TCP, mutual TLS), every service exporting its spans to $otlp"
$cluster start --otlp "$otlp"
url=$(cat "$run/url")
db=$run/data/orchestrator/orchestrator.db

email="ops-$$@example.com"
curl -sf -X POST "$url/api/account/auth/signup" -d '{"password":"correct-horse","firstname":"Ada",
  "lastname":"Lovelace","email":"'"$email"'","address":"12 Analytical Row","phone_number":"+441234"}' \
  >/dev/null || die "signup failed"
token=$(curl -sf -X POST "$url/api/account/auth/login" \
  -d '{"email":"'"$email"'","password":"correct-horse"}' |
  sed 's/.*"access_token":"\([^"]*\)".*/\1/')
[ -n "$token" ] || die "login failed"
product=$(curl -sf -X POST "$url/api/product" \
  -d '{"name":"Keyboard","description":"87 keys","brand_name":"Keyco","price":1200,"inventory":10}' |
  grep -o '[0-9]\+' | head -1)
[ -n "$product" ] || die "product creation failed"

say "the order service goes down (SIGKILL), and a customer buys"
kill -KILL "$(cat "$run/pids/order.pid")"
body='{"purchase_items":[{"product_id":'"$product"',"amount":2}],"payment":{"currency_code":"US"}}'
echo "\$ curl -s -X POST -H \"Authorization: Bearer \$TOKEN\" \$URL/api/purchase -d '$body'"
curl -s -X POST -H "Authorization: Bearer $token" "$url/api/purchase" -d "$body" \
  -o "$run/purchase.json" -w '%{http_code} ' || die "the purchase request failed"
cat "$run/purchase.json"; echo

# The purchase saga reaches the order step and retries it (its command unanswered): wait for
# its second attempt, so that there is something to explain.
saga=""
for _ in $(seq 300); do
  saga=$("$sagactl" list "$db" --state running --definition purchase --json |
    python3 -c 'import json,sys
for s in json.load(sys.stdin):
    if s["step_name"] == "CREATE_ORDER" and s["attempt"] >= 2: print(s["id"]); break')
  [ -n "$saga" ] && break
  sleep 0.1
done
[ -n "$saga" ] || die "the purchase did not get stuck at CREATE_ORDER within 30 s"

say "which sagas are stuck, and why"
show "$sagactl" list "$db" --state running
show "$sagactl" show "$db" "$saga"

say "cancel it (before its pivot, so it compensates); the node carries the request out"
show "$sagactl" cancel "$db" "$saga" --wait 10 --by ops

say "the order service comes back; the compensation reaches it"
$cluster restart order
state=""
for _ in $(seq 600); do
  state=$("$sagactl" show "$db" "$saga" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [ "$state" = COMPENSATED ] && break
  sleep 0.1
done
[ "$state" = COMPENSATED ] || die "the purchase is $state, not COMPENSATED, 60 s after the restart"
show "$sagactl" show "$db" "$saga"

say "its trace, across the services (the trace id is on show's 'trace' line)"
trace=$("$sagactl" show "$db" "$saga" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["trace_id"])')
# The services export every 200 ms: wait for the last compensation's handler span.
for _ in $(seq 100); do
  curl -sf "$otlp/traces/$trace" 2>/dev/null | grep -q 'product.release' && break
  sleep 0.1
done
show curl -s "$otlp/traces/$trace"
curl -sf "$otlp/traces/$trace" | grep -q 'product.release' ||
  die "the trace lacks the compensation's handler span"
echo
echo "shop_repair_demo: done (cluster run folder $run)"
