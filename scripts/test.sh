#!/usr/bin/env bash
# Set up (scripts/setup.sh --test: with the test tools and triton) and run the whole test suite. GPU tests
# skip themselves without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider tests "$@"
