/* TCP transport specifics: malformed and oversized frames close only their connection,
 * unserved channels are refused, reconnects after the peer was away, bounded queues. */
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>

#include <sqlite3.h>

#include "servers.h"
#include "tcp_rx.h"

/* A TCP transport listening on `listen`, routing channels "ch" and "other" to route_addr,
 * reconnecting quickly (every 10 ms up to max_reconnect_ms). */
static saga_transport *tcp_new(const char *listen, const char *route_addr, size_t max_queued,
                               uint32_t max_reconnect_ms) {
  saga_tcp_route routes[] = {{"ch", route_addr, NULL}, {"other", route_addr, NULL}};
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  cfg.insecure_plaintext = 1; /* loopback only */
  cfg.listen = listen;
  cfg.routes = routes;
  cfg.nroutes = 2;
  cfg.reconnect_min_ms = 10;
  cfg.reconnect_max_ms = max_reconnect_ms;
  if (max_queued) cfg.max_queued_bytes = max_queued;
  saga_transport *t = NULL;
  assert_int_equal(saga_tcp_transport_new(&t, &cfg), SAGA_OK);
  return t;
}

static void rx_open(rx *r, uv_loop_t *loop, const char *listen, const char *route_addr,
                    size_t max_queued) {
  rx_attach(r, tcp_new(listen, route_addr, max_queued, 100), loop, "ch");
}

static int log_has_lost(void *arg) { return strstr(((rx *)arg)->log, "connection to") != NULL; }

static int log_has(void *arg) { return strstr(((rx *)arg)->log, "dropping inbound") != NULL; }

/* A garbage frame and an oversized frame each close their own connection, with the reason
 * logged; the transport keeps serving other connections. */
static void test_malformed_and_oversized(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  int pb = th_free_port();
  char b[32];
  snprintf(b, sizeof b, "127.0.0.1:%d", pb);
  rx R, S;
  rx_open(&R, &loop, b, b, 0);
  rx_open(&S, &loop, NULL, b, 0);
  int fd = raw_connect(pb);
  const unsigned char junk[] = {0, 0, 0, 3, 0xc1, 0xc1, 0xc1}; /* 0xc1 is never valid */
  assert_int_equal(write(fd, junk, sizeof junk), (ssize_t)sizeof junk);
  assert_int_equal(th_run_real(&loop, log_has, &R, 5000), 0);
  assert_non_null(strstr(R.log, "not an array"));
  close(fd);
  R.log[0] = '\0';
  fd = raw_connect(pb);
  const unsigned char big[] = {0x7f, 0xff, 0xff, 0xff}; /* announces a 2 GiB frame */
  assert_int_equal(write(fd, big, sizeof big), (ssize_t)sizeof big);
  assert_int_equal(th_run_real(&loop, log_has, &R, 5000), 0);
  assert_non_null(strstr(R.log, "over max_frame_bytes"));
  close(fd);
  /* The listener still works for a well-behaved sender. */
  assert_int_equal(S.t->methods->send(S.t, "ch", "fine", 4, 7), SAGA_OK);
  want w = {&R, 1, 0, 0};
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  assert_string_equal(R.last, "fine");
  R.t->methods->ack(R.t, R.last_tag);
  want ws = {&S, 0, 1, 0};
  assert_int_equal(th_run_real(&loop, reached, &ws, 5000), 0);
  assert_int_equal(S.sent[0], 7);
  rx_close(&S, &loop);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* An ack the node gives twice for one delivery is ignored (and logged): freeing its slot twice
 * would hand the slot to the next two deliveries, and acknowledging the first of them would
 * confirm the second's token to the sender before the node committed it. */
static void test_double_ack_ignored(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char b[32];
  snprintf(b, sizeof b, "127.0.0.1:%d", th_free_port());
  rx R, S;
  rx_open(&R, &loop, b, b, 0);
  rx_open(&S, &loop, NULL, b, 0);
  assert_int_equal(S.t->methods->send(S.t, "ch", "one", 3, 1), SAGA_OK);
  want w = {&R, 1, 0, 0};
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  uint64_t tag1 = R.last_tag;
  R.t->methods->ack(R.t, tag1);
  R.t->methods->ack(R.t, tag1); /* again: must not free the slot a second time */
  assert_non_null(strstr(R.log, "awaits none"));
  want ws = {&S, 0, 1, 0};
  assert_int_equal(th_run_real(&loop, reached, &ws, 5000), 0);
  assert_int_equal(S.sent[0], 1);
  assert_int_equal(S.t->methods->send(S.t, "ch", "two", 3, 2), SAGA_OK);
  w.delivered = 2;
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  uint64_t tag2 = R.last_tag;
  assert_int_equal(S.t->methods->send(S.t, "ch", "three", 5, 3), SAGA_OK);
  w.delivered = 3;
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  assert_true(R.last_tag != tag2);
  R.t->methods->ack(R.t, tag2); /* confirms token 2, and only token 2 */
  ws.nsent = 2;
  assert_int_equal(th_run_real(&loop, reached, &ws, 5000), 0);
  assert_int_equal(S.sent[1], 2);
  R.t->methods->ack(R.t, R.last_tag);
  ws.nsent = 3;
  assert_int_equal(th_run_real(&loop, reached, &ws, 5000), 0);
  assert_int_equal(S.sent[2], 3);
  rx_close(&S, &loop);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* A message for a channel the receiving node does not serve is refused with a NACK, which
 * the sender reports as a failed send (the outbox will try again later). */
static void test_unserved_channel(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char b[32];
  snprintf(b, sizeof b, "127.0.0.1:%d", th_free_port());
  rx R, S;
  rx_open(&R, &loop, b, b, 0);
  rx_open(&S, &loop, NULL, b, 0);
  assert_int_equal(S.t->methods->send(S.t, "other", "x", 1, 9), SAGA_OK);
  want w = {&S, 0, 0, 1};
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  assert_int_equal(R.delivered, 0);
  assert_int_equal(S.t->methods->send(S.t, "nowhere", "x", 1, 10), SAGA_EINVAL);
  rx_close(&S, &loop);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* Messages sent while the peer is down wait (bounded) and go out when it comes back; the
 * sender keeps reconnecting with backoff. Over the bound, send refuses with SAGA_EBUSY. */
static void test_reconnect_and_bound(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char b[32];
  snprintf(b, sizeof b, "127.0.0.1:%d", th_free_port());
  rx S;
  rx_open(&S, &loop, NULL, b, 4096);
  char msg[1000];
  memset(msg, 'm', sizeof msg);
  int accepted = 0, busy = 0;
  for (int i = 0; i < 10; i++) {
    int rc = S.t->methods->send(S.t, "ch", msg, sizeof msg, (uint64_t)i);
    if (rc == SAGA_OK) accepted++;
    if (rc == SAGA_EBUSY) busy++;
  }
  assert_true(accepted >= 3 && accepted <= 4);
  assert_int_equal(busy, 10 - accepted);
  /* It fails to connect (and backs off) until the peer comes up. */
  assert_int_equal(th_run_real(&loop, log_has_lost, &S, 5000), 0);
  rx R;
  rx_open(&R, &loop, b, b, 0);
  want w = {&R, accepted, 0, 0};
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  rx_close(&S, &loop);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* While the peer is down, resends of a waiting message do not queue more copies: when it
 * comes back it gets each message once (the outbox resends every resend_ms, so a long outage
 * would otherwise flood the peer with copies on reconnect). */
static void test_queue_one_copy(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char b[32];
  snprintf(b, sizeof b, "127.0.0.1:%d", th_free_port());
  rx S;
  rx_open(&S, &loop, NULL, b, 0);
  for (int i = 0; i < 5; i++)
    assert_int_equal(S.t->methods->send(S.t, "ch", "seven", 5, 7), SAGA_OK);
  assert_int_equal(S.t->methods->send(S.t, "ch", "eight", 5, 8), SAGA_OK);
  assert_int_equal(th_run_real(&loop, log_has_lost, &S, 5000), 0); /* it tried and failed */
  for (int i = 0; i < 5; i++)
    assert_int_equal(S.t->methods->send(S.t, "ch", "seven", 5, 7), SAGA_OK);
  rx R;
  rx_open(&R, &loop, b, b, 0);
  want w = {&R, 2, 0, 0};
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  /* A later message on the same connection arrives after everything queued before it. */
  assert_int_equal(S.t->methods->send(S.t, "ch", "nine", 4, 9), SAGA_OK);
  want w3 = {&R, 3, 0, 0};
  assert_int_equal(th_run_real(&loop, reached, &w3, 5000), 0);
  assert_string_equal(R.last, "nine");
  assert_int_equal(R.delivered, 3);
  rx_close(&S, &loop);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_bad_config(void **state) {
  saga_transport *t = NULL;
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  cfg.insecure_plaintext = 1; /* loopback only */
  cfg.listen = "not an address";
  assert_int_equal(saga_tcp_transport_new(&t, &cfg), SAGA_EINVAL);
  cfg.listen = "127.0.0.1:99999";
  assert_int_equal(saga_tcp_transport_new(&t, &cfg), SAGA_EINVAL);
  saga_tcp_route r = {"ch", "[::1]:80", NULL};
  cfg.listen = "[::1]:0";
  cfg.routes = &r;
  cfg.nroutes = 1;
  assert_int_equal(saga_tcp_transport_new(&t, &cfg), SAGA_OK);
  saga_transport_free(t);
  cfg.struct_version = 99;
  assert_int_equal(saga_tcp_transport_new(&t, &cfg), SAGA_EVERSION);
}

/* ---- node level: a poison command over TCP -------------------------------------------------- */

typedef struct pw {
  int terminal, compensated, closed;
} pw;

static int poison_do(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  int64_t poison = 0;
  saga_data_get_i64(saga_msg_data(m), "poison", &poison);
  return poison ? SAGA_EBUSY : SAGA_OK; /* fails transiently, every time */
}
static int poison_undo(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  return SAGA_OK;
}
static void poison_event(saga_node *n, const saga_event *ev, void *arg) {
  pw *w = arg;
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED) w->terminal++;
  if (ev->type == SAGA_EV_SAGA_COMPENSATED) w->compensated++;
}
static void poison_closed(void *arg) { ((pw *)arg)->closed++; }
static int poison_done(void *arg) { return ((pw *)arg)->terminal >= 21; }
static int poison_closed_all(void *arg) { return ((pw *)arg)->closed >= 2; }

static uint32_t tcp_node_resend_ms = 50;

static saga_node *tcp_node(uv_loop_t *loop, const char *name, const char *listen,
                           saga_tcp_route *routes, const char *db, pw *w) {
  saga_transport *t = NULL;
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  cfg.insecure_plaintext = 1; /* loopback only */
  cfg.listen = listen;
  cfg.routes = routes;
  cfg.nroutes = 2;
  assert_int_equal(saga_tcp_transport_new(&t, &cfg), SAGA_OK);
  saga_node_config nc;
  saga_node_config_init(&nc);
  nc.db_mode = SAGA_DB_CREATE;
  nc.name = name;
  nc.db_path = db;
  nc.transport = t;
  nc.resend_ms = tcp_node_resend_ms;
  nc.on_event = poison_event;
  nc.event_arg = w;
  saga_node *n = NULL;
  assert_int_equal(saga_node_open(&n, loop, &nc, NULL, 0), SAGA_OK);
  return n;
}

/* A command whose handler fails every time is dead-lettered after the delivery cap and
 * answered with a failure (its saga compensates), while 20 other sagas flow past it. */
static void test_poison_over_tcp(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char *dir = th_tmpdir();
  char a[32], b[32];
  snprintf(a, sizeof a, "127.0.0.1:%d", th_free_port());
  snprintf(b, sizeof b, "127.0.0.1:%d", th_free_port());
  saga_tcp_route routes[] = {{"orch", a, NULL}, {"work", b, NULL}};
  char *da = th_path(dir, "a.db"), *db = th_path(dir, "b.db");
  pw w = {0};
  saga_node *orch = tcp_node(&loop, "orch", a, routes, da, &w);
  saga_node *part = tcp_node(&loop, "part", b, routes, db, &w);
  static const saga_step steps[] = {
      {.name = "ONE", .channel = "work", .action = "w.do", .compensation = "w.undo"},
      {.name = "TWO", .channel = "work", .action = "w.do", .kind = SAGA_STEP_PIVOT}};
  static const saga_definition def = {SAGA_DEFINITION_VERSION, "p", 1, steps, 2, 0,
                                      sizeof(saga_step)};
  assert_int_equal(saga_node_register(orch, &def), SAGA_OK);
  assert_int_equal(saga_node_handle(part, "work", "w.do", poison_do, NULL), SAGA_OK);
  assert_int_equal(saga_node_handle(part, "work", "w.undo", poison_undo, NULL), SAGA_OK);
  assert_int_equal(saga_node_start(orch, NULL), SAGA_OK);
  assert_int_equal(saga_node_start(part, NULL), SAGA_OK);
  for (int i = 0; i < 21; i++) {
    saga_data *d = NULL;
    saga_data_new(&d, NULL);
    if (i == 10) saga_data_set_i64(d, "poison", 1);
    assert_int_equal(saga_start(orch, "p", d, NULL, NULL, NULL), SAGA_OK);
    saga_data_free(d);
  }
  assert_int_equal(th_run_real(&loop, poison_done, &w, 30000), 0);
  assert_int_equal(w.compensated, 1);
  saga_node_stats st;
  saga_node_stats_get(part, &st, sizeof st);
  assert_int_equal(st.dead_letters, 1);
  saga_node_close(orch, poison_closed, &w);
  saga_node_close(part, poison_closed, &w);
  assert_int_equal(th_run_real(&loop, poison_closed_all, &w, 5000), 0);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  free(da);
  free(db);
  th_rmdir(dir);
}

/* Item 6 of the outage report, over TCP: the participant is down while 20 sagas wait for it
 * and the orchestrator resends every 20 ms. The transport holds one copy per message while
 * the peer is away, so the participant, once back, sees each command about once, and the
 * replies to the copies it did see twice write no history row each. Measured and printed:
 * send() calls during the outage, duplicates the participant saw, stale replies counted and
 * stale-reply history rows written. */
static int count_rows(saga_node *n, const char *sql) {
  sqlite3_stmt *st = NULL;
  int v = -1;
  if (sqlite3_prepare_v2(saga_node_db(n), sql, -1, &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  return v;
}

static int never_true(void *arg) {
  (void)arg;
  return 0;
}

static int outage_done(void *arg) { return ((pw *)arg)->terminal >= 20; }

static void test_outage_one_copy(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char *dir = th_tmpdir();
  char a[32], b[32];
  snprintf(a, sizeof a, "127.0.0.1:%d", th_free_port());
  snprintf(b, sizeof b, "127.0.0.1:%d", th_free_port());
  saga_tcp_route routes[] = {{"orch", a, NULL}, {"work", b, NULL}};
  char *da = th_path(dir, "a.db"), *db = th_path(dir, "b.db");
  pw w = {0};
  tcp_node_resend_ms = 20;
  saga_node *orch = tcp_node(&loop, "orch", a, routes, da, &w);
  static const saga_step steps[] = {
      {.name = "ONE", .channel = "work", .action = "w.do", .compensation = "w.undo"},
      {.name = "TWO", .channel = "work", .action = "w.do", .kind = SAGA_STEP_PIVOT}};
  static const saga_definition def = {SAGA_DEFINITION_VERSION, "p", 1, steps, 2, 0,
                                      sizeof(saga_step)};
  assert_int_equal(saga_node_register(orch, &def), SAGA_OK);
  assert_int_equal(saga_node_start(orch, NULL), SAGA_OK);
  for (int i = 0; i < 20; i++) assert_int_equal(saga_start(orch, "p", NULL, NULL, NULL, NULL),
                                                SAGA_OK);
  /* The participant is down for 3 s. */
  th_run_real(&loop, never_true, NULL, 3000);
  saga_node_stats so;
  saga_node_stats_get(orch, &so, sizeof so);
  uint64_t resent_down = so.resent;
  saga_node *part = tcp_node(&loop, "part", b, routes, db, &w);
  assert_int_equal(saga_node_handle(part, "work", "w.do", poison_do, NULL), SAGA_OK);
  assert_int_equal(saga_node_handle(part, "work", "w.undo", poison_undo, NULL), SAGA_OK);
  assert_int_equal(saga_node_start(part, NULL), SAGA_OK);
  assert_int_equal(th_run_real(&loop, outage_done, &w, 30000), 0);
  saga_node_stats sp;
  saga_node_stats_get(part, &sp, sizeof sp);
  saga_node_stats_get(orch, &so, sizeof so);
  int stale_rows = count_rows(orch, "SELECT count(*) FROM saga_history WHERE event = 15");
  printf("participant down 3 s, 20 sagas waiting, resend 20 ms: %" PRIu64 " resends during the "
         "outage, %" PRIu64 " commands handled, %" PRIu64 " duplicates at the participant, %"
         PRIu64 " stale replies counted, %d stale-reply history rows\n", resent_down,
         sp.handler_runs, sp.duplicates, so.stale_replies, stale_rows);
  assert_true(resent_down > 20 * 50); /* the outbox did resend, many times */
  assert_int_equal(w.terminal, 20);
  /* One copy per message waited for the peer: a few duplicates at most, not one per resend
   * of the outage (about 3,000 with a copy per resend). Once connected, a slow machine (ASan,
   * other jobs) may still see the 20 ms resends of messages in flight: a handful per saga. */
  assert_true(sp.duplicates <= 10 * 20);
  assert_true(stale_rows <= 5 * 20);
  saga_node_close(orch, poison_closed, &w);
  saga_node_close(part, poison_closed, &w);
  assert_int_equal(th_run_real(&loop, poison_closed_all, &w, 5000), 0);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  tcp_node_resend_ms = 50;
  free(da);
  free(db);
  th_rmdir(dir);
}

/* ---- a failed open leaves nothing in the loop ---------------------------------------------- */

/* Descriptors open in this process (to see a socket leak). */
static int count_fds(void) {
  int n = 0;
  for (int fd = 0; fd < 4096; fd++)
    if (fcntl(fd, F_GETFD) != -1) n++;
  return n;
}

/* Runs the loop until it has nothing left, at most `turns` times (a handle leaked active
 * would otherwise keep it running for ever). Returns what the last uv_run returned. */
static int drain_bounded(uv_loop_t *loop, int turns) {
  int alive = 1;
  for (int i = 0; i < turns && alive; i++) alive = uv_run(loop, UV_RUN_NOWAIT);
  return alive;
}

/* A socket listening on 127.0.0.1 on a port of the system's choosing; *port gets the port. */
static int occupy_port(int *port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(fd >= 0);
  struct sockaddr_in a = loopback(0);
  socklen_t len = sizeof a;
  assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
  assert_int_equal(listen(fd, 4), 0);
  assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
  *port = ntohs(a.sin_port);
  return fd;
}

static void log_into(void *arg, saga_log_level lvl, const char *msg) {
  (void)lvl;
  char *buf = arg;
  size_t used = strlen(buf);
  if (used + strlen(msg) + 2 < 2048) snprintf(buf + used, 2048 - used, "%s\n", msg);
}

/* A node whose TCP transport cannot listen (the port is taken) fails to open with the
 * reason, and leaves nothing behind: no handle in the loop (uv_loop_close succeeds), no
 * listening socket, no memory (ASan: no use after free, no leak). */
static void test_open_port_in_use(void **state) {
  int fds_before = count_fds();
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  int port;
  int busy = occupy_port(&port);
  char addr[32];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
  for (int round = 0; round < 2; round++) {
    saga_transport *t = tcp_new(addr, addr, 0, 100); /* peers (timers) and a listener */
    char log[2048] = "";
    saga_node_config nc;
    saga_node_config_init(&nc);
    nc.name = "n";
    nc.db_path = ":memory:"; /* a new database, whatever the config version */
    nc.transport = t;
    nc.log = log_into;
    nc.log_arg = log;
    saga_node *n = NULL;
    char err[256] = "";
    assert_int_equal(saga_node_open(&n, &loop, &nc, err, sizeof err), SAGA_ETRANSPORT);
    assert_null(n);
    assert_non_null(strstr(err, "failed to open"));
    assert_non_null(strstr(log, "cannot listen on"));
    assert_int_equal(drain_bounded(&loop, 1000), 0);
  }
  assert_int_equal(uv_loop_close(&loop), 0);
  close(busy);
  assert_int_equal(count_fds(), fds_before); /* no socket left open */
}

/* The transport's own contract: destroy() is safe at once after a failed open, and after a
 * close whose handles are still closing (the node's open failing after the transport
 * opened); the memory is freed once the loop ran the close callbacks, and nothing is
 * reported to the host after destroy. */
static void test_destroy_while_closing(void **state) {
  int fds_before = count_fds();
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  int port;
  int busy = occupy_port(&port);
  char addr[32], free_addr[32];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
  snprintf(free_addr, sizeof free_addr, "127.0.0.1:%d", th_free_port());
  rx R;
  memset(&R, 0, sizeof R);
  R.host = (saga__transport_host){.deliver = rx_deliver, .sent = rx_sent, .closed = rx_closed,
                                  .log = rx_log, .ctx = &R};
  /* A failed open, then destroy at once. */
  R.t = tcp_new(addr, addr, 0, 100);
  R.t->saga__host = &R.host;
  assert_int_equal(R.t->methods->open(R.t, &loop), SAGA_ETRANSPORT);
  assert_non_null(strstr(R.log, "cannot listen on"));
  R.t->methods->destroy(R.t);
  assert_int_equal(drain_bounded(&loop, 1000), 0);
  assert_int_equal(R.closed, 0); /* never reported after destroy */
  /* A failed open, then close (reported once its handles are closed), then destroy. */
  R.t = tcp_new(addr, addr, 0, 100);
  R.t->saga__host = &R.host;
  assert_int_equal(R.t->methods->open(R.t, &loop), SAGA_ETRANSPORT);
  R.t->methods->close(R.t);
  assert_int_equal(drain_bounded(&loop, 1000), 0);
  assert_int_equal(R.closed, 1);
  R.t->methods->destroy(R.t);
  R.closed = 0;
  /* A good open with a message waiting for its peer (a connection under way), then close
   * and destroy in the same breath. */
  R.t = tcp_new(free_addr, addr, 0, 100);
  R.t->saga__host = &R.host;
  assert_int_equal(R.t->methods->open(R.t, &loop), SAGA_OK);
  assert_int_equal(R.t->methods->subscribe(R.t, "ch"), SAGA_OK);
  assert_int_equal(R.t->methods->send(R.t, "ch", "x", 1, 1), SAGA_OK);
  R.t->methods->close(R.t);
  R.t->methods->destroy(R.t);
  assert_int_equal(drain_bounded(&loop, 1000), 0);
  assert_int_equal(R.closed, 0);
  assert_int_equal(uv_loop_close(&loop), 0);
  close(busy);
  assert_int_equal(count_fds(), fds_before); /* no socket left open */
}

/* ---- a listener out of memory waits and tries again ----------------------------------------- */

static int oom, oom_failed; /* the allocator below fails while oom is set, and counts it */
static void *oom_malloc(size_t n, void *ud) {
  if (!oom) return malloc(n);
  oom_failed++;
  return NULL;
}
static void *oom_realloc(void *p, size_t n, void *ud) {
  if (!oom) return realloc(p, n);
  oom_failed++;
  return NULL;
}
static int oom_hit(void *arg) { return oom_failed > 0; }
static void oom_free(void *p, void *ud) { free(p); }

static int accepted_one(void *arg) {
  saga_tcp_stats st;
  assert_int_equal(saga_tcp_stats_get(((rx *)arg)->t, &st, sizeof st), SAGA_OK);
  return st.connections_accepted >= 1;
}

/* A connection that arrives while the transport has no memory for it cannot be accepted:
 * libuv then pauses the listener until it is. The failure is logged and the accept tried
 * again, so the connection is taken once memory is back (it used to stall the listener for
 * good). */
static void test_accept_retried_after_oom(void **state) {
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  int port = th_free_port();
  char addr[32];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
  saga_allocator a = {oom_malloc, oom_realloc, oom_free, NULL};
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  cfg.insecure_plaintext = 1; /* loopback only */
  cfg.listen = addr;
  cfg.alloc = &a;
  cfg.handshake_timeout_ms = 100; /* the sweep (and so the retry) runs every 25 ms */
  saga_transport *t = NULL;
  assert_int_equal(saga_tcp_transport_new(&t, &cfg), SAGA_OK);
  rx R;
  rx_attach(&R, t, &loop, "ch");
  oom = 1;
  oom_failed = 0;
  int fd = raw_connect(port);
  assert_int_equal(th_run_real(&loop, oom_hit, NULL, 5000), 0); /* it tried to take it */
  assert_false(accepted_one(&R));
  oom = 0;
  assert_int_equal(th_run_real(&loop, accepted_one, &R, 5000), 0);
  assert_non_null(strstr(R.log, "cannot accept an inbound connection: out of memory"));
  close(fd);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- two transports on two loops in two threads ------------------------------------------ */

/* One node per thread is the threading model: transports on different loops read at the same
 * time and must share nothing. Each side sends N frames whose bytes derive from their token,
 * the other checks every byte (a read buffer shared between threads corrupted frames here). */
#define TT_N 20000
#define TT_LEN 1500

typedef struct tt_side {
  uv_loop_t loop;
  saga_transport *t;
  saga__transport_host host;
  int received, corrupt, confirmed, closed;
  char log[1024];
  int port, peer_port;
} tt_side;

static void tt_fill(uint8_t *b, uint64_t token) {
  memcpy(b, &token, sizeof token);
  for (size_t i = sizeof token; i < TT_LEN; i++) b[i] = (uint8_t)(token * 31 + i * 7);
}

static int tt_deliver(void *ctx, const char *ch, const void *d, size_t n, uint64_t tag) {
  tt_side *x = ctx;
  uint8_t expect[TT_LEN];
  uint64_t token = 0;
  if (n == TT_LEN) memcpy(&token, d, sizeof token);
  tt_fill(expect, token);
  if (n != TT_LEN || memcmp(d, expect, TT_LEN) != 0) x->corrupt++;
  x->received++;
  x->t->methods->ack(x->t, tag);
  return SAGA_OK;
}
static void tt_sent(void *ctx, uint64_t token, int status) {
  if (status == SAGA_OK) ((tt_side *)ctx)->confirmed++;
}
static void tt_closed(void *ctx) { ((tt_side *)ctx)->closed = 1; }
static void tt_log(void *ctx, saga_log_level l, const char *msg) {
  tt_side *x = ctx;
  size_t used = strlen(x->log);
  if (l >= SAGA_LOG_WARN) snprintf(x->log + used, sizeof x->log - used, "%s\n", msg);
}

static void tt_open(tt_side *x) {
  assert_int_equal(uv_loop_init(&x->loop), 0);
  char listen[32], peer[32];
  snprintf(listen, sizeof listen, "127.0.0.1:%d", x->port);
  snprintf(peer, sizeof peer, "127.0.0.1:%d", x->peer_port);
  x->t = tcp_new(listen, peer, 0, 50);
  x->host = (saga__transport_host){.deliver = tt_deliver, .sent = tt_sent, .closed = tt_closed,
                                   .log = tt_log, .ctx = x};
  x->t->saga__host = &x->host;
  assert_int_equal(x->t->methods->open(x->t, &x->loop), SAGA_OK);
  assert_int_equal(x->t->methods->subscribe(x->t, "ch"), SAGA_OK);
}

static int tt_done(void *arg) {
  tt_side *x = arg;
  return x->received >= TT_N && x->confirmed >= TT_N;
}
static int tt_is_closed(void *arg) { return ((tt_side *)arg)->closed; }

/* Runs one side on the calling thread: sends, then runs its loop until done, then closes. */
static void tt_run(void *arg) {
  tt_side *x = arg;
  uint8_t *b = malloc(TT_LEN);
  for (uint64_t k = 1; k <= TT_N; k++) {
    tt_fill(b, k);
    if (x->t->methods->send(x->t, "ch", b, TT_LEN, k) != SAGA_OK) x->corrupt += 1000000;
  }
  free(b);
  th_run_real(&x->loop, tt_done, x, 60000);
  x->t->methods->close(x->t);
  th_run_real(&x->loop, tt_is_closed, x, 5000);
  x->t->methods->destroy(x->t);
  th_drain(&x->loop);
  uv_loop_close(&x->loop);
}

static void test_two_threads(void **state) {
  static tt_side a, b;
  memset(&a, 0, sizeof a);
  memset(&b, 0, sizeof b);
  a.port = b.peer_port = th_free_port();
  b.port = a.peer_port = th_free_port();
  tt_open(&a);
  tt_open(&b);
  uv_thread_t tid;
  assert_int_equal(uv_thread_create(&tid, tt_run, &b), 0);
  tt_run(&a);
  uv_thread_join(&tid);
  printf("a: %d received, %d corrupt, %d confirmed; b: %d received, %d corrupt, %d confirmed\n",
         a.received, a.corrupt, a.confirmed, b.received, b.corrupt, b.confirmed);
  if (a.log[0] || b.log[0]) printf("a log:\n%sb log:\n%s", a.log, b.log);
  assert_int_equal(a.corrupt + b.corrupt, 0);
  assert_true(a.received >= TT_N && b.received >= TT_N);
  assert_true(a.confirmed >= TT_N && b.confirmed >= TT_N);
  assert_null(strstr(a.log, "dropping inbound"));
  assert_null(strstr(b.log, "dropping inbound"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_malformed_and_oversized),
      cmocka_unit_test(test_unserved_channel),
      cmocka_unit_test(test_double_ack_ignored),
      cmocka_unit_test(test_reconnect_and_bound),
      cmocka_unit_test(test_queue_one_copy),
      cmocka_unit_test(test_bad_config),
      cmocka_unit_test(test_open_port_in_use),
      cmocka_unit_test(test_destroy_while_closing),
      cmocka_unit_test(test_accept_retried_after_oom),
      cmocka_unit_test(test_poison_over_tcp),
      cmocka_unit_test(test_outage_one_copy),
      cmocka_unit_test(test_two_threads),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
