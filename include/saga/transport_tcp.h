/**
 * @file
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
 * Security (docs/security.md has the whole trust model): every connection is mutual TLS 1.3
 * (OpenSSL). Each node has a certificate and key and trusts one CA file; both ends verify the
 * other. A sender checks that the node at a route's address proves the route's identity. A
 * receiver refuses every message whose sender's identity the access list (allow) does not
 * let send to that channel: the connection is closed before the message is looked at, and
 * the refusal is logged and counted. An ACK or NACK counts only for a token sent on that
 * same connection and still unconfirmed there; others are ignored and counted. Plaintext is
 * possible only with insecure_plaintext, and the log says so at open.
 *
 * Limits: frames over max_frame_bytes, or malformed, close that connection only, with the
 * reason logged; frames are decoded without allocating. Inbound connections are capped in
 * all and per source address (one that has not authenticated yet gives way to a newcomer),
 * must finish the TLS handshake within handshake_timeout_ms, are closed after
 * idle_timeout_ms without a frame, and are dropped when more than max_reply_queue_bytes of
 * acknowledgements wait for them to read. Messages waiting for a connection are bounded by
 * max_queued_bytes per peer; beyond it send() refuses (SAGA_EBUSY) and the outbox resends
 * later. Memory per inbound connection is then at most about max_frame_bytes + 64 KiB plus
 * OpenSSL's own buffers (which use OpenSSL's allocator, not `alloc`).
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

/**
 * One route: messages for `channel` go to `address` ("host:port", IPv4 or [IPv6]). With TLS,
 * `identity` (optional) is the name the node at that address must prove: its certificate must
 * carry it as a DNS subjectAltName (or, without any, as its CN). NULL accepts any certificate
 * the CA signed; name it in production (docs/security.md).
 */
typedef struct saga_tcp_route {
  const char *channel;  /**< a channel name, as the node sends to it */
  const char *address;  /**< "host:port" of the node that consumes it */
  const char *identity; /**< TLS: the name that node's certificate must carry; NULL = any */
} saga_tcp_route;

/**
 * One access-list entry: the peer proving `identity` may send messages to `channel` of this
 * node. Commands and replies both arrive on channels a node subscribes to, so one list says
 * who may send which commands and who may reply. "*" as identity means any peer the CA
 * signed; "*" as channel means every channel this node serves.
 */
typedef struct saga_tcp_allow {
  const char *identity; /**< the peer's proven name, or "*" for any peer the CA signed */
  const char *channel;  /**< one of this node's channels, or "*" for all of them */
} saga_tcp_allow;

/** The saga_tcp_config.struct_version of this header (version 1 is refused). */
#define SAGA_TCP_CONFIG_VERSION 2

/** Configuration of a TCP transport. Initialise with saga_tcp_config_init(); a zero field
 * means its default. */
typedef struct saga_tcp_config {
  int struct_version;            /**< SAGA_TCP_CONFIG_VERSION (version 1 is refused) */
  const char *listen;            /**< "host:port" to accept on; NULL = send only */
  const saga_tcp_route *routes;  /**< where each channel this node sends to lives; copied */
  size_t nroutes;                /**< entries in routes */
  size_t max_frame_bytes;        /**< default 1 MiB + 4 KiB */
  size_t max_queued_bytes;       /**< per peer, unsent and unconfirmed; default 64 MiB */
  uint32_t reconnect_min_ms;     /**< first reconnect delay; default 50 */
  uint32_t reconnect_max_ms;     /**< cap; default 5000 */
  const saga_allocator *alloc;   /**< NULL = libc */

  /* ---- security (version 2): docs/security.md ---- */
  /** Mutual TLS 1.3: the CA file (PEM) that signs every peer, and this node's certificate
   *  chain and private key (PEM). All three are required unless insecure_plaintext is set. */
  const char *tls_ca_file;
  const char *tls_cert_file; /**< this node's certificate chain (PEM) */
  const char *tls_key_file;  /**< its private key (PEM) */
  /** Who may send to which of this node's channels (copied). Required with TLS on a node
   *  that listens: an empty list refuses every message. Ignored in plaintext. */
  const saga_tcp_allow *allow;
  size_t nallow;                 /**< entries in allow */
  /** 1 = no TLS, no peer identities, no access list: anyone who reaches the port can send
   *  any command or reply. For loopback tests and demos only; the log says so at open. */
  int insecure_plaintext;
  uint32_t max_connections;         /**< inbound connections at once; default 256 */
  uint32_t max_connections_per_ip;  /**< inbound from one source address; default 32 */
  uint32_t handshake_timeout_ms;    /**< TLS handshake must finish within; default 5000 */
  uint32_t idle_timeout_ms;         /**< inbound connection with no frame closed after;
                                         default 300000 (5 min); a sender reconnects */
  size_t max_reply_queue_bytes;     /**< ACK/NACK bytes waiting to be written on one inbound
                                         connection; beyond, the peer is disconnected;
                                         default 1 MiB */
} saga_tcp_config;

/** What a TCP transport refused or dropped since it was created (saga_tcp_stats_get()). */
typedef struct saga_tcp_stats {
  uint64_t connections_accepted;   /**< inbound connections taken */
  uint64_t connections_refused;    /**< over max_connections or max_connections_per_ip */
  uint64_t handshakes_failed;      /**< TLS handshake failed or timed out (either side) */
  uint64_t frames_refused;         /**< DATA from a peer the access list does not allow
                                        (the connection is then closed) */
  uint64_t frames_malformed;       /**< frames that broke the wire format (connection closed) */
  uint64_t acks_ignored;           /**< ACK/NACK naming a token not sent and unconfirmed on
                                        that connection */
  uint64_t idle_closed;            /**< inbound connections closed by idle_timeout_ms */
  uint64_t slow_readers_dropped;   /**< inbound connections over max_reply_queue_bytes */
} saga_tcp_stats;

/**
 * Fills the first `size` bytes of cfg with the defaults and sets struct_version to the newest
 * version whose fields fit in them: pass sizeof *cfg (the macro saga_tcp_config_init() does;
 * a program built against an older, shorter struct gets its own version and nothing past it
 * is written, docs/abi.md). Returns SAGA_OK, or SAGA_EINVAL for a NULL cfg or a size below
 * the version-2 struct (the first one the transport accepts; nothing written).
 */
SAGA_EXTERN int saga_tcp_config_init_sized(saga_tcp_config *cfg, size_t size);
/** Fills cfg with the defaults. */
#define saga_tcp_config_init(cfg) saga_tcp_config_init_sized((cfg), sizeof(saga_tcp_config))

/**
 * Creates a TCP transport (not yet listening: the node opens it). The TLS files are read
 * here. Returns SAGA_OK, SAGA_EINVAL (bad address or route, NULL cfg, TLS files missing or
 * unreadable, key not matching the certificate, neither TLS nor insecure_plaintext),
 * SAGA_EVERSION, SAGA_ENOMEM. When errbuf is not NULL, a failure writes its reason there
 * (NUL-terminated, at most errlen bytes).
 */
SAGA_EXTERN int saga_tcp_transport_new2(saga_transport **out, const saga_tcp_config *cfg,
                                        char *errbuf, size_t errlen);

/** saga_tcp_transport_new2() without the reason. */
SAGA_EXTERN int saga_tcp_transport_new(saga_transport **out, const saga_tcp_config *cfg);

/**
 * Copies t's counters (t must be a TCP transport) into *out, writing exactly `size` bytes:
 * pass sizeof *out (an older, shorter struct gets the counters it knows; bytes past this
 * library's counters are zeroed; docs/abi.md). Returns SAGA_OK, or SAGA_EINVAL (nothing
 * written) for a NULL or non-TCP t, a NULL out or a size below the struct's first version
 * (up to slow_readers_dropped).
 */
SAGA_EXTERN int saga_tcp_stats_get(saga_transport *t, saga_tcp_stats *out, size_t size);



#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_TCP_H */
