/* 1,000 sagas across processes over NATS JetStream: the broker and the
 * orchestrator are killed with SIGKILL and restarted, one participant replica of two is
 * killed for good (tests/multiproc.h). */
#include "multiproc.h"

static void test_multiproc_nats(void **state) { mp_run_broker("nats"); }

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_multiproc_nats)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
