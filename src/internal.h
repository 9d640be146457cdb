/*
 * Cross-file internals of libsaga. Nothing here is public API; names use the saga__ prefix.
 */
#ifndef SAGA_INTERNAL_H
#define SAGA_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "saga.h"
#include "saga/sys/transport.h"

/* ---- allocation (src/util/util.c) ---------------------------------------------------- */

/* The allocator to use: a (the user's) or the libc one. Never NULL. Callers that keep it
 * beyond the call copy the struct. */
const saga_allocator *saga__alloc_resolve(const saga_allocator *a);
void *saga__malloc(const saga_allocator *a, size_t n);
void *saga__calloc(const saga_allocator *a, size_t n);
void *saga__realloc(const saga_allocator *a, void *p, size_t n);
void saga__free(const saga_allocator *a, void *p);
char *saga__strdup(const saga_allocator *a, const char *s);
char *saga__strndup(const saga_allocator *a, const char *s, size_t n);

/* A growable byte buffer using an allocator. */
typedef struct saga__buf {
  uint8_t *data;
  size_t len, cap;
  const saga_allocator *alloc;
} saga__buf;

void saga__buf_init(saga__buf *b, const saga_allocator *a);
int saga__buf_reserve(saga__buf *b, size_t extra);
int saga__buf_append(saga__buf *b, const void *p, size_t n);
void saga__buf_reset(saga__buf *b); /* len = 0, keeps memory */
void saga__buf_free(saga__buf *b);

/* snprintf into err (errlen may be 0 / err NULL). */
void saga__errf(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The copy of a getter that takes the caller's size (docs/abi.md): writes exactly size bytes
 * at out, the first min(size, have) from src and zeros after them (a caller built against a
 * newer header than this library). */
void saga__copy_sized(void *out, size_t size, const void *src, size_t have);

/* Copies the len bytes of s for a log line or a dead letter's reason: at most out_len - 1
 * bytes (out_len >= 4), '?' for control bytes and NULs (s may come from the network),
 * ending in "..." when cut. */
void saga__printable(char *out, size_t out_len, const char *s, size_t len);

/* splitmix64 step, for seeded generators (retry jitter, test fault injection): fast, NOT
 * unpredictable — one output gives away every later one. Never use it for ids. */
uint64_t saga__splitmix64(uint64_t *state);
/* 64 bits from the OS (getrandom), falling back to time and address entropy: a seed for
 * saga__splitmix64, not a secret. */
uint64_t saga__os_random(void);
/* Fills buf with len bytes from the OS CSPRNG: getrandom(2), or /dev/urandom where the
 * system call does not exist. Never falls back to anything predictable: returns SAGA_OK or
 * SAGA_EIO (nothing cryptographically strong available; buf is then zeroed). */
int saga__os_random_bytes(void *buf, size_t len);

/* Buffered CSPRNG output, for ids an outsider must not guess (saga ids, trace ids): one
 * getrandom() per 256 bytes. The buffer is dropped after a fork (detected with
 * pthread_atfork, or getpid() where that is unavailable), so a child never hands out the
 * bytes its parent also hands out. Bytes are wiped from the buffer as they are taken. One
 * per node, used on its loop thread (no locking). */
typedef struct saga__csprng {
  uint8_t buf[256];
  size_t pos;   /* next unused byte; sizeof buf = empty */
  unsigned gen; /* fork generation when filled */
  long pid;     /* process that filled it, when forks are detected by pid */
} saga__csprng;
void saga__csprng_init(saga__csprng *r);
/* len bytes of CSPRNG output. SAGA_OK or SAGA_EIO (see saga__os_random_bytes). */
int saga__csprng_bytes(saga__csprng *r, void *out, size_t len);

/* SipHash-2-4 of data under a 128-bit key (src/util/siphash.c). */
uint64_t saga__siphash(const uint64_t key[2], const void *data, size_t len);

/* ---- codec (src/codec/codec.c): the only file that includes msgpack.h ----------------- */

/* Appends the msgpack map of d (str -> bin) to out. d may be NULL (empty map). */
int saga__data_encode(const saga_data *d, saga__buf *out);

/* Decodes a data map. len 0 gives an empty map. Enforces lim (NULL = defaults). */
int saga__data_decode(const void *buf, size_t len, const saga_limits *lim,
                      const saga_allocator *a, saga_data **out, char *err, size_t errlen);

/* Encodes into an existing buffer (appending), for the hot path. */
int saga__envelope_encode_buf(const saga_envelope *env, saga__buf *out);

/* ---- clocks and timers (src/util/clock.c) --------------------------------------------- */

typedef struct saga__timer saga__timer;
struct saga__timer {
  uint64_t deadline;
  void (*cb)(saga__timer *t);
  void *data;
  saga_clock *clock;
  saga__timer *prev, *next; /* in the clock's list of armed timers */
  int armed;
};

/* A real clock: wall-clock ms as of its start, moving with the monotonic clock (a step of
 * the system clock does not move it); timers on a uv_timer_t of loop. */
int saga__clock_real_new(saga_clock **out, uv_loop_t *loop, const saga_allocator *a);
/* The same, starting at wall_now instead of the system's wall clock (tests). */
int saga__clock_real_new_at(saga_clock **out, uv_loop_t *loop, const saga_allocator *a,
                            uint64_t wall_now);
/* Closes a real clock's uv handle and frees it once closed (manual: frees at once). */
void saga__clock_close(saga_clock *c);
int saga__clock_is_manual(const saga_clock *c);

void saga__timer_init(saga__timer *t, saga_clock *c, void (*cb)(saga__timer *), void *data);
/* Arms (or re-arms) t to fire at deadline (clock ms). A deadline in the past fires on the
 * next loop turn (real) or the next advance (manual), never synchronously here. */
void saga__timer_arm(saga__timer *t, uint64_t deadline);
void saga__timer_stop(saga__timer *t);

/* ---- transports (src/core/transport.c) ------------------------------------------- */

/* What the core plugs into saga_transport.saga__host. */
typedef struct saga__transport_host {
  int (*deliver)(void *ctx, const char *channel, const void *data, size_t len, uint64_t tag);
  void (*sent)(void *ctx, uint64_t token, int status);
  void (*closed)(void *ctx);
  void (*log)(void *ctx, saga_log_level level, const char *msg);
  int (*dead_letter)(void *ctx, const char *channel, const void *data, size_t len,
                     uint64_t tag, const char *reason);
  void *ctx;
} saga__transport_host;

#endif /* SAGA_INTERNAL_H */
