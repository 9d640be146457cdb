/*
 * W3C trace context and spans (saga/trace.h): the strict traceparent check, saga_start_traced,
 * the spans reported to saga_node_config.on_span for a saga that completes and one that
 * compensates (ids, parents, names, statuses), the headers of commands and replies, the
 * context a handler sees and passes to saga_tx_start, the context kept across a restart of the
 * orchestrator, and malformed traceparents arriving from the network.
 *
 * World: a manual clock, an in-memory hub, an orchestrator node "orch" running "trip" (three
 * compensatable steps on channels c0..c2) and a participant node "part" serving them; both
 * report their spans into one list, tagged with the node.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "harness.h"
#include "internal.h" /* saga__transport_host (the raw sender) */

#define MAX_SPANS 512
#define MAX_SEEN 64

typedef struct span_copy {
  char node[16];
  int event, kind, status;
  char trace[40], span[24], parent[24];
  uint8_t flags;
  char name[160], saga[48], def[64], error[300];
  int step;
  uint32_t attempt;
  uint64_t start, end;
} span_copy;

typedef struct seen_cmd { /* what a handler saw */
  char saga[48], command[64];
  char header[128]; /* saga_msg_header(cmd, "traceparent"), "" when none */
  char context[64]; /* saga_msg_traceparent(cmd) */
} seen_cmd;

typedef struct world {
  uv_loop_t loop;
  saga_clock *clock;
  saga_mem_hub *hub;
  char *dir;
  saga_node *orch, *part;
  span_copy spans[MAX_SPANS];
  size_t nspans;
  seen_cmd seen[MAX_SEEN];
  size_t nseen;
  int refuse_step; /* the participant refuses this step's action (-1: none) */
  int terminal;    /* terminal events of "trip" seen on orch */
  int child_done;  /* terminal events of "child" seen on part */
  char event_tp[64]; /* the traceparent of orch's last COMPLETED/COMPENSATED event */
  char remote_tp[64]; /* the same event as received by part (orch's event channel) */
  int start_status;
  char started[48];
} world;

static span_copy *span_add(world *w, const char *node, const saga_span *s) {
  assert_true(w->nspans < MAX_SPANS);
  span_copy *c = &w->spans[w->nspans++];
  memset(c, 0, sizeof *c);
  snprintf(c->node, sizeof c->node, "%s", node);
  c->event = s->event;
  c->kind = s->kind;
  c->status = s->status;
  snprintf(c->trace, sizeof c->trace, "%s", s->trace_id);
  snprintf(c->span, sizeof c->span, "%s", s->span_id);
  snprintf(c->parent, sizeof c->parent, "%s", s->parent_span_id);
  c->flags = s->flags;
  snprintf(c->name, sizeof c->name, "%s", s->name);
  snprintf(c->saga, sizeof c->saga, "%s", s->saga_id);
  snprintf(c->def, sizeof c->def, "%s", s->definition);
  snprintf(c->error, sizeof c->error, "%s", s->error);
  c->step = s->step;
  c->attempt = s->attempt;
  c->start = s->start_ns;
  c->end = s->end_ns;
  return c;
}

static world *the_world; /* the hooks' world (one per test) */

static void on_span_orch(saga_node *n, const saga_span *s, void *arg) {
  (void)n;
  span_add(arg, "orch", s);
}
static void on_span_part(saga_node *n, const saga_span *s, void *arg) {
  (void)n;
  span_add(arg, "part", s);
}

static void on_event_orch(saga_node *n, const saga_event *ev, void *arg) {
  (void)n;
  world *w = arg;
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED ||
      ev->type == SAGA_EV_SAGA_FAILED) {
    if (strcmp(ev->definition, "trip") == 0) w->terminal++;
    snprintf(w->event_tp, sizeof w->event_tp, "%s", ev->traceparent);
  }
}

static void on_event_part(saga_node *n, const saga_event *ev, void *arg) {
  (void)n;
  world *w = arg;
  if (ev->type == SAGA_EV_COMPLETED && strcmp(ev->definition, "child") == 0) w->child_done++;
}

static void on_remote_event(saga_node *n, const saga_event *ev, void *arg) {
  (void)n;
  world *w = arg;
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED)
    snprintf(w->remote_tp, sizeof w->remote_tp, "%s", ev->traceparent);
}

static void see(world *w, const saga_msg *cmd) {
  assert_true(w->nseen < MAX_SEEN);
  seen_cmd *s = &w->seen[w->nseen++];
  snprintf(s->saga, sizeof s->saga, "%s", saga_msg_saga_id(cmd));
  snprintf(s->command, sizeof s->command, "%s", saga_msg_command(cmd));
  const char *h = saga_msg_header(cmd, "traceparent");
  snprintf(s->header, sizeof s->header, "%s", h ? h : "");
  snprintf(s->context, sizeof s->context, "%s", saga_msg_traceparent(cmd));
}

static int act(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  world *w = arg;
  see(w, cmd);
  if ((int)saga_msg_step(cmd) == w->refuse_step) return saga_reply_fail(reply, "no way");
  if (saga_msg_step(cmd) == 0 && saga_data_get_str(saga_msg_data(cmd), "spawn") != NULL) {
    char id[64];
    int existed = 0;
    int rc = saga_tx_start(tx, "child", NULL, NULL, id, sizeof id, &existed);
    if (rc != SAGA_OK) return rc;
  }
  return SAGA_OK;
}

static int undo(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  (void)tx, (void)reply;
  see(arg, cmd);
  return SAGA_OK;
}

static int local_ok(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  (void)tx, (void)reply;
  see(arg, cmd);
  return SAGA_OK;
}

static const saga_step trip_steps[] = {
    {.name = "S0", .channel = "c0", .action = "a0", .compensation = "u0",
     .kind = SAGA_STEP_COMPENSATABLE, .timeout_ms = 5000},
    {.name = "S1", .channel = "c1", .action = "a1", .compensation = "u1",
     .kind = SAGA_STEP_COMPENSATABLE, .timeout_ms = 5000},
    {.name = "S2", .channel = "c2", .action = "a2", .compensation = "u2",
     .kind = SAGA_STEP_COMPENSATABLE, .timeout_ms = 5000},
};
static const saga_definition trip = {.struct_version = SAGA_DEFINITION_VERSION,
                                     .name = "trip",
                                     .version = 1,
                                     .steps = trip_steps,
                                     .nsteps = 3,
                                     .step_size = sizeof(saga_step)};

static saga_step child_steps[1];
static saga_definition child_def;

static uint64_t seq_random(void *arg) { /* deterministic ids: a test source */
  uint64_t *s = arg;
  return saga__splitmix64(s);
}
static uint64_t rng_state = 42;

static saga_node *open_node(world *w, const char *name) {
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w->hub), SAGA_OK);
  char *path = th_path(w->dir, strcmp(name, "orch") == 0 ? "orch.db" : "part.db");
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = name;
  cfg.db_path = path;
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.synchronous = SAGA_SYNC_OFF;
  cfg.transport = t;
  cfg.clock = w->clock;
  cfg.resend_ms = 100;
  cfg.random = seq_random;
  cfg.random_arg = &rng_state;
  int orch = strcmp(name, "orch") == 0;
  cfg.on_span = orch ? on_span_orch : on_span_part;
  cfg.span_arg = w;
  cfg.on_event = orch ? on_event_orch : on_event_part;
  cfg.event_arg = w;
  if (orch) cfg.event_channel = "trip.events";
  saga_node *n = NULL;
  char err[256];
  int rc = saga_node_open(&n, &w->loop, &cfg, err, sizeof err);
  if (rc != SAGA_OK) print_message("open %s: %s\n", name, err);
  assert_int_equal(rc, SAGA_OK);
  free(path);
  if (orch) {
    assert_int_equal(saga_node_register(n, &trip), SAGA_OK);
  } else {
    char ch[4], a[4], u[4];
    for (int i = 0; i < 3; i++) {
      snprintf(ch, sizeof ch, "c%d", i);
      snprintf(a, sizeof a, "a%d", i);
      snprintf(u, sizeof u, "u%d", i);
      assert_int_equal(saga_node_handle(n, ch, a, act, w), SAGA_OK);
      assert_int_equal(saga_node_handle(n, ch, u, undo, w), SAGA_OK);
    }
    memset(child_steps, 0, sizeof child_steps);
    child_steps[0].name = "LOCAL";
    child_steps[0].local_action = local_ok;
    child_steps[0].local_arg = w;
    child_steps[0].kind = SAGA_STEP_COMPENSATABLE;
    memset(&child_def, 0, sizeof child_def);
    child_def.struct_version = SAGA_DEFINITION_VERSION;
    child_def.name = "child";
    child_def.version = 1;
    child_def.steps = child_steps;
    child_def.nsteps = 1;
    child_def.step_size = sizeof(saga_step);
    assert_int_equal(saga_node_register(n, &child_def), SAGA_OK);
    assert_int_equal(saga_node_subscribe_events(n, "trip.events", on_remote_event, w), SAGA_OK);
  }
  assert_int_equal(saga_node_start(n, NULL), SAGA_OK);
  return n;
}

static void world_open(world *w, int with_part) {
  memset(w, 0, sizeof *w);
  the_world = w;
  w->refuse_step = -1;
  rng_state = 42;
  assert_int_equal(uv_loop_init(&w->loop), 0);
  assert_int_equal(saga_clock_manual_new(&w->clock, 1700000000000ull, NULL), SAGA_OK);
  assert_int_equal(saga_mem_hub_new(&w->hub, &w->loop, w->clock, NULL, NULL), SAGA_OK);
  w->dir = th_tmpdir();
  w->orch = open_node(w, "orch");
  if (with_part) w->part = open_node(w, "part");
}

static void close_node(world *w, saga_node **n) {
  if (*n == NULL) return;
  saga_node_close(*n, NULL, NULL);
  *n = NULL;
  th_drain(&w->loop);
}

static void world_free(world *w) {
  close_node(w, &w->orch);
  close_node(w, &w->part);
  saga_mem_hub_close(w->hub);
  th_drain(&w->loop);
  assert_int_equal(uv_loop_close(&w->loop), 0);
  saga_clock_free(w->clock);
  th_rmdir(w->dir);
  the_world = NULL;
}

static void started_cb(saga_node *n, int status, const char *id, int existed, void *arg) {
  (void)n, (void)existed;
  world *w = arg;
  w->start_status = status;
  if (status == SAGA_OK) snprintf(w->started, sizeof w->started, "%s", id);
}

static int terminal_pred(void *arg) { return ((world *)arg)->terminal >= 1; }

/* Starts "trip" (traced when tp is not NULL) and runs until it ended. */
static void run_trip(world *w, const char *tp, int spawn) {
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  if (spawn) assert_int_equal(saga_data_set_str(d, "spawn", "1"), SAGA_OK);
  w->start_status = 1;
  assert_int_equal(saga_start_traced(w->orch, "trip", d, NULL, tp, started_cb, w), SAGA_OK);
  saga_data_free(d);
  assert_int_equal(th_run_manual(&w->loop, w->clock, terminal_pred, w, 60000), 0);
  assert_int_equal(w->start_status, SAGA_OK);
}

/* The one span copy matching (node, event, kind, step, attempt); fails unless exactly one. */
static const span_copy *find(const world *w, const char *node, int event, int kind, int step,
                             uint32_t attempt) {
  const span_copy *hit = NULL;
  int n = 0;
  for (size_t i = 0; i < w->nspans; i++) {
    const span_copy *c = &w->spans[i];
    if (strcmp(c->node, node) == 0 && c->event == event && c->kind == kind &&
        c->step == step && (kind == SAGA_SPAN_SAGA || c->attempt == attempt)) {
      hit = c;
      n++;
    }
  }
  if (n != 1)
    print_error("%d spans of %s event %d kind %d step %d attempt %u\n", n, node, event, kind,
                step, attempt);
  assert_int_equal(n, 1);
  return hit;
}

static int is_hex(const char *s, size_t len) {
  if (strlen(s) != len) return 0;
  int nonzero = 0;
  for (size_t i = 0; i < len; i++) {
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    nonzero |= s[i] != '0';
  }
  return nonzero;
}

/* The end of span `start` (same id), checked to match it. */
static const span_copy *end_of(const world *w, const span_copy *start) {
  const span_copy *e = find(w, start->node, SAGA_SPAN_END, start->kind, start->step,
                            start->attempt);
  assert_string_equal(e->span, start->span);
  assert_string_equal(e->parent, start->parent);
  assert_string_equal(e->trace, start->trace);
  assert_string_equal(e->name, start->name);
  assert_true(e->start == start->start);
  assert_true(e->end >= e->start);
  assert_true(start->end == 0 && start->status == SAGA_SPAN_UNSET);
  return e;
}

/* The command and reply contexts: "00-<trace>-<span>-<flags>". */
static void expect_tp(const char *tp, const char *trace, const char *span, const char *flags) {
  char want[64];
  snprintf(want, sizeof want, "00-%s-%s-%s", trace, span, flags);
  assert_string_equal(tp, want);
  assert_int_equal(saga_traceparent_check(tp, NULL), SAGA_OK);
}

static const seen_cmd *seen_of(const world *w, const char *command) {
  for (size_t i = 0; i < w->nseen; i++)
    if (strcmp(w->seen[i].command, command) == 0) return &w->seen[i];
  print_error("no handler saw %s\n", command);
  fail();
  return NULL;
}

/* The traceparent of the reply the participant recorded for the command whose id starts with
 * "<saga>/<step>/<phase>/". */
static void reply_tp(world *w, const char *saga, int step, int phase, char *out, size_t len) {
  sqlite3 *db = saga_node_db(w->part);
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, "SELECT reply FROM saga_inbox WHERE msg_id LIKE ?1",
                                      -1, &st, NULL),
                   SQLITE_OK);
  char like[128];
  snprintf(like, sizeof like, "%s/%d/%d/%%", saga, step, phase);
  sqlite3_bind_text(st, 1, like, -1, SQLITE_TRANSIENT);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  saga_envelope *env = NULL;
  char err[200];
  assert_int_equal(saga_envelope_decode(sqlite3_column_blob(st, 0),
                                        (size_t)sqlite3_column_bytes(st, 0), NULL, NULL, &env,
                                        err, sizeof err),
                   SAGA_OK);
  const char *tp = saga_envelope_header(env, "traceparent");
  snprintf(out, len, "%s", tp ? tp : "");
  saga_envelope_free(env);
  sqlite3_finalize(st);
}

/* ---- the strict check ----------------------------------------------------------------------- */

static void test_traceparent_check(void **state) {
  (void)state;
  const char *good[] = {
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
      "00-00000000000000000000000000000001-0000000000000001-ff",
  };
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
    assert_int_equal(saga_traceparent_check(good[i], NULL), SAGA_OK);
  const char *bad[] = {
      "",
      "00",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",       /* short */
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011",     /* long */
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",    /* trailing */
      "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",      /* version */
      "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",      /* invalid version */
      "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",      /* uppercase */
      "00-00000000000000000000000000000000-00f067aa0ba902b7-01",      /* zero trace */
      "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",      /* zero parent */
      "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",      /* separator */
      "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",      /* separator */
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",      /* separator */
      "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",      /* not hex */
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba9 2b7-01",      /* not hex */
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",      /* flags */
      " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",     /* leading space */
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    const char *why = NULL;
    if (saga_traceparent_check(bad[i], &why) != SAGA_EINVAL)
      print_error("accepted '%s'\n", bad[i]);
    assert_int_equal(saga_traceparent_check(bad[i], &why), SAGA_EINVAL);
    assert_non_null(why);
    assert_true(why[0] != '\0');
  }
  assert_int_equal(saga_traceparent_check(NULL, NULL), SAGA_EINVAL);
  assert_string_equal(saga_span_kind_name(SAGA_SPAN_HANDLER), "handler");
  assert_string_equal(saga_span_kind_name(99), "unknown");
}

/* A malformed traceparent refuses the start: SAGA_EINVAL, a message, no saga, no callback. */
static void test_start_malformed_refused(void **state) {
  (void)state;
  world w;
  world_open(&w, 1);
  w.start_status = 1;
  int rc = saga_start_traced(w.orch, "trip", NULL, "k",
                             "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", started_cb,
                             &w);
  assert_int_equal(rc, SAGA_EINVAL);
  assert_non_null(strstr(saga_node_errmsg(w.orch), "malformed"));
  assert_non_null(strstr(saga_node_errmsg(w.orch), "lowercase"));
  th_run_manual(&w.loop, w.clock, terminal_pred, &w, 2000);
  assert_int_equal(w.start_status, 1); /* never called */
  int64_t counts[6];
  assert_int_equal(saga_node_count_by_state(w.orch, counts), SAGA_OK);
  for (int s = 1; s <= 5; s++) assert_int_equal(counts[s], 0);
  assert_int_equal(w.nspans, 0);
  world_free(&w);
}

/* ---- a saga that completes ------------------------------------------------------------------ */

#define CALLER_TRACE "4bf92f3577b34da6a3ce929d0e0e4736"
#define CALLER_SPAN "00f067aa0ba902b7"
#define CALLER_TP "00-" CALLER_TRACE "-" CALLER_SPAN "-01"

static int remote_pred(void *arg) { return ((world *)arg)->remote_tp[0] != '\0'; }

static void test_spans_completed(void **state) {
  (void)state;
  world w;
  world_open(&w, 1);
  run_trip(&w, CALLER_TP, 0);
  /* The saga's span: in the caller's trace, a child of the caller's span. */
  const span_copy *root = find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_SAGA, -1, 0);
  assert_string_equal(root->trace, CALLER_TRACE);
  assert_string_equal(root->parent, CALLER_SPAN);
  assert_true(is_hex(root->span, 16));
  assert_string_equal(root->name, "trip");
  assert_string_equal(root->def, "trip");
  assert_string_equal(root->saga, w.started);
  assert_int_equal(root->flags, 1);
  const span_copy *root_end = end_of(&w, root);
  assert_int_equal(root_end->status, SAGA_SPAN_OK);
  assert_string_equal(root_end->error, "");
  /* The saga's own events carry its context, also as published to other nodes. */
  expect_tp(w.event_tp, CALLER_TRACE, root->span, "01");
  assert_int_equal(th_run_manual(&w.loop, w.clock, remote_pred, &w, 10000), 0);
  expect_tp(w.remote_tp, CALLER_TRACE, root->span, "01");
  char seen_ids[8][24];
  for (int k = 0; k < 3; k++) {
    /* One attempt per step, a child of the saga's span ... */
    const span_copy *st = find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_STEP, k, 1);
    assert_string_equal(st->trace, CALLER_TRACE);
    assert_string_equal(st->parent, root->span);
    assert_true(is_hex(st->span, 16));
    char name[32];
    snprintf(name, sizeof name, "trip/a%d", k);
    assert_string_equal(st->name, name);
    const span_copy *st_end = end_of(&w, st);
    assert_int_equal(st_end->status, SAGA_SPAN_OK);
    /* ... whose command named it as the parent ... */
    char cmd[4];
    snprintf(cmd, sizeof cmd, "a%d", k);
    const seen_cmd *sc = seen_of(&w, cmd);
    expect_tp(sc->header, CALLER_TRACE, st->span, "01");
    /* ... of the handler's span on the participant, whose context the handler sees ... */
    const span_copy *h = find(&w, "part", SAGA_SPAN_START, SAGA_SPAN_HANDLER, k, 1);
    assert_string_equal(h->trace, CALLER_TRACE);
    assert_string_equal(h->parent, st->span);
    assert_string_equal(h->name, cmd);
    assert_string_equal(h->def, "");
    assert_string_equal(h->saga, w.started);
    const span_copy *h_end = end_of(&w, h);
    assert_int_equal(h_end->status, SAGA_SPAN_OK);
    expect_tp(sc->context, CALLER_TRACE, h->span, "01");
    /* ... and which the reply names. */
    char rtp[128];
    reply_tp(&w, w.started, k, SAGA_PHASE_ACTION, rtp, sizeof rtp);
    expect_tp(rtp, CALLER_TRACE, h->span, "01");
    /* the handler ran within its attempt */
    assert_true(h->start >= st->start && h_end->end <= st_end->end);
    snprintf(seen_ids[2 * k], sizeof seen_ids[0], "%s", st->span);
    snprintf(seen_ids[2 * k + 1], sizeof seen_ids[0], "%s", h->span);
  }
  snprintf(seen_ids[6], sizeof seen_ids[0], "%s", root->span);
  for (int a = 0; a < 7; a++)
    for (int b = a + 1; b < 7; b++) assert_string_not_equal(seen_ids[a], seen_ids[b]);
  /* 1 saga + 3 attempts + 3 handlers, each a start and an end: nothing else. */
  assert_int_equal(w.nspans, 14);
  world_free(&w);
}

/* Without a traceparent the trace id is the saga id and the saga's span is a root; a caller's
 * flags are kept. */
static void test_spans_untraced(void **state) {
  (void)state;
  world w;
  world_open(&w, 1);
  run_trip(&w, NULL, 0);
  const span_copy *root = find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_SAGA, -1, 0);
  assert_string_equal(root->trace, w.started);
  assert_string_equal(root->parent, "");
  assert_int_equal(root->flags, 1);
  const span_copy *h = find(&w, "part", SAGA_SPAN_START, SAGA_SPAN_HANDLER, 1, 1);
  assert_string_equal(h->trace, w.started);
  world_free(&w);

  world_open(&w, 1);
  run_trip(&w, "00-" CALLER_TRACE "-" CALLER_SPAN "-00", 0); /* not sampled */
  root = find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_SAGA, -1, 0);
  assert_int_equal(root->flags, 0);
  const seen_cmd *sc = seen_of(&w, "a1");
  assert_string_equal(sc->header + 53, "00");
  assert_string_equal(sc->context + 53, "00");
  world_free(&w);
}

/* ---- a saga that compensates ---------------------------------------------------------------- */

static void test_spans_compensated(void **state) {
  (void)state;
  world w;
  world_open(&w, 1);
  w.refuse_step = 2;
  run_trip(&w, CALLER_TP, 0);
  const span_copy *root = find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_SAGA, -1, 0);
  const span_copy *root_end = end_of(&w, root);
  assert_int_equal(root_end->status, SAGA_SPAN_REFUSED);
  assert_non_null(strstr(root_end->error, "no way"));
  /* The refused attempt and its handler: refused, with the reason. */
  const span_copy *st = find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_STEP, 2, 1);
  const span_copy *st_end = end_of(&w, st);
  assert_int_equal(st_end->status, SAGA_SPAN_REFUSED);
  assert_string_equal(st_end->error, "no way");
  const span_copy *h = find(&w, "part", SAGA_SPAN_START, SAGA_SPAN_HANDLER, 2, 1);
  assert_string_equal(h->parent, st->span);
  const span_copy *h_end = end_of(&w, h);
  assert_int_equal(h_end->status, SAGA_SPAN_REFUSED);
  assert_string_equal(h_end->error, "no way");
  /* Steps 1 and 0 are compensated: an attempt each, children of the saga's span, with the
   * participant's handler span under each; the refused step 2 is not. */
  for (int k = 0; k < 2; k++) {
    const span_copy *c = find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_COMPENSATION, k, 1);
    assert_string_equal(c->parent, root->span);
    assert_string_equal(c->trace, CALLER_TRACE);
    char name[48];
    snprintf(name, sizeof name, "trip/compensate a%d", k);
    assert_string_equal(c->name, name);
    assert_int_equal(end_of(&w, c)->status, SAGA_SPAN_OK);
    char cmd[4];
    snprintf(cmd, sizeof cmd, "u%d", k);
    const span_copy *hc = NULL;
    for (size_t i = 0; i < w.nspans; i++)
      if (w.spans[i].kind == SAGA_SPAN_HANDLER && w.spans[i].event == SAGA_SPAN_START &&
          strcmp(w.spans[i].name, cmd) == 0)
        hc = &w.spans[i];
    assert_non_null(hc);
    assert_string_equal(hc->parent, c->span);
    expect_tp(seen_of(&w, cmd)->header, CALLER_TRACE, c->span, "01");
    char rtp[128];
    reply_tp(&w, w.started, k, SAGA_PHASE_COMPENSATION, rtp, sizeof rtp);
    expect_tp(rtp, CALLER_TRACE, hc->span, "01");
  }
  for (size_t i = 0; i < w.nspans; i++)
    assert_false(w.spans[i].kind == SAGA_SPAN_COMPENSATION && w.spans[i].step == 2);
  /* saga 2 + step attempts 6 + handlers 6 + compensations 4 + their handlers 4 */
  assert_int_equal(w.nspans, 22);
  world_free(&w);
}

/* ---- saga_tx_start: the handler's trace ------------------------------------------------------ */

static int child_pred(void *arg) { return ((world *)arg)->child_done >= 1; }

static void test_tx_start_inherits(void **state) {
  (void)state;
  world w;
  world_open(&w, 1);
  run_trip(&w, CALLER_TP, 1);
  assert_int_equal(th_run_manual(&w.loop, w.clock, child_pred, &w, 60000), 0);
  const span_copy *h = NULL; /* the handler of trip's step 0 (the child's local one is too) */
  for (size_t i = 0; i < w.nspans; i++)
    if (w.spans[i].kind == SAGA_SPAN_HANDLER && w.spans[i].event == SAGA_SPAN_START &&
        strcmp(w.spans[i].saga, w.started) == 0 && w.spans[i].step == 0)
      h = &w.spans[i];
  assert_non_null(h);
  expect_tp(seen_of(&w, "a0")->context, CALLER_TRACE, h->span, "01");
  const span_copy *child = NULL;
  for (size_t i = 0; i < w.nspans; i++)
    if (w.spans[i].kind == SAGA_SPAN_SAGA && strcmp(w.spans[i].node, "part") == 0 &&
        w.spans[i].event == SAGA_SPAN_START)
      child = &w.spans[i];
  assert_non_null(child);
  assert_string_equal(child->name, "child");
  assert_string_equal(child->trace, CALLER_TRACE);
  assert_string_equal(child->parent, h->span); /* a child of the handler's span */
  /* its local step: an attempt under it, the local handler's span under that */
  const span_copy *st = find(&w, "part", SAGA_SPAN_START, SAGA_SPAN_STEP, 0, 1);
  assert_string_equal(st->parent, child->span);
  assert_string_equal(st->name, "child/LOCAL");
  const span_copy *lh = NULL;
  for (size_t i = 0; i < w.nspans; i++)
    if (w.spans[i].kind == SAGA_SPAN_HANDLER && w.spans[i].event == SAGA_SPAN_START &&
        strcmp(w.spans[i].saga, child->saga) == 0)
      lh = &w.spans[i];
  assert_non_null(lh);
  assert_string_equal(lh->parent, st->span);
  assert_string_equal(lh->trace, CALLER_TRACE);
  world_free(&w);
}

/* ---- a restart of the orchestrator ---------------------------------------------------------- */

static int command_out_pred(void *arg) {
  world *w = arg;
  for (size_t i = 0; i < w->nspans; i++)
    if (w->spans[i].kind == SAGA_SPAN_STEP && w->spans[i].event == SAGA_SPAN_START) return 1;
  return 0;
}

/* The orchestrator is closed while step 0's command waits for its participant (not running
 * yet), and opened again on the same database: the saga keeps the caller's trace, the attempt
 * started before the restart ends after it with the same span id, and every span after the
 * restart points to the saga's span. */
static void test_restart_keeps_context(void **state) {
  (void)state;
  world w;
  world_open(&w, 0);
  w.start_status = 1;
  assert_int_equal(saga_start_traced(w.orch, "trip", NULL, "key-1", CALLER_TP, started_cb, &w),
                   SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, command_out_pred, &w, 10000), 0);
  assert_int_equal(w.start_status, SAGA_OK);
  span_copy root = *find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_SAGA, -1, 0);
  span_copy st0 = *find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_STEP, 0, 1);
  close_node(&w, &w.orch);
  w.nspans = 0;
  w.orch = open_node(&w, "orch");
  w.part = open_node(&w, "part");
  assert_int_equal(th_run_manual(&w.loop, w.clock, terminal_pred, &w, 60000), 0);
  /* the attempt in flight across the restart ends with the id and start it had */
  const span_copy *st0_end = find(&w, "orch", SAGA_SPAN_END, SAGA_SPAN_STEP, 0, 1);
  assert_string_equal(st0_end->span, st0.span);
  assert_string_equal(st0_end->parent, root.span);
  assert_string_equal(st0_end->trace, CALLER_TRACE);
  assert_true(st0_end->start == st0.start);
  assert_int_equal(st0_end->status, SAGA_SPAN_OK);
  /* its handler ran after the restart, under it */
  const span_copy *h = find(&w, "part", SAGA_SPAN_START, SAGA_SPAN_HANDLER, 0, 1);
  assert_string_equal(h->parent, st0.span);
  assert_string_equal(h->trace, CALLER_TRACE);
  /* later attempts and the saga's end: the same trace, parent and saga span */
  for (int k = 1; k < 3; k++) {
    const span_copy *st = find(&w, "orch", SAGA_SPAN_START, SAGA_SPAN_STEP, k, 1);
    assert_string_equal(st->parent, root.span);
    assert_string_equal(st->trace, CALLER_TRACE);
    end_of(&w, st);
  }
  const span_copy *root_end = find(&w, "orch", SAGA_SPAN_END, SAGA_SPAN_SAGA, -1, 0);
  assert_string_equal(root_end->span, root.span);
  assert_string_equal(root_end->parent, CALLER_SPAN);
  assert_string_equal(root_end->trace, CALLER_TRACE);
  assert_true(root_end->start == root.start);
  world_free(&w);
}

/* ---- hostile traceparents from the network ---------------------------------------------------- */

typedef struct raw_sender {
  saga_transport *t;
  saga__transport_host host;
  int closed;
  size_t confirmed;
} raw_sender;

static int raw_deliver(void *ctx, const char *ch, const void *d, size_t len, uint64_t tag) {
  (void)ch, (void)d, (void)len;
  raw_sender *r = ctx;
  r->t->methods->ack(r->t, tag);
  return SAGA_OK;
}
static void raw_sent(void *ctx, uint64_t token, int status) {
  (void)token;
  if (status == SAGA_OK) ((raw_sender *)ctx)->confirmed++;
}
static void raw_closed(void *ctx) { ((raw_sender *)ctx)->closed = 1; }
static void raw_log(void *ctx, saga_log_level level, const char *msg) {
  (void)ctx, (void)level, (void)msg;
}

static size_t want_confirmed;
static int confirmed_pred(void *arg) { return ((raw_sender *)arg)->confirmed >= want_confirmed; }

/* Commands whose traceparent is missing, malformed or huge: each handled, the handler's span
 * in the saga's own trace (the saga id) without a parent, its context valid, the reply's
 * traceparent valid and naming the handler's span; never the malformed value. */
static void test_malformed_from_wire(void **state) {
  (void)state;
  world w;
  world_open(&w, 1);
  raw_sender r;
  memset(&r, 0, sizeof r);
  assert_int_equal(saga_mem_transport_new(&r.t, w.hub), SAGA_OK);
  r.host.deliver = raw_deliver;
  r.host.sent = raw_sent;
  r.host.closed = raw_closed;
  r.host.log = raw_log;
  r.host.ctx = &r;
  r.t->saga__host = &r.host;
  assert_int_equal(r.t->methods->open(r.t, &w.loop), SAGA_OK);
  assert_int_equal(r.t->methods->subscribe(r.t, "mallory"), SAGA_OK);
  static char huge[1001];
  memset(huge, 'a', sizeof huge - 1);
  memcpy(huge, "00-", 3);
  const char *values[] = {
      NULL, /* no header */
      "",
      "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
      "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
      "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
      huge,
  };
  size_t nv = sizeof values / sizeof values[0];
  char sagas[16][40];
  for (size_t i = 0; i < nv; i++) {
    snprintf(sagas[i], sizeof sagas[i], "0123456789abcdef0123456789ab%04zx", i + 1);
    char msg_id[96];
    snprintf(msg_id, sizeof msg_id, "%.39s/0/0/1/0000000000000000", sagas[i]);
    saga_header hdr = {"traceparent", values[i]};
    saga_envelope e;
    memset(&e, 0, sizeof e);
    e.version = SAGA_ENVELOPE_VERSION;
    e.kind = SAGA_MSG_COMMAND;
    e.msg_id = msg_id;
    e.saga_id = sagas[i];
    e.attempt = 1;
    e.name = "a0";
    e.reply_to = "mallory";
    e.headers = &hdr;
    e.nheaders = values[i] != NULL ? 1 : 0;
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(saga_envelope_encode(&e, NULL, &buf, &len), SAGA_OK);
    assert_int_equal(r.t->methods->send(r.t, "c0", buf, len, i + 1), SAGA_OK);
    saga_free(NULL, buf);
  }
  want_confirmed = nv;
  assert_int_equal(th_run_manual(&w.loop, w.clock, confirmed_pred, &r, 10000), 0);
  assert_int_equal(w.nseen, nv);
  for (size_t i = 0; i < nv; i++) {
    const span_copy *h = NULL;
    for (size_t k = 0; k < w.nspans; k++)
      if (w.spans[k].event == SAGA_SPAN_START && strcmp(w.spans[k].saga, sagas[i]) == 0)
        h = &w.spans[k];
    assert_non_null(h);
    assert_int_equal(h->kind, SAGA_SPAN_HANDLER);
    assert_string_equal(h->trace, sagas[i]); /* the saga's own trace */
    assert_string_equal(h->parent, "");      /* no parent: the header was not used */
    assert_true(is_hex(h->span, 16));
    expect_tp(w.seen[i].context, sagas[i], h->span, "01");
    char rtp[128];
    reply_tp(&w, sagas[i], 0, SAGA_PHASE_ACTION, rtp, sizeof rtp);
    expect_tp(rtp, sagas[i], h->span, "01");
  }
  r.t->methods->close(r.t);
  th_drain(&w.loop);
  assert_true(r.closed);
  r.t->methods->destroy(r.t);
  world_free(&w);
}

/* A config without the hook (or one of version 4, which has none) reports nothing and the
 * messages still carry their traceparent. */
static void test_no_hook(void **state) {
  (void)state;
  world w;
  world_open(&w, 1);
  /* reopen orch without a hook */
  close_node(&w, &w.orch);
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w.hub), SAGA_OK);
  char *path = th_path(w.dir, "orch.db");
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.struct_version = 4;
  cfg.name = "orch";
  cfg.db_path = path;
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.transport = t;
  cfg.clock = w.clock;
  cfg.on_event = on_event_orch;
  cfg.event_arg = &w;
  cfg.on_span = on_span_orch; /* past a version-4 config: never read */
  cfg.span_arg = &w;
  char err[256];
  assert_int_equal(saga_node_open(&w.orch, &w.loop, &cfg, err, sizeof err), SAGA_OK);
  free(path);
  assert_int_equal(saga_node_register(w.orch, &trip), SAGA_OK);
  assert_int_equal(saga_node_start(w.orch, NULL), SAGA_OK);
  run_trip(&w, CALLER_TP, 0);
  for (size_t i = 0; i < w.nspans; i++) assert_string_equal(w.spans[i].node, "part");
  const span_copy *h = find(&w, "part", SAGA_SPAN_START, SAGA_SPAN_HANDLER, 0, 1);
  assert_string_equal(h->trace, CALLER_TRACE);
  assert_int_equal(saga_traceparent_check(seen_of(&w, "a2")->header, NULL), SAGA_OK);
  world_free(&w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_traceparent_check),  cmocka_unit_test(test_start_malformed_refused),
      cmocka_unit_test(test_spans_completed),    cmocka_unit_test(test_spans_untraced),
      cmocka_unit_test(test_spans_compensated),  cmocka_unit_test(test_tx_start_inherits),
      cmocka_unit_test(test_restart_keeps_context), cmocka_unit_test(test_malformed_from_wire),
      cmocka_unit_test(test_no_hook),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
