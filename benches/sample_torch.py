#!/usr/bin/env python3
"""The sampling benchmark's PyTorch side: transformers' generate(num_return_sequences=N) on the same
checkpoint and prompts (chat-templated, left-padded batches), do_sample with the same temperature /
top_p, exactly max_new_tokens per sample (no EOS stop, as `fuselab sample --ignore-eos`), 2 threads.
Prints one JSON line: samples, generated tokens, seconds, tokens/s.

Usage: sample_torch.py CKPT PROMPTS_JSONL N MAX_NEW_TOKENS BATCH_PROMPTS
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ckpt, prompts_path, n, new, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or "<pad>"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    rows = [json.loads(l) for l in open(prompts_path)]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    t = time.perf_counter()
    generated = 0
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                                 num_return_sequences=n, max_new_tokens=new, min_new_tokens=new,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id)
            generated += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    dt = time.perf_counter() - t
    print(json.dumps({"samples": len(texts) * n, "generated_tokens": generated, "seconds": dt,
                      "tokens_per_s": generated / dt}))


if __name__ == "__main__":
    main()
