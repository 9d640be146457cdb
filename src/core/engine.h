/*
 * The orchestrator: the saga definitions a node runs and the state machine of their
 * instances. It decides a transition from an instance and an event, and asks only the store
 * (load, insert, save) and the journal (outbox rows, events, history) — never the node, its
 * queue or its transport. Every function runs inside a transaction its caller opened.
 * Not reentrant: one call at a time (the instance being processed is e->inst).
 */
#ifndef SAGA_SRC_CORE_ENGINE_H
#define SAGA_SRC_CORE_ENGINE_H

#include "journal.h"

/* Phases of a step's commands, as saga_phase numbers them: action, compensation, resolve. */
#define SAGA__PHASES 3

/* The per-step metrics of one (definition name, step name) pair, summed over every registered
 * version of the definition that has a step of that name. Counted when the transaction that
 * made the transition commits (the updates wait in the journal until then). */
typedef struct saga__step_stats {
  const char *def_name, *step_name; /* borrowed from the first definition with the pair */
  unsigned phases;                  /* bit p: some version's step sends commands of phase p */
  uint64_t attempts;      /* action commands sent, first attempts and retries */
  uint64_t retries;       /* of which attempt > 1 */
  uint64_t successes;     /* the action succeeded (the saga went on past the step) */
  uint64_t failures;      /* the action failed: failure reply, unsendable, pivot not applied */
  uint64_t timeouts;      /* an action attempt or a resolve got no reply in time */
  uint64_t comp_attempts; /* compensation commands sent */
  uint64_t compensations; /* compensations that succeeded */
  uint64_t comp_failures; /* compensation attempts that failed or timed out */
  uint64_t latency[SAGA__PHASES][SAGA_LATENCY_BUCKETS]; /* as saga_node_stats.step_latency */
  uint64_t latency_count[SAGA__PHASES], latency_sum_ms[SAGA__PHASES];
} saga__step_stats;

typedef struct saga__engine {
  saga__env *env;
  saga__journal *journal;
  const char *reply_to;  /* where replies to this node's commands go (the node's name) */
  uint64_t reply_key[2]; /* keys the tag of command ids (the store's reply_key) */
  saga__def *defs;
  size_t ndefs;
  uint32_t *def_slots;  /* hash of (name, version) -> index + 1 (see engine.c) */
  uint8_t *def_latest;  /* the slot stands for (name, highest version) */
  size_t def_cap;       /* slots, a power of two */
  uint64_t def_probes;  /* slots looked at by lookups, for tests */
  saga__step_stats *step_stats; /* one per (definition name, step name), registration order */
  size_t nstep_stats, step_stats_cap;
  uint32_t *ss_slots; /* hash of (definition name, step name) -> index + 1 */
  size_t ss_cap;      /* slots, a power of two (0: none yet) */
  saga__inst inst; /* the instance being processed */
  saga__buf cmd;   /* encoding of a command */
  saga__buf ids;   /* due or recovering instances */
  saga__buf merged; /* a reply's data merged into the saga's */
} saga__engine;

void saga__engine_init(saga__engine *e, saga__env *env, saga__journal *j, const char *reply_to);
void saga__engine_free(saga__engine *e);
/* Validates and copies def. SAGA_EEXIST when that name and version are registered. */
int saga__engine_register(saga__engine *e, const saga_definition *def);
/* Applies the per-step metric updates of the transaction that just committed (recorded in
 * the journal by the transitions), and forgets them. */
void saga__engine_stats_commit(saga__engine *e);
/* The definition name at version (0 = the highest registered), or NULL. */
const saga__def *saga__engine_find(const saga__engine *e, const char *name, uint32_t version);

/* Starts a saga of def (input: an encoded data map; idem_key NULL = none) in the trace of
 * traceparent (NULL, or a traceparent checked by saga_traceparent_check(): the saga's span is
 * its child). id_out gets its id (the existing one, with *existed = 1, when idem_key was used
 * before). */
int saga__engine_start(saga__engine *e, const saga__def *def, const void *input,
                       size_t input_len, const char *idem_key, const char *traceparent,
                       char id_out[40], int *existed);
/* A reply to a command of this node. SAGA_ENODEF: its saga's definition is not registered
 * (keep the message). */
int saga__engine_reply(saga__engine *e, const saga_envelope *reply);
/* Timers: handles at most max instances due at now; *processed is how many were due. Stops
 * at the first failure (see the next three for running each one apart). */
int saga__engine_due(saga__engine *e, uint64_t now, size_t max, size_t *processed);
/* Lists at most max instances due at now (earliest first); then saga__engine_due_id(e, k)
 * for k < *count, each handled by saga__engine_due_one (which keeps the list). */
int saga__engine_due_list(saga__engine *e, uint64_t now, size_t max, size_t *count);
const char *saga__engine_due_id(const saga__engine *e, size_t k);
int saga__engine_due_one(saga__engine *e, const char *saga_id, uint64_t now);
int saga__engine_cancel(saga__engine *e, const char *saga_id);
/* saga_retry_failed: compensates a FAILED saga again. */
int saga__engine_retry(saga__engine *e, const char *saga_id);
/* An operator's request (a row of saga_operator_request): records SAGA_EV_OPERATOR_REQUEST
 * with note, then cancels (cancel = 1) or retries the saga, in the current transaction.
 * SAGA_ESTATE (with a message saying why) when the request does not apply. */
int saga__engine_operator(saga__engine *e, const char *saga_id, int cancel, const char *note);
/* Recovery at start: unparks instances whose definition is now registered, parks and counts
 * in *missing those whose definition is not. */
int saga__engine_unpark(saga__engine *e, int *missing);
/* The transport refused for good (code) to send cmd, a command this node wrote: if its saga
 * waits for exactly that attempt, the step fails with reason. */
int saga__engine_undeliverable(saga__engine *e, const saga_envelope *cmd, int code,
                               const char *reason);

#endif /* SAGA_SRC_CORE_ENGINE_H */
