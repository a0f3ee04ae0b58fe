#!/usr/bin/env bash
# The test suite: install (if needed), lint (ruff, import boundaries), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh install
. .venv/bin/activate
ruff check .
lint-imports
pytest "$@"
