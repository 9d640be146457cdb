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

static int64_t q_int(sqlite3 *db, const char *sql) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  int64_t v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

/* A database at schema version 1 (the first release's) is brought to the latest version on
 * open, keeping its rows, and the node then uses it. */
static void test_migrate_from_v1(void **state) {
  FILE *f = fopen(SAGA_SCHEMA_FILE, "rb");
  assert_non_null(f);
  static char sql[1 << 16];
  size_t len = fread(sql, 1, sizeof sql - 1, f);
  fclose(f);
  sql[len] = '\0';
  char *m2 = strstr(sql, "-- migration 2");
  assert_non_null(m2);
  *m2 = '\0'; /* keep migration 1 only */
  char *dir = th_tmpdir();
  char *path = th_path(dir, "v1.db");
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
  assert_int_equal(
      sqlite3_exec(db,
                   "PRAGMA user_version = 1;"
                   "INSERT INTO saga_instance(id, def_name, def_version, state, phase, step,"
                   " attempt, wait, data, created_ms, updated_ms) VALUES"
                   " ('a', 'd', 1, 3, 0, 2, 1, 0, x'80', 1, 2),"
                   " ('b', 'd', 1, 4, 1, 0, 1, 0, x'80', 1, 2),"
                   " ('c', 'd', 1, 5, 1, 0, 1, 0, x'80', 1, 2);"
                   "INSERT INTO saga_outbox(channel, saga_id, body, created_ms) VALUES"
                   " ('ch', 'a', x'01', 1), ('ch', 'a', x'02', 1), ('ch', 'a', x'03', 1);"
                   "DELETE FROM saga_outbox WHERE id = 3;",
                   NULL, NULL, NULL),
      SQLITE_OK);
  sqlite3_close(db);
  assert_int_equal(open_once(path), 0);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_true(q_int(db, "PRAGMA user_version") >= 2);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_instance"), 3);
  /* Migration 3: the outbox keeps its rows, loses AUTOINCREMENT, and the id mark carries on
   * from sqlite_sequence (3, although row 3 was deleted). */
  assert_int_equal(q_int(db, "PRAGMA user_version"), 4);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_outbox WHERE id IN (1, 2)"), 2);
  assert_int_equal(q_int(db, "SELECT count(*) FROM sqlite_master WHERE name = 'saga_outbox'"
                             " AND sql LIKE '%AUTOINCREMENT%'"), 0);
  assert_int_equal(q_int(db, "SELECT value FROM saga_meta WHERE key = 'outbox_id'"), 3);
  /* Migration 4: no age index on the inbox (retention sweeps it in key order). */
  assert_int_equal(q_int(db, "SELECT count(*) FROM sqlite_master WHERE name ="
                             " 'saga_inbox_received'"), 0);
  assert_int_equal(q_int(db, "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND"
                             " name = 'saga_instance_done'"), 1);
  /* The purge's query uses the partial index, and sees finished sagas only. */
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_instance INDEXED BY saga_instance_done"
                             " WHERE state IN (3, 4) AND updated_ms < 10"), 2);
  sqlite3_close(db);
  /* Opening again applies nothing twice. */
  assert_int_equal(open_once(path), 0);
  free(path);
  th_rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_concurrent_first_open),
      cmocka_unit_test(test_newer_schema_refused),
      cmocka_unit_test(test_migrate_from_v1),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
