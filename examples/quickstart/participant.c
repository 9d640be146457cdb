/*
 * Quickstart, participant: serves one channel ("inventory" or "payment") over TCP, with its
 * own database. Each command runs its handler in the node's transaction; a redelivered command
 * is answered from the inbox, not run twice. Runs until SIGTERM or SIGINT.
 *
 *   participant NAME LISTEN ORCHESTRATOR DB
 *   e.g. participant inventory 127.0.0.1:7101 127.0.0.1:7100 inventory.db
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <saga.h>
#include <saga/transport_tcp.h>
#include <uv.h>

static saga_node *node;
static uv_signal_t sigterm, sigint;

/* The action and its compensation. A real service writes its business rows with
 * saga_tx_db(tx) here: they commit with the reply, or not at all. */
static int act(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)tx;
  (void)r;
  printf("%s: %s for saga %s\n", (const char *)arg, saga_msg_command(m), saga_msg_saga_id(m));
  return SAGA_OK;
}

static void on_signal(uv_signal_t *s, int signum) {
  (void)s;
  (void)signum;
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_close((uv_handle_t *)&sigint, NULL);
  saga_node_close(node, NULL, NULL); /* the loop ends once the node has closed */
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: participant NAME LISTEN ORCHESTRATOR DB\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0); /* one line at a time, also into a file */
  const char *name = argv[1];
  uv_loop_t *loop = uv_default_loop();

  /* Replies go to the orchestrator's channel, "orders". Plaintext on loopback only: see
   * docs/security.md for TLS and access lists. */
  saga_tcp_route routes[] = {{"orders", argv[3], NULL}};
  saga_tcp_config tc;
  saga_tcp_config_init(&tc);
  tc.listen = argv[2];
  tc.routes = routes;
  tc.nroutes = 1;
  tc.insecure_plaintext = 1;
  saga_transport *t = NULL;
  if (saga_tcp_transport_new(&t, &tc) != SAGA_OK) return 1;

  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = name;
  cfg.db_path = argv[4];
  cfg.db_mode = SAGA_DB_CREATE; /* the first run creates it; later runs reopen it */
  cfg.transport = t;
  char err[256];
  if (saga_node_open(&node, loop, &cfg, err, sizeof err) != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", name, err);
    return 1;
  }
  char action[64], undo[64];
  snprintf(action, sizeof action, "%s.do", name);
  snprintf(undo, sizeof undo, "%s.undo", name);
  if (saga_node_handle(node, name, action, act, (void *)name) != SAGA_OK ||
      saga_node_handle(node, name, undo, act, (void *)name) != SAGA_OK ||
      saga_node_start(node, NULL) != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", name, saga_node_errmsg(node));
    return 1;
  }
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_init(loop, &sigint);
  uv_signal_start(&sigint, on_signal, SIGINT);
  printf("%s: serving on %s\n", name, argv[2]);
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}
