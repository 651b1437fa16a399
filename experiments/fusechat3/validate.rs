//! Every input of a full-scale recipe checked before anything runs: checkpoint directories
//! (config.json, weights and their shards, tokenizer, chat template, a reward head for the
//! reward model), prompt datasets (readable, prompts, gold answers for math, tests for code) and
//! the decontamination benchmarks. Each problem names the `--set` key and the file at fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{DatasetInput, ModelInput, ScaleParams};
use crate::data::import::{import, Imported};
use crate::data::{Category, Prompt};
use crate::eval::bench::{self, Benchmark};
use crate::model::ModelConfig;

/// What validation found: the problems, and the config of every model (the checkpoint's own
/// where it is readable, else the bundled published one) and row count of every dataset (read,
/// else METHOD.md's figure), for the estimates.
pub struct Checked {
    pub problems: Vec<String>,
    pub configs: BTreeMap<String, ModelConfig>,
    pub rows: BTreeMap<String, u64>,
    /// Answers (items x turns) of every benchmark that could be read.
    pub items: BTreeMap<String, usize>,
}

/// The published config.json files of the models METHOD.md names, as bundled.
fn bundled(reference: &str) -> Option<&'static str> {
    Some(match reference {
        "meta-llama/Llama-3.1-8B-Instruct" => include_str!("configs/Llama-3.1-8B-Instruct.json"),
        "meta-llama/Llama-3.1-70B-Instruct" => {
            include_str!("configs/Llama-3.1-70B-Instruct.json")
        }
        "meta-llama/Llama-3.2-3B-Instruct" => include_str!("configs/Llama-3.2-3B-Instruct.json"),
        "meta-llama/Llama-3.2-1B-Instruct" => include_str!("configs/Llama-3.2-1B-Instruct.json"),
        "Qwen/Qwen2.5-7B-Instruct" => include_str!("configs/Qwen2.5-7B-Instruct.json"),
        "Qwen/Qwen2.5-72B-Instruct" => include_str!("configs/Qwen2.5-72B-Instruct.json"),
        "Qwen/Qwen2.5-Math-72B-Instruct" => include_str!("configs/Qwen2.5-Math-72B-Instruct.json"),
        "google/gemma-2-9b-it" => include_str!("configs/gemma-2-9b-it.json"),
        "google/gemma-2-27b-it" => include_str!("configs/gemma-2-27b-it.json"),
        "mistralai/Mistral-Large-Instruct-2407" => {
            include_str!("configs/Mistral-Large-Instruct-2407.json")
        }
        "RLHFlow/ArmoRM-Llama3-8B-v0.1" => include_str!("configs/ArmoRM-Llama3-8B-v0.1.json"),
        _ => return None,
    })
}

pub fn reference_config(reference: &str) -> Result<ModelConfig, String> {
    let text = bundled(reference).ok_or_else(|| {
        format!("no bundled config for `{reference}`; give the checkpoint's path")
    })?;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("{reference}: {e}"))?;
    ModelConfig::from_value(v, Path::new(reference)).map_err(|e| e.to_string())
}

/// A Hugging Face checkpoint directory as the recipe needs it.
pub fn checkpoint(dir: &Path, reward: bool) -> Result<ModelConfig, String> {
    if !dir.is_dir() {
        return Err(format!("{}: no such directory", dir.display()));
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(format!("{}: missing", config_path.display()));
    }
    let cfg = ModelConfig::from_file(&config_path).map_err(|e| e.to_string())?;
    let arch = cfg
        .raw
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if reward
        && !(arch == "LlamaForRewardModelWithGating" || arch.ends_with("ForSequenceClassification"))
    {
        return Err(format!(
            "{}: architectures [{arch}] is not a reward model (LlamaForRewardModelWithGating or *ForSequenceClassification)",
            config_path.display()
        ));
    }
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| format!("{}: no `weight_map`", index.display()))?;
        let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            if !dir.join(s).is_file() {
                return Err(format!(
                    "{} names shard {s}, which is missing",
                    index.display()
                ));
            }
        }
    } else if !single.is_file() {
        return Err(format!(
            "{}: no weights (model.safetensors or model.safetensors.index.json)",
            dir.display()
        ));
    }
    if !dir.join("tokenizer.json").is_file() {
        return Err(format!("{}: missing", dir.join("tokenizer.json").display()));
    }
    let tc = dir.join("tokenizer_config.json");
    let has_template = dir.join("chat_template.jinja").is_file()
        || std::fs::read_to_string(&tc)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| v.get("chat_template").is_some_and(|t| !t.is_null()));
    if !has_template {
        return Err(format!(
            "{}: no chat template (`chat_template` in tokenizer_config.json, or chat_template.jinja)",
            dir.display()
        ));
    }
    Ok(cfg)
}

fn model(
    m: &ModelInput,
    set: &str,
    reward: bool,
    problems: &mut Vec<String>,
    configs: &mut BTreeMap<String, ModelConfig>,
) {
    let checked = match &m.path {
        None => Err(format!(
            "`{set}` is not set: the local checkpoint directory of {}",
            m.reference
        )),
        Some(p) => checkpoint(Path::new(p), reward)
            .map_err(|e| format!("`{set}`: {e}"))
            .and_then(|c| {
                // A swapped path is the likely mistake; the family tells it.
                match reference_config(&m.reference) {
                    Ok(r) if r.family != c.family => Err(format!(
                        "`{set}`: {p} holds a {} checkpoint, but {} is {}",
                        c.family.model_type(),
                        m.reference,
                        r.family.model_type()
                    )),
                    _ => Ok(c),
                }
            }),
    };
    let cfg = match checked {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(e);
            reference_config(&m.reference)
                .map_err(|e| problems.push(format!("`{set}`: {e}")))
                .ok()
        }
    };
    if let Some(c) = cfg {
        configs.insert(m.name.clone(), c);
    }
}

fn dataset(d: &DatasetInput, set: &str) -> Result<u64, String> {
    let Some(path) = &d.path else {
        return Err(format!(
            "`{set}` is not set: the {} prompts (JSONL, JSON or Parquet)",
            d.name
        ));
    };
    let path = Path::new(path);
    let prefix = set.trim_end_matches(".path");
    if !path.is_file() {
        return Err(format!("`{set}`: {}: no such file", path.display()));
    }
    let prompts = import_prompts(path, d).map_err(|e| {
        let hint = match d.category {
            Category::Math => format!(" (for this recipe: --set {prefix}.gold_field=NAME)"),
            Category::Code => format!(" (for this recipe: --set {prefix}.tests_field=NAME)"),
            _ => String::new(),
        };
        format!("`{set}`: {e}{hint}")
    })?;
    Ok(prompts.len() as u64)
}

/// The shared-data directory of a benchmark the recipe names.
pub fn benchmark_dir(name: &str) -> Result<PathBuf, String> {
    bench::builtin_dir(name).ok_or_else(|| unknown_benchmark(name))
}

fn unknown_benchmark(name: &str) -> String {
    format!("unknown benchmark `{name}` (humaneval or mt-bench)")
}

/// A benchmark read from its directory (an input of the step, so its digest is in the key).
pub fn load_benchmark(name: &str, dir: &Path) -> Result<Benchmark, String> {
    bench::load_builtin(name, dir)
        .ok_or_else(|| unknown_benchmark(name))?
        .map_err(|e| e.to_string())
}

/// A dataset's prompts, ids as the file gives them.
pub fn import_prompts(path: &Path, d: &DatasetInput) -> Result<Vec<Prompt>, String> {
    match import(path, &super::mapping(d)).map_err(|e| e.to_string())? {
        Imported::Prompts(v) => Ok(v),
        other => Err(format!(
            "{}: holds {:?} records, not prompts",
            path.display(),
            other.kind()
        )),
    }
}

pub fn inputs(p: &ScaleParams) -> Checked {
    let mut problems = Vec::new();
    let mut configs = BTreeMap::new();
    model(&p.target, "target.path", false, &mut problems, &mut configs);
    for s in &p.sources {
        model(
            &s.model,
            &format!("sources.{}.path", s.model.name),
            false,
            &mut problems,
            &mut configs,
        );
    }
    model(
        &p.reward_model,
        "reward_model.path",
        true,
        &mut problems,
        &mut configs,
    );
    let mut rows = BTreeMap::new();
    for d in &p.datasets {
        match dataset(d, &format!("datasets.{}.path", d.name)) {
            Ok(n) => {
                rows.insert(d.name.clone(), n);
            }
            Err(e) => {
                problems.push(e);
                rows.insert(d.name.clone(), d.rows);
            }
        }
    }
    let mut items = BTreeMap::new();
    for b in p.decontaminate.iter().chain(&p.eval.benchmarks) {
        match benchmark_dir(b).and_then(|dir| load_benchmark(b, &dir)) {
            Ok(bench) => {
                let answers = bench.items.iter().map(|i| i.turns.len()).sum::<usize>();
                items.insert(b.clone(), answers);
            }
            Err(e) => problems.push(format!("benchmark `{b}`: {e}")),
        }
    }
    Checked {
        problems,
        configs,
        rows,
        items,
    }
}
