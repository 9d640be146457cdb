#!/usr/bin/env bash
# The outbox example (examples/outbox/README.md): builds libsaga and the four services, then runs
# course, marketing, order and delivery as separate processes over TCP on free loopback ports
# and prints what they did. Add --crash to kill each service with SIGKILL at each of its commit
# points during the run (the end-to-end test, ctest test_outbox); --keep DIR keeps the
# databases and logs in DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build/outbox"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAGA_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j2 --target outbox_e2e outbox_service >/dev/null
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
exec "$build/examples/outbox/outbox_e2e" "$build/examples/outbox/outbox_service" ${mode:+"$mode"} ${args[@]+"${args[@]}"}
