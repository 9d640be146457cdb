#!/usr/bin/env bash
# The rental example (examples/rental/README.md): builds libsaga and the four services, then runs
# reservation, product, delivery and mypage as separate processes over TCP on free loopback
# ports, drives them over HTTP and prints what each customer sees on MyPage. Add --crash to run
# the end-to-end test instead (each service killed with SIGKILL at each of its commit points,
# ctest test_rental); --keep DIR keeps the databases and logs in DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build/rental"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAGA_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j2 --target rental_e2e rental_service >/dev/null
mode=--demo
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --crash) mode= ;;
    --keep) args+=(--keep "$2"); shift ;;
    *) echo "usage: $0 [--crash] [--keep DIR]" >&2; exit 2 ;;
  esac
  shift
done
if [ ! -x "$build/examples/rental/rental_e2e" ]; then
  echo "the rental example was not built (it needs the TCP transport, libmicrohttpd and jansson:" \
       "scripts/deps.sh)" >&2
  exit 1
fi
exec "$build/examples/rental/rental_e2e" "$build/examples/rental/rental_service" ${mode:+"$mode"} ${args[@]+"${args[@]}"}
