//! The comparison report of an experiment: its numbers gathered from the store (`gather`: the
//! latest successful invocation's eval results, training metrics, construction composition, and
//! for every step the run record behind it), the paired statistics against the base model, and the
//! self-contained HTML page (`html`, minijinja autoescaped) with plotters SVG charts (`charts`).
//! `reports/<experiment>.json` carries the same numbers for scripts.

pub mod charts;
pub mod fusion;
pub mod gather;
pub mod html;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::eval::score::BenchResult;
use crate::eval::stats;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "experiment `{0}` has no successful run in this store: run it first (`fuselab run {0}`)"
    )]
    NotRun(String),
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{}: {msg}", path.display())]
    File {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("rendering the report: {0}")]
    Render(String),
}

/// Where a number came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub step: String,
    pub run_id: String,
    pub key: String,
    /// The step's output tree.
    pub digest: String,
    pub params: serde_json::Value,
    pub git_commit: Option<String>,
    pub git_dirty: bool,
    pub lineage_command: String,
}

/// One model's result on one benchmark, with its comparison against the base.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub model: String,
    pub role: String,
    pub score: f64,
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
    pub n_unscored: usize,
    /// Against the base model on the items both scored: difference (points), p-value of the paired
    /// test (McNemar exact for binary items, else the paired bootstrap), Holm-adjusted over the
    /// whole table, and whether that adjusted p is below 0.05.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_base: Option<VsBase>,
    /// The eval step's output tree.
    pub digest: String,
    pub step: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VsBase {
    pub diff: f64,
    pub diff_lo: f64,
    pub diff_hi: f64,
    pub p: f64,
    pub p_holm: f64,
    pub test: String,
    pub significant: bool,
    pub paired_items: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    pub bench: String,
    pub kind: String,
    pub scale: String,
    pub cells: Vec<Cell>,
    /// The paper's numbers for this benchmark, by model role, for full-scale recipes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub paper: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    /// The training step's name (sft, dpo, ...).
    pub step: String,
    /// metric -> (step, value), train and eval points.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub bench: String,
    pub item: String,
    pub prompt: String,
    /// (model, answer, verdict reason, score)
    pub answers: Vec<(String, String, String, Option<f64>)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportData {
    pub experiment: String,
    pub invocation: String,
    pub started_at: String,
    pub git_commit: Option<String>,
    pub git_dirty: bool,
    pub fuselab_version: String,
    /// Models in column order: base, sft, fused, then sources, then the rest.
    pub models: Vec<(String, String)>,
    pub benches: Vec<BenchRow>,
    /// model -> category -> plain mean of that model's benchmark scores in the category (the
    /// paper's convention), and "overall".
    pub category_means: BTreeMap<String, BTreeMap<String, f64>>,
    /// The fused target against base and SFT on all items, and the per-category gap closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<fusion::FusionSummary>,
    /// Set when the reported run overrode parameters: its overrides and the default run whose SFT
    /// and fused results are shown beside it (as `<model> (default)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<Variant>,
    pub curves: Vec<Curve>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composition: Option<serde_json::Value>,
    pub examples: Vec<Example>,
    pub provenance: Vec<Provenance>,
    pub comparisons: usize,
    pub multiple_comparison_note: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub overrides: Vec<String>,
    pub default_invocation: String,
}

/// Column order of model roles.
pub fn role_rank(role: &str) -> usize {
    match role {
        "base" => 0,
        "sft" => 1,
        "fused" => 2,
        "default" => 3,
        "source" => 4,
        _ => 5,
    }
}

/// A model's evaluation result with where it came from.
pub struct Evaluated {
    pub role: String,
    pub category: String,
    pub result: BenchResult,
    pub digest: String,
    pub step: String,
    pub prompts: BTreeMap<String, String>,
    pub answers: BTreeMap<String, String>,
    /// The paper's score for this role and benchmark, when the recipe records one.
    pub paper: Option<f64>,
}

/// The benchmark table with paired tests against the base, Holm-adjusted over every comparison.
pub fn bench_rows(evals: &[Evaluated], seed: u64) -> (Vec<BenchRow>, usize) {
    let mut by_bench: BTreeMap<&str, Vec<&Evaluated>> = BTreeMap::new();
    for e in evals {
        by_bench.entry(e.result.bench.as_str()).or_default().push(e);
    }
    let mut rows = Vec::new();
    let mut tests: Vec<(usize, usize, f64)> = Vec::new();
    for (bench, mut es) in by_bench {
        es.sort_by_key(|e| (role_rank(&e.role), e.result.model.clone()));
        let base = es.iter().find(|e| e.role == "base");
        let mut cells = Vec::new();
        for e in &es {
            let vs = base
                .filter(|b| b.result.model != e.result.model)
                .and_then(|b| {
                    let bs: BTreeMap<&str, Option<f64>> = b
                        .result
                        .item_scores
                        .iter()
                        .map(|(i, s)| (i.as_str(), *s))
                        .collect();
                    let (mut x, mut y) = (Vec::new(), Vec::new());
                    for (i, s) in &e.result.item_scores {
                        if let (Some(p), Some(Some(q))) = (s, bs.get(i.as_str())) {
                            x.push(*p);
                            y.push(*q);
                        }
                    }
                    if x.is_empty() {
                        return None;
                    }
                    let p = stats::paired(&x, &y, stats::DEFAULT_ROUNDS, seed);
                    let unit = if e.result.scale == "rating" {
                        1.0
                    } else {
                        100.0
                    };
                    let pv = if p.test == "mcnemar-exact" {
                        p.p_exact
                    } else {
                        p.p_bootstrap
                    };
                    Some(VsBase {
                        diff: p.diff.value * unit,
                        diff_lo: p.diff.lo * unit,
                        diff_hi: p.diff.hi * unit,
                        p: pv,
                        p_holm: pv,
                        test: if p.test == "mcnemar-exact" {
                            "McNemar exact"
                        } else {
                            "paired bootstrap"
                        }
                        .into(),
                        significant: false,
                        paired_items: x.len(),
                    })
                });
            if let Some(v) = &vs {
                tests.push((rows.len(), cells.len(), v.p));
            }
            cells.push(Cell {
                model: e.result.model.clone(),
                role: e.role.clone(),
                score: e.result.score.value,
                lo: e.result.score.lo,
                hi: e.result.score.hi,
                n: e.result.n_items,
                n_unscored: e.result.n_unscored,
                vs_base: vs,
                digest: e.digest.clone(),
                step: e.step.clone(),
            });
        }
        let paper = es
            .iter()
            .filter_map(|e| e.paper.map(|v| (e.role.clone(), v)))
            .collect();
        rows.push(BenchRow {
            bench: bench.to_string(),
            kind: es[0].result.kind.name().to_string(),
            scale: es[0].result.scale.clone(),
            cells,
            paper,
        });
    }
    let adjusted = stats::holm(&tests.iter().map(|t| t.2).collect::<Vec<_>>());
    for ((r, c, _), adj) in tests.iter().zip(&adjusted) {
        if let Some(v) = rows[*r].cells[*c].vs_base.as_mut() {
            v.p_holm = *adj;
            v.significant = *adj < 0.05;
        }
    }
    (rows, tests.len())
}

/// Per model: the plain mean of its benchmark scores per category (the benchmark's `category`
/// as the experiment declares it) and overall — the paper's averaging convention.
pub fn category_means(evals: &[Evaluated]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut acc: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for e in evals.iter().filter(|e| e.result.scale == "percent") {
        let m = acc.entry(e.result.model.clone()).or_default();
        m.entry(e.category.clone())
            .or_default()
            .push(e.result.score.value);
        m.entry("overall".into())
            .or_default()
            .push(e.result.score.value);
    }
    acc.into_iter()
        .map(|(m, cats)| {
            (
                m,
                cats.into_iter()
                    .map(|(c, v)| (c, stats::mean(&v)))
                    .collect(),
            )
        })
        .collect()
}

/// Side-by-side answers: for each benchmark, the first `n` items every model answered.
pub fn examples(evals: &[Evaluated], n: usize) -> Vec<Example> {
    let mut by_bench: BTreeMap<&str, Vec<&Evaluated>> = BTreeMap::new();
    for e in evals {
        by_bench.entry(e.result.bench.as_str()).or_default().push(e);
    }
    let mut out = Vec::new();
    for (bench, mut es) in by_bench {
        es.sort_by_key(|e| (role_rank(&e.role), e.result.model.clone()));
        let ids: Vec<&String> = es[0]
            .result
            .item_scores
            .iter()
            .map(|(i, _)| i)
            .filter(|i| es.iter().all(|e| e.answers.contains_key(*i)))
            .take(n)
            .collect();
        for id in ids {
            let answers = es
                .iter()
                .map(|e| {
                    let v = e
                        .result
                        .verdicts
                        .iter()
                        .find(|v| &v.item == id && v.sample == 0);
                    (
                        e.result.model.clone(),
                        e.answers[id].clone(),
                        v.map(|v| v.reason.clone()).unwrap_or_default(),
                        v.and_then(|v| v.score),
                    )
                })
                .collect();
            out.push(Example {
                bench: bench.to_string(),
                item: id.clone(),
                prompt: es[0].prompts.get(id).cloned().unwrap_or_default(),
                answers,
            });
        }
    }
    out
}

pub fn multiple_comparison_note(comparisons: usize) -> String {
    if comparisons <= 1 {
        return "One comparison against the base: its p-value is reported as is.".into();
    }
    format!(
        "{comparisons} comparisons against the base are made in this table; at p < 0.05 about {:.1} \
         would look significant by chance alone if nothing differed. The marks use Holm's step-down \
         adjustment over all {comparisons} (family-wise error 0.05); raw and adjusted p-values are both shown.",
        comparisons as f64 * 0.05
    )
}

/// Gather, render and write `<dir>/<experiment>.html` and `<dir>/<experiment>.json`.
pub fn write(
    store: &crate::store::Store,
    experiment: &str,
    dir: &std::path::Path,
    seed: u64,
) -> Result<(std::path::PathBuf, std::path::PathBuf, ReportData), ReportError> {
    let data = gather::gather(store, experiment, seed)?;
    let (h, j) = write_data(&data, dir)?;
    Ok((h, j, data))
}

/// Render and write a gathered report.
pub fn write_data(
    data: &ReportData,
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf), ReportError> {
    let page = html::render(data)?;
    let html_path = dir.join(format!("{}.html", data.experiment));
    let json_path = dir.join(format!("{}.json", data.experiment));
    let io = |p: &std::path::Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| ReportError::File {
            path: p,
            msg: e.to_string(),
        }
    };
    crate::fs::write_durable(&html_path, page.as_bytes()).map_err(io(&html_path))?;
    let json = serde_json::to_vec_pretty(data).map_err(|e| ReportError::Render(e.to_string()))?;
    crate::fs::write_durable(&json_path, &json).map_err(io(&json_path))?;
    Ok((html_path, json_path))
}
