/* The orchestrator's state machine, path by path, on a manual clock over the in-memory hub. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <errno.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sqlite3.h>

#include "harness.h"
#include "internal.h" /* saga__csprng */

static void done_cb(saga_node *n, int status, void *arg) { *(int *)arg = status; }

static void open_world(th_world *w, const th_world_opts *o) {
  int rc = th_world_open(w, o);
  assert_int_equal(rc, SAGA_OK);
}

static void run_one(th_world *w) {
  assert_int_equal(th_world_start(w, 1, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(w, 1), 0);
  assert_int_equal(w->last_start_status, SAGA_OK);
}

static void test_success(void **state) {
  th_world w;
  open_world(&w, NULL);
  run_one(&w);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPLETED);
  for (int s = 0; s < 3; s++) {
    assert_int_equal(th_fx_count(&w, w.last_id, s, "do"), 1);
    assert_int_equal(th_fx_count(&w, w.last_id, s, "undo"), 0);
  }
  assert_int_equal(th_count_events(&w, SAGA_EV_STEP_SUCCEEDED, -2), 3);
  assert_int_equal(th_count_events(&w, SAGA_EV_COMPLETED, -2), 1);
  /* Reply data of every step was merged into the saga data. */
  saga_info *info = NULL;
  assert_int_equal(saga_get(w.orch, w.last_id, &info), SAGA_OK);
  assert_string_equal(saga_data_get_str(info->data, "s2"), "done");
  assert_string_equal(saga_data_get_str(info->data, "n"), "1");
  saga_info_free(info);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

/* The counters behind /metrics: sagas by state and the step-latency histogram. */
static void test_metrics(void **state) {
  th_world w;
  open_world(&w, NULL);
  run_one(&w);
  w.action_mode[1] = 'r';
  assert_int_equal(th_world_start(&w, 2, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 2), 0);
  int64_t counts[6];
  assert_int_equal(saga_node_count_by_state(w.orch, counts), SAGA_OK);
  assert_int_equal(counts[SAGA_COMPLETED], 1);
  assert_int_equal(counts[SAGA_COMPENSATED], 1);
  assert_int_equal(counts[SAGA_RUNNING] + counts[SAGA_COMPENSATING] + counts[SAGA_FAILED], 0);
  assert_int_equal(saga_node_count_by_state(NULL, counts), SAGA_EINVAL);
  /* 3 replies of the first saga, then action 0, action 1 (refused), compensation 0. */
  saga_node_stats st;
  saga_node_stats_get(w.orch, &st, sizeof st);
  assert_int_equal(st.step_latency_count, 6);
  uint64_t sum = 0;
  for (int b = 0; b < SAGA_LATENCY_BUCKETS; b++) sum += st.step_latency[b];
  assert_int_equal(sum, 6);
  /* The manual clock does not move while the loop runs: every latency is 0 ms. */
  assert_int_equal(st.step_latency[0], 6);
  assert_int_equal(st.step_latency_sum_ms, 0);
  assert_int_equal(saga_latency_bound_ms(0), 1);
  assert_int_equal(saga_latency_bound_ms(SAGA_LATENCY_BUCKETS - 2), 10000);
  assert_int_equal(saga_latency_bound_ms(SAGA_LATENCY_BUCKETS - 1), UINT32_MAX);
  assert_int_equal(saga_latency_bound_ms(-1), UINT32_MAX);
  th_world_free(&w);
}

/* A reply that arrives after the clock moved lands in the bucket of its latency. */
static void test_metrics_latency(void **state) {
  th_world w;
  th_world_opts o;
  th_world_defaults(&o);
  o.nsteps = 1;
  o.skip_mask = 1; /* nobody serves step 0 until the late node opens */
  open_world(&w, &o);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  th_world_settle(&w, 0);
  assert_int_equal(saga_clock_advance(w.clock, 30), SAGA_OK);
  assert_int_equal(th_world_open_late(&w), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  saga_node_stats st;
  saga_node_stats_get(w.orch, &st, sizeof st);
  assert_int_equal(st.step_latency_count, 1);
  assert_true(st.step_latency_sum_ms >= 30);
  assert_int_equal(st.step_latency[5], 1); /* (25, 50] */
  th_world_free(&w);
}

/* The relay resends at most batch_max unconfirmed rows per resend tick, oldest first,
 * resuming where the previous tick stopped: a backlog is not resent all at once every tick,
 * and every row still gets its turn. */
static void test_resend_paced(void **state) {
  th_world w;
  th_world_opts o;
  th_world_defaults(&o);
  o.nsteps = 1;
  o.skip_mask = 1; /* nobody serves step 0 until the late node opens */
  o.batch_max = 4;
  open_world(&w, &o);
  for (int i = 0; i < 10; i++) assert_int_equal(th_world_start(&w, i, NULL), SAGA_OK);
  th_world_settle(&w, 0);
  assert_int_equal(saga_node_outbox_depth(w.orch), 10);
  saga_node_stats st;
  uint64_t want[] = {4, 8, 10, 14};
  for (int tick = 0; tick < 4; tick++) {
    assert_int_equal(saga_clock_advance(w.clock, o.resend_ms), SAGA_OK);
    th_world_settle(&w, 0);
    saga_node_stats_get(w.orch, &st, sizeof st);
    assert_int_equal(st.resent, want[tick]);
  }
  assert_int_equal(th_world_open_late(&w), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 10), 0);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

/* Failure at step k: steps k-1 .. 0 are compensated in that order; step k never applied. */
static void test_failure_each_step(void **state) {
  for (int k = 0; k < 3; k++) {
    th_world w;
    open_world(&w, NULL);
    w.action_mode[k] = 'r';
    run_one(&w);
    assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
    for (int s = 0; s < 3; s++) {
      assert_int_equal(th_fx_count(&w, w.last_id, s, "do"), s < k ? 1 : 0);
      assert_int_equal(th_fx_count(&w, w.last_id, s, "undo"), s < k ? 1 : 0);
    }
    assert_int_equal(th_count_events(&w, SAGA_EV_STEP_FAILED, k), 1);
    assert_int_equal(th_count_events(&w, SAGA_EV_COMPENSATED, -2), (size_t)k);
    assert_int_equal(th_check_invariants(&w, 1), 0);
    th_world_free(&w);
  }
}

/* A technical error of a handler rolls its writes back, dead-letters the message and fails
 * the step like a refusal, so the saga never hangs. */
static void test_handler_error(void **state) {
  th_world w;
  open_world(&w, NULL);
  w.action_mode[1] = 'e';
  run_one(&w);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
  assert_int_equal(th_fx_count(&w, w.last_id, 1, "do"), 0);
  saga_node_stats st;
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.dead_letters, 1);
  th_world_free(&w);
}

/* A transient handler error (busy, I/O, memory) records nothing and acknowledges nothing:
 * the command is delivered again from the sender's outbox and then applies exactly once. */
static void test_transient_handler_error(void **state) {
  th_world w;
  open_world(&w, NULL);
  w.transient_left = 3;
  run_one(&w);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPLETED);
  assert_int_equal(w.transient_left, 0);
  for (int s = 0; s < 3; s++) assert_int_equal(th_fx_count(&w, w.last_id, s, "do"), 1);
  saga_node_stats st;
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.dead_letters, 0);
  assert_true(st.handler_runs >= 6);
  th_world_free(&w);
}

/* A command failing transiently every time is dead-lettered after max_deliveries (10)
 * deliveries and answered with a failure: the saga compensates instead of looping. */
static void test_transient_cap(void **state) {
  th_world w;
  open_world(&w, NULL);
  w.transient_left = 1000000;
  run_one(&w);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
  assert_int_equal(1000000 - w.transient_left, 10);
  saga_node_stats st;
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.dead_letters, 1);
  th_world_free(&w);
}

static void test_pivot_refused(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.kinds[1] = SAGA_STEP_PIVOT;
  o.kinds[2] = SAGA_STEP_RETRIABLE;
  th_world w;
  open_world(&w, &o);
  w.action_mode[1] = 'r';
  run_one(&w);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
  assert_int_equal(th_fx_count(&w, w.last_id, 0, "undo"), 1);
  assert_int_equal(th_fx_count(&w, w.last_id, 2, "do"), 0);
  th_world_free(&w);
}

static int retries_seen(void *arg) {
  th_world *w = arg;
  return th_count_events(w, SAGA_EV_STEP_RETRY, 2) >= 4;
}

/* After the pivot a retriable step is retried until it succeeds, never compensated, and
 * cannot be cancelled. */
static void test_retriable_after_pivot(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.kinds[1] = SAGA_STEP_PIVOT;
  o.kinds[2] = SAGA_STEP_RETRIABLE;
  o.retry[2].max_attempts = 1; /* ignored for retriable steps: they retry forever */
  o.retry[2].backoff_ms = 10;
  th_world w;
  open_world(&w, &o);
  w.action_mode[2] = 'r';
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, retries_seen, &w, 600000), 0);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_RUNNING);
  int cancel_status = 1;
  assert_int_equal(saga_cancel(w.orch, w.last_id, done_cb, &cancel_status), SAGA_OK);
  w.action_mode[2] = 'o';
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(cancel_status, SAGA_ESTATE);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPLETED);
  assert_int_equal(th_fx_count(&w, w.last_id, 2, "do"), 1);
  assert_int_equal(th_fx_count(&w, NULL, -1, "undo"), 0);
  th_world_free(&w);
}

/* retry_before_compensate: a refused attempt is retried up to max_attempts. */
static void test_retry_before_compensate(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.retry[1].max_attempts = 3;
  o.retry[1].backoff_ms = 5;
  o.retry[1].retry_before_compensate = 1;
  th_world w;
  open_world(&w, &o);
  w.action_mode[1] = 'r';
  run_one(&w);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
  assert_int_equal(th_count_events(&w, SAGA_EV_STEP_FAILED, 1), 3);
  assert_int_equal(th_count_events(&w, SAGA_EV_STEP_RETRY, 1), 2);
  th_world_free(&w);
}

static int comp_sent_for(void *arg) {
  th_world *w = arg;
  return th_count_events(w, SAGA_EV_COMPENSATION_SENT, w->o.nsteps - 1 - 0) > 0 ||
         w->terminal > 0;
}

typedef struct {
  th_world *w;
  int step;
} step_ctx;

static int comp_sent_step(void *arg) {
  step_ctx *c = arg;
  return th_count_events(c->w, SAGA_EV_COMPENSATION_SENT, c->step) > 0;
}

/* Timeout of step k: retried, then compensated including step k itself (its outcome is
 * unknown). The participant, reachable only late, applies the action and then its
 * compensation; the late reply is ignored as stale. */
static void test_timeout_each_step(void **state) {
  (void)comp_sent_for;
  for (int k = 0; k < 3; k++) {
    th_world_opts o;
    th_world_defaults(&o);
    o.skip_mask = 1u << k;
    o.timeout_ms[k] = 100;
    o.retry[k].max_attempts = 2;
    o.retry[k].backoff_ms = 10;
    th_world w;
    open_world(&w, &o);
    assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
    step_ctx c = {&w, k};
    assert_int_equal(th_run_manual(&w.loop, w.clock, comp_sent_step, &c, 600000), 0);
    assert_int_equal(th_count_events(&w, SAGA_EV_STEP_TIMED_OUT, k), 2);
    assert_int_equal((th_world_open_late(&w) == SAGA_OK ? 0 : -1), 0);
    assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
    assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
    for (int s = 0; s <= k; s++) {
      assert_int_equal(th_fx_count(&w, w.last_id, s, "do"), 1);
      assert_int_equal(th_fx_count(&w, w.last_id, s, "undo"), 1);
    }
    th_world_settle(&w, 10000);
    assert_true(th_count_events(&w, SAGA_EV_STALE_REPLY, k) >= 1);
    assert_int_equal(th_check_invariants(&w, 1), 0);
    th_world_free(&w);
  }
}

/* A pivot that times out is resolved by asking its participant. */
static void test_pivot_timeout_resolve(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.kinds[1] = SAGA_STEP_PIVOT;
  o.kinds[2] = SAGA_STEP_RETRIABLE;
  o.skip_mask = 1u << 1;
  o.timeout_ms[1] = 50;
  th_world w;
  open_world(&w, &o);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  th_world_settle(&w, 60);
  assert_true(th_count_events(&w, SAGA_EV_RESOLVE_SENT, 1) >= 1);
  /* The pivot's participant comes up: it sees the action first, then the question. */
  assert_int_equal((th_world_open_late(&w) == SAGA_OK ? 0 : -1), 0);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPLETED);
  assert_int_equal(th_fx_count(&w, w.last_id, 1, "do"), 1);
  th_world_free(&w);
}

static void test_idempotent_start(void **state) {
  th_world w;
  open_world(&w, NULL);
  assert_int_equal(th_world_start(&w, 1, "key-1"), SAGA_OK);
  assert_int_equal(th_world_start(&w, 2, "key-1"), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  th_world_settle(&w, 10000);
  char first[40];
  snprintf(first, sizeof first, "%s", w.last_id);
  assert_int_equal(th_world_start(&w, 3, "key-1"), SAGA_OK);
  th_world_settle(&w, 10000);
  assert_string_equal(first, w.last_id);
  assert_int_equal(w.terminal, 1);
  assert_int_equal(th_fx_count(&w, NULL, 0, "do"), 1);
  th_world_free(&w);
}

static int step_sent(void *arg) {
  step_ctx *c = arg;
  return th_count_events(c->w, SAGA_EV_STEP_SENT, c->step) > 0;
}

static void test_cancel(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.skip_mask = 1u << 1; /* step 1 never answers: the saga waits there */
  th_world w;
  open_world(&w, &o);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  step_ctx c = {&w, 1};
  assert_int_equal(th_run_manual(&w.loop, w.clock, step_sent, &c, 60000), 0);
  int status = 1;
  assert_int_equal(saga_cancel(w.orch, w.last_id, done_cb, &status), SAGA_OK);
  /* The in-flight step 1 is compensated too; its participant must come up to confirm. */
  th_world_settle(&w, 50);
  assert_int_equal(status, SAGA_OK);
  assert_int_equal((th_world_open_late(&w) == SAGA_OK ? 0 : -1), 0);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
  assert_int_equal(th_count_events(&w, SAGA_EV_CANCELLED, -2), 1);
  assert_int_equal(th_fx_count(&w, w.last_id, 0, "undo"), 1);
  /* Cancelling a finished saga, or an unknown one, fails through the callback. */
  status = 1;
  assert_int_equal(saga_cancel(w.orch, w.last_id, done_cb, &status), SAGA_OK);
  th_world_settle(&w, 50);
  assert_int_equal(status, SAGA_ESTATE);
  assert_int_equal(saga_cancel(w.orch, "nope", done_cb, &status), SAGA_OK);
  th_world_settle(&w, 50);
  assert_int_equal(status, SAGA_ENOTFOUND);
  th_world_free(&w);
}

static void test_deadline(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.skip_mask = 1u << 2;
  o.deadline_ms = 500;
  th_world w;
  open_world(&w, &o);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  th_world_settle(&w, 1000);
  assert_int_equal(th_count_events(&w, SAGA_EV_CANCELLED, -2), 1);
  assert_int_equal((th_world_open_late(&w) == SAGA_OK ? 0 : -1), 0);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

/* A compensation that keeps failing ends FAILED with the reason; saga_retry_failed() resumes
 * it once the participant is repaired. */
static void test_compensation_failed_and_retry(void **state) {
  th_world w;
  open_world(&w, NULL);
  w.action_mode[2] = 'r';
  w.comp_mode[0] = 'r';
  run_one(&w);
  saga_info *info = NULL;
  assert_int_equal(saga_get(w.orch, w.last_id, &info), SAGA_OK);
  assert_int_equal(info->state, SAGA_FAILED);
  assert_non_null(strstr(info->error, "compensation of S0"));
  saga_info_free(info);
  assert_int_equal(th_count_events(&w, SAGA_EV_COMPENSATION_FAILED, 0), 1);
  w.comp_mode[0] = 'o';
  int status = 1;
  assert_int_equal(saga_retry_failed(w.orch, w.last_id, done_cb, &status), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 2), 0);
  assert_int_equal(status, SAGA_OK);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

static int comp0_refused_20(void *arg) {
  return th_count_events(arg, SAGA_EV_STEP_FAILED, 0) >= 20;
}

/* A compensation policy that never gives up: a compensation refused 20 times (the participant
 * "down") is retried until it succeeds, and the saga ends COMPENSATED, never FAILED. */
static void test_compensation_retry_forever(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.comp_retry[0] = (saga_retry){.max_attempts = SAGA_RETRY_FOREVER, .backoff_ms = 10,
                                 .cap_ms = 1000};
  th_world w;
  open_world(&w, &o);
  w.action_mode[2] = 'r';
  w.comp_mode[0] = 'r';
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, comp0_refused_20, &w, 3600000), 0);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATING);
  w.comp_mode[0] = 'o';
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPENSATED);
  assert_int_equal(th_count_events(&w, SAGA_EV_SAGA_FAILED, -2), 0);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

/* A finite compensation policy is used as given (5 attempts, not the action's 1 or 3). */
static void test_compensation_retry_finite(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.comp_retry[1] = (saga_retry){.max_attempts = 5, .backoff_ms = 10};
  th_world w;
  open_world(&w, &o);
  w.action_mode[2] = 'r';
  w.comp_mode[1] = 'r';
  run_one(&w);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_FAILED);
  assert_int_equal(th_count_events(&w, SAGA_EV_COMPENSATION_SENT, 1), 5);
  assert_int_equal(th_count_events(&w, SAGA_EV_STEP_RETRY, 1), 4);
  /* Step 0 kept the default: never reached, the saga stopped at step 1. */
  assert_int_equal(th_count_events(&w, SAGA_EV_COMPENSATION_SENT, 0), 0);
  th_world_free(&w);
}

/* The run-time builder (for bindings) gives the same table, and checks its arguments. */
static void test_builder(void **state) {
  saga_def_builder *b = NULL;
  assert_int_equal(saga_def_builder_new(&b, "", 1, NULL), SAGA_EINVAL);
  assert_int_equal(saga_def_builder_new(&b, "trip", 0, NULL), SAGA_EINVAL);
  assert_int_equal(saga_def_builder_new(&b, "trip", 2, NULL), SAGA_OK);
  assert_int_equal(saga_def_builder_add_step(b, "HOTEL", "hotel", "book", "cancel",
                                             SAGA_STEP_COMPENSATABLE), 0);
  assert_int_equal(saga_def_builder_add_step(b, "PAY", "pay", "charge", NULL, SAGA_STEP_PIVOT),
                   1);
  assert_int_equal(saga_def_builder_set_retry(b, 0, 4, 50, 2, 1000, 0.5, 1), SAGA_OK);
  assert_int_equal(saga_def_builder_set_retry(b, 2, 4, 50, 2, 1000, 0.5, 1), SAGA_EINVAL);
  assert_int_equal(saga_def_builder_set_retry(b, 0, 4, 50, 2, 1000, 1.5, 1), SAGA_EINVAL);
  assert_int_equal(saga_def_builder_set_compensation_retry(b, 0, SAGA_RETRY_FOREVER, 10, 3, 500,
                                                           0.2), SAGA_OK);
  assert_int_equal(saga_def_builder_set_compensation_retry(b, -1, 1, 0, 0, 0, 0), SAGA_EINVAL);
  assert_int_equal(saga_def_builder_set_compensation_retry(b, 0, 1, 0, -1, 0, 0), SAGA_EINVAL);
  assert_int_equal(saga_def_builder_set_timeout(b, 1, 250), SAGA_OK);
  const saga_definition *d = saga_def_builder_definition(b);
  assert_non_null(d);
  assert_int_equal(d->nsteps, 2);
  assert_int_equal(d->version, 2);
  assert_int_equal(d->steps[0].retry.max_attempts, 4);
  assert_int_equal(d->steps[0].compensation_retry.max_attempts, SAGA_RETRY_FOREVER);
  assert_int_equal(d->steps[0].compensation_retry.cap_ms, 500);
  assert_int_equal(d->steps[1].timeout_ms, 250);
  char err[128];
  assert_int_equal(saga_definition_validate(d, err, sizeof err), SAGA_OK);
  saga_def_builder_free(b);
  saga_step bad = {.name = "X", .channel = "c", .action = "a"};
  bad.compensation_retry.jitter = 2;
  saga_definition bd = {.name = "bad", .version = 1, .steps = &bad, .nsteps = 1};
  assert_int_equal(saga_definition_validate(&bd, err, sizeof err), SAGA_EDEFINITION);
  assert_non_null(strstr(err, "compensation retry"));
}

/* Every message duplicated: handlers still run once per step, stale replies are ignored. */
static void test_duplicates(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.faults.seed = 7;
  o.faults.duplicate = 1.0;
  th_world w;
  open_world(&w, &o);
  for (int i = 0; i < 20; i++) assert_int_equal(th_world_start(&w, i, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 20), 0);
  th_world_settle(&w, 5000);
  assert_int_equal(w.handler_calls, 60);
  assert_true(th_count_events(&w, SAGA_EV_STALE_REPLY, -2) > 0);
  saga_node_stats st;
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_true(st.duplicates > 0);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

/* An instance finishes on its own version; a missing version is reported, not guessed. */
static void test_version_pinning(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.skip_mask = 1u << 2; /* waits at step 2 */
  th_world w;
  open_world(&w, &o);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  step_ctx c = {&w, 2};
  assert_int_equal(th_run_manual(&w.loop, w.clock, step_sent, &c, 60000), 0);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  /* Restart with only version 2 registered (a 2-step definition). */
  w.o.version = 2;
  w.o.nsteps = 2;
  w.o.skip_mask = 0;
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  assert_int_equal(th_count_events(&w, SAGA_EV_DEFINITION_MISSING, -2), 1);
  th_world_settle(&w, 5000);
  assert_int_equal(th_saga_state(&w, id), SAGA_RUNNING);
  /* Restart with version 1 again: it finishes its 3 steps. */
  w.o.version = 1;
  w.o.nsteps = 3;
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPLETED);
  assert_int_equal(th_fx_count(&w, id, 2, "do"), 1);
  th_world_free(&w);
}

/* A reply for a saga whose definition version the orchestrator has not registered (a
 * rolling upgrade that dropped it) is parked in the database and acknowledged: a broker
 * would otherwise dead-letter it after max_deliveries and the saga would wait for ever. Once
 * a node with that version registered starts on the database, the parked reply is applied. */
static void test_reply_parked_until_registered(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.skip_mask = 1u << 2; /* waits at step 2 */
  th_world w;
  open_world(&w, &o);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  step_ctx c = {&w, 2};
  assert_int_equal(th_run_manual(&w.loop, w.clock, step_sent, &c, 60000), 0);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  /* Restart with only version 2 registered (same steps); now step 2 is served and answered. */
  w.o.version = 2;
  w.o.skip_mask = 0;
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  th_world_settle(&w, 5000);
  saga_node_stats st;
  saga_node_stats_get(w.orch, &st, sizeof st);
  assert_int_equal(st.replies_parked, 1); /* the answer to step 2; late copies of earlier
                                           * answers do not answer the last command: ignored */
  sqlite3_stmt *pq = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(w.orch), "SELECT count(*) FROM"
                                      " saga_parked_reply", -1, &pq, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(pq), SQLITE_ROW);
  assert_int_equal(sqlite3_column_int(pq, 0), 1);
  sqlite3_finalize(pq);
  /* Acknowledged: the participant holds nothing more to send (before: its reply stayed
   * unconfirmed, resent for ever, and a broker dead-lettered it). */
  assert_int_equal(saga_node_outbox_depth(w.part), 0);
  assert_int_equal(th_fx_count(&w, id, 2, "do"), 1);
  assert_int_equal(th_saga_state(&w, id), SAGA_RUNNING);
  /* Version 1 is back: its parked reply is applied at start, nothing is asked again. */
  w.o.version = 1;
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPLETED);
  assert_int_equal(th_fx_count(&w, id, 2, "do"), 1);
  sqlite3_stmt *q = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(w.orch), "SELECT count(*) FROM"
                                      " saga_parked_reply", -1, &q, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(q), SQLITE_ROW);
  assert_int_equal(sqlite3_column_int(q, 0), 0);
  sqlite3_finalize(q);
  th_world_free(&w);
}

/* ---- saga_node_watch ----------------------------------------------------------------------- */

typedef struct watched {
  int calls, status;
  saga_state state;
  char id[40];
} watched;

static void on_watch(saga_node *n, int status, const char *saga_id, saga_state state,
                     void *arg) {
  (void)n;
  watched *w = arg;
  w->calls++;
  w->status = status;
  w->state = state;
  snprintf(w->id, sizeof w->id, "%s", saga_id);
}

static int watch_told(void *arg) { return ((watched *)arg)->calls > 0; }

/* A watcher is told once, after the commit, of the terminal state its saga reached; for a
 * saga that is terminal already, on a later loop turn (never inside the call). */
static void test_watch(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.skip_mask = 1u << 1; /* waits at step 1 until the late node serves it */
  th_world w;
  open_world(&w, &o);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  step_ctx c = {&w, 1};
  assert_int_equal(th_run_manual(&w.loop, w.clock, step_sent, &c, 60000), 0);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  watched a = {0}, b = {0}, none = {0};
  assert_int_equal(saga_node_watch(w.orch, id, on_watch, &a), SAGA_OK);
  assert_int_equal(saga_node_watch(w.orch, id, on_watch, &b), SAGA_OK);
  assert_int_equal(saga_node_watch(w.orch, "00000000000000000000000000000000", on_watch,
                                   &none), SAGA_ENOTFOUND);
  assert_int_equal(saga_node_watch(w.orch, id, NULL, NULL), SAGA_EINVAL);
  th_world_settle(&w, 2000);
  assert_int_equal(a.calls, 0); /* still running */
  assert_int_equal(th_world_open_late(&w), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, watch_told, &b, 60000), 0);
  assert_int_equal(a.calls, 1);
  assert_int_equal(b.calls, 1);
  assert_int_equal(a.status, SAGA_OK);
  assert_int_equal(a.state, SAGA_COMPLETED);
  assert_string_equal(a.id, id);
  /* Terminal already: told on a later turn, not inside the call. */
  watched late = {0};
  assert_int_equal(saga_node_watch(w.orch, id, on_watch, &late), SAGA_OK);
  assert_int_equal(late.calls, 0);
  assert_int_equal(th_run_manual(&w.loop, w.clock, watch_told, &late, 60000), 0);
  assert_int_equal(late.calls, 1);
  assert_int_equal(late.state, SAGA_COMPLETED);
  /* A compensated saga. */
  watched comp = {0};
  assert_int_equal(th_world_start_ex(&w, 2, NULL, 0, -1), SAGA_OK);
  th_world_settle(&w, 0);
  assert_int_equal(saga_node_watch(w.orch, w.last_id, on_watch, &comp), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, watch_told, &comp, 60000), 0);
  assert_int_equal(comp.state, SAGA_COMPENSATED);
  /* Told once only. */
  th_world_settle(&w, 5000);
  assert_int_equal(a.calls + b.calls + late.calls + comp.calls, 4);
  th_world_free(&w);
}

/* The pattern for a service that restarts: a watch is not durable; the saga is found again
 * by its idempotency key and watched again. A watcher left when the node closes is told
 * SAGA_ECLOSED. */
static void test_watch_across_restart(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.skip_mask = 1u << 1;
  th_world w;
  open_world(&w, &o);
  assert_int_equal(th_world_start(&w, 1, "order-7"), SAGA_OK);
  step_ctx c = {&w, 1};
  assert_int_equal(th_run_manual(&w.loop, w.clock, step_sent, &c, 60000), 0);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  watched before = {0};
  assert_int_equal(saga_node_watch(w.orch, id, on_watch, &before), SAGA_OK);
  /* The service stops (its watcher hears of it) and comes back serving step 1. */
  w.o.skip_mask = 0;
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  assert_int_equal(before.calls, 1);
  assert_int_equal(before.status, SAGA_ECLOSED);
  /* Found again by its key (the same saga, not a new one), then watched again. */
  w.last_id[0] = '\0';
  assert_int_equal(th_world_start(&w, 1, "order-7"), SAGA_OK);
  th_world_settle(&w, 0);
  assert_string_equal(w.last_id, id);
  watched after = {0};
  assert_int_equal(saga_node_watch(w.orch, id, on_watch, &after), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, watch_told, &after, 60000), 0);
  assert_int_equal(after.status, SAGA_OK);
  assert_int_equal(after.state, SAGA_COMPLETED);
  assert_int_equal(th_fx_count(&w, id, 1, "do"), 1);
  th_world_free(&w);
}

/* Group commit without a savepoint per item: an item that fails after writing makes the
 * node roll the transaction back and run it again with a savepoint per item. Here the
 * participant's first run of step 1 leaves a trigger that makes its reply's outbox insert
 * fail, after the handler's effect, the step record and the inbox row were written. The
 * replay (which also undoes the trigger) must apply the step exactly once and go on. */
typedef struct replay_hook {
  th_world *w;
  int armed, fired;
} replay_hook;

static void replay_hook_fn(void *arg, const char *point) {
  replay_hook *h = arg;
  if (strcmp(point, "participant.after_handler") != 0 || h->w->part == NULL) return;
  if (!h->armed || h->fired || h->w->handler_calls != 2) return;
  h->fired = 1;
  char *err = NULL;
  int rc = sqlite3_exec(saga_node_db(h->w->part),
                        "CREATE TEMP TRIGGER fail_reply BEFORE INSERT ON saga_outbox"
                        " BEGIN SELECT RAISE(ABORT, 'injected'); END",
                        NULL, NULL, &err);
  if (rc != SQLITE_OK) printf("trigger: %s\n", err ? err : "?");
  sqlite3_free(err);
}

static void test_item_failure_replayed(void **state) {
  th_world w;
  th_world_opts o;
  replay_hook h = {&w, 0, 0};
  th_world_defaults(&o);
  o.hook = replay_hook_fn;
  o.hook_arg = &h;
  open_world(&w, &o);
  h.armed = 1;
  run_one(&w);
  assert_int_equal(h.fired, 1);
  assert_int_equal(th_saga_state(&w, w.last_id), SAGA_COMPLETED);
  for (int s = 0; s < 3; s++) assert_int_equal(th_fx_count(&w, w.last_id, s, "do"), 1);
  /* Step 1's handler ran twice: once in the rolled-back try, once in the replay. */
  assert_int_equal(w.handler_calls, 4);
  saga_node_stats st;
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.replayed_tx, 1);
  assert_int_equal(st.handler_runs, 3); /* counters are those of the committed try */
  saga_node_stats_get(w.orch, &st, sizeof st);
  assert_int_equal(st.replayed_tx, 0);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

/* Outbox ids never repeat: not after the outbox emptied, not after a restart. Otherwise a
 * late confirmation of a deleted row could delete a newer, unsent one. */
static int64_t outbox_mark(saga_node *n) {
  sqlite3_stmt *st = NULL;
  int64_t v = -1;
  if (sqlite3_prepare_v2(saga_node_db(n), "SELECT value FROM saga_meta WHERE key = 'outbox_id'",
                         -1, &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

typedef struct terminal_ctx {
  th_world *w;
  uint64_t count;
} terminal_ctx;

static int terminal_reached(void *arg) {
  terminal_ctx *c = arg;
  return c->w->terminal >= c->count;
}

/* A due saga whose timer fails (its row no longer fits its definition) fails alone: the
 * timers of the others in the same transaction still run, and the node commits. */
static void test_due_isolated(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.skip_mask = 1u << 1; /* step 1 never answers: every saga times out there */
  o.timeout_ms[1] = 100;
  o.retry[1].max_attempts = 1;
  th_world w;
  open_world(&w, &o);
  for (int i = 0; i < 3; i++) assert_int_equal(th_world_start(&w, i, NULL), SAGA_OK);
  th_world_settle(&w, 50);
  assert_int_equal(th_count_events(&w, SAGA_EV_STEP_SENT, 1), 3);
  assert_int_equal(sqlite3_exec(saga_node_db(w.orch),
                                "UPDATE saga_instance SET step = 99 WHERE id ="
                                " (SELECT min(id) FROM saga_instance)",
                                NULL, NULL, NULL),
                   SQLITE_OK);
  terminal_ctx c = {&w, 2};
  assert_int_equal(th_run_manual(&w.loop, w.clock, terminal_reached, &c, 60000), 0);
  assert_true(th_count_events(&w, SAGA_EV_STEP_TIMED_OUT, 1) >= 2); /* the other two ran on */
  saga_node_stats st;
  saga_node_stats_get(w.orch, &st, sizeof st);
  assert_int_equal(st.commit_failures, 0);
  sqlite3_stmt *q = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(w.orch),
                                      "SELECT state, step FROM saga_instance WHERE id ="
                                      " (SELECT min(id) FROM saga_instance)",
                                      -1, &q, NULL),
                   SQLITE_OK);
  assert_int_equal(sqlite3_step(q), SQLITE_ROW);
  assert_int_equal(sqlite3_column_int(q, 0), SAGA_RUNNING); /* left as it was */
  assert_int_equal(sqlite3_column_int(q, 1), 99);
  sqlite3_finalize(q);
  th_world_free(&w);
}

static void test_outbox_ids_not_reused(void **state) {
  th_world w;
  open_world(&w, NULL);
  run_one(&w);
  th_world_settle(&w, 10000);
  assert_int_equal(saga_node_outbox_depth(w.orch), 0);
  int64_t before = outbox_mark(w.orch);
  assert_int_equal(before, 3); /* three commands */
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  assert_int_equal(th_world_start(&w, 2, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 2), 0);
  assert_int_equal(outbox_mark(w.orch), before + 3);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

/* SAGA_CHECKPOINT_BACKGROUND: checkpoints run in a worker thread (and inline at the bound);
 * the sagas are unaffected, and closing waits for a pass still running. */
static void test_background_checkpoint(void **state) {
  th_world w;
  th_world_opts o;
  th_world_defaults(&o);
  o.checkpoint_pages = 8;
  open_world(&w, &o);
  for (int i = 0; i < 60; i++) assert_int_equal(th_world_start(&w, i, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 60), 0);
  saga_node_stats so, sp;
  saga_node_stats_get(w.orch, &so, sizeof so);
  saga_node_stats_get(w.part, &sp, sizeof sp);
  assert_true(so.checkpoints >= 1);
  assert_true(sp.checkpoints >= 1);
  assert_int_equal(so.checkpoint_failures + sp.checkpoint_failures, 0);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

static void test_api_errors(void **state) {
  th_world w;
  open_world(&w, NULL);
  assert_int_equal(saga_start(w.orch, "nope", NULL, NULL, NULL, NULL), SAGA_ENODEF);
  assert_non_null(strstr(saga_node_errmsg(w.orch), "nope"));
  assert_int_equal(saga_start(w.orch, "test", NULL, "", NULL, NULL), SAGA_EINVAL);
  assert_int_equal(saga_start(NULL, "test", NULL, NULL, NULL, NULL), SAGA_EINVAL);
  assert_int_equal(saga_node_register(w.orch, NULL), SAGA_EINVAL);
  saga_step bad[2] = {{.name = "A", .channel = "c", .action = "a", .kind = SAGA_STEP_PIVOT},
                      {.name = "B", .channel = "c", .action = "b"}};
  saga_definition d = {SAGA_DEFINITION_VERSION, "bad", 1, bad, 2, 0, sizeof(saga_step)};
  char err[200];
  assert_int_equal(saga_definition_validate(&d, err, sizeof err), SAGA_EDEFINITION);
  assert_non_null(strstr(err, "cannot follow the pivot"));
  assert_int_equal(saga_node_register(w.orch, &d), SAGA_ESTATE); /* already started */
  saga_info *info = NULL;
  assert_int_equal(saga_get(w.orch, "missing", &info), SAGA_ENOTFOUND);
  assert_null(info);
  /* An unknown checkpoint mode is refused with a clear message. */
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w.hub), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  char *path = th_path(w.dir, "bad_ckpt.db");
  cfg.name = "bad";
  cfg.db_path = path;
  cfg.transport = t;
  cfg.checkpoint = (saga_checkpoint_mode)7;
  saga_node *bad_node = NULL;
  assert_int_equal(saga_node_open(&bad_node, &w.loop, &cfg, err, sizeof err), SAGA_EINVAL);
  assert_null(bad_node);
  assert_non_null(strstr(err, "checkpoint mode 7"));
  free(path);
  th_world_free(&w);
}

/* ---- ids: unpredictable, unique, time-ordered --------------------------------------------- */

/* splitmix64, the generator saga ids came from before, and its inverse: one output gives the
 * generator's state, hence every later output. */
#define SM_GAMMA UINT64_C(0x9E3779B97F4A7C15)
static uint64_t sm_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
  return z ^ (z >> 31);
}
static uint64_t unxorshift(uint64_t x, int shift) {
  uint64_t y = x;
  for (int k = 0; k < 64 / shift + 1; k++) y = x ^ (y >> shift);
  return y;
}
static uint64_t inv_odd(uint64_t c) {
  uint64_t inv = c; /* Newton: each step doubles the correct low bits */
  for (int k = 0; k < 6; k++) inv *= 2 - c * inv;
  return inv;
}
static uint64_t sm_unmix(uint64_t z) {
  z = unxorshift(z, 31);
  z *= inv_odd(UINT64_C(0x94D049BB133111EB));
  z = unxorshift(z, 27);
  z *= inv_odd(UINT64_C(0xBF58476D1CE4E5B9));
  return unxorshift(z, 30);
}
static uint64_t hex64(const char *s) {
  char b[17];
  memcpy(b, s, 16);
  b[16] = '\0';
  return strtoull(b, NULL, 16);
}

typedef struct {
  th_world *w;
  uint64_t n;
} started_ctx;
static int started_pred(void *arg) {
  started_ctx *c = arg;
  return c->w->started_ok >= c->n;
}
static void start_and_wait(th_world *w, int i) {
  assert_int_equal(th_world_start(w, i, NULL), SAGA_OK);
  started_ctx c = {w, w->started_ok + 1};
  assert_int_equal(th_run_manual(&w->loop, w->clock, started_pred, &c, 60000), 0);
  assert_int_equal(w->last_start_status, SAGA_OK);
}

/* Given saga N's id, the old generator's successors are not saga N+1's: the random part of a
 * saga id no longer tells the next one (it would, exactly, from splitmix64). */
static void test_ids_not_predictable(void **state) {
  th_world w;
  open_world(&w, NULL);
  assert_int_equal(sm_unmix(sm_mix(UINT64_C(12345))), UINT64_C(12345)); /* the inverse works */
  int predicted = 0;
  char prev[40] = "";
  for (int k = 0; k < 50; k++) {
    start_and_wait(&w, k);
    assert_int_equal(strlen(w.last_id), 32);
    if (prev[0] != '\0') {
      /* Old layout: id[12..28) = 64 bits of one draw, id[28..32) 16 bits of the next, then
       * the trace span: saga N+1's first draw is 3 draws later (more with retry jitter). */
      uint64_t s = sm_unmix(hex64(prev + 12));
      uint64_t next = hex64(w.last_id + 12);
      for (uint64_t d = 1; d <= 16; d++)
        if (sm_mix(s + d * SM_GAMMA) == next) predicted++;
    }
    snprintf(prev, sizeof prev, "%s", w.last_id);
  }
  printf("  50 consecutive saga ids: %d predicted from the previous one by splitmix64\n",
         predicted);
  assert_int_equal(predicted, 0);
  th_world_free(&w);
}

static int64_t q_engine(saga_node *n, const char *sql) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(n), sql, -1, &st, NULL), SQLITE_OK);
  int64_t v = -1;
  if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

/* 2,000 ids over 40 milliseconds: all distinct (their random parts too), 32 hex digits whose
 * first 12 are the creation time in ms, so that id order is creation order; the 80 random
 * bits are balanced (not zeros, not a constant). */
static void test_ids_unique_time_ordered(void **state) {
  th_world w;
  open_world(&w, NULL);
  for (int batch = 0; batch < 40; batch++) {
    for (int k = 0; k < 50; k++) assert_int_equal(th_world_start(&w, batch * 50 + k, NULL), SAGA_OK);
    started_ctx c = {&w, (uint64_t)(batch + 1) * 50};
    assert_int_equal(th_run_manual(&w.loop, w.clock, started_pred, &c, 60000), 0);
    saga_clock_advance(w.clock, 1 + (uint64_t)(batch % 3));
  }
  saga_node *o = w.orch;
  assert_int_equal(q_engine(o, "SELECT count(*) FROM saga_instance"), 2000);
  assert_int_equal(q_engine(o, "SELECT count(DISTINCT substr(id, 13)) FROM saga_instance"), 2000);
  assert_int_equal(q_engine(o, "SELECT count(*) FROM saga_instance WHERE length(id) != 32 OR "
                               "id GLOB '*[^0-9a-f]*'"),
                   0);
  assert_int_equal(q_engine(o, "SELECT count(*) FROM saga_instance WHERE "
                               "substr(id, 1, 12) != printf('%012x', created_ms)"),
                   0);
  assert_true(q_engine(o, "SELECT count(DISTINCT created_ms) FROM saga_instance") >= 20);
  assert_int_equal(q_engine(o, "SELECT count(*) FROM saga_instance a JOIN saga_instance b "
                               "ON a.id < b.id AND a.created_ms > b.created_ms"),
                   0);
  /* Bit balance of the random parts: 160,000 bits, one standard deviation is 0.125%. */
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(o), "SELECT id FROM saga_instance", -1, &st,
                                      NULL),
                   SQLITE_OK);
  uint64_t ones = 0, bits = 0;
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *id = (const char *)sqlite3_column_text(st, 0);
    for (int k = 12; k < 32; k++) {
      int v = id[k] <= '9' ? id[k] - '0' : id[k] - 'a' + 10;
      ones += (uint64_t)__builtin_popcount((unsigned)v);
      bits += 4;
    }
  }
  sqlite3_finalize(st);
  double share = (double)ones / (double)bits;
  printf("  2000 ids: share of one bits in the random parts %.4f\n", share);
  assert_true(share > 0.49 && share < 0.51);
  th_world_free(&w);
}

/* The buffered CSPRNG drops its buffer in a forked child: parent and child draw different
 * bytes (without the fork check both would hand out the same next bytes). */
static void test_id_bytes_after_fork(void **state) {
  saga__csprng r;
  saga__csprng_init(&r);
  uint8_t first[8], mine[32], theirs[32];
  assert_int_equal(saga__csprng_bytes(&r, first, sizeof first), SAGA_OK); /* buffer filled */
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(fds[0]);
    uint8_t b[32];
    int ok = saga__csprng_bytes(&r, b, sizeof b) == SAGA_OK && write(fds[1], b, sizeof b) == 32;
    _exit(ok ? 0 : 1);
  }
  close(fds[1]);
  assert_int_equal(saga__csprng_bytes(&r, mine, sizeof mine), SAGA_OK);
  size_t got = 0;
  while (got < sizeof theirs) {
    ssize_t k = read(fds[0], theirs + got, sizeof theirs - got);
    if (k < 0 && errno == EINTR) continue;
    assert_true(k > 0);
    got += (size_t)k;
  }
  close(fds[0]);
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  assert_true(memcmp(mine, theirs, sizeof mine) != 0);
  /* And the buffer refills across its 256 bytes without repeating itself. */
  uint8_t big[1000];
  assert_int_equal(saga__csprng_bytes(&r, big, sizeof big), SAGA_OK);
  assert_true(memcmp(big, big + 256, 256) != 0 && memcmp(big, big + 512, 256) != 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_success),
      cmocka_unit_test(test_metrics),
      cmocka_unit_test(test_metrics_latency),
      cmocka_unit_test(test_resend_paced),
      cmocka_unit_test(test_failure_each_step),
      cmocka_unit_test(test_handler_error),
      cmocka_unit_test(test_transient_handler_error),
      cmocka_unit_test(test_transient_cap),
      cmocka_unit_test(test_pivot_refused),
      cmocka_unit_test(test_retriable_after_pivot),
      cmocka_unit_test(test_retry_before_compensate),
      cmocka_unit_test(test_timeout_each_step),
      cmocka_unit_test(test_pivot_timeout_resolve),
      cmocka_unit_test(test_idempotent_start),
      cmocka_unit_test(test_cancel),
      cmocka_unit_test(test_deadline),
      cmocka_unit_test(test_compensation_failed_and_retry),
      cmocka_unit_test(test_compensation_retry_forever),
      cmocka_unit_test(test_compensation_retry_finite),
      cmocka_unit_test(test_builder),
      cmocka_unit_test(test_duplicates),
      cmocka_unit_test(test_version_pinning),
      cmocka_unit_test(test_reply_parked_until_registered),
      cmocka_unit_test(test_watch),
      cmocka_unit_test(test_watch_across_restart),
      cmocka_unit_test(test_item_failure_replayed),
      cmocka_unit_test(test_due_isolated),
      cmocka_unit_test(test_outbox_ids_not_reused),
      cmocka_unit_test(test_background_checkpoint),
      cmocka_unit_test(test_api_errors),
      cmocka_unit_test(test_ids_not_predictable),
      cmocka_unit_test(test_ids_unique_time_ordered),
      cmocka_unit_test(test_id_bytes_after_fork),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
