/* The in-memory store for tests: see mem_store.h. */
#include "mem_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the state: one array per table ------------------------------------------------------ */

typedef struct ms_inst {
  saga__inst v; /* every column but data (v.data unused) */
  uint8_t *data;
  size_t len;
  char *idem;        /* NULL = none */
  uint64_t deadline; /* the earlier deadline; 0 when none or parked */
} ms_inst;

typedef struct ms_hist {
  saga__hist_rec r; /* r.detail_off unused */
  char *detail;
} ms_hist;

typedef struct ms_out {
  uint64_t id, created;
  char *channel, *saga_id;
  uint8_t *body;
  size_t len;
} ms_out;

typedef struct ms_inbox {
  char *msg_id, *saga_id, *reply_to;
  uint8_t *reply;
  size_t len;
  uint64_t received;
} ms_inbox;

typedef struct ms_pstep {
  char *saga_id;
  uint32_t step;
  int state;
  uint32_t attempt;
  uint8_t *reply; /* NULL = none */
  size_t len;
  uint64_t updated;
} ms_pstep;

typedef struct ms_dead {
  uint64_t id, at;
  char *channel, *msg_id, *reason;
  uint8_t *body;
  size_t len;
} ms_dead;

typedef struct ms_state {
  ms_inst *inst;
  size_t ninst, cinst;
  ms_hist *hist;
  size_t nhist, chist;
  ms_out *out; /* in id order */
  size_t nout, cout;
  ms_inbox *inbox;
  size_t ninbox, cinbox;
  ms_pstep *pstep;
  size_t npstep, cpstep;
  ms_dead *dead;
  size_t ndead, cdead;
  uint64_t outbox_mark;
  uint64_t purge_mark;
  int have_key;
  uint64_t key[2];
} ms_state;

typedef struct ms_fault {
  unsigned skip, count;
  int code;
} ms_fault;

#define MS_NSP 3 /* SAGA__SP_ITEM, SAGA__SP_HANDLER, SAGA__SP_OPERATOR */

typedef struct mem_store {
  saga__store base;
  ms_state st;
  int in_tx;
  ms_state tx_copy;         /* the state at begin */
  ms_state sp_copy[MS_NSP]; /* the state at each open savepoint */
  unsigned sp_seq[MS_NSP];  /* order of the open savepoints (0 = not open) */
  unsigned sp_next;
  int64_t writes;
  ms_fault faults[MEM_OP__COUNT];
  unsigned long calls[MEM_OP__COUNT];
  char err[256];
} mem_store;

#define MS(s) ((mem_store *)(void *)(s))
#define CMS(s) ((const mem_store *)(const void *)(s))

static const char *const op_names[MEM_OP__COUNT] = {
    "begin",           "commit",        "rollback",      "savepoint",     "release",
    "rollback_to",     "inst_load",     "inst_find_key", "inst_insert",   "inst_save",
    "inst_due",        "inst_next_due", "inst_inflight", "inst_unpark",   "inst_count",
    "hist_insert",     "outbox_max",    "outbox_mark",   "outbox_insert", "outbox_delete",
    "outbox_after",    "outbox_stale",  "outbox_get",    "outbox_count",  "inbox_get",
    "inbox_insert",    "pstep_get",     "pstep_put",     "dead_insert",   "finished_before",
    "finished_beyond", "purge_saga",    "sweep",         "reply_key"};

const char *mem_store_op_name(mem_store_op op) {
  return (int)op >= 0 && op < MEM_OP__COUNT ? op_names[op] : "?";
}

static int fail(mem_store *s, int code, const char *what) {
  snprintf(s->err, sizeof s->err, "%s", what);
  return code;
}

/* Counts a call of op and applies its fault switch. */
static int fault(mem_store *s, mem_store_op op) {
  s->calls[op]++;
  ms_fault *f = &s->faults[op];
  if (f->count == 0) return SAGA_OK;
  if (f->skip > 0) {
    f->skip--;
    return SAGA_OK;
  }
  f->count--;
  snprintf(s->err, sizeof s->err, "injected failure of %s", op_names[op]);
  return f->code;
}

#define FAULT(s, op)                                                                               \
  do {                                                                                             \
    int fault_rc_ = fault((s), (op));                                                              \
    if (fault_rc_ != SAGA_OK) return fault_rc_;                                                    \
  } while (0)

/* ---- small helpers ------------------------------------------------------------------------ */

static char *dup_str(const char *p) {
  if (p == NULL) p = "";
  size_t n = strlen(p) + 1;
  char *c = malloc(n);
  if (c != NULL) memcpy(c, p, n);
  return c;
}

/* A copy of len bytes (at least one byte allocated, so NULL means out of memory). */
static uint8_t *dup_mem(const void *p, size_t len) {
  uint8_t *c = malloc(len ? len : 1);
  if (c != NULL && len > 0) memcpy(c, p, len);
  return c;
}

/* Room for one more element in *arr (n used, *cap allocated). */
static int grow(void **arr, size_t n, size_t *cap, size_t size) {
  if (n < *cap) return SAGA_OK;
  size_t nc = *cap ? *cap * 2 : 8;
  void *p = realloc(*arr, nc * size);
  if (p == NULL) return SAGA_ENOMEM;
  *arr = p;
  *cap = nc;
  return SAGA_OK;
}

static void copy_id(char *dst, size_t cap, const char *src) {
  snprintf(dst, cap, "%s", src != NULL ? src : "");
}

/* ---- freeing and copying the state -------------------------------------------------------- */

static void inst_free(ms_inst *r) {
  free(r->data);
  free(r->idem);
}
static void hist_free(ms_hist *r) { free(r->detail); }
static void out_free(ms_out *r) {
  free(r->channel);
  free(r->saga_id);
  free(r->body);
}
static void inbox_free(ms_inbox *r) {
  free(r->msg_id);
  free(r->saga_id);
  free(r->reply_to);
  free(r->reply);
}
static void pstep_free(ms_pstep *r) {
  free(r->saga_id);
  free(r->reply);
}
static void dead_free(ms_dead *r) {
  free(r->channel);
  free(r->msg_id);
  free(r->reason);
  free(r->body);
}

static void state_free(ms_state *st) {
  for (size_t k = 0; k < st->ninst; k++) inst_free(&st->inst[k]);
  for (size_t k = 0; k < st->nhist; k++) hist_free(&st->hist[k]);
  for (size_t k = 0; k < st->nout; k++) out_free(&st->out[k]);
  for (size_t k = 0; k < st->ninbox; k++) inbox_free(&st->inbox[k]);
  for (size_t k = 0; k < st->npstep; k++) pstep_free(&st->pstep[k]);
  for (size_t k = 0; k < st->ndead; k++) dead_free(&st->dead[k]);
  free(st->inst);
  free(st->hist);
  free(st->out);
  free(st->inbox);
  free(st->pstep);
  free(st->dead);
  memset(st, 0, sizeof *st);
}

/* Copies the array src->F (n elements) into dst->F, element by element with COPY(d, s),
 * which sets `bad` when an allocation failed. */
#define COPY_TABLE(F, N, C, TYPE, COPY)                                                            \
  do {                                                                                             \
    if (src->N > 0) {                                                                              \
      dst->F = calloc(src->N, sizeof(TYPE));                                                       \
      if (dst->F == NULL) {                                                                        \
        bad = 1;                                                                                   \
        break;                                                                                     \
      }                                                                                            \
      dst->C = dst->N = src->N;                                                                    \
      for (size_t k = 0; k < src->N; k++) {                                                        \
        TYPE *d = &dst->F[k];                                                                      \
        const TYPE *s = &src->F[k];                                                                \
        *d = *s;                                                                                   \
        COPY;                                                                                      \
      }                                                                                            \
    }                                                                                              \
  } while (0)

/* dst = a deep copy of src. SAGA_OK or SAGA_ENOMEM (dst then empty). */
static int state_copy(ms_state *dst, const ms_state *src) {
  int bad = 0;
  memset(dst, 0, sizeof *dst);
  COPY_TABLE(inst, ninst, cinst, ms_inst, {
    d->data = dup_mem(s->data, s->len);
    d->idem = s->idem != NULL ? dup_str(s->idem) : NULL;
    if (d->data == NULL || (s->idem != NULL && d->idem == NULL)) bad = 1;
  });
  COPY_TABLE(hist, nhist, chist, ms_hist, {
    d->detail = dup_str(s->detail);
    if (d->detail == NULL) bad = 1;
  });
  COPY_TABLE(out, nout, cout, ms_out, {
    d->channel = dup_str(s->channel);
    d->saga_id = dup_str(s->saga_id);
    d->body = dup_mem(s->body, s->len);
    if (d->channel == NULL || d->saga_id == NULL || d->body == NULL) bad = 1;
  });
  COPY_TABLE(inbox, ninbox, cinbox, ms_inbox, {
    d->msg_id = dup_str(s->msg_id);
    d->saga_id = dup_str(s->saga_id);
    d->reply_to = dup_str(s->reply_to);
    d->reply = dup_mem(s->reply, s->len);
    if (d->msg_id == NULL || d->saga_id == NULL || d->reply_to == NULL || d->reply == NULL) bad = 1;
  });
  COPY_TABLE(pstep, npstep, cpstep, ms_pstep, {
    d->saga_id = dup_str(s->saga_id);
    d->reply = s->reply != NULL ? dup_mem(s->reply, s->len) : NULL;
    if (d->saga_id == NULL || (s->reply != NULL && d->reply == NULL)) bad = 1;
  });
  COPY_TABLE(dead, ndead, cdead, ms_dead, {
    d->channel = dup_str(s->channel);
    d->msg_id = dup_str(s->msg_id);
    d->reason = dup_str(s->reason);
    d->body = dup_mem(s->body, s->len);
    if (d->channel == NULL || d->msg_id == NULL || d->reason == NULL || d->body == NULL) bad = 1;
  });
  dst->outbox_mark = src->outbox_mark;
  dst->purge_mark = src->purge_mark;
  dst->have_key = src->have_key;
  dst->key[0] = src->key[0];
  dst->key[1] = src->key[1];
  if (bad) {
    /* Every pointer of dst is its own copy or NULL: freeing dst frees only what it owns. */
    state_free(dst);
    return SAGA_ENOMEM;
  }
  return SAGA_OK;
}

/* ---- transactions ------------------------------------------------------------------------- */

static void sp_drop(mem_store *s, int k) {
  if (s->sp_seq[k] == 0) return;
  state_free(&s->sp_copy[k]);
  s->sp_seq[k] = 0;
}

/* Drops the savepoints opened after savepoint k (they are nested in it). */
static void sp_drop_after(mem_store *s, int k) {
  for (int j = 0; j < MS_NSP; j++)
    if (j != k && s->sp_seq[j] > s->sp_seq[k]) sp_drop(s, j);
}

static int m_begin(saga__store *ss) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_BEGIN);
  if (s->in_tx) return fail(s, SAGA_ESTORE, "cannot start a transaction within a transaction");
  if (state_copy(&s->tx_copy, &s->st) != SAGA_OK) return fail(s, SAGA_ENOMEM, "out of memory");
  s->in_tx = 1;
  return SAGA_OK;
}

static int m_commit(saga__store *ss) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_COMMIT);
  if (!s->in_tx) return fail(s, SAGA_ESTORE, "cannot commit - no transaction is active");
  for (int k = 0; k < MS_NSP; k++) sp_drop(s, k);
  state_free(&s->tx_copy);
  s->in_tx = 0;
  return SAGA_OK;
}

static int m_rollback(saga__store *ss) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_ROLLBACK);
  if (!s->in_tx) return fail(s, SAGA_ESTORE, "cannot rollback - no transaction is active");
  for (int k = 0; k < MS_NSP; k++) sp_drop(s, k);
  state_free(&s->st);
  s->st = s->tx_copy; /* moved: tx_copy's arrays now belong to st */
  memset(&s->tx_copy, 0, sizeof s->tx_copy);
  s->in_tx = 0;
  return SAGA_OK;
}

static int m_in_tx(saga__store *ss) { return MS(ss)->in_tx; }

static int sp_index(saga__savepoint sp) { return sp == SAGA__SP_ITEM ? 0 : sp == SAGA__SP_HANDLER ? 1 : 2; }

static int m_savepoint(saga__store *ss, saga__savepoint sp) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_SAVEPOINT);
  if (!s->in_tx) return fail(s, SAGA_ESTORE, "savepoint outside a transaction");
  int k = sp_index(sp);
  sp_drop(s, k);
  if (state_copy(&s->sp_copy[k], &s->st) != SAGA_OK) return fail(s, SAGA_ENOMEM, "out of memory");
  s->sp_seq[k] = ++s->sp_next;
  return SAGA_OK;
}

static int m_release(saga__store *ss, saga__savepoint sp) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_RELEASE);
  int k = sp_index(sp);
  if (!s->in_tx || s->sp_seq[k] == 0) return fail(s, SAGA_ESTORE, "no such savepoint");
  sp_drop_after(s, k);
  sp_drop(s, k);
  return SAGA_OK;
}

static int m_rollback_to(saga__store *ss, saga__savepoint sp) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_ROLLBACK_TO);
  int k = sp_index(sp);
  if (!s->in_tx || s->sp_seq[k] == 0) return fail(s, SAGA_ESTORE, "no such savepoint");
  ms_state copy;
  if (state_copy(&copy, &s->sp_copy[k]) != SAGA_OK) return fail(s, SAGA_ENOMEM, "out of memory");
  sp_drop_after(s, k);
  state_free(&s->st);
  s->st = copy; /* the savepoint stays open */
  return SAGA_OK;
}

static int64_t m_writes(saga__store *ss) { return MS(ss)->writes; }

/* ---- instances ---------------------------------------------------------------------------- */

static ms_inst *find_inst(ms_state *st, const char *id) {
  for (size_t k = 0; k < st->ninst; k++)
    if (strcmp(st->inst[k].v.id, id) == 0) return &st->inst[k];
  return NULL;
}

static void set_deadline(ms_inst *r) {
  r->deadline = r->v.parked ? 0 : saga__inst_next_deadline(&r->v);
}

static int m_inst_load(saga__store *ss, const char *id, saga__inst *i) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INST_LOAD);
  const ms_inst *r = find_inst(&s->st, id);
  if (r == NULL) return SAGA_ENOTFOUND;
  saga__buf data = i->data;
  *i = r->v;
  i->data = data;
  saga__buf_reset(&i->data);
  int rc = r->len > 0 ? saga__buf_append(&i->data, r->data, r->len) : SAGA_OK;
  i->saved_state = i->state;
  i->saved_parked = i->parked;
  i->def = NULL;
  i->exists = 1;
  return rc != SAGA_OK ? fail(s, rc, "out of memory") : SAGA_OK;
}

/* Keys are unique per definition name, as in the SQLite backend (schema migration 5). */
static const ms_inst *find_key(const ms_state *st, const char *def_name, const char *key) {
  for (size_t k = 0; k < st->ninst; k++)
    if (st->inst[k].idem != NULL && strcmp(st->inst[k].idem, key) == 0 &&
        strcmp(st->inst[k].v.def_name, def_name) == 0)
      return &st->inst[k];
  return NULL;
}

static int m_inst_find_key(saga__store *ss, const char *def_name, const char *key,
                           char id_out[40]) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INST_FIND_KEY);
  const ms_inst *r = find_key(&s->st, def_name, key);
  if (r == NULL) return SAGA_ENOTFOUND;
  copy_id(id_out, 40, r->v.id);
  return SAGA_OK;
}

static int m_inst_insert(saga__store *ss, const saga__inst *i, const char *idem_key) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INST_INSERT);
  if (find_inst(&s->st, i->id) != NULL)
    return fail(s, SAGA_EEXIST, "UNIQUE constraint failed: saga_instance.id");
  if (idem_key != NULL && find_key(&s->st, i->def_name, idem_key) != NULL)
    return fail(s, SAGA_EEXIST,
                "UNIQUE constraint failed: saga_instance.def_name, saga_instance.idem_key");
  if (grow((void **)&s->st.inst, s->st.ninst, &s->st.cinst, sizeof(ms_inst)) != SAGA_OK)
    return fail(s, SAGA_ENOMEM, "out of memory");
  ms_inst r;
  memset(&r, 0, sizeof r);
  r.v = *i;
  memset(&r.v.data, 0, sizeof r.v.data);
  r.v.def = NULL;
  r.v.exists = 0;
  r.v.saved_state = r.v.saved_parked = 0;
  r.data = dup_mem(i->data.data, i->data.len);
  r.len = i->data.len;
  r.idem = idem_key != NULL ? dup_str(idem_key) : NULL;
  if (r.data == NULL || (idem_key != NULL && r.idem == NULL)) {
    inst_free(&r);
    return fail(s, SAGA_ENOMEM, "out of memory");
  }
  /* As the SQLite backend: a new row is not parked; its due time follows the given one. */
  r.deadline = i->parked ? 0 : saga__inst_next_deadline(i);
  r.v.parked = 0;
  s->st.inst[s->st.ninst++] = r;
  s->writes++;
  return SAGA_OK;
}

static int m_inst_save(saga__store *ss, const saga__inst *i) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INST_SAVE);
  ms_inst *r = find_inst(&s->st, i->id);
  if (r == NULL) return SAGA_OK; /* an UPDATE of no row: nothing written */
  uint8_t *data = dup_mem(i->data.data, i->data.len);
  if (data == NULL) return fail(s, SAGA_ENOMEM, "out of memory");
  free(r->data);
  r->data = data;
  r->len = i->data.len;
  /* As the SQLite backend: state and parked are written only when they differ from what
   * was loaded (saved_state, saved_parked). */
  if (i->state != i->saved_state || i->parked != i->saved_parked) {
    r->v.state = i->state;
    r->v.parked = i->parked;
  }
  r->v.phase = i->phase;
  r->v.step = i->step;
  r->v.attempt = i->attempt;
  r->v.wait = i->wait;
  r->v.flags = i->flags;
  r->v.hseq = i->hseq;
  memcpy(r->v.error, i->error, sizeof r->v.error);
  r->v.error[sizeof r->v.error - 1] = '\0';
  r->v.updated_ms = i->updated_ms;
  r->v.step_deadline = i->step_deadline;
  r->v.saga_deadline = i->saga_deadline;
  memcpy(r->v.attempt_span, i->attempt_span, sizeof r->v.attempt_span);
  r->v.attempt_span[sizeof r->v.attempt_span - 1] = '\0';
  r->v.attempt_ns = i->attempt_ns;
  r->deadline = i->parked ? 0 : saga__inst_next_deadline(i);
  s->writes++;
  return SAGA_OK;
}

/* Indexes of rows sorted by a key, ties in row order. */
typedef struct ms_key {
  uint64_t key;
  size_t idx;
} ms_key;

static int key_cmp(const void *a, const void *b) {
  const ms_key *x = a, *y = b;
  if (x->key != y->key) return x->key < y->key ? -1 : 1;
  return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static int m_inst_due(saga__store *ss, uint64_t now, size_t max, saga__buf *ids, size_t *count) {
  mem_store *s = MS(ss);
  *count = 0;
  FAULT(s, MEM_OP_INST_DUE);
  ms_key *keys = malloc((s->st.ninst ? s->st.ninst : 1) * sizeof *keys);
  if (keys == NULL) return fail(s, SAGA_ENOMEM, "out of memory");
  size_t n = 0;
  for (size_t k = 0; k < s->st.ninst; k++) {
    const ms_inst *r = &s->st.inst[k];
    if (r->deadline != 0 && r->deadline <= now) keys[n++] = (ms_key){r->deadline, k};
  }
  qsort(keys, n, sizeof *keys, key_cmp);
  int rc = SAGA_OK;
  for (size_t k = 0; k < n && k < max && rc == SAGA_OK; k++) {
    char id[40];
    memset(id, 0, sizeof id);
    copy_id(id, sizeof id, s->st.inst[keys[k].idx].v.id);
    rc = saga__buf_append(ids, id, sizeof id);
    if (rc == SAGA_OK) (*count)++;
  }
  free(keys);
  return rc != SAGA_OK ? fail(s, rc, "out of memory") : SAGA_OK;
}

static int m_inst_next_due(saga__store *ss, uint64_t *at) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INST_NEXT_DUE);
  int found = 0;
  for (size_t k = 0; k < s->st.ninst; k++) {
    uint64_t d = s->st.inst[k].deadline;
    if (d != 0 && (!found || d < *at)) {
      *at = d;
      found = 1;
    }
  }
  return found ? SAGA_OK : SAGA_ENOTFOUND;
}

static int m_inst_inflight(saga__store *ss, saga__inflight_fn fn, void *arg) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INST_INFLIGHT);
  for (size_t k = 0; k < s->st.ninst; k++) {
    const saga__inst *v = &s->st.inst[k].v;
    if (v->state == SAGA_RUNNING || v->state == SAGA_COMPENSATING)
      fn(arg, v->id, v->def_name, v->def_version, v->parked);
  }
  return SAGA_OK;
}

static int m_inst_unpark(saga__store *ss, const char *id) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INST_UNPARK);
  ms_inst *r = find_inst(&s->st, id);
  if (r == NULL) return SAGA_OK;
  r->v.parked = 0;
  set_deadline(r);
  s->writes++;
  return SAGA_OK;
}

static int m_inst_count(saga__store *ss, int64_t counts[6]) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INST_COUNT);
  for (int k = 0; k < 6; k++) counts[k] = 0;
  for (size_t k = 0; k < s->st.ninst; k++) {
    int state = s->st.inst[k].v.state;
    if (state >= 1 && state <= 5) counts[state]++;
  }
  return SAGA_OK;
}

/* ---- history ------------------------------------------------------------------------------ */

static int hist_exists(const ms_state *st, const char *saga_id, int64_t seq) {
  for (size_t k = 0; k < st->nhist; k++)
    if (st->hist[k].r.seq == seq && strcmp(st->hist[k].r.saga_id, saga_id) == 0) return 1;
  return 0;
}

static int m_hist_insert(saga__store *ss, const saga__hist_rec *rows, size_t count,
                         const char *text) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_HIST_INSERT);
  /* All or nothing: check every key first (also against the other rows of the call). */
  for (size_t k = 0; k < count; k++) {
    int dup = hist_exists(&s->st, rows[k].saga_id, rows[k].seq);
    for (size_t j = 0; j < k && !dup; j++)
      dup = rows[j].seq == rows[k].seq && strcmp(rows[j].saga_id, rows[k].saga_id) == 0;
    if (dup) return fail(s, SAGA_EEXIST, "UNIQUE constraint failed: saga_history.saga_id, seq");
  }
  size_t n0 = s->st.nhist;
  for (size_t k = 0; k < count; k++) {
    ms_hist h;
    h.r = rows[k];
    h.r.detail_off = 0;
    h.detail = dup_str(text != NULL ? text + rows[k].detail_off : "");
    if (h.detail == NULL ||
        grow((void **)&s->st.hist, s->st.nhist, &s->st.chist, sizeof(ms_hist)) != SAGA_OK) {
      free(h.detail);
      while (s->st.nhist > n0) hist_free(&s->st.hist[--s->st.nhist]);
      return fail(s, SAGA_ENOMEM, "out of memory");
    }
    s->st.hist[s->st.nhist++] = h;
  }
  s->writes += (int64_t)count;
  return SAGA_OK;
}

static int m_hist_get(saga__store *ss, const char *saga_id, int64_t seq, int *type,
                      saga__buf *detail) {
  mem_store *s = MS(ss);
  for (size_t k = 0; k < s->st.nhist; k++) {
    const ms_hist *h = &s->st.hist[k];
    if (h->r.seq != seq || strcmp(h->r.saga_id, saga_id) != 0) continue;
    *type = h->r.type;
    saga__buf_reset(detail);
    if (saga__buf_append(detail, h->detail, strlen(h->detail) + 1) != SAGA_OK)
      return fail(s, SAGA_ENOMEM, "out of memory");
    return SAGA_OK;
  }
  return SAGA_ENOTFOUND;
}

/* ---- outbox ------------------------------------------------------------------------------- */

static int m_outbox_max(saga__store *ss, uint64_t *max) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_OUTBOX_MAX);
  uint64_t m = s->st.outbox_mark;
  if (s->st.nout > 0 && s->st.out[s->st.nout - 1].id > m) m = s->st.out[s->st.nout - 1].id;
  *max = m;
  return SAGA_OK;
}

static int m_outbox_mark(saga__store *ss, uint64_t id) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_OUTBOX_MARK);
  if (s->st.outbox_mark < id) {
    s->st.outbox_mark = id;
    s->writes++;
  }
  return SAGA_OK;
}

static int m_outbox_insert(saga__store *ss, uint64_t id, const char *channel, const char *saga_id,
                           const void *body, size_t len, uint64_t now) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_OUTBOX_INSERT);
  size_t pos = s->st.nout;
  while (pos > 0 && s->st.out[pos - 1].id > id) pos--;
  if (pos > 0 && s->st.out[pos - 1].id == id)
    return fail(s, SAGA_EEXIST, "UNIQUE constraint failed: saga_outbox.id");
  if (grow((void **)&s->st.out, s->st.nout, &s->st.cout, sizeof(ms_out)) != SAGA_OK)
    return fail(s, SAGA_ENOMEM, "out of memory");
  ms_out r;
  r.id = id;
  r.created = now;
  r.channel = dup_str(channel);
  r.saga_id = dup_str(saga_id);
  r.body = dup_mem(body, len);
  r.len = len;
  if (r.channel == NULL || r.saga_id == NULL || r.body == NULL) {
    out_free(&r);
    return fail(s, SAGA_ENOMEM, "out of memory");
  }
  memmove(&s->st.out[pos + 1], &s->st.out[pos], (s->st.nout - pos) * sizeof(ms_out));
  s->st.out[pos] = r;
  s->st.nout++;
  s->writes++;
  return SAGA_OK;
}

static int m_outbox_delete(saga__store *ss, uint64_t lo, uint64_t hi, uint64_t *deleted) {
  mem_store *s = MS(ss);
  *deleted = 0;
  FAULT(s, MEM_OP_OUTBOX_DELETE);
  size_t w = 0;
  for (size_t k = 0; k < s->st.nout; k++) {
    if (s->st.out[k].id >= lo && s->st.out[k].id <= hi) {
      out_free(&s->st.out[k]);
      (*deleted)++;
    } else {
      s->st.out[w++] = s->st.out[k];
    }
  }
  s->st.nout = w;
  s->writes += (int64_t)*deleted;
  return SAGA_OK;
}

static int m_outbox_after(saga__store *ss, uint64_t after, size_t max, saga__outbox_fn fn,
                          void *arg, size_t *rows) {
  mem_store *s = MS(ss);
  *rows = 0;
  FAULT(s, MEM_OP_OUTBOX_AFTER);
  for (size_t k = 0; k < s->st.nout && *rows < max; k++) {
    const ms_out *r = &s->st.out[k];
    if (r->id <= after) continue;
    fn(arg, r->id, r->channel, r->body, r->len);
    (*rows)++;
  }
  return SAGA_OK;
}

static int m_outbox_stale(saga__store *ss, uint64_t after, uint64_t upto, uint64_t created,
                          size_t max, saga__outbox_fn fn, void *arg, size_t *rows) {
  mem_store *s = MS(ss);
  *rows = 0;
  FAULT(s, MEM_OP_OUTBOX_STALE);
  for (size_t k = 0; k < s->st.nout && *rows < max; k++) {
    const ms_out *r = &s->st.out[k];
    if (r->id <= after || r->id > upto || r->created > created) continue;
    fn(arg, r->id, r->channel, r->body, r->len);
    (*rows)++;
  }
  return SAGA_OK;
}

static int m_outbox_get(saga__store *ss, uint64_t id, saga__buf *channel, saga__buf *body) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_OUTBOX_GET);
  for (size_t k = 0; k < s->st.nout; k++) {
    const ms_out *r = &s->st.out[k];
    if (r->id != id) continue;
    int rc = saga__buf_append(channel, r->channel, strlen(r->channel) + 1);
    if (rc == SAGA_OK && r->len > 0) rc = saga__buf_append(body, r->body, r->len);
    return rc != SAGA_OK ? fail(s, rc, "out of memory") : SAGA_OK;
  }
  return SAGA_ENOTFOUND;
}

static int m_outbox_count(saga__store *ss, int64_t *count) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_OUTBOX_COUNT);
  *count = (int64_t)s->st.nout;
  return SAGA_OK;
}

/* ---- participant: inbox and step records -------------------------------------------------- */

static ms_inbox *find_inbox(ms_state *st, const char *msg_id) {
  for (size_t k = 0; k < st->ninbox; k++)
    if (strcmp(st->inbox[k].msg_id, msg_id) == 0) return &st->inbox[k];
  return NULL;
}

static int m_inbox_get(saga__store *ss, const char *msg_id, saga__buf *reply_to, saga__buf *reply) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INBOX_GET);
  const ms_inbox *r = find_inbox(&s->st, msg_id);
  if (r == NULL) return SAGA_ENOTFOUND;
  int rc = saga__buf_append(reply_to, r->reply_to, strlen(r->reply_to) + 1);
  if (rc == SAGA_OK && r->len > 0) rc = saga__buf_append(reply, r->reply, r->len);
  return rc != SAGA_OK ? fail(s, rc, "out of memory") : SAGA_OK;
}

static int m_inbox_insert(saga__store *ss, const char *msg_id, const char *saga_id, uint64_t now,
                          const char *reply_to, const void *reply, size_t len) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_INBOX_INSERT);
  if (find_inbox(&s->st, msg_id) != NULL)
    return fail(s, SAGA_EEXIST, "UNIQUE constraint failed: saga_inbox.msg_id");
  if (grow((void **)&s->st.inbox, s->st.ninbox, &s->st.cinbox, sizeof(ms_inbox)) != SAGA_OK)
    return fail(s, SAGA_ENOMEM, "out of memory");
  ms_inbox r;
  r.msg_id = dup_str(msg_id);
  r.saga_id = dup_str(saga_id);
  r.reply_to = dup_str(reply_to);
  r.reply = dup_mem(reply, len);
  r.len = len;
  r.received = now;
  if (r.msg_id == NULL || r.saga_id == NULL || r.reply_to == NULL || r.reply == NULL) {
    inbox_free(&r);
    return fail(s, SAGA_ENOMEM, "out of memory");
  }
  s->st.inbox[s->st.ninbox++] = r;
  s->writes++;
  return SAGA_OK;
}

static ms_pstep *find_pstep(ms_state *st, const char *saga_id, uint32_t step) {
  for (size_t k = 0; k < st->npstep; k++)
    if (st->pstep[k].step == step && strcmp(st->pstep[k].saga_id, saga_id) == 0)
      return &st->pstep[k];
  return NULL;
}

static int m_pstep_get(saga__store *ss, const char *saga_id, uint32_t step, int *state,
                       uint32_t *attempt, saga__buf *reply) {
  mem_store *s = MS(ss);
  *state = 0;
  *attempt = 0;
  FAULT(s, MEM_OP_PSTEP_GET);
  const ms_pstep *r = find_pstep(&s->st, saga_id, step);
  if (r == NULL) return SAGA_OK;
  *state = r->state;
  *attempt = r->attempt;
  int rc = r->reply != NULL && r->len > 0 ? saga__buf_append(reply, r->reply, r->len) : SAGA_OK;
  return rc != SAGA_OK ? fail(s, rc, "out of memory") : SAGA_OK;
}

static int m_pstep_put(saga__store *ss, const char *saga_id, uint32_t step, int state,
                       uint32_t attempt, const void *reply, size_t len, uint64_t now) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_PSTEP_PUT);
  uint8_t *copy = NULL;
  if (reply != NULL && (copy = dup_mem(reply, len)) == NULL)
    return fail(s, SAGA_ENOMEM, "out of memory");
  ms_pstep *r = find_pstep(&s->st, saga_id, step);
  if (r == NULL) {
    char *id = dup_str(saga_id);
    if (id == NULL ||
        grow((void **)&s->st.pstep, s->st.npstep, &s->st.cpstep, sizeof(ms_pstep)) != SAGA_OK) {
      free(id);
      free(copy);
      return fail(s, SAGA_ENOMEM, "out of memory");
    }
    r = &s->st.pstep[s->st.npstep++];
    memset(r, 0, sizeof *r);
    r->saga_id = id;
    r->step = step;
  }
  free(r->reply);
  r->reply = copy;
  r->len = reply != NULL ? len : 0;
  r->state = state;
  r->attempt = attempt;
  r->updated = now;
  s->writes++;
  return SAGA_OK;
}

/* ---- dead letters ------------------------------------------------------------------------- */

static int m_dead_insert(saga__store *ss, uint64_t now, const char *channel, const char *msg_id,
                         const char *reason, const void *body, size_t len, uint64_t keep,
                         uint64_t *dropped) {
  mem_store *s = MS(ss);
  *dropped = 0;
  FAULT(s, MEM_OP_DEAD_INSERT);
  if (grow((void **)&s->st.dead, s->st.ndead, &s->st.cdead, sizeof(ms_dead)) != SAGA_OK)
    return fail(s, SAGA_ENOMEM, "out of memory");
  ms_dead r;
  r.id = s->st.ndead > 0 ? s->st.dead[s->st.ndead - 1].id + 1 : 1;
  r.at = now;
  r.channel = dup_str(channel);
  r.msg_id = dup_str(msg_id);
  r.reason = dup_str(reason);
  r.body = dup_mem(body, len);
  r.len = len;
  if (r.channel == NULL || r.msg_id == NULL || r.reason == NULL || r.body == NULL) {
    dead_free(&r);
    return fail(s, SAGA_ENOMEM, "out of memory");
  }
  s->st.dead[s->st.ndead++] = r;
  s->writes++;
  if (keep > 0 && s->st.ndead > keep) { /* the oldest beyond the newest keep */
    size_t n = s->st.ndead - (size_t)keep;
    for (size_t i = 0; i < n; i++) dead_free(&s->st.dead[i]);
    memmove(s->st.dead, s->st.dead + n, (size_t)keep * sizeof *s->st.dead);
    s->st.ndead = (size_t)keep;
    *dropped = n;
  }
  return SAGA_OK;
}

/* ---- retention ---------------------------------------------------------------------------- */

static int finished(const ms_inst *r) {
  return r->v.state == SAGA_COMPLETED || r->v.state == SAGA_COMPENSATED;
}

/* Appends the ids of keys[from .. from+max) (NUL-separated) to ids. */
static int append_ids(mem_store *s, const ms_key *keys, size_t n, size_t from, size_t max,
                      saga__buf *ids, size_t *count) {
  for (size_t k = from; k < n && *count < max; k++) {
    const char *id = s->st.inst[keys[k].idx].v.id;
    if (saga__buf_append(ids, id, strlen(id) + 1) != SAGA_OK)
      return fail(s, SAGA_ENOMEM, "out of memory");
    (*count)++;
  }
  return SAGA_OK;
}

static int m_finished_before(saga__store *ss, uint64_t cutoff, size_t max, saga__buf *ids,
                             size_t *count) {
  mem_store *s = MS(ss);
  *count = 0;
  FAULT(s, MEM_OP_FINISHED_BEFORE);
  ms_key *keys = malloc((s->st.ninst ? s->st.ninst : 1) * sizeof *keys);
  if (keys == NULL) return fail(s, SAGA_ENOMEM, "out of memory");
  size_t n = 0;
  for (size_t k = 0; k < s->st.ninst; k++) {
    const ms_inst *r = &s->st.inst[k];
    if (finished(r) && r->v.updated_ms < cutoff) keys[n++] = (ms_key){r->v.updated_ms, k};
  }
  qsort(keys, n, sizeof *keys, key_cmp); /* oldest first */
  int rc = append_ids(s, keys, n, 0, max, ids, count);
  free(keys);
  return rc;
}

static int m_finished_beyond(saga__store *ss, uint64_t keep, size_t max, saga__buf *ids,
                             size_t *count) {
  mem_store *s = MS(ss);
  *count = 0;
  FAULT(s, MEM_OP_FINISHED_BEYOND);
  ms_key *keys = malloc((s->st.ninst ? s->st.ninst : 1) * sizeof *keys);
  if (keys == NULL) return fail(s, SAGA_ENOMEM, "out of memory");
  size_t n = 0;
  for (size_t k = 0; k < s->st.ninst; k++) {
    const ms_inst *r = &s->st.inst[k];
    /* Newest first: sort by the complement of the time. */
    if (finished(r)) keys[n++] = (ms_key){UINT64_MAX - r->v.updated_ms, k};
  }
  qsort(keys, n, sizeof *keys, key_cmp);
  int rc = keep < n ? append_ids(s, keys, n, (size_t)keep, max, ids, count) : SAGA_OK;
  free(keys);
  return rc;
}

static int m_purge_saga(saga__store *ss, const char *id, int *deleted) {
  mem_store *s = MS(ss);
  *deleted = 0;
  FAULT(s, MEM_OP_PURGE_SAGA);
  ms_inst *r = find_inst(&s->st, id);
  if (r == NULL || !finished(r)) return SAGA_OK;
  size_t k = (size_t)(r - s->st.inst);
  inst_free(r);
  memmove(&s->st.inst[k], &s->st.inst[k + 1], (s->st.ninst - k - 1) * sizeof(ms_inst));
  s->st.ninst--;
  s->writes++;
  size_t w = 0;
  for (size_t j = 0; j < s->st.nhist; j++) {
    if (strcmp(s->st.hist[j].r.saga_id, id) == 0) {
      hist_free(&s->st.hist[j]);
      s->writes++;
    } else {
      s->st.hist[w++] = s->st.hist[j];
    }
  }
  s->st.nhist = w;
  *deleted = 1;
  return SAGA_OK;
}

/* A sweep key: text, and a step (-1 for the inbox, whose keys have no step part). */
static int sweep_cmp(const char *a, int64_t as, const char *b, int64_t bs) {
  int c = strcmp(a, b);
  if (c != 0) return c;
  return as < bs ? -1 : as > bs;
}

typedef struct ms_skey {
  const char *key;
  int64_t step;
  size_t idx;
} ms_skey;

static int skey_cmp(const void *a, const void *b) {
  const ms_skey *x = a, *y = b;
  return sweep_cmp(x->key, x->step, y->key, y->step);
}

/* As the SQLite backend: among the keys after the cursor, in key order, a full batch
 * (`batch` keys) deletes its old records up to its last key and moves the cursor there
 * (*more = 1); fewer than a batch delete every old record after the cursor and put it back to
 * the start. */
static int m_sweep(saga__store *ss, saga__sweep_table table, saga__sweep *c, size_t batch,
                   uint64_t cutoff, uint64_t *deleted, int *more) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_SWEEP);
  int inbox = table == SAGA__SWEEP_INBOX;
  size_t n = inbox ? s->st.ninbox : s->st.npstep;
  const char *from = c->key.len ? (const char *)c->key.data : "";
  int64_t from_step = inbox ? -1 : c->key_step;
  ms_skey *keys = malloc((n ? n : 1) * sizeof *keys);
  if (keys == NULL) return fail(s, SAGA_ENOMEM, "out of memory");
  size_t m = 0;
  for (size_t k = 0; k < n; k++) {
    ms_skey key;
    key.key = inbox ? s->st.inbox[k].msg_id : s->st.pstep[k].saga_id;
    key.step = inbox ? -1 : (int64_t)s->st.pstep[k].step;
    key.idx = k;
    if (sweep_cmp(key.key, key.step, from, from_step) > 0) keys[m++] = key;
  }
  qsort(keys, m, sizeof *keys, skey_cmp);
  int full = batch > 0 && m >= batch;
  size_t upto = full ? batch : m; /* keys[0 .. upto) are walked */
  /* Mark the old records walked, then compact the table. */
  char *drop = calloc(n ? n : 1, 1);
  saga__buf edge;
  saga__buf_init(&edge, NULL);
  int64_t edge_step = -1;
  int rc = SAGA_OK;
  if (drop == NULL) rc = SAGA_ENOMEM;
  if (rc == SAGA_OK && full) {
    rc = saga__buf_append(&edge, keys[upto - 1].key, strlen(keys[upto - 1].key) + 1);
    edge_step = keys[upto - 1].step;
  }
  if (rc != SAGA_OK) {
    free(keys);
    free(drop);
    saga__buf_free(&edge);
    return fail(s, SAGA_ENOMEM, "out of memory");
  }
  for (size_t k = 0; k < upto; k++) {
    size_t i = keys[k].idx;
    uint64_t t = inbox ? s->st.inbox[i].received : s->st.pstep[i].updated;
    if (t < cutoff) drop[i] = 1;
  }
  free(keys);
  size_t w = 0;
  for (size_t k = 0; k < n; k++) {
    if (drop[k]) {
      if (inbox)
        inbox_free(&s->st.inbox[k]);
      else
        pstep_free(&s->st.pstep[k]);
      (*deleted)++;
      s->writes++;
    } else if (inbox) {
      s->st.inbox[w++] = s->st.inbox[k];
    } else {
      s->st.pstep[w++] = s->st.pstep[k];
    }
  }
  if (inbox)
    s->st.ninbox = w;
  else
    s->st.npstep = w;
  free(drop);
  saga__buf_reset(&c->key);
  if (full) {
    rc = saga__buf_append(&c->key, edge.data, edge.len);
    c->key_step = inbox ? 0 : edge_step;
    *more = 1;
  } else {
    c->key_step = -1;
  }
  saga__buf_free(&edge);
  return rc != SAGA_OK ? fail(s, rc, "out of memory") : SAGA_OK;
}

/* ---- the database ------------------------------------------------------------------------- */

static int m_reply_key(saga__store *ss, const uint64_t fresh[2], uint64_t key[2]) {
  mem_store *s = MS(ss);
  FAULT(s, MEM_OP_REPLY_KEY);
  if (!s->st.have_key) {
    s->st.key[0] = fresh[0];
    s->st.key[1] = fresh[1];
    s->st.have_key = 1;
    s->writes += 2;
  }
  key[0] = s->st.key[0];
  key[1] = s->st.key[1];
  return SAGA_OK;
}

static int m_purge_mark(saga__store *ss, uint64_t *ms) {
  *ms = MS(ss)->st.purge_mark;
  return SAGA_OK;
}

static int m_purge_mark_raise(saga__store *ss, uint64_t ms) {
  mem_store *s = MS(ss);
  if (ms > s->st.purge_mark) {
    s->st.purge_mark = ms;
    s->writes++;
  }
  return SAGA_OK;
}

static const char *m_errmsg(saga__store *s) { return MS(s)->err; }
static void *m_native(saga__store *s) { return NULL; }
static void m_stats(saga__store *s, saga_node_stats *out) {}
static int m_stop(saga__store *s, void (*done)(void *), void *arg) { return 0; }

static void m_close(saga__store *ss) {
  if (ss == NULL) return;
  mem_store *s = MS(ss);
  for (int k = 0; k < MS_NSP; k++) sp_drop(s, k);
  if (s->in_tx) state_free(&s->tx_copy);
  state_free(&s->st);
  free(s);
}

static const saga__store_methods mem_methods = {
    .name = "memory",
    .begin = m_begin,
    .commit = m_commit,
    .rollback = m_rollback,
    .in_tx = m_in_tx,
    .savepoint = m_savepoint,
    .release = m_release,
    .rollback_to = m_rollback_to,
    .writes = m_writes,
    .inst_load = m_inst_load,
    .inst_find_key = m_inst_find_key,
    .inst_insert = m_inst_insert,
    .inst_save = m_inst_save,
    .inst_due = m_inst_due,
    .inst_next_due = m_inst_next_due,
    .inst_inflight = m_inst_inflight,
    .inst_unpark = m_inst_unpark,
    .inst_count = m_inst_count,
    .hist_insert = m_hist_insert,
    .hist_get = m_hist_get,
    .outbox_max = m_outbox_max,
    .outbox_mark = m_outbox_mark,
    .outbox_insert = m_outbox_insert,
    .outbox_delete = m_outbox_delete,
    .outbox_after = m_outbox_after,
    .outbox_stale = m_outbox_stale,
    .outbox_get = m_outbox_get,
    .outbox_count = m_outbox_count,
    .inbox_get = m_inbox_get,
    .inbox_insert = m_inbox_insert,
    .pstep_get = m_pstep_get,
    .pstep_put = m_pstep_put,
    .dead_insert = m_dead_insert,
    .finished_before = m_finished_before,
    .finished_beyond = m_finished_beyond,
    .purge_saga = m_purge_saga,
    .sweep = m_sweep,
    .purge_mark = m_purge_mark,
    .purge_mark_raise = m_purge_mark_raise,
    .reply_key = m_reply_key,
    .errmsg = m_errmsg,
    .native = m_native,
    .stats = m_stats,
    .stop = m_stop,
    .close = m_close,
};

int mem_store_new(saga__store **out) {
  mem_store *s = calloc(1, sizeof *s);
  if (s == NULL) return SAGA_ENOMEM;
  s->base.m = &mem_methods;
  *out = &s->base;
  return SAGA_OK;
}

/* ---- test accessors ----------------------------------------------------------------------- */

void mem_store_fail(saga__store *ss, mem_store_op op, unsigned skip, unsigned count, int code) {
  if ((int)op < 0 || op >= MEM_OP__COUNT) return;
  ms_fault *f = &MS(ss)->faults[op];
  f->skip = count ? skip : 0;
  f->count = count;
  f->code = code;
}

void mem_store_fail_clear(saga__store *ss) { memset(MS(ss)->faults, 0, sizeof MS(ss)->faults); }

unsigned long mem_store_calls(const saga__store *ss, mem_store_op op) {
  return (int)op >= 0 && op < MEM_OP__COUNT ? CMS(ss)->calls[op] : 0;
}

size_t mem_store_outbox_rows(const saga__store *ss) { return CMS(ss)->st.nout; }

int mem_store_outbox_row(const saga__store *ss, size_t k, uint64_t *id, const char **channel,
                         const char **saga_id, const void **body, size_t *len) {
  const mem_store *s = CMS(ss);
  if (k >= s->st.nout) return SAGA_ENOTFOUND;
  const ms_out *r = &s->st.out[k];
  if (id) *id = r->id;
  if (channel) *channel = r->channel;
  if (saga_id) *saga_id = r->saga_id;
  if (body) *body = r->body;
  if (len) *len = r->len;
  return SAGA_OK;
}

void mem_store_outbox_clear(saga__store *ss) {
  mem_store *s = MS(ss);
  for (size_t k = 0; k < s->st.nout; k++) out_free(&s->st.out[k]);
  s->st.nout = 0;
}

uint64_t mem_store_outbox_mark(const saga__store *ss) { return CMS(ss)->st.outbox_mark; }

size_t mem_store_history_rows(const saga__store *ss, const char *saga_id) {
  const mem_store *s = CMS(ss);
  size_t n = 0;
  for (size_t k = 0; k < s->st.nhist; k++)
    if (saga_id == NULL || strcmp(s->st.hist[k].r.saga_id, saga_id) == 0) n++;
  return n;
}

int mem_store_history_row(const saga__store *ss, const char *saga_id, size_t k,
                          mem_store_hist *out) {
  const mem_store *s = CMS(ss);
  for (size_t j = 0; j < s->st.nhist; j++) {
    const ms_hist *h = &s->st.hist[j];
    if (saga_id != NULL && strcmp(h->r.saga_id, saga_id) != 0) continue;
    if (k-- > 0) continue;
    out->seq = h->r.seq;
    out->at_ms = h->r.at_ms;
    out->type = h->r.type;
    out->step = h->r.step;
    out->attempt = h->r.attempt;
    out->detail = h->detail;
    return SAGA_OK;
  }
  return SAGA_ENOTFOUND;
}

size_t mem_store_history_types(const saga__store *ss, const char *saga_id, size_t from, int *types,
                               size_t max) {
  size_t n = 0;
  mem_store_hist h;
  while (mem_store_history_row(ss, saga_id, from + n, &h) == SAGA_OK) {
    if (n < max) types[n] = h.type;
    n++;
  }
  return n;
}

size_t mem_store_dead_letters(const saga__store *ss) { return CMS(ss)->st.ndead; }

int mem_store_dead_letter(const saga__store *ss, size_t k, const char **channel,
                          const char **msg_id, const char **reason) {
  const mem_store *s = CMS(ss);
  if (k >= s->st.ndead) return SAGA_ENOTFOUND;
  if (channel) *channel = s->st.dead[k].channel;
  if (msg_id) *msg_id = s->st.dead[k].msg_id;
  if (reason) *reason = s->st.dead[k].reason;
  return SAGA_OK;
}

size_t mem_store_instances(const saga__store *ss) { return CMS(ss)->st.ninst; }
size_t mem_store_inbox_rows(const saga__store *ss) { return CMS(ss)->st.ninbox; }
size_t mem_store_pstep_rows(const saga__store *ss) { return CMS(ss)->st.npstep; }

/* FNV-1a, 64 bits. */
static void h_bytes(uint64_t *h, const void *p, size_t n) {
  const uint8_t *b = p;
  for (size_t k = 0; k < n; k++) {
    *h ^= b[k];
    *h *= UINT64_C(0x100000001b3);
  }
}
static void h_u64(uint64_t *h, uint64_t v) { h_bytes(h, &v, sizeof v); }
static void h_str(uint64_t *h, const char *s) {
  h_bytes(h, s != NULL ? s : "", s != NULL ? strlen(s) + 1 : 1);
}
static void h_blob(uint64_t *h, const void *p, size_t n) {
  h_u64(h, n);
  if (n > 0) h_bytes(h, p, n);
}

uint64_t mem_store_digest(const saga__store *ss) {
  const ms_state *st = &CMS(ss)->st;
  uint64_t h = UINT64_C(0xcbf29ce484222325);
  h_u64(&h, st->ninst);
  for (size_t k = 0; k < st->ninst; k++) {
    const ms_inst *r = &st->inst[k];
    const saga__inst *v = &r->v;
    h_str(&h, v->id);
    h_str(&h, v->def_name);
    h_str(&h, r->idem);
    h_str(&h, v->error);
    h_str(&h, v->trace_span);
    h_str(&h, v->trace_parent);
    h_str(&h, v->attempt_span);
    h_blob(&h, r->data, r->len);
    int64_t nums[] = {v->def_version, v->state,  v->phase,   v->step, v->wait,
                      v->flags,       v->parked, v->attempt, v->hseq};
    h_bytes(&h, nums, sizeof nums);
    uint64_t times[] = {v->created_ms, v->updated_ms, v->step_deadline, v->saga_deadline,
                        r->deadline, v->started_ns, v->attempt_ns};
    h_bytes(&h, times, sizeof times);
  }
  h_u64(&h, st->nhist);
  for (size_t k = 0; k < st->nhist; k++) {
    const saga__hist_rec *r = &st->hist[k].r;
    h_str(&h, r->saga_id);
    int64_t nums[] = {r->seq, (int64_t)r->at_ms, r->type, r->step, r->attempt};
    h_bytes(&h, nums, sizeof nums);
    h_str(&h, st->hist[k].detail);
  }
  h_u64(&h, st->nout);
  for (size_t k = 0; k < st->nout; k++) {
    const ms_out *r = &st->out[k];
    h_u64(&h, r->id);
    h_u64(&h, r->created);
    h_str(&h, r->channel);
    h_str(&h, r->saga_id);
    h_blob(&h, r->body, r->len);
  }
  h_u64(&h, st->ninbox);
  for (size_t k = 0; k < st->ninbox; k++) {
    const ms_inbox *r = &st->inbox[k];
    h_str(&h, r->msg_id);
    h_str(&h, r->saga_id);
    h_str(&h, r->reply_to);
    h_blob(&h, r->reply, r->len);
    h_u64(&h, r->received);
  }
  h_u64(&h, st->npstep);
  for (size_t k = 0; k < st->npstep; k++) {
    const ms_pstep *r = &st->pstep[k];
    h_str(&h, r->saga_id);
    int64_t nums[] = {r->step, r->state, r->attempt, r->reply != NULL, (int64_t)r->updated};
    h_bytes(&h, nums, sizeof nums);
    h_blob(&h, r->reply, r->len);
  }
  h_u64(&h, st->ndead);
  for (size_t k = 0; k < st->ndead; k++) {
    const ms_dead *r = &st->dead[k];
    h_u64(&h, r->id);
    h_u64(&h, r->at);
    h_str(&h, r->channel);
    h_str(&h, r->msg_id);
    h_str(&h, r->reason);
    h_blob(&h, r->body, r->len);
  }
  h_u64(&h, st->outbox_mark);
  h_u64(&h, (uint64_t)st->have_key);
  h_u64(&h, st->key[0]);
  h_u64(&h, st->key[1]);
  return h;
}
