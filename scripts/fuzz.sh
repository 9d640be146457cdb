#!/usr/bin/env bash
# Runs one libFuzzer target for a while (docs/testing.md, "Fuzzing").
#
# usage: scripts/fuzz.sh TARGET MINUTES
#   TARGET   envelope | data | tcp_frame | shop (tests/fuzz/fuzz_TARGET.c)
#   MINUTES  how long to fuzz (whole minutes, > 0)
#
# Configures and builds a clang build with libFuzzer, ASan and UBSan (build/fuzz, or
# FUZZ_BUILD_DIR), fuzzes a copy of the corpus tests/fuzz/TARGET for MINUTES, then merges the
# inputs that reach new code back into tests/fuzz/TARGET (libFuzzer -merge=1 with
# -use_counters=0: only inputs covering an edge the corpus does not, which keeps it small;
# FUZZ_MERGE=0 skips it). Prints executions, coverage and findings. Exits 1 when the
# target crashed, leaked, ran out of memory or timed out, leaving the input that did it in
# BUILD/artifacts/TARGET/ (make it a regression file once fixed: see docs/testing.md).
# Extra libFuzzer flags can be given in FUZZ_FLAGS. Run it under `nice` on a shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 2 ] || ! [[ $2 =~ ^[0-9]+$ ]] || [ "$2" -eq 0 ]; then
  echo "usage: $0 TARGET MINUTES" >&2
  exit 2
fi
target=$1 minutes=$2
if [ ! -f "tests/fuzz/fuzz_$target.c" ]; then
  echo "$0: no fuzz target '$target' (tests/fuzz/fuzz_$target.c)" >&2
  exit 2
fi
cc=${FUZZ_CC:-$(command -v clang || command -v clang-14 || true)}
if [ -z "$cc" ]; then
  echo "$0: clang is needed for libFuzzer (apt-get install clang libclang-rt-dev)" >&2
  exit 2
fi
build=${FUZZ_BUILD_DIR:-build/fuzz}
corpus=tests/fuzz/$target
mkdir -p "$corpus"

echo "==> configure and build $build (fuzz_$target)"
cmake -S . -B "$build" -DCMAKE_C_COMPILER="$cc" -DSAGA_FUZZ=ON -DSAGA_SANITIZE=ON \
  -DSAGA_WERROR=OFF -DSAGA_BUILD_BENCH=OFF >"$build.configure.log" 2>&1 ||
  { cat "$build.configure.log" >&2; exit 2; }
cmake --build "$build" -j"${JOBS:-2}" --target "fuzz_$target" >"$build.build.log" 2>&1 ||
  { tail -50 "$build.build.log" >&2; exit 2; }
bin=$build/tests/fuzz/fuzz_$target

work=$(mktemp -d "${TMPDIR:-/tmp}/saga-fuzz-$target.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/corpus" "$build/artifacts/$target"
cp "$corpus"/. "$work/corpus/" -r
log=$build/artifacts/$target/fuzz.log
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

# The shop target's HTTP server (libmicrohttpd) logs every odd request to stderr: closed for
# it (libFuzzer still writes its status lines and sanitizer reports).
flags=()
[ "$target" = shop ] && flags+=(-close_fd_mask=2)

echo "==> fuzzing $target for $minutes min (corpus $(ls "$corpus" | wc -l) files, log $log)"
rc=0
# shellcheck disable=SC2086
"$bin" -max_total_time=$((minutes * 60)) -print_final_stats=1 -malloc_limit_mb=64 \
  -rss_limit_mb=2048 -timeout=10 -use_value_profile=1 -print_pcs=0 \
  -artifact_prefix="$build/artifacts/$target/" "${flags[@]}" ${FUZZ_FLAGS:-} "$work/corpus" >"$log" 2>&1 ||
  rc=$?

# The last status line: "#N  DONE  cov: C ft: F corp: ..." (or the last pulse before a crash).
last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
echo "==> $target: ${execs:-?} executions; last status: ${last:-none}"
if [ $rc -ne 0 ]; then
  echo "==> FINDING (exit $rc): the sanitizer report and the input:"
  grep -E '^(==[0-9]+==|SUMMARY|.*fuzz check failed|.*runtime error|artifact_prefix|Test unit written|    #[0-9]+ )' \
    "$log" | head -60
  ls -l "$build/artifacts/$target/" | grep -E 'crash-|leak-|oom-|timeout-|slow-unit-' || true
  exit 1
fi

if [ "${FUZZ_MERGE:-1}" = 1 ]; then
  before=$(ls "$corpus" | wc -l)
  "$bin" -merge=1 -use_counters=0 -malloc_limit_mb=64 -rss_limit_mb=2048 -timeout=10 "$corpus" "$work/corpus" \
    >"$build/artifacts/$target/merge.log" 2>&1 ||
    { echo "==> merge failed: $build/artifacts/$target/merge.log" >&2; exit 1; }
  echo "==> merged: $corpus has $(ls "$corpus" | wc -l) files (was $before)"
fi
echo "==> findings: none"
