#!/usr/bin/env bash
# Make ./.venv a virtualenv with tfgrid installed in editable mode (plus the test tools with
# EXTRAS=test). Idempotent and quick when nothing changed: the hash of pyproject.toml, setup.py
# and the C extension's source is stamped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
VENV=.venv

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "bootstrap: tfgrid needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1 || echo missing))" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        echo "bootstrap: $PYTHON cannot create virtualenvs; on Debian: apt-get install python3-venv" >&2
        exit 1
    fi
    echo "bootstrap: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi

# The node agent's host tools (runc, a static busybox for the demo image, iptables for published
# ports, mkfs.ext4 for volume quotas, ip for container networks). Installed when missing.
missing=()
for pair in runc:runc busybox:busybox-static iptables:iptables mkfs.ext4:e2fsprogs ip:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
# Debian's dynamically linked busybox package also provides /bin/busybox; the image needs static.
if command -v busybox >/dev/null 2>&1 && ! dpkg -s busybox-static >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    missing+=(busybox-static)
fi
# Building the storage codec's C extension (threebot/storage/_gf.c): a C compiler and the
# headers of $PYTHON (Debian's python3 has them in python3-dev).
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
has_headers='import sysconfig, os; print(os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
[ "$("$PYTHON" -c "$has_headers" 2>/dev/null)" = True ] || missing+=(python3-dev)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: apt-get install ${missing[*]}" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    else
        echo "bootstrap: tfgrid needs these packages (as root: apt-get install ${missing[*]})" >&2
    fi
fi

spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
stamp="$VENV/.tfgrid-installed"
want="$(cat pyproject.toml setup.py threebot/storage/_gf.c | sha256sum | cut -d' ' -f1) $spec"
# The built extension lives in the work tree (git ignores it), so check that it is there too.
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp" \
        || ! "$VENV/bin/python" -c 'import threebot.storage._gf' 2>/dev/null; then
    echo "bootstrap: pip install -e '$spec'" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
    echo "$want" >> "$stamp"
fi
