/*
 * The Redis Streams transport passes the conformance kit, against a real redis-server
 * (appendonly, fsync always). The medium's stop/restart kill -9 the server and start it again
 * on the same port and folder: the append-only file keeps every acknowledged XADD, group and
 * pending entry. Skipped when redis-server is not installed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include "harness.h"
#include "saga/conformance.h"
#include "saga/transport_redis.h"
#include "servers.h"

#define CLAIM_IDLE_MS 1000

typedef struct medium {
  th_server srv;
} medium;

static int redis_create(void *ctx, const char *node, saga_transport **out) {
  medium *m = ctx;
  (void)node; /* routing is by stream name: every node talks to the same server */
  saga_redis_config cfg;
  saga_redis_config_init(&cfg);
  cfg.port = m->srv.port;
  cfg.prefix = "conf";
  cfg.claim_idle_ms = CLAIM_IDLE_MS;
  cfg.reconnect_min_ms = 20;
  cfg.reconnect_max_ms = 200;
  return saga_redis_transport_new(out, &cfg);
}

static int redis_stop(void *ctx) {
  medium *m = ctx;
  th_server_kill9(&m->srv);
  return SAGA_OK;
}

/* "Up" means answering: after the port opens, Redis may still be loading its append-only
 * file (every command then fails with -LOADING). Polls a readiness condition, bounded. */
static int redis_restart(void *ctx) {
  medium *m = ctx;
  if (th_server_restart(&m->srv) != 0) return SAGA_EIO;
  for (int i = 0; i < 1500; i++) {
    redisContext *c = redisConnect("127.0.0.1", m->srv.port);
    int ok = 0;
    if (c != NULL && c->err == 0) {
      redisReply *r = redisCommand(c, "PING");
      ok = r != NULL && r->type == REDIS_REPLY_STATUS;
      if (r != NULL) freeReplyObject(r);
    }
    if (c != NULL) redisFree(c);
    if (ok) return SAGA_OK;
    struct timespec ts = {0, 10 * 1000000};
    nanosleep(&ts, NULL);
  }
  return SAGA_EIO;
}

/* Stopped by the teardown even when an assertion failed. */
static th_server *live_server;

static int teardown(void **state) {
  (void)state;
  if (live_server != NULL) th_server_free(live_server);
  live_server = NULL;
  return 0;
}

static void test_redis_conformance(void **state) {
  (void)state;
  if (!th_have_program("redis-server")) {
    printf("redis-server is not installed: skipping\n");
    skip();
  }
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  medium md;
  assert_int_equal(th_server_start(&md.srv, "redis"), 0);
  live_server = &md.srv;
  char *dir = th_tmpdir();
  saga_conformance_medium2 m;
  memset(&m, 0, sizeof m);
  m.struct_version = SAGA_CONFORMANCE_MEDIUM_VERSION;
  m.kind = SAGA_MEDIUM_BROKER;
  m.create = redis_create;
  m.stop = redis_stop;
  m.restart = redis_restart;
  m.ctx = &md;
  m.ordered = 1; /* one stream per channel, read in order by one consumer */
  m.redelivery_ms = CLAIM_IDLE_MS;
  m.db_dir = dir;
  char report[4096];
  uint64_t t0 = uv_hrtime();
  int failed = saga_conformance_run2(&loop, &m, report, sizeof report);
  printf("%s(%.0f ms)\n", report, (double)(uv_hrtime() - t0) / 1e6);
  assert_int_equal(failed, 0);
  assert_non_null(strstr(report, "PASS sagas\n"));
  assert_non_null(strstr(report, "PASS consumer-crash"));
  assert_non_null(strstr(report, "PASS sagas-crash"));
  assert_non_null(strstr(report, "PASS peer-gone"));
  assert_non_null(strstr(report, "PASS outage"));
  assert_non_null(strstr(report, "PASS unacked"));
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  th_server_free(&md.srv);
  live_server = NULL;
  th_rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test_teardown(test_redis_conformance, teardown)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
