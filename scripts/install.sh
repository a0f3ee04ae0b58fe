#!/usr/bin/env bash
# Install Railtower into .venv on a fresh machine: Python 3.11, every dependency pinned by
# constraints.txt (the lock). Safe to re-run: it does nothing when the lock is unchanged.
#
# torch: constraints.txt pins torch 2.14.1 + torchvision 0.29.1 (timm needs torchvision, and
# PyPI's torchvision does not import beside the 2.13.0 CPU wheel). That build is CUDA 13: it
# runs on the CPU here and uses the GPU as is on a GPU machine, so the same lock serves both.
# To refresh the lock after changing pyproject.toml: scripts/install.sh --relock
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${RAILTOWER_VENV:-.venv}

# A bare Debian machine lacks what the venv and the source builds need (hnswlib compiles
# from source): Python 3.11 with venv and headers, and a C++ compiler. Installed only when
# missing, with apt (root or sudo).
missing=()
command -v "$PYTHON" >/dev/null || missing+=(python3.11)
"$PYTHON" -c "import ensurepip, venv" 2>/dev/null || missing+=(python3.11-venv)
"$PYTHON" -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" 2>/dev/null \
  || missing+=(python3.11-dev)
command -v g++ >/dev/null || missing+=(g++)
. scripts/apt.sh
apt_install install "${missing[@]}"
STAMP="$VENV/.railtower-lock"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ "${1:-}" != "--relock" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[install] $VENV is up to date with constraints.txt"
  exit 0
fi

# The locked torch is a CUDA build: the venv takes about 7 GB. Say so before pip fills the
# disk halfway and leaves a venv that fails to import (a Bus error, not a clear message).
need_kb=$((8 * 1024 * 1024))
free_kb=$(df -Pk "$VENV" | awk 'NR==2 {print $4}')
if [ "${free_kb:-0}" -lt "$need_kb" ] && [ ! -f "$STAMP" ]; then
  echo "[install] $((free_kb / 1024)) MB free under $VENV; the locked dependencies need about 8 GB." >&2
  echo "[install] free some disk (old clones, /tmp/pytest-of-\$USER) and re-run." >&2
  exit 1
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v "^WARNING: Location" || true
if [ "${1:-}" = "--relock" ]; then
  "$VENV/bin/python" -m pip install -e '.[dev]'
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
else
  echo "[install] installing the locked dependencies (first run: a few minutes)"
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev]' 2>&1 \
    | { grep -v "^WARNING: Location" || true; } \
    || { echo "[install] pip install failed (its error is above)" >&2; exit 1; }
  "$VENV/bin/python" -c "import torch, torchvision, numpy, pandas, pyarrow, railtower" \
    || { echo "[install] import check failed" >&2; exit 1; }
fi
echo "$want" > "$STAMP"
echo "[install] done: $("$VENV/bin/python" -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__)')"
