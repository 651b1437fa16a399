#!/usr/bin/env bash
# The TRL engine for external training steps: torch (CPU), transformers, TRL, datasets and
# accelerate in the venv the project's other torch tools use
# (${FUSELAB_CACHE:-~/.cache/fuselab}/serve-venv), installed idempotently. Prints the path of
# `accelerate`, which fuselab takes from FUSELAB_ACCELERATE.
set -euo pipefail
cache=${FUSELAB_CACHE:-${HOME:-/tmp}/.cache/fuselab}
venv=$cache/serve-venv
mkdir -p "$cache"
exec 9>"$cache/serve-venv.lock"
flock 9
if ! "$venv/bin/python" -c "import torch, transformers, trl, datasets, accelerate" 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch "transformers[serving]==5.24.0" "trl==1.16.0" datasets >&2
fi
echo "$venv/bin/accelerate"
