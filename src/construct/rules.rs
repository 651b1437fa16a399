//! The per-category rules as polars plans over one table of live answers (samples ⋈ annotations ⋈
//! prompts, joined by integer keys and checked on the way): SFT takes the best eligible answer of a
//! prompt, DPO the best-vs-worst pair of one source inside the gap window. Ties follow `tie_break`
//! in (source, sample index) order; every sort is total, so the same input gives the same rows
//! whatever order it came in. Texts stay in the samples table until the chosen rows are built.

use std::collections::{HashMap, HashSet};

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

fn category_code(c: Category) -> u32 {
    Category::ALL
        .iter()
        .position(|&x| x == c)
        .expect("a category") as u32
}

/// One row per live answer, every key an integer: the prompt's position, the source's rank in
/// name order, the answer's row in the samples table and a hash of its text stand for the
/// strings, so the rules' sorts, groups and joins never touch a string (string keys over 2M
/// answers were most of the run). Inputs are checked on the way: unknown prompts, duplicate
/// answers or annotations, answers without a score, math/code answers without a verdict.
struct Joined {
    frame: DataFrame,
    /// Source names by rank.
    names: Vec<String>,
}

fn join_inputs(
    live: &[&Prompt],
    split: &HashMap<String, bool>,
    samples: &DataFrame,
    annotations: &DataFrame,
    params: &ConstructParams,
    all: &HashMap<&str, &Prompt>,
) -> Result<Joined, DataError> {
    let ids = str_col(samples, "prompt_id", "samples")?;
    let src = str_col(samples, "source", "samples")?;
    let index = prim_col::<UInt32Type>(samples, "sample_index", DataType::UInt32, "samples")?;
    let texts = str_col(samples, "text", "samples")?;
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
    let score = prim_col::<Float64Type>(annotations, "score", DataType::Float64, "annotations")?;
    let correct: Vec<Option<bool>> = annotations
        .column("correct")
        .and_then(|c| c.cast(&DataType::Boolean))
        .and_then(|c| c.bool().map(|b| b.iter().collect()))
        .map_err(pe("annotations"))?;
    // Annotations written by `annotate` come in the samples' order; otherwise look them up.
    let keys = &keys;
    let note_of: Box<dyn Fn(usize) -> Option<usize> + '_> = if a_keys == *keys {
        Box::new(Some)
    } else {
        let mut at: HashMap<u64, usize, ahash::RandomState> = HashMap::with_capacity_and_hasher(
            a_keys.len(),
            ahash::RandomState::with_seeds(1, 2, 3, 4),
        );
        at.extend(a_keys.iter().enumerate().map(|(j, &k)| (k, j)));
        Box::new(move |i| at.get(&keys[i]).copied())
    };
    let only_rank = params.second_language_source.as_deref().map(|s| {
        names
            .iter()
            .position(|&n| n == s)
            .map(|r| r as u32)
            .unwrap_or(u32::MAX)
    });
    let text_hash = ahash::RandomState::with_seeds(5, 6, 7, 8);
    let to_sft: Vec<bool> = live.iter().map(|p| split[&p.id]).collect();
    let n = ids.len();
    let (mut pos, mut rank, mut idx, mut sc, mut ok, mut th, mut row, mut cat, mut sft, mut only) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
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
        let verdict = note.and_then(|j| correct[j]);
        if matches!(prompt.category, Category::Math | Category::Code) && verdict.is_none() {
            return Err(DataError::Invalid(format!(
                "{} has no correctness verdict, which its category needs",
                row_name(ids, src, &index, i)
            )));
        }
        pos.push(p);
        rank.push(((keys[i] >> 24) & 0xff) as u32);
        idx.push(index[i].unwrap_or_default());
        sc.push(s);
        ok.push(verdict);
        // Equal texts, equal hashes; two different texts share one with probability 2^-64.
        th.push(text_hash.hash_one(texts.get(i).unwrap_or_default()));
        row.push(i as u32);
        cat.push(category_code(prompt.category));
        sft.push(to_sft[p as usize]);
        only.push(if prompt.category == Category::SecondLanguage {
            only_rank
        } else {
            None
        });
    }
    let frame = DataFrame::new_infer_height(vec![
        Column::new("pos".into(), pos),
        Column::new("src_rank".into(), rank),
        Column::new("sample_index".into(), idx),
        Column::new("score".into(), sc),
        Column::new("correct".into(), ok),
        Column::new("text_h".into(), th),
        Column::new("row".into(), row),
        Column::new("cat".into(), cat),
        Column::new("sft".into(), sft),
        Column::new("only_rank".into(), only),
    ])
    .map_err(pe("joining samples, annotations and prompts"))?;
    Ok(Joined {
        frame,
        names: names.iter().map(|s| s.to_string()).collect(),
    })
}

pub fn apply(
    live: &[&Prompt],
    split: &HashMap<String, bool>,
    samples: &DataFrame,
    annotations: &DataFrame,
    params: &ConstructParams,
    all: &HashMap<&str, &Prompt>,
) -> Result<RuleOutput, DataError> {
    let Joined {
        frame: joined,
        names,
    } = join_inputs(live, split, samples, annotations, params, all)?;
    let facts = facts(&joined)?;

    // The prompts the rules drop outright, from the per-prompt facts.
    let is_code = col("cat").eq(lit(category_code(Category::Code)));
    let ok = col("correct").fill_null(lit(false));
    let excluded: Vec<bool> = live
        .iter()
        .enumerate()
        .map(|(p, prompt)| {
            let f = facts.get(&(p as u32)).copied().unwrap_or_default();
            (params.drop_identical && f.n > 1 && f.n_distinct == 1)
                || (params.drop_all_fail_code
                    && prompt.category == Category::Code
                    && f.n_correct == 0)
        })
        .collect();
    let keep: BooleanChunked = u32s(&joined, "pos")?
        .iter()
        .map(|&p| !excluded[p as usize])
        .collect();
    let with_facts = joined.filter(&keep).map_err(pe("per-prompt drops"))?.lazy();
    let needs_check = col("cat")
        .eq(lit(category_code(Category::Math)))
        .or(is_code);
    let (desc_idx, src_desc) = match params.tie_break {
        TieBreak::FirstIndex => (false, false),
        TieBreak::LastIndex => (true, true),
    };

    // SFT: the best eligible answer.
    let sft = with_facts
        .clone()
        .filter(col("sft"))
        .filter(needs_check.clone().not().or(ok.clone()))
        .filter(
            col("only_rank")
                .is_null()
                .or(col("src_rank").eq(col("only_rank"))),
        )
        .sort(
            ["pos", "score", "src_rank", "sample_index"],
            SortMultipleOptions::default()
                .with_order_descending_multi([false, true, src_desc, desc_idx])
                .with_maintain_order(true),
        )
        .unique_stable_generic(Some(vec![col("pos")]), UniqueKeepStrategy::First)
        .collect()
        .map_err(pe("SFT selection"))?;

    // DPO: per source, the best eligible chosen and the worst eligible rejected.
    let dpo_rows = with_facts.filter(col("sft").not());
    let per_source = |lf: LazyFrame, worst: bool| {
        lf.sort(
            ["pos", "src_rank", "score", "sample_index"],
            SortMultipleOptions::default()
                .with_order_descending_multi([false, false, !worst, desc_idx])
                .with_maintain_order(true),
        )
        .unique_stable_generic(
            Some(vec![col("pos"), col("src_rank")]),
            UniqueKeepStrategy::First,
        )
        .select([
            col("cat"),
            col("src_rank"),
            col("sample_index"),
            col("text_h"),
            col("row"),
            col("score"),
            col("pos"),
        ])
    };
    let chosen = per_source(
        dpo_rows
            .clone()
            .filter(needs_check.clone().not().or(ok.clone())),
        false,
    );
    let rejected = per_source(
        dpo_rows.filter(needs_check.clone().not().or(ok.not())),
        true,
    )
    .select([
        col("pos"),
        col("src_rank"),
        col("sample_index").alias("r_index"),
        col("text_h").alias("r_text_h"),
        col("row").alias("r_row"),
        col("score").alias("r_score"),
    ]);
    let g = &params.gap;
    let lo = if g.min_inclusive {
        col("gap").gt_eq(lit(g.min))
    } else {
        col("gap").gt(lit(g.min))
    };
    let hi = if g.max_inclusive {
        col("gap").lt_eq(lit(g.max))
    } else {
        col("gap").lt(lit(g.max))
    };
    let exempt = params.gap_exempt.iter().fold(lit(false), |e, c| {
        e.or(col("cat").eq(lit(category_code(*c))))
    });
    let mut pairs = chosen
        .join(
            rejected,
            [col("pos"), col("src_rank")],
            [col("pos"), col("src_rank")],
            JoinArgs::new(JoinType::Inner),
        )
        .with_column((col("score") - col("r_score")).alias("gap"))
        .filter(col("sample_index").neq(col("r_index")))
        .filter(lo.and(hi).or(exempt));
    if params.drop_identical {
        pairs = pairs.filter(col("text_h").neq(col("r_text_h")));
    }
    let (key, key_desc) = match params.pair_source {
        PairSource::HighestChosen => ("score", true),
        PairSource::LargestGap => ("gap", true),
        PairSource::SmallestGap => ("gap", false),
        PairSource::FirstSource => ("src_rank", src_desc),
    };
    let dpo = pairs
        .sort(
            ["pos", key, "src_rank"],
            SortMultipleOptions::default()
                .with_order_descending_multi([false, key_desc, src_desc])
                .with_maintain_order(true),
        )
        .unique_stable_generic(Some(vec![col("pos")]), UniqueKeepStrategy::First)
        .collect()
        .map_err(pe("DPO pairs"))?;

    let texts = str_col(samples, "text", "samples")?;
    let sft_rows = sft_rows(&sft, live, &names, texts)?;
    let dpo_rows = dpo_pairs(&dpo, live, &names, texts)?;
    let done: HashSet<&str> = sft_rows
        .iter()
        .map(|r| r.prompt_id.as_str())
        .chain(dpo_rows.iter().map(|r| r.prompt_id.as_str()))
        .collect();
    let mut dropped = Vec::new();
    for (pos, p) in live.iter().enumerate() {
        if done.contains(p.id.as_str()) {
            continue;
        }
        let f = facts.get(&(pos as u32)).copied().unwrap_or_default();
        let is_sft = split[&p.id];
        let checked = matches!(p.category, Category::Math | Category::Code);
        let reason = if f.n == 0 {
            DropReason::NoAnswers
        } else if params.drop_identical && f.n > 1 && f.n_distinct == 1 {
            DropReason::IdenticalAnswers
        } else if params.drop_all_fail_code && p.category == Category::Code && f.n_correct == 0 {
            DropReason::AllCodeAnswersFail
        } else if is_sft && checked && f.n_correct == 0 {
            DropReason::NoCorrectAnswer
        } else if is_sft {
            DropReason::NoAnswerFromSource
        } else {
            DropReason::NoPairInWindow
        };
        dropped.push(Dropped {
            prompt_id: p.id.clone(),
            dataset: p.dataset.clone(),
            category: p.category,
            reason,
            detail: None,
        });
    }
    Ok(RuleOutput {
        sft: sft_rows,
        dpo: dpo_rows,
        dropped,
    })
}

#[derive(Clone, Copy, Default)]
struct Facts {
    n: u32,
    n_distinct: u32,
    n_correct: u32,
}

/// Per-prompt counts for the drop reasons, by prompt position, from the joined answers.
fn facts(joined: &DataFrame) -> Result<HashMap<u32, Facts>, DataError> {
    let df = joined
        .clone()
        .lazy()
        .group_by([col("pos")])
        .agg([
            len().cast(DataType::UInt32).alias("n"),
            col("text_h")
                .n_unique()
                .cast(DataType::UInt32)
                .alias("n_distinct"),
            col("correct")
                .fill_null(lit(false))
                .cast(DataType::UInt32)
                .sum()
                .cast(DataType::UInt32)
                .alias("n_correct"),
        ])
        .collect()
        .map_err(pe("per-prompt counts"))?;
    let col_u32 = |name: &str| {
        df.column(name)
            .and_then(|c| c.u32().cloned())
            .map_err(pe("per-prompt counts"))
    };
    let (pos, n, d, c) = (
        col_u32("pos")?,
        col_u32("n")?,
        col_u32("n_distinct")?,
        col_u32("n_correct")?,
    );
    let mut out = HashMap::with_capacity(df.height());
    for i in 0..df.height() {
        if let Some(p) = pos.get(i) {
            out.insert(
                p,
                Facts {
                    n: n.get(i).unwrap_or(0),
                    n_distinct: d.get(i).unwrap_or(0),
                    n_correct: c.get(i).unwrap_or(0),
                },
            );
        }
    }
    Ok(out)
}

fn u32s(df: &DataFrame, name: &str) -> Result<Vec<u32>, DataError> {
    Ok(
        prim_col::<UInt32Type>(df, name, DataType::UInt32, "reading rows")?
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect(),
    )
}

fn f64s(df: &DataFrame, name: &str) -> Result<Vec<Option<f64>>, DataError> {
    prim_col::<Float64Type>(df, name, DataType::Float64, "reading rows")
}

fn sft_rows(
    df: &DataFrame,
    live: &[&Prompt],
    names: &[String],
    texts: &StringChunked,
) -> Result<Vec<SftRow>, DataError> {
    let (pos, rank, index, row) = (
        u32s(df, "pos")?,
        u32s(df, "src_rank")?,
        u32s(df, "sample_index")?,
        u32s(df, "row")?,
    );
    let score = f64s(df, "score")?;
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let p = live[pos[i] as usize];
        let mut messages = p.messages.clone();
        messages.push(Message::new(
            "assistant",
            texts.get(row[i] as usize).unwrap_or_default(),
        ));
        out.push(SftRow {
            prompt_id: p.id.clone(),
            dataset: p.dataset.clone(),
            category: p.category,
            source: names[rank[i] as usize].clone(),
            sample_index: index[i],
            messages,
            score: score[i],
        });
    }
    Ok(out)
}

fn dpo_pairs(
    df: &DataFrame,
    live: &[&Prompt],
    names: &[String],
    texts: &StringChunked,
) -> Result<Vec<DpoPair>, DataError> {
    let (pos, rank, index, row, r_index, r_row) = (
        u32s(df, "pos")?,
        u32s(df, "src_rank")?,
        u32s(df, "sample_index")?,
        u32s(df, "row")?,
        u32s(df, "r_index")?,
        u32s(df, "r_row")?,
    );
    let (score, r_score) = (f64s(df, "score")?, f64s(df, "r_score")?);
    let text = |r: u32| texts.get(r as usize).unwrap_or_default();
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let p = live[pos[i] as usize];
        out.push(DpoPair {
            prompt_id: p.id.clone(),
            dataset: p.dataset.clone(),
            category: p.category,
            source: names[rank[i] as usize].clone(),
            prompt: p.messages.clone(),
            chosen: vec![Message::new("assistant", text(row[i]))],
            rejected: vec![Message::new("assistant", text(r_row[i]))],
            chosen_index: index[i],
            rejected_index: r_index[i],
            chosen_score: score[i],
            rejected_score: r_score[i],
        });
    }
    Ok(out)
}
