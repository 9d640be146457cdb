/*
 * saga_bench — durable step throughput of libsaga, against the raw SQLite ceiling measured
 * in the same run; recovery of in-flight sagas; memory per in-flight saga; history scaling.
 *
 *   saga_bench [--sagas N] [--steps S] [--inflight K] [--sync full|normal|off]
 *              [--transport mem|inproc|tcp|nats] [--nats-url URL] [--fail RATIO] [--json FILE]
 *              [--dir DIR] [--preload N] [--recovery N] [--paused] [--resend-ms MS]
 *              [--no-memstatus] [--checkpoint inline|background] [--threads 1|2]
 *              [--checkpoint-pages N] [--tls] [--participant-cmd CMD]
 *
 * Throughput run (the default): an orchestrator node and a participant node (each its own
 * SQLite file) run N sagas of S steps, keeping K in flight; a fraction RATIO of them is
 * refused at the last step and compensated. The same run then measures the ceiling: plain
 * SQLite, with the same durability, doing the same number of commits and row writes per step
 * as the engine did (counted from the engine's own databases). --preload N first fills both
 * databases with N completed sagas (rows cloned from one real saga, in one transaction), so
 * that the run shows whether history slows the engine down.
 *
 * Recovery run (--recovery N, or --paused with --inflight K as N): phase A starts N sagas on
 * an orchestrator whose transport takes every message and never confirms it (a participant
 * that is not there), so each saga is committed, RUNNING, with its step-1 command in the
 * outbox; the RSS growth over a baseline taken after opening gives the memory per in-flight
 * saga. The orchestrator is closed. Phase B, timed: reopen it on the real transport, register,
 * start (recovery_open_ms), until every pending command was handed to the transport again
 * (recovery_resume_ms); then the participant is opened and the time until all N sagas
 * finished is recovery_finish_ms.
 *
 * --transport nats: without --nats-url the bench starts its own nats-server (JetStream, temp
 * folder, free loopback port) and stops it at the end.
 *
 * --no-memstatus turns off SQLite's allocation statistics (sqlite3_config MEMSTATUS), which
 * take a process-wide mutex on every allocation; it applies to engine and ceiling alike.
 *
 * --checkpoint background makes both nodes checkpoint their WAL in a worker thread instead of
 * inside commits (SQLite's own auto-checkpoint, the default; see saga_checkpoint_mode).
 *
 * --transport inproc is the in-process transport across threads (saga_inproc_hub); with
 * --threads 2 (inproc, tcp or nats) the participant node runs on a loop of its own in a
 * second thread, as a process using both cores would; by default both nodes share one loop.
 *
 * --tls (with --transport tcp): mutual TLS 1.3 between the two nodes, each with a certificate
 * from a throwaway CA made by scripts/make_pki.sh in the run's folder, and an access list that
 * lets each node send only to the other's channel — the production setup of docs/security.md.
 *
 * --participant-cmd CMD (with --transport tcp): the participant is not this process's node but
 * the program CMD runs (sh -c), e.g. a participant written in another language
 * (bench/python_participant.py): it gets SAGA_BENCH_PART_LISTEN (the address to listen on,
 * serving channel "bench", commands b.do and b.undo: b.do refuses when the data's "fail" is
 * its step index), SAGA_BENCH_ORCH_ADDR (the orchestrator's address, channel "orch"),
 * SAGA_BENCH_DIR and SAGA_BENCH_SYNC in its environment, prints "ready" on its standard
 * output once it listens, and ends on SIGTERM. Plaintext loopback; the ceiling is not measured
 * (the participant's commits are not counted here), so it and the ratio read -1.
 *
 * With --inflight 1 the run also reports the latency floor: the ceiling's commits summed in
 * groups of the engine's commits per saga (floor_p50_ms, floor_p99_ms), i.e. what plain
 * SQLite needs for the same sequence of durable commits one after the other.
 *
 * The last line is a key=value summary (and --json FILE writes the same keys as JSON).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include <sqlite3.h>

#include "saga.h"
#include "servers.h"
#include "saga/sys/transport.h"
#include "saga/transport_tcp.h"
#ifdef SAGA_BENCH_NATS
#include "saga/transport_nats.h"
#endif

enum { T_MEM, T_TCP, T_NATS, T_INPROC };
static const char *const transport_names[] = {"mem", "tcp", "nats", "inproc"};

/* Saga id -> start time, open addressing keyed by a 64-bit hash of the id. */
typedef struct slot {
  uint64_t key, start_ns;
} slot;

typedef struct bench {
  uv_loop_t *loop;
  saga_node *orch, *part;
  int sagas, steps, inflight, sync, transport, no_memstatus, ckpt_background, threads, tls;
  const char *part_cmd; /* --participant-cmd: the participant is this program */
  pid_t part_pid;
  uint32_t ckpt_pages;
  /* --threads 2: the participant node on a loop of its own, in its own thread. */
  uv_loop_t part_loop;
  uv_thread_t part_tid;
  uv_sem_t part_sem;
  double fail;
  int started, finished, completed, compensated, failed;
  slot *map;
  size_t mask;
  double *lat_ms;
  size_t nlat;
  uint64_t rng;
  char dir[512];
  saga_mem_hub *hub;
  saga_inproc_hub *ihub; /* --transport inproc: created before any thread, freed last */
  int closed;
  int port_orch, port_part;
  /* NATS */
  const char *nats_url;
  char nats_url_buf[64], nats_stream[32], nats_prefix[32];
  /* history */
  long preload;
  int warming;         /* the template saga of --preload is running */
  char template_id[64];
  /* recovery */
  int recovery, paused, pending_starts, acked_starts;
  uint32_t resend_ms;
} bench;


static uint64_t key_of(const char *id) {
  uint64_t h = 1469598103934665603ull;
  for (const char *p = id; *p; p++) h = (h ^ (uint8_t)*p) * 1099511628211ull;
  return h ? h : 1;
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

static void die(const char *what, const char *detail) {
  fprintf(stderr, "saga_bench: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  exit(1);
}

/* ---- a transport that takes every message and never confirms or delivers anything ------ */

/* It stands for a participant that is not there (recovery phase A): the orchestrator's
 * outbox keeps every command, and nothing is held in memory outside the engine. */
typedef struct sink {
  saga_transport base;
  uint64_t sent;
} sink;

static int sink_open(saga_transport *t, uv_loop_t *loop) { return SAGA_OK; }
static int sink_subscribe(saga_transport *t, const char *channel) { return SAGA_OK; }
static int sink_send(saga_transport *t, const char *channel, const void *data, size_t len,
                     uint64_t token) {
  ((sink *)t)->sent++;
  return SAGA_OK;
}
static void sink_ack(saga_transport *t, uint64_t tag) {}
static void sink_close(saga_transport *t) { saga_transport_closed(t); }
static void sink_destroy(saga_transport *t) { free(t); }

static const saga_transport_methods sink_methods = {
    .version = SAGA_TRANSPORT_VERSION, .name = "sink", .open = sink_open,
    .subscribe = sink_subscribe, .send = sink_send, .ack = sink_ack, .close = sink_close,
    .destroy = sink_destroy};

static saga_transport *sink_new(void) {
  sink *s = calloc(1, sizeof *s);
  if (s == NULL) die("out of memory", NULL);
  s->base.methods = &sink_methods;
  return &s->base;
}

/* ---- servers and ports -------------------------------------------------------------------- */

static th_server nats_srv; /* a nats-server the bench started, stopped at exit */

static void stop_nats(void) {
  if (nats_srv.pid > 0) th_server_free(&nats_srv);
}

/* Starts nats-server with JetStream on a free loopback port (tests/servers.c). */
static void start_nats(bench *b) {
  if (th_server_start(&nats_srv, "nats") != 0)
    die("nats-server did not start (is it installed?)", NULL);
  atexit(stop_nats);
  snprintf(b->nats_url_buf, sizeof b->nats_url_buf, "nats://127.0.0.1:%d", nats_srv.port);
  b->nats_url = b->nats_url_buf;
}

/* ---- participants and events -------------------------------------------------------------- */

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
  if (status != SAGA_OK) die("start failed", saga_strerror(status));
  if (b->recovery) {
    /* Phase A: keep a bounded window of starts queued, and stop once all are durable. */
    b->pending_starts--;
    b->acked_starts++;
    if (b->started < b->sagas) start_one(b);
    if (b->acked_starts == b->sagas) uv_stop(b->loop);
  } else if (b->warming) {
    snprintf(b->template_id, sizeof b->template_id, "%s", id);
  } else {
    map_put(b, key_of(id), t0[0]);
  }
  free(t0);
}

static void on_event(saga_node *n, const saga_event *ev, void *arg) {
  bench *b = arg;
  if (ev->type != SAGA_EV_COMPLETED && ev->type != SAGA_EV_SAGA_COMPENSATED &&
      ev->type != SAGA_EV_SAGA_FAILED)
    return;
  if (b->warming) {
    b->warming = ev->type == SAGA_EV_COMPLETED ? 2 : 3;
    uv_stop(b->loop);
    return;
  }
  uint64_t t0;
  if (!b->recovery && map_take(b, key_of(ev->saga_id), &t0))
    b->lat_ms[b->nlat++] = (uv_hrtime() - t0) / 1e6;
  b->finished++;
  b->completed += ev->type == SAGA_EV_COMPLETED;
  b->compensated += ev->type == SAGA_EV_SAGA_COMPENSATED;
  b->failed += ev->type == SAGA_EV_SAGA_FAILED;
  if (!b->recovery && b->started < b->sagas) start_one(b);
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
  if (rc != SAGA_OK) die("saga_start", saga_node_errmsg(b->orch));
  if (!b->warming) b->started++;
  b->pending_starts++;
}

/* ---- nodes -------------------------------------------------------------------------------- */

static saga_transport *make_transport(bench *b, int orch) {
  saga_transport *t = NULL;
  int rc = SAGA_EINVAL;
  if (b->transport == T_TCP) {
    char self[32], other[32];
    snprintf(self, sizeof self, "127.0.0.1:%d", orch ? b->port_orch : b->port_part);
    snprintf(other, sizeof other, "127.0.0.1:%d", orch ? b->port_part : b->port_orch);
    const char *me = orch ? "bench-orch" : "bench-part", *peer = orch ? "bench-part" : "bench-orch";
    saga_tcp_route routes[] = {{"orch", orch ? self : other, b->tls ? "bench-orch" : NULL},
                               {"bench", orch ? other : self, b->tls ? "bench-part" : NULL}};
    /* Each node takes messages from the other only, on its own channel. */
    saga_tcp_allow allow[] = {{peer, orch ? "orch" : "bench"}};
    char ca[600], cert[600], key[600], err[256];
    saga_tcp_config c;
    saga_tcp_config_init(&c);
    if (b->tls) {
      snprintf(ca, sizeof ca, "%s/pki/ca.pem", b->dir);
      snprintf(cert, sizeof cert, "%s/pki/%s.pem", b->dir, me);
      snprintf(key, sizeof key, "%s/pki/%s.key", b->dir, me);
      c.tls_ca_file = ca;
      c.tls_cert_file = cert;
      c.tls_key_file = key;
      c.allow = allow;
      c.nallow = 1;
    } else {
      c.insecure_plaintext = 1; /* loopback only */
    }
    c.listen = self;
    c.routes = routes;
    c.nroutes = 2;
    rc = saga_tcp_transport_new2(&t, &c, err, sizeof err);
    if (rc != SAGA_OK) die("creating the TCP transport", err);
  } else if (b->transport == T_NATS) {
#ifdef SAGA_BENCH_NATS
    saga_nats_config c;
    saga_nats_config_init(&c);
    c.url = b->nats_url;
    c.stream = b->nats_stream;
    c.prefix = b->nats_prefix;
    rc = saga_nats_transport_new(&t, &c);
#endif
  } else if (b->transport == T_INPROC) {
    rc = saga_inproc_transport_new(&t, b->ihub);
  } else {
    if (b->hub == NULL && saga_mem_hub_new(&b->hub, b->loop, NULL, NULL, NULL) != SAGA_OK)
      die("saga_mem_hub_new", NULL);
    rc = saga_mem_transport_new(&t, b->hub);
  }
  if (rc != SAGA_OK) die("creating the transport", saga_strerror(rc));
  return t;
}

/* SAGA_BENCH_LOG=1: the nodes' warnings and errors on stderr. */
static void bench_log(void *arg, saga_log_level lvl, const char *msg) {
  if (lvl >= SAGA_LOG_WARN) fprintf(stderr, "[%s] %s\n", (const char *)arg, msg);
}

static saga_node *open_node_on(bench *b, uv_loop_t *loop, const char *name, saga_transport *t,
                               uint32_t resend_ms) {
  char path[600], err[256];
  snprintf(path, sizeof path, "%s/%s.db", b->dir, name);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.name = name;
  cfg.db_path = path;
  cfg.transport = t;
  cfg.synchronous = (saga_sync)b->sync;
  cfg.checkpoint = b->ckpt_background ? SAGA_CHECKPOINT_BACKGROUND : SAGA_CHECKPOINT_INLINE;
  if (b->ckpt_pages) cfg.checkpoint_pages = b->ckpt_pages;
  cfg.on_event = strcmp(name, "orch") == 0 ? on_event : NULL;
  cfg.event_arg = b;
  if (getenv("SAGA_BENCH_LOG") != NULL) {
    cfg.log = bench_log;
    cfg.log_arg = (void *)name;
  }
  if (resend_ms) cfg.resend_ms = resend_ms;
  saga_node *n = NULL;
  if (saga_node_open(&n, loop, &cfg, err, sizeof err) != SAGA_OK) die(name, err);
  return n;
}

static saga_node *open_node(bench *b, const char *name, saga_transport *t, uint32_t resend_ms) {
  return open_node_on(b, b->loop, name, t, resend_ms);
}

static void setup_orch(bench *b, saga_node *n) {
  saga_step steps[32];
  memset(steps, 0, sizeof steps);
  for (int i = 0; i < b->steps; i++) {
    steps[i].name = "STEP";
    steps[i].channel = "bench";
    steps[i].action = "b.do";
    steps[i].compensation = "b.undo";
  }
  saga_definition def = {SAGA_DEFINITION_VERSION, "bench", 1, steps, (size_t)b->steps, 0,
                         sizeof(saga_step)};
  if (saga_node_register(n, &def) != SAGA_OK) die("register", saga_node_errmsg(n));
  if (saga_node_start(n, NULL) != SAGA_OK) die("start orchestrator", saga_node_errmsg(n));
}

static void setup_part(bench *b, saga_node *n) {
  if (saga_node_handle(n, "bench", "b.do", b_do, NULL) != SAGA_OK ||
      saga_node_handle(n, "bench", "b.undo", b_undo, NULL) != SAGA_OK)
    die("handle", saga_node_errmsg(n));
  if (saga_node_start(n, NULL) != SAGA_OK) die("start participant", saga_node_errmsg(n));
}

static void closed(void *arg) { ((bench *)arg)->closed++; }

/* Closes the nodes given (NULL skipped) and runs the loop until they are released. */
static void close_nodes(bench *b, saga_node *x, saga_node *y) {
  int want = b->closed + (x != NULL) + (y != NULL);
  if (x != NULL) saga_node_close(x, closed, b);
  if (y != NULL) saga_node_close(y, closed, b);
  while (b->closed < want && uv_run(b->loop, UV_RUN_ONCE)) {
  }
}

/* ---- the participant on a thread of its own (--threads 2) ---------------------------------- */

static void setup_part(bench *b, saga_node *n);

static void part_main(void *arg) {
  bench *b = arg;
  if (uv_loop_init(&b->part_loop) != 0) die("uv_loop_init", NULL);
  b->part = open_node_on(b, &b->part_loop, "part", make_transport(b, 0), b->resend_ms);
  setup_part(b, b->part);
  uv_sem_post(&b->part_sem);
  uv_run(&b->part_loop, UV_RUN_DEFAULT); /* until the node is closed */
  uv_loop_close(&b->part_loop);
}

static void part_start_thread(bench *b) {
  if (uv_sem_init(&b->part_sem, 0) != 0 || uv_thread_create(&b->part_tid, part_main, b) != 0)
    die("starting the participant thread", NULL);
  uv_sem_wait(&b->part_sem);
}

/* What the main thread reads of the participant node, read on the participant's thread. */
typedef struct part_view {
  bench *b;
  saga_node_stats stats;
  int changes;
  int64_t bytes;
} part_view;

static int64_t db_bytes(saga_node *n);

static void part_view_cb(saga_node *n, void *arg) {
  part_view *v = arg;
  if (n != NULL) {
    saga_node_stats_get(n, &v->stats, sizeof v->stats);
    v->changes = sqlite3_total_changes(saga_node_db(n));
    v->bytes = db_bytes(n);
  }
  uv_sem_post(&v->b->part_sem);
}

static void part_read(bench *b, part_view *v) {
  memset(v, 0, sizeof *v);
  v->b = b;
  if (b->part_cmd != NULL) return; /* another process's node: not counted here */
  if (b->threads < 2) {
    part_view_cb(b->part, v);
    uv_sem_wait(&b->part_sem);
    return;
  }
  if (saga_node_post(b->part, part_view_cb, v) != SAGA_OK) die("saga_node_post", NULL);
  uv_sem_wait(&b->part_sem);
}

static void part_close_cb(saga_node *n, void *arg) {
  if (n != NULL) saga_node_close(n, NULL, NULL);
}

static void part_stop_thread(bench *b) {
  if (saga_node_post(b->part, part_close_cb, NULL) != SAGA_OK) die("saga_node_post", NULL);
  uv_thread_join(&b->part_tid);
  uv_sem_destroy(&b->part_sem);
  b->part = NULL;
}

/* ---- measurements ------------------------------------------------------------------------- */

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

/* Resident set size now, in bytes, from /proc/self/status (0 when unavailable). */
static int64_t rss_bytes(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  int64_t kib = 0;
  if (f == NULL) return 0;
  while (fgets(line, sizeof line, f) != NULL)
    if (sscanf(line, "VmRSS: %lld kB", (long long *)&kib) == 1) break;
  fclose(f);
  return kib * 1024;
}

/* The raw ceiling: the same number of commits, each with the same number of row writes of a
 * similar size, on plain SQLite with the same durability. Returns seconds. */
/* Durations of the ceiling's commits, in ms (for the sequential-latency floor). */
static double *ceil_commit_ms;

static double ceiling(const char *dir, int sync, uint64_t commits, uint64_t rows) {
  char path[600];
  snprintf(path, sizeof path, "%s/ceiling.db", dir);
  unlink(path);
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
  free(ceil_commit_ms);
  ceil_commit_ms = commits ? calloc(commits, sizeof *ceil_commit_ms) : NULL;
  uint64_t t0 = uv_hrtime();
  for (uint64_t c = 0; c < commits; c++) {
    uint64_t c0 = uv_hrtime();
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
    if (ceil_commit_ms != NULL) ceil_commit_ms[c] = (double)(uv_hrtime() - c0) / 1e6;
  }
  double secs = (double)(uv_hrtime() - t0) / 1e9;
  sqlite3_finalize(ins);
  sqlite3_finalize(begin);
  sqlite3_finalize(commit);
  sqlite3_close(db);
  return secs;
}

/* ---- history preload ---------------------------------------------------------------------- */

static void exec_or_die(sqlite3 *db, const char *sql) {
  char *err = NULL;
  if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
    fprintf(stderr, "saga_bench: preload: %s\n  in: %.300s\n", err ? err : "?", sql);
    exit(1);
  }
}

/*
 * Clones every row the completed template saga left in the database at path (the nodes are
 * closed) n times, with new saga ids, in one transaction. Tables and columns are read from
 * the schema, so this follows schema changes: a table is cloned when it has a `saga_id`
 * column (or is saga_instance, keyed by `id`); `msg_id` columns get the new id in place of the
 * template's; `idem_key` becomes NULL; `*_ms` times are shifted as the id's time is; integer
 * primary keys are left to SQLite. The new ids
 * have the engine's shape (12 hex digits of milliseconds, then 20 more), with times before the
 * template's, so the history sits where old sagas sit in every id-ordered index.
 * Returns the number of rows written.
 */
static int64_t preload_db(const char *path, const char *tmpl, long n) {
  sqlite3 *db = NULL;
  if (sqlite3_open(path, &db) != SQLITE_OK) die("preload: open", path);
  exec_or_die(db, "PRAGMA journal_mode=DELETE; PRAGMA synchronous=OFF; "
                  "PRAGMA cache_size=-262144; PRAGMA temp_store=MEMORY");
  exec_or_die(db, "BEGIN");
  /* Ids, in order. The template's first 12 digits are its start time in ms. */
  char ms[13];
  memcpy(ms, tmpl, 12);
  ms[12] = '\0';
  unsigned long long t_ms = strtoull(ms, NULL, 16);
  unsigned long long base = t_ms > (unsigned long long)n / 8 + 86400000ull
                                ? t_ms - (unsigned long long)n / 8 - 86400000ull
                                : 0;
  char sql[4096];
  snprintf(sql, sizeof sql,
           "CREATE TEMP TABLE ids(i INTEGER PRIMARY KEY, id TEXT NOT NULL);"
           "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < %ld) "
           "INSERT INTO ids SELECT i, printf('%%012x%%016x%%04x', %llu + i / 8, i, i %% 65536) "
           "FROM c",
           n - 1, base);
  exec_or_die(db, sql);
  sqlite3_stmt *tables = NULL;
  sqlite3_prepare_v2(db,
                     "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE "
                     "'sqlite_%' AND name NOT IN ('saga_outbox', 'saga_dead_letter') ORDER BY name",
                     -1, &tables, NULL);
  char names[32][64];
  int ntables = 0;
  while (sqlite3_step(tables) == SQLITE_ROW && ntables < 32)
    snprintf(names[ntables++], sizeof names[0], "%s", sqlite3_column_text(tables, 0));
  sqlite3_finalize(tables);
  int64_t rows = 0;
  for (int t = 0; t < ntables; t++) {
    sqlite3_str *cols = sqlite3_str_new(db), *exprs = sqlite3_str_new(db);
    char key[64] = "", order[64] = "";
    sqlite3_stmt *info = NULL;
    char *q = sqlite3_mprintf("SELECT name, type, pk FROM pragma_table_info(%Q)", names[t]);
    sqlite3_prepare_v2(db, q, -1, &info, NULL);
    sqlite3_free(q);
    int ncols = 0;
    while (sqlite3_step(info) == SQLITE_ROW) {
      const char *c = (const char *)sqlite3_column_text(info, 0);
      const char *type = (const char *)sqlite3_column_text(info, 1);
      int pk = sqlite3_column_int(info, 2);
      if (pk == 1 && strcasecmp(type, "INTEGER") == 0) continue; /* rowid alias */
      const char *sep = ncols++ ? ", " : "";
      sqlite3_str_appendf(cols, "%s\"%w\"", sep, c);
      if (strcmp(c, "saga_id") == 0 ||
          (strcmp(names[t], "saga_instance") == 0 && strcmp(c, "id") == 0)) {
        snprintf(key, sizeof key, "%s", c);
        sqlite3_str_appendf(exprs, "%sids.id", sep);
      } else if (strcmp(c, "msg_id") == 0) {
        sqlite3_str_appendf(exprs, "%sreplace(t.msg_id, %Q, ids.id)", sep, tmpl);
      } else if (strcmp(c, "idem_key") == 0) {
        sqlite3_str_appendf(exprs, "%sNULL", sep);
      } else if (strlen(c) > 3 && strcmp(c + strlen(c) - 3, "_ms") == 0) {
        /* Times move with the id: the history is as old as its ids say (a day and more). */
        sqlite3_str_appendf(exprs, "%st.\"%w\" - %lld + (%llu + ids.i / 8)", sep, c,
                            (long long)t_ms, base);
      } else {
        sqlite3_str_appendf(exprs, "%st.\"%w\"", sep, c);
      }
      if (strcmp(c, "seq") == 0 || strcmp(c, "step") == 0 || strcmp(c, "msg_id") == 0)
        snprintf(order, sizeof order, ", t.%s", c);
    }
    sqlite3_finalize(info);
    char *cs = sqlite3_str_finish(cols), *es = sqlite3_str_finish(exprs);
    if (key[0] != '\0' && cs != NULL && es != NULL) {
      char *ins = sqlite3_mprintf("INSERT INTO \"%w\"(%s) SELECT %s FROM ids, (SELECT * FROM "
                                  "\"%w\" WHERE \"%w\" = %Q) AS t ORDER BY ids.i%s",
                                  names[t], cs, es, names[t], key, tmpl, order);
      exec_or_die(db, ins);
      sqlite3_free(ins);
      rows += sqlite3_changes(db);
    }
    sqlite3_free(cs);
    sqlite3_free(es);
  }
  exec_or_die(db, "COMMIT");
  exec_or_die(db, "PRAGMA journal_mode=WAL");
  sqlite3_close(db);
  return rows;
}

/* Runs one saga through the engine as the template of --preload, then closes the nodes
 * and clones it into both databases. */
static void preload(bench *b) {
  b->warming = 1;
  start_one(b);
  uv_run(b->loop, UV_RUN_DEFAULT);
  if (b->warming != 2 || b->template_id[0] == '\0') die("preload: template saga failed", NULL);
  b->warming = 0;
  close_nodes(b, b->orch, b->part);
  b->orch = b->part = NULL;
  /* In a child process, so that the bulk load's page cache does not count in the run's
   * RSS; the files are synced, so that their write-back does not fall into the timed run. */
  uint64_t t0 = uv_hrtime();
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) die("fork", NULL);
  if (pid == 0) {
    int64_t rows = 0;
    const char *names[] = {"orch.db", "part.db"};
    for (int i = 0; i < 2; i++) {
      char path[600];
      snprintf(path, sizeof path, "%s/%s", b->dir, names[i]);
      rows += preload_db(path, b->template_id, b->preload);
      int fd = open(path, O_RDONLY);
      if (fd >= 0) {
        fsync(fd);
        close(fd);
      }
    }
    fprintf(stderr, "preloaded %ld completed sagas (%lld rows) in %.1f s\n", b->preload,
            (long long)rows, (double)(uv_hrtime() - t0) / 1e9);
    _exit(0);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    die("preload failed", NULL);
}

/* ---- output ------------------------------------------------------------------------------- */

static void emit(const char *summary, const char *json) {
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
        fprintf(f, *end || eq[1] == '\0' ? "%s\"%s\": \"%s\"" : "%s\"%s\": %s",
                first ? "" : ", ", kv, eq + 1);
        first = 0;
      }
      fprintf(f, "}\n");
      free(s);
      fclose(f);
    }
  }
}

static const char *sync_name(int sync) {
  return sync == SAGA_SYNC_FULL ? "full" : sync == SAGA_SYNC_NORMAL ? "normal" : "off";
}

/* ---- the recovery run --------------------------------------------------------------------- */

static double ms_since(uint64_t t0) { return (double)(uv_hrtime() - t0) / 1e6; }

static void run_recovery(bench *b, char *summary, size_t len) {
  /* Phase A: N sagas in flight, their commands in the outbox, nobody answering. The resend
   * interval is set long so that phase A does not spend its time resending. */
  b->orch = open_node(b, "orch", sink_new(), 3600 * 1000);
  setup_orch(b, b->orch);
  uv_run(b->loop, UV_RUN_NOWAIT);
  int64_t rss0 = rss_bytes(), sql0 = sqlite3_memory_used();
  uint64_t ta = uv_hrtime();
  /* A bounded window of queued starts, refilled from their callbacks. */
  int window = b->sagas < 1024 ? b->sagas : 1024;
  for (int i = 0; i < window; i++) start_one(b);
  uv_run(b->loop, UV_RUN_DEFAULT);
  double phase_a_s = (double)(uv_hrtime() - ta) / 1e9;
  int64_t rss1 = rss_bytes(), sql1 = sqlite3_memory_used();
  int64_t outbox = saga_node_outbox_depth(b->orch);
  saga_node_stats sa;
  saga_node_stats_get(b->orch, &sa, sizeof sa);
  close_nodes(b, b->orch, NULL);
  b->orch = NULL;
  double per = (double)(rss1 - rss0) / b->sagas, per_sql = (double)(sql1 - sql0) / b->sagas;
  printf("phase A: %d sagas in flight in %.2f s; outbox %lld rows; RSS +%.0f bytes per saga "
         "(SQLite heap +%.0f)\n",
         b->sagas, phase_a_s, (long long)outbox, per, per_sql);

  /* Phase B: reopen on the real transport; the participant is not there yet. */
  uint64_t t0 = uv_hrtime();
  b->orch = open_node(b, "orch", make_transport(b, 1), b->resend_ms);
  setup_orch(b, b->orch);
  double open_ms = ms_since(t0);
  saga_node_stats s;
  for (;;) {
    saga_node_stats_get(b->orch, &s, sizeof s);
    if (s.sent + s.resent >= (uint64_t)b->sagas) break;
    if (uv_run(b->loop, UV_RUN_ONCE) == 0) break;
  }
  double resume_ms = ms_since(t0);
  uint64_t t1 = uv_hrtime();
  b->part = open_node(b, "part", make_transport(b, 0), b->resend_ms);
  setup_part(b, b->part);
  if (b->finished < b->sagas) uv_run(b->loop, UV_RUN_DEFAULT);
  double finish_ms = ms_since(t1);
  saga_node_stats_get(b->orch, &s, sizeof s);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("recovery of %d in-flight sagas, sync=%s, transport=%s\n", b->sagas, sync_name(b->sync),
         transport_names[b->transport]);
  printf("reopen:  open+register+start %.1f ms; every pending command handed to the transport "
         "%.1f ms\n",
         open_ms, resume_ms);
  printf("finish:  all sagas ended %.1f ms after the participant opened (%.0f steps/s); %llu "
         "commands resent\n",
         finish_ms, (double)b->sagas * b->steps / (finish_ms / 1e3),
         (unsigned long long)s.resent);
  snprintf(summary, len,
           "mode=recovery sagas=%d steps=%d inflight=%d sync=%s transport=%s "
           "recovery_open_ms=%.1f recovery_resume_ms=%.1f recovery_finish_ms=%.1f "
           "recovery_outbox=%lld recovery_resent=%llu bytes_per_inflight=%.0f "
           "sqlite_bytes_per_inflight=%.0f phase_a_s=%.2f peak_rss_kib=%ld completed=%d "
           "compensated=%d failed=%d",
           b->sagas, b->steps, b->sagas, sync_name(b->sync), transport_names[b->transport],
           open_ms, resume_ms, finish_ms, (long long)outbox, (unsigned long long)s.resent, per,
           per_sql, phase_a_s, ru.ru_maxrss, b->completed, b->compensated, b->failed);
  (void)sa;
}

/* ---- an external participant (--participant-cmd) ------------------------------------------ */

static void spawn_participant(bench *b) {
  char listen[32], orch[32], sync[8];
  snprintf(listen, sizeof listen, "127.0.0.1:%d", b->port_part);
  snprintf(orch, sizeof orch, "127.0.0.1:%d", b->port_orch);
  snprintf(sync, sizeof sync, "%s", sync_name(b->sync));
  int fds[2];
  if (pipe(fds) != 0) die("pipe", strerror(errno));
  fflush(NULL);
  b->part_pid = fork();
  if (b->part_pid < 0) die("fork", strerror(errno));
  if (b->part_pid == 0) {
    setenv("SAGA_BENCH_PART_LISTEN", listen, 1);
    setenv("SAGA_BENCH_ORCH_ADDR", orch, 1);
    setenv("SAGA_BENCH_DIR", b->dir, 1);
    setenv("SAGA_BENCH_SYNC", sync, 1);
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    /* exec: the pid saga_bench signals is the participant's, not a shell's. */
    char line[4096];
    snprintf(line, sizeof line, "exec %s", b->part_cmd);
    execl("/bin/sh", "sh", "-c", line, (char *)NULL);
    _exit(127);
  }
  close(fds[1]);
  FILE *f = fdopen(fds[0], "r");
  char line[256];
  int ready = 0;
  while (f != NULL && fgets(line, sizeof line, f) != NULL)
    if (strncmp(line, "ready", 5) == 0) {
      ready = 1;
      break;
    }
  if (f != NULL) fclose(f);
  if (!ready) die("the participant command ended without printing \"ready\"", b->part_cmd);
}

static void stop_participant(bench *b) {
  if (b->part_pid <= 0) return;
  int st = 0;
  kill(b->part_pid, SIGTERM);
  if (waitpid(b->part_pid, &st, 0) == b->part_pid && (!WIFEXITED(st) || WEXITSTATUS(st) != 0))
    fprintf(stderr, "saga_bench: the participant command ended with wait status %d\n", st);
  b->part_pid = 0;
}

/* ---- the throughput run ------------------------------------------------------------------- */

static void run_throughput(bench *b, char *summary, size_t len) {
  /* The participant first: over TCP it must be listening when the orchestrator connects. */
  if (b->part_cmd != NULL) spawn_participant(b);
  else if (b->threads >= 2) part_start_thread(b);
  b->orch = open_node(b, "orch", make_transport(b, 1), b->resend_ms);
  if (b->threads < 2 && b->part_cmd == NULL) {
    if (uv_sem_init(&b->part_sem, 0) != 0) die("uv_sem_init", NULL);
    b->part = open_node(b, "part", make_transport(b, 0), b->resend_ms);
    setup_part(b, b->part);
  }
  setup_orch(b, b->orch);
  if (b->preload > 0) {
    preload(b);
    b->orch = open_node(b, "orch", make_transport(b, 1), b->resend_ms);
    b->part = open_node(b, "part", make_transport(b, 0), b->resend_ms);
    setup_orch(b, b->orch);
    setup_part(b, b->part);
  }
  part_view pv0, pv;
  part_read(b, &pv0);
  int64_t bytes0 = db_bytes(b->orch) + pv0.bytes;
  int changes0 = sqlite3_total_changes(saga_node_db(b->orch)) + pv0.changes;
  saga_node_stats so0, sp0 = pv0.stats;
  saga_node_stats_get(b->orch, &so0, sizeof so0);
  uint64_t t0 = uv_hrtime();
  for (int i = 0; i < b->inflight; i++) start_one(b);
  uv_run(b->loop, UV_RUN_DEFAULT);
  double secs = (double)(uv_hrtime() - t0) / 1e9;

  part_read(b, &pv);
  saga_node_stats so, sp = pv.stats;
  saga_node_stats_get(b->orch, &so, sizeof so);
  uint64_t commits = so.transactions + sp.transactions - so0.transactions - sp0.transactions;
  uint64_t ckpt_bg = so.checkpoints + sp.checkpoints - so0.checkpoints - sp0.checkpoints;
  uint64_t ckpt_in = so.checkpoints_inline + sp.checkpoints_inline - so0.checkpoints_inline -
                     sp0.checkpoints_inline;
  uint64_t rows =
      (uint64_t)(sqlite3_total_changes(saga_node_db(b->orch)) + pv.changes - changes0);
  /* A compensated saga runs its steps up to the refused one and back. */
  double steps_done = (double)b->completed * b->steps +
                      (double)b->compensated * (2.0 * b->steps - 1);
  double sps = steps_done / secs;
  int64_t bytes = db_bytes(b->orch) + pv.bytes - bytes0;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  double ceil_sps = -1;
  if (b->part_cmd == NULL) ceil_sps = steps_done / ceiling(b->dir, b->sync, commits, rows);
  qsort(b->lat_ms, b->nlat, sizeof *b->lat_ms, cmp_double);
  double p50 = pct(b->lat_ms, b->nlat, 0.50), p99 = pct(b->lat_ms, b->nlat, 0.99),
         p999 = pct(b->lat_ms, b->nlat, 0.999);
  const char *tn = transport_names[b->transport];
  /* With one saga in flight its commits run one after the other: the ceiling's commits,
   * summed in groups of commits-per-saga, are the latency plain SQLite needs for the same
   * sequence of durable commits, a floor for the engine's (-1 when not measured). */
  double floor_p50 = -1, floor_p99 = -1;
  uint64_t per_saga = b->sagas ? (commits + (uint64_t)b->sagas / 2) / (uint64_t)b->sagas : 0;
  if (b->inflight == 1 && per_saga > 0 && ceil_commit_ms != NULL && commits / per_saga > 0) {
    size_t groups = (size_t)(commits / per_saga);
    double *sum = calloc(groups, sizeof *sum);
    if (sum != NULL) {
      for (size_t g = 0; g < groups; g++)
        for (uint64_t k = 0; k < per_saga; k++) sum[g] += ceil_commit_ms[g * per_saga + k];
      qsort(sum, groups, sizeof *sum, cmp_double);
      floor_p50 = pct(sum, groups, 0.50);
      floor_p99 = pct(sum, groups, 0.99);
      free(sum);
    }
  }

  printf("sagas %d (completed %d, compensated %d, failed %d), %d steps each, %d in flight, "
         "sync=%s, transport=%s, %ld completed sagas preloaded\n",
         b->sagas, b->completed, b->compensated, b->failed, b->steps, b->inflight,
         sync_name(b->sync), tn, b->preload);
  printf("engine:  %.0f sagas/s, %.0f steps/s, %llu commits, %llu row writes\n",
         b->sagas / secs, sps, (unsigned long long)commits, (unsigned long long)rows);
  if (b->part_cmd != NULL)
    printf("ceiling: not measured (the participant is another program: %s)\n", b->part_cmd);
  else
    printf("ceiling: %.0f steps/s (same commits and row writes on plain SQLite)\n", ceil_sps);
  printf("latency: p50 %.3f ms, p99 %.3f ms, p99.9 %.3f ms\n", p50, p99, p999);
  if (floor_p99 >= 0)
    printf("floor:   p50 %.3f ms, p99 %.3f ms for the same %llu sequential commits per saga on "
           "plain SQLite\n",
           floor_p50, floor_p99, (unsigned long long)per_saga);
  printf("memory:  peak RSS %ld KiB; database %.0f bytes per saga\n", ru.ru_maxrss,
         (double)bytes / b->sagas);
  snprintf(summary, len,
           "sagas=%d steps=%d inflight=%d sync=%s transport=%s sagas_per_s=%.0f steps_per_s=%.0f "
           "ceiling_steps_per_s=%.0f ratio=%.3f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f "
           "peak_rss_kib=%ld db_bytes_per_saga=%.0f completed=%d compensated=%d failed=%d "
           "mode=run preloaded=%ld commits=%llu row_writes=%llu memstatus=%d "
           "checkpoints=%llu checkpoints_inline=%llu threads=%d floor_p50_ms=%.3f "
           "floor_p99_ms=%.3f tls=%d external_participant=%d",
           b->sagas, b->steps, b->inflight, sync_name(b->sync), tn, b->sagas / secs, sps,
           ceil_sps, ceil_sps > 0 ? sps / ceil_sps : -1.0, p50, p99, p999, ru.ru_maxrss, (double)bytes / b->sagas,
           b->completed, b->compensated, b->failed, b->preload, (unsigned long long)commits,
           (unsigned long long)rows, !b->no_memstatus, (unsigned long long)ckpt_bg,
           (unsigned long long)ckpt_in, b->threads < 2 ? 1 : 2, floor_p50, floor_p99, b->tls,
           b->part_cmd != NULL);
}

/* Parses a whole decimal number in [lo, hi] or exits with a message naming the option. */
static long opt_long(const char *opt, const char *arg, long lo, long hi) {
  char *end = NULL;
  errno = 0;
  long v = strtol(arg, &end, 10);
  if (errno != 0 || end == arg || *end != '\0' || v < lo || v > hi) {
    fprintf(stderr, "saga_bench: --%s wants a whole number in %ld..%ld, not '%s'\n", opt, lo, hi,
            arg);
    exit(2);
  }
  return v;
}

static double opt_ratio(const char *opt, const char *arg) {
  char *end = NULL;
  errno = 0;
  double v = strtod(arg, &end);
  if (errno != 0 || end == arg || *end != '\0' || !(v >= 0.0 && v <= 1.0)) {
    fprintf(stderr, "saga_bench: --%s wants a number in 0..1, not '%s'\n", opt, arg);
    exit(2);
  }
  return v;
}

static void usage(void) {
  fprintf(stderr,
          "usage: saga_bench [--sagas N] [--steps S] [--inflight K] [--sync full|normal|off]\n"
          "                  [--transport mem|inproc|tcp|nats] [--nats-url URL] [--fail R] [--json F]\n"
          "                  [--dir D] [--preload N] [--recovery N] [--paused] [--resend-ms MS]\n"
          "                  [--no-memstatus] [--checkpoint inline|background] [--threads 1|2]\n"
          "                  [--checkpoint-pages N] [--tls] [--participant-cmd CMD]\n");
}

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
      {"sagas", 1, 0, 'n'},     {"steps", 1, 0, 's'},    {"inflight", 1, 0, 'k'},
      {"sync", 1, 0, 'y'},      {"transport", 1, 0, 't'}, {"fail", 1, 0, 'f'},
      {"json", 1, 0, 'j'},      {"dir", 1, 0, 'd'},      {"nats-url", 1, 0, 'u'},
      {"preload", 1, 0, 'p'},   {"recovery", 1, 0, 'r'}, {"paused", 0, 0, 'P'},
      {"resend-ms", 1, 0, 'R'}, {"no-memstatus", 0, 0, 'M'},
      {"checkpoint", 1, 0, 'C'}, {"threads", 1, 0, 'T'},
      {"checkpoint-pages", 1, 0, 'K'}, {"tls", 0, 0, 'L'},
      {"participant-cmd", 1, 0, 'X'}, {0, 0, 0, 0}};
  int o;
  while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    switch (o) {
    case 'n': b.sagas = (int)opt_long("sagas", optarg, 1, 100000000); break;
    case 's': b.steps = (int)opt_long("steps", optarg, 1, 32); break;
    case 'k': b.inflight = (int)opt_long("inflight", optarg, 1, 10000000); break;
    case 'y':
      if (strcmp(optarg, "off") == 0) b.sync = SAGA_SYNC_OFF;
      else if (strcmp(optarg, "normal") == 0) b.sync = SAGA_SYNC_NORMAL;
      else if (strcmp(optarg, "full") == 0) b.sync = SAGA_SYNC_FULL;
      else return usage(), 2;
      break;
    case 't':
      if (strcmp(optarg, "mem") == 0) b.transport = T_MEM;
      else if (strcmp(optarg, "tcp") == 0) b.transport = T_TCP;
      else if (strcmp(optarg, "nats") == 0) b.transport = T_NATS;
      else if (strcmp(optarg, "inproc") == 0) b.transport = T_INPROC;
      else return usage(), 2;
      break;
    case 'f': b.fail = opt_ratio("fail", optarg); break;
    case 'j': json = optarg; break;
    case 'd': dir = optarg; break;
    case 'u': b.nats_url = optarg; break;
    case 'p': b.preload = opt_long("preload", optarg, 0, 1000000000); break;
    case 'r': b.recovery = (int)opt_long("recovery", optarg, 1, 100000000); break;
    case 'P': b.paused = 1; break;
    case 'R': b.resend_ms = (uint32_t)opt_long("resend-ms", optarg, 1, 86400000); break;
    case 'M': b.no_memstatus = 1; break;
    case 'L': b.tls = 1; break;
    case 'X': b.part_cmd = optarg; break;
    case 'T': b.threads = (int)opt_long("threads", optarg, 1, 2); break;
    case 'K': b.ckpt_pages = (uint32_t)opt_long("checkpoint-pages", optarg, 1, 100000000); break;
    case 'C':
      if (strcmp(optarg, "inline") == 0) b.ckpt_background = 0;
      else if (strcmp(optarg, "background") == 0) b.ckpt_background = 1;
      else return usage(), 2;
      break;
    default: usage(); return 2;
    }
  }
  /* SQLite's allocation statistics take a global mutex on every malloc; applications that
   * do not read sqlite3_memory_used() can turn them off. Engine and ceiling run in this one
   * process, so the ratio is unaffected. */
  if (b.no_memstatus && sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0) != SQLITE_OK) {
    fprintf(stderr, "saga_bench: cannot turn off SQLite memstatus\n");
    return 1;
  }
  if (b.threads < 0 || b.threads > 2) return usage(), 2;
  if (b.threads == 2 && (b.transport == T_MEM || b.preload > 0 || b.recovery > 0 || b.paused)) {
    fprintf(stderr, "saga_bench: --threads 2 needs --transport inproc, tcp or nats (the mem "
                    "hub serves one loop) and a plain throughput run\n");
    return 2;
  }
  if (b.part_cmd != NULL && (b.transport != T_TCP || b.tls || b.threads == 2 ||
                             b.preload > 0 || b.recovery > 0 || b.paused)) {
    fprintf(stderr, "saga_bench: --participant-cmd needs --transport tcp (plaintext, one "
                    "thread) and a plain throughput run\n");
    return 2;
  }
  if (b.paused && b.recovery == 0) b.recovery = b.inflight;
  if (b.recovery > 0) b.sagas = b.inflight = b.recovery;
  if (b.sagas < 1 || b.steps < 1 || b.steps > 32 || b.inflight < 1 || b.preload < 0 ||
      b.recovery < 0)
    return usage(), 2;
  if (b.transport == T_INPROC && saga_inproc_hub_new(&b.ihub, NULL) != SAGA_OK)
    die("saga_inproc_hub_new", NULL);
  if (b.transport == T_NATS) {
#ifndef SAGA_BENCH_NATS
    fprintf(stderr, "saga_bench: built without the NATS transport (libnats not found)\n");
    return 2;
#endif
  }
  if (b.inflight > b.sagas) b.inflight = b.sagas;
  if (dir != NULL) {
    snprintf(b.dir, sizeof b.dir, "%s", dir);
    mkdir(b.dir, 0700);
  } else {
    snprintf(b.dir, sizeof b.dir, "%s/saga_bench.XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (mkdtemp(b.dir) == NULL) return 1;
  }
  size_t cap = 16;
  while (cap < (size_t)b.inflight * 4) cap *= 2;
  b.map = calloc(cap, sizeof *b.map);
  b.mask = cap - 1;
  b.lat_ms = calloc((size_t)b.sagas, sizeof *b.lat_ms);
  b.loop = uv_default_loop();
  if (b.tls && b.transport != T_TCP) {
    fprintf(stderr, "saga_bench: --tls needs --transport tcp\n");
    return 2;
  }
  if (b.tls) { /* a throwaway CA and the two nodes' certificates, in the run's folder */
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "bash '%s/scripts/make_pki.sh' '%s/pki' bench-orch bench-part",
             SAGA_SOURCE_DIR, b.dir);
    if (system(cmd) != 0) die("making certificates with scripts/make_pki.sh", cmd);
  }
  if (b.transport == T_TCP) {
    b.port_orch = th_free_port();
    b.port_part = th_free_port();
    while (b.port_part == b.port_orch) b.port_part = th_free_port();
  }
  if (b.transport == T_NATS) {
    if (b.nats_url == NULL) start_nats(&b);
    /* A stream of its own, so that runs against a shared server never meet. */
    snprintf(b.nats_stream, sizeof b.nats_stream, "BENCH_%d_%u", (int)getpid(),
             (unsigned)(uv_hrtime() % 1000000));
    snprintf(b.nats_prefix, sizeof b.nats_prefix, "bench%d_%u", (int)getpid(),
             (unsigned)(uv_hrtime() % 1000000));
  }

  char summary[1024];
  if (b.recovery > 0) run_recovery(&b, summary, sizeof summary);
  else run_throughput(&b, summary, sizeof summary);
  emit(summary, json);

  if (b.threads >= 2 && b.part != NULL) part_stop_thread(&b);
  close_nodes(&b, b.orch, b.part);
  stop_participant(&b);
  if (b.hub != NULL) saga_mem_hub_close(b.hub);
  uv_run(b.loop, UV_RUN_DEFAULT);
  if (b.ihub != NULL && saga_inproc_hub_free(b.ihub) != SAGA_OK) die("inproc hub busy", NULL);
  uv_loop_close(b.loop);
  free(b.map);
  free(b.lat_ms);
  free(ceil_commit_ms);
  stop_nats();
  printf("%s\n", summary);
  int ok = b.completed + b.compensated == b.sagas && b.failed == 0;
  if (dir == NULL) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", b.dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", b.dir);
  }
  return ok ? 0 : 1;
}
