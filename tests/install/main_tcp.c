/* A consumer of an adapter's package (pkg-config libsaga-tcp): makes a TCP transport and frees
 * it. Exits 0 when that works. */
#include <saga/transport_tcp.h>

int main(void) {
  saga_tcp_config cfg;
  saga_tcp_config_init(&cfg);
  cfg.insecure_plaintext = 1;
  cfg.listen = "127.0.0.1:0";
  saga_transport *t = NULL;
  if (saga_tcp_transport_new(&t, &cfg) != SAGA_OK) return 1;
  saga_transport_free(t);
  return 0;
}
