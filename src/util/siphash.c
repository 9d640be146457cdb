/* SipHash-2-4 (Aumasson and Bernstein): a keyed pseudorandom function for short inputs,
 * used to tag the ids of commands so that only whoever saw a command can answer it. */
#include <string.h>

#include "../internal.h"

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

static uint64_t le64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

#define SIPROUND                                                                            \
  do {                                                                                      \
    v0 += v1;                                                                               \
    v1 = ROTL(v1, 13);                                                                      \
    v1 ^= v0;                                                                               \
    v0 = ROTL(v0, 32);                                                                      \
    v2 += v3;                                                                               \
    v3 = ROTL(v3, 16);                                                                      \
    v3 ^= v2;                                                                               \
    v0 += v3;                                                                               \
    v3 = ROTL(v3, 21);                                                                      \
    v3 ^= v0;                                                                               \
    v2 += v1;                                                                               \
    v1 = ROTL(v1, 17);                                                                      \
    v1 ^= v2;                                                                               \
    v2 = ROTL(v2, 32);                                                                      \
  } while (0)

uint64_t saga__siphash(const uint64_t key[2], const void *data, size_t len) {
  const uint8_t *p = data;
  uint64_t v0 = 0x736f6d6570736575ULL ^ key[0], v1 = 0x646f72616e646f6dULL ^ key[1];
  uint64_t v2 = 0x6c7967656e657261ULL ^ key[0], v3 = 0x7465646279746573ULL ^ key[1];
  size_t whole = len - len % 8;
  for (size_t i = 0; i < whole; i += 8) {
    uint64_t m = le64(p + i);
    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
  }
  uint8_t last[8] = {0};
  memcpy(last, p + whole, len % 8);
  uint64_t b = ((uint64_t)len << 56) | le64(last);
  v3 ^= b;
  SIPROUND;
  SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}
