/* sagactl: the recorded definitions, and one drawn as Graphviz DOT or a Mermaid flowchart. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "sagactl.h"

#define FOREVER 4294967295LL /* max_attempts / timeout_ms: forever, no timeout */

typedef struct gstep {
  int index, kind, local, has_local_comp, rbc;
  char *name, *channel, *action, *comp; /* terminal-safe */
  long long max_attempts, backoff_ms, cap_ms, timeout_ms;
  double multiplier, jitter;
  long long c_max_attempts, c_backoff_ms, c_cap_ms;
  double c_multiplier;
} gstep;

/* "250 ms", "3 s", "2 min" — exact, so that the output never depends on rounding. */
static char *dur(long long ms) {
  if (ms != 0 && ms % 60000 == 0) return sctl_fmt("%lld min", ms / 60000);
  if (ms != 0 && ms % 1000 == 0) return sctl_fmt("%lld s", ms / 1000);
  return sctl_fmt("%lld ms", ms);
}

/* "3 attempts, backoff 100 ms x2 up to 30 s" */
static char *retry_text(long long attempts, long long backoff, double mult, long long cap) {
  if (attempts == 1) return sctl_strdup("1 attempt");
  char *b = dur(backoff), *c = dur(cap), *s;
  if (attempts == FOREVER)
    s = sctl_fmt("forever, backoff %s x%g up to %s", b, mult, c);
  else
    s = sctl_fmt("%lld attempts, backoff %s x%g up to %s", attempts, b, mult, c);
  free(b), free(c);
  return s;
}

static int has_comp(const gstep *s) {
  return s->kind == 0 && (s->comp[0] != '\0' || s->has_local_comp);
}

/* The label's lines, joined by sep: number and name, kind, where it runs, retry policy,
 * timeout, and what undoes it. */
static char *label(const gstep *s, const char *sep) {
  static const char *const kinds[] = {"COMPENSATABLE", "PIVOT", "RETRIABLE"};
  char *line[6];
  int n = 0;
  line[n++] = sctl_fmt("%d. %s", s->index, s->name);
  line[n++] = sctl_strdup(s->kind >= 0 && s->kind <= 2 ? kinds[s->kind] : "UNKNOWN");
  line[n++] = s->local ? sctl_strdup("local") : sctl_fmt("%s: %s", s->channel, s->action);
  char *retry = retry_text(s->max_attempts, s->backoff_ms, s->multiplier, s->cap_ms);
  char jitter[40] = "";
  if (s->jitter > 0) snprintf(jitter, sizeof jitter, ", jitter %g", s->jitter);
  line[n++] = sctl_fmt("retry: %s%s%s", retry, jitter, s->rbc ? ", also after a refusal" : "");
  free(retry);
  if (s->timeout_ms == FOREVER) {
    line[n++] = sctl_strdup("no timeout");
  } else {
    char *t = dur(s->timeout_ms);
    line[n++] = sctl_fmt("timeout %s", t);
    free(t);
  }
  if (has_comp(s)) {
    char *cr = retry_text(s->c_max_attempts, s->c_backoff_ms, s->c_multiplier, s->c_cap_ms);
    line[n++] = sctl_fmt("undo: %s (retry: %s)", s->comp[0] ? s->comp : "local", cr);
    free(cr);
  } else if (s->kind == 0) {
    line[n++] = sctl_strdup("nothing to undo");
  }
  size_t len = 1;
  for (int i = 0; i < n; i++) len += strlen(line[i]) + strlen(sep);
  char *out = malloc(len);
  if (out == NULL) exit(SCTL_ERROR);
  out[0] = '\0';
  for (int i = 0; i < n; i++) {
    if (i > 0) strcat(out, sep);
    strcat(out, line[i]);
    free(line[i]);
  }
  return out;
}

/* DOT: a double-quoted string; backslash and quote escaped. The "\n" separators are added
 * after escaping. */
static char *dot_escape(const char *s) {
  size_t n = strlen(s);
  char *o = malloc(n * 2 + 1), *p = o;
  if (o == NULL) exit(SCTL_ERROR);
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') *p++ = '\\';
    *p++ = *s;
  }
  *p = '\0';
  return o;
}

/* Mermaid: inside "..." labels, entity codes for the characters it reads itself. */
static char *mermaid_escape(const char *s) {
  size_t n = strlen(s);
  char *o = malloc(n * 6 + 1), *p = o;
  if (o == NULL) exit(SCTL_ERROR);
  for (; *s; s++) {
    const char *e = NULL;
    switch (*s) {
    case '"': e = "#quot;"; break;
    case '<': e = "#lt;"; break;
    case '>': e = "#gt;"; break;
    case '&': e = "#amp;"; break;
    case '#': e = "#35;"; break;
    default: *p++ = *s; continue;
    }
    size_t k = strlen(e);
    memcpy(p, e, k);
    p += k;
  }
  *p = '\0';
  return o;
}

/* The label escaped field by field: the fields are escaped before the separators go in. */
static char *esc_label(const gstep *s, int mermaid) {
  gstep e = *s;
  char *(*esc)(const char *) = mermaid ? mermaid_escape : dot_escape;
  e.name = esc(s->name), e.channel = esc(s->channel), e.action = esc(s->action);
  e.comp = esc(s->comp);
  char *l = label(&e, mermaid ? "<br/>" : "\\n");
  free(e.name), free(e.channel), free(e.action), free(e.comp);
  return l;
}

static int load_steps(sqlite3 *db, const char *name, long long version, gstep **out, int *n) {
  sqlite3_stmt *st = sctl_prepare(
      db, "SELECT step, name, kind, channel, action, compensation, local, "
          "has_local_compensation, max_attempts, backoff_ms, multiplier, cap_ms, jitter, "
          "retry_before_compensate, timeout_ms, comp_max_attempts, comp_backoff_ms, "
          "comp_multiplier, comp_cap_ms FROM saga_definition_step "
          "WHERE def_name = ?1 AND def_version = ?2 ORDER BY step");
  if (st == NULL) return SCTL_ERROR;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 2, version);
  gstep *v = NULL;
  int cnt = 0, cap = 0, r;
  while ((r = sqlite3_step(st)) == SQLITE_ROW) {
    if (cnt == cap) {
      cap = cap ? cap * 2 : 8;
      gstep *p = realloc(v, sizeof *p * (size_t)cap);
      if (p == NULL) exit(SCTL_ERROR);
      v = p;
    }
    gstep *s = &v[cnt++];
    s->index = sqlite3_column_int(st, 0);
    s->name = sctl_safe_str(sctl_col_text(st, 1), 0);
    s->kind = sqlite3_column_int(st, 2);
    s->channel = sctl_safe_str(sctl_col_text(st, 3), 0);
    s->action = sctl_safe_str(sctl_col_text(st, 4), 0);
    s->comp = sctl_safe_str(sctl_col_text(st, 5), 0);
    s->local = sqlite3_column_int(st, 6);
    s->has_local_comp = sqlite3_column_int(st, 7);
    s->max_attempts = sqlite3_column_int64(st, 8);
    s->backoff_ms = sqlite3_column_int64(st, 9);
    s->multiplier = sqlite3_column_double(st, 10);
    s->cap_ms = sqlite3_column_int64(st, 11);
    s->jitter = sqlite3_column_double(st, 12);
    s->rbc = sqlite3_column_int(st, 13);
    s->timeout_ms = sqlite3_column_int64(st, 14);
    s->c_max_attempts = sqlite3_column_int64(st, 15);
    s->c_backoff_ms = sqlite3_column_int64(st, 16);
    s->c_multiplier = sqlite3_column_double(st, 17);
    s->c_cap_ms = sqlite3_column_int64(st, 18);
  }
  sqlite3_finalize(st);
  if (r != SQLITE_DONE) {
    free(v);
    return sctl_db_error(db, "reading the definition's steps");
  }
  /* saga_retry's zeros mean its defaults (definition.h): shown as what the engine does. A
   * timeout of 0 is the engine's own "none" (the step's SAGA_STEP_NO_TIMEOUT; a step given 0
   * gets the 60 s default before it is recorded). */
  for (int i = 0; i < cnt; i++) {
    gstep *s = &v[i];
    if (s->max_attempts == 0) s->max_attempts = 1;
    if (s->backoff_ms == 0) s->backoff_ms = 100;
    if (s->multiplier == 0) s->multiplier = 2;
    if (s->cap_ms == 0) s->cap_ms = 30000;
    if (s->c_max_attempts == 0) s->c_max_attempts = 1;
    if (s->c_backoff_ms == 0) s->c_backoff_ms = 100;
    if (s->c_multiplier == 0) s->c_multiplier = 2;
    if (s->c_cap_ms == 0) s->c_cap_ms = 30000;
    if (s->timeout_ms == 0) s->timeout_ms = FOREVER;
  }
  *out = v, *n = cnt;
  return SCTL_OK;
}

int sctl_cmd_graph(sctl_opts *o) {
  if (o->nargs != 2) return sctl_usage("graph", "graph takes a database and DEFINITION[@VERSION]");
  int mermaid = 0;
  if (o->format != NULL) {
    if (strcmp(o->format, "mermaid") == 0)
      mermaid = 1;
    else if (strcmp(o->format, "dot") != 0)
      return sctl_usage("graph", "--format is dot or mermaid");
  }
  char *name = sctl_strdup(o->args[1]);
  long long version = 0;
  char *at = strrchr(name, '@');
  if (at != NULL) {
    *at = '\0';
    char *end = NULL;
    errno = 0;
    version = strtoll(at + 1, &end, 10);
    if (at[1] < '0' || at[1] > '9' || errno != 0 || *end != '\0' || version <= 0 ||
        version > 4294967295LL) {
      free(name);
      return sctl_usage("graph", "a version is a positive number: DEFINITION@VERSION");
    }
  }
  char *sname = sctl_safe_str(name, 64);
  gstep *steps = NULL;
  int n = 0, rc = SCTL_ERROR;
  long long deadline = 0;
  sqlite3_stmt *st = NULL;
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) goto out;
  st = sctl_prepare(db, "SELECT version, deadline_ms FROM saga_definition WHERE name = ?1 "
                        "AND (?2 = 0 OR version = ?2) ORDER BY version DESC LIMIT 1");
  if (st == NULL) goto out;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 2, version);
  int r = sqlite3_step(st);
  if (r == SQLITE_DONE) {
    if (version)
      sctl_err("no definition '%s' version %lld recorded in '%s' ('sagactl definitions' lists "
               "them; a node records its definitions at saga_node_start())",
               sname, version, o->args[0]);
    else
      sctl_err("no definition '%s' recorded in '%s' ('sagactl definitions' lists them; a node "
               "records its definitions at saga_node_start())",
               sname, o->args[0]);
    goto out;
  } else if (r != SQLITE_ROW) {
    sctl_db_error(db, "reading definitions");
    goto out;
  }
  version = sqlite3_column_int64(st, 0);
  deadline = sqlite3_column_int64(st, 1);
  if (load_steps(db, name, version, &steps, &n) != SCTL_OK) goto out;

  /* The compensation path: compensatable steps with something to undo, highest first,
   * entered when the pivot fails (or, without a pivot, the last compensatable step). */
  int origin = -1;
  for (int i = 0; i < n; i++)
    if (steps[i].kind == 1 || (steps[i].kind == 0 && (origin < 0 || steps[origin].kind == 0)))
      origin = i;
  int *chain = malloc(sizeof(int) * (size_t)(n + 1)), nc = 0;
  if (chain == NULL) exit(SCTL_ERROR);
  for (int i = origin; i >= 0; i--)
    if (has_comp(&steps[i]) && i != origin) chain[nc++] = i;
  chain[nc++] = -1; /* COMPENSATED */
  char *title_name = mermaid ? mermaid_escape(sname) : dot_escape(sname);
  char *dl = dur(deadline);
  char *title = deadline ? sctl_fmt("%s@%lld (deadline %s before the pivot)", title_name,
                                    version, dl)
                         : sctl_fmt("%s@%lld", title_name, version);
  free(dl);
  if (mermaid) {
    printf("---\ntitle: \"%s\"\n---\nflowchart TD\n", title);
    printf("  start([\"start\"])\n");
    for (int i = 0; i < n; i++) {
      char *l = esc_label(&steps[i], 1);
      if (steps[i].kind == 1)
        printf("  s%d{{\"%s\"}}\n", i, l);
      else if (steps[i].local)
        printf("  s%d(\"%s\")\n", i, l);
      else
        printf("  s%d[\"%s\"]\n", i, l);
      free(l);
    }
    printf("  completed([\"COMPLETED\"])\n  compensated([\"COMPENSATED\"])\n");
    printf("  start --> %s\n", n > 0 ? "s0" : "completed");
    for (int i = 0; i < n; i++)
      if (i + 1 < n)
        printf("  s%d --> s%d\n", i, i + 1);
      else
        printf("  s%d --> completed\n", i);
    for (int k = 0; origin >= 0 && k < nc; k++) {
      int from = k == 0 ? origin : chain[k - 1];
      const char *arrow = k == 0 && steps[origin].kind == 1 ? "-. fails .->" : "-.->";
      if (chain[k] < 0)
        printf("  s%d %s compensated\n", from, arrow);
      else
        printf("  s%d %s s%d\n", from, arrow, chain[k]);
    }
    for (int i = 0; i < n; i++)
      if (steps[i].kind == 1) printf("  class s%d pivot\n", i);
    printf("  classDef pivot stroke-width:3px\n");
  } else {
    printf("digraph \"%s\" {\n", title);
    printf("  label=\"%s\";\n  labelloc=t;\n  rankdir=TB;\n", title);
    printf("  node [shape=box, fontname=\"Helvetica\", fontsize=10];\n");
    printf("  edge [fontname=\"Helvetica\", fontsize=9];\n");
    printf("  start [shape=circle, label=\"start\"];\n");
    for (int i = 0; i < n; i++) {
      char *l = esc_label(&steps[i], 0);
      const char *attrs = steps[i].kind == 1 ? ", peripheries=2, style=bold"
                          : steps[i].local   ? ", style=rounded"
                                             : "";
      printf("  s%d [label=\"%s\"%s];\n", i, l, attrs);
      free(l);
    }
    printf("  completed [shape=doublecircle, label=\"COMPLETED\"];\n");
    printf("  compensated [shape=doublecircle, label=\"COMPENSATED\"];\n");
    printf("  start -> %s;\n", n > 0 ? "s0" : "completed");
    for (int i = 0; i < n; i++)
      if (i + 1 < n)
        printf("  s%d -> s%d;\n", i, i + 1);
      else
        printf("  s%d -> completed;\n", i);
    for (int k = 0; origin >= 0 && k < nc; k++) {
      int from = k == 0 ? origin : chain[k - 1];
      const char *lab = k == 0 && steps[origin].kind == 1 ? ", label=\"fails\"" : "";
      if (chain[k] < 0)
        printf("  s%d -> compensated [style=dashed%s];\n", from, lab);
      else
        printf("  s%d -> s%d [style=dashed%s];\n", from, chain[k], lab);
    }
    printf("}\n");
  }
  free(title_name), free(title), free(chain);
  rc = SCTL_OK;
out:
  for (int i = 0; i < n; i++)
    free(steps[i].name), free(steps[i].channel), free(steps[i].action), free(steps[i].comp);
  free(steps);
  sqlite3_finalize(st);
  sctl_db_close(db);
  free(name), free(sname);
  return rc;
}

int sctl_cmd_definitions(sctl_opts *o) {
  if (o->nargs != 1) return sctl_usage("definitions", "definitions takes one database");
  sqlite3 *db = sctl_db_open(o->args[0], 0);
  if (db == NULL) return SCTL_ERROR;
  sqlite3_stmt *st = sctl_prepare(
      db, "SELECT d.name, d.version, d.nsteps, d.deadline_ms, d.registered_ms, "
          "(SELECT count(*) FROM saga_instance i WHERE i.def_name = d.name AND "
          "i.def_version = d.version AND i.state IN (1, 2)) FROM saga_definition d "
          "ORDER BY d.name, d.version");
  if (st == NULL) {
    sctl_db_close(db);
    return SCTL_ERROR;
  }
  static const char *const hdr[] = {"NAME", "VERSION", "STEPS", "DEADLINE", "IN FLIGHT",
                                    "REGISTERED"};
  sctl_table t;
  json_t *arr = NULL;
  if (o->json)
    arr = json_array();
  else
    sctl_table_init(&t, 6, hdr);
  int r;
  while ((r = sqlite3_step(st)) == SQLITE_ROW) {
    char b[40];
    long long deadline = sqlite3_column_int64(st, 3);
    int64_t reg = sqlite3_column_int64(st, 4);
    if (o->json) {
      json_t *e = json_object();
      json_object_set_new(e, "name", sctl_jstr0(sctl_col_text(st, 0)));
      json_object_set_new(e, "version", json_integer(sqlite3_column_int64(st, 1)));
      json_object_set_new(e, "steps", json_integer(sqlite3_column_int64(st, 2)));
      json_object_set_new(e, "deadline_ms", json_integer(deadline));
      json_object_set_new(e, "in_flight", json_integer(sqlite3_column_int64(st, 5)));
      json_object_set_new(e, "registered_ms", json_integer(reg));
      json_object_set_new(e, "registered", json_string(sctl_iso(reg, b, sizeof b)));
      json_array_append_new(arr, e);
      continue;
    }
    char *cells[6];
    cells[0] = sctl_safe_str(sctl_col_text(st, 0), 0);
    cells[1] = sctl_fmt("%lld", (long long)sqlite3_column_int64(st, 1));
    cells[2] = sctl_fmt("%lld", (long long)sqlite3_column_int64(st, 2));
    cells[3] = deadline ? dur(deadline) : sctl_strdup("-");
    cells[4] = sctl_fmt("%lld", (long long)sqlite3_column_int64(st, 5));
    cells[5] = sctl_strdup(sctl_iso(reg, b, sizeof b));
    sctl_table_row(&t, cells);
  }
  sqlite3_finalize(st);
  int rc = r == SQLITE_DONE ? SCTL_OK : sctl_db_error(db, "reading definitions");
  sctl_db_close(db);
  return sctl_emit(rc, o->json ? arr : NULL, o->json ? NULL : &t);
}
