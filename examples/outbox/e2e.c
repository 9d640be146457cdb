/*
 * The outbox example end to end (examples/outbox/README.md): starts the four services
 * (outbox_service) as separate processes over TCP on free loopback ports, each with its own
 * database in a fresh folder, and waits until every course change and every order has been
 * acted on.
 *
 *   outbox_e2e SERVICE_BINARY [--demo] [--keep DIR]
 *
 * The test runs three rounds, each in a fresh folder; round r kills at occurrence n + 3r of
 * each point (the n listed below), so the kills land at different moments of the traffic.
 *
 * Without --demo (the ctest test_outbox): every service is killed with SIGKILL at each of its
 * commit points once during the run — the publishers (course, order) inside a transaction
 * right after writing an event to the outbox, before the commit, right after it, and right
 * after handing an event to the transport; the subscribers (marketing, delivery) before their
 * commit, after it (not yet acknowledged) and right after acknowledging. Each kill is the
 * service's own SIGKILL at that named point (OUTBOX_CRASH, the node's test hook), and each
 * killed service is restarted at once. Then the databases are checked: every event was
 * acted on exactly once (one catalogue update per course event, three mails per Posted, one
 * delivery per order), in order per key (sequence numbers 1, 2, 3, ... in the order the
 * subscriber's transactions recorded them, and the names in the order the course service
 * published them), nothing was dead-lettered, and every outbox is empty.
 * With --demo: no kills; prints what each service did. Exit status 0 when every check passed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#define COURSES 20
#define COURSE_OPS (COURSES * 7)
#define ORDER_OPS 100
#define CUSTOMERS 5

static const char *const course_steps[] = {"Created", "Updated", "Posted", "Updated",
                                           "Unposted", "Posted", "Deleted"};

typedef struct svc {
  const char *role;
  char db[600], log[600], listen[64], peer[64], ops[16];
  const char *const *crashes; /* the crash points still to go, NULL-terminated */
  int offset;                 /* added to each point's occurrence count (the round) */
  pid_t pid;
  int kills;
} svc;

/* Each point with the occurrence (from the process's start) at which it kills in round 0;
 * later rounds kill at later occurrences. */
static const char *const publisher_points[] = {"outbox.after_insert:3", "tx.before_commit:4",
                                               "tx.after_commit:5", "relay.after_publish:6",
                                               NULL};
static const char *const subscriber_points[] = {"tx.before_commit:2", "tx.after_commit:2",
                                                "tx.after_ack:3", NULL};
#define ROUNDS 3
static const char *const no_points[] = {NULL};

static const char *binary;
static int failures;

static void fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "FAIL: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  failures++;
}

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
      getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
    perror("free port");
    exit(1);
  }
  close(fd);
  return ntohs(a.sin_port);
}

static void spawn(svc *s) {
  char crash[80] = "";
  if (s->crashes[0] != NULL) {
    const char *colon = strrchr(s->crashes[0], ':');
    snprintf(crash, sizeof crash, "%.*s:%ld", (int)(colon - s->crashes[0]), s->crashes[0],
             strtol(colon + 1, NULL, 10) + s->offset);
  }
  int publisher = s->peer[0] != '\0';
  fflush(NULL);
  s->pid = fork();
  if (s->pid < 0) {
    perror("fork");
    exit(1);
  }
  if (s->pid == 0) {
    int fd = open(s->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    setenv("OUTBOX_CRASH", crash, 1);
    if (publisher)
      execl(binary, binary, s->role, "--db", s->db, "--listen", s->listen, "--peer", s->peer,
            "--ops", s->ops, "--interval", "8", (char *)NULL);
    else
      execl(binary, binary, s->role, "--db", s->db, "--listen", s->listen, (char *)NULL);
    _exit(127);
  }
}

static sqlite3 *open_db(const char *path) {
  sqlite3 *db = NULL;
  if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
    sqlite3_close(db);
    return NULL;
  }
  sqlite3_busy_timeout(db, 2000);
  return db;
}

/* One integer from path's database; -1 while it cannot be read (not created yet). */
static long q(const char *path, const char *sql) {
  sqlite3 *db = open_db(path);
  long v = -1;
  sqlite3_stmt *st = NULL;
  if (db != NULL && sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    v = (long)sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return v;
}

static int all_done(svc *sv) {
  return q(sv[0].db, "SELECT next FROM progress") == COURSE_OPS &&
         q(sv[2].db, "SELECT next FROM progress") == ORDER_OPS &&
         q(sv[0].db, "SELECT count(*) FROM saga_outbox") == 0 &&
         q(sv[2].db, "SELECT count(*) FROM saga_outbox") == 0 &&
         q(sv[1].db, "SELECT count(*) FROM seen") >= COURSE_OPS &&
         q(sv[3].db, "SELECT count(*) FROM seen") >= ORDER_OPS;
}

/* The subscriber's log, in the order its transactions recorded it: per key, sequence numbers
 * 1, 2, 3, ... and (names != NULL) the names in that order. */
static void check_order(const char *path, const char *what, const char *const *names,
                        int nnames) {
  sqlite3 *db = open_db(path);
  sqlite3_stmt *st = NULL;
  if (db == NULL ||
      sqlite3_prepare_v2(db, "SELECT key, seq, name FROM seen ORDER BY rowid", -1, &st, NULL) !=
          SQLITE_OK) {
    fail("%s: cannot read its log", what);
    sqlite3_close(db);
    return;
  }
  char keys[64][32];
  long last[64];
  int nkeys = 0, bad = 0;
  while (sqlite3_step(st) == SQLITE_ROW && bad < 5) {
    const char *k = (const char *)sqlite3_column_text(st, 0);
    long seq = (long)sqlite3_column_int64(st, 1);
    const char *name = (const char *)sqlite3_column_text(st, 2);
    int i = 0;
    while (i < nkeys && strcmp(keys[i], k) != 0) i++;
    if (i == nkeys) {
      if (nkeys == 64) {
        fail("%s: more than 64 keys", what);
        break;
      }
      snprintf(keys[nkeys], sizeof keys[nkeys], "%s", k);
      last[nkeys++] = 0;
    }
    if (seq != last[i] + 1) {
      fail("%s: key %s: event %ld after %ld", what, k, seq, last[i]);
      bad++;
    } else if (names != NULL && (seq > nnames || strcmp(names[seq - 1], name) != 0)) {
      fail("%s: key %s: event %ld is %s", what, k, seq, name);
      bad++;
    }
    last[i] = seq;
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
}

static void expect(const char *path, const char *sql, long want, const char *what) {
  long got = q(path, sql);
  if (got != want) fail("%s: %ld, expected %ld", what, got, want);
}

static int run(int round, int demo, const char *keep) {
  char dir[512];
  if (keep != NULL) {
    snprintf(dir, sizeof dir, "%s", keep);
    mkdir(dir, 0755);
  } else {
    snprintf(dir, sizeof dir, "%s/outbox-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (mkdtemp(dir) == NULL) {
      perror("mkdtemp");
      return 1;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  svc sv[4] = {{.role = "course"}, {.role = "marketing"}, {.role = "order"}, {.role = "delivery"}};
  for (int i = 0; i < 4; i++) {
    svc *s = &sv[i];
    snprintf(s->db, sizeof s->db, "%s/%s.db", dir, s->role);
    snprintf(s->log, sizeof s->log, "%s/%s.log", dir, s->role);
    snprintf(s->listen, sizeof s->listen, "127.0.0.1:%d", free_port());
    s->crashes = demo ? no_points : i % 2 == 0 ? publisher_points : subscriber_points;
    s->offset = 3 * round;
  }
  snprintf(sv[0].peer, sizeof sv[0].peer, "%s", sv[1].listen);
  snprintf(sv[0].ops, sizeof sv[0].ops, "%d", COURSE_OPS);
  snprintf(sv[2].peer, sizeof sv[2].peer, "%s", sv[3].listen);
  snprintf(sv[2].ops, sizeof sv[2].ops, "%d", ORDER_OPS);
  printf("outbox: round %d, services in %s (logs and databases there)\n", round + 1, dir);
  /* Subscribers first: the publishers' first events find them listening (they would be
   * resent anyway). */
  spawn(&sv[1]);
  spawn(&sv[3]);
  spawn(&sv[0]);
  spawn(&sv[2]);
  uint64_t deadline = now_ms() + 120000;
  int planned = 0, done = 0;
  for (int i = 0; i < 4; i++)
    for (const char *const *c = sv[i].crashes; *c != NULL; c++) planned++;
  while (now_ms() < deadline) {
    for (int i = 0; i < 4; i++) {
      svc *s = &sv[i];
      int status = 0;
      pid_t r = waitpid(s->pid, &status, WNOHANG);
      if (r != s->pid) continue;
      if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && s->crashes[0] != NULL) {
        printf("outbox: %s killed at %s, restarted\n", s->role, s->crashes[0]);
        s->kills++;
        s->crashes++;
        spawn(s);
      } else {
        fail("%s exited unexpectedly (status %d; see %s)", s->role, status, s->log);
        s->pid = 0;
        deadline = 0;
      }
    }
    if (all_done(sv)) {
      int pending = 0;
      for (int i = 0; i < 4; i++) pending += sv[i].crashes[0] != NULL;
      if (!pending) {
        done = 1;
        break;
      }
      /* Everything was delivered but a planned kill never came: the run was too short. */
      for (int i = 0; i < 4; i++)
        if (sv[i].crashes[0] != NULL)
          fail("%s never reached %s before the run ended", sv[i].role, sv[i].crashes[0]);
      break;
    }
    usleep(20000);
  }
  if (!done && failures == 0) fail("not everything was delivered within 120 s");
  for (int i = 0; i < 4; i++)
    if (sv[i].pid > 0) kill(sv[i].pid, SIGTERM);
  for (int i = 0; i < 4; i++) {
    int status = 0;
    /* A clean stop: exit status 0 (under the sanitizers, also no leak or error report). */
    if (sv[i].pid > 0 && waitpid(sv[i].pid, &status, 0) == sv[i].pid &&
        !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
      fail("%s did not stop cleanly on SIGTERM (status %d; see %s)", sv[i].role, status,
           sv[i].log);
  }
  int kills = 0;
  for (int i = 0; i < 4; i++) kills += sv[i].kills;
  if (kills != planned) fail("%d kills of the %d planned", kills, planned);

  /* Exactly once, in order per key. */
  const char *cdb = sv[0].db, *mdb = sv[1].db, *odb = sv[2].db, *ddb = sv[3].db;
  expect(cdb, "SELECT count(*) FROM published", COURSE_OPS, "course: changes published");
  expect(cdb, "SELECT count(*) FROM course", 0, "course: courses left (all were deleted)");
  expect(mdb, "SELECT count(*) FROM seen", COURSE_OPS, "marketing: course events acted on");
  expect(mdb, "SELECT count(DISTINCT id) FROM seen", COURSE_OPS, "marketing: distinct events");
  expect(mdb, "SELECT count(*) FROM mail", COURSES * 2 * 3, "marketing: mails");
  expect(mdb, "SELECT count(*) FROM (SELECT DISTINCT event_id, student FROM mail)",
         COURSES * 2 * 3, "marketing: distinct mails");
  expect(mdb, "SELECT count(*) FROM catalogue WHERE status = 'Deleted'", COURSES,
         "marketing: catalogue entries in their final state");
  expect(mdb, "SELECT count(*) FROM saga_dead_letter", 0, "marketing: dead letters");
  check_order(mdb, "marketing", course_steps, 7);
  expect(odb, "SELECT count(*) FROM orders", ORDER_OPS, "order: orders");
  expect(ddb, "SELECT count(*) FROM delivery", ORDER_OPS, "delivery: deliveries");
  expect(ddb, "SELECT count(DISTINCT order_json) FROM delivery", ORDER_OPS,
         "delivery: distinct orders delivered");
  expect(ddb, "SELECT count(*) FROM saga_dead_letter", 0, "delivery: dead letters");
  check_order(ddb, "delivery", NULL, 0);
  printf("outbox: %ld course events -> %ld mails; %ld orders -> %ld deliveries", q(mdb,
         "SELECT count(*) FROM seen"), q(mdb, "SELECT count(*) FROM mail"),
         q(odb, "SELECT count(*) FROM orders"), q(ddb, "SELECT count(*) FROM delivery"));
  printf(demo ? "\n" : "; %d kills (SIGKILL) at commit points, each service restarted\n",
         kills);
  printf(failures == 0 ? "outbox: every event acted on exactly once, in order per key\n"
                       : "outbox: %d checks failed\n",
         failures);
  if (failures == 0 && keep == NULL) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  }
  return failures == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) {
    fprintf(stderr, "usage: outbox_e2e SERVICE_BINARY [--demo] [--keep DIR]\n");
    return 2;
  }
  binary = argv[1];
  int demo = 0;
  const char *keep = NULL;
  for (int i = 2; i < argc; i++) {
    if (strcmp(argv[i], "--demo") == 0) demo = 1;
    else if (strcmp(argv[i], "--keep") == 0 && i + 1 < argc) keep = argv[++i];
    else return 2;
  }
  /* The demo runs once; the test once per round, each killing at later occurrences. */
  int rounds = demo || keep != NULL ? 1 : ROUNDS;
  for (int r = 0; r < rounds; r++)
    if (run(r, demo, keep) != 0) return 1;
  return 0;
}
