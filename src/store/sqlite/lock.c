/*
 * saga_lock_holder() (include/saga/lock.h): reads saga_lock on any connection to a libsaga
 * database — a handler's saga_tx_db() or an application's own — so it lives with the rest of
 * the SQL. Prepared per call: the connection is the caller's, not the store's.
 */
#include <stdio.h>
#include <string.h>

#include "sqlite_store.h"

int saga_lock_holder(sqlite3 *db, const char *type, const char *id, char *saga_id, size_t len) {
  if (db == NULL || type == NULL || type[0] == '\0' || id == NULL || id[0] == '\0' ||
      (saga_id != NULL && len < SAGA_LOCK_HOLDER_SIZE))
    return SAGA_EINVAL;
  if (strlen(type) > SAGA_LOCK_TYPE_MAX || strlen(id) > SAGA_LOCK_ID_MAX) return SAGA_ETOOBIG;
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v2(db, "SELECT saga_id FROM saga_lock WHERE type = ?1 AND id = ?2", -1,
                              &st, NULL);
  if (rc != SQLITE_OK) {
    int code = saga__sq_err(rc);
    return code != SAGA_OK ? code : SAGA_ESTORE;
  }
  sqlite3_bind_text(st, 1, type, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
  rc = sqlite3_step(st);
  int code = SAGA_ENOTFOUND;
  if (rc == SQLITE_ROW) {
    code = SAGA_OK;
    if (saga_id != NULL) {
      const char *v = (const char *)sqlite3_column_text(st, 0);
      snprintf(saga_id, len, "%.39s", v != NULL ? v : "");
    }
  } else if (rc != SQLITE_DONE) {
    code = saga__sq_err(rc);
    if (code == SAGA_OK) code = SAGA_ESTORE;
  }
  sqlite3_finalize(st);
  return code;
}
