#!/usr/bin/env bash
# The one test command, used as is by CI (.ci/run): installs missing dependencies, then
# configures, builds (warnings are errors) and runs ctest in build/ci, then does the same with
# ASan+UBSan in build/ci-asan.
#
# usage: scripts/test.sh [--quick | --sanitize]
#   --quick     skip the sanitizer build
#   --sanitize  only the sanitizer build
# JOBS (default 2) sets the build and ctest parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."

plain=1 asan=1
case "${1:-}" in
  "") ;;
  --quick) asan=0 ;;
  --sanitize) plain=0 ;;
  *) echo "usage: $0 [--quick | --sanitize]" >&2; exit 2 ;;
esac
jobs=${JOBS:-2}
timings=() failed=()

# phase NAME COMMAND...: runs and times one step; a failing step stops the script.
phase() {
  local name=$1 start=$SECONDS
  shift
  echo "==> $name"
  "$@" || { echo "==> FAILED: $name" >&2; exit 1; }
  timings+=("$(printf '%5ss  %s' $((SECONDS - start)) "$name")")
}

# run_tests DIR: ctest failures are recorded, not fatal, so that both builds get tested.
run_tests() {
  local start=$SECONDS
  echo "==> test $1"
  (cd "$1" && ctest --output-on-failure --no-tests=error -j"$jobs") || failed+=("$1")
  timings+=("$(printf '%5ss  %s' $((SECONDS - start)) "test $1")")
}

phase deps bash scripts/deps.sh

if [ $plain = 1 ]; then
  phase "configure build/ci" cmake -S . -B build/ci -DSAGA_WERROR=ON -DSAGA_SANITIZE=OFF
  phase "build build/ci" cmake --build build/ci -j"$jobs"
  run_tests build/ci
fi
if [ $asan = 1 ]; then
  phase "configure build/ci-asan" cmake -S . -B build/ci-asan -DSAGA_WERROR=ON -DSAGA_SANITIZE=ON
  phase "build build/ci-asan" cmake --build build/ci-asan -j"$jobs"
  export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  run_tests build/ci-asan
fi

echo "==> timings"
printf '%s\n' "${timings[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "==> FAILED: tests in ${failed[*]}" >&2
  exit 1
fi
echo "==> all passed"
