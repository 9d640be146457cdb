#include "harness.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Each block carries its size in front so realloc/free can keep `live` right. */
static int th_should_fail(th_alloc *t) {
  t->count++;
  if ((t->fail_at != 0 && t->count == t->fail_at) ||
      (t->fail_all_after && t->failed > 0)) {
    t->failed++;
    return 1;
  }
  return 0;
}

static void *th_malloc(size_t n, void *ud) {
  th_alloc *t = ud;
  if (th_should_fail(t)) return NULL;
  void *p = malloc(n);
  if (p != NULL) t->live++;
  return p;
}

static void *th_realloc(void *p, size_t n, void *ud) {
  th_alloc *t = ud;
  if (th_should_fail(t)) return NULL;
  void *q = realloc(p, n);
  if (q != NULL && p == NULL) t->live++;
  return q;
}

static void th_free(void *p, void *ud) {
  th_alloc *t = ud;
  if (p != NULL) t->live--;
  free(p);
}

void th_alloc_init(th_alloc *t) {
  memset(t, 0, sizeof *t);
  t->a.malloc = th_malloc;
  t->a.realloc = th_realloc;
  t->a.free = th_free;
  t->a.ud = t;
}

int th_run_manual(uv_loop_t *loop, saga_clock *clock, int (*pred)(void *), void *arg,
                  uint64_t max_ms) {
  uint64_t start = saga_clock_now(clock);
  for (;;) {
    while (uv_run(loop, UV_RUN_NOWAIT) != 0) {
      if (pred(arg)) return 0;
    }
    if (pred(arg)) return 0;
    uint64_t next;
    if (saga_clock_next_deadline(clock, &next) != SAGA_OK) return -1;
    if (next - start > max_ms && next > start) return -1;
    saga_clock_advance_to_next(clock);
  }
}

typedef struct {
  int (*pred)(void *);
  void *arg;
  int timed_out;
} th_real_ctx;

static void th_check_cb(uv_check_t *h) {
  th_real_ctx *c = h->data;
  if (c->pred(c->arg)) uv_stop(h->loop);
}

static void th_timeout_cb(uv_timer_t *h) {
  th_real_ctx *c = h->data;
  c->timed_out = 1;
  uv_stop(h->loop);
}

static void th_close_noop(uv_handle_t *h) { (void)h; }

int th_run_real(uv_loop_t *loop, int (*pred)(void *), void *arg, uint64_t timeout_ms) {
  th_real_ctx c = {pred, arg, 0};
  if (pred(arg)) return 0;
  uv_check_t check;
  uv_timer_t timer;
  uv_check_init(loop, &check);
  uv_timer_init(loop, &timer);
  check.data = timer.data = &c;
  uv_check_start(&check, th_check_cb);
  uv_timer_start(&timer, th_timeout_cb, timeout_ms, 0);
  while (!c.timed_out && !pred(arg)) uv_run(loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&check, th_close_noop);
  uv_close((uv_handle_t *)&timer, th_close_noop);
  uv_run(loop, UV_RUN_NOWAIT);
  return pred(arg) ? 0 : -1;
}

void th_drain(uv_loop_t *loop) {
  while (uv_run(loop, UV_RUN_NOWAIT) != 0) {
  }
}

uint64_t th_seed(uint64_t dflt) {
  const char *s = getenv("SAGA_SEED");
  uint64_t seed = (s != NULL && *s != '\0') ? strtoull(s, NULL, 0) : dflt;
  return seed;
}

/* ---- the test world --------------------------------------------------------------------- */

#include <sqlite3.h>

void th_world_defaults(th_world_opts *o) {
  memset(o, 0, sizeof *o);
  o->nsteps = 3;
  o->resend_ms = 200;
  o->version = 1;
}

static int th_fx_insert(saga_tx *tx, const saga_msg *m, const char *kind) {
  sqlite3 *db = saga_tx_db(tx);
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db, "INSERT INTO fx(saga_id, step, kind) VALUES(?1,?2,?3)", -1,
                              &st, NULL);
  if (rc == SQLITE_OK) {
    sqlite3_bind_text(st, 1, saga_msg_saga_id(m), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, 2, (int)saga_msg_step(m));
    sqlite3_bind_text(st, 3, kind, -1, SQLITE_STATIC);
    rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
  }
  sqlite3_finalize(st);
  return rc == SQLITE_OK ? SAGA_OK : SAGA_ESTORE;
}

static int th_do(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  th_world *w = arg;
  w->handler_calls++;
  int rc = th_fx_insert(tx, m, "do");
  if (rc != SAGA_OK) return rc;
  uint32_t s = saga_msg_step(m);
  char mode = s < TH_MAX_STEPS ? w->action_mode[s] : 'o';
  int64_t fail = -1;
  if (saga_data_get_i64(saga_msg_data(m), "fail", &fail) == SAGA_OK && fail == (int64_t)s)
    mode = 'r';
  if (mode == 'r') return saga_reply_fail(r, "refused by test");
  if (mode == 'e') return SAGA_EINVAL; /* a technical failure: dead-lettered, step fails */
  if (w->transient_left > 0) {
    w->transient_left--;
    return SAGA_EBUSY; /* transient: not recorded, not acknowledged, delivered again */
  }
  char key[16];
  snprintf(key, sizeof key, "s%u", s);
  return saga_reply_set_str(r, key, "done");
}

static int th_undo(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  th_world *w = arg;
  w->handler_calls++;
  int rc = th_fx_insert(tx, m, "undo");
  if (rc != SAGA_OK) return rc;
  uint32_t s = saga_msg_step(m);
  char mode = s < TH_MAX_STEPS ? w->comp_mode[s] : 'o';
  int64_t cfail = -1;
  /* Refuse the first attempt of this compensation: the retry must then succeed. */
  if (saga_data_get_i64(saga_msg_data(m), "cfail", &cfail) == SAGA_OK &&
      cfail == (int64_t)s && saga_msg_attempt(m) == 1)
    mode = 'r';
  if (mode == 'r') return saga_reply_fail(r, "compensation refused by test");
  if (mode == 'e') return SAGA_EINVAL;
  return SAGA_OK;
}

static void th_on_event(saga_node *node, const saga_event *ev, void *arg) {
  th_world *w = arg;
  if (w->nev < TH_MAX_EVENTS) {
    w->ev_type[w->nev] = ev->type;
    w->ev_step[w->nev] = ev->step;
    w->nev++;
  }
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED ||
      ev->type == SAGA_EV_SAGA_FAILED)
    w->terminal++;
}

static const char *const th_channels[TH_MAX_STEPS] = {"p0", "p1", "p2", "p3",
                                                      "p4", "p5", "p6", "p7"};

static int th_open_node(th_world *w, saga_node **out, const char *name, unsigned serve_mask,
                        int orchestrate) {
  saga_transport *t = NULL;
  int rc = saga_mem_transport_new(&t, w->hub);
  if (rc != SAGA_OK) return rc;
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
  cfg.alloc = w->o.alloc;
  cfg.vfs = w->o.vfs;
  if (w->o.checkpoint_pages != 0) {
    cfg.checkpoint = SAGA_CHECKPOINT_BACKGROUND;
    cfg.checkpoint_pages = w->o.checkpoint_pages;
  }
  cfg.resend_ms = w->o.resend_ms;
  if (w->o.batch_max != 0) cfg.batch_max = w->o.batch_max;
  cfg.on_event = orchestrate ? th_on_event : NULL;
  if (w->o.retention != NULL) {
    cfg.retention = *w->o.retention;
  } else {
    cfg.retention.finished_ms = 0;
    cfg.retention.inbox_ms = 0;
  }
  cfg.test_hook = w->o.hook;
  cfg.test_hook_arg = w->o.hook_arg;
  cfg.event_arg = w;
  char err[256];
  rc = saga_node_open(out, &w->loop, &cfg, err, sizeof err);
  free(path);
  if (rc != SAGA_OK) return rc;
  saga_node *n = *out;
  if (sqlite3_exec(saga_node_db(n),
                   "CREATE TABLE IF NOT EXISTS fx(id INTEGER PRIMARY KEY, saga_id TEXT, "
                   "step INT, kind TEXT)",
                   NULL, NULL, NULL) != SQLITE_OK)
    return SAGA_ESTORE;
  if (orchestrate && !w->o.no_register) {
    saga_step steps[TH_MAX_STEPS];
    memset(steps, 0, sizeof steps);
    static const char *const names[TH_MAX_STEPS] = {"S0", "S1", "S2", "S3",
                                                     "S4", "S5", "S6", "S7"};
    for (int i = 0; i < w->o.nsteps; i++) {
      steps[i].name = names[i];
      steps[i].channel = th_channels[i];
      steps[i].action = "do";
      steps[i].kind = w->o.kinds[i];
      steps[i].compensation = w->o.kinds[i] == SAGA_STEP_COMPENSATABLE ? "undo" : NULL;
      /* The tests' worlds wait forever unless a test sets a timeout. */
      steps[i].timeout_ms = w->o.timeout_ms[i] ? w->o.timeout_ms[i] : SAGA_STEP_NO_TIMEOUT;
      steps[i].retry = w->o.retry[i];
      steps[i].compensation_retry = w->o.comp_retry[i];
    }
    saga_definition def = {SAGA_DEFINITION_VERSION, "test", w->o.version, steps,
                           (size_t)w->o.nsteps, w->o.deadline_ms, sizeof(saga_step)};
    rc = saga_node_register(n, &def);
    if (rc != SAGA_OK) return rc;
  }
  for (int i = 0; i < w->o.nsteps; i++) {
    if (!(serve_mask & (1u << i))) continue;
    if ((rc = saga_node_handle(n, th_channels[i], "do", th_do, w)) != SAGA_OK) return rc;
    if ((rc = saga_node_handle(n, th_channels[i], "undo", th_undo, w)) != SAGA_OK) return rc;
  }
  return saga_node_start(n, NULL);
}

static int th_open_all(th_world *w) {
  int rc = saga_mem_hub_new(&w->hub, &w->loop, w->clock, &w->o.faults, NULL);
  if (rc != SAGA_OK) return rc;
  unsigned all = (1u << w->o.nsteps) - 1;
  rc = th_open_node(w, &w->orch, "orch", 0, 1);
  if (rc == SAGA_OK) rc = th_open_node(w, &w->part, "part", all & ~w->o.skip_mask, 0);
  return rc;
}

int th_world_open(th_world *w, const th_world_opts *o) {
  memset(w, 0, sizeof *w);
  if (o != NULL)
    w->o = *o;
  else
    th_world_defaults(&w->o);
  memset(w->action_mode, 'o', sizeof w->action_mode);
  memset(w->comp_mode, 'o', sizeof w->comp_mode);
  uv_loop_init(&w->loop);
  w->dir = w->o.dir != NULL ? strdup(w->o.dir) : th_tmpdir();
  int rc = saga_clock_manual_new(&w->clock, UINT64_C(1700000000000), NULL);
  if (rc != SAGA_OK) return rc;
  return th_open_all(w);
}

int th_world_open_late(th_world *w) {
  return th_open_node(w, &w->late, "late", w->o.skip_mask, 0);
}

void th_world_close_nodes(th_world *w) {
  saga_node_close(w->orch, NULL, NULL);
  saga_node_close(w->part, NULL, NULL);
  saga_node_close(w->late, NULL, NULL);
  w->orch = w->part = w->late = NULL;
  th_drain(&w->loop);
  if (w->hub != NULL) saga_mem_hub_close(w->hub);
  w->hub = NULL;
  th_drain(&w->loop);
}

int th_world_reopen(th_world *w) {
  th_world_close_nodes(w);
  return th_open_all(w);
}

void th_world_free(th_world *w) {
  th_world_close_nodes(w);
  saga_clock_free(w->clock);
  uv_loop_close(&w->loop);
  if (w->o.dir != NULL)
    free(w->dir);
  else
    th_rmdir(w->dir);
  w->dir = NULL;
}

static void th_started(saga_node *n, int status, const char *id, int existed, void *arg) {
  th_world *w = arg;
  w->last_start_status = status;
  if (status == SAGA_OK) {
    w->started_ok++;
    snprintf(w->last_id, sizeof w->last_id, "%s", id);
  }
}

int th_world_start(th_world *w, int i, const char *idem_key) {
  return th_world_start_ex(w, i, idem_key, -1, -1);
}

int th_world_start_ex(th_world *w, int i, const char *idem_key, int fail_step,
                      int comp_fail_step) {
  saga_data *d = NULL;
  int rc = saga_data_new(&d, NULL);
  if (rc != SAGA_OK) return rc;
  saga_data_set_i64(d, "n", i);
  if (fail_step >= 0) saga_data_set_i64(d, "fail", fail_step);
  if (comp_fail_step >= 0) saga_data_set_i64(d, "cfail", comp_fail_step);
  rc = saga_start(w->orch, "test", d, idem_key, th_started, w);
  saga_data_free(d);
  return rc;
}

typedef struct {
  th_world *w;
  uint64_t count;
} th_term_ctx;

static int th_term_pred(void *arg) {
  th_term_ctx *c = arg;
  return c->w->terminal >= c->count;
}

int th_world_run_until_terminal(th_world *w, uint64_t count) {
  th_term_ctx c = {w, count};
  return th_run_manual(&w->loop, w->clock, th_term_pred, &c, UINT64_C(3600000));
}

static int th_never(void *arg) { return 0; }

void th_world_settle(th_world *w, uint64_t max_ms) {
  th_run_manual(&w->loop, w->clock, th_never, NULL, max_ms);
}

static int th_count_db(saga_node *n, const char *saga_id, int step, const char *kind) {
  if (n == NULL) return 0;
  sqlite3_stmt *st = NULL;
  int v = 0;
  if (sqlite3_prepare_v2(saga_node_db(n),
                         "SELECT count(*) FROM fx WHERE (?1 IS NULL OR saga_id = ?1) AND "
                         "(?2 < 0 OR step = ?2) AND kind = ?3",
                         -1, &st, NULL) != SQLITE_OK)
    return -1;
  if (saga_id) sqlite3_bind_text(st, 1, saga_id, -1, SQLITE_STATIC);
  sqlite3_bind_int(st, 2, step);
  sqlite3_bind_text(st, 3, kind, -1, SQLITE_STATIC);
  if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  return v;
}

int th_fx_count(th_world *w, const char *saga_id, int step, const char *kind) {
  return th_count_db(w->part, saga_id, step, kind) + th_count_db(w->late, saga_id, step, kind);
}

int th_saga_state(th_world *w, const char *saga_id) {
  saga_info *info = NULL;
  if (saga_get(w->orch, saga_id, &info) != SAGA_OK) return -1;
  int s = info->state;
  saga_info_free(info);
  return s;
}

size_t th_count_events(th_world *w, int type, int step) {
  size_t c = 0;
  for (size_t i = 0; i < w->nev; i++)
    if (w->ev_type[i] == type && (step == -2 || w->ev_step[i] == step)) c++;
  return c;
}

/* Undo rows of one saga in the participant database must have strictly decreasing steps. */
static int th_undo_order_ok(saga_node *n, const char *id) {
  sqlite3_stmt *st = NULL;
  int ok = 1, prev = 1 << 30;
  if (n == NULL) return 1;
  sqlite3_prepare_v2(saga_node_db(n),
                     "SELECT step FROM fx WHERE saga_id = ?1 AND kind = 'undo' ORDER BY id", -1,
                     &st, NULL);
  sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
  while (sqlite3_step(st) == SQLITE_ROW) {
    int s = sqlite3_column_int(st, 0);
    if (s >= prev) ok = 0;
    prev = s;
  }
  sqlite3_finalize(st);
  return ok;
}

int th_check_invariants(th_world *w, int expect_all_terminal) {
  sqlite3_stmt *st = NULL;
  int bad = 0;
  sqlite3_prepare_v2(saga_node_db(w->orch), "SELECT id, state FROM saga_instance", -1, &st,
                     NULL);
  while (sqlite3_step(st) == SQLITE_ROW && bad < 5) {
    const char *id = (const char *)sqlite3_column_text(st, 0);
    int state = sqlite3_column_int(st, 1);
    if (state == SAGA_RUNNING || state == SAGA_COMPENSATING) {
      if (expect_all_terminal) {
        printf("saga %s not terminal: %s\n", id, saga_state_name(state));
        bad++;
      }
      continue;
    }
    for (int s = 0; s < w->o.nsteps; s++) {
      int d = th_fx_count(w, id, s, "do"), u = th_fx_count(w, id, s, "undo");
      int ok = d <= 1 && u <= 1;
      if (state == SAGA_COMPLETED) ok = ok && d == 1 && u == 0;
      if (state == SAGA_COMPENSATED) ok = ok && d == u;
      if (!ok) {
        printf("saga %s (%s) step %d: %d do, %d undo\n", id, saga_state_name(state), s, d, u);
        bad++;
      }
    }
    if (!th_undo_order_ok(w->part, id)) {
      printf("saga %s: compensations not in reverse order\n", id);
      bad++;
    }
  }
  sqlite3_finalize(st);
  return bad ? -1 : 0;
}
