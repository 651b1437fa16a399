#!/usr/bin/env bash
# Evaluation throughput: `fuselab eval` on a generation benchmark (exact-answer arithmetic items,
# greedy, chat-templated, answered with continuous batching, then scored) against transformers'
# generate on the same checkpoint (the Llama of benches/model.sh: vocab 8192, hidden 512, 8 layers,
# f32) and items, exactly the same number of new tokens per answer on both sides (no EOS stop), 2
# threads, same run, alternating. Seconds exclude model loading on both sides. Results go to
# BENCHMARKS.md (section eval-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
work=.bench/eval
mkdir -p "$work"
source benches/torch-venv.sh
cargo build --release --benches --quiet
bin_dir=${CARGO_TARGET_DIR:-target}/release
bin=$(ls -t "$bin_dir"/deps/model-* | grep -v '\.d$' | head -1)
ckpt=.bench/sample/llama-8l-512
[ -f "$ckpt/model.safetensors" ] || { mkdir -p .bench/sample && "$bin" init "$ckpt" && cp tests/fixtures/hf/llama/tokenizer.json tests/fixtures/hf/llama/tokenizer_config.json "$ckpt/"; }
items=${ITEMS:-128}
new=${NEW_TOKENS:-32}
python3 - "$work/items.jsonl" "$items" <<'PY'
import json, random, sys
r = random.Random(5)
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        a, b, c = r.randint(2, 40), r.randint(2, 40), r.randint(1, 9)
        q = f"Tom has {a} apples and buys {b} more, then gives away {c}. How many apples does he have?"
        f.write(json.dumps({"id": f"q{i:04d}", "question": q, "answer": str(a + b - c), "category": "arith"}) + "\n")
PY
runs=${RUNS:-3}
out=$work/results.jsonl
: >"$out"
for r in $(seq "$runs"); do
  rm -rf "$work/fuselab"
  "$bin_dir"/fuselab eval --bench "$work/items.jsonl" --kind exact --model "$ckpt" --max-new-tokens "$new" --ignore-eos \
    --slots ${SLOTS:-64} --out "$work/fuselab" --json >"$work/f.json"
  python3 -c "
import json; d=json.load(open('$work/f.json')); g=d['extra']['generation']
print(json.dumps({'tool':'fuselab','run':$r,'items':d['result']['n_items'],'seconds':g['seconds'],'items_per_s':d['result']['n_items']/g['seconds'],'tokens':g['stats']['generated_tokens'],'accuracy':d['result']['score']['value']/100}))" | tee -a "$out"
  "$venv/bin/python" benches/eval_torch.py "$ckpt" "$work/items.jsonl" "$new" ${TORCH_BATCH:-32} 2>/dev/null | tail -1 >"$work/t.json"
  python3 -c "
import json; d=json.load(open('$work/t.json'))
print(json.dumps({'tool':'transformers','run':$r,'items':d['items'],'seconds':d['seconds'],'items_per_s':d['items_per_s'],'tokens':d['generated_tokens'],'accuracy':d['accuracy']}))" | tee -a "$out"
done
"$venv/bin/python" - "$out" "$items" "$new" <<'PY'
import json, statistics, sys, platform
import torch, transformers
rows = [json.loads(l) for l in open(sys.argv[1])]
items, new = int(sys.argv[2]), int(sys.argv[3])
f = [r for r in rows if r["tool"] == "fuselab"]; t = [r for r in rows if r["tool"] == "transformers"]
fm, tm = statistics.median(r["items_per_s"] for r in f), statistics.median(r["items_per_s"] for r in t)
lines = ["<!-- eval-bench:start -->", "## Evaluation throughput (issue #11)", "",
         f"Machine: 2 cores, Linux {platform.release()}, 2 threads each. The Llama of the model benchmark (vocab 8192, hidden 512, 8 layers, f32); {items} exact-answer arithmetic items, chat-templated, greedy, {new} new tokens per answer on both sides (no EOS stop), then scored (last number vs gold). Seconds exclude model loading on both sides; alternating runs.",
         "Reproduce: `just bench-eval` (runs `benches/eval.sh`).", "",
         "| tool | runs | best items/s | median items/s | tokens per run |", "|---|---|---|---|---|",
         f"| fuselab eval (64 slots, continuous batching) | {len(f)} | {max(r['items_per_s'] for r in f):,.2f} | {fm:,.2f} | {f[0]['tokens']} |",
         f"| transformers {transformers.__version__} generate, greedy, 32 items per batch (its best of 16 / 32 / 64 here), torch {torch.__version__} | {len(t)} | {max(r['items_per_s'] for r in t):,.2f} | {tm:,.2f} | {t[0]['tokens']} |",
         "", f"- fuselab: {fm/tm:.2f}x transformers (medians); goal 1.5x.",
         "<!-- eval-bench:end -->"]
section = "\n".join(lines) + "\n"
path = "BENCHMARKS.md"
text = open(path).read()
if "<!-- eval-bench:start -->" in text:
    a = text.index("<!-- eval-bench:start -->")
    b = text.index("<!-- eval-bench:end -->") + len("<!-- eval-bench:end -->\n")
    text = text[:a] + section + text[b:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path, "w").write(text)
print(section)
PY
