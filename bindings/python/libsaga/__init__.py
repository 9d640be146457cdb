"""libsaga for Python: sagas with a transactional outbox and inbox, over the libsaga C library.

    from libsaga import Node, Memory, MemoryHub, Definition, Step, Refused

    with MemoryHub() as hub, Node("shop", ":memory:", transport=Memory(hub)) as node:
        @node.handler("payment", "payment.charge")
        def charge(tx):
            tx.execute("INSERT INTO payments VALUES (?, ?)", (tx.saga_id, tx.int("total")))
            return {"paid": "yes"}
        node.register(Definition("buy", [Step("PAY", channel="payment",
                                              action="payment.charge")]))
        saga = node.start("buy", {"total": 12})
        print(saga.result(timeout=10))        # State.COMPLETED

See bindings/python/README.md and docs/bindings.md.
"""
from ._api import (Definition, Event, EventStream, Kind, Memory, MemoryHub, Nats, Node, Redis,
                   Retry, Saga, SagaInfo, State, Step, Tcp, Transaction, FOREVER, NO_TIMEOUT,
                   library_version)
from .errors import (ClosedError, Conflict, InvalidArgument, NotFound, OutOfMemory, Refused,
                     SagaError, SQLiteError, StateError, StoreError, TransportError,
                     VersionError)

__version__ = "0.2.0"
__all__ = [
    "Definition", "Event", "EventStream", "Kind", "Memory", "MemoryHub", "Nats", "Node", "Redis",
    "Retry", "Saga", "SagaInfo", "State", "Step", "Tcp", "Transaction", "FOREVER", "NO_TIMEOUT",
    "library_version", "ClosedError", "Conflict", "InvalidArgument", "NotFound", "OutOfMemory",
    "Refused", "SagaError", "SQLiteError", "StateError", "StoreError", "TransportError",
    "VersionError",
]
