#!/usr/bin/env bash
# Makes a throwaway certificate authority and one certificate per name, for mutual TLS between
# libsaga nodes (the TCP transport) and with brokers (nats-server). For tests and demos; in
# production use your organisation's CA (docs/security.md says what a certificate needs).
#
# usage: scripts/make_pki.sh DIR NAME...
#   DIR/ca.pem, DIR/ca.key     the CA (EC P-256, self-signed, 10 days)
#   DIR/NAME.pem, DIR/NAME.key a certificate for NAME, signed by the CA: subject CN=NAME and
#                              subjectAltName DNS:NAME, DNS:localhost, IP:127.0.0.1, usable as
#                              a TLS server and a TLS client.
# Existing files in DIR are replaced. Needs the `openssl` command (Debian package openssl).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 DIR NAME..." >&2
  exit 2
fi
dir=$1
shift
command -v openssl >/dev/null || { echo "make_pki: the openssl command is missing (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
umask 077
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 10 \
  -subj "/CN=libsaga test CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null
serial=$((RANDOM * 32768 + RANDOM))
for name in "$@"; do
  case "$name" in
    *[!A-Za-z0-9._-]*|"") echo "make_pki: bad name '$name' (letters, digits, . _ -)" >&2; exit 2 ;;
  esac
  ext="$dir/$name.ext"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1" >"$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
  serial=$((serial + 1))
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -set_serial "$serial" -days 10 -extfile "$ext" -out "$dir/$name.pem" 2>/dev/null
  rm -f "$dir/$name.csr" "$ext"
done
chmod 644 "$dir"/*.pem
