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

#include "core.h"

enum { PS_NONE = 0, PS_APPLIED = 1, PS_COMPENSATED = 2, PS_TOMBSTONE = 3, PS_REFUSED = 4 };

struct saga_tx {
  saga_node *n;
};

struct saga_msg {
  const saga_envelope *env;
  const saga_data *data;
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
  int failed;
  char reason[513];
};

sqlite3 *saga_tx_db(saga_tx *tx) { return tx != NULL ? tx->n->store.db : NULL; }

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

int saga_tx_start(saga_tx *tx, const char *name, const saga_data *input, const char *idem_key,
                  char *id_out, size_t id_len, int *existed) {
  if (tx == NULL || name == NULL || id_out == NULL || id_len < 40) return SAGA_EINVAL;
  saga_node *n = tx->n;
  const saga__def *def = saga__node_find_def(n, name, 0);
  if (def == NULL) return saga__node_fail(n, SAGA_ENODEF, "definition '%s' is not registered", name);
  if (idem_key != NULL && (idem_key[0] == '\0' || strlen(idem_key) > n->limits.max_string_bytes))
    return saga__node_fail(n, SAGA_EINVAL, "idempotency key must be 1..%zu bytes",
                           n->limits.max_string_bytes);
  saga__buf in;
  saga__buf_init(&in, n->alloc);
  int rc = saga__data_encode(input, &in);
  saga__work w;
  memset(&w, 0, sizeof w);
  if (rc == SAGA_OK) rc = saga__engine_start(n, &w, def, in.data, in.len, idem_key);
  saga__buf_free(&in);
  if (rc != SAGA_OK) return rc;
  snprintf(id_out, id_len, "%s", w.saga_id);
  if (existed != NULL) *existed = w.existed;
  return SAGA_OK;
}

int saga_reply_set(saga_reply *r, const char *key, const void *val, size_t len) {
  return r != NULL ? saga_data_set(r->data, key, val, len) : SAGA_EINVAL;
}
int saga_reply_set_str(saga_reply *r, const char *key, const char *val) {
  return r != NULL ? saga_data_set_str(r->data, key, val) : SAGA_EINVAL;
}
int saga_reply_set_i64(saga_reply *r, const char *key, int64_t v) {
  return r != NULL ? saga_data_set_i64(r->data, key, v) : SAGA_EINVAL;
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

/* Counts a transient failure of msg_id; nonzero once it has failed max_deliveries times
 * (the entry is then cleared). A hash collision only makes the count approximate. */
static int transient_cap_reached(saga_node *n, const char *msg_id) {
  uint64_t h = 1469598103934665603ull;
  for (const char *p = msg_id; *p; p++) h = (h ^ (uint8_t)*p) * 1099511628211ull;
  size_t slot = (size_t)(h % (sizeof n->transient / sizeof n->transient[0]));
  if (n->transient[slot].hash != h) {
    n->transient[slot].hash = h;
    n->transient[slot].count = 0;
  }
  if (++n->transient[slot].count < n->max_deliveries) return 0;
  n->transient[slot].hash = 0;
  n->transient[slot].count = 0;
  return 1;
}

/* Runs the handler in its own savepoint. Returns < 0 only for store errors that break the
 * transaction; handler failures are reported in o. */
static int run_handler(saga_node *n, const char *channel, const saga_envelope *env,
                       const raw_msg *raw, outcome *o) {
  const saga__handler *h = saga__node_find_handler(n, channel, env->name);
  if (h == NULL) {
    refuse(o, SAGA_ENOHANDLER, "no handler for command '%s'", env->name);
    return saga__node_dead_letter(n, channel, env->msg_id, o->error, raw->bytes, raw->len);
  }
  saga_data *data = NULL;
  char err[200];
  int rc = saga__data_decode(env->payload, env->payload_len, &n->limits, n->alloc, &data, err,
                             sizeof err);
  if (rc == SAGA_ENOMEM) return saga__node_fail(n, rc, "out of memory decoding command data");
  if (rc != SAGA_OK) {
    refuse(o, rc, "malformed saga data: %s", err);
    return saga__node_dead_letter(n, channel, env->msg_id, o->error, raw->bytes, raw->len);
  }
  saga_reply reply;
  memset(&reply, 0, sizeof reply);
  rc = saga_data_new(&reply.data, n->alloc);
  if (rc != SAGA_OK) {
    saga_data_free(data);
    return saga__node_fail(n, rc, "out of memory creating reply");
  }
  rc = saga__store_exec(&n->store, ST_SP_HANDLER);
  if (rc != SAGA_OK) {
    rc = saga__node_db_fail(n, rc, "opening handler savepoint");
    goto done;
  }
  saga_tx tx = {n};
  saga_msg msg = {env, data};
  n->stats.handler_runs++;
  sqlite3_int64 changes_before = sqlite3_total_changes64(n->store.db);
  /* Transitions of sagas the handler starts (saga_tx_start) are rolled back with it. */
  size_t events_before = n->nevents, text_before = n->event_text.len;
  size_t hist_before = n->hist.len, hist_text_before = n->hist_text.len;
  int hrc = h->fn(&tx, &msg, &reply, h->arg);
  SAGA__HOOK(n, "participant.after_handler");
  int ok = hrc == SAGA_OK && !reply.failed;
  if (!ok) {
    n->nevents = events_before;
    n->event_text.len = text_before;
    n->hist.len = hist_before;
    n->hist_text.len = hist_text_before;
    rc = saga__store_exec(&n->store, ST_SP_HANDLER_ROLLBACK);
    if (rc != SAGA_OK) {
      rc = saga__node_db_fail(n, rc, "rolling back handler savepoint");
      goto done;
    }
    /* Undone: the item is still clean if nothing else wrote (see process_item). */
    n->undone_changes += sqlite3_total_changes64(n->store.db) - changes_before;
  }
  rc = saga__store_exec(&n->store, ST_SP_HANDLER_RELEASE);
  if (rc != SAGA_OK) {
    rc = saga__node_db_fail(n, rc, "releasing handler savepoint");
    goto done;
  }
  if (ok) {
    saga__buf_reset(&n->reply_buf);
    rc = saga__data_encode(reply.data, &n->reply_buf);
    if (rc != SAGA_OK) {
      rc = saga__node_fail(n, rc, "encoding reply data");
      goto done;
    }
    o->status = SAGA_OK;
    o->payload = n->reply_buf.data;
    o->payload_len = n->reply_buf.len;
  } else if ((hrc == SAGA_ENOMEM || hrc == SAGA_EBUSY || hrc == SAGA_EIO ||
              hrc == SAGA_EFULL) &&
             !transient_cap_reached(n, env->msg_id)) {
    /* Transient: nothing of this command is recorded or acknowledged; it comes again. */
    rc = saga__node_fail(n, hrc, "handler for '%s' failed transiently: %s", env->name,
                         saga_strerror(hrc));
  } else if (hrc == SAGA_OK || hrc == SAGA_EREFUSED) {
    refuse(o, SAGA_EREFUSED, "%s", reply.failed ? reply.reason : "refused");
  } else {
    /* A technical failure: keep the message for an operator and answer with a failure, so
     * the saga moves on (retry or compensation) instead of hanging. */
    char why[600];
    snprintf(why, sizeof why, "handler for '%s' failed: %s (%s)", env->name,
             saga_err_name(hrc), reply.failed ? reply.reason : saga_strerror(hrc));
    refuse(o, hrc, "%s", why);
    rc = saga__node_dead_letter(n, channel, env->msg_id, why, raw->bytes, raw->len);
  }
done:
  saga_data_free(reply.data);
  saga_data_free(data);
  return rc;
}

static int put_pstep(saga_node *n, const saga_envelope *env, int state, const void *reply,
                     size_t len) {
  sqlite3_stmt *st = saga__store_stmt(&n->store, ST_PSTEP_PUT);
  sqlite3_bind_text(st, 1, env->saga_id, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 2, env->step);
  sqlite3_bind_int(st, 3, state);
  sqlite3_bind_int64(st, 4, env->attempt);
  if (reply != NULL) sqlite3_bind_blob(st, 5, reply, (int)len, SQLITE_STATIC);
  sqlite3_bind_int64(st, 6, (sqlite3_int64)saga__node_now(n));
  int rc = saga__store_exec(&n->store, ST_PSTEP_PUT);
  return rc == SAGA_OK ? SAGA_OK : saga__node_db_fail(n, rc, "writing participant step");
}

/* Decides and runs the command given the participant's record of its step. */
static int decide(saga_node *n, const char *channel, const saga_envelope *env,
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
      rc = run_handler(n, channel, env, raw, o);
      if (rc == SAGA_OK) {
        o->pstate = o->status == SAGA_OK ? PS_APPLIED : PS_REFUSED;
        o->store_reply = o->status == SAGA_OK;
      }
    }
    break;
  case SAGA_PHASE_COMPENSATION:
    if (pstate == PS_APPLIED) {
      rc = run_handler(n, channel, env, raw, o);
      if (rc == SAGA_OK && o->status == SAGA_OK) o->pstate = PS_COMPENSATED;
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

/* Whether a reply to reply_to can ever leave this node: not the reserved loopback channel,
 * and routable by the transport (a transport without can_send reaches every channel). */
static int reply_to_reachable(saga_node *n, const char *reply_to) {
  if (strcmp(reply_to, SAGA__LOCAL_CHANNEL) == 0) return 0;
  if (n->tm.can_send == NULL || !n->transport_open || n->transport_closed) return 1;
  return n->tm.can_send(n->transport, reply_to) != 0;
}

int saga__participant_command(saga_node *n, const char *channel, const saga_envelope *env,
                              const void *raw_bytes, size_t raw_len) {
  raw_msg raw = {raw_bytes, raw_len};
  if (env->reply_to[0] == '\0' || env->msg_id[0] == '\0' || env->saga_id[0] == '\0')
    return saga__node_dead_letter(n, channel, env->msg_id, "command without msg_id, saga_id "
                                  "or reply_to", raw_bytes, raw_len);
  if (strlen(env->msg_id) > MAX_MSG_ID)
    return saga__node_dead_letter(n, channel, "", "command msg_id longer than 512 bytes",
                                  raw_bytes, raw_len);
  /* 0. The reply must be deliverable: a reply_to this node's transport can never reach (or
   * the reserved loopback channel, which would feed the reply to this node's own engine)
   * would make the reply row resend forever. Refused before anything runs or is written:
   * kept as a dead letter with the reason, then acknowledged. */
  if (!reply_to_reachable(n, env->reply_to)) {
    char shown[131];
    saga__printable(shown, sizeof shown, env->reply_to, strlen(env->reply_to));
    char why[200];
    snprintf(why, sizeof why, "reply_to '%s' is not reachable by this node's transport",
             shown);
    n->stats.reply_to_refused++;
    return saga__node_dead_letter(n, channel, env->msg_id, why, raw_bytes, raw_len);
  }
  /* 1. A duplicate: send the recorded reply again. */
  sqlite3_stmt *st = saga__store_stmt(&n->store, ST_INBOX_GET);
  sqlite3_bind_text(st, 1, env->msg_id, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) {
    n->stats.duplicates++;
    const char *reply_to = (const char *)sqlite3_column_text(st, 0);
    rc = saga__node_outbox(n, reply_to ? reply_to : env->reply_to, env->saga_id,
                           sqlite3_column_blob(st, 1), (size_t)sqlite3_column_bytes(st, 1));
    sqlite3_reset(st);
    return rc;
  }
  sqlite3_reset(st);
  if (rc != SQLITE_DONE) return saga__node_db_fail(n, saga__store_err(rc), "reading inbox");

  /* 2. What this node knows of the step, across attempts and phases. */
  st = saga__store_stmt(&n->store, ST_PSTEP_GET);
  sqlite3_bind_text(st, 1, env->saga_id, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 2, env->step);
  rc = sqlite3_step(st);
  int pstate = PS_NONE;
  uint32_t pattempt = 0;
  saga__buf *preply = &n->scratch2;
  saga__buf_reset(preply);
  if (rc == SQLITE_ROW) {
    pstate = sqlite3_column_int(st, 0);
    pattempt = (uint32_t)sqlite3_column_int64(st, 1);
    rc = saga__buf_append(preply, sqlite3_column_blob(st, 2), (size_t)sqlite3_column_bytes(st, 2));
    sqlite3_reset(st);
    if (rc != SAGA_OK) return saga__node_fail(n, rc, "out of memory reading step record");
  } else {
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) return saga__node_db_fail(n, saga__store_err(rc), "reading step");
  }

  /* 3. Decide, running the handler if it is due. */
  outcome o;
  memset(&o, 0, sizeof o);
  rc = decide(n, channel, env, &raw, pstate, pattempt, preply->data, preply->len, &o);
  if (rc != SAGA_OK) return rc;
  if (o.pstate != PS_NONE) {
    rc = put_pstep(n, env, o.pstate, o.store_reply ? o.payload : NULL, o.payload_len);
    if (rc != SAGA_OK) return rc;
  }

  /* 4. The reply: recorded in the inbox and queued in the outbox, in this transaction. */
  char msg_id[MAX_MSG_ID + 3];
  snprintf(msg_id, sizeof msg_id, "%s/r", env->msg_id);
  saga_header hdr = {"traceparent", saga_envelope_header(env, "traceparent")};
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
  saga__buf_reset(&n->scratch);
  rc = saga__envelope_encode_buf(&r, &n->scratch);
  if (rc != SAGA_OK) return saga__node_fail(n, rc, "encoding reply");
  st = saga__store_stmt(&n->store, ST_INBOX_INSERT);
  sqlite3_bind_text(st, 1, env->msg_id, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, env->saga_id, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 3, (sqlite3_int64)saga__node_now(n));
  sqlite3_bind_text(st, 4, env->reply_to, -1, SQLITE_STATIC);
  sqlite3_bind_blob(st, 5, n->scratch.data, (int)n->scratch.len, SQLITE_STATIC);
  rc = saga__store_exec(&n->store, ST_INBOX_INSERT);
  if (rc != SAGA_OK) return saga__node_db_fail(n, rc, "writing inbox");
  SAGA__HOOK(n, "participant.after_inbox");
  return saga__node_outbox(n, env->reply_to, env->saga_id, n->scratch.data, n->scratch.len);
}
