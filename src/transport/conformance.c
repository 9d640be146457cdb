/*
 * The transport conformance kit (include/saga/conformance.h). It drives transports through
 * the adapter interface with a host of its own (recording what the adapter reports), then
 * runs real sagas over two nodes. Real time throughout: adapters talk to real networks.
 */
#include <stdio.h>
#include <string.h>

#include <sqlite3.h>

#include "../internal.h"
#include "saga/conformance.h"

/* ---- a transport under test, with the host the kit plugs into it ------------------------ */

typedef struct rec_delivery {
  char channel[64];
  uint8_t *data;
  size_t len;
  uint64_t tag;
} rec_delivery;

typedef struct kt {
  saga_transport *t;
  saga__transport_host host;
  const char *node;
  rec_delivery *dl;
  size_t ndl, dlcap;
  uint64_t *sent_ok;
  size_t nsent, sentcap;
  int sent_errors;
  int closed;         /* saga_transport_closed() calls */
  int after_closed;   /* callbacks received after closed */
  int open;           /* opened and not yet closed */
  size_t acked_upto;  /* deliveries [0, acked_upto) were acknowledged */
  int dead_letters;
} kt;

static int kt_deliver(void *ctx, const char *channel, const void *data, size_t len,
                      uint64_t tag) {
  kt *k = ctx;
  if (k->closed) k->after_closed++;
  if (k->ndl == k->dlcap) {
    size_t cap = k->dlcap ? k->dlcap * 2 : 64;
    rec_delivery *p = saga__realloc(NULL, k->dl, cap * sizeof *p);
    if (p == NULL) return SAGA_ENOMEM;
    k->dl = p;
    k->dlcap = cap;
  }
  rec_delivery *d = &k->dl[k->ndl];
  d->data = saga__malloc(NULL, len + 1);
  if (d->data == NULL) return SAGA_ENOMEM;
  memcpy(d->data, data, len);
  d->data[len] = 0;
  d->len = len;
  d->tag = tag;
  snprintf(d->channel, sizeof d->channel, "%s", channel);
  k->ndl++;
  return SAGA_OK;
}

static void kt_sent(void *ctx, uint64_t token, int status) {
  kt *k = ctx;
  if (k->closed) k->after_closed++;
  if (status != SAGA_OK) {
    k->sent_errors++;
    return;
  }
  if (k->nsent == k->sentcap) {
    size_t cap = k->sentcap ? k->sentcap * 2 : 64;
    uint64_t *p = saga__realloc(NULL, k->sent_ok, cap * sizeof *p);
    if (p == NULL) return;
    k->sent_ok = p;
    k->sentcap = cap;
  }
  k->sent_ok[k->nsent++] = token;
}

static void kt_closed(void *ctx) {
  kt *k = ctx;
  k->closed++;
}

static void kt_log(void *ctx, saga_log_level lvl, const char *msg) {
  (void)ctx;
  (void)lvl;
  (void)msg;
}

static int kt_dead_letter(void *ctx, const char *channel, const void *data, size_t len,
                          uint64_t tag, const char *reason) {
  kt *k = ctx;
  k->dead_letters++;
  if (k->open) k->t->methods->ack(k->t, tag);
  return SAGA_OK;
}

typedef struct kit {
  uv_loop_t *loop;
  const saga_conformance_medium2 *m;
  uint32_t patience;
  char *report;
  size_t reportlen, used;
  int failed;
  int bad_closes; /* closes that did not call saga_transport_closed() exactly once */
} kit;

/* What the medium's kind lets a sender be told before its receiver acknowledged. */
static int is_brokerless(const kit *c) { return c->m->kind == SAGA_MEDIUM_BROKERLESS; }
static int is_broker(const kit *c) { return c->m->kind == SAGA_MEDIUM_BROKER; }

static void say(kit *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(kit *c, const char *fmt, ...) {
  if (c->report == NULL || c->used + 1 >= c->reportlen) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(c->report + c->used, c->reportlen - c->used, fmt, ap);
  va_end(ap);
  if (n > 0) c->used += (size_t)n < c->reportlen - c->used ? (size_t)n : c->reportlen - c->used - 1;
}

static void result(kit *c, const char *check, const char *why) {
  if (why == NULL) {
    say(c, "PASS %s\n", check);
  } else {
    say(c, "FAIL %s: %s\n", check, why);
    c->failed++;
  }
}

/* ---- waiting on the loop ---------------------------------------------------------------- */

typedef int (*pred_fn)(void *arg);

static void wait_timeout_cb(uv_timer_t *h) { *(int *)h->data = 1; }
static void close_noop(uv_handle_t *h) { (void)h; }

/* Runs the loop until pred(arg) holds or ms of real time passed. Returns nonzero on pred. */
static int wait_for(kit *c, pred_fn pred, void *arg, uint32_t ms) {
  int timed_out = 0;
  uv_timer_t timer;
  uv_timer_init(c->loop, &timer);
  timer.data = &timed_out;
  uv_timer_start(&timer, wait_timeout_cb, ms, 0);
  while (!pred(arg) && !timed_out) uv_run(c->loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&timer, close_noop);
  uv_run(c->loop, UV_RUN_NOWAIT);
  return pred(arg);
}

static int never(void *arg) {
  (void)arg;
  return 0;
}

static int kt_open(kit *c, kt *k, const char *node) {
  memset(k, 0, sizeof *k);
  k->node = node;
  k->host.deliver = kt_deliver;
  k->host.sent = kt_sent;
  k->host.closed = kt_closed;
  k->host.log = kt_log;
  k->host.dead_letter = kt_dead_letter;
  k->host.ctx = k;
  int rc = c->m->create(c->m->ctx, node, &k->t);
  if (rc != SAGA_OK) return rc;
  k->t->saga__host = &k->host;
  rc = k->t->methods->open(k->t, c->loop);
  if (rc != SAGA_OK) {
    k->t->methods->destroy(k->t);
    k->t = NULL;
    return rc;
  }
  k->open = 1;
  rc = k->t->methods->subscribe(k->t, node);
  if (rc == SAGA_OK && strcmp(node, "conf-b") == 0) rc = k->t->methods->subscribe(k->t, "conf-ch");
  return rc;
}

static int kt_is_closed(void *arg) { return ((kt *)arg)->closed > 0; }

/* Closes (waiting for saga_transport_closed) and destroys; frees the records. */
static void kt_close(kit *c, kt *k) {
  if (k->t != NULL && k->open) {
    k->open = 0;
    k->t->methods->close(k->t);
    wait_for(c, kt_is_closed, k, c->patience);
    if (k->closed != 1) c->bad_closes++;
    k->t->methods->destroy(k->t);
  }
  k->t = NULL;
  for (size_t i = 0; i < k->ndl; i++) saga__free(NULL, k->dl[i].data);
  saga__free(NULL, k->dl);
  saga__free(NULL, k->sent_ok);
  k->dl = NULL;
  k->sent_ok = NULL;
  k->ndl = k->nsent = 0;
}

static int kt_send(kt *k, const char *channel, const char *text, uint64_t token) {
  return k->t->methods->send(k->t, channel, text, strlen(text), token);
}

static int has_sent(const kt *k, uint64_t token) {
  for (size_t i = 0; i < k->nsent; i++)
    if (k->sent_ok[i] == token) return 1;
  return 0;
}

static long find_delivery(const kt *k, const char *text) {
  for (size_t i = 0; i < k->ndl; i++)
    if (k->dl[i].len == strlen(text) && memcmp(k->dl[i].data, text, k->dl[i].len) == 0)
      return (long)i;
  return -1;
}

static size_t count_delivery(const kt *k, const char *text) {
  size_t n = 0;
  for (size_t i = 0; i < k->ndl; i++)
    if (k->dl[i].len == strlen(text) && memcmp(k->dl[i].data, text, k->dl[i].len) == 0) n++;
  return n;
}

static void ack_all(kt *k) {
  for (; k->acked_upto < k->ndl; k->acked_upto++)
    if (k->open) k->t->methods->ack(k->t, k->dl[k->acked_upto].tag);
}

/* Predicates over (kt, text/token). */
typedef struct probe {
  kt *rx, *tx;
  const char *text;
  uint64_t token;
  size_t count;
  int early; /* tx was told text was safe before rx had received it */
} probe;

static int got_text(void *arg) {
  probe *p = arg;
  return find_delivery(p->rx, p->text) >= 0;
}

static int got_sent(void *arg) {
  probe *p = arg;
  if (p->rx != NULL) ack_all(p->rx);
  return has_sent(p->tx, p->token);
}

/* Resends `text` every 200 ms (as a node's outbox would) until it was delivered to rx and
 * confirmed to tx, acknowledging what rx receives. */
typedef struct resend_ctx {
  probe p;
  const char *channel;
} resend_ctx;

static void resend_cb(uv_timer_t *h) {
  resend_ctx *r = h->data;
  if (!has_sent(r->p.tx, r->p.token)) kt_send(r->p.tx, r->channel, r->p.text, r->p.token);
}

static int delivered_and_sent(void *arg) {
  probe *p = arg;
  int got = find_delivery(p->rx, p->text) >= 0, sent = has_sent(p->tx, p->token);
  if (sent && !got) p->early = 1;
  ack_all(p->rx);
  return got && sent;
}

/* Returns nonzero when done; *early (may be NULL) says whether tx was told the message was
 * safe before rx had it, which a brokerless medium must never do. */
static int resend_until_done(kit *c, kt *tx, kt *rx, const char *channel, const char *text,
                             uint64_t token, uint32_t ms, int *early) {
  resend_ctx r = {{rx, tx, text, token, 0, 0}, channel};
  uv_timer_t timer;
  uv_timer_init(c->loop, &timer);
  timer.data = &r;
  kt_send(tx, channel, text, token);
  uv_timer_start(&timer, resend_cb, 200, 200);
  int ok = wait_for(c, delivered_and_sent, &r.p, ms);
  uv_close((uv_handle_t *)&timer, close_noop);
  uv_run(c->loop, UV_RUN_NOWAIT);
  if (early != NULL) *early = r.p.early;
  return ok;
}

/* rx is (back) on the channel: `text` must reach it, and tx be told it is safe once rx
 * acknowledged it. `confirmed`: the medium told tx before (a broker or relay stored it), so
 * it must deliver the message itself — no resend — within redelivery_ms and the patience.
 * Otherwise the kit resends it as a node's outbox would, and a brokerless medium must not tell
 * tx before rx got it. Returns NULL or why not. */
static const char *reaches(kit *c, kt *tx, kt *rx, const char *channel, const char *text,
                           uint64_t token, int confirmed) {
  if (confirmed) {
    probe p = {rx, tx, text, token, 0, 0};
    if (!wait_for(c, delivered_and_sent, &p, c->m->redelivery_ms + c->patience))
      return "confirmed to the sender earlier, but not delivered by the medium (no resend)";
    return NULL;
  }
  int early = 0;
  if (!resend_until_done(c, tx, rx, channel, text, token, c->patience * 2, &early))
    return "not delivered and confirmed, the sender resending every 200 ms";
  if (early && is_brokerless(c)) return "a brokerless medium confirmed it before it was received";
  return NULL;
}

/* ---- the transport-level checks --------------------------------------------------------- */

static int all_ordered(void *arg) {
  probe *p = arg;
  ack_all(p->rx);
  size_t distinct = 0;
  char buf[32];
  for (size_t i = 0; i < p->count; i++) {
    snprintf(buf, sizeof buf, "ord-%04zu", i);
    if (find_delivery(p->rx, buf) >= 0) distinct++;
  }
  return distinct == p->count;
}

/* The consumer of conf-ch (b) crashes right after a delivery, before acknowledging it; a new
 * consumer must get the message. On return b is the new consumer (or closed). */
static int got_text_unacked(void *arg) {
  probe *p = arg;
  return find_delivery(p->rx, p->text) >= 0;
}

static int got_text_stored(void *arg) {
  probe *p = arg;
  return find_delivery(p->rx, p->text) >= 0 && has_sent(p->tx, p->token);
}

static void check_consumer_crash(kit *c, kt *a, kt *b) {
  const char *text = "crash-7";
  uint64_t token = 7;
  b->acked_upto = b->ndl; /* nothing b receives from now on is acknowledged */
  kt_send(a, "conf-ch", text, token);
  /* A broker stores and confirms it whether or not it is delivered: wait for both, so that
   * the crash finds it confirmed. Otherwise crash from the loop turn of the delivery. */
  probe p = {b, a, text, token, 0, 0};
  int ok = wait_for(c, is_broker(c) ? got_text_stored : got_text_unacked, &p, c->patience);
  int delivered = find_delivery(b, text) >= 0;
  int confirmed = has_sent(a, token);
  kt_close(c, b); /* the crash: no ack, every delivery record of the kit's host dropped */
  if (!delivered) {
    result(c, "consumer-crash", "message not delivered before the crash");
    return;
  }
  if (confirmed && is_brokerless(c)) {
    result(c, "consumer-crash",
           "a brokerless medium confirmed a message its consumer never acknowledged");
    return;
  }
  if (!ok || (is_broker(c) && !confirmed)) {
    result(c, "consumer-crash", "a broker never confirmed the message it delivered");
    return;
  }
  int rc = kt_open(c, b, "conf-b");
  if (rc != SAGA_OK) {
    result(c, "consumer-crash", "could not start a new consumer after the crash");
    return;
  }
  result(c, "consumer-crash", reaches(c, a, b, "conf-ch", text, token, confirmed));
}

static void check_transport(kit *c) {
  kt a, b;
  char why[200];
  memset(&b, 0, sizeof b);
  int rc = kt_open(c, &a, "conf-a");
  if (rc == SAGA_OK) rc = kt_open(c, &b, "conf-b");
  if (rc != SAGA_OK) {
    snprintf(why, sizeof why, "could not open transports: %s", saga_strerror(rc));
    result(c, "delivery", why);
    kt_close(c, &a);
    kt_close(c, &b);
    return;
  }

  /* delivery */
  probe p = {&b, &a, "hello-1", 1, 0, 0};
  kt_send(&a, "conf-ch", "hello-1", 1);
  int ok = wait_for(c, got_text, &p, c->patience);
  long i = find_delivery(&b, "hello-1");
  result(c, "delivery",
         !ok ? "message not delivered within the patience"
             : strcmp(b.dl[i].channel, "conf-ch") != 0 ? "delivered on the wrong channel" : NULL);

  /* can_send: the channels the kit sends to are reachable (a node would refuse commands
   * whose reply_to its adapter says it cannot reach). */
  const saga_transport_methods *am = a.t->methods, *bm = b.t->methods;
  if (am->version < 2 || am->can_send == NULL) {
    say(c, "SKIP can_send: the adapter has no can_send (every channel is taken as reachable)\n");
  } else {
    const char *bad = !am->can_send(a.t, "conf-ch") ? "conf-a cannot send to conf-ch"
                      : !am->can_send(a.t, "conf-b") ? "conf-a cannot send to conf-b"
                      : (bm->version >= 2 && bm->can_send != NULL && !bm->can_send(b.t, "conf-a"))
                          ? "conf-b cannot send to conf-a"
                          : NULL;
    result(c, "can_send", bad);
  }

  /* ack */
  ok = wait_for(c, got_sent, &p, c->patience);
  result(c, "ack", ok ? NULL : "sender never told the message was safe after the ack");

  /* unacked */
  b.acked_upto = b.ndl;
  probe u = {&b, &a, "unacked-2", 2, 0, 0};
  kt_send(&a, "conf-ch", "unacked-2", 2);
  ok = wait_for(c, got_text, &u, c->patience);
  if (!ok) {
    result(c, "unacked", "message not delivered");
  } else {
    b.acked_upto = b.ndl; /* never acknowledge it */
    /* A broker confirms on storage, soon; a brokerless adapter must not confirm at all. */
    probe s = {NULL, &a, NULL, 2, 0, 0};
    wait_for(c, got_sent, &s, is_broker(c) ? c->patience : 300);
    int confirmed = has_sent(&a, 2);
    kt_close(c, &b);
    rc = kt_open(c, &b, "conf-b");
    if (rc != SAGA_OK) {
      result(c, "unacked", "could not reopen the receiver");
    } else if (confirmed && is_brokerless(c)) {
      result(c, "unacked", "a brokerless medium confirmed a message nobody acknowledged");
    } else if (confirmed) {
      probe r = {&b, &a, "unacked-2", 2, 0, 0};
      ok = wait_for(c, got_text, &r, c->m->redelivery_ms + c->patience);
      result(c, "unacked", ok ? NULL : "confirmed to the sender but never redelivered");
    } else if (is_broker(c)) {
      result(c, "unacked", "a broker never confirmed a stored message");
    } else {
      result(c, "unacked", NULL); /* the sender's outbox keeps it */
    }
  }

  /* duplicates */
  if (b.t != NULL) {
    kt_send(&a, "conf-ch", "dup-3", 3);
    kt_send(&a, "conf-ch", "dup-3", 3);
    probe d = {&b, &a, "dup-3", 3, 0, 0};
    ok = wait_for(c, delivered_and_sent, &d, c->patience);
    size_t n = count_delivery(&b, "dup-3");
    snprintf(why, sizeof why, "delivered %zu times, confirmed %d", n, has_sent(&a, 3));
    result(c, "duplicates", ok && n >= 1 && n <= 2 ? NULL : why);
  }

  /* order */
  if (!c->m->ordered) {
    say(c, "SKIP order: the medium does not promise per-channel order\n");
  } else if (b.t != NULL) {
    char buf[32];
    for (size_t k = 0; k < 200; k++) {
      snprintf(buf, sizeof buf, "ord-%04zu", k);
      kt_send(&a, "conf-ch", buf, 1000 + k);
    }
    probe o = {&b, &a, NULL, 0, 200, 0};
    ok = wait_for(c, all_ordered, &o, c->patience * 2);
    long last = -1;
    int in_order = 1;
    for (size_t k = 0; ok && k < 200; k++) {
      snprintf(buf, sizeof buf, "ord-%04zu", k);
      long at = find_delivery(&b, buf);
      if (at < last) in_order = 0;
      last = at;
    }
    result(c, "order", !ok ? "not all 200 messages arrived" : in_order ? NULL : "out of order");
  }

  /* consumer-crash */
  if (b.t != NULL) check_consumer_crash(c, &a, &b);

  /* peer gone: the receiver is away; it comes back */
  kt_close(c, &b);
  kt_send(&a, "conf-ch", "peer-5", 5);
  probe g = {NULL, &a, NULL, 5, 0, 0};
  /* A broker stores it for the absent receiver; anything else gets 200 ms to give itself
   * away. */
  wait_for(c, is_broker(c) ? got_sent : never, &g, is_broker(c) ? c->patience : 200);
  int stored = has_sent(&a, 5);
  rc = kt_open(c, &b, "conf-b");
  if (stored && is_brokerless(c)) {
    result(c, "peer-gone", "a brokerless adapter confirmed a message nobody received");
  } else if (!stored && is_broker(c)) {
    result(c, "peer-gone", "a broker never confirmed a message for an absent receiver");
  } else if (rc != SAGA_OK) {
    result(c, "peer-gone", "could not reopen the receiver");
  } else {
    result(c, "peer-gone", reaches(c, &a, &b, "conf-ch", "peer-5", 5, stored));
  }

  /* outage of the medium */
  if (c->m->stop == NULL || c->m->restart == NULL) {
    say(c, "SKIP outage: the medium cannot be stopped\n");
  } else if (b.t != NULL) {
    rc = c->m->stop(c->m->ctx);
    kt_send(&a, "conf-ch", "out-6", 6);
    wait_for(c, never, NULL, 300);
    int confirmed_down = has_sent(&a, 6);
    int rc2 = c->m->restart(c->m->ctx);
    ok = rc == SAGA_OK && rc2 == SAGA_OK &&
         resend_until_done(c, &a, &b, "conf-ch", "out-6", 6, c->patience * 3, NULL);
    result(c, "outage",
           confirmed_down ? "confirmed while the medium was down"
                          : ok ? NULL : "no delivery and confirmation after the medium restarted");
  }

  /* close with messages in flight */
  char buf[32];
  int b_open = b.t != NULL;
  for (int k = 0; k < 50 && b_open; k++) {
    snprintf(buf, sizeof buf, "flight-%d", k);
    kt_send(&a, "conf-ch", buf, 5000 + (uint64_t)k);
  }
  kt_close(c, &a);
  kt_close(c, &b);
  wait_for(c, never, NULL, 100);
  snprintf(why, sizeof why,
           "closed callbacks %d and %d (want 1 each), %d callbacks after closed, %d earlier "
           "closes without exactly one closed callback",
           a.closed, b.closed, a.after_closed + b.after_closed, c->bad_closes);
  result(c, "close", a.closed == 1 && (b.closed == 1 || !b_open) &&
                             a.after_closed + b.after_closed == 0 && c->bad_closes == 0
                         ? NULL
                         : why);
}

/* ---- the saga-level checks -------------------------------------------------------------- */

typedef struct saga_world {
  saga_node *orch, *part;
  int terminal, closed;
  int handler_runs; /* conf_do and conf_undo calls (committed or not) */
} saga_world;

static int fx(saga_tx *tx, const saga_msg *m, const char *kind) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(saga_tx_db(tx),
                              "INSERT INTO conf_fx(saga_id, step, kind) VALUES(?1, ?2, ?3)", -1,
                              &st, NULL);
  if (rc == SQLITE_OK) {
    sqlite3_bind_text(st, 1, saga_msg_saga_id(m), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, 2, (int)saga_msg_step(m));
    sqlite3_bind_text(st, 3, kind, -1, SQLITE_STATIC);
    rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
  }
  sqlite3_finalize(st);
  return rc == SQLITE_OK ? SAGA_OK : SAGA_EINVAL;
}

static int conf_do(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  ((saga_world *)arg)->handler_runs++;
  int64_t fail = -1;
  saga_data_get_i64(saga_msg_data(m), "fail", &fail);
  if (fail == (int64_t)saga_msg_step(m)) return saga_reply_fail(r, "refused by the kit");
  return fx(tx, m, "do");
}

static int conf_undo(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  ((saga_world *)arg)->handler_runs++;
  return fx(tx, m, "undo");
}

static void conf_event(saga_node *n, const saga_event *ev, void *arg) {
  saga_world *w = arg;
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED ||
      ev->type == SAGA_EV_SAGA_FAILED)
    w->terminal++;
}

static void conf_closed(void *arg) { ((saga_world *)arg)->closed++; }

static int sixty_done(void *arg) { return ((saga_world *)arg)->terminal >= 60; }
static int both_closed(void *arg) { return ((saga_world *)arg)->closed >= 2; }

static int open_node(kit *c, saga_world *w, saga_node **out, const char *name,
                     const char *path, int participant) {
  saga_transport *t = NULL;
  int rc = c->m->create(c->m->ctx, name, &t);
  if (rc != SAGA_OK) return rc;
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = name;
  cfg.db_path = path;
  cfg.transport = t;
  cfg.synchronous = SAGA_SYNC_NORMAL;
  cfg.resend_ms = 300;
  cfg.on_event = participant ? NULL : conf_event;
  cfg.event_arg = w;
  rc = saga_node_open(out, c->loop, &cfg, NULL, 0);
  if (rc != SAGA_OK) return rc;
  if (sqlite3_exec(saga_node_db(*out),
                   "CREATE TABLE IF NOT EXISTS conf_fx(saga_id TEXT, step INT, kind TEXT)", NULL,
                   NULL, NULL) != SQLITE_OK)
    return SAGA_ESTORE;
  if (participant) {
    if ((rc = saga_node_handle(*out, "conf-ch", "c.do", conf_do, w)) != SAGA_OK) return rc;
    if ((rc = saga_node_handle(*out, "conf-ch", "c.undo", conf_undo, w)) != SAGA_OK) return rc;
  } else {
    static const saga_step steps[] = {
        {.name = "ONE", .channel = "conf-ch", .action = "c.do", .compensation = "c.undo"},
        {.name = "TWO", .channel = "conf-ch", .action = "c.do", .compensation = "c.undo"},
        {.name = "THREE", .channel = "conf-ch", .action = "c.do", .kind = SAGA_STEP_PIVOT},
    };
    static const saga_definition def = {SAGA_DEFINITION_VERSION, "conformance", 1, steps, 3, 0, sizeof(saga_step)};
    if ((rc = saga_node_register(*out, &def)) != SAGA_OK) return rc;
  }
  return saga_node_start(*out, NULL);
}

static int count_fx(saga_node *n, const char *kind, int step) {
  sqlite3_stmt *st = NULL;
  int v = -1;
  if (sqlite3_prepare_v2(saga_node_db(n),
                         "SELECT count(*) FROM conf_fx WHERE kind = ?1 AND step = ?2", -1, &st,
                         NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, kind, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, step);
    if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int(st, 0);
  }
  sqlite3_finalize(st);
  return v;
}

static int one_closed(void *arg) { return ((saga_world *)arg)->closed >= 1; }

/* The crash comes once the participant ran 70 handlers: every first step and some second
 * ones (60 + 60 + 40 + 20 + 20 runs in all), or when every saga finished (too late: failed). */
#define CRASH_AFTER_RUNS 70
static int crash_point(void *arg) {
  saga_world *w = arg;
  return w->handler_runs >= CRASH_AFTER_RUNS || w->terminal >= 60;
}

/* "sagas": 60 sagas over conf-a (orchestrator) and conf-b (participant). "sagas-crash"
 * (crash set): the same, the participant closed with work in flight once it ran
 * CRASH_AFTER_RUNS handlers and opened again on the same database with a new transport. */
static void check_sagas(kit *c, int crash) {
  const char *check = crash ? "sagas-crash" : "sagas";
  if (c->m->db_dir == NULL) {
    say(c, "SKIP %s: no db_dir given\n", check);
    return;
  }
  char a[600], b[600], why[240];
  uint64_t tag = saga__os_random();
  snprintf(a, sizeof a, "%s/conf-a-%016llx.db", c->m->db_dir, (unsigned long long)tag);
  snprintf(b, sizeof b, "%s/conf-b-%016llx.db", c->m->db_dir, (unsigned long long)tag);
  saga_world w;
  memset(&w, 0, sizeof w);
  int rc = open_node(c, &w, &w.orch, "conf-a", a, 0);
  if (rc == SAGA_OK) rc = open_node(c, &w, &w.part, "conf-b", b, 1);
  for (int i = 0; rc == SAGA_OK && i < 60; i++) {
    saga_data *d = NULL;
    rc = saga_data_new(&d, NULL);
    if (rc == SAGA_OK && i % 3 == 0) rc = saga_data_set_i64(d, "fail", 2);
    if (rc == SAGA_OK) rc = saga_start(w.orch, "conformance", d, NULL, NULL, NULL);
    saga_data_free(d);
  }
  const char *stage = "setup";
  int crashed_with = 0; /* sagas unfinished at the crash */
  if (rc == SAGA_OK && crash) {
    /* The crash: closed with its work in flight, then opened on the same database. */
    wait_for(c, crash_point, &w, c->patience * 6);
    crashed_with = 60 - w.terminal;
    saga_node *dead = w.part;
    w.part = NULL;
    w.closed = 0;
    saga_node_close(dead, conf_closed, &w);
    if (!wait_for(c, one_closed, &w, c->patience)) {
      rc = SAGA_ECLOSED; /* a node that never finishes closing cannot be reopened */
      stage = "closing the participant";
    } else {
      rc = open_node(c, &w, &w.part, "conf-b", b, 1);
      stage = "reopening the participant";
    }
  }
  if (rc != SAGA_OK) {
    snprintf(why, sizeof why, "%s failed: %s", stage, saga_strerror(rc));
    result(c, check, why);
  } else if (crash && crashed_with == 0) {
    result(c, check, "every saga finished before the participant's crash");
  } else {
    int ok = wait_for(c, sixty_done, &w, c->patience * 6);
    /* 40 complete (3 effects each), 20 refuse step 3 and undo steps 1-2. */
    int d0 = count_fx(w.part, "do", 0), d1 = count_fx(w.part, "do", 1);
    int d2 = count_fx(w.part, "do", 2);
    int u0 = count_fx(w.part, "undo", 0), u1 = count_fx(w.part, "undo", 1);
    snprintf(why, sizeof why,
             "%d of 60 finished; effects do0=%d do1=%d do2=%d undo0=%d undo1=%d "
             "(want 60 60 40 20 20)",
             w.terminal, d0, d1, d2, u0, u1);
    result(c, check,
           ok && w.terminal == 60 && d0 == 60 && d1 == 60 && d2 == 40 && u0 == 20 && u1 == 20
               ? NULL
               : why);
  }
  int nodes = (w.orch != NULL) + (w.part != NULL);
  w.closed = 2 - nodes;
  saga_node_close(w.orch, conf_closed, &w);
  saga_node_close(w.part, conf_closed, &w);
  wait_for(c, both_closed, &w, c->patience);
}

int saga_conformance_run2(struct uv_loop_s *loop, const saga_conformance_medium2 *m,
                          char *report, size_t reportlen) {
  if (report != NULL && reportlen > 0) report[0] = '\0';
  if (loop == NULL || m == NULL) return SAGA_EINVAL;
  if (m->struct_version < 1) return SAGA_EINVAL;
  if (m->struct_version > SAGA_CONFORMANCE_MEDIUM_VERSION) return SAGA_EVERSION;
  if (m->create == NULL) return SAGA_EINVAL;
  if (m->kind != SAGA_MEDIUM_BROKERLESS && m->kind != SAGA_MEDIUM_BROKER &&
      m->kind != SAGA_MEDIUM_STORE_AND_FORWARD)
    return SAGA_EINVAL;
  kit c;
  memset(&c, 0, sizeof c);
  c.loop = loop;
  c.m = m;
  c.patience = m->timeout_ms ? m->timeout_ms : 5000;
  c.report = report;
  c.reportlen = reportlen;
  check_transport(&c);
  check_sagas(&c, 0);
  check_sagas(&c, 1);
  return c.failed;
}

int saga_conformance_run(struct uv_loop_s *loop, const saga_conformance_medium *m, char *report,
                         size_t reportlen) {
  if (m == NULL) return SAGA_EINVAL;
  saga_conformance_medium2 m2;
  memset(&m2, 0, sizeof m2);
  m2.struct_version = SAGA_CONFORMANCE_MEDIUM_VERSION;
  m2.kind = m->redelivery_ms != 0 ? SAGA_MEDIUM_BROKER : SAGA_MEDIUM_BROKERLESS;
  m2.create = m->create;
  m2.stop = m->stop;
  m2.restart = m->restart;
  m2.ctx = m->ctx;
  m2.ordered = m->ordered;
  m2.redelivery_ms = m->redelivery_ms;
  m2.timeout_ms = m->timeout_ms;
  m2.db_dir = m->db_dir;
  return saga_conformance_run2(loop, &m2, report, reportlen);
}
