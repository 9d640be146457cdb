/* The TCP transport against hostile peers: mutual TLS and the access list refuse strangers,
 * forged confirmations are ignored, hostile frames cannot make it allocate, connection caps
 * and deadlines hold. Each check here was seen to fail with the guard it tests taken out. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/resource.h>

#include "servers.h"
#include "transport/tcp_frame.h"
#include "tcp_rx.h"

static char *pki;   /* CA "ca" with orch, pay, mallory */
static char *other; /* another CA, with its own "orch" */

static int make_pki(void **state) {
  char cmd[1024];
  pki = th_tmpdir();
  other = th_tmpdir();
  snprintf(cmd, sizeof cmd, "bash '%s/scripts/make_pki.sh' '%s' orch pay mallory && "
           "bash '%s/scripts/make_pki.sh' '%s' orch", SAGA_SOURCE_DIR, pki, SAGA_SOURCE_DIR, other);
  return system(cmd) == 0 ? 0 : -1;
}

static int remove_pki(void **state) {
  th_rmdir(pki);
  th_rmdir(other);
  return 0;
}

static char *addr_of(int port) {
  static char buf[4][32];
  static int i;
  i = (i + 1) % 4;
  snprintf(buf[i], sizeof buf[i], "127.0.0.1:%d", port);
  return buf[i];
}

typedef struct opts {
  const char *dir;           /* the PKI of its certificate and CA (NULL: plaintext) */
  const char *name;          /* its certificate */
  const char *listen;
  const char *route_addr;    /* "ch" and "replies" go there */
  const char *route_identity;
  const saga_tcp_allow *allow;
  size_t nallow;
  uint32_t max_conns, handshake_ms, idle_ms;
  size_t max_reply_queue;
  const saga_allocator *alloc;
} opts;

static saga_transport *make(const opts *o) {
  char ca[512], cert[512], key[512], err[256];
  saga_tcp_route routes[] = {{"ch", o->route_addr, o->route_identity},
                             {"replies", o->route_addr, o->route_identity}};
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  if (o->dir != NULL) {
    snprintf(ca, sizeof ca, "%s/ca.pem", o->dir);
    snprintf(cert, sizeof cert, "%s/%s.pem", o->dir, o->name);
    snprintf(key, sizeof key, "%s/%s.key", o->dir, o->name);
    cfg.tls_ca_file = ca;
    cfg.tls_cert_file = cert;
    cfg.tls_key_file = key;
  } else {
    cfg.insecure_plaintext = 1; /* loopback only */
  }
  cfg.listen = o->listen;
  cfg.routes = o->route_addr != NULL ? routes : NULL;
  cfg.nroutes = o->route_addr != NULL ? 2 : 0;
  cfg.allow = o->allow;
  cfg.nallow = o->nallow;
  cfg.reconnect_min_ms = 10;
  cfg.reconnect_max_ms = 100;
  if (o->max_conns) cfg.max_connections = cfg.max_connections_per_ip = o->max_conns;
  if (o->handshake_ms) cfg.handshake_timeout_ms = o->handshake_ms;
  if (o->idle_ms) cfg.idle_timeout_ms = o->idle_ms;
  if (o->max_reply_queue) cfg.max_reply_queue_bytes = o->max_reply_queue;
  cfg.alloc = o->alloc;
  saga_transport *t = NULL;
  int rc = saga_tcp_transport_new2(&t, &cfg, err, sizeof err);
  if (rc != SAGA_OK) fail_msg("saga_tcp_transport_new2: %s (%d)", err, rc);
  return t;
}

static saga_tcp_stats stats(rx *r) {
  saga_tcp_stats s;
  assert_int_equal(saga_tcp_stats_get(r->t, &s, sizeof s), SAGA_OK);
  return s;
}

typedef struct statwant {
  rx *r;
  size_t offset; /* of a uint64_t field in saga_tcp_stats */
  uint64_t at_least;
} statwant;

static int stat_reached(void *arg) {
  statwant *w = arg;
  saga_tcp_stats s = stats(w->r);
  uint64_t v;
  memcpy(&v, (const char *)&s + w->offset, sizeof v);
  return v >= w->at_least;
}

#define WAIT_STAT(loop, r, field, n)                                                        \
  do {                                                                                      \
    statwant sw_ = {(r), offsetof(saga_tcp_stats, field), (n)};                             \
    assert_int_equal(th_run_real((loop), stat_reached, &sw_, 10000), 0);                    \
  } while (0)

/* Waits until the raw socket fd is closed by the other end (EOF or reset). */
typedef struct fdwait {
  int fd;
} fdwait;

static int fd_closed(void *arg) {
  char buf[4096];
  for (;;) {
    ssize_t n = recv(((fdwait *)arg)->fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n == 0) return 1;
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : 1;
  }
}

static void write_all(int fd, const void *p, size_t n) {
  assert_int_equal(write(fd, p, n), (ssize_t)n);
}

/* A well-formed DATA frame, as a legitimate sender would write it. */
static size_t data_frame(unsigned char *out, uint64_t token, const char *channel,
                         const char *payload) {
  saga__tcp_frame f = {SAGA_TCP_DATA, token, channel, strlen(channel), payload, strlen(payload)};
  saga__tcp_frame_encode(&f, out);
  return saga__tcp_frame_size(&f);
}

static const saga_tcp_allow acl[] = {{"orch", "ch"}, {"pay", "replies"}};

/* ---- the frame codec -------------------------------------------------------------------- */

static void test_frame_codec(void **state) {
  static unsigned char buf[70000 + 64];
  static char payload[70000];
  memset(payload, 'p', sizeof payload);
  size_t sizes[] = {0, 1, 31, 32, 255, 256, 65535, 65536, 70000};
  for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
    uint64_t token = (uint64_t)1 << (i * 7);
    saga__tcp_frame f = {SAGA_TCP_DATA, token, "channel", 7, payload, sizes[i]}, g;
    saga__tcp_frame_encode(&f, buf);
    size_t n = saga__tcp_frame_size(&f);
    assert_null(saga__tcp_frame_decode(buf + 4, n - 4, &g));
    assert_int_equal(g.kind, SAGA_TCP_DATA);
    assert_true(g.token == token);
    assert_int_equal(g.payload_len, sizes[i]);
    assert_memory_equal(g.channel, "channel", 7);
    /* Every truncation is refused, never read past. */
    for (size_t cut = 0; cut < n - 4 && cut < 64; cut++)
      assert_non_null(saga__tcp_frame_decode(buf + 4, cut, &g));
  }
  saga__tcp_frame nack = {SAGA_TCP_NACK, 5, NULL, 0, "why", 3}, g;
  saga__tcp_frame_encode(&nack, buf);
  assert_null(saga__tcp_frame_decode(buf + 4, saga__tcp_frame_size(&nack) - 4, &g));
  assert_int_equal(g.kind, SAGA_TCP_NACK);
  assert_memory_equal(g.payload, "why", 3);
  /* Hostile bodies: an array32 of 2^28 elements (msgpack-c would allocate gigabytes), a map
   * of 2^31 entries, deep nesting, a channel with a NUL, a string longer than the body. */
  static const unsigned char huge_array[] = {0xdd, 0x10, 0x00, 0x00, 0x00};
  static const unsigned char huge_map[] = {0xdf, 0x80, 0x00, 0x00, 0x00};
  static const unsigned char nested[] = {0x94, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91};
  static const unsigned char nul[] = {0x94, 0x01, 0x01, 0xa2, 'a', 0x00, 0xc4, 0x00};
  static const unsigned char longstr[] = {0x94, 0x01, 0x01, 0xdb, 0xff, 0xff, 0xff, 0xff, 'a'};
  static const unsigned char trailing[] = {0x92, 0x02, 0x01, 0x00};
  assert_non_null(saga__tcp_frame_decode(huge_array, sizeof huge_array, &g));
  assert_non_null(saga__tcp_frame_decode(huge_map, sizeof huge_map, &g));
  assert_non_null(saga__tcp_frame_decode(nested, sizeof nested, &g));
  assert_non_null(saga__tcp_frame_decode(nul, sizeof nul, &g));
  assert_non_null(saga__tcp_frame_decode(longstr, sizeof longstr, &g));
  assert_non_null(saga__tcp_frame_decode(trailing, sizeof trailing, &g));
}

/* ---- hostile frames: bounded memory ------------------------------------------------------- */

typedef struct counting {
  size_t now, peak;
} counting;

static void *c_malloc(size_t n, void *ud) {
  counting *c = ud;
  size_t *p = malloc(n + sizeof(size_t) * 2);
  if (p == NULL) return NULL;
  *p = n;
  c->now += n;
  if (c->now > c->peak) c->peak = c->now;
  return p + 2;
}
static void c_free(void *q, void *ud) {
  if (q == NULL) return;
  counting *c = ud;
  size_t *p = (size_t *)q - 2;
  c->now -= *p;
  free(p);
}
static void *c_realloc(void *q, size_t n, void *ud) {
  void *r = c_malloc(n, ud);
  if (r != NULL && q != NULL) {
    size_t old = ((size_t *)q)[-2];
    memcpy(r, q, old < n ? old : n);
    c_free(q, ud);
  }
  return r;
}

/* The 5-byte body that asks for 8 GiB, a map declaring 2^31 entries and nesting beyond any
 * limit each close their connection; what the transport allocates stays small. */
static void test_hostile_frames_bounded(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  counting acc = {0, 0};
  saga_allocator a = {c_malloc, c_realloc, c_free, &acc};
  int port = th_free_port();
  opts o = {.listen = addr_of(port), .alloc = &a};
  rx R;
  rx_attach(&R, make(&o), &loop, "ch");
  static const unsigned char frames[][13] = {
      {0, 0, 0, 5, 0xdd, 0x10, 0x00, 0x00, 0x00},
      {0, 0, 0, 5, 0xdf, 0x80, 0x00, 0x00, 0x00},
      {0, 0, 0, 9, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91},
  };
  static const size_t lens[] = {9, 9, 13};
  size_t base = acc.now;
  for (int i = 0; i < 3; i++) {
    int fd = raw_connect(port);
    write_all(fd, frames[i], lens[i]);
    WAIT_STAT(&loop, &R, frames_malformed, (uint64_t)i + 1);
    fdwait fw = {fd};
    assert_int_equal(th_run_real(&loop, fd_closed, &fw, 5000), 0);
    close(fd);
  }
  assert_int_equal(R.delivered, 0);
  printf("transport memory: %zu bytes before, peak %zu\n", base, acc.peak);
  assert_true(acc.peak < 256 * 1024);
  rx_close(&R, &loop);
  assert_int_equal(acc.now, 0);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- acknowledgements bound to what was sent ---------------------------------------------- */

/* A receiver that answers with ACKs for tokens it never got (another peer's, and invented
 * ones) confirms nothing but its own; the other peer's message is still delivered later. */
static void test_forged_ack(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  int pa = th_free_port(), pb = th_free_port();
  /* The attacker: a plain listening socket at the address of channel "ch". */
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa = loopback(pa);
  assert_int_equal(bind(ls, (struct sockaddr *)&sa, sizeof sa), 0);
  assert_int_equal(listen(ls, 4), 0);
  saga_tcp_route routes[] = {{"ch", addr_of(pa), NULL}, {"other", addr_of(pb), NULL}};
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  cfg.insecure_plaintext = 1; /* loopback only */
  cfg.routes = routes;
  cfg.nroutes = 2;
  cfg.reconnect_min_ms = 10;
  cfg.reconnect_max_ms = 50;
  saga_transport *t = NULL;
  assert_int_equal(saga_tcp_transport_new(&t, &cfg), SAGA_OK);
  rx S;
  rx_attach(&S, t, &loop, NULL);
  assert_int_equal(t->methods->send(t, "other", "for-b", 5, 2), SAGA_OK); /* b is down */
  assert_int_equal(t->methods->send(t, "ch", "for-a", 5, 1), SAGA_OK);
  logwant lw = {&S, "connected to"};
  assert_int_equal(th_run_real(&loop, log_contains, &lw, 5000), 0);
  int fd = accept(ls, NULL, NULL);
  assert_true(fd >= 0);
  unsigned char acks[3][8];
  size_t n = 0;
  uint64_t forged[] = {2, 999, 1};
  for (int i = 0; i < 3; i++) {
    saga__tcp_frame f = {SAGA_TCP_ACK, forged[i], NULL, 0, NULL, 0};
    saga__tcp_frame_encode(&f, acks[i]);
    n = saga__tcp_frame_size(&f);
    write_all(fd, acks[i], n);
  }
  want w = {&S, 0, 1, 0};
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  WAIT_STAT(&loop, &S, acks_ignored, 2);
  assert_int_equal(S.nsent, 1);
  assert_true(S.sent[0] == 1);
  /* b comes up: its message is delivered, and confirmed by b alone. */
  rx B;
  opts ob = {.listen = addr_of(pb)};
  rx_attach(&B, make(&ob), &loop, "other");
  B.auto_ack = 1;
  want wb = {&B, 1, 0, 0};
  assert_int_equal(th_run_real(&loop, reached, &wb, 5000), 0);
  assert_string_equal(B.last, "for-b");
  want ws = {&S, 0, 2, 0};
  assert_int_equal(th_run_real(&loop, reached, &ws, 5000), 0);
  assert_true(S.sent[1] == 2);
  close(fd);
  close(ls);
  rx_close(&S, &loop);
  rx_close(&B, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- mutual TLS and the access list -------------------------------------------------------- */

/* A sender the access list allows gets through over TLS, and is confirmed. */
static void test_tls_roundtrip(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  int port = th_free_port();
  opts orx = {.dir = pki, .name = "pay", .listen = addr_of(port), .allow = acl, .nallow = 2};
  opts otx = {.dir = pki, .name = "orch", .route_addr = addr_of(port), .route_identity = "pay"};
  rx R, S;
  rx_attach(&R, make(&orx), &loop, "ch");
  rx_attach(&S, make(&otx), &loop, NULL);
  R.auto_ack = 1;
  assert_int_equal(S.t->methods->send(S.t, "ch", "hello", 5, 41), SAGA_OK);
  want w = {&S, 0, 1, 0};
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  assert_int_equal(R.delivered, 1);
  assert_string_equal(R.last, "hello");
  assert_true(S.sent[0] == 41);
  assert_non_null(strstr(S.log, "TLS, peer 'pay'"));
  rx_close(&S, &loop);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* Each stranger sends a well-formed command: none is delivered, each connection is closed,
 * each refusal is counted. Then a legitimate sender still gets through. */
static void test_tls_strangers_refused(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  int port = th_free_port();
  opts orx = {.dir = pki, .name = "pay", .listen = addr_of(port), .allow = acl, .nallow = 2};
  rx R;
  rx_attach(&R, make(&orx), &loop, "ch");
  assert_int_equal(R.t->methods->subscribe(R.t, "replies"), SAGA_OK);
  /* 1. No TLS at all: a plaintext frame where the ClientHello should be. */
  unsigned char frame[128];
  size_t n = data_frame(frame, 1, "ch", "charge 4999");
  int fd = raw_connect(port);
  write_all(fd, frame, n);
  WAIT_STAT(&loop, &R, handshakes_failed, 1);
  fdwait fw = {fd};
  assert_int_equal(th_run_real(&loop, fd_closed, &fw, 5000), 0);
  close(fd);
  /* 2. A certificate from another CA, though it says "orch". */
  opts o2 = {.dir = other, .name = "orch", .route_addr = addr_of(port)};
  rx S2;
  rx_attach(&S2, make(&o2), &loop, NULL);
  assert_int_equal(S2.t->methods->send(S2.t, "ch", "charge 4999", 11, 2), SAGA_OK);
  WAIT_STAT(&loop, &R, handshakes_failed, 2);
  WAIT_STAT(&loop, &S2, handshakes_failed, 1);
  /* 3. Signed by the right CA, but not on the access list for "ch" ("pay" may only send
   *    replies), and "mallory" not at all: both a forged command and a forged reply. */
  opts o3 = {.dir = pki, .name = "pay", .route_addr = addr_of(port)};
  rx S3;
  rx_attach(&S3, make(&o3), &loop, NULL);
  assert_int_equal(S3.t->methods->send(S3.t, "ch", "charge 4999", 11, 3), SAGA_OK);
  WAIT_STAT(&loop, &R, frames_refused, 1);
  logwant lw3 = {&S3, "connection to"};
  assert_int_equal(th_run_real(&loop, log_contains, &lw3, 5000), 0);
  opts o4 = {.dir = pki, .name = "mallory", .route_addr = addr_of(port)};
  rx S4;
  rx_attach(&S4, make(&o4), &loop, NULL);
  assert_int_equal(S4.t->methods->send(S4.t, "replies", "ok, paid", 8, 4), SAGA_OK);
  WAIT_STAT(&loop, &R, frames_refused, 2);
  assert_non_null(strstr(R.log, "does not let it send to channel 'replies'"));
  assert_int_equal(R.delivered, 0);
  assert_int_equal(S2.nsent + S3.nsent + S4.nsent, 0);
  /* The legitimate sender. */
  opts ok = {.dir = pki, .name = "orch", .route_addr = addr_of(port), .route_identity = "pay"};
  rx S;
  rx_attach(&S, make(&ok), &loop, NULL);
  assert_int_equal(S.t->methods->send(S.t, "ch", "charge 10", 9, 5), SAGA_OK);
  want w = {&R, 1, 0, 0};
  assert_int_equal(th_run_real(&loop, reached, &w, 5000), 0);
  assert_string_equal(R.last, "charge 10");
  assert_int_equal(R.delivered, 1);
  rx_close(&S, &loop);
  rx_close(&S2, &loop);
  rx_close(&S3, &loop);
  rx_close(&S4, &loop);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* A sender checks the receiver's identity: a route naming "orch" refuses a server that
 * proves "pay", and nothing is sent. */
static void test_tls_server_identity(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  int port = th_free_port();
  opts orx = {.dir = pki, .name = "pay", .listen = addr_of(port), .allow = acl, .nallow = 2};
  opts otx = {.dir = pki, .name = "orch", .route_addr = addr_of(port), .route_identity = "orch"};
  rx R, S;
  rx_attach(&R, make(&orx), &loop, "ch");
  rx_attach(&S, make(&otx), &loop, NULL);
  assert_int_equal(S.t->methods->send(S.t, "ch", "secret", 6, 1), SAGA_OK);
  WAIT_STAT(&loop, &S, handshakes_failed, 1);
  assert_non_null(strstr(S.log, "certificate"));
  assert_int_equal(R.delivered, 0);
  rx_close(&S, &loop);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* Bad TLS settings are refused when the transport is made, with the reason. */
static void test_tls_bad_config(void **state) {
  saga_transport *t = NULL;
  char err[256], cert[512];
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  cfg.listen = "127.0.0.1:0";
  assert_int_equal(saga_tcp_transport_new2(&t, &cfg, err, sizeof err), SAGA_EINVAL);
  assert_non_null(strstr(err, "insecure_plaintext"));
  snprintf(cert, sizeof cert, "%s/orch.pem", pki);
  char key[512], ca[512];
  snprintf(key, sizeof key, "%s/pay.key", pki);
  snprintf(ca, sizeof ca, "%s/ca.pem", pki);
  cfg.tls_ca_file = ca;
  cfg.tls_cert_file = cert;
  cfg.tls_key_file = key;
  assert_int_equal(saga_tcp_transport_new2(&t, &cfg, err, sizeof err), SAGA_EINVAL);
  assert_non_null(strstr(err, "tls_key_file"));
  cfg.tls_ca_file = "/nonexistent/ca.pem";
  assert_int_equal(saga_tcp_transport_new2(&t, &cfg, err, sizeof err), SAGA_EINVAL);
  assert_non_null(strstr(err, "tls_ca_file"));
  cfg.struct_version = 1;
  assert_int_equal(saga_tcp_transport_new2(&t, &cfg, err, sizeof err), SAGA_EVERSION);
}

/* ---- bounded resources per peer --------------------------------------------------------- */

/* 2,000 connections that never start TLS: never more than the cap are open, and a
 * legitimate peer still gets through (a stranger gives way to a newcomer). */
static void test_connection_flood(void **state) {
  struct rlimit rl;
  getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  int total = 2000;
  if (rl.rlim_cur < (rlim_t)total + 200) total = (int)rl.rlim_cur - 200;
  uv_loop_t loop;
  uv_loop_init(&loop);
  int port = th_free_port();
  opts orx = {.dir = pki, .name = "pay", .listen = addr_of(port), .allow = acl, .nallow = 2,
              .max_conns = 32, .handshake_ms = 60000};
  rx R;
  rx_attach(&R, make(&orx), &loop, "ch");
  int *fds = malloc(sizeof(int) * (size_t)total);
  for (int i = 0; i < total; i += 50) {
    for (int j = i; j < i + 50 && j < total; j++) fds[j] = raw_connect(port);
    WAIT_STAT(&loop, &R, connections_accepted, (uint64_t)(i + 50 < total ? i + 50 : total));
  }
  saga_tcp_stats s = stats(&R);
  printf("%d connections: %llu accepted, %llu gave way or refused\n", total,
         (unsigned long long)s.connections_accepted, (unsigned long long)s.connections_refused);
  assert_true(s.connections_accepted - s.connections_refused <= 32);
  opts ok = {.dir = pki, .name = "orch", .route_addr = addr_of(port), .route_identity = "pay"};
  rx S;
  rx_attach(&S, make(&ok), &loop, NULL);
  assert_int_equal(S.t->methods->send(S.t, "ch", "legit", 5, 1), SAGA_OK);
  want w = {&R, 1, 0, 0};
  assert_int_equal(th_run_real(&loop, reached, &w, 10000), 0);
  for (int i = 0; i < total; i++) close(fds[i]);
  free(fds);
  rx_close(&S, &loop);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* A connection that never finishes its handshake, and one that stays idle, are closed. */
static void test_deadlines(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  int pt = th_free_port(), pp = th_free_port();
  opts otls = {.dir = pki, .name = "pay", .listen = addr_of(pt), .allow = acl, .nallow = 2,
               .handshake_ms = 100};
  opts oplain = {.listen = addr_of(pp), .idle_ms = 100};
  rx T, P;
  rx_attach(&T, make(&otls), &loop, "ch");
  rx_attach(&P, make(&oplain), &loop, "ch");
  int f1 = raw_connect(pt), f2 = raw_connect(pp);
  WAIT_STAT(&loop, &T, handshakes_failed, 1);
  WAIT_STAT(&loop, &P, idle_closed, 1);
  fdwait w1 = {f1}, w2 = {f2};
  assert_int_equal(th_run_real(&loop, fd_closed, &w1, 5000), 0);
  assert_int_equal(th_run_real(&loop, fd_closed, &w2, 5000), 0);
  close(f1);
  close(f2);
  rx_close(&T, &loop);
  rx_close(&P, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

static void small_rcvbuf(int fd) {
  int small = 4096;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
}

/* A sender that never reads its acknowledgements is disconnected once they pile up. */
static void test_slow_reader(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  int port = th_free_port();
  opts o = {.listen = addr_of(port), .max_reply_queue = 4096};
  rx R;
  rx_attach(&R, make(&o), &loop, "ch");
  R.auto_ack = 1;
  int fd = raw_connect_with(port, small_rcvbuf);
  fcntl(fd, F_SETFL, O_NONBLOCK);
  static unsigned char batch[64 * 1024];
  size_t len = 0;
  uint64_t token = 1;
  while (len + 32 < sizeof batch) len += data_frame(batch + len, token++, "ch", "");
  int dropped = 0;
  for (int round = 0; round < 20000 && !dropped; round++) {
    ssize_t n = send(fd, batch, len, MSG_NOSIGNAL);
    /* A partial write would split a frame: resend the rest so the stream stays valid. */
    size_t off = n > 0 ? (size_t)n : 0;
    while (n >= 0 && off < len && !dropped) {
      uv_run(&loop, UV_RUN_NOWAIT);
      n = send(fd, batch + off, len - off, MSG_NOSIGNAL);
      if (n > 0) off += (size_t)n;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) n = 0;
      dropped = stats(&R).slow_readers_dropped > 0;
    }
    if (n < 0) break; /* the connection was dropped */
    uv_run(&loop, UV_RUN_NOWAIT);
    dropped = stats(&R).slow_readers_dropped > 0;
  }
  WAIT_STAT(&loop, &R, slow_readers_dropped, 1);
  printf("%d messages delivered before the drop\n", R.delivered);
  assert_true(R.delivered > 0);
  assert_non_null(strstr(R.log, "not reading its acknowledgements"));
  close(fd);
  rx_close(&R, &loop);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_frame_codec),
      cmocka_unit_test(test_hostile_frames_bounded),
      cmocka_unit_test(test_forged_ack),
      cmocka_unit_test(test_tls_roundtrip),
      cmocka_unit_test(test_tls_strangers_refused),
      cmocka_unit_test(test_tls_server_identity),
      cmocka_unit_test(test_tls_bad_config),
      cmocka_unit_test(test_connection_flood),
      cmocka_unit_test(test_deadlines),
      cmocka_unit_test(test_slow_reader),
  };
  return cmocka_run_group_tests(tests, make_pki, remove_pki);
}
