/*
 * The shop's scripted purchase flow (docs/shop.md, "Running it"), run against a running server:
 *
 *   shop_demo --url http://127.0.0.1:PORT [--payment-limit N] [--email E] [--password P]
 *
 * Signs a customer up and logs in, creates two products (a keyboard and a mouse), opens the
 * purchase result stream, then makes three purchases one after the other: one that succeeds,
 * one that fails on inventory, and one whose total is above the server's payment limit (N,
 * default 5000: start the server with the same --payment-limit) so that the payment is
 * refused and the earlier steps are compensated. Every streamed status is printed as it
 * arrives; each purchase is awaited until its final status. Then the final inventory, the
 * order of the successful purchase and the payments are printed.
 *
 * Exits 0 when everything answered as expected, 1 with a message otherwise (an unexpected
 * status or body, or no final status within 30 s).
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client.h"

#define WAIT_MS 30000

typedef struct demo {
  shop_client *c;
  shop_events *events;
  json_t *keyboard, *mouse; /* product ids */
  shop_track track[3];
  int ntrack;
} demo;

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "shop_demo: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  exit(1);
}

/* Calls and checks the status; returns the JSON answer (owned) or dies. */
static json_t *expect(demo *d, long want, const char *method, const char *path, json_t *body) {
  json_t *out = NULL;
  long st = shop_call(d->c, method, path, body, &out);
  json_decref(body);
  if (st == 0)
    die("%s %s: no answer from the server (is it running at %s?)", method, path,
        shop_client_url(d->c));
  if (st != want) {
    char *text = out ? json_dumps(out, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    die("%s %s answered %ld (expected %ld)%s%s", method, path, st, want, text ? ": " : "",
        text ? text : "");
  }
  return out;
}

/* A JSON string's text, or "?". */
static const char *str_or(const json_t *v) {
  return json_is_string(v) ? json_string_value(v) : "?";
}

static const char *short_id(const char *id) {
  size_t n = strlen(id);
  return n > 8 ? id + n - 8 : id;
}

static shop_track *find_track(demo *d, const char *id) {
  for (int i = 0; i < d->ntrack; i++)
    if (strcmp(d->track[i].id, id) == 0) return &d->track[i];
  return NULL;
}

/* Prints every streamed status until the purchase t reached its final one. */
static shop_outcome await(demo *d, shop_track *t) {
  long long deadline = shop_now_ms() + WAIT_MS;
  while (shop_track_outcome(t) == SHOP_PENDING) {
    long long left = deadline - shop_now_ms();
    if (left <= 0) die("no final status for purchase %s within %d s", t->id, WAIT_MS / 1000);
    json_t *ev = shop_events_next(d->events, (int)left);
    if (ev == NULL) {
      if (shop_events_ended(d->events)) die("the result stream ended");
      continue;
    }
    char id[64];
    shop_id_str(json_object_get(ev, "purchase_id"), id, sizeof id);
    const char *step = json_string_value(json_object_get(ev, "step"));
    const char *status = json_string_value(json_object_get(ev, "status"));
    printf("  [%s] %s %s\n", short_id(id), step ? step : "?", status ? status : "?");
    fflush(stdout);
    shop_track *o = find_track(d, id);
    if (o == NULL) die("an event for an unknown purchase %s", id);
    shop_track_add(o, ev);
    json_decref(ev);
  }
  return shop_track_outcome(t);
}

/* Makes one purchase of items (taken) and awaits its final status; dies unless it is want
 * (hint, if not NULL, says what to check then). */
static shop_track *purchase(demo *d, const char *title, json_t *items, shop_outcome want,
                            const char *hint) {
  printf("\n%s\n", title);
  json_t *body =
      json_pack("{s:o, s:{s:s}}", "purchase_items", items, "payment", "currency_code", "US");
  json_t *r = expect(d, 201, "POST", "/api/purchase", body);
  char id[64];
  shop_id_str(json_object_get(r, "purchase_id"), id, sizeof id);
  json_decref(r);
  if (strcmp(id, "?") == 0) die("POST /api/purchase answered no purchase_id");
  printf("  purchase %s accepted\n", id);
  shop_track *t = &d->track[d->ntrack++];
  shop_track_init(t, id);
  shop_outcome got = await(d, t);
  if (got == SHOP_SUCCEEDED)
    printf("  => succeeded\n");
  else if (got == SHOP_COMPENSATED && t->failed_step == 0)
    printf("  => failed at %s, nothing to compensate\n", shop_steps[0]);
  else if (t->failed_step >= 0)
    printf("  => failed at %s, earlier steps %s\n", shop_steps[t->failed_step],
           got == SHOP_COMPENSATED ? "rolled back" : "NOT all rolled back");
  if (got != want)
    die("purchase %s: %s, expected %s%s", id, shop_outcome_name(got), shop_outcome_name(want),
        hint ? hint : "");
  return t;
}

static json_t *item(json_t *product, int amount) {
  return json_pack("{s:O, s:i}", "product_id", product, "amount", amount);
}

static json_t *create_product(demo *d, const char *name, const char *desc, const char *brand,
                              int price, int inventory) {
  json_t *r = expect(d, 201, "POST", "/api/product",
                     json_pack("{s:s, s:s, s:s, s:i, s:i}", "name", name, "description", desc,
                               "brand_name", brand, "price", price, "inventory", inventory));
  json_t *id = json_incref(json_object_get(r, "id"));
  json_decref(r);
  if (id == NULL) die("POST /api/product answered no id");
  char b[64];
  printf("product %s: %s, price %d, inventory %d\n", shop_id_str(id, b, sizeof b), name, price,
         inventory);
  return id;
}

/* The inventory of product id as listed by GET /api/products (paged), or -1. */
static long long listed_inventory(demo *d, const json_t *id, const char **name) {
  for (int offset = 0;; offset += 100) {
    char path[128];
    snprintf(path, sizeof path, "/api/products?offset=%d&size=100", offset);
    json_t *r = expect(d, 200, "GET", path, NULL);
    json_t *list = json_object_get(r, "catalogs");
    if (!json_is_array(list)) die("GET %s: no catalogs array", path);
    size_t n = json_array_size(list);
    for (size_t i = 0; i < n; i++) {
      json_t *p = json_array_get(list, i);
      if (json_equal(json_object_get(p, "id"), (json_t *)id)) {
        long long inv = json_integer_value(json_object_get(p, "inventory"));
        static char nb[128];
        snprintf(nb, sizeof nb, "%s", str_or(json_object_get(p, "name")));
        *name = nb;
        json_decref(r);
        return inv;
      }
    }
    json_decref(r);
    if (n < 100) return -1;
  }
}

int main(int argc, char **argv) {
  const char *url = NULL, *email = NULL, *password = "demo-password-1";
  long long limit = 5000;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--url") == 0 && i + 1 < argc)
      url = argv[++i];
    else if (strcmp(argv[i], "--payment-limit") == 0 && i + 1 < argc)
      limit = atoll(argv[++i]);
    else if (strcmp(argv[i], "--email") == 0 && i + 1 < argc)
      email = argv[++i];
    else if (strcmp(argv[i], "--password") == 0 && i + 1 < argc)
      password = argv[++i];
    else {
      fprintf(stderr, "usage: shop_demo --url http://127.0.0.1:PORT [--payment-limit N] "
                      "[--email E] [--password P]\n");
      return 2;
    }
  }
  if (url == NULL) die("--url is required (e.g. --url http://127.0.0.1:8080)");
  const int kb_price = 1200, mouse_price = 300, kb_stock = 10, mouse_stock = 2;
  int kb_over = (int)(limit / kb_price) + 1; /* keyboards whose total is above the limit */
  if (limit < 0 || kb_over > kb_stock)
    die("--payment-limit must be between 0 and %d", 9 * kb_price);
  /* A fresh email and phone number for each run, so that the demo can run again against the
   * same server. */
  char email_buf[128], phone[32];
  unsigned long long tag = (unsigned long long)time(NULL) * 100000ULL + (unsigned)getpid() % 100000;
  if (email == NULL) {
    snprintf(email_buf, sizeof email_buf, "demo-%llu@shop.example", tag);
    email = email_buf;
  }
  snprintf(phone, sizeof phone, "+1%llu", tag % 10000000000ULL);

  if (shop_client_global_init() != 0) die("curl_global_init failed");
  demo d;
  memset(&d, 0, sizeof d);
  if (shop_client_new(&d.c, url) != 0) die("out of memory");

  printf("shop demo against %s\n\n", url);
  json_t *r = expect(&d, 201, "POST", "/api/account/auth/signup",
                     json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "password", password, "firstname",
                               "Ada", "lastname", "Lovelace", "email", email, "address",
                               "12 Analytical Row, London", "phone_number", phone));
  if (!json_is_string(json_object_get(r, "access_token")) ||
      !json_is_string(json_object_get(r, "refresh_token")))
    die("signup answered no token pair");
  json_decref(r);
  printf("signed up %s\n", email);
  r = expect(&d, 200, "POST", "/api/account/auth/login",
             json_pack("{s:s, s:s}", "email", email, "password", password));
  const char *token = json_string_value(json_object_get(r, "access_token"));
  if (token == NULL) die("login answered no access_token");
  shop_client_set_token(d.c, token);
  json_decref(r);
  printf("logged in (access token %.12s...)\n\n", shop_client_token(d.c));

  d.keyboard = create_product(&d, "Mechanical keyboard", "87 keys, brown switches", "Keyco",
                              kb_price, kb_stock);
  d.mouse = create_product(&d, "Wireless mouse", "Two buttons and a wheel", "Rodent", mouse_price,
                           mouse_stock);

  if (shop_events_open(&d.events, url, "/api/purchase/result", shop_client_token(d.c)) != 0)
    die("cannot open the result stream");
  long st = shop_events_wait_open(d.events, WAIT_MS);
  if (st != 200) die("GET /api/purchase/result answered %ld (expected 200)", st);
  printf("\nresult stream open\n");

  json_t *items = json_array();
  json_array_append_new(items, item(d.keyboard, 1));
  json_array_append_new(items, item(d.mouse, 1));
  shop_track *ok = purchase(&d, "1) 1 keyboard + 1 mouse: succeeds", items, SHOP_SUCCEEDED, NULL);

  char title[160];
  snprintf(title, sizeof title, "2) %d mice (only %d left): fails on inventory", mouse_stock + 1,
           mouse_stock - 1);
  items = json_array();
  json_array_append_new(items, item(d.mouse, mouse_stock + 1));
  shop_track *no_stock = purchase(&d, title, items, SHOP_COMPENSATED, NULL);
  if (no_stock->failed_step != 0) die("purchase 2 failed at %s", shop_steps[no_stock->failed_step]);

  snprintf(title, sizeof title,
           "3) %d keyboard%s (total %d, above the payment limit %lld): payment refused, "
           "compensated",
           kb_over, kb_over == 1 ? "" : "s", kb_over * kb_price, limit);
  items = json_array();
  json_array_append_new(items, item(d.keyboard, kb_over));
  shop_track *refused =
      purchase(&d, title, items, SHOP_COMPENSATED,
               " (was the server started with the same --payment-limit as this demo?)");
  if (refused->failed_step != 2) die("purchase 3 failed at %s", shop_steps[refused->failed_step]);

  printf("\nfinal inventory (GET /api/products)\n");
  const json_t *ids[2] = {d.keyboard, d.mouse};
  const long long want_inv[2] = {kb_stock - 1, mouse_stock - 1};
  for (int i = 0; i < 2; i++) {
    const char *name = "?";
    long long inv = listed_inventory(&d, ids[i], &name);
    char b[64];
    printf("  %-8s %-22s inventory %lld\n", shop_id_str(ids[i], b, sizeof b), name, inv);
    if (inv != want_inv[i])
      die("product %s has inventory %lld, expected %lld", b, inv, want_inv[i]);
  }

  char path[160];
  printf("\norder of purchase %s (GET /api/order/%s)\n", short_id(ok->id), ok->id);
  snprintf(path, sizeof path, "/api/order/%s", ok->id);
  r = expect(&d, 200, "GET", path, NULL);
  json_t *lines = json_object_get(r, "purchased_items");
  for (size_t i = 0; i < json_array_size(lines); i++) {
    json_t *l = json_array_get(lines, i);
    printf("  %" JSON_INTEGER_FORMAT " x %s at %" JSON_INTEGER_FORMAT "\n",
           json_integer_value(json_object_get(l, "amount")), str_or(json_object_get(l, "name")),
           json_integer_value(json_object_get(l, "price")));
  }
  json_decref(r);

  printf("\npayments (GET /api/payment/{purchase_id})\n");
  shop_track *all[3] = {ok, no_stock, refused};
  for (int i = 0; i < 3; i++) {
    snprintf(path, sizeof path, "/api/payment/%s", all[i]->id);
    json_t *p = NULL;
    st = shop_call(d.c, "GET", path, NULL, &p);
    if (i == 0 && st == 200) {
      long long amount = json_integer_value(json_object_get(p, "amount"));
      printf("  [%s] 200 %s %lld\n", short_id(all[i]->id),
             str_or(json_object_get(p, "currency_code")), amount);
      if (amount != kb_price + mouse_price)
        die("payment of %s is %lld, expected %d", all[i]->id, amount, kb_price + mouse_price);
    } else if (i > 0 && st == 404) {
      printf("  [%s] 404 no payment\n", short_id(all[i]->id));
    } else {
      die("GET %s answered %ld (expected %d)", path, st, i == 0 ? 200 : 404);
    }
    json_decref(p);
  }

  printf("\ndemo passed: 1 purchase succeeded, 1 failed on inventory, 1 refused at payment "
         "and compensated\n");
  shop_events_close(d.events);
  for (int i = 0; i < d.ntrack; i++) shop_track_destroy(&d.track[i]);
  json_decref(d.keyboard);
  json_decref(d.mouse);
  shop_client_free(d.c);
  shop_client_global_cleanup();
  return 0;
}
