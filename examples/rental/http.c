/*
 * HTTP for the rental services (http.h): libmicrohttpd in external-epoll mode, polled from the
 * libuv loop (a uv_poll_t on MHD's epoll descriptor, a uv_timer_t for its timeouts).
 */
#include "http.h"

#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct rental_req {
  rental_http *h;
  struct MHD_Connection *conn;
  char method[16];
  char *path;
  char *body;
  size_t body_len;
  int too_big, dispatched, suspended, parsed;
  json_t *json;
  struct MHD_Response *resp;
  unsigned status;
  rental_req **watch; /* a pending answer's pointer to this request */
  rental_req *prev, *next;
};

struct rental_http {
  struct MHD_Daemon *d;
  uv_poll_t poll;
  uv_timer_t timer;
  rental_handler fn;
  void *arg;
  rental_req *live;
  int stopping;
};

static void timer_cb(uv_timer_t *t);

static void run_mhd(rental_http *h) {
  MHD_run(h->d);
  MHD_UNSIGNED_LONG_LONG ms;
  if (!h->stopping && MHD_get_timeout(h->d, &ms) == MHD_YES)
    uv_timer_start(&h->timer, timer_cb, ms, 0);
}

static void timer_cb(uv_timer_t *t) { run_mhd(t->data); }

static void poll_cb(uv_poll_t *p, int status, int events) {
  (void)status;
  (void)events;
  run_mhd(p->data);
}

const char *rental_req_method(const rental_req *r) { return r->method; }
const char *rental_req_path(const rental_req *r) { return r->path; }

json_t *rental_req_json(rental_req *r) {
  if (!r->parsed) {
    r->parsed = 1;
    json_error_t e;
    r->json = r->body_len > 0 ? json_loadb(r->body, r->body_len, 0, &e) : NULL;
    if (r->json != NULL && !json_is_object(r->json)) {
      json_decref(r->json);
      r->json = NULL;
    }
  }
  return r->json;
}

void rental_req_watch(rental_req *r, rental_req **slot) { r->watch = slot; }

void rental_http_reply(rental_req *r, unsigned status, json_t *body) {
  if (r->resp != NULL) {
    json_decref(body);
    return;
  }
  char *text = json_dumps(body != NULL ? body : json_object(), JSON_COMPACT);
  json_decref(body);
  size_t n = text != NULL ? strlen(text) : 0;
  r->resp = MHD_create_response_from_buffer(n, text != NULL ? text : (char *)"",
                                            MHD_RESPMEM_MUST_COPY);
  free(text);
  if (r->resp != NULL) MHD_add_response_header(r->resp, "Content-Type", "application/json");
  r->status = status;
  r->watch = NULL;
  if (r->suspended) {
    r->suspended = 0;
    MHD_resume_connection(r->conn);
    if (!r->h->stopping) uv_timer_start(&r->h->timer, timer_cb, 0, 0);
  }
}

void rental_http_error(rental_req *r, unsigned status, const char *msg) {
  rental_http_reply(r, status, json_pack("{s:s}", "error", msg));
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
  rental_http *h = cls;
  rental_req *r = *con_cls;
  (void)version;
  if (r == NULL) {
    r = calloc(1, sizeof *r);
    if (r == NULL) return MHD_NO;
    r->h = h;
    r->conn = conn;
    snprintf(r->method, sizeof r->method, "%s", method);
    r->path = strdup(url);
    if (r->path == NULL) {
      free(r);
      return MHD_NO;
    }
    r->next = h->live;
    if (h->live) h->live->prev = r;
    h->live = r;
    *con_cls = r;
    return MHD_YES;
  }
  if (*upload_size > 0) {
    if (!r->too_big && r->body_len + *upload_size <= RENTAL_MAX_BODY) {
      char *p = realloc(r->body, r->body_len + *upload_size + 1);
      if (p == NULL) return MHD_NO;
      r->body = p;
      memcpy(r->body + r->body_len, upload, *upload_size);
      r->body_len += *upload_size;
      r->body[r->body_len] = '\0';
    } else {
      r->too_big = 1;
    }
    *upload_size = 0;
    return MHD_YES;
  }
  if (!r->dispatched) {
    r->dispatched = 1;
    if (h->stopping) rental_http_error(r, 503, "shutting down");
    else if (r->too_big) rental_http_error(r, 413, "request body too large (at most 4096 bytes)");
    else h->fn(r, h->arg);
  }
  if (r->resp == NULL) {
    r->suspended = 1; /* answered later, after a commit */
    MHD_suspend_connection(conn);
    return MHD_YES;
  }
  enum MHD_Result ret = MHD_queue_response(conn, r->status, r->resp);
  MHD_destroy_response(r->resp);
  r->resp = NULL;
  return ret;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
  rental_http *h = cls;
  rental_req *r = *con_cls;
  (void)conn;
  (void)toe;
  if (r == NULL) return;
  if (r->watch != NULL) *r->watch = NULL;
  if (r->prev) r->prev->next = r->next;
  else h->live = r->next;
  if (r->next) r->next->prev = r->prev;
  if (r->resp) MHD_destroy_response(r->resp);
  json_decref(r->json);
  free(r->body);
  free(r->path);
  free(r);
  *con_cls = NULL;
}

int rental_http_start(rental_http **out, uv_loop_t *loop, const char *host_port,
                      rental_handler fn, void *arg) {
  char host[64];
  const char *colon = strrchr(host_port, ':');
  if (colon == NULL || (size_t)(colon - host_port) >= sizeof host) return -1;
  snprintf(host, sizeof host, "%.*s", (int)(colon - host_port), host_port);
  struct sockaddr_in a;
  if (uv_ip4_addr(host, atoi(colon + 1), &a) != 0) return -1;
  rental_http *h = calloc(1, sizeof *h);
  if (h == NULL) return -1;
  h->fn = fn;
  h->arg = arg;
  h->d = MHD_start_daemon(MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG, 0, NULL,
                          NULL, on_request, h, MHD_OPTION_SOCK_ADDR, &a,
                          MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                          MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)60, MHD_OPTION_END);
  if (h->d == NULL) {
    free(h);
    return -1;
  }
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD);
  uv_poll_init(loop, &h->poll, di->epoll_fd);
  h->poll.data = h;
  uv_poll_start(&h->poll, UV_READABLE, poll_cb);
  uv_timer_init(loop, &h->timer);
  h->timer.data = h;
  *out = h;
  run_mhd(h);
  return 0;
}

static void closed(uv_handle_t *hd) {
  rental_http *h = hd->data;
  if (--h->stopping == 0) free(h);
}

void rental_http_stop(rental_http *h) {
  if (h == NULL) return;
  h->stopping = 1;
  MHD_quiesce_daemon(h->d);
  for (rental_req *r = h->live; r != NULL; r = r->next)
    if (r->dispatched && r->resp == NULL && r->suspended) rental_http_error(r, 503, "shutting down");
  MHD_run(h->d);
  uv_poll_stop(&h->poll); /* before MHD closes the descriptor it watches */
  uv_timer_stop(&h->timer);
  MHD_stop_daemon(h->d); /* completes (and frees) every request */
  h->stopping = 2;
  uv_close((uv_handle_t *)&h->poll, closed);
  uv_close((uv_handle_t *)&h->timer, closed);
}
