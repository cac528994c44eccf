#!/usr/bin/env bash
# Build the tiny demo/test image from Debian's busybox-static and publish it.
#   scripts/build-busybox-image.sh DIR            rootfs into DIR (then: tfgrid image push DIR)
#   scripts/build-busybox-image.sh DIR PUB_DIR    also tar it into PUB_DIR, print {"image","sources"}
# Needs /bin/busybox from busybox-static (apt-get install busybox-static).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] && [ $# -le 2 ] || { sed -n 2,5p "$0" >&2; exit 2; }
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" -m zos_agent.images build-busybox "$1" >/dev/null
if [ $# -eq 2 ]; then
    "$PY" -m zos_agent.images push "$1" "$2"
else
    echo "$1"
fi
