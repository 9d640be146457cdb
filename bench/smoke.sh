#!/bin/sh
# Smoke check of one saga_bench run, for ctest: correctness only, never timing.
#   smoke.sh BENCH MODE ARGS...   (MODE: run or recovery)
# The run must succeed, its last line must be the summary of that mode, and the counts must
# add up: completed + compensated + failed = sagas, failed = 0; a recovery run must have
# found every saga's command in the outbox; a preloading run must report what it preloaded.
set -eu
bench=$1 mode=$2
shift 2
out=$("$bench" "$@" --json /dev/null) || { echo "saga_bench failed: $out"; exit 1; }
echo "$out"
last=$(printf '%s\n' "$out" | tail -n 1)
get() { printf '%s\n' "$last" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
fail() { echo "smoke check failed: $*"; exit 1; }
[ "$(get mode)" = "$mode" ] || fail "mode is '$(get mode)', want $mode"
sagas=$(get sagas) completed=$(get completed) compensated=$(get compensated) failed=$(get failed)
[ -n "$sagas" ] && [ -n "$completed" ] || fail "summary line lacks counts"
[ $((completed + compensated + failed)) -eq "$sagas" ] || fail "counts do not add up"
[ "$failed" -eq 0 ] || fail "$failed sagas FAILED"
for k in steps_per_s ceiling_steps_per_s ratio p99_ms; do
  [ "$mode" = run ] && { [ -n "$(get $k)" ] || fail "no $k"; }
done
if [ "$mode" = recovery ]; then
  [ "$(get recovery_outbox)" -eq "$sagas" ] || fail "outbox held $(get recovery_outbox) rows"
  for k in recovery_open_ms recovery_resume_ms recovery_finish_ms bytes_per_inflight; do
    [ -n "$(get $k)" ] || fail "no $k"
  done
fi
case " $* " in
*" --preload "*)
  want=$(printf '%s\n' "$*" | sed -n 's/.*--preload \([0-9]*\).*/\1/p')
  [ "$(get preloaded)" = "$want" ] || fail "preloaded=$(get preloaded), want $want" ;;
esac
echo "smoke check passed"
