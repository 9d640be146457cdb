/*
 * libsaga — the Redis Streams transport (hiredis). Link -lsaga_redis (CMake target
 * libsaga::redis).
 *
 * Each channel is a stream "<prefix>:<channel>" written with XADD; each consuming service
 * reads it through a consumer group named after the channel (replicas share it, each entry
 * goes to one of them), each replica a consumer of its own. A message is confirmed to the
 * sender once XADD returned; the receiver XACKs it only after its transaction committed.
 * Entries left pending by a dead replica are reclaimed after claim_idle_ms (XAUTOCLAIM). An
 * entry delivered max_deliveries times goes to the node's dead-letter table with the reason
 * and is acknowledged.
 */
#ifndef SAGA_TRANSPORT_REDIS_H
#define SAGA_TRANSPORT_REDIS_H

#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SAGA_REDIS_CONFIG_VERSION 1

typedef struct saga_redis_config {
  int struct_version;        /**< SAGA_REDIS_CONFIG_VERSION */
  const char *host;          /**< default "127.0.0.1" */
  int port;                  /**< default 6379 */
  const char *prefix;        /**< stream key prefix; default "saga" */
  const char *consumer;      /**< this replica's consumer name; default host-pid-random */
  uint32_t claim_idle_ms;    /**< reclaim entries pending this long; default 30000 */
  uint32_t max_deliveries;   /**< then dead-lettered; default 10 */
  uint32_t reconnect_min_ms, reconnect_max_ms; /**< default 50, 5000 */
  const saga_allocator *alloc;
} saga_redis_config;

SAGA_EXTERN void saga_redis_config_init(saga_redis_config *cfg);
SAGA_EXTERN int saga_redis_transport_new(saga_transport **out, const saga_redis_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_REDIS_H */
