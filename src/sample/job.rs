//! A sampling job: one source answers a prompt set, N times per prompt by category. The prompts
//! are cut into chunks (the chunk size is a parameter); each finished chunk is written atomically
//! into the work dir under a name that carries a digest of everything that determines it, so a
//! killed job re-run finishes only the missing chunks, and a changed parameter never reuses a stale
//! one. Workers take chunks in any order, but the merged answers are in prompt order and do not
//! depend on the number of workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Request, Sampler};
use crate::data::{Category, Prompt, Sample};
use crate::generate::SamplingParams;
use crate::model::{ChatTemplate, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("prompt `{prompt}`: {source}")]
    Prompt {
        prompt: String,
        #[source]
        source: Box<ModelError>,
    },
    #[error("chunk {chunk}: {source}")]
    Chunk {
        chunk: usize,
        #[source]
        source: Box<ModelError>,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// What one source does: its sampling parameters (the seed is the base seed of every sample's
/// stream) and how many samples per prompt of each category.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceSpec {
    pub name: String,
    pub sampling: SamplingParams,
    pub samples_per_category: BTreeMap<Category, u32>,
}

impl SourceSpec {
    pub fn n_for(&self, c: Category) -> u32 {
        self.samples_per_category.get(&c).copied().unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOptions {
    /// Prompts per chunk: the unit of resumption.
    pub chunk_size: usize,
    /// Sequences decoding at once per worker.
    pub slots: usize,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct JobStats {
    pub chunks: usize,
    pub chunks_resumed: usize,
    pub samples: u64,
    pub prefill_tokens: u64,
    pub shared_prefix_tokens: u64,
    pub generated_tokens: u64,
}

/// The chat-templated, tokenised prompt (with the generation prompt; the template's own special
/// tokens are kept as written, so no second BOS is added).
pub fn prompt_tokens(
    template: &ChatTemplate,
    tok: &tokenizers::Tokenizer,
    p: &Prompt,
) -> Result<Vec<u32>, SampleError> {
    let err = |source| SampleError::Prompt {
        prompt: p.id.clone(),
        source: Box::new(source),
    };
    let msgs = serde_json::to_value(&p.messages).expect("messages serialise");
    let text = template
        .render(&msgs, true, &serde_json::Value::Null)
        .map_err(err)?;
    let enc = tok
        .encode(text.as_str(), false)
        .map_err(|e| err(ModelError::Invalid(format!("tokenising: {e}"))))?;
    Ok(enc.get_ids().to_vec())
}

fn chunk_key(model_id: &str, spec: &SourceSpec, opts: &JobOptions, reqs: &[Request]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"fuselab-sample-chunk-v1");
    h.update(model_id.as_bytes());
    h.update(&serde_json::to_vec(spec).expect("serialises"));
    h.update(&opts.slots.to_le_bytes());
    for r in reqs {
        h.update(&serde_json::to_vec(&(&r.prompt_id, &r.tokens, r.n)).expect("serialises"));
    }
    h.finalize().to_hex()[..16].to_string()
}

/// Everything a job needs from the model side.
pub struct Model<'a> {
    /// Our decoder, or a GGUF file's model.
    pub decoder: &'a dyn Sampler,
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub template: &'a ChatTemplate,
    /// Identifies the weights (e.g. [`crate::train::model_identity`]); part of every chunk's name.
    pub identity: String,
}

/// Sample `prompts` with `spec` into chunk files under `work_dir` using `workers` threads, and
/// return the merged samples. `progress(samples, generated tokens)` is called as work finishes.
pub fn run(
    model: &Model,
    prompts: &[Prompt],
    spec: &SourceSpec,
    opts: &JobOptions,
    workers: usize,
    work_dir: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(Vec<Sample>, JobStats), SampleError> {
    if opts.chunk_size == 0 || opts.slots == 0 {
        return Err(SampleError::Invalid(
            "chunk_size and slots must be at least 1".into(),
        ));
    }
    spec.sampling
        .validate()
        .map_err(|e| SampleError::Invalid(format!("source {}: {e}", spec.name)))?;
    let mut reqs = Vec::with_capacity(prompts.len());
    for p in prompts {
        reqs.push(Request {
            prompt_id: p.id.clone(),
            tokens: prompt_tokens(model.template, model.tokenizer, p)?,
            n: spec.n_for(p.category),
        });
    }
    let chunks: Vec<&[Request]> = reqs.chunks(opts.chunk_size).collect();
    let names: Vec<PathBuf> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            work_dir.join(format!(
                "chunk-{i:05}-{}.jsonl",
                chunk_key(&model.identity, spec, opts, c)
            ))
        })
        .collect();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SampleError::Io { path, source }
    };
    crate::fs::create_dir_all_durable(work_dir).map_err(io(work_dir))?;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<SampleError>> = Mutex::new(None);
    let samples_done = AtomicU64::new(0);
    let tokens_done = AtomicU64::new(0);
    let totals = Mutex::new(JobStats {
        chunks: chunks.len(),
        ..Default::default()
    });
    let decode = |ids: &[u32]| model.tokenizer.decode(ids, true).unwrap_or_default();
    let work = || {
        while !failed.load(Ordering::SeqCst) {
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= chunks.len() {
                break;
            }
            if let Ok(rows) = read_chunk(&names[i]) {
                samples_done.fetch_add(rows.len() as u64, Ordering::SeqCst);
                progress(
                    samples_done.load(Ordering::SeqCst),
                    tokens_done.load(Ordering::SeqCst),
                );
                totals.lock().expect("lock").chunks_resumed += 1;
                continue;
            }
            // `sample` reports its own running totals; the job's are their sum over chunks.
            let mut last = (0u64, 0u64);
            let mut report = |s: u64, t: u64| {
                let ds = samples_done.fetch_add(s - last.0, Ordering::SeqCst) + s - last.0;
                let dt = tokens_done.fetch_add(t - last.1, Ordering::SeqCst) + t - last.1;
                last = (s, t);
                progress(ds, dt);
            };
            let result = model.decoder.sample(
                chunks[i],
                &spec.name,
                &spec.sampling,
                opts.slots,
                &decode,
                &mut report,
            );
            let outcome = result
                .map_err(|source| SampleError::Chunk {
                    chunk: i,
                    source: Box::new(source),
                })
                .and_then(|(answers, stats)| {
                    let rows: Vec<Sample> = answers
                        .into_iter()
                        .map(|a| {
                            let mut text = decode(&a.tokens);
                            if let Some(cut) = spec
                                .sampling
                                .stop_strings
                                .iter()
                                .filter_map(|s| text.find(s.as_str()))
                                .min()
                            {
                                text.truncate(cut);
                            }
                            Sample {
                                prompt_id: chunks[i][a.request].prompt_id.clone(),
                                source: spec.name.clone(),
                                sample_index: a.sample_index,
                                seed: a.seed,
                                text,
                                tokens: a.tokens.len() as u32,
                                finish: finish_name(a.finish).into(),
                            }
                        })
                        .collect();
                    write_chunk(&names[i], &rows)?;
                    let mut t = totals.lock().expect("lock");
                    t.prefill_tokens += stats.prefill_tokens;
                    t.shared_prefix_tokens += stats.shared_prefix_tokens;
                    t.generated_tokens += stats.generated_tokens;
                    Ok(())
                });
            if let Err(e) = outcome {
                failed.store(true, Ordering::SeqCst);
                first_error.lock().expect("lock").get_or_insert(e);
            }
        }
    };
    let work = &work;
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, chunks.len().max(1)) {
            s.spawn(work);
        }
    });
    if let Some(e) = first_error.into_inner().expect("lock") {
        return Err(e);
    }
    let mut out = Vec::new();
    for n in &names {
        out.extend(read_chunk(n)?);
    }
    let mut stats = totals.into_inner().expect("lock");
    stats.samples = out.len() as u64;
    Ok((out, stats))
}

pub fn finish_name(f: crate::generate::FinishReason) -> &'static str {
    match f {
        crate::generate::FinishReason::StopToken => "stop_token",
        crate::generate::FinishReason::StopString => "stop_string",
        crate::generate::FinishReason::Length => "length",
    }
}

fn write_chunk(path: &Path, rows: &[Sample]) -> Result<(), SampleError> {
    let mut buf = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut buf, r).expect("serialises");
        buf.push(b'\n');
    }
    // A trailer line marks the chunk complete (a torn file, were the rename not atomic, or one
    // from an older layout, is recomputed instead of trusted).
    buf.extend_from_slice(format!("{{\"fuselab_chunk_rows\":{}}}\n", rows.len()).as_bytes());
    crate::fs::write_durable(path, &buf).map_err(|source| SampleError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_chunk(path: &Path) -> Result<Vec<Sample>, SampleError> {
    let bad = |why: String| SampleError::Invalid(format!("{}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|source| SampleError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut lines: Vec<&str> = text.lines().collect();
    let trailer: serde_json::Value = lines
        .pop()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| bad("no trailer".into()))?;
    let n = trailer
        .get("fuselab_chunk_rows")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("no trailer".into()))?;
    if n as usize != lines.len() {
        return Err(bad(format!("{} rows, trailer says {n}", lines.len())));
    }
    lines
        .iter()
        .map(|l| serde_json::from_str(l).map_err(|e| bad(e.to_string())))
        .collect()
}
