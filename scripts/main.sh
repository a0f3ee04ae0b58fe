#!/usr/bin/env bash
# The main job, end to end on the real data: install, validate every data set, evaluate
# every model and every pipeline stage on every rail each data set supports, then put each
# data set's trained rails bundle through the promotion gate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh install
. .venv/bin/activate
run="main-$(date -u +%Y%m%dT%H%M%SZ)"
railtower validate
railtower evaluate --towers --run-name "$run"
for bundle in artifacts/"$run"-*-rails; do
  # exit 3 = the gate refused the bundle: production stays as it was, the job goes on
  railtower promote "$bundle" || [ $? -eq 3 ]
done
# The online path for real: Redis, Triton and the API start, a few held-out sessions are
# written to Redis and their rails printed over HTTP, then everything stops.
railtower demo --sessions 3
