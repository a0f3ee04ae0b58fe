#!/usr/bin/env bash
# Install the peer-model environment: RecBole 1.2.1 in its own venv at .venv-peers/.
#
# Why a second venv: RecBole pins numpy<2 (it patches np.float/np.int, removed in numpy 2)
# and old logging packages, and it must never leak into the project's lock. Why no torch
# in it: torch is 2+ GB; a .pth file appends the main venv's site-packages *after* this
# venv's own, so this venv's numpy/pandas/scipy win while torch (and its CUDA wheels) come
# from the main venv. ray, hyperopt, thop and plotly are left out: RecBole imports them
# only in quick_start and hyper-parameter tuning, which the peer script never touches.
#
# Idempotent: exits early when the venv already imports recbole 1.2.1, numpy<2 and torch.
# Usage: bash benchmarks/peers/install.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEER="$ROOT/.venv-peers"
MAIN_SITE="$ROOT/.venv/lib/python3.11/site-packages"
RECBOLE="recbole==1.2.1"
# What recbole 1.2.1 imports when recbole.config/data/model/trainer/utils load (its
# Requires-Dist minus torch, ray, thop, plotly, tabulate, hyperopt). Binary wheels only:
# nothing should compile on a shared two-core box.
DEPS=(
  "numpy<2"
  "pandas<2.3"  # pandas 3 (string dtype, copy-on-write) is newer than RecBole 1.2.1
  "scipy"
  "scikit-learn"
  "pyyaml"
  "tqdm"
  "colorlog==4.7.2"
  "colorama==0.4.4"
  "tensorboard"
  "texttable"
  "psutil"
)

if [[ ! -d "$MAIN_SITE/torch" ]]; then
  echo "error: no torch in $MAIN_SITE; set up the main venv (.venv) first" >&2
  exit 1
fi

check() {
  "$PEER/bin/python" - <<'PY'
import importlib.metadata as md
import numpy, torch, recbole  # noqa: F401
assert md.version("recbole") == "1.2.1", md.version("recbole")
assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
assert numpy.__file__.startswith(__import__("sys").prefix), "numpy is not the peer venv's"
a = torch.randn(64, 32)
assert (a @ a.T).shape == (64, 64)
print(f"peer venv ok: recbole {recbole.__version__}, numpy {numpy.__version__}, "
      f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
PY
}

# The stamp records what was asked for, so changing a pin above re-runs the install.
STAMP="$PEER/.railtower-peers"
WANT="$RECBOLE ${DEPS[*]} $MAIN_SITE"
if [[ -x "$PEER/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && check 2>/dev/null; then
  echo "already installed: $PEER"
  exit 0
fi

if [[ ! -x "$PEER/bin/python" ]]; then
  # The main venv's base interpreter: torch's compiled extensions need the same CPython.
  BASE="$("$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)')"
  "$BASE" -m venv "$PEER"
fi
SITE="$("$PEER/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
PTH="$SITE/zz_railtower_main_venv.pth"
# Install with the main venv out of sight, so every dependency lands in this venv rather
# than being "satisfied" by the main venv's copy (which could move to numpy 2 later).
rm -f "$PTH"
# A re-install (a pin changed) drops recbole first: its unmet Requires-Dist (torch, ray)
# would otherwise make pip print resolver errors about packages left out on purpose.
"$PEER/bin/python" -m pip uninstall --quiet --yes recbole 2>/dev/null || true
"$PEER/bin/python" -m pip install --quiet --upgrade pip
"$PEER/bin/python" -m pip install --quiet --only-binary=:all: "${DEPS[@]}"
# --no-deps: its Requires-Dist would pull a second torch and ray.
"$PEER/bin/python" -m pip install --quiet --no-deps "$RECBOLE"
# A .pth line that is a path is appended to sys.path after this venv's site-packages.
echo "$MAIN_SITE" > "$PTH"
check
echo "$WANT" > "$STAMP"
