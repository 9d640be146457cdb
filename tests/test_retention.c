/*
 * Retention: finished sagas (with their history), inbox and step records are purged by age
 * or count, in batches; running and FAILED sagas are never touched.
 */
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

#include "harness.h"

static int64_t q(saga_node *node, const char *sql) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(node), sql, -1, &st, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  int64_t v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

typedef struct cond {
  th_world *w;
  saga_node *node;
  const char *sql;
  int64_t want;
} cond;

static int cond_met(void *arg) {
  cond *c = arg;
  return q(c->node, c->sql) == c->want;
}

/* Runs the world (manual clock) until sql on node gives want. */
static void run_until(th_world *w, saga_node *node, const char *sql, int64_t want) {
  cond c = {w, node, sql, want};
  assert_int_equal(th_run_manual(&w->loop, w->clock, cond_met, &c, 3600000), 0);
}

/* 20 sagas: 10 complete, 9 compensate, 1 ends FAILED (its compensation keeps refusing). */
static void run_mix(th_world *w) {
  for (int i = 0; i < 10; i++) assert_int_equal(th_world_start_ex(w, i, NULL, -1, -1), SAGA_OK);
  for (int i = 10; i < 19; i++) assert_int_equal(th_world_start_ex(w, i, NULL, 2, -1), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(w, 19), 0);
  w->comp_mode[0] = 'r';
  assert_int_equal(th_world_start_ex(w, 19, NULL, 1, -1), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(w, 20), 0);
  w->comp_mode[0] = 'o';
}

static void test_purge_by_age(void **state) {
  saga_retention r = {.finished_ms = 10000, .inbox_ms = 50000, .batch = 4,
                      .interval_ms = 1000};
  th_world_opts o;
  th_world_defaults(&o);
  o.retention = &r;
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  run_mix(&w);
  /* Let the last replies be confirmed, so no resend adds stale-reply history later. */
  th_world_settle(&w, 100);
  assert_int_equal(saga_node_outbox_depth(w.part), 0);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_instance"), 20);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_instance WHERE state = 5"), 1);
  int64_t failed_hist = q(w.orch, "SELECT count(*) FROM saga_history h JOIN saga_instance i"
                                  " ON h.saga_id = i.id WHERE i.state = 5");
  assert_true(failed_hist > 0);
  int64_t inbox = q(w.part, "SELECT count(*) FROM saga_inbox");
  int64_t steps = q(w.part, "SELECT count(*) FROM saga_pstep");
  assert_true(inbox > 40 && steps > 30);

  /* Not yet old enough: a few purge passes delete nothing. */
  assert_int_equal(saga_clock_advance(w.clock, 5000), SAGA_OK);
  th_world_settle(&w, 3000);
  saga_node_stats st;
  saga_node_stats_get(w.orch, &st, sizeof st);
  assert_true(st.purge_passes >= 2);
  assert_int_equal(st.purged_sagas, 0);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_instance"), 20);

  /* Old enough: the 19 finished go, in batches of 4; the FAILED one stays with its history. */
  assert_int_equal(saga_clock_advance(w.clock, 6000), SAGA_OK);
  run_until(&w, w.orch, "SELECT count(*) FROM saga_instance", 1);
  saga_node_stats_get(w.orch, &st, sizeof st);
  assert_int_equal(st.purged_sagas, 19);
  assert_true(st.purge_passes >= 2 + 5); /* ceil(19 / 4) passes at least */
  assert_int_equal(q(w.orch, "SELECT state FROM saga_instance"), SAGA_FAILED);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_history WHERE saga_id NOT IN"
                             " (SELECT id FROM saga_instance)"), 0);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_history"), failed_hist);
  /* The participant's records are younger than inbox_ms: all still there. */
  assert_int_equal(q(w.part, "SELECT count(*) FROM saga_inbox"), inbox);
  assert_int_equal(q(w.part, "SELECT count(*) FROM saga_pstep"), steps);

  /* Past inbox_ms, inbox and step records go too (step records by the sweeping cursor). */
  assert_int_equal(saga_clock_advance(w.clock, 40000), SAGA_OK);
  run_until(&w, w.part, "SELECT count(*) FROM saga_inbox", 0);
  run_until(&w, w.part, "SELECT count(*) FROM saga_pstep", 0);
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.purged_inbox, inbox);
  assert_int_equal(st.purged_steps, steps);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_instance WHERE state = 5"), 1);

  /* The FAILED saga is retried by an operator after the participant purged the record of its
   * step 0, whose action applied and was never undone. The participant cannot tell that from
   * a compensation that came before its action: it must not answer "compensated" (the saga
   * would end COMPENSATED with the action still in force) but "record expired", and the saga
   * stays FAILED with that reason. */
  char id[40] = "";
  sqlite3_stmt *st1 = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(w.orch), "SELECT id FROM saga_instance"
                                      " WHERE state = 5", -1, &st1, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(st1), SQLITE_ROW);
  snprintf(id, sizeof id, "%s", (const char *)sqlite3_column_text(st1, 0));
  sqlite3_finalize(st1);
  w.comp_mode[0] = 'o'; /* the participant would now undo it, if it knew what to undo */
  saga_node_stats_get(w.part, &st, sizeof st);
  uint64_t expired0 = st.compensations_expired;
  uint64_t terminal0 = w.terminal;
  assert_int_equal(saga_retry_failed(w.orch, id, NULL, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, terminal0 + 1), 0);
  assert_int_equal(q(w.orch, "SELECT state FROM saga_instance"), SAGA_FAILED);
  assert_int_equal(q(w.orch, "SELECT instr(error, 'record of this step expired') > 0"
                             " FROM saga_instance"), 1);
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.compensations_expired, expired0 + 1);
  /* A saga started now (after the purge) still compensates as before. */
  assert_int_equal(th_world_start_ex(&w, 20, NULL, 2, -1), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, terminal0 + 2), 0);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_instance WHERE state = 4"), 1);
  th_world_free(&w);
}

/* Inbox and step records newer than the cutoff survive the sweeps, whatever their position
 * in key order. */
/* Dead letters are kept SAGA_DEAD_LETTER_MS and at most SAGA_DEAD_LETTER_MAX of them: the
 * retention passes delete older ones and the oldest beyond the count, in batches. */
static void test_dead_letters_purged(void **state) {
  saga_retention r = {.inbox_ms = 0, .batch = 5000, .interval_ms = 1000};
  th_world_opts o;
  th_world_defaults(&o);
  o.retention = &r;
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  sqlite3 *db = saga_node_db(w.part);
  uint64_t now = saga_clock_now(w.clock);
  uint64_t old = now - SAGA_DEAD_LETTER_MS - 1000;
  /* 2,000 too old, then 12,000 recent ones (2,000 beyond the count). */
  assert_int_equal(sqlite3_exec(db, "BEGIN", NULL, NULL, NULL), SQLITE_OK);
  sqlite3_stmt *ins = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, "INSERT INTO saga_dead_letter(at_ms, channel, msg_id,"
                                      " reason, body) VALUES(?1, 'p0', ?2, 'test', x'00')", -1,
                                      &ins, NULL), SQLITE_OK);
  for (int i = 0; i < 14000; i++) {
    sqlite3_bind_int64(ins, 1, (sqlite3_int64)(i < 2000 ? old : now - 1000));
    sqlite3_bind_int(ins, 2, i);
    assert_int_equal(sqlite3_step(ins), SQLITE_DONE);
    sqlite3_reset(ins);
  }
  sqlite3_finalize(ins);
  assert_int_equal(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
  run_until(&w, w.part, "SELECT count(*) FROM saga_dead_letter", SAGA_DEAD_LETTER_MAX);
  /* The newest are the ones kept. */
  assert_int_equal(q(w.part, "SELECT min(CAST(msg_id AS INTEGER)) FROM saga_dead_letter"),
                   14000 - SAGA_DEAD_LETTER_MAX);
  saga_node_stats st;
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.purged_dead_letters, 4000);
  th_world_free(&w);
}

static void test_sweep_keeps_recent(void **state) {
  saga_retention r = {.inbox_ms = 10000, .batch = 3, .interval_ms = 1000};
  th_world_opts o;
  th_world_defaults(&o);
  o.retention = &r;
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  for (int i = 0; i < 5; i++) assert_int_equal(th_world_start_ex(&w, i, NULL, -1, -1), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 5), 0);
  int64_t old_steps = q(w.part, "SELECT count(*) FROM saga_pstep");
  assert_int_equal(old_steps, 15);
  assert_int_equal(saga_clock_advance(w.clock, 8000), SAGA_OK);
  for (int i = 5; i < 10; i++) assert_int_equal(th_world_start_ex(&w, i, NULL, -1, -1), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 10), 0);
  assert_int_equal(q(w.part, "SELECT count(*) FROM saga_pstep"), 30);
  /* At +12 s the first five are past the cutoff, the last five are not. */
  assert_int_equal(q(w.part, "SELECT count(*) FROM saga_inbox"), 30);
  assert_int_equal(saga_clock_advance(w.clock, 4000), SAGA_OK);
  run_until(&w, w.part, "SELECT count(*) FROM saga_pstep", 15);
  run_until(&w, w.part, "SELECT count(*) FROM saga_inbox", 15);
  /* Several full sweeps later, still 15: the recent ones are never deleted early. */
  th_world_settle(&w, 5000);
  assert_int_equal(q(w.part, "SELECT count(*) FROM saga_pstep"), 15);
  assert_int_equal(q(w.part, "SELECT count(*) FROM saga_inbox"), 15);
  assert_int_equal(q(w.part, "SELECT count(*) FROM saga_inbox WHERE received_ms < "
                             "(SELECT min(received_ms) + 8000 FROM saga_inbox)"),
                   15);
  assert_int_equal(q(w.part, "SELECT count(*) FROM saga_pstep WHERE updated_ms < "
                             "(SELECT min(updated_ms) + 8000 FROM saga_pstep)"),
                   15);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_instance"), 10); /* finished_ms 0 */
  th_world_free(&w);
}

/* By count: the newest max_finished finished sagas are kept. */
static void test_purge_by_count(void **state) {
  saga_retention r = {.max_finished = 6, .batch = 5, .interval_ms = 1000};
  th_world_opts o;
  th_world_defaults(&o);
  o.retention = &r;
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  char ids[15][40];
  for (int i = 0; i < 15; i++) {
    assert_int_equal(th_world_start_ex(&w, i, NULL, i % 3 == 0 ? 1 : -1, -1), SAGA_OK);
    assert_int_equal(th_world_run_until_terminal(&w, (uint64_t)i + 1), 0);
    snprintf(ids[i], sizeof ids[i], "%s", w.last_id);
    assert_int_equal(saga_clock_advance(w.clock, 10), SAGA_OK); /* distinct finish times */
  }
  run_until(&w, w.orch, "SELECT count(*) FROM saga_instance", 6);
  th_world_settle(&w, 3000);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_instance"), 6);
  for (int i = 0; i < 15; i++) {
    saga_info *info = NULL;
    int rc = saga_get(w.orch, ids[i], &info);
    assert_int_equal(rc, i >= 9 ? SAGA_OK : SAGA_ENOTFOUND);
    saga_info_free(info);
  }
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_history WHERE saga_id NOT IN"
                             " (SELECT id FROM saga_instance)"),
                   0);
  th_world_free(&w);
}

/* A running saga older than finished_ms is never purged. */
static void test_running_kept(void **state) {
  saga_retention r = {.finished_ms = 1000, .max_finished = 1, .batch = 10, .interval_ms = 500};
  th_world_opts o;
  th_world_defaults(&o);
  o.retention = &r;
  o.skip_mask = 1u << 1; /* nobody serves step 1: the saga waits there */
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  th_world_settle(&w, 10000);
  assert_int_equal(q(w.orch, "SELECT count(*) FROM saga_instance WHERE state = 1"), 1);
  saga_node_stats st;
  saga_node_stats_get(w.orch, &st, sizeof st);
  assert_true(st.purge_passes >= 5);
  assert_int_equal(st.purged_sagas, 0);
  th_world_free(&w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_purge_by_age),
      cmocka_unit_test(test_dead_letters_purged),
      cmocka_unit_test(test_sweep_keeps_recent),
      cmocka_unit_test(test_purge_by_count),
      cmocka_unit_test(test_running_kept),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
