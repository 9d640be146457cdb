/* Real servers for integration tests and the benchmark: nats-server (JetStream) and
 * redis-server, started on 127.0.0.1 with a free port and a temporary folder, killed and
 * restarted on demand; temporary folders. No cmocka here (the benchmark links this file). */
#ifndef SAGA_TEST_SERVERS_H
#define SAGA_TEST_SERVERS_H

#include <sys/types.h>

/* Makes a fresh temporary folder (under $TMPDIR or /tmp) and returns its path
 * (heap-allocated; free() it, or th_rmdir() it). */
char *th_tmpdir(void);
/* Removes a folder made by th_tmpdir() and everything in it, and frees the path. */
void th_rmdir(char *path);
/* path = dir + "/" + name, heap-allocated. */
char *th_path(const char *dir, const char *name);

typedef struct th_server {
  char kind[8];  /* "nats" or "redis" */
  pid_t pid;     /* 0 when not running */
  int port;
  char *dir;     /* data folder, kept across restarts */
  char *conf;    /* its configuration file (in dir), or NULL */
} th_server;

/* A TCP port on 127.0.0.1 that was free a moment ago. */
int th_free_port(void);
/* Nonzero when the program is on PATH (or in /usr/sbin), e.g. to skip a test cleanly. */
int th_have_program(const char *name);
/* Starts the server and returns once it accepts connections (0), or -1. JetStream's store and
 * Redis's append-only file live in a fresh temporary folder, so a restart keeps the data. */
int th_server_start(th_server *s, const char *kind);
/* The same with a configuration file holding conf (NULL: none), kept across restarts: for
 * nats-server the text of a -c file (authorization, tls, ...; the command line still sets the
 * address, port and JetStream folder), for redis-server lines of redis.conf (requirepass, user
 * ...). A server whose clients must use TLS is waited for by TCP connect only. */
int th_server_start_conf(th_server *s, const char *kind, const char *conf);
/* Kills every server this process started that still runs and removes their folders; also
 * done at exit, and a server dies with the process that started it (PR_SET_PDEATHSIG), so a
 * test that fails half-way leaves none behind. For a cmocka teardown. */
void th_servers_kill_all(void);
/* Runs the repository's scripts/make_pki.sh DIR NAMES (names separated by spaces): DIR/ca.pem
 * and DIR/<name>.pem/.key. 0 on success, -1 (openssl missing, say). */
int th_make_pki(const char *dir, const char *names);
/* kill -9 and reap. */
void th_server_kill9(th_server *s);
/* Starts it again on the same port and folder. */
int th_server_restart(th_server *s);
/* Stops it (SIGKILL) and removes its folder. */
void th_server_free(th_server *s);
/* Waits until 127.0.0.1:port accepts a TCP connection, up to timeout_ms. 0 or -1. */
int th_wait_port(int port, int timeout_ms);

#endif
