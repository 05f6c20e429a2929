#!/usr/bin/env bash
# Creates .venv with Python >= 3.11 and installs pillion with its dev tools; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)
[ -f "$STAMP" ] && exit 0

PY=""
for cand in python3.13 python3.12 python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 &&
     "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    PY=$cand; break
  fi
done
if [ -z "$PY" ]; then
  echo "pillion needs Python >= 3.11 (python3.11 not found)" >&2; exit 1
fi
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  # Debian splits venv/ensurepip into python3-venv.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing python3-venv (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "Python's venv module is missing: install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  fi
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
$VENV/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
$VENV/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
rm -f $VENV/.installed-*
touch "$STAMP"
