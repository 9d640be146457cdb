/*
 * The four FTGO services: business tables, the participants' handlers, and the Order
 * service, which orchestrates Create Order and Cancel Order.
 *
 * Create Order (the book's six local transactions; steps 0..5):
 *   CREATE_ORDER     Order, local    order APPROVAL_PENDING, semantic lock ("order", id)
 *                                    compensation: rejectOrder -> REJECTED (lock released)
 *   VERIFY_CONSUMER  Consumer        refuses an unknown or disabled consumer
 *   CREATE_TICKET    Kitchen         ticket CREATE_PENDING, lock ("ticket", order id);
 *                                    refuses a closed restaurant or an item not on its menu
 *                                    compensation: rejectTicket -> REJECTED (lock released)
 *   AUTHORIZE_CARD   Accounting      the pivot: refuses a declined card; once it succeeded
 *                                    the saga can only go forward
 *   CONFIRM_TICKET   Kitchen         ticket AWAITING_ACCEPTANCE, releases the ticket's lock
 *   APPROVE_ORDER    Order, local    order APPROVED, releases the order's lock
 * The *_PENDING states are the book's semantic locks; the saga_lock rows are the same thing
 * in a form every other transaction can test (saga_lock_holder()) and operators can see
 * (sagactl locks).
 *
 * Cancel Order: BEGIN_CANCEL (Order, local: takes the order's lock — refused while another
 * saga holds it — and needs APPROVED -> CANCEL_PENDING; compensation back to APPROVED),
 * CANCEL_TICKET (Kitchen, the pivot: AWAITING_ACCEPTANCE -> CANCELLED, refused while the
 * ticket is held), REVERSE_AUTHORIZATION (Accounting), CONFIRM_CANCEL (Order: CANCELLED,
 * lock released).
 *
 * reviseOrder is a plain local transaction of the Order service on its own connection: it
 * tests the order's lock with saga_lock_holder() and refuses while a saga holds it.
 *
 * Every handler keys its writes on its saga (docs/security.md): a compensation changes only
 * rows its own saga's action wrote.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <saga/transport_tcp.h>

#include "ftgo.h"

/* Runs sql with the NULL-terminated text parameters that follow; the first column of the
 * first row (if any, and out != NULL) into out. 1 a row, 0 none, -1 an error. */
static int sql1(sqlite3 *db, char *out, size_t len, const char *sql, ...) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
    fprintf(stderr, "ftgo: %s: %s\n", sql, sqlite3_errmsg(db));
    return -1;
  }
  va_list ap;
  va_start(ap, sql);
  int i = 1;
  for (const char *v = va_arg(ap, const char *); v != NULL; v = va_arg(ap, const char *))
    sqlite3_bind_text(st, i++, v, -1, SQLITE_TRANSIENT);
  va_end(ap);
  int rc = sqlite3_step(st), res = -1;
  if (rc == SQLITE_ROW) {
    res = 1;
    if (out != NULL) {
      const unsigned char *t = sqlite3_column_text(st, 0);
      snprintf(out, len, "%s", t != NULL ? (const char *)t : "");
    }
  } else if (rc == SQLITE_DONE) {
    res = 0;
    if (out != NULL && len > 0) out[0] = '\0';
  } else {
    fprintf(stderr, "ftgo: %s: %s\n", sql, sqlite3_errmsg(db));
  }
  sqlite3_finalize(st);
  return res;
}

static const char *str(const saga_msg *m, const char *key) {
  const char *v = saga_data_get_str(saga_msg_data(m), key);
  return v != NULL ? v : "";
}

/* ---- schema ------------------------------------------------------------------------------ */

int ftgo_schema(sqlite3 *db, const char *service) {
  const char *sql = NULL;
  if (strcmp(service, "order") == 0)
    sql = "CREATE TABLE IF NOT EXISTS ftgo_order(id TEXT PRIMARY KEY, consumer TEXT, "
          "restaurant TEXT, item TEXT, qty INTEGER, amount INTEGER, state TEXT, saga TEXT);"
          "CREATE TABLE IF NOT EXISTS ftgo_order_revision(order_id TEXT, qty INTEGER, "
          "at_ms INTEGER);";
  else if (strcmp(service, "consumer") == 0)
    sql = "CREATE TABLE IF NOT EXISTS ftgo_consumer(id TEXT PRIMARY KEY, name TEXT, "
          "enabled INTEGER);"
          "INSERT OR IGNORE INTO ftgo_consumer VALUES('c1', 'Ada', 1), ('c2', 'Bob', 0);";
  else if (strcmp(service, "kitchen") == 0)
    sql = "CREATE TABLE IF NOT EXISTS ftgo_restaurant(id TEXT PRIMARY KEY, open INTEGER, "
          "menu TEXT);"
          "INSERT OR IGNORE INTO ftgo_restaurant VALUES('r1', 1, 'pizza,pasta'), "
          "('r2', 0, 'sushi');"
          "CREATE TABLE IF NOT EXISTS ftgo_ticket(order_id TEXT PRIMARY KEY, restaurant TEXT, "
          "item TEXT, qty INTEGER, state TEXT, saga TEXT);";
  else if (strcmp(service, "accounting") == 0)
    sql = "CREATE TABLE IF NOT EXISTS ftgo_authorization(order_id TEXT PRIMARY KEY, "
          "card TEXT, amount INTEGER, state TEXT, saga TEXT);";
  if (sql == NULL) return -1;
  char *msg = NULL;
  if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
    fprintf(stderr, "ftgo: %s schema: %s\n", service, msg ? msg : "?");
    sqlite3_free(msg);
    return -1;
  }
  return 0;
}

/* ---- Consumer ---------------------------------------------------------------------------- */

static int consumer_verify(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)arg;
  char enabled[8];
  const char *c = str(m, "consumer");
  int rc = sql1(saga_tx_db(tx), enabled, sizeof enabled,
                "SELECT enabled FROM ftgo_consumer WHERE id = ?1", c, NULL);
  if (rc < 0) return SAGA_ESTORE;
  if (rc == 0) return saga_reply_fail(r, "unknown consumer");
  if (strcmp(enabled, "1") != 0) return saga_reply_fail(r, "consumer is not allowed to order");
  return SAGA_OK;
}

/* ---- Kitchen ----------------------------------------------------------------------------- */

static int kitchen_create(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  const char *order = str(m, "order"), *rest = str(m, "restaurant"), *item = str(m, "item");
  const char *saga = saga_msg_saga_id(m);
  char open[8];
  int rc = sql1(db, open, sizeof open,
                "SELECT open FROM ftgo_restaurant WHERE id = ?1 AND "
                "instr(',' || menu || ',', ',' || ?2 || ',') > 0",
                rest, item, NULL);
  if (rc < 0) return SAGA_ESTORE;
  if (rc == 0) return saga_reply_fail(r, "the restaurant does not serve this item");
  if (strcmp(open, "1") != 0) return saga_reply_fail(r, "the restaurant is closed");
  /* The ticket is held by this saga until it is confirmed or rejected. */
  if ((rc = saga_lock_acquire(tx, "ticket", order)) != SAGA_OK) return rc;
  char qty[24];
  snprintf(qty, sizeof qty, "%s", str(m, "qty"));
  if (sql1(db, NULL, 0,
           "INSERT INTO ftgo_ticket VALUES(?1, ?2, ?3, ?4, 'CREATE_PENDING', ?5) "
           "ON CONFLICT(order_id) DO NOTHING",
           order, rest, item, qty, saga, NULL) < 0)
    return SAGA_ESTORE;
  char owner[40];
  if (sql1(db, owner, sizeof owner, "SELECT saga FROM ftgo_ticket WHERE order_id = ?1", order,
           NULL) != 1 ||
      strcmp(owner, saga) != 0)
    return saga_reply_fail(r, "a ticket for this order exists already");
  return saga_reply_set_str(r, "ticket", order);
}

static int kitchen_reject(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  /* Only the ticket this saga created; its lock goes with this compensation. */
  return sql1(saga_tx_db(tx), NULL, 0,
              "UPDATE ftgo_ticket SET state = 'REJECTED' WHERE order_id = ?1 AND saga = ?2",
              str(m, "order"), saga_msg_saga_id(m), NULL) < 0
             ? SAGA_ESTORE
             : SAGA_OK;
}

static int kitchen_confirm(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  const char *order = str(m, "order");
  if (sql1(saga_tx_db(tx), NULL, 0,
           "UPDATE ftgo_ticket SET state = 'AWAITING_ACCEPTANCE' WHERE order_id = ?1 AND "
           "saga = ?2",
           order, saga_msg_saga_id(m), NULL) < 0)
    return SAGA_ESTORE;
  int rc = saga_lock_release(tx, "ticket", order);
  return rc == SAGA_OK || rc == SAGA_ENOTFOUND ? SAGA_OK : rc;
}

static int kitchen_cancel(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  const char *order = str(m, "order");
  char holder[SAGA_LOCK_HOLDER_SIZE], state[32];
  int rc = saga_lock_holder(db, "ticket", order, holder, sizeof holder);
  if (rc == SAGA_OK) {
    char why[160];
    snprintf(why, sizeof why, "ticket %s is held by saga %s", order, holder);
    return saga_reply_fail(r, why);
  }
  if (rc != SAGA_ENOTFOUND) return rc;
  rc = sql1(db, state, sizeof state, "SELECT state FROM ftgo_ticket WHERE order_id = ?1", order,
            NULL);
  if (rc < 0) return SAGA_ESTORE;
  if (rc == 0 || strcmp(state, "AWAITING_ACCEPTANCE") != 0)
    return saga_reply_fail(r, "only a ticket awaiting acceptance can be cancelled");
  return sql1(db, NULL, 0, "UPDATE ftgo_ticket SET state = 'CANCELLED' WHERE order_id = ?1", order,
              NULL) < 0
             ? SAGA_ESTORE
             : SAGA_OK;
}

/* ---- Accounting -------------------------------------------------------------------------- */

static int accounting_authorize(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)arg;
  const char *order = str(m, "order"), *card = str(m, "card");
  if (strncmp(card, "4000", 4) == 0) return saga_reply_fail(r, "card declined by the issuer");
  char amount[24];
  snprintf(amount, sizeof amount, "%s", str(m, "amount"));
  sqlite3 *db = saga_tx_db(tx);
  if (sql1(db, NULL, 0,
           "INSERT INTO ftgo_authorization VALUES(?1, ?2, ?3, 'AUTHORIZED', ?4) "
           "ON CONFLICT(order_id) DO NOTHING",
           order, card, amount, saga_msg_saga_id(m), NULL) < 0)
    return SAGA_ESTORE;
  char owner[40];
  if (sql1(db, owner, sizeof owner, "SELECT saga FROM ftgo_authorization WHERE order_id = ?1",
           order, NULL) != 1 ||
      strcmp(owner, saga_msg_saga_id(m)) != 0)
    return saga_reply_fail(r, "this order was authorized already");
  return SAGA_OK;
}

static int accounting_reverse(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  return sql1(saga_tx_db(tx), NULL, 0,
              "UPDATE ftgo_authorization SET state = 'REVERSED' WHERE order_id = ?1 AND "
              "state = 'AUTHORIZED'",
              str(m, "order"), NULL) < 0
             ? SAGA_ESTORE
             : SAGA_OK;
}

int ftgo_participant_register(saga_node *n, const char *service) {
  struct {
    const char *service, *command;
    saga_handler fn;
  } const table[] = {
      {"consumer", "consumer.verify", consumer_verify},
      {"kitchen", "kitchen.createTicket", kitchen_create},
      {"kitchen", "kitchen.rejectTicket", kitchen_reject},
      {"kitchen", "kitchen.confirmTicket", kitchen_confirm},
      {"kitchen", "kitchen.cancelTicket", kitchen_cancel},
      {"accounting", "accounting.authorize", accounting_authorize},
      {"accounting", "accounting.reverse", accounting_reverse},
  };
  int found = 0;
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
    if (strcmp(table[i].service, service) != 0) continue;
    found = 1;
    if (saga_node_handle(n, service, table[i].command, table[i].fn, NULL) != SAGA_OK) return -1;
  }
  return found ? 0 : -1;
}

/* ---- Order: the local steps ------------------------------------------------------------ */

static int order_create(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  const char *order = str(m, "order"), *saga = saga_msg_saga_id(m);
  /* The order is in this saga until it is approved or rejected: APPROVAL_PENDING. */
  int rc = saga_lock_acquire(tx, "order", order);
  if (rc != SAGA_OK) return rc;
  char qty[24], amount[24];
  snprintf(qty, sizeof qty, "%s", str(m, "qty"));
  snprintf(amount, sizeof amount, "%s", str(m, "amount"));
  if (sql1(db, NULL, 0,
           "INSERT INTO ftgo_order VALUES(?1, ?2, ?3, ?4, ?5, ?6, 'APPROVAL_PENDING', ?7) "
           "ON CONFLICT(id) DO NOTHING",
           order, str(m, "consumer"), str(m, "restaurant"), str(m, "item"), qty, amount, saga,
           NULL) < 0)
    return SAGA_ESTORE;
  char owner[40];
  if (sql1(db, owner, sizeof owner, "SELECT saga FROM ftgo_order WHERE id = ?1", order, NULL) !=
          1 ||
      strcmp(owner, saga) != 0)
    return saga_reply_fail(r, "this order exists already");
  return SAGA_OK;
}

static int order_reject(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  /* The lock taken by CREATE_ORDER is released with this compensation. */
  return sql1(saga_tx_db(tx), NULL, 0,
              "UPDATE ftgo_order SET state = 'REJECTED' WHERE id = ?1 AND saga = ?2",
              str(m, "order"), saga_msg_saga_id(m), NULL) < 0
             ? SAGA_ESTORE
             : SAGA_OK;
}

static int order_approve(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  const char *order = str(m, "order");
  if (sql1(saga_tx_db(tx), NULL, 0,
           "UPDATE ftgo_order SET state = 'APPROVED' WHERE id = ?1 AND saga = ?2", order,
           saga_msg_saga_id(m), NULL) < 0)
    return SAGA_ESTORE;
  int rc = saga_lock_release(tx, "order", order);
  return rc == SAGA_OK || rc == SAGA_ENOTFOUND ? SAGA_OK : rc;
}

static int order_begin_cancel(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)arg;
  const char *order = str(m, "order");
  /* Refused while another saga holds the order (an APPROVAL_PENDING one, say). */
  int rc = saga_lock_acquire(tx, "order", order);
  if (rc != SAGA_OK) return rc;
  char state[32];
  sqlite3 *db = saga_tx_db(tx);
  rc = sql1(db, state, sizeof state, "SELECT state FROM ftgo_order WHERE id = ?1", order, NULL);
  if (rc < 0) return SAGA_ESTORE;
  if (rc == 0) return saga_reply_fail(r, "unknown order");
  if (strcmp(state, "APPROVED") != 0) {
    char why[96];
    snprintf(why, sizeof why, "the order is %s: only an APPROVED order can be cancelled", state);
    return saga_reply_fail(r, why);
  }
  return sql1(db, NULL, 0, "UPDATE ftgo_order SET state = 'CANCEL_PENDING' WHERE id = ?1", order,
              NULL) < 0
             ? SAGA_ESTORE
             : SAGA_OK;
}

static int order_undo_cancel(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  return sql1(saga_tx_db(tx), NULL, 0,
              "UPDATE ftgo_order SET state = 'APPROVED' WHERE id = ?1 AND "
              "state = 'CANCEL_PENDING'",
              str(m, "order"), NULL) < 0
             ? SAGA_ESTORE
             : SAGA_OK;
}

static int order_confirm_cancel(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)r;
  (void)arg;
  const char *order = str(m, "order");
  if (sql1(saga_tx_db(tx), NULL, 0,
           "UPDATE ftgo_order SET state = 'CANCELLED' WHERE id = ?1 AND "
           "state = 'CANCEL_PENDING'",
           order, NULL) < 0)
    return SAGA_ESTORE;
  int rc = saga_lock_release(tx, "order", order);
  return rc == SAGA_OK || rc == SAGA_ENOTFOUND ? SAGA_OK : rc;
}

/* ---- Order: the definitions -------------------------------------------------------------- */

#define FOREVER                                                                                    \
  { SAGA_RETRY_FOREVER, 100, 2.0, 2000, 0, 0 }

static saga_step create_steps[] = {
    {.name = "CREATE_ORDER",
     .local_action = order_create,
     .local_compensation = order_reject,
     .kind = SAGA_STEP_COMPENSATABLE},
    {.name = "VERIFY_CONSUMER",
     .channel = "consumer",
     .action = "consumer.verify",
     .kind = SAGA_STEP_COMPENSATABLE},
    {.name = "CREATE_TICKET",
     .channel = "kitchen",
     .action = "kitchen.createTicket",
     .compensation = "kitchen.rejectTicket",
     .kind = SAGA_STEP_COMPENSATABLE},
    {.name = "AUTHORIZE_CARD",
     .channel = "accounting",
     .action = "accounting.authorize",
     .kind = SAGA_STEP_PIVOT},
    {.name = "CONFIRM_TICKET",
     .channel = "kitchen",
     .action = "kitchen.confirmTicket",
     .kind = SAGA_STEP_RETRIABLE,
     .retry = FOREVER},
    {.name = "APPROVE_ORDER",
     .local_action = order_approve,
     .kind = SAGA_STEP_RETRIABLE,
     .retry = FOREVER},
};

static saga_step cancel_steps[] = {
    {.name = "BEGIN_CANCEL",
     .local_action = order_begin_cancel,
     .local_compensation = order_undo_cancel,
     .kind = SAGA_STEP_COMPENSATABLE},
    {.name = "CANCEL_TICKET",
     .channel = "kitchen",
     .action = "kitchen.cancelTicket",
     .kind = SAGA_STEP_PIVOT},
    {.name = "REVERSE_AUTHORIZATION",
     .channel = "accounting",
     .action = "accounting.reverse",
     .kind = SAGA_STEP_RETRIABLE,
     .retry = FOREVER},
    {.name = "CONFIRM_CANCEL",
     .local_action = order_confirm_cancel,
     .kind = SAGA_STEP_RETRIABLE,
     .retry = FOREVER},
};

int ftgo_order_open(ftgo_order_svc *s, uv_loop_t *loop, const char *db_path, const char *listen,
                    const char *consumer, const char *kitchen, const char *accounting, char *err,
                    size_t errlen) {
  memset(s, 0, sizeof *s);
  s->loop = loop;
  /* No route to "order" itself: the local steps' commands and replies go round the node's
   * loopback, never through the transport. */
  saga_tcp_route routes[] = {{"consumer", consumer, NULL},
                             {"kitchen", kitchen, NULL},
                             {"accounting", accounting, NULL}};
  saga_tcp_config tc;
  saga_tcp_config_init(&tc);
  tc.listen = listen;
  tc.routes = routes;
  tc.nroutes = 3;
  tc.insecure_plaintext = 1; /* loopback only: docs/security.md for TLS */
  saga_transport *t = NULL;
  if (saga_tcp_transport_new(&t, &tc) != SAGA_OK) {
    snprintf(err, errlen, "order: cannot create the TCP transport");
    return -1;
  }
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = "order";
  cfg.db_path = db_path;
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.transport = t;
  cfg.resend_ms = 200; /* a participant that is down is tried again soon */
  if (saga_node_open(&s->node, loop, &cfg, err, errlen) != SAGA_OK) return -1;
  saga_definition create = {SAGA_DEFINITION_VERSION, "create_order", 1, create_steps, 6, 0,
                            sizeof(saga_step)};
  saga_definition cancel = {SAGA_DEFINITION_VERSION, "cancel_order", 1, cancel_steps, 4, 0,
                            sizeof(saga_step)};
  if (ftgo_schema(saga_node_db(s->node), "order") != 0 ||
      saga_node_register(s->node, &create) != SAGA_OK ||
      saga_node_register(s->node, &cancel) != SAGA_OK ||
      saga_node_start(s->node, NULL) != SAGA_OK) {
    snprintf(err, errlen, "order: %s", saga_node_errmsg(s->node));
    return -1;
  }
  if (sqlite3_open_v2(db_path, &s->app, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK) {
    snprintf(err, errlen, "order: own connection: %s", sqlite3_errmsg(s->app));
    return -1;
  }
  sqlite3_busy_timeout(s->app, 5000);
  return 0;
}

static int node_closed;
static void on_closed(void *arg) {
  (void)arg;
  node_closed = 1;
}

void ftgo_order_close(ftgo_order_svc *s) {
  sqlite3_close(s->app);
  s->app = NULL;
  if (s->node != NULL) {
    node_closed = 0;
    saga_node_close(s->node, on_closed, NULL);
    s->node = NULL;
    while (!node_closed && uv_run(s->loop, UV_RUN_ONCE) != 0) {
    }
  }
}

/* ---- Order: requests --------------------------------------------------------------------- */

typedef struct waiter {
  int done, status;
  char id[40];
  saga_state state;
} waiter;

static void on_started(saga_node *n, int status, const char *id, int existed, void *arg) {
  (void)n;
  (void)existed;
  waiter *w = arg;
  w->status = status;
  if (status == SAGA_OK) snprintf(w->id, sizeof w->id, "%s", id);
  w->done = 1;
}

static void on_tick(uv_timer_t *t) { (void)t; }

/* Runs the loop until pred(arg) or timeout_ms of real time. 0 or -1. A timer ticks every
 * 20 ms so that conditions written by other processes are seen. */
static int run_until(ftgo_order_svc *s, int (*pred)(void *), void *arg, uint64_t timeout_ms) {
  uv_timer_t tick;
  uv_timer_init(s->loop, &tick);
  uv_timer_start(&tick, on_tick, 20, 20);
  uint64_t end = uv_now(s->loop) + timeout_ms;
  int ok = 0;
  while (!(ok = pred(arg)) && uv_now(s->loop) < end) uv_run(s->loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(s->loop, UV_RUN_NOWAIT);
  return ok ? 0 : -1;
}

static int is_done(void *arg) { return ((waiter *)arg)->done; }

static int start(ftgo_order_svc *s, const char *def, saga_data *d, const char *key, char *id) {
  waiter w;
  memset(&w, 0, sizeof w);
  int rc = saga_start(s->node, def, d, key, on_started, &w);
  saga_data_free(d);
  if (rc != SAGA_OK || run_until(s, is_done, &w, 10000) != 0 || w.status != SAGA_OK) return -1;
  snprintf(id, 40, "%s", w.id);
  return 0;
}

int ftgo_create_order(ftgo_order_svc *s, const ftgo_order_req *r, char *id) {
  saga_data *d = NULL;
  if (saga_data_new(&d, NULL) != SAGA_OK) return -1;
  saga_data_set_str(d, "order", r->order);
  saga_data_set_str(d, "consumer", r->consumer);
  saga_data_set_str(d, "restaurant", r->restaurant);
  saga_data_set_str(d, "item", r->item);
  saga_data_set_str(d, "card", r->card);
  char v[24];
  snprintf(v, sizeof v, "%d", r->qty);
  saga_data_set_str(d, "qty", v);
  snprintf(v, sizeof v, "%d", r->amount);
  saga_data_set_str(d, "amount", v);
  char key[96];
  snprintf(key, sizeof key, "create-%s", r->order);
  return start(s, "create_order", d, key, id);
}

int ftgo_cancel_order(ftgo_order_svc *s, const char *order, int n, char *id) {
  saga_data *d = NULL;
  if (saga_data_new(&d, NULL) != SAGA_OK) return -1;
  saga_data_set_str(d, "order", order);
  char key[96];
  snprintf(key, sizeof key, "cancel-%s-%d", order, n);
  return start(s, "cancel_order", d, key, id);
}

int ftgo_revise_order(ftgo_order_svc *s, const char *order, int qty, char *why, size_t len) {
  sqlite3 *db = s->app;
  /* Check and write in one write transaction: no step can take the lock in between. */
  if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) return -1;
  char holder[SAGA_LOCK_HOLDER_SIZE], state[32];
  int res = -1;
  int rc = saga_lock_holder(db, "order", order, holder, sizeof holder);
  if (rc == SAGA_OK) {
    snprintf(why, len, "order %s is held by saga %s: try again once it has ended", order, holder);
    res = 0;
  } else if (rc == SAGA_ENOTFOUND) {
    rc = sql1(db, state, sizeof state, "SELECT state FROM ftgo_order WHERE id = ?1", order, NULL);
    if (rc == 0) {
      snprintf(why, len, "no order %s", order);
      res = 0;
    } else if (rc == 1 && strcmp(state, "APPROVED") != 0) {
      snprintf(why, len, "order %s is %s: only an APPROVED order can be revised", order, state);
      res = 0;
    } else if (rc == 1) {
      char q[24];
      snprintf(q, sizeof q, "%d", qty);
      if (sql1(db, NULL, 0, "UPDATE ftgo_order SET qty = ?2 WHERE id = ?1", order, q, NULL) == 0 &&
          sql1(db, NULL, 0,
               "INSERT INTO ftgo_order_revision VALUES(?1, ?2, "
               "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))",
               order, q, NULL) == 0)
        res = 1;
    }
  }
  sqlite3_exec(db, res == 1 ? "COMMIT" : "ROLLBACK", NULL, NULL, NULL);
  return res;
}

static void on_watch(saga_node *n, int status, const char *id, saga_state st, void *arg) {
  (void)n;
  (void)id;
  waiter *w = arg;
  w->status = status;
  w->state = st;
  w->done = 1;
}

int ftgo_wait(ftgo_order_svc *s, const char *id, uint64_t timeout_ms) {
  waiter w;
  memset(&w, 0, sizeof w);
  if (saga_node_watch(s->node, id, on_watch, &w) != SAGA_OK) return -1;
  if (run_until(s, is_done, &w, timeout_ms) != 0 || w.status != SAGA_OK) return -1;
  return (int)w.state;
}

typedef struct step_wait {
  ftgo_order_svc *s;
  const char *id;
  int step;
} step_wait;

static int at_step(void *arg) {
  step_wait *w = arg;
  saga_info *info = NULL;
  if (saga_get(w->s->node, w->id, &info) != SAGA_OK) return 0;
  int ok = info->state == SAGA_RUNNING && info->step == w->step;
  saga_info_free(info);
  return ok;
}

int ftgo_wait_step(ftgo_order_svc *s, const char *id, int step, uint64_t timeout_ms) {
  step_wait w = {s, id, step};
  return run_until(s, at_step, &w, timeout_ms);
}

int ftgo_read(const char *path, const char *sql, const char *arg, char *out, size_t len) {
  sqlite3 *db = NULL;
  int rc = -1;
  if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK) {
    sqlite3_busy_timeout(db, 5000);
    rc = sql1(db, out, len, sql, arg, NULL) < 0 ? -1 : 0;
  }
  sqlite3_close(db);
  return rc;
}
