/*
 * The tracing end-to-end test of the distributed shop (trace_e2e.c): a local OTLP/HTTP
 * collector and the test that checks the traces of purchases (test_cluster's "trace" mode).
 */
#ifndef SHOP_TRACE_E2E_H
#define SHOP_TRACE_E2E_H

/* Starts the collector on 127.0.0.1 (a free port): its base URL (for --otlp), or NULL. */
const char *trace_sink_start(void);
/* Stops it and forgets what it received. */
void trace_sink_stop(void);
/* Requests that were not valid ExportTraceServiceRequests. */
int trace_sink_malformed(void);
/* cmocka, in this order: three purchases (one with a caller's traceparent, one compensated,
 * one with a malformed traceparent), waited for on the result stream, with no span exported
 * yet (the services run with SHOP_OTLP_INTERVAL_MS of an hour); then, once the services
 * stopped (their exporters flushed), the checks of the three traces. */
void trace_purchases(void **state);
void trace_check(void **state);

#endif
