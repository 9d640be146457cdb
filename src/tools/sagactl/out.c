/* sagactl: text safe for a terminal, tables, times and durations, JSON helpers, and the saga
 * data map. */
#include <ctype.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "sagactl.h"

static void oom(void) {
  fputs("sagactl: out of memory\n", stderr);
  exit(SCTL_ERROR);
}

int sctl_err(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("sagactl: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  return SCTL_ERROR;
}

int sctl_usage(const char *cmd, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("sagactl: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  if (cmd != NULL)
    fprintf(stderr, "Try 'sagactl help %s'.\n", cmd);
  else
    fputs("Try 'sagactl --help'.\n", stderr);
  return SCTL_USAGE;
}

char *sctl_fmt(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *s = NULL;
  if (vasprintf(&s, fmt, ap) < 0) oom();
  va_end(ap);
  return s;
}

char *sctl_strdup(const char *s) {
  char *d = strdup(s != NULL ? s : "");
  if (d == NULL) oom();
  return d;
}

/* Length of the valid UTF-8 sequence at s (at most n bytes), its code point in *cp; 0 when
 * the bytes there are not a valid, shortest-form sequence. */
static size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp) {
  unsigned char c = s[0];
  size_t len;
  uint32_t v, min;
  if (c < 0x80) {
    *cp = c;
    return 1;
  } else if ((c & 0xe0) == 0xc0) {
    len = 2, v = c & 0x1f, min = 0x80;
  } else if ((c & 0xf0) == 0xe0) {
    len = 3, v = c & 0x0f, min = 0x800;
  } else if ((c & 0xf8) == 0xf0) {
    len = 4, v = c & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (len > n) return 0;
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xc0) != 0x80) return 0;
    v = (v << 6) | (s[i] & 0x3f);
  }
  if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) return 0;
  *cp = v;
  return len;
}

int sctl_utf8_valid(const char *s, size_t len) {
  const unsigned char *p = (const unsigned char *)s;
  size_t i = 0;
  while (i < len) {
    uint32_t cp;
    size_t k = utf8_seq(p + i, len - i, &cp);
    if (k == 0 || cp == 0) return 0;
    i += k;
  }
  return 1;
}

char *sctl_safe(const char *s, size_t len, size_t maxchars) {
  const unsigned char *p = (const unsigned char *)(s != NULL ? s : "");
  if (s == NULL) len = 0;
  /* Each input byte becomes at most 4 output bytes ("\xNN"), plus "..." and the NUL. */
  char *out = malloc(len * 4 + 4);
  if (out == NULL) oom();
  size_t o = 0, chars = 0, i = 0;
  while (i < len) {
    if (maxchars > 0 && chars == maxchars) {
      /* More than maxchars characters: say that the rest was cut. */
      memcpy(out + o, "...", 3);
      o += 3;
      break;
    }
    uint32_t cp;
    size_t k = utf8_seq(p + i, len - i, &cp);
    if (k == 0) { /* not UTF-8: show the byte */
      o += (size_t)sprintf(out + o, "\\x%02x", p[i]);
      i++;
    } else if (cp == '\\') {
      memcpy(out + o, "\\\\", 2), o += 2, i++;
    } else if (cp == '\n') {
      memcpy(out + o, "\\n", 2), o += 2, i++;
    } else if (cp == '\r') {
      memcpy(out + o, "\\r", 2), o += 2, i++;
    } else if (cp == '\t') {
      memcpy(out + o, "\\t", 2), o += 2, i++;
    } else if (cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp < 0xa0)) {
      /* C0 and C1 controls (ESC, CSI...) and DEL: never raw to a terminal. */
      for (size_t b = 0; b < k; b++) o += (size_t)sprintf(out + o, "\\x%02x", p[i + b]);
      i += k;
    } else {
      memcpy(out + o, p + i, k);
      o += k, i += k;
    }
    chars++;
  }
  out[o] = '\0';
  return out;
}

char *sctl_safe_str(const char *s, size_t maxchars) {
  return sctl_safe(s, s != NULL ? strlen(s) : 0, maxchars);
}

json_t *sctl_jstr(const char *s, size_t len) {
  if (s == NULL) s = "", len = 0;
  json_t *v;
  if (sctl_utf8_valid(s, len)) {
    v = json_stringn(s, len);
  } else {
    char *safe = sctl_safe(s, len, 0);
    v = json_string(safe);
    free(safe);
  }
  if (v == NULL) oom();
  return v;
}

json_t *sctl_jstr0(const char *s) { return sctl_jstr(s, s != NULL ? strlen(s) : 0); }

int sctl_json_print(json_t *v) {
  int rc = json_dumpf(v, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
  json_decref(v);
  if (rc != 0) return sctl_err("writing JSON failed");
  fputc('\n', stdout);
  return SCTL_OK;
}

int64_t sctl_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *sctl_iso(int64_t ms, char *buf, size_t len) {
  time_t secs = (time_t)(ms / 1000);
  struct tm tm;
  if (ms < 0 || gmtime_r(&secs, &tm) == NULL) {
    snprintf(buf, len, "-");
    return buf;
  }
  snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
           tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
  return buf;
}

const char *sctl_age(int64_t ms, char *buf, size_t len) {
  if (ms < 0) {
    snprintf(buf, len, "-");
  } else if (ms < 60000) {
    snprintf(buf, len, "%llds", (long long)(ms / 1000));
  } else if (ms < 3600000) {
    snprintf(buf, len, "%lldm", (long long)(ms / 60000));
  } else if (ms < 86400000) {
    snprintf(buf, len, "%lldh", (long long)(ms / 3600000));
  } else {
    snprintf(buf, len, "%lldd", (long long)(ms / 86400000));
  }
  return buf;
}

int64_t sctl_parse_duration(const char *s) {
  if (s == NULL || !isdigit((unsigned char)s[0])) return -1;
  char *end = NULL;
  unsigned long long n = strtoull(s, &end, 10);
  if (n > 1000000000ULL) return -1; /* beyond any sensible age, and no overflow below */
  int64_t unit;
  if (strcmp(end, "ms") == 0)
    unit = 1;
  else if (strcmp(end, "s") == 0)
    unit = 1000;
  else if (strcmp(end, "m") == 0)
    unit = 60000;
  else if (strcmp(end, "h") == 0)
    unit = 3600000;
  else if (strcmp(end, "d") == 0)
    unit = 86400000;
  else
    return -1;
  return (int64_t)n * unit;
}

int sctl_state_num(const char *name) {
  static const char *const names[] = {"RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED",
                                      "FAILED"};
  for (int i = 0; i < 5; i++)
    if (strcasecmp(name, names[i]) == 0) return i + 1;
  return 0;
}

/* ---- tables ---- */

void sctl_table_init(sctl_table *t, int ncols, const char *const *header) {
  memset(t, 0, sizeof *t);
  t->ncols = ncols;
  char **cells = malloc(sizeof(char *) * (size_t)ncols);
  if (cells == NULL) oom();
  for (int i = 0; i < ncols; i++) cells[i] = sctl_strdup(header[i]);
  sctl_table_row(t, cells);
  free(cells);
}

void sctl_table_row(sctl_table *t, char **cells) {
  if (t->nrows == t->cap) {
    size_t cap = t->cap ? t->cap * 2 : 16;
    char **c = realloc(t->cells, sizeof(char *) * cap * (size_t)t->ncols);
    if (c == NULL) oom();
    t->cells = c, t->cap = cap;
  }
  memcpy(t->cells + t->nrows * (size_t)t->ncols, cells, sizeof(char *) * (size_t)t->ncols);
  t->nrows++;
}

/* Display width: code points (the cells are already terminal-safe UTF-8). */
static size_t width(const char *s) {
  size_t w = 0;
  for (; *s; s++)
    if (((unsigned char)*s & 0xc0) != 0x80) w++;
  return w;
}

void sctl_table_print(const sctl_table *t, FILE *f) {
  size_t *w = calloc((size_t)t->ncols, sizeof *w);
  if (w == NULL) oom();
  for (size_t r = 0; r < t->nrows; r++)
    for (int c = 0; c < t->ncols; c++) {
      size_t x = width(t->cells[r * (size_t)t->ncols + (size_t)c]);
      if (x > w[c]) w[c] = x;
    }
  for (size_t r = 0; r < t->nrows; r++) {
    char **row = t->cells + r * (size_t)t->ncols;
    int last = t->ncols - 1; /* no padding after the last cell that has text */
    while (last > 0 && row[last][0] == '\0') last--;
    for (int c = 0; c <= last; c++) {
      fputs(row[c], f);
      if (c < last)
        for (size_t pad = width(row[c]); pad < w[c] + 2; pad++) fputc(' ', f);
    }
    fputc('\n', f);
  }
  free(w);
}

void sctl_table_free(sctl_table *t) {
  for (size_t i = 0; i < t->nrows * (size_t)t->ncols; i++) free(t->cells[i]);
  free(t->cells);
  memset(t, 0, sizeof *t);
}

int sctl_emit(int rc, json_t *arr, sctl_table *t) {
  if (arr != NULL) {
    if (rc == SCTL_OK) return sctl_json_print(arr);
    json_decref(arr);
  }
  if (t != NULL) {
    if (rc == SCTL_OK) sctl_table_print(t, stdout);
    sctl_table_free(t);
  }
  return rc;
}

/* ---- the saga data map: msgpack map (str -> bin), read with bounds checks ---- */

/* Reads a big-endian unsigned of n bytes at *p, if n bytes remain. */
static int rd(const unsigned char **p, const unsigned char *end, size_t n, uint64_t *out) {
  if ((size_t)(end - *p) < n) return -1;
  uint64_t v = 0;
  for (size_t i = 0; i < n; i++) v = (v << 8) | (*p)[i];
  *p += n;
  *out = v;
  return 0;
}

int sctl_data_walk(const void *buf, size_t len, sctl_data_cb cb, void *arg, const char **err) {
  const unsigned char *p = buf, *end = p + len;
  uint64_t n = 0, l = 0;
  if (len == 0) return 0; /* no data */
  unsigned char c = *p++;
  if ((c & 0xf0) == 0x80)
    n = c & 0x0f;
  else if (c == 0xde) {
    if (rd(&p, end, 2, &n)) goto trunc;
  } else if (c == 0xdf) {
    if (rd(&p, end, 4, &n)) goto trunc;
  } else {
    *err = "not a msgpack map";
    return -1;
  }
  /* Every entry takes at least 2 bytes: a declared count beyond that is a lie. */
  if (n > (uint64_t)(end - p) / 2) goto trunc;
  for (uint64_t i = 0; i < n; i++) {
    if (p >= end) goto trunc;
    c = *p++;
    if ((c & 0xe0) == 0xa0)
      l = c & 0x1f;
    else if (c == 0xd9) {
      if (rd(&p, end, 1, &l)) goto trunc;
    } else if (c == 0xda) {
      if (rd(&p, end, 2, &l)) goto trunc;
    } else if (c == 0xdb) {
      if (rd(&p, end, 4, &l)) goto trunc;
    } else {
      *err = "a key is not a string";
      return -1;
    }
    if (l > (uint64_t)(end - p)) goto trunc;
    const char *key = (const char *)p;
    size_t klen = (size_t)l;
    p += l;
    if (p >= end) goto trunc;
    c = *p++;
    if (c == 0xc4) {
      if (rd(&p, end, 1, &l)) goto trunc;
    } else if (c == 0xc5) {
      if (rd(&p, end, 2, &l)) goto trunc;
    } else if (c == 0xc6) {
      if (rd(&p, end, 4, &l)) goto trunc;
    } else {
      *err = "a value is not binary";
      return -1;
    }
    if (l > (uint64_t)(end - p)) goto trunc;
    cb(arg, key, klen, p, (size_t)l);
    p += l;
  }
  if (p != end) {
    *err = "trailing bytes after the map";
    return -1;
  }
  return 0;
trunc:
  *err = "truncated";
  return -1;
}
