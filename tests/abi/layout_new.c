/* The current headers' side of test_abi_old's layout check (layout.h). */
#include <stdio.h>

#include "layout.h"
#include "saga/node.h"
#include "saga/transport_mem.h"

static const size_t new_fields[] = {ABI_FIELDS(ABI_FIELD_OFF) 0};
static const char *const field_names[] = {ABI_FIELDS(ABI_FIELD_NAME) NULL};
static const size_t new_frozen[] = {ABI_FROZEN(ABI_STRUCT_SIZE) 0};
static const char *const frozen_names[] = {ABI_FROZEN(ABI_STRUCT_NAME) NULL};
static const size_t new_grows[] = {ABI_GROWS(ABI_STRUCT_SIZE) 0};
static const char *const grows_names[] = {ABI_GROWS(ABI_STRUCT_NAME) NULL};

int abi_layout_check(const size_t *old_fields, const size_t *old_frozen, const size_t *old_grows) {
  int bad = 0;
  for (size_t i = 0; field_names[i] != NULL; i++)
    if (old_fields[2 * i] != new_fields[2 * i] || old_fields[2 * i + 1] != new_fields[2 * i + 1]) {
      printf("FAIL layout: %s was at offset %zu size %zu, now %zu size %zu\n", field_names[i],
             old_fields[2 * i], old_fields[2 * i + 1], new_fields[2 * i], new_fields[2 * i + 1]);
      bad++;
    }
  for (size_t i = 0; frozen_names[i] != NULL; i++)
    if (old_frozen[i] != new_frozen[i]) {
      printf("FAIL layout: %s is frozen but went from %zu to %zu bytes\n", frozen_names[i],
             old_frozen[i], new_frozen[i]);
      bad++;
    }
  for (size_t i = 0; grows_names[i] != NULL; i++)
    if (old_grows[i] > new_grows[i]) {
      printf("FAIL layout: %s shrank from %zu to %zu bytes\n", grows_names[i], old_grows[i],
             new_grows[i]);
      bad++;
    }
  return bad;
}

void abi_new_sizes(size_t *config, size_t *stats, size_t *definition) {
  *config = sizeof(saga_node_config);
  *stats = sizeof(saga_node_stats);
  *definition = sizeof(saga_definition);
}
