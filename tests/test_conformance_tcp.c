/* The TCP transport passes the conformance kit, in plaintext and over mutual TLS with an
 * access list (each node's certificate names it; each may send to every channel of the
 * other). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "saga/conformance.h"
#include "saga/transport_tcp.h"
#include "servers.h"

typedef struct medium {
  char a[32], b[32];
  const char *pki; /* NULL: plaintext */
} medium;

static int tcp_create(void *ctx, const char *node, saga_transport **out) {
  medium *m = ctx;
  const char *ida = m->pki ? "conf-a" : NULL, *idb = m->pki ? "conf-b" : NULL;
  saga_tcp_route routes[] = {{"conf-a", m->a, ida}, {"conf-b", m->b, idb}, {"conf-ch", m->b, idb}};
  static const saga_tcp_allow allow[] = {{"conf-a", "*"}, {"conf-b", "*"}};
  char ca[512], cert[512], key[512];
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  if (m->pki != NULL) {
    snprintf(ca, sizeof ca, "%s/ca.pem", m->pki);
    snprintf(cert, sizeof cert, "%s/%s.pem", m->pki, node);
    snprintf(key, sizeof key, "%s/%s.key", m->pki, node);
    cfg.tls_ca_file = ca;
    cfg.tls_cert_file = cert;
    cfg.tls_key_file = key;
    cfg.allow = allow;
    cfg.nallow = 2;
  } else {
    cfg.insecure_plaintext = 1; /* loopback only */
  }
  cfg.listen = strcmp(node, "conf-a") == 0 ? m->a : m->b;
  cfg.routes = routes;
  cfg.nroutes = 3;
  cfg.reconnect_min_ms = 20;
  cfg.reconnect_max_ms = 200;
  return saga_tcp_transport_new(out, &cfg);
}

static void run_kit(const char *pki) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  medium md;
  md.pki = pki;
  snprintf(md.a, sizeof md.a, "127.0.0.1:%d", th_free_port());
  snprintf(md.b, sizeof md.b, "127.0.0.1:%d", th_free_port());
  char *dir = th_tmpdir();
  saga_conformance_medium2 m;
  memset(&m, 0, sizeof m);
  m.struct_version = SAGA_CONFORMANCE_MEDIUM_VERSION;
  m.kind = SAGA_MEDIUM_BROKERLESS;
  m.create = tcp_create;
  m.ctx = &md;
  m.ordered = 1;
  m.db_dir = dir;
  char report[4096];
  int failed = saga_conformance_run2(&loop, &m, report, sizeof report);
  printf("%s", report);
  assert_int_equal(failed, 0);
  assert_non_null(strstr(report, "PASS sagas\n"));
  assert_non_null(strstr(report, "PASS consumer-crash"));
  assert_non_null(strstr(report, "PASS sagas-crash"));
  assert_non_null(strstr(report, "PASS peer-gone"));
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  th_rmdir(dir);
}

static void test_tcp_conformance(void **state) { run_kit(NULL); }

static void test_tls_conformance(void **state) {
  char *pki = th_tmpdir(), cmd[1024];
  snprintf(cmd, sizeof cmd, "bash '%s/scripts/make_pki.sh' '%s' conf-a conf-b", SAGA_SOURCE_DIR,
           pki);
  assert_int_equal(system(cmd), 0);
  run_kit(pki);
  th_rmdir(pki);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_tcp_conformance),
                                     cmocka_unit_test(test_tls_conformance)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
