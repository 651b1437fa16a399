//! The fusion claim in numbers: the fused target against its base and its SFT stage on every
//! held-out item at once (paired tests over the pooled items), and per category how much of the gap
//! between the base and the best source the fused target closed. Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Evaluated;
use crate::eval::stats;

/// One model against another on the items both answered, pooled over every percent-scale benchmark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PooledTest {
    pub a: String,
    pub b: String,
    pub items: usize,
    /// Mean item scores in percent.
    pub a_mean: f64,
    pub b_mean: f64,
    pub diff: f64,
    pub diff_lo: f64,
    pub diff_hi: f64,
    /// Exact McNemar test (binary items) or paired-bootstrap p-value.
    pub p: f64,
    pub test: String,
}

/// How much of the base-to-best-source gap of one category the fused target closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GapRow {
    pub category: String,
    pub base: f64,
    pub fused: f64,
    pub best_source: String,
    pub best_source_score: f64,
    /// (fused - base) / (best source - base); `None` when no source beats the base.
    pub closed: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusionSummary {
    pub fused: String,
    pub tests: Vec<PooledTest>,
    pub gaps: Vec<GapRow>,
    /// The per-category table's `overall` of the fused target and of each source.
    pub fused_overall: f64,
    pub source_overall: BTreeMap<String, f64>,
    /// Whether the fused target's overall mean is above every single source's (`None` without
    /// sources).
    pub beats_every_source: Option<bool>,
}

fn model_of<'a>(evals: &'a [Evaluated], role: &str) -> Option<&'a str> {
    evals
        .iter()
        .find(|e| e.role == role)
        .map(|e| e.result.model.as_str())
}

/// (benchmark, item) -> score of one model, over percent-scale benchmarks.
fn items_of<'a>(evals: &'a [Evaluated], model: &str) -> BTreeMap<(&'a str, &'a str), f64> {
    let mut out = BTreeMap::new();
    for e in evals
        .iter()
        .filter(|e| e.result.model == model && e.result.scale == "percent")
    {
        for (i, s) in &e.result.item_scores {
            if let Some(s) = s {
                out.insert((e.result.bench.as_str(), i.as_str()), *s);
            }
        }
    }
    out
}

fn pooled(evals: &[Evaluated], a: &str, b: &str, seed: u64) -> Option<PooledTest> {
    let (ia, ib) = (items_of(evals, a), items_of(evals, b));
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (k, s) in &ia {
        if let Some(t) = ib.get(k) {
            x.push(*s);
            y.push(*t);
        }
    }
    if x.is_empty() {
        return None;
    }
    let p = stats::paired(&x, &y, stats::DEFAULT_ROUNDS, seed);
    let exact = p.test == "mcnemar-exact";
    Some(PooledTest {
        a: a.into(),
        b: b.into(),
        items: x.len(),
        a_mean: 100.0 * stats::mean(&x),
        b_mean: 100.0 * stats::mean(&y),
        diff: 100.0 * p.diff.value,
        diff_lo: 100.0 * p.diff.lo,
        diff_hi: 100.0 * p.diff.hi,
        p: if exact { p.p_exact } else { p.p_bootstrap },
        test: if exact {
            "McNemar exact"
        } else {
            "paired bootstrap"
        }
        .into(),
    })
}

/// The summary, when the evaluations hold a base and a fused model (else `None`).
pub fn summary(
    evals: &[Evaluated],
    means: &BTreeMap<String, BTreeMap<String, f64>>,
    seed: u64,
) -> Option<FusionSummary> {
    let base = model_of(evals, "base")?;
    let fused = model_of(evals, "fused")?;
    let mut tests = vec![pooled(evals, fused, base, seed)?];
    if let Some(sft) = model_of(evals, "sft") {
        tests.extend(pooled(evals, fused, sft, seed));
        tests.extend(pooled(evals, sft, base, seed));
    }
    let mut sources: Vec<&str> = evals
        .iter()
        .filter(|e| e.role == "source")
        .map(|e| e.result.model.as_str())
        .collect();
    sources.sort();
    sources.dedup();
    let score = |m: &str, c: &str| means.get(m).and_then(|x| x.get(c)).copied();
    let mut gaps = Vec::new();
    let categories: Vec<&String> = means
        .get(fused)
        .map(|m| m.keys().filter(|k| *k != "overall").collect())
        .unwrap_or_default();
    for c in categories {
        let (Some(b), Some(f)) = (score(base, c), score(fused, c)) else {
            continue;
        };
        let best = sources
            .iter()
            .filter_map(|s| score(s, c).map(|v| (*s, v)))
            .max_by(|x, y| x.1.total_cmp(&y.1));
        let Some((best, bv)) = best else { continue };
        gaps.push(GapRow {
            category: c.clone(),
            base: b,
            fused: f,
            best_source: best.into(),
            best_source_score: bv,
            closed: (bv > b).then(|| (f - b) / (bv - b)),
        });
    }
    let overall = |m: &str| score(m, "overall").unwrap_or(f64::NAN);
    let source_overall: BTreeMap<String, f64> = sources
        .iter()
        .map(|s| (s.to_string(), overall(s)))
        .collect();
    let fused_overall = overall(fused);
    Some(FusionSummary {
        fused: fused.into(),
        tests,
        gaps,
        fused_overall,
        beats_every_source: (!source_overall.is_empty())
            .then(|| source_overall.values().all(|&v| fused_overall > v)),
        source_overall,
    })
}
