/*
 * GET /healthz and GET /metrics, the same for every process of the shop: the embedded process
 * (every node, one block per node, told apart by the "node" label) and each distributed
 * service (its one node; account has none).
 *
 * /metrics is Prometheus text (format 0.0.4). Per node, what libsaga writes
 * (saga_nodes_metrics, docs/operating.md): libsaga_sagas{node,state} and
 * libsaga_sagas_by_definition{node,definition,state}, the libsaga_step_latency_ms{node}
 * histogram, libsaga_outbox_depth{node} and per channel its depth and oldest age,
 * libsaga_transport_connected{node}, and the node's counters (transactions, outbox rows sent,
 * deliveries, duplicates, stale replies, ...).
 * Per process: shop_up{service} 1 and shop_http_responses_total{service,code}. Then what the
 * services add (shop_metrics_add: the purchase service's request and stream counters).
 *
 * /healthz answers 200 {"status":"ok","service":...,"nodes":{name:{"open":true,
 * "outbox_depth":N,"transport":"connected"}}} while the process serves, every node's database
 * answers and every node's transport is connected (saga_node_transport_connected); 503 with
 * "status":"error" when a node's database cannot be read or its transport is "not connected"
 * (a broker not reachable yet: the service runs, its messages wait in its outbox). A growing
 * outbox_depth is the sign of a peer that does not confirm.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shop.h"

#define MAX_NODES 8
#define MAX_EXTRA 4

struct shop_metrics {
  shop_ctx *c;
  struct {
    char name[32];
    saga_node *node;
  } nodes[MAX_NODES];
  int nnodes;
  struct {
    shop_metrics_fn fn;
    void *arg;
  } extra[MAX_EXTRA];
  int nextra;
};

/* ---- text ---------------------------------------------------------------------------------- */

void shop_text_printf(shop_text *b, const char *fmt, ...) {
  if (b->oom) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
      b->oom = 1;
      return;
    }
    if (b->p != NULL && b->len + (size_t)n < b->cap) {
      b->len += (size_t)n;
      return;
    }
    size_t cap = b->cap ? b->cap * 2 : 4096;
    while (cap < b->len + (size_t)n + 1) cap *= 2;
    char *q = realloc(b->p, cap);
    if (q == NULL) {
      b->oom = 1;
      return;
    }
    b->p = q;
    b->cap = cap;
  }
}

static void head(shop_text *b, const char *name, const char *type, const char *help) {
  shop_text_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void shop_text_metric(shop_text *b, const char *name, const char *type, const char *help,
                      const char *labels, uint64_t v) {
  head(b, name, type, help);
  shop_text_printf(b, "%s%s %" PRIu64 "\n", name, labels, v);
}

/* ---- /metrics ------------------------------------------------------------------------------ */

/* The libsaga_* block of every node, written by the library (saga_nodes_metrics: each
 * metric's HELP and TYPE once, then its series of every node). */
static void write_nodes(shop_metrics *m, shop_text *b) {
  if (m->nnodes == 0) return;
  saga_node *nodes[MAX_NODES];
  for (int i = 0; i < m->nnodes; i++) nodes[i] = m->nodes[i].node;
  char *text = NULL;
  int rc = saga_nodes_metrics(nodes, (size_t)m->nnodes, &text, NULL);
  if (rc != SAGA_OK) {
    if (rc == SAGA_ENOMEM) b->oom = 1;
    return;
  }
  shop_text_printf(b, "%s", text);
  saga_free(NULL, text); /* the nodes use libc's allocator */
}

static void get_metrics(shop_req *r, void *arg) {
  shop_metrics *m = arg;
  shop_text b = {0};
  char labels[64];
  snprintf(labels, sizeof labels, "{service=\"%s\"}", m->c->service);
  shop_text_metric(&b, "shop_up", "gauge", "1 while the process serves.", labels, 1);
  head(&b, "shop_http_responses_total", "counter", "HTTP answers of this process by status.");
  for (int code = 100; code < 100 + SHOP_HTTP_CODES; code++) {
    uint64_t n = shop_http_answered(m->c->http, code);
    if (n > 0)
      shop_text_printf(&b, "shop_http_responses_total{service=\"%s\",code=\"%d\"} %" PRIu64 "\n",
                       m->c->service, code, n);
  }
  write_nodes(m, &b);
  for (int i = 0; i < m->nextra; i++) m->extra[i].fn(&b, m->extra[i].arg);
  if (b.oom) {
    free(b.p);
    shop_reply_error(r, 500, "out of memory");
    return;
  }
  shop_reply_text(r, 200, "text/plain; version=0.0.4; charset=utf-8", b.p ? b.p : "");
  free(b.p);
}

/* ---- /healthz ------------------------------------------------------------------------------ */

static void get_healthz(shop_req *r, void *arg) {
  shop_metrics *m = arg;
  json_t *nodes = json_object();
  int ok = 1;
  for (int i = 0; i < m->nnodes; i++) {
    int64_t depth = saga_node_outbox_depth(m->nodes[i].node);
    int connected = saga_node_transport_connected(m->nodes[i].node) == 1;
    json_t *n =
        depth >= 0 ? json_pack("{s:b,s:I,s:s}", "open", 1, "outbox_depth", (json_int_t)depth,
                               "transport", connected ? "connected" : "not connected")
                   : json_pack("{s:b,s:s}", "open", 1, "error", saga_node_errmsg(m->nodes[i].node));
    /* A node whose broker is not reachable yet (or again) is not healthy: its messages wait
     * in its outbox until it is. */
    if (depth < 0 || !connected) ok = 0;
    json_object_set_new(nodes, m->nodes[i].name, n);
  }
  shop_reply_json(r, ok ? 200 : 503,
                  json_pack("{s:s,s:s,s:o}", "status", ok ? "ok" : "error", "service",
                            m->c->service, "nodes", nodes));
}

/* ---- setup --------------------------------------------------------------------------------- */

int shop_metrics_init(shop_ctx *c) {
  if (c->metrics != NULL) return -1;
  shop_metrics *m = calloc(1, sizeof *m);
  if (m == NULL) return -1;
  m->c = c;
  if (c->service == NULL) c->service = "shop";
  if (shop_http_route(c->http, "GET", "/healthz", get_healthz, m) != 0 ||
      shop_http_route(c->http, "GET", "/metrics", get_metrics, m) != 0) {
    free(m);
    return -1;
  }
  c->metrics = m;
  return 0;
}

int shop_metrics_add_node(shop_ctx *c, const char *name, saga_node *node) {
  shop_metrics *m = c->metrics;
  if (m == NULL || m->nnodes == MAX_NODES || strlen(name) >= sizeof m->nodes[0].name) return -1;
  snprintf(m->nodes[m->nnodes].name, sizeof m->nodes[0].name, "%s", name);
  m->nodes[m->nnodes++].node = node;
  return 0;
}

int shop_metrics_add(shop_ctx *c, shop_metrics_fn fn, void *arg) {
  shop_metrics *m = c->metrics;
  if (m == NULL || m->nextra == MAX_EXTRA) return -1;
  m->extra[m->nextra].fn = fn;
  m->extra[m->nextra++].arg = arg;
  return 0;
}

void shop_metrics_close(shop_ctx *c) {
  free(c->metrics);
  c->metrics = NULL;
}
