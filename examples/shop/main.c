/*
 * The shop's process (docs/shop.md, "Running it").
 *
 * Embedded (the default): every service on one loop over the in-memory transport, SQLite
 * files in --data, the whole API on one port.
 *
 *   shop [--data DIR] [--port N] [--bind ADDR] [--secret S] [--payment-limit N]
 *
 * Distributed: --service NAME runs one service as its own process, with its own database in
 * --data and its own HTTP port, its node talking to the others over TCP or NATS JetStream:
 *
 *   shop --service account ...                      (no saga node: no transport options)
 *   shop --service NAME --transport tcp --tcp-listen HOST:PORT
 *        --tcp-route CHANNEL=HOST:PORT[@IDENTITY] [--tcp-route ...]
 *        (--tls-ca FILE --tls-cert FILE --tls-key FILE [--tls-allow IDENTITY=CHANNEL]...
 *         | --insecure-plaintext) ...
 *   shop --service NAME --transport nats [--nats URL] [--nats-ack-wait MS]
 *        [--nats-user U --nats-password-file F | --nats-token-file F | --nats-creds F]
 *        [--nats-tls-ca F [--nats-tls-cert F --nats-tls-key F] [--nats-tls-hostname H]] ...
 *   shop --service purchase --product-url http://HOST:PORT ...   (the product check)
 *
 * Over TCP every node listens on --tcp-listen, and --tcp-route says where each channel it
 * sends to is served (the channels are the node names product, order, payment, orchestrator
 * (the participants' replies), purchase; and orchestrator.requests (the purchase requests),
 * served by the orchestrator node, and purchase.events, served by the purchase node: a route
 * for "orchestrator" or "purchase" also routes those unless they have their own), and which
 * identity the node there must prove. The same route list may be given to every service
 * (scripts/shop_cluster.sh does); the routes a service needs are checked. TCP is mutual TLS: this
 * node's certificate and key, the CA that signs every node, and the access list of who may send to
 * which of this node's channels (--tls-allow, repeated); plaintext only with --insecure-plaintext,
 * which anyone who reaches the port can use to run any handler (loopback tests only).
 *
 * Prints "listening on PORT" once it serves, and stops cleanly on SIGINT/SIGTERM.
 * `shop --free-ports N` prints N distinct TCP ports of 127.0.0.1 that were free (for scripts).
 */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <saga/transport_tcp.h>
#ifdef SHOP_HAVE_NATS
#include <saga/transport_nats.h>
#endif

#include "shop.h"

/* The node services, in the order of the embedded process. */
static const char *const node_names[] = {"product", "order", "payment", "orchestrator", "purchase"};
enum { N_NODES = 5, MAX_ROUTES = 32, MAX_ALLOW = 32 };

/* What each node sends to (TCP routes it needs): participants reply to the orchestrator;
 * the orchestrator commands the participants, replies to the purchase node and publishes
 * events; the purchase node commands the orchestrator. */
static const char *const needs[N_NODES][6] = {
    {SHOP_CH_ORCHESTRATOR, NULL},
    {SHOP_CH_ORCHESTRATOR, NULL},
    {SHOP_CH_ORCHESTRATOR, NULL},
    {SHOP_CH_PRODUCT, SHOP_CH_ORDER, SHOP_CH_PAYMENT, "purchase", SHOP_EVENTS, NULL},
    {SHOP_CH_REQUESTS, NULL},
};

typedef struct options {
  const char *service;   /* NULL: embedded */
  const char *transport; /* "tcp" or "nats" */
  const char *tcp_listen;
  saga_tcp_route routes[MAX_ROUTES];
  char *route_buf[MAX_ROUTES]; /* "channel\0address\0identity" copies */
  size_t nroutes;
  const char *tls_ca, *tls_cert, *tls_key;
  saga_tcp_allow allow[MAX_ALLOW];
  char *allow_buf[MAX_ALLOW]; /* "identity\0channel" copies */
  size_t nallow;
  int insecure_plaintext;
  const char *nats_url;
  long nats_ack_wait_ms;
  const char *nats_user, *nats_password_file, *nats_token_file, *nats_creds;
  const char *nats_tls_ca, *nats_tls_cert, *nats_tls_key, *nats_tls_hostname;
  char nats_secret[256]; /* the password or token read from its file */
  const char *bind;
  int port;
  const char *otlp; /* --otlp: the collector's base URL */
} options;

typedef struct app {
  uv_loop_t *loop;
  shop_ctx ctx;
  options o;
  saga_mem_hub *hub;
  saga_node *nodes[N_NODES];
  saga_transport *transports[N_NODES]; /* distributed: the node's transport, for /metrics */
  int node_index[N_NODES];             /* nodes[k] runs node_names[node_index[k]] */
  int nnodes;
  shop_otlp *otlp; /* --otlp: the span exporter of every node of this process */
  uv_signal_t sigint, sigterm;
  int closing, closed;
  char product_db[512];
} app;

static const char usage[] =
    "usage: shop [--data DIR] [--port N] [--bind ADDR] [--secret S] [--payment-limit N]\n"
    "            [--service NAME [--transport tcp|nats] [--product-url URL]\n"
    "             [--tcp-listen HOST:PORT] [--tcp-route CHANNEL=HOST:PORT[@IDENTITY]]...\n"
    "             [--tls-ca FILE --tls-cert FILE --tls-key FILE] [--tls-allow "
    "IDENTITY=CHANNEL]...\n"
    "             [--insecure-plaintext]\n"
    "             [--nats URL] [--nats-ack-wait MS] [--nats-user U --nats-password-file FILE]\n"
    "             [--nats-token-file FILE] [--nats-creds FILE] [--nats-tls-ca FILE]\n"
    "             [--nats-tls-cert FILE --nats-tls-key FILE] [--nats-tls-hostname NAME]]\n"
    "            [--otlp URL]\n"
    "       shop --free-ports N\n"
    "  without --service: every service in this process (embedded, in-memory transport)\n"
    "  --service: account, product, order, payment, orchestrator or purchase, alone;\n"
    "    every service but account needs --transport (tcp: --tcp-listen, the routes of the\n"
    "    channels it sends to, and mutual TLS (--tls-ca, --tls-cert, --tls-key, the access\n"
    "    list --tls-allow IDENTITY=CHANNEL, \"*\" for any) or --insecure-plaintext;\n"
    "    nats: --nats URL, default nats://127.0.0.1:4222, credentials and TLS optional);\n"
    "    purchase needs --product-url (the product service's base URL, to check products)\n"
    "  --otlp URL: export the nodes' spans to an OpenTelemetry collector (OTLP/HTTP JSON,\n"
    "    POST URL/v1/traces), service.name = the service (\"shop\" embedded)\n";

static int bad(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int bad(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "shop: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n%s", usage);
  va_end(ap);
  return 2;
}

/* A whole decimal in [lo, hi]; 0 or -1. */
static int parse_long(const char *s, long lo, long hi, long *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) return -1;
  *out = v;
  return 0;
}

static int service_index(const char *name) {
  for (int i = 0; i < N_NODES; i++)
    if (strcmp(node_names[i], name) == 0) return i;
  return -1;
}

static const char *route_of(const options *o, const char *channel) {
  for (size_t i = 0; i < o->nroutes; i++)
    if (strcmp(o->routes[i].channel, channel) == 0) return o->routes[i].address;
  return NULL;
}

/* Prints n distinct free ports of 127.0.0.1 (all bound at once, so they differ). */
static int free_ports(long n) {
  int fds[64];
  int rc = 0;
  for (long i = 0; i < n; i++) fds[i] = -1;
  for (long i = 0; i < n && rc == 0; i++) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    fds[i] = socket(AF_INET, SOCK_STREAM, 0);
    if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fds[i], (struct sockaddr *)&a, &len) != 0) {
      perror("shop: --free-ports");
      rc = 1;
    } else {
      printf("%d\n", ntohs(a.sin_port));
    }
  }
  for (long i = 0; i < n; i++)
    if (fds[i] >= 0) close(fds[i]);
  return rc;
}

/* Parses argv into a and o. 0, or the exit status (usage printed). */
static int parse_args(app *a, int argc, char **argv) {
  options *o = &a->o;
  int transport_opts = 0;
  const char *transport_flag = NULL;
  for (int i = 1; i < argc; i++) {
    const char *f = argv[i];
    if (strcmp(f, "--help") == 0 || strcmp(f, "-h") == 0) {
      printf("%s", usage);
      return -1;
    }
    if (strncmp(f, "--", 2) != 0) return bad("unexpected argument '%s'", f);
    if (strcmp(f, "--insecure-plaintext") == 0) { /* the one flag without a value */
      transport_flag = f, transport_opts |= 1;
      o->insecure_plaintext = 1;
      continue;
    }
    if (i + 1 >= argc) return bad("%s needs a value", f);
    const char *v = argv[++i];
    long n;
    if (strcmp(f, "--data") == 0) {
      if (v[0] == '\0') return bad("%s: empty folder name", f);
      a->ctx.data_dir = v;
    } else if (strcmp(f, "--port") == 0) {
      if (parse_long(v, 0, 65535, &n) != 0) return bad("--port: '%s' is not a port (0..65535)", v);
      o->port = (int)n;
    } else if (strcmp(f, "--bind") == 0) {
      struct sockaddr_in sa;
      if (uv_ip4_addr(v, 0, &sa) != 0) return bad("--bind: '%s' is not an IPv4 address", v);
      o->bind = v;
    } else if (strcmp(f, "--secret") == 0) {
      if (v[0] == '\0') return bad("%s: the secret must not be empty", f);
      a->ctx.jwt_secret = v;
    } else if (strcmp(f, "--payment-limit") == 0) {
      if (parse_long(v, 0, (long)(INT64_MAX / 2), &n) != 0)
        return bad("--payment-limit: '%s' is not a non-negative integer", v);
      a->ctx.payment_limit = n;
    } else if (strcmp(f, "--free-ports") == 0) {
      if (parse_long(v, 1, 64, &n) != 0) return bad("--free-ports: '%s' is not 1..64", v);
      return free_ports(n) == 0 ? -1 : 1;
    } else if (strcmp(f, "--service") == 0) {
      if (strcmp(v, "account") != 0 && service_index(v) < 0)
        return bad("--service: unknown service '%s' (account, product, order, payment, "
                   "orchestrator, purchase)",
                   v);
      o->service = v;
    } else if (strcmp(f, "--transport") == 0) {
      if (strcmp(v, "tcp") != 0 && strcmp(v, "nats") != 0)
        return bad("--transport: '%s' is not tcp or nats", v);
      o->transport = v;
    } else if (strcmp(f, "--tcp-listen") == 0) {
      transport_flag = f, transport_opts |= 1;
      o->tcp_listen = v;
    } else if (strcmp(f, "--tcp-route") == 0) {
      transport_flag = f, transport_opts |= 1;
      const char *eq = strchr(v, '=');
      const char *at = eq != NULL ? strchr(eq, '@') : NULL;
      if (eq == NULL || eq == v || eq[1] == '\0' || eq[1] == '@' || (at != NULL && at[1] == '\0'))
        return bad("--tcp-route: '%s' is not CHANNEL=HOST:PORT[@IDENTITY]", v);
      if (o->nroutes == MAX_ROUTES) return bad("--tcp-route: more than %d routes", MAX_ROUTES);
      char *copy = strdup(v);
      if (copy == NULL) return 1;
      copy[eq - v] = '\0';
      if (at != NULL) copy[at - v] = '\0';
      if (route_of(o, copy) != NULL) {
        free(copy);
        return bad("--tcp-route: channel of '%s' routed twice", v);
      }
      o->route_buf[o->nroutes] = copy;
      o->routes[o->nroutes].channel = copy;
      o->routes[o->nroutes].address = copy + (eq - v) + 1;
      o->routes[o->nroutes].identity = at != NULL ? copy + (at - v) + 1 : NULL;
      o->nroutes++;
    } else if (strcmp(f, "--tls-ca") == 0 || strcmp(f, "--tls-cert") == 0 ||
               strcmp(f, "--tls-key") == 0) {
      transport_flag = f, transport_opts |= 1;
      if (v[0] == '\0') return bad("%s: empty file name", f);
      if (access(v, R_OK) != 0) return bad("%s: cannot read '%s': %s", f, v, strerror(errno));
      if (strcmp(f, "--tls-ca") == 0)
        o->tls_ca = v;
      else if (strcmp(f, "--tls-cert") == 0)
        o->tls_cert = v;
      else
        o->tls_key = v;
    } else if (strcmp(f, "--tls-allow") == 0) {
      transport_flag = f, transport_opts |= 1;
      const char *eq = strchr(v, '=');
      if (eq == NULL || eq == v || eq[1] == '\0')
        return bad("--tls-allow: '%s' is not IDENTITY=CHANNEL", v);
      if (o->nallow == MAX_ALLOW) return bad("--tls-allow: more than %d entries", MAX_ALLOW);
      char *copy = strdup(v);
      if (copy == NULL) return 1;
      copy[eq - v] = '\0';
      o->allow_buf[o->nallow] = copy;
      o->allow[o->nallow].identity = copy;
      o->allow[o->nallow].channel = copy + (eq - v) + 1;
      o->nallow++;
    } else if (strcmp(f, "--nats") == 0) {
      transport_flag = f, transport_opts |= 2;
      o->nats_url = v;
    } else if (strcmp(f, "--nats-user") == 0 || strcmp(f, "--nats-tls-hostname") == 0) {
      transport_flag = f, transport_opts |= 2;
      if (v[0] == '\0') return bad("%s: empty value", f);
      if (strcmp(f, "--nats-user") == 0)
        o->nats_user = v;
      else
        o->nats_tls_hostname = v;
    } else if (strcmp(f, "--nats-password-file") == 0 || strcmp(f, "--nats-token-file") == 0 ||
               strcmp(f, "--nats-creds") == 0 || strcmp(f, "--nats-tls-ca") == 0 ||
               strcmp(f, "--nats-tls-cert") == 0 || strcmp(f, "--nats-tls-key") == 0) {
      transport_flag = f, transport_opts |= 2;
      if (v[0] == '\0') return bad("%s: empty file name", f);
      if (access(v, R_OK) != 0) return bad("%s: cannot read '%s': %s", f, v, strerror(errno));
      const char **slot = strcmp(f, "--nats-password-file") == 0 ? &o->nats_password_file
                          : strcmp(f, "--nats-token-file") == 0  ? &o->nats_token_file
                          : strcmp(f, "--nats-creds") == 0       ? &o->nats_creds
                          : strcmp(f, "--nats-tls-ca") == 0      ? &o->nats_tls_ca
                          : strcmp(f, "--nats-tls-cert") == 0    ? &o->nats_tls_cert
                                                                 : &o->nats_tls_key;
      *slot = v;
    } else if (strcmp(f, "--nats-ack-wait") == 0) {
      transport_flag = f, transport_opts |= 2;
      if (parse_long(v, 100, 3600000, &n) != 0)
        return bad("--nats-ack-wait: '%s' is not 100..3600000 (ms)", v);
      o->nats_ack_wait_ms = n;
    } else if (strcmp(f, "--otlp") == 0) {
      if ((strncmp(v, "http://", 7) != 0 && strncmp(v, "https://", 8) != 0) || strlen(v) > 512)
        return bad("--otlp: '%s' is not an http:// or https:// URL", v);
      o->otlp = v;
    } else if (strcmp(f, "--product-url") == 0) {
      if ((strncmp(v, "http://", 7) != 0 && strncmp(v, "https://", 8) != 0) || strlen(v) > 512)
        return bad("--product-url: '%s' is not an http:// or https:// URL", v);
      a->ctx.product_url = v;
    } else {
      return bad("unknown option '%s'", f);
    }
  }

  /* Consistency. */
  if (o->service == NULL) {
    if (o->transport != NULL || transport_opts != 0)
      return bad("%s only applies with --service (embedded mode uses the in-memory transport)",
                 o->transport != NULL ? "--transport" : transport_flag);
    if (a->ctx.product_url != NULL)
      return bad("%s only applies with --service purchase", "--product-url");
    return 0;
  }
  if (a->ctx.product_url != NULL && strcmp(o->service, "purchase") != 0)
    return bad("%s only applies with --service purchase", "--product-url");
  if (strcmp(o->service, "account") == 0) {
    if (o->transport != NULL || transport_opts != 0)
      return bad("the account service has no saga node: %s does not apply",
                 o->transport != NULL ? "--transport" : transport_flag);
    return 0;
  }
  if (o->transport == NULL) return bad("--service %s needs --transport tcp or nats", o->service);
  if (strcmp(o->transport, "tcp") == 0) {
    if (transport_opts & 2)
      return bad("%s is a NATS option (--transport tcp given)", transport_flag);
    if (o->tcp_listen == NULL) return bad("--service %s needs --tcp-listen HOST:PORT", o->service);
    int tls = o->tls_ca != NULL || o->tls_cert != NULL || o->tls_key != NULL;
    if (o->insecure_plaintext && (tls || o->nallow > 0))
      return bad("--insecure-plaintext excludes %s (plaintext has no identities)",
                 tls ? "--tls-ca, --tls-cert and --tls-key" : "--tls-allow");
    if (!o->insecure_plaintext && (o->tls_ca == NULL || o->tls_cert == NULL || o->tls_key == NULL))
      return bad("--transport tcp needs mutual TLS (--tls-ca, --tls-cert and --tls-key) or, "
                 "for loopback tests only, %s",
                 "--insecure-plaintext");
    for (size_t r = 0; o->insecure_plaintext && r < o->nroutes; r++)
      if (o->routes[r].identity != NULL)
        return bad("--tcp-route %s=...@%s: an identity needs TLS, not --insecure-plaintext",
                   o->routes[r].channel, o->routes[r].identity);
    /* A node's route also routes its other channels unless they have their own: "purchase"
     * routes "purchase.events", "orchestrator" routes "orchestrator.requests". */
    static const char *const derived[][2] = {{"purchase", SHOP_EVENTS},
                                             {SHOP_CH_ORCHESTRATOR, SHOP_CH_REQUESTS}};
    for (size_t d = 0; d < sizeof derived / sizeof derived[0]; d++) {
      int from = -1;
      for (size_t r = 0; r < o->nroutes; r++)
        if (strcmp(o->routes[r].channel, derived[d][0]) == 0) from = (int)r;
      if (from >= 0 && route_of(o, derived[d][1]) == NULL && o->nroutes < MAX_ROUTES) {
        o->routes[o->nroutes].channel = derived[d][1];
        o->routes[o->nroutes].address = o->routes[from].address;
        o->routes[o->nroutes].identity = o->routes[from].identity;
        o->nroutes++;
      }
    }
    int k = service_index(o->service);
    for (int j = 0; needs[k][j] != NULL; j++)
      if (route_of(o, needs[k][j]) == NULL) {
        fprintf(stderr,
                "shop: --service %s sends to channel '%s': give --tcp-route %s=HOST:PORT\n%s",
                o->service, needs[k][j], needs[k][j], usage);
        return 2;
      }
  } else {
#ifndef SHOP_HAVE_NATS
    return bad("--transport %s: this shop was built without the NATS transport (libnats-dev)",
               "nats");
#endif
    if (transport_opts & 1)
      return bad("%s is a TCP option (--transport nats given)", transport_flag);
    int ways = (o->nats_user != NULL) + (o->nats_token_file != NULL) + (o->nats_creds != NULL);
    if (ways > 1)
      return bad("give one of --nats-user, --nats-token-file and --nats-creds (%d given)", ways);
    if ((o->nats_user != NULL) != (o->nats_password_file != NULL))
      return bad("--nats-user and --nats-password-file go together");
    if ((o->nats_tls_cert != NULL) != (o->nats_tls_key != NULL))
      return bad("--nats-tls-cert and --nats-tls-key go together");
  }
  if (strcmp(o->service, "purchase") == 0 && a->ctx.product_url == NULL)
    return bad("--service purchase needs --product-url URL (%s, to check that products exist)",
               "the product service's base URL");
  return 0;
}

/* ---- nodes ------------------------------------------------------------------------------ */

static void log_cb(void *arg, saga_log_level lvl, const char *msg) {
  if (lvl >= SAGA_LOG_WARN) fprintf(stderr, "[%s] %s\n", (const char *)arg, msg);
}

static void all_closed(app *a) {
  if (a->hub) saga_mem_hub_close(a->hub);
  uv_close((uv_handle_t *)&a->sigint, NULL);
  uv_close((uv_handle_t *)&a->sigterm, NULL);
}

static void node_closed(void *arg) {
  app *a = arg;
  if (++a->closed == a->nnodes) all_closed(a);
}

static void stop(uv_signal_t *s, int signum) {
  app *a = s->data;
  if (a->closing++) return;
  shop_http_stop(a->ctx.http);
  shop_services_close(&a->ctx);
  shop_metrics_close(&a->ctx);
  if (a->nnodes == 0) all_closed(a);
  for (int i = 0; i < a->nnodes; i++) saga_node_close(a->nodes[i], node_closed, a);
}

/* The first line of a file holding a secret (a NATS password or token) into buf. 0 or -1. */
static int read_secret(const char *path, char *buf, size_t len) {
  FILE *f = fopen(path, "r");
  if (f == NULL || fgets(buf, (int)len, f) == NULL) {
    fprintf(stderr, "shop: cannot read a secret from %s: %s\n", path,
            f == NULL ? strerror(errno) : "empty file");
    if (f != NULL) fclose(f);
    return -1;
  }
  fclose(f);
  buf[strcspn(buf, "\r\n")] = '\0';
  if (buf[0] == '\0') {
    fprintf(stderr, "shop: %s: the secret is empty\n", path);
    return -1;
  }
  return 0;
}

/* /metrics: what the TCP transport refused (saga_tcp_stats_get). */
static void tcp_metrics(shop_text *b, void *arg) {
  saga_tcp_stats st;
  if (saga_tcp_stats_get(arg, &st, sizeof st) != SAGA_OK) return;
  static const struct {
    const char *name, *help;
    size_t off;
  } m[] = {
      {"shop_tcp_connections_accepted_total", "Inbound TCP connections taken.",
       offsetof(saga_tcp_stats, connections_accepted)},
      {"shop_tcp_connections_refused_total", "Inbound TCP connections over the caps.",
       offsetof(saga_tcp_stats, connections_refused)},
      {"shop_tcp_handshakes_failed_total",
       "TLS handshakes that failed or timed out (no certificate, another CA, a wrong identity).",
       offsetof(saga_tcp_stats, handshakes_failed)},
      {"shop_tcp_frames_refused_total",
       "Messages refused by the access list (the connection was then closed).",
       offsetof(saga_tcp_stats, frames_refused)},
      {"shop_tcp_frames_malformed_total", "Frames that broke the wire format.",
       offsetof(saga_tcp_stats, frames_malformed)},
      {"shop_tcp_acks_ignored_total", "ACK/NACK frames naming no token sent on that connection.",
       offsetof(saga_tcp_stats, acks_ignored)},
      {"shop_tcp_idle_closed_total", "Inbound connections closed for idleness.",
       offsetof(saga_tcp_stats, idle_closed)},
      {"shop_tcp_slow_readers_dropped_total", "Inbound connections dropped for not reading.",
       offsetof(saga_tcp_stats, slow_readers_dropped)},
  };
  for (size_t i = 0; i < sizeof m / sizeof m[0]; i++)
    shop_text_metric(b, m[i].name, "counter", m[i].help, "",
                     *(const uint64_t *)((const char *)&st + m[i].off));
}

#ifdef SHOP_HAVE_NATS
/* /metrics: what the NATS transport counted (saga_nats_stats_get). */
static void nats_metrics(shop_text *b, void *arg) {
  saga_nats_stats st;
  if (saga_nats_stats_get(arg, &st) != SAGA_OK) return;
  shop_text_metric(b, "shop_nats_acks_ignored_total", "counter",
                   "Publish acknowledgements naming no publish of this transport.", "",
                   st.acks_ignored);
  shop_text_metric(b, "shop_nats_permission_errors_total", "counter",
                   "Publishes or subscriptions the server refused.", "", st.permission_errors);
  shop_text_metric(b, "shop_nats_auth_errors_total", "counter",
                   "Authentication or authorization failures at (re)connect.", "", st.auth_errors);
}
#endif

static int make_transport(app *a, int i, saga_transport **t) {
  options *o = &a->o;
  int rc;
  if (o->service == NULL) return saga_mem_transport_new(t, a->hub);
  if (strcmp(o->transport, "tcp") == 0) {
    saga_tcp_config tc;
    saga_tcp_config_init(&tc);
    tc.listen = o->tcp_listen;
    tc.routes = o->routes;
    tc.nroutes = o->nroutes;
    tc.insecure_plaintext = o->insecure_plaintext;
    tc.tls_ca_file = o->tls_ca;
    tc.tls_cert_file = o->tls_cert;
    tc.tls_key_file = o->tls_key;
    tc.allow = o->allow;
    tc.nallow = o->nallow;
    /* Loopback peers come back within a second of a restart: do not wait 5 s for them. */
    tc.reconnect_max_ms = 1000;
    char err[256] = "";
    rc = saga_tcp_transport_new2(t, &tc, err, sizeof err);
    if (rc != SAGA_OK)
      fprintf(stderr, "shop: TCP transport: %s: %s\n", saga_strerror(rc),
              err[0] ? err : "check --tcp-listen, --tcp-route and the --tls- options");
    else if (o->insecure_plaintext)
      fprintf(stderr,
              "shop: WARNING: --insecure-plaintext: node %s accepts any command or reply "
              "from anyone who reaches %s (no TLS, no identities, no access list)\n",
              node_names[i], o->tcp_listen);
    return rc;
  }
#ifdef SHOP_HAVE_NATS
  saga_nats_config nc;
  saga_nats_config_init(&nc);
  if (o->nats_url) nc.url = o->nats_url;
  /* Redelivery of a command whose receiver died before acknowledging it: every shop process
   * must use the same value (it is part of each consumer's configuration). */
  nc.ack_wait_ms = o->nats_ack_wait_ms > 0 ? (uint32_t)o->nats_ack_wait_ms : 5000;
  if (o->nats_password_file != NULL || o->nats_token_file != NULL) {
    if (read_secret(o->nats_password_file ? o->nats_password_file : o->nats_token_file,
                    o->nats_secret, sizeof o->nats_secret) != 0)
      return SAGA_EINVAL;
  }
  nc.user = o->nats_user;
  if (o->nats_password_file != NULL) nc.password = o->nats_secret;
  if (o->nats_token_file != NULL) nc.token = o->nats_secret;
  nc.creds_file = o->nats_creds;
  nc.tls_ca_file = o->nats_tls_ca;
  nc.tls_cert_file = o->nats_tls_cert;
  nc.tls_key_file = o->nats_tls_key;
  nc.tls_hostname = o->nats_tls_hostname;
  /* Replies (publish acks, JetStream answers) under a prefix of this service's own, so that
   * the server's permissions can let each service subscribe to its own replies only. */
  char inbox[64];
  snprintf(inbox, sizeof inbox, "_INBOX.%s", node_names[i]);
  nc.inbox_prefix = inbox;
  rc = saga_nats_transport_new(t, &nc);
  if (rc != SAGA_OK) fprintf(stderr, "shop: NATS transport: %s\n", saga_strerror(rc));
  return rc;
#else
  (void)i;
  return SAGA_EINVAL;
#endif
}

static int open_node(app *a, int i) {
  saga_transport *t = NULL;
  int rc = make_transport(a, i, &t);
  if (rc != SAGA_OK) return rc;
  char path[512], err[256];
  snprintf(path, sizeof path, "%s/%s.db", a->ctx.data_dir, node_names[i]);
  if (i == 0) snprintf(a->product_db, sizeof a->product_db, "%s", path);
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE; /* each service makes its database on first start */
  cfg.name = node_names[i];
  cfg.db_path = path;
  cfg.transport = t;
  cfg.log = log_cb;
  cfg.log_arg = (void *)node_names[i];
  if (strcmp(node_names[i], "orchestrator") == 0) cfg.event_channel = SHOP_EVENTS;
  if (a->otlp != NULL && shop_otlp_attach(a->otlp, node_names[i], &cfg) != 0) {
    saga_transport_free(t);
    return SAGA_ENOMEM;
  }
  int k = a->nnodes;
  rc = saga_node_open(&a->nodes[k], a->loop, &cfg, err, sizeof err);
  if (rc != SAGA_OK) {
    fprintf(stderr, "%s: %s\n", node_names[i], err);
    return rc;
  }
  a->node_index[k] = i;
  a->nnodes++;
  if (shop_metrics_add_node(&a->ctx, node_names[i], a->nodes[k]) != 0) return SAGA_ENOMEM;
  if (a->o.service != NULL) { /* the node owns t; it lives as long as the node */
    a->transports[k] = t;
    shop_metrics_fn fn = strcmp(a->o.transport, "tcp") == 0 ? tcp_metrics : NULL;
#ifdef SHOP_HAVE_NATS
    if (fn == NULL) fn = nats_metrics;
#endif
    if (fn != NULL && shop_metrics_add(&a->ctx, fn, t) != 0) return SAGA_ENOMEM;
  }
  return SAGA_OK;
}

static int init_service(app *a, int i, saga_node *node) {
  shop_ctx *c = &a->ctx;
  switch (i) {
  case 0:
    return shop_product_init(c, node);
  case 1:
    return shop_order_init(c, node);
  case 2:
    return shop_payment_init(c, node);
  case 3:
    return shop_orchestrator_init(c, node);
  default:
    return shop_purchase_init(c, node);
  }
}

int main(int argc, char **argv) {
  static app a; /* static: zeroed, and alive for the whole process */
  a.loop = uv_default_loop();
  a.ctx.loop = a.loop;
  a.ctx.data_dir = "shop-data";
  a.ctx.jwt_secret =
      getenv("SHOP_JWT_SECRET") ? getenv("SHOP_JWT_SECRET") : "change-me-shop-demo-secret-32bytes!";
  a.ctx.payment_limit = 100000;
  a.o.port = 8080;
  int rc = parse_args(&a, argc, argv);
  if (rc != 0) {
    for (size_t i = 0; i < a.o.nroutes; i++) free(a.o.route_buf[i]);
    for (size_t i = 0; i < a.o.nallow; i++) free(a.o.allow_buf[i]);
    return rc < 0 ? 0 : rc;
  }
  signal(SIGPIPE, SIG_IGN);
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return 1; /* before any thread */
  if (mkdir(a.ctx.data_dir, 0755) != 0 && errno != EEXIST) {
    fprintf(stderr, "shop: --data %s: %s\n", a.ctx.data_dir, strerror(errno));
    return 1;
  }
  a.ctx.service = a.o.service ? a.o.service : "shop";
  if (shop_http_start(&a.ctx.http, a.loop, a.o.bind, a.o.port) != 0) {
    fprintf(stderr, "cannot listen on port %d\n", a.o.port);
    return 1;
  }
  if (shop_metrics_init(&a.ctx) != 0) return 1;
  if (a.o.otlp != NULL) {
    if (shop_otlp_new(&a.otlp, a.o.otlp, a.ctx.service) != 0 ||
        shop_metrics_add(&a.ctx, shop_otlp_metrics, a.otlp) != 0) {
      fprintf(stderr, "shop: --otlp %s: cannot start the exporter\n", a.o.otlp);
      return 1;
    }
  }

  int only = a.o.service ? service_index(a.o.service) : -1; /* -1: account or embedded */
  int account = a.o.service == NULL || strcmp(a.o.service, "account") == 0;
  if (a.o.service == NULL && saga_mem_hub_new(&a.hub, a.loop, NULL, NULL, NULL) != SAGA_OK)
    return 1;
  for (int i = 0; i < N_NODES; i++)
    if ((a.o.service == NULL || i == only) && open_node(&a, i) != SAGA_OK) return 1;
  if (a.o.service == NULL) a.ctx.product_db = a.product_db;
  if (account && shop_account_init(&a.ctx) != 0) {
    fprintf(stderr, "service setup failed\n");
    return 1;
  }
  for (int k = 0; k < a.nnodes; k++) {
    if (init_service(&a, a.node_index[k], a.nodes[k]) != 0) {
      fprintf(stderr, "service setup failed\n");
      return 1;
    }
  }
  for (int k = 0; k < a.nnodes; k++) {
    if (saga_node_start(a.nodes[k], NULL) != SAGA_OK) {
      fprintf(stderr, "%s: %s\n", node_names[a.node_index[k]], saga_node_errmsg(a.nodes[k]));
      return 1;
    }
  }
  uv_signal_init(a.loop, &a.sigint);
  uv_signal_init(a.loop, &a.sigterm);
  a.sigint.data = a.sigterm.data = &a;
  uv_signal_start(&a.sigint, stop, SIGINT);
  uv_signal_start(&a.sigterm, stop, SIGTERM);
  printf("listening on %d\n", shop_http_port(a.ctx.http));
  fflush(stdout);
  uv_run(a.loop, UV_RUN_DEFAULT);
  shop_otlp_close(a.otlp); /* every node closed: send the spans left, then stop */
  for (size_t i = 0; i < a.o.nroutes; i++) free(a.o.route_buf[i]);
  for (size_t i = 0; i < a.o.nallow; i++) free(a.o.allow_buf[i]);
  curl_global_cleanup();
  return 0;
}
