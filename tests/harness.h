/* Shared test helpers: temporary folders, a counting/failing allocator, loop drivers. */
#ifndef SAGA_TEST_HARNESS_H
#define SAGA_TEST_HARNESS_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <uv.h>

#include "saga.h"

/* Makes a fresh temporary folder (under $TMPDIR or /tmp) and returns its path (static
 * storage per call site is not needed: the string is heap-allocated; free() it). */
char *th_tmpdir(void);
/* Removes a folder made by th_tmpdir() and everything in it, and frees the path. */
void th_rmdir(char *path);
/* path = dir + "/" + name, heap-allocated. */
char *th_path(const char *dir, const char *name);

/* A counting allocator that can fail the N-th allocation (fail_at = 0: never). */
typedef struct th_alloc {
  saga_allocator a;
  uint64_t count;     /* allocations made so far */
  uint64_t fail_at;   /* 1-based allocation to fail; 0 = none */
  uint64_t failed;    /* how many were failed */
  int64_t live;       /* allocations not yet freed */
  int fail_all_after; /* once one failed, fail every later one too */
} th_alloc;
void th_alloc_init(th_alloc *t);

/* Drives a loop under a manual clock until pred(arg) is true: runs the loop until it is
 * quiescent, then advances the clock to its next deadline, and so on. Returns 0 when pred
 * became true, -1 when nothing was left to do (stuck) or max_ms of clock time passed. */
int th_run_manual(uv_loop_t *loop, saga_clock *clock, int (*pred)(void *), void *arg,
                  uint64_t max_ms);

/* Runs the loop (real time) until pred(arg) is true or timeout_ms of real time passed.
 * Returns 0 on pred, -1 on timeout. A safety net, not a synchronisation: the predicate is
 * what the test waits for. */
int th_run_real(uv_loop_t *loop, int (*pred)(void *), void *arg, uint64_t timeout_ms);

/* Runs the loop until no handle is left (after closing nodes/hubs). */
void th_drain(uv_loop_t *loop);

/* A seed from $SAGA_SEED or the given default; printed so a failing run can be replayed. */
uint64_t th_seed(uint64_t dflt);

#endif
