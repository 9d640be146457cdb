#!/usr/bin/env bash
# test_layers: the rules of the source layout (docs/architecture.md) hold.
#  1. Only src/store/ calls sqlite3_* or includes sqlite3.h. The one exception is
#     src/transport/conformance.c, the adapter conformance kit: its handlers write business rows
#     through saga_tx_db(), exactly as an application's handlers do (that is what it checks);
#     and src/tools/, programs of their own (sagactl) that read a node's database file with
#     SQLite directly, as an operator's sqlite3 shell would, outside any node.
#  2. The parts below the node (env, journal, engine, participant, retention) never include the
#     node's runtime header (runtime.h, the struct saga_node), and the store never includes the
#     core's headers: calls run one way.
# usage: check_layers.sh SOURCE_DIR   (exits 1 and lists every violation)
set -euo pipefail
src=$1/src
fail=0
allowed='^(src/transport/conformance\.c|src/tools/[^:]*):'

cd "$1"
hits=$(grep -rnE 'sqlite3_[a-z_0-9]+|<sqlite3\.h>' src --include='*.c' --include='*.h' |
  grep -v '^src/store/' | grep -Ev "$allowed" || true)
if [ -n "$hits" ]; then
  echo "SQLite used outside src/store/ (move it behind the store interface, src/store/store.h):"
  echo "$hits"
  fail=1
fi

for f in src/core/env.c src/core/journal.c src/core/journal.h src/core/engine.c \
         src/core/engine.h src/core/participant.c src/core/participant.h \
         src/core/retention.c src/core/retention.h src/core/core.h src/core/definition.c \
         src/core/lock.c \
         src/codec/data.c; do
  if grep -nE '#include "runtime\.h"' "$f"; then
    echo "$f includes runtime.h: the parts below the node must not see it"
    fail=1
  fi
done
if grep -rnE '#include "\.\./(\.\./)?core/' src/store; then
  echo "the store includes the core's headers: it must depend only on src/internal.h"
  fail=1
fi
[ -d "$src" ] || { echo "no $src"; exit 1; }
if [ $fail = 0 ]; then echo "layers: ok"; fi
exit $fail
