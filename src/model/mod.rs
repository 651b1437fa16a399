//! The transformer families FuseChat uses (Llama-3.x, Qwen-2.5, Mistral, Gemma-2) on candle: Hugging
//! Face checkpoint IO (config, single or sharded safetensors, tokenizer, chat template), one decoder
//! implementation whose training forward is differentiable end to end, and log-probs.

pub mod attend;
mod backward;
pub mod bpe;
pub mod chat;
pub mod config;
pub mod cost;
pub mod decoder;
pub mod fused;
pub mod init;
mod io;
mod kv;
pub mod rows;

pub use backward::{Tape, Traced, TracedHidden};
pub use chat::ChatTemplate;
pub use config::{Family, ModelConfig};
pub use decoder::{Decoder, KvCache};
pub use io::{load_named, load_weights, save_checkpoint, Checkpoint};

use std::path::PathBuf;

use candle_core::{DType, Device};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: unsupported architecture `{model_type}` (supported: llama, qwen2, mistral, gemma2)", path.display())]
    UnsupportedArchitecture { path: PathBuf, model_type: String },
    #[error("{}: shard `{shard}` listed in the index is missing", index.display())]
    MissingShard { index: PathBuf, shard: String },
    #[error("{}: no weights (expected model.safetensors or model.safetensors.index.json)", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{}: tensor `{tensor}` is missing", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{}: tensor `{tensor}` has shape {found:?}, the config implies {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{}: line {line}: {reason}", path.display())]
    Template {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: no chat template (neither chat_template.jinja nor `chat_template` in tokenizer_config.json)", dir.display())]
    NoTemplate { dir: PathBuf },
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Attach context to candle errors.
pub trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ModelError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ModelError> {
        self.map_err(|source| ModelError::Candle {
            context: context(),
            source,
        })
    }
}

/// Parse a dtype name as used in configs and on the command line.
pub fn parse_dtype(s: &str) -> Result<DType, ModelError> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(ModelError::Invalid(format!(
            "unknown dtype `{other}` (expected f32, bf16 or f16)"
        ))),
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "unknown",
    }
}

/// Pick a device by name: `cpu`, `cuda`, `cuda:N`. Never hard-coded: every entry point takes one.
pub fn parse_device(s: &str) -> Result<Device, ModelError> {
    let cuda = |i: usize| {
        Device::new_cuda(i).map_err(|e| ModelError::Candle {
            context: format!("opening device `{s}` (built without the `cuda` feature?)"),
            source: e,
        })
    };
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(i) => cuda(i),
            None => Err(ModelError::Invalid(format!(
                "unknown device `{other}` (expected cpu, cuda or cuda:N)"
            ))),
        },
    }
}

/// Largest absolute element, as f64 (test comparisons of tensors of any float dtype).
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f64 {
    t.abs()
        .and_then(|a| {
            a.max_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()
        })
        .expect("max |t|")
}

/// [`max_abs`] of `a - b`.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    max_abs(&(a - b).expect("a - b"))
}

#[cfg(test)]
mod tests;
