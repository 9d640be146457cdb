/* Clocks and timers: manual ordering, re-arming, stopping, advance_to_next, a real loop. */
#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define START 1000000u

/* What a fired timer saw. */
typedef struct fire_log {
  int n;
  int id[256];
  uint64_t at[256];
} fire_log;

typedef struct tmr {
  saga__timer t;
  int id;
  fire_log *log;
  int rearm_left;     /* re-arm itself this many more times ... */
  uint64_t rearm_ms;  /* ... this far after now */
  saga__timer *stop;  /* stop this one when fired */
  saga__timer *arm;   /* arm this one when fired ... */
  uint64_t arm_at;    /* ... for this deadline */
} tmr;

static void tmr_cb(saga__timer *t) {
  tmr *x = t->data;
  assert_int_equal(t->armed, 0); /* disarmed before its callback runs */
  fire_log *l = x->log;
  assert_true(l->n < 256);
  l->id[l->n] = x->id;
  l->at[l->n] = saga_clock_now(t->clock);
  l->n++;
  if (x->rearm_left > 0) {
    x->rearm_left--;
    saga__timer_arm(t, saga_clock_now(t->clock) + x->rearm_ms);
  }
  if (x->stop != NULL) saga__timer_stop(x->stop);
  if (x->arm != NULL) saga__timer_arm(x->arm, x->arm_at);
}

static void tmr_init(tmr *x, saga_clock *c, int id, fire_log *log) {
  memset(x, 0, sizeof *x);
  x->id = id;
  x->log = log;
  saga__timer_init(&x->t, c, tmr_cb, x);
}

/* xorshift64, local so the test needs no more internals than the timer API. */
static uint64_t next_rand(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static saga_clock *manual(void) {
  saga_clock *c = NULL;
  assert_int_equal(saga_clock_manual_new(&c, START, NULL), SAGA_OK);
  assert_non_null(c);
  assert_true(saga__clock_is_manual(c));
  assert_int_equal(saga_clock_now(c), START);
  return c;
}

static void test_manual_orders_many_timers(void **state) {
  (void)state;
  saga_clock *c = manual();
  fire_log log = {0};
  enum { N = 200 };
  static tmr ts[N];
  uint64_t seed = th_seed(42) | 1; /* xorshift needs a non-zero state */
  printf("seed %llu (replay with SAGA_SEED)\n", (unsigned long long)th_seed(42));
  uint64_t deadline[N];
  for (int i = 0; i < N; i++) {
    tmr_init(&ts[i], c, i, &log);
    /* Few distinct deadlines, so many ties: they must fire in arming order. */
    deadline[i] = START + 1 + next_rand(&seed) % 50;
    saga__timer_arm(&ts[i].t, deadline[i]);
  }
  /* Re-arming moves a timer behind the others of its new deadline. */
  saga__timer_arm(&ts[0].t, deadline[0] = START + 25);
  assert_int_equal(log.n, 0);

  uint64_t next;
  assert_int_equal(saga_clock_next_deadline(c, &next), SAGA_OK);
  uint64_t min = UINT64_MAX;
  for (int i = 0; i < N; i++)
    if (deadline[i] < min) min = deadline[i];
  assert_int_equal(next, min);

  assert_int_equal(saga_clock_advance(c, 1000), SAGA_OK);
  assert_int_equal(log.n, N);
  assert_int_equal(saga_clock_now(c), START + 1000);
  int seen[N] = {0};
  int zero_pos = -1;
  for (int k = 0; k < N; k++) {
    int id = log.id[k];
    assert_false(seen[id]);
    seen[id] = 1;
    if (id == 0) zero_pos = k;
    /* The clock reads the timer's own deadline while it runs. */
    assert_int_equal(log.at[k], deadline[id]);
    if (k > 0) {
      int prev = log.id[k - 1];
      assert_true(deadline[prev] <= deadline[id]);
      /* Ties in arming order (timer 0 was re-armed last). */
      if (deadline[prev] == deadline[id] && prev != 0 && id != 0) assert_true(prev < id);
    }
  }
  /* Timer 0 is the last of its deadline. */
  for (int k = zero_pos + 1; k < N; k++) assert_true(deadline[log.id[k]] > deadline[0]);
  assert_int_equal(saga_clock_next_deadline(c, &next), SAGA_ENOTFOUND);
  saga_clock_free(c);
}

static void test_manual_advance_in_steps(void **state) {
  (void)state;
  saga_clock *c = manual();
  fire_log log = {0};
  tmr a, b, d;
  tmr_init(&a, c, 1, &log);
  tmr_init(&b, c, 2, &log);
  tmr_init(&d, c, 3, &log);
  saga__timer_arm(&a.t, START + 10);
  saga__timer_arm(&b.t, START + 20);
  saga__timer_arm(&d.t, START + 30);
  assert_int_equal(saga_clock_advance(c, 9), SAGA_OK);
  assert_int_equal(log.n, 0);
  assert_int_equal(saga_clock_advance(c, 1), SAGA_OK);
  assert_int_equal(log.n, 1);
  assert_int_equal(log.id[0], 1);
  assert_int_equal(saga_clock_advance(c, 15), SAGA_OK);
  assert_int_equal(log.n, 2);
  assert_int_equal(saga_clock_now(c), START + 25);
  assert_true(d.t.armed);
  assert_false(a.t.armed);
  assert_int_equal(saga_clock_advance(c, 5), SAGA_OK);
  assert_int_equal(log.n, 3);
  assert_int_equal(log.at[2], START + 30);
  saga_clock_free(c);
}

static void test_arm_is_never_synchronous(void **state) {
  (void)state;
  saga_clock *c = manual();
  fire_log log = {0};
  tmr a;
  tmr_init(&a, c, 1, &log);
  saga__timer_arm(&a.t, START - 500); /* in the past */
  assert_int_equal(log.n, 0);
  assert_true(a.t.armed);
  /* A past deadline is due at the next advance, without time going backwards. */
  assert_int_equal(saga_clock_advance(c, 0), SAGA_OK);
  assert_int_equal(log.n, 1);
  assert_int_equal(log.at[0], START);
  assert_int_equal(saga_clock_now(c), START);
  saga_clock_free(c);
}

static void test_rearm_from_callback(void **state) {
  (void)state;
  saga_clock *c = manual();
  fire_log log = {0};
  tmr a, b, late;
  tmr_init(&a, c, 1, &log);
  tmr_init(&b, c, 2, &log);
  tmr_init(&late, c, 3, &log);
  a.rearm_left = 4;
  a.rearm_ms = 10;
  saga__timer_arm(&a.t, START + 10);
  saga__timer_arm(&b.t, START + 35);
  saga__timer_arm(&late.t, START + 100);
  /* 10, 20, 30 (a), 35 (b), 40, 50 (a); late stays beyond the horizon. */
  assert_int_equal(saga_clock_advance(c, 60), SAGA_OK);
  int want_id[] = {1, 1, 1, 2, 1, 1};
  uint64_t want_at[] = {10, 20, 30, 35, 40, 50};
  assert_int_equal(log.n, 6);
  for (int k = 0; k < 6; k++) {
    assert_int_equal(log.id[k], want_id[k]);
    assert_int_equal(log.at[k], START + want_at[k]);
  }
  assert_false(a.t.armed);
  assert_true(late.t.armed);
  assert_int_equal(saga_clock_now(c), START + 60);
  saga_clock_free(c);
}

static void test_stop(void **state) {
  (void)state;
  saga_clock *c = manual();
  fire_log log = {0};
  tmr a, b, d, e;
  tmr_init(&a, c, 1, &log);
  tmr_init(&b, c, 2, &log);
  tmr_init(&d, c, 3, &log);
  tmr_init(&e, c, 4, &log);
  saga__timer_arm(&a.t, START + 10);
  saga__timer_arm(&b.t, START + 20);
  saga__timer_arm(&d.t, START + 20);
  saga__timer_arm(&e.t, START + 5);
  saga__timer_stop(&e.t);
  saga__timer_stop(&e.t); /* stopping an idle timer is harmless */
  assert_false(e.t.armed);
  a.stop = &d.t; /* a callback stops a timer due later in the same advance */
  assert_int_equal(saga_clock_advance(c, 100), SAGA_OK);
  assert_int_equal(log.n, 2);
  assert_int_equal(log.id[0], 1);
  assert_int_equal(log.id[1], 2);
  uint64_t next;
  assert_int_equal(saga_clock_next_deadline(c, &next), SAGA_ENOTFOUND);
  saga_clock_free(c);
}

static void test_advance_to_next(void **state) {
  (void)state;
  saga_clock *c = manual();
  fire_log log = {0};
  tmr a, b, d, same, past;
  tmr_init(&a, c, 1, &log);
  tmr_init(&b, c, 2, &log);
  tmr_init(&d, c, 3, &log);
  tmr_init(&same, c, 4, &log);
  tmr_init(&past, c, 5, &log);
  uint64_t next;
  assert_int_equal(saga_clock_next_deadline(c, &next), SAGA_ENOTFOUND);
  assert_int_equal(saga_clock_advance_to_next(c), SAGA_ENOTFOUND);
  assert_int_equal(saga_clock_now(c), START);

  saga__timer_arm(&a.t, START + 30);
  saga__timer_arm(&b.t, START + 30);
  saga__timer_arm(&d.t, START + 50);
  /* Armed by a callback for that same instant, and for an earlier one: both fire now. */
  a.arm = &same.t;
  a.arm_at = START + 30;
  b.arm = &past.t;
  b.arm_at = START + 1;
  assert_int_equal(saga_clock_next_deadline(c, &next), SAGA_OK);
  assert_int_equal(next, START + 30);
  assert_int_equal(saga_clock_advance_to_next(c), SAGA_OK);
  assert_int_equal(saga_clock_now(c), START + 30);
  assert_int_equal(log.n, 4);
  assert_int_equal(log.id[0], 1);
  assert_int_equal(log.id[1], 2);
  assert_int_equal(log.id[2], 5); /* earliest deadline first */
  assert_int_equal(log.id[3], 4);
  for (int k = 0; k < 4; k++) assert_int_equal(log.at[k], START + 30);

  assert_int_equal(saga_clock_next_deadline(c, &next), SAGA_OK);
  assert_int_equal(next, START + 50);
  assert_int_equal(saga_clock_advance_to_next(c), SAGA_OK);
  assert_int_equal(log.n, 5);
  assert_int_equal(saga_clock_now(c), START + 50);
  assert_int_equal(saga_clock_advance_to_next(c), SAGA_ENOTFOUND);
  assert_int_equal(saga_clock_now(c), START + 50);
  saga_clock_free(c);
}

static void test_bad_arguments(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  assert_int_equal(saga_clock_manual_new(NULL, 0, NULL), SAGA_EINVAL);
  saga_clock *real = NULL;
  assert_int_equal(saga__clock_real_new(&real, &loop, NULL), SAGA_OK);
  assert_false(saga__clock_is_manual(real));
  assert_int_equal(saga_clock_advance(real, 1), SAGA_EINVAL);
  assert_int_equal(saga_clock_advance_to_next(real), SAGA_EINVAL);
  assert_int_equal(saga_clock_advance(NULL, 1), SAGA_EINVAL);
  uint64_t next;
  assert_int_equal(saga_clock_next_deadline(real, &next), SAGA_ENOTFOUND);
  saga_clock_free(real);
  saga_clock_free(NULL);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_allocator(void **state) {
  (void)state;
  th_alloc ta;
  th_alloc_init(&ta);
  ta.fail_at = 1;
  saga_clock *c = (saga_clock *)&ta; /* must stay untouched on failure */
  assert_int_equal(saga_clock_manual_new(&c, 0, &ta.a), SAGA_ENOMEM);
  assert_ptr_equal(c, (saga_clock *)&ta);
  ta.fail_at = 0;
  assert_int_equal(saga_clock_manual_new(&c, 0, &ta.a), SAGA_OK);
  assert_true(ta.live > 0);
  fire_log log = {0};
  tmr a;
  tmr_init(&a, c, 1, &log);
  saga__timer_arm(&a.t, 5);
  saga_clock_free(c); /* a timer left armed is disarmed, not left dangling */
  assert_false(a.t.armed);
  assert_int_equal(ta.live, 0);
}

/* ---- real clock ------------------------------------------------------------------------ */

typedef struct real_ctx {
  fire_log log;
  uint64_t turn; /* loop iterations, counted by a check handle */
  uint64_t turn_of[256];
  uint64_t deadline_of[8];
  int rearm_past_left;
} real_ctx;

static real_ctx *g_real;

static void real_cb(saga__timer *t) {
  real_ctx *r = g_real;
  tmr *x = t->data;
  int k = r->log.n++;
  r->log.id[k] = x->id;
  r->log.at[k] = saga_clock_now(t->clock);
  r->turn_of[k] = r->turn;
  /* Fired at or after its deadline (a wall-clock ms), never before. */
  assert_true(r->log.at[k] >= r->deadline_of[x->id]);
  if (x->id == 3 && r->rearm_past_left > 0) {
    /* Re-armed in the past: must wait for the next loop turn, not spin in this one. */
    r->rearm_past_left--;
    r->deadline_of[3] = 0;
    saga__timer_arm(t, 0);
  }
}

static void count_turn(uv_check_t *h) { ((real_ctx *)h->data)->turn++; }

static int all_real_fired(void *arg) {
  real_ctx *r = arg;
  int a = 0, c = 0;
  for (int k = 0; k < r->log.n; k++) {
    if (r->log.id[k] == 1) a++;
    if (r->log.id[k] == 3) c++;
  }
  return a == 1 && c == 3;
}

static void close_noop(uv_handle_t *h) { (void)h; }

static void test_real_clock_on_loop(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  th_alloc ta;
  th_alloc_init(&ta);
  saga_clock *c = NULL;
  assert_int_equal(saga__clock_real_new(&c, &loop, &ta.a), SAGA_OK);
  real_ctx r;
  memset(&r, 0, sizeof r);
  g_real = &r;
  uv_check_t check;
  uv_check_init(&loop, &check);
  check.data = &r;
  uv_check_start(&check, count_turn);

  tmr a, stopped, past;
  tmr_init(&a, c, 1, NULL);
  tmr_init(&stopped, c, 2, NULL);
  tmr_init(&past, c, 3, NULL);
  a.t.cb = stopped.t.cb = past.t.cb = real_cb;
  uint64_t now = saga_clock_now(c);
  r.deadline_of[1] = now + 30;
  r.deadline_of[2] = now + 5;
  r.deadline_of[3] = 0;
  r.rearm_past_left = 2;
  saga__timer_arm(&a.t, now + 30);
  saga__timer_arm(&stopped.t, now + 5);
  saga__timer_arm(&past.t, 0);
  assert_int_equal(r.log.n, 0); /* never synchronous, even for a past deadline */
  saga__timer_stop(&stopped.t);

  assert_int_equal(th_run_real(&loop, all_real_fired, &r, 5000), 0);
  assert_int_equal(r.log.n, 4);
  for (int k = 0; k < r.log.n; k++) assert_int_not_equal(r.log.id[k], 2);
  /* The past timer and its two re-arms each ran on a different loop turn. */
  uint64_t prev_turn = UINT64_MAX;
  for (int k = 0; k < r.log.n; k++) {
    if (r.log.id[k] != 3) continue;
    if (prev_turn != UINT64_MAX) assert_true(r.turn_of[k] > prev_turn);
    prev_turn = r.turn_of[k];
  }
  /* The 30 ms timer came last: the others were due long before. */
  assert_int_equal(r.log.id[3], 1);

  uint64_t next;
  assert_int_equal(saga_clock_next_deadline(c, &next), SAGA_ENOTFOUND);
  /* Nothing armed: the clock no longer keeps the loop alive. */
  uv_close((uv_handle_t *)&check, close_noop);
  th_drain(&loop);
  assert_true(ta.live > 0);
  saga__clock_close(c);
  th_drain(&loop);
  assert_int_equal(ta.live, 0);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* A real clock moves with the monotonic clock: it starts at a wall-clock time and does not
 * follow the system clock after that. Here it starts an hour behind the system clock — as
 * if the system clock had been stepped forward by an hour after the node started: a timer
 * armed 200 ms ahead still fires 200 ms later (on the old wall-clock reading it fired at
 * once, as every timeout would on such a step), and time does not jump. */
typedef struct step_ctx {
  int fired;
  uint64_t fired_at; /* uv_hrtime() */
} step_ctx;

static void step_cb(saga__timer *t) {
  step_ctx *x = t->data;
  x->fired++;
  x->fired_at = uv_hrtime();
}

static int step_fired(void *arg) { return ((step_ctx *)arg)->fired > 0; }

static void test_real_clock_ignores_wall_steps(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  saga_clock *c = NULL;
  uint64_t wall = saga_clock_now(NULL);
  uint64_t start = wall - 3600000;
  assert_int_equal(saga__clock_real_new_at(&c, &loop, NULL, start), SAGA_OK);
  uint64_t now = saga_clock_now(c);
  assert_true(now >= start && now < start + 1000); /* not the system's wall clock */
  step_ctx x = {0, 0};
  saga__timer t;
  saga__timer_init(&t, c, step_cb, &x);
  uint64_t t0 = uv_hrtime();
  saga__timer_arm(&t, now + 200);
  assert_int_equal(th_run_real(&loop, step_fired, &x, 5000), 0);
  assert_true(x.fired_at - t0 >= UINT64_C(190) * 1000000); /* a lower bound: never early */
  assert_true(saga_clock_now(c) - now >= 190);
  saga__clock_close(c);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_manual_orders_many_timers),
      cmocka_unit_test(test_manual_advance_in_steps),
      cmocka_unit_test(test_arm_is_never_synchronous),
      cmocka_unit_test(test_rearm_from_callback),
      cmocka_unit_test(test_stop),
      cmocka_unit_test(test_advance_to_next),
      cmocka_unit_test(test_bad_arguments),
      cmocka_unit_test(test_allocator),
      cmocka_unit_test(test_real_clock_on_loop),
      cmocka_unit_test(test_real_clock_ignores_wall_steps),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
