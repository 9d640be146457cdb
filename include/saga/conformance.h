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
 * Checks, each reported by name:
 *   delivery        a message sent to a channel reaches its subscriber, bytes intact
 *   can_send        (only when the adapter has can_send) the channels the kit sends to are
 *                   reachable: conf-a to "conf-ch" and "conf-b", conf-b to "conf-a"
 *   ack             the sender is told the message is safe once the receiver acknowledged it
 *   unacked         a delivery that was never acknowledged either comes again to a new
 *                   subscriber (a broker redelivers it) or its sender was never told it was
 *                   safe (a brokerless adapter: the sender's outbox will resend it)
 *   duplicates      the same message sent twice is tolerated (delivered once or twice) and
 *                   confirmed
 *   order           (only when the medium promises it) 200 messages on one channel arrive in
 *                   the order sent, duplicates aside
 *   close           closing sender and receiver with messages in flight calls
 *                   saga_transport_closed() exactly once each and nothing after it
 *   outage          (only when the medium can stop) while the medium is stopped nothing is
 *                   confirmed; after it restarts, a resend is delivered and confirmed
 *   sagas           60 sagas over two nodes on this medium (a third of them compensated) all
 *                   finish, each step's effect exactly once
 *
 * Thread: everything runs on the loop given, which the kit runs itself (uv_run); the loop must
 * have no other active handles. The kit uses real time: allow it a few seconds.
 */
#ifndef SAGA_CONFORMANCE_H
#define SAGA_CONFORMANCE_H

#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uv_loop_s; /* from uv.h, declared here so this header stands alone */

/** How the kit makes transports on the medium under test, and what the medium promises.
 * Frozen (docs/abi.md). */
typedef struct saga_conformance_medium {
  /** Creates a new transport for node `node` ("conf-a" or "conf-b"). */
  int (*create)(void *ctx, const char *node, saga_transport **out);
  /** Optional (NULL to skip "outage"): makes the medium unavailable, e.g. kills the broker
   * or stops the peer's listener, and returns when it is down. */
  int (*stop)(void *ctx);
  /** Optional: makes it available again and returns when it is up. */
  int (*restart)(void *ctx);
  void *ctx;               /**< passed to create, stop and restart */
  int ordered;             /**< the adapter promises per-channel order */
  uint32_t redelivery_ms;  /**< how long a broker takes to redeliver an unacknowledged
                                message; 0 for brokerless adapters */
  uint32_t timeout_ms;     /**< patience for each expected event; default 5000 */
  const char *db_dir;      /**< folder for the "sagas" check's databases (must exist) */
} saga_conformance_medium;

/**
 * Runs every check. Writes one line per check ("PASS name" / "FAIL name: why" /
 * "SKIP name: why") into report (reportlen bytes, may be 0) and returns the number of checks
 * that failed (0 = conformant), or a negative code if the kit itself could not run.
 */
SAGA_EXTERN int saga_conformance_run(struct uv_loop_s *loop, const saga_conformance_medium *m,
                                     char *report, size_t reportlen);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_CONFORMANCE_H */
