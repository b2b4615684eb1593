#!/usr/bin/env bash
# Debian packages some tests use: headless Chromium + ChromeDriver (the dashboard's browser test)
# and docker-compose 1.29 (validates docker-compose.yml without an engine). Installs only what is
# missing; needs root or passwordless sudo, else it says so and the tests that need them skip.
set -uo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v docker-compose >/dev/null || missing+=(docker-compose)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo -n")
echo "==> apt-get install ${missing[*]}"
{ $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
  || echo "could not install ${missing[*]}: the tests that need them will skip"
