/*
 * Retention: purges finished sagas (with their history), participant inbox records and
 * participant step records by age or count, in small batches.
 *
 * A pass is one short transaction of its own, run from the purge timer between the node's
 * work transactions (never inside one). Each kind deletes at most `batch` rows per pass; a
 * pass that filled a batch re-arms the timer for the next loop turn, otherwise it waits
 * `interval_ms`. Finished sagas are found through the partial index saga_instance_done.
 * Inbox and step records have no age index (it would cost an index write on every step), so
 * a cursor sweeps each table in key order, `batch` keys per pass; a full round takes
 * (rows / batch) passes, which the age limits (days by default) leave plenty of room for.
 */
#include <inttypes.h>
#include <string.h>

#include "core.h"

static void purge_timer_cb(saga__timer *t);

void saga__retention_defaults(saga_retention *r) {
  memset(r, 0, sizeof *r);
  r->finished_ms = UINT64_C(7) * 24 * 3600 * 1000;
  r->inbox_ms = UINT64_C(30) * 24 * 3600 * 1000;
  r->batch = 1000;
  r->interval_ms = 60000;
}

void saga__retention_init(saga_node *n, const saga_node_config *cfg) {
  saga_retention *r = &n->retention;
  if (cfg->struct_version >= 2)
    *r = cfg->retention;
  else
    saga__retention_defaults(r); /* a version-1 config has no retention field */
  if (r->batch == 0) r->batch = 1000;
  if (r->interval_ms == 0) r->interval_ms = 60000;
  saga__buf_init(&n->purge_ids, n->alloc);
  for (int i = 0; i < 2; i++) {
    saga__buf_init(&n->sweeps[i].key, n->alloc);
    n->sweeps[i].key_step = -1;
  }
  saga__timer_init(&n->purge_timer, n->clock, purge_timer_cb, n);
}

static int enabled(const saga_node *n) {
  const saga_retention *r = &n->retention;
  return r->finished_ms != 0 || r->max_finished != 0 || r->inbox_ms != 0;
}

void saga__retention_start(saga_node *n) {
  if (enabled(n)) saga__timer_arm(&n->purge_timer, saga__node_now(n) + n->retention.interval_ms);
}

void saga__retention_stop(saga_node *n) { saga__timer_stop(&n->purge_timer); }

void saga__retention_free(saga_node *n) {
  saga__buf_free(&n->purge_ids);
  for (int i = 0; i < 2; i++) saga__buf_free(&n->sweeps[i].key);
}

/* Collects the ids a SELECT of ST_PURGE_AGED / ST_PURGE_EXCESS returns into purge_ids. */
static int collect_ids(saga_node *n, sqlite3_stmt *st, size_t *count) {
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const char *id = (const char *)sqlite3_column_text(st, 0);
    if (id == NULL) continue;
    if (saga__buf_append(&n->purge_ids, id, strlen(id) + 1) != SAGA_OK) {
      sqlite3_reset(st);
      return SAGA_ENOMEM;
    }
    (*count)++;
  }
  sqlite3_reset(st);
  return rc == SQLITE_DONE ? SAGA_OK : saga__store_err(rc);
}

/* Deletes the collected sagas and their history. */
static int delete_sagas(saga_node *n, uint64_t *deleted) {
  const char *p = (const char *)n->purge_ids.data, *end = p + n->purge_ids.len;
  for (; p < end; p += strlen(p) + 1) {
    sqlite3_stmt *st = saga__store_stmt(&n->store, ST_PURGE_INSTANCE);
    sqlite3_bind_text(st, 1, p, -1, SQLITE_STATIC);
    int rc = saga__store_exec(&n->store, ST_PURGE_INSTANCE);
    if (rc != SAGA_OK) return rc;
    if (sqlite3_changes(n->store.db) == 0) continue; /* already gone (listed twice) */
    st = saga__store_stmt(&n->store, ST_PURGE_HISTORY);
    sqlite3_bind_text(st, 1, p, -1, SQLITE_STATIC);
    rc = saga__store_exec(&n->store, ST_PURGE_HISTORY);
    if (rc != SAGA_OK) return rc;
    (*deleted)++;
  }
  return SAGA_OK;
}

/* Binds a named parameter if the statement has it (the inbox's keys have no step part). */
static void bind_text(sqlite3_stmt *st, const char *name, const char *v) {
  int i = sqlite3_bind_parameter_index(st, name);
  if (i > 0) sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
}
static void bind_i64(sqlite3_stmt *st, const char *name, int64_t v) {
  int i = sqlite3_bind_parameter_index(st, name);
  if (i > 0) sqlite3_bind_int64(st, i, v);
}

typedef struct sweep_sql {
  saga__stmt_id edge, range, tail;
} sweep_sql;

static const sweep_sql sweep_inbox = {ST_PURGE_INBOX_EDGE, ST_PURGE_INBOX_RANGE,
                                      ST_PURGE_INBOX_TAIL};
static const sweep_sql sweep_steps = {ST_PURGE_PSTEP_EDGE, ST_PURGE_PSTEP_RANGE,
                                      ST_PURGE_PSTEP_TAIL};

/* One chunk of a sweep: deletes the rows older than cutoff among the next `batch` keys
 * after the cursor, and moves the cursor (back to the start after the last key). */
static int sweep(saga_node *n, const sweep_sql *q, saga__sweep *c, uint64_t cutoff,
                 uint64_t *deleted, int *more) {
  const saga_retention *r = &n->retention;
  static const char empty = '\0';
  const char *from = c->key.len ? (const char *)c->key.data : &empty;
  sqlite3_stmt *st = saga__store_stmt(&n->store, q->edge);
  bind_text(st, ":from", from);
  bind_i64(st, ":from_step", c->key_step);
  bind_i64(st, ":skip", (int64_t)r->batch - 1);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) {
    /* A full chunk: delete up to its last key, then move the cursor there. */
    const char *edge = (const char *)sqlite3_column_text(st, 0);
    int64_t edge_step = sqlite3_column_int64(st, 1);
    saga__buf key;
    saga__buf_init(&key, n->alloc);
    if (edge == NULL || saga__buf_append(&key, edge, strlen(edge) + 1) != SAGA_OK) {
      sqlite3_reset(st);
      saga__buf_free(&key);
      return edge == NULL ? SAGA_ESTORE : SAGA_ENOMEM;
    }
    sqlite3_reset(st);
    sqlite3_stmt *del = saga__store_stmt(&n->store, q->range);
    bind_text(del, ":from", from);
    bind_i64(del, ":from_step", c->key_step);
    bind_text(del, ":to", (const char *)key.data);
    bind_i64(del, ":to_step", edge_step);
    bind_i64(del, ":cutoff", (int64_t)cutoff);
    rc = saga__store_exec(&n->store, q->range);
    if (rc == SAGA_OK) {
      *deleted += (uint64_t)sqlite3_changes(n->store.db);
      saga__buf_reset(&c->key);
      rc = saga__buf_append(&c->key, key.data, key.len);
      c->key_step = edge_step;
      *more = 1;
    }
    saga__buf_free(&key);
    return rc;
  }
  sqlite3_reset(st);
  if (rc != SQLITE_DONE) return saga__store_err(rc);
  /* Fewer than a chunk left: delete to the end and start over next time. */
  sqlite3_stmt *del = saga__store_stmt(&n->store, q->tail);
  bind_text(del, ":from", from);
  bind_i64(del, ":from_step", c->key_step);
  bind_i64(del, ":cutoff", (int64_t)cutoff);
  rc = saga__store_exec(&n->store, q->tail);
  if (rc != SAGA_OK) return rc;
  *deleted += (uint64_t)sqlite3_changes(n->store.db);
  saga__buf_reset(&c->key);
  c->key_step = -1;
  return SAGA_OK;
}

/* One purge pass in its own transaction. *more: a batch was filled, continue soon. */
static int purge_pass(saga_node *n, int *more) {
  const saga_retention *r = &n->retention;
  uint64_t now = saga__node_now(n);
  uint64_t sagas = 0, inbox = 0, steps = 0;
  *more = 0;
  saga__node_tx_begun(n);
  int rc = saga__store_exec(&n->store, ST_BEGIN);
  if (rc != SAGA_OK) return saga__node_db_fail(n, rc, "starting a purge");
  saga__buf_reset(&n->purge_ids);
  size_t listed = 0;
  if (r->finished_ms != 0 && now > r->finished_ms) {
    sqlite3_stmt *st = saga__store_stmt(&n->store, ST_PURGE_AGED);
    sqlite3_bind_int64(st, 1, (sqlite3_int64)(now - r->finished_ms));
    sqlite3_bind_int64(st, 2, r->batch);
    rc = collect_ids(n, st, &listed);
  }
  if (rc == SAGA_OK && r->max_finished != 0 && listed < r->batch) {
    sqlite3_stmt *st = saga__store_stmt(&n->store, ST_PURGE_EXCESS);
    sqlite3_bind_int64(st, 1, (sqlite3_int64)(r->max_finished > INT64_MAX ? INT64_MAX
                                                                           : r->max_finished));
    sqlite3_bind_int64(st, 2, (sqlite3_int64)(r->batch - listed));
    rc = collect_ids(n, st, &listed);
  }
  if (rc == SAGA_OK) rc = delete_sagas(n, &sagas);
  if (listed >= r->batch) *more = 1;
  if (rc == SAGA_OK && r->inbox_ms != 0 && now > r->inbox_ms) {
    uint64_t cutoff = now - r->inbox_ms;
    rc = sweep(n, &sweep_inbox, &n->sweeps[0], cutoff, &inbox, more);
    if (rc == SAGA_OK) rc = sweep(n, &sweep_steps, &n->sweeps[1], cutoff, &steps, more);
  }
  SAGA__HOOK(n, "purge.before_commit");
  if (rc == SAGA_OK) rc = saga__store_exec(&n->store, ST_COMMIT);
  if (rc != SAGA_OK) {
    if (!sqlite3_get_autocommit(n->store.db)) saga__store_exec(&n->store, ST_ROLLBACK);
    *more = 0;
    return saga__node_db_fail(n, rc, "purging finished work");
  }
  n->stats.purged_sagas += sagas;
  n->stats.purged_inbox += inbox;
  n->stats.purged_steps += steps;
  n->stats.purge_passes++;
  if (sagas + inbox + steps > 0)
    saga__node_log(n, SAGA_LOG_DEBUG,
                   "purged %" PRIu64 " sagas, %" PRIu64 " inbox and %" PRIu64 " step records",
                   sagas, inbox, steps);
  return SAGA_OK;
}

static void purge_timer_cb(saga__timer *t) {
  saga_node *n = t->data;
  if (n->closing || !n->started) return;
  uint64_t now = saga__node_now(n);
  if (n->in_flush) { /* never inside the node's own transaction */
    saga__timer_arm(&n->purge_timer, now);
    return;
  }
  int more = 0;
  int rc = purge_pass(n, &more);
  if (rc != SAGA_OK)
    saga__node_log(n, SAGA_LOG_WARN, "purge failed, trying again later: %s", n->errmsg);
  /* A filled batch continues on the next loop turn; work that arrived meanwhile goes first
   * (timers that are due run after the loop's pending callbacks). */
  saga__timer_arm(&n->purge_timer, more ? now : now + n->retention.interval_ms);
}
