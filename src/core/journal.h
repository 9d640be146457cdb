/*
 * The journal: what one transaction records besides the instance rows — its history rows, the
 * events to hand to the application after the commit, outbox rows (with ids that never
 * repeat) and dead letters. The engine, the participant and the node write through it; it
 * writes through the store and calls nothing else of the core.
 */
#ifndef SAGA_SRC_CORE_JOURNAL_H
#define SAGA_SRC_CORE_JOURNAL_H

#include "core.h"

/* An event buffered until the commit: a transition of this node's saga, or (remote_off != 0)
 * an event message received from another node. */
typedef struct saga__event_rec {
  saga_event_type type;
  uint64_t remote_off; /* remote event: offset+1 of its bytes in remote_events */
  char saga_id[40];
  const saga__def *def;
  int step;
  uint32_t attempt;
  saga_state state;
  size_t detail_off; /* in event_text: detail, NUL, definition name, NUL */
  uint64_t at_ms;
  char traceparent[SAGA__TRACEPARENT_SIZE]; /* the saga's context */
} saga__event_rec;

/* A span's start or end buffered until the commit (saga/trace.h). */
typedef struct saga__span_rec {
  saga_span_event event;
  saga_span_kind kind;
  saga_span_status status;
  char trace_id[33], span_id[17], parent_id[17];
  uint8_t flags;
  char saga_id[40];
  int step;
  uint32_t attempt;
  uint64_t start_ns, end_ns;
  size_t text_off; /* in span_text: name, NUL, definition, NUL, error, NUL */
} saga__span_rec;

typedef struct saga__journal {
  saga__env *env;
  int keep_events;            /* someone listens: buffer transitions for after the commit */
  int keep_remote;            /* someone subscribed to other nodes' events */
  const char *event_channel;  /* also publish transitions there (NULL = no) */
  saga__event_rec *events;
  size_t nevents, events_cap;
  saga__buf event_text;
  saga__buf remote_events;    /* received event messages: u64 length, bytes */
  saga__buf event_buf;        /* encoding of a published event */
  saga__buf hist, hist_text;  /* history rows of the transaction (saga__hist_rec each) */
  saga__buf step_stats;       /* per-step metric updates of the transaction (below) */
  int keep_spans;             /* someone listens (cfg.on_span): buffer spans */
  saga__span_rec *spans;
  size_t nspans, spans_cap;
  saga__buf span_text;
  uint64_t outbox_next;       /* next outbox id */
  int outbox_next_valid;      /* outbox_next checked against the store in this transaction */
  int outbox_used;            /* ids taken in this transaction (the mark to update) */
  char dead_reason[640];      /* the reason of the last dead letter written */
} saga__journal;

/* Where the journal stood: rewinding to it forgets what was recorded since. */
typedef struct saga__journal_mark {
  size_t nevents, event_text, remote, hist, hist_text, step_stats, nspans, span_text;
} saga__journal_mark;

/* One update of a per-step metric, kept until the commit: slot and kind are the engine's
 * (engine.c), value a latency in ms or an attempt number. */
typedef struct saga__step_stat_rec {
  uint32_t slot, kind;
  uint64_t value;
} saga__step_stat_rec;

void saga__journal_init(saga__journal *j, saga__env *env);
void saga__journal_free(saga__journal *j);
/* After every BEGIN: forgets the history and step metric updates of an earlier try and
 * re-reads the outbox mark. */
void saga__journal_begin(saga__journal *j);
/* Before every COMMIT: writes the buffered history rows (emptied either way) and the outbox
 * mark. */
int saga__journal_finish(saga__journal *j);
saga__journal_mark saga__journal_mark_get(const saga__journal *j);
void saga__journal_rewind(saga__journal *j, const saga__journal_mark *m);
/* Forgets the buffered events and spans (after they were dispatched, or after a
 * rollback). */
void saga__journal_clear_events(saga__journal *j);
/* Buffers a span's start or end (nothing when nobody listens): r without its text, which is
 * copied from name, definition and error. */
int saga__journal_span(saga__journal *j, const saga__span_rec *r, const char *name,
                       const char *definition, const char *error);

/* The saga's trace: its trace id and flags, and as span_id the caller's span ("" none). */
void saga__inst_trace(const saga__inst *i, saga__trace *t);
/* The saga's own trace context, "00-<trace id>-<saga span>-<flags>" ("" when its id cannot
 * be a trace id: a row edited by hand). */
void saga__inst_traceparent(const saga__inst *i, char out[SAGA__TRACEPARENT_SIZE]);
/* Records a transition of inst (history row, event, published event); bumps inst->hseq. */
int saga__journal_event(saga__journal *j, saga_event_type type, saga__inst *inst, int step,
                        uint32_t attempt, const char *detail);
/* The type and detail of inst's latest history row (seq inst->hseq), recorded in this
 * transaction or before: *type 0 when it has none. detail gets the text (NUL-terminated). */
int saga__journal_last(saga__journal *j, const saga__inst *inst, int *type, saga__buf *detail);
/* Records an update of a per-step metric, applied by the engine after the commit
 * (saga__engine_stats_commit); forgotten with the rest on a rewind or a rollback. SAGA_OK or
 * SAGA_ENOMEM (errmsg set). */
int saga__journal_step_stat(saga__journal *j, uint32_t slot, uint32_t kind, uint64_t value);
/* Keeps an event message from another node for dispatch after the commit (dropped when
 * nobody subscribed). */
int saga__journal_remote_event(saga__journal *j, const void *data, size_t len);
/* Inserts an outbox row. */
int saga__journal_outbox(saga__journal *j, const char *channel, const char *saga_id,
                         const void *body, size_t len);
int saga__journal_dead_letter(saga__journal *j, const char *channel, const char *msg_id,
                              const char *reason, const void *body, size_t len);

#endif /* SAGA_SRC_CORE_JOURNAL_H */
