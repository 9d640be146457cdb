/**
 * @file
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
 * adapter holds at most one copy of an unconfirmed message (by the node's token): a send() of
 * a token whose copy is on its way — written to the connection and awaiting its ack for less
 * than 5 s, or waiting in libnats's reconnect buffer — returns SAGA_OK without another copy
 * (counted in sends_coalesced). It publishes again when that copy may be lost: the connection
 * it went out on dropped, JetStream answered that it did not store it, or no ack came within
 * 5 s of a live connection. The receiver acknowledges explicitly only after its transaction
 * committed; an unacknowledged message is redelivered after ack_wait_ms. A message delivered
 * to the node max_deliveries times without being acknowledged is, at its next delivery, handed
 * to the node's dead-letter table with the reason (and then acknowledged), so it neither
 * blocks the channel nor loops.
 * The connection reconnects forever, every reconnect_wait_ms. A consumer the server leaves
 * stuck — messages waiting, none delivered though asked for, as nats-server before 2.10.25 can
 * after a crash — is deleted and created again (logged): its unacknowledged messages are then
 * delivered again, none is lost.
 *
 * Channel names must be valid subject tokens ('.'-separated, no spaces, '*' or '>'): others
 * are refused with SAGA_EINVAL. open() and subscribe() wait for the server (connect up to 2 s,
 * each JetStream request up to 5 s); the node's log hook has the detail of any failure.
 *
 * Broker down at open. When no server can be reached (refused, or no answer within 2 s), open()
 * still succeeds (config version 3, fail_fast 0, the default): the transport connects in the
 * background, every reconnect_wait_ms doubling up to 5 s, and sets up the stream and the
 * consumers once a server answers; subscribe() calls made meanwhile are remembered and applied
 * then. Until then send() returns SAGA_ETRANSPORT (transient: the node keeps the row in its
 * outbox and sends it again) and saga_nats_connected() returns 0. With fail_fast set, open()
 * fails with SAGA_ETRANSPORT instead, as versions 1 and 2 did. Either way a server that answers
 * open() but refuses the credentials or the TLS handshake, or whose stream disagrees, makes
 * open() fail: those are configuration errors that waiting does not fix. Found only by the
 * background connect, a refusal is logged at ERROR (once per outage) and retried.
 *
 * Security (config version 2; the trust model is in docs/security.md). The adapter
 * authenticates to the server with a user and password, a token, an NKey, or a .creds file
 * (JWT + NKey seed), and speaks TLS when any tls_ field is set: the server's certificate must
 * chain to tls_ca_file and carry the expected name, and tls_cert_file/tls_key_file answer a
 * server that verifies clients. Server verification is never skipped. Wrong or missing
 * credentials, or a failed TLS handshake, make open() fail with SAGA_ETRANSPORT and a log line
 * with libnats's reason; an authorization failure on a later reconnect is logged (once per
 * outage) and the transport keeps retrying — with new connections once libnats gave up on
 * the old one (it does after two refusals in a row). What a node may publish and subscribe to
 * is the server's business (per-user permissions): the adapter needs publish on "<prefix>.<channel>"
 * for the channels it sends to and on "$JS.API.>" (or the stream's and its consumers' API
 * subjects) and "$JS.ACK.<stream>.>", and subscribe on "<inbox_prefix>.>". A publish
 * acknowledgement is accepted only for a publish this transport made and has not seen
 * confirmed, named by a random reply subject; any other is ignored and counted
 * (saga_nats_stats_get()).
 */
#ifndef SAGA_TRANSPORT_NATS_H
#define SAGA_TRANSPORT_NATS_H

#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The newest saga_nats_config.struct_version (the fields of each are marked below). */
#define SAGA_NATS_CONFIG_VERSION 3

/** Configuration of a NATS JetStream transport. Initialise with saga_nats_config_init(); a
 * zero field means its default. Strings are copied by saga_nats_transport_new(). */
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
  /* ---- version 2: credentials and TLS. Strings are copied; NULL or "" = not set. At most
   * one way to authenticate: user (with password), token, nkey (with nkey_seed_file), or
   * creds_file; several is SAGA_EINVAL. ---- */
  const char *user;           /**< user name (nats-server authorization users) */
  const char *password;       /**< its password; needs user */
  const char *token;          /**< authorization token */
  const char *nkey;           /**< NKey public key ("U..."); needs nkey_seed_file */
  const char *nkey_seed_file; /**< file holding the NKey's seed ("SU..."), read at each
                                   connection; signs the server's nonce */
  const char *creds_file;     /**< a .creds file (user JWT and NKey seed: operator/JWT mode) */
  const char *tls_ca_file;    /**< PEM CA certificates the server's certificate must chain to;
                                   any tls_ field (or tls_required) turns TLS on */
  const char *tls_cert_file;  /**< PEM client certificate (chain), for a server that verifies
                                   clients (tls { verify: true }); needs tls_key_file */
  const char *tls_key_file;   /**< its PEM private key */
  int tls_required;           /**< nonzero: TLS, even with no tls_ file (then the system's
                                   default CAs verify the server) */
  const char *tls_hostname;   /**< name the server's certificate must carry; default: the
                                   host of the first URL when that is a DNS name. With an IP
                                   address and no tls_hostname only the chain is verified (a
                                   warning is logged at open) */
  const char *inbox_prefix;   /**< prefix of this node's reply subjects (publish acks and
                                   JetStream replies); default "_INBOX". A prefix per service
                                   ("_INBOX.payment") lets server permissions keep each
                                   service's replies to itself */
  /* ---- version 3 ---- */
  int fail_fast;              /**< nonzero: open() fails with SAGA_ETRANSPORT when no server
                                   can be reached, for those who let a supervisor restart the
                                   service. 0 (the default, and for version 1 and 2 configs):
                                   open() succeeds and the transport connects when a server
                                   appears */
} saga_nats_config;

/** What a NATS transport counted since it was created (saga_nats_stats_get()). */
typedef struct saga_nats_stats {
  uint64_t acks_confirmed;    /**< publishes JetStream confirmed (reported to the node) */
  uint64_t acks_negative;     /**< publish acks saying the message was not stored */
  uint64_t acks_ignored;      /**< messages on the ack inbox naming no publish this transport
                                   has unconfirmed (forged, duplicate, late or malformed) */
  uint64_t pending_dropped;   /**< unconfirmed publishes forgotten (table full or too old);
                                   the outbox resends them */
  uint64_t permission_errors; /**< the server refused a publish or subscription */
  uint64_t auth_errors;       /**< authentication or authorization failures at (re)connect */
  /* ---- appended (read with saga_nats_stats_get(), which passes the struct's size) ---- */
  uint64_t publishes;         /**< copies of messages handed to libnats (written to the
                                   connection or to its reconnect buffer) */
  uint64_t sends_coalesced;   /**< send() calls answered without a new copy: the token's copy
                                   was still on its way */
  uint64_t unconfirmed;       /**< now: tokens published and not confirmed yet */
  uint64_t connects;          /**< connections set up (the first one, and new ones after
                                   libnats gave one up), not counting libnats's reconnects */
} saga_nats_stats;

/** Fills cfg with the defaults listed in saga_nats_config. */
SAGA_EXTERN void saga_nats_config_init(saga_nats_config *cfg);

/**
 * Creates a NATS transport (not connected yet: the node's open connects). cfg may be NULL
 * for the defaults; its strings are copied. Returns SAGA_OK and sets *out, SAGA_EINVAL
 * (invalid stream name, prefix or inbox prefix; two ways to authenticate; a password without
 * a user, an nkey without its seed file or the reverse, a certificate without its key or the
 * reverse), SAGA_EVERSION (struct_version other than 1, 2 or 3: an older config is read
 * without the later fields, which keep their defaults), SAGA_ENOMEM. The files are read at
 * open. Thread: any; the transport is then used on its node's loop only.
 */
SAGA_EXTERN int saga_nats_transport_new(saga_transport **out, const saga_nats_config *cfg);

/**
 * Copies t's counters (t must be a NATS transport), at most `size` bytes of them: pass
 * sizeof *out. A program built against an older header, whose struct is shorter, gets the
 * fields it knows and nothing is written past them. Returns SAGA_OK or SAGA_EINVAL.
 * Thread: t's loop.
 */
SAGA_EXTERN int saga_nats_stats_get_sized(saga_transport *t, saga_nats_stats *out, size_t size);

/** The same for the first six counters only (what the struct held before it grew), kept for
 * programs built against an older header; the macro below passes the size instead. */
SAGA_EXTERN int(saga_nats_stats_get)(saga_transport *t, saga_nats_stats *out);
/** saga_nats_stats_get(t, out): saga_nats_stats_get_sized() with the size of this header's
 * struct. */
#define saga_nats_stats_get(t, out) saga_nats_stats_get_sized((t), (out), sizeof(saga_nats_stats))

/**
 * 1 when t (a NATS transport) is connected with its stream and consumers set up, so that
 * messages flow; 0 while it is not (opened while the server was unreachable and not connected
 * yet, disconnected and reconnecting, or not open). For health checks ("transport not
 * connected"). SAGA_EINVAL when t is not a NATS transport. Thread: t's loop.
 */
SAGA_EXTERN int saga_nats_connected(saga_transport *t);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_NATS_H */
