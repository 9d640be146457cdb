/*
 * The in-memory transport: a hub on one loop plays the network between the transports
 * attached to it, with seeded fault injection.
 *
 * It is written only against saga/sys/transport.h (plus the clock internals), exactly as a
 * third-party adapter would be.
 *
 * Life of a message: send() copies it into the hub and decides its faults at once (drop,
 * duplicate, then for each copy delay and reorder), so every random draw happens in the
 * order of the operations and a seed replays the run. A copy is either delayed (on the hub's
 * saga__timer) or ready. Ready messages are delivered from a uv_idle_t callback, which is
 * active only while there is something to deliver or to confirm: with a manual clock the hub
 * keeps the loop alive only while it has work. A message for a channel that no transport
 * consumes (or whose consumers all refused it) is parked on the channel until a transport
 * subscribes to it. Each delivery gets a hub-unique tag remembered with the sender and token;
 * the receiver's ack(tag) queues the confirmation, reported to the sender from the idle
 * callback with saga_transport_sent().
 *
 * Deliveries, confirmations and messages refer to transports by id, never by pointer, so a
 * closed transport is simply not found any more: nothing can call into it. The only
 * pointers, in the channels' subscriber lists, are removed when it closes.
 *
 * Stats: `acked` counts acknowledgements the hub received for deliveries it knew;
 * `acks_dropped` how many of those the fault mode lost on their way back.
 *
 * Bounds: a node's outbox resends every unconfirmed message each resend_ms, and a channel
 * nobody consumes would otherwise collect a copy per resend. Every message the hub holds
 * (ready, delayed or parked) is in a hash by (sender, token): send() of a token whose
 * message is still held adds nothing and reports success (the copy held will be delivered
 * and acknowledged in its place). Fault duplicates are made after that check, so the fault
 * mode still duplicates. A channel holds at most max_messages messages and max_bytes payload
 * bytes (saga_mem_hub_set_limits); past either, send() refuses with SAGA_EBUSY (transient:
 * the node resends later) and logs it once until the channel empties. One message is always
 * taken on an empty channel, so no message is refused for ever.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../internal.h"
#include "saga/transport_mem.h"

typedef struct mem_msg mem_msg;
typedef struct mem_chan mem_chan;
typedef struct mem_rec mem_rec;
typedef struct mem_tp mem_tp;

struct mem_msg {
  mem_msg *next;
  mem_msg *hnext; /* in the hub's hash of held messages */
  mem_chan *chan;
  uint64_t sender; /* transport id */
  uint64_t token;
  uint64_t ready_at;    /* delayed messages */
  uint64_t reorder_pos; /* random draw for the insert position, when reorder is set */
  int reorder;
  size_t len;
  unsigned char data[];
};

/* A FIFO of messages. */
typedef struct mem_q {
  mem_msg *head, *tail;
  size_t count;
} mem_q;

struct mem_chan {
  mem_chan *next;
  char *name;
  mem_tp **subs;
  size_t nsubs, cap;
  size_t rr;   /* index of the subscriber that gets the next message */
  mem_q parked; /* messages no subscriber took yet, in order */
  size_t held, held_bytes; /* messages of this channel in the hub (ready, delayed, parked) */
  uint64_t deduplicated, refused;
  int full_logged; /* the limit was reported; again only once the channel emptied */
};

/* A delivery awaiting its ack (in the tag table), then a confirmation awaiting its report
 * (in the ack queue), then a spare (in the free list): `next` links whichever it is in. */
struct mem_rec {
  mem_rec *next;
  uint64_t tag, sender, receiver, token;
};

enum { TP_NEW = 0, TP_OPEN = 1, TP_CLOSED = 2 };

struct mem_tp {
  saga_transport base; /* first, as the adapter interface requires */
  saga_mem_hub *hub;
  mem_tp *prev, *next; /* in the hub's list of transports not yet destroyed */
  uint64_t id;
  int state;
};

struct saga_mem_hub {
  saga_allocator alloc;
  uv_loop_t *loop;
  saga_clock *clock;
  int own_clock;
  int closing;
  uv_idle_t idle;
  saga__timer timer; /* armed at the earliest ready_at of `delayed` */
  saga_mem_faults faults;
  uint64_t rng;
  saga_mem_stats stats;
  mem_tp *tps;
  uint64_t next_tp_id, next_tag;
  mem_chan *chans;
  mem_q ready;
  mem_msg *delayed; /* sorted by ready_at, ties in send order */
  mem_rec **buckets; /* tag -> delivery awaiting ack; power-of-two size */
  size_t nbuckets, nrecs;
  mem_rec *acks_head, *acks_tail; /* confirmations to report, in ack order */
  size_t nacks;
  mem_rec *spare;
  mem_msg **held; /* (sender, token) -> messages held; power-of-two size */
  size_t nheld_buckets, nheld;
  size_t max_messages, max_bytes; /* per channel */
};

#define MEM_INITIAL_BUCKETS 64

/* ---- small helpers -------------------------------------------------------------------- */

static void q_push(mem_q *q, mem_msg *m) {
  m->next = NULL;
  if (q->tail != NULL)
    q->tail->next = m;
  else
    q->head = m;
  q->tail = m;
  q->count++;
}

static mem_msg *q_pop(mem_q *q) {
  mem_msg *m = q->head;
  if (m == NULL) return NULL;
  q->head = m->next;
  if (q->head == NULL) q->tail = NULL;
  q->count--;
  m->next = NULL;
  return m;
}

/* Inserts m so that pos messages stay ahead of it (pos <= count). */
static void q_insert_at(mem_q *q, mem_msg *m, size_t pos) {
  if (pos >= q->count) {
    q_push(q, m);
    return;
  }
  if (pos == 0) {
    m->next = q->head;
    q->head = m;
  } else {
    mem_msg *p = q->head;
    for (size_t i = 1; i < pos; i++) p = p->next;
    m->next = p->next;
    p->next = m;
  }
  q->count++;
}

/* Moves all of src in front of dst, keeping src's order. */
static void q_prepend_all(mem_q *dst, mem_q *src) {
  if (src->head == NULL) return;
  src->tail->next = dst->head;
  if (dst->tail == NULL) dst->tail = src->tail;
  dst->head = src->head;
  dst->count += src->count;
  src->head = src->tail = NULL;
  src->count = 0;
}

static uint64_t rng_next(saga_mem_hub *hub) { return saga__splitmix64(&hub->rng); }

/* One fault decision. No draw at all for a probability of zero, so a fault-free hub uses no
 * randomness and turning one fault on does not disturb the others' absence. */
static int roll(saga_mem_hub *hub, double p) {
  if (!(p > 0.0)) return 0;
  double r = (double)(rng_next(hub) >> 11) * 0x1.0p-53; /* uniform in [0, 1) */
  return r < p;
}

static double clamp01(double p) {
  if (isnan(p) || p < 0.0) return 0.0;
  return p > 1.0 ? 1.0 : p;
}

static int prob_ok(double p) { return !isnan(p) && p >= 0.0 && p <= 1.0; }

static int faults_ok(const saga_mem_faults *f) {
  return prob_ok(f->drop) && prob_ok(f->duplicate) && prob_ok(f->reorder) &&
         prob_ok(f->delay) && prob_ok(f->drop_ack);
}

static void set_faults(saga_mem_hub *hub, const saga_mem_faults *f) {
  memset(&hub->faults, 0, sizeof hub->faults);
  if (f != NULL) {
    hub->faults = *f;
    hub->faults.drop = clamp01(f->drop);
    hub->faults.duplicate = clamp01(f->duplicate);
    hub->faults.reorder = clamp01(f->reorder);
    hub->faults.delay = clamp01(f->delay);
    hub->faults.drop_ack = clamp01(f->drop_ack);
  }
  hub->rng = hub->faults.seed;
}

static mem_tp *tp_find_open(saga_mem_hub *hub, uint64_t id) {
  for (mem_tp *t = hub->tps; t != NULL; t = t->next)
    if (t->id == id) return t->state == TP_OPEN ? t : NULL;
  return NULL;
}

/* Starts the idle handle while there is work, stops it otherwise. */
static void idle_update(saga_mem_hub *hub);

/* ---- messages held, by (sender, token) ------------------------------------------------- */

static size_t held_slot(const saga_mem_hub *hub, uint64_t sender, uint64_t token) {
  uint64_t k = token ^ (sender * 0x9e3779b97f4a7c15ULL);
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return (size_t)k & (hub->nheld_buckets - 1);
}

static void held_grow(saga_mem_hub *hub) {
  size_t n = hub->nheld_buckets * 2;
  mem_msg **b = saga__calloc(&hub->alloc, n * sizeof *b);
  if (b == NULL) return; /* longer chains, still correct */
  mem_msg **old = hub->held;
  size_t nold = hub->nheld_buckets;
  hub->held = b;
  hub->nheld_buckets = n;
  for (size_t i = 0; i < nold; i++) {
    mem_msg *m = old[i];
    while (m != NULL) {
      mem_msg *next = m->hnext;
      size_t j = held_slot(hub, m->sender, m->token);
      m->hnext = b[j];
      b[j] = m;
      m = next;
    }
  }
  saga__free(&hub->alloc, old);
}

static int held_has(const saga_mem_hub *hub, uint64_t sender, uint64_t token) {
  for (mem_msg *m = hub->held[held_slot(hub, sender, token)]; m != NULL; m = m->hnext)
    if (m->sender == sender && m->token == token) return 1;
  return 0;
}

static void held_remove(saga_mem_hub *hub, mem_msg *m) {
  mem_msg **pp = &hub->held[held_slot(hub, m->sender, m->token)];
  while (*pp != NULL && *pp != m) pp = &(*pp)->hnext;
  if (*pp == m) *pp = m->hnext;
  hub->nheld--;
}

/* Whether chan can take one more message of len bytes under the hub's limits. */
static int chan_has_room(const saga_mem_hub *hub, const mem_chan *c, size_t len) {
  if (c->held == 0) return 1; /* one message always fits: none is refused for ever */
  return c->held < hub->max_messages && len <= hub->max_bytes &&
         c->held_bytes <= hub->max_bytes - len;
}

/* ---- messages ------------------------------------------------------------------------- */

/* A copy of data, held by the hub (counted on its channel, found by sender and token) until
 * msg_free. */
static mem_msg *msg_new(saga_mem_hub *hub, mem_chan *chan, uint64_t sender, uint64_t token,
                        const void *data, size_t len) {
  if (len > SIZE_MAX - sizeof(mem_msg)) return NULL;
  mem_msg *m = saga__malloc(&hub->alloc, sizeof *m + len);
  if (m == NULL) return NULL;
  memset(m, 0, sizeof *m);
  m->chan = chan;
  m->sender = sender;
  m->token = token;
  m->len = len;
  if (len > 0) memcpy(m->data, data, len);
  if (hub->nheld >= hub->nheld_buckets) held_grow(hub);
  size_t j = held_slot(hub, sender, token);
  m->hnext = hub->held[j];
  hub->held[j] = m;
  hub->nheld++;
  chan->held++;
  chan->held_bytes += len;
  hub->stats.waiting++;
  return m;
}

static void msg_free(saga_mem_hub *hub, mem_msg *m) {
  held_remove(hub, m);
  mem_chan *c = m->chan;
  c->held--;
  c->held_bytes -= m->len;
  if (c->held == 0) c->full_logged = 0;
  hub->stats.waiting--;
  saga__free(&hub->alloc, m);
}

static void make_ready(saga_mem_hub *hub, mem_msg *m) {
  if (m->reorder && hub->ready.count > 0) {
    q_insert_at(&hub->ready, m, (size_t)(m->reorder_pos % hub->ready.count));
    hub->stats.reordered++;
  } else {
    q_push(&hub->ready, m);
  }
  idle_update(hub);
}

static void delayed_insert(saga_mem_hub *hub, mem_msg *m) {
  mem_msg **pp = &hub->delayed;
  while (*pp != NULL && (*pp)->ready_at <= m->ready_at) pp = &(*pp)->next;
  m->next = *pp;
  *pp = m;
  if (hub->delayed == m) saga__timer_arm(&hub->timer, m->ready_at);
}

static void hub_timer_cb(saga__timer *timer) {
  saga_mem_hub *hub = timer->data;
  uint64_t now = saga_clock_now(hub->clock);
  mem_msg *m;
  while ((m = hub->delayed) != NULL && m->ready_at <= now) {
    hub->delayed = m->next;
    make_ready(hub, m);
  }
  if (hub->delayed != NULL) saga__timer_arm(&hub->timer, hub->delayed->ready_at);
}

/* Draws one copy's delay and reorder, then queues it. */
static void route(saga_mem_hub *hub, mem_msg *m) {
  int delayed = roll(hub, hub->faults.delay);
  uint64_t delay = 0;
  if (delayed) {
    uint64_t max = hub->faults.delay_max_ms > 0 ? hub->faults.delay_max_ms : 1;
    delay = 1 + rng_next(hub) % max;
  }
  if (roll(hub, hub->faults.reorder)) {
    m->reorder = 1;
    m->reorder_pos = rng_next(hub);
  }
  if (delayed) {
    hub->stats.delayed++;
    m->ready_at = saga_clock_now(hub->clock) + delay;
    delayed_insert(hub, m);
  } else {
    make_ready(hub, m);
  }
}

/* ---- channels ------------------------------------------------------------------------- */

static mem_chan *chan_find(saga_mem_hub *hub, const char *name) {
  for (mem_chan *c = hub->chans; c != NULL; c = c->next)
    if (strcmp(c->name, name) == 0) return c;
  return NULL;
}

static mem_chan *chan_get(saga_mem_hub *hub, const char *name) {
  mem_chan *c = chan_find(hub, name);
  if (c != NULL) return c;
  c = saga__calloc(&hub->alloc, sizeof *c);
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

static void chan_remove_sub(mem_chan *c, mem_tp *t) {
  for (size_t i = 0; i < c->nsubs; i++) {
    if (c->subs[i] != t) continue;
    memmove(&c->subs[i], &c->subs[i + 1], (c->nsubs - i - 1) * sizeof c->subs[0]);
    c->nsubs--;
    /* Keep the round robin pointing at the same next subscriber. */
    if (i < c->rr) c->rr--;
    if (c->rr >= c->nsubs) c->rr = 0;
    return;
  }
}

/* ---- deliveries awaiting ack ---------------------------------------------------------- */

static mem_rec *rec_new(saga_mem_hub *hub) {
  mem_rec *r = hub->spare;
  if (r != NULL) {
    hub->spare = r->next;
    return r;
  }
  return saga__malloc(&hub->alloc, sizeof *r);
}

/* Records are kept for reuse: steady-state deliveries then allocate nothing but the copy. */
static void rec_release(saga_mem_hub *hub, mem_rec *r) {
  r->next = hub->spare;
  hub->spare = r;
}

static void recs_grow(saga_mem_hub *hub) {
  size_t n = hub->nbuckets * 2;
  mem_rec **b = saga__calloc(&hub->alloc, n * sizeof *b);
  if (b == NULL) return; /* longer chains, still correct */
  for (size_t i = 0; i < hub->nbuckets; i++) {
    mem_rec *r = hub->buckets[i];
    while (r != NULL) {
      mem_rec *next = r->next;
      size_t j = (size_t)(r->tag & (n - 1));
      r->next = b[j];
      b[j] = r;
      r = next;
    }
  }
  saga__free(&hub->alloc, hub->buckets);
  hub->buckets = b;
  hub->nbuckets = n;
}

static void recs_insert(saga_mem_hub *hub, mem_rec *r) {
  if (hub->nrecs >= hub->nbuckets) recs_grow(hub);
  /* Tags are sequential, so their low bits spread evenly on their own. */
  size_t i = (size_t)(r->tag & (hub->nbuckets - 1));
  r->next = hub->buckets[i];
  hub->buckets[i] = r;
  hub->nrecs++;
}

static mem_rec **recs_slot(saga_mem_hub *hub, uint64_t tag) {
  mem_rec **pp = &hub->buckets[tag & (hub->nbuckets - 1)];
  while (*pp != NULL && (*pp)->tag != tag) pp = &(*pp)->next;
  return pp;
}


/* Removes and returns the record of tag, or NULL. */
static mem_rec *recs_take(saga_mem_hub *hub, uint64_t tag) {
  mem_rec **pp = recs_slot(hub, tag);
  mem_rec *r = *pp;
  if (r == NULL) return NULL;
  *pp = r->next;
  r->next = NULL;
  hub->nrecs--;
  return r;
}

/* ---- the idle callback: deliveries and confirmations ---------------------------------- */

/*
 * Hands m to one subscriber of its channel, trying each once in round-robin order; parks
 * it on the channel when nobody (or only closing nodes) can take it. Takes m.
 *
 * A message is tried even when older ones of its channel are parked: they are parked only
 * because every subscriber refused, so it is parked behind them unless a subscriber has
 * changed its mind, and then one refusal does not stall the channel until the next subscribe.
 */
static void deliver_one(saga_mem_hub *hub, mem_msg *m) {
  mem_chan *c = m->chan;
  /* The callback may change c->subs (close, subscribe): re-read it on every attempt. */
  for (size_t attempt = 0; attempt < c->nsubs; attempt++) {
    size_t i = c->rr % c->nsubs;
    c->rr = (i + 1) % c->nsubs;
    mem_tp *to = c->subs[i];
    uint64_t tag = ++hub->next_tag;
    /* Without memory for the record the message still goes out; its ack is then unknown
     * and ignored, and the sender's outbox resends it, as for a lost ack. */
    mem_rec *r = rec_new(hub);
    if (r != NULL) {
      r->tag = tag;
      r->sender = m->sender;
      r->receiver = to->id;
      r->token = m->token;
      recs_insert(hub, r);
    }
    int rc = saga_transport_deliver(&to->base, c->name, m->data, m->len, tag);
    if (rc == SAGA_OK) {
      hub->stats.delivered++;
      msg_free(hub, m);
      return;
    }
    /* Refused. Its close may already have dropped the record. */
    r = recs_take(hub, tag);
    if (r != NULL) rec_release(hub, r);
    if (rc != SAGA_ECLOSED) {
      /* An open node that could not take it now (out of memory, busy): this copy is
       * dropped as a lost message would be, and the sender's outbox resends it. Parking it
       * would hold the (sender, token) until the next subscribe and swallow every resend. */
      hub->stats.dropped++;
      msg_free(hub, m);
      return;
    }
    if (c->nsubs == 0) break;
  }
  q_push(&c->parked, m);
}

static void report_one(saga_mem_hub *hub) {
  mem_rec *r = hub->acks_head;
  hub->acks_head = r->next;
  if (hub->acks_head == NULL) hub->acks_tail = NULL;
  hub->nacks--;
  uint64_t sender = r->sender, token = r->token;
  rec_release(hub, r);
  mem_tp *to = tp_find_open(hub, sender);
  if (to != NULL) saga_transport_sent(&to->base, token, SAGA_OK);
}

/*
 * One pass handles only what was queued when it started: whatever the callbacks queue
 * (replies sent from inside a delivery, acks) waits for the next loop turn, so two nodes
 * talking to each other cannot starve the rest of the loop.
 */
static void hub_idle_cb(uv_idle_t *h) {
  saga_mem_hub *hub = h->data;
  size_t n = hub->nacks;
  while (n-- > 0 && hub->acks_head != NULL && !hub->closing) report_one(hub);
  n = hub->ready.count;
  while (n-- > 0 && hub->ready.head != NULL && !hub->closing) deliver_one(hub, q_pop(&hub->ready));
  idle_update(hub);
}

static void idle_update(saga_mem_hub *hub) {
  if (hub->closing) return;
  if (hub->ready.count > 0 || hub->nacks > 0)
    uv_idle_start(&hub->idle, hub_idle_cb);
  else
    uv_idle_stop(&hub->idle);
}

/* ---- the adapter methods -------------------------------------------------------------- */

static int tp_open(saga_transport *t, uv_loop_t *loop) {
  mem_tp *tp = (mem_tp *)t;
  if (tp->state != TP_NEW) return SAGA_ESTATE;
  if (loop != tp->hub->loop) return SAGA_EINVAL;
  tp->state = TP_OPEN;
  return SAGA_OK;
}

static int tp_subscribe(saga_transport *t, const char *channel) {
  mem_tp *tp = (mem_tp *)t;
  saga_mem_hub *hub = tp->hub;
  if (channel == NULL) return SAGA_EINVAL;
  if (tp->state != TP_OPEN) return tp->state == TP_CLOSED ? SAGA_ECLOSED : SAGA_ESTATE;
  mem_chan *c = chan_get(hub, channel);
  if (c == NULL) return SAGA_ENOMEM;
  for (size_t i = 0; i < c->nsubs; i++)
    if (c->subs[i] == tp) return SAGA_OK;
  if (c->nsubs == c->cap) {
    size_t cap = c->cap ? c->cap * 2 : 4;
    mem_tp **subs = saga__realloc(&hub->alloc, c->subs, cap * sizeof *subs);
    if (subs == NULL) return SAGA_ENOMEM;
    c->subs = subs;
    c->cap = cap;
  }
  c->subs[c->nsubs++] = tp;
  /* What waited for a consumer goes out first, ahead of anything sent since. */
  if (c->parked.count > 0) {
    q_prepend_all(&hub->ready, &c->parked);
    idle_update(hub);
  }
  return SAGA_OK;
}

static int tp_send(saga_transport *t, const char *channel, const void *data, size_t len,
                   uint64_t token) {
  mem_tp *tp = (mem_tp *)t;
  saga_mem_hub *hub = tp->hub;
  if (channel == NULL || (data == NULL && len > 0)) return SAGA_EINVAL;
  if (tp->state != TP_OPEN) return tp->state == TP_CLOSED ? SAGA_ECLOSED : SAGA_ESTATE;
  mem_chan *c = chan_get(hub, channel);
  if (c == NULL) return SAGA_ENOMEM;
  /* A resend of a message the hub still holds: that copy goes out in its place. */
  if (held_has(hub, tp->id, token)) {
    c->deduplicated++;
    return SAGA_OK;
  }
  if (!chan_has_room(hub, c, len)) {
    c->refused++;
    if (!c->full_logged) {
      c->full_logged = 1;
      char msg[512];
      snprintf(msg, sizeof msg, "mem hub: channel '%.120s' holds %zu messages (%zu bytes), its "
               "limit (max_messages %zu, max_bytes %zu): sends to it are refused with "
               "SAGA_EBUSY and resent later (logged once until the channel empties)",
               c->name, c->held, c->held_bytes, hub->max_messages, hub->max_bytes);
      saga_transport_log(t, SAGA_LOG_WARN, msg);
    }
    return SAGA_EBUSY;
  }
  mem_msg *m = msg_new(hub, c, tp->id, token, data, len);
  if (m == NULL) return SAGA_ENOMEM;
  hub->stats.sent++;
  if (roll(hub, hub->faults.drop)) {
    hub->stats.dropped++;
    msg_free(hub, m);
    return SAGA_OK;
  }
  mem_msg *dup = NULL;
  if (roll(hub, hub->faults.duplicate) && chan_has_room(hub, c, len)) {
    /* Without memory (or room) for the copy the message is simply not duplicated. */
    dup = msg_new(hub, c, tp->id, token, data, len);
    if (dup != NULL) hub->stats.duplicated++;
  }
  route(hub, m);
  if (dup != NULL) route(hub, dup);
  return SAGA_OK;
}

static void tp_ack(saga_transport *t, uint64_t tag) {
  mem_tp *tp = (mem_tp *)t;
  saga_mem_hub *hub = tp->hub;
  if (tp->state != TP_OPEN) return;
  mem_rec **pp = recs_slot(hub, tag);
  /* Unknown, repeated, or another transport's delivery: nothing to confirm. */
  if (*pp == NULL || (*pp)->receiver != tp->id) return;
  mem_rec *r = recs_take(hub, tag);
  hub->stats.acked++;
  if (roll(hub, hub->faults.drop_ack)) {
    hub->stats.acks_dropped++;
    rec_release(hub, r);
    return;
  }
  r->next = NULL;
  if (hub->acks_tail != NULL)
    hub->acks_tail->next = r;
  else
    hub->acks_head = r;
  hub->acks_tail = r;
  hub->nacks++;
  idle_update(hub);
}

/* Forgets t everywhere the hub could call into it: its subscriptions, the deliveries it
 * was handed (never acked now), and the confirmations not yet reported to it. Messages it
 * sent stay on the "network" and are still delivered; their acks find no sender. */
static void tp_detach(mem_tp *tp) {
  saga_mem_hub *hub = tp->hub;
  for (mem_chan *c = hub->chans; c != NULL; c = c->next) chan_remove_sub(c, tp);
  for (size_t i = 0; i < hub->nbuckets; i++) {
    mem_rec **pp = &hub->buckets[i];
    while (*pp != NULL) {
      mem_rec *r = *pp;
      if (r->receiver == tp->id) {
        *pp = r->next;
        hub->nrecs--;
        rec_release(hub, r);
      } else {
        pp = &r->next;
      }
    }
  }
  mem_rec **pp = &hub->acks_head;
  hub->acks_tail = NULL;
  while (*pp != NULL) {
    mem_rec *r = *pp;
    if (r->sender == tp->id) {
      *pp = r->next;
      hub->nacks--;
      rec_release(hub, r);
    } else {
      hub->acks_tail = r;
      pp = &r->next;
    }
  }
  idle_update(hub);
}

static void tp_close(saga_transport *t) {
  mem_tp *tp = (mem_tp *)t;
  if (tp->state == TP_CLOSED) return;
  tp_detach(tp);
  tp->state = TP_CLOSED;
  /* Nothing to finish asynchronously: the close is complete now. */
  saga_transport_closed(t);
}

static void tp_destroy(saga_transport *t) {
  mem_tp *tp = (mem_tp *)t;
  saga_mem_hub *hub = tp->hub;
  /* Normally closed already; a transport destroyed open must not linger in the hub. */
  if (tp->state != TP_CLOSED) tp_detach(tp);
  if (tp->prev != NULL)
    tp->prev->next = tp->next;
  else
    hub->tps = tp->next;
  if (tp->next != NULL) tp->next->prev = tp->prev;
  saga__free(&hub->alloc, tp);
}

/* Every channel is reachable: a message for a channel nobody consumes yet is parked on it
 * until a transport subscribes (a node started later picks it up), so no name is ever
 * undeliverable. Unroutable channels are a property of addressed media (TCP routes). */
static int tp_can_send(saga_transport *t, const char *channel) {
  (void)t;
  return channel != NULL;
}

static const saga_transport_methods mem_methods = {
    .version = SAGA_TRANSPORT_VERSION,
    .name = "mem",
    .open = tp_open,
    .subscribe = tp_subscribe,
    .send = tp_send,
    .ack = tp_ack,
    .close = tp_close,
    .destroy = tp_destroy,
    .can_send = tp_can_send,
};

/* ---- the hub -------------------------------------------------------------------------- */

int saga_mem_hub_new(saga_mem_hub **out, uv_loop_t *loop, saga_clock *clock,
                     const saga_mem_faults *faults, const saga_allocator *alloc) {
  if (out == NULL || loop == NULL || (faults != NULL && !faults_ok(faults))) return SAGA_EINVAL;
  const saga_allocator *a = saga__alloc_resolve(alloc);
  int rc = SAGA_ENOMEM;
  saga_mem_hub *hub = saga__calloc(a, sizeof *hub);
  if (hub == NULL) goto fail;
  hub->alloc = *a;
  hub->loop = loop;
  hub->nbuckets = MEM_INITIAL_BUCKETS;
  hub->buckets = saga__calloc(&hub->alloc, hub->nbuckets * sizeof *hub->buckets);
  if (hub->buckets == NULL) goto fail;
  hub->nheld_buckets = MEM_INITIAL_BUCKETS;
  hub->held = saga__calloc(&hub->alloc, hub->nheld_buckets * sizeof *hub->held);
  if (hub->held == NULL) goto fail;
  hub->max_messages = SAGA_MEM_CHANNEL_MAX_MESSAGES;
  hub->max_bytes = SAGA_MEM_CHANNEL_MAX_BYTES;
  if (clock == NULL) {
    rc = saga__clock_real_new(&clock, loop, &hub->alloc);
    if (rc != SAGA_OK) goto fail;
    hub->own_clock = 1;
  }
  hub->clock = clock;
  set_faults(hub, faults);
  saga__timer_init(&hub->timer, clock, hub_timer_cb, hub);
  /* Last: once initialised, the handle can only be released through uv_close. */
  if (uv_idle_init(loop, &hub->idle) != 0) {
    rc = SAGA_EIO;
    goto fail;
  }
  hub->idle.data = hub;
  *out = hub;
  return SAGA_OK;

fail:
  if (hub != NULL) {
    if (hub->own_clock) saga__clock_close(hub->clock);
    saga__free(&hub->alloc, hub->held);
    saga__free(&hub->alloc, hub->buckets);
    saga__free(&hub->alloc, hub);
  }
  return rc;
}

static void free_msgs(saga_mem_hub *hub, mem_msg *m) {
  while (m != NULL) {
    mem_msg *next = m->next;
    msg_free(hub, m);
    m = next;
  }
}

static void free_recs(saga_mem_hub *hub, mem_rec *r) {
  while (r != NULL) {
    mem_rec *next = r->next;
    saga__free(&hub->alloc, r);
    r = next;
  }
}

static void hub_closed(uv_handle_t *h) {
  saga_mem_hub *hub = h->data;
  free_msgs(hub, hub->ready.head);
  free_msgs(hub, hub->delayed);
  while (hub->chans != NULL) {
    mem_chan *c = hub->chans;
    hub->chans = c->next;
    free_msgs(hub, c->parked.head);
    saga__free(&hub->alloc, c->subs);
    saga__free(&hub->alloc, c->name);
    saga__free(&hub->alloc, c);
  }
  for (size_t i = 0; i < hub->nbuckets; i++) free_recs(hub, hub->buckets[i]);
  free_recs(hub, hub->acks_head);
  free_recs(hub, hub->spare);
  saga__free(&hub->alloc, hub->held);
  saga__free(&hub->alloc, hub->buckets);
  saga_allocator a = hub->alloc;
  saga__free(&a, hub);
}

int saga_mem_hub_close(saga_mem_hub *hub) {
  if (hub == NULL || hub->closing) return SAGA_OK;
  if (hub->tps != NULL) return SAGA_EBUSY;
  hub->closing = 1;
  saga__timer_stop(&hub->timer);
  if (hub->own_clock) saga__clock_close(hub->clock);
  hub->clock = NULL;
  uv_idle_stop(&hub->idle);
  uv_close((uv_handle_t *)&hub->idle, hub_closed);
  return SAGA_OK;
}

void saga_mem_hub_set_faults(saga_mem_hub *hub, const saga_mem_faults *faults) {
  if (hub != NULL) set_faults(hub, faults);
}

int saga_mem_hub_stats(const saga_mem_hub *hub, saga_mem_stats *out, size_t size) {
  /* the first version of the struct ended after `waiting` */
  if (hub == NULL || out == NULL || size < offsetof(saga_mem_stats, waiting) + sizeof(uint64_t))
    return SAGA_EINVAL;
  saga__copy_sized(out, size, &hub->stats, sizeof hub->stats);
  return SAGA_OK;
}

int saga_mem_hub_set_limits(saga_mem_hub *hub, size_t max_messages, size_t max_bytes) {
  if (hub == NULL) return SAGA_EINVAL;
  hub->max_messages = max_messages ? max_messages : SAGA_MEM_CHANNEL_MAX_MESSAGES;
  hub->max_bytes = max_bytes ? max_bytes : SAGA_MEM_CHANNEL_MAX_BYTES;
  return SAGA_OK;
}

static void add_chan_stats(saga_mem_queue_stats *q, const mem_chan *c) {
  q->messages += c->held;
  q->bytes += c->held_bytes;
  q->deduplicated += c->deduplicated;
  q->refused += c->refused;
}

int saga_mem_hub_queue_stats(const saga_mem_hub *hub, const char *channel,
                             saga_mem_queue_stats *out, size_t size) {
  if (hub == NULL || out == NULL ||
      size < offsetof(saga_mem_queue_stats, refused) + sizeof(uint64_t))
    return SAGA_EINVAL; /* below the first version of the struct */
  saga_mem_queue_stats q;
  memset(&q, 0, sizeof q);
  for (const mem_chan *c = hub->chans; c != NULL; c = c->next)
    if (channel == NULL || strcmp(c->name, channel) == 0) add_chan_stats(&q, c);
  saga__copy_sized(out, size, &q, sizeof q);
  return SAGA_OK;
}

int saga_mem_transport_new(saga_transport **out, saga_mem_hub *hub) {
  if (out == NULL || hub == NULL || hub->closing) return SAGA_EINVAL;
  mem_tp *tp = saga__calloc(&hub->alloc, sizeof *tp);
  if (tp == NULL) return SAGA_ENOMEM;
  tp->base.methods = &mem_methods;
  tp->hub = hub;
  tp->id = ++hub->next_tp_id;
  tp->state = TP_NEW;
  tp->next = hub->tps;
  if (hub->tps != NULL) hub->tps->prev = tp;
  hub->tps = tp;
  *out = &tp->base;
  return SAGA_OK;
}
