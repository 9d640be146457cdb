/*
 * End-to-end test of the distributed shop (docs/shop.md, "Distributed"): six service
 * processes, each with its own database and HTTP port, their nodes over the TCP transport
 * (argument "tcp") or NATS JetStream ("nats"), behind nginx. The test starts the whole set
 * with scripts/shop_cluster.sh (SHOP_BIN = this build's shop, a temporary run folder, and for
 * NATS a nats-server it starts on a free port), so the script users run is the one tested.
 *
 * The test process makes itself a child subreaper: the services the script starts become its
 * children when the script exits, so it can SIGKILL one, reap it, and have the script start
 * it again on the same database and ports; at the end everything is stopped and reaped, also
 * when a test failed.
 *
 * Tests, all through nginx's one base URL:
 *  - the shared API tests of e2e.c (signup and login, products, purchase validation with the
 *    unknown-product 404 that the purchase service checks over HTTP, the three outcomes with
 *    their exact streamed sequences, owner-only access);
 *  - health and metrics of every service;
 *  - the product service down: POST /api/purchase answers 503 {"msg"}, then works again;
 *  - the kill cycle: a stream of purchases (succeeding, failing on inventory, refused at
 *    payment) with at most WINDOW in flight, during which product, order, payment and the
 *    orchestrator in turn are killed with SIGKILL and restarted; every purchase must end
 *    completed or compensated with its exact sequence, inventory must have decreased by
 *    exactly what the completed purchases bought, each completed purchase must have its one
 *    order and payment with the right amount, and the compensated ones none;
 *  - the three forgeries of issue 10 (a payment.charge for the test's customer under an
 *    invented saga; a success reply for the payment step of a purchase above the payment limit,
 *    its saga id and attempt read from the orchestrator's database while the payment service
 *    is down; a product.reserve under an invented saga and a product.release naming a
 *    completed purchase), replayed over TCP (mutual TLS with access lists, as the script runs
 *    it) by four attackers, each a libsaga node whose TCP transport the test writes the frames
 *    with: no certificate, a certificate of another CA claiming to be the orchestrator, the
 *    cluster CA's certificate for an identity on no access list, and the purchase node's own
 *    certificate (allowed to send purchase requests, nothing else); each refusal is counted in
 *    the victims' /metrics (shop_tcp_*). Over NATS: no credentials and a wrong password cannot
 *    connect, and the purchase service's own user has each publish refused by the server.
 *    Then the payments, orders and stock must be unchanged and the held purchase refused and
 *    compensated;
 *  - last, a clean stop: every service exits 0 on SIGTERM, with no sanitizer report in its log.
 * With the argument "python" (test_cluster tcp python) the same tests run with the payment
 * service written in Python (examples/shop/payment.py, started by the script's
 * --python-payment): the shop's pivot is then a Python participant.
 * Waits are on streamed events and on polled state (each with a deadline), never on sleeps.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <sodium.h>
#include <sqlite3.h>
#include <uv.h>

#include <saga.h>
#include <saga/envelope.h>
#include <saga/sys/transport.h>
#include <saga/transport_tcp.h>
#ifdef SHOP_HAVE_NATS
#include <nats/nats.h>
#endif

#include "e2e.h"
#include "trace_e2e.h"
#include "trace_sink.h"

#if !defined(SHOP_BIN) || !defined(SHOP_CLUSTER_SCRIPT)
#error "SHOP_BIN and SHOP_CLUSTER_SCRIPT must be defined"
#endif

#define N_PURCHASES 60
#define WINDOW 8           /* purchases in flight at most */
#define END_WAIT_MS 120000 /* safety net for the whole stream to end */

static const char *transport = "tcp";
static int trace_mode; /* "trace": the services export spans to a collector of this test's */
static int python_payment; /* "python": the payment service is examples/shop/payment.py */
static char run_dir[256];

/* ---- the cluster -------------------------------------------------------------------------- */

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st, (void)flag, (void)ftw;
  return remove(path);
}

static void pause_ms(long ms) { /* a retry's backoff or a polling interval, never a wait */
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Runs the cluster script with args (NULL-terminated, at most 8); returns its exit status or
 * -1. */
static int script_v(const char *const *args) {
  const char *path =
      getenv("SHOP_CLUSTER_SCRIPT") ? getenv("SHOP_CLUSTER_SCRIPT") : SHOP_CLUSTER_SCRIPT;
  const char *argv[12] = {"bash", path};
  for (int i = 0; i < 8 && args[i] != NULL; i++) argv[2 + i] = args[i];
  fflush(stdout);
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    execvp("bash", (char *const *)argv);
    _exit(127);
  }
  int st;
  while (waitpid(pid, &st, 0) < 0)
    if (errno != EINTR) return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int script(const char *a1, const char *a2, const char *a3, const char *a4, const char *a5) {
  const char *args[] = {a1, a2, a3, a4, a5, NULL};
  return script_v(args);
}

static char *slurp(const char *path) {
  FILE *f = fopen(path, "r");
  if (f == NULL) return NULL;
  char buf[512];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ')) buf[--n] = '\0';
  return strdup(buf);
}

static pid_t pid_of(const char *name) {
  char path[400];
  snprintf(path, sizeof path, "%s/pids/%s.pid", run_dir, name);
  char *s = slurp(path);
  pid_t pid = s ? (pid_t)atol(s) : 0;
  free(s);
  return pid;
}

/* Reaps every child that has ended (the services are our children: we are a subreaper). */
static void reap(void) {
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

static const char *const all_procs[] = {"account",      "product",  "order", "payment",
                                        "orchestrator", "purchase", "nginx", "nats"};

static void cluster_stop(void) {
  if (run_dir[0] == '\0') return;
  script("stop", NULL, NULL, NULL, NULL);
  /* Whatever did not stop (or the script could not be run): SIGKILL. */
  for (size_t i = 0; i < sizeof all_procs / sizeof all_procs[0]; i++) {
    pid_t pid = pid_of(all_procs[i]);
    if (pid > 0 && kill(pid, SIGKILL) == 0) waitpid(pid, NULL, 0);
  }
  reap();
}

static int group_setup(void **state) {
  (void)state;
  if (sodium_init() < 0 || shop_client_global_init() != 0) return -1;
  signal(SIGPIPE, SIG_IGN);
  if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) {
    perror("prctl(PR_SET_CHILD_SUBREAPER)");
    return -1;
  }
  snprintf(run_dir, sizeof run_dir, "/tmp/shop-cluster-XXXXXX");
  if (mkdtemp(run_dir) == NULL) return -1;
  chmod(run_dir, 0755); /* nginx's workers may run as another user when we are root */
  setenv("SHOP_CLUSTER_RUN", run_dir, 1);
  if (getenv("SHOP_BIN") == NULL) setenv("SHOP_BIN", SHOP_BIN, 1);
  setenv("SHOP_JWT_SECRET", SECRET, 1);
  setenv("SHOP_CLUSTER_EXTRA_CERTS", "mallory", 1); /* a certificate on no access list */
  long long t0 = shop_now_ms();
  char limit[32];
  snprintf(limit, sizeof limit, "%d", PAYMENT_LIMIT);
  const char *otlp = NULL;
  if (trace_mode && (otlp = trace_sink_start(NULL, 0, 100000)) == NULL) {
    fprintf(stderr, "cannot start the OTLP collector\n");
    return -1;
  }
  /* Exports only per 512 spans or at the stop: the test sees the shutdown flush at work. */
  if (trace_mode) setenv("SHOP_OTLP_INTERVAL_MS", "3600000", 1);
  const char *args[] = {"start", "--transport", transport, "--payment-limit", limit,
                        python_payment ? "--python-payment" : otlp ? "--otlp" : NULL,
                        otlp, NULL};
  if (script_v(args) != 0) {
    fprintf(stderr, "shop_cluster.sh start failed\n");
    cluster_stop();
    return -1;
  }
  char path[400];
  snprintf(path, sizeof path, "%s/url", run_dir);
  char *url = slurp(path);
  if (url == NULL) {
    cluster_stop();
    return -1;
  }
  snprintf(e2e_url, sizeof e2e_url, "%s", url);
  free(url);
  printf("# cluster (%s) up in %lld ms at %s, run folder %s\n", transport, shop_now_ms() - t0,
         e2e_url, run_dir);
  return 0;
}

static int group_teardown(void **state) {
  (void)state;
  cluster_stop();
  if (trace_mode) trace_sink_stop();
  if (run_dir[0]) nftw(run_dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
  shop_client_global_cleanup();
  return 0;
}

/* SIGKILLs a service, reaps it, and has the script start it again on the same database and
 * ports (it returns once the service's /healthz answers). */
static void kill_restart(const char *name) {
  pid_t pid = pid_of(name);
  assert_true(pid > 0);
  assert_int_equal(kill(pid, SIGKILL), 0);
  assert_int_equal(waitpid(pid, NULL, 0), pid);
  long long t0 = shop_now_ms();
  if (script("restart", name, NULL, NULL, NULL) != 0) {
    print_error("restarting %s failed\n", name);
    fail();
  }
  printf("# %s killed (SIGKILL) and restarted in %lld ms\n", name, shop_now_ms() - t0);
}

/* ---- health and metrics ------------------------------------------------------------------- */

static void test_health_metrics(void **state) {
  (void)state;
  shop_client *c = client(NULL);
  static const char *const names[] = {"account", "product",      "order",
                                      "payment", "orchestrator", "purchase"};
  for (size_t i = 0; i < 6; i++) {
    char path[64];
    snprintf(path, sizeof path, "/healthz/%s", names[i]);
    json_t *h = CALL(c, 200, "GET", path, NULL);
    assert_string_equal(json_string_value(json_object_get(h, "status")), "ok");
    assert_string_equal(json_string_value(json_object_get(h, "service")), names[i]);
    json_t *nodes = json_object_get(h, "nodes");
    assert_int_equal(json_object_size(nodes), strcmp(names[i], "account") == 0 ? 0 : 1);
    json_decref(h);
    snprintf(path, sizeof path, "/metrics/%s", names[i]);
    e2e_check_metrics(c, path, names[i], strcmp(names[i], "account") == 0 ? NULL : names[i]);
  }
  shop_client_free(c);
}

/* ---- the product service down --------------------------------------------------------------- */

static void test_product_down(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  json_t *p = product_new(a.c, "Downtime", 10, 10);
  pid_t pid = pid_of("product");
  assert_int_equal(kill(pid, SIGKILL), 0);
  assert_int_equal(waitpid(pid, NULL, 0), pid);
  /* The purchase service cannot check the product: 503 {"msg"}, nothing accepted. */
  json_t *items = json_array();
  json_array_append_new(items, item(p, 1));
  json_t *body = purchase_body(items, "US");
  json_object_set_new(body, "purchase_id", json_string("down-1"));
  ERR(a.c, 503, "POST", "/api/purchase", json_incref(body));
  /* And nginx answers for the product service itself. */
  char path[64];
  snprintf(path, sizeof path, "/api/product/%s", sid(p));
  ERR(a.c, 503, "GET", path, NULL);
  assert_int_equal(script("restart", "product", NULL, NULL, NULL), 0);
  stream s;
  stream_open(&s, a.access);
  json_t *r = CALL(a.c, 201, "POST", "/api/purchase", body); /* the retry, same id */
  json_t *id = json_object_get(r, "purchase_id");
  assert_int_equal(shop_track_outcome(stream_wait(&s, id, WAIT_MS)), SHOP_SUCCEEDED);
  assert_int_equal(inventory_of(a.c, p), 9);
  stream_close(&s);
  json_decref(r);
  json_decref(p);
  customer_free(&a);
}

/* ---- the kill cycle ----------------------------------------------------------------------- */

enum { K_OK, K_TWO_OK, K_NO_STOCK, K_REFUSED, K_SCARCE, N_KINDS };

typedef struct purchase {
  char id[64];
  int kind;
  json_t *items; /* [{product_id, amount}] */
  long long total;
  shop_outcome outcome;
} purchase;

typedef struct products {
  json_t *ok, *small, *scarce; /* ids */
  long long price_ok, price_small, price_scarce;
  long long stock_ok, stock_small, stock_scarce;
} products;

typedef struct run {
  customer *cu;
  products *pr;
  purchase p[N_PURCHASES];
  stream s;
  int submitted; /* read by the killer thread (atomically) */
  int ended;     /* likewise */
  int failed;    /* the buyer gave up: message in why */
  char why[512];
  long long retries; /* POSTs answered 503 (product down) and sent again */
} run;

static void add_item(purchase *p, const json_t *product, long long amount, long long price) {
  json_array_append_new(p->items, json_pack("{s:O, s:I}", "product_id", (json_t *)product, "amount",
                                            (json_int_t)amount));
  p->total += amount * price;
}

static void plan(run *r, const char *tag) {
  products *pr = r->pr;
  for (int i = 0; i < N_PURCHASES; i++) {
    purchase *p = &r->p[i];
    snprintf(p->id, sizeof p->id, "kc-%s-%d", tag, i);
    p->kind = i % N_KINDS;
    p->items = json_array();
    switch (p->kind) {
    case K_OK: /* succeeds */
      add_item(p, pr->ok, 1 + i % 3, pr->price_ok);
      break;
    case K_TWO_OK: /* two products, one of them scarce: succeeds or fails on inventory */
      add_item(p, pr->ok, 2, pr->price_ok);
      add_item(p, pr->scarce, 1, pr->price_scarce);
      break;
    case K_NO_STOCK: /* one item more than there is: all or nothing fails at step 0 */
      add_item(p, pr->ok, 1, pr->price_ok);
      add_item(p, pr->small, pr->stock_small + 1, pr->price_small);
      break;
    case K_REFUSED: /* above the payment limit: reserved, ordered, refused, compensated */
      add_item(p, pr->ok, PAYMENT_LIMIT / pr->price_ok + 1, pr->price_ok);
      break;
    default: /* competes for the scarce product: succeeds or fails on inventory */
      add_item(p, pr->scarce, 2, pr->price_scarce);
      break;
    }
  }
}

/* POSTs purchase i until it is accepted (503: a service is down; 0: no answer). */
static int submit(run *r, shop_client *c, int i, long long deadline) {
  purchase *p = &r->p[i];
  json_t *body = purchase_body(json_incref(p->items), "US");
  json_object_set_new(body, "purchase_id", json_string(p->id));
  for (;;) {
    json_t *out = NULL;
    long st = shop_call(c, "POST", "/api/purchase", body, &out);
    json_decref(out);
    if (st == 201) break;
    if ((st != 503 && st != 0) || shop_now_ms() > deadline) {
      snprintf(r->why, sizeof r->why, "POST purchase %s: %ld", p->id, st);
      json_decref(body);
      return -1;
    }
    r->retries++;
    pause_ms(50); /* the retry's backoff */
  }
  json_decref(body);
  return 0;
}

static int count_ended(run *r) {
  int n = 0;
  for (int i = 0; i < r->submitted; i++) {
    if (r->p[i].outcome == SHOP_PENDING)
      r->p[i].outcome = shop_track_outcome(stream_track(&r->s, r->p[i].id));
    if (r->p[i].outcome != SHOP_PENDING) n++;
  }
  return n;
}

/* The buyer: keeps at most WINDOW purchases in flight until all are submitted and ended. */
static void *buyer(void *arg) {
  run *r = arg;
  shop_client *c = NULL;
  if (shop_client_new(&c, e2e_url) != 0) {
    r->failed = 1;
    return NULL;
  }
  shop_client_set_token(c, r->cu->access);
  long long deadline = shop_now_ms() + END_WAIT_MS;
  while (r->ended < N_PURCHASES) {
    if (shop_now_ms() > deadline) {
      snprintf(r->why, sizeof r->why, "%d of %d purchases ended within %d ms", r->ended,
               N_PURCHASES, END_WAIT_MS);
      __atomic_store_n(&r->failed, 1, __ATOMIC_SEQ_CST);
      break;
    }
    if (r->submitted < N_PURCHASES && r->submitted - r->ended < WINDOW) {
      if (submit(r, c, r->submitted, deadline) != 0) {
        __atomic_store_n(&r->failed, 1, __ATOMIC_SEQ_CST);
        break;
      }
      __atomic_add_fetch(&r->submitted, 1, __ATOMIC_SEQ_CST);
      continue;
    }
    stream_pump(&r->s, 200); /* waits for the next streamed status */
    __atomic_store_n(&r->ended, count_ended(r), __ATOMIC_SEQ_CST);
  }
  shop_client_free(c);
  return NULL;
}

/* Polls the orchestrator's sagas by state until none is running or compensating. */
static void wait_orchestrator_idle(shop_client *c, int64_t *completed, int64_t *compensated,
                                   int64_t *failed) {
  long long deadline = shop_now_ms() + END_WAIT_MS;
  for (;;) {
    int64_t n[6];
    e2e_sagas_by_state(c, "/metrics/orchestrator", "orchestrator", n);
    if (n[1] == 0 && n[2] == 0) {
      *completed = n[3], *compensated = n[4], *failed = n[5];
      return;
    }
    if (shop_now_ms() > deadline) {
      print_error("orchestrator: %" PRId64 " running, %" PRId64 " compensating after %d ms\n", n[1],
                  n[2], END_WAIT_MS);
      fail();
    }
    pause_ms(100); /* polling interval */
  }
}

static void test_kill_cycle(void **state) {
  (void)state;
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  products pr = {.price_ok = 100,
                 .price_small = 7,
                 .price_scarce = 30,
                 .stock_ok = 100000,
                 .stock_small = 3,
                 .stock_scarce = 30};
  pr.ok = product_new(c, "Kc-plenty", (int)pr.price_ok, (int)pr.stock_ok);
  pr.small = product_new(c, "Kc-small", (int)pr.price_small, (int)pr.stock_small);
  pr.scarce = product_new(c, "Kc-scarce", (int)pr.price_scarce, (int)pr.stock_scarce);
  json_t *sentinel = product_new(c, "Kc-sentinel", 1, 1000);
  int64_t before[6];
  e2e_sagas_by_state(c, "/metrics/orchestrator", "orchestrator", before);

  static run r; /* large: not on the stack */
  memset(&r, 0, sizeof r);
  r.cu = &a;
  r.pr = &pr;
  char tag[32];
  snprintf(tag, sizeof tag, "%ld-%lld", (long)getpid(), shop_now_ms());
  plan(&r, tag);
  stream_open(&r.s, a.access);

  long long t0 = shop_now_ms();
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, buyer, &r), 0);
  static const char *const victims[] = {"product", "order", "payment", "orchestrator"};
  for (int k = 0; k < 4; k++) {
    /* Kill when the stream has reached its next fifth (polled; the buyer may have failed). */
    int at = (k + 1) * N_PURCHASES / 5;
    long long deadline = shop_now_ms() + END_WAIT_MS;
    while (__atomic_load_n(&r.submitted, __ATOMIC_SEQ_CST) < at &&
           !__atomic_load_n(&r.failed, __ATOMIC_SEQ_CST) && shop_now_ms() < deadline)
      pause_ms(5); /* polling interval */
    if (__atomic_load_n(&r.failed, __ATOMIC_SEQ_CST)) break;
    printf("# at purchase %d of %d (%d in flight):\n", at, N_PURCHASES,
           __atomic_load_n(&r.submitted, __ATOMIC_SEQ_CST) -
               __atomic_load_n(&r.ended, __ATOMIC_SEQ_CST));
    kill_restart(victims[k]);
  }
  pthread_join(th, NULL);
  if (r.failed) {
    print_error("kill cycle: %s\n", r.why);
    fail();
  }
  printf("# %d purchases ended in %lld ms (POSTs retried after 503: %lld)\n", N_PURCHASES,
         shop_now_ms() - t0, r.retries);

  /* Every purchase ended completed or compensated, with its exact sequence (a sentinel
   * purchase first, so that nothing more is on its way). */
  stream_sync(&r.s, c, sentinel);
  int ok = 0, no_stock = 0, refused = 0;
  long long sold_ok = 0, sold_scarce = 0, paid = 0;
  for (int i = 0; i < N_PURCHASES; i++) {
    purchase *p = &r.p[i];
    shop_track *t = stream_track(&r.s, p->id);
    json_t *id = json_string(p->id);
    shop_outcome o = shop_track_outcome(t);
    if (o == SHOP_SUCCEEDED && (p->kind == K_NO_STOCK || p->kind == K_REFUSED)) {
      print_error("purchase %s (kind %d) succeeded: %s\n", p->id, p->kind, dump(t->events));
      fail();
    }
    if (o != SHOP_SUCCEEDED && p->kind == K_OK) {
      print_error("purchase %s did not succeed: %s\n", p->id, dump(t->events));
      fail();
    }
    if (o == SHOP_SUCCEEDED) {
      assert_sequence(&r.s, id, SEQ_SUCCESS);
      ok++;
      paid += p->total;
      for (size_t k = 0; k < json_array_size(p->items); k++) {
        json_t *it = json_array_get(p->items, k);
        long long n = json_integer_value(json_object_get(it, "amount"));
        if (json_equal(json_object_get(it, "product_id"), pr.ok)) sold_ok += n;
        if (json_equal(json_object_get(it, "product_id"), pr.scarce)) sold_scarce += n;
      }
      /* Its one order, with what was bought, and its one payment. */
      char path[128];
      snprintf(path, sizeof path, "/api/order/%s", p->id);
      json_t *order = CALL(c, 200, "GET", path, NULL);
      json_t *got = json_object_get(order, "purchased_items");
      assert_int_equal(json_array_size(got), json_array_size(p->items));
      for (size_t k = 0; k < json_array_size(got); k++) {
        json_t *g = json_array_get(got, k), *w = NULL;
        for (size_t m = 0; m < json_array_size(p->items); m++)
          if (json_equal(json_object_get(json_array_get(p->items, m), "product_id"),
                         json_object_get(g, "product_id")))
            w = json_array_get(p->items, m);
        assert_non_null(w);
        assert_true(json_equal(json_object_get(g, "amount"), json_object_get(w, "amount")));
      }
      json_decref(order);
      expect_payment(c, id, "US", p->total);
    } else {
      if (p->kind == K_REFUSED) {
        assert_sequence(&r.s, id, SEQ_REFUSED);
        refused++;
      } else {
        assert_sequence(&r.s, id, SEQ_NO_STOCK);
        no_stock++;
      }
      expect_absent(c, "order", id);
      expect_absent(c, "payment", id);
    }
    json_decref(id);
  }
  printf("# outcomes: %d completed, %d failed on inventory, %d refused at payment and "
         "compensated\n",
         ok, no_stock, refused);
  assert_int_equal(no_stock + refused + ok, N_PURCHASES);
  assert_true(no_stock > N_PURCHASES / N_KINDS); /* every K_NO_STOCK, and some scarce ones */
  assert_int_equal(refused, N_PURCHASES / N_KINDS);

  /* Inventory decreased by exactly what the completed purchases bought. */
  assert_int_equal(inventory_of(c, pr.ok), pr.stock_ok - sold_ok);
  assert_int_equal(inventory_of(c, pr.scarce), pr.stock_scarce - sold_scarce);
  assert_int_equal(inventory_of(c, pr.small), pr.stock_small);
  printf("# inventory: plenty %lld (sold %lld), scarce %lld (sold %lld), small %lld; paid %lld\n",
         pr.stock_ok - sold_ok, sold_ok, pr.stock_scarce - sold_scarce, sold_scarce, pr.stock_small,
         paid);

  /* The orchestrator agrees: none left running, compensating or failed, and one saga more
   * per purchase (plus the sentinel), completed or compensated as streamed. */
  int64_t completed, compensated, failed_sagas;
  wait_orchestrator_idle(c, &completed, &compensated, &failed_sagas);
  assert_int_equal(failed_sagas, before[5]);
  assert_int_equal(completed - before[3], ok + 1);
  assert_int_equal(compensated - before[4], no_stock + refused);

  stream_close(&r.s);
  for (int i = 0; i < N_PURCHASES; i++) json_decref(r.p[i].items);
  json_decref(pr.ok);
  json_decref(pr.small);
  json_decref(pr.scarce);
  json_decref(sentinel);
  customer_free(&a);
}

/* ---- forgeries (TCP) ------------------------------------------------------------------------ */

static int port_of(const char *name) {
  char path[400], line[128];
  snprintf(path, sizeof path, "%s/ports", run_dir);
  FILE *f = fopen(path, "r");
  int port = 0;
  size_t n = strlen(name);
  while (f != NULL && fgets(line, sizeof line, f) != NULL)
    if (strncmp(line, name, n) == 0 && line[n] == '=') port = atoi(line + n + 1);
  if (f != NULL) fclose(f);
  assert_true(port > 0);
  return port;
}

/* One counter of a service's /metrics (through nginx); -1 when absent. */
static long long metric_of(shop_client *c, const char *service, const char *name) {
  char path[64];
  snprintf(path, sizeof path, "/metrics/%s", service);
  shop_resp r;
  long st = shop_client_send(c, "GET", path, NULL, &r);
  long long v = -1;
  size_t n = strlen(name);
  for (const char *p = st == 200 ? r.body : NULL; p != NULL && *p; p = strchr(p, '\n')) {
    if (*p == '\n') p++;
    if (strncmp(p, name, n) == 0 && p[n] == ' ') v = atoll(p + n + 1);
  }
  shop_resp_destroy(&r);
  return v;
}

/* An attacker: a libsaga node whose TCP transport the test writes raw frames with. */
typedef struct attacker {
  const char *what;    /* for messages */
  const char *counter; /* the victims' counter that its refusal increases */
  saga_node *node;
  saga_transport *t;
  uint64_t token;
} attacker;

static uv_loop_t attack_loop;

static void tick_cb(uv_timer_t *t) { (void)t; } /* only wakes the loop up */

static void attacker_open(attacker *a, const char *what, const char *counter, const char *ca,
                          const char *cert, const char *key) {
  memset(a, 0, sizeof *a);
  a->what = what;
  a->counter = counter;
  a->token = (uint64_t)1 << 60; /* far from the node's own outbox ids */
  char addr[3][64];
  static const char *const chans[] = {"product", "payment", "orchestrator"};
  saga_tcp_route routes[3];
  for (int i = 0; i < 3; i++) {
    char key_name[32];
    snprintf(key_name, sizeof key_name, "tcp_%s", chans[i]);
    snprintf(addr[i], sizeof addr[i], "127.0.0.1:%d", port_of(key_name));
    routes[i] = (saga_tcp_route){.channel = chans[i], .address = addr[i], .identity = NULL};
  }
  saga_tcp_config tc;
  saga_tcp_config_init(&tc);
  tc.routes = routes;
  tc.nroutes = 3;
  tc.reconnect_min_ms = 20;
  tc.reconnect_max_ms = 200;
  tc.insecure_plaintext = ca == NULL;
  tc.tls_ca_file = ca;
  tc.tls_cert_file = cert;
  tc.tls_key_file = key;
  char err[256] = "";
  assert_int_equal(saga_tcp_transport_new2(&a->t, &tc, err, sizeof err), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = "mallory";
  cfg.db_path = ":memory:";
  cfg.transport = a->t;
  assert_int_equal(saga_node_open(&a->node, &attack_loop, &cfg, err, sizeof err), SAGA_OK);
  assert_int_equal(saga_node_start(a->node, NULL), SAGA_OK);
}

static void attacker_closed(void *arg) { ++*(int *)arg; }

/* The saga data as on the wire: a msgpack map of str -> bin (short values). */
static size_t encode_data(unsigned char *out, size_t cap, const char *const *kv) {
  size_t n = 0, len = 1;
  while (kv[2 * n] != NULL) n++;
  assert_true(n < 16);
  out[0] = (unsigned char)(0x80 | n);
  for (size_t i = 0; i < 2 * n; i++) {
    size_t l = strlen(kv[i]);
    assert_true(l < 256 && len + 2 + l <= cap);
    out[len++] = i % 2 == 0 ? 0xd9 : 0xc4; /* str 8 key, bin 8 value */
    out[len++] = (unsigned char)l;
    memcpy(out + len, kv[i], l);
    len += l;
  }
  return len;
}

/* One forged message: the channel it goes to and its bytes (saga_free). */
typedef struct forged {
  const char *channel;
  void *bytes;
  size_t len;
} forged;

/* Encodes one envelope for channel. kv: key, value, ..., NULL. */
static forged forge(const char *channel, saga_msg_kind kind, const char *saga_id, uint32_t step,
                    uint32_t attempt, saga_phase phase, const char *name, const char *const *kv) {
  unsigned char payload[1024];
  size_t plen = encode_data(payload, sizeof payload, kv);
  char msg_id[160];
  snprintf(msg_id, sizeof msg_id, "%s/%u/%d/%u%s", saga_id, step, (int)phase, attempt,
           kind == SAGA_MSG_REPLY ? "/r" : "");
  saga_envelope env;
  memset(&env, 0, sizeof env);
  env.version = SAGA_ENVELOPE_VERSION;
  env.kind = kind;
  env.msg_id = msg_id;
  env.saga_id = saga_id;
  env.step = step;
  env.attempt = attempt;
  env.phase = phase;
  env.name = name;
  env.reply_to = kind == SAGA_MSG_COMMAND ? "orchestrator" : "";
  env.error = "";
  env.payload = payload;
  env.payload_len = plen;
  forged f = {channel, NULL, 0};
  assert_int_equal(saga_envelope_encode(&env, NULL, &f.bytes, &f.len), SAGA_OK);
  return f;
}

/* What every attacker tries (issue 10), and what the test knows to check it. */
typedef struct target {
  shop_client *c;
  char victim[32];  /* the test customer's id */
  char saga_id[64]; /* the purchase above the limit, held at its payment step */
  uint32_t attempt;
  json_t *p, *done; /* the product, and a completed purchase of 2 of it */
} target;

enum { N_FORGED = 4 };

/* Attacker k's four messages: 1. a charge for the test's customer under an invented saga;
 * 2. a success reply for the payment step of the held purchase; 3. a reserve under an invented
 * saga and 4. its release, naming the completed purchase. */
static void forgeries(const target *t, int k, forged out[N_FORGED]) {
  char forged_saga[64], forged_saga2[64], fid[32], items1[96];
  snprintf(forged_saga, sizeof forged_saga, "forged-%d-%lld", k, shop_now_ms());
  snprintf(forged_saga2, sizeof forged_saga2, "forged-release-%d-%lld", k, shop_now_ms());
  snprintf(fid, sizeof fid, "FORGED-%d", k);
  snprintf(items1, sizeof items1, "[{\"product_id\":%s,\"amount\":1}]", sid(t->p));
  const char *charge[] = {"purchase_id", fid,     "customer_id", t->victim, "currency",
                          "US",          "total", "4999",        NULL};
  const char *none[] = {NULL};
  const char *reserve[] = {"purchase_id", sid(t->done), "items", items1, NULL};
  const char *release[] = {"purchase_id", sid(t->done), NULL};
  out[0] = forge("payment", SAGA_MSG_COMMAND, forged_saga, 2, 1, SAGA_PHASE_ACTION,
                 "payment.charge", charge);
  out[1] = forge("orchestrator", SAGA_MSG_REPLY, t->saga_id, 2, t->attempt, SAGA_PHASE_ACTION,
                 "payment.charge", none);
  out[2] = forge("product", SAGA_MSG_COMMAND, forged_saga2, 0, 1, SAGA_PHASE_ACTION,
                 "product.reserve", reserve);
  out[3] = forge("product", SAGA_MSG_COMMAND, forged_saga2, 0, 1, SAGA_PHASE_COMPENSATION,
                 "product.release", release);
}

static void forgeries_free(forged f[N_FORGED]) {
  for (int i = 0; i < N_FORGED; i++) saga_free(NULL, f[i].bytes);
}

/* The customer id in an access token (its "sub" claim). */
static void customer_id_of(const char *token, char *out, size_t len) {
  const char *p = strchr(token, '.'), *q = p ? strchr(p + 1, '.') : NULL;
  assert_non_null(q);
  unsigned char claims[1024];
  size_t n = 0;
  assert_int_equal(sodium_base642bin(claims, sizeof claims - 1, p + 1, (size_t)(q - p - 1), NULL,
                                     &n, NULL, sodium_base64_VARIANT_URLSAFE_NO_PADDING),
                   0);
  claims[n] = '\0';
  json_t *j = json_loads((const char *)claims, 0, NULL);
  assert_non_null(j);
  snprintf(out, len, "%s", json_string_value(json_object_get(j, "sub")));
  json_decref(j);
  assert_true(out[0] != '\0');
}

/* The orchestrator's saga of a purchase, and its current attempt, from its database. */
static void saga_of(const char *purchase_id, char *saga_id, size_t len, uint32_t *attempt,
                    int *step) {
  char path[400];
  snprintf(path, sizeof path, "%s/data/orchestrator/orchestrator.db", run_dir);
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
  sqlite3_busy_timeout(db, 5000);
  assert_int_equal(sqlite3_prepare_v2(db,
                                      "SELECT id, attempt, step FROM saga_instance WHERE "
                                      "idem_key = ?1",
                                      -1, &st, NULL),
                   SQLITE_OK);
  sqlite3_bind_text(st, 1, purchase_id, -1, SQLITE_STATIC);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  snprintf(saga_id, len, "%s", (const char *)sqlite3_column_text(st, 0));
  *attempt = (uint32_t)sqlite3_column_int64(st, 1);
  *step = sqlite3_column_int(st, 2);
  sqlite3_finalize(st);
  sqlite3_close(db);
}

/* Waits until purchase id streamed STEP STATUS. */
static void wait_streamed(stream *s, const json_t *id, const char *step, const char *status) {
  shop_track *t = stream_track(s, sid(id));
  long long deadline = shop_now_ms() + WAIT_MS;
  for (;;) {
    for (size_t i = 0; i < json_array_size(t->events); i++) {
      json_t *ev = json_array_get(t->events, i);
      if (strcmp(json_string_value(json_object_get(ev, "step")), step) == 0 &&
          strcmp(json_string_value(json_object_get(ev, "status")), status) == 0)
        return;
    }
    if (shop_now_ms() > deadline) {
      print_error("purchase %s: no %s %s within %d ms: %s\n", t->id, step, status, WAIT_MS,
                  dump(t->events));
      fail();
    }
    stream_pump(s, 200);
  }
}

/* Over TCP: four attackers, each a libsaga node whose transport the test writes the forged
 * frames with, one after the other so that each refusal counted is its own. Returns how many
 * refusals were not counted. */
static int attack_tcp(const target *t, int *n_attackers) {
  shop_client *c = t->c;
  char other[300], ca[400], mcert[400], mkey[400], ocert[400], okey[400], pcert[400], pkey[400];
  snprintf(other, sizeof other, "%s/other-ca", run_dir);
  char cmd[1200];
  const char *script_path =
      getenv("SHOP_CLUSTER_SCRIPT") ? getenv("SHOP_CLUSTER_SCRIPT") : SHOP_CLUSTER_SCRIPT;
  snprintf(cmd, sizeof cmd, "bash \"$(dirname '%s')/make_pki.sh\" '%s' orchestrator", script_path,
           other);
  assert_int_equal(system(cmd), 0);
  snprintf(ca, sizeof ca, "%s/pki/ca.pem", run_dir);
  snprintf(mcert, sizeof mcert, "%s/pki/mallory.pem", run_dir);
  snprintf(mkey, sizeof mkey, "%s/pki/mallory.key", run_dir);
  snprintf(ocert, sizeof ocert, "%s/orchestrator.pem", other);
  snprintf(okey, sizeof okey, "%s/orchestrator.key", other);
  snprintf(pcert, sizeof pcert, "%s/pki/purchase.pem", run_dir);
  snprintf(pkey, sizeof pkey, "%s/pki/purchase.key", run_dir);
  assert_int_equal(uv_loop_init(&attack_loop), 0);
  enum { N_ATTACKERS = 4 };
  attacker at[N_ATTACKERS];
  attacker_open(&at[0], "no certificate (plaintext)", "shop_tcp_handshakes_failed_total", NULL,
                NULL, NULL);
  attacker_open(&at[1], "a certificate of another CA claiming to be the orchestrator",
                "shop_tcp_handshakes_failed_total", ca, ocert, okey);
  attacker_open(&at[2], "the cluster CA's certificate for 'mallory', on no access list",
                "shop_tcp_frames_refused_total", ca, mcert, mkey);
  attacker_open(&at[3],
                "the purchase node's own certificate (it may send requests on "
                "orchestrator.requests, and nothing else)",
                "shop_tcp_frames_refused_total", ca, pcert, pkey);
  static const char *const victims[] = {"orchestrator", "product"};
  uv_timer_t tick;
  uv_timer_init(&attack_loop, &tick);
  int unrefused = 0; /* refusals not counted: reported after the state checks */

  /* One attacker after the other, so that each refusal counted is its own. Payment is down:
   * the forged charges wait in the attackers' transports until it is back. */
  for (int k = 0; k < N_ATTACKERS; k++) {
    attacker *m = &at[k];
    long long before[2];
    for (int v = 0; v < 2; v++) before[v] = metric_of(c, victims[v], m->counter);
    forged f[N_FORGED];
    forgeries(t, k, f);
    for (int i = 0; i < N_FORGED; i++)
      assert_int_equal(m->t->methods->send(m->t, f[i].channel, f[i].bytes, f[i].len, ++m->token),
                       SAGA_OK);
    forgeries_free(f);
    /* The orchestrator and the product service count the refusal: the attackers' loop runs
     * while their /metrics are polled. */
    for (int v = 0; v < 2; v++) {
      long long now, deadline = shop_now_ms() + 10000;
      while ((now = metric_of(c, victims[v], m->counter)) <= before[v] &&
             shop_now_ms() < deadline) {
        uv_timer_start(&tick, tick_cb, 50, 0); /* polling interval */
        uv_run(&attack_loop, UV_RUN_ONCE);
      }
      if (now <= before[v]) {
        print_error("%s: %s counted no refusal (%s stays %lld)\n", m->what, victims[v], m->counter,
                    now);
        unrefused++;
      } else {
        printf("# %s -> %s: refused (%s %lld -> %lld)\n", m->what, victims[v], m->counter,
               before[v], now);
      }
    }
  }

  /* Payment back: the charges waiting for it in the attackers' transports are refused. */
  assert_int_equal(script("restart", "payment", NULL, NULL, NULL), 0);
  long long pay_before = metric_of(c, "payment", "shop_tcp_handshakes_failed_total");
  long long pay_refused = metric_of(c, "payment", "shop_tcp_frames_refused_total");
  long long deadline = shop_now_ms() + 10000;
  while ((metric_of(c, "payment", "shop_tcp_handshakes_failed_total") < pay_before + 2 ||
          metric_of(c, "payment", "shop_tcp_frames_refused_total") < pay_refused + 2) &&
         shop_now_ms() < deadline) {
    uv_timer_start(&tick, tick_cb, 50, 0); /* polling interval */
    uv_run(&attack_loop, UV_RUN_ONCE);
  }
  long long pay_hs = metric_of(c, "payment", "shop_tcp_handshakes_failed_total");
  long long pay_fr = metric_of(c, "payment", "shop_tcp_frames_refused_total");
  if (pay_hs < pay_before + 2 || pay_fr < pay_refused + 2) {
    print_error("payment counted %lld failed handshakes and %lld refused frames after its "
                "restart (want 2 and 2)\n",
                pay_hs - pay_before, pay_fr - pay_refused);
    unrefused++;
  } else {
    printf("# every attacker -> payment (once it was back): refused (handshakes failed %lld, "
           "frames refused %lld)\n",
           pay_hs - pay_before, pay_fr - pay_refused);
  }
  uv_close((uv_handle_t *)&tick, NULL);
  int closed = 0;
  for (int k = 0; k < N_ATTACKERS; k++) saga_node_close(at[k].node, attacker_closed, &closed);
  while (closed < N_ATTACKERS) uv_run(&attack_loop, UV_RUN_ONCE);
  uv_run(&attack_loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&attack_loop), 0);
  *n_attackers = N_ATTACKERS;
  return unrefused;
}

#ifdef SHOP_HAVE_NATS
/* What the server told a NATS attacker (its error handler runs on a libnats thread). */
typedef struct nats_seen {
  pthread_mutex_t mu;
  int refused;    /* publishes the server refused so far ("Permissions Violation for Publish") */
  char text[256]; /* the last one's text */
} nats_seen;

static void nats_err(natsConnection *nc, natsSubscription *sub, natsStatus err, void *arg) {
  (void)sub, (void)err;
  nats_seen *n = arg;
  const char *text = NULL;
  natsConnection_GetLastError(nc, &text);
  pthread_mutex_lock(&n->mu);
  if (text != NULL && strstr(text, "Permissions Violation for Publish") != NULL) {
    snprintf(n->text, sizeof n->text, "%s", text);
    n->refused++;
  }
  pthread_mutex_unlock(&n->mu);
}

/* A connection to the cluster's nats-server over TLS as user (NULL: none) with password. */
static natsStatus nats_connect(natsConnection **nc, const char *user, const char *password,
                               nats_seen *seen) {
  char url[64], ca[400];
  snprintf(url, sizeof url, "tls://127.0.0.1:%d", port_of("nats"));
  snprintf(ca, sizeof ca, "%s/pki/ca.pem", run_dir);
  natsOptions *o = NULL;
  assert_int_equal(natsOptions_Create(&o), NATS_OK);
  natsOptions_SetURL(o, url);
  natsOptions_SetSecure(o, true);
  assert_int_equal(natsOptions_LoadCATrustedCertificates(o, ca), NATS_OK);
  natsOptions_SetExpectedHostname(o, "nats");
  natsOptions_SetMaxReconnect(o, 0);
  if (user != NULL) natsOptions_SetUserInfo(o, user, password);
  if (seen != NULL) natsOptions_SetErrorHandler(o, nats_err, seen);
  natsStatus st = natsConnection_Connect(nc, o);
  natsOptions_Destroy(o);
  return st;
}

/* Over NATS: no credentials and a wrong password cannot connect; the purchase service's own
 * user (it may publish purchase requests, nothing else) publishes the forgeries and the server
 * refuses each. Returns how many refusals were not seen. */
static int attack_nats(const target *t, int *n_attackers) {
  int unrefused = 0;
  natsConnection *nc = NULL;
  natsStatus st = nats_connect(&nc, NULL, NULL, NULL);
  printf("# no credentials -> nats-server: %s\n", natsStatus_GetText(st));
  if (st == NATS_OK) unrefused++, natsConnection_Destroy(nc), nc = NULL;
  st = nats_connect(&nc, "payment", "not-the-password", NULL);
  printf("# user payment with a wrong password -> nats-server: %s\n", natsStatus_GetText(st));
  if (st == NATS_OK) unrefused++, natsConnection_Destroy(nc), nc = NULL;

  char path[400];
  snprintf(path, sizeof path, "%s/secrets/purchase", run_dir);
  char *pw = slurp(path);
  assert_non_null(pw);
  nats_seen seen;
  memset(&seen, 0, sizeof seen);
  pthread_mutex_init(&seen.mu, NULL);
  assert_int_equal(nats_connect(&nc, "purchase", pw, &seen), NATS_OK);
  free(pw);
  forged f[N_FORGED];
  forgeries(t, 0, f);
  for (int i = 0; i < N_FORGED; i++) {
    char subject[64];
    snprintf(subject, sizeof subject, "saga.%s", f[i].channel);
    /* Each is refused asynchronously (an -ERR from the server): flushed and waited for one at
     * a time, so that each refusal is seen. */
    assert_int_equal(natsConnection_Publish(nc, subject, f[i].bytes, (int)f[i].len), NATS_OK);
    natsConnection_FlushTimeout(nc, 2000);
    long long deadline = shop_now_ms() + 5000;
    char want[80];
    snprintf(want, sizeof want, "\"%s\"", subject);
    int ok = 0, refusals = 0;
    char text[256];
    for (;;) {
      pthread_mutex_lock(&seen.mu);
      refusals = seen.refused;
      snprintf(text, sizeof text, "%s", seen.text);
      pthread_mutex_unlock(&seen.mu);
      ok = refusals == i + 1 && strstr(text, want) != NULL;
      if (ok || refusals > i + 1 || shop_now_ms() > deadline) break;
      pause_ms(20); /* polling interval */
    }
    if (ok) {
      printf("# user purchase -> %s (forgery %d): refused (%s)\n", subject, i + 1, text);
    } else {
      print_error("user purchase's publish to %s was not refused (refusals %d, last: %s)\n",
                  subject, refusals, text);
      unrefused++;
    }
  }
  forgeries_free(f);
  natsConnection_Destroy(nc);
  pthread_mutex_destroy(&seen.mu);
  assert_int_equal(script("restart", "payment", NULL, NULL, NULL), 0);
  *n_attackers = 1;
  return unrefused;
}
#endif

static void test_forgeries(void **state) {
  (void)state;
#ifndef SHOP_HAVE_NATS
  if (strcmp(transport, "tcp") != 0) skip(); /* built without the NATS transport */
#endif
  customer a;
  customer_new(&a);
  shop_client *c = a.c;
  char victim[32];
  customer_id_of(a.access, victim, sizeof victim);
  json_t *p = product_new(c, "Forgery target", 1000, 20);
  stream s;
  stream_open(&s, a.access);
  /* A completed purchase of 2, whose reservation the third forgery tries to give back. */
  json_t *done = buy1(c, p, 2);
  assert_int_equal(shop_track_outcome(stream_wait(&s, done, WAIT_MS)), SHOP_SUCCEEDED);
  assert_int_equal(inventory_of(c, p), 18);

  /* A purchase above the payment limit, held at its payment step: payment is down. */
  pid_t pay = pid_of("payment");
  assert_int_equal(kill(pay, SIGKILL), 0);
  assert_int_equal(waitpid(pay, NULL, 0), pay);
  char refused_id[64];
  snprintf(refused_id, sizeof refused_id, "forge-over-limit-%ld-%lld", (long)getpid(),
           shop_now_ms());
  json_t *items = json_array();
  json_array_append_new(items, item(p, PAYMENT_LIMIT / 1000 + 1));
  json_t *body = purchase_body(items, "US");
  json_object_set_new(body, "purchase_id", json_string(refused_id));
  json_decref(CALL(c, 201, "POST", "/api/purchase", body));
  json_t *refused = json_string(refused_id);
  wait_streamed(&s, refused, "CREATE_PAYMENT", "STATUS_EXECUTE");
  char saga_id[64];
  uint32_t attempt;
  int step;
  saga_of(refused_id, saga_id, sizeof saga_id, &attempt, &step);
  assert_int_equal(step, 2);

  /* The attackers, then payment back (it refuses what reaches it too): the purchase above
   * the limit must be refused and compensated as if nobody had forged anything. */
  target t = {.c = c, .attempt = attempt, .p = p, .done = done};
  snprintf(t.victim, sizeof t.victim, "%s", victim);
  snprintf(t.saga_id, sizeof t.saga_id, "%s", saga_id);
  int n_attackers = 0, unrefused;
#ifdef SHOP_HAVE_NATS
  if (strcmp(transport, "nats") == 0)
    unrefused = attack_nats(&t, &n_attackers);
  else
#endif
    unrefused = attack_tcp(&t, &n_attackers);
  assert_int_equal(shop_track_outcome(stream_wait(&s, refused, WAIT_MS)), SHOP_COMPENSATED);
  assert_sequence(&s, refused, SEQ_REFUSED);
  expect_absent(c, "order", refused);
  expect_absent(c, "payment", refused);
  for (int k = 0; k < n_attackers; k++) {
    char fid[32];
    snprintf(fid, sizeof fid, "FORGED-%d", k);
    json_t *f = json_string(fid);
    expect_absent(c, "payment", f);
    json_decref(f);
  }
  /* The completed purchase keeps its stock, order and payment. */
  assert_int_equal(inventory_of(c, p), 18);
  char path[128];
  snprintf(path, sizeof path, "/api/order/%s", sid(done));
  json_decref(CALL(c, 200, "GET", path, NULL));
  expect_payment(c, done, "US", 2000);
  if (unrefused > 0) fail();

  stream_close(&s);
  json_decref(refused);
  json_decref(done);
  json_decref(p);
  customer_free(&a);
}

/* ---- a clean stop ------------------------------------------------------------------------ */

/* Last: SIGTERM (the script's stop) ends every service cleanly: exit status 0, and no
 * sanitizer report in any service's log (they run under ASan/UBSan in the sanitizer build,
 * where a leak at exit is reported there). */
static void test_clean_stop(void **state) {
  (void)state;
  static const char *const names[] = {"account", "product",      "order",
                                      "payment", "orchestrator", "purchase"};
  pid_t pids[6];
  for (int i = 0; i < 6; i++) pids[i] = pid_of(names[i]);
  assert_int_equal(script("stop", NULL, NULL, NULL, NULL), 0);
  int bad = 0;
  for (int i = 0; i < 6; i++) {
    int st = 0;
    if (waitpid(pids[i], &st, 0) != pids[i] || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      print_error("%s (pid %d) did not exit with 0 on SIGTERM (wait status %d)\n", names[i],
                  (int)pids[i], st);
      bad = 1;
    }
  }
  for (int i = 0; i < 6; i++) {
    char path[400];
    snprintf(path, sizeof path, "%s/logs/%s.log", run_dir, names[i]);
    FILE *f = fopen(path, "r");
    char line[1024];
    int reported = 0;
    while (f != NULL && fgets(line, sizeof line, f) != NULL) {
      if (strstr(line, "Sanitizer") != NULL || strstr(line, "runtime error:") != NULL) reported = 1;
      if (reported) print_error("%s: %s", names[i], line);
    }
    if (f != NULL) fclose(f);
    bad |= reported;
  }
  if (bad) fail();
}

/* Tracing: purchases, a clean stop (the exporters send what they hold), then the traces the
 * collector received, and how it draws them (trace_e2e.c). */
static void test_traces(void **state) {
  trace_purchases(state);
  test_clean_stop(state);
  trace_check(state);
  trace_tree(state);
}

static int have_program(const char *name) {
  const char *dirs[] = {"/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin"};
  char path[256];
  for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
    snprintf(path, sizeof path, "%s/%s", dirs[i], name);
    if (access(path, X_OK) == 0) return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1) transport = argv[1];
  trace_mode = argc > 2 && strcmp(argv[2], "trace") == 0;
  python_payment = argc > 2 && strcmp(argv[2], "python") == 0;
  if ((strcmp(transport, "tcp") != 0 && strcmp(transport, "nats") != 0) ||
      (argc > 2 && !trace_mode && !python_payment)) {
    fprintf(stderr, "usage: test_cluster [tcp|nats] [trace|python]\n");
    return 2;
  }
  if (python_payment && !have_program("python3")) {
    printf("# python3 is not installed (scripts/deps.sh installs it): skipped\n");
    return 77;
  }
  const char *need[] = {"nginx", "curl", strcmp(transport, "nats") == 0 ? "nats-server" : "bash"};
  for (int i = 0; i < 3; i++) {
    if (!have_program(need[i])) {
      printf("# %s is not installed (scripts/deps.sh installs it): skipped\n", need[i]);
      return 77;
    }
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_health_metrics),    cmocka_unit_test(test_signup_login),
      cmocka_unit_test(test_products),          cmocka_unit_test(test_purchase_validation),
      cmocka_unit_test(test_purchase_outcomes), cmocka_unit_test(test_owner_only),
      cmocka_unit_test(test_product_down),      cmocka_unit_test(test_kill_cycle),
      cmocka_unit_test(test_forgeries),         cmocka_unit_test(test_clean_stop),
  };
  char name[64];
  snprintf(name, sizeof name, "shop cluster (%s%s)", transport,
           trace_mode ? ", traces" : python_payment ? ", Python payment service" : "");
  if (trace_mode) {
    const struct CMUnitTest trace_tests[] = {
        cmocka_unit_test(test_traces),
    };
    return cmocka_run_group_tests_name(name, trace_tests, group_setup, group_teardown);
  }
  return cmocka_run_group_tests_name(name, tests, group_setup, group_teardown);
}
