#!/usr/bin/env bash
# The venv of the project's torch tools on CPU: torch and `transformers[serving]` (the OpenAI
# server of the endpoint tests, the GGUF fixture's model and reference), installed idempotently into
# ${FUSELAB_CACHE:-~/.cache/fuselab}/serve-venv, one installer at a time. Extra packages to ensure
# may be named as arguments, each `module` or `module=pip-spec` (`trl=trl==1.16.0`). Prints the
# venv's directory.
set -euo pipefail
cache=${FUSELAB_CACHE:-${HOME:-/tmp}/.cache/fuselab}
venv=$cache/serve-venv
mkdir -p "$cache"
exec 9>"$cache/serve-venv.lock"
flock 9
if ! "$venv/bin/python" -c "import torch, transformers, fastapi, uvicorn" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch "transformers[serving]==5.24.0" >&2
fi
for arg in "$@"; do
  module=${arg%%=*}
  spec=${arg#*=}
  "$venv/bin/python" -c "import $module" 2>/dev/null || "$venv/bin/pip" install -q "$spec" >&2
done
echo "$venv"
