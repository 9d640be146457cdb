/*
 * Fuzz target: the TCP transport's frame reader (src/transport/tcp_frame.c), which sees every
 * byte a peer sends: saga__tcp_frames_split over a stream and saga__tcp_frame_decode of one
 * body.
 *
 * Input: byte 0 picks the frame size limit (64 bytes or 1 MiB), byte 1 where the stream is cut
 * in two reads; the rest is the stream. Checks:
 *   - every frame handed over lies inside the input, has a known kind, a DATA channel of
 *     1..256 bytes without NUL, and survives encode -> decode unchanged (size as announced);
 *   - reading the stream in two pieces (keeping the incomplete tail, as the transport does)
 *     gives exactly the frames, the error and the consumed length of reading it at once;
 *   - when no error is returned, what is left is an incomplete frame within the limit;
 *   - the whole stream decoded as one body either fails with a reason or round-trips.
 */
#include <string.h>

#include "fuzz.h"
#include "transport/tcp_frame.h"

#define STOP_TOKEN 0x5a17 /* the callback stops the split at a frame with this token */

/* What a split saw: every frame re-encoded, one after the other. */
typedef struct seen {
  const uint8_t *lo, *hi; /* the buffer being split */
  uint8_t *log;
  size_t len, cap;
} seen;

static void check_frame(const saga__tcp_frame *f) {
  FUZZ_CHECK(f->kind == SAGA_TCP_DATA || f->kind == SAGA_TCP_ACK || f->kind == SAGA_TCP_NACK);
  if (f->kind == SAGA_TCP_DATA) {
    FUZZ_CHECK(f->channel != NULL && f->channel_len >= 1 &&
               f->channel_len <= SAGA_TCP_CHANNEL_MAX);
    FUZZ_CHECK(memchr(f->channel, '\0', f->channel_len) == NULL);
  } else {
    FUZZ_CHECK(f->channel == NULL && f->channel_len == 0);
  }
  if (f->kind == SAGA_TCP_ACK) FUZZ_CHECK(f->payload_len == 0);
  /* Round trip through the encoder. */
  size_t n = saga__tcp_frame_size(f);
  uint8_t *buf = malloc(n);
  FUZZ_CHECK(buf != NULL && n >= 4);
  saga__tcp_frame_encode(f, buf);
  size_t body = (size_t)buf[0] << 24 | (size_t)buf[1] << 16 | (size_t)buf[2] << 8 | buf[3];
  FUZZ_CHECK(body == n - 4);
  saga__tcp_frame g;
  const char *err = saga__tcp_frame_decode(buf + 4, body, &g);
  if (err != NULL) fprintf(stderr, "re-decode failed: %s\n", err);
  FUZZ_CHECK(err == NULL);
  FUZZ_CHECK(g.kind == f->kind && g.token == f->token && g.channel_len == f->channel_len &&
             g.payload_len == f->payload_len);
  FUZZ_CHECK(f->channel_len == 0 || memcmp(g.channel, f->channel, f->channel_len) == 0);
  FUZZ_CHECK(f->payload_len == 0 || memcmp(g.payload, f->payload, f->payload_len) == 0);
  free(buf);
}

static int inside(const seen *s, const void *p, size_t n) {
  const uint8_t *b = p;
  return n == 0 || (b >= s->lo && b <= s->hi && n <= (size_t)(s->hi - b));
}

static const char *on_frame(void *ctx, const saga__tcp_frame *f) {
  seen *s = ctx;
  FUZZ_CHECK(inside(s, f->channel, f->channel_len) && inside(s, f->payload, f->payload_len));
  check_frame(f);
  size_t n = saga__tcp_frame_size(f);
  if (s->len + n > s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 1024;
    while (cap < s->len + n) cap *= 2;
    uint8_t *p = realloc(s->log, cap);
    FUZZ_CHECK(p != NULL);
    s->log = p;
    s->cap = cap;
  }
  saga__tcp_frame_encode(f, s->log + s->len);
  s->len += n;
  return f->token == STOP_TOKEN ? "stopped by the callback" : NULL;
}

static uint32_t be32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Splits data at once. */
static const char *split_once(const uint8_t *data, size_t size, size_t max, seen *s,
                              size_t *used) {
  s->lo = data;
  s->hi = data + size;
  const char *err = saga__tcp_frames_split(data, size, max, on_frame, s, used);
  FUZZ_CHECK(*used <= size);
  if (err == NULL) {
    /* The rest is one incomplete frame: no full length prefix, or a body not all there. */
    size_t rest = size - *used;
    FUZZ_CHECK(rest < 4 || (be32(data + *used) <= max && be32(data + *used) > rest - 4));
  }
  return err;
}

/* Splits data as two reads: the first cut bytes, then the rest appended to what was left. */
static const char *split_twice(const uint8_t *data, size_t size, size_t cut, size_t max,
                               seen *s, size_t *total) {
  size_t used = 0;
  uint8_t *first = malloc(cut ? cut : 1);
  FUZZ_CHECK(first != NULL);
  memcpy(first, data, cut);
  const char *err = split_once(first, cut, max, s, &used);
  *total = used;
  if (err == NULL) {
    size_t keep = cut - used, n = keep + size - cut;
    uint8_t *second = malloc(n ? n : 1);
    FUZZ_CHECK(second != NULL);
    memcpy(second, first + used, keep);
    memcpy(second + keep, data + cut, size - cut);
    err = split_once(second, n, max, s, &used);
    *total += used;
    free(second);
  }
  free(first);
  return err;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  size_t max = (data[0] & 1) ? 64 : (size_t)1 << 20;
  const uint8_t *stream = data + 2;
  size_t n = size - 2, cut = n * data[1] / 255;

  seen a = {0}, b = {0};
  size_t used_a = 0, used_b = 0;
  const char *err_a = split_once(stream, n, max, &a, &used_a);
  const char *err_b = split_twice(stream, n, cut, max, &b, &used_b);
  /* Where the frames are cut must not matter. */
  FUZZ_CHECK((err_a == NULL) == (err_b == NULL));
  FUZZ_CHECK(err_a == NULL || strcmp(err_a, err_b) == 0);
  FUZZ_CHECK(a.len == b.len && (a.len == 0 || memcmp(a.log, b.log, a.len) == 0));
  if (err_a == NULL) FUZZ_CHECK(used_a == used_b);
  free(a.log);
  free(b.log);

  /* The stream as one frame body. */
  saga__tcp_frame f;
  const char *err = saga__tcp_frame_decode(stream, n, &f);
  if (err == NULL) {
    seen s = {stream, stream + n, NULL, 0, 0};
    FUZZ_CHECK(inside(&s, f.channel, f.channel_len) && inside(&s, f.payload, f.payload_len));
    check_frame(&f);
    /* The encoder writes the shortest forms: never longer than what it decoded. */
    FUZZ_CHECK(saga__tcp_frame_size(&f) - 4 <= n);
  } else {
    FUZZ_CHECK(err[0] != '\0' && f.kind == 0 && f.channel == NULL && f.payload == NULL);
  }
  return 0;
}
