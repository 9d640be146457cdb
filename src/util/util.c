/* Error table, allocator helpers, byte buffers, randomness. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "../internal.h"

const char *saga_version(void) { return SAGA_VERSION_STRING; }

const char *saga_strerror(int code) {
  switch (code) {
#define SAGA__ERR_STR(name, value, msg) \
  case (value):                         \
    return msg;
    SAGA_ERRNO_MAP(SAGA__ERR_STR)
#undef SAGA__ERR_STR
  default:
    return "unknown error";
  }
}

const char *saga_err_name(int code) {
  switch (code) {
#define SAGA__ERR_NAME(name, value, msg) \
  case (value):                          \
    return #name;
    SAGA_ERRNO_MAP(SAGA__ERR_NAME)
#undef SAGA__ERR_NAME
  default:
    return "UNKNOWN";
  }
}

void saga_limits_init(saga_limits *lim) {
  if (lim == NULL) return;
  lim->max_message_bytes = 1u << 20;
  lim->max_data_entries = 256;
  lim->max_string_bytes = 1024;
  lim->max_headers = 32;
}

static void *libc_malloc(size_t n, void *ud) {
  (void)ud;
  return malloc(n);
}
static void *libc_realloc(void *p, size_t n, void *ud) {
  (void)ud;
  return realloc(p, n);
}
static void libc_free(void *p, void *ud) {
  (void)ud;
  free(p);
}
static const saga_allocator libc_alloc = {libc_malloc, libc_realloc, libc_free, NULL};

const saga_allocator *saga__alloc_resolve(const saga_allocator *a) {
  return a != NULL ? a : &libc_alloc;
}

void *saga__malloc(const saga_allocator *a, size_t n) {
  a = saga__alloc_resolve(a);
  return a->malloc(n == 0 ? 1 : n, a->ud);
}

void *saga__calloc(const saga_allocator *a, size_t n) {
  void *p = saga__malloc(a, n);
  if (p != NULL) memset(p, 0, n == 0 ? 1 : n);
  return p;
}

void *saga__realloc(const saga_allocator *a, void *p, size_t n) {
  a = saga__alloc_resolve(a);
  return a->realloc(p, n == 0 ? 1 : n, a->ud);
}

void saga__free(const saga_allocator *a, void *p) {
  if (p == NULL) return;
  a = saga__alloc_resolve(a);
  a->free(p, a->ud);
}

void saga_free(const saga_allocator *alloc, void *ptr) { saga__free(alloc, ptr); }

char *saga__strndup(const saga_allocator *a, const char *s, size_t n) {
  char *p = saga__malloc(a, n + 1);
  if (p == NULL) return NULL;
  if (n > 0) memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

char *saga__strdup(const saga_allocator *a, const char *s) {
  return saga__strndup(a, s, strlen(s));
}

void saga__buf_init(saga__buf *b, const saga_allocator *a) {
  b->data = NULL;
  b->len = b->cap = 0;
  b->alloc = saga__alloc_resolve(a);
}

int saga__buf_reserve(saga__buf *b, size_t extra) {
  if (b->cap - b->len >= extra) return SAGA_OK;
  if (extra > SIZE_MAX / 2 - b->len) return SAGA_ENOMEM;
  size_t cap = b->cap ? b->cap : 256;
  while (cap - b->len < extra) cap *= 2;
  uint8_t *p = saga__realloc(b->alloc, b->data, cap);
  if (p == NULL) return SAGA_ENOMEM;
  b->data = p;
  b->cap = cap;
  return SAGA_OK;
}

int saga__buf_append(saga__buf *b, const void *p, size_t n) {
  if (n == 0) return SAGA_OK;
  int rc = saga__buf_reserve(b, n);
  if (rc != SAGA_OK) return rc;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return SAGA_OK;
}

void saga__buf_reset(saga__buf *b) { b->len = 0; }

void saga__buf_free(saga__buf *b) {
  saga__free(b->alloc, b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

void saga__errf(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

void saga__copy_sized(void *out, size_t size, const void *src, size_t have) {
  size_t n = size < have ? size : have;
  memcpy(out, src, n);
  if (size > n) memset((char *)out + n, 0, size - n);
}

void saga__printable(char *out, size_t out_len, const char *s, size_t len) {
  size_t max = out_len - 1, k = 0;
  for (; k < len && k < max; k++)
    out[k] = (unsigned char)s[k] < 0x20 || s[k] == 0x7f ? '?' : s[k];
  out[k] = '\0';
  if (k < len) memcpy(out + max - 3, "...", 4);
}

uint64_t saga__splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t saga__os_random(void) {
  uint64_t v = 0;
  if (saga__os_random_bytes(&v, sizeof v) == SAGA_OK) return v;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t s = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)(uintptr_t)&v;
  return saga__splitmix64(&s);
}

/* /dev/urandom, for kernels without getrandom(2) (before Linux 3.17). */
static int urandom_bytes(uint8_t *p, size_t len) {
  int fd;
  do {
    fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return SAGA_EIO;
  while (len > 0) {
    ssize_t got = read(fd, p, len);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      close(fd);
      return SAGA_EIO;
    }
    p += got;
    len -= (size_t)got;
  }
  close(fd);
  return SAGA_OK;
}

int saga__os_random_bytes(void *buf, size_t len) {
  uint8_t *p = buf;
  size_t left = len;
  while (left > 0) {
    /* Blocks only until the kernel's pool is first initialised (early boot). Requests of up
     * to 256 bytes are never cut short once it is; larger ones may be, hence the loop. */
    ssize_t got = getrandom(p, left, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && errno == ENOSYS) {
      if (urandom_bytes(p, left) == SAGA_OK) return SAGA_OK;
      break;
    }
    if (got <= 0) break;
    p += got;
    left -= (size_t)got;
  }
  if (left == 0) return SAGA_OK;
  memset(buf, 0, len);
  return SAGA_EIO;
}

/* Forks seen by this process's children: a child's generators must not hand out the bytes
 * buffered before the fork (its parent hands out the same ones). pthread_atfork's child
 * handler counts them, so a draw only compares a number; where the handler could not be
 * registered, every draw asks getpid() instead (a system call: some 0.1-2 us). */
static atomic_uint fork_gen;
static int atfork_ok;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void on_fork_child(void) { atomic_fetch_add_explicit(&fork_gen, 1, memory_order_relaxed); }
static void register_atfork(void) { atfork_ok = pthread_atfork(NULL, NULL, on_fork_child) == 0; }

void saga__csprng_init(saga__csprng *r) {
  pthread_once(&atfork_once, register_atfork);
  memset(r->buf, 0, sizeof r->buf);
  r->pos = sizeof r->buf;
  r->gen = 0;
  r->pid = 0;
}

int saga__csprng_bytes(saga__csprng *r, void *out, size_t len) {
  uint8_t *o = out;
  unsigned gen = atomic_load_explicit(&fork_gen, memory_order_relaxed);
  long pid = atfork_ok ? 0 : (long)getpid();
  if (gen != r->gen || pid != r->pid) r->pos = sizeof r->buf; /* forked: drop the bytes */
  while (len > 0) {
    if (r->pos == sizeof r->buf) {
      int rc = saga__os_random_bytes(r->buf, sizeof r->buf);
      if (rc != SAGA_OK) {
        memset(out, 0, (size_t)(o - (uint8_t *)out) + len);
        return rc;
      }
      r->pos = 0;
      r->gen = gen;
      r->pid = pid;
    }
    size_t take = sizeof r->buf - r->pos;
    if (take > len) take = len;
    memcpy(o, r->buf + r->pos, take);
    memset(r->buf + r->pos, 0, take);
    r->pos += take;
    o += take;
    len -= take;
  }
  return SAGA_OK;
}
