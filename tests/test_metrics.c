/*
 * saga_node_metrics() / saga_nodes_metrics(): the text parses as Prometheus text (format
 * 0.0.4: every sample "name{labels} value" after its metric's one TYPE line, label values
 * escaped, histogram buckets cumulative with +Inf equal to _count), and the values are the
 * node's: sagas by state and by definition, the counters of saga_node_stats, the histogram,
 * the outbox per channel.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sqlite3.h>
#include <string.h>

#include "harness.h"

#define MAX_SAMPLES 2000
#define MAX_TYPES 200

typedef struct sample {
  char name[96];
  char labels[512]; /* as written, unescaped values: k="v",k="v" */
  double value;
} sample;

typedef struct parsed {
  sample s[MAX_SAMPLES];
  size_t n;
  char types[MAX_TYPES][96];
  char kinds[MAX_TYPES][32];
  size_t ntypes;
} parsed;

static int type_of(const parsed *p, const char *name) {
  for (size_t i = 0; i < p->ntypes; i++)
    if (strcmp(p->types[i], name) == 0) return (int)i;
  return -1;
}

/* The metric a sample belongs to: a histogram's _bucket, _sum and _count belong to it. */
static int family_of(const parsed *p, const char *name) {
  int t = type_of(p, name);
  if (t >= 0) return t;
  static const char *const sfx[] = {"_bucket", "_sum", "_count"};
  for (int k = 0; k < 3; k++) {
    size_t nl = strlen(name), sl = strlen(sfx[k]);
    if (nl <= sl || strcmp(name + nl - sl, sfx[k]) != 0) continue;
    char base[96];
    snprintf(base, sizeof base, "%.*s", (int)(nl - sl), name);
    t = type_of(p, base);
    if (t >= 0 && strcmp(p->kinds[t], "histogram") == 0) return t;
  }
  return -1;
}

/* Parses text, failing the test on anything the format does not allow. */
static void parse(const char *text, parsed *p) {
  memset(p, 0, sizeof *p);
  int last_family = -1;
  const char *l = text;
  while (*l != '\0') {
    const char *end = strchr(l, '\n');
    assert_non_null(end); /* every line ends with a newline */
    if (l[0] == '#') {
      char kw[8], name[96], rest[32];
      if (sscanf(l, "# %7s %95s %31s", kw, name, rest) == 3 && strcmp(kw, "TYPE") == 0) {
        assert_int_equal(type_of(p, name), -1); /* one TYPE line per metric */
        assert_true(p->ntypes < MAX_TYPES);
        assert_true(strcmp(rest, "counter") == 0 || strcmp(rest, "gauge") == 0 ||
                    strcmp(rest, "histogram") == 0);
        snprintf(p->types[p->ntypes], sizeof p->types[0], "%s", name);
        snprintf(p->kinds[p->ntypes], sizeof p->kinds[0], "%s", rest);
        last_family = (int)p->ntypes++;
      } else {
        assert_true(strncmp(l, "# HELP ", 7) == 0);
      }
      l = end + 1;
      continue;
    }
    assert_true(p->n < MAX_SAMPLES);
    sample *s = &p->s[p->n++];
    size_t nl = strcspn(l, "{ ");
    assert_true(nl > 0 && nl < sizeof s->name);
    memcpy(s->name, l, nl);
    const char *c = l + nl;
    for (size_t k = 0; k < nl; k++)
      assert_non_null(strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:",
                             s->name[k]));
    /* its metric has its TYPE line, and its samples follow it without another in between */
    int fam = family_of(p, s->name);
    if (fam < 0) fail_msg("no TYPE line before %s", s->name);
    assert_int_equal(fam, last_family);
    size_t ll = 0;
    if (*c == '{') {
      c++;
      while (*c != '}') {
        size_t kl = strcspn(c, "=");
        assert_true(kl > 0 && c[kl] == '=' && c[kl + 1] == '"');
        assert_true(ll + kl + 2 < sizeof s->labels);
        memcpy(s->labels + ll, c, kl + 2);
        ll += kl + 2;
        c += kl + 2;
        while (*c != '"') {
          assert_true(*c != '\n' && *c != '\0');
          char ch = *c;
          if (ch == '\\') {
            c++;
            assert_true(*c == '\\' || *c == '"' || *c == 'n');
            ch = *c == 'n' ? '\n' : *c;
          }
          assert_true(ll + 3 < sizeof s->labels);
          s->labels[ll++] = ch;
          c++;
        }
        s->labels[ll++] = '"';
        c++;
        if (*c == ',') s->labels[ll++] = *c++;
        else assert_int_equal(*c, '}');
      }
      c++;
    }
    s->labels[ll] = '\0';
    assert_int_equal(*c, ' ');
    c++;
    char *vend = NULL;
    if (strncmp(c, "+Inf", 4) == 0) {
      s->value = INFINITY;
      vend = (char *)c + 4;
    } else {
      s->value = strtod(c, &vend);
      assert_true(vend > c);
    }
    assert_ptr_equal(vend, end); /* a number, then the end of the line */
    l = end + 1;
  }
}

/* The value of series name{labels}; fails when it is missing. */
static double get(const parsed *p, const char *name, const char *labels) {
  for (size_t i = 0; i < p->n; i++)
    if (strcmp(p->s[i].name, name) == 0 && strcmp(p->s[i].labels, labels) == 0)
      return p->s[i].value;
  fail_msg("no sample %s{%s}", name, labels);
  return -1;
}

static size_t count_of(const parsed *p, const char *name, const char *label_prefix) {
  size_t k = 0;
  for (size_t i = 0; i < p->n; i++)
    if (strcmp(p->s[i].name, name) == 0 &&
        strncmp(p->s[i].labels, label_prefix, strlen(label_prefix)) == 0)
      k++;
  return k;
}

/* Histogram base{labels}: its buckets (labels then le) cumulative, as many as the library's,
 * +Inf last and equal to _count = count, _sum = sum (UINT64_MAX: any). */
static void check_hist(const parsed *p, const char *base, const char *labels, uint64_t count,
                       uint64_t sum) {
  char prefix[600], name[128];
  snprintf(prefix, sizeof prefix, "%s,le=", labels);
  snprintf(name, sizeof name, "%s_bucket", base);
  double last = 0;
  size_t buckets = 0;
  int inf_seen = 0;
  for (size_t i = 0; i < p->n; i++) {
    if (strcmp(p->s[i].name, name) != 0 ||
        strncmp(p->s[i].labels, prefix, strlen(prefix)) != 0)
      continue;
    assert_false(inf_seen); /* +Inf is the last bucket */
    assert_true(p->s[i].value >= last);
    last = p->s[i].value;
    buckets++;
    if (strstr(p->s[i].labels, "le=\"+Inf\"") != NULL) inf_seen = 1;
  }
  if (!inf_seen) fail_msg("no %s{%s,le=\"+Inf\"}", name, labels);
  assert_int_equal(buckets, SAGA_LATENCY_BUCKETS);
  if (last != (double)count) fail_msg("%s{%s} +Inf = %g, want %llu", name, labels, last,
                                      (unsigned long long)count);
  snprintf(name, sizeof name, "%s_count", base);
  assert_true(get(p, name, labels) == (double)count);
  snprintf(name, sizeof name, "%s_sum", base);
  if (sum != UINT64_MAX) assert_true(get(p, name, labels) == (double)sum);
}

/* The node-wide histogram of node. */
static void check_histogram(const parsed *p, const char *node, uint64_t count, uint64_t sum) {
  char lab[96];
  snprintf(lab, sizeof lab, "node=\"%s\"", node);
  check_hist(p, "libsaga_step_latency_ms", lab, count, sum);
}

/* Every counter of saga_node_stats this test can make nonzero, and some that stay 0. */
static void check_counters(const parsed *p, const char *node, const saga_node_stats *st) {
  char lab[64];
  snprintf(lab, sizeof lab, "node=\"%s\"", node);
  static const struct {
    const char *name;
    size_t off;
  } c[] = {
      {"libsaga_transactions_total", offsetof(saga_node_stats, transactions)},
      {"libsaga_work_items_total", offsetof(saga_node_stats, work_items)},
      {"libsaga_commit_failures_total", offsetof(saga_node_stats, commit_failures)},
      {"libsaga_outbox_sent_total", offsetof(saga_node_stats, sent)},
      {"libsaga_outbox_resent_total", offsetof(saga_node_stats, resent)},
      {"libsaga_outbox_acked_total", offsetof(saga_node_stats, acked_out)},
      {"libsaga_delivered_total", offsetof(saga_node_stats, delivered)},
      {"libsaga_duplicates_total", offsetof(saga_node_stats, duplicates)},
      {"libsaga_dead_letters_total", offsetof(saga_node_stats, dead_letters)},
      {"libsaga_handler_runs_total", offsetof(saga_node_stats, handler_runs)},
      {"libsaga_stale_replies_total", offsetof(saga_node_stats, stale_replies)},
      {"libsaga_send_refusals_total", offsetof(saga_node_stats, send_refusals)},
      {"libsaga_unsendable_total", offsetof(saga_node_stats, unsendable)},
      {"libsaga_forged_replies_total", offsetof(saga_node_stats, forged_replies)},
      {"libsaga_reply_to_refused_total", offsetof(saga_node_stats, reply_to_refused)},
      {"libsaga_replayed_transactions_total", offsetof(saga_node_stats, replayed_tx)},
  };
  for (size_t k = 0; k < sizeof c / sizeof c[0]; k++) {
    uint64_t v;
    memcpy(&v, (const char *)st + c[k].off, sizeof v);
    if (get(p, c[k].name, lab) != (double)v)
      fail_msg("%s{%s} = %g, stats say %llu", c[k].name, lab, get(p, c[k].name, lab),
               (unsigned long long)v);
  }
  assert_true(get(p, "libsaga_transport_connected", lab) == 1);
  assert_true(get(p, "libsaga_metrics_read_errors", lab) == 0);
}

static int ok_step(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)tx, (void)m, (void)r, (void)arg;
  return SAGA_OK;
}

#define WEIRD "we\"ird\\def\nname"

static void test_metrics_values(void **state) {
  (void)state;
  th_world_opts o;
  th_world_defaults(&o);
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  /* A third node, "solo" (definitions are registered before a node starts: the world's are
   * started already): one definition with a local step and a name that needs escaping, one
   * whose step's channel nobody consumes (its command stays unconfirmed in the outbox). */
  saga_step st1 = {0};
  st1.name = "L";
  st1.local_action = ok_step;
  st1.kind = SAGA_STEP_RETRIABLE;
  st1.timeout_ms = SAGA_STEP_NO_TIMEOUT;
  saga_definition def = {SAGA_DEFINITION_VERSION, WEIRD, 1, &st1, 1, 0, sizeof(saga_step)};
  saga_step st2 = {0};
  st2.name = "R";
  st2.channel = "nobody";
  st2.action = "do";
  st2.kind = SAGA_STEP_RETRIABLE;
  st2.timeout_ms = SAGA_STEP_NO_TIMEOUT;
  saga_definition stuck = {SAGA_DEFINITION_VERSION, "stuck", 1, &st2, 1, 0, sizeof(saga_step)};
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w.hub), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = "solo";
  cfg.db_path = ":memory:";
  cfg.transport = t;
  cfg.clock = w.clock;
  saga_node *solo = NULL;
  char err[256];
  assert_int_equal(saga_node_open(&solo, &w.loop, &cfg, err, sizeof err), SAGA_OK);
  assert_int_equal(saga_node_register(solo, &def), SAGA_OK);
  assert_int_equal(saga_node_register(solo, &stuck), SAGA_OK);
  assert_int_equal(saga_node_start(solo, NULL), SAGA_OK);

  /* 4 sagas refused at step 1 (compensated), 2 completed; on solo, 2 completed and one that
   * waits forever (running). */
  for (int i = 0; i < 4; i++) assert_int_equal(th_world_start_ex(&w, i, NULL, 1, -1), SAGA_OK);
  for (int i = 4; i < 6; i++) assert_int_equal(th_world_start_ex(&w, i, NULL, -1, -1), SAGA_OK);
  for (int i = 0; i < 2; i++)
    assert_int_equal(saga_start(solo, WEIRD, NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 6), 0);
  assert_int_equal(saga_start(solo, "stuck", NULL, NULL, NULL, NULL), SAGA_OK);
  th_world_settle(&w, 5000);

  char *text = NULL;
  size_t len = 0;
  assert_int_equal(saga_node_metrics(w.orch, &text, &len), SAGA_OK);
  assert_non_null(text);
  assert_int_equal(len, strlen(text));
  saga_node_stats st;
  assert_int_equal(saga_node_stats_get(w.orch, &st, sizeof st), SAGA_OK);
  parsed *p = malloc(sizeof *p);
  assert_non_null(p);
  parse(text, p);

  assert_true(get(p, "libsaga_sagas", "node=\"orch\",state=\"COMPENSATED\"") == 4);
  assert_true(get(p, "libsaga_sagas", "node=\"orch\",state=\"COMPLETED\"") == 2);
  assert_true(get(p, "libsaga_sagas", "node=\"orch\",state=\"RUNNING\"") == 0);
  assert_true(get(p, "libsaga_sagas", "node=\"orch\",state=\"COMPENSATING\"") == 0);
  assert_true(get(p, "libsaga_sagas", "node=\"orch\",state=\"FAILED\"") == 0);
  assert_true(get(p, "libsaga_sagas_by_definition",
                  "node=\"orch\",definition=\"test\",state=\"COMPENSATED\"") == 4);
  assert_true(get(p, "libsaga_sagas_by_definition",
                  "node=\"orch\",definition=\"test\",state=\"COMPLETED\"") == 2);
  assert_int_equal(count_of(p, "libsaga_sagas_by_definition", "node=\"orch\""), 2);

  /* each saga's replies: 4 x (2 actions + 1 compensation), 2 x 3 actions */
  assert_int_equal(st.step_latency_count, 4 * 3 + 2 * 3);
  check_histogram(p, "orch", st.step_latency_count, st.step_latency_sum_ms);
  check_counters(p, "orch", &st);
  assert_true(st.transactions > 0 && st.sent > 0);

  assert_true(get(p, "libsaga_outbox_depth", "node=\"orch\"") ==
              (double)saga_node_outbox_depth(w.orch));
  free(text);

  /* solo's outbox: the command to "nobody", unconfirmed, older than the settle. */
  assert_int_equal(saga_node_metrics(solo, &text, &len), SAGA_OK);
  parse(text, p);
  assert_int_equal(saga_node_stats_get(solo, &st, sizeof st), SAGA_OK);
  check_counters(p, "solo", &st);
  check_histogram(p, "solo", st.step_latency_count, st.step_latency_sum_ms);
  int64_t depth = saga_node_outbox_depth(solo);
  assert_true(depth >= 1);
  assert_true(get(p, "libsaga_outbox_depth", "node=\"solo\"") == (double)depth);
  assert_true(get(p, "libsaga_outbox_channel_depth", "node=\"solo\",channel=\"nobody\"") >= 1);
  double sum = 0;
  for (size_t i = 0; i < p->n; i++)
    if (strcmp(p->s[i].name, "libsaga_outbox_channel_depth") == 0) sum += p->s[i].value;
  assert_true(sum == (double)depth);
  assert_true(get(p, "libsaga_outbox_oldest_seconds", "node=\"solo\",channel=\"nobody\"") >=
              1.0);
  assert_true(get(p, "libsaga_sagas_by_definition",
                  "node=\"solo\",definition=\"stuck\",state=\"RUNNING\"") == 1);
  free(text);

  /* Three nodes in one text: each metric once, every node's series. */
  saga_node *all[3] = {w.orch, w.part, solo};
  assert_int_equal(saga_nodes_metrics(all, 3, &text, NULL), SAGA_OK);
  parse(text, p);
  saga_node_stats pst;
  assert_int_equal(saga_node_stats_get(w.part, &pst, sizeof pst), SAGA_OK);
  assert_true(pst.handler_runs > 0 && pst.delivered > 0);
  check_counters(p, "part", &pst);
  check_histogram(p, "part", 0, 0);
  assert_true(get(p, "libsaga_sagas", "node=\"part\",state=\"COMPLETED\"") == 0);
  assert_true(get(p, "libsaga_sagas", "node=\"orch\",state=\"COMPENSATED\"") == 4);
  assert_true(get(p, "libsaga_sagas", "node=\"solo\",state=\"COMPLETED\"") == 2);
  assert_true(get(p, "libsaga_sagas_by_definition",
                  "node=\"solo\",definition=\"" WEIRD "\",state=\"COMPLETED\"") == 2);
  assert_int_equal(count_of(p, "libsaga_sagas_by_definition", "node=\"solo\""), 2);
  /* the escapes as written */
  assert_non_null(strstr(text, "definition=\"we\\\"ird\\\\def\\nname\""));
  saga_free(NULL, text);

  assert_int_equal(saga_node_metrics(NULL, &text, &len), SAGA_EINVAL);
  assert_int_equal(saga_node_metrics(w.orch, NULL, &len), SAGA_EINVAL);
  assert_int_equal(saga_nodes_metrics(all, 0, &text, &len), SAGA_EINVAL);
  free(p);
  saga_node_close(solo, NULL, NULL);
  th_world_free(&w);
}

/* ---- per step ---------------------------------------------------------------------------- */

/* What one step of a definition should show. */
typedef struct step_expect {
  const char *step;
  uint64_t attempts, retries, successes, failures, timeouts;
  uint64_t comp_attempts, compensations, comp_failures;
  uint64_t action_replies, comp_replies; /* the _count of the phase's histogram */
} step_expect;

static void step_labels(char *out, size_t len, const char *node, const char *def,
                        const char *step) {
  snprintf(out, len, "node=\"%s\",definition=\"%s\",step=\"%s\"", node, def, step);
}

static void check_step(const parsed *p, const char *node, const char *def, const step_expect *x) {
  char lab[300], hl[340];
  step_labels(lab, sizeof lab, node, def, x->step);
  static const struct {
    const char *name;
    size_t off;
  } c[] = {
      {"libsaga_step_attempts_total", offsetof(step_expect, attempts)},
      {"libsaga_step_retries_total", offsetof(step_expect, retries)},
      {"libsaga_step_successes_total", offsetof(step_expect, successes)},
      {"libsaga_step_failures_total", offsetof(step_expect, failures)},
      {"libsaga_step_timeouts_total", offsetof(step_expect, timeouts)},
      {"libsaga_step_compensation_attempts_total", offsetof(step_expect, comp_attempts)},
      {"libsaga_step_compensations_total", offsetof(step_expect, compensations)},
      {"libsaga_step_compensation_failures_total", offsetof(step_expect, comp_failures)},
  };
  for (size_t k = 0; k < sizeof c / sizeof c[0]; k++) {
    uint64_t want;
    memcpy(&want, (const char *)x + c[k].off, sizeof want);
    double got = get(p, c[k].name, lab);
    if (got != (double)want)
      fail_msg("%s{%s} = %g, want %llu", c[k].name, lab, got, (unsigned long long)want);
  }
  snprintf(hl, sizeof hl, "%s,phase=\"action\"", lab);
  check_hist(p, "libsaga_step_duration_ms", hl, x->action_replies, UINT64_MAX);
  snprintf(hl, sizeof hl, "%s,phase=\"compensation\"", lab);
  if (x->comp_replies != UINT64_MAX)
    check_hist(p, "libsaga_step_duration_ms", hl, x->comp_replies, UINT64_MAX);
}

/* The per-step histograms of node add up to its node-wide one (every reply is in one). */
static void check_step_sums(const parsed *p, const char *node, const saga_node_stats *st) {
  char prefix[64];
  snprintf(prefix, sizeof prefix, "node=\"%s\",", node);
  double count = 0, sum = 0;
  for (size_t i = 0; i < p->n; i++) {
    if (strncmp(p->s[i].labels, prefix, strlen(prefix)) != 0) continue;
    if (strcmp(p->s[i].name, "libsaga_step_duration_ms_count") == 0) count += p->s[i].value;
    if (strcmp(p->s[i].name, "libsaga_step_duration_ms_sum") == 0) sum += p->s[i].value;
  }
  assert_true(count == (double)st->step_latency_count);
  assert_true(sum == (double)st->step_latency_sum_ms);
}

static char *metrics_of(saga_node *n, parsed *p) {
  char *text = NULL;
  assert_int_equal(saga_node_metrics(n, &text, NULL), SAGA_OK);
  parse(text, p);
  return text;
}

/* Sagas of the 3-step world definition whose outcome per step is known: 5 complete; 3 are
 * refused at S1 on each of its 3 attempts (retry before compensating), and S0 is compensated,
 * in one of them after a first compensation attempt was refused. */
static void test_step_metrics(void **state) {
  (void)state;
  th_world_opts o;
  th_world_defaults(&o);
  o.retry[1].max_attempts = 3;
  o.retry[1].retry_before_compensate = 1;
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  for (int i = 0; i < 5; i++) assert_int_equal(th_world_start_ex(&w, i, NULL, -1, -1), SAGA_OK);
  for (int i = 5; i < 7; i++) assert_int_equal(th_world_start_ex(&w, i, NULL, 1, -1), SAGA_OK);
  assert_int_equal(th_world_start_ex(&w, 7, NULL, 1, 0), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 8), 0);
  assert_int_equal(th_check_invariants(&w, 1), 0);

  parsed *p = malloc(sizeof *p);
  assert_non_null(p);
  char *text = metrics_of(w.orch, p);
  saga_node_stats st;
  assert_int_equal(saga_node_stats_get(w.orch, &st, sizeof st), SAGA_OK);
  /*                  attempts retries ok  fail tmo  comp: sent done failed  replies: act comp */
  step_expect s0 = {"S0", 8, 0, 8, 0, 0, 4, 3, 1, 8, 4};
  step_expect s1 = {"S1", 14, 6, 5, 9, 0, 0, 0, 0, 14, 0};
  step_expect s2 = {"S2", 5, 0, 5, 0, 0, 0, 0, 0, 5, 0};
  check_step(p, "orch", "test", &s0);
  check_step(p, "orch", "test", &s1);
  check_step(p, "orch", "test", &s2);
  assert_int_equal(st.step_latency_count, 8 + 4 + 14 + 5);
  check_step_sums(p, "orch", &st);
  /* one series per step and counter; no resolve phase without a pivot; none on the
   * participant, which orchestrates nothing */
  assert_int_equal(count_of(p, "libsaga_step_attempts_total", "node=\"orch\""), 3);
  assert_int_equal(count_of(p, "libsaga_step_duration_ms_count", "node=\"orch\""), 6);
  assert_null(strstr(text, "phase=\"resolve\""));
  free(text);
  text = metrics_of(w.part, p);
  assert_int_equal(count_of(p, "libsaga_step_attempts_total", ""), 0);
  assert_non_null(strstr(text, "# TYPE libsaga_step_duration_ms histogram"));
  free(text);
  free(p);
  th_world_free(&w);
}

static int local_ok(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  (void)tx, (void)m, (void)r, (void)arg;
  return SAGA_OK;
}

/* Timeouts: S1's channel is served by nobody; its two attempts time out, then its
 * compensation's three, and the saga ends FAILED. And a definition registered in two versions
 * shows one set of series per step name, a pivot its resolve phase. */
static void test_step_metrics_timeouts(void **state) {
  (void)state;
  th_world_opts o;
  th_world_defaults(&o);
  o.nsteps = 2;
  o.timeout_ms[1] = 100;
  o.retry[1].max_attempts = 2;
  o.skip_mask = 1u << 1;
  th_world w;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);

  saga_step v1[2] = {{0}, {0}}, v2[2] = {{0}, {0}};
  v1[0].name = v2[0].name = "A";
  v1[0].local_action = v2[0].local_action = local_ok;
  v1[0].local_compensation = local_ok; /* only version 1 compensates A */
  v1[0].timeout_ms = v2[0].timeout_ms = SAGA_STEP_NO_TIMEOUT;
  v1[1].name = "P";
  v1[1].local_action = local_ok;
  v1[1].kind = SAGA_STEP_PIVOT;
  v2[1].name = "B";
  v2[1].local_action = local_ok;
  v2[1].kind = SAGA_STEP_RETRIABLE;
  v2[1].timeout_ms = v1[1].timeout_ms = SAGA_STEP_NO_TIMEOUT;
  v2[0].kind = SAGA_STEP_PIVOT;
  saga_definition d1 = {SAGA_DEFINITION_VERSION, "agg", 1, v1, 2, 0, sizeof(saga_step)};
  saga_definition d2 = {SAGA_DEFINITION_VERSION, "agg", 2, v2, 2, 0, sizeof(saga_step)};
  saga_transport *t = NULL;
  assert_int_equal(saga_mem_transport_new(&t, w.hub), SAGA_OK);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = "multi";
  cfg.db_path = ":memory:";
  cfg.transport = t;
  cfg.clock = w.clock;
  saga_node *multi = NULL;
  char err[256];
  assert_int_equal(saga_node_open(&multi, &w.loop, &cfg, err, sizeof err), SAGA_OK);
  assert_int_equal(saga_node_register(multi, &d1), SAGA_OK);
  assert_int_equal(saga_node_register(multi, &d2), SAGA_OK);
  assert_int_equal(saga_node_start(multi, NULL), SAGA_OK);

  for (int i = 0; i < 2; i++) assert_int_equal(th_world_start_ex(&w, i, NULL, -1, -1), SAGA_OK);
  for (int i = 0; i < 3; i++) /* version 2, the latest */
    assert_int_equal(saga_start(multi, "agg", NULL, NULL, NULL, NULL), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 2), 0);
  th_world_settle(&w, 1000);

  parsed *p = malloc(sizeof *p);
  assert_non_null(p);
  char *text = metrics_of(w.orch, p);
  saga_node_stats st;
  assert_int_equal(saga_node_stats_get(w.orch, &st, sizeof st), SAGA_OK);
  assert_true(get(p, "libsaga_sagas", "node=\"orch\",state=\"FAILED\"") == 2);
  /*                  attempts retries ok  fail tmo  comp: sent done failed  replies: act comp */
  step_expect s0 = {"S0", 2, 0, 2, 0, 0, 0, 0, 0, 2, 0};
  step_expect s1 = {"S1", 4, 2, 0, 0, 4, 6, 0, 6, 0, 0};
  check_step(p, "orch", "test", &s0);
  check_step(p, "orch", "test", &s1);
  check_step_sums(p, "orch", &st);
  free(text);

  text = metrics_of(multi, p);
  assert_int_equal(saga_node_stats_get(multi, &st, sizeof st), SAGA_OK);
  step_expect a = {"A", 3, 0, 3, 0, 0, 0, 0, 0, 3, 0};
  step_expect pv = {"P", 0, 0, 0, 0, 0, 0, 0, 0, 0, UINT64_MAX};
  step_expect b = {"B", 3, 0, 3, 0, 0, 0, 0, 0, 3, UINT64_MAX};
  check_step(p, "multi", "agg", &a);
  check_step(p, "multi", "agg", &pv);
  check_step(p, "multi", "agg", &b);
  check_step_sums(p, "multi", &st);
  assert_int_equal(count_of(p, "libsaga_step_attempts_total", "node=\"multi\""), 3);
  /* phases: A all three (version 1 compensates it, version 2 makes it the pivot), P action
   * and resolve, B action */
  assert_true(get(p, "libsaga_step_duration_ms_count",
                  "node=\"multi\",definition=\"agg\",step=\"A\",phase=\"resolve\"") == 0);
  assert_true(get(p, "libsaga_step_duration_ms_count",
                  "node=\"multi\",definition=\"agg\",step=\"P\",phase=\"resolve\"") == 0);
  assert_int_equal(count_of(p, "libsaga_step_duration_ms_count", "node=\"multi\""), 6);
  free(text);
  free(p);
  saga_node_close(multi, NULL, NULL);
  th_world_free(&w);
}

/* Counted when the transaction commits: the orchestrator's transaction that applies S0's
 * reply fails once after the transition (a trigger, created in that transaction, makes its
 * history insert fail), is rolled back and replayed; the step is counted once. */
typedef struct fail_once {
  th_world *w;
  int fired;
} fail_once;

static void fail_history_once(void *arg, const char *point) {
  fail_once *f = arg;
  if (strcmp(point, "engine.after_transition") != 0 || f->fired || f->w->orch == NULL) return;
  f->fired = 1;
  char *err = NULL;
  int rc = sqlite3_exec(saga_node_db(f->w->orch),
                        "CREATE TEMP TRIGGER fail_hist BEFORE INSERT ON saga_history"
                        " BEGIN SELECT RAISE(ABORT, 'injected'); END",
                        NULL, NULL, &err);
  if (rc != SQLITE_OK) fail_msg("trigger: %s", err ? err : "?");
  sqlite3_free(err);
}

static void test_step_metrics_committed_only(void **state) {
  (void)state;
  th_world w;
  fail_once f = {&w, 0};
  th_world_opts o;
  th_world_defaults(&o);
  o.hook = fail_history_once;
  o.hook_arg = &f;
  assert_int_equal(th_world_open(&w, &o), SAGA_OK);
  assert_int_equal(th_world_start_ex(&w, 0, NULL, -1, -1), SAGA_OK);
  assert_int_equal(th_world_run_until_terminal(&w, 1), 0);
  assert_int_equal(f.fired, 1);
  saga_node_stats st;
  assert_int_equal(saga_node_stats_get(w.orch, &st, sizeof st), SAGA_OK);
  assert_int_equal(st.replayed_tx, 1);
  assert_int_equal(st.step_latency_count, 3);
  parsed *p = malloc(sizeof *p);
  assert_non_null(p);
  char *text = metrics_of(w.orch, p);
  step_expect s0 = {"S0", 1, 0, 1, 0, 0, 0, 0, 0, 1, 0};
  step_expect s1 = {"S1", 1, 0, 1, 0, 0, 0, 0, 0, 1, 0};
  check_step(p, "orch", "test", &s0);
  check_step(p, "orch", "test", &s1);
  check_step_sums(p, "orch", &st);
  free(text);
  free(p);
  th_world_free(&w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_metrics_values),
      cmocka_unit_test(test_step_metrics),
      cmocka_unit_test(test_step_metrics_timeouts),
      cmocka_unit_test(test_step_metrics_committed_only),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
