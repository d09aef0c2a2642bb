#!/usr/bin/env bash
# System packages the project needs beyond PyPI, installed when missing (Debian/Ubuntu).
# Nothing is needed yet beyond Python's own; later stages add 7z (DataLad archives),
# chromium (browser tests) and postgresql (scale-out test) here.
set -euo pipefail
need=()
for pkg_cmd in "git:git"; do
  pkg=${pkg_cmd%%:*}; cmd=${pkg_cmd##*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "missing system packages: ${need[*]} (install them with your package manager)" >&2
    exit 1
  fi
fi
