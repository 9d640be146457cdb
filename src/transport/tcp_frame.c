/* The TCP transport's frames (tcp_frame.h): a strict decoder of the few msgpack forms a frame
 * uses, and the matching encoder. Every read is checked against the bytes left. */
#include "tcp_frame.h"

#include <string.h>

typedef struct rd {
  const unsigned char *p;
  size_t left;
} rd;

static int take(rd *r, size_t n, const unsigned char **out) {
  if (r->left < n) return 0;
  *out = r->p;
  r->p += n;
  r->left -= n;
  return 1;
}

static uint64_t be(const unsigned char *p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; i++) v = (v << 8) | p[i];
  return v;
}

/* A length of n bytes (1, 2 or 4), big-endian. */
static int take_len(rd *r, size_t n, size_t *len) {
  const unsigned char *b;
  if (!take(r, n, &b)) return 0;
  *len = (size_t)be(b, n);
  return 1;
}

static int read_uint(rd *r, uint64_t *v) {
  const unsigned char *b;
  if (!take(r, 1, &b)) return 0;
  size_t n;
  switch (b[0]) {
  case 0xcc: n = 1; break;
  case 0xcd: n = 2; break;
  case 0xce: n = 4; break;
  case 0xcf: n = 8; break;
  default:
    if (b[0] > 0x7f) return 0;
    *v = b[0];
    return 1;
  }
  if (!take(r, n, &b)) return 0;
  *v = be(b, n);
  return 1;
}

/* A str (bin == 0) or bin (bin == 1) whose body lies within the input. */
static int read_raw(rd *r, int bin, const void **p, size_t *n) {
  const unsigned char *b;
  if (!take(r, 1, &b)) return 0;
  size_t len;
  int ok;
  if (!bin && b[0] >= 0xa0 && b[0] <= 0xbf) {
    len = b[0] & 0x1f;
    ok = 1;
  } else if (!bin && b[0] >= 0xd9 && b[0] <= 0xdb) {
    ok = take_len(r, (size_t)1 << (b[0] - 0xd9), &len);
  } else if (bin && b[0] >= 0xc4 && b[0] <= 0xc6) {
    ok = take_len(r, (size_t)1 << (b[0] - 0xc4), &len);
  } else {
    return 0;
  }
  if (!ok || !take(r, len, &b)) return 0;
  *p = b;
  *n = len;
  return 1;
}

const char *saga__tcp_frame_decode(const void *body, size_t len, saga__tcp_frame *out) {
  rd r = {body, len};
  const unsigned char *b;
  memset(out, 0, sizeof *out);
  if (!take(&r, 1, &b) || b[0] < 0x92 || b[0] > 0x94)
    return "frame is not an array of 2 to 4 elements";
  size_t count = b[0] & 0x0f;
  uint64_t kind;
  if (!read_uint(&r, &kind) || !read_uint(&r, &out->token))
    return "frame kind or token is not an unsigned integer";
  const char *err = NULL;
  switch (kind) {
  case SAGA_TCP_DATA: {
    const void *ch = NULL;
    if (count != 4 || !read_raw(&r, 0, &ch, &out->channel_len) ||
        !read_raw(&r, 1, &out->payload, &out->payload_len) || out->channel_len == 0 ||
        out->channel_len > SAGA_TCP_CHANNEL_MAX)
      err = "DATA frame must be [1, token, channel(1..256), payload(bin)]";
    out->channel = ch;
    if (err == NULL && memchr(ch, '\0', out->channel_len) != NULL)
      err = "DATA frame's channel contains a NUL byte";
    break;
  }
  case SAGA_TCP_ACK:
    if (count != 2) err = "ACK frame must be [2, token]";
    break;
  case SAGA_TCP_NACK:
    if (count != 3 || !read_raw(&r, 0, &out->payload, &out->payload_len))
      err = "NACK frame must be [3, token, reason]";
    break;
  default:
    err = "unknown frame kind";
  }
  if (err == NULL && r.left != 0) err = "trailing bytes after frame";
  if (err != NULL) memset(out, 0, sizeof *out);
  else out->kind = (int)kind;
  return err;
}

/* ---- encoding -------------------------------------------------------------------------- */

static size_t uint_size(uint64_t v) {
  return v <= 0x7f ? 1 : v <= 0xff ? 2 : v <= 0xffff ? 3 : v <= 0xffffffffu ? 5 : 9;
}

static size_t raw_head(size_t n, int bin) {
  if (!bin && n <= 31) return 1;
  return n <= 0xff ? 2 : n <= 0xffff ? 3 : 5;
}

size_t saga__tcp_frame_size(const saga__tcp_frame *f) {
  size_t n = 4 + 1 + uint_size((uint64_t)f->kind) + uint_size(f->token);
  if (f->kind == SAGA_TCP_DATA)
    n += raw_head(f->channel_len, 0) + f->channel_len + raw_head(f->payload_len, 1) +
         f->payload_len;
  else if (f->kind == SAGA_TCP_NACK)
    n += raw_head(f->payload_len, 0) + f->payload_len;
  return n;
}

static unsigned char *put_be(unsigned char *p, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * (n - 1 - i)));
  return p + n;
}

static unsigned char *put_uint(unsigned char *p, uint64_t v) {
  size_t n = uint_size(v);
  if (n == 1) {
    *p = (unsigned char)v;
    return p + 1;
  }
  *p = n == 2 ? 0xcc : n == 3 ? 0xcd : n == 5 ? 0xce : 0xcf;
  return put_be(p + 1, v, n - 1);
}

static unsigned char *put_raw(unsigned char *p, const void *data, size_t n, int bin) {
  size_t h = raw_head(n, bin);
  if (h == 1) {
    *p++ = (unsigned char)(0xa0 | n);
  } else {
    *p++ = (unsigned char)((bin ? 0xc4 : 0xd9) + (h == 2 ? 0 : h == 3 ? 1 : 2));
    p = put_be(p, n, h - 1);
  }
  if (n > 0) memcpy(p, data, n);
  return p + n;
}

void saga__tcp_frame_encode(const saga__tcp_frame *f, void *out) {
  unsigned char *start = out, *p = start + 4;
  *p++ = (unsigned char)(0x90 | (f->kind == SAGA_TCP_DATA ? 4 : f->kind == SAGA_TCP_NACK ? 3 : 2));
  p = put_uint(p, (uint64_t)f->kind);
  p = put_uint(p, f->token);
  if (f->kind == SAGA_TCP_DATA) {
    p = put_raw(p, f->channel, f->channel_len, 0);
    p = put_raw(p, f->payload, f->payload_len, 1);
  } else if (f->kind == SAGA_TCP_NACK) {
    p = put_raw(p, f->payload, f->payload_len, 0);
  }
  put_be(start, (uint64_t)(p - start - 4), 4);
}

const char *saga__tcp_frames_split(const void *buf, size_t len, size_t max_body,
                                   saga__tcp_frame_fn fn, void *ctx, size_t *used) {
  const unsigned char *b = buf;
  size_t pos = 0;
  const char *err = NULL;
  while (err == NULL && len - pos >= 4) {
    size_t n = (size_t)be(b + pos, 4);
    if (n > max_body) {
      err = "frame over max_frame_bytes";
      break;
    }
    if (len - pos - 4 < n) break;
    saga__tcp_frame f;
    err = saga__tcp_frame_decode(b + pos + 4, n, &f);
    if (err == NULL) err = fn(ctx, &f);
    pos += 4 + n;
  }
  *used = pos;
  return err;
}
