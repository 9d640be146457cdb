"""Exceptions raised by the libsaga binding, one class per family of ``SAGA_E*`` codes."""

__all__ = [
    "SagaError", "InvalidArgument", "NotFound", "Conflict", "StateError", "StoreError",
    "TransportError", "VersionError", "OutOfMemory", "ClosedError", "Refused", "SQLiteError",
    "error_for",
]


class SagaError(Exception):
    """A libsaga call failed. ``code`` is the negative ``SAGA_E*`` value, ``name`` its name
    without the prefix (``"EINVAL"``), and the message the node's detail when it had one."""

    def __init__(self, message, code=None, name=None):
        super().__init__(message)
        self.code = code
        self.name = name


class InvalidArgument(SagaError, ValueError):
    """EINVAL, EDEFINITION, EMALFORMED, ETOOBIG: the call's arguments were refused."""


class NotFound(SagaError, LookupError):
    """ENOTFOUND, ENODEF, ENOHANDLER: no such saga, definition or handler."""


class Conflict(SagaError):
    """EEXIST: already registered or already exists."""


class StateError(SagaError):
    """ESTATE, EBUSY, EEXPIRED: not allowed now (node not started, saga past its pivot, ...)."""


class StoreError(SagaError):
    """ESTORE, EFULL, EREADONLY, ESCHEMA, EIO, ECORRUPT: the SQLite database failed."""


class TransportError(SagaError):
    """ETRANSPORT: the transport failed."""


class VersionError(SagaError):
    """EVERSION: a config or definition version the library does not know."""


class OutOfMemory(SagaError, MemoryError):
    """ENOMEM."""


class ClosedError(SagaError):
    """ECLOSED: the node is closing or closed."""


class Refused(SagaError):
    """EREFUSED. Raise ``Refused("reason")`` from a handler for a business failure: the
    handler's writes are rolled back and the saga retries or compensates."""

    def __init__(self, reason="refused"):
        super().__init__(str(reason), -12, "EREFUSED")
        self.reason = str(reason)


class SQLiteError(StoreError):
    """A statement of ``tx.execute()``/``tx.query()`` failed: ``sqlite_code`` is SQLite's
    extended result code."""

    def __init__(self, message, sqlite_code):
        super().__init__(message, -5, "ESTORE")
        self.sqlite_code = sqlite_code


_FAMILY = {
    "EINVAL": InvalidArgument, "EDEFINITION": InvalidArgument, "EMALFORMED": InvalidArgument,
    "ETOOBIG": InvalidArgument,
    "ENOTFOUND": NotFound, "ENODEF": NotFound, "ENOHANDLER": NotFound,
    "EEXIST": Conflict,
    "ESTATE": StateError, "EBUSY": StateError, "EEXPIRED": StateError,
    "ESTORE": StoreError, "EFULL": StoreError, "EREADONLY": StoreError, "ESCHEMA": StoreError,
    "EIO": StoreError, "ECORRUPT": StoreError,
    "ETRANSPORT": TransportError,
    "EVERSION": VersionError,
    "ENOMEM": OutOfMemory,
    "ECLOSED": ClosedError,
}


def error_for(code, name, text, detail="", what=""):
    """The exception for a negative code: its family's class, message
    ``"<what>: <text> (E<NAME>): <detail>"``."""
    msg = "%s (%s)" % (text, name)
    if what:
        msg = "%s: %s" % (what, msg)
    if detail:
        msg = "%s: %s" % (msg, detail)
    if name == "EREFUSED":
        e = Refused(detail or text)
        e.args = (msg,)
        return e
    return _FAMILY.get(name, SagaError)(msg, code, name)
