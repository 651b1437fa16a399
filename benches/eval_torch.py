#!/usr/bin/env python3
"""The evaluation benchmark's PyTorch side: the same exact-answer items answered by transformers'
generate (greedy, chat-templated, left-padded batches, exactly MAX_NEW_TOKENS per answer as
`fuselab eval --ignore-eos`), then scored the same way (the last number of the answer against the gold
one), 2 threads. Prints one JSON line: items, generated tokens, seconds (after the model is loaded),
items/s, accuracy.

Usage: eval_torch.py CKPT ITEMS_JSONL MAX_NEW_TOKENS BATCH
"""
import json
import re
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ckpt, items_path, new, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or "<pad>"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    items = [json.loads(l) for l in open(items_path)]
    t = time.perf_counter()
    texts = [tok.apply_chat_template([{"role": "user", "content": it["question"]}], tokenize=False,
                                     add_generation_prompt=True) for it in items]
    generated, correct, prompt_tokens = 0, 0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id)
            new_ids = out[:, enc["input_ids"].shape[1]:]
            prompt_tokens += int(enc["attention_mask"].sum())
            generated += new_ids.numel()
            for j, ids in enumerate(new_ids):
                nums = re.findall(r"-?\d+", tok.decode(ids, skip_special_tokens=True))
                correct += bool(nums) and nums[-1] == items[i + j]["answer"]
    dt = time.perf_counter() - t
    print(json.dumps({"items": len(items), "generated_tokens": generated, "seconds": dt,
                      "items_per_s": len(items) / dt, "accuracy": correct / len(items),
                      "prompt_tokens": prompt_tokens}))


if __name__ == "__main__":
    main()
