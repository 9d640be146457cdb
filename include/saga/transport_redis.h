/**
 * @file
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
 *
 * One copy per token: a send() of a token whose XADD is still unanswered on the current
 * command connection (queued while it connects, or written and waiting for the reply while
 * the server is slow or stalled) returns SAGA_OK without another XADD (counted in
 * sends_coalesced); that XADD's reply confirms it. Once the connection is lost, what it carried
 * is forgotten and the next send() writes the token again on the new one.
 *
 * Broker down at open: open() succeeds and every connection retries forever (sends fail with
 * SAGA_ETRANSPORT meanwhile, channels subscribed are read once their connection is up), unless
 * fail_fast is set (config version 3): then open() first connects once, synchronously (up to 5
 * s, with AUTH and PING), and fails with SAGA_ETRANSPORT when the server cannot be reached or
 * refuses the credentials. saga_redis_connected() tells whether messages flow.
 *
 * Security (config version 2; the trust model is in docs/security.md). With a password set,
 * every connection the adapter makes (reconnects included) sends AUTH first: "AUTH username
 * password" for a Redis 6+ ACL user, "AUTH password" for requirepass. A refused AUTH is logged
 * at ERROR when it starts (and at INFO when it is accepted again), counted, and retried with
 * the reconnect backoff like an unreachable broker: open() still succeeds, and nothing is
 * sent, read or acknowledged until the server accepts the credentials. An XADD is confirmed
 * only by its own reply, and only when that reply is an entry id.
 *
 * NO TLS: hiredis 0.14 cannot encrypt. Credentials and every message cross the network in
 * clear and can be read or altered on the path. Keep Redis on loopback or a private network
 * you trust, or put a TLS tunnel in between (stunnel or spiped on both ends, host and port
 * pointing at the local end), or use the NATS or TCP transport with TLS.
 */
#ifndef SAGA_TRANSPORT_REDIS_H
#define SAGA_TRANSPORT_REDIS_H

#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The newest saga_redis_config.struct_version (docs/abi.md lists each version's fields). */
#define SAGA_REDIS_CONFIG_VERSION 3

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
  uint32_t reconnect_min_ms; /**< first reconnect delay; default 50 */
  uint32_t reconnect_max_ms; /**< cap of the doubling reconnect delay; default 5000 */
  const saga_allocator *alloc; /**< for the adapter's own memory (hiredis keeps its own);
                                    NULL = libc; copied */
  /* ---- version 2 ---- */
  const char *username;      /**< ACL user (Redis 6+); needs password. NULL or "" = the
                                  default user */
  const char *password;      /**< sent with AUTH on every connection; NULL or "" = no AUTH.
                                  Travels in clear (no TLS): see above */
  /* ---- version 3 ---- */
  int fail_fast;             /**< nonzero: open() fails with SAGA_ETRANSPORT when the server
                                  cannot be reached or refuses the credentials (one
                                  synchronous attempt). 0 (the default, and for version 1 and
                                  2 configs): open() succeeds and the connections retry */
} saga_redis_config;

/** What a Redis transport counted since it was created (saga_redis_stats_get()). */
typedef struct saga_redis_stats {
  uint64_t auth_failures;      /**< connections whose AUTH (or first command) was refused */
  uint64_t replies_unexpected; /**< XADD replies that were not an entry id (not confirmed) */
  /* ---- appended (read with saga_redis_stats_get(), which passes the struct's size) ---- */
  uint64_t xadds;              /**< XADD commands queued: copies of messages handed over */
  uint64_t sends_coalesced;    /**< send() calls answered without an XADD: the token's XADD
                                    was still unanswered on the same connection */
} saga_redis_stats;

/**
 * Fills the first `size` bytes of cfg with the defaults listed in saga_redis_config and sets
 * struct_version to the newest version whose fields fit in them: pass sizeof *cfg (the macro
 * saga_redis_config_init() does; a program built against an older, shorter struct gets its
 * own version and nothing past it is written, docs/abi.md). Returns SAGA_OK, or SAGA_EINVAL
 * for a NULL cfg or a size below the version-1 struct (nothing written).
 */
SAGA_EXTERN int saga_redis_config_init_sized(saga_redis_config *cfg, size_t size);
/** Fills cfg with the defaults listed in saga_redis_config. */
#define saga_redis_config_init(cfg) saga_redis_config_init_sized((cfg), sizeof(saga_redis_config))

/**
 * Creates a Redis transport; hand it to saga_node_open(). Nothing connects before the node
 * opens it; the broker need not be up then (the connections retry forever), unless fail_fast
 * is set. cfg may be NULL (all defaults). While the broker is unreachable, sends fail with
 * SAGA_ETRANSPORT and the node's outbox sends them again later.
 * Returns SAGA_OK and sets *out; SAGA_EINVAL (out NULL, port out of range, reconnect_min_ms >
 * reconnect_max_ms, empty consumer, incomplete allocator, username without password),
 * SAGA_EVERSION (struct_version other than 1, 2 or 3: an older config is read without the
 * later fields, which keep their defaults), SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_redis_transport_new(saga_transport **out, const saga_redis_config *cfg);

/**
 * Copies t's counters (t must be a Redis transport) into *out, writing exactly `size` bytes:
 * pass sizeof *out. A program built against an older header, whose struct is shorter, gets the
 * fields it knows and nothing is written past them; bytes past this library's counters are
 * zeroed (docs/abi.md). Returns SAGA_OK, or SAGA_EINVAL (nothing written) for a NULL or
 * non-Redis t, a NULL out or a size below the first version (the first two counters).
 * Thread: t's loop.
 */
SAGA_EXTERN int saga_redis_stats_get_sized(saga_transport *t, saga_redis_stats *out,
                                           size_t size);

/** The same for the first two counters only (what the struct held before it grew), kept for
 * programs built against an older header; the macro below passes the size instead. */
SAGA_EXTERN int(saga_redis_stats_get)(saga_transport *t, saga_redis_stats *out);
/** saga_redis_stats_get(t, out): saga_redis_stats_get_sized() with the size of this header's
 * struct. */
#define saga_redis_stats_get(t, out) saga_redis_stats_get_sized((t), (out), sizeof(saga_redis_stats))

/**
 * 1 when t (a Redis transport) is open and its command connection and the reader connection
 * of every subscribed channel are up (answered PING, after AUTH), so that messages flow; 0
 * otherwise (broker unreachable, credentials refused, reconnecting, not open). For health
 * checks ("transport not connected"). SAGA_EINVAL when t is not a Redis transport.
 * Thread: t's loop.
 */
SAGA_EXTERN int saga_redis_connected(saga_transport *t);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_REDIS_H */
