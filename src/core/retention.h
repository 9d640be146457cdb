/*
 * Retention: purges finished sagas (with their history), participant inbox records and step
 * records by age or count, in small batches, each pass one short transaction of its own.
 */
#ifndef SAGA_SRC_CORE_RETENTION_H
#define SAGA_SRC_CORE_RETENTION_H

#include "core.h"

typedef struct saga__retention {
  saga__env *env;
  saga_retention cfg;
  saga__buf ids;          /* the sagas a pass deletes (NUL-separated) */
  saga__sweep sweeps[2];  /* cursors: inbox records, step records */
  uint64_t dead_ms, max_dead; /* dead letters: age and count kept (0 = no limit) */
} saga__retention;

/* The documented defaults (7 days, 30 days, batches of 1000, every minute). */
void saga__retention_defaults(saga_retention *r);
/* cfg NULL: the defaults (a config without a retention field). */
void saga__retention_init(saga__retention *r, saga__env *env, const saga_retention *cfg);
void saga__retention_free(saga__retention *r);
/* Whether anything is ever purged. */
int saga__retention_enabled(const saga__retention *r);
/* One pass in its own transaction (never inside another). *more: a batch was filled, run
 * again soon. */
int saga__retention_pass(saga__retention *r, int *more);

#endif /* SAGA_SRC_CORE_RETENTION_H */
