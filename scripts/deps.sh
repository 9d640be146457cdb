#!/usr/bin/env bash
# Installs the Debian packages libsaga needs to build and test, but only those that are missing.
# Runs as root (CI) or through sudo. On systems without dpkg it only says what to install.
set -euo pipefail

pkgs=(build-essential cmake pkg-config g++ libsqlite3-dev libuv1-dev libmsgpack-dev libcmocka-dev
      libmicrohttpd-dev libjansson-dev libjwt-dev libsodium-dev libcurl4-openssl-dev curl libssl-dev openssl
      libnats-dev nats-server libhiredis-dev redis-server nginx doxygen
      python3 python3-setuptools python3-pip)

if ! command -v dpkg-query >/dev/null; then
  echo "deps: not a Debian-based system; make sure these (or equivalents) are installed: ${pkgs[*]}"
  exit 0
fi

missing=()
for p in "${pkgs[@]}"; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all present (${pkgs[*]})"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
echo "deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
echo "deps: installed ${missing[*]}"
