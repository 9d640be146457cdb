/*
 * Semantic locks (include/saga/lock.h): taken in a participant's transaction, refused to
 * another saga with the holder as the reason, rolled back with a refused handler, released by
 * a later step, by the step's compensation, and by the orchestrator's node when the saga ends
 * COMPLETED or COMPENSATED; kept by a FAILED saga until its repair; kept across a restart;
 * visible in saga_lock_view; bad arguments refused.
 *
 * The world: an orchestrator "orch" and a participant "part" (each its own database) on an
 * in-memory hub under a manual clock. Definition "hold" (all on channel "part"):
 *   0 TAKE   take / untake   locks ("order", data "order")
 *   1 TAKE2  take2 / untake2 locks ("ticket", data "ticket") when the data has it
 *   2 CHECK  check           refuses when the data has "refuse"
 *   3 FINISH finish (pivot)  saga_lock_release_all() when the data has "release"
 * Definition "local": 0 ROOM, a local step on the orchestrator's node locking ("room", data
 * "room"), then 1 CHECK on "part".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sqlite3.h>

#include "harness.h"

typedef struct lw {
  uv_loop_t loop;
  saga_clock *clock;
  saga_mem_hub *hub;
  char *dir;
  saga_node *orch, *part;
  /* the last saga run */
  char id[40];
  int start_status, ended;
  saga_state state;
  /* behaviour switches */
  int untake_refuse;   /* the compensation of TAKE refuses */
  int take_fail_after; /* TAKE locks, then refuses (1) or fails technically (2) */
  uint64_t released;   /* what FINISH's saga_lock_release_all() released */
  int take_runs;
  const char *crash_at; /* the participant's process _exit()s at this point (a forked child) */
} lw;

static lw W;

static int data_str(const saga_msg *m, const char *key, char *out, size_t len) {
  const void *v = NULL;
  size_t n = 0;
  if (saga_data_get(saga_msg_data(m), key, &v, &n) != SAGA_OK || n >= len) return 0;
  memcpy(out, v, n);
  out[n] = '\0';
  return 1;
}

static int take(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)arg;
  W.take_runs++;
  char order[64];
  if (!data_str(m, "order", order, sizeof order)) return saga_reply_fail(r, "no order");
  int rc = saga_lock_acquire(tx, "order", order);
  if (rc != SAGA_OK) return rc; /* SAGA_ELOCKED: a refusal naming the holder */
  /* Taking it again in the same saga changes nothing. */
  if ((rc = saga_lock_acquire(tx, "order", order)) != SAGA_OK) return rc;
  if (W.take_fail_after == 1) return saga_reply_fail(r, "refused after locking");
  if (W.take_fail_after == 2) return SAGA_EINVAL;
  return SAGA_OK;
}

static int take2(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  char ticket[64];
  if (!data_str(m, "ticket", ticket, sizeof ticket)) return SAGA_OK;
  return saga_lock_acquire(tx, "ticket", ticket);
}

static int untake(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)tx;
  (void)m;
  (void)arg;
  if (W.untake_refuse) return saga_reply_fail(r, "cannot undo now");
  return SAGA_OK;
}

static int nothing(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)tx;
  (void)m;
  (void)r;
  (void)arg;
  return SAGA_OK;
}

static int check(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)tx;
  (void)arg;
  char v[8];
  if (data_str(m, "refuse", v, sizeof v)) return saga_reply_fail(r, "check refused");
  return SAGA_OK;
}

static int finish(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  char v[8];
  if (!data_str(m, "release", v, sizeof v)) return SAGA_OK;
  return saga_lock_release_all(tx, &W.released);
}

static int local_room(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  char room[64];
  if (!data_str(m, "room", room, sizeof room)) return SAGA_OK;
  return saga_lock_acquire(tx, "room", room);
}

static const saga_step hold_steps[] = {
    {.name = "TAKE",
     .channel = "part",
     .action = "take",
     .compensation = "untake",
     .kind = SAGA_STEP_COMPENSATABLE,
     .timeout_ms = SAGA_STEP_NO_TIMEOUT},
    {.name = "TAKE2",
     .channel = "part",
     .action = "take2",
     .compensation = "untake2",
     .kind = SAGA_STEP_COMPENSATABLE,
     .timeout_ms = SAGA_STEP_NO_TIMEOUT},
    {.name = "CHECK",
     .channel = "part",
     .action = "check",
     .kind = SAGA_STEP_COMPENSATABLE,
     .timeout_ms = SAGA_STEP_NO_TIMEOUT},
    {.name = "FINISH",
     .channel = "part",
     .action = "finish",
     .kind = SAGA_STEP_PIVOT,
     .timeout_ms = SAGA_STEP_NO_TIMEOUT},
};
static const saga_definition hold_def = {SAGA_DEFINITION_VERSION, "hold", 1, hold_steps, 4, 0,
                                         sizeof(saga_step)};
static saga_step local_steps[] = {
    {.name = "ROOM",
     .local_action = local_room,
     .kind = SAGA_STEP_COMPENSATABLE,
     .timeout_ms = SAGA_STEP_NO_TIMEOUT},
    {.name = "CHECK",
     .channel = "part",
     .action = "check",
     .kind = SAGA_STEP_PIVOT,
     .timeout_ms = SAGA_STEP_NO_TIMEOUT},
};
static const saga_definition local_def = {SAGA_DEFINITION_VERSION, "local", 1, local_steps, 2, 0,
                                          sizeof(saga_step)};

static void crash_hook(void *arg, const char *point) {
  (void)arg;
  if (W.crash_at != NULL && strcmp(point, W.crash_at) == 0) _exit(0);
}

static saga_node *open_node(const char *name, int orchestrate) {
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, W.hub), SAGA_OK);
  char file[64];
  snprintf(file, sizeof file, "%s.db", name);
  char *path = th_path(W.dir, file);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = name;
  cfg.db_path = path;
  cfg.transport = t;
  cfg.clock = W.clock;
  cfg.retention.finished_ms = 0;
  cfg.retention.inbox_ms = 0;
  if (!orchestrate) cfg.test_hook = crash_hook;
  saga_node *n = NULL;
  char err[256];
  int rc = saga_node_open(&n, &W.loop, &cfg, err, sizeof err);
  free(path);
  if (rc != SAGA_OK) fail_msg("open %s: %s", name, err);
  if (orchestrate) {
    assert_int_equal(saga_node_register(n, &hold_def), SAGA_OK);
    assert_int_equal(saga_node_register(n, &local_def), SAGA_OK);
  } else {
    assert_int_equal(saga_node_handle(n, "part", "take", take, NULL), SAGA_OK);
    assert_int_equal(saga_node_handle(n, "part", "untake", untake, NULL), SAGA_OK);
    assert_int_equal(saga_node_handle(n, "part", "take2", take2, NULL), SAGA_OK);
    assert_int_equal(saga_node_handle(n, "part", "untake2", nothing, NULL), SAGA_OK);
    assert_int_equal(saga_node_handle(n, "part", "check", check, NULL), SAGA_OK);
    assert_int_equal(saga_node_handle(n, "part", "finish", finish, NULL), SAGA_OK);
  }
  assert_int_equal(saga_node_start(n, NULL), SAGA_OK);
  return n;
}

static void open_nodes(void) {
  assert_int_equal(saga_mem_hub_new(&W.hub, &W.loop, W.clock, NULL, NULL), SAGA_OK);
  W.orch = open_node("orch", 1);
  W.part = open_node("part", 0);
}

static void close_nodes(void) {
  saga_node_close(W.orch, NULL, NULL);
  saga_node_close(W.part, NULL, NULL);
  W.orch = W.part = NULL;
  th_drain(&W.loop);
  saga_mem_hub_close(W.hub);
  W.hub = NULL;
  th_drain(&W.loop);
}

static int setup(void **state) {
  (void)state;
  memset(&W, 0, sizeof W);
  uv_loop_init(&W.loop);
  W.dir = th_tmpdir();
  assert_int_equal(saga_clock_manual_new(&W.clock, UINT64_C(1700000000000), NULL), SAGA_OK);
  open_nodes();
  return 0;
}

static int teardown(void **state) {
  (void)state;
  close_nodes();
  saga_clock_free(W.clock);
  uv_loop_close(&W.loop);
  th_rmdir(W.dir);
  return 0;
}

static void watched(saga_node *n, int status, const char *id, saga_state st, void *arg) {
  (void)n;
  (void)id;
  (void)arg;
  assert_int_equal(status, SAGA_OK);
  W.state = st;
  W.ended = 1;
}

static void started(saga_node *n, int status, const char *id, int existed, void *arg) {
  (void)existed;
  (void)arg;
  W.start_status = status;
  if (status != SAGA_OK) return;
  snprintf(W.id, sizeof W.id, "%s", id);
  assert_int_equal(saga_node_watch(n, id, watched, NULL), SAGA_OK);
}

static int ended(void *arg) {
  (void)arg;
  return W.ended;
}

/* Runs a saga of def with the given "key=value" pairs (NULL-terminated) to its end; returns
 * the state and leaves the id in W.id. */
static saga_state run(const char *def, ...) {
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  va_list ap;
  va_start(ap, def);
  for (const char *k = va_arg(ap, const char *); k != NULL; k = va_arg(ap, const char *))
    assert_int_equal(saga_data_set_str(d, k, va_arg(ap, const char *)), SAGA_OK);
  va_end(ap);
  W.ended = 0;
  W.id[0] = '\0';
  assert_int_equal(saga_start(W.orch, def, d, NULL, started, NULL), SAGA_OK);
  saga_data_free(d);
  assert_int_equal(th_run_manual(&W.loop, W.clock, ended, NULL, 60000), 0);
  return W.state;
}

/* The holder of (type, id) in node n's database, "" when free. */
static const char *holder(saga_node *n, const char *type, const char *id) {
  static char buf[SAGA_LOCK_HOLDER_SIZE];
  int rc = saga_lock_holder(saga_node_db(n), type, id, buf, sizeof buf);
  if (rc == SAGA_ENOTFOUND) return "";
  assert_int_equal(rc, SAGA_OK);
  return buf;
}

/* The error recorded for saga id on the orchestrator. */
static char *last_error(const char *id) {
  saga_info *info = NULL;
  assert_int_equal(saga_get(W.orch, id, &info), SAGA_OK);
  char *e = strdup(info->error);
  saga_info_free(info);
  return e;
}

static int64_t count_rows(saga_node *n, const char *sql) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(n), sql, -1, &st, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  int64_t v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

/* A lock taken by a step is held after its saga completed on the participant (which never
 * learns of the end); another saga touching the record is refused with the holder named; a
 * saga whose last step releases its locks leaves the record free. */
static void test_acquire_refuse_release(void **state) {
  (void)state;
  assert_int_equal(run("hold", "order", "42", NULL), SAGA_COMPLETED);
  char a[40];
  snprintf(a, sizeof a, "%s", W.id);
  assert_string_equal(holder(W.part, "order", "42"), a);
  assert_string_equal(holder(W.orch, "order", "42"), ""); /* the participant's database */

  int runs = W.take_runs;
  assert_int_equal(run("hold", "order", "42", NULL), SAGA_COMPENSATED);
  assert_int_equal(W.take_runs, runs + 1);
  char *err = last_error(W.id);
  char want[160];
  snprintf(want, sizeof want, "order '42' is held by saga %s (step 0)", a);
  if (strstr(err, want) == NULL) fail_msg("refusal reason '%s' lacks '%s'", err, want);
  free(err);
  assert_string_equal(holder(W.part, "order", "42"), a); /* the refused saga took nothing */

  /* A saga whose last step releases: free afterwards (both of its locks). */
  assert_int_equal(run("hold", "order", "43", "ticket", "7", "release", "1", NULL), SAGA_COMPLETED);
  assert_int_equal(W.released, 2);
  assert_string_equal(holder(W.part, "order", "43"), "");
  assert_string_equal(holder(W.part, "ticket", "7"), "");
  assert_int_equal(count_rows(W.part, "SELECT count(*) FROM saga_lock"), 1); /* order 42 */
}

/* A handler that locks and then refuses or fails technically holds nothing: the lock row is
 * rolled back with its other writes. */
static void test_refused_handler_holds_nothing(void **state) {
  (void)state;
  W.take_fail_after = 1;
  assert_int_equal(run("hold", "order", "9", NULL), SAGA_COMPENSATED);
  assert_string_equal(holder(W.part, "order", "9"), "");
  W.take_fail_after = 2;
  assert_int_equal(run("hold", "order", "9", NULL), SAGA_COMPENSATED);
  assert_string_equal(holder(W.part, "order", "9"), "");
  W.take_fail_after = 0;
  assert_int_equal(run("hold", "order", "9", "release", "1", NULL), SAGA_COMPLETED);
  assert_int_equal(count_rows(W.part, "SELECT count(*) FROM saga_lock"), 0);
}

static int retried;
static void retry_done(saga_node *n, int status, void *arg) {
  (void)n;
  (void)arg;
  assert_int_equal(status, SAGA_OK);
  retried = 1;
}
static int was_retried(void *arg) {
  (void)arg;
  return retried;
}

/* Compensation releases the locks of the step it undoes, and only those: a compensation
 * that fails leaves the saga FAILED holding that step's locks (visible), and its repair
 * releases them. */
static void test_compensation_releases(void **state) {
  (void)state;
  assert_int_equal(run("hold", "order", "5", "ticket", "6", "refuse", "1", NULL), SAGA_COMPENSATED);
  assert_string_equal(holder(W.part, "order", "5"), "");
  assert_string_equal(holder(W.part, "ticket", "6"), "");

  W.untake_refuse = 1;
  assert_int_equal(run("hold", "order", "5", "ticket", "6", "refuse", "1", NULL), SAGA_FAILED);
  char f[40];
  snprintf(f, sizeof f, "%s", W.id);
  assert_string_equal(holder(W.part, "order", "5"), f);   /* TAKE's compensation failed */
  assert_string_equal(holder(W.part, "ticket", "6"), ""); /* TAKE2's succeeded */
  /* A FAILED saga's locks still refuse others. */
  W.untake_refuse = 0;
  assert_int_equal(run("hold", "order", "5", NULL), SAGA_COMPENSATED);
  assert_string_equal(holder(W.part, "order", "5"), f);
  /* The operator's repair runs the compensation again: released. */
  W.ended = 0;
  retried = 0;
  assert_int_equal(saga_retry_failed(W.orch, f, retry_done, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&W.loop, W.clock, was_retried, NULL, 60000), 0);
  assert_int_equal(saga_node_watch(W.orch, f, watched, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&W.loop, W.clock, ended, NULL, 60000), 0);
  assert_int_equal(W.state, SAGA_COMPENSATED);
  assert_string_equal(holder(W.part, "order", "5"), "");
}

/* On the orchestrator's node, a saga that ends COMPLETED or COMPENSATED releases the locks
 * it holds in that database (here taken by a local step). */
static void test_terminal_releases_on_orchestrator(void **state) {
  (void)state;
  assert_int_equal(run("local", "room", "101", NULL), SAGA_COMPLETED);
  assert_string_equal(holder(W.orch, "room", "101"), "");
  assert_int_equal(run("local", "room", "102", "refuse", "1", NULL), SAGA_COMPENSATED);
  assert_string_equal(holder(W.orch, "room", "102"), "");
  assert_int_equal(count_rows(W.orch, "SELECT count(*) FROM saga_lock"), 0);
}

/* A lock committed before a restart is held after it, and still refuses another saga. */
static void test_lock_survives_restart(void **state) {
  (void)state;
  assert_int_equal(run("hold", "order", "77", NULL), SAGA_COMPLETED);
  char a[40];
  snprintf(a, sizeof a, "%s", W.id);
  close_nodes();
  open_nodes();
  assert_string_equal(holder(W.part, "order", "77"), a);
  assert_int_equal(run("hold", "order", "77", NULL), SAGA_COMPENSATED);
  assert_string_equal(holder(W.part, "order", "77"), a);
}

/* The crash story: the lock row commits with the handler's writes, its inbox record and its
 * reply. The participant's process dies (a forked child, _exit()) after the handler wrote
 * everything but before the commit: after the restart nothing is held, the command comes
 * again and the saga ends holding the lock once. It dies right after the commit (before the
 * acknowledgement): the lock is held, the redelivered command is answered from the inbox. */
static void crash_at(const char *point, int held_after_crash) {
  close_nodes();
  fflush(stdout);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    uv_loop_init(&W.loop);
    W.crash_at = point;
    open_nodes();
    W.ended = 0;
    saga_data *d = NULL;
    saga_data_new(&d, NULL);
    saga_data_set_str(d, "order", "88");
    saga_start(W.orch, "hold", d, NULL, started, NULL);
    saga_data_free(d);
    th_run_manual(&W.loop, W.clock, ended, NULL, 60000);
    _exit(3); /* the point was never reached */
  }
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFEXITED(status));
  assert_int_equal(WEXITSTATUS(status), 0);
  open_nodes();
  char id[40];
  sqlite3_stmt *st = NULL;
  assert_int_equal(
      sqlite3_prepare_v2(saga_node_db(W.orch), "SELECT id FROM saga_instance", -1, &st, NULL),
      SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW); /* the start had committed */
  snprintf(id, sizeof id, "%s", (const char *)sqlite3_column_text(st, 0));
  sqlite3_finalize(st);
  assert_string_equal(holder(W.part, "order", "88"), held_after_crash ? id : "");
  assert_int_equal(count_rows(W.part, "SELECT count(*) FROM saga_inbox"), held_after_crash);
  int runs = W.take_runs;
  W.ended = 0;
  assert_int_equal(saga_node_watch(W.orch, id, watched, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&W.loop, W.clock, ended, NULL, 600000), 0);
  assert_int_equal(W.state, SAGA_COMPLETED);
  assert_int_equal(W.take_runs, runs + (held_after_crash ? 0 : 1)); /* once in all */
  assert_string_equal(holder(W.part, "order", "88"), id);
  assert_int_equal(count_rows(W.part, "SELECT count(*) FROM saga_lock"), 1);
}

static void test_crash_before_commit(void **state) {
  (void)state;
  crash_at("participant.after_inbox", 0);
}

static void test_crash_after_commit(void **state) {
  (void)state;
  crash_at("tx.after_commit", 1);
}

/* saga_lock_view names each lock, its saga and step, and the saga's state where this node
 * orchestrates it. */
static void test_view(void **state) {
  (void)state;
  assert_int_equal(run("hold", "order", "1", "ticket", "2", NULL), SAGA_COMPLETED);
  char a[40];
  snprintf(a, sizeof a, "%s", W.id);
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(W.part),
                                      "SELECT type, id, saga_id, step, acquired, saga_state "
                                      "FROM saga_lock_view ORDER BY type, id",
                                      -1, &st, NULL),
                   SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  assert_string_equal((const char *)sqlite3_column_text(st, 0), "order");
  assert_string_equal((const char *)sqlite3_column_text(st, 1), "1");
  assert_string_equal((const char *)sqlite3_column_text(st, 2), a);
  assert_int_equal(sqlite3_column_int(st, 3), 0);
  assert_true(strncmp((const char *)sqlite3_column_text(st, 4), "2023-11-14T22:", 14) == 0);
  assert_int_equal(sqlite3_column_type(st, 5), SQLITE_NULL); /* orchestrated elsewhere */
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  assert_string_equal((const char *)sqlite3_column_text(st, 0), "ticket");
  assert_int_equal(sqlite3_column_int(st, 3), 1);
  assert_int_equal(sqlite3_step(st), SQLITE_DONE);
  sqlite3_finalize(st);

  /* On a node that orchestrates the saga: its state. A FAILED local-step saga is the one
   * case that keeps an orchestrator-side lock; write such a row by hand to read the view. */
  char sql[256];
  snprintf(sql, sizeof sql, "INSERT INTO saga_lock VALUES('room', 'x', '%s', 0, 0)", a);
  assert_int_equal(sqlite3_exec(saga_node_db(W.orch), sql, NULL, NULL, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(W.orch),
                                      "SELECT saga_state, definition FROM saga_lock_view", -1, &st,
                                      NULL),
                   SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  assert_string_equal((const char *)sqlite3_column_text(st, 0), "COMPLETED");
  assert_string_equal((const char *)sqlite3_column_text(st, 1), "hold");
  sqlite3_finalize(st);
}

/* ---- bad arguments ---------------------------------------------------------------------- */

static int probe_codes[16];
static uint64_t probe_released;

static int probe(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)m;
  (void)r;
  (void)arg;
  char big[SAGA_LOCK_ID_MAX + 2];
  memset(big, 'i', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  char bigtype[SAGA_LOCK_TYPE_MAX + 2];
  memset(bigtype, 't', sizeof bigtype - 1);
  bigtype[sizeof bigtype - 1] = '\0';
  int k = 0;
  probe_codes[k++] = saga_lock_acquire(NULL, "order", "1");
  probe_codes[k++] = saga_lock_acquire(tx, NULL, "1");
  probe_codes[k++] = saga_lock_acquire(tx, "order", "");
  probe_codes[k++] = saga_lock_acquire(tx, "", "1");
  probe_codes[k++] = saga_lock_acquire(tx, "order", big);
  probe_codes[k++] = saga_lock_acquire(tx, bigtype, "1");
  big[SAGA_LOCK_ID_MAX] = '\0'; /* exactly at the limit: accepted */
  probe_codes[k++] = saga_lock_acquire(tx, "order", big);
  probe_codes[k++] = saga_lock_release(tx, "order", "never-taken");
  probe_codes[k++] = saga_lock_release(tx, "order", "held-by-other");
  probe_codes[k++] = saga_lock_release(tx, "order", big);
  probe_codes[k++] = saga_lock_release(NULL, "order", "1");
  probe_codes[k++] = saga_lock_release_all(NULL, NULL);
  probe_codes[k++] = saga_lock_acquire(tx, "order", "held-by-other");
  probe_codes[k++] = saga_lock_release_all(tx, &probe_released);
  return SAGA_OK;
}

static void test_bad_arguments(void **state) {
  (void)state;
  /* Outside any handler. */
  char buf[SAGA_LOCK_HOLDER_SIZE];
  sqlite3 *db = saga_node_db(W.part);
  assert_int_equal(saga_lock_holder(NULL, "order", "1", buf, sizeof buf), SAGA_EINVAL);
  assert_int_equal(saga_lock_holder(db, NULL, "1", buf, sizeof buf), SAGA_EINVAL);
  assert_int_equal(saga_lock_holder(db, "order", "", buf, sizeof buf), SAGA_EINVAL);
  assert_int_equal(saga_lock_holder(db, "order", "1", buf, SAGA_LOCK_HOLDER_SIZE - 1), SAGA_EINVAL);
  char big[SAGA_LOCK_ID_MAX + 2];
  memset(big, 'i', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  assert_int_equal(saga_lock_holder(db, "order", big, buf, sizeof buf), SAGA_ETOOBIG);
  assert_int_equal(saga_lock_holder(db, "order", "1", NULL, 0), SAGA_ENOTFOUND);
  /* A database without the table: a clear store error. */
  sqlite3 *plain = NULL;
  assert_int_equal(sqlite3_open(":memory:", &plain), SQLITE_OK);
  assert_int_equal(saga_lock_holder(plain, "order", "1", buf, sizeof buf), SAGA_ESTORE);
  assert_non_null(strstr(sqlite3_errmsg(plain), "no such table: saga_lock"));
  sqlite3_close(plain);

  /* Inside a handler: a record another saga holds, then the probe. */
  assert_int_equal(sqlite3_exec(db,
                                "INSERT INTO saga_lock VALUES('order', 'held-by-other', "
                                "'0123456789abcdef0123456789abcdef', 3, 0)",
                                NULL, NULL, NULL),
                   SQLITE_OK);
  close_nodes();
  assert_int_equal(saga_mem_hub_new(&W.hub, &W.loop, W.clock, NULL, NULL), SAGA_OK);
  W.orch = open_node("orch", 1);
  W.part = NULL;
  {
    saga_transport *t = NULL;
    assert_int_equal(saga_mem_transport_new(&t, W.hub), SAGA_OK);
    char *path = th_path(W.dir, "part.db");
    saga_node_config cfg;
    saga_node_config_init(&cfg);
    cfg.name = "part";
    cfg.db_path = path;
    cfg.transport = t;
    cfg.clock = W.clock;
    char err[256];
    assert_int_equal(saga_node_open(&W.part, &W.loop, &cfg, err, sizeof err), SAGA_OK);
    free(path);
    assert_int_equal(saga_node_handle(W.part, "part", "take", probe, NULL), SAGA_OK);
    for (int k = 0; k < 3; k++) {
      static const char *const names[] = {"take2", "check", "finish"};
      assert_int_equal(saga_node_handle(W.part, "part", names[k], nothing, NULL), SAGA_OK);
    }
    assert_int_equal(saga_node_start(W.part, NULL), SAGA_OK);
  }
  assert_int_equal(run("hold", NULL), SAGA_COMPLETED);
  static const int want[] = {SAGA_EINVAL,  SAGA_EINVAL, SAGA_EINVAL,    SAGA_EINVAL,  SAGA_ETOOBIG,
                             SAGA_ETOOBIG, SAGA_OK,     SAGA_ENOTFOUND, SAGA_ELOCKED, SAGA_OK,
                             SAGA_EINVAL,  SAGA_EINVAL, SAGA_ELOCKED,   SAGA_OK};
  for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
    if (probe_codes[k] != want[k])
      fail_msg("probe call %zu returned %s, expected %s", k, saga_err_name(probe_codes[k]),
               saga_err_name(want[k]));
  }
  assert_int_equal(probe_released, 0); /* the long id was released again by the probe */
  /* The other saga's lock is untouched. */
  assert_string_equal(holder(W.part, "order", "held-by-other"), "0123456789abcdef0123456789abcdef");
  assert_string_equal(saga_strerror(SAGA_ELOCKED), "record held by another saga (semantic lock)");
  assert_string_equal(saga_err_name(SAGA_ELOCKED), "ELOCKED");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_acquire_refuse_release, setup, teardown),
      cmocka_unit_test_setup_teardown(test_refused_handler_holds_nothing, setup, teardown),
      cmocka_unit_test_setup_teardown(test_compensation_releases, setup, teardown),
      cmocka_unit_test_setup_teardown(test_terminal_releases_on_orchestrator, setup, teardown),
      cmocka_unit_test_setup_teardown(test_lock_survives_restart, setup, teardown),
      cmocka_unit_test_setup_teardown(test_crash_before_commit, setup, teardown),
      cmocka_unit_test_setup_teardown(test_crash_after_commit, setup, teardown),
      cmocka_unit_test_setup_teardown(test_view, setup, teardown),
      cmocka_unit_test_setup_teardown(test_bad_arguments, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
