/*
 * W3C trace context (saga/trace.h): the strict check of a traceparent, its parts, and span ids
 * from the environment's CSPRNG.
 */
#include <stdio.h>
#include <string.h>

#include "core.h"

static int lower_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

/* n lowercase hex digits at s, not all '0' when nonzero is set; *why says what is wrong. */
static int hex_field(const char *s, size_t n, int nonzero, const char **why, const char *what) {
  int any = 0;
  for (size_t k = 0; k < n; k++) {
    if (!lower_hex(s[k])) {
      *why = what;
      return 0;
    }
    any |= s[k] != '0';
  }
  if (nonzero && !any) {
    *why = what;
    return 0;
  }
  return 1;
}

int saga_traceparent_check(const char *tp, const char **why_out) {
  const char *why = NULL;
  const char *dummy;
  if (why_out == NULL) why_out = &dummy;
  *why_out = "";
  if (tp == NULL) {
    *why_out = "traceparent is NULL";
    return SAGA_EINVAL;
  }
  size_t len = strnlen(tp, SAGA_TRACEPARENT_LEN + 1);
  if (len != SAGA_TRACEPARENT_LEN)
    why = "a traceparent of version 00 is 55 characters: "
          "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>";
  else if (tp[0] != '0' || tp[1] != '0')
    why = "only traceparent version 00 is accepted";
  else if (tp[2] != '-' || tp[35] != '-' || tp[52] != '-')
    why = "traceparent fields must be separated by '-'";
  else if (hex_field(tp + 3, 32, 1, &why, "the trace id must be 32 lowercase hex digits, "
                                          "not all zero") &&
           hex_field(tp + 36, 16, 1, &why, "the parent id must be 16 lowercase hex digits, "
                                           "not all zero"))
    hex_field(tp + 53, 2, 0, &why, "the flags must be 2 lowercase hex digits");
  if (why != NULL) {
    *why_out = why;
    return SAGA_EINVAL;
  }
  return SAGA_OK;
}

const char *saga_span_kind_name(int kind) {
  static const char *const names[] = {"unknown", "saga", "step", "compensation", "resolve",
                                      "handler"};
  return kind >= 1 && kind <= 5 ? names[kind] : names[0];
}

int saga__trace_parse(const char *tp, saga__trace *out) {
  if (saga_traceparent_check(tp, NULL) != SAGA_OK) return SAGA_EINVAL;
  memcpy(out->trace_id, tp + 3, 32);
  out->trace_id[32] = '\0';
  memcpy(out->span_id, tp + 36, 16);
  out->span_id[16] = '\0';
  int hi = tp[53] <= '9' ? tp[53] - '0' : tp[53] - 'a' + 10;
  int lo = tp[54] <= '9' ? tp[54] - '0' : tp[54] - 'a' + 10;
  out->flags = (uint8_t)(hi << 4 | lo);
  return SAGA_OK;
}

int saga__trace_id_ok(const char *id) {
  const char *why;
  return strnlen(id, 33) == 32 && hex_field(id, 32, 1, &why, "");
}

void saga__trace_format(char out[SAGA__TRACEPARENT_SIZE], const char *trace_id,
                        const char *span_id, uint8_t flags) {
  snprintf(out, SAGA__TRACEPARENT_SIZE, "00-%.32s-%.16s-%02x", trace_id, span_id, flags);
}

int saga__span_id(saga__env *e, char out[17]) {
  static const char x[] = "0123456789abcdef";
  uint8_t b[8];
  int rc = saga__id_bytes(e, b, sizeof b);
  if (rc != SAGA_OK) return rc;
  int any = 0;
  for (int k = 0; k < 8; k++) any |= b[k];
  if (!any) b[7] = 1; /* an all-zero span id is invalid (W3C) */
  for (int k = 0; k < 8; k++) {
    out[2 * k] = x[b[k] >> 4];
    out[2 * k + 1] = x[b[k] & 15];
  }
  out[16] = '\0';
  return SAGA_OK;
}
