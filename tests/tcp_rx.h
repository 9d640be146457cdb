/* Shared by the TCP transport tests: a transport driven directly (no node), recording what it
 * delivers, confirms and logs. Each test file includes it once. */
#ifndef TCP_RX_H
#define TCP_RX_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"
#include "saga/transport_tcp.h"

typedef struct rx {
  saga_transport *t;
  saga__transport_host host;
  int delivered, closed;
  int auto_ack; /* acknowledge every delivery at once, from inside deliver */
  char last[64];
  uint64_t last_tag;
  uint64_t sent[64];
  int nsent, sent_errors;
  char log[4096];
} rx;

static inline int rx_deliver(void *ctx, const char *ch, const void *d, size_t n, uint64_t tag) {
  rx *r = ctx;
  r->delivered++;
  snprintf(r->last, sizeof r->last, "%.*s", (int)n, (const char *)d);
  r->last_tag = tag;
  if (r->auto_ack) r->t->methods->ack(r->t, tag);
  return SAGA_OK;
}
static inline void rx_sent(void *ctx, uint64_t token, int status) {
  rx *r = ctx;
  if (status == SAGA_OK && r->nsent < 64)
    r->sent[r->nsent++] = token;
  else if (status != SAGA_OK)
    r->sent_errors++;
}
static inline void rx_closed(void *ctx) { ((rx *)ctx)->closed++; }
static inline void rx_log(void *ctx, saga_log_level l, const char *msg) {
  rx *r = ctx;
  size_t used = strlen(r->log);
  if (used + strlen(msg) + 2 >= sizeof r->log) used = 0; /* keep the latest lines */
  snprintf(r->log + used, sizeof r->log - used, "%s\n", msg);
}

/* Hooks t to r and opens it on loop, subscribed to `channel` (NULL: none). */
static inline void rx_attach(rx *r, saga_transport *t, uv_loop_t *loop, const char *channel) {
  memset(r, 0, sizeof *r);
  r->t = t;
  r->host = (saga__transport_host){.deliver = rx_deliver, .sent = rx_sent, .closed = rx_closed,
                                   .log = rx_log, .ctx = r};
  r->t->saga__host = &r->host;
  assert_int_equal(r->t->methods->open(r->t, loop), SAGA_OK);
  if (channel != NULL) assert_int_equal(r->t->methods->subscribe(r->t, channel), SAGA_OK);
}

static inline int rx_is_closed(void *arg) { return ((rx *)arg)->closed > 0; }

static inline void rx_close(rx *r, uv_loop_t *loop) {
  r->t->methods->close(r->t);
  assert_int_equal(th_run_real(loop, rx_is_closed, r, 5000), 0);
  r->t->methods->destroy(r->t);
}

typedef struct want {
  rx *r;
  int delivered;
  int nsent;
  int sent_errors;
} want;

static inline int reached(void *arg) {
  want *w = arg;
  return w->r->delivered >= w->delivered && w->r->nsent >= w->nsent &&
         w->r->sent_errors >= w->sent_errors;
}

/* A log line containing `text` was written. */
typedef struct logwant {
  rx *r;
  const char *text;
} logwant;

static inline int log_contains(void *arg) {
  logwant *w = arg;
  return strstr(w->r->log, w->text) != NULL;
}

/* 127.0.0.1:port */
static inline struct sockaddr_in loopback(int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons((uint16_t)port);
  return a;
}

/* A blocking socket connected to 127.0.0.1:port; fd_setup (if not NULL) runs before connect. */
static inline int raw_connect_with(int port, void (*fd_setup)(int fd)) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = loopback(port);
  if (fd_setup != NULL) fd_setup(fd);
  assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
  return fd;
}

static inline int raw_connect(int port) { return raw_connect_with(port, NULL); }

#endif /* TCP_RX_H */
