/*
 * The rental example end to end (examples/rental/README.md): starts the four services
 * (rental_service) as separate processes over TCP on free loopback ports, each with its own
 * database in a fresh folder, drives them over HTTP like librarians and customers would, then
 * stops them and checks that the four databases agree.
 *
 *   rental_e2e SERVICE_BINARY [--demo] [--keep DIR] [--seed N]
 *
 * 1. stocks five books, two of them with one copy (so some reservations find none left), and
 *    checks that bad requests are refused with a clear 4xx;
 * 2. five customers reserve; once everything settled, some delivered reservations are
 *    cancelled (the copy is collected back) and a rejected one cannot be;
 * 3. stops delivery and MyPage (SIGTERM) and reserves and cancels meanwhile: the
 *    reservations are still accepted, the copies taken, nothing delivered; restarts delivery:
 *    the waiting reservations are delivered; then MyPage, which gets what it missed from three
 *    publishers at once (in no particular order between them);
 * 4. (not with --demo) restarts every service with a kill plan: each kills itself with SIGKILL
 *    at named commit points of its node (RENTAL_CRASH, the node's test hook) — before and
 *    after a commit, after acknowledging a delivery, after writing an event to the outbox and
 *    after handing one to the transport — and is restarted at once, while customers keep
 *    reserving and cancelling (retrying a command whose answer was lost, with the same
 *    request id) until every planned kill happened;
 * 5. waits (polling, with a deadline) until every outbox is empty and nothing is reserved
 *    without an outcome, stops everything (SIGTERM: a clean exit is checked), opens the four
 *    databases read-only and checks that they agree (see check()).
 * With --demo it prints the story and what each customer sees on MyPage. Exit status 0 when
 * every check passed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

enum { RES, PROD, DELIV, MYPAGE, NSVC };
static const char *const roles[NSVC] = {"reservation", "product", "delivery", "mypage"};

typedef struct svc {
  const char *role;
  char db[600], log[600], listen[32], http[32];
  const char *const *crashes; /* kill points still to go (NULL-terminated); NULL: unarmed */
  int offset;                 /* added to each point's occurrence (the round) */
  pid_t pid;                  /* 0 while stopped */
  int kills;
} svc;

/* Kill plans of step 4: POINT:N, the N-th time the restarted process reaches POINT. */
static const char *const publisher_points[] = {"outbox.after_insert:4", "tx.before_commit:6",
                                               "tx.after_commit:6", "relay.after_publish:8",
                                               "tx.after_ack:5", NULL};
static const char *const mypage_points[] = {"tx.before_commit:6", "tx.after_commit:6",
                                            "tx.after_ack:8", NULL};
#define ROUNDS 3 /* round r kills at occurrence N + 3r */

typedef struct book_t {
  const char *id, *title;
  int copies, restock; /* stocked in step 1, added in step 4 */
} book_t;
static const book_t books[] = {{"dune", "Dune", 3, 6},       {"emma", "Emma", 1, 2},
                             {"ulysses", "Ulysses", 2, 4}, {"odyssey", "The Odyssey", 12, 6},
                             {"hobbit", "The Hobbit", 1, 4}};
#define NBOOKS 5
static const char *const customers[] = {"alice", "bob", "carol", "dave", "erin"};
#define NCUSTOMERS 5

/* What the driver was told: every reservation it made, and what became of its cancels. */
typedef struct placed {
  char id[16];
  int customer, book;
  int cancel; /* 0 none, 200 cancelled, 409 refused (rejected) */
  int phase;
} placed;
#define MAX_PLACED 1024

static svc sv[NSVC];
static placed made[MAX_PLACED];
static int nmade, nrequests, replays;
static const char *binary;
static int failures, demo, stocked[NBOOKS];
static char dir[512];
static uint64_t rng = 42;

static void fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "FAIL: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  failures++;
}

static void say(const char *fmt, ...) {
  if (!demo) return;
  va_list ap;
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
}

static unsigned rnd(unsigned n) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (unsigned)(rng % n);
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

/* ---- the processes -------------------------------------------------------------------- */

static void spawn(svc *s) {
  char crash[80] = "";
  if (s->crashes != NULL && s->crashes[0] != NULL) {
    const char *colon = strrchr(s->crashes[0], ':');
    snprintf(crash, sizeof crash, "%.*s:%ld", (int)(colon - s->crashes[0]), s->crashes[0],
             strtol(colon + 1, NULL, 10) + s->offset);
  }
  char peers[NSVC][80];
  for (int i = 0; i < NSVC; i++)
    snprintf(peers[i], sizeof peers[i], "rental.%s=%s", roles[i], sv[i].listen);
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
    setenv("RENTAL_CRASH", crash, 1);
    /* Routes to the other three services' channels (one channel -> one address). */
    const char *p[NSVC - 1];
    for (int i = 0, k = 0; i < NSVC; i++)
      if (&sv[i] != s) p[k++] = peers[i];
    execl(binary, binary, s->role, "--db", s->db, "--listen", s->listen, "--http", s->http,
          "--peer", p[0], "--peer", p[1], "--peer", p[2], (char *)NULL);
    _exit(127);
  }
}

/* Restarts the services killed at their planned points; any other exit is a failure. */
static void reap(void) {
  for (int i = 0; i < NSVC; i++) {
    svc *s = &sv[i];
    int status = 0;
    if (s->pid <= 0 || waitpid(s->pid, &status, WNOHANG) != s->pid) continue;
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && s->crashes != NULL &&
        s->crashes[0] != NULL) {
      printf("rental: %s killed at %s, restarted\n", s->role, s->crashes[0]);
      s->kills++;
      s->crashes++;
      spawn(s);
    } else {
      fail("%s exited unexpectedly (status %d; see %s)", s->role, status, s->log);
      s->pid = 0;
    }
  }
}

/* SIGTERM and a clean exit (status 0; under the sanitizers also no error or leak report). */
static int http1(const char *addr, const char *method, const char *path, const char *body,
                 char *out, size_t outlen);

static void stop(svc *s) {
  if (s->pid <= 0) return;
  /* Up first (answering HTTP), so that it has its signal handler. */
  char out[512];
  uint64_t end = now_ms() + 20000;
  while (now_ms() < end && http1(s->http, "GET", "/", NULL, out, sizeof out) < 0) {
    struct timespec ts = {0, 10 * 1000000};
    nanosleep(&ts, NULL);
  }
  kill(s->pid, SIGTERM);
  int status = 0;
  if (waitpid(s->pid, &status, 0) == s->pid && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
    /* A kill planned at a point the shutdown itself reached counts as that kill. */
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && s->crashes && s->crashes[0]) {
      printf("rental: %s killed at %s while stopping\n", s->role, s->crashes[0]);
      s->kills++;
      s->crashes++;
    } else {
      fail("%s did not stop cleanly on SIGTERM (status %d; see %s)", s->role, status, s->log);
    }
  }
  s->pid = 0;
}

/* ---- the databases -------------------------------------------------------------------- */

static sqlite3 *open_db(const char *path) {
  sqlite3 *db = NULL;
  if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
    sqlite3_close(db);
    return NULL;
  }
  sqlite3_busy_timeout(db, 2000);
  return db;
}

/* One integer from a database; -1 while it cannot be read. */
static long q(int i, const char *sql) {
  sqlite3 *db = open_db(sv[i].db);
  long v = -1;
  sqlite3_stmt *st = NULL;
  if (db != NULL && sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    v = (long)sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return v;
}

/* Waits for cond (polling every 20 ms, restarting killed services) until deadline_ms. */
static int wait_for(int (*cond)(void *), void *arg, unsigned deadline_ms, const char *what) {
  uint64_t end = now_ms() + deadline_ms;
  while (now_ms() < end) {
    reap();
    if (cond(arg)) return 1;
    struct timespec ts = {0, 20 * 1000000};
    nanosleep(&ts, NULL);
  }
  fail("timed out (%u ms) waiting until %s", deadline_ms, what);
  return 0;
}

/* ---- HTTP ----------------------------------------------------------------------------- */

/* One request on a new connection; the status, or -1 (no connection or no whole answer). */
static int http1(const char *addr, const char *method, const char *path, const char *body,
                 char *out, size_t outlen) {
  int port = atoi(strchr(addr, ':') + 1);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  struct timeval tv = {10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  size_t blen = body ? strlen(body) : 0;
  char *req = malloc(blen + 512);
  if (req == NULL) {
    close(fd);
    return -1;
  }
  int n = snprintf(req, 512, "%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                   "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n", method, path,
                   blen);
  memcpy(req + n, body ? body : "", blen);
  size_t total = (size_t)n + blen, sent = 0;
  while (sent < total) {
    ssize_t w = send(fd, req + sent, total - sent, MSG_NOSIGNAL);
    if (w <= 0) break;
    sent += (size_t)w;
  }
  free(req);
  char buf[65536];
  size_t got = 0;
  ssize_t r;
  while (got + 1 < sizeof buf && (r = recv(fd, buf + got, sizeof buf - 1 - got, 0)) > 0)
    got += (size_t)r;
  close(fd);
  buf[got] = '\0';
  int status = -1;
  char *sep = strstr(buf, "\r\n\r\n");
  if (sep == NULL || sscanf(buf, "HTTP/1.%*d %d", &status) != 1) return -1;
  /* The whole body (Content-Length) or the answer was cut by a kill. */
  char *cl = strcasestr(buf, "Content-Length:");
  if (cl == NULL || cl > sep || (size_t)atol(cl + 15) != strlen(sep + 4)) return -1;
  snprintf(out, outlen, "%s", sep + 4);
  return status;
}

/* A command or query, retried (same body, so the same request id) while the service is down
 * or restarting or the answer was lost; the status (-1 after 20 s), *out the JSON answer. */
static int call(int i, const char *method, const char *path, const char *body, json_t **out) {
  char text[65536];
  uint64_t end = now_ms() + 20000;
  if (out) *out = NULL;
  while (now_ms() < end) {
    reap();
    int status = http1(sv[i].http, method, path, body, text, sizeof text);
    if (status > 0 && status != 503) {
      json_error_t e;
      if (out) *out = json_loads(text, 0, &e);
      return status;
    }
    struct timespec ts = {0, 20 * 1000000};
    nanosleep(&ts, NULL);
  }
  fail("%s %s on %s: no answer within 20 s", method, path, roles[i]);
  return -1;
}

static const char *jstr(json_t *j, const char *key) {
  const char *s = json_string_value(json_object_get(j, key));
  return s ? s : "";
}

/* ---- the customers and the librarian ---------------------------------------------------- */

static void stock(int b, int copies) {
  char body[256];
  snprintf(body, sizeof body, "{\"request\":\"stock-%d\",\"book\":\"%s\",\"title\":\"%s\","
           "\"copies\":%d}", ++nrequests, books[b].id, books[b].title, copies);
  json_t *j = NULL;
  int st = call(PROD, "POST", "/books", body, &j);
  if (st != 200) fail("stocking %s: %d", books[b].id, st);
  else stocked[b] += copies;
  say("  librarian stocks %d x %s: %lld on the shelf\n", copies, books[b].title,
      (long long)json_integer_value(json_object_get(j, "copies")));
  json_decref(j);
}

static placed *reserve(int c, int b, int phase) {
  char body[256];
  snprintf(body, sizeof body, "{\"request\":\"req-%d\",\"customer\":\"%s\",\"book\":\"%s\"}",
           ++nrequests, customers[c], books[b].id);
  json_t *j = NULL;
  int st = call(RES, "POST", "/reservations", body, &j);
  placed *p = NULL;
  /* 200: the same request seen before (its first answer was lost to a kill). */
  replays += st == 200;
  if ((st == 201 || st == 200) && nmade < MAX_PLACED && jstr(j, "id")[0] != '\0') {
    p = &made[nmade++];
    snprintf(p->id, sizeof p->id, "%s", jstr(j, "id"));
    p->customer = c;
    p->book = b;
    p->phase = phase;
    say("  %s reserves %s: %s %s\n", customers[c], books[b].title, p->id, jstr(j, "status"));
  } else {
    fail("%s reserving %s: %d", customers[c], books[b].id, st);
  }
  json_decref(j);
  return p;
}

static int cancel(placed *p) {
  char path[64], body[96];
  snprintf(path, sizeof path, "/reservations/%s/cancel", p->id);
  snprintf(body, sizeof body, "{\"customer\":\"%s\"}", customers[p->customer]);
  json_t *j = NULL;
  int st = call(RES, "POST", path, body, &j);
  if (st == 200 || st == 409) p->cancel = st;
  else fail("%s cancelling %s: %d", customers[p->customer], p->id, st);
  say("  %s cancels %s (%s): %s\n", customers[p->customer], p->id, books[p->book].title,
      st == 200 ? "CANCELLED" : jstr(j, "error"));
  json_decref(j);
  return st;
}

static const char *status_of(placed *p, char *buf, size_t len) {
  char path[64];
  snprintf(path, sizeof path, "/reservations/%s", p->id);
  json_t *j = NULL;
  buf[0] = '\0';
  if (call(RES, "GET", path, NULL, &j) == 200) snprintf(buf, len, "%s", jstr(j, "status"));
  json_decref(j);
  return buf;
}

/* ---- waiting ---------------------------------------------------------------------------- */

static int books_known(void *arg) {
  (void)arg;
  char path[64], out[512];
  for (int b = 0; b < NBOOKS; b++) {
    snprintf(path, sizeof path, "/books/%s", books[b].id);
    if (http1(sv[RES].http, "GET", path, NULL, out, sizeof out) != 200) return 0;
  }
  return 1;
}

typedef struct range {
  int from, to;
  const char *status; /* NULL: any outcome but RESERVED */
} range;

static int settled_range(void *arg) {
  range *r = arg;
  char st[32];
  for (int i = r->from; i < r->to; i++) {
    if (made[i].cancel == 200) continue;
    status_of(&made[i], st, sizeof st);
    if (r->status ? strcmp(st, r->status) != 0 : strcmp(st, "RESERVED") == 0 || !st[0]) return 0;
  }
  return 1;
}

static int copies_taken(void *arg) {
  range *r = arg;
  char sql[160];
  for (int i = r->from; i < r->to; i++) {
    snprintf(sql, sizeof sql, "SELECT count(*) FROM hold WHERE reservation = '%s'", made[i].id);
    if (q(PROD, sql) != 1) return 0;
  }
  return 1;
}

/* Everything settled: all four outboxes empty, no reservation without an outcome, MyPage
 * knows every reservation — three polls in a row. */
static int quiet(void *arg) {
  int *streak = arg;
  int ok = q(RES, "SELECT count(*) FROM reservation WHERE status = 'RESERVED'") == 0 &&
           q(RES, "SELECT count(*) FROM reservation") == q(MYPAGE, "SELECT count(*) FROM view");
  for (int i = 0; ok && i < NSVC; i++) ok = q(i, "SELECT count(*) FROM saga_outbox") == 0;
  *streak = ok ? *streak + 1 : 0;
  return *streak >= 3;
}

/* ---- the checks ------------------------------------------------------------------------- */

static void expect(int i, const char *sql, long want, const char *what) {
  long got = q(i, sql);
  if (got != want) fail("%s: %s: %ld, expected %ld", roles[i], what, got, want);
}

/* One text value from a database ("" when there is no row). */
static void qs(int i, const char *sql, const char *arg, char *out, size_t len) {
  sqlite3 *db = open_db(sv[i].db);
  sqlite3_stmt *st = NULL;
  out[0] = '\0';
  if (db != NULL && sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, arg, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0) != NULL)
      snprintf(out, len, "%s", (const char *)sqlite3_column_text(st, 0));
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
}

static int check(int planned) {
  /* Nothing lost, nothing stuck. */
  for (int i = 0; i < NSVC; i++) {
    expect(i, "SELECT count(*) FROM saga_outbox", 0, "events never confirmed");
    expect(i, "SELECT count(*) FROM saga_dead_letter", 0, "dead letters");
  }
  int kills = 0;
  for (int i = 0; i < NSVC; i++) kills += sv[i].kills;
  if (kills != planned) fail("%d kills of the %d planned", kills, planned);

  /* product: stock now = stocked - copies taken and not put back. */
  for (int b = 0; b < NBOOKS; b++) {
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT stocked FROM book WHERE id = '%s'", books[b].id);
    expect(PROD, sql, stocked[b], books[b].id);
    snprintf(sql, sizeof sql, "SELECT copies - (stocked - (SELECT count(*) FROM hold WHERE "
             "book = '%s' AND state = 'TAKEN')) FROM book WHERE id = '%s'", books[b].id,
             books[b].id);
    expect(PROD, sql, 0, "copies on the shelf - (stocked - copies held)");
  }
  long nres = q(RES, "SELECT count(*) FROM reservation");
  if (nres != nmade) fail("reservation: %ld reservations, the customers made %d", nres, nmade);
  expect(PROD, "SELECT count(*) FROM hold", nres, "reservations heard of");
  expect(MYPAGE, "SELECT count(*) FROM view", nres, "reservations on MyPage");
  expect(DELIV, "SELECT count(*) FROM delivery WHERE status = 'DELIVERED'",
         q(RES, "SELECT count(*) FROM reservation WHERE status = 'DELIVERED'"),
         "live deliveries (= reservations DELIVERED)");

  /* Every reservation, in the four databases. */
  int by_status[4] = {0}, returned = 0, cancelled_waiting = 0, late_stock = 0, crossed = 0;
  for (int i = 0; i < nmade; i++) {
    placed *p = &made[i];
    char customer[48], book[48], status[16], history[96], hold[16], delivery[16], v[256];
    qs(RES, "SELECT customer FROM reservation WHERE id = ?1", p->id, customer, sizeof customer);
    qs(RES, "SELECT book FROM reservation WHERE id = ?1", p->id, book, sizeof book);
    qs(RES, "SELECT status FROM reservation WHERE id = ?1", p->id, status, sizeof status);
    qs(RES, "SELECT group_concat(status, '>') FROM (SELECT status FROM history WHERE "
            "reservation = ?1 ORDER BY n)", p->id, history, sizeof history);
    qs(PROD, "SELECT state FROM hold WHERE reservation = ?1", p->id, hold, sizeof hold);
    qs(DELIV, "SELECT status FROM delivery WHERE reservation = ?1", p->id, delivery,
       sizeof delivery);
    if (strcmp(customer, customers[p->customer]) != 0 || strcmp(book, books[p->book].id) != 0) {
      fail("%s: %s/%s in the reservation service, %s reserved %s", p->id, customer, book,
           customers[p->customer], books[p->book].id);
      continue;
    }
    if (p->cancel == 200 && strcmp(status, "CANCELLED") != 0)
      fail("%s: cancelled by its customer but %s", p->id, status);
    if (p->cancel == 409 && strcmp(status, "REJECTED") != 0)
      fail("%s: its cancel was refused but it is %s", p->id, status);
    if (strcmp(status, "DELIVERED") == 0) {
      by_status[0]++;
      if (strcmp(hold, "TAKEN") != 0 || strcmp(delivery, "DELIVERED") != 0)
        fail("%s DELIVERED: copy %s, delivery %s", p->id, hold, delivery);
      if (strcmp(history, "RESERVED>DELIVERED") != 0) fail("%s: history %s", p->id, history);
    } else if (strcmp(status, "CANCELLED") == 0) {
      by_status[1]++;
      if (strcmp(hold, "TAKEN") == 0 || strcmp(delivery, "DELIVERED") == 0 || !hold[0])
        fail("%s CANCELLED: copy %s, delivery %s", p->id, hold, delivery);
      if (strcmp(history, "RESERVED>CANCELLED") != 0 &&
          strcmp(history, "RESERVED>DELIVERED>CANCELLED") != 0)
        fail("%s: history %s", p->id, history);
      /* Cancelled after its delivery: the copy was collected back. Cancelled before: never
       * delivered, or delivered because the cancel was still on its way to delivery (a
       * choreography has no one to stop it), then collected back too. */
      if (strcmp(history, "RESERVED>DELIVERED>CANCELLED") == 0) {
        if (strcmp(delivery, "RETURNED") != 0)
          fail("%s: cancelled after delivery but delivery %s", p->id, delivery);
        returned++;
      } else {
        cancelled_waiting += strcmp(hold, "RESTORED") == 0;
        crossed += strcmp(delivery, "RETURNED") == 0;
      }
    } else if (strcmp(status, "REJECTED") == 0) {
      by_status[2]++;
      if (strcmp(hold, "REFUSED") != 0 || delivery[0] != '\0')
        fail("%s REJECTED: copy %s, delivery %s", p->id, hold, delivery);
      if (strcmp(history, "RESERVED>REJECTED") != 0) fail("%s: history %s", p->id, history);
    } else {
      by_status[3]++;
      fail("%s: still %s", p->id, status);
    }
    if (p->phase == 3 && p->cancel == 200 && strcmp(delivery, "CANCELLED") != 0 &&
        strcmp(delivery, "RETURNED") != 0)
      fail("%s: cancelled while delivery was down, and delivery says %s", p->id, delivery);
    char sa[8];
    qs(DELIV, "SELECT stock_after_cancel FROM delivery WHERE reservation = ?1", p->id, sa,
       sizeof sa);
    late_stock += strcmp(sa, "1") == 0;

    /* MyPage agrees with the services: status, history, and where the copy is. */
    qs(MYPAGE, "SELECT customer || ' ' || book || ' ' || status || ' ' || history || ' ' || "
               "copy || ' / ' || delivery FROM view WHERE reservation = ?1", p->id, v, sizeof v);
    const char *copy = strcmp(hold, "TAKEN") == 0      ? "taken"
                       : strcmp(hold, "RESTORED") == 0 ? "back on the shelf"
                                                       : "none left";
    const char *deliv = strcmp(delivery, "DELIVERED") == 0  ? "delivered"
                        : strcmp(delivery, "RETURNED") == 0 ? "collected back"
                                                            : "none";
    char want[256];
    snprintf(want, sizeof want, "%s %s %s %s %s / %s", customer, book, status, history, copy,
             deliv);
    if (strcmp(v, want) != 0) fail("%s on MyPage: \"%s\", the services say \"%s\"", p->id, v, want);
  }

  /* MyPage from its database through the service's own --show, for every customer. */
  for (int c = 0; c < NCUSTOMERS; c++) {
    char cmd[1400], sql[160];
    snprintf(cmd, sizeof cmd, "'%s' mypage --db '%s' --show %s", binary, sv[MYPAGE].db,
             customers[c]);
    FILE *f = popen(cmd, "r");
    json_error_t e;
    json_t *j = f ? json_loadf(f, 0, &e) : NULL;
    if (f) pclose(f);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM reservation WHERE customer = '%s'",
             customers[c]);
    long want = q(RES, sql);
    size_t got = json_array_size(json_object_get(j, "reservations"));
    if (j == NULL || (long)got != want)
      fail("mypage --show %s: %zu reservations, the reservation service has %ld", customers[c],
           got, want);
    json_decref(j);
  }
  printf("rental: %d reservations: %d delivered, %d cancelled (%d after delivery, collected "
         "back; %d before, copy put back), %d rejected (no copy left)\n", nmade, by_status[0],
         by_status[1], returned, cancelled_waiting, by_status[2]);
  printf("rental: delivery saw a cancel before its StockTaken %d times, after it %d times "
         "(delivered, then collected back); %d reservations answered again after a lost "
         "answer\n", late_stock, crossed, replays);
  if (by_status[2] == 0) fail("no reservation was rejected: the test did not cover OutOfStock");
  if (returned == 0) fail("no delivered reservation was cancelled");
  if (cancelled_waiting == 0) fail("no reservation was cancelled before its delivery");
  return failures == 0;
}

/* ---- the story -------------------------------------------------------------------------- */

static void show_mypage(void) {
  for (int c = 0; c < NCUSTOMERS; c++) {
    char path[64];
    snprintf(path, sizeof path, "/mypage/%s", customers[c]);
    json_t *j = NULL;
    if (call(MYPAGE, "GET", path, NULL, &j) != 200) fail("GET %s", path);
    printf("  MyPage of %s:\n", customers[c]);
    size_t k;
    json_t *r;
    json_array_foreach(json_object_get(j, "reservations"), k, r) {
      char hist[128] = "";
      size_t h;
      json_t *s;
      json_array_foreach(json_object_get(r, "history"), h, s) {
        if (h) strcat(hist, " -> ");
        strncat(hist, json_string_value(s), sizeof hist - strlen(hist) - 1);
      }
      printf("    %s %-12s %-9s (%s); copy %s, delivery %s\n", jstr(r, "id"), jstr(r, "title"),
             jstr(r, "status"), hist, jstr(r, "copy"), jstr(r, "delivery"));
    }
    json_decref(j);
  }
}

/* Bad requests: refused with a 4xx that says why. */
static void bad_requests(void) {
  static char big[6000];
  memset(big, ' ', sizeof big - 1);
  big[0] = '{';
  big[sizeof big - 2] = '}';
  struct {
    int svc;
    const char *method, *path, *body;
    int want;
  } cases[] = {
      {RES, "POST", "/reservations", "{not json", 400},
      {RES, "POST", "/reservations", "[1,2]", 400},
      {RES, "POST", "/reservations", "{\"request\":\"x1\",\"customer\":\"alice\"}", 400},
      {RES, "POST", "/reservations", "{\"request\":\"x2\",\"customer\":\"a b\",\"book\":\"dune\"}",
       400},
      {RES, "POST", "/reservations", "{\"request\":\"x3\",\"customer\":\"alice\",\"book\":\"nope\"}",
       404},
      {RES, "POST", "/reservations", big, 413},
      {RES, "POST", "/reservations/R99999/cancel", "{\"customer\":\"alice\"}", 404},
      {RES, "DELETE", "/reservations", NULL, 404},
      {PROD, "POST", "/books", "{\"request\":\"x4\",\"book\":\"b\",\"title\":\"B\",\"copies\":0}", 400},
      {PROD, "POST", "/books", "{\"request\":\"x5\",\"book\":\"b\",\"title\":\"B\",\"copies\":\"3\"}",
       400},
      {MYPAGE, "GET", "/mypage/a%20b", NULL, 400},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    json_t *j = NULL;
    int st = call(cases[i].svc, cases[i].method, cases[i].path, cases[i].body, &j);
    if (st != cases[i].want || jstr(j, "error")[0] == '\0')
      fail("%s %s (%s): %d, expected %d with a message", cases[i].method, cases[i].path,
           roles[cases[i].svc], st, cases[i].want);
    else if (i == 0 || i == 4 || i == 5)
      say("  %s %s %.20s... -> %d %s\n", cases[i].method, cases[i].path,
          cases[i].body ? cases[i].body : "", st, jstr(j, "error"));
    json_decref(j);
  }
}

static int run(int round, const char *keep) {
  memset(sv, 0, sizeof sv);
  memset(made, 0, sizeof made);
  memset(stocked, 0, sizeof stocked);
  nmade = replays = failures = 0;
  if (keep != NULL) {
    snprintf(dir, sizeof dir, "%s", keep);
    mkdir(dir, 0755);
  } else {
    snprintf(dir, sizeof dir, "%s/rental-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (mkdtemp(dir) == NULL) {
      perror("mkdtemp");
      return 1;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  for (int i = 0; i < NSVC; i++) {
    svc *s = &sv[i];
    s->role = roles[i];
    snprintf(s->db, sizeof s->db, "%s/%s.db", dir, s->role);
    snprintf(s->log, sizeof s->log, "%s/%s.log", dir, s->role);
    snprintf(s->listen, sizeof s->listen, "127.0.0.1:%d", free_port());
    snprintf(s->http, sizeof s->http, "127.0.0.1:%d", free_port());
    s->offset = 3 * round;
  }
  printf("rental: round %d, services in %s (logs and databases there)\n", round + 1, dir);
  uint64_t t0 = now_ms();
  for (int i = 0; i < NSVC; i++) spawn(&sv[i]);

  /* 1. Stock; bad requests. */
  say("1. The librarian stocks the shelves\n");
  for (int b = 0; b < NBOOKS; b++) stock(b, books[b].copies);
  wait_for(books_known, NULL, 20000, "the reservation service knows every book");
  bad_requests();

  /* 2. Reservations; cancels after delivery; a rejected one cannot be cancelled. */
  say("2. Customers reserve\n");
  static const int first[][2] = {{0, 0}, {1, 1}, {2, 1}, {3, 1}, {4, 4}, {0, 2}, {1, 4},
                                 {2, 3}, {3, 0}, {4, 3}, {0, 3}, {1, 2}};
  for (size_t i = 0; i < sizeof first / sizeof first[0]; i++) reserve(first[i][0], first[i][1], 2);
  range all2 = {0, nmade, NULL};
  wait_for(settled_range, &all2, 20000, "every reservation of step 2 has its outcome");
  int cancelled_delivered = 0, refused = 0;
  char st[32];
  for (int i = 0; i < all2.to; i++) {
    status_of(&made[i], st, sizeof st);
    if (strcmp(st, "DELIVERED") == 0 && cancelled_delivered < 2) {
      cancelled_delivered++;
      cancel(&made[i]);
    } else if (strcmp(st, "REJECTED") == 0 && refused < 1) {
      refused++;
      if (cancel(&made[i]) != 409) fail("%s: a rejected reservation was cancelled", made[i].id);
    }
  }
  if (cancelled_delivered < 2 || refused < 1)
    fail("step 2: %d delivered and %d rejected reservations to cancel", cancelled_delivered, refused);

  /* 3. Delivery stops; customers go on; delivery is back. */
  say("3. The delivery service and MyPage stop; customers go on\n");
  stop(&sv[DELIV]);
  stop(&sv[MYPAGE]);
  int from3 = nmade;
  for (int i = 0; i < 6; i++) reserve(i % NCUSTOMERS, 3, 3); /* the odyssey: copies for all */
  range r3 = {from3, nmade, "RESERVED"};
  wait_for(copies_taken, &r3, 20000, "product took a copy for every reservation of step 3");
  for (int i = from3; i < nmade; i++)
    if (strcmp(status_of(&made[i], st, sizeof st), "RESERVED") != 0)
      fail("%s: %s while delivery is down", made[i].id, st);
  for (int i = from3; i < nmade; i += 2) cancel(&made[i]);
  say("   (the cancelled ones are still waiting for delivery: it is down)\n");
  spawn(&sv[DELIV]);
  say("   delivery is back\n");
  r3.status = "DELIVERED";
  wait_for(settled_range, &r3, 20000, "the waiting reservations of step 3 are delivered");
  /* MyPage comes back to the events of three publishers at once, in no particular order
   * between them. */
  spawn(&sv[MYPAGE]);
  say("   MyPage is back\n");

  /* 4. Kills at commit points while customers go on. */
  int planned = 0;
  if (!demo) {
    printf("rental: every service restarted with its kill plan\n");
    for (int i = 0; i < NSVC; i++) {
      stop(&sv[i]);
      sv[i].crashes = i == MYPAGE ? mypage_points : publisher_points;
      for (const char *const *c = sv[i].crashes; *c; c++) planned++;
    }
    for (int i = 0; i < NSVC; i++) spawn(&sv[i]);
    for (int b = 0; b < NBOOKS; b++) stock(b, books[b].restock);
    uint64_t end = now_ms() + 60000;
    int pending = 1;
    while (pending && now_ms() < end && nmade < MAX_PLACED - 1) {
      int c = (int)rnd(NCUSTOMERS), b = (int)rnd(NBOOKS);
      /* The librarian keeps the shelves from running empty for long, so that copies are
       * taken and delivered all along (and each point of each service is reached). */
      if (rnd(8) == 0) stock(b, 2);
      placed *p = reserve(c, b, 4);
      if (p != NULL && rnd(3) == 0) {
        /* Cancel one of this customer's reservations (maybe this one, at once). */
        int k = nmade - 1 - (int)rnd((unsigned)(nmade < 8 ? nmade : 8));
        if (made[k].customer == c && made[k].cancel == 0) cancel(&made[k]);
      }
      reap();
      pending = 0;
      for (int i = 0; i < NSVC; i++) pending += sv[i].crashes[0] != NULL;
    }
    if (pending)
      for (int i = 0; i < NSVC; i++)
        if (sv[i].crashes[0] != NULL) fail("%s never reached %s", sv[i].role, sv[i].crashes[0]);
  }

  /* 5. Settle, stop, check. */
  int streak = 0;
  wait_for(quiet, &streak, 30000, "every outbox is empty and every reservation has its outcome");
  if (demo) {
    printf("4. What each customer sees on MyPage (GET /mypage/CUSTOMER)\n");
    show_mypage();
  }
  for (int i = 0; i < NSVC; i++) stop(&sv[i]);
  check(planned);
  printf("rental: %s in %.1f s\n",
         failures == 0 ? "the four databases agree" : "checks failed",
         (double)(now_ms() - t0) / 1000.0);
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
    fprintf(stderr, "usage: rental_e2e SERVICE_BINARY [--demo] [--keep DIR] [--seed N]\n");
    return 2;
  }
  binary = argv[1];
  const char *keep = NULL;
  for (int i = 2; i < argc; i++) {
    if (strcmp(argv[i], "--demo") == 0) demo = 1;
    else if (strcmp(argv[i], "--keep") == 0 && i + 1 < argc) keep = argv[++i];
    else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
      rng = strtoull(argv[++i], NULL, 10) | 1;
    else return 2;
  }
  /* The demo runs once; the test once per round, each killing at later occurrences. */
  int rounds = demo || keep != NULL ? 1 : ROUNDS, rc = 0;
  printf("rental: seed %llu\n", (unsigned long long)rng);
  for (int r = 0; r < rounds && rc == 0; r++) rc = run(r, keep);
  for (int i = 0; i < NSVC; i++)
    if (sv[i].pid > 0) kill(sv[i].pid, SIGKILL);
  return rc;
}
