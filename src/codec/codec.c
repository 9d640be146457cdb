/* The msgpack codec for envelopes and saga data; the only file that includes msgpack.h.
 *
 * Decoding trusts nothing: the input is first walked without allocating (scan()), because
 * msgpack-c sizes every array and map from its declared count before reading the elements,
 * and then unpacked and checked field by field against the one layout we write. */
#include <inttypes.h>
#include <string.h>

#include <msgpack.h>

#include "../internal.h"

#define FIELDS 13
/* The envelope nests two levels (array, headers map); anything deeper is malformed anyway,
 * and stopping early keeps msgpack-c well inside its fixed parse stack of 32 levels. */
#define MAX_DEPTH 4
/* data.h: keys are 1..1024 bytes. */
#define DATA_KEY_MAX 1024

/* ---- encoding -------------------------------------------------------------------------- */

/* The packer's write target. The first failure sticks, so the pack calls need no checks. */
typedef struct sink {
  saga__buf *buf;
  int rc;
} sink;

static int sink_write(void *data, const char *p, size_t n) {
  sink *s = data;
  if (s->rc == SAGA_OK) s->rc = saga__buf_append(s->buf, p, n);
  return s->rc == SAGA_OK ? 0 : -1;
}

/* msgpack lengths are 32-bit; a longer value cannot be written, so refuse it. */
static void pack_raw(msgpack_packer *pk, int bin, const void *p, size_t n) {
  sink *s = pk->data;
  if (n > UINT32_MAX) {
    if (s->rc == SAGA_OK) s->rc = SAGA_EINVAL;
    return;
  }
  if (bin) {
    msgpack_pack_bin(pk, n);
    msgpack_pack_bin_body(pk, p, n);
  } else {
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, p, n);
  }
}

static void pack_str(msgpack_packer *pk, const char *s) {
  pack_raw(pk, 0, s != NULL ? s : "", s != NULL ? strlen(s) : 0);
}

int saga__envelope_encode_buf(const saga_envelope *env, saga__buf *out) {
  if (env == NULL || out == NULL || (env->headers == NULL && env->nheaders > 0) ||
      (env->payload == NULL && env->payload_len > 0) || env->nheaders > UINT32_MAX)
    return SAGA_EINVAL;
  if ((int)env->kind < SAGA_MSG_COMMAND || (int)env->kind > SAGA_MSG_EVENT ||
      (int)env->phase < SAGA_PHASE_ACTION || (int)env->phase > SAGA_PHASE_RESOLVE)
    return SAGA_EINVAL;
  size_t start = out->len;
  sink s = {out, SAGA_OK};
  msgpack_packer pk;
  msgpack_packer_init(&pk, &s, sink_write);
  msgpack_pack_array(&pk, FIELDS);
  /* This library speaks one version, so it writes that one whatever env->version says. */
  msgpack_pack_uint32(&pk, SAGA_ENVELOPE_VERSION);
  msgpack_pack_uint32(&pk, (uint32_t)env->kind);
  pack_str(&pk, env->msg_id);
  pack_str(&pk, env->saga_id);
  msgpack_pack_uint32(&pk, env->step);
  msgpack_pack_uint32(&pk, env->attempt);
  msgpack_pack_uint32(&pk, (uint32_t)env->phase);
  pack_str(&pk, env->name);
  pack_str(&pk, env->reply_to);
  msgpack_pack_int32(&pk, env->status);
  pack_str(&pk, env->error);
  msgpack_pack_map(&pk, env->nheaders);
  for (size_t i = 0; i < env->nheaders; i++) {
    pack_str(&pk, env->headers[i].name);
    pack_str(&pk, env->headers[i].value);
  }
  pack_raw(&pk, 1, env->payload, env->payload_len);
  if (s.rc != SAGA_OK) out->len = start;
  return s.rc;
}

int saga_envelope_encode(const saga_envelope *env, const saga_allocator *alloc, void **out,
                         size_t *outlen) {
  if (out == NULL || outlen == NULL) return SAGA_EINVAL;
  saga__buf b;
  saga__buf_init(&b, alloc);
  int rc = saga__envelope_encode_buf(env, &b);
  if (rc != SAGA_OK) goto fail;
  *out = b.data;
  *outlen = b.len;
  return SAGA_OK;
fail:
  saga__buf_free(&b);
  return rc;
}

int saga__data_encode(const saga_data *d, saga__buf *out) {
  if (out == NULL) return SAGA_EINVAL;
  size_t start = out->len, n = saga_data_count(d);
  sink s = {out, SAGA_OK};
  msgpack_packer pk;
  msgpack_packer_init(&pk, &s, sink_write);
  msgpack_pack_map(&pk, n);
  for (size_t i = 0; i < n; i++) {
    const char *key;
    const void *val;
    size_t len;
    saga_data_at(d, i, &key, &val, &len);
    pack_str(&pk, key);
    pack_raw(&pk, 1, val, len);
  }
  if (s.rc != SAGA_OK) out->len = start;
  return s.rc;
}

/* ---- decoding -------------------------------------------------------------------------- */

/* What the length after a type byte counts. */
enum { NONE, BYTES, ITEMS, PAIRS };

/* For type bytes 0xc0..0xdf: the size of the fixed part (type byte, length, ext type and any
 * fixed-size value), the width of the big-endian length at byte 1, and what it counts.
 * size 0 marks 0xc1, which msgpack never uses. */
static const struct {
  uint8_t size, width, counts;
} mp_types[32] = {
    {1, 0, NONE},  {0, 0, NONE},  {1, 0, NONE},  {1, 0, NONE},  /* nil, -, false, true */
    {2, 1, BYTES}, {3, 2, BYTES}, {5, 4, BYTES},                /* bin 8/16/32 */
    {3, 1, BYTES}, {4, 2, BYTES}, {6, 4, BYTES},                /* ext 8/16/32 */
    {5, 0, NONE},  {9, 0, NONE},                                /* float 32/64 */
    {2, 0, NONE},  {3, 0, NONE},  {5, 0, NONE},  {9, 0, NONE},  /* uint 8..64 */
    {2, 0, NONE},  {3, 0, NONE},  {5, 0, NONE},  {9, 0, NONE},  /* int 8..64 */
    {3, 0, NONE},  {4, 0, NONE},  {6, 0, NONE},  {10, 0, NONE}, /* fixext 1/2/4/8 */
    {18, 0, NONE},                                              /* fixext 16 */
    {2, 1, BYTES}, {3, 2, BYTES}, {5, 4, BYTES},                /* str 8/16/32 */
    {3, 2, ITEMS}, {5, 4, ITEMS},                               /* array 16/32 */
    {3, 2, PAIRS}, {5, 4, PAIRS},                               /* map 16/32 */
};

/*
 * Walks the first object of p without allocating and refuses what msgpack-c would turn into
 * trouble: nesting deeper than MAX_DEPTH, and containers declaring more elements than bytes
 * remain (each element takes at least one), so that unpacking allocates in proportion to
 * len. Everything else (truncation inside a value, bad type bytes, trailing bytes) is left to
 * msgpack_unpack(), which reports it.
 */
static int scan(const uint8_t *p, size_t len, char *err, size_t errlen) {
  uint64_t open[MAX_DEPTH]; /* elements still expected by each open container */
  size_t depth = 0, pos = 0;
  while (pos < len) {
    uint8_t t = p[pos];
    size_t size = 1;
    uint64_t n = 0;
    int counts = NONE;
    if (t >= 0x80 && t <= 0x8f) {
      n = t & 0x0f, counts = PAIRS;
    } else if (t >= 0x90 && t <= 0x9f) {
      n = t & 0x0f, counts = ITEMS;
    } else if (t >= 0xa0 && t <= 0xbf) {
      n = t & 0x1f, counts = BYTES;
    } else if (t >= 0xc0 && t <= 0xdf) {
      size = mp_types[t - 0xc0].size;
      counts = mp_types[t - 0xc0].counts;
      if (size == 0 || size > len - pos) return SAGA_OK;
      for (unsigned i = 0; i < mp_types[t - 0xc0].width; i++) n = n << 8 | p[pos + 1 + i];
    }
    pos += size;
    if (counts == BYTES) {
      if (n > len - pos) return SAGA_OK;
      pos += n;
    } else if (counts != NONE) {
      uint64_t objs = counts == PAIRS ? 2 * n : n;
      if (objs > len - pos) {
        saga__errf(err, errlen,
                   "truncated: %s at offset %zu declares %" PRIu64 " %s but only %zu bytes follow",
                   counts == PAIRS ? "map" : "array", pos - size, n,
                   counts == PAIRS ? "entries" : "elements", len - pos);
        return SAGA_EMALFORMED;
      }
      if (objs > 0) {
        if (depth == MAX_DEPTH) {
          saga__errf(err, errlen, "nesting deeper than %d levels at offset %zu", MAX_DEPTH,
                     pos - size);
          return SAGA_EMALFORMED;
        }
        open[depth++] = objs;
        continue;
      }
    }
    /* An object is complete: it may complete its container, and so on upwards. */
    while (depth > 0 && --open[depth - 1] == 0) depth--;
    if (depth == 0) return SAGA_OK;
  }
  return SAGA_OK;
}

static const char *type_name(msgpack_object_type t) {
  switch (t) {
  case MSGPACK_OBJECT_NIL:
    return "nil";
  case MSGPACK_OBJECT_BOOLEAN:
    return "boolean";
  case MSGPACK_OBJECT_POSITIVE_INTEGER:
    return "unsigned integer";
  case MSGPACK_OBJECT_NEGATIVE_INTEGER:
    return "negative integer";
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64:
    return "float";
  case MSGPACK_OBJECT_STR:
    return "string";
  case MSGPACK_OBJECT_ARRAY:
    return "array";
  case MSGPACK_OBJECT_MAP:
    return "map";
  case MSGPACK_OBJECT_BIN:
    return "binary";
  case MSGPACK_OBJECT_EXT:
    return "extension";
  }
  return "unknown type";
}

/* Unpacks exactly one object filling all len bytes into z. what names it in messages. */
static int unpack_one(const void *buf, size_t len, msgpack_zone *z, msgpack_object *obj,
                      const char *what, char *err, size_t errlen) {
  int rc = scan(buf, len, err, errlen);
  if (rc != SAGA_OK) return rc;
  size_t off = 0;
  switch (msgpack_unpack(buf, len, &off, z, obj)) {
  case MSGPACK_UNPACK_SUCCESS:
    return SAGA_OK;
  case MSGPACK_UNPACK_EXTRA_BYTES:
    saga__errf(err, errlen, "trailing bytes after %s: %zu of %zu bytes unused", what,
               len - off, len);
    return SAGA_EMALFORMED;
  case MSGPACK_UNPACK_CONTINUE:
    saga__errf(err, errlen, "truncated %s: %zu bytes end inside a value", what, len);
    return SAGA_EMALFORMED;
  case MSGPACK_UNPACK_NOMEM_ERROR:
    /* scan() bounded nesting and sizes, so this is a real allocation failure. */
    saga__errf(err, errlen, "out of memory unpacking %s", what);
    return SAGA_ENOMEM;
  default:
    saga__errf(err, errlen, "%s is not valid msgpack", what);
    return SAGA_EMALFORMED;
  }
}

/* Checks that o is a string of at most max bytes without NUL bytes; otherwise writes why it
 * is not (a phrase, for the caller to put after the field's name). */
static int check_str(const msgpack_object *o, size_t max, char *why, size_t whylen) {
  if (o->type != MSGPACK_OBJECT_STR) {
    saga__errf(why, whylen, "expected string, got %s", type_name(o->type));
    return -1;
  }
  if (o->via.str.size > max) {
    saga__errf(why, whylen, "string of %" PRIu32 " bytes exceeds the limit of %zu",
               o->via.str.size, max);
    return -1;
  }
  /* msgpack-c gives empty strings a NULL pointer, which memchr must not see. */
  if (o->via.str.size > 0 && memchr(o->via.str.ptr, '\0', o->via.str.size) != NULL) {
    saga__errf(why, whylen, "string contains a NUL byte");
    return -1;
  }
  return 0;
}

/* A decoded envelope and the allocator its block came from, in that one block. */
typedef struct envelope_block {
  saga_envelope env;
  saga_allocator alloc;
} envelope_block;

enum {
  F_VERSION, F_KIND, F_MSG_ID, F_SAGA_ID, F_STEP, F_ATTEMPT, F_PHASE,
  F_NAME, F_REPLY_TO, F_STATUS, F_ERROR, F_HEADERS, F_PAYLOAD
};

/* The layout of envelope.h: each field's name and msgpack type. status alone may also be a
 * negative integer. */
static const struct {
  const char *name;
  msgpack_object_type type;
} fields[FIELDS] = {
    {"version", MSGPACK_OBJECT_POSITIVE_INTEGER}, {"kind", MSGPACK_OBJECT_POSITIVE_INTEGER},
    {"msg_id", MSGPACK_OBJECT_STR},               {"saga_id", MSGPACK_OBJECT_STR},
    {"step", MSGPACK_OBJECT_POSITIVE_INTEGER},    {"attempt", MSGPACK_OBJECT_POSITIVE_INTEGER},
    {"phase", MSGPACK_OBJECT_POSITIVE_INTEGER},   {"name", MSGPACK_OBJECT_STR},
    {"reply_to", MSGPACK_OBJECT_STR},             {"status", MSGPACK_OBJECT_POSITIVE_INTEGER},
    {"error", MSGPACK_OBJECT_STR},                {"headers", MSGPACK_OBJECT_MAP},
    {"payload", MSGPACK_OBJECT_BIN},
};

/* Checks every field of the unpacked array f (FIELDS long) against fields[] and lim. */
static int check_fields(const msgpack_object *f, const saga_limits *lim, char *err,
                        size_t errlen) {
  char why[96];
  for (int i = 0; i < FIELDS; i++) {
    const msgpack_object *o = &f[i];
    const char *name = fields[i].name;
    if (i == F_STATUS) {
      int pos = o->type == MSGPACK_OBJECT_POSITIVE_INTEGER;
      if (!pos && o->type != MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        saga__errf(err, errlen, "field '%s': expected integer, got %s", name,
                   type_name(o->type));
        return SAGA_EMALFORMED;
      }
      if (pos ? o->via.u64 > INT32_MAX : o->via.i64 < INT32_MIN) {
        saga__errf(err, errlen, "field '%s': value out of the int32 range", name);
        return SAGA_EMALFORMED;
      }
    } else if (fields[i].type == MSGPACK_OBJECT_STR) {
      if (check_str(o, lim->max_string_bytes, why, sizeof why) != 0) {
        saga__errf(err, errlen, "field '%s': %s", name, why);
        return SAGA_EMALFORMED;
      }
    } else if (o->type != fields[i].type) {
      saga__errf(err, errlen, "field '%s': expected %s, got %s", name,
                 type_name(fields[i].type), type_name(o->type));
      return SAGA_EMALFORMED;
    } else if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 > UINT32_MAX) {
      saga__errf(err, errlen, "field '%s': %" PRIu64 " is out of the uint32 range", name,
                 o->via.u64);
      return SAGA_EMALFORMED;
    }
  }
  if (f[F_KIND].via.u64 < SAGA_MSG_COMMAND || f[F_KIND].via.u64 > SAGA_MSG_EVENT) {
    saga__errf(err, errlen, "field 'kind': unknown message kind %" PRIu64, f[F_KIND].via.u64);
    return SAGA_EMALFORMED;
  }
  if (f[F_PHASE].via.u64 > SAGA_PHASE_RESOLVE) {
    saga__errf(err, errlen, "field 'phase': unknown phase %" PRIu64, f[F_PHASE].via.u64);
    return SAGA_EMALFORMED;
  }
  const msgpack_object_map *h = &f[F_HEADERS].via.map;
  if (h->size > lim->max_headers) {
    saga__errf(err, errlen, "field 'headers': %" PRIu32 " entries exceed the limit of %zu",
               h->size, lim->max_headers);
    return SAGA_EMALFORMED;
  }
  for (uint32_t i = 0; i < h->size; i++) {
    if (check_str(&h->ptr[i].key, lim->max_string_bytes, why, sizeof why) != 0) {
      saga__errf(err, errlen, "field 'headers': name of entry %" PRIu32 ": %s", i, why);
      return SAGA_EMALFORMED;
    }
    if (check_str(&h->ptr[i].val, lim->max_string_bytes, why, sizeof why) != 0) {
      saga__errf(err, errlen, "field 'headers': value of entry %" PRIu32 ": %s", i, why);
      return SAGA_EMALFORMED;
    }
    /* Duplicates would make saga_envelope_header() silently pick one. */
    for (uint32_t j = 0; j < i; j++) {
      const msgpack_object_str *a = &h->ptr[i].key.via.str, *b = &h->ptr[j].key.via.str;
      if (a->size == b->size && memcmp(a->ptr, b->ptr, a->size) == 0) {
        saga__errf(err, errlen, "field 'headers': duplicate name '%.*s'", (int)a->size,
                   a->ptr);
        return SAGA_EMALFORMED;
      }
    }
  }
  return SAGA_OK;
}

/* Copies s into *cur as a C string and advances *cur past its NUL. */
static const char *put_str(char **cur, const msgpack_object *s) {
  char *p = *cur;
  if (s->via.str.size > 0) memcpy(p, s->via.str.ptr, s->via.str.size);
  p[s->via.str.size] = '\0';
  *cur = p + s->via.str.size + 1;
  return p;
}

/* Copies the checked fields f into one block: the struct, the header array, then every
 * string and the payload. Sizes are bounded by the input's length, so the sum cannot wrap. */
static saga_envelope *build(const msgpack_object *f, const saga_allocator *alloc) {
  static const int strs[] = {F_MSG_ID, F_SAGA_ID, F_NAME, F_REPLY_TO, F_ERROR};
  const msgpack_object_map *hm = &f[F_HEADERS].via.map;
  const msgpack_object_bin *pl = &f[F_PAYLOAD].via.bin;
  size_t total = sizeof(envelope_block) + hm->size * sizeof(saga_header) + pl->size;
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
    total += f[strs[i]].via.str.size + 1;
  for (uint32_t i = 0; i < hm->size; i++)
    total += hm->ptr[i].key.via.str.size + hm->ptr[i].val.via.str.size + 2;
  const saga_allocator *a = saga__alloc_resolve(alloc);
  envelope_block *b = saga__malloc(a, total);
  if (b == NULL) return NULL;
  b->alloc = *a;
  saga_envelope *e = &b->env;
  saga_header *hdrs = (saga_header *)(b + 1); /* sizeof keeps pointer alignment */
  char *cur = (char *)(hdrs + hm->size);
  e->version = SAGA_ENVELOPE_VERSION;
  e->kind = (saga_msg_kind)f[F_KIND].via.u64;
  e->msg_id = put_str(&cur, &f[F_MSG_ID]);
  e->saga_id = put_str(&cur, &f[F_SAGA_ID]);
  e->step = (uint32_t)f[F_STEP].via.u64;
  e->attempt = (uint32_t)f[F_ATTEMPT].via.u64;
  e->phase = (saga_phase)f[F_PHASE].via.u64;
  e->name = put_str(&cur, &f[F_NAME]);
  e->reply_to = put_str(&cur, &f[F_REPLY_TO]);
  e->status = (int32_t)f[F_STATUS].via.i64;
  e->error = put_str(&cur, &f[F_ERROR]);
  for (uint32_t i = 0; i < hm->size; i++) {
    hdrs[i].name = put_str(&cur, &hm->ptr[i].key);
    hdrs[i].value = put_str(&cur, &hm->ptr[i].val);
  }
  e->headers = hdrs;
  e->nheaders = hm->size;
  if (pl->size > 0) memcpy(cur, pl->ptr, pl->size);
  e->payload = cur;
  e->payload_len = pl->size;
  return e;
}

int saga_envelope_decode(const void *buf, size_t len, const saga_limits *lim,
                         const saga_allocator *alloc, saga_envelope **out, char *err,
                         size_t errlen) {
  if ((buf == NULL && len > 0) || out == NULL) {
    saga__errf(err, errlen, "invalid argument");
    return SAGA_EINVAL;
  }
  saga_limits dflt;
  if (lim == NULL) {
    saga_limits_init(&dflt);
    lim = &dflt;
  }
  if (len > lim->max_message_bytes) {
    saga__errf(err, errlen, "envelope of %zu bytes exceeds the limit of %zu", len,
               lim->max_message_bytes);
    return SAGA_ETOOBIG;
  }
  msgpack_zone z;
  if (!msgpack_zone_init(&z, MSGPACK_ZONE_CHUNK_SIZE)) {
    saga__errf(err, errlen, "out of memory unpacking envelope");
    return SAGA_ENOMEM;
  }
  msgpack_object root;
  int rc = unpack_one(buf, len, &z, &root, "envelope", err, errlen);
  if (rc != SAGA_OK) goto fail;
  rc = SAGA_EMALFORMED;
  if (root.type != MSGPACK_OBJECT_ARRAY) {
    saga__errf(err, errlen, "envelope: expected array, got %s", type_name(root.type));
    goto fail;
  }
  const msgpack_object *f = root.via.array.ptr;
  /* The version comes before the arity: another version may have another layout. */
  if (root.via.array.size > 0 && f[0].type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
    saga__errf(err, errlen, "field 'version': unsupported envelope version %" PRId64,
               f[0].via.i64);
    rc = SAGA_EVERSION;
    goto fail;
  }
  if (root.via.array.size > 0 && f[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
      f[0].via.u64 != SAGA_ENVELOPE_VERSION) {
    saga__errf(err, errlen,
               "field 'version': unsupported envelope version %" PRIu64
               " (this library reads %d)",
               f[0].via.u64, SAGA_ENVELOPE_VERSION);
    rc = SAGA_EVERSION;
    goto fail;
  }
  if (root.via.array.size != FIELDS) {
    saga__errf(err, errlen, "envelope: expected an array of %d fields, got %" PRIu32, FIELDS,
               root.via.array.size);
    goto fail;
  }
  rc = check_fields(f, lim, err, errlen);
  if (rc != SAGA_OK) goto fail;
  saga_envelope *e = build(f, alloc);
  if (e == NULL) {
    saga__errf(err, errlen, "out of memory copying envelope");
    rc = SAGA_ENOMEM;
    goto fail;
  }
  *out = e;
fail:
  msgpack_zone_destroy(&z);
  return rc;
}

void saga_envelope_free(saga_envelope *env) {
  if (env == NULL) return;
  envelope_block *b = (envelope_block *)env;
  saga_allocator a = b->alloc; /* lives in the block being freed */
  saga__free(&a, b);
}

const char *saga_envelope_header(const saga_envelope *env, const char *name) {
  if (env == NULL || name == NULL) return NULL;
  for (size_t i = 0; i < env->nheaders; i++)
    if (strcmp(env->headers[i].name, name) == 0) return env->headers[i].value;
  return NULL;
}

/* Fills the empty map d from the len > 0 bytes at buf. */
static int fill_data(saga_data *d, const void *buf, size_t len, const saga_limits *lim,
                     char *err, size_t errlen) {
  msgpack_zone z;
  if (!msgpack_zone_init(&z, MSGPACK_ZONE_CHUNK_SIZE)) {
    saga__errf(err, errlen, "out of memory unpacking saga data");
    return SAGA_ENOMEM;
  }
  msgpack_object root;
  int rc = unpack_one(buf, len, &z, &root, "saga data", err, errlen);
  if (rc != SAGA_OK) goto fail;
  rc = SAGA_EMALFORMED;
  if (root.type != MSGPACK_OBJECT_MAP) {
    saga__errf(err, errlen, "saga data: expected map, got %s", type_name(root.type));
    goto fail;
  }
  const msgpack_object_map *m = &root.via.map;
  if (m->size > lim->max_data_entries) {
    saga__errf(err, errlen, "saga data: %" PRIu32 " entries exceed the limit of %zu", m->size,
               lim->max_data_entries);
    goto fail;
  }
  size_t kmax = lim->max_string_bytes < DATA_KEY_MAX ? lim->max_string_bytes : DATA_KEY_MAX;
  char key[DATA_KEY_MAX + 1], why[96];
  for (uint32_t i = 0; i < m->size; i++) {
    const msgpack_object *k = &m->ptr[i].key, *v = &m->ptr[i].val;
    if (check_str(k, kmax, why, sizeof why) != 0) {
      saga__errf(err, errlen, "saga data: key of entry %" PRIu32 ": %s", i, why);
      goto fail;
    }
    if (k->via.str.size == 0) {
      saga__errf(err, errlen, "saga data: key of entry %" PRIu32 " is empty", i);
      goto fail;
    }
    memcpy(key, k->via.str.ptr, k->via.str.size);
    key[k->via.str.size] = '\0';
    if (v->type != MSGPACK_OBJECT_BIN) {
      saga__errf(err, errlen, "saga data: value of '%s': expected binary, got %s", key,
                 type_name(v->type));
      goto fail;
    }
    if (saga_data_get(d, key, NULL, NULL) == SAGA_OK) {
      saga__errf(err, errlen, "saga data: duplicate key '%s'", key);
      goto fail;
    }
    if (saga_data_set(d, key, v->via.bin.ptr, v->via.bin.size) != SAGA_OK) {
      saga__errf(err, errlen, "out of memory decoding saga data");
      rc = SAGA_ENOMEM;
      goto fail;
    }
  }
  rc = SAGA_OK;
fail:
  msgpack_zone_destroy(&z);
  return rc;
}

int saga__data_decode(const void *buf, size_t len, const saga_limits *lim,
                      const saga_allocator *a, saga_data **out, char *err, size_t errlen) {
  if ((buf == NULL && len > 0) || out == NULL) {
    saga__errf(err, errlen, "invalid argument");
    return SAGA_EINVAL;
  }
  saga_limits dflt;
  if (lim == NULL) {
    saga_limits_init(&dflt);
    lim = &dflt;
  }
  saga_data *d = NULL;
  int rc = saga_data_new(&d, a);
  if (rc != SAGA_OK) {
    saga__errf(err, errlen, "out of memory decoding saga data");
    goto fail;
  }
  if (len > 0) {
    rc = fill_data(d, buf, len, lim, err, errlen);
    if (rc != SAGA_OK) goto fail;
  }
  *out = d;
  return SAGA_OK;
fail:
  saga_data_free(d);
  return rc;
}
