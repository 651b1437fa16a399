#!/usr/bin/env python3
"""PyTorch + transformers peer of benches/model.rs: same checkpoint, shapes, steps and threads.

  python benches/model_torch.py train <dir> <steps>      SFT step: forward + backward + clip + AdamW
  python benches/model_torch.py dpo <dir> <steps>        sigmoid-DPO step on 4 pairs (128 prompt + 128 answer),
                                                         reference log-probs precomputed, as TRL does with
                                                         precompute_ref_log_probs=True
  python benches/model_torch.py generate <dir> <batch> <new>   greedy model.generate with KV cache
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)
VOCAB, SEQ, BATCH = 8192, 256, 8


def report(what, tokens, secs):
    print(json.dumps({"scenario": what, "tokens": tokens, "seconds": round(secs, 4),
                      "tokens_per_s": round(tokens / secs, 1)}))


def main():
    scenario, d = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    if scenario in ("train", "dpo"):
        steps = int(sys.argv[3])
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        comp = torch.zeros(BATCH, SEQ - 1)
        comp[:, SEQ // 2 - 1:] = 1
        ref = torch.zeros(BATCH // 2)
        total = 0.0
        for s in range(steps + 1):
            t0 = time.perf_counter()
            if scenario == "train":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                logits = model(input_ids=ids).logits[:, :-1]
                lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
                seq = (lp * comp).sum(1)
                c, r = seq[:BATCH // 2], seq[BATCH // 2:]
                loss = -F.logsigmoid(0.1 * ((c - ref) - (r - ref))).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if s > 0:
                total += time.perf_counter() - t0
        report(scenario, steps * BATCH * SEQ, total)
    else:
        batch, new = int(sys.argv[3]), int(sys.argv[4])
        model.eval()
        ids = torch.randint(3, VOCAB, (batch, 16), generator=g)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            dt = time.perf_counter() - t0
        report(f"generate_b{batch}", (out.shape[1] - 16) * batch, dt)


if __name__ == "__main__":
    main()
