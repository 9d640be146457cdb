/* sagactl: list, show, retry, cancel, requests — and writing and waiting for requests. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <saga.h>

#include "sagactl.h"

static const char *state_name(int s) { return saga_state_name(s); }
static const char *phase_name(int p) {
  return p == 0 ? "ACTION" : p == 1 ? "COMPENSATION" : p == 2 ? "RESOLVE" : "UNKNOWN";
}
static const char *wait_name(int w) {
  return w == 0 ? "NONE" : w == 1 ? "REPLY" : w == 2 ? "BACKOFF" : "UNKNOWN";
}
static const char *req_state_name(int s) {
  return s == 0 ? "PENDING" : s == 1 ? "DONE" : s == 2 ? "REFUSED" : "UNKNOWN";
}

/* ---- selecting sagas by the filter options ---- */

enum {
  C_ID, C_DEF, C_VER, C_STATE, C_STEP, C_STEPNAME, C_PHASE, C_ATTEMPT, C_WAIT, C_KEY,
  C_CREATED, C_UPDATED, C_ERROR, C_PARKED, C_DATA, C_TRACE
};
#define SAGA_COLS                                                                              \
  "i.id, i.def_name, i.def_version, i.state, i.step, coalesce(s.name, ''), i.phase, "          \
  "i.attempt, i.wait, i.idem_key, i.created_ms, i.updated_ms, i.error, i.parked, i.data, "     \
  "i.trace_parent "                                                                            \
  "FROM saga_instance i LEFT JOIN saga_definition_step s ON s.def_name = i.def_name AND "      \
  "s.def_version = i.def_version AND s.step = i.step "

/* Runs cb on every saga matching o's filters (state overrides o->state_num when nonzero),
 * newest first, at most limit (< 0: all). Sets *more when more rows matched than limit. */
static int select_sagas(sqlite3 *db, const sctl_opts *o, int state, long limit,
                        void (*cb)(void *arg, sqlite3_stmt *st), void *arg, int *more) {
  char sql[1024];
  int n = snprintf(sql, sizeof sql, "SELECT " SAGA_COLS "WHERE 1");
  if (state) n += snprintf(sql + n, sizeof sql - (size_t)n, " AND i.state = ?1");
  if (o->definition) n += snprintf(sql + n, sizeof sql - (size_t)n, " AND i.def_name = ?2");
  if (o->older_ms >= 0) n += snprintf(sql + n, sizeof sql - (size_t)n, " AND i.updated_ms <= ?3");
  if (o->key) n += snprintf(sql + n, sizeof sql - (size_t)n, " AND i.idem_key = ?4");
  snprintf(sql + n, sizeof sql - (size_t)n, " ORDER BY i.created_ms DESC, i.id DESC LIMIT ?5");
  sqlite3_stmt *st = sctl_prepare(db, sql);
  if (st == NULL) return SCTL_ERROR;
  if (state) sqlite3_bind_int(st, 1, state);
  if (o->definition) sqlite3_bind_text(st, 2, o->definition, -1, SQLITE_STATIC);
  if (o->older_ms >= 0) sqlite3_bind_int64(st, 3, sctl_now_ms() - o->older_ms);
  if (o->key) sqlite3_bind_text(st, 4, o->key, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 5, limit < 0 ? -1 : (sqlite3_int64)limit + 1);
  long count = 0;
  int rc;
  *more = 0;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    if (limit >= 0 && count == limit) {
      *more = 1;
      break;
    }
    cb(arg, st);
    count++;
  }
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
    sqlite3_finalize(st);
    return sctl_db_error(db, "reading sagas");
  }
  sqlite3_finalize(st);
  return SCTL_OK;
}

/* The saga's trace id: the one of the traceparent it was started with (the node checked it
 * then: "00-" and 32 hex digits), else its own id. Into out (33 bytes). */
static const char *trace_id(sqlite3_stmt *st, char out[33]) {
  const char *tp = sctl_col_text(st, C_TRACE);
  const char *id = strlen(tp) >= 35 ? tp + 3 : sctl_col_text(st, C_ID);
  size_t n = 0;
  for (; n < 32 && ((id[n] >= '0' && id[n] <= '9') || (id[n] >= 'a' && id[n] <= 'f')); n++)
    out[n] = id[n];
  out[n] = '\0';
  return out;
}

static json_t *saga_json(sqlite3_stmt *st, int64_t now) {
  char b1[40], b2[40];
  const char *key = (const char *)sqlite3_column_text(st, C_KEY);
  int64_t created = sqlite3_column_int64(st, C_CREATED), updated = sqlite3_column_int64(st, C_UPDATED);
  json_t *j = json_object();
  json_object_set_new(j, "id", sctl_jstr0(sctl_col_text(st, C_ID)));
  json_object_set_new(j, "definition", sctl_jstr0(sctl_col_text(st, C_DEF)));
  json_object_set_new(j, "version", json_integer(sqlite3_column_int64(st, C_VER)));
  json_object_set_new(j, "state", json_string(state_name(sqlite3_column_int(st, C_STATE))));
  json_object_set_new(j, "step", json_integer(sqlite3_column_int64(st, C_STEP)));
  json_object_set_new(j, "step_name", sctl_jstr0(sctl_col_text(st, C_STEPNAME)));
  json_object_set_new(j, "phase", json_string(phase_name(sqlite3_column_int(st, C_PHASE))));
  json_object_set_new(j, "attempt", json_integer(sqlite3_column_int64(st, C_ATTEMPT)));
  json_object_set_new(j, "waiting_for", json_string(wait_name(sqlite3_column_int(st, C_WAIT))));
  json_object_set_new(j, "key", key != NULL ? sctl_jstr0(key) : json_null());
  char trace[33];
  json_object_set_new(j, "trace_id", json_string(trace_id(st, trace)));
  json_object_set_new(j, "created_ms", json_integer(created));
  json_object_set_new(j, "created", json_string(sctl_iso(created, b1, sizeof b1)));
  json_object_set_new(j, "updated_ms", json_integer(updated));
  json_object_set_new(j, "updated", json_string(sctl_iso(updated, b2, sizeof b2)));
  json_object_set_new(j, "age_s", json_integer((now - created) / 1000));
  json_object_set_new(j, "parked", json_boolean(sqlite3_column_int(st, C_PARKED)));
  json_object_set_new(j, "error", sctl_jstr0(sctl_col_text(st, C_ERROR)));
  return j;
}

/* The step column of a table: "2 charge", or "2" when the definition was not recorded. */
static char *step_cell(sqlite3_stmt *st) {
  const char *name = sctl_col_text(st, C_STEPNAME);
  char *safe = sctl_safe_str(name, 24);
  char *cell = name[0] ? sctl_fmt("%d %s", sqlite3_column_int(st, C_STEP), safe)
                       : sctl_fmt("%d", sqlite3_column_int(st, C_STEP));
  free(safe);
  return cell;
}

typedef struct list_ctx {
  int json;
  int64_t now;
  json_t *arr;
  sctl_table t;
} list_ctx;

static void list_row(void *arg, sqlite3_stmt *st) {
  list_ctx *c = arg;
  if (c->json) {
    json_array_append_new(c->arr, saga_json(st, c->now));
    return;
  }
  char a1[16], a2[16];
  char *def = sctl_safe_str(sctl_col_text(st, C_DEF), 32);
  char *cells[8];
  cells[0] = sctl_safe_str(sctl_col_text(st, C_ID), 0);
  cells[1] = sctl_fmt("%s@%lld", def, (long long)sqlite3_column_int64(st, C_VER));
  cells[2] = sctl_fmt("%s%s", state_name(sqlite3_column_int(st, C_STATE)),
                      sqlite3_column_int(st, C_PARKED) ? " (parked)" : "");
  cells[3] = step_cell(st);
  cells[4] = sctl_fmt("%lld", (long long)sqlite3_column_int64(st, C_ATTEMPT));
  cells[5] = sctl_strdup(sctl_age(c->now - sqlite3_column_int64(st, C_CREATED), a1, sizeof a1));
  cells[6] = sctl_strdup(sctl_age(c->now - sqlite3_column_int64(st, C_UPDATED), a2, sizeof a2));
  cells[7] = sctl_safe_str(sctl_col_text(st, C_ERROR), 48);
  free(def);
  sctl_table_row(&c->t, cells);
}

static const char *const list_header[] = {"ID",      "DEFINITION", "STATE",   "STEP",
                                          "ATTEMPT", "AGE",        "UPDATED", "ERROR"};

int sctl_cmd_list(sctl_opts *o) {
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  list_ctx c = {.json = o->json, .now = sctl_now_ms()};
  if (c.json)
    c.arr = json_array();
  else
    sctl_table_init(&c.t, 8, list_header);
  int more = 0;
  long limit = o->limit >= 0 ? o->limit : 100;
  int rc = select_sagas(db, o, o->state_num, limit, list_row, &c, &more);
  sctl_db_close(db);
  if (rc == SCTL_OK) {
    if (c.json) {
      rc = sctl_json_print(c.arr);
      c.arr = NULL;
    } else {
      sctl_table_print(&c.t, stdout);
    }
    if (more)
      fprintf(stderr, "sagactl: more sagas match than the %ld shown (--limit N)\n", limit);
  }
  json_decref(c.arr);
  if (!c.json) sctl_table_free(&c.t);
  return rc;
}

/* ---- show ---- */

typedef struct data_ctx {
  int values, json;
  json_t *arr;
  size_t count, bytes;
} data_ctx;

static void data_entry(void *arg, const char *key, size_t klen, const unsigned char *val,
                       size_t vlen) {
  data_ctx *c = arg;
  c->count++;
  c->bytes += vlen;
  if (c->json) {
    json_t *e = json_object();
    json_object_set_new(e, "key", sctl_jstr(key, klen));
    json_object_set_new(e, "bytes", json_integer((json_int_t)vlen));
    if (c->values) json_object_set_new(e, "value", sctl_jstr((const char *)val, vlen));
    json_array_append_new(c->arr, e);
    return;
  }
  char *k = sctl_safe(key, klen, 0);
  if (c->values) {
    char *v = sctl_safe((const char *)val, vlen, 0);
    printf("  %-20s %8zu bytes  %s\n", k, vlen, v);
    free(v);
  } else {
    printf("  %-20s %8zu bytes\n", k, vlen);
  }
  free(k);
}

static int show_history(sqlite3 *db, const char *id, int json, json_t *out) {
  sqlite3_stmt *st = sctl_prepare(
      db, "SELECT h.seq, h.at_ms, h.event, h.step, coalesce(s.name, ''), h.attempt, h.detail "
          "FROM saga_history h LEFT JOIN saga_instance i ON i.id = h.saga_id "
          "LEFT JOIN saga_definition_step s ON s.def_name = i.def_name AND "
          "s.def_version = i.def_version AND s.step = h.step "
          "WHERE h.saga_id = ?1 ORDER BY h.seq");
  if (st == NULL) return SCTL_ERROR;
  sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
  static const char *const hdr[] = {"TIME", "STEP", "ATTEMPT", "EVENT", "DETAIL"};
  sctl_table t;
  if (!json) sctl_table_init(&t, 5, hdr);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    char b[40];
    int64_t at = sqlite3_column_int64(st, 1);
    int event = sqlite3_column_int(st, 2);
    int step = sqlite3_column_int(st, 3);
    const char *sname = sctl_col_text(st, 4);
    const char *ename = saga_event_name(event);
    if (json) {
      json_t *e = json_object();
      json_object_set_new(e, "seq", json_integer(sqlite3_column_int64(st, 0)));
      json_object_set_new(e, "at_ms", json_integer(at));
      json_object_set_new(e, "at", json_string(sctl_iso(at, b, sizeof b)));
      json_object_set_new(e, "event", json_string(ename));
      json_object_set_new(e, "step", json_integer(step));
      json_object_set_new(e, "step_name", sctl_jstr0(sname));
      json_object_set_new(e, "attempt", json_integer(sqlite3_column_int64(st, 5)));
      json_object_set_new(e, "detail", sctl_jstr0(sctl_col_text(st, 6)));
      json_array_append_new(out, e);
      continue;
    }
    char *cells[5];
    char *sn = sctl_safe_str(sname, 24);
    cells[0] = sctl_strdup(sctl_iso(at, b, sizeof b));
    cells[1] = step < 0 ? sctl_strdup("-") : sn[0] ? sctl_fmt("%d %s", step, sn)
                                                   : sctl_fmt("%d", step);
    cells[2] = sctl_fmt("%lld", (long long)sqlite3_column_int64(st, 5));
    cells[3] = sctl_strdup(ename);
    cells[4] = sctl_safe_str(sctl_col_text(st, 6), 0);
    free(sn);
    sctl_table_row(&t, cells);
  }
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) {
    if (!json) sctl_table_free(&t);
    return sctl_db_error(db, "reading the history");
  }
  if (!json) {
    printf("\ntimeline:\n");
    sctl_table_print(&t, stdout);
    sctl_table_free(&t);
  }
  return SCTL_OK;
}

/* Requests rows (id, at_ms, action, target, requested_by, state, result, done_ms) as a table
 * or JSON objects. */
#define REQ_COLS "id, at_ms, action, target, requested_by, state, result, done_ms "
static json_t *request_json(sqlite3_stmt *st) {
  char b[40];
  json_t *e = json_object();
  json_object_set_new(e, "id", json_integer(sqlite3_column_int64(st, 0)));
  json_object_set_new(e, "at_ms", json_integer(sqlite3_column_int64(st, 1)));
  json_object_set_new(e, "requested", json_string(sctl_iso(sqlite3_column_int64(st, 1), b, sizeof b)));
  json_object_set_new(e, "action", sctl_jstr0(sctl_col_text(st, 2)));
  json_object_set_new(e, "target", sctl_jstr0(sctl_col_text(st, 3)));
  json_object_set_new(e, "requested_by", sctl_jstr0(sctl_col_text(st, 4)));
  json_object_set_new(e, "state", json_string(req_state_name(sqlite3_column_int(st, 5))));
  json_object_set_new(e, "result", sctl_jstr0(sctl_col_text(st, 6)));
  if (sqlite3_column_type(st, 7) == SQLITE_NULL)
    json_object_set_new(e, "done_ms", json_null());
  else
    json_object_set_new(e, "done_ms", json_integer(sqlite3_column_int64(st, 7)));
  return e;
}
static const char *const req_header[] = {"REQUEST", "REQUESTED", "ACTION", "TARGET",
                                         "BY",      "STATE",     "RESULT", "DONE"};
static void request_row(sctl_table *t, sqlite3_stmt *st, int64_t now) {
  char a[16];
  char *cells[8];
  cells[0] = sctl_fmt("%lld", (long long)sqlite3_column_int64(st, 0));
  cells[1] = sctl_fmt("%s ago", sctl_age(now - sqlite3_column_int64(st, 1), a, sizeof a));
  cells[2] = sctl_safe_str(sctl_col_text(st, 2), 0);
  cells[3] = sctl_safe_str(sctl_col_text(st, 3), 0);
  cells[4] = sctl_safe_str(sctl_col_text(st, 4), 24);
  cells[5] = sctl_strdup(req_state_name(sqlite3_column_int(st, 5)));
  cells[6] = sctl_safe_str(sctl_col_text(st, 6), 60);
  cells[7] = sqlite3_column_type(st, 7) == SQLITE_NULL
                 ? sctl_strdup("-")
                 : sctl_fmt("%s ago", sctl_age(now - sqlite3_column_int64(st, 7), a, sizeof a));
  sctl_table_row(t, cells);
}

/* Prints (or adds to out) the requests of a query whose ?1 is bound by the caller. */
static int print_requests(sqlite3 *db, sqlite3_stmt *st, int json, json_t *out, const char *title) {
  sctl_table t;
  int64_t now = sctl_now_ms();
  size_t n = 0;
  if (!json) sctl_table_init(&t, 8, req_header);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    n++;
    if (json)
      json_array_append_new(out, request_json(st));
    else
      request_row(&t, st, now);
  }
  if (rc != SQLITE_DONE) {
    if (!json) sctl_table_free(&t);
    return sctl_db_error(db, "reading operator requests");
  }
  if (!json) {
    if (title != NULL) printf("\n%s:\n", title);
    if (n > 0 || title == NULL)
      sctl_table_print(&t, stdout);
    else
      printf("  (none)\n");
    sctl_table_free(&t);
  }
  return SCTL_OK;
}

int sctl_cmd_show(sctl_opts *o) {
  if (o->nargs != 2) return sctl_usage("show", "show takes a database and one saga id");
  const char *id = o->args[1];
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  int rc = SCTL_ERROR;
  json_t *j = NULL;
  sqlite3_stmt *req = NULL;
  sqlite3_stmt *st = sctl_prepare(db, "SELECT " SAGA_COLS "WHERE i.id = ?1");
  if (st == NULL) goto done;
  sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
  int r = sqlite3_step(st);
  if (r == SQLITE_DONE) {
    char *safe = sctl_safe_str(id, 64);
    sctl_err("no saga '%s' in '%s'", safe, o->args[0]);
    free(safe);
    goto done;
  }
  if (r != SQLITE_ROW) {
    sctl_db_error(db, "reading the saga");
    goto done;
  }
  int64_t now = sctl_now_ms();
  const void *data = sqlite3_column_blob(st, C_DATA);
  size_t dlen = (size_t)sqlite3_column_bytes(st, C_DATA);
  data_ctx dc = {.values = o->values, .json = o->json};
  const char *derr = NULL;
  if (o->json) {
    j = saga_json(st, now);
    dc.arr = json_array();
    if (sctl_data_walk(data, dlen, data_entry, &dc, &derr) != 0)
      json_object_set_new(j, "data_error", json_string(derr));
    json_object_set_new(j, "data_bytes", json_integer((json_int_t)dlen));
    json_object_set_new(j, "data", dc.arr);
  } else {
    char b1[40], b2[40], a1[16], a2[16];
    const char *key = (const char *)sqlite3_column_text(st, C_KEY);
    char *def = sctl_safe_str(sctl_col_text(st, C_DEF), 0);
    char *sname = sctl_safe_str(sctl_col_text(st, C_STEPNAME), 0);
    char *skey = key != NULL ? sctl_safe_str(key, 0) : sctl_strdup("(none)");
    char *serr = sctl_safe_str(sctl_col_text(st, C_ERROR), 0);
    int64_t created = sqlite3_column_int64(st, C_CREATED);
    int64_t updated = sqlite3_column_int64(st, C_UPDATED);
    printf("saga        %s\n", sctl_col_text(st, C_ID));
    printf("definition  %s@%lld\n", def, (long long)sqlite3_column_int64(st, C_VER));
    printf("state       %s%s\n", state_name(sqlite3_column_int(st, C_STATE)),
           sqlite3_column_int(st, C_PARKED) ? " (parked: definition version not registered)"
                                            : "");
    printf("step        %d%s%s (%s, attempt %lld, waiting for %s)\n",
           sqlite3_column_int(st, C_STEP), sname[0] ? " " : "", sname,
           phase_name(sqlite3_column_int(st, C_PHASE)),
           (long long)sqlite3_column_int64(st, C_ATTEMPT),
           wait_name(sqlite3_column_int(st, C_WAIT)));
    char trace[33];
    printf("key         %s\n", skey);
    printf("trace       %s\n", trace_id(st, trace));
    printf("created     %s (%s ago)\n", sctl_iso(created, b1, sizeof b1),
           sctl_age(now - created, a1, sizeof a1));
    printf("updated     %s (%s ago)\n", sctl_iso(updated, b2, sizeof b2),
           sctl_age(now - updated, a2, sizeof a2));
    printf("error       %s\n", serr[0] ? serr : "(none)");
    free(def), free(sname), free(skey), free(serr);
    /* Count first, so that the header line comes before the entries. */
    data_ctx count = {.json = 1, .arr = json_array()};
    int ok = sctl_data_walk(data, dlen, data_entry, &count, &derr) == 0;
    json_decref(count.arr);
    if (ok) {
      printf("data        %zu key%s, %zu bytes%s\n", count.count, count.count == 1 ? "" : "s",
             dlen, o->values ? "" : " (values hidden; --values shows them)");
      sctl_data_walk(data, dlen, data_entry, &dc, &derr);
    } else {
      printf("data        %zu bytes, not a valid data map (%s)\n", dlen, derr);
    }
  }
  char sid[80];
  snprintf(sid, sizeof sid, "%s", sctl_col_text(st, C_ID));
  sqlite3_finalize(st);
  st = NULL;
  json_t *hist = o->json ? json_array() : NULL;
  if (show_history(db, sid, o->json, hist) != SCTL_OK) {
    json_decref(hist);
    goto done;
  }
  if (o->json) json_object_set_new(j, "history", hist);
  req = sctl_prepare(db, "SELECT " REQ_COLS "FROM saga_operator_request WHERE target = ?1 "
                         "ORDER BY id");
  if (req == NULL) goto done;
  sqlite3_bind_text(req, 1, sid, -1, SQLITE_STATIC);
  json_t *reqs = o->json ? json_array() : NULL;
  if (print_requests(db, req, o->json, reqs, "operator requests") != SCTL_OK) {
    json_decref(reqs);
    goto done;
  }
  if (o->json) {
    json_object_set_new(j, "requests", reqs);
    rc = sctl_json_print(j);
    j = NULL;
  } else {
    rc = SCTL_OK;
  }
done:
  json_decref(j);
  sqlite3_finalize(st);
  sqlite3_finalize(req);
  sctl_db_close(db);
  return rc;
}

/* ---- requests ---- */

int sctl_cmd_requests(sctl_opts *o) {
  if (o->nargs != 1) return sctl_usage("requests", "requests takes one database");
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  sqlite3_stmt *st = sctl_prepare(db, o->pending ? "SELECT " REQ_COLS
                                                   "FROM saga_operator_request WHERE state = 0 "
                                                   "ORDER BY id DESC LIMIT ?1"
                                                 : "SELECT " REQ_COLS
                                                   "FROM saga_operator_request "
                                                   "ORDER BY id DESC LIMIT ?1");
  int rc = SCTL_ERROR;
  if (st != NULL) {
    sqlite3_bind_int64(st, 1, o->limit >= 0 ? o->limit : 100);
    json_t *arr = o->json ? json_array() : NULL;
    rc = print_requests(db, st, o->json, arr, NULL);
    if (rc == SCTL_OK && o->json)
      rc = sctl_json_print(arr);
    else
      json_decref(arr);
  }
  sqlite3_finalize(st);
  sctl_db_close(db);
  return rc;
}

/* ---- writing requests, and waiting for them ---- */

static int wait_requests(sctl_opts *o, const sqlite3_int64 *ids, size_t n) {
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  sqlite3_stmt *st = sctl_prepare(db, "SELECT " REQ_COLS "FROM saga_operator_request WHERE id = ?1");
  if (st == NULL) {
    sctl_db_close(db);
    return SCTL_ERROR;
  }
  int64_t until = sctl_now_ms() + (int64_t)o->wait_s * 1000;
  int *done = calloc(n ? n : 1, sizeof *done);
  size_t left = n, refused = 0;
  int rc = SCTL_OK;
  if (done == NULL) {
    sctl_err("out of memory");
    goto out;
  }
  for (;;) {
    for (size_t i = 0; i < n; i++) {
      if (done[i]) continue;
      sqlite3_reset(st);
      sqlite3_bind_int64(st, 1, ids[i]);
      int r = sqlite3_step(st);
      if (r == SQLITE_DONE) { /* deleted by someone: nothing to wait for */
        printf("request %lld: gone\n", (long long)ids[i]);
        done[i] = 1, left--, refused++;
        continue;
      }
      if (r != SQLITE_ROW) {
        rc = sctl_db_error(db, "reading operator requests");
        goto out;
      }
      int state = sqlite3_column_int(st, 5);
      if (state == 0) continue;
      char *target = sctl_safe_str(sctl_col_text(st, 3), 0);
      char *result = sctl_safe_str(sctl_col_text(st, 6), 0);
      printf("request %lld: %s %s: %s%s%s\n", (long long)ids[i], sctl_col_text(st, 2), target,
             req_state_name(state), result[0] ? ": " : "", result);
      free(target), free(result);
      done[i] = 1, left--;
      if (state != 1) refused++;
    }
    if (left == 0) break;
    if (sctl_now_ms() >= until) {
      sctl_err("%zu request%s still pending after %ld s (is a node running on this "
               "database? a node carries requests out within a second, or at its next start)",
               left, left == 1 ? "" : "s", o->wait_s);
      rc = SCTL_ERROR;
      goto out;
    }
    /* A CLI polling a table it only reads: a short sleep between two reads is all it does. */
    struct timespec ts = {0, 100 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  if (refused > 0) {
    sctl_err("%zu of %zu request%s refused", refused, n, n == 1 ? " was" : "s were");
    rc = SCTL_ERROR;
  }
out:
  free(done);
  sqlite3_finalize(st);
  sctl_db_close(db);
  return rc;
}

int sctl_write_requests(sctl_opts *o, const char *action, const char *const *targets, size_t n,
                        char *(*check)(sqlite3 *db, const char *target, void *arg), void *arg) {
  sqlite3 *db = sctl_db_open(o->args[0], 1);
  if (db == NULL) return SCTL_ERROR;
  sqlite3_int64 *ids = calloc(n ? n : 1, sizeof *ids);
  sqlite3_stmt *ins = NULL;
  int rc = SCTL_ERROR, in_tx = 0;
  size_t bad = 0;
  if (ids == NULL) {
    sctl_err("out of memory");
    goto out;
  }
  if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
    sctl_db_error(db, "starting a write transaction");
    goto out;
  }
  in_tx = 1;
  /* Check every target first: either all requests are written or none. */
  for (size_t i = 0; i < n; i++) {
    char *why = check(db, targets[i], arg);
    if (why != NULL) {
      sctl_err("%s", why);
      free(why);
      bad++;
    }
  }
  if (bad > 0) {
    sctl_err("nothing written: %zu of %zu %s refused", bad, n, n == 1 ? "target" : "targets");
    goto out;
  }
  ins = sctl_prepare(db, "INSERT INTO saga_operator_request(at_ms, action, target, "
                         "requested_by, state) VALUES (?1, ?2, ?3, ?4, 0)");
  if (ins == NULL) goto out;
  int64_t now = sctl_now_ms();
  for (size_t i = 0; i < n; i++) {
    sqlite3_reset(ins);
    sqlite3_bind_int64(ins, 1, now);
    sqlite3_bind_text(ins, 2, action, -1, SQLITE_STATIC);
    sqlite3_bind_text(ins, 3, targets[i], -1, SQLITE_STATIC);
    sqlite3_bind_text(ins, 4, o->by, -1, SQLITE_STATIC);
    if (sqlite3_step(ins) != SQLITE_DONE) {
      sctl_db_error(db, "writing an operator request");
      goto out;
    }
    ids[i] = sqlite3_last_insert_rowid(db);
  }
  if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
    sctl_db_error(db, "committing the requests");
    goto out;
  }
  in_tx = 0;
  for (size_t i = 0; i < n; i++) {
    char *t = sctl_safe_str(targets[i], 0);
    printf("request %lld: %s %s: PENDING\n", (long long)ids[i], action, t);
    free(t);
  }
  rc = SCTL_OK;
out:
  sqlite3_finalize(ins);
  if (in_tx) sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
  sctl_db_close(db);
  if (rc == SCTL_OK && o->wait) {
    fflush(stdout);
    rc = wait_requests(o, ids, n);
  }
  free(ids);
  return rc;
}

/* ---- retry and cancel ---- */

static char *check_saga(sqlite3 *db, const char *id, void *arg) {
  const char *action = arg;
  int want = strcmp(action, "retry") == 0 ? 5 : 1;
  char *safe = sctl_safe_str(id, 64), *why = NULL;
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, "SELECT i.state, (SELECT count(*) FROM saga_definition_step s "
                             "WHERE s.def_name = i.def_name AND s.def_version = i.def_version "
                             "AND s.step <= i.step AND s.kind <> 0) FROM saga_instance i "
                             "WHERE i.id = ?1",
                         -1, &st, NULL) != SQLITE_OK) {
    why = sctl_fmt("reading the database: %s", sqlite3_errmsg(db));
    goto out;
  }
  sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
  int r = sqlite3_step(st);
  if (r == SQLITE_DONE) {
    why = sctl_fmt("no saga '%s'", safe);
    goto out;
  } else if (r != SQLITE_ROW) {
    why = sctl_fmt("reading saga '%s': %s", safe, sqlite3_errmsg(db));
    goto out;
  }
  int state = sqlite3_column_int(st, 0);
  if (state != want) {
    why = sctl_fmt("saga %s is %s; %s needs a %s saga", safe, state_name(state), action,
                   state_name(want));
    goto out;
  }
  if (want == 1 && sqlite3_column_int(st, 1) > 0) {
    why = sctl_fmt("saga %s is past its pivot and cannot be cancelled: it runs to its end", safe);
    goto out;
  }
  sqlite3_finalize(st);
  st = NULL;
  if (sqlite3_prepare_v2(db, "SELECT id FROM saga_operator_request WHERE target = ?1 AND "
                             "action = ?2 AND state = 0 LIMIT 1",
                         -1, &st, NULL) != SQLITE_OK) {
    why = sctl_fmt("reading the database: %s", sqlite3_errmsg(db));
    goto out;
  }
  sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, action, -1, SQLITE_STATIC);
  if (sqlite3_step(st) == SQLITE_ROW)
    why = sctl_fmt("saga %s: request %lld to %s it is still pending", safe,
                   (long long)sqlite3_column_int64(st, 0), action);
out:
  sqlite3_finalize(st);
  free(safe);
  return why;
}

typedef struct ids_ctx {
  char **ids;
  size_t n, cap;
  list_ctx list;
} ids_ctx;

static void collect_row(void *arg, sqlite3_stmt *st) {
  ids_ctx *c = arg;
  if (c->n == c->cap) {
    c->cap = c->cap ? c->cap * 2 : 16;
    char **p = realloc(c->ids, c->cap * sizeof *p);
    if (p == NULL) {
      fputs("sagactl: out of memory\n", stderr);
      exit(SCTL_ERROR);
    }
    c->ids = p;
  }
  c->ids[c->n++] = sctl_strdup(sctl_col_text(st, C_ID));
  list_row(&c->list, st);
}

int sctl_cmd_request_sagas(sctl_opts *o, const char *action) {
  int want = strcmp(action, "retry") == 0 ? 5 : 1;
  int filter = o->state != NULL || o->definition != NULL || o->older_than != NULL || o->key != NULL;
  if (o->nargs < 1) return sctl_usage(action, "%s needs a database", action);
  if (o->nargs > 1 && filter)
    return sctl_usage(action, "give saga ids or a filter (--state, --definition, "
                              "--older-than, --key), not both");
  if (o->nargs > 1) {
    if (o->yes)
      return sctl_usage(action, "--yes is for a filter; requests for ids given are written "
                                "at once");
    return sctl_write_requests(o, action, o->args + 1, (size_t)(o->nargs - 1), check_saga,
                               (void *)action);
  }
  if (!filter)
    return sctl_usage(action, "%s needs saga ids or a filter (--state, --definition, "
                              "--older-than, --key)",
                      action);
  if (o->state_num != 0 && o->state_num != want)
    return sctl_usage(action, "%s applies to %s sagas only, not --state %s", action,
                      state_name(want), o->state);
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  ids_ctx c = {.list = {.now = sctl_now_ms()}};
  sctl_table_init(&c.list.t, 8, list_header);
  int more = 0;
  long limit = o->limit;
  int rc = select_sagas(db, o, want, limit, collect_row, &c, &more);
  sctl_db_close(db);
  if (rc == SCTL_OK) {
    if (c.n == 0) {
      printf("no %s saga matches: nothing to %s\n", state_name(want), action);
    } else if (!o->yes) {
      printf("dry run: would request %s of %zu saga%s:\n", action, c.n, c.n == 1 ? "" : "s");
      sctl_table_print(&c.list.t, stdout);
      printf("run again with --yes to write %s\n", c.n == 1 ? "this request" : "these requests");
    } else {
      rc = sctl_write_requests(o, action, (const char *const *)c.ids, c.n, check_saga,
                               (void *)action);
    }
    if (more)
      fprintf(stderr, "sagactl: more sagas match than the %ld taken (--limit N)\n", limit);
  }
  for (size_t i = 0; i < c.n; i++) free(c.ids[i]);
  free(c.ids);
  sctl_table_free(&c.list.t);
  return rc;
}
