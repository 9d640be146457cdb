/*
 * The node: lifecycle, the work queue and its group commit, the outbox relay, the API entry
 * points that queue work, and the host side of the transport interface.
 *
 * One flush = one SQLite transaction holding everything queued since the last one. Only
 * after COMMIT succeeds are deliveries acknowledged, API callbacks and events run, and the
 * new outbox rows published. If the transaction fails, nothing of it happened: deliveries
 * stay unacknowledged (the sender resends them), callbacks get the error.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

static void close_step(saga_node *n);

/* ---- after the commit: events to the application -------------------------------------- */

static void dispatch_remote(saga_node *n, size_t off);

static void dispatch_events(saga_node *n) {
  for (size_t i = 0; i < n->nevents; i++) {
    const saga__event_rec *r = &n->events[i];
    if (r->remote_off != 0) {
      dispatch_remote(n, (size_t)(r->remote_off - 1));
      continue;
    }
    if (n->on_event == NULL) continue;
    saga_event ev;
    const char *text = (const char *)n->event_text.data;
    ev.type = r->type;
    ev.saga_id = r->saga_id;
    ev.detail = text + r->detail_off;
    ev.definition = ev.detail + strlen(ev.detail) + 1;
    ev.version = r->def ? r->def->version : 0;
    ev.step = r->step;
    ev.step_name = (r->def && r->step >= 0 && (size_t)r->step < r->def->nsteps)
                       ? r->def->steps[r->step].name
                       : "";
    ev.attempt = r->attempt;
    ev.state = r->state;
    ev.at_ms = r->at_ms;
    ev.data = NULL;
    n->on_event(n, &ev, n->event_arg);
  }
  n->nevents = 0;
  saga__buf_reset(&n->event_text);
  saga__buf_reset(&n->remote_events);
}

/* ---- the work queue --------------------------------------------------------------------- */

static void idle_cb(uv_idle_t *h);

static void schedule_flush(saga_node *n) {
  if (n->idle_active || n->closing) return;
  n->idle_active = 1;
  uv_idle_start(&n->idle, idle_cb);
}

/* Reserves one item; copies up to three byte ranges into the arena. */
static saga__work *queue_push(saga_node *n, saga__work_type type, const void *b1, size_t l1,
                              const void *b2, size_t l2, const void *b3, size_t l3) {
  saga__queue *q = &n->queues[n->cur];
  if (q->n == q->cap) {
    size_t cap = q->cap ? q->cap * 2 : 64;
    saga__work *p = saga__realloc(n->alloc, q->items, cap * sizeof *p);
    if (p == NULL) return NULL;
    q->items = p;
    q->cap = cap;
  }
  size_t need = (b1 ? l1 + 1 : 0) + (b2 ? l2 + 1 : 0) + (b3 ? l3 + 1 : 0);
  if (saga__buf_reserve(&q->arena, need) != SAGA_OK) return NULL;
  saga__work *w = &q->items[q->n];
  memset(w, 0, sizeof *w);
  w->type = type;
  w->len3 = SIZE_MAX;
  static const char zero = 0;
  if (b1) {
    w->off1 = q->arena.len;
    w->len1 = l1;
    saga__buf_append(&q->arena, b1, l1);
    saga__buf_append(&q->arena, &zero, 1);
  }
  if (b2) {
    w->off2 = q->arena.len;
    w->len2 = l2;
    saga__buf_append(&q->arena, b2, l2);
    saga__buf_append(&q->arena, &zero, 1);
  }
  if (b3) {
    w->off3 = q->arena.len;
    w->len3 = l3;
    saga__buf_append(&q->arena, b3, l3);
    saga__buf_append(&q->arena, &zero, 1);
  }
  q->n++;
  schedule_flush(n);
  return w;
}

static const char *arena_str(saga__queue *q, size_t off) {
  return (const char *)q->arena.data + off;
}

/* Keeps an event message from another node for dispatch after the commit. Events nobody
 * subscribed to are acknowledged and dropped. */
static int queue_remote_event(saga_node *n, const uint8_t *data, size_t len) {
  if (n->event_sub_cb == NULL) return SAGA_OK;
  if (n->nevents == n->events_cap) {
    size_t cap = n->events_cap ? n->events_cap * 2 : 64;
    saga__event_rec *p = saga__realloc(n->alloc, n->events, cap * sizeof *p);
    if (p == NULL) return saga__node_fail(n, SAGA_ENOMEM, "out of memory buffering an event");
    n->events = p;
    n->events_cap = cap;
  }
  uint64_t len64 = len;
  size_t off = n->remote_events.len;
  if (saga__buf_append(&n->remote_events, &len64, sizeof len64) != SAGA_OK ||
      saga__buf_append(&n->remote_events, data, len) != SAGA_OK) {
    n->remote_events.len = off;
    return saga__node_fail(n, SAGA_ENOMEM, "out of memory buffering an event");
  }
  saga__event_rec *r = &n->events[n->nevents++];
  memset(r, 0, sizeof *r);
  r->remote_off = off + 1;
  return SAGA_OK;
}

static saga_event_type event_type_of(const char *name) {
  for (int t = 1; t <= 16; t++)
    if (strcmp(saga_event_name(t), name) == 0) return (saga_event_type)t;
  return (saga_event_type)0;
}

/* Decodes a received event and hands it to the subscriber. */
static void dispatch_remote(saga_node *n, size_t off) {
  uint64_t len;
  memcpy(&len, n->remote_events.data + off, sizeof len);
  saga_envelope *env = NULL;
  saga_data *data = NULL;
  char err[200];
  if (saga_envelope_decode(n->remote_events.data + off + sizeof len, (size_t)len, &n->limits,
                           n->alloc, &env, err, sizeof err) != SAGA_OK ||
      saga__data_decode(env->payload, env->payload_len, &n->limits, n->alloc, &data, err,
                        sizeof err) != SAGA_OK) {
    saga__node_log(n, SAGA_LOG_WARN, "malformed event message dropped: %s", err);
    saga_envelope_free(env);
    return;
  }
  const char *version = saga_envelope_header(env, "version");
  const char *at = saga_envelope_header(env, "at");
  const char *def = saga_envelope_header(env, "definition");
  const char *step_name = saga_envelope_header(env, "step-name");
  saga_event ev;
  ev.type = event_type_of(env->name);
  ev.saga_id = env->saga_id;
  ev.definition = def ? def : "";
  ev.version = version ? (uint32_t)strtoul(version, NULL, 10) : 0;
  ev.step = env->step == UINT32_MAX ? -1 : (int)env->step;
  ev.step_name = step_name ? step_name : "";
  ev.attempt = env->attempt;
  ev.state = (saga_state)env->status;
  ev.detail = env->error;
  ev.at_ms = at ? strtoull(at, NULL, 10) : 0;
  ev.data = data;
  n->event_sub_cb(n, &ev, n->event_sub_arg);
  saga_data_free(data);
  saga_envelope_free(env);
}

/* Runs one delivered message inside the transaction. */
static int process_delivery(saga_node *n, saga__queue *q, saga__work *w) {
  const char *channel = arena_str(q, w->off1);
  const uint8_t *data = q->arena.data + w->off2;
  saga_envelope *env = NULL;
  char err[256];
  int rc = saga_envelope_decode(data, w->len2, &n->limits, n->alloc, &env, err, sizeof err);
  if (rc == SAGA_ENOMEM) return saga__node_fail(n, rc, "out of memory decoding a message");
  if (rc != SAGA_OK) {
    /* Undecodable: keep it for an operator and acknowledge it, so it is not redelivered. */
    char reason[320];
    snprintf(reason, sizeof reason, "%s: %s", saga_err_name(rc), err);
    size_t keep = w->len2 > n->limits.max_message_bytes ? n->limits.max_message_bytes : w->len2;
    rc = saga__node_dead_letter(n, channel, NULL, reason, data, keep);
    w->ack = rc == SAGA_OK;
    return rc;
  }
  switch (env->kind) {
  case SAGA_MSG_COMMAND:
    rc = saga__participant_command(n, channel, env, data, w->len2);
    break;
  case SAGA_MSG_REPLY:
    rc = saga__engine_reply(n, env);
    break;
  default:
    rc = queue_remote_event(n, data, w->len2);
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

/* Deletes the outbox rows confirmed in this transaction (the W_SENT items of [from, to)):
 * sorted, with one DELETE per run of consecutive ids. Each DELETE is atomic by itself, so no
 * savepoint: a failed one leaves its rows to be resent (receivers deduplicate), unless SQLite
 * rolled the whole transaction back. */
static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static void delete_sent(saga_node *n, saga__queue *q, size_t from, size_t to, int *broken) {
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
    sqlite3_stmt *st = saga__store_stmt(&n->store, ST_OUTBOX_DELETE);
    sqlite3_bind_int64(st, 1, (sqlite3_int64)v[k]);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)v[e]);
    int rc = saga__store_exec(&n->store, ST_OUTBOX_DELETE);
    if (rc != SAGA_OK) {
      saga__node_db_fail(n, rc, "deleting confirmed outbox rows");
      saga__node_log(n, SAGA_LOG_WARN, "%s (they will be resent)", n->errmsg);
      if (sqlite3_get_autocommit(n->store.db)) {
        *broken = 1;
        return;
      }
    } else {
      n->stats.acked_out += (uint64_t)sqlite3_changes(n->store.db);
    }
    k = e + 1;
  }
}

static int relay_unsendable(saga_node *n, uint64_t id, int code);

/* Runs one item. Careful mode wraps it in a savepoint, so that a failure rolls back only this
 * item. Fast mode (the first try of every transaction) has no item savepoint: an item that
 * fails after writing sets *replay, and the caller rolls the transaction back and runs it
 * again in careful mode. A failure before any write (counting writes a handler made and
 * rolled back) needs no replay. */
static int process_item(saga_node *n, saga__queue *q, saga__work *w, int careful, int *broken,
                        int *replay) {
  int rc;
  sqlite3_int64 changes_before = sqlite3_total_changes64(n->store.db);
  n->undone_changes = 0;
  if (careful) {
    rc = saga__store_exec(&n->store, ST_SP_ITEM);
    if (rc != SAGA_OK) {
      *broken = 1;
      return w->status = saga__node_db_fail(n, rc, "opening savepoint");
    }
  }
  size_t events_before = n->nevents, text_before = n->event_text.len;
  size_t hist_before = n->hist.len, hist_text_before = n->hist_text.len;
  switch (w->type) {
  case W_DELIVERY:
    rc = process_delivery(n, q, w);
    break;
  case W_START: {
    const saga__def *def = saga__node_find_def(n, arena_str(q, w->off1), 0);
    rc = def == NULL ? saga__node_fail(n, SAGA_ENODEF, "definition '%s' is not registered",
                                       arena_str(q, w->off1))
                     : saga__engine_start(n, w, def, q->arena.data + w->off2, w->len2,
                                          w->len3 == SIZE_MAX ? NULL : arena_str(q, w->off3));
    break;
  }
  case W_CANCEL:
    rc = saga__engine_cancel(n, arena_str(q, w->off1));
    break;
  case W_RETRY:
    rc = saga__engine_retry(n, arena_str(q, w->off1));
    break;
  case W_DEAD: {
    const uint8_t *data = q->arena.data + w->off2;
    size_t keep = w->len2 > n->limits.max_message_bytes ? n->limits.max_message_bytes : w->len2;
    rc = saga__node_dead_letter(n, arena_str(q, w->off1), NULL, arena_str(q, w->off3), data,
                                keep);
    w->ack = rc == SAGA_OK;
    break;
  }
  case W_UNSENDABLE:
    rc = relay_unsendable(n, w->tag, w->code);
    break;
  default: /* W_SENT: delete_sent() */
    rc = SAGA_OK;
    break;
  }
  w->status = rc;
  if (rc < 0) {
    w->ack = 0;
    n->nevents = events_before;
    n->event_text.len = text_before;
    n->hist.len = hist_before;
    n->hist_text.len = hist_text_before;
  }
  if (!careful) {
    if (sqlite3_get_autocommit(n->store.db)) {
      *broken = 1;
    } else if (rc < 0 &&
               sqlite3_total_changes64(n->store.db) - changes_before != n->undone_changes) {
      *replay = 1;
    }
    return rc;
  }
  int rc2;
  if (rc < 0) {
    rc2 = saga__store_exec(&n->store, ST_SP_ITEM_ROLLBACK);
    if (rc2 == SAGA_OK) rc2 = saga__store_exec(&n->store, ST_SP_ITEM_RELEASE);
  } else {
    rc2 = saga__store_exec(&n->store, ST_SP_ITEM_RELEASE);
  }
  if (rc2 != SAGA_OK || sqlite3_get_autocommit(n->store.db)) *broken = 1;
  return rc;
}

static void relay_fresh(saga_node *n);
static void arm_deadline(saga_node *n);
static void finish_close(saga_node *n);
static void start_close(saga_node *n);

/* After the transaction: acknowledge, call back, or report the failure. */
static void after_tx(saga_node *n, saga__queue *q, size_t from, size_t to, int committed,
                     int tx_rc) {
  for (size_t i = from; i < to; i++) {
    saga__work *w = &q->items[i];
    int status = committed ? w->status : (w->status < 0 ? w->status : tx_rc);
    switch (w->type) {
    case W_DELIVERY:
    case W_DEAD:
      if (committed && w->ack) {
        if (w->tag & SAGA__LOOPBACK_TAG) {
          saga__work *s = queue_push(n, W_SENT, NULL, 0, NULL, 0, NULL, 0);
          if (s != NULL) s->tag = w->tag & ~SAGA__LOOPBACK_TAG;
        } else if (n->transport_open && !n->transport_closed) {
          n->tm.ack(n->transport, w->tag);
          SAGA__HOOK(n, "tx.after_ack");
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
      if (w->cb != NULL) ((saga_done_cb)w->cb)(n, status, w->cb_arg);
      break;
    case W_SENT:
    case W_UNSENDABLE:
      break;
    }
  }
  if (committed) {
    dispatch_events(n);
  } else {
    n->nevents = 0;
    saga__buf_reset(&n->event_text);
    saga__buf_reset(&n->remote_events);
  }
}

/* One try of a transaction over items [from, to). Returns with the transaction committed
 * (SAGA_OK) or rolled back; *replay asks for a careful retry (see process_item). */
static int try_tx(saga_node *n, saga__queue *q, size_t from, size_t to, int with_timers,
                  int *more_due, int careful, int *replay) {
  saga__buf_reset(&n->hist);
  saga__buf_reset(&n->hist_text);
  saga__node_tx_begun(n);
  int broken = 0, rc = saga__store_exec(&n->store, ST_BEGIN);
  if (rc != SAGA_OK) {
    saga__node_db_fail(n, rc, "beginning transaction");
    return rc;
  }
  for (size_t i = from; i < to && !broken && !*replay; i++)
    if (q->items[i].type != W_SENT) process_item(n, q, &q->items[i], careful, &broken, replay);
  if (!broken && !*replay) delete_sent(n, q, from, to, &broken);
  if (with_timers && !broken && !*replay) {
    size_t processed = 0;
    int trc = saga__engine_due(n, saga__node_now(n), n->batch_max, &processed);
    if (trc < 0 || sqlite3_get_autocommit(n->store.db)) broken = 1;
    *more_due = trc == SAGA_OK && processed >= n->batch_max;
    rc = trc < 0 ? trc : rc;
  }
  if (!broken && !*replay) {
    int hrc = saga__node_tx_finish(n);
    if (hrc != SAGA_OK) {
      /* Fast: run again with savepoints (and fail the same way, cleanly); careful: fail. */
      if (!careful && !sqlite3_get_autocommit(n->store.db)) *replay = 1;
      else broken = 1;
      rc = hrc;
    }
  }
  if (!broken && !*replay) {
    SAGA__HOOK(n, "tx.before_commit");
    rc = saga__store_exec(&n->store, ST_COMMIT);
    if (rc == SAGA_OK) {
      SAGA__HOOK(n, "tx.after_commit");
      return SAGA_OK;
    }
    saga__node_db_fail(n, rc, "committing");
  } else if (rc == SAGA_OK) {
    rc = SAGA_ESTORE;
    for (size_t i = from; i < to; i++)
      if (q->items[i].status < 0) rc = q->items[i].status;
  }
  if (!sqlite3_get_autocommit(n->store.db)) saga__store_exec(&n->store, ST_ROLLBACK);
  return rc;
}

/* Runs items [from, to) in one transaction: first fast, then, if an item failed half-way,
 * again with a savepoint per item, from the state the transaction started with. */
static int run_tx(saga_node *n, saga__queue *q, size_t from, size_t to, int with_timers,
                  int *more_due) {
  saga_node_stats stats = n->stats;
  size_t nevents = n->nevents, text = n->event_text.len, remote = n->remote_events.len;
  int replay = 0;
  int rc = try_tx(n, q, from, to, with_timers, more_due, 0, &replay);
  if (!replay) return rc;
  n->stats = stats;
  n->nevents = nevents;
  n->event_text.len = text;
  n->remote_events.len = remote;
  for (size_t i = from; i < to; i++) {
    q->items[i].status = SAGA_OK;
    q->items[i].ack = 0;
    q->items[i].existed = 0;
  }
  *more_due = 0;
  n->stats.replayed_tx++;
  replay = 0;
  return try_tx(n, q, from, to, with_timers, more_due, 1, &replay);
}

static void retry_timer_cb(saga__timer *t) {
  saga_node *n = t->data;
  n->timers_due = 1;
  schedule_flush(n);
}

static void flush(saga_node *n) {
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
    n->stats.transactions++;
    n->stats.work_items += to - from;
    if (rc != SAGA_OK) {
      failed = 1;
      n->stats.commit_failures++;
      saga__node_log(n, SAGA_LOG_ERROR, "transaction failed, nothing of it was applied: %s",
                     n->errmsg);
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
  if (n->closing) {
    start_close(n);
    return;
  }
  relay_fresh(n);
  arm_deadline(n);
  if (failed) {
    /* Give a full or failing disk a moment before the timers try again. */
    saga__timer_arm(&n->retry_timer, saga__node_now(n) + 100);
  } else if (n->timers_due) {
    schedule_flush(n);
  }
}

static void idle_cb(uv_idle_t *h) {
  saga_node *n = h->data;
  uv_idle_stop(h);
  n->idle_active = 0;
  flush(n);
}

/* ---- relay ------------------------------------------------------------------------------ */

static void resend_timer_cb(saga__timer *t);

static void publish(saga_node *n, uint64_t id, const char *channel, const void *body,
                    size_t len) {
  if (strcmp(channel, SAGA__LOCAL_CHANNEL) == 0) {
    saga__work *w = queue_push(n, W_DELIVERY, channel, strlen(channel), body, len, NULL, 0);
    if (w != NULL) w->tag = id | SAGA__LOOPBACK_TAG;
    return;
  }
  if (!n->transport_open || n->transport_closed) return;
  int rc = n->tm.send(n->transport, channel, body, len, id);
  if (rc == SAGA_OK) {
    SAGA__HOOK(n, "relay.after_publish");
    return;
  }
  if (rc == SAGA_EINVAL || rc == SAGA_ETOOBIG) {
    /* Permanent: resending cannot help. The next transaction moves the row to the
     * dead-letter table (see relay_unsendable); until then it is simply not resent (on
     * ENOMEM here it is, and refused again). */
    saga__work *w = queue_push(n, W_UNSENDABLE, NULL, 0, NULL, 0, NULL, 0);
    if (w != NULL) {
      w->tag = id;
      w->code = rc;
      return;
    }
  }
  saga__node_log(n, SAGA_LOG_WARN, "transport refused message %" PRIu64 " to '%s': %s", id,
                 channel, saga_strerror(rc));
}

/* Inside a transaction: the transport refused outbox row `id` for good (send() returned the
 * permanent `code`). Moves the row to the dead-letter table with the reason, once — a row
 * already gone (confirmed, or moved by an earlier refusal) is left alone — and, if it is a
 * command a saga of this node waits for, fails that step (saga__engine_undeliverable). */
static int relay_unsendable(saga_node *n, uint64_t id, int code) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(n->store.db, "SELECT channel, body FROM saga_outbox WHERE id = ?1",
                              -1, &st, NULL);
  if (rc != SQLITE_OK) return saga__node_db_fail(n, saga__store_err(rc), "reading outbox");
  sqlite3_bind_int64(st, 1, (sqlite3_int64)id);
  rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) {
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? SAGA_OK
                             : saga__node_db_fail(n, saga__store_err(rc), "reading outbox");
  }
  /* channel NUL body, copied: the engine below reuses the node's scratch buffers. */
  saga__buf row;
  saga__buf_init(&row, n->alloc);
  const char *ch = (const char *)sqlite3_column_text(st, 0);
  size_t chlen = ch != NULL ? strlen(ch) : 0;
  size_t len = (size_t)sqlite3_column_bytes(st, 1);
  static const char zero = 0;
  rc = saga__buf_append(&row, ch != NULL ? ch : "", chlen);
  if (rc == SAGA_OK) rc = saga__buf_append(&row, &zero, 1);
  if (rc == SAGA_OK && len > 0) rc = saga__buf_append(&row, sqlite3_column_blob(st, 1), len);
  sqlite3_finalize(st);
  if (rc != SAGA_OK) {
    saga__buf_free(&row);
    return saga__node_fail(n, rc, "out of memory moving an unsendable outbox row");
  }
  const char *channel = (const char *)row.data;
  const uint8_t *body = row.data + chlen + 1;
  char shown[131];
  saga__printable(shown, sizeof shown, channel, chlen);
  char reason[400];
  if (code == SAGA_ETOOBIG)
    snprintf(reason, sizeof reason, "transport '%s' cannot send %zu bytes to '%s': SAGA_ETOOBIG "
             "(above its message limit); not resent", n->tm.name, len, shown);
  else
    snprintf(reason, sizeof reason, "transport '%s' cannot send to '%s': SAGA_EINVAL (no "
             "route, or a channel it cannot carry); not resent", n->tm.name, shown);
  saga_envelope *env = NULL;
  char err[200];
  if (saga_envelope_decode(body, len, &n->limits, n->alloc, &env, err, sizeof err) != SAGA_OK)
    env = NULL; /* ours, so it decodes; if not, it is still kept */
  rc = saga__node_dead_letter(n, channel, env != NULL ? env->msg_id : NULL, reason, body, len);
  if (rc == SAGA_OK) {
    st = saga__store_stmt(&n->store, ST_OUTBOX_DELETE);
    sqlite3_bind_int64(st, 1, (sqlite3_int64)id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)id);
    rc = saga__store_exec(&n->store, ST_OUTBOX_DELETE);
    if (rc != SAGA_OK) rc = saga__node_db_fail(n, rc, "deleting an unsendable outbox row");
  }
  if (rc == SAGA_OK) {
    n->stats.unsendable++;
    if (env != NULL && env->kind == SAGA_MSG_COMMAND)
      rc = saga__engine_undeliverable(n, env, code, reason);
  }
  saga_envelope_free(env);
  saga__buf_free(&row);
  return rc;
}

/* Publishes rows in (lo, hi] created at or before `older` (all when older is UINT64_MAX),
 * at most `max` of them. Returns the number published; *last is the last id published. */
static size_t publish_range(saga_node *n, uint64_t lo, uint64_t hi, uint64_t older,
                            int advance_hwm, size_t max, uint64_t *last) {
  size_t count = 0;
  while (count < max) {
    sqlite3_stmt *st;
    if (advance_hwm) {
      st = saga__store_stmt(&n->store, ST_OUTBOX_AFTER);
      sqlite3_bind_int64(st, 1, (sqlite3_int64)lo);
      sqlite3_bind_int64(st, 2, 256);
    } else {
      st = saga__store_stmt(&n->store, ST_OUTBOX_STALE);
      sqlite3_bind_int64(st, 1, (sqlite3_int64)lo);
      sqlite3_bind_int64(st, 2, (sqlite3_int64)hi);
      sqlite3_bind_int64(st, 3, (sqlite3_int64)older);
      sqlite3_bind_int64(st, 4, (sqlite3_int64)(max - count < 256 ? max - count : 256));
    }
    size_t page = 0;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
      uint64_t id = (uint64_t)sqlite3_column_int64(st, 0);
      const char *channel = (const char *)sqlite3_column_text(st, 1);
      const void *body = sqlite3_column_blob(st, 2);
      size_t len = (size_t)sqlite3_column_bytes(st, 2);
      publish(n, id, channel ? channel : "", body, len);
      lo = id;
      if (last != NULL) *last = id;
      if (advance_hwm) n->relay_hwm = id;
      page++;
    }
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) {
      saga__node_db_fail(n, saga__store_err(rc), "reading outbox");
      saga__node_log(n, SAGA_LOG_ERROR, "%s", n->errmsg);
      break;
    }
    count += page;
    if (page < 256) break;
  }
  return count;
}

static void relay_fresh(saga_node *n) {
  if (n->closing) return;
  size_t sent = publish_range(n, n->relay_hwm, 0, UINT64_MAX, 1, SIZE_MAX, NULL);
  n->stats.sent += sent;
  if (sent > 0 && !n->resend_timer.armed)
    saga__timer_arm(&n->resend_timer, saga__node_now(n) + n->resend_ms);
}

static void resend_timer_cb(saga__timer *t) {
  saga_node *n = t->data;
  if (n->closing) return;
  uint64_t now = saga__node_now(n);
  uint64_t older = now >= n->resend_ms ? now - n->resend_ms : 0;
  /* At most batch_max rows per tick, oldest first, resuming where the last tick stopped and
   * starting over after the newest: a large unconfirmed backlog is far more likely a slow
   * receiver than lost messages, and resending all of it every tick only queues copies
   * behind the originals. A handful of lost messages is still resent on the next tick. */
  uint64_t last = 0;
  size_t sent = publish_range(n, n->resend_cursor, n->relay_hwm, older, 0, n->batch_max, &last);
  n->stats.resent += sent;
  n->resend_cursor = sent < n->batch_max ? 0 : last;
  /* Keep resending while anything is unconfirmed; stop when the outbox is empty. */
  if (saga_node_outbox_depth(n) > 0) saga__timer_arm(&n->resend_timer, now + n->resend_ms);
}

int64_t saga_node_outbox_depth(saga_node *n) {
  if (n == NULL || n->store.db == NULL) return SAGA_EINVAL;
  sqlite3_stmt *st = saga__store_stmt(&n->store, ST_OUTBOX_COUNT);
  int rc = sqlite3_step(st);
  int64_t v = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : saga__store_err(rc);
  sqlite3_reset(st);
  return v;
}

/* ---- deadlines -------------------------------------------------------------------------- */

static void deadline_timer_cb(saga__timer *t) {
  saga_node *n = t->data;
  n->timers_due = 1;
  schedule_flush(n);
}

static void arm_deadline(saga_node *n) {
  if (n->closing) return;
  sqlite3_stmt *st = saga__store_stmt(&n->store, ST_INST_MIN_DEADLINE);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL) {
    saga__timer_arm(&n->deadline_timer, (uint64_t)sqlite3_column_int64(st, 0));
  } else {
    saga__timer_stop(&n->deadline_timer);
  }
  sqlite3_reset(st);
}

/* ---- transport host --------------------------------------------------------------------- */

static int host_deliver(void *ctx, const char *channel, const void *data, size_t len,
                        uint64_t tag) {
  saga_node *n = ctx;
  if (n->closing) return SAGA_ECLOSED;
  if (tag & SAGA__LOOPBACK_TAG) {
    saga__node_log(n, SAGA_LOG_ERROR, "transport used a reserved delivery tag; dropped");
    return SAGA_EINVAL;
  }
  /* Oversized input is still queued (truncated) so it lands in the dead-letter table. */
  size_t keep = len > n->limits.max_message_bytes ? n->limits.max_message_bytes + 1 : len;
  saga__work *w = queue_push(n, W_DELIVERY, channel, strlen(channel), data, keep, NULL, 0);
  if (w == NULL) return SAGA_ENOMEM;
  w->tag = tag;
  n->stats.delivered++;
  return SAGA_OK;
}

static int host_dead_letter(void *ctx, const char *channel, const void *data, size_t len,
                            uint64_t tag, const char *reason) {
  saga_node *n = ctx;
  if (n->closing) return SAGA_ECLOSED;
  if (tag & SAGA__LOOPBACK_TAG) return SAGA_EINVAL;
  size_t keep = len > n->limits.max_message_bytes ? n->limits.max_message_bytes : len;
  saga__work *w = queue_push(n, W_DEAD, channel, strlen(channel), data, keep, reason,
                             strlen(reason));
  if (w == NULL) return SAGA_ENOMEM;
  w->tag = tag;
  return SAGA_OK;
}

static void host_sent(void *ctx, uint64_t token, int status) {
  saga_node *n = ctx;
  if (n->closing || status != SAGA_OK) return;
  saga__work *w = queue_push(n, W_SENT, NULL, 0, NULL, 0, NULL, 0);
  if (w != NULL) w->tag = token; /* on ENOMEM the row is simply resent later */
}

static void host_closed(void *ctx) {
  saga_node *n = ctx;
  n->transport_closed = 1;
  if (n->closing) finish_close(n);
}

static void host_log(void *ctx, saga_log_level lvl, const char *msg) {
  saga__node_log((saga_node *)ctx, lvl, "transport: %s", msg);
}

/* ---- lifecycle -------------------------------------------------------------------------- */

void saga_node_config_init(saga_node_config *cfg) {
  if (cfg == NULL) return;
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_version = SAGA_NODE_CONFIG_VERSION;
  cfg->synchronous = SAGA_SYNC_FULL;
  cfg->resend_ms = 1000;
  cfg->batch_max = 1024;
  cfg->busy_timeout_ms = 5000;
  cfg->max_deliveries = 10;
  saga_limits_init(&cfg->limits);
  saga__retention_defaults(&cfg->retention);
  cfg->checkpoint = SAGA_CHECKPOINT_INLINE;
  cfg->checkpoint_pages = 1000;
}

static void async_cb(uv_async_t *h);
static void free_node(saga_node *n);

static int attach_transport(saga_node *n, saga_transport *t, char *err, size_t errlen) {
  const saga_transport_methods *m = t->methods;
  if (m == NULL || m->version < 1 || m->version > SAGA_TRANSPORT_VERSION) {
    saga__errf(err, errlen, "transport methods version %d is not supported (1..%d)",
               m ? m->version : -1, SAGA_TRANSPORT_VERSION);
    return SAGA_EVERSION;
  }
  /* Field by field, by version: a newer core keeps working with older adapters. */
  memset(&n->tm, 0, sizeof n->tm);
  n->tm.version = m->version;
  n->tm.name = m->name ? m->name : "?";
  n->tm.open = m->open;
  n->tm.subscribe = m->subscribe;
  n->tm.send = m->send;
  n->tm.ack = m->ack;
  n->tm.close = m->close;
  n->tm.destroy = m->destroy;
  if (m->version >= 2) n->tm.can_send = m->can_send; /* version 1 has no can_send: NULL */
  if (!n->tm.open || !n->tm.subscribe || !n->tm.send || !n->tm.ack || !n->tm.close ||
      !n->tm.destroy) {
    saga__errf(err, errlen, "transport '%s' lacks a required method", n->tm.name);
    return SAGA_EINVAL;
  }
  n->host.deliver = host_deliver;
  n->host.sent = host_sent;
  n->host.closed = host_closed;
  n->host.log = host_log;
  n->host.dead_letter = host_dead_letter;
  n->host.ctx = n;
  t->saga__host = &n->host;
  n->transport = t;
  int rc = n->tm.open(t, n->loop);
  if (rc != SAGA_OK) {
    saga__errf(err, errlen, "transport '%s' failed to open: %s", n->tm.name, saga_strerror(rc));
    return rc;
  }
  n->transport_open = 1;
  return SAGA_OK;
}

int saga_node_open(saga_node **out, uv_loop_t *loop, const saga_node_config *cfg, char *err,
                   size_t errlen) {
  saga__errf(err, errlen, "%s", "");
  if (cfg == NULL || out == NULL || loop == NULL) {
    saga__errf(err, errlen, "out, loop and cfg are required");
    if (cfg != NULL) saga_transport_free(cfg->transport);
    return SAGA_EINVAL;
  }
  saga_transport *t = cfg->transport;
  if (cfg->struct_version < 1 || cfg->struct_version > SAGA_NODE_CONFIG_VERSION) {
    saga__errf(err, errlen, "config struct_version %d is unknown (call saga_node_config_init)",
               cfg->struct_version);
    saga_transport_free(t);
    return SAGA_EVERSION;
  }
  if (cfg->name == NULL || cfg->name[0] == '\0' || strlen(cfg->name) > 256 ||
      cfg->db_path == NULL || t == NULL || strcmp(cfg->name, SAGA__LOCAL_CHANNEL) == 0) {
    saga__errf(err, errlen, "config needs a name (1..256 bytes, not '%s'), db_path and a "
                            "transport", SAGA__LOCAL_CHANNEL);
    saga_transport_free(t);
    return SAGA_EINVAL;
  }
  const saga_allocator *a = saga__alloc_resolve(cfg->alloc);
  saga_node *n = saga__calloc(a, sizeof *n);
  if (n == NULL) {
    saga__errf(err, errlen, "out of memory");
    saga_transport_free(t);
    return SAGA_ENOMEM;
  }
  n->alloc_copy = *a;
  n->alloc = &n->alloc_copy;
  n->loop = loop;
  n->log = cfg->log;
  n->log_arg = cfg->log_arg;
  n->random = cfg->random;
  n->random_arg = cfg->random_arg;
  n->rng_state = saga__os_random();
  saga__csprng_init(&n->ids);
  n->close_step = close_step;
  n->on_event = cfg->on_event;
  n->event_arg = cfg->event_arg;
  n->resend_ms = cfg->resend_ms ? cfg->resend_ms : 1000;
  n->batch_max = cfg->batch_max ? cfg->batch_max : 1024;
  n->max_deliveries = cfg->max_deliveries ? cfg->max_deliveries : 10;
  saga__buf_init(&n->remote_events, n->alloc);
  saga__buf_init(&n->event_buf, n->alloc);
  n->test_hook = cfg->test_hook;
  n->test_hook_arg = cfg->test_hook_arg;
  n->limits = cfg->limits;
  if (n->limits.max_message_bytes == 0) saga_limits_init(&n->limits);
  saga__buf_init(&n->queues[0].arena, n->alloc);
  saga__buf_init(&n->queues[1].arena, n->alloc);
  saga__buf_init(&n->event_text, n->alloc);
  saga__buf_init(&n->scratch, n->alloc);
  saga__buf_init(&n->scratch2, n->alloc);
  saga__buf_init(&n->sent_ids, n->alloc);
  saga__buf_init(&n->hist, n->alloc);
  saga__buf_init(&n->hist_text, n->alloc);
  saga__buf_init(&n->reply_buf, n->alloc);
  saga__buf_init(&n->input_buf, n->alloc);
  saga__inst_init(&n->inst, n->alloc);
  int rc;
  n->name = saga__strdup(n->alloc, cfg->name);
  if (cfg->event_channel != NULL &&
      (n->event_channel = saga__strdup(n->alloc, cfg->event_channel)) == NULL)
    n->name = (saga__free(n->alloc, n->name), NULL);
  if (n->name == NULL) {
    rc = SAGA_ENOMEM;
    saga__errf(err, errlen, "out of memory");
    goto fail;
  }
  if (cfg->clock != NULL) {
    n->clock = cfg->clock;
  } else {
    rc = saga__clock_real_new(&n->clock, loop, n->alloc);
    if (rc != SAGA_OK) {
      saga__errf(err, errlen, "cannot create clock: %s", saga_strerror(rc));
      goto fail;
    }
    n->own_clock = 1;
  }
  saga__timer_init(&n->deadline_timer, n->clock, deadline_timer_cb, n);
  saga__timer_init(&n->resend_timer, n->clock, resend_timer_cb, n);
  saga__timer_init(&n->retry_timer, n->clock, retry_timer_cb, n);
  saga__retention_init(n, cfg);
  rc = saga__store_open(&n->store, cfg->db_path, cfg->vfs, cfg->synchronous,
                        cfg->busy_timeout_ms, err, errlen);
  if (rc != SAGA_OK) goto fail;
  uint64_t fresh[2];
  rc = saga__os_random_bytes(fresh, sizeof fresh);
  if (rc != SAGA_OK) {
    saga__errf(err, errlen, "no CSPRNG for the reply key");
    goto fail;
  }
  char why[200];
  rc = saga__store_reply_key(&n->store, fresh, n->reply_key, why, sizeof why);
  if (rc != SAGA_OK) {
    saga__errf(err, errlen, "database '%s': %s", cfg->db_path, why);
    goto fail;
  }
  rc = saga__checkpoint_init(n, cfg, err, errlen);
  if (rc != SAGA_OK) goto fail;
  rc = attach_transport(n, t, err, errlen);
  if (n->transport != NULL) t = NULL; /* owned by the node now */
  if (rc != SAGA_OK) goto fail;
  if (uv_mutex_init(&n->post_mu) != 0) {
    rc = SAGA_ENOMEM;
    saga__errf(err, errlen, "cannot create mutex");
    goto fail;
  }
  uv_idle_init(loop, &n->idle);
  n->idle.data = n;
  uv_async_init(loop, &n->async, async_cb);
  n->async.data = n;
  uv_unref((uv_handle_t *)&n->async);
  *out = n;
  return SAGA_OK;
fail:
  saga_transport_free(t);
  if (n->transport != NULL) {
    if (n->transport_open) n->tm.close(n->transport);
    n->tm.destroy(n->transport);
  }
  free_node(n);
  return rc;
}

int saga_node_register(saga_node *n, const saga_definition *def) {
  if (n == NULL || def == NULL) return SAGA_EINVAL;
  if (n->started || n->closing)
    return saga__node_fail(n, SAGA_ESTATE, "definitions must be registered before start");
  if (def->name != NULL && saga__node_find_def(n, def->name, def->version) != NULL)
    return saga__node_fail(n, SAGA_EEXIST, "definition '%s' version %u is already registered",
                           def->name, def->version);
  saga__def copy;
  int rc = saga__def_copy(&copy, def, n->alloc, n->errmsg, sizeof n->errmsg);
  if (rc != SAGA_OK) return rc;
  saga__def *p = saga__realloc(n->alloc, n->defs, (n->ndefs + 1) * sizeof *p);
  if (p == NULL) {
    saga__def_free(&copy, n->alloc);
    return saga__node_fail(n, SAGA_ENOMEM, "out of memory registering definition");
  }
  n->defs = p;
  n->defs[n->ndefs++] = copy;
  return SAGA_OK;
}

static int add_handler(saga_node *n, const char *channel, const char *command, saga_handler fn,
                       void *arg) {
  if (saga__node_find_handler(n, channel, command) != NULL)
    return saga__node_fail(n, SAGA_EEXIST, "handler for '%s' on '%s' already registered",
                           command, channel);
  saga__handler *p = saga__realloc(n->alloc, n->handlers, (n->nhandlers + 1) * sizeof *p);
  if (p == NULL) return saga__node_fail(n, SAGA_ENOMEM, "out of memory registering handler");
  n->handlers = p;
  saga__handler *h = &n->handlers[n->nhandlers];
  h->channel = saga__strdup(n->alloc, channel);
  h->command = saga__strdup(n->alloc, command);
  if (h->channel == NULL || h->command == NULL) {
    saga__free(n->alloc, h->channel);
    saga__free(n->alloc, h->command);
    return saga__node_fail(n, SAGA_ENOMEM, "out of memory registering handler");
  }
  h->fn = fn;
  h->arg = arg;
  n->nhandlers++;
  return SAGA_OK;
}

int saga_node_handle(saga_node *n, const char *channel, const char *command, saga_handler fn,
                     void *arg) {
  if (n == NULL) return SAGA_EINVAL;
  if (channel == NULL || command == NULL || fn == NULL || !channel[0] || !command[0] ||
      strlen(channel) > 256 || strlen(command) > 256)
    return saga__node_fail(n, SAGA_EINVAL, "channel and command (1..256 bytes) and fn needed");
  if (strcmp(channel, SAGA__LOCAL_CHANNEL) == 0)
    return saga__node_fail(n, SAGA_EINVAL, "channel '%s' is reserved", SAGA__LOCAL_CHANNEL);
  if (n->started || n->closing)
    return saga__node_fail(n, SAGA_ESTATE, "handlers must be registered before start");
  return add_handler(n, channel, command, fn, arg);
}

int saga_node_subscribe_events(saga_node *n, const char *channel, saga_event_cb cb, void *arg) {
  if (n == NULL) return SAGA_EINVAL;
  if (channel == NULL || channel[0] == '\0' || cb == NULL || strlen(channel) > 256)
    return saga__node_fail(n, SAGA_EINVAL, "event channel (1..256 bytes) and callback needed");
  if (n->started || n->closing)
    return saga__node_fail(n, SAGA_ESTATE, "subscribe to events before start");
  if (n->event_sub_cb != NULL)
    return saga__node_fail(n, SAGA_EEXIST, "already subscribed to events");
  if ((n->event_sub_channel = saga__strdup(n->alloc, channel)) == NULL)
    return saga__node_fail(n, SAGA_ENOMEM, "out of memory");
  n->event_sub_cb = cb;
  n->event_sub_arg = arg;
  return SAGA_OK;
}

/* Local steps become handlers on the reserved loopback channel, one per definition step. */
static int register_local_steps(saga_node *n) {
  char name[320];
  for (size_t d = 0; d < n->ndefs; d++) {
    const saga__def *def = &n->defs[d];
    for (size_t i = 0; i < def->nsteps; i++) {
      const saga__step *s = &def->steps[i];
      if (s->local_action == NULL) continue;
      snprintf(name, sizeof name, "%s:%u:%zu:action", def->name, def->version, i);
      int rc = add_handler(n, SAGA__LOCAL_CHANNEL, name, s->local_action, s->local_arg);
      if (rc != SAGA_OK) return rc;
      if (s->local_compensation == NULL) continue;
      snprintf(name, sizeof name, "%s:%u:%zu:compensation", def->name, def->version, i);
      rc = add_handler(n, SAGA__LOCAL_CHANNEL, name, s->local_compensation, s->local_arg);
      if (rc != SAGA_OK) return rc;
    }
  }
  return SAGA_OK;
}

int saga_node_start(saga_node *n) {
  if (n == NULL) return SAGA_EINVAL;
  if (n->started || n->closing) return saga__node_fail(n, SAGA_ESTATE, "node already started");
  int rc = register_local_steps(n);
  if (rc != SAGA_OK) return rc;
  rc = n->tm.subscribe(n->transport, n->name);
  if (rc == SAGA_OK && n->event_sub_channel != NULL)
    rc = n->tm.subscribe(n->transport, n->event_sub_channel);
  for (size_t i = 0; rc == SAGA_OK && i < n->nhandlers; i++) {
    const char *ch = n->handlers[i].channel;
    int seen = strcmp(ch, n->name) == 0 || strcmp(ch, SAGA__LOCAL_CHANNEL) == 0;
    for (size_t j = 0; j < i && !seen; j++) seen = strcmp(n->handlers[j].channel, ch) == 0;
    if (!seen) rc = n->tm.subscribe(n->transport, ch);
  }
  if (rc != SAGA_OK) return saga__node_fail(n, rc, "transport refused a subscription");

  /* Recovery: report instances whose definition is missing, re-arm the rest. */
  int missing = 0;
  saga__node_tx_begun(n);
  rc = saga__store_exec(&n->store, ST_BEGIN);
  if (rc == SAGA_OK) rc = saga__engine_unpark(n, &missing);
  if (rc == SAGA_OK) rc = saga__node_tx_finish(n);
  if (rc == SAGA_OK) {
    rc = saga__store_exec(&n->store, ST_COMMIT);
    if (rc != SAGA_OK) saga__node_db_fail(n, rc, "committing recovery");
  }
  if (rc != SAGA_OK) {
    if (!sqlite3_get_autocommit(n->store.db)) saga__store_exec(&n->store, ST_ROLLBACK);
    n->nevents = 0;
    saga__buf_reset(&n->event_text);
    return rc;
  }
  n->started = 1;
  n->relay_hwm = 0;
  dispatch_events(n);
  relay_fresh(n);
  arm_deadline(n);
  saga__retention_start(n);
  return missing;
}

/* ---- API that queues work --------------------------------------------------------------- */

static int check_usable(saga_node *n) {
  if (n == NULL) return SAGA_EINVAL;
  if (n->closing) return saga__node_fail(n, SAGA_ECLOSED, "node is closing");
  if (!n->started) return saga__node_fail(n, SAGA_ESTATE, "node not started");
  return SAGA_OK;
}

int saga_start(saga_node *n, const char *name, const saga_data *input, const char *idem_key,
               saga_start_cb cb, void *arg) {
  int rc = check_usable(n);
  if (rc != SAGA_OK) return rc;
  if (name == NULL) return saga__node_fail(n, SAGA_EINVAL, "definition name is NULL");
  if (saga__node_find_def(n, name, 0) == NULL)
    return saga__node_fail(n, SAGA_ENODEF, "definition '%s' is not registered", name);
  if (idem_key != NULL && (idem_key[0] == '\0' || strlen(idem_key) > n->limits.max_string_bytes))
    return saga__node_fail(n, SAGA_EINVAL, "idempotency key must be 1..%zu bytes",
                           n->limits.max_string_bytes);
  saga__buf_reset(&n->input_buf);
  rc = saga__data_encode(input, &n->input_buf);
  if (rc != SAGA_OK) return saga__node_fail(n, rc, "encoding input: %s", saga_strerror(rc));
  /* Leave room for the envelope around the data in every command. */
  if (n->input_buf.len + 4096 > n->limits.max_message_bytes)
    return saga__node_fail(n, SAGA_ETOOBIG, "input of %zu bytes exceeds the message limit",
                           n->input_buf.len);
  saga__work *w = queue_push(n, W_START, name, strlen(name), n->input_buf.data, n->input_buf.len,
                             idem_key, idem_key ? strlen(idem_key) : 0);
  if (w == NULL) return saga__node_fail(n, SAGA_ENOMEM, "out of memory queueing start");
  if (idem_key == NULL) w->len3 = SIZE_MAX;
  w->cb = (void *)cb;
  w->cb_arg = arg;
  return SAGA_OK;
}

static int queue_op(saga_node *n, saga__work_type type, const char *id, saga_done_cb cb,
                    void *arg) {
  int rc = check_usable(n);
  if (rc != SAGA_OK) return rc;
  if (id == NULL || strlen(id) >= 40) return saga__node_fail(n, SAGA_EINVAL, "bad saga id");
  saga__work *w = queue_push(n, type, id, strlen(id), NULL, 0, NULL, 0);
  if (w == NULL) return saga__node_fail(n, SAGA_ENOMEM, "out of memory queueing request");
  w->cb = (void *)cb;
  w->cb_arg = arg;
  return SAGA_OK;
}

int saga_cancel(saga_node *n, const char *id, saga_done_cb cb, void *arg) {
  return queue_op(n, W_CANCEL, id, cb, arg);
}

int saga_retry_failed(saga_node *n, const char *id, saga_done_cb cb, void *arg) {
  return queue_op(n, W_RETRY, id, cb, arg);
}

int saga_node_busy(const saga_node *n) {
  return n != NULL && (n->queues[0].n > 0 || n->queues[1].n > 0 || n->timers_due);
}

/* ---- posting from other threads --------------------------------------------------------- */

int saga_node_post(saga_node *n, void (*fn)(saga_node *, void *), void *arg) {
  if (n == NULL || fn == NULL) return SAGA_EINVAL;
  saga__post *p = saga__malloc(n->alloc, sizeof *p);
  if (p == NULL) return SAGA_ENOMEM;
  p->fn = fn;
  p->arg = arg;
  uv_mutex_lock(&n->post_mu);
  if (n->closing) {
    uv_mutex_unlock(&n->post_mu);
    saga__free(n->alloc, p);
    return SAGA_ECLOSED;
  }
  p->next = n->posts;
  n->posts = p;
  uv_mutex_unlock(&n->post_mu);
  uv_async_send(&n->async);
  return SAGA_OK;
}

/* Runs posted functions in the order they were posted; with node NULL once closing. */
static void run_posts(saga_node *n, int closing) {
  uv_mutex_lock(&n->post_mu);
  saga__post *list = n->posts, *rev = NULL;
  n->posts = NULL;
  uv_mutex_unlock(&n->post_mu);
  while (list != NULL) {
    saga__post *next = list->next;
    list->next = rev;
    rev = list;
    list = next;
  }
  while (rev != NULL) {
    saga__post *next = rev->next;
    rev->fn(closing ? NULL : n, rev->arg);
    saga__free(n->alloc, rev);
    rev = next;
  }
}

static void async_cb(uv_async_t *h) { run_posts((saga_node *)h->data, 0); }

/* ---- closing ---------------------------------------------------------------------------- */

static void fail_queue(saga_node *n, saga__queue *q) {
  for (size_t i = 0; i < q->n; i++) q->items[i].status = SAGA_ECLOSED;
  size_t count = q->n;
  q->n = 0; /* after_tx may not queue into it again while we walk it */
  saga__queue tmp = *q;
  tmp.n = count;
  after_tx(n, &tmp, 0, count, 0, SAGA_ECLOSED);
}

static void free_node(saga_node *n) {
  const saga_allocator *a = n->alloc;
  saga__retention_free(n);
  saga__checkpoint_free(n);
  saga__store_close(&n->store);
  if (n->own_clock && n->clock != NULL) saga__clock_close(n->clock);
  for (size_t i = 0; i < n->ndefs; i++) saga__def_free(&n->defs[i], a);
  saga__free(a, n->defs);
  for (size_t i = 0; i < n->nhandlers; i++) {
    saga__free(a, n->handlers[i].channel);
    saga__free(a, n->handlers[i].command);
  }
  saga__free(a, n->handlers);
  for (int i = 0; i < 2; i++) {
    saga__free(a, n->queues[i].items);
    saga__buf_free(&n->queues[i].arena);
  }
  saga__free(a, n->events);
  saga__buf_free(&n->event_text);
  saga__buf_free(&n->scratch);
  saga__buf_free(&n->scratch2);
  saga__buf_free(&n->sent_ids);
  saga__buf_free(&n->hist);
  saga__buf_free(&n->hist_text);
  saga__buf_free(&n->reply_buf);
  saga__buf_free(&n->input_buf);
  saga__buf_free(&n->remote_events);
  saga__buf_free(&n->event_buf);
  saga__free(a, n->event_channel);
  saga__free(a, n->event_sub_channel);
  saga__inst_free(&n->inst);
  saga__free(a, n->name);
  saga_allocator copy = n->alloc_copy;
  saga__free(&copy, n);
}

static void finish_close(saga_node *n) {
  if (n->pending_closes > 0 || !n->transport_closed) return;
  if (n->transport != NULL) n->tm.destroy(n->transport);
  n->transport = NULL;
  run_posts(n, 1);
  uv_mutex_destroy(&n->post_mu);
  void (*cb)(void *) = n->close_cb;
  void *arg = n->close_arg;
  free_node(n);
  if (cb != NULL) cb(arg);
}

static void close_step(saga_node *n) {
  n->pending_closes--;
  finish_close(n);
}

static void on_handle_closed(uv_handle_t *h) { close_step((saga_node *)h->data); }

static void start_close(saga_node *n) {
  saga__timer_stop(&n->deadline_timer);
  saga__timer_stop(&n->resend_timer);
  saga__timer_stop(&n->retry_timer);
  saga__retention_stop(n);
  fail_queue(n, &n->queues[0]);
  fail_queue(n, &n->queues[1]);
  n->nevents = 0;
  n->pending_closes = 2;
  saga__checkpoint_stop(n);
  uv_close((uv_handle_t *)&n->idle, on_handle_closed);
  uv_close((uv_handle_t *)&n->async, on_handle_closed);
  if (n->transport_open && !n->transport_closed) {
    n->tm.close(n->transport); /* may call host_closed now or later */
  } else {
    n->transport_closed = 1;
  }
}

void saga_node_close(saga_node *n, void (*cb)(void *), void *arg) {
  if (n == NULL || n->closing) return;
  uv_mutex_lock(&n->post_mu);
  n->closing = 1;
  uv_mutex_unlock(&n->post_mu);
  n->close_cb = cb;
  n->close_arg = arg;
  if (n->in_flush) return; /* flush() finishes its transaction, then closes */
  start_close(n);
}

/* ---- reading a saga --------------------------------------------------------------------- */

void saga_info_free(saga_info *info) {
  if (info == NULL) return;
  const saga_allocator *a = (const saga_allocator *)((char *)info + sizeof *info);
  saga_allocator copy = *a;
  saga__free(&copy, info->definition);
  saga__free(&copy, info->error);
  saga_data_free(info->data);
  saga__free(&copy, info);
}

int saga_get(saga_node *n, const char *saga_id, saga_info **out) {
  if (n == NULL || saga_id == NULL || out == NULL) return SAGA_EINVAL;
  sqlite3_stmt *st = saga__store_stmt(&n->store, ST_INST_GET);
  sqlite3_bind_text(st, 1, saga_id, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) {
    sqlite3_reset(st);
    if (rc == SQLITE_DONE) return saga__node_fail(n, SAGA_ENOTFOUND, "saga '%s' not found", saga_id);
    return saga__node_db_fail(n, saga__store_err(rc), "reading saga");
  }
  /* The allocator is stored right behind the struct so saga_info_free() can find it. */
  saga_info *info = saga__calloc(n->alloc, sizeof *info + sizeof(saga_allocator));
  char err[200];
  if (info == NULL) {
    rc = SAGA_ENOMEM;
    goto fail;
  }
  memcpy((char *)info + sizeof *info, n->alloc, sizeof(saga_allocator));
  const char *id = (const char *)sqlite3_column_text(st, 0);
  snprintf(info->id, sizeof info->id, "%s", id ? id : "");
  const char *def = (const char *)sqlite3_column_text(st, 1);
  const char *error = (const char *)sqlite3_column_text(st, 11);
  info->definition = saga__strdup(n->alloc, def ? def : "");
  info->error = saga__strdup(n->alloc, error ? error : "");
  info->version = (uint32_t)sqlite3_column_int64(st, 2);
  info->state = (saga_state)sqlite3_column_int(st, 3);
  info->step = sqlite3_column_int(st, 5);
  info->attempt = (uint32_t)sqlite3_column_int64(st, 6);
  info->created_ms = (uint64_t)sqlite3_column_int64(st, 13);
  info->updated_ms = (uint64_t)sqlite3_column_int64(st, 14);
  uint64_t a = (uint64_t)sqlite3_column_int64(st, 15), b = (uint64_t)sqlite3_column_int64(st, 16);
  info->deadline_ms = a == 0 ? b : (b == 0 || a < b ? a : b);
  if (info->definition == NULL || info->error == NULL) {
    rc = SAGA_ENOMEM;
    goto fail;
  }
  rc = saga__data_decode(sqlite3_column_blob(st, 10), (size_t)sqlite3_column_bytes(st, 10),
                         &n->limits, n->alloc, &info->data, err, sizeof err);
  if (rc != SAGA_OK) goto fail;
  sqlite3_reset(st);
  *out = info;
  return SAGA_OK;
fail:
  sqlite3_reset(st);
  saga_info_free(info);
  return saga__node_fail(n, rc, "reading saga '%s': %s", saga_id, saga_strerror(rc));
}
