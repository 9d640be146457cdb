/*
 * The node's side of the transport interface: attaching a transport (its methods checked and
 * copied by version) and the callbacks it makes — deliveries, dead letters and confirmations
 * become queued work; a close is reported to node.c through n->finish_close.
 */
#include <string.h>

#include "runtime.h"

static int host_deliver(void *ctx, const char *channel, const void *data, size_t len,
                        uint64_t tag) {
  saga_node *n = ctx;
  if (n->closing) return SAGA_ECLOSED;
  if (tag & SAGA__LOOPBACK_TAG) {
    saga__log(&n->env, SAGA_LOG_ERROR, "transport used a reserved delivery tag; dropped");
    return SAGA_EINVAL;
  }
  /* Oversized input is still queued (truncated) so it lands in the dead-letter table. */
  size_t max = n->env.limits.max_message_bytes;
  size_t keep = len > max ? max + 1 : len;
  saga__work *w = saga__queue_push(n, W_DELIVERY, channel, strlen(channel), data, keep, NULL, 0);
  if (w == NULL) return SAGA_ENOMEM;
  w->tag = tag;
  n->env.stats.delivered++;
  return SAGA_OK;
}

static int host_dead_letter(void *ctx, const char *channel, const void *data, size_t len,
                            uint64_t tag, const char *reason) {
  saga_node *n = ctx;
  if (n->closing) return SAGA_ECLOSED;
  if (tag & SAGA__LOOPBACK_TAG) return SAGA_EINVAL;
  size_t max = n->env.limits.max_message_bytes;
  size_t keep = len > max ? max : len;
  saga__work *w = saga__queue_push(n, W_DEAD, channel, strlen(channel), data, keep, reason,
                                   strlen(reason));
  if (w == NULL) return SAGA_ENOMEM;
  w->tag = tag;
  return SAGA_OK;
}

static void host_sent(void *ctx, uint64_t token, int status) {
  saga_node *n = ctx;
  if (n->closing || status != SAGA_OK) return;
  saga__work *w = saga__queue_push(n, W_SENT, NULL, 0, NULL, 0, NULL, 0);
  if (w != NULL) w->tag = token; /* on ENOMEM the row is simply resent later */
}

static void host_closed(void *ctx) {
  saga_node *n = ctx;
  n->transport_closed = 1;
  if (n->closing) n->finish_close(n);
}

static void host_log(void *ctx, saga_log_level lvl, const char *msg) {
  saga__log(&((saga_node *)ctx)->env, lvl, "transport: %s", msg);
}

int saga_node_transport_connected(saga_node *n) {
  if (n == NULL) return SAGA_EINVAL;
  if (!n->transport_open || n->transport_closed) return 0;
  if (n->tm.connected == NULL) return 1;
  return n->tm.connected(n->transport) == 1;
}

int saga__host_can_send(void *ctx, const char *channel) {
  saga_node *n = ctx;
  if (n->tm.can_send == NULL || !n->transport_open || n->transport_closed) return 1;
  return n->tm.can_send(n->transport, channel) != 0;
}

int saga__host_attach(saga_node *n, saga_transport *t, char *err, size_t errlen) {
  const saga_transport_methods *m = t->methods;
  if (m == NULL || m->version < 1 || m->version > SAGA_TRANSPORT_VERSION) {
    saga__errf(err, errlen, "transport methods version %d is not supported (1..%d)",
               m ? m->version : -1, SAGA_TRANSPORT_VERSION);
    return SAGA_EVERSION;
  }
  /* Field by field, by version: a newer core keeps working with older adapters. */
  memset(&n->tm, 0, sizeof n->tm);
  n->tm.version = m->version;
  n->tm.name = m->name ? m->name : "?";
  n->tm.open = m->open;
  n->tm.subscribe = m->subscribe;
  n->tm.send = m->send;
  n->tm.ack = m->ack;
  n->tm.close = m->close;
  n->tm.destroy = m->destroy;
  if (m->version >= 2) n->tm.can_send = m->can_send; /* version 1 has no can_send: NULL */
  if (m->version >= 3) n->tm.connected = m->connected; /* older: connected when open */
  if (!n->tm.open || !n->tm.subscribe || !n->tm.send || !n->tm.ack || !n->tm.close ||
      !n->tm.destroy) {
    saga__errf(err, errlen, "transport '%s' lacks a required method", n->tm.name);
    return SAGA_EINVAL;
  }
  n->host.deliver = host_deliver;
  n->host.sent = host_sent;
  n->host.closed = host_closed;
  n->host.log = host_log;
  n->host.dead_letter = host_dead_letter;
  n->host.ctx = n;
  t->saga__host = &n->host;
  n->transport = t;
  int rc = n->tm.open(t, n->loop);
  if (rc != SAGA_OK) {
    saga__errf(err, errlen, "transport '%s' failed to open: %s", n->tm.name, saga_strerror(rc));
    return rc;
  }
  n->transport_open = 1;
  return SAGA_OK;
}
