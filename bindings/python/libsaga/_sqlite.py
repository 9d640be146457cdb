"""Statements on a SQLite connection libsaga hands out (saga_tx_db(), saga_node_db()), through
the SQLite C API of the very library libsaga uses: never a second connection."""
import ctypes
from collections.abc import Mapping

from . import _ffi as f
from .errors import SQLiteError

SQLITE_ROW = 100
SQLITE_DONE = 101
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _raise(db, what, rc=None):
    code = f.sqlite3_extended_errcode(db) if rc is None or rc not in (0, 100, 101) else rc
    msg = (f.sqlite3_errmsg(db) or b"").decode("utf-8", "replace")
    raise SQLiteError("%s: %s (SQLite code %d)" % (what, msg, code), code)


def _bind_one(db, st, i, v):
    if v is None:
        rc = f.sqlite3_bind_null(st, i)
    elif isinstance(v, bool) or isinstance(v, int):
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise OverflowError("SQL parameter %d: %d does not fit in 64 bits" % (i, v))
        rc = f.sqlite3_bind_int64(st, i, int(v))
    elif isinstance(v, float):
        rc = f.sqlite3_bind_double(st, i, v)
    elif isinstance(v, str):
        b = v.encode("utf-8")
        rc = f.sqlite3_bind_text(st, i, b, len(b), f.SQLITE_TRANSIENT)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        rc = f.sqlite3_bind_blob(st, i, b, len(b), f.SQLITE_TRANSIENT)
    else:
        raise TypeError("SQL parameter %d: cannot bind a %s (use None, int, float, str or "
                        "bytes)" % (i, type(v).__name__))
    if rc != 0:
        _raise(db, "binding parameter %d" % i, rc)


def _bind(db, st, params):
    n = f.sqlite3_bind_parameter_count(st)
    if isinstance(params, Mapping):
        for i in range(1, n + 1):
            name = f.sqlite3_bind_parameter_name(st, i)
            if name is None:
                raise ValueError("SQL parameter %d is positional; pass a sequence" % i)
            key = name.decode()[1:]
            if key not in params:
                raise ValueError("SQL parameter %s has no value" % name.decode())
            _bind_one(db, st, i, params[key])
        return
    if isinstance(params, (str, bytes)):
        raise TypeError("SQL parameters must be a sequence or a mapping, not %s" %
                        type(params).__name__)
    params = tuple(params)
    if len(params) != n:
        raise ValueError("the statement has %d parameters, %d given" % (n, len(params)))
    for i, v in enumerate(params, 1):
        _bind_one(db, st, i, v)


def _column(st, i):
    t = f.sqlite3_column_type(st, i)
    if t == 1:
        return f.sqlite3_column_int64(st, i)
    if t == 2:
        return f.sqlite3_column_double(st, i)
    if t == 5:
        return None
    if t == 3:
        p = f.sqlite3_column_text(st, i)
        n = f.sqlite3_column_bytes(st, i)
        return ctypes.string_at(p, n).decode("utf-8", "replace") if p else ""
    p = f.sqlite3_column_blob(st, i)
    n = f.sqlite3_column_bytes(st, i)
    return ctypes.string_at(p, n) if p else b""


def run(db, sql, params, want_rows):
    """Runs every statement of sql (params for a single statement only). Returns the rows of
    the last statement (a list of tuples) when want_rows, else the changes it made."""
    if not isinstance(sql, str):
        raise TypeError("sql must be a str, not %s" % type(sql).__name__)
    if not db:
        raise SQLiteError("no database connection", 21)
    raw = sql.encode("utf-8")
    buf = ctypes.create_string_buffer(raw)
    base = ctypes.addressof(buf)
    off = 0
    rows, changes, ran = [], 0, 0
    while off < len(raw):
        st = ctypes.c_void_p()
        tail = ctypes.c_void_p()
        rc = f.sqlite3_prepare_v2(db, ctypes.c_char_p(base + off), len(raw) - off,
                                  ctypes.byref(st), ctypes.byref(tail))
        if rc != 0:
            _raise(db, "preparing %r" % sql[:80], rc)
        nxt = (tail.value - base) if tail.value else len(raw)
        if not st.value:  # whitespace or a comment
            off = nxt
            continue
        try:
            more = raw[nxt:].strip()
            if params is not None and (ran > 0 or more and not more.startswith(b"--")):
                if params:
                    raise ValueError("parameters are only accepted for a single statement")
            if params:
                _bind(db, st, params)
            elif f.sqlite3_bind_parameter_count(st) > 0:
                raise ValueError("the statement has %d parameters, none given" %
                                 f.sqlite3_bind_parameter_count(st))
            rows = []
            while True:
                rc = f.sqlite3_step(st)
                if rc == SQLITE_ROW:
                    if want_rows:
                        n = f.sqlite3_column_count(st)
                        rows.append(tuple(_column(st, i) for i in range(n)))
                    continue
                if rc == SQLITE_DONE:
                    break
                _raise(db, "running %r" % sql[:80], rc)
            changes = f.sqlite3_changes(db)
        finally:
            f.sqlite3_finalize(st)
        ran += 1
        off = nxt
    return rows if want_rows else changes
