/*
 * The handler contract, checked: a handler that returns a value that is not a libsaga code
 * gets it named (SQLite's busy and locked codes are transient), and a handler that ends the
 * node's transaction on saga_tx_db() is reported as such, never run again for that command,
 * and its writes are not committed twice.
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

typedef enum behaviour {
  B_BUSY_ONCE,
  B_POSITIVE,
  B_COMMIT,
  B_NEGATIVE,
  B_BIG_VALUE, /* one reply value above the data limit */
  B_BIG_REPLY, /* a reply that fits alone but not merged with the input */
  B_MANY_KEYS  /* 200 reply keys on top of 100 input keys */
} behaviour;

typedef struct world {
  uv_loop_t loop;
  saga_clock *clock;
  saga_mem_hub *hub;
  char *dir;
  saga_node *node;
  behaviour b;
  int runs, finished;
  int set_rc; /* what the last saga_reply_set* returned */
  int logged_truthful, logged_nothing_applied, logged_stuck;
} world;

static void on_log(void *arg, saga_log_level lvl, const char *msg) {
  world *w = arg;
  if (strstr(msg, "transaction ended by a handler") != NULL) w->logged_truthful++;
  if (strstr(msg, "nothing of it was applied") != NULL) w->logged_nothing_applied++;
  if (lvl == SAGA_LOG_WARN && strstr(msg, "unconfirmed") != NULL && strstr(msg, "'pyment'"))
    w->logged_stuck++;
}

static int pay(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  world *w = arg;
  if (saga_msg_is_compensation(m)) return SAGA_OK;
  w->runs++;
  sqlite3 *db = saga_tx_db(tx);
  if (sqlite3_exec(db, "INSERT INTO fx(v) VALUES (1)", NULL, NULL, NULL) != SQLITE_OK)
    return SAGA_EIO;
  switch (w->b) {
  case B_BUSY_ONCE:
    return w->runs == 1 ? SQLITE_BUSY : SAGA_OK;
  case B_POSITIVE:
    return SQLITE_DONE; /* 101: a result code passed through by mistake */
  case B_NEGATIVE:
    return -4242;
  case B_COMMIT:
    sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    return SAGA_OK;
  case B_BIG_VALUE: {
    size_t len = 1536 * 1024;
    char *big = calloc(1, len);
    w->set_rc = saga_reply_set(r, "blob", big, len);
    free(big);
    return SAGA_OK;
  }
  case B_BIG_REPLY: {
    size_t len = 600 * 1024;
    char *big = calloc(1, len);
    w->set_rc = saga_reply_set(r, "out", big, len);
    free(big);
    return SAGA_OK;
  }
  case B_MANY_KEYS:
    for (int k = 0; k < 200; k++) {
      char key[16];
      snprintf(key, sizeof key, "r%d", k);
      w->set_rc = saga_reply_set_str(r, key, "x");
      if (w->set_rc != SAGA_OK) break;
    }
    return SAGA_OK;
  }
  return SAGA_OK;
}

static void on_event(saga_node *n, const saga_event *ev, void *arg) {
  world *w = arg;
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED ||
      ev->type == SAGA_EV_SAGA_FAILED)
    w->finished++;
}

static const saga_step steps[] = {
    {.name = "PAY", .channel = "pay", .action = "pay.charge", .kind = SAGA_STEP_PIVOT},
};
static const saga_definition def = {SAGA_DEFINITION_VERSION, "buy", 1, steps, 1, 0, sizeof(saga_step)};
/* A typo in the channel: nobody serves "pyment". */
static const saga_step typo_steps[] = {
    {.name = "PAY", .channel = "pyment", .action = "pay.charge"},
};
static const saga_definition typo_def = {SAGA_DEFINITION_VERSION, "typo", 1, typo_steps, 1, 0, sizeof(saga_step)};

static void open_world(world *w, behaviour b) {
  memset(w, 0, sizeof *w);
  w->b = b;
  assert_int_equal(uv_loop_init(&w->loop), 0);
  w->dir = th_tmpdir();
  assert_int_equal(saga_clock_manual_new(&w->clock, 1000000, NULL), SAGA_OK);
  assert_int_equal(saga_mem_hub_new(&w->hub, &w->loop, w->clock, NULL, NULL), SAGA_OK);
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w->hub), SAGA_OK);
  char *path = th_path(w->dir, "node.db");
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = "shop";
  cfg.db_path = path;
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.transport = t;
  cfg.clock = w->clock;
  cfg.on_event = on_event;
  cfg.event_arg = w;
  cfg.log = on_log;
  cfg.log_arg = w;
  cfg.resend_ms = 100;
  assert_int_equal(saga_node_open(&w->node, &w->loop, &cfg, NULL, 0), SAGA_OK);
  free(path);
  assert_int_equal(sqlite3_exec(saga_node_db(w->node), "CREATE TABLE fx(v INTEGER)", NULL, NULL,
                                NULL),
                   SQLITE_OK);
  assert_int_equal(saga_node_register(w->node, &def), SAGA_OK);
  assert_int_equal(saga_node_register(w->node, &typo_def), SAGA_OK);
  assert_int_equal(saga_node_handle(w->node, "pay", "pay.charge", pay, w), SAGA_OK);
  assert_int_equal(saga_node_start(w->node, NULL), SAGA_OK);
}

static void close_world(world *w) {
  saga_node_close(w->node, NULL, NULL);
  th_drain(&w->loop);
  assert_int_equal(saga_mem_hub_close(w->hub), SAGA_OK);
  th_drain(&w->loop);
  saga_clock_free(w->clock);
  assert_int_equal(uv_loop_close(&w->loop), 0);
  th_rmdir(w->dir);
}

static int finished(void *arg) { return ((world *)arg)->finished >= 1; }

static int count(world *w, const char *sql) {
  sqlite3_stmt *st = NULL;
  int v = -1;
  if (sqlite3_prepare_v2(saga_node_db(w->node), sql, -1, &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int(st, 0);
  else
    fprintf(stderr, "count(%s): %s\n", sql, sqlite3_errmsg(saga_node_db(w->node)));
  sqlite3_finalize(st);
  return v;
}

static int dead_letters_like(world *w, const char *needle) {
  char sql[300];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM saga_dead_letter WHERE reason LIKE '%%%s%%'",
           needle);
  return count(w, sql);
}

static int state_of_only_saga(world *w) {
  return count(w, "SELECT state FROM saga_instance");
}

/* SQLITE_BUSY from a handler is transient: run again, then the saga completes; nothing is
 * dead-lettered. */
static void test_busy_is_transient(void **state) {
  world w;
  open_world(&w, B_BUSY_ONCE);
  assert_int_equal(saga_start(w.node, "buy", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, finished, &w, 60000), 0);
  assert_int_equal(state_of_only_saga(&w), SAGA_COMPLETED);
  assert_int_equal(w.runs, 2);
  assert_int_equal(count(&w, "SELECT count(*) FROM fx"), 1); /* the first run rolled back */
  assert_int_equal(count(&w, "SELECT count(*) FROM saga_dead_letter"), 0);
  saga_node_stats st;
  saga_node_stats_get(w.node, &st, sizeof st);
  assert_int_equal(st.handler_contract_errors, 1);
  close_world(&w);
}

/* Any other positive value is named, with the rule, in the dead letter. */
static void test_positive_named(void **state) {
  world w;
  open_world(&w, B_POSITIVE);
  assert_int_equal(saga_start(w.node, "buy", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, finished, &w, 60000), 0);
  assert_int_equal(dead_letters_like(&w, "returned 101, which is not a libsaga code"), 1);
  assert_int_equal(count(&w, "SELECT count(*) FROM fx"), 0);
  assert_int_equal(state_of_only_saga(&w), SAGA_COMPENSATED);
  close_world(&w);
}

static void test_negative_unknown_named(void **state) {
  world w;
  open_world(&w, B_NEGATIVE);
  assert_int_equal(saga_start(w.node, "buy", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, finished, &w, 60000), 0);
  assert_int_equal(dead_letters_like(&w, "returned -4242, which is not a libsaga code"), 1);
  close_world(&w);
}

/* A handler that commits the node's transaction itself: its write is committed once, the
 * failure is logged as what it is, the command is not run a second time (dead-lettered with
 * the reason when it comes back), and the saga ends. */
static void test_commit_in_handler(void **state) {
  world w;
  open_world(&w, B_COMMIT);
  assert_int_equal(saga_start(w.node, "buy", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, finished, &w, 60000), 0);
  assert_int_equal(w.runs, 1);
  assert_int_equal(count(&w, "SELECT count(*) FROM fx"), 1);
  assert_true(w.logged_truthful >= 1);
  assert_int_equal(w.logged_nothing_applied, 0);
  assert_int_equal(dead_letters_like(&w, "ended the node"), 1);
  saga_node_stats st;
  saga_node_stats_get(w.node, &st, sizeof st);
  assert_true(st.handler_contract_errors >= 1);
  close_world(&w);
}

static int saga_error_has(world *w, const char *needle) {
  sqlite3_stmt *st = NULL;
  int found = 0;
  if (sqlite3_prepare_v2(saga_node_db(w->node), "SELECT error FROM saga_instance", -1, &st,
                         NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW) {
    const char *e = (const char *)sqlite3_column_text(st, 0);
    found = e != NULL && strstr(e, needle) != NULL;
  }
  sqlite3_finalize(st);
  return found;
}

/* Limits are checked where data is made. A value above the saga data limit is refused by
 * saga_reply_set; the handler goes on and the saga completes without it. */
static void test_reply_value_too_big(void **state) {
  world w;
  open_world(&w, B_BIG_VALUE);
  assert_int_equal(saga_start(w.node, "buy", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, finished, &w, 60000), 0);
  assert_int_equal(w.set_rc, SAGA_ETOOBIG);
  assert_int_equal(state_of_only_saga(&w), SAGA_COMPLETED);
  assert_int_equal(count(&w, "SELECT count(*) FROM saga_dead_letter"), 0);
  close_world(&w);
}

/* A reply that fits alone but not merged into the saga's data fails the step as a business
 * failure, with the reason, and the handler's writes roll back: the saga ends COMPENSATED
 * (not FAILED with an action never undone, not RUNNING for good). */
static void test_reply_merge_too_big(void **state) {
  world w;
  open_world(&w, B_BIG_REPLY);
  saga_data *in = NULL;
  assert_int_equal(saga_data_new(&in, NULL), SAGA_OK);
  size_t len = 600 * 1024;
  char *big = calloc(1, len);
  assert_int_equal(saga_data_set(in, "in", big, len), SAGA_OK);
  free(big);
  assert_int_equal(saga_start(w.node, "buy", in, NULL, NULL, NULL), SAGA_OK);
  saga_data_free(in);
  assert_int_equal(th_run_manual(&w.loop, w.clock, finished, &w, 60000), 0);
  assert_int_equal(w.set_rc, SAGA_OK);
  assert_int_equal(state_of_only_saga(&w), SAGA_COMPENSATED);
  assert_int_equal(count(&w, "SELECT count(*) FROM fx"), 0); /* rolled back */
  assert_true(saga_error_has(&w, "would make the saga data"));
  assert_int_equal(count(&w, "SELECT count(*) FROM saga_dead_letter"), 0);
  close_world(&w);
}

static void test_reply_too_many_keys(void **state) {
  world w;
  open_world(&w, B_MANY_KEYS);
  saga_data *in = NULL;
  assert_int_equal(saga_data_new(&in, NULL), SAGA_OK);
  for (int k = 0; k < 100; k++) {
    char key[16];
    snprintf(key, sizeof key, "i%d", k);
    assert_int_equal(saga_data_set_str(in, key, "y"), SAGA_OK);
  }
  assert_int_equal(saga_start(w.node, "buy", in, NULL, NULL, NULL), SAGA_OK);
  saga_data_free(in);
  assert_int_equal(th_run_manual(&w.loop, w.clock, finished, &w, 60000), 0);
  assert_int_equal(state_of_only_saga(&w), SAGA_COMPENSATED);
  assert_true(saga_error_has(&w, "entries"));
  close_world(&w);
}

/* An input that could not travel in a command is refused by saga_start, with the numbers. */
static void test_input_too_big(void **state) {
  world w;
  open_world(&w, B_BUSY_ONCE);
  saga_data *in = NULL;
  assert_int_equal(saga_data_new(&in, NULL), SAGA_OK);
  size_t len = 1046 * 1024; /* under 1 MiB, above 1 MiB minus the envelope's room */
  char *big = calloc(1, len);
  assert_int_equal(saga_data_set(in, "in", big, len), SAGA_OK);
  free(big);
  assert_int_equal(saga_start(w.node, "buy", in, NULL, NULL, NULL), SAGA_ETOOBIG);
  assert_non_null(strstr(saga_node_errmsg(w.node), "the limit is 1044480"));
  saga_data_free(in);
  close_world(&w);
}

/* A step whose channel nobody serves, with no timeout set: the default timeout ends the wait
 * (before, the saga stayed RUNNING for good, silently). */
static int stuck_logged(void *arg) { return ((world *)arg)->logged_stuck >= 1; }
static int never(void *arg) {
  (void)arg;
  return 0;
}

typedef struct chan_seen {
  int pyment, others;
  uint64_t age;
} chan_seen;

static void note_channel(void *arg, const char *channel, int64_t count, uint64_t oldest_ms) {
  chan_seen *s = arg;
  if (strcmp(channel, "pyment") == 0 && count == 1) {
    s->pyment++;
    s->age = oldest_ms;
  } else {
    s->others++;
  }
}

static void test_typo_channel_times_out(void **state) {
  world w;
  open_world(&w, B_BUSY_ONCE);
  assert_int_equal(saga_start(w.node, "typo", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, finished, &w, 3600000), 0);
  assert_int_equal(state_of_only_saga(&w), SAGA_COMPENSATED);
  assert_true(saga_error_has(&w, "timed out"));
  /* The command to "pyment" is never confirmed: a warning names the channel, once, and the
   * metrics show it (oldest unconfirmed age, channels over SAGA_OUTBOX_WARN_MS). */
  assert_int_equal(th_run_manual(&w.loop, w.clock, stuck_logged, &w, 3600000), 0);
  assert_int_equal(th_run_manual(&w.loop, w.clock, never, NULL, 5 * SAGA_OUTBOX_WARN_MS), -1);
  assert_int_equal(w.logged_stuck, 1);
  saga_node_stats st;
  saga_node_stats_get(w.node, &st, sizeof st);
  assert_int_equal(st.outbox_stuck_channels, 1);
  assert_true(st.outbox_oldest_ms >= SAGA_OUTBOX_WARN_MS);
  chan_seen seen = {0, 0, 0};
  assert_int_equal(saga_node_outbox_channels(w.node, note_channel, &seen), SAGA_OK);
  assert_int_equal(seen.pyment, 1);
  assert_true(seen.age >= 5 * SAGA_OUTBOX_WARN_MS);
  close_world(&w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_busy_is_transient),
      cmocka_unit_test(test_positive_named),
      cmocka_unit_test(test_negative_unknown_named),
      cmocka_unit_test(test_commit_in_handler),
      cmocka_unit_test(test_reply_value_too_big),
      cmocka_unit_test(test_reply_merge_too_big),
      cmocka_unit_test(test_reply_too_many_keys),
      cmocka_unit_test(test_input_too_big),
      cmocka_unit_test(test_typo_channel_times_out),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
