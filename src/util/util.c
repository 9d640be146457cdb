/* Error table, allocator helpers, byte buffers, randomness. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "../internal.h"

const char *saga_version(void) { return SAGA_VERSION_STRING; }

const char *saga_strerror(int code) {
  switch (code) {
#define SAGA__ERR_STR(name, value, msg) \
  case (value):                         \
    return msg;
    SAGA_ERRNO_MAP(SAGA__ERR_STR)
#undef SAGA__ERR_STR
  default:
    return "unknown error";
  }
}

const char *saga_err_name(int code) {
  switch (code) {
#define SAGA__ERR_NAME(name, value, msg) \
  case (value):                          \
    return #name;
    SAGA_ERRNO_MAP(SAGA__ERR_NAME)
#undef SAGA__ERR_NAME
  default:
    return "UNKNOWN";
  }
}

void saga_limits_init(saga_limits *lim) {
  if (lim == NULL) return;
  lim->max_message_bytes = 1u << 20;
  lim->max_data_entries = 256;
  lim->max_string_bytes = 1024;
  lim->max_headers = 32;
}

static void *libc_malloc(size_t n, void *ud) {
  (void)ud;
  return malloc(n);
}
static void *libc_realloc(void *p, size_t n, void *ud) {
  (void)ud;
  return realloc(p, n);
}
static void libc_free(void *p, void *ud) {
  (void)ud;
  free(p);
}
static const saga_allocator libc_alloc = {libc_malloc, libc_realloc, libc_free, NULL};

const saga_allocator *saga__alloc_resolve(const saga_allocator *a) {
  return a != NULL ? a : &libc_alloc;
}

void *saga__malloc(const saga_allocator *a, size_t n) {
  a = saga__alloc_resolve(a);
  return a->malloc(n == 0 ? 1 : n, a->ud);
}

void *saga__calloc(const saga_allocator *a, size_t n) {
  void *p = saga__malloc(a, n);
  if (p != NULL) memset(p, 0, n == 0 ? 1 : n);
  return p;
}

void *saga__realloc(const saga_allocator *a, void *p, size_t n) {
  a = saga__alloc_resolve(a);
  return a->realloc(p, n == 0 ? 1 : n, a->ud);
}

void saga__free(const saga_allocator *a, void *p) {
  if (p == NULL) return;
  a = saga__alloc_resolve(a);
  a->free(p, a->ud);
}

void saga_free(const saga_allocator *alloc, void *ptr) { saga__free(alloc, ptr); }

char *saga__strndup(const saga_allocator *a, const char *s, size_t n) {
  char *p = saga__malloc(a, n + 1);
  if (p == NULL) return NULL;
  if (n > 0) memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

char *saga__strdup(const saga_allocator *a, const char *s) {
  return saga__strndup(a, s, strlen(s));
}

void saga__buf_init(saga__buf *b, const saga_allocator *a) {
  b->data = NULL;
  b->len = b->cap = 0;
  b->alloc = saga__alloc_resolve(a);
}

int saga__buf_reserve(saga__buf *b, size_t extra) {
  if (b->cap - b->len >= extra) return SAGA_OK;
  if (extra > SIZE_MAX / 2 - b->len) return SAGA_ENOMEM;
  size_t cap = b->cap ? b->cap : 256;
  while (cap - b->len < extra) cap *= 2;
  uint8_t *p = saga__realloc(b->alloc, b->data, cap);
  if (p == NULL) return SAGA_ENOMEM;
  b->data = p;
  b->cap = cap;
  return SAGA_OK;
}

int saga__buf_append(saga__buf *b, const void *p, size_t n) {
  if (n == 0) return SAGA_OK;
  int rc = saga__buf_reserve(b, n);
  if (rc != SAGA_OK) return rc;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return SAGA_OK;
}

void saga__buf_reset(saga__buf *b) { b->len = 0; }

void saga__buf_free(saga__buf *b) {
  saga__free(b->alloc, b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

void saga__errf(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

void saga__printable(char *out, size_t out_len, const char *s, size_t len) {
  size_t max = out_len - 1, k = 0;
  for (; k < len && k < max; k++)
    out[k] = (unsigned char)s[k] < 0x20 || s[k] == 0x7f ? '?' : s[k];
  out[k] = '\0';
  if (k < len) memcpy(out + max - 3, "...", 4);
}

uint64_t saga__splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t saga__os_random(void) {
  uint64_t v = 0;
  if (getrandom(&v, sizeof v, 0) == (ssize_t)sizeof v) return v;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t s = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)(uintptr_t)&v;
  return saga__splitmix64(&s);
}
