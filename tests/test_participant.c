/*
 * The participant guarantees (guarantees 2, 3 and 6 of the README), driven by raw envelopes.
 *
 * A test world is opened (orchestrator "orch", participant "part" serving p0..p2 with the
 * commands "do"/"undo"), and the test plugs its own in-memory transport into the world's
 * hub as channel "tester". It sends hand-made command envelopes (or plain bytes) to the
 * participant's channels with reply_to "tester", records every reply it gets back
 * (acknowledging each one so the participant's outbox empties), and checks what the
 * participant did: handler runs (w.handler_calls), business effects (fx rows), replies,
 * dead letters. The last test sends crafted replies to the orchestrator's channel instead.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack.h>
#include <sqlite3.h>

#include "harness.h"
#include "internal.h" /* saga__transport_host, saga__buf, saga__data_encode */

/* ---- the tester: a raw endpoint on the hub ------------------------------------------------ */

#define MAX_REPLIES 256

typedef struct reply {
  uint8_t *bytes;
  size_t len;
  saga_envelope *env; /* NULL if the bytes did not decode */
  char channel[64];
} reply;

typedef struct tester {
  th_world *w;
  saga_transport *t;
  saga__transport_host host;
  reply replies[MAX_REPLIES];
  size_t nreplies;
  uint64_t next_token;
  size_t nconfirmed; /* sends the receiving node acknowledged (after its commit) */
  int closed;
} tester;

static int tester_deliver(void *ctx, const char *channel, const void *data, size_t len,
                          uint64_t tag) {
  tester *T = ctx;
  assert_true(T->nreplies < MAX_REPLIES);
  reply *r = &T->replies[T->nreplies++];
  memset(r, 0, sizeof *r);
  snprintf(r->channel, sizeof r->channel, "%s", channel);
  r->len = len;
  r->bytes = malloc(len > 0 ? len : 1);
  assert_non_null(r->bytes);
  if (len > 0) memcpy(r->bytes, data, len);
  char err[256];
  if (saga_envelope_decode(data, len, NULL, NULL, &r->env, err, sizeof err) != SAGA_OK) {
    printf("tester: undecodable reply: %s\n", err);
    r->env = NULL;
  }
  /* Acknowledge at once: we "committed" it. The participant's outbox row is then deleted. */
  T->t->methods->ack(T->t, tag);
  return SAGA_OK;
}

static void tester_sent(void *ctx, uint64_t token, int status) {
  tester *T = ctx;
  if (status == SAGA_OK) T->nconfirmed++;
}

static void tester_closed(void *ctx) { ((tester *)ctx)->closed = 1; }

static void tester_log(void *ctx, saga_log_level level, const char *msg) {
  (void)ctx;
  printf("tester transport log [%d]: %s\n", (int)level, msg);
}

static void tester_open(tester *T, th_world *w) {
  memset(T, 0, sizeof *T);
  T->w = w;
  assert_int_equal(saga_mem_transport_new(&T->t, w->hub), SAGA_OK);
  T->host.deliver = tester_deliver;
  T->host.sent = tester_sent;
  T->host.closed = tester_closed;
  T->host.log = tester_log;
  T->host.ctx = T;
  T->t->saga__host = &T->host;
  assert_int_equal(T->t->methods->open(T->t, &w->loop), SAGA_OK);
  assert_int_equal(T->t->methods->subscribe(T->t, "tester"), SAGA_OK);
}

static void tester_close(tester *T) {
  T->t->methods->close(T->t);
  assert_true(T->closed);
  T->t->methods->destroy(T->t);
  T->t = NULL;
  for (size_t i = 0; i < T->nreplies; i++) {
    free(T->replies[i].bytes);
    saga_envelope_free(T->replies[i].env);
  }
  T->nreplies = 0;
}

static void send_raw(tester *T, const char *channel, const void *data, size_t len) {
  static const uint8_t none = 0;
  assert_int_equal(T->t->methods->send(T->t, channel, len > 0 ? data : &none, len,
                                       ++T->next_token),
                   SAGA_OK);
}

/* An envelope with the usual fields; payload may be NULL. */
typedef struct msg {
  saga_msg_kind kind;
  const char *msg_id, *saga_id, *name, *reply_to, *error;
  uint32_t step, attempt;
  saga_phase phase;
  int32_t status;
  const void *payload;
  size_t payload_len;
} msg;

static void encode(const msg *m, void **out, size_t *outlen) {
  saga_header hdr = {"traceparent", "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"};
  saga_envelope e;
  memset(&e, 0, sizeof e);
  e.version = SAGA_ENVELOPE_VERSION;
  e.kind = m->kind ? m->kind : SAGA_MSG_COMMAND;
  e.msg_id = m->msg_id;
  e.saga_id = m->saga_id;
  e.step = m->step;
  e.attempt = m->attempt ? m->attempt : 1;
  e.phase = m->phase;
  e.name = m->name;
  e.reply_to = m->reply_to;
  e.status = m->status;
  e.error = m->error;
  e.headers = &hdr;
  e.nheaders = 1;
  e.payload = m->payload;
  e.payload_len = m->payload_len;
  assert_int_equal(saga_envelope_encode(&e, NULL, out, outlen), SAGA_OK);
}

static void send_msg(tester *T, const char *channel, const msg *m) {
  void *buf = NULL;
  size_t len = 0;
  encode(m, &buf, &len);
  send_raw(T, channel, buf, len);
  saga_free(NULL, buf);
}

/* A command to the participant channel p<step>, replying to "tester". */
static void send_cmd(tester *T, const char *msg_id, const char *saga_id, uint32_t step,
                     uint32_t attempt, saga_phase phase, const char *name, const saga__buf *data) {
  char channel[8];
  snprintf(channel, sizeof channel, "p%u", step);
  msg m = {.kind = SAGA_MSG_COMMAND, .msg_id = msg_id, .saga_id = saga_id, .name = name,
           .reply_to = "tester", .step = step, .attempt = attempt, .phase = phase,
           .payload = data ? data->data : NULL, .payload_len = data ? data->len : 0};
  send_msg(T, channel, &m);
}

/* Saga data {key: val} (one entry, or empty when key is NULL), encoded. Free with
 * saga__buf_free. */
static void data_buf(saga__buf *b, const char *key, const char *val) {
  saga__buf_init(b, NULL);
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  if (key != NULL) assert_int_equal(saga_data_set_str(d, key, val), SAGA_OK);
  assert_int_equal(saga__data_encode(d, b), SAGA_OK);
  saga_data_free(d);
}

/* ---- driving the world -------------------------------------------------------------------- */

typedef struct {
  tester *T;
  size_t replies, confirmed;
} wait_ctx;

static int wait_pred(void *arg) {
  wait_ctx *c = arg;
  return c->T->nreplies >= c->replies && c->T->nconfirmed >= c->confirmed;
}

/* Runs until `replies` replies arrived and every message sent so far was acknowledged by its
 * receiver, then lets the world settle (so that an unexpected extra reply would show). */
static void run_until(tester *T, size_t replies) {
  wait_ctx c = {T, replies, (size_t)T->next_token};
  int rc = th_run_manual(&T->w->loop, T->w->clock, wait_pred, &c, 60000);
  if (rc != 0)
    printf("run_until: %zu/%zu replies, %zu/%zu confirmed\n", T->nreplies, replies,
           T->nconfirmed, (size_t)T->next_token);
  assert_int_equal(rc, 0);
  th_world_settle(T->w, 2000);
  assert_int_equal(T->nreplies, replies);
}

static const saga_envelope *rep(tester *T, size_t i) {
  assert_true(i < T->nreplies);
  assert_non_null(T->replies[i].env);
  return T->replies[i].env;
}

static void open_world(th_world *w, tester *T, const th_world_opts *o) {
  assert_int_equal(th_world_open(w, o), SAGA_OK);
  tester_open(T, w);
}

static void close_world(th_world *w, tester *T) {
  /* Nothing may be left unconfirmed at the participant: its outbox is empty. */
  tester_close(T);
  th_world_free(w);
}

static int64_t q_int(saga_node *n, const char *sql, const char *arg) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(n), sql, -1, &st, NULL), SQLITE_OK);
  if (arg != NULL) sqlite3_bind_text(st, 1, arg, -1, SQLITE_TRANSIENT);
  int64_t v = -1;
  if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

static int64_t dead_letters(th_world *w) {
  return q_int(w->part, "SELECT count(*) FROM saga_dead_letter", NULL);
}

static int reply_data_is(const saga_envelope *e, const char *key, const char *val) {
  saga_data *d = NULL;
  char err[200];
  if (saga__data_decode(e->payload, e->payload_len, NULL, NULL, &d, err, sizeof err) != SAGA_OK)
    return 0;
  const char *v = saga_data_get_str(d, key);
  int ok = v != NULL && strcmp(v, val) == 0;
  saga_data_free(d);
  return ok;
}

/* ---- (a) duplicates ----------------------------------------------------------------------- */

static void test_duplicate_command(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf d;
  data_buf(&d, NULL, NULL);
  /* Twice back to back (one group transaction), then once more in a later transaction. */
  send_cmd(&T, "dup-1", "saga-a", 0, 1, SAGA_PHASE_ACTION, "do", &d);
  send_cmd(&T, "dup-1", "saga-a", 0, 1, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 2);
  assert_int_equal(w.handler_calls, 1);
  assert_int_equal(th_fx_count(&w, "saga-a", 0, "do"), 1);
  send_cmd(&T, "dup-1", "saga-a", 0, 1, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 3);
  assert_int_equal(w.handler_calls, 1);
  assert_int_equal(th_fx_count(&w, "saga-a", 0, "do"), 1);
  const saga_envelope *r0 = rep(&T, 0);
  assert_int_equal(r0->kind, SAGA_MSG_REPLY);
  assert_int_equal(r0->status, 0);
  assert_string_equal(r0->saga_id, "saga-a");
  assert_string_equal(r0->msg_id, "dup-1/r");
  assert_true(reply_data_is(r0, "s0", "done"));
  for (size_t i = 1; i < 3; i++) {
    assert_int_equal(T.replies[i].len, T.replies[0].len);
    assert_memory_equal(T.replies[i].bytes, T.replies[0].bytes, T.replies[0].len);
  }
  saga_node_stats st;
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.duplicates, 2);
  assert_int_equal(st.handler_runs, 1);
  assert_int_equal(saga_node_outbox_depth(w.part), 0);
  saga__buf_free(&d);
  close_world(&w, &T);
}

/* ---- (b) a later attempt of an applied action ---------------------------------------------- */

static void test_later_attempt_gets_recorded_reply(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf d;
  data_buf(&d, NULL, NULL);
  send_cmd(&T, "b-1", "saga-b", 0, 1, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 1);
  send_cmd(&T, "b-2", "saga-b", 0, 2, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 2);
  send_cmd(&T, "b-3", "saga-b", 0, 3, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 3);
  assert_int_equal(w.handler_calls, 1);
  assert_int_equal(th_fx_count(&w, "saga-b", 0, "do"), 1);
  const saga_envelope *r1 = rep(&T, 0);
  assert_int_equal(r1->status, 0);
  for (size_t i = 1; i < 3; i++) {
    const saga_envelope *r = rep(&T, i);
    assert_int_equal(r->status, 0);
    assert_int_equal(r->attempt, (uint32_t)i + 1); /* answers its own attempt */
    assert_int_equal(r->payload_len, r1->payload_len);
    assert_memory_equal(r->payload, r1->payload, r1->payload_len);
  }
  assert_true(reply_data_is(rep(&T, 2), "s0", "done"));
  saga__buf_free(&d);
  close_world(&w, &T);
}

/* ---- (c) compensation before the action: tombstone ---------------------------------------- */

static void test_compensation_before_action(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf d;
  data_buf(&d, NULL, NULL);
  send_cmd(&T, "c-u1", "saga-c", 1, 1, SAGA_PHASE_COMPENSATION, "undo", &d);
  run_until(&T, 1);
  assert_int_equal(rep(&T, 0)->status, 0); /* "nothing to undo" is a success */
  assert_int_equal(w.handler_calls, 0);
  /* The late action is refused without running, whatever its attempt. */
  send_cmd(&T, "c-a1", "saga-c", 1, 1, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 2);
  send_cmd(&T, "c-a2", "saga-c", 1, 2, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 3);
  for (size_t i = 1; i < 3; i++) {
    assert_int_equal(rep(&T, i)->status, SAGA_EREFUSED);
    assert_non_null(strstr(rep(&T, i)->error, "compensated"));
  }
  /* A compensation arriving again is still a no-op success. */
  send_cmd(&T, "c-u2", "saga-c", 1, 2, SAGA_PHASE_COMPENSATION, "undo", &d);
  run_until(&T, 4);
  assert_int_equal(rep(&T, 3)->status, 0);
  assert_int_equal(w.handler_calls, 0);
  assert_int_equal(th_fx_count(&w, "saga-c", -1, "do"), 0);
  assert_int_equal(th_fx_count(&w, "saga-c", -1, "undo"), 0);
  assert_int_equal(q_int(w.part, "SELECT state FROM saga_pstep WHERE saga_id = ?1", "saga-c"), 3);

  /* Control: the normal order runs both handlers once. */
  send_cmd(&T, "c2-a1", "saga-c2", 1, 1, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 5);
  send_cmd(&T, "c2-u1", "saga-c2", 1, 1, SAGA_PHASE_COMPENSATION, "undo", &d);
  run_until(&T, 6);
  assert_int_equal(rep(&T, 4)->status, 0);
  assert_int_equal(rep(&T, 5)->status, 0);
  assert_int_equal(th_fx_count(&w, "saga-c2", 1, "do"), 1);
  assert_int_equal(th_fx_count(&w, "saga-c2", 1, "undo"), 1);
  /* and an action after that compensation is refused too. */
  send_cmd(&T, "c2-a2", "saga-c2", 1, 2, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 7);
  assert_int_equal(rep(&T, 6)->status, SAGA_EREFUSED);
  assert_int_equal(w.handler_calls, 2);
  saga__buf_free(&d);
  close_world(&w, &T);
}

/* ---- (d) stale attempts ------------------------------------------------------------------- */

static void test_stale_attempt(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf fail, ok;
  data_buf(&fail, "fail", "0"); /* the test handler refuses step 0 with this input */
  data_buf(&ok, NULL, NULL);
  send_cmd(&T, "d-2", "saga-d", 0, 2, SAGA_PHASE_ACTION, "do", &fail);
  run_until(&T, 1);
  assert_int_equal(rep(&T, 0)->status, SAGA_EREFUSED);
  assert_string_equal(rep(&T, 0)->error, "refused by test");
  assert_int_equal(w.handler_calls, 1);
  /* Attempt 1 arrives late: a newer attempt was answered, so it must not run. */
  send_cmd(&T, "d-1", "saga-d", 0, 1, SAGA_PHASE_ACTION, "do", &ok);
  run_until(&T, 2);
  assert_int_equal(rep(&T, 1)->status, SAGA_EREFUSED);
  assert_non_null(strstr(rep(&T, 1)->error, "stale"));
  assert_int_equal(w.handler_calls, 1);
  assert_int_equal(th_fx_count(&w, "saga-d", 0, "do"), 0);
  /* The refused attempt's writes were rolled back (savepoint): no fx row from it. A newer
   * attempt does run, once. */
  send_cmd(&T, "d-3", "saga-d", 0, 3, SAGA_PHASE_ACTION, "do", &ok);
  run_until(&T, 3);
  assert_int_equal(rep(&T, 2)->status, 0);
  assert_int_equal(w.handler_calls, 2);
  assert_int_equal(th_fx_count(&w, "saga-d", 0, "do"), 1);
  saga__buf_free(&fail);
  saga__buf_free(&ok);
  close_world(&w, &T);
}

/* A refusal rolls back only the refusing handler's writes, even when other commands were
 * handled in the same group transaction. */
static void test_refusal_rolls_back_only_its_writes(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf fail, ok;
  data_buf(&fail, "fail", "1");
  data_buf(&ok, NULL, NULL);
  send_cmd(&T, "r-1", "saga-r1", 1, 1, SAGA_PHASE_ACTION, "do", &ok);
  send_cmd(&T, "r-2", "saga-r2", 1, 1, SAGA_PHASE_ACTION, "do", &fail);
  send_cmd(&T, "r-3", "saga-r3", 1, 1, SAGA_PHASE_ACTION, "do", &ok);
  run_until(&T, 3);
  assert_int_equal(w.handler_calls, 3);
  assert_int_equal(th_fx_count(&w, "saga-r1", 1, "do"), 1);
  assert_int_equal(th_fx_count(&w, "saga-r2", 1, "do"), 0);
  assert_int_equal(th_fx_count(&w, "saga-r3", 1, "do"), 1);
  saga__buf_free(&fail);
  saga__buf_free(&ok);
  close_world(&w, &T);
}

/* ---- (e) unknown command ------------------------------------------------------------------ */

static void test_unknown_command(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf d;
  data_buf(&d, NULL, NULL);
  send_cmd(&T, "e-1", "saga-e", 0, 1, SAGA_PHASE_ACTION, "nope", &d);
  run_until(&T, 1);
  assert_int_equal(rep(&T, 0)->status, SAGA_ENOHANDLER);
  assert_non_null(strstr(rep(&T, 0)->error, "nope"));
  assert_int_equal(w.handler_calls, 0);
  assert_int_equal(q_int(w.part, "SELECT count(*) FROM saga_dead_letter WHERE msg_id = ?1", "e-1"),
                   1);
  assert_int_equal(
      q_int(w.part,
            "SELECT count(*) FROM saga_dead_letter WHERE reason LIKE '%nope%' AND channel = ?1",
            "p0"),
      1);
  saga__buf_free(&d);
  close_world(&w, &T);
}

/* ---- (f) malformed input ------------------------------------------------------------------ */

typedef struct blob {
  const char *what;
  uint8_t *data;
  size_t len;
  const char *expect; /* substring of the dead letter's reason */
} blob;

static blob mk(const char *what, const void *data, size_t len, const char *expect) {
  blob b = {what, malloc(len > 0 ? len : 1), len, expect};
  assert_non_null(b.data);
  if (len > 0) memcpy(b.data, data, len);
  return b;
}

/* The dead-letter count limit holds as each one is written: with SAGA_DEAD_LETTER_MAX kept
 * already and no retention pass due, a burst of garbage replaces the oldest rather than growing
 * the table until the next pass (a flood of malformed messages cannot fill the disk). */
static void test_dead_letters_capped_at_insert(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  sqlite3 *db = saga_node_db(w.part);
  assert_int_equal(sqlite3_exec(db, "BEGIN", NULL, NULL, NULL), SQLITE_OK);
  sqlite3_stmt *ins = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, "INSERT INTO saga_dead_letter(at_ms, channel, msg_id,"
                                      " reason, body) VALUES(1, 'p0', ?1, 'old', x'00')",
                                      -1, &ins, NULL),
                   SQLITE_OK);
  for (int i = 0; i < (int)SAGA_DEAD_LETTER_MAX; i++) {
    sqlite3_bind_int(ins, 1, i);
    assert_int_equal(sqlite3_step(ins), SQLITE_DONE);
    sqlite3_reset(ins);
  }
  sqlite3_finalize(ins);
  assert_int_equal(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
  saga_node_stats st0;
  saga_node_stats_get(w.part, &st0, sizeof st0);
  for (int i = 0; i < 5; i++) {
    static const uint8_t junk[] = {0xc1, 0xc1, 0xc1}; /* 0xc1 is never valid msgpack */
    send_raw(&T, "p0", junk, sizeof junk);
    run_until(&T, 0);
    assert_int_equal(dead_letters(&w), SAGA_DEAD_LETTER_MAX);
  }
  /* The five newest are the garbage; the five oldest went. */
  assert_int_equal(q_int(w.part, "SELECT count(*) FROM saga_dead_letter WHERE reason <> 'old'",
                         NULL),
                   5);
  assert_int_equal(q_int(w.part, "SELECT min(CAST(msg_id AS INTEGER)) FROM saga_dead_letter"
                                 " WHERE reason = 'old'", NULL),
                   5);
  saga_node_stats st;
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.dead_letters - st0.dead_letters, 5);
  assert_int_equal(st.purged_dead_letters - st0.purged_dead_letters, 5);
  close_world(&w, &T);
}

static void test_malformed_input(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf d;
  data_buf(&d, NULL, NULL);
  blob blobs[16];
  size_t nb = 0;
  uint64_t seed = th_seed(0x5eed);
  printf("seed %#llx\n", (unsigned long long)seed);

  /* 1. A valid command cut in half. */
  msg good = {.kind = SAGA_MSG_COMMAND, .msg_id = "f-good", .saga_id = "saga-f", .name = "do",
              .reply_to = "tester", .payload = d.data, .payload_len = d.len};
  void *buf;
  size_t len;
  encode(&good, &buf, &len);
  blobs[nb++] = mk("truncated envelope", buf, len / 2, "EMALFORMED");
  saga_free(NULL, buf);
  /* 2. Random bytes, and random bytes behind an array-of-13 header. */
  uint8_t rnd[600];
  for (size_t i = 0; i < sizeof rnd; i++) rnd[i] = (uint8_t)saga__splitmix64(&seed);
  blobs[nb++] = mk("random bytes", rnd, sizeof rnd, "");
  rnd[0] = 0x9d;
  blobs[nb++] = mk("array header + random bytes", rnd, sizeof rnd, "");
  /* 3. A reply envelope with wrong field types: kind as a string, step negative. */
  {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 13);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_str_with_body(&pk, "reply", 5); /* kind must be an integer */
    msgpack_pack_str_with_body(&pk, "f-r", 3);
    msgpack_pack_str_with_body(&pk, "saga-f", 6);
    msgpack_pack_int32(&pk, -1);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, 0);
    msgpack_pack_str_with_body(&pk, "do", 2);
    msgpack_pack_str_with_body(&pk, "tester", 6);
    msgpack_pack_int32(&pk, 0);
    msgpack_pack_str_with_body(&pk, "", 0);
    msgpack_pack_map(&pk, 0);
    msgpack_pack_bin_with_body(&pk, "\x80", 1);
    blobs[nb++] = mk("reply with a string kind", sb.data, sb.size, "kind");
    msgpack_sbuffer_destroy(&sb);
  }
  /* 4. An oversized envelope: a valid command carrying 2 MiB of payload. */
  {
    size_t big = 2u << 20;
    uint8_t *payload = malloc(big);
    assert_non_null(payload);
    memset(payload, 'x', big);
    msg m = good;
    m.msg_id = "f-big";
    m.payload = payload;
    m.payload_len = big;
    encode(&m, &buf, &len);
    blobs[nb++] = mk("2 MiB envelope", buf, len, "ETOOBIG");
    saga_free(NULL, buf);
    free(payload);
  }
  /* 5. Deep nesting: arrays, then maps. */
  {
    size_t depth = 100000;
    uint8_t *p = malloc(depth * 2 + 1);
    assert_non_null(p);
    memset(p, 0x91, depth);
    p[depth] = 0xc0;
    blobs[nb++] = mk("100000 nested arrays", p, depth + 1, "nesting");
    for (size_t i = 0; i < depth; i++) {
      p[2 * i] = 0x81; /* map of one entry whose key is a nil */
      p[2 * i + 1] = 0xc0;
    }
    p[2 * depth] = 0xc0;
    blobs[nb++] = mk("100000 nested maps", p, 2 * depth + 1, "nesting");
    free(p);
  }
  /* 6. Nothing at all. */
  blobs[nb++] = mk("empty message", "", 0, "EMALFORMED");
  /* 7. An unknown envelope version. */
  {
    encode(&good, &buf, &len);
    uint8_t *p = buf;
    assert_int_equal(p[0], 0x9d);
    assert_int_equal(p[1], 0x01);
    p[1] = 0x63; /* version 99 */
    blobs[nb++] = mk("envelope version 99", p, len, "EVERSION");
    saga_free(NULL, buf);
  }
  /* 7b. A reply envelope of an unknown kind (7). */
  {
    msg m = good;
    m.kind = SAGA_MSG_REPLY;
    m.msg_id = "f-kind7/r";
    encode(&m, &buf, &len);
    uint8_t *p = buf;
    assert_int_equal(p[2], SAGA_MSG_REPLY);
    p[2] = 0x07;
    blobs[nb++] = mk("reply of unknown kind 7", p, len, "kind");
    saga_free(NULL, buf);
  }
  /* 8. A well-formed command without a reply channel. */
  {
    msg m = good;
    m.msg_id = "f-noreply";
    m.reply_to = "";
    encode(&m, &buf, &len);
    blobs[nb++] = mk("command without reply_to", buf, len, "reply_to");
    saga_free(NULL, buf);
  }
  /* 9. Trailing bytes after a valid envelope. */
  {
    encode(&good, &buf, &len);
    uint8_t *p = malloc(len + 3);
    assert_non_null(p);
    memcpy(p, buf, len);
    memcpy(p + len, "\x01\x02\x03", 3);
    blobs[nb++] = mk("trailing bytes", p, len + 3, "trailing");
    free(p);
    saga_free(NULL, buf);
  }

  for (size_t i = 0; i < nb; i++) {
    int64_t before = dead_letters(&w);
    send_raw(&T, "p0", blobs[i].data, blobs[i].len);
    run_until(&T, 0); /* acknowledged by the participant after its commit; no reply */
    assert_int_equal(dead_letters(&w), before + 1);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(saga_node_db(w.part),
                                        "SELECT reason, length(body), channel FROM "
                                        "saga_dead_letter ORDER BY id DESC LIMIT 1",
                                        -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    const char *reason = (const char *)sqlite3_column_text(st, 0);
    printf("  %-28s -> %s\n", blobs[i].what, reason);
    assert_true(reason != NULL && reason[0] != '\0');
    assert_non_null(strstr(reason, blobs[i].expect));
    /* What a dead letter keeps is capped: a large message is cut, and its reason says so. */
    assert_true(sqlite3_column_int64(st, 1) <= SAGA_DEAD_LETTER_BODY_MAX);
    if (blobs[i].len > SAGA_DEAD_LETTER_BODY_MAX)
      assert_non_null(strstr(reason, "[message cut to its first 65536 of"));
    assert_string_equal((const char *)sqlite3_column_text(st, 2), "p0");
    sqlite3_finalize(st);
    free(blobs[i].data);
  }
  assert_int_equal(w.handler_calls, 0);
  saga_node_stats st;
  saga_node_stats_get(w.part, &st, sizeof st);
  assert_int_equal(st.dead_letters, nb);

  /* Well-formed envelope, malformed saga data: refused with a reply, and dead-lettered. */
  {
    msg m = good;
    m.msg_id = "f-baddata";
    m.saga_id = "saga-f2"; /* its refusal is recorded for (saga, step): keep saga-f clean */
    m.payload = "\x81\xa1k\x01"; /* {"k": 1}: values must be binary */
    m.payload_len = 4;
    int64_t before = dead_letters(&w);
    send_msg(&T, "p0", &m);
    run_until(&T, 1);
    assert_int_equal(rep(&T, 0)->status, SAGA_EMALFORMED);
    assert_non_null(strstr(rep(&T, 0)->error, "saga data"));
    assert_int_equal(dead_letters(&w), before + 1);
    assert_int_equal(w.handler_calls, 0);
  }

  /* The node keeps working. */
  send_msg(&T, "p0", &good);
  run_until(&T, 2);
  assert_int_equal(rep(&T, 1)->status, 0);
  assert_string_equal(rep(&T, 1)->msg_id, "f-good/r");
  assert_int_equal(w.handler_calls, 1);
  assert_int_equal(th_fx_count(&w, "saga-f", 0, "do"), 1);
  assert_int_equal(saga_node_outbox_depth(w.part), 0);
  saga__buf_free(&d);
  close_world(&w, &T);
}

/* ---- (g) resolve queries ------------------------------------------------------------------ */

static void test_resolve(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf d;
  data_buf(&d, NULL, NULL);
  /* Never applied: refused, and tombstoned so the action cannot apply afterwards. */
  send_cmd(&T, "g1-r", "saga-g1", 1, 1, SAGA_PHASE_RESOLVE, "saga.resolve", &d);
  run_until(&T, 1);
  assert_int_equal(rep(&T, 0)->status, SAGA_EREFUSED);
  assert_non_null(strstr(rep(&T, 0)->error, "not applied"));
  assert_int_equal(q_int(w.part, "SELECT state FROM saga_pstep WHERE saga_id = ?1", "saga-g1"), 3);
  send_cmd(&T, "g1-a", "saga-g1", 1, 1, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 2);
  assert_int_equal(rep(&T, 1)->status, SAGA_EREFUSED);
  assert_int_equal(w.handler_calls, 0);
  assert_int_equal(th_fx_count(&w, "saga-g1", -1, "do"), 0);
  /* Applied: the recorded reply data. */
  send_cmd(&T, "g2-a", "saga-g2", 1, 1, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 3);
  send_cmd(&T, "g2-r", "saga-g2", 1, 1, SAGA_PHASE_RESOLVE, "saga.resolve", &d);
  run_until(&T, 4);
  const saga_envelope *ra = rep(&T, 2), *rr = rep(&T, 3);
  assert_int_equal(ra->status, 0);
  assert_int_equal(rr->status, 0);
  assert_int_equal(rr->phase, SAGA_PHASE_RESOLVE);
  assert_int_equal(rr->payload_len, ra->payload_len);
  assert_memory_equal(rr->payload, ra->payload, ra->payload_len);
  assert_true(reply_data_is(rr, "s1", "done"));
  assert_int_equal(w.handler_calls, 1);
  assert_int_equal(th_fx_count(&w, "saga-g2", 1, "do"), 1);
  saga__buf_free(&d);
  close_world(&w, &T);
}

/* ---- (h) replies to the orchestrator that do not match never move a saga ------------------ */

typedef struct {
  th_world *w;
  int step;
} sent_ctx;

static int step_sent(void *arg) {
  sent_ctx *c = arg;
  return th_count_events(c->w, SAGA_EV_STEP_SENT, c->step) > 0;
}

typedef struct {
  tester *T;
  size_t confirmed, stale;
} stale_ctx;

static int stale_pred(void *arg) {
  stale_ctx *c = arg;
  return c->T->nconfirmed >= c->confirmed &&
         th_count_events(c->T->w, SAGA_EV_STALE_REPLY, -2) >= c->stale;
}

static void check_held(th_world *w, const char *id, const uint8_t *data0, size_t data0_len) {
  saga_info *info = NULL;
  assert_int_equal(saga_get(w->orch, id, &info), SAGA_OK);
  assert_int_equal(info->state, SAGA_RUNNING);
  assert_int_equal(info->step, 1);
  assert_int_equal(info->attempt, 1);
  assert_string_equal(info->error, "");
  assert_null(saga_data_get_str(info->data, "evil"));
  saga__buf now;
  saga__buf_init(&now, NULL);
  assert_int_equal(saga__data_encode(info->data, &now), SAGA_OK);
  assert_int_equal(now.len, data0_len);
  assert_memory_equal(now.data, data0, data0_len);
  saga__buf_free(&now);
  saga_info_free(info);
}

/* The id of the newest command the orchestrator queued for saga id (from its outbox). */
static void newest_command_id(saga_node *n, const char *id, char *out, size_t len) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(saga_node_db(n),
                                      "SELECT body FROM saga_outbox WHERE saga_id = ?1 "
                                      "ORDER BY id DESC LIMIT 1", -1, &st, NULL),
                   SQLITE_OK);
  sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  saga_envelope *e = NULL;
  assert_int_equal(saga_envelope_decode(sqlite3_column_blob(st, 0),
                                        (size_t)sqlite3_column_bytes(st, 0), NULL, NULL, &e,
                                        NULL, 0),
                   SAGA_OK);
  snprintf(out, len, "%s", e->msg_id);
  saga_envelope_free(e);
  sqlite3_finalize(st);
}

static void test_orchestrator_ignores_mismatched_replies(void **state) {
  th_world_opts o;
  th_world_defaults(&o);
  o.skip_mask = 2; /* nobody serves p1: the saga waits at step 1 */
  th_world w;
  tester T;
  open_world(&w, &T, &o);
  assert_int_equal(th_world_start(&w, 1, NULL), SAGA_OK);
  sent_ctx sc = {&w, 1};
  assert_int_equal(th_run_manual(&w.loop, w.clock, step_sent, &sc, 60000), 0);
  char id[40];
  snprintf(id, sizeof id, "%s", w.last_id);
  saga_info *info = NULL;
  assert_int_equal(saga_get(w.orch, id, &info), SAGA_OK);
  saga__buf data0;
  saga__buf_init(&data0, NULL);
  assert_int_equal(saga__data_encode(info->data, &data0), SAGA_OK);
  saga_info_free(info);
  check_held(&w, id, data0.data, data0.len);

  saga__buf evil;
  data_buf(&evil, "evil", "1");
  static const struct {
    uint32_t step, attempt;
    saga_phase phase;
    int32_t status;
    const char *why;
  } bad[] = {
      {1, 2, SAGA_PHASE_ACTION, 0, "future attempt"},
      {1, 0, SAGA_PHASE_ACTION, 0, "attempt 0"},
      {0, 1, SAGA_PHASE_ACTION, 0, "previous step (duplicate of an old reply)"},
      {2, 1, SAGA_PHASE_ACTION, 0, "next step"},
      {1, 1, SAGA_PHASE_COMPENSATION, 0, "compensation phase"},
      {1, 1, SAGA_PHASE_RESOLVE, 0, "resolve phase"},
      {1, 2, SAGA_PHASE_ACTION, SAGA_EREFUSED, "failure, future attempt"},
      {0, 1, SAGA_PHASE_ACTION, SAGA_EREFUSED, "failure, previous step"},
      {1, 1, SAGA_PHASE_COMPENSATION, SAGA_EREFUSED, "failure, compensation phase"},
      {7, 1, SAGA_PHASE_ACTION, 0, "step beyond the definition"},
  };
  size_t nbad = sizeof bad / sizeof bad[0];
  size_t stale0 = th_count_events(&w, SAGA_EV_STALE_REPLY, -2);
  size_t nev0 = w.nev;
  int fx_do0 = th_fx_count(&w, NULL, -1, "do"), fx_undo0 = th_fx_count(&w, NULL, -1, "undo");
  for (size_t k = 0; k < nbad; k++) {
    char mid[32];
    snprintf(mid, sizeof mid, "h-%zu/r", k);
    msg m = {.kind = SAGA_MSG_REPLY, .msg_id = mid, .saga_id = id, .name = "do",
             .step = bad[k].step, .attempt = bad[k].attempt, .phase = bad[k].phase,
             .status = bad[k].status, .error = bad[k].status ? "crafted failure" : "",
             .payload = bad[k].status ? NULL : evil.data,
             .payload_len = bad[k].status ? 0 : evil.len};
    /* msg.attempt 0 means "1" in encode(); encode attempt 0 by hand. */
    void *buf;
    size_t len;
    encode(&m, &buf, &len);
    if (bad[k].attempt == 0) {
      saga_envelope *e = NULL;
      assert_int_equal(saga_envelope_decode(buf, len, NULL, NULL, &e, NULL, 0), SAGA_OK);
      e->attempt = 0;
      saga_free(NULL, buf);
      assert_int_equal(saga_envelope_encode(e, NULL, &buf, &len), SAGA_OK);
      saga_envelope_free(e);
    }
    send_raw(&T, "orch", buf, len);
    saga_free(NULL, buf);
    stale_ctx c = {&T, (size_t)T.next_token, stale0 + k + 1};
    int rc = th_run_manual(&w.loop, w.clock, stale_pred, &c, 60000);
    if (rc != 0) printf("reply '%s' was not reported stale\n", bad[k].why);
    assert_int_equal(rc, 0);
    check_held(&w, id, data0.data, data0.len);
  }
  /* Only STALE_REPLY events (and no new step event of any kind) were emitted. */
  for (size_t i = nev0; i < w.nev; i++) {
    if (w.ev_type[i] != SAGA_EV_STALE_REPLY)
      printf("unexpected event %s at step %d\n", saga_event_name(w.ev_type[i]), w.ev_step[i]);
    assert_int_equal(w.ev_type[i], SAGA_EV_STALE_REPLY);
  }
  assert_int_equal(th_count_events(&w, SAGA_EV_STALE_REPLY, -2), stale0 + nbad);
  assert_int_equal(th_fx_count(&w, NULL, -1, "do"), fx_do0);
  assert_int_equal(th_fx_count(&w, NULL, -1, "undo"), fx_undo0);
  assert_int_equal(
      q_int(w.orch, "SELECT count(*) FROM saga_history WHERE saga_id = ?1 AND event = 15", id),
      (int64_t)nbad);

  /* A reply for a saga the orchestrator does not know is acknowledged and ignored. */
  {
    msg m = {.kind = SAGA_MSG_REPLY, .msg_id = "h-unknown/r", .saga_id = "no-such-saga",
             .name = "do", .step = 1, .attempt = 1};
    send_msg(&T, "orch", &m);
    run_until(&T, 0);
    check_held(&w, id, data0.data, data0.len);
  }

  /* The awaited step, phase and attempt, but an id that does not answer the command sent
   * (its tag made up, or missing): a forgery by someone who never saw the command. Ignored,
   * counted, nothing recorded. */
  char cmd_id[160], real[170], forged_id[170];
  newest_command_id(w.orch, id, cmd_id, sizeof cmd_id);
  snprintf(real, sizeof real, "%s/r", cmd_id);
  const char *tag = strrchr(cmd_id, '/');
  assert_non_null(tag);
  assert_int_equal(strlen(tag), 17); /* "/" and 16 hex digits */
  saga_node_stats fs0, fs1;
  saga_node_stats_get(w.orch, &fs0, sizeof fs0);
  const char *forgeries[2] = {forged_id, "h-match/r"};
  snprintf(forged_id, sizeof forged_id, "%.*s/0123456789abcdef/r", (int)(tag - cmd_id), cmd_id);
  for (int k = 0; k < 2; k++) {
    msg f = {.kind = SAGA_MSG_REPLY, .msg_id = forgeries[k], .saga_id = id, .name = "do",
             .step = 1, .attempt = 1, .phase = SAGA_PHASE_ACTION, .status = 0,
             .payload = evil.data, .payload_len = evil.len};
    send_msg(&T, "orch", &f);
    run_until(&T, 0);
    check_held(&w, id, data0.data, data0.len);
  }
  saga_node_stats_get(w.orch, &fs1, sizeof fs1);
  assert_int_equal(fs1.forged_replies, fs0.forged_replies + 2);
  assert_int_equal(w.nev, nev0 + nbad);

  /* Control: the matching reply (a refusal) does move the saga: step 0 is compensated. */
  msg ok = {.kind = SAGA_MSG_REPLY, .msg_id = real, .saga_id = id, .name = "do",
            .step = 1, .attempt = 1, .phase = SAGA_PHASE_ACTION, .status = SAGA_EREFUSED,
            .error = "crafted refusal"};
  send_msg(&T, "orch", &ok);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPENSATED);
  assert_int_equal(th_count_events(&w, SAGA_EV_STEP_FAILED, 1), 1);
  assert_int_equal(th_fx_count(&w, id, 0, "undo"), 1);
  assert_int_equal(th_check_invariants(&w, 1), 0);
  /* The same reply again is stale now and changes nothing; the finished saga records
   * nothing of it either (duplicates must not grow its history), it is only counted. */
  size_t stale1 = th_count_events(&w, SAGA_EV_STALE_REPLY, -2);
  int64_t hist1 = q_int(w.orch, "SELECT count(*) FROM saga_history WHERE saga_id = ?1", id);
  saga_node_stats st0, st1;
  saga_node_stats_get(w.orch, &st0, sizeof st0);
  for (int k = 0; k < 5; k++) send_msg(&T, "orch", &ok);
  run_until(&T, 0);
  saga_node_stats_get(w.orch, &st1, sizeof st1);
  assert_int_equal(st1.stale_replies, st0.stale_replies + 5);
  assert_int_equal(th_count_events(&w, SAGA_EV_STALE_REPLY, -2), stale1);
  assert_int_equal(q_int(w.orch, "SELECT count(*) FROM saga_history WHERE saga_id = ?1", id),
                   hist1);
  assert_int_equal(th_saga_state(&w, id), SAGA_COMPENSATED);
  assert_int_equal(th_count_events(&w, SAGA_EV_STEP_FAILED, 1), 1);
  assert_int_equal(w.terminal, 1);
  saga__buf_free(&evil);
  saga__buf_free(&data0);
  close_world(&w, &T);
}

/* ---- dead letters keep the message; long ids ---------------------------------------------- */

/* A well-formed command that cannot be handled (here: an unknown command) is dead-lettered
 * with its bytes, so an operator can inspect or replay it. */
static void test_dead_letter_keeps_command(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf d;
  data_buf(&d, "order", "42");
  send_cmd(&T, "kb-1", "saga-kb", 0, 1, SAGA_PHASE_ACTION, "nope", &d);
  run_until(&T, 1);
  assert_int_equal(rep(&T, 0)->status, SAGA_ENOHANDLER);
  int64_t body = q_int(w.part, "SELECT length(body) FROM saga_dead_letter WHERE msg_id = ?1",
                       "kb-1");
  printf("  dead letter of unknown command 'nope': body of %lld bytes\n", (long long)body);
  assert_true(body > 0);
  saga__buf_free(&d);
  close_world(&w, &T);
}

/* The reply id is the command id plus "/r", never truncated; ids over 512 bytes are refused
 * into the dead-letter table. */
static void test_long_msg_id(void **state) {
  th_world w;
  tester T;
  open_world(&w, &T, NULL);
  saga__buf d;
  data_buf(&d, NULL, NULL);
  char id[301];
  memset(id, 'm', 300);
  id[300] = '\0';
  send_cmd(&T, id, "saga-kb2", 0, 1, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 1);
  printf("  reply msg_id of a 300-byte command id: %zu bytes\n", strlen(rep(&T, 0)->msg_id));
  assert_int_equal(strlen(rep(&T, 0)->msg_id), 302);
  char big[601];
  memset(big, 'b', 600);
  big[600] = '\0';
  send_cmd(&T, big, "saga-kb3", 0, 1, SAGA_PHASE_ACTION, "do", &d);
  send_cmd(&T, "kb-after", "saga-kb4", 0, 1, SAGA_PHASE_ACTION, "do", &d);
  run_until(&T, 2);
  assert_string_equal(rep(&T, 1)->msg_id, "kb-after/r");
  assert_int_equal(q_int(w.part, "SELECT count(*) FROM saga_dead_letter WHERE reason LIKE ?1",
                         "%longer than 512%"), 1);
  saga__buf_free(&d);
  close_world(&w, &T);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_duplicate_command),
      cmocka_unit_test(test_later_attempt_gets_recorded_reply),
      cmocka_unit_test(test_compensation_before_action),
      cmocka_unit_test(test_stale_attempt),
      cmocka_unit_test(test_refusal_rolls_back_only_its_writes),
      cmocka_unit_test(test_unknown_command),
      cmocka_unit_test(test_malformed_input),
      cmocka_unit_test(test_dead_letters_capped_at_insert),
      cmocka_unit_test(test_resolve),
      cmocka_unit_test(test_orchestrator_ignores_mismatched_replies),
      cmocka_unit_test(test_dead_letter_keeps_command),
      cmocka_unit_test(test_long_msg_id),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
