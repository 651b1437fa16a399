//! The two training stages of FuseChat-3.0: SFT on the best answers, then the DPO family (sigmoid DPO,
//! length-normalised DPO, WRPO) on preference pairs; with AdamW state we own, cosine schedule,
//! gradient accumulation and clipping, checkpoints, and resume that continues bit-identically.

pub mod data;
pub mod external;
pub mod objective;
pub mod optim;

pub use objective::{DpoLoss, DpoObjective, Objective, SftObjective};

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::generate::Rng;
use crate::model::{load_weights, save_checkpoint, CandleContext, Checkpoint, Decoder, ModelError};
use optim::{accumulate, clip_grad_norm, cosine_lr, AdamW, AdamWConfig};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "non-finite loss ({loss}) at step {step} (rows at lines {lines:?}); no update was applied"
    )]
    NonFinite {
        step: usize,
        loss: f64,
        lines: Vec<usize>,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub lr: f64,
    pub epochs: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (global batch = batch_size * grad_accum).
    pub grad_accum: usize,
    /// Sequences longer than this are truncated at the end (SFT) or dropped and counted (DPO
    /// prompts that leave no room for an answer).
    pub max_len: usize,
    pub warmup_ratio: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub adamw: AdamWConfig,
    pub seed: u64,
    /// Checkpoint every this many optimizer steps (0: only the final model).
    pub save_steps: usize,
    /// Checkpoints kept (the best by held-out loss is kept in addition).
    pub keep_last: usize,
    /// Forward/backward dtype: f32, bf16 or f16. Master weights and optimizer state stay f32.
    #[serde(default = "default_compute")]
    pub compute_dtype: String,
}

fn default_compute() -> String {
    "f32".into()
}

impl TrainConfig {
    /// Reject settings that would train nonsense silently; each error names the flag.
    pub fn validate(&self, context_len: Option<usize>) -> Result<(), TrainError> {
        let bad = |flag: &str, why: String| Err(TrainError::Invalid(format!("--{flag}: {why}")));
        if !self.lr.is_finite() || self.lr < 0.0 {
            return bad(
                "lr",
                format!("{} is not a finite, non-negative learning rate", self.lr),
            );
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup-ratio",
                format!("{} is outside [0, 1]", self.warmup_ratio),
            );
        }
        if !self.max_grad_norm.is_finite() || self.max_grad_norm < 0.0 {
            return bad(
                "max-grad-norm",
                format!(
                    "{} must be finite and >= 0 (0 disables clipping)",
                    self.max_grad_norm
                ),
            );
        }
        if !self.adamw.weight_decay.is_finite() || self.adamw.weight_decay < 0.0 {
            return bad(
                "weight-decay",
                format!("{} must be finite and >= 0", self.adamw.weight_decay),
            );
        }
        for (flag, v) in [
            ("batch-size", self.batch_size),
            ("grad-accum", self.grad_accum),
            ("epochs", self.epochs),
            ("max-len", self.max_len),
        ] {
            if v == 0 {
                return bad(flag, "must be at least 1".into());
            }
        }
        if let Some(ctx) = context_len {
            if self.max_len > ctx {
                return bad(
                    "max-len",
                    format!("{} exceeds the model's context length {ctx}", self.max_len),
                );
            }
        }
        crate::model::parse_dtype(&self.compute_dtype)
            .map_err(|e| TrainError::Invalid(format!("--compute-dtype: {e}")))?;
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 5e-6,
            epochs: 3,
            batch_size: 8,
            grad_accum: 16,
            max_len: 2048,
            warmup_ratio: 0.1,
            max_grad_norm: 1.0,
            adamw: AdamWConfig::default(),
            seed: 42,
            save_steps: 100,
            keep_last: 2,
            compute_dtype: default_compute(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    total_steps: usize,
    best: Option<(usize, f64)>,
    config: TrainConfig,
    /// The objective's fingerprint (absent in checkpoints written before it was recorded).
    #[serde(default)]
    data: Option<String>,
    /// blake3 over the starting model's files (config, weights, tokenizer): resuming a run with
    /// `--model` pointing at another checkpoint is refused.
    #[serde(default)]
    base_model: Option<String>,
}

/// `checkpoint-N/checkpoint.json`: the digest of every file of the checkpoint, written last, so a
/// checkpoint whose files were damaged or edited after it was made is recognised and skipped.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointManifest {
    step: usize,
    files: BTreeMap<String, String>,
}

const MANIFEST: &str = "checkpoint.json";

/// blake3 of each regular file under `dir`, by '/'-separated relative path (the manifest itself
/// excluded).
fn digest_files(dir: &Path) -> Result<BTreeMap<String, String>, TrainError> {
    Ok(crate::store::Store::file_digests(dir)?
        .into_iter()
        .filter(|e| e.path != MANIFEST)
        .map(|e| (e.path, e.digest.to_string()))
        .collect())
}

/// The identity of a starting model: blake3 over its config, weights and tokenizer files.
pub fn model_identity(dir: &Path) -> Result<String, TrainError> {
    let files = digest_files(dir)?;
    let mut h = blake3::Hasher::new();
    for (rel, d) in files.iter().filter(|(rel, _)| {
        rel.ends_with(".safetensors")
            || rel.as_str() == "config.json"
            || rel.as_str() == "tokenizer.json"
    }) {
        h.update(rel.as_bytes());
        h.update(d.as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Why checkpoint `dir` (named for `step`) cannot be trusted, if it cannot: a missing or unreadable
/// manifest, a file that differs from its recorded digest, a file missing or added, or a state whose
/// step is not the one in its name.
fn checkpoint_damage(dir: &Path, step: usize) -> Option<String> {
    let text = match std::fs::read_to_string(dir.join(MANIFEST)) {
        Ok(t) => t,
        Err(e) => return Some(format!("{MANIFEST}: {e}")),
    };
    let m: CheckpointManifest = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => return Some(format!("{MANIFEST}: {e}")),
    };
    if m.step != step {
        return Some(format!(
            "{MANIFEST} names step {}, the directory step {step}",
            m.step
        ));
    }
    let now = match digest_files(dir) {
        Ok(f) => f,
        Err(e) => return Some(e.to_string()),
    };
    for (rel, d) in &m.files {
        match now.get(rel) {
            None => return Some(format!("`{rel}` is missing")),
            Some(x) if x != d => {
                return Some(format!("`{rel}` does not match its recorded digest"))
            }
            _ => {}
        }
    }
    if let Some(extra) = now.keys().find(|k| !m.files.contains_key(*k)) {
        return Some(format!("`{extra}` is not part of the checkpoint"));
    }
    None
}

/// Settings that may change between a crash and its resume: they decide what is written, not what
/// is computed.
const RESUMABLE_CHANGES: [&str; 2] = ["save_steps", "keep_last"];

/// Why a checkpoint cannot be continued by this invocation, if it cannot.
fn resume_mismatch(st: &TrainerState, cfg: &TrainConfig, data: &str) -> Option<String> {
    let (a, b) = (
        serde_json::to_value(&st.config).unwrap_or_default(),
        serde_json::to_value(cfg).unwrap_or_default(),
    );
    let keys: std::collections::BTreeSet<&String> = a
        .as_object()
        .into_iter()
        .chain(b.as_object())
        .flat_map(|o| o.keys())
        .collect();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| !RESUMABLE_CHANGES.contains(&k.as_str()) && a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k} {} -> {}",
                a.get(k).unwrap_or(&Value::Null),
                b.get(k).unwrap_or(&Value::Null)
            )
        })
        .collect();
    if !changed.is_empty() {
        return Some(format!("settings changed: {}", changed.join(", ")));
    }
    match &st.data {
        Some(d) if d != data => Some(
            "the training examples differ (data file, tokenisation, --max-len, packing or loss settings)"
                .into(),
        ),
        _ => None,
    }
}

/// Where a run writes: checkpoints, metrics.jsonl, and the final model.
pub struct RunPaths {
    pub out: PathBuf,
}

impl RunPaths {
    pub fn metrics(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }
    pub fn model(&self) -> PathBuf {
        self.out.join("model")
    }
    fn checkpoint(&self, step: usize) -> PathBuf {
        self.out.join(format!("checkpoint-{step}"))
    }
    fn checkpoints(&self) -> Vec<(usize, PathBuf)> {
        let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(&self.out)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
                e.path()
                    .join("trainer_state.json")
                    .is_file()
                    .then(|| (step, e.path()))
            })
            .collect();
        v.sort();
        v
    }
}

/// What a finished (or resumed-and-finished) run reports.
#[derive(Debug, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub resumed_from: Option<usize>,
    /// Checkpoints that were found damaged and passed over on resume, with the reason.
    pub skipped_checkpoints: Vec<(PathBuf, String)>,
    pub final_loss: f64,
    pub skipped_rows: usize,
    pub best_checkpoint: Option<usize>,
    pub model: PathBuf,
}

/// Example order of one epoch: a seeded Fisher-Yates shuffle, a function of (seed, epoch) only, so a
/// resumed run sees exactly the batches the uninterrupted one would have.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = Rng::new(seed, 0x5EED_0000 + epoch as u64);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Hooks for tests: stop (as a crash would) right after an optimizer step.
#[derive(Default, Clone)]
pub struct Hooks {
    pub crash_after_step: Option<usize>,
    pub quiet: bool,
}

/// Train `policy` (a checkpoint directory) on `objective`, writing into `paths.out`. If checkpoints
/// exist there, training resumes from the newest one.
pub fn train(
    policy: &Path,
    objective: &dyn Objective,
    eval: Option<&dyn Objective>,
    cfg: &TrainConfig,
    paths: &RunPaths,
    device: &Device,
    hooks: &Hooks,
) -> Result<TrainSummary, TrainError> {
    let ck = Checkpoint::open(policy)?;
    cfg.validate(Some(ck.config.max_position_embeddings))?;
    let n = objective.len();
    if n == 0 {
        return Err(TrainError::Invalid("no training examples".into()));
    }
    crate::fs::create_dir_all_durable(&paths.out).map_err(io(&paths.out))?;
    // One trainer per output directory: two would interleave checkpoints and metrics.
    let lock_path = paths.out.join(".train.lock");
    let mut _out_lock = match crate::fs::FileLock::try_lock(&lock_path, true) {
        Ok(Some(l)) => l,
        Ok(None) => {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            return Err(TrainError::Invalid(format!(
                "{}: another training process is writing to this directory ({}); use another --out",
                paths.out.display(),
                holder.trim()
            )));
        }
        Err(e) => return Err(io(&lock_path)(e)),
    };
    let _ = _out_lock.write_holder(&format!(
        "pid {} on {}",
        std::process::id(),
        crate::fs::hostname()
    ));
    let window = cfg.batch_size * cfg.grad_accum;
    let steps_per_epoch = n.div_ceil(window);
    let total = steps_per_epoch * cfg.epochs;

    let fingerprint = objective.fingerprint();
    let base_model = model_identity(&ck.dir)?;
    // The newest checkpoint that verifies; damaged ones are reported and passed over.
    let mut skipped_checkpoints = Vec::new();
    let mut resume = None;
    for (step, dir) in paths.checkpoints().into_iter().rev() {
        match checkpoint_damage(&dir, step) {
            None => {
                resume = Some((step, dir));
                break;
            }
            Some(why) => skipped_checkpoints.push((dir, why)),
        }
    }
    let (weights_dir, mut opt, mut state, resumed_from) = match &resume {
        Some((step, dir)) => {
            let st: TrainerState = read_json(&dir.join("trainer_state.json"))?;
            if st.base_model.as_ref().is_some_and(|b| b != &base_model) {
                return Err(TrainError::Invalid(format!(
                    "{}: cannot resume this checkpoint: it continues training another starting model than {}; use another --out or the original --model",
                    dir.display(),
                    ck.dir.display()
                )));
            }
            if let Some(why) = resume_mismatch(&st, cfg, &fingerprint) {
                return Err(TrainError::Invalid(format!(
                    "{}: cannot resume this checkpoint: {why}; use another --out or the original settings",
                    dir.display()
                )));
            }
            if st.total_steps != total || st.step != *step || st.step > total {
                return Err(TrainError::Invalid(format!(
                    "{}: checkpoint was made at step {} of {} steps, this run has {total}: different data or settings",
                    dir.display(),
                    st.step,
                    st.total_steps
                )));
            }
            let opt = AdamW::load(
                cfg.adamw.clone(),
                &dir.join("optimizer.safetensors"),
                device,
            )?;
            (dir.join("model"), opt, st, Some(*step))
        }
        None => (
            policy.to_path_buf(),
            AdamW::new(cfg.adamw.clone()),
            TrainerState {
                step: 0,
                total_steps: total,
                best: None,
                config: cfg.clone(),
                data: Some(fingerprint.clone()),
                base_model: Some(base_model.clone()),
            },
            None,
        ),
    };
    // A reward model trains the backbone and its own head; the language-model head is not loaded.
    let mut config = ck.config.clone();
    if objective.backbone_only() {
        config.tie_word_embeddings = true;
    }
    let w = load_weights(&weights_dir, &config, device, DType::F32)?;
    let (model, vars) = Decoder::trainable(config.clone(), w)?;
    let head_vars = load_heads(objective, &config, &weights_dir, cfg.seed, device)?;
    let mut all_vars = vars.clone();
    all_vars.extend(head_vars.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut out_config = config.clone();
    objective.output_config(&mut out_config.raw);
    let heads_now = || -> objective::Heads {
        head_vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    };
    let compute = crate::model::parse_dtype(&cfg.compute_dtype)?;
    truncate_metrics(&paths.metrics(), state.step)?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.metrics())
        .map_err(io(&paths.metrics()))?;

    let bar = if hooks.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "train {bar:30} {pos}/{len} steps  loss {msg}  [{elapsed_precise} eta {eta}]",
        )
        .expect("valid template"),
    );
    bar.set_position(state.step as u64);
    let mut last_loss = f64::NAN;
    while state.step < total {
        let step = state.step;
        let epoch = step / steps_per_epoch;
        let k = step % steps_per_epoch;
        let order = epoch_order(n, cfg.seed, epoch);
        let idx = &order[k * window..((k + 1) * window).min(n)];
        let lr = cosine_lr(cfg.lr, step, total, cfg.warmup_ratio);
        let t0 = Instant::now();
        let norm = objective.normaliser(idx);
        let mut grads = BTreeMap::new();
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut loss_total = 0.0;
        let mut tokens = 0usize;
        let cast = if compute == DType::F32 {
            None
        } else {
            Some(Decoder::from_vars(config.clone(), &vars, compute)?)
        };
        let fwd = cast.as_ref().unwrap_or(&model);
        let heads = heads_now();
        for micro in idx.chunks(cfg.batch_size) {
            let out = objective.micro_loss(fwd, &heads, micro, step, total, norm)?;
            let l = out
                .loss
                .to_dtype(DType::F64)
                .and_then(|x| x.to_scalar::<f64>())
                .map_err(|e| ModelError::Candle {
                    context: "reading the loss".into(),
                    source: e,
                })?;
            if !l.is_finite() {
                return Err(TrainError::NonFinite {
                    step: step + 1,
                    loss: l,
                    lines: micro.iter().map(|&i| objective.line(i)).collect(),
                });
            }
            loss_total += l;
            tokens += out.tokens;
            for (k2, v) in out.sums {
                *sums.entry(k2).or_default() += v;
            }
            let g = out.loss.backward().map_err(|e| ModelError::Candle {
                context: "backward".into(),
                source: e,
            })?;
            for (leaf, traced) in out.traces {
                let Some(dlogps) = g.get(&leaf) else { continue };
                let mut wg = traced.backward(dlogps)?;
                if compute != DType::F32 {
                    // Gradients arrive in the compute dtype; the f32 master weights take f32.
                    for (k2, t) in wg.iter_mut() {
                        *t = t.to_dtype(DType::F32).ctx(|| format!("casting `{k2}`"))?;
                    }
                }
                accumulate(&mut grads, wg)?;
            }
            for (leaf, traced) in out.hidden_traces {
                let Some(dh) = g.get(&leaf) else { continue };
                let mut wg = traced.backward(dh)?;
                for (k2, t) in wg.iter_mut() {
                    *t = t.to_dtype(DType::F32).ctx(|| format!("casting `{k2}`"))?;
                }
                accumulate(&mut grads, wg)?;
            }
            for (name, v) in &head_vars {
                if let Some(gr) = g.get(v) {
                    let gr = gr
                        .to_dtype(DType::F32)
                        .ctx(|| format!("casting `{name}`"))?;
                    accumulate(&mut grads, BTreeMap::from([(name.clone(), gr)]))?;
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: step + 1,
                loss: grad_norm,
                lines: idx.iter().map(|&i| objective.line(i)).collect(),
            });
        }
        opt.update(&all_vars, &grads, lr)?;
        state.step += 1;
        last_loss = loss_total;
        let dt = t0.elapsed().as_secs_f64();
        let mut line = json!({
            "step": state.step, "epoch": epoch as f64 + (k + 1) as f64 / steps_per_epoch as f64,
            "loss": loss_total, "learning_rate": lr, "grad_norm": grad_norm,
            "tokens": tokens, "tokens_per_s": tokens as f64 / dt.max(1e-9),
        });
        for (k2, v) in objective.finish_metrics(&sums, idx.len()) {
            line[k2] = json!(v);
        }
        let mut eval_loss = None;
        let save_now = cfg.save_steps > 0 && state.step % cfg.save_steps == 0;
        if let (Some(e), true) = (eval, save_now || state.step == total) {
            let (el, em) = evaluate(&model, &heads_now(), e)?;
            line["eval/loss"] = json!(el);
            for (k2, v) in em {
                line[format!("eval/{k2}")] = json!(v);
            }
            eval_loss = Some(el);
        }
        writeln!(metrics_file, "{line}").map_err(io(&paths.metrics()))?;
        bar.set_message(format!(
            "{loss_total:.4}  {:.0} tok/s",
            tokens as f64 / dt.max(1e-9)
        ));
        bar.inc(1);
        if save_now && state.step < total {
            if let Some(el) = eval_loss {
                if state.best.is_none_or(|(_, b)| el < b) {
                    state.best = Some((state.step, el));
                }
            }
            let weights = with_heads(&model, &head_vars);
            save_train_checkpoint(paths, &ck, &out_config, &weights, &opt, &state)?;
            prune(paths, cfg.keep_last, state.best.map(|b| b.0))?;
        }
        if hooks.crash_after_step == Some(state.step) {
            return Err(TrainError::Invalid(format!(
                "simulated crash after step {}",
                state.step
            )));
        }
    }
    bar.finish_and_clear();
    metrics_file.flush().map_err(io(&paths.metrics()))?;
    save_checkpoint(
        &paths.model(),
        &out_config,
        &with_heads(&model, &head_vars),
        DType::F32,
        Some(policy),
    )?;
    Ok(TrainSummary {
        steps: state.step,
        resumed_from,
        skipped_checkpoints,
        final_loss: last_loss,
        skipped_rows: objective.skipped(),
        best_checkpoint: state.best.map(|b| b.0),
        model: paths.model(),
    })
}

/// Mean loss and metrics over a held-out set, without gradients.
pub fn evaluate(
    model: &Decoder,
    heads: &objective::Heads,
    eval: &dyn Objective,
) -> Result<(f64, BTreeMap<String, f64>), TrainError> {
    let all: Vec<usize> = (0..eval.len()).collect();
    let norm = eval.normaliser(&all);
    let mut loss = 0.0;
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for chunk in all.chunks(8) {
        let out = eval.micro_loss(model, heads, chunk, 0, 1, norm)?;
        loss += out
            .loss
            .detach()
            .to_dtype(DType::F64)
            .and_then(|x| x.to_scalar::<f64>())
            .map_err(|e| ModelError::Candle {
                context: "eval loss".into(),
                source: e,
            })?;
        for (k, v) in out.sums {
            *sums.entry(k).or_default() += v;
        }
    }
    Ok((loss, eval.finish_metrics(&sums, all.len())))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TrainError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
}

/// Drop metric lines past `step` (written after the checkpoint a resumed run restarts from).
fn truncate_metrics(path: &Path, step: usize) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    crate::fs::write_durable(path, body.as_bytes()).map_err(io(path))
}

/// checkpoint-N/{model/, optimizer.safetensors, trainer_state.json}, built aside and renamed into place.
/// The decoder's weights and the objective's heads, as saved.
fn with_heads(model: &Decoder, heads: &BTreeMap<String, Var>) -> BTreeMap<String, Tensor> {
    let mut w = model.weights();
    w.extend(
        heads
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone())),
    );
    w
}

/// The objective's trainable heads: from the starting (or resumed) weights when present, else
/// N(0, 0.02) as transformers initialises a fresh `score` layer, from the trainer's seed.
fn load_heads(
    objective: &dyn Objective,
    config: &crate::model::ModelConfig,
    dir: &Path,
    seed: u64,
    device: &Device,
) -> Result<BTreeMap<String, Var>, TrainError> {
    let specs = objective.heads(config);
    let mut out = BTreeMap::new();
    if specs.is_empty() {
        return Ok(out);
    }
    let names: Vec<String> = specs.iter().map(|s| s.0.clone()).collect();
    let mut found = crate::model::load_named(dir, &names, device, DType::F32)?;
    for (i, (name, shape)) in specs.into_iter().enumerate() {
        let t = match found.remove(&name) {
            Some((t, file)) => {
                if t.dims() != shape.as_slice() {
                    return Err(ModelError::ShapeMismatch {
                        path: file,
                        tensor: name,
                        found: t.dims().to_vec(),
                        expected: shape,
                    }
                    .into());
                }
                t
            }
            None => {
                let n: usize = shape.iter().product();
                let mut rng = crate::generate::Rng::new(seed, 0x4845_4144 + i as u64);
                let mut v = Vec::with_capacity(n);
                while v.len() < n {
                    // Box-Muller: two uniforms, two normals.
                    let (u1, u2) = (rng.next_f64().max(1e-300), rng.next_f64());
                    let r = (-2.0 * u1.ln()).sqrt() * 0.02;
                    v.push((r * (std::f64::consts::TAU * u2).cos()) as f32);
                    v.push((r * (std::f64::consts::TAU * u2).sin()) as f32);
                }
                v.truncate(n);
                Tensor::from_vec(v, shape, device).ctx(|| format!("initialising `{name}`"))?
            }
        };
        let var = Var::from_tensor(&t).ctx(|| format!("making `{name}` trainable"))?;
        out.insert(name, var);
    }
    Ok(out)
}

fn save_train_checkpoint(
    paths: &RunPaths,
    ck: &Checkpoint,
    config: &crate::model::ModelConfig,
    weights: &BTreeMap<String, Tensor>,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<(), TrainError> {
    let dest = paths.checkpoint(state.step);
    let tmp = crate::fs::temp_dir_beside(&dest).map_err(io(&dest))?;
    let res = (|| {
        save_checkpoint(
            &tmp.join("model"),
            config,
            weights,
            DType::F32,
            Some(&ck.dir),
        )?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        let st = tmp.join("trainer_state.json");
        std::fs::write(&st, serde_json::to_vec_pretty(state).expect("serialises"))
            .map_err(io(&st))?;
        let manifest = CheckpointManifest {
            step: state.step,
            files: digest_files(&tmp)?,
        };
        let mp = tmp.join(MANIFEST);
        std::fs::write(
            &mp,
            serde_json::to_vec_pretty(&manifest).expect("serialises"),
        )
        .map_err(io(&mp))?;
        // A stale checkpoint-N (from a run whose later steps were lost) is swapped out atomically.
        crate::fs::publish_replacing_dir(&tmp, &dest).map_err(io(&dest))
    })();
    let _ = crate::fs::remove_tree(&tmp);
    res
}

fn prune(paths: &RunPaths, keep_last: usize, best: Option<usize>) -> Result<(), TrainError> {
    let all = paths.checkpoints();
    let n = all.len();
    for (i, (step, dir)) in all.into_iter().enumerate() {
        let recent = i + keep_last.max(1) >= n;
        if !recent && Some(step) != best {
            crate::fs::remove_tree(&dir).map_err(io(&dir))?;
        }
    }
    Ok(())
}

/// Trainable variables' count, for messages.
pub fn count_params(vars: &BTreeMap<String, Var>) -> usize {
    vars.values().map(|v| v.elem_count()).sum()
}

#[cfg(test)]
mod tests;
