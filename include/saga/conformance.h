/**
 * @file
 * libsaga — the transport conformance kit.
 *
 * Runs a fixed set of checks against any transport adapter, so that a user who writes an
 * adapter can tell whether the core can rely on it. Every adapter shipped with libsaga passes
 * it (see tests/test_conformance_*.c). The kit creates transports through the medium
 * described below, drives them directly through the adapter interface (with a host of its
 * own, no node) and then runs real sagas across two nodes over them.
 *
 * Node and channel names the kit uses (a medium that routes by name must know them):
 *   nodes "conf-a" and "conf-b"; node "conf-b" also consumes channel "conf-ch".
 *   "conf-a" consumes its own name only. A medium may be asked for "conf-b" again after the
 *   first one was closed (a restarted node): it must receive what is addressed to "conf-b"
 *   and "conf-ch" from then on.
 *
 * The medium's kind (saga_medium_kind) says who keeps a message between its sender and its
 * receiver, and so what the checks expect of confirmations and redeliveries:
 *  - SAGA_MEDIUM_BROKERLESS (TCP, in-memory, in-process, the example UDP adapter): nothing
 *    keeps it. The sender is told a message is safe only once the receiving node acknowledged
 *    it; a delivery left unacknowledged is lost with its consumer, and the sender's outbox,
 *    never told, sends it again until a consumer acknowledges it.
 *  - SAGA_MEDIUM_BROKER (NATS JetStream, Redis Streams): the medium stores every message and
 *    confirms it once stored, whether or not a consumer is there; it delivers again any
 *    delivery left unacknowledged (after redelivery_ms), to whichever consumer of the channel
 *    is there then. The sender never has to resend what was confirmed.
 *  - SAGA_MEDIUM_STORE_AND_FORWARD: a relay keeps messages for an absent receiver and forwards
 *    them when it is back. It may confirm a message once the relay stored it, or only after the
 *    receiver acknowledged it; what it confirmed it must itself deliver again after a consumer
 *    crashed, and what it did not confirm the sender's outbox resends.
 *
 * Checks, each reported by name, in this order:
 *  - delivery: a message sent to a channel reaches its subscriber, bytes intact.
 *  - can_send: (only when the adapter has can_send) the channels the kit sends to are
 *    reachable: conf-a to "conf-ch" and "conf-b", conf-b to "conf-a".
 *  - ack: the sender is told the message is safe once the receiver acknowledged it.
 *  - unacked: a delivery is never acknowledged and its subscriber closes. Brokerless: the
 *    sender was never told it was safe. Broker: the sender was told (the broker stored it) and
 *    a new subscriber gets it again. Store-and-forward: either of the two.
 *  - duplicates: the same message sent twice is tolerated (delivered once or twice) and
 *    confirmed.
 *  - order: (only when the medium promises it) 200 messages on one channel arrive in the order
 *    sent, duplicates aside.
 *  - consumer-crash: the consumer of "conf-ch" gets a message and is torn down at once,
 *    without acknowledging it (closed before the loop runs again after the delivery — for a
 *    broker, once the message is also confirmed —, its delivery records dropped: all a killed
 *    process leaves behind), and a new consumer for "conf-b" starts. The new consumer must get
 *    the message and, once it acknowledges, the sender must be told it is safe. Brokerless:
 *    the sender must not have been told before (the kit, as the sender's outbox would,
 *    resends every 200 ms while it is not, and the resend reaches the new consumer). Broker:
 *    the broker stored and confirmed it before the crash and redelivers it with no resend.
 *    Store-and-forward: what was confirmed comes again with no resend, what was not comes
 *    through the resends.
 *  - peer-gone: a message sent while the receiver is away reaches it when it is back.
 *    Brokerless: not confirmed while the receiver is away, delivered by the resends. Broker:
 *    confirmed while the receiver is away, delivered with no resend. Store-and-forward:
 *    either, as for consumer-crash.
 *  - outage: (only when the medium can stop) while the medium is stopped nothing is confirmed;
 *    after it restarts, a resend is delivered and confirmed.
 *  - close: closing sender and receiver with messages in flight calls
 *    saga_transport_closed() exactly once each and nothing after it, and so did every
 *    earlier close of the run.
 *  - sagas: 60 sagas over two nodes on this medium (a third of them compensated) all finish,
 *    each step's effect exactly once.
 *  - sagas-crash: 60 more sagas; once the participant node ("conf-b") ran 70 handlers (every
 *    first step and some second ones, of 200 runs in all), it is closed with the rest of its
 *    work in flight and opened again on the same database with a new transport. Every saga
 *    still finishes, each step's effect exactly once.
 *
 * Thread: everything runs on the loop given, which the kit runs itself (uv_run); the loop must
 * have no other active handles. The kit uses real time: allow it several seconds (a broker's
 * redelivery_ms several times over).
 */
#ifndef SAGA_CONFORMANCE_H
#define SAGA_CONFORMANCE_H

#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uv_loop_s; /* from uv.h, declared here so this header stands alone */

/** Who keeps a message between sender and receiver (see the file's description). */
typedef enum saga_medium_kind {
  /** Nothing does: confirmed after the receiver acknowledged, resent by the outbox until
   * then (TCP, in-memory). */
  SAGA_MEDIUM_BROKERLESS = 1,
  /** The medium stores, confirms on storage and redelivers what was not acknowledged (NATS
   * JetStream, Redis Streams). */
  SAGA_MEDIUM_BROKER = 2,
  /** A relay keeps messages for an absent receiver and forwards them when it is back. */
  SAGA_MEDIUM_STORE_AND_FORWARD = 3
} saga_medium_kind;

/** The saga_conformance_medium2.struct_version of this header. */
#define SAGA_CONFORMANCE_MEDIUM_VERSION 1

/** How the kit makes transports on the medium under test, and what the medium is and
 * promises. Versioned: fields are only appended, under a new struct_version (docs/abi.md). */
typedef struct saga_conformance_medium2 {
  int struct_version;      /**< SAGA_CONFORMANCE_MEDIUM_VERSION */
  saga_medium_kind kind;   /**< required: what the checks expect (0 is refused) */
  /** Creates a new transport for node `node` ("conf-a" or "conf-b"). */
  int (*create)(void *ctx, const char *node, saga_transport **out);
  /** Optional (NULL to skip "outage"): makes the medium unavailable, e.g. kills the broker
   * or stops the peer's listener, and returns when it is down. */
  int (*stop)(void *ctx);
  /** Optional: makes it available again and returns when it is up. */
  int (*restart)(void *ctx);
  void *ctx;               /**< passed to create, stop and restart */
  int ordered;             /**< the adapter promises per-channel order */
  uint32_t redelivery_ms;  /**< how long the medium (a broker, a relay) takes to deliver
                                again a delivery left unacknowledged; added to the patience
                                where the kit waits for that; 0 for brokerless ones */
  uint32_t timeout_ms;     /**< patience for each expected event; default 5000 */
  const char *db_dir;      /**< folder for the "sagas" checks' databases (must exist);
                                NULL skips them */
} saga_conformance_medium2;

/**
 * Runs every check against the medium m. Writes one line per check ("PASS name" / "FAIL
 * name: why" / "SKIP name: why") into report (reportlen bytes, may be 0; a report too short
 * is cut) and returns the number of checks that failed (0 = conformant), or a negative code
 * if the kit itself could not run: SAGA_EINVAL for a NULL loop, m or m->create, a
 * struct_version below 1 or a kind out of range; SAGA_EVERSION for a struct_version newer
 * than this library's.
 */
SAGA_EXTERN int saga_conformance_run2(struct uv_loop_s *loop, const saga_conformance_medium2 *m,
                                      char *report, size_t reportlen);

/** The first description of a medium, without a kind, for saga_conformance_run(). Frozen
 * (docs/abi.md): new programs use saga_conformance_medium2. */
typedef struct saga_conformance_medium {
  /** Creates a new transport for node `node` ("conf-a" or "conf-b"). */
  int (*create)(void *ctx, const char *node, saga_transport **out);
  /** Optional (NULL to skip "outage"): makes the medium unavailable. */
  int (*stop)(void *ctx);
  /** Optional: makes it available again and returns when it is up. */
  int (*restart)(void *ctx);
  void *ctx;               /**< passed to create, stop and restart */
  int ordered;             /**< the adapter promises per-channel order */
  uint32_t redelivery_ms;  /**< nonzero: a broker (SAGA_MEDIUM_BROKER) that redelivers after
                                this long; 0: brokerless (SAGA_MEDIUM_BROKERLESS) */
  uint32_t timeout_ms;     /**< patience for each expected event; default 5000 */
  const char *db_dir;      /**< folder for the "sagas" checks' databases (must exist) */
} saga_conformance_medium;

/**
 * saga_conformance_run2() for a medium described the first way: the kind is
 * SAGA_MEDIUM_BROKER when m->redelivery_ms is nonzero, SAGA_MEDIUM_BROKERLESS otherwise
 * (store-and-forward media need saga_conformance_run2()). Same checks, report and result.
 */
SAGA_EXTERN int saga_conformance_run(struct uv_loop_s *loop, const saga_conformance_medium *m,
                                     char *report, size_t reportlen);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_CONFORMANCE_H */
