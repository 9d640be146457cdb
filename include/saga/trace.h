/*
 * libsaga — W3C trace context and spans.
 *
 * Every saga belongs to one trace (W3C Trace Context, https://www.w3.org/TR/trace-context/).
 * Its trace id is the caller's, when the saga was started with saga_start_traced() and a
 * `traceparent`, or inherited from the handler that started it with saga_tx_start();
 * otherwise it is the saga id (32 hex digits). Every message carries a `traceparent` header:
 *
 *   commands  00-<trace id>-<span of the step attempt that sent it>-<flags>
 *   replies   00-<trace id>-<span of the participant's handler run>-<flags>
 *   events    00-<trace id>-<span of the saga>-<flags>   (cfg.event_channel)
 *
 * A handler reads the command's header with saga_msg_header(cmd, "traceparent") (its span id
 * is the step attempt's), and the context of its own run with saga_msg_traceparent(cmd) (its
 * span id is the handler's span): pass that one on to calls the handler makes. A saga the
 * handler starts with saga_tx_start() is a child of the handler's span, in the same trace.
 * A malformed header from the network is never used: the handler's span then starts a trace
 * of the saga's own (trace id = the saga id) and the reply carries that.
 *
 * Spans: with saga_node_config.on_span set, a node reports the start and the end of
 *  - the saga as a whole (SAGA_SPAN_SAGA, orchestrator): the trace's root, or a child of the
 *    caller's span; it ends when the saga reaches a terminal state;
 *  - each attempt of a step's action (SAGA_SPAN_STEP), compensation (SAGA_SPAN_COMPENSATION)
 *    or pivot resolution (SAGA_SPAN_RESOLVE), orchestrator: from the commit that sent the
 *    command to the one that recorded its outcome (reply, timeout, cancel); children of the
 *    saga's span;
 *  - each handler run (SAGA_SPAN_HANDLER), participant: a child of the step attempt named by
 *    the command's traceparent.
 * docs/operating.md ("Tracing") has the details and how to export them (the example shop
 * sends them to an OpenTelemetry collector with OTLP/HTTP).
 */
#ifndef SAGA_TRACE_H
#define SAGA_TRACE_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Length of a traceparent of version 00: "00-" 32 hex "-" 16 hex "-" 2 hex. */
#define SAGA_TRACEPARENT_LEN 55

/**
 * Checks a W3C traceparent strictly: version "00", a trace id of 32 lowercase hex digits not
 * all zero, a parent span id of 16 lowercase hex digits not all zero, two hex digits of flags,
 * nothing before or after (55 characters). Returns SAGA_OK, or SAGA_EINVAL (NULL or
 * malformed; why, when not NULL, gets a static sentence saying what is wrong). Use it to
 * drop a malformed header from a caller (the W3C rule: start a new trace) instead of having
 * saga_start_traced() refuse the start.
 */
SAGA_EXTERN int saga_traceparent_check(const char *traceparent, const char **why);

/** What a span stands for. */
typedef enum saga_span_kind {
  SAGA_SPAN_SAGA = 1,         /**< the saga as a whole (orchestrator) */
  SAGA_SPAN_STEP = 2,         /**< one attempt of a step's action (orchestrator) */
  SAGA_SPAN_COMPENSATION = 3, /**< one attempt of a step's compensation (orchestrator) */
  SAGA_SPAN_RESOLVE = 4,      /**< one attempt of asking whether the pivot applied */
  SAGA_SPAN_HANDLER = 5       /**< one run of a participant's handler */
} saga_span_kind;

/** How a span ended (SAGA_SPAN_UNSET while it runs). */
typedef enum saga_span_status {
  SAGA_SPAN_UNSET = 0,
  SAGA_SPAN_OK = 1,
  SAGA_SPAN_ERROR = 2,  /**< a technical failure: error text, timeout, cancel, saga FAILED */
  SAGA_SPAN_REFUSED = 3 /**< a business refusal (SAGA_EREFUSED); for a saga: COMPENSATED */
} saga_span_status;

/** Which end of a span a report is about. */
typedef enum saga_span_event {
  SAGA_SPAN_START = 1, /**< end_ns, status and error are not set yet */
  SAGA_SPAN_END = 2
} saga_span_event;

/**
 * One report to saga_node_config.on_span. Allocated by the library and read-only; every
 * pointer is borrowed for the duration of the call (copy what you keep). It grows by appended
 * fields (docs/abi.md): never copy it by value or allocate one.
 */
typedef struct saga_span {
  saga_span_event event;      /**< SAGA_SPAN_START or SAGA_SPAN_END */
  saga_span_kind kind;        /**< what the span covers (saga, step, compensation, ...) */
  const char *trace_id;       /**< 32 lowercase hex digits */
  const char *span_id;        /**< 16 lowercase hex digits, from the node's CSPRNG */
  const char *parent_span_id; /**< 16 hex digits, or "" for a root span */
  uint8_t flags;              /**< W3C trace flags (bit 0: sampled) */
  /** "purchase" (saga), "purchase/product.reserve" (step), "purchase/compensate
   * product.reserve", "purchase/resolve payment.charge", "product.reserve" (handler: the
   * command's name). */
  const char *name;
  const char *saga_id;        /**< the saga this span belongs to */
  const char *definition;     /**< definition name; "" on a participant */
  int step;                   /**< step index; -1 for the saga's span */
  uint32_t attempt;           /**< attempt number; 0 for the saga's span */
  uint64_t start_ns;          /**< unix time in ns (the node's clock: a manual clock's ms x 10^6) */
  uint64_t end_ns;            /**< SAGA_SPAN_END only, else 0 */
  saga_span_status status;    /**< SAGA_SPAN_END only */
  const char *error;          /**< why, for ERROR and REFUSED; "" otherwise */
} saga_span;

/** Name of a span kind ("saga", "step", "compensation", "resolve", "handler"), "unknown". */
SAGA_EXTERN const char *saga_span_kind_name(int kind);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_TRACE_H */
