/*
 * The relay: hands committed outbox rows to the transport (in id order, each once, right after
 * the commit), resends those not confirmed after resend_ms (a bounded number per tick, resuming
 * where the last tick stopped), and moves rows the transport refuses for good to the
 * dead-letter table. Steps run by local functions are delivered back to this node's queue.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "runtime.h"

static void publish(saga_node *n, uint64_t id, const char *channel, const void *body,
                    size_t len) {
  if (strcmp(channel, SAGA__LOCAL_CHANNEL) == 0) {
    saga__work *w = saga__queue_push(n, W_DELIVERY, channel, strlen(channel), body, len, NULL, 0);
    if (w != NULL) w->tag = id | SAGA__LOOPBACK_TAG;
    return;
  }
  if (!n->transport_open || n->transport_closed) return;
  int rc = n->tm.send(n->transport, channel, body, len, id);
  if (rc == SAGA_OK) {
    SAGA__HOOK(&n->env, "relay.after_publish");
    return;
  }
  if (rc == SAGA_EINVAL || rc == SAGA_ETOOBIG) {
    /* Permanent: resending cannot help. The next transaction moves the row to the
     * dead-letter table (see saga__relay_unsendable); until then it is simply not resent (on
     * ENOMEM here it is, and refused again). */
    saga__work *w = saga__queue_push(n, W_UNSENDABLE, NULL, 0, NULL, 0, NULL, 0);
    if (w != NULL) {
      w->tag = id;
      w->code = rc;
      return;
    }
  }
  /* A transient refusal (the broker is down, a queue is full) repeats for every unconfirmed
   * row on every resend tick: one line, then at most one every 10 s with the count. */
  n->env.stats.send_refusals++;
  uint64_t now = saga__now(&n->env);
  if (n->refusals_logged_at != 0 && now - n->refusals_logged_at < 10000) {
    n->refusals_unlogged++;
    return;
  }
  saga__log(&n->env, SAGA_LOG_WARN,
            "transport refused message %" PRIu64 " to '%s': %s (%" PRIu64 " more refusals "
            "since the last such line; kept in the outbox and resent)",
            id, channel, saga_strerror(rc), n->refusals_unlogged);
  n->refusals_logged_at = now;
  n->refusals_unlogged = 0;
}

int saga__relay_unsendable(saga_node *n, uint64_t id, int code) {
  saga__store *s = n->env.store;
  /* Copied: the engine, called below, must not find the row's memory reused. */
  saga__buf *ch = &n->unsendable_channel, *row = &n->unsendable_body;
  saga__buf_reset(ch);
  saga__buf_reset(row);
  int rc = s->m->outbox_get(s, id, ch, row);
  if (rc == SAGA_ENOTFOUND) return SAGA_OK; /* confirmed, or moved by an earlier refusal */
  if (rc == SAGA_ENOMEM)
    return saga__fail(&n->env, rc, "out of memory moving an unsendable outbox row");
  if (rc != SAGA_OK) return saga__store_fail(&n->env, rc, "reading outbox");
  const char *channel = (const char *)ch->data;
  const uint8_t *body = row->data;
  size_t len = row->len;
  char shown[131];
  saga__printable(shown, sizeof shown, channel, strlen(channel));
  char reason[400];
  if (code == SAGA_ETOOBIG)
    snprintf(reason, sizeof reason, "transport '%s' cannot send %zu bytes to '%s': SAGA_ETOOBIG "
             "(above its message limit); not resent", n->tm.name, len, shown);
  else
    snprintf(reason, sizeof reason, "transport '%s' cannot send to '%s': SAGA_EINVAL (no "
             "route, or a channel it cannot carry); not resent", n->tm.name, shown);
  saga_envelope *env = NULL;
  char err[200];
  if (saga_envelope_decode(body, len, &n->env.limits, n->env.alloc, &env, err, sizeof err) !=
      SAGA_OK)
    env = NULL; /* ours, so it decodes; if not, it is still kept */
  rc = saga__journal_dead_letter(&n->journal, channel, env != NULL ? env->msg_id : NULL, reason,
                                 body, len);
  if (rc == SAGA_OK) {
    uint64_t deleted = 0;
    rc = s->m->outbox_delete(s, id, id, &deleted);
    if (rc != SAGA_OK) rc = saga__store_fail(&n->env, rc, "deleting an unsendable outbox row");
  }
  if (rc == SAGA_OK) {
    n->env.stats.unsendable++;
    if (env != NULL && env->kind == SAGA_MSG_COMMAND)
      rc = saga__engine_undeliverable(&n->engine, env, code, reason);
  }
  saga_envelope_free(env);
  return rc;
}

/* One page of rows read from the outbox. */
typedef struct page {
  saga_node *n;
  int advance_hwm;
  uint64_t last;
} page;

static void publish_row(void *arg, uint64_t id, const char *channel, const void *body,
                        size_t len) {
  page *p = arg;
  publish(p->n, id, channel, body, len);
  p->last = id;
  if (p->advance_hwm) p->n->relay_hwm = id;
}

/* Publishes rows in (lo, hi] created at or before `older` (all rows after lo when
 * advance_hwm), at most `max` of them. Returns the number published; *last is the last id. */
static size_t publish_range(saga_node *n, uint64_t lo, uint64_t hi, uint64_t older,
                            int advance_hwm, size_t max, uint64_t *last) {
  saga__store *s = n->env.store;
  size_t count = 0;
  while (count < max) {
    page p = {n, advance_hwm, lo};
    size_t rows = 0;
    int rc = advance_hwm
                 ? s->m->outbox_after(s, lo, 256, publish_row, &p, &rows)
                 : s->m->outbox_stale(s, lo, hi, older, max - count < 256 ? max - count : 256,
                                      publish_row, &p, &rows);
    if (rows > 0) {
      lo = p.last;
      if (last != NULL) *last = p.last;
    }
    if (rc != SAGA_OK) {
      saga__store_fail(&n->env, rc, "reading outbox");
      saga__log(&n->env, SAGA_LOG_ERROR, "%s", n->env.errmsg);
      break;
    }
    count += rows;
    if (rows < 256) break;
  }
  return count;
}

void saga__relay_fresh(saga_node *n) {
  if (n->closing) return;
  size_t sent = publish_range(n, n->relay_hwm, 0, UINT64_MAX, 1, SIZE_MAX, NULL);
  n->env.stats.sent += sent;
  if (sent > 0 && !n->resend_timer.armed)
    saga__timer_arm(&n->resend_timer, saga__now(&n->env) + n->resend_ms);
}

static void check_stuck(saga_node *n, uint64_t now);
static void clear_stuck(saga_node *n);

static void resend_timer_cb(saga__timer *t) {
  saga_node *n = t->data;
  if (n->closing) return;
  uint64_t now = saga__now(&n->env);
  uint64_t older = now >= n->resend_ms ? now - n->resend_ms : 0;
  /* At most batch_max rows per tick, oldest first, resuming where the last tick stopped and
   * starting over after the newest: a large unconfirmed backlog is far more likely a slow
   * receiver than lost messages, and resending all of it every tick only queues copies
   * behind the originals. A handful of lost messages is still resent on the next tick. */
  uint64_t last = 0;
  size_t sent = publish_range(n, n->resend_cursor, n->relay_hwm, older, 0, n->batch_max, &last);
  n->env.stats.resent += sent;
  n->resend_cursor = sent < n->batch_max ? 0 : last;
  /* Keep resending while anything is unconfirmed; stop when the outbox is empty. */
  if (saga_node_outbox_depth(n) > 0) {
    check_stuck(n, now);
    saga__timer_arm(&n->resend_timer, now + n->resend_ms);
  } else {
    clear_stuck(n);
  }
}

/* ---- channels whose messages stay unconfirmed -------------------------------------------- */

typedef struct stuck_scan {
  saga_node *n;
  uint64_t now, oldest, channels;
  saga__buf seen; /* channels over the threshold now (NUL-separated) */
  int oom;
} stuck_scan;

static int name_in(const saga__buf *list, const char *name) {
  for (size_t off = 0; off < list->len;) {
    const char *c = (const char *)list->data + off;
    if (strcmp(c, name) == 0) return 1;
    off += strlen(c) + 1;
  }
  return 0;
}

static void stuck_row(void *arg, const char *channel, int64_t count, uint64_t oldest) {
  stuck_scan *sc = arg;
  uint64_t age = sc->now > oldest ? sc->now - oldest : 0;
  if (age > sc->oldest) sc->oldest = age;
  if (age < SAGA_OUTBOX_WARN_MS || strcmp(channel, SAGA__LOCAL_CHANNEL) == 0) return;
  sc->channels++;
  if (saga__buf_append(&sc->seen, channel, strlen(channel) + 1) != SAGA_OK) {
    sc->oom = 1;
    return;
  }
  if (name_in(&sc->n->stuck_warned, channel)) return;
  char shown[131];
  saga__printable(shown, sizeof shown, channel, strlen(channel));
  saga__log(&sc->n->env, SAGA_LOG_WARN,
            "%" PRId64 " message(s) to '%s' unconfirmed, the oldest for %" PRIu64 " s: is the "
            "channel's name right, and is a node consuming it up? (warned once until it drains)",
            count, shown, age / 1000);
}

/* Reads the outbox per channel: the metrics, and a warning for each channel newly stuck. */
static void check_stuck(saga_node *n, uint64_t now) {
  if (n->outbox_checked != 0 && now - n->outbox_checked < SAGA_OUTBOX_CHECK_MS) return;
  n->outbox_checked = now;
  saga__store *s = n->env.store;
  stuck_scan sc;
  memset(&sc, 0, sizeof sc);
  sc.n = n;
  sc.now = now;
  saga__buf_init(&sc.seen, n->env.alloc);
  int rc = s->m->outbox_channels(s, stuck_row, &sc);
  if (rc == SAGA_OK && !sc.oom) {
    n->env.stats.outbox_oldest_ms = sc.oldest;
    n->env.stats.outbox_stuck_channels = sc.channels;
    /* Forget channels that drained: warned again if they get stuck again. */
    saga__buf tmp = n->stuck_warned;
    n->stuck_warned = sc.seen;
    sc.seen = tmp;
  }
  saga__buf_free(&sc.seen);
}

static void clear_stuck(saga_node *n) {
  n->env.stats.outbox_oldest_ms = 0;
  n->env.stats.outbox_stuck_channels = 0;
  saga__buf_reset(&n->stuck_warned);
  n->outbox_checked = 0;
}

typedef struct chan_report {
  saga_outbox_channel_cb cb;
  void *arg;
  uint64_t now;
} chan_report;

static void report_row(void *arg, const char *channel, int64_t count, uint64_t oldest) {
  chan_report *r = arg;
  r->cb(r->arg, channel, count, r->now > oldest ? r->now - oldest : 0);
}

int saga_node_outbox_channels(saga_node *n, saga_outbox_channel_cb cb, void *arg) {
  if (n == NULL || n->env.store == NULL || cb == NULL) return SAGA_EINVAL;
  chan_report r = {cb, arg, saga__now(&n->env)};
  int rc = n->env.store->m->outbox_channels(n->env.store, report_row, &r);
  return rc == SAGA_OK ? rc : saga__store_fail(&n->env, rc, "reading outbox");
}

int64_t saga_node_outbox_depth(saga_node *n) {
  if (n == NULL || n->env.store == NULL) return SAGA_EINVAL;
  int64_t count = 0;
  int rc = n->env.store->m->outbox_count(n->env.store, &count);
  return rc == SAGA_OK ? count : rc;
}

void saga__relay_init(saga_node *n) {
  saga__timer_init(&n->resend_timer, n->env.clock, resend_timer_cb, n);
  saga__buf_init(&n->unsendable_channel, n->env.alloc);
  saga__buf_init(&n->unsendable_body, n->env.alloc);
  saga__buf_init(&n->stuck_warned, n->env.alloc);
}

void saga__relay_stop(saga_node *n) { saga__timer_stop(&n->resend_timer); }
