/*
 * WAL checkpoints off the commit path (SAGA_CHECKPOINT_BACKGROUND; the default is SQLite's
 * own, inline). SQLite's auto-checkpoint runs inside the commit that
 * makes the WAL cross its limit: that commit then waits for the copy into the database file
 * and its fsyncs, which is the tail of a saga's latency. Here the WAL hook (called after each
 * commit with the WAL's size) hands the checkpoint to a thread of libuv's pool, which runs a
 * PASSIVE checkpoint on a connection of its own while the loop keeps committing. A PASSIVE
 * checkpoint cannot finish while commits keep adding pages, so once the WAL reaches four times
 * the limit the node checkpoints inline, between two transactions, which bounds it.
 */
#include <stdio.h>
#include <string.h>

#include "core.h"

#define CKPT_BOUND 4 /* inline checkpoint once the WAL holds this many times checkpoint_pages */

/* Worker thread: only this function touches ckpt_db and ckpt_err while ckpt_running is set. */
static void ckpt_work(uv_work_t *req) {
  saga_node *n = req->data;
  n->ckpt_err[0] = '\0';
  int rc = SQLITE_OK;
  if (n->ckpt_db == NULL) {
    rc = sqlite3_open_v2(n->ckpt_path, &n->ckpt_db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                         n->ckpt_vfs);
    if (rc == SQLITE_OK) {
      /* The checkpoint's fsyncs follow the node's durability setting. */
      const char *sql = n->ckpt_sync == SAGA_SYNC_OFF      ? "PRAGMA synchronous=OFF"
                        : n->ckpt_sync == SAGA_SYNC_NORMAL ? "PRAGMA synchronous=NORMAL"
                                                           : "PRAGMA synchronous=FULL";
      rc = sqlite3_exec(n->ckpt_db, sql, NULL, NULL, NULL);
    }
    if (rc != SQLITE_OK) {
      snprintf(n->ckpt_err, sizeof n->ckpt_err, "opening a connection for checkpoints: %s",
               n->ckpt_db != NULL ? sqlite3_errmsg(n->ckpt_db) : sqlite3_errstr(rc));
      sqlite3_close_v2(n->ckpt_db);
      n->ckpt_db = NULL;
      n->ckpt_rc = rc;
      n->ckpt_open_failed = 1;
      return;
    }
  }
  rc = sqlite3_wal_checkpoint_v2(n->ckpt_db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
  if (rc != SQLITE_OK)
    snprintf(n->ckpt_err, sizeof n->ckpt_err, "%s", sqlite3_errmsg(n->ckpt_db));
  n->ckpt_rc = rc;
}

static void ckpt_after(uv_work_t *req, int status) {
  saga_node *n = req->data;
  n->ckpt_running = 0;
  if (status == 0 && n->ckpt_rc == SQLITE_OK) {
    n->stats.checkpoints++;
  } else if (status == 0 && (n->ckpt_rc & 0xff) != SQLITE_BUSY) {
    /* BUSY: another checkpoint was running (another process's); the next commit retries. */
    n->stats.checkpoint_failures++;
    saga__node_log(n, SAGA_LOG_WARN, "background checkpoint failed: %s", n->ckpt_err);
    if (n->ckpt_open_failed && n->store.db != NULL) {
      saga__node_log(n, SAGA_LOG_WARN, "checkpointing inline from now on");
      sqlite3_wal_autocheckpoint(n->store.db, (int)n->ckpt_pages); /* replaces our hook */
    }
  }
  if (n->ckpt_close_wait) {
    n->ckpt_close_wait = 0;
    n->close_step(n); /* node.c waits for this pass (a callback: no call back into node.c) */
  }
}

static int wal_hook(void *arg, sqlite3 *db, const char *name, int pages) {
  saga_node *n = arg;
  if (pages < 0 || (uint32_t)pages < n->ckpt_pages) return SQLITE_OK;
  if ((uint64_t)pages >= (uint64_t)CKPT_BOUND * n->ckpt_pages && !n->ckpt_running) {
    /* Between two transactions on the loop: nothing writes meanwhile, so it completes and
     * the next transaction starts the WAL over. */
    int rc = sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    n->ckpt_last_pages = 0;
    if (rc == SQLITE_OK) {
      n->stats.checkpoints_inline++;
    } else if ((rc & 0xff) != SQLITE_BUSY) {
      n->stats.checkpoint_failures++;
      saga__node_log(n, SAGA_LOG_WARN, "checkpoint failed: %s", sqlite3_errmsg(db));
    }
    return SQLITE_OK;
  }
  /* Once per checkpoint_pages new pages: a pass that could not finish (commits kept adding
   * pages) is not followed at once by another for the few pages added meanwhile. */
  if (n->ckpt_running || n->closing) return SQLITE_OK;
  if ((uint32_t)pages < n->ckpt_last_pages) n->ckpt_last_pages = 0; /* the WAL started over */
  if ((uint32_t)pages - n->ckpt_last_pages < n->ckpt_pages) return SQLITE_OK;
  n->ckpt_last_pages = (uint32_t)pages;
  n->ckpt_running = 1;
  n->ckpt_req.data = n;
  if (uv_queue_work(n->loop, &n->ckpt_req, ckpt_work, ckpt_after) != 0) n->ckpt_running = 0;
  return SQLITE_OK;
}

int saga__checkpoint_init(saga_node *n, const saga_node_config *cfg, char *err, size_t errlen) {
  int mode = SAGA_CHECKPOINT_INLINE;
  uint32_t pages = 1000;
  if (cfg->struct_version >= 3) {
    mode = (int)cfg->checkpoint;
    if (cfg->checkpoint_pages != 0) pages = cfg->checkpoint_pages;
  }
  if (mode != SAGA_CHECKPOINT_BACKGROUND && mode != SAGA_CHECKPOINT_INLINE) {
    saga__errf(err, errlen, "config checkpoint mode %d is unknown", mode);
    return SAGA_EINVAL;
  }
  if (pages > INT32_MAX / CKPT_BOUND) pages = INT32_MAX / CKPT_BOUND;
  n->ckpt_pages = pages;
  n->ckpt_sync = (int)cfg->synchronous;
  /* An in-memory or temporary database has no WAL (and no name to open a second time). */
  const char *file = sqlite3_db_filename(n->store.db, "main");
  if (mode == SAGA_CHECKPOINT_INLINE || file == NULL || file[0] == '\0') {
    sqlite3_wal_autocheckpoint(n->store.db, (int)pages);
    return SAGA_OK;
  }
  n->ckpt_path = saga__strdup(n->alloc, file);
  if (n->ckpt_path == NULL ||
      (cfg->vfs != NULL && (n->ckpt_vfs = saga__strdup(n->alloc, cfg->vfs)) == NULL)) {
    saga__errf(err, errlen, "out of memory");
    return SAGA_ENOMEM;
  }
  sqlite3_wal_hook(n->store.db, wal_hook, n); /* replaces SQLite's auto-checkpoint */
  return SAGA_OK;
}

void saga__checkpoint_stop(saga_node *n) {
  if (n->ckpt_running) {
    n->ckpt_close_wait = 1;
    n->pending_closes++;
  }
}

void saga__checkpoint_free(saga_node *n) {
  if (n->ckpt_db != NULL) sqlite3_close_v2(n->ckpt_db);
  n->ckpt_db = NULL;
  saga__free(n->alloc, n->ckpt_path);
  saga__free(n->alloc, n->ckpt_vfs);
  n->ckpt_path = n->ckpt_vfs = NULL;
}
