/* What the services keep across requests, released at shutdown. */
#include "shop.h"

/* Not in shop.h (shared, unchanged): each is defined by its service.
 * account.c: its database connection and statements.
 * purchase.c: pending purchase starts, open result streams, the product check's read-only
 * connection, the event deduplication memory. */
void shop_account_close(void);
void shop_purchase_close(shop_ctx *c);

void shop_services_close(shop_ctx *c) {
  shop_purchase_close(c);
  shop_account_close();
}
