/* What the services keep across requests, released at shutdown. */
#include "shop.h"

void shop_services_close(shop_ctx *c) { (void)c; }
