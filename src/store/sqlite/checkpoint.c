/*
 * WAL checkpoints off the commit path (SAGA_CHECKPOINT_BACKGROUND; the default is SQLite's
 * own, inline). SQLite's auto-checkpoint runs inside the commit that makes the WAL cross its
 * limit: that commit then waits for the copy into the database file and its fsyncs, which is
 * the tail of a saga's latency. Here the WAL hook (called after each commit with the WAL's
 * size) hands the checkpoint to a thread of libuv's pool, which runs a PASSIVE checkpoint on a
 * connection of its own while the loop keeps committing. A PASSIVE checkpoint cannot finish
 * while commits keep adding pages, so once the WAL reaches four times the limit the store
 * checkpoints inline, between two transactions, which bounds it.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "sqlite_store.h"

static void ck_log(sq_store *s, saga_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void ck_log(sq_store *s, saga_log_level lvl, const char *fmt, ...) {
  if (s->log == NULL) return;
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  s->log(s->log_arg, lvl, buf);
}

#define CKPT_BOUND 4 /* inline checkpoint once the WAL holds this many times checkpoint_pages */

/* Worker thread: only this function touches ckpt_db and ckpt_err while ckpt_running is set. */
static void ckpt_work(uv_work_t *req) {
  sq_store *s = req->data;
  s->ckpt_err[0] = '\0';
  int rc = SQLITE_OK;
  if (s->ckpt_db == NULL) {
    rc = sqlite3_open_v2(s->ckpt_path, &s->ckpt_db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                         s->ckpt_vfs);
    if (rc == SQLITE_OK) {
      /* The checkpoint's fsyncs follow the node's durability setting. */
      const char *sql = s->ckpt_sync == SAGA_SYNC_OFF      ? "PRAGMA synchronous=OFF"
                        : s->ckpt_sync == SAGA_SYNC_NORMAL ? "PRAGMA synchronous=NORMAL"
                                                           : "PRAGMA synchronous=FULL";
      rc = sqlite3_exec(s->ckpt_db, sql, NULL, NULL, NULL);
    }
    if (rc != SQLITE_OK) {
      snprintf(s->ckpt_err, sizeof s->ckpt_err, "opening a connection for checkpoints: %s",
               s->ckpt_db != NULL ? sqlite3_errmsg(s->ckpt_db) : sqlite3_errstr(rc));
      sqlite3_close_v2(s->ckpt_db);
      s->ckpt_db = NULL;
      s->ckpt_rc = rc;
      s->ckpt_open_failed = 1;
      return;
    }
  }
  rc = sqlite3_wal_checkpoint_v2(s->ckpt_db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
  if (rc != SQLITE_OK)
    snprintf(s->ckpt_err, sizeof s->ckpt_err, "%s", sqlite3_errmsg(s->ckpt_db));
  s->ckpt_rc = rc;
}

static void ckpt_after(uv_work_t *req, int status) {
  sq_store *s = req->data;
  s->ckpt_running = 0;
  if (status == 0 && s->ckpt_rc == SQLITE_OK) {
    s->checkpoints++;
  } else if (status == 0 && (s->ckpt_rc & 0xff) != SQLITE_BUSY) {
    /* BUSY: another checkpoint was running (another process's); the next commit retries. */
    s->checkpoint_failures++;
    ck_log(s, SAGA_LOG_WARN, "background checkpoint failed: %s", s->ckpt_err);
    if (s->ckpt_open_failed && s->db != NULL) {
      ck_log(s, SAGA_LOG_WARN, "checkpointing inline from now on");
      sqlite3_wal_autocheckpoint(s->db, (int)s->ckpt_pages); /* replaces our hook */
    }
  }
  if (s->stop_done != NULL) {
    void (*fn)(void *) = s->stop_done;
    s->stop_done = NULL;
    fn(s->stop_arg); /* the owner waited for this pass before closing */
  }
}

static int wal_hook(void *arg, sqlite3 *db, const char *name, int pages) {
  sq_store *s = arg;
  if (pages < 0 || (uint32_t)pages < s->ckpt_pages) return SQLITE_OK;
  if ((uint64_t)pages >= (uint64_t)CKPT_BOUND * s->ckpt_pages && !s->ckpt_running) {
    /* Between two transactions on the loop: nothing writes meanwhile, so it completes and
     * the next transaction starts the WAL over. */
    int rc = sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    s->ckpt_last_pages = 0;
    if (rc == SQLITE_OK) {
      s->checkpoints_inline++;
    } else if ((rc & 0xff) != SQLITE_BUSY) {
      s->checkpoint_failures++;
      ck_log(s, SAGA_LOG_WARN, "checkpoint failed: %s", sqlite3_errmsg(db));
    }
    return SQLITE_OK;
  }
  /* Once per checkpoint_pages new pages: a pass that could not finish (commits kept adding
   * pages) is not followed at once by another for the few pages added meanwhile. */
  if (s->ckpt_running || s->stopping) return SQLITE_OK;
  if ((uint32_t)pages < s->ckpt_last_pages) s->ckpt_last_pages = 0; /* the WAL started over */
  if ((uint32_t)pages - s->ckpt_last_pages < s->ckpt_pages) return SQLITE_OK;
  s->ckpt_last_pages = (uint32_t)pages;
  s->ckpt_running = 1;
  s->ckpt_req.data = s;
  if (uv_queue_work(s->loop, &s->ckpt_req, ckpt_work, ckpt_after) != 0) s->ckpt_running = 0;
  return SQLITE_OK;
}

int saga__sq_checkpoint_init(sq_store *s, const saga__sqlite_config *cfg, char *err,
                             size_t errlen) {
  int mode = cfg->checkpoint;
  uint32_t pages = cfg->checkpoint_pages != 0 ? cfg->checkpoint_pages : 1000;
  if (mode != SAGA_CHECKPOINT_BACKGROUND && mode != SAGA_CHECKPOINT_INLINE) {
    saga__errf(err, errlen, "config checkpoint mode %d is unknown", mode);
    return SAGA_EINVAL;
  }
  if (pages > INT32_MAX / CKPT_BOUND) pages = INT32_MAX / CKPT_BOUND;
  s->ckpt_pages = pages;
  s->ckpt_sync = cfg->synchronous;
  s->loop = cfg->loop;
  /* An in-memory or temporary database has no WAL (and no name to open a second time). */
  const char *file = sqlite3_db_filename(s->db, "main");
  if (mode == SAGA_CHECKPOINT_INLINE || file == NULL || file[0] == '\0' || s->loop == NULL) {
    sqlite3_wal_autocheckpoint(s->db, (int)pages);
    return SAGA_OK;
  }
  s->ckpt_path = saga__strdup(s->alloc, file);
  if (s->ckpt_path == NULL ||
      (cfg->vfs != NULL && (s->ckpt_vfs = saga__strdup(s->alloc, cfg->vfs)) == NULL)) {
    saga__errf(err, errlen, "out of memory");
    return SAGA_ENOMEM;
  }
  sqlite3_wal_hook(s->db, wal_hook, s); /* replaces SQLite's auto-checkpoint */
  return SAGA_OK;
}

int saga__sq_checkpoint_stop(sq_store *s, void (*fn)(void *), void *arg) {
  s->stopping = 1;
  if (!s->ckpt_running) return 0;
  s->stop_done = fn;
  s->stop_arg = arg;
  return 1;
}

void saga__sq_checkpoint_free(sq_store *s) {
  if (s->ckpt_db != NULL) sqlite3_close_v2(s->ckpt_db);
  s->ckpt_db = NULL;
  saga__free(s->alloc, s->ckpt_path);
  saga__free(s->alloc, s->ckpt_vfs);
  s->ckpt_path = s->ckpt_vfs = NULL;
}
