/*
 * HTTP for the shop: libmicrohttpd in "external epoll" mode, driven by the libuv loop (a
 * uv_poll_t on MHD's epoll descriptor and a uv_timer_t for its timeouts), so that route
 * handlers run on the loop thread and may call libsaga directly. A handler that cannot
 * answer at once (it waits for a saga's commit) leaves the connection suspended until it
 * replies; Server-Sent Events streams suspend while they have nothing to send.
 */
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

#include "shop.h"

#define MAX_PARAMS 4

typedef struct route {
  char *method;
  char *pattern;
  shop_handler fn;
  void *arg;
} route;

struct shop_http {
  struct MHD_Daemon *d;
  uv_loop_t *loop;
  uv_poll_t poll;
  uv_timer_t timer;
  route *routes;
  size_t nroutes;
  int port;
  shop_req *live; /* requests not yet completed (to answer or close at stop) */
  int stopping;
  uint64_t answered[SHOP_HTTP_CODES]; /* answers by status code - 100 (for /metrics) */
};

struct shop_sse {
  shop_http *h;
  shop_req *r; /* NULL once the request completed */
  struct MHD_Connection *conn;
  char *buf;
  size_t len, cap;
  int suspended, closed, notified;
  void (*on_close)(shop_sse *, void *);
  void *arg;
};

struct shop_req {
  shop_http *h;
  struct MHD_Connection *conn;
  char method[16];
  char *path;
  char *body;
  size_t body_len;
  int too_big, dispatched, suspended;
  json_t *json;
  int json_parsed;
  char *params[MAX_PARAMS];
  struct MHD_Response *resp;
  unsigned status;
  shop_sse *sse;
  shop_req *prev, *next;
};

static void timer_cb(uv_timer_t *t);

static void kick(shop_http *h) {
  if (!h->stopping) uv_timer_start(&h->timer, timer_cb, 0, 0);
}

/* ---- driving MHD from libuv --------------------------------------------------------------- */

static void run_mhd(shop_http *h) {
  MHD_run(h->d);
  MHD_UNSIGNED_LONG_LONG ms;
  if (MHD_get_timeout(h->d, &ms) == MHD_YES) uv_timer_start(&h->timer, timer_cb, ms, 0);
}

static void timer_cb(uv_timer_t *t) { run_mhd((shop_http *)t->data); }
static void poll_cb(uv_poll_t *p, int status, int events) { run_mhd((shop_http *)p->data); }

/* ---- responses ---------------------------------------------------------------------------- */

static void set_response(shop_req *r, unsigned status, struct MHD_Response *resp) {
  if (r->resp != NULL || resp == NULL) {
    if (resp != NULL) MHD_destroy_response(resp);
    return;
  }
  r->resp = resp;
  r->status = status;
  if (status >= 100 && status < 100 + SHOP_HTTP_CODES) r->h->answered[status - 100]++;
  if (r->suspended) {
    r->suspended = 0;
    MHD_resume_connection(r->conn);
    kick(r->h);
  }
}

static struct MHD_Response *make_body(const char *type, const char *body, size_t len) {
  struct MHD_Response *resp =
      MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
  if (resp != NULL && type != NULL) MHD_add_response_header(resp, "Content-Type", type);
  return resp;
}

void shop_reply_text(shop_req *r, int status, const char *content_type, const char *body) {
  set_response(r, (unsigned)status, make_body(content_type, body, body ? strlen(body) : 0));
}

void shop_reply_json(shop_req *r, int status, json_t *body) {
  char *text = body != NULL ? json_dumps(body, JSON_COMPACT) : NULL;
  json_decref(body);
  set_response(r, (unsigned)status,
               make_body("application/json", text ? text : "", text ? strlen(text) : 0));
  free(text);
}

void shop_reply_error(shop_req *r, int status, const char *msg) {
  shop_reply_json(r, status, json_pack("{s:s}", "msg", msg));
}

/* ---- Server-Sent Events ------------------------------------------------------------------- */

static ssize_t sse_read(void *cls, uint64_t pos, char *buf, size_t max) {
  shop_sse *s = cls;
  (void)pos;
  if (s->closed) return MHD_CONTENT_READER_END_OF_STREAM;
  if (s->len == 0) {
    /* Nothing to send: park the connection until shop_sse_send() has something. */
    s->suspended = 1;
    MHD_suspend_connection(s->conn);
    return 0;
  }
  size_t n = s->len < max ? s->len : max;
  memcpy(buf, s->buf, n);
  memmove(s->buf, s->buf + n, s->len - n);
  s->len -= n;
  return (ssize_t)n;
}

static void sse_notify(shop_sse *s) {
  if (!s->notified) {
    s->notified = 1;
    s->closed = 1;
    if (s->on_close) s->on_close(s, s->arg);
  }
}

/* The response is destroyed when the connection ends: the stream is over. */
static void sse_free(void *cls) {
  shop_sse *s = cls;
  sse_notify(s);
  free(s->buf);
  free(s);
}

shop_sse *shop_reply_sse(shop_req *r, void (*on_close)(shop_sse *, void *), void *arg) {
  shop_sse *s = calloc(1, sizeof *s);
  if (s == NULL) {
    shop_reply_error(r, 500, "out of memory");
    return NULL;
  }
  s->h = r->h;
  s->r = r;
  s->conn = r->conn;
  s->on_close = on_close;
  s->arg = arg;
  struct MHD_Response *resp =
      MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, sse_read, s, sse_free);
  if (resp == NULL) {
    free(s);
    shop_reply_error(r, 500, "out of memory");
    return NULL;
  }
  MHD_add_response_header(resp, "Content-Type", "text/event-stream");
  MHD_add_response_header(resp, "Cache-Control", "no-cache");
  r->sse = s;
  shop_sse_send(s, NULL, NULL); /* a comment line, so that the headers go out now */
  set_response(r, 200, resp);
  return s;
}

int shop_sse_send(shop_sse *s, const char *event, const char *data) {
  if (s == NULL || s->closed) return -1;
  char head[128];
  int hn = event ? snprintf(head, sizeof head, "event: %s\ndata: ", event)
                 : snprintf(head, sizeof head, ":\n\n");
  size_t dn = event && data ? strlen(data) : 0, need = (size_t)hn + dn + 2;
  if (s->len + need > s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 1024;
    while (cap < s->len + need) cap *= 2;
    char *p = realloc(s->buf, cap);
    if (p == NULL) return -1;
    s->buf = p;
    s->cap = cap;
  }
  memcpy(s->buf + s->len, head, (size_t)hn);
  s->len += (size_t)hn;
  if (event) {
    memcpy(s->buf + s->len, data ? data : "", dn);
    memcpy(s->buf + s->len + dn, "\n\n", 2);
    s->len += dn + 2;
  }
  if (s->suspended) {
    s->suspended = 0;
    MHD_resume_connection(s->conn);
    kick(s->h);
  }
  return 0;
}

/* ---- requests ----------------------------------------------------------------------------- */

const char *shop_req_method(const shop_req *r) { return r->method; }
const char *shop_req_path(const shop_req *r) { return r->path; }
const char *shop_req_param(const shop_req *r, int i) {
  return i >= 0 && i < MAX_PARAMS ? r->params[i] : NULL;
}
const char *shop_req_query(const shop_req *r, const char *key) {
  return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, key);
}
const char *shop_req_header(const shop_req *r, const char *name) {
  return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}
const char *shop_req_body(const shop_req *r, size_t *len) {
  if (len) *len = r->body_len;
  return r->body ? r->body : "";
}


json_t *shop_json_object(const char *body, size_t len) {
  if (body == NULL || len == 0) return NULL;
  json_error_t e;
  json_t *j = json_loadb(body, len, 0, &e);
  if (j != NULL && !json_is_object(j)) {
    json_decref(j);
    j = NULL;
  }
  return j;
}

json_t *shop_req_json(shop_req *r) {
  if (!r->json_parsed) {
    r->json_parsed = 1;
    r->json = shop_json_object(r->body, r->body_len);
  }
  return r->json;
}

/* Matches path against pattern; on success fills params (strdup'ed). */
static int match(const char *pattern, const char *path, char **params) {
  int np = 0;
  while (*pattern && *path) {
    if (pattern[0] == '{' && pattern[1] == '}') {
      const char *end = strchr(path, '/');
      size_t n = end ? (size_t)(end - path) : strlen(path);
      if (n == 0 || np >= MAX_PARAMS) return 0;
      params[np++] = strndup(path, n);
      path += n;
      pattern += 2;
      continue;
    }
    if (*pattern != *path) return 0;
    pattern++;
    path++;
  }
  if (*pattern == '\0' && (*path == '\0' || (path[0] == '/' && path[1] == '\0'))) return 1;
  return 0;
}

static void free_params(char **params) {
  for (int i = 0; i < MAX_PARAMS; i++) {
    free(params[i]);
    params[i] = NULL;
  }
}

static void dispatch(shop_http *h, shop_req *r) {
  if (h->stopping) {
    shop_reply_error(r, 503, "shutting down");
    return;
  }
  if (r->too_big) {
    shop_reply_error(r, 413, "request body too large");
    return;
  }
  int path_matched = 0;
  for (size_t i = 0; i < h->nroutes; i++) {
    route *rt = &h->routes[i];
    if (!match(rt->pattern, r->path, r->params)) {
      free_params(r->params);
      continue;
    }
    if (strcmp(rt->method, r->method) != 0) {
      path_matched = 1;
      free_params(r->params);
      continue;
    }
    rt->fn(r, rt->arg);
    return;
  }
  shop_reply_error(r, path_matched ? 405 : 404, path_matched ? "method not allowed" : "not found");
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
  shop_http *h = cls;
  shop_req *r = *con_cls;
  if (r == NULL) {
    r = calloc(1, sizeof *r);
    if (r == NULL) return MHD_NO;
    r->h = h;
    r->conn = conn;
    snprintf(r->method, sizeof r->method, "%s", method);
    r->path = strdup(url);
    r->next = h->live;
    if (h->live) h->live->prev = r;
    h->live = r;
    *con_cls = r;
    return MHD_YES;
  }
  if (*upload_size > 0) {
    if (!r->too_big && r->body_len + *upload_size <= SHOP_MAX_BODY) {
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
    dispatch(h, r);
  }
  if (r->resp == NULL) {
    r->suspended = 1; /* the handler answers later */
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
  shop_http *h = cls;
  shop_req *r = *con_cls;
  if (r == NULL) return;
  if (r->sse != NULL) r->sse->r = NULL;
  if (r->prev)
    r->prev->next = r->next;
  else
    h->live = r->next;
  if (r->next) r->next->prev = r->prev;
  if (r->resp) MHD_destroy_response(r->resp);
  json_decref(r->json);
  free_params(r->params);
  free(r->body);
  free(r->path);
  free(r);
  *con_cls = NULL;
}

int shop_http_route(shop_http *h, const char *method, const char *pattern, shop_handler fn,
                    void *arg) {
  route *p = realloc(h->routes, (h->nroutes + 1) * sizeof *p);
  if (p == NULL) return -1;
  h->routes = p;
  route *rt = &h->routes[h->nroutes++];
  rt->method = strdup(method);
  rt->pattern = strdup(pattern);
  rt->fn = fn;
  rt->arg = arg;
  return 0;
}

int shop_http_start(shop_http **out, uv_loop_t *loop, const char *bind_addr, int port) {
  shop_http *h = calloc(1, sizeof *h);
  if (h == NULL) return -1;
  h->loop = loop;
  struct sockaddr_in a;
  uv_ip4_addr(bind_addr ? bind_addr : "127.0.0.1", port, &a);
  h->d = MHD_start_daemon(MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG, 0, NULL,
                          NULL, on_request, h, MHD_OPTION_SOCK_ADDR, &a,
                          MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                          MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120, MHD_OPTION_END);
  if (h->d == NULL) {
    free(h);
    return -1;
  }
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD);
  const union MHD_DaemonInfo *pi = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
  h->port = pi ? pi->port : port;
  uv_poll_init(loop, &h->poll, di->epoll_fd);
  h->poll.data = h;
  uv_poll_start(&h->poll, UV_READABLE, poll_cb);
  uv_timer_init(loop, &h->timer);
  h->timer.data = h;
  *out = h;
  run_mhd(h);
  return 0;
}

int shop_http_port(const shop_http *h) { return h->port; }


int shop_http_accept(shop_http *h, int fd) {
  struct sockaddr_un a;
  memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  if (h->stopping) {
    close(fd);
    return -1;
  }
  if (MHD_add_connection(h->d, fd, (struct sockaddr *)&a, sizeof a) != MHD_YES) return -1;
  kick(h);
  return 0;
}

uint64_t shop_http_answered(const shop_http *h, int status) {
  return h != NULL && status >= 100 && status < 100 + SHOP_HTTP_CODES ? h->answered[status - 100]
                                                                      : 0;
}

static void closed_free(uv_handle_t *hd) {
  shop_http *h = hd->data;
  if (--h->stopping == 0) free(h);
}

void shop_http_stop(shop_http *h) {
  if (h == NULL) return;
  /* From here on new requests are answered 503 at once (nothing new parks), and the listener
   * accepts no more connections. */
  h->stopping = 1;
  MHD_quiesce_daemon(h->d);
  /* Every parked connection must be resumed before MHD stops: answer pending requests,
   * end open streams. */
  for (shop_req *r = h->live; r != NULL; r = r->next) {
    if (r->sse != NULL) {
      r->sse->closed = 1;
      if (r->sse->suspended) {
        r->sse->suspended = 0;
        MHD_resume_connection(r->sse->conn);
      }
    } else if (r->dispatched && r->resp == NULL) {
      shop_reply_error(r, 503, "shutting down");
    }
  }
  MHD_run(h->d);
  uv_poll_stop(&h->poll); /* before MHD closes the epoll descriptor it watches */
  uv_timer_stop(&h->timer);
  MHD_stop_daemon(h->d);
  for (size_t i = 0; i < h->nroutes; i++) {
    free(h->routes[i].method);
    free(h->routes[i].pattern);
  }
  free(h->routes);
  h->stopping = 2; /* counts the two handle closes below */
  h->poll.data = h->timer.data = h;
  uv_close((uv_handle_t *)&h->poll, closed_free);
  uv_close((uv_handle_t *)&h->timer, closed_free);
}
