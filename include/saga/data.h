/**
 * @file
 * libsaga — saga data: a small map of string keys to byte-string values.
 *
 * The saga's data starts as the input given to saga_start() and is extended by each step's
 * reply (keys in a reply overwrite keys of the same name). Commands carry the whole current
 * map to the participant. Values are opaque bytes; the _str and _i64 helpers store text.
 * On the wire the map is a msgpack map of str → bin.
 *
 * Thread: a saga_data is a plain value; use one from one thread at a time.
 */
#ifndef SAGA_DATA_H
#define SAGA_DATA_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** A saga's data: string keys to byte-string values, kept in key order. Opaque; made by
 * saga_data_new() and freed by saga_data_free(). */
typedef struct saga_data saga_data;

/**
 * Creates an empty map. `alloc` may be NULL (C library allocator); it is copied.
 * Returns SAGA_OK and sets *out, or SAGA_EINVAL (out NULL) / SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_data_new(saga_data **out, const saga_allocator *alloc);

/** Frees the map and every key and value. Accepts NULL. */
SAGA_EXTERN void saga_data_free(saga_data *d);

/**
 * Sets key to a copy of the len bytes at val (val may be NULL when len is 0). An existing
 * key is replaced. Keys are NUL-terminated, 1..1024 bytes.
 * Returns SAGA_OK, SAGA_EINVAL (NULL map/key, empty or over-long key), SAGA_ENOMEM.
 * On failure the map is unchanged.
 */
SAGA_EXTERN int saga_data_set(saga_data *d, const char *key, const void *val, size_t len);

/** saga_data_set() with the bytes of the NUL-terminated string val (without the NUL). */
SAGA_EXTERN int saga_data_set_str(saga_data *d, const char *key, const char *val);

/** Stores v as decimal text. */
SAGA_EXTERN int saga_data_set_i64(saga_data *d, const char *key, int64_t v);

/**
 * Looks key up. On SAGA_OK, *val and *len describe the value, borrowed until the key is set
 * again or the map is freed; the value is always followed by a NUL byte not counted in *len,
 * so text values can be used as C strings. Returns SAGA_ENOTFOUND when absent.
 * val or len may be NULL when not wanted.
 */
SAGA_EXTERN int saga_data_get(const saga_data *d, const char *key, const void **val,
                              size_t *len);

/** The value as a C string, or NULL when absent. Borrowed as for saga_data_get(). */
SAGA_EXTERN const char *saga_data_get_str(const saga_data *d, const char *key);

/**
 * Parses the value as a decimal int64 into *out. SAGA_ENOTFOUND when absent, SAGA_EINVAL
 * when the value is not exactly a decimal integer in range.
 */
SAGA_EXTERN int saga_data_get_i64(const saga_data *d, const char *key, int64_t *out);

/** Removes key. SAGA_OK, or SAGA_ENOTFOUND when absent. */
SAGA_EXTERN int saga_data_remove(saga_data *d, const char *key);

/** Number of keys (0 for NULL). */
SAGA_EXTERN size_t saga_data_count(const saga_data *d);

/**
 * The i-th entry in insertion order (0 <= i < count). Pointers borrowed as for
 * saga_data_get(). Returns SAGA_ENOTFOUND when i is out of range.
 */
SAGA_EXTERN int saga_data_at(const saga_data *d, size_t i, const char **key, const void **val,
                             size_t *len);

/** Copies every entry of src into dst (overwriting equal keys). SAGA_ENOMEM leaves dst
 * partially merged but valid. */
SAGA_EXTERN int saga_data_merge(saga_data *dst, const saga_data *src);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_DATA_H */
