#!/usr/bin/env bash
# The main job, end to end on the real data: install, validate every data set, evaluate
# every model on every rail each data set supports, and print the table and the report path.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
railtower validate
railtower evaluate --towers --run-name "main-$(date -u +%Y%m%dT%H%M%SZ)"
