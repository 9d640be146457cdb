/* The in-memory transport passes the conformance kit. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "saga/conformance.h"

static int mem_create(void *ctx, const char *node, saga_transport **out) {
  return saga_mem_transport_new(out, (saga_mem_hub *)ctx);
}

static void test_mem_conformance(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  saga_mem_hub *hub = NULL;
  assert_int_equal(saga_mem_hub_new(&hub, &loop, NULL, NULL, NULL), SAGA_OK);
  char *dir = th_tmpdir();
  saga_conformance_medium m;
  memset(&m, 0, sizeof m);
  m.create = mem_create;
  m.ctx = hub;
  m.ordered = 1;
  m.db_dir = dir;
  char report[4096];
  int failed = saga_conformance_run(&loop, &m, report, sizeof report);
  printf("%s", report);
  assert_int_equal(failed, 0);
  assert_non_null(strstr(report, "PASS sagas"));
  assert_int_equal(saga_mem_hub_close(hub), SAGA_OK);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  th_rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_mem_conformance)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
