#!/usr/bin/env bash
# Sampling throughput: `fuselab sample` (continuous batching, shared prefill) against transformers'
# generate(num_return_sequences=8) in left-padded batches, same checkpoint (the Llama of
# benches/model.sh: vocab 8192, hidden 512, 8 layers, f32), same 256 chat-templated prompts, 8 samples
# each, 32 new tokens per sample (no EOS stop on either side), temperature 0.8, top-p 0.95, 2 threads,
# same run, alternating. The same checkpoint converted to GGUF f32 by llama.cpp's own converter
# (benches/gguf_convert.py) runs in llama.cpp's server (64 slots, continuous batching; the same
# prompts, sampler and token count, each sample one request from fuselab's OpenAI-compatible client),
# in llama-batched-bench (its decoding ceiling) and in fuselab's GGUF backend (candle-transformers).
# Results go to BENCHMARKS.md (section sample-bench).
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
python3 -c "import json,sys; [print(json.loads(l)['instruction']) for l in open(sys.argv[1])]" "$work/prompts.jsonl" >"$work/prompts.txt"
gguf=$work/llama-8l-512-f32.gguf
[ -f "$gguf" ] || "$venv/bin/python" benches/gguf_convert.py "$(bash scripts/llama-cpp.sh converter)" "$ckpt" "$gguf" f32 >/dev/null 2>&1
llama_bin=$(bash scripts/llama-cpp.sh build)/bin
head -32 "$work/prompts.jsonl" >"$work/prompts32.jsonl"
"$bin_dir"/fuselab data import "$work/prompts32.jsonl" --out "$work/prompts32.parquet" --dataset bench --category instruction >/dev/null
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
  # llama.cpp's server: 64 slots decoding together (continuous batching), every sample one request
  # from fuselab's OpenAI-compatible client (64 in flight); model load excluded.
  port=$((18000 + RANDOM % 2000))
  "$llama_bin"/llama-server -m "$gguf" -t 2 -tb 2 -c $((256 * ${SLOTS:-64})) -np ${SLOTS:-64} --host 127.0.0.1 --port $port >"$work/server.log" 2>&1 &
  spid=$!
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
  rm -rf "$work/s.parquet" "$work/scache"
  "$bin_dir"/fuselab sample --model "http://127.0.0.1:$port/v1" --served-model bench --prompts "$work/prompts.parquet" \
    --out "$work/s.parquet" --cache-dir "$work/scache" --n $n --max-new-tokens "$new" --temperature 0.8 --top-p 0.95 \
    --seed "$r" --concurrency ${SLOTS:-64} --json >"$work/s.json"
  rss=$(awk '/VmHWM/ {print $2}' /proc/$spid/status)
  kill $spid; wait $spid 2>/dev/null || true
  python3 -c "import json; d=json.load(open('$work/s.json')); print(json.dumps({'tool':'llama.cpp','run':$r,'tokens_per_s':d['generated_tokens']/d['seconds'],'seconds':d['seconds'],'tokens':d['generated_tokens'],'rss_kib':$rss}))" | tee -a "$out"
  # llama.cpp's own batched-decoding benchmark: 64 sequences from one shared 32-token prompt, 32
  # tokens each, no sampling: its decoding ceiling on this model.
  "$llama_bin"/llama-batched-bench -m "$gguf" -t 2 -tb 2 -c 16384 -kvu -npp 32 -ntg "$new" -npl ${SLOTS:-64} -pps >"$work/bb.txt" 2>&1
  python3 - "$work/bb.txt" "$r" <<'PY' | tee -a "$out"
import json, sys
rows = [l.split("|")[1:-1] for l in open(sys.argv[1]) if l.startswith("|") and l.split("|")[1].strip().isdigit()]
c = [x.strip() for x in rows[-1]]
print(json.dumps({"tool": "llama.cpp-batched-bench", "run": int(sys.argv[2]), "tokens_per_s": float(c[7]), "total_tokens_per_s": float(c[9])}))
PY
  rm -rf "$work/g.parquet" "$work/gchunks"
  # candle-transformers' decoding is ~5x slower: the first 32 prompts only (tokens/s compare).
  /usr/bin/time -f "%M" -o "$work/rss" "$bin_dir"/fuselab sample --model "$gguf" --prompts "$work/prompts32.parquet" \
    --out "$work/g.parquet" --work-dir "$work/gchunks" --n $n --max-new-tokens "$new" --ignore-eos \
    --temperature 0.8 --top-p 0.95 --seed "$r" --chunk-size 64 --slots 8 --json >"$work/g.json"
  python3 -c "import json; d=json.load(open('$work/g.json')); print(json.dumps({'tool':'fuselab-gguf','run':$r,'tokens_per_s':d['tokens_per_s'],'seconds':d['seconds'],'tokens':d['generated_tokens'],'rss_kib':int(open('$work/rss').read().split()[-1])}))" | tee -a "$out"
done
"$venv/bin/python" - "$out" "$prompts" "$new" <<'PY'
import json, statistics, sys, platform
import torch, transformers
rows = [json.loads(l) for l in open(sys.argv[1])]
prompts, new = int(sys.argv[2]), int(sys.argv[3])
f = [r for r in rows if r["tool"] == "fuselab"]; t = [r for r in rows if r["tool"] == "transformers"]
l = [r for r in rows if r["tool"] == "llama.cpp"]; g = [r for r in rows if r["tool"] == "fuselab-gguf"]
bb = [r for r in rows if r["tool"] == "llama.cpp-batched-bench"]
fm, tm = statistics.median(r["tokens_per_s"] for r in f), statistics.median(r["tokens_per_s"] for r in t)
lm, gm = statistics.median(r["tokens_per_s"] for r in l), statistics.median(r["tokens_per_s"] for r in g)
lines = ["<!-- sample-bench:start -->", "## Sampling throughput (issue #10)", "",
         f"Machine: 2 cores, Linux {platform.release()}, 2 threads each. The Llama of the model benchmark (vocab 8192, hidden 512, 8 layers, f32); {prompts} chat-templated prompts of 4-12 words, 8 samples each, {new} new tokens per sample (no EOS stop), temperature 0.8, top-p 0.95. Whole runs (model load excluded on the torch side, included on ours), alternating.",
         "Reproduce: `just bench-sample` (runs `benches/sample.sh`).", "",
         "| tool | runs | best tokens/s | median tokens/s | peak RSS |", "|---|---|---|---|---|",
         f"| fuselab sample (64 slots, continuous batching, shared prefill) | {len(f)} | {max(r['tokens_per_s'] for r in f):,.0f} | {fm:,.0f} | {max(r['rss_kib'] for r in f)/1024:,.0f} MiB |",
         f"| transformers {transformers.__version__} generate(num_return_sequences=8), 8 prompts per batch, torch {torch.__version__} | {len(t)} | {max(r['tokens_per_s'] for r in t):,.0f} | {tm:,.0f} | {max(r['rss_kib'] for r in t)/1024:,.0f} MiB |",
         f"| llama.cpp server (llama-cpp-python 0.3.36's vendored llama.cpp, built here with GGML_NATIVE) on the same model as GGUF f32: 64 slots, continuous batching, one request per sample from 64 client threads | {len(l)} | {max(r['tokens_per_s'] for r in l):,.0f} | {lm:,.0f} | {max(r['rss_kib'] for r in l)/1024:,.0f} MiB |",
         f"| fuselab sample on the same GGUF f32 (candle-transformers' quantized Llama, 8 samples of a prompt as one batch; the first 32 prompts) | {len(g)} | {max(r['tokens_per_s'] for r in g):,.0f} | {gm:,.0f} | {max(r['rss_kib'] for r in g)/1024:,.0f} MiB |",
         "", f"- fuselab: {fm/tm:.2f}x transformers (medians); goal 2x.",
         f"- fuselab: {fm/lm:.2f}x llama.cpp's server on the same model as GGUF f32 (medians); goal 1.0x.",
         f"- llama.cpp's decoding ceiling on this model (llama-batched-bench: {64} sequences from one shared 32-token prompt, {new} tokens each, no sampling; generation phase only): median {statistics.median(r['tokens_per_s'] for r in bb):,.0f} tokens/s.",
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
