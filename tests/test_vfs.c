/*
 * SQLite I/O errors (guarantee 6 of the README: a full or read-only disk gives a clear error code and
 * message, the saga state intact; and 4: nothing is lost).
 *
 * A shim VFS named "faulty" wraps the default VFS (the way SQLite's own test shims do: the
 * shim's sqlite3_file is followed in memory by the real VFS's file, and every method is
 * forwarded). Its xWrite and xSync can be armed to fail at the N-th call after arming, with
 * SQLITE_IOERR_WRITE / SQLITE_IOERR_FSYNC once, or with SQLITE_FULL from the N-th write on
 * (a disk that stays full) until disarmed. It can also open chosen database files read-only
 * (SQLITE_OPEN_READONLY) and refuse writes to them with SQLITE_READONLY.
 *
 * Both nodes of the world use the shim. For each N the fault is armed after the sagas
 * started; the world runs a while; a fault that fired must have been reported (a failed
 * commit or a failed start callback, and saga_node_errmsg() says what); then the fault is
 * disarmed and the world either keeps running or is closed and reopened on the same folder,
 * until every saga is terminal. Nothing may be lost: th_check_invariants() holds and the
 * sagas in the orchestrator's database are exactly those whose start callback said SAGA_OK.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include "harness.h"

/* ---- the shim VFS ------------------------------------------------------------------------- */

enum { F_WRITE = 1, F_SYNC = 2 };

static struct {
  sqlite3_vfs vfs;
  sqlite3_vfs *real;
  int registered;
  int what;             /* F_WRITE or F_SYNC; 0 = disarmed */
  uint64_t at;          /* fail the at-th call after arming (1-based) */
  int rc;               /* the SQLite code to fail with */
  int persist;          /* keep failing after the at-th call, until disarmed */
  uint64_t writes, syncs; /* calls since arming */
  uint64_t fired;       /* failures injected since arming */
  const char *ro_suffix; /* main databases whose path ends with this open read-only */
  uint64_t ro_refused;
} F;

typedef struct faulty_file {
  sqlite3_file base;
  sqlite3_file *real; /* follows this struct in the same allocation */
  int ro;
} faulty_file;

static sqlite3_io_methods faulty_io;

#define REAL(f) (((faulty_file *)(f))->real)

static int f_close(sqlite3_file *f) { return REAL(f)->pMethods->xClose(REAL(f)); }
static int f_read(sqlite3_file *f, void *buf, int n, sqlite3_int64 off) {
  return REAL(f)->pMethods->xRead(REAL(f), buf, n, off);
}

static int fault_now(int what, uint64_t count) {
  if (F.what != what) return 0;
  if (count == F.at || (F.persist && count > F.at)) {
    F.fired++;
    return 1;
  }
  return 0;
}

static int f_write(sqlite3_file *f, const void *buf, int n, sqlite3_int64 off) {
  if (((faulty_file *)f)->ro) {
    F.ro_refused++;
    return SQLITE_READONLY;
  }
  F.writes++;
  if (fault_now(F_WRITE, F.writes)) return F.rc;
  return REAL(f)->pMethods->xWrite(REAL(f), buf, n, off);
}
static int f_truncate(sqlite3_file *f, sqlite3_int64 size) {
  if (((faulty_file *)f)->ro) return SQLITE_READONLY;
  return REAL(f)->pMethods->xTruncate(REAL(f), size);
}
static int f_sync(sqlite3_file *f, int flags) {
  F.syncs++;
  if (fault_now(F_SYNC, F.syncs)) return F.rc;
  return REAL(f)->pMethods->xSync(REAL(f), flags);
}
static int f_file_size(sqlite3_file *f, sqlite3_int64 *size) {
  return REAL(f)->pMethods->xFileSize(REAL(f), size);
}
static int f_lock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xLock(REAL(f), l); }
static int f_unlock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xUnlock(REAL(f), l); }
static int f_check_reserved(sqlite3_file *f, int *out) {
  return REAL(f)->pMethods->xCheckReservedLock(REAL(f), out);
}
static int f_file_control(sqlite3_file *f, int op, void *arg) {
  return REAL(f)->pMethods->xFileControl(REAL(f), op, arg);
}
static int f_sector_size(sqlite3_file *f) { return REAL(f)->pMethods->xSectorSize(REAL(f)); }
static int f_device_chars(sqlite3_file *f) {
  return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f));
}
static int f_shm_map(sqlite3_file *f, int pg, int pgsz, int extend, void volatile **pp) {
  return REAL(f)->pMethods->xShmMap(REAL(f), pg, pgsz, extend, pp);
}
static int f_shm_lock(sqlite3_file *f, int off, int n, int flags) {
  return REAL(f)->pMethods->xShmLock(REAL(f), off, n, flags);
}
static void f_shm_barrier(sqlite3_file *f) { REAL(f)->pMethods->xShmBarrier(REAL(f)); }
static int f_shm_unmap(sqlite3_file *f, int del) {
  return REAL(f)->pMethods->xShmUnmap(REAL(f), del);
}
static int f_fetch(sqlite3_file *f, sqlite3_int64 off, int n, void **pp) {
  return REAL(f)->pMethods->xFetch(REAL(f), off, n, pp);
}
static int f_unfetch(sqlite3_file *f, sqlite3_int64 off, void *p) {
  return REAL(f)->pMethods->xUnfetch(REAL(f), off, p);
}

static int ends_with(const char *s, const char *suffix) {
  size_t a = strlen(s), b = strlen(suffix);
  return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int f_open(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *file, int flags,
                  int *out_flags) {
  faulty_file *f = (faulty_file *)file;
  f->real = (sqlite3_file *)&f[1];
  f->ro = 0;
  if (F.ro_suffix != NULL && name != NULL && (flags & SQLITE_OPEN_MAIN_DB) &&
      ends_with(name, F.ro_suffix)) {
    flags = (flags & ~(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)) | SQLITE_OPEN_READONLY;
    f->ro = 1;
  }
  int rc = F.real->xOpen(F.real, name, f->real, flags, out_flags);
  if (f->real->pMethods != NULL) {
    /* Offer exactly the methods the real file has (unix files: version 3). */
    faulty_io.iVersion = f->real->pMethods->iVersion < 3 ? f->real->pMethods->iVersion : 3;
    f->base.pMethods = &faulty_io;
  } else {
    f->base.pMethods = NULL; /* failed open: SQLite must not call xClose */
  }
  return rc;
}

static int v_delete(sqlite3_vfs *v, const char *name, int sync_dir) {
  return F.real->xDelete(F.real, name, sync_dir);
}
static int v_access(sqlite3_vfs *v, const char *name, int flags, int *out) {
  return F.real->xAccess(F.real, name, flags, out);
}
static int v_full_pathname(sqlite3_vfs *v, const char *name, int n, char *out) {
  return F.real->xFullPathname(F.real, name, n, out);
}
static void *v_dlopen(sqlite3_vfs *v, const char *name) { return F.real->xDlOpen(F.real, name); }
static void v_dlerror(sqlite3_vfs *v, int n, char *msg) { F.real->xDlError(F.real, n, msg); }
static void (*v_dlsym(sqlite3_vfs *v, void *h, const char *sym))(void) {
  return F.real->xDlSym(F.real, h, sym);
}
static void v_dlclose(sqlite3_vfs *v, void *h) { F.real->xDlClose(F.real, h); }
static int v_randomness(sqlite3_vfs *v, int n, char *out) {
  return F.real->xRandomness(F.real, n, out);
}
static int v_sleep(sqlite3_vfs *v, int us) { return F.real->xSleep(F.real, us); }
static int v_current_time(sqlite3_vfs *v, double *t) { return F.real->xCurrentTime(F.real, t); }
static int v_last_error(sqlite3_vfs *v, int n, char *msg) {
  return F.real->xGetLastError(F.real, n, msg);
}
static int v_current_time64(sqlite3_vfs *v, sqlite3_int64 *t) {
  return F.real->xCurrentTimeInt64(F.real, t);
}

static void faulty_register(void) {
  if (F.registered) return;
  F.real = sqlite3_vfs_find(NULL);
  assert_non_null(F.real);
  assert_true(F.real->iVersion >= 2);
  faulty_io = (sqlite3_io_methods){3,
                                   f_close,
                                   f_read,
                                   f_write,
                                   f_truncate,
                                   f_sync,
                                   f_file_size,
                                   f_lock,
                                   f_unlock,
                                   f_check_reserved,
                                   f_file_control,
                                   f_sector_size,
                                   f_device_chars,
                                   f_shm_map,
                                   f_shm_lock,
                                   f_shm_barrier,
                                   f_shm_unmap,
                                   f_fetch,
                                   f_unfetch};
  memset(&F.vfs, 0, sizeof F.vfs);
  F.vfs.iVersion = 2;
  F.vfs.szOsFile = (int)sizeof(faulty_file) + F.real->szOsFile;
  F.vfs.mxPathname = F.real->mxPathname;
  F.vfs.zName = "faulty";
  F.vfs.xOpen = f_open;
  F.vfs.xDelete = v_delete;
  F.vfs.xAccess = v_access;
  F.vfs.xFullPathname = v_full_pathname;
  F.vfs.xDlOpen = v_dlopen;
  F.vfs.xDlError = v_dlerror;
  F.vfs.xDlSym = v_dlsym;
  F.vfs.xDlClose = v_dlclose;
  F.vfs.xRandomness = v_randomness;
  F.vfs.xSleep = v_sleep;
  F.vfs.xCurrentTime = v_current_time;
  F.vfs.xGetLastError = v_last_error;
  F.vfs.xCurrentTimeInt64 = v_current_time64;
  assert_int_equal(sqlite3_vfs_register(&F.vfs, 0), SQLITE_OK);
  F.registered = 1;
}

static void arm(int what, uint64_t at, int rc, int persist) {
  F.writes = F.syncs = F.fired = 0;
  F.at = at;
  F.rc = rc;
  F.persist = persist;
  F.what = what;
}

static void disarm(void) { F.what = 0; }

static int setup(void **state) {
  faulty_register();
  return 0;
}

/* ---- starting sagas and counting them ----------------------------------------------------- */

typedef struct starts {
  int issued, answered, ok, failed;
  int last_error;
} starts;

static void start_cb(saga_node *n, int status, const char *id, int existed, void *arg) {
  starts *s = arg;
  s->answered++;
  if (status == SAGA_OK) {
    s->ok++;
  } else {
    s->failed++;
    s->last_error = status;
  }
}

static void start_sagas(th_world *w, starts *s, int count, int base) {
  for (int i = 0; i < count; i++) {
    saga_data *d = NULL;
    assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
    saga_data_set_i64(d, "n", base + i);
    if ((base + i) % 4 == 1) saga_data_set_i64(d, "fail", 2); /* compensates steps 1, 0 */
    int rc = saga_start(w->orch, "test", d, NULL, start_cb, s);
    saga_data_free(d);
    assert_int_equal(rc, SAGA_OK);
    s->issued++;
  }
}

static int64_t q_count(th_world *w, const char *sql) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(saga_node_db(w->orch), sql, -1, &st, NULL) != SQLITE_OK) return -1;
  int64_t v = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int64(st, 0) : -1;
  sqlite3_finalize(st);
  return v;
}

typedef struct {
  th_world *w;
  starts *s;
  uint64_t t0;
  int livelock;
} done_ctx;

/* A run takes milliseconds: a loop busy for 30 s of real time without letting the manual
 * clock advance is a livelock, reported instead of hanging the test. */
#define LIVELOCK_NS (UINT64_C(30) * 1000000000)

static int all_done(void *arg) {
  done_ctx *c = arg;
  if (uv_hrtime() - c->t0 > LIVELOCK_NS) return c->livelock = 1;
  return c->s->answered == c->s->issued &&
         q_count(c->w, "SELECT count(*) FROM saga_instance WHERE state IN (1, 2)") == 0;
}

static void run_to_end(th_world *w, starts *s) {
  done_ctx c = {w, s, uv_hrtime(), 0};
  int rc = th_run_manual(&w->loop, w->clock, all_done, &c, 600000);
  if (c.livelock) printf("livelock: the loop stayed busy for 30 s of real time\n");
  assert_false(c.livelock);
  if (rc != 0)
    printf("not finished: %d/%d starts answered, %lld sagas not terminal\n", s->answered,
           s->issued,
           (long long)q_count(w, "SELECT count(*) FROM saga_instance WHERE state IN (1, 2)"));
  assert_int_equal(rc, 0);
}

static void check_nothing_lost(th_world *w, const starts *s) {
  assert_int_equal(s->answered, s->issued);
  assert_int_equal(q_count(w, "SELECT count(*) FROM saga_instance"), s->ok);
  assert_int_equal(q_count(w, "SELECT count(*) FROM saga_instance WHERE state IN (1, 2)"), 0);
  assert_int_equal(th_check_invariants(w, 1), 0);
}

/* ---- the sweep ---------------------------------------------------------------------------- */

typedef struct kind {
  const char *name;
  int what, rc, persist;
  int expect; /* the saga code a failed start must report */
} kind;

static const kind kinds[] = {
    {"write IOERR", F_WRITE, SQLITE_IOERR_WRITE, 0, SAGA_EIO},
    {"fsync IOERR", F_SYNC, SQLITE_IOERR_FSYNC, 0, SAGA_EIO},
    {"disk full", F_WRITE, SQLITE_FULL, 1, SAGA_EFULL},
};

/* One run: the fault armed at call `at`; `reopen` closes and reopens the world on the same
 * folder after disarming. Returns 1 if the fault fired. */
static uint64_t calls_armed; /* writes or syncs seen while armed, in the last run */

static int one_run(const kind *k, uint64_t at, int reopen, int *reported_by_start) {
  char *dir = th_tmpdir();
  th_world_opts o;
  th_world_defaults(&o);
  o.vfs = "faulty";
  o.dir = dir;
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  starts s;
  memset(&s, 0, sizeof s);
  start_sagas(&w, &s, 4, 0);
  arm(k->what, at, k->rc, k->persist);
  start_sagas(&w, &s, 4, 4); /* some starts run into the fault */
  th_world_settle(&w, 3000);
  int fired = F.fired > 0;
  calls_armed = k->what == F_WRITE ? F.writes : F.syncs;
  disarm();

  saga_node_stats so, sp;
  saga_node_stats_get(w.orch, &so, sizeof so);
  saga_node_stats_get(w.part, &sp, sizeof sp);
  if (fired) {
    int by_commit = so.commit_failures + sp.commit_failures > 0;
    int by_start = s.failed > 0;
    if (!by_commit && !by_start) {
      printf("%s at %llu: fired %llu times but nothing was reported\n", k->name,
             (unsigned long long)at, (unsigned long long)F.fired);
      fail();
    }
    if (by_start) {
      *reported_by_start += 1;
      if (s.last_error != k->expect)
        printf("%s at %llu: start failed with %s\n", k->name, (unsigned long long)at,
               saga_err_name(s.last_error));
      assert_int_equal(s.last_error, k->expect);
      assert_true(saga_node_errmsg(w.orch)[0] != '\0');
    }
    /* The node that failed says why. */
    if (so.commit_failures > 0) assert_true(saga_node_errmsg(w.orch)[0] != '\0');
    if (sp.commit_failures > 0) assert_true(saga_node_errmsg(w.part)[0] != '\0');
    const char *msg = so.commit_failures > 0 ? saga_node_errmsg(w.orch) : saga_node_errmsg(w.part);
    if (at == 1 || at == 2) printf("  %-12s at %3llu: %s\n", k->name, (unsigned long long)at, msg);
    if (k->rc == SQLITE_FULL) assert_non_null(strstr(msg, "full"));
  }

  if (reopen) {
    th_world_free(&w); /* keeps dir: o.dir */
    assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  }
  start_sagas(&w, &s, 2, 8); /* the engine takes new work */
  run_to_end(&w, &s);
  check_nothing_lost(&w, &s);
  /* And durably so: after a restart the same holds. */
  th_world_free(&w);
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  th_world_settle(&w, 10000);
  check_nothing_lost(&w, &s);
  th_world_free(&w);
  th_rmdir(dir);
  return fired;
}

/* Calibrates with a run whose fault never fires (how many calls the armed phase makes),
 * then sweeps N over them: every third write (up to 60), every sync. Runs alternate between
 * continuing after the fault and reopening the world. */
static void sweep(const kind *k) {
  int fired = 0, runs = 0, by_start = 0;
  assert_int_equal(one_run(k, UINT64_MAX, 0, &by_start), 0);
  uint64_t total = calls_armed, step = k->what == F_WRITE ? 3 : 1;
  uint64_t last = total < 60 ? total : 60;
  printf("%s: %llu calls while armed in a fault-free run; sweeping N = 1..%llu step %llu\n",
         k->name, (unsigned long long)total, (unsigned long long)last,
         (unsigned long long)step);
  assert_true(total >= 8);
  for (uint64_t at = 1; at <= last; at += step) {
    fired += one_run(k, at, runs % 2, &by_start);
    runs++;
  }
  printf("%s: fault fired in %d of %d runs (%d reported through a start callback)\n", k->name,
         fired, runs, by_start);
  assert_int_equal(fired, runs);
}

static void test_write_ioerr(void **state) { sweep(&kinds[0]); }
static void test_fsync_ioerr(void **state) { sweep(&kinds[1]); }
static void test_disk_full(void **state) { sweep(&kinds[2]); }

/* Without any fault the shim changes nothing, and no error message is left behind. */
static void test_shim_transparent(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.vfs = "faulty";
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  starts s;
  memset(&s, 0, sizeof s);
  arm(F_WRITE, UINT64_MAX, SQLITE_IOERR_WRITE, 0); /* counts only */
  start_sagas(&w, &s, 8, 0);
  run_to_end(&w, &s);
  assert_int_equal(s.ok, 8);
  check_nothing_lost(&w, &s);
  saga_node_stats a, b;
  saga_node_stats_get(w.orch, &a, sizeof a);
  saga_node_stats_get(w.part, &b, sizeof b);
  printf("a fault-free run of 8 sagas: %llu writes, %llu syncs, %llu + %llu transactions\n",
         (unsigned long long)F.writes, (unsigned long long)F.syncs,
         (unsigned long long)a.transactions, (unsigned long long)b.transactions);
  assert_true(F.writes > 60 && F.syncs > 5);
  disarm();
  saga_node_stats st;
  saga_node_stats_get(w.orch, &st, sizeof st);
  assert_int_equal(st.commit_failures, 0);
  assert_string_equal(saga_node_errmsg(w.orch), "");
  assert_string_equal(saga_node_errmsg(w.part), "");
  th_world_free(&w);
}

/* ---- read-only storage -------------------------------------------------------------------- */

static void ro_cb(saga_node *n, int status, const char *id, int existed, void *arg) {
  *(int *)arg = status;
}

static int status_set(void *arg) { return *(int *)arg != 1; }

/* Opens the orchestrator of a world on read-only storage (the files already exist). Either
 * the open fails with a clear message, or the node opens and a start is refused with
 * SAGA_EREADONLY while the stored sagas stay readable. */
static void check_readonly_orch(th_world *w, const th_world_opts *o, const char *existing_id) {
  /* First through the harness (both nodes), to see the world's verdict... */
  int rc = th_world_open(w, o);
  if (rc != SAGA_OK) {
    printf("  read-only: world open failed with %s\n", saga_err_name(rc));
    assert_true(rc == SAGA_EREADONLY || rc == SAGA_EIO || rc == SAGA_ESTORE);
    th_world_free(w);
    /* ...then directly, for the message. */
    uv_loop_t loop;
    uv_loop_init(&loop);
    saga_mem_hub *hub = NULL;
    assert_int_equal(saga_mem_hub_new(&hub, &loop, NULL, NULL, NULL), SAGA_OK);
    saga_transport *t = NULL;
    assert_int_equal(saga_mem_transport_new(&t, hub), SAGA_OK);
    char *path = th_path(o->dir, "orch.db");
    saga_node_config cfg;
    saga_node_config_init(&cfg);
    cfg.name = "orch";
    cfg.db_path = path;
    cfg.transport = t;
    cfg.vfs = o->vfs;
    char err[256] = "";
    saga_node *n = NULL;
    rc = saga_node_open(&n, &loop, &cfg, err, sizeof err);
    printf("  read-only: saga_node_open: %s: %s\n", saga_err_name(rc), err);
    assert_int_not_equal(rc, SAGA_OK);
    assert_true(err[0] != '\0');
    assert_non_null(strstr(err, "orch.db"));
    assert_true(strstr(err, "readonly") != NULL || strstr(err, "read-only") != NULL ||
                strstr(err, "unable to open") != NULL);
    free(path);
    saga_mem_hub_close(hub);
    th_drain(&loop);
    uv_loop_close(&loop);
    return;
  }
  int status = 1;
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  assert_int_equal(saga_start(w->orch, "test", d, NULL, ro_cb, &status), SAGA_OK);
  saga_data_free(d);
  assert_int_equal(th_run_manual(&w->loop, w->clock, status_set, &status, 60000), 0);
  printf("  read-only: start callback %s; errmsg: %s\n", saga_err_name(status),
         saga_node_errmsg(w->orch));
  assert_int_equal(status, SAGA_EREADONLY);
  assert_true(strstr(saga_node_errmsg(w->orch), "readonly") != NULL ||
              strstr(saga_node_errmsg(w->orch), "read-only") != NULL);
  /* Stored state is intact and readable. */
  assert_int_equal(th_saga_state(w, existing_id), SAGA_COMPLETED);
  assert_int_equal(q_count(w, "SELECT count(*) FROM saga_instance"), 1);
  th_world_free(w);
}

static void make_world_with_one_saga(th_world_opts *o, char *dir, char *id) {
  th_world_defaults(o);
  o->vfs = "faulty";
  o->dir = dir;
  th_world w;
  assert_int_equal(th_world_open(&w, o), SAGA_OK);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  snprintf(id, 40, "%s", w.last_id);
  th_world_free(&w);
}

static void reopen_writable(th_world_opts *o, const char *id) {
  th_world w;
  assert_int_equal(th_world_open(&w, o), SAGA_OK);
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPLETED);
  assert_int_equal(th_world_start(&w, 2, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(q_count(&w, "SELECT count(*) FROM saga_instance"), 2);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  th_world_free(&w);
}

/* Read-only through the VFS: the orchestrator's database is opened with
 * SQLITE_OPEN_READONLY, and any write to it is refused with SQLITE_READONLY. */
static void test_readonly_vfs(void **state) {
  char *dir = th_tmpdir();
  th_world_opts o;
  char id[40];
  make_world_with_one_saga(&o, dir, id);
  F.ro_suffix = "/orch.db";
  F.ro_refused = 0;
  th_world w;
  check_readonly_orch(&w, &o, id);
  F.ro_suffix = NULL;
  /* Writable again: the node opens, the old saga is there, new ones run. */
  reopen_writable(&o, id);
  th_rmdir(dir);
}

/* Read-only through permissions. Root ignores file permissions (every open for writing
 * succeeds), so as root this case is skipped; the VFS case above covers it. */
static void test_readonly_chmod(void **state) {
  if (geteuid() == 0) {
    printf("  running as root: file permissions are not enforced; chmod case skipped "
           "(test_readonly_vfs covers read-only storage)\n");
    skip();
  }
  char *dir = th_tmpdir();
  th_world_opts o;
  char id[40];
  make_world_with_one_saga(&o, dir, id);
  char *db = th_path(dir, "orch.db");
  assert_int_equal(chmod(db, 0444), 0);
  assert_int_equal(chmod(dir, 0555), 0);
  th_world w;
  check_readonly_orch(&w, &o, id);
  assert_int_equal(chmod(dir, 0700), 0);
  assert_int_equal(chmod(db, 0644), 0);
  free(db);
  reopen_writable(&o, id);
  th_rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_shim_transparent),
      cmocka_unit_test(test_write_ioerr),
      cmocka_unit_test(test_fsync_ioerr),
      cmocka_unit_test(test_disk_full),
      cmocka_unit_test(test_readonly_vfs),
      cmocka_unit_test(test_readonly_chmod),
  };
  return cmocka_run_group_tests(tests, setup, NULL);
}
