/*
 * The core's private declarations: the node structure, shared by node.c (lifecycle, batching,
 * relay, the transport host), tx.c (what a transaction records: events, history, outbox, dead
 * letters; small helpers), engine.c (orchestrator state machine), participant.c (command
 * handling), retention.c, checkpoint.c and store.c (SQLite). Calls run one way: node.c calls
 * engine, participant, retention and checkpoint; those call tx.c and the store; nothing calls
 * back into node.c (a closing checkpoint reports through n->close_step).
 */
#ifndef SAGA_NODE_INTERNAL_H
#define SAGA_NODE_INTERNAL_H

#include <sqlite3.h>

#include "../internal.h"

/* Reserved channel for steps run by local functions: delivered to the node itself. */
#define SAGA__LOCAL_CHANNEL "saga.local"
/* Delivery tags of loopback deliveries carry this bit; the rest is the outbox id. */
#define SAGA__LOOPBACK_TAG (UINT64_C(1) << 63)

/* ---- store ------------------------------------------------------------------------------ */

typedef enum saga__stmt_id {
  ST_BEGIN,
  ST_COMMIT,
  ST_ROLLBACK,
  ST_SP_ITEM,
  ST_SP_ITEM_RELEASE,
  ST_SP_ITEM_ROLLBACK,
  ST_SP_HANDLER,
  ST_SP_HANDLER_RELEASE,
  ST_SP_HANDLER_ROLLBACK,
  ST_INST_INSERT,
  ST_INST_GET,
  ST_INST_BY_KEY,
  ST_INST_UPDATE,
  ST_INST_UPDATE_STEP,
  ST_INST_DUE,
  ST_INST_MIN_DEADLINE,
  ST_INST_PARK,
  ST_INST_PARKED,
  ST_INST_UNPARK,
  ST_INST_INFLIGHT,
  ST_INST_BY_STATE,
  ST_HIST_INSERT,
  ST_HIST_INSERT2,
  ST_HIST_INSERT8,
  ST_OUTBOX_INSERT,
  ST_OUTBOX_MAX,
  ST_OUTBOX_MARK,
  ST_OUTBOX_DELETE,
  ST_OUTBOX_AFTER,
  ST_OUTBOX_STALE,
  ST_OUTBOX_COUNT,
  ST_INBOX_GET,
  ST_INBOX_INSERT,
  ST_PSTEP_GET,
  ST_PSTEP_PUT,
  ST_DEAD_INSERT,
  ST_PURGE_AGED,
  ST_PURGE_EXCESS,
  ST_PURGE_HISTORY,
  ST_PURGE_INSTANCE,
  ST_PURGE_INBOX_EDGE,
  ST_PURGE_INBOX_RANGE,
  ST_PURGE_INBOX_TAIL,
  ST_PURGE_PSTEP_EDGE,
  ST_PURGE_PSTEP_RANGE,
  ST_PURGE_PSTEP_TAIL,
  ST__COUNT
} saga__stmt_id;

typedef struct saga__store {
  sqlite3 *db;
  sqlite3_stmt *st[ST__COUNT];
} saga__store;

int saga__store_open(saga__store *s, const char *path, const char *vfs, int sync,
                     uint32_t busy_ms, char *err, size_t errlen);
void saga__store_close(saga__store *s);
/* The database's key for command tags: created from fresh on first use, then read. */
int saga__store_reply_key(saga__store *s, const uint64_t fresh[2], uint64_t key[2], char *err,
                          size_t errlen);
/* Maps a SQLite result code to a SAGA_E* code. */
int saga__store_err(int sqlite_rc);
/* Runs a prepared statement that returns no rows, then resets it. Returns SAGA_OK or the
 * mapped error (detail via sqlite3_errmsg). */
int saga__store_exec(saga__store *s, saga__stmt_id id);
/* Gets a statement reset and with bindings cleared. */
sqlite3_stmt *saga__store_stmt(saga__store *s, saga__stmt_id id);

/* ---- definitions ------------------------------------------------------------------------ */

typedef struct saga__step {
  char *name, *channel, *action, *compensation;
  saga_step_kind kind;
  saga_retry retry;
  saga_retry comp_retry; /* resolved: the compensation's own policy or the default */
  uint32_t timeout_ms;
  saga_handler local_action, local_compensation;
  void *local_arg;
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

/* ---- participants ----------------------------------------------------------------------- */

typedef struct saga__handler {
  char *channel;
  char *command;
  saga_handler fn;
  void *arg;
} saga__handler;

/* ---- work queue ------------------------------------------------------------------------- */

typedef enum saga__work_type {
  W_DELIVERY = 1,
  W_START,
  W_CANCEL,
  W_RETRY,
  W_SENT,
  W_DEAD, /* a message the transport gave up on: keep it, then acknowledge it */
  W_UNSENDABLE /* an outbox row send() refused for good: dead-letter it, fail its step */
} saga__work_type;

/* One queued item. Variable-length bytes live in the queue's arena, referenced by offset. */
typedef struct saga__work {
  saga__work_type type;
  int status;          /* result after processing */
  int ack;             /* delivery: acknowledge after commit */
  int existed;         /* start: idempotency key matched */
  uint64_t tag;        /* delivery tag / sent token / unsendable outbox id */
  int code;            /* unsendable: the permanent code send() returned */
  size_t off1, len1;   /* delivery: channel (NUL-terminated); start: def name; cancel: id */
  size_t off2, len2;   /* delivery: bytes; start: encoded input */
  size_t off3, len3;   /* start: idempotency key (len3 = SIZE_MAX when none) */
  char saga_id[40];    /* start: the saga id (generated or existing) */
  void *cb;
  void *cb_arg;
  size_t events_before; /* events buffered before this item (rolled back with it) */
} saga__work;

typedef struct saga__queue {
  saga__work *items;
  size_t n, cap;
  saga__buf arena;
} saga__queue;

/* ---- events buffered until commit ------------------------------------------------------- */

typedef struct saga__event_rec {
  saga_event_type type;
  uint64_t remote_off;          /* remote event: offset+1 of its bytes in remote_events */
  char saga_id[40];
  const saga__def *def;
  int step;
  uint32_t attempt;
  saga_state state;
  size_t detail_off; /* in node->event_text */
  uint64_t at_ms;
} saga__event_rec;

/* A history row, buffered until the transaction's end (written in multi-row INSERTs). */
typedef struct saga__hist_rec {
  char saga_id[40];
  int64_t seq;
  uint64_t at_ms;
  int type, step;
  uint32_t attempt;
  size_t detail_off; /* in node->hist_text, NUL-terminated */
} saga__hist_rec;

/* ---- a loaded saga instance ------------------------------------------------------------- */

typedef struct saga__inst {
  char id[40];
  const saga__def *def; /* NULL when its version is not registered */
  char def_name[160];
  uint32_t def_version;
  int state, phase, step, wait, flags, parked;
  int saved_state, saved_parked; /* as in the database (choose the cheaper UPDATE) */
  uint32_t attempt;
  int64_t hseq;
  saga__buf data; /* encoded data map */
  char error[520];
  char trace_span[20];
  uint64_t created_ms, updated_ms;
  uint64_t step_deadline, saga_deadline; /* 0 = none */
  int exists;
} saga__inst;

/* ---- retention ------------------------------------------------------------------------- */

/* A cursor walking a table in key order: the last key passed ("" and -1 = from the start). */
typedef struct saga__sweep {
  saga__buf key;
  int64_t key_step;
} saga__sweep;

/* ---- the node --------------------------------------------------------------------------- */

typedef struct saga__post {
  void (*fn)(saga_node *node, void *arg);
  void *arg;
  struct saga__post *next;
} saga__post;

struct saga_node {
  saga_allocator alloc_copy;
  const saga_allocator *alloc;
  uv_loop_t *loop;
  char *name;
  saga_log_fn log;
  void *log_arg;
  uint64_t (*random)(void *); /* cfg.random: tests only (ids and jitter from it) */
  void *random_arg;
  uint64_t rng_state;  /* splitmix64 for retry jitter only: fast, guessable */
  saga__csprng ids;    /* OS CSPRNG output for saga and trace ids */
  /* Counts one pending close down and finishes closing at zero (set by node.c; called by a
   * part that made the close wait for it, such as a background checkpoint). */
  void (*close_step)(saga_node *n);
  uint64_t reply_key[2]; /* SipHash key tagging command ids (saga_meta) */
  saga_event_cb on_event;
  void *event_arg;
  uint32_t resend_ms, batch_max;
  saga_limits limits;

  saga__store store;
  saga_clock *clock;
  int own_clock;
  saga_transport *transport;
  saga_transport_methods tm; /* copied field by field by version */
  saga__transport_host host;
  int transport_open, transport_closed;

  saga__def *defs;
  size_t ndefs;
  saga__handler *handlers;
  size_t nhandlers;

  int started, closing, in_flush;
  uv_idle_t idle;
  int idle_active;
  uv_async_t async;
  uv_mutex_t post_mu;
  saga__post *posts;
  int pending_closes;
  void (*close_cb)(void *);
  void *close_arg;

  saga__timer deadline_timer; /* earliest saga deadline */
  saga__timer resend_timer;
  saga__timer retry_timer;    /* flush again after a failed commit */
  int timers_due;
  uint64_t relay_hwm; /* highest outbox id handed to the transport */
  uint64_t resend_cursor; /* resends resume after this id (0 = from the oldest) */
  uint64_t outbox_next;  /* next outbox id (see saga__node_outbox) */
  int outbox_next_valid; /* outbox_next read from the database in this transaction */
  int outbox_used;       /* ids taken in this transaction (saga_meta to update) */

  saga__queue queues[2];
  int cur; /* queue receiving new work */

  saga__event_rec *events;
  size_t nevents, events_cap;
  saga__buf event_text;

  saga__inst inst; /* scratch for the instance being processed */
  saga__buf scratch, scratch2, reply_buf, input_buf;
  saga__buf sent_ids;         /* confirmed outbox ids of a transaction (uint64_t each) */
  int64_t undone_changes;     /* rows a handler wrote and rolled back, in the current item */
  saga__buf hist, hist_text;  /* history rows of the transaction (saga__hist_rec each) */
  /* checkpoint.c */
  uint32_t ckpt_pages;
  uint32_t ckpt_last_pages;   /* WAL size when the last background pass was started */
  int ckpt_sync;
  char *ckpt_path, *ckpt_vfs; /* NULL path: SQLite's inline auto-checkpoint */
  sqlite3 *ckpt_db;           /* the worker's connection, opened on first use */
  uv_work_t ckpt_req;
  int ckpt_running, ckpt_close_wait, ckpt_open_failed;
  int ckpt_rc;                /* SQLite code of the last background pass */
  char ckpt_err[256];

  saga_node_stats stats;
  char errmsg[512];
  uint32_t max_deliveries;
  char *event_channel;          /* publish transitions there (cfg.event_channel) */
  char *event_sub_channel;      /* receive other nodes' transitions */
  saga_event_cb event_sub_cb;
  void *event_sub_arg;
  saga__buf remote_events;      /* received event envelopes, dispatched after commit */
  saga__buf event_buf;          /* encoding of a published event */
  /* Transient handler failures per message id (hash), direct-mapped: a command failing
   * transiently max_deliveries times is dead-lettered instead of redelivered forever. */
  struct {
    uint64_t hash;
    uint32_t count;
  } transient[256];
  void (*test_hook)(void *, const char *);
  void *test_hook_arg;
  saga_retention retention;
  saga__timer purge_timer;
  saga__buf purge_ids;        /* ids of the sagas a pass deletes (NUL-separated) */
  saga__sweep sweeps[2];      /* retention cursors: inbox records, step records */
};

/* Calls the test hook, if any, at a named point. */
#define SAGA__HOOK(n, point) \
  do { \
    if ((n)->test_hook != NULL) (n)->test_hook((n)->test_hook_arg, (point)); \
  } while (0)

/* checkpoint.c */
/* After the store is open: installs the WAL hook (background) or SQLite's auto-checkpoint. */
int saga__checkpoint_init(saga_node *n, const saga_node_config *cfg, char *err, size_t errlen);
/* While closing: makes the close wait for a running background checkpoint. */
void saga__checkpoint_stop(saga_node *n);
void saga__checkpoint_free(saga_node *n);

/* retention.c */
/* The documented defaults (7 days, 30 days, batches of 1000, every minute). */
void saga__retention_defaults(saga_retention *r);
void saga__retention_init(saga_node *n, const saga_node_config *cfg);
void saga__retention_start(saga_node *n); /* arms the purge timer */
void saga__retention_stop(saga_node *n);
void saga__retention_free(saga_node *n);

/* tx.c */
/* Records one step latency (ms) in the node's histogram. */
void saga__node_latency(saga_node *n, uint64_t ms);
void saga__node_log(saga_node *n, saga_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int saga__node_fail(saga_node *n, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int saga__node_db_fail(saga_node *n, int code, const char *what);
uint64_t saga__node_now(saga_node *n);
/* A fast pseudo-random number for retry jitter. Not for ids: guessable. */
uint64_t saga__node_rand(saga_node *n);
/* len unpredictable bytes for ids (saga ids, trace ids): from the OS CSPRNG, or from
 * cfg.random when a test set it. SAGA_OK, or SAGA_EIO with n->errmsg set. */
int saga__node_id_bytes(saga_node *n, void *out, size_t len);
const saga__def *saga__node_find_def(saga_node *n, const char *name, uint32_t version);
const saga__handler *saga__node_find_handler(saga_node *n, const char *channel,
                                             const char *command);
/* Before every commit: writes the buffered history rows (the buffer is emptied either way)
 * and the outbox id mark. */
int saga__node_tx_finish(saga_node *n);
/* Buffers an event (delivered after commit) and its history row (see saga__node_tx_finish). */
int saga__node_event(saga_node *n, saga_event_type type, const saga__inst *inst, int step,
                     uint32_t attempt, const char *detail);
/* Inserts an outbox row. Call saga__node_tx_begun after every BEGIN. */
int saga__node_outbox(saga_node *n, const char *channel, const char *saga_id, const void *body,
                      size_t len);
/* Resets what the node caches of the database per transaction (the next outbox id). */
void saga__node_tx_begun(saga_node *n);
int saga__node_dead_letter(saga_node *n, const char *channel, const char *msg_id,
                           const char *reason, const void *body, size_t len);

/* engine.c */
int saga__engine_start(saga_node *n, saga__work *w, const saga__def *def, const void *input,
                       size_t input_len, const char *idem_key);
int saga__engine_reply(saga_node *n, const saga_envelope *env);
int saga__engine_due(saga_node *n, uint64_t now, size_t max, size_t *processed);
int saga__engine_cancel(saga_node *n, const char *saga_id);
int saga__engine_retry(saga_node *n, const char *saga_id);
int saga__engine_unpark(saga_node *n, int *missing);
/* The transport refused for good (code) to send cmd, a command this node wrote: if its saga
 * waits for exactly that attempt, the step fails with reason (see node.c relay). */
int saga__engine_undeliverable(saga_node *n, const saga_envelope *cmd, int code,
                               const char *reason);
void saga__inst_init(saga__inst *i, const saga_allocator *a);
void saga__inst_free(saga__inst *i);

/* participant.c */
/* raw/raw_len: the message as received, kept in dead letters. */
int saga__participant_command(saga_node *n, const char *channel, const saga_envelope *env,
                              const void *raw, size_t raw_len);

#endif /* SAGA_NODE_INTERNAL_H */
