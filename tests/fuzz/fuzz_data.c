/*
 * Fuzz target: saga__data_decode (src/codec/codec.c), the decoder of the saga data carried in
 * every command and reply payload.
 *
 * Each input is decoded under the default limits and under tight ones. A refusal must come
 * with a known code and a message; an accepted map must respect the limits (entries, key
 * length, no empty or duplicate key) and survive a round trip: encode -> decode gives the
 * same entries in the same order, and encoding that again gives the same bytes.
 */
#include <string.h>

#include "fuzz.h"
#include "internal.h"

static void check_same(const saga_data *a, const saga_data *b) {
  FUZZ_CHECK(saga_data_count(a) == saga_data_count(b));
  for (size_t i = 0; i < saga_data_count(a); i++) {
    const char *ka, *kb;
    const void *va, *vb;
    size_t la, lb;
    FUZZ_CHECK(saga_data_at(a, i, &ka, &va, &la) == SAGA_OK);
    FUZZ_CHECK(saga_data_at(b, i, &kb, &vb, &lb) == SAGA_OK);
    FUZZ_CHECK(strcmp(ka, kb) == 0 && la == lb && memcmp(va, vb, la) == 0);
  }
}

static void one(const uint8_t *data, size_t size, const saga_limits *lim) {
  saga_data *d = NULL;
  char err[256] = "";
  int rc = saga__data_decode(data, size, lim, NULL, &d, err, sizeof err);
  if (rc != SAGA_OK) {
    FUZZ_CHECK(d == NULL);
    FUZZ_CHECK(rc == SAGA_EMALFORMED || rc == SAGA_ENOMEM);
    FUZZ_CHECK(err[0] != '\0');
    return;
  }
  size_t n = saga_data_count(d);
  FUZZ_CHECK(n <= lim->max_data_entries);
  FUZZ_CHECK(size > 0 || n == 0);
  for (size_t i = 0; i < n; i++) {
    const char *k;
    const void *v;
    size_t len;
    FUZZ_CHECK(saga_data_at(d, i, &k, &v, &len) == SAGA_OK);
    FUZZ_CHECK(k[0] != '\0' && strlen(k) <= lim->max_string_bytes && strlen(k) <= 1024);
    FUZZ_CHECK(len < size);
    FUZZ_CHECK(((const char *)v)[len] == '\0'); /* data.h: values are NUL-terminated */
    const void *v2;
    FUZZ_CHECK(saga_data_get(d, k, &v2, NULL) == SAGA_OK && v2 == v); /* keys unique */
  }

  saga__buf b1, b2;
  saga__buf_init(&b1, NULL);
  saga__buf_init(&b2, NULL);
  FUZZ_CHECK(saga__data_encode(d, &b1) == SAGA_OK);
  FUZZ_CHECK(b1.len <= size || size == 0);
  saga_data *d2 = NULL;
  rc = saga__data_decode(b1.data, b1.len, lim, NULL, &d2, err, sizeof err);
  if (rc != SAGA_OK) fprintf(stderr, "re-decode failed: %s\n", err);
  FUZZ_CHECK(rc == SAGA_OK);
  check_same(d, d2);
  FUZZ_CHECK(saga__data_encode(d2, &b2) == SAGA_OK);
  FUZZ_CHECK(b1.len == b2.len && memcmp(b1.data, b2.data, b1.len) == 0);
  saga__buf_free(&b1);
  saga__buf_free(&b2);
  saga_data_free(d2);
  saga_data_free(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  saga_limits dflt, tight;
  saga_limits_init(&dflt);
  one(data, size, &dflt);
  tight.max_message_bytes = 512;
  tight.max_data_entries = 4;
  tight.max_string_bytes = 16;
  tight.max_headers = 2;
  one(data, size, &tight);
  return 0;
}
