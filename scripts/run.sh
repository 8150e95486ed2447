#!/usr/bin/env bash
# Quickstart: set up .venv, then run the main job on the embedded default model (r1-tiny).
# Extra arguments are passed to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
if [ $# -eq 0 ]; then
  set -- serve   # the main job: the OpenAI-compatible server on http://127.0.0.1:8000/v1
fi
exec .venv/bin/r1 "$@"
