/*
 * The Redis Streams transport against a real redis-server started by each test (appendonly,
 * fsync always, its own port and folder). Transports are driven through the adapter
 * interface with a fake host recording the callbacks, as tests/test_mem_transport.c does;
 * the last test runs two real nodes over Redis. A synchronous hiredis client inspects the
 * server (pending entries, groups). Skipped when redis-server is not installed.
 *
 * Everything waits for a condition (th_run_real with a predicate); the timeouts are safety
 * nets, never the synchronisation.
 */
#include "harness.h"

#include <inttypes.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>
#include <sqlite3.h>

#include "internal.h"
#include "saga/transport_redis.h"
#include "servers.h"

#define MAXD 512
#define WAIT_MS 15000

typedef struct delivery {
  char data[64];
  size_t len;
  uint64_t tag;
  uint64_t at_ns;
} delivery;

typedef struct dead {
  char data[64];
  char reason[200];
  uint64_t tag;
} dead;

typedef struct fake {
  saga__transport_host host;
  saga_transport *t;
  const char *name;
  delivery d[MAXD];
  size_t nd;
  uint64_t sent[MAXD];
  int sent_status[MAXD];
  size_t ns;
  dead dl[16];
  size_t ndl;
  int closed;
  int auto_ack;          /* ack every delivery from inside the callback */
  const char *never_ack; /* ... except deliveries of this data */
  int ack_dead;          /* ack dead letters, as the node does once it recorded them */
  int close_in_deliver;  /* ack, then close the transport from inside the first delivery */
  int lost, back;        /* log lines: a connection lost / re-established */
  int auth_errors;       /* ERROR log lines saying authentication failed */
  int auth_back;         /* log lines saying the credentials are accepted again */
  /* Instead of recording (for long runs): called for every confirmation / delivery. */
  void (*on_sent)(void *arg, uint64_t token, int status);
  void (*on_deliver)(void *arg, const char *data, size_t len);
  void *hook_arg;
} fake;

static int verbose(void) { return getenv("SAGA_TEST_VERBOSE") != NULL; }

static int fake_deliver(void *ctx, const char *channel, const void *data, size_t len,
                        uint64_t tag) {
  fake *f = ctx;
  (void)channel;
  assert_int_equal(f->closed, 0); /* never called into a closed transport */
  if (f->on_deliver != NULL) {
    f->on_deliver(f->hook_arg, data, len);
    if (f->auto_ack) f->t->methods->ack(f->t, tag);
    return SAGA_OK;
  }
  assert_true(f->nd < MAXD);
  assert_true(len < sizeof f->d[0].data);
  assert_true(tag != 0 && (tag >> 63) == 0); /* bit 63 is the core's */
  delivery *d = &f->d[f->nd++];
  memcpy(d->data, data, len);
  d->data[len] = '\0';
  d->len = len;
  d->tag = tag;
  d->at_ns = uv_hrtime();
  int poison =
      f->never_ack != NULL && len == strlen(f->never_ack) && memcmp(data, f->never_ack, len) == 0;
  if (f->auto_ack && !poison) f->t->methods->ack(f->t, tag);
  if (f->close_in_deliver) {
    f->close_in_deliver = 0;
    f->t->methods->ack(f->t, tag);
    f->t->methods->close(f->t);
  }
  return SAGA_OK;
}

static int fake_dead(void *ctx, const char *channel, const void *data, size_t len, uint64_t tag,
                     const char *reason) {
  fake *f = ctx;
  (void)channel;
  assert_int_equal(f->closed, 0);
  assert_true(f->ndl < 16);
  dead *d = &f->dl[f->ndl++];
  assert_true(len < sizeof d->data);
  memcpy(d->data, data, len);
  d->data[len] = '\0';
  snprintf(d->reason, sizeof d->reason, "%s", reason);
  d->tag = tag;
  if (f->ack_dead) f->t->methods->ack(f->t, tag);
  return SAGA_OK;
}

static void fake_sent(void *ctx, uint64_t token, int status) {
  fake *f = ctx;
  assert_int_equal(f->closed, 0);
  if (f->on_sent != NULL) {
    f->on_sent(f->hook_arg, token, status);
    return;
  }
  assert_true(f->ns < MAXD);
  f->sent_status[f->ns] = status;
  f->sent[f->ns++] = token;
}

static void fake_closed(void *ctx) { ((fake *)ctx)->closed++; }

static void fake_log(void *ctx, saga_log_level level, const char *msg) {
  fake *f = ctx;
  if (verbose()) printf("  [%s] %d %s\n", f->name, (int)level, msg);
  if (level >= SAGA_LOG_WARN && strstr(msg, "retrying") != NULL) f->lost++;
  if (strstr(msg, "re-established") != NULL) f->back++;
  if (level == SAGA_LOG_ERROR && strstr(msg, "authentication failed") != NULL) f->auth_errors++;
  if (strstr(msg, "accepts the credentials again") != NULL) f->auth_back++;
}

typedef struct env {
  uv_loop_t loop;
  th_server srv;
  th_alloc ta;
  char prefix[32];
  const char *user, *pw; /* credentials of the transports attach() and open_node() make */
  const char *admin_pw;  /* the default user's password (requirepass) for cli() */
} env;

/* The running test's server, stopped by the teardown even when an assertion failed. */
static th_server *live_server;

static int teardown(void **state) {
  (void)state;
  if (live_server != NULL) th_server_free(live_server);
  live_server = NULL;
  return 0;
}

/* Starts a server; returns 0, or 1 when the test must be skipped. */
static int env_init_conf(env *e, const char *prefix, const char *conf) {
  memset(e, 0, sizeof *e);
  if (!th_have_program("redis-server")) {
    printf("redis-server is not installed: skipping\n");
    return 1;
  }
  th_alloc_init(&e->ta);
  assert_int_equal(uv_loop_init(&e->loop), 0);
  assert_int_equal(th_server_start_conf(&e->srv, "redis", conf), 0);
  live_server = &e->srv;
  snprintf(e->prefix, sizeof e->prefix, "%s", prefix);
  return 0;
}

static int env_init(env *e, const char *prefix) { return env_init_conf(e, prefix, NULL); }

static void env_free(env *e) {
  th_drain(&e->loop);
  assert_int_equal(uv_loop_close(&e->loop), 0); /* every handle of the adapter closed */
  th_server_free(&e->srv);
  live_server = NULL;
  assert_int_equal(e->ta.live, 0); /* everything the adapter allocated came back */
}

/* Creates and opens a transport; returns open's code (on failure f->t is left to destroy). */
static int attach_cfg(env *e, fake *f, const char *name, uint32_t claim_idle_ms,
                      uint32_t max_deliveries, int fail_fast) {
  memset(f, 0, sizeof *f);
  f->name = name;
  f->host.deliver = fake_deliver;
  f->host.sent = fake_sent;
  f->host.closed = fake_closed;
  f->host.log = fake_log;
  f->host.dead_letter = fake_dead;
  f->host.ctx = f;
  saga_redis_config cfg;
  saga_redis_config_init(&cfg);
  cfg.port = e->srv.port;
  cfg.prefix = e->prefix;
  cfg.claim_idle_ms = claim_idle_ms;
  cfg.max_deliveries = max_deliveries;
  cfg.reconnect_min_ms = 20;
  cfg.reconnect_max_ms = 200;
  cfg.alloc = &e->ta.a;
  cfg.username = e->user;
  cfg.password = e->pw;
  cfg.fail_fast = fail_fast;
  assert_int_equal(saga_redis_transport_new(&f->t, &cfg), SAGA_OK);
  assert_int_equal(f->t->methods->version, SAGA_TRANSPORT_VERSION);
  assert_string_equal(f->t->methods->name, "redis");
  f->t->saga__host = &f->host;
  return f->t->methods->open(f->t, &e->loop);
}

static void attach(env *e, fake *f, const char *name, uint32_t claim_idle_ms,
                   uint32_t max_deliveries) {
  assert_int_equal(attach_cfg(e, f, name, claim_idle_ms, max_deliveries, 0), SAGA_OK);
}

static void sub(fake *f, const char *channel) {
  assert_int_equal(f->t->methods->subscribe(f->t, channel), SAGA_OK);
}

static int send_bytes(fake *f, const char *channel, const void *p, size_t len, uint64_t token) {
  return f->t->methods->send(f->t, channel, p, len, token);
}

static int send_str(fake *f, const char *channel, const char *s, uint64_t token) {
  return send_bytes(f, channel, s, strlen(s), token);
}

static int closed_pred(void *arg) { return ((fake *)arg)->closed > 0; }

static void detach(env *e, fake *f) {
  if (f->t == NULL) return;
  f->t->methods->close(f->t);
  assert_int_equal(th_run_real(&e->loop, closed_pred, f, WAIT_MS), 0);
  f->t->methods->destroy(f->t);
  f->t = NULL;
  uv_run(&e->loop, UV_RUN_NOWAIT);
  assert_int_equal(f->closed, 1); /* exactly once */
}

static int sent_index(const fake *f, uint64_t token) {
  for (size_t i = 0; i < f->ns; i++)
    if (f->sent[i] == token) return (int)i;
  return -1;
}

static int count_data(const fake *f, const char *s) {
  int n = 0;
  for (size_t i = 0; i < f->nd; i++)
    if (strcmp(f->d[i].data, s) == 0) n++;
  return n;
}

/* ---- a synchronous client to look at the server ----------------------------------------- */

static redisContext *cli(env *e) {
  redisContext *c = redisConnect("127.0.0.1", e->srv.port);
  assert_non_null(c);
  assert_int_equal(c->err, 0);
  if (e->admin_pw != NULL) {
    redisReply *r = redisCommand(c, "AUTH %s", e->admin_pw);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STATUS);
    freeReplyObject(r);
  }
  return c;
}

/* Entries of channel's group pending (delivered, not acknowledged). */
static long long pending(env *e, const char *channel) {
  redisContext *c = cli(e);
  char key[128];
  snprintf(key, sizeof key, "%s:%s", e->prefix, channel);
  redisReply *r = redisCommand(c, "XPENDING %s %s", key, channel);
  assert_non_null(r);
  long long n = -1;
  if (r->type == REDIS_REPLY_ARRAY && r->elements >= 1 &&
      r->element[0]->type == REDIS_REPLY_INTEGER)
    n = r->element[0]->integer;
  freeReplyObject(r);
  redisFree(c);
  return n;
}

/* Number of groups on a channel's stream, and whether the first is named after it. */
static long long groups(env *e, const char *channel, int *named_ok) {
  redisContext *c = cli(e);
  char key[128];
  snprintf(key, sizeof key, "%s:%s", e->prefix, channel);
  redisReply *r = redisCommand(c, "XINFO GROUPS %s", key);
  assert_non_null(r);
  long long n = r->type == REDIS_REPLY_ARRAY ? (long long)r->elements : -1;
  *named_ok = 0;
  if (n >= 1 && r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements >= 2)
    *named_ok = strcmp(r->element[0]->element[1]->str, channel) == 0;
  freeReplyObject(r);
  redisFree(c);
  return n;
}

/* After a restart the port accepts before Redis finished loading its append-only file
 * (commands then fail with -LOADING): wait until it answers PING. */
static int ready_pred(void *arg) {
  env *e = arg;
  redisContext *c = redisConnect("127.0.0.1", e->srv.port);
  int ok = 0;
  if (c != NULL && c->err == 0 && e->admin_pw != NULL) {
    redisReply *r = redisCommand(c, "AUTH %s", e->admin_pw);
    if (r != NULL) freeReplyObject(r);
  }
  if (c != NULL && c->err == 0) {
    redisReply *r = redisCommand(c, "PING");
    ok = r != NULL && r->type == REDIS_REPLY_STATUS;
    if (r != NULL) freeReplyObject(r);
  }
  if (c != NULL) redisFree(c);
  return ok;
}

static void restart_ready(env *e) {
  assert_int_equal(th_server_restart(&e->srv), 0);
  assert_int_equal(th_run_real(&e->loop, ready_pred, e, WAIT_MS), 0);
}

typedef struct pend_ctx {
  env *e;
  const char *channel;
  long long want;
} pend_ctx;

static int pending_pred(void *arg) {
  pend_ctx *p = arg;
  return pending(p->e, p->channel) == p->want;
}

static void wait_pending(env *e, const char *channel, long long want) {
  pend_ctx p = {e, channel, want};
  assert_int_equal(th_run_real(&e->loop, pending_pred, &p, WAIT_MS), 0);
}

/* ---- predicates ------------------------------------------------------------------------- */

typedef struct count_ctx {
  const size_t *n;
  size_t want;
} count_ctx;

static int count_pred(void *arg) {
  count_ctx *c = arg;
  return *c->n >= c->want;
}

static int wait_count(env *e, const size_t *n, size_t want) {
  count_ctx c = {n, want};
  return th_run_real(&e->loop, count_pred, &c, WAIT_MS);
}

static int int_pred(void *arg) {
  count_ctx *c = arg;
  return *(const int *)c->n >= (int)c->want;
}

static int wait_int(env *e, const int *n, int want) {
  count_ctx c = {(const size_t *)(const void *)n, (size_t)want};
  return th_run_real(&e->loop, int_pred, &c, WAIT_MS);
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_config(void **state) {
  (void)state;
  saga_transport *t = NULL;
  saga_redis_config cfg;
  saga_redis_config_init(&cfg);
  assert_int_equal(cfg.struct_version, SAGA_REDIS_CONFIG_VERSION);
  assert_int_equal(cfg.port, 6379);
  assert_int_equal(cfg.claim_idle_ms, 30000);
  assert_int_equal(cfg.max_deliveries, 10);
  assert_int_equal(saga_redis_transport_new(NULL, &cfg), SAGA_EINVAL);
  cfg.struct_version = 99;
  assert_int_equal(saga_redis_transport_new(&t, &cfg), SAGA_EVERSION);
  saga_redis_config_init(&cfg);
  cfg.reconnect_min_ms = 500;
  cfg.reconnect_max_ms = 100;
  assert_int_equal(saga_redis_transport_new(&t, &cfg), SAGA_EINVAL);
  cfg.reconnect_max_ms = 1000;
  cfg.port = 70000;
  assert_int_equal(saga_redis_transport_new(&t, &cfg), SAGA_EINVAL);
  assert_null(t);
  /* A never-opened transport: methods refuse, destroy frees (no server needed). */
  th_alloc ta;
  th_alloc_init(&ta);
  saga_redis_config_init(&cfg);
  cfg.alloc = &ta.a;
  assert_int_equal(saga_redis_transport_new(&t, &cfg), SAGA_OK);
  assert_int_equal(t->methods->subscribe(t, "x"), SAGA_ESTATE);
  assert_int_equal(t->methods->send(t, "x", "a", 1, 1), SAGA_ESTATE);
  saga_redis_stats st;
  assert_int_equal(saga_redis_stats_get(t, &st), SAGA_OK);
  assert_int_equal(st.auth_failures, 0);
  assert_int_equal(saga_redis_stats_get(t, NULL), SAGA_EINVAL);
  assert_int_equal(saga_redis_stats_get(NULL, &st), SAGA_EINVAL);
  saga_transport_free(t);
  assert_int_equal(ta.live, 0);

  /* Version 2: a user needs a password; empty strings mean unset. */
  saga_redis_config_init(&cfg);
  cfg.username = "saga";
  assert_int_equal(saga_redis_transport_new(&t, &cfg), SAGA_EINVAL);
  cfg.password = "";
  assert_int_equal(saga_redis_transport_new(&t, &cfg), SAGA_EINVAL);
  cfg.username = "";
  assert_int_equal(saga_redis_transport_new(&t, &cfg), SAGA_OK);
  saga_transport_free(t);
  cfg.struct_version = 4;
  assert_int_equal(saga_redis_transport_new(&t, &cfg), SAGA_EVERSION);
  /* A version 2 config, exactly as large as the version 2 layout: accepted, fail_fast not
   * read (ASan would see it). */
  saga_redis_config_init(&cfg);
  cfg.struct_version = 2;
  cfg.alloc = &ta.a;
  void *v2 = malloc(offsetof(saga_redis_config, fail_fast));
  assert_non_null(v2);
  memcpy(v2, &cfg, offsetof(saga_redis_config, fail_fast));
  assert_int_equal(saga_redis_transport_new(&t, v2), SAGA_OK);
  saga_transport_free(t);
  free(v2);
  assert_int_equal(saga_redis_connected(NULL), SAGA_EINVAL);

  /* A version 1 config, exactly as large as the version 1 layout (on the heap, so that
   * ASan sees any read past it): accepted, its fields used, nothing more read. */
  typedef struct v1_config {
    int struct_version;
    const char *host;
    int port;
    const char *prefix, *consumer;
    uint32_t claim_idle_ms, max_deliveries, reconnect_min_ms, reconnect_max_ms;
    const saga_allocator *alloc;
  } v1_config;
  assert_int_equal(sizeof(v1_config), offsetof(saga_redis_config, username));
  v1_config *v1 = malloc(sizeof *v1);
  assert_non_null(v1);
  memset(v1, 0, sizeof *v1);
  v1->struct_version = 1;
  v1->port = 70000; /* read: refused */
  assert_int_equal(saga_redis_transport_new(&t, (const saga_redis_config *)(void *)v1),
                   SAGA_EINVAL);
  v1->port = 6390;
  v1->alloc = &ta.a;
  assert_int_equal(saga_redis_transport_new(&t, (const saga_redis_config *)(void *)v1),
                   SAGA_OK);
  saga_transport_free(t);
  free(v1);
  assert_int_equal(ta.live, 0);
}

/* Send, deliver (bytes intact, in order), confirm only on XADD's reply, ack -> XACK; an
 * error reply is reported as a failed send. */
static void test_send_deliver_ack(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t1")) skip();
  fake a, b;
  attach(&e, &a, "a", 30000, 10);
  attach(&e, &b, "b", 30000, 10);
  sub(&a, "ch");
  sub(&a, "ch"); /* again: harmless */
  static const char bin[] = {'a', '\0', 'b'};
  assert_int_equal(send_str(&b, "ch", "m0", 1), SAGA_OK);
  assert_int_equal(send_bytes(&b, "ch", bin, sizeof bin, 2), SAGA_OK);
  assert_int_equal(send_str(&b, "ch", "", 3), SAGA_OK);
  assert_int_equal(send_str(&b, "ch", "m3", 4), SAGA_OK);
  assert_int_equal(b.ns, 0); /* never confirmed before the broker answered */
  assert_int_equal(wait_count(&e, &a.nd, 4), 0);
  assert_int_equal(wait_count(&e, &b.ns, 4), 0);
  for (size_t i = 0; i < 4; i++) {
    assert_int_equal(b.sent[i], i + 1);
    assert_int_equal(b.sent_status[i], SAGA_OK);
  }
  assert_string_equal(a.d[0].data, "m0");
  assert_int_equal(a.d[1].len, 3);
  assert_memory_equal(a.d[1].data, bin, 3);
  assert_int_equal(a.d[2].len, 0);
  assert_string_equal(a.d[3].data, "m3");
  assert_true(a.d[0].tag != a.d[1].tag);
  assert_int_equal(pending(&e, "ch"), 4); /* delivered, not acknowledged yet */
  for (size_t i = 0; i < 4; i++) a.t->methods->ack(a.t, a.d[i].tag);
  a.t->methods->ack(a.t, a.d[0].tag); /* repeated: ignored */
  a.t->methods->ack(a.t, 777777);     /* unknown: ignored */
  wait_pending(&e, "ch", 0);

  /* An error reply: the stream key holds a string, XADD answers WRONGTYPE. */
  redisContext *c = cli(&e);
  redisReply *r = redisCommand(c, "SET t1:bad x");
  freeReplyObject(r);
  redisFree(c);
  assert_int_equal(send_str(&b, "bad", "oops", 99), SAGA_OK);
  assert_int_equal(wait_count(&e, &b.ns, 5), 0);
  assert_int_equal(b.sent[4], 99);
  assert_true(b.sent_status[4] < 0);
  assert_int_equal(a.nd, 4);

  detach(&e, &a);
  detach(&e, &b);
  env_free(&e);
}

/* An entry never acknowledged is claimed again after claim_idle_ms (not before) and
 * delivered again, with a new tag; one left by a closed (dead) replica goes to another. */
static void test_reclaim(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t2")) skip();
  const uint32_t idle = 600;
  fake a, b;
  attach(&e, &a, "a", idle, 10);
  attach(&e, &b, "b", idle, 10);
  sub(&a, "ch");
  assert_int_equal(send_str(&b, "ch", "x", 1), SAGA_OK);
  assert_int_equal(wait_count(&e, &a.nd, 1), 0);
  assert_int_equal(wait_count(&e, &a.nd, 2), 0);
  assert_string_equal(a.d[1].data, "x");
  assert_true(a.d[1].tag != a.d[0].tag);
  uint64_t gap_ms = (a.d[1].at_ns - a.d[0].at_ns) / 1000000;
  assert_true(gap_ms >= idle);
  a.t->methods->ack(a.t, a.d[1].tag);
  wait_pending(&e, "ch", 0);
  a.t->methods->ack(a.t, a.d[0].tag); /* the older delivery's tag: harmless */

  /* A replica dies with a delivery unacknowledged: another replica gets it. */
  assert_int_equal(send_str(&b, "ch", "y", 2), SAGA_OK);
  assert_int_equal(wait_count(&e, &a.nd, 3), 0);
  assert_string_equal(a.d[2].data, "y");
  detach(&e, &a);
  fake c;
  attach(&e, &c, "c", idle, 10);
  c.auto_ack = 1;
  sub(&c, "ch");
  assert_int_equal(wait_count(&e, &c.nd, 1), 0);
  assert_string_equal(c.d[0].data, "y");
  wait_pending(&e, "ch", 0);
  detach(&e, &b);
  detach(&e, &c);
  env_free(&e);
}

/* Two replicas subscribed to one channel share its group: each entry goes to one of them. */
static void test_replicas_share(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t3")) skip();
  fake r1, r2, s;
  attach(&e, &r1, "r1", 30000, 10);
  attach(&e, &r2, "r2", 30000, 10);
  attach(&e, &s, "s", 30000, 10);
  r1.auto_ack = r2.auto_ack = 1;
  sub(&r1, "ch");
  sub(&r2, "ch");
  const int n = 200;
  for (int i = 0; i < n; i++) {
    char m[16];
    snprintf(m, sizeof m, "m%d", i);
    assert_int_equal(send_str(&s, "ch", m, (uint64_t)i + 1), SAGA_OK);
  }
  assert_int_equal(wait_count(&e, &s.ns, (size_t)n), 0);
  size_t total = 0;
  for (;;) {
    total = r1.nd + r2.nd;
    if (total >= (size_t)n) break;
    size_t want1 = r1.nd + 1;
    /* Wait for any further delivery to either replica. */
    count_ctx c1 = {&r1.nd, want1};
    if (th_run_real(&e.loop, count_pred, &c1, 200) != 0 && r1.nd + r2.nd == total)
      assert_int_equal(wait_count(&e, &r2.nd, r2.nd + 1), 0);
  }
  assert_int_equal(total, (size_t)n);
  for (int i = 0; i < n; i++) {
    char m[16];
    snprintf(m, sizeof m, "m%d", i);
    assert_int_equal(count_data(&r1, m) + count_data(&r2, m), 1);
  }
  assert_true(r1.nd > 0);
  assert_true(r2.nd > 0);
  printf("replica 1 got %zu, replica 2 got %zu\n", r1.nd, r2.nd);
  wait_pending(&e, "ch", 0);
  int named = 0;
  assert_int_equal(groups(&e, "ch", &named), 1);
  assert_true(named);
  detach(&e, &r1);
  detach(&e, &r2);
  detach(&e, &s);
  env_free(&e);
}

/* The group is created once, by whoever comes first, and never reset: a message sent
 * before its consumer ever subscribed is delivered, and later subscribers do not get
 * acknowledged entries again. */
static void test_group_idempotent(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t4")) skip();
  fake s, a;
  attach(&e, &s, "s", 30000, 10);
  assert_int_equal(send_str(&s, "ch", "early", 1), SAGA_OK);
  assert_int_equal(wait_count(&e, &s.ns, 1), 0);
  assert_int_equal(s.sent_status[0], SAGA_OK);
  int named = 0;
  assert_int_equal(groups(&e, "ch", &named), 1); /* the sender created it */
  assert_true(named);
  attach(&e, &a, "a", 30000, 10);
  a.auto_ack = 1;
  sub(&a, "ch");
  assert_int_equal(wait_count(&e, &a.nd, 1), 0);
  assert_string_equal(a.d[0].data, "early");
  wait_pending(&e, "ch", 0);
  fake a2;
  attach(&e, &a2, "a2", 30000, 10);
  a2.auto_ack = 1;
  sub(&a2, "ch"); /* BUSYGROUP: joins the existing group */
  fake s2;
  attach(&e, &s2, "s2", 30000, 10); /* another sender: creates nothing new either */
  assert_int_equal(send_str(&s2, "ch", "late", 1), SAGA_OK);
  assert_int_equal(wait_count(&e, &s2.ns, 1), 0);
  while (count_data(&a, "late") + count_data(&a2, "late") == 0) {
    size_t na = a.nd, na2 = a2.nd;
    count_ctx c1 = {&a.nd, na + 1};
    if (th_run_real(&e.loop, count_pred, &c1, 200) != 0 && a2.nd == na2)
      assert_int_equal(wait_count(&e, &a2.nd, na2 + 1), 0);
  }
  assert_int_equal(count_data(&a, "late") + count_data(&a2, "late"), 1);
  assert_int_equal(count_data(&a, "early") + count_data(&a2, "early"), 1);
  assert_int_equal(groups(&e, "ch", &named), 1);
  wait_pending(&e, "ch", 0);
  detach(&e, &a);
  detach(&e, &a2);
  detach(&e, &s);
  detach(&e, &s2);
  env_free(&e);
}

/* A poison entry (never acknowledged) is delivered max_deliveries times, then handed to the
 * dead-letter callback and acknowledged; other entries keep flowing meanwhile. */
static void test_poison(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t5")) skip();
  fake a, s;
  attach(&e, &a, "a", 300, 3);
  attach(&e, &s, "s", 300, 3);
  a.auto_ack = 1;
  a.never_ack = "poison";
  a.ack_dead = 1;
  sub(&a, "ch");
  assert_int_equal(send_str(&s, "ch", "poison", 1), SAGA_OK);
  for (int i = 0; i < 20; i++) {
    char m[16];
    snprintf(m, sizeof m, "n%d", i);
    assert_int_equal(send_str(&s, "ch", m, (uint64_t)i + 2), SAGA_OK);
  }
  assert_int_equal(wait_count(&e, &a.nd, 21), 0);
  assert_int_equal(a.ndl, 0); /* the others did not wait for the poison */
  for (int i = 0; i < 20; i++) {
    char m[16];
    snprintf(m, sizeof m, "n%d", i);
    assert_int_equal(count_data(&a, m), 1);
  }
  assert_int_equal(wait_count(&e, &a.ndl, 1), 0);
  assert_string_equal(a.dl[0].data, "poison");
  assert_non_null(strstr(a.dl[0].reason, "max_deliveries"));
  assert_int_equal(count_data(&a, "poison"), 3);
  wait_pending(&e, "ch", 0); /* the dead letter's ack removed it */
  assert_int_equal(send_str(&s, "ch", "after", 30), SAGA_OK);
  while (count_data(&a, "after") == 0) assert_int_equal(wait_count(&e, &a.nd, a.nd + 1), 0);
  assert_int_equal(a.ndl, 1);
  assert_int_equal(count_data(&a, "poison"), 3);
  detach(&e, &a);
  detach(&e, &s);
  env_free(&e);
}

/* kill -9 of the server: an XADD that got no reply is not confirmed, nor is a send during
 * the outage; after the restart both connections come back, and the resends are
 * confirmed and delivered. */
static void test_outage(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t6")) skip();
  fake a, s;
  attach(&e, &a, "a", 1000, 10);
  attach(&e, &s, "s", 1000, 10);
  a.auto_ack = 1;
  sub(&a, "ch");
  assert_int_equal(send_str(&s, "ch", "m1", 1), SAGA_OK);
  assert_int_equal(wait_count(&e, &a.nd, 1), 0);
  assert_int_equal(wait_count(&e, &s.ns, 1), 0);
  wait_pending(&e, "ch", 0);

  /* Frozen server: the XADD is written but never answered, then the server dies. */
  assert_int_equal(kill(e.srv.pid, SIGSTOP), 0);
  assert_int_equal(send_str(&s, "ch", "m2", 2), SAGA_OK);
  for (int i = 0; i < 10; i++) uv_run(&e.loop, UV_RUN_NOWAIT);
  th_server_kill9(&e.srv);
  assert_int_equal(wait_int(&e, &s.lost, 1), 0);
  assert_int_equal(wait_int(&e, &a.lost, 1), 0);
  int rc = send_str(&s, "ch", "m3", 3);
  for (int i = 0; i < 10; i++) uv_run(&e.loop, UV_RUN_NOWAIT);
  assert_true(rc != SAGA_OK || sent_index(&s, 3) < 0);
  assert_int_equal(sent_index(&s, 2), -1);
  assert_int_equal(sent_index(&s, 3), -1);
  assert_int_equal(s.ns, 1);

  restart_ready(&e);
  assert_int_equal(wait_int(&e, &s.back, 1), 0);
  assert_int_equal(wait_int(&e, &a.back, 1), 0);
  /* What the node's outbox does: send the unconfirmed rows again. */
  assert_int_equal(send_str(&s, "ch", "m2", 2), SAGA_OK);
  assert_int_equal(send_str(&s, "ch", "m3", 3), SAGA_OK);
  assert_int_equal(wait_count(&e, &s.ns, 3), 0);
  assert_true(sent_index(&s, 2) >= 0 && s.sent_status[sent_index(&s, 2)] == SAGA_OK);
  assert_true(sent_index(&s, 3) >= 0 && s.sent_status[sent_index(&s, 3)] == SAGA_OK);
  while (count_data(&a, "m2") == 0 || count_data(&a, "m3") == 0)
    assert_int_equal(wait_count(&e, &a.nd, a.nd + 1), 0);
  assert_int_equal(count_data(&a, "m1"), 1); /* acknowledged before the crash: kept so */
  wait_pending(&e, "ch", 0);
  detach(&e, &a);
  detach(&e, &s);
  env_free(&e);
}

/* Closing with sends in flight and the server gone: closed exactly once, nothing after. */
static void test_close(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t7")) skip();
  fake a, s;
  attach(&e, &a, "a", 1000, 10);
  attach(&e, &s, "s", 1000, 10);
  sub(&a, "ch");
  for (int i = 0; i < 50; i++) assert_int_equal(send_str(&s, "ch", "x", (uint64_t)i + 1), 0);
  s.t->methods->close(s.t);
  s.t->methods->close(s.t); /* twice: once is what counts */
  assert_int_equal(send_str(&s, "ch", "x", 99), SAGA_ECLOSED);
  assert_int_equal(s.t->methods->subscribe(s.t, "z"), SAGA_ECLOSED);
  assert_int_equal(th_run_real(&e.loop, closed_pred, &s, WAIT_MS), 0);
  size_t ns = s.ns;
  for (int i = 0; i < 10; i++) uv_run(&e.loop, UV_RUN_NOWAIT);
  assert_int_equal(s.ns, ns);
  assert_int_equal(s.closed, 1);
  s.t->methods->destroy(s.t);
  s.t = NULL;
  /* A transport whose server is gone still closes. */
  th_server_kill9(&e.srv);
  assert_int_equal(wait_int(&e, &a.lost, 1), 0);
  detach(&e, &a);
  /* Closed from inside a delivery callback, with more entries in the same reply: no
   * delivery after it, closed once. */
  restart_ready(&e);
  attach(&e, &a, "a", 1000, 10);
  fake s2;
  attach(&e, &s2, "s2", 1000, 10);
  sub(&a, "ch");
  a.close_in_deliver = 1;
  for (int i = 0; i < 20; i++) assert_int_equal(send_str(&s2, "ch", "y", (uint64_t)i + 1), 0);
  assert_int_equal(th_run_real(&e.loop, closed_pred, &a, WAIT_MS), 0);
  assert_int_equal(a.nd, 1);
  a.t->methods->destroy(a.t);
  a.t = NULL;
  detach(&e, &s2);
  /* Destroyed right after close (as a node does when its open fails): freed once the
   * handles closed, with no callback. */
  fake c;
  attach(&e, &c, "c", 1000, 10);
  sub(&c, "ch");
  c.t->methods->close(c.t);
  c.t->methods->destroy(c.t);
  c.t = NULL;
  for (int i = 0; i < 10; i++) uv_run(&e.loop, UV_RUN_NOWAIT);
  assert_int_equal(c.closed, 0);
  env_free(&e);
}

static long long xlen(env *e, const char *channel) {
  redisContext *c = cli(e);
  redisReply *r = redisCommand(c, "XLEN %s:%s", e->prefix, channel);
  assert_non_null(r);
  long long n = r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
  freeReplyObject(r);
  redisFree(c);
  return n;
}

typedef struct len_ctx {
  env *e;
  long long below;
} len_ctx;

static int xlen_pred(void *arg) {
  len_ctx *l = arg;
  return xlen(l->e, "ch") < l->below;
}

/* Subscribers trim their stream below the oldest pending entry: acknowledged entries go, an
 * entry still pending stays (and is delivered again). Redis trims whole internal nodes (100
 * entries by default), so the pending entry sits in a middle node: trimming past it would
 * drop it. */
static void test_trim(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t9")) skip();
  fake a, s;
  attach(&e, &a, "a", 400, 3);
  attach(&e, &s, "s", 400, 3);
  a.auto_ack = 1;
  a.never_ack = "hold";
  a.ack_dead = 1;
  sub(&a, "ch");
  for (int i = 0; i < 250; i++) {
    char m[16];
    snprintf(m, sizeof m, i == 150 ? "hold" : "m%d", i);
    assert_int_equal(send_str(&s, "ch", m, (uint64_t)i + 1), SAGA_OK);
  }
  assert_int_equal(wait_count(&e, &a.nd, 250), 0);
  /* Usually all 250 are still there; on a loaded machine the first trim may already have run
   * (it is due a second after the subscriber started). */
  long long before = xlen(&e, "ch");
  assert_true(before <= 250 && before >= 100);
  len_ctx l = {&e, 250};
  assert_int_equal(th_run_real(&e.loop, xlen_pred, &l, WAIT_MS), 0);
  long long left = xlen(&e, "ch");
  printf("trimmed to %lld entries while one is pending\n", left);
  assert_true(left >= 100); /* "hold" and everything after it */
  if (a.ndl == 0) {
    /* Still pending: it must still be in the stream. */
    redisContext *c = cli(&e);
    redisReply *r = redisCommand(c, "XPENDING t9:ch ch");
    assert_true(r->type == REDIS_REPLY_ARRAY && r->element[0]->integer == 1);
    char id[64];
    snprintf(id, sizeof id, "%s", r->element[1]->str);
    freeReplyObject(r);
    r = redisCommand(c, "XRANGE t9:ch %s %s", id, id);
    assert_true(r->type == REDIS_REPLY_ARRAY && r->elements == 1);
    freeReplyObject(r);
    redisFree(c);
  }
  /* Delivered again, then dead-lettered with its bytes: it was never trimmed away. */
  assert_int_equal(wait_count(&e, &a.ndl, 1), 0);
  assert_string_equal(a.dl[0].data, "hold");
  assert_int_equal(count_data(&a, "hold"), 3);
  wait_pending(&e, "ch", 0);
  detach(&e, &a);
  detach(&e, &s);
  env_free(&e);
}

/* ---- two nodes over Redis ---------------------------------------------------------------- */

typedef struct nodes {
  th_world *w;
  env *e;
  int closed;
} nodes;

static int fx_insert(saga_tx *tx, const saga_msg *m, const char *kind) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(saga_tx_db(tx),
                              "INSERT INTO fx(saga_id, step, kind) "
                              "VALUES(?1,?2,?3)",
                              -1, &st, NULL);
  if (rc == SQLITE_OK) {
    sqlite3_bind_text(st, 1, saga_msg_saga_id(m), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, 2, (int)saga_msg_step(m));
    sqlite3_bind_text(st, 3, kind, -1, SQLITE_STATIC);
    rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
  }
  sqlite3_finalize(st);
  return rc == SQLITE_OK ? SAGA_OK : SAGA_ESTORE;
}

static int do_h(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)arg;
  int rc = fx_insert(tx, m, "do");
  if (rc != SAGA_OK) return rc;
  int64_t fail = -1;
  if (saga_data_get_i64(saga_msg_data(m), "fail", &fail) == SAGA_OK &&
      fail == (int64_t)saga_msg_step(m))
    return saga_reply_fail(r, "refused by test");
  return SAGA_OK;
}

static int undo_h(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  return fx_insert(tx, m, "undo");
}

static void on_event(saga_node *n, const saga_event *ev, void *arg) {
  th_world *w = arg;
  (void)n;
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED ||
      ev->type == SAGA_EV_SAGA_FAILED)
    w->terminal++;
  if (ev->type == SAGA_EV_SAGA_COMPENSATED) w->handler_calls++; /* compensated count */
}

/* Lines "transport refused message" the nodes logged (rate-limited: see relay.c). */
static int refusal_lines;
static void count_refusals(void *arg, saga_log_level lvl, const char *msg) {
  (void)arg;
  (void)lvl;
  if (strstr(msg, "transport refused message") != NULL) refusal_lines++;
}

static void open_node(nodes *ns, saga_node **out, const char *name, int orch) {
  th_world *w = ns->w;
  saga_redis_config rc;
  saga_redis_config_init(&rc);
  rc.port = ns->e->srv.port;
  rc.prefix = ns->e->prefix;
  rc.claim_idle_ms = 2000;
  rc.reconnect_min_ms = 20;
  rc.reconnect_max_ms = 500;
  rc.username = ns->e->user;
  rc.password = ns->e->pw;
  saga_transport *t = NULL;
  assert_int_equal(saga_redis_transport_new(&t, &rc), SAGA_OK);
  char file[64];
  snprintf(file, sizeof file, "%s.db", name);
  char *path = th_path(w->dir, file);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = name;
  cfg.db_path = path;
  cfg.transport = t;
  cfg.synchronous = SAGA_SYNC_NORMAL;
  cfg.on_event = orch ? on_event : NULL;
  cfg.event_arg = w;
  cfg.log = count_refusals;
  char err[256];
  int rc2 = saga_node_open(out, &ns->e->loop, &cfg, err, sizeof err);
  if (rc2 != SAGA_OK) printf("open %s: %s\n", name, err);
  assert_int_equal(rc2, SAGA_OK);
  free(path);
  assert_int_equal(sqlite3_exec(saga_node_db(*out),
                                "CREATE TABLE IF NOT EXISTS fx(id INTEGER PRIMARY KEY, "
                                "saga_id TEXT, step INT, kind TEXT)",
                                NULL, NULL, NULL),
                   SQLITE_OK);
  static const char *const chans[3] = {"p0", "p1", "p2"};
  if (orch) {
    saga_step steps[3];
    memset(steps, 0, sizeof steps);
    static const char *const names[3] = {"S0", "S1", "S2"};
    for (int i = 0; i < 3; i++) {
      steps[i].name = names[i];
      steps[i].channel = chans[i];
      steps[i].action = "do";
      steps[i].compensation = "undo";
    }
    saga_definition def = {SAGA_DEFINITION_VERSION, "test", 1, steps, 3, 0, sizeof(saga_step)};
    assert_int_equal(saga_node_register(*out, &def), SAGA_OK);
  } else {
    for (int i = 0; i < 3; i++) {
      assert_int_equal(saga_node_handle(*out, chans[i], "do", do_h, w), SAGA_OK);
      assert_int_equal(saga_node_handle(*out, chans[i], "undo", undo_h, w), SAGA_OK);
    }
  }
  assert_int_equal(saga_node_start(*out, NULL), SAGA_OK);
}

static void started(saga_node *n, int status, const char *id, int existed, void *arg) {
  th_world *w = arg;
  (void)n;
  (void)id;
  (void)existed;
  if (status == SAGA_OK) w->started_ok++;
}

static int terminal_pred(void *arg) {
  th_world *w = arg;
  return w->terminal >= 100;
}

static void node_closed(void *arg) { ((nodes *)arg)->closed++; }

static int nodes_closed_pred(void *arg) { return ((nodes *)arg)->closed >= 2; }

static void run_nodes(env *e, int late);

static int no_pred(void *arg) {
  (void)arg;
  return 0;
}

/* requirepass for the default user; an ACL user limited to the keys of its prefixes and the
 * commands docs/transports.md lists. */
static const char auth_conf[] = "requirepass def-secret\n"
                                "user saga on >saga-pw ~a1:* ~a2:* +@stream +@connection +eval "
                                "+evalsha\n";

static void test_nodes(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t8")) skip();
  run_nodes(&e, 0);
}

/* The same two nodes as an ACL user limited to its keys (Redis 6 ACL, AUTH user pass). */
static void test_nodes_acl(void **state) {
  (void)state;
  env e;
  if (env_init_conf(&e, "a2", auth_conf)) skip();
  e.admin_pw = "def-secret";
  e.user = "saga";
  e.pw = "saga-pw";
  run_nodes(&e, 0);
}

/* Two nodes, 100 sagas. late: the server is not running yet; it is started once the nodes
 * opened and the sagas were started (their commands wait in the outbox meanwhile). */
static void run_nodes(env *e, int late) {
  th_world *w = calloc(1, sizeof *w);
  assert_non_null(w);
  th_world_defaults(&w->o);
  w->dir = th_tmpdir();
  nodes ns = {w, e, 0};
  refusal_lines = 0;
  open_node(&ns, &w->orch, "orch", 1);
  open_node(&ns, &w->part, "part", 0);
  uint64_t t0 = uv_hrtime();
  for (int i = 0; i < 100; i++) {
    saga_data *d = NULL;
    assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
    saga_data_set_i64(d, "n", i);
    if (i % 5 == 4) saga_data_set_i64(d, "fail", 2); /* a fifth compensated */
    assert_int_equal(saga_start(w->orch, "test", d, NULL, started, w), SAGA_OK);
    saga_data_free(d);
  }
  if (late) {
    th_run_real(&e->loop, no_pred, NULL, 1000); /* sends are refused meanwhile */
    assert_int_equal(w->started_ok, 100);
    assert_int_equal(w->terminal, 0);
    /* The health check's answer: transport not connected. */
    assert_int_equal(saga_node_transport_connected(w->orch), 0);
    assert_int_equal(saga_node_transport_connected(w->part), 0);
    /* Refusals while the broker is down are counted and logged at most once per 10 s. */
    saga_node_stats st;
    saga_node_stats_get(w->orch, &st, sizeof st);
    printf("broker down 1 s: %" PRIu64 " refusals, %d log lines\n", st.send_refusals,
           refusal_lines);
    assert_true(refusal_lines <= 2);
    restart_ready(e);
  }
  int rc = th_run_real(&e->loop, terminal_pred, w, 60000);
  assert_int_equal(saga_node_transport_connected(w->orch), 1);
  assert_int_equal(saga_node_transport_connected(w->part), 1);
  printf("100 sagas over redis: %d terminal in %.0f ms\n", (int)w->terminal,
         (double)(uv_hrtime() - t0) / 1e6);
  assert_int_equal(rc, 0);
  assert_int_equal(w->started_ok, 100);
  assert_int_equal(w->handler_calls, 20); /* compensated */
  assert_int_equal(th_check_invariants(w, 1), 0);
  assert_int_equal(th_fx_count(w, NULL, -1, "do"), 80 * 3 + 20 * 2);
  assert_int_equal(th_fx_count(w, NULL, -1, "undo"), 20 * 2);
  saga_node_close(w->orch, node_closed, &ns);
  saga_node_close(w->part, node_closed, &ns);
  assert_int_equal(th_run_real(&e->loop, nodes_closed_pred, &ns, WAIT_MS), 0);
  w->orch = w->part = NULL;
  th_rmdir(w->dir);
  free(w);
  env_free(e);
}

/* ---- secured servers ------------------------------------------------------------------------ */

typedef struct auth_ctx {
  saga_transport *t;
  uint64_t want;
} auth_ctx;

static int auth_pred(void *arg) {
  auth_ctx *c = arg;
  saga_redis_stats st;
  assert_int_equal(saga_redis_stats_get(c->t, &st), SAGA_OK);
  return st.auth_failures >= c->want;
}

static int wait_auth_failures(env *e, fake *f, uint64_t want) {
  auth_ctx c = {f->t, want};
  return th_run_real(&e->loop, auth_pred, &c, WAIT_MS);
}

/*
 * The right credentials, as an ACL user (AUTH user pass) and as the default user with
 * requirepass (AUTH pass): messages flow, also after the server restarted (AUTH again on
 * the new connections). The wrong password, or none: nothing is confirmed, stored or
 * delivered — not even an entry another client added to the subscribed stream — while the
 * transport keeps trying (the counter grows); the failure is logged at ERROR once, not once
 * per attempt, and says authentication failed; fixing the server's ACL lets it in.
 */
static void test_auth(void **state) {
  (void)state;
  env e;
  if (env_init_conf(&e, "a1", auth_conf)) skip();
  e.admin_pw = "def-secret";
  assert_int_equal(th_run_real(&e.loop, ready_pred, &e, WAIT_MS), 0);

  /* An ACL user. */
  e.user = "saga";
  e.pw = "saga-pw";
  fake a, b;
  attach(&e, &a, "a", 1000, 10);
  attach(&e, &b, "b", 1000, 10);
  b.auto_ack = 1;
  sub(&b, "ch");
  assert_int_equal(send_str(&a, "ch", "acl", 1), SAGA_OK);
  assert_int_equal(wait_count(&e, &b.nd, 1), 0);
  assert_int_equal(wait_count(&e, &a.ns, 1), 0);
  assert_int_equal(a.sent_status[0], SAGA_OK);
  assert_string_equal(b.d[0].data, "acl");
  /* After a restart, the new connections authenticate again. */
  th_server_kill9(&e.srv);
  assert_int_equal(wait_int(&e, &a.lost, 1), 0);
  restart_ready(&e);
  assert_int_equal(wait_int(&e, &a.back, 1), 0);
  assert_int_equal(wait_int(&e, &b.back, 1), 0);
  /* As the outbox does: sent again until confirmed. */
  int again_ok = 0;
  for (int i = 0; i < 50 && !again_ok; i++) {
    size_t ns0 = a.ns;
    if (send_str(&a, "ch", "again", 2) == SAGA_OK) wait_count(&e, &a.ns, ns0 + 1);
    again_ok = a.ns > ns0 && a.sent[a.ns - 1] == 2 && a.sent_status[a.ns - 1] == SAGA_OK;
  }
  assert_true(again_ok);
  while (count_data(&b, "again") == 0) assert_int_equal(wait_count(&e, &b.nd, b.nd + 1), 0);
  saga_redis_stats st;
  assert_int_equal(saga_redis_stats_get(a.t, &st), SAGA_OK);
  assert_int_equal(st.auth_failures, 0);
  detach(&e, &a);
  detach(&e, &b);

  /* The default user: AUTH with the password alone. */
  e.user = NULL;
  e.pw = "def-secret";
  attach(&e, &a, "a", 1000, 10);
  assert_int_equal(send_str(&a, "ch", "default", 3), SAGA_OK);
  assert_int_equal(wait_count(&e, &a.ns, 1), 0);
  assert_int_equal(a.sent_status[0], SAGA_OK);
  detach(&e, &a);
  long long before = xlen(&e, "ch");

  /* Wrong password for the ACL user, and no password at all. */
  const char *const bad[2][2] = {{"saga", "wrong"}, {NULL, NULL}};
  for (int k = 0; k < 2; k++) {
    e.user = bad[k][0];
    e.pw = bad[k][1];
    fake x;
    attach(&e, &x, "x", 1000, 10);
    sub(&x, "in");
    int rc = send_str(&x, "ch", "forbidden", 10);
    /* Several attempts, each refused. */
    assert_int_equal(wait_auth_failures(&e, &x, 3), 0);
    /* Another client adds an entry to the stream x subscribes to; x tries again after. */
    redisContext *c = cli(&e);
    redisReply *r = redisCommand(c, "XADD a1:in * d hello");
    assert_non_null(r);
    freeReplyObject(r);
    redisFree(c);
    assert_int_equal(saga_redis_stats_get(x.t, &st), SAGA_OK);
    assert_int_equal(wait_auth_failures(&e, &x, st.auth_failures + 2), 0);
    printf("%s: send %d, %d confirmations, %zu deliveries, %" PRIu64
           " refusals, %d logged at ERROR\n",
           k == 0 ? "wrong password" : "no password", rc, (int)x.ns, x.nd,
           (uint64_t)st.auth_failures, x.auth_errors);
    int confirmed = 0;
    for (size_t i = 0; i < x.ns; i++) confirmed += x.sent_status[i] == SAGA_OK;
    assert_int_equal(confirmed, 0);
    assert_int_equal(x.nd, 0);
    assert_int_equal(x.auth_errors, 1); /* once, not once per attempt */
    assert_int_equal(xlen(&e, "ch"), before);
    if (k == 0) {
      /* The operator fixes the ACL: the transport gets in by itself, and says so. */
      c = cli(&e);
      r = redisCommand(c, "ACL SETUSER saga >wrong");
      assert_non_null(r);
      freeReplyObject(r);
      redisFree(c);
      assert_int_equal(wait_int(&e, &x.auth_back, 1), 0);
      x.auto_ack = 1;
      /* Each connection gets in on its own schedule: sent again until confirmed, as the
       * outbox does. */
      int fixed_ok = 0;
      for (int i = 0; i < 100 && !fixed_ok; i++) {
        size_t ns0 = x.ns;
        if (send_str(&x, "in", "after-fix", 11) == SAGA_OK)
          wait_count(&e, &x.ns, ns0 + 1);
        else
          th_run_real(&e.loop, no_pred, NULL, 50); /* the outbox's resend pause, not a wait */
        fixed_ok = x.ns > ns0 && x.sent_status[x.ns - 1] == SAGA_OK;
      }
      assert_true(fixed_ok);
      assert_int_equal(wait_count(&e, &x.nd, 1), 0);
      assert_string_equal(x.d[0].data, "after-fix");
    }
    detach(&e, &x);
  }
  env_free(&e);
}

/* ---- outages: one copy per token; opening while the server is down; failed opens --------- */

/* An environment whose server is not started yet: its port (free a moment ago) and folder are
 * chosen, and restart_ready() starts it there later. Returns 1 when the test must be skipped. */
static int env_init_down(env *e, const char *prefix) {
  memset(e, 0, sizeof *e);
  if (!th_have_program("redis-server")) {
    printf("redis-server is not installed: skipping\n");
    return 1;
  }
  th_alloc_init(&e->ta);
  assert_int_equal(uv_loop_init(&e->loop), 0);
  snprintf(e->srv.kind, sizeof e->srv.kind, "redis");
  e->srv.dir = th_tmpdir();
  e->srv.port = th_free_port();
  assert_true(e->srv.port > 0);
  live_server = &e->srv;
  snprintf(e->prefix, sizeof e->prefix, "%s", prefix);
  return 0;
}

static saga_redis_stats stats_of(const fake *f) {
  saga_redis_stats st;
  memset(&st, 0, sizeof st);
  assert_int_equal(saga_redis_stats_get(f->t, &st), SAGA_OK);
  return st;
}

/* What the node's outbox does for OP_N tokens (as in test_nats.c): send each, then again every
 * OP_RESEND_MS while unconfirmed; counts calls, confirmations and deliveries. */
#define OP_N 200
#define OP_RESEND_MS 20
typedef struct outage_pump {
  fake *s;
  uv_timer_t timer;
  uint64_t base;
  uint64_t last[OP_N];
  unsigned char confirmed[OP_N];
  unsigned got[OP_N];
  int nconfirmed, ngot_distinct;
  uint64_t ngot, calls, refused;
} outage_pump;

static void op_sent(void *arg, uint64_t token, int status) {
  outage_pump *p = arg;
  if (status != SAGA_OK || token < p->base || token >= p->base + OP_N) return;
  if (!p->confirmed[token - p->base]) {
    p->confirmed[token - p->base] = 1;
    p->nconfirmed++;
  }
}

static void op_got(void *arg, const char *data, size_t len) {
  outage_pump *p = arg;
  char buf[32];
  assert_true(len > 1 && len < sizeof buf && data[0] == 'o');
  memcpy(buf, data, len);
  buf[len] = '\0';
  uint64_t tok = strtoull(buf + 1, NULL, 10);
  if (tok < p->base || tok >= p->base + OP_N) return;
  p->ngot++;
  if (p->got[tok - p->base]++ == 0) p->ngot_distinct++;
}

static void op_send(outage_pump *p, int i, uint64_t now) {
  char buf[32];
  snprintf(buf, sizeof buf, "o%" PRIu64, p->base + (uint64_t)i);
  p->calls++;
  if (send_str(p->s, "ch", buf, p->base + (uint64_t)i) != SAGA_OK) p->refused++;
  p->last[i] = now;
}

static void op_tick(uv_timer_t *h) {
  outage_pump *p = h->data;
  uint64_t now = uv_now(h->loop);
  for (int i = 0; i < OP_N; i++)
    if (!p->confirmed[i] && now - p->last[i] >= OP_RESEND_MS) op_send(p, i, now);
}

static void op_closed(uv_handle_t *h) { (void)h; }

static int op_done(void *arg) {
  outage_pump *p = arg;
  return p->nconfirmed == OP_N && p->ngot_distinct == OP_N;
}

/*
 * Item 6, Redis: the server stalls (SIGSTOP) for 2 s with OP_N messages unconfirmed and a
 * resend every OP_RESEND_MS. The XADDs are written (or queued) on the command connection and
 * unanswered; every resend used to queue one more XADD of the same message, all executed once
 * the server resumed: about OP_N * 100 entries and deliveries. Now one XADD per token on a
 * connection: every message is confirmed and delivered once, the stream holds one entry each.
 */
static void test_stall_one_copy_per_token(void **state) {
  (void)state;
  env e;
  if (env_init(&e, "t10")) skip();
  fake a, s;
  attach(&e, &a, "a", 30000, 10);
  attach(&e, &s, "s", 30000, 10);
  a.auto_ack = 1;
  sub(&a, "ch");
  assert_int_equal(send_str(&s, "ch", "warm", 1), SAGA_OK);
  assert_int_equal(wait_count(&e, &a.nd, 1), 0);
  assert_int_equal(wait_count(&e, &s.ns, 1), 0);
  outage_pump *p = calloc(1, sizeof *p);
  assert_non_null(p);
  p->s = &s;
  p->base = 1000;
  s.on_sent = op_sent;
  a.on_deliver = op_got;
  s.hook_arg = a.hook_arg = p;
  saga_redis_stats st0 = stats_of(&s);
  assert_int_equal(kill(e.srv.pid, SIGSTOP), 0);
  uint64_t now = uv_now(&e.loop);
  for (int i = 0; i < OP_N; i++) op_send(p, i, now);
  uv_timer_init(&e.loop, &p->timer);
  p->timer.data = p;
  uv_timer_start(&p->timer, op_tick, 5, 5);
  th_run_real(&e.loop, no_pred, NULL, 2000); /* the stall: the pump resends meanwhile */
  saga_redis_stats st1 = stats_of(&s);
  assert_int_equal(kill(e.srv.pid, SIGCONT), 0);
  int rc = th_run_real(&e.loop, op_done, p, WAIT_MS);
  uv_timer_stop(&p->timer);
  uv_close((uv_handle_t *)&p->timer, op_closed);
  th_run_real(&e.loop, no_pred, NULL, 300); /* late duplicates, if any, would arrive now */
  saga_redis_stats st2 = stats_of(&s);
  long long entries = xlen(&e, "ch");
  printf("redis stalled 2 s, %d messages unconfirmed, resent every %d ms: %" PRIu64
         " send() calls, %" PRIu64 " XADDs queued during the stall, %lld stream entries, %" PRIu64
         " deliveries of %d messages\n",
         OP_N, OP_RESEND_MS, p->calls, st1.xadds - st0.xadds, entries, p->ngot,
         p->ngot_distinct);
  assert_int_equal(rc, 0);
  assert_true(p->calls > 10 * OP_N);
  assert_true(st1.xadds - st0.xadds <= OP_N);
  assert_true(st2.xadds - st0.xadds <= OP_N);
  assert_true(st2.sends_coalesced - st0.sends_coalesced >= p->calls - OP_N - p->refused);
  assert_true(entries <= OP_N + 1); /* trimming only ever lowers it */
  assert_int_equal(p->ngot, OP_N);
  s.on_sent = NULL;
  a.on_deliver = NULL;
  free(p);
  detach(&e, &a);
  detach(&e, &s);
  env_free(&e);
}

typedef struct conn_ctx {
  fake *x, *y;
} conn_ctx;

static int connected_pred(void *arg) {
  conn_ctx *c = arg;
  return saga_redis_connected(c->x->t) == 1 && saga_redis_connected(c->y->t) == 1;
}

/*
 * Item 20, Redis: transports open while the server is down (nobody listens on the port yet):
 * open succeeds, not connected, subscribe taken, send refused with a transient code; once the
 * server starts on that port both connect, and messages flow. fail_fast fails at open instead,
 * leaving nothing behind.
 */
static void test_open_while_server_down(void **state) {
  (void)state;
  env e;
  if (env_init_down(&e, "t11")) skip();
  fake *ff = calloc(1, sizeof *ff);
  assert_non_null(ff);
  uint64_t t0 = uv_hrtime();
  assert_int_equal(attach_cfg(&e, ff, "ff", 1000, 10, 1), SAGA_ETRANSPORT);
  assert_true((uv_hrtime() - t0) / 1000000 < 5000);
  ff->t->methods->destroy(ff->t);
  free(ff);
  assert_int_equal(e.ta.live, 0);

  fake a, s;
  attach(&e, &a, "a", 1000, 10);
  attach(&e, &s, "s", 1000, 10);
  a.auto_ack = 1;
  sub(&a, "ch");
  assert_int_equal(saga_redis_connected(a.t), 0);
  assert_int_equal(saga_redis_connected(s.t), 0);
  /* During the first attempt a send is queued with it (and dropped with it: unconfirmed). */
  int first = send_str(&s, "ch", "x", 1);
  assert_true(first == SAGA_OK || first == SAGA_ETRANSPORT);
  th_run_real(&e.loop, no_pred, NULL, 300);
  assert_int_equal(saga_redis_connected(s.t), 0);
  /* Known to be down now: refused with a transient code, nothing queued. */
  saga_redis_stats st = stats_of(&s);
  assert_int_equal(send_str(&s, "ch", "x", 1), SAGA_ETRANSPORT);
  assert_int_equal(stats_of(&s).xadds, st.xadds);
  assert_int_equal(s.ns, 0);

  restart_ready(&e);
  conn_ctx cc = {&a, &s};
  assert_int_equal(th_run_real(&e.loop, connected_pred, &cc, WAIT_MS), 0);
  assert_int_equal(send_str(&s, "ch", "hello", 2), SAGA_OK);
  assert_int_equal(wait_count(&e, &s.ns, 1), 0);
  assert_int_equal(s.sent_status[0], SAGA_OK);
  assert_int_equal(wait_count(&e, &a.nd, 1), 0);
  assert_string_equal(a.d[0].data, "hello");
  detach(&e, &a);
  detach(&e, &s);
  env_free(&e);
}

/*
 * Item 9, Redis: a failed open (fail_fast with no server, with a refused password) leaves
 * nothing in the loop and nothing allocated; destroy() right after it, with or without
 * close(), is safe. Then a node whose Redis transport fails to open: saga_node_open fails and
 * the loop closes empty (env_free).
 */
static void test_failed_open_leaves_nothing(void **state) {
  (void)state;
  env e;
  if (env_init_conf(&e, "t12", "requirepass def-secret\n")) skip();
  e.admin_pw = "def-secret";
  fake *f = calloc(1, sizeof *f);
  assert_non_null(f);
  for (int with_close = 0; with_close < 2; with_close++) {
    e.pw = "wrong";
    assert_int_equal(attach_cfg(&e, f, "f", 1000, 10, 1), SAGA_ETRANSPORT);
    assert_int_equal(stats_of(f).auth_failures, 1);
    if (with_close) f->t->methods->close(f->t);
    f->t->methods->destroy(f->t);
    assert_int_equal(f->closed, with_close);
    assert_int_equal(e.ta.live, 0);
    assert_int_equal(uv_loop_alive(&e.loop), 0);
  }
  e.pw = "def-secret";
  assert_int_equal(attach_cfg(&e, f, "f", 1000, 10, 1), SAGA_OK);
  sub(f, "ch");
  conn_ctx cc = {f, f};
  assert_int_equal(th_run_real(&e.loop, connected_pred, &cc, WAIT_MS), 0);
  detach(&e, f);
  free(f);

  char *dir = th_tmpdir();
  saga_redis_config rc;
  saga_redis_config_init(&rc);
  rc.port = th_free_port(); /* nobody there */
  rc.fail_fast = 1;
  rc.alloc = &e.ta.a;
  saga_transport *t = NULL;
  assert_int_equal(saga_redis_transport_new(&t, &rc), SAGA_OK);
  char *path = th_path(dir, "n.db");
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = "failing";
  cfg.db_path = path;
  cfg.transport = t;
  char err[256];
  saga_node *n = NULL;
  int r = saga_node_open(&n, &e.loop, &cfg, err, sizeof err);
  printf("saga_node_open: %s (%s)\n", saga_err_name(r), err);
  assert_int_equal(r, SAGA_ETRANSPORT);
  assert_null(n);
  free(path);
  th_rmdir(dir);
  assert_int_equal(e.ta.live, 0);
  env_free(&e);
}

/* Item 20 with nodes: both open while the server is down, 100 sagas are started, then the
 * server starts: every saga ends as it should (run_nodes checks the effects). */
static void test_nodes_open_while_server_down(void **state) {
  (void)state;
  env e;
  if (env_init_down(&e, "t13")) skip();
  run_nodes(&e, 1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_teardown(test_config, teardown),
      cmocka_unit_test_teardown(test_send_deliver_ack, teardown),
      cmocka_unit_test_teardown(test_reclaim, teardown),
      cmocka_unit_test_teardown(test_replicas_share, teardown),
      cmocka_unit_test_teardown(test_group_idempotent, teardown),
      cmocka_unit_test_teardown(test_poison, teardown),
      cmocka_unit_test_teardown(test_outage, teardown),
      cmocka_unit_test_teardown(test_close, teardown),
      cmocka_unit_test_teardown(test_trim, teardown),
      cmocka_unit_test_teardown(test_nodes, teardown),
      cmocka_unit_test_teardown(test_auth, teardown),
      cmocka_unit_test_teardown(test_nodes_acl, teardown),
      cmocka_unit_test_teardown(test_stall_one_copy_per_token, teardown),
      cmocka_unit_test_teardown(test_open_while_server_down, teardown),
      cmocka_unit_test_teardown(test_failed_open_leaves_nothing, teardown),
      cmocka_unit_test_teardown(test_nodes_open_while_server_down, teardown),
  };
  /* SAGA_TEST_FILTER=name runs the tests matching it (cmocka's pattern, '*' wildcards). */
  if (getenv("SAGA_TEST_FILTER") != NULL) cmocka_set_test_filter(getenv("SAGA_TEST_FILTER"));
  return cmocka_run_group_tests(tests, NULL, NULL);
}
