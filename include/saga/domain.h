/**
 * @file
 * libsaga — domain events: published from any transaction of a node through its transactional
 * outbox, and handled by subscribers with exactly-once effects.
 *
 * Publishing. saga_tx_publish() writes an event (channel, name, key, data) into the node's
 * outbox inside a transaction: a participant handler's (saga_node_handle()), an event
 * handler's (saga_node_on_event()), or an application transaction that is no saga step,
 * run by saga_node_transact(). The event exists if and only if that transaction commits, and
 * the node's relay then sends it like every outbox row (resent until the receiver confirms
 * it). This is the outbox pattern without a change-data-capture pipeline: the application's
 * own writes and its events commit together.
 *
 * Every event gets an id (32 hex digits, unique) and, per (channel, key), a sequence number
 * 1, 2, 3, ... of its publisher, kept in the publisher's database in the same transaction.
 * The publisher is identified by a stream id made at random the first time its database
 * published (a database created again is a new stream).
 *
 * Subscribing. saga_node_on_event() registers a handler for the events of one name (or every
 * name) on a channel. A delivered event is handled in the subscriber's transaction:
 *  - exactly-once effects: the handler runs in a savepoint; its writes (on saga_tx_db()),
 *    the events it publishes, the sagas it starts (saga_tx_start()), the inbox record of the
 *    event id and the key's cursor commit together, and only then is the delivery
 *    acknowledged. A redelivered event (same id, or a sequence number at or below the key's
 *    cursor) runs nothing and is acknowledged again;
 *  - order per key: for each (publisher stream, channel, key) the handlers see the events in
 *    sequence order without gaps: event n+1 is handled only after event n was handled,
 *    skipped (no handler for its name) or dead-lettered. An event that arrives before its
 *    predecessor is left unacknowledged and comes again (the publisher's outbox resends it,
 *    a broker redelivers it); it is counted in saga_node_stats.events_held. Keys are
 *    independent: a held or failing key never delays another key;
 *  - failures: a handler that returns a transient code (SAGA_ENOMEM, SAGA_EBUSY, SAGA_EIO,
 *    SAGA_EFULL) is rolled back and the event is delivered again later, up to
 *    saga_node_config.max_deliveries times; then, or at once for any other error, the event
 *    goes to the dead-letter table with the reason, the key's cursor moves past it and the
 *    following events flow. An event whose bytes are malformed (not an envelope, no stream,
 *    no sequence number) is dead-lettered with the reason and acknowledged. Dead events are
 *    listed and replayed like other dead letters (sagactl dead-letters; a replay runs the
 *    handler once more, whatever the cursor says).
 *
 * A handler, like a participant's, can run in a transaction that is then rolled back (a crash
 * before the commit, another item of the same group commit failing) and run again: its
 * database writes count once; effects outside the database must be idempotent.
 *
 * Thread: the node's loop. docs/patterns.md, "Domain events and subscribers", shows the
 * patterns built on this.
 */
#ifndef SAGA_DOMAIN_H
#define SAGA_DOMAIN_H

#include "common.h"
#include "node.h"
#include "participant.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Longest channel, event name and key accepted by saga_tx_publish() and
 * saga_node_on_event(), in bytes. */
#define SAGA_EVENT_NAME_MAX 256u

/**
 * A domain event handed to a subscriber. Every pointer is borrowed for the handler call. The
 * library allocates it and the caller only reads it, so it may grow (docs/abi.md): never copy
 * it by value.
 */
typedef struct saga_domain_event {
  const char *id;      /**< the event's id: 32 hex digits, unique */
  const char *channel; /**< the channel it was published to */
  const char *name;    /**< the event name, e.g. "CoursePosted" */
  const char *key;     /**< its key ("" when published without one) */
  const void *data;    /**< the data as published (len bytes; not NUL-terminated) */
  size_t len;          /**< bytes at data */
  uint64_t seq;        /**< its sequence number among the publisher's events of this key */
  const char *source;  /**< the name of the publishing node, as it says (for logs) */
} saga_domain_event;

/**
 * An event handler (saga_node_on_event()). Runs inside the subscriber's transaction: write
 * with saga_tx_db(tx), publish with saga_tx_publish(tx, ...), start sagas with
 * saga_tx_start(tx, ...). Returns SAGA_OK (handled: everything commits together with the
 * event's inbox record), a transient code (SAGA_ENOMEM, SAGA_EBUSY, SAGA_EIO, SAGA_EFULL:
 * rolled back, delivered again later, dead-lettered after max_deliveries tries) or any other
 * negative code (rolled back, dead-lettered at once with the code and saga_node_errmsg()).
 * Like a participant handler, it must not COMMIT or ROLLBACK on saga_tx_db().
 */
typedef int (*saga_event_handler)(saga_tx *tx, const saga_domain_event *ev, void *arg);

/**
 * Publishes an event inside the transaction tx: it is written to the node's outbox (with its
 * id and its key's next sequence number) and sent to channel after tx commits; if tx rolls
 * back (a handler's failure or refusal, a saga_node_transact() function that returns an
 * error, a crash), it never existed. channel and name: 1..SAGA_EVENT_NAME_MAX bytes, channel
 * not "saga.local"; key: NULL or "" (one sequence for the whole channel) up to
 * SAGA_EVENT_NAME_MAX bytes; data: len bytes (NULL when len is 0) of any content, at most
 * saga_limits.max_message_bytes minus 4096. Checked here: SAGA_EINVAL (a bad argument) or
 * SAGA_ETOOBIG (data too large), with saga_node_errmsg() saying which; nothing is written.
 * Also SAGA_ENOMEM, SAGA_ESTATE (the node's store keeps no events), or a store error (the
 * caller should return it: the transaction is then rolled back).
 */
SAGA_EXTERN int saga_tx_publish(saga_tx *tx, const char *channel, const char *name,
                                const char *key, const void *data, size_t len);

/** A function run in a transaction of the node (saga_node_transact()): SAGA_OK commits what
 * it did, a negative code rolls it back. */
typedef int (*saga_transact_fn)(saga_tx *tx, void *arg);

/**
 * Runs fn(tx, arg) on the loop in a transaction of the node — an application transaction
 * that is not a saga step: its writes on saga_tx_db(tx), the events it publishes with
 * saga_tx_publish() and the sagas it starts with saga_tx_start() commit together or not at
 * all. fn runs inside a savepoint of the node's next group commit: if it returns an error,
 * everything it did is rolled back and nothing else of the group is affected. done (may be
 * NULL) runs once, after the commit: status SAGA_OK, fn's error, or the transaction's error
 * (then nothing fn did was committed). fn may run more than once when the group commit is
 * retried (its database writes count once; see saga/participant.h). fn must not COMMIT or
 * ROLLBACK on saga_tx_db(), nor keep tx. Returns SAGA_OK (done will run), SAGA_EINVAL,
 * SAGA_ESTATE (not started), SAGA_ECLOSED, SAGA_ENOMEM (done will not run).
 */
SAGA_EXTERN int saga_node_transact(saga_node *node, saga_transact_fn fn, void *arg,
                                   saga_done_cb done, void *done_arg);

/**
 * Subscribes handler fn to the domain events named `name` (NULL: every name without a
 * handler of its own) published to channel, with exactly-once effects and order per key
 * (see the file's description). Subscribes to channel at saga_node_start(); must be called
 * before it. A channel used here cannot also be the channel of saga_node_subscribe_events()
 * (saga lifecycle events). Events of a name nobody handles on the channel move the key's
 * cursor and are acknowledged. Returns SAGA_OK, SAGA_EINVAL (channel or name empty or longer
 * than SAGA_EVENT_NAME_MAX, "saga.local", NULL fn), SAGA_EEXIST (a handler for that channel
 * and name already, or the channel is the lifecycle-event channel), SAGA_ESTATE (started),
 * SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_node_on_event(saga_node *node, const char *channel, const char *name,
                                   saga_event_handler fn, void *arg);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_DOMAIN_H */
