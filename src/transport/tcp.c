/*
 * The TCP transport (include/saga/transport_tcp.h): brokerless, on libuv, written only
 * against the public adapter interface. docs/security.md gives its trust model.
 *
 * Wire format (tcp_frame.h): 4-byte big-endian length, then a msgpack array:
 *   DATA [1, token, channel, payload(bin)]  sender -> receiver
 *   ACK  [2, token]                          receiver -> sender, after its commit
 *   NACK [3, token, reason]                  receiver -> sender, channel not served
 * A node sends on connections it opens to the address of each route (one per address, a
 * "peer") and receives on the connections its listener accepts. Acknowledgements travel back
 * on the connection the message came on, and count only for a token sent on that connection
 * and not yet confirmed; a connection that drops takes its unacknowledged messages with it,
 * and the sender's outbox resends them.
 *
 * Security: by default every connection is mutual TLS 1.3 (OpenSSL over memory BIOs: libuv
 * moves the ciphertext, OpenSSL never touches a socket). Both sides verify the other's
 * certificate against the configured CA; a sender checks the route's identity; a receiver
 * looks up, once per connection after the handshake, which of its channels the peer's
 * identity may send to, and closes the connection at the first DATA frame for any other,
 * before the payload is looked at. Inbound connections are capped (in all and per source
 * address; a connection that has not authenticated yet gives way to a new one), must finish
 * the handshake in time, are closed when idle, and are dropped when they do not read their
 * acknowledgements.
 */
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "saga/sys/transport.h"
#include "saga/transport_tcp.h"
#include "tcp_frame.h"

enum { P_IDLE, P_CONNECTING, P_HANDSHAKE, P_CONNECTED, P_BACKOFF };

typedef struct tcp_tr tcp_tr;
typedef struct peer peer;

/* A buffer on its way to the socket: a frame (plaintext) or TLS records. */
typedef struct frame {
  uv_write_t req;
  tcp_tr *t;
  struct frame *next; /* in a peer's queue while waiting for a connection */
  uint64_t token;     /* DATA frames: the sender's token */
  size_t len, cap;
  char data[];
} frame;

/* Tokens sent on one connection and not yet confirmed: an open-addressing multiset. */
typedef struct tokset {
  uint64_t *keys;
  uint32_t *counts; /* 0 = empty slot */
  size_t cap, n;
} tokset;

/* One TCP connection, outbound (to a peer) or inbound (accepted). */
typedef struct lnk {
  uv_tcp_t tcp; /* first: the handle's memory is the link's */
  uv_connect_t connect_req;
  tcp_tr *tr;
  peer *peer;   /* outbound: its peer; NULL for inbound */
  SSL *ssl;     /* NULL in plaintext */
  BIO *net_in;  /* ciphertext from the socket, read by OpenSSL */
  BIO *net_out; /* ciphertext written by OpenSSL, for the socket */
  int ready;    /* handshake done (always in plaintext) */
  int closing;
  char ident[128]; /* the identity the peer proved, for logs */
  uint64_t opened_ms, active_ms;
  char *rbuf; /* plaintext not yet split into frames */
  size_t rlen, rcap;
  frame *out;         /* frames gathered for the next write (see link_write) */
  struct lnk *dnext;  /* in the transport's list of links with gathered frames */
  int dirty;
  /* inbound only */
  struct lnk *next;
  uint32_t id;
  struct sockaddr_storage from;
  int authed;              /* proved itself: handshake done, or (plaintext) a valid frame */
  int allow_all;           /* may send to every channel */
  const char **allowed;    /* else these channels (pointers into the transport's list) */
  size_t nallowed;
  uint64_t *tokens;        /* slot -> token of a delivery awaiting ack */
  uint8_t *busy;           /* slot -> 1 while its delivery awaits the node's ack */
  uint32_t *free_slots;
  size_t nslots, nfree;
  int warned_acks;
} lnk;

struct peer {
  tcp_tr *tr;
  char *address;
  char *identity; /* the name its certificate must carry; NULL = any the CA signed */
  struct sockaddr_storage addr;
  lnk *lnk;
  uv_timer_t timer; /* reconnect backoff */
  int timer_live;   /* initialised and not yet closed */
  int state;
  uint32_t backoff_ms;
  frame *head, *tail; /* waiting for a connection */
  size_t queued_bytes;
  tokset sent;   /* tokens written on the current link, unconfirmed */
  tokset queued; /* tokens of the frames in the queue (at most one frame per token) */
  int warned_acks;
};

typedef struct route {
  char *channel;
  peer *peer;
} route;

typedef struct allow {
  char *identity;
  char *channel;
} allow;

struct tcp_tr {
  saga_transport base;
  saga_allocator alloc;
  uv_loop_t *loop;
  char *listen;
  struct sockaddr_storage listen_addr;
  /* Each handle's flag says it was initialised and not yet handed to uv_close(): exactly
   * those are closed by close(), destroy() or an open that fails half-way. */
  uv_tcp_t listener;
  int listening;
  uv_timer_t sweep; /* handshake and idle deadlines; also retries a stalled accept */
  int sweeping;
  uv_prepare_t before_poll; /* write gathered frames: before the loop waits, */
  uv_check_t after_poll;    /* and after the callbacks of its I/O */
  int preparing, checking;
  int accept_stalled;       /* a connection waits in the listener for memory to accept it */
  uint64_t accept_warned_ms;
  lnk *dirty;               /* links with gathered frames */
  route *routes;
  size_t nroutes;
  peer **peers;
  size_t npeers;
  char **subs;
  size_t nsubs;
  allow *allows;
  size_t nallows;
  SSL_CTX *ctx; /* NULL in plaintext */
  lnk *conns;  /* inbound */
  size_t nconns;
  uint32_t next_conn_id;
  size_t max_frame, max_queued, max_reply_queue;
  uint32_t backoff_min, backoff_max;
  uint32_t max_conns, max_conns_ip, handshake_ms, idle_ms;
  saga_tcp_stats stats;
  /* Lifecycle. closing: no new I/O (close() was called, or open failed half-way).
   * pending_closes: handles (and links) handed to uv_close() whose callback has not run;
   * the memory they live in must stay until it has. close_called: the host asked for a
   * close and gets saga_transport_closed() once pending_closes is 0. destroyed: the host
   * let go (nothing may be reported to it any more); the last close callback frees all. */
  int closing, close_called, destroyed, pending_closes, closed_reported;
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

/* Whether two socket addresses have the same host (the port is ignored). */
static int same_host(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
  if (a->ss_family != b->ss_family) return 0;
  if (a->ss_family == AF_INET)
    return memcmp(&((const struct sockaddr_in *)a)->sin_addr,
                  &((const struct sockaddr_in *)b)->sin_addr, sizeof(struct in_addr)) == 0;
  if (a->ss_family == AF_INET6)
    return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
                  &((const struct sockaddr_in6 *)b)->sin6_addr, sizeof(struct in6_addr)) == 0;
  return 0;
}

/* ---- unconfirmed tokens ------------------------------------------------------------------- */

static size_t tok_hash(uint64_t k, size_t cap) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return (size_t)k & (cap - 1);
}

static int tokset_add(tcp_tr *t, tokset *s, uint64_t k) {
  if ((s->n + 1) * 4 > s->cap * 3) { /* keep the load under 3/4 */
    size_t cap = s->cap ? s->cap * 2 : 64;
    uint64_t *keys = tr_malloc(t, cap * sizeof *keys);
    uint32_t *counts = tr_malloc(t, cap * sizeof *counts);
    if (keys == NULL || counts == NULL) {
      tr_free(t, keys);
      tr_free(t, counts);
      return SAGA_ENOMEM;
    }
    memset(counts, 0, cap * sizeof *counts);
    for (size_t i = 0; i < s->cap; i++) {
      if (s->counts[i] == 0) continue;
      size_t j = tok_hash(s->keys[i], cap);
      while (counts[j] != 0) j = (j + 1) & (cap - 1);
      keys[j] = s->keys[i];
      counts[j] = s->counts[i];
    }
    tr_free(t, s->keys);
    tr_free(t, s->counts);
    s->keys = keys;
    s->counts = counts;
    s->cap = cap;
  }
  size_t j = tok_hash(k, s->cap);
  while (s->counts[j] != 0 && s->keys[j] != k) j = (j + 1) & (s->cap - 1);
  if (s->counts[j] == 0) {
    s->keys[j] = k;
    s->n++;
  }
  if (s->counts[j] < UINT32_MAX) s->counts[j]++;
  return SAGA_OK;
}

static int tokset_has(const tokset *s, uint64_t k) {
  if (s->n == 0) return 0;
  size_t j = tok_hash(k, s->cap);
  while (s->counts[j] != 0 && s->keys[j] != k) j = (j + 1) & (s->cap - 1);
  return s->counts[j] != 0;
}

/* Takes one k out; returns 0 if it was not there. */
static int tokset_take(tokset *s, uint64_t k) {
  if (s->n == 0) return 0;
  size_t j = tok_hash(k, s->cap);
  while (s->counts[j] != 0 && s->keys[j] != k) j = (j + 1) & (s->cap - 1);
  if (s->counts[j] == 0) return 0;
  if (--s->counts[j] > 0) return 1;
  s->n--;
  /* Backward-shift deletion keeps every probe chain unbroken. */
  size_t hole = j;
  for (size_t i = (j + 1) & (s->cap - 1); s->counts[i] != 0; i = (i + 1) & (s->cap - 1)) {
    size_t home = tok_hash(s->keys[i], s->cap);
    if (((i - home) & (s->cap - 1)) >= ((i - hole) & (s->cap - 1))) {
      s->keys[hole] = s->keys[i];
      s->counts[hole] = s->counts[i];
      s->counts[i] = 0;
      hole = i;
    }
  }
  return 1;
}

static void tokset_clear(tokset *s) {
  if (s->cap > 0) memset(s->counts, 0, s->cap * sizeof *s->counts);
  s->n = 0;
}

static void tokset_free(tcp_tr *t, tokset *s) {
  tr_free(t, s->keys);
  tr_free(t, s->counts);
  memset(s, 0, sizeof *s);
}

/* ---- frames ------------------------------------------------------------------------------- */

static frame *frame_new(tcp_tr *t, size_t len) {
  frame *f = tr_malloc(t, sizeof *f + len);
  if (f != NULL) {
    f->t = t;
    f->next = NULL;
    f->token = 0;
    f->len = f->cap = len;
  }
  return f;
}

/* A frame of the given kind: DATA with channel and payload, NACK with a reason in payload. */
static frame *make_frame(tcp_tr *t, int kind, uint64_t token, const char *channel,
                         const void *payload, size_t plen) {
  saga__tcp_frame fr = {kind, token, channel, channel ? strlen(channel) : 0, payload, plen};
  frame *f = frame_new(t, saga__tcp_frame_size(&fr));
  if (f == NULL) return NULL;
  saga__tcp_frame_encode(&fr, f->data);
  f->token = token;
  return f;
}

static void link_fail(struct lnk *l, const char *why);

static void write_done(uv_write_t *req, int status) {
  frame *f = req->data;
  lnk *l = (lnk *)req->handle; /* the link's uv_tcp_t is its first member */
  tr_free(f->t, f);
  /* UV_ECANCELED: the link is being closed (its close callback has not run yet). */
  if (status < 0 && status != UV_ECANCELED && !l->closing) link_fail(l, uv_strerror(status));
}

/* Hands f to the socket (taking f in every case). */
static int raw_write(lnk *l, frame *f) {
  uv_buf_t buf = uv_buf_init(f->data, (unsigned)f->len);
  f->req.data = f;
  int rc = uv_write(&f->req, (uv_stream_t *)&l->tcp, &buf, 1, write_done);
  if (rc != 0) tr_free(f->t, f);
  return rc == 0 ? SAGA_OK : SAGA_ETRANSPORT;
}

/* Sends what OpenSSL wrote to net_out. */
static int tls_flush(lnk *l) {
  size_t n = BIO_ctrl_pending(l->net_out);
  if (n == 0) return SAGA_OK;
  frame *f = frame_new(l->tr, n);
  if (f == NULL) return SAGA_ENOMEM;
  if (BIO_read(l->net_out, f->data, (int)n) != (int)n) {
    tr_free(l->tr, f);
    return SAGA_ETRANSPORT;
  }
  return raw_write(l, f);
}

/* OpenSSL's error queue must be empty before a call whose failure is read with
 * SSL_get_error; clearing it only when something is there is much cheaper. */
static void err_clear(void) {
  if (ERR_peek_error() != 0) ERR_clear_error();
}

/* Writes the frames gathered on l: through TLS in one SSL_write (small frames share
 * records), or as one plaintext write. */
static int link_send_now(lnk *l) {
  frame *f = l->out;
  if (f == NULL || f->len == 0) return SAGA_OK;
  l->out = NULL;
  if (l->ssl == NULL) return raw_write(l, f);
  err_clear();
  int r = SSL_write(l->ssl, f->data, (int)f->len);
  tr_free(l->tr, f);
  if (r <= 0) return SAGA_ETRANSPORT;
  return tls_flush(l);
}

static void link_undirty(lnk *l) {
  if (!l->dirty) return;
  for (lnk **pp = &l->tr->dirty; *pp != NULL; pp = &(*pp)->dnext)
    if (*pp == l) {
      *pp = l->dnext;
      break;
    }
  l->dirty = 0;
}

/* Adds one frame to what l writes at the end of this loop turn (taking f in every case), or
 * at once past 64 KiB. Many frames made in one turn (the ACKs of a group commit, the
 * messages of a relay pass) then cost one write and, with TLS, a few records. */
static int link_write(lnk *l, frame *f) {
  tcp_tr *t = l->tr;
  frame *o = l->out;
  if (o == NULL) {
    l->out = f;
    o = f;
  } else {
    if (o->len + f->len > o->cap) {
      size_t cap = o->cap * 2 > o->len + f->len ? o->cap * 2 : o->len + f->len;
      frame *g = tr_realloc(t, o, sizeof *g + cap);
      if (g == NULL) {
        tr_free(t, f);
        return SAGA_ENOMEM;
      }
      g->cap = cap;
      l->out = o = g;
    }
    memcpy(o->data + o->len, f->data, f->len);
    o->len += f->len;
    tr_free(t, f);
  }
  if (o->len >= 65536) {
    link_undirty(l);
    return link_send_now(l);
  }
  if (!l->dirty) {
    l->dirty = 1;
    l->dnext = t->dirty;
    t->dirty = l;
  }
  return SAGA_OK;
}

/* Bytes written to the link and not yet taken by the kernel. */
static size_t link_backlog(lnk *l) {
  return uv_stream_get_write_queue_size((uv_stream_t *)&l->tcp) + (l->out ? l->out->len : 0);
}

/* Appends data to a link's plaintext buffer. */
static int rbuf_append(lnk *l, const char *data, size_t n) {
  if (l->rlen + n > l->rcap) {
    size_t c = l->rcap ? l->rcap : 4096;
    while (c < l->rlen + n) c *= 2;
    char *p = tr_realloc(l->tr, l->rbuf, c);
    if (p == NULL) return SAGA_ENOMEM;
    l->rbuf = p;
    l->rcap = c;
  }
  memcpy(l->rbuf + l->rlen, data, n);
  l->rlen += n;
  return SAGA_OK;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  /* One per thread: read callbacks copy out at once, and a loop runs on one thread, but
   * transports on loops of other threads (one node per thread) read at the same time. */
  static _Thread_local char slab[65536];
  (void)h;
  (void)suggested;
  *buf = uv_buf_init(slab, sizeof slab);
}

/* The last OpenSSL error (or the certificate verification failure) as text. */
static const char *tls_reason(lnk *l, char *buf, size_t len) {
  long v = SSL_get_verify_result(l->ssl);
  unsigned long e = ERR_peek_last_error();
  if (v != X509_V_OK)
    snprintf(buf, len, "TLS handshake failed: certificate: %s", X509_verify_cert_error_string(v));
  else if (e != 0) {
    char tmp[200];
    ERR_error_string_n(e, tmp, sizeof tmp);
    snprintf(buf, len, "TLS: %s", tmp);
  } else {
    snprintf(buf, len, "TLS: connection failed");
  }
  ERR_clear_error();
  return buf;
}

/* ---- links: closing ----------------------------------------------------------------------- */

static void tr_free_all(tcp_tr *t);

/* After a handle's close callback (or a close or destroy call): once no handle is closing
 * any more, frees everything if the host destroyed the transport, or reports a close it
 * asked for. The last thing its callers do: t may be gone when it returns. */
static void maybe_closed(tcp_tr *t) {
  if (t->pending_closes > 0) return;
  if (t->destroyed) {
    tr_free_all(t);
  } else if (t->close_called && !t->closed_reported) {
    t->closed_reported = 1;
    saga_transport_closed(&t->base); /* the host may destroy t from inside */
  }
}

static void handle_closed(uv_handle_t *h) {
  tcp_tr *t = h->data;
  t->pending_closes--;
  maybe_closed(t);
}

static void link_closed(uv_handle_t *h) {
  lnk *l = (lnk *)h;
  tcp_tr *t = l->tr;
  tr_free(t, l->out);
  if (l->ssl != NULL) SSL_free(l->ssl); /* frees both BIOs */
  tr_free(t, l->rbuf);
  tr_free(t, l->tokens);
  tr_free(t, l->busy);
  tr_free(t, l->free_slots);
  tr_free(t, (void *)l->allowed);
  tr_free(t, l);
  t->pending_closes--;
  maybe_closed(t);
}

static void link_close(lnk *l) {
  if (l->closing) return;
  l->closing = 1;
  link_undirty(l);
  l->tr->pending_closes++;
  uv_close((uv_handle_t *)&l->tcp, link_closed);
}

/* A link with its handle initialised, or NULL with *uverr set (0 when out of memory). */
static lnk *link_new(tcp_tr *t, peer *p, int *uverr) {
  *uverr = 0;
  lnk *l = tr_malloc(t, sizeof *l);
  if (l == NULL) return NULL;
  memset(l, 0, sizeof *l);
  l->tr = t;
  l->peer = p;
  int rc = uv_tcp_init(t->loop, &l->tcp);
  if (rc != 0) { /* a handle whose init failed is not linked into the loop: plain free */
    *uverr = rc;
    tr_free(t, l);
    return NULL;
  }
  l->tcp.data = l;
  l->opened_ms = l->active_ms = uv_now(t->loop);
  return l;
}

/* Starts TLS on a connected link, as the server (inbound) or the client (outbound). */
static int link_tls_start(lnk *l, int server) {
  tcp_tr *t = l->tr;
  l->ssl = SSL_new(t->ctx);
  l->net_in = BIO_new(BIO_s_mem());
  l->net_out = BIO_new(BIO_s_mem());
  if (l->ssl == NULL || l->net_in == NULL || l->net_out == NULL) {
    if (l->ssl != NULL) SSL_free(l->ssl);
    BIO_free(l->net_in);
    BIO_free(l->net_out);
    l->ssl = NULL;
    return SAGA_ENOMEM;
  }
  SSL_set_bio(l->ssl, l->net_in, l->net_out);
  if (server) {
    SSL_set_verify(l->ssl, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_set_accept_state(l->ssl);
  } else {
    SSL_set_verify(l->ssl, SSL_VERIFY_PEER, NULL);
    if (l->peer->identity != NULL && SSL_set1_host(l->ssl, l->peer->identity) != 1)
      return SAGA_ENOMEM;
    SSL_set_connect_state(l->ssl);
  }
  return SAGA_OK;
}

/* Copies the peer certificate's identity (first DNS subjectAltName, else CN) into l->ident. */
static void link_identity(lnk *l, X509 *cert) {
  char name[sizeof l->ident] = "";
  GENERAL_NAMES *sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
  for (int i = 0; sans != NULL && i < sk_GENERAL_NAME_num(sans) && name[0] == '\0'; i++) {
    const GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, i);
    if (g->type != GEN_DNS) continue;
    int n = ASN1_STRING_length(g->d.dNSName);
    if (n > 0 && (size_t)n < sizeof name) {
      memcpy(name, ASN1_STRING_get0_data(g->d.dNSName), (size_t)n);
      name[n] = '\0';
    }
  }
  GENERAL_NAMES_free(sans);
  if (name[0] == '\0')
    X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, name, sizeof name);
  for (char *c = name; *c != '\0'; c++) /* it goes to logs */
    if (*c < 0x20 || *c > 0x7e) *c = '?';
  snprintf(l->ident, sizeof l->ident, "%s", name[0] != '\0' ? name : "(no name)");
}

/* ---- the sending side: peers -------------------------------------------------------------- */

static void peer_connect(peer *p);

static void peer_retry_cb(uv_timer_t *h) {
  peer *p = h->data;
  if (p->state == P_BACKOFF) peer_connect(p);
}

/* Schedules the next connection attempt after the backoff delay. */
static void peer_backoff(peer *p) {
  tcp_tr *t = p->tr;
  p->state = P_BACKOFF;
  /* Fails only for a closing timer (never while the transport is open) or a NULL callback;
   * should it fail, the next send() connects instead. */
  int rc = uv_timer_start(&p->timer, peer_retry_cb, p->backoff_ms, 0);
  if (rc != 0) {
    p->state = P_IDLE;
    logf_(t, SAGA_LOG_ERROR, "tcp: cannot schedule a reconnect to %s: %s (the next send "
          "connects)", p->address, uv_strerror(rc));
    return;
  }
  p->backoff_ms = p->backoff_ms * 2 > t->backoff_max ? t->backoff_max : p->backoff_ms * 2;
}

/* Drops a peer's connection: its unconfirmed messages are the outbox's to resend. Reconnects
 * with backoff while messages wait, else on the next send. */
static void peer_drop(peer *p, saga_log_level lvl, const char *why) {
  tcp_tr *t = p->tr;
  if (p->lnk != NULL) {
    link_close(p->lnk);
    p->lnk = NULL;
  }
  tokset_clear(&p->sent);
  p->warned_acks = 0;
  if (why != NULL) logf_(t, lvl, "tcp: connection to %s lost: %s", p->address, why);
  if (t->closing || p->head == NULL) {
    p->state = P_IDLE;
    return;
  }
  peer_backoff(p);
}

/* Writes f on the peer's connection, remembering its token until confirmed. */
static int peer_write(peer *p, frame *f) {
  if (tokset_add(p->tr, &p->sent, f->token) != SAGA_OK) {
    tr_free(p->tr, f);
    return SAGA_ENOMEM;
  }
  return link_write(p->lnk, f);
}

static void peer_flush(peer *p) {
  while (p->head != NULL && p->state == P_CONNECTED) {
    frame *f = p->head;
    p->head = f->next;
    if (p->head == NULL) p->tail = NULL;
    p->queued_bytes -= f->len;
    tokset_take(&p->queued, f->token);
    if (peer_write(p, f) != SAGA_OK) {
      peer_drop(p, SAGA_LOG_INFO, "write failed");
      return;
    }
  }
}

static void peer_ready(peer *p) {
  tcp_tr *t = p->tr;
  p->state = P_CONNECTED;
  p->backoff_ms = t->backoff_min;
  if (p->lnk->ssl != NULL)
    logf_(t, SAGA_LOG_INFO, "tcp: connected to %s (TLS, peer '%s')", p->address, p->lnk->ident);
  else
    logf_(t, SAGA_LOG_INFO, "tcp: connected to %s", p->address);
  peer_flush(p);
}

/* A confirmation counts only for a token sent on this connection and still unconfirmed. */
static const char *on_peer_frame(void *ctx, const saga__tcp_frame *f) {
  lnk *l = ctx;
  peer *p = l->peer;
  tcp_tr *t = l->tr;
  if (f->kind == SAGA_TCP_DATA) return "unexpected DATA frame on an outbound connection";
  if (!tokset_take(&p->sent, f->token)) {
    t->stats.acks_ignored++;
    if (!p->warned_acks) {
      p->warned_acks = 1;
      logf_(t, SAGA_LOG_WARN, "tcp: %s confirmed message %llu, which was not sent to it or is "
            "already confirmed: ignored (further ones on this connection are only counted)",
            p->address, (unsigned long long)f->token);
    }
    return NULL;
  }
  if (f->kind == SAGA_TCP_ACK) {
    saga_transport_sent(&t->base, f->token, SAGA_OK);
    return NULL;
  }
  logf_(t, SAGA_LOG_WARN, "tcp: %s refused message %llu: %.*s", p->address,
        (unsigned long long)f->token, (int)(f->payload_len > 200 ? 200 : f->payload_len),
        (const char *)f->payload);
  saga_transport_sent(&t->base, f->token, SAGA_ETRANSPORT);
  return NULL;
}

/* ---- the receiving side: inbound connections ---------------------------------------------- */

static void conn_drop(lnk *c, saga_log_level lvl, const char *why) {
  if (c->closing) return;
  tcp_tr *t = c->tr;
  for (lnk **pp = &t->conns; *pp != NULL; pp = &(*pp)->next)
    if (*pp == c) {
      *pp = c->next;
      t->nconns--;
      break;
    }
  if (why != NULL) {
    char ip[64] = "?";
    int named = -1;
    if (c->from.ss_family == AF_INET6)
      named = uv_ip6_name((const struct sockaddr_in6 *)&c->from, ip, sizeof ip);
    else if (c->from.ss_family == AF_INET)
      named = uv_ip4_name((const struct sockaddr_in *)&c->from, ip, sizeof ip);
    if (named != 0) snprintf(ip, sizeof ip, "?"); /* no address (yet), or not printable */
    logf_(t, lvl, "tcp: dropping inbound connection %u from %s%s%s%s: %s", c->id, ip,
          c->ident[0] ? " ('" : "", c->ident, c->ident[0] ? "')" : "", why);
  }
  link_close(c);
}

/* Drops a link that failed (a write, a socket option): its side's drop. */
static void link_fail(lnk *l, const char *why) {
  if (l->closing) return;
  if (l->peer != NULL)
    peer_drop(l->peer, SAGA_LOG_INFO, why); /* an open outbound link is its peer's link */
  else
    conn_drop(l, SAGA_LOG_WARN, why);
}

static int subscribed(tcp_tr *t, const char *channel) {
  for (size_t i = 0; i < t->nsubs; i++)
    if (strcmp(t->subs[i], channel) == 0) return 1;
  return 0;
}

static int allowed(const lnk *c, const char *channel) {
  if (c->allow_all) return 1;
  for (size_t i = 0; i < c->nallowed; i++)
    if (strcmp(c->allowed[i], channel) == 0) return 1;
  return 0;
}

/* Writes an ACK or NACK back, unless the peer lets them pile up unread. */
static const char *conn_reply(lnk *c, frame *f) {
  tcp_tr *t = c->tr;
  if (f == NULL) return "out of memory";
  if (link_backlog(c) + f->len > t->max_reply_queue) {
    tr_free(t, f);
    t->stats.slow_readers_dropped++;
    return "not reading its acknowledgements (over max_reply_queue_bytes)";
  }
  return link_write(c, f) == SAGA_OK ? NULL : "write failed";
}

static const char *on_conn_frame(void *ctx, const saga__tcp_frame *f) {
  lnk *c = ctx;
  tcp_tr *t = c->tr;
  if (f->kind != SAGA_TCP_DATA) return "unexpected ACK/NACK frame on an inbound connection";
  char channel[SAGA_TCP_CHANNEL_MAX + 1];
  memcpy(channel, f->channel, f->channel_len);
  channel[f->channel_len] = '\0';
  if (t->ctx != NULL && !allowed(c, channel)) {
    static _Thread_local char why[SAGA_TCP_CHANNEL_MAX + 96];
    t->stats.frames_refused++;
    for (char *ch = channel; *ch != '\0'; ch++)
      if (*ch < 0x20 || *ch > 0x7e) *ch = '?';
    snprintf(why, sizeof why, "the access list does not let it send to channel '%s'", channel);
    return why;
  }
  c->authed = 1;
  if (!subscribed(t, channel)) {
    static const char reason[] = "channel not served by this node";
    return conn_reply(c, make_frame(t, SAGA_TCP_NACK, f->token, NULL, reason, sizeof reason - 1));
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
      uint8_t *busy = tr_realloc(t, c->busy, cap);
      if (busy == NULL) return "out of memory";
      c->busy = busy;
    }
    slot = (uint32_t)c->nslots++;
  }
  c->tokens[slot] = f->token;
  c->busy[slot] = 1;
  uint64_t tag = ((uint64_t)c->id << 32) | slot;
  if (saga_transport_deliver(&t->base, channel, f->payload, f->payload_len, tag) != SAGA_OK) {
    c->busy[slot] = 0; /* the node did not take it: never acknowledged */
    c->free_slots[c->nfree++] = slot;
  }
  return NULL;
}

/* After an inbound handshake: who the peer is, and which channels it may send to. */
static const char *conn_authorize(lnk *c) {
  tcp_tr *t = c->tr;
  X509 *cert = SSL_get1_peer_certificate(c->ssl);
  if (cert == NULL) return "no client certificate";
  link_identity(c, cert);
  const char **list = tr_malloc(t, (t->nallows ? t->nallows : 1) * sizeof *list);
  if (list == NULL) {
    X509_free(cert);
    return "out of memory";
  }
  c->allowed = list;
  for (size_t i = 0; i < t->nallows; i++) {
    const allow *a = &t->allows[i];
    if (strcmp(a->identity, "*") != 0 &&
        X509_check_host(cert, a->identity, 0, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, NULL) != 1)
      continue;
    if (strcmp(a->channel, "*") == 0)
      c->allow_all = 1;
    else
      list[c->nallowed++] = a->channel;
  }
  X509_free(cert);
  c->authed = 1;
  logf_(t, SAGA_LOG_DEBUG, "tcp: inbound connection %u authenticated as '%s' (%s)", c->id,
        c->ident, c->allow_all ? "all channels" : c->nallowed ? "some channels" : "no channel");
  return NULL;
}

/* ---- reading (both sides) ----------------------------------------------------------------- */

/* Takes bytes from the socket into l's plaintext buffer, through TLS when on. */
static const char *link_input(lnk *l, const char *data, size_t n, char *why, size_t wlen) {
  tcp_tr *t = l->tr;
  l->active_ms = uv_now(t->loop);
  if (l->ssl == NULL) return rbuf_append(l, data, n) == SAGA_OK ? NULL : "out of memory";
  if (BIO_write(l->net_in, data, (int)n) != (int)n) return "out of memory";
  if (!l->ready) {
    err_clear();
    int r = SSL_do_handshake(l->ssl);
    int e = r == 1 ? SSL_ERROR_NONE : SSL_get_error(l->ssl, r);
    int flushed = tls_flush(l);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
      return flushed == SAGA_OK ? NULL : "write failed";
    if (e != SSL_ERROR_NONE) {
      t->stats.handshakes_failed++;
      return tls_reason(l, why, wlen);
    }
    if (flushed != SAGA_OK) return "write failed";
    l->ready = 1;
    if (l->peer != NULL) {
      X509 *cert = SSL_get1_peer_certificate(l->ssl);
      if (cert != NULL) link_identity(l, cert);
      X509_free(cert);
      peer_ready(l->peer);
      if (l->closing) return NULL;
    } else {
      const char *err = conn_authorize(l);
      if (err != NULL) return err;
    }
  }
  for (;;) {
    char buf[16384];
    err_clear();
    int r = SSL_read(l->ssl, buf, sizeof buf);
    if (r > 0) {
      if (rbuf_append(l, buf, (size_t)r) != SAGA_OK) return "out of memory";
      continue;
    }
    int e = SSL_get_error(l->ssl, r);
    if (tls_flush(l) != SAGA_OK) return "write failed";
    if (e == SSL_ERROR_WANT_READ) return NULL;
    if (e == SSL_ERROR_ZERO_RETURN) return "the peer ended the TLS session";
    return tls_reason(l, why, wlen);
  }
}

/* Splits l's plaintext into frames for its side's handler. */
static const char *link_drain(lnk *l) {
  tcp_tr *t = l->tr;
  size_t used = 0;
  uint64_t refused = t->stats.frames_refused;
  const char *err = saga__tcp_frames_split(l->rbuf, l->rlen, t->max_frame,
                                           l->peer != NULL ? on_peer_frame : on_conn_frame, l,
                                           &used);
  if (err != NULL && t->stats.frames_refused == refused && strcmp(err, "out of memory") != 0)
    t->stats.frames_malformed++;
  if (used > 0 && used < l->rlen) memmove(l->rbuf, l->rbuf + used, l->rlen - used);
  l->rlen -= used;
  return err;
}

static void link_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  lnk *l = (lnk *)s;
  if (l->closing || n == 0) return;
  const char *err = NULL;
  char why[256];
  if (n < 0)
    err = n == UV_EOF ? "closed by the peer" : uv_strerror((int)n);
  else
    err = link_input(l, buf->base, (size_t)n, why, sizeof why);
  if (err == NULL && l->ready && !l->closing) err = link_drain(l);
  if (err == NULL || l->closing) return;
  int quiet = n == UV_EOF || n == UV_ECONNRESET;
  if (l->peer != NULL)
    peer_drop(l->peer, quiet ? SAGA_LOG_INFO : SAGA_LOG_WARN, err);
  else
    conn_drop(l, SAGA_LOG_WARN, quiet ? NULL : err);
}

/* ---- connecting --------------------------------------------------------------------------- */

static void peer_connected(uv_connect_t *req, int status) {
  lnk *l = req->data;
  if (l->closing) return; /* dropped meanwhile (timeout, close) */
  peer *p = l->peer;
  if (status < 0) {
    peer_drop(p, SAGA_LOG_INFO, uv_strerror(status));
    return;
  }
  /* Without TCP_NODELAY small frames would wait for Nagle; a socket that refuses the option
   * is broken (reset meanwhile): the connection is dropped and tried again. */
  int rc = uv_tcp_nodelay(&l->tcp, 1);
  if (rc == 0) rc = uv_read_start((uv_stream_t *)&l->tcp, alloc_cb, link_read);
  if (rc != 0) {
    peer_drop(p, SAGA_LOG_WARN, uv_strerror(rc));
    return;
  }
  if (l->tr->ctx == NULL) {
    l->ready = 1;
    peer_ready(p);
    return;
  }
  if (link_tls_start(l, 0) != SAGA_OK) {
    peer_drop(p, SAGA_LOG_WARN, "cannot start TLS (out of memory)");
    return;
  }
  p->state = P_HANDSHAKE;
  err_clear();
  SSL_do_handshake(l->ssl); /* the ClientHello; the answer comes through link_read */
  if (tls_flush(l) != SAGA_OK) peer_drop(p, SAGA_LOG_INFO, "write failed");
}

static void peer_connect(peer *p) {
  tcp_tr *t = p->tr;
  int uverr;
  lnk *l = link_new(t, p, &uverr);
  if (l == NULL) {
    logf_(t, SAGA_LOG_WARN, "tcp: cannot connect to %s: %s; trying again later", p->address,
          uverr != 0 ? uv_strerror(uverr) : "out of memory");
    peer_backoff(p);
    return;
  }
  p->lnk = l;
  p->state = P_CONNECTING;
  l->connect_req.data = l;
  int rc = uv_tcp_connect(&l->connect_req, &l->tcp, (const struct sockaddr *)&p->addr,
                          peer_connected);
  if (rc != 0) peer_drop(p, SAGA_LOG_INFO, uv_strerror(rc));
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
  if (len > t->max_frame || strlen(channel) > SAGA_TCP_CHANNEL_MAX) return SAGA_ETOOBIG;
  /* A resend of a message still waiting for a connection adds nothing: the queue holds one
   * copy per token, however long the peer is away. */
  if (p->state != P_CONNECTED && tokset_has(&p->queued, token)) {
    if (p->state == P_IDLE) peer_connect(p); /* a reconnect that could not be scheduled */
    return SAGA_OK;
  }
  size_t waiting = p->queued_bytes + (p->lnk != NULL ? link_backlog(p->lnk) : 0);
  if (waiting + len > t->max_queued) return SAGA_EBUSY;
  frame *f = make_frame(t, SAGA_TCP_DATA, token, channel, data, len);
  if (f == NULL) return SAGA_ENOMEM;
  if (f->len - 4 > t->max_frame) {
    tr_free(t, f);
    return SAGA_ETOOBIG;
  }
  if (p->state == P_CONNECTED) {
    if (peer_write(p, f) != SAGA_OK) peer_drop(p, SAGA_LOG_INFO, "write failed");
    return SAGA_OK;
  }
  if (tokset_add(t, &p->queued, token) != SAGA_OK) {
    tr_free(t, f);
    return SAGA_ENOMEM;
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

/* ---- accepting ---------------------------------------------------------------------------- */

/* Makes room for c under the connection caps: a connection that has not proved itself yet
 * (no finished handshake; in plaintext, no valid frame) gives way, oldest first, so idle
 * strangers cannot keep a legitimate peer out. Returns 0 if c must be refused. */
static int admit(tcp_tr *t, lnk *c) {
  for (;;) {
    size_t same = 0;
    for (lnk *o = t->conns; o != NULL; o = o->next) same += same_host(&o->from, &c->from);
    int per_ip = same >= t->max_conns_ip;
    if (!per_ip && t->nconns < t->max_conns) return 1;
    lnk *victim = NULL;
    for (lnk *o = t->conns; o != NULL; o = o->next)
      if (!o->authed && (!per_ip || same_host(&o->from, &c->from)) &&
          (victim == NULL || o->opened_ms <= victim->opened_ms))
        victim = o;
    if (victim == NULL) return 0;
    t->stats.connections_refused++;
    conn_drop(victim, SAGA_LOG_DEBUG, "connection limit reached: gives way to a newer one");
  }
}

/* Logs a trouble of the listener at most once a second (a flood of them, once). */
static int accept_log_due(tcp_tr *t) {
  uint64_t now = uv_now(t->loop);
  if (t->accept_warned_ms != 0 && now - t->accept_warned_ms < 1000) return 0;
  t->accept_warned_ms = now;
  return 1;
}

/* Takes the connection waiting in the listener. Without memory for it, it stays there:
 * libuv pauses the listener until it is taken, and the sweep timer tries again. */
static void accept_one(tcp_tr *t) {
  int uverr;
  lnk *c = link_new(t, NULL, &uverr);
  if (c == NULL) {
    if (!t->accept_stalled || accept_log_due(t))
      logf_(t, SAGA_LOG_ERROR, "tcp: cannot accept an inbound connection: %s; the listener "
            "waits and tries again", uverr != 0 ? uv_strerror(uverr) : "out of memory");
    t->accept_stalled = 1;
    return;
  }
  t->accept_stalled = 0;
  int rc = uv_accept((uv_stream_t *)&t->listener, (uv_stream_t *)&c->tcp);
  if (rc != 0) { /* the socket is closed by libuv; the listener goes on */
    if (accept_log_due(t))
      logf_(t, SAGA_LOG_WARN, "tcp: accepting an inbound connection failed: %s",
            uv_strerror(rc));
    link_close(c);
    return;
  }
  int len = sizeof c->from;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&c->from, &len) != 0) {
    link_close(c); /* gone already */
    return;
  }
  if (!admit(t, c)) {
    t->stats.connections_refused++;
    uint64_t now = uv_now(t->loop);
    static _Thread_local uint64_t last_log;
    if (now - last_log >= 1000 || last_log == 0) { /* a flood is logged once a second */
      last_log = now;
      logf_(t, SAGA_LOG_WARN, "tcp: refusing inbound connections: %u open (max_connections %u, "
            "max_connections_per_ip %u), none waiting to authenticate; %llu refused so far",
            (unsigned)t->nconns, t->max_conns, t->max_conns_ip,
            (unsigned long long)t->stats.connections_refused);
    }
    link_close(c);
    return;
  }
  t->stats.connections_accepted++;
  c->id = t->next_conn_id++;
  c->next = t->conns;
  t->conns = c;
  t->nconns++;
  rc = uv_tcp_nodelay(&c->tcp, 1); /* fails only for a socket that is broken already */
  if (rc != 0) {
    conn_drop(c, SAGA_LOG_WARN, uv_strerror(rc));
    return;
  }
  if (t->ctx != NULL && link_tls_start(c, 1) != SAGA_OK) {
    conn_drop(c, SAGA_LOG_WARN, "cannot start TLS (out of memory)");
    return;
  }
  c->ready = t->ctx == NULL;
  rc = uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, link_read);
  if (rc != 0) conn_drop(c, SAGA_LOG_WARN, uv_strerror(rc));
}

static void on_connection(uv_stream_t *server, int status) {
  tcp_tr *t = server->data;
  if (t->closing) return; /* closing the listener closes what waits in it */
  if (status < 0) {       /* accept(2) failed (EMFILE, ENOBUFS, ...): the listener goes on */
    if (accept_log_due(t))
      logf_(t, SAGA_LOG_WARN, "tcp: accepting an inbound connection failed: %s",
            uv_strerror(status));
    return;
  }
  accept_one(t);
}

static void tr_ack(saga_transport *base, uint64_t tag) {
  tcp_tr *t = (tcp_tr *)base;
  uint32_t id = (uint32_t)(tag >> 32), slot = (uint32_t)tag;
  for (lnk *c = t->conns; c != NULL; c = c->next) {
    if (c->id != id) continue;
    if (c->closing) return;
    if (slot >= c->nslots || !c->busy[slot]) {
      /* Not a delivery awaiting its ack (acknowledged already): freeing the slot again would
       * hand it to two deliveries, and the ACK of one would confirm the other's token. */
      logf_(t, SAGA_LOG_ERROR, "tcp: ack of a delivery that awaits none (slot %u) ignored",
            (unsigned)slot);
      return;
    }
    c->busy[slot] = 0;
    c->free_slots[c->nfree++] = slot;
    const char *err = conn_reply(c, make_frame(t, SAGA_TCP_ACK, c->tokens[slot], NULL, NULL, 0));
    if (err != NULL) conn_drop(c, SAGA_LOG_WARN, err);
    return;
  }
  /* The connection is gone: the sender resends and the node answers the duplicate. */
}

/* Handshake, connect and idle deadlines; a stalled accept tried again. */
static void sweep_cb(uv_timer_t *h) {
  tcp_tr *t = h->data;
  if (t->accept_stalled && t->listening && !t->closing) accept_one(t);
  uint64_t now = uv_now(t->loop);
  char why[96];
  for (lnk *c = t->conns, *next; c != NULL; c = next) {
    next = c->next;
    if (!c->ready && now - c->opened_ms >= t->handshake_ms) {
      t->stats.handshakes_failed++;
      snprintf(why, sizeof why, "TLS handshake not finished within %u ms", t->handshake_ms);
      conn_drop(c, SAGA_LOG_WARN, why);
    } else if (t->idle_ms > 0 && now - c->active_ms >= t->idle_ms) {
      t->stats.idle_closed++;
      snprintf(why, sizeof why, "idle for %u ms", t->idle_ms);
      conn_drop(c, SAGA_LOG_INFO, why);
    }
  }
  for (size_t i = 0; i < t->npeers; i++) {
    peer *p = t->peers[i];
    if ((p->state == P_CONNECTING || p->state == P_HANDSHAKE) &&
        now - p->lnk->opened_ms >= t->handshake_ms) {
      if (p->state == P_HANDSHAKE) t->stats.handshakes_failed++;
      snprintf(why, sizeof why, "%s not finished within %u ms",
               p->state == P_HANDSHAKE ? "TLS handshake" : "connect", t->handshake_ms);
      peer_drop(p, SAGA_LOG_WARN, why);
    }
  }
}

/* Writes what every link gathered this loop turn; a link whose write fails is dropped. */
static void flush_dirty(tcp_tr *t) {
  while (t->dirty != NULL) {
    lnk *l = t->dirty;
    t->dirty = l->dnext;
    l->dirty = 0;
    if (l->closing || link_send_now(l) == SAGA_OK) continue;
    if (l->peer != NULL)
      peer_drop(l->peer, SAGA_LOG_INFO, "write failed");
    else
      conn_drop(l, SAGA_LOG_WARN, "write failed");
  }
}

static void before_poll_cb(uv_prepare_t *h) { flush_dirty(h->data); }
static void after_poll_cb(uv_check_t *h) { flush_dirty(h->data); }

/* ---- lifecycle ---------------------------------------------------------------------------- */

/* Hands every handle the transport initialised to uv_close() (links too). Their memory
 * stays until each close callback has run (pending_closes counts them down). */
static void close_handles(tcp_tr *t) {
  if (t->listening) {
    t->listening = 0;
    t->pending_closes++;
    uv_close((uv_handle_t *)&t->listener, handle_closed);
  }
  if (t->sweeping) {
    t->sweeping = 0;
    t->pending_closes++;
    uv_close((uv_handle_t *)&t->sweep, handle_closed);
  }
  if (t->preparing) {
    t->preparing = 0;
    t->pending_closes++;
    uv_close((uv_handle_t *)&t->before_poll, handle_closed);
  }
  if (t->checking) {
    t->checking = 0;
    t->pending_closes++;
    uv_close((uv_handle_t *)&t->after_poll, handle_closed);
  }
  while (t->conns != NULL) conn_drop(t->conns, SAGA_LOG_DEBUG, NULL);
  for (size_t i = 0; i < t->npeers; i++) {
    peer *p = t->peers[i];
    peer_drop(p, SAGA_LOG_INFO, NULL); /* closing: no reconnect is scheduled */
    if (p->timer_live) {
      p->timer_live = 0;
      t->pending_closes++;
      p->timer.data = t;
      uv_close((uv_handle_t *)&p->timer, handle_closed);
    }
  }
}

/*
 * Starts the transport's handles on loop. Every libuv call is checked: one that fails is
 * logged and the open fails with SAGA_ETRANSPORT, after handing each handle initialised so
 * far to uv_close(). The memory stays valid until their close callbacks ran; destroy() may
 * be called at once (it then frees once the loop has run them), and close() too.
 */
static int tr_open(saga_transport *base, uv_loop_t *loop) {
  tcp_tr *t = (tcp_tr *)base;
  if (loop == NULL) return SAGA_EINVAL;
  if (t->loop != NULL || t->closing) return SAGA_ESTATE; /* opened once only */
  t->loop = loop;
  /* A write to a connection the peer closed raises SIGPIPE, whose default action ends the
   * process. Only when nobody chose a disposition, make it an EPIPE error instead. */
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
    if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
      logf_(t, SAGA_LOG_WARN, "tcp: SIGPIPE is unhandled and cannot be ignored: a write to a "
                              "closed connection will end the process");
    else
      logf_(t, SAGA_LOG_INFO, "tcp: SIGPIPE was unhandled; now ignored (writes to closed "
                              "connections fail with EPIPE instead of ending the process)");
  }
  if (t->ctx == NULL)
    logf_(t, SAGA_LOG_WARN, "tcp: INSECURE PLAINTEXT (insecure_plaintext is set): no TLS, no "
          "peer authentication, no access list; anyone who reaches %s can send any command or "
          "reply, and anyone on the path can read and change messages. For loopback tests "
          "and demos only", t->listen != NULL ? t->listen : "this node's peers");
  else if (t->listen != NULL && t->nallows == 0)
    logf_(t, SAGA_LOG_WARN, "tcp: the access list is empty: every message sent to %s will be "
          "refused", t->listen);
  const char *what;
  int rc;
  for (size_t i = 0; i < t->npeers; i++) {
    peer *p = t->peers[i];
    what = "uv_timer_init";
    if ((rc = uv_timer_init(loop, &p->timer)) != 0) goto fail;
    p->timer_live = 1;
    p->timer.data = p;
  }
  what = "uv_timer_init";
  if ((rc = uv_timer_init(loop, &t->sweep)) != 0) goto fail;
  t->sweeping = 1;
  t->sweep.data = t;
  uint32_t period = t->handshake_ms;
  if (t->idle_ms > 0 && t->idle_ms < period) period = t->idle_ms;
  period /= 4;
  period = period < 10 ? 10 : period > 1000 ? 1000 : period;
  what = "uv_timer_start";
  if ((rc = uv_timer_start(&t->sweep, sweep_cb, period, period)) != 0) goto fail;
  what = "uv_prepare_init";
  if ((rc = uv_prepare_init(loop, &t->before_poll)) != 0) goto fail;
  t->preparing = 1;
  t->before_poll.data = t;
  what = "uv_check_init";
  if ((rc = uv_check_init(loop, &t->after_poll)) != 0) goto fail;
  t->checking = 1;
  t->after_poll.data = t;
  what = "uv_prepare_start";
  if ((rc = uv_prepare_start(&t->before_poll, before_poll_cb)) != 0) goto fail;
  what = "uv_check_start";
  if ((rc = uv_check_start(&t->after_poll, after_poll_cb)) != 0) goto fail;
  uv_unref((uv_handle_t *)&t->before_poll); /* they never keep a loop alive */
  uv_unref((uv_handle_t *)&t->after_poll);
  if (t->listen == NULL) return SAGA_OK;
  what = "uv_tcp_init";
  if ((rc = uv_tcp_init(loop, &t->listener)) != 0) goto fail;
  t->listening = 1;
  t->listener.data = t;
  rc = uv_tcp_bind(&t->listener, (const struct sockaddr *)&t->listen_addr, 0);
  /* A bind error may also be reported by uv_listen (libuv defers EADDRINUSE to it). */
  if (rc == 0) rc = uv_listen((uv_stream_t *)&t->listener, 128, on_connection);
  if (rc != 0) {
    logf_(t, SAGA_LOG_ERROR, "tcp: cannot listen on %s: %s", t->listen, uv_strerror(rc));
    goto unwind;
  }
  return SAGA_OK;
fail:
  logf_(t, SAGA_LOG_ERROR, "tcp: cannot open: %s failed: %s", what, uv_strerror(rc));
unwind:
  t->closing = 1; /* no I/O from now on; close() and destroy() remain */
  close_handles(t);
  return SAGA_ETRANSPORT;
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
  if (t->close_called || t->destroyed) return;
  t->close_called = 1;
  t->closing = 1;
  close_handles(t); /* nothing for a transport never opened, or whose open failed */
  maybe_closed(t);  /* reports now, or when the last close callback ran */
}

/* Frees everything: only once no handle is closing any more. */
static void tr_free_all(tcp_tr *t) {
  for (size_t i = 0; i < t->npeers; i++) {
    peer *p = t->peers[i];
    while (p->head != NULL) {
      frame *f = p->head;
      p->head = f->next;
      tr_free(t, f);
    }
    tokset_free(t, &p->sent);
    tokset_free(t, &p->queued);
    tr_free(t, p->address);
    tr_free(t, p->identity);
    tr_free(t, p);
  }
  tr_free(t, t->peers);
  for (size_t i = 0; i < t->nroutes; i++) tr_free(t, t->routes[i].channel);
  tr_free(t, t->routes);
  for (size_t i = 0; i < t->nsubs; i++) tr_free(t, t->subs[i]);
  tr_free(t, t->subs);
  for (size_t i = 0; i < t->nallows; i++) {
    tr_free(t, t->allows[i].identity);
    tr_free(t, t->allows[i].channel);
  }
  tr_free(t, t->allows);
  tr_free(t, t->listen);
  if (t->ctx != NULL) SSL_CTX_free(t->ctx);
  saga_allocator a = t->alloc;
  a.free(t, a.ud);
}

/* Safe at any time: never opened, after a failed open, after close() whether or not its
 * close completed, even while open (its handles are then closed here). Frees at once when no
 * handle is closing, else from the last close callback; nothing is reported to the host
 * after this call. */
static void tr_destroy(saga_transport *base) {
  tcp_tr *t = (tcp_tr *)base;
  if (t->destroyed) return;
  t->destroyed = 1;
  if (!t->closing) {
    t->closing = 1;
    close_handles(t);
  }
  maybe_closed(t);
}

/* A channel is reachable when a route names it; without one, sending can never succeed. */
static int tr_can_send(saga_transport *base, const char *channel) {
  return route_peer((tcp_tr *)base, channel) != NULL;
}

static const saga_transport_methods tcp_methods = {
    .version = SAGA_TRANSPORT_VERSION,
    .name = "tcp",
    .open = tr_open,
    .subscribe = tr_subscribe,
    .send = tr_send,
    .ack = tr_ack,
    .close = tr_close,
    .destroy = tr_destroy,
    .can_send = tr_can_send,
};

/* ---- configuration ------------------------------------------------------------------------ */

/* Writes exactly size bytes at out: min(size, have) from src, zeros after (docs/abi.md). */
static void copy_sized(void *out, size_t size, const void *src, size_t have) {
  size_t n = size < have ? size : have;
  memcpy(out, src, n);
  if (size > n) memset((char *)out + n, 0, size - n);
}

int saga_tcp_config_init_sized(saga_tcp_config *cfg, size_t size) {
  /* Version 2 (the only one accepted) ends after max_reply_queue_bytes. A later version
   * appends fields and is given to callers whose size holds them. */
  if (cfg == NULL || size < offsetof(saga_tcp_config, max_reply_queue_bytes) + sizeof(size_t))
    return SAGA_EINVAL;
  saga_tcp_config c;
  memset(&c, 0, sizeof c);
  c.struct_version = SAGA_TCP_CONFIG_VERSION;
  c.max_frame_bytes = (1u << 20) + 4096;
  c.max_queued_bytes = (size_t)64 << 20;
  c.reconnect_min_ms = 50;
  c.reconnect_max_ms = 5000;
  c.max_connections = 256;
  c.max_connections_per_ip = 32;
  c.handshake_timeout_ms = 5000;
  c.idle_timeout_ms = 300000;
  c.max_reply_queue_bytes = (size_t)1 << 20;
  copy_sized(cfg, size, &c, sizeof c);
  return SAGA_OK;
}

static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(char *err, size_t errlen, int rc, const char *fmt, ...) {
  if (err != NULL && errlen > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return rc;
}

static const char *ssl_err(void) {
  static _Thread_local char buf[200];
  unsigned long e = ERR_peek_last_error();
  if (e == 0) return "unknown error";
  ERR_error_string_n(e, buf, sizeof buf);
  ERR_clear_error();
  return buf;
}

static int tls_setup(tcp_tr *t, const saga_tcp_config *cfg, char *err, size_t errlen) {
  if (cfg->tls_ca_file == NULL || cfg->tls_cert_file == NULL || cfg->tls_key_file == NULL)
    return fail(err, errlen, SAGA_EINVAL, "tcp: TLS needs tls_ca_file, tls_cert_file and "
                "tls_key_file (or set insecure_plaintext for a loopback test)");
  ERR_clear_error();
  SSL_CTX *ctx = SSL_CTX_new(TLS_method());
  if (ctx == NULL) return fail(err, errlen, SAGA_ENOMEM, "tcp: TLS: %s", ssl_err());
  t->ctx = ctx;
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_num_tickets(ctx, 0);                 /* no resumption: nothing to keep */
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS); /* idle connections hold no buffers */
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  if (SSL_CTX_load_verify_locations(ctx, cfg->tls_ca_file, NULL) != 1)
    return fail(err, errlen, SAGA_EINVAL, "tcp: cannot load tls_ca_file '%s': %s",
                cfg->tls_ca_file, ssl_err());
  if (SSL_CTX_use_certificate_chain_file(ctx, cfg->tls_cert_file) != 1)
    return fail(err, errlen, SAGA_EINVAL, "tcp: cannot load tls_cert_file '%s': %s",
                cfg->tls_cert_file, ssl_err());
  if (SSL_CTX_use_PrivateKey_file(ctx, cfg->tls_key_file, SSL_FILETYPE_PEM) != 1)
    return fail(err, errlen, SAGA_EINVAL, "tcp: cannot load tls_key_file '%s': %s",
                cfg->tls_key_file, ssl_err());
  if (SSL_CTX_check_private_key(ctx) != 1)
    return fail(err, errlen, SAGA_EINVAL, "tcp: tls_key_file '%s' does not match tls_cert_file "
                "'%s'", cfg->tls_key_file, cfg->tls_cert_file);
  return SAGA_OK;
}

static peer *peer_for(tcp_tr *t, const saga_tcp_route *r, int *rc, char *err, size_t errlen) {
  for (size_t i = 0; i < t->npeers; i++) {
    peer *p = t->peers[i];
    if (strcmp(p->address, r->address) != 0) continue;
    if ((p->identity == NULL) != (r->identity == NULL) ||
        (p->identity != NULL && strcmp(p->identity, r->identity) != 0)) {
      *rc = fail(err, errlen, SAGA_EINVAL, "tcp: routes to %s name different identities",
                 r->address);
      return NULL;
    }
    return p;
  }
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
  p->address = tr_strdup(t, r->address);
  if (r->identity != NULL) p->identity = tr_strdup(t, r->identity);
  if (p->address == NULL || (r->identity != NULL && p->identity == NULL)) {
    *rc = SAGA_ENOMEM;
  } else if (parse_address(r->address, &p->addr) != SAGA_OK) {
    *rc = fail(err, errlen, SAGA_EINVAL, "tcp: bad route address '%s' (want host:port)",
               r->address);
  } else if (r->identity != NULL && r->identity[0] == '\0') {
    *rc = fail(err, errlen, SAGA_EINVAL, "tcp: empty route identity for %s", r->address);
  } else {
    t->peers[t->npeers++] = p;
    return p;
  }
  tr_free(t, p->address);
  tr_free(t, p->identity);
  tr_free(t, p);
  return NULL;
}

int saga_tcp_transport_new2(saga_transport **out, const saga_tcp_config *cfg, char *err,
                            size_t errlen) {
  if (err != NULL && errlen > 0) err[0] = '\0';
  if (out == NULL || cfg == NULL) return fail(err, errlen, SAGA_EINVAL, "tcp: NULL argument");
  if (cfg->struct_version != SAGA_TCP_CONFIG_VERSION)
    return fail(err, errlen, SAGA_EVERSION, "tcp: config struct_version %d, expected %d",
                cfg->struct_version, SAGA_TCP_CONFIG_VERSION);
  if ((cfg->routes == NULL && cfg->nroutes > 0) || (cfg->allow == NULL && cfg->nallow > 0))
    return fail(err, errlen, SAGA_EINVAL, "tcp: routes or allow is NULL with a count");
  saga_allocator a = {libc_malloc, libc_realloc, libc_free, NULL};
  if (cfg->alloc != NULL) a = *cfg->alloc;
  if (a.malloc == NULL || a.realloc == NULL || a.free == NULL)
    return fail(err, errlen, SAGA_EINVAL, "tcp: incomplete allocator");
  tcp_tr *t = a.malloc(sizeof *t, a.ud);
  if (t == NULL) return SAGA_ENOMEM;
  memset(t, 0, sizeof *t);
  t->alloc = a;
  t->base.methods = &tcp_methods;
  t->max_frame = cfg->max_frame_bytes ? cfg->max_frame_bytes : (1u << 20) + 4096;
  if (t->max_frame > UINT32_MAX - 16) t->max_frame = UINT32_MAX - 16;
  t->max_queued = cfg->max_queued_bytes ? cfg->max_queued_bytes : (size_t)64 << 20;
  t->backoff_min = cfg->reconnect_min_ms ? cfg->reconnect_min_ms : 50;
  t->backoff_max = cfg->reconnect_max_ms ? cfg->reconnect_max_ms : 5000;
  if (t->backoff_max < t->backoff_min) t->backoff_max = t->backoff_min;
  t->max_conns = cfg->max_connections ? cfg->max_connections : 256;
  t->max_conns_ip = cfg->max_connections_per_ip ? cfg->max_connections_per_ip : 32;
  t->handshake_ms = cfg->handshake_timeout_ms ? cfg->handshake_timeout_ms : 5000;
  t->idle_ms = cfg->idle_timeout_ms;
  t->max_reply_queue = cfg->max_reply_queue_bytes ? cfg->max_reply_queue_bytes : (size_t)1 << 20;
  int rc = SAGA_OK;
  if (!cfg->insecure_plaintext) rc = tls_setup(t, cfg, err, errlen);
  if (rc == SAGA_OK && cfg->listen != NULL) {
    t->listen = tr_strdup(t, cfg->listen);
    if (t->listen == NULL)
      rc = SAGA_ENOMEM;
    else if (parse_address(cfg->listen, &t->listen_addr) != SAGA_OK)
      rc = fail(err, errlen, SAGA_EINVAL, "tcp: bad listen address '%s' (want host:port)",
                cfg->listen);
  }
  if (rc == SAGA_OK && cfg->nroutes > 0) {
    t->routes = tr_malloc(t, cfg->nroutes * sizeof *t->routes);
    if (t->routes == NULL) rc = SAGA_ENOMEM;
  }
  for (size_t i = 0; rc == SAGA_OK && i < cfg->nroutes; i++) {
    const saga_tcp_route *r = &cfg->routes[i];
    if (r->channel == NULL || r->channel[0] == '\0' || strlen(r->channel) > SAGA_TCP_CHANNEL_MAX ||
        r->address == NULL) {
      rc = fail(err, errlen, SAGA_EINVAL, "tcp: route %zu needs a channel (1..%d bytes) and an "
                "address", i, SAGA_TCP_CHANNEL_MAX);
      break;
    }
    route *d = &t->routes[t->nroutes];
    d->peer = peer_for(t, r, &rc, err, errlen);
    if (d->peer == NULL) break;
    d->channel = tr_strdup(t, r->channel);
    if (d->channel == NULL) {
      rc = SAGA_ENOMEM;
      break;
    }
    t->nroutes++;
  }
  if (rc == SAGA_OK && cfg->nallow > 0) {
    t->allows = tr_malloc(t, cfg->nallow * sizeof *t->allows);
    if (t->allows == NULL) rc = SAGA_ENOMEM;
  }
  for (size_t i = 0; rc == SAGA_OK && i < cfg->nallow; i++) {
    const saga_tcp_allow *s = &cfg->allow[i];
    if (s->identity == NULL || s->identity[0] == '\0' || s->channel == NULL ||
        s->channel[0] == '\0') {
      rc = fail(err, errlen, SAGA_EINVAL, "tcp: allow entry %zu needs an identity and a "
                "channel (\"*\" for any)", i);
      break;
    }
    allow *d = &t->allows[t->nallows];
    d->identity = tr_strdup(t, s->identity);
    d->channel = tr_strdup(t, s->channel);
    t->nallows++; /* counted first, so that a failure frees what was copied */
    if (d->identity == NULL || d->channel == NULL) rc = SAGA_ENOMEM;
  }
  if (rc == SAGA_ENOMEM && err != NULL && errlen > 0 && err[0] == '\0')
    fail(err, errlen, rc, "tcp: out of memory");
  if (rc != SAGA_OK) {
    tr_destroy(&t->base);
    return rc;
  }
  *out = &t->base;
  return SAGA_OK;
}

int saga_tcp_transport_new(saga_transport **out, const saga_tcp_config *cfg) {
  return saga_tcp_transport_new2(out, cfg, NULL, 0);
}

int saga_tcp_stats_get(saga_transport *base, saga_tcp_stats *out, size_t size) {
  if (base == NULL || out == NULL || base->methods != &tcp_methods ||
      size < offsetof(saga_tcp_stats, slow_readers_dropped) + sizeof(uint64_t))
    return SAGA_EINVAL; /* the first version of the struct ended after slow_readers_dropped */
  copy_sized(out, size, &((tcp_tr *)base)->stats, sizeof(saga_tcp_stats));
  return SAGA_OK;
}
