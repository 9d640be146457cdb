/*
 * The SQLite backend's part for operators' tools: definitions recorded as registered, operator
 * requests (written by a tool such as sagactl, carried out by the node), and dead letters read
 * back and deleted for a replay or a purge. These statements run rarely (at saga_node_start(),
 * on a request): prepared per call, not kept.
 */
#include <stdio.h>
#include <string.h>

#include "sqlite_store.h"

#define SQ(s) ((sq_store *)(void *)(s))

/* Prepares sql, or returns the mapped error with *st NULL. */
static int prep(sq_store *s, const char *sql, sqlite3_stmt **st) {
  *st = NULL;
  return saga__sq_err(sqlite3_prepare_v2(s->db, sql, -1, st, NULL));
}

/* Steps a statement that returns no rows and finalizes it. */
static int run(sqlite3_stmt *st) {
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? SAGA_OK : saga__sq_err(rc);
}

static void text(sqlite3_stmt *st, int col, const char *v) {
  sqlite3_bind_text(st, col, v != NULL ? v : "", -1, SQLITE_STATIC);
}

/* Copies column col as text into dst (cap bytes, NUL-terminated, cut if longer). */
static void copy_text(char *dst, size_t cap, sqlite3_stmt *st, int col) {
  const unsigned char *v = sqlite3_column_text(st, col);
  snprintf(dst, cap, "%s", v != NULL ? (const char *)v : "");
}

static int append_col(saga__buf *b, sqlite3_stmt *st, int col, int nul) {
  const void *v = sqlite3_column_blob(st, col);
  size_t n = (size_t)sqlite3_column_bytes(st, col);
  int rc = n > 0 ? saga__buf_append(b, v, n) : SAGA_OK;
  if (rc == SAGA_OK && nul) rc = saga__buf_append(b, "", 1);
  return rc;
}

int saga__sq_def_put(saga__store *ss, const char *name, uint32_t version, uint32_t deadline_ms,
                     const saga__def_step_rec *steps, size_t nsteps, uint64_t now) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st;
  int rc = prep(s, "INSERT OR REPLACE INTO saga_definition(name, version, nsteps, deadline_ms,"
                   " registered_ms) VALUES(?1, ?2, ?3, ?4, ?5)", &st);
  if (rc != SAGA_OK) return rc;
  text(st, 1, name);
  sqlite3_bind_int64(st, 2, version);
  sqlite3_bind_int64(st, 3, (sqlite3_int64)nsteps);
  sqlite3_bind_int64(st, 4, deadline_ms);
  sqlite3_bind_int64(st, 5, (sqlite3_int64)now);
  if ((rc = run(st)) != SAGA_OK) return rc;
  /* A version registered again with fewer steps keeps none of the old ones. */
  if ((rc = prep(s, "DELETE FROM saga_definition_step WHERE def_name = ?1 AND def_version = ?2",
                 &st)) != SAGA_OK)
    return rc;
  text(st, 1, name);
  sqlite3_bind_int64(st, 2, version);
  if ((rc = run(st)) != SAGA_OK) return rc;
  if ((rc = prep(s, "INSERT INTO saga_definition_step(def_name, def_version, step, name, kind,"
                    " channel, action, compensation, local, has_local_compensation,"
                    " max_attempts, backoff_ms, multiplier, cap_ms, jitter,"
                    " retry_before_compensate, timeout_ms, comp_max_attempts, comp_backoff_ms,"
                    " comp_multiplier, comp_cap_ms, comp_jitter) VALUES(?1, ?2, ?3, ?4, ?5, ?6,"
                    " ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21,"
                    " ?22)", &st)) != SAGA_OK)
    return rc;
  for (size_t k = 0; k < nsteps && rc == SAGA_OK; k++) {
    const saga__def_step_rec *p = &steps[k];
    sqlite3_reset(st);
    text(st, 1, name);
    sqlite3_bind_int64(st, 2, version);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)k);
    text(st, 4, p->name);
    sqlite3_bind_int(st, 5, p->kind);
    text(st, 6, p->channel);
    text(st, 7, p->action);
    text(st, 8, p->compensation);
    sqlite3_bind_int(st, 9, p->local);
    sqlite3_bind_int(st, 10, p->local_compensation);
    sqlite3_bind_int64(st, 11, p->retry.max_attempts);
    sqlite3_bind_int64(st, 12, p->retry.backoff_ms);
    sqlite3_bind_double(st, 13, p->retry.multiplier);
    sqlite3_bind_int64(st, 14, p->retry.cap_ms);
    sqlite3_bind_double(st, 15, p->retry.jitter);
    sqlite3_bind_int(st, 16, p->retry.retry_before_compensate);
    sqlite3_bind_int64(st, 17, p->timeout_ms);
    sqlite3_bind_int64(st, 18, p->comp_retry.max_attempts);
    sqlite3_bind_int64(st, 19, p->comp_retry.backoff_ms);
    sqlite3_bind_double(st, 20, p->comp_retry.multiplier);
    sqlite3_bind_int64(st, 21, p->comp_retry.cap_ms);
    sqlite3_bind_double(st, 22, p->comp_retry.jitter);
    int src = sqlite3_step(st);
    if (src != SQLITE_DONE) rc = saga__sq_err(src);
  }
  sqlite3_finalize(st);
  return rc;
}

int saga__sq_opreq_pending(saga__store *ss, size_t max, int64_t *ids, size_t *count) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st;
  *count = 0;
  int rc = prep(s, "SELECT id FROM saga_operator_request WHERE state = 0 ORDER BY id LIMIT ?1",
                &st);
  if (rc != SAGA_OK) return rc;
  sqlite3_bind_int64(st, 1, (sqlite3_int64)max);
  int src;
  while ((src = sqlite3_step(st)) == SQLITE_ROW && *count < max)
    ids[(*count)++] = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return src == SQLITE_DONE || src == SQLITE_ROW ? SAGA_OK : saga__sq_err(src);
}

int saga__sq_opreq_get(saga__store *ss, int64_t id, saga__opreq *out) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st;
  memset(out, 0, sizeof *out);
  int rc = prep(s, "SELECT state, action, target, requested_by FROM saga_operator_request"
                   " WHERE id = ?1", &st);
  if (rc != SAGA_OK) return rc;
  sqlite3_bind_int64(st, 1, id);
  int src = sqlite3_step(st);
  if (src == SQLITE_ROW) {
    out->id = id;
    out->state = sqlite3_column_int(st, 0);
    copy_text(out->action, sizeof out->action, st, 1);
    copy_text(out->target, sizeof out->target, st, 2);
    copy_text(out->by, sizeof out->by, st, 3);
    /* A value longer than its field is cut: make sure the cut one names nothing valid. */
    if ((size_t)sqlite3_column_bytes(st, 1) >= sizeof out->action) out->action[0] = '?';
    if ((size_t)sqlite3_column_bytes(st, 2) >= sizeof out->target) out->target[0] = '?';
  }
  sqlite3_finalize(st);
  if (src == SQLITE_DONE) return SAGA_ENOTFOUND;
  return src == SQLITE_ROW ? SAGA_OK : saga__sq_err(src);
}

int saga__sq_opreq_finish(saga__store *ss, int64_t id, int state, const char *result,
                          uint64_t now) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st;
  int rc = prep(s, "UPDATE saga_operator_request SET state = ?2, result = ?3, done_ms = ?4"
                   " WHERE id = ?1", &st);
  if (rc != SAGA_OK) return rc;
  sqlite3_bind_int64(st, 1, id);
  sqlite3_bind_int(st, 2, state);
  text(st, 3, result);
  sqlite3_bind_int64(st, 4, (sqlite3_int64)now);
  return run(st);
}

int saga__sq_dead_get(saga__store *ss, int64_t id, saga__buf *channel, saga__buf *reason,
                      saga__buf *body) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st;
  int rc = prep(s, "SELECT channel, reason, body FROM saga_dead_letter WHERE id = ?1", &st);
  if (rc != SAGA_OK) return rc;
  sqlite3_bind_int64(st, 1, id);
  int src = sqlite3_step(st);
  if (src == SQLITE_ROW) {
    rc = append_col(channel, st, 0, 1);
    if (rc == SAGA_OK) rc = append_col(reason, st, 1, 1);
    if (rc == SAGA_OK) rc = append_col(body, st, 2, 0);
  } else {
    rc = src == SQLITE_DONE ? SAGA_ENOTFOUND : saga__sq_err(src);
  }
  sqlite3_finalize(st);
  return rc;
}

int saga__sq_dead_delete(saga__store *ss, int64_t id, uint64_t *deleted) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st;
  *deleted = 0;
  int rc = prep(s, id < 0 ? "DELETE FROM saga_dead_letter"
                          : "DELETE FROM saga_dead_letter WHERE id = ?1", &st);
  if (rc != SAGA_OK) return rc;
  if (id >= 0) sqlite3_bind_int64(st, 1, id);
  rc = run(st);
  if (rc == SAGA_OK) *deleted = (uint64_t)sqlite3_changes(s->db);
  return rc;
}
