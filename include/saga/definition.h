/**
 * @file
 * libsaga — saga definitions: a named, versioned table of steps.
 *
 * Order rule (checked by saga_definition_validate() and at registration): zero or more
 * COMPENSATABLE steps, then at most one PIVOT, then zero or more RETRIABLE steps.
 * A RETRIABLE step is retried until it succeeds and is never compensated; once the saga
 * reaches the pivot or the first retriable step it can no longer be cancelled. Pivot and
 * retriable steps have no compensation.
 *
 * A step is run either by a participant reachable on `channel`, or by `local_action` /
 * `local_compensation`, functions run on the orchestrator's own node (with the same
 * exactly-once and tombstone rules as a remote participant).
 */
#ifndef SAGA_DEFINITION_H
#define SAGA_DEFINITION_H

#include "common.h"
#include "participant.h"

#ifdef __cplusplus
extern "C" {
#endif

/** What a step is in the saga's plan: steps run in the order compensatable*, pivot (at most
 * one), retriable*. */
typedef enum saga_step_kind {
  SAGA_STEP_COMPENSATABLE = 0, /**< default; undone by its compensation on failure */
  SAGA_STEP_PIVOT = 1,         /**< the go/no-go step; once it succeeds the saga goes forward */
  SAGA_STEP_RETRIABLE = 2      /**< after the pivot; retried until it succeeds */
} saga_step_kind;

/**
 * Retry policy of a step (also used for its compensation). All zero means: one attempt, no
 * retry. Delay before attempt n+1 = min(cap_ms, backoff_ms * multiplier^(n-1)), then reduced
 * by a random fraction up to `jitter` (0..1).
 */
typedef struct saga_retry {
  uint32_t max_attempts;  /**< attempts of the action before giving up; 0 means 1 */
  uint32_t backoff_ms;    /**< delay before the 2nd attempt; 0 means 100 ms */
  double multiplier;      /**< growth per attempt; 0 means 2 */
  uint32_t cap_ms;        /**< largest delay; 0 means 30 s */
  double jitter;          /**< 0..1, fraction of the delay randomised away */
  int retry_before_compensate; /**< a business failure of the action is retried (up to
                                    max_attempts) instead of compensating at once; timeouts
                                    are always retried up to max_attempts */
} saga_retry;

/** A step's reply timeout when its timeout_ms is 0: one minute. A message to a channel nobody
 * serves (a typo) then fails the step after its retries instead of leaving the saga RUNNING
 * for good. */
#define SAGA_STEP_TIMEOUT_DEFAULT_MS 60000u
/** timeout_ms that waits for a reply forever. */
#define SAGA_STEP_NO_TIMEOUT UINT32_MAX

/**
 * One step. Strings are borrowed by the table and copied at registration. Fields are only
 * ever appended; saga_definition.step_size tells the library the size the caller's table was
 * built with (docs/abi.md). saga_retry, embedded by value, never grows.
 */
typedef struct saga_step {
  const char *name;         /**< shown in events and history, e.g. "CREATE_ORDER"; required */
  const char *channel;      /**< participant channel; NULL when local_action is set */
  const char *action;       /**< command name; required for a channel step */
  const char *compensation; /**< compensation command; NULL = nothing to undo */
  saga_step_kind kind;      /**< SAGA_STEP_COMPENSATABLE (0, the default), PIVOT or
                                 RETRIABLE */
  saga_retry retry;         /**< retries of the action; all zero = one attempt */
  uint32_t timeout_ms;      /**< reply timeout of one attempt; 0 = the default,
                                 SAGA_STEP_TIMEOUT_DEFAULT_MS; SAGA_STEP_NO_TIMEOUT = wait
                                 forever (a step whose channel nobody serves then waits for
                                 good: ask for it only when something else ends the wait) */
  saga_handler local_action;       /**< run on this node instead of a channel */
  saga_handler local_compensation; /**< its compensation, or NULL */
  void *local_arg;                 /**< passed to the local handlers */
  /** Retry policy of the compensation. All zero (the default) = the action's policy with at
   * least 3 attempts. Compensations should be retried for as long as a participant can be
   * down: max_attempts = SAGA_RETRY_FOREVER never gives up (the saga never becomes FAILED
   * through this step); otherwise, once the attempts are spent, the saga is FAILED and waits
   * for an operator (saga_retry_failed). retry_before_compensate is ignored here. */
  saga_retry compensation_retry;
} saga_step;

/** max_attempts that never gives up (for compensation_retry and retriable steps). */
#define SAGA_RETRY_FOREVER UINT32_MAX

/** Version 2 appended step_size. */
#define SAGA_DEFINITION_VERSION 2

/** A definition as a static table. Copied at registration; the table need not outlive it. */
typedef struct saga_definition {
  int struct_version;     /**< SAGA_DEFINITION_VERSION; 0 is taken as 1 */
  const char *name;       /**< required, 1..128 bytes */
  uint32_t version;       /**< >= 1; instances finish on the version they started with */
  const saga_step *steps;  /**< the steps in order, step_size bytes apart */
  size_t nsteps;          /**< 1..255 */
  uint32_t deadline_ms;   /**< whole-saga deadline before the pivot; 0 = none. Reached
                               before the pivot succeeded, the saga is compensated. */
  /* ---- struct_version 2 ---- */
  /**
   * The distance in bytes between two steps of `steps`: sizeof(saga_step) as the caller
   * compiled it. 0 (and every version-1 definition) = the first saga_step layout, the one of
   * this header. A table built with an older, shorter saga_step is read field by field up to
   * its size, the later fields taking their defaults; a larger value (each step the first
   * member of a bigger struct of the caller's) skips the bytes after the saga_step.
   */
  size_t step_size;
} saga_definition;

/**
 * Checks a definition: names present, kinds ordered, channel/action or local_action set,
 * pivots and retriable steps without compensation. On failure writes a sentence into
 * err (errlen bytes, may be 0) and returns SAGA_EDEFINITION (SAGA_EINVAL for a NULL def).
 */
SAGA_EXTERN int saga_definition_validate(const saga_definition *def, char *err, size_t errlen);

/**
 * A run-time builder for the same thing, for language bindings: no structs by value, no
 * variadic calls. The builder owns copies of all strings. Opaque.
 */
typedef struct saga_def_builder saga_def_builder;

/** Starts a definition. SAGA_EINVAL for a NULL/empty name or version 0; SAGA_ENOMEM. */
SAGA_EXTERN int saga_def_builder_new(saga_def_builder **out, const char *name, uint32_t version,
                                     const saga_allocator *alloc);
/** Frees the builder. Accepts NULL. */
SAGA_EXTERN void saga_def_builder_free(saga_def_builder *b);
/** Appends a channel step; compensation may be NULL. Returns the new step's index (>= 0) or
 * a negative error. */
SAGA_EXTERN int saga_def_builder_add_step(saga_def_builder *b, const char *name,
                                          const char *channel, const char *action,
                                          const char *compensation, int kind);
/** Appends a local step. Returns its index or a negative error. */
SAGA_EXTERN int saga_def_builder_add_local_step(saga_def_builder *b, const char *name,
                                                saga_handler action, saga_handler compensation,
                                                void *arg, int kind);
/** Sets the retry policy of step `index`. SAGA_EINVAL for a bad index or values. */
SAGA_EXTERN int saga_def_builder_set_retry(saga_def_builder *b, int index, uint32_t max_attempts,
                                           uint32_t backoff_ms, double multiplier,
                                           uint32_t cap_ms, double jitter,
                                           int retry_before_compensate);
/** Sets the compensation's retry policy of step `index` (see saga_step.compensation_retry).
 * SAGA_EINVAL for a bad index or values. */
SAGA_EXTERN int saga_def_builder_set_compensation_retry(saga_def_builder *b, int index,
                                                        uint32_t max_attempts,
                                                        uint32_t backoff_ms, double multiplier,
                                                        uint32_t cap_ms, double jitter);
/** Sets the timeout of step `index`. */
SAGA_EXTERN int saga_def_builder_set_timeout(saga_def_builder *b, int index, uint32_t timeout_ms);
/** Sets the whole-saga deadline. */
SAGA_EXTERN int saga_def_builder_set_deadline(saga_def_builder *b, uint32_t deadline_ms);
/**
 * The definition being built, borrowed until the next builder call or free. Pass it to
 * saga_node_register() (which copies it).
 */
SAGA_EXTERN const saga_definition *saga_def_builder_definition(const saga_def_builder *b);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_DEFINITION_H */
