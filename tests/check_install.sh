#!/usr/bin/env bash
# test_install: installs the build into a temporary prefix, then builds and runs a tiny consumer
# (tests/install/) twice: with find_package(libsaga) and with pkg-config.
# usage: check_install.sh BUILD_DIR C_COMPILER LIBDIR [EXTRA_CFLAGS]
#   LIBDIR is CMAKE_INSTALL_LIBDIR; EXTRA_CFLAGS go to the consumer (e.g. the sanitizer flags
#   of a sanitized libsaga, whose runtime must come first in the consumer).
set -euo pipefail
build=$1 cc=$2 libdir=$3 cflags=${4:-}
src=$(cd "$(dirname "$0")/install" && pwd)
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
unset DESTDIR

echo "--- cmake --install $build --prefix $prefix"
cmake --install "$build" --prefix "$prefix" >/dev/null

if [ -f "$build/CMakeCache.txt" ] && grep -q '^SAGA_BUILD_TOOLS:BOOL=ON' "$build/CMakeCache.txt"; then
  echo "--- sagactl installed, finding the installed libsaga by itself, with its man page"
  # No LD_LIBRARY_PATH: its RPATH ($ORIGIN/../lib) must find the library next to it.
  env -u LD_LIBRARY_PATH "$prefix/bin/sagactl" --version | grep -q '^sagactl (libsaga ' ||
    { echo "installed sagactl does not run" >&2; exit 1; }
  [ -f "$prefix/share/man/man1/sagactl.1" ] || { echo "sagactl.1 not installed" >&2; exit 1; }
fi

echo "--- consumer via find_package(libsaga)"
cmake -S "$src" -B "$tmp/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_C_COMPILER="$cc" \
  -DCMAKE_C_FLAGS="$cflags" >/dev/null
cmake --build "$tmp/cmake" >/dev/null
grep -q "^libsaga_DIR:PATH=$prefix/" "$tmp/cmake/CMakeCache.txt" ||
  { echo "find_package found a libsaga outside $prefix" >&2; exit 1; }
"$tmp/cmake/consumer"

echo "--- consumer via pkg-config"
export PKG_CONFIG_PATH=$prefix/$libdir/pkgconfig
pc=$(pkg-config --cflags --libs libsaga)
echo "pkg-config --cflags --libs libsaga: $pc"
# shellcheck disable=SC2086 # word splitting of the flags is intended
"$cc" $cflags -o "$tmp/consumer-pc" "$src/main.c" $pc
LD_LIBRARY_PATH=$prefix/$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$tmp/consumer-pc"

echo "--- one .pc per adapter"
for pcfile in "$prefix/$libdir"/pkgconfig/libsaga-*.pc; do
  name=$(basename "$pcfile" .pc)
  pkg-config --exists "$name" || { echo "$name: pkg-config cannot use it" >&2; exit 1; }
  echo "pkg-config --libs $name: $(pkg-config --libs "$name")"
done
if [ -f "$prefix/$libdir/pkgconfig/libsaga-tcp.pc" ]; then
  pc=$(pkg-config --cflags --libs libsaga-tcp)
  # shellcheck disable=SC2086 # word splitting of the flags is intended
  "$cc" $cflags -o "$tmp/consumer-tcp" "$src/main_tcp.c" $pc
  LD_LIBRARY_PATH=$prefix/$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$tmp/consumer-tcp"
fi
if [ -f "$prefix/$libdir/pkgconfig/libsaga-tcp.pc" ]; then
  echo "--- the quickstart (docs/quickstart.md): built against the install, run in 3 processes"
  qs_src=$(cd "$(dirname "$0")/../examples/quickstart" && pwd)
  cmake -S "$qs_src" -B "$tmp/qs" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_C_COMPILER="$cc" \
    -DCMAKE_C_FLAGS="$cflags -Wall -Wextra -Werror" >/dev/null
  cmake --build "$tmp/qs" >/dev/null
  run=$tmp/qs-run
  mkdir -p "$run"
  ok=0
  for try in 1 2 3; do # random ports: another try if one was taken
    base=$((20000 + RANDOM % 30000))
    o=127.0.0.1:$base i=127.0.0.1:$((base + 1)) p=127.0.0.1:$((base + 2))
    rm -f "$run"/*.db*
    "$tmp/qs/participant" inventory "$i" "$o" "$run/inventory.db" >"$run/inventory.log" 2>&1 &
    inv=$!
    "$tmp/qs/participant" payment "$p" "$o" "$run/payment.db" >"$run/payment.log" 2>&1 &
    pay=$!
    pids=("$inv" "$pay")
    if timeout 30 "$tmp/qs/orchestrator" "$o" "$i" "$p" "$run/orders.db" 10 >"$run/orders.log" 2>&1 &&
       timeout 30 "$tmp/qs/orchestrator" "$o" "$i" "$p" "$run/orders.db" 10 >"$run/orders2.log" 2>&1
    then ok=1; fi
    kill -TERM "$inv" "$pay"
    wait "$inv" "$pay" || { echo "a participant did not exit cleanly" >&2; ok=0; }
    pids=()
    [ $ok = 1 ] && break
    echo "try $try failed:" >&2
    cat "$run"/*.log >&2
  done
  [ $ok = 1 ] || { echo "the quickstart did not run" >&2; exit 1; }
  tail -1 "$run/orders.log"
  grep -q "10 of 10 sagas completed" "$run/orders.log"
  # The second run found the same 10 sagas by their keys and ran nothing again.
  [ "$(grep -c "found again by its key" "$run/orders2.log")" = 10 ]
  [ "$(grep -c "inventory.do" "$run/inventory.log")" = 10 ]
  [ "$(grep -c "payment.do" "$run/payment.log")" = 10 ]
  echo "quickstart: 10 sagas completed over TCP in 3 processes; rerun found them, ran nothing twice"
fi
echo "test_install: ok"
