#!/usr/bin/env bash
# Set up (idempotent), then run the main demo: local Ray, a store under ./data/demo, SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/srmoa demo --data-dir "${SRMOA_DATA_DIR:-./data/demo}" "$@"
