/* The account service: being written. */
#include "shop.h"

int shop_account_init(shop_ctx *c) {
  (void)c;
  return 0;
}
