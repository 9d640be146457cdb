/*
 * Out-of-memory sweep (guarantee 6 of the README: bad conditions are refused with a clear error, nothing is
 * lost; and no leak).
 *
 * For N = 1, 2, ... the allocator of both nodes fails exactly its N-th allocation (only that
 * one: fail_all_after = 0) while a scenario runs: open the world, start 3 sagas (the second
 * refused at step 1, so it is compensated), run until every saga is terminal, close. Every
 * call must succeed or return a clean error code, never crash or assert. Once the failure has
 * happened the test makes sure no later allocation fails (fail_at = 0) and finishes the
 * scenario: the engine must still be usable — every saga that was started, plus the ones
 * re-started with the same idempotency key after their start failed, ends terminal, no saga
 * is duplicated, and th_check_invariants() holds (the failure lost nothing). After
 * th_world_free(), every allocation must have been freed (ta.live == 0). The sweep stops at
 * the first N at which no allocation failed, i.e. when N passed the scenario's total.
 *
 * Coverage: only what libsaga allocates itself goes through the hooks. msgpack-c (its unpack
 * zone) and SQLite (its page cache, statements, ...) allocate with their own malloc and are
 * not covered here, and the harness's in-memory hub and its transports are created with the
 * libc allocator (th_open_all passes NULL), so the mem transport is not covered either.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "harness.h"

#define NSAGAS 3

typedef struct slot {
  int calls;
  int status;
  int existed;
  char id[40];
} slot;

static void started(saga_node *n, int status, const char *id, int existed, void *arg) {
  slot *s = arg;
  s->calls++;
  s->status = status;
  s->existed = existed;
  if (status == SAGA_OK) snprintf(s->id, sizeof s->id, "%s", id);
}

/* A clean error: SAGA_OK or one of the library's negative codes. */
static void assert_clean(int rc, const char *what, uint64_t n) {
  if (rc > 0 || strcmp(saga_err_name(rc), "UNKNOWN") == 0) {
    printf("N=%llu: %s returned %d, not a libsaga code\n", (unsigned long long)n, what, rc);
    fail();
  }
}

static int start_one(th_world *w, int i, slot *s) {
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  saga_data_set_i64(d, "n", i);
  if (i == 1) saga_data_set_i64(d, "fail", 1); /* refused at step 1: compensated */
  char key[16];
  snprintf(key, sizeof key, "k%d", i);
  memset(s, 0, sizeof *s);
  int rc = saga_start(w->orch, "test", d, key, started, s);
  saga_data_free(d);
  return rc;
}

typedef struct {
  th_world *w;
  slot *slots;
  int pending[NSAGAS];
  int64_t want;        /* sagas expected in the database */
  uint64_t t0;         /* uv_hrtime() at the start of the run */
  int livelock;        /* the loop kept busy without ever letting the clock advance */
} run_ctx;

/* A run of this scenario takes milliseconds; a loop that stays busy for this long without
 * reaching a state where the manual clock can advance is a livelock, reported as such
 * instead of hanging the test. */
#define LIVELOCK_NS (UINT64_C(30) * 1000000000)

static int64_t count_sagas(th_world *w, int nonterminal_only) {
  sqlite3_stmt *st = NULL;
  const char *sql = nonterminal_only
                        ? "SELECT count(*) FROM saga_instance WHERE state IN (1, 2)"
                        : "SELECT count(*) FROM saga_instance";
  if (sqlite3_prepare_v2(saga_node_db(w->orch), sql, -1, &st, NULL) != SQLITE_OK) return -1;
  int64_t v = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int64(st, 0) : -1;
  sqlite3_finalize(st);
  return v;
}

static int64_t history_count(th_world *w, int type) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(saga_node_db(w->orch), "SELECT count(*) FROM saga_history WHERE event = ?1",
                         -1, &st, NULL) != SQLITE_OK)
    return -1;
  sqlite3_bind_int(st, 1, type);
  int64_t v = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int64(st, 0) : -1;
  sqlite3_finalize(st);
  return v;
}

/* Every start answered, and every saga that exists is terminal. */
static int done_pred(void *arg) {
  run_ctx *c = arg;
  if (uv_hrtime() - c->t0 > LIVELOCK_NS) return c->livelock = 1;
  for (int i = 0; i < NSAGAS; i++)
    if (c->pending[i] && c->slots[i].calls == 0) return 0;
  return count_sagas(c->w, 1) == 0 && count_sagas(c->w, 0) >= c->want;
}

typedef struct stats {
  uint64_t open_failed, start_failed, start_cb_failed, absorbed, outcome_changed;
} stats;

/* One run of the scenario with the N-th allocation failing. Returns ta.failed. */
static uint64_t scenario(uint64_t n, stats *sx) {
  th_alloc ta;
  th_alloc_init(&ta);
  ta.fail_at = n;
  ta.fail_all_after = 0;
  th_world_opts o;
  th_world_defaults(&o);
  o.alloc = &ta.a;
  /* Step 1 is retried after a backoff before compensating: the refused saga also goes
   * through the timer path (saga__engine_due). */
  o.retry[1].max_attempts = 2;
  o.retry[1].backoff_ms = 10;
  o.retry[1].retry_before_compensate = 1;
  th_world w;
  int rc = th_world_open(&w, &o);
  assert_clean(rc, "th_world_open", n);
  int opened_after_failure = rc != SAGA_OK;
  if (rc != SAGA_OK) {
    sx->open_failed++;
    assert_int_equal(ta.failed, 1);
    /* The engine is usable after: the same files open and the scenario runs. */
    ta.fail_at = 0;
    rc = th_world_reopen(&w);
    if (rc != SAGA_OK) printf("N=%llu: reopen after a failed open: %s\n",
                              (unsigned long long)n, saga_strerror(rc));
    assert_int_equal(rc, SAGA_OK);
  }

  slot slots[NSAGAS];
  run_ctx c;
  memset(&c, 0, sizeof c);
  c.w = &w;
  c.slots = slots;
  int start_rc[NSAGAS];
  for (int i = 0; i < NSAGAS; i++) {
    start_rc[i] = start_one(&w, i, &slots[i]);
    assert_clean(start_rc[i], "saga_start", n);
    c.pending[i] = start_rc[i] == SAGA_OK;
    if (start_rc[i] != SAGA_OK) {
      sx->start_failed++;
      assert_int_equal(start_rc[i], SAGA_ENOMEM);
      assert_true(saga_node_errmsg(w.orch)[0] != '\0');
    }
  }
  /* Bounded clock time: an hour is far more than three sagas need. */
  c.t0 = uv_hrtime();
  int run1 = th_run_manual(&w.loop, w.clock, done_pred, &c, 120000);
  if (c.livelock) {
    printf("N=%llu: livelock: the loop stayed busy for 30 s of real time\n",
           (unsigned long long)n);
    fail();
  }
  int lost[NSAGAS];
  for (int i = 0; i < NSAGAS; i++) {
    lost[i] = 0;
    if (!c.pending[i]) {
      lost[i] = 1;
      continue;
    }
    assert_int_equal(slots[i].calls, 1);
    assert_clean(slots[i].status, "start callback", n);
    if (slots[i].status != SAGA_OK) {
      sx->start_cb_failed++;
      lost[i] = 1;
    }
  }
  if (run1 != 0) {
    printf("N=%llu: the first run did not finish (%lld sagas not terminal)\n",
           (unsigned long long)n, (long long)count_sagas(&w, 1));
    fail();
  }

  uint64_t failed = ta.failed;
  assert_true(failed <= 1);
  /* From here on nothing fails: the engine must finish the scenario. */
  ta.fail_at = 0;
  int restarted = 0;
  memset(c.pending, 0, sizeof c.pending);
  for (int i = 0; i < NSAGAS; i++) {
    if (!lost[i]) continue;
    restarted++;
    assert_int_equal(start_one(&w, i, &slots[i]), SAGA_OK);
    c.pending[i] = 1;
  }
  c.want = NSAGAS;
  c.t0 = uv_hrtime();
  if (th_run_manual(&w.loop, w.clock, done_pred, &c, 120000) != 0 || c.livelock) {
    printf("N=%llu: sagas did not all finish after the failure (%lld of %lld not terminal)\n",
           (unsigned long long)n, (long long)count_sagas(&w, 1), (long long)count_sagas(&w, 0));
    fail();
  }
  for (int i = 0; i < NSAGAS; i++) {
    assert_int_equal(slots[i].status, SAGA_OK);
    /* A start that reported failure must not have created its saga. */
    if (lost[i]) assert_int_equal(slots[i].existed, 0);
    for (int j = 0; j < i; j++) assert_string_not_equal(slots[i].id, slots[j].id);
  }
  assert_int_equal(count_sagas(&w, 0), NSAGAS);
  assert_int_equal(count_sagas(&w, 1), 0);
  assert_int_equal(w.terminal, NSAGAS); /* one terminal event per saga, none lost */
  /* The event hook saw exactly the committed transitions: one event per history row, type
   * by type (an event of a rolled-back item must not be reported). */
  for (int type = SAGA_EV_STARTED; type <= SAGA_EV_DEFINITION_MISSING; type++) {
    int64_t rows = history_count(&w, type);
    size_t seen = th_count_events(&w, type, -2);
    if ((int64_t)seen != rows) {
      printf("N=%llu: %zu %s events reported, %lld in the history\n", (unsigned long long)n,
             seen, saga_event_name(type), (long long)rows);
      fail();
    }
  }
  /* Saga 1 retried step 1 once (unless the failed allocation changed its course). */
  if (!failed) assert_int_equal(th_count_events(&w, SAGA_EV_STEP_RETRY, 1), 1);
  if (th_check_invariants(&w, 1) != 0) {
    printf("N=%llu: invariants broken\n", (unsigned long long)n);
    fail();
  }
  /* Business outcome: saga 1 is refused and compensated. The others complete, unless the
   * failed allocation was inside a participant's handler (a technical failure, answered as
   * a failure by contract), which compensates that saga instead. */
  assert_int_equal(th_saga_state(&w, slots[1].id), SAGA_COMPENSATED);
  for (int i = 0; i < NSAGAS; i += 2) {
    int s = th_saga_state(&w, slots[i].id);
    assert_true(s == SAGA_COMPLETED || s == SAGA_COMPENSATED);
    if (s != SAGA_COMPLETED) {
      assert_int_equal(failed, 1);
      if (sx->outcome_changed++ == 0) {
        sqlite3_stmt *st = NULL;
        sqlite3_prepare_v2(saga_node_db(w.part),
                           "SELECT reason FROM saga_dead_letter ORDER BY id LIMIT 1", -1, &st,
                           NULL);
        if (sqlite3_step(st) == SQLITE_ROW)
          printf("N=%llu: saga %d compensated instead of completing; participant dead letter: "
                 "%s\n",
                 (unsigned long long)n, i, (const char *)sqlite3_column_text(st, 0));
        sqlite3_finalize(st);
      }
    }
  }
  if (failed && restarted == 0 && !opened_after_failure) sx->absorbed++;
  th_world_free(&w);
  if (ta.live != 0) {
    printf("N=%llu: %lld allocations leaked\n", (unsigned long long)n, (long long)ta.live);
    fail();
  }
  return failed;
}

static void test_oom_sweep(void **state) {
  stats sx;
  memset(&sx, 0, sizeof sx);
  uint64_t n;
  for (n = 1; n < 100000; n++) {
    if (scenario(n, &sx) == 0) break;
  }
  printf("oom sweep: %llu allocations failed one at a time; open failed %llu, saga_start "
         "failed %llu, start callback failed %llu, absorbed %llu, outcome changed %llu\n",
         (unsigned long long)(n - 1), (unsigned long long)sx.open_failed,
         (unsigned long long)sx.start_failed, (unsigned long long)sx.start_cb_failed,
         (unsigned long long)sx.absorbed, (unsigned long long)sx.outcome_changed);
  assert_true(n < 100000);
  assert_true(n > 50); /* the scenario really allocates */
}

/* Sanity of the counting allocator itself: a run without failures frees everything. */
static void test_no_failure_no_leak(void **state) {
  th_alloc ta;
  th_alloc_init(&ta);
  th_world_opts o;
  th_world_defaults(&o);
  o.alloc = &ta.a;
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  for (int i = 0; i < 10; i++) assert_int_equal(th_world_start_ex(&w, i, NULL, i % 3 == 1 ? 1 : -1, -1), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 10), 0);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  assert_true(ta.count > 50);
  assert_true(ta.live > 0);
  th_world_free(&w);
  assert_int_equal(ta.live, 0);
  assert_int_equal(ta.failed, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_no_failure_no_leak),
      cmocka_unit_test(test_oom_sweep),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
