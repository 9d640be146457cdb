/*
 * The node's work queue: two queues, one receiving new work while the other is run by the
 * group commit (batch.c). Items keep their variable-length bytes in the queue's arena.
 */
#include <string.h>

#include "runtime.h"

static void idle_cb(uv_idle_t *h) {
  saga_node *n = h->data;
  uv_idle_stop(h);
  n->idle_active = 0;
  n->flush(n);
}

void saga__queue_schedule(saga_node *n) {
  if (n->idle_active || n->closing) return;
  n->idle_active = 1;
  uv_idle_start(&n->idle, idle_cb);
}

saga__work *saga__queue_push(saga_node *n, saga__work_type type, const void *b1, size_t l1,
                             const void *b2, size_t l2, const void *b3, size_t l3) {
  saga__queue *q = &n->queues[n->cur];
  if (q->n == q->cap) {
    size_t cap = q->cap ? q->cap * 2 : 64;
    saga__work *p = saga__realloc(n->env.alloc, q->items, cap * sizeof *p);
    if (p == NULL) return NULL;
    q->items = p;
    q->cap = cap;
  }
  size_t need = (b1 ? l1 + 1 : 0) + (b2 ? l2 + 1 : 0) + (b3 ? l3 + 1 : 0);
  if (saga__buf_reserve(&q->arena, need) != SAGA_OK) return NULL;
  saga__work *w = &q->items[q->n];
  memset(w, 0, sizeof *w);
  w->type = type;
  w->len3 = SIZE_MAX;
  static const char zero = 0;
  if (b1) {
    w->off1 = q->arena.len;
    w->len1 = l1;
    saga__buf_append(&q->arena, b1, l1);
    saga__buf_append(&q->arena, &zero, 1);
  }
  if (b2) {
    w->off2 = q->arena.len;
    w->len2 = l2;
    saga__buf_append(&q->arena, b2, l2);
    saga__buf_append(&q->arena, &zero, 1);
  }
  if (b3) {
    w->off3 = q->arena.len;
    w->len3 = l3;
    saga__buf_append(&q->arena, b3, l3);
    saga__buf_append(&q->arena, &zero, 1);
  }
  q->n++;
  saga__queue_schedule(n);
  return w;
}

const char *saga__queue_str(const saga__queue *q, size_t off) {
  return (const char *)q->arena.data + off;
}
