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
 * and is acknowledged. Subscribers trim their streams of entries every consumer is done with.
 * Needs Redis >= 6.2 (XAUTOCLAIM); for durability run it with appendonly yes and appendfsync
 * always, since a confirmed message exists only in Redis until it is consumed.
 */
#ifndef SAGA_TRANSPORT_REDIS_H
#define SAGA_TRANSPORT_REDIS_H

#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SAGA_REDIS_CONFIG_VERSION 1

/** Configuration. Initialise with saga_redis_config_init(); a zero field means its default.
 * Strings are copied by saga_redis_transport_new(). */
typedef struct saga_redis_config {
  int struct_version;        /**< SAGA_REDIS_CONFIG_VERSION */
  const char *host;          /**< default "127.0.0.1"; a name is resolved (blocking) at
                                  each connection attempt, so prefer an address */
  int port;                  /**< default 6379 */
  const char *prefix;        /**< stream key prefix; default "saga" */
  const char *consumer;      /**< this replica's consumer name, unique among the replicas of
                                  a service; default host-pid-random (new at each start). A
                                  stable name (e.g. the pod's) keeps the group's consumer
                                  list from growing across restarts */
  uint32_t claim_idle_ms;    /**< entries pending this long (unacknowledged) are claimed and
                                  delivered again; keep it well above the node's commit
                                  time; default 30000 */
  uint32_t max_deliveries;   /**< an entry delivered this many times without an ack is
                                  dead-lettered instead; default 10 */
  uint32_t reconnect_min_ms, reconnect_max_ms; /**< reconnect backoff; default 50, 5000 */
  const saga_allocator *alloc; /**< for the adapter's own memory (hiredis keeps its own);
                                    NULL = libc; copied */
} saga_redis_config;

/** Fills cfg with the defaults listed in saga_redis_config. Accepts NULL. */
SAGA_EXTERN void saga_redis_config_init(saga_redis_config *cfg);

/**
 * Creates a Redis transport; hand it to saga_node_open(). Nothing connects before the node
 * opens it; the broker need not be up then (the connections retry forever). cfg may be NULL
 * (all defaults). While the broker is unreachable, sends fail with SAGA_ETRANSPORT and the
 * node's outbox sends them again later.
 * Returns SAGA_OK and sets *out; SAGA_EINVAL (out NULL, port out of range, reconnect_min_ms >
 * reconnect_max_ms, empty consumer, incomplete allocator), SAGA_EVERSION (struct_version),
 * SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_redis_transport_new(saga_transport **out, const saga_redis_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_REDIS_H */
