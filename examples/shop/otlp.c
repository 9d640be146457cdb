/*
 * Span export with OTLP over HTTP/JSON (docs/shop.md, "Tracing"; docs/operating.md, "Tracing").
 *
 * The nodes' span hook (saga_node_config.on_span) runs on the loop: it copies each ended span
 * into a bounded ring (a short mutex, no allocation, no I/O) and returns. A thread of the
 * exporter's own takes what the ring holds, at least every EXPORT_INTERVAL_MS (200 ms; the
 * environment variable SHOP_OTLP_INTERVAL_MS sets another, 10 ms to 1 h) or as soon as a batch
 * is full, builds an ExportTraceServiceRequest in its JSON mapping with jansson and POSTs
 * it to <url>/v1/traces with libcurl. So the saga loop never waits for the collector: when the
 * ring is full (the collector slow or away) a span is dropped and counted, never queued
 * without bound. A batch the collector refuses or that times out is dropped and counted too
 * (spans are telemetry: the sagas' state is in their databases). shop_otlp_close() sends what
 * is left (a clean shutdown loses nothing while the collector answers) and joins the thread.
 *
 * Mapping (saga/trace.h -> OTLP): the saga's span is INTERNAL, step, compensation and resolve
 * attempts are CLIENT (the orchestrator asks, the participant answers), handler runs SERVER;
 * status OK -> STATUS_CODE_OK, ERROR and REFUSED -> STATUS_CODE_ERROR with the reason as its
 * message (attribute saga.status says "refused" for a business refusal); spans whose trace
 * flags are not sampled are not exported. Resource: service.name = the shop service.
 */
#include <curl/curl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "shop.h"

#define RING 4096               /* spans waiting at most */
#define BATCH 512               /* spans per request at most */
#define EXPORT_INTERVAL_MS 200  /* the longest a span waits for its batch (by default) */
#define REQUEST_TIMEOUT_MS 5000 /* one POST */
#define MAX_SOURCES 8

typedef struct otlp_span {
  char trace[33], span[17], parent[17];
  uint8_t flags;
  int kind, status;
  char name[160], saga[40], def[64], error[256];
  const char *node; /* a source's name: lives as long as the exporter */
  int step;
  uint32_t attempt;
  uint64_t start, end;
} otlp_span;

typedef struct otlp_source {
  shop_otlp *o;
  char node[32];
} otlp_source;

struct shop_otlp {
  char url[600];
  char service[64];
  otlp_source sources[MAX_SOURCES];
  int nsources;
  pthread_t thread;
  int thread_started;
  pthread_mutex_t mu;
  pthread_cond_t cond;
  otlp_span *ring; /* RING entries; head = oldest */
  size_t head, count;
  int stop;
  /* counters (under mu) */
  uint64_t exported, dropped, failed_spans, failed_requests, unsampled;
  int failure_logged;
  long interval_ms; /* EXPORT_INTERVAL_MS, or $SHOP_OTLP_INTERVAL_MS (10 ms .. 1 h) */
};

/* ---- the hook (loop thread) ---------------------------------------------------------------- */

static void hook(saga_node *node, const saga_span *s, void *arg) {
  (void)node;
  otlp_source *src = arg;
  shop_otlp *o = src->o;
  if (s->event != SAGA_SPAN_END) return; /* OTLP takes whole spans */
  pthread_mutex_lock(&o->mu);
  if (!(s->flags & 1)) {
    o->unsampled++;
  } else if (o->count == RING || o->stop) {
    o->dropped++;
  } else {
    otlp_span *e = &o->ring[(o->head + o->count) % RING];
    snprintf(e->trace, sizeof e->trace, "%s", s->trace_id);
    snprintf(e->span, sizeof e->span, "%s", s->span_id);
    snprintf(e->parent, sizeof e->parent, "%s", s->parent_span_id);
    e->flags = s->flags;
    e->kind = s->kind;
    e->status = s->status;
    snprintf(e->name, sizeof e->name, "%s", s->name);
    snprintf(e->saga, sizeof e->saga, "%s", s->saga_id);
    snprintf(e->def, sizeof e->def, "%s", s->definition);
    snprintf(e->error, sizeof e->error, "%s", s->error);
    e->node = src->node;
    e->step = s->step;
    e->attempt = s->attempt;
    e->start = s->start_ns;
    e->end = s->end_ns;
    if (++o->count >= BATCH) pthread_cond_signal(&o->cond);
  }
  pthread_mutex_unlock(&o->mu);
}

/* ---- the request body ------------------------------------------------------------------------ */

static json_t *attr_str(const char *key, const char *v) {
  return json_pack("{s:s, s:{s:s}}", "key", key, "value", "stringValue", v);
}

static json_t *attr_int(const char *key, int64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "%" PRId64, v); /* OTLP/JSON: 64-bit integers as strings */
  return json_pack("{s:s, s:{s:s}}", "key", key, "value", "intValue", buf);
}

static int otel_kind(int kind) {
  switch (kind) {
  case SAGA_SPAN_SAGA: return 1;    /* SPAN_KIND_INTERNAL */
  case SAGA_SPAN_HANDLER: return 2; /* SPAN_KIND_SERVER */
  default: return 3;                /* SPAN_KIND_CLIENT */
  }
}

static const char *status_name(int st) {
  return st == SAGA_SPAN_OK ? "ok" : st == SAGA_SPAN_REFUSED ? "refused" : "error";
}

static json_t *span_json(const otlp_span *e) {
  char start[24], end[24];
  snprintf(start, sizeof start, "%" PRIu64, e->start);
  snprintf(end, sizeof end, "%" PRIu64, e->end);
  json_t *attrs = json_array();
  json_array_append_new(attrs, attr_str("saga.id", e->saga));
  if (e->def[0] != '\0') json_array_append_new(attrs, attr_str("saga.definition", e->def));
  if (e->step >= 0) json_array_append_new(attrs, attr_int("saga.step", e->step));
  if (e->attempt > 0) json_array_append_new(attrs, attr_int("saga.attempt", e->attempt));
  json_array_append_new(attrs, attr_str("saga.span_kind", saga_span_kind_name(e->kind)));
  json_array_append_new(attrs, attr_str("saga.node", e->node));
  json_array_append_new(attrs, attr_str("saga.status", status_name(e->status)));
  json_t *status = json_pack("{s:i}", "code", e->status == SAGA_SPAN_OK ? 1 : 2);
  if (e->status != SAGA_SPAN_OK && e->error[0] != '\0')
    json_object_set_new(status, "message", json_string(e->error));
  json_t *j = json_pack("{s:s, s:s, s:s, s:i, s:s, s:s, s:o, s:o}", "traceId", e->trace,
                        "spanId", e->span, "name", e->name, "kind", otel_kind(e->kind),
                        "startTimeUnixNano", start, "endTimeUnixNano", end, "attributes", attrs,
                        "status", status);
  if (j != NULL && e->parent[0] != '\0')
    json_object_set_new(j, "parentSpanId", json_string(e->parent));
  return j;
}

/* The ExportTraceServiceRequest for n spans, as text (free()), or NULL. */
static char *request_body(const shop_otlp *o, const otlp_span *spans, size_t n) {
  json_t *list = json_array();
  for (size_t i = 0; i < n; i++) json_array_append_new(list, span_json(&spans[i]));
  json_t *req = json_pack(
      "{s:[{s:{s:[o]}, s:[{s:{s:s, s:s}, s:o}]}]}", "resourceSpans", "resource", "attributes",
      attr_str("service.name", o->service), "scopeSpans", "scope", "name", "libsaga", "version",
      saga_version(), "spans", list);
  char *text = req != NULL ? json_dumps(req, JSON_COMPACT) : NULL;
  json_decref(req);
  return text;
}

static size_t discard(char *p, size_t size, size_t n, void *arg) {
  (void)p, (void)arg;
  return size * n;
}

/* POSTs body; 0 when the collector answered 2xx. */
static int post(shop_otlp *o, CURL *curl, const char *body, long *http_code, char *err) {
  struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
  curl_easy_reset(curl);
  curl_easy_setopt(curl, CURLOPT_URL, o->url);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, h);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long)REQUEST_TIMEOUT_MS);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, 2000L);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, err);
  err[0] = '\0';
  CURLcode rc = curl_easy_perform(curl);
  *http_code = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, http_code);
  curl_slist_free_all(h);
  if (rc != CURLE_OK && err[0] == '\0') snprintf(err, CURL_ERROR_SIZE, "%s", curl_easy_strerror(rc));
  return rc == CURLE_OK && *http_code >= 200 && *http_code < 300 ? 0 : -1;
}

/* ---- the thread -------------------------------------------------------------------------- */

static void *run(void *arg) {
  shop_otlp *o = arg;
  CURL *curl = curl_easy_init();
  otlp_span *batch = malloc(BATCH * sizeof *batch);
  char err[CURL_ERROR_SIZE];
  for (;;) {
    pthread_mutex_lock(&o->mu);
    if (o->count < BATCH && !o->stop) {
      struct timespec until;
      clock_gettime(CLOCK_REALTIME, &until);
      until.tv_sec += o->interval_ms / 1000;
      until.tv_nsec += (o->interval_ms % 1000) * 1000000L;
      if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
      }
      pthread_cond_timedwait(&o->cond, &o->mu, &until);
    }
    size_t n = o->count < BATCH ? o->count : BATCH;
    if (batch == NULL || curl == NULL) { /* cannot export at all: count them as dropped */
      o->dropped += o->count;
      o->head = 0;
      o->count = 0;
      n = 0;
    }
    for (size_t i = 0; i < n; i++) batch[i] = o->ring[(o->head + i) % RING];
    o->head = (o->head + n) % RING;
    o->count -= n;
    int stopping = o->stop;
    pthread_mutex_unlock(&o->mu);
    if (n == 0) {
      if (stopping) break;
      continue;
    }
    char *body = request_body(o, batch, n);
    long code = 0;
    int ok = body != NULL && post(o, curl, body, &code, err) == 0;
    free(body);
    pthread_mutex_lock(&o->mu);
    if (ok) {
      o->exported += n;
    } else {
      o->failed_spans += n;
      o->failed_requests++;
      if (!o->failure_logged) {
        o->failure_logged = 1;
        fprintf(stderr, "[%s] OTLP export to %s failed (HTTP %ld%s%s); spans are dropped while "
                "it fails (see shop_otlp_* in /metrics)\n", o->service, o->url, code,
                err[0] ? ": " : "", err);
      }
      if (o->stop) { /* shutting down: do not wait for an absent collector once per batch */
        o->failed_spans += o->count;
        o->head = 0;
        o->count = 0;
      }
    }
    pthread_mutex_unlock(&o->mu);
  }
  free(batch);
  if (curl != NULL) curl_easy_cleanup(curl);
  return NULL;
}

/* ---- setup ------------------------------------------------------------------------------- */

int shop_otlp_new(shop_otlp **out, const char *base_url, const char *service) {
  *out = NULL;
  size_t len = strlen(base_url);
  while (len > 0 && base_url[len - 1] == '/') len--;
  shop_otlp *o = calloc(1, sizeof *o);
  if (o == NULL) return -1;
  o->ring = calloc(RING, sizeof *o->ring);
  if (o->ring == NULL || len + sizeof "/v1/traces" > sizeof o->url) {
    free(o->ring);
    free(o);
    return -1;
  }
  snprintf(o->url, sizeof o->url, "%.*s/v1/traces", (int)len, base_url);
  snprintf(o->service, sizeof o->service, "%s", service);
  o->interval_ms = EXPORT_INTERVAL_MS;
  const char *env = getenv("SHOP_OTLP_INTERVAL_MS");
  if (env != NULL) {
    char *end;
    long v = strtol(env, &end, 10);
    if (*end == '\0' && v >= 10 && v <= 3600000) o->interval_ms = v;
  }
  pthread_mutex_init(&o->mu, NULL);
  pthread_cond_init(&o->cond, NULL);
  if (pthread_create(&o->thread, NULL, run, o) != 0) {
    pthread_mutex_destroy(&o->mu);
    pthread_cond_destroy(&o->cond);
    free(o->ring);
    free(o);
    return -1;
  }
  o->thread_started = 1;
  *out = o;
  return 0;
}

int shop_otlp_attach(shop_otlp *o, const char *node, saga_node_config *cfg) {
  if (o->nsources == MAX_SOURCES) return -1;
  otlp_source *s = &o->sources[o->nsources++];
  s->o = o;
  snprintf(s->node, sizeof s->node, "%s", node);
  cfg->on_span = hook;
  cfg->span_arg = s;
  return 0;
}

void shop_otlp_metrics(shop_text *b, void *arg) {
  shop_otlp *o = arg;
  pthread_mutex_lock(&o->mu);
  uint64_t exported = o->exported, dropped = o->dropped, failed = o->failed_spans,
           requests = o->failed_requests, unsampled = o->unsampled, queued = o->count;
  pthread_mutex_unlock(&o->mu);
  shop_text_metric(b, "shop_otlp_spans_exported_total", "counter",
                   "Spans the OTLP collector accepted.", "", exported);
  shop_text_metric(b, "shop_otlp_spans_dropped_total", "counter",
                   "Spans dropped because the export queue was full.", "", dropped);
  shop_text_metric(b, "shop_otlp_spans_failed_total", "counter",
                   "Spans of requests the collector refused or that failed.", "", failed);
  shop_text_metric(b, "shop_otlp_export_failures_total", "counter",
                   "OTLP requests that failed.", "", requests);
  shop_text_metric(b, "shop_otlp_spans_unsampled_total", "counter",
                   "Spans not exported because their trace is not sampled.", "", unsampled);
  shop_text_metric(b, "shop_otlp_queue_spans", "gauge", "Spans waiting to be exported.", "",
                   queued);
}

void shop_otlp_close(shop_otlp *o) {
  if (o == NULL) return;
  pthread_mutex_lock(&o->mu);
  o->stop = 1;
  pthread_cond_signal(&o->cond);
  pthread_mutex_unlock(&o->mu);
  if (o->thread_started) pthread_join(o->thread, NULL);
  pthread_mutex_destroy(&o->mu);
  pthread_cond_destroy(&o->cond);
  free(o->ring);
  free(o);
}
