/*
 * A small OTLP/HTTP trace collector (trace_sink.c): it accepts the spans the shop's services
 * export with --otlp (POST /v1/traces, an ExportTraceServiceRequest in the OTLP JSON mapping),
 * keeps the newest ones in memory, and shows them: GET /traces lists the traces it holds, GET
 * /traces/ID draws one as a tree across the processes. Used by the shop_traces program (a
 * collector to look at traces with, where no Jaeger or OpenTelemetry Collector runs) and by
 * the tracing end-to-end test. One collector per process.
 */
#ifndef SHOP_TRACE_SINK_H
#define SHOP_TRACE_SINK_H

#include <jansson.h>
#include <stddef.h>
#include <time.h>

/* Starts the collector on bind_addr (NULL: 127.0.0.1) and port (0: a free one), keeping at
 * most max_spans spans (the oldest are dropped first). Returns its base URL ("http://ADDR:PORT",
 * for --otlp), or NULL with the reason on stderr. */
const char *trace_sink_start(const char *bind_addr, unsigned port, size_t max_spans);
/* Its base URL while it runs, else NULL. */
const char *trace_sink_url(void);
/* Stops it and forgets what it received. */
void trace_sink_stop(void);

/* The spans received (an array of OTLP span objects, each with "service" added: the
 * service.name of its resource), borrowed under the collector's lock: call
 * trace_sink_unlock() when done, and keep nothing. */
json_t *trace_sink_lock(void);
void trace_sink_unlock(void);
/* With the lock held: waits until a request arrives or `until` (CLOCK_REALTIME) passes;
 * 0, or ETIMEDOUT. */
int trace_sink_wait(const struct timespec *until);
/* With the lock held: requests accepted, requests refused as not an
 * ExportTraceServiceRequest (answered 400), spans dropped for max_spans. */
unsigned long trace_sink_posts(void);
unsigned long trace_sink_malformed(void);
unsigned long trace_sink_dropped(void);

/* Trace `trace` of spans as text, one span per line, children under their parent in start
 * order:  "NAME  [SERVICE]  +OFFSET ms  DURATION ms  STATUS", indented by depth. A span whose
 * parent was not received is drawn as a root with "(parent P not received)". Text from the
 * network is shown with control characters replaced. Returns malloc'd text, or NULL when the
 * trace has no span (or out of memory). */
char *trace_sink_tree(const json_t *spans, const char *trace);

#endif
