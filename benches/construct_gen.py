#!/usr/bin/env python3
"""A FuseChat-scale construction input: P prompts (instruction / math / code / second language), S
sources x K samples each, RM scores and verdicts. Written as the Parquet tables `fuselab construct`
reads (pyarrow), seeded, so both sides of the benchmark read the same bytes.

Usage: construct_gen.py OUT_DIR [--prompts 100000] [--sources 4] [--samples 5]
"""
import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--samples", type=int, default=5)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(7)
    n = a.prompts
    cats = np.array(["instruction", "math", "code", "second_language"])[rng.choice(4, n, p=[0.55, 0.3, 0.1, 0.05])]
    ids = [f"p{i:07d}" for i in range(n)]
    datasets = np.where(cats == "instruction", "UltraFeedback",
                        np.where(cats == "math", "OpenMathInstruct-2",
                                 np.where(cats == "code", "leetcode", "alpaca_gpt4_zh")))
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    prompts = pa.table({
        "id": ids, "dataset": datasets, "category": cats,
        "messages": pa.array([[{"role": "user", "content": f"Question {i}: explain topic {i % 977}."}] for i in range(n)], type=msg),
        "gold": pa.array([("42" if c == "math" else None) for c in cats], type=pa.string()),
        "tests": pa.array([("assert f() == 1" if c == "code" else None) for c in cats], type=pa.string()),
        "entry_point": pa.array([None] * n, type=pa.string()),
        "language": np.where(cats == "second_language", "zh", "en"),
    })
    pq.write_table(prompts, os.path.join(a.out, "prompts.parquet"))
    k = a.sources * a.samples
    m = n * k
    pid = np.repeat(np.array(ids), k)
    src = np.tile(np.repeat(np.array([f"source{s}" for s in range(a.sources)]), a.samples), n)
    idx = np.tile(np.arange(a.samples, dtype=np.uint32), n * a.sources)
    cat = np.repeat(cats, k)
    score = np.round(rng.normal(0.15, 0.04, m), 4)
    correct = np.where((cat == "math") | (cat == "code"), rng.random(m) < 0.6, None)
    text = [f"answer {i}" for i in range(m)]
    samples = pa.table({"prompt_id": pid, "source": src, "sample_index": idx,
                        "seed": pa.array(np.zeros(m, dtype=np.uint64)), "text": text,
                        "tokens": pa.array(np.full(m, 100, dtype=np.uint32)), "finish": ["stop_token"] * m})
    pq.write_table(samples, os.path.join(a.out, "samples.parquet"))
    notes = pa.table({"prompt_id": pid, "source": src, "sample_index": idx, "score": score,
                      "correct": pa.array(correct, type=pa.bool_()), "reason": pa.array([None] * m, type=pa.string())})
    pq.write_table(notes, os.path.join(a.out, "annotations.parquet"))
    print(f"{n} prompts, {m} answers -> {a.out}")


if __name__ == "__main__":
    main()
