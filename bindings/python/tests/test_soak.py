"""10,000 sagas through Python handlers without growth of memory or file descriptors."""
import gc
import os
import sys
import tempfile
import time
import unittest

import util
from libsaga import Definition, Memory, MemoryHub, Node, Refused, State, Step

TOTAL = int(os.environ.get("LIBSAGA_SOAK_SAGAS", "10000"))
WARMUP = TOTAL // 10
BATCH = 100


class Soak(unittest.TestCase):
    def test_no_growth(self):
        with tempfile.TemporaryDirectory() as d, MemoryHub() as hub:
            orch = Node("orch", os.path.join(d, "o.db"), transport=Memory(hub), create=True,
                        synchronous="off")
            part = Node("part", os.path.join(d, "p.db"), transport=Memory(hub), create=True,
                        synchronous="off")
            part.execute("CREATE TABLE t (saga TEXT, step INTEGER, n INTEGER, PRIMARY KEY (saga, step))")

            @part.handler("part", "put")
            def put(tx):
                if tx.int("n") % 7 == 0:
                    raise Refused("multiple of 7")
                tx.execute("INSERT INTO t VALUES (?, ?, ?)", (tx.saga_id, tx.step, tx.int("n")))
                return {"ok": "1"}

            @part.handler("part", "del")
            def delete(tx):
                tx.execute("DELETE FROM t WHERE saga = ?", (tx.saga_id,))
            part.launch()
            orch.register(Definition("soak", [
                Step("L", action=lambda tx: {"l": b"x" * 64}, compensation=lambda tx: None),
                Step("P", channel="part", action="put", compensation="del"),
                Step("Q", channel="part", action="put")]))
            events = orch.events()
            t0 = time.monotonic()
            base_rss = base_fds = None
            counts = {}
            for b in range(0, TOTAL, BATCH):
                sagas = [orch.start("soak", {"n": i}, key="k%d" % i)
                         for i in range(b, b + BATCH)]
                for s in sagas:
                    st = s.result(60)
                    counts[st] = counts.get(st, 0) + 1
                    orch.get(s.id)
                while True:  # drain the event stream as a consumer would
                    try:
                        events.get(timeout=0)
                    except TimeoutError:
                        break
                if b + BATCH == WARMUP:
                    gc.collect()
                    base_rss, base_fds = util.rss_kib(), util.fd_count()
            gc.collect()
            rss, fds = util.rss_kib(), util.fd_count()
            dt = time.monotonic() - t0
            print("\n# %d sagas in %.1f s (%.0f/s): RSS %d KiB after %d, %d KiB at the end; "
                  "fds %d -> %d; %s" % (TOTAL, dt, TOTAL / dt, base_rss, WARMUP, rss, base_fds,
                                        fds, {str(k): v for k, v in counts.items()}),
                  file=sys.stderr)
            self.assertEqual(sum(counts.values()), TOTAL)
            self.assertEqual(counts[State.COMPENSATED], len(range(0, TOTAL, 7)))
            self.assertEqual(fds, base_fds)
            # Generous: the SQLite page caches (2 MiB each by default) and the allocator may
            # still grow a little; a leak of a saga_data, saga_info or callback per saga would
            # be several MiB over 9,000 sagas.
            if os.environ.get("LIBSAGA_SOAK_RSS", "1") == "0":
                # Sanitizer builds: ASan's quarantine holds freed memory back on purpose, so
                # RSS grows whatever the binding does; the plain build checks it.
                print("# RSS bound not checked (LIBSAGA_SOAK_RSS=0)", file=sys.stderr)
            else:
                self.assertLess(rss - base_rss, 4 * 1024)
            events.close()


if __name__ == "__main__":
    unittest.main()
