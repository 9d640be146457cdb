/* SQLite store: connection setup, migrations and the statements prepared once per node. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "saga_schema.h"

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
    [ST_INST_INSERT] =
        "INSERT INTO saga_instance(id, def_name, def_version, idem_key, state, phase, step,"
        " attempt, wait, flags, hseq, data, error, trace_span, created_ms, updated_ms,"
        " step_deadline_ms, saga_deadline_ms, deadline_ms)"
        " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19)",
    [ST_INST_GET] =
        "SELECT id, def_name, def_version, state, phase, step, attempt, wait, flags, hseq,"
        " data, error, trace_span, created_ms, updated_ms, step_deadline_ms,"
        " saga_deadline_ms, parked FROM saga_instance WHERE id = ?1",
    [ST_INST_BY_KEY] = "SELECT id FROM saga_instance WHERE idem_key = ?1",
    [ST_INST_UPDATE] =
        "UPDATE saga_instance SET state=?2, phase=?3, step=?4, attempt=?5, wait=?6, flags=?7,"
        " hseq=?8, data=?9, error=?10, updated_ms=?11, step_deadline_ms=?12,"
        " saga_deadline_ms=?13, deadline_ms=?14, parked=?15 WHERE id = ?1",
    [ST_INST_UPDATE_STEP] =
        "UPDATE saga_instance SET phase=?3, step=?4, attempt=?5, wait=?6, flags=?7,"
        " hseq=?8, data=?9, error=?10, updated_ms=?11, step_deadline_ms=?12,"
        " saga_deadline_ms=?13, deadline_ms=?14 WHERE id = ?1",
    [ST_INST_DUE] = "SELECT id FROM saga_instance WHERE deadline_ms <= ?1"
                    " ORDER BY deadline_ms LIMIT ?2",
    [ST_INST_MIN_DEADLINE] = "SELECT min(deadline_ms) FROM saga_instance"
                             " WHERE deadline_ms IS NOT NULL",
    [ST_INST_PARK] = "UPDATE saga_instance SET parked = 1, deadline_ms = NULL WHERE id = ?1",
    [ST_INST_PARKED] = "SELECT id, def_name, def_version FROM saga_instance WHERE parked = 1",
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
    [ST_OUTBOX_MAX] = "SELECT max(coalesce((SELECT max(id) FROM saga_outbox), 0),"
                      " (SELECT value FROM saga_meta WHERE key = 'outbox_id'))",
    [ST_OUTBOX_MARK] = "UPDATE saga_meta SET value = ?1 WHERE key = 'outbox_id' AND value < ?1",
    [ST_OUTBOX_DELETE] = "DELETE FROM saga_outbox WHERE id BETWEEN ?1 AND ?2",
    [ST_OUTBOX_AFTER] = "SELECT id, channel, body FROM saga_outbox WHERE id > ?1"
                        " ORDER BY id LIMIT ?2",
    [ST_OUTBOX_STALE] = "SELECT id, channel, body FROM saga_outbox WHERE id > ?1 AND id <= ?2"
                        " AND created_ms <= ?3 ORDER BY id LIMIT ?4",
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
};

int saga__store_err(int rc) {
  switch (rc & 0xff) {
  case SQLITE_OK:
  case SQLITE_DONE:
  case SQLITE_ROW:
    return SAGA_OK;
  case SQLITE_NOMEM:
    return SAGA_ENOMEM;
  case SQLITE_FULL:
    return SAGA_EFULL;
  case SQLITE_READONLY:
  case SQLITE_PERM:
    return SAGA_EREADONLY;
  case SQLITE_CANTOPEN:
  case SQLITE_IOERR:
  case SQLITE_CORRUPT:
  case SQLITE_NOTADB:
    return SAGA_EIO;
  case SQLITE_BUSY:
  case SQLITE_LOCKED:
    return SAGA_EBUSY;
  case SQLITE_CONSTRAINT:
    return SAGA_EEXIST;
  default:
    return SAGA_ESTORE;
  }
}

sqlite3_stmt *saga__store_stmt(saga__store *s, saga__stmt_id id) {
  sqlite3_stmt *st = s->st[id];
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return st;
}

int saga__store_exec(saga__store *s, saga__stmt_id id) {
  sqlite3_stmt *st = s->st[id];
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? SAGA_OK : saga__store_err(rc);
}

/* Applies every migration above the database's user_version, each in its own transaction. */
static int user_version(sqlite3 *db, int *out) {
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL);
  if (rc == SQLITE_OK) {
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
      *out = sqlite3_column_int(st, 0);
      rc = SQLITE_OK;
    }
  }
  sqlite3_finalize(st);
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
      return saga__store_err(rc);
    }
    p = next;
  }
  rc = user_version(db, &have);
  if (rc != SQLITE_OK) {
    saga__errf(err, errlen, "reading schema version: %s", sqlite3_errmsg(db));
    return saga__store_err(rc);
  }
  if (have > latest) {
    saga__errf(err, errlen,
               "database schema version %d is newer than this library's (%d); refusing to open",
               have, latest);
    return SAGA_ESCHEMA;
  }
  return SAGA_OK;
}

int saga__store_open(saga__store *s, const char *path, const char *vfs, int sync,
                     uint32_t busy_ms, char *err, size_t errlen) {
  memset(s, 0, sizeof *s);
  /* One thread per node: the connection needs no mutexes of its own. */
  int rc = sqlite3_open_v2(path, &s->db,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, vfs);
  if (rc != SQLITE_OK) {
    saga__errf(err, errlen, "cannot open database '%s': %s", path,
               s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
    goto fail;
  }
  sqlite3_extended_result_codes(s->db, 1);
  sqlite3_busy_timeout(s->db, (int)busy_ms);
  char pragmas[160];
  snprintf(pragmas, sizeof pragmas,
           "PRAGMA journal_mode=WAL; PRAGMA synchronous=%s; PRAGMA foreign_keys=OFF;",
           sync == SAGA_SYNC_OFF ? "OFF" : sync == SAGA_SYNC_NORMAL ? "NORMAL" : "FULL");
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
    sqlite3_close_v2(s->db);
    s->db = NULL;
    return mrc;
  }
  for (int i = 0; i < ST__COUNT; i++) {
    rc = sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->st[i], NULL);
    if (rc != SQLITE_OK) {
      saga__errf(err, errlen, "preparing statement %d: %s", i, sqlite3_errmsg(s->db));
      goto fail;
    }
  }
  return SAGA_OK;
fail:;
  int code = saga__store_err(rc);
  saga__store_close(s);
  return code == SAGA_OK ? SAGA_ESTORE : code;
}

int saga__store_reply_key(saga__store *s, const uint64_t fresh[2], uint64_t key[2], char *err,
                          size_t errlen) {
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
  if (rc != SQLITE_OK)
    saga__errf(err, errlen, "setting up the reply key: %s", sqlite3_errmsg(s->db));
  sqlite3_finalize(st);
  return saga__store_err(rc);
}

void saga__store_close(saga__store *s) {
  for (int i = 0; i < ST__COUNT; i++) {
    sqlite3_finalize(s->st[i]);
    s->st[i] = NULL;
  }
  if (s->db != NULL) sqlite3_close_v2(s->db);
  s->db = NULL;
}
