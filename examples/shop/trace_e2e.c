/*
 * The tracing end-to-end test of the distributed shop (test_cluster's "trace" mode): the
 * cluster's services export their spans (scripts/shop_cluster.sh start --otlp URL) to the
 * OTLP/HTTP collector of trace_sink.c, run in this process on 127.0.0.1 with a free port; the
 * tests make purchases and check the traces that arrive. The collector refuses (400) and
 * counts any request that is not an ExportTraceServiceRequest: the test fails on any.
 */
#include <arpa/inet.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <cmocka.h>

#include "e2e.h"
#include "trace_e2e.h"
#include "trace_sink.h"

/* ---- reading traces ------------------------------------------------------------------------- */

static const char *attr(const json_t *sp, const char *key) {
  size_t i;
  json_t *a;
  json_array_foreach(json_object_get(sp, "attributes"), i, a) {
    if (strcmp(json_string_value(json_object_get(a, "key")) ?: "", key) == 0) {
      json_t *v = json_object_get(a, "value");
      const char *s = json_string_value(json_object_get(v, "stringValue"));
      return s ? s : json_string_value(json_object_get(v, "intValue"));
    }
  }
  return NULL;
}

static const char *str(const json_t *sp, const char *key) {
  const char *s = json_string_value(json_object_get(sp, key));
  return s ? s : "";
}

/* The spans of trace `trace` named `name` from `service` (borrowed), into out (max n). */
static size_t spans_named(const json_t *all, const char *trace, const char *service,
                          const char *name, const json_t **out, size_t n) {
  size_t got = 0, i;
  json_t *sp;
  json_array_foreach(all, i, sp) {
    if (strcmp(str(sp, "traceId"), trace) == 0 && strcmp(str(sp, "name"), name) == 0 &&
        (service == NULL || strcmp(str(sp, "service"), service) == 0)) {
      if (got < n) out[got] = sp;
      got++;
    }
  }
  return got;
}

/* The one span of the trace named name from service, or NULL (none, or several). */
static const json_t *one(const json_t *all, const char *trace, const char *service,
                         const char *name) {
  const json_t *sp = NULL;
  return spans_named(all, trace, service, name, &sp, 1) == 1 ? sp : NULL;
}

/* The handler span (SERVER) of `service` named `command` under one of the attempts named
 * `attempt` (CLIENT, from the orchestrator), children of parent_id: found, or why not in
 * *why. Returns the attempt the handler hangs under. */
static const json_t *step_pair(const json_t *all, const char *trace, const char *parent_id,
                               const char *from, const char *attempt, const char *service,
                               const char *command, const char **why) {
  const json_t *att[16], *hs[16];
  size_t na = spans_named(all, trace, from, attempt, att, 16);
  size_t nh = spans_named(all, trace, service, command, hs, 16);
  if (na == 0 || na > 16) return *why = "no attempt span", NULL;
  for (size_t i = 0; i < na; i++) {
    if (strcmp(str(att[i], "parentSpanId"), parent_id) != 0)
      return *why = "an attempt not under its saga's span", NULL;
    if (json_integer_value(json_object_get(att[i], "kind")) != 3)
      return *why = "an attempt not of kind CLIENT", NULL;
  }
  if (nh == 0 || nh > 16) return *why = "no handler span from the participant's process", NULL;
  for (size_t h = 0; h < nh; h++) {
    if (json_integer_value(json_object_get(hs[h], "kind")) != 2)
      return *why = "a handler span not of kind SERVER", NULL;
    for (size_t i = 0; i < na; i++)
      if (strcmp(str(hs[h], "parentSpanId"), str(att[i], "spanId")) == 0) return att[i];
  }
  return *why = "the handler span is no child of an attempt", NULL;
}

typedef struct expect {
  const char *trace;          /* its trace id */
  const char *caller_span;    /* the caller's span (the root's parent), or NULL */
  int compensated;            /* refused at the payment: steps 1 and 0 compensated */
} expect;

/* Whether trace e is complete and right in all; why says what is missing or wrong. */
static int trace_ok(const json_t *all, const expect *e, const char **why) {
  /* purchase service: the request saga (the root, or a child of the caller's span) */
  const json_t *req = one(all, e->trace, "purchase", "purchase-request");
  if (req == NULL) return *why = "no purchase-request saga span from the purchase service", 0;
  const char *want_parent = e->caller_span ? e->caller_span : "";
  if (strcmp(str(req, "parentSpanId"), want_parent) != 0)
    return *why = "the request saga's parent is not the caller's span", 0;
  if (json_integer_value(json_object_get(req, "kind")) != 1)
    return *why = "a saga span not of kind INTERNAL", 0;
  /* its step, and the orchestrator's handler of the request */
  const json_t *att = step_pair(all, e->trace, str(req, "spanId"), "purchase",
                                "purchase-request/orchestrator.purchase", "orchestrator",
                                "orchestrator.purchase", why);
  if (att == NULL) return 0;
  const json_t *hs[16];
  size_t nh = spans_named(all, e->trace, "orchestrator", "orchestrator.purchase", hs, 16);
  /* the purchase saga: a child of (one of) the handler's spans that started it */
  const json_t *saga = one(all, e->trace, "orchestrator", "purchase");
  if (saga == NULL) return *why = "no purchase saga span from the orchestrator", 0;
  int under = 0;
  for (size_t h = 0; h < nh && h < 16; h++)
    under |= strcmp(str(saga, "parentSpanId"), str(hs[h], "spanId")) == 0;
  if (!under) return *why = "the purchase saga is no child of the request's handler span", 0;
  const char *sid = str(saga, "spanId");
  static const char *const steps[3][3] = {{"purchase/product.reserve", "product", "product.reserve"},
                                         {"purchase/order.create", "order", "order.create"},
                                         {"purchase/payment.charge", "payment", "payment.charge"}};
  for (int k = 0; k < 3; k++)
    if (step_pair(all, e->trace, sid, "orchestrator", steps[k][0], steps[k][1], steps[k][2],
                  why) == NULL)
      return 0;
  const json_t *pay = one(all, e->trace, "orchestrator", "purchase/payment.charge");
  int saga_code = (int)json_integer_value(json_object_get(json_object_get(saga, "status"), "code"));
  if (e->compensated) {
    if (pay == NULL || strcmp(attr(pay, "saga.status") ?: "", "refused") != 0)
      return *why = "the refused payment attempt is not marked refused", 0;
    if (step_pair(all, e->trace, sid, "orchestrator", "purchase/compensate order.create", "order",
                  "order.delete", why) == NULL ||
        step_pair(all, e->trace, sid, "orchestrator", "purchase/compensate product.reserve",
                  "product", "product.release", why) == NULL)
      return 0;
    if (saga_code != 2) return *why = "a compensated purchase's saga span is not an error", 0;
  } else {
    const json_t *c[2];
    if (spans_named(all, e->trace, NULL, "purchase/compensate order.create", c, 2) != 0)
      return *why = "compensation spans in a purchase that completed", 0;
    if (saga_code != 1) return *why = "a completed purchase's saga span is not OK", 0;
  }
  /* every span of the trace: a saga.id, times in order, a parent inside the trace (or the
   * caller's span for the root) */
  size_t i, n = 0;
  json_t *sp;
  json_array_foreach(all, i, sp) {
    if (strcmp(str(sp, "traceId"), e->trace) != 0) continue;
    n++;
    if (attr(sp, "saga.id") == NULL) return *why = "a span without saga.id", 0;
    if (strtoull(str(sp, "endTimeUnixNano"), NULL, 10) <
        strtoull(str(sp, "startTimeUnixNano"), NULL, 10))
      return *why = "a span ending before it started", 0;
    const char *parent = str(sp, "parentSpanId");
    if (parent[0] == '\0' || (e->caller_span && strcmp(parent, e->caller_span) == 0)) {
      if (sp != req) return *why = "a second root in the trace", 0;
      continue;
    }
    int found = 0;
    size_t j;
    json_t *q;
    json_array_foreach(all, j, q) found |= strcmp(str(q, "spanId"), parent) == 0 &&
                                          strcmp(str(q, "traceId"), e->trace) == 0;
    if (!found) return *why = "a parent span that was not exported", 0;
  }
  return n > 0;
}

typedef struct wait_ctx {
  const expect *e;
  size_t n;
  const char *why;
} wait_ctx;

/* Waits (on the collector's condition variable, up to ms) until every trace is complete. */
static int wait_traces(wait_ctx *w, long ms) {
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += ms / 1000;
  until.tv_nsec += (ms % 1000) * 1000000L;
  if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
  json_t *spans = trace_sink_lock();
  int done = 0;
  for (;;) {
    done = 1;
    for (size_t i = 0; i < w->n && done; i++) done = trace_ok(spans, &w->e[i], &w->why);
    if (done || trace_sink_wait(&until) != 0) break;
  }
  if (!done) /* one last look after the deadline */
    for (size_t i = 0; i < w->n; i++)
      if (!trace_ok(spans, &w->e[i], &w->why)) break;
  trace_sink_unlock();
  return done;
}

static void random_hex(char *out, size_t digits) {
  static const char x[] = "0123456789abcdef";
  unsigned char b[32];
  assert_int_equal(getrandom(b, sizeof b, 0), (ssize_t)sizeof b);
  for (size_t i = 0; i < digits; i++) out[i] = x[b[i / 2] >> (i % 2 ? 0 : 4) & 15];
  out[digits] = '\0';
  out[0] = out[0] == '0' ? '1' : out[0];
}

/* POSTs a purchase (with a traceparent header when tp is not NULL); returns its id (owned). */
static json_t *buy_traced(shop_client *c, json_t *items, const char *tp) {
  json_t *b = purchase_body(items, "US");
  char *text = json_dumps(b, JSON_COMPACT);
  json_decref(b);
  char hdr[128];
  snprintf(hdr, sizeof hdr, "traceparent: %s", tp ? tp : "");
  const char *headers[] = {hdr, NULL};
  shop_send_opts o;
  memset(&o, 0, sizeof o);
  o.body = text;
  o.body_len = strlen(text);
  o.headers = tp ? headers : NULL;
  shop_resp r;
  long st = shop_client_send(c, "POST", "/api/purchase", &o, &r);
  free(text);
  if (st != 201) print_error("POST /api/purchase: %ld %s %s\n", st, r.body ? r.body : "", r.err);
  assert_int_equal(st, 201);
  json_t *id = json_incref(json_object_get(r.json, "purchase_id"));
  shop_resp_destroy(&r);
  assert_non_null(id);
  return id;
}

static char trace1[33], span1[17]; /* the caller's context of purchase 1 */

void trace_purchases(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  json_t *p = product_new(a.c, "Traced", 100, 100);
  stream s;
  stream_open(&s, a.access);
  /* 1: with the caller's traceparent, completes */
  char tp1[64];
  random_hex(trace1, 32);
  random_hex(span1, 16);
  snprintf(tp1, sizeof tp1, "00-%s-%s-01", trace1, span1);
  json_t *items = json_array();
  json_array_append_new(items, item(p, 1));
  json_t *id1 = buy_traced(a.c, items, tp1);
  /* 2: above the payment limit: refused at the payment, compensated */
  items = json_array();
  json_array_append_new(items, item(p, PAYMENT_LIMIT / 100 + 1));
  json_t *id2 = buy_traced(a.c, items, NULL);
  /* 3: a malformed traceparent is ignored (a trace of its own), completes */
  items = json_array();
  json_array_append_new(items, item(p, 2));
  json_t *id3 = buy_traced(a.c, items, "00-NOT-A-TRACEPARENT-01");
  assert_int_equal(shop_track_outcome(stream_wait(&s, id1, WAIT_MS)), SHOP_SUCCEEDED);
  assert_int_equal(shop_track_outcome(stream_wait(&s, id2, WAIT_MS)), SHOP_COMPENSATED);
  assert_int_equal(shop_track_outcome(stream_wait(&s, id3, WAIT_MS)), SHOP_SUCCEEDED);
  /* The services export every hour or per 512 spans (SHOP_OTLP_INTERVAL_MS): nothing yet.
   * Their clean stop must send it all. */
  size_t exported = json_array_size(trace_sink_lock());
  trace_sink_unlock();
  assert_int_equal(exported, 0);
  stream_close(&s);
  json_decref(id1);
  json_decref(id2);
  json_decref(id3);
  json_decref(p);
  customer_free(&a);
}

void trace_check(void **state) {
  (void)state;
  /* The traces of 2 and 3: each the one trace holding a purchase-request saga span that is
   * not trace 1's; the compensated one is the one with compensations. They arrive from five
   * processes, each exporting on its own schedule: wait for them. */
  char trace2[33] = "", trace3[33] = "";
  long long until = shop_now_ms() + WAIT_MS;
  for (;;) {
    json_t *spans = trace_sink_lock();
    size_t i;
    json_t *sp;
    int roots = 0;
    trace2[0] = trace3[0] = '\0';
    json_array_foreach(spans, i, sp) {
      if (strcmp(str(sp, "name"), "purchase-request") != 0 ||
          strcmp(str(sp, "traceId"), trace1) == 0)
        continue;
      roots++;
      const json_t *c[1];
      int comp = spans_named(spans, str(sp, "traceId"), NULL, "purchase/compensate order.create",
                             c, 1) > 0;
      snprintf(comp ? trace2 : trace3, 33, "%s", str(sp, "traceId"));
    }
    trace_sink_unlock();
    if ((roots == 2 && trace2[0] && trace3[0]) || shop_now_ms() > until) {
      if (roots != 2) print_error("%d request sagas outside trace 1\n", roots);
      assert_int_equal(roots, 2);
      break;
    }
    (void)trace_sink_lock();
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += 1;
    (void)trace_sink_wait(&t); /* the next request, or a second */
    trace_sink_unlock();
  }
  assert_true(trace2[0] && trace3[0]);
  assert_string_not_equal(trace2, trace3);
  expect want[3] = {{trace1, span1, 0}, {trace2, NULL, 1}, {trace3, NULL, 0}};
  wait_ctx w = {want, 3, ""};
  int ok = wait_traces(&w, WAIT_MS);
  if (!ok) print_error("traces incomplete or wrong: %s\n", w.why);
  assert_true(ok);
  /* One trace per purchase: every purchase saga span is in one of the three. */
  json_t *spans = trace_sink_lock();
  size_t i, sagas = 0, strays = 0, total = json_array_size(spans);
  json_t *sp;
  json_array_foreach(spans, i, sp) {
    if (strcmp(str(sp, "name"), "purchase") != 0) continue;
    sagas++;
    const char *t = str(sp, "traceId");
    strays += strcmp(t, trace1) != 0 && strcmp(t, trace2) != 0 && strcmp(t, trace3) != 0;
  }
  unsigned long malformed = trace_sink_malformed(), dropped = trace_sink_dropped();
  unsigned long posts = trace_sink_posts();
  trace_sink_unlock();
  assert_int_equal(sagas, 3);
  assert_int_equal(strays, 0);
  assert_int_equal(malformed, 0);
  assert_int_equal(dropped, 0);
  printf("# %zu spans in %lu OTLP requests; traces %s %s %s\n", total, posts, trace1, trace2,
         trace3);
}

/* The lines of text, and of those the ones at depth 0 (not indented, after the header). */
static size_t tree_lines(const char *text, size_t *roots) {
  size_t n = 0;
  *roots = 0;
  for (const char *p = text; *p != '\0'; p++) {
    if (p != text && p[-1] != '\n') continue;
    n++;
    if (n > 1 && *p != ' ') (*roots)++;
  }
  return n;
}

/* The collector draws each trace as one tree: GET /traces/ID, as an operator would look. */
void trace_tree(void **state) {
  (void)state;
  const char *ids[3] = {trace1, NULL, NULL};
  char listed[3][33];
  json_t *spans = trace_sink_lock();
  /* trace 2 and 3 are the others holding a purchase saga */
  size_t i, k = 1, counts[3] = {0, 0, 0};
  json_t *sp;
  json_array_foreach(spans, i, sp) {
    const char *t = str(sp, "traceId");
    if (strcmp(str(sp, "name"), "purchase") == 0 && strcmp(t, trace1) != 0 && k < 3) {
      snprintf(listed[k], 33, "%s", t);
      ids[k] = listed[k];
      k++;
    }
  }
  for (size_t t = 0; t < k; t++)
    json_array_foreach(spans, i, sp) counts[t] += strcmp(str(sp, "traceId"), ids[t]) == 0;
  trace_sink_unlock();
  assert_int_equal(k, 3);
  shop_client *c = NULL;
  assert_int_equal(shop_client_new(&c, trace_sink_url()), 0);
  for (size_t t = 0; t < 3; t++) {
    char path[64];
    snprintf(path, sizeof path, "/traces/%s", ids[t]);
    shop_resp r;
    long code = shop_client_send(c, "GET", path, NULL, &r);
    assert_int_equal(code, 200);
    const char *text = r.body != NULL ? r.body : "";
    printf("%s", text);
    size_t roots, lines = tree_lines(text, &roots);
    /* a header, then every span of the trace, and one root: the purchase request (trace 1's
     * hangs under the caller's span, which no service exported) */
    assert_int_equal(lines, counts[t] + 1);
    assert_int_equal(roots, 1);
    assert_non_null(strstr(text, "\npurchase-request  [purchase]"));
    assert_true((strstr(text, "not received") != NULL) == (t == 0));
    shop_resp_destroy(&r);
  }
  /* a bad id is refused, an unknown one not found */
  shop_resp r;
  assert_int_equal(shop_client_send(c, "GET", "/traces/XYZ", NULL, &r), 400);
  shop_resp_destroy(&r);
  assert_int_equal(
      shop_client_send(c, "GET", "/traces/0123456789abcdef0123456789abcdef", NULL, &r), 404);
  shop_resp_destroy(&r);
  shop_client_free(c);
}
