/*
 * A small HTTP server for the rental services: libmicrohttpd driven by the service's libuv loop
 * (external epoll), so that request handlers run on the loop thread and may call libsaga
 * directly. A handler answers at once or later (after its transaction committed): the
 * connection waits, suspended, until rental_http_reply().
 */
#ifndef RENTAL_HTTP_H
#define RENTAL_HTTP_H

#include <jansson.h>
#include <stddef.h>
#include <uv.h>

/* Request bodies above this are refused with 413 (the commands are a few short strings). */
#define RENTAL_MAX_BODY 4096

typedef struct rental_http rental_http;
typedef struct rental_req rental_req;

/* Handles one request; answers with rental_http_reply() now or later. */
typedef void (*rental_handler)(rental_req *r, void *arg);

int rental_http_start(rental_http **out, uv_loop_t *loop, const char *host_port,
                      rental_handler fn, void *arg);
/* Answers every waiting request 503 and stops; the loop then releases the handles. */
void rental_http_stop(rental_http *h);

const char *rental_req_method(const rental_req *r);
const char *rental_req_path(const rental_req *r);
/* The body as a JSON object, or NULL (no body, not JSON, not an object). */
json_t *rental_req_json(rental_req *r);
/* A later answer: *slot is set to NULL if the request goes away first (shutdown). */
void rental_req_watch(rental_req *r, rental_req **slot);
/* Answers with body (a reference is taken over; NULL: an empty object). */
void rental_http_reply(rental_req *r, unsigned status, json_t *body);
/* Answers {"error": msg}. */
void rental_http_error(rental_req *r, unsigned status, const char *msg);

#endif
