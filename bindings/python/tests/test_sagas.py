"""Sagas of Python steps: reverse compensation, exactly-once effects under duplicated,
dropped and reordered messages, and across a SIGKILL of a Python process."""
import os
import signal
import subprocess
import sys
import tempfile
import unittest

import util
from libsaga import Definition, Memory, MemoryHub, Node, Refused, State, Step

STEPS = ("RESERVE", "ORDER", "CHARGE")


class ThreeSteps(unittest.TestCase):
    """Three participant steps written in Python, each on a node of its own; step k refuses
    when data says so: steps k-1..0 are compensated, in reverse order."""

    def run_case(self, fail_at):
        with MemoryHub() as hub:
            orch = Node("orch", ":memory:", transport=Memory(hub))
            log = []  # (step, action|compensation), in the order the handlers ran
            for i, name in enumerate(STEPS):
                n = Node(name.lower(), ":memory:", transport=Memory(hub))
                n.execute("CREATE TABLE effects (saga TEXT, step TEXT)")

                def act(tx, i=i, name=name):
                    tx.execute("INSERT INTO effects VALUES (?, ?)", (tx.saga_id, name))
                    if tx.int("fail_at") == i:
                        raise Refused("%s refused" % name)
                    log.append((name, "action"))
                    return {name.lower(): "done"}

                def undo(tx, name=name):
                    n_rows = tx.execute("DELETE FROM effects WHERE saga = ?", (tx.saga_id,))
                    log.append((name, "compensation", n_rows))
                n.handle(name.lower(), name.lower() + ".do", act)
                n.handle(name.lower(), name.lower() + ".undo", undo)
                n.launch()
            orch.register(Definition("buy", [
                Step(s, channel=s.lower(), action=s.lower() + ".do",
                     compensation=s.lower() + ".undo") for s in STEPS]))
            saga = orch.start("buy", {"fail_at": fail_at})
            state = saga.result(10)
            info = orch.get(saga.id)
            rows = {s: hub_node_rows(hub, s) for s in STEPS}
        return state, log, info, rows

    def test_fail_at_each_step(self):
        for k in range(3):
            with self.subTest(fail_at=k):
                state, log, info, rows = self.run_case(k)
                self.assertEqual(state, State.COMPENSATED)
                done = [(STEPS[i], "action") for i in range(k)]
                undone = [(STEPS[i], "compensation", 1) for i in reversed(range(k))]
                self.assertEqual(log, done + undone)
                self.assertIn("%s refused" % STEPS[k], info.error)
                self.assertEqual(rows, {s: 0 for s in STEPS})  # refused writes rolled back

    def test_no_failure(self):
        state, log, info, rows = self.run_case(-1)
        self.assertEqual(state, State.COMPLETED)
        self.assertEqual(log, [(s, "action") for s in STEPS])
        self.assertEqual({k: info.data[k] for k in ("reserve", "order", "charge")},
                         {"reserve": b"done", "order": b"done", "charge": b"done"})
        self.assertEqual(rows, {s: 1 for s in STEPS})


def hub_node_rows(hub, step):
    for n in list(hub._nodes):
        if n.name == step.lower():
            return n.query("SELECT count(*) FROM effects")[0][0]
    raise AssertionError("no node " + step)


class Duplicates(unittest.TestCase):
    """The in-memory transport duplicates, drops, delays and reorders messages and drops
    acknowledgements: every handler's effect is still there exactly once."""

    def test_exactly_once_under_faults(self):
        N = 200
        hub = MemoryHub(faults={"seed": 11, "duplicate": 0.3, "drop": 0.1, "reorder": 0.2,
                                "delay": 0.2, "delay_max": 0.02, "drop_ack": 0.2})
        with hub:
            orch = Node("orch", ":memory:", transport=Memory(hub), resend=0.05)
            part = Node("bank", ":memory:", transport=Memory(hub), resend=0.05)
            part.execute("CREATE TABLE credits (saga TEXT, step INTEGER, amount INTEGER)")
            runs = []

            @part.handler("bank", "credit")
            def credit(tx):
                runs.append(tx.saga_id)
                tx.execute("INSERT INTO credits VALUES (?, ?, ?)",
                           (tx.saga_id, tx.step, tx.int("amount")))
                return {"balance": tx.query_one("SELECT sum(amount) FROM credits "
                                                "WHERE saga = ?", (tx.saga_id,))[0]}
            part.launch()
            orch.register(Definition("pay", [
                Step("C%d" % i, channel="bank", action="credit") for i in range(3)]))
            sagas = [orch.start("pay", {"amount": i + 1}) for i in range(N)]
            states = [s.result(60) for s in sagas]
            self.assertEqual(states, [State.COMPLETED] * N)
            rows = part.query("SELECT saga, step, count(*), sum(amount) FROM credits "
                              "GROUP BY saga, step")
            self.assertEqual(len(rows), 3 * N)
            self.assertTrue(all(r[2] == 1 for r in rows), [r for r in rows if r[2] != 1][:5])
            by_id = {s.id: i + 1 for i, s in enumerate(sagas)}
            self.assertTrue(all(r[3] == by_id[r[0]] for r in rows))
            for s in sagas[:10]:
                self.assertEqual(orch.get(s.id).data["balance"], str(3 * by_id[s.id]).encode())
            hs = hub.stats()
            self.assertGreater(hs["duplicated"], 0)
            self.assertGreater(hs["dropped"], 0)
            # The duplicates reached the participant and were answered from its inbox.
            self.assertGreater(part.stats()["duplicates"], 0)
            print("\n# %d sagas, hub %s, handler runs %d, participant duplicates %d" %
                  (N, hs, len(runs), part.stats()["duplicates"]), file=sys.stderr)


CHILD = r"""
import os, sys, threading
sys.path.insert(0, %(pkg)r)
from libsaga import Definition, Memory, MemoryHub, Node, State, Step
d, n, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hub = MemoryHub()
orch = Node("orch", os.path.join(d, "orch.db"), transport=Memory(hub), create=True, resend=0.05)
part = Node("part", os.path.join(d, "part.db"), transport=Memory(hub), create=True, resend=0.05)
part.execute("CREATE TABLE IF NOT EXISTS effects (saga TEXT, step INTEGER, v TEXT)")
def act(tx):
    tx.execute("INSERT INTO effects VALUES (?, ?, ?)", (tx.saga_id, tx.step, tx.text("i")))
    return {"s%%d" %% tx.step: "ok"}
part.handle("part", "act", act)
orch.register(Definition("job", [Step("S%%d" %% i, channel="part", action="act") for i in range(3)]))
missing = part.launch() + orch.launch()
done = [0]
lock = threading.Lock()
@orch.on_event
def ev(e):
    if e.type == "COMPLETED":
        with lock:
            done[0] += 1
            if done[0] == n // 5:
                print("progress", flush=True)  # the parent kills us now, sagas in flight
sagas = [orch.start("job", {"i": str(i)}, key="job-%%d" %% i) for i in range(n)]
states = [s.result(60) for s in sagas]
print("existed", sum(1 for s in sagas if s.existed), flush=True)
print("states", ",".join(sorted(set(str(s) for s in states))), flush=True)
hub.close()
print("closed", flush=True)
"""


class Crash(unittest.TestCase):
    """A Python process running an orchestrator and a participant (file databases) is
    SIGKILLed with sagas in flight, then started again: every saga finishes, and every
    handler's effect is there exactly once."""

    def test_sigkill_and_restart(self):
        n = 300
        with tempfile.TemporaryDirectory() as d:
            script = os.path.join(d, "child.py")
            with open(script, "w") as fh:
                fh.write(CHILD % {"pkg": os.path.dirname(util.HERE)})
            p = subprocess.Popen([sys.executable, script, d, str(n), "first"],
                                 stdout=subprocess.PIPE, text=True)
            line = p.stdout.readline()
            self.assertEqual(line.strip(), "progress")
            p.send_signal(signal.SIGKILL)
            p.wait()
            p.stdout.close()
            self.assertEqual(p.returncode, -signal.SIGKILL)
            r = subprocess.run([sys.executable, script, d, str(n), "again"],
                               stdout=subprocess.PIPE, text=True, timeout=180)
            self.assertEqual(r.returncode, 0, r.stdout)
            out = dict(l.split(" ", 1) for l in r.stdout.strip().splitlines()
                       if l != "progress" and " " in l)
            self.assertEqual(out["states"], "COMPLETED")
            # The restarted run found the sagas the first one had started, by key.
            self.assertGreater(int(out["existed"]), 0)
            import sqlite3  # reading the files after both processes ended
            db = sqlite3.connect(os.path.join(d, "part.db"))
            rows = db.execute("SELECT saga, step, count(*) FROM effects "
                              "GROUP BY saga, step").fetchall()
            db.close()
            self.assertEqual(len(rows), 3 * n)
            self.assertEqual([r for r in rows if r[2] != 1], [])
            print("\n# killed after %s sagas completed; restarted run: %s existed" %
                  (n // 5, out["existed"]), file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
