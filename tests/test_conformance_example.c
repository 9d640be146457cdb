/* The example adapter of docs/adapters.md (examples/adapter/udp_adapter.c) passes the kit. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "saga/conformance.h"
#include "udp_adapter.h"

static int create(void *ctx, const char *node, saga_transport **out) {
  return example_udp_transport_new(out, (const char *)ctx);
}

static void test_example_conformance(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char *dir = th_tmpdir();
  saga_conformance_medium2 m;
  memset(&m, 0, sizeof m);
  m.struct_version = SAGA_CONFORMANCE_MEDIUM_VERSION;
  m.kind = SAGA_MEDIUM_BROKERLESS;
  m.create = create;
  m.ctx = dir;
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

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_example_conformance)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
