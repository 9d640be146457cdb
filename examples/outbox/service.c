/*
 * The outbox example (examples/outbox/README.md): four services, each its own process with its
 * own database, talking over TCP through libsaga's domain events (include/saga/domain.h).
 *
 *   course     a course catalogue. Each change (Created, Updated, Posted, Unposted, Deleted) is
 *              an application transaction (saga_node_transact): the course row and its event
 *              commit together, and the event is sent only then. It works through a fixed
 *              list of --ops changes, one every --interval ms, recording how far it got in
 *              the same transaction, so that a restarted service carries on where it was.
 *   marketing  subscribes to the course events: keeps a copy of the catalogue, and when a
 *              course is Posted, "e-mails" its students (a row per mail in its database),
 *              once, however often the event is delivered.
 *   order      creates --ops orders for 5 customers, each with its OrderCreated event (key:
 *              the customer, so a customer's orders arrive in order).
 *   delivery   subscribes to OrderCreated and creates a delivery per order.
 *
 *   outbox_service ROLE --db FILE --listen HOST:PORT [--peer HOST:PORT] [--ops N]
 *                  [--interval MS]
 * course and order send their events to --peer (marketing's and delivery's address).
 *
 * Crash injection for the end-to-end test: OUTBOX_CRASH=POINT:N makes the process kill itself
 * with SIGKILL at the N-th time it reaches POINT, one of the node's named points
 * (saga_node_config.test_hook: tx.before_commit, tx.after_commit, tx.after_ack,
 * outbox.after_insert, relay.after_publish).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <saga.h>
#include <saga/transport_tcp.h>
#include <sqlite3.h>
#include <uv.h>

/* The life of every course: its events, in order. */
static const char *const course_steps[] = {"Created", "Updated", "Posted", "Updated",
                                           "Unposted", "Posted", "Deleted"};
#define COURSE_STEPS 7
#define CUSTOMERS 5
#define STUDENTS 3

static saga_node *node;
static uv_loop_t *loop;
static uv_timer_t tick;
static uv_signal_t sigterm, sigint;
static const char *role;
static long ops, interval_ms = 5;
static int busy; /* a transaction of ours is queued */
static char crash_point[64];
static long crash_at, crash_seen;

static void crash_hook(void *arg, const char *point) {
  (void)arg;
  if (crash_at > 0 && strcmp(point, crash_point) == 0 && ++crash_seen == crash_at) {
    fprintf(stderr, "%s: crash at %s #%ld\n", role, point, crash_at);
    raise(SIGKILL);
  }
}

static int exec(sqlite3 *db, const char *sql) {
  char *err = NULL;
  int rc = sqlite3_exec(db, sql, NULL, NULL, &err);
  if (rc != SQLITE_OK) fprintf(stderr, "%s: %s: %s\n", role, sql, err ? err : "");
  sqlite3_free(err);
  return rc == SQLITE_OK ? SAGA_OK : SAGA_ESTORE;
}

static long query_long(sqlite3 *db, const char *sql) {
  sqlite3_stmt *st = NULL;
  long v = -1;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
    v = (long)sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

/* ---- course and order: application transactions that publish --------------------------- */

/* The next change, its row and its event, in one transaction. */
static int next_op(saga_tx *tx, void *arg) {
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  long i = query_long(db, "SELECT next FROM progress");
  if (i < 0) return SAGA_ESTORE;
  if (i >= ops) return SAGA_OK;
  char sql[300], key[32], data[160];
  int rc;
  if (strcmp(role, "course") == 0) {
    long courses = ops / COURSE_STEPS, c = i % courses;
    const char *name = course_steps[i / courses];
    snprintf(key, sizeof key, "course-%ld", c);
    snprintf(data, sizeof data, "{\"id\":\"%s\",\"title\":\"Course %ld, v%ld\"}", key, c,
             i / courses);
    if (strcmp(name, "Created") == 0)
      snprintf(sql, sizeof sql, "INSERT INTO course(id, title, posted) VALUES('%s', 'Course "
               "%ld', 0)", key, c);
    else if (strcmp(name, "Deleted") == 0)
      snprintf(sql, sizeof sql, "DELETE FROM course WHERE id = '%s'", key);
    else
      snprintf(sql, sizeof sql, "UPDATE course SET title = 'Course %ld, v%ld', posted = %d "
               "WHERE id = '%s'", c, i / courses,
               strcmp(name, "Posted") == 0 ? 1 : strcmp(name, "Unposted") == 0 ? 0 : 0, key);
    if ((rc = exec(db, sql)) != SAGA_OK) return rc;
    rc = saga_tx_publish(tx, "courses", name, key, data, strlen(data));
    if (rc != SAGA_OK) return rc;
    snprintf(sql, sizeof sql, "INSERT INTO published(op, key, name) VALUES(%ld, '%s', '%s')",
             i, key, name);
  } else {
    snprintf(key, sizeof key, "customer-%ld", i % CUSTOMERS);
    snprintf(data, sizeof data, "{\"order\":\"order-%ld\",\"customer\":\"%s\"}", i, key);
    snprintf(sql, sizeof sql, "INSERT INTO orders(id, customer) VALUES('order-%ld', '%s')", i,
             key);
    if ((rc = exec(db, sql)) != SAGA_OK) return rc;
    rc = saga_tx_publish(tx, "orders", "OrderCreated", key, data, strlen(data));
    if (rc != SAGA_OK) return rc;
    snprintf(sql, sizeof sql, "INSERT INTO published(op, key, name) VALUES(%ld, '%s', "
             "'OrderCreated')", i, key);
  }
  if ((rc = exec(db, sql)) != SAGA_OK) return rc;
  return exec(db, "UPDATE progress SET next = next + 1");
}

static void op_done(saga_node *n, int status, void *arg) {
  (void)n;
  (void)arg;
  busy = 0;
  if (status != SAGA_OK) fprintf(stderr, "%s: transaction failed: %s\n", role, saga_strerror(status));
}

static void on_tick(uv_timer_t *t) {
  (void)t;
  if (busy || node == NULL) return;
  if (saga_node_transact(node, next_op, NULL, op_done, NULL) == SAGA_OK) busy = 1;
}

/* ---- marketing and delivery: subscribers ------------------------------------------------ */

/* Every event is logged with its key and sequence number (the test checks the order). */
static int log_event(sqlite3 *db, const saga_domain_event *ev) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, "INSERT INTO seen(id, key, seq, name) VALUES(?1, ?2, ?3, ?4)", -1,
                         &st, NULL) != SQLITE_OK)
    return SAGA_ESTORE;
  sqlite3_bind_text(st, 1, ev->id, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, ev->key, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 3, (sqlite3_int64)ev->seq);
  sqlite3_bind_text(st, 4, ev->name, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? SAGA_OK : SAGA_ESTORE;
}

/* Marketing: the catalogue copy for every course event; mails when a course is Posted. */
static int on_course(saga_tx *tx, const saga_domain_event *ev, void *arg) {
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  int rc = log_event(db, ev);
  if (rc != SAGA_OK) return rc;
  char sql[300];
  snprintf(sql, sizeof sql, "INSERT INTO catalogue(id, status) VALUES('%.60s', '%.20s') ON "
           "CONFLICT(id) DO UPDATE SET status = excluded.status", ev->key, ev->name);
  if ((rc = exec(db, sql)) != SAGA_OK) return rc;
  if (strcmp(ev->name, "Posted") != 0) return SAGA_OK;
  for (int s = 0; s < STUDENTS; s++) {
    /* The "mail": sent by the same transaction that records it. A real service would put it
     * in its own outbox table for a mailer, or publish a MailRequested event. */
    snprintf(sql, sizeof sql, "INSERT INTO mail(event_id, course, student) VALUES('%.40s', "
             "'%.60s', 'student-%d')", ev->id, ev->key, s);
    if ((rc = exec(db, sql)) != SAGA_OK) return rc;
  }
  return SAGA_OK;
}

/* Delivery: one delivery per order. */
static int on_order(saga_tx *tx, const saga_domain_event *ev, void *arg) {
  (void)arg;
  sqlite3 *db = saga_tx_db(tx);
  int rc = log_event(db, ev);
  if (rc != SAGA_OK) return rc;
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, "INSERT INTO delivery(order_json, event_id) VALUES(?1, ?2)", -1,
                         &st, NULL) != SQLITE_OK)
    return SAGA_ESTORE;
  sqlite3_bind_text(st, 1, (const char *)ev->data, (int)ev->len, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, ev->id, -1, SQLITE_STATIC);
  rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? SAGA_OK : SAGA_ESTORE;
}

/* ---- setup ------------------------------------------------------------------------------ */

static void on_signal(uv_signal_t *s, int signum) {
  (void)s;
  (void)signum;
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_close((uv_handle_t *)&sigint, NULL);
  if (!uv_is_closing((uv_handle_t *)&tick)) uv_close((uv_handle_t *)&tick, NULL);
  saga_node_close(node, NULL, NULL);
  node = NULL;
}

static void usage(void) {
  fprintf(stderr, "usage: outbox_service course|marketing|order|delivery --db FILE --listen "
                  "HOST:PORT [--peer HOST:PORT] [--ops N] [--interval MS]\n");
  exit(2);
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) usage();
  role = argv[1];
  const char *db_path = NULL, *listen = NULL, *peer = NULL;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--db") == 0) db_path = argv[i + 1];
    else if (strcmp(argv[i], "--listen") == 0) listen = argv[i + 1];
    else if (strcmp(argv[i], "--peer") == 0) peer = argv[i + 1];
    else if (strcmp(argv[i], "--ops") == 0) ops = strtol(argv[i + 1], NULL, 10);
    else if (strcmp(argv[i], "--interval") == 0) interval_ms = strtol(argv[i + 1], NULL, 10);
    else usage();
  }
  int publisher = strcmp(role, "course") == 0 || strcmp(role, "order") == 0;
  int subscriber = strcmp(role, "marketing") == 0 || strcmp(role, "delivery") == 0;
  if ((!publisher && !subscriber) || db_path == NULL || listen == NULL ||
      (publisher && (peer == NULL || ops <= 0)) || interval_ms < 1)
    usage();
  if (strcmp(role, "course") == 0 && ops % COURSE_STEPS != 0) {
    fprintf(stderr, "course: --ops must be a multiple of %d\n", COURSE_STEPS);
    return 2;
  }
  const char *crash = getenv("OUTBOX_CRASH");
  if (crash != NULL && crash[0] != '\0') {
    const char *colon = strrchr(crash, ':');
    if (colon == NULL || (size_t)(colon - crash) >= sizeof crash_point) usage();
    snprintf(crash_point, sizeof crash_point, "%.*s", (int)(colon - crash), crash);
    crash_at = strtol(colon + 1, NULL, 10);
  }
  loop = uv_default_loop();

  /* Plaintext on loopback for the example; docs/security.md has TLS and access lists. */
  saga_tcp_route routes[1] = {{publisher && strcmp(role, "course") == 0 ? "courses" : "orders",
                               peer, NULL}};
  saga_tcp_config tc;
  saga_tcp_config_init(&tc);
  tc.listen = listen;
  tc.routes = routes;
  tc.nroutes = publisher ? 1 : 0;
  tc.insecure_plaintext = 1;
  tc.reconnect_max_ms = 200;
  saga_transport *t = NULL;
  char err[256];
  if (saga_tcp_transport_new2(&t, &tc, err, sizeof err) != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", role, err);
    return 1;
  }
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.name = role;
  cfg.db_path = db_path;
  cfg.db_mode = SAGA_DB_CREATE;
  cfg.transport = t;
  cfg.resend_ms = 200;
  cfg.test_hook = crash_at > 0 ? crash_hook : NULL;
  if (saga_node_open(&node, loop, &cfg, err, sizeof err) != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", role, err);
    return 1;
  }
  sqlite3 *db = saga_node_db(node);
  int rc = SAGA_OK;
  if (strcmp(role, "course") == 0)
    rc = exec(db, "CREATE TABLE IF NOT EXISTS course(id TEXT PRIMARY KEY, title TEXT, posted "
                  "INTEGER)");
  else if (strcmp(role, "order") == 0)
    rc = exec(db, "CREATE TABLE IF NOT EXISTS orders(id TEXT PRIMARY KEY, customer TEXT)");
  if (rc == SAGA_OK && publisher)
    rc = exec(db, "CREATE TABLE IF NOT EXISTS published(op INTEGER PRIMARY KEY, key TEXT, name "
                  "TEXT); CREATE TABLE IF NOT EXISTS progress(next INTEGER NOT NULL);"
                  "INSERT INTO progress SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM progress)");
  if (rc == SAGA_OK && subscriber)
    rc = exec(db, "CREATE TABLE IF NOT EXISTS seen(id TEXT, key TEXT, seq INTEGER, name TEXT)");
  if (rc == SAGA_OK && strcmp(role, "marketing") == 0) {
    rc = exec(db, "CREATE TABLE IF NOT EXISTS catalogue(id TEXT PRIMARY KEY, status TEXT);"
                  "CREATE TABLE IF NOT EXISTS mail(event_id TEXT, course TEXT, student TEXT)");
    if (rc == SAGA_OK) rc = saga_node_on_event(node, "courses", NULL, on_course, NULL);
  }
  if (rc == SAGA_OK && strcmp(role, "delivery") == 0) {
    rc = exec(db, "CREATE TABLE IF NOT EXISTS delivery(order_json TEXT, event_id TEXT)");
    if (rc == SAGA_OK) rc = saga_node_on_event(node, "orders", "OrderCreated", on_order, NULL);
  }
  if (rc == SAGA_OK) rc = saga_node_start(node, NULL);
  if (rc != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", role, saga_node_errmsg(node));
    return 1;
  }
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_init(loop, &sigint);
  uv_signal_start(&sigint, on_signal, SIGINT);
  uv_timer_init(loop, &tick);
  if (publisher) uv_timer_start(&tick, on_tick, 0, (uint64_t)interval_ms);
  printf("%s: running on %s\n", role, listen);
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}
