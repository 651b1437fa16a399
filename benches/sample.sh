#!/usr/bin/env bash
# Sampling throughput: `fuselab sample` (continuous batching, shared prefill) against transformers'
# generate(num_return_sequences=8) in left-padded batches, same checkpoint (the Llama of
# benches/model.sh: vocab 8192, hidden 512, 8 layers, f32), same 256 chat-templated prompts, 8 samples
# each, 32 new tokens per sample (no EOS stop on either side), temperature 0.8, top-p 0.95, 2 threads,
# same run, alternating. Results go to BENCHMARKS.md (section sample-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
work=.bench/sample
mkdir -p "$work"
source benches/torch-venv.sh
cargo build --release --benches --quiet
bin_dir=${CARGO_TARGET_DIR:-target}/release
bin=$(ls -t "$bin_dir"/deps/model-* | grep -v '\.d$' | head -1)
ckpt=$work/llama-8l-512
# The model benchmark's random Llama with the fixture tokenizer and its chat template (400 tokens of
# the 8192-token vocabulary have text; throughput does not depend on which ids are drawn).
[ -f "$ckpt/model.safetensors" ] || { "$bin" init "$ckpt" && cp tests/fixtures/hf/llama/tokenizer.json tests/fixtures/hf/llama/tokenizer_config.json "$ckpt/"; }
prompts=${PROMPTS:-256}
n=8
new=${NEW_TOKENS:-32}
python3 - "$work/prompts.jsonl" "$prompts" <<'PY'
import json, sys
words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        k = 4 + i % 9
        f.write(json.dumps({"id": f"p{i:04d}", "instruction": " ".join(words[(i + j) % len(words)] for j in range(k))}) + "\n")
PY
"$bin_dir"/fuselab data import "$work/prompts.jsonl" --out "$work/prompts.parquet" --dataset bench --category instruction >/dev/null
runs=${RUNS:-2}
out=$work/results.jsonl
: >"$out"
for r in $(seq "$runs"); do
  rm -rf "$work/samples.parquet" "$work/chunks"
  /usr/bin/time -f "%M" -o "$work/rss" "$bin_dir"/fuselab sample --model "$ckpt" --prompts "$work/prompts.parquet" \
    --out "$work/samples.parquet" --work-dir "$work/chunks" --n $n --max-new-tokens "$new" --ignore-eos \
    --temperature 0.8 --top-p 0.95 --seed "$r" --chunk-size 64 --slots ${SLOTS:-64} --json >"$work/f.json"
  python3 -c "import json; d=json.load(open('$work/f.json')); print(json.dumps({'tool':'fuselab','run':$r,'tokens_per_s':d['tokens_per_s'],'seconds':d['seconds'],'tokens':d['generated_tokens'],'rss_kib':int(open('$work/rss').read().split()[-1])}))" | tee -a "$out"
  /usr/bin/time -f "%M" -o "$work/rss" "$venv/bin/python" benches/sample_torch.py "$ckpt" "$work/prompts.jsonl" $n "$new" ${TORCH_BATCH:-8} 2>/dev/null | tail -1 >"$work/t.json"
  python3 -c "import json; d=json.load(open('$work/t.json')); print(json.dumps({'tool':'transformers','run':$r,'tokens_per_s':d['tokens_per_s'],'seconds':d['seconds'],'tokens':d['generated_tokens'],'rss_kib':int(open('$work/rss').read().split()[-1])}))" | tee -a "$out"
done
"$venv/bin/python" - "$out" "$prompts" "$new" <<'PY'
import json, statistics, sys, platform
import torch, transformers
rows = [json.loads(l) for l in open(sys.argv[1])]
prompts, new = int(sys.argv[2]), int(sys.argv[3])
f = [r for r in rows if r["tool"] == "fuselab"]; t = [r for r in rows if r["tool"] == "transformers"]
fm, tm = statistics.median(r["tokens_per_s"] for r in f), statistics.median(r["tokens_per_s"] for r in t)
lines = ["<!-- sample-bench:start -->", "## Sampling throughput (issue #10)", "",
         f"Machine: 2 cores, Linux {platform.release()}, 2 threads each. The Llama of the model benchmark (vocab 8192, hidden 512, 8 layers, f32); {prompts} chat-templated prompts of 4-12 words, 8 samples each, {new} new tokens per sample (no EOS stop), temperature 0.8, top-p 0.95. Whole runs (model load excluded on the torch side, included on ours), alternating.",
         "Reproduce: `just bench-sample` (runs `benches/sample.sh`).", "",
         "| tool | runs | best tokens/s | median tokens/s | peak RSS |", "|---|---|---|---|---|",
         f"| fuselab sample (64 slots, continuous batching, shared prefill) | {len(f)} | {max(r['tokens_per_s'] for r in f):,.0f} | {fm:,.0f} | {max(r['rss_kib'] for r in f)/1024:,.0f} MiB |",
         f"| transformers {transformers.__version__} generate(num_return_sequences=8), 8 prompts per batch, torch {torch.__version__} | {len(t)} | {max(r['tokens_per_s'] for r in t):,.0f} | {tm:,.0f} | {max(r['rss_kib'] for r in t)/1024:,.0f} MiB |",
         "", f"- fuselab: {fm/tm:.2f}x transformers (medians); goal 2x.",
         "- llama.cpp on the same model as GGUF f32: not measured yet (the GGUF backend is open work in issue #10).",
         "<!-- sample-bench:end -->"]
section = "\n".join(lines) + "\n"
path = "BENCHMARKS.md"
text = open(path).read()
if "<!-- sample-bench:start -->" in text:
    a = text.index("<!-- sample-bench:start -->")
    b = text.index("<!-- sample-bench:end -->") + len("<!-- sample-bench:end -->\n")
    text = text[:a] + section + text[b:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path, "w").write(text)
print(section)
PY
