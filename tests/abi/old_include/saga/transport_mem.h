/*
 * libsaga — the in-memory transport, with seeded fault injection.
 *
 * A hub is a tiny in-process broker for every node on one libuv loop. Each node gets its own
 * transport from saga_mem_transport_new(hub). A channel with several subscribers (replicas)
 * hands each message to one of them, round robin. Messages for a channel nobody subscribes
 * to yet wait in the hub until someone does.
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

typedef struct saga_mem_hub saga_mem_hub;

/** Fault probabilities, each 0..1. All zero (the default) is a perfect network. */
typedef struct saga_mem_faults {
  uint64_t seed;       /**< random seed of every fault decision */
  double drop;         /**< message lost */
  double duplicate;    /**< message delivered twice */
  double reorder;      /**< message jumps ahead of ones already waiting */
  double delay;        /**< message held back up to delay_max_ms */
  uint32_t delay_max_ms;
  double drop_ack;     /**< acknowledgement lost on its way back to the sender */
} saga_mem_faults;

/** Counters of what the hub did. */
typedef struct saga_mem_stats {
  uint64_t sent, delivered, dropped, duplicated, reordered, delayed, acked, acks_dropped;
  uint64_t waiting; /**< messages held in the hub right now */
} saga_mem_stats;

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

/** Copies the hub's counters into *out. */
SAGA_EXTERN void saga_mem_hub_stats(const saga_mem_hub *hub, saga_mem_stats *out);

/**
 * A new transport attached to hub, to be passed to saga_node_open() (which takes it).
 * Returns SAGA_OK, SAGA_EINVAL, SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_mem_transport_new(saga_transport **out, saga_mem_hub *hub);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_MEM_H */
