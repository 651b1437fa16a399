//! An evaluation's output directory, the same for `fuselab eval` and for experiment steps:
//! `result.json` (summary, verdicts, per-item scores, settings), `answers.jsonl`, `items.jsonl`
//! (the prompts, for side-by-side reading), and the answers in the official tools' layouts —
//! human-eval / evalplus `samples.jsonl`, MT-Bench `model_answer/<model>.jsonl`, alpaca_eval
//! `model_outputs.json` — so results can be cross-checked with the tools people trust.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::bench::{Benchmark, Item, Kind};
use super::score::{self, Answer, BenchResult};
use super::EvalError;

fn put(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    crate::fs::write_durable(path, bytes).map_err(|e| EvalError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

fn jsonl(rows: impl IntoIterator<Item = Value>) -> Vec<u8> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&r.to_string());
        s.push('\n');
    }
    s.into_bytes()
}

/// Write everything; returns the `result.json` record.
pub fn write(
    dir: &Path,
    bench: &Benchmark,
    result: &BenchResult,
    answers: &[Answer],
    role: Option<&str>,
    category: Option<&str>,
    extra: Value,
) -> Result<Value, EvalError> {
    let items: BTreeMap<&str, &Item> = bench.items.iter().map(|i| (i.id.as_str(), i)).collect();
    let name = &result.model;
    put(
        &dir.join("answers.jsonl"),
        &jsonl(
            answers
                .iter()
                .map(|a| serde_json::to_value(a).expect("serialises")),
        ),
    )?;
    put(
        &dir.join("items.jsonl"),
        &jsonl(bench.items.iter().map(
            |i| json!({"id": i.id, "category": i.category, "prompt": i.turns.join("\n\n---\n\n")}),
        )),
    )?;
    let mut exports: Vec<PathBuf> = Vec::new();
    match bench.kind {
        Kind::Code => {
            let rows = answers.iter().map(|a| {
                let c = score::code_completion(
                    items[a.item.as_str()],
                    a.turns.last().map(String::as_str).unwrap_or(""),
                );
                json!({"task_id": a.item, "completion": c})
            });
            put(&dir.join("samples.jsonl"), &jsonl(rows))?;
            exports.push("samples.jsonl".into());
        }
        Kind::MtBench => {
            let rows = answers.iter().filter(|a| a.sample == 0).map(|a| {
                let qid: Value = a.item.parse::<u64>().map(Value::from).unwrap_or_else(|_| Value::from(a.item.clone()));
                json!({"question_id": qid, "answer_id": format!("{name}-{}", a.item), "model_id": name,
                       "choices": [{"index": 0, "turns": a.turns}], "tstamp": 0.0})
            });
            let rel = format!("model_answer/{}.jsonl", name.replace('/', "_"));
            put(&dir.join(&rel), &jsonl(rows))?;
            exports.push(rel.into());
        }
        _ => {}
    }
    let outputs: Vec<Value> = answers
        .iter()
        .filter(|a| a.sample == 0)
        .map(|a| json!({"instruction": items[a.item.as_str()].turns[0], "output": a.turns[0], "generator": name, "dataset": bench.name}))
        .collect();
    put(
        &dir.join("model_outputs.json"),
        &serde_json::to_vec_pretty(&outputs).expect("serialises"),
    )?;
    exports.push("model_outputs.json".into());
    let record = json!({
        "result": result,
        "role": role,
        "category": category,
        "benchmark": {"name": bench.name, "kind": bench.kind, "source": bench.source, "source_digest": bench.source_digest,
                      "generation": bench.generation, "items": bench.items.len()},
        "exports": exports,
        "extra": extra,
    });
    put(
        &dir.join("result.json"),
        &serde_json::to_vec_pretty(&record).expect("serialises"),
    )?;
    Ok(record)
}
