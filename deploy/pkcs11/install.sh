#!/usr/bin/env bash
# Installs the PKCS#11 tokens beside SoftHSM2 that make test runs keyvault
# on: opencryptoki (its soft token, through the pkcsslotd daemon) and NSS's
# softoken, loaded through p11-kit-proxy (certutil creates its database).
# Debian and Ubuntu; root or sudo. The tests start pkcsslotd themselves.
set -euo pipefail

libdir=/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
have() {
  command -v pkcsslotd >/dev/null 2>&1 || [ -x /usr/sbin/pkcsslotd ] || return 1
  command -v pkcsconf >/dev/null 2>&1 || [ -x /usr/sbin/pkcsconf ] || return 1
  command -v certutil >/dev/null 2>&1 || return 1
  [ -e "$libdir/pkcs11/libopencryptoki.so" ] || [ -e "$libdir/opencryptoki/libopencryptoki.so" ] || return 1
  [ -e "$libdir/p11-kit-proxy.so" ] || return 1
  [ -e "$libdir/libsoftokn3.so" ] || return 1
}

have && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "opencryptoki, NSS tools or p11-kit are missing and this is not a Debian-like system: install them by hand" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing opencryptoki, libnss3-tools and p11-kit-modules with apt-get" >&2
# A fresh machine's package lists may be empty or stale: update first.
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq opencryptoki libnss3-tools p11-kit-modules >/dev/null
have || { echo "opencryptoki, NSS tools and p11-kit installed, but a command or library was not found" >&2; exit 1; }
