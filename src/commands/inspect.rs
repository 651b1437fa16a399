//! `list`, `show`, `lineage`, `diff`: read-only views over run records and the store.

use std::collections::BTreeMap;

use anyhow::bail;
use fuselab::experiments::registry;
use fuselab::recipe::lineage::{Direction, LineageIndex};
use fuselab::recipe::records::{Invocation, Records, RunRecord};
use fuselab::recipe::{flatten, RecipeError, StepStatus};
use fuselab::store::{Digest, RecordId, Store, StoreError};
use serde_json::{json, Value};

use super::{human_bytes, open_store, print_json, Status};
use crate::cli::{DiffArgs, JsonFlag, LineageArgs, LineageFormat, ShowArgs};

pub fn list(store_path: &std::path::Path, args: &JsonFlag) -> Status {
    // The experiments are listed even before the first run has made a store.
    let store = Store::open_or_absent(store_path).map_err(|e| {
        anyhow::anyhow!(e).context(format!("opening the store at {}", store_path.display()))
    })?;
    let records = Records::new(&store);
    let reg = registry();
    let mut experiments = Vec::new();
    for def in &reg {
        let steps = def
            .instantiate(def.defaults())
            .map(|e| e.step_names())
            .unwrap_or_default();
        experiments.push(json!({
            "name": def.name,
            "description": def.description,
            "steps": steps,
            "params": def.defaults(),
        }));
    }
    let invocations: Vec<Invocation> = records.invocations()?.into_iter().take(20).collect();
    if args.json {
        print_json(&json!({"experiments": experiments, "recent_runs": invocations}));
        return Ok(0);
    }
    println!("experiments:");
    let width = reg.iter().map(|d| d.name.len()).max().unwrap_or(0);
    for (def, e) in reg.iter().zip(&experiments) {
        println!(
            "  {:<width$} {} ({} steps)",
            def.name,
            def.description,
            e["steps"].as_array().map_or(0, |a| a.len())
        );
    }
    println!("recent runs:");
    if invocations.is_empty() {
        println!("  (none yet: try `fuselab run hello`)");
    }
    for inv in &invocations {
        let count = |s: StepStatus| inv.steps.iter().filter(|x| x.status == s).count();
        println!(
            "  {}  {:<12} {:<7} {} ran, {} cached  {:.2}s",
            inv.id,
            inv.experiment,
            if inv.succeeded { "ok" } else { "FAILED" },
            count(StepStatus::Ran),
            count(StepStatus::Cached),
            inv.duration_s
        );
    }
    Ok(0)
}

fn print_run(r: &RunRecord) {
    println!("run {}", r.run_id);
    println!(
        "  step        {}/{} (kind {}, v{})",
        r.experiment, r.step, r.kind, r.version
    );
    println!("  status      {:?}", r.status);
    if let Some(e) = &r.error {
        println!("  error       {e}");
    }
    println!("  key         {}", r.key);
    if let Some(p) = &r.source_path {
        println!("  raw input   {p}");
    }
    if !r.params.is_null() {
        println!("  params      {}", r.params);
    }
    println!("  seed        {}", r.seed);
    for i in &r.inputs {
        println!(
            "  input       {} {} ({})",
            i.name,
            i.artifact.digest,
            human_bytes(i.artifact.size)
        );
    }
    if let Some(o) = &r.outputs {
        println!("  output      {} ({})", o.digest, human_bytes(o.size));
    }
    for (k, v) in &r.metrics {
        println!("  metric      {k} = {v}");
    }
    if let Some(g) = &r.git {
        println!(
            "  git         {} {}{}",
            g.commit.as_deref().unwrap_or("(no commit)"),
            g.branch.as_deref().unwrap_or(""),
            if g.dirty { " dirty" } else { "" }
        );
        if let Some(d) = g.diff {
            println!("  git diff    {d} (fuselab store cat {})", d.short());
        }
    }
    println!("  host        {} pid {}", r.host, r.pid);
    println!("  started     {} ({:.3}s)", r.started_at, r.duration_s);
    println!("  executor    {}", r.executor);
    println!(
        "  tools       fuselab {} / {} / {} / Cargo.lock {}",
        r.tools.fuselab,
        r.tools.rustc,
        r.tools.profile,
        r.tools.cargo_lock.short()
    );
}

fn resolve_digest(store: &Store, index: &LineageIndex, text: &str) -> anyhow::Result<Digest> {
    let lower = text.to_ascii_lowercase();
    let known: Vec<Digest> = {
        let mut v: Vec<Digest> = index
            .digests()
            .filter(|d| d.to_string().starts_with(&lower))
            .copied()
            .collect();
        v.sort();
        v.dedup();
        v
    };
    match known.as_slice() {
        [one] => Ok(*one),
        [] => Ok(store.resolve_prefix(&lower)?),
        many => Err(StoreError::AmbiguousPrefix {
            prefix: lower,
            matches: many.to_vec(),
        }
        .into()),
    }
}

pub fn show(store_path: &std::path::Path, args: &ShowArgs) -> Status {
    let store = open_store(store_path)?;
    let records = Records::new(&store);
    {
        if let Some(r) = records.run(&args.what)? {
            if args.json {
                print_json(&r);
            } else {
                print_run(&r);
            }
            return Ok(0);
        }
        if let Some(inv) = records.invocation(&args.what)? {
            if args.json {
                print_json(&inv);
            } else {
                println!("invocation {} of {}", inv.id, inv.experiment);
                println!(
                    "  started {} ({:.2}s), {}",
                    inv.started_at,
                    inv.duration_s,
                    if inv.succeeded { "succeeded" } else { "FAILED" }
                );
                if let Some(e) = &inv.error {
                    println!("  error {e}");
                }
                for s in &inv.steps {
                    println!(
                        "  {:<8} {:<16} {}  {}",
                        format!("{:?}", s.status).to_lowercase(),
                        s.step,
                        s.outputs
                            .as_ref()
                            .map(|o| o.digest.short())
                            .unwrap_or_default(),
                        s.run_id.as_deref().unwrap_or("")
                    );
                }
            }
            return Ok(0);
        }
    }
    if !args.what.as_str().chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(RecipeError::NotFound {
            what: args.what.to_string(),
        }
        .into());
    }
    let runs = readable_runs(&records)?;
    let index = LineageIndex::new(runs.clone());
    let d = resolve_digest(&store, &index, args.what.as_str())?;
    let tree = store.read_tree(&d).ok();
    let size = std::fs::metadata(store.object_path(&d))
        .map(|m| m.len())
        .ok();
    let producers: Vec<Value> = runs
        .into_iter()
        .filter(|r| r.outputs.as_ref().is_some_and(|o| o.digest == d))
        .map(|r| json!({"run_id": r.run_id, "experiment": r.experiment, "step": r.step, "source_path": r.source_path}))
        .collect();
    if args.json {
        print_json(&json!({
            "digest": d,
            "kind": if tree.is_some() { "tree" } else { "blob" },
            "stored": size.is_some(),
            "object_size": size,
            "entries": tree.as_ref().map(|t| &t.entries),
            "produced_by": producers,
        }));
        return Ok(0);
    }
    println!("artifact {d}");
    match (&tree, size) {
        (_, None) => println!("  not in the store (gc'd, or only mentioned by records)"),
        (Some(t), _) => {
            println!(
                "  tree of {} files, {}",
                t.entries.len(),
                human_bytes(t.size())
            );
            for e in &t.entries {
                println!(
                    "    {}  {:>10}  {}",
                    e.digest.short(),
                    human_bytes(e.size),
                    e.path
                );
            }
        }
        (None, Some(n)) => println!("  blob, {}", human_bytes(n)),
    }
    for p in &producers {
        println!(
            "  produced by {}/{} run {}",
            p["experiment"].as_str().unwrap_or(""),
            p["step"].as_str().unwrap_or(""),
            p["run_id"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

pub fn lineage(store_path: &std::path::Path, args: &LineageArgs) -> Status {
    let store = open_store(store_path)?;
    let records = Records::new(&store);
    let index = LineageIndex::new(readable_runs(&records)?);
    let d = resolve_digest(&store, &index, &args.digest)?;
    if !index.knows(&d) {
        bail!("no run record mentions artifact {d}: it was not produced or consumed by any step");
    }
    let direction = if args.reverse {
        Direction::Down
    } else {
        Direction::Up
    };
    let lineage = index.walk(d, direction);
    match args.format {
        LineageFormat::Json => print_json(&lineage),
        LineageFormat::Dot => print!("{}", lineage.to_dot()),
        LineageFormat::Text => print!("{}", lineage.to_text()),
    }
    Ok(0)
}

/// The run records that parse; the others are named on stderr (fsck lists them too) rather than
/// stopping the command.
fn readable_runs(records: &Records) -> anyhow::Result<Vec<RunRecord>> {
    let (runs, bad) = records.runs()?;
    for b in bad {
        eprintln!(
            "warning: skipping unreadable run record {}: {}",
            b.path.display(),
            b.reason
        );
    }
    Ok(runs)
}

/// A run or an invocation, flattened to comparable `key -> value` pairs.
fn flatten_target(records: &Records, id: &RecordId) -> anyhow::Result<BTreeMap<String, Value>> {
    let run_view = |r: &RunRecord| -> BTreeMap<String, Value> {
        let mut v = json!({
            "step": format!("{}/{}", r.experiment, r.step),
            "version": r.version,
            "seed": r.seed,
            "params": r.params,
            "metrics": r.metrics,
            "outputs": r.outputs.as_ref().map(|o| o.digest),
            "status": r.status,
            "git": r.git.as_ref().map(|g| json!({"commit": g.commit, "dirty": g.dirty})),
        });
        let inputs: serde_json::Map<String, Value> = r
            .inputs
            .iter()
            .map(|i| (i.name.clone(), json!(i.artifact.digest)))
            .collect();
        v["inputs"] = Value::Object(inputs);
        flatten(&v)
    };
    if let Some(r) = records.run(id)? {
        return Ok(run_view(&r));
    }
    if let Some(inv) = records.invocation(id)? {
        let mut out = BTreeMap::new();
        out.insert("experiment".into(), json!(inv.experiment));
        for (k, v) in flatten(&inv.params) {
            out.insert(format!("params.{k}"), v);
        }
        for s in &inv.steps {
            out.insert(
                format!("{}.outputs", s.step),
                json!(s.outputs.as_ref().map(|o| o.digest)),
            );
            if let Some(r) = s
                .run_id
                .as_deref()
                .and_then(|id| id.parse::<RecordId>().ok())
                .map(|id| records.run(&id))
                .transpose()?
                .flatten()
            {
                for (k, v) in flatten(&json!({"metrics": r.metrics, "version": r.version})) {
                    out.insert(format!("{}.{k}", s.step), v);
                }
            }
        }
        return Ok(out);
    }
    Err(RecipeError::NotFound {
        what: id.to_string(),
    }
    .into())
}

pub fn diff(store_path: &std::path::Path, args: &DiffArgs) -> Status {
    let store = open_store(store_path)?;
    let records = Records::new(&store);
    let a = flatten_target(&records, &args.a)?;
    let b = flatten_target(&records, &args.b)?;
    let mut changed = Vec::new();
    let mut only_a = Vec::new();
    let mut only_b = Vec::new();
    for (k, va) in &a {
        match b.get(k) {
            Some(vb) if vb != va => changed.push(json!({"key": k, "a": va, "b": vb})),
            Some(_) => {}
            None => only_a.push(json!({"key": k, "value": va})),
        }
    }
    for (k, vb) in &b {
        if !a.contains_key(k) {
            only_b.push(json!({"key": k, "value": vb}));
        }
    }
    if args.json {
        print_json(
            &json!({"a": args.a, "b": args.b, "changed": changed, "only_a": only_a, "only_b": only_b}),
        );
        return Ok(0);
    }
    if changed.is_empty() && only_a.is_empty() && only_b.is_empty() {
        println!("no differences in parameters, metrics or outputs");
    }
    for c in &changed {
        println!(
            "  {}: {} -> {}",
            c["key"].as_str().unwrap_or(""),
            c["a"],
            c["b"]
        );
    }
    for c in &only_a {
        println!("- {}: {}", c["key"].as_str().unwrap_or(""), c["value"]);
    }
    for c in &only_b {
        println!("+ {}: {}", c["key"].as_str().unwrap_or(""), c["value"]);
    }
    Ok(0)
}
