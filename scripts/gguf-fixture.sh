#!/usr/bin/env bash
# The GGUF backend's test source: tests/fixtures/gguf/make_gguf_fixture.py run in the serve venv
# (torch + transformers, scripts/serve-venv.sh) with llama.cpp's converter
# (scripts/llama-cpp.sh). Cached outside the clone under a digest of the script, so a test run
# makes it once. Prints the fixture directory (model-f32.gguf, model-q8_0.gguf, hf/, prompts.jsonl,
# reference.json).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${FUSELAB_CACHE:-${HOME:-/tmp}/.cache/fuselab}
script=$here/tests/fixtures/gguf/make_gguf_fixture.py
key=$(cat "$script" "$here/scripts/llama-cpp.sh" | sha256sum | cut -c1-16)
out=$cache/gguf-fixture-$key
mkdir -p "$cache"
exec 9>"$cache/gguf-fixture.lock"
flock 9
if [ ! -f "$out/.complete" ]; then
  # The converter imports sentencepiece before it looks for a tokenizer.model.
  venv=$(bash "$here/scripts/serve-venv.sh" sentencepiece)
  converter=$(bash "$here/scripts/llama-cpp.sh" converter)
  rm -rf "$out.tmp"
  "$venv/bin/python" "$script" "$out.tmp" "$converter" "${FUSELAB_SHARED_DATA:-$here/../shared/data}" >&2
  touch "$out.tmp/.complete"
  rm -rf "$out"
  mv "$out.tmp" "$out"
fi
echo "$out"
