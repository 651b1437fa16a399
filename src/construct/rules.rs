//! The per-category rules over one table of live answers (samples ⋈ annotations ⋈ prompts, read
//! as polars columns, joined by integer keys and checked on the way): SFT takes the best eligible
//! answer of a prompt, DPO the best-vs-worst pair of one source inside the gap window. The answers
//! are grouped by prompt and ordered by (source, sample index), and each prompt's group is decided
//! in one pass; ties follow `tie_break` in that order, so the same input gives the same rows
//! whatever order it came in. Texts stay in the samples table until the chosen rows are built.

use std::cmp::Ordering;
use std::collections::HashMap;

use polars::prelude::*;

use super::{ConstructParams, DropReason, Dropped, PairSource, TieBreak};
use crate::data::{Category, DataError, DpoPair, Message, Prompt, SftRow};

pub struct RuleOutput {
    pub sft: Vec<SftRow>,
    pub dpo: Vec<DpoPair>,
    pub dropped: Vec<Dropped>,
}

fn pe(what: &str) -> impl Fn(PolarsError) -> DataError + '_ {
    move |e| DataError::Invalid(format!("construction ({what}): {e}"))
}

fn str_col<'a>(df: &'a DataFrame, name: &str, what: &str) -> Result<&'a StringChunked, DataError> {
    df.column(name)
        .and_then(|c| c.str())
        .map_err(|e| DataError::Invalid(format!("construction ({what}): {e}")))
}

/// A column as a vector of one primitive type, cast when the file stored another width.
fn prim_col<T>(
    df: &DataFrame,
    name: &str,
    dtype: DataType,
    what: &str,
) -> Result<Vec<Option<T::Native>>, DataError>
where
    T: PolarsNumericType,
{
    let c = df
        .column(name)
        .and_then(|c| c.cast(&dtype))
        .map_err(pe(what))?;
    let ca: &ChunkedArray<T> = c.as_materialized_series().unpack::<T>().map_err(pe(what))?;
    Ok(ca.iter().collect())
}

/// The name of sample `i` (its three key columns) for error messages.
fn row_name(
    ids: &StringChunked,
    sources: &StringChunked,
    index: &[Option<u32>],
    i: usize,
) -> String {
    format!(
        "answer {} of source {} to prompt {}",
        index[i].map(|x| x.to_string()).unwrap_or_default(),
        sources.get(i).unwrap_or_default(),
        ids.get(i).unwrap_or_default()
    )
}

/// Keys of a samples or annotations table: (prompt number, source number, sample index) packed
/// into one integer; prompt and source numbers come from `prompts` / `sources`, which grow with
/// names not seen before (an annotation of an unknown prompt still has a key, so duplicates
/// among such rows are found too).
fn row_keys<'a>(
    ids: &'a StringChunked,
    src: &'a StringChunked,
    index: &[Option<u32>],
    prompts: &mut Names<'a>,
    sources: &mut Names<'a>,
    what: &str,
) -> Result<Vec<u64>, DataError> {
    let mut keys = Vec::with_capacity(ids.len());
    // Answers of one prompt, and of one source, usually sit together: the previous row's
    // numbers are reused when its names repeat.
    let (mut last_id, mut last_p) = (None, 0u32);
    let (mut last_src, mut last_s) = (None, 0u32);
    for (i, (id, s)) in ids.iter().zip(src.iter()).enumerate() {
        if id != last_id || last_id.is_none() {
            last_p = prompts.number(id.unwrap_or_default());
            last_id = id;
        }
        if s != last_src || last_src.is_none() {
            last_s = sources.number(s.unwrap_or_default());
            last_src = s;
        }
        let x = index[i].unwrap_or(u32::MAX);
        if last_s >= 1 << 8 || x >= 1 << 24 {
            return Err(DataError::Invalid(format!(
                "{what}: {} — construction keys hold at most 256 sources and sample indices \
                 below 2^24",
                row_name(ids, src, index, i)
            )));
        }
        keys.push((u64::from(last_p) << 32) | (u64::from(last_s) << 24) | u64::from(x));
    }
    Ok(keys)
}

/// Names numbered in the order they are first seen.
struct Names<'a>(HashMap<&'a str, u32, ahash::RandomState>);

impl<'a> Names<'a> {
    fn new(capacity: usize) -> Names<'a> {
        Names(HashMap::with_capacity_and_hasher(
            capacity,
            ahash::RandomState::with_seeds(1, 2, 3, 4),
        ))
    }
    fn number(&mut self, name: &'a str) -> u32 {
        let n = self.0.len() as u32;
        *self.0.entry(name).or_insert(n)
    }
}

/// The first (in prompt id, source, sample index order) of the rows whose key repeats.
fn first_duplicate(
    keys: &[u64],
    ids: &StringChunked,
    src: &StringChunked,
    index: &[Option<u32>],
) -> Option<String> {
    // Tables written in prompt order (as `sample` and `annotate` write them) are already sorted.
    if keys.windows(2).all(|w| w[0] < w[1]) {
        return None;
    }
    let mut sorted: Vec<(u64, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| (k, i as u32))
        .collect();
    sorted.sort_unstable();
    sorted
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[0].1 as usize)
        .min_by(|&a, &b| {
            (ids.get(a), src.get(a), index[a]).cmp(&(ids.get(b), src.get(b), index[b]))
        })
        .map(|i| row_name(ids, src, index, i))
}

/// One entry per live answer, every key an integer: the prompt's position, the source's rank in
/// name order, the answer's row in the samples table and a hash of its text stand for the
/// strings, so the rules never touch a string (string keys over 2M answers were most of the
/// run). Inputs are checked on the way: unknown prompts, duplicate answers or annotations,
/// answers without a score or with a NaN one, math/code answers without a verdict.
struct Answers {
    pos: Vec<u32>,
    rank: Vec<u32>,
    index: Vec<u32>,
    score: Vec<f64>,
    correct: Vec<Option<bool>>,
    text_h: Vec<u64>,
    row: Vec<u32>,
    /// Source names by rank.
    names: Vec<String>,
}

fn join_inputs(
    live: &[&Prompt],
    samples: &DataFrame,
    annotations: &DataFrame,
    all: &HashMap<&str, &Prompt>,
) -> Result<Answers, DataError> {
    let ids = str_col(samples, "prompt_id", "samples")?;
    let src = str_col(samples, "source", "samples")?;
    let index = prim_col::<UInt32Type>(samples, "sample_index", DataType::UInt32, "samples")?;
    let texts = str_col(samples, "text", "samples")?;
    std::thread::scope(|s| {
        // Equal texts, equal hashes; two different texts share one with probability 2^-64.
        // Hashing two million texts needs nothing else: it runs beside the keys and checks.
        let hashing = s.spawn(|| {
            let h = ahash::RandomState::with_seeds(5, 6, 7, 8);
            texts
                .iter()
                .map(|t| h.hash_one(t.unwrap_or_default()))
                .collect::<Vec<u64>>()
        });
        // Known prompts are numbered first (live ones in their order), so a number past them is a
        // prompt not in the set, and a live prompt's number is its position.
        let mut prompts = Names::new(all.len());
        for p in live {
            prompts.number(p.id.as_str());
        }
        let mut known: Vec<&str> = all.keys().copied().collect();
        known.sort_unstable();
        for id in known {
            prompts.number(id);
        }
        // Sources ranked in name order first, so that a source's number is its rank.
        let mut names: Vec<&str> = Vec::new();
        let mut last = None;
        for s in src.iter() {
            if s != last || last.is_none() {
                let s = s.unwrap_or_default();
                if !names.contains(&s) {
                    names.push(s);
                }
                last = Some(s);
            }
        }
        names.sort_unstable();
        let mut sources = Names::new(names.len());
        for n in &names {
            sources.number(n);
        }
        let keys = row_keys(ids, src, &index, &mut prompts, &mut sources, "samples")?;
        if let Some(i) = keys.iter().position(|&k| (k >> 32) as usize >= all.len()) {
            return Err(DataError::Invalid(format!(
                "{} : prompt `{}` is not in the prompt set",
                row_name(ids, src, &index, i),
                ids.get(i).unwrap_or("<null>")
            )));
        }
        if let Some(name) = first_duplicate(&keys, ids, src, &index) {
            return Err(DataError::Invalid(format!(
                "samples: {name} appears more than once"
            )));
        }
        let a_ids = str_col(annotations, "prompt_id", "annotations")?;
        let a_src = str_col(annotations, "source", "annotations")?;
        let a_index =
            prim_col::<UInt32Type>(annotations, "sample_index", DataType::UInt32, "annotations")?;
        // Annotations written by `annotate` name the samples' rows in the samples' order; then their
        // keys are the samples' keys (and have no duplicates either), found by column comparisons.
        let same_rows = a_ids.len() == ids.len()
            && a_index == index
            && a_ids.equal_missing(ids).all()
            && a_src.equal_missing(src).all();
        let a_keys = if same_rows {
            keys.clone()
        } else {
            let a_keys = row_keys(
                a_ids,
                a_src,
                &a_index,
                &mut prompts,
                &mut sources,
                "annotations",
            )?;
            if let Some(name) = first_duplicate(&a_keys, a_ids, a_src, &a_index) {
                return Err(DataError::Invalid(format!(
                    "annotations: {name} appears more than once"
                )));
            }
            a_keys
        };
        let score =
            prim_col::<Float64Type>(annotations, "score", DataType::Float64, "annotations")?;
        let correct: Vec<Option<bool>> = annotations
            .column("correct")
            .and_then(|c| c.cast(&DataType::Boolean))
            .and_then(|c| c.bool().map(|b| b.iter().collect()))
            .map_err(pe("annotations"))?;
        // Annotations written by `annotate` come in the samples' order; otherwise look them up.
        let keys = &keys;
        let note_of: Box<dyn Fn(usize) -> Option<usize> + '_> = if same_rows || a_keys == *keys {
            Box::new(Some)
        } else {
            let mut at: HashMap<u64, usize, ahash::RandomState> = HashMap::with_capacity_and_hasher(
                a_keys.len(),
                ahash::RandomState::with_seeds(1, 2, 3, 4),
            );
            at.extend(a_keys.iter().enumerate().map(|(j, &k)| (k, j)));
            Box::new(move |i| at.get(&keys[i]).copied())
        };
        let n = ids.len();
        let mut a = Answers {
            pos: Vec::with_capacity(n),
            rank: Vec::with_capacity(n),
            index: Vec::with_capacity(n),
            score: Vec::with_capacity(n),
            correct: Vec::with_capacity(n),
            text_h: Vec::with_capacity(n),
            row: Vec::with_capacity(n),
            names: names.iter().map(|s| s.to_string()).collect(),
        };
        let text_h = hashing.join().expect("hashing texts does not panic");
        for i in 0..n {
            let p = (keys[i] >> 32) as u32;
            if p as usize >= live.len() {
                continue;
            }
            let prompt = live[p as usize];
            let note = note_of(i);
            let Some(s) = note.and_then(|j| score[j]) else {
                return Err(DataError::Invalid(format!(
                    "{} has no reward score (is it missing from the annotations?)",
                    row_name(ids, src, &index, i)
                )));
            };
            if s.is_nan() {
                return Err(DataError::Invalid(format!(
                    "{} has a NaN reward score",
                    row_name(ids, src, &index, i)
                )));
            }
            let verdict = note.and_then(|j| correct[j]);
            if matches!(prompt.category, Category::Math | Category::Code) && verdict.is_none() {
                return Err(DataError::Invalid(format!(
                    "{} has no correctness verdict, which its category needs",
                    row_name(ids, src, &index, i)
                )));
            }
            a.pos.push(p);
            a.rank.push(((keys[i] >> 24) & 0xff) as u32);
            a.index.push(index[i].unwrap_or_default());
            a.score.push(s);
            a.correct.push(verdict);
            a.text_h.push(text_h[i]);
            a.row.push(i as u32);
        }
        Ok(a)
    })
}

/// The answers' numbers grouped by prompt position (a counting sort, stable), each group in
/// (source rank, sample index) order: `(order, start)` with prompt `p`'s answers at
/// `order[start[p]..start[p + 1]]`.
fn by_prompt(a: &Answers, prompts: usize) -> (Vec<u32>, Vec<usize>) {
    let mut start = vec![0usize; prompts + 1];
    for &p in &a.pos {
        start[p as usize + 1] += 1;
    }
    for p in 0..prompts {
        start[p + 1] += start[p];
    }
    let mut next = start.clone();
    let mut order = vec![0u32; a.pos.len()];
    for (i, &p) in a.pos.iter().enumerate() {
        order[next[p as usize]] = i as u32;
        next[p as usize] += 1;
    }
    for p in 0..prompts {
        let g = &mut order[start[p]..start[p + 1]];
        if !g.windows(2).all(|w| {
            (a.rank[w[0] as usize], a.index[w[0] as usize])
                < (a.rank[w[1] as usize], a.index[w[1] as usize])
        }) {
            g.sort_unstable_by_key(|&i| (a.rank[i as usize], a.index[i as usize]));
        }
    }
    (order, start)
}

/// Scores compared as a total order (no NaN reaches here).
fn cmp(a: f64, b: f64) -> Ordering {
    a.partial_cmp(&b).unwrap_or(Ordering::Equal)
}

/// The answer of `group` (in (source, index) order) that `better` ranks first among those
/// `eligible` admits; among equals the first in that order, or the last with `last`.
fn pick(
    group: &[u32],
    eligible: impl Fn(usize) -> bool,
    better: impl Fn(usize, usize) -> Ordering,
    last: bool,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    for &i in group {
        let i = i as usize;
        if !eligible(i) {
            continue;
        }
        best = match best {
            None => Some(i),
            Some(b) => match better(i, b) {
                Ordering::Greater => Some(i),
                Ordering::Equal if last => Some(i),
                _ => Some(b),
            },
        };
    }
    best
}

pub fn apply(
    live: &[&Prompt],
    split: &[bool],
    samples: &DataFrame,
    annotations: &DataFrame,
    params: &ConstructParams,
    all: &HashMap<&str, &Prompt>,
) -> Result<RuleOutput, DataError> {
    let a = join_inputs(live, samples, annotations, all)?;
    let (order, start) = by_prompt(&a, live.len());
    let only_rank = params.second_language_source.as_deref().map(|s| {
        a.names
            .iter()
            .position(|n| n == s)
            .map(|r| r as u32)
            .unwrap_or(u32::MAX)
    });
    let rules = Rules {
        a: &a,
        order: &order,
        start: &start,
        texts: str_col(samples, "text", "samples")?,
        live,
        split,
        params,
        only_rank,
        last: params.tie_break == TieBreak::LastIndex,
    };
    // Every prompt is decided on its own: one block of prompts per core, joined in order.
    let parts = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let bounds: Vec<usize> = (0..=parts).map(|k| live.len() * k / parts).collect();
    let outs: Vec<RuleOutput> = std::thread::scope(|s| {
        let rules = &rules;
        let blocks: Vec<_> = bounds
            .windows(2)
            .map(|w| {
                let range = w[0]..w[1];
                s.spawn(move || rules.decide(range))
            })
            .collect();
        blocks
            .into_iter()
            .map(|b| b.join().expect("deciding prompts does not panic"))
            .collect()
    });
    let mut out = RuleOutput {
        sft: Vec::with_capacity(outs.iter().map(|o| o.sft.len()).sum()),
        dpo: Vec::with_capacity(outs.iter().map(|o| o.dpo.len()).sum()),
        dropped: Vec::new(),
    };
    for o in outs {
        out.sft.extend(o.sft);
        out.dpo.extend(o.dpo);
        out.dropped.extend(o.dropped);
    }
    Ok(out)
}

/// What deciding a prompt needs: its answers grouped and ordered, the texts, the rules.
struct Rules<'a> {
    a: &'a Answers,
    order: &'a [u32],
    start: &'a [usize],
    texts: &'a StringChunked,
    live: &'a [&'a Prompt],
    split: &'a [bool],
    params: &'a ConstructParams,
    /// The second-language source's rank, when one is set.
    only_rank: Option<u32>,
    last: bool,
}

impl Rules<'_> {
    /// The rows and drops of the prompts at `range` (positions in `live`), in their order.
    fn decide(&self, range: std::ops::Range<usize>) -> RuleOutput {
        let Rules {
            a,
            order,
            start,
            texts,
            live,
            split,
            params,
            only_rank,
            last,
        } = *self;
        let text = |i: usize| texts.get(a.row[i] as usize).unwrap_or_default();
        let ok = |i: usize| a.correct[i] == Some(true);
        let mut out = RuleOutput {
            sft: Vec::new(),
            dpo: Vec::new(),
            dropped: Vec::new(),
        };
        let mut hashes: Vec<u64> = Vec::new();
        for (p, prompt) in live.iter().enumerate().take(range.end).skip(range.start) {
            let group = &order[start[p]..start[p + 1]];
            let n = group.len();
            let n_correct = group.iter().filter(|&&i| ok(i as usize)).count();
            hashes.clear();
            hashes.extend(group.iter().map(|&i| a.text_h[i as usize]));
            hashes.sort_unstable();
            hashes.dedup();
            let identical = params.drop_identical && n > 1 && hashes.len() == 1;
            let all_fail =
                params.drop_all_fail_code && prompt.category == Category::Code && n_correct == 0;
            let checked = matches!(prompt.category, Category::Math | Category::Code);
            let is_sft = split[p];
            let reason = if n == 0 {
                DropReason::NoAnswers
            } else if identical {
                DropReason::IdenticalAnswers
            } else if all_fail {
                DropReason::AllCodeAnswersFail
            } else if is_sft {
                // SFT: the best eligible answer (of the second-language source alone, if set).
                let only = (prompt.category == Category::SecondLanguage)
                    .then_some(only_rank)
                    .flatten();
                let eligible =
                    |i: usize| (!checked || ok(i)) && only.is_none_or(|r| a.rank[i] == r);
                match pick(group, eligible, |i, b| cmp(a.score[i], a.score[b]), last) {
                    Some(i) => {
                        let mut messages = prompt.messages.clone();
                        messages.push(Message::new("assistant", text(i)));
                        out.sft.push(SftRow {
                            prompt_id: prompt.id.clone(),
                            dataset: prompt.dataset.clone(),
                            category: prompt.category,
                            source: a.names[a.rank[i] as usize].clone(),
                            sample_index: a.index[i],
                            messages,
                            score: Some(a.score[i]),
                        });
                        continue;
                    }
                    None if checked && n_correct == 0 => DropReason::NoCorrectAnswer,
                    None => DropReason::NoAnswerFromSource,
                }
            } else {
                // DPO: per source, its best eligible answer against its worst eligible one; among
                // the sources whose pair qualifies, the one `pair_source` names.
                let exempt = params.gap_exempt.contains(&prompt.category);
                let mut best: Option<(usize, usize)> = None;
                for g in group.chunk_by(|&x, &y| a.rank[x as usize] == a.rank[y as usize]) {
                    let by_score = |i: usize, b: usize| cmp(a.score[i], a.score[b]);
                    let Some(c) = pick(g, |i| !checked || ok(i), by_score, last) else {
                        continue;
                    };
                    let Some(r) = pick(g, |i| !checked || !ok(i), |i, b| by_score(b, i), last)
                    else {
                        continue;
                    };
                    let gap = a.score[c] - a.score[r];
                    if a.index[c] == a.index[r]
                        || !(exempt || params.gap.contains(gap))
                        || (params.drop_identical && a.text_h[c] == a.text_h[r])
                    {
                        continue;
                    }
                    best = match best {
                        None => Some((c, r)),
                        Some((bc, br)) => {
                            let bgap = a.score[bc] - a.score[br];
                            let o = match params.pair_source {
                                PairSource::HighestChosen => cmp(a.score[c], a.score[bc]),
                                PairSource::LargestGap => cmp(gap, bgap),
                                PairSource::SmallestGap => cmp(bgap, gap),
                                PairSource::FirstSource => Ordering::Equal,
                            };
                            // Sources come in rank order: among equals the first, or the last with
                            // `last`.
                            match o {
                                Ordering::Greater => Some((c, r)),
                                Ordering::Equal if last => Some((c, r)),
                                _ => best,
                            }
                        }
                    };
                }
                match best {
                    Some((c, r)) => {
                        out.dpo.push(DpoPair {
                            prompt_id: prompt.id.clone(),
                            dataset: prompt.dataset.clone(),
                            category: prompt.category,
                            source: a.names[a.rank[c] as usize].clone(),
                            prompt: prompt.messages.clone(),
                            chosen: vec![Message::new("assistant", text(c))],
                            rejected: vec![Message::new("assistant", text(r))],
                            chosen_index: a.index[c],
                            rejected_index: a.index[r],
                            chosen_score: Some(a.score[c]),
                            rejected_score: Some(a.score[r]),
                        });
                        continue;
                    }
                    None => DropReason::NoPairInWindow,
                }
            };
            out.dropped.push(Dropped {
                prompt_id: prompt.id.clone(),
                dataset: prompt.dataset.clone(),
                category: prompt.category,
                reason,
                detail: None,
            });
        }
        out
    }
}
