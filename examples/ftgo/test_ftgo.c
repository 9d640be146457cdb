/*
 * End to end: runs the documented command (`ftgo demo DIR`: four processes over TCP) and
 * then checks every outcome in the four services' databases with its own eyes — the demo's
 * own checks and exit status are not trusted alone:
 *   - o1, created while Accounting was down: revise and cancel refused while it was
 *     APPROVAL_PENDING (no revision recorded from then; the cancel saga COMPENSATED with the
 *     create saga named as the lock's holder), then approved, revised once (qty 3), and
 *     cancelled by a second cancel saga (order and ticket CANCELLED, authorization REVERSED);
 *   - o2, o3, o4 rejected at the consumer check, at ticket creation and at card
 *     authorization: orders REJECTED, o4's ticket REJECTED by its compensation, no ticket for
 *     o2 and o3, no authorization for any;
 *   - no semantic lock left in any database; every saga ended as planned.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include <saga.h>

static char dir[256];

/* The text of the first column of the first row of sql (parameter arg) in DIR/db. */
static char *q(const char *db, const char *sql, const char *arg) {
  static char out[8][600];
  static int k;
  char *o = out[k++ % 8];
  o[0] = '\0';
  char path[400];
  snprintf(path, sizeof path, "%s/%s.db", dir, db);
  sqlite3 *h = NULL;
  assert_int_equal(sqlite3_open_v2(path, &h, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) != SQLITE_OK)
    fail_msg("%s: %s", sql, sqlite3_errmsg(h));
  if (arg != NULL) sqlite3_bind_text(st, 1, arg, -1, SQLITE_TRANSIENT);
  int rc = sqlite3_step(st);
  assert_true(rc == SQLITE_ROW || rc == SQLITE_DONE);
  if (rc == SQLITE_ROW && sqlite3_column_text(st, 0) != NULL)
    snprintf(o, 600, "%s", (const char *)sqlite3_column_text(st, 0));
  sqlite3_finalize(st);
  sqlite3_close(h);
  return o;
}

static char *read_file(const char *path) {
  FILE *f = fopen(path, "r");
  assert_non_null(f);
  static char buf[1 << 16];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = '\0';
  fclose(f);
  return buf;
}

static void test_create_order_saga(void **state) {
  (void)state;
  snprintf(dir, sizeof dir, "%s/ftgo-test.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  assert_non_null(mkdtemp(dir));
  char out[400];
  snprintf(out, sizeof out, "%s/demo.out", dir);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    if (freopen(out, "w", stdout) == NULL) _exit(127);
    execl(FTGO_BIN, FTGO_BIN, "demo", dir, (char *)NULL);
    _exit(127);
  }
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  const char *text = read_file(out);
  printf("%s", text);
  assert_true(WIFEXITED(status));
  assert_int_equal(WEXITSTATUS(status), 0);
  assert_non_null(strstr(text, "all outcomes as expected: 0 check(s) failed"));

  /* The sagas, by their idempotency keys. */
  const char *by_key = "SELECT state FROM saga_instance WHERE idem_key = ?1";
  char create1[40];
  snprintf(create1, sizeof create1, "%s",
           q("order", "SELECT id FROM saga_instance WHERE idem_key = ?1", "create-o1"));
  assert_int_equal(strlen(create1), 32);
  assert_string_equal(q("order", by_key, "create-o1"), "3");   /* COMPLETED */
  assert_string_equal(q("order", by_key, "cancel-o1-1"), "4"); /* COMPENSATED */
  assert_string_equal(q("order", by_key, "cancel-o1-2"), "3");
  for (int i = 2; i <= 4; i++) {
    char key[16];
    snprintf(key, sizeof key, "create-o%d", i);
    assert_string_equal(q("order", by_key, key), "4");
  }
  /* The cancel refused while pending names the lock and its holder. */
  char held[128];
  snprintf(held, sizeof held, "order 'o1' is held by saga %s (step 0)", create1);
  const char *err =
      q("order", "SELECT error FROM saga_instance WHERE idem_key = ?1", "cancel-o1-1");
  if (strstr(err, held) == NULL) fail_msg("cancel-o1-1's error '%s' lacks '%s'", err, held);
  /* The revise while pending was refused: one revision only, the later one. */
  assert_string_equal(q("order", "SELECT count(*) FROM ftgo_order_revision", NULL), "1");
  assert_string_equal(q("order", "SELECT qty FROM ftgo_order_revision WHERE order_id = ?1", "o1"),
                      "3");
  assert_string_equal(q("order", "SELECT qty FROM ftgo_order WHERE id = ?1", "o1"), "3");
  assert_non_null(strstr(text, "order o1 is held by saga"));

  /* Business state of every order in every service. */
  const char *order = "SELECT state FROM ftgo_order WHERE id = ?1";
  const char *ticket = "SELECT state FROM ftgo_ticket WHERE order_id = ?1";
  const char *auth = "SELECT state FROM ftgo_authorization WHERE order_id = ?1";
  assert_string_equal(q("order", order, "o1"), "CANCELLED");
  assert_string_equal(q("kitchen", ticket, "o1"), "CANCELLED");
  assert_string_equal(q("accounting", auth, "o1"), "REVERSED");
  assert_string_equal(q("order", order, "o2"), "REJECTED"); /* consumer check */
  assert_string_equal(q("kitchen", ticket, "o2"), "");
  assert_string_equal(q("order", order, "o3"), "REJECTED"); /* ticket creation */
  assert_string_equal(q("kitchen", ticket, "o3"), "");
  assert_string_equal(q("order", order, "o4"), "REJECTED"); /* card authorization */
  assert_string_equal(q("kitchen", ticket, "o4"), "REJECTED");
  for (int i = 2; i <= 4; i++) {
    char id[8];
    snprintf(id, sizeof id, "o%d", i);
    assert_string_equal(q("accounting", auth, id), "");
  }
  /* Where each rejection came from. */
  assert_non_null(
      strstr(q("order", "SELECT error FROM saga_instance WHERE idem_key = ?1", "create-o2"),
             "consumer is not allowed to order"));
  assert_non_null(
      strstr(q("order", "SELECT error FROM saga_instance WHERE idem_key = ?1", "create-o3"),
             "the restaurant does not serve this item"));
  assert_non_null(
      strstr(q("order", "SELECT error FROM saga_instance WHERE idem_key = ?1", "create-o4"),
             "card declined"));

  /* No lock left anywhere; the kitchen's were taken and released (its history shows a
   * ticket for o1 and o4). */
  static const char *const dbs[] = {"order", "consumer", "kitchen", "accounting"};
  for (int i = 0; i < 4; i++)
    assert_string_equal(q(dbs[i], "SELECT count(*) FROM saga_lock", NULL), "0");
  char buf[SAGA_LOCK_HOLDER_SIZE];
  char path[400];
  snprintf(path, sizeof path, "%s/kitchen.db", dir);
  sqlite3 *h = NULL;
  assert_int_equal(sqlite3_open_v2(path, &h, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
  assert_int_equal(saga_lock_holder(h, "ticket", "o1", buf, sizeof buf), SAGA_ENOTFOUND);
  sqlite3_close(h);

  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  assert_int_equal(system(cmd), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_create_order_saga)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
