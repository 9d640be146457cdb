/* The order service: being written. */
#include "shop.h"

int shop_order_init(shop_ctx *c, saga_node *node) {
  (void)c; (void)node;
  return 0;
}
