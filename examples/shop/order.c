/*
 * The order service: the second step of the purchase saga (create the order from what the
 * product step reserved; delete it to compensate), and GET /api/order/{purchase_id} for the
 * customer who bought it.
 *
 * An order is keyed by its purchase id and records the saga and step that created it (from
 * the command's envelope, never from its data). Creating it twice in the same saga (a
 * redelivery that escaped libsaga's inbox, a saga retried by an operator) leaves one order and
 * succeeds; another saga naming a purchase that already has an order is refused. The deletion
 * (the compensation of that step of that saga) deletes the order its own saga created, found
 * by saga id and step, whatever purchase id its data names: a compensation can only undo what
 * its saga did. Deleting when the saga created no order succeeds, since a compensation must
 * tolerate "the action never happened".
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shop.h"

typedef struct order_svc {
  shop_ctx *c;
  saga_node *node;
} order_svc;

/* One order service per process. */
static order_svc svc;

/* The service's tables, by version (shop_schema_migrate). Never edit a released one. */
static const char *const migrations[] = {
    /* 1: orders by purchase id; items is JSON [{product_id, name, description, brand_name,
     * price, amount}], as the product step reserved them. */
    "CREATE TABLE IF NOT EXISTS orders ("
    "  purchase_id TEXT PRIMARY KEY,"
    "  customer_id INTEGER NOT NULL,"
    "  items TEXT NOT NULL);",
    /* 2: the saga and step that created each order (NULL for orders of version 1, which no
     * compensation finds: upgrade with no purchase in flight). */
    "ALTER TABLE orders ADD COLUMN saga_id TEXT;"
    "ALTER TABLE orders ADD COLUMN step INTEGER;"
    "CREATE UNIQUE INDEX orders_by_saga ON orders (saga_id, step);",
};

static int store_error(sqlite3 *db, const char *what) {
  return shop_store_error(db, "order", what);
}


/* Who created purchase_id's order: 1 this command's saga and step, 0 none, 2 another saga,
 * < 0 a store error. */
static int order_owner(sqlite3 *db, const saga_msg *cmd, const char *purchase_id) {
  return shop_record_owner(db, "order", "SELECT saga_id, step FROM orders WHERE purchase_id = ?1", cmd,
                           purchase_id);
}

/* order.create: data purchase_id, customer_id, detail. No reply data. */
static int create_order(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  const saga_data *in = saga_msg_data(cmd);
  const char *purchase_id = saga_data_get_str(in, "purchase_id");
  const char *detail = saga_data_get_str(in, "detail");
  int64_t customer_id;
  if (purchase_id == NULL || purchase_id[0] == '\0' || detail == NULL ||
      saga_data_get_i64(in, "customer_id", &customer_id) != SAGA_OK)
    return saga_reply_fail(reply, "malformed purchase: purchase_id, customer_id and detail "
                                  "are required");
  /* Keep only what GET /api/order can show: refuse a detail that is not a JSON array. */
  json_error_t jerr;
  json_t *items = json_loads(detail, 0, &jerr);
  int is_array = json_is_array(items);
  json_decref(items);
  if (!is_array) return saga_reply_fail(reply, "malformed purchase: detail is not a JSON array");
  int owner = order_owner(db, cmd, purchase_id);
  if (owner < 0) return owner;
  if (owner == 1) return SAGA_OK; /* created by this saga's step already */
  if (owner == 2)
    return saga_reply_fail(reply, "the purchase already has an order of another saga");

  sqlite3_stmt *st = NULL;
  int rc = SAGA_OK;
  if (sqlite3_prepare_v2(db,
                         "INSERT INTO orders (purchase_id, customer_id, items, saga_id, step) "
                         "VALUES (?1, ?2, ?3, ?4, ?5)",
                         -1, &st, NULL) != SQLITE_OK)
    rc = store_error(db, "preparing a statement");
  else if (sqlite3_bind_text(st, 1, purchase_id, -1, SQLITE_STATIC) != SQLITE_OK ||
           sqlite3_bind_int64(st, 2, customer_id) != SQLITE_OK ||
           sqlite3_bind_text(st, 3, detail, -1, SQLITE_STATIC) != SQLITE_OK ||
           sqlite3_bind_text(st, 4, saga_msg_saga_id(cmd), -1, SQLITE_STATIC) != SQLITE_OK ||
           sqlite3_bind_int64(st, 5, saga_msg_step(cmd)) != SQLITE_OK)
    rc = store_error(db, "binding");
  else if (sqlite3_step(st) != SQLITE_DONE)
    rc = store_error(db, "creating an order");
  sqlite3_finalize(st);
  return rc;
}

/* order.delete: deletes the order this saga's step created, found by the command's saga id
 * and step (its data is not used). None (never created, or deleted already): success. */
static int delete_order(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  (void)reply;
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  sqlite3_stmt *st = NULL;
  int rc = SAGA_OK;
  if (sqlite3_prepare_v2(db, "DELETE FROM orders WHERE saga_id = ?1 AND step = ?2", -1, &st,
                         NULL) != SQLITE_OK)
    rc = store_error(db, "preparing a statement");
  else if (sqlite3_bind_text(st, 1, saga_msg_saga_id(cmd), -1, SQLITE_STATIC) != SQLITE_OK ||
           sqlite3_bind_int64(st, 2, saga_msg_step(cmd)) != SQLITE_OK)
    rc = store_error(db, "binding");
  else if (sqlite3_step(st) != SQLITE_DONE)
    rc = store_error(db, "deleting an order");
  sqlite3_finalize(st);
  return rc;
}

/* GET /api/order/{purchase_id} (Bearer) -> {id, purchased_items: [...]}; the owner only. */
static void get_order(shop_req *r, void *arg) {
  order_svc *s = arg;
  int64_t customer;
  if (shop_auth_customer(s->c, r, &customer) != 0) return; /* answered 401 */
  const char *purchase_id = shop_req_param(r, 0);
  sqlite3 *db = saga_node_db(s->node);
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db, "SELECT customer_id, items FROM orders WHERE purchase_id = ?1",
                              -1, &st, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_bind_text(st, 1, purchase_id, -1, SQLITE_STATIC);
  if (rc == SQLITE_OK) rc = sqlite3_step(st);
  if (rc == SQLITE_ROW && sqlite3_column_int64(st, 0) == customer) {
    json_error_t jerr;
    const char *text = (const char *)sqlite3_column_text(st, 1);
    json_t *items = text != NULL ? json_loads(text, 0, &jerr) : NULL;
    json_t *id = shop_purchase_id_json(purchase_id);
    json_t *out = items != NULL && id != NULL
                      ? json_pack("{s:O,s:O}", "id", id, "purchased_items", items)
                      : NULL;
    json_decref(items);
    json_decref(id);
    if (out == NULL) {
      fprintf(stderr, "[order] order %s: cannot build the answer\n", purchase_id);
      shop_reply_error(r, 500, "internal error");
    } else {
      shop_reply_json(r, 200, out);
    }
  } else if (rc == SQLITE_ROW || rc == SQLITE_DONE) {
    shop_reply_error(r, 404, "order not found"); /* none, or another customer's */
  } else {
    fprintf(stderr, "[order] reading an order: %s\n", sqlite3_errmsg(db));
    shop_reply_error(r, 500, "internal error");
  }
  sqlite3_finalize(st);
}

int shop_order_init(shop_ctx *c, saga_node *node) {
  svc.c = c;
  svc.node = node;
  if (shop_schema_migrate(saga_node_db(node), "order", migrations,
                          (int)(sizeof migrations / sizeof migrations[0])) != 0)
    return -1;
  int rc = saga_node_handle(node, SHOP_CH_ORDER, "order.create", create_order, &svc);
  if (rc == SAGA_OK) rc = saga_node_handle(node, SHOP_CH_ORDER, "order.delete", delete_order, &svc);
  if (rc != SAGA_OK) {
    fprintf(stderr, "[order] registering handlers: %s\n", saga_strerror(rc));
    return -1;
  }
  return shop_http_route(c->http, "GET", "/api/order/{}", get_order, &svc) != 0 ? -1 : 0;
}
