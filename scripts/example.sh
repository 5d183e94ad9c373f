#!/usr/bin/env bash
# Set up (scripts/setup.sh: no test tools, no triton), then convert the SmolLM2 example model, load the
# .cllm and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python scripts/example.py "$@"
