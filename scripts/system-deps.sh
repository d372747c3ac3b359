#!/usr/bin/env bash
# Debian packages the test suite drives for real: Chromium (docs site in a browser), PostgreSQL (Optuna and fleet
# storage), strace (the agent's fsyncs around each rename), Tesseract (printed prices on shelf tags).
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
{ command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || need+=(postgresql)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v tesseract >/dev/null 2>&1 || need+=(tesseract-ocr)
[ ${#need[@]} -eq 0 ] && exit 0
echo "== installing Debian packages: ${need[*]}"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" fonts-dejavu-core >/dev/null
