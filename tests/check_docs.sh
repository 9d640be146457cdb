#!/usr/bin/env bash
# test_docs_reference: the API reference builds from the public headers without a single
# doxygen warning. The top-level Doxyfile's settings apply (every struct, field, enum, typedef,
# macro and function needs a doc comment; doc commands must be well formed; a function that
# uses @param must document every parameter), over include/ only, with warnings as errors.
# usage: check_docs.sh SOURCE_DIR BINARY_DIR DOXYGEN
set -euo pipefail
src=$1 out=$2/docs-check doxygen=$3
rm -rf "$out"
mkdir -p "$out"
log=$out/warnings.log
{
  cat "$src/Doxyfile"
  printf '%s\n' "OUTPUT_DIRECTORY = \"$out\"" "INPUT = include" "USE_MDFILE_AS_MAINPAGE =" \
    "QUIET = YES" "WARN_AS_ERROR = FAIL_ON_WARNINGS" "WARN_LOGFILE = \"$log\""
} >"$out/Doxyfile"
cd "$src"
rc=0
"$doxygen" "$out/Doxyfile" || rc=$?
if [ "$rc" -ne 0 ] || [ -s "$log" ]; then
  echo "test_docs_reference: doxygen exited with $rc; its warnings:" >&2
  cat "$log" >&2
  exit 1
fi
if [ ! -s "$out/html/saga__node_8h.html" ] && [ ! -s "$out/html/node_8h.html" ]; then
  echo "test_docs_reference: no reference page for saga/node.h in $out/html" >&2
  exit 1
fi
echo "test_docs_reference: $(ls "$out/html" | wc -l) files in $out/html, no warning"
