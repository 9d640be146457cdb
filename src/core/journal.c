/*
 * The journal (journal.h): history rows, events and published events, outbox rows with ids
 * that never repeat, and dead letters — what a transaction records besides instance rows.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "journal.h"

void saga__journal_init(saga__journal *j, saga__env *env) {
  memset(j, 0, sizeof *j);
  j->env = env;
  saga__buf_init(&j->event_text, env->alloc);
  saga__buf_init(&j->remote_events, env->alloc);
  saga__buf_init(&j->event_buf, env->alloc);
  saga__buf_init(&j->hist, env->alloc);
  saga__buf_init(&j->hist_text, env->alloc);
  saga__buf_init(&j->step_stats, env->alloc);
  saga__buf_init(&j->span_text, env->alloc);
}

void saga__journal_free(saga__journal *j) {
  saga__free(j->env->alloc, j->events);
  j->events = NULL;
  saga__buf_free(&j->event_text);
  saga__buf_free(&j->remote_events);
  saga__buf_free(&j->event_buf);
  saga__buf_free(&j->hist);
  saga__buf_free(&j->hist_text);
  saga__buf_free(&j->step_stats);
  saga__free(j->env->alloc, j->spans);
  j->spans = NULL;
  saga__buf_free(&j->span_text);
}

saga__journal_mark saga__journal_mark_get(const saga__journal *j) {
  saga__journal_mark m = {j->nevents,        j->event_text.len, j->remote_events.len,
                          j->hist.len,       j->hist_text.len,  j->step_stats.len,
                          j->nspans,         j->span_text.len};
  return m;
}

void saga__journal_rewind(saga__journal *j, const saga__journal_mark *m) {
  j->nevents = m->nevents;
  j->event_text.len = m->event_text;
  j->remote_events.len = m->remote;
  j->hist.len = m->hist;
  j->hist_text.len = m->hist_text;
  j->step_stats.len = m->step_stats;
  j->nspans = m->nspans;
  j->span_text.len = m->span_text;
}

void saga__journal_clear_events(saga__journal *j) {
  j->nevents = 0;
  saga__buf_reset(&j->event_text);
  saga__buf_reset(&j->remote_events);
  j->nspans = 0;
  saga__buf_reset(&j->span_text);
}

int saga__journal_span(saga__journal *j, const saga__span_rec *r, const char *name,
                       const char *definition, const char *error) {
  if (!j->keep_spans) return SAGA_OK;
  if (j->nspans == j->spans_cap) {
    size_t cap = j->spans_cap ? j->spans_cap * 2 : 64;
    saga__span_rec *p = saga__realloc(j->env->alloc, j->spans, cap * sizeof *p);
    if (p == NULL) return saga__fail(j->env, SAGA_ENOMEM, "out of memory buffering a span");
    j->spans = p;
    j->spans_cap = cap;
  }
  if (name == NULL) name = "";
  if (definition == NULL) definition = "";
  if (error == NULL) error = "";
  size_t off = j->span_text.len;
  size_t ln = strlen(name) + 1, ld = strlen(definition) + 1, le = strlen(error) + 1;
  if (saga__buf_reserve(&j->span_text, ln + ld + le) != SAGA_OK)
    return saga__fail(j->env, SAGA_ENOMEM, "out of memory buffering a span");
  saga__buf_append(&j->span_text, name, ln);
  saga__buf_append(&j->span_text, definition, ld);
  saga__buf_append(&j->span_text, error, le);
  saga__span_rec *s = &j->spans[j->nspans++];
  *s = *r;
  s->text_off = off;
  return SAGA_OK;
}

/* ---- events and history ----------------------------------------------------------------- */

static int grow_events(saga__journal *j) {
  if (j->nevents < j->events_cap) return SAGA_OK;
  size_t cap = j->events_cap ? j->events_cap * 2 : 64;
  saga__event_rec *p = saga__realloc(j->env->alloc, j->events, cap * sizeof *p);
  if (p == NULL) return saga__fail(j->env, SAGA_ENOMEM, "out of memory buffering an event");
  j->events = p;
  j->events_cap = cap;
  return SAGA_OK;
}

/* Writes the transition as an event message to the event channel, in this transaction. */
static int publish_event(saga__journal *j, saga_event_type type, const saga__inst *inst,
                         int step, uint32_t attempt, const char *detail, uint64_t now) {
  char msg_id[80], at[24], version[16];
  snprintf(msg_id, sizeof msg_id, "%s/e/%lld", inst->id, (long long)inst->hseq);
  snprintf(at, sizeof at, "%llu", (unsigned long long)now);
  snprintf(version, sizeof version, "%u", inst->def_version);
  const saga__def *def = inst->def;
  const char *step_name =
      (def && step >= 0 && (size_t)step < def->nsteps) ? def->steps[step].name : "";
  char tp[SAGA__TRACEPARENT_SIZE];
  saga__inst_traceparent(inst, tp);
  saga_header hdr[5] = {{"definition", inst->def_name}, {"version", version},
                        {"step-name", step_name}, {"at", at}, {"traceparent", tp}};
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
  env.nheaders = 5;
  env.payload = inst->data.data;
  env.payload_len = inst->data.len;
  saga__buf_reset(&j->event_buf);
  int rc = saga__envelope_encode_buf(&env, &j->event_buf);
  if (rc != SAGA_OK) return saga__fail(j->env, rc, "encoding event");
  return saga__journal_outbox(j, j->event_channel, inst->id, j->event_buf.data,
                              j->event_buf.len);
}

void saga__inst_trace(const saga__inst *i, saga__trace *t) {
  if (i->trace_parent[0] != '\0' && saga__trace_parse(i->trace_parent, t) == SAGA_OK) return;
  /* No caller's context (or a damaged one): the trace of the saga's own id, no parent. */
  snprintf(t->trace_id, sizeof t->trace_id, "%.32s", i->id);
  t->span_id[0] = '\0';
  t->flags = 1;
}

void saga__inst_traceparent(const saga__inst *i, char out[SAGA__TRACEPARENT_SIZE]) {
  saga__trace t;
  saga__inst_trace(i, &t);
  if (!saga__trace_id_ok(t.trace_id) || i->trace_span[0] == '\0') {
    out[0] = '\0';
    return;
  }
  saga__trace_format(out, t.trace_id, i->trace_span, t.flags);
}

int saga__journal_last(saga__journal *j, const saga__inst *inst, int *type, saga__buf *detail) {
  *type = 0;
  if (inst->hseq <= 0) return SAGA_OK;
  /* Rows of this transaction are not in the store yet: the newest are at the end. */
  size_t n = j->hist.len / sizeof(saga__hist_rec);
  const saga__hist_rec *rows = (const saga__hist_rec *)(const void *)j->hist.data;
  for (size_t k = n; k-- > 0;) {
    if (rows[k].seq != inst->hseq || strcmp(rows[k].saga_id, inst->id) != 0) continue;
    const char *text = (const char *)j->hist_text.data + rows[k].detail_off;
    saga__buf_reset(detail);
    if (saga__buf_append(detail, text, strlen(text) + 1) != SAGA_OK)
      return saga__fail(j->env, SAGA_ENOMEM, "out of memory reading history");
    *type = rows[k].type;
    return SAGA_OK;
  }
  saga__store *s = j->env->store;
  int rc = s->m->hist_get(s, inst->id, inst->hseq, type, detail);
  if (rc == SAGA_ENOTFOUND) { /* purged, or never written: nothing to compare with */
    *type = 0;
    return SAGA_OK;
  }
  return rc == SAGA_OK ? rc : saga__store_fail(j->env, rc, "reading history");
}

int saga__journal_event(saga__journal *j, saga_event_type type, saga__inst *inst, int step,
                        uint32_t attempt, const char *detail) {
  if (detail == NULL) detail = "";
  uint64_t now = saga__now(j->env);
  saga__hist_rec h;
  memset(&h, 0, sizeof h);
  memcpy(h.saga_id, inst->id, sizeof h.saga_id);
  h.seq = inst->hseq + 1;
  h.at_ms = now;
  h.type = (int)type;
  h.step = step;
  h.attempt = attempt;
  h.detail_off = j->hist_text.len;
  size_t hist_len = j->hist.len;
  if (saga__buf_append(&j->hist_text, detail, strlen(detail) + 1) != SAGA_OK ||
      saga__buf_append(&j->hist, &h, sizeof h) != SAGA_OK) {
    j->hist.len = hist_len;
    j->hist_text.len = h.detail_off;
    return saga__fail(j->env, SAGA_ENOMEM, "out of memory recording history");
  }
  inst->hseq++;
  int rc;
  if (j->event_channel != NULL) {
    rc = publish_event(j, type, inst, step, attempt, detail, now);
    if (rc != SAGA_OK) return rc;
  }
  if (!j->keep_events) return SAGA_OK;
  if ((rc = grow_events(j)) != SAGA_OK) return rc;
  saga__event_rec *r = &j->events[j->nevents];
  r->remote_off = 0;
  r->detail_off = j->event_text.len;
  size_t dlen = strlen(detail), nlen = strlen(inst->def_name);
  if (saga__buf_reserve(&j->event_text, dlen + nlen + 2) != SAGA_OK)
    return saga__fail(j->env, SAGA_ENOMEM, "out of memory buffering an event");
  saga__buf_append(&j->event_text, detail, dlen + 1);
  saga__buf_append(&j->event_text, inst->def_name, nlen + 1);
  r->type = type;
  memcpy(r->saga_id, inst->id, sizeof r->saga_id);
  r->def = inst->def;
  r->step = step;
  r->attempt = attempt;
  r->state = (saga_state)inst->state;
  r->at_ms = now;
  saga__inst_traceparent(inst, r->traceparent);
  j->nevents++;
  return SAGA_OK;
}

int saga__journal_step_stat(saga__journal *j, uint32_t slot, uint32_t kind, uint64_t value) {
  saga__step_stat_rec r = {slot, kind, value};
  if (saga__buf_append(&j->step_stats, &r, sizeof r) != SAGA_OK)
    return saga__fail(j->env, SAGA_ENOMEM, "out of memory recording step metrics");
  return SAGA_OK;
}

int saga__journal_remote_event(saga__journal *j, const void *data, size_t len) {
  if (!j->keep_remote) return SAGA_OK;
  int rc = grow_events(j);
  if (rc != SAGA_OK) return rc;
  uint64_t len64 = len;
  size_t off = j->remote_events.len;
  if (saga__buf_append(&j->remote_events, &len64, sizeof len64) != SAGA_OK ||
      saga__buf_append(&j->remote_events, data, len) != SAGA_OK) {
    j->remote_events.len = off;
    return saga__fail(j->env, SAGA_ENOMEM, "out of memory buffering an event");
  }
  saga__event_rec *r = &j->events[j->nevents++];
  memset(r, 0, sizeof *r);
  r->remote_off = off + 1;
  return SAGA_OK;
}

/* ---- the transaction's bracket ---------------------------------------------------------- */

void saga__journal_begin(saga__journal *j) {
  saga__buf_reset(&j->hist);
  saga__buf_reset(&j->hist_text);
  saga__buf_reset(&j->step_stats);
  j->outbox_next_valid = 0;
  j->outbox_used = 0;
}

int saga__journal_finish(saga__journal *j) {
  saga__store *s = j->env->store;
  const saga__hist_rec *h = (const saga__hist_rec *)(void *)j->hist.data;
  size_t count = j->hist.len / sizeof *h;
  int rc = count > 0 ? s->m->hist_insert(s, h, count, (const char *)j->hist_text.data)
                     : SAGA_OK;
  saga__buf_reset(&j->hist);
  saga__buf_reset(&j->hist_text);
  if (rc != SAGA_OK) return saga__store_fail(j->env, rc, "recording history");
  if (!j->outbox_used) return SAGA_OK;
  rc = s->m->outbox_mark(s, j->outbox_next - 1);
  if (rc != SAGA_OK) return saga__store_fail(j->env, rc, "recording the outbox id");
  j->outbox_used = 0;
  return SAGA_OK;
}

/* ---- outbox and dead letters ------------------------------------------------------------ */

/* Outbox ids increase and never repeat: the next id is above the largest the store ever used,
 * read once per transaction under the write lock (processes sharing the database do not
 * collide); saga__journal_finish records the last id taken. */
static int next_outbox_id(saga__journal *j, uint64_t *id) {
  if (!j->outbox_next_valid) {
    uint64_t max = 0;
    saga__store *s = j->env->store;
    int rc = s->m->outbox_max(s, &max);
    if (rc != SAGA_OK) return saga__store_fail(j->env, rc, "reading outbox");
    if (j->outbox_next <= max) j->outbox_next = max + 1;
    j->outbox_next_valid = 1;
  }
  *id = j->outbox_next++;
  j->outbox_used = 1;
  return SAGA_OK;
}

int saga__journal_outbox(saga__journal *j, const char *channel, const char *saga_id,
                         const void *body, size_t len) {
  uint64_t id = 0;
  int rc = next_outbox_id(j, &id);
  if (rc != SAGA_OK) return rc;
  saga__store *s = j->env->store;
  rc = s->m->outbox_insert(s, id, channel, saga_id, body, len, saga__now(j->env));
  if (rc != SAGA_OK) return saga__store_fail(j->env, rc, "writing outbox");
  SAGA__HOOK(j->env, "outbox.after_insert");
  return SAGA_OK;
}

int saga__journal_dead_letter(saga__journal *j, const char *channel, const char *msg_id,
                              const char *reason, const void *body, size_t len) {
  saga__store *s = j->env->store;
  /* A dead letter is for an operator to read, not a second outbox: a large body is cut, and
   * the reason says so (with the size it had). */
  char cut[640];
  if (len > j->env->dead_body_max) {
    snprintf(cut, sizeof cut, "%s [message cut to its first %zu of %zu bytes]", reason,
             j->env->dead_body_max, len);
    reason = cut;
    len = j->env->dead_body_max;
  }
  /* The count limit holds as each one is written, not only at the next retention pass: a
   * flood of malformed messages cannot grow the table between passes. */
  uint64_t dropped = 0;
  int rc = s->m->dead_insert(s, saga__now(j->env), channel, msg_id, reason, body, len,
                             SAGA_DEAD_LETTER_MAX, &dropped);
  if (rc != SAGA_OK) return saga__store_fail(j->env, rc, "writing dead letter");
  j->env->stats.dead_letters++;
  j->env->stats.purged_dead_letters += dropped;
  snprintf(j->dead_reason, sizeof j->dead_reason, "%s", reason);
  saga__log(j->env, SAGA_LOG_WARN, "dead letter on '%s' (msg '%s'): %s", channel,
            msg_id ? msg_id : "", reason);
  return SAGA_OK;
}
