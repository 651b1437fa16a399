//! The per-category rules as one polars plan over (samples ⋈ annotations ⋈ prompts): SFT takes the
//! best eligible answer of a prompt, DPO the best-vs-worst pair of one source inside the gap window.
//! Ties follow `tie_break` in (source, sample index) order; every sort is total, so the same input
//! gives the same rows whatever order it came in.

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

fn sample_name(df: &DataFrame, i: usize) -> String {
    let text = |c: &str| {
        df.column(c)
            .ok()
            .and_then(|c| match c.str() {
                Ok(s) => s.get(i).map(str::to_string),
                Err(_) => c.get(i).ok().map(|v| v.to_string()),
            })
            .unwrap_or_default()
    };
    format!(
        "answer {} of source {} to prompt {}",
        text("sample_index"),
        text("source"),
        text("prompt_id")
    )
}

/// First row of `df` where `mask` holds, if any.
fn first_true(mask: &BooleanChunked) -> Option<usize> {
    (0..mask.len()).find(|&i| mask.get(i) == Some(true))
}

/// Input checks that polars can do at scale: unknown prompts, duplicate answers or annotations,
/// answers without an annotation or a score, math/code answers without a verdict.
fn check_inputs(
    samples: &DataFrame,
    annotations: &DataFrame,
    known: &HashSet<&str>,
) -> Result<(), DataError> {
    let ids = samples
        .column("prompt_id")
        .and_then(|c| c.str().cloned())
        .map_err(pe("samples"))?;
    if let Some((i, id)) = (0..ids.len())
        .map(|i| (i, ids.get(i)))
        .find(|(_, id)| !id.is_some_and(|id| known.contains(id)))
    {
        return Err(DataError::Invalid(format!(
            "{} : prompt `{}` is not in the prompt set",
            sample_name(samples, i),
            id.unwrap_or("<null>")
        )));
    }
    let keys = ["prompt_id", "source", "sample_index"];
    for (what, df) in [("samples", samples), ("annotations", annotations)] {
        let dup = df
            .clone()
            .lazy()
            .select(keys.map(col))
            .group_by(keys.map(col))
            .agg([len().alias("n")])
            .filter(col("n").gt(lit(1)))
            .sort(keys, SortMultipleOptions::default())
            .limit(1)
            .collect()
            .map_err(pe(what))?;
        if dup.height() > 0 {
            return Err(DataError::Invalid(format!(
                "{what}: {} appears more than once",
                sample_name(&dup, 0)
            )));
        }
    }
    Ok(())
}

fn prompts_frame(
    prompts: &[&Prompt],
    split: &HashMap<String, bool>,
    params: &ConstructParams,
) -> Result<DataFrame, DataError> {
    let n = prompts.len();
    let mut id = Vec::with_capacity(n);
    let mut cat = Vec::with_capacity(n);
    let mut sft = Vec::with_capacity(n);
    let mut only_source = Vec::with_capacity(n);
    let mut pos = Vec::with_capacity(n);
    for (i, p) in prompts.iter().enumerate() {
        id.push(p.id.as_str());
        cat.push(p.category.name());
        sft.push(split[&p.id]);
        only_source.push(if p.category == Category::SecondLanguage {
            params.second_language_source.clone()
        } else {
            None
        });
        pos.push(i as u32);
    }
    DataFrame::new_infer_height(vec![
        Column::new("prompt_id".into(), id),
        Column::new("category".into(), cat),
        Column::new("sft".into(), sft),
        Column::new("only_source".into(), only_source),
        Column::new("pos".into(), pos),
    ])
    .map_err(pe("prompts"))
}

pub fn apply(
    live: &[&Prompt],
    split: &HashMap<String, bool>,
    samples: &DataFrame,
    annotations: &DataFrame,
    params: &ConstructParams,
    all: &HashMap<&str, &Prompt>,
) -> Result<RuleOutput, DataError> {
    let known: HashSet<&str> = all.keys().copied().collect();
    check_inputs(samples, annotations, &known)?;
    let keys = ["prompt_id", "source", "sample_index"];
    let prompts = prompts_frame(live, split, params)?;
    let joined = samples
        .clone()
        .lazy()
        .select([
            col("prompt_id"),
            col("source"),
            col("sample_index"),
            col("text"),
        ])
        .join(
            annotations.clone().lazy().select([
                col("prompt_id"),
                col("source"),
                col("sample_index"),
                col("score"),
                col("correct"),
            ]),
            keys.map(col),
            keys.map(col),
            JoinArgs::new(JoinType::Left),
        )
        .join(
            prompts.clone().lazy(),
            [col("prompt_id")],
            [col("prompt_id")],
            JoinArgs::new(JoinType::Inner),
        )
        .collect()
        .map_err(pe("joining samples, annotations and prompts"))?;

    // Every live answer needs a score; math and code answers a verdict.
    let no_score = joined.column("score").map_err(pe("scores"))?.is_null();
    if let Some(i) = first_true(&no_score) {
        return Err(DataError::Invalid(format!(
            "{} has no reward score (is it missing from the annotations?)",
            sample_name(&joined, i)
        )));
    }
    let checked = joined
        .clone()
        .lazy()
        .select([(col("category")
            .eq(lit("math"))
            .or(col("category").eq(lit("code"))))
        .and(col("correct").is_null())
        .alias("m")])
        .collect()
        .map_err(pe("verdicts"))?;
    if let Some(i) = first_true(
        checked
            .column("m")
            .and_then(|c| c.bool().cloned())
            .map_err(pe("verdicts"))?
            .as_ref(),
    ) {
        return Err(DataError::Invalid(format!(
            "{} has no correctness verdict, which its category needs",
            sample_name(&joined, i)
        )));
    }

    // Sorting and grouping run on integers: the prompt's position and the source's rank in name
    // order stand for the strings (row-encoding strings for every multi-key sort dominated the run).
    let mut names: Vec<String> = {
        let u = joined
            .column("source")
            .and_then(|c| c.unique())
            .map_err(pe("sources"))?;
        let u = u.str().map_err(pe("sources"))?;
        (0..u.len())
            .filter_map(|i| u.get(i).map(str::to_string))
            .collect()
    };
    names.sort();
    let ranks = DataFrame::new_infer_height(vec![
        Column::new("source".into(), names.clone()),
        Column::new(
            "src_rank".into(),
            (0..names.len() as u32).collect::<Vec<_>>(),
        ),
    ])
    .map_err(pe("sources"))?;
    let joined = joined
        .lazy()
        .join(
            ranks.lazy(),
            [col("source")],
            [col("source")],
            JoinArgs::new(JoinType::Inner),
        )
        .collect()
        .map_err(pe("sources"))?;
    let facts = facts(&joined)?;

    // Per-prompt facts as window expressions, then the prompts the rules drop outright.
    let is_code = col("category").eq(lit("code"));
    let ok = col("correct").fill_null(lit(false));
    let per_prompt = |e: Expr| e.over([col("pos")]).map_err(pe("per-prompt counts"));
    let with_facts = joined
        .lazy()
        .with_columns([
            per_prompt(len())?.alias("n"),
            per_prompt(col("text").n_unique())?.alias("n_distinct"),
            per_prompt(ok.clone().cast(DataType::UInt32).sum())?.alias("n_correct"),
        ])
        .with_columns([(lit(params.drop_identical)
            .and(col("n").gt(lit(1)))
            .and(col("n_distinct").eq(lit(1))))
        .or(lit(params.drop_all_fail_code)
            .and(is_code.clone())
            .and(col("n_correct").eq(lit(0))))
        .alias("excluded")])
        .filter(col("excluded").not());
    let needs_check = col("category").eq(lit("math")).or(is_code);
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
            col("only_source")
                .is_null()
                .or(col("source").eq(col("only_source"))),
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
            col("prompt_id"),
            col("category"),
            col("source"),
            col("src_rank"),
            col("sample_index"),
            col("text"),
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
        col("text").alias("r_text"),
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
    let exempt = params
        .gap_exempt
        .iter()
        .fold(lit(false), |e, c| e.or(col("category").eq(lit(c.name()))));
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
        pairs = pairs.filter(col("text").neq(col("r_text")));
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

    let sft_rows = sft_rows(&sft, all)?;
    let dpo_rows = dpo_pairs(&dpo, all)?;
    let done: HashSet<&str> = sft_rows
        .iter()
        .map(|r| r.prompt_id.as_str())
        .chain(dpo_rows.iter().map(|r| r.prompt_id.as_str()))
        .collect();
    let pos_of: HashMap<&str, u32> = live
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id.as_str(), i as u32))
        .collect();
    let mut dropped = Vec::new();
    for p in live {
        if done.contains(p.id.as_str()) {
            continue;
        }
        let f = facts
            .get(&pos_of[p.id.as_str()])
            .copied()
            .unwrap_or_default();
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
            col("text")
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

struct Cols {
    id: StringChunked,
    source: StringChunked,
    index: UInt32Chunked,
    text: StringChunked,
    score: Float64Chunked,
}

fn cols(df: &DataFrame, prefix: &str) -> Result<Cols, DataError> {
    let c = |n: &str| df.column(n).map_err(pe("reading rows"));
    let name = |n: &str| format!("{prefix}{n}");
    let (index, text, score) = if prefix.is_empty() {
        (
            "sample_index".to_string(),
            "text".to_string(),
            "score".to_string(),
        )
    } else {
        (name("index"), name("text"), name("score"))
    };
    Ok(Cols {
        id: c("prompt_id")?.str().map_err(pe("ids"))?.clone(),
        source: c("source")?.str().map_err(pe("sources"))?.clone(),
        index: c(&index)?.u32().map_err(pe("indices"))?.clone(),
        text: c(&text)?.str().map_err(pe("texts"))?.clone(),
        score: c(&score)?.f64().map_err(pe("scores"))?.clone(),
    })
}

fn sft_rows(df: &DataFrame, all: &HashMap<&str, &Prompt>) -> Result<Vec<SftRow>, DataError> {
    let c = cols(df, "")?;
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let p = all[c.id.get(i).unwrap_or_default()];
        let mut messages = p.messages.clone();
        messages.push(Message::new("assistant", c.text.get(i).unwrap_or_default()));
        out.push(SftRow {
            prompt_id: p.id.clone(),
            dataset: p.dataset.clone(),
            category: p.category,
            source: c.source.get(i).unwrap_or_default().to_string(),
            sample_index: c.index.get(i).unwrap_or_default(),
            messages,
            score: c.score.get(i),
        });
    }
    Ok(out)
}

fn dpo_pairs(df: &DataFrame, all: &HashMap<&str, &Prompt>) -> Result<Vec<DpoPair>, DataError> {
    let w = cols(df, "")?;
    let l = cols(df, "r_")?;
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let p = all[w.id.get(i).unwrap_or_default()];
        out.push(DpoPair {
            prompt_id: p.id.clone(),
            dataset: p.dataset.clone(),
            category: p.category,
            source: w.source.get(i).unwrap_or_default().to_string(),
            prompt: p.messages.clone(),
            chosen: vec![Message::new("assistant", w.text.get(i).unwrap_or_default())],
            rejected: vec![Message::new("assistant", l.text.get(i).unwrap_or_default())],
            chosen_index: w.index.get(i).unwrap_or_default(),
            rejected_index: l.index.get(i).unwrap_or_default(),
            chosen_score: w.score.get(i),
            rejected_score: l.score.get(i),
        });
    }
    Ok(out)
}
