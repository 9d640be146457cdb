/*
 * End-to-end tests of the shop (docs/shop.md) over HTTP: the test starts the real
 * server (SHOP_BIN, or the SHOP_BIN environment variable) on a free port with a fresh data
 * folder, a known JWT secret and a payment limit, and drives every endpoint with the client of
 * client.h: the account (signup, login, refresh, info), tokens (missing, forged, expired,
 * "none" algorithm, refresh token as access token), products, request validation and sizes,
 * the three purchase outcomes with the exact statuses streamed over SSE, owner-only access,
 * idempotent purchases and 50 concurrent purchases against a stock of 10 (those tests are in
 * e2e.c, shared with test_cluster), then what is particular to the embedded process: /metrics
 * with one block per node, and a clean SIGTERM and restart on the same data.
 *
 * Nothing waits by sleeping: the tests wait on streamed events, or poll with a deadline. Each
 * test makes its own customers and products, so the tests share one server.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <sodium.h>

#include "e2e.h"

#ifndef SHOP_BIN
#error "SHOP_BIN must name the shop binary"
#endif

static struct {
  pid_t pid;
  char dir[256];
} srv;

/* ---- the server process --------------------------------------------------------------------- */

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st, (void)flag, (void)ftw;
  return remove(path);
}

/* Starts the server; on a new data folder when fresh, else on the one used before. */
static int server_start(int fresh) {
  const char *bin = getenv("SHOP_BIN") ? getenv("SHOP_BIN") : SHOP_BIN;
  if (fresh) {
    snprintf(srv.dir, sizeof srv.dir, "/tmp/shop-e2e-XXXXXX");
    if (mkdtemp(srv.dir) == NULL) return -1;
  }
  char data[300];
  snprintf(data, sizeof data, "%s/data", srv.dir);
  int fds[2];
  if (pipe(fds) != 0) return -1;
  fflush(stdout);
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    char limit[32];
    snprintf(limit, sizeof limit, "%d", PAYMENT_LIMIT);
    execl(bin, bin, "--data", data, "--port", "0", "--secret", SECRET, "--payment-limit", limit,
          (char *)NULL);
    fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
    _exit(127);
  }
  close(fds[1]);
  srv.pid = pid;
  /* The server prints "listening on PORT" once it serves. */
  char line[256];
  size_t n = 0;
  long long deadline = shop_now_ms() + 30000;
  int port = 0;
  while (port == 0) {
    long long left = deadline - shop_now_ms();
    if (left <= 0) break;
    struct pollfd p = {.fd = fds[0], .events = POLLIN};
    if (poll(&p, 1, (int)left) <= 0) continue;
    ssize_t k = read(fds[0], line + n, sizeof line - 1 - n);
    if (k <= 0) break;
    n += (size_t)k;
    line[n] = '\0';
    const char *l = strstr(line, "listening on ");
    if (l != NULL && strchr(l, '\n') != NULL) port = atoi(l + strlen("listening on "));
    if (n == sizeof line - 1) break;
  }
  close(fds[0]);
  if (port <= 0) {
    fprintf(stderr, "the shop (%s) did not print \"listening on PORT\" within 30 s\n", bin);
    return -1;
  }
  snprintf(e2e_url, sizeof e2e_url, "http://127.0.0.1:%d", port);
  printf("# shop %s listening at %s, data in %s\n", bin, e2e_url, data);
  return 0;
}

/* Sends sig and waits up to ms for the server to exit; returns its wait status, or -1. */
static int server_stop(int sig, int ms) {
  if (srv.pid <= 0) return -1;
  kill(srv.pid, sig);
  long long deadline = shop_now_ms() + ms;
  int status = -1;
  for (;;) {
    pid_t w = waitpid(srv.pid, &status, WNOHANG);
    if (w == srv.pid) break;
    if (w < 0 || shop_now_ms() > deadline) {
      kill(srv.pid, SIGKILL);
      waitpid(srv.pid, NULL, 0);
      status = -1;
      break;
    }
    struct timespec ts = {0, 10 * 1000000L}; /* polling the process with a deadline */
    nanosleep(&ts, NULL);
  }
  srv.pid = 0;
  return status;
}

static int group_setup(void **state) {
  (void)state;
  if (sodium_init() < 0 || shop_client_global_init() != 0) return -1;
  signal(SIGPIPE, SIG_IGN);
  return server_start(1);
}

static int group_teardown(void **state) {
  (void)state;
  if (srv.pid > 0) server_stop(SIGKILL, 5000);
  if (srv.dir[0]) nftw(srv.dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
  shop_client_global_cleanup();
  return 0;
}

/* The embedded process serves every node's metrics, told apart by the node label. */
static void test_metrics_embedded(void **state) {
  (void)state;
  shop_client *c = client(NULL);
  static const char *const nodes[] = {"product", "order", "payment", "orchestrator", "purchase"};
  for (int i = 0; i < 5; i++) e2e_check_metrics(c, "/metrics", "shop", nodes[i]);
  /* The purchases of the tests before ran: the orchestrator measured their steps. */
  int64_t n[6];
  e2e_sagas_by_state(c, "/metrics", "orchestrator", n);
  assert_true(n[3] > 0 && n[4] > 0);
  json_t *h = CALL(c, 200, "GET", "/healthz", NULL);
  assert_string_equal(json_string_value(json_object_get(h, "status")), "ok");
  assert_int_equal(json_object_size(json_object_get(h, "nodes")), 5);
  json_decref(h);
  shop_client_free(c);
}

/* Last: SIGTERM stops the server cleanly, promptly, with open streams; started again on the
 * same data folder it has kept everything. */
static void test_sigterm_restart(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  json_t *p = product_new(a.c, "Durable", 250, 4);
  stream s;
  stream_open(&s, a.access);
  json_t *id = buy1(a.c, p, 2);
  assert_int_equal(shop_track_outcome(stream_wait(&s, id, WAIT_MS)), SHOP_SUCCEEDED);
  long long t0 = shop_now_ms();
  int status = server_stop(SIGTERM, 15000);
  if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    print_error("SIGTERM: the server %s (wait status %d)\n",
                status == -1 ? "did not exit within 15 s" : "did not exit with 0", status);
    fail();
  }
  printf("# the server stopped %lld ms after SIGTERM\n", shop_now_ms() - t0);
  /* The open stream ends. */
  long long deadline = shop_now_ms() + 10000;
  while (!shop_events_ended(s.ev) && shop_now_ms() < deadline) stream_pump(&s, 100);
  assert_true(shop_events_ended(s.ev));
  stream_close(&s);

  t0 = shop_now_ms();
  assert_int_equal(server_start(0), 0);
  printf("# restarted on the same data in %lld ms\n", shop_now_ms() - t0);
  shop_client_free(a.c);
  a.c = client(a.access); /* the new port; the token is still valid (same secret) */
  assert_int_equal(inventory_of(a.c, p), 2);
  expect_payment(a.c, id, "US", 500);
  char path[128];
  snprintf(path, sizeof path, "/api/order/%s", sid(id));
  json_t *r = CALL(a.c, 200, "GET", path, NULL);
  json_decref(r);
  r = CALL(a.c, 200, "POST", "/api/account/auth/login",
           json_pack("{s:s, s:s}", "email", a.email, "password", a.password));
  json_decref(r);
  /* And it sells again. */
  stream_open(&s, a.access);
  json_t *id2 = buy1(a.c, p, 2);
  assert_int_equal(shop_track_outcome(stream_wait(&s, id2, WAIT_MS)), SHOP_SUCCEEDED);
  assert_int_equal(inventory_of(a.c, p), 0);
  stream_close(&s);
  json_decref(id);
  json_decref(id2);
  json_decref(p);
  customer_free(&a);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_signup_login),
      cmocka_unit_test(test_refresh),
      cmocka_unit_test(test_tokens),
      cmocka_unit_test(test_account_info),
      cmocka_unit_test(test_products),
      cmocka_unit_test(test_body_limits),
      cmocka_unit_test(test_purchase_validation),
      cmocka_unit_test(test_unknown_order_payment),
      cmocka_unit_test(test_purchase_outcomes),
      cmocka_unit_test(test_owner_only),
      cmocka_unit_test(test_idempotent_purchase),
      cmocka_unit_test(test_concurrent_purchases),
      cmocka_unit_test(test_metrics_embedded),
      cmocka_unit_test(test_sigterm_restart),
  };
  return cmocka_run_group_tests_name("shop e2e", tests, group_setup, group_teardown);
}
