/*
 * The environment every part of the core runs in (core.h): logging, the last error, time,
 * randomness and the latency histogram; and the names of states and events.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core.h"

void saga__env_init(saga__env *e, const saga_allocator *a) {
  memset(e, 0, sizeof *e);
  e->alloc = saga__alloc_resolve(a);
  saga_limits_init(&e->limits);
  e->dead_body_max = SAGA_DEAD_LETTER_BODY_MAX;
  e->rng_state = saga__os_random();
  saga__csprng_init(&e->ids);
}

void saga__log(saga__env *e, saga_log_level lvl, const char *fmt, ...) {
  if (e->log == NULL) return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  e->log(e->log_arg, lvl, buf);
}

int saga__fail(saga__env *e, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->errmsg, sizeof e->errmsg, fmt, ap);
  va_end(ap);
  return code;
}

int saga__store_fail(saga__env *e, int code, const char *what) {
  return saga__fail(e, code, "%s: %s (%s)", what,
                    e->store != NULL ? e->store->m->errmsg(e->store) : "no store",
                    saga_strerror(code));
}

size_t saga__data_limit(const saga_limits *l) {
  size_t max = l->max_message_bytes;
  return max > 2 * SAGA__ENVELOPE_RESERVE ? max - SAGA__ENVELOPE_RESERVE : max / 2;
}

int saga__data_fits(saga__env *e, const char *what, size_t entries, size_t bytes) {
  size_t max_bytes = saga__data_limit(&e->limits);
  if (entries > e->limits.max_data_entries)
    return saga__fail(e, SAGA_ETOOBIG, "%s has %zu entries; the limit is %zu "
                      "(saga_limits.max_data_entries)", what, entries,
                      e->limits.max_data_entries);
  if (bytes > max_bytes)
    return saga__fail(e, SAGA_ETOOBIG, "%s is %zu bytes encoded; the limit is %zu "
                      "(saga_limits.max_message_bytes %zu minus %d for the envelope)", what,
                      bytes, max_bytes, e->limits.max_message_bytes, SAGA__ENVELOPE_RESERVE);
  return SAGA_OK;
}

uint64_t saga__now(saga__env *e) { return saga_clock_now(e->clock); }

uint64_t saga__rand(saga__env *e) {
  if (e->random != NULL) return e->random(e->random_arg);
  return saga__splitmix64(&e->rng_state);
}

int saga__id_bytes(saga__env *e, void *out, size_t len) {
  if (e->random != NULL) { /* deterministic tests: ids are only as unpredictable as this */
    uint8_t *o = out;
    for (size_t k = 0; k < len; k += 8) {
      uint64_t v = e->random(e->random_arg);
      size_t take = len - k < 8 ? len - k : 8;
      for (size_t b = 0; b < take; b++, v >>= 8) o[k + b] = (uint8_t)v;
    }
    return SAGA_OK;
  }
  int rc = saga__csprng_bytes(&e->ids, out, len);
  if (rc != SAGA_OK)
    return saga__fail(e, rc, "the operating system's random generator failed (getrandom)");
  return SAGA_OK;
}

static const uint32_t latency_bounds[SAGA_LATENCY_BUCKETS - 1] = {
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000};

uint32_t saga_latency_bound_ms(int b) {
  return b >= 0 && b < SAGA_LATENCY_BUCKETS - 1 ? latency_bounds[b] : UINT32_MAX;
}

int saga__latency_bucket(uint64_t ms) {
  int b = 0;
  while (b < SAGA_LATENCY_BUCKETS - 1 && ms > latency_bounds[b]) b++;
  return b;
}

void saga__latency(saga__env *e, uint64_t ms) {
  e->stats.step_latency[saga__latency_bucket(ms)]++;
  e->stats.step_latency_count++;
  e->stats.step_latency_sum_ms += ms;
}

static const char *const state_names[] = {"UNKNOWN", "RUNNING", "COMPENSATING", "COMPLETED",
                                          "COMPENSATED", "FAILED"};
const char *saga_state_name(int s) { return s >= 1 && s <= 5 ? state_names[s] : "UNKNOWN"; }

static const char *const event_names[] = {
    "UNKNOWN",           "STARTED",          "STEP_SENT",        "STEP_SUCCEEDED",
    "STEP_FAILED",       "STEP_TIMED_OUT",   "STEP_RETRY",       "COMPENSATION_SENT",
    "COMPENSATED",       "COMPENSATION_FAILED", "RESOLVE_SENT",  "CANCELLED",
    "COMPLETED",         "SAGA_COMPENSATED", "SAGA_FAILED",      "STALE_REPLY",
    "DEFINITION_MISSING", "OPERATOR_REQUEST"};
const char *saga_event_name(int t) { return t >= 1 && t <= 17 ? event_names[t] : "UNKNOWN"; }

uint64_t saga__now_ns(saga__env *e) {
  if (e->wall_ns) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) == 0)
      return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
  }
  return saga__now(e) * UINT64_C(1000000);
}
