/* sagactl: dead letters (list, show, replay, purge) and the outbox. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <saga.h>

#include "sagactl.h"

/* The journal appends this to the reason of a dead letter whose body it cut. */
#define CUT_MARK "[message cut to its first "

static const char *kind_name(int k) {
  return k == SAGA_MSG_COMMAND ? "COMMAND" : k == SAGA_MSG_REPLY ? "REPLY"
                                         : k == SAGA_MSG_EVENT   ? "EVENT"
                                                                 : "UNKNOWN";
}
static const char *phase_name(int p) {
  return p == 0 ? "ACTION" : p == 1 ? "COMPENSATION" : p == 2 ? "RESOLVE" : "UNKNOWN";
}

/* A dead letter id: a positive decimal integer. */
static int parse_id(const char *s, sqlite3_int64 *out) {
  if (s == NULL || *s < '0' || *s > '9') return -1;
  errno = 0;
  char *end = NULL;
  long long v = strtoll(s, &end, 10);
  if (errno != 0 || *end != '\0' || v <= 0) return -1;
  *out = v;
  return 0;
}

#define DL_COLS "id, at_ms, channel, msg_id, length(body), reason "

static json_t *dl_json(sqlite3_stmt *st) {
  char b[40];
  json_t *e = json_object();
  const char *reason = sctl_col_text(st, 5);
  json_object_set_new(e, "id", json_integer(sqlite3_column_int64(st, 0)));
  json_object_set_new(e, "at_ms", json_integer(sqlite3_column_int64(st, 1)));
  json_object_set_new(e, "at", json_string(sctl_iso(sqlite3_column_int64(st, 1), b, sizeof b)));
  json_object_set_new(e, "channel", sctl_jstr0(sctl_col_text(st, 2)));
  json_object_set_new(e, "msg_id", sctl_jstr0(sctl_col_text(st, 3)));
  json_object_set_new(e, "bytes", json_integer(sqlite3_column_int64(st, 4)));
  json_object_set_new(e, "cut", json_boolean(strstr(reason, CUT_MARK) != NULL));
  json_object_set_new(e, "reason", sctl_jstr0(reason));
  return e;
}

static const char *const dl_header[] = {"ID", "AGE", "CHANNEL", "MSG ID", "BYTES", "REASON"};
static void dl_row(sctl_table *t, sqlite3_stmt *st, int64_t now) {
  char a[16];
  char *cells[6];
  cells[0] = sctl_fmt("%lld", (long long)sqlite3_column_int64(st, 0));
  cells[1] = sctl_strdup(sctl_age(now - sqlite3_column_int64(st, 1), a, sizeof a));
  cells[2] = sctl_safe_str(sctl_col_text(st, 2), 32);
  cells[3] = sctl_safe_str(sctl_col_text(st, 3), 0);
  cells[4] = sctl_fmt("%lld", (long long)sqlite3_column_int64(st, 4));
  cells[5] = sctl_safe_str(sctl_col_text(st, 5), 60);
  sctl_table_row(t, cells);
}

/* Dead letters matching --channel (all when NULL), newest first, at most limit (< 0: all).
 * With ids != NULL their ids are collected too. */
static int dl_select(sqlite3 *db, const sctl_opts *o, long limit, json_t *arr, sctl_table *t,
                     sqlite3_int64 **ids, size_t *nids) {
  sqlite3_stmt *st = sctl_prepare(db, o->channel ? "SELECT " DL_COLS "FROM saga_dead_letter "
                                                   "WHERE channel = ?1 ORDER BY id DESC LIMIT ?2"
                                                 : "SELECT " DL_COLS "FROM saga_dead_letter "
                                                   "ORDER BY id DESC LIMIT ?2");
  if (st == NULL) return SCTL_ERROR;
  if (o->channel) sqlite3_bind_text(st, 1, o->channel, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 2, limit);
  int64_t now = sctl_now_ms();
  size_t cap = 0;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    if (arr != NULL) json_array_append_new(arr, dl_json(st));
    if (t != NULL) dl_row(t, st, now);
    if (ids != NULL) {
      if (*nids == cap) {
        cap = cap ? cap * 2 : 16;
        sqlite3_int64 *p = realloc(*ids, cap * sizeof *p);
        if (p == NULL) {
          sqlite3_finalize(st);
          return sctl_err("out of memory");
        }
        *ids = p;
      }
      (*ids)[(*nids)++] = sqlite3_column_int64(st, 0);
    }
  }
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) return sctl_db_error(db, "reading dead letters");
  return SCTL_OK;
}

static int dl_list(sctl_opts *o) {
  if (o->nargs != 1) return sctl_usage("dead-letters", "dead-letters list takes no argument");
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  json_t *arr = o->json ? json_array() : NULL;
  sctl_table t;
  if (!o->json) sctl_table_init(&t, 6, dl_header);
  int rc = dl_select(db, o, o->limit >= 0 ? o->limit : 100, arr, o->json ? NULL : &t, NULL, NULL);
  sctl_db_close(db);
  return sctl_emit(rc, o->json ? arr : NULL, o->json ? NULL : &t);
}

typedef struct data_ctx {
  json_t *arr; /* add {key, bytes} objects to it, or */
  int print;   /* print each key and its size, or only count them */
  size_t n;
} data_ctx;
static void data_key(void *arg, const char *key, size_t klen, const unsigned char *val,
                     size_t vlen) {
  data_ctx *c = arg;
  c->n++;
  if (c->arr != NULL) {
    json_t *e = json_object();
    json_object_set_new(e, "key", sctl_jstr(key, klen));
    json_object_set_new(e, "bytes", json_integer((json_int_t)vlen));
    json_array_append_new(c->arr, e);
  } else if (c->print) {
    char *k = sctl_safe(key, klen, 0);
    printf("    %-20s %8zu bytes\n", k, vlen);
    free(k);
  }
}

static void print_field(const char *label, const char *value) {
  char *v = sctl_safe_str(value, 0);
  printf("  %-10s %s\n", label, v[0] ? v : "(none)");
  free(v);
}

static int dl_show(sctl_opts *o) {
  sqlite3_int64 id;
  if (o->nargs != 2) return sctl_usage("dead-letters", "dead-letters show takes one id");
  if (parse_id(o->args[1], &id) != 0)
    return sctl_usage("dead-letters", "a dead letter id is a positive number");
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  int rc = SCTL_ERROR;
  saga_envelope *env = NULL;
  json_t *j = NULL;
  sqlite3_stmt *st =
      sctl_prepare(db, "SELECT " DL_COLS ", body FROM saga_dead_letter WHERE id = ?1");
  if (st == NULL) goto done;
  sqlite3_bind_int64(st, 1, id);
  int r = sqlite3_step(st);
  if (r == SQLITE_DONE) {
    sctl_err("no dead letter %lld", (long long)id);
    goto done;
  } else if (r != SQLITE_ROW) {
    sctl_db_error(db, "reading the dead letter");
    goto done;
  }
  const char *reason = sctl_col_text(st, 5);
  const void *body = sqlite3_column_blob(st, 6);
  size_t blen = (size_t)sqlite3_column_bytes(st, 6);
  int cut = strstr(reason, CUT_MARK) != NULL;
  char derr[256] = "";
  /* Every byte of a dead letter came from a network: the library's strict decoder, under
   * the default limits, is the only reader. */
  int drc = saga_envelope_decode(body, blen, NULL, NULL, &env, derr, sizeof derr);
  if (o->json) {
    j = dl_json(st);
    if (drc == SAGA_OK) {
      json_t *e = json_object(), *h = json_array();
      data_ctx dc = {.arr = json_array()};
      const char *werr = NULL;
      json_object_set_new(e, "kind", json_string(kind_name(env->kind)));
      json_object_set_new(e, "msg_id", sctl_jstr0(env->msg_id));
      json_object_set_new(e, "saga_id", sctl_jstr0(env->saga_id));
      json_object_set_new(e, "step", json_integer(env->step));
      json_object_set_new(e, "attempt", json_integer(env->attempt));
      json_object_set_new(e, "phase", json_string(phase_name(env->phase)));
      json_object_set_new(e, "name", sctl_jstr0(env->name));
      json_object_set_new(e, "reply_to", sctl_jstr0(env->reply_to));
      json_object_set_new(e, "status", json_integer(env->status));
      json_object_set_new(e, "error", sctl_jstr0(env->error));
      for (size_t i = 0; i < env->nheaders; i++) {
        json_t *x = json_object();
        json_object_set_new(x, "name", sctl_jstr0(env->headers[i].name));
        json_object_set_new(x, "value", sctl_jstr0(env->headers[i].value));
        json_array_append_new(h, x);
      }
      json_object_set_new(e, "headers", h);
      if (sctl_data_walk(env->payload, env->payload_len, data_key, &dc, &werr) != 0)
        json_object_set_new(e, "data_error", json_string(werr));
      json_object_set_new(e, "data", dc.arr);
      json_object_set_new(j, "envelope", e);
    } else {
      json_object_set_new(j, "envelope", json_null());
      json_object_set_new(j, "decode_error", sctl_jstr0(derr));
    }
    rc = sctl_json_print(j);
    j = NULL;
    goto done;
  }
  char b[40], a[16];
  int64_t at = sqlite3_column_int64(st, 1);
  printf("dead letter %lld\n", (long long)id);
  printf("  %-10s %s (%s ago)\n", "at", sctl_iso(at, b, sizeof b),
         sctl_age(sctl_now_ms() - at, a, sizeof a));
  print_field("channel", sctl_col_text(st, 2));
  print_field("msg id", sctl_col_text(st, 3));
  print_field("reason", reason);
  printf("  %-10s %zu bytes%s\n", "body", blen,
         cut ? ", cut (the reason says how large the message was)" : ", as received");
  if (drc != SAGA_OK) {
    char *e = sctl_safe_str(derr, 0);
    printf("envelope: not decodable (%s): %s\n", saga_err_name(drc), e);
    free(e);
    printf("  first bytes:");
    for (size_t i = 0; i < blen && i < 32; i++) printf(" %02x", ((const unsigned char *)body)[i]);
    printf("\n");
    rc = SCTL_OK;
    goto done;
  }
  printf("envelope:\n");
  print_field("kind", kind_name(env->kind));
  print_field("saga", env->saga_id);
  printf("  %-10s %u (attempt %u, phase %s)\n", "step", env->step, env->attempt,
         phase_name(env->phase));
  /* A domain event (saga/domain.h) carries its stream and sequence number in headers and
   * any bytes as data; a saga's lifecycle event names its definition. */
  int domain = env->kind == SAGA_MSG_EVENT && saga_envelope_header(env, "seq") != NULL;
  print_field(domain ? "event" : env->kind == SAGA_MSG_EVENT ? "definition" : "action",
              env->name);
  print_field("msg id", env->msg_id);
  print_field("reply_to", env->reply_to);
  if (env->kind == SAGA_MSG_REPLY) {
    printf("  %-10s %d%s%s\n", "status", env->status, env->status ? " " : "",
           env->status ? saga_err_name(env->status) : "");
    print_field("error", env->error);
  }
  printf("  headers    %zu\n", env->nheaders);
  for (size_t i = 0; i < env->nheaders; i++) {
    char *n = sctl_safe_str(env->headers[i].name, 0), *v = sctl_safe_str(env->headers[i].value, 0);
    printf("    %s: %s\n", n, v);
    free(n), free(v);
  }
  data_ctx count = {0};
  const char *werr = NULL;
  if (domain) {
    printf("  data       %zu bytes (a domain event's data: not shown)\n", env->payload_len);
  } else if (sctl_data_walk(env->payload, env->payload_len, data_key, &count, &werr) != 0) {
    printf("  data       %zu bytes, not a valid data map (%s)\n", env->payload_len, werr);
  } else {
    data_ctx pr = {.print = 1};
    printf("  data       %zu key%s, %zu bytes\n", count.n, count.n == 1 ? "" : "s",
           env->payload_len);
    sctl_data_walk(env->payload, env->payload_len, data_key, &pr, &werr);
  }
  rc = SCTL_OK;
done:
  json_decref(j);
  saga_envelope_free(env);
  sqlite3_finalize(st);
  sctl_db_close(db);
  return rc;
}

/* ---- replay and purge ---- */

static char *check_dead(sqlite3 *db, const char *target, void *arg) {
  const char *action = arg;
  sqlite3_int64 id = 0;
  char *why = NULL;
  sqlite3_stmt *st = NULL;
  if (strcmp(target, "*") != 0) {
    if (parse_id(target, &id) != 0) {
      char *safe = sctl_safe_str(target, 64);
      why = sctl_fmt("'%s' is not a dead letter id (a positive number)", safe);
      free(safe);
      return why;
    }
    if (sqlite3_prepare_v2(db, "SELECT instr(reason, '" CUT_MARK "') > 0 FROM saga_dead_letter "
                               "WHERE id = ?1",
                           -1, &st, NULL) != SQLITE_OK)
      return sctl_fmt("reading the database: %s", sqlite3_errmsg(db));
    sqlite3_bind_int64(st, 1, id);
    int r = sqlite3_step(st);
    int cut = r == SQLITE_ROW && sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    st = NULL;
    if (r == SQLITE_DONE) return sctl_fmt("no dead letter %lld", (long long)id);
    if (r != SQLITE_ROW) return sctl_fmt("reading the database: %s", sqlite3_errmsg(db));
    /* Only the start of a large message was kept: there is nothing whole to handle again. */
    if (cut && strcmp(action, "replay") == 0)
      return sctl_fmt("dead letter %lld kept only the start of its message (it was too large): "
                      "it cannot be replayed; purge it",
                      (long long)id);
  }
  if (sqlite3_prepare_v2(db, "SELECT id FROM saga_operator_request WHERE target = ?1 AND "
                             "action = ?2 AND state = 0 LIMIT 1",
                         -1, &st, NULL) != SQLITE_OK)
    return sctl_fmt("reading the database: %s", sqlite3_errmsg(db));
  sqlite3_bind_text(st, 1, target, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, action, -1, SQLITE_STATIC);
  if (sqlite3_step(st) == SQLITE_ROW)
    why = sctl_fmt("dead letter %s: request %lld to %s it is still pending", target,
                   (long long)sqlite3_column_int64(st, 0), action);
  sqlite3_finalize(st);
  return why;
}

static int dl_request(sctl_opts *o, const char *action) {
  if (o->nargs > 1 && (o->all || o->channel))
    return sctl_usage("dead-letters", "give dead letter ids or --all [--channel C], not both");
  if (o->nargs > 1) {
    if (o->yes)
      return sctl_usage("dead-letters", "--yes is for --all; requests for ids given are "
                                        "written at once");
    for (int i = 1; i < o->nargs; i++) {
      sqlite3_int64 id;
      if (parse_id(o->args[i], &id) != 0) {
        char *safe = sctl_safe_str(o->args[i], 64);
        sctl_usage("dead-letters", "'%s' is not a dead letter id (a positive number)", safe);
        free(safe);
        return SCTL_USAGE;
      }
    }
    return sctl_write_requests(o, action, o->args + 1, (size_t)(o->nargs - 1), check_dead,
                               (void *)action);
  }
  if (!o->all)
    return sctl_usage("dead-letters", "%s needs dead letter ids or --all [--channel C]", action);
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  sctl_table t;
  sctl_table_init(&t, 6, dl_header);
  sqlite3_int64 *ids = NULL;
  size_t n = 0;
  int rc = dl_select(db, o, o->limit, NULL, &t, &ids, &n);
  sctl_db_close(db);
  char **targets = NULL;
  if (rc != SCTL_OK) goto out;
  if (n == 0) {
    printf("no dead letter%s: nothing to %s\n", o->channel ? " on that channel" : "", action);
    goto out;
  }
  if (!o->yes) {
    printf("dry run: would request %s of %zu dead letter%s:\n", action, n, n == 1 ? "" : "s");
    sctl_table_print(&t, stdout);
    printf("run again with --yes to write the request%s\n",
           strcmp(action, "purge") == 0 && !o->channel ? "" : n == 1 ? "" : "s");
    goto out;
  }
  if (strcmp(action, "purge") == 0 && o->channel == NULL && o->limit < 0) {
    /* Every dead letter: one request, which the node carries out as one statement. */
    const char *all[] = {"*"};
    rc = sctl_write_requests(o, action, all, 1, check_dead, (void *)action);
    goto out;
  }
  targets = calloc(n, sizeof *targets);
  if (targets == NULL) {
    rc = sctl_err("out of memory");
    goto out;
  }
  for (size_t i = 0; i < n; i++) targets[i] = sctl_fmt("%lld", (long long)ids[i]);
  rc = sctl_write_requests(o, action, (const char *const *)targets, n, check_dead,
                           (void *)action);
out:
  if (targets != NULL)
    for (size_t i = 0; i < n; i++) free(targets[i]);
  free(targets);
  free(ids);
  sctl_table_free(&t);
  return rc;
}

int sctl_cmd_dead_letters(sctl_opts *o, const char *sub) {
  if (strcmp(sub, "list") == 0) return dl_list(o);
  if (strcmp(sub, "show") == 0) return dl_show(o);
  if (strcmp(sub, "replay") == 0) return dl_request(o, "replay");
  if (strcmp(sub, "purge") == 0) return dl_request(o, "purge");
  char *safe = sctl_safe_str(sub, 32);
  sctl_usage("dead-letters", "unknown dead-letters command '%s' (list, show, replay, purge)",
             safe);
  free(safe);
  return SCTL_USAGE;
}

/* ---- outbox ---- */

int sctl_cmd_outbox(sctl_opts *o) {
  if (o->nargs != 1) return sctl_usage("outbox", "outbox takes one database");
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  sqlite3_stmt *st = sctl_prepare(db, "SELECT channel, count(*), min(created_ms) FROM "
                                      "saga_outbox GROUP BY channel ORDER BY channel");
  if (st == NULL) {
    sctl_db_close(db);
    return SCTL_ERROR;
  }
  static const char *const hdr[] = {"CHANNEL", "DEPTH", "OLDEST"};
  sctl_table t;
  json_t *j = NULL, *arr = NULL;
  if (o->json)
    j = json_object(), arr = json_array();
  else
    sctl_table_init(&t, 3, hdr);
  int64_t now = sctl_now_ms(), total = 0, oldest = -1;
  int r;
  while ((r = sqlite3_step(st)) == SQLITE_ROW) {
    int64_t depth = sqlite3_column_int64(st, 1), first = sqlite3_column_int64(st, 2);
    total += depth;
    if (oldest < 0 || first < oldest) oldest = first;
    if (o->json) {
      json_t *e = json_object();
      json_object_set_new(e, "channel", sctl_jstr0(sctl_col_text(st, 0)));
      json_object_set_new(e, "depth", json_integer(depth));
      json_object_set_new(e, "oldest_ms", json_integer(first));
      json_object_set_new(e, "oldest_age_s", json_integer((now - first) / 1000));
      json_array_append_new(arr, e);
    } else {
      char a[16];
      char *cells[3];
      cells[0] = sctl_safe_str(sctl_col_text(st, 0), 0);
      cells[1] = sctl_fmt("%lld", (long long)depth);
      cells[2] = sctl_fmt("%s ago", sctl_age(now - first, a, sizeof a));
      sctl_table_row(&t, cells);
    }
  }
  sqlite3_finalize(st);
  int rc = SCTL_OK;
  if (r != SQLITE_DONE) rc = sctl_db_error(db, "reading the outbox");
  sctl_db_close(db);
  if (o->json) {
    json_object_set_new(j, "total", json_integer(total));
    json_object_set_new(j, "oldest_age_s",
                        oldest < 0 ? json_null() : json_integer((now - oldest) / 1000));
    json_object_set_new(j, "channels", arr);
    if (rc == SCTL_OK)
      rc = sctl_json_print(j);
    else
      json_decref(j);
  } else {
    if (rc == SCTL_OK) {
      char a[16];
      sctl_table_print(&t, stdout);
      if (total == 0)
        printf("total: 0 unconfirmed messages\n");
      else
        printf("total: %lld unconfirmed message%s, oldest %s ago\n", (long long)total,
               total == 1 ? "" : "s", sctl_age(now - oldest, a, sizeof a));
    }
    sctl_table_free(&t);
  }
  return rc;
}
