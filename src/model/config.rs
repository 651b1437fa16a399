//! `config.json` of the four FuseChat families, in both layouts found in the wild: transformers 4.x
//! (top-level `rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`,
//! `layer_types`). The original JSON is kept so that saving writes back every field we do not model.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Qwen2,
    Mistral,
    Gemma2,
}

impl Family {
    /// The family of a config's `model_type` (`llama`, `qwen2`, `mistral`, `gemma2`).
    pub fn from_model_type(t: &str) -> Option<Family> {
        [
            Family::Llama,
            Family::Qwen2,
            Family::Mistral,
            Family::Gemma2,
        ]
        .into_iter()
        .find(|f| f.model_type() == t)
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
            Family::Gemma2 => "gemma2",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Activation {
    Silu,
    GeluTanh,
}

/// Llama-3 frequency-dependent rope scaling.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_llama3: Option<Llama3Rope>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias` also covers o_proj).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub activation: Activation,
    /// Per layer: the attention window, or None for full attention.
    pub layer_windows: Vec<Option<usize>>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Attention scale is `query_pre_attn_scalar^-0.5` (Gemma-2) instead of `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`).
    pub dtype: Option<String>,
    #[serde(skip)]
    pub raw: Value,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            reason: format!("line {}: {e}", e.line()),
        })?;
        ModelConfig::from_value(raw, path)
    }

    pub fn from_value(raw: Value, path: &Path) -> Result<ModelConfig, ModelError> {
        let bad = |reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let model_type = get(&raw, "model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no `model_type`".into()))?;
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                model_type: model_type.to_string(),
            }
        })?;
        let usize_of = |key: &str| -> Result<usize, ModelError> {
            get(&raw, key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing or non-integer `{key}`")))
        };
        let f64_of = |key: &str| get(&raw, key).and_then(Value::as_f64);
        let hidden_size = usize_of("hidden_size")?;
        let num_attention_heads = usize_of("num_attention_heads")?;
        let num_hidden_layers = usize_of("num_hidden_layers")?;
        let num_key_value_heads = get(&raw, "num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        // Sizes are checked before anything is sized by them: a zero divides by zero below, and an
        // absurd count (`num_hidden_layers: 1000000000000`) would allocate terabytes of layer
        // tables before any weight is looked at. The bounds are far above any released model.
        let in_range = |key: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err(bad(format!("`{key}` is {v}; expected 1 to {max}")))
            } else {
                Ok(v)
            }
        };
        in_range("hidden_size", hidden_size, 1 << 18)?;
        in_range("num_attention_heads", num_attention_heads, 4096)?;
        in_range("num_hidden_layers", num_hidden_layers, 4096)?;
        in_range("num_key_value_heads", num_key_value_heads, 4096)?;
        in_range("vocab_size", usize_of("vocab_size")?, 1 << 24)?;
        in_range("intermediate_size", usize_of("intermediate_size")?, 1 << 20)?;
        let head_dim = get(&raw, "head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads);
        in_range("head_dim", head_dim, 1 << 14)?;
        if let Some(m) = get(&raw, "max_position_embeddings").and_then(Value::as_u64) {
            in_range("max_position_embeddings", m as usize, 1 << 24)?;
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }

        // Rope: 5.x nests everything in `rope_parameters`; 4.x has `rope_theta` + `rope_scaling`.
        let rope_params = get(&raw, "rope_parameters");
        let scaling = rope_params.or_else(|| get(&raw, "rope_scaling"));
        let rope_theta = rope_params
            .and_then(|p| get(p, "rope_theta"))
            .and_then(Value::as_f64)
            .or_else(|| f64_of("rope_theta"))
            .unwrap_or(10_000.0);
        let rope_type = scaling
            .and_then(|s| get(s, "rope_type").or_else(|| get(s, "type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_llama3 = match rope_type {
            "default" => None,
            "llama3" => {
                let s = scaling.expect("rope_type came from it");
                let f = |k: &str| {
                    get(s, k)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| bad(format!("llama3 rope scaling needs `{k}`")))
                };
                Some(Llama3Rope {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?,
                })
            }
            other => return Err(bad(format!("unsupported rope type `{other}`"))),
        };

        let activation = match get(&raw, "hidden_act")
            .or_else(|| get(&raw, "hidden_activation"))
            .and_then(Value::as_str)
            .unwrap_or("silu")
        {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => return Err(bad(format!("unsupported activation `{other}`"))),
        };

        let sliding_window = get(&raw, "sliding_window")
            .and_then(Value::as_u64)
            .map(|x| x as usize);
        let layer_types: Option<Vec<String>> = get(&raw, "layer_types").and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or("").to_string())
                    .collect()
            })
        });
        let layer_windows: Vec<Option<usize>> = match (&layer_types, family) {
            (Some(types), _) => {
                if types.len() != num_hidden_layers {
                    return Err(bad(format!(
                        "`layer_types` has {} entries for {num_hidden_layers} layers",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(sliding_window),
                        "full_attention" => Ok(None),
                        other => Err(bad(format!("unknown layer type `{other}`"))),
                    })
                    .collect::<Result<_, _>>()?
            }
            // Gemma-2 before `layer_types`: even layers slide.
            (None, Family::Gemma2) => (0..num_hidden_layers)
                .map(|i| if i % 2 == 0 { sliding_window } else { None })
                .collect(),
            (None, Family::Mistral) => vec![sliding_window; num_hidden_layers],
            (None, Family::Qwen2) => {
                let use_sw = get(&raw, "use_sliding_window")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let max_window_layers = get(&raw, "max_window_layers")
                    .and_then(Value::as_u64)
                    .unwrap_or(num_hidden_layers as u64)
                    as usize;
                (0..num_hidden_layers)
                    .map(|i| {
                        (use_sw && i >= max_window_layers)
                            .then_some(())
                            .and(sliding_window)
                    })
                    .collect()
            }
            (None, Family::Llama) => vec![None; num_hidden_layers],
        };

        let attention_bias = get(&raw, "attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let tie_default = matches!(family, Family::Gemma2);
        let eos_token_ids = match get(&raw, "eos_token_id") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            Some(v) => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![],
        };
        let softcap = |k: &str| match family {
            Family::Gemma2 => f64_of(k),
            _ => None,
        };
        Ok(ModelConfig {
            family,
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f64_of("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_llama3,
            max_position_embeddings: get(&raw, "max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(4096) as usize,
            tie_word_embeddings: get(&raw, "tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(tie_default),
            qkv_bias,
            o_bias,
            mlp_bias: get(&raw, "mlp_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            activation,
            layer_windows,
            attn_logit_softcapping: softcap("attn_logit_softcapping"),
            final_logit_softcapping: softcap("final_logit_softcapping"),
            query_pre_attn_scalar: match family {
                Family::Gemma2 => f64_of("query_pre_attn_scalar"),
                _ => None,
            },
            bos_token_id: get(&raw, "bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids,
            dtype: get(&raw, "dtype")
                .or_else(|| get(&raw, "torch_dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
            raw,
        })
    }

    /// The JSON to write back when saving, with the dtype actually stored.
    pub fn to_json(&self, dtype: &str) -> Value {
        let mut v = self.raw.clone();
        if v.get("dtype").is_some() || v.get("torch_dtype").is_none() {
            v["dtype"] = json!(dtype);
        }
        if v.get("torch_dtype").is_some() {
            v["torch_dtype"] = json!(dtype);
        }
        v
    }

    /// Expected shape of every weight, by its Hugging Face name.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, h]),
            ("model.norm.weight".into(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, h]));
        }
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut push = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
            push("self_attn.q_proj.weight", vec![q, h]);
            push("self_attn.k_proj.weight", vec![kv, h]);
            push("self_attn.v_proj.weight", vec![kv, h]);
            push("self_attn.o_proj.weight", vec![h, q]);
            if self.qkv_bias {
                push("self_attn.q_proj.bias", vec![q]);
                push("self_attn.k_proj.bias", vec![kv]);
                push("self_attn.v_proj.bias", vec![kv]);
            }
            if self.o_bias {
                push("self_attn.o_proj.bias", vec![h]);
            }
            push("mlp.gate_proj.weight", vec![i, h]);
            push("mlp.up_proj.weight", vec![i, h]);
            push("mlp.down_proj.weight", vec![h, i]);
            if self.mlp_bias {
                push("mlp.gate_proj.bias", vec![i]);
                push("mlp.up_proj.bias", vec![i]);
                push("mlp.down_proj.bias", vec![h]);
            }
            push("input_layernorm.weight", vec![h]);
            push("post_attention_layernorm.weight", vec![h]);
            if self.family == Family::Gemma2 {
                push("pre_feedforward_layernorm.weight", vec![h]);
                push("post_feedforward_layernorm.weight", vec![h]);
            }
        }
        out
    }

    pub fn parameter_count(&self) -> usize {
        self.expected_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// Where a config came from, for messages.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
