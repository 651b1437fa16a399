//! Reading an experiment's report inputs out of the store: the latest successful invocation, each
//! step's run record (parameters, git commit, dirty flag) and output tree, and in those trees the
//! files the report knows: `result.json` (an evaluation), `metrics.jsonl` (a training run),
//! `composition.json` (a construction step).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::{Curve, Evaluated, Provenance, ReportData, ReportError};
use crate::eval::score::BenchResult;
use crate::recipe::records::Records;
use crate::store::{RecordId, Store};

fn store_err(what: impl Into<String>) -> impl FnOnce(crate::recipe::RecipeError) -> ReportError {
    let what = what.into();
    move |e| ReportError::Store {
        what,
        source: Box::new(e),
    }
}

/// An eval output directory (what `fuselab eval` and the experiments' eval steps write).
pub fn read_eval_dir(
    dir: &Path,
    digest: &str,
    step: &str,
) -> Result<Option<Evaluated>, ReportError> {
    read_eval(
        &|rel| std::fs::read(dir.join(rel)).ok(),
        &dir.display().to_string(),
        digest,
        step,
    )
}

/// An eval output read through `file(relative path)`; `at` names it in errors.
fn read_eval(
    file: &dyn Fn(&str) -> Option<Vec<u8>>,
    at: &str,
    digest: &str,
    step: &str,
) -> Result<Option<Evaluated>, ReportError> {
    let Some(bytes) = file("result.json") else {
        return Ok(None);
    };
    let path = Path::new(at).join("result.json");
    let bad = |msg: String| ReportError::File {
        path: path.clone(),
        msg,
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let result: BenchResult =
        serde_json::from_value(v.get("result").cloned().unwrap_or(Value::Null))
            .map_err(|e| bad(format!("not an eval result: {e}")))?;
    let role = v
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or("other")
        .to_string();
    let category = v
        .get("category")
        .and_then(Value::as_str)
        .unwrap_or(&result.bench)
        .to_string();
    let text = |rel: &str| {
        file(rel)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let mut prompts = BTreeMap::new();
    for l in text("items.jsonl").lines().filter(|l| !l.trim().is_empty()) {
        if let Ok(x) = serde_json::from_str::<Value>(l) {
            if let (Some(id), Some(p)) = (x["id"].as_str(), x["prompt"].as_str()) {
                prompts.insert(id.to_string(), p.to_string());
            }
        }
    }
    let mut answers = BTreeMap::new();
    for l in text("answers.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        if let Ok(a) = serde_json::from_str::<crate::eval::score::Answer>(l) {
            if a.sample == 0 {
                answers.insert(a.item, a.turns.join("\n\n---\n\n"));
            }
        }
    }
    let paper = v.pointer("/extra/paper").and_then(Value::as_f64);
    Ok(Some(Evaluated {
        paper,
        role,
        category,
        result,
        digest: digest.to_string(),
        step: step.to_string(),
        prompts,
        answers,
    }))
}

/// A trainer's `metrics.jsonl`: every numeric field per step except throughput.
pub fn read_curve(bytes: &[u8], step: &str) -> Option<Curve> {
    let text = String::from_utf8_lossy(bytes);
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(l) else {
            continue;
        };
        let Some(x) = m.get("step").and_then(Value::as_f64) else {
            continue;
        };
        for (k, v) in &m {
            if matches!(k.as_str(), "step" | "epoch" | "tokens" | "tokens_per_s") {
                continue;
            }
            if let Some(y) = v.as_f64().filter(|y| y.is_finite()) {
                series.entry(k.clone()).or_default().push((x, y));
            }
        }
    }
    (!series.is_empty()).then(|| Curve {
        step: step.to_string(),
        series,
    })
}

/// Everything the report of `experiment` shows, from the store.
/// A step's output tree manifest.
fn read_outputs(
    store: &Store,
    digest: &crate::store::Digest,
    step: &str,
) -> Result<crate::store::Tree, ReportError> {
    store.read_tree(digest).map_err(|e| ReportError::Store {
        what: format!("reading the outputs of step {step}"),
        source: Box::new(e),
    })
}

/// One file of an output tree, from its verified object (`None` when absent or damaged).
fn tree_file(store: &Store, tree: &crate::store::Tree, rel: &str) -> Option<Vec<u8>> {
    let e = tree.entries.iter().find(|e| e.path == rel)?;
    store.verify_object(&e.digest).ok()?;
    store.read_bytes(&e.digest).ok()
}

pub fn gather(store: &Store, experiment: &str, seed: u64) -> Result<ReportData, ReportError> {
    let records = Records::new(store);
    let invocations = records
        .invocations()
        .map_err(store_err("reading invocations"))?;
    let latest = |variant: bool| {
        invocations
            .iter()
            .filter(|i| i.experiment == experiment && i.succeeded)
            .filter(|i| variant || i.overrides.is_empty())
            .max_by(|a, b| a.started_at.cmp(&b.started_at))
    };
    let inv = latest(true)
        .cloned()
        .ok_or_else(|| ReportError::NotRun(experiment.to_string()))?;
    // A variant run (`--set`) is shown beside the latest run with the default parameters.
    let default_inv = if inv.overrides.is_empty() {
        None
    } else {
        latest(false).cloned()
    };
    let mut evals = Vec::new();
    let mut curves = Vec::new();
    let mut composition = None;
    let mut provenance = Vec::new();
    let (mut git_commit, mut git_dirty) = (None, false);
    for s in &inv.steps {
        let (Some(outputs), Some(run_id)) = (&s.outputs, &s.run_id) else {
            continue;
        };
        let id: RecordId =
            run_id
                .parse()
                .map_err(|e: crate::store::StoreError| ReportError::Store {
                    what: format!("run id {run_id}"),
                    source: Box::new(e),
                })?;
        let Some(rec) = records
            .run(&id)
            .map_err(store_err(format!("reading run {run_id}")))?
        else {
            continue;
        };
        if rec.source_path.is_some() {
            continue;
        }
        let digest = outputs.digest.to_string();
        if let Some(g) = &rec.git {
            if git_commit.is_none() || g.dirty {
                git_commit = g.commit.clone();
            }
            git_dirty |= g.dirty;
        }
        provenance.push(Provenance {
            step: s.step.clone(),
            run_id: run_id.clone(),
            key: rec.key.to_string(),
            digest: digest.clone(),
            params: rec.params.clone(),
            git_commit: rec.git.as_ref().and_then(|g| g.commit.clone()),
            git_dirty: rec.git.as_ref().is_some_and(|g| g.dirty),
            lineage_command: format!("fuselab lineage {}", &digest[..16]),
        });
        // Files are read from the step's tree manifest and its verified objects, not from a
        // checkout, so a report never races gc over checkouts/.
        if outputs.kind != crate::store::ArtifactKind::Tree {
            continue;
        }
        let tree = read_outputs(store, &outputs.digest, &s.step)?;
        let file = |rel: &str| tree_file(store, &tree, rel);
        if let Some(e) = read_eval(&file, &format!("step {}", s.step), &digest, &s.step)? {
            evals.push(e);
        }
        if let Some(c) = file("metrics.jsonl").and_then(|b| read_curve(&b, &s.step)) {
            curves.push(c);
        }
        if let Some(bytes) = file("composition.json") {
            composition = serde_json::from_slice(&bytes).ok();
        }
    }
    let mut variant = None;
    if let Some(d) = &default_inv {
        // Steps the variant shares with the default (same key) are already in the report.
        let shared: std::collections::BTreeSet<_> =
            inv.steps.iter().filter_map(|s| s.key).collect();
        for s in &d.steps {
            let Some(outputs) = &s.outputs else { continue };
            let digest = outputs.digest.to_string();
            let same = s.key.as_ref().is_some_and(|k| shared.contains(k));
            if same || outputs.kind != crate::store::ArtifactKind::Tree {
                continue;
            }
            let tree = read_outputs(store, &outputs.digest, &s.step)?;
            let file = |rel: &str| tree_file(store, &tree, rel);
            if let Some(mut e) = read_eval(&file, &format!("step {}", s.step), &digest, &s.step)? {
                if matches!(e.role.as_str(), "sft" | "fused") {
                    e.result.model = format!("{} (default)", e.result.model);
                    e.role = "default".into();
                    evals.push(e);
                }
            }
        }
        variant = Some(super::Variant {
            overrides: inv.overrides.clone(),
            default_invocation: d.id.clone(),
        });
    }
    let mut data = assemble(
        experiment,
        &inv.id,
        &inv.started_at,
        git_commit,
        git_dirty,
        evals,
        curves,
        composition,
        provenance,
        seed,
    );
    data.variant = variant;
    Ok(data)
}

#[allow(clippy::too_many_arguments)]
pub fn assemble(
    experiment: &str,
    invocation: &str,
    started_at: &str,
    git_commit: Option<String>,
    git_dirty: bool,
    evals: Vec<Evaluated>,
    curves: Vec<Curve>,
    composition: Option<Value>,
    provenance: Vec<Provenance>,
    seed: u64,
) -> ReportData {
    let (benches, comparisons) = super::bench_rows(&evals, seed);
    let mut models: Vec<(String, String)> = evals
        .iter()
        .map(|e| (e.result.model.clone(), e.role.clone()))
        .collect();
    models.sort_by_key(|(m, r)| (super::role_rank(r), m.clone()));
    models.dedup();
    let category_means = super::category_means(&evals);
    let fusion = super::fusion::summary(&evals, &category_means, seed);
    ReportData {
        experiment: experiment.to_string(),
        invocation: invocation.to_string(),
        started_at: started_at.to_string(),
        git_commit,
        git_dirty,
        fuselab_version: crate::recipe::fuselab_version().to_string(),
        models,
        category_means,
        fusion,
        variant: None,
        examples: super::examples(&evals, 5),
        benches,
        curves,
        composition,
        provenance,
        comparisons,
        multiple_comparison_note: super::multiple_comparison_note(comparisons),
    }
}
