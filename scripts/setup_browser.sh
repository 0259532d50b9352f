#!/usr/bin/env bash
# Install headless Chromium and its driver (Debian packages) for the book's browser check.
# Runs apt-get only when they are missing; needs root (or run the printed command yourself).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "the browser check needs Chromium: sudo apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
echo "installing chromium and chromium-driver (Debian packages)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
