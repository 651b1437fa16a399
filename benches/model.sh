#!/usr/bin/env bash
# Model-stack and trainer throughput against PyTorch + transformers, same checkpoint (vocab 8192,
# hidden 512, 8 layers, Llama), same shapes (batch 8 x 256 tokens, f32), 2 threads, same run.
# Each scenario runs in its own process; peak memory is its max RSS. Results go to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
work=.bench/model
mkdir -p "$work"
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch, transformers, trl, datasets" 2>/dev/null || {
  python3 -m venv .venv && .venv/bin/pip install -q torch transformers trl datasets; }
cargo build --release --benches --quiet
bin=$(ls -t target/release/deps/model-* | grep -v '\.d$' | head -1)
ckpt=$work/llama-8l-512
[ -f "$ckpt/model.safetensors" ] || "$bin" init "$ckpt"
steps=${STEPS:-3}
runs=${RUNS:-2}
out=$work/results.jsonl
: >"$out"
measure() { # tool scenario args... (one process)
  local tool=$1; shift
  {
    case $tool in
      fuselab) cmd=("$bin" "$@") ;;
      torch) cmd=(.venv/bin/python benches/model_torch.py "$@") ;;
      trl) cmd=(.venv/bin/python benches/model_trl.py "$@") ;;
    esac
    /usr/bin/time -f "%M" -o "$work/rss" "${cmd[@]}" 2>/dev/null | grep '^{"scenario"' >"$work/one"
    python3 -c "import json,sys; d=json.load(open('$work/one')); d['tool']='$tool'; d['max_rss_kb']=int(open('$work/rss').read().split()[-1]); print(json.dumps(d))" >>"$out"
    tail -n1 "$out"
  }
}
# Runs alternate between the tools, so a slow spell of this shared machine hits both sides.
for s in "train $ckpt $steps" "dpo $ckpt $steps" "generate $ckpt 1 64" "generate $ckpt 8 64"; do
  for r in $(seq "$runs"); do
    # shellcheck disable=SC2086
    measure fuselab $s
    # shellcheck disable=SC2086
    measure torch $s
    # The DPO step once more against TRL's own DPOTrainer (its whole training step).
    case $s in dpo*) measure trl dpo "$ckpt" "$steps" ;; esac
  done
done
python3 - "$out" <<'PY'
import json, os, platform, subprocess, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
torch_v = subprocess.run([".venv/bin/python", "-c", "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)"], capture_output=True, text=True).stdout.split()
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
names = {"train": "SFT training step (forward + backward + clip + AdamW), batch 8 x 256",
         "dpo": "DPO step (4 pairs, 128 prompt + 128 answer, cached reference log-probs)",
         "generate_b1": "greedy generation, batch 1, 16-token prompt, 64 new tokens",
         "generate_b8": "greedy generation, batch 8, 16-token prompt, 64 new tokens"}
lines = ["<!-- model-bench:start -->", "## Model stack and trainers (issues #3, #4)", "",
         f"Machine: {os.cpu_count()} cores ({cpu}); fuselab (candle 0.11, f32) vs PyTorch {torch_v[0] if torch_v else '?'} + "
         f"transformers {torch_v[1] if len(torch_v) > 1 else '?'} (TRL {torch_v[2] if len(torch_v) > 2 else '?'} for its row; `torch.set_num_threads(2)`, sdpa attention), all on the same "
         "random Llama checkpoint: vocab 8192, hidden 512, 8 layers, 8 heads, intermediate 1376. Tokens/s: best and median of the "
         "runs (each run is its own process, after one warm-up step; the tools alternate run by run); ratios of both; memory is "
         "each process's peak RSS.",
         "Reproduce: `just bench-model` (runs `benches/model.sh`; `STEPS`, `RUNS` to change the sample).", "",
         "| scenario | fuselab tok/s best (median) | peer tok/s best (median) | ratio best (median) | fuselab peak RSS | peer peak RSS |", "|---|---|---|---|---|---|"]
order = ["train", "dpo", "dpo_trl", "generate_b1", "generate_b8"]
names["dpo_trl"] = "DPO step, same pairs, peer: TRL 1.x `DPOTrainer` training step (its batching, loss, clip, AdamW, logging)"
for key in order:
    label = names[key]
    f = [r for r in rows if r["scenario"] == key.removesuffix("_trl") and r["tool"] == "fuselab"]
    t = [r for r in rows if r["scenario"] == key and r["tool"] in ("torch", "trl")]
    if not f or not t:
        continue
    bf, bt = max(r["tokens_per_s"] for r in f), max(r["tokens_per_s"] for r in t)
    qf = statistics.median(r["tokens_per_s"] for r in f)
    qt = statistics.median(r["tokens_per_s"] for r in t)
    mf, mt = max(r["max_rss_kb"] for r in f), max(r["max_rss_kb"] for r in t)
    lines.append(f"| {label} | {bf:.0f} ({qf:.0f}) | {bt:.0f} ({qt:.0f}) | {bf/bt:.2f}x ({qf/qt:.2f}x) | {mf/1024:.0f} MiB | {mt/1024:.0f} MiB |")
lines += ["", "All runs: " + ", ".join(f"{r['tool']} {r['scenario']} {r['tokens_per_s']:.0f}" for r in rows), "<!-- model-bench:end -->"]
section = "\n".join(lines) + "\n"
path = "BENCHMARKS.md"
text = open(path).read()
if "<!-- model-bench:start -->" in text:
    a = text.index("<!-- model-bench:start -->"); b = text.index("<!-- model-bench:end -->") + len("<!-- model-bench:end -->\n")
    text = text[:a] + section + text[b:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path, "w").write(text)
print(section)
PY
