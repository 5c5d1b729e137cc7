#!/usr/bin/env bash
# Render an xray-edge HTML report in a real browser (headless Chromium, Debian's `chromium`
# package) and save a screenshot, to check that the report displays as intended offline:
#
#   deploy/render_report.sh report.html docs/report.png [WIDTH HEIGHT]
#
# Chromium runs with networking features off and a fresh profile: the report needs no network.
set -euo pipefail
report=$(realpath "$1")
shot=$(realpath -m "$2")
width=${3:-1280}
height=${4:-2400}
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "error: no chromium found; install Debian's package: sudo apt-get install chromium" >&2
    exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
    --window-size="${width},${height}" --screenshot="$shot" "file://$report" 2>/dev/null
echo "wrote $shot"
