/*
 * What every part of the core shares: the environment a part runs in (allocator, clock, store,
 * limits, counters, log, error message, randomness) and the saga definitions. A part gets a
 * pointer to the environment, never to the node: engine.c, participant.c, journal.c and
 * retention.c know nothing of queues, transports or the node's lifecycle.
 */
#ifndef SAGA_SRC_CORE_CORE_H
#define SAGA_SRC_CORE_CORE_H

#include "../internal.h"
#include "../store/store.h"

/* Reserved channel for steps run by local functions: delivered to the node itself. */
#define SAGA__LOCAL_CHANNEL "saga.local"
/* Delivery tags of loopback deliveries carry this bit; the rest is the outbox id. */
#define SAGA__LOOPBACK_TAG (UINT64_C(1) << 63)

/* ---- the environment -------------------------------------------------------------------- */

typedef struct saga__env {
  const saga_allocator *alloc;
  saga_clock *clock;
  saga__store *store;
  saga_limits limits;
  saga_node_stats stats;
  saga_log_fn log;
  void *log_arg;
  void (*hook)(void *, const char *); /* cfg.test_hook: named points for fault injection */
  void *hook_arg;
  uint64_t (*random)(void *); /* cfg.random: tests only (ids and jitter from it) */
  void *random_arg;
  uint64_t rng_state; /* splitmix64 for retry jitter only: fast, guessable */
  saga__csprng ids;   /* OS CSPRNG output for saga and trace ids */
  char errmsg[512];   /* the last failure, for saga_node_errmsg() */
  size_t dead_body_max; /* bytes of a dead letter's message kept (the rest is cut) */
  int wall_ns;          /* spans take the wall clock (the node's clock is its own real one) */
} saga__env;

/* Sets up e (no store, clock or callbacks yet). */
void saga__env_init(saga__env *e, const saga_allocator *a);

/* Room kept in every message for the envelope around the saga data (ids, names, headers,
 * an error text): saga data is at most max_message_bytes minus this, so that every command
 * of a saga — its compensations too — fits in a message whatever the data grew to. */
#define SAGA__ENVELOPE_RESERVE 4096
/* The most bytes of encoded saga data a saga may carry under l. */
size_t saga__data_limit(const saga_limits *l);
/* Checks saga data that is being made (an input, a reply, a merge) against the limits:
 * SAGA_OK, or SAGA_ETOOBIG with errmsg "<what> has N entries / N bytes; the limit is ...". */
int saga__data_fits(saga__env *e, const char *what, size_t entries, size_t bytes);

/* Calls the test hook, if any, at a named point. */
#define SAGA__HOOK(e, point) \
  do { \
    if ((e)->hook != NULL) (e)->hook((e)->hook_arg, (point)); \
  } while (0)

void saga__log(saga__env *e, saga_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Sets e->errmsg and returns code. */
int saga__fail(saga__env *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Sets e->errmsg to "what: <the store's message> (<code's text>)" and returns code. */
int saga__store_fail(saga__env *e, int code, const char *what);
uint64_t saga__now(saga__env *e);
/* Releases the semantic locks (src/core/lock.c) that step `step` of saga_id took (step < 0:
 * every lock of the saga) in this node's database, in the caller's transaction; *released is
 * how many (may be NULL). A store without locks holds none: SAGA_OK. */
int saga__locks_release(saga__env *e, const char *saga_id, int64_t step, uint64_t *released);
/* A fast pseudo-random number for retry jitter. Not for ids: guessable. */
uint64_t saga__rand(saga__env *e);
/* len unpredictable bytes for ids (saga ids, trace ids): from the OS CSPRNG, or from
 * cfg.random when a test set it. SAGA_OK, or SAGA_EIO with errmsg set. */
int saga__id_bytes(saga__env *e, void *out, size_t len);
/* Records one step latency (ms) in the histogram of e->stats. */
void saga__latency(saga__env *e, uint64_t ms);
/* The bucket of the latency histograms that counts ms (see saga_latency_bound_ms). */
int saga__latency_bucket(uint64_t ms);
/* The time of spans, in unix ns: the wall clock when the node runs on its own real clock
 * (wall_ns set), else the node's clock in ms x 10^6 (a manual clock: deterministic). */
uint64_t saga__now_ns(saga__env *e);

/* ---- trace context (trace.c) ------------------------------------------------------------ */

/* A traceparent's string with its NUL. */
#define SAGA__TRACEPARENT_SIZE (SAGA_TRACEPARENT_LEN + 1)

typedef struct saga__trace {
  char trace_id[33];
  char span_id[17];
  uint8_t flags;
} saga__trace;

/* Splits a traceparent checked by saga_traceparent_check(). SAGA_OK or SAGA_EINVAL. */
int saga__trace_parse(const char *tp, saga__trace *out);
/* Whether id is a valid trace id: 32 lowercase hex digits, not all zero. */
int saga__trace_id_ok(const char *id);
/* "00-<trace_id>-<span_id>-<flags>". */
void saga__trace_format(char out[SAGA__TRACEPARENT_SIZE], const char *trace_id,
                        const char *span_id, uint8_t flags);
/* A new span id (16 hex digits, never all zero) from the ids' CSPRNG (or cfg.random). */
int saga__span_id(saga__env *e, char out[17]);

/* ---- definitions (definition.c) --------------------------------------------------------- */

typedef struct saga__step {
  char *name, *channel, *action, *compensation;
  saga_step_kind kind;
  saga_retry retry;
  saga_retry comp_retry; /* resolved: the compensation's own policy or the default */
  uint32_t timeout_ms;
  saga_handler local_action, local_compensation;
  void *local_arg;
  uint32_t stats; /* its (definition name, step name) slot of per-step metrics (engine.h) */
} saga__step;

typedef struct saga__def {
  char *name;
  uint32_t version;
  saga__step *steps;
  size_t nsteps;
  uint32_t deadline_ms;
  int pivot; /* index of the pivot, or of the first retriable step, or nsteps: the first step
                from which the saga can no longer be cancelled */
} saga__def;

/* Validates and deep-copies def into out (fields allocated with a). */
int saga__def_copy(saga__def *out, const saga_definition *def, const saga_allocator *a,
                   char *err, size_t errlen);
void saga__def_free(saga__def *d, const saga_allocator *a);
/* The delay before attempt `attempt + 1` of a step. r01 is a random number in [0,1). */
uint64_t saga__retry_delay(const saga_retry *r, uint32_t attempt, double r01);
uint32_t saga__retry_max(const saga_retry *r);

#endif /* SAGA_SRC_CORE_CORE_H */
