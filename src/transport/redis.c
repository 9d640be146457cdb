/*
 * The Redis Streams transport: hiredis's asynchronous API on the node's libuv loop.
 *
 * It is written only against saga/sys/transport.h and the public headers, exactly as a
 * third-party adapter would be.
 *
 * Keys and groups. Channel "c" is the stream "<prefix>:c". Its consumers read it through the
 * consumer group "c" (the service that consumes the channel), each replica with a consumer
 * name of its own, so replicas share the entries. The group is created idempotently with
 * XGROUP CREATE ... $ MKSTREAM (BUSYGROUP means it exists) by the subscriber when its reader
 * connects, and also by a sender before its first XADD to a channel on each connection:
 * created with "$", a group sees only entries added after it, so without the sender's
 * creation a message sent before the consuming service's first start would be confirmed and
 * then never read.
 *
 * Connections. One command connection carries XADD, XACK, XGROUP CREATE, XAUTOCLAIM and
 * XPENDING; each subscribed channel has a reader connection of its own that loops on
 * XREADGROUP ... BLOCK (one group per channel, so one blocking read per channel). A blocked
 * read therefore never stalls sends or acknowledgements. Every connection reconnects on its
 * own with capped exponential backoff (with jitter), forever; it counts as up once it
 * answered PING (a restarted Redis refuses commands with -LOADING while it replays its
 * append-only file). With a password configured, AUTH ([username] password) is the first
 * command on every connection, reconnects included, queued before the PING and anything else.
 * A refused AUTH (or a server asking for one: -NOAUTH) is an authentication failure: logged at
 * ERROR when the state changes (then at DEBUG while it lasts), counted, and the connection
 * retried with the same backoff as an unreachable broker, so a node recovers by itself once
 * the server's ACL or password is fixed. Nothing is read, sent or acknowledged meanwhile. A connect watchdog bounds connection attempts and a read watchdog drops
 * a reader whose BLOCK outlived its timeout (a half-open connection). TCP keepalive is on.
 *
 * Sends. send() pipelines XADD key * d <bytes> and remembers the token in a FIFO of the
 * connection (replies arrive in command order). saga_transport_sent(token, SAGA_OK) is
 * reported only on XADD's reply, and only when that reply is an entry id (with appendfsync
 * always, the entry is then on disk); an error reply reports a negative status, and any
 * other reply is counted and treated as a failure. A confirmation therefore only ever names
 * a token sent on that same connection and not answered yet: each FIFO entry is popped once,
 * by the reply to its own command (the connection is ours alone; only the server, or someone
 * who can write into the TCP stream, could forge a reply: docs/security.md). A connection lost with XADDs unanswered reports
 * nothing for them: the node's outbox resends. While the command connection is down, or
 * connecting again after a failed attempt or a drop, send() fails with SAGA_ETRANSPORT; only
 * during the first attempt after open are XADDs queued with the connect (dropped unconfirmed
 * if it fails).
 *
 * One XADD per token and connection. The outbox resends a row every resend_ms until it is
 * confirmed; while the server stalls (or a connect hangs) each resend used to queue one more
 * XADD of it, all executed once the server answered: duplicate entries, delivered as
 * duplicates. A link's `unanswered` set holds the tokens of its XADDs not answered yet, and
 * send() of one of them adds nothing (the first XADD's reply confirms it). A connection lost
 * takes its set with it, so the next send writes the token again on the new one.
 *
 * Opening. open() succeeds whether or not the broker is up (the connections retry forever),
 * unless fail_fast is set: then one synchronous connection (AUTH, PING) must succeed first,
 * before anything is linked into the loop, so that a failed open leaves nothing behind.
 *
 * Deliveries. Each delivered entry gets a record (tag -> channel, entry id) until the node
 * acknowledges the tag; ack() then sends XACK, resent on the next connection if the reply
 * never came. The tag identifies the delivery, not the entry: a redelivered entry gets a
 * fresh tag, and acknowledging either one acknowledges the entry. Records not acknowledged
 * within a long horizon are forgotten (a late ack then only causes a redelivery), and a
 * channel stops reading while too many of its deliveries await their ack, so memory stays
 * bounded.
 *
 * Redelivery. Periodically (every claim_idle_ms / 4, at most 5 s) XAUTOCLAIM moves entries
 * that stayed pending longer than claim_idle_ms (a dead replica's, or never acknowledged)
 * to this consumer; XPENDING then gives each one's delivery count (XAUTOCLAIM incremented
 * it). An entry delivered max_deliveries times already is handed to
 * saga_transport_dead_letter() instead of being delivered again; the node records it and
 * acknowledges the tag. New entries never wait for pending ones: XREADGROUP ">" reads past
 * them, so a poison entry blocks nothing.
 *
 * Retention. Each subscriber periodically trims its channel's stream (a Lua script, atomic on
 * the server) below the group's oldest pending entry, or below its last-delivered id when
 * nothing is pending: what remains is what may still have to be delivered.
 *
 * Close. close() stops the timers and frees every hiredis context (their pending callbacks
 * run with no reply and do nothing), and reports saga_transport_closed() once the last
 * libuv handle has closed. Nothing calls into the node after close() began.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <uv.h>

#include "saga/sys/transport.h"
#include "saga/transport_redis.h"

#define RD_ID_MAX 48        /* "<ms>-<seq>" is at most 41 characters */
#define RD_READ_COUNT "64"  /* entries per XREADGROUP */
#define RD_CLAIM_COUNT "64" /* entries per XAUTOCLAIM */
#define RD_BLOCK_MS 5000    /* XREADGROUP BLOCK */
#define RD_WATCHDOG_MS 5000 /* a read unanswered this long after its BLOCK: drop */
#define RD_CONNECT_TIMEOUT_MS 5000
#define RD_MAX_INFLIGHT 1024  /* unacknowledged deliveries per channel before pausing */
#define RD_MIN_SWEEP_MS 60000 /* records kept at least this long without their ack */

typedef struct rd_tp rd_tp;
typedef struct rd_conn rd_conn;
typedef struct rd_chan rd_chan;
typedef struct rd_rec rd_rec;

/* A FIFO of 64-bit values (tokens of XADDs, tags of XACKs), in command order. */
typedef struct rd_fifo {
  uint64_t *v;
  size_t cap, head, len;
} rd_fifo;

/* A set of 64-bit values (open addressing, linear probing, no tombstones). */
typedef struct rd_set_slot {
  uint64_t v;
  int used;
} rd_set_slot;
typedef struct rd_set {
  rd_set_slot *s;
  size_t cap, n;
} rd_set;

/* One hiredis context with its libuv glue. It lives until its poll handle closed, which is
 * after every callback of the context ran, so the FIFOs stay consistent per context. */
typedef struct rd_link {
  uv_poll_t poll;
  rd_tp *tp;
  rd_conn *conn;         /* the connection it serves; NULL once that let go of it */
  redisAsyncContext *ac; /* NULL once hiredis cleaned it up */
  int events;
  int closing;
  uint64_t epoch; /* unique per context */
  rd_fifo tokens; /* XADD tokens */
  rd_set unanswered; /* the same tokens, to find one: at most one XADD per token here */
  rd_fifo acks;   /* XACK tags */
  int odd_logged; /* an XADD reply that was not an entry id was logged */
} rd_link;

enum { C_DOWN = 0, C_CONNECTING = 1, C_UP = 2 };

struct rd_conn {
  rd_tp *tp;
  rd_chan *chan;         /* the channel it reads; NULL for the command connection */
  redisAsyncContext *ac; /* NULL while down */
  int state;
  int reading; /* an XREADGROUP is outstanding */
  int lost;    /* it was up once and went down: log when it comes back */
  int failing; /* an attempt failed or the connection dropped, and it is not up again yet */
  uint32_t backoff_ms;
  uv_timer_t timer; /* backoff, connect watchdog, read watchdog, read retry */
};

struct rd_chan {
  rd_chan *next;
  rd_tp *tp;
  char *name, *key;
  size_t namelen, keylen;
  rd_conn reader;
  size_t inflight; /* deliveries awaiting the node's ack */
  int paused;      /* not reading until inflight drops */
  int claiming;    /* an XAUTOCLAIM is outstanding */
  int claim_err_logged;
  int trimming; /* a trim script is outstanding */
  int trim_err_logged;
  uint64_t trimmed_at;    /* loop time of the last trim */
  char cursor[RD_ID_MAX]; /* XAUTOCLAIM cursor */
};

/* A channel this transport sends to, with the context on which its group was created. */
typedef struct rd_dest {
  struct rd_dest *next;
  char *name, *key;
  size_t namelen, keylen;
  uint64_t epoch;
} rd_dest;

/* A delivery awaiting its ack (acked = 0), then an XACK awaiting its reply (acked = 1). */
struct rd_rec {
  rd_rec *hnext;       /* tag hash chain, or the spare list */
  rd_rec *prev, *next; /* age list, oldest first */
  uint64_t tag;
  rd_chan *chan;
  uint64_t at;        /* loop time of the delivery */
  uint64_t ack_epoch; /* context the XACK went out on; 0 = not sent */
  int acked;
  char id[RD_ID_MAX];
};

/* A claimed entry waiting for its delivery count. */
typedef struct rd_claim {
  rd_chan *chan;
  size_t len;
  int has_data;
  char id[RD_ID_MAX];
  unsigned char data[];
} rd_claim;

enum { TP_NEW = 0, TP_OPEN = 1, TP_CLOSING = 2, TP_CLOSED = 3 };

struct rd_tp {
  saga_transport base; /* first, as the adapter interface requires */
  saga_allocator alloc;
  char *host, *prefix, *consumer;
  char *username, *password; /* NULL when not set */
  size_t consumerlen;
  int fail_fast; /* open() connects once synchronously and fails when it cannot */
  int auth_failing; /* an authentication failure was logged at ERROR; cleared on success */
  saga_redis_stats stats;
  int port;
  uint32_t claim_idle_ms, max_deliveries, reconnect_min_ms, reconnect_max_ms;
  uint64_t sweep_ms, trim_ms;
  char idle_s[16], block_s[16];
  uv_loop_t *loop;
  int state;
  int destroy_pending;
  size_t nhandles; /* libuv handles not yet closed */
  uint64_t next_epoch, next_tag, rng;
  rd_conn cmd;
  uv_timer_t claim_timer;
  rd_chan *chans;
  rd_dest *dests;
  rd_rec **buckets;
  size_t nbuckets, nrecs;
  rd_rec *oldest, *newest, *spare;
};

/* ---- small helpers -------------------------------------------------------------------- */

static void *lc_malloc(size_t n, void *ud) {
  (void)ud;
  return malloc(n);
}
static void *lc_realloc(void *p, size_t n, void *ud) {
  (void)ud;
  return realloc(p, n);
}
static void lc_free(void *p, void *ud) {
  (void)ud;
  free(p);
}

static void *rd_malloc(rd_tp *tp, size_t n) { return tp->alloc.malloc(n, tp->alloc.ud); }
static void rd_free(rd_tp *tp, void *p) {
  if (p != NULL) tp->alloc.free(p, tp->alloc.ud);
}

static char *rd_strcat3(rd_tp *tp, const char *a, const char *b, const char *c) {
  size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
  char *s = rd_malloc(tp, la + lb + lc + 1);
  if (s == NULL) return NULL;
  memcpy(s, a, la);
  memcpy(s + la, b, lb);
  memcpy(s + la + lb, c, lc + 1);
  return s;
}

static void rd_log(rd_tp *tp, saga_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void rd_log(rd_tp *tp, saga_log_level level, const char *fmt, ...) {
  char msg[320];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  saga_transport_log(&tp->base, level, msg);
}

static uint64_t rd_rand(rd_tp *tp) { /* xorshift64*: jitter only */
  uint64_t x = tp->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  tp->rng = x;
  return x * UINT64_C(2685821657736338717);
}

static int reply_is(const redisReply *r, int type) { return r != NULL && r->type == type; }

static int fifo_push(rd_tp *tp, rd_fifo *f, uint64_t x) {
  if (f->len == f->cap) {
    size_t cap = f->cap ? f->cap * 2 : 16;
    uint64_t *v = rd_malloc(tp, cap * sizeof *v);
    if (v == NULL) return SAGA_ENOMEM;
    for (size_t i = 0; i < f->len; i++) v[i] = f->v[(f->head + i) % f->cap];
    rd_free(tp, f->v);
    f->v = v;
    f->cap = cap;
    f->head = 0;
  }
  f->v[(f->head + f->len) % f->cap] = x;
  f->len++;
  return SAGA_OK;
}

static int fifo_pop(rd_fifo *f, uint64_t *x) {
  if (f->len == 0) return 0;
  *x = f->v[f->head];
  f->head = (f->head + 1) % f->cap;
  f->len--;
  return 1;
}

static void fifo_unpush(rd_fifo *f) {
  if (f->len > 0) f->len--;
}

static size_t set_home(const rd_set *t, uint64_t v) {
  return (size_t)((v * UINT64_C(0x9E3779B97F4A7C15)) >> 20) & (t->cap - 1);
}

static int set_has(const rd_set *t, uint64_t v) {
  if (t->n == 0) return 0;
  for (size_t i = set_home(t, v);; i = (i + 1) & (t->cap - 1)) {
    if (!t->s[i].used) return 0;
    if (t->s[i].v == v) return 1;
  }
}

static int set_add(rd_tp *tp, rd_set *t, uint64_t v) {
  if ((t->n + 1) * 2 > t->cap) {
    size_t cap = t->cap ? t->cap * 2 : 64;
    rd_set_slot *s = rd_malloc(tp, cap * sizeof *s);
    if (s == NULL) return SAGA_ENOMEM;
    memset(s, 0, cap * sizeof *s);
    rd_set old = *t;
    t->s = s;
    t->cap = cap;
    for (size_t i = 0; i < old.cap; i++) {
      if (!old.s[i].used) continue;
      size_t j = set_home(t, old.s[i].v);
      while (s[j].used) j = (j + 1) & (cap - 1);
      s[j] = old.s[i];
    }
    rd_free(tp, old.s);
  }
  size_t i = set_home(t, v);
  while (t->s[i].used) i = (i + 1) & (t->cap - 1);
  t->s[i].v = v;
  t->s[i].used = 1;
  t->n++;
  return SAGA_OK;
}

/* Removes v if present, shifting back the entries after it in its probe run. */
static void set_del(rd_set *t, uint64_t v) {
  if (t->n == 0) return;
  size_t mask = t->cap - 1, i = set_home(t, v);
  for (;; i = (i + 1) & mask) {
    if (!t->s[i].used) return;
    if (t->s[i].v == v) break;
  }
  t->s[i].used = 0;
  t->n--;
  for (size_t j = (i + 1) & mask; t->s[j].used; j = (j + 1) & mask) {
    size_t home = set_home(t, t->s[j].v);
    if (((j - home) & mask) >= ((j - i) & mask)) {
      t->s[i] = t->s[j];
      t->s[j].used = 0;
      i = j;
    }
  }
}

static void maybe_closed(rd_tp *tp);
static void conn_schedule(rd_conn *c);
static void conn_up(rd_conn *c);
static void reader_read(rd_chan *ch);

/* ---- records: deliveries awaiting their ack ------------------------------------------- */

static void recs_grow(rd_tp *tp) {
  size_t n = tp->nbuckets ? tp->nbuckets * 2 : 64;
  rd_rec **b = rd_malloc(tp, n * sizeof *b);
  if (b == NULL) return; /* longer chains, still correct */
  memset(b, 0, n * sizeof *b);
  for (size_t i = 0; i < tp->nbuckets; i++) {
    rd_rec *r = tp->buckets[i];
    while (r != NULL) {
      rd_rec *next = r->hnext;
      r->hnext = b[r->tag & (n - 1)];
      b[r->tag & (n - 1)] = r;
      r = next;
    }
  }
  rd_free(tp, tp->buckets);
  tp->buckets = b;
  tp->nbuckets = n;
}

static rd_rec *rec_find(rd_tp *tp, uint64_t tag) {
  if (tp->nbuckets == 0) return NULL;
  rd_rec *r = tp->buckets[tag & (tp->nbuckets - 1)];
  while (r != NULL && r->tag != tag) r = r->hnext;
  return r;
}

/* A record for a delivery of entry id on ch, or NULL without memory (the entry then stays
 * pending and is claimed again later). */
static rd_rec *rec_new(rd_chan *ch, const char *id, size_t idlen) {
  rd_tp *tp = ch->tp;
  if (idlen >= RD_ID_MAX) return NULL;
  if (tp->nrecs >= tp->nbuckets) recs_grow(tp);
  if (tp->nbuckets == 0) return NULL;
  rd_rec *r = tp->spare;
  if (r != NULL)
    tp->spare = r->hnext;
  else if ((r = rd_malloc(tp, sizeof *r)) == NULL)
    return NULL;
  memset(r, 0, sizeof *r);
  /* Sequential tags: the hash spreads them evenly, and they never reach the bit the core
   * reserves (1 << 63). */
  r->tag = ++tp->next_tag;
  r->chan = ch;
  r->at = uv_now(tp->loop);
  memcpy(r->id, id, idlen);
  r->id[idlen] = '\0';
  size_t i = r->tag & (tp->nbuckets - 1);
  r->hnext = tp->buckets[i];
  tp->buckets[i] = r;
  tp->nrecs++;
  r->prev = tp->newest;
  if (tp->newest != NULL)
    tp->newest->next = r;
  else
    tp->oldest = r;
  tp->newest = r;
  ch->inflight++;
  return r;
}

static void chan_maybe_resume(rd_chan *ch) {
  if (ch->paused && ch->inflight < RD_MAX_INFLIGHT / 2) {
    ch->paused = 0;
    reader_read(ch);
  }
}

static void rec_release(rd_tp *tp, rd_rec *r) {
  rd_rec **pp = &tp->buckets[r->tag & (tp->nbuckets - 1)];
  while (*pp != r) pp = &(*pp)->hnext;
  *pp = r->hnext;
  tp->nrecs--;
  if (r->prev != NULL)
    r->prev->next = r->next;
  else
    tp->oldest = r->next;
  if (r->next != NULL)
    r->next->prev = r->prev;
  else
    tp->newest = r->prev;
  rd_chan *ch = r->chan;
  int was_acked = r->acked;
  r->hnext = tp->spare;
  tp->spare = r;
  if (!was_acked) {
    ch->inflight--;
    if (tp->state == TP_OPEN) chan_maybe_resume(ch);
  }
}

/* ---- the libuv glue of a hiredis context ---------------------------------------------- */

static void link_closed(uv_handle_t *h) {
  rd_link *l = h->data;
  rd_tp *tp = l->tp;
  rd_free(tp, l->tokens.v);
  rd_free(tp, l->unanswered.s);
  rd_free(tp, l->acks.v);
  rd_free(tp, l);
  tp->nhandles--;
  maybe_closed(tp);
}

static void conn_drop(rd_conn *c, const char *why);

static void link_poll_cb(uv_poll_t *h, int status, int events) {
  rd_link *l = h->data;
  if (l->ac == NULL) return;
  if (status < 0) {
    /* libuv reports a socket error (POLLERR) this way and stops polling. Let hiredis read
     * the error itself (it then frees the context and ev_cleanup reconnects); if it does
     * not, drop the connection. */
    int connecting = l->conn != NULL && l->conn->state == C_CONNECTING;
    if (connecting)
      redisAsyncHandleWrite(l->ac);
    else
      redisAsyncHandleRead(l->ac);
    if (l->ac != NULL && l->conn != NULL) conn_drop(l->conn, uv_strerror(status));
    return;
  }
  if (events & UV_READABLE) redisAsyncHandleRead(l->ac);
  if (l->ac != NULL && (events & UV_WRITABLE)) redisAsyncHandleWrite(l->ac);
}

static void link_update(rd_link *l) {
  if (l->closing) return;
  if (l->events != 0)
    uv_poll_start(&l->poll, l->events, link_poll_cb);
  else
    uv_poll_stop(&l->poll);
}

static void ev_add_read(void *p) {
  rd_link *l = p;
  l->events |= UV_READABLE;
  link_update(l);
}
static void ev_del_read(void *p) {
  rd_link *l = p;
  l->events &= ~UV_READABLE;
  link_update(l);
}
static void ev_add_write(void *p) {
  rd_link *l = p;
  l->events |= UV_WRITABLE;
  link_update(l);
}
static void ev_del_write(void *p) {
  rd_link *l = p;
  l->events &= ~UV_WRITABLE;
  link_update(l);
}

/* hiredis is freeing the context: every pending callback already ran (with no reply). If
 * the connection still counted on this context, it was lost: reconnect. */
static void ev_cleanup(void *p) {
  rd_link *l = p;
  if (l->closing) return;
  l->closing = 1;
  char why[128];
  snprintf(why, sizeof why, "%s",
           l->ac != NULL && l->ac->errstr != NULL && l->ac->err != 0 ? l->ac->errstr
                                                                     : "connection closed");
  l->ac = NULL;
  uv_poll_stop(&l->poll);
  uv_close((uv_handle_t *)&l->poll, link_closed);
  rd_conn *c = l->conn;
  l->conn = NULL;
  if (c == NULL) return;
  rd_tp *tp = c->tp;
  int was_up = c->state == C_UP;
  c->ac = NULL;
  c->state = C_DOWN;
  c->reading = 0;
  if (tp->state != TP_OPEN) return;
  if (was_up) c->lost = 1;
  rd_log(tp, was_up ? SAGA_LOG_WARN : SAGA_LOG_DEBUG, "redis %s connection%s%s: %s; retrying",
         c->chan ? "reader" : "command", c->chan ? " of " : "", c->chan ? c->chan->name : "", why);
  conn_schedule(c);
}

static void conn_drop_at(rd_conn *c, const char *why, saga_log_level level);

/* An error reply that says the connection is not authenticated as it should be. */
static int auth_error(const char *e) {
  return strncmp(e, "NOAUTH", 6) == 0 || strncmp(e, "WRONGPASS", 9) == 0 ||
         strncmp(e, "NOPERM", 6) == 0 || strncmp(e, "ERR invalid password", 20) == 0;
}

/* Authentication refused on a connection: counted; logged at ERROR only when the state
 * changes; the connection is retried like an unreachable broker's. */
static void auth_failed(rd_conn *c, const char *err) {
  rd_tp *tp = c->tp;
  tp->stats.auth_failures++;
  char why[256];
  snprintf(why, sizeof why, "authentication failed%s%s%s: %s (check username/password)",
           tp->username ? " for user '" : "", tp->username ? tp->username : "",
           tp->username ? "'" : "", err);
  if (!tp->auth_failing) {
    tp->auth_failing = 1;
    rd_log(tp, SAGA_LOG_ERROR, "redis at %s:%d: %s; retrying, nothing is sent or read meanwhile",
           tp->host, tp->port, why);
  }
  conn_drop_at(c, why, SAGA_LOG_DEBUG);
}

static void auth_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_link *l = ac->data;
  redisReply *r = reply;
  (void)privdata;
  if (l->conn == NULL || r == NULL || l->tp->state != TP_OPEN) return;
  if (r->type == REDIS_REPLY_ERROR) {
    auth_failed(l->conn, r->str);
    return;
  }
  if (l->tp->auth_failing) {
    l->tp->auth_failing = 0;
    rd_log(l->tp, SAGA_LOG_INFO, "redis at %s:%d accepts the credentials again", l->tp->host,
           l->tp->port);
  }
}

/* The handshake: a server still loading its append-only file answers -LOADING to
 * everything, PING included; the connection counts as up only once it answers PONG. */
static void ping_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_link *l = ac->data;
  redisReply *r = reply;
  (void)privdata;
  if (l->conn == NULL || r == NULL || l->tp->state != TP_OPEN) return;
  if (r->type == REDIS_REPLY_ERROR) {
    if (auth_error(r->str)) {
      auth_failed(l->conn, r->str); /* no password configured, or AUTH refused */
      return;
    }
    char why[128];
    snprintf(why, sizeof why, "server not ready: %s", r->str);
    conn_drop(l->conn, why);
    return;
  }
  conn_up(l->conn);
}

static void on_connect(const redisAsyncContext *ac, int status) {
  /* A failure is handled in ev_cleanup, which hiredis calls next; on success the handshake
   * queued at connect goes out now. */
  (void)ac;
  (void)status;
}

/*
 * Queues the handshake on a context just created, before anything else can be queued on it
 * (sends made while it connects come after): AUTH when a password is set, then PING. hiredis
 * writes commands in the order they were queued, so AUTH is the first thing the server reads
 * on every connection, reconnects included. If they cannot be queued, the connect watchdog
 * drops the connection.
 */
static void handshake(rd_tp *tp, redisAsyncContext *ac) {
  if (tp->password != NULL) {
    const char *argv[3];
    size_t lens[3];
    int argc = 0;
    argv[argc] = "AUTH";
    lens[argc++] = 4;
    if (tp->username != NULL) {
      argv[argc] = tp->username;
      lens[argc++] = strlen(tp->username);
    }
    argv[argc] = tp->password;
    lens[argc++] = strlen(tp->password);
    redisAsyncCommandArgv(ac, auth_cb, NULL, argc, argv, lens);
  }
  redisAsyncCommand(ac, ping_cb, NULL, "PING");
}

/* ---- connections ---------------------------------------------------------------------- */

static void conn_timer_cb(uv_timer_t *h);
static void reader_start(rd_chan *ch);

static void conn_schedule(rd_conn *c) {
  rd_tp *tp = c->tp;
  c->failing = 1;
  uint32_t b = c->backoff_ms;
  uint64_t delay = b / 2 + rd_rand(tp) % (b / 2 + 1);
  uint64_t next = (uint64_t)b * 2;
  c->backoff_ms = next > tp->reconnect_max_ms ? tp->reconnect_max_ms : (uint32_t)next;
  uv_timer_start(&c->timer, conn_timer_cb, delay, 0);
}

/* Gives up the current context (if any) and reconnects after the backoff, logging why at
 * level. */
static void conn_drop_at(rd_conn *c, const char *why, saga_log_level level) {
  rd_tp *tp = c->tp;
  redisAsyncContext *ac = c->ac;
  int was_up = c->state == C_UP;
  c->ac = NULL;
  c->state = C_DOWN;
  c->reading = 0;
  uv_timer_stop(&c->timer);
  if (ac != NULL) {
    ((rd_link *)ac->data)->conn = NULL;
    redisAsyncFree(ac); /* deferred by hiredis when inside one of its callbacks */
  }
  if (tp->state != TP_OPEN) return;
  if (was_up) c->lost = 1;
  rd_log(tp, level, "redis %s connection%s%s dropped: %s; retrying",
         c->chan ? "reader" : "command", c->chan ? " of " : "", c->chan ? c->chan->name : "", why);
  conn_schedule(c);
}

static void conn_drop(rd_conn *c, const char *why) { conn_drop_at(c, why, SAGA_LOG_WARN); }

static void conn_connect(rd_conn *c) {
  rd_tp *tp = c->tp;
  redisAsyncContext *ac = redisAsyncConnect(tp->host, tp->port);
  if (ac == NULL || ac->err != 0) {
    rd_log(tp, SAGA_LOG_DEBUG, "redis connect to %s:%d failed: %s; retrying", tp->host, tp->port,
           ac != NULL && ac->errstr != NULL ? ac->errstr : "out of memory");
    if (ac != NULL) redisAsyncFree(ac);
    conn_schedule(c);
    return;
  }
  rd_link *l = rd_malloc(tp, sizeof *l);
  if (l == NULL || uv_poll_init(tp->loop, &l->poll, ac->c.fd) != 0) {
    rd_free(tp, l);
    redisAsyncFree(ac);
    conn_schedule(c);
    return;
  }
  memset((char *)l + sizeof l->poll, 0, sizeof *l - sizeof l->poll);
  tp->nhandles++;
  l->poll.data = l;
  l->tp = tp;
  l->conn = c;
  l->ac = ac;
  l->epoch = ++tp->next_epoch;
  ac->data = l;
  ac->ev.data = l;
  ac->ev.addRead = ev_add_read;
  ac->ev.delRead = ev_del_read;
  ac->ev.addWrite = ev_add_write;
  ac->ev.delWrite = ev_del_write;
  ac->ev.cleanup = ev_cleanup;
  c->ac = ac;
  c->state = C_CONNECTING;
  c->reading = 0;
  /* Setting the callback also waits for writability: that is how the connect completes. */
  redisAsyncSetConnectCallback(ac, on_connect);
  handshake(tp, ac);
  uv_timer_start(&c->timer, conn_timer_cb, RD_CONNECT_TIMEOUT_MS, 0);
}

static void conn_timer_cb(uv_timer_t *h) {
  rd_conn *c = h->data;
  if (c->tp->state != TP_OPEN) return;
  switch (c->state) {
  case C_DOWN:
    conn_connect(c);
    break;
  case C_CONNECTING:
    conn_drop(c, "connect timed out");
    break;
  default:
    if (c->chan == NULL) break;
    if (c->reading) {
      conn_drop(c, "blocking read unanswered");
    } else {
      /* Retry after an error reply: make sure the group exists, then read. */
      reader_start(c->chan);
    }
    break;
  }
}

static void conn_init(rd_tp *tp, rd_conn *c, rd_chan *chan) {
  memset(c, 0, sizeof *c);
  c->tp = tp;
  c->chan = chan;
  c->backoff_ms = tp->reconnect_min_ms;
  uv_timer_init(tp->loop, &c->timer);
  c->timer.data = c;
  tp->nhandles++;
}

static void send_pending_acks(rd_tp *tp);

static void conn_up(rd_conn *c) {
  rd_tp *tp = c->tp;
  c->state = C_UP;
  c->failing = 0;
  c->backoff_ms = tp->reconnect_min_ms;
  uv_timer_stop(&c->timer);
  redisEnableKeepAlive(&c->ac->c);
  if (c->lost) {
    c->lost = 0;
    rd_log(tp, SAGA_LOG_INFO, "redis %s connection%s%s re-established",
           c->chan ? "reader" : "command", c->chan ? " of " : "", c->chan ? c->chan->name : "");
  }
  if (c->chan != NULL)
    reader_start(c->chan);
  else
    send_pending_acks(tp);
}

static void timer_closed(uv_handle_t *h) {
  rd_tp *tp = ((rd_conn *)h->data)->tp;
  tp->nhandles--;
  maybe_closed(tp);
}

static void claim_timer_closed(uv_handle_t *h) {
  rd_tp *tp = h->data;
  tp->nhandles--;
  maybe_closed(tp);
}

static void conn_shutdown(rd_conn *c) {
  uv_timer_stop(&c->timer);
  uv_close((uv_handle_t *)&c->timer, timer_closed);
  redisAsyncContext *ac = c->ac;
  c->ac = NULL;
  c->state = C_DOWN;
  if (ac != NULL) {
    ((rd_link *)ac->data)->conn = NULL;
    redisAsyncFree(ac);
  }
}

/* ---- deliveries ----------------------------------------------------------------------- */

/* Finds field "d" in an entry's field/value array. */
static const redisReply *entry_data(const redisReply *fields) {
  if (!reply_is(fields, REDIS_REPLY_ARRAY)) return NULL;
  for (size_t i = 0; i + 1 < fields->elements; i += 2) {
    const redisReply *f = fields->element[i];
    if (reply_is(f, REDIS_REPLY_STRING) && f->len == 1 && f->str[0] == 'd' &&
        reply_is(fields->element[i + 1], REDIS_REPLY_STRING))
      return fields->element[i + 1];
  }
  return NULL;
}

/*
 * Hands one entry to the node: delivered, or dead-lettered when it was delivered
 * max_deliveries times already (deliveries = its count including this one; 0 = first
 * delivery) or has no data field.
 */
static void hand_over(rd_chan *ch, const char *id, size_t idlen, int has_data, const void *data,
                      size_t len, uint64_t deliveries) {
  rd_tp *tp = ch->tp;
  rd_rec *r = rec_new(ch, id, idlen);
  if (r == NULL) {
    rd_log(tp, SAGA_LOG_WARN, "redis: cannot track entry %.*s of %s; it will be claimed again",
           (int)(idlen < 60 ? idlen : 60), id, ch->name);
    return;
  }
  uint64_t tag = r->tag;
  int rc;
  if (!has_data) {
    rc = saga_transport_dead_letter(&tp->base, ch->name, NULL, 0, tag,
                                    "redis stream entry has no 'd' field");
  } else if (deliveries > tp->max_deliveries) {
    char reason[160];
    snprintf(reason, sizeof reason,
             "redis entry %s delivered %llu times without acknowledgement (max_deliveries %u)",
             r->id, (unsigned long long)(deliveries - 1), tp->max_deliveries);
    rc = saga_transport_dead_letter(&tp->base, ch->name, data, len, tag, reason);
  } else {
    rc = saga_transport_deliver(&tp->base, ch->name, data, len, tag);
  }
  if (rc != SAGA_OK) {
    /* Refused (closing, or no memory): not acknowledged, so it stays pending and comes back.
     * The callback may also have closed us, or even acknowledged the tag already. */
    r = rec_find(tp, tag);
    if (r != NULL) rec_release(tp, r);
  }
}

static void read_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_chan *ch = privdata;
  rd_conn *c = &ch->reader;
  rd_tp *tp = ch->tp;
  rd_link *l = ac->data;
  if (l->conn != c) return; /* a dropped context's answer */
  c->reading = 0;
  uv_timer_stop(&c->timer);
  redisReply *r = reply;
  if (r == NULL || tp->state != TP_OPEN) return;
  if (r->type == REDIS_REPLY_ERROR) {
    rd_log(tp, SAGA_LOG_WARN, "redis XREADGROUP on %s failed: %s", ch->key, r->str);
    conn_schedule(c); /* state is C_UP: the timer retries the read */
    return;
  }
  c->backoff_ms = tp->reconnect_min_ms;
  if (r->type == REDIS_REPLY_ARRAY) {
    for (size_t s = 0; s < r->elements; s++) {
      const redisReply *stream = r->element[s];
      if (!reply_is(stream, REDIS_REPLY_ARRAY) || stream->elements < 2 ||
          !reply_is(stream->element[1], REDIS_REPLY_ARRAY))
        continue;
      const redisReply *entries = stream->element[1];
      for (size_t i = 0; i < entries->elements && tp->state == TP_OPEN; i++) {
        const redisReply *e = entries->element[i];
        if (!reply_is(e, REDIS_REPLY_ARRAY) || e->elements < 2 ||
            !reply_is(e->element[0], REDIS_REPLY_STRING))
          continue;
        const redisReply *d = entry_data(e->element[1]);
        hand_over(ch, e->element[0]->str, e->element[0]->len, d != NULL, d ? d->str : NULL,
                  d ? d->len : 0, 0);
      }
    }
  }
  if (tp->state != TP_OPEN || c->ac != ac) return;
  if (ch->inflight >= RD_MAX_INFLIGHT) {
    ch->paused = 1;
    rd_log(tp, SAGA_LOG_DEBUG, "redis: %s paused, %zu deliveries await their ack", ch->name,
           ch->inflight);
    return;
  }
  reader_read(ch);
}

static void reader_read(rd_chan *ch) {
  rd_tp *tp = ch->tp;
  rd_conn *c = &ch->reader;
  if (tp->state != TP_OPEN || c->state != C_UP || c->reading || ch->paused) return;
  const char *argv[] = {"XREADGROUP", "GROUP",     ch->name,  tp->consumer, "COUNT", RD_READ_COUNT,
                        "BLOCK",      tp->block_s, "STREAMS", ch->key,      ">"};
  size_t lens[] = {10,
                   5,
                   ch->namelen,
                   tp->consumerlen,
                   5,
                   strlen(RD_READ_COUNT),
                   5,
                   strlen(tp->block_s),
                   7,
                   ch->keylen,
                   1};
  /* An error means the context is going away; ev_cleanup reconnects. */
  if (redisAsyncCommandArgv(c->ac, read_cb, ch, 11, argv, lens) != REDIS_OK) return;
  c->reading = 1;
  uv_timer_start(&c->timer, conn_timer_cb, RD_BLOCK_MS + RD_WATCHDOG_MS, 0);
}

static void group_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_chan *ch = privdata;
  redisReply *r = reply;
  (void)ac;
  if (r == NULL || ch->tp->state != TP_OPEN) return;
  if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "BUSYGROUP", 9) != 0)
    rd_log(ch->tp, SAGA_LOG_WARN, "redis XGROUP CREATE %s %s failed: %s", ch->key, ch->name,
           r->str);
}

static void reader_start(rd_chan *ch) {
  rd_conn *c = &ch->reader;
  const char *argv[] = {"XGROUP", "CREATE", ch->key, ch->name, "$", "MKSTREAM"};
  size_t lens[] = {6, 6, ch->keylen, ch->namelen, 1, 8};
  if (redisAsyncCommandArgv(c->ac, group_cb, ch, 6, argv, lens) != REDIS_OK) return;
  reader_read(ch);
}

/* ---- acknowledgements ----------------------------------------------------------------- */

static void xack_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_link *l = ac->data;
  rd_tp *tp = l->tp;
  redisReply *r = reply;
  uint64_t tag;
  (void)privdata;
  if (!fifo_pop(&l->acks, &tag)) return;
  /* No reply: the record stays and the XACK goes out again on the next connection. */
  if (r == NULL || tp->state != TP_OPEN) return;
  rd_rec *rec = rec_find(tp, tag);
  if (rec == NULL || !rec->acked) return;
  if (r->type == REDIS_REPLY_ERROR)
    rd_log(tp, SAGA_LOG_WARN, "redis XACK %s %s failed: %s", rec->chan->key, rec->id, r->str);
  rec_release(tp, rec);
}

static void send_xack(rd_tp *tp, rd_rec *rec) {
  rd_conn *c = &tp->cmd;
  if (c->ac == NULL) return; /* down: sent when it is back */
  rd_link *l = c->ac->data;
  if (fifo_push(tp, &l->acks, rec->tag) != SAGA_OK) return;
  rd_chan *ch = rec->chan;
  const char *argv[] = {"XACK", ch->key, ch->name, rec->id};
  size_t lens[] = {4, ch->keylen, ch->namelen, strlen(rec->id)};
  if (redisAsyncCommandArgv(c->ac, xack_cb, NULL, 4, argv, lens) != REDIS_OK) {
    fifo_unpush(&l->acks);
    return;
  }
  rec->ack_epoch = l->epoch;
}

static void send_pending_acks(rd_tp *tp) {
  if (tp->cmd.ac == NULL) return;
  uint64_t epoch = ((rd_link *)tp->cmd.ac->data)->epoch;
  for (rd_rec *r = tp->oldest; r != NULL; r = r->next)
    if (r->acked && r->ack_epoch != epoch) send_xack(tp, r);
}

/* ---- reclaiming ----------------------------------------------------------------------- */

static void xpending_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_claim *it = privdata;
  rd_chan *ch = it->chan;
  rd_tp *tp = ch->tp;
  redisReply *r = reply;
  (void)ac;
  if (r != NULL && tp->state == TP_OPEN && r->type == REDIS_REPLY_ARRAY && r->elements >= 1) {
    const redisReply *e = r->element[0];
    /* [id, consumer, idle, deliveries]; skip it if someone else owns it by now. */
    if (reply_is(e, REDIS_REPLY_ARRAY) && e->elements >= 4 &&
        reply_is(e->element[1], REDIS_REPLY_STRING) &&
        reply_is(e->element[3], REDIS_REPLY_INTEGER) && e->element[1]->len == tp->consumerlen &&
        memcmp(e->element[1]->str, tp->consumer, tp->consumerlen) == 0) {
      long long n = e->element[3]->integer;
      hand_over(ch, it->id, strlen(it->id), it->has_data, it->data, it->len,
                n > 0 ? (uint64_t)n : 1);
    }
  } else if (reply_is(r, REDIS_REPLY_ERROR) && tp->state == TP_OPEN) {
    rd_log(tp, SAGA_LOG_WARN, "redis XPENDING %s failed: %s", ch->key, r->str);
  }
  rd_free(tp, it);
}

static void claim_start(rd_chan *ch);

static void claim_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_chan *ch = privdata;
  rd_tp *tp = ch->tp;
  redisReply *r = reply;
  ch->claiming = 0;
  if (r == NULL || tp->state != TP_OPEN) return;
  if (r->type == REDIS_REPLY_ERROR) {
    if (!ch->claim_err_logged)
      rd_log(tp, SAGA_LOG_ERROR, "redis XAUTOCLAIM on %s failed (Redis >= 6.2 needed): %s", ch->key,
             r->str);
    ch->claim_err_logged = 1;
    return;
  }
  if (r->type != REDIS_REPLY_ARRAY || r->elements < 2) return;
  ch->claim_err_logged = 0;
  const redisReply *cur = r->element[0], *entries = r->element[1];
  if (reply_is(cur, REDIS_REPLY_STRING) && cur->len < RD_ID_MAX) {
    memcpy(ch->cursor, cur->str, cur->len);
    ch->cursor[cur->len] = '\0';
  } else {
    snprintf(ch->cursor, sizeof ch->cursor, "0-0");
  }
  if (reply_is(entries, REDIS_REPLY_ARRAY)) {
    for (size_t i = 0; i < entries->elements; i++) {
      const redisReply *e = entries->element[i];
      if (!reply_is(e, REDIS_REPLY_ARRAY) || e->elements < 1 ||
          !reply_is(e->element[0], REDIS_REPLY_STRING) || e->element[0]->len >= RD_ID_MAX)
        continue;
      const redisReply *d = e->elements >= 2 ? entry_data(e->element[1]) : NULL;
      if (e->elements < 2 || reply_is(e->element[1], REDIS_REPLY_NIL)) {
        /* Deleted from the stream while pending (Redis 6.2 reports these): nothing left to
         * deliver, so drop it from the pending list. */
        const char *argv[] = {"XACK", ch->key, ch->name, e->element[0]->str};
        size_t lens[] = {4, ch->keylen, ch->namelen, e->element[0]->len};
        redisAsyncCommandArgv(ac, NULL, NULL, 4, argv, lens);
        continue;
      }
      size_t len = d != NULL ? d->len : 0;
      rd_claim *it = rd_malloc(tp, sizeof *it + len);
      if (it == NULL) continue; /* claimed again after the next idle period */
      it->chan = ch;
      it->len = len;
      it->has_data = d != NULL;
      memcpy(it->id, e->element[0]->str, e->element[0]->len);
      it->id[e->element[0]->len] = '\0';
      if (len > 0) memcpy(it->data, d->str, len);
      const char *argv[] = {"XPENDING", ch->key, ch->name, it->id, it->id, "1"};
      size_t lens[] = {8, ch->keylen, ch->namelen, e->element[0]->len, e->element[0]->len, 1};
      if (redisAsyncCommandArgv(ac, xpending_cb, it, 6, argv, lens) != REDIS_OK) rd_free(tp, it);
    }
  }
  /* More of the pending list to scan: go on now. Every entry claimed had been idle for
   * claim_idle_ms, so this ends when the scan reaches the end of the list. */
  if (strcmp(ch->cursor, "0-0") != 0) claim_start(ch);
}

static void claim_start(rd_chan *ch) {
  rd_tp *tp = ch->tp;
  rd_conn *c = &tp->cmd;
  if (tp->state != TP_OPEN || c->state != C_UP || ch->claiming) return;
  const char *argv[] = {"XAUTOCLAIM", ch->key,    ch->name, tp->consumer,
                        tp->idle_s,   ch->cursor, "COUNT",  RD_CLAIM_COUNT};
  size_t lens[] = {10,
                   ch->keylen,
                   ch->namelen,
                   tp->consumerlen,
                   strlen(tp->idle_s),
                   strlen(ch->cursor),
                   5,
                   strlen(RD_CLAIM_COUNT)};
  if (redisAsyncCommandArgv(c->ac, claim_cb, ch, 8, argv, lens) == REDIS_OK) ch->claiming = 1;
}

/* ---- trimming ------------------------------------------------------------------------ */

/*
 * Drops the entries every reader is done with, atomically on the server: those older than
 * the group's oldest pending entry, or, with nothing pending, than its last-delivered id
 * (everything before it was delivered and acknowledged). Only when the stream has exactly
 * the one group named after the channel: another group might still need older entries.
 * MINID ~ trims whole internal nodes only, which keeps it cheap.
 */
static const char rd_trim_lua[] =
    "local gs = redis.call('XINFO', 'GROUPS', KEYS[1])\n"
    "if #gs ~= 1 then return -1 end\n"
    "local name, last\n"
    "for i = 1, #gs[1], 2 do\n"
    "  if gs[1][i] == 'name' then name = gs[1][i + 1] end\n"
    "  if gs[1][i] == 'last-delivered-id' then last = gs[1][i + 1] end\n"
    "end\n"
    "if name ~= ARGV[1] or last == nil then return -1 end\n"
    "local p = redis.call('XPENDING', KEYS[1], name)\n"
    "local minid = last\n"
    "if p[1] > 0 then minid = p[2] end\n"
    "return redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)\n";

static void trim_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_chan *ch = privdata;
  redisReply *r = reply;
  (void)ac;
  ch->trimming = 0;
  if (r == NULL || ch->tp->state != TP_OPEN) return;
  if (r->type == REDIS_REPLY_ERROR) {
    if (!ch->trim_err_logged)
      rd_log(ch->tp, SAGA_LOG_WARN, "redis: trimming %s failed: %s", ch->key, r->str);
    ch->trim_err_logged = 1;
  } else {
    ch->trim_err_logged = 0;
  }
}

static void trim_start(rd_chan *ch, uint64_t now) {
  rd_tp *tp = ch->tp;
  rd_conn *c = &tp->cmd;
  if (c->state != C_UP || ch->trimming || now - ch->trimmed_at < tp->trim_ms) return;
  const char *argv[] = {"EVAL", rd_trim_lua, "1", ch->key, ch->name};
  size_t lens[] = {4, sizeof rd_trim_lua - 1, 1, ch->keylen, ch->namelen};
  if (redisAsyncCommandArgv(c->ac, trim_cb, ch, 5, argv, lens) != REDIS_OK) return;
  ch->trimming = 1;
  ch->trimmed_at = now;
}

static void claim_timer_cb(uv_timer_t *h) {
  rd_tp *tp = h->data;
  if (tp->state != TP_OPEN) return;
  /* Forget deliveries the node never acknowledged within the horizon: their entries were
   * claimed again meanwhile (by us or a replica); a late ack only causes a redelivery. */
  uint64_t now = uv_now(tp->loop);
  while (tp->oldest != NULL && now - tp->oldest->at > tp->sweep_ms) rec_release(tp, tp->oldest);
  for (rd_chan *ch = tp->chans; ch != NULL && tp->state == TP_OPEN; ch = ch->next) {
    claim_start(ch);
    trim_start(ch, now);
  }
}

/* ---- sends ---------------------------------------------------------------------------- */

/* An entry id as XADD returns it: "<ms>-<seq>", both decimal. */
static int entry_id_ok(const redisReply *r) {
  if (!reply_is(r, REDIS_REPLY_STRING) || r->len < 3 || r->len >= RD_ID_MAX) return 0;
  size_t dash = 0;
  for (size_t i = 0; i < r->len; i++) {
    char ch = r->str[i];
    if (ch == '-' && dash == 0 && i > 0)
      dash = i;
    else if (ch < '0' || ch > '9')
      return 0;
  }
  return dash > 0 && dash + 1 < r->len;
}

static void xadd_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_link *l = ac->data;
  rd_tp *tp = l->tp;
  redisReply *r = reply;
  uint64_t token;
  (void)privdata;
  if (!fifo_pop(&l->tokens, &token)) return;
  set_del(&l->unanswered, token);
  /* No reply (connection lost): unknown outcome, not confirmed; the outbox resends. */
  if (r == NULL || tp->state != TP_OPEN) return;
  if (r->type == REDIS_REPLY_ERROR) {
    rd_log(tp, SAGA_LOG_WARN, "redis XADD failed: %s", r->str);
    saga_transport_sent(&tp->base, token, SAGA_ETRANSPORT);
  } else if (!entry_id_ok(r)) {
    /* Not what XADD answers: no confirmation. Said once per connection. */
    tp->stats.replies_unexpected++;
    if (!l->odd_logged)
      rd_log(tp, SAGA_LOG_WARN, "redis XADD answered with a reply of type %d, not an entry id: "
             "not counted as stored", r->type);
    l->odd_logged = 1;
    saga_transport_sent(&tp->base, token, SAGA_ETRANSPORT);
  } else {
    saga_transport_sent(&tp->base, token, SAGA_OK);
  }
}

static void dest_group_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  rd_dest *d = privdata;
  rd_link *l = ac->data;
  redisReply *r = reply;
  if (r == NULL || l->tp->state != TP_OPEN) return;
  if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "BUSYGROUP", 9) != 0) {
    rd_log(l->tp, SAGA_LOG_WARN, "redis XGROUP CREATE %s %s failed: %s", d->key, d->name, r->str);
    d->epoch = 0; /* try again with the next send */
  }
}

static rd_dest *dest_get(rd_tp *tp, const char *channel) {
  rd_dest **pp = &tp->dests;
  for (; *pp != NULL; pp = &(*pp)->next) {
    if (strcmp((*pp)->name, channel) == 0) {
      rd_dest *d = *pp;
      *pp = d->next; /* move to front: the busiest destinations stay near it */
      d->next = tp->dests;
      tp->dests = d;
      return d;
    }
  }
  rd_dest *d = rd_malloc(tp, sizeof *d);
  if (d == NULL) return NULL;
  memset(d, 0, sizeof *d);
  d->name = rd_strcat3(tp, channel, "", "");
  d->key = rd_strcat3(tp, tp->prefix, ":", channel);
  if (d->name == NULL || d->key == NULL) {
    rd_free(tp, d->name);
    rd_free(tp, d->key);
    rd_free(tp, d);
    return NULL;
  }
  d->namelen = strlen(d->name);
  d->keylen = strlen(d->key);
  d->next = tp->dests;
  tp->dests = d;
  return d;
}

/* ---- the adapter methods -------------------------------------------------------------- */

/*
 * fail_fast: one synchronous connection (AUTH when configured, then PING), closed again,
 * before anything is linked into the loop. Returns SAGA_OK when the server answered PING (or
 * answered it is still loading its data: reachable, the real connections wait for it), or
 * SAGA_ETRANSPORT with the reason logged.
 */
static int probe(rd_tp *tp) {
  struct timeval tv = {RD_CONNECT_TIMEOUT_MS / 1000, (RD_CONNECT_TIMEOUT_MS % 1000) * 1000};
  redisContext *c = redisConnectWithTimeout(tp->host, tp->port, tv);
  if (c == NULL || c->err != 0) {
    rd_log(tp, SAGA_LOG_ERROR, "redis at %s:%d cannot be reached: %s (fail_fast: open fails)",
           tp->host, tp->port, c != NULL ? c->errstr : "out of memory");
    if (c != NULL) redisFree(c);
    return SAGA_ETRANSPORT;
  }
  redisSetTimeout(c, tv);
  int rc = SAGA_OK;
  redisReply *r = NULL;
  if (tp->password != NULL) {
    const char *argv[3];
    size_t lens[3];
    int argc = 0;
    argv[argc] = "AUTH";
    lens[argc++] = 4;
    if (tp->username != NULL) {
      argv[argc] = tp->username;
      lens[argc++] = strlen(tp->username);
    }
    argv[argc] = tp->password;
    lens[argc++] = strlen(tp->password);
    r = redisCommandArgv(c, argc, argv, lens);
  } else {
    r = redisCommand(c, "PING");
  }
  if (r != NULL && r->type != REDIS_REPLY_ERROR && tp->password != NULL) {
    freeReplyObject(r);
    r = redisCommand(c, "PING");
  }
  if (r == NULL) {
    rd_log(tp, SAGA_LOG_ERROR, "redis at %s:%d does not answer: %s (fail_fast: open fails)",
           tp->host, tp->port, c->errstr);
    rc = SAGA_ETRANSPORT;
  } else if (r->type == REDIS_REPLY_ERROR && auth_error(r->str)) {
    tp->stats.auth_failures++;
    rd_log(tp, SAGA_LOG_ERROR,
           "redis at %s:%d: authentication failed%s%s%s: %s (check username/password; "
           "fail_fast: open fails)",
           tp->host, tp->port, tp->username ? " for user '" : "",
           tp->username ? tp->username : "", tp->username ? "'" : "", r->str);
    rc = SAGA_ETRANSPORT;
  } else if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "LOADING", 7) != 0) {
    rd_log(tp, SAGA_LOG_ERROR, "redis at %s:%d refused PING: %s (fail_fast: open fails)",
           tp->host, tp->port, r->str);
    rc = SAGA_ETRANSPORT;
  }
  if (r != NULL) freeReplyObject(r);
  redisFree(c);
  return rc;
}

/* Nothing can fail once the first handle is initialised: a failed open leaves nothing in the
 * loop and nothing allocated (destroy() frees the transport). */
static int tp_open(saga_transport *t, uv_loop_t *loop) {
  rd_tp *tp = (rd_tp *)t;
  if (loop == NULL) return SAGA_EINVAL;
  if (tp->state != TP_NEW) return SAGA_ESTATE;
  if (tp->fail_fast) {
    int rc = probe(tp);
    if (rc != SAGA_OK) return rc;
  }
  tp->loop = loop;
  tp->rng ^= uv_hrtime();
  if (tp->rng == 0) tp->rng = 1;
  if (uv_timer_init(loop, &tp->claim_timer) != 0) return SAGA_EIO;
  tp->claim_timer.data = tp;
  tp->nhandles++;
  conn_init(tp, &tp->cmd, NULL);
  tp->state = TP_OPEN;
  uint64_t every = tp->claim_idle_ms / 4;
  if (every < 10) every = 10;
  if (every > 5000) every = 5000;
  uv_timer_start(&tp->claim_timer, claim_timer_cb, every, every);
  /* The broker may not be up yet: open succeeds and the connection keeps trying. */
  conn_connect(&tp->cmd);
  return SAGA_OK;
}

static int tp_subscribe(saga_transport *t, const char *channel) {
  rd_tp *tp = (rd_tp *)t;
  if (channel == NULL || channel[0] == '\0') return SAGA_EINVAL;
  if (tp->state != TP_OPEN) return tp->state == TP_NEW ? SAGA_ESTATE : SAGA_ECLOSED;
  for (rd_chan *ch = tp->chans; ch != NULL; ch = ch->next)
    if (strcmp(ch->name, channel) == 0) return SAGA_OK;
  rd_chan *ch = rd_malloc(tp, sizeof *ch);
  if (ch == NULL) return SAGA_ENOMEM;
  memset(ch, 0, sizeof *ch);
  ch->tp = tp;
  ch->name = rd_strcat3(tp, channel, "", "");
  ch->key = rd_strcat3(tp, tp->prefix, ":", channel);
  if (ch->name == NULL || ch->key == NULL) {
    rd_free(tp, ch->name);
    rd_free(tp, ch->key);
    rd_free(tp, ch);
    return SAGA_ENOMEM;
  }
  ch->namelen = strlen(ch->name);
  ch->keylen = strlen(ch->key);
  snprintf(ch->cursor, sizeof ch->cursor, "0-0");
  conn_init(tp, &ch->reader, ch);
  ch->next = tp->chans;
  tp->chans = ch;
  conn_connect(&ch->reader);
  return SAGA_OK;
}

static int tp_send(saga_transport *t, const char *channel, const void *data, size_t len,
                   uint64_t token) {
  rd_tp *tp = (rd_tp *)t;
  if (channel == NULL || channel[0] == '\0' || (data == NULL && len > 0)) return SAGA_EINVAL;
  if (tp->state != TP_OPEN) return tp->state == TP_NEW ? SAGA_ESTATE : SAGA_ECLOSED;
  rd_conn *c = &tp->cmd;
  /* Down (waiting to reconnect), or connecting again after a failure (the broker is known to
   * be away): refuse now rather than accept what cannot be confirmed; the outbox keeps it.
   * While the first attempt connects (right after open, or after the connection was up),
   * hiredis buffers the commands until the connection is up. */
  if (c->ac == NULL || (c->state != C_UP && c->failing)) return SAGA_ETRANSPORT;
  rd_link *l = c->ac->data;
  /* Its XADD is still unanswered on this connection (queued while it connects, or the server
   * is slow): a second one could only add a duplicate entry. The first one's reply confirms
   * it; if the connection is lost, the next send goes out on the new one. */
  if (set_has(&l->unanswered, token)) {
    tp->stats.sends_coalesced++;
    return SAGA_OK;
  }
  rd_dest *d = dest_get(tp, channel);
  if (d == NULL) return SAGA_ENOMEM;
  if (d->epoch != l->epoch) {
    /* Same connection, so Redis runs it before the XADD below. */
    const char *gargv[] = {"XGROUP", "CREATE", d->key, d->name, "$", "MKSTREAM"};
    size_t glens[] = {6, 6, d->keylen, d->namelen, 1, 8};
    if (redisAsyncCommandArgv(c->ac, dest_group_cb, d, 6, gargv, glens) != REDIS_OK)
      return SAGA_ETRANSPORT;
    d->epoch = l->epoch;
  }
  if (set_add(tp, &l->unanswered, token) != SAGA_OK) return SAGA_ENOMEM;
  if (fifo_push(tp, &l->tokens, token) != SAGA_OK) {
    set_del(&l->unanswered, token);
    return SAGA_ENOMEM;
  }
  const char *argv[] = {"XADD", d->key, "*", "d", len > 0 ? (const char *)data : ""};
  size_t lens[] = {4, d->keylen, 1, 1, len};
  if (redisAsyncCommandArgv(c->ac, xadd_cb, NULL, 5, argv, lens) != REDIS_OK) {
    fifo_unpush(&l->tokens);
    set_del(&l->unanswered, token);
    return SAGA_ETRANSPORT;
  }
  tp->stats.xadds++;
  return SAGA_OK;
}

static void tp_ack(saga_transport *t, uint64_t tag) {
  rd_tp *tp = (rd_tp *)t;
  if (tp->state != TP_OPEN) return;
  rd_rec *r = rec_find(tp, tag);
  if (r == NULL || r->acked) return; /* unknown, repeated, or forgotten: harmless */
  r->acked = 1;
  r->chan->inflight--;
  send_xack(tp, r);
  chan_maybe_resume(r->chan);
}

/* Stops every timer and connection; the handles close asynchronously. */
static void tp_shutdown(rd_tp *tp) {
  tp->state = TP_CLOSING;
  uv_timer_stop(&tp->claim_timer);
  uv_close((uv_handle_t *)&tp->claim_timer, claim_timer_closed);
  conn_shutdown(&tp->cmd);
  for (rd_chan *ch = tp->chans; ch != NULL; ch = ch->next) conn_shutdown(&ch->reader);
}

static void tp_close(saga_transport *t) {
  rd_tp *tp = (rd_tp *)t;
  if (tp->state == TP_NEW) {
    tp->state = TP_CLOSED;
    saga_transport_closed(t);
    return;
  }
  if (tp->state != TP_OPEN) return;
  tp_shutdown(tp);
  maybe_closed(tp);
}

static void tp_free(rd_tp *tp) {
  while (tp->chans != NULL) {
    rd_chan *ch = tp->chans;
    tp->chans = ch->next;
    rd_free(tp, ch->name);
    rd_free(tp, ch->key);
    rd_free(tp, ch);
  }
  while (tp->dests != NULL) {
    rd_dest *d = tp->dests;
    tp->dests = d->next;
    rd_free(tp, d->name);
    rd_free(tp, d->key);
    rd_free(tp, d);
  }
  while (tp->oldest != NULL) {
    rd_rec *r = tp->oldest;
    tp->oldest = r->next;
    rd_free(tp, r);
  }
  while (tp->spare != NULL) {
    rd_rec *r = tp->spare;
    tp->spare = r->hnext;
    rd_free(tp, r);
  }
  rd_free(tp, tp->buckets);
  if (tp->password != NULL) memset(tp->password, 0, strlen(tp->password));
  saga_allocator a = tp->alloc;
  a.free(tp, a.ud); /* the strings share the block */
}

static void maybe_closed(rd_tp *tp) {
  if (tp->state != TP_CLOSING || tp->nhandles > 0) return;
  tp->state = TP_CLOSED;
  if (tp->destroy_pending)
    tp_free(tp);
  else
    saga_transport_closed(&tp->base);
}

static void tp_destroy(saga_transport *t) {
  rd_tp *tp = (rd_tp *)t;
  if (tp->state == TP_OPEN) tp_shutdown(tp); /* destroyed without close: no report */
  if (tp->state == TP_CLOSING) {
    /* Handles are still closing: free once they are. */
    tp->destroy_pending = 1;
    maybe_closed(tp);
    return;
  }
  tp_free(tp);
}

static int tp_connected(const rd_tp *tp) {
  if (tp->state != TP_OPEN || tp->cmd.state != C_UP) return 0;
  for (const rd_chan *ch = tp->chans; ch != NULL; ch = ch->next)
    if (ch->reader.state != C_UP) return 0;
  return 1;
}

static int tp_connected_method(saga_transport *t) { return tp_connected((const rd_tp *)t); }

static const saga_transport_methods rd_methods = {
    .version = SAGA_TRANSPORT_VERSION,
    .name = "redis",
    .open = tp_open,
    .subscribe = tp_subscribe,
    .send = tp_send,
    .ack = tp_ack,
    .close = tp_close,
    .destroy = tp_destroy,
    .connected = tp_connected_method,
};

/* ---- construction --------------------------------------------------------------------- */

/* Writes exactly size bytes at out: min(size, have) from src, zeros after (docs/abi.md). */
static void copy_sized(void *out, size_t size, const void *src, size_t have) {
  size_t n = size < have ? size : have;
  memcpy(out, src, n);
  if (size > n) memset((char *)out + n, 0, size - n);
}

/* Where the fields of each struct_version of saga_redis_config end. Frozen: a new version
 * appends its own end. */
static const size_t config_end[SAGA_REDIS_CONFIG_VERSION + 1] = {
    0,
    offsetof(saga_redis_config, username),
    offsetof(saga_redis_config, fail_fast),
    offsetof(saga_redis_config, fail_fast) + sizeof(int),
};

int saga_redis_config_init_sized(saga_redis_config *cfg, size_t size) {
  if (cfg == NULL || size < config_end[1]) return SAGA_EINVAL;
  int v = SAGA_REDIS_CONFIG_VERSION;
  while (config_end[v] > size) v--;
  saga_redis_config c;
  memset(&c, 0, sizeof c);
  c.struct_version = v;
  c.host = "127.0.0.1";
  c.port = 6379;
  c.prefix = "saga";
  c.claim_idle_ms = 30000;
  c.max_deliveries = 10;
  c.reconnect_min_ms = 50;
  c.reconnect_max_ms = 5000;
  copy_sized(cfg, size, &c, sizeof c);
  return SAGA_OK;
}

int saga_redis_transport_new(saga_transport **out, const saga_redis_config *cfg) {
  saga_redis_config c;
  if (out == NULL) return SAGA_EINVAL;
  saga_redis_config_init(&c);
  if (cfg != NULL) {
    if (cfg->struct_version == 1)
      memcpy(&c, cfg, offsetof(saga_redis_config, username)); /* the version 1 layout */
    else if (cfg->struct_version == 2)
      memcpy(&c, cfg, offsetof(saga_redis_config, fail_fast)); /* the version 2 layout */
    else if (cfg->struct_version == SAGA_REDIS_CONFIG_VERSION)
      c = *cfg;
    else
      return SAGA_EVERSION;
  }
  if (c.username != NULL && c.username[0] == '\0') c.username = NULL;
  if (c.password != NULL && c.password[0] == '\0') c.password = NULL;
  /* A user needs its password (AUTH user pass); "AUTH pass" is the default user's. */
  if (c.username != NULL && c.password == NULL) return SAGA_EINVAL;
  if (c.host == NULL || c.host[0] == '\0') c.host = "127.0.0.1";
  if (c.port == 0) c.port = 6379;
  if (c.prefix == NULL) c.prefix = "saga";
  if (c.claim_idle_ms == 0) c.claim_idle_ms = 30000;
  if (c.max_deliveries == 0) c.max_deliveries = 10;
  if (c.reconnect_min_ms == 0) c.reconnect_min_ms = 50;
  if (c.reconnect_max_ms == 0) c.reconnect_max_ms = 5000;
  if (c.port < 0 || c.port > 65535 || c.reconnect_min_ms > c.reconnect_max_ms ||
      (c.consumer != NULL && c.consumer[0] == '\0'))
    return SAGA_EINVAL;
  saga_allocator a = {lc_malloc, lc_realloc, lc_free, NULL};
  if (c.alloc != NULL) {
    if (c.alloc->malloc == NULL || c.alloc->realloc == NULL || c.alloc->free == NULL)
      return SAGA_EINVAL;
    a = *c.alloc;
  }

  /* Default consumer name: host-pid-random, distinct per replica and per restart. */
  char gen[160];
  if (c.consumer == NULL) {
    char host[96];
    size_t hl = sizeof host;
    if (uv_os_gethostname(host, &hl) != 0) snprintf(host, sizeof host, "host");
    uint64_t rnd = 0;
    if (uv_random(NULL, NULL, &rnd, sizeof rnd, 0, NULL) != 0) rnd = uv_hrtime();
    snprintf(gen, sizeof gen, "%s-%d-%016llx", host, (int)uv_os_getpid(), (unsigned long long)rnd);
    c.consumer = gen;
  }

  size_t lh = strlen(c.host) + 1, lp = strlen(c.prefix) + 1, lc = strlen(c.consumer) + 1;
  size_t lu = c.username ? strlen(c.username) + 1 : 0, lw = c.password ? strlen(c.password) + 1 : 0;
  rd_tp *tp = a.malloc(sizeof *tp + lh + lp + lc + lu + lw, a.ud);
  if (tp == NULL) return SAGA_ENOMEM;
  memset(tp, 0, sizeof *tp);
  tp->base.methods = &rd_methods;
  tp->alloc = a;
  char *s = (char *)(tp + 1);
  tp->host = memcpy(s, c.host, lh);
  tp->prefix = memcpy(s + lh, c.prefix, lp);
  tp->consumer = memcpy(s + lh + lp, c.consumer, lc);
  if (lu > 0) tp->username = memcpy(s + lh + lp + lc, c.username, lu);
  if (lw > 0) tp->password = memcpy(s + lh + lp + lc + lu, c.password, lw);
  tp->consumerlen = lc - 1;
  tp->fail_fast = c.fail_fast != 0;
  tp->port = c.port;
  tp->claim_idle_ms = c.claim_idle_ms;
  tp->max_deliveries = c.max_deliveries;
  tp->reconnect_min_ms = c.reconnect_min_ms;
  tp->reconnect_max_ms = c.reconnect_max_ms;
  tp->sweep_ms = (uint64_t)c.claim_idle_ms * 4;
  if (tp->sweep_ms < RD_MIN_SWEEP_MS) tp->sweep_ms = RD_MIN_SWEEP_MS;
  tp->trim_ms = (uint64_t)c.claim_idle_ms * 2;
  if (tp->trim_ms < 1000) tp->trim_ms = 1000;
  if (tp->trim_ms > 60000) tp->trim_ms = 60000;
  snprintf(tp->idle_s, sizeof tp->idle_s, "%u", (unsigned)c.claim_idle_ms);
  snprintf(tp->block_s, sizeof tp->block_s, "%d", RD_BLOCK_MS);
  tp->rng = (uint64_t)(uintptr_t)tp * UINT64_C(0x9E3779B97F4A7C15);
  tp->state = TP_NEW;
  *out = &tp->base;
  return SAGA_OK;
}

int saga_redis_stats_get_sized(saga_transport *t, saga_redis_stats *out, size_t size) {
  if (t == NULL || out == NULL || t->methods != &rd_methods ||
      size < offsetof(saga_redis_stats, xadds))
    return SAGA_EINVAL; /* the first version of the struct: the first two counters */
  copy_sized(out, size, &((rd_tp *)t)->stats, sizeof(saga_redis_stats));
  return SAGA_OK;
}

/* The exported function behind the macro of the same name, for programs built before the
 * struct grew: the two counters it had then. */
#undef saga_redis_stats_get
int(saga_redis_stats_get)(saga_transport *t, saga_redis_stats *out) {
  return saga_redis_stats_get_sized(t, out, offsetof(saga_redis_stats, xadds));
}

int saga_redis_connected(saga_transport *t) {
  if (t == NULL || t->methods != &rd_methods) return SAGA_EINVAL;
  return tp_connected((const rd_tp *)t);
}
