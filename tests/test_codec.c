/* The envelope codec: round trips, the exact wire layout, and every refusal. */
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "internal.h"

enum {
  F_VERSION, F_KIND, F_MSG_ID, F_SAGA_ID, F_STEP, F_ATTEMPT, F_PHASE,
  F_NAME, F_REPLY_TO, F_STATUS, F_ERROR, F_HEADERS, F_PAYLOAD, NFIELDS
};

static const char *const field_names[NFIELDS] = {
    "version", "kind", "msg_id", "saga_id", "step",    "attempt", "phase",
    "name",    "reply_to", "status", "error", "headers", "payload"};

static const saga_header sample_headers[] = {
    {"traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    {"tenant", "acme"},
    {"empty", ""},
};
static const uint8_t sample_payload[] = {0x81, 0xa1, 'k', 0xc4, 0x02, 0x00, 0x00, 0x00};

static saga_envelope sample(void) {
  saga_envelope e;
  memset(&e, 0, sizeof e);
  e.version = SAGA_ENVELOPE_VERSION;
  e.kind = SAGA_MSG_COMMAND;
  e.msg_id = "msg-0001";
  e.saga_id = "saga-42";
  e.step = 3;
  e.attempt = 2;
  e.phase = SAGA_PHASE_COMPENSATION;
  e.name = "RESERVE_STOCK";
  e.reply_to = "orchestrator.replies";
  e.status = SAGA_EREFUSED;
  e.error = "out of stock";
  e.headers = sample_headers;
  e.nheaders = sizeof sample_headers / sizeof sample_headers[0];
  e.payload = sample_payload;
  e.payload_len = sizeof sample_payload;
  return e;
}

static const char *nz(const char *s) { return s != NULL ? s : ""; }

static void expect_same(const saga_envelope *a, const saga_envelope *b) {
  assert_int_equal(b->version, SAGA_ENVELOPE_VERSION);
  assert_int_equal(a->kind, b->kind);
  assert_string_equal(nz(a->msg_id), b->msg_id);
  assert_string_equal(nz(a->saga_id), b->saga_id);
  assert_int_equal(a->step, b->step);
  assert_int_equal(a->attempt, b->attempt);
  assert_int_equal(a->phase, b->phase);
  assert_string_equal(nz(a->name), b->name);
  assert_string_equal(nz(a->reply_to), b->reply_to);
  assert_int_equal(a->status, b->status);
  assert_string_equal(nz(a->error), b->error);
  assert_int_equal(a->nheaders, b->nheaders);
  for (size_t i = 0; i < a->nheaders; i++) {
    assert_string_equal(nz(a->headers[i].name), b->headers[i].name);
    assert_string_equal(nz(a->headers[i].value), b->headers[i].value);
  }
  assert_int_equal(a->payload_len, b->payload_len);
  assert_non_null(b->payload);
  if (a->payload_len > 0) assert_memory_equal(a->payload, b->payload, a->payload_len);
}

static saga_envelope *round_trip(const saga_envelope *in, const saga_limits *lim) {
  void *buf = NULL;
  size_t len = 0;
  assert_int_equal(saga_envelope_encode(in, NULL, &buf, &len), SAGA_OK);
  saga_envelope *out = NULL;
  char err[256] = "";
  int rc = saga_envelope_decode(buf, len, lim, NULL, &out, err, sizeof err);
  if (rc != SAGA_OK) fail_msg("decode: %s (%s)", saga_err_name(rc), err);
  saga_free(NULL, buf);
  expect_same(in, out);
  return out;
}

static void test_round_trip(void **state) {
  (void)state;
  saga_envelope in = sample();
  saga_envelope *out = round_trip(&in, NULL);
  assert_string_equal(saga_envelope_header(out, "tenant"), "acme");
  assert_string_equal(saga_envelope_header(out, "empty"), "");
  assert_null(saga_envelope_header(out, "Tenant"));
  assert_null(saga_envelope_header(out, NULL));
  assert_null(saga_envelope_header(NULL, "tenant"));
  saga_envelope_free(out);
  saga_envelope_free(NULL);
}

static void test_round_trip_extremes(void **state) {
  (void)state;
  saga_envelope in;
  memset(&in, 0, sizeof in); /* NULL strings, no headers, no payload */
  in.kind = SAGA_MSG_EVENT;
  in.phase = SAGA_PHASE_ACTION;
  saga_envelope *out = round_trip(&in, NULL);
  assert_string_equal(out->msg_id, "");
  assert_int_equal(out->nheaders, 0);
  saga_envelope_free(out);

  in = sample();
  in.kind = SAGA_MSG_REPLY;
  in.phase = SAGA_PHASE_RESOLVE;
  in.step = UINT32_MAX;
  in.attempt = UINT32_MAX;
  in.status = INT32_MIN;
  saga_envelope_free(round_trip(&in, NULL));
  in.status = INT32_MAX;
  in.step = in.attempt = 0;
  saga_envelope_free(round_trip(&in, NULL));

  /* Strings and headers exactly at the limits. */
  saga_limits lim;
  saga_limits_init(&lim);
  lim.max_string_bytes = 5;
  lim.max_headers = 2;
  saga_header h[2] = {{"abcde", "12345"}, {"x", NULL}};
  in.msg_id = in.saga_id = in.name = in.reply_to = in.error = "abcde";
  in.headers = h;
  in.nheaders = 2;
  saga_envelope_free(round_trip(&in, &lim));

  /* A binary payload with NUL bytes and a large one. */
  uint8_t *big = malloc(100000);
  for (size_t i = 0; i < 100000; i++) big[i] = (uint8_t)(i * 7);
  in = sample();
  in.payload = big;
  in.payload_len = 100000;
  saga_envelope_free(round_trip(&in, NULL));
  free(big);
}

/* Pins the layout: a 13-element array, NULL strings as "", an empty bin payload. */
static void test_wire_layout(void **state) {
  (void)state;
  saga_envelope in;
  memset(&in, 0, sizeof in);
  in.version = 77; /* ignored: the library writes the version it speaks */
  in.kind = SAGA_MSG_REPLY;
  in.step = 5;
  in.attempt = 1;
  in.phase = SAGA_PHASE_COMPENSATION;
  in.status = -3;
  in.msg_id = "id";
  saga_header h = {"a", "b"};
  in.headers = &h;
  in.nheaders = 1;
  in.payload = "\x80";
  in.payload_len = 1;
  static const uint8_t want[] = {0x9d, 0x01, 0x02, 0xa2, 'i',  'd',  0xa0, 0x05, 0x01, 0x01,
                                 0xa0, 0xa0, 0xfd, 0xa0, 0x81, 0xa1, 'a',  0xa1, 'b',  0xc4,
                                 0x01, 0x80};
  void *buf;
  size_t len;
  assert_int_equal(saga_envelope_encode(&in, NULL, &buf, &len), SAGA_OK);
  assert_int_equal(len, sizeof want);
  assert_memory_equal(buf, want, sizeof want);
  saga_free(NULL, buf);

  /* encode_buf appends after what the buffer holds. */
  saga__buf b;
  saga__buf_init(&b, NULL);
  assert_int_equal(saga__buf_append(&b, "xyz", 3), SAGA_OK);
  assert_int_equal(saga__envelope_encode_buf(&in, &b), SAGA_OK);
  assert_int_equal(b.len, 3 + sizeof want);
  assert_memory_equal(b.data + 3, want, sizeof want);
  saga__buf_free(&b);
}

static void test_encode_refusals(void **state) {
  (void)state;
  saga_envelope in = sample();
  void *buf = (void *)&buf;
  size_t len = 99;
  assert_int_equal(saga_envelope_encode(NULL, NULL, &buf, &len), SAGA_EINVAL);
  assert_int_equal(saga_envelope_encode(&in, NULL, NULL, &len), SAGA_EINVAL);
  assert_int_equal(saga_envelope_encode(&in, NULL, &buf, NULL), SAGA_EINVAL);
  in.kind = (saga_msg_kind)0;
  assert_int_equal(saga_envelope_encode(&in, NULL, &buf, &len), SAGA_EINVAL);
  in.kind = (saga_msg_kind)4;
  assert_int_equal(saga_envelope_encode(&in, NULL, &buf, &len), SAGA_EINVAL);
  in = sample();
  in.phase = (saga_phase)3;
  assert_int_equal(saga_envelope_encode(&in, NULL, &buf, &len), SAGA_EINVAL);
  in.phase = (saga_phase)-1;
  assert_int_equal(saga_envelope_encode(&in, NULL, &buf, &len), SAGA_EINVAL);
  in = sample();
  in.headers = NULL;
  assert_int_equal(saga_envelope_encode(&in, NULL, &buf, &len), SAGA_EINVAL);
  in = sample();
  in.payload = NULL;
  assert_int_equal(saga_envelope_encode(&in, NULL, &buf, &len), SAGA_EINVAL);
  assert_ptr_equal(buf, (void *)&buf);
  assert_int_equal(len, 99);
  assert_int_equal(saga__envelope_encode_buf(&in, NULL), SAGA_EINVAL);
}

/* ---- building bad envelopes ------------------------------------------------------------ */

typedef struct mp {
  msgpack_sbuffer sb;
  msgpack_packer pk;
} mp;

static void mp_init(mp *m) {
  msgpack_sbuffer_init(&m->sb);
  msgpack_packer_init(&m->pk, &m->sb, msgpack_sbuffer_write);
}

static void mp_str(msgpack_packer *pk, const char *s, size_t n) {
  msgpack_pack_str(pk, n);
  msgpack_pack_str_body(pk, s, n);
}

/* Writes one field's replacement value. */
typedef void (*packfn)(msgpack_packer *pk, const void *arg);

/* Packs the valid field i of a sample envelope. */
static void pack_default(msgpack_packer *pk, int i) {
  switch (i) {
  case F_VERSION:
    msgpack_pack_uint8(pk, SAGA_ENVELOPE_VERSION);
    break;
  case F_KIND:
    msgpack_pack_uint8(pk, SAGA_MSG_COMMAND);
    break;
  case F_STEP:
  case F_ATTEMPT:
  case F_PHASE:
  case F_STATUS:
    msgpack_pack_uint8(pk, 1);
    break;
  case F_HEADERS:
    msgpack_pack_map(pk, 1);
    mp_str(pk, "traceparent", 11);
    mp_str(pk, "00-01-02-01", 11);
    break;
  case F_PAYLOAD:
    msgpack_pack_bin(pk, 1);
    msgpack_pack_bin_body(pk, "\x80", 1);
    break;
  default:
    mp_str(pk, "s", 1);
  }
}

/* An envelope of `arity` elements (extra ones nil) whose field `bad` is written by fn. */
static void build(mp *m, int arity, int bad, packfn fn, const void *arg) {
  mp_init(m);
  msgpack_pack_array(&m->pk, (size_t)arity);
  for (int i = 0; i < arity; i++) {
    if (i == bad)
      fn(&m->pk, arg);
    else if (i < NFIELDS)
      pack_default(&m->pk, i);
    else
      msgpack_pack_nil(&m->pk);
  }
}

/* Decodes and checks the code, that err mentions needle, and that *out stayed untouched. */
static void expect_refused(const void *buf, size_t len, const saga_limits *lim, int code,
                           const char *needle) {
  saga_envelope *out = (saga_envelope *)&out;
  char err[256] = "";
  int rc = saga_envelope_decode(buf, len, lim, NULL, &out, err, sizeof err);
  if (rc != code)
    fail_msg("rc %s, want %s (err: %s)", saga_err_name(rc), saga_err_name(code), err);
  if (strstr(err, needle) == NULL) fail_msg("err '%s' does not mention '%s'", err, needle);
  assert_ptr_equal(out, (saga_envelope *)&out);
}

static void expect_field_refused(mp *m, const saga_limits *lim, int code, int field) {
  char needle[32];
  snprintf(needle, sizeof needle, "field '%s'", field_names[field]);
  expect_refused(m->sb.data, m->sb.size, lim, code, needle);
  msgpack_sbuffer_destroy(&m->sb);
}

/* One value of each msgpack type. */
enum { T_NIL, T_BOOL, T_POS, T_NEG, T_FLOAT, T_STR, T_BIN, T_ARRAY, T_MAP, T_EXT, T_COUNT };

static void pack_type(msgpack_packer *pk, const void *arg) {
  switch (*(const int *)arg) {
  case T_NIL:
    msgpack_pack_nil(pk);
    break;
  case T_BOOL:
    msgpack_pack_true(pk);
    break;
  case T_POS:
    msgpack_pack_uint8(pk, 1);
    break;
  case T_NEG:
    msgpack_pack_int8(pk, -1);
    break;
  case T_FLOAT:
    msgpack_pack_double(pk, 1.5);
    break;
  case T_STR:
    mp_str(pk, "x", 1);
    break;
  case T_BIN:
    msgpack_pack_bin(pk, 1);
    msgpack_pack_bin_body(pk, "x", 1);
    break;
  case T_ARRAY:
    msgpack_pack_array(pk, 1);
    mp_str(pk, "x", 1);
    break;
  case T_MAP:
    msgpack_pack_map(pk, 0);
    break;
  case T_EXT:
    msgpack_pack_ext(pk, 1, 5);
    msgpack_pack_ext_body(pk, "x", 1);
    break;
  }
}

/* The types each field accepts (T_POS also stands for the integer fields' range checks). */
static int accepts(int field, int t) {
  switch (field) {
  case F_VERSION: /* any integer is read as a version number */
    return t == T_POS || t == T_NEG;
  case F_STATUS:
    return t == T_POS || t == T_NEG;
  case F_KIND:
  case F_STEP:
  case F_ATTEMPT:
  case F_PHASE:
    return t == T_POS;
  case F_HEADERS:
    return t == T_MAP;
  case F_PAYLOAD:
    return t == T_BIN;
  default:
    return t == T_STR;
  }
}

static void test_wrong_types(void **state) {
  (void)state;
  int checked = 0;
  for (int f = 0; f < NFIELDS; f++) {
    for (int t = 0; t < T_COUNT; t++) {
      if (accepts(f, t)) continue;
      mp m;
      build(&m, NFIELDS, f, pack_type, &t);
      expect_field_refused(&m, NULL, SAGA_EMALFORMED, f);
      checked++;
    }
  }
  assert_true(checked > 100);
  /* The message names both types. */
  int t = T_MAP;
  mp m;
  build(&m, NFIELDS, F_SAGA_ID, pack_type, &t);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED,
                 "field 'saga_id': expected string, got map");
  msgpack_sbuffer_destroy(&m.sb);
  t = T_STR;
  build(&m, NFIELDS, F_PAYLOAD, pack_type, &t);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED,
                 "field 'payload': expected binary, got string");
  msgpack_sbuffer_destroy(&m.sb);
}

static void pack_u64(msgpack_packer *pk, const void *arg) {
  msgpack_pack_uint64(pk, *(const uint64_t *)arg);
}
static void pack_i64(msgpack_packer *pk, const void *arg) {
  msgpack_pack_int64(pk, *(const int64_t *)arg);
}

static void test_integer_ranges(void **state) {
  (void)state;
  mp m;
  uint64_t u = (uint64_t)UINT32_MAX + 1;
  const int uints[] = {F_STEP, F_ATTEMPT, F_KIND, F_PHASE};
  for (size_t i = 0; i < 4; i++) {
    build(&m, NFIELDS, uints[i], pack_u64, &u);
    expect_field_refused(&m, NULL, SAGA_EMALFORMED, uints[i]);
  }
  u = UINT32_MAX;
  build(&m, NFIELDS, F_STEP, pack_u64, &u);
  saga_envelope *out = NULL;
  assert_int_equal(saga_envelope_decode(m.sb.data, m.sb.size, NULL, NULL, &out, NULL, 0),
                   SAGA_OK);
  assert_int_equal(out->step, UINT32_MAX);
  saga_envelope_free(out);
  msgpack_sbuffer_destroy(&m.sb);

  int64_t s = (int64_t)INT32_MAX + 1;
  build(&m, NFIELDS, F_STATUS, pack_i64, &s);
  expect_field_refused(&m, NULL, SAGA_EMALFORMED, F_STATUS);
  s = (int64_t)INT32_MIN - 1;
  build(&m, NFIELDS, F_STATUS, pack_i64, &s);
  expect_field_refused(&m, NULL, SAGA_EMALFORMED, F_STATUS);
  u = UINT64_MAX;
  build(&m, NFIELDS, F_STATUS, pack_u64, &u);
  expect_field_refused(&m, NULL, SAGA_EMALFORMED, F_STATUS);

  /* Unknown kinds and phases. */
  const struct {
    int field;
    uint64_t v;
  } unknown[] = {{F_KIND, 0}, {F_KIND, 4}, {F_PHASE, 3}, {F_PHASE, 255}};
  for (size_t i = 0; i < 4; i++) {
    build(&m, NFIELDS, unknown[i].field, pack_u64, &unknown[i].v);
    expect_field_refused(&m, NULL, SAGA_EMALFORMED, unknown[i].field);
  }
  u = 9;
  build(&m, NFIELDS, F_KIND, pack_u64, &u);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "unknown message kind 9");
  msgpack_sbuffer_destroy(&m.sb);
}

static void test_version_and_arity(void **state) {
  (void)state;
  mp m;
  const uint64_t versions[] = {0, 2, 255, UINT64_MAX};
  for (size_t i = 0; i < 4; i++) {
    build(&m, NFIELDS, F_VERSION, pack_u64, &versions[i]);
    expect_field_refused(&m, NULL, SAGA_EVERSION, F_VERSION);
  }
  int64_t neg = -1;
  build(&m, NFIELDS, F_VERSION, pack_i64, &neg);
  expect_field_refused(&m, NULL, SAGA_EVERSION, F_VERSION);
  /* The version is read before the arity: a future layout may differ. */
  uint64_t v2 = 2;
  build(&m, 3, F_VERSION, pack_u64, &v2);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EVERSION, "unsupported envelope version 2");
  msgpack_sbuffer_destroy(&m.sb);
  build(&m, 30, F_VERSION, pack_u64, &v2);
  expect_field_refused(&m, NULL, SAGA_EVERSION, F_VERSION);

  const int arities[] = {0, 1, 12, 14, 100};
  for (size_t i = 0; i < 5; i++) {
    build(&m, arities[i], -1, NULL, NULL);
    char needle[48];
    snprintf(needle, sizeof needle, "13 fields, got %d", arities[i]);
    expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, needle);
    msgpack_sbuffer_destroy(&m.sb);
  }

  mp_init(&m);
  msgpack_pack_map(&m.pk, 0);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "expected array, got map");
  msgpack_sbuffer_destroy(&m.sb);
  mp_init(&m);
  msgpack_pack_uint8(&m.pk, 1);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "expected array");
  msgpack_sbuffer_destroy(&m.sb);
}

typedef struct strarg {
  const char *p;
  size_t n;
} strarg;

static void pack_strarg(msgpack_packer *pk, const void *arg) {
  const strarg *s = arg;
  mp_str(pk, s->p, s->n);
}

static const int string_fields[] = {F_MSG_ID, F_SAGA_ID, F_NAME, F_REPLY_TO, F_ERROR};

static void test_strings(void **state) {
  (void)state;
  saga_limits lim;
  saga_limits_init(&lim);
  lim.max_string_bytes = 11; /* the default header name is 11 bytes */
  const strarg at = {"12345678901", 11}, over = {"123456789012", 12}, nul = {"a\0b", 3};
  for (size_t i = 0; i < 5; i++) {
    int f = string_fields[i];
    mp m;
    build(&m, NFIELDS, f, pack_strarg, &at);
    saga_envelope *out = NULL;
    assert_int_equal(saga_envelope_decode(m.sb.data, m.sb.size, &lim, NULL, &out, NULL, 0),
                     SAGA_OK);
    saga_envelope_free(out);
    msgpack_sbuffer_destroy(&m.sb);
    build(&m, NFIELDS, f, pack_strarg, &over);
    expect_field_refused(&m, &lim, SAGA_EMALFORMED, f);
    build(&m, NFIELDS, f, pack_strarg, &over);
    expect_refused(m.sb.data, m.sb.size, &lim, SAGA_EMALFORMED, "exceeds the limit of 11");
    msgpack_sbuffer_destroy(&m.sb);
    build(&m, NFIELDS, f, pack_strarg, &nul);
    expect_field_refused(&m, NULL, SAGA_EMALFORMED, f);
    build(&m, NFIELDS, f, pack_strarg, &nul);
    expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "NUL");
    msgpack_sbuffer_destroy(&m.sb);
  }
}

/* A header map of n entries "h<i>" -> val, except entry 0: its key is `key` (or a value of
 * key_type) and its value a value of val_type when that is not T_STR. */
typedef struct hdrs {
  size_t n;
  int key_type, val_type;
  strarg key, val;
} hdrs;

static void pack_hdrs(msgpack_packer *pk, const void *arg) {
  const hdrs *h = arg;
  msgpack_pack_map(pk, h->n);
  for (size_t i = 0; i < h->n; i++) {
    char k[16];
    int n = snprintf(k, sizeof k, "h%zu", i);
    if (i > 0)
      mp_str(pk, k, (size_t)n);
    else if (h->key_type == T_STR)
      pack_strarg(pk, &h->key);
    else
      pack_type(pk, &h->key_type);
    if (i == 0 && h->val_type != T_STR)
      pack_type(pk, &h->val_type);
    else
      pack_strarg(pk, &h->val);
  }
}

static void test_headers(void **state) {
  (void)state;
  saga_limits lim;
  saga_limits_init(&lim);
  lim.max_headers = 3;
  lim.max_string_bytes = 8;
  mp m;
  hdrs h = {3, T_STR, T_STR, {"name", 4}, {"value", 5}};
  build(&m, NFIELDS, F_HEADERS, pack_hdrs, &h);
  saga_envelope *out = NULL;
  assert_int_equal(saga_envelope_decode(m.sb.data, m.sb.size, &lim, NULL, &out, NULL, 0),
                   SAGA_OK);
  assert_int_equal(out->nheaders, 3);
  assert_string_equal(saga_envelope_header(out, "h2"), "value");
  saga_envelope_free(out);
  msgpack_sbuffer_destroy(&m.sb);

  h.n = 4; /* too many */
  build(&m, NFIELDS, F_HEADERS, pack_hdrs, &h);
  expect_refused(m.sb.data, m.sb.size, &lim, SAGA_EMALFORMED,
                 "field 'headers': 4 entries exceed the limit of 3");
  msgpack_sbuffer_destroy(&m.sb);
  h.n = 2;
  for (int t = 0; t < T_COUNT; t++) { /* a key or value of any other type, nesting too */
    if (t == T_STR) continue;
    h.key_type = t;
    build(&m, NFIELDS, F_HEADERS, pack_hdrs, &h);
    expect_field_refused(&m, &lim, SAGA_EMALFORMED, F_HEADERS);
    h.key_type = T_STR;
    h.val_type = t;
    build(&m, NFIELDS, F_HEADERS, pack_hdrs, &h);
    expect_field_refused(&m, &lim, SAGA_EMALFORMED, F_HEADERS);
    h.val_type = T_STR;
  }
  const strarg bad[] = {{"123456789", 9}, {"a\0b", 3}};
  for (size_t i = 0; i < 2; i++) {
    h.key = bad[i];
    build(&m, NFIELDS, F_HEADERS, pack_hdrs, &h);
    expect_field_refused(&m, &lim, SAGA_EMALFORMED, F_HEADERS);
    h.key = (strarg){"name", 4};
    h.val = bad[i];
    build(&m, NFIELDS, F_HEADERS, pack_hdrs, &h);
    expect_field_refused(&m, &lim, SAGA_EMALFORMED, F_HEADERS);
    h.val = (strarg){"value", 5};
  }
  h.key = (strarg){"h1", 2}; /* the same name as the second entry */
  build(&m, NFIELDS, F_HEADERS, pack_hdrs, &h);
  expect_refused(m.sb.data, m.sb.size, &lim, SAGA_EMALFORMED,
                 "field 'headers': duplicate name 'h1'");
  msgpack_sbuffer_destroy(&m.sb);
}

/* ---- framing: truncation, trailing bytes, size, nesting -------------------------------- */

static void *encode_sample(size_t *len) {
  saga_envelope in = sample();
  void *buf = NULL;
  assert_int_equal(saga_envelope_encode(&in, NULL, &buf, len), SAGA_OK);
  return buf;
}

static void test_truncated_everywhere(void **state) {
  (void)state;
  size_t len;
  uint8_t *buf = encode_sample(&len);
  for (size_t n = 0; n < len; n++) {
    /* A copy of exactly n bytes, so ASan sees any read past the end. */
    uint8_t *cut = malloc(n + 1);
    memcpy(cut, buf, n);
    expect_refused(cut, n, NULL, SAGA_EMALFORMED, "truncated");
    free(cut);
  }
  uint8_t *more = malloc(len + 1);
  memcpy(more, buf, len);
  more[len] = 0xc0;
  expect_refused(more, len + 1, NULL, SAGA_EMALFORMED, "trailing bytes after envelope");
  free(more);
  saga_free(NULL, buf);
}

static void test_oversized(void **state) {
  (void)state;
  size_t len;
  void *buf = encode_sample(&len);
  saga_limits lim;
  saga_limits_init(&lim);
  lim.max_message_bytes = len - 1;
  expect_refused(buf, len, &lim, SAGA_ETOOBIG, "exceeds the limit");
  lim.max_message_bytes = len;
  saga_envelope *out = NULL;
  assert_int_equal(saga_envelope_decode(buf, len, &lim, NULL, &out, NULL, 0), SAGA_OK);
  saga_envelope_free(out);
  saga_free(NULL, buf);
  /* The default limit is 1 MiB; the size is refused before any byte is looked at. */
  size_t big = (1u << 20) + 1;
  uint8_t *huge = calloc(big, 1);
  expect_refused(huge, big, NULL, SAGA_ETOOBIG, "exceeds the limit of 1048576");
  free(huge);
}

static void test_deep_nesting(void **state) {
  (void)state;
  enum { DEPTH = 10000 };
  uint8_t *buf = malloc(DEPTH * 3 + 1);
  memset(buf, 0x91, DEPTH); /* [[[[...nil]]]] , complete and well-formed */
  buf[DEPTH] = 0xc0;
  expect_refused(buf, DEPTH + 1, NULL, SAGA_EMALFORMED, "nesting");
  for (size_t i = 0; i < DEPTH; i++) { /* {"k": {"k": ...}} */
    buf[3 * i] = 0x81;
    buf[3 * i + 1] = 0xa1;
    buf[3 * i + 2] = 'k';
  }
  buf[3 * DEPTH] = 0xc0;
  expect_refused(buf, 3 * DEPTH + 1, NULL, SAGA_EMALFORMED, "nesting");
  /* Nesting inside a real envelope: a header value that is an array of arrays. */
  mp m;
  mp_init(&m);
  msgpack_pack_array(&m.pk, NFIELDS);
  for (int i = 0; i < NFIELDS; i++) {
    if (i != F_HEADERS) {
      pack_default(&m.pk, i);
      continue;
    }
    msgpack_pack_map(&m.pk, 1);
    mp_str(&m.pk, "k", 1);
    for (int d = 0; d < 100; d++) msgpack_pack_array(&m.pk, 1);
    msgpack_pack_nil(&m.pk);
  }
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "nesting");
  msgpack_sbuffer_destroy(&m.sb);
  free(buf);
}

/* Containers and strings whose declared size the input cannot hold: refused as truncated
 * without msgpack-c allocating for the declared count. */
static void test_lying_lengths(void **state) {
  (void)state;
  static const uint8_t arr32[] = {0xdd, 0xff, 0xff, 0xff, 0xff, 0x01, 0x01};
  static const uint8_t map32[] = {0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, 'k', 0xc0};
  static const uint8_t arr16[] = {0x93, 0x01, 0x01, 0xdc, 0xff, 0xff, 0xc0};
  static const uint8_t str32[] = {0x93, 0x01, 0x01, 0xdb, 0xff, 0xff, 0xff, 0xff, 'x'};
  static const uint8_t bin32[] = {0xc6, 0x7f, 0xff, 0xff, 0xff, 0x00};
  expect_refused(arr32, sizeof arr32, NULL, SAGA_EMALFORMED,
                 "array at offset 0 declares 4294967295 elements but only 2 bytes follow");
  expect_refused(map32, sizeof map32, NULL, SAGA_EMALFORMED,
                 "map at offset 0 declares 4294967295 entries but only 3 bytes follow");
  expect_refused(arr16, sizeof arr16, NULL, SAGA_EMALFORMED,
                 "array at offset 3 declares 65535 elements");
  expect_refused(str32, sizeof str32, NULL, SAGA_EMALFORMED, "truncated");
  expect_refused(bin32, sizeof bin32, NULL, SAGA_EMALFORMED, "truncated");
  static const uint8_t reserved[] = {0xc1};
  expect_refused(reserved, sizeof reserved, NULL, SAGA_EMALFORMED, "not valid msgpack");
}

static void test_decode_arguments(void **state) {
  (void)state;
  size_t len;
  void *buf = encode_sample(&len);
  saga_envelope *out = NULL;
  char err[64];
  assert_int_equal(saga_envelope_decode(NULL, 5, NULL, NULL, &out, err, sizeof err),
                   SAGA_EINVAL);
  assert_int_equal(saga_envelope_decode(buf, len, NULL, NULL, NULL, err, sizeof err),
                   SAGA_EINVAL);
  /* err may be NULL, and a short err is cut, still terminated. */
  assert_int_equal(saga_envelope_decode(buf, len - 1, NULL, NULL, &out, NULL, 0),
                   SAGA_EMALFORMED);
  memset(err, 'x', sizeof err);
  assert_int_equal(saga_envelope_decode(buf, len - 1, NULL, NULL, &out, err, 6),
                   SAGA_EMALFORMED);
  assert_int_equal(strlen(err), 5);
  assert_int_equal(err[6], 'x');
  assert_null(out);
  saga_free(NULL, buf);
}

/* The payload carries a saga data map; both layers decode back. */
static void test_payload_carries_data(void **state) {
  (void)state;
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, NULL), SAGA_OK);
  assert_int_equal(saga_data_set_str(d, "order", "o-1"), SAGA_OK);
  assert_int_equal(saga_data_set(d, "blob", "\0\1\0", 3), SAGA_OK);
  saga__buf pl;
  saga__buf_init(&pl, NULL);
  assert_int_equal(saga__data_encode(d, &pl), SAGA_OK);
  saga_envelope in = sample();
  in.payload = pl.data;
  in.payload_len = pl.len;
  saga_envelope *out = round_trip(&in, NULL);
  saga_data *back = NULL;
  assert_int_equal(
      saga__data_decode(out->payload, out->payload_len, NULL, NULL, &back, NULL, 0), SAGA_OK);
  assert_string_equal(saga_data_get_str(back, "order"), "o-1");
  size_t n;
  const void *v;
  assert_int_equal(saga_data_get(back, "blob", &v, &n), SAGA_OK);
  assert_int_equal(n, 3);
  assert_memory_equal(v, "\0\1\0", 3);
  saga_data_free(back);
  saga_envelope_free(out);
  saga__buf_free(&pl);
  saga_data_free(d);
}

/* Fails the N-th allocation for N = 1, 2, ... until the call succeeds. */
static void test_alloc_failures(void **state) {
  (void)state;
  uint8_t *payload = malloc(5000); /* the buffer grows once */
  memset(payload, 0xab, 5000);
  saga_envelope in = sample();
  in.payload = payload;
  in.payload_len = 5000;
  th_alloc ta;
  th_alloc_init(&ta);
  void *buf = NULL;
  size_t len = 0;
  uint64_t failures = 0;
  for (uint64_t n = 1;; n++) {
    int64_t start = ta.live;
    void *out = (void *)&out;
    size_t outlen = 7;
    ta.count = 0;
    ta.fail_at = n;
    int rc = saga_envelope_encode(&in, &ta.a, &out, &outlen);
    ta.fail_at = 0;
    if (rc == SAGA_OK) {
      buf = out;
      len = outlen;
      break;
    }
    failures++;
    assert_int_equal(rc, SAGA_ENOMEM);
    assert_ptr_equal(out, (void *)&out);
    assert_int_equal(outlen, 7);
    assert_true(ta.live == start);
  }
  assert_true(failures == 2);

  /* encode_buf leaves a buffer's earlier content alone when it fails. */
  saga__buf b;
  saga__buf_init(&b, &ta.a);
  assert_int_equal(saga__buf_append(&b, "keep", 4), SAGA_OK);
  ta.count = 0;
  ta.fail_at = 1;
  assert_int_equal(saga__envelope_encode_buf(&in, &b), SAGA_ENOMEM);
  ta.fail_at = 0;
  assert_int_equal(b.len, 4);
  assert_memory_equal(b.data, "keep", 4);
  saga__buf_free(&b);

  failures = 0;
  for (uint64_t n = 1;; n++) {
    int64_t start = ta.live;
    saga_envelope *out = NULL;
    char err[128] = "";
    ta.count = 0;
    ta.fail_at = n;
    int rc = saga_envelope_decode(buf, len, NULL, &ta.a, &out, err, sizeof err);
    ta.fail_at = 0;
    if (rc == SAGA_OK) {
      expect_same(&in, out);
      assert_true(ta.live == start + 1); /* the envelope is one block */
      saga_envelope_free(out);
      assert_true(ta.live == start);
      break;
    }
    failures++;
    assert_int_equal(rc, SAGA_ENOMEM);
    assert_non_null(strstr(err, "memory"));
    assert_null(out);
    assert_true(ta.live == start);
  }
  assert_true(failures >= 1);
  saga_free(&ta.a, buf);
  assert_true(ta.live == 0);
  free(payload);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_round_trip),
      cmocka_unit_test(test_round_trip_extremes),
      cmocka_unit_test(test_wire_layout),
      cmocka_unit_test(test_encode_refusals),
      cmocka_unit_test(test_wrong_types),
      cmocka_unit_test(test_integer_ranges),
      cmocka_unit_test(test_version_and_arity),
      cmocka_unit_test(test_strings),
      cmocka_unit_test(test_headers),
      cmocka_unit_test(test_truncated_everywhere),
      cmocka_unit_test(test_oversized),
      cmocka_unit_test(test_deep_nesting),
      cmocka_unit_test(test_lying_lengths),
      cmocka_unit_test(test_decode_arguments),
      cmocka_unit_test(test_payload_carries_data),
      cmocka_unit_test(test_alloc_failures),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
