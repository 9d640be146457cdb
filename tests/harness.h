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
#include "servers.h" /* th_tmpdir, th_rmdir, th_path, servers */

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

/* ---- a small world for engine tests: one orchestrator node, one participant node --------- */

#define TH_MAX_STEPS 8
#define TH_MAX_EVENTS 200000

/* Behaviour of the test participant, per step: 'o' succeed, 'r' refuse (business failure),
 * 'e' technical error (SAGA_EINVAL). Compensations likewise. */
typedef struct th_world_opts {
  int nsteps;                        /* default 3 */
  saga_step_kind kinds[TH_MAX_STEPS];/* default compensatable */
  uint32_t timeout_ms[TH_MAX_STEPS]; /* default 0 */
  saga_retry retry[TH_MAX_STEPS];
  saga_retry comp_retry[TH_MAX_STEPS];
  uint32_t deadline_ms;
  unsigned skip_mask;                /* steps whose channel the participant node does not serve */
  saga_mem_faults faults;
  const saga_allocator *alloc;       /* for both nodes, NULL = libc */
  const char *vfs;                   /* SQLite VFS of both nodes */
  uint32_t resend_ms;                /* default 200 */
  uint32_t version;                  /* definition version, default 1 */
  int no_register;                   /* open without registering the definition */
  const char *dir;                   /* use this existing folder (kept by th_world_free) */
  const saga_retention *retention;   /* both nodes; NULL = no purging (the default here) */
  void (*hook)(void *arg, const char *point); /* test hook of both nodes */
  uint32_t checkpoint_pages;         /* nonzero: background checkpoints every this many pages */
  uint32_t batch_max;                /* both nodes; 0 = the library's default */
  void *hook_arg;
} th_world_opts;

typedef struct th_world {
  uv_loop_t loop;
  saga_clock *clock;
  saga_mem_hub *hub;
  char *dir;
  saga_node *orch, *part, *late;
  th_world_opts o;
  char action_mode[TH_MAX_STEPS], comp_mode[TH_MAX_STEPS];
  int ev_type[TH_MAX_EVENTS];
  int ev_step[TH_MAX_EVENTS];
  size_t nev;
  uint64_t terminal; /* terminal events seen */
  uint64_t handler_calls;
  int transient_left; /* the next this-many successful actions fail with SAGA_EBUSY first */
  uint64_t started_ok;
  int last_start_status;
  char last_id[40];
} th_world;

void th_world_defaults(th_world_opts *o);
/* Opens loop, manual clock, hub and both nodes (in a new temp dir). Returns SAGA_OK or the
 * error of the first call that failed. */
int th_world_open(th_world *w, const th_world_opts *o);
/* Closes nodes and hub (keeping the files) and drains the loop. */
void th_world_close_nodes(th_world *w);
/* Opens the nodes again on the same files (recovery). */
int th_world_reopen(th_world *w);
/* Closes everything and removes the temp dir. */
void th_world_free(th_world *w);
/* Opens a third node "late" serving the channels of skip_mask, on its own database. */
int th_world_open_late(th_world *w);
/* Starts a saga (input key "n" = i); returns saga_start's code. */
int th_world_start(th_world *w, int i, const char *idem_key);
/* Same, and the participant refuses step fail_step of this saga (input key "fail"), and
 * refuses attempt 1 of the compensation of step comp_fail_step (input key "cfail"), so
 * that its retry succeeds. -1 for none. */
int th_world_start_ex(th_world *w, int i, const char *idem_key, int fail_step,
                      int comp_fail_step);
/* Runs the world (manual time) until `count` terminal events were seen. */
int th_world_run_until_terminal(th_world *w, uint64_t count);
/* Runs until quiescent with no armed timer, or max_ms of clock time. */
void th_world_settle(th_world *w, uint64_t max_ms);
/* Effects recorded by the participant(s): kind "do" or "undo"; saga_id NULL = all sagas,
 * step -1 = all steps. */
int th_fx_count(th_world *w, const char *saga_id, int step, const char *kind);
/* The state of a saga in the orchestrator database, or -1. */
int th_saga_state(th_world *w, const char *saga_id);
/* Checks every saga of the orchestrator: terminal, and effects exactly once / undone in
 * reverse order. Returns 0 or -1 with a message printed. */
int th_check_invariants(th_world *w, int expect_all_terminal);
/* Count of events of a type in the log (step -2 = any). */
size_t th_count_events(th_world *w, int type, int step);

#endif
