/*
 * Tokens for the shop (docs/shop.md: "Access tokens are JWTs (HS256, short-lived) carrying the
 * customer id; refresh tokens live longer and cannot be used as access tokens"). Both kinds
 * are JWTs signed HS256 with the secret every service shares (c->jwt_secret), made and
 * checked with libjwt 1.10. Header {"alg":"HS256","typ":"JWT"}; claims, all required:
 *
 *   "sub"  the customer id as a decimal string ("42"): RFC 7519 makes "sub" a string
 *   "typ"  "access" or "refresh"
 *   "iat"  issue time, integer seconds since the epoch
 *   "exp"  expiry, integer seconds since the epoch: iat + ACCESS_TTL or iat + REFRESH_TTL
 *
 * Verification believes nothing a token says about itself. libjwt checks the signature with
 * our key using whichever algorithm the token's header names, so the algorithm is pinned to
 * HS256 after decoding: "alg":"none" (which libjwt already refuses when given a key), HS384
 * and HS512 tokens are all refused. libjwt 1.10 does not look at "exp", so expiry is checked
 * here, and every claim must be present with its exact JSON type. The "typ" claim keeps the
 * long-lived refresh token from opening the API and the access token from being exchanged.
 *
 * Tokens are stateless: a refresh token stays usable until it expires, even after it was
 * exchanged for a new pair (the example keeps no revocation list).
 */
#include <jwt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "shop.h"

#define ACCESS_TTL (5 * 60)            /* seconds an access token is valid */
#define REFRESH_TTL (7 * 24 * 60 * 60) /* seconds a refresh token is valid */
#define CLOCK_SKEW 60  /* seconds an "iat" may lie ahead of our clock (other hosts' clocks) */
#define MAX_TOKEN 2048 /* ours are ~200 bytes; anything much longer is not one of ours */

static const char TYP_ACCESS[] = "access";
static const char TYP_REFRESH[] = "refresh";

/* The HMAC key: the shared secret's bytes. -1 when there is none (an empty key would make
 * every signature forgeable, and libjwt refuses it anyway). */
static int get_key(const shop_ctx *c, const unsigned char **key, int *len) {
  size_t n = c->jwt_secret != NULL ? strlen(c->jwt_secret) : 0;
  if (n == 0 || n > INT_MAX) return -1;
  *key = (const unsigned char *)c->jwt_secret;
  *len = (int)n;
  return 0;
}

/* A signed token of kind typ for customer id, valid from now for ttl seconds; malloc'ed (free
 * it), or NULL. */
static char *make_token(const shop_ctx *c, int64_t id, const char *typ, time_t now, long ttl) {
  const unsigned char *key;
  int key_len;
  char sub[24];
  jwt_t *jwt = NULL;
  char *out = NULL;
  if (get_key(c, &key, &key_len) != 0) goto done;
  snprintf(sub, sizeof sub, "%lld", (long long)id);
  if (jwt_new(&jwt) != 0) goto done;
  if (jwt_set_alg(jwt, JWT_ALG_HS256, key, key_len) != 0 || jwt_add_grant(jwt, "sub", sub) != 0 ||
      jwt_add_grant(jwt, "typ", typ) != 0 || jwt_add_grant_int(jwt, "iat", (long)now) != 0 ||
      jwt_add_grant_int(jwt, "exp", (long)now + ttl) != 0)
    goto done;
  out = jwt_encode_str(jwt); /* libjwt allocates with malloc unless told otherwise */
done:
  if (jwt != NULL) jwt_free(jwt);
  return out;
}

/* A token is three base64url parts joined by two dots; anything else is refused before it
 * reaches the decoder. */
static int well_formed(const char *token) {
  size_t n = 0;
  int dots = 0;
  for (const char *p = token; *p; p++, n++) {
    char ch = *p;
    if (ch == '.')
      dots++;
    else if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
               ch == '-' || ch == '_'))
      return 0;
    if (n >= MAX_TOKEN) return 0;
  }
  return n > 0 && dots == 2;
}

/* "sub" back to the id: a positive decimal without sign, spaces or leading zeros. */
static int parse_sub(const char *s, int64_t *id) {
  if (s == NULL || s[0] < '1' || s[0] > '9' || strlen(s) > 18) return -1;
  int64_t v = 0;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9') return -1;
    v = v * 10 + (*p - '0');
  }
  *id = v;
  return 0;
}

/* Checks a token of kind typ: signature with our key, algorithm HS256, claims and expiry.
 * 0 and *id, or -1 with *why saying what was wrong (a static string). */
static int verify(const shop_ctx *c, const char *token, const char *typ, int64_t *id,
                  const char **why) {
  const unsigned char *key;
  int key_len, rc = -1;
  json_int_t now;
  jwt_t *jwt = NULL;
  char *text = NULL;
  json_t *claims = NULL, *j_typ, *j_iat, *j_exp, *j_sub;
  *why = "invalid token";
  if (token == NULL || !well_formed(token)) {
    *why = "malformed token";
    goto done;
  }
  if (get_key(c, &key, &key_len) != 0) {
    *why = "no token secret configured";
    goto done;
  }
  if (jwt_decode(&jwt, token, key, key_len) != 0) goto done; /* bad signature or encoding */
  if (jwt_get_alg(jwt) != JWT_ALG_HS256) {
    *why = "token algorithm not accepted";
    goto done;
  }
  /* Read the claims as JSON to check their types exactly (jwt_get_grant_int cannot tell a
   * missing claim from a string one). */
  text = jwt_get_grants_json(jwt, NULL);
  if (text == NULL) goto done;
  claims = json_loads(text, 0, NULL);
  if (!json_is_object(claims)) goto done;
  j_typ = json_object_get(claims, "typ");
  j_iat = json_object_get(claims, "iat");
  j_exp = json_object_get(claims, "exp");
  j_sub = json_object_get(claims, "sub");
  if (!json_is_string(j_typ) || !json_is_integer(j_iat) || !json_is_integer(j_exp) ||
      !json_is_string(j_sub))
    goto done;
  if (strcmp(json_string_value(j_typ), typ) != 0) {
    *why = strcmp(typ, TYP_ACCESS) == 0 ? "not an access token" : "not a refresh token";
    goto done;
  }
  now = (json_int_t)time(NULL);
  if (json_integer_value(j_exp) <= now) {
    *why = "token expired";
    goto done;
  }
  if (json_integer_value(j_iat) > now + CLOCK_SKEW ||
      json_integer_value(j_iat) > json_integer_value(j_exp))
    goto done;
  if (parse_sub(json_string_value(j_sub), id) != 0) goto done;
  rc = 0;
done:
  json_decref(claims);
  free(text);
  if (jwt != NULL) jwt_free(jwt);
  return rc;
}

int shop_auth_verify(const shop_ctx *c, const char *token, const char *typ, int64_t *customer_id,
                     const char **why) {
  if (typ == NULL || (strcmp(typ, TYP_ACCESS) != 0 && strcmp(typ, TYP_REFRESH) != 0)) {
    *why = "invalid token";
    return -1;
  }
  return verify(c, token, typ, customer_id, why);
}

int shop_auth_bearer(const shop_ctx *c, const char *h, int64_t *customer_id, const char **why) {
  if (h == NULL) {
    *why = "missing Authorization: Bearer token";
    return -1;
  }
  /* The scheme name is case-insensitive (RFC 7235); one or more spaces follow it. */
  if (strncasecmp(h, "Bearer ", 7) != 0) {
    *why = "malformed Authorization header: expected Bearer token";
    return -1;
  }
  const char *token = h + 7;
  while (*token == ' ') token++;
  return verify(c, token, TYP_ACCESS, customer_id, why);
}

int shop_auth_customer(const shop_ctx *c, shop_req *r, int64_t *customer_id) {
  int64_t id;
  const char *why;
  if (shop_auth_bearer(c, shop_req_header(r, "Authorization"), &id, &why) != 0) {
    shop_reply_error(r, 401, why);
    return -1;
  }
  *customer_id = id;
  return 0;
}

json_t *shop_auth_issue(const shop_ctx *c, int64_t customer_id) {
  if (customer_id <= 0) return NULL;
  time_t now = time(NULL);
  char *access = make_token(c, customer_id, TYP_ACCESS, now, ACCESS_TTL);
  char *refresh = make_token(c, customer_id, TYP_REFRESH, now, REFRESH_TTL);
  json_t *pair = NULL;
  if (access != NULL && refresh != NULL)
    pair = json_pack("{s:s, s:s}", "access_token", access, "refresh_token", refresh);
  free(access);
  free(refresh);
  return pair;
}

int shop_auth_refresh(const shop_ctx *c, const char *token, int64_t *customer_id) {
  int64_t id;
  const char *why;
  if (verify(c, token, TYP_REFRESH, &id, &why) != 0) return -1;
  *customer_id = id;
  return 0;
}
