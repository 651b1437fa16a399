#!/usr/bin/env bash
# Math verdicts per second on the labelled fixture (tests/fixtures/math/math_verify.jsonl, 400
# pairs) against Hugging Face's math-verify (parse + verify per pair, PyPI `math-verify`), same run,
# alternating. Each side is timed as a whole process (start-up included) and as its judging loop.
# Results go to BENCHMARKS.md (section math-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.bench/mv-venv
[ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import math_verify" 2>/dev/null || {
  /usr/bin/python3 -m venv "$venv" && "$venv/bin/pip" install -q math-verify; }
cargo build --release --quiet
fixture=tests/fixtures/math/math_verify.jsonl
work=.bench/math
mkdir -p "$work"
# 10 copies of the fixture: long enough that start-up does not dominate.
for i in $(seq 10); do cat "$fixture"; done >"$work/pairs.jsonl"
n=$(wc -l <"$work/pairs.jsonl")
runs=${RUNS:-3}
out=$work/results.jsonl
: >"$out"
for r in $(seq "$runs"); do
  t0=$(date +%s.%N)
  target/release/fuselab annotate math --answers "$work/pairs.jsonl" --json >/dev/null
  t1=$(date +%s.%N)
  mv_loop=$("$venv/bin/python" - "$work/pairs.jsonl" <<'PY'
import json, sys, time
from math_verify import parse, verify
rows = [json.loads(l) for l in open(sys.argv[1])]
t = time.perf_counter()
for r in rows:
    verify(parse(f"${r['gold']}$"), parse(f"${r['answer']}$"))
print(time.perf_counter() - t)
PY
)
  t2=$(date +%s.%N)
  echo "{\"run\": $r, \"n\": $n, \"fuselab_s\": $(printf "%.6f" "$(echo "$t1 - $t0" | bc)"), \"math_verify_s\": $(printf "%.6f" "$(echo "$t2 - $t1" | bc)"), \"math_verify_loop_s\": $mv_loop}" | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys, platform
rows = [json.loads(l) for l in open(sys.argv[1])]
n = rows[0]["n"]
fl = [n / r["fuselab_s"] for r in rows]
mv = [n / r["math_verify_s"] for r in rows]
mvl = [n / r["math_verify_loop_s"] for r in rows]
lines = ["<!-- math-bench:start -->", "## Math verifier (issue #9)", "",
         f"Machine: 2 cores, Linux {platform.release()}. {n} (gold, answer) pairs (the 400-pair math-verify fixture, 10 times), one process each, runs alternating.",
         "Reproduce: `just bench-math` (runs `benches/math.sh`; math-verify is installed into `.bench/`).", "",
         "| tool | runs | best verdicts/s | median verdicts/s |", "|---|---|---|---|",
         f"| fuselab annotate math (whole process) | {len(rows)} | {max(fl):,.0f} | {statistics.median(fl):,.0f} |",
         f"| math-verify parse + verify (whole process) | {len(rows)} | {max(mv):,.0f} | {statistics.median(mv):,.0f} |",
         f"| math-verify parse + verify (loop only, imports excluded) | {len(rows)} | {max(mvl):,.0f} | {statistics.median(mvl):,.0f} |",
         "", f"- fuselab: {statistics.median(fl)/statistics.median(mvl):.0f}x math-verify's judging loop, {statistics.median(fl)/statistics.median(mv):.0f}x its whole process (medians); goal 10x.",
         "- Agreement with math-verify on the fixture: 399/400 (the test lists the one disagreement and why ours is the rule followed).",
         "<!-- math-bench:end -->"]
section = "\n".join(lines) + "\n"
path = "BENCHMARKS.md"
text = open(path).read()
if "<!-- math-bench:start -->" in text:
    a = text.index("<!-- math-bench:start -->")
    b = text.index("<!-- math-bench:end -->") + len("<!-- math-bench:end -->\n")
    text = text[:a] + section + text[b:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path, "w").write(text)
print(section)
PY
