#!/usr/bin/env bash
# llama.cpp's own GGUF converter (convert_hf_to_gguf.py with its `conversion` package and gguf-py),
# taken from the llama-cpp-python sdist on PyPI (which vendors llama.cpp) and cached outside the
# clone (${FUSELAB_CACHE:-~/.cache/fuselab}/llama.cpp-<version>). Runs in the serve venv (torch,
# transformers), installed by scripts/openai-server.sh's recipe. Idempotent; prints the directory.
#   llama-cpp.sh converter      # -> the llama.cpp source directory holding convert_hf_to_gguf.py
set -euo pipefail
version=0.3.36
cache=${FUSELAB_CACHE:-${HOME:-/tmp}/.cache/fuselab}
dir=$cache/llama.cpp-$version
venv=$cache/serve-venv
mkdir -p "$cache"
exec 9>"$cache/llama.cpp.lock"
flock 9
case ${1:-} in
  converter)
    if [ ! -f "$dir/.complete" ]; then
      rm -rf "$dir" "$dir.tmp"
      mkdir -p "$dir.tmp"
      # The sdist's address from PyPI's JSON API (pip would build the package to download it).
      url=$(python3 - "$version" <<'PY'
import json, sys, urllib.parse, urllib.request
api = "https://pypi.org/pypi/llama-cpp-python/json"
d = json.load(urllib.request.urlopen(api, timeout=60))
files = d.get("releases", {}).get(sys.argv[1]) or (d["urls"] if d["info"]["version"] == sys.argv[1] else [])
print(urllib.parse.urljoin(api, [u["url"] for u in files if u["packagetype"] == "sdist"][0]))
PY
)
      curl -sfL --retry 3 "$url" -o "$dir.tmp/sdist.tar.gz"
      tar xzf "$dir.tmp/sdist.tar.gz" -C "$dir.tmp" --strip-components=3 \
        "llama_cpp_python-$version/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$version/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$version/vendor/llama.cpp/gguf-py"
      rm "$dir.tmp/sdist.tar.gz"
      touch "$dir.tmp/.complete"
      mv "$dir.tmp" "$dir"
    fi
    echo "$dir"
    ;;
  *) echo "usage: $0 converter" >&2; exit 2 ;;
esac
