#!/usr/bin/env bash
# test_python_install: `pip install --no-build-isolation --no-index bindings/python` works
# offline into a fresh venv (the Debian python3 and its setuptools), the installed package
# runs a saga against the built library, and a library that cannot be found is a clear
# ImportError naming LIBSAGA_LIBRARY.
# usage: check_install.sh PYTHON3 PACKAGE_DIR LIBSAGA_SO
set -euo pipefail
py=$1 pkg=$2 lib=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A copy, so that setuptools' build/ and egg-info never land in the source tree.
mkdir "$tmp/src"
cp -r "$pkg/pyproject.toml" "$pkg/README.md" "$pkg/libsaga" "$tmp/src/"
"$py" -m venv --system-site-packages "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --no-build-isolation --no-index "$tmp/src"
cd "$tmp"
LIBSAGA_LIBRARY=$lib "$tmp/venv/bin/python" - "$tmp/venv" <<'PY'
import sys
import libsaga
from libsaga import Definition, Memory, MemoryHub, Node, State, Step
assert libsaga.__file__.startswith(sys.argv[1]), libsaga.__file__
with MemoryHub() as hub, Node("n", ":memory:", transport=Memory(hub)) as n:
    n.register(Definition("d", [Step("A", action=lambda tx: {"ok": "yes"})]))
    s = n.start("d")
    assert s.result(10) == State.COMPLETED
    assert n.get(s.id).data == {"ok": b"yes"}
print("installed package:", libsaga.__file__, "libsaga", libsaga.library_version())
PY
if out=$(LIBSAGA_LIBRARY=$tmp/nonexistent/libsaga.so "$tmp/venv/bin/python" -c "import libsaga" 2>&1); then
  echo "check_install: import succeeded without a library" >&2
  exit 1
fi
grep -q "ImportError: libsaga: cannot load libsaga.so.0.2 from LIBSAGA_LIBRARY=" <<<"$out" || {
  echo "check_install: unclear error without a library:" >&2
  echo "$out" >&2
  exit 1
}
echo "check_install: a missing library says: $(tail -n 1 <<<"$out" | cut -c1-160)"
