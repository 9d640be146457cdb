/*
 * Operator requests and recorded definitions: what an operator's tool (sagactl) relies on.
 * A request is a row the tool writes into saga_operator_request with its own connection, as
 * here; the node carries it out in its own transaction (within SAGA_OPERATOR_POLL_MS while it
 * runs, at saga_node_start() otherwise) and writes the result into the same row. Refused
 * requests change nothing and say why.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "harness.h"

/* ---- the tool's side: its own connection to the orchestrator's database ----------------- */

static sqlite3 *tool_db(th_world *w, const char *node) {
  char file[64];
  snprintf(file, sizeof file, "%s.db", node);
  char *path = th_path(w->dir, file);
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
  sqlite3_busy_timeout(db, 5000);
  free(path);
  return db;
}

static int64_t request(sqlite3 *db, const char *action, const char *target) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, "INSERT INTO saga_operator_request(at_ms, action,"
                                          " target, requested_by) VALUES(1, ?1, ?2, 'tester')",
                                      -1, &st, NULL),
                   SQLITE_OK);
  sqlite3_bind_text(st, 1, action, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, target, -1, SQLITE_STATIC);
  assert_int_equal(sqlite3_step(st), SQLITE_DONE);
  sqlite3_finalize(st);
  return sqlite3_last_insert_rowid(db);
}

/* The request's state (0 pending, 1 done, 2 refused); its result into out. */
static int req_state(sqlite3 *db, int64_t id, char *out, size_t cap) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, "SELECT state, result FROM saga_operator_request"
                                          " WHERE id = ?1", -1, &st, NULL),
                   SQLITE_OK);
  sqlite3_bind_int64(st, 1, id);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  int state = sqlite3_column_int(st, 0);
  if (out != NULL) snprintf(out, cap, "%s", (const char *)sqlite3_column_text(st, 1));
  sqlite3_finalize(st);
  return state;
}

static int64_t q_int(sqlite3 *db, const char *sql) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  int64_t v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

typedef struct req_wait {
  sqlite3 *db;
  int64_t id;
} req_wait;

static int req_settled(void *arg) {
  req_wait *r = arg;
  return req_state(r->db, r->id, NULL, 0) != 0;
}

/* Runs the world until the node carried request id out (or refused it); returns its state. */
static int wait_request(th_world *w, sqlite3 *db, int64_t id, char *out, size_t cap) {
  req_wait r = {db, id};
  assert_int_equal(th_run_manual(&w->loop, w->clock, req_settled, &r, 60000), 0);
  return req_state(db, id, out, cap);
}

/* A saga whose step 1 is refused and whose step 0's compensation is refused every time:
 * FAILED, waiting for an operator. */
static void make_failed(th_world *w) {
  w->comp_mode[0] = 'r';
  assert_int_equal(th_world_start_ex(w, 0, NULL, 1, -1), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(w, 1), 0);
  assert_int_equal(th_saga_state(w, w->last_id), SAGA_FAILED);
}

/* Three steps, the last the pivot; step 1 retried once, with a reply timeout of timeout_ms
 * (0: waits for ever); nobody serves the channels of skip_mask. */
static void open_world_ex(th_world *w, uint32_t timeout_ms, unsigned skip_mask) {
  th_world_opts o;
  th_world_defaults(&o);
  o.nsteps = 3;
  o.kinds[2] = SAGA_STEP_PIVOT;
  o.comp_retry[0].max_attempts = 2;
  o.retry[1].max_attempts = 2;
  o.retry[1].backoff_ms = 250;
  o.timeout_ms[1] = timeout_ms;
  o.skip_mask = skip_mask;
  assert_int_equal(th_world_open(w, &o), SAGA_OK);
}
static void open_world(th_world *w) { open_world_ex(w, 1500, 0); }

/* ---- definitions ------------------------------------------------------------------------ */

static void test_definitions_recorded(void **state) {
  (void)state;
  th_world w;
  open_world(&w);
  sqlite3 *db = tool_db(&w, "orch");
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_definition WHERE name = 'test' AND"
                             " version = 1 AND nsteps = 3"), 1);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_definition_step WHERE def_name = 'test'"),
                   3);
  /* Each step as registered: name, kind, channel, commands, retry, timeout. */
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_definition_step WHERE def_name = 'test'"
                             " AND step = 1 AND name = 'S1' AND kind = 0 AND channel = 'p1' AND"
                             " action = 'do' AND compensation = 'undo' AND local = 0 AND"
                             " max_attempts = 2 AND backoff_ms = 250 AND timeout_ms = 1500"),
                   1);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_definition_step WHERE def_name = 'test'"
                             " AND step = 2 AND name = 'S2' AND kind = 1 AND compensation = ''"),
                   1);
  /* Defaults as the engine applies them: one attempt, 100 ms x 2 up to 30 s; no timeout
   * (the harness asks for SAGA_STEP_NO_TIMEOUT) as 4294967295; the compensation's own
   * policy as set (2 attempts). */
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_definition_step WHERE def_name = 'test'"
                             " AND step = 0 AND max_attempts = 1 AND backoff_ms = 100 AND"
                             " multiplier = 2 AND cap_ms = 30000 AND timeout_ms = 4294967295"
                             " AND comp_max_attempts = 2"), 1);
  /* The participant node registered no definition: it records none. */
  sqlite3 *pdb = tool_db(&w, "part");
  assert_int_equal(q_int(pdb, "SELECT count(*) FROM saga_definition"), 0);
  sqlite3_close(pdb);
  /* The views name a saga's current step from the recorded definition. */
  assert_int_equal(th_world_start(&w, 0, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_instance_view WHERE state = 'COMPLETED'"
                             " AND step_name = 'S2'"), 1);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_history_view WHERE event = 'STEP_SENT'"
                             " AND step_name = 'S1'"), 1);
  sqlite3_close(db);
  th_world_free(&w);
}

/* ---- retry and cancel ------------------------------------------------------------------- */

static void test_retry_failed(void **state) {
  (void)state;
  th_world w;
  open_world(&w);
  make_failed(&w);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  sqlite3 *db = tool_db(&w, "orch");
  /* The cause is still there: the retry is carried out, and the saga fails again. The fix
   * comes next, and a second request then finishes the compensation. */
  w.comp_mode[0] = 'o';
  int64_t r = request(db, "retry", id);
  char result[640];
  assert_int_equal(wait_request(&w, db, r, result, sizeof result), 1);
  assert_non_null(strstr(result, "compensation resumed at step 0 ('S0')"));
  assert_int_equal(th_world_run_until_terminal(&w, 2), 0);
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPENSATED);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  /* The history tells who did it, before its effect. */
  char sql[512];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM saga_history_view a JOIN saga_history_view b"
           " ON a.saga_id = b.saga_id AND b.seq = a.seq + 1 WHERE a.saga_id = '%s' AND"
           " a.event = 'OPERATOR_REQUEST' AND a.detail LIKE 'operator request %% retry by tester'"
           " AND b.event = 'COMPENSATION_SENT'", id);
  assert_int_equal(q_int(db, sql), 1);
  assert_true(th_count_events(&w, SAGA_EV_OPERATOR_REQUEST, -1) == 1);
  /* Retrying it again is refused: it is COMPENSATED now. Nothing is written for it. */
  int64_t hist = q_int(db, "SELECT count(*) FROM saga_history");
  r = request(db, "retry", id);
  assert_int_equal(wait_request(&w, db, r, result, sizeof result), 2);
  assert_non_null(strstr(result, "is COMPENSATED, not FAILED"));
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_history"), hist);
  sqlite3_close(db);
  th_world_free(&w);
}

static void test_cancel(void **state) {
  (void)state;
  th_world w;
  /* Nobody serves step 1's channel: the saga waits there, RUNNING before its pivot. */
  open_world_ex(&w, 1500, 1u << 1);
  assert_int_equal(th_world_start(&w, 0, NULL), SAGA_OK);
  th_world_settle(&w, 500);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  assert_int_equal(th_saga_state(&w, id), SAGA_RUNNING);
  sqlite3 *db = tool_db(&w, "orch");
  int64_t r = request(db, "cancel", id);
  char result[640];
  assert_int_equal(wait_request(&w, db, r, result, sizeof result), 1);
  assert_non_null(strstr(result, "cancelled: compensating from step 1 ('S1')"));
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPENSATING);
  /* Step 1's participant is back: it tombstones the step, step 0 is undone. */
  th_world_close_nodes(&w);
  w.o.skip_mask = 0;
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPENSATED);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  /* A saga past its pivot cannot be cancelled: refused, with the reason, nothing changed. */
  th_world_close_nodes(&w);
  w.o.skip_mask = 1u << 2; /* the pivot's channel does not answer */
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  th_world_settle(&w, 500);
  snprintf(id, sizeof id, "%s", w.last_id);
  assert_int_equal(th_saga_state(&w, id), SAGA_RUNNING);
  int64_t hist = q_int(db, "SELECT count(*) FROM saga_history");
  r = request(db, "cancel", id);
  assert_int_equal(wait_request(&w, db, r, result, sizeof result), 2);
  assert_non_null(strstr(result, "past its pivot"));
  assert_int_equal(th_saga_state(&w, id), SAGA_RUNNING);
  assert_int_equal(q_int(db, "SELECT count(*) FROM saga_history"), hist);
  /* Unknown saga, unknown action, a target too long to be anything: refused, named. */
  r = request(db, "cancel", "0123456789abcdef0123456789abcdef");
  assert_int_equal(wait_request(&w, db, r, result, sizeof result), 2);
  assert_non_null(strstr(result, "no saga '0123456789abcdef0123456789abcdef'"));
  r = request(db, "reboot", id);
  assert_int_equal(wait_request(&w, db, r, result, sizeof result), 2);
  assert_non_null(strstr(result, "unknown action 'reboot'"));
  char longid[300];
  memset(longid, 'a', sizeof longid - 1);
  longid[sizeof longid - 1] = '\0';
  r = request(db, "retry", longid);
  assert_int_equal(wait_request(&w, db, r, result, sizeof result), 2);
  sqlite3_close(db);
  th_world_free(&w);
}

/* A request written while no node runs is carried out at the next start. */
static void test_request_while_down(void **state) {
  (void)state;
  th_world w;
  open_world(&w);
  make_failed(&w);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  th_world_close_nodes(&w);
  sqlite3 *db = tool_db(&w, "orch");
  int64_t r = request(db, "retry", id);
  th_drain(&w.loop);
  assert_int_equal(req_state(db, r, NULL, 0), 0); /* nobody to carry it out */
  w.comp_mode[0] = 'o';
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  /* Taken at the start: carried out on the first loop turns, before any poll is due. */
  uv_run(&w.loop, UV_RUN_NOWAIT);
  uv_run(&w.loop, UV_RUN_NOWAIT);
  char result[640];
  assert_int_equal(req_state(db, r, result, sizeof result), 1);
  assert_int_equal(th_world_run_until_terminal(&w, 2), 0);
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPENSATED);
  sqlite3_close(db);
  th_world_free(&w);
}

/* ---- dead letters ----------------------------------------------------------------------- */

/* Moves the orchestrator's unconfirmed command to `channel` into the participant's dead
 * letters, as a transport that gave up on delivering it would have done (it acknowledged it:
 * the sender's row is gone). Nodes closed. Returns the dead letter's id. */
static int64_t dead_letter_command(th_world *w, const char *channel) {
  sqlite3 *odb = tool_db(w, "orch"), *pdb = tool_db(w, "part");
  sqlite3_stmt *get = NULL, *put = NULL;
  assert_int_equal(sqlite3_prepare_v2(odb, "SELECT id, body FROM saga_outbox WHERE channel = ?1",
                                      -1, &get, NULL), SQLITE_OK);
  sqlite3_bind_text(get, 1, channel, -1, SQLITE_STATIC);
  assert_int_equal(sqlite3_step(get), SQLITE_ROW);
  int64_t row = sqlite3_column_int64(get, 0);
  assert_int_equal(sqlite3_prepare_v2(pdb, "INSERT INTO saga_dead_letter(at_ms, channel, msg_id,"
                                           " reason, body) VALUES(1, ?1, '', 'delivered 10 times"
                                           " without an acknowledgement', ?2)", -1, &put, NULL),
                   SQLITE_OK);
  sqlite3_bind_text(put, 1, channel, -1, SQLITE_STATIC);
  sqlite3_bind_blob(put, 2, sqlite3_column_blob(get, 1), sqlite3_column_bytes(get, 1),
                    SQLITE_TRANSIENT);
  assert_int_equal(sqlite3_step(put), SQLITE_DONE);
  int64_t id = sqlite3_last_insert_rowid(pdb);
  sqlite3_finalize(get);
  sqlite3_finalize(put);
  char sql[96];
  snprintf(sql, sizeof sql, "DELETE FROM saga_outbox WHERE id = %lld", (long long)row);
  assert_int_equal(sqlite3_exec(odb, sql, NULL, NULL, NULL), SQLITE_OK);
  sqlite3_close(odb);
  sqlite3_close(pdb);
  return id;
}

static void test_replay_and_purge(void **state) {
  (void)state;
  th_world w;
  /* Step 1's command is never delivered: the transport gives up on it. */
  open_world_ex(&w, 0, 1u << 1);
  assert_int_equal(th_world_start(&w, 0, NULL), SAGA_OK);
  th_world_settle(&w, 500);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  th_world_close_nodes(&w);
  int64_t dead = dead_letter_command(&w, "p1");
  char target[32];
  snprintf(target, sizeof target, "%lld", (long long)dead);
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  sqlite3 *pdb = tool_db(&w, "part");
  /* The test keeps a copy of the message (in a table of its own). */
  assert_int_equal(sqlite3_exec(pdb, "CREATE TABLE kept AS SELECT body FROM saga_dead_letter",
                                NULL, NULL, NULL), SQLITE_OK);
  /* Replayed while its cause is still there (nobody handles 'do' on p1): refused the same
   * way; the dead letter stays, nothing else is written. */
  int64_t r = request(pdb, "replay", target);
  char result[640];
  assert_int_equal(wait_request(&w, pdb, r, result, sizeof result), 2);
  assert_non_null(strstr(result, "refused the same way: no handler for command 'do'"));
  assert_int_equal(q_int(pdb, "SELECT count(*) FROM saga_dead_letter"), 1);
  assert_int_equal(q_int(pdb, "SELECT count(*) FROM saga_inbox"), 1); /* step 0's only */
  sqlite3_close(pdb);
  /* Fixed (the participant serves p1 again): the replay runs the handler, answers, removes
   * the dead letter, and the saga goes on to complete. */
  th_world_close_nodes(&w);
  w.o.skip_mask = 0;
  assert_int_equal(th_world_reopen(&w), SAGA_OK);
  pdb = tool_db(&w, "part");
  r = request(pdb, "replay", target);
  assert_int_equal(wait_request(&w, pdb, r, result, sizeof result), 1);
  assert_non_null(strstr(result, "handled again (command 'do' of saga"));
  assert_int_equal(q_int(pdb, "SELECT count(*) FROM saga_dead_letter"), 0);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPLETED);
  assert_int_equal(th_fx_count(&w, id, 1, "do"), 1);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  /* Replaying it twice: it is gone. */
  r = request(pdb, "replay", target);
  assert_int_equal(wait_request(&w, pdb, r, result, sizeof result), 2);
  assert_non_null(strstr(result, "no dead letter"));
  /* A copy of a command answered already: replaying it would change nothing, refused. */
  assert_int_equal(sqlite3_exec(pdb, "INSERT INTO saga_dead_letter(at_ms, channel, reason, body)"
                                     " SELECT 1, 'p1', 'copy', body FROM kept", NULL, NULL, NULL),
                   SQLITE_OK);
  snprintf(target, sizeof target, "%lld", (long long)sqlite3_last_insert_rowid(pdb));
  r = request(pdb, "replay", target);
  assert_int_equal(wait_request(&w, pdb, r, result, sizeof result), 2);
  assert_non_null(strstr(result, "was answered already"));
  assert_int_equal(th_fx_count(&w, id, 1, "do"), 1);
  assert_int_equal(sqlite3_exec(pdb, "DELETE FROM saga_dead_letter", NULL, NULL, NULL), SQLITE_OK);
  sqlite3_close(pdb);
  /* Purge: one by id, then all; a bad id is refused. */
  pdb = tool_db(&w, "part");
  assert_int_equal(sqlite3_exec(pdb, "INSERT INTO saga_dead_letter(at_ms, channel, reason, body)"
                                     " VALUES (1, 'x', 'r', x'00'), (1, 'x', 'r', x'00'),"
                                     " (1, 'x', 'r', x'00')", NULL, NULL, NULL),
                   SQLITE_OK);
  int64_t xlast = sqlite3_last_insert_rowid(pdb);
  snprintf(target, sizeof target, "%lld", (long long)xlast);
  r = request(pdb, "purge", target);
  assert_int_equal(wait_request(&w, pdb, r, result, sizeof result), 1);
  assert_string_equal(result, "1 dead letter deleted");
  /* An undecodable body cannot be replayed. */
  snprintf(target, sizeof target, "%lld", (long long)xlast - 1);
  r = request(pdb, "replay", target);
  assert_int_equal(wait_request(&w, pdb, r, result, sizeof result), 2);
  assert_non_null(strstr(result, "is still not a valid message"));
  r = request(pdb, "purge", "12x");
  assert_int_equal(wait_request(&w, pdb, r, result, sizeof result), 2);
  r = request(pdb, "purge", "*");
  assert_int_equal(wait_request(&w, pdb, r, result, sizeof result), 1);
  assert_string_equal(result, "2 dead letters deleted");
  assert_int_equal(q_int(pdb, "SELECT count(*) FROM saga_dead_letter"), 0);
  sqlite3_close(pdb);
  th_world_free(&w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_definitions_recorded),
      cmocka_unit_test(test_retry_failed),
      cmocka_unit_test(test_cancel),
      cmocka_unit_test(test_request_while_down),
      cmocka_unit_test(test_replay_and_purge),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
