/* 1,000 sagas across processes over Redis Streams: the broker and the
 * orchestrator are killed with SIGKILL and restarted, one participant replica of two is
 * killed for good (tests/multiproc.h). */
#include "multiproc.h"

static void test_multiproc_redis(void **state) { mp_run_broker("redis"); }

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_multiproc_redis)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
