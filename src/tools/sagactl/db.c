/* sagactl: opening a node's database safely, and checking that it is one. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sagactl.h"

/* How long a statement waits for a lock the node holds (a checkpoint, a write transaction
 * for the requests) before giving up. The node's transactions are short. */
#define SCTL_BUSY_MS 5000

int sctl_db_error(sqlite3 *db, const char *what) {
  return sctl_err("%s: %s", what, db != NULL ? sqlite3_errmsg(db) : "out of memory");
}

sqlite3_stmt *sctl_prepare(sqlite3 *db, const char *sql) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
    sctl_db_error(db, "reading the database");
    sqlite3_finalize(st);
    return NULL;
  }
  return st;
}

const char *sctl_col_text(sqlite3_stmt *st, int i) {
  const unsigned char *t = sqlite3_column_text(st, i);
  return t != NULL ? (const char *)t : "";
}

void sctl_db_close(sqlite3 *db) { sqlite3_close_v2(db); }

sqlite3 *sctl_db_open(const char *path, int rw) {
  struct stat sb;
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  char *safe = sctl_safe_str(path, 0);
  /* Never create a file: SQLite would make an empty database of a mistyped name. */
  if (stat(path, &sb) != 0) {
    sctl_err("cannot open '%s': %s", safe, strerror(errno));
    goto fail;
  }
  if (!S_ISREG(sb.st_mode)) {
    sctl_err("'%s' is not a regular file", safe);
    goto fail;
  }
  if (sb.st_size == 0) {
    sctl_err("'%s' is empty (0 bytes): not a libsaga database", safe);
    goto fail;
  }
  int flags = (rw ? SQLITE_OPEN_READWRITE : SQLITE_OPEN_READONLY) | SQLITE_OPEN_NOMUTEX;
  if (sqlite3_open_v2(path, &db, flags, NULL) != SQLITE_OK) {
    sctl_err("cannot open '%s': %s", safe, db ? sqlite3_errmsg(db) : "out of memory");
    goto fail;
  }
  sqlite3_busy_timeout(db, SCTL_BUSY_MS);
  sqlite3_extended_result_codes(db, 1);
  /* The first read tells an SQLite file from anything else. */
  if (sqlite3_prepare_v2(db,
                         "SELECT (SELECT count(*) FROM sqlite_master WHERE type = 'table' AND "
                         "name = 'saga_instance'), (SELECT user_version FROM pragma_user_version)",
                         -1, &st, NULL) != SQLITE_OK ||
      sqlite3_step(st) != SQLITE_ROW) {
    int code = sqlite3_errcode(db) & 0xff;
    if (code == SQLITE_NOTADB)
      sctl_err("'%s' is not an SQLite database, so not a libsaga database", safe);
    else
      sctl_err("cannot read '%s': %s", safe, sqlite3_errmsg(db));
    goto fail;
  }
  int has_instance = sqlite3_column_int(st, 0);
  int version = sqlite3_column_int(st, 1);
  sqlite3_finalize(st);
  st = NULL;
  if (!has_instance) {
    sctl_err("'%s' is an SQLite database but not a libsaga one (no saga_instance table)", safe);
    goto fail;
  }
  if (version < SCTL_SCHEMA_MIN) {
    sctl_err("'%s' is a libsaga database of schema version %d; sagactl needs version %d or "
             "later: start a node of this libsaga on it once to migrate it",
             safe, version, SCTL_SCHEMA_MIN);
    goto fail;
  }
  free(safe);
  return db;
fail:
  sqlite3_finalize(st);
  sqlite3_close_v2(db);
  free(safe);
  return NULL;
}
