#!/usr/bin/env bash
# A headless Chromium for the report tests: Debian's `chromium` package, installed once (apt, as
# root) when it is not on PATH. Prints the browser's path. Idempotent; one installer at a time.
set -euo pipefail
cache=${FUSELAB_CACHE:-${HOME:-/tmp}/.cache/fuselab}
mkdir -p "$cache"
exec 9>"$cache/chromium.lock"
flock 9
for b in chromium chromium-browser; do
  if command -v "$b" >/dev/null 2>&1; then command -v "$b"; exit 0; fi
done
if [ "$(id -u)" != 0 ]; then
  echo "chromium is not installed and this user cannot apt-get it: install Debian's 'chromium' package" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2 || true
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
command -v chromium
