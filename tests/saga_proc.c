/*
 * A node in its own process, for the multi-process integration tests (test_multiproc_*).
 *
 *   saga_proc orch --db F --sagas N [--rate R] [transport options]
 *       orchestrates the 3-step "order" saga: starts sagas 0..N-1 (idempotency keys "s-<i>",
 *       so a restarted orchestrator starts none twice; saga i refuses at step i % 5 when
 *       i % 5 < 3), exits 0 once all N are COMPLETED or COMPENSATED. --rate R starts R
 *       sagas every 10 ms instead of all at once (a restarted orchestrator resumes near
 *       where it stopped), so that the tests' kills land while sagas are in flight.
 *   saga_proc part --db F --serve CH[,CH...] [transport options]
 *       serves the commands of the given channels ("inv", "ord", "pay"): each action and
 *       compensation inserts a row into fx(saga_id, step, kind); runs until killed.
 *
 * Transport options:
 *   --tcp LISTEN --route CH=ADDR [--route ...]
 *   --nats URL
 *   --redis HOST:PORT
 * Replicas of a participant run with the same --db (one SQLite file shared by processes on
 * one host, as replicas share their service's database) and, over a broker, share its
 * consumers.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include <sqlite3.h>

#include "saga.h"
#include "saga/transport_tcp.h"
#ifdef SAGA_HAVE_NATS
#include "saga/transport_nats.h"
#endif
#ifdef SAGA_HAVE_REDIS
#include "saga/transport_redis.h"
#endif

static int nsagas, finished, rate, next_saga;
static saga_node *node;

static int fx(saga_tx *tx, const saga_msg *m, const char *kind) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(saga_tx_db(tx), "INSERT INTO fx(saga_id, step, kind) VALUES(?1,?2,?3)",
                              -1, &st, NULL);
  if (rc == SQLITE_OK) {
    sqlite3_bind_text(st, 1, saga_msg_saga_id(m), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, 2, (int)saga_msg_step(m));
    sqlite3_bind_text(st, 3, kind, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    rc = rc == SQLITE_DONE ? SQLITE_OK : rc;
  }
  sqlite3_finalize(st);
  if (rc == SQLITE_BUSY) return SAGA_EBUSY;
  return rc == SQLITE_OK ? SAGA_OK : SAGA_EIO;
}

static int do_step(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  int64_t i = -1;
  saga_data_get_i64(saga_msg_data(m), "i", &i);
  if (i % 5 < 3 && (uint32_t)(i % 5) == saga_msg_step(m)) return saga_reply_fail(r, "planned refusal");
  return fx(tx, m, "do");
}

static int undo_step(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  return fx(tx, m, "undo");
}

static void on_event(saga_node *n, const saga_event *ev, void *arg) {
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED ||
      ev->type == SAGA_EV_SAGA_FAILED)
    finished++;
}

static void log_cb(void *arg, saga_log_level lvl, const char *msg) {
  if (lvl >= SAGA_LOG_WARN) fprintf(stderr, "[%s] %s\n", (const char *)arg, msg);
}

/* Counts terminal sagas in the orchestrator database; exits when all are done. */
static void check_done(uv_timer_t *h) {
  sqlite3_stmt *st = NULL;
  int done = 0, total = 0;
  if (sqlite3_prepare_v2(saga_node_db(node),
                         "SELECT count(*), sum(state IN (3,4,5)) FROM saga_instance", -1, &st,
                         NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW) {
    total = sqlite3_column_int(st, 0);
    done = sqlite3_column_int(st, 1);
  }
  sqlite3_finalize(st);
  if (total == nsagas && done == nsagas) {
    uv_timer_stop(h);
    uv_stop(h->loop);
  }
}

static void started(saga_node *n, int status, const char *id, int existed, void *arg) {
  if (status != SAGA_OK) fprintf(stderr, "start %ld failed: %s\n", (long)(intptr_t)arg, saga_strerror(status));
}

/* Starts sagas next_saga .. next_saga + count - 1 (at most up to nsagas). */
static int start_some(int count) {
  for (; count > 0 && next_saga < nsagas; count--, next_saga++) {
    saga_data *d = NULL;
    saga_data_new(&d, NULL);
    saga_data_set_i64(d, "i", next_saga);
    char key[32];
    snprintf(key, sizeof key, "s-%d", next_saga);
    int rc = saga_start(node, "order", d, key, started, (void *)(intptr_t)next_saga);
    saga_data_free(d);
    if (rc != SAGA_OK) {
      fprintf(stderr, "start: %s\n", saga_node_errmsg(node));
      return rc;
    }
  }
  return SAGA_OK;
}

static void pace(uv_timer_t *h) {
  if (start_some(rate) != SAGA_OK) exit(1);
  if (next_saga >= nsagas) uv_timer_stop(h);
}

/* Sagas are started in order, so those already in the database are (nearly) a prefix: a
 * restarted orchestrator resumes a little before the count (their keys make it harmless). */
static int existing_sagas(void) {
  sqlite3_stmt *st = NULL;
  int count = 0;
  if (sqlite3_prepare_v2(saga_node_db(node), "SELECT count(*) FROM saga_instance", -1, &st,
                         NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    count = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  return count;
}

static int usage(void) {
  fprintf(stderr, "usage: saga_proc orch|part --db F [--sagas N] [--rate R] [--serve CH,..] "
                  "(--tcp LISTEN --route CH=ADDR.. | --nats URL | --redis HOST:PORT)\n");
  return 2;
}

int main(int argc, char **argv) {
  if (argc < 2) return usage();
  signal(SIGPIPE, SIG_IGN);
  int orch = strcmp(argv[1], "orch") == 0;
  const char *db = NULL, *serve = "", *tcp_listen = NULL, *nats_url = NULL, *redis = NULL;
  saga_tcp_route routes[16];
  size_t nroutes = 0;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--db") == 0) db = argv[i + 1];
    else if (strcmp(argv[i], "--sagas") == 0) nsagas = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--rate") == 0) rate = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--serve") == 0) serve = argv[i + 1];
    else if (strcmp(argv[i], "--tcp") == 0) tcp_listen = argv[i + 1];
    else if (strcmp(argv[i], "--nats") == 0) nats_url = argv[i + 1];
    else if (strcmp(argv[i], "--redis") == 0) redis = argv[i + 1];
    else if (strcmp(argv[i], "--route") == 0 && nroutes < 16) {
      char *eq = strchr(argv[i + 1], '=');
      if (eq == NULL) return usage();
      *eq = '\0';
      routes[nroutes].channel = argv[i + 1];
      routes[nroutes].address = eq + 1;
      routes[nroutes].identity = NULL;
      nroutes++;
    } else return usage();
  }
  if (db == NULL) return usage();
  saga_transport *t = NULL;
  int rc = SAGA_EINVAL;
  if (tcp_listen != NULL) {
    saga_tcp_config c;
    saga_tcp_config_init(&c);
    c.insecure_plaintext = 1; /* loopback only */
    c.listen = tcp_listen;
    c.routes = routes;
    c.nroutes = nroutes;
    c.reconnect_min_ms = 20;
    c.reconnect_max_ms = 500;
    rc = saga_tcp_transport_new(&t, &c);
  }
#ifdef SAGA_HAVE_NATS
  if (nats_url != NULL) {
    saga_nats_config c;
    saga_nats_config_init(&c);
    c.url = nats_url;
    c.ack_wait_ms = 2000;
    rc = saga_nats_transport_new(&t, &c);
  }
#endif
#ifdef SAGA_HAVE_REDIS
  if (redis != NULL) {
    saga_redis_config c;
    saga_redis_config_init(&c);
    char host[64];
    snprintf(host, sizeof host, "%s", redis);
    char *colon = strrchr(host, ':');
    if (colon == NULL) return usage();
    *colon = '\0';
    c.host = host;
    c.port = atoi(colon + 1);
    c.claim_idle_ms = 2000;
    rc = saga_redis_transport_new(&t, &c);
  }
#endif
  (void)nats_url;
  (void)redis;
  if (rc != SAGA_OK) {
    fprintf(stderr, "transport: %s\n", saga_strerror(rc));
    return 1;
  }
  uv_loop_t *loop = uv_default_loop();
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = orch ? "orch" : "part";
  cfg.db_path = db;
  cfg.transport = t;
  cfg.synchronous = SAGA_SYNC_NORMAL;
  cfg.resend_ms = 500;
  cfg.on_event = on_event;
  cfg.log = log_cb;
  cfg.log_arg = argv[1];
  char err[256];
  rc = saga_node_open(&node, loop, &cfg, err, sizeof err);
  if (rc != SAGA_OK) {
    fprintf(stderr, "open: %s\n", err);
    return 1;
  }
  if (orch) {
    static const saga_step steps[] = {
        {.name = "RESERVE", .channel = "inv", .action = "inv.reserve",
         .compensation = "inv.release", .timeout_ms = 20000,
         .retry = {.max_attempts = 5, .backoff_ms = 100}},
        {.name = "ORDER", .channel = "ord", .action = "ord.create", .compensation = "ord.delete",
         .timeout_ms = 20000, .retry = {.max_attempts = 5, .backoff_ms = 100}},
        {.name = "PAY", .channel = "pay", .action = "pay.charge", .kind = SAGA_STEP_PIVOT,
         .timeout_ms = 20000, .retry = {.max_attempts = 5, .backoff_ms = 100}},
    };
    static const saga_definition def = {SAGA_DEFINITION_VERSION, "order", 1, steps, 3, 0, sizeof(saga_step)};
    rc = saga_node_register(node, &def);
  } else {
    char *list = strdup(serve);
    for (char *ch = strtok(list, ","); rc == SAGA_OK && ch != NULL; ch = strtok(NULL, ",")) {
      char a[32], c[32];
      const char *verb_do = strcmp(ch, "inv") == 0 ? "reserve" : strcmp(ch, "ord") == 0 ? "create" : "charge";
      const char *verb_undo = strcmp(ch, "inv") == 0 ? "release" : "delete";
      snprintf(a, sizeof a, "%s.%s", ch, verb_do);
      snprintf(c, sizeof c, "%s.%s", ch, verb_undo);
      rc = saga_node_handle(node, ch, a, do_step, NULL);
      if (rc == SAGA_OK && strcmp(ch, "pay") != 0) rc = saga_node_handle(node, ch, c, undo_step, NULL);
    }
    free(list);
    sqlite3_exec(saga_node_db(node), "CREATE TABLE IF NOT EXISTS fx(saga_id TEXT, step INT, kind TEXT)",
                 NULL, NULL, NULL);
  }
  if (rc == SAGA_OK) rc = saga_node_start(node, NULL) < 0 ? -1 : SAGA_OK;
  if (rc != SAGA_OK) {
    fprintf(stderr, "setup: %s\n", saga_node_errmsg(node));
    return 1;
  }
  uv_timer_t timer, pacer;
  if (orch) {
    if (rate <= 0) {
      if (start_some(nsagas) != SAGA_OK) return 1;
    } else {
      next_saga = existing_sagas() - 4 * rate;
      if (next_saga < 0) next_saga = 0;
      uv_timer_init(loop, &pacer);
      uv_timer_start(&pacer, pace, 0, 10);
    }
    uv_timer_init(loop, &timer);
    uv_timer_start(&timer, check_done, 100, 100);
  }
  uv_run(loop, UV_RUN_DEFAULT);
  printf("orch: %d sagas finished\n", nsagas);
  return 0;
}
