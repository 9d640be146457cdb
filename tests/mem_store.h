/*
 * An in-memory implementation of the core's storage interface (src/store/store.h), for unit
 * tests of the engine, the journal and the participant without a database.
 *
 * It behaves like the SQLite backend where the core can tell: unique ids and idempotency
 * keys (SAGA_EEXIST), history rows unique per (saga, seq), outbox ids above a mark that never
 * goes down, due instances earliest deadline first, parked instances never due. Transactions
 * are honest: begin copies the whole state and rollback puts the copy back; a savepoint is
 * one more copy. writes() counts every row inserted, updated or deleted, undone or not.
 * Deviations: savepoints need an open transaction; native() is NULL (no handle for business
 * data); there is no background work (stop() returns 0) and no counters to add (stats()).
 *
 * Test accessors read the state directly (outside any visitor), and a fault switch makes the
 * next calls of one method fail with a chosen code, doing nothing.
 */
#ifndef SAGA_TEST_MEM_STORE_H
#define SAGA_TEST_MEM_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "store/store.h"

/* One value per method of saga__store_methods that can fail. */
typedef enum mem_store_op {
  MEM_OP_BEGIN,
  MEM_OP_COMMIT,
  MEM_OP_ROLLBACK,
  MEM_OP_SAVEPOINT,
  MEM_OP_RELEASE,
  MEM_OP_ROLLBACK_TO,
  MEM_OP_INST_LOAD,
  MEM_OP_INST_FIND_KEY,
  MEM_OP_INST_INSERT,
  MEM_OP_INST_SAVE,
  MEM_OP_INST_DUE,
  MEM_OP_INST_NEXT_DUE,
  MEM_OP_INST_INFLIGHT,
  MEM_OP_INST_UNPARK,
  MEM_OP_INST_COUNT,
  MEM_OP_HIST_INSERT,
  MEM_OP_OUTBOX_MAX,
  MEM_OP_OUTBOX_MARK,
  MEM_OP_OUTBOX_INSERT,
  MEM_OP_OUTBOX_DELETE,
  MEM_OP_OUTBOX_AFTER,
  MEM_OP_OUTBOX_STALE,
  MEM_OP_OUTBOX_GET,
  MEM_OP_OUTBOX_COUNT,
  MEM_OP_INBOX_GET,
  MEM_OP_INBOX_INSERT,
  MEM_OP_PSTEP_GET,
  MEM_OP_PSTEP_PUT,
  MEM_OP_DEAD_INSERT,
  MEM_OP_FINISHED_BEFORE,
  MEM_OP_FINISHED_BEYOND,
  MEM_OP_PURGE_SAGA,
  MEM_OP_SWEEP,
  MEM_OP_REPLY_KEY,
  MEM_OP__COUNT
} mem_store_op;

/* One history row as stored. detail is borrowed from the store (valid until it changes). */
typedef struct mem_store_hist {
  int64_t seq;
  uint64_t at_ms;
  int type, step;
  uint32_t attempt;
  const char *detail;
} mem_store_hist;

/* A new, empty store. SAGA_OK or SAGA_ENOMEM. Free it with s->m->close(s). */
int mem_store_new(saga__store **out);

/* The name of a method, e.g. "inst_save". */
const char *mem_store_op_name(mem_store_op op);

/* Fault switch: after letting `skip` more calls of op through, the next `count` calls fail
 * with `code` (a SAGA_E* code) and change nothing. count 0 turns the switch off. */
void mem_store_fail(saga__store *s, mem_store_op op, unsigned skip, unsigned count, int code);
/* Turns every switch off. */
void mem_store_fail_clear(saga__store *s);
/* Calls of op so far, failed ones included. */
unsigned long mem_store_calls(const saga__store *s, mem_store_op op);

/* ---- outbox ---- */
size_t mem_store_outbox_rows(const saga__store *s);
/* Row k (0 = lowest id) of the outbox. Pointers borrowed until the store changes. SAGA_OK or
 * SAGA_ENOTFOUND. Any out pointer may be NULL. */
int mem_store_outbox_row(const saga__store *s, size_t k, uint64_t *id, const char **channel,
                         const char **saga_id, const void **body, size_t *len);
/* Deletes every outbox row (the mark stays: ids keep growing). Not counted by writes();
 * call it outside a transaction. */
void mem_store_outbox_clear(saga__store *s);
/* The outbox mark (largest id recorded as used). */
uint64_t mem_store_outbox_mark(const saga__store *s);

/* ---- history ---- */
/* History rows of saga_id (NULL = of every saga). */
size_t mem_store_history_rows(const saga__store *s, const char *saga_id);
/* Row k of saga_id's history, in the order written. SAGA_OK or SAGA_ENOTFOUND. */
int mem_store_history_row(const saga__store *s, const char *saga_id, size_t k, mem_store_hist *out);
/* The event types of saga_id's history rows from row `from` on, into types (at most max);
 * returns how many rows there are from `from` on (may exceed max). */
size_t mem_store_history_types(const saga__store *s, const char *saga_id, size_t from, int *types,
                               size_t max);

/* ---- other tables ---- */
size_t mem_store_dead_letters(const saga__store *s);
/* Dead letter k (0 = oldest). SAGA_OK or SAGA_ENOTFOUND. Out pointers may be NULL. */
int mem_store_dead_letter(const saga__store *s, size_t k, const char **channel, const char **msg_id,
                          const char **reason);
size_t mem_store_instances(const saga__store *s);
size_t mem_store_inbox_rows(const saga__store *s);
size_t mem_store_pstep_rows(const saga__store *s);

/* A hash of the whole stored state (every table and the outbox mark; not the counters):
 * equal before and after means nothing was changed. */
uint64_t mem_store_digest(const saga__store *s);

#endif /* SAGA_TEST_MEM_STORE_H */
