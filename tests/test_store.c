/* The SQLite store: concurrent first opens of one database, and schema version checks. */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

static int open_once(const char *path) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  saga_mem_hub *hub = NULL;
  saga_transport *t = NULL;
  if (saga_mem_hub_new(&hub, &loop, NULL, NULL, NULL) != SAGA_OK ||
      saga_mem_transport_new(&t, hub) != SAGA_OK)
    return 1;
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = "n";
  cfg.db_path = path;
  cfg.transport = t;
  saga_node *n = NULL;
  char err[256];
  int rc = saga_node_open(&n, &loop, &cfg, err, sizeof err);
  if (rc != SAGA_OK) {
    fprintf(stderr, "open failed: %s\n", err);
    return 1;
  }
  saga_node_close(n, NULL, NULL);
  th_drain(&loop);
  saga_mem_hub_close(hub);
  th_drain(&loop);
  return uv_loop_close(&loop) == 0 ? 0 : 1;
}

/* Replicas sharing one database may all open it for the first time at once: each migration
 * must be applied exactly once and every open must succeed. */
static void test_concurrent_first_open(void **state) {
  for (int round = 0; round < 5; round++) {
    char *dir = th_tmpdir();
    char *path = th_path(dir, "shared.db");
    pid_t kids[6];
    for (int i = 0; i < 6; i++) {
      fflush(NULL);
      kids[i] = fork();
      if (kids[i] == 0) _exit(open_once(path));
    }
    for (int i = 0; i < 6; i++) {
      int status = 0;
      assert_int_equal(waitpid(kids[i], &status, 0), kids[i]);
      assert_true(WIFEXITED(status));
      assert_int_equal(WEXITSTATUS(status), 0);
    }
    free(path);
    th_rmdir(dir);
  }
}

/* A database written by a newer library is refused with SAGA_ESCHEMA and a clear message. */
static void test_newer_schema_refused(void **state) {
  char *dir = th_tmpdir();
  char *path = th_path(dir, "new.db");
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, "PRAGMA user_version = 999", NULL, NULL, NULL), SQLITE_OK);
  sqlite3_close(db);
  uv_loop_t loop;
  uv_loop_init(&loop);
  saga_mem_hub *hub = NULL;
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_hub_new(&hub, &loop, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(saga_mem_transport_new(&t, hub), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = "n";
  cfg.db_path = path;
  cfg.transport = t;
  saga_node *n = NULL;
  char err[256];
  assert_int_equal(saga_node_open(&n, &loop, &cfg, err, sizeof err), SAGA_ESCHEMA);
  assert_non_null(strstr(err, "newer"));
  th_drain(&loop);
  assert_int_equal(saga_mem_hub_close(hub), SAGA_OK);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  free(path);
  th_rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_concurrent_first_open),
      cmocka_unit_test(test_newer_schema_refused),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
