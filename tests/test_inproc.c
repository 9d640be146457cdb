/* The in-process transport across threads: it passes the conformance kit (one loop), and
 * carries real sagas between an orchestrator and a participant on two loops in two threads,
 * each step's effect exactly once. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "harness.h"
#include "internal.h" /* saga__transport_host */
#include "saga/conformance.h"

static int ip_create(void *ctx, const char *node, saga_transport **out) {
  return saga_inproc_transport_new(out, (saga_inproc_hub *)ctx);
}

static void test_inproc_conformance(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  saga_inproc_hub *hub = NULL;
  assert_int_equal(saga_inproc_hub_new(&hub, NULL), SAGA_OK);
  char *dir = th_tmpdir();
  saga_conformance_medium2 m;
  memset(&m, 0, sizeof m);
  m.struct_version = SAGA_CONFORMANCE_MEDIUM_VERSION;
  m.kind = SAGA_MEDIUM_BROKERLESS; /* confirmed when the receiver acknowledged */
  m.create = ip_create;
  m.ctx = hub;
  m.ordered = 1;
  m.db_dir = dir;
  char report[4096];
  int failed = saga_conformance_run2(&loop, &m, report, sizeof report);
  printf("%s", report);
  assert_int_equal(failed, 0);
  assert_non_null(strstr(report, "PASS sagas\n"));
  assert_non_null(strstr(report, "PASS consumer-crash"));
  assert_non_null(strstr(report, "PASS sagas-crash"));
  assert_non_null(strstr(report, "PASS peer-gone"));
  th_drain(&loop);
  assert_int_equal(saga_inproc_hub_free(hub), SAGA_OK);
  assert_int_equal(uv_loop_close(&loop), 0);
  th_rmdir(dir);
}

/* Bad arguments and misuse are refused with a code; nothing is lost or leaked. */
static int closed_count;
static void count_closed(void *ctx) { closed_count++; }

static void test_inproc_bad_input(void **state) {
  saga_inproc_hub *hub = NULL;
  saga_transport *t = NULL;
  assert_int_equal(saga_inproc_hub_new(NULL, NULL), SAGA_EINVAL);
  assert_int_equal(saga_inproc_transport_new(&t, NULL), SAGA_EINVAL);
  assert_int_equal(saga_inproc_hub_free(NULL), SAGA_OK);
  assert_int_equal(saga_inproc_hub_new(&hub, NULL), SAGA_OK);
  assert_int_equal(saga_inproc_transport_new(NULL, hub), SAGA_EINVAL);
  assert_int_equal(saga_inproc_transport_new(&t, hub), SAGA_OK);
  /* Not opened yet: refused; the hub cannot be freed under a transport. */
  assert_int_equal(t->methods->subscribe(t, "ch"), SAGA_ESTATE);
  assert_int_equal(t->methods->send(t, "ch", "x", 1, 1), SAGA_ESTATE);
  assert_int_equal(saga_inproc_hub_free(hub), SAGA_EBUSY);
  uv_loop_t loop;
  uv_loop_init(&loop);
  saga__transport_host host = {.closed = count_closed};
  t->saga__host = &host;
  assert_int_equal(t->methods->open(t, &loop), SAGA_OK);
  assert_int_equal(t->methods->open(t, &loop), SAGA_ESTATE);
  assert_int_equal(t->methods->subscribe(t, NULL), SAGA_EINVAL);
  assert_int_equal(t->methods->send(t, NULL, "x", 1, 1), SAGA_EINVAL);
  assert_int_equal(t->methods->send(t, "ch", NULL, 5, 1), SAGA_EINVAL);
  /* A message for a channel nobody consumes waits in the hub (freed with it). */
  assert_int_equal(t->methods->send(t, "nobody", "waiting", 7, 2), SAGA_OK);
  t->methods->ack(t, 12345); /* an unknown tag is ignored */
  t->methods->close(t);
  th_drain(&loop);
  assert_int_equal(closed_count, 1);
  t->methods->close(t); /* twice: nothing more */
  assert_int_equal(closed_count, 1);
  assert_int_equal(t->methods->send(t, "ch", "x", 1, 3), SAGA_ECLOSED);
  assert_int_equal(t->methods->subscribe(t, "ch"), SAGA_ECLOSED);
  t->methods->destroy(t);
  assert_int_equal(uv_loop_close(&loop), 0);
  assert_int_equal(saga_inproc_hub_free(hub), SAGA_OK);
}

/* ---- lifecycle: destroy while the handle is closing --------------------------------------- */

static int closed_calls;
static void count_closed2(void *ctx) { closed_calls++; }

/* The node's open failing after the transport opened calls close() and then destroy() at
 * once, before the loop ran the close callback; a transport destroyed while open must close
 * its handle itself. Either way the memory outlives the handle (ASan: no use after free), the
 * host hears nothing after destroy, and the loop closes clean. */
static void test_destroy_while_closing(void **state) {
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  saga_inproc_hub *hub = NULL;
  assert_int_equal(saga_inproc_hub_new(&hub, NULL), SAGA_OK);
  saga__transport_host host = {.closed = count_closed2};
  saga_transport *t = NULL;
  closed_calls = 0;
  /* close, then destroy at once */
  assert_int_equal(saga_inproc_transport_new(&t, hub), SAGA_OK);
  t->saga__host = &host;
  assert_int_equal(t->methods->open(t, &loop), SAGA_OK);
  assert_int_equal(t->methods->subscribe(t, "ch"), SAGA_OK);
  t->methods->close(t);
  t->methods->destroy(t);
  assert_int_equal(saga_inproc_hub_free(hub), SAGA_EBUSY); /* its handle is still closing */
  th_drain(&loop);
  assert_int_equal(closed_calls, 0);
  /* destroy while open, without close */
  assert_int_equal(saga_inproc_transport_new(&t, hub), SAGA_OK);
  t->saga__host = &host;
  assert_int_equal(t->methods->open(t, &loop), SAGA_OK);
  t->methods->destroy(t);
  th_drain(&loop);
  assert_int_equal(closed_calls, 0);
  assert_int_equal(uv_loop_close(&loop), 0);
  assert_int_equal(saga_inproc_hub_free(hub), SAGA_OK);
}

/* ---- bounds: one copy per (sender, token), a limit per channel ---------------------------- */

static int warn_count;
static char warn_last[512];
static void count_log(void *ctx, saga_log_level level, const char *msg) {
  if (level >= SAGA_LOG_WARN) warn_count++;
  snprintf(warn_last, sizeof warn_last, "%s", msg);
}

static saga_inproc_queue_stats ip_stats(saga_inproc_hub *hub, const char *channel) {
  saga_inproc_queue_stats q;
  memset(&q, 0xff, sizeof q);
  assert_int_equal(saga_inproc_hub_queue_stats(hub, channel, &q, sizeof q), SAGA_OK);
  return q;
}

/* Resends of a message the hub still holds add nothing; past the channel's limit sends are
 * refused with the transient SAGA_EBUSY, logged once. */
static void test_held_once_and_limit(void **state) {
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  saga_inproc_hub *hub = NULL;
  assert_int_equal(saga_inproc_hub_new(&hub, NULL), SAGA_OK);
  saga__transport_host host = {.closed = count_closed2, .log = count_log};
  saga_transport *t = NULL;
  assert_int_equal(saga_inproc_transport_new(&t, hub), SAGA_OK);
  t->saga__host = &host;
  assert_int_equal(t->methods->open(t, &loop), SAGA_OK);
  for (int i = 0; i < 1000; i++) assert_int_equal(t->methods->send(t, "nobody", "r", 1, 1), SAGA_OK);
  assert_int_equal(t->methods->send(t, "nobody", "other", 5, 2), SAGA_OK);
  saga_inproc_queue_stats q = ip_stats(hub, "nobody");
  assert_int_equal(q.messages, 2);
  assert_int_equal(q.bytes, 6);
  assert_int_equal(q.deduplicated, 999);
  assert_int_equal(ip_stats(hub, NULL).messages, 2);
  assert_int_equal(ip_stats(hub, "unknown").messages, 0);
  assert_int_equal(saga_inproc_hub_queue_stats(NULL, NULL, &q, sizeof q), SAGA_EINVAL);
  /* The limit. */
  assert_int_equal(saga_inproc_hub_set_limits(NULL, 1, 1), SAGA_EINVAL);
  assert_int_equal(saga_inproc_hub_set_limits(hub, 4, 0), SAGA_OK);
  warn_count = 0;
  int ok = 0, busy = 0;
  for (uint64_t k = 10; k < 20; k++) {
    int rc = t->methods->send(t, "nobody", "m", 1, k);
    ok += rc == SAGA_OK;
    busy += rc == SAGA_EBUSY;
  }
  assert_int_equal(ok, 2);
  assert_int_equal(busy, 8);
  assert_int_equal(warn_count, 1);
  assert_non_null(strstr(warn_last, "SAGA_EBUSY"));
  assert_int_equal(ip_stats(hub, "nobody").refused, 8);
  assert_int_equal(t->methods->send(t, "nobody", "r", 1, 1), SAGA_OK); /* held: taken */
  /* An empty channel takes one message, whatever its size. */
  assert_int_equal(saga_inproc_hub_set_limits(hub, 0, 4), SAGA_OK);
  assert_int_equal(t->methods->send(t, "bytes", "0123456789", 10, 30), SAGA_OK);
  assert_int_equal(t->methods->send(t, "bytes", "x", 1, 31), SAGA_EBUSY);
  t->methods->close(t);
  th_drain(&loop);
  t->methods->destroy(t);
  assert_int_equal(uv_loop_close(&loop), 0);
  assert_int_equal(saga_inproc_hub_free(hub), SAGA_OK);
}

/* Node level: a saga whose step goes to a channel nobody consumes, resent every 10 ms. The
 * hub keeps one copy of the command, however many resends come. */
typedef struct resends {
  saga_inproc_hub *hub;
} resends;

static int many_resends(void *arg) {
  return ip_stats(((resends *)arg)->hub, "nobody").deduplicated >= 50;
}

static void test_node_resends_bounded(void **state) {
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  saga_inproc_hub *hub = NULL;
  assert_int_equal(saga_inproc_hub_new(&hub, NULL), SAGA_OK);
  saga_transport *t = NULL;
  assert_int_equal(saga_inproc_transport_new(&t, hub), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = "orch";
  cfg.db_path = ":memory:"; /* a new database, whatever the config version */
  cfg.transport = t;
  cfg.resend_ms = 10;
  saga_node *n = NULL;
  char err[256];
  assert_int_equal(saga_node_open(&n, &loop, &cfg, err, sizeof err), SAGA_OK);
  static const saga_step steps[] = {
      {.name = "ONE", .channel = "nobody", .action = "x.do", .compensation = "x.undo"}};
  static const saga_definition def = {SAGA_DEFINITION_VERSION, "p", 1, steps, 1, 0, sizeof(saga_step)};
  assert_int_equal(saga_node_register(n, &def), SAGA_OK);
  assert_int_equal(saga_node_start(n, NULL), SAGA_OK);
  assert_int_equal(saga_start(n, "p", NULL, NULL, NULL, NULL), SAGA_OK);
  resends r = {hub};
  /* 50 resends take about half a second; without the bound the counter never moves. */
  assert_int_equal(th_run_real(&loop, many_resends, &r, 20000), 0);
  saga_inproc_queue_stats q = ip_stats(hub, "nobody");
  printf("%llu resends deduplicated, %llu held (%llu bytes)\n",
         (unsigned long long)q.deduplicated, (unsigned long long)q.messages,
         (unsigned long long)q.bytes);
  assert_int_equal(q.messages, 1);
  assert_true(q.bytes > 0 && q.bytes < 4096);
  saga_node_close(n, NULL, NULL);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  assert_int_equal(saga_inproc_hub_free(hub), SAGA_OK);
}

/* ---- two threads -------------------------------------------------------------------------- */

#define NSAGAS 2000
#define NSTEPS 3

typedef struct world2 {
  saga_inproc_hub *hub;
  char *dir;
  /* participant thread */
  uv_loop_t ploop;
  uv_thread_t ptid;
  uv_sem_t sem;
  saga_node *part;
  /* orchestrator (main thread) */
  uv_loop_t oloop;
  saga_node *orch;
  int terminal, completed, compensated, started;
} world2;

static int fx_do(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  char sql[160];
  snprintf(sql, sizeof sql, "INSERT INTO fx VALUES ('%s', %u, 'do')", saga_msg_saga_id(m),
           saga_msg_step(m));
  if (sqlite3_exec(saga_tx_db(tx), sql, NULL, NULL, NULL) != SQLITE_OK) return SAGA_EIO;
  int64_t fail = -1;
  saga_data_get_i64(saga_msg_data(m), "fail", &fail);
  if (fail == (int64_t)saga_msg_step(m)) return saga_reply_fail(r, "planned refusal");
  return SAGA_OK;
}

static int fx_undo(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  char sql[160];
  snprintf(sql, sizeof sql, "INSERT INTO fx VALUES ('%s', %u, 'undo')", saga_msg_saga_id(m),
           saga_msg_step(m));
  return sqlite3_exec(saga_tx_db(tx), sql, NULL, NULL, NULL) == SQLITE_OK ? SAGA_OK : SAGA_EIO;
}

static saga_node *open2(world2 *w, uv_loop_t *loop, const char *name) {
  saga_transport *t = NULL;
  assert_int_equal(saga_inproc_transport_new(&t, w->hub), SAGA_OK);
  char *path = th_path(w->dir, name);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = name;
  cfg.db_path = path;
  cfg.transport = t;
  cfg.synchronous = SAGA_SYNC_NORMAL;
  saga_node *n = NULL;
  char err[256];
  int rc = saga_node_open(&n, loop, &cfg, err, sizeof err);
  if (rc != SAGA_OK) printf("open %s: %s\n", name, err);
  assert_int_equal(rc, SAGA_OK);
  free(path);
  return n;
}

static void part_main(void *arg) {
  world2 *w = arg;
  uv_loop_init(&w->ploop);
  w->part = open2(w, &w->ploop, "part");
  sqlite3_exec(saga_node_db(w->part), "CREATE TABLE fx(saga_id TEXT, step INT, kind TEXT)",
               NULL, NULL, NULL);
  assert_int_equal(saga_node_handle(w->part, "svc", "do", fx_do, NULL), SAGA_OK);
  assert_int_equal(saga_node_handle(w->part, "svc", "undo", fx_undo, NULL), SAGA_OK);
  assert_int_equal(saga_node_start(w->part, NULL), SAGA_OK);
  uv_sem_post(&w->sem);
  uv_run(&w->ploop, UV_RUN_DEFAULT); /* until the node is closed */
  th_drain(&w->ploop);
  uv_loop_close(&w->ploop);
}

static void on_event2(saga_node *n, const saga_event *ev, void *arg) {
  world2 *w = arg;
  if (ev->type == SAGA_EV_COMPLETED) w->completed++;
  if (ev->type == SAGA_EV_SAGA_COMPENSATED) w->compensated++;
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED ||
      ev->type == SAGA_EV_SAGA_FAILED)
    w->terminal++;
}

static int all_done(void *arg) { return ((world2 *)arg)->terminal >= NSAGAS; }

static void close_part(saga_node *n, void *arg) {
  if (n != NULL) saga_node_close(n, NULL, NULL);
}

static void test_two_threads(void **state) {
  world2 w;
  memset(&w, 0, sizeof w);
  assert_int_equal(saga_inproc_hub_new(&w.hub, NULL), SAGA_OK);
  w.dir = th_tmpdir();
  assert_int_equal(uv_sem_init(&w.sem, 0), 0);
  assert_int_equal(uv_thread_create(&w.ptid, part_main, &w), 0);
  uv_sem_wait(&w.sem);

  uv_loop_init(&w.oloop);
  saga_transport *t = NULL;
  assert_int_equal(saga_inproc_transport_new(&t, w.hub), SAGA_OK);
  char *path = th_path(w.dir, "orch");
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = "orch";
  cfg.db_path = path;
  cfg.transport = t;
  cfg.synchronous = SAGA_SYNC_NORMAL;
  cfg.on_event = on_event2;
  cfg.event_arg = &w;
  char err[256];
  assert_int_equal(saga_node_open(&w.orch, &w.oloop, &cfg, err, sizeof err), SAGA_OK);
  free(path);
  saga_step steps[NSTEPS];
  memset(steps, 0, sizeof steps);
  for (int i = 0; i < NSTEPS; i++) {
    steps[i].name = "S";
    steps[i].channel = "svc";
    steps[i].action = "do";
    steps[i].compensation = "undo";
  }
  saga_definition def = {SAGA_DEFINITION_VERSION, "two", 1, steps, NSTEPS, 0, sizeof(saga_step)};
  assert_int_equal(saga_node_register(w.orch, &def), SAGA_OK);
  assert_int_equal(saga_node_start(w.orch, NULL), SAGA_OK);
  for (int i = 0; i < NSAGAS; i++) {
    saga_data *d = NULL;
    saga_data_new(&d, NULL);
    if (i % 4 == 0) saga_data_set_i64(d, "fail", i % 3); /* refused at step 0, 1 or 2 */
    assert_int_equal(saga_start(w.orch, "two", d, NULL, NULL, NULL), SAGA_OK);
    saga_data_free(d);
  }
  assert_int_equal(th_run_real(&w.oloop, all_done, &w, 120000), 0);
  printf("%d completed, %d compensated\n", w.completed, w.compensated);
  assert_int_equal(w.completed, NSAGAS - NSAGAS / 4);
  assert_int_equal(w.compensated, NSAGAS / 4);

  /* Every effect exactly once: each completed saga did each step once and undid none; a
   * saga refused at step k did steps 0..k (k refused, rolled back) and undid 0..k-1. */
  assert_int_equal(saga_node_post(w.part, close_part, NULL), SAGA_OK);
  uv_thread_join(&w.ptid);
  saga_node_close(w.orch, NULL, NULL);
  th_drain(&w.oloop);
  assert_int_equal(uv_loop_close(&w.oloop), 0);
  assert_int_equal(saga_inproc_hub_free(w.hub), SAGA_OK);

  sqlite3 *db = NULL;
  char *ppath = th_path(w.dir, "part");
  assert_int_equal(sqlite3_open(ppath, &db), SQLITE_OK);
  free(ppath);
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db,
                                      "SELECT count(*), count(DISTINCT saga_id || '/' || step"
                                      " || kind) FROM fx WHERE kind = ?1",
                                      -1, &st, NULL),
                   SQLITE_OK);
  int expect_do = (NSAGAS - NSAGAS / 4) * NSTEPS, expect_undo = 0;
  for (int i = 0; i < NSAGAS; i += 4) { /* refused at step i % 3: the steps below it */
    expect_do += i % 3;
    expect_undo += i % 3;
  }
  const char *kinds[] = {"do", "undo"};
  int expect[] = {expect_do, expect_undo};
  for (int k = 0; k < 2; k++) {
    sqlite3_bind_text(st, 1, kinds[k], -1, SQLITE_STATIC);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    int total = sqlite3_column_int(st, 0), distinct = sqlite3_column_int(st, 1);
    printf("%s: %d rows, %d distinct, want %d\n", kinds[k], total, distinct, expect[k]);
    assert_int_equal(total, distinct); /* never twice */
    assert_int_equal(total, expect[k]);
    sqlite3_reset(st);
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  th_rmdir(w.dir);
  uv_sem_destroy(&w.sem);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_inproc_conformance),
      cmocka_unit_test(test_inproc_bad_input),
      cmocka_unit_test(test_two_threads),
      cmocka_unit_test(test_destroy_while_closing),
      cmocka_unit_test(test_held_once_and_limit),
      cmocka_unit_test(test_node_resends_bounded),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
