/*
 * libsaga — the NATS JetStream transport (libnats). Link -lsaga_nats (CMake target
 * libsaga::nats).
 *
 * Each channel is a subject "<prefix>.<channel>" in one stream (created or verified at open,
 * idempotently). Each subscribed channel has a durable pull consumer named after the
 * channel (so the replicas of one service share it and each message goes to one of them).
 * A message is confirmed to the sender once JetStream stored it (publish ack); the receiver
 * acknowledges explicitly only after its transaction committed; unacknowledged messages are
 * redelivered after ack_wait_ms. A message delivered max_deliveries times is handed to the
 * node's dead-letter table with the reason and acknowledged, so it neither blocks the channel
 * nor loops.
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
  const char *url;           /**< e.g. "nats://127.0.0.1:4222" */
  const char *stream;        /**< stream name; default "SAGA" */
  const char *prefix;        /**< subject prefix; default "saga" */
  uint32_t ack_wait_ms;      /**< redelivery after; default 30000 */
  uint32_t max_deliveries;   /**< then dead-lettered; default 10 */
  uint32_t reconnect_wait_ms;/**< default 250; reconnects forever */
  const saga_allocator *alloc;
} saga_nats_config;

SAGA_EXTERN void saga_nats_config_init(saga_nats_config *cfg);
SAGA_EXTERN int saga_nats_transport_new(saga_transport **out, const saga_nats_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_NATS_H */
