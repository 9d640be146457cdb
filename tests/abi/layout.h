/*
 * The public structs whose layout a program compiled against older headers depends on, for
 * test_abi_old (docs/abi.md). old_app.c expands these lists against the old headers
 * (tests/abi/old_include), layout_new.c against the current ones; the two must agree:
 *
 *   ABI_FIELDS(F)  F(struct, field): every field of the old headers keeps its offset and size
 *                  (fields are only appended);
 *   ABI_FROZEN(S)  S(struct): structs that never grow (embedded by value, or read through a
 *                  pointer with no version or size), same size;
 *   ABI_GROWS(S)   S(struct): structs that may grow at their end (versioned configs, structs
 *                  filled through a size argument, stepped through step_size, or allocated
 *                  and read by the library only), at least as large.
 *
 * Only fields that exist in the old headers can be listed here.
 */
#ifndef SAGA_TEST_ABI_LAYOUT_H
#define SAGA_TEST_ABI_LAYOUT_H

#include <stddef.h>

#define ABI_FIELDS(F)                                                                            \
  F(saga_node_config, struct_version) F(saga_node_config, name) F(saga_node_config, db_path)    \
  F(saga_node_config, vfs) F(saga_node_config, synchronous) F(saga_node_config, transport)      \
  F(saga_node_config, clock) F(saga_node_config, alloc) F(saga_node_config, log)                \
  F(saga_node_config, log_arg) F(saga_node_config, random) F(saga_node_config, random_arg)      \
  F(saga_node_config, on_event) F(saga_node_config, event_arg) F(saga_node_config, resend_ms)   \
  F(saga_node_config, batch_max) F(saga_node_config, limits)                                    \
  F(saga_node_config, busy_timeout_ms) F(saga_node_config, max_deliveries)                      \
  F(saga_node_config, test_hook) F(saga_node_config, test_hook_arg)                             \
  F(saga_node_config, event_channel) F(saga_node_config, retention)                             \
  F(saga_node_config, checkpoint) F(saga_node_config, checkpoint_pages)                         \
  F(saga_limits, max_message_bytes) F(saga_limits, max_data_entries)                            \
  F(saga_limits, max_string_bytes) F(saga_limits, max_headers)                                  \
  F(saga_retention, finished_ms) F(saga_retention, max_finished) F(saga_retention, inbox_ms)    \
  F(saga_retention, batch) F(saga_retention, interval_ms)                                       \
  F(saga_allocator, malloc) F(saga_allocator, realloc) F(saga_allocator, free)                  \
  F(saga_allocator, ud)                                                                         \
  F(saga_definition, struct_version) F(saga_definition, name) F(saga_definition, version)       \
  F(saga_definition, steps) F(saga_definition, nsteps) F(saga_definition, deadline_ms)          \
  F(saga_step, name) F(saga_step, channel) F(saga_step, action) F(saga_step, compensation)      \
  F(saga_step, kind) F(saga_step, retry) F(saga_step, timeout_ms) F(saga_step, local_action)    \
  F(saga_step, local_compensation) F(saga_step, local_arg) F(saga_step, compensation_retry)     \
  F(saga_retry, max_attempts) F(saga_retry, backoff_ms) F(saga_retry, multiplier)               \
  F(saga_retry, cap_ms) F(saga_retry, jitter) F(saga_retry, retry_before_compensate)            \
  F(saga_node_stats, transactions) F(saga_node_stats, work_items)                               \
  F(saga_node_stats, commit_failures) F(saga_node_stats, sent) F(saga_node_stats, resent)       \
  F(saga_node_stats, acked_out) F(saga_node_stats, delivered) F(saga_node_stats, duplicates)    \
  F(saga_node_stats, dead_letters) F(saga_node_stats, handler_runs)                             \
  F(saga_node_stats, step_latency) F(saga_node_stats, step_latency_count)                       \
  F(saga_node_stats, step_latency_sum_ms) F(saga_node_stats, purged_sagas)                      \
  F(saga_node_stats, purged_inbox) F(saga_node_stats, purged_steps)                             \
  F(saga_node_stats, purge_passes) F(saga_node_stats, replayed_tx)                              \
  F(saga_node_stats, checkpoints) F(saga_node_stats, checkpoints_inline)                        \
  F(saga_node_stats, checkpoint_failures) F(saga_node_stats, stale_replies)                     \
  F(saga_node_stats, reply_to_refused) F(saga_node_stats, unsendable)                           \
  F(saga_node_stats, forged_replies)                                                            \
  F(saga_event, type) F(saga_event, saga_id) F(saga_event, definition) F(saga_event, version)   \
  F(saga_event, step) F(saga_event, step_name) F(saga_event, attempt) F(saga_event, state)      \
  F(saga_event, detail) F(saga_event, at_ms) F(saga_event, data)                                \
  F(saga_info, id) F(saga_info, definition) F(saga_info, version) F(saga_info, state)           \
  F(saga_info, step) F(saga_info, attempt) F(saga_info, error) F(saga_info, data)               \
  F(saga_info, created_ms) F(saga_info, updated_ms) F(saga_info, deadline_ms)                   \
  F(saga_mem_faults, seed) F(saga_mem_faults, drop) F(saga_mem_faults, duplicate)               \
  F(saga_mem_faults, reorder) F(saga_mem_faults, delay) F(saga_mem_faults, delay_max_ms)        \
  F(saga_mem_faults, drop_ack)                                                                  \
  F(saga_mem_stats, sent) F(saga_mem_stats, delivered) F(saga_mem_stats, dropped)               \
  F(saga_mem_stats, duplicated) F(saga_mem_stats, reordered) F(saga_mem_stats, delayed)         \
  F(saga_mem_stats, acked) F(saga_mem_stats, acks_dropped) F(saga_mem_stats, waiting)

#define ABI_FROZEN(S)                                                                            \
  S(saga_limits) S(saga_retention) S(saga_allocator) S(saga_retry) S(saga_mem_faults)

#define ABI_GROWS(S)                                                                             \
  S(saga_node_config) S(saga_definition) S(saga_step) S(saga_node_stats) S(saga_event)         \
  S(saga_info) S(saga_mem_stats)

/* One entry per field (offset, then size) and per struct (size). */
#define ABI_FIELD_OFF(st, f) offsetof(st, f), sizeof(((st *)0)->f),
#define ABI_FIELD_NAME(st, f) #st "." #f,
#define ABI_STRUCT_SIZE(st) sizeof(st),
#define ABI_STRUCT_NAME(st) #st,

/* layout_new.c: compares the old layout (old_fields: offset, size per field of ABI_FIELDS;
 * old_frozen, old_grows: sizes) with the current headers'. Returns the number of mismatches,
 * each printed. */
int abi_layout_check(const size_t *old_fields, const size_t *old_frozen, const size_t *old_grows);
/* layout_new.c: sizeof of the current saga_node_config, saga_node_stats, saga_definition. */
void abi_new_sizes(size_t *config, size_t *stats, size_t *definition);

#endif
