/*
 * What one transaction of a node records, for the engine, the participant and retention: its
 * events and history rows, outbox rows (with ids that never repeat) and dead letters; and the
 * node's small helpers (logging, errors, time, ids, lookups). It calls only the store, the
 * codec and utilities — never back into node.c — so the core's files call one way: node.c
 * drives engine.c, participant.c, retention.c and checkpoint.c, and all of them use this file.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

/* ---- small helpers ---------------------------------------------------------------------- */

void saga__node_log(saga_node *n, saga_log_level lvl, const char *fmt, ...) {
  if (n->log == NULL) return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  n->log(n->log_arg, lvl, buf);
}

int saga__node_fail(saga_node *n, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(n->errmsg, sizeof n->errmsg, fmt, ap);
  va_end(ap);
  return code;
}

int saga__node_db_fail(saga_node *n, int code, const char *what) {
  return saga__node_fail(n, code, "%s: %s (%s)", what, sqlite3_errmsg(n->store.db),
                         saga_strerror(code));
}

uint64_t saga__node_now(saga_node *n) { return saga_clock_now(n->clock); }

uint64_t saga__node_rand(saga_node *n) {
  if (n->random != NULL) return n->random(n->random_arg);
  return saga__splitmix64(&n->rng_state);
}

int saga__node_id_bytes(saga_node *n, void *out, size_t len) {
  if (n->random != NULL) { /* deterministic tests: ids are only as unpredictable as this */
    uint8_t *o = out;
    for (size_t k = 0; k < len; k += 8) {
      uint64_t v = n->random(n->random_arg);
      size_t take = len - k < 8 ? len - k : 8;
      for (size_t b = 0; b < take; b++, v >>= 8) o[k + b] = (uint8_t)v;
    }
    return SAGA_OK;
  }
  int rc = saga__csprng_bytes(&n->ids, out, len);
  if (rc != SAGA_OK)
    return saga__node_fail(n, rc, "the operating system's random generator failed (getrandom)");
  return SAGA_OK;
}

const char *saga_node_errmsg(const saga_node *n) { return n != NULL ? n->errmsg : ""; }
sqlite3 *saga_node_db(saga_node *n) { return n != NULL ? n->store.db : NULL; }
saga_clock *saga_node_clock(saga_node *n) { return n != NULL ? n->clock : NULL; }

void saga_node_stats_get(const saga_node *n, saga_node_stats *out) {
  if (n != NULL && out != NULL) *out = n->stats;
}

static const uint32_t latency_bounds[SAGA_LATENCY_BUCKETS - 1] = {
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000};

uint32_t saga_latency_bound_ms(int b) {
  return b >= 0 && b < SAGA_LATENCY_BUCKETS - 1 ? latency_bounds[b] : UINT32_MAX;
}

void saga__node_latency(saga_node *n, uint64_t ms) {
  int b = 0;
  while (b < SAGA_LATENCY_BUCKETS - 1 && ms > latency_bounds[b]) b++;
  n->stats.step_latency[b]++;
  n->stats.step_latency_count++;
  n->stats.step_latency_sum_ms += ms;
}

int saga_node_count_by_state(saga_node *n, int64_t counts[6]) {
  if (n == NULL || counts == NULL || n->store.db == NULL) return SAGA_EINVAL;
  for (int i = 0; i < 6; i++) counts[i] = 0;
  sqlite3_stmt *st = saga__store_stmt(&n->store, ST_INST_BY_STATE);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    int s = sqlite3_column_int(st, 0);
    if (s >= 1 && s <= 5) counts[s] = sqlite3_column_int64(st, 1);
  }
  sqlite3_reset(st);
  return rc == SQLITE_DONE ? SAGA_OK : saga__store_err(rc);
}

const saga__def *saga__node_find_def(saga_node *n, const char *name, uint32_t version) {
  const saga__def *best = NULL;
  for (size_t i = 0; i < n->ndefs; i++) {
    const saga__def *d = &n->defs[i];
    if (strcmp(d->name, name) != 0) continue;
    if (version != 0 ? d->version == version : (best == NULL || d->version > best->version))
      best = d;
  }
  return best;
}

const saga__handler *saga__node_find_handler(saga_node *n, const char *channel,
                                             const char *command) {
  for (size_t i = 0; i < n->nhandlers; i++) {
    const saga__handler *h = &n->handlers[i];
    if (strcmp(h->command, command) == 0 && strcmp(h->channel, channel) == 0) return h;
  }
  return NULL;
}

static const char *const state_names[] = {"UNKNOWN", "RUNNING", "COMPENSATING", "COMPLETED",
                                          "COMPENSATED", "FAILED"};
const char *saga_state_name(int s) { return s >= 1 && s <= 5 ? state_names[s] : "UNKNOWN"; }

static const char *const event_names[] = {
    "UNKNOWN",           "STARTED",          "STEP_SENT",        "STEP_SUCCEEDED",
    "STEP_FAILED",       "STEP_TIMED_OUT",   "STEP_RETRY",       "COMPENSATION_SENT",
    "COMPENSATED",       "COMPENSATION_FAILED", "RESOLVE_SENT",  "CANCELLED",
    "COMPLETED",         "SAGA_COMPENSATED", "SAGA_FAILED",      "STALE_REPLY",
    "DEFINITION_MISSING"};
const char *saga_event_name(int t) { return t >= 1 && t <= 16 ? event_names[t] : "UNKNOWN"; }

/* ---- events and history ----------------------------------------------------------------- */

/* Writes the transition as an event message to cfg.event_channel, in this transaction. */
static int publish_event(saga_node *n, saga_event_type type, const saga__inst *inst, int step,
                         uint32_t attempt, const char *detail, uint64_t now) {
  char msg_id[80], at[24], version[16];
  snprintf(msg_id, sizeof msg_id, "%s/e/%lld", inst->id, (long long)inst->hseq);
  snprintf(at, sizeof at, "%llu", (unsigned long long)now);
  snprintf(version, sizeof version, "%u", inst->def_version);
  const char *step_name = (inst->def && step >= 0 && (size_t)step < inst->def->nsteps)
                              ? inst->def->steps[step].name
                              : "";
  saga_header hdr[4] = {{"definition", inst->def_name}, {"version", version},
                        {"step-name", step_name}, {"at", at}};
  saga_envelope env;
  memset(&env, 0, sizeof env);
  env.version = SAGA_ENVELOPE_VERSION;
  env.kind = SAGA_MSG_EVENT;
  env.msg_id = msg_id;
  env.saga_id = inst->id;
  env.step = step < 0 ? UINT32_MAX : (uint32_t)step;
  env.attempt = attempt;
  env.name = saga_event_name(type);
  env.status = inst->state;
  env.error = detail;
  env.headers = hdr;
  env.nheaders = 4;
  env.payload = inst->data.data;
  env.payload_len = inst->data.len;
  saga__buf_reset(&n->event_buf);
  int rc = saga__envelope_encode_buf(&env, &n->event_buf);
  if (rc != SAGA_OK) return saga__node_fail(n, rc, "encoding event");
  return saga__node_outbox(n, n->event_channel, inst->id, n->event_buf.data, n->event_buf.len);
}

/* History rows are buffered by saga__node_event and written here, before the commit, with
 * multi-row INSERTs: one statement per 8 rows instead of one per row. */
static void bind_hist(saga_node *n, sqlite3_stmt *st, int base, const saga__hist_rec *h) {
  sqlite3_bind_text(st, base + 1, h->saga_id, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, base + 2, h->seq);
  sqlite3_bind_int64(st, base + 3, (sqlite3_int64)h->at_ms);
  sqlite3_bind_int(st, base + 4, h->type);
  sqlite3_bind_int(st, base + 5, h->step);
  sqlite3_bind_int64(st, base + 6, h->attempt);
  sqlite3_bind_text(st, base + 7, (const char *)n->hist_text.data + h->detail_off, -1,
                    SQLITE_STATIC);
}

static int hist_flush(saga_node *n) {
  const saga__hist_rec *h = (const saga__hist_rec *)(void *)n->hist.data;
  size_t count = n->hist.len / sizeof *h, k = 0;
  int rc = SAGA_OK;
  while (k < count && rc == SAGA_OK) {
    size_t rows = count - k >= 8 ? 8 : count - k >= 2 ? 2 : 1;
    saga__stmt_id id = rows == 8 ? ST_HIST_INSERT8 : rows == 2 ? ST_HIST_INSERT2 : ST_HIST_INSERT;
    sqlite3_stmt *st = saga__store_stmt(&n->store, id);
    for (size_t j = 0; j < rows; j++) bind_hist(n, st, (int)(7 * j), &h[k + j]);
    rc = saga__store_exec(&n->store, id);
    k += rows;
  }
  saga__buf_reset(&n->hist);
  saga__buf_reset(&n->hist_text);
  return rc == SAGA_OK ? SAGA_OK : saga__node_db_fail(n, rc, "recording history");
}

int saga__node_tx_finish(saga_node *n) {
  int rc = hist_flush(n);
  if (rc != SAGA_OK || !n->outbox_used) return rc;
  sqlite3_stmt *st = saga__store_stmt(&n->store, ST_OUTBOX_MARK);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)(n->outbox_next - 1));
  rc = saga__store_exec(&n->store, ST_OUTBOX_MARK);
  if (rc != SAGA_OK) return saga__node_db_fail(n, rc, "recording the outbox id");
  n->outbox_used = 0;
  return SAGA_OK;
}

int saga__node_event(saga_node *n, saga_event_type type, const saga__inst *inst, int step,
                     uint32_t attempt, const char *detail) {
  saga__inst *mi = (saga__inst *)inst;
  if (detail == NULL) detail = "";
  uint64_t now = saga__node_now(n);
  saga__hist_rec h;
  memset(&h, 0, sizeof h);
  memcpy(h.saga_id, inst->id, sizeof h.saga_id);
  h.seq = mi->hseq + 1;
  h.at_ms = now;
  h.type = (int)type;
  h.step = step;
  h.attempt = attempt;
  h.detail_off = n->hist_text.len;
  size_t hist_len = n->hist.len;
  if (saga__buf_append(&n->hist_text, detail, strlen(detail) + 1) != SAGA_OK ||
      saga__buf_append(&n->hist, &h, sizeof h) != SAGA_OK) {
    n->hist.len = hist_len;
    n->hist_text.len = h.detail_off;
    return saga__node_fail(n, SAGA_ENOMEM, "out of memory recording history");
  }
  mi->hseq++;
  int rc;
  if (n->event_channel != NULL) {
    rc = publish_event(n, type, inst, step, attempt, detail, now);
    if (rc != SAGA_OK) return rc;
  }
  if (n->on_event == NULL) return SAGA_OK;

  if (n->nevents == n->events_cap) {
    size_t cap = n->events_cap ? n->events_cap * 2 : 64;
    saga__event_rec *p = saga__realloc(n->alloc, n->events, cap * sizeof *p);
    if (p == NULL) return saga__node_fail(n, SAGA_ENOMEM, "out of memory buffering an event");
    n->events = p;
    n->events_cap = cap;
  }
  saga__event_rec *r = &n->events[n->nevents];
  r->remote_off = 0;
  r->detail_off = n->event_text.len;
  size_t dlen = strlen(detail), nlen = strlen(inst->def_name);
  if (saga__buf_reserve(&n->event_text, dlen + nlen + 2) != SAGA_OK)
    return saga__node_fail(n, SAGA_ENOMEM, "out of memory buffering an event");
  saga__buf_append(&n->event_text, detail, dlen + 1);
  saga__buf_append(&n->event_text, inst->def_name, nlen + 1);
  r->type = type;
  memcpy(r->saga_id, inst->id, sizeof r->saga_id);
  r->def = inst->def;
  r->step = step;
  r->attempt = attempt;
  r->state = (saga_state)inst->state;
  r->at_ms = now;
  n->nevents++;
  return SAGA_OK;
}

/* ---- outbox and dead letters ------------------------------------------------------------ */

void saga__node_tx_begun(saga_node *n) {
  n->outbox_next_valid = 0;
  n->outbox_used = 0;
}

/* Outbox ids increase and never repeat: the next id is above the largest in the table and
 * above saga_meta('outbox_id'), read once per transaction under the write lock (processes
 * sharing the database do not collide); saga__node_tx_finish stores the last id taken. */
static int next_outbox_id(saga_node *n, uint64_t *id) {
  if (!n->outbox_next_valid) {
    sqlite3_stmt *st = saga__store_stmt(&n->store, ST_OUTBOX_MAX);
    int rc = sqlite3_step(st);
    uint64_t max = rc == SQLITE_ROW ? (uint64_t)sqlite3_column_int64(st, 0) : 0;
    sqlite3_reset(st);
    if (rc != SQLITE_ROW) return saga__node_db_fail(n, saga__store_err(rc), "reading outbox");
    if (n->outbox_next <= max) n->outbox_next = max + 1;
    n->outbox_next_valid = 1;
  }
  *id = n->outbox_next++;
  n->outbox_used = 1;
  return SAGA_OK;
}

int saga__node_outbox(saga_node *n, const char *channel, const char *saga_id, const void *body,
                      size_t len) {
  uint64_t id = 0;
  int idrc = next_outbox_id(n, &id);
  if (idrc != SAGA_OK) return idrc;
  sqlite3_stmt *st = saga__store_stmt(&n->store, ST_OUTBOX_INSERT);
  sqlite3_bind_int64(st, 5, (sqlite3_int64)id);
  sqlite3_bind_text(st, 1, channel, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, saga_id, -1, SQLITE_STATIC);
  sqlite3_bind_blob(st, 3, body, (int)len, SQLITE_STATIC);
  sqlite3_bind_int64(st, 4, (sqlite3_int64)saga__node_now(n));
  int rc = saga__store_exec(&n->store, ST_OUTBOX_INSERT);
  if (rc != SAGA_OK) return saga__node_db_fail(n, rc, "writing outbox");
  SAGA__HOOK(n, "outbox.after_insert");
  return SAGA_OK;
}

int saga__node_dead_letter(saga_node *n, const char *channel, const char *msg_id,
                           const char *reason, const void *body, size_t len) {
  sqlite3_stmt *st = saga__store_stmt(&n->store, ST_DEAD_INSERT);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)saga__node_now(n));
  sqlite3_bind_text(st, 2, channel, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 3, msg_id ? msg_id : "", -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 4, reason, -1, SQLITE_STATIC);
  sqlite3_bind_blob(st, 5, body ? body : "", (int)len, SQLITE_STATIC);
  int rc = saga__store_exec(&n->store, ST_DEAD_INSERT);
  if (rc != SAGA_OK) return saga__node_db_fail(n, rc, "writing dead letter");
  n->stats.dead_letters++;
  saga__node_log(n, SAGA_LOG_WARN, "dead letter on '%s' (msg '%s'): %s", channel,
                 msg_id ? msg_id : "", reason);
  return SAGA_OK;
}

