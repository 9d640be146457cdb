/*
 * The shop's participants key their effects on the saga, not on the payload
 * (docs/shop.md, "Trust"): a unit test of the product, order and payment handlers on a real
 * node, fed hand-made command envelopes through a transport adapter of the test's own (the
 * public adapter interface, include/saga/sys/transport.h), as a peer that may send commands
 * would. Each forgery is a command under a saga id of the sender's choosing whose data names
 * another saga's purchase:
 *  - product.reserve then product.release under an invented saga, naming a real purchase
 *    (both with that purchase id, and the reserve with another one): only what the invented
 *    saga reserved comes back; the real purchase's reservation stays;
 *  - order.create then order.delete under an invented saga naming a real purchase: the real
 *    order stays; an order.create naming a purchase that has an order of another saga is
 *    refused;
 *  - payment.charge naming a purchase another saga paid: refused, the payment unchanged;
 *  - the real saga's own compensations still undo exactly what it did, even with no data;
 *  - a database of the previous schema (no saga recorded) is migrated, its rows kept, and no
 *    compensation finds them.
 * Every step waits for the node's acknowledgement of the delivery (after its commit) on the
 * loop, with a deadline; nothing sleeps.
 */
#include <errno.h>
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include <saga/envelope.h>
#include <saga/sys/transport.h>

#include "shop.h"

/* ---- a transport the test drives ---------------------------------------------------------- */

typedef struct fx {
  saga_transport base;
  uint64_t acked;      /* the last tag the node acknowledged */
  int32_t last_status; /* status of the last reply the node sent */
  char last_error[256];
  int replies;
} fx;

static int fx_open(saga_transport *t, struct uv_loop_s *loop) {
  (void)t, (void)loop;
  return SAGA_OK;
}
static int fx_subscribe(saga_transport *t, const char *channel) {
  (void)t, (void)channel;
  return SAGA_OK;
}
static int fx_send(saga_transport *t, const char *channel, const void *data, size_t len,
                   uint64_t token) {
  fx *f = (fx *)t;
  (void)channel;
  saga_envelope *env = NULL;
  if (saga_envelope_decode(data, len, NULL, NULL, &env, NULL, 0) == SAGA_OK) {
    if (env->kind == SAGA_MSG_REPLY) {
      f->last_status = env->status;
      snprintf(f->last_error, sizeof f->last_error, "%s", env->error ? env->error : "");
      f->replies++;
    }
    saga_envelope_free(env);
  }
  saga_transport_sent(t, token, SAGA_OK);
  return SAGA_OK;
}
static void fx_ack(saga_transport *t, uint64_t tag) { ((fx *)t)->acked = tag; }
static void fx_close(saga_transport *t) { saga_transport_closed(t); }
static void fx_destroy(saga_transport *t) { free(t); }

static const saga_transport_methods fx_methods = {
    .version = SAGA_TRANSPORT_VERSION,
    .name = "test",
    .open = fx_open,
    .subscribe = fx_subscribe,
    .send = fx_send,
    .ack = fx_ack,
    .close = fx_close,
    .destroy = fx_destroy,
};

/* ---- the node ------------------------------------------------------------------------------ */

static struct {
  uv_loop_t loop;
  char dir[64];
  char db[128];
  shop_ctx ctx;
  saga_node *node;
  fx *t;
  uint64_t next_tag;
} w;

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st, (void)flag, (void)ftw;
  return remove(path);
}

static void on_deadline(uv_timer_t *timer) { *(int *)timer->data = 1; }

/* Runs the loop until the node acknowledged tag (it commits first), or 10 s passed. */
static int run_until_acked(uint64_t tag) {
  int late = 0;
  uv_timer_t deadline;
  uv_timer_init(&w.loop, &deadline);
  deadline.data = &late;
  uv_timer_start(&deadline, on_deadline, 10000, 0);
  while (w.t->acked != tag && !late) uv_run(&w.loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&deadline, NULL);
  uv_run(&w.loop, UV_RUN_NOWAIT);
  return w.t->acked == tag ? 0 : -1;
}

/* The saga data as on the wire: a msgpack map of str -> bin (values under 256 bytes). */
static size_t encode_data(unsigned char *out, size_t cap, const char *const *kv) {
  size_t n = 0, len = 1;
  while (kv[2 * n] != NULL) n++;
  assert_true(n < 16);
  out[0] = (unsigned char)(0x80 | n);
  for (size_t i = 0; i < 2 * n; i++) {
    size_t l = strlen(kv[i]);
    assert_true(l < 256 && len + 2 + l <= cap);
    out[len++] = i % 2 == 0 ? 0xd9 : 0xc4; /* str 8 key, bin 8 value */
    out[len++] = (unsigned char)l;
    memcpy(out + len, kv[i], l);
    len += l;
  }
  return len;
}

/* Delivers one command (as a peer allowed to send to the channel would) and waits until the
 * node committed it; returns the reply's status (0 success). kv: key, value, ..., NULL. */
static int32_t command(const char *channel, const char *saga_id, uint32_t step, int compensation,
                       const char *name, ...) {
  const char *kv[32];
  size_t k = 0;
  va_list ap;
  va_start(ap, name);
  while (k < 31 && (kv[k] = va_arg(ap, const char *)) != NULL) k++;
  va_end(ap);
  kv[k] = NULL;
  unsigned char payload[2048];
  size_t plen = encode_data(payload, sizeof payload, kv);
  char msg_id[128];
  snprintf(msg_id, sizeof msg_id, "%s/%u/%d/forged", saga_id, step, compensation);
  saga_envelope env;
  memset(&env, 0, sizeof env);
  env.version = SAGA_ENVELOPE_VERSION;
  env.kind = SAGA_MSG_COMMAND;
  env.msg_id = msg_id;
  env.saga_id = saga_id;
  env.step = step;
  env.attempt = 1;
  env.phase = compensation ? SAGA_PHASE_COMPENSATION : SAGA_PHASE_ACTION;
  env.name = name;
  env.reply_to = SHOP_CH_ORCHESTRATOR;
  env.error = "";
  env.payload = payload;
  env.payload_len = plen;
  void *bytes = NULL;
  size_t len = 0;
  assert_int_equal(saga_envelope_encode(&env, NULL, &bytes, &len), SAGA_OK);
  int replies = w.t->replies;
  uint64_t tag = ++w.next_tag;
  assert_int_equal(saga_transport_deliver(&w.t->base, channel, bytes, len, tag), SAGA_OK);
  saga_free(NULL, bytes);
  if (run_until_acked(tag) != 0) {
    print_error("%s under saga %s: not acknowledged within 10 s\n", name, saga_id);
    fail();
  }
  assert_int_equal(w.t->replies, replies + 1);
  return w.t->last_status;
}

/* One integer from a query with at most one text parameter; -1 when no row. */
static int64_t query_i64(const char *sql, const char *param) {
  sqlite3 *db = saga_node_db(w.node);
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
  if (param != NULL)
    assert_int_equal(sqlite3_bind_text(st, 1, param, -1, SQLITE_STATIC), SQLITE_OK);
  int rc = sqlite3_step(st);
  assert_true(rc == SQLITE_ROW || rc == SQLITE_DONE);
  int64_t v = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : -1;
  sqlite3_finalize(st);
  return v;
}

static void exec_sql(sqlite3 *db, const char *sql) {
  char *err = NULL;
  if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
    print_error("%s: %s\n", sql, err ? err : "?");
    sqlite3_free(err);
    fail();
  }
}

static int64_t inventory(int64_t id) {
  char sql[96];
  snprintf(sql, sizeof sql, "SELECT inventory FROM products WHERE id = %lld", (long long)id);
  return query_i64(sql, NULL);
}

/* A database of the previous schema (version 1: nothing recorded the saga), as a shop made it
 * before: products 1 and 2, a reservation of 2 units of product 2 by purchase "legacy-1",
 * its order and its payment. */
static void make_v1_database(void) {
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(w.db, &db), SQLITE_OK);
  exec_sql(db, "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL,"
               " description TEXT NOT NULL, brand_name TEXT NOT NULL,"
               " price INTEGER NOT NULL CHECK (price >= 0),"
               " inventory INTEGER NOT NULL CHECK (inventory >= 0));"
               "CREATE TABLE reservations (purchase_id TEXT NOT NULL,"
               " product_id INTEGER NOT NULL, amount INTEGER NOT NULL CHECK (amount > 0),"
               " PRIMARY KEY (purchase_id, product_id));"
               "CREATE TABLE orders (purchase_id TEXT PRIMARY KEY,"
               " customer_id INTEGER NOT NULL, items TEXT NOT NULL);"
               "CREATE TABLE payments (purchase_id TEXT PRIMARY KEY,"
               " customer_id INTEGER NOT NULL, currency TEXT NOT NULL,"
               " amount INTEGER NOT NULL CHECK (amount >= 0));"
               "INSERT INTO products VALUES (1, 'Keyboard', 'k', 'b', 100, 10);"
               "INSERT INTO products VALUES (2, 'Mouse', 'm', 'b', 30, 8);"
               "INSERT INTO reservations VALUES ('legacy-1', 2, 2);"
               "INSERT INTO orders VALUES ('legacy-1', 7, '[]');"
               "INSERT INTO payments VALUES ('legacy-1', 7, 'US', 60);");
  sqlite3_close(db);
}

static void closed_cb(void *arg) { *(int *)arg = 1; }

static int setup(void **state) {
  (void)state;
  memset(&w, 0, sizeof w);
  snprintf(w.dir, sizeof w.dir, "/tmp/shop-handlers-XXXXXX");
  if (mkdtemp(w.dir) == NULL) return -1;
  snprintf(w.db, sizeof w.db, "%s/participants.db", w.dir);
  make_v1_database();
  if (uv_loop_init(&w.loop) != 0) return -1;
  w.ctx.loop = &w.loop;
  w.ctx.data_dir = w.dir;
  w.ctx.jwt_secret = "test-handlers-secret-0123456789abcdef";
  w.ctx.payment_limit = 5000;
  w.ctx.service = "participants";
  if (shop_http_start(&w.ctx.http, &w.loop, "127.0.0.1", 0) != 0) return -1;
  w.t = calloc(1, sizeof *w.t);
  if (w.t == NULL) return -1;
  w.t->base.methods = &fx_methods;
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = "participants";
  cfg.db_path = w.db;
  cfg.transport = &w.t->base;
  char err[256];
  if (saga_node_open(&w.node, &w.loop, &cfg, err, sizeof err) != SAGA_OK) {
    fprintf(stderr, "node: %s\n", err);
    return -1;
  }
  /* One node serves the three participants' channels, each service's tables in its file. */
  if (shop_product_init(&w.ctx, w.node) != 0 || shop_order_init(&w.ctx, w.node) != 0 ||
      shop_payment_init(&w.ctx, w.node) != 0 || saga_node_start(w.node, NULL) != SAGA_OK)
    return -1;
  return 0;
}

static int teardown(void **state) {
  (void)state;
  int closed = 0;
  shop_http_stop(w.ctx.http);
  saga_node_close(w.node, closed_cb, &closed);
  while (!closed && uv_run(&w.loop, UV_RUN_ONCE) != 0) {
  }
  uv_run(&w.loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&w.loop) != 0) fprintf(stderr, "# the loop still has handles\n");
  nftw(w.dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
  return 0;
}

/* ---- the tests ----------------------------------------------------------------------------- */

#define SAGA_A "01JAAAAAAAAAAAAAAAAAAAAAAA" /* the real purchase's saga */
#define ITEMS_1_3 "[{\"product_id\":1,\"amount\":3}]"
#define ITEMS_1_1 "[{\"product_id\":1,\"amount\":1}]"

/* The real purchase "p-1": 3 keyboards reserved, its order and payment. */
static void real_purchase(void) {
  assert_int_equal(command(SHOP_CH_PRODUCT, SAGA_A, 0, 0, "product.reserve", "purchase_id", "p-1",
                           "items", ITEMS_1_3, NULL),
                   0);
  assert_int_equal(inventory(1), 7);
  assert_int_equal(command(SHOP_CH_ORDER, SAGA_A, 1, 0, "order.create", "purchase_id", "p-1",
                           "customer_id", "7", "detail", "[{\"product_id\":1,\"amount\":3}]", NULL),
                   0);
  assert_int_equal(command(SHOP_CH_PAYMENT, SAGA_A, 2, 0, "payment.charge", "purchase_id", "p-1",
                           "customer_id", "7", "currency", "US", "total", "300", NULL),
                   0);
}

static void test_migrated(void **state) {
  (void)state;
  assert_int_equal(query_i64("SELECT version FROM shop_schema WHERE service = ?1", "product"), 2);
  assert_int_equal(query_i64("SELECT version FROM shop_schema WHERE service = ?1", "order"), 2);
  assert_int_equal(query_i64("SELECT version FROM shop_schema WHERE service = ?1", "payment"), 2);
  /* The rows of version 1 are kept, with no saga recorded. */
  assert_int_equal(query_i64("SELECT amount FROM reservations WHERE purchase_id = ?1 AND "
                             "saga_id IS NULL AND product_id = 2",
                             "legacy-1"),
                   2);
  assert_int_equal(
      query_i64("SELECT customer_id FROM orders WHERE purchase_id = ?1 AND saga_id IS NULL",
                "legacy-1"),
      7);
  assert_int_equal(
      query_i64("SELECT amount FROM payments WHERE purchase_id = ?1 AND saga_id IS NULL",
                "legacy-1"),
      60);
  /* A saga that reserved a mouse and then releases naming the legacy purchase gets back its
   * own mouse only; the legacy reservation stays. */
  assert_int_equal(command(SHOP_CH_PRODUCT, "01JLEGACYFORGERYXXXXXXXXXX", 0, 0, "product.reserve",
                           "purchase_id", "legacy-1", "items", "[{\"product_id\":2,\"amount\":1}]",
                           NULL),
                   0);
  assert_int_equal(inventory(2), 7);
  assert_int_equal(command(SHOP_CH_PRODUCT, "01JLEGACYFORGERYXXXXXXXXXX", 0, 1, "product.release",
                           "purchase_id", "legacy-1", NULL),
                   0);
  assert_int_equal(inventory(2), 8);
  assert_int_equal(
      query_i64("SELECT sum(amount) FROM reservations WHERE purchase_id = ?1", "legacy-1"), 2);
}

static void test_forged_release(void **state) {
  (void)state;
  real_purchase();
  /* The forgery: a reserve under an invented saga (another purchase id), then its
   * release naming the real purchase. */
  assert_int_equal(command(SHOP_CH_PRODUCT, "01JFORGEDBBBBBBBBBBBBBBBBB", 0, 0, "product.reserve",
                           "purchase_id", "forged-9", "items", ITEMS_1_1, NULL),
                   0);
  assert_int_equal(inventory(1), 6);
  assert_int_equal(command(SHOP_CH_PRODUCT, "01JFORGEDBBBBBBBBBBBBBBBBB", 0, 1, "product.release",
                           "purchase_id", "p-1", NULL),
                   0);
  assert_int_equal(inventory(1), 7); /* its own unit back, not p-1's three */
  assert_int_equal(query_i64("SELECT amount FROM reservations WHERE saga_id = ?1", SAGA_A), 3);
  assert_int_equal(
      query_i64("SELECT count(*) FROM reservations WHERE purchase_id = ?1", "forged-9"), 0);

  /* The same with the real purchase id in the reserve too: its unit is its own, p-1's
   * reservation is not touched by either command. */
  assert_int_equal(command(SHOP_CH_PRODUCT, "01JFORGEDCCCCCCCCCCCCCCCCC", 0, 0, "product.reserve",
                           "purchase_id", "p-1", "items", ITEMS_1_1, NULL),
                   0);
  assert_int_equal(inventory(1), 6);
  assert_int_equal(query_i64("SELECT amount FROM reservations WHERE saga_id = ?1", SAGA_A), 3);
  assert_int_equal(command(SHOP_CH_PRODUCT, "01JFORGEDCCCCCCCCCCCCCCCCC", 0, 1, "product.release",
                           "purchase_id", "p-1", NULL),
                   0);
  assert_int_equal(inventory(1), 7);
  assert_int_equal(query_i64("SELECT amount FROM reservations WHERE saga_id = ?1", SAGA_A), 3);

  /* Orders: another saga cannot create p-1's order, and its deletion naming p-1 deletes only
   * the order it created itself. */
  assert_int_not_equal(command(SHOP_CH_ORDER, "01JFORGEDDDDDDDDDDDDDDDDDD", 1, 0, "order.create",
                               "purchase_id", "p-1", "customer_id", "666", "detail", "[]", NULL),
                       0);
  assert_int_equal(command(SHOP_CH_ORDER, "01JFORGEDEEEEEEEEEEEEEEEEE", 1, 0, "order.create",
                           "purchase_id", "forged-10", "customer_id", "666", "detail", "[]", NULL),
                   0);
  assert_int_equal(command(SHOP_CH_ORDER, "01JFORGEDEEEEEEEEEEEEEEEEE", 1, 1, "order.delete",
                           "purchase_id", "p-1", NULL),
                   0);
  assert_int_equal(query_i64("SELECT customer_id FROM orders WHERE purchase_id = ?1", "p-1"), 7);
  assert_int_equal(query_i64("SELECT count(*) FROM orders WHERE purchase_id = ?1", "forged-10"), 0);

  /* Payments: another saga charging p-1 is refused; the payment is unchanged. */
  assert_int_not_equal(command(SHOP_CH_PAYMENT, "01JFORGEDFFFFFFFFFFFFFFFFF", 2, 0,
                               "payment.charge", "purchase_id", "p-1", "customer_id", "666",
                               "currency", "US", "total", "1", NULL),
                       0);
  assert_non_null(strstr(w.t->last_error, "another saga"));
  assert_int_equal(query_i64("SELECT amount FROM payments WHERE purchase_id = ?1", "p-1"), 300);
  assert_int_equal(query_i64("SELECT customer_id FROM payments WHERE purchase_id = ?1", "p-1"), 7);

  /* The real saga's own compensations still undo exactly what it did, whatever its data says
   * (here: nothing at all). */
  assert_int_equal(command(SHOP_CH_ORDER, SAGA_A, 1, 1, "order.delete", NULL), 0);
  assert_int_equal(query_i64("SELECT count(*) FROM orders WHERE purchase_id = ?1", "p-1"), 0);
  assert_int_equal(command(SHOP_CH_PRODUCT, SAGA_A, 0, 1, "product.release", NULL), 0);
  assert_int_equal(inventory(1), 10);
  assert_int_equal(query_i64("SELECT count(*) FROM reservations WHERE saga_id = ?1", SAGA_A), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_migrated),
      cmocka_unit_test(test_forged_release),
  };
  return cmocka_run_group_tests_name("shop handlers", tests, setup, teardown);
}
