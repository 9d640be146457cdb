/*
 * Domain events (saga/domain.h): published from application transactions
 * (saga_node_transact) and from participant handlers, handled by subscribers
 * (saga_node_on_event) exactly once and in order per key, over the in-memory hub with its
 * faults; poison events to dead letters while later ones flow, replayed by an operator's
 * request; transient failures retried; limits checked at publish; hostile bytes from the
 * network dead-lettered with a reason; a subscriber killed between its commit and its
 * acknowledgement (a forked child that _exit()s there) handles nothing twice.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sqlite3.h>

#include "harness.h"
#include "internal.h" /* saga__transport_host: a raw endpoint on the hub */

#define KEYS 5

typedef struct world {
  uv_loop_t loop;
  saga_clock *clock;
  saga_mem_hub *hub;
  char *dir;
  saga_node *pub, *sub;
  int poison;      /* the subscriber fails "Poison" events with SAGA_EINVAL */
  int busy_left;   /* the subscriber's next runs return SAGA_EBUSY */
  int dones, done_ok;
  int last_status;
  int crash_after; /* child: _exit at the crash_after-th commit that handled an event */
  int commits;
  uint32_t max_deliveries;
} world;

/* ---- the subscriber --------------------------------------------------------------------- */

static int64_t q_int(sqlite3 *db, const char *sql) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
  int64_t v = -1;
  if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

static void exec_sql(sqlite3 *db, const char *sql) {
  char *err = NULL;
  int rc = sqlite3_exec(db, sql, NULL, NULL, &err);
  if (rc != SQLITE_OK) printf("sql: %s\n", err ? err : "?");
  sqlite3_free(err);
  assert_int_equal(rc, SQLITE_OK);
}

/* Records the event in the subscriber's own table, in its transaction. */
static int on_any(saga_tx *tx, const saga_domain_event *ev, void *arg) {
  world *w = arg;
  if (w->busy_left > 0) {
    w->busy_left--;
    return SAGA_EBUSY;
  }
  sqlite3 *db = saga_tx_db(tx);
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, "INSERT INTO got(id, name, key, seq, data, source)"
                             " VALUES(?1, ?2, ?3, ?4, ?5, ?6)", -1, &st, NULL) != SQLITE_OK)
    return SAGA_ESTORE;
  sqlite3_bind_text(st, 1, ev->id, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, ev->name, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 3, ev->key, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 4, (sqlite3_int64)ev->seq);
  sqlite3_bind_blob(st, 5, ev->data, (int)ev->len, SQLITE_STATIC);
  sqlite3_bind_text(st, 6, ev->source, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) return SAGA_ESTORE;
  /* A poison event fails after writing: its write must be rolled back. */
  if (w->poison && strcmp(ev->name, "Poison") == 0) return SAGA_EINVAL;
  /* Handlers may start sagas: an "Enrolled" starts a "welcome" saga, keyed on the event. */
  if (strcmp(ev->name, "Enrolled") == 0) {
    char id[40];
    int existed = 0;
    return saga_tx_start(tx, "welcome", NULL, ev->id, id, sizeof id, &existed);
  }
  /* Handlers may publish further events: "Posted" makes a "Mailed" for the publisher. */
  if (strcmp(ev->name, "Posted") == 0)
    return saga_tx_publish(tx, "back", "Mailed", ev->key, ev->data, ev->len);
  return SAGA_OK;
}

/* The publisher receives the subscriber's "Mailed" events. */
static int on_mailed(saga_tx *tx, const saga_domain_event *ev, void *arg) {
  (void)arg;
  char sql[200];
  snprintf(sql, sizeof sql, "INSERT INTO mailed(key) VALUES('%.60s')", ev->key);
  return sqlite3_exec(saga_tx_db(tx), sql, NULL, NULL, NULL) == SQLITE_OK ? SAGA_OK : SAGA_ESTORE;
}

/* ---- the publisher ---------------------------------------------------------------------- */

typedef struct course_op {
  const char *name, *key, *data;
  int fail; /* the function fails after publishing: nothing may remain */
} course_op;

static int course_tx(saga_tx *tx, void *arg) {
  course_op *op = arg;
  char sql[200];
  snprintf(sql, sizeof sql, "INSERT INTO course_log(name, key) VALUES('%s', '%s')", op->name,
           op->key);
  if (sqlite3_exec(saga_tx_db(tx), sql, NULL, NULL, NULL) != SQLITE_OK) return SAGA_ESTORE;
  int rc = saga_tx_publish(tx, "ev", op->name, op->key, op->data, op->data ? strlen(op->data) : 0);
  if (rc != SAGA_OK) return rc;
  return op->fail ? SAGA_EREFUSED : SAGA_OK;
}

static void on_done(saga_node *n, int status, void *arg) {
  (void)n;
  world *w = arg;
  w->dones++;
  w->last_status = status;
  if (status == SAGA_OK) w->done_ok++;
}

/* The participant's handler publishes "Enrolled" in the step's transaction. */
static int enroll(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)arg;
  const saga_data *d = saga_msg_data(m);
  const char *student = saga_data_get_str(d, "student");
  int rc = saga_tx_publish(tx, "ev", "Enrolled", student, "x", 1);
  if (rc != SAGA_OK) return rc;
  if (saga_data_get_str(d, "refuse") != NULL) return saga_reply_fail(r, "full");
  return SAGA_OK;
}

static int greet(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)tx, (void)m, (void)r, (void)arg;
  return SAGA_OK;
}

/* ---- the world -------------------------------------------------------------------------- */

static void hook(void *arg, const char *point) {
  world *w = arg;
  if (w->crash_after == 0 || strcmp(point, "tx.after_commit") != 0) return;
  saga_node_stats st;
  if (w->sub == NULL || saga_node_stats_get(w->sub, &st, sizeof st) != SAGA_OK) return;
  /* Only commits in which a handler ran: committed, not yet acknowledged. */
  if ((int)st.event_handler_runs > w->commits) {
    w->commits = (int)st.event_handler_runs;
    if (w->commits >= w->crash_after) _exit(0);
  }
}

static saga_node *open_node(world *w, const char *name, int is_sub) {
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w->hub), SAGA_OK);
  char file[64];
  snprintf(file, sizeof file, "%s.db", name);
  char *path = th_path(w->dir, file);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = name;
  cfg.db_path = path;
  cfg.transport = t;
  cfg.clock = w->clock;
  cfg.resend_ms = 200;
  cfg.max_deliveries = w->max_deliveries;
  if (is_sub) {
    cfg.test_hook = hook;
    cfg.test_hook_arg = w;
  }
  saga_node *n = NULL;
  char err[256];
  int rc = saga_node_open(&n, &w->loop, &cfg, err, sizeof err);
  if (rc != SAGA_OK) printf("open %s: %s\n", name, err);
  assert_int_equal(rc, SAGA_OK);
  free(path);
  return n;
}

static void open_nodes(world *w) {
  w->pub = open_node(w, "pub", 0);
  w->sub = open_node(w, "sub", 1);
  exec_sql(saga_node_db(w->pub), "CREATE TABLE IF NOT EXISTS course_log(name TEXT, key TEXT);"
                                 "CREATE TABLE IF NOT EXISTS mailed(key TEXT)");
  exec_sql(saga_node_db(w->sub), "CREATE TABLE IF NOT EXISTS got(id TEXT, name TEXT, key TEXT,"
                                 " seq INTEGER, data BLOB, source TEXT)");
  static const saga_step steps[] = {
      {.name = "ENROLL", .channel = "pubq", .action = "enroll", .kind = SAGA_STEP_PIVOT}};
  static const saga_definition def = {SAGA_DEFINITION_VERSION, "enroll", 1, steps, 1, 0,
                                      sizeof(saga_step)};
  assert_int_equal(saga_node_register(w->pub, &def), SAGA_OK);
  static const saga_step wsteps[] = {{.name = "GREET", .local_action = greet}};
  static const saga_definition welcome = {SAGA_DEFINITION_VERSION, "welcome", 1, wsteps, 1, 0,
                                          sizeof(saga_step)};
  assert_int_equal(saga_node_register(w->sub, &welcome), SAGA_OK);
  assert_int_equal(saga_node_handle(w->pub, "pubq", "enroll", enroll, w), SAGA_OK);
  assert_int_equal(saga_node_on_event(w->pub, "back", "Mailed", on_mailed, w), SAGA_OK);
  assert_int_equal(saga_node_on_event(w->sub, "ev", NULL, on_any, w), SAGA_OK);
  assert_int_equal(saga_node_start(w->pub, NULL), SAGA_OK);
  assert_int_equal(saga_node_start(w->sub, NULL), SAGA_OK);
}

static void setup_world(world *w, const saga_mem_faults *faults, int fresh) {
  if (fresh) {
    memset(w, 0, sizeof *w);
    w->dir = th_tmpdir();
  }
  uv_loop_init(&w->loop);
  assert_int_equal(saga_clock_manual_new(&w->clock, 1000000, NULL), SAGA_OK);
  assert_int_equal(saga_mem_hub_new(&w->hub, &w->loop, w->clock, faults, NULL), SAGA_OK);
  open_nodes(w);
}

static void close_world(world *w) {
  saga_node_close(w->pub, NULL, NULL);
  saga_node_close(w->sub, NULL, NULL);
  w->pub = w->sub = NULL;
  th_drain(&w->loop);
  assert_int_equal(saga_mem_hub_close(w->hub), SAGA_OK);
  th_drain(&w->loop);
  saga_clock_free(w->clock);
  assert_int_equal(uv_loop_close(&w->loop), 0);
}

static void teardown_world(world *w) {
  close_world(w);
  th_rmdir(w->dir);
}

typedef struct until {
  world *w;
  int64_t got, dones, outbox;
} until;

/* The subscriber recorded `got` events, `dones` transactions were reported, and (outbox >= 0)
 * the publisher's outbox drained to that depth. */
static int reached(void *arg) {
  until *u = arg;
  if (q_int(saga_node_db(u->w->sub), "SELECT count(*) FROM got") < u->got) return 0;
  if (u->w->dones < u->dones) return 0;
  if (u->outbox >= 0 && saga_node_outbox_depth(u->w->pub) > u->outbox) return 0;
  return 1;
}

static void run_until(world *w, int64_t got, int dones) {
  until u = {w, got, dones, 0};
  assert_int_equal(th_run_manual(&w->loop, w->clock, reached, &u, 600000), 0);
}

/* Runs a while longer for anything late (duplicates, resends). */
static int never(void *arg) {
  (void)arg;
  return 0;
}
static void settle(world *w, uint64_t ms) { th_run_manual(&w->loop, w->clock, never, NULL, ms); }

/* Every event once, and per key in sequence order 1..n without gaps (checked in the order the
 * subscriber's transactions recorded them). */
static void check_once_in_order(world *w, int expect_total) {
  sqlite3 *db = saga_node_db(w->sub);
  assert_int_equal(q_int(db, "SELECT count(*) FROM got WHERE name != 'Poison'"), expect_total);
  assert_int_equal(q_int(db, "SELECT count(*) - count(DISTINCT id) FROM got"), 0);
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, "SELECT key, seq FROM got ORDER BY rowid", -1, &st,
                                      NULL),
                   SQLITE_OK);
  char keys[16][32];
  int64_t last[16];
  int nkeys = 0;
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *k = (const char *)sqlite3_column_text(st, 0);
    int64_t seq = sqlite3_column_int64(st, 1);
    int i = 0;
    while (i < nkeys && strcmp(keys[i], k) != 0) i++;
    if (i == nkeys) {
      assert_true(nkeys < 16);
      snprintf(keys[nkeys], sizeof keys[nkeys], "%s", k);
      last[nkeys++] = 0;
    }
    if (seq != last[i] + 1) printf("key %s: seq %lld after %lld\n", k, (long long)seq, (long long)last[i]);
    assert_int_equal(seq, last[i] + 1);
    last[i] = seq;
  }
  sqlite3_finalize(st);
}

static void transact(world *w, const char *name, const char *key, const char *data, int fail) {
  static course_op ops[1024];
  static size_t nops;
  course_op *op = &ops[nops++ % 1024];
  op->name = name;
  op->key = key;
  op->data = data;
  op->fail = fail;
  assert_int_equal(saga_node_transact(w->pub, course_tx, op, on_done, w), SAGA_OK);
}

/* ---- tests ------------------------------------------------------------------------------ */

/* An application transaction's writes and its event commit together; one that fails leaves
 * neither. The subscriber sees the event's fields as published; a handler's event reaches the
 * publisher back. */
static void test_publish_in_transaction(void **state) {
  (void)state;
  world w;
  setup_world(&w, NULL, 1);
  transact(&w, "Created", "c1", "{\"title\":\"C\"}", 0);
  transact(&w, "Created", "c2", "{}", 1); /* fails after publishing: no event */
  transact(&w, "Posted", "c1", "{\"title\":\"C\"}", 0);
  run_until(&w, 2, 3);
  settle(&w, 3000);
  assert_int_equal(w.done_ok, 2);
  assert_int_equal(w.last_status, SAGA_OK);
  sqlite3 *pdb = saga_node_db(w.pub), *sdb = saga_node_db(w.sub);
  assert_int_equal(q_int(pdb, "SELECT count(*) FROM course_log"), 2);
  assert_int_equal(q_int(pdb, "SELECT count(*) FROM course_log WHERE key = 'c2'"), 0);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got"), 2);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got WHERE key = 'c2'"), 0);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got WHERE name = 'Created' AND seq = 1 AND"
                              " source = 'pub' AND data = CAST('{\"title\":\"C\"}' AS BLOB)"
                              " AND length(id) = 32"),
                   1);
  assert_int_equal(q_int(sdb, "SELECT seq FROM got WHERE name = 'Posted'"), 2);
  /* The subscriber's handler published "Mailed" in its transaction: handled once. */
  assert_int_equal(q_int(pdb, "SELECT count(*) FROM mailed WHERE key = 'c1'"), 1);
  assert_int_equal(saga_node_outbox_depth(w.pub), 0);
  assert_int_equal(saga_node_outbox_depth(w.sub), 0);
  teardown_world(&w);
}

static int saga_started;
static void started(saga_node *n, int status, const char *id, int existed, void *arg) {
  (void)n, (void)id, (void)existed, (void)arg;
  if (status == SAGA_OK) saga_started++;
}

static int terminal2(void *arg) {
  world *w = arg;
  int64_t c[6];
  if (saga_node_count_by_state(w->pub, c) != SAGA_OK) return 0;
  return c[SAGA_COMPLETED] + c[SAGA_COMPENSATED] >= 2;
}

/* A participant handler's event commits with its step; a refused step publishes nothing. */
static void test_publish_in_handler(void **state) {
  (void)state;
  world w;
  setup_world(&w, NULL, 1);
  saga_data *d = NULL;
  saga_data_new(&d, NULL);
  saga_data_set_str(d, "student", "s1");
  assert_int_equal(saga_start(w.pub, "enroll", d, NULL, started, NULL), SAGA_OK);
  saga_data_set_str(d, "student", "s2");
  saga_data_set_str(d, "refuse", "1");
  assert_int_equal(saga_start(w.pub, "enroll", d, NULL, started, NULL), SAGA_OK);
  saga_data_free(d);
  assert_int_equal(th_run_manual(&w.loop, w.clock, terminal2, &w, 60000), 0);
  run_until(&w, 1, 0);
  settle(&w, 3000);
  sqlite3 *sdb = saga_node_db(w.sub);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got"), 1);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got WHERE name = 'Enrolled' AND key = 's1'"),
                   1);
  /* The event handler started a saga in its transaction: it ran to its end, once. */
  int64_t c[6];
  assert_int_equal(saga_node_count_by_state(w.sub, c), SAGA_OK);
  assert_int_equal(c[SAGA_COMPLETED], 1);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM saga_instance WHERE def_name = 'welcome'"), 1);
  teardown_world(&w);
}

/* 300 events over 5 keys through a hub that drops, duplicates, reorders and delays messages
 * and loses acknowledgements: each handled exactly once, per key in sequence order. */
static void test_exactly_once_in_order_under_faults(void **state) {
  (void)state;
  uint64_t seed = th_seed(7);
  saga_mem_faults f = {seed, 0.1, 0.3, 0.4, 0.3, 300, 0.3};
  world w;
  setup_world(&w, &f, 1);
  static const char *keys[KEYS] = {"k0", "k1", "k2", "k3", "k4"};
  int total = 0;
  for (int round = 0; round < 6; round++) {
    for (int i = 0; i < 50; i++) transact(&w, "Updated", keys[(i * 7 + round) % KEYS], "d", 0);
    total += 50;
    settle(&w, 50); /* publications spread over several transactions */
  }
  run_until(&w, total, total);
  saga_mem_faults healed;
  memset(&healed, 0, sizeof healed);
  saga_mem_hub_set_faults(w.hub, &healed);
  until u = {&w, total, total, 0};
  assert_int_equal(th_run_manual(&w.loop, w.clock, reached, &u, 600000), 0);
  settle(&w, 5000);
  check_once_in_order(&w, total);
  saga_node_stats st;
  assert_int_equal(saga_node_stats_get(w.sub, &st, sizeof st), SAGA_OK);
  printf("held %llu duplicates %llu runs %llu\n", (unsigned long long)st.events_held,
         (unsigned long long)st.duplicates, (unsigned long long)st.event_handler_runs);
  assert_true(st.events_held > 0); /* the faults did reorder: order was restored */
  assert_true(st.duplicates > 0);  /* and duplicated: nothing ran twice */
  assert_int_equal(st.event_handler_runs, (uint64_t)total);
  assert_int_equal(q_int(saga_node_db(w.sub), "SELECT count(*) FROM saga_dead_letter"), 0);
  teardown_world(&w);
}

#ifdef SAGACTL
/* Runs sagactl with args (a shell command line), its output into out; asserts exit 0. */
static void sagactl(const char *args, char *out, size_t cap) {
  char cmd[800];
  snprintf(cmd, sizeof cmd, "%s %s 2>&1", SAGACTL, args);
  FILE *f = popen(cmd, "r");
  assert_non_null(f);
  size_t n = fread(out, 1, cap - 1, f);
  out[n] = '\0';
  int st = pclose(f);
  if (st != 0) printf("sagactl %s:\n%s\n", args, out);
  assert_int_equal(st, 0);
}
#endif

/* A poison event goes to the dead letters with the reason, its write rolled back, and the
 * events after it (same key, other keys) flow; an operator's replay runs it once it is
 * fixed. */
static void test_poison_dead_lettered_then_replayed(void **state) {
  (void)state;
  world w;
  memset(&w, 0, sizeof w);
  w.dir = th_tmpdir();
  w.poison = 1;
  setup_world(&w, NULL, 0);
  transact(&w, "Created", "p", "1", 0);
  transact(&w, "Poison", "p", "2", 0);
  transact(&w, "Updated", "p", "3", 0);
  transact(&w, "Created", "q", "4", 0);
  run_until(&w, 3, 4);
  settle(&w, 3000);
  sqlite3 *sdb = saga_node_db(w.sub);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got"), 3); /* the poison's write undone */
  assert_int_equal(q_int(sdb, "SELECT seq FROM got WHERE key = 'p' AND name = 'Updated'"), 3);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM saga_dead_letter WHERE channel = 'ev' AND"
                              " reason LIKE 'event handler for ''Poison'' on ''ev'' failed:"
                              " EINVAL%'"),
                   1);
  assert_int_equal(saga_node_outbox_depth(w.pub), 0);
  /* Fixed: replayed by an operator request. */
  w.poison = 0;
  int64_t dead = q_int(sdb, "SELECT id FROM saga_dead_letter");
#ifdef SAGACTL
  /* Visible and replayable with sagactl, like every dead letter. */
  char *path = th_path(w.dir, "sub.db"), out[4096];
  snprintf(out, sizeof out, "dead-letters %s list", path);
  sagactl(out, out, sizeof out);
  assert_non_null(strstr(out, "event handler for 'Poison' on 'ev' failed: EINVAL"));
  char cmd[700];
  snprintf(cmd, sizeof cmd, "dead-letters %s show %lld", path, (long long)dead);
  sagactl(cmd, out, sizeof out);
  assert_non_null(strstr(out, "event      Poison"));
  assert_non_null(strstr(out, "seq: 2"));
  assert_non_null(strstr(out, "key: p"));
  assert_non_null(strstr(out, "data       1 bytes (a domain event's data: not shown)"));
  snprintf(cmd, sizeof cmd, "dead-letters %s replay %lld", path, (long long)dead);
  sagactl(cmd, out, sizeof out);
  free(path);
#else
  char sql[200];
  snprintf(sql, sizeof sql, "INSERT INTO saga_operator_request(at_ms, action, target,"
           " requested_by) VALUES(1, 'replay', '%lld', 'test')", (long long)dead);
  exec_sql(sdb, sql);
#endif
  run_until(&w, 4, 0);
  settle(&w, 2000);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got WHERE name = 'Poison'"), 1);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM saga_dead_letter"), 0);
  assert_int_equal(q_int(sdb, "SELECT state FROM saga_operator_request"), 1);
  /* A second replay of the same event is refused: it was handled. */
  exec_sql(sdb, "INSERT INTO saga_operator_request(at_ms, action, target, requested_by)"
                " VALUES(1, 'replay', '999', 'test')");
  settle(&w, 2000);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got WHERE name = 'Poison'"), 1);
  teardown_world(&w);
}

/* Transient failures are retried on redelivery; past max_deliveries the event is
 * dead-lettered and the key moves on. */
static void test_transient_retried(void **state) {
  (void)state;
  world w;
  memset(&w, 0, sizeof w);
  w.dir = th_tmpdir();
  w.max_deliveries = 3;
  setup_world(&w, NULL, 0);
  w.busy_left = 2; /* fails twice, then handled */
  transact(&w, "Created", "t", "1", 0);
  run_until(&w, 1, 1);
  settle(&w, 2000);
  sqlite3 *sdb = saga_node_db(w.sub);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got"), 1);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM saga_dead_letter"), 0);
  w.busy_left = 1000; /* always busy: dead-lettered after 3 deliveries */
  transact(&w, "Updated", "t", "2", 0);
  until u = {&w, 1, 2, 0};
  assert_int_equal(th_run_manual(&w.loop, w.clock, reached, &u, 60000), 0);
  settle(&w, 3000);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM saga_dead_letter WHERE reason LIKE"
                              " '%EBUSY%tried max_deliveries times'"),
                   1);
  assert_int_equal(1000 - w.busy_left, 3);
  w.busy_left = 0;
  transact(&w, "Updated", "t", "3", 0); /* the key flows again */
  run_until(&w, 2, 3);
  assert_int_equal(q_int(sdb, "SELECT seq FROM got WHERE data = CAST('3' AS BLOB)"), 3);
  teardown_world(&w);
}

static int publish_args(saga_tx *tx, void *arg) {
  world *w = arg;
  char big[300];
  memset(big, 'a', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  saga_node *n = w->pub;
  assert_int_equal(saga_tx_publish(tx, "ev", "", "k", "x", 1), SAGA_EINVAL);
  assert_non_null(strstr(saga_node_errmsg(n), "event name"));
  assert_int_equal(saga_tx_publish(tx, "ev", NULL, "k", "x", 1), SAGA_EINVAL);
  assert_int_equal(saga_tx_publish(tx, "ev", big, "k", "x", 1), SAGA_EINVAL);
  assert_int_equal(saga_tx_publish(tx, "", "N", "k", "x", 1), SAGA_EINVAL);
  assert_int_equal(saga_tx_publish(tx, big, "N", "k", "x", 1), SAGA_EINVAL);
  assert_int_equal(saga_tx_publish(tx, "saga.local", "N", "k", "x", 1), SAGA_EINVAL);
  assert_int_equal(saga_tx_publish(tx, "ev", "N", big, "x", 1), SAGA_EINVAL);
  assert_non_null(strstr(saga_node_errmsg(n), "event key"));
  assert_int_equal(saga_tx_publish(tx, "ev", "N", "k", NULL, 5), SAGA_EINVAL);
  assert_int_equal(saga_tx_publish(NULL, "ev", "N", "k", "x", 1), SAGA_EINVAL);
  size_t limit = 1024 * 1024 - 4096;
  char *data = calloc(1, limit + 1);
  assert_int_equal(saga_tx_publish(tx, "ev", "N", "k", data, limit + 1), SAGA_ETOOBIG);
  assert_non_null(strstr(saga_node_errmsg(n), "event data is"));
  /* At the limit it fits, and the message is within max_message_bytes. */
  assert_int_equal(saga_tx_publish(tx, "ev", "Big", "k", data, limit), SAGA_OK);
  free(data);
  big[SAGA_EVENT_NAME_MAX] = '\0'; /* 256 bytes: accepted */
  assert_int_equal(saga_tx_publish(tx, big, big, big, NULL, 0), SAGA_OK);
  /* An application transaction serves no saga: it cannot hold a semantic lock. */
  assert_int_equal(saga_lock_acquire(tx, "order", "1"), SAGA_ESTATE);
  assert_non_null(strstr(saga_node_errmsg(n), "held by a saga"));
  assert_int_equal(saga_lock_release(tx, "order", "1"), SAGA_ESTATE);
  assert_int_equal(saga_lock_release_all(tx, NULL), SAGA_ESTATE);
  return SAGA_OK;
}

static void lifecycle(saga_node *n, const saga_event *ev, void *arg) { (void)n, (void)ev, (void)arg; }

/* Limits checked where the event is made, with a clear error; nothing written by refusals. */
static void test_limits(void **state) {
  (void)state;
  world w;
  setup_world(&w, NULL, 1);
  assert_int_equal(saga_node_transact(w.pub, publish_args, &w, on_done, &w), SAGA_OK);
  settle(&w, 10);
  assert_int_equal(w.done_ok, 1);
  assert_int_equal(saga_node_outbox_depth(w.pub) >= 1, 1);
  assert_int_equal(q_int(saga_node_db(w.pub), "SELECT count(*) FROM saga_event_seq"), 2);
  /* Registration. */
  assert_int_equal(saga_node_on_event(w.sub, "ev2", "N", on_any, &w), SAGA_ESTATE);
  assert_int_equal(saga_node_transact(w.pub, NULL, NULL, NULL, NULL), SAGA_EINVAL);
  teardown_world(&w);

  saga_mem_hub *hub = NULL;
  uv_loop_t loop;
  uv_loop_init(&loop);
  assert_int_equal(saga_mem_hub_new(&hub, &loop, NULL, NULL, NULL), SAGA_OK);
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, hub), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = "solo";
  cfg.db_path = ":memory:";
  cfg.transport = t;
  saga_node *n = NULL;
  assert_int_equal(saga_node_open(&n, &loop, &cfg, NULL, 0), SAGA_OK);
  assert_int_equal(saga_node_on_event(n, "ev", "", on_any, NULL), SAGA_EINVAL);
  assert_int_equal(saga_node_on_event(n, "", "N", on_any, NULL), SAGA_EINVAL);
  assert_int_equal(saga_node_on_event(n, "ev", "N", NULL, NULL), SAGA_EINVAL);
  assert_int_equal(saga_node_on_event(n, "saga.local", "N", on_any, NULL), SAGA_EINVAL);
  assert_int_equal(saga_node_on_event(n, "ev", "N", on_any, NULL), SAGA_OK);
  assert_int_equal(saga_node_on_event(n, "ev", "N", on_any, NULL), SAGA_EEXIST);
  assert_int_equal(saga_node_on_event(n, "ev", NULL, on_any, NULL), SAGA_OK);
  assert_int_equal(saga_node_on_event(n, "ev", NULL, on_any, NULL), SAGA_EEXIST);
  /* A channel is either domain events or saga lifecycle events. */
  assert_int_equal(saga_node_subscribe_events(n, "ev", lifecycle, NULL), SAGA_EEXIST);
  assert_int_equal(saga_node_transact(n, publish_args, NULL, NULL, NULL), SAGA_ESTATE);
  saga_node_close(n, NULL, NULL);
  th_drain(&loop);
  assert_int_equal(saga_mem_hub_close(hub), SAGA_OK);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- hostile bytes ---------------------------------------------------------------------- */

typedef struct raw_peer {
  saga_transport *t;
  saga__transport_host host;
  uint64_t token;
  size_t confirmed;
  int closed;
} raw_peer;

static int raw_deliver(void *ctx, const char *ch, const void *d, size_t l, uint64_t tag) {
  (void)ch, (void)d, (void)l;
  raw_peer *p = ctx;
  p->t->methods->ack(p->t, tag);
  return SAGA_OK;
}
static void raw_sent(void *ctx, uint64_t token, int status) {
  (void)token;
  if (status == SAGA_OK) ((raw_peer *)ctx)->confirmed++;
}
static void raw_closed(void *ctx) { ((raw_peer *)ctx)->closed = 1; }
static void raw_log(void *ctx, saga_log_level level, const char *msg) {
  (void)ctx, (void)level, (void)msg;
}

static void send_event(raw_peer *p, const char *id, const char *name, const saga_header *h,
                       size_t nh) {
  saga_envelope e;
  memset(&e, 0, sizeof e);
  e.version = SAGA_ENVELOPE_VERSION;
  e.kind = SAGA_MSG_EVENT;
  e.msg_id = id;
  e.saga_id = "";
  e.name = name;
  e.headers = h;
  e.nheaders = nh;
  void *out = NULL;
  size_t len = 0;
  assert_int_equal(saga_envelope_encode(&e, NULL, &out, &len), SAGA_OK);
  assert_int_equal(p->t->methods->send(p->t, "ev", out, len, ++p->token), SAGA_OK);
  saga_free(NULL, out);
}

typedef struct confirmed_n {
  raw_peer *p;
  size_t n;
} confirmed_n;
static int all_confirmed(void *arg) {
  confirmed_n *c = arg;
  return c->p->confirmed >= c->n;
}

/* Malformed event bytes from the network: each dead-lettered with its reason and
 * acknowledged; nothing handled; a well-formed one after them is handled. */
static void test_malformed_events(void **state) {
  (void)state;
  world w;
  setup_world(&w, NULL, 1);
  raw_peer p;
  memset(&p, 0, sizeof p);
  assert_int_equal(saga_mem_transport_new(&p.t, w.hub), SAGA_OK);
  p.host.deliver = raw_deliver;
  p.host.sent = raw_sent;
  p.host.closed = raw_closed;
  p.host.log = raw_log;
  p.host.ctx = &p;
  p.t->saga__host = &p.host;
  assert_int_equal(p.t->methods->open(p.t, &w.loop), SAGA_OK);
  static const uint8_t garbage[] = {0x93, 0xc1, 0xff, 0x00};
  assert_int_equal(p.t->methods->send(p.t, "ev", garbage, sizeof garbage, ++p.token), SAGA_OK);
  char longkey[300];
  memset(longkey, 'k', sizeof longkey - 1);
  longkey[sizeof longkey - 1] = '\0';
  const char *stream = "0123456789abcdef";
  saga_header no_stream[2] = {{"seq", "1"}, {"key", "a"}};
  saga_header bad_stream[3] = {{"stream", "0123456789ABCDEF"}, {"seq", "1"}, {"key", "a"}};
  saga_header zero_seq[3] = {{"stream", stream}, {"seq", "0"}, {"key", "a"}};
  saga_header text_seq[3] = {{"stream", stream}, {"seq", "1x"}, {"key", "a"}};
  saga_header huge_seq[3] = {{"stream", stream}, {"seq", "99999999999999999999"}, {"key", "a"}};
  saga_header no_key[2] = {{"stream", stream}, {"seq", "1"}};
  saga_header long_key[3] = {{"stream", stream}, {"seq", "1"}, {"key", longkey}};
  saga_header good[3] = {{"stream", stream}, {"seq", "1"}, {"key", "a"}};
#define ID(n) "0000000000000000000000000000000" #n
  send_event(&p, ID(1), "N", no_stream, 2);
  send_event(&p, ID(2), "N", bad_stream, 3);
  send_event(&p, ID(3), "N", zero_seq, 3);
  send_event(&p, ID(4), "N", text_seq, 3);
  send_event(&p, ID(5), "N", huge_seq, 3);
  send_event(&p, ID(6), "N", no_key, 2);
  send_event(&p, ID(7), "N", long_key, 3);
  send_event(&p, "", "N", good, 3);
  /* A command's id: an event may never take its inbox record. */
  send_event(&p, "0123456789abcdef0123456789abcdef/0/0/1/0123456789abcdef", "N", good, 3);
  send_event(&p, "0000000000000000000000000000000A", "N", good, 3);
  send_event(&p, ID(9), "", good, 3);
  send_event(&p, ID(8), "N", good, 3);
  confirmed_n c = {&p, 13};
  assert_int_equal(th_run_manual(&w.loop, w.clock, all_confirmed, &c, 60000), 0);
  sqlite3 *sdb = saga_node_db(w.sub);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM saga_dead_letter"), 12);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM saga_dead_letter WHERE reason LIKE"
                              " 'EMALFORMED:%'"),
                   1);
  static const char *const reasons[] = {"''stream''", "''seq''", "''key''",
                                        "event id is not 32 lowercase hex", "event name"};
  static const int counts[] = {2, 3, 2, 3, 1};
  for (int i = 0; i < 5; i++) {
    char sql[200];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM saga_dead_letter WHERE reason LIKE"
             " 'malformed domain event: %%%s%%'", reasons[i]);
    assert_int_equal(q_int(sdb, sql), counts[i]);
  }
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM got WHERE id = '" ID(8) "'"), 1);
  assert_int_equal(q_int(sdb, "SELECT count(*) FROM saga_inbox"), 1);
  p.t->methods->close(p.t);
  p.t->methods->destroy(p.t);
  teardown_world(&w);
}

/* ---- a crash between the commit and the acknowledgement --------------------------------- */

/* A forked child runs the world and _exit()s right after the k-th commit in which the
 * subscriber handled an event (before acknowledging it); the parent reopens both databases
 * and runs on: the publisher resends, the subscriber finds each event handled already. */
static void test_crash_between_commit_and_ack(void **state) {
  (void)state;
  for (int k = 1; k <= 4; k++) {
    world w;
    memset(&w, 0, sizeof w);
    w.dir = th_tmpdir();
    fflush(stdout);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
      w.crash_after = k;
      setup_world(&w, NULL, 0);
      for (int i = 0; i < 12; i++) transact(&w, "Updated", i % 2 ? "a" : "b", "x", 0);
      until u = {&w, 12, 12, 0};
      th_run_manual(&w.loop, w.clock, reached, &u, 60000);
      _exit(3); /* the crash never came */
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) assert_int_equal(errno, EINTR);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    setup_world(&w, NULL, 0);
    sqlite3 *sdb = saga_node_db(w.sub);
    int64_t before = q_int(sdb, "SELECT count(*) FROM got");
    assert_true(before >= 1);
    /* The transactions the child committed are in the publisher's database: their events
     * reach the subscriber, each once. */
    int64_t published = q_int(saga_node_db(w.pub), "SELECT count(*) FROM course_log");
    until u = {&w, published, 0, 0};
    assert_int_equal(th_run_manual(&w.loop, w.clock, reached, &u, 60000), 0);
    settle(&w, 3000);
    check_once_in_order(&w, (int)published);
    saga_node_stats st;
    assert_int_equal(saga_node_stats_get(w.sub, &st, sizeof st), SAGA_OK);
    assert_true(st.duplicates >= 1); /* the event of the crashed commit came again */
    teardown_world(&w);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_publish_in_transaction),
      cmocka_unit_test(test_publish_in_handler),
      cmocka_unit_test(test_exactly_once_in_order_under_faults),
      cmocka_unit_test(test_poison_dead_lettered_then_replayed),
      cmocka_unit_test(test_transient_retried),
      cmocka_unit_test(test_limits),
      cmocka_unit_test(test_malformed_events),
      cmocka_unit_test(test_crash_between_commit_and_ack),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
