/*
 * The end-to-end tests of the shop's HTTP API (docs/shop.md) and their helpers,
 * against any base URL (e2e_url): the embedded server (test_shop.c) or the distributed shop
 * behind nginx (test_cluster.c). See e2e.h.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <sodium.h>

#include "e2e.h"

char e2e_url[128];

/* ---- requests ---------------------------------------------------------------------------------
 */

char *dump(const json_t *j) {
  static _Thread_local char b[512];
  char *t = j ? json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
  snprintf(b, sizeof b, "%s", t ? t : "(no JSON body)");
  free(t);
  return b;
}

shop_client *client(const char *token) {
  shop_client *c = NULL;
  assert_int_equal(shop_client_new(&c, e2e_url), 0);
  if (token) shop_client_set_token(c, token);
  return c;
}

/* Sends body (taken, may be NULL) and checks the status; returns the answer (owned). */
json_t *call_expect(shop_client *c, long want, const char *method, const char *path, json_t *body,
                    const char *why) {
  json_t *out = NULL;
  long st = shop_call(c, method, path, body, &out);
  json_decref(body);
  if (st != want) {
    print_error("%s %s (%s): got %ld, expected %ld: %s\n", method, path, why ? why : "", st, want,
                dump(out));
    json_decref(out);
    fail();
  }
  return out;
}

/* Checks an error answer: status want and a {"msg": "..."} body. */
void error_expect(shop_client *c, long want, const char *method, const char *path, json_t *body,
                  const char *why) {
  json_t *out = call_expect(c, want, method, path, body, why);
  if (!json_is_string(json_object_get(out, "msg"))) {
    print_error("%s %s (%s): %ld without {\"msg\": ...}: %s\n", method, path, why, want, dump(out));
    json_decref(out);
    fail();
  }
  json_decref(out);
}

/* A raw request; returns the status, *out the answer (owned, may be NULL). */
long raw(shop_client *c, const char *method, const char *path, const char *body, size_t len,
         const char *authorization, json_t **out) {
  shop_send_opts o;
  memset(&o, 0, sizeof o);
  o.body = body;
  o.body_len = len;
  o.authorization = authorization;
  shop_resp r;
  long st = shop_client_send(c, method, path, &o, &r);
  if (out) {
    *out = r.json;
    r.json = NULL;
  }
  shop_resp_destroy(&r);
  return st;
}

long status_of(shop_client *c, const char *method, const char *path, const char *authz) {
  return raw(c, method, path, NULL, 0, authz, NULL);
}

void expect_one_of(long got, long a, long b, const char *what) {
  if (got != a && got != b) {
    print_error("%s: got %ld, expected %ld or %ld\n", what, got, a, b);
    fail();
  }
}

/* ---- customers and products ------------------------------------------------------------------ */

static unsigned long next_tag(void) {
  static unsigned long n;
  return (unsigned long)getpid() * 1000UL + __atomic_add_fetch(&n, 1, __ATOMIC_SEQ_CST);
}

static json_t *signup_body(const char *email, const char *phone, const char *password) {
  return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "password", password, "firstname", "Grace",
                   "lastname", "Hopper", "email", email, "address", "1 Harbor Lane", "phone_number",
                   phone);
}

static void check_pair(const json_t *r) {
  const char *a = json_string_value(json_object_get(r, "access_token"));
  const char *f = json_string_value(json_object_get(r, "refresh_token"));
  if (a == NULL || f == NULL || strchr(a, '.') == NULL || strchr(f, '.') == NULL ||
      strcmp(a, f) == 0) {
    print_error("not a token pair: %s\n", dump(r));
    fail();
  }
}

void customer_new(customer *cu) {
  memset(cu, 0, sizeof *cu);
  unsigned long t = next_tag();
  snprintf(cu->email, sizeof cu->email, "e2e-%lu@shop.test", t);
  snprintf(cu->phone, sizeof cu->phone, "+4%lu", t);
  snprintf(cu->password, sizeof cu->password, "secret-%lu", t);
  cu->c = client(NULL);
  json_t *r = CALL(cu->c, 201, "POST", "/api/account/auth/signup",
                   signup_body(cu->email, cu->phone, cu->password));
  check_pair(r);
  cu->access = strdup(json_string_value(json_object_get(r, "access_token")));
  cu->refresh = strdup(json_string_value(json_object_get(r, "refresh_token")));
  json_decref(r);
  shop_client_set_token(cu->c, cu->access);
}

void customer_free(customer *cu) {
  shop_client_free(cu->c);
  free(cu->access);
  free(cu->refresh);
}

json_t *product_new(shop_client *c, const char *name, int price, int inventory) {
  json_t *r = CALL(c, 201, "POST", "/api/product",
                   json_pack("{s:s, s:s, s:s, s:i, s:i}", "name", name, "description",
                             "made for the e2e test", "brand_name", "Testco", "price", price,
                             "inventory", inventory));
  json_t *id = json_incref(json_object_get(r, "id"));
  if (!json_is_integer(id) && !json_is_string(id)) {
    print_error("POST /api/product: no id: %s\n", dump(r));
    fail();
  }
  json_decref(r);
  return id;
}

const char *sid(const json_t *id) {
  static _Thread_local char b[4][64];
  static _Thread_local int i;
  i = (i + 1) % 4;
  return shop_id_str(id, b[i], sizeof b[i]);
}

long long inventory_of(shop_client *c, const json_t *id) {
  char path[128];
  snprintf(path, sizeof path, "/api/product/%s", sid(id));
  json_t *r = CALL(c, 200, "GET", path, NULL);
  json_t *inv = json_object_get(r, "inventory");
  assert_true(json_is_integer(inv));
  long long v = json_integer_value(inv);
  json_decref(r);
  return v;
}

json_t *item(const json_t *product, json_int_t amount) {
  return json_pack("{s:O, s:I}", "product_id", (json_t *)product, "amount", amount);
}

json_t *purchase_body(json_t *items, const char *currency) {
  return json_pack("{s:o, s:{s:s}}", "purchase_items", items, "payment", "currency_code", currency);
}

/* POSTs a purchase of items (taken) and returns its id (owned). */
json_t *buy(shop_client *c, json_t *items, const char *currency) {
  json_t *r = CALL(c, 201, "POST", "/api/purchase", purchase_body(items, currency));
  json_t *id = json_incref(json_object_get(r, "purchase_id"));
  if (!json_is_integer(id) && !json_is_string(id)) {
    print_error("POST /api/purchase: no purchase_id: %s\n", dump(r));
    fail();
  }
  json_decref(r);
  return id;
}

json_t *buy1(shop_client *c, const json_t *product, json_int_t amount) {
  json_t *items = json_array();
  json_array_append_new(items, item(product, amount));
  return buy(c, items, "US");
}

/* ---- the result stream ------------------------------------------------------------------------
 */

void stream_open(stream *s, const char *token) {
  memset(s, 0, sizeof *s);
  assert_int_equal(shop_events_open(&s->ev, e2e_url, "/api/purchase/result", token), 0);
  long st = shop_events_wait_open(s->ev, 10000);
  if (st != 200) {
    print_error("GET /api/purchase/result: got %ld, expected 200\n", st);
    fail();
  }
  s->all = json_array();
}

void stream_close(stream *s) {
  shop_events_close(s->ev);
  for (size_t i = 0; i < s->n; i++) {
    shop_track_destroy(s->t[i]);
    free(s->t[i]);
  }
  free(s->t);
  json_decref(s->all);
}

shop_track *stream_track(stream *s, const char *id) {
  for (size_t i = 0; i < s->n; i++)
    if (strcmp(s->t[i]->id, id) == 0) return s->t[i];
  shop_track **p = realloc(s->t, (s->n + 1) * sizeof *p);
  assert_non_null(p);
  s->t = p;
  s->t[s->n] = malloc(sizeof **s->t);
  assert_non_null(s->t[s->n]);
  shop_track_init(s->t[s->n], id);
  return s->t[s->n++];
}

/* Takes one event (waiting up to ms); 1 if one came. */
int stream_pump(stream *s, int ms) {
  json_t *ev = shop_events_next(s->ev, ms);
  if (ev == NULL) return 0;
  char id[64];
  shop_id_str(json_object_get(ev, "purchase_id"), id, sizeof id);
  shop_track_add(stream_track(s, id), ev);
  json_array_append_new(s->all, ev);
  return 1;
}

/* Waits until purchase id reached its final status; returns the outcome (fails on timeout). */
shop_track *stream_wait(stream *s, const json_t *id, int ms) {
  shop_track *t = stream_track(s, sid(id));
  long long deadline = shop_now_ms() + ms;
  while (shop_track_outcome(t) == SHOP_PENDING) {
    long long left = deadline - shop_now_ms();
    if (left <= 0) {
      print_error("purchase %s: no final status within %d ms; streamed so far: %s\n", t->id, ms,
                  dump(t->events));
      fail();
    }
    stream_pump(s, (int)left);
  }
  return t;
}

/* Makes one more purchase of sentinel and waits for its success: every event of the purchases
 * that ended before it has then been streamed, so their sequences can be checked as complete. */
void stream_sync(stream *s, shop_client *c, const json_t *sentinel) {
  json_t *id = buy1(c, sentinel, 1);
  shop_track *t = stream_wait(s, id, WAIT_MS);
  if (shop_track_outcome(t) != SHOP_SUCCEEDED) {
    print_error("sentinel purchase %s: %s: %s\n", t->id, shop_outcome_name(shop_track_outcome(t)),
                dump(t->events));
    fail();
  }
  json_decref(id);
}

/* Checks the exact statuses streamed for a purchase ("STEP STATUS; ..."), and that every event
 * carries the purchase id and a timestamp. */
void assert_sequence(stream *s, const json_t *id, const char *want) {
  shop_track *t = stream_track(s, sid(id));
  char got[2048] = "";
  size_t n = json_array_size(t->events);
  for (size_t i = 0; i < n; i++) {
    json_t *ev = json_array_get(t->events, i);
    const char *step = json_string_value(json_object_get(ev, "step"));
    const char *status = json_string_value(json_object_get(ev, "status"));
    size_t used = strlen(got);
    snprintf(got + used, sizeof got - used, "%s%s %s", i ? "; " : "", step ? step : "?",
             status ? status : "?");
    if (!json_equal(json_object_get(ev, "purchase_id"), (json_t *)id) ||
        !json_is_integer(json_object_get(ev, "timestamp")) ||
        json_integer_value(json_object_get(ev, "timestamp")) <= 0) {
      print_error("event without purchase_id %s or timestamp: %s\n", sid(id), dump(ev));
      fail();
    }
  }
  if (strcmp(got, want) != 0) {
    print_error("purchase %s streamed\n  %s\nexpected\n  %s\n", sid(id), got, want);
    fail();
  }
}

/* ---- JWTs by hand ------------------------------------------------------------------------------
 */

static char *b64url(const void *bin, size_t n) {
  size_t len = sodium_base64_ENCODED_LEN(n, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  char *out = malloc(len);
  assert_non_null(out);
  sodium_bin2base64(out, len, bin, n, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  return out;
}

static char *b64url_json(const json_t *j) {
  char *t = json_dumps(j, JSON_COMPACT);
  char *out = b64url(t, strlen(t));
  free(t);
  return out;
}

/* The payload (claims) of a JWT, decoded. */
static json_t *jwt_claims(const char *token) {
  const char *a = strchr(token, '.');
  assert_non_null(a);
  const char *b = strchr(a + 1, '.');
  assert_non_null(b);
  unsigned char bin[4096];
  size_t n = 0;
  assert_int_equal(sodium_base642bin(bin, sizeof bin, a + 1, (size_t)(b - a - 1), NULL, &n, NULL,
                                     sodium_base64_VARIANT_URLSAFE_NO_PADDING),
                   0);
  json_t *claims = json_loadb((const char *)bin, n, 0, NULL);
  assert_true(json_is_object(claims));
  return claims;
}

/* "<header>.<claims>.<signature>": HS256 with key when key is not NULL, else no signature. */
static char *jwt_make(const char *alg, const json_t *claims, const char *key) {
  json_t *hdr = json_pack("{s:s, s:s}", "alg", alg, "typ", "JWT");
  char *h = b64url_json(hdr), *p = b64url_json(claims);
  json_decref(hdr);
  size_t n = strlen(h) + strlen(p) + 128;
  char *tok = malloc(n);
  assert_non_null(tok);
  snprintf(tok, n, "%s.%s.", h, p);
  if (key != NULL) {
    unsigned char mac[crypto_auth_hmacsha256_BYTES];
    crypto_auth_hmacsha256_state st;
    crypto_auth_hmacsha256_init(&st, (const unsigned char *)key, strlen(key));
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)tok, strlen(tok) - 1);
    crypto_auth_hmacsha256_final(&st, mac);
    char *sig = b64url(mac, sizeof mac);
    snprintf(tok + strlen(tok), n - strlen(tok), "%s", sig);
    free(sig);
  }
  free(h);
  free(p);
  return tok;
}

static char *bearer(const char *token) {
  size_t n = strlen(token) + 8;
  char *b = malloc(n);
  assert_non_null(b);
  snprintf(b, n, "Bearer %s", token);
  return b;
}

/* The status of GET /api/account/info/person with this token. */
static long person_with(shop_client *c, const char *token) {
  char *b = bearer(token);
  long st = status_of(c, "GET", "/api/account/info/person", b);
  free(b);
  return st;
}

/* ---- tests: account -------------------------------------------------------------------------- */

void test_signup_login(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  shop_client_set_token(c, NULL);
  unsigned long t = next_tag();
  char email[128], phone[32];
  snprintf(email, sizeof email, "other-%lu@shop.test", t);
  snprintf(phone, sizeof phone, "+5%lu", t);

  /* Duplicates: the same email with another phone, the same phone with another email. */
  ERR(c, 400, "POST", "/api/account/auth/signup", signup_body(a.email, phone, "password-123"));
  ERR(c, 400, "POST", "/api/account/auth/signup", signup_body(email, a.phone, "password-123"));

  /* Bad bodies. */
  static const char *const fields[] = {"password", "firstname", "lastname",
                                       "email",    "address",   "phone_number"};
  for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
    json_t *b = signup_body(email, phone, "password-123");
    json_object_del(b, fields[i]);
    if (json_object_size(b) != 5) fail();
    error_expect(c, 400, "POST", "/api/account/auth/signup", b, fields[i]);
    b = signup_body(email, phone, "password-123");
    json_object_set_new(b, fields[i], json_integer(12345678));
    error_expect(c, 400, "POST", "/api/account/auth/signup", b, "a number as a string field");
  }
  static const char *const bodies[] = {"", "not json", "[1,2]", "{\"password\":", "null"};
  for (size_t i = 0; i < sizeof bodies / sizeof *bodies; i++) {
    json_t *out = NULL;
    long st = raw(c, "POST", "/api/account/auth/signup", bodies[i], strlen(bodies[i]), "", &out);
    if (st != 400 || !json_is_string(json_object_get(out, "msg"))) {
      print_error("signup with body '%s': %ld %s\n", bodies[i], st, dump(out));
      fail();
    }
    json_decref(out);
  }
  /* Password sizes: 8..128. */
  char pw[200];
  memset(pw, 'p', sizeof pw);
  pw[7] = '\0';
  ERR(c, 400, "POST", "/api/account/auth/signup", signup_body(email, phone, pw));
  pw[7] = 'p';
  pw[129] = '\0';
  ERR(c, 400, "POST", "/api/account/auth/signup", signup_body(email, phone, pw));
  pw[128] = '\0';
  json_t *r = CALL(c, 201, "POST", "/api/account/auth/signup", signup_body(email, phone, pw));
  check_pair(r);
  json_decref(r);
  /* An 8-character password, too. */
  snprintf(email, sizeof email, "eight-%lu@shop.test", t);
  snprintf(phone, sizeof phone, "+6%lu", t);
  r = CALL(c, 201, "POST", "/api/account/auth/signup", signup_body(email, phone, "12345678"));
  json_decref(r);

  /* Login. */
  r = CALL(c, 200, "POST", "/api/account/auth/login",
           json_pack("{s:s, s:s}", "email", a.email, "password", a.password));
  check_pair(r);
  const char *tok = json_string_value(json_object_get(r, "access_token"));
  assert_int_equal(person_with(c, tok), 200);
  json_decref(r);
  r = CALL(c, 200, "POST", "/api/account/auth/login",
           json_pack("{s:s, s:s}", "email", email, "password", "12345678"));
  json_decref(r);
  ERR(c, 404, "POST", "/api/account/auth/login",
      json_pack("{s:s, s:s}", "email", "nobody-at-all@shop.test", "password", "password-123"));
  ERR(c, 401, "POST", "/api/account/auth/login",
      json_pack("{s:s, s:s}", "email", a.email, "password", "wrong-password"));
  ERR(c, 400, "POST", "/api/account/auth/login", json_pack("{s:s}", "email", a.email));
  ERR(c, 400, "POST", "/api/account/auth/login",
      json_pack("{s:i, s:s}", "email", 5, "password", "password-123"));
  assert_int_equal(raw(c, "POST", "/api/account/auth/login", "{", 1, "", NULL), 400);
  customer_free(&a);
}

void test_refresh(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  json_t *r = CALL(c, 200, "POST", "/api/account/auth/refresh",
                   json_pack("{s:s}", "refresh_token", a.refresh));
  check_pair(r);
  assert_int_equal(person_with(c, json_string_value(json_object_get(r, "access_token"))), 200);
  /* The new refresh token works too. */
  json_t *r2 = CALL(
      c, 200, "POST", "/api/account/auth/refresh",
      json_pack("{s:s}", "refresh_token", json_string_value(json_object_get(r, "refresh_token"))));
  check_pair(r2);
  json_decref(r2);
  json_decref(r);

  ERR(c, 401, "POST", "/api/account/auth/refresh", json_pack("{s:s}", "refresh_token", "x.y.z"));
  ERR(c, 401, "POST", "/api/account/auth/refresh", json_pack("{s:s}", "refresh_token", "garbage"));
  /* An access token is not a refresh token. */
  ERR(c, 401, "POST", "/api/account/auth/refresh", json_pack("{s:s}", "refresh_token", a.access));
  /* Expired: the real claims with exp in the past, signed with the server's secret. */
  json_t *claims = jwt_claims(a.refresh);
  if (!json_is_integer(json_object_get(claims, "exp"))) {
    print_error("the refresh token has no exp claim: %s\n", dump(claims));
    fail();
  }
  long long now = (long long)time(NULL);
  json_object_set_new(claims, "exp", json_integer(now + 3600));
  char *fresh = jwt_make("HS256", claims, SECRET);
  /* Valid claims signed with another key. */
  char *forged = jwt_make("HS256", claims, "wrong-key-wrong-key-wrong-key-0123");
  json_object_set_new(claims, "exp", json_integer(now - 120));
  if (json_object_get(claims, "iat")) json_object_set_new(claims, "iat", json_integer(now - 7200));
  if (json_object_get(claims, "nbf")) json_object_set_new(claims, "nbf", json_integer(now - 7200));
  char *expired = jwt_make("HS256", claims, SECRET);
  /* The same claims re-signed with a future exp are accepted: so the token was made right. */
  r = CALL(c, 200, "POST", "/api/account/auth/refresh", json_pack("{s:s}", "refresh_token", fresh));
  json_decref(r);
  ERR(c, 401, "POST", "/api/account/auth/refresh", json_pack("{s:s}", "refresh_token", expired));
  ERR(c, 401, "POST", "/api/account/auth/refresh", json_pack("{s:s}", "refresh_token", forged));
  long st = raw(c, "POST", "/api/account/auth/refresh", "{}", 2, "", NULL);
  expect_one_of(st, 400, 401, "refresh without refresh_token");
  json_decref(claims);
  free(fresh);
  free(expired);
  free(forged);
  customer_free(&a);
}

void test_tokens(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  const char *path = "/api/account/info/person";
  assert_int_equal(person_with(c, a.access), 200);
  /* Missing or malformed. */
  assert_int_equal(status_of(c, "GET", path, ""), 401);
  assert_int_equal(status_of(c, "GET", path, "Bearer "), 401);
  assert_int_equal(status_of(c, "GET", path, "Bearer garbage"), 401);
  assert_int_equal(status_of(c, "GET", path, "Bearer a.b.c"), 401);
  char *basic = malloc(strlen(a.access) + 8);
  assert_non_null(basic);
  sprintf(basic, "Basic %s", a.access);
  assert_int_equal(status_of(c, "GET", path, basic), 401);
  free(basic);
  /* The refresh token is not an access token. */
  assert_int_equal(person_with(c, a.refresh), 401);

  json_t *claims = jwt_claims(a.access);
  if (!json_is_integer(json_object_get(claims, "exp"))) {
    print_error("the access token has no exp claim: %s\n", dump(claims));
    fail();
  }
  long long now = (long long)time(NULL), exp = json_integer_value(json_object_get(claims, "exp"));
  if (exp <= now || exp > now + 3600) {
    print_error("the access token is not short-lived: exp %lld, now %lld\n", exp, now);
    fail();
  }
  /* Re-signed by hand with the server's secret: accepted (the way tokens are made here is
   * right, so the rejections below are about what they test). */
  char *same = jwt_make("HS256", claims, SECRET);
  assert_int_equal(person_with(c, same), 200);
  /* Signed with another key. */
  char *forged = jwt_make("HS256", claims, "not-the-server-secret-at-all-0123456789");
  assert_int_equal(person_with(c, forged), 401);
  /* Claims changed under the original signature. */
  json_t *changed = json_deep_copy(claims);
  json_object_set_new(changed, "exp", json_integer(exp + 1));
  char *tampered = jwt_make("HS256", changed, SECRET);
  const char *orig_sig = strrchr(a.access, '.') + 1;
  *(strrchr(tampered, '.') + 1) = '\0';
  char *spliced = malloc(strlen(tampered) + strlen(orig_sig) + 1);
  assert_non_null(spliced);
  sprintf(spliced, "%s%s", tampered, orig_sig);
  assert_int_equal(person_with(c, spliced), 401);
  /* alg "none": no signature, and with the original signature kept. */
  char *none = jwt_make("none", claims, NULL);
  assert_int_equal(person_with(c, none), 401);
  char *none_sig = malloc(strlen(none) + strlen(orig_sig) + 1);
  assert_non_null(none_sig);
  sprintf(none_sig, "%s%s", none, orig_sig);
  assert_int_equal(person_with(c, none_sig), 401);
  char *none_lower = jwt_make("None", claims, NULL);
  assert_int_equal(person_with(c, none_lower), 401);
  /* Expired: the real claims with exp in the past, properly signed. */
  json_object_set_new(changed, "exp", json_integer(now - 120));
  if (json_object_get(changed, "iat")) json_object_set_new(changed, "iat", json_integer(now - 600));
  if (json_object_get(changed, "nbf")) json_object_set_new(changed, "nbf", json_integer(now - 600));
  char *expired = jwt_make("HS256", changed, SECRET);
  assert_int_equal(person_with(c, expired), 401);

  /* The same rules on the other protected endpoints. */
  char *b_forged = bearer(forged), *b_refresh = bearer(a.refresh), *b_expired = bearer(expired);
  const char *body = "{\"purchase_items\":[{\"product_id\":1,\"amount\":1}],"
                     "\"payment\":{\"currency_code\":\"US\"}}";
  const char *const authz[] = {"", b_forged, b_refresh, b_expired};
  for (size_t i = 0; i < 4; i++) {
    assert_int_equal(raw(c, "POST", "/api/purchase", body, strlen(body), authz[i], NULL), 401);
    assert_int_equal(status_of(c, "GET", "/api/account/info/shipping", authz[i]), 401);
    assert_int_equal(status_of(c, "GET", "/api/order/1", authz[i]), 401);
    assert_int_equal(status_of(c, "GET", "/api/payment/1", authz[i]), 401);
  }
  const char *const toks[] = {NULL, forged, a.refresh, expired, none};
  for (size_t i = 0; i < 5; i++) {
    shop_events *ev = NULL;
    assert_int_equal(shop_events_open(&ev, e2e_url, "/api/purchase/result", toks[i]), 0);
    long st = shop_events_wait_open(ev, 10000);
    shop_events_close(ev);
    if (st != 401) {
      print_error("GET /api/purchase/result with token #%zu: %ld, expected 401\n", i, st);
      fail();
    }
  }
  free(b_forged);
  free(b_refresh);
  free(b_expired);
  free(same);
  free(forged);
  free(tampered);
  free(spliced);
  free(none);
  free(none_sig);
  free(none_lower);
  free(expired);
  json_decref(changed);
  json_decref(claims);
  customer_free(&a);
}

void test_account_info(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  json_t *r = CALL(c, 200, "GET", "/api/account/info/person", NULL);
  json_t *want =
      json_pack("{s:s, s:s, s:s}", "firstname", "Grace", "lastname", "Hopper", "email", a.email);
  if (!json_equal(r, want)) {
    print_error("person: %s\n", dump(r));
    fail();
  }
  json_decref(r);
  json_decref(want);
  r = CALL(c, 200, "GET", "/api/account/info/shipping", NULL);
  want = json_pack("{s:s, s:s}", "address", "1 Harbor Lane", "phone_number", a.phone);
  if (!json_equal(r, want)) {
    print_error("shipping: %s\n", dump(r));
    fail();
  }
  json_decref(r);
  json_decref(want);

  char email[160];
  snprintf(email, sizeof email, "renamed-%s", a.email);
  json_t *person =
      json_pack("{s:s, s:s, s:s}", "firstname", "Amazing", "lastname", "Grace", "email", email);
  r = CALL(c, 200, "PUT", "/api/account/info/person", json_incref(person));
  const char *msg = json_string_value(json_object_get(r, "msg"));
  if (msg == NULL || strcmp(msg, "ok") != 0) {
    print_error("PUT person: %s\n", dump(r));
    fail();
  }
  json_decref(r);
  r = CALL(c, 200, "GET", "/api/account/info/person", NULL);
  if (!json_equal(r, person)) {
    print_error("person after PUT: %s\n", dump(r));
    fail();
  }
  json_decref(r);
  json_decref(person);
  /* The new email logs in. */
  r = CALL(c, 200, "POST", "/api/account/auth/login",
           json_pack("{s:s, s:s}", "email", email, "password", a.password));
  json_decref(r);

  char phone[40];
  snprintf(phone, sizeof phone, "%s9", a.phone);
  json_t *ship = json_pack("{s:s, s:s}", "address", "2 Compiler Street", "phone_number", phone);
  r = CALL(c, 200, "PUT", "/api/account/info/shipping", json_incref(ship));
  json_decref(r);
  r = CALL(c, 200, "GET", "/api/account/info/shipping", NULL);
  if (!json_equal(r, ship)) {
    print_error("shipping after PUT: %s\n", dump(r));
    fail();
  }
  json_decref(r);
  json_decref(ship);

  /* Bad bodies. */
  ERR(c, 400, "PUT", "/api/account/info/person", json_pack("{s:s}", "firstname", "X"));
  ERR(c, 400, "PUT", "/api/account/info/person",
      json_pack("{s:i, s:s, s:s}", "firstname", 1, "lastname", "Y", "email", "z@shop.test"));
  ERR(c, 400, "PUT", "/api/account/info/shipping", json_pack("{s:s}", "address", "X"));
  assert_int_equal(raw(c, "PUT", "/api/account/info/person", "nope", 4, NULL, NULL), 400);
  assert_int_equal(raw(c, "PUT", "/api/account/info/shipping", "[]", 2, NULL, NULL), 400);
  /* Without a token. */
  const char *const paths[] = {"/api/account/info/person", "/api/account/info/shipping"};
  for (int i = 0; i < 2; i++) {
    assert_int_equal(status_of(c, "GET", paths[i], ""), 401);
    assert_int_equal(raw(c, "PUT", paths[i], "{}", 2, "", NULL), 401);
  }
  customer_free(&a);
}

/* ---- tests: products and sizes ----------------------------------------------------------------
 */

void test_products(void **state) {
  (void)state;
  shop_client *c = client(NULL);
  json_t *body = json_pack("{s:s, s:s, s:s, s:i, s:i}", "name", "Desk lamp", "description",
                           "warm light", "brand_name", "Lumen", "price", 450, "inventory", 7);
  json_t *r = CALL(c, 201, "POST", "/api/product", json_incref(body));
  json_t *id = json_incref(json_object_get(r, "id"));
  json_decref(r);
  assert_true(json_is_integer(id) || json_is_string(id));
  char path[128];
  snprintf(path, sizeof path, "/api/product/%s", sid(id));
  r = CALL(c, 200, "GET", path, NULL);
  json_object_set(body, "id", id);
  if (!json_equal(r, body)) {
    print_error("GET %s: %s\n", path, dump(r));
    fail();
  }
  json_decref(r);
  json_decref(body);

  /* Unknown products. */
  ERR(c, 404, "GET", "/api/product/987654321987", NULL);
  long st = status_of(c, "GET", "/api/product/not-a-number", NULL);
  expect_one_of(st, 404, 400, "GET /api/product/not-a-number");

  /* Bad bodies. */
  const char *const fields[] = {"name", "description", "brand_name", "price", "inventory"};
  for (int i = 0; i < 5; i++) {
    json_t *b = json_pack("{s:s, s:s, s:s, s:i, s:i}", "name", "N", "description", "D",
                          "brand_name", "B", "price", 1, "inventory", 1);
    json_object_del(b, fields[i]);
    error_expect(c, 400, "POST", "/api/product", b, fields[i]);
  }
  ERR(c, 400, "POST", "/api/product",
      json_pack("{s:s, s:s, s:s, s:i, s:i}", "name", "N", "description", "D", "brand_name", "B",
                "price", -1, "inventory", 1));
  ERR(c, 400, "POST", "/api/product",
      json_pack("{s:s, s:s, s:s, s:i, s:i}", "name", "N", "description", "D", "brand_name", "B",
                "price", 1, "inventory", -1));
  ERR(c, 400, "POST", "/api/product",
      json_pack("{s:s, s:s, s:s, s:s, s:i}", "name", "N", "description", "D", "brand_name", "B",
                "price", "12", "inventory", 1));
  ERR(c, 400, "POST", "/api/product",
      json_pack("{s:s, s:s, s:s, s:i, s:f}", "name", "N", "description", "D", "brand_name", "B",
                "price", 1, "inventory", 1.5));
  assert_int_equal(raw(c, "POST", "/api/product", "{\"name\":", 8, NULL, NULL), 400);
  assert_int_equal(raw(c, "POST", "/api/product", "", 0, NULL, NULL), 400);

  /* Listing: sizes 1..500, offsets from 0. */
  const char *const bad[] = {"/api/products?offset=0&size=0", "/api/products?offset=0&size=501",
                             "/api/products?offset=-1&size=10", "/api/products?offset=0&size=x",
                             "/api/products?offset=y&size=10"};
  for (int i = 0; i < 5; i++) error_expect(c, 400, "GET", bad[i], NULL, bad[i]);
  r = CALL(c, 200, "GET", "/api/products?offset=0&size=500", NULL);
  json_decref(r);
  r = CALL(c, 200, "GET", "/api/products?offset=0&size=1", NULL);
  assert_int_equal(json_array_size(json_object_get(r, "catalogs")), 1);
  json_decref(r);

  /* Paging by 2 finds each of three new products exactly once, with its fields. */
  json_t *mine[3];
  for (int i = 0; i < 3; i++) mine[i] = product_new(c, "Pager item", 10 + i, 20 + i);
  int seen[3] = {0, 0, 0};
  for (int offset = 0;; offset += 2) {
    snprintf(path, sizeof path, "/api/products?offset=%d&size=2", offset);
    r = CALL(c, 200, "GET", path, NULL);
    json_t *list = json_object_get(r, "catalogs");
    assert_true(json_is_array(list));
    size_t n = json_array_size(list);
    assert_true(n <= 2);
    for (size_t k = 0; k < n; k++) {
      json_t *p = json_array_get(list, k);
      for (int i = 0; i < 3; i++) {
        if (!json_equal(json_object_get(p, "id"), mine[i])) continue;
        seen[i]++;
        json_t *want = json_pack("{s:O, s:s, s:i, s:i}", "id", mine[i], "name", "Pager item",
                                 "inventory", 20 + i, "price", 10 + i);
        if (!json_equal(p, want)) {
          print_error("catalog entry: %s\n", dump(p));
          fail();
        }
        json_decref(want);
      }
    }
    json_decref(r);
    if (n < 2) break;
    assert_true(offset < 100000);
  }
  for (int i = 0; i < 3; i++) {
    assert_int_equal(seen[i], 1);
    json_decref(mine[i]);
  }
  json_decref(id);
  shop_client_free(c);
}

void test_body_limits(void **state) {
  (void)state;
  shop_client *c = client(NULL);
  size_t n = 70 * 1024;
  char *big = malloc(n + 1);
  assert_non_null(big);
  /* Valid JSON, only too large. */
  int head = snprintf(big, n,
                      "{\"name\":\"big\",\"brand_name\":\"B\",\"price\":1,"
                      "\"inventory\":1,\"description\":\"");
  memset(big + head, 'd', n - (size_t)head - 2);
  memcpy(big + n - 2, "\"}", 2);
  big[n] = '\0';
  json_t *out = NULL;
  long st = raw(c, "POST", "/api/product", big, n, NULL, &out);
  if (st != 413 || !json_is_string(json_object_get(out, "msg"))) {
    print_error("POST /api/product with %zu bytes: %ld %s\n", n, st, dump(out));
    fail();
  }
  json_decref(out);
  assert_int_equal(raw(c, "POST", "/api/account/auth/signup", big, n, NULL, NULL), 413);
  /* The server still answers afterwards. */
  json_t *r = CALL(c, 200, "GET", "/api/products?offset=0&size=1", NULL);
  json_decref(r);
  free(big);
  shop_client_free(c);
}

/* ---- tests: purchases -------------------------------------------------------------------------
 */

void test_purchase_validation(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  json_t *p = product_new(c, "Validated", 100, 5);
  const char *path = "/api/purchase";
  ERR(c, 400, "POST", path, json_pack("{}"));
  ERR(c, 400, "POST", path, purchase_body(json_array(), "US"));
  ERR(c, 400, "POST", path,
      json_pack("{s:s, s:{s:s}}", "purchase_items", "x", "payment", "currency_code", "US"));
  json_int_t amounts[] = {0, -1};
  for (int i = 0; i < 2; i++) {
    json_t *items = json_array();
    json_array_append_new(items, item(p, amounts[i]));
    error_expect(c, 400, "POST", path, purchase_body(items, "US"), "amount < 1");
  }
  json_t *items = json_array();
  json_array_append_new(items, json_pack("{s:O, s:s}", "product_id", p, "amount", "1"));
  ERR(c, 400, "POST", path, purchase_body(items, "US"));
  items = json_array();
  json_array_append_new(items, json_pack("{s:i}", "amount", 1));
  ERR(c, 400, "POST", path, purchase_body(items, "US"));
  items = json_array();
  json_array_append_new(items, item(p, 1));
  ERR(c, 400, "POST", path, purchase_body(items, "EU"));
  items = json_array();
  json_array_append_new(items, item(p, 1));
  ERR(c, 400, "POST", path, json_pack("{s:o}", "purchase_items", items));
  items = json_array();
  json_array_append_new(items, item(p, 1));
  ERR(c, 400, "POST", path, json_pack("{s:o, s:{}}", "purchase_items", items, "payment"));
  assert_int_equal(raw(c, "POST", path, "purchase", 8, NULL, NULL), 400);
  assert_int_equal(raw(c, "POST", path, "", 0, NULL, NULL), 400);
  /* Unknown product: 404. */
  json_t *unknown = json_is_integer(p) ? json_integer(json_integer_value(p) + 1000000)
                                       : json_string("no-such-product");
  items = json_array();
  json_array_append_new(items, item(p, 1));
  json_array_append_new(items, item(unknown, 1));
  ERR(c, 404, "POST", path, purchase_body(items, "US"));
  /* Without a token. */
  shop_client_set_token(c, NULL);
  items = json_array();
  json_array_append_new(items, item(p, 1));
  ERR(c, 401, "POST", path, purchase_body(items, "US"));
  shop_client_set_token(c, a.access);
  /* Nothing was bought. */
  assert_int_equal(inventory_of(c, p), 5);
  json_decref(unknown);
  json_decref(p);
  customer_free(&a);
}

void expect_payment(shop_client *c, const json_t *id, const char *currency, long long amt) {
  char path[128];
  snprintf(path, sizeof path, "/api/payment/%s", sid(id));
  json_t *r = CALL(c, 200, "GET", path, NULL);
  json_t *want = json_pack("{s:O, s:s, s:I}", "id", (json_t *)id, "currency_code", currency,
                           "amount", (json_int_t)amt);
  if (!json_equal(r, want)) {
    print_error("GET %s: %s, expected %s\n", path, dump(r), dump(want));
    fail();
  }
  json_decref(want);
  json_decref(r);
}

void expect_absent(shop_client *c, const char *what, const json_t *id) {
  char path[128];
  snprintf(path, sizeof path, "/api/%s/%s", what, sid(id));
  ERR(c, 404, "GET", path, NULL);
}

void test_purchase_outcomes(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  json_t *kb = product_new(c, "Keyboard", 1200, 10);
  json_t *mouse = product_new(c, "Mouse", 300, 2);
  json_t *sentinel = product_new(c, "Sentinel", 1, 1000);
  stream s;
  stream_open(&s, a.access);

  /* 1. Succeeds. */
  json_t *items = json_array();
  json_array_append_new(items, item(kb, 1));
  json_array_append_new(items, item(mouse, 1));
  json_t *ok = buy(c, items, "US");
  shop_track *t = stream_wait(&s, ok, WAIT_MS);
  assert_int_equal(shop_track_outcome(t), SHOP_SUCCEEDED);
  assert_int_equal(inventory_of(c, kb), 9);
  assert_int_equal(inventory_of(c, mouse), 1);
  char path[128];
  snprintf(path, sizeof path, "/api/order/%s", sid(ok));
  json_t *order = CALL(c, 200, "GET", path, NULL);
  json_t *want =
      json_pack("{s:O, s:[{s:O, s:s, s:s, s:s, s:i, s:i}, {s:O, s:s, s:s, s:s, s:i, s:i}]}", "id",
                ok, "purchased_items", "product_id", kb, "name", "Keyboard", "description",
                "made for the e2e test", "brand_name", "Testco", "price", 1200, "amount", 1,
                "product_id", mouse, "name", "Mouse", "description", "made for the e2e test",
                "brand_name", "Testco", "price", 300, "amount", 1);
  if (!json_equal(order, want)) {
    print_error("GET %s: %s\nexpected %s\n", path, dump(order), dump(want));
    fail();
  }
  json_decref(want);
  json_decref(order);
  expect_payment(c, ok, "US", 1500);

  /* 2. Fails on inventory: 2 mice, 1 left. */
  json_t *no_stock = buy1(c, mouse, 2);
  t = stream_wait(&s, no_stock, WAIT_MS);
  assert_int_equal(shop_track_outcome(t), SHOP_COMPENSATED);
  assert_int_equal(inventory_of(c, mouse), 1);
  expect_absent(c, "order", no_stock);
  expect_absent(c, "payment", no_stock);

  /* 3. Refused at payment (5 x 1200 = 6000 > 5000) and compensated. */
  json_t *refused = buy1(c, kb, 5);
  t = stream_wait(&s, refused, WAIT_MS);
  assert_int_equal(shop_track_outcome(t), SHOP_COMPENSATED);
  assert_int_equal(inventory_of(c, kb), 9);
  expect_absent(c, "order", refused);
  expect_absent(c, "payment", refused);

  /* A purchase in NT at exactly the limit succeeds (the rule is "above the limit"). */
  json_t *kb2 = product_new(c, "Limit", PAYMENT_LIMIT, 1);
  items = json_array();
  json_array_append_new(items, item(kb2, 1));
  json_t *at_limit = buy(c, items, "NT");
  t = stream_wait(&s, at_limit, WAIT_MS);
  assert_int_equal(shop_track_outcome(t), SHOP_SUCCEEDED);
  expect_payment(c, at_limit, "NT", PAYMENT_LIMIT);
  assert_int_equal(inventory_of(c, kb2), 0);

  /* Nothing more comes for them: the exact sequences. */
  stream_sync(&s, c, sentinel);
  assert_sequence(&s, ok, SEQ_SUCCESS);
  assert_sequence(&s, no_stock, SEQ_NO_STOCK);
  assert_sequence(&s, refused, SEQ_REFUSED);
  assert_sequence(&s, at_limit, SEQ_SUCCESS);
  assert_int_equal(inventory_of(c, kb), 9);
  assert_int_equal(inventory_of(c, mouse), 1);

  stream_close(&s);
  json_decref(ok);
  json_decref(no_stock);
  json_decref(refused);
  json_decref(at_limit);
  json_decref(kb);
  json_decref(kb2);
  json_decref(mouse);
  json_decref(sentinel);
  customer_free(&a);
}

void test_unknown_order_payment(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  ERR(a.c, 404, "GET", "/api/order/987654321987", NULL);
  ERR(a.c, 404, "GET", "/api/payment/987654321987", NULL);
  assert_int_equal(status_of(a.c, "GET", "/api/order/987654321987", ""), 401);
  assert_int_equal(status_of(a.c, "GET", "/api/payment/987654321987", ""), 401);
  customer_free(&a);
}

void test_owner_only(void **state) {
  (void)state;
  customer a, b;
  customer_new(&a);
  customer_new(&b);
  json_t *p = product_new(a.c, "Owned", 100, 100);
  stream sa, sb;
  stream_open(&sb, b.access); /* open first: it would see a's events if it were leaking */
  stream_open(&sa, a.access);
  json_t *ida = buy1(a.c, p, 1);
  assert_int_equal(shop_track_outcome(stream_wait(&sa, ida, WAIT_MS)), SHOP_SUCCEEDED);
  json_t *refused = buy1(a.c, p, 60); /* 6000 > limit: compensated */
  assert_int_equal(shop_track_outcome(stream_wait(&sa, refused, WAIT_MS)), SHOP_COMPENSATED);

  char path[128];
  snprintf(path, sizeof path, "/api/order/%s", sid(ida));
  expect_one_of(status_of(b.c, "GET", path, NULL), 404, 401, "b reads a's order");
  json_t *r = CALL(a.c, 200, "GET", path, NULL);
  json_decref(r);
  snprintf(path, sizeof path, "/api/payment/%s", sid(ida));
  expect_one_of(status_of(b.c, "GET", path, NULL), 404, 401, "b reads a's payment");
  r = CALL(a.c, 200, "GET", path, NULL);
  json_decref(r);

  /* b's own purchase reaches b's stream; a's never do. */
  json_t *idb = buy1(b.c, p, 2);
  assert_int_equal(shop_track_outcome(stream_wait(&sb, idb, WAIT_MS)), SHOP_SUCCEEDED);
  snprintf(path, sizeof path, "/api/order/%s", sid(idb));
  expect_one_of(status_of(a.c, "GET", path, NULL), 404, 401, "a reads b's order");
  stream_sync(&sb, b.c, p);
  stream_sync(&sa, a.c, p);
  for (size_t i = 0; i < json_array_size(sb.all); i++) {
    json_t *id = json_object_get(json_array_get(sb.all, i), "purchase_id");
    if (json_equal(id, ida) || json_equal(id, refused)) {
      print_error("b's stream got a's event %s\n", dump(json_array_get(sb.all, i)));
      fail();
    }
  }
  for (size_t i = 0; i < json_array_size(sa.all); i++) {
    json_t *id = json_object_get(json_array_get(sa.all, i), "purchase_id");
    if (json_equal(id, idb)) {
      print_error("a's stream got b's event %s\n", dump(json_array_get(sa.all, i)));
      fail();
    }
  }
  assert_sequence(&sb, idb, SEQ_SUCCESS);
  stream_close(&sa);
  stream_close(&sb);
  json_decref(ida);
  json_decref(idb);
  json_decref(refused);
  json_decref(p);
  customer_free(&a);
  customer_free(&b);
}

typedef struct buyer {
  pthread_barrier_t *start;
  const char *token;
  const json_t *product;
  const json_t *key; /* the purchase_id to send, or NULL */
  long status;
  json_t *id;
} buyer;

static void *buyer_run(void *arg) {
  buyer *b = arg;
  shop_client *c = NULL;
  if (shop_client_new(&c, e2e_url) != 0) return NULL;
  shop_client_set_token(c, b->token);
  json_t *items = json_array();
  json_array_append_new(items,
                        json_pack("{s:O, s:i}", "product_id", (json_t *)b->product, "amount", 1));
  json_t *body = purchase_body(items, "US");
  if (b->key) json_object_set(body, "purchase_id", (json_t *)b->key);
  pthread_barrier_wait(b->start);
  json_t *out = NULL;
  b->status = shop_call(c, "POST", "/api/purchase", body, &out);
  b->id = json_incref(json_object_get(out, "purchase_id"));
  json_decref(out);
  json_decref(body);
  shop_client_free(c);
  return NULL;
}

/* n threads POST at once; fails unless every answer is 201. Fills b[0..n). */
static void buy_together(buyer *b, int n, const char *token, const json_t *product,
                         const json_t *key) {
  pthread_barrier_t start;
  pthread_barrier_init(&start, NULL, (unsigned)n);
  pthread_t *th = calloc((size_t)n, sizeof *th);
  assert_non_null(th);
  for (int i = 0; i < n; i++) {
    b[i] = (buyer){.start = &start, .token = token, .product = product, .key = key};
    assert_int_equal(pthread_create(&th[i], NULL, buyer_run, &b[i]), 0);
  }
  for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
  pthread_barrier_destroy(&start);
  free(th);
  for (int i = 0; i < n; i++) {
    if (b[i].status != 201 || b[i].id == NULL) {
      print_error("concurrent purchase %d: %ld\n", i, b[i].status);
      fail();
    }
  }
}

/* POSTs a purchase carrying key as its idempotency key (the body's purchase_id and an
 * Idempotency-Key header); returns the status and *id_out the answered purchase_id. */
static long buy_with_key(shop_client *c, const json_t *product, const json_t *key,
                         json_t **id_out) {
  json_t *items = json_array();
  json_array_append_new(items, item(product, 1));
  json_t *body = purchase_body(items, "US");
  json_object_set(body, "purchase_id", (json_t *)key);
  char *text = json_dumps(body, JSON_COMPACT);
  json_decref(body);
  char hdr[128];
  snprintf(hdr, sizeof hdr, "Idempotency-Key: %s", sid(key));
  const char *const headers[] = {hdr, NULL};
  shop_send_opts o;
  memset(&o, 0, sizeof o);
  o.body = text;
  o.body_len = strlen(text);
  o.headers = headers;
  shop_resp r;
  long st = shop_client_send(c, "POST", "/api/purchase", &o, &r);
  *id_out = json_incref(json_object_get(r.json, "purchase_id"));
  shop_resp_destroy(&r);
  free(text);
  return st;
}

void test_idempotent_purchase(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  json_t *p = product_new(c, "Once", 100, 10);
  json_t *sentinel = product_new(c, "Sentinel", 1, 100);
  stream s;
  stream_open(&s, a.access);
  /* The first purchase's id is the key that a retry sends again. */
  json_t *first = buy1(c, p, 1);
  json_t *again = NULL;
  expect_one_of(buy_with_key(c, p, first, &again), 201, 200, "the same purchase again");
  if (!json_equal(first, again)) {
    print_error("the retried purchase answered purchase_id %s, expected %s\n", sid(again),
                sid(first));
    fail();
  }
  json_decref(again);
  assert_int_equal(shop_track_outcome(stream_wait(&s, first, WAIT_MS)), SHOP_SUCCEEDED);
  /* Once more after it completed. */
  expect_one_of(buy_with_key(c, p, first, &again), 201, 200, "the same purchase once more");
  assert_true(json_equal(first, again));
  json_decref(again);

  /* A key the client chose before its first POST (a string), sent twice. */
  char kbuf[64];
  snprintf(kbuf, sizeof kbuf, "e2e-key-%lu", next_tag());
  json_t *key = json_string(kbuf);
  expect_one_of(buy_with_key(c, p, key, &again), 201, 200, "a client-chosen key");
  assert_true(json_equal(again, key));
  json_decref(again);
  expect_one_of(buy_with_key(c, p, key, &again), 201, 200, "a client-chosen key again");
  assert_true(json_equal(again, key));
  json_decref(again);
  assert_int_equal(shop_track_outcome(stream_wait(&s, key, WAIT_MS)), SHOP_SUCCEEDED);
  /* The same key for another purchase, or by another customer, is refused. */
  json_t *items = json_array();
  json_array_append_new(items, item(p, 2));
  json_t *body = purchase_body(items, "US");
  json_object_set(body, "purchase_id", key);
  json_t *out = NULL;
  expect_one_of(shop_call(c, "POST", "/api/purchase", body, &out), 409, 400,
                "a used key for another purchase");
  json_decref(out);
  customer other;
  customer_new(&other);
  expect_one_of(buy_with_key(other.c, p, key, &again), 409, 400, "a key of another customer");
  json_decref(again);
  json_decref(body);
  customer_free(&other);

  /* An integer key POSTed by 8 threads at once: one purchase. */
  json_t *ikey = json_integer((json_int_t)(next_tag() % 1000000000) * 1000 + 7);
  buyer b[8];
  buy_together(b, 8, a.access, p, ikey);
  for (int i = 0; i < 8; i++) {
    if (!json_equal(b[i].id, ikey)) {
      print_error("a concurrent retry answered purchase_id %s, expected %s\n", sid(b[i].id),
                  sid(ikey));
      fail();
    }
    json_decref(b[i].id);
  }
  assert_int_equal(shop_track_outcome(stream_wait(&s, ikey, WAIT_MS)), SHOP_SUCCEEDED);

  stream_sync(&s, c, sentinel);
  assert_sequence(&s, first, SEQ_SUCCESS);
  assert_sequence(&s, key, SEQ_SUCCESS);
  assert_sequence(&s, ikey, SEQ_SUCCESS);
  assert_int_equal(inventory_of(c, p), 7);
  expect_payment(c, first, "US", 100);
  expect_payment(c, key, "US", 100);
  expect_payment(c, ikey, "US", 100);
  /* Exactly one saga each: the stream saw no purchase but these three and the sentinel. */
  assert_int_equal(s.n, 4);
  json_decref(key);
  json_decref(ikey);
  stream_close(&s);
  json_decref(first);
  json_decref(p);
  json_decref(sentinel);
  customer_free(&a);
}

void test_concurrent_purchases(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  json_t *p = product_new(c, "Scarce", 100, STOCK);
  stream s;
  stream_open(&s, a.access);
  buyer b[CONCURRENT];
  long long t0 = shop_now_ms();
  buy_together(b, CONCURRENT, a.access, p, NULL);
  for (int i = 0; i < CONCURRENT; i++)
    for (int k = 0; k < i; k++) assert_false(json_equal(b[i].id, b[k].id));
  int succeeded = 0, compensated = 0;
  for (int i = 0; i < CONCURRENT; i++) {
    shop_track *t = stream_wait(&s, b[i].id, 120000);
    shop_outcome o = shop_track_outcome(t);
    if (o == SHOP_SUCCEEDED) {
      succeeded++;
      assert_sequence(&s, b[i].id, SEQ_SUCCESS);
    } else if (o == SHOP_COMPENSATED && t->failed_step == 0) {
      compensated++;
      assert_sequence(&s, b[i].id, SEQ_NO_STOCK);
    } else {
      print_error("purchase %s: %s %s\n", t->id, shop_outcome_name(o), dump(t->events));
      fail();
    }
  }
  printf("# %d concurrent purchases settled in %lld ms: %d succeeded, %d failed on inventory\n",
         CONCURRENT, shop_now_ms() - t0, succeeded, compensated);
  assert_int_equal(succeeded, STOCK);
  assert_int_equal(compensated, CONCURRENT - STOCK);
  assert_int_equal(inventory_of(c, p), 0);
  int paid = 0;
  for (int i = 0; i < CONCURRENT; i++) {
    char path[128];
    snprintf(path, sizeof path, "/api/payment/%s", sid(b[i].id));
    json_t *r = NULL;
    long st = shop_call(c, "GET", path, NULL, &r);
    shop_outcome o = shop_track_outcome(stream_track(&s, sid(b[i].id)));
    if (st == 200) {
      paid++;
      assert_int_equal(json_integer_value(json_object_get(r, "amount")), 100);
      assert_int_equal(o, SHOP_SUCCEEDED);
    } else {
      assert_int_equal(st, 404);
      assert_int_equal(o, SHOP_COMPENSATED);
    }
    json_decref(r);
    json_decref(b[i].id);
  }
  assert_int_equal(paid, STOCK);
  stream_close(&s);
  json_decref(p);
  customer_free(&a);
}

/* ---- metrics ------------------------------------------------------------------------------- */

static char *get_text(shop_client *c, const char *path) {
  shop_send_opts o;
  memset(&o, 0, sizeof o);
  shop_resp r;
  long st = shop_client_send(c, "GET", path, &o, &r);
  if (st != 200 || r.body == NULL) {
    print_error("GET %s: %ld %s\n", path, st, r.err);
    shop_resp_destroy(&r);
    fail();
  }
  char *text = strdup(r.body);
  shop_resp_destroy(&r);
  assert_non_null(text);
  return text;
}

/* The value of the sample line that starts with `series` followed by a space; -1 if none. */
static long long sample(const char *text, const char *series) {
  size_t n = strlen(series);
  for (const char *l = text; l != NULL && *l; l = strchr(l, '\n'), l = l ? l + 1 : NULL)
    if (strncmp(l, series, n) == 0 && l[n] == ' ') return strtoll(l + n + 1, NULL, 10);
  return -1;
}

static void expect_sample(const char *text, const char *path, const char *series) {
  if (sample(text, series) < 0) {
    print_error("GET %s: no sample %s in\n%s\n", path, series, text);
    fail();
  }
}

void e2e_check_metrics(shop_client *c, const char *path, const char *service, const char *node) {
  char *text = get_text(c, path);
  char series[256];
  snprintf(series, sizeof series, "shop_up{service=\"%s\"}", service);
  assert_int_equal(sample(text, series), 1);
  snprintf(series, sizeof series, "shop_http_responses_total{service=\"%s\",code=\"200\"}",
           service);
  expect_sample(text, path, series);
  if (node != NULL) {
    static const char *const states[] = {"RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED",
                                         "FAILED"};
    for (int i = 0; i < 5; i++) {
      snprintf(series, sizeof series, "libsaga_sagas{node=\"%s\",state=\"%s\"}", node, states[i]);
      expect_sample(text, path, series);
    }
    snprintf(series, sizeof series, "libsaga_outbox_depth{node=\"%s\"}", node);
    expect_sample(text, path, series);
    snprintf(series, sizeof series, "libsaga_transactions_total{node=\"%s\"}", node);
    expect_sample(text, path, series);
    snprintf(series, sizeof series, "libsaga_transport_connected{node=\"%s\"}", node);
    if (sample(text, series) != 1) {
      print_error("GET %s: %s is not 1 in\n%s\n", path, series, text);
      fail();
    }
    snprintf(series, sizeof series, "libsaga_stale_replies_total{node=\"%s\"}", node);
    expect_sample(text, path, series);
    /* The histogram: buckets cumulative (never decreasing), +Inf equal to _count. */
    char prefix[128];
    snprintf(prefix, sizeof prefix, "libsaga_step_latency_ms_bucket{node=\"%s\",le=\"", node);
    long long last = 0;
    int buckets = 0;
    for (const char *l = strstr(text, prefix); l != NULL; l = strstr(l + 1, prefix)) {
      const char *v = strchr(l, ' ');
      assert_non_null(v);
      long long x = strtoll(v + 1, NULL, 10);
      if (x < last) {
        print_error("GET %s: histogram bucket decreases at %.60s\n", path, l);
        fail();
      }
      last = x;
      buckets++;
    }
    assert_true(buckets >= 2);
    snprintf(series, sizeof series, "libsaga_step_latency_ms_bucket{node=\"%s\",le=\"+Inf\"}",
             node);
    long long inf = sample(text, series);
    snprintf(series, sizeof series, "libsaga_step_latency_ms_count{node=\"%s\"}", node);
    assert_int_equal(inf, sample(text, series));
    assert_int_equal(inf, last);
    snprintf(series, sizeof series, "libsaga_step_latency_ms_sum{node=\"%s\"}", node);
    expect_sample(text, path, series);
  }
  free(text);
}

void e2e_sagas_by_state(shop_client *c, const char *path, const char *node, int64_t n[6]) {
  char *text = get_text(c, path);
  static const char *const states[] = {"",          "RUNNING",     "COMPENSATING",
                                       "COMPLETED", "COMPENSATED", "FAILED"};
  n[0] = 0;
  for (int i = 1; i < 6; i++) {
    char series[160];
    snprintf(series, sizeof series, "libsaga_sagas{node=\"%s\",state=\"%s\"}", node, states[i]);
    long long v = sample(text, series);
    if (v < 0) {
      print_error("GET %s: no %s\n", path, series);
      free(text);
      fail();
    }
    n[i] = v;
  }
  free(text);
}
