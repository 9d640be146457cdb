/* An example transport adapter: UNIX datagrams between processes on one host. */
#ifndef EXAMPLE_UDP_ADAPTER_H
#define EXAMPLE_UDP_ADAPTER_H

#include <saga/transport.h>

/* A transport whose channels are datagram sockets in dir (at most 60 bytes of path). */
int example_udp_transport_new(saga_transport **out, const char *dir);

#endif
