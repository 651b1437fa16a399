//! Sampling many answers per prompt from a local decoder with continuous batching: a fixed number
//! of slots decode together; a finished sequence's slot takes the next waiting sample at once, and
//! the N samples of one prompt start from one prefill of it (its KV cache copied into N rows).
//! Each sample draws from its own random stream, fixed by (seed, prompt id, source, sample index),
//! so what a sample says does not depend on which others share its batch. `job` cuts a prompt set
//! into chunks that survive a kill and merges them; `gguf` runs the same on llama.cpp's files.

pub mod gguf;
pub mod job;
pub mod openai;

use candle_core::DType;
use rayon::prelude::*;

use crate::generate::{pick, FinishReason, Rng, SamplingParams};
use crate::model::{CandleContext, Decoder, KvCache, ModelError};

/// One prompt to answer `n` times.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt_id: String,
    pub tokens: Vec<u32>,
    pub n: u32,
}

/// One finished sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub request: usize,
    pub sample_index: u32,
    pub seed: u64,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// The seed of one sample's random stream.
pub fn sample_seed(seed: u64, prompt_id: &str, source: &str, index: u32) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"fuselab-sample-v1");
    h.update(&seed.to_le_bytes());
    for part in [prompt_id.as_bytes(), source.as_bytes()] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(&index.to_le_bytes());
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
}

struct Slot {
    request: usize,
    sample_index: u32,
    seed: u64,
    rng: Rng,
    prompt_len: usize,
    out: Vec<u32>,
    /// The token picked last, not yet in the cache.
    next: u32,
    mask: Vec<u8>,
}

/// A prompt whose prefill is done and whose samples are not all admitted yet.
struct Prefix {
    request: usize,
    cache: KvCache,
    logits: Vec<f32>,
    next_index: u32,
    /// The prompt's row mask in `cache` (left padding of its prefill batch as zeros).
    mask: Vec<u8>,
}

/// Statistics of one call, for the run record.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Prompt tokens run through the model (a shared prefix once).
    pub prefill_tokens: u64,
    /// Prompt tokens not recomputed because another prompt of their batch had the same prefix.
    pub shared_prefix_tokens: u64,
    pub generated_tokens: u64,
    pub decode_steps: u64,
}

fn logit_rows(logits: &candle_core::Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
    logits
        .to_dtype(DType::F32)
        .and_then(|x| x.to_vec2())
        .ctx(|| "reading logits".into())
}

/// What answers a chunk of requests: our decoder (continuous batching, shared prefill) or a GGUF
/// file's quantized model.
pub trait Sampler: Sync {
    /// Answer every request `n` times, at most `slots` sequences at once; answers in (request,
    /// sample index) order, each sample's stream fixed by [`sample_seed`].
    fn sample(
        &self,
        requests: &[Request],
        source: &str,
        params: &SamplingParams,
        slots: usize,
        decode: &dyn Fn(&[u32]) -> String,
        on_done: &mut dyn FnMut(u64, u64),
    ) -> Result<(Vec<Answer>, Stats), ModelError>;
}

impl Sampler for Decoder {
    fn sample(
        &self,
        requests: &[Request],
        source: &str,
        params: &SamplingParams,
        slots: usize,
        decode: &dyn Fn(&[u32]) -> String,
        on_done: &mut dyn FnMut(u64, u64),
    ) -> Result<(Vec<Answer>, Stats), ModelError> {
        sample(self, requests, source, params, slots, decode, on_done)
    }
}

/// Answer every request `n` times with at most `slots` sequences decoding at once. `params.seed`
/// is the base seed; `decode` turns tokens into text for stop strings; `on_done` is called with
/// (samples finished, tokens generated) so far. Answers come back in (request, sample index) order.
pub fn sample(
    model: &Decoder,
    requests: &[Request],
    source: &str,
    params: &SamplingParams,
    slots: usize,
    decode: &dyn Fn(&[u32]) -> String,
    on_done: &mut dyn FnMut(u64, u64),
) -> Result<(Vec<Answer>, Stats), ModelError> {
    params.validate()?;
    let slots = slots.max(1);
    let context = model.config.max_position_embeddings;
    for r in requests {
        if r.tokens.is_empty() {
            return Err(ModelError::Invalid(format!(
                "prompt `{}` has no tokens",
                r.prompt_id
            )));
        }
        if r.tokens.len() >= context {
            return Err(ModelError::Invalid(format!(
                "prompt `{}` has {} tokens; the model's context length is {context}",
                r.prompt_id,
                r.tokens.len()
            )));
        }
    }
    let mut stats = Stats::default();
    let mut done: Vec<Answer> = Vec::new();
    let mut active: Vec<Slot> = Vec::new();
    let mut cache = KvCache::new();
    let mut queue: std::collections::VecDeque<usize> =
        (0..requests.len()).filter(|&i| requests[i].n > 0).collect();
    let mut prefix: Option<Prefix> = None;
    let stops = |tok: u32| params.stop_token_ids.contains(&tok);
    loop {
        // Fill free slots: first the remaining samples of the current prefix, then new prompts,
        // as many as fit, prefilled together in one left-padded forward pass and admitted into
        // the running batch with one cache append.
        while active.len() < slots {
            let free = slots - active.len();
            let mut admitted: Vec<Slot> = Vec::new();
            // (cache holding the prompts' rows, row of each admitted slot in it)
            let (source_cache, rows_of): (KvCache, Vec<usize>);
            if let Some(p) = prefix.as_mut() {
                let req = &requests[p.request];
                let k = free.min((req.n - p.next_index) as usize);
                for _ in 0..k {
                    let index = p.next_index;
                    p.next_index += 1;
                    if let Some(slot) = start_slot(
                        p.request, req, index, &p.logits, &p.mask, params, source, context, decode,
                        &mut done, &mut stats,
                    ) {
                        admitted.push(slot);
                    }
                }
                source_cache = p.cache.clone();
                rows_of = vec![0; admitted.len()];
                if p.next_index == req.n {
                    prefix = None;
                }
            } else {
                let mut group = Vec::new();
                let mut total = 0usize;
                while let Some(&r) = queue.front() {
                    let n = requests[r].n as usize;
                    if !group.is_empty() && total + n > free {
                        break;
                    }
                    group.push(r);
                    total += n;
                    queue.pop_front();
                    if total >= free {
                        break;
                    }
                }
                if group.is_empty() {
                    break;
                }
                // Prompts that open alike (a chat template's system prompt, a few-shot preamble)
                // have that prefix prefilled once, its cache copied into every row; each row
                // then holds [shared prefix][left padding][its own rest].
                let prompts: Vec<&[u32]> = group
                    .iter()
                    .map(|&r| requests[r].tokens.as_slice())
                    .collect();
                let shared = shared_prefix(&prompts);
                let mut gc = KvCache::new();
                if shared > 0 {
                    model.hidden(
                        &[prompts[0][..shared].to_vec()],
                        &[vec![1u8; shared]],
                        Some(&mut gc),
                    )?;
                    gc = gc
                        .repeat_row(prompts.len())
                        .ctx(|| "copying a shared prefix".into())?;
                    stats.shared_prefix_tokens += (shared * (prompts.len() - 1)) as u64;
                }
                let width = prompts.iter().map(|t| t.len() - shared).max().unwrap_or(0);
                let ids: Vec<Vec<u32>> = prompts
                    .iter()
                    .map(|t| {
                        std::iter::repeat_n(0u32, width - (t.len() - shared))
                            .chain(t[shared..].iter().copied())
                            .collect()
                    })
                    .collect();
                let masks: Vec<Vec<u8>> = prompts
                    .iter()
                    .map(|t| {
                        let l = t.len() - shared;
                        std::iter::repeat_n(1u8, shared)
                            .chain(std::iter::repeat_n(0u8, width - l))
                            .chain(std::iter::repeat_n(1u8, l))
                            .collect()
                    })
                    .collect();
                let logits = model.last_logits(&ids, &masks, Some(&mut gc))?;
                stats.prefill_tokens +=
                    (shared + prompts.iter().map(|t| t.len() - shared).sum::<usize>()) as u64;
                let last = logit_rows(&logits)?;
                let mut rows = Vec::new();
                let mut left = free;
                for (gi, (&r, row)) in group.iter().zip(last).enumerate() {
                    let req = &requests[r];
                    let take = left.min(req.n as usize);
                    left -= take;
                    for index in 0..take as u32 {
                        if let Some(slot) = start_slot(
                            r, req, index, &row, &masks[gi], params, source, context, decode,
                            &mut done, &mut stats,
                        ) {
                            admitted.push(slot);
                            rows.push(gi);
                        }
                    }
                    if take < req.n as usize {
                        let mut one = gc.clone();
                        one.select_rows(&[gi]).ctx(|| "keeping a prefix".into())?;
                        prefix = Some(Prefix {
                            request: r,
                            cache: one,
                            logits: row,
                            next_index: take as u32,
                            mask: masks[gi].clone(),
                        });
                    }
                }
                source_cache = gc;
                rows_of = rows;
            }
            if !admitted.is_empty() {
                let mut rows = source_cache;
                rows.select_rows(&rows_of)
                    .ctx(|| "copying prefixes".into())?;
                let (pad_old, pad_new) =
                    cache.append_rows(rows).ctx(|| "admitting samples".into())?;
                for s in active.iter_mut() {
                    s.mask.splice(0..0, std::iter::repeat_n(0u8, pad_old));
                }
                for mut s in admitted {
                    s.mask.splice(0..0, std::iter::repeat_n(0u8, pad_new));
                    active.push(s);
                }
            }
        }
        on_done(done.len() as u64, stats.generated_tokens);
        if active.is_empty() {
            if prefix.is_none() && queue.is_empty() {
                break;
            }
            // Everything admitted this round finished at its first token; admit more.
            continue;
        }
        // One decode step for every active slot.
        let ids: Vec<Vec<u32>> = active.iter().map(|s| vec![s.next]).collect();
        for s in active.iter_mut() {
            s.mask.push(1);
        }
        let masks: Vec<Vec<u8>> = active.iter().map(|s| s.mask.clone()).collect();
        let logits = model.last_logits(&ids, &masks, Some(&mut cache))?;
        stats.decode_steps += 1;
        let rows = logit_rows(&logits)?;
        // Every slot draws from its own stream, so the draws run side by side (sorting and
        // exponentiating a vocabulary per slot was a sixth of a run on one core).
        let picked: Vec<u32> = active
            .par_iter_mut()
            .zip(rows.into_par_iter())
            .map(|(s, mut row)| {
                let seen: Vec<u32> = if params.repetition_penalty != 1.0 {
                    requests[s.request]
                        .tokens
                        .iter()
                        .chain(&s.out)
                        .copied()
                        .collect()
                } else {
                    Vec::new()
                };
                pick(&mut row, &seen, params, &mut s.rng)
            })
            .collect();
        let mut keep = Vec::with_capacity(active.len());
        let mut still = Vec::with_capacity(active.len());
        for (i, (mut s, tok)) in active.drain(..).zip(picked).enumerate() {
            s.next = tok;
            if stops(tok) {
                finish(&mut done, s, FinishReason::StopToken);
                continue;
            }
            s.out.push(tok);
            stats.generated_tokens += 1;
            match check_end(&s, params, context, decode) {
                Some(f) => finish(&mut done, s, f),
                None => {
                    keep.push(i);
                    still.push(s);
                }
            }
        }
        active = still;
        if keep.len() != masks.len() {
            cache
                .select_rows(&keep)
                .ctx(|| "dropping finished rows".into())?;
        }
        // Columns that are padding in every row can go.
        let lead = active
            .iter()
            .map(|s| s.mask.iter().take_while(|&&m| m == 0).count())
            .min()
            .unwrap_or(0);
        if lead > 0 {
            cache.trim_front(lead).ctx(|| "trimming the cache".into())?;
            for s in active.iter_mut() {
                s.mask.drain(..lead);
            }
        }
    }
    done.sort_by_key(|a| (a.request, a.sample_index));
    on_done(done.len() as u64, stats.generated_tokens);
    Ok((done, stats))
}

/// Below this many tokens a shared prefix is not worth its own forward pass.
const MIN_SHARED_PREFIX: usize = 8;

/// The length of the prefix every prompt of a batch of two or more starts with, leaving each at
/// least one token of its own (its last logits come from the batched pass); 0 when shorter than
/// [`MIN_SHARED_PREFIX`].
fn shared_prefix(prompts: &[&[u32]]) -> usize {
    let Some((first, rest)) = prompts.split_first() else {
        return 0;
    };
    if rest.is_empty() {
        return 0;
    }
    let cap = prompts.iter().map(|t| t.len() - 1).min().unwrap_or(0);
    let n = (0..cap)
        .take_while(|&i| rest.iter().all(|t| t[i] == first[i]))
        .count();
    if n >= MIN_SHARED_PREFIX {
        n
    } else {
        0
    }
}

/// A new sequence for sample `index` of request `r`, its first token picked from the prompt's last
/// logits; `None` when that token already ends it (the answer goes to `done`).
#[allow(clippy::too_many_arguments)]
fn start_slot(
    r: usize,
    req: &Request,
    index: u32,
    logits: &[f32],
    mask: &[u8],
    params: &SamplingParams,
    source: &str,
    context: usize,
    decode: &dyn Fn(&[u32]) -> String,
    done: &mut Vec<Answer>,
    stats: &mut Stats,
) -> Option<Slot> {
    let seed = sample_seed(params.seed, &req.prompt_id, source, index);
    let mut rng = Rng::new(seed, 0);
    let mut row = logits.to_vec();
    let tok = pick(&mut row, &req.tokens, params, &mut rng);
    let mut slot = Slot {
        request: r,
        sample_index: index,
        seed,
        rng,
        prompt_len: req.tokens.len(),
        out: Vec::new(),
        next: tok,
        mask: mask.to_vec(),
    };
    if params.max_new_tokens == 0 {
        finish(done, slot, FinishReason::Length);
        return None;
    }
    if params.stop_token_ids.contains(&tok) {
        finish(done, slot, FinishReason::StopToken);
        return None;
    }
    slot.out.push(tok);
    stats.generated_tokens += 1;
    match check_end(&slot, params, context, decode) {
        Some(f) => {
            finish(done, slot, f);
            None
        }
        None => Some(slot),
    }
}

fn finish(done: &mut Vec<Answer>, s: Slot, f: FinishReason) {
    done.push(Answer {
        request: s.request,
        sample_index: s.sample_index,
        seed: s.seed,
        tokens: s.out,
        finish: f,
    });
}

/// Length and stop-string ends, checked after a token is appended.
fn check_end(
    s: &Slot,
    p: &SamplingParams,
    context: usize,
    decode: &dyn Fn(&[u32]) -> String,
) -> Option<FinishReason> {
    if !p.stop_strings.is_empty() {
        let text = decode(&s.out);
        if p.stop_strings.iter().any(|x| text.contains(x.as_str())) {
            return Some(FinishReason::StopString);
        }
    }
    // The next step would feed the last token at position prompt_len + out.len() - 1.
    if s.out.len() >= p.max_new_tokens || s.prompt_len + s.out.len() >= context {
        return Some(FinishReason::Length);
    }
    None
}

#[cfg(test)]
mod tests;
