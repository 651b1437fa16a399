//! New models from nothing: a `config.json` of any of the four families at a chosen shape, and
//! weights initialised as transformers' `_init_weights` does (normal(0, initializer_range) for
//! projections and embeddings, zero biases, RMSNorm weights at their identity: ones, or zeros for
//! Gemma-2's `1 + w` norm), drawn from a seeded stream so the same seed gives the same bytes.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{save_checkpoint, Family, ModelConfig, ModelError};
use crate::generate::Rng;

/// The size of a new model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Longest sequence the model is meant for (`max_position_embeddings`).
    pub context: usize,
    /// RoPE base; `None` keeps the family's own (Llama 3 500k, Qwen2 1M, Mistral / Gemma-2 10k).
    /// Those large bases are tuned for 128-dim heads and 128k contexts: with 32-dim heads and a
    /// 256-token context almost every rotary pair of a 500k base turns too slowly to tell
    /// neighbouring positions apart.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// Special token ids a new model's config names.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: u32,
    pub pad: u32,
}

/// A transformers 5.x `config.json` for `family` at `shape`, with each family's own defaults
/// (Qwen2's qkv bias and tied embeddings, Mistral's sliding window, Gemma-2's alternating
/// sliding/full layers, soft-capping and query scale).
pub fn config_json(family: Family, shape: &Shape, vocab_size: usize, ids: SpecialIds) -> Value {
    let head_dim = shape.hidden_size / shape.num_attention_heads.max(1);
    let mut v = json!({
        "architectures": [arch(family)],
        "model_type": family.model_type(),
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": head_dim,
        "max_position_embeddings": shape.context,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "attention_dropout": 0.0,
        "use_cache": true,
        "dtype": "float32",
    });
    let m = v.as_object_mut().expect("object");
    let window = (shape.context / 2).max(1);
    let theta = |own: f64| shape.rope_theta.unwrap_or(own);
    match family {
        Family::Llama => {
            m.insert("hidden_act".into(), json!("silu"));
            m.insert("attention_bias".into(), json!(false));
            m.insert("mlp_bias".into(), json!(false));
            m.insert("tie_word_embeddings".into(), json!(false));
            m.insert(
                "rope_parameters".into(),
                json!({"rope_type": "default", "rope_theta": theta(500000.0)}),
            );
        }
        Family::Qwen2 => {
            m.insert("hidden_act".into(), json!("silu"));
            m.insert("tie_word_embeddings".into(), json!(true));
            m.insert("use_sliding_window".into(), json!(false));
            m.insert("sliding_window".into(), Value::Null);
            m.insert(
                "layer_types".into(),
                json!(vec!["full_attention"; shape.num_hidden_layers]),
            );
            m.insert(
                "rope_parameters".into(),
                json!({"rope_type": "default", "rope_theta": theta(1000000.0)}),
            );
        }
        Family::Mistral => {
            m.insert("hidden_act".into(), json!("silu"));
            m.insert("tie_word_embeddings".into(), json!(false));
            m.insert("sliding_window".into(), json!(window));
            m.insert("rope_theta".into(), json!(theta(10000.0)));
        }
        Family::Gemma2 => {
            m.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            m.insert("attention_bias".into(), json!(false));
            m.insert("tie_word_embeddings".into(), json!(true));
            m.insert("sliding_window".into(), json!(window));
            let types: Vec<&str> = (0..shape.num_hidden_layers)
                .map(|l| {
                    if l % 2 == 0 {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            m.insert("layer_types".into(), json!(types));
            m.insert("attn_logit_softcapping".into(), json!(50.0));
            m.insert("final_logit_softcapping".into(), json!(30.0));
            m.insert("query_pre_attn_scalar".into(), json!(head_dim));
            m.insert(
                "rope_parameters".into(),
                json!({"rope_type": "default", "rope_theta": theta(10000.0)}),
            );
        }
    }
    v
}

fn arch(f: Family) -> &'static str {
    match f {
        Family::Llama => "LlamaForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
        Family::Mistral => "MistralForCausalLM",
        Family::Gemma2 => "Gemma2ForCausalLM",
    }
}

/// One standard normal draw (Box-Muller on the seeded stream).
fn normal(rng: &mut Rng) -> f32 {
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Every weight `config` needs, initialised as transformers does; each tensor has its own stream
/// (seeded by `seed` and the tensor's name), so adding a tensor never shifts another's values.
pub fn init_weights(
    config: &ModelConfig,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let std = config
        .raw
        .get("initializer_range")
        .and_then(Value::as_f64)
        .unwrap_or(0.02) as f32;
    let mut out = BTreeMap::new();
    for (name, shape) in config.expected_tensors() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            let identity = if config.family == Family::Gemma2 {
                0.0
            } else {
                1.0
            };
            vec![identity; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let stream = u64::from_le_bytes(
                blake3::hash(name.as_bytes()).as_bytes()[..8]
                    .try_into()
                    .expect("8 bytes"),
            );
            let mut rng = Rng::new(seed, stream);
            (0..n).map(|_| std * normal(&mut rng)).collect()
        };
        let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).map_err(|source| {
            ModelError::Candle {
                context: format!("initialising `{name}`"),
                source,
            }
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Write a new, randomly initialised checkpoint of `family` at `shape` into `out`, with the
/// tokenizer files (tokenizer.json, tokenizer_config.json with its chat template, ...) of
/// `tokenizer_dir`. The vocabulary size and special ids come from that tokenizer.
pub fn create_checkpoint(
    out: &Path,
    family: Family,
    shape: &Shape,
    tokenizer_dir: &Path,
    ids: SpecialIds,
    seed: u64,
) -> Result<ModelConfig, ModelError> {
    let tok_path = tokenizer_dir.join("tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ModelError::Tokenizer {
        path: tok_path.clone(),
        reason: e.to_string(),
    })?;
    let vocab = tok.get_vocab_size(true);
    let raw = config_json(family, shape, vocab, ids);
    let config = ModelConfig::from_value(raw, &out.join("config.json"))?;
    let weights = init_weights(&config, seed)?;
    save_checkpoint(out, &config, &weights, DType::F32, Some(tokenizer_dir))?;
    Ok(config)
}
