//! Losses: SFT (mean negative log-likelihood of assistant tokens over the global batch, as transformers
//! averages labelled tokens) and the DPO family, with the metrics TRL logs.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::data::{read_rows, sft_messages, tokenize_pair, tokenize_sft, DataError, PairExample};
use super::TrainError;
use crate::model::{ChatTemplate, Decoder, ModelError, Traced};

pub struct MicroOut {
    /// Scalar; already divided by the step's normaliser, so micro-batch losses add up.
    pub loss: Tensor,
    pub tokens: usize,
    /// Per-example sums of metrics, averaged by `finish_metrics`.
    pub sums: BTreeMap<String, f64>,
    /// The log-probs the loss was built from, as autograd leaves, with the recorded forwards that
    /// carry their gradients on into the model's weights ([`Traced::backward`]).
    pub traces: Vec<(Var, Traced)>,
    /// The same for final hidden states (reward heads read them).
    pub hidden_traces: Vec<(Var, crate::model::TracedHidden)>,
}

/// Trainable tensors an objective adds beside the decoder, by Hugging Face name.
pub type Heads = BTreeMap<String, Tensor>;

/// Log-probs for a loss: a recorded forward whose output enters the (small) loss graph as a leaf.
fn traced_logprobs(
    model: &Decoder,
    ids: &[Vec<u32>],
    attn: &[Vec<u8>],
    traces: &mut Vec<(Var, Traced)>,
) -> Result<Tensor, TrainError> {
    let traced = model.traced_logprobs(ids, attn)?;
    let leaf = candle(Var::from_tensor(&traced.logps), "log-probs")?;
    let lp = leaf.as_tensor().clone();
    traces.push((leaf, traced));
    Ok(lp)
}

pub trait Objective {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The data file line an example came from (for errors).
    fn line(&self, i: usize) -> usize;
    /// Rows dropped while loading (reported, never silent).
    fn skipped(&self) -> usize;
    /// What the step's summed loss is divided by (label tokens for SFT, pairs for DPO).
    fn normaliser(&self, idx: &[usize]) -> f64;
    fn micro_loss(
        &self,
        model: &Decoder,
        heads: &Heads,
        idx: &[usize],
        step: usize,
        total: usize,
        norm: f64,
    ) -> Result<MicroOut, TrainError>;
    /// Trainable tensors outside the decoder (a reward model's `score` head) with their shapes:
    /// loaded from the starting checkpoint, else initialised as transformers does (N(0, 0.02)).
    fn heads(&self, _config: &crate::model::ModelConfig) -> Vec<(String, Vec<usize>)> {
        vec![]
    }
    /// The language-model head is unused (a reward model): the backbone is loaded and saved
    /// without it.
    fn backbone_only(&self) -> bool {
        false
    }
    /// Adapt the saved `config.json` (a reward model becomes `*ForSequenceClassification`).
    fn output_config(&self, _raw: &mut Value) {}
    fn finish_metrics(&self, sums: &BTreeMap<String, f64>, n: usize) -> BTreeMap<String, f64>;
    /// blake3 of everything that decides the loss of each example (tokens, labels, packing, loss
    /// settings): a resumed run must see the same, or it would continue a different run.
    fn fingerprint(&self) -> String;
}

fn hash_u32s(h: &mut blake3::Hasher, v: &[u32]) {
    h.update(&(v.len() as u64).to_le_bytes());
    for x in v {
        h.update(&x.to_le_bytes());
    }
}

fn hash_bytes(h: &mut blake3::Hasher, v: &[u8]) {
    h.update(&(v.len() as u64).to_le_bytes());
    h.update(v);
}

fn candle<T>(r: candle_core::Result<T>, what: &str) -> Result<T, TrainError> {
    r.map_err(|e| {
        TrainError::Model(ModelError::Candle {
            context: what.to_string(),
            source: e,
        })
    })
}

/// Right-pad sequences; returns ids and attention mask.
fn pad(seqs: &[&[u32]]) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    pad_with(seqs, 0)
}

/// Right-pad to the longest sequence with `value`; the mask marks the real tokens.
pub(crate) fn pad_with(seqs: &[&[u32]], value: u32) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let w = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let ids = seqs
        .iter()
        .map(|s| {
            let mut r = s.to_vec();
            r.resize(w, value);
            r
        })
        .collect();
    let mask = seqs
        .iter()
        .map(|s| {
            let mut r = vec![1u8; s.len()];
            r.resize(w, 0);
            r
        })
        .collect();
    (ids, mask)
}

pub struct SftObjective {
    pub(crate) examples: Vec<(usize, Vec<u32>, Vec<u8>)>,
    /// Per example, segment numbers 1, 2, ... of packed conversations (empty: not packed).
    segments: Vec<Vec<u8>>,
    skipped: usize,
}

impl SftObjective {
    /// Load and tokenise `path`. Rows that keep no assistant token within `max_len` are skipped and
    /// counted; malformed rows are errors naming the line.
    pub fn load(
        path: &Path,
        template: &ChatTemplate,
        tok: &tokenizers::Tokenizer,
        max_len: usize,
        extra: &Value,
    ) -> Result<SftObjective, TrainError> {
        let mut examples = Vec::new();
        let mut skipped = 0;
        let bound = super::data::row_byte_bound(tok, max_len);
        for row in read_rows(path)? {
            let mut msgs = sft_messages(path, &row)?;
            // Only the first --max-len tokens are kept: text far past them is cut before
            // tokenising, so one huge row costs what a row of --max-len tokens costs.
            super::data::cut_contents(&mut msgs, bound);
            let mut ex =
                tokenize_sft(template, tok, &msgs, extra).map_err(|source| DataError::Model {
                    path: path.to_path_buf(),
                    line: row.line,
                    source: Box::new(source),
                })?;
            ex.ids.truncate(max_len);
            ex.mask.truncate(max_len);
            if ex.ids.len() < 2 || ex.mask[1..].iter().all(|&m| m == 0) {
                skipped += 1;
                continue;
            }
            examples.push((row.line, ex.ids, ex.mask));
        }
        if examples.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                skipped,
            }
            .into());
        }
        Ok(SftObjective {
            segments: vec![Vec::new(); examples.len()],
            examples,
            skipped,
        })
    }
}

impl SftObjective {
    /// Pack conversations into rows of at most `max_len` tokens (best-fit decreasing, ties by
    /// data order, so the packing is deterministic). Each conversation keeps its own attention
    /// block and positions (see [`Decoder::forward`]); its first token is never a label, as it
    /// is not one unpacked. Returns the number of packed rows.
    pub fn pack(&mut self, max_len: usize) -> usize {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.examples[i].1.len()));
        // (free space, members)
        let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in order {
            let len = self.examples[i].1.len();
            let best = bins
                .iter_mut()
                .filter(|(free, m)| *free >= len && m.len() < u8::MAX as usize)
                .min_by_key(|(free, _)| *free);
            match best {
                Some((free, m)) => {
                    *free -= len;
                    m.push(i);
                }
                None => bins.push((max_len.saturating_sub(len), vec![i])),
            }
        }
        let old = std::mem::take(&mut self.examples);
        self.segments.clear();
        for (_, mut members) in bins {
            members.sort_unstable();
            let (mut ids, mut labels, mut segs) = (Vec::new(), Vec::new(), Vec::new());
            for (k, &i) in members.iter().enumerate() {
                let (_, x, m) = &old[i];
                ids.extend_from_slice(x);
                labels.push(0);
                labels.extend_from_slice(&m[1..]);
                segs.extend(std::iter::repeat_n(k as u8 + 1, x.len()));
            }
            self.examples.push((old[members[0]].0, ids, labels));
            self.segments.push(segs);
        }
        self.examples.len()
    }
}

impl Objective for SftObjective {
    fn len(&self) -> usize {
        self.examples.len()
    }
    fn line(&self, i: usize) -> usize {
        self.examples[i].0
    }
    fn skipped(&self) -> usize {
        self.skipped
    }
    fn normaliser(&self, idx: &[usize]) -> f64 {
        idx.iter()
            .map(|&i| {
                self.examples[i].2[1..]
                    .iter()
                    .map(|&m| m as usize)
                    .sum::<usize>()
            })
            .sum::<usize>() as f64
    }
    fn micro_loss(
        &self,
        model: &Decoder,
        _heads: &Heads,
        idx: &[usize],
        _step: usize,
        _total: usize,
        norm: f64,
    ) -> Result<MicroOut, TrainError> {
        let seqs: Vec<&[u32]> = idx.iter().map(|&i| self.examples[i].1.as_slice()).collect();
        let (ids, mut attn) = pad(&seqs);
        for (row, &i) in attn.iter_mut().zip(idx) {
            let segs = &self.segments[i];
            row[..segs.len()].copy_from_slice(segs);
        }
        let mut traces = Vec::new();
        let lp = traced_logprobs(model, &ids, &attn, &mut traces)?;
        let (b, t) = (ids.len(), ids[0].len());
        let mut m = Vec::with_capacity(b * (t - 1));
        for &i in idx {
            let mask = &self.examples[i].2;
            for j in 1..t {
                m.push(mask.get(j).copied().unwrap_or(0) as f32);
            }
        }
        let dev = model.device().clone();
        let loss = candle(
            (|| {
                let m = Tensor::from_vec(m, (b, t - 1), &dev)?.to_dtype(lp.dtype())?;
                ((lp * m)?.sum_all()?.neg()? / norm)?.to_dtype(DType::F32)
            })(),
            "SFT loss",
        )?;
        Ok(MicroOut {
            loss,
            tokens: seqs.iter().map(|s| s.len()).sum(),
            sums: BTreeMap::new(),
            traces,
            hidden_traces: vec![],
        })
    }
    fn finish_metrics(&self, _: &BTreeMap<String, f64>, _: usize) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"sft\0");
        for ((_, ids, labels), segs) in self.examples.iter().zip(&self.segments) {
            hash_u32s(&mut h, ids);
            hash_bytes(&mut h, labels);
            hash_bytes(&mut h, segs);
        }
        h.finalize().to_hex().to_string()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum DpoLoss {
    /// -log σ(β Δ) with optional label smoothing.
    Sigmoid { label_smoothing: f64 },
    /// Each log-ratio divided by its response length (Tulu 3's dpo_norm, TRL's sigmoid_norm).
    LnDpo,
    /// WRPO: the preferred reward blends the source-preferred and target-preferred answers.
    Wrpo {
        alpha: f64,
        /// α rises linearly from 0 over training when true, else stays constant.
        dynamic: bool,
        label_smoothing: f64,
    },
}

/// Reject DPO settings outside their meaning; each error names the flag.
pub fn validate_dpo(beta: f64, loss: &DpoLoss) -> Result<(), TrainError> {
    let bad = |flag: &str, why: String| Err(TrainError::Invalid(format!("--{flag}: {why}")));
    if !beta.is_finite() || beta <= 0.0 {
        return bad("beta", format!("{beta} must be finite and > 0"));
    }
    let smoothing = match loss {
        DpoLoss::Sigmoid { label_smoothing } => *label_smoothing,
        DpoLoss::Wrpo {
            alpha,
            label_smoothing,
            ..
        } => {
            if !(0.0..=1.0).contains(alpha) {
                return bad("alpha", format!("{alpha} is outside [0, 1]"));
            }
            *label_smoothing
        }
        DpoLoss::LnDpo => 0.0,
    };
    if !(0.0..0.5).contains(&smoothing) {
        return bad(
            "label-smoothing",
            format!("{smoothing} is outside [0, 0.5)"),
        );
    }
    Ok(())
}

pub struct DpoObjective {
    pub beta: f64,
    pub loss: DpoLoss,
    pairs: Vec<(usize, PairExample)>,
    /// Reference log-probs (chosen, rejected, target) per pair.
    reference: Vec<[f64; 3]>,
    skipped: usize,
}

/// Sequences of a pair: chosen, rejected, and the target-preferred answer for WRPO.
fn answers(p: &PairExample) -> Vec<&[u32]> {
    let mut v = vec![p.chosen.as_slice(), p.rejected.as_slice()];
    if let Some(t) = &p.chosen_target {
        v.push(t);
    }
    v
}

impl DpoObjective {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        path: &Path,
        template: &ChatTemplate,
        tok: &tokenizers::Tokenizer,
        max_len: usize,
        extra: &Value,
        beta: f64,
        loss: DpoLoss,
    ) -> Result<DpoObjective, TrainError> {
        validate_dpo(beta, &loss)?;
        let wrpo = matches!(loss, DpoLoss::Wrpo { .. });
        let mut pairs = Vec::new();
        let mut skipped = 0;
        let bound = super::data::row_byte_bound(tok, max_len);
        for mut row in read_rows(path)? {
            // A prompt with more content bytes than `bound` has more than --max-len tokens: it
            // would be skipped after tokenising, so skip it before. Answers past the bound are cut.
            if super::data::content_bytes(row.value.get("prompt")) > bound {
                skipped += 1;
                continue;
            }
            for field in ["chosen", "rejected", "chosen_target"] {
                if let Some(v) = row.value.get_mut(field) {
                    super::data::cut_contents(v, bound);
                }
            }
            let mut p = tokenize_pair(path, &row, template, tok, extra, wrpo)?;
            if p.prompt.len() + 1 > max_len {
                skipped += 1;
                continue;
            }
            let room = max_len - p.prompt.len();
            p.chosen.truncate(room);
            p.rejected.truncate(room);
            if let Some(t) = &mut p.chosen_target {
                t.truncate(room);
            }
            pairs.push((row.line, p));
        }
        if pairs.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                skipped,
            }
            .into());
        }
        Ok(DpoObjective {
            beta,
            loss,
            pairs,
            reference: Vec::new(),
            skipped,
        })
    }

    pub fn pairs(&self) -> impl Iterator<Item = &PairExample> {
        self.pairs.iter().map(|(_, p)| p)
    }

    /// Summed completion log-probs `[n_seq]` of every answer of the given pairs, in the order
    /// chosen..., rejected..., target... .
    /// With `traces`, the forward is recorded for the hand-written backward; without, it is a plain
    /// forward (the reference model).
    fn seq_logps(
        &self,
        model: &Decoder,
        idx: &[usize],
        traces: Option<&mut Vec<(Var, Traced)>>,
    ) -> Result<(Tensor, Vec<f64>), TrainError> {
        let k = if matches!(self.loss, DpoLoss::Wrpo { .. }) {
            3
        } else {
            2
        };
        let mut seqs: Vec<Vec<u32>> = Vec::new();
        let mut plen = Vec::new();
        let mut lens = Vec::new();
        for a in 0..k {
            for &i in idx {
                let p = &self.pairs[i].1;
                let ans = answers(p)[a];
                let mut s = p.prompt.clone();
                s.extend_from_slice(ans);
                plen.push(p.prompt.len());
                lens.push(ans.len() as f64);
                seqs.push(s);
            }
        }
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let (ids, attn) = pad(&refs);
        let lp = match traces {
            Some(tr) => traced_logprobs(model, &ids, &attn, tr)?,
            None => model.token_logprobs(&ids, &attn)?,
        };
        let t = ids[0].len();
        let mut m = Vec::with_capacity(seqs.len() * (t - 1));
        for (s, &pl) in seqs.iter().zip(&plen) {
            for j in 1..t {
                m.push((j >= pl && j < s.len()) as u8 as f32);
            }
        }
        let dev = model.device().clone();
        let sums = candle(
            (|| {
                let m = Tensor::from_vec(m, (seqs.len(), t - 1), &dev)?.to_dtype(lp.dtype())?;
                (lp * m)?.sum(1)
            })(),
            "completion log-probs",
        )?;
        Ok((sums, lens))
    }

    /// Compute the reference log-probs once (no gradients).
    pub fn compute_reference(&mut self, reference: &Decoder) -> Result<(), TrainError> {
        let n = self.pairs.len();
        let mut out = vec![[0.0; 3]; n];
        let all: Vec<usize> = (0..n).collect();
        for chunk in all.chunks(8) {
            let (s, _) = self.seq_logps(reference, chunk, None)?;
            let v: Vec<f64> = candle(
                s.to_dtype(DType::F64).and_then(|x| x.to_vec1()),
                "reference",
            )?;
            let m = chunk.len();
            for (j, &i) in chunk.iter().enumerate() {
                for a in 0..v.len() / m {
                    out[i][a] = v[a * m + j];
                }
            }
        }
        self.reference = out;
        Ok(())
    }

    pub fn reference(&self) -> &[[f64; 3]] {
        &self.reference
    }

    pub fn set_reference(&mut self, r: Vec<[f64; 3]>) -> Result<(), TrainError> {
        if r.len() != self.pairs.len() {
            return Err(TrainError::Invalid(format!(
                "reference log-probs cover {} pairs, the data has {}",
                r.len(),
                self.pairs.len()
            )));
        }
        self.reference = r;
        Ok(())
    }
}

/// log σ(x), stable and differentiable: min(x, 0) - log(1 + exp(-|x|)).
/// Per-example metric sums as means over `n` examples.
pub(crate) fn mean_metrics(sums: &BTreeMap<String, f64>, n: usize) -> BTreeMap<String, f64> {
    sums.iter()
        .map(|(k, v)| (k.clone(), v / n.max(1) as f64))
        .collect()
}

pub(crate) fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let zeros = x.zeros_like()?;
    x.minimum(&zeros)? - (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

impl Objective for DpoObjective {
    fn len(&self) -> usize {
        self.pairs.len()
    }
    fn line(&self, i: usize) -> usize {
        self.pairs[i].0
    }
    fn skipped(&self) -> usize {
        self.skipped
    }
    fn normaliser(&self, idx: &[usize]) -> f64 {
        idx.len() as f64
    }
    fn micro_loss(
        &self,
        model: &Decoder,
        _heads: &Heads,
        idx: &[usize],
        step: usize,
        total: usize,
        norm: f64,
    ) -> Result<MicroOut, TrainError> {
        if self.reference.len() != self.pairs.len() {
            return Err(TrainError::Invalid(
                "reference log-probs were not computed".into(),
            ));
        }
        let mut traces = Vec::new();
        let (logps, lens) = self.seq_logps(model, idx, Some(&mut traces))?;
        let m = idx.len();
        let dev = model.device().clone();
        let beta = self.beta;
        let refv = |a: usize| -> Vec<f64> { idx.iter().map(|&i| self.reference[i][a]).collect() };
        // (loss, chosen log-ratios, rejected log-ratios, chosen logps, rejected logps)
        type Parts = (Tensor, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);
        let go = || -> candle_core::Result<Parts> {
            let logps = logps.to_dtype(DType::F64)?;
            let part = |a: usize| logps.narrow(0, a * m, m);
            let (pc, pr) = (part(0)?, part(1)?);
            let rc = Tensor::new(refv(0).as_slice(), &dev)?;
            let rr = Tensor::new(refv(1).as_slice(), &dev)?;
            let lc = (&pc - &rc)?;
            let lr = (&pr - &rr)?;
            let (delta, ls) = match &self.loss {
                DpoLoss::Sigmoid { label_smoothing } => ((&lc - &lr)?, *label_smoothing),
                DpoLoss::LnDpo => {
                    let len_c = Tensor::new(&lens[..m], &dev)?;
                    let len_r = Tensor::new(&lens[m..2 * m], &dev)?;
                    (((&lc / len_c)? - (&lr / len_r)?)?, 0.0)
                }
                DpoLoss::Wrpo {
                    alpha,
                    dynamic,
                    label_smoothing,
                } => {
                    let a = if *dynamic {
                        alpha * step as f64 / total.max(1) as f64
                    } else {
                        *alpha
                    };
                    let pt = part(2)?;
                    let rt = Tensor::new(refv(2).as_slice(), &dev)?;
                    let lt = (&pt - &rt)?;
                    let rw = ((&lc * a)? + (lt * (1.0 - a))?)?;
                    ((rw - &lr)?, *label_smoothing)
                }
            };
            let z = (&delta * beta)?;
            let mut per = (log_sigmoid(&z)? * -(1.0 - ls))?;
            if ls > 0.0 {
                per = (per - (log_sigmoid(&z.neg()?)? * ls)?)?;
            }
            let loss = (per.sum_all()? / norm)?;
            let v = |t: &Tensor| t.detach().to_vec1::<f64>();
            Ok((loss, v(&lc)?, v(&lr)?, v(&pc)?, v(&pr)?))
        };
        let (loss, lc, lr, pc, pr) = candle(go(), "DPO loss")?;
        let mut sums = BTreeMap::new();
        let mut add = |k: &str, x: f64| *sums.entry(k.to_string()).or_insert(0.0) += x;
        for j in 0..m {
            let (c, r) = (beta * lc[j], beta * lr[j]);
            add("rewards/chosen", c);
            add("rewards/rejected", r);
            add("rewards/margins", c - r);
            add("rewards/accuracies", (c > r) as u8 as f64);
            add("logps/chosen", pc[j]);
            add("logps/rejected", pr[j]);
        }
        let tokens = idx
            .iter()
            .map(|&i| {
                let p = &self.pairs[i].1;
                answers(p)
                    .iter()
                    .map(|a| p.prompt.len() + a.len())
                    .sum::<usize>()
            })
            .sum();
        Ok(MicroOut {
            loss: candle(loss.to_dtype(DType::F32), "loss")?,
            tokens,
            sums,
            traces,
            hidden_traces: vec![],
        })
    }
    fn finish_metrics(&self, sums: &BTreeMap<String, f64>, n: usize) -> BTreeMap<String, f64> {
        mean_metrics(sums, n)
    }
    fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"dpo\0");
        h.update(&self.beta.to_le_bytes());
        hash_bytes(
            &mut h,
            serde_json::to_string(&self.loss)
                .unwrap_or_default()
                .as_bytes(),
        );
        for (_, p) in &self.pairs {
            hash_u32s(&mut h, &p.prompt);
            for a in answers(p) {
                hash_u32s(&mut h, a);
            }
        }
        for r in &self.reference {
            for x in r {
                h.update(&x.to_le_bytes());
            }
        }
        h.finalize().to_hex().to_string()
    }
}
