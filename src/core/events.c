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

void saga__events_dispatch(saga_node *n) {
  saga__journal *j = &n->journal;
  saga__events_dispatch_remote(n); /* any not handed out yet */
  for (size_t i = 0; i < j->nevents; i++) {
    const saga__event_rec *r = &j->events[i];
    if (r->type == 0) continue; /* a remote event, handed out already */
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
    n->on_event(n, &ev, n->event_arg);
  }
  saga__journal_clear_events(j);
}
