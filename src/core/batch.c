/*
 * The group commit. One flush = one store transaction holding everything queued since the
 * last one (at most batch_max items each). Only after COMMIT succeeds are deliveries
 * acknowledged, API callbacks and events run, and the new outbox rows published. If the
 * transaction fails, nothing of it happened: deliveries stay unacknowledged (the sender
 * resends them), callbacks get the error.
 *
 * The first try of a transaction has no per-item savepoint (they cost); an item that fails
 * after writing makes the whole transaction run again, from its start, with a savepoint per
 * item (a "replay"), so that only that item's writes are undone.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

/* A reply for a saga whose definition version is not registered on this node: kept in the
 * store and acknowledged (a broker would dead-letter it after its delivery cap, and the saga
 * would wait for ever), applied by saga_node_start() once the version is registered. */
static int park_reply(saga_node *n, const saga_envelope *env, const void *data, size_t len) {
  saga__store *s = n->env.store;
  char why[sizeof n->env.errmsg];
  snprintf(why, sizeof why, "%s", n->env.errmsg);
  int rc = s->m->parked_insert(s, env->saga_id, saga__now(&n->env), data, len);
  if (rc != SAGA_OK) return saga__store_fail(&n->env, rc, "parking a reply");
  n->env.stats.replies_parked++;
  saga__log(&n->env, SAGA_LOG_WARN, "reply '%s' parked: %s; it is applied when a node started "
            "with that version registered opens this database", env->msg_id, why);
  return SAGA_OK;
}

/* Runs one delivered message inside the transaction. */
static int process_delivery(saga_node *n, saga__queue *q, saga__work *w) {
  const char *channel = saga__queue_str(q, w->off1);
  const uint8_t *data = q->arena.data + w->off2;
  saga_envelope *env = NULL;
  char err[256];
  if (strcmp(channel, SAGA__LOCAL_CHANNEL) == 0 && !(w->tag & SAGA__LOOPBACK_TAG)) {
    /* The reserved loopback channel from the transport: only this node may use it (a local
     * step's command and reply). Kept for an operator and acknowledged. */
    size_t max = n->env.limits.max_message_bytes;
    int rc = saga__journal_dead_letter(&n->journal, channel, NULL,
                                   "a delivery on the reserved channel '" SAGA__LOCAL_CHANNEL
                                   "' from the transport",
                                   data, w->len2 > max ? max : w->len2);
    w->ack = rc == SAGA_OK;
    return rc;
  }
  int rc = saga_envelope_decode(data, w->len2, &n->env.limits, n->env.alloc, &env, err,
                                sizeof err);
  if (rc == SAGA_ENOMEM) return saga__fail(&n->env, rc, "out of memory decoding a message");
  if (rc != SAGA_OK) {
    /* Undecodable: keep it for an operator and acknowledge it, so it is not redelivered. */
    char reason[320];
    snprintf(reason, sizeof reason, "%s: %s", saga_err_name(rc), err);
    size_t max = n->env.limits.max_message_bytes;
    size_t keep = w->len2 > max ? max : w->len2;
    rc = saga__journal_dead_letter(&n->journal, channel, NULL, reason, data, keep);
    w->ack = rc == SAGA_OK;
    return rc;
  }
  switch (env->kind) {
  case SAGA_MSG_COMMAND:
    rc = saga__participant_command(&n->part, channel, env, data, w->len2);
    break;
  case SAGA_MSG_REPLY:
    rc = saga__engine_reply(&n->engine, env);
    if (rc == SAGA_ENODEF) rc = park_reply(n, env, data, w->len2);
    break;
  default:
    if (saga__domain_has_channel(&n->domain, channel)) {
      int ack = 1;
      rc = saga__domain_event(&n->domain, channel, env, data, w->len2, 0, &ack);
      saga_envelope_free(env);
      w->ack = rc == SAGA_OK && ack;
      return rc;
    }
    rc = saga__journal_remote_event(&n->journal, data, w->len2);
    break;
  }
  saga_envelope_free(env);
  if (rc == SAGA_ENODEF) {
    w->ack = 0; /* keep it at the sender until the definition is registered */
    return SAGA_OK;
  }
  w->ack = rc == SAGA_OK;
  return rc;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Deletes the outbox rows confirmed in this transaction (the W_SENT items of [from, to)):
 * sorted, with one delete per run of consecutive ids. Each delete is atomic by itself, so no
 * savepoint: a failed one leaves its rows to be resent (receivers deduplicate), unless the
 * store rolled the whole transaction back. */
static void delete_sent(saga_node *n, saga__queue *q, size_t from, size_t to, int *broken) {
  saga__store *s = n->env.store;
  saga__buf *ids = &n->sent_ids;
  saga__buf_reset(ids);
  for (size_t i = from; i < to; i++) {
    saga__work *w = &q->items[i];
    if (w->type != W_SENT) continue;
    w->status = SAGA_OK;
    /* Out of memory: the rows stay and are resent later. */
    if (saga__buf_append(ids, &w->tag, sizeof w->tag) != SAGA_OK) break;
  }
  size_t count = ids->len / sizeof(uint64_t);
  if (count == 0) return;
  uint64_t *v = (uint64_t *)(void *)ids->data;
  if (count > 1) qsort(v, count, sizeof *v, cmp_u64);
  for (size_t k = 0; k < count;) {
    size_t e = k;
    while (e + 1 < count && v[e + 1] <= v[e] + 1) e++;
    uint64_t deleted = 0;
    int rc = s->m->outbox_delete(s, v[k], v[e], &deleted);
    if (rc != SAGA_OK) {
      saga__store_fail(&n->env, rc, "deleting confirmed outbox rows");
      saga__log(&n->env, SAGA_LOG_WARN, "%s (they will be resent)", n->env.errmsg);
      if (!s->m->in_tx(s)) {
        *broken = 1;
        return;
      }
    } else {
      n->env.stats.acked_out += deleted;
    }
    k = e + 1;
  }
}

/* Runs fn(n, arg) as one unit of the transaction. Careful mode wraps it in a savepoint, so
 * that a failure rolls back only this unit. Fast mode (the first try of every transaction)
 * has no savepoint: a unit that fails after writing sets *replay, and the caller rolls the
 * transaction back and runs it again in careful mode. A failure before any write (counting
 * writes a handler made and rolled back) needs no replay. What the unit recorded in the
 * journal is forgotten when it fails. */
static int run_unit(saga_node *n, int careful, int *broken, int *replay,
                    int (*fn)(saga_node *n, void *arg), void *arg) {
  saga__store *s = n->env.store;
  int rc;
  int64_t writes_before = s->m->writes(s);
  n->part.undone = 0;
  if (careful) {
    rc = s->m->savepoint(s, SAGA__SP_ITEM);
    if (rc != SAGA_OK) {
      *broken = 1;
      return saga__store_fail(&n->env, rc, "opening savepoint");
    }
  }
  saga__journal_mark mark = saga__journal_mark_get(&n->journal);
  rc = fn(n, arg);
  if (rc < 0) saga__journal_rewind(&n->journal, &mark);
  if (!careful) {
    if (!s->m->in_tx(s)) {
      *broken = 1;
    } else if (rc < 0 && s->m->writes(s) - writes_before != n->part.undone) {
      *replay = 1;
    }
    return rc;
  }
  int rc2;
  if (rc < 0) {
    rc2 = s->m->rollback_to(s, SAGA__SP_ITEM);
    if (rc2 == SAGA_OK) rc2 = s->m->release(s, SAGA__SP_ITEM);
  } else {
    rc2 = s->m->release(s, SAGA__SP_ITEM);
  }
  if (rc2 != SAGA_OK || !s->m->in_tx(s)) *broken = 1;
  return rc;
}

typedef struct item {
  saga__queue *q;
  saga__work *w;
} item;

/* One queued work item (a unit, see run_unit). */
static int item_fn(saga_node *n, void *arg) {
  saga__queue *q = ((item *)arg)->q;
  saga__work *w = ((item *)arg)->w;
  switch (w->type) {
  case W_DELIVERY:
    return process_delivery(n, q, w);
  case W_START: {
    const char *name = saga__queue_str(q, w->off1);
    size_t nlen = strlen(name); /* then NUL and the caller's traceparent, if any */
    const char *tp = w->len1 > nlen ? name + nlen + 1 : NULL;
    const saga__def *def = saga__engine_find(&n->engine, name, 0);
    if (def == NULL)
      return saga__fail(&n->env, SAGA_ENODEF, "definition '%s' is not registered", name);
    return saga__engine_start(&n->engine, def, q->arena.data + w->off2, w->len2,
                              w->len3 == SIZE_MAX ? NULL : saga__queue_str(q, w->off3), tp,
                              w->saga_id, &w->existed);
  }
  case W_CANCEL:
    return saga__engine_cancel(&n->engine, saga__queue_str(q, w->off1));
  case W_RETRY:
    return saga__engine_retry(&n->engine, saga__queue_str(q, w->off1));
  case W_DEAD: {
    const uint8_t *data = q->arena.data + w->off2;
    size_t max = n->env.limits.max_message_bytes;
    size_t keep = w->len2 > max ? max : w->len2;
    int rc = saga__journal_dead_letter(&n->journal, saga__queue_str(q, w->off1), NULL,
                                       saga__queue_str(q, w->off3), data, keep);
    w->ack = rc == SAGA_OK;
    return rc;
  }
  case W_UNSENDABLE:
    return saga__relay_unsendable(n, w->tag, w->code);
  case W_OPREQ:
    return saga__operator_apply(n, (int64_t)w->tag);
  case W_TRANSACT: {
    struct {
      saga_transact_fn fn;
      void *arg;
    } t;
    memcpy(&t, q->arena.data + w->off1, sizeof t);
    return saga__domain_transact(&n->domain, t.fn, t.arg);
  }
  default: /* W_SENT: delete_sent() */
    return SAGA_OK;
  }
}

static void process_item(saga_node *n, saga__queue *q, saga__work *w, int careful, int *broken,
                         int *replay) {
  item it = {q, w};
  int rc = run_unit(n, careful, broken, replay, item_fn, &it);
  w->status = rc;
  if (rc < 0) w->ack = 0;
}

typedef struct due_ctx {
  const char *id;
  uint64_t now;
} due_ctx;

static int due_fn(saga_node *n, void *arg) {
  due_ctx *d = arg;
  return saga__engine_due_one(&n->engine, d->id, d->now);
}

/* The sagas whose deadline passed, each a unit of its own: one that fails (a damaged row,
 * say) is logged and left for a later try, and does not fail the work of the others.
 * *more: a full batch was listed. Returns < 0 only when the list itself failed. */
static int process_due(saga_node *n, int careful, int *broken, int *replay, int *more) {
  uint64_t now = saga__now(&n->env);
  size_t count = 0;
  int rc = saga__engine_due_list(&n->engine, now, n->batch_max, &count);
  if (rc < 0) return rc;
  *more = count >= n->batch_max;
  for (size_t k = 0; k < count && !*broken && !*replay; k++) {
    due_ctx d = {saga__engine_due_id(&n->engine, k), now};
    rc = run_unit(n, careful, broken, replay, due_fn, &d);
    if (rc < 0 && !*broken && !*replay) {
      n->due_failed++;
      char id[40];
      snprintf(id, sizeof id, "%s", d.id);
      saga__log(&n->env, SAGA_LOG_WARN, "timer of saga %s failed, tried again later: %s", id,
                n->env.errmsg);
    }
  }
  return SAGA_OK;
}

/* After the transaction: acknowledge, call back, or report the failure. */
static void after_tx(saga_node *n, saga__queue *q, size_t from, size_t to, int committed,
                     int tx_rc) {
  if (committed) saga__events_dispatch_remote(n); /* before their acknowledgements */
  for (size_t i = from; i < to; i++) {
    saga__work *w = &q->items[i];
    int status = committed ? w->status : (w->status < 0 ? w->status : tx_rc);
    switch (w->type) {
    case W_DELIVERY:
    case W_DEAD:
      if (committed && w->ack) {
        if (w->tag & SAGA__LOOPBACK_TAG) {
          saga__work *s = saga__queue_push(n, W_SENT, NULL, 0, NULL, 0, NULL, 0);
          if (s != NULL) s->tag = w->tag & ~SAGA__LOOPBACK_TAG;
        } else if (n->transport_open && !n->transport_closed) {
          n->tm.ack(n->transport, w->tag);
          SAGA__HOOK(&n->env, "tx.after_ack");
        }
      }
      break;
    case W_START:
      if (w->cb != NULL)
        ((saga_start_cb)w->cb)(n, status, status == SAGA_OK ? w->saga_id : NULL, w->existed,
                               w->cb_arg);
      break;
    case W_CANCEL:
    case W_RETRY:
    case W_TRANSACT:
      if (w->cb != NULL) ((saga_done_cb)w->cb)(n, status, w->cb_arg);
      break;
    case W_OPREQ:
      saga__operator_done(n, (int64_t)w->tag, status);
      break;
    case W_SENT:
    case W_UNSENDABLE:
      break;
    }
  }
  if (committed)
    saga__events_dispatch(n);
  else
    saga__journal_clear_events(&n->journal);
}

void saga__batch_fail(saga_node *n, saga__queue *q, int status) {
  for (size_t i = 0; i < q->n; i++) q->items[i].status = status;
  size_t count = q->n;
  q->n = 0; /* after_tx may not queue into it again while we walk it */
  saga__queue tmp = *q;
  tmp.n = count;
  after_tx(n, &tmp, 0, count, 0, status);
}

/* One try of a transaction over items [from, to). Returns with the transaction committed
 * (SAGA_OK) or rolled back; *replay asks for a careful retry (see process_item). */
static int try_tx(saga_node *n, saga__queue *q, size_t from, size_t to, int with_timers,
                  int *more_due, int careful, int *replay) {
  saga__store *s = n->env.store;
  saga__journal_begin(&n->journal);
  n->part.tx_ended = 0;
  int broken = 0, rc = s->m->begin(s);
  if (rc != SAGA_OK) {
    saga__store_fail(&n->env, rc, "beginning transaction");
    return rc;
  }
  for (size_t i = from; i < to && !broken && !*replay; i++)
    if (q->items[i].type != W_SENT) process_item(n, q, &q->items[i], careful, &broken, replay);
  if (!broken && !*replay) delete_sent(n, q, from, to, &broken);
  if (with_timers && !broken && !*replay) {
    int trc = process_due(n, careful, &broken, replay, more_due);
    if (trc < 0 || !s->m->in_tx(s)) broken = 1;
    rc = trc < 0 ? trc : rc;
  }
  if (!broken && !*replay) {
    int hrc = saga__journal_finish(&n->journal);
    if (hrc != SAGA_OK) {
      /* Fast: run again with savepoints (and fail the same way, cleanly); careful: fail. */
      if (!careful && s->m->in_tx(s))
        *replay = 1;
      else
        broken = 1;
      rc = hrc;
    }
  }
  if (!broken && !*replay) {
    SAGA__HOOK(&n->env, "tx.before_commit");
    rc = s->m->commit(s);
    if (rc == SAGA_OK) {
      saga__engine_stats_commit(&n->engine);
      SAGA__HOOK(&n->env, "tx.after_commit");
      return SAGA_OK;
    }
    saga__store_fail(&n->env, rc, "committing");
  } else if (rc == SAGA_OK) {
    rc = SAGA_ESTORE;
    for (size_t i = from; i < to; i++)
      if (q->items[i].status < 0) rc = q->items[i].status;
  }
  if (s->m->in_tx(s)) s->m->rollback(s);
  return rc;
}

/* Runs items [from, to) in one transaction: first fast, then, if an item failed half-way,
 * again with a savepoint per item, from the state the transaction started with. */
static int run_tx(saga_node *n, saga__queue *q, size_t from, size_t to, int with_timers,
                  int *more_due) {
  saga_node_stats stats = n->env.stats;
  saga__journal_mark mark = saga__journal_mark_get(&n->journal);
  int replay = 0;
  int rc = try_tx(n, q, from, to, with_timers, more_due, 0, &replay);
  if (!replay) return rc;
  n->env.stats = stats;
  saga__journal_rewind(&n->journal, &mark);
  for (size_t i = from; i < to; i++) {
    q->items[i].status = SAGA_OK;
    q->items[i].ack = 0;
    q->items[i].existed = 0;
  }
  *more_due = 0;
  n->env.stats.replayed_tx++;
  replay = 0;
  return try_tx(n, q, from, to, with_timers, more_due, 1, &replay);
}

void saga__batch_flush(saga_node *n) {
  if (n->closing || !n->started || n->in_flush) return;
  n->in_flush = 1;
  saga__queue *q = &n->queues[n->cur];
  n->cur ^= 1;
  size_t total = q->n, from = 0;
  int due = n->timers_due;
  n->timers_due = 0;
  int failed = 0;
  do {
    size_t to = total - from > n->batch_max ? from + n->batch_max : total;
    int last = to == total, more_due = 0;
    int rc = run_tx(n, q, from, to, last && due, &more_due);
    n->env.stats.transactions++;
    n->env.stats.work_items += to - from;
    if (rc != SAGA_OK) {
      failed = 1;
      n->env.stats.commit_failures++;
      if (n->part.tx_ended)
        saga__log(&n->env, SAGA_LOG_ERROR, "transaction ended by a handler: %s",
                  n->env.errmsg);
      else
        saga__log(&n->env, SAGA_LOG_ERROR,
                  "transaction failed, nothing of it was applied: %s", n->env.errmsg);
      if (last && due) n->timers_due = 1;
    } else if (more_due) {
      n->timers_due = 1;
    }
    after_tx(n, q, from, to, rc == SAGA_OK, rc);
    from = to;
  } while (from < total && !n->closing);
  if (from < total) after_tx(n, q, from, total, 0, SAGA_ECLOSED); /* closed mid-way */
  q->n = 0;
  saga__buf_reset(&q->arena);
  n->in_flush = 0;
  if (n->closing) return; /* node.c finishes the close */
  saga__waiters_fire(n); /* watchers of sagas that were terminal already when watched */
  saga__relay_fresh(n);
  saga__batch_arm_deadline(n);
  if (failed || n->due_failed) {
    n->due_failed = 0;
    /* Give a full or failing disk a moment before the timers try again. */
    saga__timer_arm(&n->retry_timer, saga__now(&n->env) + 100);
  } else if (n->timers_due) {
    saga__queue_schedule(n);
  }
}

/* ---- recovery --------------------------------------------------------------------------- */

typedef struct parked_rows {
  saga__buf *buf; /* per row: u64 id, u64 length, bytes */
  int oom;
} parked_rows;

static void parked_row(void *arg, uint64_t id, const char *saga_id, const void *body,
                       size_t len) {
  (void)saga_id;
  parked_rows *p = arg;
  uint64_t hdr[2] = {id, (uint64_t)len};
  if (saga__buf_append(p->buf, hdr, sizeof hdr) != SAGA_OK ||
      saga__buf_append(p->buf, body, len) != SAGA_OK)
    p->oom = 1;
}

/* Applies one parked reply under a savepoint: deleted when applied (or when it can never be:
 * undecodable), kept when its definition is still missing or it failed. */
static int apply_parked(saga_node *n, uint64_t id, const uint8_t *body, size_t len,
                        size_t *applied) {
  saga__store *s = n->env.store;
  saga_envelope *env = NULL;
  char err[256];
  int rc = saga_envelope_decode(body, len, &n->env.limits, n->env.alloc, &env, err, sizeof err);
  if (rc == SAGA_ENOMEM) return saga__fail(&n->env, rc, "out of memory decoding a parked reply");
  if (rc != SAGA_OK) {
    saga__log(&n->env, SAGA_LOG_WARN, "parked reply %" PRIu64 " does not decode (%s): dropped",
              id, err);
    rc = s->m->parked_delete(s, id);
    return rc == SAGA_OK ? rc : saga__store_fail(&n->env, rc, "deleting a parked reply");
  }
  rc = s->m->savepoint(s, SAGA__SP_ITEM);
  if (rc != SAGA_OK) {
    saga_envelope_free(env);
    return saga__store_fail(&n->env, rc, "opening savepoint");
  }
  saga__journal_mark mark = saga__journal_mark_get(&n->journal);
  rc = env->kind == SAGA_MSG_REPLY ? saga__engine_reply(&n->engine, env) : SAGA_OK;
  if (rc == SAGA_OK) rc = s->m->parked_delete(s, id);
  if (rc == SAGA_OK) {
    (*applied)++;
    rc = s->m->release(s, SAGA__SP_ITEM);
    saga_envelope_free(env);
    return rc == SAGA_OK ? rc : saga__store_fail(&n->env, rc, "releasing savepoint");
  }
  if (rc != SAGA_ENODEF)
    saga__log(&n->env, SAGA_LOG_WARN, "parked reply '%s' not applied (kept): %s", env->msg_id,
              n->env.errmsg);
  saga_envelope_free(env);
  saga__journal_rewind(&n->journal, &mark);
  rc = s->m->rollback_to(s, SAGA__SP_ITEM);
  if (rc == SAGA_OK) rc = s->m->release(s, SAGA__SP_ITEM);
  return rc == SAGA_OK ? rc : saga__store_fail(&n->env, rc, "rolling back to savepoint");
}

/* Applies the replies parked while their definition was missing. */
static int apply_parked_all(saga_node *n) {
  saga__store *s = n->env.store;
  saga__buf buf;
  saga__buf_init(&buf, n->env.alloc);
  uint64_t after = 0;
  size_t applied = 0, seen = 0;
  int rc = SAGA_OK;
  for (;;) {
    saga__buf_reset(&buf);
    parked_rows p = {&buf, 0};
    size_t rows = 0;
    rc = s->m->parked_after(s, after, 64, parked_row, &p, &rows);
    if (rc != SAGA_OK) {
      rc = saga__store_fail(&n->env, rc, "reading parked replies");
      break;
    }
    if (p.oom) {
      rc = saga__fail(&n->env, SAGA_ENOMEM, "out of memory reading parked replies");
      break;
    }
    for (size_t off = 0; off < buf.len && rc == SAGA_OK;) {
      uint64_t hdr[2];
      memcpy(hdr, buf.data + off, sizeof hdr);
      off += sizeof hdr;
      rc = apply_parked(n, hdr[0], buf.data + off, (size_t)hdr[1], &applied);
      off += (size_t)hdr[1];
      after = hdr[0];
      seen++;
    }
    if (rc != SAGA_OK || rows < 64) break;
  }
  saga__buf_free(&buf);
  if (rc == SAGA_OK && seen > 0)
    saga__log(&n->env, applied == seen ? SAGA_LOG_INFO : SAGA_LOG_WARN,
              "%zu parked replies applied, %zu still wait for their definition", applied,
              seen - applied);
  return rc;
}

int saga__batch_recover(saga_node *n) {
  saga__store *s = n->env.store;
  int missing = 0;
  saga__journal_begin(&n->journal);
  int rc = s->m->begin(s);
  if (rc != SAGA_OK) {
    saga__store_fail(&n->env, rc, "beginning recovery");
  } else {
    rc = saga__engine_unpark(&n->engine, &missing);
    if (rc == SAGA_OK) rc = apply_parked_all(n);
    if (rc == SAGA_OK) rc = saga__journal_finish(&n->journal);
    if (rc == SAGA_OK) {
      rc = s->m->commit(s);
      if (rc != SAGA_OK) saga__store_fail(&n->env, rc, "committing recovery");
      else saga__engine_stats_commit(&n->engine);
    }
  }
  if (rc != SAGA_OK) {
    if (s->m->in_tx(s)) s->m->rollback(s);
    saga__journal_clear_events(&n->journal);
    return rc;
  }
  return missing;
}

/* ---- timers of due sagas ---------------------------------------------------------------- */

static void due_timer_cb(saga__timer *t) {
  saga_node *n = t->data;
  n->timers_due = 1;
  saga__queue_schedule(n);
}

void saga__batch_init(saga_node *n) {
  saga__timer_init(&n->deadline_timer, n->env.clock, due_timer_cb, n);
  saga__timer_init(&n->retry_timer, n->env.clock, due_timer_cb, n);
}

void saga__batch_stop(saga_node *n) {
  saga__timer_stop(&n->deadline_timer);
  saga__timer_stop(&n->retry_timer);
}

void saga__batch_arm_deadline(saga_node *n) {
  if (n->closing) return;
  saga__store *s = n->env.store;
  uint64_t at = 0;
  if (s->m->inst_next_due(s, &at) != SAGA_OK) {
    saga__timer_stop(&n->deadline_timer);
    return;
  }
  /* A timer that just failed is due still: not again before the retry timer's pause. */
  uint64_t floor = n->due_failed ? saga__now(&n->env) + 100 : 0;
  saga__timer_arm(&n->deadline_timer, at > floor ? at : floor);
}
