/*
 * The orchestrator's state machine, cell by cell, over the in-memory store (tests/mem_store.c):
 * no database, no node, no transport. Each test builds an environment (manual clock,
 * deterministic randomness), a journal and an engine, and drives the engine's entry points
 * between store transactions as the node does. Commands are read back from the outbox and
 * answered by the test.
 *
 * The machine has 7 modes x 6 events = 42 cells. Every cell has one scenario below
 * (test_cell, one cmocka test per cell): it brings a saga into the mode, asserts it is there,
 * fires the event and checks the instance, the command written (or none) and the history
 * rows recorded. Cells where the event does not apply are checked to change nothing (a reply
 * is counted stale, a cancel gives SAGA_ESTATE, a due timer is cleared). Some cells cannot be
 * reached through any entry point, because the event is derived from the mode itself (a due
 * timer is a backoff end exactly when the saga backs off, a timeout otherwise): for those the
 * scenario checks that derivation and that the nearest outside trigger (a late undeliverable
 * notice, an early timer) changes nothing. test_all_cells_covered, run last, asserts that
 * all 42 scenarios ran and passed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/engine.h"
#include "mem_store.h"

#define T0 UINT64_C(1000000) /* clock origin: times below are offsets from it */
#define MAX_CMDS 128

/* The test's own statement of the modes and events of the machine (its specification). */
enum {
  T_ACT_WAIT,
  T_ACT_BACKOFF,
  T_RES_WAIT,
  T_RES_BACKOFF,
  T_COMP_WAIT,
  T_COMP_BACKOFF,
  T_DONE,
  T_MODES
};
enum { T_OK, T_FAIL, T_TIMEOUT, T_BACKOFF_END, T_CANCEL, T_DEADLINE, T_EVENTS };

static const char *const mode_names[T_MODES] = {
    "ACT_WAIT", "ACT_BACKOFF", "RES_WAIT", "RES_BACKOFF", "COMP_WAIT", "COMP_BACKOFF", "DONE"};
static const char *const event_names[T_EVENTS] = {"OK",          "FAIL",   "TIMEOUT",
                                                  "BACKOFF_END", "CANCEL", "DEADLINE"};

/* The mode of a stored instance, from its state, phase and wait columns. */
static int mode_of(const saga__inst *i) {
  int backoff = i->wait == SAGA__WAIT_BACKOFF;
  switch (i->state) {
  case SAGA_RUNNING:
    if (i->phase == SAGA_PHASE_RESOLVE) return backoff ? T_RES_BACKOFF : T_RES_WAIT;
    return backoff ? T_ACT_BACKOFF : T_ACT_WAIT;
  case SAGA_COMPENSATING:
    return backoff ? T_COMP_BACKOFF : T_COMP_WAIT;
  default:
    return T_DONE;
  }
}

/* ---- definitions -------------------------------------------------------------------------- */

#define R_ONCE                                                                                     \
  { .max_attempts = 1, .backoff_ms = 500, .multiplier = 1 }
#define R_TWICE                                                                                    \
  { .max_attempts = 2, .backoff_ms = 500, .multiplier = 1, .retry_before_compensate = 1 }
#define R_COMP                                                                                     \
  { .max_attempts = 2, .backoff_ms = 500, .multiplier = 1 }
#define R_EVER                                                                                     \
  { .backoff_ms = 500, .multiplier = 1 }

#define CSTEP(n, retry_, timeout)                                                                  \
  {                                                                                                \
    .name = "s" #n, .channel = "ch" #n, .action = "do" #n, .compensation = "undo" #n,              \
    .kind = SAGA_STEP_COMPENSATABLE, .retry = retry_, .timeout_ms = timeout,                       \
    .compensation_retry = R_COMP                                                                   \
  }
#define PSTEP(n, timeout)                                                                          \
  {                                                                                                \
    .name = "s" #n, .channel = "ch" #n, .action = "do" #n, .kind = SAGA_STEP_PIVOT,                \
    .retry = R_ONCE, .timeout_ms = timeout                                                         \
  }
#define RSTEP(n, timeout)                                                                          \
  {                                                                                                \
    .name = "s" #n, .channel = "ch" #n, .action = "do" #n, .kind = SAGA_STEP_RETRIABLE,            \
    .retry = R_EVER, .timeout_ms = timeout                                                         \
  }

/* lin: three compensatable steps, each retried once (also after a refusal). */
static const saga_step lin_steps[] = {CSTEP(0, R_TWICE, 1000), CSTEP(1, R_TWICE, 1000),
                                      CSTEP(2, R_TWICE, 1000)};
/* once: three compensatable steps, one attempt each. */
static const saga_step once_steps[] = {CSTEP(0, R_ONCE, 1000), CSTEP(1, R_ONCE, 1000),
                                       CSTEP(2, R_ONCE, 1000)};
/* dl: a saga deadline (3 s) before a pivot. */
static const saga_step dl_steps[] = {CSTEP(0, R_TWICE, 10000), CSTEP(1, R_TWICE, 10000),
                                     PSTEP(2, 10000)};
/* piv: a compensatable step, the pivot, a retriable step. */
static const saga_step piv_steps[] = {CSTEP(0, R_ONCE, 1000), PSTEP(1, 1000), RSTEP(2, 1000)};
/* piv0: the pivot first, so that the saga deadline outlives it. */
static const saga_step piv0_steps[] = {PSTEP(0, 1000), RSTEP(1, 1000)};
static const saga_step piv0_slow_steps[] = {PSTEP(0, 2000), RSTEP(1, 1000)};

#define DEF(nm, steps_, deadline)                                                                  \
  {                                                                                                \
    .struct_version = SAGA_DEFINITION_VERSION, .name = nm, .version = 1, .steps = steps_,          \
    .nsteps = sizeof steps_ / sizeof steps_[0], .deadline_ms = deadline                            \
  }

static const saga_definition defs[] = {
    DEF("lin", lin_steps, 0),
    DEF("once", once_steps, 0),
    DEF("dl", dl_steps, 3000),
    DEF("piv", piv_steps, 0),
    DEF("piv0a", piv0_steps, 1500),      /* deadline while resolving */
    DEF("piv0b", piv0_steps, 2200),      /* deadline while backing off a resolve */
    DEF("piv0c", piv0_slow_steps, 1500), /* deadline while the pivot runs */
};

/* ---- the fixture -------------------------------------------------------------------------- */

typedef struct fx {
  saga__env env;
  saga__journal j;
  saga__engine e;
  saga__store *s;
  saga_clock *clock;
  uint64_t rng;
  saga_envelope *cmds[MAX_CMDS]; /* every command written, oldest first */
  char chan[MAX_CMDS][32];       /* and the channel it was written to */
  size_t ncmds, new_cmds;        /* new_cmds: written by the last transaction */
  char id[40];                   /* the saga under test */
  saga__inst cur;                /* its row, as last loaded */
  /* Taken by enter(): the state before the event under test. */
  saga__inst before;
  size_t h0;
  int64_t w0;
  uint64_t d0;
  saga_node_stats st0;
  int entered, fired; /* the mode entered and the event fired (-1 = none yet) */
} fx;

static uint64_t fx_random(void *arg) { return saga__splitmix64((uint64_t *)arg); }

static fx *fx_open(void) {
  fx *f = calloc(1, sizeof *f);
  assert_non_null(f);
  assert_int_equal(mem_store_new(&f->s), SAGA_OK);
  assert_int_equal(saga_clock_manual_new(&f->clock, T0, NULL), SAGA_OK);
  saga__env_init(&f->env, NULL);
  f->env.store = f->s;
  f->env.clock = f->clock;
  f->rng = 42;
  f->env.random = fx_random;
  f->env.random_arg = &f->rng;
  saga__journal_init(&f->j, &f->env);
  saga__engine_init(&f->e, &f->env, &f->j, "orch");
  f->e.reply_key[0] = UINT64_C(0x0123456789abcdef);
  f->e.reply_key[1] = UINT64_C(0xfedcba9876543210);
  for (size_t k = 0; k < sizeof defs / sizeof defs[0]; k++)
    assert_int_equal(saga__engine_register(&f->e, &defs[k]), SAGA_OK);
  saga__inst_init(&f->cur, NULL);
  saga__inst_init(&f->before, NULL);
  f->entered = f->fired = -1;
  return f;
}

static void fx_close(fx *f) {
  assert_int_equal(f->s->m->in_tx(f->s), 0);
  for (size_t k = 0; k < f->ncmds; k++) saga_envelope_free(f->cmds[k]);
  saga__inst_free(&f->cur);
  saga__inst_free(&f->before);
  saga__engine_free(&f->e);
  saga__journal_free(&f->j);
  f->s->m->close(f->s);
  saga_clock_free(f->clock);
  free(f);
}

/* Moves the clock to T0 + t. */
static void at(fx *f, uint64_t t) {
  uint64_t now = saga_clock_now(f->clock);
  assert_true(T0 + t >= now);
  assert_int_equal(saga_clock_advance(f->clock, T0 + t - now), SAGA_OK);
}

/* Reads the outbox rows written since the last call (decoded into cmds), then empties the
 * outbox. */
static void collect(fx *f) {
  size_t n = mem_store_outbox_rows(f->s);
  f->new_cmds = n;
  for (size_t k = 0; k < n; k++) {
    const char *channel = NULL;
    const void *body = NULL;
    size_t len = 0;
    assert_int_equal(mem_store_outbox_row(f->s, k, NULL, &channel, NULL, &body, &len), SAGA_OK);
    saga_envelope *env = NULL;
    char err[200] = "";
    int rc = saga_envelope_decode(body, len, NULL, NULL, &env, err, sizeof err);
    if (rc != SAGA_OK) fail_msg("outbox row %zu does not decode: %s", k, err);
    assert_true(f->ncmds < MAX_CMDS);
    snprintf(f->chan[f->ncmds], sizeof f->chan[0], "%s", channel);
    f->cmds[f->ncmds++] = env;
  }
  mem_store_outbox_clear(f->s);
}

static const saga_envelope *last_cmd(fx *f) {
  assert_true(f->ncmds > 0);
  return f->cmds[f->ncmds - 1];
}

/* A transaction around one call, as the node runs it: BEGIN, journal begin, the call, journal
 * finish, COMMIT — or ROLLBACK when anything failed. */
static void tx_begin(fx *f) {
  assert_int_equal(f->s->m->begin(f->s), SAGA_OK);
  saga__journal_begin(&f->j);
}

static int tx_end(fx *f, int rc) {
  if (rc == SAGA_OK) rc = saga__journal_finish(&f->j);
  if (rc == SAGA_OK) rc = f->s->m->commit(f->s);
  if (rc == SAGA_OK) saga__engine_stats_commit(&f->e);
  if (rc != SAGA_OK && f->s->m->in_tx(f->s)) assert_int_equal(f->s->m->rollback(f->s), SAGA_OK);
  saga__journal_clear_events(&f->j);
  assert_int_equal(f->s->m->in_tx(f->s), 0);
  collect(f);
  return rc;
}

static void load(fx *f) { assert_int_equal(f->s->m->inst_load(f->s, f->id, &f->cur), SAGA_OK); }

/* ---- entry points, each in its own transaction -------------------------------------------- */

static int start_key(fx *f, const char *def_name, const void *input, size_t len, const char *key,
                     char id[40], int *existed) {
  const saga__def *d = saga__engine_find(&f->e, def_name, 0);
  assert_non_null(d);
  tx_begin(f);
  return tx_end(f, saga__engine_start(&f->e, d, input, len, key, NULL, id, existed));
}

/* Starts the saga under test and checks its first command. */
static void start(fx *f, const char *def_name) {
  int existed = -1;
  assert_int_equal(start_key(f, def_name, NULL, 0, NULL, f->id, &existed), SAGA_OK);
  assert_int_equal(existed, 0);
  assert_int_equal(f->new_cmds, 1);
  load(f);
  assert_int_equal(f->cur.state, SAGA_RUNNING);
  assert_int_equal(f->cur.step, 0);
  assert_int_equal(f->cur.attempt, 1);
  assert_int_equal(f->cur.wait, SAGA__WAIT_REPLY);
}

static int reply_with(fx *f, const saga_envelope *cmd, int status, const char *error,
                      const void *payload, size_t len) {
  char msg_id[200];
  snprintf(msg_id, sizeof msg_id, "%s/r", cmd->msg_id);
  saga_envelope r;
  memset(&r, 0, sizeof r);
  r.version = SAGA_ENVELOPE_VERSION;
  r.kind = SAGA_MSG_REPLY;
  r.msg_id = msg_id;
  r.saga_id = cmd->saga_id;
  r.step = cmd->step;
  r.attempt = cmd->attempt;
  r.phase = cmd->phase;
  r.name = cmd->name;
  r.status = status;
  r.error = error != NULL ? error : "";
  r.payload = payload;
  r.payload_len = len;
  tx_begin(f);
  return tx_end(f, saga__engine_reply(&f->e, &r));
}

static int reply_to(fx *f, const saga_envelope *cmd, int status, const char *error) {
  return reply_with(f, cmd, status, error, NULL, 0);
}

/* Answers the latest command. */
static int reply(fx *f, int status, const char *error) {
  return reply_to(f, last_cmd(f), status, error);
}

static int ok(fx *f) { return reply(f, 0, NULL); }
static int refuse(fx *f, const char *why) { return reply(f, SAGA_EREFUSED, why); }

/* Runs the timers due at T0 + t (the clock moves there). */
static size_t due_max(fx *f, uint64_t t, size_t max) {
  at(f, t);
  size_t processed = 99;
  tx_begin(f);
  assert_int_equal(tx_end(f, saga__engine_due(&f->e, saga_clock_now(f->clock), max, &processed)),
                   SAGA_OK);
  return processed;
}
static size_t due(fx *f, uint64_t t) { return due_max(f, t, 16); }

static int cancel(fx *f) {
  tx_begin(f);
  return tx_end(f, saga__engine_cancel(&f->e, f->id));
}

static int retry(fx *f) {
  tx_begin(f);
  return tx_end(f, saga__engine_retry(&f->e, f->id));
}

static int undeliverable(fx *f, const saga_envelope *cmd, int code, const char *reason) {
  tx_begin(f);
  return tx_end(f, saga__engine_undeliverable(&f->e, cmd, code, reason));
}

/* Edits the stored row of the saga under test behind the engine's back (in a transaction of
 * the store alone): deadlines and wait as a crash, an older version or a bug might leave
 * them. -1 keeps a value; deadlines are offsets from T0 (0 = none). */
static void inject(fx *f, int64_t step_deadline, int64_t saga_deadline, int wait) {
  assert_int_equal(f->s->m->begin(f->s), SAGA_OK);
  load(f);
  if (step_deadline >= 0) f->cur.step_deadline = step_deadline ? T0 + (uint64_t)step_deadline : 0;
  if (saga_deadline >= 0) f->cur.saga_deadline = saga_deadline ? T0 + (uint64_t)saga_deadline : 0;
  if (wait >= 0) f->cur.wait = wait;
  assert_int_equal(f->s->m->inst_save(f->s, &f->cur), SAGA_OK);
  assert_int_equal(f->s->m->commit(f->s), SAGA_OK);
}

/* ---- checks ------------------------------------------------------------------------------- */

static void copy_inst(saga__inst *dst, const saga__inst *src) {
  saga__buf data = dst->data;
  *dst = *src;
  dst->data = data;
  saga__buf_reset(&dst->data);
  if (src->data.len > 0)
    assert_int_equal(saga__buf_append(&dst->data, src->data.data, src->data.len), SAGA_OK);
}

/* Asserts the saga under test is in `mode` and remembers everything, before an event. */
static void enter(fx *f, int mode) {
  load(f);
  if (mode_of(&f->cur) != mode)
    fail_msg("expected mode %s, the saga is in %s (state %d phase %d wait %d)", mode_names[mode],
             mode_names[mode_of(&f->cur)], f->cur.state, f->cur.phase, f->cur.wait);
  copy_inst(&f->before, &f->cur);
  f->h0 = mem_store_history_rows(f->s, f->id);
  f->w0 = f->s->m->writes(f->s);
  f->d0 = mem_store_digest(f->s);
  f->st0 = f->env.stats;
  f->entered = mode;
}

static void fired(fx *f, int ev) { f->fired = ev; }

/* The history rows recorded since enter(): exactly `types` (0-terminated). */
static void expect_hist(fx *f, const int *types) {
  int got[32];
  size_t n = mem_store_history_types(f->s, f->id, f->h0, got, 32);
  size_t want = 0;
  while (types[want] != 0) want++;
  for (size_t k = 0; k < n && k < want && k < 32; k++)
    assert_string_equal(saga_event_name(got[k]), saga_event_name(types[k]));
  assert_int_equal(n, want);
  load(f);
  assert_int_equal(f->cur.hseq, (int64_t)mem_store_history_rows(f->s, f->id));
}

typedef struct want {
  int state, phase, step;
  uint32_t attempt;
  int wait;
  int64_t step_deadline; /* offset from T0; 0 = none; -1 = not checked */
  const char *cmd;       /* the one command written, or NULL for none */
  int cphase, cstep;
  uint32_t cattempt;
  const char *channel;
  int hist[8]; /* history rows recorded, 0-terminated */
} want;

static void expect(fx *f, const want *w) {
  expect_hist(f, w->hist);
  load(f);
  assert_string_equal(saga_state_name(f->cur.state), saga_state_name(w->state));
  assert_int_equal(f->cur.phase, w->phase);
  assert_int_equal(f->cur.step, w->step);
  assert_int_equal(f->cur.attempt, w->attempt);
  assert_int_equal(f->cur.wait, w->wait);
  if (w->step_deadline >= 0)
    assert_int_equal(f->cur.step_deadline, w->step_deadline ? T0 + (uint64_t)w->step_deadline : 0);
  if (w->cmd == NULL) {
    assert_int_equal(f->new_cmds, 0);
    return;
  }
  assert_int_equal(f->new_cmds, 1);
  const saga_envelope *c = last_cmd(f);
  assert_int_equal(c->kind, SAGA_MSG_COMMAND);
  assert_string_equal(c->saga_id, f->id);
  assert_string_equal(c->name, w->cmd);
  assert_int_equal(c->phase, w->cphase);
  assert_int_equal(c->step, (uint32_t)w->cstep);
  assert_int_equal(c->attempt, w->cattempt);
  assert_string_equal(c->reply_to, "orch");
  assert_string_equal(f->chan[f->ncmds - 1], w->channel);
  char prefix[120];
  snprintf(prefix, sizeof prefix, "%s/%d/%d/%u/", f->id, w->cstep, w->cphase, w->cattempt);
  assert_memory_equal(c->msg_id, prefix, strlen(prefix));
  assert_non_null(saga_envelope_header(c, "traceparent"));
}

/* The instance did not move: every column but hseq and updated_ms as before the event. */
static void expect_same_inst(fx *f) {
  load(f);
  const saga__inst *a = &f->before, *b = &f->cur;
  assert_int_equal(b->state, a->state);
  assert_int_equal(b->phase, a->phase);
  assert_int_equal(b->step, a->step);
  assert_int_equal(b->attempt, a->attempt);
  assert_int_equal(b->wait, a->wait);
  assert_int_equal(b->flags, a->flags);
  assert_int_equal(b->parked, a->parked);
  assert_int_equal(b->step_deadline, a->step_deadline);
  assert_int_equal(b->saga_deadline, a->saga_deadline);
  assert_string_equal(b->error, a->error);
  assert_int_equal(b->data.len, a->data.len);
  if (a->data.len > 0) assert_memory_equal(b->data.data, a->data.data, a->data.len);
}

/* Nothing at all was written since enter(). */
static void expect_untouched(fx *f) {
  assert_int_equal(f->s->m->writes(f->s), f->w0);
  assert_int_equal(mem_store_digest(f->s), f->d0);
  assert_int_equal(f->new_cmds, 0);
}

/* A reply that matched no awaited step: counted, recorded as STALE_REPLY (unless the saga is
 * COMPLETED or COMPENSATED: then nothing is written), the instance unchanged. */
static void expect_stale(fx *f, int recorded) {
  assert_int_equal(f->env.stats.stale_replies, f->st0.stale_replies + 1);
  assert_int_equal(f->env.stats.forged_replies, f->st0.forged_replies);
  assert_int_equal(f->new_cmds, 0);
  if (recorded) {
    static const int stale[] = {SAGA_EV_STALE_REPLY, 0};
    expect_hist(f, stale);
    expect_same_inst(f);
  } else {
    expect_untouched(f);
  }
}

/* An operator request refused: SAGA_ESTATE, nothing written, a message saying why. */
static void expect_refused(fx *f, int rc) {
  assert_int_equal(rc, SAGA_ESTATE);
  assert_true(f->env.errmsg[0] != '\0');
  expect_untouched(f);
}

/* A due timer that does not apply: the instance is saved with only the given deadline cleared
 * (0 now), nothing recorded, nothing sent. */
static void expect_cleared(fx *f, int saga_deadline) {
  static const int none[] = {0};
  expect_hist(f, none);
  assert_int_equal(f->new_cmds, 0);
  load(f);
  if (saga_deadline) {
    assert_int_equal(f->cur.saga_deadline, 0);
    assert_int_equal(f->cur.step_deadline, f->before.step_deadline);
    f->before.saga_deadline = 0;
  } else {
    assert_int_equal(f->cur.step_deadline, 0);
    assert_int_equal(f->cur.saga_deadline, f->before.saga_deadline);
    f->before.step_deadline = 0;
  }
  expect_same_inst(f);
}

/* ---- reaching modes ----------------------------------------------------------------------- */

/* piv: step 0 done, the pivot timed out (one attempt): a resolve is sent at 1000. */
static void to_res_wait(fx *f) {
  start(f, "piv");
  assert_int_equal(ok(f), SAGA_OK);
  enter(f, T_ACT_WAIT);
  assert_int_equal(due(f, 1000), 1);
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_RESOLVE,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 2000,
                    .cmd = "saga.resolve",
                    .cphase = SAGA_PHASE_RESOLVE,
                    .cstep = 1,
                    .cattempt = 1,
                    .channel = "ch1",
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_RESOLVE_SENT}});
}

/* ... and that resolve timed out at 2000: the next one is due at 2500. */
static void to_res_backoff(fx *f) {
  to_res_wait(f);
  assert_int_equal(due(f, 2000), 1);
  load(f);
  assert_int_equal(f->cur.wait, SAGA__WAIT_BACKOFF);
  assert_int_equal(f->cur.step_deadline, T0 + 2500);
}

/* once: steps 0 and 1 done, step 2 refused: step 1 is being compensated (sent at 0). */
static void to_comp_wait(fx *f) {
  start(f, "once");
  assert_int_equal(ok(f), SAGA_OK);
  assert_int_equal(ok(f), SAGA_OK);
  assert_int_equal(refuse(f, "no"), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.state, SAGA_COMPENSATING);
  assert_int_equal(f->cur.step, 1);
}

/* ... and that compensation failed: the next attempt is due at 500. */
static void to_comp_backoff(fx *f) {
  to_comp_wait(f);
  assert_int_equal(refuse(f, "db down"), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.wait, SAGA__WAIT_BACKOFF);
  assert_int_equal(f->cur.step_deadline, T0 + 500);
}

static void to_completed(fx *f) {
  start(f, "lin");
  assert_int_equal(ok(f), SAGA_OK);
  assert_int_equal(ok(f), SAGA_OK);
  enter(f, T_ACT_WAIT);
  assert_int_equal(ok(f), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPLETED,
                    .phase = SAGA_PHASE_ACTION,
                    .step = 2,
                    .attempt = 1,
                    .wait = SAGA__WAIT_NONE,
                    .step_deadline = 0,
                    .hist = {SAGA_EV_STEP_SUCCEEDED, SAGA_EV_COMPLETED}});
  assert_int_equal(f->cur.saga_deadline, 0);
}

/* once: step 0 refused; nothing to compensate. */
static void to_compensated(fx *f) {
  start(f, "once");
  enter(f, T_ACT_WAIT);
  assert_int_equal(refuse(f, "no"), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATED,
                    .phase = SAGA_PHASE_ACTION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_NONE,
                    .step_deadline = 0,
                    .hist = {SAGA_EV_STEP_FAILED, SAGA_EV_SAGA_COMPENSATED}});
}

/* once: step 1 refused, the compensation of step 0 failed twice (its limit): FAILED. */
static void to_failed(fx *f) {
  start(f, "once");
  assert_int_equal(ok(f), SAGA_OK);
  assert_int_equal(refuse(f, "no"), SAGA_OK);
  assert_int_equal(refuse(f, "db down"), SAGA_OK);
  assert_int_equal(due(f, 500), 1);
  enter(f, T_COMP_WAIT);
  assert_int_equal(refuse(f, "db down"), SAGA_OK);
  expect(f,
         &(want){.state = SAGA_FAILED,
                 .phase = SAGA_PHASE_COMPENSATION,
                 .step = 0,
                 .attempt = 2,
                 .wait = SAGA__WAIT_NONE,
                 .step_deadline = 0,
                 .hist = {SAGA_EV_STEP_FAILED, SAGA_EV_COMPENSATION_FAILED, SAGA_EV_SAGA_FAILED}});
  assert_non_null(strstr(f->cur.error, "compensation of s0 failed after 2 attempts"));
}

/* ---- the 42 cells ------------------------------------------------------------------------- */

/* ACT_WAIT */

static void c_act_wait_ok(fx *f) {
  start(f, "lin");
  at(f, 100);
  enter(f, T_ACT_WAIT);
  fired(f, T_OK);
  const saga__def *d = saga__engine_find(&f->e, "lin", 0);
  const saga__step_stats *s0 = &f->e.step_stats[d->steps[0].stats];
  const saga__step_stats *s1 = &f->e.step_stats[d->steps[1].stats];
  assert_ptr_not_equal(s0, s1);
  saga__step_stats b0 = *s0, b1 = *s1;
  assert_int_equal(ok(f), SAGA_OK);
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_ACTION,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 1100,
                    .cmd = "do1",
                    .cphase = SAGA_PHASE_ACTION,
                    .cstep = 1,
                    .cattempt = 1,
                    .channel = "ch1",
                    .hist = {SAGA_EV_STEP_SUCCEEDED, SAGA_EV_STEP_SENT}});
  /* The step's latency: from its command (at 0) to the reply (at 100). */
  assert_int_equal(f->env.stats.step_latency_count, f->st0.step_latency_count + 1);
  assert_int_equal(f->env.stats.step_latency_sum_ms, f->st0.step_latency_sum_ms + 100);
  /* Per step: step 0's action histogram (100 ms: the bucket of bound 100), its success; step
   * 1's first attempt. */
  assert_int_equal(saga_latency_bound_ms(6), 100);
  assert_int_equal(s0->latency[SAGA_PHASE_ACTION][6], b0.latency[SAGA_PHASE_ACTION][6] + 1);
  assert_int_equal(s0->latency_count[SAGA_PHASE_ACTION], b0.latency_count[SAGA_PHASE_ACTION] + 1);
  assert_int_equal(s0->latency_sum_ms[SAGA_PHASE_ACTION],
                   b0.latency_sum_ms[SAGA_PHASE_ACTION] + 100);
  assert_int_equal(s0->successes, b0.successes + 1);
  assert_int_equal(s1->attempts, b1.attempts + 1);
  assert_int_equal(s1->retries, b1.retries);
  assert_int_equal(s0->latency_count[SAGA_PHASE_COMPENSATION],
                   b0.latency_count[SAGA_PHASE_COMPENSATION]);
}

static void c_act_wait_fail(fx *f) {
  start(f, "once");
  assert_int_equal(ok(f), SAGA_OK);
  enter(f, T_ACT_WAIT);
  fired(f, T_FAIL);
  assert_int_equal(refuse(f, "out of stock"), SAGA_OK);
  /* One attempt only: the steps before are compensated (not this one: it refused). */
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 1000,
                    .cmd = "undo0",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 0,
                    .cattempt = 1,
                    .channel = "ch0",
                    .hist = {SAGA_EV_STEP_FAILED, SAGA_EV_COMPENSATION_SENT}});
  assert_string_equal(f->cur.error, "s1: out of stock");
  mem_store_hist h;
  assert_int_equal(mem_store_history_row(f->s, f->id, f->h0, &h), SAGA_OK);
  assert_int_equal(h.step, 1);
  assert_string_equal(h.detail, "out of stock");
}

static void c_act_wait_timeout(fx *f) {
  start(f, "lin");
  enter(f, T_ACT_WAIT);
  fired(f, T_TIMEOUT);
  assert_int_equal(due(f, 999), 0); /* not yet */
  assert_int_equal(due(f, 1000), 1);
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_ACTION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 1500,
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_STEP_RETRY}});
}

/* Unreachable: a due step deadline of a saga that waits for a reply is its timeout, never
 * the end of a backoff — the timer runs the timeout cell, it does not resend. */
static void c_act_wait_backoff_end(fx *f) {
  start(f, "lin");
  enter(f, T_ACT_WAIT);
  fired(f, T_BACKOFF_END);
  assert_int_equal(due(f, 1000), 1);
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_ACTION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 1500,
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_STEP_RETRY}});
}

static void c_act_wait_cancel(fx *f) {
  start(f, "lin");
  assert_int_equal(ok(f), SAGA_OK);
  enter(f, T_ACT_WAIT);
  fired(f, T_CANCEL);
  assert_int_equal(cancel(f), SAGA_OK);
  /* The current step may have applied: it is compensated too. */
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 1000,
                    .cmd = "undo1",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 1,
                    .cattempt = 1,
                    .channel = "ch1",
                    .hist = {SAGA_EV_CANCELLED, SAGA_EV_COMPENSATION_SENT}});
  assert_string_equal(f->cur.error, "cancelled");
}

static void c_act_wait_deadline(fx *f) {
  start(f, "dl");
  assert_int_equal(ok(f), SAGA_OK);
  enter(f, T_ACT_WAIT);
  assert_int_equal(f->cur.saga_deadline, T0 + 3000);
  fired(f, T_DEADLINE);
  assert_int_equal(due(f, 2999), 0);
  assert_int_equal(due(f, 3000), 1);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 13000,
                    .cmd = "undo1",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 1,
                    .cattempt = 1,
                    .channel = "ch1",
                    .hist = {SAGA_EV_CANCELLED, SAGA_EV_COMPENSATION_SENT}});
  assert_string_equal(f->cur.error, "saga deadline reached");
  assert_int_equal(f->cur.saga_deadline, 0);
}

/* ACT_BACKOFF: the first attempt of step 0 of lin was refused at 0; the next is due at 500. */

static void to_act_backoff(fx *f) {
  start(f, "lin");
  assert_int_equal(refuse(f, "busy"), SAGA_OK);
}

static void c_act_backoff_ok(fx *f) {
  to_act_backoff(f);
  enter(f, T_ACT_BACKOFF);
  fired(f, T_OK);
  /* A success for the refused attempt (a duplicate, or a participant changing its mind): the
   * saga waits for no reply now. */
  assert_int_equal(reply_to(f, last_cmd(f), 0, NULL), SAGA_OK);
  expect_stale(f, 1);
}

static void c_act_backoff_fail(fx *f) {
  to_act_backoff(f);
  enter(f, T_ACT_BACKOFF);
  fired(f, T_FAIL);
  assert_int_equal(reply_to(f, last_cmd(f), SAGA_EREFUSED, "busy"), SAGA_OK);
  expect_stale(f, 1);
}

/* Unreachable: a timeout is derived only for a saga waiting for a reply (a due timer in
 * backoff is its end). The nearest outside trigger, the transport giving up on the attempt
 * that timed out, arrives while backing off: it changes nothing. */
static void c_act_backoff_timeout(fx *f) {
  start(f, "lin");
  assert_int_equal(due(f, 1000), 1); /* timed out: uncertain, backing off until 1500 */
  enter(f, T_ACT_BACKOFF);
  fired(f, T_TIMEOUT);
  assert_int_equal(undeliverable(f, last_cmd(f), SAGA_EINVAL, "no route"), SAGA_OK);
  expect_untouched(f);
  assert_int_equal(due(f, 1499), 0);
  expect_untouched(f);
}

static void c_act_backoff_backoff_end(fx *f) {
  to_act_backoff(f);
  enter(f, T_ACT_BACKOFF);
  assert_int_equal(f->cur.step_deadline, T0 + 500);
  fired(f, T_BACKOFF_END);
  assert_int_equal(due(f, 500), 1);
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_ACTION,
                    .step = 0,
                    .attempt = 2,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 1500,
                    .cmd = "do0",
                    .cphase = SAGA_PHASE_ACTION,
                    .cstep = 0,
                    .cattempt = 2,
                    .channel = "ch0",
                    .hist = {SAGA_EV_STEP_SENT}});
}

static void c_act_backoff_cancel(fx *f) {
  start(f, "lin");
  assert_int_equal(ok(f), SAGA_OK);
  assert_int_equal(refuse(f, "busy"), SAGA_OK);
  enter(f, T_ACT_BACKOFF);
  fired(f, T_CANCEL);
  assert_int_equal(cancel(f), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 1000,
                    .cmd = "undo1",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 1,
                    .cattempt = 1,
                    .channel = "ch1",
                    .hist = {SAGA_EV_CANCELLED, SAGA_EV_COMPENSATION_SENT}});
}

static void c_act_backoff_deadline(fx *f) {
  start(f, "dl");
  at(f, 2800);
  assert_int_equal(refuse(f, "busy"), SAGA_OK); /* next attempt at 3300 */
  enter(f, T_ACT_BACKOFF);
  fired(f, T_DEADLINE);
  assert_int_equal(due(f, 3000), 1);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 13000,
                    .cmd = "undo0",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 0,
                    .cattempt = 1,
                    .channel = "ch0",
                    .hist = {SAGA_EV_CANCELLED, SAGA_EV_COMPENSATION_SENT}});
  assert_int_equal(f->cur.saga_deadline, 0);
}

/* RES_WAIT */

static void c_res_wait_ok(fx *f) {
  to_res_wait(f);
  enter(f, T_RES_WAIT);
  fired(f, T_OK);
  assert_int_equal(ok(f), SAGA_OK); /* the pivot did apply: forward */
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_ACTION,
                    .step = 2,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 2000,
                    .cmd = "do2",
                    .cphase = SAGA_PHASE_ACTION,
                    .cstep = 2,
                    .cattempt = 1,
                    .channel = "ch2",
                    .hist = {SAGA_EV_STEP_SUCCEEDED, SAGA_EV_STEP_SENT}});
}

static void c_res_wait_fail(fx *f) {
  to_res_wait(f);
  enter(f, T_RES_WAIT);
  fired(f, T_FAIL);
  assert_int_equal(refuse(f, "not applied"), SAGA_OK); /* it did not: back */
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 2000,
                    .cmd = "undo0",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 0,
                    .cattempt = 1,
                    .channel = "ch0",
                    .hist = {SAGA_EV_STEP_FAILED, SAGA_EV_COMPENSATION_SENT}});
  mem_store_hist h;
  assert_int_equal(mem_store_history_row(f->s, f->id, f->h0, &h), SAGA_OK);
  assert_int_equal(h.step, 1);
}

static void c_res_wait_timeout(fx *f) {
  to_res_wait(f);
  enter(f, T_RES_WAIT);
  fired(f, T_TIMEOUT);
  assert_int_equal(due(f, 2000), 1); /* asked again after a backoff, however many times */
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_RESOLVE,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 2500,
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_STEP_RETRY}});
}

/* Unreachable: as for ACT_WAIT, the due timer of a waiting resolve is its timeout. */
static void c_res_wait_backoff_end(fx *f) {
  to_res_wait(f);
  enter(f, T_RES_WAIT);
  fired(f, T_BACKOFF_END);
  assert_int_equal(due(f, 2000), 1);
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_RESOLVE,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 2500,
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_STEP_RETRY}});
}

static void c_res_wait_cancel(fx *f) {
  to_res_wait(f);
  enter(f, T_RES_WAIT);
  fired(f, T_CANCEL);
  expect_refused(f, cancel(f));
}

static void c_res_wait_deadline(fx *f) {
  start(f, "piv0a");
  assert_int_equal(due(f, 1000), 1); /* the pivot timed out: resolve until 2000 */
  enter(f, T_RES_WAIT);
  assert_int_equal(f->cur.saga_deadline, T0 + 1500);
  fired(f, T_DEADLINE);
  assert_int_equal(due(f, 1500), 1);
  expect_cleared(f, 1); /* the pivot's outcome decides, not the deadline */
}

/* RES_BACKOFF */

static void c_res_backoff_ok(fx *f) {
  to_res_backoff(f);
  enter(f, T_RES_BACKOFF);
  fired(f, T_OK);
  assert_int_equal(reply_to(f, last_cmd(f), 0, NULL), SAGA_OK);
  expect_stale(f, 1);
}

static void c_res_backoff_fail(fx *f) {
  to_res_backoff(f);
  enter(f, T_RES_BACKOFF);
  fired(f, T_FAIL);
  assert_int_equal(reply_to(f, last_cmd(f), SAGA_EREFUSED, "not applied"), SAGA_OK);
  expect_stale(f, 1);
}

/* Unreachable: see ACT_BACKOFF x TIMEOUT. */
static void c_res_backoff_timeout(fx *f) {
  to_res_backoff(f);
  enter(f, T_RES_BACKOFF);
  fired(f, T_TIMEOUT);
  assert_int_equal(undeliverable(f, last_cmd(f), SAGA_EINVAL, "no route"), SAGA_OK);
  expect_untouched(f);
}

static void c_res_backoff_backoff_end(fx *f) {
  to_res_backoff(f);
  enter(f, T_RES_BACKOFF);
  fired(f, T_BACKOFF_END);
  assert_int_equal(due(f, 2500), 1);
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_RESOLVE,
                    .step = 1,
                    .attempt = 2,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 3500,
                    .cmd = "saga.resolve",
                    .cphase = SAGA_PHASE_RESOLVE,
                    .cstep = 1,
                    .cattempt = 2,
                    .channel = "ch1",
                    .hist = {SAGA_EV_RESOLVE_SENT}});
}

static void c_res_backoff_cancel(fx *f) {
  to_res_backoff(f);
  enter(f, T_RES_BACKOFF);
  fired(f, T_CANCEL);
  expect_refused(f, cancel(f));
}

static void c_res_backoff_deadline(fx *f) {
  start(f, "piv0b");
  assert_int_equal(due(f, 1000), 1); /* resolve until 2000 */
  assert_int_equal(due(f, 2000), 1); /* timed out: next resolve at 2500 */
  enter(f, T_RES_BACKOFF);
  assert_int_equal(f->cur.saga_deadline, T0 + 2200);
  fired(f, T_DEADLINE);
  assert_int_equal(due(f, 2200), 1);
  expect_cleared(f, 1);
  assert_int_equal(f->cur.step_deadline, T0 + 2500);
}

/* COMP_WAIT */

static void c_comp_wait_ok(fx *f) {
  to_comp_wait(f);
  enter(f, T_COMP_WAIT);
  fired(f, T_OK);
  assert_int_equal(ok(f), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 1000,
                    .cmd = "undo0",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 0,
                    .cattempt = 1,
                    .channel = "ch0",
                    .hist = {SAGA_EV_COMPENSATED, SAGA_EV_COMPENSATION_SENT}});
}

static void c_comp_wait_fail(fx *f) {
  to_comp_wait(f);
  enter(f, T_COMP_WAIT);
  fired(f, T_FAIL);
  assert_int_equal(refuse(f, "db down"), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 500,
                    .hist = {SAGA_EV_STEP_FAILED, SAGA_EV_STEP_RETRY}});
}

static void c_comp_wait_timeout(fx *f) {
  to_comp_wait(f);
  enter(f, T_COMP_WAIT);
  fired(f, T_TIMEOUT);
  assert_int_equal(due(f, 1000), 1);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 1500,
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_STEP_RETRY}});
}

/* Unreachable: the due timer of a waiting compensation is its timeout. */
static void c_comp_wait_backoff_end(fx *f) {
  to_comp_wait(f);
  enter(f, T_COMP_WAIT);
  fired(f, T_BACKOFF_END);
  assert_int_equal(due(f, 1000), 1);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 1500,
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_STEP_RETRY}});
}

static void c_comp_wait_cancel(fx *f) {
  to_comp_wait(f);
  enter(f, T_COMP_WAIT);
  fired(f, T_CANCEL);
  expect_refused(f, cancel(f));
}

/* A saga deadline only ends a RUNNING saga; one left on a compensating instance (the engine
 * clears it when compensation starts: injected here) is cleared when it comes due. */
static void c_comp_wait_deadline(fx *f) {
  to_comp_wait(f);
  inject(f, -1, 200, -1);
  enter(f, T_COMP_WAIT);
  fired(f, T_DEADLINE);
  assert_int_equal(due(f, 200), 1);
  expect_cleared(f, 1);
}

/* COMP_BACKOFF */

static void c_comp_backoff_ok(fx *f) {
  to_comp_backoff(f);
  enter(f, T_COMP_BACKOFF);
  fired(f, T_OK);
  assert_int_equal(reply_to(f, last_cmd(f), 0, NULL), SAGA_OK);
  expect_stale(f, 1);
}

static void c_comp_backoff_fail(fx *f) {
  to_comp_backoff(f);
  enter(f, T_COMP_BACKOFF);
  fired(f, T_FAIL);
  assert_int_equal(reply_to(f, last_cmd(f), SAGA_EREFUSED, "db down"), SAGA_OK);
  expect_stale(f, 1);
}

/* Unreachable: see ACT_BACKOFF x TIMEOUT. */
static void c_comp_backoff_timeout(fx *f) {
  to_comp_backoff(f);
  enter(f, T_COMP_BACKOFF);
  fired(f, T_TIMEOUT);
  assert_int_equal(undeliverable(f, last_cmd(f), SAGA_EINVAL, "no route"), SAGA_OK);
  expect_untouched(f);
}

static void c_comp_backoff_backoff_end(fx *f) {
  to_comp_backoff(f);
  enter(f, T_COMP_BACKOFF);
  fired(f, T_BACKOFF_END);
  assert_int_equal(due(f, 500), 1);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 1,
                    .attempt = 2,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 1500,
                    .cmd = "undo1",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 1,
                    .cattempt = 2,
                    .channel = "ch1",
                    .hist = {SAGA_EV_COMPENSATION_SENT}});
}

static void c_comp_backoff_cancel(fx *f) {
  to_comp_backoff(f);
  enter(f, T_COMP_BACKOFF);
  fired(f, T_CANCEL);
  expect_refused(f, cancel(f));
}

static void c_comp_backoff_deadline(fx *f) {
  to_comp_backoff(f);
  inject(f, -1, 300, -1);
  enter(f, T_COMP_BACKOFF);
  fired(f, T_DEADLINE);
  assert_int_equal(due(f, 300), 1);
  expect_cleared(f, 1);
  assert_int_equal(f->cur.step_deadline, T0 + 500);
}

/* DONE */

static void c_done_ok(fx *f) {
  to_completed(f);
  enter(f, T_DONE);
  fired(f, T_OK);
  assert_int_equal(reply_to(f, last_cmd(f), 0, NULL), SAGA_OK); /* a duplicate */
  expect_stale(f, 0);
}

static void c_done_fail(fx *f) {
  to_compensated(f);
  enter(f, T_DONE);
  fired(f, T_FAIL);
  assert_int_equal(reply_to(f, last_cmd(f), SAGA_EREFUSED, "no"), SAGA_OK);
  expect_stale(f, 0);
}

static void c_done_timeout(fx *f) {
  to_completed(f);
  inject(f, 5000, -1, -1); /* a reply deadline left on a finished saga */
  enter(f, T_DONE);
  fired(f, T_TIMEOUT);
  assert_int_equal(due(f, 5000), 1);
  expect_cleared(f, 0);
  assert_int_equal(due(f, 10000), 0); /* never due again */
}

static void c_done_backoff_end(fx *f) {
  to_failed(f);
  inject(f, 5000, -1, SAGA__WAIT_BACKOFF); /* a backoff left on a FAILED saga */
  enter(f, T_DONE);
  fired(f, T_BACKOFF_END);
  assert_int_equal(due(f, 5000), 1);
  expect_cleared(f, 0);
  assert_int_equal(f->cur.state, SAGA_FAILED);
}

static void c_done_cancel(fx *f) {
  to_completed(f);
  enter(f, T_DONE);
  fired(f, T_CANCEL);
  expect_refused(f, cancel(f));
}

static void c_done_deadline(fx *f) {
  to_completed(f);
  inject(f, -1, 5000, -1);
  enter(f, T_DONE);
  fired(f, T_DEADLINE);
  assert_int_equal(due(f, 5000), 1);
  expect_cleared(f, 1);
  assert_int_equal(f->cur.state, SAGA_COMPLETED);
}

/* ---- the table of cells ------------------------------------------------------------------- */

/* What a cell does: 'A' an action runs; 'e' the event does not apply and changes nothing (the
 * table's empty cell decides); 'g' the same, decided before the table is consulted (a reply
 * to a saga that waits for none is stale; a saga deadline counts only while RUNNING);
 * 'u' no entry point can produce the event in that mode. Every scenario checks behaviour
 * through the entry points, so 'e', 'g' and 'u' cells are checked alike. */
typedef struct cell {
  int mode, ev;
  char kind;
  void (*fn)(fx *f);
} cell;

#define CELL(m, e, k, fn)                                                                          \
  { T_##m, T_##e, k, fn }
static cell cells[] = {
    CELL(ACT_WAIT, OK, 'A', c_act_wait_ok),
    CELL(ACT_WAIT, FAIL, 'A', c_act_wait_fail),
    CELL(ACT_WAIT, TIMEOUT, 'A', c_act_wait_timeout),
    CELL(ACT_WAIT, BACKOFF_END, 'u', c_act_wait_backoff_end),
    CELL(ACT_WAIT, CANCEL, 'A', c_act_wait_cancel),
    CELL(ACT_WAIT, DEADLINE, 'A', c_act_wait_deadline),
    CELL(ACT_BACKOFF, OK, 'g', c_act_backoff_ok),
    CELL(ACT_BACKOFF, FAIL, 'g', c_act_backoff_fail),
    CELL(ACT_BACKOFF, TIMEOUT, 'u', c_act_backoff_timeout),
    CELL(ACT_BACKOFF, BACKOFF_END, 'A', c_act_backoff_backoff_end),
    CELL(ACT_BACKOFF, CANCEL, 'A', c_act_backoff_cancel),
    CELL(ACT_BACKOFF, DEADLINE, 'A', c_act_backoff_deadline),
    CELL(RES_WAIT, OK, 'A', c_res_wait_ok),
    CELL(RES_WAIT, FAIL, 'A', c_res_wait_fail),
    CELL(RES_WAIT, TIMEOUT, 'A', c_res_wait_timeout),
    CELL(RES_WAIT, BACKOFF_END, 'u', c_res_wait_backoff_end),
    CELL(RES_WAIT, CANCEL, 'e', c_res_wait_cancel),
    CELL(RES_WAIT, DEADLINE, 'e', c_res_wait_deadline),
    CELL(RES_BACKOFF, OK, 'g', c_res_backoff_ok),
    CELL(RES_BACKOFF, FAIL, 'g', c_res_backoff_fail),
    CELL(RES_BACKOFF, TIMEOUT, 'u', c_res_backoff_timeout),
    CELL(RES_BACKOFF, BACKOFF_END, 'A', c_res_backoff_backoff_end),
    CELL(RES_BACKOFF, CANCEL, 'e', c_res_backoff_cancel),
    CELL(RES_BACKOFF, DEADLINE, 'e', c_res_backoff_deadline),
    CELL(COMP_WAIT, OK, 'A', c_comp_wait_ok),
    CELL(COMP_WAIT, FAIL, 'A', c_comp_wait_fail),
    CELL(COMP_WAIT, TIMEOUT, 'A', c_comp_wait_timeout),
    CELL(COMP_WAIT, BACKOFF_END, 'u', c_comp_wait_backoff_end),
    CELL(COMP_WAIT, CANCEL, 'e', c_comp_wait_cancel),
    CELL(COMP_WAIT, DEADLINE, 'g', c_comp_wait_deadline),
    CELL(COMP_BACKOFF, OK, 'g', c_comp_backoff_ok),
    CELL(COMP_BACKOFF, FAIL, 'g', c_comp_backoff_fail),
    CELL(COMP_BACKOFF, TIMEOUT, 'u', c_comp_backoff_timeout),
    CELL(COMP_BACKOFF, BACKOFF_END, 'A', c_comp_backoff_backoff_end),
    CELL(COMP_BACKOFF, CANCEL, 'e', c_comp_backoff_cancel),
    CELL(COMP_BACKOFF, DEADLINE, 'g', c_comp_backoff_deadline),
    CELL(DONE, OK, 'g', c_done_ok),
    CELL(DONE, FAIL, 'g', c_done_fail),
    CELL(DONE, TIMEOUT, 'e', c_done_timeout),
    CELL(DONE, BACKOFF_END, 'e', c_done_backoff_end),
    CELL(DONE, CANCEL, 'e', c_done_cancel),
    CELL(DONE, DEADLINE, 'g', c_done_deadline),
};
#define NCELLS (sizeof cells / sizeof cells[0])

/* passed[mode][event]: that cell's scenario ran to its end. */
static int passed[T_MODES][T_EVENTS];

static void test_cell(void **state) {
  const cell *c = *state;
  fx *f = fx_open();
  c->fn(f);
  /* The scenario did exercise its own cell. */
  assert_string_equal(f->entered >= 0 ? mode_names[f->entered] : "none", mode_names[c->mode]);
  assert_string_equal(f->fired >= 0 ? event_names[f->fired] : "none", event_names[c->ev]);
  fx_close(f);
  passed[c->mode][c->ev]++;
}

static void test_all_cells_covered(void **state) {
  int missing = 0;
  printf("%-12s", "");
  for (int e = 0; e < T_EVENTS; e++) printf(" %-11s", event_names[e]);
  printf("\n");
  for (int m = 0; m < T_MODES; m++) {
    printf("%-12s", mode_names[m]);
    for (int e = 0; e < T_EVENTS; e++) {
      char kind = '?';
      for (size_t k = 0; k < NCELLS; k++)
        if (cells[k].mode == m && cells[k].ev == e) kind = cells[k].kind;
      const char *what = kind == 'A'   ? "action"
                         : kind == 'e' ? "no-op"
                         : kind == 'g' ? "no-op(g)"
                                       : "unreachable";
      printf(" %-11s", passed[m][e] == 1 ? what : "MISSING");
      if (passed[m][e] != 1) missing++;
    }
    printf("\n");
  }
  assert_int_equal(NCELLS, T_MODES * T_EVENTS);
  assert_int_equal(missing, 0);
}

/* ---- beyond the cells: other branches of the actions -------------------------------------- */

/* A whole run: history in order, reply data merged into the saga data, input passed on. */
static void test_happy_path(void **state) {
  fx *f = fx_open();
  saga_data *in = NULL, *out = NULL;
  saga__buf inbuf, outbuf;
  saga__buf_init(&inbuf, NULL);
  saga__buf_init(&outbuf, NULL);
  assert_int_equal(saga_data_new(&in, NULL), SAGA_OK);
  assert_int_equal(saga_data_set_str(in, "order", "o-1"), SAGA_OK);
  assert_int_equal(saga__data_encode(in, &inbuf), SAGA_OK);
  assert_int_equal(saga_data_new(&out, NULL), SAGA_OK);
  assert_int_equal(saga_data_set_str(out, "paid", "yes"), SAGA_OK);
  assert_int_equal(saga__data_encode(out, &outbuf), SAGA_OK);
  int existed = -1;
  assert_int_equal(start_key(f, "lin", inbuf.data, inbuf.len, NULL, f->id, &existed), SAGA_OK);
  /* The command carries the input. */
  assert_int_equal(last_cmd(f)->payload_len, inbuf.len);
  assert_memory_equal(last_cmd(f)->payload, inbuf.data, inbuf.len);
  assert_int_equal(reply_with(f, last_cmd(f), 0, NULL, outbuf.data, outbuf.len), SAGA_OK);
  assert_int_equal(ok(f), SAGA_OK);
  assert_int_equal(ok(f), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.state, SAGA_COMPLETED);
  saga_data *d = NULL;
  char err[100];
  assert_int_equal(
      saga__data_decode(f->cur.data.data, f->cur.data.len, NULL, NULL, &d, err, sizeof err),
      SAGA_OK);
  assert_string_equal(saga_data_get_str(d, "order"), "o-1");
  assert_string_equal(saga_data_get_str(d, "paid"), "yes");
  saga_data_free(d);
  static const int all[] = {SAGA_EV_STARTED,        SAGA_EV_STEP_SENT,      SAGA_EV_STEP_SUCCEEDED,
                            SAGA_EV_STEP_SENT,      SAGA_EV_STEP_SUCCEEDED, SAGA_EV_STEP_SENT,
                            SAGA_EV_STEP_SUCCEEDED, SAGA_EV_COMPLETED,      0};
  f->h0 = 0;
  expect_hist(f, all);
  /* Sequence numbers 1.. without gaps; saga-level events have step -1. */
  for (size_t k = 0; all[k] != 0; k++) {
    mem_store_hist h;
    assert_int_equal(mem_store_history_row(f->s, f->id, k, &h), SAGA_OK);
    assert_int_equal(h.seq, (int64_t)k + 1);
    if (h.type == SAGA_EV_STARTED || h.type == SAGA_EV_COMPLETED) assert_int_equal(h.step, -1);
  }
  /* Outbox ids never repeat: the mark covers the three commands. */
  assert_int_equal(mem_store_outbox_mark(f->s), 3);
  saga_data_free(in);
  saga_data_free(out);
  saga__buf_free(&inbuf);
  saga__buf_free(&outbuf);
  fx_close(f);
}

/* Refused again on its last attempt (retry_before_compensate): the steps before are
 * compensated — here none, so the saga is COMPENSATED at once. */
static void test_refusal_after_retries(void **state) {
  fx *f = fx_open();
  start(f, "lin");
  assert_int_equal(refuse(f, "busy"), SAGA_OK);
  assert_int_equal(due(f, 500), 1);
  enter(f, T_ACT_WAIT);
  assert_int_equal(refuse(f, "busy"), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATED,
                    .phase = SAGA_PHASE_ACTION,
                    .step = 0,
                    .attempt = 2,
                    .wait = SAGA__WAIT_NONE,
                    .step_deadline = 0,
                    .hist = {SAGA_EV_STEP_FAILED, SAGA_EV_SAGA_COMPENSATED}});
  fx_close(f);
}

/* A step that timed out on its last attempt may have applied: it is compensated itself. */
static void test_timeout_exhausted(void **state) {
  fx *f = fx_open();
  start(f, "once");
  assert_int_equal(ok(f), SAGA_OK);
  enter(f, T_ACT_WAIT);
  assert_int_equal(due(f, 1000), 1);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 2000,
                    .cmd = "undo1",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 1,
                    .cattempt = 1,
                    .channel = "ch1",
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_COMPENSATION_SENT}});
  assert_string_equal(f->cur.error, "s1: timed out after 1 attempts");
  fx_close(f);
}

/* The last compensation confirmed: COMPENSATED. */
static void test_last_compensation(void **state) {
  fx *f = fx_open();
  start(f, "once");
  assert_int_equal(ok(f), SAGA_OK);
  assert_int_equal(refuse(f, "no"), SAGA_OK);
  enter(f, T_COMP_WAIT);
  assert_int_equal(ok(f), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATED,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_NONE,
                    .step_deadline = 0,
                    .hist = {SAGA_EV_COMPENSATED, SAGA_EV_SAGA_COMPENSATED}});
  fx_close(f);
}

/* A retriable step after the pivot is retried without limit. */
static void test_retriable_step(void **state) {
  fx *f = fx_open();
  to_res_wait(f);
  assert_int_equal(ok(f), SAGA_OK); /* step 2, retriable, sent at 1000 */
  for (uint32_t a = 1; a <= 5; a++) {
    enter(f, T_ACT_WAIT);
    assert_int_equal(f->cur.attempt, a);
    assert_int_equal(refuse(f, "later"), SAGA_OK);
    load(f);
    assert_int_equal(f->cur.state, SAGA_RUNNING);
    assert_int_equal(f->cur.wait, SAGA__WAIT_BACKOFF);
    assert_int_equal(due(f, (f->cur.step_deadline - T0)), 1);
  }
  assert_int_equal(ok(f), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.state, SAGA_COMPLETED);
  fx_close(f);
}

/* Cancel is refused from the pivot on, in every running mode. */
static void test_cancel_past_pivot(void **state) {
  fx *f = fx_open();
  start(f, "piv");
  assert_int_equal(ok(f), SAGA_OK);
  enter(f, T_ACT_WAIT); /* at the pivot */
  expect_refused(f, cancel(f));
  assert_non_null(strstr(f->env.errmsg, "pivot"));
  assert_int_equal(due(f, 1000), 1); /* resolve */
  assert_int_equal(ok(f), SAGA_OK);  /* step 2, after the pivot */
  enter(f, T_ACT_WAIT);
  expect_refused(f, cancel(f));
  assert_int_equal(refuse(f, "later"), SAGA_OK);
  enter(f, T_ACT_BACKOFF);
  expect_refused(f, cancel(f));
  fx_close(f);
}

/* A saga deadline ends a saga only before its pivot. */
static void test_deadline_after_pivot(void **state) {
  fx *f = fx_open();
  /* Reaching the pivot clears the deadline. */
  start(f, "dl");
  assert_int_equal(ok(f), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.saga_deadline, T0 + 3000);
  assert_int_equal(ok(f), SAGA_OK);
  enter(f, T_ACT_WAIT);
  assert_int_equal(f->cur.step, 2);
  assert_int_equal(f->cur.saga_deadline, 0);
  assert_int_equal(due(f, 3000), 0);
  expect_untouched(f);
  fx_close(f);

  /* A pivot that is the first step: its deadline passing while it runs is cleared. */
  f = fx_open();
  start(f, "piv0c");
  enter(f, T_ACT_WAIT);
  assert_int_equal(due(f, 1500), 1);
  expect_cleared(f, 1);
  assert_int_equal(f->cur.step_deadline, T0 + 2000);
  fx_close(f);
}

/* FAILED: saga_retry_failed compensates again, in a new round of attempts. */
static void test_retry_failed(void **state) {
  fx *f = fx_open();
  to_failed(f);
  const saga_envelope *old = last_cmd(f);
  enter(f, T_DONE);
  assert_int_equal(retry(f), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 0,
                    .attempt = 3,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 1500,
                    .cmd = "undo0",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 0,
                    .cattempt = 3,
                    .channel = "ch0",
                    .hist = {SAGA_EV_COMPENSATION_SENT}});
  assert_string_equal(f->cur.error, "");
  /* A reply of the earlier round is stale. */
  enter(f, T_COMP_WAIT);
  assert_int_equal(reply_to(f, old, 0, NULL), SAGA_OK);
  expect_stale(f, 1);
  /* The limit counts from the round's start: one failure is retried again. */
  enter(f, T_COMP_WAIT);
  assert_int_equal(refuse(f, "db down"), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 0,
                    .attempt = 3,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 1000,
                    .hist = {SAGA_EV_STEP_FAILED, SAGA_EV_STEP_RETRY}});
  assert_int_equal(due(f, 1000), 1);
  assert_int_equal(ok(f), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.state, SAGA_COMPENSATED);
  /* Only a FAILED saga can be retried. */
  enter(f, T_DONE);
  expect_refused(f, retry(f));
  fx_close(f);

  f = fx_open();
  start(f, "lin");
  enter(f, T_ACT_WAIT);
  expect_refused(f, retry(f));
  snprintf(f->id, sizeof f->id, "%s", "no-such-saga");
  assert_int_equal(retry(f), SAGA_ENOTFOUND);
  assert_int_equal(cancel(f), SAGA_ENOTFOUND);
  fx_close(f);
}

/* A reply whose id does not carry the tag of the command sent is ignored and counted. */
/* Reply data the engine cannot use (more entries than a saga may carry: built by a
 * participant that does not check) is never an error that makes the reply come again: before
 * the pivot the step is compensated with the earlier ones, past it the saga goes on without
 * that data. */
static void big_reply(saga__buf *out, int keys) {
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  for (int k = 0; k < keys; k++) {
    char key[16];
    snprintf(key, sizeof key, "k%d", k);
    assert_int_equal(saga_data_set_str(d, key, "v"), SAGA_OK);
  }
  saga__buf_init(out, NULL);
  assert_int_equal(saga__data_encode(d, out), SAGA_OK);
  saga_data_free(d);
}

/* Item 6 of the outage report: a peer that comes back after an outage answers every resend,
 * so one saga gets hundreds of copies of a reply it no longer waits for. Each is counted, but
 * only the first of each (phase, step, attempt) becomes a history row. */
static void test_stale_storm_one_row(void **state) {
  (void)state;
  fx *f = fx_open();
  start(f, "lin");
  const saga_envelope *first = last_cmd(f);
  assert_int_equal(ok(f), SAGA_OK); /* step 0 done: step 1 awaited */
  load(f);
  assert_int_equal(f->cur.step, 1);
  size_t rows0 = mem_store_history_rows(f->s, f->id);
  uint64_t stale0 = f->env.stats.stale_replies;
  for (int k = 0; k < 300; k++) assert_int_equal(reply_to(f, first, 0, NULL), SAGA_OK);
  assert_int_equal(f->env.stats.stale_replies, stale0 + 300);
  assert_int_equal(mem_store_history_rows(f->s, f->id), rows0 + 1);
  /* Another stale reply (a refusal of step 0, same attempt) is the same reply: still one row;
   * a reply of an attempt never sent is a different one: one more row. */
  saga_envelope other = *first;
  other.attempt = first->attempt + 7;
  for (int k = 0; k < 50; k++) assert_int_equal(reply_to(f, &other, 0, NULL), SAGA_OK);
  assert_int_equal(f->env.stats.stale_replies, stale0 + 350);
  assert_int_equal(mem_store_history_rows(f->s, f->id), rows0 + 2);
  /* The saga goes on as if nothing happened. */
  assert_int_equal(ok(f), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.step, 2);
  fx_close(f);
}

static void test_reply_data_refused(void **state) {
  saga__buf big;
  big_reply(&big, 300);
  fx *f = fx_open();
  start(f, "piv");
  assert_int_equal(reply_with(f, last_cmd(f), 0, NULL, big.data, big.len), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.state, SAGA_COMPENSATING);
  assert_int_equal(f->cur.phase, SAGA_PHASE_COMPENSATION);
  assert_int_equal(f->cur.step, 0); /* the step that applied is undone too */
  assert_non_null(strstr(f->cur.error, "reply data refused"));
  assert_non_null(strstr(f->cur.error, "entries"));
  fx_close(f);

  f = fx_open();
  start(f, "piv0a");
  assert_int_equal(reply_with(f, last_cmd(f), 0, NULL, big.data, big.len), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.state, SAGA_RUNNING); /* past the pivot: on, without the data */
  assert_int_equal(f->cur.step, 1);
  assert_int_equal(f->cur.data.len, 1); /* still the empty map */
  fx_close(f);
  saga__buf_free(&big);
}

/* Many definitions: registration and lookup look at a bounded number of slots each (a
 * linear search looked at all of them: 100,000 definitions took 27 s to register). */
static void test_many_definitions(void **state) {
  enum { NAMES = 10000 };
  fx *f = fx_open();
  static const saga_step one[] = {{.name = "S", .channel = "c", .action = "a"}};
  char name[32];
  for (int v = 2; v >= 1; v--) /* the higher version first: "latest" must not move back */
    for (int k = 0; k < NAMES; k++) {
      snprintf(name, sizeof name, "def%05d", k);
      saga_definition d = {SAGA_DEFINITION_VERSION, name, (uint32_t)v, one, 1, 0, sizeof(saga_step)};
      assert_int_equal(saga__engine_register(&f->e, &d), SAGA_OK);
    }
  printf("probes per registration: %.1f\n", (double)f->e.def_probes / (2 * NAMES));
  assert_true(f->e.def_probes < (uint64_t)40 * 2 * NAMES); /* linear: ~NAMES each */
  saga_definition again = {SAGA_DEFINITION_VERSION, "def00042", 1, one, 1, 0, sizeof(saga_step)};
  assert_int_equal(saga__engine_register(&f->e, &again), SAGA_EEXIST);
  f->e.def_probes = 0;
  for (int k = 0; k < NAMES; k++) {
    snprintf(name, sizeof name, "def%05d", k);
    const saga__def *d1 = saga__engine_find(&f->e, name, 1);
    const saga__def *d2 = saga__engine_find(&f->e, name, 2);
    const saga__def *d0 = saga__engine_find(&f->e, name, 0);
    assert_non_null(d1);
    assert_int_equal(d1->version, 1);
    assert_string_equal(d1->name, name);
    assert_ptr_equal(d0, d2);
    assert_int_equal(d2->version, 2);
  }
  assert_null(saga__engine_find(&f->e, "def99999", 0));
  assert_null(saga__engine_find(&f->e, "def00001", 3));
  printf("probes per lookup: %.1f\n", (double)f->e.def_probes / (3 * NAMES + 2));
  assert_true(f->e.def_probes < (uint64_t)8 * 3 * NAMES);
  fx_close(f);
}

static void test_forged_reply(void **state) {
  fx *f = fx_open();
  start(f, "lin");
  const saga_envelope *cmd = last_cmd(f);
  saga_envelope fake = *cmd;
  char forged[120];
  snprintf(forged, sizeof forged, "%s", cmd->msg_id);
  size_t n = strlen(forged);
  forged[n - 1] = forged[n - 1] == '0' ? '1' : '0'; /* another tag */
  fake.msg_id = forged;
  enter(f, T_ACT_WAIT);
  assert_int_equal(reply_to(f, &fake, 0, NULL), SAGA_OK);
  assert_int_equal(f->env.stats.forged_replies, 1);
  assert_int_equal(f->env.stats.stale_replies, 0);
  expect_untouched(f);
  /* A reply naming no command at all. */
  char bare[120];
  snprintf(bare, sizeof bare, "%s/%d/%d/%u", f->id, 0, 0, 1u);
  fake.msg_id = bare;
  assert_int_equal(reply_to(f, &fake, 0, NULL), SAGA_OK);
  assert_int_equal(f->env.stats.forged_replies, 2);
  expect_untouched(f);
  /* The genuine reply still goes through. */
  assert_int_equal(ok(f), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.step, 1);
  fx_close(f);
}

/* A reply for a saga this store does not hold: ignored, nothing written. */
static void test_unknown_saga_reply(void **state) {
  fx *f = fx_open();
  start(f, "lin");
  saga_envelope fake = *last_cmd(f);
  fake.saga_id = "0000000000000000000000000000000";
  enter(f, T_ACT_WAIT);
  assert_int_equal(reply_to(f, &fake, 0, NULL), SAGA_OK);
  expect_untouched(f);
  assert_int_equal(f->env.stats.stale_replies, 0);
  assert_int_equal(f->env.stats.forged_replies, 0);
  assert_int_equal(undeliverable(f, &fake, SAGA_EINVAL, "no route"), SAGA_OK);
  expect_untouched(f);
  fx_close(f);
}

/* An engine without the saga's definition: a reply is kept (SAGA_ENODEF), a due saga is
 * parked until the definition is registered. */
static void test_definition_missing(void **state) {
  fx *f = fx_open();
  start(f, "lin");
  saga__engine bare;
  saga__engine_init(&bare, &f->env, &f->j, "orch");
  bare.reply_key[0] = f->e.reply_key[0];
  bare.reply_key[1] = f->e.reply_key[1];
  enter(f, T_ACT_WAIT);
  char msg_id[200];
  snprintf(msg_id, sizeof msg_id, "%s/r", last_cmd(f)->msg_id);
  saga_envelope r = *last_cmd(f);
  r.kind = SAGA_MSG_REPLY;
  r.msg_id = msg_id;
  r.error = "";
  tx_begin(f);
  assert_int_equal(tx_end(f, saga__engine_reply(&bare, &r)), SAGA_ENODEF);
  expect_untouched(f);
  /* Due without its definition: parked, never due again. */
  at(f, 1000);
  size_t processed = 0;
  tx_begin(f);
  assert_int_equal(tx_end(f, saga__engine_due(&bare, T0 + 1000, 16, &processed)), SAGA_OK);
  assert_int_equal(processed, 1);
  static const int missing_ev[] = {SAGA_EV_DEFINITION_MISSING, 0};
  expect_hist(f, missing_ev);
  assert_int_equal(f->cur.parked, 1);
  uint64_t next = 0;
  assert_int_equal(f->s->m->inst_next_due(f->s, &next), SAGA_ENOTFOUND);
  /* Recovery by an engine that knows it: unparked, due again. */
  int missing = 0; /* counted into: the caller starts it at 0 */
  tx_begin(f);
  assert_int_equal(tx_end(f, saga__engine_unpark(&f->e, &missing)), SAGA_OK);
  assert_int_equal(missing, 0);
  load(f);
  assert_int_equal(f->cur.parked, 0);
  assert_int_equal(f->s->m->inst_next_due(f->s, &next), SAGA_OK);
  assert_int_equal(next, T0 + 1000);
  /* ... and by one that does not: counted and parked again. */
  missing = 0;
  tx_begin(f);
  assert_int_equal(tx_end(f, saga__engine_unpark(&bare, &missing)), SAGA_OK);
  assert_int_equal(missing, 1);
  load(f);
  assert_int_equal(f->cur.parked, 1);
  saga__engine_free(&bare);
  fx_close(f);
}

/* A store failure in the middle of a transition: the call returns the error and, once rolled
 * back, nothing of the transition is left (no instance change, history, outbox row or mark).
 * The same reply then succeeds. */
static void test_failed_save(void **state) {
  static const mem_store_op ops[] = {MEM_OP_INST_LOAD, MEM_OP_OUTBOX_MAX,  MEM_OP_OUTBOX_INSERT,
                                     MEM_OP_INST_SAVE, MEM_OP_HIST_INSERT, MEM_OP_OUTBOX_MARK};
  fx *f = fx_open();
  start(f, "lin");
  for (size_t k = 0; k < sizeof ops / sizeof ops[0]; k++) {
    enter(f, T_ACT_WAIT);
    unsigned long calls = mem_store_calls(f->s, ops[k]);
    mem_store_fail(f->s, ops[k], 0, 1, SAGA_EIO);
    f->env.errmsg[0] = '\0';
    int rc = ok(f);
    if (rc != SAGA_EIO) fail_msg("%s failing: reply gave %d", mem_store_op_name(ops[k]), rc);
    assert_int_equal(mem_store_calls(f->s, ops[k]), calls + 1);
    assert_int_equal(mem_store_digest(f->s), f->d0);
    assert_int_equal(f->new_cmds, 0);
    assert_true(f->env.errmsg[0] != '\0');
    expect_same_inst(f);
    assert_int_equal(mem_store_history_rows(f->s, f->id), f->h0);
  }
  assert_int_equal(ok(f), SAGA_OK);
  load(f);
  assert_int_equal(f->cur.step, 1);
  /* A refused cancel's save failing: the error, and nothing written. */
  enter(f, T_ACT_WAIT);
  mem_store_fail(f->s, MEM_OP_INST_SAVE, 0, 1, SAGA_EFULL);
  assert_int_equal(cancel(f), SAGA_EFULL);
  assert_int_equal(mem_store_digest(f->s), f->d0);
  assert_int_equal(f->new_cmds, 0);
  fx_close(f);

  /* A start whose insert fails leaves no instance and no command. */
  f = fx_open();
  mem_store_fail(f->s, MEM_OP_INST_INSERT, 0, 1, SAGA_EIO);
  char id[40];
  int existed = -1;
  assert_int_equal(start_key(f, "lin", NULL, 0, NULL, id, &existed), SAGA_EIO);
  assert_int_equal(mem_store_instances(f->s), 0);
  assert_int_equal(mem_store_history_rows(f->s, NULL), 0);
  assert_int_equal(f->new_cmds, 0);
  /* A timer pass whose save fails. */
  start(f, "lin");
  enter(f, T_ACT_WAIT);
  mem_store_fail(f->s, MEM_OP_INST_SAVE, 0, 1, SAGA_EIO);
  at(f, 1000);
  size_t processed = 0;
  tx_begin(f);
  assert_int_equal(tx_end(f, saga__engine_due(&f->e, T0 + 1000, 16, &processed)), SAGA_EIO);
  assert_int_equal(mem_store_digest(f->s), f->d0);
  assert_int_equal(due(f, 1000), 1); /* and runs when the store works again */
  load(f);
  assert_int_equal(f->cur.wait, SAGA__WAIT_BACKOFF);
  fx_close(f);
}

/* An idempotency key: the second start with it finds the first saga and writes nothing. */
static void test_idempotent_start(void **state) {
  fx *f = fx_open();
  char a[40], b[40], c[40];
  int existed = -1;
  assert_int_equal(start_key(f, "lin", NULL, 0, "key-1", a, &existed), SAGA_OK);
  assert_int_equal(existed, 0);
  int64_t w = f->s->m->writes(f->s);
  existed = -1;
  assert_int_equal(start_key(f, "lin", NULL, 0, "key-1", b, &existed), SAGA_OK);
  assert_int_equal(existed, 1);
  assert_string_equal(a, b);
  assert_int_equal(f->s->m->writes(f->s), w);
  assert_int_equal(f->new_cmds, 0);
  assert_int_equal(start_key(f, "lin", NULL, 0, "key-2", c, &existed), SAGA_OK);
  assert_int_equal(existed, 0);
  assert_string_not_equal(a, c);
  assert_int_equal(mem_store_instances(f->s), 2);
  fx_close(f);
}

/* The transport refused a command for good: the awaited attempt fails (or times out). */
static void test_undeliverable(void **state) {
  /* Waiting, no earlier attempt timed out: a failure (one attempt: compensated at once). */
  fx *f = fx_open();
  start(f, "once");
  enter(f, T_ACT_WAIT);
  assert_int_equal(undeliverable(f, last_cmd(f), SAGA_EINVAL, "no route"), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATED,
                    .phase = SAGA_PHASE_ACTION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_NONE,
                    .step_deadline = 0,
                    .hist = {SAGA_EV_STEP_FAILED, SAGA_EV_SAGA_COMPENSATED}});
  assert_non_null(strstr(f->cur.error, "no route"));
  fx_close(f);

  /* An earlier attempt timed out and may have applied: the timeout path (last attempt:
   * compensate the step itself). An older attempt's notice changes nothing. */
  f = fx_open();
  start(f, "lin");
  const saga_envelope *first = last_cmd(f);
  assert_int_equal(due(f, 1000), 1);
  assert_int_equal(due(f, 1500), 1); /* attempt 2 */
  enter(f, T_ACT_WAIT);
  assert_int_equal(undeliverable(f, first, SAGA_EINVAL, "no route"), SAGA_OK);
  expect_untouched(f);
  assert_int_equal(undeliverable(f, last_cmd(f), SAGA_EINVAL, "no route"), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_REPLY,
                    .step_deadline = 2500,
                    .cmd = "undo0",
                    .cphase = SAGA_PHASE_COMPENSATION,
                    .cstep = 0,
                    .cattempt = 1,
                    .channel = "ch0",
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_COMPENSATION_SENT}});
  /* A compensation: failed, retried per its policy. */
  enter(f, T_COMP_WAIT);
  assert_int_equal(undeliverable(f, last_cmd(f), SAGA_EINVAL, "no route"), SAGA_OK);
  expect(f, &(want){.state = SAGA_COMPENSATING,
                    .phase = SAGA_PHASE_COMPENSATION,
                    .step = 0,
                    .attempt = 1,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 2000,
                    .hist = {SAGA_EV_STEP_FAILED, SAGA_EV_STEP_RETRY}});
  fx_close(f);

  /* A resolve: proves nothing about the pivot, so the timeout path (ask again later). */
  f = fx_open();
  to_res_wait(f);
  enter(f, T_RES_WAIT);
  assert_int_equal(undeliverable(f, last_cmd(f), SAGA_EINVAL, "no route"), SAGA_OK);
  expect(f, &(want){.state = SAGA_RUNNING,
                    .phase = SAGA_PHASE_RESOLVE,
                    .step = 1,
                    .attempt = 1,
                    .wait = SAGA__WAIT_BACKOFF,
                    .step_deadline = 1500,
                    .hist = {SAGA_EV_STEP_TIMED_OUT, SAGA_EV_STEP_RETRY}});
  fx_close(f);
}

/* Timers: at most `max` instances per pass, earliest first. */
static void test_due_batches(void **state) {
  fx *f = fx_open();
  char ids[3][40];
  for (int k = 0; k < 3; k++) {
    at(f, (uint64_t)k * 10);
    int existed;
    assert_int_equal(start_key(f, "lin", NULL, 0, NULL, ids[k], &existed), SAGA_OK);
  }
  /* Reply deadlines at 1000, 1010, 1020. */
  int waits[3][3] = {{SAGA__WAIT_BACKOFF, SAGA__WAIT_REPLY, SAGA__WAIT_REPLY},
                     {SAGA__WAIT_BACKOFF, SAGA__WAIT_BACKOFF, SAGA__WAIT_REPLY},
                     {SAGA__WAIT_BACKOFF, SAGA__WAIT_BACKOFF, SAGA__WAIT_BACKOFF}};
  assert_int_equal(due_max(f, 1015, 1), 1); /* two are due: the earliest goes first */
  for (int pass = 0; pass < 3; pass++) {
    if (pass == 1) assert_int_equal(due_max(f, 1015, 5), 1);
    if (pass == 2) {
      assert_int_equal(due_max(f, 1019, 5), 0);
      assert_int_equal(due_max(f, 1020, 5), 1);
    }
    for (int k = 0; k < 3; k++) {
      memcpy(f->id, ids[k], sizeof f->id);
      load(f);
      assert_int_equal(f->cur.wait, waits[pass][k]);
    }
  }
  fx_close(f);
}

/* ---- the in-memory store itself ----------------------------------------------------------- */

static void mk_inst(saga__inst *i, const char *id, int state, uint64_t deadline) {
  saga__buf data = i->data;
  memset(i, 0, sizeof *i);
  i->data = data;
  saga__buf_reset(&i->data);
  snprintf(i->id, sizeof i->id, "%s", id);
  snprintf(i->def_name, sizeof i->def_name, "d");
  i->def_version = 1;
  i->state = state;
  i->wait = SAGA__WAIT_REPLY;
  i->attempt = 1;
  i->step_deadline = deadline;
  i->updated_ms = deadline;
  i->saved_state = state;
  static const uint8_t empty = 0x80;
  assert_int_equal(saga__buf_append(&i->data, &empty, 1), SAGA_OK);
}

static void test_mem_store_tx(void **state) {
  saga__store *s = NULL;
  assert_int_equal(mem_store_new(&s), SAGA_OK);
  const saga__store_methods *m = s->m;
  saga__inst i;
  saga__inst_init(&i, NULL);
  uint64_t empty = mem_store_digest(s);
  /* Rollback undoes every table; writes() still counts. */
  assert_int_equal(m->begin(s), SAGA_OK);
  assert_int_equal(m->in_tx(s), 1);
  assert_int_equal(m->begin(s), SAGA_ESTORE);
  mk_inst(&i, "a", SAGA_RUNNING, 100);
  assert_int_equal(m->inst_insert(s, &i, "k"), SAGA_OK);
  saga__hist_rec h = {.saga_id = "a", .seq = 1, .type = SAGA_EV_STARTED, .step = -1};
  assert_int_equal(m->hist_insert(s, &h, 1, ""), SAGA_OK);
  assert_int_equal(m->outbox_insert(s, 7, "ch", "a", "x", 1, 5), SAGA_OK);
  assert_int_equal(m->outbox_mark(s, 7), SAGA_OK);
  assert_int_equal(m->dead_insert(s, 5, "ch", NULL, "bad", "y", 1, 0, &(uint64_t){0}), SAGA_OK);
  assert_int_equal(m->inbox_insert(s, "m1", "a", 5, "orch", "r", 1), SAGA_OK);
  assert_int_equal(m->pstep_put(s, "a", 0, 1, 1, NULL, 0, 5), SAGA_OK);
  assert_int_equal(m->writes(s), 7);
  assert_int_equal(m->rollback(s), SAGA_OK);
  assert_int_equal(m->in_tx(s), 0);
  assert_int_equal(mem_store_digest(s), empty);
  assert_int_equal(mem_store_instances(s), 0);
  assert_int_equal(mem_store_outbox_mark(s), 0);
  assert_int_equal(m->writes(s), 7);
  assert_int_equal(m->commit(s), SAGA_ESTORE);
  assert_int_equal(m->rollback(s), SAGA_ESTORE);
  /* Savepoints: rollback_to keeps what came before and stays open; the handler savepoint
   * nested in the item savepoint ends with it. */
  assert_int_equal(m->begin(s), SAGA_OK);
  assert_int_equal(m->inst_insert(s, &i, "k"), SAGA_OK);
  assert_int_equal(m->savepoint(s, SAGA__SP_ITEM), SAGA_OK);
  mk_inst(&i, "b", SAGA_RUNNING, 50);
  assert_int_equal(m->inst_insert(s, &i, NULL), SAGA_OK);
  assert_int_equal(m->savepoint(s, SAGA__SP_HANDLER), SAGA_OK);
  assert_int_equal(m->rollback_to(s, SAGA__SP_ITEM), SAGA_OK);
  assert_int_equal(mem_store_instances(s), 1);
  assert_int_equal(m->release(s, SAGA__SP_HANDLER), SAGA_ESTORE);
  assert_int_equal(m->inst_insert(s, &i, NULL), SAGA_OK);
  assert_int_equal(m->release(s, SAGA__SP_ITEM), SAGA_OK);
  assert_int_equal(m->rollback_to(s, SAGA__SP_ITEM), SAGA_ESTORE);
  assert_int_equal(m->commit(s), SAGA_OK);
  assert_int_equal(mem_store_instances(s), 2);
  assert_int_equal(m->savepoint(s, SAGA__SP_ITEM), SAGA_ESTORE);
  /* Unique keys. */
  assert_int_equal(m->inst_insert(s, &i, NULL), SAGA_EEXIST);
  mk_inst(&i, "c", SAGA_RUNNING, 0);
  assert_int_equal(m->inst_insert(s, &i, "k"), SAGA_EEXIST);
  assert_non_null(strstr(m->errmsg(s), "idem_key"));
  char id[40];
  assert_int_equal(m->inst_find_key(s, "d", "k", id), SAGA_OK);
  assert_string_equal(id, "a");
  assert_int_equal(m->inst_find_key(s, "d", "nope", id), SAGA_ENOTFOUND);
  assert_int_equal(m->hist_insert(s, &h, 1, ""), SAGA_OK);
  assert_int_equal(m->hist_insert(s, &h, 1, ""), SAGA_EEXIST);
  assert_int_equal(mem_store_history_rows(s, "a"), 1);
  saga__inst_free(&i);
  m->close(s);
}

static void test_mem_store_instances(void **state) {
  saga__store *s = NULL;
  assert_int_equal(mem_store_new(&s), SAGA_OK);
  const saga__store_methods *m = s->m;
  saga__inst i;
  saga__inst_init(&i, NULL);
  mk_inst(&i, "late", SAGA_RUNNING, 300);
  assert_int_equal(m->inst_insert(s, &i, NULL), SAGA_OK);
  mk_inst(&i, "early", SAGA_RUNNING, 100);
  assert_int_equal(m->inst_insert(s, &i, NULL), SAGA_OK);
  mk_inst(&i, "mid", SAGA_COMPENSATING, 200);
  assert_int_equal(m->inst_insert(s, &i, NULL), SAGA_OK);
  mk_inst(&i, "none", SAGA_COMPLETED, 0);
  assert_int_equal(m->inst_insert(s, &i, NULL), SAGA_OK);
  saga__buf ids;
  saga__buf_init(&ids, NULL);
  size_t n = 0;
  assert_int_equal(m->inst_due(s, 250, 10, &ids, &n), SAGA_OK);
  assert_int_equal(n, 2);
  assert_string_equal((const char *)ids.data, "early");
  assert_string_equal((const char *)ids.data + 40, "mid");
  uint64_t next = 0;
  assert_int_equal(m->inst_next_due(s, &next), SAGA_OK);
  assert_int_equal(next, 100);
  /* Parked: never due; unparked: due at its deadline again. */
  assert_int_equal(m->inst_load(s, "early", &i), SAGA_OK);
  assert_int_equal(i.exists, 1);
  i.parked = 1;
  assert_int_equal(m->inst_save(s, &i), SAGA_OK);
  assert_int_equal(m->inst_next_due(s, &next), SAGA_OK);
  assert_int_equal(next, 200);
  assert_int_equal(m->inst_unpark(s, "early"), SAGA_OK);
  assert_int_equal(m->inst_next_due(s, &next), SAGA_OK);
  assert_int_equal(next, 100);
  /* As the SQLite backend: the state column is written only when the state differs from
   * the one loaded (saved_state). */
  assert_int_equal(m->inst_load(s, "mid", &i), SAGA_OK);
  i.state = SAGA_COMPENSATED;
  i.saved_state = SAGA_COMPENSATED;
  assert_int_equal(m->inst_save(s, &i), SAGA_OK);
  assert_int_equal(m->inst_load(s, "mid", &i), SAGA_OK);
  assert_int_equal(i.state, SAGA_COMPENSATING);
  i.state = SAGA_COMPENSATED;
  assert_int_equal(m->inst_save(s, &i), SAGA_OK);
  int64_t counts[6];
  assert_int_equal(m->inst_count(s, counts), SAGA_OK);
  assert_int_equal(counts[SAGA_RUNNING], 2);
  assert_int_equal(counts[SAGA_COMPENSATED], 1);
  assert_int_equal(counts[SAGA_COMPLETED], 1);
  assert_int_equal(m->inst_load(s, "gone", &i), SAGA_ENOTFOUND);
  /* Retention: finished sagas by age, then beyond the newest `keep`. */
  saga__buf_reset(&ids);
  assert_int_equal(m->finished_before(s, 1000, 10, &ids, &n), SAGA_OK);
  assert_int_equal(n, 2);
  assert_string_equal((const char *)ids.data, "none"); /* updated at 0 */
  saga__buf_reset(&ids);
  assert_int_equal(m->finished_beyond(s, 1, 10, &ids, &n), SAGA_OK);
  assert_int_equal(n, 1);
  assert_string_equal((const char *)ids.data, "none");
  int deleted = 0;
  assert_int_equal(m->purge_saga(s, "late", &deleted), SAGA_OK); /* running: kept */
  assert_int_equal(deleted, 0);
  assert_int_equal(m->purge_saga(s, "none", &deleted), SAGA_OK);
  assert_int_equal(deleted, 1);
  assert_int_equal(mem_store_instances(s), 3);
  saga__buf_free(&ids);
  saga__inst_free(&i);
  m->close(s);
}

typedef struct visit {
  uint64_t ids[8];
  size_t n;
} visit;

static void visit_row(void *arg, uint64_t id, const char *channel, const void *body, size_t len) {
  visit *v = arg;
  assert_string_equal(channel, "ch");
  assert_int_equal(len, 1);
  if (v->n < 8) v->ids[v->n++] = id;
}

static void test_mem_store_outbox(void **state) {
  saga__store *s = NULL;
  assert_int_equal(mem_store_new(&s), SAGA_OK);
  const saga__store_methods *m = s->m;
  for (uint64_t id = 1; id <= 5; id++)
    assert_int_equal(m->outbox_insert(s, id, "ch", "a", "b", 1, id * 10), SAGA_OK);
  assert_int_equal(m->outbox_insert(s, 3, "ch", "a", "b", 1, 0), SAGA_EEXIST);
  uint64_t max = 0, deleted = 0;
  assert_int_equal(m->outbox_max(s, &max), SAGA_OK);
  assert_int_equal(max, 5);
  assert_int_equal(m->outbox_delete(s, 4, 9, &deleted), SAGA_OK);
  assert_int_equal(deleted, 2);
  assert_int_equal(m->outbox_max(s, &max), SAGA_OK);
  assert_int_equal(max, 3); /* no mark recorded: ids 4 and 5 could be taken again */
  assert_int_equal(m->outbox_mark(s, 5), SAGA_OK);
  assert_int_equal(m->outbox_mark(s, 2), SAGA_OK); /* never lowered */
  assert_int_equal(m->outbox_max(s, &max), SAGA_OK);
  assert_int_equal(max, 5);
  visit v = {.n = 0};
  size_t rows = 0;
  assert_int_equal(m->outbox_after(s, 1, 10, visit_row, &v, &rows), SAGA_OK);
  assert_int_equal(rows, 2);
  assert_int_equal(v.ids[0], 2);
  assert_int_equal(v.ids[1], 3);
  v.n = 0;
  assert_int_equal(m->outbox_stale(s, 0, 3, 20, 10, visit_row, &v, &rows), SAGA_OK);
  assert_int_equal(rows, 2); /* ids 1 and 2, created at 10 and 20 */
  saga__buf ch, body;
  saga__buf_init(&ch, NULL);
  saga__buf_init(&body, NULL);
  assert_int_equal(m->outbox_get(s, 2, &ch, &body), SAGA_OK);
  assert_string_equal((const char *)ch.data, "ch");
  assert_int_equal(body.len, 1);
  assert_int_equal(m->outbox_get(s, 4, &ch, &body), SAGA_ENOTFOUND);
  int64_t count = 0;
  assert_int_equal(m->outbox_count(s, &count), SAGA_OK);
  assert_int_equal(count, 3);
  assert_int_equal(mem_store_outbox_rows(s), 3);
  const char *channel = NULL;
  assert_int_equal(mem_store_outbox_row(s, 0, NULL, &channel, NULL, NULL, NULL), SAGA_OK);
  assert_string_equal(channel, "ch");
  mem_store_outbox_clear(s);
  assert_int_equal(mem_store_outbox_rows(s), 0);
  /* Inbox, step records, dead letters, the reply key. */
  saga__buf_reset(&ch);
  saga__buf_reset(&body);
  assert_int_equal(m->inbox_get(s, "m", &ch, &body), SAGA_ENOTFOUND);
  assert_int_equal(m->inbox_insert(s, "m", "a", 1, "orch", "rr", 2), SAGA_OK);
  assert_int_equal(m->inbox_insert(s, "m", "a", 1, "orch", "rr", 2), SAGA_EEXIST);
  assert_int_equal(m->inbox_get(s, "m", &ch, &body), SAGA_OK);
  assert_string_equal((const char *)ch.data, "orch");
  assert_int_equal(body.len, 2);
  int st = -1;
  uint32_t attempt = 9;
  saga__buf_reset(&body);
  assert_int_equal(m->pstep_get(s, "a", 0, &st, &attempt, &body), SAGA_OK);
  assert_int_equal(st, 0);
  assert_int_equal(m->pstep_put(s, "a", 0, 1, 2, "z", 1, 1), SAGA_OK);
  assert_int_equal(m->pstep_put(s, "a", 0, 2, 3, NULL, 0, 1), SAGA_OK);
  assert_int_equal(m->pstep_get(s, "a", 0, &st, &attempt, &body), SAGA_OK);
  assert_int_equal(st, 2);
  assert_int_equal(attempt, 3);
  assert_int_equal(body.len, 0);
  assert_int_equal(mem_store_pstep_rows(s), 1);
  assert_int_equal(m->dead_insert(s, 1, "ch", "m9", "broken", "q", 1, 0, &(uint64_t){0}), SAGA_OK);
  assert_int_equal(mem_store_dead_letters(s), 1);
  const char *reason = NULL;
  assert_int_equal(mem_store_dead_letter(s, 0, NULL, NULL, &reason), SAGA_OK);
  assert_string_equal(reason, "broken");
  uint64_t fresh[2] = {1, 2}, fresh2[2] = {3, 4}, key[2];
  assert_int_equal(m->reply_key(s, fresh, key), SAGA_OK);
  assert_int_equal(key[1], 2);
  assert_int_equal(m->reply_key(s, fresh2, key), SAGA_OK);
  assert_int_equal(key[0], 1); /* the first one stays */
  saga__buf_free(&ch);
  saga__buf_free(&body);
  m->close(s);
}

static void test_mem_store_sweep(void **state) {
  saga__store *s = NULL;
  assert_int_equal(mem_store_new(&s), SAGA_OK);
  const saga__store_methods *m = s->m;
  /* Five inbox records, e is recent; batches of two keys. */
  const char *keys[] = {"d", "b", "a", "e", "c"};
  for (int k = 0; k < 5; k++)
    assert_int_equal(m->inbox_insert(s, keys[k], "x", keys[k][0] == 'e' ? 100 : 1, "o", "", 0),
                     SAGA_OK);
  saga__sweep c;
  saga__buf_init(&c.key, NULL);
  c.key_step = -1;
  uint64_t deleted = 0;
  int more = 0;
  assert_int_equal(m->sweep(s, SAGA__SWEEP_INBOX, &c, 2, 50, &deleted, &more), SAGA_OK);
  assert_int_equal(more, 1);
  assert_int_equal(deleted, 2); /* a, b */
  assert_string_equal((const char *)c.key.data, "b");
  more = 0;
  assert_int_equal(m->sweep(s, SAGA__SWEEP_INBOX, &c, 2, 50, &deleted, &more), SAGA_OK);
  assert_int_equal(more, 1);
  assert_int_equal(deleted, 4); /* c, d */
  more = 0;
  assert_int_equal(m->sweep(s, SAGA__SWEEP_INBOX, &c, 2, 50, &deleted, &more), SAGA_OK);
  assert_int_equal(more, 0); /* e alone: kept (recent), back to the start */
  assert_int_equal(deleted, 4);
  assert_int_equal(c.key.len, 0);
  assert_int_equal(mem_store_inbox_rows(s), 1);
  /* Step records: keyed by (saga, step). */
  for (uint32_t k = 0; k < 3; k++)
    assert_int_equal(m->pstep_put(s, "s", k, 1, 1, NULL, 0, 1), SAGA_OK);
  deleted = 0;
  more = 0;
  assert_int_equal(m->sweep(s, SAGA__SWEEP_STEPS, &c, 2, 50, &deleted, &more), SAGA_OK);
  assert_int_equal(deleted, 2);
  assert_int_equal(c.key_step, 1);
  assert_int_equal(m->sweep(s, SAGA__SWEEP_STEPS, &c, 2, 50, &deleted, &more), SAGA_OK);
  assert_int_equal(deleted, 3);
  assert_int_equal(mem_store_pstep_rows(s), 0);
  saga__buf_free(&c.key);
  m->close(s);
}

static void test_mem_store_faults(void **state) {
  saga__store *s = NULL;
  assert_int_equal(mem_store_new(&s), SAGA_OK);
  const saga__store_methods *m = s->m;
  uint64_t max = 0;
  mem_store_fail(s, MEM_OP_OUTBOX_MAX, 1, 2, SAGA_EBUSY);
  assert_int_equal(m->outbox_max(s, &max), SAGA_OK);
  assert_int_equal(m->outbox_max(s, &max), SAGA_EBUSY);
  assert_string_equal(m->errmsg(s), "injected failure of outbox_max");
  assert_int_equal(m->outbox_max(s, &max), SAGA_EBUSY);
  assert_int_equal(m->outbox_max(s, &max), SAGA_OK);
  assert_int_equal(mem_store_calls(s, MEM_OP_OUTBOX_MAX), 4);
  /* A failed write changes nothing. */
  uint64_t d = mem_store_digest(s);
  int64_t w = m->writes(s);
  mem_store_fail(s, MEM_OP_OUTBOX_INSERT, 0, 1, SAGA_EFULL);
  assert_int_equal(m->outbox_insert(s, 1, "c", "a", "b", 1, 0), SAGA_EFULL);
  assert_int_equal(mem_store_digest(s), d);
  assert_int_equal(m->writes(s), w);
  mem_store_fail(s, MEM_OP_BEGIN, 0, 5, SAGA_EBUSY);
  mem_store_fail_clear(s);
  assert_int_equal(m->begin(s), SAGA_OK);
  assert_int_equal(m->commit(s), SAGA_OK);
  assert_null(m->native(s));
  assert_int_equal(m->stop(s, NULL, NULL), 0);
  m->close(s);
}

int main(void) {
  struct CMUnitTest tests[NCELLS + 32];
  size_t n = 0;
  static char names[NCELLS][48];
  for (size_t k = 0; k < NCELLS; k++) {
    snprintf(names[k], sizeof names[k], "cell %s x %s", mode_names[cells[k].mode],
             event_names[cells[k].ev]);
    tests[n++] = (struct CMUnitTest){names[k], test_cell, NULL, NULL, &cells[k]};
  }
  const struct CMUnitTest more[] = {
      cmocka_unit_test(test_all_cells_covered),     cmocka_unit_test(test_happy_path),
      cmocka_unit_test(test_refusal_after_retries), cmocka_unit_test(test_timeout_exhausted),
      cmocka_unit_test(test_last_compensation),     cmocka_unit_test(test_retriable_step),
      cmocka_unit_test(test_cancel_past_pivot),     cmocka_unit_test(test_deadline_after_pivot),
      cmocka_unit_test(test_retry_failed),          cmocka_unit_test(test_forged_reply),
      cmocka_unit_test(test_unknown_saga_reply),    cmocka_unit_test(test_definition_missing),
      cmocka_unit_test(test_failed_save),           cmocka_unit_test(test_idempotent_start),
      cmocka_unit_test(test_undeliverable),         cmocka_unit_test(test_due_batches),
      cmocka_unit_test(test_mem_store_tx),          cmocka_unit_test(test_mem_store_instances),
      cmocka_unit_test(test_mem_store_outbox),      cmocka_unit_test(test_mem_store_sweep),
      cmocka_unit_test(test_mem_store_faults),      cmocka_unit_test(test_reply_data_refused),
      cmocka_unit_test(test_stale_storm_one_row),
      cmocka_unit_test(test_many_definitions),
  };
  for (size_t k = 0; k < sizeof more / sizeof more[0] && n < sizeof tests / sizeof tests[0]; k++)
    tests[n++] = more[k];
  return _cmocka_run_group_tests("machine", tests, n, NULL, NULL);
}
