"""Sagas between two Python nodes over NATS JetStream and over Redis Streams, against servers
this test starts (skipped when nats-server or redis-server is not installed)."""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

import util  # noqa: F401
from libsaga import Definition, Nats, Node, Redis, Refused, State, Step
from libsaga import _ffi as f


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what):
    """Until the server accepts connections (it is a readiness probe, with a deadline)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("%s exited with %s" % (what, proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("%s did not listen on %d" % (what, port))


def exchange(test, make_transport, d):
    """A participant and an orchestrator node on the transport: one saga completes with the
    participant's reply, one is refused at step 2 and compensated in reverse."""
    with Node("part", os.path.join(d, "part.db"), transport=make_transport(), create=True) as p, \
         Node("orch", os.path.join(d, "orch.db"), transport=make_transport(), create=True) as o:
        undone = []

        @p.handler("acct", "acct.debit")
        def debit(tx):
            if tx.int("fail") == tx.step:
                raise Refused("no funds")
            return {"step%d" % tx.step: "ok"}

        @p.handler("acct", "acct.credit")
        def credit(tx):
            undone.append(tx.step)
        p.launch()
        o.register(Definition("xfer", [
            Step("A", channel="acct", action="acct.debit", compensation="acct.credit"),
            Step("B", channel="acct", action="acct.debit", compensation="acct.credit"),
            Step("C", channel="acct", action="acct.debit", timeout=20)]))
        ok = o.start("xfer", {"fail": -1})
        bad = o.start("xfer", {"fail": 2})
        test.assertEqual(ok.result(60), State.COMPLETED)
        test.assertEqual(bad.result(60), State.COMPENSATED)
        test.assertEqual({k: v for k, v in o.get(ok.id).data.items() if k.startswith("step")},
                         {"step0": b"ok", "step1": b"ok", "step2": b"ok"})
        test.assertEqual(undone, [1, 0])
        test.assertTrue(o.connected() and p.connected())


class Brokers(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            p.terminate()
            p.wait(10)
        self.tmp.cleanup()

    @unittest.skipIf(f.nats is None or not shutil.which("nats-server", path="/usr/sbin:/usr/bin"),
                     "nats-server or libsaga_nats missing")
    def test_nats(self):
        port = free_port()
        srv = subprocess.Popen([shutil.which("nats-server", path="/usr/sbin:/usr/bin"), "-js",
                                "-a", "127.0.0.1", "-p", str(port), "-sd",
                                os.path.join(self.tmp.name, "js")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(srv)
        wait_port(port, srv, "nats-server")
        exchange(self, lambda: Nats("nats://127.0.0.1:%d" % port, stream="PYTEST",
                                    prefix="pytest", ack_wait=5), self.tmp.name)

    @unittest.skipIf(f.redis is None or not shutil.which("redis-server"),
                     "redis-server or libsaga_redis missing")
    def test_redis(self):
        port = free_port()
        srv = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind",
                                "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                                self.tmp.name, "--requirepass", "s3cret"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(srv)
        wait_port(port, srv, "redis-server")
        exchange(self, lambda: Redis("127.0.0.1", port, password="s3cret", prefix="pytest",
                                     claim_idle=5), self.tmp.name)


if __name__ == "__main__":
    unittest.main()
