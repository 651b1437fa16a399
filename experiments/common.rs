//! What the experiments' step bodies share: JSONL rows out, a checkpoint onto a device, a trained
//! model published as a step's outputs, and a benchmark answered and scored by a local checkpoint.

use std::path::Path;

use serde_json::{json, Value};

use crate::eval::answer::{answer, Answerer, Settings};
use crate::eval::bench::{Benchmark, Kind};
use crate::eval::{output, score};
use crate::model::{parse_device, Checkpoint, Decoder};
use crate::recipe::{BoxError, StepCtx};

pub type R = Result<(), BoxError>;

pub fn write_jsonl(path: &Path, rows: &[Value]) -> R {
    let mut body = String::new();
    for r in rows {
        body.push_str(&r.to_string());
        body.push('\n');
    }
    std::fs::write(path, body).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// The checkpoint at `dir` as an f32 decoder on `device`.
pub fn decoder(dir: &Path, device: &str) -> Result<Decoder, BoxError> {
    let ck = Checkpoint::open(dir)?;
    Ok(ck.decoder(&parse_device(device)?, candle_core::DType::F32)?)
}

/// Copy a trained model (a checkpoint directory) into the step's outputs, and its training curve
/// without timings, so the outputs are a function of the inputs alone.
pub fn publish(ctx: &StepCtx, model: &Path, metrics: &Path) -> R {
    for e in std::fs::read_dir(model)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), ctx.out(&e.file_name().to_string_lossy())?)?;
        }
    }
    let mut lines = Vec::new();
    for l in std::fs::read_to_string(metrics)?.lines() {
        let mut v: Value = serde_json::from_str(l)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("tokens_per_s");
        }
        lines.push(v.to_string());
    }
    std::fs::write(ctx.out("metrics.jsonl")?, lines.join("\n") + "\n")?;
    Ok(())
}

/// Train on TRL (`train::external`) instead of in process: the same rows, hyperparameters and
/// initial checkpoint, through `accelerate launch`; its checkpoint and exact per-step losses become
/// the step's outputs (`metrics.jsonl` as our trainer writes it), with `engine.json` (versions) and
/// the launch files beside them for audit.
pub fn trl_train(ctx: &mut StepCtx, job: &crate::train::external::TrlJob) -> R {
    use crate::train::external::{accelerate_path, run_trl};
    let dir = ctx.work_dir()?.join("trl");
    let o = run_trl(job, &dir, &accelerate_path())?;
    let history: Vec<&Value> = o.state["log_history"]
        .as_array()
        .map(|h| h.iter().filter(|e| e.get("loss").is_some()).collect())
        .unwrap_or_default();
    let mut lines = Vec::new();
    for (i, loss) in o.losses.iter().enumerate() {
        let logged = history.get(i);
        lines.push(
            serde_json::json!({"step": i + 1, "loss": loss,
                   "learning_rate": logged.and_then(|e| e.get("learning_rate")),
                   "grad_norm": logged.and_then(|e| e.get("grad_norm"))})
            .to_string(),
        );
    }
    let metrics = dir.join("metrics.jsonl");
    std::fs::write(&metrics, lines.join("\n") + "\n")?;
    ctx.metric("first_loss", *o.losses.first().ok_or("TRL ran no step")?);
    ctx.metric("final_loss", *o.losses.last().expect("not empty"));
    ctx.metric("steps", o.losses.len() as f64);
    // TRL's pickled training_args.bin is not a checkpoint file and not reproducible; leave it out.
    let _ = std::fs::remove_file(o.model.join("training_args.bin"));
    let engine = serde_json::json!({"engine": "trl", "kind": job.kind,
        "versions": {"trl": o.state["trl"], "transformers": o.state["transformers"], "torch": o.state["torch"]},
        "processes": o.state["processes"]});
    std::fs::write(ctx.out("engine.json")?, serde_json::to_vec_pretty(&engine)?)?;
    std::fs::create_dir_all(ctx.out("launch")?)?;
    for f in ["config.json", "accelerate.yaml", "train.py"] {
        std::fs::copy(dir.join(f), ctx.out("launch")?.join(f))?;
    }
    if dir.join("zero3.json").is_file() {
        std::fs::copy(
            dir.join("zero3.json"),
            ctx.out("launch")?.join("zero3.json"),
        )?;
    }
    publish(ctx, &o.model, &metrics)
}

/// How one eval step answers: who, as what, with how many sequences at once.
pub struct EvalSpec<'a> {
    pub label: &'a str,
    pub role: &'a str,
    pub category: &'a str,
    pub device: &'a str,
    pub slots: usize,
    /// Sandbox options for code benchmarks.
    pub code: Option<crate::annotate::CodeOptions>,
    /// The paper's score of this model role on this benchmark (full-scale recipes).
    pub paper: Option<f64>,
}

/// The checkpoint at `dir` answers `bench` greedily (resumable in the step's work dir); the answers
/// are scored and written into the step's outputs as an eval result the report reads.
pub fn evaluate_checkpoint(ctx: &mut StepCtx, bench: &Benchmark, dir: &Path, s: &EvalSpec) -> R {
    let ck = Checkpoint::open(dir)?;
    let model = decoder(dir, s.device)?;
    let m = crate::sample::job::Model {
        decoder: &model,
        tokenizer: ck.tokenizer()?,
        template: ck.template()?,
        identity: crate::train::model_identity(dir)?,
    };
    let settings = Settings {
        name: s.label.to_string(),
        samples: 1,
        temperature: 0.0,
        max_new_tokens: bench.generation.max_new_tokens,
        seed: ctx.seed(),
        slots: s.slots,
        stop_token_ids: ck.stop_token_ids(),
    };
    let work = ctx.work_dir()?.to_path_buf();
    let (answers, stats) = answer(
        bench,
        &Answerer::Local(m),
        &settings,
        &work,
        &work.join("cache"),
        &|_, _, _, _| {},
    )?;
    let verdicts = match (&bench.kind, &s.code) {
        (Kind::Code, Some(opts)) => score::score_code(bench, &answers, opts, &|_| {})?,
        (Kind::Code, None) => return Err("a code benchmark needs sandbox options".into()),
        _ => score::score_text(bench, &answers)?,
    };
    let result = score::summarise(bench, s.label, &answers, verdicts, None, &[], ctx.seed());
    ctx.metric("score", result.score.value);
    ctx.metric("generated_tokens", stats.generated_tokens as f64);
    output::write(
        ctx.out_dir(),
        bench,
        &result,
        &answers,
        Some(s.role),
        Some(s.category),
        match s.paper {
            Some(v) => json!({"settings": settings, "paper": v}),
            None => json!({"settings": settings}),
        },
    )?;
    Ok(())
}
