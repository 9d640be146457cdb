"""The Pythonic layer over the C API: nodes, transports, definitions, handlers, saga handles."""
import atexit
import ctypes
import enum
import itertools
import logging
import math
import numbers
import queue
import re
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from . import _ffi as f
from . import _sqlite
from ._loop import Future, Loop
from .errors import ClosedError, Refused, SagaError, SQLiteError, error_for

log = logging.getLogger("libsaga")

FOREVER = 0xFFFFFFFF      #: Retry(attempts=FOREVER): never give up (SAGA_RETRY_FOREVER)
NO_TIMEOUT = math.inf     #: Step(timeout=NO_TIMEOUT): wait for the reply forever
_U32_MAX = 0xFFFFFFFF
_INT64 = (-(1 << 63), (1 << 63) - 1)
_TRANSIENT = {-2: "ENOMEM", -20: "EBUSY", -19: "EIO", -6: "EFULL"}
_SAGA_EINVAL, _SAGA_EREFUSED = -1, -12
_DECIMAL = re.compile(rb"-?[0-9]+")


def library_version():
    """The version string of the libsaga library loaded (saga_version())."""
    return f.saga_version().decode()


def _err(code, what="", detail=""):
    return error_for(code, f.saga_err_name(code).decode(), f.saga_strerror(code).decode(),
                     detail, what)


def _errmsg(nodeptr):
    m = f.saga_node_errmsg(nodeptr) if nodeptr else None
    return m.decode("utf-8", "replace") if m else ""


def _b(s, what, required=False):
    """A str argument as NUL-terminated bytes, with a clear error for anything else."""
    if s is None:
        if required:
            raise TypeError("%s is required" % what)
        return None
    if not isinstance(s, str):
        raise TypeError("%s must be a str, not %s" % (what, type(s).__name__))
    if "\0" in s:
        raise ValueError("%s contains a NUL character" % what)
    if required and not s:
        raise ValueError("%s must not be empty" % what)
    return s.encode("utf-8")


def _ms(seconds, what, forever=False):
    """Seconds (int or float) as milliseconds for a uint32_t field; None = 0 (the default)."""
    if seconds is None:
        return 0
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError("%s must be a number of seconds, not %s" % (what, type(seconds).__name__))
    if forever and seconds == math.inf:
        return _U32_MAX
    if not seconds >= 0 or seconds == math.inf:
        raise ValueError("%s must be a finite number of seconds >= 0, not %r" % (what, seconds))
    ms = int(round(seconds * 1000))
    if ms == 0 and seconds > 0:
        ms = 1
    if ms >= _U32_MAX:
        raise ValueError("%s: %r s is too long (at most %d ms)" % (what, seconds, _U32_MAX - 1))
    return ms


def _uint(v, what, lo=0, hi=_U32_MAX):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("%s must be an int, not %s" % (what, type(v).__name__))
    if not lo <= v <= hi:
        raise ValueError("%s must be in %d..%d, not %d" % (what, lo, hi, v))
    return v


# ---- saga data: dict <-> saga_data -----------------------------------------------------------
def _value_bytes(key, v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, int) and not isinstance(v, bool):
        if not _INT64[0] <= v <= _INT64[1]:
            raise OverflowError("data %r: %d does not fit in 64 bits" % (key, v))
        return str(v).encode()
    raise TypeError("data %r: values must be bytes, str or int, not %s" % (key, type(v).__name__))


def _check_key(k):
    if not isinstance(k, str):
        raise TypeError("data keys must be str, not %s" % type(k).__name__)
    return _b(k, "data key", required=True)


def _data_new(data):
    """A new saga_data holding a copy of the mapping (None = empty); the caller frees it."""
    if data is not None and not isinstance(data, Mapping):
        raise TypeError("data must be a mapping of str to bytes/str/int, not %s" %
                        type(data).__name__)
    items = [(_check_key(k), _value_bytes(k, v)) for k, v in (data or {}).items()]
    p = ctypes.c_void_p()
    rc = f.saga_data_new(ctypes.byref(p), None)
    if rc != 0:
        raise _err(rc, "saga_data_new")
    for k, v in items:
        rc = f.saga_data_set(p, k, v, len(v))
        if rc != 0:
            f.saga_data_free(p)
            raise _err(rc, "data key %r" % k.decode())
    return p


def _data_dict(p):
    out = {}
    if not p:
        return out
    k = ctypes.c_char_p()
    v = ctypes.c_void_p()
    n = ctypes.c_size_t()
    for i in range(f.saga_data_count(p)):
        if f.saga_data_at(p, i, ctypes.byref(k), ctypes.byref(v), ctypes.byref(n)) == 0:
            out[k.value.decode("utf-8", "replace")] = ctypes.string_at(v.value, n.value) \
                if n.value else b""
    return out


# ---- enums and value types ------------------------------------------------------------------
class State(enum.IntEnum):
    """Saga states (saga_state). Terminal: COMPLETED, COMPENSATED, FAILED."""
    RUNNING = 1
    COMPENSATING = 2
    COMPLETED = 3
    COMPENSATED = 4
    FAILED = 5

    @property
    def terminal(self):
        return self >= State.COMPLETED

    def __str__(self):
        return self.name


class Kind(enum.IntEnum):
    """What a step is in the saga's plan: compensatable*, at most one pivot, retriable*."""
    COMPENSATABLE = 0
    PIVOT = 1
    RETRIABLE = 2


@dataclass(frozen=True)
class Retry:
    """A retry policy (saga_retry). Times in seconds; None = the library's default
    (backoff 0.1 s, multiplier 2, cap 30 s). attempts=FOREVER never gives up."""
    attempts: int = 1
    backoff: Optional[float] = None
    multiplier: Optional[float] = None
    cap: Optional[float] = None
    jitter: float = 0.0
    before_compensate: bool = False

    def _args(self, what):
        a = _uint(self.attempts, what + ".attempts", 1)
        m = self.multiplier
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Real)):
            raise TypeError("%s.multiplier must be a number" % what)
        j = self.jitter
        if isinstance(j, bool) or not isinstance(j, numbers.Real) or not 0 <= j <= 1:
            raise ValueError("%s.jitter must be a number in 0..1" % what)
        return (a, _ms(self.backoff, what + ".backoff"), float(m or 0.0),
                _ms(self.cap, what + ".cap"), float(j))


class Step:
    """One step of a definition.

    A participant's step names its ``channel`` and ``action`` command (and a ``compensation``
    command, or None); a local step, run on the orchestrator's node, passes Python functions
    as ``action`` (and ``compensation``), each called with a :class:`Transaction` like a
    handler. ``timeout`` is in seconds (None = the library's default of 60 s, NO_TIMEOUT =
    forever)."""

    def __init__(self, name, *, action, channel=None, compensation=None,
                 kind=Kind.COMPENSATABLE, retry=None, compensation_retry=None, timeout=None):
        _b(name, "Step name", required=True)
        self.name = name
        if isinstance(kind, str):
            try:
                kind = Kind[kind.upper()]
            except KeyError:
                raise ValueError("Step %r: kind must be compensatable, pivot or retriable, not "
                                 "%r" % (name, kind)) from None
        if not isinstance(kind, int) or isinstance(kind, bool) or kind not in (0, 1, 2):
            raise ValueError("Step %r: unknown kind %r" % (name, kind))
        self.kind = Kind(kind)
        if channel is not None:
            _b(channel, "Step %r channel" % name, required=True)
            _b(action, "Step %r action (a command name)" % name, required=True)
            _b(compensation, "Step %r compensation (a command name)" % name)
        else:
            if not callable(action):
                raise TypeError("Step %r: give a channel and a command name, or a function as "
                                "action for a local step" % name)
            if compensation is not None and not callable(compensation):
                raise TypeError("Step %r: the compensation of a local step is a function" % name)
        for r, w in ((retry, "retry"), (compensation_retry, "compensation_retry")):
            if r is not None and not isinstance(r, Retry):
                raise TypeError("Step %r: %s must be a Retry" % (name, w))
        self.channel, self.action, self.compensation = channel, action, compensation
        self.retry, self.compensation_retry = retry, compensation_retry
        self.timeout = timeout
        self._timeout_ms = _ms(timeout, "Step %r timeout" % name, forever=True)
        if retry is not None:
            retry._args("Step %r retry" % name)
        if compensation_retry is not None:
            compensation_retry._args("Step %r compensation_retry" % name)

    @property
    def local(self):
        return self.channel is None

    def __repr__(self):
        return "Step(%r, %s)" % (self.name, "local" if self.local else
                                 "%s/%s" % (self.channel, self.action))


class Definition:
    """A saga definition: a name, a version and its steps, registered with
    :meth:`Node.register` (built with the C run-time builder, saga_def_builder_*)."""

    def __init__(self, name, steps, *, version=1, deadline=None):
        _b(name, "Definition name", required=True)
        if isinstance(steps, (str, bytes)) or not all(isinstance(s, Step) for s in steps):
            raise TypeError("Definition %r: steps must be a list of Step" % name)
        self.name, self.steps, self.version = name, list(steps), _uint(version, "version", 1)
        if not self.steps:
            raise ValueError("Definition %r has no steps" % name)
        self.deadline = deadline
        self._deadline_ms = _ms(deadline, "Definition %r deadline" % name)

    def _build(self, node, keep):
        """A saga_def_builder for this definition; the handlers of local steps are made for
        node and appended to keep (alive for as long as the node). Caller frees it."""
        b = ctypes.c_void_p()
        rc = f.saga_def_builder_new(ctypes.byref(b), self.name.encode(), self.version, None)
        if rc != 0:
            raise _err(rc, "definition %r" % self.name)
        try:
            for s in self.steps:
                if s.local:
                    act = _make_handler(node, s.action, "%s/%s" % (self.name, s.name))
                    comp = _make_handler(node, s.compensation, "%s/%s (compensation)" %
                                         (self.name, s.name)) if s.compensation else \
                        f.HANDLER_FN()
                    keep.extend((act, comp))
                    i = f.saga_def_builder_add_local_step(b, s.name.encode(), act, comp, None,
                                                          int(s.kind))
                else:
                    i = f.saga_def_builder_add_step(b, s.name.encode(), s.channel.encode(),
                                                    s.action.encode(),
                                                    _b(s.compensation, "compensation"),
                                                    int(s.kind))
                if i < 0:
                    raise _err(i, "definition %r, step %r" % (self.name, s.name))
                rc = 0
                if s.retry is not None:
                    rc = f.saga_def_builder_set_retry(b, i, *s.retry._args("retry"),
                                                      1 if s.retry.before_compensate else 0)
                if rc == 0 and s.compensation_retry is not None:
                    rc = f.saga_def_builder_set_compensation_retry(
                        b, i, *s.compensation_retry._args("compensation_retry"))
                if rc == 0 and s._timeout_ms:
                    rc = f.saga_def_builder_set_timeout(b, i, s._timeout_ms)
                if rc != 0:
                    raise _err(rc, "definition %r, step %r" % (self.name, s.name))
            if self._deadline_ms:
                rc = f.saga_def_builder_set_deadline(b, self._deadline_ms)
                if rc != 0:
                    raise _err(rc, "definition %r deadline" % self.name)
        except BaseException:
            f.saga_def_builder_free(b)
            raise
        return b


@dataclass
class SagaInfo:
    """A snapshot of one saga (saga_get())."""
    id: str
    definition: str
    version: int
    state: State
    step: int
    attempt: int
    error: str
    data: dict
    created_ms: int
    updated_ms: int
    deadline_ms: int


@dataclass
class Event:
    """One transition of a saga (saga_event), copied out of the C callback. ``data`` is the
    saga's data for events received from other nodes, None for this node's own."""
    type: str
    saga_id: str
    definition: str
    version: int
    step: int
    step_name: str
    attempt: int
    state: State
    detail: str
    at_ms: int
    traceparent: str = ""
    data: Optional[dict] = None

    @classmethod
    def _from_c(cls, p):
        e = ctypes.cast(p, ctypes.POINTER(f.Event)).contents
        d = lambda s: s.decode("utf-8", "replace") if s else ""  # noqa: E731
        try:
            st = State(e.state)
        except ValueError:
            st = e.state
        return cls(f.saga_event_name(e.type).decode(), d(e.saga_id), d(e.definition), e.version,
                   e.step, d(e.step_name), e.attempt, st, d(e.detail), e.at_ms, d(e.traceparent),
                   _data_dict(e.data) if e.data else None)


# ---- callbacks from C: one trampoline each, tokens name the Python side ---------------------
_pending = {}
_tokens = itertools.count(1)


def _token(fn):
    t = next(_tokens)
    _pending[t] = fn
    return t


def _call_pending(arg, *a):
    fn = _pending.pop(arg or 0, None)
    if fn is None:
        return
    try:
        fn(*a)
    except BaseException:  # never let an exception cross into C
        log.error("libsaga: callback failed:\n%s", traceback.format_exc())


@f.POST_FN
def _post_cb(nodeptr, arg):
    _call_pending(arg, nodeptr)


@f.START_CB
def _start_cb(nodeptr, status, saga_id, existed, arg):
    _call_pending(arg, nodeptr, status, saga_id, existed)


@f.DONE_CB
def _done_cb(nodeptr, status, arg):
    _call_pending(arg, nodeptr, status)


@f.WATCH_CB
def _watch_cb(nodeptr, status, saga_id, state, arg):
    _call_pending(arg, nodeptr, status, state)


@f.CLOSE_CB
def _close_cb(arg):
    _call_pending(arg)


# ---- handlers -------------------------------------------------------------------------------
class Transaction:
    """What a handler receives: the command and the node's transaction it runs in.

    ``execute()`` and ``query()`` run SQL on the node's own SQLite connection, inside the
    savepoint of this handler run: the writes commit together with the inbox record and the
    reply, or not at all. Valid only during the handler call."""
    __slots__ = ("_tx", "_msg", "_db", "_data", "_node")

    def __init__(self, node, tx, msg):
        self._node, self._tx, self._msg, self._db, self._data = node, tx, msg, None, None

    def _live(self):
        if self._tx is None:
            raise ClosedError("the transaction ended when its handler returned", -14, "ECLOSED")
        return self._msg

    def _s(self, fn):
        v = fn(self._live())
        return v.decode("utf-8", "replace") if v is not None else None

    saga_id = property(lambda self: self._s(f.saga_msg_saga_id), doc="the saga's id")
    command = property(lambda self: self._s(f.saga_msg_command), doc="the command name")
    message_id = property(lambda self: self._s(f.saga_msg_id), doc="the message id")
    traceparent = property(lambda self: self._s(f.saga_msg_traceparent),
                           doc="this handler run's trace context")
    step = property(lambda self: f.saga_msg_step(self._live()), doc="the step's index")
    attempt = property(lambda self: f.saga_msg_attempt(self._live()), doc="attempt, from 1")
    is_compensation = property(lambda self: bool(f.saga_msg_is_compensation(self._live())),
                               doc="True for a compensation")

    @property
    def data(self):
        """The saga's data sent with the command: a dict of str to bytes."""
        if self._data is None:
            self._data = _data_dict(f.saga_msg_data(self._live()))
        return self._data

    def text(self, key, default=None):
        """data[key] decoded as UTF-8, or default when absent."""
        v = self.data.get(key)
        return default if v is None else v.decode("utf-8", "replace")

    def int(self, key, default=None):
        """data[key] as a decimal integer, or default when absent (ValueError when it is not
        one)."""
        v = self.data.get(key)
        if v is None:
            return default
        # As saga_data_get_i64(): exactly an optional '-' and decimal digits, in int64 range
        # (no sign '+', no spaces, no '_', which Python's int() would take).
        if _DECIMAL.fullmatch(v):
            n = int(v)
            if _INT64[0] <= n <= _INT64[1]:
                return n
        raise ValueError("data %r is not a decimal 64-bit integer: %r" % (key, v[:40]))

    def header(self, name):
        """A header of the command as received (hostile input: check it), or None."""
        v = f.saga_msg_header(self._live(), _b(name, "header name", required=True))
        return v.decode("utf-8", "replace") if v is not None else None

    def _conn(self):
        self._live()
        if self._db is None:
            self._db = f.saga_tx_db(self._tx)
        return self._db

    def execute(self, sql, params=None):
        """Runs sql (one statement with params, a sequence or a mapping of named parameters;
        several statements without) in the handler's transaction. Returns the number of rows
        the (last) statement changed. Raises SQLiteError; do not COMMIT or ROLLBACK."""
        return _sqlite.run(self._conn(), sql, params, False)

    def query(self, sql, params=None):
        """Runs a query in the handler's transaction; returns its rows as a list of tuples."""
        return _sqlite.run(self._conn(), sql, params, True)

    def query_one(self, sql, params=None):
        """The first row of a query, or None."""
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @property
    def lastrowid(self):
        """The rowid of the last row inserted on the connection."""
        return f.sqlite3_last_insert_rowid(self._conn())

    def start_saga(self, definition, data=None, key=None):
        """Starts a saga of a definition registered on this node inside this transaction
        (saga_tx_start): it exists if and only if this handler's work commits. Returns
        (saga id, existed)."""
        self._live()
        name = definition.name if isinstance(definition, Definition) else definition
        d = _data_new(data)
        try:
            out = ctypes.create_string_buffer(64)
            ex = ctypes.c_int(0)
            rc = f.saga_tx_start(self._tx, _b(name, "definition", required=True), d,
                                 _b(key, "key"), out, 64, ctypes.byref(ex))
        finally:
            f.saga_data_free(d)
        if rc != 0:
            raise _err(rc, "starting a saga of %r" % name)
        return out.value.decode(), bool(ex.value)

    def _reply(self, reply, out):
        if not isinstance(out, Mapping):
            raise TypeError("a handler returns a dict of reply data (or None), not %s" %
                            type(out).__name__)
        for k, v in out.items():
            kb = _check_key(k)
            if isinstance(v, int) and not isinstance(v, bool):
                if not _INT64[0] <= v <= _INT64[1]:
                    raise OverflowError("reply %r: %d does not fit in 64 bits" % (k, v))
                rc = f.saga_reply_set_i64(reply, kb, v)
            else:
                b = _value_bytes(k, v)
                rc = f.saga_reply_set(reply, kb, b, len(b))
            if rc != 0:
                raise _err(rc, "reply data %r" % k)


def _make_handler(node, fn, label):
    """A C handler (saga_handler) calling fn(tx). Refused -> a business failure; an SQLite
    busy/locked/full/I/O error or a transient libsaga error -> that transient code (the
    command comes again); any other exception -> a technical failure with the traceback in
    the log (the message is dead-lettered and answered with a failure)."""
    def c_handler(tx, msg, reply, arg):
        t = Transaction(node, tx, msg)
        try:
            out = fn(t)
            if out is not None:
                t._reply(reply, out)
            return 0
        except Refused as e:
            f.saga_reply_fail(reply, e.reason.encode("utf-8", "replace")[:512])
            return _SAGA_EREFUSED
        except BaseException as e:
            code = None
            if isinstance(e, SQLiteError):
                code = {5: -20, 6: -20, 7: -2, 10: -19, 13: -6}.get(e.sqlite_code & 0xff)
            elif isinstance(e, SagaError) and e.code in _TRANSIENT:
                code = e.code
            if code is not None:
                log.warning("handler %s: transient failure, the command comes again: %s",
                            label, e)
                return code
            log.error("handler %s raised %s (a technical failure: the command is "
                      "dead-lettered and answered with a failure):\n%s", label,
                      type(e).__name__, traceback.format_exc())
            why = "python handler %s raised %s: %s" % (label, type(e).__name__, e)
            f.saga_reply_fail(reply, why.encode("utf-8", "replace")[:500])
            return _SAGA_EINVAL
        finally:
            t._tx = t._msg = t._db = None
    return f.HANDLER_FN(c_handler)


# ---- transports -----------------------------------------------------------------------------
class _Transport:
    def _loop(self):
        return None  # a loop of the node's own

    def _make(self):
        raise NotImplementedError


class MemoryHub:
    """The in-memory transport's hub (saga_mem_hub): every node on it shares its loop. Fault
    injection: ``faults=dict(seed=1, drop=0.1, duplicate=0.2, reorder=..., delay=...,
    delay_max=seconds, drop_ack=...)``."""

    def __init__(self, faults=None):
        fl = self._faults(faults)
        self.loop = Loop("libsaga-hub")
        self._nodes = set()  # strong: an open node's callbacks must outlive its Python name
        self._closed = False

        def make():
            p = ctypes.c_void_p()
            rc = f.saga_mem_hub_new(ctypes.byref(p), self.loop.ptr, None,
                                    ctypes.byref(fl) if fl else None, None)
            if rc != 0:
                raise _err(rc, "saga_mem_hub_new")
            return p.value
        try:
            self.ptr = self.loop.call(make)
        except BaseException:
            self.loop.stop()
            raise
        _hubs.add(self)

    @staticmethod
    def _faults(faults):
        if faults is None:
            return None
        if not isinstance(faults, Mapping):
            raise TypeError("faults must be a dict")
        fl = f.MemFaults()
        for k, v in faults.items():
            if k == "seed":
                fl.seed = _uint(v, "seed", 0, (1 << 64) - 1)
            elif k == "delay_max":
                fl.delay_max_ms = _ms(v, "delay_max")
            elif k in ("drop", "duplicate", "reorder", "delay", "drop_ack"):
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
                    raise ValueError("faults[%r] must be a probability in 0..1" % k)
                setattr(fl, k, float(v))
            else:
                raise ValueError("unknown fault %r (seed, drop, duplicate, reorder, delay, "
                                 "delay_max, drop_ack)" % k)
        return fl

    def set_faults(self, faults=None):
        """Replaces the fault settings (None: a perfect network)."""
        fl = self._faults(faults) or f.MemFaults()
        self._check()
        self.loop.call(lambda: f.saga_mem_hub_set_faults(self.ptr, ctypes.byref(fl)))

    def stats(self):
        """The hub's counters (saga_mem_hub_stats) as a dict."""
        self._check()
        st = f.MemStats()
        self.loop.call(lambda: f.saga_mem_hub_stats(self.ptr, ctypes.byref(st),
                                                    ctypes.sizeof(st)))
        return {k: getattr(st, k) for k, _ in f.MemStats._fields_}

    def _check(self):
        if self._closed:
            raise ClosedError("the memory hub is closed", -14, "ECLOSED")

    def close(self):
        """Closes every node still open on the hub, then the hub and its loop."""
        if self._closed:
            return
        for n in list(self._nodes):
            n.close()
        self._closed = True
        rc = self.loop.call(lambda: f.saga_mem_hub_close(self.ptr))
        self.loop.stop()
        _hubs.discard(self)
        if rc != 0:
            raise _err(rc, "closing the memory hub")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Memory(_Transport):
    """The in-memory transport of a MemoryHub: nodes of one process, on the hub's loop."""

    def __init__(self, hub):
        if not isinstance(hub, MemoryHub):
            raise TypeError("Memory(hub): hub must be a MemoryHub")
        self.hub = hub

    def _loop(self):
        self.hub._check()
        return self.hub.loop

    def _make(self):
        p = ctypes.c_void_p()
        rc = f.saga_mem_transport_new(ctypes.byref(p), self.hub.ptr)
        if rc != 0:
            raise _err(rc, "saga_mem_transport_new")
        return p.value


class Tcp(_Transport):
    """The TCP transport (libsaga_tcp): mutual TLS 1.3 unless insecure_plaintext.

    routes: {channel: "host:port"} or {channel: ("host:port", identity)};
    allow: [(identity, channel), ...] (who may send to which of this node's channels)."""

    def __init__(self, listen=None, routes=None, *, tls_ca=None, tls_cert=None, tls_key=None,
                 allow=(), insecure_plaintext=False, reconnect_min=None, reconnect_max=None,
                 max_frame_bytes=0, max_queued_bytes=0, max_connections=0,
                 max_connections_per_ip=0, handshake_timeout=None, idle_timeout=None):
        if f.tcp is None:
            raise ImportError("libsaga_tcp is not available next to libsaga")
        self.listen = _b(listen, "listen")
        self.routes = []
        for ch, dest in (routes or {}).items():
            addr, ident = (dest, None) if isinstance(dest, str) else tuple(dest)
            self.routes.append((_b(ch, "route channel", True), _b(addr, "route address", True),
                                _b(ident, "route identity")))
        self.allow = [(_b(i, "allow identity", True), _b(c, "allow channel", True))
                      for i, c in allow]
        self.tls = tuple(_b(x, n) for x, n in ((tls_ca, "tls_ca"), (tls_cert, "tls_cert"),
                                                 (tls_key, "tls_key")))
        self.insecure_plaintext = bool(insecure_plaintext)
        self.u32 = dict(reconnect_min_ms=_ms(reconnect_min, "reconnect_min"),
                        reconnect_max_ms=_ms(reconnect_max, "reconnect_max"),
                        max_connections=_uint(max_connections, "max_connections"),
                        max_connections_per_ip=_uint(max_connections_per_ip,
                                                     "max_connections_per_ip"),
                        handshake_timeout_ms=_ms(handshake_timeout, "handshake_timeout"),
                        idle_timeout_ms=_ms(idle_timeout, "idle_timeout"))
        self.sizes = dict(max_frame_bytes=_uint(max_frame_bytes, "max_frame_bytes", 0, 1 << 62),
                          max_queued_bytes=_uint(max_queued_bytes, "max_queued_bytes", 0,
                                                 1 << 62))

    def _make(self):
        c = f.TcpConfig()
        f.saga_tcp_config_init_sized(ctypes.byref(c), ctypes.sizeof(c))
        c.listen = self.listen
        routes = (f.TcpRoute * max(1, len(self.routes)))(*[f.TcpRoute(*r) for r in self.routes])
        allow = (f.TcpAllow * max(1, len(self.allow)))(*[f.TcpAllow(*a) for a in self.allow])
        c.routes, c.nroutes = ctypes.cast(routes, ctypes.POINTER(f.TcpRoute)), len(self.routes)
        c.allow, c.nallow = ctypes.cast(allow, ctypes.POINTER(f.TcpAllow)), len(self.allow)
        c.tls_ca_file, c.tls_cert_file, c.tls_key_file = self.tls
        c.insecure_plaintext = 1 if self.insecure_plaintext else 0
        for k, v in list(self.u32.items()) + list(self.sizes.items()):
            if v:
                setattr(c, k, v)
        p = ctypes.c_void_p()
        err = ctypes.create_string_buffer(512)
        rc = f.saga_tcp_transport_new2(ctypes.byref(p), ctypes.byref(c), err, 512)
        if rc != 0:
            raise _err(rc, "TCP transport", err.value.decode("utf-8", "replace"))
        return p.value


class Nats(_Transport):
    """The NATS JetStream transport (libsaga_nats). Keyword arguments are the fields of
    saga_nats_config (ack_wait and reconnect_wait in seconds)."""
    _STR = ("url", "stream", "prefix", "user", "password", "token", "nkey", "nkey_seed_file",
            "creds_file", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_hostname",
            "inbox_prefix")

    def __init__(self, url="nats://127.0.0.1:4222", **kw):
        if f.nats is None:
            raise ImportError("libsaga_nats is not available next to libsaga")
        kw["url"] = url
        self.s = {}
        self.n = {}
        for k, v in kw.items():
            if k in self._STR:
                self.s[k] = _b(v, k)
            elif k in ("ack_wait", "reconnect_wait"):
                self.n[k + "_ms"] = _ms(v, k)
            elif k == "max_deliveries":
                self.n[k] = _uint(v, k)
            elif k in ("tls_required", "fail_fast"):
                self.n[k] = 1 if v else 0
            else:
                raise TypeError("Nats: unknown option %r" % k)

    def _make(self):
        c = f.NatsConfig()
        f.saga_nats_config_init(ctypes.byref(c))
        for k, v in self.s.items():
            if v is not None:
                setattr(c, k, v)
        for k, v in self.n.items():
            if v:
                setattr(c, k, v)
        p = ctypes.c_void_p()
        rc = f.saga_nats_transport_new(ctypes.byref(p), ctypes.byref(c))
        if rc != 0:
            raise _err(rc, "NATS transport")
        return p.value


class Redis(_Transport):
    """The Redis Streams transport (libsaga_redis). Keyword arguments are the fields of
    saga_redis_config (claim_idle, reconnect_min, reconnect_max in seconds). No TLS."""
    _STR = ("host", "prefix", "consumer", "username", "password")

    def __init__(self, host="127.0.0.1", port=6379, **kw):
        if f.redis is None:
            raise ImportError("libsaga_redis is not available next to libsaga")
        kw["host"] = host
        self.port = _uint(port, "port", 1, 65535)
        self.s, self.n = {}, {}
        for k, v in kw.items():
            if k in self._STR:
                self.s[k] = _b(v, k)
            elif k in ("claim_idle", "reconnect_min", "reconnect_max"):
                self.n[k + "_ms"] = _ms(v, k)
            elif k == "max_deliveries":
                self.n[k] = _uint(v, k)
            elif k == "fail_fast":
                self.n[k] = 1 if v else 0
            else:
                raise TypeError("Redis: unknown option %r" % k)

    def _make(self):
        c = f.RedisConfig()
        f.saga_redis_config_init_sized(ctypes.byref(c), ctypes.sizeof(c))
        c.port = self.port
        for k, v in self.s.items():
            if v is not None:
                setattr(c, k, v)
        for k, v in self.n.items():
            if v:
                setattr(c, k, v)
        p = ctypes.c_void_p()
        rc = f.saga_redis_transport_new(ctypes.byref(p), ctypes.byref(c))
        if rc != 0:
            raise _err(rc, "Redis transport")
        return p.value


# ---- the node -------------------------------------------------------------------------------
class Saga:
    """A handle on one saga of a node (as orchestrator)."""

    def __init__(self, node, saga_id, existed=False):
        self.node, self.id, self.existed = node, saga_id, existed

    def result(self, timeout=None):
        """Waits until the saga is terminal (COMPLETED, COMPENSATED or FAILED) and returns
        that State; TimeoutError after timeout seconds. Waits on saga_node_watch(), without
        polling."""
        return self.node._watch(self.id).wait(timeout)

    def info(self):
        """The saga's committed state (Node.get)."""
        return self.node.get(self.id)

    @property
    def state(self):
        return self.info().state

    def cancel(self):
        """Cancels the saga into compensation (before its pivot)."""
        self.node.cancel(self.id)

    def retry(self):
        """Resumes a FAILED saga's compensation (operator repair)."""
        self.node.retry(self.id)

    def __repr__(self):
        return "Saga(%r)" % self.id


class EventStream:
    """An iterator over a node's events (from Node.events()); ends when the node closes or
    close() is called."""
    _END = object()

    def __init__(self, node, maxsize):
        self._node, self._q = node, queue.Queue(maxsize)

    def _put(self, ev):
        try:
            self._q.put_nowait(ev)
        except queue.Full:
            log.warning("libsaga: event stream full, an event was dropped")

    def get(self, timeout=None):
        """The next event; TimeoutError after timeout seconds; StopIteration once ended."""
        try:
            ev = self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no event within %s s" % timeout) from None
        if ev is self._END:
            self._q.put(self._END)
            raise StopIteration
        return ev

    def __iter__(self):
        return self

    def __next__(self):
        return self.get()

    def close(self):
        self._node._streams.discard(self)
        self._q.put(self._END)


_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}
_SYNC = {"off": 0, "normal": 1, "full": 2}
# Strong references to every open node and hub: C calls their callbacks (CFUNCTYPE objects
# they hold) until they are closed, whatever the application still references.
_nodes = set()
_hubs = set()


class Node:
    """A libsaga node: one SQLite database, one transport, run on a libuv loop the binding
    runs on a thread of its own (shared by the nodes of one MemoryHub).

    Register definitions (``register``) and handlers (``@handler``) first, then ``launch()``
    (``start()``, ``get()`` and the other saga calls launch it when needed). Use it as a
    context manager, or call ``close()``."""

    def __init__(self, name, db_path, transport, *, create=False, synchronous="full",
                 event_channel=None, resend=None, max_deliveries=0, busy_timeout=None,
                 batch_max=0):
        bname = _b(name, "name", required=True)
        bpath = _b(db_path, "db_path", required=True)
        if not isinstance(transport, _Transport):
            raise TypeError("transport must be Memory(hub), Tcp(...), Nats(...) or Redis(...), "
                            "not %s" % type(transport).__name__)
        if synchronous not in _SYNC:
            raise ValueError("synchronous must be 'off', 'normal' or 'full'")
        bchan = _b(event_channel, "event_channel")
        resend_ms = _ms(resend, "resend")
        busy_ms = _ms(busy_timeout, "busy_timeout")
        _uint(max_deliveries, "max_deliveries")
        _uint(batch_max, "batch_max")
        self.name = name
        self._lock = threading.Lock()
        self._closed = False
        self._launched = False
        self._keep = []  # every CFUNCTYPE object C may call while the node lives
        self._handlers = {}
        self._callbacks = []
        self._streams = set()
        self._dispatch_q = None
        self._dispatcher = None
        self._logger = logging.getLogger("libsaga." + name)
        self._log_cb = f.LOG_FN(self._on_log)
        self._event_cb = f.EVENT_CB(self._on_event)
        self._remote_event_cb = f.EVENT_CB(self._on_event)
        self._keep += [self._log_cb, self._event_cb, self._remote_event_cb]
        self._hub = transport.hub if isinstance(transport, Memory) else None
        shared = transport._loop()
        self._own_loop = shared is None
        self._loop = Loop("libsaga-" + name) if shared is None else shared

        def open_():
            cfg = f.NodeConfig()
            f.saga_node_config_init_sized(ctypes.byref(cfg), ctypes.sizeof(cfg))
            cfg.name, cfg.db_path, cfg.synchronous = bname, bpath, _SYNC[synchronous]
            cfg.log, cfg.on_event, cfg.event_channel = self._log_cb, self._event_cb, bchan
            cfg.db_mode = 1 if create else 0
            if resend_ms:
                cfg.resend_ms = resend_ms
            if busy_ms:
                cfg.busy_timeout_ms = busy_ms
            if max_deliveries:
                cfg.max_deliveries = max_deliveries
            if batch_max:
                cfg.batch_max = batch_max
            tp = transport._make()  # the node takes it, even when opening fails
            cfg.transport = tp
            self._tpt = tp  # valid while the node is open (saga_tcp_stats_get)
            out = ctypes.c_void_p()
            err = ctypes.create_string_buffer(512)
            rc = f.saga_node_open(ctypes.byref(out), self._loop.ptr, ctypes.byref(cfg), err, 512)
            if rc != 0:
                raise _err(rc, "opening node %r" % name, err.value.decode("utf-8", "replace"))
            return out.value
        try:
            self._ptr = self._loop.call(open_)
        except BaseException:
            if self._own_loop:
                self._loop.stop()
            raise
        self._transport = transport
        if self._hub is not None:
            self._hub._nodes.add(self)
        _nodes.add(self)

    # -- plumbing --
    def _on_log(self, arg, level, msg):
        lv = _LEVELS.get(level, logging.ERROR)
        if self._logger.isEnabledFor(lv):
            self._logger.log(lv, "%s", msg.decode("utf-8", "replace") if msg else "")

    def _on_event(self, nodeptr, evp, arg):
        if not self._streams and not self._callbacks:
            return
        try:
            ev = Event._from_c(evp)
            for s in list(self._streams):
                s._put(ev)
            if self._callbacks:
                self._dispatch_q.put(ev)
        except BaseException:
            log.error("libsaga: copying an event failed:\n%s", traceback.format_exc())

    def _dispatch(self):
        while True:
            ev = self._dispatch_q.get()
            if ev is None:
                return
            for cb in list(self._callbacks):
                try:
                    cb(ev)
                except BaseException:
                    log.error("libsaga: event callback %r raised:\n%s", cb,
                              traceback.format_exc())

    def _check(self):
        if self._closed:
            raise ClosedError("node %r is closed" % self.name, -14, "ECLOSED")

    def _on_loop(self, fn, what):
        """Runs fn(nodeptr) on the loop thread (for calls before launch and the node's own
        database); returns its result."""
        self._check()

        def run():
            if self._closed:
                raise ClosedError("node %r is closed" % self.name, -14, "ECLOSED")
            return fn(self._ptr)
        return self._loop.call(run)

    def _post(self, fn, what):
        """Posts fn(nodeptr, fut) to the loop with saga_node_post(); fn resolves fut now or
        from a later callback. Returns fut."""
        if self._loop.on_loop():
            raise RuntimeError("node %r: %s blocks, and cannot be called on the node's loop "
                               "thread (in a handler use tx.start_saga())" % (self.name, what))
        if not self._launched:
            self.launch()
        fut = Future()

        def run(nodeptr):
            if not nodeptr:
                fut.fail(ClosedError("node %r closed before %s ran" % (self.name, what), -14,
                                     "ECLOSED"))
                return
            try:
                fn(nodeptr, fut)
            except BaseException as e:
                fut.fail(e)
        t = _token(run)
        with self._lock:
            if self._closed:
                _pending.pop(t, None)
                raise ClosedError("node %r is closed" % self.name, -14, "ECLOSED")
            rc = f.saga_node_post(self._ptr, _post_cb, t)
        if rc != 0:
            _pending.pop(t, None)
            raise _err(rc, "node %r: %s" % (self.name, what))
        return fut

    # -- set-up --
    def register(self, definition):
        """Registers a Definition to orchestrate (before launch)."""
        if not isinstance(definition, Definition):
            raise TypeError("register() takes a Definition, not %s" % type(definition).__name__)
        keep = []

        def run(p):
            b = definition._build(self, keep)
            try:
                rc = f.saga_node_register(p, f.saga_def_builder_definition(b))
            finally:
                f.saga_def_builder_free(b)
            if rc != 0:
                raise _err(rc, "registering %r" % definition.name, _errmsg(p))
        self._on_loop(run, "register")
        self._keep += keep
        return definition

    def handle(self, channel, command, fn):
        """Registers fn(tx) -> dict|None as the handler of command on channel (before
        launch)."""
        bch, bcmd = _b(channel, "channel", True), _b(command, "command", True)
        if not callable(fn):
            raise TypeError("the handler must be callable")
        h = _make_handler(self, fn, "%s/%s" % (channel, command))

        def run(p):
            rc = f.saga_node_handle(p, bch, bcmd, h, None)
            if rc != 0:
                raise _err(rc, "handler for %s on %s" % (command, channel), _errmsg(p))
        self._on_loop(run, "handle")
        self._keep.append(h)
        self._handlers[(channel, command)] = fn
        return fn

    def handler(self, channel, command):
        """Decorator: ``@node.handler("payment", "payment.charge")``."""
        return lambda fn: self.handle(channel, command, fn)

    def subscribe_events(self, channel):
        """Receives the events other nodes publish to channel (their event_channel) into
        this node's event callbacks and streams, with their data (before launch)."""
        bch = _b(channel, "channel", True)

        def run(p):
            rc = f.saga_node_subscribe_events(p, bch, self._remote_event_cb, None)
            if rc != 0:
                raise _err(rc, "subscribing to events on %s" % channel, _errmsg(p))
        self._on_loop(run, "subscribe_events")

    def launch(self):
        """Recovery and start (saga_node_start): subscribes the channels, resumes sagas in
        flight. Returns the number of in-flight sagas whose definition is not registered."""
        with self._lock:
            if self._launched:
                return 0
            self._launched = True
        missing = ctypes.c_uint64(0)

        def run(p):
            rc = f.saga_node_start(p, ctypes.byref(missing))
            if rc != 0:
                raise _err(rc, "starting node %r" % self.name, _errmsg(p))
        try:
            self._on_loop(run, "launch")
        except BaseException:
            self._launched = False
            raise
        return missing.value

    # -- sagas --
    def start(self, definition, data=None, key=None, *, traceparent=None, timeout=None):
        """Starts a saga of definition (a Definition or its name) with data (a dict of str to
        bytes/str/int) and an optional idempotency key. Returns a Saga once it is durable."""
        name = definition.name if isinstance(definition, Definition) else definition
        bname = _b(name, "definition", required=True)
        bkey, btp = _b(key, "key"), _b(traceparent, "traceparent")
        d = _data_new(data)

        def run(p, fut):
            def done(nodeptr, status, sid, existed):
                if status == 0:
                    fut.set(Saga(self, sid.decode(), bool(existed)))
                else:
                    fut.fail(_err(status, "starting a saga of %r" % name))
            t = _token(done)
            try:
                rc = f.saga_start_traced(p, bname, d, bkey, btp, _start_cb, t)
            finally:
                f.saga_data_free(d)
            if rc != 0:
                _pending.pop(t, None)
                raise _err(rc, "starting a saga of %r" % name, _errmsg(p))
        try:
            fut = self._post(run, "start")
        except BaseException:
            f.saga_data_free(d)
            raise
        return fut.wait(timeout)

    def saga(self, saga_id):
        """A Saga handle for an id (checked with get())."""
        self.get(saga_id)
        return Saga(self, saga_id)

    def get(self, saga_id):
        """The committed state of a saga: a SagaInfo; NotFound when unknown."""
        sid = _b(saga_id, "saga id", True)

        def run(p, fut):
            out = ctypes.POINTER(f.Info)()
            rc = f.saga_get(p, sid, ctypes.byref(out))
            if rc != 0:
                raise _err(rc, "saga %s" % saga_id, _errmsg(p))
            try:
                i = out.contents
                d = lambda s: s.decode("utf-8", "replace") if s else ""  # noqa: E731
                fut.set(SagaInfo(i.id.decode(), d(i.definition), i.version, State(i.state),
                                 i.step, i.attempt, d(i.error), _data_dict(i.data),
                                 i.created_ms, i.updated_ms, i.deadline_ms))
            finally:
                f.saga_info_free(out)
        return self._post(run, "get").wait()

    def _operator(self, cfn, saga_id, what):
        sid = _b(saga_id, "saga id", True)

        def run(p, fut):
            def done(nodeptr, status):
                if status == 0:
                    fut.set(None)
                else:
                    fut.fail(_err(status, "%s %s" % (what, saga_id)))
            t = _token(done)
            rc = cfn(p, sid, _done_cb, t)
            if rc != 0:
                _pending.pop(t, None)
                raise _err(rc, "%s %s" % (what, saga_id), _errmsg(p))
        self._post(run, what).wait()

    def cancel(self, saga_id):
        """Aborts a RUNNING saga into compensation; StateError past its pivot."""
        self._operator(f.saga_cancel, saga_id, "cancel")

    def retry(self, saga_id):
        """Resumes a FAILED saga's compensation; StateError when it is not FAILED."""
        self._operator(f.saga_retry_failed, saga_id, "retry")

    def _watch(self, saga_id):
        sid = _b(saga_id, "saga id", True)
        result = Future()

        def run(p, fut):
            def done(nodeptr, status, state):
                if status == 0:
                    result.set(State(state))
                else:
                    result.fail(_err(status, "waiting for saga %s" % saga_id))
            t = _token(done)
            rc = f.saga_node_watch(p, sid, _watch_cb, t)
            if rc != 0:
                _pending.pop(t, None)
                raise _err(rc, "waiting for saga %s" % saga_id, _errmsg(p))
            fut.set(None)
        self._post(run, "watch").wait()
        return result

    # -- events --
    def on_event(self, fn):
        """Calls fn(event) for every transition (on a dispatcher thread of the node's own, so
        fn may call the node). Usable as a decorator."""
        if not callable(fn):
            raise TypeError("on_event takes a callable")
        self._check()
        with self._lock:
            if self._dispatcher is None:
                self._dispatch_q = queue.Queue()
                self._dispatcher = threading.Thread(target=self._dispatch, daemon=True,
                                                    name="libsaga-events-" + self.name)
                self._dispatcher.start()
            self._callbacks.append(fn)
        return fn

    def events(self, maxsize=0):
        """An EventStream: iterate over the node's events from now on."""
        self._check()
        s = EventStream(self, maxsize)
        self._streams.add(s)
        return s

    # -- inspection --
    def stats(self):
        """The node's counters (saga_node_stats) as a dict."""
        st = f.NodeStats()
        self._on_loop(lambda p: f.saga_node_stats_get(p, ctypes.byref(st), ctypes.sizeof(st)),
                      "stats")
        out = {k: getattr(st, k) for k, _ in f.NodeStats._fields_}
        out["step_latency"] = list(st.step_latency)
        return out

    def count_by_state(self):
        """{State: number of sagas} from the database."""
        arr = (ctypes.c_int64 * 6)()

        def run(p):
            rc = f.saga_node_count_by_state(p, arr)
            if rc != 0:
                raise _err(rc, "count_by_state", _errmsg(p))
        self._on_loop(run, "count_by_state")
        return {State(s): arr[s] for s in range(1, 6)}

    def outbox_depth(self):
        """Outbox rows not yet confirmed."""
        n = self._on_loop(f.saga_node_outbox_depth, "outbox_depth")
        if n < 0:
            raise _err(int(n), "outbox_depth")
        return n

    def metrics(self):
        """The node's metrics in the Prometheus text format (saga_node_metrics)."""
        def run(p):
            out = ctypes.c_void_p()
            n = ctypes.c_size_t()
            rc = f.saga_node_metrics(p, ctypes.byref(out), ctypes.byref(n))
            if rc != 0:
                raise _err(rc, "metrics", _errmsg(p))
            try:
                return ctypes.string_at(out.value, n.value).decode("utf-8", "replace")
            finally:
                f.saga_free(None, out)
        return self._on_loop(run, "metrics")

    def connected(self):
        """True when the transport is open and connected."""
        return self._on_loop(f.saga_node_transport_connected, "connected") == 1

    def tcp_stats(self):
        """The TCP transport's counters (saga_tcp_stats_get) as a dict."""
        if not isinstance(self._transport, Tcp):
            raise TypeError("node %r does not use the TCP transport" % self.name)
        st = f.TcpStats()

        def run(p):  # the node owns the transport; the pointer is valid while it is open
            rc = f.saga_tcp_stats_get(self._tpt, ctypes.byref(st), ctypes.sizeof(st))
            if rc != 0:
                raise _err(rc, "tcp_stats")
        self._on_loop(run, "tcp_stats")
        return {k: getattr(st, k) for k, _ in f.TcpStats._fields_}

    def execute(self, sql, params=None):
        """Runs SQL on the node's own connection (saga_node_db), on the loop thread between
        the node's transactions: for the application's writes that belong to no saga
        (schema, reference data). Returns the rows changed."""
        return self._on_loop(lambda p: _sqlite.run(f.saga_node_db(p), sql, params, False),
                             "execute")

    def query(self, sql, params=None):
        """A query on the node's own connection (saga_node_db); a list of tuples."""
        return self._on_loop(lambda p: _sqlite.run(f.saga_node_db(p), sql, params, True),
                             "query")

    # -- closing --
    def close(self):
        """Closes the node (sagas in flight stay in the database and resume at the next
        launch); waiters get ClosedError. Idempotent."""
        if self._loop.on_loop():
            raise RuntimeError("node %r cannot be closed from its loop thread" % self.name)
        with self._lock:
            if self._closed:
                return
            self._closed = True
        done = Future()
        t = _token(lambda: done.set(None))
        self._loop.call(lambda: f.saga_node_close(self._ptr, _close_cb, t))
        done.wait()
        _nodes.discard(self)
        if self._hub is not None:
            self._hub._nodes.discard(self)
        for s in list(self._streams):
            s.close()
        if self._dispatcher is not None:
            self._dispatch_q.put(None)
            if threading.current_thread() is not self._dispatcher:
                self._dispatcher.join()
        if self._own_loop:
            self._loop.stop()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "Node(%r%s)" % (self.name, ", closed" if self._closed else "")


@atexit.register
def _close_all():
    """At exit, close what is still open, so no loop thread calls into a finalising
    interpreter."""
    for n in list(_nodes):
        try:
            n.close()
        except BaseException:
            pass
    for h in list(_hubs):
        try:
            h.close()
        except BaseException:
            pass
