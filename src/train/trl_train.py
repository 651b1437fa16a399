"""fuselab's driver for TRL (written into each external training step's work dir and run there by
`accelerate launch`): SFT or DPO with the hyperparameters of config.json, on rows in TRL's
conversational layout, saving a Hugging Face checkpoint and the exact loss of every optimizer step.

  accelerate launch [--config_file accelerate.yaml] train.py config.json

config.json: {"kind": "sft"|"dpo", "model": DIR, "train": JSONL, "out": DIR, "args": {...}} where
"args" are SFTConfig / DPOConfig fields (learning_rate, beta, loss_type, ...).
"""
import json
import os
import sys

import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback


def main():
    cfg = json.load(open(sys.argv[1]))
    rows = [json.loads(l) for l in open(cfg["train"]) if l.strip()]
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    args = dict(cfg["args"])
    args.update(output_dir=os.path.join(cfg["out"], "trainer"), report_to=[], logging_steps=1,
                save_strategy="no", disable_tqdm=True)
    losses = []

    def record(base):
        # transformers rounds logged losses to 4 decimals; keep the exact mean per optimizer step.
        class Recording(base):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
                loss = out[0] if return_outputs else out
                if model.training:
                    losses.append(float(loss.detach()))
                return out
        return Recording

    if cfg["kind"] == "dpo":
        trainer = record(trl.DPOTrainer)(model=model, ref_model=None, args=trl.DPOConfig(**args),
                                          train_dataset=Dataset.from_list(rows), processing_class=tok)
    else:
        trainer = record(trl.SFTTrainer)(model=model, args=trl.SFTConfig(**args),
                                          train_dataset=Dataset.from_list(rows), processing_class=tok)
    accum = trainer.args.gradient_accumulation_steps
    trainer.train()
    if trainer.accelerator.is_main_process:
        model_dir = os.path.join(cfg["out"], "model")
        trainer.save_model(model_dir)
        tok.save_pretrained(model_dir)
        steps = [sum(losses[i:i + accum]) / len(losses[i:i + accum]) for i in range(0, len(losses), accum)]
        with open(os.path.join(cfg["out"], "losses.jsonl"), "w") as f:
            for i, l in enumerate(steps):
                f.write(json.dumps({"step": i + 1, "loss": l}) + "\n")
        json.dump({"log_history": trainer.state.log_history, "trl": trl.__version__,
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "processes": trainer.accelerator.num_processes},
                  open(os.path.join(cfg["out"], "trainer_state.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
