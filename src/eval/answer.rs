//! Answering a benchmark: the model under test answers every item turn by turn (turn t+1 replays
//! the sample's own earlier answers), on the local decoder through the sampling job (continuous
//! batching, chunks that survive a kill) or through an OpenAI-compatible server (request cache).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::bench::Benchmark;
use super::score::Answer;
use super::EvalError;
use crate::data::{Category, Prompt, Sample};
use crate::sample::job::{self, JobOptions, Model, SourceSpec};
use crate::sample::openai::{self, Endpoint};

pub enum Answerer<'a> {
    Local(Model<'a>),
    Server(&'a Endpoint),
}

/// How the benchmark is answered; recorded with the results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub name: String,
    pub samples: u32,
    /// 0 = greedy.
    pub temperature: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub slots: usize,
    pub stop_token_ids: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub generated_tokens: u64,
    pub answers: u64,
}

/// Every item's answers (samples in order). `work_dir` keeps the local job's chunks;
/// `request_cache` the server's replies. `progress(turn, done, total, tokens)`.
pub fn answer(
    bench: &Benchmark,
    answerer: &Answerer,
    s: &Settings,
    work_dir: &Path,
    request_cache: &Path,
    progress: &(dyn Fn(usize, u64, u64, u64) + Sync),
) -> Result<(Vec<Answer>, Stats), EvalError> {
    if s.samples == 0 {
        return Err(EvalError::Invalid(
            "samples per item must be at least 1".into(),
        ));
    }
    if s.samples > 1 && s.temperature == 0.0 {
        return Err(EvalError::Invalid(format!(
            "{} samples per item of greedy decoding would be identical; set a temperature",
            s.samples
        )));
    }
    let spec_for = |n: u32| SourceSpec {
        name: s.name.clone(),
        sampling: crate::generate::SamplingParams {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            stop_token_ids: s.stop_token_ids.clone(),
            stop_strings: vec![],
            seed: s.seed,
        },
        samples_per_category: Category::ALL.iter().map(|c| (*c, n)).collect(),
    };
    let max_turns = bench.items.iter().map(|i| i.turns.len()).max().unwrap_or(1);
    let mut got: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
    let mut stats = Stats::default();
    for t in 0..max_turns {
        // Turn 1: one prompt per item with n samples (they share its prefill). Later turns: one
        // prompt per (item, sample), since each sample continues its own conversation.
        let mut prompts: Vec<(String, u32, Prompt)> = Vec::new();
        for it in bench.items.iter().filter(|i| i.turns.len() > t) {
            let samples: Vec<u32> = if t == 0 {
                vec![0]
            } else {
                (0..s.samples).collect()
            };
            for k in samples {
                let earlier = got.get(&(it.id.clone(), k)).cloned().unwrap_or_default();
                let id = if t == 0 {
                    it.id.clone()
                } else {
                    format!("{}#turn{}#sample{}", it.id, t + 1, k)
                };
                let p = Prompt {
                    id,
                    dataset: bench.name.clone(),
                    category: Category::Instruction,
                    messages: it.messages(t, &earlier),
                    gold: None,
                    tests: None,
                    entry_point: None,
                    language: "en".into(),
                };
                prompts.push((it.id.clone(), k, p));
            }
        }
        let n = if t == 0 { s.samples } else { 1 };
        let spec = spec_for(n);
        let plain: Vec<Prompt> = prompts.iter().map(|(_, _, p)| p.clone()).collect();
        let total = plain.len() as u64 * n as u64;
        let samples: Vec<Sample> = match answerer {
            Answerer::Local(m) => {
                let on = |done: u64, toks: u64| progress(t, done, total, toks);
                let opts = JobOptions {
                    chunk_size: 64,
                    slots: s.slots.max(1),
                };
                let dir = work_dir.join(format!("chunks-turn{}", t + 1));
                let (out, st) = job::run(m, &plain, &spec, &opts, 1, &dir, &on)
                    .map_err(|e| EvalError::Invalid(format!("answering turn {}: {e}", t + 1)))?;
                stats.generated_tokens += st.generated_tokens;
                out
            }
            Answerer::Server(ep) => {
                let on = |done: u64| progress(t, done, total, 0);
                let (out, st) = openai::run(ep, &plain, &spec, request_cache, &on)
                    .map_err(|e| EvalError::Invalid(format!("answering turn {}: {e}", t + 1)))?;
                stats.generated_tokens += st.completion_tokens;
                out
            }
        };
        let by_prompt: BTreeMap<(&str, u32), &Sample> = samples
            .iter()
            .map(|x| ((x.prompt_id.as_str(), x.sample_index), x))
            .collect();
        for (item, k, p) in &prompts {
            for j in 0..n {
                let sample_no = if t == 0 { j } else { *k };
                let text = by_prompt
                    .get(&(p.id.as_str(), j))
                    .map(|x| x.text.clone())
                    .unwrap_or_default();
                got.entry((item.clone(), sample_no)).or_default().push(text);
            }
        }
    }
    let answers: Vec<Answer> = bench
        .items
        .iter()
        .flat_map(|it| (0..s.samples).map(move |k| (it, k)))
        .filter_map(|(it, k)| {
            got.remove(&(it.id.clone(), k)).map(|turns| Answer {
                item: it.id.clone(),
                sample: k,
                turns,
            })
        })
        .collect();
    stats.answers = answers.len() as u64;
    Ok((answers, stats))
}
