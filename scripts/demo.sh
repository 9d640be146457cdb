#!/usr/bin/env bash
# The main job: installs what is missing, builds libsaga and runs the example saga
# (a 3-step saga whose last step fails and whose first two are compensated).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/deps.sh"
cmake -S "$root" -B "$root/build/demo" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAGA_BUILD_TESTS=OFF >/dev/null
cmake --build "$root/build/demo" -j2 --target minimal >/dev/null
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
"$root/build/demo/examples/minimal" "$data/trip.db"
