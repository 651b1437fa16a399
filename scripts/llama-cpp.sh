#!/usr/bin/env bash
# llama.cpp's own GGUF converter (convert_hf_to_gguf.py with its `conversion` package and gguf-py),
# taken from the llama-cpp-python sdist on PyPI (which vendors llama.cpp) and cached outside the
# clone (${FUSELAB_CACHE:-~/.cache/fuselab}/llama.cpp-<version>). Runs in the serve venv (torch,
# transformers), installed by scripts/serve-venv.sh. `build` compiles llama.cpp's own
# tools from the same source for the benchmarks (cmake and ninja from PyPI in a venv beside it).
# Idempotent; prints the directory.
#   llama-cpp.sh converter      # -> the directory holding convert_hf_to_gguf.py
#   llama-cpp.sh build          # -> the directory holding bin/llama-server, bin/llama-batched-bench
set -euo pipefail
version=0.3.36
cache=${FUSELAB_CACHE:-${HOME:-/tmp}/.cache/fuselab}
dir=$cache/llama.cpp-$version
mkdir -p "$cache"
exec 9>"$cache/llama.cpp.lock"
flock 9
sdist() { # prints the sdist's path, downloaded once into the cache
  local url file=$cache/llama_cpp_python-$version.tar.gz
  if [ -f "$file" ]; then echo "$file"; return; fi
  # The sdist's address from PyPI's JSON API (pip would build the package to download it).
  url=$(python3 - "$version" <<'PY'
import json, sys, urllib.parse, urllib.request
api = "https://pypi.org/pypi/llama-cpp-python/json"
d = json.load(urllib.request.urlopen(api, timeout=60))
files = d.get("releases", {}).get(sys.argv[1]) or (d["urls"] if d["info"]["version"] == sys.argv[1] else [])
print(urllib.parse.urljoin(api, [u["url"] for u in files if u["packagetype"] == "sdist"][0]))
PY
)
  curl -sfL --retry 3 "$url" -o "$file.tmp"
  mv "$file.tmp" "$file"
  echo "$file"
}
case ${1:-} in
  build)
    src=$cache/llama.cpp-$version-build
    if [ ! -f "$src/.complete" ] || [ ! -x "$src/build/bin/llama-server" ]; then
      rm -rf "$src"
      mkdir -p "$src"
      tar xzf "$(sdist)" -C "$src" --strip-components=3 "llama_cpp_python-$version/vendor/llama.cpp"
      [ -x "$cache/cmake-venv/bin/cmake" ] || { python3 -m venv "$cache/cmake-venv" && "$cache/cmake-venv/bin/pip" install -q cmake ninja >&2; }
      PATH=$cache/cmake-venv/bin:$PATH cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON >&2
      PATH=$cache/cmake-venv/bin:$PATH cmake --build "$src/build" -j "$(nproc)" --target llama-server llama-batched-bench >&2
      touch "$src/.complete"
    fi
    echo "$src/build"
    ;;
  converter)
    if [ ! -f "$dir/.complete" ]; then
      rm -rf "$dir" "$dir.tmp"
      mkdir -p "$dir.tmp"
      tar xzf "$(sdist)" -C "$dir.tmp" --strip-components=3 \
        "llama_cpp_python-$version/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$version/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$version/vendor/llama.cpp/gguf-py"
      touch "$dir.tmp/.complete"
      mv "$dir.tmp" "$dir"
    fi
    echo "$dir"
    ;;
  *) echo "usage: $0 converter | build" >&2; exit 2 ;;
esac
