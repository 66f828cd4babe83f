#!/usr/bin/env bash
# Installs zsh and fish when they are missing: make test parses the
# completion scripts of `keyvault completion zsh|fish` with each shell, and
# asks fish for completions. Debian and Ubuntu; root or sudo.
set -euo pipefail

command -v zsh >/dev/null 2>&1 && command -v fish >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "zsh or fish is missing and this is not a Debian-like system: install them by hand" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing zsh and fish with apt-get" >&2
# A fresh machine's package lists may be empty or stale: update first.
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends zsh fish >/dev/null
command -v zsh >/dev/null 2>&1 && command -v fish >/dev/null 2>&1 || { echo "zsh and fish installed, but one is not on PATH" >&2; exit 1; }
