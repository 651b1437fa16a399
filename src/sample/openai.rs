//! Sampling through any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp's
//! server, TGI, `transformers serve`): concurrent requests, retries with exponential backoff on
//! connection errors, timeouts, 429 and 5xx, and a request cache keyed by everything that decides an
//! answer, so a re-run never pays twice. Each sample sends its own seed (from (seed, prompt id,
//! source, index), as local sampling), which servers that honour `seed` make reproducible.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::job::SourceSpec;
use super::sample_seed;
use crate::data::{Prompt, Sample};

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url}: HTTP {status} after {attempts} attempts: {body}")]
    Status {
        url: String,
        status: u16,
        attempts: u32,
        body: String,
    },
    #[error("{url}: not a chat completion ({reason}): {body}")]
    Garbage {
        url: String,
        reason: String,
        body: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where and how to ask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Base URL up to and including `/v1`.
    pub base_url: String,
    /// The `model` field of each request.
    pub model: String,
    /// Sent as a bearer token when set (from `OPENAI_API_KEY` at the CLI).
    #[serde(skip)]
    pub api_key: Option<String>,
    pub timeout_s: f64,
    /// Attempts after the first for retryable failures.
    pub retries: u32,
    /// Requests in flight at once.
    pub concurrency: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EndpointStats {
    pub requests: u64,
    pub cache_hits: u64,
    pub retries: u64,
    pub completion_tokens: u64,
}

#[derive(Serialize, Deserialize)]
struct Cached {
    text: String,
    finish: String,
    tokens: u32,
}

pub(crate) fn snippet(s: &str) -> String {
    let mut t: String = s.chars().take(300).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    t
}

impl Endpoint {
    pub(crate) fn url(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }

    /// The request body for one sample.
    fn body(&self, p: &Prompt, spec: &SourceSpec, seed: u64) -> Value {
        let s = &spec.sampling;
        let mut b = json!({
            "model": self.model,
            "messages": p.messages,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": seed,
            "n": 1,
        });
        if !s.stop_strings.is_empty() {
            b["stop"] = json!(s.stop_strings);
        }
        // Not in OpenAI's API; vLLM, SGLang and llama.cpp's server read them.
        if s.top_k > 0 {
            b["top_k"] = json!(s.top_k);
        }
        if s.repetition_penalty != 1.0 {
            b["repetition_penalty"] = json!(s.repetition_penalty);
        }
        b
    }

    /// One chat completion, retried with backoff on failures that may pass.
    fn complete(
        &self,
        agent: &ureq::Agent,
        body: &Value,
        retries: &AtomicU64,
    ) -> Result<Cached, EndpointError> {
        let text = self.post(agent, body, retries)?;
        parse(&self.url(), &text)
    }

    /// POST one chat-completions body and return the 200 response's text; 429, 5xx and connection
    /// errors are retried with exponential backoff, other statuses fail at once.
    pub(crate) fn post(
        &self,
        agent: &ureq::Agent,
        body: &Value,
        retries: &AtomicU64,
    ) -> Result<String, EndpointError> {
        let url = self.url();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = agent.post(&url).header("Content-Type", "application/json");
            if let Some(k) = &self.api_key {
                req = req.header("Authorization", &format!("Bearer {k}"));
            }
            let outcome = req.send(serde_json::to_vec(body).expect("serialises").as_slice());
            let retryable = match outcome {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let text =
                        resp.body_mut()
                            .read_to_string()
                            .map_err(|e| EndpointError::Request {
                                url: url.clone(),
                                reason: format!("reading the response: {e}"),
                            })?;
                    if status == 200 {
                        return Ok(text);
                    }
                    if status == 429 || status >= 500 {
                        Err(EndpointError::Status {
                            url: url.clone(),
                            status,
                            attempts: attempt,
                            body: snippet(&text),
                        })
                    } else {
                        return Err(EndpointError::Status {
                            url: url.clone(),
                            status,
                            attempts: attempt,
                            body: snippet(&text),
                        });
                    }
                }
                Err(e) => Err(EndpointError::Request {
                    url: url.clone(),
                    reason: e.to_string(),
                }),
            };
            if attempt > self.retries {
                return retryable;
            }
            retries.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(
                (250u64 << (attempt - 1).min(6)).min(8000),
            ));
        }
    }
}

fn parse(url: &str, text: &str) -> Result<Cached, EndpointError> {
    let garbage = |reason: &str| EndpointError::Garbage {
        url: url.into(),
        reason: reason.into(),
        body: snippet(text),
    };
    let v: Value = serde_json::from_str(text).map_err(|_| garbage("not JSON"))?;
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| garbage("no `choices`"))?;
    let content = choice
        .pointer("/message/content")
        .and_then(Value::as_str)
        .ok_or_else(|| garbage("no `choices[0].message.content` string"))?;
    let finish = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("stop") => "stop_token",
        Some("length") => "length",
        Some(_) | None => "stop_token",
    };
    let tokens = v
        .pointer("/usage/completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0) as u32;
    Ok(Cached {
        text: content.to_string(),
        finish: finish.into(),
        tokens,
    })
}

/// The cache file of one request: blake3 over the endpoint's model name and the whole body (which
/// holds the messages, every sampling parameter and the sample's seed).
fn cache_path(dir: &Path, body: &Value) -> PathBuf {
    let key = blake3::hash(&crate::util::canonical_json(body)).to_hex();
    dir.join(&key[..2]).join(format!("{}.json", &key[2..]))
}

/// The HTTP agent every endpoint client uses: one global timeout per request, statuses as values.
pub(crate) fn agent(timeout_s: f64) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs_f64(timeout_s.max(0.001))))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Sample every prompt `spec.n_for(category)` times through `ep`, reading and filling the request
/// cache in `cache_dir`. `progress(samples done)`.
pub fn run(
    ep: &Endpoint,
    prompts: &[Prompt],
    spec: &SourceSpec,
    cache_dir: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Vec<Sample>, EndpointStats), EndpointError> {
    let mut work = Vec::new();
    for (pi, p) in prompts.iter().enumerate() {
        for i in 0..spec.n_for(p.category) {
            work.push((pi, i));
        }
    }
    let agent = agent(ep.timeout_s);
    let results: Vec<Mutex<Option<Cached>>> = work.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<EndpointError>> = Mutex::new(None);
    let (requests, hits, retries, done) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let one = |k: usize| -> Result<Cached, EndpointError> {
        let (pi, i) = work[k];
        let p = &prompts[pi];
        let seed = sample_seed(spec.sampling.seed, &p.id, &spec.name, i);
        let body = ep.body(p, spec, seed);
        let path = cache_path(cache_dir, &body);
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(c) = serde_json::from_str::<Cached>(&text) {
                hits.fetch_add(1, Ordering::SeqCst);
                return Ok(c);
            }
        }
        requests.fetch_add(1, Ordering::SeqCst);
        let c = ep.complete(&agent, &body, &retries)?;
        let bytes = serde_json::to_vec(&c).expect("serialises");
        crate::fs::write_durable(&path, &bytes).map_err(|source| EndpointError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(c)
    };
    let worker = || {
        while !failed.load(Ordering::SeqCst) {
            let k = next.fetch_add(1, Ordering::SeqCst);
            if k >= work.len() {
                break;
            }
            match one(k) {
                Ok(c) => {
                    *results[k].lock().expect("lock") = Some(c);
                    progress(done.fetch_add(1, Ordering::SeqCst) + 1);
                }
                Err(e) => {
                    failed.store(true, Ordering::SeqCst);
                    first_error.lock().expect("lock").get_or_insert(e);
                }
            }
        }
    };
    let worker = &worker;
    std::thread::scope(|s| {
        for _ in 0..ep.concurrency.clamp(1, work.len().max(1)) {
            s.spawn(worker);
        }
    });
    if let Some(e) = first_error.into_inner().expect("lock") {
        return Err(e);
    }
    let mut out = Vec::with_capacity(work.len());
    let mut stats = EndpointStats {
        requests: requests.load(Ordering::SeqCst),
        cache_hits: hits.load(Ordering::SeqCst),
        retries: retries.load(Ordering::SeqCst),
        completion_tokens: 0,
    };
    for ((pi, i), r) in work.iter().zip(results) {
        let c = r.into_inner().expect("lock").expect("every item finished");
        let p = &prompts[*pi];
        stats.completion_tokens += c.tokens as u64;
        out.push(Sample {
            prompt_id: p.id.clone(),
            source: spec.name.clone(),
            sample_index: *i,
            seed: sample_seed(spec.sampling.seed, &p.id, &spec.name, *i),
            text: c.text,
            tokens: c.tokens,
            finish: c.finish,
        });
    }
    Ok((out, stats))
}
