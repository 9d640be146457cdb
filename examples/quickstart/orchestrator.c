/*
 * Quickstart, orchestrator: runs N "purchase" sagas (reserve at inventory, then charge at
 * payment, the pivot) over TCP and waits for each to end, then exits: 0 when every saga
 * completed. Its database keeps the sagas: run it again and the same idempotency keys find the
 * same sagas (nothing runs twice), whether they finished or were interrupted by a crash.
 *
 *   orchestrator LISTEN INVENTORY PAYMENT DB N
 *   e.g. orchestrator 127.0.0.1:7100 127.0.0.1:7101 127.0.0.1:7102 orders.db 10
 */
#include <stdio.h>
#include <stdlib.h>

#include <saga.h>
#include <saga/transport_tcp.h>
#include <uv.h>

static const saga_step steps[] = {
    {.name = "RESERVE", .channel = "inventory", .action = "inventory.do",
     .compensation = "inventory.undo", .kind = SAGA_STEP_COMPENSATABLE},
    {.name = "CHARGE", .channel = "payment", .action = "payment.do", .kind = SAGA_STEP_PIVOT},
};
static const saga_definition purchase = {.struct_version = SAGA_DEFINITION_VERSION,
                                         .name = "purchase",
                                         .version = 1,
                                         .steps = steps,
                                         .nsteps = 2,
                                         .step_size = sizeof(saga_step)};

static saga_node *node;
static int want, ended, completed, failed_start;

static void finish(void) {
  if (ended + failed_start == want) saga_node_close(node, NULL, NULL);
}

/* Told once, after the commit, when the saga ended (or SAGA_ECLOSED if the node closed). */
static void done(saga_node *n, int status, const char *id, saga_state st, void *arg) {
  (void)n;
  (void)arg;
  if (status != SAGA_OK) return;
  printf("saga %s: %s\n", id, saga_state_name(st));
  ended++;
  if (st == SAGA_COMPLETED) completed++;
  finish();
}

static void started(saga_node *n, int status, const char *id, int existed, void *arg) {
  (void)arg;
  if (status != SAGA_OK || saga_node_watch(n, id, done, NULL) != SAGA_OK) {
    fprintf(stderr, "start: %s\n", saga_node_errmsg(n));
    failed_start++;
    finish();
    return;
  }
  if (existed) printf("saga %s: found again by its key\n", id);
}

static void on_timeout(uv_timer_t *t) {
  fprintf(stderr, "orchestrator: %d of %d sagas ended in time\n", ended, want);
  uv_close((uv_handle_t *)t, NULL);
  saga_node_close(node, NULL, NULL);
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: orchestrator LISTEN INVENTORY PAYMENT DB N\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  want = atoi(argv[5]);
  uv_loop_t *loop = uv_default_loop();
  saga_tcp_route routes[] = {{"inventory", argv[2], NULL}, {"payment", argv[3], NULL}};
  saga_tcp_config tc;
  saga_tcp_config_init(&tc);
  tc.listen = argv[1];
  tc.routes = routes;
  tc.nroutes = 2;
  tc.insecure_plaintext = 1; /* loopback only: docs/security.md for TLS */
  saga_transport *t = NULL;
  if (saga_tcp_transport_new(&t, &tc) != SAGA_OK) return 1;

  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = "orders"; /* replies come back on this channel */
  cfg.db_path = argv[4];
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.transport = t;
  char err[256];
  if (saga_node_open(&node, loop, &cfg, err, sizeof err) != SAGA_OK) {
    fprintf(stderr, "orchestrator: %s\n", err);
    return 1;
  }
  uint64_t missing = 0;
  if (saga_node_register(node, &purchase) != SAGA_OK ||
      saga_node_start(node, &missing) != SAGA_OK) { /* resumes sagas in flight */
    fprintf(stderr, "orchestrator: %s\n", saga_node_errmsg(node));
    return 1;
  }
  for (int i = 0; i < want; i++) {
    char key[32];
    snprintf(key, sizeof key, "order-%d", i); /* the same key finds the same saga */
    saga_data *d = NULL;
    saga_data_new(&d, NULL);
    saga_data_set_i64(d, "order", i);
    if (saga_start(node, "purchase", d, key, started, NULL) != SAGA_OK) failed_start++;
    saga_data_free(d);
  }
  uv_timer_t timer;
  uv_timer_init(loop, &timer);
  uv_timer_start(&timer, on_timeout, 30000, 0);
  uv_unref((uv_handle_t *)&timer);
  uv_run(loop, UV_RUN_DEFAULT);
  if (!uv_is_closing((uv_handle_t *)&timer)) uv_close((uv_handle_t *)&timer, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  printf("orchestrator: %d of %d sagas completed\n", completed, want);
  return completed == want && uv_loop_close(loop) == 0 ? 0 : 1;
}
