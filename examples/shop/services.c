/* What the services keep across requests, released at shutdown; and the services' schema
 * versions. */
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

#include "shop.h"

/* Not in shop.h (shared, unchanged): each is defined by its service.
 * account.c: its database connection and statements.
 * purchase.c: pending purchase starts, open result streams, the product check's read-only
 * connection, the event deduplication memory. */
void shop_account_close(void);
void shop_purchase_close(shop_ctx *c);

void shop_services_close(shop_ctx *c) {
  shop_purchase_close(c);
  shop_account_close();
}

/* The version a service's tables are at: 0 when it has none recorded (a new database, or one
 * made before versions were recorded, whose tables are those of version 1). -1 on error. */
static int schema_version(sqlite3 *db, const char *service) {
  sqlite3_stmt *st = NULL;
  int v = -1;
  if (sqlite3_exec(db,
                   "CREATE TABLE IF NOT EXISTS shop_schema (service TEXT PRIMARY KEY,"
                   " version INTEGER NOT NULL)",
                   NULL, NULL, NULL) == SQLITE_OK &&
      sqlite3_prepare_v2(db, "SELECT version FROM shop_schema WHERE service = ?1", -1, &st, NULL) ==
          SQLITE_OK &&
      sqlite3_bind_text(st, 1, service, -1, SQLITE_STATIC) == SQLITE_OK) {
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
      v = sqlite3_column_int(st, 0);
    else if (rc == SQLITE_DONE)
      v = 0;
  }
  sqlite3_finalize(st);
  return v;
}

int shop_schema_migrate(sqlite3 *db, const char *service, const char *const *migrations, int n) {
  for (;;) {
    if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) break;
    int have = schema_version(db, service); /* read again inside the transaction */
    if (have < 0 || have > n) {
      if (have > n)
        fprintf(stderr, "[%s] the database is at schema version %d, newer than this shop (%d)\n",
                service, have, n);
      sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
      return -1;
    }
    if (have == n) return sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) == SQLITE_OK ? 0 : -1;
    char *err = NULL;
    sqlite3_stmt *set = NULL;
    int ok = sqlite3_exec(db, migrations[have], NULL, NULL, &err) == SQLITE_OK &&
             sqlite3_prepare_v2(db,
                                "INSERT INTO shop_schema (service, version) VALUES (?1, ?2) "
                                "ON CONFLICT (service) DO UPDATE SET version = excluded.version",
                                -1, &set, NULL) == SQLITE_OK &&
             sqlite3_bind_text(set, 1, service, -1, SQLITE_STATIC) == SQLITE_OK &&
             sqlite3_bind_int(set, 2, have + 1) == SQLITE_OK && sqlite3_step(set) == SQLITE_DONE;
    sqlite3_finalize(set);
    if (!ok || sqlite3_exec(db, "COMMIT", NULL, NULL, &err) != SQLITE_OK) {
      fprintf(stderr, "[%s] schema migration %d: %s\n", service, have + 1,
              err ? err : sqlite3_errmsg(db));
      sqlite3_free(err);
      sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
      return -1;
    }
  }
  fprintf(stderr, "[%s] schema: %s\n", service, sqlite3_errmsg(db));
  return -1;
}

int shop_store_error(sqlite3 *db, const char *service, const char *what) {
  fprintf(stderr, "[%s] %s: %s\n", service, what, sqlite3_errmsg(db));
  return sqlite3_errcode(db) == SQLITE_NOMEM ? SAGA_ENOMEM : SAGA_EIO;
}

int shop_record_owner(sqlite3 *db, const char *service, const char *sql, const saga_msg *cmd,
                      const char *purchase_id) {
  sqlite3_stmt *st = NULL;
  int rc;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
    rc = shop_store_error(db, service, "preparing a statement");
  else if (sqlite3_bind_text(st, 1, purchase_id, -1, SQLITE_STATIC) != SQLITE_OK)
    rc = shop_store_error(db, service, "binding");
  else if ((rc = sqlite3_step(st)) == SQLITE_DONE)
    rc = 0;
  else if (rc == SQLITE_ROW) {
    const char *saga = (const char *)sqlite3_column_text(st, 0);
    rc = saga != NULL && strcmp(saga, saga_msg_saga_id(cmd)) == 0 &&
                 sqlite3_column_type(st, 1) == SQLITE_INTEGER &&
                 sqlite3_column_int64(st, 1) == (int64_t)saga_msg_step(cmd)
             ? 1
             : 2;
  } else
    rc = shop_store_error(db, service, "reading who made a record");
  sqlite3_finalize(st);
  return rc;
}

json_t *shop_purchase_id_json(const char *id) {
  int64_t v = 0;
  const char *p = id;
  for (; *p >= '0' && *p <= '9'; p++) {
    if (v > (INT64_MAX - (*p - '0')) / 10) break;
    v = v * 10 + (*p - '0');
  }
  int numeric = *p == '\0' && p != id && (id[0] != '0' || id[1] == '\0');
  return numeric ? json_integer((json_int_t)v) : json_string(id);
}
