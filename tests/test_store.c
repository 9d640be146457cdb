/* The SQLite store: concurrent first opens of one database, schema version checks and
 * migrations, and the checks at open (creation only when asked, damaged and read-only files
 * refused); idempotency keys scoped per definition. */
#include <fcntl.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

/* Opens a node on path (struct_version `version`, 0 = the current one) and closes it again.
 * Returns saga_node_open's code, with its message in err; -100 if the loop did not close.
 * No cmocka assertions: forked children call it too. */
static int try_open(const char *path, saga_db_mode mode, saga_db_check check, int version,
                    char *err, size_t errlen) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  saga_mem_hub *hub = NULL;
  saga_transport *t = NULL;
  if (saga_mem_hub_new(&hub, &loop, NULL, NULL, NULL) != SAGA_OK ||
      saga_mem_transport_new(&t, hub) != SAGA_OK)
    return -101;
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  if (version != 0) cfg.struct_version = version;
  cfg.name = "n";
  cfg.db_path = path;
  cfg.transport = t;
  cfg.db_mode = mode;
  cfg.db_check = check;
  saga_node *n = NULL;
  err[0] = '\0';
  int rc = saga_node_open(&n, &loop, &cfg, err, errlen);
  if (rc == SAGA_OK) saga_node_close(n, NULL, NULL);
  th_drain(&loop);
  saga_mem_hub_close(hub);
  th_drain(&loop);
  return uv_loop_close(&loop) == 0 ? rc : -100;
}

/* Opens (creating it if needed) and closes: 0 on success, else 1 with the message printed. */
static int open_once(const char *path) {
  char err[512];
  int rc = try_open(path, SAGA_DB_CREATE, SAGA_DB_CHECK_QUICK, 0, err, sizeof err);
  if (rc != SAGA_OK) fprintf(stderr, "open failed: %d %s\n", rc, err);
  return rc == SAGA_OK ? 0 : 1;
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

/* The number of the last migration in schema.sql (what a new database is at). */
static int last_migration(void) {
  FILE *f = fopen(SAGA_SCHEMA_FILE, "rb");
  assert_non_null(f);
  static char sql[1 << 16];
  size_t len = fread(sql, 1, sizeof sql - 1, f);
  fclose(f);
  sql[len] = '\0';
  int last = 0;
  for (const char *p = sql; (p = strstr(p, "-- migration ")) != NULL; p++)
    last = atoi(p + strlen("-- migration "));
  return last;
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
  assert_int_equal(q_int(db, "PRAGMA user_version"), last_migration());
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_outbox WHERE id IN (1, 2)"), 2);
  /* Migration 7: the views name states and phases of rows written long before them. */
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_instance_view WHERE"
                             " (id = 'a' AND state = 'COMPLETED' AND phase = 'ACTION') OR"
                             " (id = 'b' AND state = 'COMPENSATED' AND phase = 'COMPENSATION') OR"
                             " (id = 'c' AND state = 'FAILED' AND waiting_for = 'NONE')"), 3);
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

/* The schema.sql text before migration `upto` (the SQL of the release that ended at
 * upto - 1). Freed by the caller. */
static char *schema_before(int upto) {
  FILE *f = fopen(SAGA_SCHEMA_FILE, "rb");
  assert_non_null(f);
  char *sql = malloc(1 << 16);
  assert_non_null(sql);
  size_t len = fread(sql, 1, (1 << 16) - 1, f);
  fclose(f);
  sql[len] = '\0';
  char marker[32];
  snprintf(marker, sizeof marker, "-- migration %d", upto);
  char *m = strstr(sql, marker);
  assert_non_null(m);
  *m = '\0';
  return sql;
}

/* The number of the migration whose text holds `what` (found by content, not by number: a
 * migration may be renumbered when branches merge). */
static int migration_with(const char *what) {
  FILE *f = fopen(SAGA_SCHEMA_FILE, "rb");
  assert_non_null(f);
  static char text[1 << 16];
  size_t len = fread(text, 1, sizeof text - 1, f);
  fclose(f);
  text[len] = '\0';
  const char *at = strstr(text, what);
  assert_non_null(at);
  int num = 0;
  for (const char *p = text; (p = strstr(p, "-- migration ")) != NULL && p < at; p++)
    num = atoi(p + strlen("-- migration "));
  return num;
}

/* A database made before the trace columns, with a saga in flight, gets them on open: the row
 * keeps its values, the new columns their defaults (no caller's context: the trace of the saga
 * id; no attempt span: its reply ends none). */
static void test_migrate_trace_columns(void **state) {
  int m = migration_with("ADD COLUMN trace_parent");
  assert_true(m > 6);
  char *sql = schema_before(m);
  char *dir = th_tmpdir();
  char *path = th_path(dir, "pretrace.db");
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
  free(sql);
  char set[64];
  snprintf(set, sizeof set, "PRAGMA user_version = %d;", m - 1);
  assert_int_equal(sqlite3_exec(db, set, NULL, NULL, NULL), SQLITE_OK);
  assert_int_equal(
      sqlite3_exec(db,
                   "INSERT INTO saga_instance(id, def_name, def_version, state, phase, step,"
                   " attempt, wait, data, trace_span, created_ms, updated_ms) VALUES"
                   " ('0123456789abcdef0123456789abcdef', 'd', 1, 1, 0, 0, 1, 1, x'80',"
                   " 'fedcba9876543210', 5, 6);",
                   NULL, NULL, NULL),
      SQLITE_OK);
  /* Before the migration there is no such column. */
  assert_int_not_equal(sqlite3_exec(db, "SELECT trace_parent FROM saga_instance", NULL, NULL,
                                    NULL), SQLITE_OK);
  sqlite3_close(db);
  assert_int_equal(open_once(path), 0);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(q_int(db, "PRAGMA user_version"), last_migration());
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_instance WHERE trace_parent = '' AND"
                             " started_ns = 0 AND attempt_span = '' AND attempt_ns = 0 AND"
                             " trace_span = 'fedcba9876543210' AND created_ms = 5"), 1);
  sqlite3_close(db);
  assert_int_equal(open_once(path), 0); /* nothing applied twice */
  free(path);
  th_rmdir(dir);
}

static const char *const insert_x =
    "INSERT INTO saga_instance(id, def_name, def_version, idem_key, state, phase, step,"
    " attempt, wait, data, created_ms, updated_ms) VALUES ('x', 'beta', 1, 'k1', 1, 0, 0, 1,"
    " 1, x'80', 1, 2)";

/* A database at schema version 4, made by the previous release's SQL, gets migration 5
 * (idempotency keys unique per definition) on open. Its rows with their rowids, its indexes
 * and an operator's view over saga_instance survive. */
static void test_migrate_from_v4(void **state) {
  char *sql = schema_before(5);
  char *dir = th_tmpdir();
  char *path = th_path(dir, "v4.db");
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
  free(sql);
  assert_int_equal(
      sqlite3_exec(db,
                   "PRAGMA user_version = 4;"
                   "INSERT INTO saga_instance(rowid, id, def_name, def_version, idem_key, state,"
                   " phase, step, attempt, wait, data, created_ms, updated_ms, deadline_ms)"
                   " VALUES (7, 'a', 'alpha', 1, 'k1', 1, 0, 0, 1, 1, x'80', 1, 2, 50),"
                   " (9, 'b', 'beta', 2, 'k2', 3, 0, 2, 1, 0, x'80', 1, 2, NULL),"
                   " (11, 'c', 'beta', 2, NULL, 5, 1, 0, 1, 0, x'80', 1, 2, NULL);"
                   "INSERT INTO saga_history(saga_id, seq, at_ms, event, step, attempt)"
                   " VALUES ('a', 1, 1, 1, -1, 0);"
                   "CREATE VIEW running AS SELECT id FROM saga_instance WHERE state = 1;",
                   NULL, NULL, NULL),
      SQLITE_OK);
  /* Under schema 4 a key is unique across definitions. */
  assert_int_equal(sqlite3_exec(db, insert_x, NULL, NULL, NULL), SQLITE_CONSTRAINT);
  sqlite3_close(db);
  /* A libsaga database exists: no creation needs to be asked for. */
  char err[512];
  assert_int_equal(try_open(path, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_OK);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(q_int(db, "PRAGMA user_version"), last_migration());
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_instance"), 3);
  assert_int_equal(q_int(db, "SELECT rowid FROM saga_instance WHERE id = 'a' AND def_name ="
                             " 'alpha' AND def_version = 1 AND idem_key = 'k1' AND wait = 1"
                             " AND deadline_ms = 50"),
                   7);
  assert_int_equal(q_int(db, "SELECT rowid FROM saga_instance WHERE id = 'b' AND def_version ="
                             " 2 AND idem_key = 'k2' AND state = 3 AND step = 2"),
                   9);
  assert_int_equal(q_int(db, "SELECT rowid FROM saga_instance WHERE id = 'c' AND idem_key IS"
                             " NULL AND state = 5 AND phase = 1"),
                   11);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_history"), 1);
  /* The view still works, and the indexes are back (the due-time one is used). */
  assert_int_equal(q_int(db, "SELECT count(*) FROM running"), 1);
  assert_int_equal(q_int(db, "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name"
                             " IN ('saga_instance_deadline', 'saga_instance_state',"
                             " 'saga_instance_done')"),
                   3);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_instance INDEXED BY"
                             " saga_instance_deadline WHERE deadline_ms <= 100"),
                   1);
  assert_int_equal(q_int(db, "SELECT count(*) FROM sqlite_master WHERE name LIKE"
                             " 'saga_instance_v5%'"),
                   0);
  assert_int_equal(q_int(db, "SELECT count(*) FROM pragma_integrity_check WHERE"
                             " integrity_check <> 'ok'"),
                   0);
  /* Keys are now unique per definition: 'k1' again for beta is fine, for alpha it is not. */
  assert_int_equal(sqlite3_exec(db, insert_x, NULL, NULL, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db,
                                "INSERT INTO saga_instance(id, def_name, def_version, idem_key,"
                                " state, phase, step, attempt, wait, data, created_ms,"
                                " updated_ms) VALUES ('y', 'alpha', 2, 'k1', 1, 0, 0, 1, 1,"
                                " x'80', 1, 2)",
                                NULL, NULL, NULL),
                   SQLITE_CONSTRAINT);
  sqlite3_close(db);
  /* Opening again applies nothing twice. */
  assert_int_equal(open_once(path), 0);
  free(path);
  th_rmdir(dir);
}

/* ---- idempotency keys per definition ------------------------------------------------------ */

typedef struct starts {
  int done, status[8], existed[8];
  char id[8][40];
} starts;

static void start_cb(saga_node *n, int status, const char *saga_id, int existed, void *arg) {
  starts *s = arg;
  if (s->done < 8) {
    s->status[s->done] = status;
    s->existed[s->done] = existed;
    snprintf(s->id[s->done], 40, "%s", saga_id != NULL ? saga_id : "");
  }
  s->done++;
}

typedef struct want {
  starts *s;
  int n;
} want;

static int starts_done(void *arg) {
  want *w = arg;
  return w->s->done >= w->n;
}

/* Two definitions, one key: two sagas. The same key again for each definition: that
 * definition's saga, not started again. Also across a restart of the node. */
static void test_idem_key_per_definition(void **state) {
  char *dir = th_tmpdir();
  char *path = th_path(dir, "keys.db");
  for (int round = 0; round < 2; round++) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    saga_clock *clock = NULL;
    assert_int_equal(saga_clock_manual_new(&clock, 1000000, NULL), SAGA_OK);
    saga_mem_hub *hub = NULL;
    saga_transport *t = NULL;
    assert_int_equal(saga_mem_hub_new(&hub, &loop, clock, NULL, NULL), SAGA_OK);
    assert_int_equal(saga_mem_transport_new(&t, hub), SAGA_OK);
    saga_node_config cfg;
    saga_node_config_init(&cfg);
    cfg.name = "orch";
    cfg.db_path = path;
    cfg.transport = t;
    cfg.clock = clock;
    cfg.db_mode = round == 0 ? SAGA_DB_CREATE : SAGA_DB_OPEN_EXISTING;
    saga_node *n = NULL;
    char err[512];
    assert_int_equal(saga_node_open(&n, &loop, &cfg, err, sizeof err), SAGA_OK);
    /* Nobody serves the channel: the sagas stay RUNNING, which is all this needs. */
    saga_step step = {.name = "S", .channel = "nobody", .action = "do",
                      .kind = SAGA_STEP_PIVOT};
    saga_definition a = {SAGA_DEFINITION_VERSION, "alpha", 1, &step, 1, 0, sizeof(saga_step)};
    saga_definition b = {SAGA_DEFINITION_VERSION, "beta", 1, &step, 1, 0, sizeof(saga_step)};
    assert_int_equal(saga_node_register(n, &a), SAGA_OK);
    assert_int_equal(saga_node_register(n, &b), SAGA_OK);
    assert_int_equal(saga_node_start(n, NULL), SAGA_OK);
    starts s;
    memset(&s, 0, sizeof s);
    /* In one group commit: alpha's row is there (uncommitted) when beta's key is looked up. */
    assert_int_equal(saga_start(n, "alpha", NULL, "order-1", start_cb, &s), SAGA_OK);
    assert_int_equal(saga_start(n, "beta", NULL, "order-1", start_cb, &s), SAGA_OK);
    want w2 = {&s, 2};
    assert_int_equal(th_run_manual(&loop, clock, starts_done, &w2, 10000), 0);
    assert_int_equal(saga_start(n, "beta", NULL, "order-1", start_cb, &s), SAGA_OK);
    assert_int_equal(saga_start(n, "alpha", NULL, "order-1", start_cb, &s), SAGA_OK);
    want w4 = {&s, 4};
    assert_int_equal(th_run_manual(&loop, clock, starts_done, &w4, 10000), 0);
    for (int k = 0; k < 4; k++) assert_int_equal(s.status[k], SAGA_OK);
    assert_int_equal(s.existed[0], round);
    assert_int_equal(s.existed[1], round);
    assert_string_not_equal(s.id[0], s.id[1]);
    assert_int_equal(s.existed[2], 1);
    assert_string_equal(s.id[2], s.id[1]);
    assert_int_equal(s.existed[3], 1);
    assert_string_equal(s.id[3], s.id[0]);
    saga_info *info = NULL;
    assert_int_equal(saga_get(n, s.id[0], &info), SAGA_OK);
    assert_string_equal(info->definition, "alpha");
    saga_info_free(info);
    assert_int_equal(saga_get(n, s.id[1], &info), SAGA_OK);
    assert_string_equal(info->definition, "beta");
    saga_info_free(info);
    int64_t counts[6];
    assert_int_equal(saga_node_count_by_state(n, counts), SAGA_OK);
    assert_int_equal(counts[SAGA_RUNNING], 2);
    saga_node_close(n, NULL, NULL);
    th_drain(&loop);
    assert_int_equal(saga_mem_hub_close(hub), SAGA_OK);
    th_drain(&loop);
    saga_clock_free(clock);
    assert_int_equal(uv_loop_close(&loop), 0);
  }
  free(path);
  th_rmdir(dir);
}

/* ---- opening a database safely ------------------------------------------------------------ */

static int file_size(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? (int)st.st_size : -1;
}

/* A database that does not exist is refused unless creation is asked for; once made, it
 * opens without the flag. An old config (struct_version 3) creates, as it always did;
 * in-memory and temporary databases need no flag. */
static void test_missing_needs_create(void **state) {
  char *dir = th_tmpdir();
  char *path = th_path(dir, "new.db");
  char err[512];
  assert_int_equal(try_open(path, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_ENOTFOUND);
  printf("  missing: %s\n", err);
  assert_non_null(strstr(err, path));
  assert_non_null(strstr(err, "does not exist"));
  assert_non_null(strstr(err, "db_mode = SAGA_DB_CREATE"));
  assert_int_equal(file_size(path), -1); /* nothing made */
  assert_int_equal(try_open(path, SAGA_DB_CREATE, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_OK);
  assert_true(file_size(path) > 0);
  assert_int_equal(try_open(path, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_OK);
  /* struct_version 3 had no db_mode: such a config creates a missing database. */
  char *old = th_path(dir, "old.db");
  assert_int_equal(try_open(old, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 3, err, sizeof err),
                   SAGA_OK);
  assert_true(file_size(old) > 0);
  free(old);
  assert_int_equal(try_open(":memory:", SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err,
                            sizeof err),
                   SAGA_OK);
  assert_int_equal(try_open("", SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_OK);
  /* An application's own database without libsaga's tables: refused, then given them. */
  char *app = th_path(dir, "app.db");
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(app, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, "CREATE TABLE stock(sku TEXT, n INT);"
                                    "INSERT INTO stock VALUES ('a', 3)",
                                NULL, NULL, NULL),
                   SQLITE_OK);
  sqlite3_close(db);
  assert_int_equal(try_open(app, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_ENOTFOUND);
  assert_non_null(strstr(err, "no libsaga tables"));
  assert_int_equal(try_open(app, SAGA_DB_CREATE, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_OK);
  assert_int_equal(sqlite3_open(app, &db), SQLITE_OK);
  assert_int_equal(q_int(db, "SELECT n FROM stock"), 3);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_instance"), 0);
  sqlite3_close(db);
  free(app);
  free(path);
  th_rmdir(dir);
}

/* A database file truncated to 0 bytes is not a new database: refused, and left as it is. */
static void test_truncated_refused(void **state) {
  char *dir = th_tmpdir();
  char *path = th_path(dir, "orders.db");
  assert_int_equal(open_once(path), 0);
  assert_true(file_size(path) > 0);
  assert_int_equal(truncate(path, 0), 0);
  char err[512];
  assert_int_equal(try_open(path, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_ENOTFOUND);
  printf("  truncated: %s\n", err);
  assert_non_null(strstr(err, path));
  assert_non_null(strstr(err, "empty"));
  assert_non_null(strstr(err, "db_mode = SAGA_DB_CREATE"));
  /* Untouched: still 0 bytes, no WAL or shared-memory file made. */
  assert_int_equal(file_size(path), 0);
  char *wal = th_path(dir, "orders.db-wal");
  char *shm = th_path(dir, "orders.db-shm");
  assert_int_equal(file_size(wal), -1);
  assert_int_equal(file_size(shm), -1);
  free(wal);
  free(shm);
  /* Starting over is a decision: with the flag, a new database. */
  assert_int_equal(try_open(path, SAGA_DB_CREATE, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_OK);
  assert_true(file_size(path) > 0);
  free(path);
  th_rmdir(dir);
}

/* A real database of a few hundred sagas, with 64 bytes flipped in an index page (what a bad
 * sector or a stray write does): the indexes are broken and the node refuses the file with
 * SAGA_ECORRUPT. Opened without the check, the damage shows as SAGA_ECORRUPT at run time,
 * not as SAGA_EIO. */
static void test_corrupt_refused(void **state) {
  char *dir = th_tmpdir();
  th_world_opts o;
  th_world_defaults(&o);
  o.dir = dir;
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  enum { SAGAS = 400 };
  for (int i = 0; i < SAGAS; i++) assert_int_equal(th_world_start(&w, i, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, SAGAS), 0);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  th_world_free(&w); /* closes the nodes (checkpointing the WAL), keeps dir */
  char *orig = th_path(dir, "orch.db");
  char *path = th_path(dir, "copy.db");
  /* A copy, damaged: 64 bytes flipped from byte 8 of the id index's root page (its child
   * pointers). */
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(orig, &db), SQLITE_OK);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_instance"), SAGAS);
  int64_t page_size = q_int(db, "PRAGMA page_size");
  int64_t root = q_int(db, "SELECT rootpage FROM sqlite_master WHERE type = 'index' AND"
                           " tbl_name = 'saga_instance' AND sql IS NULL ORDER BY name LIMIT 1");
  int64_t pages = q_int(db, "PRAGMA page_count");
  sqlite3_close(db);
  printf("  %d sagas: %lld pages of %lld bytes; id index root page %lld\n", SAGAS,
         (long long)pages, (long long)page_size, (long long)root);
  assert_true(pages > 50 && root > 1);
  FILE *in = fopen(orig, "rb");
  assert_non_null(in);
  size_t size = (size_t)(pages * page_size);
  unsigned char *bytes = malloc(size);
  assert_non_null(bytes);
  assert_int_equal(fread(bytes, 1, size, in), size);
  fclose(in);
  size_t at = (size_t)((root - 1) * page_size + 8);
  for (size_t k = 0; k < 64; k++) bytes[at + k] ^= 0xff;
  FILE *out = fopen(path, "wb");
  assert_non_null(out);
  assert_int_equal(fwrite(bytes, 1, size, out), size);
  assert_int_equal(fclose(out), 0);
  free(bytes);
  /* The damage is real: SQLite's full check finds it. */
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &st, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_step(st);
  const char *verdict = rc == SQLITE_ROW ? (const char *)sqlite3_column_text(st, 0) : "error";
  printf("  integrity_check: %.80s\n", verdict);
  assert_string_not_equal(verdict, "ok");
  sqlite3_finalize(st);
  sqlite3_close(db);
  char err[512];
  assert_int_equal(try_open(path, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_ECORRUPT);
  printf("  damaged: %s\n", err);
  assert_non_null(strstr(err, path));
  assert_non_null(strstr(err, "damaged"));
  assert_non_null(strstr(err, "quick_check"));
  assert_string_equal(saga_err_name(SAGA_ECORRUPT), "ECORRUPT");
  assert_int_equal(try_open(path, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_FULL, 0, err, sizeof err),
                   SAGA_ECORRUPT);
  assert_non_null(strstr(err, "integrity_check"));
  /* The undamaged original passes both checks. */
  assert_int_equal(try_open(orig, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_FULL, 0, err, sizeof err),
                   SAGA_OK);
  /* Without the check the node opens, and reading a saga through the broken index fails
   * with the store's own code. */
  uv_loop_t loop;
  uv_loop_init(&loop);
  saga_mem_hub *hub = NULL;
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_hub_new(&hub, &loop, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(saga_mem_transport_new(&t, hub), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = "orch";
  cfg.db_path = path;
  cfg.transport = t;
  cfg.db_check = SAGA_DB_CHECK_NONE;
  saga_node *n = NULL;
  assert_int_equal(saga_node_open(&n, &loop, &cfg, err, sizeof err), SAGA_OK);
  saga_info *info = NULL;
  assert_int_equal(saga_get(n, id, &info), SAGA_ECORRUPT);
  printf("  at run time: %s\n", saga_node_errmsg(n));
  saga_node_close(n, NULL, NULL);
  th_drain(&loop);
  assert_int_equal(saga_mem_hub_close(hub), SAGA_OK);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  /* A file that is no database at all is damaged too, and even SAGA_DB_CREATE leaves it
   * alone. */
  char *junk = th_path(dir, "junk.db");
  out = fopen(junk, "wb");
  assert_non_null(out);
  for (int k = 0; k < 512; k++) fputs("not a database\n", out);
  assert_int_equal(fclose(out), 0);
  int junk_size = file_size(junk);
  for (int mode = 0; mode < 2; mode++) {
    assert_int_equal(try_open(junk, mode ? SAGA_DB_CREATE : SAGA_DB_OPEN_EXISTING,
                              SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                     SAGA_ECORRUPT);
    assert_non_null(strstr(err, junk));
    assert_non_null(strstr(err, "not a database"));
    assert_int_equal(file_size(junk), junk_size);
  }
  printf("  junk: %s\n", err);
  free(junk);
  free(orig);
  free(path);
  th_rmdir(dir);
}

/* A read-only database file in a writable folder is refused at open with SAGA_EREADONLY,
 * not at the first saga. Root writes read-only files anyway, so the open runs in a child
 * that drops to an ordinary user (nobody) when started as root. */
static void test_readonly_refused(void **state) {
  char *dir = th_tmpdir();
  char *path = th_path(dir, "ro.db");
  assert_int_equal(open_once(path), 0);
  assert_int_equal(chmod(path, 0444), 0);
  assert_int_equal(chmod(dir, 0777), 0); /* the folder stays writable, for anyone */
  fflush(NULL);
  pid_t kid = fork();
  assert_true(kid >= 0);
  if (kid == 0) {
    if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) _exit(3);
    if (access(path, W_OK) == 0) _exit(4); /* the file must really be read-only */
    char err[512];
    int rc = try_open(path, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err, sizeof err);
    printf("  read-only: %s: %s\n", saga_err_name(rc), err);
    if (rc != SAGA_EREADONLY) _exit(1);
    if (strstr(err, path) == NULL || strstr(err, "read-only") == NULL) _exit(2);
    /* Refused before reading: no WAL or shared-memory file was made for it. */
    size_t len = strlen(path);
    char side[600];
    snprintf(side, sizeof side, "%.*s-wal", (int)len, path);
    int wal = access(side, F_OK) == 0;
    snprintf(side, sizeof side, "%.*s-shm", (int)len, path);
    int shm = access(side, F_OK) == 0;
    printf("  read-only: -wal %s, -shm %s\n", wal ? "made" : "none", shm ? "made" : "none");
    fflush(stdout);
    _exit(wal || shm ? 5 : 0);
  }
  int status = 0;
  assert_int_equal(waitpid(kid, &status, 0), kid);
  assert_true(WIFEXITED(status));
  assert_int_equal(WEXITSTATUS(status), 0);
  assert_int_equal(chmod(dir, 0700), 0);
  assert_int_equal(chmod(path, 0644), 0);
  /* Writable again: it opens. */
  char err[512];
  assert_int_equal(try_open(path, SAGA_DB_OPEN_EXISTING, SAGA_DB_CHECK_QUICK, 0, err, sizeof err),
                   SAGA_OK);
  free(path);
  th_rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_concurrent_first_open),
      cmocka_unit_test(test_newer_schema_refused),
      cmocka_unit_test(test_migrate_from_v1),
      cmocka_unit_test(test_migrate_from_v4),
      cmocka_unit_test(test_migrate_trace_columns),
      cmocka_unit_test(test_idem_key_per_definition),
      cmocka_unit_test(test_missing_needs_create),
      cmocka_unit_test(test_truncated_refused),
      cmocka_unit_test(test_corrupt_refused),
      cmocka_unit_test(test_readonly_refused),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
