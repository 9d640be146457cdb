/*
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

typedef struct saga_inproc_hub saga_inproc_hub;

/** Creates a hub. alloc may be NULL (libc); it must be thread-safe. Returns SAGA_OK,
 * SAGA_EINVAL, SAGA_ENOMEM. */
SAGA_EXTERN int saga_inproc_hub_new(saga_inproc_hub **out, const saga_allocator *alloc);

/** Frees the hub and the messages still waiting in it. SAGA_EBUSY (and nothing done) while
 * a transport of the hub exists. Accepts NULL. */
SAGA_EXTERN int saga_inproc_hub_free(saga_inproc_hub *hub);

/** A new transport attached to hub, to be passed to saga_node_open() (which takes it) on
 * any loop. Returns SAGA_OK, SAGA_EINVAL, SAGA_ENOMEM. */
SAGA_EXTERN int saga_inproc_transport_new(saga_transport **out, saga_inproc_hub *hub);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_INPROC_H */
