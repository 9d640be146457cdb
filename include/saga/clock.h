/**
 * @file
 * libsaga — clocks.
 *
 * Every time libsaga reads and every timer it arms goes through a saga_clock. By default
 * each node makes its own real clock (timers on the node's loop): wall-clock milliseconds as
 * read when the node opened, moving from then on with the monotonic clock, so that a step of
 * the system clock neither fires every timeout at once nor freezes them. Deadlines stored in
 * the database are wall-clock times; a restarted node reads them against its new start.
 * A manual clock lets a test or a simulation own time: nothing happens until
 * saga_clock_advance() moves it, and timers then fire in deadline order, synchronously,
 * so a run driven this way (with a seeded in-memory transport) is fully deterministic.
 *
 * With a manual clock no libsaga handle keeps the loop alive while there is nothing to do,
 * so the pattern for a deterministic run is:
 *
 *   for (;;) {
 *     while (uv_run(loop, UV_RUN_NOWAIT)) {}              // until quiescent
 *     if (done) break;
 *     if (saga_clock_advance_to_next(clock) == SAGA_ENOTFOUND) break;  // stuck
 *   }
 *
 * Thread: a clock belongs to the loop thread of the nodes that use it.
 */
#ifndef SAGA_CLOCK_H
#define SAGA_CLOCK_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** A clock: the real one (a node's default) or a manual one made by saga_clock_manual_new().
 * Opaque. */
typedef struct saga_clock saga_clock;

/**
 * A manual clock starting at start_ms (milliseconds since the epoch, or any origin you
 * like — stored deadlines are compared with it). alloc may be NULL.
 * Returns SAGA_OK, SAGA_EINVAL, SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_clock_manual_new(saga_clock **out, uint64_t start_ms,
                                      const saga_allocator *alloc);

/** Frees a clock. Every node and hub using it must be closed first. Accepts NULL. */
SAGA_EXTERN void saga_clock_free(saga_clock *c);

/** Current time in milliseconds. */
SAGA_EXTERN uint64_t saga_clock_now(const saga_clock *c);

/**
 * Manual clocks only: moves time forward by ms, firing each timer that falls due, in
 * deadline order, with the clock set to that timer's deadline while it runs.
 * Returns SAGA_OK or SAGA_EINVAL (not a manual clock).
 */
SAGA_EXTERN int saga_clock_advance(saga_clock *c, uint64_t ms);

/**
 * Manual clocks only: moves time to the earliest armed deadline and fires what is due then.
 * Returns SAGA_OK, SAGA_ENOTFOUND when no timer is armed, SAGA_EINVAL.
 */
SAGA_EXTERN int saga_clock_advance_to_next(saga_clock *c);

/** The earliest armed deadline in *out. SAGA_ENOTFOUND when none is armed. */
SAGA_EXTERN int saga_clock_next_deadline(const saga_clock *c, uint64_t *out);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_CLOCK_H */
