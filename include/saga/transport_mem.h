/**
 * @file
 * libsaga — the in-memory transport, with seeded fault injection.
 *
 * A hub is a tiny in-process broker for every node on one libuv loop. Each node gets its own
 * transport from saga_mem_transport_new(hub). A channel with several subscribers (replicas)
 * hands each message to one of them, round robin. Messages for a channel nobody subscribes
 * to yet wait in the hub until someone does.
 *
 * Bounds: the hub holds at most one copy of a message per sender and token (a node's outbox
 * resends an unconfirmed message every resend_ms; a resend whose message the hub still holds
 * adds nothing and succeeds, and the copy held is delivered in its place), and each channel
 * holds at most SAGA_MEM_CHANNEL_MAX_MESSAGES messages and SAGA_MEM_CHANNEL_MAX_BYTES payload
 * bytes, ready, delayed or waiting for a consumer (saga_mem_hub_set_limits() changes both).
 * Beyond either, send() refuses with SAGA_EBUSY, a transient code: the node keeps the
 * message in its outbox and resends it later; the hub logs this once through the sending
 * node's log, and again only after the channel has emptied. An empty channel always takes
 * one message, whatever its size. saga_mem_hub_queue_stats() shows what a channel holds.
 *
 * Acknowledgement is end to end, as with a brokerless network: the sender's outbox row is
 * confirmed only when the receiving node has committed the message and acknowledged it. A
 * message dropped by the fault mode (or an acknowledgement dropped on its way back) is
 * therefore recovered by the sender's outbox resending it.
 *
 * Fault mode: with a seed, each message independently may be dropped, duplicated, delayed
 * or reordered, and each acknowledgement may be dropped, with the given probabilities. The
 * same seed, clock and sequence of operations give the same run.
 *
 * Thread: the hub and its transports live on the loop's thread.
 */
#ifndef SAGA_TRANSPORT_MEM_H
#define SAGA_TRANSPORT_MEM_H

#include "clock.h"
#include "common.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uv_loop_s; /* from uv.h, declared here so this header stands alone */

/** An in-memory hub: routes messages between the nodes of one loop, with optional faults.
 * Opaque. */
typedef struct saga_mem_hub saga_mem_hub;

/** Fault probabilities, each 0..1. All zero (the default) is a perfect network. */
typedef struct saga_mem_faults {
  uint64_t seed;       /**< random seed of every fault decision */
  double drop;         /**< message lost */
  double duplicate;    /**< message delivered twice */
  double reorder;      /**< message jumps ahead of ones already waiting */
  double delay;        /**< message held back up to delay_max_ms */
  uint32_t delay_max_ms; /**< longest hold of a delayed message, in ms */
  double drop_ack;     /**< acknowledgement lost on its way back to the sender */
} saga_mem_faults;

/** Counters of what the hub did. */
typedef struct saga_mem_stats {
  uint64_t sent;         /**< messages taken by send() */
  uint64_t delivered;    /**< messages handed to a subscriber */
  uint64_t dropped;      /**< messages lost: by the drop fault or refused by a node */
  uint64_t duplicated;   /**< extra copies made by the duplicate fault */
  uint64_t reordered;    /**< messages moved ahead by the reorder fault */
  uint64_t delayed;      /**< messages held back by the delay fault */
  uint64_t acked;        /**< acknowledgements made by the receivers */
  uint64_t acks_dropped; /**< of those, lost by the drop_ack fault */
  uint64_t waiting; /**< messages held in the hub right now */
} saga_mem_stats;

/** Default per-channel bounds of a hub (see above). */
#define SAGA_MEM_CHANNEL_MAX_MESSAGES 65536
/** Default bound of the payload bytes a hub holds per channel (64 MiB). */
#define SAGA_MEM_CHANNEL_MAX_BYTES ((size_t)64 << 20)

/** What a hub holds for a channel (or for all), and what it turned away. */
typedef struct saga_mem_queue_stats {
  uint64_t messages;     /**< held now: ready, delayed or waiting for a consumer */
  uint64_t bytes;        /**< their payload bytes */
  uint64_t deduplicated; /**< sends whose (sender, token) was still held: nothing added */
  uint64_t refused;      /**< sends refused with SAGA_EBUSY at the channel's limit */
} saga_mem_queue_stats;

/**
 * Creates a hub on loop. clock may be NULL (the hub then makes a real clock of its own);
 * pass the nodes' manual clock for deterministic runs. faults may be NULL (no faults) and
 * is copied. alloc may be NULL. Returns SAGA_OK, SAGA_EINVAL, SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_mem_hub_new(saga_mem_hub **out, struct uv_loop_s *loop, saga_clock *clock,
                                 const saga_mem_faults *faults, const saga_allocator *alloc);

/**
 * Closes the hub's loop handles; the memory is freed once the loop has run their close
 * callbacks. Every transport of the hub must have been destroyed (their nodes closed)
 * first, else SAGA_EBUSY is returned and nothing happens. Accepts NULL (returns SAGA_OK).
 */
SAGA_EXTERN int saga_mem_hub_close(saga_mem_hub *hub);

/** Replaces the fault settings (for example to heal the network before a final drain). */
SAGA_EXTERN void saga_mem_hub_set_faults(saga_mem_hub *hub, const saga_mem_faults *faults);

/**
 * Copies the hub's counters into *out, writing exactly `size` bytes: pass sizeof *out (a
 * program built against an older, shorter struct gets the counters it knows; bytes past the
 * counters of this library are zeroed). Returns SAGA_OK, or SAGA_EINVAL (nothing written) for
 * a NULL hub or out or a size below the first version of the struct (up to `waiting`).
 */
SAGA_EXTERN int saga_mem_hub_stats(const saga_mem_hub *hub, saga_mem_stats *out, size_t size);

/**
 * Sets the per-channel bounds: at most max_messages messages and max_bytes payload bytes held
 * for one channel (0 = the default, SAGA_MEM_CHANNEL_MAX_MESSAGES / _BYTES). Lowering them
 * drops nothing already held; sends are refused until the channel is back under them.
 * Returns SAGA_OK, or SAGA_EINVAL for a NULL hub.
 */
SAGA_EXTERN int saga_mem_hub_set_limits(saga_mem_hub *hub, size_t max_messages,
                                        size_t max_bytes);

/**
 * Copies what the hub holds for channel (NULL = all channels together) into *out, writing
 * exactly size bytes: pass sizeof *out (a program built against an older, smaller struct gets
 * the fields it knows; bytes past this library's are zeroed). A channel the hub never saw
 * gives zeros. Returns SAGA_OK, or SAGA_EINVAL for a NULL hub or out or a size below the
 * struct's first version (all four counters).
 */
SAGA_EXTERN int saga_mem_hub_queue_stats(const saga_mem_hub *hub, const char *channel,
                                         saga_mem_queue_stats *out, size_t size);

/**
 * A new transport attached to hub, to be passed to saga_node_open() (which takes it).
 * Returns SAGA_OK, SAGA_EINVAL, SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_mem_transport_new(saga_transport **out, saga_mem_hub *hub);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_MEM_H */
