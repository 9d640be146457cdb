/*
 * The multi-process integration scenario shared by test_multiproc_{tcp,nats,redis}: an
 * orchestrator process and participant processes (tests/saga_proc.c) run 1,000 sagas; in the
 * middle the broker (or, for TCP, a participant peer) is killed with SIGKILL and restarted,
 * and one participant replica of two is killed for good; at the end every saga must be
 * COMPLETED or COMPENSATED as planned, with each step's effect applied exactly once.
 * Included by exactly one test file each (static functions).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "servers.h"

#define MP_SAGAS 1000

typedef struct mp_proc {
  pid_t pid;
  char *argv[24];
  int argc;
  char log[600];
} mp_proc;

static void mp_arg(mp_proc *p, const char *a) { p->argv[p->argc++] = strdup(a); }

static void mp_spawn(mp_proc *p) {
  p->argv[p->argc] = NULL;
  fflush(NULL);
  p->pid = fork();
  if (p->pid == 0) {
    int fd = open(p->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    execv(SAGA_PROC, p->argv);
    _exit(127);
  }
}

static void mp_kill9(mp_proc *p) {
  if (p->pid > 0) {
    kill(p->pid, SIGKILL);
    waitpid(p->pid, NULL, 0);
  }
  p->pid = 0;
}

static void mp_free(mp_proc *p) {
  mp_kill9(p);
  for (int i = 0; i < p->argc; i++) free(p->argv[i]);
  p->argc = 0;
}

static uint64_t mp_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Terminal sagas in the orchestrator database (-1 while it cannot be read yet). */
static int mp_terminal(const char *orch_db) {
  sqlite3 *db = NULL;
  int v = -1;
  if (sqlite3_open_v2(orch_db, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK) {
    sqlite3_busy_timeout(db, 2000);
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM saga_instance WHERE state IN (3,4,5)", -1,
                           &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
      v = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
  }
  sqlite3_close(db);
  return v;
}

/* Waits (polling the database every 20 ms, bounded) until `want` sagas are terminal, or the
 * orchestrator exited. Returns the count reached. */
static int mp_wait_terminal(const char *orch_db, mp_proc *orch, int want, int timeout_ms) {
  uint64_t end = mp_now() + (uint64_t)timeout_ms;
  int n = 0;
  for (;;) {
    n = mp_terminal(orch_db);
    if (n >= want || mp_now() > end) return n;
    int status;
    if (orch->pid > 0 && waitpid(orch->pid, &status, WNOHANG) == orch->pid) {
      orch->pid = 0;
      return mp_terminal(orch_db);
    }
    struct timespec ts = {0, 20 * 1000000};
    nanosleep(&ts, NULL);
  }
}

/* Effects of one saga step across the participant databases. */
static int mp_fx(sqlite3 **parts, int nparts, const char *id, int step, const char *kind) {
  int total = 0;
  for (int i = 0; i < nparts; i++) {
    sqlite3_stmt *st = NULL;
    sqlite3_prepare_v2(parts[i], "SELECT count(*) FROM fx WHERE saga_id=?1 AND step=?2 AND kind=?3",
                       -1, &st, NULL);
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, step);
    sqlite3_bind_text(st, 3, kind, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) total += sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
  }
  return total;
}

/* Checks every saga against its plan: saga i refuses at step i % 5 when that is < 3. Returns
 * the number of problems (printing the first few). */
static int mp_verify(const char *orch_db, const char **part_dbs, int nparts, int nsagas) {
  sqlite3 *orch = NULL, *parts[4];
  sqlite3_open_v2(orch_db, &orch, SQLITE_OPEN_READONLY, NULL);
  for (int i = 0; i < nparts; i++) sqlite3_open_v2(part_dbs[i], &parts[i], SQLITE_OPEN_READONLY, NULL);
  for (int i = 0; i < nparts; i++)
    sqlite3_exec(parts[i], "CREATE INDEX IF NOT EXISTS temp.fx_saga ON fx(saga_id)", NULL, NULL, NULL);
  sqlite3_stmt *st = NULL;
  sqlite3_prepare_v2(orch, "SELECT id, idem_key, state FROM saga_instance", -1, &st, NULL);
  int bad = 0, seen = 0, completed = 0, compensated = 0;
  while (sqlite3_step(st) == SQLITE_ROW) {
    seen++;
    const char *id = (const char *)sqlite3_column_text(st, 0);
    int i = atoi((const char *)sqlite3_column_text(st, 1) + 2);
    int state = sqlite3_column_int(st, 2);
    int k = i % 5, fails = k < 3;
    int want_state = fails ? SAGA_COMPENSATED : SAGA_COMPLETED;
    completed += state == SAGA_COMPLETED;
    compensated += state == SAGA_COMPENSATED;
    int ok = state == want_state;
    for (int s = 0; s < 3 && ok; s++) {
      int want_do = !fails || s < k;
      int want_undo = fails && s < k && s < 2;
      int d = mp_fx(parts, nparts, id, s, "do"), u = mp_fx(parts, nparts, id, s, "undo");
      if (d != want_do || u != want_undo) {
        if (bad < 5) printf("saga %d (%s) step %d: do %d (want %d), undo %d (want %d)\n", i, id,
                            s, d, want_do, u, want_undo);
        ok = 0;
      }
    }
    if (state != want_state && bad < 5)
      printf("saga %d (%s): state %s, want %s\n", i, id, saga_state_name(state),
             saga_state_name(want_state));
    bad += !ok;
  }
  sqlite3_finalize(st);
  if (seen != nsagas) {
    printf("%d sagas in the orchestrator database, want %d\n", seen, nsagas);
    bad++;
  }
  printf("verified %d sagas: %d completed, %d compensated, %d wrong\n", seen, completed,
         compensated, bad);
  sqlite3_close(orch);
  for (int i = 0; i < nparts; i++) sqlite3_close(parts[i]);
  return bad;
}

static void mp_dump_logs(mp_proc **procs, int n) {
  for (int i = 0; i < n; i++) {
    FILE *f = fopen(procs[i]->log, "r");
    if (f == NULL) continue;
    char line[512];
    int lines = 0;
    printf("--- %s (last lines)\n", procs[i]->log);
    while (fgets(line, sizeof line, f) != NULL)
      if (++lines > 0) fputs(line, stdout);
    fclose(f);
  }
}
