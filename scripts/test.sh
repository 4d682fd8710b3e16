#!/usr/bin/env bash
# Set up (idempotent), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
export TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check srmoa_dist tests k8s
set +e
.venv/bin/python -m pytest -q -rs --durations=15 "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": that is a failure here, not a pass.
exit $rc
