/* The adapter-facing entry points: they forward to the host the core plugged in. */
#include "../internal.h"

static saga__transport_host *host_of(saga_transport *t) {
  return t != NULL ? (saga__transport_host *)t->saga__host : NULL;
}

int saga_transport_deliver(saga_transport *t, const char *channel, const void *data, size_t len,
                           uint64_t tag) {
  saga__transport_host *h = host_of(t);
  if (h == NULL || h->deliver == NULL) return SAGA_ECLOSED;
  if (channel == NULL || (data == NULL && len > 0)) return SAGA_EINVAL;
  return h->deliver(h->ctx, channel, data, len, tag);
}

int saga_transport_dead_letter(saga_transport *t, const char *channel, const void *data,
                               size_t len, uint64_t tag, const char *reason) {
  saga__transport_host *h = host_of(t);
  if (h == NULL || h->dead_letter == NULL) return SAGA_ECLOSED;
  if (channel == NULL || reason == NULL || (data == NULL && len > 0)) return SAGA_EINVAL;
  return h->dead_letter(h->ctx, channel, data, len, tag, reason);
}

void saga_transport_sent(saga_transport *t, uint64_t token, int status) {
  saga__transport_host *h = host_of(t);
  if (h != NULL && h->sent != NULL) h->sent(h->ctx, token, status);
}

void saga_transport_closed(saga_transport *t) {
  saga__transport_host *h = host_of(t);
  if (h != NULL && h->closed != NULL) h->closed(h->ctx);
}

void saga_transport_log(saga_transport *t, saga_log_level level, const char *msg) {
  saga__transport_host *h = host_of(t);
  if (h != NULL && h->log != NULL && msg != NULL) h->log(h->ctx, level, msg);
}

void saga_transport_free(saga_transport *t) {
  if (t != NULL && t->methods != NULL && t->methods->destroy != NULL) t->methods->destroy(t);
}
