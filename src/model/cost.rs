//! What a model costs to run and train, from its config alone: matmul parameters, FLOPs per
//! token, KV-cache and training-state bytes. Pure arithmetic for `fuselab plan`'s estimates; the
//! conventions are the usual ones (Kaplan et al.'s 2N forward / 6N training FLOPs per token plus
//! the attention score and value products; mixed-precision AdamW at 16 bytes per parameter).

use super::ModelConfig;

/// Bytes of one bf16 value.
pub const BF16: f64 = 2.0;

/// Per-parameter bytes of mixed-precision AdamW training: bf16 weights and gradients, an f32
/// master copy and two f32 moments (ZeRO paper, section 3.1).
pub const ADAMW_MIXED_BYTES: f64 = 16.0;

#[derive(Clone, Debug, PartialEq)]
pub struct ModelCost {
    pub parameters: u64,
    /// Parameters that take part in a matrix product per token: all of them except an untied
    /// input embedding table, which is only looked up.
    pub matmul_parameters: f64,
    pub layers: f64,
    /// Query heads x head dim (the width of the attention products).
    pub attention_width: f64,
    /// Bytes one token occupies in the KV cache at bf16.
    pub kv_bytes_per_token: f64,
    pub hidden: f64,
    pub vocab: f64,
}

impl ModelCost {
    pub fn of(cfg: &ModelConfig) -> ModelCost {
        let parameters = cfg.parameter_count() as u64;
        let embed = (cfg.vocab_size * cfg.hidden_size) as f64;
        let matmul = parameters as f64 - if cfg.tie_word_embeddings { 0.0 } else { embed };
        let layers = cfg.num_hidden_layers as f64;
        ModelCost {
            parameters,
            matmul_parameters: matmul,
            layers,
            attention_width: (cfg.num_attention_heads * cfg.head_dim) as f64,
            kv_bytes_per_token: layers
                * 2.0
                * (cfg.num_key_value_heads * cfg.head_dim) as f64
                * BF16,
            hidden: cfg.hidden_size as f64,
            vocab: cfg.vocab_size as f64,
        }
    }

    /// Forward FLOPs of one token that attends to `context` earlier tokens.
    pub fn forward_flops_per_token(&self, context: f64) -> f64 {
        2.0 * self.matmul_parameters + 4.0 * self.layers * context * self.attention_width
    }

    /// Forward FLOPs of a sequence of `len` tokens processed at once (causal: on average each
    /// token attends to half of it).
    pub fn forward_flops(&self, len: f64) -> f64 {
        len * self.forward_flops_per_token(len / 2.0)
    }

    /// Forward + backward FLOPs of a sequence (backward costs twice the forward).
    pub fn train_flops(&self, len: f64) -> f64 {
        3.0 * self.forward_flops(len)
    }

    /// Bytes of bf16 weights.
    pub fn weight_bytes(&self) -> f64 {
        self.parameters as f64 * BF16
    }

    /// Training state of a fully fine-tuned model: weights, gradients, master copy, moments.
    pub fn training_state_bytes(&self) -> f64 {
        self.parameters as f64 * ADAMW_MIXED_BYTES
    }

    /// Activations kept for the backward pass of `sequences` sequences of `len` tokens with
    /// activation checkpointing at layer boundaries: every layer's input, one layer's full
    /// activations while it is recomputed (Korthikanti et al. 2022, 34·h bytes per token at
    /// bf16 without the attention matrix, which flash attention never materialises), and f32
    /// logits.
    pub fn activation_bytes(&self, sequences: f64, len: f64) -> f64 {
        let tokens = sequences * len;
        tokens * (self.layers * self.hidden * BF16 + 34.0 * self.hidden + 4.0 * self.vocab)
    }
}

/// The fewest GPUs of `per_gpu_bytes` (keeping 10% for the framework) that hold `bytes`.
pub fn gpus_for(bytes: f64, per_gpu_bytes: f64) -> u32 {
    (bytes / (0.9 * per_gpu_bytes)).ceil().max(1.0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(v: serde_json::Value) -> ModelConfig {
        ModelConfig::from_value(v, Path::new("config.json")).unwrap()
    }

    #[test]
    fn flops_follow_the_2n_rule_and_grow_with_context() {
        let c = ModelCost::of(&cfg(serde_json::json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "tie_word_embeddings": false
        })));
        // Untied: the input table (100 x 8) is looked up, not multiplied.
        assert_eq!(c.matmul_parameters, c.parameters as f64 - 800.0);
        assert_eq!(c.forward_flops_per_token(0.0), 2.0 * c.matmul_parameters);
        // 2 layers x (k and v) x 1 kv head x head dim 4 x 2 bytes.
        assert_eq!(c.kv_bytes_per_token, 32.0);
        assert!(c.forward_flops(64.0) > 64.0 * c.forward_flops_per_token(0.0));
        assert_eq!(c.train_flops(10.0), 3.0 * c.forward_flops(10.0));
        assert_eq!(gpus_for(0.0, 80e9), 1);
        assert_eq!(gpus_for(100e9, 80e9), 2);
    }
}
