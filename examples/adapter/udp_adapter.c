/*
 * An example transport adapter, complete and small: messages travel as UNIX datagrams
 * between processes on one host. It shows everything an adapter does, using only
 * <saga/sys/transport.h>, and passes the conformance kit (tests/test_conformance_example.c).
 *
 * Each channel is a datagram socket path "<dir>/<channel>.sock" that its consumer binds.
 * A datagram is: 1 byte kind ('D' data, 'A' ack), 8 bytes token, then for data the sender's
 * channel (its reply address for the ack) NUL-terminated, the channel NUL-terminated and the
 * payload. The receiver acknowledges — after the node's commit — by sending 'A' + token to the
 * sender's socket. Lost datagrams are fine: the node's outbox resends until acknowledged.
 *
 * Limits of this example: payloads up to one datagram (~200 KiB by default on Linux), no
 * ordering promise, and the sender must itself consume a channel (its node name) to receive
 * acknowledgements.
 */
#include "udp_adapter.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include <saga/sys/transport.h>

typedef struct sub {
  uv_poll_t poll;
  int fd;
  char *channel;
  struct sub *next;
} sub;

typedef struct pending { /* a delivery awaiting the node's ack */
  uint64_t tag, token;
  char reply_to[108];
  struct pending *next;
} pending;

typedef struct ex_transport {
  saga_transport base; /* first: the core sees a saga_transport* */
  uv_loop_t *loop;
  char dir[80];
  char *self;          /* the first channel subscribed: where acks come back */
  sub *subs;
  pending *pending;
  uint64_t next_tag;
  int send_fd;
  int open_closes;
} ex_transport;

static void sock_path(const ex_transport *t, const char *channel, struct sockaddr_un *a) {
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  snprintf(a->sun_path, sizeof a->sun_path, "%s/%s.sock", t->dir, channel);
}

static int send_raw(ex_transport *t, const char *channel, const void *buf, size_t len) {
  struct sockaddr_un a;
  sock_path(t, channel, &a);
  ssize_t n = sendto(t->send_fd, buf, len, 0, (struct sockaddr *)&a, sizeof a);
  return n == (ssize_t)len ? SAGA_OK : SAGA_ETRANSPORT;
}

static void on_readable(uv_poll_t *h, int status, int events) {
  ex_transport *t = h->data;
  sub *s = (sub *)h;
  static char buf[1 << 18];
  ssize_t n;
  while ((n = recv(s->fd, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
    uint64_t token;
    if (n < 9) continue; /* malformed: dropped (nothing was confirmed for it) */
    memcpy(&token, buf + 1, 8);
    if (buf[0] == 'A') {
      saga_transport_sent(&t->base, token, SAGA_OK);
      continue;
    }
    const char *reply_to = buf + 9;
    const char *ch = memchr(reply_to, 0, (size_t)n - 9);
    const char *end = ch ? memchr(ch + 1, 0, (size_t)(buf + n - ch - 1)) : NULL;
    if (buf[0] != 'D' || end == NULL || (size_t)(ch - reply_to) >= sizeof(((pending *)0)->reply_to))
      continue;
    pending *p = malloc(sizeof *p);
    if (p == NULL) continue; /* not delivered, never acknowledged: the sender resends */
    p->tag = ++t->next_tag;
    p->token = token;
    memcpy(p->reply_to, reply_to, (size_t)(ch - reply_to) + 1);
    p->next = t->pending;
    t->pending = p;
    saga_transport_deliver(&t->base, ch + 1, end + 1, (size_t)(buf + n - end - 1), p->tag);
  }
}

static int ex_open(saga_transport *base, uv_loop_t *loop) {
  ex_transport *t = (ex_transport *)base;
  t->loop = loop;
  /* Non-blocking: a full receiver queue must not stall the loop; that datagram is lost and
   * the outbox resends it. */
  t->send_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  return t->send_fd >= 0 ? SAGA_OK : SAGA_ETRANSPORT;
}

static int ex_subscribe(saga_transport *base, const char *channel) {
  ex_transport *t = (ex_transport *)base;
  sub *s = calloc(1, sizeof *s);
  if (s == NULL) return SAGA_ENOMEM;
  struct sockaddr_un a;
  sock_path(t, channel, &a);
  unlink(a.sun_path); /* a restarted consumer takes its channel over */
  s->fd = socket(AF_UNIX, SOCK_DGRAM, 0);
  if (s->fd < 0 || bind(s->fd, (struct sockaddr *)&a, sizeof a) != 0) {
    if (s->fd >= 0) close(s->fd);
    free(s);
    return SAGA_ETRANSPORT;
  }
  s->channel = strdup(channel);
  if (t->self == NULL) t->self = s->channel;
  uv_poll_init(t->loop, &s->poll, s->fd);
  s->poll.data = t;
  uv_poll_start(&s->poll, UV_READABLE, on_readable);
  s->next = t->subs;
  t->subs = s;
  return SAGA_OK;
}

static int ex_send(saga_transport *base, const char *channel, const void *data, size_t len,
                   uint64_t token) {
  ex_transport *t = (ex_transport *)base;
  const char *self = t->self ? t->self : "";
  size_t a = strlen(self) + 1, c = strlen(channel) + 1, n = 9 + a + c + len;
  char *buf = malloc(n);
  if (buf == NULL) return SAGA_ENOMEM;
  buf[0] = 'D';
  memcpy(buf + 1, &token, 8);
  memcpy(buf + 9, self, a);
  memcpy(buf + 9 + a, channel, c);
  memcpy(buf + 9 + a + c, data, len);
  send_raw(t, channel, buf, n); /* failure = loss: the outbox resends */
  free(buf);
  return SAGA_OK;
}

static void ex_ack(saga_transport *base, uint64_t tag) {
  ex_transport *t = (ex_transport *)base;
  for (pending **pp = &t->pending; *pp != NULL; pp = &(*pp)->next) {
    pending *p = *pp;
    if (p->tag != tag) continue;
    char msg[9] = {'A'};
    memcpy(msg + 1, &p->token, 8);
    send_raw(t, p->reply_to, msg, sizeof msg);
    *pp = p->next;
    free(p);
    return;
  }
}

static void on_poll_closed(uv_handle_t *h) {
  ex_transport *t = h->data;
  if (--t->open_closes == 0) saga_transport_closed(&t->base);
}

static void ex_close(saga_transport *base) {
  ex_transport *t = (ex_transport *)base;
  t->open_closes = 1; /* held until every poll is closing */
  for (sub *s = t->subs; s != NULL; s = s->next) {
    t->open_closes++;
    uv_close((uv_handle_t *)&s->poll, on_poll_closed);
  }
  if (--t->open_closes == 0) saga_transport_closed(&t->base);
}

static void ex_destroy(saga_transport *base) {
  ex_transport *t = (ex_transport *)base;
  while (t->subs != NULL) {
    sub *s = t->subs;
    t->subs = s->next;
    close(s->fd);
    free(s->channel);
    free(s);
  }
  while (t->pending != NULL) {
    pending *p = t->pending;
    t->pending = p->next;
    free(p);
  }
  if (t->send_fd >= 0) close(t->send_fd);
  free(t);
}

/* Designated initializers: methods appended by later interface versions stay NULL (here
 * can_send: this adapter can reach every channel). */
static const saga_transport_methods ex_methods = {
    .version = SAGA_TRANSPORT_VERSION,
    .name = "example-udp",
    .open = ex_open,
    .subscribe = ex_subscribe,
    .send = ex_send,
    .ack = ex_ack,
    .close = ex_close,
    .destroy = ex_destroy,
};

int example_udp_transport_new(saga_transport **out, const char *dir) {
  if (out == NULL || dir == NULL || strlen(dir) > 60) return SAGA_EINVAL;
  ex_transport *t = calloc(1, sizeof *t);
  if (t == NULL) return SAGA_ENOMEM;
  t->base.methods = &ex_methods;
  t->send_fd = -1;
  snprintf(t->dir, sizeof t->dir, "%s", dir);
  *out = &t->base;
  return SAGA_OK;
}
