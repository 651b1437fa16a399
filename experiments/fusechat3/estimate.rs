//! What each step of a full-scale recipe costs: tokens from the datasets' row counts and the
//! recorded mean lengths, FLOPs from the models' configs (`model::cost`), GPU-hours on the
//! reference GPU at stated utilisations, and the memory each step needs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::validate::Checked;
use super::ScaleParams;
use crate::data::Category;
use crate::model::cost::{gpus_for, ModelCost, BF16};
use crate::recipe::Estimate;

/// The reference accelerator and the utilisation assumed for each kind of work.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hardware {
    pub name: String,
    /// Dense bf16 peak.
    pub bf16_tflops: f64,
    pub memory_gb: f64,
    pub bandwidth_tb_s: f64,
    /// Model FLOPs utilisation of training, of prompt prefill / scoring, and of decoding when
    /// it is compute-bound.
    pub mfu_train: f64,
    pub mfu_prefill: f64,
    pub mfu_decode: f64,
    /// Share of peak bandwidth a memory-bound decode step achieves.
    pub bandwidth_efficiency: f64,
}

impl Default for Hardware {
    fn default() -> Self {
        Hardware {
            name: "H100 SXM 80GB".into(),
            bf16_tflops: 989.0,
            memory_gb: 80.0,
            bandwidth_tb_s: 3.35,
            mfu_train: 0.4,
            mfu_prefill: 0.5,
            mfu_decode: 0.3,
            bandwidth_efficiency: 0.7,
        }
    }
}

pub struct Costs<'a> {
    p: &'a ScaleParams,
    models: BTreeMap<String, ModelCost>,
    /// Prompts per category.
    prompts: BTreeMap<Category, f64>,
    /// Answers each benchmark asks for (items x turns).
    answers: BTreeMap<String, f64>,
}

impl<'a> Costs<'a> {
    pub fn new(p: &'a ScaleParams, checked: &Checked) -> Costs<'a> {
        let models = checked
            .configs
            .iter()
            .map(|(k, c)| (k.clone(), ModelCost::of(c)))
            .collect();
        let mut prompts: BTreeMap<Category, f64> = BTreeMap::new();
        for d in &p.datasets {
            let n = checked.rows.get(&d.name).copied().unwrap_or(d.rows);
            *prompts.entry(d.category).or_default() += n as f64;
        }
        let answers = checked
            .items
            .iter()
            .map(|(k, n)| (k.clone(), *n as f64))
            .collect();
        Costs {
            p,
            models,
            prompts,
            answers,
        }
    }

    fn len(&self, c: Category) -> (f64, f64) {
        let get = |m: &BTreeMap<Category, f64>| m.get(&c).copied().unwrap_or(0.0);
        (get(&self.p.lengths.prompt), get(&self.p.lengths.answer))
    }

    fn hours(&self, flops: f64, mfu: f64) -> f64 {
        flops / (self.p.hardware.bf16_tflops * 1e12 * mfu) / 3600.0
    }

    fn gpu_bytes(&self) -> f64 {
        self.p.hardware.memory_gb * 1e9
    }

    fn basis(&self, what: &str) -> String {
        let h = &self.p.hardware;
        format!(
            "{what}; {} at {} TFLOP/s bf16, {} TB/s, MFU train {} / prefill {} / decode {}",
            h.name, h.bf16_tflops, h.bandwidth_tb_s, h.mfu_train, h.mfu_prefill, h.mfu_decode
        )
    }

    fn estimate(
        &self,
        m: Option<&ModelCost>,
        tokens: f64,
        flops: f64,
        hours: f64,
        memory: f64,
        basis: String,
    ) -> Estimate {
        Estimate {
            parameters: m.map(|m| m.parameters).unwrap_or(0),
            tokens,
            flops,
            gpu_hours: hours,
            memory_bytes: memory,
            gpus: if memory > 0.0 {
                gpus_for(memory, self.gpu_bytes())
            } else {
                0
            },
            basis,
        }
    }

    /// Reading the datasets: CPU only.
    pub fn prompts(&self) -> Estimate {
        let tokens: f64 = self.prompts.iter().map(|(c, n)| n * self.len(*c).0).sum();
        Estimate {
            tokens,
            basis: format!(
                "{} prompts read on the CPU (METHOD.md's row counts until the files are given)",
                self.prompts.values().sum::<f64>()
            ),
            ..Default::default()
        }
    }

    /// Source `i` answering its categories' prompts: one prefill per prompt (its samples share
    /// it), then decoding, bounded by compute or by reading the weights and KV cache each step.
    pub fn sample(&self, i: usize) -> Estimate {
        let s = &self.p.sources[i];
        let Some(m) = self.models.get(&s.model.name) else {
            return Estimate::default();
        };
        let slots = self.p.sampling.slots.max(1) as f64;
        let h = &self.p.hardware;
        let (mut tokens, mut flops, mut hours, mut worst_prompt) = (0.0, 0.0, 0.0, 0.0f64);
        for (c, n) in &s.samples_per_category {
            let prompts = self.prompts.get(c).copied().unwrap_or(0.0);
            let (lp, la) = self.len(*c);
            let generated = prompts * *n as f64 * la;
            let prefill = prompts * m.forward_flops(lp);
            let decode = generated * m.forward_flops_per_token(lp + la / 2.0);
            let steps = generated / slots;
            let bytes_per_step = m.weight_bytes() + slots * (lp + la / 2.0) * m.kv_bytes_per_token;
            let memory_bound = steps * bytes_per_step
                / (h.bandwidth_tb_s * 1e12 * h.bandwidth_efficiency)
                / 3600.0;
            tokens += prompts * lp + generated;
            flops += prefill + decode;
            hours += self.hours(prefill, h.mfu_prefill)
                + self.hours(decode, h.mfu_decode).max(memory_bound);
            worst_prompt = worst_prompt.max(lp);
        }
        let kv = slots * (worst_prompt + s.sampling.max_new_tokens as f64) * m.kv_bytes_per_token;
        let memory = m.weight_bytes() + kv;
        self.estimate(
            Some(m),
            tokens,
            flops,
            hours,
            memory,
            self.basis(&format!(
                "bf16 weights + KV cache for {slots} sequences of up to {} new tokens",
                s.sampling.max_new_tokens
            )),
        )
    }

    fn samples_by_category(&self) -> BTreeMap<Category, f64> {
        let mut out: BTreeMap<Category, f64> = BTreeMap::new();
        for s in &self.p.sources {
            for (c, n) in &s.samples_per_category {
                *out.entry(*c).or_default() +=
                    self.prompts.get(c).copied().unwrap_or(0.0) * *n as f64;
            }
        }
        out
    }

    /// The reward model reads every sample once; the sandbox's code runs are CPU time.
    pub fn annotate(&self) -> Estimate {
        let Some(m) = self.models.get(&self.p.reward_model.name) else {
            return Estimate::default();
        };
        let (mut tokens, mut flops) = (0.0, 0.0);
        for (c, n) in self.samples_by_category() {
            let (lp, la) = self.len(c);
            tokens += n * (lp + la);
            flops += n * m.forward_flops(lp + la);
        }
        let memory = m.weight_bytes() + m.activation_bytes(32.0, 2048.0) / m.layers.max(1.0);
        self.estimate(
            Some(m),
            tokens,
            flops,
            self.hours(flops, self.p.hardware.mfu_prefill),
            memory,
            self.basis("one reward-model forward per sample (batch 32); code verdicts on the CPU"),
        )
    }

    pub fn construct(&self) -> Estimate {
        Estimate {
            basis: "CPU: decontamination and METHOD.md's selection rules".into(),
            ..Default::default()
        }
    }

    /// SFT rows and DPO prompts per category by the construction split (Chinese is SFT only).
    fn split(&self) -> (BTreeMap<Category, f64>, BTreeMap<Category, f64>) {
        let c = &self.p.construct;
        let (mut sft, mut dpo) = (BTreeMap::new(), BTreeMap::new());
        for (cat, n) in &self.prompts {
            let share = if *cat == Category::SecondLanguage {
                1.0
            } else {
                c.sft_fraction_by_category
                    .get(cat)
                    .copied()
                    .unwrap_or(c.sft_fraction)
            };
            sft.insert(*cat, n * share);
            dpo.insert(*cat, n * (1.0 - share));
        }
        (sft, dpo)
    }

    fn target(&self) -> Option<&ModelCost> {
        self.models.get(&self.p.target.name)
    }

    /// Tokens and FLOPs of `epochs` passes over `rows` per category, each row truncated at
    /// `max_len` and costing `flops(len)`.
    fn passes(
        &self,
        rows: BTreeMap<Category, f64>,
        epochs: usize,
        max_len: usize,
        flops: impl Fn(f64) -> f64,
    ) -> (f64, f64) {
        let (mut tokens, mut total) = (0.0, 0.0);
        for (c, n) in rows {
            let (lp, la) = self.len(c);
            let l = (lp + la).min(max_len as f64);
            tokens += n * epochs as f64 * l;
            total += n * epochs as f64 * flops(l);
        }
        (tokens, total)
    }

    pub fn sft(&self) -> Estimate {
        let Some(m) = self.target() else {
            return Estimate::default();
        };
        let t = &self.p.sft;
        let (sft, _) = self.split();
        let (tokens, flops) = self.passes(sft, t.epochs, t.max_len, |l| m.train_flops(l));
        let memory =
            m.training_state_bytes() + m.activation_bytes(t.batch_size as f64, t.max_len as f64);
        self.estimate(
            Some(m),
            tokens,
            flops,
            self.hours(flops, self.p.hardware.mfu_train),
            memory,
            self.basis(&format!(
                "{} epochs; AdamW mixed precision (16 B/param, sharded ZeRO-3) + checkpointed activations of a micro-batch of {} x {} tokens",
                t.epochs, t.batch_size, t.max_len
            )),
        )
    }

    /// Policy forward + backward on chosen and rejected, reference forward on both; pairs are
    /// an upper bound (the gap window drops some).
    pub fn dpo(&self) -> Estimate {
        let Some(m) = self.target() else {
            return Estimate::default();
        };
        let t = &self.p.dpo.train;
        let (_, dpo) = self.split();
        // Each pair is two sequences, chosen and rejected.
        let (tokens, flops) = self.passes(dpo, t.epochs, t.max_len, |l| {
            2.0 * (m.train_flops(l) + m.forward_flops(l))
        });
        let tokens = 2.0 * tokens;
        let memory = m.training_state_bytes()
            + m.parameters as f64 * BF16
            + m.activation_bytes(2.0 * t.batch_size as f64, t.max_len as f64);
        self.estimate(
            Some(m),
            tokens,
            flops,
            self.hours(flops, self.p.hardware.mfu_train),
            memory,
            self.basis("policy (16 B/param) + frozen bf16 reference; chosen and rejected in one micro-batch"),
        )
    }

    /// Greedy answers to a benchmark, one per item and turn.
    pub fn eval(&self, bench: &str) -> Estimate {
        let Some(m) = self.target() else {
            return Estimate::default();
        };
        let items = self.answers.get(bench).copied().unwrap_or(0.0);
        let (lp, gen) = (200.0, self.p.eval.max_new_tokens as f64);
        let flops = items * (m.forward_flops(lp) + gen * m.forward_flops_per_token(lp + gen / 2.0));
        let slots = self.p.eval.slots as f64;
        let memory = m.weight_bytes() + slots * (lp + gen) * m.kv_bytes_per_token;
        self.estimate(
            Some(m),
            items * (lp + gen),
            flops,
            self.hours(flops, self.p.hardware.mfu_decode),
            memory,
            self.basis(&format!(
                "{items} items, up to {gen} new tokens each; sandboxed tests on the CPU"
            )),
        )
    }
}
