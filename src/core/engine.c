/*
 * The orchestrator: one saga instance's state machine, driven by replies, timers and
 * operator requests. Every function here runs inside the node's group transaction; what it
 * writes (instance row, history, outbox rows) commits or rolls back together.
 *
 * The state machine is the const table `machine` below: (mode, event) -> action. A mode is
 * derived from the stored state, phase and wait columns; an empty cell means the event does
 * not apply there (a reply is then reported stale and changes nothing).
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "engine.h"

enum { WAIT_NONE = SAGA__WAIT_NONE, WAIT_REPLY = SAGA__WAIT_REPLY, WAIT_BACKOFF = SAGA__WAIT_BACKOFF };
enum { FLAG_UNCERTAIN = 1 }; /* an attempt of the current step timed out */
/* Bits 8 and up of flags hold the attempt number at which an operator retry started a new
 * round: attempt numbers keep growing (message ids stay unique, old replies stay stale) while
 * the retry limit counts from the start of the round. */
#define ROUND_SHIFT 8

static uint32_t round_attempt(const saga__inst *i) {
  return i->attempt - (uint32_t)(i->flags >> ROUND_SHIFT);
}

typedef enum mode {
  M_ACT_WAIT,
  M_ACT_BACKOFF,
  M_RES_WAIT,
  M_RES_BACKOFF,
  M_COMP_WAIT,
  M_COMP_BACKOFF,
  M_DONE,
  M__COUNT
} mode;

typedef enum event {
  E_OK,          /* matching success reply */
  E_FAIL,        /* matching failure reply */
  E_TIMEOUT,     /* reply deadline of the current attempt passed */
  E_BACKOFF_END, /* time for the next attempt */
  E_CANCEL,      /* saga_cancel() */
  E_DEADLINE,    /* whole-saga deadline passed */
  E__COUNT
} event;

typedef int (*action_fn)(saga__engine *e, saga__inst *i, const saga_envelope *reply, event ev);

/* ---- instances ---------------------------------------------------------------------------- */

static int inst_load(saga__engine *e, const char *id, saga__inst *i) {
  saga__store *s = e->env->store;
  int rc = s->m->inst_load(s, id, i);
  if (rc == SAGA_ENOTFOUND) return saga__fail(e->env, rc, "saga '%s' not found", id);
  if (rc == SAGA_ENOMEM) return saga__fail(e->env, rc, "out of memory loading saga");
  if (rc != SAGA_OK) return saga__store_fail(e->env, rc, "loading saga");
  i->def = saga__engine_find(e, i->def_name, i->def_version);
  /* A row that does not fit its definition (edited by hand, damaged) fails its saga's work
   * alone, with a reason, instead of indexing past the steps. */
  if (i->def != NULL && (i->step < 0 || (size_t)i->step >= i->def->nsteps || i->phase < 0 ||
                         i->phase > SAGA_PHASE_RESOLVE))
    return saga__fail(e->env, SAGA_ESTORE, "saga '%s' is inconsistent: step %d phase %d, but "
                      "definition '%s' version %u has %zu steps", i->id, i->step, i->phase,
                      i->def_name, i->def_version, i->def->nsteps);
  return SAGA_OK;
}

static int inst_save(saga__engine *e, saga__inst *i) {
  i->updated_ms = saga__now(e->env);
  saga__store *s = e->env->store;
  int rc = s->m->inst_save(s, i);
  if (rc != SAGA_OK) return saga__store_fail(e->env, rc, "saving saga");
  i->saved_state = i->state;
  i->saved_parked = i->parked;
  return SAGA_OK;
}

/* ---- per-step metrics (engine.h) -------------------------------------------------------- */

/* What an update recorded in the journal counts (saga__step_stat_rec.kind); SS_LATENCY + phase
 * is a reply's latency in that phase. */
enum {
  SS_SENT,         /* value: the attempt number */
  SS_SUCCEEDED,
  SS_FAILED,
  SS_TIMED_OUT,
  SS_COMP_SENT,
  SS_COMPENSATED,
  SS_COMP_FAILED,
  SS_LATENCY       /* + phase; value: ms */
};

static int step_stat(saga__engine *e, const saga__inst *i, uint32_t kind, uint64_t value) {
  return saga__journal_step_stat(e->journal, i->def->steps[i->step].stats, kind, value);
}

/* The per-step counter a transition of i's current step moves, if any (-1: none). */
static int stat_kind(const saga__inst *i, saga_event_type t) {
  int comp = i->phase == SAGA_PHASE_COMPENSATION;
  switch (t) {
  case SAGA_EV_STEP_SENT: return SS_SENT;
  case SAGA_EV_STEP_SUCCEEDED: return SS_SUCCEEDED;
  case SAGA_EV_STEP_FAILED: return comp ? SS_COMP_FAILED : SS_FAILED;
  case SAGA_EV_STEP_TIMED_OUT: return comp ? SS_COMP_FAILED : SS_TIMED_OUT;
  case SAGA_EV_COMPENSATION_SENT: return SS_COMP_SENT;
  case SAGA_EV_COMPENSATED: return SS_COMPENSATED;
  default: return -1;
  }
}

void saga__engine_stats_commit(saga__engine *e) {
  saga__buf *b = &e->journal->step_stats;
  size_t count = b->len / sizeof(saga__step_stat_rec);
  for (size_t k = 0; k < count; k++) {
    saga__step_stat_rec r;
    memcpy(&r, b->data + k * sizeof r, sizeof r);
    if (r.slot >= e->nstep_stats) continue;
    saga__step_stats *s = &e->step_stats[r.slot];
    switch (r.kind) {
    case SS_SENT:
      s->attempts++;
      if (r.value > 1) s->retries++;
      break;
    case SS_SUCCEEDED: s->successes++; break;
    case SS_FAILED: s->failures++; break;
    case SS_TIMED_OUT: s->timeouts++; break;
    case SS_COMP_SENT: s->comp_attempts++; break;
    case SS_COMPENSATED: s->compensations++; break;
    case SS_COMP_FAILED: s->comp_failures++; break;
    default:
      if (r.kind >= SS_LATENCY && r.kind < SS_LATENCY + SAGA__PHASES) {
        unsigned p = r.kind - SS_LATENCY;
        s->latency[p][saga__latency_bucket(r.value)]++;
        s->latency_count[p]++;
        s->latency_sum_ms[p] += r.value;
      }
    }
  }
  saga__buf_reset(b);
}

static int ev(saga__engine *e, saga__inst *i, saga_event_type t, const char *detail) {
  int step = t == SAGA_EV_STARTED || t == SAGA_EV_COMPLETED || t == SAGA_EV_SAGA_COMPENSATED ||
                     t == SAGA_EV_SAGA_FAILED || t == SAGA_EV_CANCELLED ||
                     t == SAGA_EV_DEFINITION_MISSING || t == SAGA_EV_OPERATOR_REQUEST
                 ? -1
                 : i->step;
  int kind = step >= 0 && i->def != NULL ? stat_kind(i, t) : -1;
  if (kind >= 0) {
    int rc = step_stat(e, i, (uint32_t)kind, i->attempt);
    if (rc != SAGA_OK) return rc;
  }
  return saga__journal_event(e->journal, t, i, step, i->attempt, detail);
}

/* ---- spans (saga/trace.h) ---------------------------------------------------------------- */

static saga_span_kind attempt_kind(int phase) {
  return phase == SAGA_PHASE_COMPENSATION ? SAGA_SPAN_COMPENSATION
         : phase == SAGA_PHASE_RESOLVE    ? SAGA_SPAN_RESOLVE
                                          : SAGA_SPAN_STEP;
}

/* "purchase/product.reserve", "purchase/compensate product.reserve", "purchase/resolve ...". */
static void attempt_name(const saga__inst *i, int step, int phase, char *out, size_t len) {
  const saga__step *s = &i->def->steps[step];
  const char *what = s->action != NULL ? s->action : s->name;
  snprintf(out, len, "%s/%s%s", i->def->name,
           phase == SAGA_PHASE_COMPENSATION ? "compensate "
           : phase == SAGA_PHASE_RESOLVE    ? "resolve "
                                            : "",
           what);
}

/* Buffers a span report of i (its trace): the saga's span when kind is SAGA_SPAN_SAGA, else
 * an attempt of (step, phase, attempt) with span id `span`. */
static int span_rec(saga__engine *e, const saga__inst *i, saga_span_event what,
                    saga_span_kind kind, const char *span, int step, int phase,
                    uint32_t attempt, uint64_t start_ns, uint64_t end_ns,
                    saga_span_status status, const char *error) {
  if (!e->journal->keep_spans) return SAGA_OK;
  saga__trace t;
  saga__inst_trace(i, &t);
  saga__span_rec r;
  memset(&r, 0, sizeof r);
  r.event = what;
  r.kind = kind;
  r.status = status;
  memcpy(r.trace_id, t.trace_id, sizeof r.trace_id);
  snprintf(r.span_id, sizeof r.span_id, "%.16s", span);
  /* The saga's span: a child of the caller's span (or a root); an attempt: of the saga's. */
  snprintf(r.parent_id, sizeof r.parent_id, "%.16s",
           kind == SAGA_SPAN_SAGA ? t.span_id : i->trace_span);
  r.flags = t.flags;
  memcpy(r.saga_id, i->id, sizeof r.saga_id);
  r.step = kind == SAGA_SPAN_SAGA ? -1 : step;
  r.attempt = kind == SAGA_SPAN_SAGA ? 0 : attempt;
  r.start_ns = start_ns;
  r.end_ns = end_ns;
  char name[400];
  if (kind == SAGA_SPAN_SAGA)
    snprintf(name, sizeof name, "%s", i->def_name);
  else
    attempt_name(i, step, phase, name, sizeof name);
  return saga__journal_span(e->journal, &r, name, i->def_name, error);
}

/* The start of i's saga span, unix ns (rows older than the trace columns: created_ms). */
static uint64_t saga_start_ns(const saga__inst *i) {
  return i->started_ns != 0 ? i->started_ns : i->created_ms * UINT64_C(1000000);
}

/* ---- sending commands ------------------------------------------------------------------- */

/* The id of the command for i's current step, phase and attempt:
 * "<saga>/<step>/<phase>/<attempt>/<tag>", the tag a keyed hash of the rest under the
 * database's reply key. A reply must carry "<command id>/r": only whoever saw the command can
 * answer it, so a peer allowed to reply cannot answer another participant's step. */
static void command_id(const saga__engine *e, const saga__inst *i, char *out, size_t len) {
  int k = snprintf(out, len, "%s/%d/%d/%" PRIu32, i->id, i->step, i->phase, i->attempt);
  if (k < 0 || (size_t)k >= len) return;
  uint64_t tag = saga__siphash(e->reply_key, out, (size_t)k);
  snprintf(out + k, len - (size_t)k, "/%016" PRIx64, tag);
}

static int send_command(saga__engine *e, saga__inst *i) {
  const saga__step *s = &i->def->steps[i->step];
  char name[320], msg_id[96], trace[96];
  const char *channel = s->local_action ? SAGA__LOCAL_CHANNEL : s->channel;
  saga_event_type sent = SAGA_EV_STEP_SENT;
  if (i->phase == SAGA_PHASE_RESOLVE) {
    snprintf(name, sizeof name, "saga.resolve");
    sent = SAGA_EV_RESOLVE_SENT;
  } else if (s->local_action) {
    snprintf(name, sizeof name, "%s:%u:%d:%s", i->def->name, i->def->version, i->step,
             i->phase == SAGA_PHASE_ACTION ? "action" : "compensation");
  } else {
    snprintf(name, sizeof name, "%s", i->phase == SAGA_PHASE_ACTION ? s->action : s->compensation);
  }
  if (i->phase == SAGA_PHASE_COMPENSATION) sent = SAGA_EV_COMPENSATION_SENT;
  command_id(e, i, msg_id, sizeof msg_id);
  /* A span per attempt, stored with the instance: the reply's transaction ends it with the
   * same id, after a restart too. The command names it as the parent of the handler's. */
  int rc = saga__span_id(e->env, i->attempt_span);
  if (rc != SAGA_OK) return rc;
  i->attempt_ns = saga__now_ns(e->env);
  saga__trace t;
  saga__inst_trace(i, &t);
  saga__trace_format(trace, t.trace_id, i->attempt_span, t.flags);
  saga_header hdr = {"traceparent", trace};
  saga_envelope env;
  memset(&env, 0, sizeof env);
  env.version = SAGA_ENVELOPE_VERSION;
  env.kind = SAGA_MSG_COMMAND;
  env.msg_id = msg_id;
  env.saga_id = i->id;
  env.step = (uint32_t)i->step;
  env.attempt = i->attempt;
  env.phase = (saga_phase)i->phase;
  env.name = name;
  /* A local step's command goes round this node's loopback, and so does its reply: never
   * through the transport, which may have no route to this node's own name. */
  env.reply_to = strcmp(channel, SAGA__LOCAL_CHANNEL) == 0 ? SAGA__LOCAL_CHANNEL : e->reply_to;
  env.headers = &hdr;
  env.nheaders = 1;
  env.payload = i->data.data;
  env.payload_len = i->data.len;
  saga__buf_reset(&e->cmd);
  rc = saga__envelope_encode_buf(&env, &e->cmd);
  if (rc != SAGA_OK) return saga__fail(e->env, rc, "encoding command: %s", saga_strerror(rc));
  if (e->cmd.len > e->env->limits.max_message_bytes) /* data is kept below its limit */
    return saga__fail(e->env, SAGA_ETOOBIG, "command for step '%s' of saga '%s' is %zu bytes; "
                      "the message limit is %zu", s->name, i->id, e->cmd.len,
                      e->env->limits.max_message_bytes);
  rc = saga__journal_outbox(e->journal, channel, i->id, e->cmd.data, e->cmd.len);
  if (rc != SAGA_OK) return rc;
  i->wait = WAIT_REPLY;
  i->step_deadline = s->timeout_ms ? saga__now(e->env) + s->timeout_ms : 0;
  rc = span_rec(e, i, SAGA_SPAN_START, attempt_kind(i->phase), i->attempt_span, i->step,
                i->phase, i->attempt, i->attempt_ns, 0, SAGA_SPAN_UNSET, "");
  return rc != SAGA_OK ? rc : ev(e, i, sent, "");
}

/* ---- helpers of the actions ------------------------------------------------------------- */

static int has_compensation(const saga__step *s) {
  return s->kind == SAGA_STEP_COMPENSATABLE && (s->compensation != NULL || s->local_compensation);
}

static int finish(saga__engine *e, saga__inst *i, int state, saga_event_type t, const char *why) {
  i->state = state;
  i->wait = WAIT_NONE;
  i->step_deadline = i->saga_deadline = 0;
  return ev(e, i, t, why);
}

/* Compensates, in reverse order, every compensatable step at or below `from`. */
static int begin_comp(saga__engine *e, saga__inst *i, int from) {
  int j = from;
  while (j >= 0 && !has_compensation(&i->def->steps[j])) j--;
  i->saga_deadline = 0;
  if (j < 0) {
    i->step = from < 0 ? 0 : from;
    return finish(e, i, SAGA_COMPENSATED, SAGA_EV_SAGA_COMPENSATED, "");
  }
  i->state = SAGA_COMPENSATING;
  i->phase = SAGA_PHASE_COMPENSATION;
  i->step = j;
  i->attempt = 1;
  i->flags = 0;
  return send_command(e, i);
}

static double rand01(saga__engine *e) { return (double)(saga__rand(e->env) >> 11) / 9007199254740992.0; }

static int schedule_retry(saga__engine *e, saga__inst *i) {
  const saga__step *s = &i->def->steps[i->step];
  const saga_retry *r = i->phase == SAGA_PHASE_COMPENSATION ? &s->comp_retry : &s->retry;
  uint64_t delay = saga__retry_delay(r, round_attempt(i), rand01(e));
  i->wait = WAIT_BACKOFF;
  i->step_deadline = saga__now(e->env) + delay;
  char why[64];
  snprintf(why, sizeof why, "attempt %" PRIu32 " in %" PRIu64 " ms", i->attempt + 1, delay);
  return ev(e, i, SAGA_EV_STEP_RETRY, why);
}

static uint32_t comp_max(const saga__step *s) { return saga__retry_max(&s->comp_retry); }

/* Merges the reply's data into the saga data. SAGA_OK; SAGA_ENOMEM; or another code when the
 * data cannot be used (undecodable, or the merge would exceed the limits), with why set. */
static int merge_reply(saga__engine *e, saga__inst *i, const saga_envelope *r, char *why,
                       size_t why_len) {
  if (r == NULL || r->payload_len == 0 ||
      (r->payload_len == 1 && ((const uint8_t *)r->payload)[0] == 0x80))
    return SAGA_OK;
  saga_data *cur = NULL, *add = NULL;
  char err[300] = "";
  saga__buf *m = &e->merged;
  saga__buf_reset(m);
  int rc = saga__data_decode(i->data.data, i->data.len, &e->env->limits, e->env->alloc, &cur,
                             err, sizeof err);
  if (rc == SAGA_OK)
    rc = saga__data_decode(r->payload, r->payload_len, &e->env->limits, e->env->alloc, &add,
                           err, sizeof err);
  if (rc == SAGA_OK) rc = saga_data_merge(cur, add);
  if (rc == SAGA_OK) rc = saga__data_encode(cur, m);
  if (rc == SAGA_OK) {
    rc = saga__data_fits(e->env, "the merged saga data", saga_data_count(cur), m->len);
    if (rc != SAGA_OK) saga__printable(err, sizeof err, e->env->errmsg, strlen(e->env->errmsg));
  }
  saga_data_free(cur);
  saga_data_free(add);
  if (rc == SAGA_ENOMEM) return saga__fail(e->env, rc, "out of memory merging reply data");
  if (rc != SAGA_OK) {
    snprintf(why, why_len, "%s", err[0] ? err : saga_strerror(rc));
    return rc;
  }
  saga__buf_reset(&i->data);
  return saga__buf_append(&i->data, m->data, m->len) == SAGA_OK
             ? SAGA_OK
             : saga__fail(e->env, SAGA_ENOMEM, "out of memory merging reply data");
}

/* ---- the actions ------------------------------------------------------------------------ */

/* The current step succeeded (its data merged): on to the next step, or COMPLETED. */
static int advance(saga__engine *e, saga__inst *i, const char *detail) {
  int rc = ev(e, i, SAGA_EV_STEP_SUCCEEDED, detail);
  if (rc != SAGA_OK) return rc;
  i->step++;
  i->flags = 0;
  if ((size_t)i->step >= i->def->nsteps) {
    i->step = (int)i->def->nsteps - 1;
    return finish(e, i, SAGA_COMPLETED, SAGA_EV_COMPLETED, "");
  }
  if (i->step >= i->def->pivot) i->saga_deadline = 0;
  i->phase = SAGA_PHASE_ACTION;
  i->attempt = 1;
  return send_command(e, i);
}

static int act_ok(saga__engine *e, saga__inst *i, const saga_envelope *r, event evt) {
  char why[300];
  int rc = merge_reply(e, i, r, why, sizeof why);
  if (rc == SAGA_OK) return advance(e, i, "");
  if (rc == SAGA_ENOMEM) return rc;
  /* The step applied, but its reply's data cannot be used (an older or misbehaving
   * participant: today's refuse such replies before committing). Never retried as if
   * transient: before the pivot the step is undone with the earlier ones; past it the saga
   * goes on without that data. */
  const saga__step *s = &i->def->steps[i->step];
  char detail[400];
  snprintf(detail, sizeof detail, "reply data refused: %s", why);
  saga__log(e->env, SAGA_LOG_WARN, "saga %s step '%s': %s", i->id, s->name, detail);
  if (i->step >= i->def->pivot) return advance(e, i, detail);
  snprintf(i->error, sizeof i->error, "%s: %s", s->name, detail);
  rc = ev(e, i, SAGA_EV_STEP_FAILED, detail);
  return rc != SAGA_OK ? rc : begin_comp(e, i, i->step);
}

static int act_fail(saga__engine *e, saga__inst *i, const saga_envelope *r, event evt) {
  const saga__step *s = &i->def->steps[i->step];
  const char *why = r && r->error[0] ? r->error : "failed";
  snprintf(i->error, sizeof i->error, "%s: %s", s->name, why);
  int rc = ev(e, i, SAGA_EV_STEP_FAILED, why);
  if (rc != SAGA_OK) return rc;
  if (s->kind == SAGA_STEP_RETRIABLE ||
      (s->retry.retry_before_compensate && i->attempt < saga__retry_max(&s->retry)))
    return schedule_retry(e, i);
  /* A refusal of the latest attempt is definitive: the participant refuses older attempts
   * once it has answered a newer one, so this step cannot apply later. */
  return begin_comp(e, i, i->step - 1);
}

static int act_timeout(saga__engine *e, saga__inst *i, const saga_envelope *r, event evt) {
  const saga__step *s = &i->def->steps[i->step];
  int rc = ev(e, i, SAGA_EV_STEP_TIMED_OUT, "");
  if (rc != SAGA_OK) return rc;
  i->flags |= FLAG_UNCERTAIN;
  if (s->kind == SAGA_STEP_RETRIABLE || i->attempt < saga__retry_max(&s->retry))
    return schedule_retry(e, i);
  snprintf(i->error, sizeof i->error, "%s: timed out after %" PRIu32 " attempts", s->name,
           i->attempt);
  if (s->kind == SAGA_STEP_PIVOT) {
    /* The pivot's outcome is unknown and it has no compensation: ask its participant. */
    i->phase = SAGA_PHASE_RESOLVE;
    i->attempt = 1;
    return send_command(e, i);
  }
  /* Outcome unknown: compensate this step too; its participant tombstones it if the action
   * never arrived, so a late action is refused. */
  return begin_comp(e, i, i->step);
}

static int act_resend(saga__engine *e, saga__inst *i, const saga_envelope *r, event evt) {
  i->attempt++;
  return send_command(e, i);
}

static int res_absent(saga__engine *e, saga__inst *i, const saga_envelope *r, event evt) {
  int rc = ev(e, i, SAGA_EV_STEP_FAILED, "pivot did not apply");
  if (rc != SAGA_OK) return rc;
  return begin_comp(e, i, i->step - 1);
}

static int res_retry(saga__engine *e, saga__inst *i, const saga_envelope *r, event evt) {
  int rc = ev(e, i, SAGA_EV_STEP_TIMED_OUT, "resolve");
  return rc != SAGA_OK ? rc : schedule_retry(e, i);
}

static int comp_ok(saga__engine *e, saga__inst *i, const saga_envelope *r, event evt) {
  int rc = ev(e, i, SAGA_EV_COMPENSATED, "");
  if (rc != SAGA_OK) return rc;
  if (i->step == 0) return finish(e, i, SAGA_COMPENSATED, SAGA_EV_SAGA_COMPENSATED, "");
  return begin_comp(e, i, i->step - 1);
}

static int comp_fail(saga__engine *e, saga__inst *i, const saga_envelope *r, event evt) {
  const saga__step *s = &i->def->steps[i->step];
  const char *why = evt == E_TIMEOUT ? "compensation timed out"
                                   : (r && r->error[0] ? r->error : "compensation failed");
  int rc = ev(e, i, evt == E_TIMEOUT ? SAGA_EV_STEP_TIMED_OUT : SAGA_EV_STEP_FAILED, why);
  if (rc != SAGA_OK) return rc;
  /* The participant no longer knows whether the action applied (its record of the step
   * expired): asking again gives the same answer. FAILED, for an operator to decide. */
  int expired = evt != E_TIMEOUT && r != NULL && r->status == SAGA_EEXPIRED;
  if (!expired && round_attempt(i) < comp_max(s)) return schedule_retry(e, i);
  snprintf(i->error, sizeof i->error, "compensation of %s failed after %" PRIu32
           " attempts: %s", s->name, round_attempt(i), why);
  rc = ev(e, i, SAGA_EV_COMPENSATION_FAILED, why);
  if (rc != SAGA_OK) return rc;
  return finish(e, i, SAGA_FAILED, SAGA_EV_SAGA_FAILED, i->error);
}

static int abort_running(saga__engine *e, saga__inst *i, const saga_envelope *r, event evt) {
  if (i->step >= i->def->pivot) {
    i->saga_deadline = 0;
    if (evt == E_DEADLINE) return SAGA_OK; /* past the point of no return: run to the end */
    return saga__fail(e->env, SAGA_ESTATE, "saga '%s' is past its pivot and cannot be "
                                           "cancelled", i->id);
  }
  const char *why = evt == E_DEADLINE ? "saga deadline reached" : "cancelled";
  snprintf(i->error, sizeof i->error, "%s", why);
  int rc = ev(e, i, SAGA_EV_CANCELLED, why);
  /* The current step may be in flight: compensate it too (tombstoned if it never ran). */
  return rc != SAGA_OK ? rc : begin_comp(e, i, i->step);
}

static const action_fn machine[M__COUNT][E__COUNT] = {
    /*                 E_OK     E_FAIL      E_TIMEOUT    E_BACKOFF_END E_CANCEL       E_DEADLINE */
    [M_ACT_WAIT] = {act_ok, act_fail, act_timeout, NULL, abort_running, abort_running},
    [M_ACT_BACKOFF] = {NULL, NULL, NULL, act_resend, abort_running, abort_running},
    [M_RES_WAIT] = {act_ok, res_absent, res_retry, NULL, NULL, NULL},
    [M_RES_BACKOFF] = {NULL, NULL, NULL, act_resend, NULL, NULL},
    [M_COMP_WAIT] = {comp_ok, comp_fail, comp_fail, NULL, NULL, NULL},
    [M_COMP_BACKOFF] = {NULL, NULL, NULL, act_resend, NULL, NULL},
    [M_DONE] = {NULL, NULL, NULL, NULL, NULL, NULL},
};

static mode mode_of(const saga__inst *i) {
  int backoff = i->wait == WAIT_BACKOFF;
  switch (i->state) {
  case SAGA_RUNNING:
    if (i->phase == SAGA_PHASE_RESOLVE) return backoff ? M_RES_BACKOFF : M_RES_WAIT;
    return backoff ? M_ACT_BACKOFF : M_ACT_WAIT;
  case SAGA_COMPENSATING:
    return backoff ? M_COMP_BACKOFF : M_COMP_WAIT;
  default:
    return M_DONE;
  }
}

/* The one step function: applies e to i and saves it. Returns SAGA_ESTATE when e does not
 * apply in i's mode (nothing changed). */
static int is_terminal(int state) {
  return state == SAGA_COMPLETED || state == SAGA_COMPENSATED || state == SAGA_FAILED;
}

/* The attempt in flight before a transition: its span ends when the transition leaves it. */
typedef struct open_attempt {
  int open, step, phase, state;
  uint32_t attempt;
  char span[20];
  uint64_t start_ns;
} open_attempt;

/* Reports the end of the attempt a (if the transition left it) and of the saga (if it
 * became terminal). */
static int end_spans(saga__engine *e, saga__inst *i, const open_attempt *a, event evt,
                     const saga_envelope *r) {
  if (i->wait != WAIT_REPLY) i->attempt_span[0] = '\0'; /* no attempt in flight */
  if (!e->journal->keep_spans) return SAGA_OK;
  int left = i->step != a->step || i->phase != a->phase || i->attempt != a->attempt ||
             i->wait != WAIT_REPLY || is_terminal(i->state);
  int rc = SAGA_OK;
  if (a->open && left) {
    saga_span_status st = SAGA_SPAN_ERROR;
    const char *why = "";
    char buf[160];
    switch (evt) {
    case E_OK:
      st = SAGA_SPAN_OK;
      break;
    case E_FAIL:
      st = r != NULL && r->status == SAGA_EREFUSED ? SAGA_SPAN_REFUSED : SAGA_SPAN_ERROR;
      if (r != NULL && r->error[0] != '\0') {
        why = r->error;
      } else {
        snprintf(buf, sizeof buf, "%s", r != NULL ? saga_strerror(r->status) : "failed");
        why = buf;
      }
      break;
    case E_TIMEOUT:
      why = "timed out";
      break;
    case E_DEADLINE:
      why = "saga deadline reached";
      break;
    default:
      why = "cancelled";
      break;
    }
    rc = span_rec(e, i, SAGA_SPAN_END, attempt_kind(a->phase), a->span, a->step, a->phase,
                  a->attempt, a->start_ns, saga__now_ns(e->env), st, why);
  }
  if (rc == SAGA_OK && is_terminal(i->state) && !is_terminal(a->state)) {
    saga_span_status st = i->state == SAGA_COMPLETED     ? SAGA_SPAN_OK
                          : i->state == SAGA_COMPENSATED ? SAGA_SPAN_REFUSED
                                                         : SAGA_SPAN_ERROR;
    rc = span_rec(e, i, SAGA_SPAN_END, SAGA_SPAN_SAGA, i->trace_span, -1, 0, 0,
                  saga_start_ns(i), saga__now_ns(e->env), st,
                  i->state == SAGA_COMPLETED ? "" : i->error);
  }
  return rc;
}

static int step(saga__engine *e, saga__inst *i, event evt, const saga_envelope *r) {
  mode m = mode_of(i);
  action_fn fn = machine[m][evt];
  if (fn == NULL)
    return saga__fail(e->env, SAGA_ESTATE, "saga '%s' is %s; %s does not apply", i->id,
                           saga_state_name(i->state),
                           evt == E_CANCEL ? "cancel" : "this event");
  open_attempt a;
  a.open = (m == M_ACT_WAIT || m == M_RES_WAIT || m == M_COMP_WAIT) && i->attempt_span[0];
  a.step = i->step;
  a.phase = i->phase;
  a.state = i->state;
  a.attempt = i->attempt;
  memcpy(a.span, i->attempt_span, sizeof a.span);
  a.start_ns = i->attempt_ns;
  int rc = fn(e, i, r, evt);
  if (rc == SAGA_OK) rc = end_spans(e, i, &a, evt, r);
  /* A saga that ended well holds no lock in this database any more (saga/lock.h); a FAILED
   * one keeps its locks until its repair. */
  if (rc == SAGA_OK && (i->state == SAGA_COMPLETED || i->state == SAGA_COMPENSATED) &&
      !is_terminal(a.state))
    rc = saga__locks_release(e->env, i->id, -1, NULL);
  if (rc == SAGA_OK) rc = inst_save(e, i);
  if (rc == SAGA_OK) SAGA__HOOK(e->env, "engine.after_transition");
  return rc;
}

/* ---- entry points ----------------------------------------------------------------------- */

static void hex(char *out, uint64_t v, int digits) {
  static const char x[] = "0123456789abcdef";
  for (int k = digits - 1; k >= 0; k--, v >>= 4) out[k] = x[v & 15];
  out[digits] = '\0';
}

static void hex_bytes(char *out, const uint8_t *b, size_t len) {
  static const char x[] = "0123456789abcdef";
  for (size_t k = 0; k < len; k++) {
    out[2 * k] = x[b[k] >> 4];
    out[2 * k + 1] = x[b[k] & 15];
  }
  out[2 * len] = '\0';
}

int saga__engine_start(saga__engine *e, const saga__def *def, const void *input,
                       size_t input_len, const char *idem_key, const char *traceparent,
                       char id_out[40], int *existed) {
  saga__store *s = e->env->store;
  *existed = 0;
  if (idem_key != NULL) {
    int rc = s->m->inst_find_key(s, def->name, idem_key, id_out);
    if (rc == SAGA_OK) {
      *existed = 1;
      return SAGA_OK;
    }
    if (rc != SAGA_ENOTFOUND) return saga__store_fail(e->env, rc, "idempotency key");
  }
  saga__inst *i = &e->inst;
  uint64_t now = saga__now(e->env);
  /* Time-ordered ids (48 bits of ms, then 80 random bits, as UUIDv7 does): the rows of the
   * sagas in flight, keyed by id in every table, sit together at the right edge of each
   * B-tree instead of on random pages, so a commit writes few pages. The random bits come
   * from the OS CSPRNG: a reply is matched to its saga by this id (and to the step by small
   * numbers), so an id seen must not tell the next ones. Message ids and the W3C trace id
   * derive from it; the trace span id is 64 more CSPRNG bits. */
  uint8_t rnd[18];
  int rc = saga__id_bytes(e->env, rnd, sizeof rnd);
  if (rc != SAGA_OK) return rc;
  hex(i->id, now & UINT64_C(0xffffffffffff), 12);
  hex_bytes(i->id + 12, rnd, 10);
  hex_bytes(i->trace_span, rnd + 10, 8);
  snprintf(i->def_name, sizeof i->def_name, "%s", def->name);
  i->def = def;
  i->def_version = def->version;
  i->state = SAGA_RUNNING;
  i->phase = SAGA_PHASE_ACTION;
  i->step = 0;
  i->attempt = 1;
  i->wait = WAIT_NONE;
  i->flags = 0;
  i->hseq = 0;
  i->parked = 0;
  i->error[0] = '\0';
  i->created_ms = i->updated_ms = now;
  i->step_deadline = 0;
  i->saga_deadline = def->deadline_ms ? now + def->deadline_ms : 0;
  /* The caller's context, checked by whoever took it (saga_start_traced, a handler's). */
  i->trace_parent[0] = '\0';
  if (traceparent != NULL && saga_traceparent_check(traceparent, NULL) == SAGA_OK)
    snprintf(i->trace_parent, sizeof i->trace_parent, "%s", traceparent);
  i->started_ns = saga__now_ns(e->env);
  i->attempt_span[0] = '\0';
  i->attempt_ns = 0;
  saga__buf_reset(&i->data);
  static const uint8_t empty_map = 0x80;
  rc = input_len ? saga__buf_append(&i->data, input, input_len)
                 : saga__buf_append(&i->data, &empty_map, 1);
  if (rc != SAGA_OK) return saga__fail(e->env, rc, "out of memory starting saga");
  rc = s->m->inst_insert(s, i, idem_key);
  if (rc != SAGA_OK) return saga__store_fail(e->env, rc, "inserting saga");
  i->exists = 1;
  i->saved_state = i->state;
  i->saved_parked = 0;
  rc = ev(e, i, SAGA_EV_STARTED, "");
  if (rc == SAGA_OK)
    rc = span_rec(e, i, SAGA_SPAN_START, SAGA_SPAN_SAGA, i->trace_span, -1, 0, 0,
                  i->started_ns, 0, SAGA_SPAN_UNSET, "");
  if (rc == SAGA_OK) rc = send_command(e, i);
  if (rc == SAGA_OK) rc = inst_save(e, i);
  if (rc == SAGA_OK) memcpy(id_out, i->id, sizeof i->id);
  return rc;
}

int saga__engine_reply(saga__engine *e, const saga_envelope *r) {
  saga__inst *i = &e->inst;
  int rc = inst_load(e, r->saga_id, i);
  if (rc == SAGA_ENOTFOUND) {
    saga__log(e->env, SAGA_LOG_WARN, "reply '%s' for unknown saga '%s' ignored", r->msg_id,
                   r->saga_id);
    return SAGA_OK;
  }
  if (rc != SAGA_OK) return rc;
  if (i->def == NULL) {
    /* Kept for later (batch.c parks it) only when it answers the command this node sent
     * last: a forged or stale reply must not fill the database while the version is away. */
    char sent[128];
    command_id(e, i, sent, sizeof sent - 2);
    strcat(sent, "/r");
    if (strcmp(r->msg_id, sent) != 0) {
      e->env->stats.stale_replies++;
      saga__log(e->env, SAGA_LOG_WARN, "reply for saga '%s' (definition '%s' version %" PRIu32
                " not registered) does not answer its last command: ignored", r->saga_id,
                i->def_name, i->def_version);
      return SAGA_OK;
    }
    return saga__fail(e->env, SAGA_ENODEF, "saga '%s' runs definition '%s' version %" PRIu32
                      ", which this node has not registered", i->id, i->def_name,
                      i->def_version);
  }
  mode m = mode_of(i);
  int waiting = m == M_ACT_WAIT || m == M_RES_WAIT || m == M_COMP_WAIT;
  if (!waiting || r->phase != (saga_phase)i->phase || r->step != (uint32_t)i->step ||
      r->attempt != i->attempt) {
    e->env->stats.stale_replies++;
    if (i->state == SAGA_COMPLETED || i->state == SAGA_COMPENSATED) {
      /* A finished saga records nothing more: a storm of duplicates must not grow its
       * history (or cost a write each). Counted and logged only. */
      saga__log(e->env, SAGA_LOG_DEBUG, "reply '%s' for finished saga '%s' ignored", r->msg_id,
                     r->saga_id);
      return SAGA_OK;
    }
    char why[160];
    snprintf(why, sizeof why, "reply (status %d) for step %" PRIu32 " phase %d attempt %" PRIu32
             " ignored", r->status, r->step, (int)r->phase, r->attempt);
    /* A storm of copies of one reply (a peer back from an outage answers every resend)
     * writes one history row: the same reply again right after it is counted only. */
    int last = 0;
    rc = saga__journal_last(e->journal, i, &last, &e->merged);
    if (rc != SAGA_OK) return rc;
    if (last == SAGA_EV_STALE_REPLY && strcmp((const char *)e->merged.data, why) == 0) {
      saga__log(e->env, SAGA_LOG_DEBUG, "reply '%s' for saga '%s' ignored again", r->msg_id,
                r->saga_id);
      return SAGA_OK;
    }
    rc = ev(e, i, SAGA_EV_STALE_REPLY, why);
    return rc == SAGA_OK ? inst_save(e, i) : rc;
  }
  char expect[128];
  command_id(e, i, expect, sizeof expect - 2);
  strcat(expect, "/r");
  if (strcmp(r->msg_id, expect) != 0) {
    e->env->stats.forged_replies++;
    char shown[100];
    saga__printable(shown, sizeof shown, r->msg_id, strlen(r->msg_id));
    saga__log(e->env, SAGA_LOG_WARN, "reply '%s' for saga '%s' does not answer the command "
                   "this node sent (wrong id tag): ignored", shown, r->saga_id);
    return SAGA_OK;
  }
  uint64_t now = saga__now(e->env);
  uint64_t ms = now > i->updated_ms ? now - i->updated_ms : 0;
  saga__latency(e->env, ms);
  rc = step_stat(e, i, SS_LATENCY + (uint32_t)i->phase, ms);
  return rc != SAGA_OK ? rc : step(e, i, r->status == 0 ? E_OK : E_FAIL, r);
}

int saga__engine_undeliverable(saga__engine *e, const saga_envelope *cmd, int code,
                               const char *reason) {
  saga__inst *i = &e->inst;
  int rc = inst_load(e, cmd->saga_id, i);
  if (rc == SAGA_ENOTFOUND) return SAGA_OK;
  if (rc != SAGA_OK) return rc;
  if (i->def == NULL) return SAGA_OK;
  mode m = mode_of(i);
  int waiting = m == M_ACT_WAIT || m == M_RES_WAIT || m == M_COMP_WAIT;
  if (!waiting || cmd->phase != (saga_phase)i->phase || cmd->step != (uint32_t)i->step ||
      cmd->attempt != i->attempt)
    return SAGA_OK; /* an older attempt, or the saga moved on: nothing waits for it */
  /* The attempt will never be answered: as if its participant had answered with the
   * failure. The command never left this node (a permanent refusal means the transport can
   * never deliver it), so an action fails like a refusal: retried per its policy, else the
   * earlier steps are compensated. But when an earlier attempt of the action timed out, that
   * one may have applied: then it is the timeout path (retry, or compensate this step too).
   * A resolve that cannot be sent proves nothing about the pivot: the timeout path as well
   * (ask again after the backoff). A compensation fails and is retried per its policy. */
  saga_envelope r;
  memset(&r, 0, sizeof r);
  r.version = SAGA_ENVELOPE_VERSION;
  r.kind = SAGA_MSG_REPLY;
  r.msg_id = "";
  r.saga_id = cmd->saga_id;
  r.step = cmd->step;
  r.attempt = cmd->attempt;
  r.phase = cmd->phase;
  r.name = cmd->name;
  r.status = code;
  r.error = reason;
  event evt = E_FAIL;
  if (m == M_RES_WAIT || (m == M_ACT_WAIT && (i->flags & FLAG_UNCERTAIN))) evt = E_TIMEOUT;
  return step(e, i, evt, &r);
}

int saga__engine_due_list(saga__engine *e, uint64_t now, size_t max, size_t *count) {
  /* Collected first: the scan must not run while rows are being updated. */
  saga__buf_reset(&e->ids);
  saga__store *s = e->env->store;
  *count = 0;
  int rc = s->m->inst_due(s, now, max, &e->ids, count);
  if (rc == SAGA_ENOMEM) return saga__fail(e->env, rc, "out of memory collecting timers");
  if (rc != SAGA_OK) return saga__store_fail(e->env, rc, "reading timers");
  return SAGA_OK;
}

const char *saga__engine_due_id(const saga__engine *e, size_t k) {
  return (const char *)e->ids.data + k * 40;
}

int saga__engine_due_one(saga__engine *e, const char *id, uint64_t now) {
  saga__inst *i = &e->inst;
  int rc = inst_load(e, id, i);
  if (rc == SAGA_ENOTFOUND) return SAGA_OK; /* gone meanwhile */
  if (rc != SAGA_OK) return rc;
  if (i->def == NULL) {
    i->parked = 1;
    rc = ev(e, i, SAGA_EV_DEFINITION_MISSING, "definition version not registered");
    return rc == SAGA_OK ? inst_save(e, i) : rc;
  }
  event evt;
  if (i->saga_deadline != 0 && now >= i->saga_deadline && i->state == SAGA_RUNNING)
    evt = E_DEADLINE;
  else if (i->step_deadline != 0 && now >= i->step_deadline)
    evt = i->wait == WAIT_BACKOFF ? E_BACKOFF_END : E_TIMEOUT;
  else
    evt = E__COUNT;
  if (evt == E__COUNT || machine[mode_of(i)][evt] == NULL) {
    /* Nothing applies (e.g. a deadline of a finished phase): clear it. */
    if (evt == E_DEADLINE || evt == E__COUNT) i->saga_deadline = 0;
    if (evt != E__COUNT && evt != E_DEADLINE) i->step_deadline = 0;
    return inst_save(e, i);
  }
  return step(e, i, evt, NULL);
}

int saga__engine_due(saga__engine *e, uint64_t now, size_t max, size_t *processed) {
  int rc = saga__engine_due_list(e, now, max, processed);
  for (size_t k = 0; rc == SAGA_OK && k < *processed; k++)
    rc = saga__engine_due_one(e, saga__engine_due_id(e, k), now);
  return rc;
}

int saga__engine_cancel(saga__engine *e, const char *id) {
  saga__inst *i = &e->inst;
  int rc = inst_load(e, id, i);
  if (rc != SAGA_OK) return rc;
  if (i->def == NULL)
    return saga__fail(e->env, SAGA_ENODEF, "definition '%s' version %u is not registered",
                           i->def_name, i->def_version);
  return step(e, i, E_CANCEL, NULL);
}

/* Resumes the compensation of a FAILED saga (loaded into i) with a new round of attempts. */
static int retry_failed(saga__engine *e, saga__inst *i) {
  i->state = SAGA_COMPENSATING;
  i->phase = SAGA_PHASE_COMPENSATION;
  i->flags = (int)(i->attempt << ROUND_SHIFT);
  i->attempt++;
  i->error[0] = '\0';
  int rc = send_command(e, i);
  return rc != SAGA_OK ? rc : inst_save(e, i);
}

/* Loads saga id into e->inst for a retry: it must exist, have its definition and be FAILED. */
static int load_failed(saga__engine *e, const char *id) {
  saga__inst *i = &e->inst;
  int rc = inst_load(e, id, i);
  if (rc != SAGA_OK) return rc;
  if (i->def == NULL)
    return saga__fail(e->env, SAGA_ENODEF, "definition '%s' version %u is not registered",
                           i->def_name, i->def_version);
  if (i->state != SAGA_FAILED)
    return saga__fail(e->env, SAGA_ESTATE, "saga '%s' is %s, not FAILED", id,
                           saga_state_name(i->state));
  return SAGA_OK;
}

int saga__engine_retry(saga__engine *e, const char *id) {
  int rc = load_failed(e, id);
  return rc != SAGA_OK ? rc : retry_failed(e, &e->inst);
}

int saga__engine_operator(saga__engine *e, const char *id, int cancel, const char *note) {
  saga__inst *i = &e->inst;
  int rc;
  if (cancel) {
    rc = inst_load(e, id, i);
    if (rc != SAGA_OK) return rc;
    if (i->def == NULL)
      return saga__fail(e->env, SAGA_ENODEF, "definition '%s' version %u is not registered",
                             i->def_name, i->def_version);
    if (machine[mode_of(i)][E_CANCEL] == NULL) {
      if (i->state == SAGA_RUNNING)
        return saga__fail(e->env, SAGA_ESTATE, "saga '%s' is past its pivot (step %d, '%s'):"
                          " it runs to completion and can no longer be cancelled", id,
                          i->step, i->def->steps[i->step].name);
      return saga__fail(e->env, SAGA_ESTATE, "saga '%s' is %s: cancel applies to a RUNNING saga"
                        " before its pivot", id, saga_state_name(i->state));
    }
  } else {
    rc = load_failed(e, id);
    if (rc != SAGA_OK) return rc;
  }
  rc = ev(e, i, SAGA_EV_OPERATOR_REQUEST, note);
  if (rc != SAGA_OK) return rc;
  return cancel ? step(e, i, E_CANCEL, NULL) : retry_failed(e, i);
}

typedef struct recovery {
  saga__engine *e;
  int oom;
} recovery;

typedef struct todo {
  char id[40];
  int action; /* 1 unpark, 2 report missing */
} todo;

static void recovery_row(void *arg, const char *id, const char *def_name, uint32_t version,
                         int parked) {
  recovery *r = arg;
  todo t;
  memset(&t, 0, sizeof t);
  snprintf(t.id, sizeof t.id, "%s", id);
  int known = saga__engine_find(r->e, def_name, version) != NULL;
  t.action = known ? (parked ? 1 : 0) : 2;
  if (t.action != 0 && saga__buf_append(&r->e->ids, &t, sizeof t) != SAGA_OK) r->oom = 1;
}

int saga__engine_unpark(saga__engine *e, int *missing) {
  saga__buf *list = &e->ids;
  saga__buf_reset(list);
  saga__store *s = e->env->store;
  recovery r = {e, 0};
  int rc = s->m->inst_inflight(s, recovery_row, &r);
  if (rc != SAGA_OK) return saga__store_fail(e->env, rc, "recovery scan");
  if (r.oom) return saga__fail(e->env, SAGA_ENOMEM, "out of memory during recovery");
  size_t count = list->len / sizeof(todo);
  for (size_t k = 0; k < count; k++) {
    todo t;
    memcpy(&t, list->data + k * sizeof t, sizeof t);
    if (t.action == 1) {
      rc = s->m->inst_unpark(s, t.id);
      if (rc != SAGA_OK) return saga__store_fail(e->env, rc, "unparking saga");
      continue;
    }
    saga__inst *i = &e->inst;
    rc = inst_load(e, t.id, i);
    if (rc != SAGA_OK) return rc;
    (*missing)++;
    char why[240];
    snprintf(why, sizeof why, "definition '%s' version %u is not registered", i->def_name,
             i->def_version);
    saga__log(e->env, SAGA_LOG_WARN, "saga %s: %s; left untouched", i->id, why);
    i->parked = 1;
    rc = ev(e, i, SAGA_EV_DEFINITION_MISSING, why);
    if (rc == SAGA_OK) rc = inst_save(e, i);
    if (rc != SAGA_OK) return rc;
  }
  return SAGA_OK;
}

/* ---- definitions and setup -------------------------------------------------------------- */

void saga__engine_init(saga__engine *e, saga__env *env, saga__journal *j, const char *reply_to) {
  memset(e, 0, sizeof *e);
  e->env = env;
  e->journal = j;
  e->reply_to = reply_to;
  saga__inst_init(&e->inst, env->alloc);
  saga__buf_init(&e->cmd, env->alloc);
  saga__buf_init(&e->ids, env->alloc);
  saga__buf_init(&e->merged, env->alloc);
}

void saga__engine_free(saga__engine *e) {
  for (size_t k = 0; k < e->ndefs; k++) saga__def_free(&e->defs[k], e->env->alloc);
  saga__free(e->env->alloc, e->defs);
  saga__free(e->env->alloc, e->def_slots);
  saga__free(e->env->alloc, e->def_latest);
  saga__free(e->env->alloc, e->step_stats);
  saga__free(e->env->alloc, e->ss_slots);
  e->step_stats = NULL;
  e->ss_slots = NULL;
  e->nstep_stats = e->step_stats_cap = e->ss_cap = 0;
  e->defs = NULL;
  e->def_slots = NULL;
  e->def_latest = NULL;
  e->ndefs = e->def_cap = 0;
  saga__inst_free(&e->inst);
  saga__buf_free(&e->cmd);
  saga__buf_free(&e->ids);
  saga__buf_free(&e->merged);
}

/* Definitions are found through an open-addressing hash of (name, version) — version 0
 * standing for "the highest registered" — so that registering and looking up stay constant
 * time with many definitions. A slot holds a definition's index + 1 (0 = empty). */
static uint64_t def_hash(const char *name, uint32_t version) {
  uint64_t h = 1469598103934665603ull;
  for (const char *c = name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
  h ^= version;
  h *= 0x9e3779b97f4a7c15ull;
  return h ^ (h >> 29);
}

/* The slot of (name, version): the one holding it, or the empty one where it would go. */
static size_t def_slot(const saga__engine *e, const char *name, uint32_t version) {
  size_t mask = e->def_cap - 1, k = (size_t)def_hash(name, version) & mask;
  for (;; k = (k + 1) & mask) {
    ((saga__engine *)e)->def_probes++;
    uint32_t v = e->def_slots[k];
    if (v == 0) return k;
    const saga__def *d = &e->defs[v - 1];
    uint32_t dv = e->def_latest[k] ? 0 : d->version;
    if (dv == version && strcmp(d->name, name) == 0) return k;
  }
}

const saga__def *saga__engine_find(const saga__engine *e, const char *name, uint32_t version) {
  if (e->def_cap == 0) return NULL;
  uint32_t v = e->def_slots[def_slot(e, name, version)];
  return v != 0 ? &e->defs[v - 1] : NULL;
}

/* Puts index idx under (name, version) (version 0: as the highest of its name). */
static void def_put(saga__engine *e, const char *name, uint32_t version, size_t idx) {
  size_t k = def_slot(e, name, version);
  e->def_slots[k] = (uint32_t)idx + 1;
  e->def_latest[k] = version == 0;
}

/* Makes room for one more definition (two slots: its version and maybe its name's highest),
 * keeping the table at most half full. */
static int def_grow(saga__engine *e) {
  if ((e->ndefs + 1) * 4 <= e->def_cap) return SAGA_OK;
  size_t cap = e->def_cap ? e->def_cap * 2 : 64;
  uint32_t *slots = saga__calloc(e->env->alloc, cap * sizeof *slots);
  uint8_t *latest = saga__calloc(e->env->alloc, cap);
  if (slots == NULL || latest == NULL) {
    saga__free(e->env->alloc, slots);
    saga__free(e->env->alloc, latest);
    return SAGA_ENOMEM;
  }
  uint32_t *old = e->def_slots;
  uint8_t *old_latest = e->def_latest;
  size_t old_cap = e->def_cap;
  e->def_slots = slots;
  e->def_latest = latest;
  e->def_cap = cap;
  for (size_t k = 0; k < old_cap; k++) {
    if (old[k] == 0) continue;
    const saga__def *d = &e->defs[old[k] - 1];
    def_put(e, d->name, old_latest[k] ? 0 : d->version, old[k] - 1);
  }
  saga__free(e->env->alloc, old);
  saga__free(e->env->alloc, old_latest);
  return SAGA_OK;
}

/* The per-step metrics are found by (definition name, step name) through an open-addressing
 * hash like the definitions' (a slot holds an index + 1), so that every version of a
 * definition shares one set per step name. */
static uint64_t ss_hash(const char *def_name, const char *step_name) {
  uint64_t h = 1469598103934665603ull;
  for (const char *c = def_name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
  h = (h ^ 0xffu) * 1099511628211ull; /* a separator: ("ab","c") and ("a","bc") differ */
  for (const char *c = step_name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
  h *= 0x9e3779b97f4a7c15ull;
  return h ^ (h >> 29);
}

/* The slot of the pair: the one holding it, or the empty one where it would go. */
static size_t ss_slot(const saga__engine *e, const char *def_name, const char *step_name) {
  size_t mask = e->ss_cap - 1, k = (size_t)ss_hash(def_name, step_name) & mask;
  for (;; k = (k + 1) & mask) {
    uint32_t v = e->ss_slots[k];
    if (v == 0) return k;
    const saga__step_stats *s = &e->step_stats[v - 1];
    if (strcmp(s->def_name, def_name) == 0 && strcmp(s->step_name, step_name) == 0) return k;
  }
}

/* Makes room for `more` new pairs (array and hash, the hash at most half full): all the
 * allocation a registration's metrics need, done before anything is registered. */
static int ss_reserve(saga__engine *e, size_t more) {
  size_t need = e->nstep_stats + more;
  if (need >= UINT32_MAX) return SAGA_ENOMEM;
  if (need > e->step_stats_cap) {
    size_t cap = e->step_stats_cap ? e->step_stats_cap : 16;
    while (cap < need) cap *= 2;
    saga__step_stats *p = saga__realloc(e->env->alloc, e->step_stats, cap * sizeof *p);
    if (p == NULL) return SAGA_ENOMEM;
    e->step_stats = p;
    e->step_stats_cap = cap;
  }
  if (need * 2 <= e->ss_cap) return SAGA_OK;
  size_t cap = e->ss_cap ? e->ss_cap : 64;
  while (need * 2 > cap) cap *= 2;
  uint32_t *slots = saga__calloc(e->env->alloc, cap * sizeof *slots);
  if (slots == NULL) return SAGA_ENOMEM;
  saga__free(e->env->alloc, e->ss_slots);
  e->ss_slots = slots;
  e->ss_cap = cap;
  for (size_t k = 0; k < e->nstep_stats; k++) {
    const saga__step_stats *s = &e->step_stats[k];
    e->ss_slots[ss_slot(e, s->def_name, s->step_name)] = (uint32_t)k + 1;
  }
  return SAGA_OK;
}

/* How many pairs of d are not known yet (a step name repeated in d counts once). */
static size_t ss_new(const saga__engine *e, const saga__def *d) {
  size_t count = 0;
  for (size_t k = 0; k < d->nsteps; k++) {
    const char *nm = d->steps[k].name;
    if (e->ss_cap != 0 && e->ss_slots[ss_slot(e, d->name, nm)] != 0) continue;
    size_t j = 0;
    while (j < k && strcmp(d->steps[j].name, nm) != 0) j++;
    if (j == k) count++;
  }
  return count;
}

/* Gives each step of d (registered, room reserved) its pair's metrics, new ones zeroed. */
static void ss_assign(saga__engine *e, saga__def *d) {
  for (size_t k = 0; k < d->nsteps; k++) {
    saga__step *st = &d->steps[k];
    size_t slot = ss_slot(e, d->name, st->name);
    if (e->ss_slots[slot] == 0) {
      saga__step_stats *s = &e->step_stats[e->nstep_stats];
      memset(s, 0, sizeof *s);
      s->def_name = d->name;
      s->step_name = st->name;
      e->ss_slots[slot] = (uint32_t)++e->nstep_stats;
    }
    st->stats = e->ss_slots[slot] - 1;
    saga__step_stats *s = &e->step_stats[st->stats];
    s->phases |= 1u << SAGA_PHASE_ACTION;
    if (has_compensation(st)) s->phases |= 1u << SAGA_PHASE_COMPENSATION;
    if (st->kind == SAGA_STEP_PIVOT) s->phases |= 1u << SAGA_PHASE_RESOLVE;
  }
}

int saga__engine_register(saga__engine *e, const saga_definition *def) {
  if (def->name != NULL && saga__engine_find(e, def->name, def->version) != NULL)
    return saga__fail(e->env, SAGA_EEXIST, "definition '%s' version %u is already registered",
                      def->name, def->version);
  saga__def copy;
  int rc = saga__def_copy(&copy, def, e->env->alloc, e->env->errmsg, sizeof e->env->errmsg);
  if (rc != SAGA_OK) return rc;
  saga__def *p = NULL;
  if (e->ndefs >= UINT32_MAX - 1 || def_grow(e) != SAGA_OK ||
      ss_reserve(e, ss_new(e, &copy)) != SAGA_OK ||
      (p = saga__realloc(e->env->alloc, e->defs, (e->ndefs + 1) * sizeof *p)) == NULL) {
    saga__def_free(&copy, e->env->alloc);
    return saga__fail(e->env, SAGA_ENOMEM, "out of memory registering definition");
  }
  e->defs = p;
  size_t idx = e->ndefs++;
  e->defs[idx] = copy;
  ss_assign(e, &e->defs[idx]);
  def_put(e, copy.name, copy.version, idx);
  const saga__def *latest = saga__engine_find(e, copy.name, 0);
  if (latest == NULL || latest->version < copy.version) def_put(e, copy.name, 0, idx);
  return SAGA_OK;
}
