/*
 * shop_traces: a trace collector to look at the shop's traces with, where no Jaeger or
 * OpenTelemetry Collector runs. The services export to it (--otlp URL, OTLP over HTTP with
 * JSON); it keeps the newest spans in memory and draws each trace as a tree:
 *
 *   shop_traces [--bind ADDR] [--port N] [--max-spans N]
 *   curl URL/traces            the traces it holds, newest first
 *   curl URL/traces/TRACE_ID   one trace, as a tree across the services
 *
 * A purchase's trace id is its saga's id (sagactl list / show), unless the client sent a
 * traceparent. Runs until SIGINT or SIGTERM.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trace_sink.h"

static int usage(void) {
  fputs("usage: shop_traces [--bind ADDR] [--port N] [--max-spans N]\n"
        "  --bind ADDR      IPv4 address to listen on (default 127.0.0.1)\n"
        "  --port N         port (default 4318, the OTLP/HTTP port; 0 = a free one)\n"
        "  --max-spans N    spans kept, the oldest dropped first (default 100000)\n"
        "Services export to it with --otlp http://ADDR:PORT; then\n"
        "  curl http://ADDR:PORT/traces             lists the traces, newest first\n"
        "  curl http://ADDR:PORT/traces/TRACE_ID    draws one as a tree\n",
        stderr);
  return 2;
}

static int number(const char *s, unsigned long max, unsigned long *out) {
  char *end = NULL;
  if (s == NULL || *s < '0' || *s > '9') return -1;
  unsigned long v = strtoul(s, &end, 10);
  if (*end != '\0' || v > max) return -1;
  *out = v;
  return 0;
}

int main(int argc, char **argv) {
  const char *bind = NULL;
  unsigned long port = 4318, max = 100000;
  for (int i = 1; i < argc; i++) {
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(argv[i], "--bind") == 0 && v != NULL) {
      bind = v;
    } else if (strcmp(argv[i], "--port") == 0) {
      if (number(v, 65535, &port) != 0) return usage();
    } else if (strcmp(argv[i], "--max-spans") == 0) {
      if (number(v, 10000000, &max) != 0 || max == 0) return usage();
    } else {
      return usage();
    }
    i++;
  }
  /* Block the stop signals before the collector's thread starts: it inherits the mask, and
   * this thread takes them with sigwait. */
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, NULL);
  const char *url = trace_sink_start(bind, (unsigned)port, max);
  if (url == NULL) return 1;
  printf("shop_traces: collecting OTLP/HTTP JSON spans at %s/v1/traces\n"
         "  export with: --otlp %s\n"
         "  look with:   curl %s/traces   and   curl %s/traces/TRACE_ID\n",
         url, url, url, url);
  fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  trace_sink_lock();
  unsigned long posts = trace_sink_posts(), bad = trace_sink_malformed();
  unsigned long dropped = trace_sink_dropped();
  trace_sink_unlock();
  trace_sink_stop();
  printf("shop_traces: stopped (%lu requests, %lu refused, %lu spans dropped)\n", posts, bad,
         dropped);
  return 0;
}
