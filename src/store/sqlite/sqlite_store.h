/*
 * The SQLite backend's private declarations: the connection, the statements prepared once,
 * and the background checkpoint state. Only src/store/sqlite/ includes this file (and
 * sqlite3.h).
 */
#ifndef SAGA_SRC_STORE_SQLITE_SQLITE_STORE_H
#define SAGA_SRC_STORE_SQLITE_SQLITE_STORE_H

#include <sqlite3.h>

#include "../store.h"

typedef enum sq_stmt_id {
  ST_BEGIN,
  ST_COMMIT,
  ST_ROLLBACK,
  ST_SP_ITEM,
  ST_SP_ITEM_RELEASE,
  ST_SP_ITEM_ROLLBACK,
  ST_SP_HANDLER,
  ST_SP_HANDLER_RELEASE,
  ST_SP_HANDLER_ROLLBACK,
  ST_SP_OPERATOR,
  ST_SP_OPERATOR_RELEASE,
  ST_SP_OPERATOR_ROLLBACK,
  ST_INST_INSERT,
  ST_INST_GET,
  ST_INST_BY_KEY,
  ST_INST_UPDATE,
  ST_INST_UPDATE_STEP,
  ST_INST_DUE,
  ST_INST_MIN_DEADLINE,
  ST_INST_UNPARK,
  ST_INST_INFLIGHT,
  ST_INST_BY_STATE,
  ST_HIST_INSERT,
  ST_HIST_INSERT2,
  ST_HIST_INSERT8,
  ST_OUTBOX_INSERT,
  ST_OUTBOX_MAX,
  ST_OUTBOX_MARK,
  ST_OUTBOX_DELETE,
  ST_OUTBOX_AFTER,
  ST_OUTBOX_STALE,
  ST_OUTBOX_GET,
  ST_OUTBOX_COUNT,
  ST_INBOX_GET,
  ST_INBOX_INSERT,
  ST_PSTEP_GET,
  ST_PSTEP_PUT,
  ST_DEAD_INSERT,
  ST_DEAD_TRIM,
  ST_PURGE_AGED,
  ST_PURGE_EXCESS,
  ST_PURGE_HISTORY,
  ST_PURGE_INSTANCE,
  ST_PURGE_INBOX_EDGE,
  ST_PURGE_INBOX_RANGE,
  ST_PURGE_INBOX_TAIL,
  ST_PURGE_PSTEP_EDGE,
  ST_PURGE_PSTEP_RANGE,
  ST_PURGE_PSTEP_TAIL,
  ST_LOCK_GET,
  ST_LOCK_PUT,
  ST_LOCK_DELETE,
  ST_LOCK_RELEASE_STEP,
  ST_LOCK_RELEASE_SAGA,
  ST__COUNT
} sq_stmt_id;

typedef struct sq_store {
  saga__store base;
  const saga_allocator *alloc;
  sqlite3 *db;
  sqlite3_stmt *st[ST__COUNT];
  saga_log_fn log;
  void *log_arg;
  /* checkpoint.c */
  uv_loop_t *loop;
  uint32_t ckpt_pages;
  uint32_t ckpt_last_pages;   /* WAL size when the last background pass was started */
  int ckpt_sync;
  char *ckpt_path, *ckpt_vfs; /* NULL path: SQLite's inline auto-checkpoint */
  sqlite3 *ckpt_db;           /* the worker's connection, opened on first use */
  uv_work_t ckpt_req;
  int ckpt_running, ckpt_open_failed, stopping;
  int ckpt_rc;                /* SQLite code of the last background pass */
  char ckpt_err[256];
  void (*stop_done)(void *);  /* called once a running pass ends after stop() */
  void *stop_arg;
  uint64_t checkpoints, checkpoints_inline, checkpoint_failures;
  /* domain.c: its statements, prepared on first use (NULL until then) */
  sqlite3_stmt *ev_st[4];
} sq_store;

/* operator.c: the store methods for operators' tools (see ../store.h). */
int saga__sq_def_put(saga__store *s, const char *name, uint32_t version, uint32_t deadline_ms,
                     const saga__def_step_rec *steps, size_t nsteps, uint64_t now);
int saga__sq_opreq_pending(saga__store *s, size_t max, int64_t *ids, size_t *count);
int saga__sq_opreq_get(saga__store *s, int64_t id, saga__opreq *out);
int saga__sq_opreq_finish(saga__store *s, int64_t id, int state, const char *result,
                          uint64_t now);
int saga__sq_dead_get(saga__store *s, int64_t id, saga__buf *channel, saga__buf *reason,
                      saga__buf *body);
int saga__sq_dead_delete(saga__store *s, int64_t id, uint64_t *deleted);

/* domain.c: the store methods for domain events (see ../store.h), and the finalizing of
 * their statements at close. */
int saga__sq_event_stream(saga__store *s, uint64_t fresh, uint64_t *stream);
int saga__sq_event_seq_next(saga__store *s, const char *channel, const char *key,
                            uint64_t *seq);
int saga__sq_event_cursor_get(saga__store *s, const char *stream, const char *channel,
                              const char *key, uint64_t *seq);
int saga__sq_event_cursor_put(saga__store *s, const char *stream, const char *channel,
                              const char *key, uint64_t seq, uint64_t now);
void saga__sq_events_close(sq_store *s);

/* Maps a SQLite result code to a SAGA_E* code. */
static inline int saga__sq_err(int rc) {
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
    return SAGA_EIO;
  case SQLITE_CORRUPT:
  case SQLITE_NOTADB:
    return SAGA_ECORRUPT;
  case SQLITE_BUSY:
  case SQLITE_LOCKED:
    return SAGA_EBUSY;
  case SQLITE_CONSTRAINT:
    return SAGA_EEXIST;
  default:
    return SAGA_ESTORE;
  }
}

/* checkpoint.c: installs the WAL hook (background) or SQLite's auto-checkpoint. */
int saga__sq_checkpoint_init(sq_store *s, const saga__sqlite_config *cfg, char *err,
                             size_t errlen);
/* 0 when no pass runs, else 1 and fn(arg) is called when it ends. */
int saga__sq_checkpoint_stop(sq_store *s, void (*fn)(void *), void *arg);
void saga__sq_checkpoint_free(sq_store *s);

#endif /* SAGA_SRC_STORE_SQLITE_SQLITE_STORE_H */
