/* sagactl locks: the semantic locks held in a database (saga_lock_view, migration 10). */
#include <stdlib.h>
#include <string.h>

#include "sagactl.h"

/* 1 when db has the view (a node of a libsaga with semantic locks opened it), else prints why
 * and returns 0. */
static int has_locks(sqlite3 *db, const char *path) {
  sqlite3_stmt *st = sctl_prepare(db, "SELECT count(*) FROM sqlite_master WHERE type = 'view' "
                                      "AND name = 'saga_lock_view'");
  if (st == NULL) return 0;
  int have = sqlite3_step(st) == SQLITE_ROW && sqlite3_column_int(st, 0) == 1;
  sqlite3_finalize(st);
  if (!have) {
    char *safe = sctl_safe_str(path, 200);
    sctl_err("'%s' has no semantic locks table (schema older than 10): start a node of this "
             "libsaga on it once to migrate it",
             safe);
    free(safe);
  }
  return have;
}

int sctl_cmd_locks(sctl_opts *o) {
  if (o->nargs < 1 || o->nargs > 2)
    return sctl_usage("locks", "locks takes one database and at most one saga id");
  const char *saga = o->nargs == 2 ? o->args[1] : NULL;
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  if (!has_locks(db, o->args[0])) {
    sctl_db_close(db);
    return SCTL_ERROR;
  }
  sqlite3_stmt *st = sctl_prepare(
      db, "SELECT type, id, saga_id, step, acquired_ms, saga_state, definition "
          "FROM saga_lock_view WHERE (?1 IS NULL OR type = ?1) AND (?2 IS NULL OR saga_id = ?2)"
          " ORDER BY acquired_ms, type, id LIMIT ?3");
  if (st == NULL) {
    sctl_db_close(db);
    return SCTL_ERROR;
  }
  if (o->type != NULL) sqlite3_bind_text(st, 1, o->type, -1, SQLITE_STATIC);
  if (saga != NULL) sqlite3_bind_text(st, 2, saga, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 3, o->limit > 0 ? o->limit : 100);
  static const char *const hdr[] = {"TYPE", "ID", "SAGA", "STEP", "HELD FOR", "SAGA STATE"};
  sctl_table t;
  json_t *arr = NULL;
  if (o->json)
    arr = json_array();
  else
    sctl_table_init(&t, 6, hdr);
  int64_t now = sctl_now_ms();
  int r;
  while ((r = sqlite3_step(st)) == SQLITE_ROW) {
    int64_t at = sqlite3_column_int64(st, 4);
    int here = sqlite3_column_type(st, 5) != SQLITE_NULL;
    char b[40];
    if (o->json) {
      json_t *e = json_object();
      json_object_set_new(e, "type", sctl_jstr0(sctl_col_text(st, 0)));
      json_object_set_new(e, "id", sctl_jstr0(sctl_col_text(st, 1)));
      json_object_set_new(e, "saga_id", sctl_jstr0(sctl_col_text(st, 2)));
      json_object_set_new(e, "step", json_integer(sqlite3_column_int64(st, 3)));
      json_object_set_new(e, "acquired_ms", json_integer(at));
      json_object_set_new(e, "acquired", json_string(sctl_iso(at, b, sizeof b)));
      json_object_set_new(e, "held_s", json_integer((now - at) / 1000));
      json_object_set_new(e, "saga_state", here ? sctl_jstr0(sctl_col_text(st, 5)) : json_null());
      json_object_set_new(e, "definition", here ? sctl_jstr0(sctl_col_text(st, 6)) : json_null());
      json_array_append_new(arr, e);
      continue;
    }
    char *cells[6];
    cells[0] = sctl_safe_str(sctl_col_text(st, 0), 0);
    cells[1] = sctl_safe_str(sctl_col_text(st, 1), 60);
    cells[2] = sctl_safe_str(sctl_col_text(st, 2), 0);
    cells[3] = sctl_fmt("%lld", (long long)sqlite3_column_int64(st, 3));
    cells[4] = sctl_strdup(sctl_age(now - at, b, sizeof b));
    cells[5] = here ? sctl_safe_str(sctl_col_text(st, 5), 0) : sctl_strdup("(elsewhere)");
    sctl_table_row(&t, cells);
  }
  sqlite3_finalize(st);
  int rc = r == SQLITE_DONE ? SCTL_OK : sctl_db_error(db, "reading the locks");
  sctl_db_close(db);
  return sctl_emit(rc, o->json ? arr : NULL, o->json ? NULL : &t);
}
