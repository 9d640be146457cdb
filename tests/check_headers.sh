#!/usr/bin/env bash
# test_headers: every public header compiles on its own as C99 (-pedantic -Werror) and as C++11,
# and all of them together (each twice, which also checks the include guards).
# usage: check_headers.sh INCLUDE_DIR C_COMPILER CXX_COMPILER
set -euo pipefail
inc=$1 cc=$2 cxx=$3
if ! command -v "$cxx" >/dev/null; then
  echo "test_headers: no C++ compiler found ('$cxx'); install g++" >&2
  exit 1
fi
shopt -s nullglob
headers=("$inc"/saga.h "$inc"/saga/*.h "$inc"/saga/sys/*.h)
headers=("${headers[@]#"$inc"/}")
warn=(-pedantic -Wall -Wextra -Werror -fsyntax-only -I"$inc")
failures=0

# check WHAT SOURCE: compiles SOURCE as C and as C++; prints the diagnostics of a failure.
check() {
  local out
  if ! out=$(printf '%s' "$2" | "$cc" -x c -std=c99 "${warn[@]}" - 2>&1); then
    printf 'FAIL (C99)   %s\n%s\n' "$1" "$out"
    failures=$((failures + 1))
  fi
  if ! out=$(printf '%s' "$2" | "$cxx" -x c++ -std=c++11 "${warn[@]}" - 2>&1); then
    printf 'FAIL (C++11) %s\n%s\n' "$1" "$out"
    failures=$((failures + 1))
  fi
}

all=""
for h in "${headers[@]}"; do
  check "$h" "#include \"$h\""$'\n'
  all+="#include \"$h\""$'\n'
done
check "all headers together, twice" "$all$all"

echo "test_headers: ${#headers[@]} headers, $failures failure(s)"
[ "$failures" -eq 0 ]
