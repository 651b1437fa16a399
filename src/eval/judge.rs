//! Judges and their prompts. A judge is a backend that answers a chat (and, where it can, gives
//! the log-probabilities of chosen first tokens): any OpenAI-compatible endpoint, or a local
//! decoder. Every reply is cached under the store keyed by blake3 of (judge identity, messages,
//! settings), so a re-run or a report never asks twice and a result is reproducible from the
//! cache. A judge that fails on an item (server error after retries, garbage) does not stop the
//! run: the item is counted as unscored, with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::data::Message;
use crate::model::{ChatTemplate, Decoder, ModelError};
use crate::sample::openai::{self, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Prompt { path: PathBuf, msg: String },
}

/// One question to a judge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ask {
    pub messages: Vec<Message>,
    pub max_tokens: usize,
    /// Tokens whose log-probability at the first position is wanted (AlpacaEval's `m` / `M`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprob_tokens: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub text: String,
    /// First-token log-probabilities of the asked tokens that the judge reported.
    #[serde(default)]
    pub logprobs: BTreeMap<String, f64>,
}

pub trait Backend: Sync {
    /// What identifies the judge (model name / version or weights digest): part of every cache
    /// key and of the run record.
    fn identity(&self) -> Value;
    /// Err is the failure's message, shown with the unscored item.
    fn ask(&self, a: &Ask) -> Result<Reply, String>;
    fn concurrency(&self) -> usize {
        1
    }
    /// A reward model judges by scoring each (prompt, answer) conversation: its replies carry the
    /// score as `logprobs["reward"]`, and the asks are the conversations themselves.
    fn is_reward_model(&self) -> bool {
        false
    }
}

/// A reward model (`*ForSequenceClassification`, ArmoRM) as judge: the score of the whole
/// chat-templated conversation, read where transformers reads it.
pub struct RewardJudge<'a> {
    pub model: &'a crate::reward::RewardModel,
    pub checkpoint: &'a crate::model::Checkpoint,
    pub identity: String,
}

impl Backend for RewardJudge<'_> {
    fn identity(&self) -> Value {
        json!({"backend": "reward-model", "architecture": self.model.architecture, "weights": self.identity})
    }
    fn is_reward_model(&self) -> bool {
        true
    }
    fn ask(&self, a: &Ask) -> Result<Reply, String> {
        let conv = serde_json::to_value(&a.messages).expect("messages serialise");
        let s = self
            .model
            .score_conversations(self.checkpoint, &[conv], 1, &mut |_| {})
            .map_err(|e| e.to_string())?;
        let score = s
            .first()
            .and_then(|r| r.first())
            .copied()
            .ok_or("the reward model gave no score")?;
        Ok(Reply {
            text: String::new(),
            logprobs: [("reward".to_string(), score as f64)].into(),
        })
    }
}

/// A chat-completions endpoint (vLLM, SGLang, llama.cpp, TGI, OpenAI).
pub struct EndpointJudge {
    pub endpoint: Endpoint,
    agent: ureq::Agent,
}

impl EndpointJudge {
    pub fn new(endpoint: Endpoint) -> EndpointJudge {
        let agent = openai::agent(endpoint.timeout_s);
        EndpointJudge { endpoint, agent }
    }
}

impl Backend for EndpointJudge {
    fn identity(&self) -> Value {
        json!({"backend": "openai-compatible", "model": self.endpoint.model})
    }
    fn concurrency(&self) -> usize {
        self.endpoint.concurrency
    }
    fn ask(&self, a: &Ask) -> Result<Reply, String> {
        let mut body = json!({
            "model": self.endpoint.model,
            "messages": a.messages,
            "max_tokens": a.max_tokens,
            "temperature": 0.0,
            "n": 1,
        });
        if !a.logprob_tokens.is_empty() {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(5);
        }
        let retries = AtomicU64::new(0);
        let text = self
            .endpoint
            .post(&self.agent, &body, &retries)
            .map_err(|e| e.to_string())?;
        let garbage = |why: &str| {
            format!(
                "{}: not a chat completion ({why}): {}",
                self.endpoint.url(),
                openai::snippet(&text)
            )
        };
        let v: Value = serde_json::from_str(&text).map_err(|_| garbage("not JSON"))?;
        let content = v
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| garbage("no choices[0].message.content"))?;
        let mut logprobs = BTreeMap::new();
        if let Some(top) = v
            .pointer("/choices/0/logprobs/content/0/top_logprobs")
            .and_then(Value::as_array)
        {
            for t in top {
                if let (Some(tok), Some(lp)) = (
                    t.get("token").and_then(Value::as_str),
                    t.get("logprob").and_then(Value::as_f64),
                ) {
                    if a.logprob_tokens.iter().any(|x| x == tok) {
                        logprobs.insert(tok.to_string(), lp);
                    }
                }
            }
        }
        Ok(Reply {
            text: content.to_string(),
            logprobs,
        })
    }
}

/// A local decoder as judge: greedy text, and exact first-token log-probabilities from one
/// forward pass over the templated prompt.
pub struct LocalJudge<'a> {
    pub decoder: &'a Decoder,
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub template: &'a ChatTemplate,
    pub stop_token_ids: Vec<u32>,
    pub identity: String,
}

impl LocalJudge<'_> {
    fn prompt_ids(&self, a: &Ask) -> Result<Vec<u32>, String> {
        let msgs = serde_json::to_value(&a.messages).expect("messages serialise");
        let text = self
            .template
            .render(&msgs, true, &Value::Null)
            .map_err(|e| e.to_string())?;
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| format!("tokenising: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }
}

impl Backend for LocalJudge<'_> {
    fn identity(&self) -> Value {
        json!({"backend": "local", "weights": self.identity})
    }
    fn ask(&self, a: &Ask) -> Result<Reply, String> {
        let ids = self.prompt_ids(a)?;
        let params = crate::generate::SamplingParams {
            max_new_tokens: a.max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            stop_token_ids: self.stop_token_ids.clone(),
            stop_strings: vec![],
            seed: 0,
        };
        let decode = |t: &[u32]| self.tokenizer.decode(t, true).unwrap_or_default();
        let gen =
            crate::generate::generate(self.decoder, std::slice::from_ref(&ids), &params, &decode)
                .map_err(|e| e.to_string())?;
        let text = decode(&gen[0].tokens);
        let mut logprobs = BTreeMap::new();
        if !a.logprob_tokens.is_empty() {
            let mask = vec![1u8; ids.len()];
            let logits = self
                .decoder
                .forward(std::slice::from_ref(&ids), &[mask], None)
                .and_then(|l| {
                    let t = l.dim(1).map_err(|e| ModelError::Invalid(e.to_string()))?;
                    l.narrow(1, t - 1, 1)
                        .and_then(|x| x.flatten_all())
                        .and_then(|x| x.to_dtype(candle_core::DType::F32))
                        .and_then(|x| x.to_vec1::<f32>())
                        .map_err(|e| ModelError::Invalid(e.to_string()))
                })
                .map_err(|e| e.to_string())?;
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + logits
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            for tok in &a.logprob_tokens {
                let enc = self
                    .tokenizer
                    .encode(tok.as_str(), false)
                    .map_err(|e| format!("tokenising: {e}"))?;
                if let [id] = enc.get_ids() {
                    logprobs.insert(tok.clone(), logits[*id as usize] as f64 - lse);
                }
            }
        }
        Ok(Reply { text, logprobs })
    }
}

/// Counts of one judging pass, for the run record and the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeStats {
    pub asked: u64,
    pub cache_hits: u64,
    pub requests: u64,
    pub failed: u64,
}

fn cache_path(dir: &Path, identity: &Value, a: &Ask) -> PathBuf {
    let key = json!({"judge": identity, "ask": a, "fuselab_judge_cache": 1});
    let h = blake3::hash(&crate::util::canonical_json(&key)).to_hex();
    dir.join(&h[..2]).join(format!("{}.json", &h[2..]))
}

/// Ask every question (the backend's concurrency at a time), through the cache in `cache_dir`.
/// `progress(done)` after each.
pub fn ask_all(
    backend: &dyn Backend,
    asks: &[Ask],
    cache_dir: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Vec<Result<Reply, String>>, JudgeStats), JudgeError> {
    let identity = backend.identity();
    let results: Vec<Mutex<Option<Result<Reply, String>>>> =
        asks.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let (hits, requests, failed, done) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let io_error: Mutex<Option<JudgeError>> = Mutex::new(None);
    let worker = || loop {
        let k = next.fetch_add(1, Ordering::SeqCst);
        if k >= asks.len() || io_error.lock().expect("lock").is_some() {
            break;
        }
        let path = cache_path(cache_dir, &identity, &asks[k]);
        let cached = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Reply>(&b).ok());
        let r = match cached {
            Some(r) => {
                hits.fetch_add(1, Ordering::SeqCst);
                Ok(r)
            }
            None => {
                requests.fetch_add(1, Ordering::SeqCst);
                let r = backend.ask(&asks[k]);
                match &r {
                    Ok(reply) => {
                        let bytes = serde_json::to_vec(reply).expect("serialises");
                        if let Some(parent) = path.parent() {
                            if let Err(e) = std::fs::create_dir_all(parent) {
                                io_error
                                    .lock()
                                    .expect("lock")
                                    .get_or_insert(JudgeError::Io {
                                        path: parent.to_path_buf(),
                                        source: e,
                                    });
                            }
                        }
                        if let Err(e) = crate::fs::write_durable(&path, &bytes) {
                            io_error
                                .lock()
                                .expect("lock")
                                .get_or_insert(JudgeError::Io {
                                    path: path.clone(),
                                    source: e,
                                });
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                r
            }
        };
        *results[k].lock().expect("lock") = Some(r);
        progress(done.fetch_add(1, Ordering::SeqCst) + 1);
    };
    let worker = &worker;
    std::thread::scope(|s| {
        for _ in 0..backend.concurrency().clamp(1, asks.len().max(1)) {
            s.spawn(worker);
        }
    });
    if let Some(e) = io_error.into_inner().expect("lock") {
        return Err(e);
    }
    let stats = JudgeStats {
        asked: asks.len() as u64,
        cache_hits: hits.load(Ordering::SeqCst),
        requests: requests.load(Ordering::SeqCst),
        failed: failed.load(Ordering::SeqCst),
    };
    let out = results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .expect("lock")
                .expect("every question answered")
        })
        .collect();
    Ok((out, stats))
}

/// A judge prompt: system text and a user template with `{name}` placeholders, and the digest
/// of its text for the run record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub name: String,
    pub system: String,
    pub template: String,
    pub digest: String,
}

impl Prompt {
    fn new(name: &str, system: &str, template: &str) -> Prompt {
        let digest = blake3::hash(format!("{system}\u{0}{template}").as_bytes())
            .to_hex()
            .to_string();
        Prompt {
            name: name.into(),
            system: system.into(),
            template: template.into(),
            digest,
        }
    }

    /// Fill `{key}` placeholders in one pass (answers may themselves contain braces).
    pub fn render(&self, vars: &[(&str, &str)]) -> Vec<Message> {
        let fill = |t: &str| {
            let mut out = String::with_capacity(t.len());
            let mut rest = t;
            while let Some(i) = rest.find('{') {
                out.push_str(&rest[..i]);
                let after = &rest[i + 1..];
                match after.find('}').map(|j| (&after[..j], j)) {
                    Some((key, j)) if vars.iter().any(|(k, _)| *k == key) => {
                        out.push_str(vars.iter().find(|(k, _)| *k == key).unwrap().1);
                        rest = &after[j + 1..];
                    }
                    _ => {
                        out.push('{');
                        rest = after;
                    }
                }
            }
            out.push_str(rest);
            out
        };
        let mut m = Vec::new();
        if !self.system.is_empty() {
            m.push(Message {
                role: "system".into(),
                content: fill(&self.system),
            });
        }
        m.push(Message {
            role: "user".into(),
            content: fill(&self.template),
        });
        m
    }
}

/// AlpacaEval 2's judge prompt (`alpaca_eval_clf.txt`), split into its `<|im_start|>` messages.
pub fn alpaca_prompt(path: &Path) -> Result<Prompt, JudgeError> {
    let text = std::fs::read_to_string(path).map_err(|e| JudgeError::Io {
        path: path.into(),
        source: e,
    })?;
    let mut parts = BTreeMap::new();
    for block in text.split("<|im_start|>").skip(1) {
        let body = block.split("<|im_end|>").next().unwrap_or("");
        let (role, content) = body.split_once('\n').unwrap_or((body, ""));
        parts.insert(
            role.trim().to_string(),
            content.trim_end_matches('\n').to_string(),
        );
    }
    match (parts.get("system"), parts.get("user")) {
        (Some(s), Some(u)) => Ok(Prompt::new("alpaca_eval_clf", s, u)),
        _ => Err(JudgeError::Prompt {
            path: path.into(),
            msg: "expected a system and a user <|im_start|> block".into(),
        }),
    }
}

/// MT-Bench's judge prompts by name (`single-v1`, `single-math-v1`, and their `-multi-turn`).
pub fn mt_bench_prompts(path: &Path) -> Result<BTreeMap<String, Prompt>, JudgeError> {
    let text = std::fs::read_to_string(path).map_err(|e| JudgeError::Io {
        path: path.into(),
        source: e,
    })?;
    let mut out = BTreeMap::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(l).map_err(|e| JudgeError::Prompt {
            path: path.into(),
            msg: format!("line {}: {e}", i + 1),
        })?;
        let get = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        match (get("name"), get("system_prompt"), get("prompt_template")) {
            (Some(n), Some(s), Some(t)) => {
                out.insert(n.clone(), Prompt::new(&n, &s, &t));
            }
            _ => {
                return Err(JudgeError::Prompt {
                    path: path.into(),
                    msg: format!("line {}: needs name, system_prompt, prompt_template", i + 1),
                })
            }
        }
    }
    Ok(out)
}

/// The pairwise five-point prompt of our Arena-Hard-style benchmark (Arena-Hard's own judge prompt
/// is not shipped in any package here; this one asks for the same `[[A>>B]]` labels).
pub fn arena_prompt() -> Prompt {
    Prompt::new(
        "fuselab-arena-v1",
        "Please act as an impartial judge and evaluate the quality of the responses provided by two AI \
         assistants to the user prompt displayed below. First think about your own answer to the prompt, \
         then compare both assistants' answers with it: judge helpfulness, relevance, correctness and \
         concision, and do not let the order or the length of the answers influence you. After your \
         explanation, output exactly one final verdict label:\n\
         1. Assistant A is significantly better: [[A>>B]]\n\
         2. Assistant A is slightly better: [[A>B]]\n\
         3. Tie, relatively the same: [[A=B]]\n\
         4. Assistant B is slightly better: [[B>A]]\n\
         5. Assistant B is significantly better: [[B>>A]]\n\
         Example output: \"My final verdict is tie: [[A=B]]\".",
        "<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{answer_a}\n<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_b}\n<|The End of Assistant B's Answer|>",
    )
}

/// Whether an item's answer order is swapped for the judge: a fair coin fixed by (seed, item id).
pub fn swapped(seed: u64, item: &str) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(b"fuselab-judge-order-v1");
    h.update(&seed.to_le_bytes());
    h.update(item.as_bytes());
    h.finalize().as_bytes()[0] & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_fill_once_and_keep_other_braces() {
        let p = Prompt::new("t", "", "Q: {question}\nA: {answer} {unknown}");
        let m = p.render(&[("question", "x {answer} y"), ("answer", "{{ }}")]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].content, "Q: x {answer} y\nA: {{ }} {unknown}");
    }

    #[test]
    fn real_judge_prompts_load() {
        let data = crate::eval::bench::shared_data();
        let a = alpaca_prompt(&data.join("alpaca_eval/alpaca_eval_clf.txt")).unwrap();
        assert!(a.template.contains("{output_1}") && a.template.contains("{output_2}"));
        assert!(a.system.starts_with("You are a highly efficient assistant"));
        let mt = mt_bench_prompts(&data.join("mt_bench/judge_prompts.jsonl")).unwrap();
        for n in [
            "single-v1",
            "single-math-v1",
            "single-v1-multi-turn",
            "single-math-v1-multi-turn",
        ] {
            assert!(mt.contains_key(n), "{n}");
        }
        assert!(mt["single-math-v1"].template.contains("{ref_answer_1}"));
    }

    #[test]
    fn order_coin_is_fixed_and_fair() {
        let n = (0..1000)
            .filter(|i| swapped(3, &format!("item{i}")))
            .count();
        assert!((400..600).contains(&n), "{n}");
        assert_eq!(swapped(3, "a"), swapped(3, "a"));
    }
}
