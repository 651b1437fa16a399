#!/usr/bin/env python3
"""TRL peer of benches/model.rs's `dpo` scenario: a whole DPOTrainer training step (TRL's batching,
concatenated chosen/rejected forward, sigmoid loss, backward, clipping, AdamW, scheduler, logging) on
the same checkpoint, 4 pairs per step of 128 prompt + 128 answer tokens, reference log-probs
precomputed (`precompute_ref_log_probs=True`), 2 threads.

  python benches/model_trl.py dpo <dir> <steps>

The bench checkpoint has no tokenizer, so a word-level one is written beside it (token `w<i>` is id
<i>): texts of 128 words are exactly 128 tokens, and TRL's appended EOS closes each 127-word answer.
"""
import json
import os
import sys
import time

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer

torch.set_num_threads(2)
VOCAB, PAIRS, HALF = 8192, 4, 128


def tokenizer(d):
    path = os.path.join(d, "trl-bench-tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        # Special tokens get names that are no word's prefix: HF splits special tokens out of text
        # before the model sees it, so an EOS spelled `w2` would split `w25` in two.
        vocab = {f"w{i}": i for i in range(3, VOCAB)} | {"<pad>": 0, "<unk>": 1, "</s>": 2}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


def main():
    scenario, d, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert scenario == "dpo"
    g = torch.Generator().manual_seed(1)
    words = lambda n: " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (n,), generator=g).tolist())
    # Every step sees PAIRS new pairs; one warm-up step first, as the candle side does.
    n = PAIRS * (steps + 1)
    ds = Dataset.from_list([{"prompt": words(HALF), "chosen": " " + words(HALF - 1),
                             "rejected": " " + words(HALF - 1)} for _ in range(n)])
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=os.path.join(d, "trl-bench-out"), per_device_train_batch_size=PAIRS,
        max_steps=steps + 1, learning_rate=1e-4, beta=0.1, loss_type=["sigmoid"],
        precompute_ref_log_probs=True, max_length=None, bf16=False, use_cpu=True,
        report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, seed=1, lr_scheduler_type="constant", max_grad_norm=1.0,
    )
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer(d),
                         callbacks=[timer])
    batch = trainer.get_train_dataloader()
    first = next(iter(batch))
    lens = {k: tuple(v.shape) for k, v in first.items() if hasattr(v, "shape")}
    trainer.train()
    total = sum(timer.times[1:])
    print(json.dumps({"scenario": "dpo_trl", "tokens": steps * 2 * PAIRS * 2 * HALF,
                      "seconds": round(total, 4), "tokens_per_s": round(steps * 2 * PAIRS * 2 * HALF / total, 1),
                      "batch": {k: v for k, v in lens.items()}}))


if __name__ == "__main__":
    main()
