/*
 * The shop's HTTP client (client.h): libcurl easy handles for requests, and for the result
 * stream one curl multi handle driven by a thread of its own, so that closing the stream can
 * wake it at once (curl_multi_wakeup) instead of waiting for a progress callback.
 */
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client.h"

const char *const shop_steps[3] = {"UPDATE_PRODUCT_INVENTORY", "CREATE_ORDER", "CREATE_PAYMENT"};

long long shop_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- a growable buffer --------------------------------------------------------------------- */

typedef struct buf {
  char *p;
  size_t len, cap;
} buf;

static int buf_add(buf *b, const char *data, size_t n) {
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 256;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL) return -1;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, data, n);
  b->len += n;
  b->p[b->len] = '\0';
  return 0;
}

/* ---- plain requests ------------------------------------------------------------------------ */

struct shop_client {
  CURL *curl;
  char *url;
  char *token;
  long timeout_ms;
};

int shop_client_global_init(void) { return curl_global_init(CURL_GLOBAL_DEFAULT) == 0 ? 0 : -1; }
void shop_client_global_cleanup(void) { curl_global_cleanup(); }

int shop_client_new(shop_client **out, const char *base_url) {
  shop_client *c = calloc(1, sizeof *c);
  if (c == NULL) return -1;
  c->url = strdup(base_url);
  c->curl = curl_easy_init();
  c->timeout_ms = 30000;
  if (c->url == NULL || c->curl == NULL) {
    shop_client_free(c);
    return -1;
  }
  /* Trailing slashes would double up with the paths. */
  size_t n = strlen(c->url);
  while (n > 0 && c->url[n - 1] == '/') c->url[--n] = '\0';
  *out = c;
  return 0;
}

void shop_client_free(shop_client *c) {
  if (c == NULL) return;
  if (c->curl) curl_easy_cleanup(c->curl);
  free(c->url);
  free(c->token);
  free(c);
}

void shop_client_set_token(shop_client *c, const char *token) {
  char *t = token ? strdup(token) : NULL;
  free(c->token);
  c->token = t;
}

const char *shop_client_token(const shop_client *c) { return c->token; }
const char *shop_client_url(const shop_client *c) { return c->url; }
void shop_client_set_timeout(shop_client *c, long ms) { c->timeout_ms = ms; }

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg) {
  return buf_add(arg, data, size * nmemb) == 0 ? size * nmemb : 0;
}

void shop_resp_destroy(shop_resp *r) {
  if (r == NULL) return;
  json_decref(r->json);
  free(r->body);
  memset(r, 0, sizeof *r);
}

long shop_client_send(shop_client *c, const char *method, const char *path,
                      const shop_send_opts *opts, shop_resp *out) {
  static const shop_send_opts none;
  if (opts == NULL) opts = &none;
  memset(out, 0, sizeof *out);
  buf body = {0};
  struct curl_slist *hdrs = NULL;
  char line[4096];
  size_t ulen = strlen(c->url) + strlen(path) + 1;
  char *url = malloc(ulen);
  if (url == NULL) {
    snprintf(out->err, sizeof out->err, "out of memory");
    return 0;
  }
  snprintf(url, ulen, "%s%s", c->url, path);

  CURL *h = c->curl;
  curl_easy_reset(h);
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, c->timeout_ms);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
  char errbuf[CURL_ERROR_SIZE] = "";
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
  if (strcmp(method, "HEAD") == 0) curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
  if (opts->body != NULL) {
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, opts->body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)opts->body_len);
    snprintf(line, sizeof line, "Content-Type: %s",
             opts->content_type ? opts->content_type : "application/json");
    hdrs = curl_slist_append(hdrs, line);
  }
  /* No "Expect: 100-continue" round trip for larger bodies. */
  hdrs = curl_slist_append(hdrs, "Expect:");
  hdrs = curl_slist_append(hdrs, "Accept: application/json");
  if (opts->authorization != NULL) {
    if (opts->authorization[0] != '\0') {
      snprintf(line, sizeof line, "Authorization: %s", opts->authorization);
      hdrs = curl_slist_append(hdrs, line);
    }
  } else if (c->token != NULL) {
    snprintf(line, sizeof line, "Authorization: Bearer %s", c->token);
    hdrs = curl_slist_append(hdrs, line);
  }
  for (const char *const *x = opts->headers; x != NULL && *x != NULL; x++)
    hdrs = curl_slist_append(hdrs, *x);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);

  CURLcode rc = curl_easy_perform(h);
  if (rc == CURLE_OK) {
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &out->status);
    out->body = body.p ? body.p : strdup("");
    out->len = body.len;
    body.p = NULL;
    if (out->len > 0) out->json = json_loadb(out->body, out->len, JSON_DECODE_ANY, NULL);
  } else {
    /* Truncation is fine for a message; the precision keeps the compiler convinced. */
    snprintf(out->err, sizeof out->err, "%.16s %.128s: %.96s", method, url,
             errbuf[0] ? errbuf : curl_easy_strerror(rc));
  }
  /* The handle keeps pointers to these until the next reset; none is used after it. */
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
  curl_slist_free_all(hdrs);
  free(body.p);
  free(url);
  return out->status;
}

long shop_call(shop_client *c, const char *method, const char *path, const json_t *body,
               json_t **json_out) {
  shop_send_opts o;
  memset(&o, 0, sizeof o);
  char *text = NULL;
  if (body != NULL) {
    text = json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
    if (text == NULL) {
      if (json_out) *json_out = NULL;
      return 0;
    }
    o.body = text;
    o.body_len = strlen(text);
  }
  shop_resp r;
  long st = shop_client_send(c, method, path, &o, &r);
  if (st == 0) fprintf(stderr, "shop_call: %s\n", r.err);
  if (json_out) {
    *json_out = r.json;
    r.json = NULL;
  }
  shop_resp_destroy(&r);
  free(text);
  return st;
}

/* ---- the result stream --------------------------------------------------------------------- */

typedef struct ev_node {
  json_t *ev;
  struct ev_node *next;
} ev_node;

struct shop_events {
  CURLM *multi;
  CURL *easy;
  struct curl_slist *hdrs;
  char *url;
  pthread_t thread;
  int thread_started;
  atomic_int stop;

  pthread_mutex_t mu;
  pthread_cond_t cond;
  long status; /* HTTP status once the headers are in */
  int opened;  /* headers in, or the transfer ended without them */
  int ended;
  size_t received;
  ev_node *head, *tail;

  /* Parser state (transfer thread only). */
  buf line;
  buf data;
  char event[64];
  int has_data;
};

static void cond_deadline(struct timespec *ts, int timeout_ms) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += timeout_ms / 1000;
  ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
  if (ts->tv_nsec >= 1000000000L) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000L;
  }
}

static void push_event(shop_events *s, json_t *ev) {
  ev_node *n = malloc(sizeof *n);
  if (n == NULL) {
    json_decref(ev);
    return;
  }
  n->ev = ev;
  n->next = NULL;
  pthread_mutex_lock(&s->mu);
  if (s->tail)
    s->tail->next = n;
  else
    s->head = n;
  s->tail = n;
  pthread_cond_broadcast(&s->cond);
  pthread_mutex_unlock(&s->mu);
}

/* One complete line of the stream (without its line ending), as the SSE format defines. */
static void sse_line(shop_events *s, const char *l, size_t n) {
  if (n == 0) { /* a blank line dispatches the event gathered so far */
    if (s->has_data && strcmp(s->event[0] ? s->event : "message", "data") == 0) {
      json_t *ev = json_loadb(s->data.p ? s->data.p : "", s->data.len, 0, NULL);
      if (ev != NULL && json_is_object(ev))
        push_event(s, ev);
      else
        json_decref(ev);
    }
    pthread_mutex_lock(&s->mu);
    s->received++;
    pthread_mutex_unlock(&s->mu);
    s->data.len = 0;
    s->has_data = 0;
    s->event[0] = '\0';
    return;
  }
  if (l[0] == ':') return; /* a comment (keep-alive) */
  const char *colon = memchr(l, ':', n);
  size_t fn = colon ? (size_t)(colon - l) : n;
  const char *v = colon ? colon + 1 : l + n;
  size_t vn = n - (size_t)(v - l);
  if (vn > 0 && v[0] == ' ') {
    v++;
    vn--;
  }
  if (fn == 5 && memcmp(l, "event", 5) == 0) {
    size_t k = vn < sizeof s->event - 1 ? vn : sizeof s->event - 1;
    memcpy(s->event, v, k);
    s->event[k] = '\0';
  } else if (fn == 4 && memcmp(l, "data", 4) == 0) {
    if (s->has_data) buf_add(&s->data, "\n", 1);
    buf_add(&s->data, v, vn);
    s->has_data = 1;
  }
}

static size_t sse_write(char *data, size_t size, size_t nmemb, void *arg) {
  shop_events *s = arg;
  size_t n = size * nmemb;
  if (s->status != 200) return n; /* an error body: not a stream */
  for (size_t i = 0; i < n; i++) {
    char ch = data[i];
    if (ch == '\n') {
      size_t len = s->line.len;
      if (len > 0 && s->line.p[len - 1] == '\r') len--;
      sse_line(s, s->line.p ? s->line.p : "", len);
      s->line.len = 0;
    } else if (buf_add(&s->line, &ch, 1) != 0) {
      return 0;
    }
  }
  return n;
}

static size_t sse_header(char *data, size_t size, size_t nmemb, void *arg) {
  shop_events *s = arg;
  size_t n = size * nmemb;
  if ((n == 2 && data[0] == '\r' && data[1] == '\n') || (n == 1 && data[0] == '\n')) {
    long code = 0;
    curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &code);
    if (code >= 200) {
      pthread_mutex_lock(&s->mu);
      s->status = code;
      s->opened = 1;
      pthread_cond_broadcast(&s->cond);
      pthread_mutex_unlock(&s->mu);
    }
  }
  return n;
}

static void *sse_thread(void *arg) {
  shop_events *s = arg;
  int running = 1;
  while (!atomic_load(&s->stop)) {
    if (curl_multi_perform(s->multi, &running) != CURLM_OK || running == 0) break;
    curl_multi_poll(s->multi, NULL, 0, 1000, NULL);
  }
  pthread_mutex_lock(&s->mu);
  s->ended = 1;
  s->opened = 1;
  pthread_cond_broadcast(&s->cond);
  pthread_mutex_unlock(&s->mu);
  return NULL;
}

int shop_events_open(shop_events **out, const char *base_url, const char *path, const char *token) {
  shop_events *s = calloc(1, sizeof *s);
  if (s == NULL) return -1;
  pthread_mutex_init(&s->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&s->cond, &ca);
  pthread_condattr_destroy(&ca);
  atomic_init(&s->stop, 0);

  size_t ulen = strlen(base_url) + strlen(path) + 1;
  s->url = malloc(ulen);
  s->multi = curl_multi_init();
  s->easy = curl_easy_init();
  if (s->url == NULL || s->multi == NULL || s->easy == NULL) goto fail;
  snprintf(s->url, ulen, "%s%s", base_url, path);

  char line[4096];
  s->hdrs = curl_slist_append(s->hdrs, "Accept: text/event-stream");
  if (token != NULL) {
    snprintf(line, sizeof line, "Authorization: Bearer %s", token);
    s->hdrs = curl_slist_append(s->hdrs, line);
  }
  curl_easy_setopt(s->easy, CURLOPT_URL, s->url);
  curl_easy_setopt(s->easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, s->hdrs);
  curl_easy_setopt(s->easy, CURLOPT_WRITEFUNCTION, sse_write);
  curl_easy_setopt(s->easy, CURLOPT_WRITEDATA, s);
  curl_easy_setopt(s->easy, CURLOPT_HEADERFUNCTION, sse_header);
  curl_easy_setopt(s->easy, CURLOPT_HEADERDATA, s);
  curl_easy_setopt(s->easy, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
  if (curl_multi_add_handle(s->multi, s->easy) != CURLM_OK) goto fail;
  if (pthread_create(&s->thread, NULL, sse_thread, s) != 0) goto fail;
  s->thread_started = 1;
  *out = s;
  return 0;
fail:
  shop_events_close(s);
  return -1;
}

long shop_events_wait_open(shop_events *s, int timeout_ms) {
  struct timespec ts;
  cond_deadline(&ts, timeout_ms);
  pthread_mutex_lock(&s->mu);
  while (!s->opened) {
    if (pthread_cond_timedwait(&s->cond, &s->mu, &ts) == ETIMEDOUT) break;
  }
  long st = s->status;
  pthread_mutex_unlock(&s->mu);
  return st;
}

json_t *shop_events_next(shop_events *s, int timeout_ms) {
  struct timespec ts;
  cond_deadline(&ts, timeout_ms < 0 ? 0 : timeout_ms);
  json_t *ev = NULL;
  pthread_mutex_lock(&s->mu);
  while (s->head == NULL && !s->ended) {
    if (pthread_cond_timedwait(&s->cond, &s->mu, &ts) == ETIMEDOUT) break;
  }
  if (s->head != NULL) {
    ev_node *n = s->head;
    s->head = n->next;
    if (s->head == NULL) s->tail = NULL;
    ev = n->ev;
    free(n);
  }
  pthread_mutex_unlock(&s->mu);
  return ev;
}

int shop_events_ended(shop_events *s) {
  pthread_mutex_lock(&s->mu);
  int e = s->ended;
  pthread_mutex_unlock(&s->mu);
  return e;
}

size_t shop_events_received(shop_events *s) {
  pthread_mutex_lock(&s->mu);
  size_t n = s->received;
  pthread_mutex_unlock(&s->mu);
  return n;
}

void shop_events_close(shop_events *s) {
  if (s == NULL) return;
  if (s->thread_started) {
    atomic_store(&s->stop, 1);
    curl_multi_wakeup(s->multi);
    pthread_join(s->thread, NULL);
  }
  if (s->multi && s->easy) curl_multi_remove_handle(s->multi, s->easy);
  if (s->easy) curl_easy_cleanup(s->easy);
  if (s->multi) curl_multi_cleanup(s->multi);
  curl_slist_free_all(s->hdrs);
  for (ev_node *n = s->head, *next; n != NULL; n = next) {
    next = n->next;
    json_decref(n->ev);
    free(n);
  }
  free(s->line.p);
  free(s->data.p);
  free(s->url);
  pthread_cond_destroy(&s->cond);
  pthread_mutex_destroy(&s->mu);
  free(s);
}

/* ---- statuses ------------------------------------------------------------------------------ */

const char *shop_id_str(const json_t *id, char *b, size_t n) {
  if (json_is_integer(id))
    snprintf(b, n, "%" JSON_INTEGER_FORMAT, json_integer_value(id));
  else if (json_is_string(id))
    snprintf(b, n, "%s", json_string_value(id));
  else
    snprintf(b, n, "?");
  return b;
}

void shop_track_init(shop_track *t, const char *id) {
  memset(t, 0, sizeof *t);
  snprintf(t->id, sizeof t->id, "%s", id);
  t->events = json_array();
  t->failed_step = -1;
}

void shop_track_destroy(shop_track *t) {
  if (t == NULL) return;
  json_decref(t->events);
  t->events = NULL;
}

static int step_index(const char *name) {
  for (int i = 0; i < 3; i++)
    if (name != NULL && strcmp(name, shop_steps[i]) == 0) return i;
  return -1;
}

void shop_track_add(shop_track *t, const json_t *ev) {
  json_array_append(t->events, (json_t *)ev);
  const char *step = json_string_value(json_object_get(ev, "step"));
  const char *status = json_string_value(json_object_get(ev, "status"));
  int k = step_index(step);
  if (k < 0 || status == NULL) return;
  if (strcmp(status, "STATUS_SUCCESS") == 0 && k == 2)
    t->succeeded = 1;
  else if (strcmp(status, "STATUS_FAILED") == 0)
    t->failed_step = k;
  else if (strcmp(status, "STATUS_ROLLBACKED") == 0)
    t->done[k] = 1;
  else if (strcmp(status, "STATUS_ROLLBACK_FAIL") == 0)
    t->done[k] = 2;
}

shop_outcome shop_track_outcome(const shop_track *t) {
  if (t->succeeded) return SHOP_SUCCEEDED;
  if (t->failed_step < 0) return SHOP_PENDING;
  int rollback_failed = 0;
  for (int k = 0; k < t->failed_step; k++) {
    if (t->done[k] == 0) return SHOP_PENDING;
    if (t->done[k] == 2) rollback_failed = 1;
  }
  return rollback_failed ? SHOP_ROLLBACK_FAIL : SHOP_COMPENSATED;
}

const char *shop_outcome_name(shop_outcome o) {
  switch (o) {
  case SHOP_PENDING:
    return "pending";
  case SHOP_SUCCEEDED:
    return "succeeded";
  case SHOP_COMPENSATED:
    return "failed and compensated";
  case SHOP_ROLLBACK_FAIL:
    return "failed, rollback failed";
  }
  return "?";
}
