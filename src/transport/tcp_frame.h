/*
 * The TCP transport's wire format, decoded without allocating (internal to libsaga_tcp).
 *
 * A stream is a sequence of frames: a 4-byte big-endian body length, then the body, one
 * msgpack array of exactly one of these layouts:
 *   DATA [1, token(uint), channel(str 1..256), payload(bin)]   sender -> receiver
 *   ACK  [2, token(uint)]                                       receiver -> sender
 *   NACK [3, token(uint), reason(str)]                          receiver -> sender
 * The decoder reads these few msgpack forms itself, checking every length against the bytes
 * that are really there, so a hostile body can neither make it allocate nor read past the
 * end: msgpack-c's general unpacker is never given network bytes.
 */
#ifndef SAGA_TCP_FRAME_H
#define SAGA_TCP_FRAME_H

#include <stddef.h>
#include <stdint.h>

enum { SAGA_TCP_DATA = 1, SAGA_TCP_ACK = 2, SAGA_TCP_NACK = 3 };
#define SAGA_TCP_CHANNEL_MAX 256

/* One decoded frame; pointers into the decoded body. */
typedef struct saga__tcp_frame {
  int kind;
  uint64_t token;
  const char *channel; /* DATA: not NUL-terminated */
  size_t channel_len;
  const void *payload; /* DATA: the payload; NACK: the reason */
  size_t payload_len;
} saga__tcp_frame;

/* Decodes one frame body of len bytes. Returns NULL, or the reason it is malformed. */
const char *saga__tcp_frame_decode(const void *body, size_t len, saga__tcp_frame *out);

/* The bytes saga__tcp_frame_encode() writes for f, length prefix included. */
size_t saga__tcp_frame_size(const saga__tcp_frame *f);

/* Writes f (length prefix included) to out, which has saga__tcp_frame_size(f) bytes. */
void saga__tcp_frame_encode(const saga__tcp_frame *f, void *out);

/* Called for each complete frame; returns NULL to go on or a reason to stop. */
typedef const char *(*saga__tcp_frame_fn)(void *ctx, const saga__tcp_frame *f);

/*
 * Splits buf[0..len) into frames and calls fn for each complete one, in order. Sets *used to
 * the bytes of the complete frames consumed (the rest is an incomplete frame to keep). Returns
 * NULL, or the reason the stream is malformed (a length over max_body, a body that does not
 * decode, or fn's reason); the caller then drops the connection.
 */
const char *saga__tcp_frames_split(const void *buf, size_t len, size_t max_body,
                                   saga__tcp_frame_fn fn, void *ctx, size_t *used);

#endif /* SAGA_TCP_FRAME_H */
