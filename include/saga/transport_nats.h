/*
 * libsaga — the NATS JetStream transport (libnats). Link -lsaga_nats (CMake target
 * libsaga::nats).
 *
 * Each channel is a subject "<prefix>.<channel>" in one stream capturing "<prefix>.>", with
 * work-queue retention (a message is removed once acknowledged; one sent to a channel nobody
 * consumes yet waits for its consumer). Each subscribed channel has a durable pull consumer
 * named after the channel (characters other than letters, digits, '-' and '_' are replaced
 * and a hash of the name appended), so the replicas of one service share it and each message
 * goes to one of them. Stream and consumers are created at open/subscribe, or verified when
 * they exist: one whose configuration disagrees (other subjects or retention; another
 * ack_wait, a push consumer, ...) makes open/subscribe fail with SAGA_EEXIST and a log line
 * naming the difference — the adapter never changes it. A stream made by an operator (with
 * replicas, say) is accepted as long as its subjects and retention match.
 *
 * A message is confirmed to the sender once JetStream stored it (publish ack), never before;
 * a publish made while disconnected is sent after the reconnect and confirmed only then. The
 * receiver acknowledges explicitly only after its transaction committed; an unacknowledged
 * message is redelivered after ack_wait_ms. A message delivered to the node max_deliveries
 * times without being acknowledged is, at its next delivery, handed to the node's dead-letter
 * table with the reason (and then acknowledged), so it neither blocks the channel nor loops.
 * The connection reconnects forever, every reconnect_wait_ms. A consumer the server leaves
 * stuck — messages waiting, none delivered though asked for, as nats-server before 2.10.25 can
 * after a crash — is deleted and created again (logged): its unacknowledged messages are then
 * delivered again, none is lost.
 *
 * Channel names must be valid subject tokens ('.'-separated, no spaces, '*' or '>'): others
 * are refused with SAGA_EINVAL. open() and subscribe() wait for the server (connect up to 2 s,
 * each JetStream request up to 5 s) and fail with SAGA_ETRANSPORT when it cannot be reached;
 * the node's log hook has the detail.
 */
#ifndef SAGA_TRANSPORT_NATS_H
#define SAGA_TRANSPORT_NATS_H

#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SAGA_NATS_CONFIG_VERSION 1

typedef struct saga_nats_config {
  int struct_version;        /**< SAGA_NATS_CONFIG_VERSION */
  const char *url;           /**< e.g. "nats://127.0.0.1:4222" (the default); a comma-separated
                                  list names several servers of a cluster */
  const char *stream;        /**< stream name; default "SAGA" */
  const char *prefix;        /**< subject prefix; default "saga" */
  uint32_t ack_wait_ms;      /**< redelivery after; default 30000. Part of each consumer's
                                  configuration: every node of a channel must agree */
  uint32_t max_deliveries;   /**< then dead-lettered; default 10 */
  uint32_t reconnect_wait_ms;/**< default 250; reconnects forever */
  const saga_allocator *alloc; /**< NULL = libc; libnats keeps its own allocations */
} saga_nats_config;

/** Fills cfg with the defaults listed in saga_nats_config. */
SAGA_EXTERN void saga_nats_config_init(saga_nats_config *cfg);

/**
 * Creates a NATS transport (not connected yet: the node's open connects). cfg may be NULL
 * for the defaults; its strings are copied. Returns SAGA_OK and sets *out, SAGA_EINVAL
 * (invalid stream name or prefix), SAGA_EVERSION (struct_version), SAGA_ENOMEM.
 * Thread: any; the transport is then used on its node's loop only.
 */
SAGA_EXTERN int saga_nats_transport_new(saga_transport **out, const saga_nats_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_NATS_H */
