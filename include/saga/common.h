/**
 * @file
 * libsaga — common definitions: version, export macro, error codes, allocator hooks.
 *
 * Every function of libsaga that can fail returns an int: SAGA_OK (0) on success or one of the
 * negative SAGA_E* codes below. Codes are never renumbered; new ones are only appended.
 * Details (the SQLite, libuv or transport cause) are kept on the handle that failed, e.g.
 * saga_node_errmsg().
 */
#ifndef SAGA_COMMON_H
#define SAGA_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** @def SAGA_EXTERN
 * Marks a function the library exports (default visibility; dllexport when building it on
 * Windows). Every public function is declared with it. */
#if defined(_WIN32) && defined(SAGA_BUILDING)
#define SAGA_EXTERN __declspec(dllexport)
#elif defined(__GNUC__) && __GNUC__ >= 4
#define SAGA_EXTERN __attribute__((visibility("default")))
#else
#define SAGA_EXTERN
#endif

#define SAGA_VERSION_MAJOR 0         /**< major version of these headers */
#define SAGA_VERSION_MINOR 2         /**< minor version of these headers */
#define SAGA_VERSION_PATCH 0         /**< patch version of these headers */
#define SAGA_VERSION_STRING "0.2.0" /**< "major.minor.patch" of these headers */

/** Returns SAGA_VERSION_STRING of the library actually linked. */
SAGA_EXTERN const char *saga_version(void);

/**
 * The error table: one XX(NAME, value, "message") per code. Produces the saga_error enum,
 * saga_strerror() and saga_err_name() from one list, so the three cannot disagree; a binding
 * may expand it too. Codes are only appended, never renumbered or reused.
 */
#define SAGA_ERRNO_MAP(XX)                                                                       \
  XX(OK, 0, "success")                                                                           \
  XX(EINVAL, -1, "invalid argument")                                                             \
  XX(ENOMEM, -2, "out of memory")                                                                \
  XX(ENOTFOUND, -3, "not found")                                                                 \
  XX(EEXIST, -4, "already exists")                                                               \
  XX(ESTORE, -5, "storage error")                                                                \
  XX(EFULL, -6, "storage full")                                                                  \
  XX(EREADONLY, -7, "storage is read-only")                                                      \
  XX(EMALFORMED, -8, "malformed message")                                                        \
  XX(ETOOBIG, -9, "message or value too large")                                                  \
  XX(EVERSION, -10, "unsupported version")                                                       \
  XX(ESTATE, -11, "operation not allowed in the current state")                                  \
  XX(EREFUSED, -12, "refused by the participant")                                                \
  XX(ETRANSPORT, -13, "transport error")                                                         \
  XX(ECLOSED, -14, "handle is closing or closed")                                                \
  XX(ENODEF, -15, "saga definition not registered")                                              \
  XX(ENOHANDLER, -16, "no handler for command")                                                  \
  XX(EDEFINITION, -17, "invalid saga definition")                                                \
  XX(ESCHEMA, -18, "database schema is newer than this library")                                 \
  XX(EIO, -19, "I/O error")                                                                      \
  XX(EBUSY, -20, "resource busy")                                                                \
  XX(ECORRUPT, -21, "database file is damaged")                                                \
  XX(EEXPIRED, -22, "record expired")                                                            \
  XX(ELOCKED, -23, "record held by another saga (semantic lock)")

/** Error codes. All failures are negative. */
typedef enum saga_error {
#define SAGA__ERR_ENUM(name, value, msg) SAGA_##name = (value),
  SAGA_ERRNO_MAP(SAGA__ERR_ENUM)
#undef SAGA__ERR_ENUM
} saga_error;

/**
 * Human-readable text for an error code. Returns a static string; never NULL (unknown codes
 * give "unknown error").
 */
SAGA_EXTERN const char *saga_strerror(int code);

/** The code's name without prefix, e.g. "ENOMEM". Static string; "UNKNOWN" for unknown codes. */
SAGA_EXTERN const char *saga_err_name(int code);

/**
 * Allocator hooks. Pass one in a config to route every allocation libsaga makes itself
 * through your functions (msgpack-c and SQLite keep their own allocators). The struct is
 * copied; the functions must behave like malloc/realloc/free, and free(NULL) must be a no-op.
 * Pass NULL wherever an allocator is accepted to use the C library's.
 */
typedef struct saga_allocator {
  /** Allocates size bytes, like malloc(); returns NULL when out of memory. */
  void *(*malloc)(size_t size, void *ud);
  /** Resizes ptr (NULL: allocates) to size bytes, like realloc(); NULL when out of memory,
   * leaving ptr untouched. */
  void *(*realloc)(void *ptr, size_t size, void *ud);
  /** Frees ptr, like free(); free(NULL) must do nothing. */
  void (*free)(void *ptr, void *ud);
  void *ud; /**< passed as the last argument of each of the three functions */
} saga_allocator;

/** Log levels for the log hooks of configs. */
typedef enum saga_log_level {
  SAGA_LOG_DEBUG = 0,
  SAGA_LOG_INFO = 1,
  SAGA_LOG_WARN = 2,
  SAGA_LOG_ERROR = 3
} saga_log_level;

/** A log hook: msg is NUL-terminated and borrowed for the call. */
typedef void (*saga_log_fn)(void *arg, saga_log_level level, const char *msg);

/** Decoding limits used for every message and every saga data blob. Embedded by value in
 * saga_node_config and read through a pointer by saga_envelope_decode(), so its layout is
 * frozen (docs/abi.md): it never grows. */
typedef struct saga_limits {
  size_t max_message_bytes; /**< whole encoded envelope; default 1 MiB */
  size_t max_data_entries;  /**< keys in one saga data map; default 256 */
  size_t max_string_bytes;  /**< ids, names, header values; default 1024 */
  size_t max_headers;       /**< entries in the header map; default 32 */
} saga_limits;

/** Fills *lim with the defaults listed in saga_limits. */
SAGA_EXTERN void saga_limits_init(saga_limits *lim);

#ifdef __cplusplus
}
#endif
#endif /* SAGA_COMMON_H */
