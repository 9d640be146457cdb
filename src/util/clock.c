/*
 * Clocks and timers.
 *
 * A clock keeps its armed timers in one doubly linked list sorted by deadline (ties in arming
 * order, so equal deadlines fire first-armed first and a manual run stays deterministic).
 * There are only a handful of timers per user, so sorted insertion is the simplest structure
 * that gives "earliest first" for free.
 *
 * A real clock tells wall-clock milliseconds that only move as the monotonic clock does: it
 * reads CLOCK_REALTIME once, when it is made, and adds the CLOCK_MONOTONIC time elapsed since.
 * A step of the system clock (an operator, NTP) therefore neither fires every timer at once
 * nor freezes them; deadlines stored in a database stay wall-clock, so a restarted node
 * reads them against the wall clock of its start. It drives its timers from a single
 * uv_timer_t, restarted whenever the earliest deadline changes. A manual clock has no libuv handle at all: time moves
 * only in saga_clock_advance*(), which fires due timers synchronously.
 */
#include <time.h>

#include "../internal.h"

/* Where a timer is: not armed, in the clock's sorted list, or (real clocks only) in the list
 * of timers picked for the firing pass in progress. Both non-zero values mean "armed". */
enum { TIMER_IDLE = 0, TIMER_ARMED = 1, TIMER_DUE = 2 };

struct saga_clock {
  saga_allocator alloc;
  int manual;
  int closing;
  int firing;        /* real clocks: inside real_fire() */
  uint64_t now;      /* manual clocks only */
  saga__timer *head; /* armed timers, sorted by deadline */
  saga__timer *due;  /* real clocks: timers of the firing pass not yet run, in order */
  uv_timer_t handle; /* real clocks only */
  uint64_t base_wall, base_mono; /* real clocks: the wall clock and the monotonic one at start */
};

static uint64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t mono_ms(void) { return uv_hrtime() / 1000000u; }

/* A real clock's time: the wall clock at its start plus the monotonic time since. */
static uint64_t real_now(const saga_clock *c) { return c->base_wall + (mono_ms() - c->base_mono); }

static void timer_unlink(saga__timer *t) {
  saga_clock *c = t->clock;
  saga__timer **head = t->armed == TIMER_DUE ? &c->due : &c->head;
  if (t->prev != NULL)
    t->prev->next = t->next;
  else
    *head = t->next;
  if (t->next != NULL) t->next->prev = t->prev;
  t->prev = t->next = NULL;
  t->armed = TIMER_IDLE;
}

/* Inserts after every timer with a deadline <= t's, keeping equal deadlines in arming order. */
static void timer_insert(saga__timer *t) {
  saga_clock *c = t->clock;
  saga__timer *prev = NULL, *p = c->head;
  while (p != NULL && p->deadline <= t->deadline) {
    prev = p;
    p = p->next;
  }
  t->prev = prev;
  t->next = p;
  if (prev != NULL)
    prev->next = t;
  else
    c->head = t;
  if (p != NULL) p->prev = t;
  t->armed = TIMER_ARMED;
}

static void real_fire(uv_timer_t *h);

/* Points the uv timer at the earliest deadline, or stops it when nothing is armed. */
static void real_reschedule(saga_clock *c) {
  if (c->manual || c->closing) return;
  if (c->head == NULL) {
    uv_timer_stop(&c->handle);
    return;
  }
  uint64_t now = real_now(c);
  uint64_t delay = c->head->deadline > now ? c->head->deadline - now : 0;
  /* libuv before 1.45 runs a timer restarted with 0 from its own callback again in the same
   * pass; 1 ms pushes a timer re-armed for the past while firing to a later loop turn. */
  if (delay == 0 && c->firing) delay = 1;
  uv_timer_start(&c->handle, real_fire, delay, 0);
}

/*
 * The uv timer fired. Deadlines are wall-clock while libuv counts on its cached monotonic
 * loop time, so it may fire a little early (nothing due yet: we just reschedule) or late.
 * The timers due now are cut off into c->due before any callback runs, so a callback that
 * re-arms a timer for "now" (or the past) gets it on the next loop turn, as promised in
 * internal.h, instead of spinning here. Callbacks may stop or re-arm timers of the pass:
 * they are unlinked from c->due like from any list.
 */
static void real_fire(uv_timer_t *h) {
  saga_clock *c = h->data;
  uint64_t now = real_now(c);
  saga__timer *cut = c->head;
  while (cut != NULL && cut->deadline <= now) {
    cut->armed = TIMER_DUE;
    cut = cut->next;
  }
  if (cut != c->head) {
    c->due = c->head;
    if (cut != NULL) {
      cut->prev->next = NULL;
      cut->prev = NULL;
    }
    c->head = cut;
  }
  saga__timer *t;
  c->firing = 1;
  while ((t = c->due) != NULL) {
    timer_unlink(t);
    t->cb(t);
  }
  real_reschedule(c);
  c->firing = 0;
}

static int clock_alloc(saga_clock **out, const saga_allocator *alloc, int manual) {
  const saga_allocator *a = saga__alloc_resolve(alloc);
  saga_clock *c = saga__calloc(a, sizeof *c);
  if (c == NULL) return SAGA_ENOMEM;
  c->alloc = *a;
  c->manual = manual;
  *out = c;
  return SAGA_OK;
}

int saga_clock_manual_new(saga_clock **out, uint64_t start_ms, const saga_allocator *alloc) {
  if (out == NULL) return SAGA_EINVAL;
  saga_clock *c = NULL;
  int rc = clock_alloc(&c, alloc, 1);
  if (rc != SAGA_OK) return rc;
  c->now = start_ms;
  *out = c;
  return SAGA_OK;
}

int saga__clock_real_new(saga_clock **out, uv_loop_t *loop, const saga_allocator *a) {
  return saga__clock_real_new_at(out, loop, a, wall_ms());
}

int saga__clock_real_new_at(saga_clock **out, uv_loop_t *loop, const saga_allocator *a,
                            uint64_t wall_now) {
  if (out == NULL || loop == NULL) return SAGA_EINVAL;
  saga_clock *c = NULL;
  int rc = clock_alloc(&c, a, 0);
  if (rc != SAGA_OK) return rc;
  c->base_wall = wall_now;
  c->base_mono = mono_ms();
  /* uv_timer_init cannot fail on Unix, but the API returns an int: honour it. */
  if (uv_timer_init(loop, &c->handle) != 0) {
    saga__free(&c->alloc, c);
    return SAGA_EIO;
  }
  c->handle.data = c;
  *out = c;
  return SAGA_OK;
}

static void real_closed(uv_handle_t *h) {
  saga_clock *c = h->data;
  saga_allocator a = c->alloc;
  saga__free(&a, c);
}

void saga__clock_close(saga_clock *c) {
  if (c == NULL || c->closing) return;
  /* Timers still armed are left disarmed rather than pointing into freed memory; their
   * owners were supposed to stop them first. */
  while (c->due != NULL) timer_unlink(c->due);
  while (c->head != NULL) timer_unlink(c->head);
  c->closing = 1;
  if (c->manual) {
    saga_allocator a = c->alloc;
    saga__free(&a, c);
    return;
  }
  uv_timer_stop(&c->handle);
  uv_close((uv_handle_t *)&c->handle, real_closed);
}

void saga_clock_free(saga_clock *c) { saga__clock_close(c); }

int saga__clock_is_manual(const saga_clock *c) { return c != NULL && c->manual; }

uint64_t saga_clock_now(const saga_clock *c) {
  if (c == NULL) return wall_ms();
  return c->manual ? c->now : real_now(c);
}

/* Fires, in deadline order, every timer due by target, including timers that callbacks arm
 * for an instant <= target; time never moves backwards for a deadline already passed. */
static void manual_run_until(saga_clock *c, uint64_t target) {
  saga__timer *t;
  while ((t = c->head) != NULL && t->deadline <= target) {
    timer_unlink(t);
    if (t->deadline > c->now) c->now = t->deadline;
    t->cb(t);
  }
  if (target > c->now) c->now = target;
}

int saga_clock_advance(saga_clock *c, uint64_t ms) {
  if (c == NULL || !c->manual) return SAGA_EINVAL;
  uint64_t target = c->now + ms;
  if (target < c->now) target = UINT64_MAX;
  manual_run_until(c, target);
  return SAGA_OK;
}

int saga_clock_advance_to_next(saga_clock *c) {
  if (c == NULL || !c->manual) return SAGA_EINVAL;
  if (c->head == NULL) return SAGA_ENOTFOUND;
  uint64_t target = c->head->deadline > c->now ? c->head->deadline : c->now;
  manual_run_until(c, target);
  return SAGA_OK;
}

int saga_clock_next_deadline(const saga_clock *c, uint64_t *out) {
  if (c == NULL || out == NULL) return SAGA_EINVAL;
  /* Timers of a firing pass in progress are due already, hence earlier than the list. */
  const saga__timer *t = c->due != NULL ? c->due : c->head;
  if (t == NULL) return SAGA_ENOTFOUND;
  *out = t->deadline;
  return SAGA_OK;
}

void saga__timer_init(saga__timer *t, saga_clock *c, void (*cb)(saga__timer *), void *data) {
  t->deadline = 0;
  t->cb = cb;
  t->data = data;
  t->clock = c;
  t->prev = t->next = NULL;
  t->armed = TIMER_IDLE;
}

void saga__timer_arm(saga__timer *t, uint64_t deadline) {
  if (t == NULL || t->clock == NULL || t->clock->closing) return;
  saga_clock *c = t->clock;
  int was_head = c->head == t;
  if (t->armed != TIMER_IDLE) timer_unlink(t);
  t->deadline = deadline;
  timer_insert(t);
  /* The uv timer only needs to move when the earliest deadline changed. */
  if (was_head || c->head == t) real_reschedule(c);
}

void saga__timer_stop(saga__timer *t) {
  if (t == NULL || t->clock == NULL || t->armed == TIMER_IDLE) return;
  saga_clock *c = t->clock;
  int was_head = c->head == t;
  timer_unlink(t);
  if (was_head) real_reschedule(c);
}
