"""ctypes declarations of the libsaga C API (include/saga/*.h), libuv and SQLite.

Only this module knows the C layouts. Structs the library fills or reads are declared field
for field as the headers have them; configs are initialised with the ``*_init_sized``
functions and the struct's own size (docs/abi.md), so a newer library never writes past them.
"""
import ctypes
import ctypes.util
import glob
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char, c_char_p, c_double, c_int, c_int64,
                    c_size_t, c_uint, c_uint32, c_uint64, c_void_p)

SONAME_VERSION = "0.2"  # the SONAME suffix this binding's declarations match (docs/abi.md)


def _candidates(base):
    """Where to look for lib<base>.so: $LIBSAGA_LIBRARY (a file or a directory), the build
    trees of a source checkout, then the dynamic linker's search path (the install prefix)."""
    env = os.environ.get("LIBSAGA_LIBRARY", "")
    out = []
    if env:
        d = env if os.path.isdir(env) else os.path.dirname(env)
        if base == "saga" and not os.path.isdir(env):
            out.append(env)
        out.append(os.path.join(d, "lib%s.so.%s" % (base, SONAME_VERSION)))
        out.append(os.path.join(d, "lib%s.so" % base))
        return out, True
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.normpath(os.path.join(here, "..", "..", ".."))
    if os.path.isfile(os.path.join(src, "include", "saga.h")):
        for so in sorted(glob.glob(os.path.join(src, "build", "*", "lib%s.so.%s" %
                                                (base, SONAME_VERSION)))):
            out.append(so)
    for prefix in (os.environ.get("LIBSAGA_PREFIX", ""), "/usr/local", "/usr"):
        if prefix:
            out.append(os.path.join(prefix, "lib", "lib%s.so.%s" % (base, SONAME_VERSION)))
    out.append("lib%s.so.%s" % (base, SONAME_VERSION))
    found = ctypes.util.find_library(base)
    if found:
        out.append(found)
    return out, False


def _load(base, required=True):
    names, from_env = _candidates(base)
    errors = []
    for n in names:
        if os.sep in n and not os.path.exists(n):
            continue
        try:
            return ctypes.CDLL(n, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            errors.append("%s: %s" % (n, e))
    if not required:
        return None
    where = "LIBSAGA_LIBRARY=%s" % os.environ["LIBSAGA_LIBRARY"] if from_env else \
        "the build tree, the install prefix or the linker path"
    raise ImportError("libsaga: cannot load lib%s.so.%s from %s (set LIBSAGA_LIBRARY to the "
                      "built library or its directory)%s" %
                      (base, SONAME_VERSION, where,
                       "; tried: " + "; ".join(errors) if errors else ""))


lib = _load("saga")
# libuv and SQLite: the very instances libsaga is linked with (same SONAMEs, already loaded).
uv = ctypes.CDLL("libuv.so.1")
sqlite = ctypes.CDLL("libsqlite3.so.0")


def _adapter(base):
    """An adapter library (tcp, nats, redis) next to libsaga, or None when not built."""
    d = os.path.dirname(getattr(lib, "_name", "") or "")
    if d:
        p = os.path.join(d, "lib%s.so.%s" % (base, SONAME_VERSION))
        if os.path.exists(p):
            return ctypes.CDLL(p)
    try:
        return _load(base, required=False)
    except OSError:
        return None


def _fn(dll, name, restype, *argtypes):
    f = getattr(dll, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


# ---- callbacks (CFUNCTYPE: ctypes takes the GIL for every call from C) ----------------------
LOG_FN = CFUNCTYPE(None, c_void_p, c_int, c_char_p)
HANDLER_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p, c_void_p)
POST_FN = CFUNCTYPE(None, c_void_p, c_void_p)
START_CB = CFUNCTYPE(None, c_void_p, c_int, c_char_p, c_int, c_void_p)
DONE_CB = CFUNCTYPE(None, c_void_p, c_int, c_void_p)
WATCH_CB = CFUNCTYPE(None, c_void_p, c_int, c_char_p, c_int, c_void_p)
CLOSE_CB = CFUNCTYPE(None, c_void_p)
EVENT_CB = CFUNCTYPE(None, c_void_p, c_void_p, c_void_p)
ASYNC_CB = CFUNCTYPE(None, c_void_p)


# ---- structs ---------------------------------------------------------------------------------
class Limits(Structure):
    _fields_ = [("max_message_bytes", c_size_t), ("max_data_entries", c_size_t),
                ("max_string_bytes", c_size_t), ("max_headers", c_size_t)]


class Retention(Structure):
    _fields_ = [("finished_ms", c_uint64), ("max_finished", c_uint64), ("inbox_ms", c_uint64),
                ("batch", c_uint32), ("interval_ms", c_uint32)]


class NodeConfig(Structure):  # saga_node_config, struct_version 5
    _fields_ = [
        ("struct_version", c_int), ("name", c_char_p), ("db_path", c_char_p), ("vfs", c_char_p),
        ("synchronous", c_int), ("transport", c_void_p), ("clock", c_void_p),
        ("alloc", c_void_p), ("log", LOG_FN), ("log_arg", c_void_p), ("random", c_void_p),
        ("random_arg", c_void_p), ("on_event", EVENT_CB), ("event_arg", c_void_p),
        ("resend_ms", c_uint32), ("batch_max", c_uint32), ("limits", Limits),
        ("busy_timeout_ms", c_uint32), ("max_deliveries", c_uint32), ("test_hook", c_void_p),
        ("test_hook_arg", c_void_p), ("event_channel", c_char_p),
        ("retention", Retention),                                       # version 2
        ("checkpoint", c_int), ("checkpoint_pages", c_uint32),          # version 3
        ("db_mode", c_int), ("db_check", c_int),                        # version 4
        ("on_span", c_void_p), ("span_arg", c_void_p),                  # version 5
    ]


class Event(Structure):  # saga_event (read only, allocated by the library)
    _fields_ = [("type", c_int), ("saga_id", c_char_p), ("definition", c_char_p),
                ("version", c_uint32), ("step", c_int), ("step_name", c_char_p),
                ("attempt", c_uint32), ("state", c_int), ("detail", c_char_p),
                ("at_ms", c_uint64), ("data", c_void_p), ("traceparent", c_char_p)]


class Info(Structure):  # saga_info (read only, allocated by saga_get)
    _fields_ = [("id", c_char * 40), ("definition", c_char_p), ("version", c_uint32),
                ("state", c_int), ("step", c_int), ("attempt", c_uint32), ("error", c_char_p),
                ("data", c_void_p), ("created_ms", c_uint64), ("updated_ms", c_uint64),
                ("deadline_ms", c_uint64)]


LATENCY_BUCKETS = 14


class NodeStats(Structure):
    _fields_ = [(n, c_uint64) for n in (
        "transactions", "work_items", "commit_failures", "sent", "resent", "acked_out",
        "delivered", "duplicates", "dead_letters", "handler_runs")] + [
        ("step_latency", c_uint64 * LATENCY_BUCKETS)] + [(n, c_uint64) for n in (
            "step_latency_count", "step_latency_sum_ms", "purged_sagas", "purged_inbox",
            "purged_steps", "purge_passes", "replayed_tx", "checkpoints", "checkpoints_inline",
            "checkpoint_failures", "stale_replies", "reply_to_refused", "unsendable",
            "forged_replies", "handler_contract_errors", "compensations_expired",
            "replies_parked", "outbox_oldest_ms", "outbox_stuck_channels",
            "purged_dead_letters", "send_refusals")]


class MemFaults(Structure):
    _fields_ = [("seed", c_uint64), ("drop", c_double), ("duplicate", c_double),
                ("reorder", c_double), ("delay", c_double), ("delay_max_ms", c_uint32),
                ("drop_ack", c_double)]


class MemStats(Structure):
    _fields_ = [(n, c_uint64) for n in ("sent", "delivered", "dropped", "duplicated",
                                        "reordered", "delayed", "acked", "acks_dropped",
                                        "waiting")]


class TcpRoute(Structure):
    _fields_ = [("channel", c_char_p), ("address", c_char_p), ("identity", c_char_p)]


class TcpAllow(Structure):
    _fields_ = [("identity", c_char_p), ("channel", c_char_p)]


class TcpConfig(Structure):  # saga_tcp_config, struct_version 2
    _fields_ = [
        ("struct_version", c_int), ("listen", c_char_p), ("routes", POINTER(TcpRoute)),
        ("nroutes", c_size_t), ("max_frame_bytes", c_size_t), ("max_queued_bytes", c_size_t),
        ("reconnect_min_ms", c_uint32), ("reconnect_max_ms", c_uint32), ("alloc", c_void_p),
        ("tls_ca_file", c_char_p), ("tls_cert_file", c_char_p), ("tls_key_file", c_char_p),
        ("allow", POINTER(TcpAllow)), ("nallow", c_size_t), ("insecure_plaintext", c_int),
        ("max_connections", c_uint32), ("max_connections_per_ip", c_uint32),
        ("handshake_timeout_ms", c_uint32), ("idle_timeout_ms", c_uint32),
        ("max_reply_queue_bytes", c_size_t)]


class TcpStats(Structure):
    _fields_ = [(n, c_uint64) for n in (
        "connections_accepted", "connections_refused", "handshakes_failed", "frames_refused",
        "frames_malformed", "acks_ignored", "idle_closed", "slow_readers_dropped")]


class NatsConfig(Structure):  # saga_nats_config, struct_version 3
    _fields_ = [
        ("struct_version", c_int), ("url", c_char_p), ("stream", c_char_p), ("prefix", c_char_p),
        ("ack_wait_ms", c_uint32), ("max_deliveries", c_uint32), ("reconnect_wait_ms", c_uint32),
        ("alloc", c_void_p), ("user", c_char_p), ("password", c_char_p), ("token", c_char_p),
        ("nkey", c_char_p), ("nkey_seed_file", c_char_p), ("creds_file", c_char_p),
        ("tls_ca_file", c_char_p), ("tls_cert_file", c_char_p), ("tls_key_file", c_char_p),
        ("tls_required", c_int), ("tls_hostname", c_char_p), ("inbox_prefix", c_char_p),
        ("fail_fast", c_int)]


class RedisConfig(Structure):  # saga_redis_config, struct_version 3
    _fields_ = [
        ("struct_version", c_int), ("host", c_char_p), ("port", c_int), ("prefix", c_char_p),
        ("consumer", c_char_p), ("claim_idle_ms", c_uint32), ("max_deliveries", c_uint32),
        ("reconnect_min_ms", c_uint32), ("reconnect_max_ms", c_uint32), ("alloc", c_void_p),
        ("username", c_char_p), ("password", c_char_p), ("fail_fast", c_int)]


# ---- libsaga ---------------------------------------------------------------------------------
vp = c_void_p
saga_version = _fn(lib, "saga_version", c_char_p)
saga_strerror = _fn(lib, "saga_strerror", c_char_p, c_int)
saga_err_name = _fn(lib, "saga_err_name", c_char_p, c_int)
saga_state_name = _fn(lib, "saga_state_name", c_char_p, c_int)
saga_event_name = _fn(lib, "saga_event_name", c_char_p, c_int)
saga_free = _fn(lib, "saga_free", None, vp, vp)

saga_data_new = _fn(lib, "saga_data_new", c_int, POINTER(vp), vp)
saga_data_free = _fn(lib, "saga_data_free", None, vp)
saga_data_set = _fn(lib, "saga_data_set", c_int, vp, c_char_p, c_char_p, c_size_t)
saga_data_set_i64 = _fn(lib, "saga_data_set_i64", c_int, vp, c_char_p, c_int64)
saga_data_count = _fn(lib, "saga_data_count", c_size_t, vp)
saga_data_at = _fn(lib, "saga_data_at", c_int, vp, c_size_t, POINTER(c_char_p), POINTER(vp),
                   POINTER(c_size_t))

saga_node_config_init_sized = _fn(lib, "saga_node_config_init_sized", c_int,
                                  POINTER(NodeConfig), c_size_t)
saga_node_open = _fn(lib, "saga_node_open", c_int, POINTER(vp), vp, POINTER(NodeConfig),
                     ctypes.c_char_p, c_size_t)
saga_node_close = _fn(lib, "saga_node_close", None, vp, CLOSE_CB, vp)
saga_node_errmsg = _fn(lib, "saga_node_errmsg", c_char_p, vp)
saga_node_db = _fn(lib, "saga_node_db", vp, vp)
saga_node_register = _fn(lib, "saga_node_register", c_int, vp, vp)
saga_node_handle = _fn(lib, "saga_node_handle", c_int, vp, c_char_p, c_char_p, HANDLER_FN, vp)
saga_node_start = _fn(lib, "saga_node_start", c_int, vp, POINTER(c_uint64))
saga_start_traced = _fn(lib, "saga_start_traced", c_int, vp, c_char_p, vp, c_char_p, c_char_p,
                        START_CB, vp)
saga_node_subscribe_events = _fn(lib, "saga_node_subscribe_events", c_int, vp, c_char_p,
                                 EVENT_CB, vp)
saga_cancel = _fn(lib, "saga_cancel", c_int, vp, c_char_p, DONE_CB, vp)
saga_retry_failed = _fn(lib, "saga_retry_failed", c_int, vp, c_char_p, DONE_CB, vp)
saga_node_watch = _fn(lib, "saga_node_watch", c_int, vp, c_char_p, WATCH_CB, vp)
saga_get = _fn(lib, "saga_get", c_int, vp, c_char_p, POINTER(POINTER(Info)))
saga_info_free = _fn(lib, "saga_info_free", None, POINTER(Info))
saga_node_post = _fn(lib, "saga_node_post", c_int, vp, POST_FN, vp)
saga_node_stats_get = _fn(lib, "saga_node_stats_get", c_int, vp, POINTER(NodeStats), c_size_t)
saga_node_count_by_state = _fn(lib, "saga_node_count_by_state", c_int, vp, c_int64 * 6)
saga_node_outbox_depth = _fn(lib, "saga_node_outbox_depth", c_int64, vp)
saga_node_metrics = _fn(lib, "saga_node_metrics", c_int, vp, POINTER(vp), POINTER(c_size_t))
saga_node_transport_connected = _fn(lib, "saga_node_transport_connected", c_int, vp)
saga_transport_free = _fn(lib, "saga_transport_free", None, vp)

saga_tx_db = _fn(lib, "saga_tx_db", vp, vp)
saga_msg_saga_id = _fn(lib, "saga_msg_saga_id", c_char_p, vp)
saga_msg_command = _fn(lib, "saga_msg_command", c_char_p, vp)
saga_msg_id = _fn(lib, "saga_msg_id", c_char_p, vp)
saga_msg_step = _fn(lib, "saga_msg_step", c_uint32, vp)
saga_msg_attempt = _fn(lib, "saga_msg_attempt", c_uint32, vp)
saga_msg_is_compensation = _fn(lib, "saga_msg_is_compensation", c_int, vp)
saga_msg_data = _fn(lib, "saga_msg_data", vp, vp)
saga_msg_header = _fn(lib, "saga_msg_header", c_char_p, vp, c_char_p)
saga_msg_traceparent = _fn(lib, "saga_msg_traceparent", c_char_p, vp)
saga_tx_start = _fn(lib, "saga_tx_start", c_int, vp, c_char_p, vp, c_char_p, c_char_p,
                    c_size_t, POINTER(c_int))
saga_reply_set = _fn(lib, "saga_reply_set", c_int, vp, c_char_p, c_char_p, c_size_t)
saga_reply_set_i64 = _fn(lib, "saga_reply_set_i64", c_int, vp, c_char_p, c_int64)
saga_reply_fail = _fn(lib, "saga_reply_fail", c_int, vp, c_char_p)

saga_def_builder_new = _fn(lib, "saga_def_builder_new", c_int, POINTER(vp), c_char_p, c_uint32,
                           vp)
saga_def_builder_free = _fn(lib, "saga_def_builder_free", None, vp)
saga_def_builder_add_step = _fn(lib, "saga_def_builder_add_step", c_int, vp, c_char_p, c_char_p,
                                c_char_p, c_char_p, c_int)
saga_def_builder_add_local_step = _fn(lib, "saga_def_builder_add_local_step", c_int, vp,
                                      c_char_p, HANDLER_FN, HANDLER_FN, vp, c_int)
saga_def_builder_set_retry = _fn(lib, "saga_def_builder_set_retry", c_int, vp, c_int, c_uint32,
                                 c_uint32, c_double, c_uint32, c_double, c_int)
saga_def_builder_set_compensation_retry = _fn(lib, "saga_def_builder_set_compensation_retry",
                                              c_int, vp, c_int, c_uint32, c_uint32, c_double,
                                              c_uint32, c_double)
saga_def_builder_set_timeout = _fn(lib, "saga_def_builder_set_timeout", c_int, vp, c_int,
                                   c_uint32)
saga_def_builder_set_deadline = _fn(lib, "saga_def_builder_set_deadline", c_int, vp, c_uint32)
saga_def_builder_definition = _fn(lib, "saga_def_builder_definition", vp, vp)
saga_definition_validate = _fn(lib, "saga_definition_validate", c_int, vp, c_char_p, c_size_t)

saga_mem_hub_new = _fn(lib, "saga_mem_hub_new", c_int, POINTER(vp), vp, vp, POINTER(MemFaults),
                       vp)
saga_mem_hub_close = _fn(lib, "saga_mem_hub_close", c_int, vp)
saga_mem_hub_set_faults = _fn(lib, "saga_mem_hub_set_faults", None, vp, POINTER(MemFaults))
saga_mem_hub_stats = _fn(lib, "saga_mem_hub_stats", c_int, vp, POINTER(MemStats), c_size_t)
saga_mem_transport_new = _fn(lib, "saga_mem_transport_new", c_int, POINTER(vp), vp)

tcp = _adapter("saga_tcp")
nats = _adapter("saga_nats")
redis = _adapter("saga_redis")
if tcp is not None:
    saga_tcp_config_init_sized = _fn(tcp, "saga_tcp_config_init_sized", c_int, POINTER(TcpConfig),
                                     c_size_t)
    saga_tcp_transport_new2 = _fn(tcp, "saga_tcp_transport_new2", c_int, POINTER(vp),
                                  POINTER(TcpConfig), c_char_p, c_size_t)
    saga_tcp_stats_get = _fn(tcp, "saga_tcp_stats_get", c_int, vp, POINTER(TcpStats), c_size_t)
if nats is not None:
    saga_nats_config_init = _fn(nats, "saga_nats_config_init", None, POINTER(NatsConfig))
    saga_nats_transport_new = _fn(nats, "saga_nats_transport_new", c_int, POINTER(vp),
                                  POINTER(NatsConfig))
if redis is not None:
    saga_redis_config_init_sized = _fn(redis, "saga_redis_config_init_sized", c_int,
                                       POINTER(RedisConfig), c_size_t)
    saga_redis_transport_new = _fn(redis, "saga_redis_transport_new", c_int, POINTER(vp),
                                   POINTER(RedisConfig))

# ---- libuv: a loop of the binding's own, and one async handle to wake it ----------------------
UV_ASYNC = 1
UV_RUN_DEFAULT = 0
uv_loop_size = _fn(uv, "uv_loop_size", c_size_t)
uv_handle_size = _fn(uv, "uv_handle_size", c_size_t, c_int)
uv_loop_init = _fn(uv, "uv_loop_init", c_int, vp)
uv_loop_close = _fn(uv, "uv_loop_close", c_int, vp)
uv_run = _fn(uv, "uv_run", c_int, vp, c_int)
uv_async_init = _fn(uv, "uv_async_init", c_int, vp, vp, ASYNC_CB)
uv_async_send = _fn(uv, "uv_async_send", c_int, vp)
uv_close = _fn(uv, "uv_close", None, vp, vp)
uv_strerror = _fn(uv, "uv_strerror", c_char_p, c_int)

# ---- SQLite, on the connection saga_tx_db() / saga_node_db() hands out -----------------------
SQLITE_TRANSIENT = c_void_p(-1)
sqlite3_prepare_v2 = _fn(sqlite, "sqlite3_prepare_v2", c_int, vp, c_char_p, c_int, POINTER(vp),
                         POINTER(vp))
sqlite3_finalize = _fn(sqlite, "sqlite3_finalize", c_int, vp)
sqlite3_step = _fn(sqlite, "sqlite3_step", c_int, vp)
sqlite3_bind_parameter_count = _fn(sqlite, "sqlite3_bind_parameter_count", c_int, vp)
sqlite3_bind_parameter_name = _fn(sqlite, "sqlite3_bind_parameter_name", c_char_p, vp, c_int)
sqlite3_bind_null = _fn(sqlite, "sqlite3_bind_null", c_int, vp, c_int)
sqlite3_bind_int64 = _fn(sqlite, "sqlite3_bind_int64", c_int, vp, c_int, c_int64)
sqlite3_bind_double = _fn(sqlite, "sqlite3_bind_double", c_int, vp, c_int, c_double)
sqlite3_bind_text = _fn(sqlite, "sqlite3_bind_text", c_int, vp, c_int, c_char_p, c_int, vp)
sqlite3_bind_blob = _fn(sqlite, "sqlite3_bind_blob", c_int, vp, c_int, c_char_p, c_int, vp)
sqlite3_column_count = _fn(sqlite, "sqlite3_column_count", c_int, vp)
sqlite3_column_type = _fn(sqlite, "sqlite3_column_type", c_int, vp, c_int)
sqlite3_column_int64 = _fn(sqlite, "sqlite3_column_int64", c_int64, vp, c_int)
sqlite3_column_double = _fn(sqlite, "sqlite3_column_double", c_double, vp, c_int)
sqlite3_column_blob = _fn(sqlite, "sqlite3_column_blob", vp, vp, c_int)
sqlite3_column_text = _fn(sqlite, "sqlite3_column_text", vp, vp, c_int)
sqlite3_column_bytes = _fn(sqlite, "sqlite3_column_bytes", c_int, vp, c_int)
sqlite3_changes = _fn(sqlite, "sqlite3_changes", c_int, vp)
sqlite3_last_insert_rowid = _fn(sqlite, "sqlite3_last_insert_rowid", c_int64, vp)
sqlite3_errmsg = _fn(sqlite, "sqlite3_errmsg", c_char_p, vp)
sqlite3_extended_errcode = _fn(sqlite, "sqlite3_extended_errcode", c_int, vp)
sqlite3_get_autocommit = _fn(sqlite, "sqlite3_get_autocommit", c_int, vp)
