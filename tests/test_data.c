/* Saga data: the map itself, its msgpack form and refusals of malformed maps. */
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "internal.h"

static saga_data *new_data(const saga_allocator *a) {
  saga_data *d = NULL;
  assert_int_equal(saga_data_new(&d, a), SAGA_OK);
  assert_non_null(d);
  return d;
}

static void check_value(const saga_data *d, const char *key, const void *val, size_t len) {
  const void *v = NULL;
  size_t n = 0;
  assert_int_equal(saga_data_get(d, key, &v, &n), SAGA_OK);
  assert_int_equal(n, len);
  assert_memory_equal(v, val, len);
  assert_int_equal(((const char *)v)[len], '\0');
}

static void test_new_free(void **state) {
  (void)state;
  assert_int_equal(saga_data_new(NULL, NULL), SAGA_EINVAL);
  saga_data_free(NULL);
  assert_int_equal(saga_data_count(NULL), 0);
  saga_data *d = new_data(NULL);
  assert_int_equal(saga_data_count(d), 0);
  assert_int_equal(saga_data_get(d, "x", NULL, NULL), SAGA_ENOTFOUND);
  assert_null(saga_data_get_str(d, "x"));
  saga_data_free(d);
}

static void test_set_get(void **state) {
  (void)state;
  saga_data *d = new_data(NULL);
  static const uint8_t bin[] = {0, 1, 0, 0xff, 0};
  assert_int_equal(saga_data_set(d, "bin", bin, sizeof bin), SAGA_OK);
  assert_int_equal(saga_data_set_str(d, "text", "hello"), SAGA_OK);
  assert_int_equal(saga_data_set(d, "empty", NULL, 0), SAGA_OK);
  assert_int_equal(saga_data_count(d), 3);
  check_value(d, "bin", bin, sizeof bin);
  check_value(d, "empty", "", 0);
  assert_string_equal(saga_data_get_str(d, "text"), "hello");
  assert_string_equal(saga_data_get_str(d, "empty"), "");
  /* val and len are optional */
  assert_int_equal(saga_data_get(d, "text", NULL, NULL), SAGA_OK);
  size_t n = 0;
  assert_int_equal(saga_data_get(d, "text", NULL, &n), SAGA_OK);
  assert_int_equal(n, 5);
  assert_int_equal(saga_data_get(d, "TEXT", NULL, NULL), SAGA_ENOTFOUND);
  saga_data_free(d);
}

static void test_set_refusals(void **state) {
  (void)state;
  saga_data *d = new_data(NULL);
  char key[1026];
  memset(key, 'k', sizeof key);
  key[1024] = '\0';
  assert_int_equal(saga_data_set_str(d, key, "max"), SAGA_OK);
  key[1024] = 'k';
  key[1025] = '\0';
  assert_int_equal(saga_data_set_str(d, key, "over"), SAGA_EINVAL);
  assert_int_equal(saga_data_set_str(d, "", "v"), SAGA_EINVAL);
  assert_int_equal(saga_data_set_str(d, NULL, "v"), SAGA_EINVAL);
  assert_int_equal(saga_data_set_str(d, "k", NULL), SAGA_EINVAL);
  assert_int_equal(saga_data_set(d, "k", NULL, 1), SAGA_EINVAL);
  assert_int_equal(saga_data_set(NULL, "k", "v", 1), SAGA_EINVAL);
  assert_int_equal(saga_data_count(d), 1);
  assert_int_equal(saga_data_get(d, "k", NULL, NULL), SAGA_ENOTFOUND);
  saga_data_free(d);
}

static void expect_keys(const saga_data *d, const char *const *keys, size_t n) {
  assert_int_equal(saga_data_count(d), n);
  for (size_t i = 0; i < n; i++) {
    const char *k = NULL;
    assert_int_equal(saga_data_at(d, i, &k, NULL, NULL), SAGA_OK);
    assert_string_equal(k, keys[i]);
  }
  assert_int_equal(saga_data_at(d, n, NULL, NULL, NULL), SAGA_ENOTFOUND);
}

static void test_replace_keeps_order(void **state) {
  (void)state;
  saga_data *d = new_data(NULL);
  const char *keys[] = {"a", "b", "c"};
  for (int i = 0; i < 3; i++) assert_int_equal(saga_data_set_str(d, keys[i], keys[i]), SAGA_OK);
  assert_int_equal(saga_data_set_str(d, "b", "longer value"), SAGA_OK);
  expect_keys(d, keys, 3);
  assert_string_equal(saga_data_get_str(d, "b"), "longer value");
  /* A value taken from the map itself, including the entry being replaced. */
  const void *v;
  size_t n;
  assert_int_equal(saga_data_get(d, "b", &v, &n), SAGA_OK);
  assert_int_equal(saga_data_set(d, "b", v, 6), SAGA_OK);
  assert_string_equal(saga_data_get_str(d, "b"), "longer");
  assert_int_equal(saga_data_get(d, "b", &v, &n), SAGA_OK);
  assert_int_equal(saga_data_set(d, "a", v, n), SAGA_OK);
  assert_string_equal(saga_data_get_str(d, "a"), "longer");
  /* Many keys: the entry array grows past its first size. */
  char k[16];
  for (int i = 0; i < 100; i++) {
    snprintf(k, sizeof k, "key%d", i);
    assert_int_equal(saga_data_set_i64(d, k, i), SAGA_OK);
  }
  assert_int_equal(saga_data_count(d), 103);
  int64_t x;
  assert_int_equal(saga_data_get_i64(d, "key99", &x), SAGA_OK);
  assert_int_equal(x, 99);
  saga_data_free(d);
}

static void test_remove_at(void **state) {
  (void)state;
  saga_data *d = new_data(NULL);
  const char *all[] = {"a", "b", "c", "d"};
  for (int i = 0; i < 4; i++) assert_int_equal(saga_data_set_str(d, all[i], all[i]), SAGA_OK);
  assert_int_equal(saga_data_remove(d, "b"), SAGA_OK);
  assert_int_equal(saga_data_remove(d, "b"), SAGA_ENOTFOUND);
  assert_int_equal(saga_data_remove(d, NULL), SAGA_EINVAL);
  assert_int_equal(saga_data_remove(NULL, "a"), SAGA_EINVAL);
  const char *left[] = {"a", "c", "d"};
  expect_keys(d, left, 3);
  const char *k;
  const void *v;
  size_t n;
  assert_int_equal(saga_data_at(d, 1, &k, &v, &n), SAGA_OK);
  assert_string_equal(k, "c");
  assert_int_equal(n, 1);
  assert_memory_equal(v, "c", 2);
  assert_int_equal(saga_data_at(NULL, 0, &k, &v, &n), SAGA_EINVAL);
  assert_int_equal(saga_data_remove(d, "d"), SAGA_OK);
  assert_int_equal(saga_data_remove(d, "a"), SAGA_OK);
  /* A removed key set again goes to the end. */
  assert_int_equal(saga_data_set_str(d, "a", "again"), SAGA_OK);
  const char *last[] = {"c", "a"};
  expect_keys(d, last, 2);
  saga_data_free(d);
}

static void test_merge(void **state) {
  (void)state;
  saga_data *dst = new_data(NULL), *src = new_data(NULL);
  assert_int_equal(saga_data_set_str(dst, "a", "1"), SAGA_OK);
  assert_int_equal(saga_data_set_str(dst, "b", "2"), SAGA_OK);
  assert_int_equal(saga_data_set_str(src, "c", "3"), SAGA_OK);
  assert_int_equal(saga_data_set_str(src, "a", "one"), SAGA_OK);
  assert_int_equal(saga_data_merge(dst, src), SAGA_OK);
  const char *keys[] = {"a", "b", "c"};
  expect_keys(dst, keys, 3);
  assert_string_equal(saga_data_get_str(dst, "a"), "one");
  assert_string_equal(saga_data_get_str(dst, "c"), "3");
  assert_int_equal(saga_data_count(src), 2);
  assert_int_equal(saga_data_merge(dst, dst), SAGA_OK);
  expect_keys(dst, keys, 3);
  assert_string_equal(saga_data_get_str(dst, "a"), "one");
  assert_int_equal(saga_data_merge(NULL, src), SAGA_EINVAL);
  assert_int_equal(saga_data_merge(dst, NULL), SAGA_EINVAL);
  saga_data_free(src);
  saga_data_free(dst);
}

static void test_i64(void **state) {
  (void)state;
  saga_data *d = new_data(NULL);
  static const int64_t round[] = {0, 1, -1, INT64_MAX, INT64_MIN, 1234567890123LL};
  for (size_t i = 0; i < sizeof round / sizeof round[0]; i++) {
    int64_t v = 42;
    assert_int_equal(saga_data_set_i64(d, "n", round[i]), SAGA_OK);
    assert_int_equal(saga_data_get_i64(d, "n", &v), SAGA_OK);
    assert_true(v == round[i]);
  }
  assert_string_equal(saga_data_get_str(d, "n"), "1234567890123");

  static const struct {
    const char *text;
    int64_t v;
  } good[] = {{"9223372036854775807", INT64_MAX},
              {"-9223372036854775808", INT64_MIN},
              {"007", 7},
              {"-0", 0},
              {"000000000000000000000000000001", 1}};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    int64_t v = 42;
    assert_int_equal(saga_data_set_str(d, "n", good[i].text), SAGA_OK);
    assert_int_equal(saga_data_get_i64(d, "n", &v), SAGA_OK);
    assert_true(v == good[i].v);
  }

  static const char *const bad[] = {"9223372036854775808", "-9223372036854775809",
                                    "99999999999999999999", "", "-", "+1", " 1", "1 ", "1x",
                                    "0x10", "1.0", "--1", "1e3", "\t1"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int64_t v = 42;
    assert_int_equal(saga_data_set_str(d, "n", bad[i]), SAGA_OK);
    if (saga_data_get_i64(d, "n", &v) != SAGA_EINVAL) fail_msg("accepted '%s'", bad[i]);
    assert_true(v == 42);
  }
  /* A NUL inside the value must not end the number early. */
  assert_int_equal(saga_data_set(d, "n", "12\0", 3), SAGA_OK);
  int64_t v = 42;
  assert_int_equal(saga_data_get_i64(d, "n", &v), SAGA_EINVAL);
  assert_int_equal(saga_data_get_i64(d, "absent", &v), SAGA_ENOTFOUND);
  assert_true(v == 42);
  saga_data_free(d);
}

/* Every allocation of set (new key, replaced key) and merge fails in turn: the map must be
 * unchanged (set) or still valid (merge), and nothing may leak. */
static void test_alloc_failures(void **state) {
  (void)state;
  th_alloc ta;
  th_alloc_init(&ta);
  saga_data *d = new_data(&ta.a);
  char k[16];
  for (int i = 0; i < 8; i++) { /* fill the first entry array exactly */
    snprintf(k, sizeof k, "k%d", i);
    assert_int_equal(saga_data_set_i64(d, k, i), SAGA_OK);
  }
  int64_t start = ta.live;
  for (uint64_t n = 1;; n++) {
    ta.count = 0;
    ta.fail_at = n;
    int rc = saga_data_set_str(d, "new", "value");
    if (rc == SAGA_OK) break;
    assert_int_equal(rc, SAGA_ENOMEM);
    assert_int_equal(saga_data_count(d), 8);
    assert_int_equal(saga_data_get(d, "new", NULL, NULL), SAGA_ENOTFOUND);
    assert_true(ta.live == start);
  }
  for (uint64_t n = 1;; n++) {
    ta.count = 0;
    ta.fail_at = n;
    int rc = saga_data_set_str(d, "k3", "replaced");
    if (rc == SAGA_OK) break;
    assert_int_equal(rc, SAGA_ENOMEM);
    assert_string_equal(saga_data_get_str(d, "k3"), "3");
    assert_true(ta.live == start + 1); /* "new" */
  }
  ta.fail_at = 0;
  saga_data *src = new_data(&ta.a);
  for (int i = 0; i < 20; i++) {
    snprintf(k, sizeof k, "s%d", i);
    assert_int_equal(saga_data_set_i64(src, k, i), SAGA_OK);
  }
  for (uint64_t n = 1;; n++) {
    int64_t before = ta.live;
    saga_data *dst = new_data(&ta.a);
    ta.count = 0;
    ta.fail_at = n;
    int rc = saga_data_merge(dst, src);
    ta.fail_at = 0;
    size_t cnt = saga_data_count(dst);
    for (size_t i = 0; i < cnt; i++) { /* whatever was merged is intact */
      const char *key;
      int64_t v;
      assert_int_equal(saga_data_at(dst, i, &key, NULL, NULL), SAGA_OK);
      assert_int_equal(saga_data_get_i64(dst, key, &v), SAGA_OK);
      assert_int_equal(v, (int64_t)i);
    }
    saga_data_free(dst);
    assert_true(ta.live == before);
    if (rc == SAGA_OK) {
      assert_int_equal(cnt, 20);
      break;
    }
    assert_int_equal(rc, SAGA_ENOMEM);
  }
  saga_data_free(src);
  saga_data_free(d);
  assert_true(ta.live == 0);
  ta.count = 0;
  ta.fail_at = 1;
  saga_data *none = NULL;
  assert_int_equal(saga_data_new(&none, &ta.a), SAGA_ENOMEM);
  assert_null(none);
}

/* ---- msgpack form ---------------------------------------------------------------------- */

static void test_codec_round_trip(void **state) {
  (void)state;
  saga_data *d = new_data(NULL);
  static const uint8_t bin[] = {0, 0xc1, 0, 0x80};
  assert_int_equal(saga_data_set_str(d, "z", "last-first"), SAGA_OK);
  assert_int_equal(saga_data_set(d, "bin", bin, sizeof bin), SAGA_OK);
  assert_int_equal(saga_data_set(d, "empty", NULL, 0), SAGA_OK);
  assert_int_equal(saga_data_set_i64(d, "n", INT64_MIN), SAGA_OK);
  saga__buf b;
  saga__buf_init(&b, NULL);
  assert_int_equal(saga__buf_append(&b, "pre", 3), SAGA_OK);
  assert_int_equal(saga__data_encode(d, &b), SAGA_OK);
  assert_memory_equal(b.data, "pre", 3);
  assert_int_equal(b.data[3], 0x84); /* fixmap of 4 */
  saga_data *e = NULL;
  char err[128] = "";
  assert_int_equal(saga__data_decode(b.data + 3, b.len - 3, NULL, NULL, &e, err, sizeof err),
                   SAGA_OK);
  const char *keys[] = {"z", "bin", "empty", "n"};
  expect_keys(e, keys, 4);
  check_value(e, "bin", bin, sizeof bin);
  check_value(e, "empty", "", 0);
  int64_t v;
  assert_int_equal(saga_data_get_i64(e, "n", &v), SAGA_OK);
  assert_true(v == INT64_MIN);
  saga_data_free(e);
  saga_data_free(d);

  /* An empty or absent map encodes as an empty msgpack map; no bytes decode as empty. */
  saga__buf_reset(&b);
  assert_int_equal(saga__data_encode(NULL, &b), SAGA_OK);
  assert_int_equal(b.len, 1);
  assert_int_equal(b.data[0], 0x80);
  assert_int_equal(saga__data_decode(b.data, b.len, NULL, NULL, &e, err, sizeof err), SAGA_OK);
  assert_int_equal(saga_data_count(e), 0);
  saga_data_free(e);
  e = NULL;
  assert_int_equal(saga__data_decode(NULL, 0, NULL, NULL, &e, err, sizeof err), SAGA_OK);
  assert_non_null(e);
  assert_int_equal(saga_data_count(e), 0);
  saga_data_free(e);
  saga__buf_free(&b);
}

/* Packs with msgpack's own sbuffer; tests only. */
typedef struct mp {
  msgpack_sbuffer sb;
  msgpack_packer pk;
} mp;

static void mp_init(mp *m) {
  msgpack_sbuffer_init(&m->sb);
  msgpack_packer_init(&m->pk, &m->sb, msgpack_sbuffer_write);
}

static void mp_str(mp *m, const char *s, size_t n) {
  msgpack_pack_str(&m->pk, n);
  msgpack_pack_str_body(&m->pk, s, n);
}

static void mp_bin(mp *m, const char *s, size_t n) {
  msgpack_pack_bin(&m->pk, n);
  msgpack_pack_bin_body(&m->pk, s, n);
}

static void expect_refused(const void *buf, size_t len, const saga_limits *lim, int code,
                           const char *needle) {
  saga_data *out = (saga_data *)&out; /* must stay untouched */
  char err[256] = "";
  int rc = saga__data_decode(buf, len, lim, NULL, &out, err, sizeof err);
  if (rc != code) fail_msg("rc %s, want %s (%s)", saga_err_name(rc), saga_err_name(code), err);
  if (strstr(err, needle) == NULL) fail_msg("err '%s' does not mention '%s'", err, needle);
  assert_ptr_equal(out, (saga_data *)&out);
}

static void test_codec_refusals(void **state) {
  (void)state;
  mp m;
  saga_limits lim;
  saga_limits_init(&lim);

  mp_init(&m); /* duplicate keys */
  msgpack_pack_map(&m.pk, 2);
  mp_str(&m, "k", 1);
  mp_bin(&m, "1", 1);
  mp_str(&m, "k", 1);
  mp_bin(&m, "2", 1);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "duplicate key 'k'");
  msgpack_sbuffer_destroy(&m.sb);

  mp_init(&m); /* a str value instead of bin */
  msgpack_pack_map(&m.pk, 1);
  mp_str(&m, "k", 1);
  mp_str(&m, "v", 1);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "value of 'k'");
  msgpack_sbuffer_destroy(&m.sb);

  mp_init(&m); /* a nested value */
  msgpack_pack_map(&m.pk, 1);
  mp_str(&m, "k", 1);
  msgpack_pack_map(&m.pk, 0);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "expected binary, got map");
  msgpack_sbuffer_destroy(&m.sb);

  mp_init(&m); /* an integer key */
  msgpack_pack_map(&m.pk, 1);
  msgpack_pack_int(&m.pk, 1);
  mp_bin(&m, "v", 1);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "key of entry 0");
  msgpack_sbuffer_destroy(&m.sb);

  mp_init(&m); /* an empty key */
  msgpack_pack_map(&m.pk, 1);
  mp_str(&m, "", 0);
  mp_bin(&m, "v", 1);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "empty");
  msgpack_sbuffer_destroy(&m.sb);

  mp_init(&m); /* a key with a NUL byte */
  msgpack_pack_map(&m.pk, 1);
  mp_str(&m, "a\0b", 3);
  mp_bin(&m, "v", 1);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "NUL");
  msgpack_sbuffer_destroy(&m.sb);

  mp_init(&m); /* keys over the string limit, and over data.h's 1024 whatever the limit */
  msgpack_pack_map(&m.pk, 1);
  mp_str(&m, "123456789", 9);
  mp_bin(&m, "v", 1);
  lim.max_string_bytes = 8;
  expect_refused(m.sb.data, m.sb.size, &lim, SAGA_EMALFORMED, "exceeds the limit of 8");
  lim.max_string_bytes = 9;
  saga_data *ok = NULL;
  assert_int_equal(saga__data_decode(m.sb.data, m.sb.size, &lim, NULL, &ok, NULL, 0), SAGA_OK);
  saga_data_free(ok);
  msgpack_sbuffer_destroy(&m.sb);
  char big[1025];
  memset(big, 'k', sizeof big);
  mp_init(&m);
  msgpack_pack_map(&m.pk, 1);
  mp_str(&m, big, sizeof big);
  mp_bin(&m, "v", 1);
  lim.max_string_bytes = 4096;
  expect_refused(m.sb.data, m.sb.size, &lim, SAGA_EMALFORMED, "exceeds the limit of 1024");
  msgpack_sbuffer_destroy(&m.sb);
  saga_limits_init(&lim);

  mp_init(&m); /* too many entries */
  msgpack_pack_map(&m.pk, 3);
  for (int i = 0; i < 3; i++) {
    char k = (char)('a' + i);
    mp_str(&m, &k, 1);
    mp_bin(&m, "v", 1);
  }
  lim.max_data_entries = 2;
  expect_refused(m.sb.data, m.sb.size, &lim, SAGA_EMALFORMED, "3 entries exceed the limit of 2");
  lim.max_data_entries = 3;
  assert_int_equal(saga__data_decode(m.sb.data, m.sb.size, &lim, NULL, &ok, NULL, 0), SAGA_OK);
  assert_int_equal(saga_data_count(ok), 3);
  saga_data_free(ok);

  /* trailing bytes, and every truncation of a valid map */
  char *more = malloc(m.sb.size + 1);
  memcpy(more, m.sb.data, m.sb.size);
  more[m.sb.size] = (char)0xc0;
  expect_refused(more, m.sb.size + 1, NULL, SAGA_EMALFORMED, "trailing bytes");
  free(more);
  for (size_t n = 1; n < m.sb.size; n++)
    expect_refused(m.sb.data, n, NULL, SAGA_EMALFORMED, "truncated");
  msgpack_sbuffer_destroy(&m.sb);

  mp_init(&m); /* not a map */
  msgpack_pack_array(&m.pk, 0);
  expect_refused(m.sb.data, m.sb.size, NULL, SAGA_EMALFORMED, "expected map, got array");
  msgpack_sbuffer_destroy(&m.sb);

  static uint8_t deep[10000];
  memset(deep, 0x81, sizeof deep); /* {{{{... as keys, never closed */
  expect_refused(deep, sizeof deep, NULL, SAGA_EMALFORMED, "nesting");
  static const uint8_t lie[] = {0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, 'k'};
  expect_refused(lie, sizeof lie, NULL, SAGA_EMALFORMED, "truncated");
  static const uint8_t junk[] = {0xc1};
  expect_refused(junk, sizeof junk, NULL, SAGA_EMALFORMED, "not valid msgpack");
  expect_refused(NULL, 3, NULL, SAGA_EINVAL, "invalid");
  assert_int_equal(saga__data_decode(junk, 1, NULL, NULL, NULL, NULL, 0), SAGA_EINVAL);
}

static void test_codec_alloc_failures(void **state) {
  (void)state;
  saga_data *d = new_data(NULL);
  char k[16];
  for (int i = 0; i < 40; i++) {
    snprintf(k, sizeof k, "key%d", i);
    assert_int_equal(saga_data_set_i64(d, k, i * 1000), SAGA_OK);
  }
  th_alloc ta;
  th_alloc_init(&ta);
  saga__buf b;
  saga__buf_init(&b, &ta.a);
  for (uint64_t n = 1;; n++) { /* encode */
    ta.count = 0;
    ta.fail_at = n;
    int rc = saga__data_encode(d, &b);
    if (rc == SAGA_OK) break;
    assert_int_equal(rc, SAGA_ENOMEM);
    assert_int_equal(b.len, 0);
  }
  ta.fail_at = 0;
  uint64_t failures = 0;
  for (uint64_t n = 1;; n++) { /* decode */
    int64_t start = ta.live;
    saga_data *out = NULL;
    char err[128] = "";
    ta.count = 0;
    ta.fail_at = n;
    int rc = saga__data_decode(b.data, b.len, NULL, &ta.a, &out, err, sizeof err);
    ta.fail_at = 0;
    if (rc == SAGA_OK) {
      assert_int_equal(saga_data_count(out), 40);
      saga_data_free(out);
      assert_true(ta.live == start);
      break;
    }
    failures++;
    assert_int_equal(rc, SAGA_ENOMEM);
    assert_non_null(strstr(err, "memory"));
    assert_null(out);
    assert_true(ta.live == start);
  }
  assert_true(failures > 2);
  saga__buf_free(&b);
  assert_true(ta.live == 0);
  saga_data_free(d);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_new_free),
      cmocka_unit_test(test_set_get),
      cmocka_unit_test(test_set_refusals),
      cmocka_unit_test(test_replace_keeps_order),
      cmocka_unit_test(test_remove_at),
      cmocka_unit_test(test_merge),
      cmocka_unit_test(test_i64),
      cmocka_unit_test(test_alloc_failures),
      cmocka_unit_test(test_codec_round_trip),
      cmocka_unit_test(test_codec_refusals),
      cmocka_unit_test(test_codec_alloc_failures),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
