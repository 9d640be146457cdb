/* The orchestrator service: being written. */
#include "shop.h"

int shop_orchestrator_init(shop_ctx *c, saga_node *node) {
  (void)c; (void)node;
  return 0;
}
