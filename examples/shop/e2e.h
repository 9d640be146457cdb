/*
 * End-to-end tests of the shop over HTTP (cmocka), shared by test_shop (the embedded server)
 * and test_cluster (the distributed shop behind nginx): helpers that drive the API with the
 * client of client.h and check answers, and the tests that run the same against both. Every
 * helper fails the current cmocka test on an unexpected answer.
 *
 * Each program sets e2e_url (the base URL) before the tests run, and starts its server with
 * E2E_SECRET as JWT secret and E2E_PAYMENT_LIMIT as payment limit.
 */
#ifndef SHOP_E2E_H
#define SHOP_E2E_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "client.h"

#define SECRET "e2e-secret-4b1d9c0a7e3f5d2c8b6a9e1f0d3c7b5a"
#define PAYMENT_LIMIT 5000
#define WAIT_MS 30000
#define CONCURRENT 50
#define STOCK 10

extern char e2e_url[128];

/* ---- requests ---- */
char *dump(const json_t *j); /* compact JSON text, in a thread-local buffer */
shop_client *client(const char *token);
/* Sends body (taken, may be NULL) and checks the status; returns the answer (owned). */
json_t *call_expect(shop_client *c, long want, const char *method, const char *path, json_t *body,
                    const char *why);
/* Checks an error answer: status want and a {"msg": "..."} body. */
void error_expect(shop_client *c, long want, const char *method, const char *path, json_t *body,
                  const char *why);
#define CALL(c, want, method, path, body) call_expect(c, want, method, path, body, #body)
#define ERR(c, want, method, path, body) error_expect(c, want, method, path, body, #body)
long raw(shop_client *c, const char *method, const char *path, const char *body, size_t len,
         const char *authorization, json_t **out);
long status_of(shop_client *c, const char *method, const char *path, const char *authz);

/* ---- customers and products ---- */
typedef struct customer {
  shop_client *c;
  char email[128], phone[32], password[64];
  char *access, *refresh;
} customer;
/* A new customer, signed up, with c carrying its access token. */
void customer_new(customer *cu);
void customer_free(customer *cu);
/* Creates a product; returns its id (owned). */
json_t *product_new(shop_client *c, const char *name, int price, int inventory);
const char *sid(const json_t *id); /* an id as text (one of 4 thread-local buffers) */
long long inventory_of(shop_client *c, const json_t *id);
json_t *item(const json_t *product, json_int_t amount);
json_t *purchase_body(json_t *items, const char *currency);
/* POSTs a purchase of items (taken) and returns its id (owned). */
json_t *buy(shop_client *c, json_t *items, const char *currency);
json_t *buy1(shop_client *c, const json_t *product, json_int_t amount);
void expect_payment(shop_client *c, const json_t *id, const char *currency, long long amt);
void expect_absent(shop_client *c, const char *what, const json_t *id);

/* ---- the result stream ---- */
typedef struct stream {
  shop_events *ev;
  shop_track **t;
  size_t n;
  json_t *all; /* every event, in arrival order */
} stream;
void stream_open(stream *s, const char *token);
void stream_close(stream *s);
shop_track *stream_track(stream *s, const char *id);
/* Takes one event (waiting up to ms); 1 if one came. */
int stream_pump(stream *s, int ms);
/* Waits until purchase id reached its final status (fails after ms). */
shop_track *stream_wait(stream *s, const json_t *id, int ms);
/* One more purchase of sentinel, waited for: the events of purchases that ended before it
 * have all been streamed. */
void stream_sync(stream *s, shop_client *c, const json_t *sentinel);
/* Checks the exact statuses streamed for a purchase ("STEP STATUS; ..."). */
void assert_sequence(stream *s, const json_t *id, const char *want);
#define SEQ_SUCCESS                                                                                \
  "UPDATE_PRODUCT_INVENTORY STATUS_EXECUTE; UPDATE_PRODUCT_INVENTORY STATUS_SUCCESS; "             \
  "CREATE_ORDER STATUS_EXECUTE; CREATE_ORDER STATUS_SUCCESS; "                                     \
  "CREATE_PAYMENT STATUS_EXECUTE; CREATE_PAYMENT STATUS_SUCCESS"
#define SEQ_NO_STOCK                                                                               \
  "UPDATE_PRODUCT_INVENTORY STATUS_EXECUTE; UPDATE_PRODUCT_INVENTORY STATUS_FAILED"
#define SEQ_REFUSED                                                                                \
  "UPDATE_PRODUCT_INVENTORY STATUS_EXECUTE; UPDATE_PRODUCT_INVENTORY STATUS_SUCCESS; "             \
  "CREATE_ORDER STATUS_EXECUTE; CREATE_ORDER STATUS_SUCCESS; "                                     \
  "CREATE_PAYMENT STATUS_EXECUTE; CREATE_PAYMENT STATUS_FAILED; "                                  \
  "CREATE_ORDER STATUS_ROLLBACKED; UPDATE_PRODUCT_INVENTORY STATUS_ROLLBACKED"

/* ---- metrics ---- */
/* GETs path (Prometheus text) and checks what every process serves (shop_up{service}, HTTP
 * answers) and, when node is not NULL, that node's families: sagas by state, the step-latency
 * histogram (cumulative buckets ending at +Inf = _count), outbox depth, counters. */
void e2e_check_metrics(shop_client *c, const char *path, const char *service, const char *node);
/* Reads libsaga_sagas{node,state} from path into n[saga_state] (n[0] = 0). */
void e2e_sagas_by_state(shop_client *c, const char *path, const char *node, int64_t n[6]);

/* ---- the tests (cmocka) ---- */
void test_signup_login(void **state);
void test_refresh(void **state);
void test_tokens(void **state);
void test_account_info(void **state);
void test_products(void **state);
void test_body_limits(void **state);
void test_purchase_validation(void **state);
void test_unknown_order_payment(void **state);
void test_purchase_outcomes(void **state);
void test_owner_only(void **state);
void test_idempotent_purchase(void **state);
void test_concurrent_purchases(void **state);

#endif
