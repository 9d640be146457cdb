"""The libuv loop the binding runs on a thread of its own."""
import ctypes
import collections
import threading

from . import _ffi as f
from .errors import ClosedError


class Future:
    """A result handed from the loop thread to a waiting thread."""
    __slots__ = ("_ev", "_value", "_exc")

    def __init__(self):
        self._ev = threading.Event()
        self._value = None
        self._exc = None

    def set(self, value):
        self._value = value
        self._ev.set()

    def fail(self, exc):
        self._exc = exc
        self._ev.set()

    def done(self):
        return self._ev.is_set()

    def wait(self, timeout=None):
        if not self._ev.wait(timeout):
            raise TimeoutError("no answer within %s s" % timeout)
        if self._exc is not None:
            raise self._exc
        return self._value


class Loop:
    """A libuv loop run by a thread of the binding. ``call(fn)`` runs fn on it (through an
    async handle: used for what no node can post yet, such as opening a node or a hub);
    everything a node does from another thread goes through saga_node_post()."""

    def __init__(self, name="libsaga"):
        self._mem = ctypes.create_string_buffer(f.uv_loop_size())
        self.ptr = ctypes.addressof(self._mem)
        rc = f.uv_loop_init(self.ptr)
        if rc != 0:
            raise OSError("uv_loop_init: %s" % f.uv_strerror(rc).decode())
        self._async_mem = ctypes.create_string_buffer(f.uv_handle_size(f.UV_ASYNC))
        self._async = ctypes.addressof(self._async_mem)
        self._async_cb = f.ASYNC_CB(self._drain)  # referenced for as long as the loop runs
        rc = f.uv_async_init(self.ptr, self._async, self._async_cb)
        if rc != 0:
            f.uv_loop_close(self.ptr)
            raise OSError("uv_async_init: %s" % f.uv_strerror(rc).decode())
        self._lock = threading.Lock()
        self._queue = collections.deque()
        self._closing = False
        self.users = 0  # nodes and hubs on this loop (closed with the last one when owned)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self):
        self.ident = threading.get_ident()
        f.uv_run(self.ptr, f.UV_RUN_DEFAULT)  # ctypes releases the GIL for the call

    def on_loop(self):
        return threading.get_ident() == getattr(self, "ident", None)

    def _drain(self, _handle):
        while True:
            with self._lock:
                if not self._queue:
                    return
                fn, fut = self._queue.popleft()
            try:
                fut.set(fn())
            except BaseException as e:  # handed to the waiting thread
                fut.fail(e)

    def submit(self, fn):
        """Queues fn for the loop thread; returns a Future of its result."""
        fut = Future()
        with self._lock:
            if self._closing:
                raise ClosedError("the binding's loop is closed", -14, "ECLOSED")
            self._queue.append((fn, fut))
            f.uv_async_send(self._async)
        return fut

    def call(self, fn):
        """Runs fn on the loop thread and returns its result (directly when already there)."""
        if self.on_loop():
            return fn()
        return self.submit(fn).wait()

    def stop(self):
        """Closes the async handle: the loop ends once every node and hub on it has closed.
        Waits for the thread, then releases the loop."""
        with self._lock:
            if self._closing:
                return
            fut = Future()

            def close_async():
                f.uv_close(self._async, None)
            self._queue.append((close_async, fut))
            self._closing = True
            f.uv_async_send(self._async)
        if self.on_loop():
            raise RuntimeError("a loop cannot be stopped from its own thread")
        self._thread.join()
        rc = f.uv_loop_close(self.ptr)
        if rc != 0:
            raise OSError("uv_loop_close: %s" % f.uv_strerror(rc).decode())
