/*
 * Writes the seed corpora of the fuzz targets (fuzz_seeds OUTDIR): valid inputs made by the
 * library's own encoders, and the hostile edge cases each decoder must refuse cheaply. The
 * files under tests/fuzz/<target>/ were made by this program (seed-*) or found by libFuzzer
 * and merged by scripts/fuzz.sh; run it again after a wire format changes.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"
#include "internal.h"
#ifdef FUZZ_SEEDS_TCP
#include "transport/tcp_frame.h"
#endif

static const char *outdir;

static void put(const char *target, const char *name, const void *p, size_t n) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", outdir, target);
  if (mkdir(path, 0777) != 0 && errno != EEXIST) {
    perror(path);
    exit(1);
  }
  snprintf(path, sizeof path, "%s/%s/seed-%s", outdir, target, name);
  FILE *f = fopen(path, "wb");
  FUZZ_CHECK(f != NULL && fwrite(p, 1, n, f) == n && fclose(f) == 0);
}

static void put_buf(const char *target, const char *name, const saga__buf *b) {
  put(target, name, b->data, b->len);
}

/* ---- saga data ---------------------------------------------------------------------------- */

static saga__buf data_bytes(const saga_data *d) {
  saga__buf b;
  saga__buf_init(&b, NULL);
  FUZZ_CHECK(saga__data_encode(d, &b) == SAGA_OK);
  return b;
}

static void append(saga__buf *b, const void *p, size_t n) {
  FUZZ_CHECK(saga__buf_append(b, p, n) == SAGA_OK);
}

static void data_seeds(void) {
  saga_data *d;
  FUZZ_CHECK(saga_data_new(&d, NULL) == SAGA_OK);
  saga__buf b = data_bytes(d);
  put_buf("data", "empty-map", &b);
  saga__buf_free(&b);
  put("data", "nothing", "", 0);
  /* The shop's purchase data. */
  saga_data_set_str(d, "purchase_id", "p-000123");
  saga_data_set_i64(d, "customer_id", 42);
  saga_data_set_str(d, "items", "[{\"product_id\":1,\"amount\":2}]");
  saga_data_set_str(d, "currency", "TWD");
  saga_data_set(d, "blob", "\0\1\2\3", 4);
  saga_data_set(d, "empty", NULL, 0);
  b = data_bytes(d);
  put_buf("data", "purchase", &b);
  /* Cut inside the last value, and with a byte too many. */
  put("data", "truncated", b.data, b.len - 2);
  append(&b, "\xc0", 1);
  put("data", "trailing-byte", b.data, b.len);
  saga__buf_free(&b);
  saga_data_free(d);

  /* The limits: 256 entries (accepted), 257 (refused); keys of 1024 and 1025 bytes. */
  for (int n = 256; n <= 257; n++) {
    FUZZ_CHECK(saga_data_new(&d, NULL) == SAGA_OK);
    char k[16];
    for (int i = 0; i < n - (n == 257); i++) {
      snprintf(k, sizeof k, "k%d", i);
      saga_data_set_i64(d, k, i);
    }
    b = data_bytes(d);
    if (n == 257) { /* the encoder refuses nothing here, so the extra entry is added by hand */
      b.data[1] = 0x01, b.data[2] = 0x01;               /* map 16: 257 entries */
      append(&b, "\xa4k256\xc4\x01" "0", 8);
    }
    put_buf("data", n == 256 ? "256-entries" : "257-entries", &b);
    saga__buf_free(&b);
    saga_data_free(d);
  }
  static char key[1026];
  memset(key, 'k', 1025);
  for (size_t klen = 1024; klen <= 1025; klen++) {
    saga__buf_init(&b, NULL);
    uint8_t head[] = {0x81, 0xda, (uint8_t)(klen >> 8), (uint8_t)klen};
    append(&b, head, sizeof head);
    append(&b, key, klen);
    append(&b, "\xc4\x01v", 3);
    put_buf("data", klen == 1024 ? "key-1024" : "key-1025", &b);
    saga__buf_free(&b);
  }
  /* Hand-made refusals. */
  static const struct {
    const char *name;
    const char *bytes;
    size_t len;
  } bad[] = {
      {"array32-2p28", "\xdd\x10\x00\x00\x00", 5},       /* declares 2^28 elements */
      {"map32-2p31", "\xdf\x80\x00\x00\x00", 5},         /* declares 2^31 entries */
      {"map32-2p31-some", "\xdf\x80\x00\x00\x00\xa1k\xc4\x00", 9},
      {"str32-4g", "\x81\xdb\xff\xff\xff\xff", 6},       /* a key declaring 4 GiB */
      {"bin32-4g", "\x81\xa1k\xc6\xff\xff\xff\xff", 8},  /* a value declaring 4 GiB */
      {"nested-deep", "\x81\xa1k\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x90", 13},
      {"nested-array-value", "\x81\xa1k\x91\xc4\x00", 6},
      {"duplicate-key", "\x82\xa1k\xc4\x01" "a\xa1k\xc4\x01" "b", 11},
      {"empty-key", "\x81\xa0\xc4\x00", 4},
      {"nul-in-key", "\x81\xa3k\x00k\xc4\x00", 7},
      {"int-key", "\x81\x01\xc4\x00", 4},
      {"str-value", "\x81\xa1k\xa1v", 5},
      {"not-a-map", "\x93\x01\x02\x03", 4},
      {"reserved-c1", "\x81\xa1k\xc1", 4},
      {"truncated-str8", "\x81\xd9\x10k", 4},
      {"ext-value", "\x81\xa1k\xd4\x01\x00", 6},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    put("data", bad[i].name, bad[i].bytes, bad[i].len);
}

/* ---- envelopes ---------------------------------------------------------------------------- */

static saga__buf env_bytes(const saga_envelope *e) {
  saga__buf b;
  saga__buf_init(&b, NULL);
  FUZZ_CHECK(saga__envelope_encode_buf(e, &b) == SAGA_OK);
  return b;
}

static void envelope_seeds(void) {
  saga_data *d;
  FUZZ_CHECK(saga_data_new(&d, NULL) == SAGA_OK);
  saga_data_set_str(d, "purchase_id", "p-000123");
  saga_data_set_i64(d, "customer_id", 42);
  saga__buf payload = data_bytes(d);
  saga_data_free(d);
  static const saga_header hdrs[] = {
      {"traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
      {"tenant", "acme"},
      {"empty", ""},
  };
  saga_envelope e;
  memset(&e, 0, sizeof e);
  e.version = SAGA_ENVELOPE_VERSION;
  e.kind = SAGA_MSG_COMMAND;
  e.msg_id = "0190f3a2-0000-7000-8000-000000000001";
  e.saga_id = "0190f3a2-0000-7000-8000-0000000000aa";
  e.step = 1;
  e.attempt = 1;
  e.phase = SAGA_PHASE_ACTION;
  e.name = "payment.charge";
  e.reply_to = "orchestrator";
  e.error = "";
  e.headers = hdrs;
  e.nheaders = 3;
  e.payload = payload.data;
  e.payload_len = payload.len;
  saga__buf cmd = env_bytes(&e);
  put_buf("envelope", "command", &cmd);

  saga_envelope r = e;
  r.kind = SAGA_MSG_REPLY;
  r.phase = SAGA_PHASE_COMPENSATION;
  r.status = SAGA_EREFUSED;
  r.error = "payment above the limit";
  r.reply_to = "";
  r.nheaders = 0;
  saga__buf b = env_bytes(&r);
  put_buf("envelope", "reply-refused", &b);
  saga__buf_free(&b);

  saga_envelope ev = e;
  ev.kind = SAGA_MSG_EVENT;
  ev.phase = SAGA_PHASE_RESOLVE;
  ev.step = UINT32_MAX;
  ev.attempt = UINT32_MAX;
  ev.status = INT32_MIN;
  ev.name = "purchase";
  b = env_bytes(&ev);
  put_buf("envelope", "event-extremes", &b);
  saga__buf_free(&b);

  saga_envelope empty;
  memset(&empty, 0, sizeof empty);
  empty.kind = SAGA_MSG_COMMAND;
  b = env_bytes(&empty);
  put_buf("envelope", "all-empty", &b);
  saga__buf_free(&b);

  /* At the default limits: 32 headers, 1024-byte strings. */
  static char big[1025];
  memset(big, 'x', 1024);
  static saga_header many[33];
  static char names[33][8];
  for (int i = 0; i < 33; i++) {
    snprintf(names[i], sizeof names[i], "h%d", i);
    many[i].name = names[i];
    many[i].value = big;
  }
  saga_envelope lim = e;
  lim.msg_id = lim.saga_id = lim.name = lim.reply_to = lim.error = big;
  lim.headers = many;
  lim.nheaders = 32;
  b = env_bytes(&lim);
  put_buf("envelope", "at-limits", &b);
  saga__buf_free(&b);
  lim.nheaders = 33;
  b = env_bytes(&lim);
  put_buf("envelope", "33-headers", &b);
  saga__buf_free(&b);
  big[1024] = 'x';
  lim.nheaders = 0;
  lim.msg_id = big; /* 1025 bytes */
  lim.saga_id = lim.name = lim.reply_to = lim.error = "";
  b = env_bytes(&lim);
  put_buf("envelope", "string-1025", &b);
  saga__buf_free(&b);
  big[1024] = '\0';

  /* Damaged copies of the command. */
  put("envelope", "truncated-in-string", cmd.data, 20);
  put("envelope", "truncated-in-payload", cmd.data, cmd.len - 3);
  saga__buf t;
  saga__buf_init(&t, NULL);
  append(&t, cmd.data, cmd.len);
  append(&t, "\x00", 1);
  put_buf("envelope", "trailing-byte", &t);
  t.data[1] = 2; /* version 2 */
  put("envelope", "version-2", t.data, cmd.len);
  t.data[1] = 0xff; /* version -1 */
  put("envelope", "version-negative", t.data, cmd.len);
  t.data[1] = 1;
  t.data[2] = 4; /* kind 4 */
  put("envelope", "kind-4", t.data, cmd.len);
  saga__buf_free(&t);
  /* The duplicate header: the same name twice. */
  static const saga_header dup[] = {{"a", "1"}, {"a", "2"}};
  saga_envelope de = e;
  de.headers = dup;
  de.nheaders = 2;
  b = env_bytes(&de);
  put_buf("envelope", "duplicate-header", &b);
  saga__buf_free(&b);

  static const struct {
    const char *name;
    const char *bytes;
    size_t len;
  } bad[] = {
      {"array32-2p28", "\xdd\x10\x00\x00\x00", 5}, /* the 8 GiB frame body of issue 10 */
      {"array32-2p32-1", "\xdd\xff\xff\xff\xff", 5},
      {"map32-2p31", "\xdf\x80\x00\x00\x00", 5},
      {"headers-map32-2p31",
       "\x9d\x01\x01\xa0\xa0\x00\x00\x00\xa0\xa0\x00\xa0\xdf\x80\x00\x00\x00\xc4\x00", 19},
      {"nested-deep", "\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91"
                      "\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x90",
       35},
      {"nested-in-header",
       "\x9d\x01\x01\xa0\xa0\x00\x00\x00\xa0\xa0\x00\xa0\x81\xa1h\x91\x91\x91\x90\xc4\x00", 21},
      {"str32-4g-msg-id", "\x9d\x01\x01\xdb\xff\xff\xff\xff\0\0\0\0\0\0\0\0\0\0", 18},
      {"bin32-4g-payload",
       "\x9d\x01\x01\xa0\xa0\x00\x00\x00\xa0\xa0\x00\xa0\x80\xc6\xff\xff\xff\xff", 18},
      {"status-over-int32",
       "\x9d\x01\x02\xa0\xa0\x00\x00\x00\xa0\xa0\xce\x80\x00\x00\x00\xa0\x80\xc4\x00", 19},
      {"step-over-uint32",
       "\x9d\x01\x01\xa0\xa0\xcf\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xa0\xa0\x00\xa0\x80"
       "\xc4\x00",
       23},
      {"nul-in-name", "\x9d\x01\x01\xa0\xa0\x00\x00\x00\xa2n\x00\xa0\x00\xa0\x80\xc4\x00", 17},
      {"12-fields", "\x9c\x01\x01\xa0\xa0\x00\x00\x00\xa0\xa0\x00\xa0\x80", 13},
      {"not-an-array", "\x81\xa1k\xc4\x00", 5},
      {"nil", "\xc0", 1},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    put("envelope", bad[i].name, bad[i].bytes, bad[i].len);
  saga__buf_free(&cmd);
  saga__buf_free(&payload);
}

/* ---- TCP frames ---------------------------------------------------------------------------- */

#ifdef FUZZ_SEEDS_TCP
/* A tcp_frame input: limit byte (0: 1 MiB, 1: 64 bytes), cut byte, then the stream. */
static void tcp_put(const char *name, uint8_t limit, uint8_t cut, const saga__buf *stream) {
  saga__buf b;
  saga__buf_init(&b, NULL);
  uint8_t head[2] = {limit, cut};
  append(&b, head, 2);
  append(&b, stream->data, stream->len);
  put_buf("tcp_frame", name, &b);
  saga__buf_free(&b);
}

static void add_frame(saga__buf *b, int kind, uint64_t token, const char *channel,
                      const void *payload, size_t len) {
  saga__tcp_frame f = {kind, token, channel, channel ? strlen(channel) : 0, payload, len};
  size_t n = saga__tcp_frame_size(&f);
  FUZZ_CHECK(saga__buf_reserve(b, n) == SAGA_OK);
  saga__tcp_frame_encode(&f, b->data + b->len);
  b->len += n;
}

/* A frame whose body is given raw: a length prefix and the bytes. */
static void add_raw(saga__buf *b, const void *body, size_t n) {
  uint8_t len[4] = {(uint8_t)(n >> 24), (uint8_t)(n >> 16), (uint8_t)(n >> 8), (uint8_t)n};
  append(b, len, 4);
  append(b, body, n);
}

static void tcp_seeds(void) {
  /* A real command envelope as the DATA payload. */
  saga_envelope e;
  memset(&e, 0, sizeof e);
  e.kind = SAGA_MSG_COMMAND;
  e.msg_id = "0190f3a2-0000-7000-8000-000000000001";
  e.saga_id = "0190f3a2-0000-7000-8000-0000000000aa";
  e.step = 1;
  e.attempt = 1;
  e.name = "payment.charge";
  e.reply_to = "orchestrator";
  saga__buf env = env_bytes(&e);
  saga__buf s;
  saga__buf_init(&s, NULL);
  add_frame(&s, SAGA_TCP_DATA, 1, "payment", env.data, env.len);
  tcp_put("data", 0, 255, &s);
  tcp_put("data-cut-in-payload", 0, 200, &s);
  tcp_put("data-over-64", 1, 255, &s);
  saga__buf_reset(&s);
  add_frame(&s, SAGA_TCP_ACK, 1, NULL, NULL, 0);
  add_frame(&s, SAGA_TCP_NACK, 2, NULL, "handler refused: no such channel", 32);
  add_frame(&s, SAGA_TCP_ACK, UINT64_MAX, NULL, NULL, 0);
  add_frame(&s, SAGA_TCP_ACK, 0x5a17, NULL, NULL, 0); /* the target's stop token */
  add_frame(&s, SAGA_TCP_ACK, 3, NULL, NULL, 0);
  tcp_put("acks-nacks", 1, 30, &s);
  saga__buf_reset(&s);
  static char ch[258];
  memset(ch, 'c', 256);
  add_frame(&s, SAGA_TCP_DATA, 300, ch, "", 0); /* channel of 256 bytes: accepted */
  add_frame(&s, SAGA_TCP_DATA, 70000, "x", "\xdd\x10\x00\x00\x00", 5);
  append(&s, "\x00\x00\x01", 3); /* an incomplete length prefix */
  tcp_put("channel-256-then-partial", 0, 128, &s);
  saga__buf_reset(&s);
  ch[256] = 'c';
  add_frame(&s, SAGA_TCP_DATA, 1, ch, "", 0); /* 257 bytes: refused */
  tcp_put("channel-257", 0, 0, &s);
  ch[256] = '\0';

  static const struct {
    const char *name;
    const char *body;
    size_t len;
  } bad[] = {
      {"body-array32-2p28", "\xdd\x10\x00\x00\x00", 5}, /* the 8 GiB body of issue 10 */
      {"body-map32-2p31", "\xdf\x80\x00\x00\x00", 5},
      {"body-nested", "\x94\x01\x01\x91\x91\x91\x91\x91\x90\xc4\x00", 11},
      {"empty-body", "", 0},
      {"kind-4", "\x92\x04\x01", 3},
      {"ack-with-3-fields", "\x93\x02\x01\xa0", 4},
      {"data-empty-channel", "\x94\x01\x01\xa0\xc4\x00", 6},
      {"data-nul-in-channel", "\x94\x01\x01\xa2" "a\x00\xc4\x00", 8},
      {"data-str-payload", "\x94\x01\x01\xa1" "a\xa1p", 7},
      {"data-bin32-4g", "\x94\x01\x01\xa1" "a\xc6\xff\xff\xff\xff", 10},
      {"data-str32-4g-channel", "\x94\x01\x01\xdb\xff\xff\xff\xff", 8},
      {"token-negative", "\x92\x02\xff", 3},
      {"token-uint64-short", "\x92\x02\xcf\x00\x01", 5},
      {"nack-bin-reason", "\x93\x03\x01\xc4\x01r", 6},
      {"trailing-byte", "\x92\x02\x01\xc0", 4},
      {"array16", "\xdc\x00\x02\x02\x01", 5},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    saga__buf_reset(&s);
    add_raw(&s, bad[i].body, bad[i].len);
    char name[64];
    snprintf(name, sizeof name, "%s", bad[i].name);
    tcp_put(name, 0, 3, &s);
  }
  /* A length prefix over the limit, and the largest one. */
  saga__buf_reset(&s);
  append(&s, "\x00\x10\x00\x01", 4);
  tcp_put("length-over-1mib", 0, 255, &s);
  saga__buf_reset(&s);
  append(&s, "\xff\xff\xff\xff\x92\x02", 6);
  tcp_put("length-4g", 0, 255, &s);
  saga__buf_free(&s);
  saga__buf_free(&env);
}
#endif

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s OUTDIR (tests/fuzz)\n", argv[0]);
    return 2;
  }
  outdir = argv[1];
  data_seeds();
  envelope_seeds();
#ifdef FUZZ_SEEDS_TCP
  tcp_seeds();
#endif
  return 0;
}
