#!/usr/bin/env bash
# Installs SoftHSM2 (the PKCS#11 token keyvault uses in development and
# tests) when it is missing. Debian and Ubuntu; root or sudo.
set -euo pipefail

have() {
  command -v softhsm2-util >/dev/null 2>&1 || return 1
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so; do
    [ -e "$m" ] && return 0
  done
  return 1
}

have && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "SoftHSM2 is missing and this is not a Debian-like system: install softhsm2 by hand" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing SoftHSM2 with apt-get" >&2
# A fresh machine's package lists may be empty or stale: update first.
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq softhsm2 >/dev/null
have || { echo "softhsm2 installed but its library was not found" >&2; exit 1; }
