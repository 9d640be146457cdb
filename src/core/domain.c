/*
 * Domain events (include/saga/domain.h). Publishing writes an outbox row in the caller's
 * transaction (the journal's outbox, sent by the relay like every row) and bumps the key's
 * sequence number in the same transaction. Receiving decides, inside the subscriber's
 * transaction: a malformed event is dead-lettered; an event whose id is in the inbox, or
 * whose sequence number is at or below its key's cursor, is a duplicate; one above the
 * cursor + 1 came before its predecessor and is left unacknowledged (held); the next one
 * runs its handler in a savepoint, and the inbox row and the cursor are written with the
 * handler's work. A failing handler is rolled back: retried on redelivery when the failure
 * is transient, else (or after max_deliveries tries) dead-lettered, the cursor moving past.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "domain.h"


void saga__domain_init(saga__domain *d, saga__env *env, saga__journal *j, saga__participant *p,
                       const char *source, uint32_t max_deliveries) {
  memset(d, 0, sizeof *d);
  d->env = env;
  d->journal = j;
  d->part = p;
  d->source = source;
  d->max_deliveries = max_deliveries ? max_deliveries : 10;
  saga__buf_init(&d->enc, env->alloc);
  p->domain = d;
}

void saga__domain_free(saga__domain *d) {
  for (size_t k = 0; k < d->nsubs; k++) {
    saga__free(d->env->alloc, d->subs[k].channel);
    saga__free(d->env->alloc, d->subs[k].name);
  }
  saga__free(d->env->alloc, d->subs);
  d->subs = NULL;
  d->nsubs = 0;
  saga__buf_free(&d->enc);
}

int saga__domain_open(saga__domain *d) {
  saga__store *s = d->env->store;
  if (s->m->event_stream == NULL) return SAGA_OK;
  uint64_t fresh = 0, stream = 0;
  while (fresh == 0) {
    int rc = saga__id_bytes(d->env, &fresh, sizeof fresh);
    if (rc != SAGA_OK) return rc;
  }
  int rc = s->m->event_stream(s, fresh, &stream);
  if (rc != SAGA_OK) return saga__store_fail(d->env, rc, "reading the event stream id");
  snprintf(d->stream, sizeof d->stream, "%016" PRIx64, stream);
  return SAGA_OK;
}

/* ---- subscribers ------------------------------------------------------------------------ */

static const saga__subscriber *find_sub(const saga__domain *d, const char *channel,
                                        const char *name) {
  const saga__subscriber *any = NULL;
  for (size_t k = 0; k < d->nsubs; k++) {
    const saga__subscriber *s = &d->subs[k];
    if (strcmp(s->channel, channel) != 0) continue;
    if (s->name == NULL) {
      if (name == NULL) return s;
      any = s;
    } else if (name != NULL && strcmp(s->name, name) == 0) {
      return s;
    }
  }
  return name == NULL ? NULL : any;
}

int saga__domain_has_channel(const saga__domain *d, const char *channel) {
  for (size_t k = 0; k < d->nsubs; k++)
    if (strcmp(d->subs[k].channel, channel) == 0) return 1;
  return 0;
}

int saga__domain_subscribe(saga__domain *d, const char *channel, const char *name,
                           saga_event_handler fn, void *arg) {
  const saga__subscriber *dup = find_sub(d, channel, name);
  if (dup != NULL && (name == NULL) == (dup->name == NULL))
    return saga__fail(d->env, SAGA_EEXIST, "an event handler for '%s' on '%s' is registered "
                      "already", name != NULL ? name : "(every name)", channel);
  saga__subscriber *v = saga__realloc(d->env->alloc, d->subs, (d->nsubs + 1) * sizeof *v);
  if (v == NULL) return saga__fail(d->env, SAGA_ENOMEM, "out of memory registering a handler");
  d->subs = v;
  saga__subscriber *s = &v[d->nsubs];
  s->channel = saga__strdup(d->env->alloc, channel);
  s->name = name != NULL ? saga__strdup(d->env->alloc, name) : NULL;
  if (s->channel == NULL || (name != NULL && s->name == NULL)) {
    saga__free(d->env->alloc, s->channel);
    saga__free(d->env->alloc, s->name);
    return saga__fail(d->env, SAGA_ENOMEM, "out of memory registering a handler");
  }
  s->fn = fn;
  s->arg = arg;
  d->nsubs++;
  return SAGA_OK;
}

/* ---- publishing ------------------------------------------------------------------------- */

/* A channel, event name or key: at most SAGA_EVENT_NAME_MAX bytes, at least min. */
static int name_ok(const char *v, size_t min) {
  if (v == NULL) return min == 0;
  size_t n = strnlen(v, SAGA_EVENT_NAME_MAX + 1);
  return n >= min && n <= SAGA_EVENT_NAME_MAX;
}

static void hex(char *out, const uint8_t *b, size_t len) {
  static const char digits[] = "0123456789abcdef";
  for (size_t k = 0; k < len; k++) {
    out[2 * k] = digits[b[k] >> 4];
    out[2 * k + 1] = digits[b[k] & 15];
  }
  out[2 * len] = '\0';
}

int saga_tx_publish(saga_tx *tx, const char *channel, const char *name, const char *key,
                    const void *data, size_t len) {
  if (tx == NULL || tx->p == NULL) return SAGA_EINVAL;
  saga__participant *p = tx->p;
  saga__env *env = p->env;
  saga__domain *d = p->domain;
  env->errmsg[0] = '\0';
  if (!name_ok(channel, 1) || strcmp(channel, SAGA__LOCAL_CHANNEL) == 0)
    return saga__fail(env, SAGA_EINVAL, "event channel must be 1..%u bytes and not '%s'",
                      SAGA_EVENT_NAME_MAX, SAGA__LOCAL_CHANNEL);
  if (!name_ok(name, 1))
    return saga__fail(env, SAGA_EINVAL, "event name must be 1..%u bytes", SAGA_EVENT_NAME_MAX);
  if (key == NULL) key = "";
  if (!name_ok(key, 0))
    return saga__fail(env, SAGA_EINVAL, "event key must be at most %u bytes",
                      SAGA_EVENT_NAME_MAX);
  if (data == NULL && len > 0)
    return saga__fail(env, SAGA_EINVAL, "event data is NULL but its length is %zu", len);
  size_t limit = saga__data_limit(&env->limits);
  if (len > limit)
    return saga__fail(env, SAGA_ETOOBIG, "event data is %zu bytes; the limit is %zu "
                      "(saga_limits.max_message_bytes minus %d for the envelope)", len, limit,
                      SAGA__ENVELOPE_RESERVE);
  saga__store *s = env->store;
  if (d == NULL || d->stream[0] == '\0' || s->m->event_seq_next == NULL)
    return saga__fail(env, SAGA_ESTATE, "this node's store keeps no domain events");
  uint64_t seq = 0;
  int rc = s->m->event_seq_next(s, channel, key, &seq);
  if (rc != SAGA_OK) return saga__store_fail(env, rc, "numbering an event");
  /* The id: 48 bits of ms then 80 random bits, like a saga id. */
  uint8_t b[16];
  uint64_t now = saga__now(env);
  for (int k = 0; k < 6; k++) b[k] = (uint8_t)(now >> (40 - 8 * k));
  if ((rc = saga__id_bytes(env, b + 6, 10)) != SAGA_OK) return rc;
  char id[33], seqs[24];
  hex(id, b, sizeof b);
  snprintf(seqs, sizeof seqs, "%" PRIu64, seq);
  saga_header hdr[4] = {{"stream", d->stream}, {"seq", seqs}, {"key", key},
                        {"source", d->source}};
  saga_envelope e;
  memset(&e, 0, sizeof e);
  e.version = SAGA_ENVELOPE_VERSION;
  e.kind = SAGA_MSG_EVENT;
  e.msg_id = id;
  e.saga_id = "";
  e.step = UINT32_MAX;
  e.name = name;
  e.headers = hdr;
  e.nheaders = 4;
  e.payload = data;
  e.payload_len = len;
  saga__buf_reset(&d->enc);
  rc = saga__envelope_encode_buf(&e, &d->enc);
  if (rc != SAGA_OK) return saga__fail(env, rc, "encoding an event");
  return saga__journal_outbox(p->journal, channel, "", d->enc.data, d->enc.len);
}

/* ---- application transactions ----------------------------------------------------------- */

/* Runs fn in the handler savepoint: kept when it returns SAGA_OK, rolled back (with what it
 * recorded in the journal) when not. *code gets fn's result. */
typedef int (*unit_fn)(saga_tx *tx, void *a, void *b);

static int in_handler_savepoint(saga__domain *d, const char *what, unit_fn fn, void *a,
                                void *b, int *code) {
  saga__participant *p = d->part;
  saga__store *s = d->env->store;
  int rc = s->m->savepoint(s, SAGA__SP_HANDLER);
  if (rc != SAGA_OK) return saga__store_fail(d->env, rc, "opening handler savepoint");
  int64_t writes_before = s->m->writes(s);
  saga__journal_mark mark = saga__journal_mark_get(d->journal);
  p->handler_ran = 0; /* sagas it starts get a trace of their own */
  p->handler_tp[0] = '\0';
  saga_tx tx = {p, NULL};
  int hrc = fn(&tx, a, b);
  if (!s->m->in_tx(s)) {
    d->env->stats.handler_contract_errors++;
    return saga__fail(d->env, SAGA_ESTATE, "%s ended the node's transaction (COMMIT, ROLLBACK "
                      "or END on saga_tx_db(); it must not): what this batch wrote before and "
                      "in it was committed or rolled back with it", what);
  }
  if (hrc > 0) {
    d->env->stats.handler_contract_errors++;
    int base = hrc & 0xff;
    if (base == 5 || base == 6) { /* SQLite's busy and locked: transient */
      hrc = SAGA_EBUSY;
    } else {
      saga__fail(d->env, SAGA_EINVAL, "%s returned %d, which is not a libsaga code (a "
                 "positive value is likely an SQLite result code passed through)", what, hrc);
      hrc = SAGA_EINVAL;
    }
  }
  *code = hrc;
  if (hrc != SAGA_OK) {
    saga__journal_rewind(d->journal, &mark);
    rc = s->m->rollback_to(s, SAGA__SP_HANDLER);
    if (rc != SAGA_OK) return saga__store_fail(d->env, rc, "rolling back handler savepoint");
    p->undone += s->m->writes(s) - writes_before; /* the item is still clean (batch.c) */
  }
  rc = s->m->release(s, SAGA__SP_HANDLER);
  return rc == SAGA_OK ? rc : saga__store_fail(d->env, rc, "releasing handler savepoint");
}

static int call_transact(saga_tx *tx, void *a, void *b) {
  saga_transact_fn fn;
  memcpy(&fn, a, sizeof fn);
  return fn(tx, b);
}

int saga__domain_transact(saga__domain *d, saga_transact_fn fn, void *arg) {
  int code = SAGA_OK;
  d->env->errmsg[0] = '\0';
  int rc = in_handler_savepoint(d, "a saga_node_transact() function", call_transact, &fn, arg,
                                &code);
  if (rc != SAGA_OK) return rc;
  if (code != SAGA_OK && d->env->errmsg[0] == '\0')
    saga__fail(d->env, code, "the transaction's function returned %s: rolled back",
               saga_err_name(code));
  return code;
}

/* ---- receiving -------------------------------------------------------------------------- */

/* FNV-1a of an event id. */
static uint64_t id_hash(const char *id) {
  uint64_t h = 1469598103934665603ull;
  for (const char *c = id; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
  return h;
}

/* Counts a transient failure of the event; nonzero once it failed max_deliveries times. */
static int transient_cap_reached(saga__domain *d, const char *id) {
  uint64_t h = id_hash(id);
  size_t slot = (size_t)(h % (sizeof d->transient / sizeof d->transient[0]));
  if (d->transient[slot].hash != h) {
    d->transient[slot].hash = h;
    d->transient[slot].count = 0;
  }
  if (++d->transient[slot].count < d->max_deliveries) return 0;
  d->transient[slot].hash = 0;
  d->transient[slot].count = 0;
  return 1;
}

static int is_transient(int code) {
  return code == SAGA_ENOMEM || code == SAGA_EBUSY || code == SAGA_EIO || code == SAGA_EFULL;
}

/* "1" to "9223372036854775807", digits only. */
static int parse_seq(const char *t, uint64_t *out) {
  if (t == NULL || t[0] == '\0' || t[0] == '0' || strlen(t) > 19) return 0;
  uint64_t v = 0;
  for (const char *c = t; *c; c++) {
    if (*c < '0' || *c > '9') return 0;
    v = v * 10 + (uint64_t)(*c - '0');
  }
  if (v > (uint64_t)INT64_MAX) return 0;
  *out = v;
  return 1;
}

/* Exactly n lowercase hex digits. */
static int is_hex(const char *t, size_t n) {
  if (t == NULL || strlen(t) != n) return 0;
  for (const char *c = t; *c; c++)
    if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f'))) return 0;
  return 1;
}

typedef struct event_call {
  const saga__subscriber *sub;
  const saga_domain_event *ev;
} event_call;

static int call_handler(saga_tx *tx, void *a, void *b) {
  (void)b;
  event_call *c = a;
  return c->sub->fn(tx, c->ev, c->sub->arg);
}

int saga__domain_event(saga__domain *d, const char *channel, const saga_envelope *env,
                       const void *raw, size_t raw_len, int replay, int *ack) {
  *ack = 1;
  saga__env *e = d->env;
  saga__store *s = e->store;
  const char *stream = saga_envelope_header(env, "stream");
  const char *seqs = saga_envelope_header(env, "seq");
  const char *key = saga_envelope_header(env, "key");
  const char *source = saga_envelope_header(env, "source");
  uint64_t seq = 0;
  const char *bad = NULL;
  /* 32 hex digits, as saga_tx_publish makes them: never the id of a command (those hold
   * slashes), whose inbox record an event could otherwise take. */
  if (!is_hex(env->msg_id, 32))
    bad = "the event id is not 32 lowercase hex digits";
  else if (!name_ok(env->name, 1))
    bad = "the event name is empty or longer than 256 bytes";
  else if (!is_hex(stream, 16))
    bad = "no 'stream' header of 16 lowercase hex digits";
  else if (!parse_seq(seqs, &seq))
    bad = "no 'seq' header with a sequence number from 1 to 2^63-1";
  else if (key == NULL || !name_ok(key, 0))
    bad = "no 'key' header, or one longer than 256 bytes";
  if (bad != NULL) {
    char why[160];
    snprintf(why, sizeof why, "malformed domain event: %s", bad);
    return saga__journal_dead_letter(d->journal, channel, env->msg_id, why, raw, raw_len);
  }
  if (s->m->event_cursor_get == NULL || s->m->event_cursor_put == NULL)
    return saga__fail(e, SAGA_ESTATE, "this node's store keeps no domain events");

  /* 1. Handled already (this id): a redelivery. */
  saga__participant *p = d->part;
  saga__buf_reset(&p->dup_to);
  saga__buf_reset(&p->dup);
  int rc = s->m->inbox_get(s, env->msg_id, &p->dup_to, &p->dup);
  if (rc == SAGA_OK) {
    if (replay)
      return saga__fail(e, SAGA_EEXIST, "event '%s' (%s) was handled already: handling it "
                        "again would change nothing; purge the dead letter", env->name,
                        env->msg_id);
    e->stats.duplicates++;
    return SAGA_OK;
  }
  if (rc == SAGA_ENOMEM) return saga__fail(e, rc, "out of memory reading inbox");
  if (rc != SAGA_ENOTFOUND) return saga__store_fail(e, rc, "reading inbox");

  /* 2. Its place in its key's sequence. */
  uint64_t last = 0;
  rc = s->m->event_cursor_get(s, stream, channel, key, &last);
  if (rc != SAGA_OK) return saga__store_fail(e, rc, "reading an event cursor");
  if (!replay && seq <= last) { /* handled, skipped or dead-lettered already */
    e->stats.duplicates++;
    return SAGA_OK;
  }
  if (!replay && seq > last + 1) { /* its predecessor has not been handled: comes again */
    e->stats.events_held++;
    *ack = 0;
    char shown[80]; /* from the network: no control characters into the log */
    saga__printable(shown, sizeof shown, key, strnlen(key, 64));
    saga__log(e, SAGA_LOG_DEBUG, "event %" PRIu64 " of key '%s' on '%s' held: %" PRIu64
              " was the last handled", seq, shown, channel, last);
    return SAGA_OK;
  }

  /* 3. Its handler, in a savepoint. */
  const saga__subscriber *sub = find_sub(d, channel, env->name);
  int handled = 0;
  if (sub != NULL) {
    saga_domain_event ev;
    memset(&ev, 0, sizeof ev);
    ev.id = env->msg_id;
    ev.channel = channel;
    ev.name = env->name;
    ev.key = key;
    ev.data = env->payload_len > 0 ? env->payload : "";
    ev.len = env->payload_len;
    ev.seq = seq;
    ev.source = source != NULL ? source : "";
    event_call call = {sub, &ev};
    char what[320];
    snprintf(what, sizeof what, "event handler for '%.100s' on '%.100s'", env->name, channel);
    e->stats.event_handler_runs++;
    e->errmsg[0] = '\0';
    int code = SAGA_OK;
    rc = in_handler_savepoint(d, what, call_handler, &call, NULL, &code);
    if (rc != SAGA_OK) return rc;
    if (code == SAGA_OK) {
      handled = 1;
    } else if (is_transient(code) && !transient_cap_reached(d, env->msg_id)) {
      /* Nothing of it is recorded or acknowledged: it comes again. */
      return saga__fail(e, code, "%s failed transiently (%s): it is delivered again", what,
                        saga_strerror(code));
    } else {
      char why[700];
      snprintf(why, sizeof why, "%s failed: %s (%.300s)%s", what, saga_err_name(code),
               e->errmsg[0] ? e->errmsg : saga_strerror(code),
               is_transient(code) ? "; tried max_deliveries times" : "");
      rc = saga__journal_dead_letter(d->journal, channel, env->msg_id, why, raw, raw_len);
      if (rc != SAGA_OK) return rc;
    }
  }

  /* 4. Recorded with the handler's work: the id (only when handled, so that a replay of a
   * dead-lettered event can run it) and the key's cursor. */
  uint64_t now = saga__now(e);
  if (handled) {
    rc = s->m->inbox_insert(s, env->msg_id, env->saga_id, now, "", NULL, 0);
    if (rc != SAGA_OK) return saga__store_fail(e, rc, "writing inbox");
  }
  if (seq > last) {
    rc = s->m->event_cursor_put(s, stream, channel, key, seq, now);
    if (rc != SAGA_OK) return saga__store_fail(e, rc, "writing an event cursor");
  }
  return SAGA_OK;
}
