/*
 * The product service: the catalogue over HTTP, and the first step of the purchase saga
 * (reserve the items' inventory, all or nothing; release exactly what was reserved).
 *
 * Tables live in the node's database. The saga handlers write with saga_tx_db(tx), inside
 * the savepoint libsaga opens for them: a refusal rolls back every decrement already made
 * for the purchase, so a reservation is never partial. The HTTP routes run on the same loop
 * thread, between the node's transactions, and use the node's connection in autocommit mode.
 *
 * Reservations are recorded per (saga, step, product): the saga id and step come from the
 * command's envelope (saga_msg_saga_id, saga_msg_step), never from its data. The release, the
 * compensation of that same step of that same saga, restores exactly what the saga's
 * reservation took (even if prices or inventory changed in the meantime) and nothing else:
 * the purchase id in its data is not used to find what to undo, so a command naming another
 * purchase (a forgery, a bug) cannot give back someone else's reservation; and a release of a
 * saga that reserved nothing changes nothing.
 */
#include <inttypes.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shop.h"

#define NAME_MAX_BYTES 256 /* name, description and brand_name */
#define PAGE_MAX 500       /* most products in one page of GET /api/products */

typedef struct product_svc {
  shop_ctx *c;
  saga_node *node;
} product_svc;

/* One product service per process. */
static product_svc svc;

/* The service's tables, by version (shop_schema_migrate). Never edit a released one. */
static const char *const migrations[] = {
    /* 1: products, and reservations per (purchase, product). */
    "CREATE TABLE IF NOT EXISTS products ("
    "  id INTEGER PRIMARY KEY,"
    "  name TEXT NOT NULL,"
    "  description TEXT NOT NULL,"
    "  brand_name TEXT NOT NULL,"
    "  price INTEGER NOT NULL CHECK (price >= 0),"
    "  inventory INTEGER NOT NULL CHECK (inventory >= 0));"
    "CREATE TABLE IF NOT EXISTS reservations ("
    "  purchase_id TEXT NOT NULL,"
    "  product_id INTEGER NOT NULL,"
    "  amount INTEGER NOT NULL CHECK (amount > 0),"
    "  PRIMARY KEY (purchase_id, product_id));",
    /* 2: reservations per (saga, step, product), the saga and step that reserved them. Rows of
     * version 1 keep saga_id and step NULL: no compensation finds them (upgrade with no
     * purchase in flight, docs/shop.md). */
    "CREATE TABLE reservations_v2 ("
    "  saga_id TEXT,"
    "  step INTEGER,"
    "  product_id INTEGER NOT NULL,"
    "  purchase_id TEXT NOT NULL,"
    "  amount INTEGER NOT NULL CHECK (amount > 0),"
    "  UNIQUE (saga_id, step, product_id));"
    "INSERT INTO reservations_v2 (product_id, purchase_id, amount)"
    "  SELECT product_id, purchase_id, amount FROM reservations;"
    "DROP TABLE reservations;"
    "ALTER TABLE reservations_v2 RENAME TO reservations;",
};

static int store_error(sqlite3 *db, const char *what) {
  return shop_store_error(db, "product", what);
}

/* ---- HTTP --------------------------------------------------------------------------------- */

/* Parses a whole decimal number in [min, max]; 0 on success, -1 otherwise. */
static int parse_int(const char *s, int64_t min, int64_t max, int64_t *out) {
  if (s == NULL || *s == '\0') return -1;
  int64_t v = 0;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9') return -1;
    if (v > (INT64_MAX - (*p - '0')) / 10) return -1;
    v = v * 10 + (*p - '0');
  }
  if (v < min || v > max) return -1;
  *out = v;
  return 0;
}

/* A required non-empty string member of at most NAME_MAX_BYTES bytes, or NULL. */
static const char *text_field(json_t *body, const char *key) {
  const char *s = json_string_value(json_object_get(body, key));
  size_t n = s != NULL ? strlen(s) : 0;
  return n >= 1 && n <= NAME_MAX_BYTES ? s : NULL;
}

/* A required integer member >= 0; 0 on success. JSON reals (1.0) are refused. */
static int count_field(json_t *body, const char *key, int64_t *out) {
  json_t *v = json_object_get(body, key);
  if (!json_is_integer(v) || json_integer_value(v) < 0) return -1;
  *out = (int64_t)json_integer_value(v);
  return 0;
}

static void db_failure(shop_req *r, sqlite3 *db, const char *what) {
  fprintf(stderr, "[product] %s: %s\n", what, sqlite3_errmsg(db));
  shop_reply_error(r, 500, "internal error");
}

/* POST /api/product {name, description, brand_name, price, inventory} -> 201 {id} */
static void create_product(shop_req *r, void *arg) {
  product_svc *s = arg;
  json_t *body = shop_req_json(r);
  if (body == NULL) {
    shop_reply_error(r, 400, "invalid parameter: the body must be a JSON object");
    return;
  }
  const char *name = text_field(body, "name"), *desc = text_field(body, "description"),
             *brand = text_field(body, "brand_name");
  int64_t price, inventory;
  if (name == NULL || desc == NULL || brand == NULL) {
    shop_reply_error(r, 400,
                     "invalid parameter: name, description and brand_name must be "
                     "non-empty strings of at most 256 bytes");
    return;
  }
  if (count_field(body, "price", &price) != 0 || count_field(body, "inventory", &inventory) != 0) {
    shop_reply_error(r, 400, "invalid parameter: price and inventory must be integers >= 0");
    return;
  }
  sqlite3 *db = saga_node_db(s->node);
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db,
                              "INSERT INTO products (name, description, brand_name, price, "
                              "inventory) VALUES (?1, ?2, ?3, ?4, ?5)",
                              -1, &st, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  if (rc == SQLITE_OK) rc = sqlite3_bind_text(st, 2, desc, -1, SQLITE_STATIC);
  if (rc == SQLITE_OK) rc = sqlite3_bind_text(st, 3, brand, -1, SQLITE_STATIC);
  if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, 4, price);
  if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, 5, inventory);
  if (rc == SQLITE_OK) rc = sqlite3_step(st);
  if (rc != SQLITE_DONE) {
    db_failure(r, db, "creating a product");
  } else {
    json_t *out = json_pack("{s:I}", "id", (json_int_t)sqlite3_last_insert_rowid(db));
    if (out == NULL)
      shop_reply_error(r, 500, "out of memory");
    else
      shop_reply_json(r, 201, out);
  }
  sqlite3_finalize(st);
}

/* GET /api/products?offset=&size= -> {"catalogs": [{id, name, inventory, price}]} */
static void list_products(shop_req *r, void *arg) {
  product_svc *s = arg;
  const char *qoff = shop_req_query(r, "offset"), *qsize = shop_req_query(r, "size");
  int64_t offset = 0, size;
  if (parse_int(qsize, 1, PAGE_MAX, &size) != 0 ||
      (qoff != NULL && parse_int(qoff, 0, INT64_MAX, &offset) != 0)) {
    shop_reply_error(r, 400, "invalid parameter: size must be 1..500 and offset >= 0");
    return;
  }
  sqlite3 *db = saga_node_db(s->node);
  sqlite3_stmt *st = NULL;
  json_t *list = json_array(), *out = NULL;
  int oom = list == NULL;
  int rc = sqlite3_prepare_v2(db,
                              "SELECT id, name, inventory, price FROM products ORDER BY id "
                              "LIMIT ?1 OFFSET ?2",
                              -1, &st, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, 1, size);
  if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, 2, offset);
  while (rc == SQLITE_OK && !oom && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    const char *name = (const char *)sqlite3_column_text(st, 1);
    json_t *item =
        json_pack("{s:I,s:s,s:I,s:I}", "id", (json_int_t)sqlite3_column_int64(st, 0), "name",
                  name ? name : "", "inventory", (json_int_t)sqlite3_column_int64(st, 2), "price",
                  (json_int_t)sqlite3_column_int64(st, 3));
    oom = item == NULL || json_array_append_new(list, item) != 0;
    rc = SQLITE_OK;
  }
  if (!oom && rc == SQLITE_DONE) out = json_pack("{s:O}", "catalogs", list);
  if (out != NULL)
    shop_reply_json(r, 200, out);
  else if (oom || rc == SQLITE_DONE)
    shop_reply_error(r, 500, "out of memory");
  else
    db_failure(r, db, "listing products");
  sqlite3_finalize(st);
  json_decref(list);
}

/* GET /api/product/{id} -> {id, name, description, brand_name, price, inventory} */
static void get_product(shop_req *r, void *arg) {
  product_svc *s = arg;
  int64_t id;
  if (parse_int(shop_req_param(r, 0), 0, INT64_MAX, &id) != 0) {
    shop_reply_error(r, 400, "invalid parameter: the product id must be a number");
    return;
  }
  sqlite3 *db = saga_node_db(s->node);
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db,
                              "SELECT name, description, brand_name, price, inventory "
                              "FROM products WHERE id = ?1",
                              -1, &st, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, 1, id);
  if (rc == SQLITE_OK) rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) {
    const char *name = (const char *)sqlite3_column_text(st, 0);
    const char *desc = (const char *)sqlite3_column_text(st, 1);
    const char *brand = (const char *)sqlite3_column_text(st, 2);
    json_t *out = json_pack("{s:I,s:s,s:s,s:s,s:I,s:I}", "id", (json_int_t)id, "name",
                            name ? name : "", "description", desc ? desc : "", "brand_name",
                            brand ? brand : "", "price", (json_int_t)sqlite3_column_int64(st, 3),
                            "inventory", (json_int_t)sqlite3_column_int64(st, 4));
    if (out == NULL)
      shop_reply_error(r, 500, "out of memory");
    else
      shop_reply_json(r, 200, out);
  } else if (rc == SQLITE_DONE) {
    shop_reply_error(r, 404, "product not found");
  } else {
    db_failure(r, db, "reading a product");
  }
  sqlite3_finalize(st);
}

/* ---- the saga ----------------------------------------------------------------------------- */

/* The statements of a reservation, prepared once per command. */
enum { Q_GET, Q_TAKE, Q_RESERVE, NQ_RESERVE };
static const char *const reserve_sql[NQ_RESERVE] = {
    [Q_GET] = "SELECT name, description, brand_name, price, inventory FROM products "
              "WHERE id = ?1",
    [Q_TAKE] = "UPDATE products SET inventory = inventory - ?2 WHERE id = ?1 "
               "AND inventory >= ?2",
    /* The same product twice in one purchase adds up. */
    [Q_RESERVE] = "INSERT INTO reservations (saga_id, step, product_id, purchase_id, amount) "
                  "VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (saga_id, step, product_id) "
                  "DO UPDATE SET amount = amount + excluded.amount",
};

/* Reserves one item: appends its detail to `detail` and adds amount * price to *total.
 * Returns SAGA_OK, a refusal (reason in why), or a store error. */
static int reserve_item(sqlite3 *db, sqlite3_stmt **q, const saga_msg *cmd, const char *purchase_id,
                        int64_t pid, int64_t amount, json_t *detail, int64_t *total, char *why,
                        size_t whylen) {
  sqlite3_stmt *get = q[Q_GET], *take = q[Q_TAKE], *res = q[Q_RESERVE];
  sqlite3_reset(get);
  sqlite3_reset(take);
  sqlite3_reset(res);
  if (sqlite3_bind_int64(get, 1, pid) != SQLITE_OK) return store_error(db, "binding");
  int rc = sqlite3_step(get);
  if (rc == SQLITE_DONE) {
    snprintf(why, whylen, "product %" PRId64 " not found", pid);
    return SAGA_EREFUSED;
  }
  if (rc != SQLITE_ROW) return store_error(db, "reading a product");
  int64_t price = sqlite3_column_int64(get, 3), inventory = sqlite3_column_int64(get, 4);
  if (inventory < amount) {
    snprintf(why, whylen, "insufficient inventory for product %" PRId64, pid);
    return SAGA_EREFUSED;
  }
  int64_t cost;
  if (__builtin_mul_overflow(amount, price, &cost) || __builtin_add_overflow(*total, cost, total)) {
    snprintf(why, whylen, "the total of the purchase is too large");
    return SAGA_EREFUSED;
  }
  const char *name = (const char *)sqlite3_column_text(get, 0);
  const char *desc = (const char *)sqlite3_column_text(get, 1);
  const char *brand = (const char *)sqlite3_column_text(get, 2);
  json_t *item =
      json_pack("{s:I,s:s,s:s,s:s,s:I,s:I}", "product_id", (json_int_t)pid, "name",
                name ? name : "", "description", desc ? desc : "", "brand_name", brand ? brand : "",
                "price", (json_int_t)price, "amount", (json_int_t)amount);
  if (item == NULL || json_array_append_new(detail, item) != 0) return SAGA_ENOMEM;
  sqlite3_reset(get);

  if (sqlite3_bind_int64(take, 1, pid) != SQLITE_OK ||
      sqlite3_bind_int64(take, 2, amount) != SQLITE_OK)
    return store_error(db, "binding");
  if (sqlite3_step(take) != SQLITE_DONE) return store_error(db, "decrementing inventory");
  if (sqlite3_changes(db) != 1) { /* cannot happen: we are the only writer, and we read it */
    snprintf(why, whylen, "insufficient inventory for product %" PRId64, pid);
    return SAGA_EREFUSED;
  }
  if (sqlite3_bind_text(res, 1, saga_msg_saga_id(cmd), -1, SQLITE_STATIC) != SQLITE_OK ||
      sqlite3_bind_int64(res, 2, saga_msg_step(cmd)) != SQLITE_OK ||
      sqlite3_bind_int64(res, 3, pid) != SQLITE_OK ||
      sqlite3_bind_text(res, 4, purchase_id, -1, SQLITE_STATIC) != SQLITE_OK ||
      sqlite3_bind_int64(res, 5, amount) != SQLITE_OK)
    return store_error(db, "binding");
  if (sqlite3_step(res) != SQLITE_DONE) return store_error(db, "recording a reservation");
  return SAGA_OK;
}

/*
 * product.reserve: data purchase_id, items [{product_id, amount}]. Reply data: detail (JSON
 * [{product_id, name, description, brand_name, price, amount}]) and total (Σ amount × price).
 * All or nothing: on a refusal libsaga rolls back this handler's savepoint, so the decrements
 * already made for earlier items are undone.
 */
static int reserve(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  const saga_data *in = saga_msg_data(cmd);
  const char *purchase_id = saga_data_get_str(in, "purchase_id");
  const char *items_text = saga_data_get_str(in, "items");
  if (purchase_id == NULL || purchase_id[0] == '\0' || items_text == NULL)
    return saga_reply_fail(reply, "malformed purchase: purchase_id and items are required");
  json_error_t jerr;
  json_t *items = json_loads(items_text, 0, &jerr);
  if (items == NULL || !json_is_array(items) || json_array_size(items) == 0) {
    json_decref(items);
    return saga_reply_fail(reply, "malformed purchase: items must be a non-empty JSON array");
  }
  sqlite3_stmt *q[NQ_RESERVE] = {NULL};
  json_t *detail = json_array();
  char why[160] = "";
  int64_t total = 0;
  int rc = detail != NULL ? SAGA_OK : SAGA_ENOMEM;
  for (int i = 0; rc == SAGA_OK && i < NQ_RESERVE; i++)
    if (sqlite3_prepare_v2(db, reserve_sql[i], -1, &q[i], NULL) != SQLITE_OK)
      rc = store_error(db, "preparing a statement");
  for (size_t i = 0; rc == SAGA_OK && i < json_array_size(items); i++) {
    json_t *it = json_array_get(items, i);
    json_t *jp = json_object_get(it, "product_id"), *ja = json_object_get(it, "amount");
    if (!json_is_integer(jp) || !json_is_integer(ja) || json_integer_value(jp) < 1 ||
        json_integer_value(ja) < 1) {
      snprintf(why, sizeof why,
               "malformed purchase: item %zu needs an integer product_id "
               "and an amount >= 1",
               i);
      rc = SAGA_EREFUSED;
      break;
    }
    rc = reserve_item(db, q, cmd, purchase_id, (int64_t)json_integer_value(jp),
                      (int64_t)json_integer_value(ja), detail, &total, why, sizeof why);
  }
  char *text = NULL;
  if (rc == SAGA_OK) {
    text = json_dumps(detail, JSON_COMPACT);
    rc = text != NULL ? saga_reply_set_str(reply, "detail", text) : SAGA_ENOMEM;
  }
  if (rc == SAGA_OK) rc = saga_reply_set_i64(reply, "total", total);
  if (rc == SAGA_EREFUSED) rc = saga_reply_fail(reply, why);
  free(text);
  for (int i = 0; i < NQ_RESERVE; i++) sqlite3_finalize(q[i]);
  json_decref(detail);
  json_decref(items);
  return rc;
}

/*
 * product.release: gives back exactly what this saga's reservation at this step took, and
 * forgets it. What to undo is found by the saga id and step of the command (the compensation
 * of the step that reserved), not by the purchase id in its data: a release can only undo what
 * its own saga did. A saga that reserved nothing (or was released already) changes nothing.
 */
static int release(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  (void)reply;
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  sqlite3_stmt *give = NULL, *forget = NULL;
  int rc = SAGA_OK;
  if (sqlite3_prepare_v2(db,
                         "UPDATE products SET inventory = inventory + (SELECT r.amount FROM "
                         "reservations r WHERE r.saga_id = ?1 AND r.step = ?2 AND "
                         "r.product_id = products.id) WHERE id IN (SELECT product_id FROM "
                         "reservations WHERE saga_id = ?1 AND step = ?2)",
                         -1, &give, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(db, "DELETE FROM reservations WHERE saga_id = ?1 AND step = ?2", -1,
                         &forget, NULL) != SQLITE_OK) {
    rc = store_error(db, "preparing a statement");
  } else if (sqlite3_bind_text(give, 1, saga_msg_saga_id(cmd), -1, SQLITE_STATIC) != SQLITE_OK ||
             sqlite3_bind_int64(give, 2, saga_msg_step(cmd)) != SQLITE_OK ||
             sqlite3_bind_text(forget, 1, saga_msg_saga_id(cmd), -1, SQLITE_STATIC) != SQLITE_OK ||
             sqlite3_bind_int64(forget, 2, saga_msg_step(cmd)) != SQLITE_OK) {
    rc = store_error(db, "binding");
  } else if (sqlite3_step(give) != SQLITE_DONE) {
    rc = store_error(db, "restoring inventory");
  } else if (sqlite3_step(forget) != SQLITE_DONE) {
    rc = store_error(db, "deleting reservations");
  }
  sqlite3_finalize(give);
  sqlite3_finalize(forget);
  return rc;
}

int shop_product_init(shop_ctx *c, saga_node *node) {
  svc.c = c;
  svc.node = node;
  if (shop_schema_migrate(saga_node_db(node), "product", migrations,
                          (int)(sizeof migrations / sizeof migrations[0])) != 0)
    return -1;
  int rc = saga_node_handle(node, SHOP_CH_PRODUCT, "product.reserve", reserve, &svc);
  if (rc == SAGA_OK) rc = saga_node_handle(node, SHOP_CH_PRODUCT, "product.release", release, &svc);
  if (rc != SAGA_OK) {
    fprintf(stderr, "[product] registering handlers: %s\n", saga_strerror(rc));
    return -1;
  }
  if (shop_http_route(c->http, "POST", "/api/product", create_product, &svc) != 0 ||
      shop_http_route(c->http, "GET", "/api/products", list_products, &svc) != 0 ||
      shop_http_route(c->http, "GET", "/api/product/{}", get_product, &svc) != 0)
    return -1;
  return 0;
}
