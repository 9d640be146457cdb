/*
 * The NATS JetStream transport, on libnats. Written only against saga/sys/transport.h, as a
 * third-party adapter would be.
 *
 * Layout on the server: one stream (default "SAGA") with work-queue retention captures the
 * subjects "<prefix>.>"; channel C is the subject "<prefix>.C". Every subscribed channel has
 * one durable pull consumer, named after the channel, filtered on its subject, with explicit
 * acks and ack_wait; every transport subscribing the channel (the replicas of one service)
 * pulls from the same consumer, so each message goes to one of them. Work-queue retention
 * removes a message once it is acknowledged; a message sent to a channel nobody consumes yet
 * waits in the stream until a consumer appears. Both are created at open/subscribe, or
 * verified when they exist: a stream or consumer whose configuration would break these
 * semantics is reported (SAGA_EEXIST plus a log line naming the difference), never changed.
 *
 * Threads. libnats does its I/O on threads of its own and its calls block, while the node
 * lives on one libuv loop. So:
 *   - the loop thread makes the calls that do not wait for the server (publish, ack) and,
 *     at open/subscribe only, the JetStream management requests (bounded by NT_API_WAIT_MS);
 *   - each subscribed channel has a fetch thread that pulls messages (a long poll for one
 *     message while idle, then immediate batches while there is more) into a ring, at most
 *     NT_MAX_INFLIGHT messages fetched and not yet acknowledged per channel: the flow control;
 *   - one thread reads the publish acknowledgements: every message is published with the
 *     reply subject "<inbox>.<token>.<mac>", mac a keyed hash (SipHash-2-4, a random key of
 *     the transport's) of the token, so JetStream's ack names the token it confirms; the loop
 *     confirms it only if the token is in the table of publishes made and not confirmed yet
 *     (see "Confirmations" below);
 *   - libnats calls the connection callbacks (disconnected, reconnected, closed, errors) on
 *     its own thread.
 * They all hand their results to the loop through state guarded by `mu` and one uv_async_t;
 * only the loop thread calls into the core. The natsMsg of a delivery stays alive in a slot
 * until the node acknowledges its tag (natsMsg_Ack then), or ack_wait passed, or the
 * transport closes (in the last two cases without an ack: JetStream redelivers it).
 *
 * Delivery count. A message JetStream has delivered more than max_deliveries times (its
 * metadata's NumDelivered) is handed to saga_transport_dead_letter() instead of being
 * delivered; the node records it and acknowledges the tag. The consumer has no MaxDeliver
 * of its own, so a message the node failed to record comes again after ack_wait: nothing
 * is ever dropped silently, and a poison message costs one delivery per ack_wait, in
 * parallel with the rest of the channel (up to NT_MAX_INFLIGHT unacknowledged messages).
 *
 * Stuck consumers. A JetStream server can leave a consumer that has messages for its
 * subscribers but delivers none: nats-server before 2.10.25, killed right after it removed
 * acknowledged messages from the stream but before it wrote the consumer's state (some 10 ms
 * later), restarts with those messages still pending in the consumer; it retries them forever
 * and, while an older message stays in the stream, starves everything behind them, messages
 * it confirmed included. So each fetch thread, once its polls come back empty, looks at its
 * consumer every NT_STALL_MS: one that has messages waiting (or unacknowledged ones due for
 * redelivery) and delivered nothing meanwhile, while we were asking, is deleted and created
 * again, as is a consumer that disappeared. The new consumer starts from the stream's
 * content, which a work-queue stream reduces to what nobody acknowledged: those messages are
 * delivered again (duplicates the node tolerates), nothing is skipped.
 *
 * Outages. The connection reconnects forever. A publish made while disconnected goes to
 * libnats's reconnect buffer and is sent after the reconnect; it is confirmed only if
 * JetStream then stores it. When that buffer is full the publish is reported failed at once.
 * Either way the node's outbox resends what was not confirmed.
 *
 * One copy per token. The node resends every unconfirmed row each resend_ms, and during an
 * outage each resend used to add a copy to the reconnect buffer (tens of thousands for a few
 * hundred rows in a minute, all delivered on reconnect). So the `pend` entry of a token also
 * says which connection its latest copy goes out on (see current_gen: the current one, or the
 * next one for a copy in the reconnect buffer), and send() makes no new copy while that one is
 * on its way (pend_live): same connection or a later one, no negative ack, and on a live
 * connection an ack not overdue (NT_REPUBLISH_MS). A copy written to a connection that dropped
 * since, or refused by JetStream, or unanswered that long, may be lost: the next send publishes
 * again. Races with libnats's own threads (a reconnect completing between the reads) can only
 * make a copy look older than it is, so at worst one copy more, never one missing.
 *
 * Confirmations. Anyone allowed to publish on the ack inbox's subjects could otherwise confirm
 * a message JetStream never stored, and the node would delete it from its outbox. So an ack
 * counts only when its mac is right (it names a reply subject this transport made: only those
 * who see our publishes can know one) and its token is in `pend`, the set of tokens published
 * and not confirmed yet; it then leaves the set, and a repeated or late ack for it is ignored.
 * Everything else is ignored and counted (stats.acks_ignored). The set is bounded
 * (NT_PEND_MAX: a send beyond it fails and the outbox retries) and forgets entries left
 * unconfirmed for NT_PEND_TTL_MS (the outbox resends those too).
 *
 * Credentials and TLS (config version 2) are libnats options set at open; a failure to
 * authenticate or to complete the TLS handshake makes open() fail with libnats's reason in the
 * log. Later authorization failures and permission violations are counted and logged once per
 * change while the connection keeps retrying.
 *
 * Broker down at open. When the first connect finds no server (and fail_fast is off), open()
 * succeeds without a connection and the first one is made as below, "starting over";
 * subscribe() only remembers the channel then, and session_start() sets it up. A subscribe()
 * made while libnats reconnects is remembered likewise and set up by subs_setup() once the
 * connection is back.
 *
 * Closed for good. libnats gives up on its own after the server refused the credentials twice
 * in a row on reconnects (libnats 3.4 has no option against it) and closes the connection. The
 * adapter then starts over: it lets its threads end, releases that connection with what it
 * held (unacknowledged deliveries come again from JetStream), and connects anew every
 * reconnect_wait_ms, doubling up to NT_RB_MAX_MS — the connect on libuv's thread pool, so the
 * loop never waits for it; the JetStream setup (stream, consumers, subscriptions) then runs
 * on the loop against a server that just answered. Sends fail with SAGA_ETRANSPORT meanwhile
 * and the outbox keeps them; the publishes still awaiting their ack stay pending and are
 * confirmed by the ack of a resend. An authorization failure is logged at ERROR once per
 * outage, other failures at WARN once.
 *
 * Close. close() stops the threads and closes the connection; once libnats reported the
 * connection closed and our threads ended, everything is released and saga_transport_closed()
 * is called from the uv_async_t's close callback. No callback into the core follows close().
 */
#include <arpa/inet.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nats/nats.h>
#include <uv.h>

#include "saga/sys/transport.h"
#include "saga/transport_nats.h"

#define NT_MAX_INFLIGHT 256u  /* per channel: fetched, not acknowledged yet */
#define NT_FETCH_BATCH 64     /* most messages one immediate fetch asks for */
#define NT_FETCH_WAIT_MS 1000 /* one long poll; also how often idle threads look at `stopping` */
#define NT_API_WAIT_MS 5000   /* JetStream management requests at open/subscribe */
#define NT_STALL_MS 3000      /* how long a consumer with work may deliver nothing while polled */
#define NT_ACK_RING 1024u     /* publish acks waiting for the loop */
#define NT_LOG_RING 16u       /* log lines from other threads waiting for the loop */
#define NT_LOG_LEN 384
#define NT_NAME_MAX 200     /* longest stream name or subject prefix accepted */
#define NT_SUBJECT_MAX 512  /* longest subject "<prefix>.<channel>" */
#define NT_CONSUMER_KEEP 48 /* characters of the channel kept in a consumer name */
#define NT_NO_SLOT UINT32_MAX
#define NT_PEND_MAX (1u << 17)   /* publishes awaiting their ack, at most */
#define NT_PEND_TTL_MS 300000    /* an unconfirmed publish is forgotten after (outbox resends) */
#define NT_PEND_SWEEP_MS 10000   /* how often the set is scanned for those */
#define NT_MAC_HEX 16            /* hex digits of the mac in a reply subject */
#define NT_REPUBLISH_MS 5000     /* a copy on a live connection unacked this long may be lost */

/* A delivery tag: slot (12 bits), channel index (16 bits), slot generation (32 bits). The
 * generation makes a stale or repeated tag harmless; bit 63 stays clear (the core reserves
 * it). */
#define NT_SLOT_BITS 12
#define NT_SUB_BITS 16
#define NT_MAX_SUBS (1u << NT_SUB_BITS)

enum { NT_NEW = 0, NT_OPEN, NT_CLOSING, NT_FINISHING, NT_CLOSED, NT_FAILED };
enum { RB_NONE = 0, RB_DRAINING, RB_WAITING, RB_CONNECTING };
#define NT_RB_MAX_MS 5000 /* longest pause between two attempts at a new connection */

typedef struct nats_tp nats_tp;

typedef struct nt_slot {
  natsMsg *msg;  /* the delivery awaiting the node's ack, NULL when free */
  uint64_t at;   /* loop time it was handed over */
  uint32_t gen;  /* bumped on every use */
  uint32_t next; /* free list */
} nt_slot;

/* What the fetch thread saw of its consumer at its last looks (see watch_consumer). Times
 * are in ms of uv_hrtime(); 0 means not seen. */
typedef struct nt_watch {
  uint64_t looked;      /* the last look */
  uint64_t last_new;    /* stream sequence of the last first delivery */
  uint64_t new_since;   /* messages waiting and last_new unchanged since then */
  uint64_t last_any;    /* consumer sequence of the last delivery of any kind */
  uint64_t last_floor;  /* ack floor (consumer sequence) */
  int64_t last_unacked; /* deliveries awaiting acknowledgement */
  uint64_t any_since;   /* some unacknowledged and the three above unchanged since then */
  int empty;            /* nothing waiting, nothing unacknowledged at the last look */
} nt_watch;

typedef struct nt_sub {
  nats_tp *tp;
  uint32_t index;
  char *channel;
  char *subject;
  char *consumer;
  natsSubscription *sub;
  uv_thread_t thread;
  int thread_started;
  /* Shared with the fetch thread, under tp->mu. */
  natsMsg *ring[NT_MAX_INFLIGHT];
  uint32_t ring_head, ring_count;
  uint32_t inflight; /* in the ring or in a slot */
  /* Fetch thread only. */
  nt_watch watch;
  /* Loop thread only. */
  nt_slot slots[NT_MAX_INFLIGHT];
  uint32_t free_head;
} nt_sub;

typedef struct nt_ack {
  uint64_t token;
  int status;
} nt_ack;

/* A publish awaiting its ack (open addressing on the token; at == 0: free). */
typedef struct nt_pend {
  uint64_t token;
  uint64_t at;  /* loop time of its latest copy handed to libnats, plus 1 */
  uint64_t gen; /* the connection that copy goes out on (see pend_live) */
  int nacked;   /* JetStream answered that it did not store it */
} nt_pend;

struct nats_tp {
  saga_transport base; /* first, as the adapter interface requires */
  saga_allocator alloc;
  char *url, *stream, *prefix;
  uint32_t ack_wait_ms, max_deliveries, reconnect_wait_ms;
  /* Credentials and TLS (NULL = not set). */
  char *user, *password, *token, *nkey, *nkey_seed_file, *creds_file;
  char *tls_ca_file, *tls_cert_file, *tls_key_file, *tls_hostname, *inbox_prefix;
  int tls;
  uint64_t mac_key[2]; /* SipHash key of the reply subjects; set at open, then read-only */

  /* Loop thread only. */
  int state;
  int destroyed; /* destroy() came before the close finished: free at the end, report nothing */
  int buffer_full_logged;
  uv_loop_t *loop;
  uv_async_t async;
  uv_timer_t sweep; /* releases deliveries left unacknowledged past ack_wait */
  int handles_open; /* async, sweep and rb_timer, until their close callbacks ran */
  /* Starting over after libnats closed the connection for good (see "Closed for good"). */
  int rb;             /* RB_* */
  int rb_busy;        /* rb_work queued, its after-work callback not run yet */
  uint32_t rb_delay;  /* ms before the next attempt */
  int rb_logged;      /* a failed attempt was logged at WARN (once per outage) */
  uv_timer_t rb_timer;
  uv_work_t rb_work;
  natsConnection *rb_nc; /* the worker's result */
  natsStatus rb_status;
  char rb_err[256];
  natsOptions *opts;
  natsConnection *nc;
  jsCtx *js;
  char *inbox; /* publish acks come to "<inbox>.<token>" */
  natsSubscription *acksub;
  uv_thread_t ack_thread;
  int ack_thread_started;
  nt_sub **subs;
  size_t nsubs, subs_cap;
  nt_pend *pend; /* tokens published, not confirmed yet */
  size_t pend_cap, pend_count;
  uint64_t pend_swept;
  natsStatistics *ncstats; /* for libnats's reconnect count (current_gen) */
  uint64_t session;        /* natsConnections made after the first (starting over) */
  uint64_t gen_seen;       /* current_gen() and whether up, as the loop last saw them ... */
  uint64_t gen_since;      /* ... and the loop time it saw them change */
  int fail_fast;      /* open() fails when no server can be reached */
  size_t subs_waiting; /* subscriptions remembered during a reconnect, not set up yet */
  uint64_t subs_tried; /* loop time subs_setup() last tried */
  int ever_connected; /* a connection was set up once (for the log line) */
  saga_nats_stats stats; /* the fields below the mutex are counted under mu */

  /* Shared with libnats's and our threads, under mu. */
  uv_mutex_t mu;
  uv_cond_t cv;    /* broadcast on any change a thread may wait for */
  int sync_ready;  /* mu and cv initialised */
  int async_ready; /* uv_async_send allowed */
  int stopping;
  int connected;
  uint64_t reconnects; /* counts reconnects: a fetch thread starts watching afresh */
  int nc_closed;       /* libnats called the closed callback */
  int threads_live;
  nt_ack acks[NT_ACK_RING];
  uint32_t ack_head, ack_count;
  uint64_t acks_malformed;    /* ack thread: subject or mac wrong */
  uint64_t permission_errors; /* libnats's thread */
  uint64_t auth_errors;
  int auth_failing; /* an authorization failure was logged; cleared by a reconnect */
  char last_perm[160]; /* the last permission violation logged */
  char logs[NT_LOG_RING][NT_LOG_LEN];
  int log_level[NT_LOG_RING];
  uint32_t log_head, log_count, logs_dropped;
};

/* ---- memory ---------------------------------------------------------------------------- */

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

static void *nt_malloc(const saga_allocator *a, size_t n) { return a->malloc(n, a->ud); }

static void *nt_calloc(const saga_allocator *a, size_t n) {
  void *p = a->malloc(n, a->ud);
  if (p != NULL) memset(p, 0, n);
  return p;
}

static void nt_free(const saga_allocator *a, void *p) {
  if (p != NULL) a->free(p, a->ud);
}

static char *nt_strdup(const saga_allocator *a, const char *s) {
  size_t n = strlen(s) + 1;
  char *p = nt_malloc(a, n);
  if (p != NULL) memcpy(p, s, n);
  return p;
}

/* ---- names ----------------------------------------------------------------------------- */

/* A subject: dot-separated non-empty tokens of printable characters without wildcards. */
static int subject_ok(const char *s, size_t max) {
  size_t n = strlen(s);
  if (n == 0 || n > max || s[0] == '.' || s[n - 1] == '.') return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c <= ' ' || c == 0x7f || c == '*' || c == '>') return 0;
    if (c == '.' && s[i + 1] == '.') return 0;
  }
  return 1;
}

/* A stream name: printable, no whitespace, dots, wildcards or path separators. */
static int stream_name_ok(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > NT_NAME_MAX) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c <= ' ' || c == 0x7f || c == '.' || c == '*' || c == '>' || c == '/' || c == '\\')
      return 0;
  }
  return 1;
}

static int consumer_char_ok(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '_';
}

static uint32_t fnv1a(const char *s) {
  uint32_t h = 2166136261u;
  for (; *s; s++) {
    h ^= (unsigned char)*s;
    h *= 16777619u;
  }
  return h;
}

/*
 * The durable consumer's name for a channel: the channel itself when it is made only of
 * letters, digits, '-' and '_' and is short; otherwise those characters with the rest
 * replaced by '_', cut at NT_CONSUMER_KEEP, plus a hash of the full channel name, so that
 * "a.b" and "a_b" still get consumers of their own.
 */
static void consumer_name(const char *channel, char *out, size_t outlen) {
  size_t j = 0;
  int changed = 0;
  for (size_t i = 0; channel[i] != '\0'; i++) {
    if (j == NT_CONSUMER_KEEP) {
      changed = 1;
      break;
    }
    char c = channel[i];
    if (!consumer_char_ok(c)) changed = 1;
    out[j++] = consumer_char_ok(c) ? c : '_';
  }
  out[j] = '\0';
  if (changed) snprintf(out + j, outlen - j, "_%08" PRIx32, fnv1a(channel));
}

static int make_subject(const nats_tp *tp, const char *channel, char *out, size_t outlen) {
  if (!subject_ok(channel, NT_SUBJECT_MAX)) return SAGA_EINVAL;
  int n = snprintf(out, outlen, "%s.%s", tp->prefix, channel);
  return n > 0 && (size_t)n < outlen ? SAGA_OK : SAGA_EINVAL;
}

/* ---- the mac of a reply subject: SipHash-2-4 of the token ------------------------------ */

#define NT_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define NT_SIPROUND                                                                                \
  do {                                                                                             \
    v0 += v1;                                                                                      \
    v1 = NT_ROTL(v1, 13);                                                                          \
    v1 ^= v0;                                                                                      \
    v0 = NT_ROTL(v0, 32);                                                                          \
    v2 += v3;                                                                                      \
    v3 = NT_ROTL(v3, 16);                                                                          \
    v3 ^= v2;                                                                                      \
    v0 += v3;                                                                                      \
    v3 = NT_ROTL(v3, 21);                                                                          \
    v3 ^= v0;                                                                                      \
    v2 += v1;                                                                                      \
    v1 = NT_ROTL(v1, 17);                                                                          \
    v1 ^= v2;                                                                                      \
    v2 = NT_ROTL(v2, 32);                                                                          \
  } while (0)

/* SipHash-2-4 of one 8-byte message (the token, little-endian). */
static uint64_t token_mac(const uint64_t key[2], uint64_t m) {
  uint64_t v0 = key[0] ^ UINT64_C(0x736f6d6570736575), v1 = key[1] ^ UINT64_C(0x646f72616e646f6d);
  uint64_t v2 = key[0] ^ UINT64_C(0x6c7967656e657261), v3 = key[1] ^ UINT64_C(0x7465646279746573);
  v3 ^= m;
  NT_SIPROUND;
  NT_SIPROUND;
  v0 ^= m;
  uint64_t b = UINT64_C(8) << 56;
  v3 ^= b;
  NT_SIPROUND;
  NT_SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  NT_SIPROUND;
  NT_SIPROUND;
  NT_SIPROUND;
  NT_SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}
#undef NT_SIPROUND
#undef NT_ROTL

/*
 * Parses the last two tokens of an ack's subject, "<inbox>.<token>.<mac>": the token in
 * decimal (no sign, no leading zero unless it is 0, at most 20 digits, no overflow), the mac
 * as NT_MAC_HEX lowercase hex digits. Returns 1 with *token set when both are well formed and
 * the mac is the token's.
 */
static int parse_ack_subject(const uint64_t key[2], const char *subj, size_t inbox_len,
                             uint64_t *token) {
  if (subj == NULL) return 0;
  size_t n = strlen(subj);
  if (n < inbox_len + 3 + NT_MAC_HEX || subj[inbox_len] != '.') return 0;
  const char *p = subj + inbox_len + 1, *end = subj + n;
  const char *dot = memchr(p, '.', (size_t)(end - p));
  if (dot == NULL || dot == p || dot - p > 20 || (dot - p > 1 && p[0] == '0')) return 0;
  if ((size_t)(end - dot - 1) != NT_MAC_HEX) return 0;
  uint64_t t = 0;
  for (const char *q = p; q < dot; q++) {
    if (*q < '0' || *q > '9') return 0;
    unsigned d = (unsigned)(*q - '0');
    if (t > (UINT64_MAX - d) / 10) return 0;
    t = t * 10 + d;
  }
  uint64_t mac = 0;
  for (const char *q = dot + 1; q < end; q++) {
    unsigned d;
    if (*q >= '0' && *q <= '9')
      d = (unsigned)(*q - '0');
    else if (*q >= 'a' && *q <= 'f')
      d = (unsigned)(*q - 'a' + 10);
    else
      return 0;
    mac = (mac << 4) | d;
  }
  /* Not secret-dependent timing worth hiding: a wrong mac only says "try another" to a
   * forger who would need 2^64 tries. */
  if (mac != token_mac(key, t)) return 0;
  *token = t;
  return 1;
}

/* ---- publishes awaiting their ack (loop thread) ------------------------------------------ */

static size_t pend_slot(const nats_tp *tp, uint64_t token) {
  uint64_t h = token * UINT64_C(0x9E3779B97F4A7C15);
  return (size_t)(h >> 20) & (tp->pend_cap - 1);
}

static nt_pend *pend_find(nats_tp *tp, uint64_t token) {
  if (tp->pend_cap == 0) return NULL;
  for (size_t i = pend_slot(tp, token);; i = (i + 1) & (tp->pend_cap - 1)) {
    nt_pend *p = &tp->pend[i];
    if (p->at == 0) return NULL;
    if (p->token == token) return p;
  }
}

/* Removes an entry, shifting back the ones after it in its probe run (no tombstones). */
static void pend_remove(nats_tp *tp, nt_pend *p) {
  size_t mask = tp->pend_cap - 1;
  size_t i = (size_t)(p - tp->pend);
  tp->pend[i].at = 0;
  tp->pend_count--;
  for (size_t j = (i + 1) & mask; tp->pend[j].at != 0; j = (j + 1) & mask) {
    size_t home = pend_slot(tp, tp->pend[j].token);
    /* j's entry may move to the hole at i when i lies on its probe path home..j. */
    if (((j - home) & mask) >= ((j - i) & mask)) {
      tp->pend[i] = tp->pend[j];
      tp->pend[j].at = 0;
      i = j;
    }
  }
}

static int pend_grow(nats_tp *tp) {
  size_t cap = tp->pend_cap ? tp->pend_cap * 2 : 1024;
  nt_pend *old = tp->pend;
  size_t old_cap = tp->pend_cap;
  nt_pend *np = nt_calloc(&tp->alloc, cap * sizeof *np);
  if (np == NULL) return SAGA_ENOMEM;
  tp->pend = np;
  tp->pend_cap = cap;
  for (size_t i = 0; i < old_cap; i++) {
    if (old[i].at == 0) continue;
    size_t j = pend_slot(tp, old[i].token);
    while (np[j].at != 0) j = (j + 1) & (cap - 1);
    np[j] = old[i];
  }
  nt_free(&tp->alloc, old);
  return SAGA_OK;
}

/* Adds a new entry for token (not in the set). Returns it, or NULL with *rc SAGA_EFULL or
 * SAGA_ENOMEM. */
static nt_pend *pend_add(nats_tp *tp, uint64_t token, int *rc) {
  if (tp->pend_count >= NT_PEND_MAX) {
    *rc = SAGA_EFULL;
    return NULL;
  }
  if ((tp->pend_count + 1) * 2 > tp->pend_cap && pend_grow(tp) != SAGA_OK) {
    *rc = SAGA_ENOMEM;
    return NULL;
  }
  size_t i = pend_slot(tp, token);
  while (tp->pend[i].at != 0) i = (i + 1) & (tp->pend_cap - 1);
  nt_pend *p = &tp->pend[i];
  memset(p, 0, sizeof *p);
  p->token = token;
  p->at = uv_now(tp->loop) + 1;
  tp->pend_count++;
  return p;
}

/*
 * Which socket connection a copy handed to libnats now goes out on, as a number that only
 * grows: the natsConnection (`session`, counted by us: a new one after starting over) in the
 * high half, and libnats's own count of its reconnections of it (taken with the connection's
 * lock, incremented as soon as a new socket is up, before the reconnect buffer is flushed into
 * it) in the low half — that count while connected (the copy is written to the current
 * socket), one more while not (it waits in the reconnect buffer and goes out on the next
 * socket; if that flush fails, libnats empties the buffer and the count has moved on, so the
 * copy is seen lost). *up tells whether connected. Also notes the loop time it first sees a
 * new connection or the connection come up (gen_since, for pend_live).
 */
static uint64_t current_gen(nats_tp *tp, int *up) {
  *up = 0;
  uint64_t r = 0;
  int status = NATS_CONN_STATUS_CLOSED;
  if (tp->nc != NULL && tp->ncstats != NULL &&
      natsConnection_GetStats(tp->nc, tp->ncstats) == NATS_OK &&
      natsStatistics_GetCounts(tp->ncstats, NULL, NULL, NULL, NULL, &r) == NATS_OK)
    status = (int)natsConnection_Status(tp->nc);
  /* The status is read after the count: a reconnect completing in between makes the copy
   * look older than it is (at worst one copy more), never newer. */
  uint64_t gen;
  if (status == NATS_CONN_STATUS_CLOSED) {
    gen = (tp->session + 1) << 32; /* no connection: whatever was on this one is gone */
  } else {
    *up = status == NATS_CONN_STATUS_CONNECTED;
    gen = (tp->session << 32) + (r & 0x7fffffffu) + (*up ? 0 : 1);
  }
  uint64_t seen = gen * 2 + (uint64_t)*up;
  if (seen != tp->gen_seen) {
    tp->gen_seen = seen;
    tp->gen_since = uv_now(tp->loop);
  }
  return gen;
}

/*
 * Whether p's copy is still on its way, so that another copy would only be a duplicate: it
 * goes out on the current connection or on the next one (a copy written to a connection that
 * dropped since may be lost), JetStream did not refuse it, and, on a live connection, its ack
 * is not overdue (NT_REPUBLISH_MS since the copy was written, or since the connection came up
 * for a copy that waited in the reconnect buffer).
 */
static int pend_live(const nats_tp *tp, const nt_pend *p, uint64_t cur, int up, uint64_t now) {
  if (p->nacked || p->gen < cur) return 0;
  if (!up) return 1;
  uint64_t since = p->at - 1 > tp->gen_since ? p->at - 1 : tp->gen_since;
  return now - since < NT_REPUBLISH_MS;
}

/* Forgets publishes unconfirmed for NT_PEND_TTL_MS whose copy is not on its way any more
 * (their rows are resent, and added again). A copy waiting for a reconnect is kept. */
static void pend_sweep(nats_tp *tp) {
  uint64_t now = uv_now(tp->loop);
  if (tp->pend_count == 0 || now - tp->pend_swept < NT_PEND_SWEEP_MS) return;
  tp->pend_swept = now;
  int up = 0;
  uint64_t cur = current_gen(tp, &up);
  for (size_t i = 0; i < tp->pend_cap;) {
    nt_pend *p = &tp->pend[i];
    if (p->at != 0 && now + 1 - p->at > NT_PEND_TTL_MS && !pend_live(tp, p, cur, up, now)) {
      pend_remove(tp, p); /* may move a later entry into i: look at i again */
      tp->stats.pending_dropped++;
      continue;
    }
    i++;
  }
}

/* ---- logging --------------------------------------------------------------------------- */

/* Whether the core may be called: from open() until close() (or destroy()). */
static int host_ok(const nats_tp *tp) {
  return !tp->destroyed && (tp->state == NT_NEW || tp->state == NT_OPEN);
}

static void nt_log(nats_tp *tp, saga_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void nt_log(nats_tp *tp, saga_log_level level, const char *fmt, ...) {
  if (!host_ok(tp)) return;
  char buf[768];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  saga_transport_log(&tp->base, level, buf);
}

static void wake_locked(nats_tp *tp) {
  if (tp->async_ready) uv_async_send(&tp->async);
}

/* From any thread, with mu held: queues a line for the loop to log. */
static void post_log_locked(nats_tp *tp, saga_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void post_log_locked(nats_tp *tp, saga_log_level level, const char *fmt, ...) {
  if (tp->log_count == NT_LOG_RING) {
    tp->logs_dropped++;
    return;
  }
  uint32_t i = (tp->log_head + tp->log_count) % NT_LOG_RING;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tp->logs[i], NT_LOG_LEN, fmt, ap);
  va_end(ap);
  tp->log_level[i] = level;
  tp->log_count++;
  wake_locked(tp);
}

/* The text of libnats's last error on this thread, else the status's. */
static const char *nats_err(natsStatus s) {
  natsStatus last = NATS_OK;
  const char *t = nats_GetLastError(&last);
  if (t != NULL && *t != '\0' && last == s) return t;
  return natsStatus_GetText(s);
}

/* ---- libnats's connection callbacks (its thread) --------------------------------------- */

static void on_disconnected(natsConnection *nc, void *closure) {
  nats_tp *tp = closure;
  (void)nc;
  uv_mutex_lock(&tp->mu);
  tp->connected = 0;
  if (!tp->stopping)
    post_log_locked(tp, SAGA_LOG_WARN, "disconnected from NATS; reconnecting every %" PRIu32 " ms",
                    tp->reconnect_wait_ms);
  uv_mutex_unlock(&tp->mu);
}

static void on_reconnected(natsConnection *nc, void *closure) {
  nats_tp *tp = closure;
  (void)nc;
  uv_mutex_lock(&tp->mu);
  tp->connected = 1;
  tp->reconnects++;
  tp->auth_failing = 0;
  uv_cond_broadcast(&tp->cv);
  post_log_locked(tp, SAGA_LOG_INFO, "reconnected to NATS");
  uv_mutex_unlock(&tp->mu);
}

/* The last callback libnats makes for a connection. The async send happens under mu, so
 * once the loop saw nc_closed (under mu) this thread no longer touches the transport. */
static void on_closed(natsConnection *nc, void *closure) {
  nats_tp *tp = closure;
  (void)nc;
  uv_mutex_lock(&tp->mu);
  tp->nc_closed = 1;
  tp->connected = 0;
  uv_cond_broadcast(&tp->cv);
  wake_locked(tp);
  uv_mutex_unlock(&tp->mu);
}

/* Whether a server error text is about authentication (as opposed to permissions). */
static int auth_text(const char *t) {
  return t != NULL && (strstr(t, "uthorization") != NULL || strstr(t, "uthentication") != NULL ||
                       strstr(t, "User Authentication Expired") != NULL);
}

/*
 * Asynchronous errors: permission violations (a publish or subscription the server refused)
 * and authorization failures (on a reconnect, say) are counted and logged when they change,
 * not once per occurrence; anything else is logged.
 */
static void on_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure) {
  nats_tp *tp = closure;
  (void)sub;
  const char *text = NULL;
  if (nc != NULL) natsConnection_GetLastError(nc, &text);
  if (text == NULL || *text == '\0') text = natsStatus_GetText(err);
  uv_mutex_lock(&tp->mu);
  if (err == NATS_NOT_PERMITTED && !auth_text(text)) {
    tp->permission_errors++;
    if (!tp->stopping && strncmp(tp->last_perm, text, sizeof tp->last_perm - 1) != 0) {
      snprintf(tp->last_perm, sizeof tp->last_perm, "%s", text);
      post_log_locked(tp, SAGA_LOG_ERROR,
                      "NATS server refused: %s (the user's permissions do not allow it; further "
                      "refusals of this kind are counted, not logged)",
                      text);
    }
  } else if (err == NATS_NOT_PERMITTED || auth_text(text)) {
    tp->auth_errors++;
    if (!tp->stopping && !tp->auth_failing)
      post_log_locked(tp, SAGA_LOG_ERROR,
                      "NATS authentication failed: %s (check the credentials; retrying every "
                      "%" PRIu32 " ms)",
                      text, tp->reconnect_wait_ms);
    tp->auth_failing = 1;
  } else if (!tp->stopping) {
    post_log_locked(tp, SAGA_LOG_WARN, "NATS asynchronous error: %s", text);
  }
  uv_mutex_unlock(&tp->mu);
}

/* ---- our threads ------------------------------------------------------------------------ */

/* Waits up to ms or until woken; with mu held. A pause between retries, not a
 * synchronisation: close() wakes it. */
static void backoff_locked(nats_tp *tp, uint32_t ms) {
  uv_cond_timedwait(&tp->cv, &tp->mu, (uint64_t)(ms > 0 ? ms : 1) * 1000000u);
}

static void thread_done(nats_tp *tp) {
  uv_mutex_lock(&tp->mu);
  tp->threads_live--;
  wake_locked(tp);
  uv_mutex_unlock(&tp->mu);
}

static void watch_consumer(nt_sub *s);

/*
 * Pulls a channel's messages into its ring while connected and below NT_MAX_INFLIGHT.
 * While idle it long-polls for one message (so a lone message is handed over at once); after
 * a fetch that returned something it asks for a batch without waiting, until the consumer
 * has nothing more. A long poll that came back empty is the moment to look at the consumer.
 */
static void fetch_main(void *arg) {
  nt_sub *s = arg;
  nats_tp *tp = s->tp;
  int more = 0;
  uint64_t reconnects = 0;
  natsStatus failing = NATS_OK;
  for (;;) {
    uv_mutex_lock(&tp->mu);
    while (!tp->stopping && (!tp->connected || s->inflight >= NT_MAX_INFLIGHT))
      uv_cond_wait(&tp->cv, &tp->mu);
    if (tp->stopping) {
      uv_mutex_unlock(&tp->mu);
      break;
    }
    uint32_t room = NT_MAX_INFLIGHT - s->inflight;
    if (tp->reconnects != reconnects) {
      /* The server may have restarted: what was seen of the consumer says nothing now. */
      reconnects = tp->reconnects;
      memset(&s->watch, 0, sizeof s->watch);
    }
    uv_mutex_unlock(&tp->mu);

    /*
     * How many to ask for. libnats before 3.9 (Debian 12 ships 3.4.1) has a defect in its
     * fetch (nats.c #749): it allocates an array of Batch messages, first takes what already
     * waits in the subscription's queue (c messages: replies to an earlier pull request that
     * came after that fetch had returned, e.g. once a server frozen past NT_FETCH_WAIT_MS
     * answers), then asks the server for Batch - c and loops "until count == Batch - c". With
     * c > Batch / 2 that never holds: it keeps storing past the array's end until a status or
     * the timeout, and returns Count > Batch. That overran the array (ASan: heap-buffer-
     * overflow reading list.Msgs here; without ASan a corrupt heap, "malloc(): invalid size")
     * and pushed more than `room` messages into the ring, breaking inflight <= NT_MAX_INFLIGHT.
     * A fetch of 1 cannot go wrong (it stops at count == 1), and a batch is safe when the
     * queue is empty (c == 0). So: a batch only when nothing waits in the queue; otherwise
     * fetches of 1, which take from the queue without asking the server. (A reply arriving in
     * the microseconds between the two looks is the one case left, and needs more than half
     * the batch to arrive then; the check below still keeps the ring within `room`.)
     */
    int queued = 0;
    if (natsSubscription_GetPending(s->sub, &queued, NULL) != NATS_OK) queued = 1;
    uint32_t want = more && queued == 0 ? (room < NT_FETCH_BATCH ? room : NT_FETCH_BATCH) : 1;
    natsMsgList list;
    memset(&list, 0, sizeof list);
    natsStatus st;
    if (more) {
      jsFetchRequest req;
      jsFetchRequest_Init(&req);
      req.Batch = (int)want;
      req.NoWait = true;
      req.Expires = (int64_t)NT_FETCH_WAIT_MS * 1000000;
      st = natsSubscription_FetchRequest(&list, s->sub, &req);
    } else {
      st = natsSubscription_Fetch(&list, s->sub, 1, NT_FETCH_WAIT_MS, NULL);
    }
    if (st == NATS_OK && list.Count > 0) {
      uint32_t n = (uint32_t)list.Count;
      if (n > want) {
        /* The defect above after all: the entries past `want` lie outside the array; leave
         * them (unacknowledged, JetStream redelivers them) and keep the ring within room. */
        n = want;
        list.Count = (int)want;
        uv_mutex_lock(&tp->mu);
        post_log_locked(tp, SAGA_LOG_ERROR,
                        "libnats returned more messages than asked for from consumer '%s' "
                        "(libnats < 3.9 fetch defect); upgrade libnats",
                        s->consumer);
        uv_mutex_unlock(&tp->mu);
      }
      uv_mutex_lock(&tp->mu);
      for (uint32_t i = 0; i < n; i++) {
        /* n <= want <= room, and only this thread adds: the ring has space. */
        s->ring[(s->ring_head + s->ring_count) % NT_MAX_INFLIGHT] = list.Msgs[i];
        s->ring_count++;
        list.Msgs[i] = NULL;
      }
      s->inflight += n;
      if (failing != NATS_OK)
        post_log_locked(tp, SAGA_LOG_INFO, "fetching from consumer '%s' works again", s->consumer);
      wake_locked(tp);
      uv_mutex_unlock(&tp->mu);
      natsMsgList_Destroy(&list);
      failing = NATS_OK;
      s->watch.empty = 0;
      more = 1;
      continue;
    }
    natsMsgList_Destroy(&list);
    int long_poll = !more;
    more = 0;
    /* Nothing available (404), or the long poll expired: ask again. */
    if (st == NATS_OK || st == NATS_TIMEOUT || st == NATS_NOT_FOUND) {
      if (long_poll) watch_consumer(s);
      continue;
    }
    uv_mutex_lock(&tp->mu);
    if (tp->stopping || st == NATS_CONNECTION_CLOSED || st == NATS_INVALID_SUBSCRIPTION) {
      if (!tp->stopping)
        post_log_locked(tp, SAGA_LOG_ERROR, "consumer '%s' stopped: %s", s->consumer,
                        natsStatus_GetText(st));
      uv_mutex_unlock(&tp->mu);
      break;
    }
    if (st != failing)
      post_log_locked(tp, SAGA_LOG_WARN, "fetching from consumer '%s' failed: %s; retrying",
                      s->consumer, nats_err(st));
    failing = st;
    backoff_locked(tp, tp->reconnect_wait_ms);
    uv_mutex_unlock(&tp->mu);
  }
  thread_done(tp);
}

/* A JetStream publish ack is JSON with "seq" and no "error"; anything else (an error, an
 * empty 503 "no responders") means the message was not stored. */
static int puback_ok(natsMsg *m) {
  const char *d = natsMsg_GetData(m);
  int n = natsMsg_GetDataLength(m);
  if (d == NULL || n <= 0) return 0;
  return memmem(d, (size_t)n, "\"seq\"", 5) != NULL && memmem(d, (size_t)n, "\"error\"", 7) == NULL;
}

/* Reads publish acks: "<inbox>.<token>.<mac>"; those whose mac is wrong are dropped here, the
 * loop checks the rest against the publishes it has pending. */
static void ack_main(void *arg) {
  nats_tp *tp = arg;
  size_t inbox_len = strlen(tp->inbox);
  for (;;) {
    natsMsg *m = NULL;
    natsStatus st = natsSubscription_NextMsg(&m, tp->acksub, NT_FETCH_WAIT_MS);
    if (st == NATS_OK) {
      uint64_t token = 0;
      int valid = parse_ack_subject(tp->mac_key, natsMsg_GetSubject(m), inbox_len, &token);
      int status = puback_ok(m) ? SAGA_OK : SAGA_ETRANSPORT;
      natsMsg_Destroy(m);
      if (!valid) {
        uv_mutex_lock(&tp->mu);
        tp->acks_malformed++;
        uv_mutex_unlock(&tp->mu);
        continue;
      }
      uv_mutex_lock(&tp->mu);
      while (!tp->stopping && tp->ack_count == NT_ACK_RING) uv_cond_wait(&tp->cv, &tp->mu);
      if (tp->stopping) {
        uv_mutex_unlock(&tp->mu);
        break;
      }
      nt_ack *a = &tp->acks[(tp->ack_head + tp->ack_count) % NT_ACK_RING];
      a->token = token;
      a->status = status;
      tp->ack_count++;
      wake_locked(tp);
      uv_mutex_unlock(&tp->mu);
      continue;
    }
    uv_mutex_lock(&tp->mu);
    int stop = tp->stopping || st == NATS_CONNECTION_CLOSED || st == NATS_INVALID_SUBSCRIPTION;
    if (!stop && st != NATS_TIMEOUT && st != NATS_SLOW_CONSUMER && st != NATS_NO_RESPONDERS)
      backoff_locked(tp, tp->reconnect_wait_ms);
    uv_mutex_unlock(&tp->mu);
    if (stop) break;
  }
  thread_done(tp);
}

/* ---- the loop side: slots, deliveries, confirmations ---------------------------------- */

static uint64_t make_tag(uint32_t sub, uint32_t slot, uint32_t gen) {
  return ((uint64_t)gen << (NT_SLOT_BITS + NT_SUB_BITS)) | ((uint64_t)sub << NT_SLOT_BITS) | slot;
}

/* Frees a slot, acknowledging its message first when ack is set. */
static void release_slot(nats_tp *tp, nt_sub *s, uint32_t si, int ack) {
  nt_slot *slot = &s->slots[si];
  natsMsg *m = slot->msg;
  slot->msg = NULL;
  slot->next = s->free_head;
  s->free_head = si;
  if (ack) {
    natsStatus st = natsMsg_Ack(m, NULL);
    if (st != NATS_OK)
      nt_log(tp, SAGA_LOG_DEBUG, "ack on '%s' failed (%s): JetStream will redeliver", s->channel,
             natsStatus_GetText(st));
  }
  natsMsg_Destroy(m);
  uv_mutex_lock(&tp->mu);
  s->inflight--;
  uv_cond_broadcast(&tp->cv);
  uv_mutex_unlock(&tp->mu);
}

/* Hands one fetched message to the node: delivered, or dead-lettered past the cap. */
static void hand_over(nats_tp *tp, nt_sub *s, natsMsg *m) {
  uint64_t delivered = 1;
  jsMsgMetaData *meta = NULL;
  if (natsMsg_GetMetaData(&meta, m) == NATS_OK) {
    delivered = meta->NumDelivered;
    jsMsgMetaData_Destroy(meta);
  }
  /* inflight counts ring and slots together and never exceeds NT_MAX_INFLIGHT. */
  uint32_t si = s->free_head;
  nt_slot *slot = &s->slots[si];
  s->free_head = slot->next;
  slot->gen++;
  slot->msg = m;
  slot->at = uv_now(tp->loop);
  uint32_t gen = slot->gen;
  uint64_t tag = make_tag(s->index, si, gen);
  const void *data = natsMsg_GetData(m);
  int len = natsMsg_GetDataLength(m);
  size_t n = len > 0 ? (size_t)len : 0;
  int rc;
  if (delivered > tp->max_deliveries) {
    char reason[160];
    snprintf(reason, sizeof reason,
             "delivered %" PRIu64 " times without acknowledgement (max_deliveries %" PRIu32 ")",
             delivered, tp->max_deliveries);
    rc = saga_transport_dead_letter(&tp->base, s->channel, n > 0 ? data : "", n, tag, reason);
  } else {
    rc = saga_transport_deliver(&tp->base, s->channel, n > 0 ? data : "", n, tag);
  }
  /* Refused (the node is closing): no ack, JetStream redelivers after ack_wait. The slot may
   * already be free if the node acknowledged from inside the callback. */
  if (rc != SAGA_OK && slot->msg == m && slot->gen == gen) release_slot(tp, s, si, 0);
}

static void drain_sub(nats_tp *tp, nt_sub *s) {
  natsMsg *batch[NT_MAX_INFLIGHT];
  uv_mutex_lock(&tp->mu);
  uint32_t n = s->ring_count;
  for (uint32_t i = 0; i < n; i++) batch[i] = s->ring[(s->ring_head + i) % NT_MAX_INFLIGHT];
  s->ring_head = (s->ring_head + n) % NT_MAX_INFLIGHT;
  s->ring_count = 0;
  uv_mutex_unlock(&tp->mu);
  uint32_t i = 0;
  for (; i < n && tp->state == NT_OPEN; i++) hand_over(tp, s, batch[i]);
  if (i < n) {
    /* Closed from inside a callback: the rest is not delivered, so not acknowledged. */
    for (uint32_t j = i; j < n; j++) natsMsg_Destroy(batch[j]);
    uv_mutex_lock(&tp->mu);
    s->inflight -= n - i;
    uv_mutex_unlock(&tp->mu);
  }
}

static void drain_acks(nats_tp *tp) {
  nt_ack chunk[64];
  uv_mutex_lock(&tp->mu);
  uint32_t total = tp->ack_count; /* what arrives meanwhile waits for the next turn */
  uv_mutex_unlock(&tp->mu);
  while (total > 0 && tp->state == NT_OPEN) {
    uint32_t n = total < 64 ? total : 64;
    uv_mutex_lock(&tp->mu);
    for (uint32_t i = 0; i < n; i++) chunk[i] = tp->acks[(tp->ack_head + i) % NT_ACK_RING];
    tp->ack_head = (tp->ack_head + n) % NT_ACK_RING;
    tp->ack_count -= n;
    uv_cond_broadcast(&tp->cv);
    uv_mutex_unlock(&tp->mu);
    total -= n;
    for (uint32_t i = 0; i < n && tp->state == NT_OPEN; i++) {
      nt_pend *p = pend_find(tp, chunk[i].token);
      if (p == NULL) {
        /* Not published by us, or confirmed already, or forgotten: never a confirmation. */
        tp->stats.acks_ignored++;
        continue;
      }
      if (chunk[i].status != SAGA_OK) {
        /* Not stored. It stays pending (a resend's ack may still come), and the next send of
         * it publishes again. */
        p->nacked = 1;
        tp->stats.acks_negative++;
        saga_transport_sent(&tp->base, chunk[i].token, chunk[i].status);
        continue;
      }
      pend_remove(tp, p);
      tp->stats.acks_confirmed++;
      saga_transport_sent(&tp->base, chunk[i].token, SAGA_OK);
    }
  }
}

static void drain_logs(nats_tp *tp) {
  for (;;) {
    char line[NT_LOG_LEN];
    int level;
    uint32_t dropped;
    uv_mutex_lock(&tp->mu);
    if (tp->log_count == 0) {
      uv_mutex_unlock(&tp->mu);
      return;
    }
    memcpy(line, tp->logs[tp->log_head], NT_LOG_LEN);
    level = tp->log_level[tp->log_head];
    tp->log_head = (tp->log_head + 1) % NT_LOG_RING;
    tp->log_count--;
    dropped = tp->logs_dropped;
    tp->logs_dropped = 0;
    uv_mutex_unlock(&tp->mu);
    if (dropped > 0) nt_log(tp, SAGA_LOG_WARN, "%" PRIu32 " log lines dropped", dropped);
    nt_log(tp, (saga_log_level)level, "%s", line);
  }
}

/*
 * A delivery the node has not acknowledged within ack_wait is one JetStream redelivers (to
 * this transport or to a replica): its slot is released without an ack, so that handler
 * failures the node does not acknowledge cannot pile up and stall the channel at
 * NT_MAX_INFLIGHT. A late ack(tag) of it is then ignored, and the redelivery is a duplicate
 * the node tolerates.
 */
static void subs_setup(nats_tp *tp);

static void on_sweep(uv_timer_t *h) {
  nats_tp *tp = h->data;
  if (tp->state != NT_OPEN) return;
  pend_sweep(tp);
  subs_setup(tp);
  if (tp->state != NT_OPEN) return;
  uint64_t now = uv_now(tp->loop);
  size_t released = 0;
  for (size_t i = 0; i < tp->nsubs; i++) {
    nt_sub *s = tp->subs[i];
    for (uint32_t j = 0; j < NT_MAX_INFLIGHT; j++) {
      if (s->slots[j].msg == NULL || now - s->slots[j].at < tp->ack_wait_ms) continue;
      release_slot(tp, s, j, 0);
      released++;
    }
  }
  if (released > 0)
    nt_log(tp, SAGA_LOG_DEBUG,
           "%zu deliveries unacknowledged after ack_wait: JetStream "
           "redelivers them",
           released);
}

static void try_finish_close(nats_tp *tp);
static void rb_check(nats_tp *tp);

static void on_async(uv_async_t *h) {
  nats_tp *tp = h->data;
  if (tp->state == NT_OPEN) {
    int up = 0;
    current_gen(tp, &up); /* notes when a reconnect happened, for pend_live */
    drain_logs(tp);
    if (up && tp->state == NT_OPEN) subs_setup(tp);
    if (tp->state == NT_OPEN) drain_acks(tp);
    for (size_t i = 0; i < tp->nsubs && tp->state == NT_OPEN; i++) drain_sub(tp, tp->subs[i]);
    if (tp->state == NT_OPEN) rb_check(tp);
  }
  if (tp->state == NT_CLOSING) try_finish_close(tp);
}

/* ---- teardown --------------------------------------------------------------------------- */

/* Releases the connection and everything made on it. It is closed and our threads have ended
 * (or never started); nothing else touches these objects any more. The subscriptions' slots
 * are ready for use again (their generations kept, so that old tags stay stale). */
static void release_session(nats_tp *tp) {
  if (tp->ack_thread_started) uv_thread_join(&tp->ack_thread);
  tp->ack_thread_started = 0;
  for (size_t i = 0; i < tp->nsubs; i++) {
    nt_sub *s = tp->subs[i];
    if (s->thread_started) uv_thread_join(&s->thread);
    s->thread_started = 0;
    /* Unacknowledged: JetStream redelivers them after ack_wait. Messages before their
     * subscription, which they point to. */
    for (uint32_t j = 0; j < s->ring_count; j++)
      natsMsg_Destroy(s->ring[(s->ring_head + j) % NT_MAX_INFLIGHT]);
    s->ring_count = 0;
    s->ring_head = 0;
    for (uint32_t j = 0; j < NT_MAX_INFLIGHT; j++) {
      natsMsg_Destroy(s->slots[j].msg);
      s->slots[j].msg = NULL;
      s->slots[j].next = j + 1 < NT_MAX_INFLIGHT ? j + 1 : NT_NO_SLOT;
    }
    s->free_head = 0;
    s->inflight = 0;
    /* Destroy, not Unsubscribe: the durable consumer stays for the other replicas. */
    natsSubscription_Destroy(s->sub);
    s->sub = NULL;
  }
  natsSubscription_Destroy(tp->acksub);
  tp->acksub = NULL;
  jsCtx_Destroy(tp->js);
  tp->js = NULL;
  natsConnection_Destroy(tp->nc);
  tp->nc = NULL;
}

/* Releases every libnats object, as release_session, and the options. */
static void release_nats(nats_tp *tp) {
  release_session(tp);
  natsOptions_Destroy(tp->opts);
  tp->opts = NULL;
  natsStatistics_Destroy(tp->ncstats);
  tp->ncstats = NULL;
}

static void free_tp(nats_tp *tp) {
  saga_allocator a = tp->alloc;
  for (size_t i = 0; i < tp->nsubs; i++) {
    nt_sub *s = tp->subs[i];
    nt_free(&a, s->channel);
    nt_free(&a, s->subject);
    nt_free(&a, s->consumer);
    nt_free(&a, s);
  }
  nt_free(&a, tp->subs);
  nt_free(&a, tp->pend);
  nt_free(&a, tp->inbox);
  nt_free(&a, tp->url);
  nt_free(&a, tp->stream);
  nt_free(&a, tp->prefix);
  char *secrets[] = {tp->password, tp->token};
  for (size_t i = 0; i < sizeof secrets / sizeof secrets[0]; i++)
    if (secrets[i] != NULL) memset(secrets[i], 0, strlen(secrets[i]));
  char *strs[] = {tp->user,          tp->password,      tp->token,         tp->nkey,
                  tp->nkey_seed_file, tp->creds_file,   tp->tls_ca_file,   tp->tls_cert_file,
                  tp->tls_key_file,  tp->tls_hostname,  tp->inbox_prefix};
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) nt_free(&a, strs[i]);
  if (tp->sync_ready) {
    uv_cond_destroy(&tp->cv);
    uv_mutex_destroy(&tp->mu);
  }
  nt_free(&a, tp);
}

static void on_handle_closed(uv_handle_t *h) {
  nats_tp *tp = h->data;
  if (--tp->handles_open > 0) return;
  tp->state = NT_CLOSED;
  if (tp->destroyed) {
    free_tp(tp);
    return;
  }
  /* Last: the node may destroy the transport from inside. */
  saga_transport_closed(&tp->base);
}

static void try_finish_close(nats_tp *tp) {
  if (tp->rb_busy) return; /* the connect on the thread pool: its callback comes back here */
  uv_mutex_lock(&tp->mu);
  int ready = tp->nc_closed && tp->threads_live == 0;
  if (ready) tp->async_ready = 0;
  uv_mutex_unlock(&tp->mu);
  if (!ready) return;
  tp->state = NT_FINISHING;
  release_nats(tp);
  uv_timer_stop(&tp->sweep);
  uv_timer_stop(&tp->rb_timer);
  uv_close((uv_handle_t *)&tp->sweep, on_handle_closed);
  uv_close((uv_handle_t *)&tp->rb_timer, on_handle_closed);
  uv_close((uv_handle_t *)&tp->async, on_handle_closed);
}

/* ---- stream and consumer ---------------------------------------------------------------- */

static int ensure_stream(nats_tp *tp) {
  char pattern[NT_NAME_MAX + 3];
  snprintf(pattern, sizeof pattern, "%s.>", tp->prefix);
  jsStreamInfo *si = NULL;
  jsErrCode jerr = 0;
  natsStatus s = js_GetStreamInfo(&si, tp->js, tp->stream, NULL, &jerr);
  if (s == NATS_NOT_FOUND) {
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    const char *subjects[1] = {pattern};
    cfg.Name = tp->stream;
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 1;
    cfg.Retention = js_WorkQueuePolicy;
    cfg.Storage = js_FileStorage;
    s = js_AddStream(&si, tp->js, &cfg, NULL, &jerr);
    if (s != NATS_OK) {
      /* Another node may have created it meanwhile: look again, and compare. */
      nt_log(tp, SAGA_LOG_DEBUG, "creating stream '%s': %s", tp->stream, nats_err(s));
      jsStreamInfo_Destroy(si);
      si = NULL;
      natsStatus s2 = js_GetStreamInfo(&si, tp->js, tp->stream, NULL, NULL);
      if (s2 == NATS_OK) s = s2;
    }
  }
  if (s != NATS_OK || si == NULL || si->Config == NULL) {
    nt_log(tp, SAGA_LOG_ERROR, "cannot create or look up JetStream stream '%s' at %s: %s%s",
           tp->stream, tp->url, nats_err(s),
           jerr ? "" : " (is JetStream enabled on the server, nats-server -js?)");
    jsStreamInfo_Destroy(si);
    return SAGA_ETRANSPORT;
  }
  const jsStreamConfig *c = si->Config;
  int has = 0;
  char subjects[256] = "";
  size_t used = 0;
  for (int i = 0; i < c->SubjectsLen; i++) {
    if (strcmp(c->Subjects[i], pattern) == 0) has = 1;
    int w =
        snprintf(subjects + used, sizeof subjects - used, "%s%s", i ? ", " : "", c->Subjects[i]);
    if (w > 0 && (size_t)w < sizeof subjects - used) used += (size_t)w;
  }
  int rc = SAGA_OK;
  if (!has || c->Retention != js_WorkQueuePolicy) {
    static const char *const ret[] = {"limits", "interest", "work-queue"};
    int r = (int)c->Retention;
    nt_log(tp, SAGA_LOG_ERROR,
           "JetStream stream '%s' exists with another configuration: subjects [%s], %s "
           "retention; libsaga needs subjects [%s] with work-queue retention (use another "
           "stream name or prefix, or delete the stream)",
           tp->stream, subjects, r >= 0 && r < 3 ? ret[r] : "unknown", pattern);
    rc = SAGA_EEXIST;
  }
  jsStreamInfo_Destroy(si);
  return rc;
}

/* Describes how an existing consumer differs from ours into buf; returns 0 when it fits. */
static int consumer_differs(const nats_tp *tp, const jsConsumerConfig *c, const char *subject,
                            char *buf, size_t len) {
  size_t used = 0;
  int bad = 0;
#define NT_DIFF(...)                                                                               \
  do {                                                                                             \
    int w_ = snprintf(buf + used, len - used, "%s", bad++ ? "; " : "");                            \
    if (w_ > 0 && (size_t)w_ < len - used) used += (size_t)w_;                                     \
    w_ = snprintf(buf + used, len - used, __VA_ARGS__);                                            \
    if (w_ > 0 && (size_t)w_ < len - used) used += (size_t)w_;                                     \
  } while (0)
  buf[0] = '\0';
  int64_t want_wait = (int64_t)tp->ack_wait_ms * 1000000;
  if (c->AckPolicy != js_AckExplicit) NT_DIFF("ack policy is not explicit");
  if (c->AckWait != want_wait)
    NT_DIFF("ack wait %" PRId64 " ms (configured %" PRIu32 " ms)", c->AckWait / 1000000,
            tp->ack_wait_ms);
  if (c->MaxDeliver > 0 && (uint64_t)c->MaxDeliver <= tp->max_deliveries)
    NT_DIFF("max deliver %" PRId64 " would stop redelivery before max_deliveries %" PRIu32
            " dead-letters it",
            c->MaxDeliver, tp->max_deliveries);
  if (c->FilterSubject == NULL || strcmp(c->FilterSubject, subject) != 0)
    NT_DIFF("filter subject '%s' (expected '%s')", c->FilterSubject ? c->FilterSubject : "",
            subject);
  if (c->DeliverSubject != NULL && c->DeliverSubject[0] != '\0')
    NT_DIFF("a push consumer (deliver subject '%s'), libsaga pulls", c->DeliverSubject);
#undef NT_DIFF
  return bad;
}

/* The configuration of a channel's consumer; name and subject are borrowed. */
static void consumer_config(const nats_tp *tp, const char *name, const char *subject,
                            jsConsumerConfig *cfg) {
  jsConsumerConfig_Init(cfg);
  cfg->Durable = name;
  cfg->Description = "libsaga channel";
  cfg->DeliverPolicy = js_DeliverAll;
  cfg->AckPolicy = js_AckExplicit;
  cfg->AckWait = (int64_t)tp->ack_wait_ms * 1000000;
  cfg->MaxDeliver = -1; /* the adapter dead-letters; the server never gives up */
  cfg->FilterSubject = subject;
  cfg->ReplayPolicy = js_ReplayInstant;
}

static int ensure_consumer(nats_tp *tp, const char *name, const char *subject) {
  jsConsumerInfo *ci = NULL;
  jsErrCode jerr = 0;
  natsStatus s = js_GetConsumerInfo(&ci, tp->js, tp->stream, name, NULL, &jerr);
  if (s == NATS_NOT_FOUND) {
    jsConsumerConfig cfg;
    consumer_config(tp, name, subject, &cfg);
    s = js_AddConsumer(&ci, tp->js, tp->stream, &cfg, NULL, &jerr);
    if (s != NATS_OK) {
      nt_log(tp, SAGA_LOG_DEBUG, "creating consumer '%s': %s", name, nats_err(s));
      jsConsumerInfo_Destroy(ci);
      ci = NULL;
      natsStatus s2 = js_GetConsumerInfo(&ci, tp->js, tp->stream, name, NULL, NULL);
      if (s2 == NATS_OK) s = s2;
    }
  }
  if (s != NATS_OK || ci == NULL || ci->Config == NULL) {
    nt_log(tp, SAGA_LOG_ERROR,
           "cannot create or look up JetStream consumer '%s' of stream '%s': %s", name, tp->stream,
           nats_err(s));
    jsConsumerInfo_Destroy(ci);
    return SAGA_ETRANSPORT;
  }
  char diff[512];
  int rc = SAGA_OK;
  if (consumer_differs(tp, ci->Config, subject, diff, sizeof diff)) {
    nt_log(tp, SAGA_LOG_ERROR,
           "JetStream consumer '%s' of stream '%s' exists with another configuration: %s "
           "(make the settings agree, or delete the consumer)",
           name, tp->stream, diff);
    rc = SAGA_EEXIST;
  }
  jsConsumerInfo_Destroy(ci);
  return rc;
}

/*
 * From a fetch thread: deletes the channel's consumer (when drop is set) and creates it again.
 * A replica may do the same meanwhile: a consumer already deleted, or already created again
 * with our configuration, is success. The outcome is logged with why.
 */
static void recreate_consumer(nt_sub *s, int drop, const char *why) {
  nats_tp *tp = s->tp;
  jsErrCode jerr = 0;
  natsStatus st = NATS_OK;
  const char *step = "deleting";
  if (drop) {
    st = js_DeleteConsumer(tp->js, tp->stream, s->consumer, NULL, &jerr);
    if (st == NATS_NOT_FOUND) st = NATS_OK;
  }
  if (st == NATS_OK) {
    step = "creating";
    jsConsumerConfig cfg;
    consumer_config(tp, s->consumer, s->subject, &cfg);
    jsConsumerInfo *ci = NULL;
    st = js_AddConsumer(&ci, tp->js, tp->stream, &cfg, NULL, &jerr);
    jsConsumerInfo_Destroy(ci);
    ci = NULL;
    if (st != NATS_OK &&
        js_GetConsumerInfo(&ci, tp->js, tp->stream, s->consumer, NULL, NULL) == NATS_OK)
      st = NATS_OK;
    jsConsumerInfo_Destroy(ci);
  }
  uv_mutex_lock(&tp->mu);
  if (st == NATS_OK)
    post_log_locked(tp, SAGA_LOG_WARN,
                    "consumer '%s' %s: %s; what it had not seen acknowledged comes again",
                    s->consumer, why,
                    drop ? "recreated it (a JetStream defect, as in nats-server < 2.10.25 after "
                           "a crash)"
                         : "created it");
  else
    post_log_locked(tp, SAGA_LOG_ERROR, "consumer '%s' %s; %s it failed: %s (trying again)",
                    s->consumer, why, step, nats_err(st));
  uv_mutex_unlock(&tp->mu);
}

/*
 * From a fetch thread whose long poll came back empty: looks at the consumer now and then
 * (every NT_STALL_MS / 2, or every 10 * NT_STALL_MS while it has nothing at all) and repairs
 * it when it is stuck. We were asking the whole time, so a consumer that has messages waiting
 * yet makes no first delivery for NT_STALL_MS, or has deliveries unacknowledged yet neither
 * delivers, redelivers nor sees an ack for ack_wait + NT_STALL_MS, is not merely slow: a
 * healthy one hands a waiting message to a waiting pull at once and redelivers an
 * unacknowledged one after ack_wait. (Waiting messages held back because the consumer
 * reached its MaxAckPending fall under the second rule only.) Such a consumer is recreated;
 * so is one that no longer exists, which polls cannot tell from an empty one.
 */
static void watch_consumer(nt_sub *s) {
  nats_tp *tp = s->tp;
  nt_watch *w = &s->watch;
  uint64_t now = uv_hrtime() / 1000000;
  uint64_t every = w->empty ? 10 * NT_STALL_MS : NT_STALL_MS / 2;
  if (w->looked != 0 && now - w->looked < every) return;
  w->looked = now;
  jsConsumerInfo *ci = NULL;
  jsErrCode jerr = 0;
  natsStatus st = js_GetConsumerInfo(&ci, tp->js, tp->stream, s->consumer, NULL, &jerr);
  if (st == NATS_NOT_FOUND) {
    jsConsumerInfo_Destroy(ci);
    recreate_consumer(s, 0, "no longer exists");
    memset(w, 0, sizeof *w);
    return;
  }
  if (st != NATS_OK || ci == NULL) { /* no answer now (disconnected, say): look again later */
    jsConsumerInfo_Destroy(ci);
    return;
  }
  uint64_t waiting = ci->NumPending, first = ci->Delivered.Stream, any = ci->Delivered.Consumer;
  uint64_t floor = ci->AckFloor.Consumer;
  int64_t unacked = ci->NumAckPending;
  int64_t max_unacked = ci->Config != NULL ? ci->Config->MaxAckPending : 0;
  jsConsumerInfo_Destroy(ci);

  w->empty = waiting == 0 && unacked <= 0;
  if (waiting == 0 || first != w->last_new) w->new_since = 0;
  if (waiting > 0 && w->new_since == 0) w->new_since = now;
  w->last_new = first;
  if (unacked <= 0 || any != w->last_any || floor != w->last_floor || unacked != w->last_unacked)
    w->any_since = 0;
  if (unacked > 0 && w->any_since == 0) w->any_since = now;
  w->last_any = any;
  w->last_floor = floor;
  w->last_unacked = unacked;

  char why[160];
  if (w->new_since != 0 && now - w->new_since >= NT_STALL_MS &&
      (max_unacked <= 0 || unacked < max_unacked)) {
    snprintf(why, sizeof why,
             "is stuck: %" PRIu64 " messages waiting, none delivered in %" PRIu64
             " ms though asked for",
             waiting, now - w->new_since);
  } else if (w->any_since != 0 && now - w->any_since >= (uint64_t)tp->ack_wait_ms + NT_STALL_MS) {
    snprintf(why, sizeof why,
             "is stuck: %" PRId64 " deliveries unacknowledged, none redelivered or acknowledged "
             "in %" PRIu64 " ms",
             unacked, now - w->any_since);
  } else {
    return;
  }
  recreate_consumer(s, 1, why);
  memset(w, 0, sizeof *w);
}

/* ---- the adapter methods ---------------------------------------------------------------- */

/* The host of the first server in a URL list ("nats://user:pw@host:port,..."), into out. */
static void first_host(const char *url, char *out, size_t outlen) {
  const char *p = strstr(url, "://");
  p = p != NULL ? p + 3 : url;
  const char *end = p + strcspn(p, ",");
  const char *at = memchr(p, '@', (size_t)(end - p));
  if (at != NULL) p = at + 1;
  size_t n;
  if (*p == '[') { /* [IPv6]:port */
    p++;
    const char *rb = memchr(p, ']', (size_t)(end - p));
    n = rb != NULL ? (size_t)(rb - p) : 0;
  } else {
    const char *colon = memchr(p, ':', (size_t)(end - p));
    n = (size_t)((colon != NULL ? colon : end) - p);
  }
  if (n >= outlen) n = 0;
  memcpy(out, p, n);
  out[n] = '\0';
}

static int is_ip_literal(const char *host) {
  unsigned char buf[16];
  return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

/* Credentials and TLS into tp->opts. Logs what failed; returns a libnats status. */
static natsStatus set_security(nats_tp *tp, const char **what) {
  natsOptions *o = tp->opts;
  natsStatus s = NATS_OK;
  *what = "credentials";
  if (tp->user != NULL)
    s = natsOptions_SetUserInfo(o, tp->user, tp->password != NULL ? tp->password : "");
  else if (tp->token != NULL)
    s = natsOptions_SetToken(o, tp->token);
  else if (tp->nkey != NULL) {
    *what = "nkey_seed_file";
    s = natsOptions_SetNKeyFromSeed(o, tp->nkey, tp->nkey_seed_file);
  } else if (tp->creds_file != NULL) {
    *what = "creds_file";
    s = natsOptions_SetUserCredentialsFromFiles(o, tp->creds_file, NULL);
  }
  if (s != NATS_OK || !tp->tls) return s;
  *what = "TLS";
  s = natsOptions_SetSecure(o, true);
  if (s == NATS_OK && tp->tls_ca_file != NULL) {
    *what = "tls_ca_file";
    s = natsOptions_LoadCATrustedCertificates(o, tp->tls_ca_file);
  }
  if (s == NATS_OK && tp->tls_cert_file != NULL) {
    *what = "tls_cert_file/tls_key_file";
    s = natsOptions_LoadCertificatesChain(o, tp->tls_cert_file, tp->tls_key_file);
  }
  char host[256];
  const char *name = tp->tls_hostname;
  if (name == NULL) {
    first_host(tp->url, host, sizeof host);
    if (host[0] != '\0' && !is_ip_literal(host)) name = host;
  }
  if (s == NATS_OK && name != NULL) {
    *what = "tls_hostname";
    s = natsOptions_SetExpectedHostname(o, name);
  }
  if (s == NATS_OK && name == NULL)
    nt_log(tp, SAGA_LOG_WARN,
           "NATS TLS: the server is addressed by IP address and no tls_hostname is set: its "
           "certificate's chain is verified, not its name");
  return s;
}

/* How this transport authenticates, for the log line at open. */
static const char *auth_mode(const nats_tp *tp) {
  if (tp->user != NULL) return "user/password";
  if (tp->token != NULL) return "token";
  if (tp->nkey != NULL) return "nkey";
  if (tp->creds_file != NULL) return "creds file";
  return "no credentials";
}

/* On the current connection: the subscription to the publish acks, and the thread reading
 * them. */
static int acks_start(nats_tp *tp) {
  char wild[NT_NAME_MAX + 64];
  snprintf(wild, sizeof wild, "%s.*.*", tp->inbox);
  natsStatus s = natsConnection_SubscribeSync(&tp->acksub, tp->nc, wild);
  if (s != NATS_OK) {
    nt_log(tp, SAGA_LOG_ERROR, "subscribing to publish acknowledgements: %s", nats_err(s));
    tp->acksub = NULL;
    return SAGA_ETRANSPORT;
  }
  uv_mutex_lock(&tp->mu);
  tp->threads_live++;
  uv_mutex_unlock(&tp->mu);
  if (uv_thread_create(&tp->ack_thread, ack_main, tp) != 0) {
    uv_mutex_lock(&tp->mu);
    tp->threads_live--;
    uv_mutex_unlock(&tp->mu);
    return SAGA_ENOMEM;
  }
  tp->ack_thread_started = 1;
  return SAGA_OK;
}

/* On the current connection: s's pull subscription, bound to its consumer (which exists),
 * and its fetch thread. */
static int sub_start(nats_tp *tp, nt_sub *s) {
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = tp->stream;
  so.Consumer = s->consumer; /* bound: libnats neither creates nor ever deletes it */
  jsErrCode jerr = 0;
  natsStatus st = js_PullSubscribe(&s->sub, tp->js, s->subject, NULL, NULL, &so, &jerr);
  if (st != NATS_OK) {
    nt_log(tp, SAGA_LOG_ERROR, "pull subscription to consumer '%s': %s", s->consumer,
           nats_err(st));
    s->sub = NULL;
    return SAGA_ETRANSPORT;
  }
  memset(&s->watch, 0, sizeof s->watch);
  uv_mutex_lock(&tp->mu);
  tp->threads_live++;
  uv_mutex_unlock(&tp->mu);
  if (uv_thread_create(&s->thread, fetch_main, s) != 0) {
    uv_mutex_lock(&tp->mu);
    tp->threads_live--;
    uv_mutex_unlock(&tp->mu);
    return SAGA_ENOMEM;
  }
  s->thread_started = 1;
  return SAGA_OK;
}

/* The INFO line saying where this transport is connected. */
static void log_connected(nats_tp *tp) {
  char where[256] = "";
  natsConnection_GetConnectedUrl(tp->nc, where, sizeof where);
  nt_log(tp, SAGA_LOG_INFO, "connected to NATS at %s (%s, %s), stream '%s', subjects '%s.>'",
         where, tp->tls ? "TLS" : "plaintext", auth_mode(tp), tp->stream, tp->prefix);
}

static void rb_schedule(nats_tp *tp);

/*
 * Open: options, then a first connect attempt. When a server answers, the stream, the
 * publish-ack subscription and its thread are set up now, as before. When none can be reached
 * (refused, or no answer within the connect timeout) and fail_fast is off, open succeeds
 * anyway and the transport connects in the background with the machinery that replaces a
 * connection libnats gave up on (see "Closed for good"): its first connection is just a new
 * connection. Any other failure fails open, and leaves nothing behind: the libuv handles are
 * initialised last, once nothing can fail any more, and libnats is done with tp (its closed
 * callback ran, our threads ended) before open returns.
 */
static int tp_open(saga_transport *t, uv_loop_t *loop) {
  nats_tp *tp = (nats_tp *)t;
  if (tp->state != NT_NEW) return SAGA_ESTATE;
  if (loop == NULL) return SAGA_EINVAL;
  tp->loop = loop;
  int rc = SAGA_ETRANSPORT;
  natsStatus s;
  natsInbox *inbox = NULL;
  int background = 0;

  if (uv_mutex_init(&tp->mu) != 0) return SAGA_ENOMEM;
  if (uv_cond_init(&tp->cv) != 0) {
    uv_mutex_destroy(&tp->mu);
    return SAGA_ENOMEM;
  }
  tp->sync_ready = 1;

  s = natsStatistics_Create(&tp->ncstats);
  if (s == NATS_OK) s = natsOptions_Create(&tp->opts);
  if (s == NATS_OK) s = natsOptions_SetURL(tp->opts, tp->url);
  if (s == NATS_OK) s = natsOptions_SetName(tp->opts, "libsaga");
  if (s == NATS_OK) s = natsOptions_SetMaxReconnect(tp->opts, -1);
  if (s == NATS_OK) s = natsOptions_SetReconnectWait(tp->opts, tp->reconnect_wait_ms);
  if (s == NATS_OK) s = natsOptions_SetTimeout(tp->opts, 2000);
  /* A half-open connection is noticed within about 30 s instead of libnats's 4 min. */
  if (s == NATS_OK) s = natsOptions_SetPingInterval(tp->opts, 10000);
  if (s == NATS_OK) s = natsOptions_SetMaxPingsOut(tp->opts, 3);
  if (s == NATS_OK) s = natsOptions_SetDisconnectedCB(tp->opts, on_disconnected, tp);
  if (s == NATS_OK) s = natsOptions_SetReconnectedCB(tp->opts, on_reconnected, tp);
  if (s == NATS_OK) s = natsOptions_SetClosedCB(tp->opts, on_closed, tp);
  if (s == NATS_OK) s = natsOptions_SetErrorHandler(tp->opts, on_error, tp);
  if (s == NATS_OK && tp->inbox_prefix != NULL)
    s = natsOptions_SetCustomInboxPrefix(tp->opts, tp->inbox_prefix);
  if (s != NATS_OK) {
    nt_log(tp, SAGA_LOG_ERROR, "NATS options for '%s': %s", tp->url, nats_err(s));
    rc = s == NATS_NO_MEMORY ? SAGA_ENOMEM : SAGA_EINVAL;
    goto fail;
  }
  {
    const char *what = "";
    s = set_security(tp, &what);
    if (s != NATS_OK) {
      nt_log(tp, SAGA_LOG_ERROR, "NATS %s for '%s': %s", what, tp->url, nats_err(s));
      rc = s == NATS_NO_MEMORY ? SAGA_ENOMEM : SAGA_EINVAL;
      goto fail;
    }
  }
  if (uv_random(NULL, NULL, tp->mac_key, sizeof tp->mac_key, 0, NULL) != 0) {
    nt_log(tp, SAGA_LOG_ERROR, "no randomness from the operating system for the reply key");
    rc = SAGA_EIO;
    goto fail;
  }
  /* The publish acks' inbox, before any connection (a background connect needs it too). */
  s = natsInbox_Create(&inbox);
  if (s != NATS_OK) {
    nt_log(tp, SAGA_LOG_ERROR, "an inbox for publish acknowledgements: %s", nats_err(s));
    rc = s == NATS_NO_MEMORY ? SAGA_ENOMEM : SAGA_ETRANSPORT;
    goto fail;
  }
  {
    /* "_INBOX.<unique>", or "<inbox_prefix>.<unique>". */
    const char *unique = strchr(inbox, '.');
    unique = unique != NULL ? unique + 1 : inbox;
    const char *pre = tp->inbox_prefix != NULL ? tp->inbox_prefix : "_INBOX";
    size_t n = strlen(pre) + strlen(unique) + 2;
    tp->inbox = nt_malloc(&tp->alloc, n);
    if (tp->inbox != NULL) snprintf(tp->inbox, n, "%s.%s", pre, unique);
    natsInbox_Destroy(inbox);
    if (tp->inbox == NULL) {
      rc = SAGA_ENOMEM;
      goto fail;
    }
  }
  /* Before the connect: a disconnection reported right after it must not be overwritten. */
  tp->connected = 1;
  s = natsConnection_Connect(&tp->nc, tp->opts);
  if (s != NATS_OK) {
    const char *why = nats_err(s);
    int auth = s == NATS_NOT_PERMITTED || auth_text(why);
    if (auth) tp->stats.auth_errors++;
    tp->nc = NULL;
    tp->connected = 0;
    /* Nobody answered (refused, no route, or silence past the timeout): the server may come
     * later. A server that answered and refused is a configuration error: fail. */
    if (!auth && !tp->fail_fast && (s == NATS_NO_SERVER || s == NATS_TIMEOUT)) {
      nt_log(tp, SAGA_LOG_WARN,
             "cannot connect to NATS at %s: %s; opening anyway: the transport connects when a "
             "server answers (trying every %" PRIu32 " ms, then every %d ms at most), and "
             "messages wait in the outbox meanwhile",
             tp->url, why, tp->reconnect_wait_ms, NT_RB_MAX_MS);
      background = 1;
    } else {
      /* A server that refuses our client certificate just closes the connection, which
       * libnats reports as a protocol error: with TLS on, any failure gets the TLS hint. */
      nt_log(tp, SAGA_LOG_ERROR, "cannot connect to NATS at %s: %s%s", tp->url, why,
             auth ? " (authentication refused: check the credentials)"
             : tp->tls || s == NATS_SSL_ERROR || s == NATS_SECURE_CONNECTION_REQUIRED ||
                     s == NATS_SECURE_CONNECTION_WANTED
                 ? " (TLS: check tls_ca_file, tls_cert_file/tls_key_file, tls_hostname and the "
                   "server's tls settings; a server verifying clients closes the connection on "
                   "a certificate it does not accept)"
                 : "");
      goto fail;
    }
  }

  if (!background) {
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = NT_API_WAIT_MS;
    s = natsConnection_JetStream(&tp->js, tp->nc, &jo);
    if (s != NATS_OK) {
      nt_log(tp, SAGA_LOG_ERROR, "JetStream context: %s", nats_err(s));
      goto fail;
    }
    if ((rc = ensure_stream(tp)) != SAGA_OK) goto fail;
    if ((rc = acks_start(tp)) != SAGA_OK) goto fail;
    rc = SAGA_ETRANSPORT;
  }
  /* Last: once initialised, the handle can only go through uv_close. */
  if (uv_async_init(loop, &tp->async, on_async) != 0) {
    rc = SAGA_EIO;
    goto fail;
  }
  tp->async.data = tp;
  uv_timer_init(loop, &tp->sweep); /* cannot fail once the loop took the async handle */
  tp->sweep.data = tp;
  uv_timer_init(loop, &tp->rb_timer);
  tp->rb_timer.data = tp;
  tp->handles_open = 3;
  uint64_t period = tp->ack_wait_ms / 4 > 50 ? tp->ack_wait_ms / 4 : 50;
  uv_timer_start(&tp->sweep, on_sweep, period, period);
  uv_unref((uv_handle_t *)&tp->sweep); /* the async handle is what keeps the loop alive */
  uv_mutex_lock(&tp->mu);
  tp->async_ready = 1;
  /* Anything posted meanwhile (a log line) is picked up at once. */
  if (tp->log_count > 0) wake_locked(tp);
  uv_mutex_unlock(&tp->mu);
  tp->state = NT_OPEN;
  if (background) {
    /* The first connection comes as a new one would after libnats gave one up. */
    tp->rb_delay = tp->reconnect_wait_ms;
    tp->rb_logged = 1; /* said above */
    rb_schedule(tp);
  } else {
    tp->ever_connected = 1;
    tp->stats.connects++;
    log_connected(tp);
  }
  return SAGA_OK;

fail:
  /* Synchronous teardown: libnats must be done with tp before the node destroys it. */
  if (tp->nc != NULL) {
    uv_mutex_lock(&tp->mu);
    tp->stopping = 1;
    uv_cond_broadcast(&tp->cv);
    uv_mutex_unlock(&tp->mu);
    natsConnection_Close(tp->nc);
    uv_mutex_lock(&tp->mu);
    while (!tp->nc_closed) uv_cond_wait(&tp->cv, &tp->mu);
    uv_mutex_unlock(&tp->mu);
  }
  release_nats(tp);
  tp->state = NT_FAILED;
  return rc;
}

/* Whether libnats's connection is up now (loop thread). */
static int nc_up(const nats_tp *tp) {
  return tp->rb == RB_NONE && tp->nc != NULL &&
         natsConnection_Status(tp->nc) == NATS_CONN_STATUS_CONNECTED;
}

/*
 * Subscriptions remembered while there was no connection to set them up on (subscribe()
 * during a reconnect): their consumer and fetch thread, now that the connection is back. On the
 * loop, after wake-ups and sweeps while some wait, at most once a second; stops at the first
 * failure (tried again later).
 * Those remembered while starting over are set up by session_start() instead.
 */
static void subs_setup(nats_tp *tp) {
  if (tp->subs_waiting == 0 || tp->state != NT_OPEN || !nc_up(tp)) return;
  uint64_t now = uv_now(tp->loop);
  if (tp->subs_tried != 0 && now - tp->subs_tried < 1000) return; /* at most once a second */
  tp->subs_tried = now;
  for (size_t i = 0; i < tp->nsubs; i++) {
    nt_sub *s = tp->subs[i];
    if (s->thread_started) continue;
    int rc = ensure_consumer(tp, s->consumer, s->subject);
    if (rc == SAGA_OK) rc = sub_start(tp, s);
    if (rc != SAGA_OK) {
      natsSubscription_Destroy(s->sub);
      s->sub = NULL;
      return;
    }
    tp->subs_waiting--;
    nt_log(tp, SAGA_LOG_INFO, "consuming channel '%s' now that NATS is connected", s->channel);
  }
}

/*
 * Starts consuming a channel: its durable consumer, a pull subscription and a fetch thread.
 * Without a connection (opened while no server answered, starting over, or reconnecting) the
 * channel is remembered and set up once one is there; a consumer that exists with another
 * configuration is then reported in the log rather than by this call.
 */
static int tp_subscribe(saga_transport *t, const char *channel) {
  nats_tp *tp = (nats_tp *)t;
  if (channel == NULL) return SAGA_EINVAL;
  if (tp->state != NT_OPEN) return tp->state == NT_NEW ? SAGA_ESTATE : SAGA_ECLOSED;
  for (size_t i = 0; i < tp->nsubs; i++)
    if (strcmp(tp->subs[i]->channel, channel) == 0) return SAGA_OK;
  char subject[NT_SUBJECT_MAX + NT_NAME_MAX + 2];
  if (make_subject(tp, channel, subject, sizeof subject) != SAGA_OK) {
    nt_log(tp, SAGA_LOG_ERROR, "channel '%s' cannot be a NATS subject token sequence", channel);
    return SAGA_EINVAL;
  }
  if (tp->nsubs >= NT_MAX_SUBS) return SAGA_EFULL;
  char name[NT_CONSUMER_KEEP + 16];
  consumer_name(channel, name, sizeof name);
  int now = nc_up(tp);
  int rc = SAGA_OK;
  if (now) {
    rc = ensure_consumer(tp, name, subject);
    /* The connection dropped during the request: remember it, as below. */
    if (rc == SAGA_ETRANSPORT && !nc_up(tp)) now = 0;
    else if (rc != SAGA_OK) return rc;
  }

  if (tp->nsubs == tp->subs_cap) {
    size_t cap = tp->subs_cap ? tp->subs_cap * 2 : 4;
    nt_sub **subs = tp->alloc.realloc(tp->subs, cap * sizeof *subs, tp->alloc.ud);
    if (subs == NULL) return SAGA_ENOMEM;
    tp->subs = subs;
    tp->subs_cap = cap;
  }
  nt_sub *s = nt_calloc(&tp->alloc, sizeof *s);
  if (s == NULL) return SAGA_ENOMEM;
  s->tp = tp;
  s->index = (uint32_t)tp->nsubs;
  s->channel = nt_strdup(&tp->alloc, channel);
  s->subject = nt_strdup(&tp->alloc, subject);
  s->consumer = nt_strdup(&tp->alloc, name);
  for (uint32_t i = 0; i < NT_MAX_INFLIGHT; i++)
    s->slots[i].next = i + 1 < NT_MAX_INFLIGHT ? i + 1 : NT_NO_SLOT;
  s->free_head = 0;
  if (s->channel == NULL || s->subject == NULL || s->consumer == NULL) {
    rc = SAGA_ENOMEM;
    goto fail;
  }
  if (now) {
    if ((rc = sub_start(tp, s)) != SAGA_OK) goto fail;
  } else {
    if (tp->rb == RB_NONE) tp->subs_waiting++; /* else session_start() sets it up */
    nt_log(tp, SAGA_LOG_INFO, "not connected to NATS: channel '%s' is consumed once connected",
           channel);
  }
  tp->subs[tp->nsubs++] = s;
  return SAGA_OK;

fail:
  natsSubscription_Destroy(s->sub);
  nt_free(&tp->alloc, s->channel);
  nt_free(&tp->alloc, s->subject);
  nt_free(&tp->alloc, s->consumer);
  nt_free(&tp->alloc, s);
  return rc;
}

/* ---- starting over after libnats closed the connection ------------------------------------- */

/* From the loop: closes the current connection (if any) and waits for libnats's closed
 * callback and our threads, then releases it. Used when a fresh session failed half-way. */
static void session_abort(nats_tp *tp) {
  uv_mutex_lock(&tp->mu);
  tp->stopping = 1;
  uv_cond_broadcast(&tp->cv);
  uv_mutex_unlock(&tp->mu);
  if (tp->nc != NULL) {
    natsConnection_Close(tp->nc);
    uv_mutex_lock(&tp->mu);
    while (!tp->nc_closed) uv_cond_wait(&tp->cv, &tp->mu);
    uv_mutex_unlock(&tp->mu);
  }
  release_session(tp); /* joins the threads */
  uv_mutex_lock(&tp->mu);
  tp->stopping = 0;
  tp->nc_closed = 0;
  tp->threads_live = 0;
  uv_mutex_unlock(&tp->mu);
}

static void rb_timer_cb(uv_timer_t *h);

static void rb_schedule(nats_tp *tp) {
  tp->rb = RB_WAITING;
  uv_timer_start(&tp->rb_timer, rb_timer_cb, tp->rb_delay, 0);
  uint64_t next = (uint64_t)tp->rb_delay * 2;
  tp->rb_delay = next > NT_RB_MAX_MS ? NT_RB_MAX_MS : (uint32_t)next;
}

/* On the thread pool: the connect, which may wait for the server up to its timeout. */
static void rb_work_cb(uv_work_t *w) {
  nats_tp *tp = w->data;
  natsConnection *nc = NULL;
  natsStatus s = natsConnection_Connect(&nc, tp->opts);
  tp->rb_status = s;
  tp->rb_nc = s == NATS_OK ? nc : NULL;
  snprintf(tp->rb_err, sizeof tp->rb_err, "%s", s == NATS_OK ? "" : nats_err(s));
}

/* The JetStream side of a fresh connection, on the loop: the server just answered. */
static int session_start(nats_tp *tp) {
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.Wait = NT_API_WAIT_MS;
  natsStatus s = natsConnection_JetStream(&tp->js, tp->nc, &jo);
  if (s != NATS_OK) {
    nt_log(tp, SAGA_LOG_ERROR, "JetStream context: %s", nats_err(s));
    return SAGA_ETRANSPORT;
  }
  int rc = ensure_stream(tp);
  if (rc == SAGA_OK) rc = acks_start(tp);
  for (size_t i = 0; i < tp->nsubs && rc == SAGA_OK; i++) {
    nt_sub *sb = tp->subs[i];
    rc = ensure_consumer(tp, sb->consumer, sb->subject);
    if (rc == SAGA_OK) rc = sub_start(tp, sb);
  }
  if (rc == SAGA_OK) tp->subs_waiting = 0; /* all of them set up */
  return rc;
}

static void rb_after_cb(uv_work_t *w, int status) {
  nats_tp *tp = w->data;
  (void)status;
  tp->rb_busy = 0;
  natsConnection *nc = tp->rb_nc;
  tp->rb_nc = NULL;
  if (tp->state != NT_OPEN) {
    /* Closed meanwhile: close what we got, synchronously, then finish the close. close()
     * found no connection and set nc_closed: wait for this one's own closed callback. */
    tp->nc = nc;
    if (nc != NULL) {
      uv_mutex_lock(&tp->mu);
      tp->nc_closed = 0;
      uv_mutex_unlock(&tp->mu);
      natsConnection_Close(nc);
      uv_mutex_lock(&tp->mu);
      while (!tp->nc_closed) uv_cond_wait(&tp->cv, &tp->mu);
      uv_mutex_unlock(&tp->mu);
    }
    uv_mutex_lock(&tp->mu);
    tp->nc_closed = 1;
    uv_mutex_unlock(&tp->mu);
    if (tp->state == NT_CLOSING) try_finish_close(tp);
    return;
  }
  if (nc == NULL) {
    int auth = tp->rb_status == NATS_NOT_PERMITTED || auth_text(tp->rb_err);
    uv_mutex_lock(&tp->mu);
    if (auth) tp->auth_errors++;
    int say = auth ? !tp->auth_failing : !tp->rb_logged;
    if (auth)
      tp->auth_failing = 1;
    else
      tp->rb_logged = 1;
    uv_mutex_unlock(&tp->mu);
    if (say)
      nt_log(tp, auth ? SAGA_LOG_ERROR : SAGA_LOG_WARN,
             "%s: %s (trying again, every %" PRIu32 " ms at most)",
             auth ? "NATS authentication failed" : "cannot connect to NATS", tp->rb_err,
             NT_RB_MAX_MS);
    rb_schedule(tp);
    return;
  }
  tp->nc = nc;
  uv_mutex_lock(&tp->mu);
  tp->connected = 1;
  tp->reconnects++;
  uv_mutex_unlock(&tp->mu);
  tp->session++; /* what the old connection held (its reconnect buffer too) is gone */
  if (session_start(tp) != SAGA_OK) {
    session_abort(tp);
    rb_schedule(tp);
    return;
  }
  tp->rb = RB_NONE;
  tp->rb_logged = 0;
  tp->stats.connects++;
  uv_mutex_lock(&tp->mu);
  tp->auth_failing = 0;
  uv_mutex_unlock(&tp->mu);
  if (tp->ever_connected) {
    nt_log(tp, SAGA_LOG_INFO, "reconnected to NATS (a new connection)");
  } else {
    tp->ever_connected = 1;
    log_connected(tp);
  }
}

static void rb_timer_cb(uv_timer_t *h) {
  nats_tp *tp = h->data;
  if (tp->state != NT_OPEN || tp->rb != RB_WAITING) return;
  tp->rb = RB_CONNECTING;
  tp->rb_work.data = tp;
  if (uv_queue_work(tp->loop, &tp->rb_work, rb_work_cb, rb_after_cb) != 0) {
    rb_schedule(tp);
    return;
  }
  tp->rb_busy = 1;
}

/*
 * From the loop, after every wake-up: notices that libnats closed the connection although
 * we did not ask (it gives up after repeated authentication failures), lets the threads end,
 * releases the connection and schedules a new one.
 */
static void rb_check(nats_tp *tp) {
  uv_mutex_lock(&tp->mu);
  int closed = tp->nc_closed, live = tp->threads_live;
  if (closed && tp->rb == RB_NONE) {
    tp->stopping = 1; /* the threads end (their calls fail on a closed connection anyway) */
    uv_cond_broadcast(&tp->cv);
  }
  uv_mutex_unlock(&tp->mu);
  if (closed && tp->rb == RB_NONE) {
    tp->rb = RB_DRAINING;
    tp->rb_delay = tp->reconnect_wait_ms;
    nt_log(tp, SAGA_LOG_ERROR,
           "NATS closed the connection for good (libnats gives up after repeated "
           "authentication failures); starting over with a new connection");
  }
  if (tp->rb != RB_DRAINING || live > 0) return;
  release_session(tp);
  uv_mutex_lock(&tp->mu);
  tp->stopping = 0;
  tp->nc_closed = 0;
  uv_mutex_unlock(&tp->mu);
  rb_schedule(tp);
}

static int tp_send(saga_transport *t, const char *channel, const void *data, size_t len,
                   uint64_t token) {
  nats_tp *tp = (nats_tp *)t;
  if (channel == NULL || (data == NULL && len > 0)) return SAGA_EINVAL;
  if (tp->state != NT_OPEN) return tp->state == NT_NEW ? SAGA_ESTATE : SAGA_ECLOSED;
  char subject[NT_SUBJECT_MAX + NT_NAME_MAX + 2];
  if (make_subject(tp, channel, subject, sizeof subject) != SAGA_OK) return SAGA_EINVAL;
  if (tp->rb != RB_NONE) return SAGA_ETRANSPORT; /* starting over: the outbox keeps it */
  int64_t max = natsConnection_GetMaxPayload(tp->nc);
  if (len > INT_MAX || (max > 0 && (int64_t)len > max)) return SAGA_ETOOBIG;
  /* At most one copy on its way per token: a resend of one whose copy is still travelling (or
   * waiting in the reconnect buffer) is taken without another copy; its ack confirms it. */
  uint64_t now = uv_now(tp->loop);
  int up = 0;
  uint64_t cur = current_gen(tp, &up);
  nt_pend *p = pend_find(tp, token);
  if (p != NULL && pend_live(tp, p, cur, up, now)) {
    tp->stats.sends_coalesced++;
    return SAGA_OK;
  }
  int added = 0;
  if (p == NULL) {
    int rc = SAGA_OK;
    if ((p = pend_add(tp, token, &rc)) == NULL) {
      if (rc == SAGA_EFULL) {
        tp->stats.pending_dropped++;
        nt_log(tp, SAGA_LOG_DEBUG, "%zu publishes await their ack: send refused for now",
               tp->pend_count);
        return SAGA_ETRANSPORT;
      }
      return rc;
    }
    added = 1;
  }
  char reply[NT_NAME_MAX + 64];
  snprintf(reply, sizeof reply, "%s.%" PRIu64 ".%016" PRIx64, tp->inbox, token,
           token_mac(tp->mac_key, token));
  natsStatus s =
      natsConnection_PublishRequest(tp->nc, subject, reply, len > 0 ? data : NULL, (int)len);
  if (s == NATS_OK) {
    /* p still points at the entry: nothing was added or removed since it was found. */
    p->at = now + 1;
    p->gen = cur;
    p->nacked = 0;
    tp->stats.publishes++;
    tp->buffer_full_logged = 0;
    return SAGA_OK;
  }
  /* Not sent: not pending either (unless an earlier copy of it is). */
  if (added) pend_remove(tp, p);
  if (s == NATS_INSUFFICIENT_BUFFER) {
    /* Disconnected long enough to fill the reconnect buffer: the message is not sent, and
     * the outbox will resend it. Said once per outage, not once per message. */
    if (!tp->buffer_full_logged)
      nt_log(tp, SAGA_LOG_WARN, "NATS reconnect buffer full: messages wait in the outbox");
    tp->buffer_full_logged = 1;
    saga_transport_sent(t, token, SAGA_ETRANSPORT);
    return SAGA_OK;
  }
  nt_log(tp, SAGA_LOG_DEBUG, "publish to '%s' failed: %s", subject, natsStatus_GetText(s));
  return s == NATS_MAX_PAYLOAD ? SAGA_ETOOBIG : SAGA_ETRANSPORT;
}

static void tp_ack(saga_transport *t, uint64_t tag) {
  nats_tp *tp = (nats_tp *)t;
  if (tp->state != NT_OPEN) return;
  uint32_t si = (uint32_t)(tag & ((1u << NT_SLOT_BITS) - 1));
  uint32_t sub = (uint32_t)((tag >> NT_SLOT_BITS) & ((1u << NT_SUB_BITS) - 1));
  uint32_t gen = (uint32_t)(tag >> (NT_SLOT_BITS + NT_SUB_BITS));
  if (sub >= tp->nsubs || si >= NT_MAX_INFLIGHT) return;
  nt_sub *s = tp->subs[sub];
  /* Unknown, stale or repeated tags find no live slot of their generation. */
  if (s->slots[si].msg == NULL || s->slots[si].gen != gen) return;
  release_slot(tp, s, si, 1);
}

static void tp_close(saga_transport *t) {
  nats_tp *tp = (nats_tp *)t;
  if (tp->state != NT_OPEN) {
    if (tp->state == NT_NEW || tp->state == NT_FAILED) {
      tp->state = NT_CLOSED;
      if (!tp->destroyed) saga_transport_closed(t);
    }
    return;
  }
  tp->state = NT_CLOSING;
  uv_mutex_lock(&tp->mu);
  tp->stopping = 1;
  uv_cond_broadcast(&tp->cv);
  uv_mutex_unlock(&tp->mu);
  uv_timer_stop(&tp->rb_timer);
  /* Wakes the threads blocked in libnats; the closed callback follows on libnats's thread.
   * Starting over, there may be no connection (or a closed one) to close. */
  if (tp->nc != NULL) {
    natsConnection_Close(tp->nc);
  } else {
    uv_mutex_lock(&tp->mu);
    tp->nc_closed = 1;
    uv_mutex_unlock(&tp->mu);
  }
  /* In case everything already ended before (no event would come to look). */
  uv_async_send(&tp->async);
}

static void tp_destroy(saga_transport *t) {
  nats_tp *tp = (nats_tp *)t;
  switch (tp->state) {
  case NT_OPEN:
    /* Destroyed without close: finish closing on the loop, then free, reporting nothing. */
    tp->destroyed = 1;
    tp_close(t);
    return;
  case NT_CLOSING:
  case NT_FINISHING:
    tp->destroyed = 1;
    return;
  default:
    free_tp(tp);
  }
}

/* Only what send() refuses for good: channels that cannot be a subject. Whether the server
 * lets this node publish there is the server's (a refusal is logged and counted). */
static int tp_can_send(saga_transport *t, const char *channel) {
  nats_tp *tp = (nats_tp *)t;
  char subject[NT_SUBJECT_MAX + NT_NAME_MAX + 2];
  return channel != NULL && make_subject(tp, channel, subject, sizeof subject) == SAGA_OK;
}

int saga_nats_connected(saga_transport *t);
static int tp_connected_method(saga_transport *t) { return saga_nats_connected(t) == 1; }

static const saga_transport_methods nats_methods = {
    .version = SAGA_TRANSPORT_VERSION,
    .name = "nats",
    .open = tp_open,
    .subscribe = tp_subscribe,
    .send = tp_send,
    .ack = tp_ack,
    .close = tp_close,
    .destroy = tp_destroy,
    .can_send = tp_can_send,
    .connected = tp_connected_method,
};

/* ---- construction ----------------------------------------------------------------------- */

void saga_nats_config_init(saga_nats_config *cfg) {
  if (cfg == NULL) return;
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_version = SAGA_NATS_CONFIG_VERSION;
  cfg->url = "nats://127.0.0.1:4222";
  cfg->stream = "SAGA";
  cfg->prefix = "saga";
  cfg->ack_wait_ms = 30000;
  cfg->max_deliveries = 10;
  cfg->reconnect_wait_ms = 250;
}

/* A string setting: NULL when unset or empty. */
static const char *opt(const char *s) { return s != NULL && *s != '\0' ? s : NULL; }

/* Copies an optional string; returns 0 when out of memory. */
static int dup_opt(const saga_allocator *a, const char *s, char **out) {
  *out = NULL;
  if (opt(s) == NULL) return 1;
  *out = nt_strdup(a, s);
  return *out != NULL;
}

int saga_nats_transport_new(saga_transport **out, const saga_nats_config *in) {
  static const saga_allocator libc = {libc_malloc, libc_realloc, libc_free, NULL};
  if (out == NULL) return SAGA_EINVAL;
  saga_nats_config c;
  saga_nats_config_init(&c);
  if (in != NULL) {
    if (in->struct_version == 1)
      memcpy(&c, in, offsetof(saga_nats_config, user)); /* the version 1 layout: no more */
    else if (in->struct_version == 2)
      memcpy(&c, in, offsetof(saga_nats_config, fail_fast)); /* the version 2 layout */
    else if (in->struct_version == SAGA_NATS_CONFIG_VERSION)
      c = *in;
    else
      return SAGA_EVERSION;
  }
  const saga_nats_config *cfg = &c;
  /* One way to authenticate, each complete. */
  int ways = (opt(c.user) != NULL) + (opt(c.token) != NULL) + (opt(c.nkey) != NULL) +
             (opt(c.creds_file) != NULL);
  if (ways > 1 || (opt(c.password) != NULL && opt(c.user) == NULL) ||
      (opt(c.nkey) != NULL) != (opt(c.nkey_seed_file) != NULL) ||
      (opt(c.tls_cert_file) != NULL) != (opt(c.tls_key_file) != NULL))
    return SAGA_EINVAL;
  if (opt(c.inbox_prefix) != NULL && !subject_ok(c.inbox_prefix, NT_NAME_MAX)) return SAGA_EINVAL;
  const saga_allocator *a = cfg->alloc != NULL ? cfg->alloc : &libc;
  if (a->malloc == NULL || a->realloc == NULL || a->free == NULL) return SAGA_EINVAL;
  const char *url = cfg->url != NULL ? cfg->url : "nats://127.0.0.1:4222";
  const char *stream = cfg->stream != NULL ? cfg->stream : "SAGA";
  const char *prefix = cfg->prefix != NULL ? cfg->prefix : "saga";
  if (*url == '\0' || !stream_name_ok(stream) || !subject_ok(prefix, NT_NAME_MAX))
    return SAGA_EINVAL;
  nats_tp *tp = nt_calloc(a, sizeof *tp);
  if (tp == NULL) return SAGA_ENOMEM;
  tp->alloc = *a;
  tp->base.methods = &nats_methods;
  tp->url = nt_strdup(a, url);
  tp->stream = nt_strdup(a, stream);
  tp->prefix = nt_strdup(a, prefix);
  tp->ack_wait_ms = cfg->ack_wait_ms ? cfg->ack_wait_ms : 30000;
  tp->max_deliveries = cfg->max_deliveries ? cfg->max_deliveries : 10;
  tp->reconnect_wait_ms = cfg->reconnect_wait_ms ? cfg->reconnect_wait_ms : 250;
  tp->fail_fast = c.fail_fast != 0;
  int ok = dup_opt(a, c.user, &tp->user) && dup_opt(a, c.password, &tp->password) &&
           dup_opt(a, c.token, &tp->token) && dup_opt(a, c.nkey, &tp->nkey) &&
           dup_opt(a, c.nkey_seed_file, &tp->nkey_seed_file) &&
           dup_opt(a, c.creds_file, &tp->creds_file) &&
           dup_opt(a, c.tls_ca_file, &tp->tls_ca_file) &&
           dup_opt(a, c.tls_cert_file, &tp->tls_cert_file) &&
           dup_opt(a, c.tls_key_file, &tp->tls_key_file) &&
           dup_opt(a, c.tls_hostname, &tp->tls_hostname) &&
           dup_opt(a, c.inbox_prefix, &tp->inbox_prefix);
  tp->tls = c.tls_required || tp->tls_ca_file != NULL || tp->tls_cert_file != NULL ||
            tp->tls_hostname != NULL || strncmp(url, "tls://", 6) == 0;
  if (!ok || tp->url == NULL || tp->stream == NULL || tp->prefix == NULL) {
    free_tp(tp);
    return SAGA_ENOMEM;
  }
  tp->state = NT_NEW;
  *out = &tp->base;
  return SAGA_OK;
}

int saga_nats_stats_get_sized(saga_transport *t, saga_nats_stats *out, size_t size) {
  if (t == NULL || out == NULL || t->methods != &nats_methods) return SAGA_EINVAL;
  nats_tp *tp = (nats_tp *)t;
  saga_nats_stats st = tp->stats;
  if (tp->sync_ready) {
    uv_mutex_lock(&tp->mu);
    st.acks_ignored += tp->acks_malformed;
    st.permission_errors += tp->permission_errors;
    st.auth_errors += tp->auth_errors;
    uv_mutex_unlock(&tp->mu);
  }
  st.unconfirmed = tp->pend_count;
  memcpy(out, &st, size < sizeof st ? size : sizeof st);
  return SAGA_OK;
}

/* The exported function behind the macro of the same name, for programs built before the
 * struct grew: the six counters it had then. */
#undef saga_nats_stats_get
int(saga_nats_stats_get)(saga_transport *t, saga_nats_stats *out) {
  return saga_nats_stats_get_sized(t, out, offsetof(saga_nats_stats, publishes));
}

int saga_nats_connected(saga_transport *t) {
  if (t == NULL || t->methods != &nats_methods) return SAGA_EINVAL;
  nats_tp *tp = (nats_tp *)t;
  if (tp->state != NT_OPEN || !nc_up(tp)) return 0;
  /* Channels remembered during a reconnect are not consumed yet. */
  return tp->subs_waiting == 0;
}
