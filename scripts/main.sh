#!/usr/bin/env bash
# The main job, end to end on the real data: install, validate every data set, measure every
# model and every pipeline stage on a later window, fit the bundles that serve on all the
# data, then put each data set's rails bundle through the promotion gate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh install
. .venv/bin/activate
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
run="main-$stamp"
railtower validate
# The quality a shop would see: fit on each data set's history, judge and refit as the
# nightly job does, then score every baseline and stage on the later sessions nothing was
# fitted or tuned on (reports/later-<stamp>/later_window.md).
railtower evaluate --towers --later-window --run-name "later-$stamp"
# The bundles that serve: judged on the newest test split, then refitted on all the data.
railtower evaluate --towers --run-name "$run"
for bundle in artifacts/"$run"-*-rails; do
  # exit 3 = the gate refused the bundle: production stays as it was, the job goes on
  railtower promote "$bundle" || [ $? -eq 3 ]
done
# The online path for real: Redis, Triton and the API start, a few held-out sessions are
# written to Redis and their rails printed over HTTP, then everything stops. It serves the
# production bundle; when the gate refused every REES46 candidate there is none to serve.
if [ -e artifacts/production/rees46 ]; then
  railtower demo --sessions 3
else
  echo "no REES46 production bundle: the gate refused it (artifacts/production/history.jsonl" \
    "says which baseline won), so there is nothing to demo"
fi
