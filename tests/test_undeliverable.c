/*
 * Messages that can never be delivered are dead-lettered once, never resent forever
 * (issue 10, item 4):
 *  - a command whose reply_to the node's transport cannot reach (can_send() says 0, or the
 *    reserved loopback channel) is dead-lettered and acknowledged; the handler does not run
 *    and nothing else is written;
 *  - an outbox row the transport refuses for good (send() returns SAGA_EINVAL or
 *    SAGA_ETOOBIG) is moved to the dead-letter table once and deleted, and a saga waiting
 *    for that command fails the step with the reason;
 *  - transport interface versions: a version-1 table is accepted and only its fields are
 *    read (its can_send is never called), an unknown version is refused.
 *
 * The nodes under test run on a "gate" adapter: an in-memory transport of the world's hub
 * wrapped by a table of our own, whose can_send() says 0 for one channel and whose send()
 * refuses one channel with a chosen code. A raw endpoint "tester" on the hub sends commands
 * and receives replies.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "harness.h"
#include "internal.h" /* saga__transport_host, saga__buf, saga__data_encode */

/* ---- the gate adapter ---------------------------------------------------------------------- */

typedef struct gate {
  saga_transport base; /* first: the node sees a gate */
  saga_transport_methods m;
  saga_transport *inner;
  const char *unreachable; /* can_send() says 0 for it */
  const char *refuse;      /* send() returns refuse_code for it */
  int refuse_code;
  int can_send_calls, refused_sends;
} gate;

static int g_open(saga_transport *t, uv_loop_t *loop) {
  gate *g = (gate *)t;
  g->inner->saga__host = t->saga__host; /* the inner transport talks to the node directly */
  return g->inner->methods->open(g->inner, loop);
}
static int g_subscribe(saga_transport *t, const char *channel) {
  gate *g = (gate *)t;
  return g->inner->methods->subscribe(g->inner, channel);
}
static int g_send(saga_transport *t, const char *channel, const void *data, size_t len,
                  uint64_t token) {
  gate *g = (gate *)t;
  if (g->refuse != NULL && strcmp(channel, g->refuse) == 0) {
    g->refused_sends++;
    return g->refuse_code;
  }
  return g->inner->methods->send(g->inner, channel, data, len, token);
}
static void g_ack(saga_transport *t, uint64_t tag) {
  gate *g = (gate *)t;
  g->inner->methods->ack(g->inner, tag);
}
static void g_close(saga_transport *t) {
  gate *g = (gate *)t;
  g->inner->methods->close(g->inner); /* reports closed through the node's host */
}
static void g_destroy(saga_transport *t) {
  gate *g = (gate *)t;
  g->inner->methods->destroy(g->inner);
  free(g);
}
static int g_can_send(saga_transport *t, const char *channel) {
  gate *g = (gate *)t;
  g->can_send_calls++;
  return !(g->unreachable != NULL && strcmp(channel, g->unreachable) == 0);
}

static gate *gate_new(th_world *w, int version) {
  gate *g = calloc(1, sizeof *g);
  assert_non_null(g);
  assert_int_equal(saga_mem_transport_new(&g->inner, w->hub), SAGA_OK);
  g->m.version = version;
  g->m.name = "gate";
  g->m.open = g_open;
  g->m.subscribe = g_subscribe;
  g->m.send = g_send;
  g->m.ack = g_ack;
  g->m.close = g_close;
  g->m.destroy = g_destroy;
  g->m.can_send = g_can_send; /* present even in a version-1 table: must not be read */
  g->base.methods = &g->m;
  return g;
}

/* ---- a node on a gate ------------------------------------------------------------------------ */

typedef struct gnode {
  th_world *w;
  gate *g;
  saga_node *n;
  int handler_runs;
  int terminal;
  saga_state last_state;
} gnode;

static int gn_do(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  gnode *gn = arg;
  gn->handler_runs++;
  return saga_reply_set_str(r, "done", "yes");
}

static void gn_event(saga_node *n, const saga_event *ev, void *arg) {
  gnode *gn = arg;
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED ||
      ev->type == SAGA_EV_SAGA_FAILED)
    gn->terminal++;
}

/* Opens node `name` on gate g (taken): serves command "do" on channel "q0"; with a
 * definition, also orchestrates it. Returns saga_node_open's code. */
static int gn_open(gnode *gn, th_world *w, gate *g, const char *name,
                   const saga_definition *def) {
  memset(gn, 0, sizeof *gn);
  gn->w = w;
  gn->g = g;
  char file[64];
  snprintf(file, sizeof file, "%s.db", name);
  char *path = th_path(w->dir, file);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = name;
  cfg.db_path = path;
  cfg.transport = &g->base;
  cfg.clock = w->clock;
  cfg.resend_ms = 200;
  cfg.retention.finished_ms = 0;
  cfg.retention.inbox_ms = 0;
  cfg.on_event = gn_event;
  cfg.event_arg = gn;
  char err[256];
  int rc = saga_node_open(&gn->n, &w->loop, &cfg, err, sizeof err);
  free(path);
  if (rc != SAGA_OK) {
    printf("  saga_node_open(%s): %s\n", name, err);
    return rc;
  }
  assert_int_equal(saga_node_handle(gn->n, "q0", "do", gn_do, gn), SAGA_OK);
  if (def != NULL) assert_int_equal(saga_node_register(gn->n, def), SAGA_OK);
  assert_int_equal(saga_node_start(gn->n, NULL), SAGA_OK);
  return SAGA_OK;
}

static void gn_close(gnode *gn) {
  saga_node_close(gn->n, NULL, NULL);
  gn->n = NULL;
  th_drain(&gn->w->loop);
}

static int64_t q_int(saga_node *n, const char *sql, const char *arg) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(n), sql, -1, &st, NULL), SQLITE_OK);
  if (arg != NULL) sqlite3_bind_text(st, 1, arg, -1, SQLITE_TRANSIENT);
  int64_t v = -1;
  if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

static saga_node_stats stats_of(saga_node *n) {
  saga_node_stats s;
  saga_node_stats_get(n, &s, sizeof s);
  return s;
}

/* ---- the tester: a raw endpoint on the hub --------------------------------------------------- */

typedef struct tester {
  th_world *w;
  saga_transport *t;
  saga__transport_host host;
  size_t nreplies;
  char last_reply_id[600];
  uint64_t next_token;
  size_t nconfirmed;
  int closed;
} tester;

static int tester_deliver(void *ctx, const char *channel, const void *data, size_t len,
                          uint64_t tag) {
  tester *T = ctx;
  saga_envelope *env = NULL;
  char err[200];
  assert_int_equal(saga_envelope_decode(data, len, NULL, NULL, &env, err, sizeof err), SAGA_OK);
  snprintf(T->last_reply_id, sizeof T->last_reply_id, "%s", env->msg_id);
  saga_envelope_free(env);
  T->nreplies++;
  T->t->methods->ack(T->t, tag);
  return SAGA_OK;
}
static void tester_sent(void *ctx, uint64_t token, int status) {
  if (status == SAGA_OK) ((tester *)ctx)->nconfirmed++;
}
static void tester_closed(void *ctx) { ((tester *)ctx)->closed = 1; }
static void tester_log(void *ctx, saga_log_level level, const char *msg) {
  printf("tester transport log [%d]: %s\n", (int)level, msg);
}

static void tester_open(tester *T, th_world *w) {
  memset(T, 0, sizeof *T);
  T->w = w;
  assert_int_equal(saga_mem_transport_new(&T->t, w->hub), SAGA_OK);
  T->host.deliver = tester_deliver;
  T->host.sent = tester_sent;
  T->host.closed = tester_closed;
  T->host.log = tester_log;
  T->host.ctx = T;
  T->t->saga__host = &T->host;
  assert_int_equal(T->t->methods->open(T->t, &w->loop), SAGA_OK);
  assert_int_equal(T->t->methods->subscribe(T->t, "tester"), SAGA_OK);
}

static void tester_close(tester *T) {
  T->t->methods->close(T->t);
  assert_true(T->closed);
  T->t->methods->destroy(T->t);
  T->t = NULL;
}

/* Sends command "do" for step 0 on channel q0 with the given ids and reply_to. */
static void send_cmd(tester *T, const char *msg_id, const char *saga_id, const char *reply_to) {
  saga__buf d;
  saga__buf_init(&d, NULL);
  assert_int_equal(saga__data_encode(NULL, &d), SAGA_OK);
  saga_envelope e;
  memset(&e, 0, sizeof e);
  e.version = SAGA_ENVELOPE_VERSION;
  e.kind = SAGA_MSG_COMMAND;
  e.msg_id = msg_id;
  e.saga_id = saga_id;
  e.attempt = 1;
  e.phase = SAGA_PHASE_ACTION;
  e.name = "do";
  e.reply_to = reply_to;
  e.error = "";
  e.payload = d.data;
  e.payload_len = d.len;
  void *buf = NULL;
  size_t len = 0;
  assert_int_equal(saga_envelope_encode(&e, NULL, &buf, &len), SAGA_OK);
  assert_int_equal(T->t->methods->send(T->t, "q0", buf, len, ++T->next_token), SAGA_OK);
  saga_free(NULL, buf);
  saga__buf_free(&d);
}

typedef struct {
  tester *T;
  size_t confirmed, replies;
} wait_ctx;

static int wait_pred(void *arg) {
  wait_ctx *c = arg;
  return c->T->nconfirmed >= c->confirmed && c->T->nreplies >= c->replies;
}

/* Runs until every command sent so far was acknowledged by its receiver (after its commit)
 * and `replies` replies arrived, then lets the world settle for 5 s of clock time: 25
 * resend intervals, so a row left to be resent would be resent. */
static void run_until(tester *T, size_t replies) {
  wait_ctx c = {T, (size_t)T->next_token, replies};
  assert_int_equal(th_run_manual(&T->w->loop, T->w->clock, wait_pred, &c, 60000), 0);
  th_world_settle(T->w, 5000);
}

/* ---- (b) reply_to checked before the handler runs ------------------------------------------- */

static void test_unreachable_reply_to(void **state) {
  th_world w;
  assert_int_equal(th_world_open(&w, NULL), SAGA_OK);
  tester T;
  tester_open(&T, &w);
  gate *g = gate_new(&w, SAGA_TRANSPORT_VERSION);
  g->unreachable = "nowhere";
  gnode gn;
  assert_int_equal(gn_open(&gn, &w, g, "gp", NULL), SAGA_OK);

  send_cmd(&T, "u-1", "saga-u1", "nowhere");
  run_until(&T, 0);
  printf("  reply_to 'nowhere': handler runs %d, dead letters %lld, outbox %lld, can_send "
         "calls %d\n",
         gn.handler_runs, (long long)q_int(gn.n, "SELECT count(*) FROM saga_dead_letter", NULL),
         (long long)saga_node_outbox_depth(gn.n), g->can_send_calls);
  assert_int_equal(T.nconfirmed, 1); /* acknowledged: its sender does not resend it */
  assert_int_equal(gn.handler_runs, 0);
  assert_true(g->can_send_calls >= 1);
  assert_int_equal(q_int(gn.n, "SELECT count(*) FROM saga_dead_letter", NULL), 1);
  assert_int_equal(q_int(gn.n,
                         "SELECT count(*) FROM saga_dead_letter WHERE msg_id = 'u-1' AND "
                         "channel = 'q0' AND reason = ?1",
                         "reply_to 'nowhere' is not reachable by this node's transport"),
                   1);
  /* Nothing else written: no reply queued, no inbox record, no step record. */
  assert_int_equal(saga_node_outbox_depth(gn.n), 0);
  assert_int_equal(q_int(gn.n, "SELECT count(*) FROM saga_inbox", NULL), 0);
  assert_int_equal(q_int(gn.n, "SELECT count(*) FROM saga_pstep", NULL), 0);
  assert_int_equal(stats_of(gn.n).reply_to_refused, 1);
  assert_int_equal(T.nreplies, 0);

  /* The reserved loopback channel is never a valid reply_to: the reply would be fed to this
   * node's own engine. */
  send_cmd(&T, "u-2", "saga-u2", "saga.local");
  run_until(&T, 0);
  assert_int_equal(gn.handler_runs, 0);
  assert_int_equal(stats_of(gn.n).reply_to_refused, 2);
  assert_int_equal(q_int(gn.n, "SELECT count(*) FROM saga_dead_letter WHERE msg_id = 'u-2' AND "
                               "reason LIKE '%saga.local%not reachable%'",
                         NULL),
                   1);

  /* A reachable reply_to: handled and answered as usual, through the same gate. */
  send_cmd(&T, "u-3", "saga-u3", "tester");
  run_until(&T, 1);
  assert_int_equal(gn.handler_runs, 1);
  assert_string_equal(T.last_reply_id, "u-3/r");
  assert_int_equal(saga_node_outbox_depth(gn.n), 0);
  assert_int_equal(q_int(gn.n, "SELECT count(*) FROM saga_dead_letter", NULL), 2);

  gn_close(&gn);
  tester_close(&T);
  th_world_free(&w);
}

/* ---- (c) a permanent send refusal: dead-lettered once, not resent ---------------------------- */

static void refused_reply(int code) {
  th_world w;
  assert_int_equal(th_world_open(&w, NULL), SAGA_OK);
  tester T;
  tester_open(&T, &w);
  gate *g = gate_new(&w, SAGA_TRANSPORT_VERSION);
  g->refuse = "blackhole"; /* can_send() says yes: only send() knows (a version-1 adapter) */
  g->refuse_code = code;
  gnode gn;
  assert_int_equal(gn_open(&gn, &w, g, "gp", NULL), SAGA_OK);

  send_cmd(&T, "b-1", "saga-b1", "blackhole");
  run_until(&T, 0);
  int64_t dead = q_int(gn.n, "SELECT count(*) FROM saga_dead_letter", NULL);
  printf("  reply refused with %s: sends %d, dead letters %lld, outbox %lld, unsendable %llu\n",
         saga_err_name(code), g->refused_sends, (long long)dead,
         (long long)saga_node_outbox_depth(gn.n),
         (unsigned long long)stats_of(gn.n).unsendable);
  assert_int_equal(gn.handler_runs, 1);
  assert_int_equal(g->refused_sends, 1); /* never resent */
  assert_int_equal(saga_node_outbox_depth(gn.n), 0);
  assert_int_equal(dead, 1);
  char like[64];
  snprintf(like, sizeof like, "%%'blackhole'%%SAGA_%s%%", saga_err_name(code));
  assert_int_equal(q_int(gn.n,
                         "SELECT count(*) FROM saga_dead_letter WHERE msg_id = 'b-1/r' AND "
                         "channel = 'blackhole' AND length(body) > 0 AND reason LIKE ?1",
                         like),
                   1);
  assert_int_equal(stats_of(gn.n).unsendable, 1);
  /* The command itself was handled and recorded: a duplicate gets the recorded reply, which
   * is refused (and dead-lettered) again — once per delivery, never in a loop. */
  send_cmd(&T, "b-1", "saga-b1", "blackhole");
  run_until(&T, 0);
  assert_int_equal(gn.handler_runs, 1);
  assert_int_equal(g->refused_sends, 2);
  assert_int_equal(saga_node_outbox_depth(gn.n), 0);
  assert_int_equal(q_int(gn.n, "SELECT count(*) FROM saga_dead_letter", NULL), 2);
  assert_int_equal(stats_of(gn.n).unsendable, 2);

  gn_close(&gn);
  tester_close(&T);
  th_world_free(&w);
}

static void test_send_refused_einval(void **state) { refused_reply(SAGA_EINVAL); }
static void test_send_refused_etoobig(void **state) { refused_reply(SAGA_ETOOBIG); }

/* A transient refusal keeps today's resend: the row stays and goes out once the transport
 * takes it. */
static void test_send_refused_transient(void **state) {
  th_world w;
  assert_int_equal(th_world_open(&w, NULL), SAGA_OK);
  tester T;
  tester_open(&T, &w);
  gate *g = gate_new(&w, SAGA_TRANSPORT_VERSION);
  g->refuse = "tester";
  g->refuse_code = SAGA_EBUSY;
  gnode gn;
  assert_int_equal(gn_open(&gn, &w, g, "gp", NULL), SAGA_OK);
  send_cmd(&T, "t-1", "saga-t1", "tester");
  wait_ctx c = {&T, 1, 0};
  assert_int_equal(th_run_manual(&w.loop, w.clock, wait_pred, &c, 60000), 0);
  th_world_settle(&w, 1000);
  assert_true(g->refused_sends >= 2); /* resent */
  assert_int_equal(saga_node_outbox_depth(gn.n), 1);
  assert_int_equal(q_int(gn.n, "SELECT count(*) FROM saga_dead_letter", NULL), 0);
  g->refuse = NULL; /* the transport recovers: the reply goes out on the next resend */
  c.replies = 1;
  assert_int_equal(th_run_manual(&w.loop, w.clock, wait_pred, &c, 60000), 0);
  th_world_settle(&w, 1000);
  assert_int_equal(T.nreplies, 1);
  assert_int_equal(saga_node_outbox_depth(gn.n), 0);
  assert_int_equal(stats_of(gn.n).unsendable, 0);
  gn_close(&gn);
  tester_close(&T);
  th_world_free(&w);
}

/* ---- a saga's command refused for good: the step fails with the reason ----------------------- */

static int gn_terminal(void *arg) { return ((gnode *)arg)->terminal >= 1; }

static void test_unsendable_command_fails_step(void **state) {
  th_world w;
  assert_int_equal(th_world_open(&w, NULL), SAGA_OK);
  gate *g = gate_new(&w, SAGA_TRANSPORT_VERSION);
  g->refuse = "big";
  g->refuse_code = SAGA_ETOOBIG;
  /* S0 on p0 (the world's participant), S1 on "big", which the transport refuses; no step
   * timeout: without the fix the saga would wait forever while the row is resent. */
  saga_step steps[2];
  memset(steps, 0, sizeof steps);
  steps[0].name = "S0";
  steps[0].channel = "p0";
  steps[0].action = "do";
  steps[0].compensation = "undo";
  steps[1].name = "S1";
  steps[1].channel = "big";
  steps[1].action = "do";
  steps[1].compensation = "undo";
  saga_definition def = {SAGA_DEFINITION_VERSION, "bigsaga", 1, steps, 2, 0, sizeof(saga_step)};
  gnode gn;
  assert_int_equal(gn_open(&gn, &w, g, "go", &def), SAGA_OK);
  assert_int_equal(saga_start(gn.n, "bigsaga", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, gn_terminal, &gn, 60000), 0);
  th_world_settle(&w, 5000);
  char id[40];
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(gn.n), "SELECT id FROM saga_instance", -1,
                                      &st, NULL),
                   SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  snprintf(id, sizeof id, "%s", (const char *)sqlite3_column_text(st, 0));
  sqlite3_finalize(st);
  saga_info *info = NULL;
  assert_int_equal(saga_get(gn.n, id, &info), SAGA_OK);
  printf("  saga %s: %s, error '%s'\n", id, saga_state_name(info->state), info->error);
  assert_int_equal(info->state, SAGA_COMPENSATED);
  assert_non_null(strstr(info->error, "S1: transport 'gate' cannot send"));
  assert_non_null(strstr(info->error, "SAGA_ETOOBIG"));
  saga_info_free(info);
  assert_int_equal(g->refused_sends, 1);
  assert_int_equal(saga_node_outbox_depth(gn.n), 0);
  assert_int_equal(q_int(gn.n, "SELECT count(*) FROM saga_dead_letter WHERE channel = 'big'",
                         NULL),
                   1);
  assert_int_equal(stats_of(gn.n).unsendable, 1);
  /* S0 applied once and was undone once; S1 never ran anywhere. */
  assert_int_equal(th_fx_count(&w, id, 0, "do"), 1);
  assert_int_equal(th_fx_count(&w, id, 0, "undo"), 1);
  assert_int_equal(th_fx_count(&w, id, 1, "do"), 0);
  assert_int_equal(gn.handler_runs, 0);
  gn_close(&gn);
  th_world_free(&w);
}

/* ---- transport interface versions ---------------------------------------------------------- */

static void test_version_1_table(void **state) {
  th_world w;
  assert_int_equal(th_world_open(&w, NULL), SAGA_OK);
  tester T;
  tester_open(&T, &w);
  /* A version-1 table: the core must not read can_send (here a function that would refuse
   * every reply). */
  gate *g = gate_new(&w, 1);
  g->unreachable = "tester";
  gnode gn;
  assert_int_equal(gn_open(&gn, &w, g, "gp", NULL), SAGA_OK);
  send_cmd(&T, "v-1", "saga-v1", "tester");
  run_until(&T, 1);
  assert_int_equal(g->can_send_calls, 0);
  assert_int_equal(gn.handler_runs, 1);
  assert_int_equal(stats_of(gn.n).reply_to_refused, 0);
  assert_int_equal(q_int(gn.n, "SELECT count(*) FROM saga_dead_letter", NULL), 0);
  gn_close(&gn);
  tester_close(&T);

  /* A version from the future is refused at open. */
  gate *g3 = gate_new(&w, SAGA_TRANSPORT_VERSION + 1);
  gnode gn3;
  assert_int_equal(gn_open(&gn3, &w, g3, "g3", NULL), SAGA_EVERSION);
  th_world_free(&w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_unreachable_reply_to),
      cmocka_unit_test(test_send_refused_einval),
      cmocka_unit_test(test_send_refused_etoobig),
      cmocka_unit_test(test_send_refused_transient),
      cmocka_unit_test(test_unsendable_command_fails_step),
      cmocka_unit_test(test_version_1_table),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
