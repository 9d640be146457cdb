/*
 * The payment service: the pivot of the purchase saga (charge the total the product step
 * computed), and GET /api/payment/{purchase_id} for the customer who paid.
 *
 * A payment is keyed by its purchase id and records the saga and step that charged it (from
 * the command's envelope, never from its data): charging again in the same saga answers
 * success with nothing new written, so a duplicate can never fail (or charge) a saga twice;
 * another saga charging a purchase that is already paid is refused. (The step is the pivot:
 * it has no compensation. Were a refund added, it would find the payment by saga id and
 * step, like the shop's other compensations.)
 * The demo's refusal rule: a total above c->payment_limit is refused, which makes the saga
 * compensate the order and the reservation.
 */
#include <inttypes.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shop.h"

typedef struct payment_svc {
  shop_ctx *c;
  saga_node *node;
} payment_svc;

/* One payment service per process. */
static payment_svc svc;

/* The service's tables, by version (shop_schema_migrate). Never edit a released one. */
static const char *const migrations[] = {
    /* 1: payments by purchase id. */
    "CREATE TABLE IF NOT EXISTS payments ("
    "  purchase_id TEXT PRIMARY KEY,"
    "  customer_id INTEGER NOT NULL,"
    "  currency TEXT NOT NULL,"
    "  amount INTEGER NOT NULL CHECK (amount >= 0));",
    /* 2: the saga and step that charged each payment (NULL for payments of version 1). */
    "ALTER TABLE payments ADD COLUMN saga_id TEXT;"
    "ALTER TABLE payments ADD COLUMN step INTEGER;"
    "CREATE UNIQUE INDEX payments_by_saga ON payments (saga_id, step);",
};

static int store_error(sqlite3 *db, const char *what) {
  return shop_store_error(db, "payment", what);
}


/* Who paid purchase_id: 1 this command's saga and step, 0 nobody, 2 another saga, < 0 a
 * store error. */
static int paid_by(sqlite3 *db, const saga_msg *cmd, const char *purchase_id) {
  return shop_record_owner(db, "payment", "SELECT saga_id, step FROM payments WHERE purchase_id = ?1", cmd,
                           purchase_id);
}

/* payment.charge: data purchase_id, customer_id, currency, total. No reply data. */
static int charge(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  payment_svc *s = arg;
  sqlite3 *db = saga_tx_db(tx);
  const saga_data *in = saga_msg_data(cmd);
  const char *purchase_id = saga_data_get_str(in, "purchase_id");
  const char *currency = saga_data_get_str(in, "currency");
  int64_t customer_id, total;
  if (purchase_id == NULL || purchase_id[0] == '\0' ||
      saga_data_get_i64(in, "customer_id", &customer_id) != SAGA_OK)
    return saga_reply_fail(reply, "malformed purchase: purchase_id and customer_id are "
                                  "required");
  int paid = paid_by(db, cmd, purchase_id);
  if (paid < 0) return paid;
  if (paid == 1) return SAGA_OK; /* charged once by this saga, answered the same */
  if (paid == 2)
    return saga_reply_fail(reply, "payment refused: the purchase is already paid by "
                                  "another saga");
  if (currency == NULL || (strcmp(currency, "NT") != 0 && strcmp(currency, "US") != 0))
    return saga_reply_fail(reply, "payment refused: the currency must be NT or US");
  if (saga_data_get_i64(in, "total", &total) != SAGA_OK || total < 0)
    return saga_reply_fail(reply, "payment refused: no valid total to charge");
  if (total > s->c->payment_limit) {
    char why[160];
    snprintf(why, sizeof why, "payment refused: amount %" PRId64 " over the limit %" PRId64, total,
             s->c->payment_limit);
    return saga_reply_fail(reply, why);
  }
  sqlite3_stmt *st = NULL;
  int rc = SAGA_OK;
  if (sqlite3_prepare_v2(db,
                         "INSERT INTO payments (purchase_id, customer_id, currency, amount, "
                         "saga_id, step) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                         -1, &st, NULL) != SQLITE_OK)
    rc = store_error(db, "preparing a statement");
  else if (sqlite3_bind_text(st, 1, purchase_id, -1, SQLITE_STATIC) != SQLITE_OK ||
           sqlite3_bind_int64(st, 2, customer_id) != SQLITE_OK ||
           sqlite3_bind_text(st, 3, currency, -1, SQLITE_STATIC) != SQLITE_OK ||
           sqlite3_bind_int64(st, 4, total) != SQLITE_OK ||
           sqlite3_bind_text(st, 5, saga_msg_saga_id(cmd), -1, SQLITE_STATIC) != SQLITE_OK ||
           sqlite3_bind_int64(st, 6, saga_msg_step(cmd)) != SQLITE_OK)
    rc = store_error(db, "binding");
  else if (sqlite3_step(st) != SQLITE_DONE)
    rc = store_error(db, "recording a payment");
  sqlite3_finalize(st);
  return rc;
}

/* GET /api/payment/{purchase_id} (Bearer) -> {id, currency_code, amount}; the payer only. */
static void get_payment(shop_req *r, void *arg) {
  payment_svc *s = arg;
  int64_t customer;
  if (shop_auth_customer(s->c, r, &customer) != 0) return; /* answered 401 */
  const char *purchase_id = shop_req_param(r, 0);
  sqlite3 *db = saga_node_db(s->node);
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db,
                              "SELECT customer_id, currency, amount FROM payments "
                              "WHERE purchase_id = ?1",
                              -1, &st, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_bind_text(st, 1, purchase_id, -1, SQLITE_STATIC);
  if (rc == SQLITE_OK) rc = sqlite3_step(st);
  if (rc == SQLITE_ROW && sqlite3_column_int64(st, 0) == customer) {
    const char *currency = (const char *)sqlite3_column_text(st, 1);
    json_t *id = shop_purchase_id_json(purchase_id);
    json_t *out =
        id != NULL ? json_pack("{s:O,s:s,s:I}", "id", id, "currency_code", currency ? currency : "",
                               "amount", (json_int_t)sqlite3_column_int64(st, 2))
                   : NULL;
    json_decref(id);
    if (out == NULL)
      shop_reply_error(r, 500, "out of memory");
    else
      shop_reply_json(r, 200, out);
  } else if (rc == SQLITE_ROW || rc == SQLITE_DONE) {
    shop_reply_error(r, 404, "payment not found"); /* none, or another customer's */
  } else {
    fprintf(stderr, "[payment] reading a payment: %s\n", sqlite3_errmsg(db));
    shop_reply_error(r, 500, "internal error");
  }
  sqlite3_finalize(st);
}

int shop_payment_init(shop_ctx *c, saga_node *node) {
  svc.c = c;
  svc.node = node;
  if (shop_schema_migrate(saga_node_db(node), "payment", migrations,
                          (int)(sizeof migrations / sizeof migrations[0])) != 0)
    return -1;
  int rc = saga_node_handle(node, SHOP_CH_PAYMENT, "payment.charge", charge, &svc);
  if (rc != SAGA_OK) {
    fprintf(stderr, "[payment] registering the handler: %s\n", saga_strerror(rc));
    return -1;
  }
  return shop_http_route(c->http, "GET", "/api/payment/{}", get_payment, &svc) != 0 ? -1 : 0;
}
