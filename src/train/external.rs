//! Training on an external engine: TRL's SFTTrainer or DPOTrainer launched by `accelerate launch`
//! (DeepSpeed ZeRO-3 on clusters), fed our rows in TRL's conversational layout, with the
//! hyperparameters mapped from [`TrainConfig`] and [`DpoLoss`]. The launch files (TRL config,
//! accelerate config, DeepSpeed config, the driver script) are written into the step's directory,
//! so a run can be repeated by hand; the checkpoint and the exact per-step losses come back.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{DpoLoss, TrainConfig};

/// The driver script `accelerate launch` runs (kept beside this module, compiled into the binary,
/// so the code that produced a checkpoint is the code of the binary whose version is recorded).
pub const DRIVER: &str = include_str!("trl_train.py");

#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` could not start: {source} (set FUSELAB_ACCELERATE to accelerate's path)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` exited with {status}; the last lines of {}:\n{tail}", log.display())]
    Failed {
        command: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{}: {reason}", path.display())]
    BadOutput { path: PathBuf, reason: String },
    #[error("the TRL engine has no {0}")]
    Unsupported(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExternalError + '_ {
    move |source| ExternalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How the external job is launched.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Launch {
    /// Processes (GPUs) for `accelerate launch --num_processes`.
    pub processes: u32,
    /// Shard parameters, gradients and optimizer state with DeepSpeed ZeRO-3 (the paper's setup on
    /// 8 GPUs); off on CPU, where DeepSpeed does not run.
    pub zero3: bool,
    /// Train on the CPU (the tests; `--cpu` for accelerate, `use_cpu` for the trainer).
    pub cpu: bool,
    /// bf16 mixed precision (GPUs); f32 otherwise.
    pub bf16: bool,
}

impl Default for Launch {
    fn default() -> Self {
        Launch {
            processes: 1,
            zero3: false,
            cpu: true,
            bf16: false,
        }
    }
}

/// One training job for TRL.
pub struct TrlJob<'a> {
    /// `sft` or `dpo`.
    pub kind: &'a str,
    pub model: &'a Path,
    /// Rows in TRL's conversational layout: `{"messages"}` (SFT) or `{"prompt", "chosen",
    /// "rejected"}` message lists (DPO).
    pub train: &'a Path,
    pub config: &'a TrainConfig,
    pub dpo: Option<(f64, &'a DpoLoss)>,
    pub launch: &'a Launch,
}

/// What came back.
#[derive(Debug)]
pub struct TrlOutcome {
    pub model: PathBuf,
    /// The exact mean loss of every optimizer step, in order.
    pub losses: Vec<f64>,
    /// trainer_state.json: transformers' log history and the engine's versions.
    pub state: Value,
}

/// SFTConfig / DPOConfig fields for our settings. Errors name what TRL has no equivalent for.
pub fn trl_args(job: &TrlJob) -> Result<Value, ExternalError> {
    let c = job.config;
    let mut a = json!({
        "learning_rate": c.lr,
        "num_train_epochs": c.epochs,
        "per_device_train_batch_size": c.batch_size,
        "gradient_accumulation_steps": c.grad_accum,
        // transformers 5 folded warmup_ratio into warmup_steps: a value below 1 is the ratio,
        // rounded up to whole steps as our schedule does.
        "warmup_steps": c.warmup_ratio,
        "lr_scheduler_type": "cosine",
        "max_grad_norm": c.max_grad_norm,
        "weight_decay": c.adamw.weight_decay,
        "adam_beta1": c.adamw.beta1,
        "adam_beta2": c.adamw.beta2,
        "adam_epsilon": c.adamw.eps,
        "seed": c.seed,
        "max_length": c.max_len,
        "use_cpu": job.launch.cpu,
        "bf16": job.launch.bf16,
        "fp16": false,
    });
    if let Some((beta, loss)) = job.dpo {
        a["beta"] = json!(beta);
        match loss {
            DpoLoss::Sigmoid { label_smoothing } => {
                a["loss_type"] = json!("sigmoid");
                a["label_smoothing"] = json!(label_smoothing);
            }
            // Tulu 3's length-normalised DPO is TRL's sigmoid_norm.
            DpoLoss::LnDpo => a["loss_type"] = json!("sigmoid_norm"),
            DpoLoss::Wrpo { .. } => {
                return Err(ExternalError::Unsupported(
                    "WRPO loss (use the in-process trainer)".into(),
                ))
            }
        }
    } else {
        // Loss on assistant turns only, as our SFT objective.
        a["assistant_only_loss"] = json!(true);
    }
    Ok(a)
}

/// The accelerate config (and, for ZeRO-3, the DeepSpeed config it points at).
pub fn accelerate_config(launch: &Launch, dir: &Path) -> (String, Option<Value>) {
    let mut y = String::new();
    y += "compute_environment: LOCAL_MACHINE\n";
    y += &format!("num_processes: {}\n", launch.processes.max(1));
    y += "num_machines: 1\nmachine_rank: 0\n";
    // Quoted: YAML reads a bare `no` as false, which accelerate then fails on.
    y += &format!(
        "mixed_precision: '{}'\n",
        if launch.bf16 { "bf16" } else { "no" }
    );
    y += &format!("use_cpu: {}\n", launch.cpu);
    if launch.zero3 {
        let ds = json!({
            "zero_optimization": {
                "stage": 3,
                "overlap_comm": true,
                "contiguous_gradients": true,
                "reduce_bucket_size": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_gather_16bit_weights_on_model_save": true,
            },
            "bf16": {"enabled": "auto"},
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto",
        });
        y += "distributed_type: DEEPSPEED\n";
        y += &format!(
            "deepspeed_config:\n  deepspeed_config_file: {}\n  zero3_init_flag: true\n",
            dir.join("zero3.json").display()
        );
        (y, Some(ds))
    } else {
        y += &format!(
            "distributed_type: {}\n",
            if launch.processes > 1 {
                "MULTI_GPU"
            } else {
                "NO"
            }
        );
        (y, None)
    }
}

/// Write the launch files into `dir` and run `accelerate launch` there. `accelerate` is the
/// launcher's path (FUSELAB_ACCELERATE, else `accelerate` on PATH).
pub fn run_trl(job: &TrlJob, dir: &Path, accelerate: &Path) -> Result<TrlOutcome, ExternalError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let out = dir.join("out");
    let cfg = json!({
        "kind": job.kind,
        "model": job.model,
        "train": job.train,
        "out": out,
        "args": trl_args(job)?,
    });
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, ExternalError> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(io(&p))?;
        Ok(p)
    };
    let cfg_path = write(
        "config.json",
        &serde_json::to_vec_pretty(&cfg).expect("serialises"),
    )?;
    let script = write("train.py", DRIVER.as_bytes())?;
    let (yaml, ds) = accelerate_config(job.launch, dir);
    let acc = write("accelerate.yaml", yaml.as_bytes())?;
    if let Some(ds) = ds {
        write(
            "zero3.json",
            &serde_json::to_vec_pretty(&ds).expect("serialises"),
        )?;
    }
    let log = dir.join("trl.log");
    let log_file = std::fs::File::create(&log).map_err(io(&log))?;
    let err_file = log_file.try_clone().map_err(io(&log))?;
    let mut cmd = Command::new(accelerate);
    cmd.arg("launch")
        .arg("--config_file")
        .arg(&acc)
        .arg(&script)
        .arg(&cfg_path)
        .current_dir(dir)
        .stdout(log_file)
        .stderr(err_file);
    let shown = format!(
        "{} launch --config_file {} {} {}",
        accelerate.display(),
        acc.display(),
        script.display(),
        cfg_path.display()
    );
    let status = cmd.status().map_err(|source| ExternalError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        return Err(ExternalError::Failed {
            command: shown,
            status: status.to_string(),
            log,
            tail: lines[lines.len().saturating_sub(25)..].join("\n"),
        });
    }
    let losses_path = out.join("losses.jsonl");
    let text = std::fs::read_to_string(&losses_path).map_err(io(&losses_path))?;
    let mut losses = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(l).map_err(|e| ExternalError::BadOutput {
            path: losses_path.clone(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        losses.push(v["loss"].as_f64().ok_or_else(|| ExternalError::BadOutput {
            path: losses_path.clone(),
            reason: format!("line {}: no loss", i + 1),
        })?);
    }
    let state_path = out.join("trainer_state.json");
    let state: Value = serde_json::from_slice(
        &std::fs::read(&state_path).map_err(io(&state_path))?,
    )
    .map_err(|e| ExternalError::BadOutput {
        path: state_path.clone(),
        reason: e.to_string(),
    })?;
    Ok(TrlOutcome {
        model: out.join("model"),
        losses,
        state,
    })
}

/// The launcher: FUSELAB_ACCELERATE, else `accelerate` on PATH.
pub fn accelerate_path() -> PathBuf {
    std::env::var_os("FUSELAB_ACCELERATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("accelerate"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero3_launch_writes_a_deepspeed_stage3_config_and_cpu_launch_does_not() {
        let gpu = Launch {
            processes: 8,
            zero3: true,
            cpu: false,
            bf16: true,
        };
        let (yaml, ds) = accelerate_config(&gpu, Path::new("/w"));
        assert!(yaml.contains("num_processes: 8") && yaml.contains("distributed_type: DEEPSPEED"));
        assert!(yaml.contains("deepspeed_config_file: /w/zero3.json"));
        assert!(yaml.contains("mixed_precision: 'bf16'"));
        let ds = ds.expect("a DeepSpeed config");
        assert_eq!(ds["zero_optimization"]["stage"], 3);
        assert_eq!(ds["gradient_accumulation_steps"], "auto");
        let (yaml, ds) = accelerate_config(&Launch::default(), Path::new("/w"));
        assert!(
            ds.is_none()
                && yaml.contains("use_cpu: true")
                && yaml.contains("mixed_precision: 'no'")
        );
    }

    #[test]
    fn our_losses_map_to_trl_loss_types_and_wrpo_is_refused() {
        let cfg = TrainConfig {
            lr: 5e-7,
            epochs: 1,
            batch_size: 8,
            grad_accum: 16,
            max_len: 2048,
            warmup_ratio: 0.1,
            max_grad_norm: 1.0,
            adamw: Default::default(),
            seed: 42,
            save_steps: 0,
            keep_last: 1,
            compute_dtype: "bf16".into(),
        };
        let launch = Launch::default();
        let job = |loss: &DpoLoss| {
            trl_args(&TrlJob {
                kind: "dpo",
                model: Path::new("m"),
                train: Path::new("t"),
                config: &cfg,
                dpo: Some((10.0, loss)),
                launch: &launch,
            })
        };
        let a = job(&DpoLoss::LnDpo).unwrap();
        assert_eq!(a["loss_type"], "sigmoid_norm");
        assert_eq!(a["beta"], 10.0);
        assert_eq!(a["learning_rate"], 5e-7);
        assert_eq!(a["per_device_train_batch_size"], 8);
        assert_eq!(a["gradient_accumulation_steps"], 16);
        assert_eq!(a["warmup_steps"], 0.1);
        let a = job(&DpoLoss::Sigmoid {
            label_smoothing: 0.1,
        })
        .unwrap();
        assert_eq!(
            (a["loss_type"].as_str(), a["label_smoothing"].as_f64()),
            (Some("sigmoid"), Some(0.1))
        );
        let wrpo = DpoLoss::Wrpo {
            alpha: 0.1,
            dynamic: true,
            label_smoothing: 0.0,
        };
        assert!(matches!(job(&wrpo), Err(ExternalError::Unsupported(_))));
    }
}
