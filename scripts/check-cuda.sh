#!/usr/bin/env bash
# Keep the GPU build compiling on a machine without a GPU (DESIGN.md): NVIDIA's CUDA 13.4 toolkit
# wheels from PyPI give nvcc and headers; there is no GPU to detect, so the compute capability is set
# (90: H100/H200). `cargo check` compiles candle's CUDA kernels and our code with the `cuda` feature.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$PWD/.bench/cuda-venv"
if [ ! -x "$venv/bin/nvcc-ok" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "cuda-toolkit[nvcc,cccl]==13.4.3"
  touch "$venv/bin/nvcc-ok" && chmod +x "$venv/bin/nvcc-ok"
fi
cu=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13)
export PATH="$cu/bin:$PATH" CUDA_HOME="$cu" CUDA_PATH="$cu" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
cargo check --release --features cuda --all-targets
