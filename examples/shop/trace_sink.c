/*
 * A small OTLP/HTTP trace collector (trace_sink.h), on libmicrohttpd with its own polling
 * thread.
 *
 * POST /v1/traces takes an ExportTraceServiceRequest in the OTLP JSON mapping. The whole
 * request is checked before anything of it is kept (resourceSpans / scopeSpans / spans, hex
 * ids of the right length, times as decimal strings, a service.name per resource): a request
 * that is not such a document is answered 400 and counted, a body above 8 MiB 413. Spans are
 * kept with the service.name of their resource, the newest max_spans of them.
 *
 * GET /traces lists the traces held, newest first; GET /traces/ID draws trace ID as a tree.
 * Both answer text/plain; everything that came from the network is printed with control
 * characters replaced, so a hostile exporter cannot write to the terminal of whoever looks.
 */
#include "trace_sink.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BODY_MAX (8u * 1024 * 1024)
#define DEPTH_MAX 32 /* indentation stops growing here (a hostile trace can be deep) */

static struct MHD_Daemon *daemon_;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static json_t *spans; /* every span kept, oldest first, with "service" added */
static size_t max_spans;
static unsigned long posts, malformed, dropped;
static char url[96];

typedef struct body {
  char *p;
  size_t len;
  int too_big;
} body;

static int hex_of(const json_t *v, size_t len) {
  const char *s = json_string_value(v);
  if (s == NULL || strlen(s) != len) return 0;
  for (size_t i = 0; i < len; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
  return 1;
}

static int decimal_of(const json_t *v) {
  const char *s = json_string_value(v);
  if (s == NULL || s[0] == '\0' || strlen(s) > 19) return 0;
  for (; *s; s++)
    if (*s < '0' || *s > '9') return 0;
  return 1;
}

/* Checks one request and keeps its spans; 0, or -1 when it is not a valid request. */
static int take(const char *text, size_t len) {
  json_t *req = json_loadb(text, len, 0, NULL);
  json_t *rs = json_object_get(req, "resourceSpans");
  int ok = json_is_array(rs) && json_array_size(rs) > 0;
  json_t *got = json_array();
  ok = ok && got != NULL;
  size_t i, j, k;
  json_t *r, *ss, *sp;
  json_array_foreach(rs, i, r) {
    if (!ok) break;
    const char *service = NULL;
    json_t *a;
    size_t n;
    json_array_foreach(json_object_get(json_object_get(r, "resource"), "attributes"), n, a) {
      const char *key = json_string_value(json_object_get(a, "key"));
      if (key != NULL && strcmp(key, "service.name") == 0)
        service = json_string_value(json_object_get(json_object_get(a, "value"), "stringValue"));
    }
    json_t *scopes = json_object_get(r, "scopeSpans");
    ok = ok && service != NULL && json_is_array(scopes);
    json_array_foreach(scopes, j, ss) {
      json_t *list = json_object_get(ss, "spans");
      ok = ok && json_is_array(list) && json_is_object(json_object_get(ss, "scope"));
      json_array_foreach(list, k, sp) {
        json_t *parent = json_object_get(sp, "parentSpanId");
        ok = ok && hex_of(json_object_get(sp, "traceId"), 32) &&
             hex_of(json_object_get(sp, "spanId"), 16) && (parent == NULL || hex_of(parent, 16)) &&
             json_is_string(json_object_get(sp, "name")) &&
             json_is_integer(json_object_get(sp, "kind")) &&
             decimal_of(json_object_get(sp, "startTimeUnixNano")) &&
             decimal_of(json_object_get(sp, "endTimeUnixNano")) &&
             json_is_array(json_object_get(sp, "attributes")) &&
             json_is_integer(json_object_get(json_object_get(sp, "status"), "code"));
        if (!ok) break;
        json_t *copy = json_deep_copy(sp);
        ok = copy != NULL && json_object_set_new(copy, "service", json_string(service)) == 0 &&
             json_array_append_new(got, copy) == 0;
      }
    }
  }
  pthread_mutex_lock(&mu);
  if (ok && spans != NULL) {
    json_array_extend(spans, got);
    while (json_array_size(spans) > max_spans) {
      json_array_remove(spans, 0);
      dropped++;
    }
    posts++;
  } else {
    malformed++;
    fprintf(stderr, "trace collector: refused a request that is not an "
                    "ExportTraceServiceRequest (%zu bytes)\n", len);
  }
  pthread_cond_broadcast(&cond);
  pthread_mutex_unlock(&mu);
  json_decref(got);
  json_decref(req);
  return ok ? 0 : -1;
}

/* ---- drawing -------------------------------------------------------------------------------- */

static const char *str(const json_t *sp, const char *key) {
  const char *s = json_string_value(json_object_get(sp, key));
  return s ? s : "";
}

static unsigned long long nanos(const json_t *sp, const char *key) {
  return strtoull(str(sp, key), NULL, 10);
}

/* s, at most max bytes of it, with control characters (and DEL) as '?'. */
static void put_safe(FILE *f, const char *s, size_t max) {
  for (size_t i = 0; s[i] != '\0' && i < max; i++) {
    unsigned char c = (unsigned char)s[i];
    fputc(c < 0x20 || c == 0x7f ? '?' : c, f);
  }
}

typedef struct node {
  const json_t *sp;
  unsigned long long start;
  int parent; /* index in the trace's nodes, -1 for none received */
  int drawn;
} node;

static int by_start(const void *a, const void *b) {
  const node *x = a, *y = b;
  return x->start < y->start ? -1 : x->start > y->start;
}

static void draw(FILE *f, node *ns, size_t n, size_t at, int depth, unsigned long long t0) {
  node *nd = &ns[at];
  nd->drawn = 1;
  const json_t *sp = nd->sp;
  for (int d = 0; d < (depth < DEPTH_MAX ? depth : DEPTH_MAX); d++) fputs("  ", f);
  put_safe(f, str(sp, "name"), 200);
  fputs("  [", f);
  put_safe(f, str(sp, "service"), 100);
  unsigned long long end = nanos(sp, "endTimeUnixNano");
  fprintf(f, "]  +%.1f ms  %.1f ms", (double)(nd->start - t0) / 1e6,
          end > nd->start ? (double)(end - nd->start) / 1e6 : 0.0);
  const json_t *status = json_object_get(sp, "status");
  json_int_t code = json_integer_value(json_object_get(status, "code"));
  if (code == 1) fputs("  OK", f);
  if (code == 2) {
    fputs("  ERROR", f);
    const char *msg = str(status, "message");
    if (msg[0] != '\0') {
      fputs(": ", f);
      put_safe(f, msg, 200);
    }
  }
  if (nd->parent < 0 && str(sp, "parentSpanId")[0] != '\0')
    fprintf(f, "  (parent %.16s not received)", str(sp, "parentSpanId"));
  fputc('\n', f);
  for (size_t i = 0; i < n; i++) /* children, in start order */
    if (!ns[i].drawn && ns[i].parent == (int)at) draw(f, ns, n, i, depth + 1, t0);
}

char *trace_sink_tree(const json_t *all, const char *trace) {
  size_t n = 0, i;
  json_t *sp;
  json_array_foreach(all, i, sp) n += strcmp(str(sp, "traceId"), trace) == 0;
  if (n == 0) return NULL;
  node *ns = calloc(n, sizeof *ns);
  if (ns == NULL) return NULL;
  size_t k = 0;
  json_array_foreach(all, i, sp) {
    if (strcmp(str(sp, "traceId"), trace) != 0) continue;
    ns[k].sp = sp;
    ns[k].start = nanos(sp, "startTimeUnixNano");
    k++;
  }
  qsort(ns, n, sizeof *ns, by_start);
  for (i = 0; i < n; i++) {
    ns[i].parent = -1;
    const char *p = str(ns[i].sp, "parentSpanId");
    for (size_t j = 0; j < n && p[0] != '\0'; j++)
      if (j != i && strcmp(str(ns[j].sp, "spanId"), p) == 0) {
        ns[i].parent = (int)j;
        break;
      }
  }
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  if (f == NULL) {
    free(ns);
    return NULL;
  }
  unsigned long long last = 0;
  for (i = 0; i < n; i++)
    if (nanos(ns[i].sp, "endTimeUnixNano") > last) last = nanos(ns[i].sp, "endTimeUnixNano");
  fprintf(f, "trace %s: %zu spans, %.1f ms\n", trace, n,
          last > ns[0].start ? (double)(last - ns[0].start) / 1e6 : 0.0);
  for (i = 0; i < n; i++)
    if (!ns[i].drawn && ns[i].parent < 0) draw(f, ns, n, i, 0, ns[0].start);
  /* Spans in a parent cycle (only a broken or hostile exporter makes one): drawn too. */
  for (i = 0; i < n; i++)
    if (!ns[i].drawn) {
      fputs("(in a parent cycle)\n", f);
      draw(f, ns, n, i, 1, ns[0].start);
    }
  free(ns);
  if (fclose(f) != 0) {
    free(text);
    return NULL;
  }
  return text;
}

/* Text of GET /traces: one line per trace, newest first: id, spans, services, the root. */
static char *trace_list(const json_t *all) {
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  if (f == NULL) return NULL;
  json_t *seen = json_object();
  size_t i = json_array_size(all);
  while (seen != NULL && i-- > 0) {
    const json_t *sp = json_array_get(all, i);
    const char *t = str(sp, "traceId");
    if (json_object_get(seen, t) != NULL) continue;
    json_object_set_new(seen, t, json_true());
    size_t n = 0, j;
    json_t *q, *services = json_object();
    const json_t *root = NULL;
    json_array_foreach(all, j, q) {
      if (strcmp(str(q, "traceId"), t) != 0) continue;
      n++;
      json_object_set_new(services, str(q, "service"), json_true());
      if (str(q, "parentSpanId")[0] == '\0' && root == NULL) root = q;
    }
    fprintf(f, "%s  %zu spans  %zu services  ", t, n, json_object_size(services));
    put_safe(f, root != NULL ? str(root, "name") : "(root not received)", 200);
    fputc('\n', f);
    json_decref(services);
  }
  json_decref(seen);
  if (fclose(f) != 0) {
    free(text);
    return NULL;
  }
  return text;
}

/* ---- HTTP ----------------------------------------------------------------------------------- */

static enum MHD_Result answer(struct MHD_Connection *c, unsigned code, char *text,
                              const char *type) {
  struct MHD_Response *r =
      text != NULL ? MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE)
                   : MHD_create_response_from_buffer(2, (void *)"{}", MHD_RESPMEM_PERSISTENT);
  if (r == NULL) {
    free(text);
    return MHD_NO;
  }
  MHD_add_response_header(r, "Content-Type", type);
  enum MHD_Result ret = MHD_queue_response(c, code, r);
  MHD_destroy_response(r);
  return ret;
}

static enum MHD_Result text_answer(struct MHD_Connection *c, unsigned code, const char *msg) {
  return answer(c, code, strdup(msg), "text/plain; charset=utf-8");
}

static enum MHD_Result on_get(struct MHD_Connection *c, const char *path) {
  char *text = NULL;
  if (strcmp(path, "/traces") == 0) {
    pthread_mutex_lock(&mu);
    text = trace_list(spans);
    pthread_mutex_unlock(&mu);
    if (text == NULL) return text_answer(c, 500, "out of memory\n");
    return answer(c, 200, text, "text/plain; charset=utf-8");
  }
  if (strncmp(path, "/traces/", 8) != 0) return text_answer(c, 404, "no such page\n");
  const char *id = path + 8;
  json_t *idj = json_string(id);
  int valid = hex_of(idj, 32);
  json_decref(idj);
  if (!valid) return text_answer(c, 400, "a trace id is 32 lowercase hex digits\n");
  pthread_mutex_lock(&mu);
  text = trace_sink_tree(spans, id);
  pthread_mutex_unlock(&mu);
  if (text == NULL) return text_answer(c, 404, "no span of that trace received\n");
  return answer(c, 200, text, "text/plain; charset=utf-8");
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *path,
                                  const char *method, const char *version, const char *data,
                                  size_t *data_size, void **ctx) {
  (void)cls, (void)version;
  body *b = *ctx;
  if (b == NULL) {
    b = calloc(1, sizeof *b);
    if (b == NULL) return MHD_NO;
    *ctx = b;
    return MHD_YES;
  }
  if (*data_size > 0) {
    if (b->too_big || b->len + *data_size > BODY_MAX) {
      b->too_big = 1;
    } else {
      char *p = realloc(b->p, b->len + *data_size);
      if (p == NULL) return MHD_NO;
      memcpy(p + b->len, data, *data_size);
      b->p = p;
      b->len += *data_size;
    }
    *data_size = 0;
    return MHD_YES;
  }
  if (strcmp(method, "GET") == 0) return on_get(c, path);
  if (strcmp(method, "POST") != 0 || strcmp(path, "/v1/traces") != 0)
    return answer(c, 404, NULL, "application/json");
  if (b->too_big) return answer(c, 413, NULL, "application/json");
  return answer(c, take(b->p, b->len) == 0 ? 200 : 400, NULL, "application/json");
}

static void on_done(void *cls, struct MHD_Connection *c, void **ctx,
                    enum MHD_RequestTerminationCode why) {
  (void)cls, (void)c, (void)why;
  body *b = *ctx;
  if (b != NULL) free(b->p);
  free(b);
  *ctx = NULL;
}

const char *trace_sink_start(const char *bind_addr, unsigned port, size_t max) {
  if (daemon_ != NULL || max == 0 || port > 65535) return NULL;
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  if (inet_pton(AF_INET, bind_addr != NULL ? bind_addr : "127.0.0.1", &a.sin_addr) != 1) {
    fprintf(stderr, "trace collector: bad IPv4 address '%s'\n", bind_addr);
    return NULL;
  }
  pthread_mutex_lock(&mu);
  spans = json_array();
  max_spans = max;
  posts = malformed = dropped = 0;
  pthread_mutex_unlock(&mu);
  if (spans == NULL) return NULL;
  daemon_ = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL,
                             on_request, NULL, MHD_OPTION_NOTIFY_COMPLETED, on_done, NULL,
                             MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&a,
                             MHD_OPTION_CONNECTION_LIMIT, 256u, MHD_OPTION_CONNECTION_TIMEOUT,
                             30u, MHD_OPTION_END);
  const union MHD_DaemonInfo *info =
      daemon_ != NULL ? MHD_get_daemon_info(daemon_, MHD_DAEMON_INFO_BIND_PORT) : NULL;
  if (info == NULL || info->port == 0) {
    fprintf(stderr, "trace collector: cannot listen on %s:%u: %s\n",
            bind_addr != NULL ? bind_addr : "127.0.0.1", port, strerror(errno));
    trace_sink_stop();
    return NULL;
  }
  snprintf(url, sizeof url, "http://%s:%u", bind_addr != NULL ? bind_addr : "127.0.0.1",
           (unsigned)info->port);
  return url;
}

void trace_sink_stop(void) {
  if (daemon_ != NULL) MHD_stop_daemon(daemon_);
  daemon_ = NULL;
  pthread_mutex_lock(&mu);
  json_decref(spans);
  spans = NULL;
  pthread_mutex_unlock(&mu);
}

const char *trace_sink_url(void) { return daemon_ != NULL ? url : NULL; }

json_t *trace_sink_lock(void) {
  pthread_mutex_lock(&mu);
  return spans;
}

void trace_sink_unlock(void) { pthread_mutex_unlock(&mu); }

int trace_sink_wait(const struct timespec *until) { return pthread_cond_timedwait(&cond, &mu, until); }

unsigned long trace_sink_posts(void) { return posts; }
unsigned long trace_sink_malformed(void) { return malformed; }
unsigned long trace_sink_dropped(void) { return dropped; }
