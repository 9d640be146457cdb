#include "harness.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

char *th_tmpdir(void) {
  const char *base = getenv("TMPDIR");
  if (base == NULL || *base == '\0') base = "/tmp";
  size_t n = strlen(base) + 32;
  char *p = malloc(n);
  if (p == NULL) abort();
  snprintf(p, n, "%s/sagatest.XXXXXX", base);
  if (mkdtemp(p) == NULL) {
    perror("mkdtemp");
    abort();
  }
  return p;
}

static void rm_tree(const char *path) {
  DIR *d = opendir(path);
  if (d != NULL) {
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
      if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
      char *sub = th_path(path, e->d_name);
      struct stat st;
      if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode))
        rm_tree(sub);
      else
        unlink(sub);
      free(sub);
    }
    closedir(d);
  }
  rmdir(path);
}

void th_rmdir(char *path) {
  if (path == NULL) return;
  rm_tree(path);
  free(path);
}

char *th_path(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *p = malloc(n);
  if (p == NULL) abort();
  snprintf(p, n, "%s/%s", dir, name);
  return p;
}

/* Each block carries its size in front so realloc/free can keep `live` right. */
static int th_should_fail(th_alloc *t) {
  t->count++;
  if ((t->fail_at != 0 && t->count == t->fail_at) ||
      (t->fail_all_after && t->failed > 0)) {
    t->failed++;
    return 1;
  }
  return 0;
}

static void *th_malloc(size_t n, void *ud) {
  th_alloc *t = ud;
  if (th_should_fail(t)) return NULL;
  void *p = malloc(n);
  if (p != NULL) t->live++;
  return p;
}

static void *th_realloc(void *p, size_t n, void *ud) {
  th_alloc *t = ud;
  if (th_should_fail(t)) return NULL;
  void *q = realloc(p, n);
  if (q != NULL && p == NULL) t->live++;
  return q;
}

static void th_free(void *p, void *ud) {
  th_alloc *t = ud;
  if (p != NULL) t->live--;
  free(p);
}

void th_alloc_init(th_alloc *t) {
  memset(t, 0, sizeof *t);
  t->a.malloc = th_malloc;
  t->a.realloc = th_realloc;
  t->a.free = th_free;
  t->a.ud = t;
}

int th_run_manual(uv_loop_t *loop, saga_clock *clock, int (*pred)(void *), void *arg,
                  uint64_t max_ms) {
  uint64_t start = saga_clock_now(clock);
  for (;;) {
    while (uv_run(loop, UV_RUN_NOWAIT) != 0) {
      if (pred(arg)) return 0;
    }
    if (pred(arg)) return 0;
    uint64_t next;
    if (saga_clock_next_deadline(clock, &next) != SAGA_OK) return -1;
    if (next - start > max_ms && next > start) return -1;
    saga_clock_advance_to_next(clock);
  }
}

typedef struct {
  int (*pred)(void *);
  void *arg;
  int timed_out;
} th_real_ctx;

static void th_check_cb(uv_check_t *h) {
  th_real_ctx *c = h->data;
  if (c->pred(c->arg)) uv_stop(h->loop);
}

static void th_timeout_cb(uv_timer_t *h) {
  th_real_ctx *c = h->data;
  c->timed_out = 1;
  uv_stop(h->loop);
}

static void th_close_noop(uv_handle_t *h) { (void)h; }

int th_run_real(uv_loop_t *loop, int (*pred)(void *), void *arg, uint64_t timeout_ms) {
  th_real_ctx c = {pred, arg, 0};
  if (pred(arg)) return 0;
  uv_check_t check;
  uv_timer_t timer;
  uv_check_init(loop, &check);
  uv_timer_init(loop, &timer);
  check.data = timer.data = &c;
  uv_check_start(&check, th_check_cb);
  uv_timer_start(&timer, th_timeout_cb, timeout_ms, 0);
  while (!c.timed_out && !pred(arg)) uv_run(loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&check, th_close_noop);
  uv_close((uv_handle_t *)&timer, th_close_noop);
  uv_run(loop, UV_RUN_NOWAIT);
  return pred(arg) ? 0 : -1;
}

void th_drain(uv_loop_t *loop) {
  while (uv_run(loop, UV_RUN_NOWAIT) != 0) {
  }
}

uint64_t th_seed(uint64_t dflt) {
  const char *s = getenv("SAGA_SEED");
  uint64_t seed = (s != NULL && *s != '\0') ? strtoull(s, NULL, 0) : dflt;
  return seed;
}
