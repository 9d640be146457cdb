/*
 * sagactl — the operator's command-line tool for a libsaga database (docs/sagactl.md).
 *
 * A separate program: it reads a node's SQLite file directly (read-only, safe while the node
 * runs) and repairs only by inserting rows into saga_operator_request, which a node carries
 * out in its own transaction. It never updates or deletes an engine table.
 *
 * Files: main.c (arguments, help, dispatch), db.c (opening and checking the database),
 * out.c (terminal-safe text, tables, times, JSON helpers, the saga data map), sagas.c (list,
 * show, retry, cancel, requests), dead.c (dead letters, outbox), graph.c (graph, definitions),
 * locks.c (semantic locks).
 */
#ifndef SAGACTL_H
#define SAGACTL_H

#include <jansson.h>
#include <sqlite3.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Exit codes (documented in --help and docs/sagactl.md). */
#define SCTL_OK 0
#define SCTL_ERROR 1
#define SCTL_USAGE 2

/* The schema version that has everything sagactl reads (migration 8: the trace context). */
#define SCTL_SCHEMA_MIN 8

/* Options of every command, filled by the parser in main.c. A command accepts a subset; the
 * parser refuses the others by name. */
typedef struct sctl_opts {
  const char *state;      /* --state: a state name (case-insensitive) */
  int state_num;          /* its number, 0 when not given */
  const char *definition; /* --definition */
  const char *older_than; /* --older-than DURATION */
  int64_t older_ms;       /* parsed, -1 when not given */
  const char *key;        /* --key */
  long limit;             /* --limit, default 100 */
  int json;               /* --json */
  int values;             /* --values */
  int yes;                /* --yes / --execute */
  int wait;               /* --wait[=SECONDS] given */
  long wait_s;            /* seconds, default 30 */
  const char *by;         /* --by, default $USER */
  const char *channel;    /* --channel */
  int all;                /* --all */
  int pending;            /* --pending */
  const char *format;     /* --format dot|mermaid */
  const char *type;       /* --type (locks) */
  const char **args;      /* positional arguments after the command (DB first) */
  int nargs;
} sctl_opts;

/* ---- db.c ---- */
/* Opens path read-only (rw = 0) or read-write (rw = 1, for inserting requests only), never
 * creating it, with a busy timeout, and checks it is a libsaga database of schema version 7
 * or later. On failure prints "sagactl: ..." and returns NULL. */
sqlite3 *sctl_db_open(const char *path, int rw);
void sctl_db_close(sqlite3 *db);
/* Prepares sql; on failure prints the SQLite error and returns NULL. */
sqlite3_stmt *sctl_prepare(sqlite3 *db, const char *sql);
/* Prints "sagactl: what: <sqlite message>" and returns SCTL_ERROR. */
int sctl_db_error(sqlite3 *db, const char *what);
/* A column as text, "" for NULL. */
const char *sctl_col_text(sqlite3_stmt *st, int i);

/* ---- out.c ---- */
/* Prints "sagactl: " and the message to stderr; returns SCTL_ERROR. */
int sctl_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Same, then "Try 'sagactl help CMD'."; returns SCTL_USAGE. */
int sctl_usage(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Text safe for a terminal: valid UTF-8 except C0/C1 control characters and DEL is kept,
 * everything else becomes \n, \r, \t, \\ or \xNN. Returns a malloc'd string (never NULL:
 * exits on out of memory). maxchars > 0 cuts after that many characters, ending with "...". */
char *sctl_safe(const char *s, size_t len, size_t maxchars);
char *sctl_safe_str(const char *s, size_t maxchars);
/* 1 when s[0..len) is valid UTF-8 without NUL bytes. */
int sctl_utf8_valid(const char *s, size_t len);

/* A JSON string of s: the text itself when it is valid UTF-8 (jansson escapes control
 * characters), else its sctl_safe() form. */
json_t *sctl_jstr(const char *s, size_t len);
json_t *sctl_jstr0(const char *s);
/* Prints v to stdout (two-space indent, newline) and releases it. */
int sctl_json_print(json_t *v);

/* Milliseconds since the epoch, now. */
int64_t sctl_now_ms(void);
/* "2024-05-01T10:00:00.123Z" into buf (at least 32 bytes). */
const char *sctl_iso(int64_t ms, char *buf, size_t len);
/* An age: "45s", "12m", "3h", "2d" (whole units, the largest that fits); "-" when ms < 0. */
const char *sctl_age(int64_t ms, char *buf, size_t len);
/* Parses a duration "45s", "10m", "2h", "3d" (also "500ms"); -1 when invalid. */
int64_t sctl_parse_duration(const char *s);
/* A state name (case-insensitive) to its number, 0 when unknown. */
int sctl_state_num(const char *name);
/* The valid state names, for messages. */
#define SCTL_STATE_NAMES "RUNNING, COMPENSATING, COMPLETED, COMPENSATED, FAILED"

/* A table printed with aligned columns. Cells are copied (and made terminal-safe by the
 * caller when they came from outside). */
typedef struct sctl_table {
  int ncols;
  size_t nrows, cap;
  char **cells; /* nrows * ncols, row 0 = the header */
} sctl_table;
void sctl_table_init(sctl_table *t, int ncols, const char *const *header);
/* Adds a row of ncols cells; each cell is taken over (malloc'd) when own = 1, else copied. */
void sctl_table_row(sctl_table *t, char **cells);
void sctl_table_print(const sctl_table *t, FILE *f);
void sctl_table_free(sctl_table *t);
/* Ends a listing: with rc SCTL_OK prints the JSON array arr (when not NULL) or the table t,
 * and frees both either way. Returns rc, or the print's failure. */
int sctl_emit(int rc, json_t *arr, sctl_table *t);
/* malloc'd printf; exits on out of memory. */
char *sctl_fmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
char *sctl_strdup(const char *s);

/* The saga data map (msgpack map str -> bin), walked without allocating and with every
 * length checked against the buffer. cb gets each key and value; returns 0, or -1 when the
 * bytes are not such a map (err says why). */
typedef void (*sctl_data_cb)(void *arg, const char *key, size_t klen, const unsigned char *val,
                             size_t vlen);
int sctl_data_walk(const void *buf, size_t len, sctl_data_cb cb, void *arg, const char **err);

/* ---- commands ---- */
int sctl_cmd_list(sctl_opts *o);
int sctl_cmd_show(sctl_opts *o);
int sctl_cmd_request_sagas(sctl_opts *o, const char *action); /* retry, cancel */
int sctl_cmd_requests(sctl_opts *o);
int sctl_cmd_dead_letters(sctl_opts *o, const char *sub);
int sctl_cmd_outbox(sctl_opts *o);
int sctl_cmd_graph(sctl_opts *o);
int sctl_cmd_definitions(sctl_opts *o);
int sctl_cmd_locks(sctl_opts *o);

/* Shared by the commands that write requests (sagas.c): inserts one request per target in
 * one BEGIN IMMEDIATE transaction on a read-write connection, filling ids[]; then, with
 * --wait, waits for them. check(db, target, arg) is run for each target inside the
 * transaction and returns NULL when the request makes sense, else a malloc'd reason (the
 * whole batch is then refused and nothing written). */
int sctl_write_requests(sctl_opts *o, const char *action, const char *const *targets,
                        size_t n, char *(*check)(sqlite3 *db, const char *target, void *arg),
                        void *arg);

#endif
