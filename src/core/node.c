/*
 * The node's lifecycle (open, start, close), the registration of definitions and handlers,
 * and the public API that queues work or reads state. The work itself runs in batch.c; see
 * node.h for the files of the node and what each owns.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

static void finish_close(saga_node *n);
static void start_close(saga_node *n);

/* Where the fields of each struct_version of saga_node_config end (docs/abi.md): a config of
 * version v is read up to config_end[v] and no further. Frozen: a new version appends its
 * own end. The structs embedded by value (saga_limits, saga_retention) never grow, so these
 * offsets never move. */
static const size_t config_end[SAGA_NODE_CONFIG_VERSION + 1] = {
    0,
    offsetof(saga_node_config, retention),
    offsetof(saga_node_config, checkpoint),
    offsetof(saga_node_config, checkpoint_pages) + sizeof(uint32_t),
    offsetof(saga_node_config, db_check) + sizeof(saga_db_check),
    offsetof(saga_node_config, span_arg) + sizeof(void *),
};

int saga_node_config_init_sized(saga_node_config *cfg, size_t size) {
  if (cfg == NULL || size < config_end[1]) return SAGA_EINVAL;
  int v = SAGA_NODE_CONFIG_VERSION;
  while (config_end[v] > size) v--;
  /* Fill a whole config of this library, then hand the caller the bytes it has room for:
   * every field of version v (and any padding up to size); zeros past ours. */
  saga_node_config c;
  memset(&c, 0, sizeof c);
  c.struct_version = v;
  c.synchronous = SAGA_SYNC_FULL;
  c.resend_ms = 1000;
  c.batch_max = 1024;
  c.busy_timeout_ms = 5000;
  c.max_deliveries = 10;
  saga_limits_init(&c.limits);
  saga__retention_defaults(&c.retention);
  c.checkpoint = SAGA_CHECKPOINT_INLINE;
  c.checkpoint_pages = 1000;
  c.db_mode = SAGA_DB_OPEN_EXISTING;
  c.db_check = SAGA_DB_CHECK_QUICK;
  saga__copy_sized(cfg, size, &c, sizeof c);
  return SAGA_OK;
}


static void async_cb(uv_async_t *h);
static void free_node(saga_node *n);

/* The idle handle runs this: the group commit, then a close requested during it. */
static void flush(saga_node *n) {
  saga__batch_flush(n);
  if (n->close_after_flush && !n->in_flush) {
    n->close_after_flush = 0;
    start_close(n);
  }
}

/* ---- retention's timer ------------------------------------------------------------------ */

static void purge_timer_cb(saga__timer *t) {
  saga_node *n = t->data;
  if (n->closing || !n->started) return;
  uint64_t now = saga__now(&n->env);
  if (n->in_flush) { /* never inside the node's own transaction */
    saga__timer_arm(&n->purge_timer, now);
    return;
  }
  int more = 0;
  int rc = saga__retention_pass(&n->retention, &more);
  if (rc != SAGA_OK)
    saga__log(&n->env, SAGA_LOG_WARN, "purge failed, trying again later: %s", n->env.errmsg);
  /* A filled batch continues on the next loop turn; work that arrived meanwhile goes first
   * (timers that are due run after the loop's pending callbacks). */
  saga__timer_arm(&n->purge_timer, more ? now : now + n->retention.cfg.interval_ms);
}

/* ---- opening ---------------------------------------------------------------------------- */

/* A node whose open failed after its async handle was made: freed once libuv let go of it. */
static void free_after_async_close(uv_handle_t *h) { free_node(h->data); }

int saga_node_open(saga_node **out, uv_loop_t *loop, const saga_node_config *cfg, char *err,
                   size_t errlen) {
  saga__errf(err, errlen, "%s", "");
  if (cfg == NULL || out == NULL || loop == NULL) {
    saga__errf(err, errlen, "out, loop and cfg are required");
    if (cfg != NULL) saga_transport_free(cfg->transport);
    return SAGA_EINVAL;
  }
  saga_transport *t = cfg->transport;
  if (cfg->struct_version < 1 || cfg->struct_version > SAGA_NODE_CONFIG_VERSION) {
    saga__errf(err, errlen, "config struct_version %d is unknown (call saga_node_config_init)",
               cfg->struct_version);
    saga_transport_free(t);
    return SAGA_EVERSION;
  }
  if (cfg->struct_version >= 4 &&
      ((unsigned)cfg->db_mode > SAGA_DB_CREATE || (unsigned)cfg->db_check > SAGA_DB_CHECK_FULL)) {
    saga__errf(err, errlen, "config db_mode %d or db_check %d is unknown", (int)cfg->db_mode,
               (int)cfg->db_check);
    saga_transport_free(t);
    return SAGA_EINVAL;
  }
  if (cfg->name == NULL || cfg->name[0] == '\0' || strlen(cfg->name) > 256 ||
      cfg->db_path == NULL || t == NULL || strcmp(cfg->name, SAGA__LOCAL_CHANNEL) == 0) {
    saga__errf(err, errlen, "config needs a name (1..256 bytes, not '%s'), db_path and a "
                            "transport", SAGA__LOCAL_CHANNEL);
    saga_transport_free(t);
    return SAGA_EINVAL;
  }
  const saga_allocator *a = saga__alloc_resolve(cfg->alloc);
  saga_node *n = saga__calloc(a, sizeof *n);
  if (n == NULL) {
    saga__errf(err, errlen, "out of memory");
    saga_transport_free(t);
    return SAGA_ENOMEM;
  }
  n->alloc_copy = *a;
  saga__env_init(&n->env, &n->alloc_copy);
  n->env.alloc = &n->alloc_copy;
  n->env.log = cfg->log;
  n->env.log_arg = cfg->log_arg;
  n->env.random = cfg->random;
  n->env.random_arg = cfg->random_arg;
  n->env.hook = cfg->test_hook;
  n->env.hook_arg = cfg->test_hook_arg;
  n->env.limits = cfg->limits;
  if (n->env.limits.max_message_bytes == 0) saga_limits_init(&n->env.limits);
  n->loop = loop;
  n->flush = flush;
  n->finish_close = finish_close;
  n->on_event = cfg->on_event;
  n->event_arg = cfg->event_arg;
  if (cfg->struct_version >= 5) { /* older configs have no span hook */
    n->on_span = cfg->on_span;
    n->span_arg = cfg->span_arg;
  }
  n->resend_ms = cfg->resend_ms ? cfg->resend_ms : 1000;
  n->batch_max = cfg->batch_max ? cfg->batch_max : 1024;
  saga__buf_init(&n->queues[0].arena, n->env.alloc);
  saga__buf_init(&n->queues[1].arena, n->env.alloc);
  saga__buf_init(&n->sent_ids, n->env.alloc);
  saga__buf_init(&n->input_buf, n->env.alloc);
  int rc;
  n->name = saga__strdup(n->env.alloc, cfg->name);
  if (cfg->event_channel != NULL &&
      (n->event_channel = saga__strdup(n->env.alloc, cfg->event_channel)) == NULL)
    n->name = (saga__free(n->env.alloc, n->name), NULL);
  saga__journal_init(&n->journal, &n->env);
  n->journal.keep_events = n->on_event != NULL;
  n->journal.keep_spans = n->on_span != NULL;
  n->journal.event_channel = n->event_channel;
  saga__engine_init(&n->engine, &n->env, &n->journal, n->name);
  saga__participant_init(&n->part, &n->env, &n->journal, &n->engine, cfg->max_deliveries);
  saga__domain_init(&n->domain, &n->env, &n->journal, &n->part, n->name, cfg->max_deliveries);
  n->part.can_send = saga__host_can_send;
  n->part.can_send_arg = n;
  /* a version-1 config has no retention field */
  saga__retention_init(&n->retention, &n->env, cfg->struct_version >= 2 ? &cfg->retention : NULL);
  if (n->name == NULL) {
    rc = SAGA_ENOMEM;
    saga__errf(err, errlen, "out of memory");
    goto fail;
  }
  if (cfg->clock != NULL) {
    n->env.clock = cfg->clock;
  } else {
    rc = saga__clock_real_new(&n->env.clock, loop, n->env.alloc);
    if (rc != SAGA_OK) {
      saga__errf(err, errlen, "cannot create clock: %s", saga_strerror(rc));
      goto fail;
    }
    n->own_clock = 1;
    n->env.wall_ns = 1; /* spans in wall-clock ns; a clock of the application's: its ms */
  }
  saga__batch_init(n);
  saga__relay_init(n);
  saga__timer_init(&n->purge_timer, n->env.clock, purge_timer_cb, n);
  saga__operator_init(n);
  saga__sqlite_config sc;
  memset(&sc, 0, sizeof sc);
  sc.path = cfg->db_path;
  sc.vfs = cfg->vfs;
  sc.synchronous = (int)cfg->synchronous;
  sc.busy_timeout_ms = cfg->busy_timeout_ms;
  sc.checkpoint = SAGA_CHECKPOINT_INLINE;
  sc.checkpoint_pages = 1000;
  if (cfg->struct_version >= 3) { /* older configs have no checkpoint fields */
    sc.checkpoint = (int)cfg->checkpoint;
    sc.checkpoint_pages = cfg->checkpoint_pages;
  }
  /* Older configs have no db_mode (they created a missing or empty database) and no
   * db_check (they get the default). */
  sc.create = cfg->struct_version < 4 || cfg->db_mode == SAGA_DB_CREATE;
  sc.check = cfg->struct_version >= 4 ? (int)cfg->db_check : SAGA_DB_CHECK_QUICK;
  sc.loop = loop;
  sc.alloc = n->env.alloc;
  sc.log = cfg->log;
  sc.log_arg = cfg->log_arg;
  rc = saga__sqlite_store_open(&n->env.store, &sc, err, errlen);
  if (rc != SAGA_OK) goto fail;
  uint64_t fresh[2];
  rc = saga__os_random_bytes(fresh, sizeof fresh);
  if (rc != SAGA_OK) {
    saga__errf(err, errlen, "no CSPRNG for the reply key");
    goto fail;
  }
  rc = n->env.store->m->reply_key(n->env.store, fresh, n->engine.reply_key);
  if (rc != SAGA_OK) {
    saga__errf(err, errlen, "database '%s': setting up the reply key: %s", cfg->db_path,
               n->env.store->m->errmsg(n->env.store));
    goto fail;
  }
  rc = saga__domain_open(&n->domain);
  if (rc != SAGA_OK) {
    saga__errf(err, errlen, "database '%s': %s", cfg->db_path, n->env.errmsg);
    goto fail;
  }
  rc = saga__host_attach(n, t, err, errlen);
  if (n->transport != NULL) t = NULL; /* owned by the node now */
  if (rc != SAGA_OK) goto fail;
  if (uv_mutex_init(&n->post_mu) != 0) {
    rc = SAGA_ENOMEM;
    saga__errf(err, errlen, "cannot create mutex");
    goto fail;
  }
  /* The async handle first: it is the one that can fail (it may need an eventfd), and when
   * it does there is no handle in the loop yet to close. uv_idle_init cannot fail on the
   * platforms libuv supports today; checked all the same, its failure closes the async
   * handle and leaves the freeing of the node to the close callback. */
  int uvrc = uv_async_init(loop, &n->async, async_cb);
  if (uvrc != 0) {
    rc = uvrc == UV_ENOMEM ? SAGA_ENOMEM : SAGA_EIO;
    saga__errf(err, errlen, "cannot create the node's wakeup handle (uv_async_init): %s",
               uv_strerror(uvrc));
    goto fail;
  }
  n->async.data = n;
  uv_unref((uv_handle_t *)&n->async);
  uvrc = uv_idle_init(loop, &n->idle);
  if (uvrc != 0) {
    saga__errf(err, errlen, "cannot create the node's idle handle (uv_idle_init): %s",
               uv_strerror(uvrc));
    if (n->transport_open) n->tm.close(n->transport);
    n->tm.destroy(n->transport);
    n->transport = NULL;
    uv_close((uv_handle_t *)&n->async, free_after_async_close);
    return uvrc == UV_ENOMEM ? SAGA_ENOMEM : SAGA_EIO;
  }
  n->idle.data = n;
  *out = n;
  return SAGA_OK;
fail:
  saga_transport_free(t);
  if (n->transport != NULL) {
    if (n->transport_open) n->tm.close(n->transport);
    n->tm.destroy(n->transport);
  }
  free_node(n);
  return rc;
}

/* ---- registration ----------------------------------------------------------------------- */

int saga_node_register(saga_node *n, const saga_definition *def) {
  if (n == NULL || def == NULL) return SAGA_EINVAL;
  n->env.errmsg[0] = '\0'; /* errmsg tells of the latest call only */
  if (n->started || n->closing)
    return saga__fail(&n->env, SAGA_ESTATE, "definitions must be registered before start");
  return saga__engine_register(&n->engine, def);
}

int saga_node_handle(saga_node *n, const char *channel, const char *command, saga_handler fn,
                     void *arg) {
  if (n == NULL) return SAGA_EINVAL;
  n->env.errmsg[0] = '\0';
  if (channel == NULL || command == NULL || fn == NULL || !channel[0] || !command[0] ||
      strlen(channel) > 256 || strlen(command) > 256)
    return saga__fail(&n->env, SAGA_EINVAL, "channel and command (1..256 bytes) and fn needed");
  if (strcmp(channel, SAGA__LOCAL_CHANNEL) == 0)
    return saga__fail(&n->env, SAGA_EINVAL, "channel '%s' is reserved", SAGA__LOCAL_CHANNEL);
  if (n->started || n->closing)
    return saga__fail(&n->env, SAGA_ESTATE, "handlers must be registered before start");
  return saga__participant_add(&n->part, channel, command, fn, arg);
}

int saga_node_subscribe_events(saga_node *n, const char *channel, saga_event_cb cb, void *arg) {
  if (n == NULL) return SAGA_EINVAL;
  n->env.errmsg[0] = '\0';
  if (channel == NULL || channel[0] == '\0' || cb == NULL || strlen(channel) > 256)
    return saga__fail(&n->env, SAGA_EINVAL, "event channel (1..256 bytes) and callback needed");
  if (n->started || n->closing)
    return saga__fail(&n->env, SAGA_ESTATE, "subscribe to events before start");
  if (n->event_sub_cb != NULL)
    return saga__fail(&n->env, SAGA_EEXIST, "already subscribed to events");
  if (saga__domain_has_channel(&n->domain, channel))
    return saga__fail(&n->env, SAGA_EEXIST, "channel '%s' carries domain events "
                      "(saga_node_on_event)", channel);
  if ((n->event_sub_channel = saga__strdup(n->env.alloc, channel)) == NULL)
    return saga__fail(&n->env, SAGA_ENOMEM, "out of memory");
  n->event_sub_cb = cb;
  n->event_sub_arg = arg;
  n->journal.keep_remote = 1;
  return SAGA_OK;
}

/* Local steps become handlers on the reserved loopback channel, one per definition step. */
int saga_node_on_event(saga_node *n, const char *channel, const char *name,
                       saga_event_handler fn, void *arg) {
  if (n == NULL) return SAGA_EINVAL;
  n->env.errmsg[0] = '\0';
  size_t cl = channel != NULL ? strnlen(channel, SAGA_EVENT_NAME_MAX + 1) : 0;
  size_t nl = name != NULL ? strnlen(name, SAGA_EVENT_NAME_MAX + 1) : 1;
  if (fn == NULL || cl == 0 || cl > SAGA_EVENT_NAME_MAX || nl == 0 || nl > SAGA_EVENT_NAME_MAX)
    return saga__fail(&n->env, SAGA_EINVAL, "channel and name (1..%u bytes; name NULL for "
                      "every name) and fn needed", SAGA_EVENT_NAME_MAX);
  if (strcmp(channel, SAGA__LOCAL_CHANNEL) == 0)
    return saga__fail(&n->env, SAGA_EINVAL, "channel '%s' is reserved", SAGA__LOCAL_CHANNEL);
  if (n->started || n->closing)
    return saga__fail(&n->env, SAGA_ESTATE, "event handlers must be registered before start");
  if (n->event_sub_channel != NULL && strcmp(n->event_sub_channel, channel) == 0)
    return saga__fail(&n->env, SAGA_EEXIST, "channel '%s' carries saga lifecycle events "
                      "(saga_node_subscribe_events)", channel);
  return saga__domain_subscribe(&n->domain, channel, name, fn, arg);
}

static int register_local_steps(saga_node *n) {
  char name[320];
  for (size_t d = 0; d < n->engine.ndefs; d++) {
    const saga__def *def = &n->engine.defs[d];
    for (size_t i = 0; i < def->nsteps; i++) {
      const saga__step *s = &def->steps[i];
      if (s->local_action == NULL) continue;
      snprintf(name, sizeof name, "%s:%u:%zu:action", def->name, def->version, i);
      int rc = saga__participant_add(&n->part, SAGA__LOCAL_CHANNEL, name, s->local_action,
                                     s->local_arg);
      if (rc != SAGA_OK) return rc;
      if (s->local_compensation == NULL) continue;
      snprintf(name, sizeof name, "%s:%u:%zu:compensation", def->name, def->version, i);
      rc = saga__participant_add(&n->part, SAGA__LOCAL_CHANNEL, name, s->local_compensation,
                                 s->local_arg);
      if (rc != SAGA_OK) return rc;
    }
  }
  return SAGA_OK;
}

/* Subscribes to channel unless an earlier (failed) saga_node_start already did. */
static int subscribe_once(saga_node *n, const char *channel) {
  for (size_t i = 0; i < n->nsubscribed; i++)
    if (strcmp(n->subscribed[i], channel) == 0) return SAGA_OK;
  char **v = saga__realloc(n->env.alloc, n->subscribed, (n->nsubscribed + 1) * sizeof *v);
  if (v == NULL) return SAGA_ENOMEM;
  n->subscribed = v;
  if ((v[n->nsubscribed] = saga__strdup(n->env.alloc, channel)) == NULL) return SAGA_ENOMEM;
  int rc = n->tm.subscribe(n->transport, channel);
  if (rc == SAGA_OK)
    n->nsubscribed++;
  else
    saga__free(n->env.alloc, v[n->nsubscribed]);
  return rc;
}

int saga_node_start(saga_node *n, uint64_t *missing_out) {
  if (n == NULL) return SAGA_EINVAL;
  n->env.errmsg[0] = '\0';
  if (n->started || n->closing)
    return saga__fail(&n->env, SAGA_ESTATE, "node already started");
  /* A start that failed (a subscription refused, the database busy) can be called again:
   * local steps are registered once, channels subscribed once. */
  int rc = SAGA_OK;
  if (!n->local_steps_added) {
    rc = register_local_steps(n);
    if (rc != SAGA_OK) return rc;
    n->local_steps_added = 1;
  }
  const char *failed = n->name;
  rc = subscribe_once(n, n->name);
  if (rc == SAGA_OK && n->event_sub_channel != NULL)
    rc = subscribe_once(n, failed = n->event_sub_channel);
  const saga__handler *h = n->part.handlers;
  for (size_t i = 0; rc == SAGA_OK && i < n->part.nhandlers; i++) {
    const char *ch = h[i].channel;
    if (strcmp(ch, SAGA__LOCAL_CHANNEL) != 0) rc = subscribe_once(n, failed = ch);
  }
  for (size_t i = 0; rc == SAGA_OK && i < n->domain.nsubs; i++)
    rc = subscribe_once(n, failed = n->domain.subs[i].channel);
  if (rc != SAGA_OK)
    return saga__fail(&n->env, rc, "transport refused the subscription to '%s': %s", failed,
                      saga_strerror(rc));

  /* Recovery: report instances whose definition is missing, re-arm the rest. */
  int missing = saga__batch_recover(n);
  if (missing < 0) return missing;
  /* Definitions recorded for tools; operator requests written while no node ran. */
  rc = saga__operator_start(n);
  if (rc != SAGA_OK) return rc;
  if (missing_out != NULL) *missing_out = (uint64_t)missing;
  n->started = 1;
  n->relay_hwm = 0;
  saga__events_dispatch(n);
  saga__relay_fresh(n);
  saga__batch_arm_deadline(n);
  if (saga__retention_enabled(&n->retention))
    saga__timer_arm(&n->purge_timer, saga__now(&n->env) + n->retention.cfg.interval_ms);
  return SAGA_OK;
}

/* ---- API that queues work --------------------------------------------------------------- */

static int check_usable(saga_node *n) {
  if (n == NULL) return SAGA_EINVAL;
  n->env.errmsg[0] = '\0';
  if (n->closing) return saga__fail(&n->env, SAGA_ECLOSED, "node is closing");
  if (!n->started) return saga__fail(&n->env, SAGA_ESTATE, "node not started");
  return SAGA_OK;
}

int saga_start(saga_node *n, const char *name, const saga_data *input, const char *idem_key,
               saga_start_cb cb, void *arg) {
  return saga_start_traced(n, name, input, idem_key, NULL, cb, arg);
}

int saga_start_traced(saga_node *n, const char *name, const saga_data *input,
                      const char *idem_key, const char *traceparent, saga_start_cb cb,
                      void *arg) {
  int rc = check_usable(n);
  if (rc != SAGA_OK) return rc;
  if (name == NULL) return saga__fail(&n->env, SAGA_EINVAL, "definition name is NULL");
  const char *why = NULL;
  if (traceparent != NULL && saga_traceparent_check(traceparent, &why) != SAGA_OK) {
    char shown[80];
    saga__printable(shown, sizeof shown, traceparent, strnlen(traceparent, 70));
    return saga__fail(&n->env, SAGA_EINVAL, "traceparent '%s' is malformed: %s", shown, why);
  }
  if (saga__engine_find(&n->engine, name, 0) == NULL)
    return saga__fail(&n->env, SAGA_ENODEF, "definition '%s' is not registered", name);
  if (idem_key != NULL && (idem_key[0] == '\0' || strlen(idem_key) > n->env.limits.max_string_bytes))
    return saga__fail(&n->env, SAGA_EINVAL, "idempotency key must be 1..%zu bytes",
                           n->env.limits.max_string_bytes);
  saga__buf_reset(&n->input_buf);
  rc = saga__data_encode(input, &n->input_buf);
  if (rc != SAGA_OK) return saga__fail(&n->env, rc, "encoding input: %s", saga_strerror(rc));
  /* Checked where the data is made: every command of the saga must fit in a message. */
  rc = saga__data_fits(&n->env, "the input", input != NULL ? saga_data_count(input) : 0,
                       n->input_buf.len);
  if (rc != SAGA_OK) return rc;
  /* The definition name, then (when given) NUL and the traceparent, as the first bytes. */
  size_t nlen = strlen(name);
  char named[320 + SAGA__TRACEPARENT_SIZE];
  if (nlen >= 320) return saga__fail(&n->env, SAGA_ENODEF, "definition name too long");
  memcpy(named, name, nlen + 1);
  size_t l1 = nlen;
  if (traceparent != NULL) {
    memcpy(named + nlen + 1, traceparent, SAGA_TRACEPARENT_LEN);
    l1 = nlen + 1 + SAGA_TRACEPARENT_LEN;
  }
  saga__work *w = saga__queue_push(n, W_START, named, l1, n->input_buf.data, n->input_buf.len,
                             idem_key, idem_key ? strlen(idem_key) : 0);
  if (w == NULL) return saga__fail(&n->env, SAGA_ENOMEM, "out of memory queueing start");
  if (idem_key == NULL) w->len3 = SIZE_MAX;
  w->cb = (void *)cb;
  w->cb_arg = arg;
  return SAGA_OK;
}

static int queue_op(saga_node *n, saga__work_type type, const char *id, saga_done_cb cb,
                    void *arg) {
  int rc = check_usable(n);
  if (rc != SAGA_OK) return rc;
  if (id == NULL || strlen(id) >= 40) return saga__fail(&n->env, SAGA_EINVAL, "bad saga id");
  saga__work *w = saga__queue_push(n, type, id, strlen(id), NULL, 0, NULL, 0);
  if (w == NULL) return saga__fail(&n->env, SAGA_ENOMEM, "out of memory queueing request");
  w->cb = (void *)cb;
  w->cb_arg = arg;
  return SAGA_OK;
}

int saga_node_transact(saga_node *n, saga_transact_fn fn, void *arg, saga_done_cb done,
                       void *done_arg) {
  int rc = check_usable(n);
  if (rc != SAGA_OK) return rc;
  if (fn == NULL) return saga__fail(&n->env, SAGA_EINVAL, "fn is NULL");
  struct {
    saga_transact_fn fn;
    void *arg;
  } t = {fn, arg};
  saga__work *w = saga__queue_push(n, W_TRANSACT, &t, sizeof t, NULL, 0, NULL, 0);
  if (w == NULL) return saga__fail(&n->env, SAGA_ENOMEM, "out of memory queueing a transaction");
  w->cb = (void *)done;
  w->cb_arg = done_arg;
  return SAGA_OK;
}

int saga_cancel(saga_node *n, const char *id, saga_done_cb cb, void *arg) {
  return queue_op(n, W_CANCEL, id, cb, arg);
}

int saga_retry_failed(saga_node *n, const char *id, saga_done_cb cb, void *arg) {
  return queue_op(n, W_RETRY, id, cb, arg);
}

int saga_node_busy(const saga_node *n) {
  return n != NULL && (n->queues[0].n > 0 || n->queues[1].n > 0 || n->timers_due);
}

/* ---- posting from other threads --------------------------------------------------------- */

int saga_node_post(saga_node *n, void (*fn)(saga_node *, void *), void *arg) {
  if (n == NULL || fn == NULL) return SAGA_EINVAL;
  saga__post *p = saga__malloc(n->env.alloc, sizeof *p);
  if (p == NULL) return SAGA_ENOMEM;
  p->fn = fn;
  p->arg = arg;
  void (*hook)(void *, const char *) = n->env.hook;
  void *hook_arg = n->env.hook_arg;
  uv_mutex_lock(&n->post_mu);
  if (n->closing) {
    uv_mutex_unlock(&n->post_mu);
    saga__free(n->env.alloc, p);
    return SAGA_ECLOSED;
  }
  p->next = n->posts;
  n->posts = p;
  /* Under the lock: the close (which sets closing under this lock first) cannot have closed
   * and freed the handle meanwhile. After the unlock this function touches nothing of n. */
  uv_async_send(&n->async);
  uv_mutex_unlock(&n->post_mu);
  if (hook != NULL) hook(hook_arg, "post.after_unlock");
  return SAGA_OK;
}

/* Runs posted functions in the order they were posted; with node NULL once closing. */
static void run_posts(saga_node *n, int closing) {
  uv_mutex_lock(&n->post_mu);
  saga__post *list = n->posts, *rev = NULL;
  n->posts = NULL;
  uv_mutex_unlock(&n->post_mu);
  while (list != NULL) {
    saga__post *next = list->next;
    list->next = rev;
    rev = list;
    list = next;
  }
  while (rev != NULL) {
    saga__post *next = rev->next;
    rev->fn(closing ? NULL : n, rev->arg);
    saga__free(n->env.alloc, rev);
    rev = next;
  }
}

static void async_cb(uv_async_t *h) { run_posts((saga_node *)h->data, 0); }

/* ---- closing ---------------------------------------------------------------------------- */

static void free_node(saga_node *n) {
  const saga_allocator *a = n->env.alloc;
  saga__retention_free(&n->retention);
  saga__domain_free(&n->domain);
  saga__participant_free(&n->part);
  saga__engine_free(&n->engine);
  saga__journal_free(&n->journal);
  if (n->env.store != NULL) n->env.store->m->close(n->env.store);
  n->env.store = NULL;
  if (n->own_clock && n->env.clock != NULL) saga__clock_close(n->env.clock);
  for (int i = 0; i < 2; i++) {
    saga__free(a, n->queues[i].items);
    saga__buf_free(&n->queues[i].arena);
  }
  saga__buf_free(&n->sent_ids);
  saga__buf_free(&n->input_buf);
  saga__buf_free(&n->unsendable_channel);
  saga__buf_free(&n->unsendable_body);
  saga__buf_free(&n->stuck_warned);
  saga__free(a, n->event_channel);
  saga__free(a, n->waiters);
  saga__free(a, n->event_sub_channel);
  for (size_t i = 0; i < n->nsubscribed; i++) saga__free(a, n->subscribed[i]);
  saga__free(a, n->subscribed);
  saga__free(a, n->name);
  saga_allocator copy = n->alloc_copy;
  saga__free(&copy, n);
}

static void finish_close(saga_node *n) {
  if (n->pending_closes > 0 || !n->transport_closed) return;
  if (n->transport != NULL) n->tm.destroy(n->transport);
  n->transport = NULL;
  run_posts(n, 1);
  /* A thread still inside saga_node_post (it saw closing and is returning SAGA_ECLOSED)
   * leaves the lock before it is destroyed. */
  uv_mutex_lock(&n->post_mu);
  uv_mutex_unlock(&n->post_mu);
  uv_mutex_destroy(&n->post_mu);
  void (*cb)(void *) = n->close_cb;
  void *arg = n->close_arg;
  free_node(n);
  if (cb != NULL) cb(arg);
}

static void close_step(saga_node *n) {
  n->pending_closes--;
  finish_close(n);
}

static void on_handle_closed(uv_handle_t *h) { close_step((saga_node *)h->data); }
static void on_store_stopped(void *arg) { close_step(arg); }

static void start_close(saga_node *n) {
  saga__batch_stop(n);
  saga__relay_stop(n);
  saga__timer_stop(&n->purge_timer);
  saga__operator_stop(n);
  saga__batch_fail(n, &n->queues[0], SAGA_ECLOSED);
  saga__batch_fail(n, &n->queues[1], SAGA_ECLOSED);
  saga__journal_clear_events(&n->journal);
  n->pending_closes = 2;
  /* A background checkpoint still running makes the close wait for it. */
  if (n->env.store->m->stop(n->env.store, on_store_stopped, n)) n->pending_closes++;
  uv_close((uv_handle_t *)&n->idle, on_handle_closed);
  uv_close((uv_handle_t *)&n->async, on_handle_closed);
  if (n->transport_open && !n->transport_closed) {
    n->tm.close(n->transport); /* may call host_closed now or later */
  } else {
    n->transport_closed = 1;
  }
}

void saga_node_close(saga_node *n, void (*cb)(void *), void *arg) {
  if (n == NULL || n->closing) return;
  uv_mutex_lock(&n->post_mu);
  n->closing = 1;
  uv_mutex_unlock(&n->post_mu);
  n->close_cb = cb;
  n->close_arg = arg;
  saga__waiters_close(n); /* nothing more will be told: the watchers learn it now */
  if (n->in_flush) { /* the flush finishes its transaction, then closes */
    n->close_after_flush = 1;
    return;
  }
  start_close(n);
}

/* ---- reading state ---------------------------------------------------------------------- */

const char *saga_node_errmsg(const saga_node *n) { return n != NULL ? n->env.errmsg : ""; }

struct sqlite3 *saga_node_db(saga_node *n) {
  if (n == NULL || n->env.store == NULL) return NULL;
  return (struct sqlite3 *)n->env.store->m->native(n->env.store);
}

saga_clock *saga_node_clock(saga_node *n) { return n != NULL ? n->env.clock : NULL; }

int saga_node_stats_get(const saga_node *n, saga_node_stats *out, size_t size) {
  /* the first version of the struct ended after handler_runs */
  if (n == NULL || out == NULL || size < offsetof(saga_node_stats, step_latency))
    return SAGA_EINVAL;
  saga_node_stats st = n->env.stats;
  if (n->env.store != NULL) n->env.store->m->stats(n->env.store, &st);
  saga__copy_sized(out, size, &st, sizeof st);
  return SAGA_OK;
}

int saga_node_count_by_state(saga_node *n, int64_t counts[6]) {
  if (n == NULL || counts == NULL || n->env.store == NULL) return SAGA_EINVAL;
  return n->env.store->m->inst_count(n->env.store, counts);
}

void saga_info_free(saga_info *info) {
  if (info == NULL) return;
  const saga_allocator *a = (const saga_allocator *)((char *)info + sizeof *info);
  saga_allocator copy = *a;
  saga__free(&copy, info->definition);
  saga__free(&copy, info->error);
  saga_data_free(info->data);
  saga__free(&copy, info);
}

int saga_get(saga_node *n, const char *saga_id, saga_info **out) {
  if (n == NULL || saga_id == NULL || out == NULL) return SAGA_EINVAL;
  n->env.errmsg[0] = '\0';
  saga__store *s = n->env.store;
  saga__inst i;
  saga__inst_init(&i, n->env.alloc);
  int rc = s->m->inst_load(s, saga_id, &i);
  if (rc != SAGA_OK) {
    saga__inst_free(&i);
    if (rc == SAGA_ENOTFOUND)
      return saga__fail(&n->env, rc, "saga '%s' not found", saga_id);
    return saga__store_fail(&n->env, rc, "reading saga");
  }
  /* The allocator is stored right behind the struct so saga_info_free() can find it. */
  saga_info *info = saga__calloc(n->env.alloc, sizeof *info + sizeof(saga_allocator));
  char err[200];
  if (info == NULL) {
    rc = SAGA_ENOMEM;
    goto fail;
  }
  memcpy((char *)info + sizeof *info, n->env.alloc, sizeof(saga_allocator));
  snprintf(info->id, sizeof info->id, "%s", i.id);
  info->definition = saga__strdup(n->env.alloc, i.def_name);
  info->error = saga__strdup(n->env.alloc, i.error);
  info->version = i.def_version;
  info->state = (saga_state)i.state;
  info->step = i.step;
  info->attempt = i.attempt;
  info->created_ms = i.created_ms;
  info->updated_ms = i.updated_ms;
  info->deadline_ms = saga__inst_next_deadline(&i);
  if (info->definition == NULL || info->error == NULL) {
    rc = SAGA_ENOMEM;
    goto fail;
  }
  rc = saga__data_decode(i.data.data, i.data.len, &n->env.limits, n->env.alloc, &info->data,
                         err, sizeof err);
  if (rc != SAGA_OK) goto fail;
  saga__inst_free(&i);
  *out = info;
  return SAGA_OK;
fail:
  saga__inst_free(&i);
  saga_info_free(info);
  return saga__fail(&n->env, rc, "reading saga '%s': %s", saga_id, saga_strerror(rc));
}
