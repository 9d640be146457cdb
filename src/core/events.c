/*
 * Events to the application, after the commit that recorded them: the node's own transitions
 * (cfg.on_event) and event messages received from other nodes (saga_node_subscribe_events).
 */
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

static saga_event_type event_type_of(const char *name) {
  for (int t = 1; t <= 16; t++)
    if (strcmp(saga_event_name(t), name) == 0) return (saga_event_type)t;
  return (saga_event_type)0;
}

/* Decodes a received event and hands it to the subscriber. */
static void dispatch_remote(saga_node *n, size_t off) {
  saga__journal *j = &n->journal;
  uint64_t len;
  memcpy(&len, j->remote_events.data + off, sizeof len);
  saga_envelope *env = NULL;
  saga_data *data = NULL;
  char err[200];
  if (saga_envelope_decode(j->remote_events.data + off + sizeof len, (size_t)len,
                           &n->env.limits, n->env.alloc, &env, err, sizeof err) != SAGA_OK ||
      saga__data_decode(env->payload, env->payload_len, &n->env.limits, n->env.alloc, &data,
                        err, sizeof err) != SAGA_OK) {
    saga__log(&n->env, SAGA_LOG_WARN, "malformed event message dropped: %s", err);
    saga_envelope_free(env);
    return;
  }
  const char *version = saga_envelope_header(env, "version");
  const char *at = saga_envelope_header(env, "at");
  const char *def = saga_envelope_header(env, "definition");
  const char *step_name = saga_envelope_header(env, "step-name");
  saga_event ev;
  ev.type = event_type_of(env->name);
  ev.saga_id = env->saga_id;
  ev.definition = def ? def : "";
  ev.version = version ? (uint32_t)strtoul(version, NULL, 10) : 0;
  ev.step = env->step == UINT32_MAX ? -1 : (int)env->step;
  ev.step_name = step_name ? step_name : "";
  ev.attempt = env->attempt;
  ev.state = (saga_state)env->status;
  ev.detail = env->error;
  ev.at_ms = at ? strtoull(at, NULL, 10) : 0;
  ev.data = data;
  /* From the network: passed on only when well-formed. */
  const char *tp = saga_envelope_header(env, "traceparent");
  ev.traceparent = tp != NULL && saga_traceparent_check(tp, NULL) == SAGA_OK ? tp : "";
  n->event_sub_cb(n, &ev, n->event_sub_arg);
  saga_data_free(data);
  saga_envelope_free(env);
}

void saga__events_dispatch_remote(saga_node *n) {
  saga__journal *j = &n->journal;
  for (size_t i = 0; i < j->nevents; i++) {
    saga__event_rec *r = &j->events[i];
    if (r->remote_off == 0) continue;
    size_t off = (size_t)(r->remote_off - 1);
    r->remote_off = 0; /* handed out: the second pass skips it */
    r->type = (saga_event_type)0;
    dispatch_remote(n, off);
  }
}

/* ---- saga_node_watch ----------------------------------------------------------------------- */

static int is_final_event(saga_event_type t) {
  return t == SAGA_EV_COMPLETED || t == SAGA_EV_SAGA_COMPENSATED || t == SAGA_EV_SAGA_FAILED;
}

static int is_terminal(int state) {
  return state == SAGA_COMPLETED || state == SAGA_COMPENSATED || state == SAGA_FAILED;
}

int saga_node_watch(saga_node *n, const char *saga_id, saga_watch_cb cb, void *arg) {
  if (n == NULL || saga_id == NULL || cb == NULL) return SAGA_EINVAL;
  n->env.errmsg[0] = '\0';
  if (n->closing) return saga__fail(&n->env, SAGA_ECLOSED, "node is closing");
  if (!n->started) return saga__fail(&n->env, SAGA_ESTATE, "node not started");
  if (strlen(saga_id) >= sizeof n->waiters[0].id)
    return saga__fail(&n->env, SAGA_ENOTFOUND, "saga '%.60s...' not found (id too long)",
                      saga_id);
  /* The committed state: a transition in flight is told through the events after its commit
   * (single thread: none can commit between this read and the registration). */
  saga__store *s = n->env.store;
  saga__inst i;
  saga__inst_init(&i, n->env.alloc);
  int rc = s->m->inst_load(s, saga_id, &i);
  int state = i.state;
  saga__inst_free(&i);
  if (rc == SAGA_ENOTFOUND) return saga__fail(&n->env, rc, "saga '%s' not found", saga_id);
  if (rc != SAGA_OK) return saga__store_fail(&n->env, rc, "reading saga");
  if (n->nwaiters == n->waiters_cap) {
    size_t cap = n->waiters_cap ? n->waiters_cap * 2 : 8;
    saga__waiter *w = saga__realloc(n->env.alloc, n->waiters, cap * sizeof *w);
    if (w == NULL) return saga__fail(&n->env, SAGA_ENOMEM, "out of memory adding a watcher");
    n->waiters = w;
    n->waiters_cap = cap;
  }
  saga__waiter *w = &n->waiters[n->nwaiters++];
  memset(w, 0, sizeof *w);
  snprintf(w->id, sizeof w->id, "%s", saga_id);
  w->cb = cb;
  w->arg = arg;
  /* Transitions are buffered as events from now on, so the terminal one is seen. */
  n->journal.keep_events = 1;
  if (is_terminal(state)) {
    w->state = state;
    n->waiters_ready++;
    saga__queue_schedule(n); /* told on the next loop turn */
  }
  return SAGA_OK;
}

/* Marks the watchers of a saga that reached state. */
static void waiters_reached(saga_node *n, const char *saga_id, int state) {
  for (size_t k = 0; k < n->nwaiters; k++) {
    saga__waiter *w = &n->waiters[k];
    if (w->state == 0 && strcmp(w->id, saga_id) == 0) {
      w->state = state;
      n->waiters_ready++;
    }
  }
}

void saga__waiters_fire(saga_node *n) {
  /* One at a time, taken out of the list before its callback: the callback may watch again
   * (the list may move) or close the node. */
  while (n->waiters_ready > 0 && !n->closing) {
    size_t k = 0;
    while (k < n->nwaiters && n->waiters[k].state == 0) k++;
    if (k == n->nwaiters) {
      n->waiters_ready = 0;
      break;
    }
    saga__waiter w = n->waiters[k];
    n->waiters[k] = n->waiters[--n->nwaiters];
    n->waiters_ready--;
    w.cb(n, SAGA_OK, w.id, (saga_state)w.state, w.arg);
  }
}

void saga__waiters_close(saga_node *n) {
  while (n->nwaiters > 0) {
    saga__waiter w = n->waiters[--n->nwaiters];
    w.cb(n, SAGA_ECLOSED, w.id, (saga_state)0, w.arg);
  }
  n->waiters_ready = 0;
  saga__free(n->env.alloc, n->waiters);
  n->waiters = NULL;
  n->waiters_cap = 0;
}

void saga__events_dispatch(saga_node *n) {
  saga__journal *j = &n->journal;
  saga__events_dispatch_remote(n); /* any not handed out yet */
  for (size_t i = 0; i < j->nevents; i++) {
    const saga__event_rec *r = &j->events[i];
    if (r->type == 0) continue; /* a remote event, handed out already */
    if (n->nwaiters > 0 && is_final_event(r->type)) waiters_reached(n, r->saga_id, r->state);
    if (n->on_event == NULL) continue;
    saga_event ev;
    const char *text = (const char *)j->event_text.data;
    ev.type = r->type;
    ev.saga_id = r->saga_id;
    ev.detail = text + r->detail_off;
    ev.definition = ev.detail + strlen(ev.detail) + 1;
    ev.version = r->def ? r->def->version : 0;
    ev.step = r->step;
    ev.step_name = (r->def && r->step >= 0 && (size_t)r->step < r->def->nsteps)
                       ? r->def->steps[r->step].name
                       : "";
    ev.attempt = r->attempt;
    ev.state = r->state;
    ev.at_ms = r->at_ms;
    ev.data = NULL;
    ev.traceparent = r->traceparent;
    n->on_event(n, &ev, n->event_arg);
  }
  saga__spans_dispatch(n);
  saga__journal_clear_events(j);
  saga__waiters_fire(n);
}

void saga__spans_dispatch(saga_node *n) {
  saga__journal *j = &n->journal;
  /* The count is read again each time: a hook that closes the node (it must not) clears the
   * list and ends the loop instead of reading freed records. */
  for (size_t i = 0; i < j->nspans && n->on_span != NULL && !n->closing; i++) {
    const saga__span_rec *r = &j->spans[i];
    const char *text = (const char *)j->span_text.data + r->text_off;
    saga_span sp;
    memset(&sp, 0, sizeof sp);
    sp.event = r->event;
    sp.kind = r->kind;
    sp.trace_id = r->trace_id;
    sp.span_id = r->span_id;
    sp.parent_span_id = r->parent_id;
    sp.flags = r->flags;
    sp.name = text;
    sp.definition = text + strlen(text) + 1;
    sp.error = sp.definition + strlen(sp.definition) + 1;
    sp.saga_id = r->saga_id;
    sp.step = r->step;
    sp.attempt = r->attempt;
    sp.start_ns = r->start_ns;
    sp.end_ns = r->end_ns;
    sp.status = r->status;
    n->on_span(n, &sp, n->span_arg);
  }
  j->nspans = 0;
  saga__buf_reset(&j->span_text);
}
