#!/usr/bin/env bash
# Installs promtool (which `make test` uses to check the alert rules) when it
# is missing, from Debian's or Ubuntu's `prometheus` package. Root or sudo.
#
# That package also holds a Prometheus server whose unit would start at once
# and listen on :9090, where keyvault's admin listener is by default. This
# script wants only promtool, so on a machine run by systemd it masks
# prometheus.service before installing: the server never starts. To run it
# after all: systemctl unmask prometheus && systemctl enable --now prometheus
set -euo pipefail

command -v promtool >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "promtool is missing and this is not a Debian-like system: install Prometheus's promtool by hand" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ -d /run/systemd/system ] && ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q 'ok installed'; then
  echo "masking prometheus.service: only promtool is wanted, not a server on :9090" >&2
  $sudo systemctl mask prometheus.service >/dev/null
fi
echo "installing promtool (Debian package prometheus) with apt-get" >&2
# A fresh machine's package lists may be empty or stale: update first.
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null 2>&1 || { echo "prometheus installed but promtool is not on PATH" >&2; exit 1; }
