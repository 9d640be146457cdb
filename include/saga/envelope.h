/**
 * @file
 * libsaga — the message envelope and its msgpack codec.
 *
 * Every message libsaga sends is one envelope, encoded as a msgpack array:
 *   [ version, kind, msg_id, saga_id, step, attempt, phase, name, reply_to, status, error,
 *     headers{str:str}, payload(bin) ]
 * version is SAGA_ENVELOPE_VERSION. The decoder refuses anything else with SAGA_EMALFORMED,
 * SAGA_ETOOBIG or SAGA_EVERSION and a sentence saying what was wrong: input over the size
 * limit, truncated input, trailing bytes, a wrong type or arity, nesting where none belongs,
 * strings over the string limit, an unknown version, kind or phase.
 *
 * Adapters never need this header: they move opaque bytes. It is public for tools (the
 * inspector, bindings, tests) that read messages themselves.
 */
#ifndef SAGA_ENVELOPE_H
#define SAGA_ENVELOPE_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The wire envelope's version: encoded in every message, and a decoder refuses others
 * (SAGA_EVERSION). Versioned separately from the library (docs/abi.md). */
#define SAGA_ENVELOPE_VERSION 1

/** What a message is. */
typedef enum saga_msg_kind {
  SAGA_MSG_COMMAND = 1, /**< orchestrator to participant: run an action or compensation */
  SAGA_MSG_REPLY = 2,   /**< participant to orchestrator: the outcome of a command */
  SAGA_MSG_EVENT = 3    /**< a saga's transition, published to an event channel */
} saga_msg_kind;

/** Which side of a step a command (and its reply) is about. */
typedef enum saga_phase {
  SAGA_PHASE_ACTION = 0,       /**< the step's action */
  SAGA_PHASE_COMPENSATION = 1, /**< the step's compensation, undoing its action */
  SAGA_PHASE_RESOLVE = 2 /**< "did the pivot's action apply?" asked after its timeouts */
} saga_phase;

/** One header entry of a message (e.g. W3C trace context). Frozen (docs/abi.md). */
typedef struct saga_header {
  const char *name;  /**< header name, NUL-terminated */
  const char *value; /**< header value, NUL-terminated */
} saga_header;

/**
 * A message. For encoding, the caller fills it with borrowed pointers (NULL strings encode
 * as empty). A decoded envelope owns all of its memory in one block: strings are
 * NUL-terminated, the payload pointer is valid until saga_envelope_free().
 */
typedef struct saga_envelope {
  uint32_t version;     /**< SAGA_ENVELOPE_VERSION */
  saga_msg_kind kind;   /**< command, reply or event */
  const char *msg_id;   /**< unique per saga, step, phase and attempt; a reply's is its
                             command's followed by "/r" */
  const char *saga_id;  /**< the saga the message belongs to (32 hex digits) */
  uint32_t step;        /**< index of the step in the saga's definition */
  uint32_t attempt;     /**< attempt number of the step's action or compensation */
  saga_phase phase;     /**< action, compensation or resolve */
  const char *name;     /**< command name (commands), definition name (events) */
  const char *reply_to; /**< channel to send the reply to (commands) */
  int32_t status;       /**< replies: 0 success, otherwise a SAGA_E* code */
  const char *error;    /**< replies: failure reason, "" on success */
  const saga_header *headers; /**< nheaders header entries (may be NULL when 0) */
  size_t nheaders;      /**< number of entries in headers */
  const void *payload;  /**< msgpack map of saga data (see data.h), may be empty */
  size_t payload_len;   /**< bytes at payload */
} saga_envelope;

/**
 * Encodes env into a buffer allocated with alloc (NULL = libc). On SAGA_OK, *out / *outlen
 * hold the bytes; free them with saga_free(alloc, *out). Returns SAGA_EINVAL for NULL
 * arguments or a kind/phase out of range, SAGA_ENOMEM.
 */
SAGA_EXTERN int saga_envelope_encode(const saga_envelope *env, const saga_allocator *alloc,
                                     void **out, size_t *outlen);

/**
 * Decodes len bytes at buf under the limits lim (NULL = defaults). On SAGA_OK sets *out to
 * a new envelope owned by the caller (saga_envelope_free()). On failure *out is untouched
 * and a sentence is written to err (errlen bytes; err may be NULL).
 */
SAGA_EXTERN int saga_envelope_decode(const void *buf, size_t len, const saga_limits *lim,
                                     const saga_allocator *alloc, saga_envelope **out,
                                     char *err, size_t errlen);

/** Frees a decoded envelope. Accepts NULL. */
SAGA_EXTERN void saga_envelope_free(saga_envelope *env);

/** Looks a header up in an envelope; NULL when absent. */
SAGA_EXTERN const char *saga_envelope_header(const saga_envelope *env, const char *name);

/** Frees memory that libsaga returned through `alloc` (NULL = libc). Accepts NULL ptr. */
SAGA_EXTERN void saga_free(const saga_allocator *alloc, void *ptr);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_ENVELOPE_H */
