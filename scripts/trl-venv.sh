#!/usr/bin/env bash
# The TRL engine for external training steps: TRL, datasets and accelerate added to the venv of the
# project's other torch tools (scripts/serve-venv.sh: torch on CPU, transformers), installed
# idempotently. Prints the path of `accelerate`, which fuselab takes from FUSELAB_ACCELERATE.
set -euo pipefail
venv=$(bash "$(dirname "$0")/serve-venv.sh" trl=trl==1.16.0 datasets accelerate)
echo "$venv/bin/accelerate"
