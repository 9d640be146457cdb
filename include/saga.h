/**
 * @file
 * libsaga — an embeddable saga-orchestration engine. Umbrella header.
 *
 * Start with saga/node.h. Adapter authors: saga/sys/transport.h.
 */
#ifndef SAGA_H
#define SAGA_H

#include "saga/common.h"
#include "saga/clock.h"
#include "saga/data.h"
#include "saga/participant.h"
#include "saga/lock.h"
#include "saga/definition.h"
#include "saga/envelope.h"
#include "saga/transport.h"
#include "saga/transport_mem.h"
#include "saga/transport_inproc.h"
#include "saga/trace.h"
#include "saga/node.h"
#include "saga/domain.h"

#endif /* SAGA_H */
