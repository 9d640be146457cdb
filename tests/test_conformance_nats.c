/*
 * The NATS JetStream transport passes the conformance kit, against a real nats-server started
 * with JetStream and a store folder of its own. The medium's stop/restart kill -9 the server
 * and start it again on the same port and folder: JetStream's file store keeps the stream,
 * the durable consumers and their pending acknowledgements. Skipped when nats-server is not
 * installed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "saga/conformance.h"
#include "saga/transport_nats.h"
#include "servers.h"

#define ACK_WAIT_MS 1000

typedef struct medium {
  th_server srv;
  char url[64];
} medium;

static int nats_create(void *ctx, const char *node, saga_transport **out) {
  medium *m = ctx;
  (void)node; /* routing is by subject: every node talks to the same server */
  saga_nats_config cfg;
  saga_nats_config_init(&cfg);
  cfg.url = m->url;
  cfg.stream = "CONF";
  cfg.prefix = "conf";
  cfg.ack_wait_ms = ACK_WAIT_MS;
  cfg.reconnect_wait_ms = 50;
  return saga_nats_transport_new(out, &cfg);
}

static int nats_stop(void *ctx) {
  medium *m = ctx;
  th_server_kill9(&m->srv);
  return SAGA_OK;
}

static int nats_restart(void *ctx) {
  medium *m = ctx;
  return th_server_restart(&m->srv) == 0 ? SAGA_OK : SAGA_EIO;
}

static void test_nats_conformance(void **state) {
  (void)state;
  if (!th_have_program("nats-server")) {
    printf("nats-server is not installed (apt-get install nats-server): skipping\n");
    skip();
  }
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  medium md;
  assert_int_equal(th_server_start(&md.srv, "nats"), 0);
  snprintf(md.url, sizeof md.url, "nats://127.0.0.1:%d", md.srv.port);
  char *dir = th_tmpdir();
  saga_conformance_medium2 m;
  memset(&m, 0, sizeof m);
  m.struct_version = SAGA_CONFORMANCE_MEDIUM_VERSION;
  m.kind = SAGA_MEDIUM_BROKER;
  m.create = nats_create;
  m.stop = nats_stop;
  m.restart = nats_restart;
  m.ctx = &md;
  m.ordered = 1; /* one consumer per channel, fetched in stream order by one thread */
  m.redelivery_ms = ACK_WAIT_MS;
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
  assert_non_null(strstr(report, "PASS order"));
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  th_server_free(&md.srv);
  th_rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_nats_conformance)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
