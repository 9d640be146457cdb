/*
 * GET /healthz and GET /metrics, the same for every process of the shop: the embedded process
 * (every node, one block per node, told apart by the "node" label) and each distributed
 * service (its one node; account has none).
 *
 * /metrics is Prometheus text (format 0.0.4). Per node:
 *  - libsaga_sagas{node,state}: sagas the node orchestrates, by state (a gauge read from its
 *    database with saga_node_count_by_state);
 *  - libsaga_step_latency_ms{node}: a histogram of the orchestrator's step latency, from the
 *    commit that sent a step's command to the processing of its reply (libsaga keeps
 *    per-bucket counts; Prometheus buckets are cumulative, so they are summed here);
 *  - libsaga_outbox_depth{node}: outbox rows not yet confirmed by the transport;
 *  - libsaga_outbox_oldest_seconds{node,channel}: the oldest unconfirmed row per channel;
 *  - libsaga_transport_connected{node}: 1 when messages can flow;
 *  - the node's counters (transactions, outbox rows sent, deliveries, duplicates, ...).
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

/* The node counters, by their offset in saga_node_stats. */
static const struct {
  const char *name, *help;
  size_t off;
} counters[] = {
    {"libsaga_transactions_total", "Group commits of the node.",
     offsetof(saga_node_stats, transactions)},
    {"libsaga_work_items_total", "Work items processed in them.",
     offsetof(saga_node_stats, work_items)},
    {"libsaga_commit_failures_total", "Transactions that failed to commit.",
     offsetof(saga_node_stats, commit_failures)},
    {"libsaga_outbox_sent_total", "Outbox rows published.", offsetof(saga_node_stats, sent)},
    {"libsaga_outbox_resent_total", "Outbox rows published again (unconfirmed in time).",
     offsetof(saga_node_stats, resent)},
    {"libsaga_outbox_acked_total", "Outbox rows confirmed by the transport.",
     offsetof(saga_node_stats, acked_out)},
    {"libsaga_delivered_total", "Messages delivered to the node.",
     offsetof(saga_node_stats, delivered)},
    {"libsaga_duplicates_total", "Duplicate messages answered from the inbox.",
     offsetof(saga_node_stats, duplicates)},
    {"libsaga_dead_letters_total", "Messages dead-lettered.",
     offsetof(saga_node_stats, dead_letters)},
    {"libsaga_handler_runs_total", "Participant handler runs.",
     offsetof(saga_node_stats, handler_runs)},
    {"libsaga_stale_replies_total", "Replies that matched no awaited step (late, duplicated).",
     offsetof(saga_node_stats, stale_replies)},
    {"libsaga_send_refusals_total", "Sends the transport refused for now (resent later).",
     offsetof(saga_node_stats, send_refusals)},
    {"libsaga_replies_parked_total", "Replies kept until their definition version is registered.",
     offsetof(saga_node_stats, replies_parked)},
    {"libsaga_compensations_expired_total",
     "Compensations answered 'record expired' (their saga ends FAILED).",
     offsetof(saga_node_stats, compensations_expired)},
    {"libsaga_handler_contract_errors_total", "Handlers that broke their contract.",
     offsetof(saga_node_stats, handler_contract_errors)},
};

typedef struct chan_ctx {
  shop_text *b;
  const char *node;
} chan_ctx;

static void write_channel(void *arg, const char *channel, int64_t count, uint64_t oldest_ms) {
  chan_ctx *c = arg;
  (void)count;
  /* Channel names are the application's own ([A-Za-z0-9._-]): no escaping needed. */
  shop_text_printf(c->b, "libsaga_outbox_oldest_seconds{node=\"%s\",channel=\"%s\"} %.3f\n",
                   c->node, channel, (double)oldest_ms / 1000.0);
}

static void write_nodes(shop_metrics *m, shop_text *b) {
  if (m->nnodes == 0) return;
  saga_node_stats st[MAX_NODES];
  int64_t states[MAX_NODES][6];
  int states_ok[MAX_NODES];
  int64_t depth[MAX_NODES];
  for (int i = 0; i < m->nnodes; i++) {
    saga_node_stats_get(m->nodes[i].node, &st[i], sizeof st[i]);
    states_ok[i] = saga_node_count_by_state(m->nodes[i].node, states[i]) == SAGA_OK;
    depth[i] = saga_node_outbox_depth(m->nodes[i].node);
  }

  head(b, "libsaga_sagas", "gauge", "Sagas this node orchestrates, by state.");
  for (int i = 0; i < m->nnodes; i++)
    for (int s = SAGA_RUNNING; states_ok[i] && s <= SAGA_FAILED; s++)
      shop_text_printf(b, "libsaga_sagas{node=\"%s\",state=\"%s\"} %" PRId64 "\n", m->nodes[i].name,
                       saga_state_name(s), states[i][s]);

  head(b, "libsaga_step_latency_ms", "histogram",
       "Orchestrator step latency: command sent (committed) to its reply processed, in ms.");
  for (int i = 0; i < m->nnodes; i++) {
    uint64_t cum = 0;
    for (int k = 0; k < SAGA_LATENCY_BUCKETS; k++) {
      cum += st[i].step_latency[k];
      uint32_t bound = saga_latency_bound_ms(k);
      if (bound == UINT32_MAX) continue; /* the last bucket is +Inf, written below */
      shop_text_printf(
          b, "libsaga_step_latency_ms_bucket{node=\"%s\",le=\"%" PRIu32 "\"} %" PRIu64 "\n",
          m->nodes[i].name, bound, cum);
    }
    shop_text_printf(b, "libsaga_step_latency_ms_bucket{node=\"%s\",le=\"+Inf\"} %" PRIu64 "\n",
                     m->nodes[i].name, st[i].step_latency_count);
    shop_text_printf(b, "libsaga_step_latency_ms_sum{node=\"%s\"} %" PRIu64 "\n", m->nodes[i].name,
                     st[i].step_latency_sum_ms);
    shop_text_printf(b, "libsaga_step_latency_ms_count{node=\"%s\"} %" PRIu64 "\n",
                     m->nodes[i].name, st[i].step_latency_count);
  }

  head(b, "libsaga_outbox_depth", "gauge", "Outbox rows not yet confirmed by the transport.");
  for (int i = 0; i < m->nnodes; i++)
    if (depth[i] >= 0)
      shop_text_printf(b, "libsaga_outbox_depth{node=\"%s\"} %" PRId64 "\n", m->nodes[i].name,
                       depth[i]);

  head(b, "libsaga_outbox_oldest_seconds", "gauge",
       "Age of the oldest unconfirmed outbox row, per channel (a channel nobody consumes grows).");
  for (int i = 0; i < m->nnodes; i++) {
    chan_ctx cc = {b, m->nodes[i].name};
    saga_node_outbox_channels(m->nodes[i].node, write_channel, &cc);
  }

  head(b, "libsaga_transport_connected", "gauge",
       "1 when the node's transport is connected (messages can flow), else 0.");
  for (int i = 0; i < m->nnodes; i++)
    shop_text_printf(b, "libsaga_transport_connected{node=\"%s\"} %d\n", m->nodes[i].name,
                     saga_node_transport_connected(m->nodes[i].node) == 1);

  for (size_t k = 0; k < sizeof counters / sizeof counters[0]; k++) {
    head(b, counters[k].name, "counter", counters[k].help);
    for (int i = 0; i < m->nnodes; i++) {
      uint64_t v;
      memcpy(&v, (const char *)&st[i] + counters[k].off, sizeof v);
      shop_text_printf(b, "%s{node=\"%s\"} %" PRIu64 "\n", counters[k].name, m->nodes[i].name, v);
    }
  }
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
