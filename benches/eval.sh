#!/usr/bin/env bash
# Evaluation throughput: `fuselab eval` on a generation benchmark (exact-answer arithmetic items,
# greedy, chat-templated, answered with continuous batching, then scored) against transformers'
# generate on the same checkpoint (the Llama of benches/model.sh: vocab 8192, hidden 512, 8 layers,
# f32) and items (zero-shot and 4-shot prompt sets), exactly the same number of new tokens per answer on both sides (no EOS stop), 2
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
# Two prompt sets: zero-shot, and 4-shot (GSM8K-style worked examples before each question, the
# same four for every item, as few-shot evaluation harnesses write them).
for shots in 0 4; do
python3 - "$work/items-$shots.jsonl" "$items" "$shots" <<'PY'
import json, random, sys
r = random.Random(5)
shots = int(sys.argv[3])
ex = random.Random(11)
pre = ""
for _ in range(shots):
    a, b, c = ex.randint(2, 40), ex.randint(2, 40), ex.randint(1, 9)
    pre += f"Q: Tom has {a} apples and buys {b} more, then gives away {c}. How many apples does he have?\nA: {a} + {b} - {c} = {a + b - c}. The answer is {a + b - c}.\n\n"
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        a, b, c = r.randint(2, 40), r.randint(2, 40), r.randint(1, 9)
        q = f"Tom has {a} apples and buys {b} more, then gives away {c}. How many apples does he have?"
        if shots:
            q = f"{pre}Q: {q}\nA:"
        f.write(json.dumps({"id": f"q{i:04d}", "question": q, "answer": str(a + b - c), "category": "arith"}) + "\n")
PY
done
runs=${RUNS:-3}
out=$work/results.jsonl
: >"$out"
for r in $(seq "$runs"); do
  for shots in 0 4; do
  rm -rf "$work/fuselab"
  "$bin_dir"/fuselab eval --bench "$work/items-$shots.jsonl" --kind exact --model "$ckpt" --max-new-tokens "$new" --ignore-eos \
    --slots ${SLOTS:-64} --out "$work/fuselab" --json >"$work/f.json"
  python3 -c "
import json; d=json.load(open('$work/f.json')); g=d['extra']['generation']
print(json.dumps({'tool':'fuselab','shots':$shots,'run':$r,'items':d['result']['n_items'],'seconds':g['seconds'],'items_per_s':d['result']['n_items']/g['seconds'],'tokens':g['stats']['generated_tokens'],'accuracy':d['result']['score']['value']/100}))" | tee -a "$out"
  "$venv/bin/python" benches/eval_torch.py "$ckpt" "$work/items-$shots.jsonl" "$new" ${TORCH_BATCH:-32} 2>/dev/null | tail -1 >"$work/t.json"
  python3 -c "
import json; d=json.load(open('$work/t.json'))
print(json.dumps({'tool':'transformers','shots':$shots,'run':$r,'items':d['items'],'seconds':d['seconds'],'items_per_s':d['items_per_s'],'tokens':d['generated_tokens'],'accuracy':d['accuracy'],'prompt_tokens':d.get('prompt_tokens')}))" | tee -a "$out"
  done
done
"$venv/bin/python" - "$out" "$items" "$new" <<'PY'
import json, statistics, sys, platform
import torch, transformers
rows = [json.loads(l) for l in open(sys.argv[1])]
items, new = int(sys.argv[2]), int(sys.argv[3])
lines = ["<!-- eval-bench:start -->", "## Evaluation throughput (issue #11)", "",
         f"Machine: 2 cores, Linux {platform.release()}, 2 threads each. The Llama of the model benchmark (vocab 8192, hidden 512, 8 layers, f32); {items} exact-answer arithmetic items, chat-templated, greedy, {new} new tokens per answer on both sides (no EOS stop), then scored (last number vs gold). Two prompt sets: zero-shot, and 4-shot (the same four worked examples before every question, as few-shot harnesses write GSM8K prompts). Seconds exclude model loading on both sides; alternating runs.",
         "Reproduce: `just bench-eval` (runs `benches/eval.sh`).", "",
         "| prompts | tool | runs | best items/s | median items/s | prompt tokens per item | new tokens per run |", "|---|---|---|---|---|---|---|"]
notes = []
for shots in (0, 4):
    f = [r for r in rows if r["tool"] == "fuselab" and r["shots"] == shots]
    t = [r for r in rows if r["tool"] == "transformers" and r["shots"] == shots]
    fm, tm = statistics.median(r["items_per_s"] for r in f), statistics.median(r["items_per_s"] for r in t)
    label = "zero-shot" if shots == 0 else f"{shots}-shot"
    ptoks = t[0].get("prompt_tokens") or 0
    lines.append(f"| {label} | fuselab eval (64 slots, continuous batching, shared-prefix prefill) | {len(f)} | {max(r['items_per_s'] for r in f):,.2f} | {fm:,.2f} | {ptoks / items:.0f} | {f[0]['tokens']} |")
    lines.append(f"| {label} | transformers {transformers.__version__} generate, greedy, 32 items per batch (its best of 16 / 32 / 64 here), torch {torch.__version__} | {len(t)} | {max(r['items_per_s'] for r in t):,.2f} | {tm:,.2f} | {ptoks / items:.0f} | {t[0]['tokens']} |")
    notes.append(f"- {label}: fuselab {fm/tm:.2f}x transformers (medians); goal 1.5x.")
lines += [""] + notes + ["<!-- eval-bench:end -->"]
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
