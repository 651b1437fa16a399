//! Reward-model training as TRL's `RewardTrainer` does it: each pair's prompt + chosen and prompt +
//! rejected conversations chat-templated and tokenised whole, right-padded with the pad token, the
//! `score` head read at the last non-pad token, and the Bradley-Terry loss
//! `-log sigmoid(r_chosen - r_rejected - margin)` (optional margin per row, optional reward
//! centring), on the shared trainer (checkpoints, resume, metrics). The backbone's gradient goes
//! through the hand-written backward ([`crate::model::TracedHidden`]).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde_json::Value;

use crate::model::{ChatTemplate, Decoder, Family, ModelConfig};
use crate::train::data::{read_rows, DataError};
use crate::train::objective::{log_sigmoid, mean_metrics, pad_with, Heads, MicroOut, Objective};
use crate::train::TrainError;

pub const SCORE: &str = "score.weight";

struct Pair {
    line: usize,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    margin: f64,
}

pub struct RewardObjective {
    pairs: Vec<Pair>,
    skipped: usize,
    pad_token_id: Option<u32>,
    center_rewards: Option<f64>,
}

fn candle<T>(r: candle_core::Result<T>, what: &str) -> Result<T, TrainError> {
    r.map_err(|source| {
        TrainError::Model(crate::model::ModelError::Candle {
            context: what.into(),
            source,
        })
    })
}

/// The `*ForSequenceClassification` class of a family.
pub fn classifier_architecture(f: Family) -> &'static str {
    match f {
        Family::Llama => "LlamaForSequenceClassification",
        Family::Qwen2 => "Qwen2ForSequenceClassification",
        Family::Mistral => "MistralForSequenceClassification",
        Family::Gemma2 => "Gemma2ForSequenceClassification",
    }
}

impl RewardObjective {
    /// Pairs from rows with `chosen` and `rejected` message lists (and an optional `prompt` list and
    /// `margin`). Pairs longer than `max_len` tokens are skipped and counted, as TRL filters them.
    pub fn load(
        path: &Path,
        template: &ChatTemplate,
        tok: &tokenizers::Tokenizer,
        max_len: usize,
        pad_token_id: Option<u32>,
        center_rewards: Option<f64>,
    ) -> Result<RewardObjective, TrainError> {
        let bad = |line: usize, reason: String| {
            TrainError::Data(DataError::Row {
                path: path.to_path_buf(),
                line,
                reason,
            })
        };
        let mut pairs = Vec::new();
        let mut skipped = 0;
        for row in read_rows(path)? {
            let v = &row.value;
            let list = |k: &str| -> Result<Vec<Value>, TrainError> {
                match v.get(k) {
                    None | Some(Value::Null) if k == "prompt" => Ok(vec![]),
                    Some(Value::Array(a)) if !a.is_empty() || k == "prompt" => Ok(a.clone()),
                    Some(Value::String(_)) => Err(bad(
                        row.line,
                        format!("`{k}` is plain text; reward training takes message lists"),
                    )),
                    _ => Err(bad(
                        row.line,
                        format!("`{k}` must be a non-empty message list"),
                    )),
                }
            };
            let prompt = list("prompt")?;
            let mut ids = Vec::new();
            for k in ["chosen", "rejected"] {
                let mut msgs = prompt.clone();
                msgs.extend(list(k)?);
                let text = template
                    .render(&Value::Array(msgs), false, &Value::Null)
                    .map_err(|e| bad(row.line, e.to_string()))?;
                let enc = tok
                    .encode(text.as_str(), false)
                    .map_err(|e| bad(row.line, format!("tokenising `{k}`: {e}")))?;
                ids.push(enc.get_ids().to_vec());
            }
            let margin = match v.get("margin") {
                None | Some(Value::Null) => 0.0,
                Some(m) => m
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| bad(row.line, "`margin` is not a finite number".into()))?,
            };
            if ids.iter().any(|x| x.len() > max_len) {
                skipped += 1;
                continue;
            }
            let rejected = ids.pop().expect("two");
            let chosen = ids.pop().expect("two");
            pairs.push(Pair {
                line: row.line,
                chosen,
                rejected,
                margin,
            });
        }
        if pairs.is_empty() {
            return Err(TrainError::Data(DataError::Empty {
                path: path.to_path_buf(),
                skipped,
            }));
        }
        Ok(RewardObjective {
            pairs,
            skipped,
            pad_token_id,
            center_rewards,
        })
    }

    /// Token ids of pair `i` (chosen, rejected), as TRL's tokenisation gives them.
    pub fn ids(&self, i: usize) -> (&[u32], &[u32]) {
        (&self.pairs[i].chosen, &self.pairs[i].rejected)
    }
}

impl Objective for RewardObjective {
    fn len(&self) -> usize {
        self.pairs.len()
    }
    fn line(&self, i: usize) -> usize {
        self.pairs[i].line
    }
    fn skipped(&self) -> usize {
        self.skipped
    }
    fn normaliser(&self, idx: &[usize]) -> f64 {
        idx.len() as f64
    }
    fn heads(&self, config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        vec![(SCORE.into(), vec![1, config.hidden_size])]
    }
    fn backbone_only(&self) -> bool {
        true
    }
    fn output_config(&self, raw: &mut Value) {
        let family = raw
            .get("model_type")
            .and_then(Value::as_str)
            .and_then(|t| match t {
                "llama" => Some(Family::Llama),
                "qwen2" => Some(Family::Qwen2),
                "mistral" => Some(Family::Mistral),
                "gemma2" => Some(Family::Gemma2),
                _ => None,
            });
        if let Some(f) = family {
            raw["architectures"] = serde_json::json!([classifier_architecture(f)]);
        }
        raw["num_labels"] = 1.into();
        raw["id2label"] = serde_json::json!({"0": "LABEL_0"});
        raw["label2id"] = serde_json::json!({"LABEL_0": 0});
        if let (Some(p), true) = (
            self.pad_token_id,
            raw.get("pad_token_id").is_none_or(Value::is_null),
        ) {
            raw["pad_token_id"] = p.into();
        }
    }
    fn micro_loss(
        &self,
        model: &Decoder,
        heads: &Heads,
        idx: &[usize],
        _step: usize,
        _total: usize,
        norm: f64,
    ) -> Result<MicroOut, TrainError> {
        let w = heads
            .get(SCORE)
            .ok_or_else(|| TrainError::Invalid("reward training without a score head".into()))?;
        let seqs: Vec<&[u32]> = idx
            .iter()
            .map(|&i| self.pairs[i].chosen.as_slice())
            .chain(idx.iter().map(|&i| self.pairs[i].rejected.as_slice()))
            .collect();
        let (n, m) = (seqs.len(), idx.len());
        let (ids, mask) = pad_with(&seqs, self.pad_token_id.unwrap_or(0));
        let width = ids[0].len();
        let rows: Vec<u32> = ids
            .iter()
            .zip(&seqs)
            .enumerate()
            .map(|(b, (r, s))| (b * width + super::last_non_pad(self.pad_token_id, s, r)) as u32)
            .collect();
        let traced = model.traced_hidden(&ids, &mask)?;
        let leaf = candle(Var::from_tensor(&traced.hidden), "hidden states")?;
        let margins: Vec<f64> = idx.iter().map(|&i| self.pairs[i].margin).collect();
        let dev = model.device().clone();
        let hidden = model.config.hidden_size;
        let go = || -> candle_core::Result<(Tensor, Vec<f64>)> {
            let flat = leaf.as_tensor().reshape((n * width, hidden))?;
            let at = flat.index_select(&Tensor::new(rows.as_slice(), &dev)?, 0)?;
            let r = at
                .matmul(&w.to_dtype(at.dtype())?.t()?)?
                .squeeze(1)?
                .to_dtype(DType::F64)?;
            let (rc, rr) = (r.narrow(0, 0, m)?, r.narrow(0, m, m)?);
            let z = ((&rc - &rr)? - Tensor::new(margins.as_slice(), &dev)?)?;
            let mut loss = (log_sigmoid(&z)?.neg()?.sum_all()? / norm)?;
            if let Some(c) = self.center_rewards {
                let centre = ((&rc + &rr)?.sqr()?.sum_all()? * (c / norm))?;
                loss = (loss + centre)?;
            }
            Ok((loss, r.detach().to_vec1::<f64>()?))
        };
        let (loss, r) = candle(go(), "reward loss")?;
        let mut sums = BTreeMap::new();
        let mut add = |k: &str, x: f64| *sums.entry(k.to_string()).or_insert(0.0) += x;
        for j in 0..m {
            let (c, rj) = (r[j], r[m + j]);
            add("rewards/chosen", c);
            add("rewards/rejected", rj);
            add("margin", c - rj);
            add("accuracy", (c > rj) as u8 as f64);
        }
        Ok(MicroOut {
            loss: candle(loss.to_dtype(DType::F32), "loss")?,
            tokens: seqs.iter().map(|s| s.len()).sum(),
            sums,
            traces: vec![],
            hidden_traces: vec![(leaf, traced)],
        })
    }
    fn finish_metrics(&self, sums: &BTreeMap<String, f64>, n: usize) -> BTreeMap<String, f64> {
        mean_metrics(sums, n)
    }
    fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"reward\0");
        h.update(&self.pad_token_id.map_or(u64::MAX, u64::from).to_le_bytes());
        h.update(&self.center_rewards.unwrap_or(f64::NAN).to_le_bytes());
        for p in &self.pairs {
            for s in [&p.chosen, &p.rejected] {
                h.update(&(s.len() as u64).to_le_bytes());
                for t in s {
                    h.update(&t.to_le_bytes());
                }
            }
            h.update(&p.margin.to_le_bytes());
        }
        h.finalize().to_hex().to_string()
    }
}

/// Share of pairs whose chosen answer the model scores higher.
pub fn pair_accuracy(scores: &[(f32, f32)]) -> f64 {
    if scores.is_empty() {
        return f64::NAN;
    }
    scores.iter().filter(|(c, r)| c > r).count() as f64 / scores.len() as f64
}
