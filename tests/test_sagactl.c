/*
 * sagactl, the operator's tool, run as a subprocess against live nodes (docs/sagactl.md).
 *
 * An orchestrator and a participant share an in-memory hub on one loop, in real time; each
 * call of sagactl is spawned on that loop (uv_spawn, stdout and stderr captured), so the
 * nodes keep running while the tool reads their databases and while it waits for its
 * requests to be carried out. A raw endpoint on the hub ("tester") sends commands the
 * participant cannot handle, which become its dead letters.
 *
 * Covered: every read command (list with each filter and --json, show with its timeline
 * and data keys, outbox, dead-letters list/show, requests, definitions, graph), retry of a
 * FAILED saga and cancel of a RUNNING one applied by the node, the bulk filter's dry run
 * (nothing written) and --yes (one request per match), a dead letter replayed once its
 * handler is registered and one purged, a retry written while the node is closed and
 * applied at its next start, and bad input (missing file, not a database, an SQLite file
 * that is not libsaga's, an old schema, bad state names and durations, unknown ids). The
 * graph of a definition with compensatable, local, pivot and retriable steps is compared
 * byte for byte with tests/golden/.
 */
#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "harness.h"
#include "internal.h" /* saga__transport_host: the tester's raw endpoint on the hub */

#ifndef SAGACTL
#error "SAGACTL must name the sagactl binary"
#endif
#ifndef SAGA_SOURCE_DIR
#error "SAGA_SOURCE_DIR must name the source tree"
#endif

/* ---- running sagactl on the loop ------------------------------------------------------ */

typedef struct out_buf {
  char *p;
  size_t len, cap;
} out_buf;

typedef struct ctl_run {
  uv_process_t proc;
  uv_pipe_t out, err;
  out_buf o, e;
  int exited, out_closed, err_closed, handles_closed;
  int64_t status;
} ctl_run;

static void buf_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
  out_buf *ob = h->data;
  if (ob->cap - ob->len < 65536) {
    ob->cap = ob->cap * 2 + 65536;
    ob->p = realloc(ob->p, ob->cap + 1);
    assert_non_null(ob->p);
    ob->p[ob->len] = '\0';
  }
  *b = uv_buf_init(ob->p + ob->len, (unsigned)(ob->cap - ob->len));
}

static ctl_run *g_run; /* the sagactl process running now */

static void on_closed(uv_handle_t *h) {}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  out_buf *ob = s->data;
  ctl_run *r = g_run;
  if (n > 0) {
    ob->len += (size_t)n;
    ob->p[ob->len] = '\0';
  } else if (n < 0) {
    uv_read_stop(s);
    if (s == (uv_stream_t *)&r->out)
      r->out_closed = 1;
    else
      r->err_closed = 1;
  }
}

static void on_exit_cb(uv_process_t *p, int64_t status, int sig) {
  ctl_run *r = g_run;
  r->status = sig != 0 ? 128 + sig : status;
  r->exited = 1;
}

static int ctl_done(void *arg) {
  ctl_run *r = arg;
  return r->exited && r->out_closed && r->err_closed;
}

static uv_loop_t *g_loop;

/* Runs sagactl with args (NULL-terminated) on g_loop, which keeps running the nodes. */
static int ctl_argv(ctl_run *r, const char *const *args) {
  memset(r, 0, sizeof *r);
  const char *argv[32];
  int n = 0;
  argv[n++] = SAGACTL;
  for (; args[n - 1] != NULL && n < 31; n++) argv[n] = args[n - 1];
  argv[n] = NULL;
  g_run = r;
  uv_pipe_init(g_loop, &r->out, 0);
  uv_pipe_init(g_loop, &r->err, 0);
  r->out.data = &r->o;
  r->err.data = &r->e;
  uv_stdio_container_t stdio[3];
  stdio[0].flags = UV_IGNORE;
  stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[1].data.stream = (uv_stream_t *)&r->out;
  stdio[2].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[2].data.stream = (uv_stream_t *)&r->err;
  uv_process_options_t po;
  memset(&po, 0, sizeof po);
  po.file = SAGACTL;
  po.args = (char **)argv;
  po.exit_cb = on_exit_cb;
  po.stdio = stdio;
  po.stdio_count = 3;
  int rc = uv_spawn(g_loop, &r->proc, &po);
  assert_int_equal(rc, 0);
  uv_read_start((uv_stream_t *)&r->out, buf_alloc, on_read);
  uv_read_start((uv_stream_t *)&r->err, buf_alloc, on_read);
  /* A safety net only: sagactl ends by itself (its --wait has its own limit). */
  assert_int_equal(th_run_real(g_loop, ctl_done, r, 120000), 0);
  uv_close((uv_handle_t *)&r->proc, on_closed);
  uv_close((uv_handle_t *)&r->out, on_closed);
  uv_close((uv_handle_t *)&r->err, on_closed);
  uv_run(g_loop, UV_RUN_NOWAIT);
  if (r->o.p == NULL) r->o.p = calloc(1, 1);
  if (r->e.p == NULL) r->e.p = calloc(1, 1);
  if (getenv("SAGACTL_TRACE") != NULL) { /* every call and its output, for debugging */
    printf("$ sagactl");
    for (int i = 1; argv[i] != NULL; i++) printf(" %s", argv[i]);
    printf("   [exit %d]\n%s%s\n", (int)r->status, r->o.p, r->e.p);
  }
  /* sagactl itself must be clean: under ASan, a report fails the test. */
  assert_null(strstr(r->e.p, "Sanitizer"));
  assert_null(strstr(r->e.p, "runtime error:"));
  /* Every error message starts with "sagactl: ". */
  if (r->e.len > 0 && r->status != 0) assert_memory_equal(r->e.p, "sagactl: ", 9);
  return (int)r->status;
}

#define CTL(r, ...) ctl_argv((r), (const char *const[]){__VA_ARGS__, NULL})

static void ctl_free(ctl_run *r) {
  free(r->o.p);
  free(r->e.p);
  memset(r, 0, sizeof *r);
}

static void expect_out(const ctl_run *r, const char *needle) {
  if (strstr(r->o.p, needle) == NULL) {
    printf("expected '%s' in stdout:\n%s\nstderr:\n%s\n", needle, r->o.p, r->e.p);
    fail();
  }
}
static void expect_err(const ctl_run *r, const char *needle) {
  if (strstr(r->e.p, needle) == NULL) {
    printf("expected '%s' in stderr:\n%s\n", needle, r->e.p);
    fail();
  }
}

static json_t *parse_json(const ctl_run *r) {
  json_error_t je;
  json_t *j = json_loads(r->o.p, 0, &je);
  if (j == NULL) {
    printf("not JSON (%s at %d): %s\n", je.text, je.line, r->o.p);
    fail();
  }
  return j;
}

/* ---- reading the databases directly (the test's own eyes) ---------------------------- */

static int64_t db_int(const char *path, const char *sql, const char *arg) {
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  int64_t v = -1;
  assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
  sqlite3_busy_timeout(db, 5000);
  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
  if (arg != NULL) sqlite3_bind_text(st, 1, arg, -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return v;
}

/* ---- the world ------------------------------------------------------------------------- */

typedef struct world {
  uv_loop_t loop;
  saga_mem_hub *hub;
  char *dir, *orch_path, *part_path;
  saga_node *orch, *part;
  int release_broken;   /* acct.release refuses while set */
  int audit_registered; /* the participant serves acct.audit */
  int audits;           /* acct.audit handled */
  int closed;
  char started[16][40];
  int nstarted;
} world;

static world W;

/* acct.hold: locks ("account", data "lock") when the data has it (sagactl locks). */
static int h_hold(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  const char *lock = saga_data_get_str(saga_msg_data(cmd), "lock");
  return lock != NULL ? saga_lock_acquire(tx, "account", lock) : SAGA_OK;
}
static int h_confirm(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  if (saga_data_get_str(saga_msg_data(cmd), "fail") != NULL)
    return saga_reply_fail(reply, "confirmation refused: card\x1b[31m declined\nretry later");
  return SAGA_OK;
}
static int h_release(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  world *w = arg;
  if (w->release_broken) return saga_reply_fail(reply, "ledger offline");
  return SAGA_OK;
}
static int h_audit(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  world *w = arg;
  w->audits++;
  return SAGA_OK;
}
static int h_local(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  return SAGA_OK;
}

/* "pay": hold and confirm on acct (the confirmation refused when the input has "fail"),
 * then a step on "slow", which nobody serves and which waits forever: a saga stays RUNNING
 * there until it is cancelled. Compensations are tried once, so a broken release leaves the
 * saga FAILED. */
static const saga_step pay_steps[] = {
    {.name = "hold", .channel = "acct", .action = "acct.hold", .compensation = "acct.release",
     .timeout_ms = SAGA_STEP_NO_TIMEOUT, .compensation_retry = {.max_attempts = 1}},
    {.name = "confirm", .channel = "acct", .action = "acct.confirm",
     .compensation = "acct.release", .timeout_ms = SAGA_STEP_NO_TIMEOUT,
     .compensation_retry = {.max_attempts = 1}},
    {.name = "wait", .channel = "slow", .action = "slow.do", .timeout_ms = SAGA_STEP_NO_TIMEOUT},
};

/* "shop", for the graph: compensatable, local, pivot and retriable steps, a deadline. */
static saga_step shop_steps[] = {
    {.name = "reserve", .channel = "stock", .action = "stock.reserve",
     .compensation = "stock.release", .retry = {3, 100, 2.0, 5000, 0, 0}, .timeout_ms = 2000,
     .compensation_retry = {SAGA_RETRY_FOREVER, 500, 2.0, 60000, 0, 0}},
    {.name = "note \"gift\"", .local_action = h_local, .local_compensation = h_local,
     .timeout_ms = SAGA_STEP_NO_TIMEOUT},
    {.name = "charge", .channel = "pay", .action = "pay.charge", .kind = SAGA_STEP_PIVOT,
     .retry = {2, 250, 1.5, 1000, 0.2, 1}, .timeout_ms = 90000},
    {.name = "ship", .channel = "ship", .action = "ship.send", .kind = SAGA_STEP_RETRIABLE,
     .retry = {SAGA_RETRY_FOREVER, 1000, 2.0, 60000, 0, 0}},
};

static void open_orch(world *w) {
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w->hub), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = "orch";
  cfg.db_path = w->orch_path;
  cfg.transport = t;
  cfg.resend_ms = 200;
  char err[256];
  assert_int_equal(saga_node_open(&w->orch, &w->loop, &cfg, err, sizeof err), SAGA_OK);
  saga_definition pay = {SAGA_DEFINITION_VERSION, "pay", 1, pay_steps, 3, 0, sizeof(saga_step)};
  saga_definition shop = {SAGA_DEFINITION_VERSION, "shop", 2, shop_steps, 4, 30000,
                          sizeof(saga_step)};
  assert_int_equal(saga_node_register(w->orch, &pay), SAGA_OK);
  assert_int_equal(saga_node_register(w->orch, &shop), SAGA_OK);
  assert_int_equal(saga_node_start(w->orch, NULL), SAGA_OK);
}

static void open_part(world *w) {
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w->hub), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = "part";
  cfg.db_path = w->part_path;
  cfg.transport = t;
  cfg.resend_ms = 200;
  char err[256];
  assert_int_equal(saga_node_open(&w->part, &w->loop, &cfg, err, sizeof err), SAGA_OK);
  assert_int_equal(saga_node_handle(w->part, "acct", "acct.hold", h_hold, w), SAGA_OK);
  assert_int_equal(saga_node_handle(w->part, "acct", "acct.confirm", h_confirm, w), SAGA_OK);
  assert_int_equal(saga_node_handle(w->part, "acct", "acct.release", h_release, w), SAGA_OK);
  if (w->audit_registered)
    assert_int_equal(saga_node_handle(w->part, "acct", "acct.audit", h_audit, w), SAGA_OK);
  assert_int_equal(saga_node_start(w->part, NULL), SAGA_OK);
}

static void on_node_closed(void *arg) { ((world *)arg)->closed++; }
static int closed_pred(void *arg) { return ((world *)arg)->closed > 0; }

static void close_node(world *w, saga_node **n) {
  w->closed = 0;
  saga_node_close(*n, on_node_closed, w);
  *n = NULL;
  assert_int_equal(th_run_real(&w->loop, closed_pred, w, 10000), 0);
}

static void on_started(saga_node *n, int status, const char *id, int existed, void *arg) {
  world *w = arg;
  assert_int_equal(status, SAGA_OK);
  snprintf(w->started[w->nstarted++], sizeof w->started[0], "%s", id);
}
static int started_pred(void *arg) {
  int *want = arg;
  return W.nstarted >= *want;
}

#define TRACE_R1 "4bf92f3577b34da6a3ce929d0e0e4736"

/* Starts a "pay" saga and returns its id (in W.started). */
static const char *start_pay(world *w, const char *key, int fail) {
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  saga_data_set_str(d, "secret", "s3cr3t-value");
  saga_data_set_i64(d, "n", 42);
  if (fail) saga_data_set_str(d, "fail", "yes");
  int want = w->nstarted + 1;
  /* "r1" with a caller's trace context: show gives its trace id, the others their own id */
  const char *tp = strcmp(key, "r1") == 0 ? "00-" TRACE_R1 "-00f067aa0ba902b7-01" : NULL;
  assert_int_equal(saga_start_traced(w->orch, "pay", d, key, tp, on_started, w), SAGA_OK);
  saga_data_free(d);
  assert_int_equal(th_run_real(&w->loop, started_pred, &want, 10000), 0);
  return w->started[w->nstarted - 1];
}

typedef struct state_wait {
  const char *id;
  int state;
} state_wait;
static int state_pred(void *arg) {
  state_wait *s = arg;
  return db_int(W.orch_path, "SELECT state FROM saga_instance WHERE id = ?1", s->id) == s->state;
}
static void wait_state(const char *id, int state) {
  state_wait s = {id, state};
  if (th_run_real(&W.loop, state_pred, &s, 20000) != 0) {
    printf("saga %s: state %lld, expected %d\n", id,
           (long long)db_int(W.orch_path, "SELECT state FROM saga_instance WHERE id = ?1", id),
           state);
    fail();
  }
}
/* RUNNING at step 2 (waiting on "slow"). */
static int at_wait_pred(void *arg) {
  return db_int(W.orch_path, "SELECT step FROM saga_instance WHERE id = ?1 AND state = 1",
                (const char *)arg) == 2;
}

/* ---- the tester: a raw endpoint on the hub -------------------------------------------- */

typedef struct tester {
  saga_transport *t;
  saga__transport_host host;
  uint64_t token;
  int replies, closed;
} tester;
static tester T;

static int t_deliver(void *ctx, const char *channel, const void *data, size_t len, uint64_t tag) {
  tester *t = ctx;
  t->replies++;
  t->t->methods->ack(t->t, tag);
  return SAGA_OK;
}
static void t_sent(void *ctx, uint64_t token, int status) {}
static void t_closed(void *ctx) { ((tester *)ctx)->closed = 1; }
static void t_log(void *ctx, saga_log_level level, const char *msg) {}

static void tester_open(void) {
  memset(&T, 0, sizeof T);
  assert_int_equal(saga_mem_transport_new(&T.t, W.hub), SAGA_OK);
  T.host.deliver = t_deliver;
  T.host.sent = t_sent;
  T.host.closed = t_closed;
  T.host.log = t_log;
  T.host.ctx = &T;
  T.t->saga__host = &T.host;
  assert_int_equal(T.t->methods->open(T.t, &W.loop), SAGA_OK);
  assert_int_equal(T.t->methods->subscribe(T.t, "tester"), SAGA_OK);
}
static void tester_close(void) {
  T.t->methods->close(T.t);
  T.t->methods->destroy(T.t);
  T.t = NULL;
}
static void tester_send(const char *channel, const void *data, size_t len) {
  assert_int_equal(T.t->methods->send(T.t, channel, data, len, ++T.token), SAGA_OK);
}

/* A command for acct.audit, which the participant has no handler for at first. Its header
 * carries control characters that must never reach a terminal raw. Free with saga_free. */
static void encode_audit(const char *msg_id, const char *saga_id, void **buf, size_t *len) {
  saga_header hdr[2] = {{"traceparent", "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"},
                        {"note", "line1\nline2\x1b[31mred"}};
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  saga_data_set_str(d, "amount", "1200");
  saga__buf payload;
  saga__buf_init(&payload, NULL);
  assert_int_equal(saga__data_encode(d, &payload), SAGA_OK);
  saga_data_free(d);
  saga_envelope e;
  memset(&e, 0, sizeof e);
  e.version = SAGA_ENVELOPE_VERSION;
  e.kind = SAGA_MSG_COMMAND;
  e.msg_id = msg_id;
  e.saga_id = saga_id;
  e.step = 0;
  e.attempt = 1;
  e.name = "acct.audit";
  e.reply_to = "tester";
  e.headers = hdr;
  e.nheaders = 2;
  e.payload = payload.data;
  e.payload_len = payload.len;
  assert_int_equal(saga_envelope_encode(&e, NULL, buf, len), SAGA_OK);
  saga__buf_free(&payload);
}

/* Delivered to a participant without the handler: it answers the sender with the failure
 * and keeps the command as a dead letter (answered: replaying it would change nothing). */
static void send_audit(void) {
  void *buf = NULL;
  size_t len = 0;
  encode_audit("audit-1", "0123456789abcdef0123456789abcdef", &buf, &len);
  tester_send("acct", buf, len);
  saga_free(NULL, buf);
}

/* A command a transport gave up delivering (a broker's delivery cap: it acknowledged it and
 * kept it as a dead letter), never handled. With the in-memory hub that cannot happen, so
 * the test writes the row as such a transport would, with the participant closed. */
static int64_t dead_letter_undelivered(void) {
  void *buf = NULL;
  size_t len = 0;
  encode_audit("audit-2", "fedcba9876543210fedcba9876543210", &buf, &len);
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_open_v2(W.part_path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_prepare_v2(db, "INSERT INTO saga_dead_letter(at_ms, channel, msg_id, "
                                          "reason, body) VALUES (?1, 'acct', 'audit-2', "
                                          "'delivered 10 times without an acknowledgement', ?2)",
                                      -1, &st, NULL),
                   SQLITE_OK);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)time(NULL) * 1000);
  sqlite3_bind_blob(st, 2, buf, (int)len, SQLITE_TRANSIENT);
  assert_int_equal(sqlite3_step(st), SQLITE_DONE);
  int64_t id = sqlite3_last_insert_rowid(db);
  sqlite3_finalize(st);
  sqlite3_close(db);
  saga_free(NULL, buf);
  return id;
}

static int dead_pred(void *arg) {
  return db_int(W.part_path, "SELECT count(*) FROM saga_dead_letter", NULL) >= *(int *)arg;
}

static void world_open(void) {
  memset(&W, 0, sizeof W);
  uv_loop_init(&W.loop);
  g_loop = &W.loop;
  W.dir = th_tmpdir();
  W.orch_path = th_path(W.dir, "orch.db");
  W.part_path = th_path(W.dir, "part.db");
  assert_int_equal(saga_mem_hub_new(&W.hub, &W.loop, NULL, NULL, NULL), SAGA_OK);
  open_orch(&W);
  open_part(&W);
  tester_open();
}

static void world_free(void) {
  tester_close();
  if (W.orch) saga_node_close(W.orch, NULL, NULL);
  if (W.part) saga_node_close(W.part, NULL, NULL);
  th_drain(&W.loop);
  saga_mem_hub_close(W.hub);
  th_drain(&W.loop);
  uv_loop_close(&W.loop);
  th_rmdir(W.dir);
  free(W.orch_path);
  free(W.part_path);
}

/* ---- semantic locks ---------------------------------------------------------------------- */

static const char *start_locking(world *w, const char *key, const char *lock) {
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  saga_data_set_str(d, "lock", lock);
  int want = w->nstarted + 1;
  assert_int_equal(saga_start(w->orch, "pay", d, key, on_started, w), SAGA_OK);
  saga_data_free(d);
  assert_int_equal(th_run_real(&w->loop, started_pred, &want, 10000), 0);
  return w->started[w->nstarted - 1];
}

/* sagactl locks: a lock held by a running saga on the participant's database (the id from
 * the network escaped), refused to a second saga, filtered by type and saga, as JSON; none
 * on the orchestrator's; released by the compensation after an operator's cancel. */
static void test_locks(void **state) {
  world_open();
  ctl_run r;
  static const char lock[] = "acct\x1b[31m7";
  char held[40], refused[40];
  snprintf(held, sizeof held, "%s", start_locking(&W, "l1", lock));
  assert_int_equal(th_run_real(&W.loop, at_wait_pred, held, 20000), 0);
  snprintf(refused, sizeof refused, "%s", start_locking(&W, "l2", lock));
  wait_state(refused, 4); /* COMPENSATED: the hold was refused */

  assert_int_equal(CTL(&r, "locks", W.part_path), 0);
  expect_out(&r, "TYPE");
  expect_out(&r, "account");
  expect_out(&r, "acct\\x1b[31m7");
  assert_null(strchr(r.o.p, '\x1b'));
  expect_out(&r, held);
  expect_out(&r, "(elsewhere)");
  assert_null(strstr(r.o.p, refused));
  ctl_free(&r);

  assert_int_equal(CTL(&r, "locks", W.part_path, "--json"), 0);
  json_t *j = parse_json(&r);
  assert_int_equal(json_array_size(j), 1);
  json_t *e = json_array_get(j, 0);
  assert_string_equal(json_string_value(json_object_get(e, "type")), "account");
  assert_string_equal(json_string_value(json_object_get(e, "id")), lock);
  assert_string_equal(json_string_value(json_object_get(e, "saga_id")), held);
  assert_int_equal(json_integer_value(json_object_get(e, "step")), 0);
  assert_true(json_is_null(json_object_get(e, "saga_state")));
  assert_true(json_integer_value(json_object_get(e, "acquired_ms")) > 0);
  json_decref(j);
  ctl_free(&r);

  /* Filters: another type, another saga, this saga. */
  assert_int_equal(CTL(&r, "locks", W.part_path, "--type", "order", "--json"), 0);
  j = parse_json(&r);
  assert_int_equal(json_array_size(j), 0);
  json_decref(j);
  ctl_free(&r);
  assert_int_equal(CTL(&r, "locks", W.part_path, refused, "--json"), 0);
  j = parse_json(&r);
  assert_int_equal(json_array_size(j), 0);
  json_decref(j);
  ctl_free(&r);
  assert_int_equal(CTL(&r, "locks", W.part_path, held), 0);
  expect_out(&r, held);
  ctl_free(&r);
  /* The orchestrator's database holds none. */
  assert_int_equal(CTL(&r, "locks", W.orch_path, "--json"), 0);
  j = parse_json(&r);
  assert_int_equal(json_array_size(j), 0);
  json_decref(j);
  ctl_free(&r);

  /* An operator cancels the saga: its compensations release the lock. */
  assert_int_equal(CTL(&r, "cancel", W.orch_path, held, "--wait=30"), 0);
  ctl_free(&r);
  wait_state(held, 4);
  assert_int_equal(CTL(&r, "locks", W.part_path, "--json"), 0);
  j = parse_json(&r);
  assert_int_equal(json_array_size(j), 0);
  json_decref(j);
  ctl_free(&r);

  /* Usage: at most one saga id. */
  assert_int_equal(CTL(&r, "locks", W.part_path, "a", "b"), 2);
  expect_err(&r, "at most one saga id");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "locks", W.part_path, "--state", "FAILED"), 2);
  ctl_free(&r);
  world_free();
}

/* ---- bad input --------------------------------------------------------------------------- */

static void test_bad_input(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  g_loop = &loop;
  char *dir = th_tmpdir();
  char *missing = th_path(dir, "missing.db");
  char *text = th_path(dir, "notes.txt");
  char *other = th_path(dir, "other.db");
  char *old = th_path(dir, "old.db");
  ctl_run r;

  /* A missing file: an error naming it, and it is not created. */
  assert_int_equal(CTL(&r, "list", missing), 1);
  expect_err(&r, "missing.db");
  expect_err(&r, "No such file");
  struct stat sb;
  assert_int_not_equal(stat(missing, &sb), 0);
  ctl_free(&r);
  assert_int_equal(CTL(&r, "retry", missing, "0123"), 1);
  assert_int_not_equal(stat(missing, &sb), 0);
  ctl_free(&r);

  /* Not a database at all. */
  FILE *f = fopen(text, "w");
  assert_non_null(f);
  for (int i = 0; i < 100; i++) fputs("just some text, not SQLite\n", f);
  fclose(f);
  assert_int_equal(CTL(&r, "list", text), 1);
  expect_err(&r, "not an SQLite database");
  ctl_free(&r);

  /* An SQLite file that is not libsaga's, and a libsaga one older than migration 7. */
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(other, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, "CREATE TABLE customers(id INTEGER PRIMARY KEY)", NULL, NULL,
                                NULL),
                   SQLITE_OK);
  sqlite3_close(db);
  assert_int_equal(CTL(&r, "show", other, "x"), 1);
  expect_err(&r, "not a libsaga one");
  ctl_free(&r);
  assert_int_equal(sqlite3_open(old, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, "CREATE TABLE saga_instance(id TEXT); PRAGMA user_version = 6",
                                NULL, NULL, NULL),
                   SQLITE_OK);
  sqlite3_close(db);
  assert_int_equal(CTL(&r, "list", old), 1);
  expect_err(&r, "schema version 6");
  ctl_free(&r);
  /* A libsaga database from before semantic locks (schema 9): locks says so. */
  assert_int_equal(sqlite3_open(old, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, "PRAGMA user_version = 9", NULL, NULL, NULL), SQLITE_OK);
  sqlite3_close(db);
  assert_int_equal(CTL(&r, "locks", old), 1);
  expect_err(&r, "no semantic locks table (schema older than 10)");
  ctl_free(&r);
  /* Nothing was written into either. */
  assert_int_equal(db_int(other, "SELECT count(*) FROM sqlite_master", NULL), 1);

  /* Usage errors: exit 2, with a message naming what is valid. */
  assert_int_equal(CTL(&r, "list", other, "--state", "sleeping"), 2);
  expect_err(&r, "unknown state 'sleeping'");
  expect_err(&r, "RUNNING, COMPENSATING, COMPLETED, COMPENSATED, FAILED");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "list", other, "--older-than", "10 minutes"), 2);
  expect_err(&r, "bad duration");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "list", other, "--values"), 2);
  expect_err(&r, "list does not take option '--values'");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "frobnicate", other), 2);
  expect_err(&r, "unknown command 'frobnicate'");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "graph", other, "x", "--format", "svg"), 2);
  ctl_free(&r);
  assert_int_equal(CTL(&r, "retry", other), 2); /* neither ids nor a filter */
  ctl_free(&r);
  assert_int_equal(CTL(&r, "retry", other, "--state", "running"), 2); /* retry needs FAILED */
  ctl_free(&r);
  /* "--wait 10" of dead-letters: the 10 could be an id; refused, not guessed. */
  assert_int_equal(CTL(&r, "dead-letters", other, "replay", "--wait", "10"), 2);
  expect_err(&r, "'--wait 10' is ambiguous");
  ctl_free(&r);

  /* Help reads like a man page: every command has one, with exit codes and examples. */
  static const char *const cmds[] = {"list",     "show",  "retry",      "cancel", "dead-letters",
                                     "requests", "graph", "definitions", "outbox"};
  for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
    assert_int_equal(CTL(&r, "help", cmds[i]), 0);
    expect_out(&r, "SYNOPSIS");
    expect_out(&r, "EXIT STATUS");
    expect_out(&r, "EXAMPLES");
    ctl_free(&r);
  }
  assert_int_equal(CTL(&r, "--help"), 0);
  expect_out(&r, "EXIT STATUS");
  ctl_free(&r);

  uv_loop_close(&loop);
  free(missing), free(text), free(other), free(old);
  th_rmdir(dir);
}

/* ---- graph: golden files ----------------------------------------------------------------- */

static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) {
    printf("cannot open %s: %s\n", path, strerror(errno));
    fail();
  }
  char *p = malloc(1 << 20);
  assert_non_null(p);
  *len = fread(p, 1, (1 << 20) - 1, f);
  p[*len] = '\0';
  fclose(f);
  return p;
}

static void compare_golden(const ctl_run *r, const char *name) {
  char path[512];
  snprintf(path, sizeof path, "%s/tests/golden/%s", SAGA_SOURCE_DIR, name);
  if (getenv("SAGACTL_UPDATE_GOLDEN") != NULL) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(r->o.p, 1, r->o.len, f);
    fclose(f);
  }
  size_t len = 0;
  char *want = slurp(path, &len);
  if (len != r->o.len || memcmp(want, r->o.p, len) != 0) {
    printf("sagactl output differs from %s (SAGACTL_UPDATE_GOLDEN=1 rewrites it):\n%s\n", path,
           r->o.p);
    free(want);
    fail();
  }
  free(want);
}

static void test_graph_golden(void **state) {
  world_open();
  ctl_run r;
  assert_int_equal(CTL(&r, "graph", W.orch_path, "shop"), 0);
  compare_golden(&r, "sagactl_graph_shop.dot");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "graph", W.orch_path, "shop@2", "--format", "mermaid"), 0);
  compare_golden(&r, "sagactl_graph_shop.mmd");
  ctl_free(&r);
  /* The same again: deterministic. */
  assert_int_equal(CTL(&r, "graph", W.orch_path, "shop@2", "--format", "dot"), 0);
  compare_golden(&r, "sagactl_graph_shop.dot");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "graph", W.orch_path, "pay"), 0);
  compare_golden(&r, "sagactl_graph_pay.dot");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "graph", W.orch_path, "shop@7"), 1);
  expect_err(&r, "no definition 'shop' version 7");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "graph", W.orch_path, "shop@x"), 2);
  ctl_free(&r);

  assert_int_equal(CTL(&r, "definitions", W.orch_path), 0);
  expect_out(&r, "pay");
  expect_out(&r, "shop");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "definitions", W.orch_path, "--json"), 0);
  json_t *j = parse_json(&r);
  assert_int_equal(json_array_size(j), 2);
  json_t *shop = json_array_get(j, 1);
  assert_string_equal(json_string_value(json_object_get(shop, "name")), "shop");
  assert_int_equal(json_integer_value(json_object_get(shop, "version")), 2);
  assert_int_equal(json_integer_value(json_object_get(shop, "steps")), 4);
  assert_int_equal(json_integer_value(json_object_get(shop, "deadline_ms")), 30000);
  json_decref(j);
  ctl_free(&r);
  world_free();
}

/* ---- the live scenario ------------------------------------------------------------------ */

static size_t count_json(const char *path, const char *cmd1, const char *extra) {
  ctl_run r;
  int rc = extra ? CTL(&r, cmd1, path, extra, "--json") : CTL(&r, cmd1, path, "--json");
  assert_int_equal(rc, 0);
  json_t *j = parse_json(&r);
  size_t n = json_array_size(j);
  json_decref(j);
  ctl_free(&r);
  return n;
}

static int64_t nrequests(void) {
  return db_int(W.orch_path, "SELECT count(*) FROM saga_operator_request", NULL);
}

static void test_live(void **state) {
  world_open();
  ctl_run r;
  char f[5][40], run1[40];

  /* Four sagas left FAILED (the confirmation refused, the release broken), one RUNNING. */
  W.release_broken = 1;
  for (int i = 0; i < 4; i++) {
    char key[8];
    snprintf(key, sizeof key, "f%d", i);
    snprintf(f[i], sizeof f[i], "%s", start_pay(&W, key, 1));
  }
  snprintf(run1, sizeof run1, "%s", start_pay(&W, "r1", 0));
  for (int i = 0; i < 4; i++) wait_state(f[i], 5);
  assert_int_equal(th_run_real(&W.loop, at_wait_pred, run1, 20000), 0);

  /* Three dead letters on the participant: a command it has no handler for, garbage, and
   * garbage of 100 KB (kept cut to 64 KiB). */
  send_audit();
  static const char garbage[] = "\x1b[2Jnot msgpack at all";
  tester_send("acct", garbage, sizeof garbage - 1);
  int three = 3;
  int two = 2; /* in this order: ids follow it */
  assert_int_equal(th_run_real(&W.loop, dead_pred, &two, 20000), 0);
  char *big = malloc(100000);
  assert_non_null(big);
  memset(big, 0xc1, 100000); /* 0xc1: never used by msgpack */
  tester_send("acct", big, 100000);
  free(big);
  assert_int_equal(th_run_real(&W.loop, dead_pred, &three, 20000), 0);

  /* ---- list ---- */
  assert_int_equal(CTL(&r, "list", W.orch_path), 0);
  expect_out(&r, "pay@1");
  expect_out(&r, "FAILED");
  expect_out(&r, "RUNNING");
  expect_out(&r, "2 wait");
  expect_out(&r, f[0]);
  /* The error text from the participant is escaped, never raw to the terminal. */
  assert_null(strchr(r.o.p, '\x1b'));
  ctl_free(&r);

  assert_int_equal(CTL(&r, "list", W.orch_path, "--state", "FaIlEd", "--json"), 0);
  json_t *j = parse_json(&r);
  assert_int_equal(json_array_size(j), 4);
  for (size_t i = 0; i < 4; i++) {
    json_t *s = json_array_get(j, i);
    assert_string_equal(json_string_value(json_object_get(s, "state")), "FAILED");
    assert_string_equal(json_string_value(json_object_get(s, "definition")), "pay");
    assert_non_null(strstr(json_string_value(json_object_get(s, "error")), "ledger offline"));
  }
  json_decref(j);
  ctl_free(&r);

  assert_int_equal(CTL(&r, "list", W.orch_path, "--key", "r1", "--json"), 0);
  j = parse_json(&r);
  assert_int_equal(json_array_size(j), 1);
  assert_string_equal(json_string_value(json_object_get(json_array_get(j, 0), "id")), run1);
  assert_string_equal(json_string_value(json_object_get(json_array_get(j, 0), "state")),
                      "RUNNING");
  assert_string_equal(json_string_value(json_object_get(json_array_get(j, 0), "step_name")),
                      "wait");
  json_decref(j);
  ctl_free(&r);

  assert_int_equal(count_json(W.orch_path, "list", NULL), 5);
  assert_int_equal(count_json(W.orch_path, "list", "--definition=nope"), 0);
  assert_int_equal(count_json(W.orch_path, "list", "--older-than=1h"), 0);
  assert_int_equal(count_json(W.orch_path, "list", "--older-than=0s"), 5);
  assert_int_equal(count_json(W.orch_path, "list", "--limit=2"), 2);

  /* ---- show ---- */
  assert_int_equal(CTL(&r, "show", W.orch_path, f[0]), 0);
  expect_out(&r, "pay@1");
  expect_out(&r, "FAILED");
  expect_out(&r, "timeline:");
  expect_out(&r, "STARTED");
  expect_out(&r, "STEP_FAILED");
  expect_out(&r, "COMPENSATION_FAILED");
  expect_out(&r, "SAGA_FAILED");
  expect_out(&r, "1 confirm");
  expect_out(&r, "secret");
  expect_out(&r, "12 bytes"); /* "s3cr3t-value" */
  expect_out(&r, "\\x1b[31m declined\\nretry later");
  assert_null(strstr(r.o.p, "s3cr3t-value")); /* values only with --values */
  assert_null(strchr(r.o.p, '\x1b'));
  char line[64];
  snprintf(line, sizeof line, "\ntrace       %s\n", f[0]); /* no traceparent: its own id */
  expect_out(&r, line);
  ctl_free(&r);
  assert_int_equal(CTL(&r, "show", W.orch_path, run1), 0);
  expect_out(&r, "\ntrace       " TRACE_R1 "\n"); /* the caller's trace */
  ctl_free(&r);
  assert_int_equal(CTL(&r, "show", W.orch_path, f[0], "--values"), 0);
  expect_out(&r, "s3cr3t-value");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "show", W.orch_path, f[0], "--json"), 0);
  j = parse_json(&r);
  assert_string_equal(json_string_value(json_object_get(j, "key")), "f0");
  assert_string_equal(json_string_value(json_object_get(j, "trace_id")), f[0]);
  json_t *hist = json_object_get(j, "history");
  assert_true(json_array_size(hist) >= 5);
  assert_string_equal(json_string_value(json_object_get(json_array_get(hist, 0), "event")),
                      "STARTED");
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(hist, json_array_size(hist) - 1), "event")),
                      "SAGA_FAILED");
  assert_int_equal(json_array_size(json_object_get(j, "data")), 3);
  assert_null(json_object_get(json_array_get(json_object_get(j, "data"), 0), "value"));
  json_decref(j);
  ctl_free(&r);
  assert_int_equal(CTL(&r, "show", W.orch_path, "ffffffffffffffffffffffffffffffff"), 1);
  expect_err(&r, "no saga 'ffffffffffffffffffffffffffffffff'");
  ctl_free(&r);

  /* ---- outbox: the command to "slow" waits unconfirmed ---- */
  assert_int_equal(CTL(&r, "outbox", W.orch_path), 0);
  expect_out(&r, "slow");
  expect_out(&r, "total: 1 unconfirmed message");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "outbox", W.orch_path, "--json"), 0);
  j = parse_json(&r);
  assert_int_equal(json_integer_value(json_object_get(j, "total")), 1);
  json_t *ch = json_array_get(json_object_get(j, "channels"), 0);
  assert_string_equal(json_string_value(json_object_get(ch, "channel")), "slow");
  assert_int_equal(json_integer_value(json_object_get(ch, "depth")), 1);
  json_decref(j);
  ctl_free(&r);

  /* ---- dead letters ---- */
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "list"), 0);
  expect_out(&r, "acct");
  expect_out(&r, "audit-1");
  assert_null(strchr(r.o.p, '\x1b'));
  ctl_free(&r);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "list", "--json"), 0);
  j = parse_json(&r);
  assert_int_equal(json_array_size(j), 3);
  /* Newest first: the big one (cut), the garbage, the audit command. */
  int64_t dl_big = json_integer_value(json_object_get(json_array_get(j, 0), "id"));
  int64_t dl_garbage = json_integer_value(json_object_get(json_array_get(j, 1), "id"));
  int64_t dl_audit = json_integer_value(json_object_get(json_array_get(j, 2), "id"));
  assert_string_equal(json_string_value(json_object_get(json_array_get(j, 2), "msg_id")),
                      "audit-1");
  assert_true(json_is_true(json_object_get(json_array_get(j, 0), "cut")));
  assert_int_equal(json_integer_value(json_object_get(json_array_get(j, 0), "bytes")), 65536);
  assert_true(json_is_false(json_object_get(json_array_get(j, 1), "cut")));
  json_decref(j);
  ctl_free(&r);
  char id_audit[24], id_garbage[24], id_big[24];
  snprintf(id_big, sizeof id_big, "%lld", (long long)dl_big);
  snprintf(id_audit, sizeof id_audit, "%lld", (long long)dl_audit);
  snprintf(id_garbage, sizeof id_garbage, "%lld", (long long)dl_garbage);
  assert_int_equal(CTL(&r, "dead-letters", "show", W.part_path, id_audit), 0);
  expect_out(&r, "COMMAND");
  expect_out(&r, "0123456789abcdef0123456789abcdef");
  expect_out(&r, "acct.audit");
  expect_out(&r, "tester");
  expect_out(&r, "as received");
  expect_out(&r, "note: line1\\nline2\\x1b[31mred");
  expect_out(&r, "amount");
  assert_null(strstr(r.o.p, "1200")); /* keys and sizes, never values */
  assert_null(strchr(r.o.p, '\x1b'));
  ctl_free(&r);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "show", id_garbage), 0);
  expect_out(&r, "not decodable");
  assert_null(strchr(r.o.p, '\x1b'));
  ctl_free(&r);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "show", id_big), 0);
  expect_out(&r, "65536 bytes, cut");
  expect_out(&r, "of 100000 bytes");
  expect_out(&r, "not decodable");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "show", id_big, "--json"), 0);
  j = parse_json(&r);
  assert_true(json_is_true(json_object_get(j, "cut")));
  assert_true(json_is_null(json_object_get(j, "envelope")));
  assert_non_null(json_string_value(json_object_get(j, "decode_error")));
  json_decref(j);
  ctl_free(&r);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "show", id_audit, "--json"), 0);
  j = parse_json(&r);
  json_t *env = json_object_get(j, "envelope");
  assert_string_equal(json_string_value(json_object_get(env, "kind")), "COMMAND");
  assert_string_equal(json_string_value(json_object_get(env, "name")), "acct.audit");
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(json_object_get(env, "headers"), 1), "value")),
                      "line1\nline2\x1b[31mred"); /* JSON escapes it; the text is intact */
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(json_object_get(env, "data"), 0), "key")),
                      "amount");
  json_decref(j);
  ctl_free(&r);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "show", "99999"), 1);
  expect_err(&r, "no dead letter 99999");
  ctl_free(&r);

  /* ---- requests: none yet ---- */
  assert_int_equal(count_json(W.orch_path, "requests", NULL), 0);

  /* ---- retry by id, refused without writing anything ---- */
  assert_int_equal(CTL(&r, "retry", W.orch_path, "ffffffffffffffffffffffffffffffff"), 1);
  expect_err(&r, "no saga 'ffffffffffffffffffffffffffffffff'");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "retry", W.orch_path, f[0], run1), 1); /* one id fails: none written */
  expect_err(&r, "is RUNNING; retry needs a FAILED saga");
  expect_err(&r, "nothing written");
  ctl_free(&r);
  assert_int_equal(CTL(&r, "cancel", W.orch_path, f[0]), 1);
  expect_err(&r, "cancel needs a RUNNING saga");
  ctl_free(&r);
  assert_int_equal(nrequests(), 0);

  /* ---- retry of a FAILED saga, carried out by the running node ---- */
  W.release_broken = 0; /* the cause is fixed */
  assert_int_equal(CTL(&r, "retry", W.orch_path, f[0], "--wait=30", "--by", "alice"), 0);
  expect_out(&r, "retry");
  expect_out(&r, "DONE");
  ctl_free(&r);
  wait_state(f[0], 4);
  assert_int_equal(CTL(&r, "show", W.orch_path, f[0], "--json"), 0);
  j = parse_json(&r);
  hist = json_object_get(j, "history");
  int saw_op = 0;
  for (size_t i = 0; i < json_array_size(hist); i++)
    if (strcmp(json_string_value(json_object_get(json_array_get(hist, i), "event")),
               "OPERATOR_REQUEST") == 0)
      saw_op = 1;
  assert_true(saw_op);
  json_t *reqs = json_object_get(j, "requests");
  assert_int_equal(json_array_size(reqs), 1);
  assert_string_equal(json_string_value(json_object_get(json_array_get(reqs, 0), "state")),
                      "DONE");
  assert_string_equal(
      json_string_value(json_object_get(json_array_get(reqs, 0), "requested_by")), "alice");
  json_decref(j);
  ctl_free(&r);
  /* Retried again: it is COMPENSATED now. */
  assert_int_equal(CTL(&r, "retry", W.orch_path, f[0]), 1);
  expect_err(&r, "is COMPENSATED; retry needs a FAILED saga");
  ctl_free(&r);

  /* ---- cancel of a RUNNING saga ---- */
  /* "--wait 30": a number after --wait is seconds here (a saga id is 32 hex digits). */
  assert_int_equal(CTL(&r, "cancel", W.orch_path, run1, "--wait", "30"), 0);
  expect_out(&r, "DONE");
  ctl_free(&r);
  wait_state(run1, 4);

  /* ---- the bulk filter: a dry run writes nothing, --yes one request per match ---- */
  int64_t before = nrequests();
  assert_int_equal(CTL(&r, "retry", W.orch_path, "--state", "failed", "--definition", "pay"), 0);
  expect_out(&r, "dry run");
  expect_out(&r, f[1]);
  expect_out(&r, f[2]);
  expect_out(&r, f[3]);
  assert_null(strstr(r.o.p, f[0]));
  ctl_free(&r);
  assert_int_equal(nrequests(), before);
  assert_int_equal(CTL(&r, "retry", W.orch_path, "--state", "failed", "--definition", "pay",
                       "--yes", "--wait=30"),
                   0);
  assert_int_equal(nrequests(), before + 3);
  ctl_free(&r);
  for (int i = 1; i < 4; i++) wait_state(f[i], 4);

  /* ---- a repair requested while the node is closed, applied at its next start ---- */
  W.release_broken = 1;
  snprintf(f[4], sizeof f[4], "%s", start_pay(&W, "f4", 1));
  wait_state(f[4], 5);
  W.release_broken = 0;
  close_node(&W, &W.orch);
  assert_int_equal(CTL(&r, "retry", W.orch_path, f[4]), 0);
  expect_out(&r, "PENDING");
  ctl_free(&r);
  assert_int_equal(count_json(W.orch_path, "requests", "--pending"), 1);
  open_orch(&W);
  wait_state(f[4], 4);
  assert_int_equal(count_json(W.orch_path, "requests", "--pending"), 0);

  /* ---- dead letters: replay once the handler is registered, purge the rest ---- */
  /* A cut one is refused by sagactl itself, nothing written. */
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "replay", id_big), 1);
  expect_err(&r, "cannot be replayed");
  ctl_free(&r);
  assert_int_equal(db_int(W.part_path, "SELECT count(*) FROM saga_operator_request", NULL), 0);
  close_node(&W, &W.part);
  int64_t dl_undelivered = dead_letter_undelivered();
  char id_undelivered[24];
  snprintf(id_undelivered, sizeof id_undelivered, "%lld", (long long)dl_undelivered);
  open_part(&W);
  /* The cause is still there (no handler): the node refuses it the same way, and sagactl
   * reports the refusal with exit 1. */
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "replay", id_undelivered, "--wait=30"), 1);
  expect_out(&r, "REFUSED");
  expect_out(&r, "no handler for command 'acct.audit'");
  expect_err(&r, "1 of 1 request was refused");
  ctl_free(&r);
  /* Fixed: the participant serves acct.audit now. */
  close_node(&W, &W.part);
  W.audit_registered = 1;
  open_part(&W);
  assert_int_equal(W.audits, 0);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "replay", id_undelivered, "--wait=30"), 0);
  expect_out(&r, "DONE");
  ctl_free(&r);
  assert_int_equal(W.audits, 1);
  assert_int_equal(db_int(W.part_path, "SELECT count(*) FROM saga_dead_letter WHERE id = ?1",
                          id_undelivered),
                   0);
  /* The one the participant answered already (without a handler) is refused by the node:
   * running it now would not reach its sender's saga. */
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "replay", id_audit, "--wait=30"), 1);
  expect_out(&r, "answered already");
  ctl_free(&r);
  assert_int_equal(W.audits, 1);
  assert_int_equal(db_int(W.part_path, "SELECT count(*) FROM saga_dead_letter", NULL), 3);
  /* Purge: --all is a dry run first. */
  int64_t preq = db_int(W.part_path, "SELECT count(*) FROM saga_operator_request", NULL);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "purge", "--all"), 0);
  expect_out(&r, "dry run");
  expect_out(&r, "of 3 dead letters");
  ctl_free(&r);
  assert_int_equal(db_int(W.part_path, "SELECT count(*) FROM saga_operator_request", NULL), preq);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "purge", "--all", "--yes", "--wait=30"), 0);
  expect_out(&r, "DONE");
  expect_out(&r, "3 dead letters deleted");
  ctl_free(&r);
  assert_int_equal(db_int(W.part_path, "SELECT count(*) FROM saga_operator_request", NULL),
                   preq + 1); /* one request: '*' */
  assert_int_equal(db_int(W.part_path, "SELECT count(*) FROM saga_dead_letter", NULL), 0);
  assert_int_equal(CTL(&r, "dead-letters", W.part_path, "replay", id_garbage), 1);
  expect_err(&r, "no dead letter");
  ctl_free(&r);

  /* ---- the requests, all carried out ---- */
  assert_int_equal(CTL(&r, "requests", W.orch_path, "--json"), 0);
  j = parse_json(&r);
  assert_int_equal(json_array_size(j), 6); /* f0, run1, f1-f3, f4 */
  for (size_t i = 0; i < json_array_size(j); i++)
    assert_string_equal(json_string_value(json_object_get(json_array_get(j, i), "state")),
                        "DONE");
  json_decref(j);
  ctl_free(&r);
  assert_int_equal(CTL(&r, "requests", W.orch_path), 0);
  expect_out(&r, "cancel");
  expect_out(&r, "alice");
  ctl_free(&r);

  world_free();
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bad_input),
      cmocka_unit_test(test_graph_golden),
      cmocka_unit_test(test_live),
      cmocka_unit_test(test_locks),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
