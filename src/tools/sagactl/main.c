/* sagactl: arguments, help texts and dispatch. */
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <saga.h>

#include "sagactl.h"

/* ---- help ---- */

static const char help_main[] =
    "NAME\n"
    "  sagactl - inspect and repair the sagas in a libsaga database\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl list DB [--state S] [--definition D] [--older-than DURATION] [--key K]\n"
    "                  [--limit N] [--json]\n"
    "  sagactl show DB ID [--values] [--json]\n"
    "  sagactl retry DB ID... | sagactl retry DB FILTER [--yes] [--wait[=SECONDS]] [--by NAME]\n"
    "  sagactl cancel DB ID... | sagactl cancel DB FILTER [--yes] [--wait[=SECONDS]] [--by NAME]\n"
    "  sagactl dead-letters DB list [--channel C] [--limit N] [--json]\n"
    "  sagactl dead-letters DB show ID [--json]\n"
    "  sagactl dead-letters DB replay ID... | --all [--channel C] [--yes] [--wait[=SECONDS]]\n"
    "  sagactl dead-letters DB purge ID... | --all [--channel C] [--yes] [--wait[=SECONDS]]\n"
    "  sagactl outbox DB [--json]\n"
    "  sagactl requests DB [--pending] [--limit N] [--json]\n"
    "  sagactl graph DB DEFINITION[@VERSION] [--format dot|mermaid]\n"
    "  sagactl definitions DB [--json]\n"
    "  sagactl locks DB [ID] [--type T] [--limit N] [--json]\n"
    "  sagactl help [COMMAND] | --help | --version\n"
    "\n"
    "DESCRIPTION\n"
    "  DB is the SQLite file of a libsaga node. sagactl reads it read-only, which is safe\n"
    "  while the node runs. It repairs only by writing operator requests (retry, cancel,\n"
    "  dead-letters replay and purge) into saga_operator_request: a node on that database\n"
    "  carries each out in its own transaction, within about a second while it runs, or at\n"
    "  its next start. sagactl never changes the engine's tables itself, never creates a\n"
    "  database, and refuses a file that is not a libsaga database of schema 7 or later.\n"
    "\n"
    "  Requests for the ids given are written at once; a FILTER (--state, --definition,\n"
    "  --older-than, --key; --all for dead letters) is a dry run that lists its matches\n"
    "  until --yes is given. Text that came from a network (errors, channels, reasons,\n"
    "  headers) is printed with control characters escaped (\\n, \\xNN).\n"
    "\n"
    "  'sagactl help COMMAND' describes a command, its options and examples.\n"
    "\n"
    "EXIT STATUS\n"
    "  0  success (a dry run too)\n"
    "  1  an error: the database cannot be read or is not a libsaga one, an unknown id, a\n"
    "     request refused by sagactl's checks or by the node, a --wait that ran out\n"
    "  2  usage: an unknown command or option, a bad option value\n"
    "  Errors are written to stderr, starting with \"sagactl: \".\n"
    "\n"
    "EXAMPLES\n"
    "  sagactl list orders.db --state failed\n"
    "  sagactl show orders.db 018f2a4b5c6d7e8f9a0b1c2d3e4f5a6b\n"
    "  sagactl retry orders.db 018f2a4b5c6d7e8f9a0b1c2d3e4f5a6b --wait\n"
    "  sagactl retry orders.db --state FAILED --definition purchase --older-than 1h --yes\n"
    "  sagactl dead-letters orders.db list\n"
    "  sagactl graph orders.db purchase --format mermaid > purchase.mmd\n";

static const char help_list[] =
    "NAME\n"
    "  sagactl list - the sagas of a database, newest first\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl list DB [--state S] [--definition D] [--older-than DURATION] [--key K]\n"
    "                  [--limit N] [--json]\n"
    "\n"
    "DESCRIPTION\n"
    "  One line per saga: id, definition@version, state, current step (index and name),\n"
    "  attempt, age (since it started), updated (since its last change), and its error\n"
    "  cut to 48 characters. With --json: an array of objects (id, definition, version,\n"
    "  state, step, step_name, phase, attempt, waiting_for, key, created_ms, created,\n"
    "  updated_ms, updated, age_s, parked, error) for scripts.\n"
    "\n"
    "OPTIONS\n"
    "  --state S             RUNNING, COMPENSATING, COMPLETED, COMPENSATED or FAILED (any case)\n"
    "  --definition D        sagas of definition D only (any version)\n"
    "  --older-than DURATION sagas not updated for DURATION: 45s, 10m, 2h, 3d (also 500ms)\n"
    "  --key K               the saga of idempotency key K (one per definition)\n"
    "  --limit N             at most N sagas (default 100; a note on stderr says when more match)\n"
    "  --json                JSON instead of a table\n"
    "\n"
    "EXIT STATUS\n"
    "  0 listed (also when nothing matches), 1 error, 2 usage.\n"
    "\n"
    "EXAMPLES\n"
    "  sagactl list orders.db --state failed\n"
    "  sagactl list orders.db --state running --older-than 10m\n"
    "  sagactl list orders.db --definition purchase --json | jq -r '.[].id'\n";

static const char help_show[] =
    "NAME\n"
    "  sagactl show - one saga: its header, data keys, timeline and operator requests\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl show DB ID [--values] [--json]\n"
    "\n"
    "DESCRIPTION\n"
    "  The saga's definition, state, step, attempt, idempotency key, times, error and the\n"
    "  keys of its data with their sizes; then the timeline: every history row with its\n"
    "  time, step, attempt, event name and detail; then the operator requests that targeted\n"
    "  it, with their state and result. Data values are not shown unless --values is given\n"
    "  (they may hold personal data).\n"
    "\n"
    "OPTIONS\n"
    "  --values  show the data values too (escaped: \\xNN for bytes that are not text)\n"
    "  --json    one JSON object (fields of 'list --json', plus data, data_bytes, history,\n"
    "            requests)\n"
    "\n"
    "EXIT STATUS\n"
    "  0 shown, 1 error (no such saga), 2 usage.\n"
    "\n"
    "EXAMPLES\n"
    "  sagactl show orders.db 018f2a4b5c6d7e8f9a0b1c2d3e4f5a6b\n";

#define HELP_REQUEST_COMMON                                                                    \
  "  Checks (all ids, before anything is written; the node checks again when it carries\n"    \
  "  the request out): the saga exists, is in the state the request needs, and has no\n"      \
  "  pending request of the same kind. If any id fails, no request is written.\n"              \
  "\n"                                                                                         \
  "OPTIONS\n"                                                                                  \
  "  --state S, --definition D, --older-than DURATION, --key K, --limit N\n"                  \
  "                     a filter instead of ids (as for 'list'): a dry run that lists the\n"  \
  "                     sagas it would request\n"                                             \
  "  --yes, --execute   write the requests of a filter\n"                                     \
  "  --wait[=SECONDS]   wait (default 30 s) until a node carried out every request, print\n" \
  "                     each result; exit 1 if any was refused or the time ran out\n"         \
  "                     (--wait 10 works too: a saga id is never a number)\n"               \
  "  --by NAME          requested_by of the requests (default: $USER)\n"                      \
  "\n"                                                                                         \
  "EXIT STATUS\n"                                                                              \
  "  0 written (or listed by a dry run; with --wait: every request done), 1 error (an id\n"   \
  "  refused, a request refused by the node, the wait ran out), 2 usage.\n"

static const char help_retry[] =
    "NAME\n"
    "  sagactl retry - ask the node to resume the compensation of FAILED sagas\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl retry DB ID... [--wait[=SECONDS]] [--by NAME]\n"
    "  sagactl retry DB [--state FAILED] [--definition D] [--older-than DURATION] [--key K]\n"
    "                   [--limit N] [--yes] [--wait[=SECONDS]] [--by NAME]\n"
    "\n"
    "DESCRIPTION\n"
    "  Writes one 'retry' operator request per saga. The node resumes the compensation at\n"
    "  the step that failed, with a new round of attempts (what saga_retry_failed() does);\n"
    "  fix the cause on the participant first. Only FAILED sagas can be retried.\n"
    HELP_REQUEST_COMMON
    "\n"
    "EXAMPLES\n"
    "  sagactl retry orders.db 018f2a4b5c6d7e8f9a0b1c2d3e4f5a6b --wait=10\n"
    "  sagactl retry orders.db --definition purchase             # dry run\n"
    "  sagactl retry orders.db --definition purchase --yes --wait\n";

static const char help_cancel[] =
    "NAME\n"
    "  sagactl cancel - ask the node to abort RUNNING sagas before their pivot\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl cancel DB ID... [--wait[=SECONDS]] [--by NAME]\n"
    "  sagactl cancel DB [--state RUNNING] [--definition D] [--older-than DURATION] [--key K]\n"
    "                    [--limit N] [--yes] [--wait[=SECONDS]] [--by NAME]\n"
    "\n"
    "DESCRIPTION\n"
    "  Writes one 'cancel' operator request per saga. The node compensates the steps done,\n"
    "  the one in flight included (what saga_cancel() does). Only RUNNING sagas that have\n"
    "  not reached their pivot (or a retriable step) can be cancelled.\n"
    HELP_REQUEST_COMMON
    "\n"
    "EXAMPLES\n"
    "  sagactl cancel orders.db 018f2a4b5c6d7e8f9a0b1c2d3e4f5a6b\n"
    "  sagactl cancel orders.db --definition purchase --older-than 2h       # dry run\n"
    "  sagactl cancel orders.db --definition purchase --older-than 2h --yes\n";

static const char help_dead[] =
    "NAME\n"
    "  sagactl dead-letters - messages a node could not handle\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl dead-letters DB list [--channel C] [--limit N] [--json]\n"
    "  sagactl dead-letters DB show ID [--json]\n"
    "  sagactl dead-letters DB replay ID... [--wait[=SECONDS]] [--by NAME]\n"
    "  sagactl dead-letters DB replay --all [--channel C] [--limit N] [--yes] [--wait[=S]]\n"
    "  sagactl dead-letters DB purge ID... [--wait[=SECONDS]] [--by NAME]\n"
    "  sagactl dead-letters DB purge --all [--channel C] [--yes] [--wait[=SECONDS]]\n"
    "  ('sagactl dead-letters list DB ...' works too.)\n"
    "\n"
    "DESCRIPTION\n"
    "  list: id, age, channel, message id, size and reason (cut to 60 characters), newest\n"
    "  first. show: the reason, whether the body was cut (bodies are kept up to 64 KiB),\n"
    "  and the message decoded with libsaga's strict decoder: kind, saga id, step, attempt,\n"
    "  phase, action, message id, reply_to, status and error of a reply, headers, data keys\n"
    "  and sizes (never values); or why it cannot be decoded, with its first bytes.\n"
    "  replay: one 'replay' request per dead letter: the node handles the kept message\n"
    "  again (fix the cause first, e.g. register the missing handler) and removes the dead\n"
    "  letter when that succeeds. purge: one 'purge' request per dead letter, or one for\n"
    "  every dead letter with --all (without --channel or --limit).\n"
    "  --all is a dry run that lists what it would request until --yes is given.\n"
    "\n"
    "OPTIONS\n"
    "  --channel C          dead letters received on channel C only\n"
    "  --all                every dead letter (or every one on --channel)\n"
    "  --limit N            at most N dead letters, newest first (list: default 100)\n"
    "  --yes, --execute     write the requests of --all\n"
    "  --wait[=SECONDS]     wait (default 30 s) until a node carried out every request\n"
    "                       (write --wait=10: here '--wait 10' is refused as ambiguous)\n"
    "  --by NAME            requested_by of the requests (default: $USER)\n"
    "  --json               JSON instead of text (list, show)\n"
    "\n"
    "EXIT STATUS\n"
    "  0 success, 1 error (no such dead letter, a request refused, the wait ran out), 2 usage.\n"
    "\n"
    "EXAMPLES\n"
    "  sagactl dead-letters orders.db list --channel payment\n"
    "  sagactl dead-letters orders.db show 12\n"
    "  sagactl dead-letters orders.db replay 12 --wait\n"
    "  sagactl dead-letters orders.db purge --all --yes\n";

static const char help_outbox[] =
    "NAME\n"
    "  sagactl outbox - messages not yet confirmed by the transport\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl outbox DB [--json]\n"
    "\n"
    "DESCRIPTION\n"
    "  Per channel: how many outbox rows wait for the transport's confirmation, and the age\n"
    "  of the oldest; then the total. A channel whose oldest row keeps growing older has\n"
    "  no consumer, or its consumer cannot keep up.\n"
    "\n"
    "OPTIONS\n"
    "  --json   {\"total\", \"oldest_age_s\", \"channels\": [{channel, depth, oldest_ms,\n"
    "           oldest_age_s}]}\n"
    "\n"
    "EXIT STATUS\n"
    "  0 shown, 1 error, 2 usage.\n"
    "\n"
    "EXAMPLES\n"
    "  sagactl outbox orders.db\n";

static const char help_requests[] =
    "NAME\n"
    "  sagactl requests - the operator requests and their results\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl requests DB [--pending] [--limit N] [--json]\n"
    "\n"
    "DESCRIPTION\n"
    "  Newest first: id, when it was requested, action (retry, cancel, replay, purge),\n"
    "  target (a saga id, a dead letter id, or * for every dead letter), who asked, state\n"
    "  (PENDING, DONE, REFUSED), the node's result, and when it was carried out.\n"
    "\n"
    "OPTIONS\n"
    "  --pending   requests no node has carried out yet\n"
    "  --limit N   at most N (default 100)\n"
    "  --json      an array of objects (id, at_ms, requested, action, target, requested_by,\n"
    "              state, result, done_ms)\n"
    "\n"
    "EXIT STATUS\n"
    "  0 shown, 1 error, 2 usage.\n"
    "\n"
    "EXAMPLES\n"
    "  sagactl requests orders.db --pending\n";

static const char help_graph[] =
    "NAME\n"
    "  sagactl graph - draw a recorded definition\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl graph DB DEFINITION[@VERSION] [--format dot|mermaid]\n"
    "\n"
    "DESCRIPTION\n"
    "  The definition as the node recorded it at saga_node_start() (the highest version\n"
    "  without @VERSION), as a Graphviz DOT digraph (default) or a Mermaid flowchart. Each\n"
    "  step is a node labelled with its index and name, kind, channel and action (or\n"
    "  \"local\"), retry policy, timeout and compensation; the pivot is drawn bold (DOT) or\n"
    "  as a hexagon (Mermaid), local steps rounded. Solid edges run forward to COMPLETED;\n"
    "  dashed edges run the compensations in reverse order, from the pivot's failure, to\n"
    "  COMPENSATED. The output depends only on the recorded definition.\n"
    "\n"
    "OPTIONS\n"
    "  --format dot|mermaid   the output format (default dot)\n"
    "\n"
    "EXIT STATUS\n"
    "  0 drawn, 1 error (no such definition), 2 usage.\n"
    "\n"
    "EXAMPLES\n"
    "  sagactl graph orders.db purchase | dot -Tsvg > purchase.svg\n"
    "  sagactl graph orders.db purchase@2 --format mermaid\n";

static const char help_definitions[] =
    "NAME\n"
    "  sagactl definitions - the definitions recorded in a database\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl definitions DB [--json]\n"
    "\n"
    "DESCRIPTION\n"
    "  Every definition name and version a node registered (recorded at saga_node_start()):\n"
    "  steps, saga deadline, sagas in flight (RUNNING or COMPENSATING), and when a node last\n"
    "  recorded it.\n"
    "\n"
    "OPTIONS\n"
    "  --json   an array of objects (name, version, steps, deadline_ms, in_flight,\n"
    "           registered_ms, registered)\n"
    "\n"
    "EXIT STATUS\n"
    "  0 shown, 1 error, 2 usage.\n"
    "\n"
    "EXAMPLES\n"
    "  sagactl definitions orders.db\n";

static const char help_locks[] =
    "NAME\n"
    "  sagactl locks - the semantic locks held in a database\n"
    "\n"
    "SYNOPSIS\n"
    "  sagactl locks DB [ID] [--type T] [--limit N] [--json]\n"
    "\n"
    "DESCRIPTION\n"
    "  Oldest first: each business record a saga's step marked as held (saga_lock_acquire()),\n"
    "  its type and id, the saga holding it and the step that took it, how long it has been\n"
    "  held, and the saga's state when this database's node orchestrates it ((elsewhere)\n"
    "  when another node does: look it up there). A lock is released by a later step of its\n"
    "  saga, by the compensation of the step that took it, or on the orchestrator's node when\n"
    "  the saga ends COMPLETED or COMPENSATED. A lock held by a FAILED saga stays until the\n"
    "  saga is repaired: 'sagactl retry' on the orchestrator's database runs its\n"
    "  compensations, which release it. ID lists the locks of one saga.\n"
    "\n"
    "OPTIONS\n"
    "  --type T    locks of type T only\n"
    "  --limit N   at most N (default 100)\n"
    "  --json      an array of objects (type, id, saga_id, step, acquired_ms, acquired,\n"
    "              held_s, saga_state, definition; the last two null when orchestrated\n"
    "              elsewhere)\n"
    "\n"
    "EXIT STATUS\n"
    "  0 shown (also when none is held), 1 error (a database older than schema 10), 2 usage.\n"
    "\n"
    "EXAMPLES\n"
    "  sagactl locks kitchen.db\n"
    "  sagactl locks orders.db --type order --json\n";

/* ---- commands and their options ---- */

enum {
  O_STATE = 1 << 0, O_DEF = 1 << 1, O_OLDER = 1 << 2, O_KEY = 1 << 3, O_LIMIT = 1 << 4,
  O_JSON = 1 << 5, O_VALUES = 1 << 6, O_YES = 1 << 7, O_WAIT = 1 << 8, O_BY = 1 << 9,
  O_CHANNEL = 1 << 10, O_ALL = 1 << 11, O_PENDING = 1 << 12, O_FORMAT = 1 << 13,
  O_TYPE = 1 << 14
};

typedef struct command {
  const char *name;
  const char *help;
  unsigned opts;
} command;

#define O_FILTER (O_STATE | O_DEF | O_OLDER | O_KEY | O_LIMIT)
static const command commands[] = {
    {"list", help_list, O_FILTER | O_JSON},
    {"show", help_show, O_JSON | O_VALUES},
    {"retry", help_retry, O_FILTER | O_YES | O_WAIT | O_BY},
    {"cancel", help_cancel, O_FILTER | O_YES | O_WAIT | O_BY},
    {"dead-letters", help_dead, O_CHANNEL | O_LIMIT | O_JSON | O_ALL | O_YES | O_WAIT | O_BY},
    {"outbox", help_outbox, O_JSON},
    {"requests", help_requests, O_PENDING | O_LIMIT | O_JSON},
    {"graph", help_graph, O_FORMAT},
    {"definitions", help_definitions, O_JSON},
    {"locks", help_locks, O_TYPE | O_LIMIT | O_JSON},
};
#define NCOMMANDS (sizeof commands / sizeof commands[0])

static const command *find_command(const char *name) {
  for (size_t i = 0; i < NCOMMANDS; i++)
    if (strcmp(commands[i].name, name) == 0) return &commands[i];
  return NULL;
}

typedef struct option {
  const char *name;
  unsigned bit;
  int arg; /* 0 none, 1 required, 2 optional (as --name=value; --wait also takes a number
            * as the next argument, see O_WAIT) */
} option;

static const option options[] = {
    {"state", O_STATE, 1},   {"definition", O_DEF, 1}, {"older-than", O_OLDER, 1},
    {"key", O_KEY, 1},       {"limit", O_LIMIT, 1},    {"json", O_JSON, 0},
    {"values", O_VALUES, 0}, {"yes", O_YES, 0},        {"execute", O_YES, 0},
    {"wait", O_WAIT, 2},     {"by", O_BY, 1},          {"channel", O_CHANNEL, 1},
    {"all", O_ALL, 0},       {"pending", O_PENDING, 0}, {"format", O_FORMAT, 1},
    {"type", O_TYPE, 1},
};

static int positive(const char *s, long max, long *out) {
  char *end = NULL;
  if (s == NULL || *s < '0' || *s > '9') return -1;
  long v = strtol(s, &end, 10);
  if (*end != '\0' || v <= 0 || v > max) return -1;
  *out = v;
  return 0;
}

/* Fills o from argv (after the command name). Returns SCTL_OK or SCTL_USAGE (printed). */
static int parse(const command *c, int argc, char **argv, sctl_opts *o) {
  o->args = calloc((size_t)argc + 1, sizeof *o->args);
  if (o->args == NULL) return sctl_err("out of memory");
  int only_args = 0;
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i];
    if (only_args || a[0] != '-' || a[1] == '\0') {
      o->args[o->nargs++] = a;
      continue;
    }
    if (strcmp(a, "--") == 0) {
      only_args = 1;
      continue;
    }
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      fputs(c->help, stdout);
      exit(SCTL_OK);
    }
    if (a[1] != '-') return sctl_usage(c->name, "unknown option '%s'", a);
    const char *name = a + 2, *eq = strchr(name, '=');
    size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
    const option *opt = NULL;
    for (size_t k = 0; k < sizeof options / sizeof options[0]; k++)
      if (strlen(options[k].name) == nlen && strncmp(options[k].name, name, nlen) == 0)
        opt = &options[k];
    if (opt == NULL || !(c->opts & opt->bit)) {
      char *safe = sctl_safe(a, eq ? (size_t)(eq - a) : strlen(a), 40);
      sctl_usage(c->name, "%s does not take option '%s'", c->name, safe);
      free(safe);
      return SCTL_USAGE;
    }
    const char *val = NULL;
    if (eq != NULL) {
      if (opt->arg == 0) return sctl_usage(c->name, "--%s takes no value", opt->name);
      val = eq + 1;
    } else if (opt->arg == 1) {
      if (i + 1 >= argc) return sctl_usage(c->name, "--%s needs a value", opt->name);
      val = argv[++i];
    }
    switch (opt->bit) {
    case O_STATE:
      o->state = val;
      o->state_num = sctl_state_num(val);
      if (o->state_num == 0) {
        char *safe = sctl_safe_str(val, 40);
        sctl_usage(c->name, "unknown state '%s': use one of " SCTL_STATE_NAMES " (any case)",
                   safe);
        free(safe);
        return SCTL_USAGE;
      }
      break;
    case O_DEF: o->definition = val; break;
    case O_OLDER:
      o->older_than = val;
      o->older_ms = sctl_parse_duration(val);
      if (o->older_ms < 0) {
        char *safe = sctl_safe_str(val, 40);
        sctl_usage(c->name, "bad duration '%s': a number and a unit, ms, s, m, h or d (45s, "
                            "10m, 2h, 3d)", safe);
        free(safe);
        return SCTL_USAGE;
      }
      break;
    case O_KEY: o->key = val; break;
    case O_LIMIT:
      if (positive(val, 100000000L, &o->limit) != 0)
        return sctl_usage(c->name, "--limit takes a positive number");
      break;
    case O_JSON: o->json = 1; break;
    case O_VALUES: o->values = 1; break;
    case O_YES: o->yes = 1; break;
    case O_WAIT:
      o->wait = 1;
      if (val != NULL && positive(val, 86400L, &o->wait_s) != 0)
        return sctl_usage(c->name, "--wait=SECONDS takes a positive number of seconds");
      /* "--wait 10": a saga id is 32 hex digits, so a number after --wait of retry or
       * cancel can only be seconds. Dead-letter ids are numbers too: there it is ambiguous,
       * and refused rather than guessed. */
      if (val == NULL && i + 1 < argc && positive(argv[i + 1], 86400L, &(long){0}) == 0) {
        if (strcmp(c->name, "dead-letters") == 0)
          return sctl_usage(c->name, "'--wait %s' is ambiguous: write --wait=%s for seconds, "
                                     "or put the dead-letter id before --wait", argv[i + 1],
                            argv[i + 1]);
        (void)positive(argv[++i], 86400L, &o->wait_s);
      }
      break;
    case O_BY: o->by = val; break;
    case O_CHANNEL: o->channel = val; break;
    case O_ALL: o->all = 1; break;
    case O_PENDING: o->pending = 1; break;
    case O_FORMAT: o->format = val; break;
    case O_TYPE: o->type = val; break;
    }
  }
  return SCTL_OK;
}

static const char *default_user(void) {
  const char *u = getenv("USER");
  if (u != NULL && u[0] != '\0') return u;
  struct passwd *pw = getpwuid(getuid());
  return pw != NULL && pw->pw_name != NULL ? pw->pw_name : "";
}

static int run(const command *c, sctl_opts *o) {
  if (strcmp(c->name, "dead-letters") == 0) {
    /* Both "dead-letters DB list" and "dead-letters list DB". */
    static const char *const subs[] = {"list", "show", "replay", "purge"};
    int at = -1;
    for (int k = 0; k < 2 && k < o->nargs && at < 0; k++)
      for (size_t s = 0; s < 4; s++)
        if (strcmp(o->args[k], subs[s]) == 0) at = k;
    if (at < 0 || o->nargs < 2)
      return sctl_usage(c->name, "dead-letters needs a database and one of list, show, replay, "
                                 "purge");
    const char *sub = o->args[at];
    for (int k = at; k + 1 < o->nargs; k++) o->args[k] = o->args[k + 1];
    o->nargs--;
    return sctl_cmd_dead_letters(o, sub);
  }
  if (o->nargs < 1) return sctl_usage(c->name, "%s needs a database", c->name);
  if (strcmp(c->name, "list") == 0) {
    if (o->nargs != 1) return sctl_usage(c->name, "list takes one database");
    return sctl_cmd_list(o);
  }
  if (strcmp(c->name, "show") == 0) return sctl_cmd_show(o);
  if (strcmp(c->name, "retry") == 0 || strcmp(c->name, "cancel") == 0)
    return sctl_cmd_request_sagas(o, c->name);
  if (strcmp(c->name, "outbox") == 0) return sctl_cmd_outbox(o);
  if (strcmp(c->name, "requests") == 0) return sctl_cmd_requests(o);
  if (strcmp(c->name, "graph") == 0) return sctl_cmd_graph(o);
  if (strcmp(c->name, "locks") == 0) return sctl_cmd_locks(o);
  return sctl_cmd_definitions(o);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fputs(help_main, stderr);
    return SCTL_USAGE;
  }
  const char *cmd = argv[1];
  if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
    fputs(help_main, stdout);
    return SCTL_OK;
  }
  if (strcmp(cmd, "--version") == 0) {
    printf("sagactl (libsaga %s)\n", saga_version());
    return SCTL_OK;
  }
  if (strcmp(cmd, "help") == 0) {
    if (argc < 3) {
      fputs(help_main, stdout);
      return SCTL_OK;
    }
    const command *c = find_command(argv[2]);
    if (c == NULL) {
      char *safe = sctl_safe_str(argv[2], 40);
      sctl_usage(NULL, "no command '%s'", safe);
      free(safe);
      return SCTL_USAGE;
    }
    fputs(c->help, stdout);
    return SCTL_OK;
  }
  const command *c = find_command(cmd);
  if (c == NULL) {
    char *safe = sctl_safe_str(cmd, 40);
    sctl_usage(NULL, "unknown command '%s'", safe);
    free(safe);
    return SCTL_USAGE;
  }
  sctl_opts o = {.older_ms = -1, .limit = -1, .wait_s = 30};
  int rc = parse(c, argc - 2, argv + 2, &o);
  if (rc == SCTL_OK) {
    if (o.by == NULL) o.by = default_user();
    rc = run(c, &o);
  }
  free(o.args);
  fflush(stdout);
  return rc;
}
