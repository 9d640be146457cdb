/*
 * The tracing end-to-end test of the distributed shop (trace_e2e.c): the tests that check the
 * traces of purchases, with the collector of trace_sink.h (test_cluster's "trace" mode).
 */
#ifndef SHOP_TRACE_E2E_H
#define SHOP_TRACE_E2E_H

/* cmocka, in this order: three purchases (one with a caller's traceparent, one compensated,
 * one with a malformed traceparent), waited for on the result stream, with no span exported
 * yet (the services run with SHOP_OTLP_INTERVAL_MS of an hour); then, once the services
 * stopped (their exporters flushed), the checks of the three traces; then each trace as the
 * collector draws it (GET /traces/ID): one tree holding every span. */
void trace_purchases(void **state);
void trace_check(void **state);
void trace_tree(void **state);

#endif
