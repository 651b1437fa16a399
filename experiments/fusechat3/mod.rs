//! The full-scale FuseChat-3.0 recipes (`fusechat3-<target>`): METHOD.md's sources, reward model,
//! datasets and per-target hyperparameters on real checkpoints given by path. Every input is
//! validated when the recipe is declared; `fuselab plan` shows the DAG with each step's
//! parameters, tokens, FLOPs, GPU-hours and memory (from the checkpoints' config.json, or the
//! published configs in `configs/` while a path is unset), and `run` refuses until every input
//! is there.
//!
//! ```text
//! dataset-* -> prompts -> sample-<source> (5 sources, METHOD's sampling) -> annotate (ArmoRM,
//! math / code verdicts) -> construct (decontaminated against the benchmarks) -> sft -> dpo
//! eval-{target,sft,fused}-humaneval
//! ```

mod estimate;
mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::construct::{ConstructParams, EvalText};
use crate::data::import::{Layout, Mapping};
use crate::data::{read_records, write_records, Category, Prompt};
use crate::experiments::common::{evaluate_checkpoint, EvalSpec, R};
use crate::experiments::fusechat::steps as fc;
use crate::experiments::fusechat::{DpoStage, SamplingStage};
use crate::generate::SamplingParams;
use crate::recipe::{step, Experiment, ExperimentDef, Handle, Result, StepCtx};
use crate::train::{DpoLoss, TrainConfig};

pub use estimate::Hardware;

/// A checkpoint the recipe reads: its local path (unset until given with `--set`) and the
/// published config it is expected to match, used for estimates while the path is unset.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInput {
    pub name: String,
    /// A Hugging Face checkpoint directory.
    pub path: Option<String>,
    /// The Hub id whose config.json is bundled in `experiments/fusechat3/configs/`.
    pub reference: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceInput {
    #[serde(flatten)]
    pub model: ModelInput,
    pub sampling: SamplingParams,
    /// Answers per prompt of each category this source answers (absent: none).
    pub samples_per_category: BTreeMap<Category, u32>,
}

/// One prompt dataset of METHOD.md's composition table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatasetInput {
    pub name: String,
    /// A JSONL / JSON / Parquet file of prompts.
    pub path: Option<String>,
    pub category: Category,
    pub language: String,
    /// Rows in the released set (SFT + DPO), for estimates until the file is given.
    pub rows: u64,
    pub layout: Layout,
    #[serde(default)]
    pub prompt_field: Option<String>,
    #[serde(default)]
    pub gold_field: Option<String>,
    #[serde(default)]
    pub tests_field: Option<String>,
    #[serde(default)]
    pub entry_point_field: Option<String>,
}

/// Mean lengths in tokens, by category: the sources state none, so they are recorded
/// assumptions that only the estimates use.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lengths {
    pub prompt: BTreeMap<Category, f64>,
    pub answer: BTreeMap<Category, f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScaleEval {
    /// Benchmarks of ../shared/data scored without a judge (`humaneval`).
    pub benchmarks: Vec<String>,
    pub max_new_tokens: usize,
    pub slots: usize,
    pub jobs: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScaleParams {
    pub device: String,
    pub target: ModelInput,
    pub sources: Vec<SourceInput>,
    pub reward_model: ModelInput,
    pub datasets: Vec<DatasetInput>,
    /// Evaluation sets (names under ../shared/data) the training prompts are decontaminated
    /// against.
    pub decontaminate: Vec<String>,
    pub lengths: Lengths,
    pub sampling: SamplingStage,
    pub construct: ConstructParams,
    pub sft: TrainConfig,
    pub dpo: DpoStage,
    pub eval: ScaleEval,
    pub hardware: Hardware,
    /// The paper's scores for this target (METHOD.md's per-benchmark table), by benchmark and
    /// role (base, sft, fused); the report shows them beside ours where a benchmark matches.
    #[serde(default)]
    pub paper: BTreeMap<String, BTreeMap<String, f64>>,
}

/// METHOD.md's per-benchmark table (base, SFT, fused) for the two targets it gives in full,
/// under the names of the benchmarks (`humaneval`, `mt-bench` are built in here).
const PAPER: [(&str, [f64; 3], [f64; 3]); 14] = [
    ("alpacaeval2-lc", [28.3, 41.3, 65.4], [33.2, 34.2, 63.6]),
    ("arena-hard", [28.1, 38.7, 58.2], [50.7, 45.2, 61.4]),
    ("mt-bench", [8.4, 8.5, 9.0], [8.4, 8.5, 9.0]),
    ("alignbench-v1.1", [4.6, 6.3, 6.7], [7.5, 7.4, 7.6]),
    ("gsm8k", [85.9, 87.0, 88.0], [91.7, 92.3, 91.7]),
    ("math", [50.7, 54.7, 55.2], [75.0, 72.7, 73.6]),
    ("amc23", [25.0, 30.0, 37.5], [52.5, 45.0, 57.5]),
    ("livebench-0831", [27.6, 30.2, 32.0], [35.4, 33.7, 33.2]),
    ("mmlu-pro", [50.0, 47.8, 49.2], [54.1, 51.7, 53.0]),
    ("mmlu-redux", [67.2, 68.4, 69.2], [75.1, 72.7, 74.4]),
    ("gpqa-diamond", [33.8, 37.9, 34.9], [34.9, 38.4, 33.8]),
    ("humaneval", [69.5, 69.5, 71.3], [85.4, 81.7, 79.9]),
    ("mbpp", [75.4, 71.4, 72.0], [80.2, 84.1, 83.1]),
    (
        "livecodebench-2408-2411",
        [12.3, 12.6, 13.1],
        [15.8, 17.3, 18.9],
    ),
];

/// The paper's per-benchmark numbers of one target; empty for targets METHOD.md gives only
/// averages of.
fn paper_numbers(target: &str) -> BTreeMap<String, BTreeMap<String, f64>> {
    let column = match target {
        "llama31-8b" => 0,
        "qwen25-7b" => 1,
        _ => return BTreeMap::new(),
    };
    PAPER
        .iter()
        .map(|(bench, l, q)| {
            let v = if column == 0 { l } else { q };
            let roles = ["base", "sft", "fused"]
                .iter()
                .zip(v)
                .map(|(r, x)| (r.to_string(), *x))
                .collect();
            (bench.to_string(), roles)
        })
        .collect()
}

/// The per-target rows of METHOD.md's SFT and DPO tables.
struct Target {
    experiment: &'static str,
    name: &'static str,
    reference: &'static str,
    sft_lr: f64,
    dpo_lr: f64,
    beta: f64,
    length_normalised: bool,
}

const TARGETS: [Target; 5] = [
    Target {
        experiment: "fusechat3-llama31-8b",
        name: "llama31-8b",
        reference: "meta-llama/Llama-3.1-8B-Instruct",
        sft_lr: 5e-6,
        dpo_lr: 8e-7,
        beta: 10.0,
        length_normalised: true,
    },
    Target {
        experiment: "fusechat3-qwen25-7b",
        name: "qwen25-7b",
        reference: "Qwen/Qwen2.5-7B-Instruct",
        sft_lr: 2e-6,
        dpo_lr: 3e-7,
        beta: 0.01,
        length_normalised: false,
    },
    Target {
        experiment: "fusechat3-gemma2-9b",
        name: "gemma2-9b",
        reference: "google/gemma-2-9b-it",
        sft_lr: 2e-6,
        dpo_lr: 5e-7,
        beta: 0.01,
        length_normalised: false,
    },
    Target {
        experiment: "fusechat3-llama32-3b",
        name: "llama32-3b",
        reference: "meta-llama/Llama-3.2-3B-Instruct",
        sft_lr: 5e-6,
        dpo_lr: 1e-6,
        beta: 10.0,
        length_normalised: true,
    },
    Target {
        experiment: "fusechat3-llama32-1b",
        name: "llama32-1b",
        reference: "meta-llama/Llama-3.2-1B-Instruct",
        sft_lr: 5e-6,
        dpo_lr: 1e-6,
        beta: 10.0,
        length_normalised: true,
    },
];

fn model(name: &str, reference: &str) -> ModelInput {
    ModelInput {
        name: name.into(),
        path: None,
        reference: reference.into(),
    }
}

fn sampling(temperature: f64, top_p: f64, repetition_penalty: f64, seed: u64) -> SamplingParams {
    SamplingParams {
        // METHOD.md: not stated; the SimPO pipeline it follows uses 4096.
        max_new_tokens: 4096,
        temperature,
        top_p,
        top_k: 0,
        repetition_penalty,
        stop_token_ids: Vec::new(),
        stop_strings: Vec::new(),
        seed,
    }
}

fn dataset(name: &str, category: Category, language: &str, rows: u64) -> DatasetInput {
    DatasetInput {
        name: name.into(),
        path: None,
        category,
        language: language.into(),
        rows,
        layout: Layout::Auto,
        prompt_field: None,
        gold_field: None,
        tests_field: None,
        entry_point_field: None,
    }
}

fn defaults(t: &Target) -> ScaleParams {
    use Category::*;
    let n = |pairs: &[(Category, u32)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
    let source =
        |name: &str, reference: &str, s: SamplingParams, per: &[(Category, u32)]| SourceInput {
            model: model(name, reference),
            sampling: s,
            samples_per_category: n(per),
        };
    let by_cat = |i: f64, m: f64, c: f64, z: f64| {
        BTreeMap::from([(Instruction, i), (Math, m), (Code, c), (SecondLanguage, z)])
    };
    ScaleParams {
        device: "cuda".into(),
        target: model(t.name, t.reference),
        sources: vec![
            source(
                "gemma2-27b",
                "google/gemma-2-27b-it",
                sampling(0.8, 0.95, 1.0, 13),
                &[(Instruction, 5), (Code, 8)],
            ),
            source(
                "mistral-large",
                "mistralai/Mistral-Large-Instruct-2407",
                sampling(0.8, 0.95, 1.0, 21),
                &[(Instruction, 5), (Code, 8)],
            ),
            source(
                "qwen25-72b",
                "Qwen/Qwen2.5-72B-Instruct",
                sampling(0.7, 0.8, 1.05, 42),
                &[(Instruction, 5), (Code, 8), (SecondLanguage, 1)],
            ),
            source(
                "llama31-70b",
                "meta-llama/Llama-3.1-70B-Instruct",
                sampling(0.8, 0.95, 1.0, 79),
                &[(Instruction, 5), (Code, 8)],
            ),
            // METHOD.md: math answers are the 405B ones already in OpenMathInstruct-2 plus
            // Qwen-2.5-Math samples; how many is not stated (8, as for code).
            source(
                "qwen25-math-72b",
                "Qwen/Qwen2.5-Math-72B-Instruct",
                sampling(0.7, 0.8, 1.05, 100),
                &[(Math, 8)],
            ),
        ],
        reward_model: model("armorm", "RLHFlow/ArmoRM-Llama3-8B-v0.1"),
        datasets: vec![
            dataset("UltraFeedback", Instruction, "en", 51098),
            dataset("Magpie-Pro-DPO", Instruction, "en", 20374),
            dataset("HelpSteer2", Instruction, "en", 9435),
            dataset("OpenMathInstruct-2", Math, "en", 51803),
            dataset("leetcode", Code, "en", 3113),
            dataset("self-oss-instruct-sc2", Code, "en", 12892),
            dataset("alpaca_gpt4_zh", SecondLanguage, "zh", 2471),
            dataset("Magpie-Qwen2-Pro-zh", SecondLanguage, "zh", 7481),
        ],
        decontaminate: vec!["humaneval".into(), "mt-bench".into()],
        lengths: Lengths {
            prompt: by_cat(250.0, 120.0, 250.0, 150.0),
            answer: by_cat(550.0, 450.0, 500.0, 400.0),
        },
        sampling: SamplingStage {
            chunk_size: 512,
            slots: 64,
        },
        construct: ConstructParams {
            second_language_source: Some("qwen25-72b".into()),
            // METHOD.md's code rule pairs passing against failing with no gap window.
            gap_exempt: vec![Category::Code],
            ..Default::default()
        },
        sft: TrainConfig {
            lr: t.sft_lr,
            epochs: 3,
            batch_size: 8,
            grad_accum: 16,
            max_len: 2048,
            warmup_ratio: 0.1,
            compute_dtype: "bf16".into(),
            ..Default::default()
        },
        dpo: DpoStage {
            enabled: true,
            beta: t.beta,
            loss: if t.length_normalised {
                DpoLoss::LnDpo
            } else {
                DpoLoss::Sigmoid {
                    label_smoothing: 0.0,
                }
            },
            eval_fraction: 0.02,
            train: TrainConfig {
                lr: t.dpo_lr,
                epochs: 1,
                batch_size: 8,
                grad_accum: 16,
                max_len: 2048,
                warmup_ratio: 0.1,
                save_steps: 100,
                keep_last: 2,
                compute_dtype: "bf16".into(),
                ..Default::default()
            },
            // `--set dpo.engine=trl` trains on TRL as the paper did: 8 GPUs, ZeRO-3, bf16.
            engine: "candle".into(),
            launch: crate::train::external::Launch {
                processes: 8,
                zero3: true,
                cpu: false,
                bf16: true,
            },
            target_sampling: None,
        },
        eval: ScaleEval {
            benchmarks: vec!["humaneval".into()],
            max_new_tokens: 1024,
            slots: 64,
            jobs: 8,
        },
        hardware: Hardware::default(),
        paper: paper_numbers(t.name),
    }
}

/// The five registered recipes, one per METHOD.md target.
pub fn experiments() -> Vec<ExperimentDef> {
    TARGETS
        .iter()
        .map(|t| {
            ExperimentDef::from_value(
                t.experiment,
                "FuseChat-3.0 at full scale on real checkpoints (given by path with --set); plan shows the cost of every step",
                serde_json::to_value(defaults(t)).expect("parameters serialise"),
                build,
            )
        })
        .collect()
}

fn build(exp: &mut Experiment, p: &ScaleParams) -> Result<()> {
    let checked = validate::inputs(p);
    for problem in &checked.problems {
        exp.problem(problem.clone());
    }
    let cost = estimate::Costs::new(p, &checked);
    let input = |exp: &mut Experiment, name: &str, path: &Option<String>, set: &str| {
        // An unset input still has a node, so that `plan` shows the whole DAG; it is missing.
        let path = path
            .clone()
            .unwrap_or_else(|| format!("<unset: --set {set}=PATH>"));
        exp.source(name, path)
    };
    let target = input(exp, "target", &p.target.path, "target.path")?;
    let rm = input(
        exp,
        "reward-model",
        &p.reward_model.path,
        "reward_model.path",
    )?;
    let mut datasets = Vec::new();
    for d in &p.datasets {
        let set = format!("datasets.{}.path", d.name);
        datasets.push(input(exp, &format!("dataset-{}", d.name), &d.path, &set)?);
    }
    let prompts = exp.step(
        step("prompts")
            .kind("fusechat3/prompts")
            .estimate(cost.prompts()),
        &json!({"datasets": p.datasets}),
        &datasets,
        prompts_step,
    )?;
    let mut samples = Vec::new();
    let mut sample_names = Vec::new();
    for (i, s) in p.sources.iter().enumerate() {
        let h = input(
            exp,
            &s.model.name,
            &s.model.path,
            &format!("sources.{}.path", s.model.name),
        )?;
        let name = format!("sample-{}", s.model.name);
        let prm = json!({"source": s.model.name, "sampling": s.sampling,
                         "samples_per_category": s.samples_per_category,
                         "stage": p.sampling, "device": p.device});
        samples.push(
            exp.step(
                step(&name)
                    .kind("fusechat3/sample")
                    .estimate(cost.sample(i)),
                &prm,
                &[prompts, h],
                |ctx| fc::sample_prompts(ctx, &read_prompts(ctx)?),
            )?,
        );
        sample_names.push(name);
    }
    let mut inputs = vec![prompts, rm];
    inputs.extend(&samples);
    let annotations = exp.step(
        step("annotate")
            .kind("fusechat3/annotate")
            .estimate(cost.annotate()),
        &json!({"samples": sample_names, "device": p.device, "jobs": p.eval.jobs}),
        &inputs,
        |ctx| fc::annotate_prompts(ctx, &read_prompts(ctx)?).map(|_| ()),
    )?;
    let mut benchmarks: BTreeMap<&str, Handle> = BTreeMap::new();
    for b in p.decontaminate.iter().chain(&p.eval.benchmarks) {
        if !benchmarks.contains_key(b.as_str()) {
            // An unknown name is already a problem; its node still shows in the plan.
            let dir = validate::benchmark_dir(b)
                .unwrap_or_else(|_| format!("<unknown benchmark {b}>").into());
            let h = exp.source(&format!("benchmark-{b}"), dir)?;
            benchmarks.insert(b, h);
        }
    }
    let decontam: Vec<Handle> = p
        .decontaminate
        .iter()
        .map(|b| benchmarks[b.as_str()])
        .collect();
    let mut inputs = vec![prompts, annotations];
    inputs.extend(&samples);
    inputs.extend(&decontam);
    let constructed = exp.step(
        step("construct")
            .kind("fusechat3/construct")
            .estimate(cost.construct()),
        &json!({"construct": p.construct, "samples": sample_names,
                "decontaminate": p.decontaminate}),
        &inputs,
        construct_step,
    )?;
    let sft = exp.step(
        step("sft").kind("fusechat3/sft").estimate(cost.sft()),
        &json!({"train": p.sft, "device": p.device, "start": "target"}),
        &[target, constructed],
        fc::sft,
    )?;
    let fused = exp.step(
        step("dpo").kind("fusechat3/dpo").estimate(cost.dpo()),
        &json!({"dpo": p.dpo, "device": p.device}),
        &[sft, constructed],
        fc::dpo,
    )?;
    let evaluated: [(&str, &str, &str, Handle); 3] = [
        (p.target.name.as_str(), "base", "target", target),
        ("sft", "sft", "sft", sft),
        ("fused", "fused", "dpo", fused),
    ];
    for b in &p.eval.benchmarks {
        for (label, role, from, h) in evaluated {
            exp.step(
                step(&format!("eval-{label}-{b}"))
                    .kind("fusechat3/eval")
                    .estimate(cost.eval(b)),
                &json!({"model": from, "label": label, "role": role, "benchmark": b,
                        "eval": p.eval, "device": p.device,
                        "paper": p.paper.get(b.as_str()).and_then(|m| m.get(role))}),
                &[h, benchmarks[b.as_str()]],
                eval_step,
            )?;
        }
    }
    Ok(())
}

fn mapping(d: &DatasetInput) -> Mapping {
    Mapping {
        layout: Some(d.layout),
        prompt_field: d.prompt_field.clone(),
        gold_field: d.gold_field.clone(),
        tests_field: d.tests_field.clone(),
        entry_point_field: d.entry_point_field.clone(),
        dataset: Some(d.name.clone()),
        category: Some(d.category),
        language: Some(d.language.clone()),
        ..Default::default()
    }
}

/// Every dataset's prompts in one table, ids prefixed by the dataset so they cannot collide.
fn prompts_step(ctx: &mut StepCtx) -> R {
    let datasets: Vec<DatasetInput> = fc::field(ctx, "datasets")?;
    let mut all: Vec<Prompt> = Vec::new();
    for d in &datasets {
        let path = ctx.input(&format!("dataset-{}", d.name))?.to_path_buf();
        let v = validate::import_prompts(&path, d)?;
        ctx.metric(&format!("prompts/{}", d.name), v.len() as f64);
        all.extend(v.into_iter().map(|mut p| {
            p.id = format!("{}/{}", d.name, p.id);
            p
        }));
    }
    ctx.metric("prompts", all.len() as f64);
    write_records(&all, &ctx.out("sampling_prompts.parquet")?)?;
    Ok(())
}

fn read_prompts(ctx: &StepCtx) -> std::result::Result<Vec<Prompt>, crate::recipe::BoxError> {
    Ok(read_records(
        &ctx.input("prompts")?.join("sampling_prompts.parquet"),
    )?)
}

fn construct_step(ctx: &mut StepCtx) -> R {
    let prompts = read_prompts(ctx)?;
    let names: Vec<String> = fc::field(ctx, "decontaminate")?;
    let mut texts: Vec<(String, String)> = Vec::new();
    for b in &names {
        let dir = ctx.input(&format!("benchmark-{b}"))?.to_path_buf();
        for item in validate::load_benchmark(b, &dir)?.items {
            texts.push((format!("{b}/{}", item.id), item.turns.join("\n")));
        }
    }
    let eval: Vec<EvalText> = texts
        .iter()
        .map(|(n, t)| EvalText { name: n, text: t })
        .collect();
    fc::construct_prompts(ctx, &prompts, &eval)
}

fn eval_step(ctx: &mut StepCtx) -> R {
    let s = |k: &str| fc::field::<String>(ctx, k);
    let stage: ScaleEval = fc::field(ctx, "eval")?;
    let (label, role, device, name) = (s("label")?, s("role")?, s("device")?, s("benchmark")?);
    let mut bench = validate::load_benchmark(&name, ctx.input(&format!("benchmark-{name}"))?)?;
    bench.generation.max_new_tokens = stage.max_new_tokens;
    let dir = ctx.input(&s("model")?)?.to_path_buf();
    let paper: Option<f64> = fc::field(ctx, "paper")?;
    let spec = EvalSpec {
        label: &label,
        role: &role,
        category: &name,
        device: &device,
        slots: stage.slots,
        code: Some(fc::code_options(stage.jobs)?),
        paper,
    };
    evaluate_checkpoint(ctx, &bench, &dir, &spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_papers_numbers_ride_with_the_two_targets_it_tabulates() {
        let l = defaults(&TARGETS[0]);
        assert_eq!(l.paper["humaneval"]["base"], 69.5);
        assert_eq!(l.paper["humaneval"]["fused"], 71.3);
        let q = defaults(&TARGETS[1]);
        assert_eq!(q.paper["mt-bench"]["sft"], 8.5);
        assert_eq!(q.paper.len(), 14);
        // Gemma-2-9B and the Llama-3.2 targets have only averages in METHOD.md.
        assert!(defaults(&TARGETS[2]).paper.is_empty());
    }
}
