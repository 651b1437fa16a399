#!/usr/bin/env python3
"""The FuseChat-3.0 construction rules in pandas, equivalent to `fuselab construct` with its default
parameters (no evaluation sets): 4:6 SFT:DPO split per (dataset, category) by a seeded blake3 order,
second language SFT-only, prompts with all-identical answers and all-failing code dropped, SFT = best
eligible answer, DPO = best vs worst eligible answer of one source with the RM gap in [0.01, 0.1],
the source with the highest chosen score, ties to the first (source, index). Writes sft.parquet and
dpo.parquet and prints the counts, which the benchmark checks against fuselab's.

Usage: construct_pandas.py IN_DIR OUT_DIR
"""
import json
import math
import os
import sys

import blake3
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SEED, FRACTION, GAP_MIN, GAP_MAX = 42, 0.4, 0.01, 0.1


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    prompts = pd.read_parquet(os.path.join(src, "prompts.parquet"))
    samples = pd.read_parquet(os.path.join(src, "samples.parquet"), columns=["prompt_id", "source", "sample_index", "text"])
    notes = pd.read_parquet(os.path.join(src, "annotations.parquet"), columns=["prompt_id", "source", "sample_index", "score", "correct"])

    sft_only = (prompts["category"] == "second_language") | (prompts["language"] == "zh")
    split = pd.Series(True, index=prompts.index)
    seed = SEED.to_bytes(8, "little")
    keyed = prompts.loc[~sft_only, ["id", "dataset", "category"]].copy()
    keyed["h"] = [blake3.blake3(seed + i.encode()).digest() for i in keyed["id"]]
    for _, g in keyed.groupby(["dataset", "category"], sort=False):
        g = g.sort_values(["h", "id"])
        n_sft = math.floor(FRACTION * len(g) + 0.5)
        split.loc[g.index] = [i < n_sft for i in range(len(g))]
    p = pd.DataFrame({"prompt_id": prompts["id"], "category": prompts["category"], "sft": split.values,
                      "pos": range(len(prompts))})

    df = samples.merge(notes, on=["prompt_id", "source", "sample_index"], how="left")
    df = df.merge(p, on="prompt_id", how="inner")
    if df["score"].isna().any():
        raise SystemExit("an answer has no score")
    ok = df["correct"].fillna(False).astype(bool)
    g = df.groupby("prompt_id")
    df["n"] = g["text"].transform("size")
    df["n_distinct"] = g["text"].transform("nunique")
    df["n_correct"] = ok.groupby(df["prompt_id"]).transform("sum")
    checked = df["category"].isin(["math", "code"])
    excluded = ((df["n"] > 1) & (df["n_distinct"] == 1)) | ((df["category"] == "code") & (df["n_correct"] == 0))
    df = df[~excluded]
    ok = ok[~excluded]
    checked = checked[~excluded]

    sft = df[df["sft"] & (~checked | ok)]
    sft = sft.sort_values(["prompt_id", "score", "source", "sample_index"], ascending=[True, False, True, True], kind="stable")
    sft = sft.drop_duplicates("prompt_id", keep="first").sort_values("pos")

    d = df[~df["sft"]]
    dok, dchk = ok[~df["sft"]], checked[~df["sft"]]
    chosen = d[~dchk | dok].sort_values(["prompt_id", "source", "score", "sample_index"], ascending=[True, True, False, True], kind="stable")
    chosen = chosen.drop_duplicates(["prompt_id", "source"], keep="first")
    rejected = d[~dchk | ~dok].sort_values(["prompt_id", "source", "score", "sample_index"], ascending=[True, True, True, True], kind="stable")
    rejected = rejected.drop_duplicates(["prompt_id", "source"], keep="first")
    pairs = chosen.merge(rejected[["prompt_id", "source", "sample_index", "text", "score"]], on=["prompt_id", "source"], suffixes=("", "_r"))
    pairs["gap"] = pairs["score"] - pairs["score_r"]
    pairs = pairs[(pairs["sample_index"] != pairs["sample_index_r"]) & (pairs["text"] != pairs["text_r"])
                  & (pairs["gap"] >= GAP_MIN) & (pairs["gap"] <= GAP_MAX)]
    pairs = pairs.sort_values(["prompt_id", "score", "source"], ascending=[True, False, True], kind="stable")
    pairs = pairs.drop_duplicates("prompt_id", keep="first").sort_values("pos")

    meta = prompts.set_index("id")
    msgs = meta["messages"]
    sft_rows = pd.DataFrame({
        "prompt_id": sft["prompt_id"].values, "dataset": meta.loc[sft["prompt_id"], "dataset"].values,
        "category": sft["category"].values, "source": sft["source"].values, "sample_index": sft["sample_index"].values,
        "messages": [list(m) + [{"role": "assistant", "content": t}] for m, t in zip(msgs.loc[sft["prompt_id"]], sft["text"])],
        "score": sft["score"].values})
    dpo_rows = pd.DataFrame({
        "prompt_id": pairs["prompt_id"].values, "dataset": meta.loc[pairs["prompt_id"], "dataset"].values,
        "category": pairs["category"].values, "source": pairs["source"].values,
        "prompt": list(msgs.loc[pairs["prompt_id"]]),
        "chosen": [[{"role": "assistant", "content": t}] for t in pairs["text"]],
        "rejected": [[{"role": "assistant", "content": t}] for t in pairs["text_r"]],
        "chosen_index": pairs["sample_index"].values, "rejected_index": pairs["sample_index_r"].values,
        "chosen_score": pairs["score"].values, "rejected_score": pairs["score_r"].values})
    pq.write_table(pa.Table.from_pandas(sft_rows, preserve_index=False), os.path.join(out, "sft.parquet"))
    pq.write_table(pa.Table.from_pandas(dpo_rows, preserve_index=False), os.path.join(out, "dpo.parquet"))
    print(json.dumps({"sft": len(sft_rows), "dpo": len(dpo_rows)}))


if __name__ == "__main__":
    main()
