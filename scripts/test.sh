#!/usr/bin/env bash
# Set up .venv (and the system tools the tests use), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system_deps.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/r1-cluster/torch_extensions}
# Two xdist workers: see RAY_LANES in tests/conftest.py for how the modules are shared out
# (R1_TEST_WORKERS=0 runs everything in this one process).
workers=${R1_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != 0 ]; then
    parallel=(-n "$workers" --dist loadscope --no-loadscope-reorder)
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${parallel[@]}" "$@"
