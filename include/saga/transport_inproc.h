/**
 * @file
 * libsaga — the in-process transport across threads.
 *
 * A hub connects nodes of one process that run on different libuv loops, each on its own
 * thread (the threading model is one node per loop thread): an orchestrator on one core and
 * its participants on another, say. It behaves like the in-memory transport without faults:
 * a channel with several subscribers hands each message to one of them, round robin;
 * messages for a channel nobody subscribes to yet wait in the hub; acknowledgement is end to
 * end (the sender's outbox row is confirmed only when the receiving node committed the
 * message and acknowledged it). Nothing is lost while both nodes run; a message handed to a
 * node that then closes is resent by its sender's outbox, as over a network.
 *
 * Bounds: the hub holds at most one copy of a message per sender and token (a node's outbox
 * resends an unconfirmed message every resend_ms; a resend whose message the hub still holds
 * — waiting for a subscriber, or handed to a node whose loop has not taken it yet — adds
 * nothing and succeeds), and each channel holds at most SAGA_INPROC_CHANNEL_MAX_MESSAGES
 * messages and SAGA_INPROC_CHANNEL_MAX_BYTES payload bytes (saga_inproc_hub_set_limits()).
 * Beyond either, send() refuses with SAGA_EBUSY, a transient code: the node keeps the message
 * in its outbox and resends it later; the hub logs this once through the sending node's log,
 * and again only after the channel has emptied. An empty channel always takes one message.
 *
 * Thread: the hub is shared and locked inside; each transport is used on the thread of the
 * loop it was opened on. saga_inproc_hub_free() only once every transport of the hub was
 * destroyed (their nodes closed and their loops run until the close finished).
 */
#ifndef SAGA_TRANSPORT_INPROC_H
#define SAGA_TRANSPORT_INPROC_H

#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/** An in-process hub: routes messages between nodes whose loops run on different threads.
 * Opaque. */
typedef struct saga_inproc_hub saga_inproc_hub;

/** Default per-channel bounds of a hub (see above). */
#define SAGA_INPROC_CHANNEL_MAX_MESSAGES 65536
/** Default bound of the payload bytes a hub holds per channel (64 MiB). */
#define SAGA_INPROC_CHANNEL_MAX_BYTES ((size_t)64 << 20)

/** What a hub holds for a channel (or for all), and what it turned away. */
typedef struct saga_inproc_queue_stats {
  uint64_t messages;     /**< held now: waiting for a subscriber or in a node's inbox */
  uint64_t bytes;        /**< their payload bytes */
  uint64_t deduplicated; /**< sends whose (sender, token) was still held: nothing added */
  uint64_t refused;      /**< sends refused with SAGA_EBUSY at the channel's limit */
} saga_inproc_queue_stats;

/** Creates a hub. alloc may be NULL (libc); it must be thread-safe. Returns SAGA_OK,
 * SAGA_EINVAL, SAGA_ENOMEM. */
SAGA_EXTERN int saga_inproc_hub_new(saga_inproc_hub **out, const saga_allocator *alloc);

/** Frees the hub and the messages still waiting in it. SAGA_EBUSY (and nothing done) while
 * a transport of the hub exists. Accepts NULL. */
SAGA_EXTERN int saga_inproc_hub_free(saga_inproc_hub *hub);

/** Sets the per-channel bounds: at most max_messages messages and max_bytes payload bytes
 * held for one channel (0 = the default). Lowering them drops nothing already held. Any
 * thread. Returns SAGA_OK, or SAGA_EINVAL for a NULL hub. */
SAGA_EXTERN int saga_inproc_hub_set_limits(saga_inproc_hub *hub, size_t max_messages,
                                           size_t max_bytes);

/** Copies what the hub holds for channel (NULL = all channels together) into *out, writing
 * exactly size bytes: pass sizeof *out (docs/abi.md: an older, shorter struct gets the fields it
 * knows; bytes past this library's are zeroed). A channel the hub never saw gives zeros. Any
 * thread. Returns SAGA_OK, or SAGA_EINVAL for a NULL hub or out or a size below the struct's
 * first version (all four counters). */
SAGA_EXTERN int saga_inproc_hub_queue_stats(saga_inproc_hub *hub, const char *channel,
                                            saga_inproc_queue_stats *out, size_t size);

/** A new transport attached to hub, to be passed to saga_node_open() (which takes it) on
 * any loop. Returns SAGA_OK, SAGA_EINVAL, SAGA_ENOMEM. */
SAGA_EXTERN int saga_inproc_transport_new(saga_transport **out, saga_inproc_hub *hub);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_INPROC_H */
