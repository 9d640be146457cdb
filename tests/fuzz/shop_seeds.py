#!/usr/bin/env python3
"""Writes the seed corpus of the shop fuzz target (tests/fuzz/shop/seed-*).

usage: python3 tests/fuzz/shop_seeds.py tests/fuzz/shop

Each seed's first byte picks the mode of fuzz_shop.c: '0' HTTP request, '1' claims signed
here by the target, '2' Authorization header value, '3' JSON body. Tokens are signed with the
target's secret and expire in 2100.
"""
import base64, hashlib, hmac, json, os, sys

SECRET = b"fuzzing-secret-0123456789abcdef01234567"  # as in fuzz_shop.c
out = sys.argv[1]
os.makedirs(out, exist_ok=True)


def put(name, data):
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(out, "seed-" + name), "wb") as f:
        f.write(data)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(claims, header=None, key=SECRET, alg=hashlib.sha256):
    header = header or {"alg": "HS256", "typ": "JWT"}
    si = b64(json.dumps(header, separators=(",", ":")).encode()) + "." + \
        b64(json.dumps(claims, separators=(",", ":")).encode())
    return si + "." + b64(hmac.new(key, si.encode(), alg).digest())


IAT, EXP = 1700000000, 4102444800
access = token({"sub": "42", "typ": "access", "iat": IAT, "exp": EXP})
refresh = token({"sub": "42", "typ": "refresh", "iat": IAT, "exp": EXP})

signup = {"password": "correct horse", "firstname": "Ada", "lastname": "Lovelace",
          "email": "ada@example.org", "address": "1 Analytical Way", "phone_number": "+44 (20) 1234-5678"}
login = {"email": "ada@example.org", "password": "correct horse"}


def http(method, path, body=None, headers=()):
    h = [f"{method} {path} HTTP/1.1", "Host: shop"] + list(headers)
    if body is not None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        h += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("0" + "\r\n".join(h) + "\r\n\r\n").encode() + (body or b"")


# mode 0: HTTP
put("http-signup", http("POST", "/api/account/auth/signup", signup))
put("http-login", http("POST", "/api/account/auth/login", login))
put("http-refresh", http("POST", "/api/account/auth/refresh", {"refresh_token": refresh}))
put("http-person", http("PUT", "/api/account/info/person",
                        {"firstname": "A", "lastname": "L", "email": "a@b.c"},
                        [f"Authorization: Bearer {access}"]))
put("http-shipping-refresh-token", http("PUT", "/api/account/info/shipping",
                                        {"address": "x", "phone_number": "1234"},
                                        [f"Authorization: Bearer {refresh}"]))
put("http-no-token", http("PUT", "/api/account/info/person", {}))
put("http-query", http("GET", "/api/product/catalog?offset=10&size=5&purchase_id=%41%00b&a+b=%zz&&=x&size=6"))
put("http-params", http("GET", "/api/order/p-000123", None, ["Idempotency-Key: k-1"]))
put("http-four-params", http("GET", "/api/a/b/c/d/"))
put("http-not-found", http("GET", "/api//x/../y%2F"))
put("http-method-not-allowed", http("DELETE", "/api/product/catalog"))
put("http-not-json", http("POST", "/api/account/auth/login", b"{\"email\": \"a@b.c\", "))
put("http-array-body", http("POST", "/api/account/auth/signup", b"[1,2,3]"))
put("http-chunked", "0POST /api/purchase HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n"
    "Idempotency-Key: abc\r\n\r\n"
    "5\r\n{\"pur\r\n1a\r\nchase_items\":[],\"x\":1}    \r\n0\r\n\r\n")
put("http-pipelined", http("GET", "/api/product/catalog?size=1")[0:] +
    http("POST", "/api/account/auth/login", login)[1:])
put("http-1.0", "0GET /api/product/catalog?offset=-1 HTTP/1.0\r\n\r\n")
put("http-bad-line", "0GET\r\n\r\n")
put("http-bad-content-length", "0POST /api/x HTTP/1.1\r\nHost: s\r\nContent-Length: 99999999999999999999\r\n\r\n{}")
put("http-truncated-body", "0POST /api/x HTTP/1.1\r\nHost: s\r\nContent-Length: 100\r\n\r\n{\"a\":")
put("http-expect-continue", "0POST /api/x HTTP/1.1\r\nHost: s\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}")

# mode 1: claims signed by the target
def signed(name, claims, header=None):
    c = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    if header is None:
        put("signed-" + name, b"1" + c)
    else:
        h = header if isinstance(header, bytes) else json.dumps(header).encode()
        put("signed-" + name, b"1" + h + b"\0" + c)


signed("access", {"sub": "42", "typ": "access", "iat": IAT, "exp": EXP})
signed("refresh", {"sub": "9", "typ": "refresh", "iat": IAT, "exp": EXP})
signed("expired", {"sub": "42", "typ": "access", "iat": 1, "exp": 2})
signed("iat-future", {"sub": "42", "typ": "access", "iat": EXP, "exp": EXP})
signed("sub-int", {"sub": 42, "typ": "access", "iat": IAT, "exp": EXP})
signed("sub-zero", {"sub": "0", "typ": "access", "iat": IAT, "exp": EXP})
signed("sub-leading-zero", {"sub": "042", "typ": "access", "iat": IAT, "exp": EXP})
signed("sub-19-digits", {"sub": "9223372036854775807", "typ": "access", "iat": IAT, "exp": EXP})
signed("exp-float", {"sub": "1", "typ": "access", "iat": IAT, "exp": 4102444800.5})
signed("no-typ", {"sub": "1", "iat": IAT, "exp": EXP})
signed("alg-none", {"sub": "1", "typ": "access", "iat": IAT, "exp": EXP}, {"alg": "none"})
signed("alg-hs512", {"sub": "1", "typ": "access", "iat": IAT, "exp": EXP}, {"alg": "HS512", "typ": "JWT"})
signed("header-array", {"sub": "1"}, b"[1]")
signed("not-json", b"{\"sub\":")

# mode 2: Authorization header values
put("bearer-access", "2Bearer " + access)
put("bearer-refresh", "2Bearer " + refresh)
put("bearer-lowercase-spaces", "2bearer    " + access)
put("basic", "2Basic YWRhOnB3")
put("bearer-empty", "2Bearer ")
put("bearer-none-alg", "2Bearer " + b64(b'{"alg":"none"}') + "." + b64(b'{"sub":"1","typ":"access"}') + ".")
put("bearer-hs512", "2Bearer " + token({"sub": "42", "typ": "access", "iat": IAT, "exp": EXP},
                                         {"alg": "HS512", "typ": "JWT"}, alg=hashlib.sha512))
put("bearer-wrong-key", "2Bearer " + token({"sub": "42", "typ": "access", "iat": IAT, "exp": EXP}, key=b"guess"))
put("bearer-four-parts", "2Bearer a.b.c.d")
put("bearer-too-long", "2Bearer " + "A" * 2100 + ".b.c")

# mode 3: JSON bodies
put("json-signup", "3" + json.dumps(signup))
put("json-login", "3" + json.dumps(login))
put("json-unicode-password", "3" + json.dumps({**signup, "password": "\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9"}))
put("json-control-char", "3" + json.dumps({**signup, "firstname": "A\tB"}))
put("json-bad-emails", "3" + json.dumps({"email": "a@@b.c", "firstname": " ", "lastname": "x" * 257}))
put("json-phone-plus-middle", "3" + json.dumps({"address": "x", "phone_number": "12+34567"}))
put("json-types", "3" + json.dumps({"password": 12345678, "email": None, "refresh_token": ""}))
put("json-duplicate-keys", '3{"email":"a@b.c","email":"x","password":"12345678"}')
put("json-nul-escape", '3{"email":"a\\u0000@b.c","password":"12345678"}')
put("json-deep", "3" + "[" * 3000 + "]" * 3000)
put("json-big-number", '3{"password":1e999999,"x":123456789012345678901234567890}')
put("json-not-object", '3"text"')
