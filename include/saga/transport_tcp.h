/*
 * libsaga — the TCP transport (brokerless, libuv). Link -lsaga_tcp (CMake target
 * libsaga::tcp).
 *
 * Every node listens on an address; a static route table says which address serves each
 * channel (share one table between all nodes). A message is a length-prefixed msgpack frame on
 * a connection to the channel's address. The receiving node acknowledges a message only after
 * its transaction committed, with an ACK frame on the same connection; only then is the
 * sender's outbox row confirmed. If the connection drops first, nothing is confirmed and the
 * sender's outbox resends it once the peer is back (reconnects back off exponentially up to a
 * cap), however long the peer is down. Order is kept per connection, so per channel while a
 * connection lives.
 *
 * Frames over max_frame_bytes, or malformed, close that connection only, with the reason
 * logged. Messages waiting for a connection are bounded by max_queued_bytes per peer; beyond
 * it send() refuses (SAGA_EBUSY) and the outbox resends later, so memory stays bounded.
 *
 * Signals: writing to a connection the peer closed raises SIGPIPE. If the process left
 * SIGPIPE at its default (which ends the process), opening a TCP transport sets it to
 * ignored, and says so in the log; a disposition the application chose is left alone.
 */
#ifndef SAGA_TRANSPORT_TCP_H
#define SAGA_TRANSPORT_TCP_H

#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/** One route: messages for `channel` go to `address` ("host:port", IPv4 or [IPv6]). */
typedef struct saga_tcp_route {
  const char *channel;
  const char *address;
} saga_tcp_route;

#define SAGA_TCP_CONFIG_VERSION 1

typedef struct saga_tcp_config {
  int struct_version;            /**< SAGA_TCP_CONFIG_VERSION */
  const char *listen;            /**< "host:port" to accept on; NULL = send only */
  const saga_tcp_route *routes;  /**< copied */
  size_t nroutes;
  size_t max_frame_bytes;        /**< default 1 MiB + 4 KiB */
  size_t max_queued_bytes;       /**< per peer, unsent and unconfirmed; default 64 MiB */
  uint32_t reconnect_min_ms;     /**< first reconnect delay; default 50 */
  uint32_t reconnect_max_ms;     /**< cap; default 5000 */
  const saga_allocator *alloc;   /**< NULL = libc */
} saga_tcp_config;

/** Fills cfg with the defaults. */
SAGA_EXTERN void saga_tcp_config_init(saga_tcp_config *cfg);

/**
 * Creates a TCP transport (not yet listening: the node opens it). Returns SAGA_OK,
 * SAGA_EINVAL (bad address or route, NULL cfg), SAGA_EVERSION, SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_tcp_transport_new(saga_transport **out, const saga_tcp_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_TCP_H */
