/*
 * Fuzz target: saga_envelope_decode (src/codec/codec.c), the decoder every message from a
 * transport goes through.
 *
 * Each input is decoded under the default limits and under tight ones. A refusal must come
 * with a known code and a message. An accepted envelope must respect the limits it was
 * decoded under, must cost memory in proportion to the input (the allocator is counted), and
 * must survive a round trip: encode -> decode gives the same fields, and encoding that again
 * gives the same bytes.
 */
#include <string.h>

#include "fuzz.h"
#include "internal.h"

/* A counting allocator: the bytes asked for by the decoder for one input. */
typedef struct counter {
  size_t bytes, calls;
} counter;

static void *count_malloc(size_t size, void *ud) {
  counter *c = ud;
  c->bytes += size;
  c->calls++;
  return malloc(size);
}
static void *count_realloc(void *p, size_t size, void *ud) {
  counter *c = ud;
  c->bytes += size;
  c->calls++;
  return realloc(p, size);
}
static void count_free(void *p, void *ud) {
  (void)ud;
  free(p);
}

static int same_str(const char *a, const char *b) { return strcmp(a, b) == 0; }

static void check_same(const saga_envelope *a, const saga_envelope *b) {
  FUZZ_CHECK(a->version == b->version && a->kind == b->kind && a->phase == b->phase);
  FUZZ_CHECK(a->step == b->step && a->attempt == b->attempt && a->status == b->status);
  FUZZ_CHECK(same_str(a->msg_id, b->msg_id) && same_str(a->saga_id, b->saga_id));
  FUZZ_CHECK(same_str(a->name, b->name) && same_str(a->reply_to, b->reply_to));
  FUZZ_CHECK(same_str(a->error, b->error));
  FUZZ_CHECK(a->nheaders == b->nheaders);
  for (size_t i = 0; i < a->nheaders; i++) {
    FUZZ_CHECK(same_str(a->headers[i].name, b->headers[i].name));
    FUZZ_CHECK(same_str(a->headers[i].value, b->headers[i].value));
    FUZZ_CHECK(saga_envelope_header(b, a->headers[i].name) == b->headers[i].value);
  }
  FUZZ_CHECK(a->payload_len == b->payload_len);
  FUZZ_CHECK(a->payload_len == 0 || memcmp(a->payload, b->payload, a->payload_len) == 0);
}

static void check_limits(const saga_envelope *e, const saga_limits *lim) {
  const char *strs[] = {e->msg_id, e->saga_id, e->name, e->reply_to, e->error};
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
    FUZZ_CHECK(strs[i] != NULL && strlen(strs[i]) <= lim->max_string_bytes);
  FUZZ_CHECK(e->version == SAGA_ENVELOPE_VERSION);
  FUZZ_CHECK(e->kind >= SAGA_MSG_COMMAND && e->kind <= SAGA_MSG_EVENT);
  FUZZ_CHECK(e->phase >= SAGA_PHASE_ACTION && e->phase <= SAGA_PHASE_RESOLVE);
  FUZZ_CHECK(e->nheaders <= lim->max_headers);
  for (size_t i = 0; i < e->nheaders; i++) {
    FUZZ_CHECK(strlen(e->headers[i].name) <= lim->max_string_bytes);
    FUZZ_CHECK(strlen(e->headers[i].value) <= lim->max_string_bytes);
  }
  FUZZ_CHECK(e->payload != NULL || e->payload_len == 0);
}

static void one(const uint8_t *data, size_t size, const saga_limits *lim) {
  counter c = {0, 0};
  saga_allocator a = {count_malloc, count_realloc, count_free, &c};
  saga_envelope *e = NULL;
  char err[256] = "";
  int rc = saga_envelope_decode(data, size, lim, &a, &e, err, sizeof err);
  if (rc != SAGA_OK) {
    FUZZ_CHECK(e == NULL);
    FUZZ_CHECK(rc == SAGA_EMALFORMED || rc == SAGA_ETOOBIG || rc == SAGA_EVERSION ||
               rc == SAGA_ENOMEM);
    FUZZ_CHECK(err[0] != '\0');
    FUZZ_CHECK(rc != SAGA_ETOOBIG || size > lim->max_message_bytes);
    return;
  }
  FUZZ_CHECK(e != NULL && size <= lim->max_message_bytes);
  check_limits(e, lim);
  /* One block: the struct, the header array, the strings and the payload, each bounded by
   * the bytes that encoded it (a header entry takes at least 2 bytes). */
  FUZZ_CHECK(c.calls == 1 && c.bytes <= 256 + 16 * size);

  void *b1 = NULL, *b2 = NULL;
  size_t n1 = 0, n2 = 0;
  FUZZ_CHECK(saga_envelope_encode(e, NULL, &b1, &n1) == SAGA_OK);
  saga_envelope *e2 = NULL;
  rc = saga_envelope_decode(b1, n1, lim, NULL, &e2, err, sizeof err);
  if (rc != SAGA_OK) fprintf(stderr, "re-decode failed: %s\n", err);
  FUZZ_CHECK(rc == SAGA_OK);
  check_same(e, e2);
  FUZZ_CHECK(saga_envelope_encode(e2, NULL, &b2, &n2) == SAGA_OK);
  FUZZ_CHECK(n1 == n2 && memcmp(b1, b2, n1) == 0);
  /* The encoder writes the shortest forms, so its output is never longer than the input. */
  FUZZ_CHECK(n1 <= size);
  saga_free(NULL, b1);
  saga_free(NULL, b2);
  saga_envelope_free(e2);
  saga_envelope_free(e);
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
