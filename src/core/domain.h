/*
 * Domain events (include/saga/domain.h): publishing from any transaction of the node through
 * the journal's outbox (saga_tx_publish), application transactions (saga_node_transact), and
 * the subscriber's decision for each event received — at most once per event id (inbox),
 * in sequence order per (publisher stream, channel, key) (cursor), failures retried then
 * dead-lettered. It asks the store and the journal, and runs handlers in a saga_tx of the
 * participant (so that they can start sagas as participant handlers do).
 */
#ifndef SAGA_SRC_CORE_DOMAIN_H
#define SAGA_SRC_CORE_DOMAIN_H

#include "participant.h"
#include "saga/domain.h"

typedef struct saga__subscriber {
  char *channel;
  char *name; /* NULL: every name without a handler of its own */
  saga_event_handler fn;
  void *arg;
} saga__subscriber;

typedef struct saga__domain {
  saga__env *env;
  saga__journal *journal;
  saga__participant *part;
  const char *source;    /* the node's name (the "source" header) */
  char stream[17];       /* the database's event stream id, 16 hex digits ("" = unknown) */
  uint32_t max_deliveries; /* transient handler failures before an event is dead-lettered */
  saga__subscriber *subs;
  size_t nsubs;
  /* Transient handler failures per event id (hash), direct-mapped. */
  struct {
    uint64_t hash;
    uint32_t count;
  } transient[256];
  saga__buf enc; /* an event being published, encoded */
} saga__domain;

void saga__domain_init(saga__domain *d, saga__env *env, saga__journal *j, saga__participant *p,
                       const char *source, uint32_t max_deliveries);
void saga__domain_free(saga__domain *d);
/* Reads (making it on first use) the database's stream id: outside a transaction, at open.
 * A store without domain events leaves it unknown (publishing is then refused). */
int saga__domain_open(saga__domain *d);
int saga__domain_subscribe(saga__domain *d, const char *channel, const char *name,
                           saga_event_handler fn, void *arg);
/* Whether a handler is subscribed to events on channel. */
int saga__domain_has_channel(const saga__domain *d, const char *channel);
/* Handles a domain event received on channel (raw/raw_len: the bytes as received, kept in
 * dead letters), inside the caller's transaction. *ack is cleared when the delivery must not
 * be acknowledged (its key's previous event has not been handled yet). replay: an operator's
 * replay of a dead letter, handled whatever the key's cursor says. Returns < 0 when the item
 * must fail (a store error, a transient handler failure: delivered again). */
int saga__domain_event(saga__domain *d, const char *channel, const saga_envelope *env,
                       const void *raw, size_t raw_len, int replay, int *ack);
/* Runs fn(tx, arg) in a savepoint of the caller's transaction (saga_node_transact). */
int saga__domain_transact(saga__domain *d, saga_transact_fn fn, void *arg);

#endif /* SAGA_SRC_CORE_DOMAIN_H */
