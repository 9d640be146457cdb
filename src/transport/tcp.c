/*
 * The TCP transport (include/saga/transport_tcp.h): brokerless, on libuv, written only
 * against the public adapter interface.
 *
 * Wire format: every frame is a 4-byte big-endian length followed by that many bytes of
 * msgpack:  DATA [1, token, channel, payload(bin)]  sender -> receiver
 *           ACK  [2, token]                          receiver -> sender, after its commit
 *           NACK [3, token, reason]                  receiver -> sender, channel not served
 * A node sends on connections it opens to the address of each route (one per address) and
 * receives on the connections its listener accepts. Acknowledgements travel back on the
 * connection the message came on; a connection that drops takes its unacknowledged messages
 * with it, and the sender's outbox resends them.
 */
#include <msgpack.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "saga/sys/transport.h"
#include "saga/transport_tcp.h"

enum { F_DATA = 1, F_ACK = 2, F_NACK = 3 };
enum { P_IDLE, P_CONNECTING, P_CONNECTED, P_BACKOFF };

typedef struct tcp_tr tcp_tr;

typedef struct frame {
  uv_write_t req;
  tcp_tr *t;
  struct frame *next; /* in a peer's queue while not yet written */
  size_t len;
  char data[];
} frame;

typedef struct peer {
  tcp_tr *tr;
  char *address;
  struct sockaddr_storage addr;
  uv_tcp_t *conn;       /* heap: its close completes after the peer may have moved on */
  uv_connect_t connect_req;
  uv_timer_t timer;     /* reconnect backoff */
  int state;
  uint32_t backoff_ms;
  frame *head, *tail;   /* waiting for a connection */
  size_t queued_bytes;
  char *rbuf;           /* incoming ACK/NACK frames */
  size_t rlen, rcap;
} peer;

typedef struct conn {
  uv_tcp_t handle;
  tcp_tr *tr;
  uint32_t id;
  struct conn *next;
  char *rbuf;
  size_t rlen, rcap;
  uint64_t *tokens;     /* slot -> token of a delivery awaiting ack */
  uint32_t *free_slots;
  size_t nslots, nfree;
  int closing;
} conn;

typedef struct route {
  char *channel;
  peer *peer;
} route;

struct tcp_tr {
  saga_transport base;
  saga_allocator alloc;
  uv_loop_t *loop;
  char *listen;
  struct sockaddr_storage listen_addr;
  uv_tcp_t listener;
  int listening;
  route *routes;
  size_t nroutes;
  peer **peers;
  size_t npeers;
  char **subs;
  size_t nsubs;
  conn *conns;
  uint32_t next_conn_id;
  size_t max_frame, max_queued;
  uint32_t backoff_min, backoff_max;
  int closing, pending_closes, closed_reported;
};

/* ---- memory ------------------------------------------------------------------------------ */

static void *tr_malloc(tcp_tr *t, size_t n) { return t->alloc.malloc(n ? n : 1, t->alloc.ud); }
static void *tr_realloc(tcp_tr *t, void *p, size_t n) {
  return t->alloc.realloc(p, n ? n : 1, t->alloc.ud);
}
static void tr_free(tcp_tr *t, void *p) {
  if (p != NULL) t->alloc.free(p, t->alloc.ud);
}
static char *tr_strdup(tcp_tr *t, const char *s) {
  size_t n = strlen(s) + 1;
  char *p = tr_malloc(t, n);
  if (p != NULL) memcpy(p, s, n);
  return p;
}

static void *libc_malloc(size_t n, void *ud) {
  (void)ud;
  return malloc(n);
}
static void *libc_realloc(void *p, size_t n, void *ud) {
  (void)ud;
  return realloc(p, n);
}
static void libc_free(void *p, void *ud) {
  (void)ud;
  free(p);
}

static void logf_(tcp_tr *t, saga_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void logf_(tcp_tr *t, saga_log_level lvl, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  saga_transport_log(&t->base, lvl, buf);
}

/* ---- addresses ---------------------------------------------------------------------------- */

/* "host:port" or "[v6]:port"; numeric hosts and "localhost". */
static int parse_address(const char *s, struct sockaddr_storage *out) {
  char host[128];
  const char *colon;
  if (s == NULL) return SAGA_EINVAL;
  if (s[0] == '[') {
    const char *end = strchr(s, ']');
    if (end == NULL || end[1] != ':' || (size_t)(end - s - 1) >= sizeof host) return SAGA_EINVAL;
    memcpy(host, s + 1, (size_t)(end - s - 1));
    host[end - s - 1] = '\0';
    colon = end + 1;
  } else {
    colon = strrchr(s, ':');
    if (colon == NULL || (size_t)(colon - s) >= sizeof host) return SAGA_EINVAL;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
  }
  char *endp;
  long port = strtol(colon + 1, &endp, 10);
  if (*endp != '\0' || port < 0 || port > 65535 || colon[1] == '\0') return SAGA_EINVAL;
  if (strcmp(host, "localhost") == 0) snprintf(host, sizeof host, "127.0.0.1");
  memset(out, 0, sizeof *out);
  if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)out) == 0) return SAGA_OK;
  if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)out) == 0) return SAGA_OK;
  return SAGA_EINVAL;
}

/* ---- frames ------------------------------------------------------------------------------- */

typedef struct fbuf {
  tcp_tr *t;
  char *data;
  size_t len, cap;
  int oom;
} fbuf;

static int fbuf_write(void *data, const char *buf, size_t len) {
  fbuf *b = data;
  if (b->len + len > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + len) cap *= 2;
    char *p = tr_realloc(b->t, b->data, cap);
    if (p == NULL) {
      b->oom = 1;
      return -1;
    }
    b->data = p;
    b->cap = cap;
  }
  memcpy(b->data + b->len, buf, len);
  b->len += len;
  return 0;
}

/* Builds a frame: kind, token, and for DATA the channel and payload, for NACK a reason. */
static frame *make_frame(tcp_tr *t, int kind, uint64_t token, const char *channel,
                         const void *payload, size_t plen) {
  fbuf b = {t, NULL, 0, 0, 0};
  static const char zero4[4] = {0, 0, 0, 0};
  fbuf_write(&b, zero4, 4);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &b, fbuf_write);
  msgpack_pack_array(&pk, kind == F_ACK ? 2 : kind == F_NACK ? 3 : 4);
  msgpack_pack_uint8(&pk, (uint8_t)kind);
  msgpack_pack_uint64(&pk, token);
  if (kind == F_DATA) {
    size_t cl = strlen(channel);
    msgpack_pack_str(&pk, cl);
    msgpack_pack_str_body(&pk, channel, cl);
    msgpack_pack_bin(&pk, plen);
    msgpack_pack_bin_body(&pk, payload, plen);
  } else if (kind == F_NACK) {
    msgpack_pack_str(&pk, plen);
    msgpack_pack_str_body(&pk, payload, plen);
  }
  frame *f = NULL;
  if (!b.oom) f = tr_malloc(t, sizeof *f + b.len);
  if (f != NULL) {
    uint32_t n = (uint32_t)(b.len - 4);
    b.data[0] = (char)(n >> 24);
    b.data[1] = (char)(n >> 16);
    b.data[2] = (char)(n >> 8);
    b.data[3] = (char)n;
    memcpy(f->data, b.data, b.len);
    f->len = b.len;
    f->next = NULL;
    f->t = t;
  }
  tr_free(t, b.data);
  return f;
}

static void write_done(uv_write_t *req, int status) {
  frame *f = req->data;
  (void)status; /* a failed write also fails the read side: the connection is dropped */
  tr_free(f->t, f);
}

/* Writes f on stream s (taking f in every case). */
static int write_frame(uv_stream_t *s, frame *f) {
  uv_buf_t buf = uv_buf_init(f->data, (unsigned)f->len);
  f->req.data = f;
  int rc = uv_write(&f->req, s, &buf, 1, write_done);
  if (rc != 0) tr_free(f->t, f);
  return rc == 0 ? SAGA_OK : SAGA_ETRANSPORT;
}

/* Appends data to a read buffer; returns SAGA_ENOMEM on failure. */
static int rbuf_append(tcp_tr *t, char **buf, size_t *len, size_t *cap, const char *data,
                       size_t n) {
  if (*len + n > *cap) {
    size_t c = *cap ? *cap : 4096;
    while (c < *len + n) c *= 2;
    char *p = tr_realloc(t, *buf, c);
    if (p == NULL) return SAGA_ENOMEM;
    *buf = p;
    *cap = c;
  }
  memcpy(*buf + *len, data, n);
  *len += n;
  return SAGA_OK;
}

/* A decoded frame: pointers into the unpacked object, valid until msgpack_unpacked_destroy. */
typedef struct parsed {
  int kind;
  uint64_t token;
  const char *channel;
  size_t channel_len;
  const char *payload;
  size_t payload_len;
} parsed;

/* Decodes one frame body. Returns NULL or a reason it is malformed. */
static const char *parse_frame(msgpack_unpacked *u, const char *body, size_t len, parsed *out) {
  size_t off = 0;
  msgpack_unpack_return r = msgpack_unpack_next(u, body, len, &off);
  if (r != MSGPACK_UNPACK_SUCCESS) return "frame is not valid msgpack";
  if (off != len) return "trailing bytes after frame";
  msgpack_object o = u->data;
  if (o.type != MSGPACK_OBJECT_ARRAY || o.via.array.size < 2) return "frame is not an array";
  msgpack_object *e = o.via.array.ptr;
  if (e[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER || e[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
    return "frame kind or token is not an unsigned integer";
  memset(out, 0, sizeof *out);
  out->kind = (int)e[0].via.u64;
  out->token = e[1].via.u64;
  switch (out->kind) {
  case F_DATA:
    if (o.via.array.size != 4 || e[2].type != MSGPACK_OBJECT_STR ||
        e[3].type != MSGPACK_OBJECT_BIN || e[2].via.str.size == 0 || e[2].via.str.size > 256)
      return "DATA frame must be [1, token, channel(1..256), payload(bin)]";
    out->channel = e[2].via.str.ptr;
    out->channel_len = e[2].via.str.size;
    out->payload = e[3].via.bin.ptr;
    out->payload_len = e[3].via.bin.size;
    return NULL;
  case F_ACK:
    return o.via.array.size == 2 ? NULL : "ACK frame must be [2, token]";
  case F_NACK:
    if (o.via.array.size != 3 || e[2].type != MSGPACK_OBJECT_STR)
      return "NACK frame must be [3, token, reason]";
    out->payload = e[2].via.str.ptr;
    out->payload_len = e[2].via.str.size;
    return NULL;
  default:
    return "unknown frame kind";
  }
}

/* Calls fn for each complete frame in buf; keeps the incomplete rest. Returns NULL or the
 * reason the stream is malformed (the caller then drops the connection). */
typedef const char *(*frame_fn)(void *ctx, const parsed *p);

static const char *drain_frames(tcp_tr *t, char *buf, size_t *len, frame_fn fn, void *ctx) {
  size_t pos = 0;
  const char *err = NULL;
  msgpack_unpacked u;
  msgpack_unpacked_init(&u);
  while (err == NULL && *len - pos >= 4) {
    const unsigned char *h = (const unsigned char *)buf + pos;
    size_t n = ((size_t)h[0] << 24) | ((size_t)h[1] << 16) | ((size_t)h[2] << 8) | h[3];
    if (n > t->max_frame) {
      err = "frame over max_frame_bytes";
      break;
    }
    if (*len - pos - 4 < n) break;
    parsed p;
    err = parse_frame(&u, buf + pos + 4, n, &p);
    if (err == NULL) err = fn(ctx, &p);
    pos += 4 + n;
  }
  msgpack_unpacked_destroy(&u);
  memmove(buf, buf + pos, *len - pos);
  *len -= pos;
  return err;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  /* One per thread: read callbacks copy out at once, and a loop runs on one thread, but
   * transports on loops of other threads (one node per thread) read at the same time. */
  static _Thread_local char slab[65536];
  (void)h;
  (void)suggested;
  *buf = uv_buf_init(slab, sizeof slab);
}

/* ---- closing ------------------------------------------------------------------------------ */

static void maybe_closed(tcp_tr *t) {
  if (t->closing && t->pending_closes == 0 && !t->closed_reported) {
    t->closed_reported = 1;
    saga_transport_closed(&t->base);
  }
}

static void handle_closed(uv_handle_t *h) {
  tcp_tr *t = h->data;
  t->pending_closes--;
  maybe_closed(t);
}

static void conn_free(tcp_tr *t, conn *c) {
  tr_free(t, c->rbuf);
  tr_free(t, c->tokens);
  tr_free(t, c->free_slots);
  tr_free(t, c);
}

static void conn_closed(uv_handle_t *h) {
  conn *c = (conn *)h;
  tcp_tr *t = c->tr;
  conn_free(t, c);
  t->pending_closes--;
  maybe_closed(t);
}

static void conn_drop(conn *c, const char *why) {
  if (c->closing) return;
  tcp_tr *t = c->tr;
  c->closing = 1;
  if (why != NULL) logf_(t, SAGA_LOG_WARN, "tcp: dropping inbound connection %u: %s", c->id, why);
  for (conn **pp = &t->conns; *pp != NULL; pp = &(*pp)->next)
    if (*pp == c) {
      *pp = c->next;
      break;
    }
  t->pending_closes++;
  uv_close((uv_handle_t *)&c->handle, conn_closed);
}

static void peer_conn_closed(uv_handle_t *h) {
  tcp_tr *t = h->data;
  tr_free(t, h);
  t->pending_closes--;
  maybe_closed(t);
}

static void peer_connect(peer *p);

static void peer_retry_cb(uv_timer_t *h) {
  peer *p = h->data;
  if (p->state == P_BACKOFF) peer_connect(p);
}

/* Drops a peer's connection; reconnects with backoff while messages wait. */
static void peer_drop(peer *p, const char *why) {
  tcp_tr *t = p->tr;
  if (p->conn != NULL) {
    p->conn->data = t;
    t->pending_closes++;
    uv_close((uv_handle_t *)p->conn, peer_conn_closed);
    p->conn = NULL;
  }
  p->rlen = 0;
  if (why != NULL) logf_(t, SAGA_LOG_INFO, "tcp: connection to %s lost: %s", p->address, why);
  if (t->closing) {
    p->state = P_IDLE;
    return;
  }
  p->state = P_BACKOFF;
  uv_timer_start(&p->timer, peer_retry_cb, p->backoff_ms, 0);
  p->backoff_ms = p->backoff_ms * 2 > t->backoff_max ? t->backoff_max : p->backoff_ms * 2;
}

/* ---- the sending side: peers -------------------------------------------------------------- */

static const char *on_peer_frame(void *ctx, const parsed *f) {
  peer *p = ctx;
  tcp_tr *t = p->tr;
  if (f->kind == F_ACK) {
    saga_transport_sent(&t->base, f->token, SAGA_OK);
    return NULL;
  }
  if (f->kind == F_NACK) {
    logf_(t, SAGA_LOG_WARN, "tcp: %s refused message %llu: %.*s", p->address,
          (unsigned long long)f->token, (int)f->payload_len, f->payload);
    saga_transport_sent(&t->base, f->token, SAGA_ETRANSPORT);
    return NULL;
  }
  return "unexpected DATA frame on an outbound connection";
}

static void peer_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  peer *p = s->data;
  if (n < 0) {
    peer_drop(p, uv_strerror((int)n));
    return;
  }
  if (rbuf_append(p->tr, &p->rbuf, &p->rlen, &p->rcap, buf->base, (size_t)n) != SAGA_OK) {
    peer_drop(p, "out of memory");
    return;
  }
  const char *err = drain_frames(p->tr, p->rbuf, &p->rlen, on_peer_frame, p);
  if (err != NULL) peer_drop(p, err);
}

static void peer_flush(peer *p) {
  while (p->head != NULL && p->state == P_CONNECTED) {
    frame *f = p->head;
    p->head = f->next;
    if (p->head == NULL) p->tail = NULL;
    p->queued_bytes -= f->len;
    if (write_frame((uv_stream_t *)p->conn, f) != SAGA_OK) {
      peer_drop(p, "write failed");
      return;
    }
  }
}

static void peer_connected(uv_connect_t *req, int status) {
  peer *p = req->data;
  tcp_tr *t = p->tr;
  if (t->closing) return;
  if (status < 0) {
    peer_drop(p, uv_strerror(status));
    return;
  }
  p->state = P_CONNECTED;
  p->backoff_ms = t->backoff_min;
  p->conn->data = p;
  uv_tcp_nodelay(p->conn, 1);
  uv_read_start((uv_stream_t *)p->conn, alloc_cb, peer_read);
  logf_(t, SAGA_LOG_INFO, "tcp: connected to %s", p->address);
  peer_flush(p);
}

static void peer_connect(peer *p) {
  tcp_tr *t = p->tr;
  p->conn = tr_malloc(t, sizeof *p->conn);
  if (p->conn == NULL) {
    p->state = P_BACKOFF;
    uv_timer_start(&p->timer, peer_retry_cb, p->backoff_ms, 0);
    return;
  }
  uv_tcp_init(t->loop, p->conn);
  p->conn->data = p;
  p->connect_req.data = p;
  p->state = P_CONNECTING;
  int rc = uv_tcp_connect(&p->connect_req, p->conn, (const struct sockaddr *)&p->addr,
                          peer_connected);
  if (rc != 0) peer_drop(p, uv_strerror(rc));
}

static peer *route_peer(tcp_tr *t, const char *channel) {
  for (size_t i = 0; i < t->nroutes; i++)
    if (strcmp(t->routes[i].channel, channel) == 0) return t->routes[i].peer;
  return NULL;
}

static int tr_send(saga_transport *base, const char *channel, const void *data, size_t len,
                   uint64_t token) {
  tcp_tr *t = (tcp_tr *)base;
  if (t->closing) return SAGA_ECLOSED;
  peer *p = route_peer(t, channel);
  if (p == NULL) {
    logf_(t, SAGA_LOG_ERROR, "tcp: no route for channel '%s'", channel);
    return SAGA_EINVAL;
  }
  size_t waiting = p->queued_bytes +
                   (p->conn != NULL ? uv_stream_get_write_queue_size((uv_stream_t *)p->conn) : 0);
  if (waiting + len > t->max_queued) return SAGA_EBUSY;
  frame *f = make_frame(t, F_DATA, token, channel, data, len);
  if (f == NULL) return SAGA_ENOMEM;
  if (f->len - 4 > t->max_frame) {
    tr_free(t, f);
    return SAGA_ETOOBIG;
  }
  if (p->state == P_CONNECTED) {
    if (write_frame((uv_stream_t *)p->conn, f) != SAGA_OK) peer_drop(p, "write failed");
    return SAGA_OK;
  }
  if (p->tail != NULL)
    p->tail->next = f;
  else
    p->head = f;
  p->tail = f;
  p->queued_bytes += f->len;
  if (p->state == P_IDLE) peer_connect(p);
  return SAGA_OK;
}

/* ---- the receiving side: inbound connections ---------------------------------------------- */

static int subscribed(tcp_tr *t, const char *channel, size_t len) {
  for (size_t i = 0; i < t->nsubs; i++)
    if (strlen(t->subs[i]) == len && memcmp(t->subs[i], channel, len) == 0) return 1;
  return 0;
}

static const char *on_conn_frame(void *ctx, const parsed *f) {
  conn *c = ctx;
  tcp_tr *t = c->tr;
  if (f->kind != F_DATA) return "unexpected ACK/NACK frame on an inbound connection";
  char channel[257];
  memcpy(channel, f->channel, f->channel_len);
  channel[f->channel_len] = '\0';
  if (!subscribed(t, channel, f->channel_len)) {
    static const char why[] = "channel not served by this node";
    frame *nack = make_frame(t, F_NACK, f->token, NULL, why, sizeof why - 1);
    if (nack != NULL) write_frame((uv_stream_t *)&c->handle, nack);
    return NULL;
  }
  uint32_t slot;
  if (c->nfree > 0) {
    slot = c->free_slots[--c->nfree];
  } else {
    if ((c->nslots & (c->nslots - 1)) == 0) { /* grow at powers of two */
      size_t cap = c->nslots ? c->nslots * 2 : 16;
      uint64_t *tk = tr_realloc(t, c->tokens, cap * sizeof *tk);
      if (tk == NULL) return "out of memory";
      c->tokens = tk;
      uint32_t *fs = tr_realloc(t, c->free_slots, cap * sizeof *fs);
      if (fs == NULL) return "out of memory";
      c->free_slots = fs;
    }
    slot = (uint32_t)c->nslots++;
  }
  c->tokens[slot] = f->token;
  uint64_t tag = ((uint64_t)c->id << 32) | slot;
  if (saga_transport_deliver(&t->base, channel, f->payload, f->payload_len, tag) != SAGA_OK)
    c->free_slots[c->nfree++] = slot; /* the node did not take it: never acknowledged */
  return NULL;
}

static void conn_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  conn *c = (conn *)s;
  if (n < 0) {
    conn_drop(c, n == UV_EOF ? NULL : uv_strerror((int)n));
    return;
  }
  if (rbuf_append(c->tr, &c->rbuf, &c->rlen, &c->rcap, buf->base, (size_t)n) != SAGA_OK) {
    conn_drop(c, "out of memory");
    return;
  }
  const char *err = drain_frames(c->tr, c->rbuf, &c->rlen, on_conn_frame, c);
  if (err != NULL) conn_drop(c, err);
}

static void on_connection(uv_stream_t *server, int status) {
  tcp_tr *t = server->data;
  if (status < 0 || t->closing) return;
  conn *c = tr_malloc(t, sizeof *c);
  if (c == NULL) return;
  memset(c, 0, sizeof *c);
  c->tr = t;
  c->id = t->next_conn_id++;
  uv_tcp_init(t->loop, &c->handle);
  c->handle.data = c;
  if (uv_accept(server, (uv_stream_t *)&c->handle) != 0) {
    t->pending_closes++;
    c->closing = 1;
    uv_close((uv_handle_t *)&c->handle, conn_closed);
    return;
  }
  uv_tcp_nodelay(&c->handle, 1);
  c->next = t->conns;
  t->conns = c;
  uv_read_start((uv_stream_t *)&c->handle, alloc_cb, conn_read);
}

static void tr_ack(saga_transport *base, uint64_t tag) {
  tcp_tr *t = (tcp_tr *)base;
  uint32_t id = (uint32_t)(tag >> 32), slot = (uint32_t)tag;
  for (conn *c = t->conns; c != NULL; c = c->next) {
    if (c->id != id) continue;
    if (slot >= c->nslots || c->closing) return;
    frame *f = make_frame(t, F_ACK, c->tokens[slot], NULL, NULL, 0);
    c->free_slots[c->nfree++] = slot;
    if (f != NULL) write_frame((uv_stream_t *)&c->handle, f);
    return;
  }
  /* The connection is gone: the sender resends and the node answers the duplicate. */
}

/* ---- lifecycle ---------------------------------------------------------------------------- */

static int tr_open(saga_transport *base, uv_loop_t *loop) {
  tcp_tr *t = (tcp_tr *)base;
  t->loop = loop;
  /* A write to a connection the peer closed raises SIGPIPE, whose default action ends the
   * process. Only when nobody chose a disposition, make it an EPIPE error instead. */
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
    signal(SIGPIPE, SIG_IGN);
    logf_(t, SAGA_LOG_INFO, "tcp: SIGPIPE was unhandled; now ignored (writes to closed "
                            "connections fail with EPIPE instead of ending the process)");
  }
  for (size_t i = 0; i < t->npeers; i++) {
    uv_timer_init(loop, &t->peers[i]->timer);
    t->peers[i]->timer.data = t->peers[i];
  }
  if (t->listen == NULL) return SAGA_OK;
  uv_tcp_init(loop, &t->listener);
  t->listener.data = t;
  t->listening = 1;
  int rc = uv_tcp_bind(&t->listener, (const struct sockaddr *)&t->listen_addr, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&t->listener, 128, on_connection);
  if (rc != 0) {
    logf_(t, SAGA_LOG_ERROR, "tcp: cannot listen on %s: %s", t->listen, uv_strerror(rc));
    return SAGA_ETRANSPORT;
  }
  return SAGA_OK;
}

static int tr_subscribe(saga_transport *base, const char *channel) {
  tcp_tr *t = (tcp_tr *)base;
  char **p = tr_realloc(t, t->subs, (t->nsubs + 1) * sizeof *p);
  if (p == NULL) return SAGA_ENOMEM;
  t->subs = p;
  if ((t->subs[t->nsubs] = tr_strdup(t, channel)) == NULL) return SAGA_ENOMEM;
  t->nsubs++;
  return SAGA_OK;
}

static void tr_close(saga_transport *base) {
  tcp_tr *t = (tcp_tr *)base;
  if (t->closing) return;
  t->closing = 1;
  if (t->loop == NULL) { /* never opened */
    maybe_closed(t);
    return;
  }
  if (t->listening) {
    t->pending_closes++;
    uv_close((uv_handle_t *)&t->listener, handle_closed);
  }
  while (t->conns != NULL) conn_drop(t->conns, NULL);
  for (size_t i = 0; i < t->npeers; i++) {
    peer *p = t->peers[i];
    peer_drop(p, NULL);
    t->pending_closes++;
    p->timer.data = t;
    uv_close((uv_handle_t *)&p->timer, handle_closed);
  }
  maybe_closed(t);
}

static void tr_destroy(saga_transport *base) {
  tcp_tr *t = (tcp_tr *)base;
  for (size_t i = 0; i < t->npeers; i++) {
    peer *p = t->peers[i];
    while (p->head != NULL) {
      frame *f = p->head;
      p->head = f->next;
      tr_free(t, f);
    }
    tr_free(t, p->rbuf);
    tr_free(t, p->address);
    tr_free(t, p);
  }
  tr_free(t, t->peers);
  for (size_t i = 0; i < t->nroutes; i++) tr_free(t, t->routes[i].channel);
  tr_free(t, t->routes);
  for (size_t i = 0; i < t->nsubs; i++) tr_free(t, t->subs[i]);
  tr_free(t, t->subs);
  tr_free(t, t->listen);
  saga_allocator a = t->alloc;
  a.free(t, a.ud);
}

static const saga_transport_methods tcp_methods = {
    SAGA_TRANSPORT_VERSION, "tcp", tr_open, tr_subscribe, tr_send, tr_ack, tr_close, tr_destroy,
};

void saga_tcp_config_init(saga_tcp_config *cfg) {
  if (cfg == NULL) return;
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_version = SAGA_TCP_CONFIG_VERSION;
  cfg->max_frame_bytes = (1u << 20) + 4096;
  cfg->max_queued_bytes = (size_t)64 << 20;
  cfg->reconnect_min_ms = 50;
  cfg->reconnect_max_ms = 5000;
}

static peer *peer_for(tcp_tr *t, const char *address, int *rc) {
  for (size_t i = 0; i < t->npeers; i++)
    if (strcmp(t->peers[i]->address, address) == 0) return t->peers[i];
  peer **pp = tr_realloc(t, t->peers, (t->npeers + 1) * sizeof *pp);
  if (pp == NULL) {
    *rc = SAGA_ENOMEM;
    return NULL;
  }
  t->peers = pp;
  peer *p = tr_malloc(t, sizeof *p);
  if (p == NULL) {
    *rc = SAGA_ENOMEM;
    return NULL;
  }
  memset(p, 0, sizeof *p);
  p->tr = t;
  p->backoff_ms = t->backoff_min;
  p->address = tr_strdup(t, address);
  if (p->address == NULL || parse_address(address, &p->addr) != SAGA_OK) {
    *rc = p->address == NULL ? SAGA_ENOMEM : SAGA_EINVAL;
    tr_free(t, p->address);
    tr_free(t, p);
    return NULL;
  }
  t->peers[t->npeers++] = p;
  return p;
}

int saga_tcp_transport_new(saga_transport **out, const saga_tcp_config *cfg) {
  if (out == NULL || cfg == NULL) return SAGA_EINVAL;
  if (cfg->struct_version != SAGA_TCP_CONFIG_VERSION) return SAGA_EVERSION;
  saga_allocator a = {libc_malloc, libc_realloc, libc_free, NULL};
  if (cfg->alloc != NULL) a = *cfg->alloc;
  tcp_tr *t = a.malloc(sizeof *t, a.ud);
  if (t == NULL) return SAGA_ENOMEM;
  memset(t, 0, sizeof *t);
  t->alloc = a;
  t->base.methods = &tcp_methods;
  t->max_frame = cfg->max_frame_bytes ? cfg->max_frame_bytes : (1u << 20) + 4096;
  t->max_queued = cfg->max_queued_bytes ? cfg->max_queued_bytes : (size_t)64 << 20;
  t->backoff_min = cfg->reconnect_min_ms ? cfg->reconnect_min_ms : 50;
  t->backoff_max = cfg->reconnect_max_ms ? cfg->reconnect_max_ms : 5000;
  if (t->backoff_max < t->backoff_min) t->backoff_max = t->backoff_min;
  int rc = SAGA_OK;
  if (cfg->listen != NULL) {
    t->listen = tr_strdup(t, cfg->listen);
    if (t->listen == NULL)
      rc = SAGA_ENOMEM;
    else if (parse_address(cfg->listen, &t->listen_addr) != SAGA_OK)
      rc = SAGA_EINVAL;
  }
  if (rc == SAGA_OK && cfg->nroutes > 0) {
    t->routes = tr_malloc(t, cfg->nroutes * sizeof *t->routes);
    if (t->routes == NULL) rc = SAGA_ENOMEM;
  }
  for (size_t i = 0; rc == SAGA_OK && i < cfg->nroutes; i++) {
    const saga_tcp_route *r = &cfg->routes[i];
    if (r->channel == NULL || r->channel[0] == '\0' || strlen(r->channel) > 256 ||
        r->address == NULL) {
      rc = SAGA_EINVAL;
      break;
    }
    route *d = &t->routes[t->nroutes];
    d->peer = peer_for(t, r->address, &rc);
    if (d->peer == NULL) break;
    d->channel = tr_strdup(t, r->channel);
    if (d->channel == NULL) {
      rc = SAGA_ENOMEM;
      break;
    }
    t->nroutes++;
  }
  if (rc != SAGA_OK) {
    tr_destroy(&t->base);
    return rc;
  }
  *out = &t->base;
  return SAGA_OK;
}
