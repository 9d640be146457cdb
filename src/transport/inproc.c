/*
 * The in-process transport across threads (see saga/transport_inproc.h).
 *
 * One mutex guards the hub: its channels, the records of deliveries awaiting their ack, the
 * list of transports and every transport's inbox. A transport's inbox holds what its own
 * loop must do: deliveries and confirmations. Whoever adds to an inbox wakes the owner's
 * uv_async_t while still holding the mutex, and a transport marks itself closed under the
 * mutex before closing that handle, so no thread ever signals a closed handle. The owner's
 * async callback takes the whole inbox under the mutex and works through it unlocked, on its
 * loop thread, where the node may be called.
 *
 * Records refer to transports by id, never by pointer: an ack whose sender was destroyed
 * finds nothing to confirm. Written only against saga/sys/transport.h, as a third-party
 * adapter would be.
 *
 * Bounds: every delivery the hub holds (waiting on its channel for a subscriber, or in a
 * receiver's inbox not yet taken by its loop) is in a hash by (sender, token); a send of a
 * token still held adds nothing and succeeds (the outbox resends unconfirmed messages every
 * resend_ms, and the copy held goes out in its place). A channel holds at most max_messages
 * deliveries and max_bytes payload bytes; past either, send() refuses with SAGA_EBUSY
 * (transient: the node resends later), logged once until the channel empties. An empty
 * channel always takes one message.
 *
 * Lifecycle: the transport's one handle is its uv_async_t. close() (or destroy() of a
 * transport left open) hands it to uv_close(); destroy() while that close is under way only
 * marks the transport, and the close callback frees it (and reports nothing to the host).
 */
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "../internal.h"
#include "saga/transport_inproc.h"

typedef struct ip_chan ip_chan;
typedef struct ip_tp ip_tp;

/* A message on its way, or an inbox entry: a delivery (chan != NULL) or a confirmation. */
typedef struct ip_msg {
  struct ip_msg *next;
  struct ip_msg *hnext; /* deliveries: in the hub's hash of held messages */
  ip_chan *chan;   /* delivery: its channel; NULL: a confirmation of `token` */
  uint64_t tag;    /* delivery tag */
  uint64_t sender; /* transport id */
  uint64_t token;
  size_t len;
  unsigned char data[];
} ip_msg;

typedef struct ip_q {
  ip_msg *head, *tail;
} ip_q;

struct ip_chan {
  ip_chan *next;
  char *name;
  ip_tp **subs;
  size_t nsubs, cap, rr;
  ip_q waiting; /* sent while nobody subscribed */
  size_t held, held_bytes; /* deliveries held: waiting here or in an inbox */
  uint64_t deduplicated, refused;
  int full_logged; /* the limit was reported; again only once the channel emptied */
};

/* A delivery awaiting its ack: who sent it with which token, who received it. */
typedef struct ip_rec {
  struct ip_rec *next;
  uint64_t tag, sender, receiver, token;
} ip_rec;

struct saga_inproc_hub {
  saga_allocator alloc;
  uv_mutex_t mu;
  ip_chan *chans;
  ip_tp *tps;
  uint64_t next_id, next_tag;
  ip_rec **buckets;
  size_t nbuckets, nrecs;
  ip_msg **held; /* (sender, token) -> deliveries held; power-of-two size, or none yet */
  size_t nheld_buckets, nheld;
  size_t max_messages, max_bytes; /* per channel */
};

enum { TP_NEW, TP_OPEN, TP_CLOSED };

struct ip_tp {
  saga_transport base; /* first */
  saga_inproc_hub *hub;
  ip_tp *prev, *next;
  uint64_t id;
  int state;     /* under the hub's mutex once opened */
  int closing;   /* the async handle was handed to uv_close(); its callback has not run */
  int destroyed; /* destroy() was called: the close callback frees */
  uv_async_t async;
  ip_q inbox;    /* under the hub's mutex */
};

static void q_push(ip_q *q, ip_msg *m) {
  m->next = NULL;
  if (q->tail != NULL)
    q->tail->next = m;
  else
    q->head = m;
  q->tail = m;
}

/* ---- deliveries held, by (sender, token) (under the mutex) ------------------------------- */

static size_t held_slot(const saga_inproc_hub *hub, uint64_t sender, uint64_t token) {
  uint64_t k = token ^ (sender * 0x9e3779b97f4a7c15ULL);
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return (size_t)k & (hub->nheld_buckets - 1);
}

static void held_grow(saga_inproc_hub *hub) {
  size_t n = hub->nheld_buckets ? hub->nheld_buckets * 2 : 64;
  ip_msg **b = saga__calloc(&hub->alloc, n * sizeof *b);
  if (b == NULL) return; /* longer chains (or, with no table yet, the caller copes) */
  ip_msg **old = hub->held;
  size_t nold = hub->nheld_buckets;
  hub->held = b;
  hub->nheld_buckets = n;
  for (size_t i = 0; i < nold; i++) {
    for (ip_msg *m = old[i], *next; m != NULL; m = next) {
      next = m->hnext;
      size_t j = held_slot(hub, m->sender, m->token);
      m->hnext = b[j];
      b[j] = m;
    }
  }
  saga__free(&hub->alloc, old);
}

static int held_has(const saga_inproc_hub *hub, uint64_t sender, uint64_t token) {
  if (hub->nheld_buckets == 0) return 0;
  for (ip_msg *m = hub->held[held_slot(hub, sender, token)]; m != NULL; m = m->hnext)
    if (m->sender == sender && m->token == token) return 1;
  return 0;
}

/* Holds the delivery m (m->chan set): counted on its channel, found by sender and token. */
static int held_add(saga_inproc_hub *hub, ip_msg *m) {
  if (hub->nheld >= hub->nheld_buckets) held_grow(hub);
  if (hub->nheld_buckets == 0) return SAGA_ENOMEM;
  size_t j = held_slot(hub, m->sender, m->token);
  m->hnext = hub->held[j];
  hub->held[j] = m;
  hub->nheld++;
  m->chan->held++;
  m->chan->held_bytes += m->len;
  return SAGA_OK;
}

/* Lets go of a delivery taken out of the hub (handed to its node, or freed). */
static void held_remove(saga_inproc_hub *hub, ip_msg *m) {
  if (m->chan == NULL) return; /* a confirmation: never held */
  ip_msg **pp = &hub->held[held_slot(hub, m->sender, m->token)];
  while (*pp != NULL && *pp != m) pp = &(*pp)->hnext;
  if (*pp == m) *pp = m->hnext;
  hub->nheld--;
  ip_chan *c = m->chan;
  c->held--;
  c->held_bytes -= m->len;
  if (c->held == 0) c->full_logged = 0;
}

static int chan_has_room(const saga_inproc_hub *hub, const ip_chan *c, size_t len) {
  if (c->held == 0) return 1; /* one message always fits: none is refused for ever */
  return c->held < hub->max_messages && len <= hub->max_bytes &&
         c->held_bytes <= hub->max_bytes - len;
}

/* Frees the messages of q (under the mutex). */
static void q_free(saga_inproc_hub *hub, ip_q *q) {
  for (ip_msg *m = q->head, *n; m != NULL; m = n) {
    n = m->next;
    held_remove(hub, m);
    saga__free(&hub->alloc, m);
  }
  q->head = q->tail = NULL;
}

/* ---- records (under the mutex) ------------------------------------------------------------ */

static int recs_grow(saga_inproc_hub *hub) {
  size_t nb = hub->nbuckets ? hub->nbuckets * 2 : 1024;
  ip_rec **b = saga__calloc(&hub->alloc, nb * sizeof *b);
  if (b == NULL) return SAGA_ENOMEM;
  for (size_t i = 0; i < hub->nbuckets; i++) {
    for (ip_rec *r = hub->buckets[i], *n; r != NULL; r = n) {
      n = r->next;
      r->next = b[r->tag & (nb - 1)];
      b[r->tag & (nb - 1)] = r;
    }
  }
  saga__free(&hub->alloc, hub->buckets);
  hub->buckets = b;
  hub->nbuckets = nb;
  return SAGA_OK;
}

static int recs_add(saga_inproc_hub *hub, ip_rec *r) {
  if (hub->nrecs >= hub->nbuckets && recs_grow(hub) != SAGA_OK && hub->nbuckets == 0)
    return SAGA_ENOMEM;
  ip_rec **slot = &hub->buckets[r->tag & (hub->nbuckets - 1)];
  r->next = *slot;
  *slot = r;
  hub->nrecs++;
  return SAGA_OK;
}

/* Removes and returns the record of tag, if receiver holds it. */
static ip_rec *recs_take(saga_inproc_hub *hub, uint64_t tag, uint64_t receiver) {
  if (hub->nbuckets == 0) return NULL;
  for (ip_rec **pp = &hub->buckets[tag & (hub->nbuckets - 1)]; *pp != NULL; pp = &(*pp)->next) {
    ip_rec *r = *pp;
    if (r->tag == tag && r->receiver == receiver) {
      *pp = r->next;
      hub->nrecs--;
      return r;
    }
  }
  return NULL;
}

/* ---- routing (under the mutex) ------------------------------------------------------------ */

static ip_chan *chan_get(saga_inproc_hub *hub, const char *name) {
  for (ip_chan *c = hub->chans; c != NULL; c = c->next)
    if (strcmp(c->name, name) == 0) return c;
  ip_chan *c = saga__calloc(&hub->alloc, sizeof *c);
  if (c == NULL) return NULL;
  c->name = saga__strdup(&hub->alloc, name);
  if (c->name == NULL) {
    saga__free(&hub->alloc, c);
    return NULL;
  }
  c->next = hub->chans;
  hub->chans = c;
  return c;
}

static ip_tp *tp_find(saga_inproc_hub *hub, uint64_t id) {
  for (ip_tp *t = hub->tps; t != NULL; t = t->next)
    if (t->id == id) return t->state == TP_OPEN ? t : NULL;
  return NULL;
}

/* Puts m in the inbox of tp and wakes its loop. */
static void post(ip_tp *tp, ip_msg *m) {
  q_push(&tp->inbox, m);
  uv_async_send(&tp->async);
}

/* Hands a delivery to the channel's next subscriber, recording who must confirm it; with no
 * subscriber (or no memory for the record) it waits on the channel. */
static void route(saga_inproc_hub *hub, ip_chan *c, ip_msg *m) {
  if (c->nsubs == 0) {
    q_push(&c->waiting, m);
    return;
  }
  ip_tp *to = c->subs[c->rr++ % c->nsubs];
  ip_rec *r = saga__malloc(&hub->alloc, sizeof *r);
  if (r == NULL) {
    q_push(&c->waiting, m);
    return;
  }
  m->tag = ++hub->next_tag;
  r->tag = m->tag;
  r->sender = m->sender;
  r->receiver = to->id;
  r->token = m->token;
  if (recs_add(hub, r) != SAGA_OK) {
    saga__free(&hub->alloc, r);
    q_push(&c->waiting, m);
    return;
  }
  post(to, m);
}

/* Forgets tp's subscriptions and the deliveries it holds (their senders resend). */
static void detach(saga_inproc_hub *hub, ip_tp *tp) {
  for (ip_chan *c = hub->chans; c != NULL; c = c->next) {
    for (size_t i = 0; i < c->nsubs; i++) {
      if (c->subs[i] == tp) {
        c->subs[i] = c->subs[--c->nsubs];
        break;
      }
    }
  }
  for (size_t i = 0; i < hub->nbuckets; i++) {
    ip_rec **pp = &hub->buckets[i];
    while (*pp != NULL) {
      ip_rec *r = *pp;
      if (r->receiver == tp->id) {
        *pp = r->next;
        hub->nrecs--;
        saga__free(&hub->alloc, r);
      } else {
        pp = &r->next;
      }
    }
  }
  q_free(hub, &tp->inbox);
}

/* ---- the loop side ------------------------------------------------------------------------ */

static void async_cb(uv_async_t *h) {
  ip_tp *tp = h->data;
  saga_inproc_hub *hub = tp->hub;
  uv_mutex_lock(&hub->mu);
  ip_msg *m = NULL;
  if (tp->state == TP_OPEN) { /* else the inbox was freed by the close */
    m = tp->inbox.head;
    tp->inbox.head = tp->inbox.tail = NULL;
    for (ip_msg *x = m; x != NULL; x = x->next) held_remove(hub, x); /* now the node's */
  }
  uv_mutex_unlock(&hub->mu);
  while (m != NULL) {
    ip_msg *next = m->next;
    if (m->chan == NULL) {
      saga_transport_sent(&tp->base, m->token, SAGA_OK);
    } else if (saga_transport_deliver(&tp->base, m->chan->name, m->data, m->len, m->tag) !=
               SAGA_OK) {
      /* Refused (the node is closing or out of memory): no ack will come; the sender's
       * outbox resends it. */
      uv_mutex_lock(&hub->mu);
      saga__free(&hub->alloc, recs_take(hub, m->tag, tp->id));
      uv_mutex_unlock(&hub->mu);
    }
    saga__free(&hub->alloc, m);
    m = next;
  }
}

/* ---- the adapter methods ------------------------------------------------------------------ */

/* Under the mutex: the channel an open transport may use, or NULL with *rc set. */
static ip_chan *usable_chan(ip_tp *tp, const char *channel, int *rc) {
  if (tp->state != TP_OPEN) {
    *rc = tp->state == TP_CLOSED ? SAGA_ECLOSED : SAGA_ESTATE;
    return NULL;
  }
  ip_chan *c = chan_get(tp->hub, channel);
  *rc = c != NULL ? SAGA_OK : SAGA_ENOMEM;
  return c;
}

static int tp_open(saga_transport *t, uv_loop_t *loop) {
  ip_tp *tp = (ip_tp *)t;
  if (loop == NULL) return SAGA_EINVAL;
  if (tp->state != TP_NEW) return SAGA_ESTATE;
  /* The only handle. A uv_async_init that fails leaves nothing linked into the loop, so the
   * open fails with nothing to close: destroy() alone is enough. */
  int rc = uv_async_init(loop, &tp->async, async_cb);
  if (rc != 0) {
    char msg[160];
    snprintf(msg, sizeof msg, "inproc: cannot open: uv_async_init failed: %s", uv_strerror(rc));
    saga_transport_log(t, SAGA_LOG_ERROR, msg);
    return rc == UV_ENOMEM ? SAGA_ENOMEM : SAGA_ETRANSPORT;
  }
  tp->async.data = tp;
  uv_mutex_lock(&tp->hub->mu);
  tp->state = TP_OPEN;
  uv_mutex_unlock(&tp->hub->mu);
  return SAGA_OK;
}

static int tp_subscribe(saga_transport *t, const char *channel) {
  ip_tp *tp = (ip_tp *)t;
  saga_inproc_hub *hub = tp->hub;
  if (channel == NULL) return SAGA_EINVAL;
  int rc;
  uv_mutex_lock(&hub->mu);
  ip_chan *c = usable_chan(tp, channel, &rc);
  if (c != NULL) {
    size_t i = 0;
    while (i < c->nsubs && c->subs[i] != tp) i++;
    if (i == c->nsubs) {
      if (c->nsubs == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 4;
        ip_tp **subs = saga__realloc(&hub->alloc, c->subs, cap * sizeof *subs);
        if (subs == NULL) rc = SAGA_ENOMEM;
        else {
          c->subs = subs;
          c->cap = cap;
        }
      }
      if (rc == SAGA_OK) {
        c->subs[c->nsubs++] = tp;
        /* What waited for a consumer goes out now, in order. */
        ip_msg *m = c->waiting.head;
        c->waiting.head = c->waiting.tail = NULL;
        while (m != NULL) {
          ip_msg *next = m->next;
          route(hub, c, m);
          m = next;
        }
      }
    }
  }
  uv_mutex_unlock(&hub->mu);
  return rc;
}

static int tp_send(saga_transport *t, const char *channel, const void *data, size_t len,
                   uint64_t token) {
  ip_tp *tp = (ip_tp *)t;
  saga_inproc_hub *hub = tp->hub;
  if (channel == NULL || (data == NULL && len > 0)) return SAGA_EINVAL;
  ip_msg *m = saga__malloc(&hub->alloc, sizeof *m + len);
  if (m == NULL) return SAGA_ENOMEM;
  m->sender = tp->id;
  m->token = token;
  m->len = len;
  if (len > 0) memcpy(m->data, data, len);
  int rc;
  char full[512] = "";
  uv_mutex_lock(&hub->mu);
  ip_chan *c = usable_chan(tp, channel, &rc);
  if (c != NULL) {
    m->chan = c;
    if (held_has(hub, tp->id, token)) {
      /* A resend of a message the hub still holds: that copy goes out in its place. */
      c->deduplicated++;
    } else if (!chan_has_room(hub, c, len)) {
      c->refused++;
      rc = SAGA_EBUSY;
      if (!c->full_logged) {
        c->full_logged = 1;
        snprintf(full, sizeof full, "inproc hub: channel '%.120s' holds %zu messages (%zu "
                 "bytes), its limit (max_messages %zu, max_bytes %zu): sends to it are refused "
                 "with SAGA_EBUSY and resent later (logged once until the channel empties)",
                 c->name, c->held, c->held_bytes, hub->max_messages, hub->max_bytes);
      }
    } else if ((rc = held_add(hub, m)) == SAGA_OK) {
      route(hub, c, m);
      m = NULL;
    }
  }
  uv_mutex_unlock(&hub->mu);
  saga__free(&hub->alloc, m); /* not taken (deduplicated or refused) */
  if (full[0] != '\0') saga_transport_log(t, SAGA_LOG_WARN, full); /* outside the lock */
  return rc;
}

static void tp_ack(saga_transport *t, uint64_t tag) {
  ip_tp *tp = (ip_tp *)t;
  saga_inproc_hub *hub = tp->hub;
  ip_msg *conf = saga__malloc(&hub->alloc, sizeof *conf);
  uv_mutex_lock(&hub->mu);
  ip_rec *r = tp->state == TP_OPEN ? recs_take(hub, tag, tp->id) : NULL;
  ip_tp *sender = r != NULL ? tp_find(hub, r->sender) : NULL;
  if (sender != NULL && conf != NULL) {
    conf->chan = NULL;
    conf->token = r->token;
    conf->len = 0;
    post(sender, conf);
    conf = NULL;
  }
  /* Without memory for the confirmation the sender resends; the receiver deduplicates. */
  uv_mutex_unlock(&hub->mu);
  saga__free(&hub->alloc, r);
  saga__free(&hub->alloc, conf);
}

/* Unlinks tp from its hub and frees it. */
static void tp_free(ip_tp *tp) {
  saga_inproc_hub *hub = tp->hub;
  uv_mutex_lock(&hub->mu);
  if (tp->prev != NULL)
    tp->prev->next = tp->next;
  else
    hub->tps = tp->next;
  if (tp->next != NULL) tp->next->prev = tp->prev;
  uv_mutex_unlock(&hub->mu);
  saga__free(&hub->alloc, tp);
}

static void on_async_closed(uv_handle_t *h) {
  ip_tp *tp = h->data;
  tp->closing = 0;
  if (tp->destroyed)
    tp_free(tp); /* the host let go: nothing is reported to it */
  else
    saga_transport_closed(&tp->base);
}

/* Marks tp closed and forgets it in the hub; returns 1 if its handle must now be closed (it
 * was open), 0 if there is none, -1 if it was closed already. */
static int tp_shut(ip_tp *tp) {
  saga_inproc_hub *hub = tp->hub;
  uv_mutex_lock(&hub->mu);
  int r = tp->state == TP_OPEN ? 1 : tp->state == TP_NEW ? 0 : -1;
  if (tp->state != TP_CLOSED) detach(hub, tp);
  tp->state = TP_CLOSED;
  uv_mutex_unlock(&hub->mu);
  return r;
}

static void tp_close(saga_transport *t) {
  ip_tp *tp = (ip_tp *)t;
  int r = tp_shut(tp);
  if (r < 0) return; /* twice: nothing more */
  /* Nobody signals the handle any more (state is CLOSED under the mutex). */
  if (r > 0) {
    tp->closing = 1;
    uv_close((uv_handle_t *)&tp->async, on_async_closed);
  } else {
    saga_transport_closed(t);
  }
}

/* Safe at any time: never opened, after a failed open, after close() whether or not its
 * callback ran, even while open (the handle is then closed here). Frees at once, or from the
 * close callback when the handle is still closing. */
static void tp_destroy(saga_transport *t) {
  ip_tp *tp = (ip_tp *)t;
  tp->destroyed = 1;
  if (tp_shut(tp) > 0) { /* destroyed while open */
    tp->closing = 1;
    uv_close((uv_handle_t *)&tp->async, on_async_closed);
  }
  if (!tp->closing) tp_free(tp);
}

/* Every channel is reachable: messages for a channel nobody consumes wait on it until a
 * transport of the hub subscribes (a node opened later, on any thread). No lock needed. */
static int tp_can_send(saga_transport *t, const char *channel) {
  (void)t;
  return channel != NULL;
}

static const saga_transport_methods inproc_methods = {
    .version = SAGA_TRANSPORT_VERSION,
    .name = "inproc",
    .open = tp_open,
    .subscribe = tp_subscribe,
    .send = tp_send,
    .ack = tp_ack,
    .close = tp_close,
    .destroy = tp_destroy,
    .can_send = tp_can_send,
};

/* ---- the hub ------------------------------------------------------------------------------ */

int saga_inproc_hub_new(saga_inproc_hub **out, const saga_allocator *alloc) {
  if (out == NULL) return SAGA_EINVAL;
  *out = NULL;
  const saga_allocator *a = saga__alloc_resolve(alloc);
  saga_inproc_hub *hub = saga__calloc(a, sizeof *hub);
  if (hub == NULL) return SAGA_ENOMEM;
  hub->alloc = *a;
  hub->max_messages = SAGA_INPROC_CHANNEL_MAX_MESSAGES;
  hub->max_bytes = SAGA_INPROC_CHANNEL_MAX_BYTES;
  if (uv_mutex_init(&hub->mu) != 0) {
    saga__free(a, hub);
    return SAGA_ENOMEM;
  }
  *out = hub;
  return SAGA_OK;
}

int saga_inproc_hub_free(saga_inproc_hub *hub) {
  if (hub == NULL) return SAGA_OK;
  uv_mutex_lock(&hub->mu);
  int busy = hub->tps != NULL;
  uv_mutex_unlock(&hub->mu);
  if (busy) return SAGA_EBUSY;
  for (ip_chan *c = hub->chans, *n; c != NULL; c = n) {
    n = c->next;
    q_free(hub, &c->waiting);
    saga__free(&hub->alloc, c->subs);
    saga__free(&hub->alloc, c->name);
    saga__free(&hub->alloc, c);
  }
  for (size_t i = 0; i < hub->nbuckets; i++)
    for (ip_rec *r = hub->buckets[i], *n; r != NULL; r = n) {
      n = r->next;
      saga__free(&hub->alloc, r);
    }
  saga__free(&hub->alloc, hub->buckets);
  saga__free(&hub->alloc, hub->held);
  uv_mutex_destroy(&hub->mu);
  saga_allocator a = hub->alloc;
  saga__free(&a, hub);
  return SAGA_OK;
}

int saga_inproc_hub_set_limits(saga_inproc_hub *hub, size_t max_messages, size_t max_bytes) {
  if (hub == NULL) return SAGA_EINVAL;
  uv_mutex_lock(&hub->mu);
  hub->max_messages = max_messages ? max_messages : SAGA_INPROC_CHANNEL_MAX_MESSAGES;
  hub->max_bytes = max_bytes ? max_bytes : SAGA_INPROC_CHANNEL_MAX_BYTES;
  uv_mutex_unlock(&hub->mu);
  return SAGA_OK;
}

int saga_inproc_hub_queue_stats(saga_inproc_hub *hub, const char *channel,
                                saga_inproc_queue_stats *out, size_t size) {
  if (hub == NULL || out == NULL ||
      size < offsetof(saga_inproc_queue_stats, refused) + sizeof(uint64_t))
    return SAGA_EINVAL; /* below the first version of the struct */
  saga_inproc_queue_stats q;
  memset(&q, 0, sizeof q);
  uv_mutex_lock(&hub->mu);
  for (const ip_chan *c = hub->chans; c != NULL; c = c->next) {
    if (channel != NULL && strcmp(c->name, channel) != 0) continue;
    q.messages += c->held;
    q.bytes += c->held_bytes;
    q.deduplicated += c->deduplicated;
    q.refused += c->refused;
  }
  uv_mutex_unlock(&hub->mu);
  saga__copy_sized(out, size, &q, sizeof q);
  return SAGA_OK;
}

int saga_inproc_transport_new(saga_transport **out, saga_inproc_hub *hub) {
  if (out == NULL || hub == NULL) return SAGA_EINVAL;
  *out = NULL;
  ip_tp *tp = saga__calloc(&hub->alloc, sizeof *tp);
  if (tp == NULL) return SAGA_ENOMEM;
  tp->base.methods = &inproc_methods;
  tp->hub = hub;
  tp->state = TP_NEW;
  uv_mutex_lock(&hub->mu);
  tp->id = ++hub->next_id;
  tp->next = hub->tps;
  if (hub->tps != NULL) hub->tps->prev = tp;
  hub->tps = tp;
  uv_mutex_unlock(&hub->mu);
  *out = &tp->base;
  return SAGA_OK;
}
