"""Every public call of the binding, its errors, and the C layouts it declares."""
import ctypes
import logging
import os
import socket
import tempfile
import threading
import unittest

import util  # noqa: F401
import libsaga
from libsaga import (ClosedError, Conflict, Definition, InvalidArgument, Kind, Memory,
                     MemoryHub, Nats, Node, NotFound, Redis, Refused, Retry, SagaError,
                     SQLiteError, State, StateError, Step, Tcp, TransportError, NO_TIMEOUT)
from libsaga import _ffi as f


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Layouts(unittest.TestCase):
    """The ctypes structs match the C ones: the library's defaults land on the right fields."""

    def test_node_config_defaults(self):
        c = f.NodeConfig()
        self.assertEqual(f.saga_node_config_init_sized(ctypes.byref(c), ctypes.sizeof(c)), 0)
        self.assertEqual(c.struct_version, 5)
        self.assertEqual((c.resend_ms, c.batch_max, c.busy_timeout_ms, c.max_deliveries),
                         (1000, 1024, 5000, 10))
        self.assertEqual(c.limits.max_message_bytes, 1 << 20)
        self.assertEqual((c.limits.max_data_entries, c.limits.max_string_bytes,
                          c.limits.max_headers), (256, 1024, 32))
        self.assertEqual(c.retention.finished_ms, 7 * 24 * 3600 * 1000)
        self.assertEqual((c.retention.batch, c.retention.interval_ms), (1000, 60000))
        self.assertEqual((c.checkpoint, c.checkpoint_pages, c.db_mode, c.db_check),
                         (0, 1000, 0, 0))
        self.assertEqual(c.synchronous, 2)

    def test_tcp_config_defaults(self):
        c = f.TcpConfig()
        self.assertEqual(f.saga_tcp_config_init_sized(ctypes.byref(c), ctypes.sizeof(c)), 0)
        self.assertEqual(c.struct_version, 2)
        self.assertEqual((c.max_frame_bytes, c.max_queued_bytes), ((1 << 20) + 4096, 64 << 20))
        self.assertEqual((c.reconnect_min_ms, c.reconnect_max_ms), (50, 5000))
        self.assertEqual((c.max_connections, c.max_connections_per_ip,
                          c.handshake_timeout_ms, c.idle_timeout_ms,
                          c.max_reply_queue_bytes), (256, 32, 5000, 300000, 1 << 20))

    def test_redis_config_defaults(self):
        c = f.RedisConfig()
        self.assertEqual(f.saga_redis_config_init_sized(ctypes.byref(c), ctypes.sizeof(c)), 0)
        self.assertEqual(c.struct_version, 3)
        self.assertEqual((c.host, c.port, c.prefix), (b"127.0.0.1", 6379, b"saga"))
        self.assertEqual((c.claim_idle_ms, c.max_deliveries, c.reconnect_min_ms,
                          c.reconnect_max_ms, c.fail_fast), (30000, 10, 50, 5000, 0))

    def test_nats_config_defaults(self):
        c = f.NatsConfig()
        f.saga_nats_config_init(ctypes.byref(c))
        self.assertEqual(c.struct_version, 3)
        self.assertEqual((c.url, c.stream, c.prefix), (b"nats://127.0.0.1:4222", b"SAGA", b"saga"))
        self.assertEqual((c.ack_wait_ms, c.max_deliveries, c.reconnect_wait_ms), (30000, 10, 250))


class Api(unittest.TestCase):
    def setUp(self):
        self.hub = MemoryHub()
        self.orch = Node("orch", ":memory:", transport=Memory(self.hub))
        self.part = Node("part", ":memory:", transport=Memory(self.hub))
        self.part.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB, n INTEGER, x REAL)")

    def tearDown(self):
        self.hub.close()
        self.assertTrue(self.orch.closed and self.part.closed)

    def test_version(self):
        self.assertEqual(libsaga.library_version(), "0.2.0")

    def test_handler_sql_and_data(self):
        seen = {}

        @self.part.handler("p", "put")
        def put(tx):
            seen.update(saga=tx.saga_id, cmd=tx.command, step=tx.step, attempt=tx.attempt,
                        comp=tx.is_compensation, mid=tx.message_id, tp=tx.traceparent,
                        hdr=tx.header("nope"), text=tx.text("s"), n=tx.int("n"),
                        missing=tx.int("missing", -1), data=dict(tx.data))
            for bad in ("s", "plus", "space", "big"):
                with self.assertRaises(ValueError):
                    tx.int(bad)
            self.assertEqual(tx.execute("INSERT INTO kv VALUES (:k, :v, :n, :x)",
                                        {"k": tx.saga_id, "v": tx.data["b"], "n": tx.int("n"),
                                         "x": 1.5}), 1)
            self.assertGreater(tx.lastrowid, 0)
            tx.execute("UPDATE kv SET n = n + 1 WHERE k = ?", [tx.saga_id])
            row = tx.query_one("SELECT v, n, x, NULL FROM kv WHERE k = ?", (tx.saga_id,))
            self.assertIsNone(tx.query_one("SELECT 1 WHERE 0"))
            return {"stored": row[0], "n": row[1], "text": "é", "neg": -5}
        self.orch.register(Definition("d", [Step("PUT", channel="p", action="put")]))
        self.part.launch()
        self.assertEqual(self.part.launch(), 0)  # twice: nothing more
        s = self.orch.start("d", {"s": "héllo", "n": 41, "b": b"\x00\x01\xff", "plus": "+5",
                                  "space": " 5", "big": str(1 << 63)})
        self.assertEqual(s.result(10), State.COMPLETED)
        self.assertEqual(seen["cmd"], "put")
        self.assertEqual(seen["saga"], s.id)
        self.assertEqual((seen["step"], seen["attempt"], seen["comp"]), (0, 1, False))
        self.assertIsNone(seen["hdr"])
        self.assertTrue(seen["tp"].startswith("00-"))
        self.assertEqual((seen["text"], seen["n"], seen["missing"]), ("héllo", 41, -1))
        self.assertEqual(seen["data"], {"s": "héllo".encode(), "n": b"41", "b": b"\x00\x01\xff",
                                        "plus": b"+5", "space": b" 5",
                                        "big": str(1 << 63).encode()})
        info = self.orch.get(s.id)
        self.assertEqual(info.state, State.COMPLETED)
        self.assertEqual(info.definition, "d")
        self.assertEqual(info.data["stored"], b"\x00\x01\xff")
        self.assertEqual((info.data["n"], info.data["text"], info.data["neg"]),
                         (b"42", "é".encode(), b"-5"))
        self.assertEqual(self.part.query("SELECT k, v, n, x FROM kv"),
                         [(s.id, b"\x00\x01\xff", 42, 1.5)])
        self.assertEqual(s.info().state, State.COMPLETED)
        self.assertEqual(s.state, State.COMPLETED)
        self.assertEqual(self.orch.saga(s.id).id, s.id)

    def test_idempotency_key_and_local_steps(self):
        calls = []
        d = Definition("loc", [Step("A", action=lambda tx: calls.append(tx.saga_id) or {"a": 1},
                                    compensation=lambda tx: None)], version=2, deadline=60)
        self.orch.register(d)
        s1 = self.orch.start(d, key="k1")
        s2 = self.orch.start(d, key="k1")
        self.assertEqual(s1.id, s2.id)
        self.assertFalse(s1.existed)
        self.assertTrue(s2.existed)
        self.assertEqual(s1.result(10), State.COMPLETED)
        self.assertEqual(calls, [s1.id])
        self.assertEqual(self.orch.get(s1.id).version, 2)

    def test_events_iterator_and_callbacks(self):
        got, done = [], threading.Event()

        @self.orch.on_event
        def cb(ev):
            got.append(ev)
            if ev.type == "COMPLETED":
                # An event callback runs on a thread of its own: it may call the node.
                got.append(self.orch.get(ev.saga_id).state)
                done.set()
        stream = self.orch.events()
        self.orch.register(Definition("e", [Step("A", action=lambda tx: None)]))
        s = self.orch.start("e")
        types = []
        for ev in stream:
            types.append(ev.type)
            self.assertEqual(ev.saga_id, s.id)
            if ev.type == "COMPLETED":
                break
        self.assertEqual(types, ["STARTED", "STEP_SENT", "STEP_SUCCEEDED", "COMPLETED"])
        self.assertTrue(done.wait(10))
        self.assertEqual(got[-1], State.COMPLETED)
        self.assertEqual(got[-2].state, State.COMPLETED)
        stream.close()
        with self.assertRaises(StopIteration):
            next(stream)
        with self.assertRaises(TimeoutError):
            self.orch.events().get(timeout=0.01)

    def test_cancel_and_retry(self):
        # Step B waits forever (nobody serves channel "void"): cancel compensates A.
        undone = []
        d = Definition("c", [
            Step("A", action=lambda tx: None, compensation=lambda tx: undone.append(1)),
            Step("B", channel="void", action="x", timeout=NO_TIMEOUT)])
        self.orch.register(d)
        s = self.orch.start(d)
        self.orch.cancel(s.id)
        self.assertEqual(s.result(10), State.COMPENSATED)
        self.assertEqual(undone, [1])
        with self.assertRaises(StateError):
            s.cancel()
        with self.assertRaises(StateError):
            s.retry()  # not FAILED
        with self.assertRaises(NotFound):
            self.orch.cancel("0" * 32)

    def test_failed_saga_retry(self):
        # The compensation of A fails twice (one attempt allowed): FAILED; then it works and
        # an operator's retry compensates it.
        state = {"fail": True}

        def undo(tx):
            if state["fail"]:
                raise Refused("not yet")
        d = Definition("f", [
            Step("A", action=lambda tx: None, compensation=undo,
                 compensation_retry=Retry(attempts=1)),
            Step("B", action=lambda tx: (_ for _ in ()).throw(Refused("no")))])
        self.orch.register(d)
        s = self.orch.start(d)
        self.assertEqual(s.result(10), State.FAILED)
        state["fail"] = False
        s.retry()
        self.assertEqual(s.result(10), State.COMPENSATED)

    def test_inspection(self):
        self.orch.register(Definition("i", [Step("A", action=lambda tx: None)]))
        self.assertEqual(self.orch.start("i").result(10), State.COMPLETED)
        st = self.orch.stats()
        self.assertGreaterEqual(st["transactions"], 1)
        self.assertEqual(len(st["step_latency"]), f.LATENCY_BUCKETS)
        self.assertEqual(self.orch.count_by_state()[State.COMPLETED], 1)
        self.assertEqual(self.orch.outbox_depth(), 0)
        self.assertIn('libsaga_sagas{node="orch",state="COMPLETED"} 1', self.orch.metrics())
        self.assertTrue(self.orch.connected())
        hs = self.hub.stats()
        self.assertIn("sent", hs)
        self.hub.set_faults({"seed": 1, "drop": 0.5})
        self.hub.set_faults(None)
        with self.assertRaises(TypeError):
            self.orch.tcp_stats()

    def test_handler_exception_is_a_failure_not_a_crash(self):
        @self.part.handler("p", "boom")
        def boom(tx):
            tx.execute("INSERT INTO kv (k) VALUES ('written')")
            return 1 / 0
        undone = []
        self.orch.register(Definition("x", [
            Step("A", action=lambda tx: None, compensation=lambda tx: undone.append(1)),
            Step("B", channel="p", action="boom")]))
        self.part.launch()
        with self.assertLogs("libsaga", logging.ERROR) as logs:
            s = self.orch.start("x")
            self.assertEqual(s.result(10), State.COMPENSATED)
        self.assertIn("ZeroDivisionError", "\n".join(logs.output))
        self.assertIn("Traceback", "\n".join(logs.output))
        self.assertIn("ZeroDivisionError", self.orch.get(s.id).error)
        self.assertEqual(undone, [1])
        self.assertEqual(self.part.query("SELECT count(*) FROM kv"), [(0,)])  # rolled back
        self.assertEqual(self.part.stats()["dead_letters"], 1)

    def test_bad_reply_and_sql_errors(self):
        @self.part.handler("p", "badreply")
        def badreply(tx):
            return {"f": 1.5}

        @self.part.handler("p", "badsql")
        def badsql(tx):
            tx.execute("INSERT INTO nosuch VALUES (1)")
        self.orch.register(Definition("r", [Step("A", channel="p", action="badreply")]))
        self.orch.register(Definition("q", [Step("A", channel="p", action="badsql")]))
        self.part.launch()
        with self.assertLogs("libsaga", logging.ERROR):
            s = self.orch.start("r")
            self.assertEqual(s.result(10), State.COMPENSATED)
        self.assertIn("TypeError", self.orch.get(s.id).error)
        with self.assertLogs("libsaga", logging.ERROR):
            s = self.orch.start("q")
            self.assertEqual(s.result(10), State.COMPENSATED)
        self.assertIn("no such table: nosuch", self.orch.get(s.id).error)

    def test_node_sql_errors(self):
        with self.assertRaises(SQLiteError) as e:
            self.part.execute("SELEC 1")
        self.assertIn("syntax error", str(e.exception))
        with self.assertRaises(ValueError):
            self.part.query("SELECT ?, ?", (1,))
        with self.assertRaises(ValueError):
            self.part.query("SELECT ?")
        with self.assertRaises(TypeError):
            self.part.query("SELECT ?", (object(),))
        with self.assertRaises(TypeError):
            self.part.query("SELECT ?", "a")
        with self.assertRaises(OverflowError):
            self.part.query("SELECT ?", (1 << 70,))
        with self.assertRaises(TypeError):
            self.part.query(b"SELECT 1")
        with self.assertRaises(ValueError):
            self.part.execute("SELECT ?; SELECT 2", (1,))
        self.assertEqual(self.part.query("SELECT 1; SELECT 2 -- two"), [(2,)])

    def test_bad_arguments(self):
        o = self.orch
        with self.assertRaises(NotFound):
            o.start("no-such-definition")
        with self.assertRaises(TypeError):
            o.start(42)
        with self.assertRaises(TypeError):
            o.start("d", data=[1, 2])
        with self.assertRaises(TypeError):
            o.start("d", data={"k": 1.5})
        with self.assertRaises(TypeError):
            o.start("d", data={1: "v"})
        with self.assertRaises(ValueError):
            o.start("d", data={"": "v"})
        with self.assertRaises(ValueError):
            o.start("d", data={"a\0b": "v"})
        with self.assertRaises(InvalidArgument):
            o.start("d", traceparent="nonsense")
        with self.assertRaises(NotFound):
            o.get("0" * 32)
        with self.assertRaises(TypeError):
            o.get(None)
        with self.assertRaises(TypeError):
            Step("A", channel="p")  # no action
        with self.assertRaises(TypeError):
            Step("A", action="cmd")  # a command needs a channel
        with self.assertRaises(ValueError):
            Step("A", action=print, kind="sideways")
        with self.assertRaises(ValueError):
            Step("A", action=print, timeout=-1)
        with self.assertRaises(TypeError):
            Step("A", action=print, retry=3)
        with self.assertRaises(ValueError):
            Retry(attempts=0)._args("r")
        with self.assertRaises(TypeError):
            Definition("d", "steps")
        with self.assertRaises(ValueError):
            Definition("d", [])
        with self.assertRaises(ValueError):
            Definition("d", [Step("A", action=print)], version=0)
        with self.assertRaises(TypeError):
            Node("n", ":memory:", transport="mem")
        with self.assertRaises(ValueError):
            Node("", ":memory:", transport=Memory(self.hub))
        with self.assertRaises(TypeError):
            o.register("d")
        with self.assertRaises(TypeError):
            o.handle("p", "c", "not callable")
        with self.assertRaises(TypeError):
            MemoryHub(faults=[1])
        with self.assertRaises(ValueError):
            MemoryHub(faults={"drop": 2})
        with self.assertRaises(ValueError):
            MemoryHub(faults={"typo": 0.1})

    def test_definition_errors_from_the_library(self):
        bad = Definition("bad", [Step("P", action=print, kind=Kind.PIVOT),
                                 Step("C", action=print)])  # compensatable after the pivot
        with self.assertRaises(InvalidArgument) as e:
            self.orch.register(bad)
        self.assertEqual(e.exception.name, "EDEFINITION")
        d = Definition("twice", [Step("A", action=print)])
        self.orch.register(d)
        with self.assertRaises(Conflict):
            self.orch.register(d)
        self.part.handle("p", "c", print)
        with self.assertRaises(Conflict):
            self.part.handle("p", "c", print)
        self.orch.launch()
        with self.assertRaises(StateError):  # registration after launch
            self.orch.register(Definition("late", [Step("A", action=print)]))

    def test_closed_node(self):
        self.orch.register(Definition("d", [Step("A", channel="void", action="x",
                                                 timeout=NO_TIMEOUT)]))
        s = self.orch.start("d")
        waiting = {}

        def wait():
            try:
                s.result(30)
            except BaseException as e:
                waiting["e"] = e
        t = threading.Thread(target=wait)
        t.start()
        stream = self.orch.events()
        self.orch.close()  # with a saga in flight and a waiter
        t.join(10)
        self.assertFalse(t.is_alive())
        self.assertIsInstance(waiting["e"], ClosedError)
        # The stream ends at the close (the saga's first events may still be in it: the
        # event hook and the start's callback run after the same commit, in either order).
        rest = list(stream)
        self.assertTrue(all(e.saga_id == s.id and e.type in ("STARTED", "STEP_SENT")
                            for e in rest), rest)
        self.orch.close()  # idempotent
        for call in (lambda: self.orch.start("d"), lambda: self.orch.get(s.id),
                     lambda: self.orch.register(Definition("x", [Step("A", action=print)])),
                     lambda: self.orch.handle("c", "d", print), self.orch.stats,
                     lambda: self.orch.query("SELECT 1"), self.orch.events):
            with self.assertRaises(ClosedError) as e:
                call()
            self.assertIn("closed", str(e.exception))
        self.assertTrue(isinstance(e.exception, SagaError))

    def test_blocking_call_from_a_handler_is_refused(self):
        errs = []

        @self.part.handler("p", "nested")
        def nested(tx):
            try:
                self.part.get("0" * 32)
            except RuntimeError as e:
                errs.append(str(e))
            sid, existed = tx.start_saga("inner", {"a": "b"}, key="k")
            return {"inner": sid}
        self.part.register(Definition("inner", [Step("A", action=lambda tx: None)]))
        self.orch.register(Definition("outer", [Step("A", channel="p", action="nested")]))
        self.part.launch()
        s = self.orch.start("outer")
        self.assertEqual(s.result(10), State.COMPLETED)
        self.assertIn("loop thread", errs[0])
        inner = self.orch.get(s.id).data["inner"].decode()
        self.assertEqual(self.part.saga(inner).result(10), State.COMPLETED)

    def test_result_timeout(self):
        self.orch.register(Definition("slow", [Step("A", channel="void", action="x")]))
        s = self.orch.start("slow")
        with self.assertRaises(TimeoutError):
            s.result(timeout=0.05)


class Transports(unittest.TestCase):
    def test_tcp_plaintext_two_nodes(self):
        pa, pb = free_port(), free_port()
        routes = {"a": "127.0.0.1:%d" % pa, "b": "127.0.0.1:%d" % pb}
        with tempfile.TemporaryDirectory() as d:
            with Node("a", os.path.join(d, "a.db"), create=True,
                      transport=Tcp("127.0.0.1:%d" % pa, routes, insecure_plaintext=True,
                                    reconnect_max=0.5)) as a, \
                 Node("b", os.path.join(d, "b.db"), create=True,
                      transport=Tcp("127.0.0.1:%d" % pb, routes,
                                    insecure_plaintext=True)) as b:
                b.handle("b", "hi", lambda tx: {"from": "b"})
                b.launch()
                a.register(Definition("t", [Step("B", channel="b", action="hi")]))
                s = a.start("t")
                self.assertEqual(s.result(20), State.COMPLETED)
                self.assertEqual(a.get(s.id).data, {"from": b"b"})
                self.assertEqual(b.tcp_stats()["connections_accepted"] >= 1, True)

    def test_tcp_tls_files_missing(self):
        with self.assertRaises(InvalidArgument) as e:
            Node("a", ":memory:", transport=Tcp("127.0.0.1:0", {}, tls_ca="/nonexistent/ca",
                                                 tls_cert="/nonexistent/c", tls_key="/n/k"))
        self.assertIn("TCP transport", str(e.exception))

    def test_open_existing_refused(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(NotFound):
                Node("a", os.path.join(d, "missing.db"),
                     transport=Tcp(None, {}, insecure_plaintext=True))
            Node("a", os.path.join(d, "made.db"), create=True,
                 transport=Tcp(None, {}, insecure_plaintext=True)).close()
            Node("a", os.path.join(d, "made.db"),
                 transport=Tcp(None, {}, insecure_plaintext=True)).close()

    def test_nats_and_redis_fail_fast(self):
        port = free_port()  # nothing listens there
        with self.assertRaises(TransportError):
            Node("n", ":memory:", transport=Nats("nats://127.0.0.1:%d" % port, fail_fast=True,
                                                 user="u", password="p", ack_wait=5))
        with self.assertRaises(TransportError):
            Node("r", ":memory:", transport=Redis("127.0.0.1", port, fail_fast=True,
                                                  claim_idle=1))
        with self.assertRaises(TypeError):
            Nats(typo=1)
        with self.assertRaises(ValueError):
            Redis(port=0)
        with self.assertRaises(InvalidArgument):  # two ways to authenticate
            Node("n", ":memory:", transport=Nats(user="u", password="p", token="t"))


if __name__ == "__main__":
    unittest.main()
