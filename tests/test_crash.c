/*
 * Crash recovery (guarantee 4): kill the process at every named crash point of the node's
 * work, at several moments of a run, then restart on the same files and check that every
 * saga ends COMPLETED or COMPENSATED with each step's effect exactly once.
 *
 * The crash is real: a forked child opens the world with a test hook that _exit()s the N-th
 * time a given point is reached (no atexit handlers, no SQLite cleanup, the in-memory
 * network and every uncommitted write are lost). The parent then opens a world on the same
 * folder, without the hook, and runs it until every saga of the orchestrator database is
 * terminal.
 *
 * The child never runs cmocka asserts; it reports through its exit status:
 *   0  crashed at the requested point (the hook's _exit)
 *   3  the run finished without reaching the point N times
 *   4  opening the world failed, 5 the run got stuck, 6 a start failed
 * and through a log file (one "n id" line per saga whose start callback ran, written with
 * write(2) right away, so it survives the crash): a start reported to the caller is durable,
 * so each of those sagas must be found after the restart.
 *
 * No step has a timeout: a saga can only finish if recovery really resends what was lost
 * (a timeout would hide a lost message by retrying it). Compensation retries have a backoff
 * (a stored deadline), so a crash during a backoff checks that timers are re-armed.
 *
 * Tests: test_count_points (a full run without crash, counting each point's hits),
 * test_crash_each_point (every point, crash moments from the first hit to past the last),
 * test_crash_during_recovery (the restarted process crashes again), test_commit_failure
 * (one node's commit fails while the process lives on: what a whole-process crash cannot
 * show, since sender and receiver die together — acknowledging or publishing before the
 * commit). SAGA_CRASH_EXHAUSTIVE=1 crashes at every hit of every point (about 1100 runs).
 */
#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

#define NSAGAS 30
#define WAVE 10
#define LOG_NAME "started.log"

static const char *const points[] = {
    "tx.before_commit",        "tx.after_commit",         "tx.after_ack",
    "outbox.after_insert",     "relay.after_publish",     "participant.after_handler",
    "participant.after_inbox", "engine.after_transition",
};
#define NPOINTS (sizeof points / sizeof points[0])

/* ---- the workload ------------------------------------------------------------------------ */

/* Outcome plan of saga n (3 compensatable steps): fail_step / comp_fail_step, -1 = none.
 * A third complete; the rest fail at step 0, 1 or 2, some with a compensation that is
 * refused once (its retry, after a backoff, succeeds). */
static void plan(int n, int *fstep, int *cstep) {
  static const int f[6] = {-1, 0, 1, -1, 2, 2};
  static const int c[6] = {-1, -1, -1, 0, 1, 0};
  *fstep = f[n % 6];
  *cstep = c[n % 6];
}

static void world_opts(th_world_opts *o, const char *dir) {
  th_world_defaults(o);
  o->dir = dir;
  for (int s = 0; s < 3; s++) {
    o->retry[s].max_attempts = 1;
    o->retry[s].backoff_ms = 50;
  }
}

/* The crash hook: counts the hits of one point (or of every point, when counting). */
typedef struct crash_ctl {
  const char *point; /* NULL: count every point, never crash */
  uint64_t n;        /* crash at this hit */
  uint64_t hits;
  uint64_t counts[NPOINTS];
} crash_ctl;

static void crash_hook(void *arg, const char *point) {
  crash_ctl *c = arg;
  if (c->point == NULL) {
    for (size_t i = 0; i < NPOINTS; i++)
      if (strcmp(point, points[i]) == 0) c->counts[i]++;
    return;
  }
  if (strcmp(point, c->point) != 0) return;
  if (++c->hits == c->n) _exit(0);
}

typedef struct start_ctx {
  int log_fd; /* -1: no log */
  int n;
  int failed;
} start_ctx;

static start_ctx starts[NSAGAS];

static void on_started(saga_node *node, int status, const char *id, int existed, void *arg) {
  start_ctx *s = arg;
  (void)node;
  (void)existed;
  if (status != SAGA_OK) {
    s->failed = 1;
    return;
  }
  if (s->log_fd >= 0) {
    char line[80];
    int len = snprintf(line, sizeof line, "%d %s\n", s->n, id);
    if (write(s->log_fd, line, (size_t)len) != len) s->failed = 1;
  }
}

/* The input of saga n, as th_world_start_ex() builds it: keys "n", "fail", "cfail". */
static saga_data *make_input(int n) {
  int fstep, cstep;
  plan(n, &fstep, &cstep);
  saga_data *d = NULL;
  if (saga_data_new(&d, NULL) != SAGA_OK) return NULL;
  saga_data_set_i64(d, "n", n);
  if (fstep >= 0) saga_data_set_i64(d, "fail", fstep);
  if (cstep >= 0) saga_data_set_i64(d, "cfail", cstep);
  return d;
}

static int start_saga(th_world *w, int n, int log_fd) {
  saga_data *d = make_input(n);
  if (d == NULL) return SAGA_ENOMEM;
  starts[n].log_fd = log_fd;
  starts[n].n = n;
  starts[n].failed = 0;
  int rc = saga_start(w->orch, "test", d, NULL, on_started, &starts[n]);
  saga_data_free(d);
  return rc;
}

/* Starts NSAGAS sagas in waves, each wave while the previous one is still running.
 * Returns 0 when all finished, 5 stuck, 6 a start failed. */
static int run_workload(th_world *w, int log_fd) {
  static const uint64_t until[NSAGAS / WAVE] = {WAVE / 2, WAVE + WAVE / 2, NSAGAS};
  for (int wave = 0; wave < NSAGAS / WAVE; wave++) {
    for (int j = 0; j < WAVE; j++)
      if (start_saga(w, wave * WAVE + j, log_fd) != SAGA_OK) return 6;
    if (th_world_run_until_terminal(w, until[wave]) != 0) return 5;
    for (int j = 0; j < WAVE; j++)
      if (starts[wave * WAVE + j].failed) return 6;
  }
  return 0;
}

/* ---- checks on the recovered world ------------------------------------------------------- */

static int64_t db_count(th_world *w, const char *sql) {
  sqlite3_stmt *st = NULL;
  int64_t v = -1;
  if (sqlite3_prepare_v2(saga_node_db(w->orch), sql, -1, &st, NULL) != SQLITE_OK) return -1;
  if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

static int all_terminal(void *arg) {
  return db_count(arg, "SELECT count(*) FROM saga_instance WHERE state IN (1,2)") == 0;
}

/* Effects at the participant of sagas the orchestrator never committed: a message that
 * left for a transaction that did not commit. Returns their count (printing the first). */
static int orphan_effects(th_world *w) {
  sqlite3_stmt *st = NULL;
  int orphans = 0;
  if (sqlite3_prepare_v2(saga_node_db(w->part), "SELECT DISTINCT saga_id FROM fx", -1, &st, NULL) !=
      SQLITE_OK)
    return -1;
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *id = (const char *)sqlite3_column_text(st, 0);
    if (th_saga_state(w, id) < 0) {
      if (orphans++ == 0) printf("effects of unknown saga %s at the participant\n", id);
    }
  }
  sqlite3_finalize(st);
  return orphans;
}

/* Reads the child's start log into ids[n] ("" when not reported). */
static void read_log(const char *dir, char ids[NSAGAS][40]) {
  memset(ids, 0, NSAGAS * sizeof ids[0]);
  char *path = th_path(dir, LOG_NAME);
  FILE *f = fopen(path, "r");
  free(path);
  if (f == NULL) return;
  int n;
  char id[40];
  while (fscanf(f, "%d %39s", &n, id) == 2) {
    assert_true(n >= 0 && n < NSAGAS);
    assert_int_equal(ids[n][0], '\0'); /* reported once */
    snprintf(ids[n], sizeof ids[n], "%s", id);
  }
  fclose(f);
}

static th_world *new_world(void) {
  th_world *w = calloc(1, sizeof *w);
  assert_non_null(w);
  return w;
}

/* Restarts on dir, runs to the end and checks everything. `what` names the run in
 * failure messages. */
static void recover_and_check(const char *dir, const char *what) {
  char logged[NSAGAS][40];
  read_log(dir, logged);
  th_world_opts o;
  world_opts(&o, dir);
  th_world *w = new_world();
  assert_int_equal(th_world_open(w, &o), SAGA_OK);
  if (th_run_manual(&w->loop, w->clock, all_terminal, w, UINT64_C(3600000)) != 0) {
    print_error("%s: sagas still in flight after recovery\n", what);
    th_check_invariants(w, 1);
    fail();
  }
  th_world_settle(w, UINT64_C(600000));
  if (th_check_invariants(w, 1) != 0) {
    print_error("%s: invariants broken after recovery\n", what);
    fail();
  }
  if (orphan_effects(w) != 0) {
    print_error("%s: the participant applied commands of sagas that do not exist\n", what);
    fail();
  }
  /* Everything the nodes had to send went out and was confirmed. */
  int64_t od = saga_node_outbox_depth(w->orch), pd = saga_node_outbox_depth(w->part);
  if (od != 0 || pd != 0) {
    print_error("%s: outbox not drained after recovery: orch %lld, part %lld rows\n", what,
                (long long)od, (long long)pd);
    fail();
  }

  /* Each saga: the outcome its input asks for; each input started at most once; each
   * start reported to the child is there. */
  int seen[NSAGAS] = {0};
  sqlite3_stmt *st = NULL;
  assert_int_equal(
      sqlite3_prepare_v2(saga_node_db(w->orch), "SELECT id FROM saga_instance", -1, &st, NULL),
      SQLITE_OK);
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *id = (const char *)sqlite3_column_text(st, 0);
    saga_info *info = NULL;
    assert_int_equal(saga_get(w->orch, id, &info), SAGA_OK);
    int64_t n = -1;
    assert_int_equal(saga_data_get_i64(info->data, "n", &n), SAGA_OK);
    assert_true(n >= 0 && n < NSAGAS);
    seen[n]++;
    int fstep, cstep;
    plan((int)n, &fstep, &cstep);
    int want = fstep >= 0 ? SAGA_COMPENSATED : SAGA_COMPLETED;
    if ((int)info->state != want) {
      print_error("%s: saga %s (n=%d, fail=%d, cfail=%d) is %s, expected %s (%s)\n", what, id,
                  (int)n, fstep, cstep, saga_state_name(info->state), saga_state_name(want),
                  info->error);
      fail();
    }
    if (logged[n][0] != '\0' && strcmp(logged[n], id) != 0) {
      print_error("%s: input n=%d reported as saga %s, found as %s\n", what, (int)n, logged[n], id);
      fail();
    }
    saga_info_free(info);
  }
  sqlite3_finalize(st);
  for (int n = 0; n < NSAGAS; n++) {
    if (seen[n] > 1) {
      print_error("%s: input n=%d started %d times\n", what, n, seen[n]);
      fail();
    }
    if (logged[n][0] != '\0' && seen[n] == 0) {
      print_error("%s: saga %s (n=%d) was reported started but is not in the database\n", what,
                  logged[n], n);
      fail();
    }
  }
  th_world_free(w);
  free(w);
}

/* ---- the child --------------------------------------------------------------------------- */

/* Forks a child that runs `body(dir, ctl)` and returns its exit status (or 128+signal). */
static int run_child(const char *dir, crash_ctl *ctl, int (*body)(const char *, crash_ctl *)) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) _exit(body(dir, ctl));
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      print_error("waitpid: %s\n", strerror(errno));
      fail();
    }
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 255;
}

/* Child body: a fresh run of the workload with the hook. */
static int child_workload(const char *dir, crash_ctl *ctl) {
  char *path = th_path(dir, LOG_NAME);
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_TRUNC, 0600);
  free(path);
  if (fd < 0) return 4;
  th_world_opts o;
  world_opts(&o, dir);
  o.hook = crash_hook;
  o.hook_arg = ctl;
  th_world *w = calloc(1, sizeof *w);
  if (w == NULL || th_world_open(w, &o) != SAGA_OK) return 4;
  int rc = run_workload(w, fd);
  if (rc != 0) return rc;
  th_world_settle(w, UINT64_C(600000));
  return 3;
}

/* Child body: recovery of an earlier crash, itself crashing. */
static int child_recovery(const char *dir, crash_ctl *ctl) {
  th_world_opts o;
  world_opts(&o, dir);
  o.hook = crash_hook;
  o.hook_arg = ctl;
  th_world *w = calloc(1, sizeof *w);
  if (w == NULL || th_world_open(w, &o) != SAGA_OK) return 4;
  if (th_run_manual(&w->loop, w->clock, all_terminal, w, UINT64_C(3600000)) != 0) return 5;
  th_world_settle(w, UINT64_C(600000));
  return 3;
}

/* ---- the tests --------------------------------------------------------------------------- */

static uint64_t hit_counts[NPOINTS];

/* How often each point is reached in a whole run without a crash (and that such a run
 * passes the checks): the hit counts below are chosen from these. */
static void test_count_points(void **state) {
  (void)state;
  char *dir = th_tmpdir();
  crash_ctl ctl;
  memset(&ctl, 0, sizeof ctl);
  th_world_opts o;
  world_opts(&o, dir);
  o.hook = crash_hook;
  o.hook_arg = &ctl;
  th_world *w = new_world();
  assert_int_equal(th_world_open(w, &o), SAGA_OK);
  assert_int_equal(run_workload(w, -1), 0);
  th_world_settle(w, UINT64_C(600000));
  assert_int_equal(th_check_invariants(w, 1), 0);
  assert_int_equal(w->terminal, NSAGAS);
  th_world_free(w);
  free(w);
  th_rmdir(dir);
  for (size_t i = 0; i < NPOINTS; i++) {
    hit_counts[i] = ctl.counts[i];
    printf("crash point %-26s reached %4llu times in a full run\n", points[i],
           (unsigned long long)ctl.counts[i]);
    assert_true(ctl.counts[i] > 0);
  }
}

/* The hit counts to crash at for a point reached h times in a full run: every one when
 * there are few (the transaction points: one hit per group commit) or when the environment
 * sets SAGA_CRASH_EXHAUSTIVE=1 (about a thousand runs), else the first three and twelve
 * more spread evenly to the end; and a number past the end, a run that never crashes. */
static size_t crash_moments(uint64_t h, uint64_t *out, size_t cap) {
  size_t k = 0;
  const char *all = getenv("SAGA_CRASH_EXHAUSTIVE");
  if (h <= 48 || (all != NULL && *all != '\0' && *all != '0' && h < cap)) {
    for (uint64_t n = 1; n <= h; n++) out[k++] = n;
  } else {
    for (uint64_t n = 1; n <= 3; n++) out[k++] = n;
    for (uint64_t j = 1; j <= 12; j++) {
      uint64_t n = h * j / 12;
      if (n > out[k - 1]) out[k++] = n;
    }
  }
  out[k++] = h + h / 10 + 1;
  return k;
}

/* Crash at hit N of each point, restart, check. */
static void test_crash_each_point(void **state) {
  if (hit_counts[0] == 0) test_count_points(state);
  int runs = 0, crashed = 0;
  for (size_t p = 0; p < NPOINTS; p++) {
    uint64_t h = hit_counts[p], ns[1024];
    size_t nn = crash_moments(h, ns, sizeof ns / sizeof ns[0] - 1);
    for (size_t k = 0; k < nn; k++) {
      uint64_t n = ns[k];
      char *dir = th_tmpdir();
      crash_ctl ctl;
      memset(&ctl, 0, sizeof ctl);
      ctl.point = points[p];
      ctl.n = n;
      int status = run_child(dir, &ctl, child_workload);
      char what[128];
      snprintf(what, sizeof what, "crash at %s hit %llu of %llu", points[p], (unsigned long long)n,
               (unsigned long long)h);
      /* Early hits are reached in every run: the child must have died right there. Runs
       * are deterministic, so past the last hit it finishes normally; near the end either
       * is accepted, so that a change in how often a point is hit does not fail the test. */
      int ok = n <= h - h / 10 ? status == 0
                               : (n > h + h / 10 ? status == 3 : status == 0 || status == 3);
      if (!ok) {
        print_error("%s: child exited %d, expected %s\n", what, status,
                    n <= h ? "0 (crashed at the point)" : "3 (ran to the end)");
        fail();
      }
      crashed += status == 0;
      recover_and_check(dir, what);
      th_rmdir(dir);
      runs++;
    }
  }
  printf("%d runs (%d crashed at their point), each recovered and checked\n", runs, crashed);
}

/* A crash during recovery: the restarted process dies too, at another point; the third
 * start finishes everything. */
static void test_crash_during_recovery(void **state) {
  (void)state;
  static const struct {
    const char *first;
    uint64_t n1;
    const char *second;
    uint64_t n2;
  } cases[] = {
      {"tx.after_commit", 5, "relay.after_publish", 3},
      {"participant.after_inbox", 7, "tx.before_commit", 2},
      {"engine.after_transition", 20, "tx.after_ack", 4},
      {"outbox.after_insert", 30, "participant.after_handler", 1},
      {"relay.after_publish", 25, "engine.after_transition", 2},
      {"tx.after_ack", 12, "tx.after_commit", 1},
  };
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    char *dir = th_tmpdir();
    crash_ctl c1, c2;
    memset(&c1, 0, sizeof c1);
    memset(&c2, 0, sizeof c2);
    c1.point = cases[k].first;
    c1.n = cases[k].n1;
    c2.point = cases[k].second;
    c2.n = cases[k].n2;
    char what[160];
    snprintf(what, sizeof what, "crash at %s hit %llu, then in recovery at %s hit %llu", c1.point,
             (unsigned long long)c1.n, c2.point, (unsigned long long)c2.n);
    int s1 = run_child(dir, &c1, child_workload);
    if (s1 != 0) {
      print_error("%s: first child exited %d, expected a crash (0)\n", what, s1);
      fail();
    }
    int s2 = run_child(dir, &c2, child_recovery);
    if (s2 != 0 && s2 != 3) {
      print_error("%s: recovering child exited %d\n", what, s2);
      fail();
    }
    printf("%s: recovery %s\n", what, s2 == 0 ? "crashed too" : "finished (point not reached)");
    recover_and_check(dir, what);
    th_rmdir(dir);
  }
}

/* ---- a failed commit, the process surviving ------------------------------------------ */

/*
 * A whole-process crash cannot tell whether a node acknowledged a delivery before or after
 * its commit: the sender dies with it and forgets the acknowledgement. Here only one node's
 * transaction fails and everything else lives on: at the N-th "tx.before_commit" the hook
 * rolls back the transaction of the node that is committing, so its COMMIT fails (as on an
 * I/O error). That node must then act as if nothing of the transaction happened: no
 * delivery acknowledged (the sender keeps its outbox row and resends), no message published,
 * start callbacks told the error. Every saga whose start succeeded must still finish.
 */
typedef struct fail_ctl {
  th_world *w;
  uint64_t n, hits;
  int failed_orch, failed_part;
} fail_ctl;

static void fail_commit_hook(void *arg, const char *point) {
  fail_ctl *c = arg;
  if (strcmp(point, "tx.before_commit") != 0 || ++c->hits != c->n) return;
  saga_node *nodes[2] = {c->w->orch, c->w->part};
  for (int k = 0; k < 2; k++) {
    sqlite3 *db = nodes[k] != NULL ? saga_node_db(nodes[k]) : NULL;
    if (db != NULL && !sqlite3_get_autocommit(db)) {
      sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
      if (k == 0)
        c->failed_orch++;
      else
        c->failed_part++;
    }
  }
}

typedef struct fstart {
  int done, status;
  char id[40];
} fstart;

static void on_fstart(saga_node *node, int status, const char *id, int existed, void *arg) {
  fstart *f = arg;
  (void)node;
  (void)existed;
  f->done = 1;
  f->status = status;
  if (status == SAGA_OK) snprintf(f->id, sizeof f->id, "%s", id);
}

typedef struct fwait {
  th_world *w;
  fstart *f;
} fwait;

static int fstarts_done_and_terminal(void *arg) {
  fwait *c = arg;
  for (int n = 0; n < NSAGAS; n++)
    if (!c->f[n].done) return 0;
  return all_terminal(c->w);
}

static void test_commit_failure(void **state) {
  (void)state;
  int runs = 0, failed_starts = 0, orch_fails = 0, part_fails = 0;
  for (uint64_t n = 1; n <= 45; n++) {
    char *dir = th_tmpdir();
    th_world *w = new_world();
    fail_ctl ctl = {w, n, 0, 0, 0};
    th_world_opts o;
    world_opts(&o, dir);
    o.hook = fail_commit_hook;
    o.hook_arg = &ctl;
    assert_int_equal(th_world_open(w, &o), SAGA_OK);
    fstart f[NSAGAS];
    memset(f, 0, sizeof f);
    /* Three waves, as in the crash runs. */
    for (int wave = 0; wave < NSAGAS / WAVE; wave++) {
      for (int j = 0; j < WAVE; j++) {
        int i = wave * WAVE + j;
        saga_data *d = make_input(i);
        assert_non_null(d);
        assert_int_equal(saga_start(w->orch, "test", d, NULL, on_fstart, &f[i]), SAGA_OK);
        saga_data_free(d);
      }
      th_world_settle(w, 20);
    }
    fwait c = {w, f};
    char what[96];
    snprintf(what, sizeof what, "commit %llu failed", (unsigned long long)n);
    if (th_run_manual(&w->loop, w->clock, fstarts_done_and_terminal, &c, UINT64_C(3600000)) != 0) {
      print_error("%s (orchestrator %d, participant %d): sagas stuck in flight\n", what,
                  ctl.failed_orch, ctl.failed_part);
      th_check_invariants(w, 1);
      fail();
    }
    th_world_settle(w, UINT64_C(600000));
    if (th_check_invariants(w, 1) != 0) {
      print_error("%s: invariants broken\n", what);
      fail();
    }
    if (orphan_effects(w) != 0) {
      print_error("%s: the participant applied commands of sagas that do not exist\n", what);
      fail();
    }
    int64_t od = saga_node_outbox_depth(w->orch), pd = saga_node_outbox_depth(w->part);
    if (od != 0 || pd != 0) {
      print_error("%s: outbox not drained: orch %lld, part %lld rows\n", what, (long long)od,
                  (long long)pd);
      fail();
    }
    /* A start that failed left nothing; one that succeeded finished as planned. */
    for (int i = 0; i < NSAGAS; i++) {
      if (f[i].status != SAGA_OK) {
        failed_starts++;
        continue;
      }
      int fstep, cstep;
      plan(i, &fstep, &cstep);
      int want = fstep >= 0 ? SAGA_COMPENSATED : SAGA_COMPLETED;
      int got = th_saga_state(w, f[i].id);
      if (got != want) {
        print_error("%s: saga %s (n=%d) is %s, expected %s\n", what, f[i].id, i,
                    saga_state_name(got), saga_state_name(want));
        fail();
      }
    }
    int64_t in_db = db_count(w, "SELECT count(*) FROM saga_instance");
    int ok_starts = 0;
    for (int i = 0; i < NSAGAS; i++) ok_starts += f[i].status == SAGA_OK;
    if (in_db != ok_starts) {
      print_error("%s: %lld sagas in the database, %d starts reported successful\n", what,
                  (long long)in_db, ok_starts);
      fail();
    }
    orch_fails += ctl.failed_orch;
    part_fails += ctl.failed_part;
    runs++;
    th_world_free(w);
    free(w);
    th_rmdir(dir);
  }
  printf("%d runs with one failed commit (%d on the orchestrator, %d on the participant; "
         "%d starts refused), all finished\n",
         runs, orch_fails, part_fails, failed_starts);
  assert_true(orch_fails > 0 && part_fails > 0 && failed_starts > 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_count_points),
      cmocka_unit_test(test_crash_each_point),
      cmocka_unit_test(test_crash_during_recovery),
      cmocka_unit_test(test_commit_failure),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
