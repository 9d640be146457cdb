/* 1,000 sagas across processes over TCP; each participant peer and the orchestrator are
 * killed with SIGKILL in the middle of the run and restarted. */
#include "multiproc.h"

static void add_common(mp_proc *p, const char *role, const char *db, char routes[4][64]) {
  mp_arg(p, "saga_proc");
  mp_arg(p, role);
  mp_arg(p, "--db");
  mp_arg(p, db);
  for (int i = 0; i < 4; i++) {
    mp_arg(p, "--route");
    mp_arg(p, routes[i]);
  }
}

static void test_multiproc_tcp(void **state) {
  char *dir = th_tmpdir();
  char *orch_db = th_path(dir, "orch.db"), *p1_db = th_path(dir, "inv.db"),
       *p2_db = th_path(dir, "ordpay.db");
  char ao[32], a1[32], a2[32], routes[4][64];
  snprintf(ao, sizeof ao, "127.0.0.1:%d", th_free_port());
  snprintf(a1, sizeof a1, "127.0.0.1:%d", th_free_port());
  snprintf(a2, sizeof a2, "127.0.0.1:%d", th_free_port());
  snprintf(routes[0], 64, "orch=%s", ao);
  snprintf(routes[1], 64, "inv=%s", a1);
  snprintf(routes[2], 64, "ord=%s", a2);
  snprintf(routes[3], 64, "pay=%s", a2);
  mp_proc orch = {0}, p1 = {0}, p2 = {0};
  snprintf(orch.log, sizeof orch.log, "%s/orch.log", dir);
  snprintf(p1.log, sizeof p1.log, "%s/inv.log", dir);
  snprintf(p2.log, sizeof p2.log, "%s/ordpay.log", dir);
  add_common(&orch, "orch", orch_db, routes);
  mp_arg(&orch, "--tcp");
  mp_arg(&orch, ao);
  mp_arg(&orch, "--sagas");
  mp_arg(&orch, "1000");
  mp_arg(&orch, "--rate"); /* 1000 sagas started over 2 s: the kills land mid-run */
  mp_arg(&orch, "5");
  add_common(&p1, "part", p1_db, routes);
  mp_arg(&p1, "--tcp");
  mp_arg(&p1, a1);
  mp_arg(&p1, "--serve");
  mp_arg(&p1, "inv");
  add_common(&p2, "part", p2_db, routes);
  mp_arg(&p2, "--tcp");
  mp_arg(&p2, a2);
  mp_arg(&p2, "--serve");
  mp_arg(&p2, "ord,pay");
  mp_spawn(&p1);
  mp_spawn(&p2);
  mp_spawn(&orch);

  int late = 0;
  mp_kill_point(orch_db, &orch, MP_SAGAS / 4, "the ord/pay peer (restarted)", &late);
  mp_kill9(&p2);
  mp_spawn(&p2);
  mp_kill_point(orch_db, &orch, MP_SAGAS / 2, "the orchestrator (restarted)", &late);
  mp_kill9(&orch);
  mp_spawn(&orch);
  mp_kill_point(orch_db, &orch, 3 * MP_SAGAS / 4, "the inv peer (restarted)", &late);
  mp_kill9(&p1);
  mp_spawn(&p1);
  int n = mp_wait_terminal(orch_db, &orch, MP_SAGAS, 600000);
  mp_proc *all[] = {&orch, &p1, &p2};
  if (n < MP_SAGAS) mp_dump_logs(all, 3);
  assert_int_equal(n, MP_SAGAS);
  const char *parts[] = {p1_db, p2_db};
  mp_free(&orch);
  mp_free(&p1);
  mp_free(&p2);
  assert_int_equal(mp_verify(orch_db, parts, 2, MP_SAGAS), 0);
  assert_int_equal(late, 0);
  free(orch_db);
  free(p1_db);
  free(p2_db);
  th_rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_multiproc_tcp)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
