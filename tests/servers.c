#include "servers.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>


char *th_tmpdir(void) {
  const char *base = getenv("TMPDIR");
  if (base == NULL || *base == '\0') base = "/tmp";
  size_t n = strlen(base) + 32;
  char *p = malloc(n);
  if (p == NULL) abort();
  snprintf(p, n, "%s/sagatest.XXXXXX", base);
  if (mkdtemp(p) == NULL) {
    perror("mkdtemp");
    abort();
  }
  return p;
}

static void rm_tree(const char *path) {
  DIR *d = opendir(path);
  if (d != NULL) {
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
      if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
      char *sub = th_path(path, e->d_name);
      struct stat st;
      if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode))
        rm_tree(sub);
      else
        unlink(sub);
      free(sub);
    }
    closedir(d);
  }
  rmdir(path);
}

void th_rmdir(char *path) {
  if (path == NULL) return;
  rm_tree(path);
  free(path);
}

char *th_path(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *p = malloc(n);
  if (p == NULL) abort();
  snprintf(p, n, "%s/%s", dir, name);
  return p;
}

int th_free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  int port = -1;
  if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
      getsockname(fd, (struct sockaddr *)&a, &len) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0) close(fd);
  return port;
}

int th_have_program(const char *name) {
  const char *dirs[] = {"/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin", "/bin"};
  char path[256];
  for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
    snprintf(path, sizeof path, "%s/%s", dirs[i], name);
    if (access(path, X_OK) == 0) return 1;
  }
  return 0;
}

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int th_wait_port(int port, int timeout_ms) {
  uint64_t end = now_ms() + (uint64_t)timeout_ms;
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons((uint16_t)port);
  for (;;) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    if (fd >= 0) close(fd);
    if (ok) return 0;
    if (now_ms() >= end) return -1;
    /* Polling a readiness condition with a short pause; bounded by the deadline above. */
    struct timespec ts = {0, 10 * 1000000};
    nanosleep(&ts, NULL);
  }
}

/* Servers started and not reaped yet, so that none outlives a failed test. */
#define TH_MAX_LIVE 32
static struct {
  pid_t pid;
  char *dir;
} th_live[TH_MAX_LIVE];
static int th_atexit_set;
static pid_t th_owner; /* the process that started them: a forked child must not kill them */

static void live_add(pid_t pid, const char *dir) {
  for (int i = 0; i < TH_MAX_LIVE; i++) {
    if (th_live[i].pid != 0) continue;
    th_live[i].pid = pid;
    th_live[i].dir = strdup(dir);
    th_owner = getpid();
    return;
  }
}

static void live_remove(pid_t pid) {
  for (int i = 0; i < TH_MAX_LIVE; i++) {
    if (th_live[i].pid != pid) continue;
    th_live[i].pid = 0;
    free(th_live[i].dir);
    th_live[i].dir = NULL;
  }
}

void th_servers_kill_all(void) {
  if (th_owner != getpid()) return; /* a forked child exiting: its parent's, not its own */
  for (int i = 0; i < TH_MAX_LIVE; i++) {
    if (th_live[i].pid == 0) continue;
    kill(th_live[i].pid, SIGKILL);
    waitpid(th_live[i].pid, NULL, 0);
    th_live[i].pid = 0;
    /* The folder too: its owner (a test that failed half-way) will not come back to it. */
    th_rmdir(th_live[i].dir);
    th_live[i].dir = NULL;
  }
}

static pid_t spawn(th_server *s) {
  char port[16], dir[512], conf[600];
  snprintf(port, sizeof port, "%d", s->port);
  snprintf(dir, sizeof dir, "%s", s->dir);
  snprintf(conf, sizeof conf, "%s", s->conf != NULL ? s->conf : "");
  if (!th_atexit_set) {
    th_atexit_set = 1;
    atexit(th_servers_kill_all);
  }
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid != 0) {
    if (pid > 0) live_add(pid, s->dir);
    return pid;
  }
  /* Child: quiet, in its own process group so a test's signals do not reach it, and killed
   * when the test process dies, however it dies. */
  setpgid(0, 0);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(127);
  int devnull = open("/dev/null", O_WRONLY);
  if (devnull >= 0) {
    dup2(devnull, 1);
    dup2(devnull, 2);
  }
  if (strcmp(s->kind, "nats") == 0) {
    if (conf[0] != '\0') {
      execlp("nats-server", "nats-server", "-c", conf, "-a", "127.0.0.1", "-p", port, "-js",
             "-sd", dir, (char *)NULL);
      execl("/usr/sbin/nats-server", "nats-server", "-c", conf, "-a", "127.0.0.1", "-p", port,
            "-js", "-sd", dir, (char *)NULL);
    }
    execlp("nats-server", "nats-server", "-a", "127.0.0.1", "-p", port, "-js", "-sd", dir,
           (char *)NULL);
    execl("/usr/sbin/nats-server", "nats-server", "-a", "127.0.0.1", "-p", port, "-js", "-sd",
          dir, (char *)NULL);
  } else if (conf[0] != '\0') {
    execlp("redis-server", "redis-server", conf, "--bind", "127.0.0.1", "--port", port, "--dir",
           dir, "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize",
           "no", (char *)NULL);
  } else {
    execlp("redis-server", "redis-server", "--bind", "127.0.0.1", "--port", port, "--dir", dir,
           "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
           (char *)NULL);
  }
  _exit(127);
}

int th_server_start(th_server *s, const char *kind) { return th_server_start_conf(s, kind, NULL); }

int th_server_start_conf(th_server *s, const char *kind, const char *conf) {
  memset(s, 0, sizeof *s);
  snprintf(s->kind, sizeof s->kind, "%s", kind);
  s->dir = th_tmpdir();
  s->port = th_free_port();
  if (conf != NULL) {
    s->conf = th_path(s->dir, strcmp(kind, "nats") == 0 ? "server.conf" : "redis.conf");
    FILE *f = fopen(s->conf, "w");
    if (f == NULL || fputs(conf, f) < 0 || fclose(f) != 0) return -1;
  }
  return th_server_restart(s);
}

int th_make_pki(const char *dir, const char *names) {
  /* The script sits next to this file's folder: <repo>/tests/servers.c -> <repo>/scripts. */
  char script[1024];
  const char *src = getenv("SAGA_SOURCE_DIR");
  if (src != NULL && *src != '\0') {
    snprintf(script, sizeof script, "%s/scripts/make_pki.sh", src);
  } else {
    const char *file = __FILE__;
    const char *slash = strrchr(file, '/');
    int n = slash != NULL ? (int)(slash - file) : 0;
    snprintf(script, sizeof script, "%.*s%s../scripts/make_pki.sh", n, file, n ? "/" : "");
  }
  if (access(script, R_OK) != 0) {
    fprintf(stderr, "th_make_pki: %s not found (set SAGA_SOURCE_DIR)\n", script);
    return -1;
  }
  size_t len = strlen(script) + strlen(dir) + strlen(names) + 32;
  char *cmd = malloc(len);
  if (cmd == NULL) return -1;
  /* dir comes from th_tmpdir() and names from the test: no quoting needed beyond this. */
  snprintf(cmd, len, "bash '%s' '%s' %s", script, dir, names);
  int rc = system(cmd);
  free(cmd);
  return rc == 0 ? 0 : -1;
}

int th_server_restart(th_server *s) {
  if (s->port <= 0) return -1;
  s->pid = spawn(s);
  if (s->pid < 0) return -1;
  if (th_wait_port(s->port, 15000) != 0) {
    th_server_kill9(s);
    return -1;
  }
  return 0;
}

void th_server_kill9(th_server *s) {
  if (s->pid > 0) {
    kill(s->pid, SIGKILL);
    waitpid(s->pid, NULL, 0);
    live_remove(s->pid);
  }
  s->pid = 0;
}

void th_server_free(th_server *s) {
  th_server_kill9(s);
  free(s->conf);
  s->conf = NULL;
  th_rmdir(s->dir);
  s->dir = NULL;
}
