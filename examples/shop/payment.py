#!/usr/bin/env python3
"""The shop's payment service in Python (docs/shop.md, "A participant in Python"): the same
database schema, command (payment.charge on channel "payment"), replies and HTTP API as
payment.c, on the libsaga Python binding (bindings/python). It takes the shop binary's
command line for --service payment, so scripts/shop_cluster.sh start --python-payment runs it
in the distributed shop in place of the C service.

    payment.py --service payment --data DIR --port N --secret S --payment-limit N
               --transport tcp --tcp-listen H:P --tcp-route CH=H:P[@ID]... [--insecure-plaintext]
               [--tls-ca F --tls-cert F --tls-key F --tls-allow ID=CH...]
             | --transport nats [--nats URL] [--nats-user U --nats-password-file F]
               [--nats-tls-ca F] [--nats-tls-hostname H] [--nats-ack-wait MS]

HTTP: GET /healthz, GET /metrics, GET /api/payment/{purchase_id} (Bearer access token; the
payer only).
"""
import base64
import hashlib
import hmac
import http.server
import json
import logging
import os
import re
import signal
import sys
import threading
import time

try:
    import libsaga
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                    "bindings", "python"))
    import libsaga
from libsaga import Nats, Node, Refused, Tcp

SERVICE = "payment"
# The service's tables, by version (as payment.c's migrations[]; never edit a released one).
MIGRATIONS = [
    "CREATE TABLE IF NOT EXISTS payments ("
    "  purchase_id TEXT PRIMARY KEY,"
    "  customer_id INTEGER NOT NULL,"
    "  currency TEXT NOT NULL,"
    "  amount INTEGER NOT NULL CHECK (amount >= 0));",
    "ALTER TABLE payments ADD COLUMN saga_id TEXT;"
    "ALTER TABLE payments ADD COLUMN step INTEGER;"
    "CREATE UNIQUE INDEX payments_by_saga ON payments (saga_id, step);",
]


def usage(msg):
    print("payment.py: %s\n%s" % (msg, __doc__.split("\n\n")[1]), file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    o = {"routes": {}, "allow": [], "transport": "tcp", "payment_limit": 5000, "port": 0}
    multi = {"--tcp-route", "--tls-allow"}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--insecure-plaintext":
            o["insecure_plaintext"] = True
            i += 1
            continue
        if not a.startswith("--") or i + 1 >= len(argv):
            usage("unexpected argument %r" % a)
        v = argv[i + 1]
        i += 2
        if a == "--tcp-route":
            m = re.fullmatch(r"([^=]+)=([^@]+)(?:@(.+))?", v)
            if not m:
                usage("--tcp-route: %r is not CHANNEL=HOST:PORT[@IDENTITY]" % v)
            o["routes"][m.group(1)] = (m.group(2), m.group(3))
        elif a == "--tls-allow":
            ident, _, ch = v.partition("=")
            if not ident or not ch:
                usage("--tls-allow: %r is not IDENTITY=CHANNEL" % v)
            o["allow"].append((ident, ch))
        elif a in ("--port", "--payment-limit", "--nats-ack-wait"):
            if not v.isdigit():
                usage("%s: %r is not a non-negative integer" % (a, v))
            o[a[2:].replace("-", "_")] = int(v)
        elif a in ("--service", "--data", "--secret", "--bind", "--transport", "--tcp-listen",
                   "--tls-ca", "--tls-cert", "--tls-key", "--nats", "--nats-user",
                   "--nats-password-file", "--nats-tls-ca", "--nats-tls-hostname", "--otlp"):
            o[a[2:].replace("-", "_")] = v
        elif a not in multi:
            usage("unknown option %s" % a)
    if o.get("service", SERVICE) != SERVICE:
        usage("this is the payment service only (--service payment)")
    if "data" not in o or "secret" not in o:
        usage("--data and --secret are required")
    if o.get("otlp"):
        print("[payment] --otlp: the Python payment service exports no spans", file=sys.stderr)
    return o


# ---- tokens: HS256 JWTs as auth.c makes and checks them -------------------------------------
def b64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify_access(secret, header):
    """The customer id of a valid "Authorization: Bearer <access token>", or raise ValueError
    with the reason (as shop_auth_bearer says it)."""
    if header is None:
        raise ValueError("missing Authorization: Bearer token")
    if header[:7].lower() != "bearer ":
        raise ValueError("malformed Authorization header: expected Bearer token")
    token = header[7:].lstrip(" ")
    if not re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token) or \
            len(token) > 2048:
        raise ValueError("malformed token")
    h, p, s = token.split(".")
    try:
        head, claims, sig = json.loads(b64url(h)), json.loads(b64url(p)), b64url(s)
    except ValueError:
        raise ValueError("invalid token") from None
    good = hmac.new(secret.encode(), ("%s.%s" % (h, p)).encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(good, sig):
        raise ValueError("invalid token")
    if not isinstance(head, dict) or head.get("alg") != "HS256":
        raise ValueError("token algorithm not accepted")
    if not isinstance(claims, dict):
        raise ValueError("invalid token")
    typ, iat, exp, sub = (claims.get(k) for k in ("typ", "iat", "exp", "sub"))
    if not isinstance(typ, str) or type(iat) is not int or type(exp) is not int or \
            not isinstance(sub, str):
        raise ValueError("invalid token")
    if typ != "access":
        raise ValueError("not an access token")
    now = int(time.time())
    if exp <= now:
        raise ValueError("token expired")
    if iat > now + 60 or iat > exp or not re.fullmatch(r"[1-9][0-9]{0,17}", sub):
        raise ValueError("invalid token")
    return int(sub)


def purchase_id_json(pid):
    """As shop_purchase_id_json(): a number when the id is a canonical decimal integer."""
    if re.fullmatch(r"0|[1-9][0-9]*", pid) and int(pid) < 2 ** 63:
        return int(pid)
    return pid


# ---- the service -----------------------------------------------------------------------------
class Payment:
    def __init__(self, o):
        self.o = o
        self.limit = o["payment_limit"]
        self.responses = {}
        self.lock = threading.Lock()
        if o["transport"] == "tcp":
            t = Tcp(o.get("tcp_listen"), o["routes"], tls_ca=o.get("tls_ca"),
                    tls_cert=o.get("tls_cert"), tls_key=o.get("tls_key"), allow=o["allow"],
                    insecure_plaintext=o.get("insecure_plaintext", False), reconnect_max=1.0)
            if o.get("insecure_plaintext"):
                print("[payment] WARNING: --insecure-plaintext: node payment accepts any "
                      "command or reply from anyone who reaches %s" % o.get("tcp_listen"),
                      file=sys.stderr)
        elif o["transport"] == "nats":
            kw = dict(inbox_prefix="_INBOX.payment",
                      ack_wait=o.get("nats_ack_wait", 5000) / 1000.0)
            if o.get("nats_user"):
                with open(o["nats_password_file"]) as fh:
                    kw.update(user=o["nats_user"], password=fh.readline().strip())
            if o.get("nats_tls_ca"):
                kw["tls_ca_file"] = o["nats_tls_ca"]
            if o.get("nats_tls_hostname"):
                kw["tls_hostname"] = o["nats_tls_hostname"]
            t = Nats(o.get("nats", "nats://127.0.0.1:4222"), **kw)
        else:
            usage("--transport must be tcp or nats")
        os.makedirs(o["data"], exist_ok=True)
        self.node = Node(SERVICE, os.path.join(o["data"], "payment.db"), transport=t,
                         create=True)
        self.migrate()
        self.node.handle("payment", "payment.charge", self.charge)
        self.node.launch()

    def migrate(self):
        """shop_schema_migrate(): the shop_schema table records each service's version."""
        n = self.node
        n.execute("BEGIN IMMEDIATE")
        try:
            n.execute("CREATE TABLE IF NOT EXISTS shop_schema (service TEXT PRIMARY KEY,"
                      " version INTEGER NOT NULL)")
            row = n.query("SELECT version FROM shop_schema WHERE service = ?", (SERVICE,))
            have = row[0][0] if row else 0
            if have > len(MIGRATIONS):
                raise SystemExit("[payment] the database is at schema version %d, newer than "
                                 "this service (%d)" % (have, len(MIGRATIONS)))
            for v in range(have, len(MIGRATIONS)):
                n.execute(MIGRATIONS[v])
                n.execute("INSERT INTO shop_schema (service, version) VALUES (?, ?) ON CONFLICT "
                          "(service) DO UPDATE SET version = excluded.version", (SERVICE, v + 1))
            n.execute("COMMIT")
        except BaseException:
            n.execute("ROLLBACK")
            raise

    def charge(self, tx):
        """payment.charge: data purchase_id, customer_id, currency, total. No reply data.
        Keyed by purchase id; records the saga and step that charged it (from the command's
        envelope, never from its data)."""
        pid = tx.text("purchase_id")
        try:
            customer = tx.int("customer_id")
        except ValueError:
            customer = None
        if not pid or customer is None:
            raise Refused("malformed purchase: purchase_id and customer_id are required")
        row = tx.query_one("SELECT saga_id, step FROM payments WHERE purchase_id = ?", (pid,))
        if row is not None:
            if row[0] == tx.saga_id and row[1] == tx.step:
                return None  # charged once by this saga, answered the same
            raise Refused("payment refused: the purchase is already paid by another saga")
        currency = tx.text("currency")
        if currency not in ("NT", "US"):
            raise Refused("payment refused: the currency must be NT or US")
        try:
            total = tx.int("total")
        except ValueError:
            total = None
        if total is None or total < 0:
            raise Refused("payment refused: no valid total to charge")
        if total > self.limit:
            raise Refused("payment refused: amount %d over the limit %d" % (total, self.limit))
        tx.execute("INSERT INTO payments (purchase_id, customer_id, currency, amount, saga_id, "
                   "step) VALUES (?, ?, ?, ?, ?, ?)",
                   (pid, customer, currency, total, tx.saga_id, tx.step))
        return None

    # -- HTTP --
    def count(self, code):
        with self.lock:
            self.responses[code] = self.responses.get(code, 0) + 1

    def healthz(self):
        try:
            depth = self.node.outbox_depth()
            connected = self.node.connected()
            n = {"open": True, "outbox_depth": depth,
                 "transport": "connected" if connected else "not connected"}
            ok = connected
        except libsaga.SagaError as e:
            n, ok = {"open": True, "error": str(e)}, False
        return (200 if ok else 503), {"status": "ok" if ok else "error", "service": SERVICE,
                                      "nodes": {SERVICE: n}}

    def metrics(self):
        out = ["# HELP shop_up 1 while the process serves.", "# TYPE shop_up gauge",
               'shop_up{service="%s"} 1' % SERVICE,
               "# HELP shop_http_responses_total HTTP answers of this process by status.",
               "# TYPE shop_http_responses_total counter"]
        with self.lock:
            for code, n in sorted(self.responses.items()):
                out.append('shop_http_responses_total{service="%s",code="%d"} %d' %
                           (SERVICE, code, n))
        text = "\n".join(out) + "\n" + self.node.metrics()
        if isinstance(self.node._transport, Tcp):
            helps = {"connections_accepted": "Inbound TCP connections taken.",
                     "connections_refused": "Inbound TCP connections over the caps.",
                     "handshakes_failed": "TLS handshakes that failed or timed out.",
                     "frames_refused": "Messages refused by the access list.",
                     "frames_malformed": "Frames that broke the wire format.",
                     "acks_ignored": "ACK/NACK frames naming no token sent on that connection.",
                     "idle_closed": "Inbound connections closed for idleness.",
                     "slow_readers_dropped": "Inbound connections dropped for not reading."}
            for k, v in self.node.tcp_stats().items():
                name = "shop_tcp_%s_total" % k
                text += "# HELP %s %s\n# TYPE %s counter\n%s %d\n" % (name, helps[k], name,
                                                                       name, v)
        return text

    def payment(self, pid, auth):
        try:
            customer = verify_access(self.o["secret"], auth)
        except ValueError as e:
            return 401, {"msg": str(e)}
        rows = self.node.query("SELECT customer_id, currency, amount FROM payments "
                               "WHERE purchase_id = ?", (pid,))
        if not rows or rows[0][0] != customer:
            return 404, {"msg": "payment not found"}  # none, or another customer's
        return 200, {"id": purchase_id_json(pid), "currency_code": rows[0][1] or "",
                     "amount": rows[0][2]}


def make_handler(svc):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def send(self, code, body, ctype="application/json"):
            data = (json.dumps(body, separators=(",", ":")) if ctype == "application/json"
                    else body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            svc.count(code)

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            try:
                if path == "/healthz":
                    self.send(*svc.healthz())
                elif path == "/metrics":
                    self.send(200, svc.metrics(), "text/plain; version=0.0.4; charset=utf-8")
                elif path.startswith("/api/payment/") and path.count("/") == 3 and \
                        len(path) > len("/api/payment/"):
                    self.send(*svc.payment(path[len("/api/payment/"):],
                                           self.headers.get("Authorization")))
                else:
                    self.send(404, {"msg": "not found"})
            except libsaga.ClosedError:
                self.send(503, {"msg": "shutting down"})
            except Exception:
                logging.exception("[payment] %s", path)
                self.send(500, {"msg": "internal error"})

        def do_POST(self):
            self.send(405 if self.path.startswith("/api/payment/") else 404,
                      {"msg": "method not allowed" if self.path.startswith("/api/payment/")
                       else "not found"})
    return Handler


def main():
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    o = parse_args(sys.argv[1:])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    svc = Payment(o)
    srv = http.server.ThreadingHTTPServer((o.get("bind", "127.0.0.1"), o["port"]),
                                          make_handler(svc))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("[payment] Python payment service (libsaga %s) on %s:%d" %
          (libsaga.library_version(), o.get("bind", "127.0.0.1"), srv.server_address[1]),
          file=sys.stderr)
    stop.wait()
    srv.shutdown()
    srv.server_close()
    svc.node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
