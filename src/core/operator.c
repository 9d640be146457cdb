/*
 * Operators' requests and the definitions tools read. An operator's tool (sagactl) never
 * changes the engine's tables behind its back: it writes a row into saga_operator_request,
 * and the node carries it out in its own transaction, as one unit of a group commit, writing
 * the request's result in the same transaction. A running node looks for new rows every
 * SAGA_OPERATOR_POLL_MS; saga_node_start() takes those written while no node ran. Several
 * nodes sharing one database each may see a request: the first to commit carries it out, the
 * others find it no longer pending.
 *
 * saga_node_start() also records every registered definition (saga_definition and its steps),
 * so that a tool can name a saga's steps and draw its graph.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

enum { REQ_DONE = 1, REQ_REFUSED = 2, POLL_MAX = 64 };

/* ---- definitions ------------------------------------------------------------------------ */

/* A retry policy with its zero fields replaced by the defaults the engine uses. */
static saga_retry resolved(const saga_retry *in) {
  saga_retry r = *in;
  r.max_attempts = saga__retry_max(in);
  if (r.backoff_ms == 0) r.backoff_ms = 100;
  if (!(r.multiplier > 0)) r.multiplier = 2;
  if (r.cap_ms == 0) r.cap_ms = 30000;
  return r;
}

static int record_def(saga_node *n, const saga__def *d, saga__buf *recs) {
  saga__store *s = n->env.store;
  saga__buf_reset(recs);
  for (size_t k = 0; k < d->nsteps; k++) {
    const saga__step *p = &d->steps[k];
    saga__def_step_rec r;
    memset(&r, 0, sizeof r);
    r.name = p->name;
    r.channel = p->channel != NULL ? p->channel : "";
    r.action = p->action != NULL ? p->action : "";
    r.compensation = p->compensation != NULL ? p->compensation : "";
    r.kind = (int)p->kind;
    r.local = p->local_action != NULL;
    r.local_compensation = p->local_compensation != NULL;
    /* As the engine applies them: defaults resolved, no timeout written as UINT32_MAX. */
    r.retry = resolved(&p->retry);
    r.comp_retry = resolved(&p->comp_retry);
    r.timeout_ms = p->timeout_ms == 0 ? SAGA_STEP_NO_TIMEOUT : p->timeout_ms;
    int rc = saga__buf_append(recs, &r, sizeof r);
    if (rc != SAGA_OK) return rc;
  }
  return s->m->def_put(s, d->name, d->version, d->deadline_ms,
                       (const saga__def_step_rec *)(void *)recs->data, d->nsteps,
                       saga__now(&n->env));
}

/* One transaction recording every registered definition. */
static int record_defs(saga_node *n) {
  saga__store *s = n->env.store;
  if (s->m->def_put == NULL || n->engine.ndefs == 0) return SAGA_OK;
  int rc = s->m->begin(s);
  if (rc != SAGA_OK) return saga__store_fail(&n->env, rc, "recording the definitions");
  saga__buf recs;
  saga__buf_init(&recs, n->env.alloc);
  for (size_t d = 0; d < n->engine.ndefs && rc == SAGA_OK; d++)
    rc = record_def(n, &n->engine.defs[d], &recs);
  saga__buf_free(&recs);
  if (rc == SAGA_OK) rc = s->m->commit(s);
  if (rc != SAGA_OK) {
    saga__store_fail(&n->env, rc, "recording the definitions");
    if (s->m->in_tx(s)) s->m->rollback(s);
  }
  return rc;
}

/* ---- finding requests ------------------------------------------------------------------- */

/* Queues the pending requests (unless some are queued already: they are then in flight). */
static void poll_requests(saga_node *n) {
  saga__store *s = n->env.store;
  if (s->m->opreq_pending == NULL || n->opreq_queued > 0) return;
  int64_t ids[POLL_MAX];
  size_t count = 0;
  int rc = s->m->opreq_pending(s, POLL_MAX, ids, &count);
  if (rc != SAGA_OK) {
    saga__store_fail(&n->env, rc, "reading operator requests");
    saga__log(&n->env, SAGA_LOG_WARN, "%s (tried again later)", n->env.errmsg);
    return;
  }
  for (size_t k = 0; k < count; k++) {
    saga__work *w = saga__queue_push(n, W_OPREQ, NULL, 0, NULL, 0, NULL, 0);
    if (w == NULL) break; /* out of memory: the next poll finds it again */
    w->tag = (uint64_t)ids[k];
    n->opreq_queued++;
  }
}

static void poll_timer_cb(saga__timer *t) {
  saga_node *n = t->data;
  if (n->closing || !n->started) return;
  uint64_t now = saga__now(&n->env);
  if (!n->in_flush) poll_requests(n); /* never inside the node's own transaction */
  saga__timer_arm(&n->opreq_timer, n->in_flush ? now : now + SAGA_OPERATOR_POLL_MS);
}

void saga__operator_init(saga_node *n) {
  saga__timer_init(&n->opreq_timer, n->env.clock, poll_timer_cb, n);
}

int saga__operator_start(saga_node *n) {
  int rc = record_defs(n);
  if (rc != SAGA_OK) return rc;
  if (n->env.store->m->opreq_pending == NULL) return SAGA_OK;
  poll_requests(n);
  saga__timer_arm(&n->opreq_timer, saga__now(&n->env) + SAGA_OPERATOR_POLL_MS);
  return SAGA_OK;
}

void saga__operator_stop(saga_node *n) { saga__timer_stop(&n->opreq_timer); }

void saga__operator_done(saga_node *n, int64_t id, int status) {
  if (n->opreq_queued > 0) n->opreq_queued--;
  if (status < 0)
    saga__log(&n->env, SAGA_LOG_WARN, "operator request %" PRId64 " not carried out yet (%s): "
              "tried again within %u ms", id, saga_strerror(status), SAGA_OPERATOR_POLL_MS);
}

/* ---- carrying them out ------------------------------------------------------------------ */

/* A failure of the database (or memory) rather than of the request: the request stays
 * pending and is tried again. */
static int transient(int rc) {
  return rc == SAGA_EIO || rc == SAGA_ESTORE || rc == SAGA_EBUSY || rc == SAGA_ENOMEM ||
         rc == SAGA_ECORRUPT || rc == SAGA_EREADONLY || rc == SAGA_EFULL;
}

typedef struct opctx {
  saga_node *n;
  const saga__opreq *r;
  char result[640];
} opctx;

/* Runs fn inside the operator savepoint: kept when it returns SAGA_OK, undone (with what the
 * journal recorded) otherwise. */
static int in_savepoint(saga_node *n, int (*fn)(opctx *), opctx *c) {
  saga__store *s = n->env.store;
  int rc = s->m->savepoint(s, SAGA__SP_OPERATOR);
  if (rc != SAGA_OK) return saga__store_fail(&n->env, rc, "opening the operator savepoint");
  saga__journal_mark mark = saga__journal_mark_get(&n->journal);
  rc = fn(c);
  int rc2 = SAGA_OK;
  if (rc != SAGA_OK) {
    saga__journal_rewind(&n->journal, &mark);
    rc2 = s->m->rollback_to(s, SAGA__SP_OPERATOR);
  }
  if (rc2 == SAGA_OK) rc2 = s->m->release(s, SAGA__SP_OPERATOR);
  if (rc2 != SAGA_OK) return saga__store_fail(&n->env, rc2, "closing the operator savepoint");
  return rc;
}

static int do_saga(opctx *c, int cancel) {
  saga_node *n = c->n;
  const saga__opreq *r = c->r;
  char note[256];
  snprintf(note, sizeof note, "operator request %" PRId64 ": %s%s%s", r->id, r->action,
           r->by[0] ? " by " : "", r->by);
  int rc = saga__engine_operator(&n->engine, r->target, cancel, note);
  if (rc == SAGA_ENOTFOUND)
    return saga__fail(&n->env, rc, "no saga '%s' in this database", r->target);
  if (rc != SAGA_OK) return rc;
  const saga__inst *i = &n->engine.inst;
  if (cancel)
    snprintf(c->result, sizeof c->result, "cancelled: compensating from step %d ('%s')",
             i->step, i->def->steps[i->step].name);
  else
    snprintf(c->result, sizeof c->result, "compensation resumed at step %d ('%s'), attempt %u",
             i->step, i->def->steps[i->step].name, i->attempt);
  return SAGA_OK;
}
static int do_retry(opctx *c) { return do_saga(c, 0); }
static int do_cancel(opctx *c) { return do_saga(c, 1); }

/* A dead letter id: decimal digits only. */
static int parse_id(const char *t, int64_t *out) {
  if (t[0] == '\0' || strlen(t) > 18) return 0;
  for (const char *p = t; *p; p++)
    if (*p < '0' || *p > '9') return 0;
  *out = (int64_t)strtoll(t, NULL, 10);
  return 1;
}

/* Hands the kept message to the node again, as if it had just been delivered. */
static int do_replay(opctx *c) {
  saga_node *n = c->n;
  saga__store *s = n->env.store;
  int64_t id;
  if (!parse_id(c->r->target, &id))
    return saga__fail(&n->env, SAGA_EINVAL, "'%s' is not a dead letter id", c->r->target);
  saga__buf channel, reason, body;
  saga__buf_init(&channel, n->env.alloc);
  saga__buf_init(&reason, n->env.alloc);
  saga__buf_init(&body, n->env.alloc);
  saga_envelope *env = NULL;
  int rc = s->m->dead_get(s, id, &channel, &reason, &body);
  if (rc == SAGA_ENOTFOUND) {
    rc = saga__fail(&n->env, rc, "no dead letter %" PRId64 " (replayed or purged already?)", id);
    goto out;
  }
  if (rc != SAGA_OK) {
    rc = saga__store_fail(&n->env, rc, "reading the dead letter");
    goto out;
  }
  if (strstr((const char *)reason.data, "[message cut to its first") != NULL) {
    rc = saga__fail(&n->env, SAGA_ETOOBIG, "dead letter %" PRId64 " kept only the start of its "
                    "message (it was too large): it cannot be handled again", id);
    goto out;
  }
  char err[256];
  rc = saga_envelope_decode(body.data, body.len, &n->env.limits, n->env.alloc, &env, err,
                            sizeof err);
  if (rc != SAGA_OK) {
    rc = saga__fail(&n->env, rc == SAGA_ENOMEM ? rc : SAGA_EMALFORMED,
                    "dead letter %" PRId64 " is still not a valid message: %s", id, err);
    goto out;
  }
  const char *ch = (const char *)channel.data;
  if (env->kind == SAGA_MSG_COMMAND && env->msg_id[0] != '\0') {
    /* Handled already (a handler's technical failure, a command nobody handles: the saga
     * was answered and moved on): running it again would change nothing. */
    saga__buf_reset(&n->part.dup_to);
    saga__buf_reset(&n->part.dup);
    rc = s->m->inbox_get(s, env->msg_id, &n->part.dup_to, &n->part.dup);
    if (rc == SAGA_OK) {
      rc = saga__fail(&n->env, SAGA_EEXIST, "command '%s' of saga %s was answered already "
                      "(its reply is recorded): handling it again would change nothing; "
                      "purge the dead letter", env->name, env->saga_id);
      goto out;
    }
    if (rc != SAGA_ENOTFOUND) {
      rc = saga__store_fail(&n->env, rc, "reading the inbox");
      goto out;
    }
  }
  uint64_t dead_before = n->env.stats.dead_letters;
  switch (env->kind) {
  case SAGA_MSG_COMMAND:
    rc = saga__participant_command(&n->part, ch, env, body.data, body.len);
    break;
  case SAGA_MSG_REPLY:
    rc = saga__engine_reply(&n->engine, env);
    break;
  default:
    if (saga__domain_has_channel(&n->domain, ch)) {
      int ack = 1;
      rc = saga__domain_event(&n->domain, ch, env, body.data, body.len, 1, &ack);
    } else {
      rc = saga__journal_remote_event(&n->journal, body.data, body.len);
    }
    break;
  }
  if (rc == SAGA_OK && n->env.stats.dead_letters != dead_before) {
    n->env.stats.dead_letters = dead_before; /* undone with the savepoint */
    rc = saga__fail(&n->env, SAGA_EMALFORMED, "handled again, it was refused the same way: %s",
                    n->journal.dead_reason);
    goto out;
  }
  if (rc != SAGA_OK) goto out;
  uint64_t deleted = 0;
  rc = s->m->dead_delete(s, id, &deleted);
  if (rc != SAGA_OK) {
    rc = saga__store_fail(&n->env, rc, "deleting the replayed dead letter");
    goto out;
  }
  snprintf(c->result, sizeof c->result, "handled again (%s '%s' of saga %s on '%s')",
           env->kind == SAGA_MSG_COMMAND ? "command"
           : env->kind == SAGA_MSG_REPLY ? "reply"
                                         : "event",
           env->name != NULL ? env->name : "", env->saga_id != NULL ? env->saga_id : "", ch);
out:
  saga_envelope_free(env);
  saga__buf_free(&channel);
  saga__buf_free(&reason);
  saga__buf_free(&body);
  return rc;
}

static int do_purge(opctx *c) {
  saga_node *n = c->n;
  saga__store *s = n->env.store;
  int64_t id = -1;
  if (strcmp(c->r->target, "*") != 0 && !parse_id(c->r->target, &id))
    return saga__fail(&n->env, SAGA_EINVAL, "'%s' is not a dead letter id (or '*' for all)",
                      c->r->target);
  uint64_t deleted = 0;
  int rc = s->m->dead_delete(s, id, &deleted);
  if (rc != SAGA_OK) return saga__store_fail(&n->env, rc, "deleting dead letters");
  if (id >= 0 && deleted == 0)
    return saga__fail(&n->env, SAGA_ENOTFOUND, "no dead letter %" PRId64, id);
  snprintf(c->result, sizeof c->result, "%" PRIu64 " dead letter%s deleted", deleted,
           deleted == 1 ? "" : "s");
  return SAGA_OK;
}

int saga__operator_apply(saga_node *n, int64_t id) {
  saga__store *s = n->env.store;
  saga__opreq r;
  int rc = s->m->opreq_get(s, id, &r);
  if (rc == SAGA_ENOTFOUND) return SAGA_OK; /* deleted by an operator meanwhile */
  if (rc != SAGA_OK) return saga__store_fail(&n->env, rc, "reading an operator request");
  if (r.state != 0) return SAGA_OK; /* carried out by another node sharing the database */
  static const struct {
    const char *name;
    int (*fn)(opctx *);
  } actions[] = {{"retry", do_retry}, {"cancel", do_cancel}, {"replay", do_replay},
                 {"purge", do_purge}};
  int (*fn)(opctx *) = NULL;
  for (size_t k = 0; k < sizeof actions / sizeof actions[0]; k++)
    if (strcmp(r.action, actions[k].name) == 0) fn = actions[k].fn;
  opctx c = {n, &r, ""};
  if (fn == NULL)
    rc = saga__fail(&n->env, SAGA_EINVAL, "unknown action '%s' (retry, cancel, replay, purge)",
                    r.action);
  else
    rc = in_savepoint(n, fn, &c);
  if (rc != SAGA_OK && transient(rc)) return rc; /* stays pending; tried again */
  int state = rc == SAGA_OK ? REQ_DONE : REQ_REFUSED;
  const char *result = rc == SAGA_OK ? c.result : n->env.errmsg;
  char text[sizeof c.result];
  snprintf(text, sizeof text, "%s", result);
  rc = s->m->opreq_finish(s, id, state, text, saga__now(&n->env));
  if (rc != SAGA_OK) return saga__store_fail(&n->env, rc, "writing an operator request's result");
  saga__log(&n->env, state == REQ_DONE ? SAGA_LOG_INFO : SAGA_LOG_WARN,
            "operator request %" PRId64 " (%s %s%s%s): %s: %s", id, r.action, r.target,
            r.by[0] ? " by " : "", r.by, state == REQ_DONE ? "done" : "refused", text);
  n->env.errmsg[0] = '\0';
  return SAGA_OK;
}
