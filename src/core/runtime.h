/*
 * The node's runtime: the struct saga_node and what each of the node's files exports to the
 * others. The node ties the parts together on one libuv loop. Its files:
 *   node.c   lifecycle (open, start, close), registration, the public API that queues work
 *   batch.c  the group commit: one transaction per batch of queued work, its replay, and
 *            what happens after it (acknowledgements, callbacks, events); the timers of due
 *            sagas
 *   relay.c  publishing committed outbox rows, resending unconfirmed ones, unsendable rows
 *   host.c   the transport: attaching it and the callbacks it calls (deliveries, confirms)
 *   events.c handing events to the application after a commit
 *   queue.c  the work queue the others push into
 *   operator.c operators' requests (sagactl) carried out by the node; definitions recorded
 * Calls run one way: node.c -> batch.c -> relay.c -> queue.c, host.c -> queue.c,
 * node.c and batch.c -> operator.c -> queue.c, and all of
 * them to the parts below (engine, participant, journal, retention, store). Where a lower file
 * must make a higher one act (a flush to run, a close to finish), it calls through a function
 * pointer the higher one set.
 */
#ifndef SAGA_SRC_CORE_RUNTIME_H
#define SAGA_SRC_CORE_RUNTIME_H

#include "domain.h"
#include "participant.h"
#include "retention.h"

/* ---- work queue (queue.c) --------------------------------------------------------------- */

typedef enum saga__work_type {
  W_DELIVERY = 1,
  W_START,
  W_CANCEL,
  W_RETRY,
  W_SENT,
  W_DEAD, /* a message the transport gave up on: keep it, then acknowledge it */
  W_UNSENDABLE, /* an outbox row send() refused for good: dead-letter it, fail its step */
  W_OPREQ,      /* an operator request (tag = its id), operator.c */
  W_TRANSACT    /* saga_node_transact(): off1 holds the function and its argument */
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
} saga__work;

typedef struct saga__queue {
  saga__work *items;
  size_t n, cap;
  saga__buf arena;
} saga__queue;

typedef struct saga__post {
  void (*fn)(saga_node *node, void *arg);
  void *arg;
  struct saga__post *next;
} saga__post;

/* A saga_node_watch() waiting for its saga (events.c). state != 0: reached, to be told. */
typedef struct saga__waiter {
  char id[40];
  saga_watch_cb cb;
  void *arg;
  int state;
} saga__waiter;

struct saga_node {
  saga_allocator alloc_copy;
  saga__env env; /* allocator, clock, store, limits, stats, log, errmsg */
  uv_loop_t *loop;
  char *name;
  int own_clock;

  saga__journal journal;
  saga__engine engine;
  saga__participant part;
  saga__domain domain; /* domain events: publishing, subscribers (domain.c) */
  saga__retention retention;

  saga_transport *transport;
  saga_transport_methods tm; /* copied field by field by version */
  saga__transport_host host;
  int transport_open, transport_closed;

  saga_event_cb on_event;
  void *event_arg;
  saga_span_cb on_span; /* cfg.on_span (version 5) */
  void *span_arg;
  char *event_channel;      /* publish transitions there (cfg.event_channel) */
  char *event_sub_channel;  /* receive other nodes' transitions */
  saga_event_cb event_sub_cb;
  void *event_sub_arg;

  uint32_t resend_ms, batch_max;
  int started, closing, in_flush, close_after_flush;
  int local_steps_added; /* saga_node_start registered the local steps' handlers */
  char **subscribed;     /* channels subscribed by saga_node_start (it may be called again) */
  size_t nsubscribed;
  uv_idle_t idle;
  int idle_active;
  void (*flush)(saga_node *n);       /* run by the idle handle (set by node.c) */
  void (*finish_close)(saga_node *n); /* the transport closed (set by node.c) */
  uv_async_t async;
  uv_mutex_t post_mu;
  saga__post *posts;
  int pending_closes;
  void (*close_cb)(void *);
  void *close_arg;

  saga__timer deadline_timer; /* earliest saga deadline (batch.c) */
  saga__timer retry_timer;    /* flush again after a failed commit (batch.c) */
  saga__timer resend_timer;   /* relay.c */
  saga__timer purge_timer;    /* node.c */
  saga__timer opreq_timer;    /* operator.c: looks for operator requests */
  int opreq_queued;           /* operator.c: requests queued, not yet through a transaction */
  int timers_due;
  int due_failed;         /* timers of sagas that failed in the last flush (batch.c) */
  uint64_t relay_hwm;     /* highest outbox id handed to the transport */
  uint64_t resend_cursor; /* resends resume after this id (0 = from the oldest) */

  saga__queue queues[2];
  int cur; /* queue receiving new work */
  saga__buf sent_ids;  /* confirmed outbox ids of a transaction (uint64_t each) */
  saga__buf input_buf; /* saga_start: the encoded input */
  saga__buf unsendable_channel, unsendable_body; /* relay.c: a row being dead-lettered */
  saga__buf stuck_warned; /* relay.c: channels warned about (NUL-separated) */
  saga__waiter *waiters;  /* events.c: saga_node_watch */
  size_t nwaiters, waiters_cap, waiters_ready;
  uint64_t outbox_checked; /* relay.c: time of the last per-channel check */
  uint64_t refusals_logged_at, refusals_unlogged; /* relay.c: send refusals, rate-limited */
};

/* queue.c */
/* Reserves one item; copies up to three byte ranges into the arena. NULL when out of memory. */
saga__work *saga__queue_push(saga_node *n, saga__work_type type, const void *b1, size_t l1,
                             const void *b2, size_t l2, const void *b3, size_t l3);
const char *saga__queue_str(const saga__queue *q, size_t off);
/* Makes the loop run n->flush on its next turn. */
void saga__queue_schedule(saga_node *n);

/* batch.c */
void saga__batch_init(saga_node *n);
/* Runs everything queued, in transactions of at most batch_max items. */
void saga__batch_flush(saga_node *n);
/* Reports the items of a queue the node will never run (closing) to their callers. */
void saga__batch_fail(saga_node *n, saga__queue *q, int status);
/* Arms the deadline timer at the earliest due saga. */
void saga__batch_arm_deadline(saga_node *n);
/* Recovery at start: one transaction re-arming parked sagas. Returns the number missing a
 * definition, or an error. */
int saga__batch_recover(saga_node *n);
void saga__batch_stop(saga_node *n);

/* relay.c */
void saga__relay_init(saga_node *n);
/* Publishes the outbox rows committed since the last call. */
void saga__relay_fresh(saga_node *n);
/* Inside a transaction: dead-letters outbox row id that send() refused for good (code). */
int saga__relay_unsendable(saga_node *n, uint64_t id, int code);
void saga__relay_stop(saga_node *n);

/* host.c */
/* Checks and copies t's methods, plugs the node in as its host, opens it. */
int saga__host_attach(saga_node *n, saga_transport *t, char *err, size_t errlen);
/* Whether a message to channel can ever leave through the transport (participant.c). */
int saga__host_can_send(void *node, const char *channel);

/* operator.c */
void saga__operator_init(saga_node *n);
/* At saga_node_start(): records the registered definitions, queues the pending operator
 * requests and starts looking for new ones. */
int saga__operator_start(saga_node *n);
void saga__operator_stop(saga_node *n);
/* Inside a transaction: carries out operator request id and writes its result. Returns < 0
 * only when it should be tried again (the database failed). */
int saga__operator_apply(saga_node *n, int64_t id);
/* After the transaction that ran request id (status < 0: it failed, it stays pending). */
void saga__operator_done(saga_node *n, int64_t id, int status);

/* events.c */
/* Hands the events received from other nodes to the subscriber: after the commit and before
 * their deliveries are acknowledged, so that a crash in between redelivers them (at least
 * once). */
void saga__events_dispatch_remote(saga_node *n);
/* Hands the events of the committed transaction to the application (remote ones first, if
 * not yet), then forgets them. */
void saga__events_dispatch(saga_node *n);
/* Hands the spans of the committed transaction to cfg.on_span, then forgets them (also
 * called by saga__events_dispatch). */
void saga__spans_dispatch(saga_node *n);
/* Tells the watchers whose saga reached a terminal state (events.c). */
void saga__waiters_fire(saga_node *n);
/* Tells every watcher left that the node closes (SAGA_ECLOSED), and frees the list. */
void saga__waiters_close(saga_node *n);

#endif /* SAGA_SRC_CORE_RUNTIME_H */
