/*
 * Fuzz target: the example shop's request parsing (examples/shop/http.c, auth.c, account.c).
 * The first byte of an input picks what the rest is:
 *
 *   0  a raw HTTP request, fed through a socketpair to the shop's real HTTP server
 *      (libmicrohttpd driven by libuv, http.c's routing): request line, path segments, query
 *      strings, headers, chunked and plain bodies. Its routes parse JSON bodies with
 *      shop_req_json and the account forms' checks, Bearer tokens with shop_auth_customer,
 *      and read query strings, path parameters and headers back.
 *   1  a signed token: "<header JSON>\0<claims JSON>" (or only the claims, under the usual
 *      header), base64url-encoded and signed HS256 with the shop's secret here, so that the
 *      claim checks behind the signature are reached; then verified as access and refresh.
 *   2  an Authorization header value, checked as a Bearer access token and as a refresh token.
 *   3  a JSON request body, parsed as the server does and checked as each account form.
 *
 * Oracles: an accepted token's claims really say what was accepted (type, unexpired, "sub"
 * equal to the id); an accepted form has every required field as a string without control
 * characters; every HTTP answer is an HTTP/1.x status line; nothing leaks, nothing hangs.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <sodium.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "fuzz.h"
#include "shop.h"

static const char SECRET[] = "fuzzing-secret-0123456789abcdef01234567";
static shop_ctx ctx;
static uv_loop_t loop;

static const char *const FORMS[] = {"signup", "login", "refresh", "person", "shipping"};

/* ---- oracles ------------------------------------------------------------------------------ */

/* An accepted form: each field it requires is a non-empty string without control bytes. */
static void check_accepted(const char *form, json_t *body) {
  static const char *const keys[][7] = {
      {"password", "firstname", "lastname", "email", "address", "phone_number", NULL},
      {"email", "password", NULL},
      {"refresh_token", NULL},
      {"firstname", "lastname", "email", NULL},
      {"address", "phone_number", NULL},
  };
  size_t f = 0;
  while (strcmp(FORMS[f], form) != 0) f++;
  for (size_t i = 0; keys[f][i] != NULL; i++) {
    json_t *v = json_object_get(body, keys[f][i]);
    FUZZ_CHECK(json_is_string(v) && json_string_length(v) > 0);
    if (strcmp(keys[f][i], "password") == 0 || strcmp(keys[f][i], "refresh_token") == 0)
      continue; /* passwords may hold any character */
    const char *s = json_string_value(v);
    for (size_t j = 0; j < json_string_length(v); j++)
      FUZZ_CHECK((unsigned char)s[j] >= 0x20 && s[j] != 0x7f);
    FUZZ_CHECK(json_string_length(v) <= 256);
  }
  if (strcmp(form, "signup") == 0 || strcmp(form, "person") == 0)
    FUZZ_CHECK(strchr(json_string_value(json_object_get(body, "email")), '@') != NULL);
}

static void check_forms(json_t *body) {
  for (size_t i = 0; i < sizeof FORMS / sizeof FORMS[0]; i++) {
    char msg[200] = "";
    if (shop_account_check(FORMS[i], body, msg, sizeof msg) == 0)
      check_accepted(FORMS[i], body);
    else
      FUZZ_CHECK(msg[0] != '\0');
  }
}

/* The payload of a token the shop accepted says what it was accepted as. */
static void check_claims(const char *token, const char *typ, int64_t id) {
  FUZZ_CHECK(id > 0);
  const char *dot1 = strchr(token, '.'), *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
  FUZZ_CHECK(dot2 != NULL);
  size_t cap = (size_t)(dot2 - dot1), n = 0;
  unsigned char *raw = malloc(cap + 1);
  FUZZ_CHECK(raw != NULL);
  FUZZ_CHECK(sodium_base642bin(raw, cap, dot1 + 1, (size_t)(dot2 - dot1 - 1), NULL, &n, NULL,
                               sodium_base64_VARIANT_URLSAFE_NO_PADDING) == 0);
  json_t *claims = json_loadb((const char *)raw, n, 0, NULL);
  free(raw);
  FUZZ_CHECK(json_is_object(claims));
  json_t *t = json_object_get(claims, "typ"), *sub = json_object_get(claims, "sub");
  json_t *exp = json_object_get(claims, "exp");
  FUZZ_CHECK(json_is_string(t) && strcmp(json_string_value(t), typ) == 0);
  FUZZ_CHECK(json_is_integer(exp) && json_integer_value(exp) > (json_int_t)time(NULL) - 5);
  char want[32];
  snprintf(want, sizeof want, "%" PRId64, id);
  FUZZ_CHECK(json_is_string(sub) && strcmp(json_string_value(sub), want) == 0);
  json_decref(claims);
}

static void verify_both(const char *token) {
  static const char *const typs[] = {"access", "refresh"};
  for (int i = 0; i < 2; i++) {
    int64_t id = 0;
    const char *why = NULL;
    if (shop_auth_verify(&ctx, token, typs[i], &id, &why) == 0)
      check_claims(token, typs[i], id);
    else
      FUZZ_CHECK(why != NULL && why[0] != '\0');
  }
}

/* ---- mode 1: signed tokens ---------------------------------------------------------------- */

static char *b64(const void *p, size_t n) {
  size_t cap = sodium_base64_ENCODED_LEN(n, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  char *s = malloc(cap);
  FUZZ_CHECK(s != NULL);
  sodium_bin2base64(s, cap, p, n, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  return s;
}

static void signed_token(const uint8_t *data, size_t size) {
  static const char dflt[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
  const uint8_t *nul = memchr(data, 0, size);
  const void *head = dflt, *claims = data;
  size_t hlen = sizeof dflt - 1, clen = size;
  if (nul != NULL) {
    head = data;
    hlen = (size_t)(nul - data);
    claims = nul + 1;
    clen = size - hlen - 1;
  }
  char *h = b64(head, hlen), *c = b64(claims, clen);
  size_t len = strlen(h) + 1 + strlen(c);
  char *token = malloc(len + 1 + 64);
  FUZZ_CHECK(token != NULL);
  snprintf(token, len + 1, "%s.%s", h, c);
  unsigned char mac[crypto_auth_hmacsha256_BYTES];
  crypto_auth_hmacsha256_state st;
  crypto_auth_hmacsha256_init(&st, (const unsigned char *)SECRET, strlen(SECRET));
  crypto_auth_hmacsha256_update(&st, (const unsigned char *)token, len);
  crypto_auth_hmacsha256_final(&st, mac);
  char *m = b64(mac, sizeof mac);
  snprintf(token + len, 1 + 64, ".%s", m);
  verify_both(token);
  free(m);
  free(token);
  free(c);
  free(h);
}

/* ---- mode 2: Authorization headers -------------------------------------------------------- */

static void header_value(const uint8_t *data, size_t size) {
  char *s = malloc(size + 1);
  FUZZ_CHECK(s != NULL);
  memcpy(s, data, size);
  s[size] = '\0'; /* a header value ends at the first NUL, as libmicrohttpd gives it */
  int64_t id = 0;
  const char *why = NULL;
  if (shop_auth_bearer(&ctx, s, &id, &why) == 0) {
    const char *t = s + 7;
    while (*t == ' ') t++;
    check_claims(t, "access", id);
  } else {
    FUZZ_CHECK(why != NULL && why[0] != '\0');
  }
  verify_both(s);
  free(s);
}

/* ---- mode 0: HTTP through the shop's server ----------------------------------------------- */

/* POST /api/account/auth/{form}: the body checked as that form. */
static void on_form(shop_req *r, void *arg) {
  (void)arg;
  const char *form = shop_req_param(r, 0);
  FUZZ_CHECK(form != NULL && form[0] != '\0' && strchr(form, '/') == NULL);
  json_t *b = shop_req_json(r);
  FUZZ_CHECK(b == NULL || json_is_object(b));
  FUZZ_CHECK(shop_req_json(r) == b); /* parsed once */
  if (b == NULL) {
    shop_reply_error(r, 400, "the body must be a JSON object");
    return;
  }
  char msg[200];
  if (shop_account_check(form, b, msg, sizeof msg) != 0) {
    shop_reply_error(r, 400, msg);
    return;
  }
  check_accepted(form, b);
  shop_reply_json(r, 200, json_pack("{s:s}", "form", form)); /* NULL unless UTF-8: no body */
}

/* PUT /api/account/info/{form}: a Bearer token first, then the form. */
static void on_auth_form(shop_req *r, void *arg) {
  int64_t id = 0;
  if (shop_auth_customer(&ctx, r, &id) != 0) return; /* answered 401 */
  FUZZ_CHECK(id > 0);
  on_form(r, arg);
}

/* Any other GET or POST under /api: reads the query string, path parameters and headers. */
static void on_read(shop_req *r, void *arg) {
  (void)arg;
  static const char *const keys[] = {"offset", "size", "purchase_id", "", "a b"};
  size_t total = 0;
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    const char *v = shop_req_query(r, keys[i]);
    if (v != NULL) total += strlen(v);
  }
  for (int i = 0; i < 5; i++) {
    const char *p = shop_req_param(r, i);
    FUZZ_CHECK(i < 4 || p == NULL);
    if (p != NULL) FUZZ_CHECK(p[0] != '\0' && strchr(p, '/') == NULL);
  }
  const char *k = shop_req_header(r, "Idempotency-Key"), *ct = shop_req_header(r, "content-type");
  total += (k ? strlen(k) : 0) + (ct ? strlen(ct) : 0);
  size_t n;
  const char *body = shop_req_body(r, &n);
  FUZZ_CHECK(body != NULL && n <= SHOP_MAX_BODY);
  json_t *j = shop_req_json(r);
  if (j != NULL) check_forms(j);
  char text[64];
  snprintf(text, sizeof text, "%s %zu %zu", shop_req_method(r), total, n);
  shop_reply_text(r, 200, "text/plain", text);
}

typedef struct client {
  uv_poll_t poll;
  int fd, eof;
  size_t got;
  char head[16];
} client;

static void on_client(uv_poll_t *p, int status, int events) {
  (void)events;
  client *c = p->data;
  char buf[4096];
  ssize_t n = status < 0 ? -1 : recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0) {
    c->eof = 1;
    uv_poll_stop(p);
    return;
  }
  if (c->got < sizeof c->head) {
    size_t k = sizeof c->head - c->got < (size_t)n ? sizeof c->head - c->got : (size_t)n;
    memcpy(c->head + c->got, buf, k);
  }
  c->got += (size_t)n;
}

static void on_watchdog(uv_timer_t *t) { *(int *)t->data = 1; }

/* Bytes written to fd that the server has not read yet. */
static int unread(int fd) {
  int n = 0;
  return ioctl(fd, SIOCOUTQ, &n) == 0 ? n : 0;
}

static void http_request(const uint8_t *data, size_t size) {
  int sv[2];
  FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  FUZZ_CHECK(shop_http_accept(ctx.http, sv[1]) == 0);
  client c;
  memset(&c, 0, sizeof c);
  c.fd = sv[0];
  c.poll.data = &c;
  FUZZ_CHECK(uv_poll_init(&loop, &c.poll, sv[0]) == 0);
  FUZZ_CHECK(uv_poll_start(&c.poll, UV_READABLE | UV_DISCONNECT, on_client) == 0);
  /* The request, as fast as the server reads it. */
  size_t off = 0;
  for (long turns = 0; off < size && !c.eof; turns++) {
    FUZZ_CHECK(turns < 100000);
    ssize_t n = send(sv[0], data + off, size - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno != EAGAIN) break; /* the server hung up */
    if (n > 0) off += (size_t)n;
    uv_run(&loop, UV_RUN_NOWAIT);
  }
  /* libmicrohttpd waits for readiness edges: a FIN that arrives together with the last bytes
   * goes unseen until its timeout. So the end of the request is sent once the server has read
   * everything (or stopped reading). */
  for (int idle = 0, last = -1; !c.eof && idle < 50;) {
    int left = unread(sv[0]);
    if (left == 0) break;
    idle = left == last ? idle + 1 : 0;
    last = left;
    uv_run(&loop, UV_RUN_NOWAIT);
  }
  shutdown(sv[0], SHUT_WR);
  /* The server answers and closes; 5 s without that is a hang. */
  int stuck = 0;
  uv_timer_t watchdog;
  FUZZ_CHECK(uv_timer_init(&loop, &watchdog) == 0);
  watchdog.data = &stuck;
  FUZZ_CHECK(uv_timer_start(&watchdog, on_watchdog, 5000, 0) == 0);
  while (!c.eof && !stuck) uv_run(&loop, UV_RUN_ONCE);
  if (stuck) fprintf(stderr, "the server kept the connection open 5 s after the request\n");
  FUZZ_CHECK(!stuck);
  uv_close((uv_handle_t *)&watchdog, NULL);
  uv_close((uv_handle_t *)&c.poll, NULL);
  uv_run(&loop, UV_RUN_NOWAIT);
  close(sv[0]);
  if (c.got > 0) FUZZ_CHECK(c.got >= 7 && memcmp(c.head, "HTTP/1.", 7) == 0);
}

/* ---- setup -------------------------------------------------------------------------------- */

static void setup(void) {
  FUZZ_CHECK(sodium_init() >= 0);
  FUZZ_CHECK(uv_loop_init(&loop) == 0);
  ctx.loop = &loop;
  ctx.jwt_secret = SECRET;
  ctx.service = "fuzz";
  FUZZ_CHECK(shop_http_start(&ctx.http, &loop, "127.0.0.1", 0) == 0);
  shop_http *h = ctx.http;
  FUZZ_CHECK(shop_http_route(h, "POST", "/api/account/auth/{}", on_form, NULL) == 0);
  FUZZ_CHECK(shop_http_route(h, "PUT", "/api/account/info/{}", on_auth_form, NULL) == 0);
  FUZZ_CHECK(shop_http_route(h, "GET", "/api/product/catalog", on_read, NULL) == 0);
  FUZZ_CHECK(shop_http_route(h, "GET", "/api/{}/{}", on_read, NULL) == 0);
  FUZZ_CHECK(shop_http_route(h, "POST", "/api/{}", on_read, NULL) == 0);
  FUZZ_CHECK(shop_http_route(h, "GET", "/api/{}/{}/{}/{}", on_read, NULL) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready;
  if (!ready) {
    setup();
    ready = 1;
  }
  if (size == 0) return 0;
  const uint8_t *rest = data + 1;
  size_t n = size - 1;
  switch (data[0] % 4) {
  case 0:
    http_request(rest, n);
    break;
  case 1:
    signed_token(rest, n);
    break;
  case 2:
    header_value(rest, n);
    break;
  default: {
    json_t *j = shop_json_object((const char *)rest, n);
    if (j != NULL) {
      FUZZ_CHECK(json_is_object(j));
      check_forms(j);
    }
    json_decref(j);
  }
  }
  return 0;
}
