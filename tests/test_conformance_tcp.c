/* The TCP transport passes the conformance kit. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "saga/conformance.h"
#include "saga/transport_tcp.h"
#include "servers.h"

typedef struct medium {
  char a[32], b[32];
} medium;

static int tcp_create(void *ctx, const char *node, saga_transport **out) {
  medium *m = ctx;
  saga_tcp_route routes[] = {{"conf-a", m->a, NULL}, {"conf-b", m->b, NULL}, {"conf-ch", m->b, NULL}};
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  cfg.insecure_plaintext = 1; /* loopback only */
  cfg.listen = strcmp(node, "conf-a") == 0 ? m->a : m->b;
  cfg.routes = routes;
  cfg.nroutes = 3;
  cfg.reconnect_min_ms = 20;
  cfg.reconnect_max_ms = 200;
  return saga_tcp_transport_new(out, &cfg);
}

static void test_tcp_conformance(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  medium md;
  snprintf(md.a, sizeof md.a, "127.0.0.1:%d", th_free_port());
  snprintf(md.b, sizeof md.b, "127.0.0.1:%d", th_free_port());
  char *dir = th_tmpdir();
  saga_conformance_medium m;
  memset(&m, 0, sizeof m);
  m.create = tcp_create;
  m.ctx = &md;
  m.ordered = 1;
  m.db_dir = dir;
  char report[4096];
  int failed = saga_conformance_run(&loop, &m, report, sizeof report);
  printf("%s", report);
  assert_int_equal(failed, 0);
  assert_non_null(strstr(report, "PASS sagas"));
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  th_rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_tcp_conformance)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
