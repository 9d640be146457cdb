/*
 * A small HTTP client for the shop's API (docs/shop.md), used by the demo program
 * and the end-to-end tests: JSON requests and responses (jansson) over libcurl with an
 * optional bearer token, and a reader of the purchase result stream (Server-Sent Events) that
 * runs its transfer on a background thread and queues the events it receives.
 *
 * Threading: a shop_client is used by one thread at a time (give each thread its own). A
 * shop_events may be read from any thread; its transfer runs on a thread of its own. Call
 * shop_client_global_init() once, before any thread starts (it wraps curl_global_init).
 */
#ifndef SHOP_CLIENT_H
#define SHOP_CLIENT_H

#include <jansson.h>
#include <stddef.h>

/* ---- plain requests ------------------------------------------------------------------------ */

typedef struct shop_client shop_client;

/* One answer. status is the HTTP status, or 0 when no answer came (err says why). json is the
 * body parsed as JSON (any type), or NULL when the body is empty or not JSON. Owned by the
 * caller: release with shop_resp_destroy(). */
typedef struct shop_resp {
  long status;
  json_t *json;
  char *body; /* NUL-terminated (the body may itself hold NULs; len is exact) */
  size_t len;
  char err[256];
} shop_resp;

/* Per-request options for shop_client_send(). Zero-initialise, then set what you need. */
typedef struct shop_send_opts {
  const char *body; /* raw body (sent as is), or NULL for none */
  size_t body_len;
  const char *content_type; /* defaults to application/json when a body is given */
  /* The Authorization header: NULL uses the client's token (if any), "" sends none, anything
   * else is sent verbatim as the header value (e.g. "Bearer x.y.z" or "Basic ..."). */
  const char *authorization;
  const char *const *headers; /* extra "Name: value" lines, NULL-terminated list, or NULL */
} shop_send_opts;

/* Calls curl_global_init; call once per process before threads start. 0 or -1. */
int shop_client_global_init(void);
void shop_client_global_cleanup(void);

/* A client for base_url (e.g. "http://127.0.0.1:8080", copied). *out set only on success;
 * returns 0 or -1. */
int shop_client_new(shop_client **out, const char *base_url);
/* Frees c (NULL allowed). */
void shop_client_free(shop_client *c);
/* Sets the bearer token sent with every request (copied; NULL clears it). */
void shop_client_set_token(shop_client *c, const char *token);
/* The current token, or NULL; valid until the next set_token or free. */
const char *shop_client_token(const shop_client *c);
const char *shop_client_url(const shop_client *c);
/* The time limit of each request in milliseconds (default 30000). */
void shop_client_set_timeout(shop_client *c, long ms);

/* Sends method path (path begins with '/', may carry a query string) with opts (NULL: no body,
 * the client's token). Fills *out (always initialised, even on failure); returns the HTTP
 * status, or 0 when no answer came. */
long shop_client_send(shop_client *c, const char *method, const char *path,
                      const shop_send_opts *opts, shop_resp *out);

/* The common case: sends body (borrowed; NULL for none) as JSON with the client's token and
 * returns the status (0 when no answer came). If json_out is not NULL it receives the parsed
 * answer (owned by the caller; NULL if none). */
long shop_call(shop_client *c, const char *method, const char *path, const json_t *body,
               json_t **json_out);

void shop_resp_destroy(shop_resp *r);

/* ---- the result stream --------------------------------------------------------------------- */

typedef struct shop_events shop_events;

/* Opens GET path on base_url with "Accept: text/event-stream" and the bearer token (NULL for
 * none) and starts reading it on a background thread. Events of type "data" whose data parses
 * as a JSON object are queued. Returns 0 (with *out set) or -1. */
int shop_events_open(shop_events **out, const char *base_url, const char *path, const char *token);
/* Waits up to timeout_ms for the answer's status line and headers; returns the HTTP status
 * (200 once the stream is open), or 0 on timeout or when no answer came. */
long shop_events_wait_open(shop_events *s, int timeout_ms);
/* Takes the next queued event (owned by the caller), waiting up to timeout_ms; NULL on timeout
 * or when the stream has ended and the queue is empty. */
json_t *shop_events_next(shop_events *s, int timeout_ms);
/* 1 once the transfer has ended (the server closed the stream, or an error), else 0. */
int shop_events_ended(shop_events *s);
/* How many events of any type and comment lines were received so far. */
size_t shop_events_received(shop_events *s);
/* Stops the transfer, joins the thread and frees s with its queue (NULL allowed). */
void shop_events_close(shop_events *s);

/* ---- helpers on the saga's statuses -------------------------------------------------------- */

/* The steps of the purchase saga in order, as streamed. */
extern const char *const shop_steps[3];

/* A purchase id (a JSON integer or string) as text into buf; returns buf ("?" if neither). */
const char *shop_id_str(const json_t *id, char *buf, size_t n);

/* The outcome of one purchase given the statuses streamed for it so far. */
typedef enum shop_outcome {
  SHOP_PENDING = 0,  /* not final yet */
  SHOP_SUCCEEDED,    /* CREATE_PAYMENT STATUS_SUCCESS */
  SHOP_COMPENSATED,  /* STATUS_FAILED at one step, STATUS_ROLLBACKED for every earlier one */
  SHOP_ROLLBACK_FAIL /* STATUS_FAILED and, for the earlier steps, ROLLBACKED or ROLLBACK_FAIL
                        with at least one ROLLBACK_FAIL */
} shop_outcome;

/* Tracks the streamed statuses of one purchase. */
typedef struct shop_track {
  char id[64];
  json_t *events;  /* array of the events received for it, in order (owned) */
  int failed_step; /* -1 until a STATUS_FAILED */
  int done[3];     /* per step: 0, or 1 rolled back, 2 rollback failed */
  int succeeded;
} shop_track;

void shop_track_init(shop_track *t, const char *id);
void shop_track_destroy(shop_track *t);
/* Adds one event (borrowed) for this purchase. */
void shop_track_add(shop_track *t, const json_t *ev);
shop_outcome shop_track_outcome(const shop_track *t);
const char *shop_outcome_name(shop_outcome o);

/* Milliseconds of a monotonic clock. */
long long shop_now_ms(void);

#endif
