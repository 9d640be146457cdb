/*
 * The in-memory transport, driven through the adapter interface exactly as a node drives it:
 * each transport gets a fake host recording what the hub calls back.
 */
#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define START 1700000000000ull
#define MAXD 256

typedef struct delivery {
  char channel[32];
  char data[64];
  uint64_t tag;
} delivery;

/* A growing string (plain libc: the test uses only public symbols plus the host struct). */
typedef struct tracebuf {
  char *s;
  size_t len, cap;
} tracebuf;

static void tracebuf_add(tracebuf *b, const char *line) {
  size_t n = strlen(line);
  if (b->len + n + 1 > b->cap) {
    b->cap = (b->len + n + 1) * 2;
    b->s = realloc(b->s, b->cap);
    assert_non_null(b->s);
  }
  memcpy(b->s + b->len, line, n + 1);
  b->len += n;
}

typedef struct fake {
  saga__transport_host host;
  saga_transport *t;
  const char *name;
  delivery d[MAXD];
  size_t nd;
  uint64_t sent[MAXD];
  int sent_status[MAXD];
  size_t ns;
  int closed;    /* closed callback calls */
  int refuse;    /* deliver returns SAGA_ECLOSED */
  int auto_ack;  /* ack from inside the delivery callback */
  int warnings;  /* log lines at SAGA_LOG_WARN or above */
  char last_log[512];
  struct tracebuf *trace; /* optional shared log of everything, for determinism checks */
} fake;

static void trace(fake *f, const char *what, const char *data, uint64_t n) {
  if (f->trace == NULL) return;
  char line[160];
  snprintf(line, sizeof line, "%s %s %s %llu; ", f->name, what, data, (unsigned long long)n);
  tracebuf_add(f->trace, line);
}

static int fake_deliver(void *ctx, const char *channel, const void *data, size_t len,
                        uint64_t tag) {
  fake *f = ctx;
  assert_int_equal(f->closed, 0); /* never called into a closed transport */
  if (f->refuse) return SAGA_ECLOSED;
  assert_true(f->nd < MAXD);
  assert_true(len < sizeof f->d[0].data);
  delivery *d = &f->d[f->nd++];
  snprintf(d->channel, sizeof d->channel, "%s", channel);
  memcpy(d->data, data, len);
  d->data[len] = '\0';
  d->tag = tag;
  trace(f, "got", d->data, tag);
  if (f->auto_ack) f->t->methods->ack(f->t, tag);
  return SAGA_OK;
}

static void fake_sent(void *ctx, uint64_t token, int status) {
  fake *f = ctx;
  assert_int_equal(f->closed, 0);
  assert_true(f->ns < MAXD);
  f->sent_status[f->ns] = status;
  f->sent[f->ns++] = token;
  trace(f, "sent", "", token);
}

static void fake_closed(void *ctx) { ((fake *)ctx)->closed++; }

static void fake_log(void *ctx, saga_log_level level, const char *msg) {
  fake *f = ctx;
  if (level >= SAGA_LOG_WARN) f->warnings++;
  snprintf(f->last_log, sizeof f->last_log, "%s", msg);
}

typedef struct env {
  uv_loop_t loop;
  saga_clock *clock;
  saga_mem_hub *hub;
  th_alloc ta;
} env;

static void env_init(env *e, const saga_mem_faults *faults) {
  memset(e, 0, sizeof *e);
  th_alloc_init(&e->ta);
  assert_int_equal(uv_loop_init(&e->loop), 0);
  assert_int_equal(saga_clock_manual_new(&e->clock, START, NULL), SAGA_OK);
  assert_int_equal(saga_mem_hub_new(&e->hub, &e->loop, e->clock, faults, &e->ta.a), SAGA_OK);
}

static void attach_on(saga_mem_hub *hub, uv_loop_t *loop, fake *f, const char *name) {
  memset(f, 0, sizeof *f);
  f->name = name;
  f->host.deliver = fake_deliver;
  f->host.sent = fake_sent;
  f->host.closed = fake_closed;
  f->host.log = fake_log;
  f->host.ctx = f;
  assert_int_equal(saga_mem_transport_new(&f->t, hub), SAGA_OK);
  assert_int_equal(f->t->methods->version, SAGA_TRANSPORT_VERSION);
  assert_string_equal(f->t->methods->name, "mem");
  f->t->saga__host = &f->host;
  assert_int_equal(f->t->methods->open(f->t, loop), SAGA_OK);
}

static void attach(env *e, fake *f, const char *name) { attach_on(e->hub, &e->loop, f, name); }

static void sub(fake *f, const char *channel) {
  assert_int_equal(f->t->methods->subscribe(f->t, channel), SAGA_OK);
}

static void send_str(fake *f, const char *channel, const char *s, uint64_t token) {
  assert_int_equal(f->t->methods->send(f->t, channel, s, strlen(s), token), SAGA_OK);
}

static void ack(fake *f, uint64_t tag) { f->t->methods->ack(f->t, tag); }

static void detach(fake *f) {
  if (f->t == NULL) return;
  if (!f->closed) {
    f->t->methods->close(f->t);
    assert_int_equal(f->closed, 1); /* synchronously, exactly once */
  }
  f->t->methods->destroy(f->t);
  f->t = NULL;
}

/* Runs the loop until quiescent, then time to the next deadline, until nothing is left. */
static void settle(env *e) {
  for (;;) {
    th_drain(&e->loop);
    if (saga_clock_advance_to_next(e->clock) == SAGA_ENOTFOUND) break;
  }
}

static void env_free(env *e) {
  assert_int_equal(saga_mem_hub_close(e->hub), SAGA_OK);
  th_drain(&e->loop);
  assert_int_equal(e->ta.live, 0); /* everything the hub held is freed */
  saga_clock_free(e->clock);
  assert_int_equal(uv_loop_close(&e->loop), 0);
}

static saga_mem_stats stats(env *e) {
  saga_mem_stats s;
  saga_mem_hub_stats(e->hub, &s, sizeof s);
  return s;
}

/* ---- delivery and acknowledgement ------------------------------------------------------- */

static void test_delivers_to_subscriber(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  sub(&b, "orders");
  send_str(&a, "orders", "hello", 7);
  assert_int_equal(b.nd, 0); /* never inside send */
  th_drain(&e.loop);
  assert_int_equal(b.nd, 1);
  assert_string_equal(b.d[0].channel, "orders");
  assert_string_equal(b.d[0].data, "hello");
  assert_int_equal(a.nd, 0);
  assert_int_equal(a.ns, 0);
  saga_mem_stats s = stats(&e);
  assert_int_equal(s.sent, 1);
  assert_int_equal(s.delivered, 1);
  assert_int_equal(s.waiting, 0);
  /* Nothing left to do: the hub does not keep the loop alive. */
  assert_int_equal(uv_loop_alive(&e.loop), 0);
  detach(&a);
  detach(&b);
  env_free(&e);
}

static void test_ack_confirms_once(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  sub(&b, "orders");
  send_str(&a, "orders", "one", 7);
  send_str(&a, "orders", "two", 8);
  th_drain(&e.loop);
  assert_int_equal(b.nd, 2);
  assert_int_not_equal(b.d[0].tag, b.d[1].tag);
  ack(&b, b.d[1].tag);
  assert_int_equal(a.ns, 0); /* never inside ack */
  th_drain(&e.loop);
  assert_int_equal(a.ns, 1);
  assert_int_equal(a.sent[0], 8);
  assert_int_equal(a.sent_status[0], SAGA_OK);
  /* A repeated ack, an unknown tag and another transport's tag confirm nothing more. */
  ack(&b, b.d[1].tag);
  ack(&b, 999999);
  ack(&a, b.d[0].tag);
  settle(&e);
  assert_int_equal(a.ns, 1);
  ack(&b, b.d[0].tag);
  settle(&e);
  assert_int_equal(a.ns, 2);
  assert_int_equal(a.sent[1], 7);
  assert_int_equal(b.ns, 0);
  saga_mem_stats s = stats(&e);
  assert_int_equal(s.acked, 2);
  assert_int_equal(s.acks_dropped, 0);
  detach(&a);
  detach(&b);
  env_free(&e);
}

static void test_no_ack_no_sent(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  sub(&b, "orders");
  send_str(&a, "orders", "x", 1);
  settle(&e);
  assert_int_equal(b.nd, 1);
  assert_int_equal(saga_clock_advance(e.clock, 3600 * 1000), SAGA_OK);
  settle(&e);
  assert_int_equal(a.ns, 0);
  assert_int_equal(b.nd, 1); /* and no redelivery either: resending is the node's job */
  detach(&a);
  detach(&b);
  env_free(&e);
}

static void test_waits_until_subscribe(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  sub(&b, "other");
  send_str(&a, "late", "m0", 1);
  send_str(&a, "late", "m1", 2);
  settle(&e);
  send_str(&a, "late", "m2", 3);
  settle(&e);
  assert_int_equal(b.nd, 0);
  assert_int_equal(stats(&e).waiting, 3);
  assert_int_equal(uv_loop_alive(&e.loop), 0); /* parked messages are not work */
  sub(&b, "late");
  assert_int_equal(b.nd, 0); /* never inside subscribe */
  th_drain(&e.loop);
  assert_int_equal(b.nd, 3);
  for (size_t i = 0; i < 3; i++) {
    char want[32];
    snprintf(want, sizeof want, "m%zu", i);
    assert_string_equal(b.d[i].data, want);
    assert_string_equal(b.d[i].channel, "late");
  }
  assert_int_equal(stats(&e).waiting, 0);
  detach(&a);
  detach(&b);
  env_free(&e);
}

static void test_round_robin(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  fake a, b, c;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  attach(&e, &c, "c");
  sub(&b, "work");
  sub(&c, "work");
  char msg[32];
  for (int i = 0; i < 6; i++) {
    snprintf(msg, sizeof msg, "w%d", i);
    send_str(&a, "work", msg, (uint64_t)i);
  }
  settle(&e);
  assert_int_equal(b.nd, 3);
  assert_int_equal(c.nd, 3);
  for (int i = 0; i < 3; i++) {
    snprintf(msg, sizeof msg, "w%d", 2 * i);
    assert_string_equal(b.d[i].data, msg);
    snprintf(msg, sizeof msg, "w%d", 2 * i + 1);
    assert_string_equal(c.d[i].data, msg);
  }
  /* When one replica leaves, the other takes everything. */
  detach(&b);
  send_str(&a, "work", "after", 9);
  settle(&e);
  assert_int_equal(c.nd, 4);
  assert_string_equal(c.d[3].data, "after");
  detach(&a);
  detach(&c);
  env_free(&e);
}

static void test_refused_delivery_waits(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  fake a, b, c, d;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  attach(&e, &c, "c");
  sub(&b, "q");
  sub(&c, "q");
  b.refuse = 1; /* b's node is closing */
  send_str(&a, "q", "m0", 1);
  send_str(&a, "q", "m1", 2);
  settle(&e);
  /* Every message went to the replica that could take it. */
  assert_int_equal(b.nd, 0);
  assert_int_equal(c.nd, 2);
  c.refuse = 1;
  send_str(&a, "q", "m2", 3);
  settle(&e);
  assert_int_equal(stats(&e).waiting, 1);
  assert_int_equal(uv_loop_alive(&e.loop), 0); /* no spinning on a refused message */
  attach(&e, &d, "d");
  sub(&d, "q");
  settle(&e);
  assert_int_equal(d.nd, 1);
  assert_string_equal(d.d[0].data, "m2");
  /* The refused deliveries' tags are forgotten: an ack for one confirms nothing. */
  ack(&d, d.d[0].tag - 1);
  ack(&d, d.d[0].tag);
  settle(&e);
  assert_int_equal(a.ns, 1);
  assert_int_equal(a.sent[0], 3);
  detach(&a);
  detach(&b);
  detach(&c);
  detach(&d);
  env_free(&e);
}

/* ---- faults ----------------------------------------------------------------------------- */

static void test_fault_drop(void **state) {
  (void)state;
  saga_mem_faults f = {.seed = th_seed(1), .drop = 1.0};
  env e;
  env_init(&e, &f);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  sub(&b, "q");
  for (uint64_t i = 0; i < 5; i++) send_str(&a, "q", "lost", i);
  settle(&e);
  assert_int_equal(b.nd, 0);
  assert_int_equal(a.ns, 0);
  saga_mem_stats s = stats(&e);
  assert_int_equal(s.sent, 5);
  assert_int_equal(s.dropped, 5);
  assert_int_equal(s.delivered, 0);
  assert_int_equal(s.waiting, 0);
  /* Healing the network lets messages through again. */
  saga_mem_hub_set_faults(e.hub, NULL);
  send_str(&a, "q", "ok", 9);
  settle(&e);
  assert_int_equal(b.nd, 1);
  detach(&a);
  detach(&b);
  env_free(&e);
}

static void test_fault_duplicate(void **state) {
  (void)state;
  saga_mem_faults f = {.seed = th_seed(2), .duplicate = 1.0};
  env e;
  env_init(&e, &f);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  sub(&b, "q");
  send_str(&a, "q", "twice", 5);
  settle(&e);
  assert_int_equal(b.nd, 2);
  assert_string_equal(b.d[0].data, "twice");
  assert_string_equal(b.d[1].data, "twice");
  assert_int_not_equal(b.d[0].tag, b.d[1].tag);
  assert_int_equal(stats(&e).duplicated, 1);
  /* Each delivery is acknowledged on its own; repeated confirmations are harmless. */
  ack(&b, b.d[0].tag);
  ack(&b, b.d[1].tag);
  settle(&e);
  assert_int_equal(a.ns, 2);
  assert_int_equal(a.sent[0], 5);
  assert_int_equal(a.sent[1], 5);
  detach(&a);
  detach(&b);
  env_free(&e);
}

static void test_fault_delay(void **state) {
  (void)state;
  saga_mem_faults f = {.seed = th_seed(3), .delay = 1.0, .delay_max_ms = 100};
  env e;
  env_init(&e, &f);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  sub(&b, "q");
  send_str(&a, "q", "slow", 1);
  th_drain(&e.loop);
  assert_int_equal(b.nd, 0);
  assert_int_equal(stats(&e).delayed, 1);
  assert_int_equal(stats(&e).waiting, 1);
  /* Waiting on the clock only: with a manual clock nothing keeps the loop alive. */
  assert_int_equal(uv_loop_alive(&e.loop), 0);
  uint64_t due;
  assert_int_equal(saga_clock_next_deadline(e.clock, &due), SAGA_OK);
  assert_true(due > START && due <= START + 100);
  assert_int_equal(saga_clock_advance(e.clock, due - START - 1), SAGA_OK);
  th_drain(&e.loop);
  assert_int_equal(b.nd, 0);
  assert_int_equal(saga_clock_advance(e.clock, 1), SAGA_OK);
  assert_int_equal(b.nd, 0); /* ready now, delivered from the loop */
  th_drain(&e.loop);
  assert_int_equal(b.nd, 1);
  assert_string_equal(b.d[0].data, "slow");
  detach(&a);
  detach(&b);
  env_free(&e);
}

static void test_fault_reorder(void **state) {
  (void)state;
  saga_mem_faults f = {.seed = th_seed(4), .reorder = 1.0};
  env e;
  env_init(&e, &f);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  sub(&b, "q");
  enum { N = 10 };
  char msg[32];
  for (int i = 0; i < N; i++) {
    snprintf(msg, sizeof msg, "%d", i);
    send_str(&a, "q", msg, (uint64_t)i);
  }
  settle(&e);
  assert_int_equal(b.nd, N);
  int seen[N] = {0}, in_order = 1;
  for (int i = 0; i < N; i++) {
    int v = atoi(b.d[i].data);
    assert_true(v >= 0 && v < N);
    assert_false(seen[v]);
    seen[v] = 1;
    if (v != i) in_order = 0;
  }
  assert_false(in_order);
  assert_true(stats(&e).reordered > 0);
  detach(&a);
  detach(&b);
  env_free(&e);
}

static void test_fault_drop_ack(void **state) {
  (void)state;
  saga_mem_faults f = {.seed = th_seed(5), .drop_ack = 1.0};
  env e;
  env_init(&e, &f);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  sub(&b, "q");
  send_str(&a, "q", "m", 1);
  settle(&e);
  assert_int_equal(b.nd, 1);
  ack(&b, b.d[0].tag);
  settle(&e);
  assert_int_equal(a.ns, 0);
  saga_mem_stats s = stats(&e);
  assert_int_equal(s.acked, 1);
  assert_int_equal(s.acks_dropped, 1);
  detach(&a);
  detach(&b);
  env_free(&e);
}

static void test_bad_fault_settings(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  saga_mem_hub *hub = NULL;
  saga_mem_faults f = {.drop = 1.5};
  assert_int_equal(saga_mem_hub_new(&hub, &loop, NULL, &f, NULL), SAGA_EINVAL);
  f.drop = -0.1;
  assert_int_equal(saga_mem_hub_new(&hub, &loop, NULL, &f, NULL), SAGA_EINVAL);
  assert_null(hub);
  assert_int_equal(saga_mem_hub_new(&hub, NULL, NULL, NULL, NULL), SAGA_EINVAL);
  assert_int_equal(saga_mem_hub_close(NULL), SAGA_OK);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- determinism ------------------------------------------------------------------------ */

/* A mixed-fault run: three nodes, replies sent from inside deliveries, acks, time passing.
 * Returns the trace of every callback, in order (heap string). */
static char *chaos_run(uint64_t seed) {
  saga_mem_faults f = {.seed = seed,
                       .drop = 0.2,
                       .duplicate = 0.2,
                       .reorder = 0.3,
                       .delay = 0.3,
                       .delay_max_ms = 50,
                       .drop_ack = 0.2};
  env e;
  env_init(&e, &f);
  tracebuf tr = {0};
  fake a, b, c;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  attach(&e, &c, "c");
  a.trace = b.trace = c.trace = &tr;
  b.auto_ack = c.auto_ack = 1;
  sub(&b, "work");
  sub(&c, "work");
  sub(&a, "replies");
  char msg[48];
  for (uint64_t round = 0; round < 4; round++) {
    for (uint64_t i = 0; i < 10; i++) {
      snprintf(msg, sizeof msg, "r%llum%llu", (unsigned long long)round, (unsigned long long)i);
      send_str(&a, "work", msg, round * 100 + i);
    }
    /* Workers reply to what they got so far; a acks every reply. */
    th_drain(&e.loop);
    for (size_t i = 0; i < b.nd; i++) send_str(&b, "replies", b.d[i].data, 1000 + i);
    for (size_t i = 0; i < c.nd; i++) send_str(&c, "replies", c.d[i].data, 2000 + i);
    th_drain(&e.loop);
    for (size_t i = 0; i < a.nd; i++) ack(&a, a.d[i].tag);
    assert_int_equal(saga_clock_advance(e.clock, 20), SAGA_OK);
    th_drain(&e.loop);
  }
  settle(&e);
  saga_mem_stats s = stats(&e);
  /* With these probabilities over ~100 messages every fault happens. */
  assert_true(s.dropped > 0 && s.duplicated > 0 && s.reordered > 0 && s.delayed > 0 &&
              s.acks_dropped > 0);
  assert_true(s.delivered > 0);
  char tail[200];
  snprintf(tail, sizeof tail, "| %llu %llu %llu %llu %llu %llu %llu %llu",
                   (unsigned long long)s.sent, (unsigned long long)s.delivered,
                   (unsigned long long)s.dropped, (unsigned long long)s.duplicated,
                   (unsigned long long)s.reordered, (unsigned long long)s.delayed,
                   (unsigned long long)s.acked, (unsigned long long)s.acks_dropped);
  tracebuf_add(&tr, tail);
  detach(&a);
  detach(&b);
  detach(&c);
  env_free(&e);
  return tr.s;
}

static void test_same_seed_same_run(void **state) {
  (void)state;
  uint64_t seed = th_seed(0x5A6A);
  printf("seed %llu (replay with SAGA_SEED)\n", (unsigned long long)seed);
  char *one = chaos_run(seed);
  char *two = chaos_run(seed);
  char *other = chaos_run(seed + 1);
  assert_string_equal(one, two);
  assert_string_not_equal(one, other);
  free(one);
  free(two);
  free(other);
}

/* ---- closing ---------------------------------------------------------------------------- */

static void test_close_with_messages_in_flight(void **state) {
  (void)state;
  saga_mem_faults f = {.seed = th_seed(6)};
  env e;
  env_init(&e, &f);
  fake a, b, c;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  attach(&e, &c, "c");
  sub(&b, "q");
  sub(&a, "back");

  /* b acks m0, but a closes before the confirmation is reported. */
  send_str(&a, "q", "m0", 1);
  th_drain(&e.loop);
  assert_int_equal(b.nd, 1);
  ack(&b, b.d[0].tag);
  /* More messages from a on the way, some delayed; a reply for a ready to go. */
  f.delay = 1.0;
  f.delay_max_ms = 30;
  saga_mem_hub_set_faults(e.hub, &f);
  send_str(&a, "q", "m1", 2);
  send_str(&a, "q", "m2", 3);
  saga_mem_hub_set_faults(e.hub, NULL);
  send_str(&a, "q", "m3", 4);
  send_str(&b, "back", "reply", 10);
  a.t->methods->close(a.t);
  assert_int_equal(a.closed, 1);
  /* After close, the transport refuses work and the hub never calls into it (the fake
   * host fails the test if it does). */
  assert_int_equal(a.t->methods->send(a.t, "q", "x", 1, 5), SAGA_ECLOSED);
  assert_int_equal(a.t->methods->subscribe(a.t, "z"), SAGA_ECLOSED);
  settle(&e);
  assert_int_equal(a.nd, 0);
  assert_int_equal(a.ns, 0);
  assert_int_equal(stats(&e).waiting, 1); /* the reply, parked: "back" has no consumer now */
  /* What a sent before closing still arrives; its acks are confirmed to no one. */
  assert_int_equal(b.nd, 4);
  for (size_t i = 1; i < 4; i++) ack(&b, b.d[i].tag);
  settle(&e);
  assert_int_equal(a.ns, 0);
  a.t->methods->destroy(a.t);
  a.t = NULL;

  /* b closes with: a delivery it never acked, a message ready for it, a delayed one. */
  send_str(&c, "q", "n0", 20);
  th_drain(&e.loop);
  assert_int_equal(b.nd, 5);
  uint64_t unacked = b.d[4].tag;
  send_str(&c, "q", "n1", 21);
  f.delay = 1.0;
  saga_mem_hub_set_faults(e.hub, &f);
  send_str(&c, "q", "n2", 22);
  saga_mem_hub_set_faults(e.hub, NULL);
  b.t->methods->close(b.t);
  assert_int_equal(b.closed, 1);
  b.t->methods->ack(b.t, unacked); /* ignored after close */
  settle(&e);
  assert_int_equal(b.nd, 5);
  assert_int_equal(c.ns, 0);
  assert_int_equal(stats(&e).waiting, 3); /* reply, n1 and n2, parked for a next consumer */
  detach(&b);

  /* hub_close is refused while a transport lives, even a closed one. */
  assert_int_equal(saga_mem_hub_close(e.hub), SAGA_EBUSY);
  c.t->methods->close(c.t);
  assert_int_equal(saga_mem_hub_close(e.hub), SAGA_EBUSY);
  detach(&c);
  /* The parked messages are freed with the hub (env_free checks the allocator). */
  env_free(&e);
}

static void test_hub_close_busy(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  saga_transport *never = NULL;
  assert_int_equal(saga_mem_transport_new(&never, e.hub), SAGA_OK);
  assert_int_equal(saga_mem_hub_close(e.hub), SAGA_EBUSY);
  /* Methods other than open are refused before open; open checks the loop. */
  assert_int_equal(never->methods->send(never, "q", "x", 1, 1), SAGA_ESTATE);
  assert_int_equal(never->methods->subscribe(never, "q"), SAGA_ESTATE);
  uv_loop_t other;
  assert_int_equal(uv_loop_init(&other), 0);
  assert_int_equal(never->methods->open(never, &other), SAGA_EINVAL);
  assert_int_equal(uv_loop_close(&other), 0);
  saga_transport_free(never); /* a never-opened transport is just destroyed */
  fake a;
  attach(&e, &a, "a");
  assert_int_equal(a.t->methods->open(a.t, &e.loop), SAGA_ESTATE);
  assert_int_equal(saga_mem_hub_close(e.hub), SAGA_EBUSY);
  detach(&a);
  env_free(&e);
}

static void test_hub_allocation_failures(void **state) {
  (void)state;
  /* Fail each allocation of a small scenario in turn: every failure is reported cleanly
   * and nothing leaks. */
  for (uint64_t n = 1;; n++) {
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    saga_clock *clock = NULL;
    assert_int_equal(saga_clock_manual_new(&clock, START, NULL), SAGA_OK);
    th_alloc ta;
    th_alloc_init(&ta);
    ta.fail_at = n;
    saga_mem_faults f = {.seed = 7, .duplicate = 1.0};
    saga_mem_hub *hub = NULL;
    int done = 0;
    int rc = saga_mem_hub_new(&hub, &loop, clock, &f, &ta.a);
    if (rc == SAGA_OK) {
      fake a, b;
      memset(&a, 0, sizeof a);
      memset(&b, 0, sizeof b);
      a.host = b.host = (saga__transport_host){.deliver = fake_deliver, .sent = fake_sent, .closed = fake_closed, .log = fake_log};
      a.host.ctx = &a;
      b.host.ctx = &b;
      int ok = saga_mem_transport_new(&a.t, hub) == SAGA_OK;
      if (ok) ok = saga_mem_transport_new(&b.t, hub) == SAGA_OK;
      if (ok) {
        a.t->saga__host = &a.host;
        b.t->saga__host = &b.host;
        assert_int_equal(a.t->methods->open(a.t, &loop), SAGA_OK);
        assert_int_equal(b.t->methods->open(b.t, &loop), SAGA_OK);
        ok = b.t->methods->subscribe(b.t, "q") == SAGA_OK;
      }
      if (ok) ok = a.t->methods->send(a.t, "q", "m", 1, 1) == SAGA_OK;
      if (ok) {
        th_drain(&loop);
        /* The duplicate may have been skipped for want of memory; the original arrives. */
        assert_true(b.nd >= 1);
        done = ta.failed == 0;
      }
      if (a.t != NULL) a.t->methods->destroy(a.t);
      if (b.t != NULL) b.t->methods->destroy(b.t);
      assert_int_equal(saga_mem_hub_close(hub), SAGA_OK);
    } else {
      assert_int_equal(rc, SAGA_ENOMEM);
      assert_null(hub);
    }
    th_drain(&loop);
    assert_int_equal(ta.live, 0);
    saga_clock_free(clock);
    assert_int_equal(uv_loop_close(&loop), 0);
    if (done) break;
    assert_true(n < 100);
  }
}

/* ---- bounds: one copy per (sender, token), a limit per channel --------------------------- */

static saga_mem_queue_stats qstats(env *e, const char *channel) {
  saga_mem_queue_stats q;
  memset(&q, 0xff, sizeof q);
  assert_int_equal(saga_mem_hub_queue_stats(e->hub, channel, &q, sizeof q), SAGA_OK);
  return q;
}

/* Resends of a message the hub still holds add nothing: a channel nobody consumes keeps one
 * copy per token, however often the outbox resends; the consumer that comes gets each once.
 * Once delivered, a resend is a new copy again (the receiving node deduplicates). */
static void test_resends_held_once(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  fake a, b, c;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  attach(&e, &c, "c");
  for (int i = 0; i < 1000; i++) {
    send_str(&a, "nobody", "resent", 1);
    if (i % 100 == 0) settle(&e); /* parked in between, as with a real resend interval */
  }
  send_str(&a, "nobody", "other", 2);
  send_str(&c, "nobody", "same token, other sender", 1);
  settle(&e);
  saga_mem_queue_stats q = qstats(&e, "nobody");
  assert_int_equal(q.messages, 3);
  assert_int_equal(q.bytes, strlen("resent") + strlen("other") +
                                strlen("same token, other sender"));
  assert_int_equal(q.deduplicated, 999);
  assert_int_equal(q.refused, 0);
  assert_int_equal(stats(&e).waiting, 3);
  assert_int_equal(stats(&e).sent, 3);
  /* All channels together; an unknown channel is empty; a size below the struct's first
   * version is refused and nothing written (docs/abi.md). */
  assert_int_equal(qstats(&e, NULL).messages, 3);
  assert_int_equal(qstats(&e, "unknown").messages, 0);
  uint64_t first[2] = {0, 77};
  assert_int_equal(saga_mem_hub_queue_stats(e.hub, "nobody", (saga_mem_queue_stats *)first,
                                            sizeof first[0]),
                   SAGA_EINVAL);
  assert_int_equal(first[0], 0);
  assert_int_equal(first[1], 77);
  assert_int_equal(saga_mem_hub_queue_stats(NULL, NULL, &q, sizeof q), SAGA_EINVAL);
  sub(&b, "nobody");
  settle(&e);
  assert_int_equal(b.nd, 3);
  assert_string_equal(b.d[0].data, "resent");
  assert_int_equal(qstats(&e, "nobody").messages, 0);
  /* Delivered and not acknowledged: a resend is a new copy. */
  send_str(&a, "nobody", "resent", 1);
  settle(&e);
  assert_int_equal(b.nd, 4);
  detach(&a);
  detach(&b);
  detach(&c);
  env_free(&e);
}

/* A channel holds at most max_messages / max_bytes: past them send() refuses with the
 * transient SAGA_EBUSY, logged once until the channel empties; an empty channel always takes
 * one message. */
static void test_channel_limit(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  assert_int_equal(saga_mem_hub_set_limits(NULL, 1, 1), SAGA_EINVAL);
  assert_int_equal(saga_mem_hub_set_limits(e.hub, 3, 0), SAGA_OK);
  fake a, b;
  attach(&e, &a, "a");
  attach(&e, &b, "b");
  char msg[16];
  int ok = 0, busy = 0;
  for (uint64_t k = 1; k <= 10; k++) {
    snprintf(msg, sizeof msg, "m%llu", (unsigned long long)k);
    int rc = a.t->methods->send(a.t, "full", msg, strlen(msg), k);
    ok += rc == SAGA_OK;
    busy += rc == SAGA_EBUSY;
  }
  assert_int_equal(ok, 3);
  assert_int_equal(busy, 7);
  assert_int_equal(a.warnings, 1); /* once */
  assert_non_null(strstr(a.last_log, "'full'"));
  assert_non_null(strstr(a.last_log, "SAGA_EBUSY"));
  /* A resend of a held message is still taken (it adds nothing). */
  send_str(&a, "full", "m1", 1);
  saga_mem_queue_stats q = qstats(&e, "full");
  assert_int_equal(q.messages, 3);
  assert_int_equal(q.refused, 7);
  assert_int_equal(q.deduplicated, 1);
  /* Other channels are not affected. */
  send_str(&a, "elsewhere", "x", 100);
  /* A consumer empties the channel: sends are taken again, and a new episode is logged. */
  sub(&b, "full");
  settle(&e);
  assert_int_equal(b.nd, 3);
  for (uint64_t k = 4; k <= 6; k++) send_str(&a, "full", "again", k);
  settle(&e);
  assert_int_equal(b.nd, 6);
  detach(&b);
  for (uint64_t k = 20; k <= 24; k++)
    assert_int_equal(a.t->methods->send(a.t, "full", "more", 4, k), k <= 22 ? SAGA_OK : SAGA_EBUSY);
  assert_int_equal(qstats(&e, "full").messages, 3);
  assert_int_equal(a.warnings, 2);
  /* The byte bound, and the one message an empty channel always takes. */
  assert_int_equal(saga_mem_hub_set_limits(e.hub, 0, 10), SAGA_OK);
  char big[64];
  memset(big, 'b', sizeof big);
  assert_int_equal(a.t->methods->send(a.t, "bytes", big, sizeof big, 30), SAGA_OK);
  assert_int_equal(a.t->methods->send(a.t, "bytes", "x", 1, 31), SAGA_EBUSY);
  assert_int_equal(qstats(&e, "bytes").bytes, sizeof big);
  detach(&a);
  env_free(&e);
}

/* Node level: a saga whose step goes to a channel nobody consumes, resent every 10 ms for
 * 2 s of clock time. The hub holds one copy of the command, not one per resend. */
typedef struct clock_at {
  saga_clock *clock;
  uint64_t until;
} clock_at;

static int clock_reached(void *arg) {
  clock_at *c = arg;
  return saga_clock_now(c->clock) >= c->until;
}

static void test_node_resends_bounded(void **state) {
  (void)state;
  env e;
  env_init(&e, NULL);
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, e.hub), SAGA_OK);
  saga_node_config nc;
  saga_node_config_init(&nc);
  nc.name = "orch";
  nc.db_path = ":memory:"; /* a new database, whatever the config version */
  nc.transport = t;
  nc.clock = e.clock;
  nc.resend_ms = 10;
  saga_node *n = NULL;
  char err[256];
  assert_int_equal(saga_node_open(&n, &e.loop, &nc, err, sizeof err), SAGA_OK);
  static const saga_step steps[] = {
      {.name = "ONE", .channel = "nobody", .action = "x.do", .compensation = "x.undo"}};
  static const saga_definition def = {SAGA_DEFINITION_VERSION, "p", 1, steps, 1, 0, sizeof(saga_step)};
  assert_int_equal(saga_node_register(n, &def), SAGA_OK);
  assert_int_equal(saga_node_start(n, NULL), SAGA_OK);
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  assert_int_equal(saga_data_set_str(d, "pad", "0123456789abcdef0123456789abcdef"), SAGA_OK);
  assert_int_equal(saga_start(n, "p", d, NULL, NULL, NULL), SAGA_OK);
  saga_data_free(d);
  clock_at at = {e.clock, saga_clock_now(e.clock) + 2000};
  assert_int_equal(th_run_manual(&e.loop, e.clock, clock_reached, &at, 5000), 0);
  saga_mem_queue_stats q = qstats(&e, "nobody");
  printf("after 2 s at resend_ms 10: %llu held (%llu bytes), %llu resends deduplicated\n",
         (unsigned long long)q.messages, (unsigned long long)q.bytes,
         (unsigned long long)q.deduplicated);
  assert_int_equal(q.messages, 1);
  assert_true(q.bytes > 0 && q.bytes < 4096);
  assert_true(q.deduplicated >= 100);
  saga_node_close(n, NULL, NULL);
  th_drain(&e.loop);
  env_free(&e);
}

/* ---- real clock ------------------------------------------------------------------------- */

static int got_one(void *arg) { return ((fake *)arg)->nd >= 1; }

static void test_real_clock_hub(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  th_alloc ta;
  th_alloc_init(&ta);
  saga_mem_faults f = {.seed = th_seed(8), .delay = 1.0, .delay_max_ms = 5};
  saga_mem_hub *hub = NULL;
  /* No clock given: the hub makes a real one of its own and closes it with itself. */
  assert_int_equal(saga_mem_hub_new(&hub, &loop, NULL, &f, &ta.a), SAGA_OK);
  fake a, b;
  attach_on(hub, &loop, &a, "a");
  attach_on(hub, &loop, &b, "b");
  sub(&b, "q");
  send_str(&a, "q", "later", 1);
  assert_int_equal(th_run_real(&loop, got_one, &b, 5000), 0);
  assert_string_equal(b.d[0].data, "later");
  saga_mem_stats st;
  saga_mem_hub_stats(hub, &st, sizeof st);
  assert_int_equal(st.delayed, 1);
  detach(&a);
  detach(&b);
  assert_int_equal(saga_mem_hub_close(hub), SAGA_OK);
  th_drain(&loop);
  assert_int_equal(ta.live, 0);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_delivers_to_subscriber),
      cmocka_unit_test(test_ack_confirms_once),
      cmocka_unit_test(test_no_ack_no_sent),
      cmocka_unit_test(test_waits_until_subscribe),
      cmocka_unit_test(test_round_robin),
      cmocka_unit_test(test_refused_delivery_waits),
      cmocka_unit_test(test_fault_drop),
      cmocka_unit_test(test_fault_duplicate),
      cmocka_unit_test(test_fault_delay),
      cmocka_unit_test(test_fault_reorder),
      cmocka_unit_test(test_fault_drop_ack),
      cmocka_unit_test(test_bad_fault_settings),
      cmocka_unit_test(test_same_seed_same_run),
      cmocka_unit_test(test_close_with_messages_in_flight),
      cmocka_unit_test(test_hub_close_busy),
      cmocka_unit_test(test_hub_allocation_failures),
      cmocka_unit_test(test_real_clock_hub),
      cmocka_unit_test(test_resends_held_once),
      cmocka_unit_test(test_channel_limit),
      cmocka_unit_test(test_node_resends_bounded),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
