/* Saga definitions: validation, deep copies, retry arithmetic and the run-time builder. */
#include <math.h>
#include <string.h>

#include "core.h"

static int valid_name(const char *s, size_t max) {
  if (s == NULL) return 0;
  size_t n = strlen(s);
  return n > 0 && n <= max;
}

/* ---- the step table's layout (docs/abi.md) -------------------------------------------- */

/* The first saga_step layout: what step_size 0 and every version-1 definition mean. Frozen:
 * fields appended to saga_step later do not change it. */
#define STEP_SIZE_V1 (offsetof(saga_step, compensation_retry) + sizeof(saga_retry))
/* The shortest step read: the layout before compensation_retry was appended. */
#define STEP_SIZE_MIN (offsetof(saga_step, local_arg) + sizeof(void *))
/* A stride larger than this is taken for a mistake (255 steps must stay addressable). */
#define STEP_SIZE_MAX ((size_t)1 << 20)

/* The fields appended to saga_step after STEP_SIZE_MIN, in order: a caller's step shorter
 * than a field's end lacks it, and it takes its default (zero). */
static const struct {
  size_t offset, size;
} step_appended[] = {
    {offsetof(saga_step, compensation_retry), sizeof(saga_retry)},
};

/* The distance between two steps of def's table (validated by saga_definition_validate). */
static size_t step_stride(const saga_definition *def) {
  if (def->struct_version < 2 || def->step_size == 0) return STEP_SIZE_V1;
  return def->step_size;
}

/* Step i of def as this library's saga_step: the fields the caller's step has, the others
 * zero. Reads exactly min(stride, sizeof(saga_step)) bytes of the caller's step. */
static void step_read(const saga_definition *def, size_t i, saga_step *out) {
  size_t stride = step_stride(def);
  memset(out, 0, sizeof *out);
  memcpy(out, (const char *)def->steps + i * stride, stride < sizeof *out ? stride : sizeof *out);
  for (size_t k = 0; k < sizeof step_appended / sizeof step_appended[0]; k++)
    if (stride < step_appended[k].offset + step_appended[k].size)
      memset((char *)out + step_appended[k].offset, 0, sizeof *out - step_appended[k].offset);
}

int saga_definition_validate(const saga_definition *def, char *err, size_t errlen) {
  if (def == NULL) {
    saga__errf(err, errlen, "definition is NULL");
    return SAGA_EINVAL;
  }
  if (def->struct_version < 0 || def->struct_version > SAGA_DEFINITION_VERSION) {
    saga__errf(err, errlen, "definition struct_version %d is unknown", def->struct_version);
    return SAGA_EVERSION;
  }
  size_t stride = step_stride(def);
  if (stride < STEP_SIZE_MIN || stride > STEP_SIZE_MAX) {
    saga__errf(err, errlen, "definition step_size %zu is not a saga_step size (%zu..%zu)",
               stride, (size_t)STEP_SIZE_MIN, (size_t)STEP_SIZE_MAX);
    return SAGA_EDEFINITION;
  }
  if (!valid_name(def->name, 128)) {
    saga__errf(err, errlen, "definition name must be 1..128 bytes");
    return SAGA_EDEFINITION;
  }
  if (def->version == 0) {
    saga__errf(err, errlen, "definition '%s': version must be >= 1", def->name);
    return SAGA_EDEFINITION;
  }
  if (def->steps == NULL || def->nsteps == 0 || def->nsteps > 255) {
    saga__errf(err, errlen, "definition '%s': needs 1..255 steps", def->name);
    return SAGA_EDEFINITION;
  }
  int seen_pivot = 0, seen_retriable = 0;
  for (size_t i = 0; i < def->nsteps; i++) {
    saga_step copy;
    step_read(def, i, &copy);
    const saga_step *s = &copy;
    const char *nm = s->name ? s->name : "?";
    if (!valid_name(s->name, 128)) {
      saga__errf(err, errlen, "definition '%s' step %zu: name must be 1..128 bytes", def->name,
                 i);
      return SAGA_EDEFINITION;
    }
    if (s->local_action != NULL) {
      if (s->channel != NULL) {
        saga__errf(err, errlen, "step '%s': set either channel or local_action, not both", nm);
        return SAGA_EDEFINITION;
      }
    } else {
      if (!valid_name(s->channel, 256) || !valid_name(s->action, 256)) {
        saga__errf(err, errlen, "step '%s': channel and action (1..256 bytes) are required",
                   nm);
        return SAGA_EDEFINITION;
      }
      if (strcmp(s->channel, SAGA__LOCAL_CHANNEL) == 0) {
        saga__errf(err, errlen, "step '%s': channel '%s' is reserved", nm, SAGA__LOCAL_CHANNEL);
        return SAGA_EDEFINITION;
      }
      if (s->compensation != NULL && !valid_name(s->compensation, 256)) {
        saga__errf(err, errlen, "step '%s': compensation must be 1..256 bytes or NULL", nm);
        return SAGA_EDEFINITION;
      }
      if (s->local_compensation != NULL) {
        saga__errf(err, errlen, "step '%s': local_compensation needs local_action", nm);
        return SAGA_EDEFINITION;
      }
    }
    int has_comp = s->compensation != NULL || s->local_compensation != NULL;
    if (s->retry.jitter < 0 || s->retry.jitter > 1 || s->retry.multiplier < 0 ||
        isnan(s->retry.multiplier) || isnan(s->retry.jitter)) {
      saga__errf(err, errlen, "step '%s': retry jitter must be 0..1 and multiplier >= 0", nm);
      return SAGA_EDEFINITION;
    }
    const saga_retry *cr = &s->compensation_retry;
    if (cr->jitter < 0 || cr->jitter > 1 || cr->multiplier < 0 || isnan(cr->multiplier) ||
        isnan(cr->jitter)) {
      saga__errf(err, errlen,
                 "step '%s': compensation retry jitter must be 0..1 and multiplier >= 0", nm);
      return SAGA_EDEFINITION;
    }
    switch (s->kind) {
    case SAGA_STEP_COMPENSATABLE:
      if (seen_pivot || seen_retriable) {
        saga__errf(err, errlen,
                   "step '%s': a compensatable step cannot follow the pivot or a retriable step",
                   nm);
        return SAGA_EDEFINITION;
      }
      break;
    case SAGA_STEP_PIVOT:
      if (seen_pivot || seen_retriable) {
        saga__errf(err, errlen, "step '%s': only one pivot, before any retriable step", nm);
        return SAGA_EDEFINITION;
      }
      if (has_comp) {
        saga__errf(err, errlen, "step '%s': a pivot has no compensation", nm);
        return SAGA_EDEFINITION;
      }
      seen_pivot = 1;
      break;
    case SAGA_STEP_RETRIABLE:
      if (has_comp) {
        saga__errf(err, errlen, "step '%s': a retriable step has no compensation", nm);
        return SAGA_EDEFINITION;
      }
      seen_retriable = 1;
      break;
    default:
      saga__errf(err, errlen, "step '%s': unknown kind %d", nm, (int)s->kind);
      return SAGA_EDEFINITION;
    }
  }
  return SAGA_OK;
}

static char *dup_opt(const saga_allocator *a, const char *s, int *oom) {
  if (s == NULL) return NULL;
  char *p = saga__strdup(a, s);
  if (p == NULL) *oom = 1;
  return p;
}

void saga__def_free(saga__def *d, const saga_allocator *a) {
  if (d == NULL) return;
  for (size_t i = 0; d->steps != NULL && i < d->nsteps; i++) {
    saga__free(a, d->steps[i].name);
    saga__free(a, d->steps[i].channel);
    saga__free(a, d->steps[i].action);
    saga__free(a, d->steps[i].compensation);
  }
  saga__free(a, d->steps);
  saga__free(a, d->name);
  memset(d, 0, sizeof *d);
}

int saga__def_copy(saga__def *out, const saga_definition *def, const saga_allocator *a,
                   char *err, size_t errlen) {
  int rc = saga_definition_validate(def, err, errlen);
  if (rc != SAGA_OK) return rc;
  memset(out, 0, sizeof *out);
  int oom = 0;
  out->name = dup_opt(a, def->name, &oom);
  out->version = def->version;
  out->deadline_ms = def->deadline_ms;
  out->steps = saga__calloc(a, def->nsteps * sizeof *out->steps);
  if (out->steps == NULL) oom = 1;
  out->nsteps = out->steps ? def->nsteps : 0;
  out->pivot = (int)def->nsteps;
  for (size_t i = 0; i < out->nsteps; i++) {
    saga_step copy;
    step_read(def, i, &copy);
    const saga_step *s = &copy;
    saga__step *d = &out->steps[i];
    d->name = dup_opt(a, s->name, &oom);
    d->channel = dup_opt(a, s->channel, &oom);
    d->action = dup_opt(a, s->action, &oom);
    d->compensation = dup_opt(a, s->compensation, &oom);
    d->kind = s->kind;
    d->retry = s->retry;
    d->comp_retry = s->compensation_retry;
    d->comp_retry.retry_before_compensate = 0;
    if (d->comp_retry.max_attempts == 0 && d->comp_retry.backoff_ms == 0 &&
        d->comp_retry.multiplier == 0 && d->comp_retry.cap_ms == 0 && d->comp_retry.jitter == 0) {
      d->comp_retry = s->retry; /* the default: the action's policy, at least 3 attempts */
      if (saga__retry_max(&d->comp_retry) < 3) d->comp_retry.max_attempts = 3;
    }
    /* 0: the finite default; SAGA_STEP_NO_TIMEOUT: none (0 inside the engine). */
    d->timeout_ms = s->timeout_ms == 0                      ? SAGA_STEP_TIMEOUT_DEFAULT_MS
                    : s->timeout_ms == SAGA_STEP_NO_TIMEOUT ? 0
                                                            : s->timeout_ms;
    d->local_action = s->local_action;
    d->local_compensation = s->local_compensation;
    d->local_arg = s->local_arg;
    if (s->kind != SAGA_STEP_COMPENSATABLE && out->pivot == (int)def->nsteps) out->pivot = (int)i;
  }
  if (oom) {
    saga__def_free(out, a);
    saga__errf(err, errlen, "out of memory copying definition");
    return SAGA_ENOMEM;
  }
  return SAGA_OK;
}

uint32_t saga__retry_max(const saga_retry *r) { return r->max_attempts ? r->max_attempts : 1; }

uint64_t saga__retry_delay(const saga_retry *r, uint32_t attempt, double r01) {
  double base = r->backoff_ms ? r->backoff_ms : 100;
  double mult = r->multiplier > 0 ? r->multiplier : 2;
  double cap = r->cap_ms ? r->cap_ms : 30000;
  double d = base;
  for (uint32_t i = 1; i < attempt && d < cap; i++) d *= mult;
  if (d > cap) d = cap;
  d -= d * r->jitter * r01;
  return d < 1 ? 1 : (uint64_t)d;
}

/* ---- builder ---------------------------------------------------------------------------- */

struct saga_def_builder {
  saga_allocator alloc_copy;
  const saga_allocator *alloc;
  saga_definition def;
  saga_step *steps;
  size_t cap;
  char *name;
  /* copies of step strings: 4 per step */
  char **strings;
  size_t nstrings, strings_cap;
};

int saga_def_builder_new(saga_def_builder **out, const char *name, uint32_t version,
                         const saga_allocator *alloc) {
  if (out == NULL || !valid_name(name, 128) || version == 0) return SAGA_EINVAL;
  const saga_allocator *a = saga__alloc_resolve(alloc);
  saga_def_builder *b = saga__calloc(a, sizeof *b);
  if (b == NULL) return SAGA_ENOMEM;
  b->alloc_copy = *a;
  b->alloc = &b->alloc_copy;
  b->name = saga__strdup(b->alloc, name);
  if (b->name == NULL) {
    saga__free(a, b);
    return SAGA_ENOMEM;
  }
  b->def.struct_version = SAGA_DEFINITION_VERSION;
  b->def.step_size = sizeof(saga_step);
  b->def.name = b->name;
  b->def.version = version;
  *out = b;
  return SAGA_OK;
}

void saga_def_builder_free(saga_def_builder *b) {
  if (b == NULL) return;
  const saga_allocator *a = b->alloc;
  for (size_t i = 0; i < b->nstrings; i++) saga__free(a, b->strings[i]);
  saga__free(a, b->strings);
  saga__free(a, b->steps);
  saga__free(a, b->name);
  saga_allocator copy = b->alloc_copy;
  saga__free(&copy, b);
}

/* Copies s into the builder's string list; *out NULL for NULL s. */
static int keep(saga_def_builder *b, const char *s, const char **out) {
  *out = NULL;
  if (s == NULL) return SAGA_OK;
  if (b->nstrings == b->strings_cap) {
    size_t cap = b->strings_cap ? b->strings_cap * 2 : 16;
    char **p = saga__realloc(b->alloc, b->strings, cap * sizeof *p);
    if (p == NULL) return SAGA_ENOMEM;
    b->strings = p;
    b->strings_cap = cap;
  }
  char *c = saga__strdup(b->alloc, s);
  if (c == NULL) return SAGA_ENOMEM;
  b->strings[b->nstrings++] = c;
  *out = c;
  return SAGA_OK;
}

static int add(saga_def_builder *b, const saga_step *st) {
  if (b->def.nsteps >= 255) return SAGA_EINVAL;
  if (b->def.nsteps == b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 4;
    saga_step *p = saga__realloc(b->alloc, b->steps, cap * sizeof *p);
    if (p == NULL) return SAGA_ENOMEM;
    b->steps = p;
    b->cap = cap;
    b->def.steps = p;
  }
  saga_step s = *st;
  int rc;
  if ((rc = keep(b, st->name, &s.name)) != SAGA_OK ||
      (rc = keep(b, st->channel, &s.channel)) != SAGA_OK ||
      (rc = keep(b, st->action, &s.action)) != SAGA_OK ||
      (rc = keep(b, st->compensation, &s.compensation)) != SAGA_OK)
    return rc; /* strings already kept stay owned by the builder and are freed with it */
  b->steps[b->def.nsteps] = s;
  return (int)b->def.nsteps++;
}

int saga_def_builder_add_step(saga_def_builder *b, const char *name, const char *channel,
                              const char *action, const char *compensation, int kind) {
  if (b == NULL || !valid_name(name, 128) || !valid_name(channel, 256) ||
      !valid_name(action, 256) || kind < 0 || kind > SAGA_STEP_RETRIABLE)
    return SAGA_EINVAL;
  saga_step s;
  memset(&s, 0, sizeof s);
  s.name = name;
  s.channel = channel;
  s.action = action;
  s.compensation = compensation;
  s.kind = (saga_step_kind)kind;
  return add(b, &s);
}

int saga_def_builder_add_local_step(saga_def_builder *b, const char *name, saga_handler action,
                                    saga_handler compensation, void *arg, int kind) {
  if (b == NULL || !valid_name(name, 128) || action == NULL || kind < 0 ||
      kind > SAGA_STEP_RETRIABLE)
    return SAGA_EINVAL;
  saga_step s;
  memset(&s, 0, sizeof s);
  s.name = name;
  s.local_action = action;
  s.local_compensation = compensation;
  s.local_arg = arg;
  s.kind = (saga_step_kind)kind;
  return add(b, &s);
}

/* The step's action (comp = 0) or compensation (comp = 1) policy, after checking. */
static saga_retry *policy(saga_def_builder *b, int index, int comp, double multiplier,
                          double jitter) {
  if (b == NULL || index < 0 || (size_t)index >= b->def.nsteps || !(jitter >= 0) || jitter > 1 ||
      !(multiplier >= 0))
    return NULL;
  return comp ? &b->steps[index].compensation_retry : &b->steps[index].retry;
}

int saga_def_builder_set_retry(saga_def_builder *b, int index, uint32_t max_attempts,
                               uint32_t backoff_ms, double multiplier, uint32_t cap_ms,
                               double jitter, int retry_before_compensate) {
  saga_retry *r = policy(b, index, 0, multiplier, jitter);
  if (r == NULL) return SAGA_EINVAL;
  *r = (saga_retry){max_attempts, backoff_ms, multiplier, cap_ms, jitter,
                    retry_before_compensate};
  return SAGA_OK;
}

int saga_def_builder_set_compensation_retry(saga_def_builder *b, int index,
                                            uint32_t max_attempts, uint32_t backoff_ms,
                                            double multiplier, uint32_t cap_ms, double jitter) {
  saga_retry *r = policy(b, index, 1, multiplier, jitter);
  if (r == NULL) return SAGA_EINVAL;
  *r = (saga_retry){max_attempts, backoff_ms, multiplier, cap_ms, jitter, 0};
  return SAGA_OK;
}

int saga_def_builder_set_timeout(saga_def_builder *b, int index, uint32_t timeout_ms) {
  if (b == NULL || index < 0 || (size_t)index >= b->def.nsteps) return SAGA_EINVAL;
  b->steps[index].timeout_ms = timeout_ms;
  return SAGA_OK;
}

int saga_def_builder_set_deadline(saga_def_builder *b, uint32_t deadline_ms) {
  if (b == NULL) return SAGA_EINVAL;
  b->def.deadline_ms = deadline_ms;
  return SAGA_OK;
}

const saga_definition *saga_def_builder_definition(const saga_def_builder *b) {
  return b != NULL ? &b->def : NULL;
}
