/*
 * Participants: a command is handled at most once per message id (inbox), at most once per
 * saga step across attempts (pstep), and never after its compensation (tombstone). The
 * handler's writes, the inbox row, the pstep row and the reply's outbox row are written in
 * the node's transaction, the handler's own writes inside a savepoint so that a refusal
 * rolls back only them.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "participant.h"

enum { PS_NONE = 0, PS_APPLIED = 1, PS_COMPENSATED = 2, PS_TOMBSTONE = 3, PS_REFUSED = 4 };

struct saga_msg {
  const saga_envelope *env;
  const saga_data *data;
  const char *traceparent; /* the handler run's context */
};

/* The command being handled, as received: dead letters keep these bytes. */
typedef struct raw_msg {
  const void *bytes;
  size_t len;
} raw_msg;

/* Longest message id accepted; ours are under 100 bytes. The reply id appends "/r". */
#define MAX_MSG_ID 512

struct saga_reply {
  saga_data *data;
  const saga_limits *lim;
  size_t value_limit; /* the largest value (the saga data limit) */
  int failed;
  char reason[513];
};

/* A reply refuses, where it is made, what could never be merged into the saga's data. */
static int reply_check(saga_reply *r, const char *key, size_t len) {
  if (len > r->value_limit) return SAGA_ETOOBIG;
  if (saga_data_get(r->data, key, NULL, NULL) != SAGA_OK &&
      saga_data_count(r->data) >= r->lim->max_data_entries)
    return SAGA_ETOOBIG;
  return SAGA_OK;
}

struct sqlite3 *saga_tx_db(saga_tx *tx) {
  if (tx == NULL) return NULL;
  saga__store *s = tx->p->env->store;
  return (struct sqlite3 *)s->m->native(s);
}

const char *saga_msg_saga_id(const saga_msg *m) { return m->env->saga_id; }
const char *saga_msg_command(const saga_msg *m) { return m->env->name; }
const char *saga_msg_id(const saga_msg *m) { return m->env->msg_id; }
uint32_t saga_msg_step(const saga_msg *m) { return m->env->step; }
uint32_t saga_msg_attempt(const saga_msg *m) { return m->env->attempt; }
int saga_msg_is_compensation(const saga_msg *m) {
  return m->env->phase == SAGA_PHASE_COMPENSATION;
}
const saga_data *saga_msg_data(const saga_msg *m) { return m->data; }
const char *saga_msg_header(const saga_msg *m, const char *name) {
  return saga_envelope_header(m->env, name);
}
const char *saga_msg_traceparent(const saga_msg *m) {
  return m != NULL && m->traceparent != NULL ? m->traceparent : "";
}

int saga_tx_start(saga_tx *tx, const char *name, const saga_data *input, const char *idem_key,
                  char *id_out, size_t id_len, int *existed) {
  if (tx == NULL || name == NULL || id_out == NULL || id_len < 40) return SAGA_EINVAL;
  saga__participant *p = tx->p;
  saga__env *env = p->env;
  env->errmsg[0] = '\0';
  const saga__def *def = saga__engine_find(p->engine, name, 0);
  if (def == NULL) return saga__fail(env, SAGA_ENODEF, "definition '%s' is not registered", name);
  if (idem_key != NULL && (idem_key[0] == '\0' || strlen(idem_key) > env->limits.max_string_bytes))
    return saga__fail(env, SAGA_EINVAL, "idempotency key must be 1..%zu bytes",
                      env->limits.max_string_bytes);
  saga__buf in;
  saga__buf_init(&in, env->alloc);
  int rc = saga__data_encode(input, &in);
  if (rc == SAGA_OK)
    rc = saga__data_fits(env, "the input", input != NULL ? saga_data_count(input) : 0, in.len);
  char id[40];
  int had = 0;
  /* The new saga is a child of the handler's span, in its trace. */
  const char *tp = p->handler_ran && p->handler_tp[0] ? p->handler_tp : NULL;
  if (rc == SAGA_OK)
    rc = saga__engine_start(p->engine, def, in.data, in.len, idem_key, tp, id, &had);
  saga__buf_free(&in);
  if (rc != SAGA_OK) return rc;
  snprintf(id_out, id_len, "%s", id);
  if (existed != NULL) *existed = had;
  return SAGA_OK;
}

int saga_reply_set(saga_reply *r, const char *key, const void *val, size_t len) {
  if (r == NULL || key == NULL) return SAGA_EINVAL;
  int rc = reply_check(r, key, len);
  return rc != SAGA_OK ? rc : saga_data_set(r->data, key, val, len);
}
int saga_reply_set_str(saga_reply *r, const char *key, const char *val) {
  if (r == NULL || key == NULL || val == NULL) return SAGA_EINVAL;
  int rc = reply_check(r, key, strlen(val));
  return rc != SAGA_OK ? rc : saga_data_set_str(r->data, key, val);
}
int saga_reply_set_i64(saga_reply *r, const char *key, int64_t v) {
  if (r == NULL || key == NULL) return SAGA_EINVAL;
  int rc = reply_check(r, key, 8);
  return rc != SAGA_OK ? rc : saga_data_set_i64(r->data, key, v);
}
int saga_reply_fail(saga_reply *r, const char *reason) {
  if (r != NULL) {
    r->failed = 1;
    snprintf(r->reason, sizeof r->reason, "%s", reason ? reason : "refused");
  }
  return SAGA_EREFUSED;
}

/* The outcome of handling one command. */
typedef struct outcome {
  int status;            /* 0 success, else SAGA_E* */
  char error[600];
  const void *payload;   /* reply data (encoded map) */
  size_t payload_len;
  int pstate;            /* new pstep state, PS_NONE = unchanged */
  int store_reply;       /* pstep keeps payload (successful action) */
} outcome;

static void refuse(outcome *o, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void refuse(outcome *o, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  o->status = status;
  vsnprintf(o->error, sizeof o->error, fmt, ap);
  va_end(ap);
}

/* FNV-1a of a message id. */
static uint64_t msg_hash(const char *msg_id) {
  uint64_t h = 1469598103934665603ull;
  for (const char *c = msg_id; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
  return h;
}

/* Counts a transient failure of msg_id; nonzero once it has failed max_deliveries times
 * (the entry is then cleared). A hash collision only makes the count approximate. */
static int transient_cap_reached(saga__participant *p, const char *msg_id) {
  uint64_t h = msg_hash(msg_id);
  size_t slot = (size_t)(h % (sizeof p->transient / sizeof p->transient[0]));
  if (p->transient[slot].hash != h) {
    p->transient[slot].hash = h;
    p->transient[slot].count = 0;
  }
  if (++p->transient[slot].count < p->max_deliveries) return 0;
  p->transient[slot].hash = 0;
  p->transient[slot].count = 0;
  return 1;
}

/* Whether the saga data (data, cmd_len bytes encoded) merged with a reply (rep, rep_len
 * bytes) stays within the limits; else reason says why. The sum of the two is an upper bound
 * of the merge and decides in the common case; only above it is the merge made and
 * measured. */
static int merge_fits(saga__participant *p, const saga_data *data, const saga_data *rep,
                      size_t cmd_len, size_t rep_len, char *reason, size_t reason_len) {
  const saga_limits *l = &p->env->limits;
  size_t limit = saga__data_limit(l);
  size_t entries = saga_data_count(data) + saga_data_count(rep);
  if (cmd_len + rep_len <= limit && entries <= l->max_data_entries) return 1;
  saga_data *m = NULL;
  saga__buf enc;
  saga__buf_init(&enc, p->env->alloc);
  int rc = saga_data_new(&m, p->env->alloc);
  if (rc == SAGA_OK) rc = saga_data_merge(m, data);
  if (rc == SAGA_OK) rc = saga_data_merge(m, rep);
  if (rc == SAGA_OK) rc = saga__data_encode(m, &enc);
  entries = m != NULL ? saga_data_count(m) : entries;
  size_t bytes = rc == SAGA_OK ? enc.len : cmd_len + rep_len;
  saga_data_free(m);
  saga__buf_free(&enc);
  if (entries <= l->max_data_entries && bytes <= limit) return 1;
  if (entries > l->max_data_entries)
    snprintf(reason, reason_len, "the reply would give the saga data %zu entries; the limit is "
             "%zu (saga_limits.max_data_entries)", entries, l->max_data_entries);
  else
    snprintf(reason, reason_len, "the reply would make the saga data %zu bytes; the limit is "
             "%zu (saga_limits.max_message_bytes minus %d for the envelope)", bytes, limit,
             SAGA__ENVELOPE_RESERVE);
  return 0;
}

/* Runs the handler in its own savepoint. Returns < 0 only for store errors that break the
 * transaction; handler failures are reported in o. */
static int run_handler(saga__participant *p, const char *channel, const saga_envelope *env,
                       const raw_msg *raw, outcome *o) {
  const saga__handler *h = saga__participant_find(p, channel, env->name);
  if (h == NULL) {
    refuse(o, SAGA_ENOHANDLER, "no handler for command '%s'", env->name);
    return saga__journal_dead_letter(p->journal, channel, env->msg_id, o->error, raw->bytes, raw->len);
  }
  saga_data *data = NULL;
  char err[200];
  int rc = saga__data_decode(env->payload, env->payload_len, &p->env->limits, p->env->alloc, &data, err,
                             sizeof err);
  if (rc == SAGA_ENOMEM) return saga__fail(p->env, rc, "out of memory decoding command data");
  if (rc != SAGA_OK) {
    refuse(o, rc, "malformed saga data: %s", err);
    return saga__journal_dead_letter(p->journal, channel, env->msg_id, o->error, raw->bytes, raw->len);
  }
  saga_reply reply;
  memset(&reply, 0, sizeof reply);
  reply.lim = &p->env->limits;
  reply.value_limit = saga__data_limit(&p->env->limits);
  rc = saga_data_new(&reply.data, p->env->alloc);
  if (rc != SAGA_OK) {
    saga_data_free(data);
    return saga__fail(p->env, rc, "out of memory creating reply");
  }
  saga__store *s = p->env->store;
  uint64_t id_hash = msg_hash(env->msg_id);
  if (p->broke[id_hash % SAGA__BROKE_SLOTS] == id_hash) {
    /* This command's handler ended the node's transaction when it ran before: running it
     * again would commit its writes once more. */
    char why[600];
    snprintf(why, sizeof why, "handler for '%s' ended the node's transaction when this command "
             "was delivered before (COMMIT, ROLLBACK or END on saga_tx_db()); not run again",
             env->name);
    refuse(o, SAGA_ESTATE, "%s", why);
    rc = saga__journal_dead_letter(p->journal, channel, env->msg_id, why, raw->bytes, raw->len);
    goto done;
  }
  rc = s->m->savepoint(s, SAGA__SP_HANDLER);
  if (rc != SAGA_OK) {
    rc = saga__store_fail(p->env, rc, "opening handler savepoint");
    goto done;
  }
  /* The handler's span: a child of the step attempt that sent the command. */
  rc = saga__span_id(p->env, p->handler_span);
  if (rc != SAGA_OK) goto done;
  saga__trace_format(p->handler_tp, p->in.trace_id, p->handler_span, p->in.flags);
  p->handler_ran = 1;
  p->handler_start_ns = saga__now_ns(p->env);
  saga_tx tx = {p, env};
  p->lock_reason[0] = '\0';
  saga_msg msg = {env, data, p->handler_tp};
  p->env->stats.handler_runs++;
  int64_t writes_before = s->m->writes(s);
  /* Transitions of sagas the handler starts (saga_tx_start) are rolled back with it. */
  saga__journal_mark mark = saga__journal_mark_get(p->journal);
  int hrc = h->fn(&tx, &msg, &reply, h->arg);
  p->handler_end_ns = saga__now_ns(p->env);
  SAGA__HOOK(p->env, "participant.after_handler");
  if (!s->m->in_tx(s)) {
    /* The handler ended the transaction itself: its writes and everything this batch wrote
     * before it were committed (or rolled back) with it. Nothing can be undone; say so, and
     * make sure the handler does not run a second time for this command. */
    p->broke[id_hash % SAGA__BROKE_SLOTS] = id_hash;
    p->tx_ended = 1;
    p->env->stats.handler_contract_errors++;
    rc = saga__fail(p->env, SAGA_ESTATE, "handler for '%s' on '%s' ended the node's "
                    "transaction (COMMIT, ROLLBACK or END on saga_tx_db(); handlers must not): "
                    "what this batch wrote before and in it was committed or rolled back with "
                    "it; the command is not run again", env->name, channel);
    goto done;
  }
  char why_code[300] = "";
  if (hrc > 0) {
    /* Not a libsaga code. SQLite's busy and locked codes (5, 6, extended forms too) from
     * the handler's business writes are transient; anything else is named as it is. */
    p->env->stats.handler_contract_errors++;
    int base = hrc & 0xff;
    if (base == 5 || base == 6) {
      hrc = SAGA_EBUSY;
    } else {
      snprintf(why_code, sizeof why_code, "returned %d, which is not a libsaga code (a handler "
               "returns SAGA_OK, SAGA_EREFUSED through saga_reply_fail(), or a negative SAGA_E* "
               "code; a positive value is likely an SQLite result code passed through)", hrc);
      hrc = SAGA_EINVAL;
    }
  } else if (hrc == SAGA_ELOCKED && !reply.failed) {
    /* A record held by another saga (saga_lock_acquire()): a business refusal, with the
     * lock's holder as the reason. */
    reply.failed = 1;
    snprintf(reply.reason, sizeof reply.reason, "%s",
             p->lock_reason[0] ? p->lock_reason : "a record is held by another saga");
    hrc = SAGA_EREFUSED;
  } else if (hrc < 0 && strcmp(saga_err_name(hrc), "UNKNOWN") == 0) {
    p->env->stats.handler_contract_errors++;
    snprintf(why_code, sizeof why_code, "returned %d, which is not a libsaga code", hrc);
  }
  int ok = hrc == SAGA_OK && !reply.failed;
  if (ok) {
    saga__buf_reset(&p->reply);
    rc = saga__data_encode(reply.data, &p->reply);
    if (rc != SAGA_OK) {
      rc = saga__fail(p->env, rc, "encoding reply data");
      goto done;
    }
    /* The orchestrator merges the reply into the saga's data: what would not fit there is
     * refused here, before anything of the handler is committed (its writes roll back and
     * the step fails as a business failure with the reason). */
    if (env->phase == SAGA_PHASE_ACTION && !merge_fits(p, data, reply.data, env->payload_len,
                                                       p->reply.len, reply.reason,
                                                       sizeof reply.reason)) {
      ok = 0;
      reply.failed = 1;
      saga__log(p->env, SAGA_LOG_WARN, "handler for '%s': %s", env->name, reply.reason);
    }
  }
  if (!ok) {
    saga__journal_rewind(p->journal, &mark);
    rc = s->m->rollback_to(s, SAGA__SP_HANDLER);
    if (rc != SAGA_OK) {
      rc = saga__store_fail(p->env, rc, "rolling back handler savepoint");
      goto done;
    }
    /* Undone: the item is still clean if nothing else wrote (see the node's batch). */
    p->undone += s->m->writes(s) - writes_before;
  }
  rc = s->m->release(s, SAGA__SP_HANDLER);
  if (rc != SAGA_OK) {
    rc = saga__store_fail(p->env, rc, "releasing handler savepoint");
    goto done;
  }
  if (ok) {
    o->status = SAGA_OK;
    o->payload = p->reply.data;
    o->payload_len = p->reply.len;
  } else if ((hrc == SAGA_ENOMEM || hrc == SAGA_EBUSY || hrc == SAGA_EIO ||
              hrc == SAGA_EFULL) &&
             !transient_cap_reached(p, env->msg_id)) {
    /* Transient: nothing of this command is recorded or acknowledged; it comes again. */
    rc = saga__fail(p->env, hrc, "handler for '%s' failed transiently: %s", env->name,
                         saga_strerror(hrc));
  } else if (hrc == SAGA_OK || hrc == SAGA_EREFUSED) {
    refuse(o, SAGA_EREFUSED, "%s", reply.failed ? reply.reason : "refused");
  } else {
    /* A technical failure: keep the message for an operator and answer with a failure, so
     * the saga moves on (retry or compensation) instead of hanging. */
    char why[600];
    if (why_code[0] != '\0')
      snprintf(why, sizeof why, "handler for '%s' %s", env->name, why_code);
    else
      snprintf(why, sizeof why, "handler for '%s' failed: %s (%s)", env->name,
               saga_err_name(hrc), reply.failed ? reply.reason : saga_strerror(hrc));
    refuse(o, hrc, "%s", why);
    rc = saga__journal_dead_letter(p->journal, channel, env->msg_id, why, raw->bytes, raw->len);
  }
done:
  saga_data_free(reply.data);
  saga_data_free(data);
  return rc;
}

static int put_pstep(saga__participant *p, const saga_envelope *env, int state,
                     const void *reply, size_t len) {
  saga__store *s = p->env->store;
  int rc = s->m->pstep_put(s, env->saga_id, env->step, state, env->attempt, reply, len,
                           saga__now(p->env));
  return rc == SAGA_OK ? SAGA_OK : saga__store_fail(p->env, rc, "writing participant step");
}

/*
 * A compensation that finds no record of its step usually arrived before its action (which
 * then never runs: a tombstone is written). But retention deletes step records older than
 * inbox_ms, and a FAILED saga may be retried later than that: its applied action's record may
 * be gone. A saga id starts with its start time (48 bits of ms), and a record is never older
 * than its saga; the store keeps the mark below which records were deleted. Returns 1 when
 * the saga started before that mark (its record may have been deleted), 0 when not, or a
 * negative error.
 */
static int record_may_be_purged(saga__participant *p, const char *saga_id) {
  uint64_t mark = 0;
  saga__store *s = p->env->store;
  int rc = s->m->purge_mark(s, &mark);
  if (rc != SAGA_OK) return saga__store_fail(p->env, rc, "reading the purge mark");
  if (mark == 0) return 0;
  uint64_t started = 0;
  for (int k = 0; k < 12; k++) {
    int c = (unsigned char)saga_id[k], d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else return 1; /* not an id this library made: its age is unknown */
    started = started << 4 | (uint64_t)d;
  }
  return started < mark;
}

/* Decides and runs the command given the participant's record of its step. */
static int decide(saga__participant *p, const char *channel, const saga_envelope *env,
                  const raw_msg *raw, int pstate, uint32_t pattempt, const void *preply,
                  size_t preply_len, outcome *o) {
  int rc = SAGA_OK;
  switch (env->phase) {
  case SAGA_PHASE_ACTION:
    if (pstate == PS_APPLIED) { /* an earlier attempt applied: same answer, no second run */
      o->payload = preply;
      o->payload_len = preply_len;
    } else if (pstate == PS_COMPENSATED || pstate == PS_TOMBSTONE) {
      refuse(o, SAGA_EREFUSED, "%s", "step was compensated before this action arrived");
    } else if (pstate == PS_REFUSED && env->attempt <= pattempt) {
      refuse(o, SAGA_EREFUSED, "%s", "stale attempt: a newer attempt was already answered");
    } else {
      rc = run_handler(p, channel, env, raw, o);
      if (rc == SAGA_OK) {
        o->pstate = o->status == SAGA_OK ? PS_APPLIED : PS_REFUSED;
        o->store_reply = o->status == SAGA_OK;
      }
    }
    break;
  case SAGA_PHASE_COMPENSATION:
    if (pstate == PS_APPLIED) {
      rc = run_handler(p, channel, env, raw, o);
      if (rc == SAGA_OK && o->status == SAGA_OK) {
        o->pstate = PS_COMPENSATED;
        /* The locks the action took go with its compensation, in this transaction. */
        rc = saga__locks_release(p->env, env->saga_id, env->step, NULL);
      }
    } else if (pstate == PS_NONE && (rc = record_may_be_purged(p, env->saga_id)) != 0) {
      if (rc < 0) return rc;
      rc = SAGA_OK;
      p->env->stats.compensations_expired++;
      refuse(o, SAGA_EEXPIRED, "%s", "the participant's record of this step expired (older "
             "than saga_retention.inbox_ms and purged): whether the action applied is unknown, "
             "so it is not reported undone");
    } else if (pstate != PS_COMPENSATED && pstate != PS_TOMBSTONE) {
      o->pstate = PS_TOMBSTONE; /* nothing to undo; refuse the action should it come later */
    }
    break;
  case SAGA_PHASE_RESOLVE:
    if (pstate == PS_APPLIED) {
      o->payload = preply;
      o->payload_len = preply_len;
    } else {
      if (pstate != PS_COMPENSATED && pstate != PS_TOMBSTONE) o->pstate = PS_TOMBSTONE;
      refuse(o, SAGA_EREFUSED, "%s", "action not applied");
    }
    break;
  }
  return rc;
}

/* Reports the start and end of the handler run of env (after the commit). */
static int handler_spans(saga__participant *p, const saga_envelope *env, const outcome *o) {
  if (!p->journal->keep_spans) return SAGA_OK;
  saga__span_rec r;
  memset(&r, 0, sizeof r);
  r.event = SAGA_SPAN_START;
  r.kind = SAGA_SPAN_HANDLER;
  r.status = SAGA_SPAN_UNSET;
  memcpy(r.trace_id, p->in.trace_id, sizeof r.trace_id);
  memcpy(r.span_id, p->handler_span, sizeof r.span_id);
  memcpy(r.parent_id, p->in.span_id, sizeof r.parent_id);
  r.flags = p->in.flags;
  snprintf(r.saga_id, sizeof r.saga_id, "%.39s", env->saga_id);
  r.step = env->step > INT32_MAX ? -1 : (int)env->step;
  r.attempt = env->attempt;
  r.start_ns = p->handler_start_ns;
  int rc = saga__journal_span(p->journal, &r, env->name, "", "");
  if (rc != SAGA_OK) return rc;
  r.event = SAGA_SPAN_END;
  r.end_ns = p->handler_end_ns;
  r.status = o->status == SAGA_OK        ? SAGA_SPAN_OK
             : o->status == SAGA_EREFUSED ? SAGA_SPAN_REFUSED
                                          : SAGA_SPAN_ERROR;
  return saga__journal_span(p->journal, &r, env->name, "", o->status == SAGA_OK ? "" : o->error);
}

/* Whether a reply to reply_to can ever reach its orchestrator: the reserved loopback channel
 * only for a local step's command (received on the loopback: the node refuses that channel
 * from the transport, see process_delivery), else a channel the transport can route (a
 * transport without can_send reaches every channel). */
static int reply_to_reachable(saga__participant *p, const char *channel, const char *reply_to) {
  if (strcmp(reply_to, SAGA__LOCAL_CHANNEL) == 0)
    return strcmp(channel, SAGA__LOCAL_CHANNEL) == 0;
  return p->can_send == NULL || p->can_send(p->can_send_arg, reply_to) != 0;
}

int saga__participant_command(saga__participant *p, const char *channel, const saga_envelope *env,
                              const void *raw_bytes, size_t raw_len) {
  raw_msg raw = {raw_bytes, raw_len};
  if (env->reply_to[0] == '\0' || env->msg_id[0] == '\0' || env->saga_id[0] == '\0')
    return saga__journal_dead_letter(p->journal, channel, env->msg_id, "command without msg_id, saga_id "
                                  "or reply_to", raw_bytes, raw_len);
  if (strlen(env->msg_id) > MAX_MSG_ID)
    return saga__journal_dead_letter(p->journal, channel, "", "command msg_id longer than 512 bytes",
                                  raw_bytes, raw_len);
  /* 0. The reply must be deliverable: a reply_to this node's transport can never reach (or
   * the reserved loopback channel, which would feed the reply to this node's own engine)
   * would make the reply row resend forever. Refused before anything runs or is written:
   * kept as a dead letter with the reason, then acknowledged. */
  if (!reply_to_reachable(p, channel, env->reply_to)) {
    char shown[131];
    saga__printable(shown, sizeof shown, env->reply_to, strlen(env->reply_to));
    char why[200];
    snprintf(why, sizeof why, "reply_to '%s' is not reachable by this node's transport",
             shown);
    p->env->stats.reply_to_refused++;
    return saga__journal_dead_letter(p->journal, channel, env->msg_id, why, raw_bytes, raw_len);
  }
  /* 1. A duplicate: send the recorded reply again. */
  saga__store *s = p->env->store;
  saga__buf_reset(&p->dup_to);
  saga__buf_reset(&p->dup);
  int rc = s->m->inbox_get(s, env->msg_id, &p->dup_to, &p->dup);
  if (rc == SAGA_OK) {
    p->env->stats.duplicates++;
    const char *reply_to = p->dup_to.len > 1 ? (const char *)p->dup_to.data : env->reply_to;
    return saga__journal_outbox(p->journal, reply_to, env->saga_id, p->dup.data, p->dup.len);
  }
  if (rc == SAGA_ENOMEM) return saga__fail(p->env, rc, "out of memory reading inbox");
  if (rc != SAGA_ENOTFOUND) return saga__store_fail(p->env, rc, "reading inbox");

  /* 2. What this node knows of the step, across attempts and phases. */
  int pstate = PS_NONE;
  uint32_t pattempt = 0;
  saga__buf *preply = &p->prev;
  saga__buf_reset(preply);
  rc = s->m->pstep_get(s, env->saga_id, env->step, &pstate, &pattempt, preply);
  if (rc == SAGA_ENOMEM) return saga__fail(p->env, rc, "out of memory reading step record");
  if (rc != SAGA_OK) return saga__store_fail(p->env, rc, "reading step");

  /* 3. Decide, running the handler if it is due, in the trace the command names. */
  const char *in_tp = saga_envelope_header(env, "traceparent");
  int in_ok = in_tp != NULL && saga__trace_parse(in_tp, &p->in) == SAGA_OK;
  if (!in_ok) {
    /* Missing or malformed (the network's): never used. The saga's own trace, no parent. */
    snprintf(p->in.trace_id, sizeof p->in.trace_id, "%.32s", env->saga_id);
    p->in.span_id[0] = '\0';
    p->in.flags = 1;
    if (!saga__trace_id_ok(p->in.trace_id)) { /* a saga id that is no trace id: a new one */
      char a[17], b[17];
      if ((rc = saga__span_id(p->env, a)) != SAGA_OK || (rc = saga__span_id(p->env, b)) != SAGA_OK)
        return rc;
      snprintf(p->in.trace_id, sizeof p->in.trace_id, "%s%s", a, b);
    }
  }
  p->handler_ran = 0;
  p->handler_tp[0] = '\0';
  outcome o;
  memset(&o, 0, sizeof o);
  rc = decide(p, channel, env, &raw, pstate, pattempt, preply->data, preply->len, &o);
  if (rc == SAGA_OK && p->handler_ran) rc = handler_spans(p, env, &o);
  if (rc != SAGA_OK) return rc;
  if (o.pstate != PS_NONE) {
    rc = put_pstep(p, env, o.pstate, o.store_reply ? o.payload : NULL, o.payload_len);
    if (rc != SAGA_OK) return rc;
  }

  /* 4. The reply: recorded in the inbox and queued in the outbox, in this transaction. */
  char msg_id[MAX_MSG_ID + 3];
  snprintf(msg_id, sizeof msg_id, "%s/r", env->msg_id);
  /* The reply names the handler's span, or (no handler ran) the command's own context. */
  char reply_tp[SAGA__TRACEPARENT_SIZE] = "";
  if (p->handler_ran)
    memcpy(reply_tp, p->handler_tp, sizeof reply_tp);
  else if (in_ok)
    memcpy(reply_tp, in_tp, SAGA__TRACEPARENT_SIZE);
  saga_header hdr = {"traceparent", reply_tp[0] ? reply_tp : NULL};
  saga_envelope r;
  memset(&r, 0, sizeof r);
  r.version = SAGA_ENVELOPE_VERSION;
  r.kind = SAGA_MSG_REPLY;
  r.msg_id = msg_id;
  r.saga_id = env->saga_id;
  r.step = env->step;
  r.attempt = env->attempt;
  r.phase = env->phase;
  r.name = env->name;
  r.status = o.status;
  r.error = o.error;
  r.headers = &hdr;
  r.nheaders = hdr.value != NULL ? 1 : 0;
  r.payload = o.status == SAGA_OK ? o.payload : NULL;
  r.payload_len = o.status == SAGA_OK ? o.payload_len : 0;
  saga__buf_reset(&p->enc);
  rc = saga__envelope_encode_buf(&r, &p->enc);
  if (rc != SAGA_OK) return saga__fail(p->env, rc, "encoding reply");
  rc = s->m->inbox_insert(s, env->msg_id, env->saga_id, saga__now(p->env), env->reply_to,
                          p->enc.data, p->enc.len);
  if (rc != SAGA_OK) return saga__store_fail(p->env, rc, "writing inbox");
  SAGA__HOOK(p->env, "participant.after_inbox");
  return saga__journal_outbox(p->journal, env->reply_to, env->saga_id, p->enc.data, p->enc.len);
}

/* ---- setup ------------------------------------------------------------------------------ */

void saga__participant_init(saga__participant *p, saga__env *env, saga__journal *j,
                            saga__engine *e, uint32_t max_deliveries) {
  memset(p, 0, sizeof *p);
  p->env = env;
  p->journal = j;
  p->engine = e;
  p->max_deliveries = max_deliveries ? max_deliveries : 10;
  saga__buf_init(&p->reply, env->alloc);
  saga__buf_init(&p->prev, env->alloc);
  saga__buf_init(&p->enc, env->alloc);
  saga__buf_init(&p->dup_to, env->alloc);
  saga__buf_init(&p->dup, env->alloc);
}

void saga__participant_free(saga__participant *p) {
  for (size_t k = 0; k < p->nhandlers; k++) {
    saga__free(p->env->alloc, p->handlers[k].channel);
    saga__free(p->env->alloc, p->handlers[k].command);
  }
  saga__free(p->env->alloc, p->handlers);
  p->handlers = NULL;
  p->nhandlers = 0;
  saga__buf_free(&p->reply);
  saga__buf_free(&p->prev);
  saga__buf_free(&p->enc);
  saga__buf_free(&p->dup_to);
  saga__buf_free(&p->dup);
}

const saga__handler *saga__participant_find(const saga__participant *p, const char *channel,
                                            const char *command) {
  for (size_t k = 0; k < p->nhandlers; k++) {
    const saga__handler *h = &p->handlers[k];
    if (strcmp(h->command, command) == 0 && strcmp(h->channel, channel) == 0) return h;
  }
  return NULL;
}

int saga__participant_add(saga__participant *p, const char *channel, const char *command,
                          saga_handler fn, void *arg) {
  if (saga__participant_find(p, channel, command) != NULL)
    return saga__fail(p->env, SAGA_EEXIST, "handler for '%s' on '%s' already registered",
                      command, channel);
  saga__handler *v = saga__realloc(p->env->alloc, p->handlers, (p->nhandlers + 1) * sizeof *v);
  if (v == NULL) return saga__fail(p->env, SAGA_ENOMEM, "out of memory registering handler");
  p->handlers = v;
  saga__handler *h = &p->handlers[p->nhandlers];
  h->channel = saga__strdup(p->env->alloc, channel);
  h->command = saga__strdup(p->env->alloc, command);
  if (h->channel == NULL || h->command == NULL) {
    saga__free(p->env->alloc, h->channel);
    saga__free(p->env->alloc, h->command);
    return saga__fail(p->env, SAGA_ENOMEM, "out of memory registering handler");
  }
  h->fn = fn;
  h->arg = arg;
  p->nhandlers++;
  return SAGA_OK;
}
