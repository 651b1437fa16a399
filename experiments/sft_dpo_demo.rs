//! `sft-dpo-demo`: the two FuseChat training stages as cached recipe steps on a tiny model — SFT on
//! chosen answers, then DPO on (chosen, rejected) pairs with the SFT model as reference — and an
//! evaluation of all three checkpoints. It shows the trainers running inside experiments (checkpoints
//! in the step's work dir, so a killed run resumes) until `fusechat-tiny` exists.
//!
//! ```text
//! base (source) --\
//! data ------------+-> sft -> dpo -> eval (base, sft, dpo)
//!                                 \-> bench-base, bench-sft, bench-dpo (held-out counting prompts,
//!                                     greedy answers scored by the eval module) -> the report
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::experiments::common::{
    decoder, evaluate_checkpoint, publish, trl_train, write_jsonl, EvalSpec,
};
use crate::generate::Rng;
use crate::model::{parse_device, Checkpoint};
use crate::recipe::{step, BoxError, Experiment, ExperimentDef, Result, StepCtx};
use crate::train::external::{Launch, TrlJob};
use crate::train::{
    evaluate, train, DpoLoss, DpoObjective, Hooks, RunPaths, SftObjective, TrainConfig,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoParams {
    /// A Hugging Face checkpoint directory (project-relative).
    pub base_model: String,
    pub device: String,
    pub data: DataParams,
    pub sft: TrainConfig,
    pub dpo: DpoParams,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataParams {
    pub n_train: u32,
    pub n_eval: u32,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DpoParams {
    pub beta: f64,
    pub loss: DpoLoss,
    pub train: TrainConfig,
    /// `candle` (our trainer, in process) or `trl` (TRL's DPOTrainer through `accelerate launch`;
    /// the launcher from FUSELAB_ACCELERATE or PATH).
    pub engine: String,
    /// How the TRL engine launches (processes, ZeRO-3, CPU, bf16).
    pub launch: Launch,
}

impl Default for DemoParams {
    fn default() -> Self {
        let quick = TrainConfig {
            lr: 2e-3,
            epochs: 4,
            batch_size: 4,
            grad_accum: 2,
            max_len: 64,
            warmup_ratio: 0.1,
            max_grad_norm: 1.0,
            adamw: Default::default(),
            seed: 3,
            save_steps: 4,
            keep_last: 1,
            compute_dtype: "f32".into(),
        };
        DemoParams {
            base_model: "tests/fixtures/hf/llama".into(),
            device: "cpu".into(),
            data: DataParams {
                n_train: 16,
                n_eval: 5,
                seed: 7,
            },
            sft: quick.clone(),
            dpo: DpoParams {
                beta: 0.1,
                loss: DpoLoss::Sigmoid {
                    label_smoothing: 0.0,
                },
                train: TrainConfig { lr: 1e-3, ..quick },
                engine: "candle".into(),
                launch: Launch::default(),
            },
        }
    }
}

pub fn define() -> ExperimentDef {
    ExperimentDef::new(
        "sft-dpo-demo",
        "SFT then DPO on a tiny model as cached steps, with an evaluation of base, SFT and DPO",
        build,
    )
}

/// A counting task: the chosen answer counts up, the rejected one counts down.
fn rows(p: &DataParams, eval: bool) -> (Vec<Value>, Vec<Value>) {
    let mut rng = Rng::new(p.seed, eval as u64);
    let n = if eval { p.n_eval } else { p.n_train };
    let (mut sft, mut pairs) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let k = 1 + rng.next_u64() % 5;
        let up: Vec<String> = (k..k + 4).map(|x| x.to_string()).collect();
        let down: Vec<String> = up.iter().rev().cloned().collect();
        let prompt = json!([{"role": "user", "content": format!("Count from {k}.")}]);
        sft.push(json!({"messages": [prompt[0], {"role": "assistant", "content": up.join(" ")}]}));
        pairs.push(json!({"prompt": prompt,
                          "chosen": [{"role": "assistant", "content": up.join(" ")}],
                          "rejected": [{"role": "assistant", "content": down.join(" ")}]}));
    }
    (sft, pairs)
}

fn build(exp: &mut Experiment, p: &DemoParams) -> Result<()> {
    let base = exp.source("base", &p.base_model)?;
    let data = exp.step("data", &p.data, &[], |ctx| {
        let d: DataParams = ctx.params()?;
        for (eval, prefix) in [(false, "train"), (true, "eval")] {
            let (sft, pairs) = rows(&d, eval);
            write_jsonl(&ctx.out(&format!("{prefix}_sft.jsonl"))?, &sft)?;
            write_jsonl(&ctx.out(&format!("{prefix}_pairs.jsonl"))?, &pairs)?;
        }
        Ok(())
    })?;

    let sft_params = json!({"train": p.sft, "device": p.device});
    let sft = exp.step(
        step("sft").nondeterministic(1e-4),
        &sft_params,
        &[base, data],
        |ctx| {
            let cfg: TrainConfig = serde_json::from_value(ctx.params::<Value>()?["train"].clone())?;
            let device: String = serde_json::from_value(ctx.params::<Value>()?["device"].clone())?;
            let (base, data) = (
                ctx.input("base")?.to_path_buf(),
                ctx.input("data")?.to_path_buf(),
            );
            let ck = Checkpoint::open(&base)?;
            let (t, k) = (ck.template()?, ck.tokenizer()?);
            let obj = SftObjective::load(
                &data.join("train_sft.jsonl"),
                t,
                k,
                cfg.max_len,
                &Value::Null,
            )?;
            let eval = SftObjective::load(
                &data.join("eval_sft.jsonl"),
                t,
                k,
                cfg.max_len,
                &Value::Null,
            )?;
            let work = ctx.work_dir()?.to_path_buf();
            let hooks = Hooks {
                quiet: true,
                ..Default::default()
            };
            let s = train(
                &base,
                &obj,
                Some(&eval),
                &cfg,
                &RunPaths { out: work.clone() },
                &parse_device(&device)?,
                &hooks,
            )?;
            ctx.metric("final_loss", s.final_loss);
            ctx.metric("steps", s.steps as f64);
            publish(ctx, &work.join("model"), &work.join("metrics.jsonl"))
        },
    )?;

    let dpo_params = json!({"dpo": p.dpo, "device": p.device});
    let dpo = exp.step(
        step("dpo").nondeterministic(1e-4),
        &dpo_params,
        &[sft, data],
        |ctx| {
            let prm: DpoParams = serde_json::from_value(ctx.params::<Value>()?["dpo"].clone())?;
            let device: String = serde_json::from_value(ctx.params::<Value>()?["device"].clone())?;
            let (policy, data) = (
                ctx.input("sft")?.to_path_buf(),
                ctx.input("data")?.to_path_buf(),
            );
            match prm.engine.as_str() {
                "candle" => {}
                "trl" => {
                    return trl_train(
                        ctx,
                        &TrlJob {
                            kind: "dpo",
                            model: &policy,
                            train: &data.join("train_pairs.jsonl"),
                            config: &prm.train,
                            dpo: Some((prm.beta, &prm.loss)),
                            launch: &prm.launch,
                        },
                    )
                }
                other => return Err(format!("dpo.engine `{other}`: expected candle or trl").into()),
            }
            let ck = Checkpoint::open(&policy)?;
            let (t, k) = (ck.template()?, ck.tokenizer()?);
            let reference = decoder(&policy, &device)?;
            let load = |f: &str| -> Result<DpoObjective, BoxError> {
                let mut o = DpoObjective::load(
                    &data.join(f),
                    t,
                    k,
                    prm.train.max_len,
                    &Value::Null,
                    prm.beta,
                    prm.loss.clone(),
                )?;
                o.compute_reference(&reference)?;
                Ok(o)
            };
            let (obj, eval) = (load("train_pairs.jsonl")?, load("eval_pairs.jsonl")?);
            let work = ctx.work_dir()?.to_path_buf();
            let hooks = Hooks {
                quiet: true,
                ..Default::default()
            };
            let s = train(
                &policy,
                &obj,
                Some(&eval),
                &prm.train,
                &RunPaths { out: work.clone() },
                &parse_device(&device)?,
                &hooks,
            )?;
            ctx.metric("final_loss", s.final_loss);
            ctx.metric("first_loss", first_loss(&work.join("metrics.jsonl"))?);
            publish(ctx, &work.join("model"), &work.join("metrics.jsonl"))
        },
    )?;

    exp.step(
        step("eval").nondeterministic(1e-4),
        &json!({"device": p.device, "beta": p.dpo.beta}),
        &[base, sft, dpo, data],
        |ctx| {
            let device: String = serde_json::from_value(ctx.params::<Value>()?["device"].clone())?;
            let beta = ctx.params::<Value>()?["beta"].as_f64().unwrap_or(0.1);
            let data = ctx.input("data")?.to_path_buf();
            let sft_dir = ctx.input("sft")?.to_path_buf();
            let ck = Checkpoint::open(&sft_dir)?;
            let (t, k) = (ck.template()?, ck.tokenizer()?);
            let nll = SftObjective::load(&data.join("eval_sft.jsonl"), t, k, 64, &Value::Null)?;
            let mut pairs = DpoObjective::load(
                &data.join("eval_pairs.jsonl"),
                t,
                k,
                64,
                &Value::Null,
                beta,
                DpoLoss::Sigmoid {
                    label_smoothing: 0.0,
                },
            )?;
            // Rewards are measured against the SFT model, the reference DPO trained from.
            pairs.compute_reference(&decoder(&sft_dir, &device)?)?;
            let mut report = serde_json::Map::new();
            for name in ["base", "sft", "dpo"] {
                let model = decoder(ctx.input(name)?, &device)?;
                let (loss, _) = evaluate(&model, &Default::default(), &nll)?;
                let (_, m) = evaluate(&model, &Default::default(), &pairs)?;
                let acc = m.get("rewards/accuracies").copied().unwrap_or(0.0);
                let margin = m.get("rewards/margins").copied().unwrap_or(0.0);
                ctx.metric(&format!("{name}/eval_nll"), loss);
                ctx.metric(&format!("{name}/reward_accuracy"), acc);
                report.insert(
                    name.into(),
                    json!({"eval_nll": loss, "reward_accuracy": acc, "reward_margin": margin}),
                );
            }
            std::fs::write(ctx.out("eval.json")?, serde_json::to_vec_pretty(&report)?)?;
            Ok(())
        },
    )?;
    for (name, model, role) in [
        ("base", base, "base"),
        ("sft", sft, "sft"),
        ("dpo", dpo, "fused"),
    ] {
        exp.step(
            step(&format!("bench-{name}")).kind("sft-dpo-demo/bench"),
            &json!({"device": p.device, "role": role, "model": name, "max_new_tokens": 12}),
            &[model, data],
            move |ctx| bench_step(ctx, name),
        )?;
    }
    Ok(())
}

/// The held-out counting prompts as an exact-answer benchmark (the gold answer is the last number
/// of the count), answered greedily by one model and scored by the eval module.
/// The loss of the first optimizer step, from a metrics.jsonl.
fn first_loss(metrics: &std::path::Path) -> Result<f64, BoxError> {
    let text = std::fs::read_to_string(metrics)?;
    let first = text.lines().next().ok_or("empty metrics.jsonl")?;
    let v: Value = serde_json::from_str(first)?;
    v["loss"]
        .as_f64()
        .ok_or_else(|| "no loss in metrics.jsonl".into())
}

fn bench_step(ctx: &mut StepCtx, input: &str) -> Result<(), BoxError> {
    use crate::eval::bench::{Benchmark, Generation, Item, Kind};

    let prm: Value = ctx.params()?;
    let device = prm["device"].as_str().unwrap_or("cpu").to_string();
    let role = prm["role"].as_str().unwrap_or("other").to_string();
    let max_new_tokens = prm["max_new_tokens"].as_u64().unwrap_or(12) as usize;
    let data = ctx.input("data")?.to_path_buf();
    let mut items = Vec::new();
    for (i, line) in std::fs::read_to_string(data.join("eval_sft.jsonl"))?
        .lines()
        .enumerate()
    {
        let v: Value = serde_json::from_str(line)?;
        let q = v["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let a = v["messages"][1]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        items.push(Item {
            gold: a.split_whitespace().last().map(str::to_string),
            ..Item::new(format!("count-{i}"), "counting", q)
        });
    }
    let bench = Benchmark {
        name: "counting".into(),
        kind: Kind::Exact,
        generation: Generation {
            max_new_tokens,
            temperature: 0.0,
        },
        source: "data/eval_sft.jsonl".into(),
        source_digest: String::new(),
        items,
        baseline_name: None,
    };
    let dir = ctx.input(input)?.to_path_buf();
    let spec = EvalSpec {
        label: input,
        role: &role,
        category: "counting",
        device: &device,
        slots: 8,
        code: None,
        paper: None,
    };
    evaluate_checkpoint(ctx, &bench, &dir, &spec)
}
