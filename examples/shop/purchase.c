/*
 * The purchase service: accepts purchases and streams their results (docs/shop.md).
 *
 * It owns nothing durable but its libsaga node (outbox, inbox, and the sagas below):
 *
 *  - POST /api/purchase validates the body and starts a one-step saga "purchase-request"
 *    whose only step, REQUEST, sends "orchestrator.purchase" to the orchestrator. The step
 *    is RETRIABLE: it is sent again until the orchestrator took it (the orchestrator starts
 *    the purchase saga in that command's transaction, idempotently by purchase id). The HTTP
 *    answer (201 {purchase_id}) is given after the request saga committed, so an accepted
 *    purchase is never lost, whichever service is down at the time.
 *    The purchase id is the idempotency key: a client may send its own "purchase_id" and
 *    POST again after a timeout; the same id is answered and nothing is bought twice.
 *
 *  - GET /api/purchase/result is a Server-Sent Events stream of the caller's purchases. The
 *    orchestrator publishes every transition of its sagas to SHOP_EVENTS (at least once, in
 *    order per saga); this node subscribes to them and maps them to the streamed statuses.
 *
 *  - its own counters on GET /metrics (metrics.c serves /metrics and /healthz).
 *
 * Choices made here, beyond what docs/shop.md specifies:
 *  - purchase ids: generated ids are random integers in 1..2^53-1 (exact in JavaScript too),
 *    answered as JSON numbers like the reference system's (its clients decode purchase_id
 *    as an unsigned integer). A client-chosen "purchase_id" is a positive JSON integer or a
 *    string of 1..64 characters [A-Za-z0-9._:-]. Everywhere (the 201 answer, the stream,
 *    and order.c / payment.c) an id that is a canonical decimal fitting in int64 is written
 *    as a JSON number, any other as a string.
 *    An "Idempotency-Key" header is taken as the purchase id too (equal to purchase_id
 *    when both are sent, else 400). A purchase id already used by another customer, or by
 *    the same customer for another body, is refused with 409: the key names one purchase.
 *  - duplicate product ids in purchase_items are merged (their amounts added).
 *  - amounts are integers 1..1,000,000 per product (after merging); 1..100 items.
 *  - fields other than purchase_items, payment and purchase_id are ignored, like the
 *    reference system's JSON binding does.
 *  - the stream sends, per step, STATUS_EXECUTE once (attempts resent after a timeout are
 *    not repeated), STATUS_SUCCESS, STATUS_FAILED (a refusal, or a step that timed out for
 *    good and is being compensated because its outcome is unknown), STATUS_ROLLBACKED when
 *    its compensation was confirmed, STATUS_ROLLBACK_FAIL when the engine gave up
 *    compensating it. Saga-level transitions (completed, compensated, failed) add no
 *    message, as in the reference system: the step statuses tell them. A purchase ended
 *    well at CREATE_PAYMENT STATUS_SUCCESS; it ended badly at UPDATE_PRODUCT_INVENTORY
 *    STATUS_FAILED (nothing to undo) or STATUS_ROLLBACKED (the last compensation), or at the
 *    first STATUS_ROLLBACK_FAIL (an operator must finish it). A failed attempt of a
 *    compensation that is retried is not streamed.
 *  - the stream is live, as in the reference system: events of customers with no open
 *    stream are dropped, and a stream does not replay what happened before it opened.
 *  - timestamp is the transition's time in milliseconds since the epoch.
 */
#include <curl/curl.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "shop.h"

/* Declared here, called by shop_services_close() in services.c (shop.h is shared). */
void shop_purchase_close(shop_ctx *c);

#define MAX_ITEMS 100
#define MAX_AMOUNT 1000000
#define MAX_PURCHASE_ID 64
#define MAX_JSON_INT ((int64_t)9007199254740991) /* 2^53 - 1 */

/* Streamed statuses (docs/shop.md). The reference system spells the first "STATUS_EXUCUTE". */
#define STATUS_EXECUTE "STATUS_EXECUTE"
#define STATUS_SUCCESS "STATUS_SUCCESS"
#define STATUS_FAILED "STATUS_FAILED"
#define STATUS_ROLLBACKED "STATUS_ROLLBACKED"
#define STATUS_ROLLBACK_FAIL "STATUS_ROLLBACK_FAIL"

enum { ST_NONE, ST_EXECUTE, ST_SUCCESS, ST_FAILED, ST_ROLLBACKED, ST_ROLLBACK_FAIL };
static const char *const status_names[] = {
    "", STATUS_EXECUTE, STATUS_SUCCESS, STATUS_FAILED, STATUS_ROLLBACKED, STATUS_ROLLBACK_FAIL};

/* ---- state ---------------------------------------------------------------------------- */

/* A POST waiting for its saga_start() callback. r is NULL once the HTTP side is gone. */
typedef struct pending {
  shop_req *r;
  int64_t customer_id;
  char purchase_id[MAX_PURCHASE_ID + 1];
  int generated; /* the id was generated here: on a collision, draw another */
  int tries;
  char *items; /* JSON text, as stored in the saga data */
  char currency[4];
  /* The caller's W3C traceparent header when well-formed ("" none): the purchase's trace. */
  char traceparent[SAGA_TRACEPARENT_LEN + 1];
  struct pending *prev, *next;
} pending;

/* An open result stream. */
typedef struct stream_sub {
  int64_t customer_id;
  shop_sse *sse;
  struct stream_sub *prev, *next; /* in its bucket */
} stream_sub;

#define SUB_BUCKETS 256

/* Per saga memory of the events already seen (duplicates are dropped) and of what each
 * step last showed. A bounded LRU: the least recently active saga is forgotten first. */
#define SEEN_KEYS 32
#define SEEN_STEPS 16
#define SEEN_BUCKETS 1024
#define SEEN_MAX 4096

typedef struct ev_key {
  uint64_t at_ms;
  uint32_t attempt;
  int16_t step;
  uint8_t type;
  uint8_t used;
} ev_key;

typedef struct seen_saga {
  char id[48];
  ev_key keys[SEEN_KEYS];
  unsigned nkey; /* next slot of the ring */
  uint8_t last[SEEN_STEPS];
  struct seen_saga *hnext;         /* hash chain */
  struct seen_saga *lprev, *lnext; /* LRU list, most recent first */
} seen_saga;

typedef struct purchase_svc {
  shop_ctx *c;
  saga_node *node;
  sqlite3 *products; /* read-only connection to the product database (embedded) */
  sqlite3_stmt *product_exists;
  pending *pending;
  size_t npending;
  stream_sub *subs[SUB_BUCKETS];
  size_t nsubs;
  seen_saga *seen[SEEN_BUCKETS];
  seen_saga *lru_head, *lru_tail;
  size_t nseen;
  /* counters for /metrics */
  uint64_t req_created, req_existing, req_bad, req_not_found, req_conflict, req_error,
      req_unavailable;
  uint64_t ev_received, ev_duplicate, ev_streamed, streams_opened;
  uv_timer_t heartbeat;
  int heartbeat_open;
  int closed; /* shop_purchase_close() ran: freed once nothing refers to it */
} purchase_svc;

static purchase_svc *svc; /* one purchase service per process */

/* After shop_purchase_close(): frees the service once nothing refers to it any more. */
static void maybe_free(purchase_svc *s) {
  if (s->closed && !s->heartbeat_open && s->npending == 0) {
    if (svc == s) svc = NULL;
    free(s);
  }
}

/* ---- helpers -------------------------------------------------------------------------- */

static uint64_t random_u64(void) {
  uint64_t v = 0;
  if (getrandom(&v, sizeof v, 0) != (ssize_t)sizeof v) {
    /* getrandom cannot fail for 8 bytes once the pool is initialised; mix time anyway */
    v ^= uv_hrtime() * 0x9E3779B97F4A7C15ull;
  }
  return v;
}

/* 1..2^53-1, as decimal text. */
static void generate_purchase_id(char *out, size_t len) {
  uint64_t v = random_u64() & (uint64_t)MAX_JSON_INT;
  if (v == 0) v = 1;
  snprintf(out, len, "%" PRIu64, v);
}

static int valid_id_char(char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
         ch == '.' || ch == '_' || ch == ':' || ch == '-';
}

/* A client-chosen purchase id: 1..MAX_PURCHASE_ID characters [A-Za-z0-9._:-]. */
static int valid_purchase_id(const char *s, size_t len) {
  int ok = len >= 1 && len <= MAX_PURCHASE_ID && strlen(s) == len;
  for (size_t i = 0; ok && i < len; i++) ok = valid_id_char(s[i]);
  return ok;
}

static int item_cmp(const void *a, const void *b) {
  const int64_t *x = a, *y = b;
  return x[0] < y[0] ? -1 : x[0] > y[0];
}

/* ---- POST /api/purchase --------------------------------------------------------------- */

/* Validates the body. On success fills the pending fields (items as JSON text) and returns
 * 0; otherwise writes a message and returns the HTTP status to answer. */
static int parse_purchase(json_t *body, const char *idem_header, pending *p, int64_t (*ids)[2],
                          size_t *nids, char *msg, size_t msglen) {
  if (body == NULL) {
    snprintf(msg, msglen, "invalid body: a JSON object is expected");
    return 400;
  }
  json_t *items = json_object_get(body, "purchase_items");
  if (!json_is_array(items)) {
    snprintf(msg, msglen, "purchase_items must be an array");
    return 400;
  }
  size_t n = json_array_size(items);
  if (n == 0 || n > MAX_ITEMS) {
    snprintf(msg, msglen, "purchase_items must hold 1 to %d items", MAX_ITEMS);
    return 400;
  }
  for (size_t i = 0; i < n; i++) {
    json_t *it = json_array_get(items, i);
    json_t *pid = json_object_get(it, "product_id"), *amt = json_object_get(it, "amount");
    if (!json_is_object(it) || !json_is_integer(pid) || !json_is_integer(amt)) {
      snprintf(msg, msglen, "purchase_items[%zu]: product_id and amount must be integers", i);
      return 400;
    }
    json_int_t id = json_integer_value(pid), a = json_integer_value(amt);
    if (id < 1) {
      snprintf(msg, msglen, "purchase_items[%zu]: product_id must be a positive integer", i);
      return 400;
    }
    if (a < 1 || a > MAX_AMOUNT) {
      snprintf(msg, msglen, "purchase_items[%zu]: amount must be 1 to %d", i, MAX_AMOUNT);
      return 400;
    }
    ids[i][0] = (int64_t)id;
    ids[i][1] = (int64_t)a;
  }
  /* Duplicate product ids are merged. */
  qsort(ids, n, sizeof ids[0], item_cmp);
  size_t m = 0;
  for (size_t i = 0; i < n; i++) {
    if (m > 0 && ids[m - 1][0] == ids[i][0]) {
      ids[m - 1][1] += ids[i][1];
      if (ids[m - 1][1] > MAX_AMOUNT) {
        snprintf(msg, msglen, "product %" PRId64 ": amount must be 1 to %d in total", ids[i][0],
                 MAX_AMOUNT);
        return 400;
      }
    } else {
      ids[m][0] = ids[i][0];
      ids[m][1] = ids[i][1];
      m++;
    }
  }
  *nids = m;

  json_t *payment = json_object_get(body, "payment");
  json_t *cc = json_object_get(payment, "currency_code");
  const char *cur = json_string_value(cc);
  if (!json_is_object(payment) || cur == NULL ||
      (strcmp(cur, "NT") != 0 && strcmp(cur, "US") != 0)) {
    snprintf(msg, msglen, "payment.currency_code must be \"NT\" or \"US\"");
    return 400;
  }
  snprintf(p->currency, sizeof p->currency, "%s", cur);

  /* The idempotency key: the body's purchase_id, or an Idempotency-Key header (both: they
   * must be equal). */
  json_t *key = json_object_get(body, "purchase_id");
  if (json_is_null(key)) key = NULL;
  if (key != NULL && json_is_integer(key)) {
    json_int_t v = json_integer_value(key);
    if (v < 1) {
      snprintf(msg, msglen, "purchase_id must be a positive integer or a string");
      return 400;
    }
    snprintf(p->purchase_id, sizeof p->purchase_id, "%" PRId64, (int64_t)v);
  } else if (key != NULL && json_is_string(key)) {
    if (!valid_purchase_id(json_string_value(key), json_string_length(key))) {
      snprintf(msg, msglen, "purchase_id must be 1 to %d characters of A-Z a-z 0-9 . _ : -",
               MAX_PURCHASE_ID);
      return 400;
    }
    snprintf(p->purchase_id, sizeof p->purchase_id, "%s", json_string_value(key));
  } else if (key != NULL) {
    snprintf(msg, msglen, "purchase_id must be a string or an integer");
    return 400;
  }
  if (idem_header != NULL) {
    if (!valid_purchase_id(idem_header, strlen(idem_header))) {
      snprintf(msg, msglen, "Idempotency-Key must be 1 to %d characters of A-Z a-z 0-9 . _ : -",
               MAX_PURCHASE_ID);
      return 400;
    }
    if (key != NULL && strcmp(idem_header, p->purchase_id) != 0) {
      snprintf(msg, msglen, "Idempotency-Key and purchase_id differ");
      return 400;
    }
    snprintf(p->purchase_id, sizeof p->purchase_id, "%s", idem_header);
  } else if (key == NULL) {
    generate_purchase_id(p->purchase_id, sizeof p->purchase_id);
    p->generated = 1;
  }

  json_t *arr = json_array();
  for (size_t i = 0; arr != NULL && i < m; i++)
    json_array_append_new(arr, json_pack("{s:I,s:I}", "product_id", (json_int_t)ids[i][0], "amount",
                                         (json_int_t)ids[i][1]));
  p->items = arr ? json_dumps(arr, JSON_COMPACT) : NULL;
  json_decref(arr);
  if (p->items == NULL) {
    snprintf(msg, msglen, "out of memory");
    return 500;
  }
  return 0;
}

/*
 * Embedded mode: the product service's SQLite file, through a read-only connection of our
 * own (opened once; WAL readers never wait for the writer). Returns 0 (all exist), 404 with
 * msg, or 500. Distributed mode: check_remote() below asks the product service instead.
 */
static int check_products(purchase_svc *s, int64_t (*ids)[2], size_t n, char *msg, size_t msglen) {
  if (s->c->product_db == NULL) return 0;
  if (s->products == NULL) {
    int rc = sqlite3_open_v2(s->c->product_db, &s->products, SQLITE_OPEN_READONLY, NULL);
    if (rc != SQLITE_OK) {
      snprintf(msg, msglen, "product catalogue unavailable: %s",
               s->products ? sqlite3_errmsg(s->products) : sqlite3_errstr(rc));
      sqlite3_close(s->products);
      s->products = NULL;
      return 500;
    }
    sqlite3_busy_timeout(s->products, 200);
  }
  if (s->product_exists == NULL &&
      sqlite3_prepare_v2(s->products, "SELECT 1 FROM products WHERE id = ?", -1, &s->product_exists,
                         NULL) != SQLITE_OK) {
    snprintf(msg, msglen, "product catalogue unavailable: %s", sqlite3_errmsg(s->products));
    s->product_exists = NULL;
    return 500;
  }
  for (size_t i = 0; i < n; i++) {
    sqlite3_bind_int64(s->product_exists, 1, ids[i][0]);
    int rc = sqlite3_step(s->product_exists);
    sqlite3_reset(s->product_exists);
    if (rc == SQLITE_DONE) {
      snprintf(msg, msglen, "product %" PRId64 " not found", ids[i][0]);
      return 404;
    }
    if (rc != SQLITE_ROW) {
      snprintf(msg, msglen, "product catalogue unavailable: %s", sqlite3_errmsg(s->products));
      return 500;
    }
  }
  return 0;
}

static void pending_free(pending *p) {
  if (p == NULL) return;
  free(p->items);
  free(p);
}

static void pending_unlink(purchase_svc *s, pending *p) {
  if (p->prev)
    p->prev->next = p->next;
  else
    s->pending = p->next;
  if (p->next) p->next->prev = p->prev;
  p->prev = p->next = NULL;
  s->npending--;
}

static void pending_link(purchase_svc *s, pending *p) {
  p->prev = NULL;
  p->next = s->pending;
  if (s->pending) s->pending->prev = p;
  s->pending = p;
  s->npending++;
}

static void started(saga_node *node, int status, const char *saga_id, int existed, void *arg);

/* Starts (or finds, by the purchase id) the request saga for p. 0, or answers and returns -1
 * after freeing p. */
static int start_request(purchase_svc *s, pending *p) {
  saga_data *d = NULL;
  int rc = saga_data_new(&d, NULL);
  if (rc == SAGA_OK) rc = saga_data_set_str(d, "purchase_id", p->purchase_id);
  if (rc == SAGA_OK) rc = saga_data_set_i64(d, "customer_id", p->customer_id);
  if (rc == SAGA_OK) rc = saga_data_set_str(d, "items", p->items);
  if (rc == SAGA_OK) rc = saga_data_set_str(d, "currency", p->currency);
  if (rc == SAGA_OK)
    rc = saga_start_traced(s->node, "purchase-request", d, p->purchase_id,
                           p->traceparent[0] ? p->traceparent : NULL, started, p);
  saga_data_free(d);
  if (rc != SAGA_OK) {
    char msg[300];
    snprintf(msg, sizeof msg, "could not start the purchase: %s", saga_strerror(rc));
    s->req_error++;
    shop_reply_error(p->r, rc == SAGA_ESTATE ? 503 : 500, msg);
    pending_free(p);
    return -1;
  }
  pending_link(s, p);
  return 0;
}

/* An existing request saga with this key: the same purchase only if customer and body match. */
static int same_purchase(saga_node *node, const char *saga_id, const pending *p) {
  saga_info *info = NULL;
  if (saga_get(node, saga_id, &info) != SAGA_OK) return -1;
  int64_t cust = 0;
  const char *items = saga_data_get_str(info->data, "items");
  const char *cur = saga_data_get_str(info->data, "currency");
  int same = saga_data_get_i64(info->data, "customer_id", &cust) == SAGA_OK &&
             cust == p->customer_id && items != NULL && strcmp(items, p->items) == 0 &&
             cur != NULL && strcmp(cur, p->currency) == 0;
  saga_info_free(info);
  return same;
}

/* saga_start's completion: the request saga is durable (or existed already). */
static void started(saga_node *node, int status, const char *saga_id, int existed, void *arg) {
  pending *p = arg;
  purchase_svc *s = svc;
  if (s != NULL) pending_unlink(s, p);
  if (p->r == NULL || s == NULL) { /* the HTTP side is gone (shutdown) */
    pending_free(p);
    if (s != NULL) maybe_free(s);
    return;
  }
  if (status != SAGA_OK) {
    char msg[300];
    snprintf(msg, sizeof msg, "could not start the purchase: %s", saga_strerror(status));
    s->req_error++;
    shop_reply_error(p->r, status == SAGA_ECLOSED ? 503 : 500, msg);
    pending_free(p);
    return;
  }
  if (existed) {
    int same = same_purchase(node, saga_id, p);
    if (same < 0) {
      s->req_error++;
      shop_reply_error(p->r, 500, "could not read the purchase");
      pending_free(p);
      return;
    }
    if (!same) {
      if (p->generated && ++p->tries < 5) { /* a collision of random ids: draw again */
        generate_purchase_id(p->purchase_id, sizeof p->purchase_id);
        start_request(s, p);
        return;
      }
      s->req_conflict++;
      shop_reply_error(p->r, 409, "purchase_id already used for another purchase");
      pending_free(p);
      return;
    }
    s->req_existing++;
  } else {
    s->req_created++;
  }
  shop_reply_json(p->r, 201,
                  json_pack("{s:o}", "purchase_id", shop_purchase_id_json(p->purchase_id)));
  pending_free(p);
}

static void refuse(purchase_svc *s, shop_req *r, int code, const char *msg) {
  if (code == 400)
    s->req_bad++;
  else if (code == 404)
    s->req_not_found++;
  else if (code == 503)
    s->req_unavailable++;
  else
    s->req_error++;
  shop_reply_error(r, code, msg);
}

/*
 * Distributed mode: the products are checked against the product service's HTTP API
 * (GET <product_url>/api/product/{id}: 200 exists, 404 unknown), with a libcurl easy handle
 * on libuv's thread pool, so the loop never waits on the network. The POST stays parked (its
 * pending record is linked, so a shutdown meanwhile is noticed) until the check is done. The
 * product service down or answering anything else gives 503 {"msg"}: the purchase is not
 * accepted, and the client may retry it (with its purchase_id, safely).
 */
#define CHECK_CONNECT_MS 2000
#define CHECK_TOTAL_MS 5000

typedef struct remote_check {
  uv_work_t work;
  purchase_svc *s;
  pending *p;
  int64_t (*ids)[2];
  size_t n;
  char *base; /* product_url, copied for the worker thread */
  int code;   /* 0, or the HTTP status to answer */
  char msg[300];
} remote_check;

static size_t discard_body(char *ptr, size_t size, size_t nmemb, void *arg) {
  (void)ptr, (void)arg;
  return size * nmemb;
}

/* On a thread of the pool: touches only k. */
static void check_work(uv_work_t *w) {
  remote_check *k = w->data;
  CURL *h = curl_easy_init();
  if (h == NULL) {
    k->code = 500;
    snprintf(k->msg, sizeof k->msg, "out of memory");
    return;
  }
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)CHECK_CONNECT_MS);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)CHECK_TOTAL_MS);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard_body);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  for (size_t i = 0; i < k->n && k->code == 0; i++) {
    char url[1024];
    snprintf(url, sizeof url, "%s/api/product/%" PRId64, k->base, k->ids[i][0]);
    curl_easy_setopt(h, CURLOPT_URL, url);
    CURLcode rc = curl_easy_perform(h);
    long status = 0;
    if (rc == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    if (rc != CURLE_OK) {
      k->code = 503;
      snprintf(k->msg, sizeof k->msg, "product service unavailable: %s", curl_easy_strerror(rc));
    } else if (status == 404) {
      k->code = 404;
      snprintf(k->msg, sizeof k->msg, "product %" PRId64 " not found", k->ids[i][0]);
    } else if (status != 200) {
      k->code = 503;
      snprintf(k->msg, sizeof k->msg, "product service unavailable: it answered %ld", status);
    }
  }
  curl_easy_cleanup(h);
}

/* Back on the loop. */
static void check_done(uv_work_t *w, int status) {
  remote_check *k = w->data;
  purchase_svc *s = k->s;
  pending *p = k->p;
  pending_unlink(s, p);
  if (p->r == NULL || s->closed) { /* the HTTP side is gone (shutdown) */
    pending_free(p);
    maybe_free(s);
  } else if (status != 0 || k->code != 0) {
    refuse(s, p->r, status != 0 ? 503 : k->code, status != 0 ? "product check cancelled" : k->msg);
    pending_free(p);
  } else {
    start_request(s, p); /* answers on failure */
  }
  free(k->ids);
  free(k->base);
  free(k);
}

/* Takes ids. Answers itself on failure. */
static void check_remote(purchase_svc *s, pending *p, int64_t (*ids)[2], size_t n) {
  remote_check *k = calloc(1, sizeof *k);
  char *base = strdup(s->c->product_url);
  if (k == NULL || base == NULL) {
    free(k);
    free(base);
    free(ids);
    refuse(s, p->r, 500, "out of memory");
    pending_free(p);
    return;
  }
  k->s = s;
  k->p = p;
  k->ids = ids;
  k->n = n;
  k->base = base;
  k->work.data = k;
  pending_link(s, p);
  int rc = uv_queue_work(s->c->loop, &k->work, check_work, check_done);
  if (rc != 0) {
    pending_unlink(s, p);
    refuse(s, p->r, 500, uv_strerror(rc));
    pending_free(p);
    free(k->ids);
    free(k->base);
    free(k);
  }
}

static void post_purchase(shop_req *r, void *arg) {
  purchase_svc *s = arg;
  int64_t customer;
  if (shop_auth_customer(s->c, r, &customer) != 0) return; /* answered 401 */
  pending *p = calloc(1, sizeof *p);
  int64_t(*ids)[2] = calloc(MAX_ITEMS, sizeof *ids);
  if (p == NULL || ids == NULL) {
    free(p);
    free(ids);
    s->req_error++;
    shop_reply_error(r, 500, "out of memory");
    return;
  }
  p->r = r;
  p->customer_id = customer;
  /* A caller's trace context: used when well-formed, else ignored (W3C: a new trace). */
  const char *tp = shop_req_header(r, "traceparent");
  if (tp != NULL && saga_traceparent_check(tp, NULL) == SAGA_OK)
    snprintf(p->traceparent, sizeof p->traceparent, "%s", tp);
  char msg[300];
  size_t n = 0;
  int code = parse_purchase(shop_req_json(r), shop_req_header(r, "Idempotency-Key"), p, ids, &n,
                            msg, sizeof msg);
  if (code == 0 && s->c->product_db == NULL && s->c->product_url != NULL) {
    check_remote(s, p, ids, n); /* takes ids; answers or starts the request when done */
    return;
  }
  if (code == 0) code = check_products(s, ids, n, msg, sizeof msg);
  free(ids);
  if (code != 0) {
    refuse(s, r, code, msg);
    pending_free(p);
    return;
  }
  start_request(s, p); /* answers on failure */
}

/* ---- GET /api/purchase/result --------------------------------------------------------- */

static size_t sub_bucket(int64_t customer_id) {
  return (size_t)(((uint64_t)customer_id * 0x9E3779B97F4A7C15ull) >> 56) % SUB_BUCKETS;
}

static void stream_closed(shop_sse *sse, void *arg) {
  (void)sse;
  stream_sub *sub = arg;
  purchase_svc *s = svc;
  if (s != NULL) {
    size_t b = sub_bucket(sub->customer_id);
    if (sub->prev)
      sub->prev->next = sub->next;
    else
      s->subs[b] = sub->next;
    if (sub->next) sub->next->prev = sub->prev;
    s->nsubs--;
  }
  free(sub);
}

static void get_results(shop_req *r, void *arg) {
  purchase_svc *s = arg;
  int64_t customer;
  if (shop_auth_customer(s->c, r, &customer) != 0) return;
  stream_sub *sub = calloc(1, sizeof *sub);
  if (sub == NULL) {
    shop_reply_error(r, 500, "out of memory");
    return;
  }
  sub->customer_id = customer;
  sub->sse = shop_reply_sse(r, stream_closed, sub);
  if (sub->sse == NULL) { /* answered 500 */
    free(sub);
    return;
  }
  size_t b = sub_bucket(customer);
  sub->next = s->subs[b];
  if (sub->next) sub->next->prev = sub;
  s->subs[b] = sub;
  s->nsubs++;
  s->streams_opened++;
}

/*
 * Every HEARTBEAT_MS each open stream gets an SSE comment line. It keeps proxies from timing
 * the stream out, and it is how a stream whose client went away is noticed: a parked
 * (suspended) connection is not watched by libmicrohttpd, so without a write its on_close
 * would only run at the next event of that customer.
 */
#define HEARTBEAT_MS 15000

static void heartbeat(uv_timer_t *t) {
  purchase_svc *s = t->data;
  for (size_t b = 0; b < SUB_BUCKETS; b++)
    for (stream_sub *sub = s->subs[b]; sub != NULL; sub = sub->next)
      shop_sse_send(sub->sse, NULL, NULL);
}

static void heartbeat_closed(uv_handle_t *h) {
  purchase_svc *s = h->data;
  s->heartbeat_open = 0;
  maybe_free(s);
}

/* ---- the orchestrator's events -------------------------------------------------------- */

static size_t seen_bucket(const char *id) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *id; id++) h = (h ^ (unsigned char)*id) * 1099511628211ull;
  return (size_t)(h % SEEN_BUCKETS);
}

static void lru_unlink(purchase_svc *s, seen_saga *e) {
  if (e->lprev)
    e->lprev->lnext = e->lnext;
  else
    s->lru_head = e->lnext;
  if (e->lnext)
    e->lnext->lprev = e->lprev;
  else
    s->lru_tail = e->lprev;
  e->lprev = e->lnext = NULL;
}

static void lru_push(purchase_svc *s, seen_saga *e) {
  e->lnext = s->lru_head;
  if (s->lru_head) s->lru_head->lprev = e;
  s->lru_head = e;
  if (s->lru_tail == NULL) s->lru_tail = e;
}

static void seen_remove(purchase_svc *s, seen_saga *e) {
  seen_saga **pp = &s->seen[seen_bucket(e->id)];
  while (*pp != e) pp = &(*pp)->hnext;
  *pp = e->hnext;
  lru_unlink(s, e);
  s->nseen--;
  free(e);
}

/* The memory of saga id, created when absent (NULL when out of memory or the id is too
 * long for it: events then pass undeduplicated). */
static seen_saga *seen_get(purchase_svc *s, const char *id) {
  if (strlen(id) >= sizeof((seen_saga *)0)->id) return NULL;
  size_t b = seen_bucket(id);
  for (seen_saga *e = s->seen[b]; e != NULL; e = e->hnext) {
    if (strcmp(e->id, id) == 0) {
      lru_unlink(s, e);
      lru_push(s, e);
      return e;
    }
  }
  if (s->nseen >= SEEN_MAX) seen_remove(s, s->lru_tail);
  seen_saga *e = calloc(1, sizeof *e);
  if (e == NULL) return NULL;
  snprintf(e->id, sizeof e->id, "%s", id);
  e->hnext = s->seen[b];
  s->seen[b] = e;
  lru_push(s, e);
  s->nseen++;
  return e;
}

/* Records ev in e; nonzero when it was seen before (a redelivery). */
static int seen_before(seen_saga *e, const saga_event *ev) {
  for (unsigned i = 0; i < SEEN_KEYS; i++) {
    const ev_key *k = &e->keys[i];
    if (k->used && k->type == (uint8_t)ev->type && k->step == ev->step &&
        k->attempt == ev->attempt && k->at_ms == ev->at_ms)
      return 1;
  }
  ev_key *k = &e->keys[e->nkey++ % SEEN_KEYS];
  k->used = 1;
  k->type = (uint8_t)ev->type;
  k->step = (int16_t)ev->step;
  k->attempt = ev->attempt;
  k->at_ms = ev->at_ms;
  return 0;
}

static void stream_status(purchase_svc *s, const saga_event *ev, int64_t customer,
                          const char *purchase_id, int status) {
  stream_sub *sub = s->subs[sub_bucket(customer)];
  char *text = NULL;
  for (; sub != NULL; sub = sub->next) {
    if (sub->customer_id != customer) continue;
    if (text == NULL) {
      json_t *o = json_pack("{s:o,s:s,s:s,s:I}", "purchase_id", shop_purchase_id_json(purchase_id),
                            "step", ev->step_name, "status", status_names[status], "timestamp",
                            (json_int_t)ev->at_ms);
      text = o ? json_dumps(o, JSON_COMPACT) : NULL;
      json_decref(o);
      if (text == NULL) return;
    }
    if (shop_sse_send(sub->sse, "data", text) == 0) s->ev_streamed++;
  }
  free(text);
}

/*
 * Maps one orchestrator transition to the statuses streamed for it (0, 1 or 2). `last` is
 * what the step showed last (ST_NONE when unknown), updated.
 */
static int map_event(const saga_event *ev, uint8_t *last, int out[2]) {
  int n = 0;
  switch (ev->type) {
  case SAGA_EV_STEP_SENT: /* an action attempt; later attempts after a timeout add nothing */
    if (*last != ST_EXECUTE) out[n++] = ST_EXECUTE;
    break;
  case SAGA_EV_STEP_SUCCEEDED:
    out[n++] = ST_SUCCESS;
    break;
  case SAGA_EV_STEP_FAILED:
    /* While compensating, STEP_FAILED is a failed compensation attempt, retried: only
     * COMPENSATION_FAILED (the engine gave up) is shown. */
    if (ev->state == SAGA_RUNNING) out[n++] = ST_FAILED;
    break;
  case SAGA_EV_COMPENSATION_SENT:
    /* A step whose every attempt timed out is compensated, its outcome being unknown: it
     * failed, as far as the customer is concerned. */
    if (*last == ST_EXECUTE) out[n++] = ST_FAILED;
    break;
  case SAGA_EV_COMPENSATED: /* the compensation was confirmed by its participant */
    out[n++] = ST_ROLLBACKED;
    break;
  case SAGA_EV_COMPENSATION_FAILED:
    out[n++] = ST_ROLLBACK_FAIL;
    break;
  default:
    break;
  }
  if (n > 0) *last = (uint8_t)out[n - 1];
  return n;
}

static void on_event(saga_node *node, const saga_event *ev, void *arg) {
  (void)node;
  purchase_svc *s = arg;
  if (ev->definition == NULL || strcmp(ev->definition, "purchase") != 0) return;
  s->ev_received++;
  seen_saga *e = seen_get(s, ev->saga_id);
  if (e != NULL && seen_before(e, ev)) {
    s->ev_duplicate++;
    return;
  }
  if (ev->step < 0 || ev->step_name == NULL || ev->step_name[0] == '\0') return;
  uint8_t scratch = ST_NONE;
  uint8_t *last = e != NULL && ev->step < SEEN_STEPS ? &e->last[ev->step] : &scratch;
  int out[2];
  int n = map_event(ev, last, out);
  if (n == 0) return;
  int64_t customer;
  const char *purchase_id = ev->data ? saga_data_get_str(ev->data, "purchase_id") : NULL;
  if (ev->data == NULL || purchase_id == NULL ||
      saga_data_get_i64(ev->data, "customer_id", &customer) != SAGA_OK)
    return;
  for (int i = 0; i < n; i++) stream_status(s, ev, customer, purchase_id, out[i]);
}

/* ---- metrics (appended to the common ones of metrics.c) -------------------------------- */

static void purchase_metrics(shop_text *b, void *arg) {
  purchase_svc *s = arg;
  shop_text_printf(b, "# HELP shop_purchase_requests_total POST /api/purchase by outcome.\n"
                      "# TYPE shop_purchase_requests_total counter\n");
  static const char *const names[] = {"created",  "existing", "bad_request", "not_found",
                                      "conflict", "error",    "unavailable"};
  const uint64_t v[] = {s->req_created,  s->req_existing, s->req_bad,        s->req_not_found,
                        s->req_conflict, s->req_error,    s->req_unavailable};
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
    shop_text_printf(b, "shop_purchase_requests_total{result=\"%s\"} %" PRIu64 "\n", names[i],
                     v[i]);
  shop_text_metric(b, "shop_purchase_pending_starts", "gauge",
                   "Purchases waiting for their product check or commit.", "", s->npending);
  shop_text_metric(b, "shop_purchase_streams", "gauge", "Open result streams.", "", s->nsubs);
  shop_text_metric(b, "shop_purchase_streams_opened_total", "counter", "Result streams opened.", "",
                   s->streams_opened);
  shop_text_metric(b, "shop_purchase_events_received_total", "counter",
                   "Purchase saga events received from the orchestrator.", "", s->ev_received);
  shop_text_metric(b, "shop_purchase_events_duplicate_total", "counter",
                   "Redelivered events dropped.", "", s->ev_duplicate);
  shop_text_metric(b, "shop_purchase_events_streamed_total", "counter",
                   "Statuses written to result streams.", "", s->ev_streamed);
}

/* ---- setup and shutdown --------------------------------------------------------------- */

/* The request step: hand the purchase to the orchestrator, until it took it. */
static const saga_step request_steps[] = {
    {.name = "REQUEST",
     .channel = SHOP_CH_REQUESTS,
     .action = "orchestrator.purchase",
     .kind = SAGA_STEP_RETRIABLE,
     .retry =
         {.max_attempts = 0, .backoff_ms = 200, .multiplier = 2.0, .cap_ms = 5000, .jitter = 0.2},
     .timeout_ms = 5000},
};

static const saga_definition request_def = {
    .struct_version = SAGA_DEFINITION_VERSION,
    .name = "purchase-request",
    .version = 1,
    .steps = request_steps,
    .nsteps = 1,
    .step_size = sizeof(saga_step), /* the saga_step this program was built with */
};

int shop_purchase_init(shop_ctx *c, saga_node *node) {
  if (svc != NULL) return -1;
  purchase_svc *s = calloc(1, sizeof *s);
  if (s == NULL) return -1;
  s->c = c;
  s->node = node;
  int rc = saga_node_register(node, &request_def);
  if (rc == SAGA_OK) rc = saga_node_subscribe_events(node, SHOP_EVENTS, on_event, s);
  if (rc != SAGA_OK) {
    fprintf(stderr, "purchase: %s: %s\n", saga_strerror(rc), saga_node_errmsg(node));
    free(s);
    return -1;
  }
  if (shop_http_route(c->http, "POST", "/api/purchase", post_purchase, s) != 0 ||
      shop_http_route(c->http, "GET", "/api/purchase/result", get_results, s) != 0 ||
      shop_metrics_add(c, purchase_metrics, s) != 0) {
    free(s);
    return -1;
  }
  uv_timer_init(c->loop, &s->heartbeat);
  s->heartbeat.data = s;
  s->heartbeat_open = 1;
  uv_timer_start(&s->heartbeat, heartbeat, HEARTBEAT_MS, HEARTBEAT_MS);
  uv_unref((uv_handle_t *)&s->heartbeat); /* never what keeps the loop alive */
  svc = s;
  return 0;
}

/* After shop_http_stop(): every request was answered and every stream closed. Start
 * callbacks still to come (they run with SAGA_ECLOSED when the node closes) only free. */
void shop_purchase_close(shop_ctx *c) {
  (void)c;
  purchase_svc *s = svc;
  if (s == NULL) return;
  for (pending *p = s->pending; p != NULL; p = p->next) p->r = NULL;
  for (size_t b = 0; b < SUB_BUCKETS; b++) {
    stream_sub *sub = s->subs[b];
    while (sub != NULL) { /* none should be left: their on_close ran in shop_http_stop */
      stream_sub *next = sub->next;
      free(sub);
      sub = next;
    }
    s->subs[b] = NULL;
  }
  while (s->lru_head != NULL) seen_remove(s, s->lru_head);
  sqlite3_finalize(s->product_exists);
  sqlite3_close(s->products);
  s->product_exists = NULL;
  s->products = NULL;
  /* Pending starts are freed by their callbacks (SAGA_ECLOSED when the node closes); the
   * last one frees the service. */
  s->closed = 1;
  if (s->heartbeat_open)
    uv_close((uv_handle_t *)&s->heartbeat, heartbeat_closed);
  else
    maybe_free(s);
}
