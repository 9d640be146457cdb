/*
 * The account service (docs/shop.md): customers, sign-up, login and token refresh, and the
 * customer's personal and shipping details. It takes no part in the saga; it owns its own
 * SQLite database, <data_dir>/account.db (WAL, synchronous FULL), and answers on the loop
 * thread. The connection and its statements, prepared once at init, live in one static
 * (there is one account service per process); shop_account_close() releases them.
 *
 * Passwords are stored as argon2id hashes (libsodium crypto_pwhash_str_alg with the
 * "interactive" limits: 64 MiB and ~50-100 ms per hash). Hashing at sign-up and verifying at
 * login run on the loop thread and stall every other request meanwhile. That is acceptable
 * for the example; a real service would move them to the libuv thread pool (uv_queue_work).
 *
 * Every bad input gets a 4xx with {"msg": ...}: text fields must be non-empty JSON strings
 * with no control characters and a capped length; e-mail addresses and phone numbers get a
 * plausibility check. E-mail addresses are unique regardless of case.
 */
#include <sodium.h>
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

#include "shop.h"

/* Not in shop.h (which this service must not change): services.c declares it too and calls
 * it from shop_services_close(). Finalizes the statements and closes account.db; safe to call
 * when shop_account_init() never ran or failed, and more than once. */
void shop_account_close(void);

#define NAME_MAX_LEN 256    /* bytes of firstname, lastname */
#define ADDRESS_MAX_LEN 256 /* bytes of address */
#define EMAIL_MAX_LEN 254   /* bytes of an e-mail address (RFC 5321 path limit) */
#define PHONE_MAX_LEN 32    /* bytes of phone_number */
#define PASSWORD_MIN 8      /* characters (code points) of a password */
#define PASSWORD_MAX 128

static const char SCHEMA[] = "CREATE TABLE IF NOT EXISTS customers ("
                             " id INTEGER PRIMARY KEY,"
                             " active INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),"
                             " first_name TEXT NOT NULL,"
                             " last_name TEXT NOT NULL,"
                             " email TEXT NOT NULL UNIQUE COLLATE NOCASE,"
                             " address TEXT NOT NULL,"
                             " phone TEXT NOT NULL UNIQUE,"
                             " password_hash TEXT NOT NULL)";

enum {
  ST_INSERT,
  ST_LOGIN,
  ST_ACTIVE,
  ST_EMAIL_TAKEN,
  ST_PHONE_TAKEN,
  ST_GET_PERSON,
  ST_SET_PERSON,
  ST_GET_SHIPPING,
  ST_SET_SHIPPING,
  N_STMTS
};

static const char *const STMT_SQL[N_STMTS] = {
    [ST_INSERT] = "INSERT INTO customers (active, first_name, last_name, email, address, phone,"
                  " password_hash) VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
    [ST_LOGIN] = "SELECT id, active, password_hash FROM customers WHERE email = ?1",
    [ST_ACTIVE] = "SELECT active FROM customers WHERE id = ?1",
    /* ?2 is the customer being updated (0 at sign-up): their own value is not a duplicate. */
    [ST_EMAIL_TAKEN] = "SELECT 1 FROM customers WHERE email = ?1 AND id <> ?2",
    [ST_PHONE_TAKEN] = "SELECT 1 FROM customers WHERE phone = ?1 AND id <> ?2",
    [ST_GET_PERSON] = "SELECT first_name, last_name, email FROM customers WHERE id = ?1",
    [ST_SET_PERSON] = "UPDATE customers SET first_name = ?1, last_name = ?2, email = ?3"
                      " WHERE id = ?4",
    [ST_GET_SHIPPING] = "SELECT address, phone FROM customers WHERE id = ?1",
    [ST_SET_SHIPPING] = "UPDATE customers SET address = ?1, phone = ?2 WHERE id = ?3",
};

typedef struct account {
  const shop_ctx *c;
  sqlite3 *db;
  sqlite3_stmt *st[N_STMTS];
} account;

static account g_account;

/* ---- statements --------------------------------------------------------------------------- */

/* Readies a prepared statement for the next use. Bindings are cleared too: they point into
 * the request's JSON (SQLITE_STATIC), which goes away with the request. */
static void st_done(sqlite3_stmt *st) {
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
}

static void bind_text(sqlite3_stmt *st, int i, const char *s) {
  sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC);
}

static void reply_db_error(account *a, shop_req *r, const char *what) {
  fprintf(stderr, "[account] %s: %s\n", what, sqlite3_errmsg(a->db));
  shop_reply_error(r, 500, "database error");
}

static const char *col_text(sqlite3_stmt *st, int i) {
  const unsigned char *s = sqlite3_column_text(st, i);
  return s != NULL ? (const char *)s : "";
}

/* Is value (an email or phone) held by a customer other than except? 1, 0, or -1 on a
 * database error. */
static int taken(account *a, int which, const char *value, int64_t except) {
  sqlite3_stmt *st = a->st[which];
  bind_text(st, 1, value);
  sqlite3_bind_int64(st, 2, except);
  int rc = sqlite3_step(st);
  st_done(st);
  return rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : -1;
}

/* Answers 400 if email or phone (either may be NULL) belongs to another customer; 500 on a
 * database error. 0 when both are free, -1 when it answered. */
static int check_unique(account *a, shop_req *r, const char *email, const char *phone,
                        int64_t except) {
  int t = email != NULL ? taken(a, ST_EMAIL_TAKEN, email, except) : 0;
  if (t == 0 && phone != NULL) {
    t = taken(a, ST_PHONE_TAKEN, phone, except);
    if (t == 1) t = 2;
  }
  if (t == 0) return 0;
  if (t < 0)
    reply_db_error(a, r, "uniqueness check");
  else
    shop_reply_error(r, 400, t == 1 ? "email already in use" : "phone_number already in use");
  return -1;
}

/* Runs an INSERT or UPDATE already bound. 0 on success; otherwise answers (400 for a unique
 * constraint, which the pre-checks make unlikely but another writer could still cause; 500
 * for anything else) and returns -1. */
static int run_write(account *a, shop_req *r, sqlite3_stmt *st, const char *what) {
  int rc = sqlite3_step(st);
  int ext = sqlite3_extended_errcode(a->db);
  if (rc == SQLITE_DONE) {
    st_done(st);
    return 0;
  }
  if (ext == SQLITE_CONSTRAINT_UNIQUE)
    shop_reply_error(r, 400, "email or phone_number already in use");
  else
    reply_db_error(a, r, what);
  st_done(st);
  return -1;
}

/* ---- input -------------------------------------------------------------------------------- */

/* The checks below only read the body and say what is wrong (the 400 message, in msg); the
 * routes answer. shop_account_check() runs the same checks without a server (tests/fuzz). */
#define MSG_LEN 160

/* The request body as a JSON object, or answers 400 and returns NULL. */
static json_t *body_of(shop_req *r) {
  json_t *b = shop_req_json(r);
  if (b == NULL) shop_reply_error(r, 400, "the body must be a JSON object");
  return b;
}

/* Reads body[key] as a text field: a JSON string of 1..max bytes, without control characters,
 * not only spaces. Sets *out (borrowed from body) and returns 0, or says why in msg and
 * returns -1. */
static int text_field(json_t *body, const char *key, size_t max, const char **out, char *msg) {
  json_t *v = json_object_get(body, key);
  if (v == NULL) {
    snprintf(msg, MSG_LEN, "%s is required", key);
    return -1;
  }
  if (!json_is_string(v)) {
    snprintf(msg, MSG_LEN, "%s must be a string", key);
    return -1;
  }
  const char *s = json_string_value(v);
  size_t n = json_string_length(v);
  int blank = 1;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch < 0x20 || ch == 0x7f) {
      snprintf(msg, MSG_LEN, "%s must not contain control characters", key);
      return -1;
    }
    if (ch != ' ') blank = 0;
  }
  if (n == 0 || blank) {
    snprintf(msg, MSG_LEN, "%s must not be empty", key);
    return -1;
  }
  if (n > max) {
    snprintf(msg, MSG_LEN, "%s must be at most %zu bytes", key, max);
    return -1;
  }
  *out = s;
  return 0;
}

/* A plausible address: one '@', a local part of 1..64 bytes, a dotted domain; no spaces. The
 * only proof an address is real is mail to it, which the example does not send. */
static int email_field(json_t *body, const char **out, char *msg) {
  const char *s;
  if (text_field(body, "email", EMAIL_MAX_LEN, &s, msg) != 0) return -1;
  const char *at = strchr(s, '@'), *dom = at != NULL ? at + 1 : NULL;
  int ok = at != NULL && at > s && at - s <= 64 && strchr(dom, '@') == NULL &&
           strchr(s, ' ') == NULL && dom[0] != '\0' && dom[0] != '.' && strchr(dom, '.') != NULL &&
           dom[strlen(dom) - 1] != '.' && strstr(dom, "..") == NULL;
  if (!ok) {
    snprintf(msg, MSG_LEN, "email is not a valid e-mail address");
    return -1;
  }
  *out = s;
  return 0;
}

/* A phone number: digits with optional spaces, hyphens, parentheses and a leading '+'; 4 to
 * 20 digits. It is stored as given (so "0912-345678" and "0912345678" are distinct). */
static int phone_field(json_t *body, const char **out, char *msg) {
  const char *s;
  if (text_field(body, "phone_number", PHONE_MAX_LEN, &s, msg) != 0) return -1;
  int digits = 0, ok = 1;
  for (const char *p = s; *p && ok; p++) {
    if (*p >= '0' && *p <= '9')
      digits++;
    else if (*p == '+')
      ok = p == s;
    else
      ok = strchr(" -()", *p) != NULL;
  }
  if (!ok || digits < 4 || digits > 20) {
    snprintf(msg, MSG_LEN, "phone_number is not a valid phone number");
    return -1;
  }
  *out = s;
  return 0;
}

/* A password: a string of PASSWORD_MIN..PASSWORD_MAX characters (code points; any
 * characters, spaces included). With check_min 0 (login) any non-empty length up to the
 * maximum is accepted: a wrong one is then 401, not 400. */
static int password_field(json_t *body, int check_min, const char **out, char *msg) {
  json_t *v = json_object_get(body, "password");
  if (!json_is_string(v)) {
    snprintf(msg, MSG_LEN, "%s", v == NULL ? "password is required" : "password must be a string");
    return -1;
  }
  const char *s = json_string_value(v);
  size_t n = json_string_length(v), chars = 0;
  for (size_t i = 0; i < n; i++)
    if (((unsigned char)s[i] & 0xc0) != 0x80) chars++; /* jansson guarantees valid UTF-8 */
  if (chars == 0 || chars > PASSWORD_MAX || (check_min && chars < PASSWORD_MIN)) {
    snprintf(msg, MSG_LEN, "password must be %d to %d characters", PASSWORD_MIN, PASSWORD_MAX);
    return -1;
  }
  *out = s;
  return 0;
}

/* The fields of one request body, borrowed from it. */
typedef struct account_input {
  const char *pw, *first, *last, *email, *address, *phone, *refresh;
} account_input;

/* Checks the body of a form ("signup", "login", "refresh", "person", "shipping") field by
 * field, in this order, stopping at the first bad one. 0, or -1 with the 400 message. */
static int check_form(const char *form, json_t *b, account_input *in, char *msg) {
  memset(in, 0, sizeof *in);
  if (strcmp(form, "signup") == 0)
    return password_field(b, 1, &in->pw, msg) != 0 ||
                   text_field(b, "firstname", NAME_MAX_LEN, &in->first, msg) != 0 ||
                   text_field(b, "lastname", NAME_MAX_LEN, &in->last, msg) != 0 ||
                   email_field(b, &in->email, msg) != 0 ||
                   text_field(b, "address", ADDRESS_MAX_LEN, &in->address, msg) != 0 ||
                   phone_field(b, &in->phone, msg) != 0
               ? -1
               : 0;
  if (strcmp(form, "login") == 0)
    return text_field(b, "email", EMAIL_MAX_LEN, &in->email, msg) != 0 ||
                   password_field(b, 0, &in->pw, msg) != 0
               ? -1
               : 0;
  if (strcmp(form, "refresh") == 0) {
    json_t *v = json_object_get(b, "refresh_token");
    if (!json_is_string(v) || json_string_length(v) == 0) {
      snprintf(msg, MSG_LEN, "refresh_token must be a non-empty string");
      return -1;
    }
    in->refresh = json_string_value(v);
    return 0;
  }
  if (strcmp(form, "person") == 0)
    return text_field(b, "firstname", NAME_MAX_LEN, &in->first, msg) != 0 ||
                   text_field(b, "lastname", NAME_MAX_LEN, &in->last, msg) != 0 ||
                   email_field(b, &in->email, msg) != 0
               ? -1
               : 0;
  if (strcmp(form, "shipping") == 0)
    return text_field(b, "address", ADDRESS_MAX_LEN, &in->address, msg) != 0 ||
                   phone_field(b, &in->phone, msg) != 0
               ? -1
               : 0;
  snprintf(msg, MSG_LEN, "unknown form");
  return -1;
}

int shop_account_check(const char *form, json_t *body, char *msg, size_t msglen) {
  char m[MSG_LEN] = "";
  account_input in;
  int rc = body != NULL ? check_form(form, body, &in, m) : -1;
  if (body == NULL) snprintf(m, sizeof m, "the body must be a JSON object");
  if (msglen > 0) snprintf(msg, msglen, "%s", m);
  return rc;
}

/* The body of the request checked as form; 0 with *in filled, or answers 400 and returns -1. */
static int read_form(shop_req *r, const char *form, account_input *in) {
  char msg[MSG_LEN];
  json_t *b = body_of(r);
  if (b == NULL) return -1;
  if (check_form(form, b, in, msg) != 0) {
    shop_reply_error(r, 400, msg);
    return -1;
  }
  return 0;
}

/* Answers 200/201 with a new token pair for id. */
static void reply_tokens(account *a, shop_req *r, int status, int64_t id) {
  json_t *pair = shop_auth_issue(a->c, id);
  if (pair == NULL)
    shop_reply_error(r, 500, "cannot issue tokens");
  else
    shop_reply_json(r, status, pair);
}

/* ---- routes ------------------------------------------------------------------------------- */

/* POST /api/account/auth/signup {password, firstname, lastname, email, address, phone_number}
 * → 201 {refresh_token, access_token}. */
static void on_signup(shop_req *r, void *arg) {
  account *a = arg;
  account_input in;
  if (read_form(r, "signup", &in) != 0) return;
  const char *pw = in.pw, *first = in.first, *last = in.last, *email = in.email,
             *address = in.address, *phone = in.phone;
  /* Duplicates are refused before the (costly) hashing. */
  if (check_unique(a, r, email, phone, 0) != 0) return;
  char hash[crypto_pwhash_STRBYTES];
  if (crypto_pwhash_str_alg(hash, pw, strlen(pw), crypto_pwhash_OPSLIMIT_INTERACTIVE,
                            crypto_pwhash_MEMLIMIT_INTERACTIVE,
                            crypto_pwhash_ALG_ARGON2ID13) != 0) {
    shop_reply_error(r, 500, "cannot hash the password"); /* out of memory */
    return;
  }
  sqlite3_stmt *st = a->st[ST_INSERT];
  bind_text(st, 1, first);
  bind_text(st, 2, last);
  bind_text(st, 3, email);
  bind_text(st, 4, address);
  bind_text(st, 5, phone);
  bind_text(st, 6, hash);
  if (run_write(a, r, st, "insert customer") != 0) return;
  reply_tokens(a, r, 201, (int64_t)sqlite3_last_insert_rowid(a->db));
}

/* POST /api/account/auth/login {email, password} → 200 token pair; 404 unknown email; 401
 * wrong password. */
static void on_login(shop_req *r, void *arg) {
  account *a = arg;
  account_input in;
  if (read_form(r, "login", &in) != 0) return;
  const char *email = in.email, *pw = in.pw;
  sqlite3_stmt *st = a->st[ST_LOGIN];
  bind_text(st, 1, email);
  int rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) {
    if (rc == SQLITE_DONE)
      shop_reply_error(r, 404, "customer not found");
    else
      reply_db_error(a, r, "login");
    st_done(st);
    return;
  }
  int64_t id = sqlite3_column_int64(st, 0);
  int active = sqlite3_column_int(st, 1);
  char hash[crypto_pwhash_STRBYTES];
  snprintf(hash, sizeof hash, "%s", col_text(st, 2));
  st_done(st);
  if (crypto_pwhash_str_verify(hash, pw, strlen(pw)) != 0) {
    shop_reply_error(r, 401, "wrong password");
    return;
  }
  if (!active) {
    shop_reply_error(r, 403, "account disabled");
    return;
  }
  reply_tokens(a, r, 200, id);
}

/* POST /api/account/auth/refresh {refresh_token} → 200 new pair; 401 if the token is not a
 * valid, unexpired refresh token of an existing, active customer. */
static void on_refresh(shop_req *r, void *arg) {
  account *a = arg;
  account_input in;
  if (read_form(r, "refresh", &in) != 0) return;
  int64_t id;
  if (shop_auth_refresh(a->c, in.refresh, &id) != 0) {
    shop_reply_error(r, 401, "invalid or expired refresh token");
    return;
  }
  sqlite3_stmt *st = a->st[ST_ACTIVE];
  sqlite3_bind_int64(st, 1, id);
  int rc = sqlite3_step(st);
  int active = rc == SQLITE_ROW && sqlite3_column_int(st, 0) == 1;
  st_done(st);
  if (rc != SQLITE_ROW && rc != SQLITE_DONE)
    reply_db_error(a, r, "refresh");
  else if (!active)
    shop_reply_error(r, 401, "customer not found or disabled");
  else
    reply_tokens(a, r, 200, id);
}

/* GET /api/account/info/person → {firstname, lastname, email};
 * GET /api/account/info/shipping → {address, phone_number}. */
static void reply_info(account *a, shop_req *r, int which) {
  int64_t id;
  if (shop_auth_customer(a->c, r, &id) != 0) return;
  sqlite3_stmt *st = a->st[which];
  sqlite3_bind_int64(st, 1, id);
  int rc = sqlite3_step(st);
  json_t *o = NULL;
  if (rc == SQLITE_ROW && which == ST_GET_PERSON)
    o = json_pack("{s:s, s:s, s:s}", "firstname", col_text(st, 0), "lastname", col_text(st, 1),
                  "email", col_text(st, 2));
  else if (rc == SQLITE_ROW)
    o = json_pack("{s:s, s:s}", "address", col_text(st, 0), "phone_number", col_text(st, 1));
  if (rc == SQLITE_DONE)
    shop_reply_error(r, 404, "customer not found");
  else if (rc != SQLITE_ROW)
    reply_db_error(a, r, "read customer");
  else if (o == NULL)
    shop_reply_error(r, 500, "out of memory");
  else
    shop_reply_json(r, 200, o);
  st_done(st);
}

static void on_get_person(shop_req *r, void *arg) { reply_info(arg, r, ST_GET_PERSON); }
static void on_get_shipping(shop_req *r, void *arg) { reply_info(arg, r, ST_GET_SHIPPING); }

/* Answers after an UPDATE of customer id: 200 {"msg":"ok"}, or 404 if there is no such
 * customer (the token outlived the account). */
static void reply_updated(account *a, shop_req *r) {
  if (sqlite3_changes(a->db) == 0)
    shop_reply_error(r, 404, "customer not found");
  else
    shop_reply_json(r, 200, json_pack("{s:s}", "msg", "ok"));
}

/* PUT /api/account/info/person {firstname, lastname, email} → {"msg":"ok"}. */
static void on_put_person(shop_req *r, void *arg) {
  account *a = arg;
  int64_t id;
  if (shop_auth_customer(a->c, r, &id) != 0) return;
  account_input in;
  if (read_form(r, "person", &in) != 0) return;
  const char *first = in.first, *last = in.last, *email = in.email;
  if (check_unique(a, r, email, NULL, id) != 0) return;
  sqlite3_stmt *st = a->st[ST_SET_PERSON];
  bind_text(st, 1, first);
  bind_text(st, 2, last);
  bind_text(st, 3, email);
  sqlite3_bind_int64(st, 4, id);
  if (run_write(a, r, st, "update person") == 0) reply_updated(a, r);
}

/* PUT /api/account/info/shipping {address, phone_number} → {"msg":"ok"}. */
static void on_put_shipping(shop_req *r, void *arg) {
  account *a = arg;
  int64_t id;
  if (shop_auth_customer(a->c, r, &id) != 0) return;
  account_input in;
  if (read_form(r, "shipping", &in) != 0) return;
  const char *address = in.address, *phone = in.phone;
  if (check_unique(a, r, NULL, phone, id) != 0) return;
  sqlite3_stmt *st = a->st[ST_SET_SHIPPING];
  bind_text(st, 1, address);
  bind_text(st, 2, phone);
  sqlite3_bind_int64(st, 3, id);
  if (run_write(a, r, st, "update shipping") == 0) reply_updated(a, r);
}

/* ---- setup -------------------------------------------------------------------------------- */

int shop_account_init(shop_ctx *c) {
  account *a = &g_account;
  char path[4096];
  if (a->db != NULL) {
    fprintf(stderr, "[account] already initialized\n");
    return -1;
  }
  if (c->jwt_secret == NULL || c->jwt_secret[0] == '\0') {
    fprintf(stderr, "[account] an empty JWT secret would make every token forgeable\n");
    return -1;
  }
  if (strlen(c->jwt_secret) < 32)
    fprintf(stderr, "[account] warning: the JWT secret is shorter than 32 bytes\n");
  if (sodium_init() < 0) {
    fprintf(stderr, "[account] libsodium cannot be initialized\n");
    return -1;
  }
  if ((size_t)snprintf(path, sizeof path, "%s/account.db", c->data_dir) >= sizeof path) {
    fprintf(stderr, "[account] data directory path too long\n");
    return -1;
  }
  a->c = c;
  if (sqlite3_open_v2(path, &a->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK)
    goto fail;
  /* Only this service opens account.db, so waiting on a lock (which would stall the loop)
   * should not happen; a short timeout covers an operator's sqlite3 shell. */
  sqlite3_busy_timeout(a->db, 1000);
  if (sqlite3_exec(a->db, "PRAGMA journal_mode = WAL", NULL, NULL, NULL) != SQLITE_OK ||
      sqlite3_exec(a->db, "PRAGMA synchronous = FULL", NULL, NULL, NULL) != SQLITE_OK ||
      sqlite3_exec(a->db, SCHEMA, NULL, NULL, NULL) != SQLITE_OK)
    goto fail;
  for (int i = 0; i < N_STMTS; i++)
    if (sqlite3_prepare_v3(a->db, STMT_SQL[i], -1, SQLITE_PREPARE_PERSISTENT, &a->st[i], NULL) !=
        SQLITE_OK)
      goto fail;
  if (shop_http_route(c->http, "POST", "/api/account/auth/signup", on_signup, a) != 0 ||
      shop_http_route(c->http, "POST", "/api/account/auth/login", on_login, a) != 0 ||
      shop_http_route(c->http, "POST", "/api/account/auth/refresh", on_refresh, a) != 0 ||
      shop_http_route(c->http, "GET", "/api/account/info/person", on_get_person, a) != 0 ||
      shop_http_route(c->http, "PUT", "/api/account/info/person", on_put_person, a) != 0 ||
      shop_http_route(c->http, "GET", "/api/account/info/shipping", on_get_shipping, a) != 0 ||
      shop_http_route(c->http, "PUT", "/api/account/info/shipping", on_put_shipping, a) != 0) {
    fprintf(stderr, "[account] cannot add routes\n");
    shop_account_close();
    return -1;
  }
  return 0;
fail:
  fprintf(stderr, "[account] %s: %s\n", path,
          a->db != NULL ? sqlite3_errmsg(a->db) : "out of memory");
  shop_account_close();
  return -1;
}

void shop_account_close(void) {
  account *a = &g_account;
  for (int i = 0; i < N_STMTS; i++) sqlite3_finalize(a->st[i]); /* NULL is a no-op */
  sqlite3_close(a->db);
  memset(a, 0, sizeof *a);
}
