/*
 * The example shop (docs/shop.md is the specification): shared declarations of its
 * services. Each service owns its SQLite database; product, order, payment and orchestrator
 * are libsaga nodes; purchase is a node that only starts and watches sagas; account is plain.
 *
 * Threading: everything runs on one libuv loop per process. The HTTP server (libmicrohttpd)
 * is driven from that loop (http.c), so route handlers may call libsaga directly.
 */
#ifndef SHOP_H
#define SHOP_H

#include <jansson.h>
#include <stdint.h>
#include <uv.h>

#include <saga.h>

/* ---- HTTP (http.c) ---------------------------------------------------------------------- */

typedef struct shop_http shop_http;
typedef struct shop_req shop_req;
typedef struct shop_sse shop_sse;

/* A route handler. It answers with one shop_reply_* call, now or later (the connection
 * waits; answer exactly once). */
typedef void (*shop_handler)(shop_req *r, void *arg);

#define SHOP_MAX_BODY (64 * 1024) /* larger request bodies get 413 */

/* Serves HTTP on 127.0.0.1:port (0 = any free port; see shop_http_port) from loop. */
int shop_http_start(shop_http **out, uv_loop_t *loop, const char *bind_addr, int port);
int shop_http_port(const shop_http *h);
/* How many answers with this status code (100..599) were given so far (for /metrics). */
#define SHOP_HTTP_CODES 500
uint64_t shop_http_answered(const shop_http *h, int status);
/* Stops serving; open SSE streams are closed (their on_close runs). Frees h. */
void shop_http_stop(shop_http *h);
/* Hands a connected Unix-domain stream socket to the server as if it had accepted it (the
 * fuzz target feeds requests through a socketpair). The server owns fd from then on. 0, or -1
 * (fd closed). */
int shop_http_accept(shop_http *h, int fd);

/* Adds a route. pattern is a path whose segments may be "{}" (one segment, read back with
 * shop_req_param). Routes are matched in the order added; no match gives 404, a path that
 * matches with another method 405. */
int shop_http_route(shop_http *h, const char *method, const char *pattern, shop_handler fn,
                    void *arg);

const char *shop_req_method(const shop_req *r);
const char *shop_req_path(const shop_req *r);
/* The i-th "{}" segment of the matched pattern (0-based), or NULL. */
const char *shop_req_param(const shop_req *r, int i);
/* A query-string value, or NULL. */
const char *shop_req_query(const shop_req *r, const char *key);
/* A request header, or NULL. */
const char *shop_req_header(const shop_req *r, const char *name);
/* The body parsed as a JSON object, borrowed (NULL when empty or not an object: answer 400). */
json_t *shop_req_json(shop_req *r);
/* The raw body and its length. */
const char *shop_req_body(const shop_req *r, size_t *len);

/* Answers with a JSON body (taken, may be NULL for no body). */
void shop_reply_json(shop_req *r, int status, json_t *body);
/* Answers {"msg": msg}. */
void shop_reply_error(shop_req *r, int status, const char *msg);
/* Answers with a text body (copied). */
void shop_reply_text(shop_req *r, int status, const char *content_type, const char *body);

/* Answers 200 text/event-stream and keeps the connection open. on_close runs once when the
 * client goes away or the server stops; the stream must not be used after it. */
shop_sse *shop_reply_sse(shop_req *r, void (*on_close)(shop_sse *s, void *arg), void *arg);
/* Sends one event ("event: <event>\ndata: <data>\n\n"). 0, or -1 if the stream is closed. */
int shop_sse_send(shop_sse *s, const char *event, const char *data);

/* ---- the process context ---------------------------------------------------------------- */

typedef struct shop_metrics shop_metrics;

typedef struct shop_ctx {
  uv_loop_t *loop;
  shop_http *http;
  const char *data_dir;      /* SQLite files live here */
  const char *jwt_secret;    /* HS256 key shared by every service */
  int64_t payment_limit;     /* payments above this amount are refused (the demo's rule) */
  /* Embedded mode: the product service's database, so that the purchase service can check
   * products exist (distributed: NULL, and product_url is used). */
  const char *product_db;
  const char *product_url;   /* distributed: base URL of the product service */
  const char *service;       /* "shop" (embedded) or the one service this process runs */
  shop_metrics *metrics;     /* /healthz and /metrics (metrics.c) */
} shop_ctx;

/* Services: each registers its routes on c->http and, for nodes, its handlers and
 * definitions on node (before saga_node_start). */
int shop_account_init(shop_ctx *c);
int shop_product_init(shop_ctx *c, saga_node *node);
int shop_order_init(shop_ctx *c, saga_node *node);
int shop_payment_init(shop_ctx *c, saga_node *node);
int shop_orchestrator_init(shop_ctx *c, saga_node *node);
int shop_purchase_init(shop_ctx *c, saga_node *node);
/* Releases what the services keep (account's database, SSE subscribers). */
void shop_services_close(shop_ctx *c);
void shop_account_close(void);          /* account.c: its database and statements */
void shop_purchase_close(shop_ctx *c);  /* purchase.c: streams, pending starts, lookups */

/* Brings a service's own tables to version n in its node's database: applies migrations[v]
 * .. migrations[n-1] (SQL scripts; migrations[k] takes version k to k + 1), each in one
 * transaction with the version it reaches, recorded in the table shop_schema (PRAGMA
 * user_version belongs to libsaga's tables in the same file). A database made before versions
 * were recorded is at version 0 and holds the tables of version 1 (migration 0 creates them
 * with IF NOT EXISTS). 0, or -1 with the reason on stderr. */
struct sqlite3;
int shop_schema_migrate(struct sqlite3 *db, const char *service, const char *const *migrations,
                        int n);

/* A store error inside a handler, logged as "[service] what: sqlite's message": SAGA_ENOMEM
 * or SAGA_EIO (the transaction rolls back and the command is delivered again later). */
int shop_store_error(struct sqlite3 *db, const char *service, const char *what);

/* Who made the business record of purchase_id that `sql` selects as (saga_id, step) with ?1
 * bound to purchase_id: 1 the saga and step of cmd, 0 no record, 2 another saga, < 0 a store
 * error (logged for service). Handlers key their effects on the saga (docs/shop.md). */
int shop_record_owner(struct sqlite3 *db, const char *service, const char *sql,
                      const saga_msg *cmd, const char *purchase_id);

/* A purchase id as JSON: a number when it is a canonical decimal that fits in int64 (the
 * reference system's clients expect 64-bit integer ids), else a string. */
json_t *shop_purchase_id_json(const char *id);

/* ---- health and metrics (metrics.c): one implementation for every service ---------------- */

/* A growing text buffer. oom is set (and nothing more written) when memory ran out. */
typedef struct shop_text {
  char *p;
  size_t len, cap;
  int oom;
} shop_text;

void shop_text_printf(shop_text *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* One metric with its HELP and TYPE lines: "<name><labels> <v>" (labels "" or "{k=\"v\"}"). */
void shop_text_metric(shop_text *b, const char *name, const char *type, const char *help,
                      const char *labels, uint64_t v);

/* A service's own metrics, appended to /metrics after the common ones. */
typedef void (*shop_metrics_fn)(shop_text *b, void *arg);

/* Routes GET /healthz and GET /metrics on c->http (c->service names the process in them).
 * 0 or -1. Every process calls it once, before the services' init. */
int shop_metrics_init(shop_ctx *c);
/* Adds a node to both (its name is the "node" label); borrowed until shop_metrics_close. */
int shop_metrics_add_node(shop_ctx *c, const char *name, saga_node *node);
/* Adds a service's own writer (called on the loop at each scrape). */
int shop_metrics_add(shop_ctx *c, shop_metrics_fn fn, void *arg);
/* Frees what shop_metrics_init made (after shop_http_stop). */
void shop_metrics_close(shop_ctx *c);

/* ---- span export (otlp.c): OTLP over HTTP/JSON, from a thread of its own ------------------ */

typedef struct shop_otlp shop_otlp;
/* Starts an exporter to the collector at base_url (spans go to <base_url>/v1/traces) with
 * resource attribute service.name = service. 0, or -1. */
int shop_otlp_new(shop_otlp **out, const char *base_url, const char *service);
/* Sets cfg's span hook to queue the spans of node `node` (before saga_node_open). 0 or -1. */
int shop_otlp_attach(shop_otlp *o, const char *node, saga_node_config *cfg);
/* /metrics: exported, dropped, failed spans (a shop_metrics_fn; arg = the exporter). */
void shop_otlp_metrics(shop_text *b, void *arg);
/* Sends what is queued, stops the thread, frees o (after every attached node closed). */
void shop_otlp_close(shop_otlp *o);

/* ---- auth (auth.c): JWT HS256 with libjwt, argon2id with libsodium --------------------- */

/* Checks "Authorization: Bearer <access token>": on success sets *customer_id and returns 0;
 * otherwise answers 401 itself and returns -1. */
int shop_auth_customer(const shop_ctx *c, shop_req *r, int64_t *customer_id);

/* ---- parsing without a server (the shop's own checks, also driven by tests/fuzz) ---------- */

/* The checks behind shop_auth_customer() and shop_auth_refresh(). shop_auth_bearer: an
 * Authorization header value that must carry a valid access token; shop_auth_verify: a token
 * of kind "access" or "refresh". Both return 0 and *customer_id, or -1 with *why saying what
 * was wrong (a static string, the text of the 401). */
int shop_auth_bearer(const shop_ctx *c, const char *authorization, int64_t *customer_id,
                     const char **why);
int shop_auth_verify(const shop_ctx *c, const char *token, const char *typ, int64_t *customer_id,
                     const char **why);
/* A request body parsed as shop_req_json() does: a new reference to a JSON object, or NULL
 * when the body is empty, not JSON, or JSON but not an object. */
json_t *shop_json_object(const char *body, size_t len);
/* The checks of a form's JSON body without a server or database: 0 when a route would accept
 * the body, or -1 with the message of its 400 in msg (msglen bytes). */
int shop_account_check(const char *form, json_t *body, char *msg, size_t msglen);
/* Issues a token pair for a customer into a new JSON object {access_token, refresh_token}. */
json_t *shop_auth_issue(const shop_ctx *c, int64_t customer_id);
/* Verifies a refresh token; 0 and *customer_id, or -1. */
int shop_auth_refresh(const shop_ctx *c, const char *token, int64_t *customer_id);

/* ---- the saga ----------------------------------------------------------------------------- */

/* Channels and commands of the purchase saga. */
#define SHOP_CH_PRODUCT "product"
#define SHOP_CH_ORDER "order"
#define SHOP_CH_PAYMENT "payment"
#define SHOP_CH_ORCHESTRATOR "orchestrator" /* the orchestrator node: the participants' replies */
/* Purchase requests to the orchestrator, from the purchase node: a channel of their own, so that
 * an access list can let the purchase node send requests without letting it reply for a
 * participant (and the participants reply without sending requests). */
#define SHOP_CH_REQUESTS "orchestrator.requests"
#define SHOP_EVENTS "purchase.events"   /* the orchestrator publishes transitions here */

/* Saga data keys: purchase_id, customer_id, items (JSON [{product_id, amount}]),
 * currency; added by replies: detail (JSON of the reserved products: [{product_id, name,
 * description, brand_name, price, amount}]), total (integer). */

#endif
