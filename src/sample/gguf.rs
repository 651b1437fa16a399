//! GGUF sources (llama.cpp's file format, how most people hold 70B-class models locally) on
//! candle-transformers' quantized Llama and Qwen2 models. Everything a source needs comes from the
//! file: the weights in any of llama.cpp's block formats, the byte-level BPE tokenizer rebuilt from
//! `tokenizer.ggml.*`, the chat template and the stop tokens. The N samples of a prompt decode
//! together as one batch; each draws from the same random stream as on the local backend.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::{check_end, finish, logit_rows, start_slot, Answer, Request, Stats};
use crate::generate::{pick, FinishReason, SamplingParams};
use crate::model::{CandleContext, ChatTemplate, ModelError};

/// The architectures this backend runs (`general.architecture`; Mistral's files say `llama`).
pub const ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) and the split patterns of the models
/// they stand for (from each model's tokenizer.json); `ignore_merges` as llama.cpp sets it.
const PRE_TOKENIZERS: &[(&str, &str, bool)] = &[
    (
        "llama-bpe",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        true,
    ),
    (
        "qwen2",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        false,
    ),
    (
        "default",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        false,
    ),
    (
        "gpt-2",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        false,
    ),
];

enum Weights {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

impl Weights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Llama(m) => m.forward(x, pos),
            Weights::Qwen2(m) => m.forward(x, pos),
        }
    }
}

/// A loaded GGUF file.
pub struct GgufModel {
    pub path: PathBuf,
    pub architecture: String,
    /// Weights not in use by a worker (each decoding worker needs its own KV cache, which the
    /// quantized models keep inside the weights); a worker that finds none reads the file again.
    pool: Mutex<Vec<Weights>>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// End-of-sequence and end-of-turn tokens: generation stops at any of them.
    pub stop_token_ids: Vec<u32>,
    pub context: usize,
    /// Whether a prompt can be prefilled for several rows in one pass. candle-transformers'
    /// quantized models read the last position of a batch of prompts as a strided view, which
    /// their quantized output matmul rejects ("input tensor is not contiguous"); with a block-
    /// quantized output matrix the rows are prefilled a position at a time instead.
    batched_prefill: bool,
    /// What this backend does not reproduce of the file (the caller shows them).
    pub warnings: Vec<String>,
    device: Device,
}

fn bad(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn md<'a>(c: &'a Content, path: &Path, key: &str) -> Result<&'a Value, ModelError> {
    c.metadata
        .get(key)
        .ok_or_else(|| bad(path, format!("metadata key `{key}` is missing")))
}

fn md_u32(c: &Content, path: &Path, key: &str) -> Result<u32, ModelError> {
    let v = md(c, path, key)?;
    v.to_u32()
        .or_else(|_| v.to_i32().map(|x| x as u32))
        .or_else(|_| v.to_u64().map(|x| x as u32))
        .map_err(|e| bad(path, format!("metadata key `{key}`: {e}")))
}

fn md_strings(c: &Content, path: &Path, key: &str) -> Result<Vec<String>, ModelError> {
    md(c, path, key)?
        .to_vec()
        .and_then(|v| v.iter().map(|x| x.to_string().cloned()).collect())
        .map_err(|e| bad(path, format!("metadata key `{key}`: {e}")))
}

impl GgufModel {
    /// Read `path`: metadata first (every unsupported feature is an error naming the file before
    /// any tensor is read), then the tensors onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<GgufModel, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let content = Content::read(&mut file)
            .map_err(|e| bad(path, format!("not a readable GGUF file: {e}")))?;
        let architecture = md(&content, path, "general.architecture")?
            .to_string()
            .map_err(|e| bad(path, format!("general.architecture: {e}")))?
            .clone();
        if !ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(bad(
                path,
                format!(
                    "architecture `{architecture}` is not supported by the GGUF backend (supported: {})",
                    ARCHITECTURES.join(", ")
                ),
            ));
        }
        let context = md_u32(&content, path, &format!("{architecture}.context_length"))? as usize;
        let tokenizer = tokenizer_from_metadata(&content, path)?;
        let token = |key: &str| -> Option<(u32, String)> {
            let id = md_u32(&content, path, key).ok()?;
            tokenizer.id_to_token(id).map(|t| (id, t))
        };
        let bos = token("tokenizer.ggml.bos_token_id");
        let eos = token("tokenizer.ggml.eos_token_id");
        let mut stop_token_ids: Vec<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| token(k).map(|t| t.0))
        .collect();
        stop_token_ids.dedup();
        let source = md(&content, path, "tokenizer.chat_template")
            .map_err(|_| {
                bad(
                    path,
                    "no chat template (metadata key `tokenizer.chat_template`)",
                )
            })?
            .to_string()
            .map_err(|e| bad(path, format!("tokenizer.chat_template: {e}")))?
            .clone();
        let template = ChatTemplate::new(
            source,
            path.to_path_buf(),
            bos.map(|t| t.1),
            eos.map(|t| t.1),
        );
        let mut warnings = Vec::new();
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            warnings.push(format!(
                "{}: the file carries `rope_freqs.weight` (Llama 3.1's long-context RoPE \
                 scaling); candle-transformers' quantized Llama does not apply it, so logits \
                 differ slightly from llama.cpp's",
                path.display()
            ));
        }
        let output = ["output.weight", "token_embd.weight"]
            .iter()
            .find_map(|n| content.tensor_infos.get(*n))
            .ok_or_else(|| bad(path, "no `output.weight` or `token_embd.weight` tensor"))?;
        let batched_prefill = matches!(
            output.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        let weights = read_weights(&architecture, content, &mut file, path, device)?;
        Ok(GgufModel {
            path: path.to_path_buf(),
            architecture,
            pool: Mutex::new(vec![weights]),
            tokenizer,
            template,
            stop_token_ids,
            context,
            batched_prefill,
            warnings,
            device: device.clone(),
        })
    }

    fn take_weights(&self) -> Result<Weights, ModelError> {
        if let Some(w) = self.pool.lock().expect("pool lock").pop() {
            return Ok(w);
        }
        let io = |source| ModelError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = std::fs::File::open(&self.path).map_err(io)?;
        let content = Content::read(&mut file)
            .map_err(|e| bad(&self.path, format!("not a readable GGUF file: {e}")))?;
        read_weights(
            &self.architecture,
            content,
            &mut file,
            &self.path,
            &self.device,
        )
    }

    /// The file's blake3 digest: what a sample chunk's name depends on.
    pub fn identity(&self) -> Result<String, ModelError> {
        let mut h = blake3::Hasher::new();
        h.update(b"fuselab-gguf-v1");
        h.update_mmap_rayon(&self.path)
            .map_err(|source| ModelError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(h.finalize().to_hex().to_string())
    }
}

fn read_weights(
    architecture: &str,
    content: Content,
    file: &mut std::fs::File,
    path: &Path,
    device: &Device,
) -> Result<Weights, ModelError> {
    Ok(match architecture {
        "llama" => Weights::Llama(
            quantized_llama::ModelWeights::from_gguf(content, file, device)
                .ctx(|| format!("{}: loading the Llama weights", path.display()))?,
        ),
        _ => Weights::Qwen2(
            quantized_qwen2::ModelWeights::from_gguf(content, file, device)
                .ctx(|| format!("{}: loading the Qwen2 weights", path.display()))?,
        ),
    })
}

/// The byte-level BPE of a `gpt2`-model tokenizer (Llama 3, Qwen2, GPT-2 vocabularies): tokens
/// and merges from the file, the split pattern of its `tokenizer.ggml.pre`, and its control and
/// user-defined tokens matched whole before BPE, as in the model's own tokenizer.json.
fn tokenizer_from_metadata(c: &Content, path: &Path) -> Result<Tokenizer, ModelError> {
    let tok_err = |reason: String| ModelError::Tokenizer {
        path: path.to_path_buf(),
        reason,
    };
    let model = md(c, path, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| tok_err(format!("tokenizer.ggml.model: {e}")))?;
    if model != "gpt2" {
        return Err(tok_err(format!(
            "tokenizer model `{model}` is not supported by the GGUF backend (supported: gpt2, \
             the byte-level BPE of Llama 3 and Qwen2)"
        )));
    }
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let Some(&(_, pattern, ignore_merges)) = PRE_TOKENIZERS.iter().find(|p| p.0 == pre) else {
        return Err(tok_err(format!(
            "pre-tokenizer `{pre}` is not supported by the GGUF backend (supported: {})",
            PRE_TOKENIZERS
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let tokens = md_strings(c, path, "tokenizer.ggml.tokens")?;
    let merges = md_strings(c, path, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .and_then(|v| v.iter().map(|x| x.to_i32()).collect())
            .map_err(|e| tok_err(format!("tokenizer.ggml.token_type: {e}")))?,
        None => Vec::new(),
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| tok_err(format!("merge {i} `{m}` is not two tokens")))?;
        pairs.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| tok_err(format!("building the BPE: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(pattern.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tok_err(format!("pre-tokenizer pattern: {e}")))?;
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]))));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    // llama.cpp's token types: 3 control, 4 user-defined; both are matched as whole tokens.
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(&special);
    Ok(tok)
}

impl super::Sampler for GgufModel {
    /// Each prompt's samples (at most `slots` at a time) decode as one batch from a batched
    /// prefill of the prompt: the quantized models keep one KV cache for the whole batch, so rows
    /// cannot join or leave it; a finished row rides along until the batch ends.
    fn sample(
        &self,
        requests: &[Request],
        source: &str,
        params: &SamplingParams,
        slots: usize,
        decode: &dyn Fn(&[u32]) -> String,
        on_done: &mut dyn FnMut(u64, u64),
    ) -> Result<(Vec<Answer>, Stats), ModelError> {
        params.validate()?;
        let slots = slots.max(1);
        let mut weights = self.take_weights()?;
        let out = self.sample_with(
            &mut weights,
            requests,
            source,
            params,
            slots,
            decode,
            on_done,
        );
        self.pool.lock().expect("pool lock").push(weights);
        out
    }
}

impl GgufModel {
    #[allow(clippy::too_many_arguments)]
    fn sample_with(
        &self,
        weights: &mut Weights,
        requests: &[Request],
        source: &str,
        params: &SamplingParams,
        slots: usize,
        decode: &dyn Fn(&[u32]) -> String,
        on_done: &mut dyn FnMut(u64, u64),
    ) -> Result<(Vec<Answer>, Stats), ModelError> {
        let mut stats = Stats::default();
        let mut done: Vec<Answer> = Vec::new();
        for (r, req) in requests.iter().enumerate() {
            if req.tokens.is_empty() || req.tokens.len() >= self.context {
                return Err(ModelError::Invalid(format!(
                    "prompt `{}` has {} tokens; the model's context length is {}",
                    req.prompt_id,
                    req.tokens.len(),
                    self.context
                )));
            }
            let len = req.tokens.len();
            let mut first = 0u32;
            while first < req.n {
                let k = (req.n - first).min(slots as u32) as usize;
                let prefill = |w: &mut Weights, ids: &[u32], pos: usize| {
                    let width = ids.len() / k;
                    Tensor::from_vec(ids.to_vec(), (k, width), &self.device)
                        .and_then(|x| w.forward(&x, pos))
                        .ctx(|| format!("prefilling prompt `{}`", req.prompt_id))
                };
                let logits = if k == 1 || self.batched_prefill {
                    prefill(weights, &req.tokens.repeat(k), 0)?
                } else {
                    let mut last = None;
                    for (pos, &t) in req.tokens.iter().enumerate() {
                        last = Some(prefill(weights, &vec![t; k], pos)?);
                    }
                    last.expect("a prompt has tokens")
                };
                stats.prefill_tokens += (k * len) as u64;
                let rows = logit_rows(&logits)?;
                let mut batch: Vec<Option<super::Slot>> = rows
                    .iter()
                    .enumerate()
                    .map(|(j, row)| {
                        start_slot(
                            r,
                            req,
                            first + j as u32,
                            row,
                            &[],
                            params,
                            source,
                            self.context,
                            decode,
                            &mut done,
                            &mut stats,
                        )
                    })
                    .collect();
                let mut pos = len;
                while batch.iter().any(Option::is_some) {
                    let next: Vec<u32> = batch
                        .iter()
                        .map(|s| s.as_ref().map_or(0, |s| s.next))
                        .collect();
                    let x = Tensor::from_vec(next, (k, 1), &self.device)
                        .ctx(|| "decode tensor".into())?;
                    let logits = weights
                        .forward(&x, pos)
                        .ctx(|| format!("decoding prompt `{}`", req.prompt_id))?;
                    pos += 1;
                    stats.decode_steps += 1;
                    for (cell, mut row) in batch.iter_mut().zip(logit_rows(&logits)?) {
                        let Some(mut s) = cell.take() else { continue };
                        let seen: Vec<u32> = req.tokens.iter().chain(&s.out).copied().collect();
                        let tok = pick(&mut row, &seen, params, &mut s.rng);
                        s.next = tok;
                        if params.stop_token_ids.contains(&tok) {
                            finish(&mut done, s, FinishReason::StopToken);
                            continue;
                        }
                        s.out.push(tok);
                        stats.generated_tokens += 1;
                        match check_end(&s, params, self.context, decode) {
                            Some(f) => finish(&mut done, s, f),
                            None => *cell = Some(s),
                        }
                    }
                }
                first += k as u32;
                on_done(done.len() as u64, stats.generated_tokens);
            }
        }
        done.sort_by_key(|a| (a.request, a.sample_index));
        Ok((done, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    /// A GGUF file of metadata only (no tensors: the errors under test come before any is read).
    fn file_with(dir: &Path, meta: &[(&str, Value)]) -> PathBuf {
        let path = dir.join("m.gguf");
        let mut f = std::fs::File::create(&path).unwrap();
        let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut f, &refs, &[]).unwrap();
        path
    }

    fn err(path: &Path) -> String {
        match GgufModel::load(path, &Device::Cpu) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unsupported_files_are_named_with_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let s = |x: &str| Value::String(x.into());
        let p = file_with(dir.path(), &[("general.architecture", s("gemma2"))]);
        let e = err(&p);
        assert!(
            e.contains("m.gguf") && e.contains("architecture `gemma2` is not supported"),
            "{e}"
        );
        let p = file_with(
            dir.path(),
            &[
                ("general.architecture", s("llama")),
                ("llama.context_length", Value::U32(64)),
                ("tokenizer.ggml.model", s("llama")),
            ],
        );
        let e = err(&p);
        assert!(
            e.contains("tokenizer model `llama` is not supported"),
            "{e}"
        );
        let p = file_with(
            dir.path(),
            &[
                ("general.architecture", s("qwen2")),
                ("qwen2.context_length", Value::U32(64)),
                ("tokenizer.ggml.model", s("gpt2")),
                ("tokenizer.ggml.pre", s("deepseek-coder")),
            ],
        );
        let e = err(&p);
        assert!(
            e.contains("pre-tokenizer `deepseek-coder` is not supported"),
            "{e}"
        );
        let p = file_with(dir.path(), &[("general.architecture", s("llama"))]);
        assert!(err(&p).contains("`llama.context_length` is missing"));
        std::fs::write(dir.path().join("m.gguf"), b"GGUF but truncated").unwrap();
        assert!(err(&dir.path().join("m.gguf")).contains("not a readable GGUF file"));
    }

    #[test]
    fn tokenizer_from_metadata_matches_byte_level_bpe() {
        // A 6-token vocabulary with one merge and a control token matched whole.
        let s = |x: &str| Value::String(x.into());
        let arr = |xs: &[&str]| Value::Array(xs.iter().map(|x| s(x)).collect());
        let meta: Vec<(&str, Value)> = vec![
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s("qwen2")),
            (
                "tokenizer.ggml.tokens",
                arr(&["a", "b", "ab", "Ġ", "1", "<|end|>"]),
            ),
            ("tokenizer.ggml.merges", arr(&["a b"])),
            (
                "tokenizer.ggml.token_type",
                Value::Array([1, 1, 1, 1, 1, 3].iter().map(|&t| Value::I32(t)).collect()),
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), &meta);
        let mut f = std::fs::File::open(&path).unwrap();
        let content = Content::read(&mut f).unwrap();
        let tok = tokenizer_from_metadata(&content, &path).unwrap();
        let ids = tok
            .encode("ab a<|end|>1", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, vec![2, 3, 0, 5, 4]);
        assert_eq!(tok.decode(&[2, 3, 0], false).unwrap(), "ab a");
    }
}
