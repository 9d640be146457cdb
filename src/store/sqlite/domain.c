/*
 * The SQLite backend's part for domain events (include/saga/domain.h): the publisher's stream
 * id and per-key sequence numbers, the subscriber's per-key cursors (tables of migration 9).
 * Their statements run once per event published or handled: prepared on first use and kept
 * until the store closes.
 */
#include <string.h>

#include "sqlite_store.h"

#define SQ(s) ((sq_store *)(void *)(s))

enum { EV_SEQ_NEXT, EV_CURSOR_GET, EV_CURSOR_PUT, EV_STREAM };

static const char *const ev_sql[] = {
    [EV_SEQ_NEXT] = "INSERT INTO saga_event_seq(channel, key, seq) VALUES(?1, ?2, 1)"
                    " ON CONFLICT(channel, key) DO UPDATE SET seq = seq + 1 RETURNING seq",
    [EV_CURSOR_GET] = "SELECT seq FROM saga_event_cursor WHERE stream = ?1 AND channel = ?2"
                      " AND key = ?3",
    [EV_CURSOR_PUT] = "INSERT INTO saga_event_cursor(stream, channel, key, seq, updated_ms)"
                      " VALUES(?1, ?2, ?3, ?4, ?5) ON CONFLICT(stream, channel, key)"
                      " DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms",
    [EV_STREAM] = "INSERT OR IGNORE INTO saga_meta(key, value) VALUES ('event_stream', ?1)",
};

/* The statement, prepared on first use, reset and unbound; NULL with *rc set on failure. */
static sqlite3_stmt *ev_stmt(sq_store *s, int id, int *rc) {
  if (s->ev_st[id] == NULL) {
    int r = sqlite3_prepare_v3(s->db, ev_sql[id], -1, SQLITE_PREPARE_PERSISTENT, &s->ev_st[id],
                               NULL);
    if (r != SQLITE_OK) {
      *rc = saga__sq_err(r);
      return NULL;
    }
  }
  sqlite3_stmt *st = s->ev_st[id];
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return st;
}

static void text(sqlite3_stmt *st, int col, const char *v) {
  sqlite3_bind_text(st, col, v != NULL ? v : "", -1, SQLITE_STATIC);
}

int saga__sq_event_stream(saga__store *ss, uint64_t fresh, uint64_t *stream) {
  sq_store *s = SQ(ss);
  int rc = SAGA_OK;
  sqlite3_stmt *st = ev_stmt(s, EV_STREAM, &rc);
  if (st == NULL) return rc;
  sqlite3_bind_int64(st, 1, (sqlite3_int64)fresh);
  int r = sqlite3_step(st);
  sqlite3_reset(st);
  if (r != SQLITE_DONE) return saga__sq_err(r);
  sqlite3_stmt *q = NULL;
  r = sqlite3_prepare_v2(s->db, "SELECT value FROM saga_meta WHERE key = 'event_stream'", -1,
                         &q, NULL);
  if (r == SQLITE_OK) {
    r = sqlite3_step(q);
    if (r == SQLITE_ROW && sqlite3_column_type(q, 0) == SQLITE_INTEGER) {
      *stream = (uint64_t)sqlite3_column_int64(q, 0);
      r = *stream != 0 ? SQLITE_OK : SQLITE_CORRUPT;
    } else if (r == SQLITE_ROW || r == SQLITE_DONE) {
      r = SQLITE_CORRUPT;
    }
  }
  sqlite3_finalize(q);
  return saga__sq_err(r);
}

int saga__sq_event_seq_next(saga__store *ss, const char *channel, const char *key,
                            uint64_t *seq) {
  sq_store *s = SQ(ss);
  int rc = SAGA_OK;
  sqlite3_stmt *st = ev_stmt(s, EV_SEQ_NEXT, &rc);
  if (st == NULL) return rc;
  text(st, 1, channel);
  text(st, 2, key);
  int r = sqlite3_step(st);
  if (r == SQLITE_ROW) {
    *seq = (uint64_t)sqlite3_column_int64(st, 0);
    r = sqlite3_step(st); /* the statement completes: SQLITE_DONE */
  }
  sqlite3_reset(st);
  return r == SQLITE_DONE ? SAGA_OK : saga__sq_err(r);
}

int saga__sq_event_cursor_get(saga__store *ss, const char *stream, const char *channel,
                              const char *key, uint64_t *seq) {
  sq_store *s = SQ(ss);
  int rc = SAGA_OK;
  sqlite3_stmt *st = ev_stmt(s, EV_CURSOR_GET, &rc);
  if (st == NULL) return rc;
  text(st, 1, stream);
  text(st, 2, channel);
  text(st, 3, key);
  int r = sqlite3_step(st);
  *seq = r == SQLITE_ROW ? (uint64_t)sqlite3_column_int64(st, 0) : 0;
  sqlite3_reset(st);
  return r == SQLITE_ROW || r == SQLITE_DONE ? SAGA_OK : saga__sq_err(r);
}

int saga__sq_event_cursor_put(saga__store *ss, const char *stream, const char *channel,
                              const char *key, uint64_t seq, uint64_t now) {
  sq_store *s = SQ(ss);
  int rc = SAGA_OK;
  sqlite3_stmt *st = ev_stmt(s, EV_CURSOR_PUT, &rc);
  if (st == NULL) return rc;
  text(st, 1, stream);
  text(st, 2, channel);
  text(st, 3, key);
  sqlite3_bind_int64(st, 4, (sqlite3_int64)seq);
  sqlite3_bind_int64(st, 5, (sqlite3_int64)now);
  int r = sqlite3_step(st);
  sqlite3_reset(st);
  return r == SQLITE_DONE ? SAGA_OK : saga__sq_err(r);
}

void saga__sq_events_close(sq_store *s) {
  for (size_t i = 0; i < sizeof s->ev_st / sizeof s->ev_st[0]; i++) {
    sqlite3_finalize(s->ev_st[i]);
    s->ev_st[i] = NULL;
  }
}
