#!/usr/bin/env bash
# Screenshot an HTML page (a result page, or the reporting service's page) in a real browser,
# as a user would see it: Debian's chromium, headless. Not part of the test suite.
# Usage: bash scripts/screenshot.sh demo_out/index.html shot.png [width] [height]
#        bash scripts/screenshot.sh http://127.0.0.1:8080/ service.png
set -euo pipefail
page=${1:?page (file or URL)}; out=${2:?output PNG}; width=${3:-1280}; height=${4:-2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no chromium found (Debian: apt-get install chromium)" >&2; exit 2; }
case "$page" in http*|file:*) url=$page ;; *) url="file://$(realpath "$page")" ;; esac
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$width,$height" \
  --screenshot="$out" "$url" 2>/dev/null
echo "$out"
