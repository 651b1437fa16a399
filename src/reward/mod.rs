//! Reward models on the decoder stack: Hugging Face `*ForSequenceClassification` checkpoints of the
//! four families (backbone + `score` head read at the last non-pad token, exactly as transformers
//! picks it) and ArmoRM's `LlamaForRewardModelWithGating` (19-objective regression layer at the
//! reward token, a gating MLP at the last assistant header, the fixed transform matrix). Scores
//! come in batches over chat-templated conversations.

mod train;

pub use train::{classifier_architecture, pair_accuracy, RewardObjective, SCORE};

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;

use crate::model::{load_named, load_weights, CandleContext, Checkpoint, Decoder, ModelError};

/// The pattern ArmoRM gates on, tokenised with the checkpoint's own tokenizer.
const ARMO_GATE_TEXT: &str = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";

pub enum Head {
    /// `score`: Linear(hidden -> num_labels), no bias in transformers' classes.
    Linear {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    ArmoRm(ArmoHead),
}

pub struct ArmoHead {
    regression: Tensor,
    gating: Vec<(Tensor, Option<Tensor>)>,
    logit_scale: f64,
    temperature: f64,
    transform: Tensor,
    pattern: Vec<u32>,
}

pub struct RewardModel {
    pub decoder: Decoder,
    pub head: Head,
    pub architecture: String,
    pub pad_token_id: Option<u32>,
    pub num_labels: usize,
    pub dir: PathBuf,
}

fn config_err(dir: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: dir.join("config.json"),
        reason: reason.into(),
    }
}

impl RewardModel {
    /// Load a reward checkpoint; any architecture but the sequence classifiers of the four
    /// families and ArmoRM is refused by name.
    pub fn load(ck: &Checkpoint, device: &Device, dtype: DType) -> Result<RewardModel, ModelError> {
        let dir = ck.dir.clone();
        let raw = &ck.config.raw;
        let arch = raw
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let supported = [
            "LlamaForSequenceClassification",
            "Qwen2ForSequenceClassification",
            "MistralForSequenceClassification",
            "Gemma2ForSequenceClassification",
            "LlamaForRewardModelWithGating",
        ];
        if !supported.contains(&arch.as_str()) {
            return Err(config_err(
                &dir,
                format!(
                    "architecture `{arch}` is not a reward model fuselab knows (supported: {})",
                    supported.join(", ")
                ),
            ));
        }
        // The backbone without a language-model head.
        let mut cfg = ck.config.clone();
        cfg.tie_word_embeddings = true;
        let w = load_weights(&dir, &cfg, device, dtype)?;
        let decoder = Decoder::new(cfg, w)?;
        let hidden = decoder.config.hidden_size;
        let pad_token_id = raw
            .get("pad_token_id")
            .and_then(Value::as_u64)
            .map(|x| x as u32);
        let num = |k: &str| raw.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let blame = weights_blame(&dir);
        let need = |found: &mut std::collections::HashMap<String, (Tensor, PathBuf)>,
                    name: &str,
                    shape: &[usize]|
         -> Result<Tensor, ModelError> {
            let (t, file) = found
                .remove(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: blame.clone(),
                    tensor: name.into(),
                })?;
            if t.dims() != shape {
                return Err(ModelError::ShapeMismatch {
                    path: file,
                    tensor: name.into(),
                    found: t.dims().to_vec(),
                    expected: shape.to_vec(),
                });
            }
            Ok(t)
        };
        let (head, num_labels) = if arch == "LlamaForRewardModelWithGating" {
            let objectives = num("num_objectives").unwrap_or(19);
            let gh = num("gating_hidden_dim").unwrap_or(1024);
            let layers = num("gating_n_hidden").unwrap_or(3);
            let temperature = raw
                .get("gating_temperature")
                .and_then(Value::as_f64)
                .unwrap_or(10.0);
            let mut names = vec![
                "regression_layer.weight".to_string(),
                "reward_transform_matrix".into(),
                "gating.logit_scale".into(),
            ];
            for i in 0..=layers {
                names.push(format!("gating.layers.{i}.weight"));
                names.push(format!("gating.layers.{i}.bias"));
            }
            let mut found = load_named(&dir, &names, device, dtype)?;
            let regression = need(&mut found, "regression_layer.weight", &[objectives, hidden])?;
            let transform = need(
                &mut found,
                "reward_transform_matrix",
                &[objectives, objectives],
            )?;
            let logit_scale = need(&mut found, "gating.logit_scale", &[1])?
                .to_dtype(DType::F64)
                .and_then(|t| t.to_vec1::<f64>())
                .ctx(|| "gating.logit_scale".into())?[0];
            let mut gating = Vec::new();
            let mut fan_in = hidden;
            for i in 0..=layers {
                let out = if i == layers { objectives } else { gh };
                let w = need(
                    &mut found,
                    &format!("gating.layers.{i}.weight"),
                    &[out, fan_in],
                )?;
                let b = match found.remove(&format!("gating.layers.{i}.bias")) {
                    Some((b, _)) => Some(b),
                    None if i == layers => None,
                    None => {
                        return Err(ModelError::MissingTensor {
                            path: blame.clone(),
                            tensor: format!("gating.layers.{i}.bias"),
                        })
                    }
                };
                gating.push((w, b));
                fan_in = out;
            }
            let tok = ck.tokenizer()?;
            let pattern = tok
                .encode(ARMO_GATE_TEXT, false)
                .map_err(|e| ModelError::Tokenizer {
                    path: dir.join("tokenizer.json"),
                    reason: e.to_string(),
                })?
                .get_ids()
                .to_vec();
            (
                Head::ArmoRm(ArmoHead {
                    regression,
                    gating,
                    logit_scale,
                    temperature,
                    transform,
                    pattern,
                }),
                1,
            )
        } else {
            let labels = num("num_labels")
                .or_else(|| {
                    raw.get("id2label")
                        .and_then(Value::as_object)
                        .map(|m| m.len())
                })
                .unwrap_or(2);
            let mut found = load_named(
                &dir,
                &["score.weight".to_string(), "score.bias".to_string()],
                device,
                dtype,
            )?;
            let weight = need(&mut found, "score.weight", &[labels, hidden])?;
            let bias = found.remove("score.bias").map(|(b, _)| b);
            (Head::Linear { weight, bias }, labels)
        };
        Ok(RewardModel {
            decoder,
            head,
            architecture: arch,
            pad_token_id,
            num_labels,
            dir,
        })
    }

    /// Logits `[num_labels]` per sequence (token ids, unpadded). Rows are right-padded with the
    /// pad token, so the reading position follows transformers' rule on the same ids.
    pub fn score_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        if let Some(i) = seqs.iter().position(Vec::is_empty) {
            return Err(ModelError::Invalid(format!("sequence {i} is empty")));
        }
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let (ids, mask) = crate::train::objective::pad_with(&refs, self.pad_token_id.unwrap_or(0));
        let h = self.decoder.hidden(&ids, &mask, None)?;
        let at = |rows: &[usize]| -> Result<Tensor, ModelError> {
            let picked: Vec<Tensor> = rows
                .iter()
                .enumerate()
                .map(|(b, &p)| h.get(b).and_then(|x| x.get(p)))
                .collect::<candle_core::Result<_>>()
                .ctx(|| "reading hidden states".into())?;
            Tensor::stack(&picked, 0).ctx(|| "stacking hidden states".into())
        };
        let out = match &self.head {
            Head::Linear { weight, bias } => {
                let rows: Vec<usize> = seqs
                    .iter()
                    .zip(&ids)
                    .map(|(s, r)| last_non_pad(self.pad_token_id, s, r))
                    .collect();
                let x = at(&rows)?;
                let mut y = x
                    .matmul(&weight.t().ctx(|| "score".into())?)
                    .ctx(|| "score head".into())?;
                if let Some(b) = bias {
                    y = y.broadcast_add(b).ctx(|| "score bias".into())?;
                }
                y
            }
            Head::ArmoRm(a) => {
                let reward_rows: Vec<usize> = ids
                    .iter()
                    .map(|r| match self.pad_token_id {
                        // ArmoRM's own rule: one before the first pad token, wrapping to the end.
                        Some(p) => {
                            let first = r.iter().position(|&t| t == p).unwrap_or(0);
                            (first + r.len() - 1) % r.len()
                        }
                        None => r.len() - 1,
                    })
                    .collect();
                let gate_rows = seqs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        find_last(s, &a.pattern).ok_or_else(|| {
                            ModelError::Invalid(format!(
                                "sequence {i}: no `{}` to gate on (ArmoRM reads the last assistant header)",
                                ARMO_GATE_TEXT.escape_debug()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                a.score(&at(&reward_rows)?, &at(&gate_rows)?)
                    .ctx(|| "ArmoRM head".into())?
            }
        };
        out.to_dtype(DType::F32)
            .and_then(|t| t.to_vec2::<f32>())
            .ctx(|| "reading scores".into())
    }

    /// Scores (first logit) of whole conversations, chat-templated as transformers'
    /// `apply_chat_template` renders and tokenises them, in batches of `batch`.
    pub fn score_conversations(
        &self,
        ck: &Checkpoint,
        conversations: &[Value],
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let template = ck.template()?;
        let tok = ck.tokenizer()?;
        let context = self.decoder.config.max_position_embeddings;
        let mut seqs = Vec::with_capacity(conversations.len());
        for (i, c) in conversations.iter().enumerate() {
            let text = template.render(c, false, &Value::Null)?;
            let ids = tok
                .encode(text.as_str(), false)
                .map_err(|e| ModelError::Invalid(format!("conversation {i}: tokenising: {e}")))?
                .get_ids()
                .to_vec();
            if ids.len() > context {
                return Err(ModelError::Invalid(format!(
                    "conversation {i} has {} tokens, more than the reward model's context {context}",
                    ids.len()
                )));
            }
            seqs.push(ids);
        }
        // Similar lengths together waste less padding; results go back in input order.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| (seqs[i].len(), i));
        let mut out = vec![Vec::new(); seqs.len()];
        let mut done = 0;
        for group in order.chunks(batch.max(1)) {
            let rows: Vec<Vec<u32>> = group.iter().map(|&i| seqs[i].clone()).collect();
            for (&i, s) in group.iter().zip(self.score_ids(&rows)?) {
                out[i] = s;
            }
            done += group.len();
            progress(done);
        }
        Ok(out)
    }
}

impl ArmoHead {
    fn score(&self, at_reward: &Tensor, at_gate: &Tensor) -> candle_core::Result<Tensor> {
        let rewards = at_reward.matmul(&self.regression.t()?)?;
        let mut x = at_gate.clone();
        let last = self.gating.len() - 1;
        for (i, (w, b)) in self.gating.iter().enumerate() {
            x = x.matmul(&w.t()?)?;
            if let Some(b) = b {
                x = x.broadcast_add(b)?;
            }
            if i < last {
                x = x.relu()?;
            }
        }
        let gate =
            (candle_nn::ops::softmax(&(x / self.temperature)?, D::Minus1)? * self.logit_scale)?;
        let adjusted = rewards.matmul(&self.transform)?;
        (gate * adjusted)?.sum_keepdim(D::Minus1)
    }
}

/// transformers' `last_non_pad_token`: the rightmost position of the padded row whose id is not the
/// pad id (position 0 when every id is), or the sequence's last position when there is no pad id.
pub(crate) fn last_non_pad(pad_token_id: Option<u32>, seq: &[u32], padded: &[u32]) -> usize {
    match pad_token_id {
        Some(p) => padded.iter().rposition(|&t| t != p).unwrap_or(0),
        None => seq.len() - 1,
    }
}

/// Start of the last occurrence of `pattern` in `seq`.
fn find_last(seq: &[u32], pattern: &[u32]) -> Option<usize> {
    if pattern.is_empty() || pattern.len() > seq.len() {
        return None;
    }
    (0..=seq.len() - pattern.len())
        .rev()
        .find(|&j| &seq[j..j + pattern.len()] == pattern)
}

fn weights_blame(dir: &Path) -> PathBuf {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        index
    } else {
        dir.join("model.safetensors")
    }
}

#[cfg(test)]
mod tests;
