/*
 * test_abi_old: a program compiled against OLDER public headers, run against this library
 * (docs/abi.md). tests/abi/old_include/saga/ holds byte-for-byte copies of the headers of
 * commit e3b09a5 (`git show e3b09a5:include/saga/<h>`): saga_node_config at struct_version 3
 * (no db_mode, db_check), saga_node_stats without the counters appended since
 * (handler_contract_errors, ...), saga_definition at version 1 (no step_size). Every struct
 * this program allocates is therefore smaller than the library's.
 *
 * Three functions changed their signature with the ABI rules (docs/abi.md) themselves, so
 * no program built before them can run on this library (its SONAME changes): the config
 * initialiser and the stats getter now take the caller's size, saga_node_start returns the
 * missing count through a pointer. Below, their old declarations are renamed away and this
 * release's declared instead, exactly as a program built against old struct layouts with
 * those rules would call them. What this checks is what the rules promise from now on: a
 * struct compiled smaller is never written past (guard bytes after each stay untouched) nor
 * read past (garbage after each is ignored), older config and definition versions are read
 * correctly, and a saga runs to COMPLETED. It also compares, field by field, the old layouts
 * with the current headers (layout.h, layout_new.c): fields are only ever appended.
 */
#define saga_node_config_init saga_node_config_init_OLD_DECLARATION
#define saga_node_stats_get saga_node_stats_get_OLD_DECLARATION
#define saga_node_start saga_node_start_OLD_DECLARATION
#include "saga/node.h"
#include "saga/transport_mem.h"
#undef saga_node_config_init
#undef saga_node_stats_get
#undef saga_node_start

#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "../layout.h"

/* This release's declarations of those three (include/saga/node.h). */
SAGA_EXTERN int saga_node_config_init_sized(saga_node_config *cfg, size_t size);
#define saga_node_config_init(cfg) saga_node_config_init_sized((cfg), sizeof(saga_node_config))
SAGA_EXTERN int saga_node_stats_get(const saga_node *node, saga_node_stats *out, size_t size);
SAGA_EXTERN int saga_node_start(saga_node *node, uint64_t *missing);

#define GUARD 64
#define GUARD_BYTE 0x5a

static int failures;
#define CHECK(cond)                                                                              \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                                     \
      failures++;                                                                                \
    }                                                                                            \
  } while (0)

static int guard_intact(const unsigned char *g) {
  for (size_t i = 0; i < GUARD; i++)
    if (g[i] != GUARD_BYTE) return 0;
  return 1;
}

/* Two local steps: the first records its run in the saga data, the second is the pivot. */
static int step_reserve(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  return saga_reply_set_str(reply, "reserved", "yes");
}
static int step_release(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  return SAGA_OK;
}
static int step_charge(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  return saga_reply_set_str(reply, "charged", "yes");
}

static int completed, finished;
static char saga_id[40];

static void on_event(saga_node *node, const saga_event *ev, void *arg) {
  if (ev->type == SAGA_EV_COMPLETED) completed++;
  if (ev->state == SAGA_COMPLETED || ev->state == SAGA_COMPENSATED || ev->state == SAGA_FAILED)
    finished++;
}

static void on_started(saga_node *node, int status, const char *id, int existed, void *arg) {
  if (status == SAGA_OK) snprintf(saga_id, sizeof saga_id, "%s", id);
}

static void on_closed(void *arg) { *(int *)arg = 1; }

int main(void) {
  /* The old layouts against the current headers. */
  static const size_t old_fields[] = {ABI_FIELDS(ABI_FIELD_OFF) 0};
  static const size_t old_frozen[] = {ABI_FROZEN(ABI_STRUCT_SIZE) 0};
  static const size_t old_grows[] = {ABI_GROWS(ABI_STRUCT_SIZE) 0};
  CHECK(abi_layout_check(old_fields, old_frozen, old_grows) == 0);
  size_t new_config, new_stats, new_def;
  abi_new_sizes(&new_config, &new_stats, &new_def);
  /* Otherwise this test proves nothing: the library's structs must be the larger ones. */
  CHECK(sizeof(saga_node_config) < new_config);
  CHECK(sizeof(saga_node_stats) < new_stats);
  CHECK(sizeof(saga_definition) < new_def);
  printf("old sizes: config %zu (library %zu), stats %zu (%zu), definition %zu (%zu)\n",
         sizeof(saga_node_config), new_config, sizeof(saga_node_stats), new_stats,
         sizeof(saga_definition), new_def);

  uv_loop_t loop;
  CHECK(uv_loop_init(&loop) == 0);
  saga_clock *clock = NULL;
  CHECK(saga_clock_manual_new(&clock, 1700000000000ull, NULL) == SAGA_OK);
  saga_mem_hub *hub = NULL;
  CHECK(saga_mem_hub_new(&hub, &loop, clock, NULL, NULL) == SAGA_OK);
  saga_transport *t = NULL;
  CHECK(saga_mem_transport_new(&t, hub) == SAGA_OK);

  /* The config: a version-3 struct, filled by the library's defaults and no further. */
  struct {
    saga_node_config cfg;
    unsigned char guard[GUARD];
  } c;
  memset(&c, GUARD_BYTE, sizeof c);
  CHECK(saga_node_config_init(&c.cfg) == SAGA_OK);
  CHECK(guard_intact(c.guard));
  CHECK(c.cfg.struct_version == 3); /* the newest version that fits the old struct */
  CHECK(c.cfg.name == NULL && c.cfg.transport == NULL && c.cfg.on_event == NULL);
  CHECK(c.cfg.resend_ms == 1000 && c.cfg.busy_timeout_ms == 5000);
  CHECK(c.cfg.limits.max_message_bytes == 1u << 20);
  CHECK(c.cfg.retention.finished_ms == 7ull * 24 * 3600 * 1000);
  CHECK(c.cfg.checkpoint == SAGA_CHECKPOINT_INLINE && c.cfg.checkpoint_pages == 1000);
  /* The bytes after it are not the version-4 fields (db_mode, db_check): a library that read
   * them would see 0x5a5a5a5a there, which is no mode at all, and refuse the open. */
  c.cfg.name = "old-app";
  c.cfg.db_path = ":memory:";
  c.cfg.transport = t;
  c.cfg.clock = clock;
  c.cfg.on_event = on_event;
  saga_node *node = NULL;
  char err[256];
  int rc = saga_node_open(&node, &loop, &c.cfg, err, sizeof err);
  if (rc != SAGA_OK) printf("open: %s: %s\n", saga_err_name(rc), err);
  CHECK(rc == SAGA_OK);
  if (node == NULL) return 1;

  /* The definition: version 1 (no step_size), its steps the old saga_step layout. Garbage
   * after the struct would be a step_size of 0x5a5a... if the library read one. */
  struct {
    saga_step s[2];
    unsigned char guard[GUARD];
  } steps;
  memset(&steps, GUARD_BYTE, sizeof steps);
  memset(steps.s, 0, sizeof steps.s);
  steps.s[0].name = "RESERVE";
  steps.s[0].local_action = step_reserve;
  steps.s[0].local_compensation = step_release;
  steps.s[1].name = "CHARGE";
  steps.s[1].local_action = step_charge;
  steps.s[1].kind = SAGA_STEP_PIVOT;
  struct {
    saga_definition def;
    unsigned char guard[GUARD];
  } d;
  memset(&d, GUARD_BYTE, sizeof d);
  d.def.struct_version = SAGA_DEFINITION_VERSION; /* 1 in these headers */
  d.def.name = "old";
  d.def.version = 1;
  d.def.steps = steps.s;
  d.def.nsteps = 2;
  d.def.deadline_ms = 0;
  rc = saga_node_register(node, &d.def);
  if (rc != SAGA_OK) printf("register: %s: %s\n", saga_err_name(rc), saga_node_errmsg(node));
  CHECK(rc == SAGA_OK);
  CHECK(guard_intact(d.guard) && guard_intact(steps.guard));

  uint64_t missing = 12345;
  CHECK(saga_node_start(node, &missing) == SAGA_OK);
  CHECK(missing == 0);
  CHECK(saga_start(node, "old", NULL, NULL, on_started, NULL) == SAGA_OK);
  for (int i = 0; i < 10000 && finished == 0; i++) {
    if (uv_run(&loop, UV_RUN_NOWAIT) != 0) continue;
    if (finished) break;
    if (saga_clock_advance_to_next(clock) != SAGA_OK) break; /* nothing left to do */
  }
  CHECK(completed == 1);

  /* saga_info: allocated by the library, read here through the old (shorter) layout. */
  saga_info *info = NULL;
  CHECK(saga_get(node, saga_id, &info) == SAGA_OK);
  if (info != NULL) {
    CHECK(info->state == SAGA_COMPLETED);
    CHECK(strcmp(info->definition, "old") == 0 && info->version == 1);
    const char *v = saga_data_get_str(info->data, "reserved");
    CHECK(v != NULL && strcmp(v, "yes") == 0);
    v = saga_data_get_str(info->data, "charged");
    CHECK(v != NULL && strcmp(v, "yes") == 0);
    saga_info_free(info);
  }

  /* The counters: the old struct gets exactly its own bytes. */
  struct {
    saga_node_stats st;
    unsigned char guard[GUARD];
  } s;
  memset(&s, GUARD_BYTE, sizeof s);
  CHECK(saga_node_stats_get(node, &s.st, sizeof s.st) == SAGA_OK);
  CHECK(guard_intact(s.guard));
  CHECK(s.st.transactions > 0 && s.st.handler_runs >= 2);
  CHECK(s.st.forged_replies == 0); /* the old struct's last counter was written */
  CHECK(saga_node_stats_get(node, &s.st, 8) == SAGA_EINVAL); /* below the first version */

  int closed = 0;
  saga_node_close(node, on_closed, &closed);
  for (int i = 0; i < 100000 && uv_run(&loop, UV_RUN_NOWAIT) != 0; i++) {
  }
  CHECK(closed == 1);
  CHECK(saga_mem_hub_close(hub) == SAGA_OK);
  for (int i = 0; i < 100000 && uv_run(&loop, UV_RUN_NOWAIT) != 0; i++) {
  }
  CHECK(uv_loop_close(&loop) == 0);
  saga_clock_free(clock);
  printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures != 0;
}
