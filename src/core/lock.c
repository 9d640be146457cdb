/*
 * Semantic locks (include/saga/lock.h): rows of saga_lock written in a handler's transaction
 * through the store, and released by a later step, by the step's compensation (participant.c)
 * or when the saga ends on the orchestrator's node (engine.c). saga_lock_holder(), which
 * reads any connection, is the SQLite backend's (src/store/sqlite/lock.c).
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "participant.h"

/* Checks type and id as every lock function does. */
static int check_key(saga__env *env, const char *type, const char *id) {
  if (type == NULL || type[0] == '\0' || id == NULL || id[0] == '\0')
    return saga__fail(env, SAGA_EINVAL, "a lock needs a type and an id (non-empty strings)");
  size_t tl = strlen(type), il = strlen(id);
  if (tl > SAGA_LOCK_TYPE_MAX)
    return saga__fail(env, SAGA_ETOOBIG,
                      "lock type is %zu bytes; the limit is %d "
                      "(SAGA_LOCK_TYPE_MAX)",
                      tl, SAGA_LOCK_TYPE_MAX);
  if (il > SAGA_LOCK_ID_MAX)
    return saga__fail(env, SAGA_ETOOBIG,
                      "lock id is %zu bytes; the limit is %d "
                      "(SAGA_LOCK_ID_MAX)",
                      il, SAGA_LOCK_ID_MAX);
  return SAGA_OK;
}

/* The tx's saga id, when a lock can name it (ids this library makes are 32 bytes). */
static int check_saga(saga__env *env, const saga_envelope *e) {
  if (e == NULL) /* an event handler's or saga_node_transact()'s transaction: no saga */
    return saga__fail(env, SAGA_ESTATE,
                      "a semantic lock is held by a saga: only a participant handler's "
                      "transaction takes or releases one (use saga_lock_holder() to test a "
                      "record elsewhere)");
  if (strlen(e->saga_id) >= SAGA_LOCK_HOLDER_SIZE)
    return saga__fail(env, SAGA_EINVAL, "saga id of %zu bytes cannot hold a lock (at most %d)",
                      strlen(e->saga_id), SAGA_LOCK_HOLDER_SIZE - 1);
  return SAGA_OK;
}

static int no_locks(saga__env *env) {
  return saga__fail(env, SAGA_ESTATE, "this node's store has no semantic locks");
}

int saga_lock_acquire(saga_tx *tx, const char *type, const char *id) {
  if (tx == NULL) return SAGA_EINVAL;
  saga__participant *p = tx->p;
  saga__env *env = p->env;
  saga__store *s = env->store;
  int rc = check_key(env, type, id);
  if (rc == SAGA_OK) rc = check_saga(env, tx->env);
  if (rc != SAGA_OK) return rc;
  if (s->m->lock_get == NULL) return no_locks(env);
  char holder[SAGA_LOCK_HOLDER_SIZE];
  uint32_t step = 0;
  rc = s->m->lock_get(s, type, id, holder, &step);
  if (rc == SAGA_OK) {
    if (strcmp(holder, tx->env->saga_id) == 0) return SAGA_OK; /* held already */
    char t[SAGA_LOCK_TYPE_MAX * 4 + 1], i[96];
    saga__printable(t, sizeof t, type, strlen(type));
    saga__printable(i, sizeof i, id, strlen(id));
    snprintf(p->lock_reason, sizeof p->lock_reason,
             "%s '%s' is held by saga %s (step %" PRIu32 "): semantic lock", t, i, holder, step);
    return saga__fail(env, SAGA_ELOCKED, "%s", p->lock_reason);
  }
  if (rc != SAGA_ENOTFOUND) return saga__store_fail(env, rc, "reading a semantic lock");
  rc = s->m->lock_put(s, type, id, tx->env->saga_id, tx->env->step, saga__now(env));
  return rc == SAGA_OK ? SAGA_OK : saga__store_fail(env, rc, "writing a semantic lock");
}

int saga_lock_release(saga_tx *tx, const char *type, const char *id) {
  if (tx == NULL) return SAGA_EINVAL;
  saga__env *env = tx->p->env;
  saga__store *s = env->store;
  int rc = check_key(env, type, id);
  if (rc == SAGA_OK) rc = check_saga(env, tx->env);
  if (rc != SAGA_OK) return rc;
  if (s->m->lock_delete == NULL) return no_locks(env);
  int deleted = 0;
  rc = s->m->lock_delete(s, type, id, tx->env->saga_id, &deleted);
  if (rc != SAGA_OK) return saga__store_fail(env, rc, "releasing a semantic lock");
  if (deleted) return SAGA_OK;
  char holder[SAGA_LOCK_HOLDER_SIZE];
  rc = s->m->lock_get(s, type, id, holder, NULL);
  if (rc == SAGA_ENOTFOUND) return saga__fail(env, SAGA_ENOTFOUND, "%s", "no saga holds this lock");
  if (rc != SAGA_OK) return saga__store_fail(env, rc, "reading a semantic lock");
  snprintf(tx->p->lock_reason, sizeof tx->p->lock_reason,
           "cannot release: the record is held by saga %s, not by this one", holder);
  return saga__fail(env, SAGA_ELOCKED, "%s", tx->p->lock_reason);
}

int saga_lock_release_all(saga_tx *tx, uint64_t *released) {
  if (tx == NULL) return SAGA_EINVAL;
  int rc = check_saga(tx->p->env, tx->env);
  if (rc != SAGA_OK) return rc;
  return saga__locks_release(tx->p->env, tx->env->saga_id, -1, released);
}

int saga__locks_release(saga__env *env, const char *saga_id, int64_t step, uint64_t *released) {
  saga__store *s = env->store;
  uint64_t n = 0;
  if (released != NULL) *released = 0;
  if (s->m->lock_release == NULL) return SAGA_OK; /* a store without locks holds none */
  int rc = s->m->lock_release(s, saga_id, step, &n);
  if (rc != SAGA_OK) return saga__store_fail(env, rc, "releasing semantic locks");
  if (released != NULL) *released = n;
  return SAGA_OK;
}
