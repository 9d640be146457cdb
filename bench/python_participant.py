#!/usr/bin/env python3
"""Steps/s of a participant written in Python (bindings/python) against libsaga's C
orchestrator: saga_bench runs the orchestrator and starts this script as its participant
(saga_bench --transport tcp --participant-cmd ...), over plaintext TCP on loopback.

    python3 bench/python_participant.py [--bench PATH] [saga_bench options...]

runs PATH (default: the first build/*/bench/saga_bench of this checkout) with
--transport tcp --participant-cmd "<this python> <this script>" and the options given
(--sagas, --steps, --inflight, --sync, --fail, --json, ...). LIBSAGA_LIBRARY as for the
binding (default: the libsaga next to saga_bench's build). Started by saga_bench (with
SAGA_BENCH_PART_LISTEN in its environment), it is the participant: channel "bench",
commands b.do (refused when data "fail" is the step's index) and b.undo, on its own SQLite
file, as saga_bench's own participant.
"""
import glob
import os
import shlex
import signal
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def participant():
    sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
    from libsaga import Node, Refused, Tcp
    listen = os.environ["SAGA_BENCH_PART_LISTEN"]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    node = Node("part", os.path.join(os.environ["SAGA_BENCH_DIR"], "part.db"), create=True,
                synchronous=os.environ.get("SAGA_BENCH_SYNC", "full"),
                transport=Tcp(listen, {"bench": listen,
                                       "orch": os.environ["SAGA_BENCH_ORCH_ADDR"]},
                              insecure_plaintext=True))

    @node.handler("bench", "b.do")
    def do(tx):
        if tx.int("fail", -1) == tx.step:
            raise Refused("refused")

    @node.handler("bench", "b.undo")
    def undo(tx):
        return None
    node.launch()
    print("ready", flush=True)
    sys.stdout.close()
    stop.wait()
    node.close()


def driver(argv):
    bench = None
    if argv[:1] == ["--bench"]:
        bench, argv = argv[1], argv[2:]
    if bench is None:
        found = sorted(glob.glob(os.path.join(ROOT, "build", "*", "bench", "saga_bench")))
        if not found:
            sys.exit("python_participant.py: no saga_bench under build/; give --bench PATH")
        bench = found[0]
    if "LIBSAGA_LIBRARY" not in os.environ:
        lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(bench))),
                           "libsaga.so")
        if os.path.exists(lib):
            os.environ["LIBSAGA_LIBRARY"] = lib
    cmd = "%s %s" % (shlex.quote(sys.executable), shlex.quote(os.path.abspath(__file__)))
    args = [bench, "--transport", "tcp", "--participant-cmd", cmd] + argv
    print("# %s" % " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    os.execv(bench, args)


if __name__ == "__main__":
    if "SAGA_BENCH_PART_LISTEN" in os.environ:
        participant()
    else:
        driver(sys.argv[1:])
