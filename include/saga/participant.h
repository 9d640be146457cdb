/**
 * @file
 * libsaga — participants: handlers for commands, run inside the participant's transaction.
 *
 * A handler is registered per (channel, command) with saga_node_handle(). When a command
 * arrives the node opens a savepoint inside its write transaction and calls the handler,
 * which does its business writes on saga_tx_db(tx) and fills the reply. The business
 * writes, the inbox record (message id + reply) and the outgoing reply commit together; the
 * delivery is acknowledged to the transport only after that commit. Consequences:
 *   - a duplicate command (same message id) never runs the handler again; the recorded reply
 *     is sent again;
 *   - a later attempt of an action that already succeeded gets the recorded reply;
 *   - a compensation for an action this node never applied runs no handler and leaves a
 *     tombstone, so the action, should it arrive late, is refused without running.
 *
 * Handler return values:
 *   SAGA_OK            success; the reply's data is merged into the saga's data;
 *   saga_reply_fail()  a business refusal (returns SAGA_EREFUSED); the handler's writes are
 *                      rolled back; the saga retries or compensates per its definition;
 *   SAGA_ENOMEM, SAGA_EBUSY, SAGA_EIO, SAGA_EFULL
 *                      transient: the handler's writes are rolled back and nothing of the
 *                      command is recorded or acknowledged, so it is delivered again later;
 *   any other < 0      a technical failure: writes rolled back, the message is recorded in
 *                      the dead-letter table and a failure reply is sent, so the saga never
 *                      hangs on it.
 *
 * "Never runs again" is about committed work: a handler can be called in a transaction that
 * is then rolled back (a crash or commit failure, or another item of the same group commit
 * failing half-way, after which the node runs the group again with a savepoint per item), and
 * then once more. Its database writes count once; effects outside the database should be
 * idempotent.
 *
 * Key your effects on the saga, not on the payload. A command's data is whatever its sender
 * wrote; its saga id and step (saga_msg_saga_id(), saga_msg_step()) are those of the saga the
 * handler serves, which the node already uses to run each step at most once. Record the saga
 * id and step with every business row an action writes, and have its compensation find what
 * to undo by them: a compensation may only undo what its own saga did. A compensation that
 * looks its rows up by an id in its data (an order number, a purchase id) undoes whatever a
 * sender names, including another saga's completed work; one keyed on its saga and step
 * undoes at most what that saga's action did, and nothing when it did nothing. Likewise an
 * action whose business key (an order number) already belongs to another saga should refuse
 * rather than answer success. docs/security.md has the trust model this is part of; the
 * example shop (docs/shop.md) does it for reservations, orders and payments.
 *
 * Thread: handlers run on the node's loop thread. Every pointer passed to a handler is
 * borrowed for the call only.
 */
#ifndef SAGA_PARTICIPANT_H
#define SAGA_PARTICIPANT_H

#include "common.h"
#include "data.h"

#ifdef __cplusplus
extern "C" {
#endif

struct sqlite3; /* from sqlite3.h, declared here so this header stands alone */


/** The node's transaction a handler runs in (opaque): saga_tx_db() is its database. */
typedef struct saga_tx saga_tx;
/** The command a handler serves (opaque; read with the saga_msg_* functions). */
typedef struct saga_msg saga_msg;
/** The reply a handler builds (opaque; written with the saga_reply_* functions). */
typedef struct saga_reply saga_reply;

/** A command handler. See the file comment for the return values. */
typedef int (*saga_handler)(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg);

/**
 * The node's SQLite connection, inside the open savepoint. Do not COMMIT, ROLLBACK or
 * RELEASE on it, and do not keep it after the handler returns.
 */
SAGA_EXTERN struct sqlite3 *saga_tx_db(saga_tx *tx);

/** The saga id of the command (NUL-terminated, borrowed). */
SAGA_EXTERN const char *saga_msg_saga_id(const saga_msg *m);
/** The command name. */
SAGA_EXTERN const char *saga_msg_command(const saga_msg *m);
/** The message id (unique per saga, step, phase and attempt). */
SAGA_EXTERN const char *saga_msg_id(const saga_msg *m);
/** Index of the step in its definition. */
SAGA_EXTERN uint32_t saga_msg_step(const saga_msg *m);
/** Attempt number, from 1. */
SAGA_EXTERN uint32_t saga_msg_attempt(const saga_msg *m);
/** Nonzero when this is a compensation. */
SAGA_EXTERN int saga_msg_is_compensation(const saga_msg *m);
/** The saga's data as sent with the command. Never NULL. */
SAGA_EXTERN const saga_data *saga_msg_data(const saga_msg *m);
/** A header value as received (e.g. "traceparent": the sender's step attempt), or NULL. It
 * came from the network: a handler that uses a header checks it (saga_traceparent_check()). */
SAGA_EXTERN const char *saga_msg_header(const saga_msg *m, const char *name);
/**
 * The trace context of this handler run (saga/trace.h): "00-<trace id>-<span id>-<flags>",
 * whose span id is the handler's own span (reported to saga_node_config.on_span), a child of
 * the step attempt named by the command's traceparent header. When that header is missing or
 * malformed it is never used: the trace id is then the saga id and the span has no parent.
 * Pass it on (as a traceparent header) to the calls the handler makes. Never NULL.
 */
SAGA_EXTERN const char *saga_msg_traceparent(const saga_msg *m);

/**
 * Starts a saga of definition `name` (registered on this node) inside the handler's
 * transaction: it exists if and only if the handler's work commits, so a command can start a
 * saga exactly once. The new saga is in the handler's trace: its span is a child of the
 * handler's span (saga_msg_traceparent()). idem_key as for saga_start() (an existing saga with that key is not
 * started again: *existed is set to 1). The new or existing saga id is copied into id_out
 * (at least 40 bytes). Returns SAGA_OK, SAGA_ENODEF, SAGA_EINVAL, SAGA_ENOMEM, SAGA_ESTORE.
 */
SAGA_EXTERN int saga_tx_start(saga_tx *tx, const char *name, const saga_data *input,
                              const char *idem_key, char *id_out, size_t id_len, int *existed);

/**
 * Adds key=value to the reply's data (merged into the saga data on success). SAGA_ETOOBIG
 * (nothing added) when the value is above the saga data limit or the key would give the reply
 * more than saga_limits.max_data_entries entries; after the handler returns, a reply that
 * would make the merged saga data exceed those limits fails the step with that reason and
 * rolls the handler's writes back (docs/api.md, "Limits").
 */
SAGA_EXTERN int saga_reply_set(saga_reply *r, const char *key, const void *val, size_t len);
/** Adds a text value to the reply's data. */
SAGA_EXTERN int saga_reply_set_str(saga_reply *r, const char *key, const char *val);
/** Adds a decimal integer to the reply's data. */
SAGA_EXTERN int saga_reply_set_i64(saga_reply *r, const char *key, int64_t v);
/**
 * Marks the reply as a business failure with a reason (copied, truncated to 512 bytes).
 * Returns SAGA_EREFUSED so a handler can `return saga_reply_fail(r, "why");`.
 */
SAGA_EXTERN int saga_reply_fail(saga_reply *r, const char *reason);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_PARTICIPANT_H */
