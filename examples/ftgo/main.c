/*
 * ftgo: the FTGO Create Order saga over TCP, four processes (README.md).
 *
 *   ftgo demo [DIR]                                 runs everything and checks each outcome
 *   ftgo consumer|kitchen|accounting DB LISTEN ORDER  one participant service
 *
 * The demo runs the Order service (the orchestrator) in its own process and starts the
 * three participants as child processes of the same program, each with its own database in
 * DIR (a new temporary folder when not given; kept, so it can be inspected with sagactl and
 * sqlite3 afterwards). It exits 0 when every outcome was as expected, 1 otherwise.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <saga/transport_tcp.h>

#include "ftgo.h"

/* ---- a participant service ---------------------------------------------------------------- */

static saga_node *g_node;
static uv_signal_t g_sigterm, g_sigint;

static void on_signal(uv_signal_t *s, int signum) {
  (void)s;
  (void)signum;
  uv_close((uv_handle_t *)&g_sigterm, NULL);
  uv_close((uv_handle_t *)&g_sigint, NULL);
  saga_node_close(g_node, NULL, NULL);
}

static int participant_main(const char *service, const char *db, const char *listen,
                            const char *order) {
  prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the demo that started it */
  uv_loop_t *loop = uv_default_loop();
  saga_tcp_route routes[] = {{"order", order, NULL}};
  saga_tcp_config tc;
  saga_tcp_config_init(&tc);
  tc.listen = listen;
  tc.routes = routes;
  tc.nroutes = 1;
  tc.insecure_plaintext = 1; /* loopback only: docs/security.md for TLS */
  saga_transport *t = NULL;
  if (saga_tcp_transport_new(&t, &tc) != SAGA_OK) return 1;
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = service;
  cfg.db_path = db;
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.transport = t;
  char err[256];
  if (saga_node_open(&g_node, loop, &cfg, err, sizeof err) != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", service, err);
    return 1;
  }
  if (ftgo_schema(saga_node_db(g_node), service) != 0 ||
      ftgo_participant_register(g_node, service) != 0 || saga_node_start(g_node, NULL) != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", service, saga_node_errmsg(g_node));
    return 1;
  }
  uv_signal_init(loop, &g_sigterm);
  uv_signal_start(&g_sigterm, on_signal, SIGTERM);
  uv_signal_init(loop, &g_sigint);
  uv_signal_start(&g_sigint, on_signal, SIGINT);
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}

/* ---- the demo ------------------------------------------------------------------------------ */

typedef struct child {
  uv_process_t proc;
  int running;
} child;

static int failures;
static char g_dir[512];
static char g_addr[4][32]; /* order, consumer, kitchen, accounting */
static const char *const g_names[4] = {"order", "consumer", "kitchen", "accounting"};

static void on_child_exit(uv_process_t *p, int64_t status, int sig) {
  child *c = p->data;
  c->running = 0;
  if (status != 0 || (sig != 0 && sig != SIGTERM)) {
    failures++; /* a service must stop cleanly (under a sanitizer: without a report) */
    fprintf(stderr, "ftgo: a service exited with status %lld, signal %d\n", (long long)status, sig);
  }
  uv_close((uv_handle_t *)p, NULL);
}

static char *db_path(const char *service) {
  static char paths[4][600];
  for (int i = 0; i < 4; i++)
    if (strcmp(g_names[i], service) == 0) {
      snprintf(paths[i], sizeof paths[i], "%s/%s.db", g_dir, service);
      return paths[i];
    }
  return NULL;
}

static int spawn(uv_loop_t *loop, child *c, int which) {
  char exe[1024];
  size_t len = sizeof exe;
  if (uv_exepath(exe, &len) != 0) return -1;
  char *args[] = {exe, (char *)g_names[which], db_path(g_names[which]), g_addr[which], g_addr[0],
                  NULL};
  uv_stdio_container_t stdio[3] = {{.flags = UV_IGNORE},
                                   {.flags = UV_INHERIT_FD, .data.fd = 2},
                                   {.flags = UV_INHERIT_FD, .data.fd = 2}};
  uv_process_options_t po;
  memset(&po, 0, sizeof po);
  po.file = exe;
  po.args = args;
  po.exit_cb = on_child_exit;
  po.stdio = stdio;
  po.stdio_count = 3;
  c->proc.data = c;
  if (uv_spawn(loop, &c->proc, &po) != 0) return -1;
  c->running = 1;
  printf("started %s (pid %d) on %s, database %s\n", g_names[which], c->proc.pid, g_addr[which],
         db_path(g_names[which]));
  return 0;
}

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  int port = -1;
  if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
      getsockname(fd, (struct sockaddr *)&a, &len) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0) close(fd);
  return port;
}

static void expect(const char *what, const char *got, const char *want) {
  int ok = strcmp(got, want) == 0;
  if (!ok) failures++;
  printf("  %s %-44s %s%s%s\n", ok ? "ok  " : "FAIL", what, got[0] ? got : "(none)",
         ok ? "" : ", expected ", ok ? "" : (want[0] ? want : "(none)"));
}

static void expect_has(const char *what, const char *got, const char *needle) {
  int ok = strstr(got, needle) != NULL;
  if (!ok) failures++;
  printf("  %s %-44s %s\n", ok ? "ok  " : "FAIL", what, got);
}

/* A business row's state, read on a connection of our own. */
static const char *row(const char *service, const char *sql, const char *id) {
  static char buf[4][64];
  static int k;
  char *out = buf[k++ % 4];
  if (ftgo_read(db_path(service), sql, id, out, 64) != 0) snprintf(out, 64, "(error)");
  return out;
}
#define ORDER(id) row("order", "SELECT state FROM ftgo_order WHERE id = ?1", id)
#define TICKET(id) row("kitchen", "SELECT state FROM ftgo_ticket WHERE order_id = ?1", id)
#define AUTH(id) row("accounting", "SELECT state FROM ftgo_authorization WHERE order_id = ?1", id)

/* Who holds (type, id) in a service's database, "" when free: saga_lock_holder() on a
 * connection of our own, as any application may. */
static const char *holder(const char *service, const char *type, const char *id) {
  static char buf[2][SAGA_LOCK_HOLDER_SIZE];
  static int k;
  char *out = buf[k++ % 2];
  sqlite3 *db = NULL;
  out[0] = '\0';
  if (sqlite3_open_v2(db_path(service), &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK) {
    sqlite3_busy_timeout(db, 5000);
    int rc = saga_lock_holder(db, type, id, out, SAGA_LOCK_HOLDER_SIZE);
    if (rc != SAGA_OK && rc != SAGA_ENOTFOUND) snprintf(out, SAGA_LOCK_HOLDER_SIZE, "(error)");
  }
  sqlite3_close(db);
  return out;
}

static const char *saga_reason(ftgo_order_svc *s, const char *id) {
  static char buf[600];
  saga_info *info = NULL;
  buf[0] = '\0';
  if (saga_get(s->node, id, &info) == SAGA_OK) {
    snprintf(buf, sizeof buf, "%s", info->error);
    saga_info_free(info);
  }
  return buf;
}

static const char *state_name(int st) { return st < 0 ? "(timed out)" : saga_state_name(st); }

/* Creates an order that is refused at one of the three points: order REJECTED, locks free. */
static void rejected(ftgo_order_svc *s, const char *title, const ftgo_order_req *r,
                     const char *ticket_state, const char *reason) {
  char id[40];
  printf("\n%s\n", title);
  if (ftgo_create_order(s, r, id) != 0) {
    failures++;
    printf("  FAIL cannot start the saga\n");
    return;
  }
  expect("create_order saga", state_name(ftgo_wait(s, id, 30000)), "COMPENSATED");
  expect_has("its reason", saga_reason(s, id), reason);
  expect("order", ORDER(r->order), "REJECTED");
  expect("ticket", TICKET(r->order), ticket_state);
  expect("card authorization", AUTH(r->order), "");
  expect("order lock", holder("order", "order", r->order), "");
  expect("ticket lock", holder("kitchen", "ticket", r->order), "");
}

static int demo_main(const char *dir_arg) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (dir_arg != NULL) {
    snprintf(g_dir, sizeof g_dir, "%s", dir_arg);
    mkdir(g_dir, 0700);
  } else {
    snprintf(g_dir, sizeof g_dir, "%s/ftgo.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (mkdtemp(g_dir) == NULL) {
      perror("ftgo: mkdtemp");
      return 1;
    }
  }
  for (int i = 0; i < 4; i++) {
    int port = free_port();
    if (port < 0) return 1;
    snprintf(g_addr[i], sizeof g_addr[i], "127.0.0.1:%d", port);
  }
  uv_loop_t *loop = uv_default_loop();
  child kids[4];
  memset(kids, 0, sizeof kids);
  /* Accounting starts later: the first order waits at its pivot meanwhile. */
  if (spawn(loop, &kids[1], 1) != 0 || spawn(loop, &kids[2], 2) != 0) return 1;
  ftgo_order_svc s;
  char err[256];
  if (ftgo_order_open(&s, loop, db_path("order"), g_addr[0], g_addr[1], g_addr[2], g_addr[3], err,
                      sizeof err) != 0) {
    fprintf(stderr, "ftgo: %s\n", err);
    return 1;
  }
  printf("order service (the orchestrator) on %s, database %s\n", g_addr[0], db_path("order"));

  char o1[40], c1[40], c2[40], why[256];
  ftgo_order_req r1 = {"o1", "c1", "r1", "pizza", "4242-4242", 2, 2400};

  printf("\n1. Order o1 while Accounting is not running yet: the saga waits at its pivot\n");
  if (ftgo_create_order(&s, &r1, o1) != 0 || ftgo_wait_step(&s, o1, 3, 30000) != 0) {
    printf("  FAIL the saga did not reach AUTHORIZE_CARD\n");
    failures++;
  }
  printf("  saga %s waits for AUTHORIZE_CARD\n", o1);
  expect("order o1", ORDER("o1"), "APPROVAL_PENDING");
  expect("ticket o1", TICKET("o1"), "CREATE_PENDING");
  expect("order o1 held by", holder("order", "order", "o1"), o1);
  expect("ticket o1 held by", holder("kitchen", "ticket", "o1"), o1);
  printf("  reviseOrder(o1) while pending:\n");
  int rv = ftgo_revise_order(&s, "o1", 9, why, sizeof why);
  expect("  revise", rv == 0 ? "refused" : rv == 1 ? "revised" : "(error)", "refused");
  expect_has("  reason", rv == 0 ? why : "", "held by saga");
  printf("  cancelOrder(o1) while pending:\n");
  if (ftgo_cancel_order(&s, "o1", 1, c1) != 0) failures++;
  expect("  cancel_order saga", state_name(ftgo_wait(&s, c1, 30000)), "COMPENSATED");
  char held[160];
  snprintf(held, sizeof held, "order 'o1' is held by saga %s", o1);
  expect_has("  reason", saga_reason(&s, c1), held);
  expect("order o1", ORDER("o1"), "APPROVAL_PENDING");

  printf("\n2. Accounting starts: the card is authorized (the pivot), then the ticket is\n"
         "   confirmed and the order approved, releasing their locks\n");
  if (spawn(loop, &kids[3], 3) != 0) return 1;
  expect("create_order saga", state_name(ftgo_wait(&s, o1, 30000)), "COMPLETED");
  expect("order o1", ORDER("o1"), "APPROVED");
  expect("ticket o1", TICKET("o1"), "AWAITING_ACCEPTANCE");
  expect("card authorization o1", AUTH("o1"), "AUTHORIZED");
  expect("order o1 lock", holder("order", "order", "o1"), "");
  expect("ticket o1 lock", holder("kitchen", "ticket", "o1"), "");
  rv = ftgo_revise_order(&s, "o1", 3, why, sizeof why);
  expect("reviseOrder(o1, qty 3) once approved", rv == 1 ? "revised" : "refused", "revised");

  ftgo_order_req r2 = {"o2", "c2", "r1", "pizza", "4242-4242", 1, 1200};
  rejected(&s, "3. Order o2 of a disabled consumer: rejected at VERIFY_CONSUMER", &r2, "",
           "consumer is not allowed to order");
  ftgo_order_req r3 = {"o3", "c1", "r1", "sushi", "4242-4242", 1, 1800};
  rejected(&s, "4. Order o3 of an item not on the menu: rejected at CREATE_TICKET", &r3, "",
           "the restaurant does not serve this item");
  ftgo_order_req r4 = {"o4", "c1", "r1", "pasta", "4000-0002", 1, 1500};
  rejected(&s,
           "5. Order o4 with a declined card: rejected at AUTHORIZE_CARD (the pivot); the\n"
           "   ticket is rejected by its compensation",
           &r4, "REJECTED", "card declined by the issuer");

  printf("\n6. cancelOrder(o1) once approved\n");
  if (ftgo_cancel_order(&s, "o1", 2, c2) != 0) failures++;
  expect("cancel_order saga", state_name(ftgo_wait(&s, c2, 30000)), "COMPLETED");
  expect("order o1", ORDER("o1"), "CANCELLED");
  expect("ticket o1", TICKET("o1"), "CANCELLED");
  expect("card authorization o1", AUTH("o1"), "REVERSED");
  expect("order o1 lock", holder("order", "order", "o1"), "");

  ftgo_order_close(&s);
  for (int i = 1; i < 4; i++)
    if (kids[i].running) uv_process_kill(&kids[i].proc, SIGTERM);
  uv_run(loop, UV_RUN_DEFAULT);
  printf("\n%s: %d check(s) failed. The databases are in %s\n",
         failures ? "FAILED" : "all outcomes as expected", failures, g_dir);
  printf("  sagactl list %s/order.db; sagactl locks %s/kitchen.db\n", g_dir, g_dir);
  uv_loop_close(loop);
  return failures ? 1 : 0;
}

int main(int argc, char **argv) {
  if (argc >= 2 && strcmp(argv[1], "demo") == 0 && argc <= 3)
    return demo_main(argc == 3 ? argv[2] : NULL);
  if (argc == 5 && (strcmp(argv[1], "consumer") == 0 || strcmp(argv[1], "kitchen") == 0 ||
                    strcmp(argv[1], "accounting") == 0))
    return participant_main(argv[1], argv[2], argv[3], argv[4]);
  fprintf(stderr, "usage: ftgo demo [DIR]\n"
                  "       ftgo consumer|kitchen|accounting DB LISTEN ORDER_ADDRESS\n");
  return 2;
}
