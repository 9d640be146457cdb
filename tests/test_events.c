/* Starting a saga inside a handler's transaction (saga_tx_start) and publishing transitions
 * to other nodes (cfg.event_channel, saga_node_subscribe_events). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "harness.h"

typedef struct world {
  uv_loop_t loop;
  saga_clock *clock;
  saga_mem_hub *hub;
  char *dir;
  saga_node *client, *orch, *watch;
  int outer_done, inner_started;
  int seen[64];
  int nseen;
  char seen_key[64][16];
  int with_data;
  int acks;           /* deliveries the watcher acknowledged */
  int acked_unseen;   /* acknowledgements made while an acknowledged event was still unseen */
} world;

/* The watcher's deliveries are event messages only, one event each: when it acknowledges
 * its k-th delivery, its subscriber must have seen k events already (else a crash at this
 * point would lose an event that was promised at least once). */
static void watch_hook(void *arg, const char *point) {
  world *w = arg;
  if (strcmp(point, "tx.after_ack") != 0) return;
  w->acks++;
  if (w->nseen < w->acks) w->acked_unseen++;
}

static int inner_step(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  return saga_reply_set_str(r, "inner", "ran");
}

/* The "begin" command starts the inner saga atomically with its own reply. */
static int begin(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  world *w = arg;
  const saga_data *d = saga_msg_data(m);
  char id[40];
  int existed = 0;
  int rc = saga_tx_start(tx, "inner", d, saga_data_get_str(d, "key"), id, sizeof id, &existed);
  if (rc != SAGA_OK) return rc;
  if (!existed) w->inner_started++;
  if (saga_data_get_str(d, "refuse") != NULL) return saga_reply_fail(r, "refused after start");
  return saga_reply_set_str(r, "inner_id", id);
}

static void client_event(saga_node *n, const saga_event *ev, void *arg) {
  world *w = arg;
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED) w->outer_done++;
}

static void watch_event(saga_node *n, const saga_event *ev, void *arg) {
  world *w = arg;
  if (w->nseen < 64) {
    w->seen[w->nseen] = ev->type;
    const char *k = ev->data ? saga_data_get_str(ev->data, "key") : NULL;
    snprintf(w->seen_key[w->nseen], 16, "%s", k ? k : "");
    w->nseen++;
  }
  if (ev->data != NULL) w->with_data++;
}

static saga_node *open_node(world *w, const char *name, const char *event_channel,
                            saga_event_cb on_event) {
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w->hub), SAGA_OK);
  char file[64];
  snprintf(file, sizeof file, "%s.db", name);
  char *path = th_path(w->dir, file);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = name;
  cfg.db_path = path;
  cfg.transport = t;
  cfg.clock = w->clock;
  cfg.event_channel = event_channel;
  cfg.on_event = on_event;
  cfg.event_arg = w;
  if (strcmp(name, "watch") == 0) {
    cfg.test_hook = watch_hook;
    cfg.test_hook_arg = w;
  }
  saga_node *n = NULL;
  assert_int_equal(saga_node_open(&n, &w->loop, &cfg, NULL, 0), SAGA_OK);
  free(path);
  return n;
}

static void setup(world *w) {
  memset(w, 0, sizeof *w);
  uv_loop_init(&w->loop);
  w->dir = th_tmpdir();
  assert_int_equal(saga_clock_manual_new(&w->clock, 1000000, NULL), SAGA_OK);
  assert_int_equal(saga_mem_hub_new(&w->hub, &w->loop, w->clock, NULL, NULL), SAGA_OK);
  w->client = open_node(w, "client", NULL, client_event);
  w->orch = open_node(w, "orch", "events", NULL);
  w->watch = open_node(w, "watch", NULL, NULL);
  static const saga_step outer[] = {{.name = "BEGIN", .channel = "orchq", .action = "begin",
                                     .kind = SAGA_STEP_PIVOT}};
  static const saga_definition outer_def = {SAGA_DEFINITION_VERSION, "outer", 1, outer, 1, 0, sizeof(saga_step)};
  static const saga_step inner[] = {{.name = "WORK", .local_action = inner_step}};
  static const saga_definition inner_def = {SAGA_DEFINITION_VERSION, "inner", 1, inner, 1, 0, sizeof(saga_step)};
  assert_int_equal(saga_node_register(w->client, &outer_def), SAGA_OK);
  assert_int_equal(saga_node_register(w->orch, &inner_def), SAGA_OK);
  assert_int_equal(saga_node_handle(w->orch, "orchq", "begin", begin, w), SAGA_OK);
  assert_int_equal(saga_node_subscribe_events(w->watch, "events", watch_event, w), SAGA_OK);
  assert_int_equal(saga_node_subscribe_events(w->watch, "events", watch_event, w), SAGA_EEXIST);
  assert_int_equal(saga_node_start(w->client, NULL), SAGA_OK);
  assert_int_equal(saga_node_start(w->orch, NULL), SAGA_OK);
  assert_int_equal(saga_node_start(w->watch, NULL), SAGA_OK);
}

static void teardown(world *w) {
  saga_node_close(w->client, NULL, NULL);
  saga_node_close(w->orch, NULL, NULL);
  saga_node_close(w->watch, NULL, NULL);
  th_drain(&w->loop);
  assert_int_equal(saga_mem_hub_close(w->hub), SAGA_OK);
  th_drain(&w->loop);
  saga_clock_free(w->clock);
  assert_int_equal(uv_loop_close(&w->loop), 0);
  th_rmdir(w->dir);
}

static void start_outer(world *w, const char *key, int refuse) {
  saga_data *d = NULL;
  saga_data_new(&d, NULL);
  saga_data_set_str(d, "key", key);
  if (refuse) saga_data_set_str(d, "refuse", "1");
  assert_int_equal(saga_start(w->client, "outer", d, NULL, NULL, NULL), SAGA_OK);
  saga_data_free(d);
}

static int count_inner(world *w) {
  sqlite3_stmt *st = NULL;
  int v = -1;
  sqlite3_prepare_v2(saga_node_db(w->orch),
                     "SELECT count(*) FROM saga_instance WHERE def_name = 'inner'", -1, &st, NULL);
  if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  return v;
}

typedef struct {
  world *w;
  int outer, events;
} want;

static int reached(void *arg) {
  want *x = arg;
  return x->w->outer_done >= x->outer && x->w->nseen >= x->events;
}

static void test_tx_start_and_events(void **state) {
  world w;
  setup(&w);
  start_outer(&w, "k1", 0);
  start_outer(&w, "k1", 0); /* a second outer saga with the same key: no second inner saga */
  want x = {&w, 2, 4};
  assert_int_equal(th_run_manual(&w.loop, w.clock, reached, &x, 60000), 0);
  th_run_manual(&w.loop, w.clock, reached, &(want){&w, 99, 99}, 1000);
  assert_int_equal(count_inner(&w), 1);
  assert_int_equal(w.inner_started, 1);
  /* The inner saga's transitions reached the watcher, in order, with its data. */
  assert_int_equal(w.nseen, 4);
  assert_int_equal(w.seen[0], SAGA_EV_STARTED);
  assert_int_equal(w.seen[1], SAGA_EV_STEP_SENT);
  assert_int_equal(w.seen[2], SAGA_EV_STEP_SUCCEEDED);
  assert_int_equal(w.seen[3], SAGA_EV_COMPLETED);
  assert_int_equal(w.with_data, 4);
  assert_string_equal(w.seen_key[3], "k1");
  /* Each event reached the subscriber before its message was acknowledged. */
  assert_int_equal(w.acks, 4);
  assert_int_equal(w.acked_unseen, 0);
  teardown(&w);
}

/* A handler that starts a saga and then refuses rolls the new saga back with its writes. */
static void test_tx_start_rolled_back(void **state) {
  world w;
  setup(&w);
  start_outer(&w, "k2", 1);
  want x = {&w, 1, 0};
  assert_int_equal(th_run_manual(&w.loop, w.clock, reached, &x, 60000), 0);
  th_run_manual(&w.loop, w.clock, reached, &(want){&w, 99, 99}, 1000);
  assert_int_equal(count_inner(&w), 0);
  assert_int_equal(w.nseen, 0);
  teardown(&w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_tx_start_and_events),
      cmocka_unit_test(test_tx_start_rolled_back),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
