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
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
unset DESTDIR

echo "--- cmake --install $build --prefix $prefix"
cmake --install "$build" --prefix "$prefix" >/dev/null

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
echo "test_install: ok"
