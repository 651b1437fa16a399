# Sourced by the benchmarks that compare against PyTorch: sets $venv to a Python environment with
# torch and transformers — .venv, else the serving venv the tests installed, else a fresh .venv.
venv=.venv
serve=${FUSELAB_CACHE:-${HOME:-/tmp}/.cache/fuselab}/serve-venv
if ! { [ -x $venv/bin/python ] && $venv/bin/python -c "import torch, transformers" 2>/dev/null; }; then
  if [ -x "$serve/bin/python" ] && "$serve/bin/python" -c "import torch, transformers" 2>/dev/null; then
    venv=$serve
  else
    python3 -m venv .venv && .venv/bin/pip install -q torch transformers
  fi
fi
