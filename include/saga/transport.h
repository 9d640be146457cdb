/**
 * @file
 * libsaga — transports, as seen by an application.
 *
 * A transport moves encoded envelopes between nodes. An application creates one with an
 * adapter's constructor (saga_mem_transport_new(), or a third-party adapter) and hands it to
 * saga_node_open() in the node config; the node owns it from then on, even if opening fails.
 * Writing an adapter: see saga/sys/transport.h.
 */
#ifndef SAGA_TRANSPORT_H
#define SAGA_TRANSPORT_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** A transport: an adapter object (in-memory, TCP, NATS, Redis or your own) whose head is
 * declared in saga/sys/transport.h. Opaque to an application, which makes one with an
 * adapter's constructor and hands it to saga_node_open(). */
typedef struct saga_transport saga_transport;

/**
 * Destroys a transport that was never given to a node (a node destroys its own).
 * Accepts NULL.
 */
SAGA_EXTERN void saga_transport_free(saga_transport *t);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRANSPORT_H */
