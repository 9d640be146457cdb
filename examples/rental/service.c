/*
 * The rental example (examples/rental/README.md): a book-rental system by choreography. Four
 * services, each its own process with its own database, talking only through libsaga's domain
 * events (include/saga/domain.h) over TCP; no orchestrator. Commands come in over HTTP.
 *
 *   reservation  a customer reserves a book (POST /reservations) or cancels (POST
 *                /reservations/ID/cancel): the reservation row and its event commit together.
 *                Follows OutOfStock (-> REJECTED) and Delivered (-> DELIVERED) and keeps a copy
 *                of the catalogue (BookStocked) to refuse unknown books.
 *   product      the librarian's side: stocks books (POST /books); on ReservationCreated takes a
 *                copy (StockTaken) or finds none (OutOfStock); on ReservationCancelled puts a
 *                taken copy back (StockRestored).
 *   delivery     on StockTaken delivers the copy (Delivered) unless the reservation was already
 *                cancelled; on ReservationCancelled collects a delivered copy back
 *                (DeliveryCancelled) or remembers the cancel for a StockTaken still to come.
 *   mypage       the read model (CQRS): every service sends it a copy of each event; it keeps
 *                per customer each reservation's status and history, derived from the set of
 *                facts seen, whatever their order of arrival (GET /mypage/CUSTOMER).
 *
 *   rental_service ROLE --db FILE --listen HOST:PORT [--http HOST:PORT]
 *                  [--peer CHANNEL=HOST:PORT]...
 *   rental_service mypage --db FILE --show CUSTOMER     (prints MyPage from the database)
 *
 * Each service consumes the channel rental.ROLE; --peer says where each channel it publishes
 * to is served (TCP routes are one channel -> one address, so every subscriber has its own
 * channel and a publisher writes one event per subscriber, in the same transaction).
 *
 * Crash injection for the end-to-end test: RENTAL_CRASH=POINT:N makes the process kill itself
 * with SIGKILL the N-th time it reaches POINT, one of the node's named points
 * (saga_node_config.test_hook: tx.before_commit, tx.after_commit, tx.after_ack,
 * outbox.after_insert, relay.after_publish).
 */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

#include <jansson.h>
#include <saga.h>
#include <saga/transport_tcp.h>
#include <sqlite3.h>
#include <uv.h>

#include "http.h"

#define MAX_PEERS 8

static saga_node *node;
static uv_loop_t *loop;
static rental_http *http;
static uv_signal_t sigterm, sigint;
static const char *role;
static char crash_point[64];
static long crash_at, crash_seen;

static void crash_hook(void *arg, const char *point) {
  (void)arg;
  if (crash_at > 0 && strcmp(point, crash_point) == 0 && ++crash_seen == crash_at) {
    fprintf(stderr, "%s: crash at %s #%ld\n", role, point, crash_at);
    raise(SIGKILL);
  }
}

/* ---- SQL helpers: text parameters ?1, ?2, ... given as a NULL-terminated list ----------- */

static sqlite3_stmt *prepare(sqlite3 *db, const char *sql, va_list ap) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
    fprintf(stderr, "%s: %s: %s\n", role, sql, sqlite3_errmsg(db));
    return NULL;
  }
  const char *p;
  for (int i = 1; (p = va_arg(ap, const char *)) != NULL; i++)
    sqlite3_bind_text(st, i, p, -1, SQLITE_TRANSIENT);
  return st;
}

/* Runs a statement; SAGA_OK or SAGA_ESTORE. */
static int x(sqlite3 *db, const char *sql, ...) {
  va_list ap;
  va_start(ap, sql);
  sqlite3_stmt *st = prepare(db, sql, ap);
  va_end(ap);
  if (st == NULL) return SAGA_ESTORE;
  int rc = sqlite3_step(st);
  if (rc != SQLITE_DONE && rc != SQLITE_ROW)
    fprintf(stderr, "%s: %s: %s\n", role, sql, sqlite3_errmsg(db));
  sqlite3_finalize(st);
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? SAGA_OK : SAGA_ESTORE;
}

/* The first column of the first row into out: 1 (a row), 0 (none, out = ""), -1 (error). */
static int q1(sqlite3 *db, char *out, size_t len, const char *sql, ...) {
  va_list ap;
  va_start(ap, sql);
  sqlite3_stmt *st = prepare(db, sql, ap);
  va_end(ap);
  out[0] = '\0';
  if (st == NULL) return -1;
  int rc = sqlite3_step(st), found = rc == SQLITE_ROW;
  if (found && sqlite3_column_text(st, 0) != NULL)
    snprintf(out, len, "%s", (const char *)sqlite3_column_text(st, 0));
  sqlite3_finalize(st);
  return found ? 1 : rc == SQLITE_DONE ? 0 : -1;
}

static int exec_script(sqlite3 *db, const char *sql) {
  char *err = NULL;
  int rc = sqlite3_exec(db, sql, NULL, NULL, &err);
  if (rc != SQLITE_OK) fprintf(stderr, "%s: %s\n", role, err ? err : "schema");
  sqlite3_free(err);
  return rc == SQLITE_OK ? SAGA_OK : SAGA_ESTORE;
}

/* ---- events ------------------------------------------------------------------------------ */

/* Publishes one event (data: the JSON object, whose reference is kept) to each channel listed,
 * in the transaction tx: one copy per subscriber, each with its own per-key sequence. */
static int publish(saga_tx *tx, const char *name, const char *key, json_t *data, ...) {
  char *text = json_dumps(data, JSON_COMPACT | JSON_SORT_KEYS);
  if (text == NULL) return SAGA_ENOMEM;
  va_list ap;
  va_start(ap, data);
  const char *channel;
  int rc = SAGA_OK;
  while (rc == SAGA_OK && (channel = va_arg(ap, const char *)) != NULL)
    rc = saga_tx_publish(tx, channel, name, key, text, strlen(text));
  va_end(ap);
  free(text);
  return rc;
}

/* The event's data as a JSON object with string fields reservation, customer and book (every
 * reservation event carries them, so that a subscriber can place any one of them alone). */
static json_t *event_json(const saga_domain_event *ev, const char **res, const char **customer,
                          const char **book) {
  json_error_t e;
  json_t *j = json_loadb(ev->data, ev->len, 0, &e);
  *res = json_string_value(json_object_get(j, "reservation"));
  *customer = json_string_value(json_object_get(j, "customer"));
  *book = json_string_value(json_object_get(j, "book"));
  if (j == NULL || *res == NULL || *customer == NULL || *book == NULL) {
    fprintf(stderr, "%s: %s %s: malformed data\n", role, ev->name, ev->key);
    json_decref(j);
    return NULL;
  }
  return j;
}

static json_t *res_data(const char *res, const char *customer, const char *book) {
  return json_pack("{s:s,s:s,s:s}", "reservation", res, "customer", customer, "book", book);
}

/* ---- input checks ------------------------------------------------------------------------ */

/* Ids (customers, books, request ids): 1..40 of [A-Za-z0-9_.-]. */
static int valid_id(const char *s) {
  if (s == NULL || s[0] == '\0' || strlen(s) > 40) return 0;
  for (const char *p = s; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
          *p == '_' || *p == '-' || *p == '.'))
      return 0;
  return 1;
}

/* The string field `name` of the request's JSON body, or NULL after answering 400. */
static const char *field(rental_req *r, const char *name) {
  json_t *j = rental_req_json(r);
  if (j == NULL) {
    rental_http_error(r, 400, "the body must be a JSON object");
    return NULL;
  }
  const char *v = json_string_value(json_object_get(j, name));
  if (!valid_id(v)) {
    char msg[160];
    snprintf(msg, sizeof msg, "\"%s\": a string of 1 to 40 letters, digits, '_', '-' or '.'",
             name);
    rental_http_error(r, 400, msg);
    return NULL;
  }
  return v;
}

/* "/a/b/c" -> parts (at most n); returns the count, or -1 for more or an empty part. */
static int split_path(const char *path, char parts[][48], int n) {
  int k = 0;
  const char *p = path;
  while (*p == '/') {
    p++;
    if (*p == '\0') break;
    const char *end = strchr(p, '/');
    size_t len = end ? (size_t)(end - p) : strlen(p);
    if (len == 0 || len >= 48 || k == n) return -1;
    memcpy(parts[k], p, len);
    parts[k++][len] = '\0';
    p += len;
  }
  return *p == '\0' ? k : -1;
}

/* A command waiting for its transaction: answered from done(). */
typedef struct command {
  rental_req *req; /* NULL once the request went away */
  char a[48], b[48], c[48], d[64];
  long n;
  unsigned code; /* the answer fn decided on */
  char msg[160];
  json_t *answer;
} command;

static command *command_new(rental_req *r) {
  command *c = calloc(1, sizeof *c);
  if (c == NULL) {
    rental_http_error(r, 500, "out of memory");
    return NULL;
  }
  c->req = r;
  return c;
}

static void command_done(saga_node *n, int status, void *arg) {
  (void)n;
  command *c = arg;
  if (c->req != NULL) {
    if (status != SAGA_OK) rental_http_error(c->req, 503, saga_strerror(status));
    else if (c->code >= 400) rental_http_error(c->req, c->code, c->msg);
    else {
      rental_http_reply(c->req, c->code, c->answer);
      c->answer = NULL;
    }
  }
  json_decref(c->answer);
  free(c);
}

static void submit(rental_req *r, command *c, saga_transact_fn fn) {
  if (saga_node_transact(node, fn, c, command_done, c) != SAGA_OK) {
    rental_http_error(r, 503, "the service cannot take commands now");
    free(c);
    return;
  }
  rental_req_watch(r, &c->req);
}

/* fn may run more than once (a retried group commit): each run starts from scratch. */
static void command_reset(command *c) {
  c->code = 500;
  c->msg[0] = '\0';
  json_decref(c->answer);
  c->answer = NULL;
}

static void refuse(command *c, unsigned code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  c->code = code;
  vsnprintf(c->msg, sizeof c->msg, fmt, ap);
  va_end(ap);
}

/* ---- reservation ------------------------------------------------------------------------- */

static int set_status(sqlite3 *db, const char *res, const char *status) {
  int rc = x(db, "UPDATE reservation SET status = ?2 WHERE id = ?1", res, status, NULL);
  if (rc == SAGA_OK)
    rc = x(db, "INSERT INTO history(reservation, n, status) SELECT ?1, count(*) + 1, ?2 FROM "
               "history WHERE reservation = ?1", res, status, NULL);
  return rc;
}

static json_t *reservation_json(sqlite3 *db, const char *res) {
  sqlite3_stmt *st = NULL;
  json_t *j = NULL;
  if (sqlite3_prepare_v2(db, "SELECT customer, book, status FROM reservation WHERE id = ?1", -1,
                         &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, res, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(st) == SQLITE_ROW)
      j = json_pack("{s:s,s:s,s:s,s:s,s:[]}", "id", res, "customer",
                    (const char *)sqlite3_column_text(st, 0), "book",
                    (const char *)sqlite3_column_text(st, 1), "status",
                    (const char *)sqlite3_column_text(st, 2), "history");
  }
  sqlite3_finalize(st);
  if (j != NULL &&
      sqlite3_prepare_v2(db, "SELECT status FROM history WHERE reservation = ?1 ORDER BY n", -1,
                         &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, res, -1, SQLITE_TRANSIENT);
    while (sqlite3_step(st) == SQLITE_ROW)
      json_array_append_new(json_object_get(j, "history"),
                            json_string((const char *)sqlite3_column_text(st, 0)));
    sqlite3_finalize(st);
  }
  return j;
}

/* POST /reservations {"request", "customer", "book"}: a = request, b = customer, c = book. */
static int reserve_fn(saga_tx *tx, void *arg) {
  command *c = arg;
  sqlite3 *db = saga_tx_db(tx);
  command_reset(c);
  char id[32], who[160];
  int found = q1(db, who, sizeof who, "SELECT id || ' ' || customer || ' ' || book FROM "
                 "reservation WHERE request = ?1", c->a, NULL);
  if (found < 0) return SAGA_ESTORE;
  if (found) { /* the same request again (the client did not see the answer): same answer */
    char want[160];
    sscanf(who, "%31s", id);
    snprintf(want, sizeof want, "%s %s %s", id, c->b, c->c);
    if (strcmp(want, who) != 0) {
      refuse(c, 409, "request %s was used for another reservation", c->a);
      return SAGA_OK;
    }
    c->answer = reservation_json(db, id);
    c->code = 200;
    return c->answer != NULL ? SAGA_OK : SAGA_ESTORE;
  }
  found = q1(db, id, sizeof id, "SELECT title FROM book WHERE id = ?1", c->c, NULL);
  if (found < 0) return SAGA_ESTORE;
  if (!found) {
    refuse(c, 404, "unknown book %s", c->c);
    return SAGA_OK;
  }
  if (q1(db, id, sizeof id, "SELECT printf('R%05d', count(*) + 1) FROM reservation", NULL) != 1)
    return SAGA_ESTORE;
  int rc = x(db, "INSERT INTO reservation(id, customer, book, status, request) VALUES(?1, ?2, "
                 "?3, 'RESERVED', ?4)", id, c->b, c->c, c->a, NULL);
  if (rc == SAGA_OK)
    rc = x(db, "INSERT INTO history(reservation, n, status) VALUES(?1, 1, 'RESERVED')", id,
           NULL);
  json_t *data = res_data(id, c->b, c->c);
  if (rc == SAGA_OK)
    rc = publish(tx, "ReservationCreated", id, data, "rental.product", "rental.mypage", NULL);
  json_decref(data);
  if (rc != SAGA_OK) return rc;
  c->answer = reservation_json(db, id);
  c->code = 201;
  return c->answer != NULL ? SAGA_OK : SAGA_ESTORE;
}

/* POST /reservations/ID/cancel {"customer"}: a = id, b = customer. */
static int cancel_fn(saga_tx *tx, void *arg) {
  command *c = arg;
  sqlite3 *db = saga_tx_db(tx);
  command_reset(c);
  char row[128], customer[48], book[48], status[16];
  int found = q1(db, row, sizeof row, "SELECT customer || ' ' || book || ' ' || status FROM "
                 "reservation WHERE id = ?1", c->a, NULL);
  if (found < 0) return SAGA_ESTORE;
  if (!found || sscanf(row, "%47s %47s %15s", customer, book, status) != 3 ||
      strcmp(customer, c->b) != 0) {
    refuse(c, 404, "%s has no reservation %s", c->b, c->a);
    return SAGA_OK;
  }
  if (strcmp(status, "REJECTED") == 0) {
    refuse(c, 409, "reservation %s was rejected (no copy left): nothing to cancel", c->a);
    return SAGA_OK;
  }
  if (strcmp(status, "CANCELLED") != 0) { /* cancelling twice answers the same */
    int rc = set_status(db, c->a, "CANCELLED");
    json_t *data = res_data(c->a, customer, book);
    /* What was cancelled: a reservation waiting for its copy, or one delivered (the copy
     * is then collected). MyPage derives the history from it. */
    json_object_set_new(data, "from", json_string(status));
    if (rc == SAGA_OK)
      rc = publish(tx, "ReservationCancelled", c->a, data, "rental.product", "rental.delivery",
                   "rental.mypage", NULL);
    json_decref(data);
    if (rc != SAGA_OK) return rc;
  }
  c->answer = reservation_json(db, c->a);
  c->code = 200;
  return c->answer != NULL ? SAGA_OK : SAGA_ESTORE;
}

static void reservation_http(rental_req *r, void *arg) {
  (void)arg;
  char p[4][48];
  int n = split_path(rental_req_path(r), p, 4);
  const char *m = rental_req_method(r);
  sqlite3 *db = saga_node_db(node);
  if (n == 1 && strcmp(p[0], "reservations") == 0 && strcmp(m, "POST") == 0) {
    const char *request = field(r, "request"), *customer, *book;
    if (request == NULL || (customer = field(r, "customer")) == NULL ||
        (book = field(r, "book")) == NULL)
      return;
    command *c = command_new(r);
    if (c == NULL) return;
    snprintf(c->a, sizeof c->a, "%s", request);
    snprintf(c->b, sizeof c->b, "%s", customer);
    snprintf(c->c, sizeof c->c, "%s", book);
    submit(r, c, reserve_fn);
  } else if (n == 3 && strcmp(p[0], "reservations") == 0 && strcmp(p[2], "cancel") == 0 &&
             strcmp(m, "POST") == 0) {
    const char *customer = field(r, "customer");
    if (customer == NULL) return;
    command *c = command_new(r);
    if (c == NULL) return;
    snprintf(c->a, sizeof c->a, "%s", p[1]);
    snprintf(c->b, sizeof c->b, "%s", customer);
    submit(r, c, cancel_fn);
  } else if (n == 2 && strcmp(p[0], "reservations") == 0 && strcmp(m, "GET") == 0) {
    json_t *j = reservation_json(db, p[1]);
    if (j != NULL) rental_http_reply(r, 200, j);
    else rental_http_error(r, 404, "no such reservation");
  } else if (n == 2 && strcmp(p[0], "books") == 0 && strcmp(m, "GET") == 0) {
    char title[128];
    if (q1(db, title, sizeof title, "SELECT title FROM book WHERE id = ?1", p[1], NULL) == 1)
      rental_http_reply(r, 200, json_pack("{s:s,s:s}", "book", p[1], "title", title));
    else rental_http_error(r, 404, "unknown book (not stocked, or not heard of yet)");
  } else {
    rental_http_error(r, 404, "not found: POST /reservations, POST /reservations/ID/cancel, "
                              "GET /reservations/ID, GET /books/ID");
  }
}

/* The catalogue copy: which books exist, to refuse reservations of unknown ones. */
static int on_book_stocked(saga_tx *tx, const saga_domain_event *ev, void *arg) {
  (void)arg;
  json_error_t e;
  json_t *j = json_loadb(ev->data, ev->len, 0, &e);
  const char *book = json_string_value(json_object_get(j, "book"));
  const char *title = json_string_value(json_object_get(j, "title"));
  int rc = book && title ? x(saga_tx_db(tx), "INSERT INTO book(id, title) VALUES(?1, ?2) ON "
                             "CONFLICT(id) DO UPDATE SET title = excluded.title", book, title,
                             NULL)
                         : SAGA_EINVAL;
  json_decref(j);
  return rc;
}

/* OutOfStock -> REJECTED, Delivered -> DELIVERED; a cancelled reservation stays cancelled. */
static int on_outcome(saga_tx *tx, const saga_domain_event *ev, void *arg) {
  const char *to = arg, *res, *customer, *book;
  json_t *j = event_json(ev, &res, &customer, &book);
  if (j == NULL) return SAGA_EINVAL;
  sqlite3 *db = saga_tx_db(tx);
  char status[16];
  int found = q1(db, status, sizeof status, "SELECT status FROM reservation WHERE id = ?1", res,
                 NULL);
  int rc = found < 0 ? SAGA_ESTORE : found == 0 ? SAGA_ENOTFOUND : SAGA_OK;
  if (rc == SAGA_OK && strcmp(status, "RESERVED") == 0) rc = set_status(db, res, to);
  json_decref(j);
  return rc;
}

/* ---- product ----------------------------------------------------------------------------- */

static json_t *book_json(sqlite3 *db, const char *book) {
  sqlite3_stmt *st = NULL;
  json_t *j = NULL;
  if (sqlite3_prepare_v2(db, "SELECT title, stocked, copies FROM book WHERE id = ?1", -1, &st,
                         NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, book, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(st) == SQLITE_ROW)
      j = json_pack("{s:s,s:s,s:I,s:I}", "book", book, "title",
                    (const char *)sqlite3_column_text(st, 0), "stocked",
                    (json_int_t)sqlite3_column_int64(st, 1), "copies",
                    (json_int_t)sqlite3_column_int64(st, 2));
  }
  sqlite3_finalize(st);
  return j;
}

/* POST /books {"request", "book", "title", "copies"}: a = request, b = book, d = title. */
static int stock_fn(saga_tx *tx, void *arg) {
  command *c = arg;
  sqlite3 *db = saga_tx_db(tx);
  command_reset(c);
  char seen[96], want[96], n[24];
  int found = q1(db, seen, sizeof seen, "SELECT book || ' ' || copies FROM stock_request WHERE "
                 "request = ?1", c->a, NULL);
  if (found < 0) return SAGA_ESTORE;
  snprintf(want, sizeof want, "%s %ld", c->b, c->n);
  if (found && strcmp(seen, want) != 0) {
    refuse(c, 409, "request %s was used for another stocking", c->a);
    return SAGA_OK;
  }
  if (!found) {
    snprintf(n, sizeof n, "%ld", c->n);
    int rc = x(db, "INSERT INTO stock_request(request, book, copies) VALUES(?1, ?2, ?3)", c->a,
               c->b, n, NULL);
    if (rc == SAGA_OK)
      rc = x(db, "INSERT INTO book(id, title, stocked, copies) VALUES(?1, ?2, ?3, ?3) ON "
                 "CONFLICT(id) DO UPDATE SET title = excluded.title, stocked = stocked + ?3, "
                 "copies = copies + ?3", c->b, c->d, n, NULL);
    json_t *data = json_pack("{s:s,s:s}", "book", c->b, "title", c->d);
    if (rc == SAGA_OK)
      rc = publish(tx, "BookStocked", c->b, data, "rental.reservation", "rental.mypage", NULL);
    json_decref(data);
    if (rc != SAGA_OK) return rc;
  }
  c->answer = book_json(db, c->b);
  c->code = 200;
  return c->answer != NULL ? SAGA_OK : SAGA_ESTORE;
}

static void product_http(rental_req *r, void *arg) {
  (void)arg;
  char p[4][48];
  int n = split_path(rental_req_path(r), p, 4);
  const char *m = rental_req_method(r);
  if (n == 1 && strcmp(p[0], "books") == 0 && strcmp(m, "POST") == 0) {
    const char *request = field(r, "request"), *book;
    if (request == NULL || (book = field(r, "book")) == NULL) return;
    json_t *j = rental_req_json(r);
    const char *title = json_string_value(json_object_get(j, "title"));
    json_t *copies = json_object_get(j, "copies");
    if (title == NULL || title[0] == '\0' || strlen(title) > 60) {
      rental_http_error(r, 400, "\"title\": a string of 1 to 60 bytes");
      return;
    }
    if (!json_is_integer(copies) || json_integer_value(copies) < 1 ||
        json_integer_value(copies) > 1000) {
      rental_http_error(r, 400, "\"copies\": an integer from 1 to 1000");
      return;
    }
    command *c = command_new(r);
    if (c == NULL) return;
    snprintf(c->a, sizeof c->a, "%s", request);
    snprintf(c->b, sizeof c->b, "%s", book);
    snprintf(c->d, sizeof c->d, "%s", title);
    c->n = (long)json_integer_value(copies);
    submit(r, c, stock_fn);
  } else if (n == 2 && strcmp(p[0], "books") == 0 && strcmp(m, "GET") == 0) {
    json_t *j = book_json(saga_node_db(node), p[1]);
    if (j != NULL) rental_http_reply(r, 200, j);
    else rental_http_error(r, 404, "unknown book");
  } else {
    rental_http_error(r, 404, "not found: POST /books, GET /books/ID");
  }
}

/* ReservationCreated: a copy taken (StockTaken) or none left (OutOfStock). */
static int on_reservation_created(saga_tx *tx, const saga_domain_event *ev, void *arg) {
  (void)arg;
  const char *res, *customer, *book;
  json_t *j = event_json(ev, &res, &customer, &book);
  if (j == NULL) return SAGA_EINVAL;
  sqlite3 *db = saga_tx_db(tx);
  char copies[24];
  int found = q1(db, copies, sizeof copies, "SELECT copies FROM book WHERE id = ?1", book, NULL);
  int rc = found < 0 ? SAGA_ESTORE : SAGA_OK;
  json_t *data = res_data(res, customer, book);
  if (rc == SAGA_OK && found && atol(copies) > 0) {
    rc = x(db, "UPDATE book SET copies = copies - 1 WHERE id = ?1", book, NULL);
    if (rc == SAGA_OK)
      rc = x(db, "INSERT INTO hold(reservation, book, customer, state) VALUES(?1, ?2, ?3, "
                 "'TAKEN')", res, book, customer, NULL);
    if (rc == SAGA_OK)
      rc = publish(tx, "StockTaken", res, data, "rental.delivery", "rental.mypage", NULL);
  } else if (rc == SAGA_OK) {
    json_object_set_new(data, "reason", json_string(found ? "no copy left" : "unknown book"));
    rc = x(db, "INSERT INTO hold(reservation, book, customer, state) VALUES(?1, ?2, ?3, "
               "'REFUSED')", res, book, customer, NULL);
    if (rc == SAGA_OK)
      rc = publish(tx, "OutOfStock", res, data, "rental.reservation", "rental.mypage", NULL);
  }
  json_decref(data);
  json_decref(j);
  return rc;
}

/* ReservationCancelled: a taken copy goes back on the shelf (StockRestored). It always comes
 * after the reservation's ReservationCreated: same publisher, channel and key. */
static int on_reservation_cancelled_product(saga_tx *tx, const saga_domain_event *ev,
                                            void *arg) {
  (void)arg;
  const char *res, *customer, *book;
  json_t *j = event_json(ev, &res, &customer, &book);
  if (j == NULL) return SAGA_EINVAL;
  sqlite3 *db = saga_tx_db(tx);
  char state[16];
  int found = q1(db, state, sizeof state, "SELECT state FROM hold WHERE reservation = ?1", res,
                 NULL);
  int rc = found < 0 ? SAGA_ESTORE : found == 0 ? SAGA_ENOTFOUND : SAGA_OK;
  if (rc == SAGA_OK && strcmp(state, "TAKEN") == 0) {
    rc = x(db, "UPDATE book SET copies = copies + 1 WHERE id = ?1", book, NULL);
    if (rc == SAGA_OK)
      rc = x(db, "UPDATE hold SET state = 'RESTORED' WHERE reservation = ?1", res, NULL);
    json_t *data = res_data(res, customer, book);
    if (rc == SAGA_OK) rc = publish(tx, "StockRestored", res, data, "rental.mypage", NULL);
    json_decref(data);
  }
  json_decref(j);
  return rc;
}

/* ---- delivery ---------------------------------------------------------------------------- */

/* StockTaken: deliver, unless the cancel came first (it comes from another publisher, so it
 * may): then nothing is delivered and the row notes that the copy was taken after all. */
static int on_stock_taken(saga_tx *tx, const saga_domain_event *ev, void *arg) {
  (void)arg;
  const char *res, *customer, *book;
  json_t *j = event_json(ev, &res, &customer, &book);
  if (j == NULL) return SAGA_EINVAL;
  sqlite3 *db = saga_tx_db(tx);
  char status[16];
  int found = q1(db, status, sizeof status, "SELECT status FROM delivery WHERE reservation = ?1",
                 res, NULL);
  int rc = found < 0 ? SAGA_ESTORE : SAGA_OK;
  if (rc == SAGA_OK && found)
    rc = x(db, "UPDATE delivery SET stock_after_cancel = 1 WHERE reservation = ?1", res, NULL);
  else if (rc == SAGA_OK) {
    rc = x(db, "INSERT INTO delivery(reservation, customer, book, status) VALUES(?1, ?2, ?3, "
               "'DELIVERED')", res, customer, book, NULL);
    json_t *data = res_data(res, customer, book);
    if (rc == SAGA_OK)
      rc = publish(tx, "Delivered", res, data, "rental.reservation", "rental.mypage", NULL);
    json_decref(data);
  }
  json_decref(j);
  return rc;
}

/* ReservationCancelled: a delivered copy is collected back (DeliveryCancelled); before any
 * delivery, the cancel is remembered so that a later StockTaken delivers nothing. */
static int on_reservation_cancelled_delivery(saga_tx *tx, const saga_domain_event *ev,
                                             void *arg) {
  (void)arg;
  const char *res, *customer, *book;
  json_t *j = event_json(ev, &res, &customer, &book);
  if (j == NULL) return SAGA_EINVAL;
  sqlite3 *db = saga_tx_db(tx);
  char status[16];
  int found = q1(db, status, sizeof status, "SELECT status FROM delivery WHERE reservation = ?1",
                 res, NULL);
  int rc = found < 0 ? SAGA_ESTORE : SAGA_OK;
  if (rc == SAGA_OK && !found)
    rc = x(db, "INSERT INTO delivery(reservation, customer, book, status) VALUES(?1, ?2, ?3, "
               "'CANCELLED')", res, customer, book, NULL);
  else if (rc == SAGA_OK && strcmp(status, "DELIVERED") == 0) {
    rc = x(db, "UPDATE delivery SET status = 'RETURNED' WHERE reservation = ?1", res, NULL);
    json_t *data = res_data(res, customer, book);
    if (rc == SAGA_OK) rc = publish(tx, "DeliveryCancelled", res, data, "rental.mypage", NULL);
    json_decref(data);
  }
  json_decref(j);
  return rc;
}

/* ---- mypage: the read model -------------------------------------------------------------- */

static int has_fact(sqlite3 *db, const char *res, const char *name, char *detail, size_t len) {
  char buf[64];
  int found = q1(db, detail ? detail : buf, detail ? len : sizeof buf,
                 "SELECT coalesce(detail, '') FROM fact WHERE reservation = ?1 AND name = ?2",
                 res, name, NULL);
  return found;
}

/* The view of one reservation, a function of the set of its facts (not of their order of
 * arrival, which across publishers is arbitrary). Precedence: a cancel ends everything (a
 * rejected reservation cannot be cancelled, so OutOfStock with a cancel means the cancel came
 * first); then OutOfStock; then Delivered; else it is reserved. The history is derived the
 * same way: the cancel says what it cancelled (a delivered reservation or a waiting one). */
static int mypage_recompute(sqlite3 *db, const char *res, const char *customer,
                            const char *book) {
  char from[32];
  int cancelled = has_fact(db, res, "ReservationCancelled", from, sizeof from);
  int rejected = has_fact(db, res, "OutOfStock", NULL, 0);
  int delivered = has_fact(db, res, "Delivered", NULL, 0);
  int taken = has_fact(db, res, "StockTaken", NULL, 0);
  int restored = has_fact(db, res, "StockRestored", NULL, 0);
  int returned = has_fact(db, res, "DeliveryCancelled", NULL, 0);
  if (cancelled < 0 || rejected < 0 || delivered < 0 || taken < 0 || restored < 0 ||
      returned < 0)
    return SAGA_ESTORE;
  const char *status, *history;
  if (cancelled) {
    status = "CANCELLED";
    history = strcmp(from, "DELIVERED") == 0 ? "RESERVED>DELIVERED>CANCELLED"
                                             : "RESERVED>CANCELLED";
  } else if (rejected) {
    status = "REJECTED";
    history = "RESERVED>REJECTED";
  } else if (delivered) {
    status = "DELIVERED";
    history = "RESERVED>DELIVERED";
  } else {
    status = "RESERVED";
    history = "RESERVED";
  }
  const char *copy = restored ? "back on the shelf" : taken ? "taken" : rejected ? "none left"
                                                                                 : "waiting";
  const char *delivery = returned ? "collected back" : delivered ? "delivered" : "none";
  return x(db, "INSERT INTO view(reservation, customer, book, status, history, copy, delivery) "
               "VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(reservation) DO UPDATE SET "
               "status = excluded.status, history = excluded.history, copy = excluded.copy, "
               "delivery = excluded.delivery", res, customer, book, status, history, copy,
           delivery, NULL);
}

static int on_mypage_event(saga_tx *tx, const saga_domain_event *ev, void *arg) {
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  if (strcmp(ev->name, "BookStocked") == 0) return on_book_stocked(tx, ev, NULL);
  const char *res, *customer, *book;
  json_t *j = event_json(ev, &res, &customer, &book);
  if (j == NULL) return SAGA_EINVAL;
  const char *detail = json_string_value(json_object_get(j, "from"));
  int rc = x(db, "INSERT INTO fact(event_id, reservation, name, source, detail) VALUES(?1, ?2, "
                 "?3, ?4, ?5)", ev->id, res, ev->name, ev->source ? ev->source : "",
             detail ? detail : "", NULL);
  if (rc == SAGA_OK) rc = mypage_recompute(db, res, customer, book);
  json_decref(j);
  return rc;
}

/* MyPage of one customer: every reservation with its status, history, the facts in the
 * order they arrived, and where the copy is. */
static json_t *mypage_json(sqlite3 *db, const char *customer) {
  sqlite3_stmt *st = NULL, *ft = NULL;
  json_t *list = json_array();
  if (sqlite3_prepare_v2(db, "SELECT v.reservation, v.book, coalesce(b.title, v.book), "
                         "v.status, v.history, v.copy, v.delivery FROM view v LEFT JOIN book b "
                         "ON b.id = v.book WHERE v.customer = ?1 ORDER BY v.reservation", -1,
                         &st, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(db, "SELECT name FROM fact WHERE reservation = ?1 ORDER BY rowid", -1,
                         &ft, NULL) != SQLITE_OK) {
    sqlite3_finalize(st);
    json_decref(list);
    return NULL;
  }
  sqlite3_bind_text(st, 1, customer, -1, SQLITE_TRANSIENT);
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *res = (const char *)sqlite3_column_text(st, 0);
    json_t *history = json_array(), *facts = json_array();
    char h[128];
    snprintf(h, sizeof h, "%s", (const char *)sqlite3_column_text(st, 4));
    for (char *save = NULL, *s = strtok_r(h, ">", &save); s; s = strtok_r(NULL, ">", &save))
      json_array_append_new(history, json_string(s));
    sqlite3_bind_text(ft, 1, res, -1, SQLITE_TRANSIENT);
    while (sqlite3_step(ft) == SQLITE_ROW)
      json_array_append_new(facts, json_string((const char *)sqlite3_column_text(ft, 0)));
    sqlite3_reset(ft);
    json_array_append_new(list, json_pack("{s:s,s:s,s:s,s:s,s:o,s:s,s:s,s:o}", "id", res,
                                          "book", (const char *)sqlite3_column_text(st, 1),
                                          "title", (const char *)sqlite3_column_text(st, 2),
                                          "status", (const char *)sqlite3_column_text(st, 3),
                                          "history", history, "copy",
                                          (const char *)sqlite3_column_text(st, 5), "delivery",
                                          (const char *)sqlite3_column_text(st, 6),
                                          "facts_as_they_arrived", facts));
  }
  sqlite3_finalize(st);
  sqlite3_finalize(ft);
  return json_pack("{s:s,s:o}", "customer", customer, "reservations", list);
}

static void mypage_http(rental_req *r, void *arg) {
  (void)arg;
  char p[4][48];
  int n = split_path(rental_req_path(r), p, 4);
  if (n == 2 && strcmp(p[0], "mypage") == 0 && strcmp(rental_req_method(r), "GET") == 0) {
    if (!valid_id(p[1])) {
      rental_http_error(r, 400, "a customer is 1 to 40 letters, digits, '_', '-' or '.'");
      return;
    }
    json_t *j = mypage_json(saga_node_db(node), p[1]);
    if (j != NULL) rental_http_reply(r, 200, j);
    else rental_http_error(r, 500, "cannot read the view");
  } else {
    rental_http_error(r, 404, "not found: GET /mypage/CUSTOMER");
  }
}

static void delivery_http(rental_req *r, void *arg) {
  (void)arg;
  rental_http_error(r, 404, "the delivery service takes no commands");
}

static int show(const char *db_path, const char *customer) {
  sqlite3 *db = NULL;
  if (sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
    fprintf(stderr, "mypage: cannot open %s: %s\n", db_path, sqlite3_errmsg(db));
    sqlite3_close(db);
    return 1;
  }
  sqlite3_busy_timeout(db, 2000);
  json_t *j = valid_id(customer) ? mypage_json(db, customer) : NULL;
  sqlite3_close(db);
  if (j == NULL) {
    fprintf(stderr, "mypage: no view of %s in %s\n", customer, db_path);
    return 1;
  }
  json_dumpf(j, stdout, JSON_INDENT(2));
  printf("\n");
  json_decref(j);
  return 0;
}

/* ---- setup ------------------------------------------------------------------------------- */

static const char *const schema_reservation =
    "CREATE TABLE IF NOT EXISTS book(id TEXT PRIMARY KEY, title TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS reservation(id TEXT PRIMARY KEY, customer TEXT NOT NULL, "
    "  book TEXT NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL UNIQUE);"
    "CREATE TABLE IF NOT EXISTS history(reservation TEXT NOT NULL, n INTEGER NOT NULL, "
    "  status TEXT NOT NULL, PRIMARY KEY(reservation, n));";
static const char *const schema_product =
    "CREATE TABLE IF NOT EXISTS book(id TEXT PRIMARY KEY, title TEXT NOT NULL, "
    "  stocked INTEGER NOT NULL, copies INTEGER NOT NULL CHECK(copies >= 0));"
    "CREATE TABLE IF NOT EXISTS stock_request(request TEXT PRIMARY KEY, book TEXT NOT NULL, "
    "  copies INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS hold(reservation TEXT PRIMARY KEY, book TEXT NOT NULL, "
    "  customer TEXT NOT NULL, state TEXT NOT NULL);";
static const char *const schema_delivery =
    "CREATE TABLE IF NOT EXISTS delivery(reservation TEXT PRIMARY KEY, customer TEXT NOT NULL, "
    "  book TEXT NOT NULL, status TEXT NOT NULL, stock_after_cancel INTEGER NOT NULL DEFAULT 0);";
static const char *const schema_mypage =
    "CREATE TABLE IF NOT EXISTS book(id TEXT PRIMARY KEY, title TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS fact(event_id TEXT PRIMARY KEY, reservation TEXT NOT NULL, "
    "  name TEXT NOT NULL, source TEXT NOT NULL, detail TEXT NOT NULL);"
    "CREATE INDEX IF NOT EXISTS fact_reservation ON fact(reservation);"
    "CREATE TABLE IF NOT EXISTS view(reservation TEXT PRIMARY KEY, customer TEXT NOT NULL, "
    "  book TEXT NOT NULL, status TEXT NOT NULL, history TEXT NOT NULL, copy TEXT NOT NULL, "
    "  delivery TEXT NOT NULL);"
    "CREATE INDEX IF NOT EXISTS view_customer ON view(customer);";

static void on_signal(uv_signal_t *s, int signum) {
  (void)s;
  (void)signum;
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_close((uv_handle_t *)&sigint, NULL);
  rental_http_stop(http); /* waiting requests are answered 503 */
  http = NULL;
  saga_node_close(node, NULL, NULL);
  node = NULL;
}

static void usage(void) {
  fprintf(stderr, "usage: rental_service reservation|product|delivery|mypage --db FILE --listen "
                  "HOST:PORT [--http HOST:PORT] [--peer CHANNEL=HOST:PORT]...\n"
                  "       rental_service mypage --db FILE --show CUSTOMER\n");
  exit(2);
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) usage();
  role = argv[1];
  const char *db_path = NULL, *listen = NULL, *http_addr = NULL, *show_customer = NULL;
  static char peer_buf[MAX_PEERS][128];
  saga_tcp_route routes[MAX_PEERS];
  size_t nroutes = 0;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--db") == 0) db_path = argv[i + 1];
    else if (strcmp(argv[i], "--listen") == 0) listen = argv[i + 1];
    else if (strcmp(argv[i], "--http") == 0) http_addr = argv[i + 1];
    else if (strcmp(argv[i], "--show") == 0) show_customer = argv[i + 1];
    else if (strcmp(argv[i], "--peer") == 0 && nroutes < MAX_PEERS) {
      snprintf(peer_buf[nroutes], sizeof peer_buf[nroutes], "%s", argv[i + 1]);
      char *eq = strchr(peer_buf[nroutes], '=');
      if (eq == NULL) usage();
      *eq = '\0';
      routes[nroutes] = (saga_tcp_route){peer_buf[nroutes], eq + 1, NULL};
      nroutes++;
    } else usage();
  }
  if (argc % 2 != 0) usage();
  int which = strcmp(role, "reservation") == 0 ? 0 : strcmp(role, "product") == 0 ? 1
              : strcmp(role, "delivery") == 0  ? 2 : strcmp(role, "mypage") == 0 ? 3 : -1;
  if (which < 0 || db_path == NULL) usage();
  if (show_customer != NULL) {
    if (which != 3) usage();
    return show(db_path, show_customer);
  }
  if (listen == NULL) usage();
  prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the driver that started it */
  const char *crash = getenv("RENTAL_CRASH");
  if (crash != NULL && crash[0] != '\0') {
    const char *colon = strrchr(crash, ':');
    if (colon == NULL || (size_t)(colon - crash) >= sizeof crash_point) usage();
    snprintf(crash_point, sizeof crash_point, "%.*s", (int)(colon - crash), crash);
    crash_at = strtol(colon + 1, NULL, 10);
  }
  loop = uv_default_loop();
  /* A stop asked for while starting is handled once the loop runs. */
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_init(loop, &sigint);
  uv_signal_start(&sigint, on_signal, SIGINT);

  /* Plaintext on loopback for the example; a deployment uses mutual TLS and access lists
   * (docs/security.md). */
  saga_tcp_config tc;
  saga_tcp_config_init(&tc);
  tc.listen = listen;
  tc.routes = routes;
  tc.nroutes = nroutes;
  tc.insecure_plaintext = 1;
  tc.reconnect_max_ms = 200;
  saga_transport *t = NULL;
  char err[256];
  if (saga_tcp_transport_new2(&t, &tc, err, sizeof err) != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", role, err);
    return 1;
  }
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = role;
  cfg.db_path = db_path;
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.transport = t;
  cfg.resend_ms = 200;
  cfg.test_hook = crash_at > 0 ? crash_hook : NULL;
  if (saga_node_open(&node, loop, &cfg, err, sizeof err) != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", role, err);
    return 1;
  }
  sqlite3 *db = saga_node_db(node);
  static char outcome_delivered[] = "DELIVERED", outcome_rejected[] = "REJECTED";
  rental_handler handler = NULL;
  int rc;
  switch (which) {
  case 0:
    rc = exec_script(db, schema_reservation);
    if (rc == SAGA_OK)
      rc = saga_node_on_event(node, "rental.reservation", "BookStocked", on_book_stocked, NULL);
    if (rc == SAGA_OK)
      rc = saga_node_on_event(node, "rental.reservation", "OutOfStock", on_outcome,
                              outcome_rejected);
    if (rc == SAGA_OK)
      rc = saga_node_on_event(node, "rental.reservation", "Delivered", on_outcome,
                              outcome_delivered);
    handler = reservation_http;
    break;
  case 1:
    rc = exec_script(db, schema_product);
    if (rc == SAGA_OK)
      rc = saga_node_on_event(node, "rental.product", "ReservationCreated",
                              on_reservation_created, NULL);
    if (rc == SAGA_OK)
      rc = saga_node_on_event(node, "rental.product", "ReservationCancelled",
                              on_reservation_cancelled_product, NULL);
    handler = product_http;
    break;
  case 2:
    rc = exec_script(db, schema_delivery);
    if (rc == SAGA_OK)
      rc = saga_node_on_event(node, "rental.delivery", "StockTaken", on_stock_taken, NULL);
    if (rc == SAGA_OK)
      rc = saga_node_on_event(node, "rental.delivery", "ReservationCancelled",
                              on_reservation_cancelled_delivery, NULL);
    handler = delivery_http;
    break;
  default:
    rc = exec_script(db, schema_mypage);
    if (rc == SAGA_OK) rc = saga_node_on_event(node, "rental.mypage", NULL, on_mypage_event, NULL);
    handler = mypage_http;
    break;
  }
  if (rc == SAGA_OK) rc = saga_node_start(node, NULL);
  if (rc != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", role, saga_node_errmsg(node));
    return 1;
  }
  if (http_addr != NULL && rental_http_start(&http, loop, http_addr, handler, NULL) != 0) {
    fprintf(stderr, "%s: cannot serve HTTP on %s\n", role, http_addr);
    return 1;
  }
  printf("%s: running, events on %s%s%s\n", role, listen, http_addr ? ", HTTP on " : "",
         http_addr ? http_addr : "");
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}
