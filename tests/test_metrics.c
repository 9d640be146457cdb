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

/* The histogram of node: buckets cumulative, +Inf = _count = count, _sum = sum. */
static void check_histogram(const parsed *p, const char *node, uint64_t count, uint64_t sum) {
  char prefix[64], lab[96];
  snprintf(prefix, sizeof prefix, "node=\"%s\",le=", node);
  double last = 0;
  size_t buckets = 0;
  int inf_seen = 0;
  for (size_t i = 0; i < p->n; i++) {
    if (strcmp(p->s[i].name, "libsaga_step_latency_ms_bucket") != 0 ||
        strncmp(p->s[i].labels, prefix, strlen(prefix)) != 0)
      continue;
    assert_false(inf_seen); /* +Inf is the last bucket */
    assert_true(p->s[i].value >= last);
    last = p->s[i].value;
    buckets++;
    if (strstr(p->s[i].labels, "le=\"+Inf\"") != NULL) inf_seen = 1;
  }
  assert_true(inf_seen);
  assert_int_equal(buckets, SAGA_LATENCY_BUCKETS);
  assert_true(last == (double)count);
  snprintf(lab, sizeof lab, "node=\"%s\"", node);
  assert_true(get(p, "libsaga_step_latency_ms_count", lab) == (double)count);
  assert_true(get(p, "libsaga_step_latency_ms_sum", lab) == (double)sum);
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

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_metrics_values),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
