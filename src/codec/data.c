/* Saga data: an insertion-ordered map of string keys to byte values, searched linearly (a
 * saga carries tens of keys, where a scan beats hashing). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "../internal.h"

#define KEY_MAX 1024

/* One allocation per entry: key, NUL, value, NUL. Replacing a value swaps the whole block,
 * so a failed allocation never disturbs the old entry. */
typedef struct entry {
  char *key;
  uint8_t *val; /* points into key's block, just past its NUL */
  size_t len;
} entry;

struct saga_data {
  saga_allocator alloc;
  entry *v;
  size_t n, cap;
};

static size_t find(const saga_data *d, const char *key) {
  size_t i = 0;
  while (i < d->n && strcmp(d->v[i].key, key) != 0) i++;
  return i;
}

int saga_data_new(saga_data **out, const saga_allocator *alloc) {
  if (out == NULL) return SAGA_EINVAL;
  const saga_allocator *a = saga__alloc_resolve(alloc);
  saga_data *d = saga__calloc(a, sizeof *d);
  if (d == NULL) return SAGA_ENOMEM;
  d->alloc = *a;
  *out = d;
  return SAGA_OK;
}

void saga_data_free(saga_data *d) {
  if (d == NULL) return;
  for (size_t i = 0; i < d->n; i++) saga__free(&d->alloc, d->v[i].key);
  saga__free(&d->alloc, d->v);
  saga_allocator a = d->alloc; /* d is about to be freed with it */
  saga__free(&a, d);
}

int saga_data_set(saga_data *d, const char *key, const void *val, size_t len) {
  if (d == NULL || key == NULL || (val == NULL && len != 0)) return SAGA_EINVAL;
  size_t klen = strnlen(key, KEY_MAX + 1);
  if (klen == 0 || klen > KEY_MAX) return SAGA_EINVAL;
  if (len > SIZE_MAX - klen - 2) return SAGA_ENOMEM;
  size_t i = find(d, key);
  if (i == d->n && d->n == d->cap) {
    size_t cap = d->cap ? d->cap * 2 : 8;
    if (cap > SIZE_MAX / sizeof(entry)) return SAGA_ENOMEM;
    entry *v = saga__realloc(&d->alloc, d->v, cap * sizeof(entry));
    if (v == NULL) return SAGA_ENOMEM;
    d->v = v;
    d->cap = cap;
  }
  /* Copied before the old block is freed, so val may point into this very map. */
  char *blk = saga__malloc(&d->alloc, klen + len + 2);
  if (blk == NULL) return SAGA_ENOMEM;
  memcpy(blk, key, klen + 1);
  uint8_t *v = (uint8_t *)blk + klen + 1;
  if (len > 0) memcpy(v, val, len);
  v[len] = '\0';
  if (i == d->n)
    d->n++;
  else
    saga__free(&d->alloc, d->v[i].key);
  d->v[i] = (entry){blk, v, len};
  return SAGA_OK;
}

int saga_data_set_str(saga_data *d, const char *key, const char *val) {
  if (val == NULL) return SAGA_EINVAL;
  return saga_data_set(d, key, val, strlen(val));
}

int saga_data_set_i64(saga_data *d, const char *key, int64_t v) {
  char buf[24];
  int n = snprintf(buf, sizeof buf, "%" PRId64, v);
  return saga_data_set(d, key, buf, (size_t)n);
}

int saga_data_get(const saga_data *d, const char *key, const void **val, size_t *len) {
  if (d == NULL || key == NULL) return SAGA_EINVAL;
  size_t i = find(d, key);
  if (i == d->n) return SAGA_ENOTFOUND;
  if (val != NULL) *val = d->v[i].val;
  if (len != NULL) *len = d->v[i].len;
  return SAGA_OK;
}

const char *saga_data_get_str(const saga_data *d, const char *key) {
  const void *v;
  return saga_data_get(d, key, &v, NULL) == SAGA_OK ? v : NULL;
}

/* Accepts an optional '-' followed by one or more digits and nothing else; strtoll would
 * also take leading blanks and '+', and cannot see a NUL byte inside the value. */
int saga_data_get_i64(const saga_data *d, const char *key, int64_t *out) {
  const void *val;
  size_t len;
  int rc = saga_data_get(d, key, &val, &len);
  if (rc != SAGA_OK) return rc;
  if (out == NULL) return SAGA_EINVAL;
  const uint8_t *p = val;
  int neg = len > 0 && p[0] == '-';
  size_t i = (size_t)neg;
  if (i == len) return SAGA_EINVAL;
  uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX, m = 0;
  for (; i < len; i++) {
    if (p[i] < '0' || p[i] > '9') return SAGA_EINVAL;
    unsigned dig = p[i] - '0';
    if (m > (limit - dig) / 10) return SAGA_EINVAL;
    m = m * 10 + dig;
  }
  /* -(m - 1) - 1 reaches INT64_MIN without overflowing a signed value. */
  *out = neg ? (m == 0 ? 0 : -(int64_t)(m - 1) - 1) : (int64_t)m;
  return SAGA_OK;
}

int saga_data_remove(saga_data *d, const char *key) {
  if (d == NULL || key == NULL) return SAGA_EINVAL;
  size_t i = find(d, key);
  if (i == d->n) return SAGA_ENOTFOUND;
  saga__free(&d->alloc, d->v[i].key);
  memmove(&d->v[i], &d->v[i + 1], (d->n - i - 1) * sizeof(entry));
  d->n--;
  return SAGA_OK;
}

size_t saga_data_count(const saga_data *d) { return d != NULL ? d->n : 0; }

int saga_data_at(const saga_data *d, size_t i, const char **key, const void **val,
                 size_t *len) {
  if (d == NULL) return SAGA_EINVAL;
  if (i >= d->n) return SAGA_ENOTFOUND;
  if (key != NULL) *key = d->v[i].key;
  if (val != NULL) *val = d->v[i].val;
  if (len != NULL) *len = d->v[i].len;
  return SAGA_OK;
}

int saga_data_merge(saga_data *dst, const saga_data *src) {
  if (dst == NULL || src == NULL) return SAGA_EINVAL;
  /* Indexing by position stays valid when dst == src: setting an existing key neither adds
   * nor moves entries. */
  for (size_t i = 0; i < src->n; i++) {
    int rc = saga_data_set(dst, src->v[i].key, src->v[i].val, src->v[i].len);
    if (rc != SAGA_OK) return rc;
  }
  return SAGA_OK;
}
