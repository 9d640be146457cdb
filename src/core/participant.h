/*
 * The participant: the handlers a node serves and the decision for each command received —
 * handled at most once per message id (inbox), at most once per saga step across attempts
 * (step record), never after its compensation (tombstone). It asks the store, the journal
 * (reply rows, dead letters) and, for saga_tx_start from a handler, the engine.
 */
#ifndef SAGA_SRC_CORE_PARTICIPANT_H
#define SAGA_SRC_CORE_PARTICIPANT_H

#include "engine.h"
#include "saga/lock.h"

#define SAGA__BROKE_SLOTS 64

typedef struct saga__handler {
  char *channel;
  char *command;
  saga_handler fn;
  void *arg;
} saga__handler;

struct saga__domain;

typedef struct saga__participant {
  saga__env *env;
  saga__journal *journal;
  saga__engine *engine;
  /* Whether a reply to channel can ever be sent (NULL = every channel can). */
  int (*can_send)(void *arg, const char *channel);
  void *can_send_arg;
  uint32_t max_deliveries; /* transient handler failures before a command is dead-lettered */
  saga__handler *handlers;
  size_t nhandlers;
  int64_t undone; /* rows handlers wrote and rolled back since the caller last zeroed it */
  /* Transient handler failures per message id (hash), direct-mapped. */
  struct {
    uint64_t hash;
    uint32_t count;
  } transient[256];
  /* Commands whose handler ended the node's transaction (hash of the message id): never run
   * again. tx_ended: that happened in the current transaction (the node logs it as such). */
  uint64_t broke[SAGA__BROKE_SLOTS];
  int tx_ended;
  /* The trace context of the command being handled (saga/trace.h): its traceparent when
   * well-formed, else the saga's own trace without a parent; and the handler's span, when
   * a handler runs. */
  saga__trace in;
  int handler_ran;
  char handler_span[17];
  char handler_tp[SAGA__TRACEPARENT_SIZE]; /* the handler run's context */
  uint64_t handler_start_ns, handler_end_ns;
  saga__buf reply; /* the handler's reply data, encoded */
  saga__buf prev;  /* the step record's reply */
  saga__buf enc;   /* the reply envelope */
  saga__buf dup_to, dup; /* a duplicate's recorded reply */
  struct saga__domain *domain; /* saga_tx_publish() from a handler (domain.c); set by the node */
  /* Why the last saga_lock_acquire() of the running handler found the record held: the
   * refusal's reason when the handler returns SAGA_ELOCKED. */
  char lock_reason[SAGA_LOCK_TYPE_MAX + SAGA_LOCK_ID_MAX + 128];
} saga__participant;

/* The transaction a handler, an event handler or a saga_node_transact() function runs in:
 * the participant, and the command it serves (NULL outside a participant handler). */
struct saga_tx {
  saga__participant *p;
  const saga_envelope *env;
};

void saga__participant_init(saga__participant *p, saga__env *env, saga__journal *j,
                            saga__engine *e, uint32_t max_deliveries);
void saga__participant_free(saga__participant *p);
int saga__participant_add(saga__participant *p, const char *channel, const char *command,
                          saga_handler fn, void *arg);
const saga__handler *saga__participant_find(const saga__participant *p, const char *channel,
                                            const char *command);
/* Handles one command received on channel (raw/raw_len: the message as received, kept in
 * dead letters). Inside the caller's transaction. */
int saga__participant_command(saga__participant *p, const char *channel,
                              const saga_envelope *env, const void *raw, size_t raw_len);

#endif /* SAGA_SRC_CORE_PARTICIPANT_H */
