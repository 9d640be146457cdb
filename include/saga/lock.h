/**
 * @file
 * libsaga — semantic locks: a business record marked as held by a saga while the saga runs.
 *
 * A saga's steps commit one by one, so other requests can see a record half-way through a
 * saga (an order created but not yet approved). A semantic lock is the countermeasure: the
 * step that creates or changes the record marks it as held by its saga, and other sagas and
 * other requests touching that record see it is held and refuse (or wait and retry) with a
 * clear reason. A lock is a row of the table saga_lock in the participant's database
 * (type, id, holding saga, the step that took it), written in the handler's transaction:
 *
 *  - it commits with the step's business writes, its inbox record and its reply, or not at
 *    all: a handler that refuses or fails holds nothing, a crash before the commit holds
 *    nothing, and a committed lock survives restarts;
 *  - it is released, in the transaction that does it:
 *      1. explicitly by a later step of the same saga on the same database:
 *         saga_lock_release() or saga_lock_release_all() (e.g. approveOrder);
 *      2. automatically when this node handles the compensation of the step that took it
 *         and the compensation succeeds (the locks that step's action took, on this
 *         database, go with the compensation's own writes);
 *      3. automatically on the orchestrator's node when the saga ends COMPLETED or
 *         COMPENSATED: every lock the saga holds in the orchestrator's database (its local
 *         steps, or participants sharing that node) is released.
 *    Nothing else releases a lock. A participant never learns on its own that a saga ended,
 *    so a lock taken by a step that is never compensated is held until a later step releases
 *    it. A saga that ends FAILED keeps its locks: they stay visible (the view saga_lock_view,
 *    `sagactl locks DB`) until its repair (saga_retry_failed() or an operator's retry) runs
 *    the compensations, which release them.
 *
 * Other code tests a record with saga_lock_holder() on any connection to the database,
 * including an application's own transaction outside any saga (check, then write, in one
 * BEGIN IMMEDIATE transaction, so no step can take the lock in between).
 *
 * Limits: type is 1..SAGA_LOCK_TYPE_MAX bytes, id 1..SAGA_LOCK_ID_MAX bytes (checked by
 * every function here: SAGA_ETOOBIG); both are compared byte for byte.
 *
 * Thread: the saga_tx functions run on the node's loop thread, inside a handler, with the
 * handler's tx (never kept after it returns). saga_lock_holder() runs on whatever thread owns
 * the connection it is given.
 */
#ifndef SAGA_LOCK_H
#define SAGA_LOCK_H

#include "common.h"
#include "participant.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The longest lock type accepted, in bytes ("order", "ticket"). */
#define SAGA_LOCK_TYPE_MAX 64
/** The longest record id accepted, in bytes. */
#define SAGA_LOCK_ID_MAX 256
/** The size of a buffer that holds any holder's saga id (saga_lock_holder()). */
#define SAGA_LOCK_HOLDER_SIZE 40

/**
 * Marks the record (type, id) as held by the saga of the command the handler serves
 * (saga_msg_saga_id()), taken by its step, in the handler's transaction.
 *
 * Returns SAGA_OK when the lock is now held by this saga (also when it already was: taking
 * it again changes nothing, and it stays recorded under the step that took it first);
 * SAGA_ELOCKED when another saga holds it — nothing is written. A handler may return that
 * code as it is: the node then refuses the command as a business failure (as
 * saga_reply_fail() does) with the reason "<type> '<id>' is held by saga <holder> (step
 * <n>)", so the saga retries the step (a retriable step: the lock may be free by then) or
 * compensates. SAGA_EINVAL when tx, type or id is NULL or empty, or the saga id is not one
 * this library makes (longer than 39 bytes); SAGA_ETOOBIG when type or id is longer than
 * its limit; SAGA_ESTATE when tx is not a participant handler's (an event handler's or a
 * saga_node_transact() function's transaction serves no saga: test records there with
 * saga_lock_holder()); SAGA_ESTORE (or another store code) when the database failed.
 */
SAGA_EXTERN int saga_lock_acquire(saga_tx *tx, const char *type, const char *id);

/**
 * Releases (type, id) if the handler's saga holds it, in the handler's transaction (it is
 * taken again if the handler's writes are rolled back). Returns SAGA_OK when it was
 * released; SAGA_ENOTFOUND when nobody holds it; SAGA_ELOCKED when another saga holds it
 * (left as it is); SAGA_EINVAL, SAGA_ETOOBIG and SAGA_ESTATE as saga_lock_acquire().
 */
SAGA_EXTERN int saga_lock_release(saga_tx *tx, const char *type, const char *id);

/**
 * Releases every lock the handler's saga holds in this database, whichever step took it,
 * in the handler's transaction: for the last step of a saga on this participant. When
 * released is not NULL it gets how many were released (0 is not an error). Returns SAGA_OK,
 * SAGA_EINVAL (tx NULL), SAGA_ESTATE (not a participant handler's tx), or a store code.
 */
SAGA_EXTERN int saga_lock_release_all(saga_tx *tx, uint64_t *released);

/**
 * Who holds (type, id) in the libsaga database open on db: any connection to the file (a
 * handler's saga_tx_db(), or an application's own, inside its own transaction or not). On
 * SAGA_OK the holder's saga id is copied into saga_id (NUL-terminated; len at least
 * SAGA_LOCK_HOLDER_SIZE) — saga_id may be NULL to only test. Returns SAGA_OK when the record
 * is held, SAGA_ENOTFOUND when it is free, SAGA_EINVAL when db, type or id is NULL or empty
 * or len is too small, SAGA_ETOOBIG when type or id is longer than its limit, SAGA_EBUSY
 * when the database is locked, SAGA_ESTORE (or another store code) when the database cannot
 * be read: sqlite3_errmsg(db) says why ("no such table: saga_lock" for a database no node
 * of this version opened). Reads only; never writes.
 */
SAGA_EXTERN int saga_lock_holder(struct sqlite3 *db, const char *type, const char *id,
                                 char *saga_id, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_LOCK_H */
