/*
 * The node's lifecycle on its edges: a saga_node_start that failed can be called again;
 * saga_node_errmsg() tells of the latest call only; a saga_node_post racing with a close
 * touches nothing of the node once it has returned its result.
 */
#include <malloc.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "harness.h"
#include "saga/sys/transport.h"

typedef struct world {
  uv_loop_t loop;
  saga_clock *clock;
  saga_mem_hub *hub;
  char *dir;
  saga_node *node;
  saga_transport_methods methods; /* the mem transport's, with subscribe wrapped */
  int (*subscribe)(saga_transport *, const char *);
  int refuse_pay;  /* subscriptions to "pay" refused while > 0 */
  int subs_pay;    /* subscriptions to "pay" that reached the hub */
  int subs_shop;   /* subscriptions to the node's own channel */
  int pay_runs, local_runs, done;
  int no_self_route; /* can_send refuses the node's own name (a TCP node without a route to
                        itself) */
  saga_transport *t;
} world;

static world *the_world;

static int wrapped_subscribe(saga_transport *t, const char *channel) {
  world *w = the_world;
  if (strcmp(channel, "pay") == 0) {
    if (w->refuse_pay > 0) {
      w->refuse_pay--;
      return SAGA_EIO;
    }
    w->subs_pay++;
  }
  if (strcmp(channel, "shop") == 0) w->subs_shop++;
  return w->subscribe(t, channel);
}

static int wrapped_can_send(saga_transport *t, const char *channel) {
  (void)t;
  return !(the_world->no_self_route && strcmp(channel, "shop") == 0);
}

static int pay(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  world *w = arg;
  if (!saga_msg_is_compensation(m)) w->pay_runs++;
  return SAGA_OK;
}

static int local(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  world *w = the_world; /* a local step's arg is the step's local_arg (none here) */
  if (!saga_msg_is_compensation(m)) w->local_runs++;
  return SAGA_OK;
}

static void on_event(saga_node *n, const saga_event *ev, void *arg) {
  world *w = arg;
  if (ev->type == SAGA_EV_COMPLETED) w->done++;
}

static const saga_step steps[] = {
    {.name = "LOCAL", .local_action = local},
    {.name = "PAY", .channel = "pay", .action = "pay.charge", .kind = SAGA_STEP_PIVOT},
};
static const saga_definition def = {SAGA_DEFINITION_VERSION, "buy", 1, steps, 2, 0, sizeof(saga_step)};
/* The local step alone: a saga that never leaves the node. */
static const saga_definition solo = {SAGA_DEFINITION_VERSION, "solo", 1, steps, 1, 0,
                                     sizeof(saga_step)};

/* An allocator that never reuses memory: a freed block is zeroed and kept until the test ends,
 * so that a use after free reads zeros (a libuv handle with a NULL loop: a crash) instead of
 * whatever took its place — libuv is not instrumented by AddressSanitizer. */
typedef struct quarantine {
  void **blocks;
  size_t n, cap;
} quarantine;

static void *q_malloc(size_t size, void *ud) { return malloc(size); }

static void q_free(void *p, void *ud) {
  quarantine *q = ud;
  if (p == NULL) return;
  memset(p, 0, malloc_usable_size(p));
  if (q->n == q->cap) {
    q->cap = q->cap ? q->cap * 2 : 256;
    q->blocks = realloc(q->blocks, q->cap * sizeof *q->blocks);
    assert_non_null(q->blocks);
  }
  q->blocks[q->n++] = p;
}

static void *q_realloc(void *p, size_t size, void *ud) {
  if (p == NULL) return malloc(size);
  void *np = malloc(size);
  if (np == NULL) return NULL;
  size_t old = malloc_usable_size(p);
  memcpy(np, p, old < size ? old : size);
  q_free(p, ud);
  return np;
}

static void quarantine_free(quarantine *q) {
  for (size_t i = 0; i < q->n; i++) free(q->blocks[i]);
  free(q->blocks);
}

static void open_world_alloc(world *w, void (*hook)(void *, const char *), void *hook_arg,
                             const saga_allocator *alloc);

static void open_world(world *w, void (*hook)(void *, const char *), void *hook_arg) {
  open_world_alloc(w, hook, hook_arg, NULL);
}

static void open_world_alloc(world *w, void (*hook)(void *, const char *), void *hook_arg,
                             const saga_allocator *alloc) {
  memset(w, 0, sizeof *w);
  the_world = w;
  assert_int_equal(uv_loop_init(&w->loop), 0);
  w->dir = th_tmpdir();
  assert_int_equal(saga_clock_manual_new(&w->clock, 1000000, NULL), SAGA_OK);
  assert_int_equal(saga_mem_hub_new(&w->hub, &w->loop, w->clock, NULL, NULL), SAGA_OK);
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w->hub), SAGA_OK);
  w->methods = *t->methods;
  w->subscribe = w->methods.subscribe;
  w->methods.subscribe = wrapped_subscribe;
  w->methods.can_send = wrapped_can_send;
  t->methods = &w->methods;
  w->t = t;
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
  cfg.test_hook = hook;
  cfg.test_hook_arg = hook_arg;
  cfg.alloc = alloc;
  assert_int_equal(saga_node_open(&w->node, &w->loop, &cfg, NULL, 0), SAGA_OK);
  free(path);
  assert_int_equal(saga_node_register(w->node, &def), SAGA_OK);
  assert_int_equal(saga_node_register(w->node, &solo), SAGA_OK);
  assert_int_equal(saga_node_handle(w->node, "pay", "pay.charge", pay, w), SAGA_OK);
}

static void close_world(world *w) {
  if (w->node != NULL) saga_node_close(w->node, NULL, NULL);
  th_drain(&w->loop);
  assert_int_equal(saga_mem_hub_close(w->hub), SAGA_OK);
  th_drain(&w->loop);
  saga_clock_free(w->clock);
  assert_int_equal(uv_loop_close(&w->loop), 0);
  th_rmdir(w->dir);
}

static int all_done(void *arg) {
  world *w = arg;
  return w->done >= 3;
}

/* A start refused by the transport (one subscription failed) is called again and works:
 * the local steps' handlers are not registered twice (that gave SAGA_EEXIST), channels
 * already subscribed are not subscribed again, and sagas then run with every handler run
 * once. */
static void test_start_retried(void **state) {
  world w;
  open_world(&w, NULL, NULL);
  w.refuse_pay = 1;
  assert_int_equal(saga_node_start(w.node, NULL), SAGA_EIO);
  assert_non_null(strstr(saga_node_errmsg(w.node), "'pay'"));
  assert_int_equal(saga_start(w.node, "buy", NULL, NULL, NULL, NULL), SAGA_ESTATE);
  assert_int_equal(saga_node_start(w.node, NULL), SAGA_OK);
  assert_int_equal(w.subs_pay, 1);
  assert_int_equal(w.subs_shop, 1); /* subscribed by the first try, not again */
  assert_int_equal(saga_node_start(w.node, NULL), SAGA_ESTATE); /* started: not again */
  for (int i = 0; i < 3; i++)
    assert_int_equal(saga_start(w.node, "buy", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, all_done, &w, 60000), 0);
  assert_int_equal(w.local_runs, 3);
  assert_int_equal(w.pay_runs, 3);
  saga_node_stats st;
  saga_node_stats_get(w.node, &st, sizeof st);
  assert_int_equal(st.duplicates, 0);
  close_world(&w);
}

static int dead_letter_kept(void *arg) {
  sqlite3_stmt *st = NULL;
  int n = 0;
  if (sqlite3_prepare_v2(arg, "SELECT count(*) FROM saga_dead_letter", -1, &st, NULL) ==
          SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    n = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  return n > 0;
}

/* A local step's command and reply go round the node's loopback, not through the transport:
 * a node whose transport has no route to its own name (TCP without a route to itself) runs
 * its local steps all the same. And the loopback channel is the node's own: a delivery on it
 * from the transport is kept as a dead letter, never handled. */
static void test_local_steps_without_self_route(void **state) {
  world w;
  open_world(&w, NULL, NULL);
  w.no_self_route = 1;
  assert_int_equal(saga_node_start(w.node, NULL), SAGA_OK);
  for (int i = 0; i < 3; i++)
    assert_int_equal(saga_start(w.node, "solo", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, all_done, &w, 60000), 0);
  assert_int_equal(w.local_runs, 3);
  sqlite3 *db = saga_node_db(w.node);
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, "SELECT count(*) FROM saga_dead_letter", -1, &st, NULL),
                   SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  assert_int_equal(sqlite3_column_int(st, 0), 0);
  sqlite3_finalize(st);
  /* A forged delivery on the loopback channel, as a transport might hand one over. */
  assert_int_equal(saga_transport_deliver(w.t, "saga.local", "forged", 6, 77), SAGA_OK);
  assert_int_equal(th_run_manual(&w.loop, w.clock, dead_letter_kept, db, 60000), 0);
  assert_int_equal(sqlite3_prepare_v2(db, "SELECT reason FROM saga_dead_letter", -1, &st, NULL),
                   SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  assert_non_null(strstr((const char *)sqlite3_column_text(st, 0), "reserved channel"));
  sqlite3_finalize(st);
  close_world(&w);
}

/* saga_node_errmsg() describes the latest call: a success clears what a failure left. */
static void test_errmsg_cleared(void **state) {
  world w;
  open_world(&w, NULL, NULL);
  static const saga_definition bad = {SAGA_DEFINITION_VERSION, "", 1, steps, 2, 0, sizeof(saga_step)};
  assert_int_equal(saga_node_register(w.node, &bad), SAGA_EDEFINITION);
  assert_string_not_equal(saga_node_errmsg(w.node), "");
  assert_int_equal(saga_node_start(w.node, NULL), SAGA_OK);
  assert_string_equal(saga_node_errmsg(w.node), "");
  assert_int_equal(saga_start(w.node, "nope", NULL, NULL, NULL, NULL), SAGA_ENODEF);
  assert_non_null(strstr(saga_node_errmsg(w.node), "nope"));
  assert_int_equal(saga_start(w.node, "buy", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_string_equal(saga_node_errmsg(w.node), "");
  saga_info *info = NULL;
  assert_int_equal(saga_get(w.node, "0123", &info), SAGA_ENOTFOUND);
  assert_string_not_equal(saga_node_errmsg(w.node), "");
  assert_int_equal(saga_cancel(w.node, "0123", NULL, NULL), SAGA_OK); /* queued: fine */
  assert_string_equal(saga_node_errmsg(w.node), "");
  close_world(&w);
}

/* ---- a post racing with the close ----------------------------------------------------- */

typedef struct racer {
  saga_node *node;
  sem_t unlocked, closed;
  int rc, ran, ran_null;
} racer;

/* The poster stops right after saga_node_post released its lock, until the node has been
 * closed and freed; whatever saga_node_post still did after that point would touch freed
 * memory (AddressSanitizer reports it). */
static void post_hook(void *arg, const char *point) {
  racer *r = arg;
  if (strcmp(point, "post.after_unlock") != 0) return;
  sem_post(&r->unlocked);
  while (sem_wait(&r->closed) != 0) {
  }
}

static void posted(saga_node *n, void *arg) {
  racer *r = arg;
  r->ran++;
  if (n == NULL) r->ran_null++;
}

static void *poster(void *arg) {
  racer *r = arg;
  r->rc = saga_node_post(r->node, posted, r);
  return NULL;
}

static void closed_cb(void *arg) {
  racer *r = arg;
  sem_post(&r->closed);
}

static void test_post_racing_close(void **state) {
  racer r;
  memset(&r, 0, sizeof r);
  sem_init(&r.unlocked, 0, 0);
  sem_init(&r.closed, 0, 0);
  quarantine q = {NULL, 0, 0};
  saga_allocator alloc = {q_malloc, q_realloc, q_free, &q};
  world w;
  open_world_alloc(&w, post_hook, &r, &alloc);
  assert_int_equal(saga_node_start(w.node, NULL), SAGA_OK);
  r.node = w.node;
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, poster, &r), 0);
  while (sem_wait(&r.unlocked) != 0) {
  }
  /* The poster is past its lock; close and free the node while it is still inside. */
  saga_node_close(w.node, closed_cb, &r);
  w.node = NULL;
  th_drain(&w.loop);
  assert_int_equal(pthread_join(th, NULL), 0);
  assert_int_equal(r.rc, SAGA_OK);
  assert_int_equal(r.ran, 1); /* exactly once: at the close, with node NULL, or before it */
  close_world(&w);
  quarantine_free(&q);
  sem_destroy(&r.unlocked);
  sem_destroy(&r.closed);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_start_retried),
      cmocka_unit_test(test_errmsg_cleared),
      cmocka_unit_test(test_local_steps_without_self_route),
      cmocka_unit_test(test_post_racing_close),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
