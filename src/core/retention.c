/*
 * Retention (retention.h): purges finished sagas (with their history), participant inbox
 * records and participant step records by age or count, in small batches.
 *
 * A pass is one short transaction of its own, run from the node's purge timer between its
 * work transactions (never inside one). Each kind deletes at most `batch` rows per pass; a
 * pass that filled a batch asks to run again on the next loop turn, otherwise the node waits
 * `interval_ms`. Inbox and step records are swept in key order by a cursor, `batch` keys per
 * pass; a full round takes (rows / batch) passes, which the age limits (days by default) leave
 * plenty of room for.
 */
#include <inttypes.h>
#include <string.h>

#include "retention.h"

void saga__retention_defaults(saga_retention *r) {
  memset(r, 0, sizeof *r);
  r->finished_ms = UINT64_C(7) * 24 * 3600 * 1000;
  r->inbox_ms = UINT64_C(30) * 24 * 3600 * 1000;
  r->batch = 1000;
  r->interval_ms = 60000;
}

void saga__retention_init(saga__retention *r, saga__env *env, const saga_retention *cfg) {
  memset(r, 0, sizeof *r);
  r->env = env;
  if (cfg != NULL)
    r->cfg = *cfg;
  else
    saga__retention_defaults(&r->cfg);
  if (r->cfg.batch == 0) r->cfg.batch = 1000;
  if (r->cfg.interval_ms == 0) r->cfg.interval_ms = 60000;
  r->dead_ms = SAGA_DEAD_LETTER_MS;
  r->max_dead = SAGA_DEAD_LETTER_MAX;
  saga__buf_init(&r->ids, env->alloc);
  for (int i = 0; i < 2; i++) {
    saga__buf_init(&r->sweeps[i].key, env->alloc);
    r->sweeps[i].key_step = -1;
  }
}

void saga__retention_free(saga__retention *r) {
  saga__buf_free(&r->ids);
  for (int i = 0; i < 2; i++) saga__buf_free(&r->sweeps[i].key);
}

int saga__retention_enabled(const saga__retention *r) {
  return r->cfg.finished_ms != 0 || r->cfg.max_finished != 0 || r->cfg.inbox_ms != 0 ||
         r->dead_ms != 0 || r->max_dead != 0;
}

/* Deletes the listed sagas and their history. */
static int delete_sagas(saga__retention *r, uint64_t *deleted) {
  saga__store *s = r->env->store;
  const char *p = (const char *)r->ids.data, *end = p + r->ids.len;
  for (; p < end; p += strlen(p) + 1) {
    int gone = 0;
    int rc = s->m->purge_saga(s, p, &gone);
    if (rc != SAGA_OK) return rc;
    *deleted += (uint64_t)gone;
  }
  return SAGA_OK;
}

int saga__retention_pass(saga__retention *r, int *more) {
  const saga_retention *c = &r->cfg;
  saga__env *env = r->env;
  saga__store *s = env->store;
  uint64_t now = saga__now(env);
  uint64_t sagas = 0, inbox = 0, steps = 0, dead = 0;
  *more = 0;
  int rc = s->m->begin(s);
  if (rc != SAGA_OK) return saga__store_fail(env, rc, "starting a purge");
  saga__buf_reset(&r->ids);
  size_t listed = 0, got = 0;
  if (c->finished_ms != 0 && now > c->finished_ms) {
    rc = s->m->finished_before(s, now - c->finished_ms, c->batch, &r->ids, &got);
    listed += got;
  }
  if (rc == SAGA_OK && c->max_finished != 0 && listed < c->batch) {
    rc = s->m->finished_beyond(s, c->max_finished, c->batch - listed, &r->ids, &got);
    listed += got;
  }
  if (rc == SAGA_OK) rc = delete_sagas(r, &sagas);
  if (listed >= c->batch) *more = 1;
  if (rc == SAGA_OK && c->inbox_ms != 0 && now > c->inbox_ms) {
    uint64_t cutoff = now - c->inbox_ms;
    rc = s->m->sweep(s, SAGA__SWEEP_INBOX, &r->sweeps[0], c->batch, cutoff, &inbox, more);
    if (rc == SAGA_OK)
      rc = s->m->sweep(s, SAGA__SWEEP_STEPS, &r->sweeps[1], c->batch, cutoff, &steps, more);
    /* A compensation that later finds no record of its step must not take that as "never
     * applied" when the record may be among those deleted (participant.c). */
    if (rc == SAGA_OK && steps > 0) rc = s->m->purge_mark_raise(s, cutoff);
  }
  if (rc == SAGA_OK && (r->dead_ms != 0 || r->max_dead != 0))
    rc = s->m->dead_purge(s, r->dead_ms != 0 && now > r->dead_ms ? now - r->dead_ms : 0,
                          r->max_dead, c->batch, &dead, more);
  SAGA__HOOK(env, "purge.before_commit");
  if (rc == SAGA_OK) rc = s->m->commit(s);
  if (rc != SAGA_OK) {
    if (s->m->in_tx(s)) s->m->rollback(s);
    *more = 0;
    return saga__store_fail(env, rc, "purging finished work");
  }
  env->stats.purged_sagas += sagas;
  env->stats.purged_inbox += inbox;
  env->stats.purged_steps += steps;
  env->stats.purged_dead_letters += dead;
  env->stats.purge_passes++;
  if (sagas + inbox + steps + dead > 0)
    saga__log(env, SAGA_LOG_DEBUG,
              "purged %" PRIu64 " sagas, %" PRIu64 " inbox and %" PRIu64 " step records, %" PRIu64
              " dead letters", sagas, inbox, steps, dead);
  return SAGA_OK;
}
