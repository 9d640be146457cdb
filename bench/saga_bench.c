/*
 * saga_bench — durable step throughput of libsaga, against the raw SQLite ceiling measured
 * in the same run.
 *
 *   saga_bench [--sagas N] [--steps S] [--inflight K] [--sync full|normal|off]
 *              [--transport mem|tcp] [--fail RATIO] [--json FILE] [--dir DIR]
 *
 * An orchestrator node and a participant node (each its own SQLite file) run N sagas of S
 * steps, keeping K in flight; a fraction RATIO of them is refused at the last step and
 * compensated. The same run then measures the ceiling: plain SQLite, with the same
 * durability, doing the same number of commits and row writes per step as the engine did
 * (counted from the engine's own databases). The last line is a key=value summary.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <sqlite3.h>

#include "saga.h"
#include "saga/transport_tcp.h"

/* Saga id -> start time, open addressing keyed by the first 16 hex digits of the id. */
typedef struct slot {
  uint64_t key, start_ns;
} slot;

typedef struct bench {
  uv_loop_t *loop;
  saga_node *orch, *part;
  int sagas, steps, inflight, sync, tcp;
  double fail;
  int started, finished, completed, compensated, failed;
  slot *map;
  size_t mask;
  uint64_t *pending_start; /* start time of each saga_start until its callback */
  double *lat_ms;
  size_t nlat;
  uint64_t rng;
  char dir[512];
  saga_mem_hub *hub;
  int closed;
} bench;

static uint64_t key_of(const char *id) {
  uint64_t k = 0;
  for (int i = 0; i < 16 && id[i]; i++)
    k = (k << 4) | (uint64_t)(id[i] <= '9' ? id[i] - '0' : id[i] - 'a' + 10);
  return k ? k : 1;
}

static void map_put(bench *b, uint64_t key, uint64_t v) {
  size_t i = key & b->mask;
  while (b->map[i].key != 0) i = (i + 1) & b->mask;
  b->map[i].key = key;
  b->map[i].start_ns = v;
}

static int map_take(bench *b, uint64_t key, uint64_t *v) {
  size_t i = key & b->mask;
  while (b->map[i].key != 0 && b->map[i].key != key) i = (i + 1) & b->mask;
  if (b->map[i].key == 0) return 0;
  *v = b->map[i].start_ns;
  /* Backward-shift deletion keeps probe chains intact without tombstones. */
  size_t j = i;
  for (;;) {
    j = (j + 1) & b->mask;
    if (b->map[j].key == 0) break;
    size_t home = b->map[j].key & b->mask;
    if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
      b->map[i] = b->map[j];
      i = j;
    }
  }
  b->map[i].key = 0;
  return 1;
}

static uint64_t rnd(bench *b) {
  b->rng ^= b->rng << 13;
  b->rng ^= b->rng >> 7;
  b->rng ^= b->rng << 17;
  return b->rng;
}

static int b_do(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) {
  int64_t fail = -1;
  saga_data_get_i64(saga_msg_data(m), "fail", &fail);
  if (fail == (int64_t)saga_msg_step(m)) return saga_reply_fail(r, "refused");
  return SAGA_OK;
}

static int b_undo(saga_tx *tx, const saga_msg *m, saga_reply *r, void *arg) { return SAGA_OK; }

static void start_one(bench *b);

/* arg: the start time, followed by the bench pointer. */
static void on_started(saga_node *n, int status, const char *id, int existed, void *arg) {
  uint64_t *t0 = arg;
  bench *b;
  memcpy(&b, t0 + 1, sizeof b);
  if (status != SAGA_OK) {
    fprintf(stderr, "start failed: %s\n", saga_strerror(status));
    exit(1);
  }
  map_put(b, key_of(id), t0[0]);
  free(t0);
}

static void on_event(saga_node *n, const saga_event *ev, void *arg) {
  bench *b = arg;
  if (ev->type != SAGA_EV_COMPLETED && ev->type != SAGA_EV_SAGA_COMPENSATED &&
      ev->type != SAGA_EV_SAGA_FAILED)
    return;
  uint64_t t0;
  if (map_take(b, key_of(ev->saga_id), &t0)) b->lat_ms[b->nlat++] = (uv_hrtime() - t0) / 1e6;
  b->finished++;
  b->completed += ev->type == SAGA_EV_COMPLETED;
  b->compensated += ev->type == SAGA_EV_SAGA_COMPENSATED;
  b->failed += ev->type == SAGA_EV_SAGA_FAILED;
  if (b->started < b->sagas) start_one(b);
  if (b->finished == b->sagas) uv_stop(b->loop);
}

static void start_one(bench *b) {
  saga_data *d = NULL;
  saga_data_new(&d, NULL);
  if (b->fail > 0 && (double)(rnd(b) % 1000000) / 1e6 < b->fail)
    saga_data_set_i64(d, "fail", b->steps - 1);
  /* The callback learns the id; it needs the start time and the bench. */
  uint64_t *t0 = malloc(sizeof(uint64_t) + sizeof(bench *));
  t0[0] = uv_hrtime();
  memcpy(t0 + 1, &b, sizeof b);
  int rc = saga_start(b->orch, "bench", d, NULL, on_started, t0);
  saga_data_free(d);
  if (rc != SAGA_OK) {
    fprintf(stderr, "saga_start: %s\n", saga_node_errmsg(b->orch));
    exit(1);
  }
  b->started++;
}

static saga_node *open_node(bench *b, const char *name, int port_self, int port_other) {
  saga_transport *t = NULL;
  int rc;
  if (b->tcp) {
    char self[32], other[32];
    snprintf(self, sizeof self, "127.0.0.1:%d", port_self);
    snprintf(other, sizeof other, "127.0.0.1:%d", port_other);
    int orch = strcmp(name, "orch") == 0;
    saga_tcp_route routes[] = {{"orch", orch ? self : other}, {"bench", orch ? other : self}};
    saga_tcp_config c;
    saga_tcp_config_init(&c);
    c.listen = self;
    c.routes = routes;
    c.nroutes = 2;
    rc = saga_tcp_transport_new(&t, &c);
  } else {
    if (b->hub == NULL && saga_mem_hub_new(&b->hub, b->loop, NULL, NULL, NULL) != SAGA_OK)
      exit(1);
    rc = saga_mem_transport_new(&t, b->hub);
  }
  if (rc != SAGA_OK) exit(1);
  char path[600], err[256];
  snprintf(path, sizeof path, "%s/%s.db", b->dir, name);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = name;
  cfg.db_path = path;
  cfg.transport = t;
  cfg.synchronous = (saga_sync)b->sync;
  cfg.on_event = strcmp(name, "orch") == 0 ? on_event : NULL;
  cfg.event_arg = b;
  saga_node *n = NULL;
  if (saga_node_open(&n, b->loop, &cfg, err, sizeof err) != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", name, err);
    exit(1);
  }
  return n;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p) {
  if (n == 0) return 0;
  size_t i = (size_t)(p * (double)(n - 1) + 0.5);
  return v[i < n ? i : n - 1];
}

static int64_t db_bytes(saga_node *n) {
  sqlite3_stmt *st = NULL;
  int64_t v = 0;
  sqlite3_prepare_v2(saga_node_db(n),
                     "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size", -1,
                     &st, NULL);
  if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

/* The raw ceiling: the same number of commits, each with the same number of row writes of a
 * similar size, on plain SQLite with the same durability. Returns seconds. */
static double ceiling(const char *dir, int sync, uint64_t commits, uint64_t rows) {
  char path[600];
  snprintf(path, sizeof path, "%s/ceiling.db", dir);
  sqlite3 *db = NULL;
  sqlite3_open(path, &db);
  char pragmas[128];
  snprintf(pragmas, sizeof pragmas, "PRAGMA journal_mode=WAL; PRAGMA synchronous=%d;", sync);
  sqlite3_exec(db, pragmas, NULL, NULL, NULL);
  sqlite3_exec(db, "CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, v BLOB)", NULL, NULL, NULL);
  sqlite3_stmt *ins = NULL, *begin = NULL, *commit = NULL;
  sqlite3_prepare_v2(db, "INSERT INTO t(k, v) VALUES(?1, ?2)", -1, &ins, NULL);
  sqlite3_prepare_v2(db, "BEGIN IMMEDIATE", -1, &begin, NULL);
  sqlite3_prepare_v2(db, "COMMIT", -1, &commit, NULL);
  static char blob[200];
  uint64_t per = commits ? (rows + commits - 1) / commits : 0, done = 0;
  uint64_t t0 = uv_hrtime();
  for (uint64_t c = 0; c < commits; c++) {
    sqlite3_step(begin);
    sqlite3_reset(begin);
    for (uint64_t r = 0; r < per && done < rows; r++, done++) {
      sqlite3_bind_text(ins, 1, "0123456789abcdef0123456789abcdef", -1, SQLITE_STATIC);
      sqlite3_bind_blob(ins, 2, blob, sizeof blob, SQLITE_STATIC);
      sqlite3_step(ins);
      sqlite3_reset(ins);
    }
    sqlite3_step(commit);
    sqlite3_reset(commit);
  }
  double secs = (double)(uv_hrtime() - t0) / 1e9;
  sqlite3_finalize(ins);
  sqlite3_finalize(begin);
  sqlite3_finalize(commit);
  sqlite3_close(db);
  return secs;
}

static void closed(void *arg) { ((bench *)arg)->closed++; }

int main(int argc, char **argv) {
  bench b;
  memset(&b, 0, sizeof b);
  b.sagas = 10000;
  b.steps = 3;
  b.inflight = 100;
  b.sync = SAGA_SYNC_FULL;
  b.rng = 88172645463325252ull;
  const char *json = NULL, *dir = NULL;
  static const struct option opts[] = {
      {"sagas", 1, 0, 'n'}, {"steps", 1, 0, 's'}, {"inflight", 1, 0, 'k'},
      {"sync", 1, 0, 'y'},  {"transport", 1, 0, 't'}, {"fail", 1, 0, 'f'},
      {"json", 1, 0, 'j'},  {"dir", 1, 0, 'd'},  {0, 0, 0, 0}};
  int o;
  while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    switch (o) {
    case 'n': b.sagas = atoi(optarg); break;
    case 's': b.steps = atoi(optarg); break;
    case 'k': b.inflight = atoi(optarg); break;
    case 'y':
      b.sync = strcmp(optarg, "off") == 0 ? SAGA_SYNC_OFF
               : strcmp(optarg, "normal") == 0 ? SAGA_SYNC_NORMAL : SAGA_SYNC_FULL;
      break;
    case 't': b.tcp = strcmp(optarg, "tcp") == 0; break;
    case 'f': b.fail = atof(optarg); break;
    case 'j': json = optarg; break;
    case 'd': dir = optarg; break;
    default:
      fprintf(stderr, "usage: saga_bench [--sagas N] [--steps S] [--inflight K] "
                      "[--sync full|normal|off] [--transport mem|tcp] [--fail R] [--json F] "
                      "[--dir D]\n");
      return 2;
    }
  }
  if (b.sagas < 1 || b.steps < 1 || b.steps > 32 || b.inflight < 1) return 2;
  if (b.inflight > b.sagas) b.inflight = b.sagas;
  if (dir != NULL) snprintf(b.dir, sizeof b.dir, "%s", dir);
  else {
    snprintf(b.dir, sizeof b.dir, "%s/saga_bench.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (mkdtemp(b.dir) == NULL) return 1;
  }
  size_t cap = 16;
  while (cap < (size_t)b.inflight * 4) cap *= 2;
  b.map = calloc(cap, sizeof *b.map);
  b.mask = cap - 1;
  b.lat_ms = calloc((size_t)b.sagas, sizeof *b.lat_ms);
  b.loop = uv_default_loop();
  int p1 = 20000 + (int)(getpid() % 20000), p2 = p1 + 1;
  b.orch = open_node(&b, "orch", p1, p2);
  b.part = open_node(&b, "part", p2, p1);
  saga_step steps[32];
  memset(steps, 0, sizeof steps);
  for (int i = 0; i < b.steps; i++) {
    steps[i].name = "STEP";
    steps[i].channel = "bench";
    steps[i].action = "b.do";
    steps[i].compensation = "b.undo";
  }
  saga_definition def = {SAGA_DEFINITION_VERSION, "bench", 1, steps, (size_t)b.steps, 0};
  if (saga_node_register(b.orch, &def) != SAGA_OK ||
      saga_node_handle(b.part, "bench", "b.do", b_do, NULL) != SAGA_OK ||
      saga_node_handle(b.part, "bench", "b.undo", b_undo, NULL) != SAGA_OK ||
      saga_node_start(b.orch) < 0 || saga_node_start(b.part) < 0) {
    fprintf(stderr, "setup failed\n");
    return 1;
  }
  int changes0 = sqlite3_total_changes(saga_node_db(b.orch)) +
                 sqlite3_total_changes(saga_node_db(b.part));
  uint64_t t0 = uv_hrtime();
  for (int i = 0; i < b.inflight; i++) start_one(&b);
  uv_run(b.loop, UV_RUN_DEFAULT);
  double secs = (double)(uv_hrtime() - t0) / 1e9;

  saga_node_stats so, sp;
  saga_node_stats_get(b.orch, &so);
  saga_node_stats_get(b.part, &sp);
  uint64_t commits = so.transactions + sp.transactions;
  uint64_t rows = (uint64_t)(sqlite3_total_changes(saga_node_db(b.orch)) +
                             sqlite3_total_changes(saga_node_db(b.part)) - changes0);
  /* A compensated saga runs its steps up to the refused one and back. */
  double steps_done = (double)b.completed * b.steps +
                      (double)b.compensated * (2.0 * b.steps - 1);
  double sps = steps_done / secs;
  int64_t bytes = db_bytes(b.orch) + db_bytes(b.part);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  double ceil_secs = ceiling(b.dir, b.sync, commits, rows);
  double ceil_sps = steps_done / ceil_secs;
  qsort(b.lat_ms, b.nlat, sizeof *b.lat_ms, cmp_double);
  double p50 = pct(b.lat_ms, b.nlat, 0.50), p99 = pct(b.lat_ms, b.nlat, 0.99),
         p999 = pct(b.lat_ms, b.nlat, 0.999);
  const char *sync_name = b.sync == SAGA_SYNC_FULL ? "full" : b.sync == SAGA_SYNC_NORMAL ? "normal" : "off";

  printf("sagas %d (completed %d, compensated %d, failed %d), %d steps each, %d in flight, "
         "sync=%s, transport=%s\n",
         b.sagas, b.completed, b.compensated, b.failed, b.steps, b.inflight, sync_name,
         b.tcp ? "tcp" : "mem");
  printf("engine:  %.0f sagas/s, %.0f steps/s, %llu commits, %llu row writes\n",
         b.sagas / secs, sps, (unsigned long long)commits, (unsigned long long)rows);
  printf("ceiling: %.0f steps/s (same commits and row writes on plain SQLite)\n", ceil_sps);
  printf("latency: p50 %.3f ms, p99 %.3f ms, p99.9 %.3f ms\n", p50, p99, p999);
  printf("memory:  peak RSS %ld KiB; database %.0f bytes per saga\n", ru.ru_maxrss,
         (double)bytes / b.sagas);
  char summary[600];
  snprintf(summary, sizeof summary,
           "sagas=%d steps=%d inflight=%d sync=%s transport=%s sagas_per_s=%.0f steps_per_s=%.0f "
           "ceiling_steps_per_s=%.0f ratio=%.3f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f "
           "peak_rss_kib=%ld db_bytes_per_saga=%.0f completed=%d compensated=%d failed=%d",
           b.sagas, b.steps, b.inflight, sync_name, b.tcp ? "tcp" : "mem", b.sagas / secs, sps,
           ceil_sps, sps / ceil_sps, p50, p99, p999, ru.ru_maxrss, (double)bytes / b.sagas,
           b.completed, b.compensated, b.failed);
  if (json != NULL) {
    FILE *f = fopen(json, "w");
    if (f != NULL) {
      fprintf(f, "{");
      char *s = strdup(summary), *save = NULL;
      int first = 1;
      for (char *kv = strtok_r(s, " ", &save); kv; kv = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(kv, '=');
        *eq = '\0';
        char *end;
        strtod(eq + 1, &end);
        fprintf(f, *end ? "%s\"%s\": \"%s\"" : "%s\"%s\": %s", first ? "" : ", ", kv, eq + 1);
        first = 0;
      }
      fprintf(f, "}\n");
      free(s);
      fclose(f);
    }
  }
  saga_node_close(b.orch, closed, &b);
  saga_node_close(b.part, closed, &b);
  while (b.closed < 2 && uv_run(b.loop, UV_RUN_ONCE)) {
  }
  if (b.hub != NULL) saga_mem_hub_close(b.hub);
  uv_run(b.loop, UV_RUN_DEFAULT);
  uv_loop_close(b.loop);
  free(b.map);
  free(b.lat_ms);
  printf("%s\n", summary);
  int ok = b.completed + b.compensated == b.sagas && b.failed == 0;
  if (dir == NULL) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", b.dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", b.dir);
  }
  return ok ? 0 : 1;
}
