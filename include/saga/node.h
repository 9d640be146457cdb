/**
 * @file
 * libsaga — the node: one SQLite database, one transport, one libuv loop.
 *
 * A node hosts an orchestrator (it runs sagas of the definitions registered on it), the
 * participants whose handlers are registered on it, or both. Lifecycle:
 *
 *   saga_node_config cfg; saga_node_config_init(&cfg);
 *   cfg.name = "orders"; cfg.db_path = "orders.db"; cfg.transport = t;
 *   cfg.db_mode = SAGA_DB_CREATE;              // first run only: else the file must exist
 *   saga_node_open(&node, loop, &cfg);         // opens/checks/migrates the database
 *   saga_node_register(node, &def);            // definitions this node orchestrates
 *   saga_node_handle(node, "order", "order.create", create_order, NULL);  // participants
 *   saga_node_start(node, NULL);               // recovery: resume in-flight sagas, relay
 *   saga_start(node, "purchase", input, key, started_cb, arg);
 *   ... uv_run(loop, UV_RUN_DEFAULT) ...
 *   saga_node_close(node, closed_cb, arg);     // then let the loop run once more
 *
 * Everything a node does in one loop turn (started sagas, replies, commands, timeouts) is
 * group-committed in one SQLite transaction; each participant handler runs in its own
 * savepoint inside it. After the commit, and only then: deliveries are acknowledged,
 * callbacks and events run, and the new outbox rows are published.
 *
 * Errors: functions return SAGA_OK or a negative code; saga_node_errmsg() has the detail.
 * Thread: every function must be called on the loop's thread, except saga_node_post().
 * Fork: a node must not be used across fork() — open it in the process that runs it (its
 * SQLite connection, loop and transport do not survive a fork). Its id generator refills
 * from the OS in a child anyway, so a child never repeats its parent's ids.
 *
 * Ids: saga ids are 32 hex digits, 48 bits of milliseconds (so ids sort by start time, which
 * keeps the store's B-trees compact) then 80 bits from the OS CSPRNG (getrandom): knowing
 * some ids does not tell the next. Message ids and trace ids derive from them.
 */
#ifndef SAGA_NODE_H
#define SAGA_NODE_H

#include "clock.h"
#include "common.h"
#include "data.h"
#include "definition.h"
#include "participant.h"
#include "trace.h"
#include "transport.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uv_loop_s; /* from uv.h, declared here so this header stands alone */
struct sqlite3; /* from sqlite3.h, declared here so this header stands alone */

/** A node: one database, one transport, one loop (see the file's description). Opaque; made
 * by saga_node_open(), ended by saga_node_close(). */
typedef struct saga_node saga_node;

/** Saga states. Terminal: COMPLETED, COMPENSATED, FAILED. */
typedef enum saga_state {
  SAGA_RUNNING = 1,
  SAGA_COMPENSATING = 2,
  SAGA_COMPLETED = 3,
  SAGA_COMPENSATED = 4,
  SAGA_FAILED = 5 /**< a compensation could not finish; needs an operator */
} saga_state;

/** Name of a state, e.g. "RUNNING"; "UNKNOWN" for other values. */
SAGA_EXTERN const char *saga_state_name(int state);

/** Transitions reported to the event hook and recorded in each saga's history. */
typedef enum saga_event_type {
  SAGA_EV_STARTED = 1,
  SAGA_EV_STEP_SENT = 2,        /**< an action attempt was sent (STATUS_EXECUTE) */
  SAGA_EV_STEP_SUCCEEDED = 3,
  SAGA_EV_STEP_FAILED = 4,      /**< business refusal or technical failure; detail = reason */
  SAGA_EV_STEP_TIMED_OUT = 5,
  SAGA_EV_STEP_RETRY = 6,       /**< another attempt is scheduled */
  SAGA_EV_COMPENSATION_SENT = 7,
  SAGA_EV_COMPENSATED = 8,      /**< a step's compensation was confirmed */
  SAGA_EV_COMPENSATION_FAILED = 9, /**< gave up compensating a step; the saga is FAILED */
  SAGA_EV_RESOLVE_SENT = 10,    /**< asked the pivot's participant whether it applied */
  SAGA_EV_CANCELLED = 11,       /**< cancel or saga deadline: compensation starts */
  SAGA_EV_COMPLETED = 12,
  SAGA_EV_SAGA_COMPENSATED = 13,
  SAGA_EV_SAGA_FAILED = 14,
  SAGA_EV_STALE_REPLY = 15,     /**< a duplicate or late reply was ignored (a saga that
                                     already COMPLETED or COMPENSATED records none, nor does
                                     a copy of the reply recorded just before: every one is
                                     counted in saga_node_stats.stale_replies) */
  SAGA_EV_DEFINITION_MISSING = 16, /**< an instance's definition version is not registered */
  SAGA_EV_OPERATOR_REQUEST = 17 /**< an operator's request (sagactl retry or cancel, see
                                     docs/operating.md) is being carried out; detail names the
                                     request, the next events are its effect */
} saga_event_type;

/** Name of an event type, e.g. "STEP_SENT". */
SAGA_EXTERN const char *saga_event_name(int type);

/** One transition. Every pointer is borrowed for the duration of the hook call. */
typedef struct saga_event {
  saga_event_type type;   /**< what happened */
  const char *saga_id;    /**< the saga it happened to */
  const char *definition; /**< definition name */
  uint32_t version;       /**< definition version */
  int step;               /**< step index, -1 for saga-level events */
  const char *step_name;  /**< "" for saga-level events */
  uint32_t attempt;       /**< attempt number of the step's action or compensation */
  saga_state state;       /**< saga state after the transition */
  const char *detail;     /**< reason or note, "" when none */
  uint64_t at_ms;         /**< clock time of the transition */
  const saga_data *data;  /**< events received from another node (saga_node_subscribe_events):
                               the saga's data at the transition; NULL for this node's own
                               events (read it with saga_get()) */
  /** The saga's trace context, "00-<trace id>-<the saga's span id>-<flags>" (saga/trace.h);
   * for an event from another node, its traceparent header when well-formed, else "". */
  const char *traceparent;
} saga_event;

/** The span hook (saga_node_config.on_span): called on the loop, after the transaction that
 * recorded the span's start or end committed. See saga/trace.h and saga_node_config. */
typedef void (*saga_span_cb)(saga_node *node, const saga_span *span, void *arg);

/** The event hook: called after the transition's transaction committed, on the loop. */
typedef void (*saga_event_cb)(saga_node *node, const saga_event *ev, void *arg);

/** Durability of commits: SQLite's PRAGMA synchronous of the node's database (in WAL mode). */
typedef enum saga_sync {
  SAGA_SYNC_OFF = 0,    /**< no fsync: a power loss or OS crash may lose or damage the file */
  SAGA_SYNC_NORMAL = 1, /**< fsync at checkpoints: a power loss may lose the latest commits,
                             never damages the file; a process crash loses nothing */
  SAGA_SYNC_FULL = 2 /**< default: every commit is durable */
} saga_sync;

/**
 * Retention of finished work: nothing grows without bound. A node purges in small batches,
 * each its own short transaction, so the loop never stalls; a pass that filled a batch
 * continues on the next loop turn. FAILED sagas and dead letters are never purged (they wait
 * for an operator). See docs/operating.md for the trade-offs.
 * Embedded by value in saga_node_config, so its layout is frozen (docs/abi.md): a new setting
 * is appended to saga_node_config under a new struct_version.
 */
typedef struct saga_retention {
  /** COMPLETED and COMPENSATED sagas, with their history, are deleted once they finished
   * this long ago. Default 7 days; 0 = never by age. */
  uint64_t finished_ms;
  /** Keep at most this many COMPLETED/COMPENSATED sagas (the oldest go first). Default 0 =
   * no limit. Each pass skips over this many index entries: cheap up to millions. */
  uint64_t max_finished;
  /** Participant inbox records and step records are deleted once this old. Default 30 days;
   * 0 = never. It must exceed the longest a saga can run plus the transport's redelivery
   * horizon: a command arriving after its records were deleted runs its handler again, and a
   * compensation arriving after them finds no record of its action: it is answered
   * SAGA_EEXPIRED and its saga ends FAILED (docs/operating.md). */
  uint64_t inbox_ms;
  uint32_t batch;       /**< rows of each kind per purge transaction; default 1000 */
  uint32_t interval_ms; /**< between purge passes; default 60000 */
} saga_retention;

/** How a node checkpoints its WAL (copies it back into the database file so that the WAL can
 * start over). */
typedef enum saga_checkpoint_mode {
  /** Default: SQLite's own auto-checkpoint, inside the commit that makes the WAL cross
   * checkpoint_pages; that commit waits for the copy and its fsyncs. */
  SAGA_CHECKPOINT_INLINE = 0,
  /** In a thread of libuv's pool (the loop's threadpool, shared with the application), on a
   * database connection of its own, every checkpoint_pages new WAL pages, so commits do not
   * wait for the copy. A background pass cannot finish while commits keep adding pages, so
   * once the WAL holds 4 x checkpoint_pages the node checkpoints inline between two
   * transactions, which bounds the WAL. Measured (docs/performance.md): a few % more
   * throughput under load, a slightly longer light-load tail (the background fsyncs compete
   * with the commits'). The VFS, if any, must be usable from another thread. */
  SAGA_CHECKPOINT_BACKGROUND = 1
} saga_checkpoint_mode;

/** Whether saga_node_open() may create the database (saga_node_config.db_mode). */
typedef enum saga_db_mode {
  /** Default: db_path must hold a libsaga database already. A missing file, an empty one
   * (0 bytes, e.g. truncated) or one without libsaga's tables is refused with
   * SAGA_ENOTFOUND and left untouched: a node that has run before never silently starts
   * from nothing (its idempotency keys, sagas in flight and inbox records would be gone). */
  SAGA_DB_OPEN_EXISTING = 0,
  /** Create the database when the file is missing, empty or has no libsaga tables yet (an
   * application's own database gets libsaga's tables added); an existing libsaga database
   * is opened as with SAGA_DB_OPEN_EXISTING. For the first run, or a deliberate fresh
   * start. */
  SAGA_DB_CREATE = 1
} saga_db_mode;

/** The check of the database file at open (saga_node_config.db_check). */
typedef enum saga_db_check {
  /** Default: PRAGMA quick_check. It reads every page of the file once, so it delays the
   * open of a large database: measured 3 s per GB with the file in the page cache, 30 s per
   * GB from a cold, slow virtual disk (docs/operating.md). */
  SAGA_DB_CHECK_QUICK = 0,
  /** No check: for very large files, or a file checked by other means. A damaged file is
   * then found (SAGA_ECORRUPT) only when a transaction touches a damaged page. */
  SAGA_DB_CHECK_NONE = 1,
  /** PRAGMA integrity_check: quick_check plus a comparison of every index with its table
   * (finds index entries that lost their row, which quick_check does not); measured 8 s
   * per GB from the page cache. */
  SAGA_DB_CHECK_FULL = 2
} saga_db_check;

/** The newest saga_node_config.struct_version (docs/abi.md lists each version's fields). */
#define SAGA_NODE_CONFIG_VERSION 5

/** Node configuration. Initialise with saga_node_config_init(), then set fields. Fields are
 * only ever appended, each group under a new struct_version; the version fixes the layout of
 * the structs embedded by value (saga_limits, saga_retention), which never grow
 * (docs/abi.md). */
typedef struct saga_node_config {
  int struct_version;         /**< SAGA_NODE_CONFIG_VERSION */
  const char *name;           /**< required: node name; also its reply channel */
  const char *db_path;        /**< required: SQLite file (":memory:" for tests) */
  const char *vfs;            /**< SQLite VFS name, NULL = default */
  saga_sync synchronous;      /**< default SAGA_SYNC_FULL */
  saga_transport *transport;  /**< required; taken by saga_node_open(), even on failure */
  saga_clock *clock;          /**< NULL = a real clock of the node's own; borrowed */
  const saga_allocator *alloc;/**< NULL = libc; copied */
  saga_log_fn log;            /**< NULL = no logging */
  void *log_arg;              /**< passed to log as its first argument */
  /**
   * FOR TESTS ONLY; production leaves it NULL. NULL: saga ids and trace ids come from the
   * OS CSPRNG (getrandom), retry jitter from a fast generator seeded from it. Set: ids and
   * jitter come from this function (deterministic runs), and ids are only as unpredictable
   * as it is — with a seeded generator an outsider who sees one id can forge replies.
   */
  uint64_t (*random)(void *arg);
  void *random_arg;           /**< passed to random */
  saga_event_cb on_event;     /**< NULL = none */
  void *event_arg;            /**< passed to on_event as its last argument */
  uint32_t resend_ms;         /**< outbox rows unconfirmed this long are sent again, at
                                   most batch_max per resend_ms, oldest first, in turn;
                                   default 1000 */
  uint32_t batch_max;         /**< most work items in one transaction; default 1024 */
  saga_limits limits;         /**< decoding limits; defaults from saga_limits_init() */
  uint32_t busy_timeout_ms;   /**< SQLite busy timeout; default 5000 */
  uint32_t max_deliveries;    /**< a command whose handler fails transiently (busy, I/O,
                                   memory) this many times is dead-lettered and answered
                                   with a failure; likewise a domain event whose handler
                                   does (saga/domain.h), which is then dead-lettered and its
                                   key moves on; default 10 */
  /**
   * Fault-injection hook for crash tests (NULL in production): called at named points of
   * the node's work, e.g. to _exit() the process there. Points: "tx.before_commit",
   * "tx.after_commit" (committed, nothing acknowledged or published yet), "tx.after_ack",
   * "outbox.after_insert", "relay.after_publish" (handed to the transport, not yet
   * confirmed), "participant.after_handler", "participant.after_inbox" (inbox row written,
   * not committed), "engine.after_transition".
   */
  void (*test_hook)(void *arg, const char *point);
  void *test_hook_arg;        /**< passed to test_hook */
  /**
   * NULL, or a channel to which every transition of this node's sagas is also published, as
   * an event message written in the transition's own transaction (so at least once, in
   * order per saga). Other nodes receive them with saga_node_subscribe_events().
   */
  const char *event_channel;
  /* ---- struct_version 2 ---- */
  saga_retention retention; /**< defaults from saga_node_config_init() (version 1 configs:
                                 the defaults) */
  /* ---- struct_version 3 ---- (older configs: the defaults) */
  saga_checkpoint_mode checkpoint; /**< default SAGA_CHECKPOINT_INLINE */
  uint32_t checkpoint_pages;       /**< WAL pages that start a checkpoint; default 1000 */
  /* ---- struct_version 4 ---- */
  /**
   * Default SAGA_DB_OPEN_EXISTING: db_path must hold a libsaga database; set SAGA_DB_CREATE
   * for the first run. Configs of struct_version 1 to 3 create the database when it is
   * missing or empty, as libsaga did before this field. ":memory:" and "" (a temporary
   * database) are always new and always allowed: they cannot hold earlier state.
   */
  saga_db_mode db_mode;
  /** Default SAGA_DB_CHECK_QUICK (also for older configs): a damaged file is refused with
   * SAGA_ECORRUPT. */
  saga_db_check db_check;
  /* ---- struct_version 5 ---- (older configs: none) */
  /**
   * NULL, or the span hook: the start and end of every saga this node orchestrates, of each
   * attempt of its steps and compensations, and of each handler run on this node
   * (saga/trace.h), for tracing (docs/operating.md, "Tracing"). Called on the loop after the
   * transaction that recorded what it reports committed: a transaction that fails or is
   * rolled back reports nothing, and one that commits reports its spans once (a crash right
   * after the commit loses the reports of that transaction). The saga_span is read-only and
   * borrowed for the call. The hook must return quickly (queue the span for another thread;
   * do not block or do I/O on the loop); it may read state (saga_get()) and queue work
   * (saga_start(), saga_cancel()), as the event hook may, but must not call saga_node_close()
   * or run the loop. Nothing it does can undo or change what was committed.
   */
  saga_span_cb on_span;
  void *span_arg; /**< passed to on_span */
} saga_node_config;

/**
 * Fills the first `size` bytes of cfg with defaults and sets struct_version to the newest
 * version whose fields fit in them: pass sizeof *cfg (the macro saga_node_config_init()
 * does). A program built against an older header, whose struct is shorter, gets its own
 * version and nothing is written past it (docs/abi.md). Returns SAGA_OK, or SAGA_EINVAL for
 * a NULL cfg or a size below the version-1 struct (nothing written).
 */
SAGA_EXTERN int saga_node_config_init_sized(saga_node_config *cfg, size_t size);
/** Fills cfg with defaults (struct_version set, everything optional at its default). */
#define saga_node_config_init(cfg) saga_node_config_init_sized((cfg), sizeof(saga_node_config))

/**
 * Opens the database (creating it when cfg->db_mode says so, checking it as cfg->db_check
 * says, migrating it to this library's schema), and opens the transport on loop. The node
 * takes ownership of cfg->transport in every case. Strings in cfg are copied.
 * Returns SAGA_OK and sets *out; SAGA_EINVAL (missing name/db_path/transport, NULL loop, an
 * unknown db_mode or db_check), SAGA_EVERSION (config or transport version unknown),
 * SAGA_ENOTFOUND (no libsaga database
 * at db_path: missing, empty or without libsaga's tables, and db_mode is not
 * SAGA_DB_CREATE), SAGA_ECORRUPT (the file failed the check, or is not a database),
 * SAGA_EREADONLY (the file can only be read: permissions, a read-only mount or VFS),
 * SAGA_ESCHEMA (database written by a newer libsaga), SAGA_ESTORE/SAGA_EIO (SQLite),
 * SAGA_ENOMEM, or the transport's error. On failure nothing is left to free; if errmsg is not NULL a sentence
 * describing the failure is copied into it (errlen bytes).
 */
SAGA_EXTERN int saga_node_open(saga_node **out, struct uv_loop_s *loop, const saga_node_config *cfg,
                               char *errmsg, size_t errlen);

/**
 * Starts closing: stops timers and the transport; pending API callbacks get SAGA_ECLOSED.
 * cb (may be NULL) runs on the loop once everything is released. The node must not be used
 * after this call. Accepts NULL (cb is then not called).
 */
SAGA_EXTERN void saga_node_close(saga_node *node, void (*cb)(void *arg), void *arg);

/** The detail of the latest error on this node (never NULL; "" when none). Every call that
 * can fail (register, handle, subscribe, start, saga_start, saga_cancel, saga_retry_failed,
 * saga_get, saga_tx_start) clears it first, so after a call that succeeded it is "". A failed
 * transaction of the node's own work sets it too (and logs it). Borrowed until the next call
 * on the node. */
SAGA_EXTERN const char *saga_node_errmsg(const saga_node *node);

/**
 * The SQLite connection of the node, for the application's own statements between the node's
 * transactions (on the loop thread, outside handlers): reads, and writes that belong to no
 * saga (e.g. creating a product). Inside a handler use saga_tx_db() instead.
 */
SAGA_EXTERN struct sqlite3 *saga_node_db(saga_node *node);

/** The node's clock. */
SAGA_EXTERN saga_clock *saga_node_clock(saga_node *node);

/**
 * Registers a definition to orchestrate (copied). Several versions of one name may be
 * registered; saga_start() uses the highest. Must be called before saga_node_start().
 * Returns SAGA_OK, SAGA_EDEFINITION (invalid; errmsg says why), SAGA_EEXIST (same name and
 * version already registered), SAGA_ESTATE (node already started), SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_node_register(saga_node *node, const saga_definition *def);

/**
 * Registers handler fn for command on channel (both copied) and subscribes to channel at
 * saga_node_start(). Must be called before saga_node_start().
 * Returns SAGA_OK, SAGA_EINVAL, SAGA_EEXIST (same channel and command), SAGA_ESTATE,
 * SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_node_handle(saga_node *node, const char *channel, const char *command,
                                 saga_handler fn, void *arg);

/**
 * Recovery and start: subscribes the channels, re-arms every stored deadline, sends unsent
 * outbox rows, and reports (event SAGA_EV_DEFINITION_MISSING, once per instance) every
 * in-flight saga whose definition version is not registered — those are left untouched.
 * Returns SAGA_OK and, when missing is not NULL, sets *missing to the number of such
 * instances; or a negative error (*missing untouched). A failed start may be called again.
 */
SAGA_EXTERN int saga_node_start(saga_node *node, uint64_t *missing);

/** Completion of saga_start(): status SAGA_OK and the saga id (borrowed for the call), or
 * a negative status and saga_id NULL. `existed` is 1 when the idempotency key matched an
 * earlier saga (the same id is returned; nothing new started). */
typedef void (*saga_start_cb)(saga_node *node, int status, const char *saga_id, int existed,
                              void *arg);

/**
 * Starts a saga of the highest registered version of definition `name`, with a copy of
 * input (may be NULL) as its data. idem_key (may be NULL) makes the start idempotent: a
 * later start of the same definition (any version) with the same key returns the first
 * saga's id; keys of different definitions never meet. The saga is durable when cb
 * runs (after the commit). If this returns an error, cb never runs; otherwise it runs
 * exactly once, on the loop.
 * Returns SAGA_OK, SAGA_EINVAL, SAGA_ENODEF, SAGA_ESTATE (not started / closing),
 * SAGA_ENOMEM, SAGA_ETOOBIG (input over the message limit).
 */
SAGA_EXTERN int saga_start(saga_node *node, const char *name, const saga_data *input,
                           const char *idem_key, saga_start_cb cb, void *arg);

/**
 * saga_start() in the caller's trace: traceparent (may be NULL: as saga_start(), the trace id
 * is then the saga id) is a W3C traceparent header value, checked strictly
 * (saga_traceparent_check()): the saga's trace id is its trace id, the saga's span a child of
 * its span, and its flags are kept. Stored with the saga, so a restarted node keeps them.
 * A malformed traceparent is refused with SAGA_EINVAL (errmsg says what is wrong) and nothing
 * is started: drop a malformed header from the network with saga_traceparent_check() first.
 * With an idempotency key that matched an earlier saga, that saga keeps its own trace.
 * Returns as saga_start().
 */
SAGA_EXTERN int saga_start_traced(saga_node *node, const char *name, const saga_data *input,
                                  const char *idem_key, const char *traceparent,
                                  saga_start_cb cb, void *arg);

/**
 * Receives, from then on, the events other nodes publish to `channel` (their
 * cfg.event_channel): cb runs on the loop, after the delivery was recorded, with ev->data set.
 * Delivery is at least once: a receiver that must not show an event twice keeps the last
 * (saga_id, at_ms, type) it saw. Must be called before saga_node_start(); one callback per
 * node. Returns SAGA_OK, SAGA_EINVAL, SAGA_ESTATE, SAGA_EEXIST (subscribed already, or channel
 * carries domain events: saga_node_on_event() in saga/domain.h), SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_node_subscribe_events(saga_node *node, const char *channel,
                                           saga_event_cb cb, void *arg);

/** Completion of an operator action: SAGA_OK or a negative status. */
typedef void (*saga_done_cb)(saga_node *node, int status, void *arg);

/**
 * Aborts a RUNNING saga into compensation. Fails with SAGA_ESTATE (through cb) when the saga
 * has passed its pivot or is not running, SAGA_ENOTFOUND when unknown. Async contract as for
 * saga_start().
 */
SAGA_EXTERN int saga_cancel(saga_node *node, const char *saga_id, saga_done_cb cb, void *arg);

/**
 * Operator repair: resumes a FAILED saga's compensation from the step that failed, with a
 * fresh attempt count. SAGA_ESTATE through cb when the saga is not FAILED.
 */
SAGA_EXTERN int saga_retry_failed(saga_node *node, const char *saga_id, saga_done_cb cb, void *arg);

/** Completion of saga_node_watch(): status SAGA_OK and the terminal state the saga reached
 * (SAGA_COMPLETED, SAGA_COMPENSATED or SAGA_FAILED), or SAGA_ECLOSED (state 0) when the node
 * closed first. saga_id is borrowed for the call. */
typedef void (*saga_watch_cb)(saga_node *node, int status, const char *saga_id,
                              saga_state state, void *arg);

/**
 * Waits for one saga of this node (as orchestrator) to reach a terminal state: cb runs once,
 * on the loop, after the transaction that recorded the state committed — on a later loop
 * turn if the saga is terminal already (never inside this call). FAILED counts as terminal
 * (an operator's saga_retry_failed() may move it on later: watch again). Any number of
 * watchers per saga. A watch is not durable: after a restart, watch again (start sagas with
 * an idempotency key, so that a restarted service finds its saga by key, then watch it;
 * docs/operating.md, "Waiting for a saga"). Call it on the loop thread, not from a handler.
 * Returns SAGA_OK, SAGA_EINVAL, SAGA_ESTATE (not started / closing), SAGA_ENOTFOUND (no such
 * saga in this node's database), SAGA_ENOMEM, or a store error; if it returns an error, cb
 * never runs.
 */
SAGA_EXTERN int saga_node_watch(saga_node *node, const char *saga_id, saga_watch_cb cb,
                                void *arg);

/** A snapshot of one saga, from saga_get(). All memory belongs to the struct. */
typedef struct saga_info {
  char id[40];        /**< the saga id, NUL-terminated (32 hex digits) */
  char *definition;   /**< definition name */
  uint32_t version;   /**< definition version the saga runs on */
  saga_state state;   /**< current state */
  int step;           /**< current step (action or compensation) */
  uint32_t attempt;   /**< attempt number of the current step's action or compensation */
  char *error;        /**< last failure reason, "" when none */
  saga_data *data;    /**< the saga data */
  uint64_t created_ms; /**< clock time the saga was started */
  uint64_t updated_ms; /**< clock time of its latest transition */
  uint64_t deadline_ms; /**< next timer, 0 when none */
} saga_info;

/**
 * Reads the committed state of a saga. On SAGA_OK *out is a new snapshot to release with
 * saga_info_free(). SAGA_ENOTFOUND, SAGA_EINVAL, SAGA_ESTORE, SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_get(saga_node *node, const char *saga_id, saga_info **out);

/** Frees a snapshot. Accepts NULL. */
SAGA_EXTERN void saga_info_free(saga_info *info);

/**
 * The only thread-safe entry: runs fn(node, arg) on the loop thread soon. Returns SAGA_OK,
 * SAGA_ECLOSED (node closing: fn will not run), SAGA_ENOMEM. If it returns SAGA_OK, fn runs
 * exactly once — with node NULL when the node closed before fn could run.
 *
 * When other threads must stop: tell them to stop posting before calling saga_node_close().
 * A post that races with the close is safe while the close is under way (it returns
 * SAGA_ECLOSED, or SAGA_OK and fn runs with node NULL); the node's memory is freed right
 * before the close callback runs, and a post made after that touches freed memory.
 */
SAGA_EXTERN int saga_node_post(saga_node *node, void (*fn)(saga_node *node, void *arg),
                               void *arg);

/** Buckets of the step-latency histogram (see saga_node_stats.step_latency). */
#define SAGA_LATENCY_BUCKETS 14

/** Counters of a node. */
typedef struct saga_node_stats {
  uint64_t transactions;   /**< group commits */
  uint64_t work_items;     /**< items processed in them */
  uint64_t commit_failures; /**< transactions that failed to commit */
  uint64_t sent;           /**< outbox rows published */
  uint64_t resent;         /**< outbox rows published again (unconfirmed in time) */
  uint64_t acked_out;      /**< outbox rows confirmed by the transport */
  uint64_t delivered;      /**< messages delivered to the node */
  uint64_t duplicates;     /**< duplicate messages, answered from the inbox */
  uint64_t dead_letters;   /**< messages dead-lettered */
  uint64_t handler_runs;   /**< participant handler runs */
  /** Orchestrator step latency: from the commit that sent a step's command (action,
   * compensation or resolve) to the processing of its reply, in ms of the node's clock.
   * step_latency[b] counts replies with latency <= saga_latency_bound_ms(b) and above the
   * previous bound (not cumulative); the last bucket counts everything above the largest
   * bound. Counted when the reply is processed (a transaction that then fails to commit
   * still counted it). */
  uint64_t step_latency[SAGA_LATENCY_BUCKETS];
  uint64_t step_latency_count;  /**< replies counted in step_latency, all buckets */
  uint64_t step_latency_sum_ms; /**< sum of their latencies, in ms */
  uint64_t purged_sagas;   /**< finished sagas deleted by retention */
  uint64_t purged_inbox;   /**< inbox records deleted by retention */
  uint64_t purged_steps;   /**< participant step records deleted by retention */
  uint64_t purge_passes;   /**< purge transactions committed */
  /** Transactions run a second time with a savepoint per item, because an item failed after
   * writing (a store error, out of memory): the first try has no per-item savepoints. */
  uint64_t replayed_tx;
  uint64_t checkpoints;        /**< WAL checkpoints run in the background */
  uint64_t checkpoints_inline; /**< WAL checkpoints run inline: the WAL reached its bound */
  uint64_t checkpoint_failures; /**< WAL checkpoints that failed, background or inline
                                     (each logged) */
  /** Replies that matched no awaited step (duplicates, late or stale attempts), all of
   * them, including those for finished sagas, which record no history. */
  uint64_t stale_replies;
  /** Commands refused because their reply_to cannot be reached by this node's transport
   * (its can_send() said 0) or names the reserved local channel: dead-lettered and
   * acknowledged, the handler not run. */
  uint64_t reply_to_refused;
  /** Outbox rows the transport refused for good (send() returned SAGA_EINVAL or
   * SAGA_ETOOBIG): moved to the dead-letter table once, not resent. */
  uint64_t unsendable;
  /** Replies for the awaited step, phase and attempt whose id does not answer the command
   * this node sent: each command's id carries a tag only this node can compute (a keyed
   * hash, the key kept in its database), which the reply must echo. Such a reply was made
   * by someone who never saw the command: ignored, logged and counted here. */
  uint64_t forged_replies;
  /** Handlers that broke their contract: returned a value that is not a libsaga code (a
   * positive SQLite code, say; SQLITE_BUSY and SQLITE_LOCKED are then taken as transient),
   * or ended the node's transaction themselves (COMMIT or ROLLBACK on saga_tx_db()). Each
   * is logged with the handler's name. */
  uint64_t handler_contract_errors;
  /** Compensations answered SAGA_EEXPIRED: no record of the step, and the saga is older
   * than the records retention deleted (saga_retention.inbox_ms), so whether its action
   * applied is unknown; the orchestrator marks the saga FAILED instead of COMPENSATED. */
  uint64_t compensations_expired;
  /** Replies for a saga whose definition version this node has not registered: stored and
   * acknowledged, then applied by saga_node_start() once that version is registered. */
  uint64_t replies_parked;
  /** As of the last check (each resend tick, at most every SAGA_OUTBOX_CHECK_MS): the age
   * in ms of the oldest unconfirmed outbox row, and how many channels have one older than
   * SAGA_OUTBOX_WARN_MS (each such channel is logged once as a warning until it drains: a
   * typo in a step's channel, or a participant that is down). 0 when the outbox is empty. */
  uint64_t outbox_oldest_ms;
  /** As of the same check: channels with an outbox row older than SAGA_OUTBOX_WARN_MS. */
  uint64_t outbox_stuck_channels;
  /** Dead letters deleted: by retention (older than SAGA_DEAD_LETTER_MS), or as newer ones
   * were written beyond the newest SAGA_DEAD_LETTER_MAX. */
  uint64_t purged_dead_letters;
  /** send() calls the transport refused with a transient code (broker down, queue full): the
   * rows stay in the outbox and are resent. Logged once, then at most every 10 s. */
  uint64_t send_refusals;
  /** Domain-event handler runs (saga_node_on_event(), saga/domain.h), whatever their
   * outcome; a run in a transaction that then failed is counted too. */
  uint64_t event_handler_runs;
  /** Domain events that arrived before their key's previous event was handled: left
   * unacknowledged, to come again (saga/domain.h). */
  uint64_t events_held;
} saga_node_stats;

/** Upper bound in ms of latency bucket b (1, 2, 5, 10, ... 10000); UINT32_MAX for the last
 * bucket and for b out of range. */
SAGA_EXTERN uint32_t saga_latency_bound_ms(int b);

/**
 * Counts the sagas this node orchestrates by state (reads the database): counts[s] for each
 * saga_state s (index 0 unused and set to 0). Returns SAGA_OK, or SAGA_EINVAL / a store
 * error. Cost grows with the number of sagas kept (an index scan); fine for a scrape.
 */
SAGA_EXTERN int saga_node_count_by_state(saga_node *node, int64_t counts[6]);

/**
 * Copies the node's counters into *out, writing exactly `size` bytes: pass sizeof *out. A
 * program built against an older header (a shorter struct) gets the counters it knows and
 * nothing past them is written; bytes beyond the counters this library has are zeroed
 * (docs/abi.md). Returns SAGA_OK, or SAGA_EINVAL (nothing written) for a NULL node or out, or
 * a size below the first version of the struct (the counters up to handler_runs).
 */
SAGA_EXTERN int saga_node_stats_get(const saga_node *node, saga_node_stats *out, size_t size);

/**
 * Number of outbox rows not yet confirmed (reads the database). Negative on error.
 */
SAGA_EXTERN int64_t saga_node_outbox_depth(saga_node *node);

/** Dead letters: the bytes of a message a dead letter keeps (the rest is cut, and its reason
 * says so), how long dead letters are kept, and how many at most (the oldest go first); the
 * node's retention passes delete the rest (saga_node_stats.purged_dead_letters). At most
 * SAGA_DEAD_LETTER_MAX x SAGA_DEAD_LETTER_BODY_MAX = 640 MiB of bodies, far less in practice. */
#define SAGA_DEAD_LETTER_BODY_MAX 65536u
/** Dead letters older than this (30 days, in ms) are deleted by retention. */
#define SAGA_DEAD_LETTER_MS (UINT64_C(30) * 24 * 3600 * 1000)
/** At most this many dead letters are kept: writing one more deletes the oldest, in the same
 * transaction (retention passes check it too). */
#define SAGA_DEAD_LETTER_MAX 10000u

/** An outbox row unconfirmed this long is worth a warning (see saga_node_stats). */
#define SAGA_OUTBOX_WARN_MS 60000u
/** How often, at most, the outbox is read per channel for that warning. */
#define SAGA_OUTBOX_CHECK_MS 5000u

/**
 * How often a running node looks for operator requests (rows an operator's tool such as
 * sagactl wrote into saga_operator_request: retry or cancel a saga, replay or purge dead
 * letters). A started node carries each one out in its own transaction, the request's result
 * written in the same transaction; saga_node_start() takes those written while no node ran.
 * See docs/operating.md.
 */
#define SAGA_OPERATOR_POLL_MS 500u

/** Called by saga_node_outbox_channels() once per channel with unconfirmed messages: how many
 * there are and the age in ms of the oldest. channel is borrowed for the call. */
typedef void (*saga_outbox_channel_cb)(void *arg, const char *channel, int64_t count,
                                       uint64_t oldest_ms);

/**
 * Reports the unconfirmed outbox rows per channel (reads the database: one scan of the
 * outbox). Use it for a metric such as "oldest unconfirmed message per channel": a channel
 * whose messages stay unconfirmed is not consumed (a typo in a step's channel) or its
 * consumer is down. Returns SAGA_OK, SAGA_EINVAL, or a store error. Thread: the node's loop.
 */
SAGA_EXTERN int saga_node_outbox_channels(saga_node *node, saga_outbox_channel_cb cb, void *arg);

/**
 * Writes the node's metrics in the Prometheus text exposition format (version 0.0.4): HELP
 * and TYPE lines, series named libsaga_* with a node="<node name>" label (label values
 * escaped as the format says). Written:
 *  - libsaga_sagas{node,state} (gauge, all five states) and
 *    libsaga_sagas_by_definition{node,definition,state} (gauge, the pairs that have sagas);
 *  - libsaga_step_latency_ms{node} (histogram, cumulative buckets in ms): the node-wide
 *    step-latency histogram of saga_node_stats;
 *  - per step of the registered definitions, labelled {node,definition,step} (the names; the
 *    versions of a definition added up per step name): the histogram
 *    libsaga_step_duration_ms{...,phase} (phase "action", "compensation" for steps with a
 *    compensation, "resolve" for the pivot; the same buckets; every reply is in one of them)
 *    and the counters libsaga_step_attempts_total (action commands sent), _retries_total
 *    (of them after the first), _successes_total, _failures_total (failure replies, unsendable
 *    commands, a pivot not applied), _timeouts_total, _compensation_attempts_total,
 *    _compensations_total (succeeded) and _compensation_failures_total (failed or timed out).
 *    Kept in memory from the node's open, counted when their transaction commits;
 *  - libsaga_outbox_depth{node}, libsaga_outbox_channel_depth{node,channel},
 *    libsaga_outbox_oldest_seconds{node,channel} (gauges: unconfirmed outbox rows, per
 *    channel, and the age of the oldest), libsaga_outbox_stuck_channels{node};
 *  - libsaga_transport_connected{node} (1 or 0);
 *  - every counter of saga_node_stats as libsaga_NAME_total{node} (transactions, commit
 *    failures, sent, resent, dead letters, stale replies, send refusals, ...);
 *  - libsaga_metrics_read_errors{node}: database reads that failed for this text (their
 *    series are left out; the call still succeeds).
 * Reads the database: the counts by state and definition and the outbox per channel are one
 * scan each (fine for a scrape every few seconds). *out gets a NUL-terminated text allocated
 * with the node's allocator: free it with saga_free(<the allocator of the node's config>,
 * *out), saga_free(NULL, *out) when the config set none. *len (len may be NULL) gets its
 * length. Returns SAGA_OK, SAGA_EINVAL, SAGA_ENOMEM. Thread: the node's loop.
 */
SAGA_EXTERN int saga_node_metrics(saga_node *node, char **out, size_t *len);

/**
 * The same for count nodes in one text: each metric's HELP and TYPE once, then its series of
 * every node (the format allows a metric's block only once, so two texts of
 * saga_node_metrics() are not valid when concatenated). Allocated with the allocator of
 * nodes[0]. Every node must run on the calling thread's loop.
 */
SAGA_EXTERN int saga_nodes_metrics(saga_node *const *nodes, size_t count, char **out,
                                   size_t *len);

/**
 * 1 when the node's transport is open and connected (messages can flow), 0 when it is not:
 * not open yet or closed, or opened while its broker was unreachable (NATS and Redis open
 * anyway by default) and not connected yet, or reconnecting. Meanwhile sagas can be started
 * and their messages wait in the outbox. For a health check ("transport not connected").
 * Adapters without a connected() method (in-memory, in-process, TCP, where each peer
 * connection is separate) count as connected once open. SAGA_EINVAL for a NULL node.
 */
SAGA_EXTERN int saga_node_transport_connected(saga_node *node);

/** Nonzero when the node has queued work not yet committed (for test harnesses). */
SAGA_EXTERN int saga_node_busy(const saga_node *node);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_NODE_H */
