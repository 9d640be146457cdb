/*
 * The storage interface of the core, in the terms of the domain: transactions, saga instances,
 * history, the outbox, the participant's inbox and step records, dead letters and retention.
 * The core reaches its database only through this table of functions; the SQLite
 * implementation (src/store/sqlite/) is the one backend today, and the only code of the
 * library that calls sqlite3_*. A second backend is one more folder that fills this table.
 *
 * Conventions: every function returns SAGA_OK or a SAGA_E* code; after a failure,
 * errmsg() tells what the database said. Text arguments are NUL-terminated and only read
 * during the call. A "visitor" is called once per row while the row is being read: it must
 * not call the store. One store is used by one thread (the node's loop).
 */
#ifndef SAGA_SRC_STORE_STORE_H
#define SAGA_SRC_STORE_STORE_H

#include <string.h>

#include "../internal.h"

struct saga__def; /* the core's definition: the store never looks inside */

/* Values of saga__inst.wait. */
enum { SAGA__WAIT_NONE = 0, SAGA__WAIT_REPLY = 1, SAGA__WAIT_BACKOFF = 2 };

/* A saga instance as stored (one row of saga_instance in the SQLite backend). */
typedef struct saga__inst {
  char id[40];
  const struct saga__def *def; /* set by the engine after a load; ignored by the store */
  char def_name[160];
  uint32_t def_version;
  int state, phase, step, wait, flags, parked;
  int saved_state, saved_parked; /* as stored: lets a backend skip unchanged columns */
  uint32_t attempt;
  int64_t hseq; /* last history sequence number */
  saga__buf data; /* encoded data map */
  char error[520];
  char trace_span[20]; /* the saga's span id (16 hex digits) */
  uint64_t created_ms, updated_ms;
  uint64_t step_deadline, saga_deadline; /* 0 = none */
  int exists;
  /* Trace context (migration 7). Written when the instance is inserted: */
  char trace_parent[56]; /* the caller's traceparent, "" for none (trace id = the saga id) */
  uint64_t started_ns;   /* start of the saga's span, unix ns (0: use created_ms) */
  /* Written by every save: the span of the attempt whose command is in flight. */
  char attempt_span[20]; /* 16 hex digits; "" when no attempt is open */
  uint64_t attempt_ns;   /* its start, unix ns */
} saga__inst;

static inline void saga__inst_init(saga__inst *i, const saga_allocator *a) {
  memset(i, 0, sizeof *i);
  saga__buf_init(&i->data, a);
}
static inline void saga__inst_free(saga__inst *i) { saga__buf_free(&i->data); }
/* The earlier of the two deadlines (0 = none): when the instance is next due. */
static inline uint64_t saga__inst_next_deadline(const saga__inst *i) {
  uint64_t a = i->step_deadline, b = i->saga_deadline;
  if (a == 0) return b;
  if (b == 0) return a;
  return a < b ? a : b;
}

/* One history row; its detail is text + detail_off (NUL-terminated) in a batch. */
typedef struct saga__hist_rec {
  char saga_id[40];
  int64_t seq;
  uint64_t at_ms;
  int type, step;
  uint32_t attempt;
  size_t detail_off;
} saga__hist_rec;

/* A retention cursor over a table in key order: the last key passed ("" and -1 = start). */
typedef struct saga__sweep {
  saga__buf key;
  int64_t key_step;
} saga__sweep;

typedef enum saga__sweep_table { SAGA__SWEEP_INBOX, SAGA__SWEEP_STEPS } saga__sweep_table;

/* Savepoints inside a transaction: one around a work item, one around a handler, one around
 * an operator's repair (which may run handlers inside it). */
typedef enum saga__savepoint { SAGA__SP_ITEM, SAGA__SP_HANDLER, SAGA__SP_OPERATOR } saga__savepoint;

/* A step of a registered definition as recorded for tools (saga_definition_step). */
typedef struct saga__def_step_rec {
  const char *name, *channel, *action, *compensation; /* "" when none */
  int kind, local, local_compensation;
  saga_retry retry, comp_retry;
  uint32_t timeout_ms;
} saga__def_step_rec;

/* A pending operator request (saga_operator_request), as read by opreq_get. Text longer than
 * a field is cut (and then refused by the node: no valid target is that long). */
typedef struct saga__opreq {
  int64_t id;
  int state; /* 0 pending, 1 done, 2 refused */
  char action[16];
  char target[64];
  char by[128];
} saga__opreq;

/* Called for each outbox row read by outbox_after / outbox_stale. */
typedef void (*saga__outbox_fn)(void *arg, uint64_t id, const char *channel, const void *body,
                                size_t len);
/* Called for each running or compensating saga by inst_inflight. */
typedef void (*saga__inflight_fn)(void *arg, const char *id, const char *def_name,
                                  uint32_t def_version, int parked);

typedef struct saga__store saga__store;

typedef struct saga__store_methods {
  const char *name;
  /* ---- transactions ---- */
  /* begin: a write transaction (exclusive among the processes sharing the database). */
  int (*begin)(saga__store *s);
  int (*commit)(saga__store *s);
  int (*rollback)(saga__store *s);
  /* Nonzero while a transaction is open; 0 after the database ended one on its own (some
   * errors roll back the whole transaction). */
  int (*in_tx)(saga__store *s);
  int (*savepoint)(saga__store *s, saga__savepoint sp);
  int (*release)(saga__store *s, saga__savepoint sp);
  int (*rollback_to)(saga__store *s, saga__savepoint sp); /* the savepoint stays open */
  /* A counter of rows written (inserted, updated, deleted) on this store, undone or not:
   * two readings tell whether anything was written in between. */
  int64_t (*writes)(saga__store *s);

  /* ---- saga instances ---- */
  /* Fills i (all but def) from the stored row. SAGA_ENOTFOUND when there is none. */
  int (*inst_load)(saga__store *s, const char *id, saga__inst *i);
  /* The id of the saga of definition def_name started with idem_key into id_out.
   * SAGA_ENOTFOUND when none. Keys are scoped per definition name (any version). */
  int (*inst_find_key)(saga__store *s, const char *def_name, const char *idem_key,
                       char id_out[40]);
  /* Inserts a new instance, with idem_key (NULL = none) unique among the instances of its
   * definition name (SAGA_EEXIST otherwise). */
  int (*inst_insert)(saga__store *s, const saga__inst *i, const char *idem_key);
  /* Saves every mutable field of i. A parked instance is never due. */
  int (*inst_save)(saga__store *s, const saga__inst *i);
  /* Appends to ids (40 bytes each) at most max instances due at or before now (earliest
   * first); *count is how many. */
  int (*inst_due)(saga__store *s, uint64_t now, size_t max, saga__buf *ids, size_t *count);
  /* The earliest deadline of an instance that is not parked. SAGA_ENOTFOUND when none. */
  int (*inst_next_due)(saga__store *s, uint64_t *at);
  /* Visits every RUNNING or COMPENSATING instance. */
  int (*inst_inflight)(saga__store *s, saga__inflight_fn fn, void *arg);
  /* Makes a parked instance due again at its deadlines. */
  int (*inst_unpark)(saga__store *s, const char *id);
  /* counts[state] for each saga_state 1..5; counts[0] = 0. */
  int (*inst_count)(saga__store *s, int64_t counts[6]);
  /* Visits each (definition name, state) that has instances: fn(arg, def_name, state,
   * count). A full scan of the instances (for metrics). May be NULL in a backend without
   * it. */
  int (*inst_count_by_def)(saga__store *s,
                           void (*fn)(void *arg, const char *def_name, int state,
                                      int64_t count),
                           void *arg);

  /* ---- history ---- */
  /* Appends count rows (text holds their details). */
  int (*hist_insert)(saga__store *s, const saga__hist_rec *rows, size_t count,
                     const char *text);

  /* The event type and detail (NUL-terminated, into detail) of history row (saga_id, seq).
   * SAGA_ENOTFOUND when there is none. */
  int (*hist_get)(saga__store *s, const char *saga_id, int64_t seq, int *type,
                  saga__buf *detail);

  /* ---- outbox ---- */
  /* The largest outbox id ever used (also of rows deleted since): new ids go above it. */
  int (*outbox_max)(saga__store *s, uint64_t *max);
  /* Records id as used (never lowers the mark), in the current transaction. */
  int (*outbox_mark)(saga__store *s, uint64_t id);
  int (*outbox_insert)(saga__store *s, uint64_t id, const char *channel, const char *saga_id,
                       const void *body, size_t len, uint64_t now);
  /* Deletes the rows with ids in [lo, hi]; *deleted is how many there were. */
  int (*outbox_delete)(saga__store *s, uint64_t lo, uint64_t hi, uint64_t *deleted);
  /* Visits up to max rows with id > after, in id order; *rows is how many. */
  int (*outbox_after)(saga__store *s, uint64_t after, size_t max, saga__outbox_fn fn,
                      void *arg, size_t *rows);
  /* Visits up to max rows with after < id <= upto created at or before `created`, in id
   * order; *rows is how many. */
  int (*outbox_stale)(saga__store *s, uint64_t after, uint64_t upto, uint64_t created,
                      size_t max, saga__outbox_fn fn, void *arg, size_t *rows);
  /* Copies one row: channel (NUL-terminated) and body. SAGA_ENOTFOUND when gone. */
  int (*outbox_get)(saga__store *s, uint64_t id, saga__buf *channel, saga__buf *body);
  int (*outbox_count)(saga__store *s, int64_t *count);
  /* Visits each channel with outbox rows: fn(arg, channel, count, oldest created_ms). */
  int (*outbox_channels)(saga__store *s,
                         void (*fn)(void *arg, const char *channel, int64_t count,
                                    uint64_t oldest),
                         void *arg);

  /* ---- participant: inbox and step records ---- */
  /* The recorded reply to message msg_id and where it went: reply_to gets the channel
   * (NUL-terminated), reply the bytes. SAGA_ENOTFOUND when the message is new. */
  int (*inbox_get)(saga__store *s, const char *msg_id, saga__buf *reply_to, saga__buf *reply);
  int (*inbox_insert)(saga__store *s, const char *msg_id, const char *saga_id, uint64_t now,
                      const char *reply_to, const void *reply, size_t len);
  /* The step record of (saga_id, step): *state 0 when there is none; reply gets the
   * recorded reply data. */
  int (*pstep_get)(saga__store *s, const char *saga_id, uint32_t step, int *state,
                   uint32_t *attempt, saga__buf *reply);
  /* Writes the step record (reply NULL = none). */
  int (*pstep_put)(saga__store *s, const char *saga_id, uint32_t step, int state,
                   uint32_t attempt, const void *reply, size_t len, uint64_t now);

  /* ---- semantic locks (saga_lock; may be NULL in a backend without them) ---- */
  /* The saga holding (type, id) into holder (40 bytes) and the step that took it.
   * SAGA_ENOTFOUND when nobody holds it. */
  int (*lock_get)(saga__store *s, const char *type, const char *id, char holder[40],
                  uint32_t *step);
  /* Records (type, id) as held by saga_id's step; SAGA_EEXIST when someone holds it. */
  int (*lock_put)(saga__store *s, const char *type, const char *id, const char *saga_id,
                  uint32_t step, uint64_t now);
  /* Deletes (type, id) if saga_id holds it; *deleted is 1 when it did. */
  int (*lock_delete)(saga__store *s, const char *type, const char *id, const char *saga_id,
                     int *deleted);
  /* Deletes the locks saga_id holds: those its step took (step >= 0), or all (step < 0);
   * *deleted is how many. */
  int (*lock_release)(saga__store *s, const char *saga_id, int64_t step, uint64_t *deleted);

  /* ---- replies parked until their definition is registered ---- */
  /* Keeps a reply for saga_id; a second one for the same saga (a redelivery of the same
   * answer) is ignored. */
  int (*parked_insert)(saga__store *s, const char *saga_id, uint64_t now, const void *body,
                       size_t len);
  /* Visits up to max parked replies with id > after, in id order; *rows is how many. */
  int (*parked_after)(saga__store *s, uint64_t after, size_t max, saga__outbox_fn fn,
                      void *arg, size_t *rows);
  int (*parked_delete)(saga__store *s, uint64_t id);

  /* ---- dead letters ---- */
  /* Writes a dead letter, then deletes the oldest beyond the newest keep (0 = no limit):
   * *dropped is how many went. */
  int (*dead_insert)(saga__store *s, uint64_t now, const char *channel, const char *msg_id,
                     const char *reason, const void *body, size_t len, uint64_t keep,
                     uint64_t *dropped);
  /* Deletes at most batch dead letters written before cutoff, then at most batch beyond the
   * newest keep (0 = no count limit), oldest first; *deleted grows by how many, *more is set
   * when a batch was filled. */
  int (*dead_purge)(saga__store *s, uint64_t cutoff, uint64_t keep, size_t batch,
                    uint64_t *deleted, int *more);

  /* The dead letter id: channel and reason (NUL-terminated) and the kept body.
   * SAGA_ENOTFOUND when there is none. */
  int (*dead_get)(saga__store *s, int64_t id, saga__buf *channel, saga__buf *reason,
                  saga__buf *body);
  /* Deletes dead letter id (id < 0: every one); *deleted is how many went. */
  int (*dead_delete)(saga__store *s, int64_t id, uint64_t *deleted);

  /* ---- definitions and operator requests (for tools; may be NULL in a backend) ---- */
  /* Records a registered definition, replacing the steps recorded for its name and version,
   * in the current transaction. */
  int (*def_put)(saga__store *s, const char *name, uint32_t version, uint32_t deadline_ms,
                 const saga__def_step_rec *steps, size_t nsteps, uint64_t now);
  /* Appends to ids at most max pending request ids, oldest first; *count is how many. */
  int (*opreq_pending)(saga__store *s, size_t max, int64_t *ids, size_t *count);
  /* Reads request id. SAGA_ENOTFOUND when there is none. */
  int (*opreq_get)(saga__store *s, int64_t id, saga__opreq *out);
  /* Sets request id's state (1 done, 2 refused), result and done time, in the current
   * transaction. */
  int (*opreq_finish)(saga__store *s, int64_t id, int state, const char *result, uint64_t now);

  /* ---- retention ---- */
  /* Appends to ids (NUL-separated) at most max finished sagas last updated before cutoff,
   * oldest first; *count is how many. */
  int (*finished_before)(saga__store *s, uint64_t cutoff, size_t max, saga__buf *ids,
                         size_t *count);
  /* Same for the finished sagas beyond the newest `keep`, newest first. */
  int (*finished_beyond)(saga__store *s, uint64_t keep, size_t max, saga__buf *ids,
                         size_t *count);
  /* Deletes a finished saga and its history; *deleted 0 when it was already gone. */
  int (*purge_saga)(saga__store *s, const char *id, int *deleted);
  /* Deletes the records older than cutoff among the next `batch` keys of table after the
   * cursor c, and moves c (back to the start after the last key; *more set when a full batch
   * was walked). *deleted grows by the rows deleted. */
  int (*sweep)(saga__store *s, saga__sweep_table table, saga__sweep *c, size_t batch,
               uint64_t cutoff, uint64_t *deleted, int *more);

  /* The step-record purge mark: every step record retention deleted was last written before
   * *ms (0 when none was ever deleted). purge_mark_raise(ms) raises it to ms (never lowers),
   * in the current transaction. */
  int (*purge_mark)(saga__store *s, uint64_t *ms);
  int (*purge_mark_raise)(saga__store *s, uint64_t ms);

  /* ---- the database ---- */
  /* The database's key for command tags: stored from fresh on first use, then read. */
  int (*reply_key)(saga__store *s, const uint64_t fresh[2], uint64_t key[2]);
  /* What the database said about the last failure. */
  const char *(*errmsg)(saga__store *s);
  /* The handle a handler gets to write its business data in the same transaction (sqlite3 *
   * for the SQLite backend). */
  void *(*native)(saga__store *s);
  /* Adds the backend's own counters (checkpoints) to out. */
  void (*stats)(saga__store *s, saga_node_stats *out);
  /* Stops background work before a close: 0 when none runs, else 1, and done(arg) is called
   * on the loop once it finished. */
  int (*stop)(saga__store *s, void (*done)(void *arg), void *arg);
  void (*close)(saga__store *s);

  /* ---- domain events (saga/domain.h; may be NULL in a backend without them) ---- */
  /* The database's event stream id: fresh (nonzero) is stored on first use, then the stored
   * one is read. */
  int (*event_stream)(saga__store *s, uint64_t fresh, uint64_t *stream);
  /* Bumps and returns the sequence number of (channel, key): 1 for its first event. */
  int (*event_seq_next)(saga__store *s, const char *channel, const char *key, uint64_t *seq);
  /* The last sequence number handled of (stream, channel, key): 0 when none. */
  int (*event_cursor_get)(saga__store *s, const char *stream, const char *channel,
                          const char *key, uint64_t *seq);
  /* Sets it (inserting the row when there is none). */
  int (*event_cursor_put)(saga__store *s, const char *stream, const char *channel,
                          const char *key, uint64_t seq, uint64_t now);
} saga__store_methods;

struct saga__store {
  const saga__store_methods *m;
};

/* Opening the SQLite backend (src/store/sqlite/). */
typedef struct saga__sqlite_config {
  const char *path, *vfs;
  /* 0: path must hold a libsaga database (a missing, empty or foreign file is refused with
   * SAGA_ENOTFOUND, untouched); 1: create it then. In-memory and temporary databases
   * (":memory:", "") are always new. */
  int create;
  int check;                /* saga_db_check: verify the file at open (SAGA_ECORRUPT) */
  int synchronous;          /* saga_sync_mode */
  uint32_t busy_timeout_ms;
  int checkpoint;           /* saga_checkpoint_mode */
  uint32_t checkpoint_pages;
  uv_loop_t *loop;          /* background checkpoints run on its thread pool */
  const saga_allocator *alloc;
  saga_log_fn log;
  void *log_arg;
} saga__sqlite_config;

int saga__sqlite_store_open(saga__store **out, const saga__sqlite_config *cfg, char *err,
                            size_t errlen);

#endif /* SAGA_SRC_STORE_STORE_H */
