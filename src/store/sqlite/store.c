/*
 * The SQLite backend of the store interface (../store.h): connection setup, migrations, the
 * statements prepared once, and one function per method. Together with checkpoint.c, the only
 * code of the library that calls sqlite3_*.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "saga_schema.h"
#include "sqlite_store.h"

static const char *const stmt_sql[ST__COUNT] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_SP_ITEM] = "SAVEPOINT saga_item",
    [ST_SP_ITEM_RELEASE] = "RELEASE saga_item",
    [ST_SP_ITEM_ROLLBACK] = "ROLLBACK TO saga_item",
    [ST_SP_HANDLER] = "SAVEPOINT saga_handler",
    [ST_SP_HANDLER_RELEASE] = "RELEASE saga_handler",
    [ST_SP_HANDLER_ROLLBACK] = "ROLLBACK TO saga_handler",
    [ST_SP_OPERATOR] = "SAVEPOINT saga_operator",
    [ST_SP_OPERATOR_RELEASE] = "RELEASE saga_operator",
    [ST_SP_OPERATOR_ROLLBACK] = "ROLLBACK TO saga_operator",
    [ST_INST_INSERT] =
        "INSERT INTO saga_instance(id, def_name, def_version, idem_key, state, phase, step,"
        " attempt, wait, flags, hseq, data, error, trace_span, created_ms, updated_ms,"
        " step_deadline_ms, saga_deadline_ms, deadline_ms, trace_parent, started_ns,"
        " attempt_span, attempt_ns)"
        " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,"
        "?22,?23)",
    [ST_INST_GET] =
        "SELECT id, def_name, def_version, state, phase, step, attempt, wait, flags, hseq,"
        " data, error, trace_span, created_ms, updated_ms, step_deadline_ms,"
        " saga_deadline_ms, parked, trace_parent, started_ns, attempt_span, attempt_ns"
        " FROM saga_instance WHERE id = ?1",
    [ST_INST_BY_KEY] = "SELECT id FROM saga_instance WHERE def_name = ?1 AND idem_key = ?2",
    [ST_INST_UPDATE] =
        "UPDATE saga_instance SET state=?2, phase=?3, step=?4, attempt=?5, wait=?6, flags=?7,"
        " hseq=?8, data=?9, error=?10, updated_ms=?11, step_deadline_ms=?12,"
        " saga_deadline_ms=?13, deadline_ms=?14, parked=?15, attempt_span=?16,"
        " attempt_ns=?17 WHERE id = ?1",
    [ST_INST_UPDATE_STEP] =
        "UPDATE saga_instance SET phase=?3, step=?4, attempt=?5, wait=?6, flags=?7,"
        " hseq=?8, data=?9, error=?10, updated_ms=?11, step_deadline_ms=?12,"
        " saga_deadline_ms=?13, deadline_ms=?14, attempt_span=?16, attempt_ns=?17"
        " WHERE id = ?1",
    [ST_INST_DUE] = "SELECT id FROM saga_instance WHERE deadline_ms <= ?1"
                    " ORDER BY deadline_ms LIMIT ?2",
    [ST_INST_MIN_DEADLINE] = "SELECT min(deadline_ms) FROM saga_instance"
                             " WHERE deadline_ms IS NOT NULL",
    [ST_INST_UNPARK] =
        "UPDATE saga_instance SET parked = 0, deadline_ms = CASE"
        " WHEN step_deadline_ms IS NULL THEN saga_deadline_ms"
        " WHEN saga_deadline_ms IS NULL THEN step_deadline_ms"
        " ELSE min(step_deadline_ms, saga_deadline_ms) END WHERE id = ?1",
    [ST_INST_INFLIGHT] = "SELECT id, def_name, def_version, parked FROM saga_instance"
                         " WHERE state IN (1, 2)",
    [ST_INST_BY_STATE] = "SELECT state, count(*) FROM saga_instance GROUP BY state",
    [ST_PURGE_AGED] = "SELECT id FROM saga_instance WHERE state IN (3, 4) AND updated_ms < ?1"
                      " ORDER BY updated_ms LIMIT ?2",
    [ST_PURGE_EXCESS] = "SELECT id FROM saga_instance WHERE state IN (3, 4)"
                        " ORDER BY updated_ms DESC LIMIT ?2 OFFSET ?1",
    [ST_PURGE_HISTORY] = "DELETE FROM saga_history WHERE saga_id = ?1",
    [ST_PURGE_INSTANCE] = "DELETE FROM saga_instance WHERE id = ?1 AND state IN (3, 4)",
    /* Sweeps (retention.c): a cursor walks each table in key order, `skip` + 1 keys per
     * pass; named parameters, so that one function drives both. */
    [ST_PURGE_INBOX_EDGE] = "SELECT msg_id, 0 FROM saga_inbox WHERE msg_id > :from"
                            " ORDER BY msg_id LIMIT 1 OFFSET :skip",
    [ST_PURGE_INBOX_RANGE] = "DELETE FROM saga_inbox WHERE msg_id > :from AND msg_id <= :to"
                             " AND received_ms < :cutoff",
    [ST_PURGE_INBOX_TAIL] = "DELETE FROM saga_inbox WHERE msg_id > :from AND received_ms < :cutoff",
    [ST_PURGE_PSTEP_EDGE] = "SELECT saga_id, step FROM saga_pstep WHERE (saga_id, step) >"
                            " (:from, :from_step) ORDER BY saga_id, step LIMIT 1 OFFSET :skip",
    [ST_PURGE_PSTEP_RANGE] = "DELETE FROM saga_pstep WHERE (saga_id, step) > (:from, :from_step)"
                             " AND (saga_id, step) <= (:to, :to_step) AND updated_ms < :cutoff",
    [ST_PURGE_PSTEP_TAIL] = "DELETE FROM saga_pstep WHERE (saga_id, step) > (:from, :from_step)"
                            " AND updated_ms < :cutoff",
    [ST_HIST_INSERT] = "INSERT INTO saga_history(saga_id, seq, at_ms, event, step, attempt,"
                       " detail) VALUES(?,?,?,?,?,?,?)",
    [ST_HIST_INSERT2] = "INSERT INTO saga_history(saga_id, seq, at_ms, event, step, attempt,"
                        " detail) VALUES(?,?,?,?,?,?,?),(?,?,?,?,?,?,?)",
    [ST_HIST_INSERT8] = "INSERT INTO saga_history(saga_id, seq, at_ms, event, step, attempt,"
                        " detail) VALUES(?,?,?,?,?,?,?),(?,?,?,?,?,?,?),(?,?,?,?,?,?,?),"
                        "(?,?,?,?,?,?,?),(?,?,?,?,?,?,?),(?,?,?,?,?,?,?),(?,?,?,?,?,?,?),"
                        "(?,?,?,?,?,?,?)",
    [ST_OUTBOX_INSERT] = "INSERT INTO saga_outbox(channel, saga_id, body, created_ms, id)"
                         " VALUES(?1,?2,?3,?4,?5)",
    [ST_DEAD_TRIM] = "DELETE FROM saga_dead_letter WHERE id <= ?1",
    [ST_OUTBOX_MAX] = "SELECT max(coalesce((SELECT max(id) FROM saga_outbox), 0),"
                      " (SELECT value FROM saga_meta WHERE key = 'outbox_id'))",
    [ST_OUTBOX_MARK] = "UPDATE saga_meta SET value = ?1 WHERE key = 'outbox_id' AND value < ?1",
    [ST_OUTBOX_DELETE] = "DELETE FROM saga_outbox WHERE id BETWEEN ?1 AND ?2",
    [ST_OUTBOX_AFTER] = "SELECT id, channel, body FROM saga_outbox WHERE id > ?1"
                        " ORDER BY id LIMIT ?2",
    [ST_OUTBOX_STALE] = "SELECT id, channel, body FROM saga_outbox WHERE id > ?1 AND id <= ?2"
                        " AND created_ms <= ?3 ORDER BY id LIMIT ?4",
    [ST_OUTBOX_GET] = "SELECT channel, body FROM saga_outbox WHERE id = ?1",
    [ST_OUTBOX_COUNT] = "SELECT count(*) FROM saga_outbox",
    [ST_INBOX_GET] = "SELECT reply_to, reply FROM saga_inbox WHERE msg_id = ?1",
    [ST_INBOX_INSERT] = "INSERT INTO saga_inbox(msg_id, saga_id, received_ms, reply_to, reply)"
                        " VALUES(?1,?2,?3,?4,?5)",
    [ST_PSTEP_GET] = "SELECT state, attempt, reply FROM saga_pstep WHERE saga_id = ?1"
                     " AND step = ?2",
    [ST_PSTEP_PUT] = "INSERT OR REPLACE INTO saga_pstep(saga_id, step, state, attempt, reply,"
                     " updated_ms) VALUES(?1,?2,?3,?4,?5,?6)",
    [ST_DEAD_INSERT] = "INSERT INTO saga_dead_letter(at_ms, channel, msg_id, reason, body)"
                       " VALUES(?1,?2,?3,?4,?5)",
    [ST_LOCK_GET] = "SELECT saga_id, step FROM saga_lock WHERE type = ?1 AND id = ?2",
    [ST_LOCK_PUT] = "INSERT INTO saga_lock(type, id, saga_id, step, acquired_ms)"
                    " VALUES(?1,?2,?3,?4,?5)",
    [ST_LOCK_DELETE] = "DELETE FROM saga_lock WHERE type = ?1 AND id = ?2 AND saga_id = ?3",
    [ST_LOCK_RELEASE_STEP] = "DELETE FROM saga_lock WHERE saga_id = ?1 AND step = ?2",
    [ST_LOCK_RELEASE_SAGA] = "DELETE FROM saga_lock WHERE saga_id = ?1",
};

#define SQ(s) ((sq_store *)(void *)(s))

/* A statement reset and with its bindings cleared. */
static sqlite3_stmt *stmt(sq_store *s, sq_stmt_id id) {
  sqlite3_stmt *st = s->st[id];
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return st;
}

/* Runs a statement that returns no rows (or whose rows are not needed), then resets it. */
static int exec(sq_store *s, sq_stmt_id id) {
  sqlite3_stmt *st = s->st[id];
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? SAGA_OK : saga__sq_err(rc);
}

/* Resets st after a read and maps the code of its last step (DONE or ROW = fine). */
static int done(sqlite3_stmt *st, int rc) {
  sqlite3_reset(st);
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? SAGA_OK : saga__sq_err(rc);
}

static void bind_text(sqlite3_stmt *st, int col, const char *v) {
  sqlite3_bind_text(st, col, v, -1, SQLITE_STATIC);
}

/* 0 is stored as NULL (no deadline). */
static void bind_opt(sqlite3_stmt *st, int col, uint64_t v) {
  if (v == 0)
    sqlite3_bind_null(st, col);
  else
    sqlite3_bind_int64(st, col, (sqlite3_int64)v);
}

static void bind_blob(sqlite3_stmt *st, int col, const void *p, size_t len) {
  sqlite3_bind_blob(st, col, p != NULL ? p : "", (int)len, SQLITE_STATIC);
}

/* Copies a text column into dst (truncated to cap - 1 bytes, always NUL-terminated). */
static void copy_col(char *dst, size_t cap, sqlite3_stmt *st, int col) {
  const char *s = (const char *)sqlite3_column_text(st, col);
  size_t len = s != NULL ? (size_t)sqlite3_column_bytes(st, col) : 0;
  if (len >= cap) len = cap - 1;
  if (len > 0) memcpy(dst, s, len);
  dst[len] = '\0';
}

static uint64_t col_u64(sqlite3_stmt *st, int col) {
  return sqlite3_column_type(st, col) == SQLITE_NULL ? 0 : (uint64_t)sqlite3_column_int64(st, col);
}

/* Appends a text column and its NUL to b. */
static int append_text(saga__buf *b, sqlite3_stmt *st, int col) {
  const char *s = (const char *)sqlite3_column_text(st, col);
  size_t len = s != NULL ? (size_t)sqlite3_column_bytes(st, col) : 0;
  static const char zero = 0;
  int rc = len > 0 ? saga__buf_append(b, s, len) : SAGA_OK;
  return rc == SAGA_OK ? saga__buf_append(b, &zero, 1) : rc;
}

static int append_blob(saga__buf *b, sqlite3_stmt *st, int col) {
  size_t len = (size_t)sqlite3_column_bytes(st, col);
  return len > 0 ? saga__buf_append(b, sqlite3_column_blob(st, col), len) : SAGA_OK;
}

/* ---- transactions ----------------------------------------------------------------------- */

static int sq_begin(saga__store *s) { return exec(SQ(s), ST_BEGIN); }
static int sq_commit(saga__store *s) { return exec(SQ(s), ST_COMMIT); }
static int sq_rollback(saga__store *s) { return exec(SQ(s), ST_ROLLBACK); }
static int sq_in_tx(saga__store *s) { return !sqlite3_get_autocommit(SQ(s)->db); }

static int sq_savepoint(saga__store *s, saga__savepoint sp) {
  return exec(SQ(s), sp == SAGA__SP_ITEM      ? ST_SP_ITEM
                     : sp == SAGA__SP_HANDLER ? ST_SP_HANDLER
                                              : ST_SP_OPERATOR);
}
static int sq_release(saga__store *s, saga__savepoint sp) {
  return exec(SQ(s), sp == SAGA__SP_ITEM      ? ST_SP_ITEM_RELEASE
                     : sp == SAGA__SP_HANDLER ? ST_SP_HANDLER_RELEASE
                                              : ST_SP_OPERATOR_RELEASE);
}
static int sq_rollback_to(saga__store *s, saga__savepoint sp) {
  return exec(SQ(s), sp == SAGA__SP_ITEM      ? ST_SP_ITEM_ROLLBACK
                     : sp == SAGA__SP_HANDLER ? ST_SP_HANDLER_ROLLBACK
                                              : ST_SP_OPERATOR_ROLLBACK);
}
static int64_t sq_writes(saga__store *s) { return sqlite3_total_changes64(SQ(s)->db); }

/* ---- instances -------------------------------------------------------------------------- */

static int sq_inst_load(saga__store *ss, const char *id, saga__inst *i) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_INST_GET);
  bind_text(st, 1, id);
  int rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) {
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? SAGA_ENOTFOUND : saga__sq_err(rc);
  }
  copy_col(i->id, sizeof i->id, st, 0);
  copy_col(i->def_name, sizeof i->def_name, st, 1);
  i->def_version = (uint32_t)sqlite3_column_int64(st, 2);
  i->state = sqlite3_column_int(st, 3);
  i->phase = sqlite3_column_int(st, 4);
  i->step = sqlite3_column_int(st, 5);
  i->attempt = (uint32_t)sqlite3_column_int64(st, 6);
  i->wait = sqlite3_column_int(st, 7);
  i->flags = sqlite3_column_int(st, 8);
  i->hseq = sqlite3_column_int64(st, 9);
  saga__buf_reset(&i->data);
  rc = append_blob(&i->data, st, 10);
  copy_col(i->error, sizeof i->error, st, 11);
  copy_col(i->trace_span, sizeof i->trace_span, st, 12);
  i->created_ms = col_u64(st, 13);
  i->updated_ms = col_u64(st, 14);
  i->step_deadline = col_u64(st, 15);
  i->saga_deadline = col_u64(st, 16);
  i->parked = sqlite3_column_int(st, 17);
  copy_col(i->trace_parent, sizeof i->trace_parent, st, 18);
  i->started_ns = col_u64(st, 19);
  copy_col(i->attempt_span, sizeof i->attempt_span, st, 20);
  i->attempt_ns = col_u64(st, 21);
  i->saved_state = i->state;
  i->saved_parked = i->parked;
  i->def = NULL;
  i->exists = 1;
  sqlite3_reset(st);
  return rc;
}

static int sq_inst_find_key(saga__store *ss, const char *def_name, const char *key,
                            char id_out[40]) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_INST_BY_KEY);
  bind_text(st, 1, def_name);
  bind_text(st, 2, key);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) copy_col(id_out, 40, st, 0);
  sqlite3_reset(st);
  if (rc == SQLITE_ROW) return SAGA_OK;
  return rc == SQLITE_DONE ? SAGA_ENOTFOUND : saga__sq_err(rc);
}

static int sq_inst_insert(saga__store *ss, const saga__inst *i, const char *idem_key) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_INST_INSERT);
  bind_text(st, 1, i->id);
  bind_text(st, 2, i->def_name);
  sqlite3_bind_int64(st, 3, i->def_version);
  if (idem_key != NULL) bind_text(st, 4, idem_key);
  sqlite3_bind_int(st, 5, i->state);
  sqlite3_bind_int(st, 6, i->phase);
  sqlite3_bind_int(st, 7, i->step);
  sqlite3_bind_int64(st, 8, i->attempt);
  sqlite3_bind_int(st, 9, i->wait);
  sqlite3_bind_int(st, 10, i->flags);
  sqlite3_bind_int64(st, 11, i->hseq);
  bind_blob(st, 12, i->data.data, i->data.len);
  bind_text(st, 13, i->error);
  bind_text(st, 14, i->trace_span);
  sqlite3_bind_int64(st, 15, (sqlite3_int64)i->created_ms);
  sqlite3_bind_int64(st, 16, (sqlite3_int64)i->updated_ms);
  bind_opt(st, 17, i->step_deadline);
  bind_opt(st, 18, i->saga_deadline);
  bind_opt(st, 19, i->parked ? 0 : saga__inst_next_deadline(i));
  bind_text(st, 20, i->trace_parent);
  sqlite3_bind_int64(st, 21, (sqlite3_int64)i->started_ns);
  bind_text(st, 22, i->attempt_span);
  sqlite3_bind_int64(st, 23, (sqlite3_int64)i->attempt_ns);
  return exec(s, ST_INST_INSERT);
}

static int sq_inst_save(saga__store *ss, const saga__inst *i) {
  sq_store *s = SQ(ss);
  /* Most saves keep state and parked: then the statement leaves those columns (and so the
   * state index) alone. */
  sq_stmt_id sid = i->state == i->saved_state && i->parked == i->saved_parked
                       ? ST_INST_UPDATE_STEP
                       : ST_INST_UPDATE;
  sqlite3_stmt *st = stmt(s, sid);
  bind_text(st, 1, i->id);
  if (sid == ST_INST_UPDATE) sqlite3_bind_int(st, 2, i->state);
  sqlite3_bind_int(st, 3, i->phase);
  sqlite3_bind_int(st, 4, i->step);
  sqlite3_bind_int64(st, 5, i->attempt);
  sqlite3_bind_int(st, 6, i->wait);
  sqlite3_bind_int(st, 7, i->flags);
  sqlite3_bind_int64(st, 8, i->hseq);
  bind_blob(st, 9, i->data.data, i->data.len);
  bind_text(st, 10, i->error);
  sqlite3_bind_int64(st, 11, (sqlite3_int64)i->updated_ms);
  bind_opt(st, 12, i->step_deadline);
  bind_opt(st, 13, i->saga_deadline);
  bind_opt(st, 14, i->parked ? 0 : saga__inst_next_deadline(i));
  if (sid == ST_INST_UPDATE) sqlite3_bind_int(st, 15, i->parked);
  bind_text(st, 16, i->attempt_span);
  sqlite3_bind_int64(st, 17, (sqlite3_int64)i->attempt_ns);
  return exec(s, sid);
}

static int sq_inst_due(saga__store *ss, uint64_t now, size_t max, saga__buf *ids,
                       size_t *count) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_INST_DUE);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)now);
  sqlite3_bind_int64(st, 2, (sqlite3_int64)max);
  int rc;
  *count = 0;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    char id[40];
    copy_col(id, sizeof id, st, 0);
    if (saga__buf_append(ids, id, sizeof id) != SAGA_OK) {
      sqlite3_reset(st);
      return SAGA_ENOMEM;
    }
    (*count)++;
  }
  return done(st, rc);
}

static int sq_inst_next_due(saga__store *ss, uint64_t *at) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_INST_MIN_DEADLINE);
  int rc = sqlite3_step(st);
  int found = rc == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL;
  if (found) *at = (uint64_t)sqlite3_column_int64(st, 0);
  rc = done(st, rc);
  return rc != SAGA_OK ? rc : found ? SAGA_OK : SAGA_ENOTFOUND;
}

static int sq_inst_inflight(saga__store *ss, saga__inflight_fn fn, void *arg) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_INST_INFLIGHT);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const char *id = (const char *)sqlite3_column_text(st, 0);
    const char *name = (const char *)sqlite3_column_text(st, 1);
    fn(arg, id != NULL ? id : "", name != NULL ? name : "",
       (uint32_t)sqlite3_column_int64(st, 2), sqlite3_column_int(st, 3));
  }
  return done(st, rc);
}

static int sq_inst_unpark(saga__store *ss, const char *id) {
  sq_store *s = SQ(ss);
  bind_text(stmt(s, ST_INST_UNPARK), 1, id);
  return exec(s, ST_INST_UNPARK);
}

static int sq_inst_count(saga__store *ss, int64_t counts[6]) {
  sq_store *s = SQ(ss);
  for (int i = 0; i < 6; i++) counts[i] = 0;
  sqlite3_stmt *st = stmt(s, ST_INST_BY_STATE);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    int state = sqlite3_column_int(st, 0);
    if (state >= 1 && state <= 5) counts[state] = sqlite3_column_int64(st, 1);
  }
  return done(st, rc);
}

static int sq_inst_count_by_def(saga__store *ss,
                                void (*fn)(void *arg, const char *def_name, int state,
                                           int64_t count),
                                void *arg) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = NULL;
  int rc = saga__sq_err(sqlite3_prepare_v2(s->db, "SELECT def_name, state, count(*)"
                                           " FROM saga_instance GROUP BY def_name, state",
                                           -1, &st, NULL));
  if (rc == SAGA_OK) {
    int src;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
      const char *name = (const char *)sqlite3_column_text(st, 0);
      fn(arg, name != NULL ? name : "", sqlite3_column_int(st, 1), sqlite3_column_int64(st, 2));
    }
    rc = saga__sq_err(src);
  }
  sqlite3_finalize(st);
  return rc;
}

/* ---- history ---------------------------------------------------------------------------- */

/* Multi-row INSERTs: one statement per 8 rows instead of one per row. */
static void bind_hist(sqlite3_stmt *st, int base, const saga__hist_rec *h, const char *text) {
  bind_text(st, base + 1, h->saga_id);
  sqlite3_bind_int64(st, base + 2, h->seq);
  sqlite3_bind_int64(st, base + 3, (sqlite3_int64)h->at_ms);
  sqlite3_bind_int(st, base + 4, h->type);
  sqlite3_bind_int(st, base + 5, h->step);
  sqlite3_bind_int64(st, base + 6, h->attempt);
  bind_text(st, base + 7, text + h->detail_off);
}

static int sq_hist_insert(saga__store *ss, const saga__hist_rec *h, size_t count,
                          const char *text) {
  sq_store *s = SQ(ss);
  size_t k = 0;
  int rc = SAGA_OK;
  while (k < count && rc == SAGA_OK) {
    size_t rows = count - k >= 8 ? 8 : count - k >= 2 ? 2 : 1;
    sq_stmt_id id = rows == 8 ? ST_HIST_INSERT8 : rows == 2 ? ST_HIST_INSERT2 : ST_HIST_INSERT;
    sqlite3_stmt *st = stmt(s, id);
    for (size_t j = 0; j < rows; j++) bind_hist(st, (int)(7 * j), &h[k + j], text);
    rc = exec(s, id);
    k += rows;
  }
  return rc;
}

/* ---- outbox ----------------------------------------------------------------------------- */

static int sq_outbox_max(saga__store *ss, uint64_t *max) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_OUTBOX_MAX);
  int rc = sqlite3_step(st);
  *max = rc == SQLITE_ROW ? (uint64_t)sqlite3_column_int64(st, 0) : 0;
  return done(st, rc);
}

static int sq_outbox_mark(saga__store *ss, uint64_t id) {
  sq_store *s = SQ(ss);
  sqlite3_bind_int64(stmt(s, ST_OUTBOX_MARK), 1, (sqlite3_int64)id);
  return exec(s, ST_OUTBOX_MARK);
}

static int sq_outbox_insert(saga__store *ss, uint64_t id, const char *channel,
                            const char *saga_id, const void *body, size_t len, uint64_t now) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_OUTBOX_INSERT);
  sqlite3_bind_int64(st, 5, (sqlite3_int64)id);
  bind_text(st, 1, channel);
  bind_text(st, 2, saga_id);
  sqlite3_bind_blob(st, 3, body, (int)len, SQLITE_STATIC);
  sqlite3_bind_int64(st, 4, (sqlite3_int64)now);
  return exec(s, ST_OUTBOX_INSERT);
}

static int sq_outbox_delete(saga__store *ss, uint64_t lo, uint64_t hi, uint64_t *deleted) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_OUTBOX_DELETE);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)lo);
  sqlite3_bind_int64(st, 2, (sqlite3_int64)hi);
  int rc = exec(s, ST_OUTBOX_DELETE);
  *deleted = rc == SAGA_OK ? (uint64_t)sqlite3_changes(s->db) : 0;
  return rc;
}

static int visit_outbox(sqlite3_stmt *st, saga__outbox_fn fn, void *arg, size_t *rows) {
  int rc;
  *rows = 0;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const char *channel = (const char *)sqlite3_column_text(st, 1);
    fn(arg, (uint64_t)sqlite3_column_int64(st, 0), channel != NULL ? channel : "",
       sqlite3_column_blob(st, 2), (size_t)sqlite3_column_bytes(st, 2));
    (*rows)++;
  }
  return done(st, rc);
}

static int sq_outbox_after(saga__store *ss, uint64_t after, size_t max, saga__outbox_fn fn,
                           void *arg, size_t *rows) {
  sqlite3_stmt *st = stmt(SQ(ss), ST_OUTBOX_AFTER);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)after);
  sqlite3_bind_int64(st, 2, (sqlite3_int64)max);
  return visit_outbox(st, fn, arg, rows);
}

static int sq_outbox_stale(saga__store *ss, uint64_t after, uint64_t upto, uint64_t created,
                           size_t max, saga__outbox_fn fn, void *arg, size_t *rows) {
  sqlite3_stmt *st = stmt(SQ(ss), ST_OUTBOX_STALE);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)after);
  sqlite3_bind_int64(st, 2, (sqlite3_int64)upto);
  sqlite3_bind_int64(st, 3, (sqlite3_int64)(created > INT64_MAX ? INT64_MAX : created));
  sqlite3_bind_int64(st, 4, (sqlite3_int64)max);
  return visit_outbox(st, fn, arg, rows);
}

static int sq_outbox_get(saga__store *ss, uint64_t id, saga__buf *channel, saga__buf *body) {
  sqlite3_stmt *st = stmt(SQ(ss), ST_OUTBOX_GET);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)id);
  int rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) {
    int code = done(st, rc);
    return code == SAGA_OK ? SAGA_ENOTFOUND : code;
  }
  rc = append_text(channel, st, 0);
  if (rc == SAGA_OK) rc = append_blob(body, st, 1);
  sqlite3_reset(st);
  return rc;
}

static int sq_outbox_count(saga__store *ss, int64_t *count) {
  sqlite3_stmt *st = stmt(SQ(ss), ST_OUTBOX_COUNT);
  int rc = sqlite3_step(st);
  *count = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
  return done(st, rc);
}

/* ---- inbox and step records ------------------------------------------------------------- */

static int sq_inbox_get(saga__store *ss, const char *msg_id, saga__buf *reply_to,
                        saga__buf *reply) {
  sqlite3_stmt *st = stmt(SQ(ss), ST_INBOX_GET);
  bind_text(st, 1, msg_id);
  int rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) {
    int code = done(st, rc);
    return code == SAGA_OK ? SAGA_ENOTFOUND : code;
  }
  rc = append_text(reply_to, st, 0);
  if (rc == SAGA_OK) rc = append_blob(reply, st, 1);
  sqlite3_reset(st);
  return rc;
}

static int sq_inbox_insert(saga__store *ss, const char *msg_id, const char *saga_id,
                           uint64_t now, const char *reply_to, const void *reply, size_t len) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_INBOX_INSERT);
  bind_text(st, 1, msg_id);
  bind_text(st, 2, saga_id);
  sqlite3_bind_int64(st, 3, (sqlite3_int64)now);
  bind_text(st, 4, reply_to);
  bind_blob(st, 5, reply, len);
  return exec(s, ST_INBOX_INSERT);
}

static int sq_pstep_get(saga__store *ss, const char *saga_id, uint32_t step, int *state,
                        uint32_t *attempt, saga__buf *reply) {
  sqlite3_stmt *st = stmt(SQ(ss), ST_PSTEP_GET);
  bind_text(st, 1, saga_id);
  sqlite3_bind_int64(st, 2, step);
  int rc = sqlite3_step(st);
  *state = 0;
  *attempt = 0;
  if (rc != SQLITE_ROW) return done(st, rc);
  *state = sqlite3_column_int(st, 0);
  *attempt = (uint32_t)sqlite3_column_int64(st, 1);
  rc = append_blob(reply, st, 2);
  sqlite3_reset(st);
  return rc;
}

static int sq_pstep_put(saga__store *ss, const char *saga_id, uint32_t step, int state,
                        uint32_t attempt, const void *reply, size_t len, uint64_t now) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_PSTEP_PUT);
  bind_text(st, 1, saga_id);
  sqlite3_bind_int64(st, 2, step);
  sqlite3_bind_int(st, 3, state);
  sqlite3_bind_int64(st, 4, attempt);
  if (reply != NULL) sqlite3_bind_blob(st, 5, reply, (int)len, SQLITE_STATIC);
  sqlite3_bind_int64(st, 6, (sqlite3_int64)now);
  return exec(s, ST_PSTEP_PUT);
}

static int sq_lock_get(saga__store *ss, const char *type, const char *id, char holder[40],
                       uint32_t *step) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_LOCK_GET);
  bind_text(st, 1, type);
  bind_text(st, 2, id);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) {
    copy_col(holder, 40, st, 0);
    if (step != NULL) *step = (uint32_t)sqlite3_column_int64(st, 1);
  }
  int found = rc == SQLITE_ROW;
  rc = done(st, rc);
  return rc != SAGA_OK ? rc : found ? SAGA_OK : SAGA_ENOTFOUND;
}

static int sq_lock_put(saga__store *ss, const char *type, const char *id, const char *saga_id,
                       uint32_t step, uint64_t now) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_LOCK_PUT);
  bind_text(st, 1, type);
  bind_text(st, 2, id);
  bind_text(st, 3, saga_id);
  sqlite3_bind_int64(st, 4, step);
  sqlite3_bind_int64(st, 5, (sqlite3_int64)now);
  return exec(s, ST_LOCK_PUT);
}

static int sq_lock_delete(saga__store *ss, const char *type, const char *id,
                          const char *saga_id, int *deleted) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = stmt(s, ST_LOCK_DELETE);
  bind_text(st, 1, type);
  bind_text(st, 2, id);
  bind_text(st, 3, saga_id);
  int rc = exec(s, ST_LOCK_DELETE);
  *deleted = rc == SAGA_OK && sqlite3_changes(s->db) > 0;
  return rc;
}

static int sq_lock_release(saga__store *ss, const char *saga_id, int64_t step,
                           uint64_t *deleted) {
  sq_store *s = SQ(ss);
  sq_stmt_id id = step >= 0 ? ST_LOCK_RELEASE_STEP : ST_LOCK_RELEASE_SAGA;
  sqlite3_stmt *st = stmt(s, id);
  bind_text(st, 1, saga_id);
  if (step >= 0) sqlite3_bind_int64(st, 2, step);
  int rc = exec(s, id);
  *deleted = rc == SAGA_OK ? (uint64_t)sqlite3_changes(s->db) : 0;
  return rc;
}

static int sq_dead_insert(saga__store *ss, uint64_t now, const char *channel,
                          const char *msg_id, const char *reason, const void *body,
                          size_t len, uint64_t keep, uint64_t *dropped) {
  sq_store *s = SQ(ss);
  *dropped = 0;
  sqlite3_stmt *st = stmt(s, ST_DEAD_INSERT);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)now);
  bind_text(st, 2, channel);
  bind_text(st, 3, msg_id != NULL ? msg_id : "");
  bind_text(st, 4, reason);
  bind_blob(st, 5, body, len);
  int rc = exec(s, ST_DEAD_INSERT);
  /* The ids are distinct integers, so at most keep of them lie in (id - keep, id]: one range
   * delete on the primary key bounds the table however fast dead letters come. */
  sqlite3_int64 id = sqlite3_last_insert_rowid(s->db);
  if (rc != SAGA_OK || keep == 0 || id <= (sqlite3_int64)keep) return rc;
  st = stmt(s, ST_DEAD_TRIM);
  sqlite3_bind_int64(st, 1, id - (sqlite3_int64)keep);
  rc = exec(s, ST_DEAD_TRIM);
  if (rc == SAGA_OK) *dropped = (uint64_t)sqlite3_changes(s->db);
  return rc;
}

static int sq_outbox_channels(saga__store *ss,
                              void (*fn)(void *arg, const char *channel, int64_t count,
                                         uint64_t oldest),
                              void *arg) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = NULL;
  int rc = saga__sq_err(sqlite3_prepare_v2(s->db, "SELECT channel, count(*), min(created_ms)"
                                           " FROM saga_outbox GROUP BY channel", -1, &st, NULL));
  if (rc == SAGA_OK) {
    int src;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
      const char *ch = (const char *)sqlite3_column_text(st, 0);
      fn(arg, ch != NULL ? ch : "", sqlite3_column_int64(st, 1),
         (uint64_t)sqlite3_column_int64(st, 2));
    }
    rc = saga__sq_err(src);
  }
  sqlite3_finalize(st);
  return rc;
}

/* ---- parked replies --------------------------------------------------------------------- */

/* A one-off statement (these run rarely: not worth a prepared slot). */
static int run_once(sq_store *s, const char *sql, sqlite3_stmt **out) {
  return saga__sq_err(sqlite3_prepare_v2(s->db, sql, -1, out, NULL));
}

static int sq_parked_insert(saga__store *ss, const char *saga_id, uint64_t now,
                            const void *body, size_t len) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = NULL;
  int rc = run_once(s, "INSERT OR IGNORE INTO saga_parked_reply(saga_id, at_ms, body) VALUES(?1,?2,?3)",
                    &st);
  if (rc == SAGA_OK) {
    bind_text(st, 1, saga_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)now);
    bind_blob(st, 3, body, len);
    rc = saga__sq_err(sqlite3_step(st));
  }
  sqlite3_finalize(st);
  return rc;
}

static int sq_parked_after(saga__store *ss, uint64_t after, size_t max, saga__outbox_fn fn,
                           void *arg, size_t *rows) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = NULL;
  *rows = 0;
  int rc = run_once(s, "SELECT id, saga_id, body FROM saga_parked_reply WHERE id > ?1"
                       " ORDER BY id LIMIT ?2", &st);
  if (rc == SAGA_OK) {
    sqlite3_bind_int64(st, 1, (sqlite3_int64)after);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)max);
    int src;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
      const char *saga_id = (const char *)sqlite3_column_text(st, 1);
      fn(arg, (uint64_t)sqlite3_column_int64(st, 0), saga_id != NULL ? saga_id : "",
         sqlite3_column_blob(st, 2), (size_t)sqlite3_column_bytes(st, 2));
      (*rows)++;
    }
    rc = saga__sq_err(src);
  }
  sqlite3_finalize(st);
  return rc;
}

static int sq_parked_delete(saga__store *ss, uint64_t id) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = NULL;
  int rc = run_once(s, "DELETE FROM saga_parked_reply WHERE id = ?1", &st);
  if (rc == SAGA_OK) {
    sqlite3_bind_int64(st, 1, (sqlite3_int64)id);
    rc = saga__sq_err(sqlite3_step(st));
  }
  sqlite3_finalize(st);
  return rc;
}

static int sq_dead_purge(saga__store *ss, uint64_t cutoff, uint64_t keep, size_t batch,
                         uint64_t *deleted, int *more) {
  sq_store *s = SQ(ss);
  /* Ids grow with time: the oldest come first in id order, and the scan stops at the batch. */
  static const char *const sql[2] = {
      "DELETE FROM saga_dead_letter WHERE id IN (SELECT id FROM saga_dead_letter"
      " WHERE at_ms < ?1 ORDER BY id LIMIT ?2)",
      "DELETE FROM saga_dead_letter WHERE id IN (SELECT id FROM saga_dead_letter"
      " ORDER BY id DESC LIMIT ?2 OFFSET ?1)"};
  for (int k = 0; k < 2; k++) {
    if (k == 1 && keep == 0) break;
    sqlite3_stmt *st = NULL;
    int rc = run_once(s, sql[k], &st);
    if (rc == SAGA_OK) {
      sqlite3_bind_int64(st, 1, (sqlite3_int64)(k == 0 ? cutoff : keep));
      sqlite3_bind_int64(st, 2, (sqlite3_int64)batch);
      rc = saga__sq_err(sqlite3_step(st));
    }
    sqlite3_finalize(st);
    if (rc != SAGA_OK) return rc;
    int n = sqlite3_changes(s->db);
    *deleted += (uint64_t)n;
    if ((size_t)n >= batch) *more = 1;
  }
  return SAGA_OK;
}

/* ---- retention -------------------------------------------------------------------------- */

static int collect_ids(sqlite3_stmt *st, saga__buf *ids, size_t *count) {
  int rc;
  *count = 0;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const char *id = (const char *)sqlite3_column_text(st, 0);
    if (id == NULL) continue;
    if (saga__buf_append(ids, id, strlen(id) + 1) != SAGA_OK) {
      sqlite3_reset(st);
      return SAGA_ENOMEM;
    }
    (*count)++;
  }
  return done(st, rc);
}

static int sq_finished_before(saga__store *ss, uint64_t cutoff, size_t max, saga__buf *ids,
                              size_t *count) {
  sqlite3_stmt *st = stmt(SQ(ss), ST_PURGE_AGED);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)(cutoff > INT64_MAX ? INT64_MAX : cutoff));
  sqlite3_bind_int64(st, 2, (sqlite3_int64)max);
  return collect_ids(st, ids, count);
}

static int sq_finished_beyond(saga__store *ss, uint64_t keep, size_t max, saga__buf *ids,
                              size_t *count) {
  sqlite3_stmt *st = stmt(SQ(ss), ST_PURGE_EXCESS);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)(keep > INT64_MAX ? INT64_MAX : keep));
  sqlite3_bind_int64(st, 2, (sqlite3_int64)max);
  return collect_ids(st, ids, count);
}

static int sq_purge_saga(saga__store *ss, const char *id, int *deleted) {
  sq_store *s = SQ(ss);
  *deleted = 0;
  bind_text(stmt(s, ST_PURGE_INSTANCE), 1, id);
  int rc = exec(s, ST_PURGE_INSTANCE);
  if (rc != SAGA_OK || sqlite3_changes(s->db) == 0) return rc; /* gone already */
  bind_text(stmt(s, ST_PURGE_HISTORY), 1, id);
  rc = exec(s, ST_PURGE_HISTORY);
  if (rc == SAGA_OK) *deleted = 1;
  return rc;
}

/* Binds a named parameter if the statement has it (the inbox's keys have no step part). */
static void bind_named_text(sqlite3_stmt *st, const char *name, const char *v) {
  int i = sqlite3_bind_parameter_index(st, name);
  if (i > 0) sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
}
static void bind_named_i64(sqlite3_stmt *st, const char *name, int64_t v) {
  int i = sqlite3_bind_parameter_index(st, name);
  if (i > 0) sqlite3_bind_int64(st, i, v);
}

/* Inbox and step records have no age index (it would cost an index write on every step), so
 * a cursor sweeps each table in key order, `batch` keys per pass. */
static int sq_sweep(saga__store *ss, saga__sweep_table table, saga__sweep *c, size_t batch,
                    uint64_t cutoff, uint64_t *deleted, int *more) {
  sq_store *s = SQ(ss);
  static const sq_stmt_id q[2][3] = {
      {ST_PURGE_INBOX_EDGE, ST_PURGE_INBOX_RANGE, ST_PURGE_INBOX_TAIL},
      {ST_PURGE_PSTEP_EDGE, ST_PURGE_PSTEP_RANGE, ST_PURGE_PSTEP_TAIL}};
  const sq_stmt_id *sql = q[table == SAGA__SWEEP_STEPS];
  int64_t cut = (int64_t)(cutoff > INT64_MAX ? INT64_MAX : cutoff);
  static const char empty = '\0';
  const char *from = c->key.len ? (const char *)c->key.data : &empty;
  sqlite3_stmt *st = stmt(s, sql[0]);
  bind_named_text(st, ":from", from);
  bind_named_i64(st, ":from_step", c->key_step);
  bind_named_i64(st, ":skip", (int64_t)batch - 1);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) {
    /* A full chunk: delete up to its last key, then move the cursor there. */
    const char *edge = (const char *)sqlite3_column_text(st, 0);
    int64_t edge_step = sqlite3_column_int64(st, 1);
    saga__buf key;
    saga__buf_init(&key, s->alloc);
    if (edge == NULL || saga__buf_append(&key, edge, strlen(edge) + 1) != SAGA_OK) {
      sqlite3_reset(st);
      saga__buf_free(&key);
      return edge == NULL ? SAGA_ESTORE : SAGA_ENOMEM;
    }
    sqlite3_reset(st);
    sqlite3_stmt *del = stmt(s, sql[1]);
    bind_named_text(del, ":from", from);
    bind_named_i64(del, ":from_step", c->key_step);
    bind_named_text(del, ":to", (const char *)key.data);
    bind_named_i64(del, ":to_step", edge_step);
    bind_named_i64(del, ":cutoff", cut);
    rc = exec(s, sql[1]);
    if (rc == SAGA_OK) {
      *deleted += (uint64_t)sqlite3_changes(s->db);
      saga__buf_reset(&c->key);
      rc = saga__buf_append(&c->key, key.data, key.len);
      c->key_step = edge_step;
      *more = 1;
    }
    saga__buf_free(&key);
    return rc;
  }
  sqlite3_reset(st);
  if (rc != SQLITE_DONE) return saga__sq_err(rc);
  /* Fewer than a chunk left: delete to the end and start over next time. */
  sqlite3_stmt *del = stmt(s, sql[2]);
  bind_named_text(del, ":from", from);
  bind_named_i64(del, ":from_step", c->key_step);
  bind_named_i64(del, ":cutoff", cut);
  rc = exec(s, sql[2]);
  if (rc != SAGA_OK) return rc;
  *deleted += (uint64_t)sqlite3_changes(s->db);
  saga__buf_reset(&c->key);
  c->key_step = -1;
  return SAGA_OK;
}

static int sq_hist_get(saga__store *ss, const char *saga_id, int64_t seq, int *type,
                       saga__buf *detail) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(s->db, "SELECT event, detail FROM saga_history WHERE saga_id = ?1"
                              " AND seq = ?2", -1, &st, NULL);
  if (rc == SQLITE_OK) {
    sqlite3_bind_text(st, 1, saga_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, seq);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
      *type = sqlite3_column_int(st, 0);
      const void *d = sqlite3_column_text(st, 1);
      size_t n = (size_t)sqlite3_column_bytes(st, 1);
      saga__buf_reset(detail);
      int brc = saga__buf_append(detail, d != NULL ? d : "", n);
      if (brc == SAGA_OK) brc = saga__buf_append(detail, "", 1);
      sqlite3_finalize(st);
      return brc;
    }
    if (rc == SQLITE_DONE) {
      sqlite3_finalize(st);
      return SAGA_ENOTFOUND;
    }
  }
  sqlite3_finalize(st);
  return saga__sq_err(rc);
}

static int sq_purge_mark(saga__store *ss, uint64_t *ms) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = NULL;
  *ms = 0;
  int rc = sqlite3_prepare_v2(s->db, "SELECT value FROM saga_meta WHERE key = 'pstep_purged_before'",
                              -1, &st, NULL);
  if (rc == SQLITE_OK) {
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
      *ms = (uint64_t)sqlite3_column_int64(st, 0);
      rc = SQLITE_OK;
    }
  }
  sqlite3_finalize(st);
  return saga__sq_err(rc);
}

static int sq_purge_mark_raise(saga__store *ss, uint64_t ms) {
  sq_store *s = SQ(ss);
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(s->db, "INSERT INTO saga_meta(key, value) VALUES"
                              " ('pstep_purged_before', ?1) ON CONFLICT(key) DO UPDATE SET"
                              " value = max(value, excluded.value)", -1, &st, NULL);
  if (rc == SQLITE_OK) {
    sqlite3_bind_int64(st, 1, (sqlite3_int64)ms);
    rc = sqlite3_step(st);
  }
  sqlite3_finalize(st);
  return saga__sq_err(rc);
}

/* ---- the database ----------------------------------------------------------------------- */

static int sq_reply_key(saga__store *ss, const uint64_t fresh[2], uint64_t key[2]) {
  sq_store *s = SQ(ss);
  /* Created once per database (replicas sharing the file read the one that won), so that
   * commands sent before a restart are still answered after it. */
  static const char *const sql[] = {
      "INSERT OR IGNORE INTO saga_meta(key, value) VALUES ('reply_key0', ?1), ('reply_key1', ?2)",
      "SELECT (SELECT value FROM saga_meta WHERE key = 'reply_key0'),"
      " (SELECT value FROM saga_meta WHERE key = 'reply_key1')"};
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(s->db, sql[0], -1, &st, NULL);
  if (rc == SQLITE_OK) {
    sqlite3_bind_int64(st, 1, (sqlite3_int64)fresh[0]);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)fresh[1]);
    rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) rc = SQLITE_OK;
  }
  sqlite3_finalize(st);
  st = NULL;
  if (rc == SQLITE_OK) rc = sqlite3_prepare_v2(s->db, sql[1], -1, &st, NULL);
  if (rc == SQLITE_OK) {
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) == SQLITE_INTEGER &&
        sqlite3_column_type(st, 1) == SQLITE_INTEGER) {
      key[0] = (uint64_t)sqlite3_column_int64(st, 0);
      key[1] = (uint64_t)sqlite3_column_int64(st, 1);
      rc = SQLITE_OK;
    } else if (rc == SQLITE_ROW) {
      rc = SQLITE_CORRUPT;
    }
  }
  sqlite3_finalize(st);
  return saga__sq_err(rc);
}

static const char *sq_errmsg(saga__store *s) { return sqlite3_errmsg(SQ(s)->db); }
static void *sq_native(saga__store *s) { return SQ(s)->db; }

static void sq_stats(saga__store *ss, saga_node_stats *out) {
  sq_store *s = SQ(ss);
  out->checkpoints = s->checkpoints;
  out->checkpoints_inline = s->checkpoints_inline;
  out->checkpoint_failures = s->checkpoint_failures;
}

static int sq_stop(saga__store *s, void (*fn)(void *), void *arg) {
  return saga__sq_checkpoint_stop(SQ(s), fn, arg);
}

static void sq_close(saga__store *ss) {
  if (ss == NULL) return;
  sq_store *s = SQ(ss);
  saga__sq_checkpoint_free(s);
  for (int i = 0; i < ST__COUNT; i++) sqlite3_finalize(s->st[i]);
  saga__sq_events_close(s);
  if (s->db != NULL) sqlite3_close_v2(s->db);
  saga__free(s->alloc, s);
}

static const saga__store_methods sqlite_methods = {
    .name = "sqlite",
    .begin = sq_begin,
    .commit = sq_commit,
    .rollback = sq_rollback,
    .in_tx = sq_in_tx,
    .savepoint = sq_savepoint,
    .release = sq_release,
    .rollback_to = sq_rollback_to,
    .writes = sq_writes,
    .inst_load = sq_inst_load,
    .inst_find_key = sq_inst_find_key,
    .inst_insert = sq_inst_insert,
    .inst_save = sq_inst_save,
    .inst_due = sq_inst_due,
    .inst_next_due = sq_inst_next_due,
    .inst_inflight = sq_inst_inflight,
    .inst_unpark = sq_inst_unpark,
    .inst_count = sq_inst_count,
    .inst_count_by_def = sq_inst_count_by_def,
    .hist_insert = sq_hist_insert,
    .hist_get = sq_hist_get,
    .outbox_max = sq_outbox_max,
    .outbox_mark = sq_outbox_mark,
    .outbox_insert = sq_outbox_insert,
    .outbox_delete = sq_outbox_delete,
    .outbox_after = sq_outbox_after,
    .outbox_stale = sq_outbox_stale,
    .outbox_get = sq_outbox_get,
    .outbox_count = sq_outbox_count,
    .inbox_get = sq_inbox_get,
    .inbox_insert = sq_inbox_insert,
    .pstep_get = sq_pstep_get,
    .pstep_put = sq_pstep_put,
    .lock_get = sq_lock_get,
    .lock_put = sq_lock_put,
    .lock_delete = sq_lock_delete,
    .lock_release = sq_lock_release,
    .outbox_channels = sq_outbox_channels,
    .parked_insert = sq_parked_insert,
    .parked_after = sq_parked_after,
    .parked_delete = sq_parked_delete,
    .dead_insert = sq_dead_insert,
    .dead_get = saga__sq_dead_get,
    .dead_delete = saga__sq_dead_delete,
    .def_put = saga__sq_def_put,
    .opreq_pending = saga__sq_opreq_pending,
    .opreq_get = saga__sq_opreq_get,
    .opreq_finish = saga__sq_opreq_finish,
    .dead_purge = sq_dead_purge,
    .finished_before = sq_finished_before,
    .finished_beyond = sq_finished_beyond,
    .purge_saga = sq_purge_saga,
    .sweep = sq_sweep,
    .purge_mark = sq_purge_mark,
    .purge_mark_raise = sq_purge_mark_raise,
    .reply_key = sq_reply_key,
    .errmsg = sq_errmsg,
    .native = sq_native,
    .stats = sq_stats,
    .stop = sq_stop,
    .close = sq_close,
    .event_stream = saga__sq_event_stream,
    .event_seq_next = saga__sq_event_seq_next,
    .event_cursor_get = saga__sq_event_cursor_get,
    .event_cursor_put = saga__sq_event_cursor_put,
};

/* The integer a PRAGMA returns (its first column of its first row): a SQLite code. */
static int pragma_int(sqlite3 *db, const char *sql, int64_t *out) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
  if (rc == SQLITE_OK) {
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
      *out = sqlite3_column_int64(st, 0);
      rc = SQLITE_OK;
    }
  }
  sqlite3_finalize(st);
  return rc;
}

/* The database's schema version: the number of the last migration applied, 0 when none. */
static int user_version(sqlite3 *db, int *out) {
  int64_t v = 0;
  int rc = pragma_int(db, "PRAGMA user_version", &v);
  *out = (int)v;
  return rc;
}

/* Applies every migration above the database's user_version. Each runs in its own
 * BEGIN IMMEDIATE transaction that re-reads user_version first: processes opening one
 * database at the same moment (replicas sharing a file) apply each migration exactly once. */
static int migrate(sqlite3 *db, char *err, size_t errlen) {
  const char *marker = "-- migration ";
  const char *p = strstr(saga_schema_sql, marker);
  int latest = 0, have = 0, rc;
  while (p != NULL) {
    int num = atoi(p + strlen(marker));
    const char *next = strstr(p + 1, marker);
    latest = num;
    size_t len = next ? (size_t)(next - p) : strlen(p);
    char *msg = NULL;
    rc = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, &msg);
    if (rc == SQLITE_OK) rc = user_version(db, &have);
    if (rc == SQLITE_OK && num > have) {
      char *sql = malloc(len + 64);
      if (sql == NULL) {
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        return SAGA_ENOMEM;
      }
      snprintf(sql, len + 64, "%.*s\nPRAGMA user_version = %d;", (int)len, p, num);
      rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
      free(sql);
    }
    if (rc == SQLITE_OK) rc = sqlite3_exec(db, "COMMIT", NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
      saga__errf(err, errlen, "migration %d failed: %s", num,
                 msg ? msg : sqlite3_errmsg(db));
      sqlite3_free(msg);
      if (!sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
      return saga__sq_err(rc);
    }
    p = next;
  }
  rc = user_version(db, &have);
  if (rc != SQLITE_OK) {
    saga__errf(err, errlen, "reading schema version: %s", sqlite3_errmsg(db));
    return saga__sq_err(rc);
  }
  if (have > latest) {
    saga__errf(err, errlen,
               "database schema version %d is newer than this library's (%d); refusing to open",
               have, latest);
    return SAGA_ESCHEMA;
  }
  return SAGA_OK;
}


/* Whether path names an existing file, as the VFS the database is opened with sees it: 1, 0,
 * or -1 when it cannot tell. */
static int file_exists(const char *vfs_name, const char *path) {
  sqlite3_vfs *vfs = sqlite3_vfs_find(vfs_name);
  int res = 0;
  if (vfs == NULL || vfs->xAccess == NULL ||
      vfs->xAccess(vfs, path, SQLITE_ACCESS_EXISTS, &res) != SQLITE_OK)
    return -1;
  return res != 0;
}

/* Runs PRAGMA quick_check or integrity_check: SAGA_OK when the file is sound, else
 * SAGA_ECORRUPT (or the error that stopped the check) with err naming the first problem. */
static int check_file(sqlite3 *db, const char *path, int full, char *err, size_t errlen) {
  const char *what = full ? "integrity_check" : "quick_check";
  char sql[48];
  snprintf(sql, sizeof sql, "PRAGMA %s(20)", what); /* at most 20 problems listed */
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
  char first[200] = "";
  int problems = 0;
  while (rc == SQLITE_OK || rc == SQLITE_ROW) {
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) break;
    const char *line = (const char *)sqlite3_column_text(st, 0);
    if (line == NULL || strcmp(line, "ok") == 0) continue;
    if (problems++ == 0) {
      /* "*** in database main ***\nOn tree page 7 cell 3: ...\n...": the first problem. */
      const char *nl = strncmp(line, "***", 3) == 0 ? strchr(line, '\n') : NULL;
      const char *p = nl != NULL ? nl + 1 : line;
      const char *end = strchr(p, '\n');
      if (end != NULL && end[1] != '\0') problems++; /* more lines in this row */
      int len = end != NULL ? (int)(end - p) : (int)strlen(p);
      snprintf(first, sizeof first, "%.*s", len, p);
    }
  }
  if (rc != SQLITE_DONE) snprintf(first, sizeof first, "%s", sqlite3_errmsg(db));
  sqlite3_finalize(st);
  int code = rc != SQLITE_DONE ? saga__sq_err(rc) : problems ? SAGA_ECORRUPT : SAGA_OK;
  if (code == SAGA_ECORRUPT)
    saga__errf(err, errlen,
               "database '%s' is damaged (PRAGMA %s: %s%s); refusing to open it: restore it "
               "from a backup or salvage it (docs/operating.md)",
               path, what, first, problems > 1 ? ", and more" : "");
  else if (code != SAGA_OK)
    saga__errf(err, errlen, "database '%s': PRAGMA %s failed: %s", path, what, first);
  return code;
}

/* Before anything is written: the file must be writable, hold a libsaga database unless
 * creating one was asked for, and pass the check. Nothing here writes to the file. */
static int vet_file(sqlite3 *db, const saga__sqlite_config *cfg, char *err, size_t errlen) {
  const char *path = cfg->path;
  const char *file = sqlite3_db_filename(db, "main");
  if (file == NULL || file[0] == '\0') return SAGA_OK; /* in memory or temporary: new */
  if (sqlite3_db_readonly(db, "main") == 1) {
    saga__errf(err, errlen,
               "database '%s' is read-only (file permissions, a read-only mount or VFS): a "
               "node writes to its database; make the file, and its folder, writable by "
               "this process",
               path);
    return SAGA_EREADONLY;
  }
  int have = 0;
  int64_t pages = 0;
  int rc = user_version(db, &have);
  if (rc == SQLITE_OK) rc = pragma_int(db, "PRAGMA page_count", &pages);
  if (rc != SQLITE_OK) {
    int code = saga__sq_err(rc);
    saga__errf(err, errlen, "database '%s'%s: %s", path,
               code == SAGA_ECORRUPT ? " is damaged or not a database" : "",
               sqlite3_errmsg(db));
    return code != SAGA_OK ? code : SAGA_ESTORE;
  }
  if (have == 0 && !cfg->create) {
    /* A node that ran before must not start from nothing: a file truncated or replaced
     * would lose every saga, idempotency key and inbox record without a word. */
    if (pages == 0)
      saga__errf(err, errlen,
                 "database '%s' is empty (0 bytes): no libsaga database to open; restore it "
                 "from a backup, or set saga_node_config.db_mode = SAGA_DB_CREATE to start "
                 "a new one",
                 path);
    else
      saga__errf(err, errlen,
                 "database '%s' has no libsaga tables; set saga_node_config.db_mode = "
                 "SAGA_DB_CREATE to add them to it",
                 path);
    return SAGA_ENOTFOUND;
  }
  if (cfg->check == SAGA_DB_CHECK_NONE || pages == 0) return SAGA_OK;
  return check_file(db, path, cfg->check == SAGA_DB_CHECK_FULL, err, errlen);
}

int saga__sqlite_store_open(saga__store **out, const saga__sqlite_config *cfg, char *err,
                            size_t errlen) {
  *out = NULL;
  const saga_allocator *a = saga__alloc_resolve(cfg->alloc);
  sq_store *s = saga__calloc(a, sizeof *s);
  if (s == NULL) {
    saga__errf(err, errlen, "out of memory");
    return SAGA_ENOMEM;
  }
  s->base.m = &sqlite_methods;
  s->alloc = a;
  s->log = cfg->log;
  s->log_arg = cfg->log_arg;
  const char *path = cfg->path;
  uint32_t busy_ms = cfg->busy_timeout_ms;
  /* One thread per node: the connection needs no mutexes of its own. Without `create`,
   * SQLite itself refuses to make a missing file. */
  int rc = sqlite3_open_v2(path, &s->db,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX |
                               (cfg->create ? SQLITE_OPEN_CREATE : 0),
                           cfg->vfs);
  int code = SAGA_ESTORE;
  if (rc != SQLITE_OK) {
    if (!cfg->create && (rc & 0xff) == SQLITE_CANTOPEN && file_exists(cfg->vfs, path) == 0) {
      saga__errf(err, errlen,
                 "database '%s' does not exist; set saga_node_config.db_mode = "
                 "SAGA_DB_CREATE to create it (first run only)",
                 path);
      code = SAGA_ENOTFOUND;
      rc = SQLITE_OK;
      goto fail;
    }
    saga__errf(err, errlen, "cannot open database '%s': %s", path,
               s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
    goto fail;
  }
  sqlite3_extended_result_codes(s->db, 1);
  sqlite3_busy_timeout(s->db, (int)busy_ms);
  code = vet_file(s->db, cfg, err, errlen);
  if (code != SAGA_OK) {
    rc = SQLITE_OK;
    goto fail;
  }
  code = SAGA_ESTORE;
  char pragmas[160];
  snprintf(pragmas, sizeof pragmas,
           "PRAGMA journal_mode=WAL; PRAGMA synchronous=%s; PRAGMA foreign_keys=OFF;",
           cfg->synchronous == SAGA_SYNC_OFF      ? "OFF"
           : cfg->synchronous == SAGA_SYNC_NORMAL ? "NORMAL"
                                                  : "FULL");
  char *msg = NULL;
  /* Switching to WAL needs a lock that SQLite does not wait for (no busy handler there):
   * another process opening the same file at this moment makes it fail with SQLITE_BUSY.
   * Retry for up to the busy timeout. */
  for (uint32_t waited = 0;; waited += 10) {
    rc = sqlite3_exec(s->db, pragmas, NULL, NULL, &msg);
    if ((rc & 0xff) != SQLITE_BUSY || waited >= busy_ms) break;
    sqlite3_free(msg);
    msg = NULL;
    uv_sleep(10);
  }
  if (rc != SQLITE_OK) {
    saga__errf(err, errlen, "configuring database '%s': %s", path, msg ? msg : "?");
    sqlite3_free(msg);
    goto fail;
  }
  int mrc = migrate(s->db, err, errlen);
  if (mrc != SAGA_OK) {
    code = mrc;
    rc = SQLITE_OK;
    goto fail;
  }
  for (int i = 0; i < ST__COUNT; i++) {
    rc = stmt_sql[i] == NULL ? SQLITE_INTERNAL
                             : sqlite3_prepare_v3(s->db, stmt_sql[i], -1,
                                                  SQLITE_PREPARE_PERSISTENT, &s->st[i], NULL);
    if (rc != SQLITE_OK) {
      saga__errf(err, errlen, "preparing statement %d: %s", i, sqlite3_errmsg(s->db));
      goto fail;
    }
  }
  code = saga__sq_checkpoint_init(s, cfg, err, errlen);
  if (code != SAGA_OK) {
    rc = SQLITE_OK;
    goto fail;
  }
  *out = &s->base;
  return SAGA_OK;
fail:
  if (rc != SQLITE_OK) {
    code = saga__sq_err(rc);
    if (code == SAGA_OK) code = SAGA_ESTORE;
  }
  sq_close(&s->base);
  return code;
}
