//! `train sft`, `train rm` and `train dpo`.

use std::path::Path;

use anyhow::Context;
use candle_core::DType;
use fuselab::model::{load_weights, parse_device, Checkpoint, Decoder};
use fuselab::train::{
    self, optim::AdamWConfig, DpoLoss, DpoObjective, Hooks, Objective, RunPaths, SftObjective,
    TrainConfig,
};
use serde_json::Value;

use super::{print_json, template_vars, Status};
use crate::cli::{AlphaSchedule, DpoLossArg, TrainArgs, TrainCommand};

fn config(a: &TrainArgs, default_lr: f64, context: usize) -> TrainConfig {
    TrainConfig {
        lr: a.lr.unwrap_or(default_lr),
        epochs: a.epochs,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_len: a.max_len.unwrap_or(2048.min(context)),
        warmup_ratio: a.warmup_ratio,
        max_grad_norm: a.max_grad_norm,
        adamw: AdamWConfig {
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        seed: a.seed,
        save_steps: a.save_steps,
        keep_last: a.keep_last,
        compute_dtype: a.compute_dtype.clone(),
    }
}

fn report(a: &TrainArgs, s: &train::TrainSummary) {
    if a.json {
        print_json(s);
    } else {
        for (dir, why) in &s.skipped_checkpoints {
            eprintln!("warning: {} is damaged ({why}); passed over", dir.display());
        }
        if let Some(r) = s.resumed_from {
            eprintln!("resumed from checkpoint-{r}");
        }
        eprintln!(
            "{} steps, final loss {:.4}, {} rows skipped; model in {}",
            s.steps,
            s.final_loss,
            s.skipped_rows,
            s.model.display()
        );
    }
}

/// Reference log-probs are computed once per (reference, data) and kept in the output directory, so
/// a resumed run does not recompute them.
fn reference_logps(
    obj: &mut DpoObjective,
    reference: &Path,
    out: &Path,
    device: &candle_core::Device,
) -> anyhow::Result<()> {
    let mut h = blake3::Hasher::new();
    for p in obj.pairs() {
        h.update(format!("{:?}", p).as_bytes());
    }
    // The reference's content, not its path: a path can be overwritten with other weights.
    h.update(train::model_identity(reference)?.as_bytes());
    let tag = h.finalize().to_hex().to_string();
    let cache = out.join("reference_logps.json");
    if let Ok(text) = std::fs::read_to_string(&cache) {
        // A torn or foreign cache is recomputed, never fatal.
        let cached = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
            (v["tag"] == tag.as_str())
                .then(|| serde_json::from_value(v["logps"].clone()).ok())
                .flatten()
        });
        if let Some(logps) = cached {
            if obj.set_reference(logps).is_ok() {
                return Ok(());
            }
        }
    }
    let ck = Checkpoint::open(reference)?;
    let w = load_weights(&ck.dir, &ck.config, device, DType::F32)?;
    obj.compute_reference(&Decoder::new(ck.config.clone(), w)?)?;
    let body = serde_json::json!({"tag": tag, "reference": reference, "logps": obj.reference()});
    fuselab::fs::write_durable(&cache, &serde_json::to_vec(&body)?)
        .with_context(|| format!("writing {}", cache.display()))?;
    Ok(())
}

/// Train, print the summary. `default_lr` applies when `--lr` is not given.
fn run(
    start: &Path,
    obj: &dyn Objective,
    eval: Option<&dyn Objective>,
    args: &TrainArgs,
    cfg: &TrainConfig,
    device: &candle_core::Device,
) -> anyhow::Result<()> {
    let paths = RunPaths {
        out: args.out.clone(),
    };
    let s = train::train(start, obj, eval, cfg, &paths, device, &Hooks::default())?;
    report(args, &s);
    Ok(())
}

pub fn train(cmd: &TrainCommand) -> Status {
    match cmd {
        TrainCommand::Sft {
            model,
            packing,
            args,
        } => {
            let ck = Checkpoint::open(model)?;
            // Settings are checked before any row is read or tokenised.
            let cfg = config(args, 5e-6, ck.config.max_position_embeddings);
            cfg.validate(Some(ck.config.max_position_embeddings))?;
            let max_len = cfg.max_len;
            let device = parse_device(&args.device)?;
            let extra = template_vars(&args.vars)?;
            let (t, k) = (ck.template()?, ck.tokenizer()?);
            let mut obj = SftObjective::load(&args.data, t, k, max_len, &extra)?;
            if *packing {
                let n = obj.len();
                let rows = obj.pack(max_len);
                eprintln!(
                    "packed {n} conversations into {rows} rows of up to {} tokens",
                    max_len
                );
            }
            let eval = match &args.eval_data {
                Some(p) => Some(SftObjective::load(p, t, k, max_len, &extra)?),
                None => None,
            };
            if obj.skipped() > 0 {
                eprintln!(
                    "{}: skipped {} rows with no assistant token within --max-len",
                    args.data.display(),
                    obj.skipped()
                );
            }
            run(
                model,
                &obj,
                eval.as_ref().map(|e| e as &dyn Objective),
                args,
                &cfg,
                &device,
            )?;
        }
        TrainCommand::Rm {
            model,
            center_rewards,
            args,
        } => {
            let ck = Checkpoint::open(model)?;
            let cfg = config(args, 1e-5, ck.config.max_position_embeddings);
            cfg.validate(Some(ck.config.max_position_embeddings))?;
            let device = parse_device(&args.device)?;
            let (t, k) = (ck.template()?, ck.tokenizer()?);
            // TRL pads with the tokenizer's pad token (else its eos); the model reads at the last
            // token that is not the config's pad id. Both come from the checkpoint.
            let pad = ck.pad_token_id();
            let load = |p: &Path| {
                fuselab::reward::RewardObjective::load(p, t, k, cfg.max_len, pad, *center_rewards)
            };
            let obj = load(&args.data)?;
            if obj.skipped() > 0 {
                eprintln!(
                    "{}: skipped {} pairs longer than --max-len",
                    args.data.display(),
                    obj.skipped()
                );
            }
            let eval = match &args.eval_data {
                Some(p) => Some(load(p)?),
                None => None,
            };
            run(
                model,
                &obj,
                eval.as_ref().map(|e| e as &dyn Objective),
                args,
                &cfg,
                &device,
            )?;
        }
        TrainCommand::Dpo {
            policy,
            reference,
            loss,
            beta,
            label_smoothing,
            alpha,
            alpha_schedule,
            args,
        } => {
            let ck = Checkpoint::open(policy)?;
            let cfg = config(args, 1e-6, ck.config.max_position_embeddings);
            cfg.validate(Some(ck.config.max_position_embeddings))?;
            let max_len = cfg.max_len;
            let device = parse_device(&args.device)?;
            let extra = template_vars(&args.vars)?;
            let (t, k) = (ck.template()?, ck.tokenizer()?);
            let l = match loss {
                DpoLossArg::Sigmoid => DpoLoss::Sigmoid {
                    label_smoothing: *label_smoothing,
                },
                DpoLossArg::LnDpo => DpoLoss::LnDpo,
                DpoLossArg::Wrpo => DpoLoss::Wrpo {
                    alpha: *alpha,
                    dynamic: *alpha_schedule == AlphaSchedule::Linear,
                    label_smoothing: *label_smoothing,
                },
            };
            train::objective::validate_dpo(*beta, &l)?;
            let reference = reference.clone().unwrap_or_else(|| policy.clone());
            let mut obj = DpoObjective::load(&args.data, t, k, max_len, &extra, *beta, l.clone())?;
            if obj.skipped() > 0 {
                eprintln!(
                    "{}: skipped {} rows whose prompt fills --max-len",
                    args.data.display(),
                    obj.skipped()
                );
            }
            reference_logps(&mut obj, &reference, &args.out, &device)?;
            let eval = match &args.eval_data {
                Some(p) => {
                    let mut e = DpoObjective::load(p, t, k, max_len, &extra, *beta, l)?;
                    reference_logps(&mut e, &reference, &args.out.join("eval"), &device)?;
                    Some(e)
                }
                None => None,
            };
            run(
                policy,
                &obj,
                eval.as_ref().map(|e| e as &dyn Objective),
                args,
                &cfg,
                &device,
            )?;
        }
    }
    Ok(0)
}
