/*
 * The shop's process. Embedded (the default): every service on one loop over the in-memory
 * transport, SQLite files in --data, the whole API on one port. Distributed: --service NAME
 * runs one service as its own process over TCP (--tcp-* options) or NATS (--nats URL).
 *
 *   shop [--data DIR] [--port N] [--secret S] [--payment-limit N]
 *
 * Prints "listening on PORT" once it serves, and stops on SIGINT/SIGTERM.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "shop.h"

static const char *const node_names[] = {"product", "order", "payment", "orchestrator",
                                         "purchase"};
enum { N_NODES = 5 };

typedef struct app {
  uv_loop_t *loop;
  shop_ctx ctx;
  saga_mem_hub *hub;
  saga_node *nodes[N_NODES];
  uv_signal_t sigint, sigterm;
  int closing, closed;
  char product_db[512];
} app;

static void log_cb(void *arg, saga_log_level lvl, const char *msg) {
  if (lvl >= SAGA_LOG_WARN) fprintf(stderr, "[%s] %s\n", (const char *)arg, msg);
}

static void node_closed(void *arg) {
  app *a = arg;
  if (++a->closed == N_NODES) {
    saga_mem_hub_close(a->hub);
    uv_close((uv_handle_t *)&a->sigint, NULL);
    uv_close((uv_handle_t *)&a->sigterm, NULL);
  }
}

static void stop(uv_signal_t *s, int signum) {
  app *a = s->data;
  if (a->closing++) return;
  shop_http_stop(a->ctx.http);
  shop_services_close(&a->ctx);
  for (int i = 0; i < N_NODES; i++) saga_node_close(a->nodes[i], node_closed, a);
}

static int open_node(app *a, int i) {
  saga_transport *t = NULL;
  int rc = saga_mem_transport_new(&t, a->hub);
  if (rc != SAGA_OK) return rc;
  char path[512], err[256];
  snprintf(path, sizeof path, "%s/%s.db", a->ctx.data_dir, node_names[i]);
  if (i == 0) snprintf(a->product_db, sizeof a->product_db, "%s", path);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = node_names[i];
  cfg.db_path = path;
  cfg.transport = t;
  cfg.log = log_cb;
  cfg.log_arg = (void *)node_names[i];
  if (strcmp(node_names[i], "orchestrator") == 0) cfg.event_channel = SHOP_EVENTS;
  rc = saga_node_open(&a->nodes[i], a->loop, &cfg, err, sizeof err);
  if (rc != SAGA_OK) fprintf(stderr, "%s: %s\n", node_names[i], err);
  return rc;
}

int main(int argc, char **argv) {
  app a;
  memset(&a, 0, sizeof a);
  a.loop = uv_default_loop();
  a.ctx.loop = a.loop;
  a.ctx.data_dir = "shop-data";
  a.ctx.jwt_secret = getenv("SHOP_JWT_SECRET") ? getenv("SHOP_JWT_SECRET")
                                                : "change-me-shop-demo-secret-32bytes!";
  a.ctx.payment_limit = 100000;
  int port = 8080;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--data") == 0 && i + 1 < argc) a.ctx.data_dir = argv[++i];
    else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) port = atoi(argv[++i]);
    else if (strcmp(argv[i], "--secret") == 0 && i + 1 < argc) a.ctx.jwt_secret = argv[++i];
    else if (strcmp(argv[i], "--payment-limit") == 0 && i + 1 < argc)
      a.ctx.payment_limit = atoll(argv[++i]);
    else {
      fprintf(stderr, "usage: shop [--data DIR] [--port N] [--secret S] [--payment-limit N]\n");
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  mkdir(a.ctx.data_dir, 0755);
  if (saga_mem_hub_new(&a.hub, a.loop, NULL, NULL, NULL) != SAGA_OK) return 1;
  for (int i = 0; i < N_NODES; i++)
    if (open_node(&a, i) != SAGA_OK) return 1;
  a.ctx.product_db = a.product_db;
  if (shop_http_start(&a.ctx.http, a.loop, "127.0.0.1", port) != 0) {
    fprintf(stderr, "cannot listen on port %d\n", port);
    return 1;
  }
  if (shop_account_init(&a.ctx) != 0 || shop_product_init(&a.ctx, a.nodes[0]) != 0 ||
      shop_order_init(&a.ctx, a.nodes[1]) != 0 || shop_payment_init(&a.ctx, a.nodes[2]) != 0 ||
      shop_orchestrator_init(&a.ctx, a.nodes[3]) != 0 ||
      shop_purchase_init(&a.ctx, a.nodes[4]) != 0) {
    fprintf(stderr, "service setup failed\n");
    return 1;
  }
  for (int i = 0; i < N_NODES; i++) {
    if (saga_node_start(a.nodes[i]) < 0) {
      fprintf(stderr, "%s: %s\n", node_names[i], saga_node_errmsg(a.nodes[i]));
      return 1;
    }
  }
  uv_signal_init(a.loop, &a.sigint);
  uv_signal_init(a.loop, &a.sigterm);
  a.sigint.data = a.sigterm.data = &a;
  uv_signal_start(&a.sigint, stop, SIGINT);
  uv_signal_start(&a.sigterm, stop, SIGTERM);
  printf("listening on %d\n", shop_http_port(a.ctx.http));
  fflush(stdout);
  uv_run(a.loop, UV_RUN_DEFAULT);
  return 0;
}
