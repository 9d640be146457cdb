/**
 * @file
 * libsaga — the transport adapter interface, for adapter authors.
 *
 * An adapter is a struct whose first member is a `saga_transport`, plus a constant table of
 * methods. The shipped adapters (in-memory, TCP, NATS, Redis) are written against exactly
 * this header and nothing else of the core.
 *
 * The contract, in one paragraph: the node calls open() once with its loop, then
 * subscribe() for every channel it consumes, then send() for every outgoing message. The
 * adapter calls saga_transport_deliver() for every message that arrives on a subscribed
 * channel, with a delivery tag of its choosing; the node later calls ack(tag) — only after
 * the transaction that recorded the message committed. An unacknowledged delivery may be
 * delivered again (after a reconnect, a redelivery timeout, ...): the node tolerates
 * duplicates. For sends, the adapter calls saga_transport_sent(token, status) once the medium
 * has taken responsibility for the message (a broker stored it, or the receiving node
 * acknowledged it); only then is the node's outbox row deleted. If that never happens the
 * node sends the row again after its resend interval, forever, so an adapter may lose
 * messages it had not confirmed without losing anything for the user. The one exception: a
 * send() refused with a permanent code (SAGA_EINVAL, SAGA_ETOOBIG) moves the row to the
 * node's dead-letter table once. See docs/adapters.md and docs/security.md.
 *
 * Versioning: `version` is the first field of the methods table. The core reads the fields
 * that exist in that version and refuses newer versions it does not know (SAGA_EVERSION).
 * New methods are only ever appended. Version 1: open .. destroy; version 2 adds can_send;
 * version 3 adds connected.
 * Prefer designated initializers (.send = my_send) for the table: a positional one lacks
 * the appended fields when recompiled against a newer header (-Wmissing-field-initializers).
 *
 * Thread: every method is called on the node's loop thread, and the saga_transport_*
 * functions below must be called on it too (use a uv_async_t to get there from another
 * thread). Callbacks into the core may happen from inside a method (e.g. a synchronous
 * delivery during send()); the core handles that re-entrancy by queueing.
 */
#ifndef SAGA_SYS_TRANSPORT_H
#define SAGA_SYS_TRANSPORT_H

#include "../common.h"
#include "../transport.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uv_loop_s; /* from uv.h, declared here so this header stands alone */


/** The version of the methods table this header describes. Version 2 appended can_send(),
 * version 3 connected(). The core still accepts older tables and reads only their fields (a
 * version-1 adapter is taken to reach every channel, a version 1 or 2 adapter to be
 * connected whenever it is open). */
#define SAGA_TRANSPORT_VERSION 3

/** An adapter's methods: one constant table per adapter, pointed to by
 * saga_transport.methods. Versioned by its first field; methods are only appended. */
typedef struct saga_transport_methods {
  int version;      /**< SAGA_TRANSPORT_VERSION the adapter was written for */
  const char *name; /**< short adapter name for logs, e.g. "mem", "tcp" */

  /**
   * Starts I/O on loop. Called once, before any other method. Return SAGA_OK or a negative
   * code (the node's open then fails with it).
   */
  int (*open)(saga_transport *t, struct uv_loop_s *loop);

  /**
   * Starts consuming channel (NUL-terminated, borrowed for the call). Called after open(),
   * at most once per channel. Return SAGA_OK or a negative code.
   */
  int (*subscribe)(saga_transport *t, const char *channel);

  /**
   * Sends len bytes to channel. Both are borrowed for the call: copy what you keep.
   * Return SAGA_OK if the message was taken (confirmation follows with
   * saga_transport_sent()), or a negative code if it could not even be queued. `token` is
   * opaque; pass it back.
   *
   * The code says whether trying again can help:
   *  - permanent: SAGA_EINVAL (this transport can never deliver to channel: no route, a
   *    name it cannot carry) and SAGA_ETOOBIG (the message exceeds the medium's limit). The
   *    node moves the outbox row to its dead-letter table with the reason, once, and does not
   *    send it again; a command of a saga waiting for it fails (see docs/adapters.md).
   *  - transient: every other code, e.g. SAGA_EBUSY (queue full), SAGA_ETRANSPORT
   *    (disconnected), SAGA_ENOMEM, SAGA_ECLOSED, SAGA_ESTATE: the node logs it and sends the
   *    row again after its resend interval.
   * Return a permanent code only when the same message to the same channel would fail the
   * same way every time; when unsure, return a transient one.
   */
  int (*send)(saga_transport *t, const char *channel, const void *data, size_t len,
              uint64_t token);

  /**
   * The node committed the delivery `tag` (given by the adapter in
   * saga_transport_deliver()): acknowledge it to the medium. Must not fail; an adapter that
   * cannot acknowledge now must tolerate the redelivery that follows. An adapter may forget
   * a delivery once its medium redelivers it (e.g. after an ack wait); a later ack() of the
   * forgotten tag is then ignored — the redelivery is a duplicate the node tolerates.
   */
  void (*ack)(saga_transport *t, uint64_t tag);

  /**
   * Stops I/O. No saga_transport_* call may follow once close returns, except that the
   * adapter may finish asynchronously and then call saga_transport_closed(); it must call it
   * exactly once, from close() itself or later on the loop.
   */
  void (*close)(saga_transport *t);

  /** Frees the adapter's memory. Called after close completed, or for a never-opened one. */
  void (*destroy)(saga_transport *t);

  /* ---- version 2 ---- */

  /**
   * Optional (NULL = every channel can be reached). Returns 1 if this adapter can route
   * messages to channel (NUL-terminated, borrowed for the call), 0 if it never can — no
   * route, or a destination its access policy forbids. Called after open(), on the loop
   * thread, inside the node's transaction: it must be quick, must not block and must not
   * call any saga_transport_* function.
   *
   * A participant asks it for the reply_to of every command before running the handler:
   * a command whose reply could never be delivered is dead-lettered and acknowledged, and
   * the handler does not run. Answer 0 only for channels that send() would refuse with a
   * permanent code; a channel that may gain a consumer later (a broker subject, an
   * in-memory channel nobody subscribes to yet) is reachable.
   */
  int (*can_send)(saga_transport *t, const char *channel);

  /* ---- version 3 ---- */

  /**
   * Optional (NULL = connected whenever open). Returns 1 while messages can flow (connected
   * to the broker, subscriptions in place), 0 while they cannot (opened while the broker was
   * unreachable and not connected yet, or reconnecting). An adapter whose open() succeeds
   * with its broker down should have it: saga_node_transport_connected() reports it for
   * health checks. Called on the loop thread; must be quick and must not block.
   */
  int (*connected)(saga_transport *t);
} saga_transport_methods;

/**
 * The head of every adapter object. The adapter sets `methods`; the core owns the rest.
 */
struct saga_transport {
  const saga_transport_methods *methods; /**< the adapter's table, set by its constructor */
  void *saga__host; /**< the core's; do not touch */
};

/**
 * Hands a received message to the node. data/len are borrowed for the call (the node
 * copies). tag identifies this delivery for ack(). Returns SAGA_OK, or SAGA_ECLOSED when
 * the node is closing (do not ack; it will not be acked).
 */
SAGA_EXTERN int saga_transport_deliver(saga_transport *t, const char *channel, const void *data,
                                       size_t len, uint64_t tag);

/**
 * Reports that the message sent with `token` is safely with the medium (status SAGA_OK), or
 * definitely failed (status < 0: the node resends it later). Unknown or repeated tokens are
 * ignored, so reporting twice is harmless.
 */
SAGA_EXTERN void saga_transport_sent(saga_transport *t, uint64_t token, int status);

/**
 * Hands the node a message the adapter gives up on — e.g. one delivered more often than its
 * delivery cap — so that it is kept in the node's dead-letter table with the reason, instead
 * of blocking the channel. The node records it and then acknowledges `tag` with ack(), so
 * the medium can drop it. data/len/reason are borrowed for the call. Returns SAGA_OK or
 * SAGA_ECLOSED (node closing: do not ack).
 */
SAGA_EXTERN int saga_transport_dead_letter(saga_transport *t, const char *channel,
                                           const void *data, size_t len, uint64_t tag,
                                           const char *reason);

/** Reports that an asynchronous close() completed. */
SAGA_EXTERN void saga_transport_closed(saga_transport *t);

/** Logs through the node's log hook (no-op before open). msg is borrowed. */
SAGA_EXTERN void saga_transport_log(saga_transport *t, saga_log_level level, const char *msg);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_SYS_TRANSPORT_H */
