/*
 * The node's metrics in the Prometheus text exposition format (version 0.0.4):
 * saga_node_metrics() and saga_nodes_metrics(). Reads what the public readers of node.c and
 * relay.c read (counters, counts by state, the outbox), plus the counts by definition through
 * the store interface and the engine's per-step metrics (in memory, engine.h). Each metric's
 * HELP and TYPE lines are written once, then its series of every node, since the format allows
 * a metric's block only once per text.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "runtime.h"

typedef struct mtext {
  saga__buf b;
  int oom;
} mtext;

static void put(mtext *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void put(mtext *t, const char *fmt, ...) {
  if (t->oom) return;
  char small[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(small, sizeof small, fmt, ap);
  va_end(ap);
  if (n < 0) {
    t->oom = 1;
    return;
  }
  if ((size_t)n < sizeof small) {
    if (saga__buf_append(&t->b, small, (size_t)n) != SAGA_OK) t->oom = 1;
    return;
  }
  if (saga__buf_reserve(&t->b, (size_t)n + 1) != SAGA_OK) {
    t->oom = 1;
    return;
  }
  va_start(ap, fmt);
  vsnprintf((char *)t->b.data + t->b.len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  t->b.len += (size_t)n;
}

/* A label value, escaped: backslash, double quote and newline. */
static void put_value(mtext *t, const char *s) {
  for (const char *p = s; *p != '\0' && !t->oom; p++) {
    const char *esc = *p == '\\' ? "\\\\" : *p == '"' ? "\\\"" : *p == '\n' ? "\\n" : NULL;
    if (esc != NULL) {
      if (saga__buf_append(&t->b, esc, 2) != SAGA_OK) t->oom = 1;
    } else {
      size_t run = strcspn(p, "\\\"\n");
      if (saga__buf_append(&t->b, p, run) != SAGA_OK) t->oom = 1;
      p += run - 1;
    }
  }
}

static void head(mtext *t, const char *name, const char *type, const char *help) {
  put(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Starts a series: name{node="..." — the caller adds its other labels and "} value\n". */
static void series(mtext *t, const char *name, const saga_node *n) {
  put(t, "%s{node=\"", name);
  put_value(t, n->name != NULL ? n->name : "");
  put(t, "\"");
}

/* What is read once per node before writing. */
typedef struct snap {
  saga_node *n;
  saga_node_stats st;
  int64_t states[6];
  int states_ok;
  int64_t depth;
  uint64_t read_errors;
} snap;

/* The counters of saga_node_stats, by offset. */
static const struct {
  const char *name, *help;
  size_t off;
} counters[] = {
    {"libsaga_transactions_total", "Group commits of the node.",
     offsetof(saga_node_stats, transactions)},
    {"libsaga_work_items_total", "Work items processed in them.",
     offsetof(saga_node_stats, work_items)},
    {"libsaga_commit_failures_total", "Transactions that failed to commit.",
     offsetof(saga_node_stats, commit_failures)},
    {"libsaga_replayed_transactions_total",
     "Transactions run again with a savepoint per item after an item failed.",
     offsetof(saga_node_stats, replayed_tx)},
    {"libsaga_outbox_sent_total", "Outbox rows published.", offsetof(saga_node_stats, sent)},
    {"libsaga_outbox_resent_total", "Outbox rows published again (unconfirmed in time).",
     offsetof(saga_node_stats, resent)},
    {"libsaga_outbox_acked_total", "Outbox rows confirmed by the transport.",
     offsetof(saga_node_stats, acked_out)},
    {"libsaga_send_refusals_total", "Sends the transport refused for now (resent later).",
     offsetof(saga_node_stats, send_refusals)},
    {"libsaga_unsendable_total", "Outbox rows the transport refused for good (dead-lettered).",
     offsetof(saga_node_stats, unsendable)},
    {"libsaga_delivered_total", "Messages delivered to the node.",
     offsetof(saga_node_stats, delivered)},
    {"libsaga_duplicates_total", "Duplicate messages answered from the inbox.",
     offsetof(saga_node_stats, duplicates)},
    {"libsaga_dead_letters_total", "Messages dead-lettered.",
     offsetof(saga_node_stats, dead_letters)},
    {"libsaga_handler_runs_total", "Participant handler runs.",
     offsetof(saga_node_stats, handler_runs)},
    {"libsaga_handler_contract_errors_total", "Handlers that broke their contract.",
     offsetof(saga_node_stats, handler_contract_errors)},
    {"libsaga_stale_replies_total", "Replies that matched no awaited step (late, duplicated).",
     offsetof(saga_node_stats, stale_replies)},
    {"libsaga_forged_replies_total", "Replies whose id does not answer a command of this node.",
     offsetof(saga_node_stats, forged_replies)},
    {"libsaga_event_handler_runs_total", "Domain-event handler runs.",
     offsetof(saga_node_stats, event_handler_runs)},
    {"libsaga_events_held_total",
     "Domain events that came before their key's previous one (left for redelivery).",
     offsetof(saga_node_stats, events_held)},
    {"libsaga_reply_to_refused_total", "Commands refused: their reply_to cannot be reached.",
     offsetof(saga_node_stats, reply_to_refused)},
    {"libsaga_replies_parked_total", "Replies kept until their definition version is registered.",
     offsetof(saga_node_stats, replies_parked)},
    {"libsaga_compensations_expired_total",
     "Compensations answered 'record expired' (their saga ends FAILED).",
     offsetof(saga_node_stats, compensations_expired)},
    {"libsaga_purged_sagas_total", "Finished sagas deleted by retention.",
     offsetof(saga_node_stats, purged_sagas)},
    {"libsaga_purged_inbox_total", "Inbox records deleted by retention.",
     offsetof(saga_node_stats, purged_inbox)},
    {"libsaga_purged_steps_total", "Participant step records deleted by retention.",
     offsetof(saga_node_stats, purged_steps)},
    {"libsaga_purged_dead_letters_total", "Dead letters deleted by retention.",
     offsetof(saga_node_stats, purged_dead_letters)},
    {"libsaga_purge_passes_total", "Retention transactions committed.",
     offsetof(saga_node_stats, purge_passes)},
    {"libsaga_checkpoints_total", "WAL checkpoints run in the background.",
     offsetof(saga_node_stats, checkpoints)},
    {"libsaga_checkpoints_inline_total", "WAL checkpoints run inline (the WAL reached its bound).",
     offsetof(saga_node_stats, checkpoints_inline)},
    {"libsaga_checkpoint_failures_total", "WAL checkpoints that failed.",
     offsetof(saga_node_stats, checkpoint_failures)},
};

/* The per-step counters (engine.h), by offset in saga__step_stats. */
static const struct {
  const char *name, *help;
  size_t off;
} step_counters[] = {
    {"libsaga_step_attempts_total",
     "Commands sent for the step's action, first attempts and retries.",
     offsetof(saga__step_stats, attempts)},
    {"libsaga_step_retries_total", "Commands sent for the step's action after its first attempt.",
     offsetof(saga__step_stats, retries)},
    {"libsaga_step_successes_total", "Times the step's action succeeded.",
     offsetof(saga__step_stats, successes)},
    {"libsaga_step_failures_total",
     "Action attempts that failed (a failure reply, unsendable, a pivot found not applied).",
     offsetof(saga__step_stats, failures)},
    {"libsaga_step_timeouts_total",
     "Action attempts (and pivot resolves) that got no reply within the step's timeout.",
     offsetof(saga__step_stats, timeouts)},
    {"libsaga_step_compensation_attempts_total", "Commands sent for the step's compensation.",
     offsetof(saga__step_stats, comp_attempts)},
    {"libsaga_step_compensations_total", "Times the step's compensation succeeded.",
     offsetof(saga__step_stats, compensations)},
    {"libsaga_step_compensation_failures_total",
     "Compensation attempts that failed or got no reply in time.",
     offsetof(saga__step_stats, comp_failures)},
};

static const char *const phase_names[SAGA__PHASES] = {"action", "compensation", "resolve"};

/* Starts a per-step series: name{node="...",definition="...",step="..." (the caller ends it). */
static void step_series(mtext *t, const char *name, const saga_node *n,
                        const saga__step_stats *s) {
  series(t, name, n);
  put(t, ",definition=\"");
  put_value(t, s->def_name);
  put(t, "\",step=\"");
  put_value(t, s->step_name);
  put(t, "\"");
}

/* The per-step histogram of s's phase p. */
static void step_histogram(mtext *t, const saga_node *n, const saga__step_stats *s, int p) {
  uint64_t cum = 0;
  for (int k = 0; k < SAGA_LATENCY_BUCKETS; k++) {
    cum += s->latency[p][k];
    uint32_t bound = saga_latency_bound_ms(k);
    if (bound == UINT32_MAX) continue; /* +Inf, below */
    step_series(t, "libsaga_step_duration_ms_bucket", n, s);
    put(t, ",phase=\"%s\",le=\"%" PRIu32 "\"} %" PRIu64 "\n", phase_names[p], bound, cum);
  }
  step_series(t, "libsaga_step_duration_ms_bucket", n, s);
  put(t, ",phase=\"%s\",le=\"+Inf\"} %" PRIu64 "\n", phase_names[p], s->latency_count[p]);
  step_series(t, "libsaga_step_duration_ms_sum", n, s);
  put(t, ",phase=\"%s\"} %" PRIu64 "\n", phase_names[p], s->latency_sum_ms[p]);
  step_series(t, "libsaga_step_duration_ms_count", n, s);
  put(t, ",phase=\"%s\"} %" PRIu64 "\n", phase_names[p], s->latency_count[p]);
}

typedef struct row_ctx {
  mtext *t;
  const saga_node *n;
} row_ctx;

static void def_row(void *arg, const char *def_name, int state, int64_t count) {
  row_ctx *c = arg;
  series(c->t, "libsaga_sagas_by_definition", c->n);
  put(c->t, ",definition=\"");
  put_value(c->t, def_name);
  put(c->t, "\",state=\"%s\"} %" PRId64 "\n", saga_state_name(state), count);
}

static void depth_row(void *arg, const char *channel, int64_t count, uint64_t oldest_ms) {
  row_ctx *c = arg;
  (void)oldest_ms;
  series(c->t, "libsaga_outbox_channel_depth", c->n);
  put(c->t, ",channel=\"");
  put_value(c->t, channel);
  put(c->t, "\"} %" PRId64 "\n", count);
}

static void oldest_row(void *arg, const char *channel, int64_t count, uint64_t oldest_ms) {
  row_ctx *c = arg;
  (void)count;
  series(c->t, "libsaga_outbox_oldest_seconds", c->n);
  put(c->t, ",channel=\"");
  put_value(c->t, channel);
  put(c->t, "\"} %" PRIu64 ".%03u\n", oldest_ms / 1000, (unsigned)(oldest_ms % 1000));
}

/* Visits the outbox per channel of s->n; a failed read counts in read_errors. */
static void channels(mtext *t, snap *s, saga_outbox_channel_cb cb) {
  if (s->n->env.store->m->outbox_channels == NULL) return;
  row_ctx c = {t, s->n};
  if (saga_node_outbox_channels(s->n, cb, &c) != SAGA_OK) s->read_errors++;
}

static void write_all(mtext *t, snap *sn, size_t count) {
  head(t, "libsaga_sagas", "gauge", "Sagas this node orchestrates, by state.");
  for (size_t i = 0; i < count; i++)
    for (int s = SAGA_RUNNING; sn[i].states_ok && s <= SAGA_FAILED; s++) {
      series(t, "libsaga_sagas", sn[i].n);
      put(t, ",state=\"%s\"} %" PRId64 "\n", saga_state_name(s), sn[i].states[s]);
    }

  head(t, "libsaga_sagas_by_definition", "gauge",
       "Sagas this node orchestrates, by definition name and state (pairs with sagas).");
  for (size_t i = 0; i < count; i++) {
    saga__store *st = sn[i].n->env.store;
    if (st->m->inst_count_by_def == NULL) continue;
    row_ctx c = {t, sn[i].n};
    int rc = st->m->inst_count_by_def(st, def_row, &c);
    if (rc != SAGA_OK) {
      saga__store_fail(&sn[i].n->env, rc, "counting sagas by definition");
      sn[i].read_errors++;
    }
  }

  head(t, "libsaga_step_latency_ms", "histogram",
       "Orchestrator step latency, all steps: command sent (committed) to its reply "
       "processed, in ms.");
  for (size_t i = 0; i < count; i++) {
    const saga_node_stats *st = &sn[i].st;
    uint64_t cum = 0;
    for (int k = 0; k < SAGA_LATENCY_BUCKETS; k++) {
      cum += st->step_latency[k];
      uint32_t bound = saga_latency_bound_ms(k);
      if (bound == UINT32_MAX) continue; /* the last bucket is +Inf, written below */
      series(t, "libsaga_step_latency_ms_bucket", sn[i].n);
      put(t, ",le=\"%" PRIu32 "\"} %" PRIu64 "\n", bound, cum);
    }
    series(t, "libsaga_step_latency_ms_bucket", sn[i].n);
    put(t, ",le=\"+Inf\"} %" PRIu64 "\n", st->step_latency_count);
    series(t, "libsaga_step_latency_ms_sum", sn[i].n);
    put(t, "} %" PRIu64 "\n", st->step_latency_sum_ms);
    series(t, "libsaga_step_latency_ms_count", sn[i].n);
    put(t, "} %" PRIu64 "\n", st->step_latency_count);
  }

  head(t, "libsaga_step_duration_ms", "histogram",
       "Orchestrator step latency per definition, step and phase (action, compensation, "
       "resolve): command sent (committed) to its reply processed, in ms.");
  for (size_t i = 0; i < count; i++) {
    const saga__engine *e = &sn[i].n->engine;
    for (size_t k = 0; k < e->nstep_stats; k++)
      for (int p = 0; p < SAGA__PHASES; p++)
        if (e->step_stats[k].phases & (1u << p)) step_histogram(t, sn[i].n, &e->step_stats[k], p);
  }
  for (size_t c = 0; c < sizeof step_counters / sizeof step_counters[0]; c++) {
    head(t, step_counters[c].name, "counter", step_counters[c].help);
    for (size_t i = 0; i < count; i++) {
      const saga__engine *e = &sn[i].n->engine;
      for (size_t k = 0; k < e->nstep_stats; k++) {
        uint64_t v;
        memcpy(&v, (const char *)&e->step_stats[k] + step_counters[c].off, sizeof v);
        step_series(t, step_counters[c].name, sn[i].n, &e->step_stats[k]);
        put(t, "} %" PRIu64 "\n", v);
      }
    }
  }

  head(t, "libsaga_outbox_depth", "gauge", "Outbox rows not yet confirmed by the transport.");
  for (size_t i = 0; i < count; i++)
    if (sn[i].depth >= 0) {
      series(t, "libsaga_outbox_depth", sn[i].n);
      put(t, "} %" PRId64 "\n", sn[i].depth);
    }

  head(t, "libsaga_outbox_channel_depth", "gauge",
       "Outbox rows not yet confirmed, per channel (channels with rows).");
  for (size_t i = 0; i < count; i++) channels(t, &sn[i], depth_row);

  head(t, "libsaga_outbox_oldest_seconds", "gauge",
       "Age of the oldest unconfirmed outbox row, per channel (a channel nobody consumes grows).");
  for (size_t i = 0; i < count; i++) channels(t, &sn[i], oldest_row);

  head(t, "libsaga_outbox_stuck_channels", "gauge",
       "Channels with an outbox row unconfirmed longer than SAGA_OUTBOX_WARN_MS (last check).");
  for (size_t i = 0; i < count; i++) {
    series(t, "libsaga_outbox_stuck_channels", sn[i].n);
    put(t, "} %" PRIu64 "\n", sn[i].st.outbox_stuck_channels);
  }

  head(t, "libsaga_transport_connected", "gauge",
       "1 when the node's transport is connected (messages can flow), else 0.");
  for (size_t i = 0; i < count; i++) {
    series(t, "libsaga_transport_connected", sn[i].n);
    put(t, "} %d\n", saga_node_transport_connected(sn[i].n) == 1);
  }

  for (size_t k = 0; k < sizeof counters / sizeof counters[0]; k++) {
    head(t, counters[k].name, "counter", counters[k].help);
    for (size_t i = 0; i < count; i++) {
      uint64_t v;
      memcpy(&v, (const char *)&sn[i].st + counters[k].off, sizeof v);
      series(t, counters[k].name, sn[i].n);
      put(t, "} %" PRIu64 "\n", v);
    }
  }

  head(t, "libsaga_metrics_read_errors", "gauge",
       "Database reads that failed while writing these metrics (their series are left out).");
  for (size_t i = 0; i < count; i++) {
    series(t, "libsaga_metrics_read_errors", sn[i].n);
    put(t, "} %" PRIu64 "\n", sn[i].read_errors);
  }
}

int saga_nodes_metrics(saga_node *const *nodes, size_t count, char **out, size_t *len) {
  if (out != NULL) *out = NULL;
  if (len != NULL) *len = 0;
  if (nodes == NULL || count == 0 || out == NULL || count > SIZE_MAX / sizeof(snap))
    return SAGA_EINVAL;
  for (size_t i = 0; i < count; i++)
    if (nodes[i] == NULL || nodes[i]->env.store == NULL) return SAGA_EINVAL;
  const saga_allocator *a = nodes[0]->env.alloc;
  snap *sn = saga__calloc(a, count * sizeof *sn);
  if (sn == NULL) return SAGA_ENOMEM;
  for (size_t i = 0; i < count; i++) {
    sn[i].n = nodes[i];
    saga_node_stats_get(nodes[i], &sn[i].st, sizeof sn[i].st);
    sn[i].states_ok = saga_node_count_by_state(nodes[i], sn[i].states) == SAGA_OK;
    if (!sn[i].states_ok) sn[i].read_errors++;
    sn[i].depth = saga_node_outbox_depth(nodes[i]);
    if (sn[i].depth < 0) sn[i].read_errors++;
  }
  mtext t = {.oom = 0};
  saga__buf_init(&t.b, a);
  write_all(&t, sn, count);
  saga__free(a, sn);
  if (!t.oom && saga__buf_append(&t.b, "", 1) != SAGA_OK) t.oom = 1; /* the NUL */
  if (t.oom) {
    saga__buf_free(&t.b);
    return SAGA_ENOMEM;
  }
  *out = (char *)t.b.data;
  if (len != NULL) *len = t.b.len - 1;
  return SAGA_OK;
}

int saga_node_metrics(saga_node *node, char **out, size_t *len) {
  return saga_nodes_metrics(&node, 1, out, len);
}
