//! The bodies of the recipe's steps: each reads its inputs' files, calls the library, and writes
//! its outputs (models as Hugging Face checkpoint directories, tables as Parquet).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::data;
use super::{DpoStage, EvalStage, ModelSpec, RewardParams, SamplingStage, TokenizerParams};
use crate::annotate::samples::annotate_samples;
use crate::annotate::CodeOptions;
use crate::construct::{construct_records, write_outputs, ConstructParams, EvalText};
use crate::data::{read_records, write_records, Annotation, Category, Prompt, Sample};
use crate::experiments::common::{decoder, evaluate_checkpoint, publish, write_jsonl, EvalSpec, R};
use crate::generate::{Rng, SamplingParams};
use crate::model::bpe::{train_bpe, write_tokenizer_dir, Specials};
use crate::model::init::create_checkpoint;
use crate::model::{parse_device, ChatTemplate, Checkpoint, Family};
use crate::recipe::{BoxError, StepCtx};
use crate::reward::{RewardModel, RewardObjective};
use crate::synth::{suite as make_suite, Split, SuiteParams, Task};
use crate::train::{
    train, DpoLoss, DpoObjective, Hooks, Objective, RunPaths, SftObjective, TrainConfig,
    TrainSummary,
};

pub(crate) fn field<T: serde::de::DeserializeOwned>(
    ctx: &StepCtx,
    key: &str,
) -> Result<T, BoxError> {
    let v: Value = ctx.params()?;
    serde_json::from_value(v.get(key).cloned().unwrap_or(Value::Null))
        .map_err(|e| format!("step `{}`: parameter `{key}`: {e}", ctx.step()).into())
}

fn read_tasks(suite: &Path) -> Result<Vec<Task>, BoxError> {
    let p = suite.join("tasks.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", p.display(), i + 1).into())
        })
        .collect()
}

fn quiet() -> Hooks {
    Hooks {
        quiet: true,
        ..Default::default()
    }
}

fn record(ctx: &mut StepCtx, s: &TrainSummary) {
    ctx.metric("final_loss", s.final_loss);
    ctx.metric("steps", s.steps as f64);
    ctx.metric("skipped_rows", s.skipped_rows as f64);
}

/// The sampling split's prompts, as the data stage reads them.
fn sampling_prompts(tasks: &[Task]) -> Vec<Prompt> {
    tasks
        .iter()
        .filter(|t| t.split == Split::Sampling)
        .map(Task::to_prompt)
        .collect()
}

pub(crate) fn code_options(jobs: usize) -> Result<CodeOptions, BoxError> {
    Ok(CodeOptions {
        jobs: jobs.max(1),
        limits: Default::default(),
        python: crate::annotate::sandbox::Python::default_choice()?,
        isolation: None,
    })
}

pub fn suite(ctx: &mut StepCtx) -> R {
    let p: SuiteParams = ctx.params()?;
    let tasks = make_suite(&p)?;
    let rows: Vec<Value> = tasks
        .iter()
        .map(|t| serde_json::to_value(t).expect("serialises"))
        .collect();
    write_jsonl(&ctx.out("tasks.jsonl")?, &rows)?;
    let prompts = sampling_prompts(&tasks);
    write_records(&prompts, &ctx.out("sampling_prompts.parquet")?)?;
    for s in Split::ALL {
        let n = tasks.iter().filter(|t| t.split == s).count();
        ctx.metric(&format!("tasks/{}", s.name()), n as f64);
    }
    Ok(())
}

pub fn tokenizer(ctx: &mut StepCtx) -> R {
    let p: TokenizerParams = field(ctx, "tokenizer")?;
    let context: usize = field(ctx, "context")?;
    let tasks = read_tasks(ctx.input("suite")?)?;
    let template_path = ctx.input("chat-template")?.to_path_buf();
    let template = std::fs::read_to_string(&template_path)
        .map_err(|e| format!("{}: {e}", template_path.display()))?;
    let specials = Specials {
        pad: "<|endoftext|>".into(),
        eos: "<|im_end|>".into(),
        others: vec!["<|im_start|>".into()],
        bos: None,
    };
    let chat = ChatTemplate::new(
        template.clone(),
        template_path.clone(),
        None,
        Some(specials.eos.clone()),
    );
    let corpus = data::tokenizer_corpus(&tasks, &chat, &specials.all())?;
    let tok = train_bpe(
        &corpus,
        p.vocab_size,
        p.min_frequency,
        &specials,
        &ctx.input("suite")?.join("tasks.jsonl"),
    )?;
    let ids = write_tokenizer_dir(ctx.out_dir(), &tok, &specials, &template, context)?;
    std::fs::write(
        ctx.out("special_ids.json")?,
        serde_json::to_vec_pretty(&ids)?,
    )?;
    ctx.metric("vocab_size", tok.get_vocab_size(true) as f64);
    // How well the vocabulary fits the suite: tokens per train reference.
    let (mut n, mut toks) = (0usize, 0usize);
    for t in tasks.iter().filter(|t| t.split == Split::Train) {
        toks += tok
            .encode(t.reference.as_str(), false)
            .map_err(|e| format!("tokenising: {e}"))?
            .len();
        n += 1;
    }
    ctx.metric("tokens_per_reference", toks as f64 / n.max(1) as f64);
    Ok(())
}

/// A model from nothing: initialised at its family and shape on the shared tokenizer, then trained
/// (SFT on the references) on its mix of the train split.
pub fn pretrain(ctx: &mut StepCtx) -> R {
    let m: ModelSpec = field(ctx, "model")?;
    let device: String = field(ctx, "device")?;
    let tasks = read_tasks(ctx.input("suite")?)?;
    let tok_dir = ctx.input("tokenizer")?.to_path_buf();
    let ids = serde_json::from_slice(&std::fs::read(tok_dir.join("special_ids.json"))?)?;
    let work = ctx.work_dir()?.to_path_buf();
    let init = work.join("init");
    if Checkpoint::open(&init).is_err() {
        let family = Family::from_model_type(&m.family).ok_or_else(|| {
            format!(
                "model `{}`: unknown family `{}` (llama, qwen2, mistral or gemma2)",
                m.name, m.family
            )
        })?;
        create_checkpoint(&init, family, &m.shape, &tok_dir, ids, m.init_seed)?;
    }
    let rows: Vec<Value> = data::mix(&tasks, &m.mix)
        .into_iter()
        .map(data::sft_row)
        .collect();
    if rows.is_empty() {
        return Err(format!("model `{}`: its mix selects no train task", m.name).into());
    }
    let train_file = work.join("train.jsonl");
    write_jsonl(&train_file, &rows)?;
    let ck = Checkpoint::open(&init)?;
    let obj = SftObjective::load(
        &train_file,
        ck.template()?,
        ck.tokenizer()?,
        m.train.max_len,
        &Value::Null,
    )?;
    let run = work.join("run");
    let s = train(
        &init,
        &obj,
        None,
        &m.train,
        &RunPaths { out: run.clone() },
        &parse_device(&device)?,
        &quiet(),
    )?;
    record(ctx, &s);
    ctx.metric("train_rows", rows.len() as f64);
    ctx.metric(
        "parameters",
        crate::model::ModelConfig::parameter_count(&ck.config) as f64,
    );
    publish(ctx, &s.model, &run.join("metrics.jsonl"))
}

/// The reward model: a sequence classifier on the target base, trained (Bradley-Terry) on pairs of
/// a train task's reference against corrupted answers that the suite's verifiers reject (math by
/// the math verifier, code in the sandbox, text tasks by their rules).
pub fn reward_model(ctx: &mut StepCtx) -> R {
    let p: RewardParams = field(ctx, "reward")?;
    let device: String = field(ctx, "device")?;
    let base_name: String = field(ctx, "base")?;
    let tasks = read_tasks(ctx.input("suite")?)?;
    let base = ctx.input(&base_name)?.to_path_buf();
    let mut rng = Rng::new(p.seed, 0);
    // Candidates first; code candidates are verified together in the sandbox.
    let mut candidates: Vec<(&Task, String)> = Vec::new();
    for t in tasks.iter().filter(|t| t.split == Split::Train) {
        for _ in 0..p.pairs_per_task {
            if let Some(bad) = data::corrupt(t, &mut rng) {
                candidates.push((t, bad));
            }
        }
    }
    let code: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].0.category == Category::Code)
        .collect();
    let mut wrong = vec![false; candidates.len()];
    for (i, (t, bad)) in candidates.iter().enumerate() {
        if t.category != Category::Code {
            wrong[i] = t.check(bad) == Some(false);
        }
    }
    if !code.is_empty() {
        let prompts: Vec<Prompt> = code
            .iter()
            .map(|&i| {
                let p = candidates[i].0.to_prompt();
                (p.id.clone(), p)
            })
            .collect::<BTreeMap<String, Prompt>>()
            .into_values()
            .collect();
        let samples: Vec<Sample> = code
            .iter()
            .enumerate()
            .map(|(j, &i)| Sample {
                prompt_id: candidates[i].0.id.clone(),
                source: "corruption".into(),
                sample_index: j as u32,
                seed: 0,
                text: candidates[i].1.clone(),
                tokens: 0,
                finish: "imported".into(),
            })
            .collect();
        let jobs: usize = field(ctx, "jobs")?;
        let ann = annotate_samples(
            &prompts,
            &samples,
            None,
            &code_options(jobs)?,
            &|_, _, _| {},
        )?;
        for (a, &i) in ann.iter().zip(&code) {
            wrong[i] = a.correct == Some(false);
        }
    }
    let (mut train_rows, mut eval_rows) = (Vec::new(), Vec::new());
    for (i, (t, bad)) in candidates.iter().enumerate() {
        if !wrong[i] {
            continue;
        }
        let row = data::rm_pair(t, &t.reference, bad);
        if held_out(&t.id, p.seed, p.eval_fraction) {
            eval_rows.push(row);
        } else {
            train_rows.push(row);
        }
    }
    ctx.metric("pairs/train", train_rows.len() as f64);
    ctx.metric("pairs/eval", eval_rows.len() as f64);
    write_jsonl(&ctx.out("pairs_train.jsonl")?, &train_rows)?;
    write_jsonl(&ctx.out("pairs_eval.jsonl")?, &eval_rows)?;
    let ck = Checkpoint::open(&base)?;
    let obj = RewardObjective::load(
        &ctx.out_dir().join("pairs_train.jsonl"),
        ck.template()?,
        ck.tokenizer()?,
        p.train.max_len,
        ck.pad_token_id(),
        None,
    )?;
    let work = ctx.work_dir()?.to_path_buf();
    let s = train(
        &base,
        &obj,
        None,
        &p.train,
        &RunPaths { out: work.clone() },
        &parse_device(&device)?,
        &quiet(),
    )?;
    record(ctx, &s);
    // Pair accuracy on held-out tasks' pairs, per category.
    let rm_ck = Checkpoint::open(&s.model)?;
    let rm = RewardModel::load(&rm_ck, &parse_device(&device)?, candle_core::DType::F32)?;
    let mut convs = Vec::new();
    for r in &eval_rows {
        for side in ["chosen", "rejected"] {
            let mut c = r["prompt"].as_array().cloned().unwrap_or_default();
            c.extend(r[side].as_array().cloned().unwrap_or_default());
            convs.push(Value::Array(c));
        }
    }
    let scores = rm.score_conversations(&rm_ck, &convs, 32, &mut |_| {})?;
    let mut by_cat: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (k, r) in eval_rows.iter().enumerate() {
        let win = scores[2 * k][0] > scores[2 * k + 1][0];
        for c in [r["category"].as_str().unwrap_or("?"), "all"] {
            let e = by_cat.entry(c.to_string()).or_default();
            e.0 += win as usize;
            e.1 += 1;
        }
    }
    for (c, (w, n)) in by_cat {
        ctx.metric(&format!("eval_accuracy/{c}"), w as f64 / n.max(1) as f64);
    }
    publish(ctx, &s.model, &work.join("metrics.jsonl"))
}

/// Whether a record belongs to the held-out share (a function of its id and the seed).
fn held_out(id: &str, seed: u64, fraction: f64) -> bool {
    let h = blake3::hash(format!("{seed}/{id}").as_bytes());
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    (x as f64 / u64::MAX as f64) < fraction
}

/// One source answers the sampling prompts, N times per prompt by category, in resumable chunks.
pub fn sample(ctx: &mut StepCtx) -> R {
    let tasks = read_tasks(ctx.input("suite")?)?;
    sample_prompts(ctx, &sampling_prompts(&tasks))
}

/// One source's answers to `prompts` (the ones of its categories), N per prompt by category.
pub(crate) fn sample_prompts(ctx: &mut StepCtx, prompts: &[Prompt]) -> R {
    let name: String = field(ctx, "source")?;
    let sampling: Option<SamplingParams> = field(ctx, "sampling")?;
    let per_cat: BTreeMap<Category, u32> = field(ctx, "samples_per_category")?;
    let stage: SamplingStage = field(ctx, "stage")?;
    let device: String = field(ctx, "device")?;
    let mut sampling = sampling.ok_or_else(|| format!("source `{name}` has no `sampling`"))?;
    let dir = ctx.input(&name)?.to_path_buf();
    let ck = Checkpoint::open(&dir)?;
    sampling.stop_token_ids = ck.stop_token_ids();
    let model = decoder(&dir, &device)?;
    let m = crate::sample::job::Model {
        decoder: &model,
        tokenizer: ck.tokenizer()?,
        template: ck.template()?,
        identity: crate::train::model_identity(&dir)?,
    };
    let spec = crate::sample::job::SourceSpec {
        name: name.clone(),
        sampling,
        samples_per_category: per_cat,
    };
    let total: u64 = prompts.iter().map(|p| spec.n_for(p.category) as u64).sum();
    let bar = ctx.progress(total, "samples");
    let work = ctx.work_dir()?.to_path_buf();
    let (samples, stats) = crate::sample::job::run(
        &m,
        prompts,
        &spec,
        &crate::sample::job::JobOptions {
            chunk_size: stage.chunk_size,
            slots: stage.slots,
        },
        1,
        &work,
        &|n, _| bar.set_position(n),
    )?;
    bar.finish_and_clear();
    write_records(&samples, &ctx.out("samples.parquet")?)?;
    ctx.metric("samples", stats.samples as f64);
    ctx.metric("generated_tokens", stats.generated_tokens as f64);
    ctx.metric("prefill_tokens", stats.prefill_tokens as f64);
    Ok(())
}

fn all_samples(ctx: &StepCtx) -> Result<Vec<Sample>, BoxError> {
    let names: Vec<String> = field(ctx, "samples")?;
    let mut out = Vec::new();
    for n in names {
        out.extend(read_records::<Sample>(
            &ctx.input(&n)?.join("samples.parquet"),
        )?);
    }
    Ok(out)
}

/// The sampling prompts that construction made DPO pairs of.
fn dpo_prompts(ctx: &StepCtx) -> Result<Vec<Prompt>, BoxError> {
    let tasks = read_tasks(ctx.input("suite")?)?;
    let pairs: Vec<crate::data::DpoPair> =
        read_records(&ctx.input("construct")?.join("dpo.parquet"))?;
    let ids: std::collections::BTreeSet<&str> =
        pairs.iter().map(|d| d.prompt_id.as_str()).collect();
    Ok(sampling_prompts(&tasks)
        .into_iter()
        .filter(|p| ids.contains(p.id.as_str()))
        .collect())
}

/// WRPO: the SFT model answers the DPO prompts, N per prompt by category.
pub fn sample_target(ctx: &mut StepCtx) -> R {
    let prompts = dpo_prompts(ctx)?;
    sample_prompts(ctx, &prompts)
}

/// WRPO: reward-model scores and math / code verdicts of the SFT model's answers.
pub fn annotate_target(ctx: &mut StepCtx) -> R {
    let prompts = dpo_prompts(ctx)?;
    annotate_prompts(ctx, &prompts)?;
    Ok(())
}

/// Per prompt, the target's best answer by reward-model score among the eligible ones (correct
/// for math and code, as construction's chosen answers are); ties go to the first sample.
fn target_preferred(
    pairs: &[crate::data::DpoPair],
    samples: &[Sample],
    notes: &[Annotation],
) -> BTreeMap<String, String> {
    let checked: BTreeMap<&str, bool> = pairs
        .iter()
        .map(|d| {
            (
                d.prompt_id.as_str(),
                matches!(d.category, Category::Math | Category::Code),
            )
        })
        .collect();
    let note: BTreeMap<(&str, u32), &Annotation> = notes
        .iter()
        .map(|a| ((a.prompt_id.as_str(), a.sample_index), a))
        .collect();
    let mut best: BTreeMap<&str, (f64, u32, &str)> = BTreeMap::new();
    for s in samples {
        let Some(a) = note.get(&(s.prompt_id.as_str(), s.sample_index)) else {
            continue;
        };
        let (Some(score), Some(&check)) = (a.score, checked.get(s.prompt_id.as_str())) else {
            continue;
        };
        if (check && a.correct != Some(true)) || s.text.trim().is_empty() {
            continue;
        }
        let e = best
            .entry(s.prompt_id.as_str())
            .or_insert((score, s.sample_index, &s.text));
        if score > e.0 || (score == e.0 && s.sample_index < e.1) {
            *e = (score, s.sample_index, &s.text);
        }
    }
    best.into_iter()
        .map(|(id, (_, _, text))| (id.to_string(), text.to_string()))
        .collect()
}

/// Reward-model scores of every sample, and math / code verdicts.
pub fn annotate(ctx: &mut StepCtx) -> R {
    let tasks = read_tasks(ctx.input("suite")?)?;
    let (samples, ann) = annotate_prompts(ctx, &sampling_prompts(&tasks))?;
    diagnostics(ctx, &tasks, &samples, &ann);
    Ok(())
}

/// Reward-model scores (input `reward-model`) of every sample of the `samples` inputs, and
/// math / code verdicts against `prompts`' gold answers and tests.
pub(crate) fn annotate_prompts(
    ctx: &mut StepCtx,
    prompts: &[Prompt],
) -> Result<(Vec<Sample>, Vec<Annotation>), BoxError> {
    let device: String = field(ctx, "device")?;
    let jobs: usize = field(ctx, "jobs")?;
    let samples = all_samples(ctx)?;
    let rm_dir = ctx.input("reward-model")?.to_path_buf();
    let ck = Checkpoint::open(&rm_dir)?;
    let rm = RewardModel::load(&ck, &parse_device(&device)?, candle_core::DType::F32)?;
    let bar = ctx.progress(samples.len() as u64, "annotations");
    let ann = annotate_samples(
        prompts,
        &samples,
        Some((&rm, &ck, 32)),
        &code_options(jobs)?,
        &|_, d, _| bar.set_position(d as u64),
    )?;
    bar.finish_and_clear();
    write_records(&ann, &ctx.out("annotations.parquet")?)?;
    Ok((samples, ann))
}

/// How good each source's answers are by the suite's own verifiers (which the construction rules
/// do not see for instruction tasks), and how often the reward model's favourite answer of an
/// instruction prompt is a correct one: the numbers that tell whether fusion has anything to learn.
fn diagnostics(ctx: &mut StepCtx, tasks: &[Task], samples: &[Sample], ann: &[Annotation]) {
    let by_id: BTreeMap<&str, &Task> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut rate: BTreeMap<(String, &str), (usize, usize)> = BTreeMap::new();
    let mut best: BTreeMap<&str, (f64, bool, bool)> = BTreeMap::new();
    // Math answers the verifier accepts, and how many of those show right working.
    let (mut math_ok, mut math_sound) = (0usize, 0usize);
    for (s, a) in samples.iter().zip(ann) {
        let Some(t) = by_id.get(s.prompt_id.as_str()) else {
            continue;
        };
        let ok = a.correct.or_else(|| t.check(&s.text)).unwrap_or(false);
        if ok && t.category == Category::Math {
            math_ok += 1;
            math_sound += crate::synth::steps_sound(&s.text) as usize;
        }
        let e = rate
            .entry((s.source.clone(), t.category.name()))
            .or_default();
        e.0 += ok as usize;
        e.1 += 1;
        if t.category == Category::Instruction {
            let score = a.score.unwrap_or(f64::NEG_INFINITY);
            let b = best
                .entry(t.id.as_str())
                .or_insert((f64::NEG_INFINITY, false, false));
            b.2 |= ok;
            if score > b.0 {
                b.0 = score;
                b.1 = ok;
            }
        }
    }
    for ((source, cat), (k, n)) in rate {
        ctx.metric(
            &format!("correct/{source}/{cat}"),
            k as f64 / n.max(1) as f64,
        );
    }
    ctx.metric(
        "math/correct_with_sound_steps",
        math_sound as f64 / math_ok.max(1) as f64,
    );
    let n = best.len().max(1) as f64;
    ctx.metric(
        "instruction/rm_best_correct",
        best.values().filter(|b| b.1).count() as f64 / n,
    );
    ctx.metric(
        "instruction/any_correct",
        best.values().filter(|b| b.2).count() as f64 / n,
    );
}

/// Decontamination against the held-out prompts, then every construction rule of METHOD.md.
pub fn construct(ctx: &mut StepCtx) -> R {
    let tasks = read_tasks(ctx.input("suite")?)?;
    let eval: Vec<EvalText> = tasks
        .iter()
        .filter(|t| t.split == Split::Eval)
        .map(|t| EvalText {
            name: &t.id,
            text: &t.prompt,
        })
        .collect();
    construct_prompts(ctx, &sampling_prompts(&tasks), &eval)
}

/// The SFT rows and DPO pairs of `prompts` from the `samples` inputs and the `annotate` input,
/// after decontamination against `eval`.
pub(crate) fn construct_prompts(ctx: &mut StepCtx, prompts: &[Prompt], eval: &[EvalText]) -> R {
    let params: ConstructParams = field(ctx, "construct")?;
    let samples = all_samples(ctx)?;
    let ann: Vec<Annotation> = read_records(&ctx.input("annotate")?.join("annotations.parquet"))?;
    let c = construct_records(prompts, &samples, &ann, eval, &params)?;
    ctx.metric("sft_rows", c.sft.len() as f64);
    ctx.metric("dpo_pairs", c.dpo.len() as f64);
    ctx.metric("dropped", c.dropped.len() as f64);
    let staged = ctx.work_dir()?.join("constructed");
    write_outputs(&c, &params, &staged)?;
    for e in std::fs::read_dir(&staged)? {
        let e = e?;
        std::fs::copy(e.path(), ctx.out(&e.file_name().to_string_lossy())?)?;
    }
    Ok(())
}

/// SFT of the target base on the constructed SFT rows.
pub fn sft(ctx: &mut StepCtx) -> R {
    let cfg: TrainConfig = field(ctx, "train")?;
    let device: String = field(ctx, "device")?;
    let start: String = field(ctx, "start")?;
    let base = ctx.input(&start)?.to_path_buf();
    let rows: Vec<crate::data::SftRow> =
        read_records(&ctx.input("construct")?.join("sft.parquet"))?;
    // A chosen answer can be empty when every answer of its prompt was; there is nothing to learn.
    let kept: Vec<Value> = rows
        .iter()
        .filter(|r| {
            r.messages
                .last()
                .is_some_and(|m| !m.content.trim().is_empty())
        })
        .map(|r| json!({"messages": r.messages}))
        .collect();
    ctx.metric("rows/empty_dropped", (rows.len() - kept.len()) as f64);
    let work = ctx.work_dir()?.to_path_buf();
    let data = work.join("sft.jsonl");
    write_jsonl(&data, &kept)?;
    let ck = Checkpoint::open(&base)?;
    let obj = SftObjective::load(
        &data,
        ck.template()?,
        ck.tokenizer()?,
        cfg.max_len,
        &Value::Null,
    )?;
    let s = train(
        &base,
        &obj,
        None,
        &cfg,
        &RunPaths { out: work.clone() },
        &parse_device(&device)?,
        &quiet(),
    )?;
    record(ctx, &s);
    publish(ctx, &s.model, &work.join("metrics.jsonl"))
}

/// DPO of the SFT model (its own reference) on the constructed pairs; a share of the pairs is held
/// out, and of the last two checkpoints the one with the lower held-out loss is the fused model.
pub fn dpo(ctx: &mut StepCtx) -> R {
    let p: DpoStage = field(ctx, "dpo")?;
    let device: String = field(ctx, "device")?;
    let policy = ctx.input("sft")?.to_path_buf();
    let pairs: Vec<crate::data::DpoPair> =
        read_records(&ctx.input("construct")?.join("dpo.parquet"))?;
    let work = ctx.work_dir()?.to_path_buf();
    let (mut tr, mut ev) = (Vec::new(), Vec::new());
    // A source may answer with nothing; the trainer rejects a pair with an empty side.
    let blank = |m: &[crate::data::Message]| m.iter().all(|m| m.content.trim().is_empty());
    let kept: Vec<&crate::data::DpoPair> = pairs
        .iter()
        .filter(|d| !blank(&d.chosen) && !blank(&d.rejected))
        .collect();
    ctx.metric("pairs/empty_dropped", (pairs.len() - kept.len()) as f64);
    let target = if matches!(p.loss, DpoLoss::Wrpo { .. }) {
        let samples: Vec<Sample> =
            read_records(&ctx.input("sample-target")?.join("samples.parquet"))?;
        let notes: Vec<Annotation> =
            read_records(&ctx.input("annotate-target")?.join("annotations.parquet"))?;
        Some(target_preferred(&pairs, &samples, &notes))
    } else {
        None
    };
    let mut fallback = 0usize;
    for d in kept {
        let mut v = json!({"prompt": d.prompt, "chosen": d.chosen, "rejected": d.rejected});
        if let Some(target) = &target {
            // Where the target has no eligible answer of its own, the source's chosen answer
            // stands in for it (WRPO then reduces to DPO on that pair); counted below.
            let answer = match target.get(&d.prompt_id) {
                Some(text) => json!([{"role": "assistant", "content": text}]),
                None => {
                    fallback += 1;
                    json!(d.chosen)
                }
            };
            v["chosen_target"] = answer;
        }
        if held_out(&d.prompt_id, p.train.seed, p.eval_fraction) {
            ev.push(v);
        } else {
            tr.push(v);
        }
    }
    if target.is_some() {
        ctx.metric("pairs/target_fallback", fallback as f64);
    }
    if tr.is_empty() {
        return Err("construction produced no DPO pair outside the held-out share".into());
    }
    write_jsonl(&work.join("train.jsonl"), &tr)?;
    write_jsonl(&work.join("eval.jsonl"), &ev)?;
    ctx.metric("pairs/train", tr.len() as f64);
    ctx.metric("pairs/eval", ev.len() as f64);
    match p.engine.as_str() {
        "candle" => {}
        "trl" => {
            return crate::experiments::common::trl_train(
                ctx,
                &crate::train::external::TrlJob {
                    kind: "dpo",
                    model: &policy,
                    train: &work.join("train.jsonl"),
                    config: &p.train,
                    dpo: Some((p.beta, &p.loss)),
                    launch: &p.launch,
                },
            )
        }
        other => return Err(format!("dpo.engine `{other}`: expected candle or trl").into()),
    }
    let ck = Checkpoint::open(&policy)?;
    let reference = decoder(&policy, &device)?;
    let load = |f: &Path| -> Result<DpoObjective, BoxError> {
        let mut o = DpoObjective::load(
            f,
            ck.template()?,
            ck.tokenizer()?,
            p.train.max_len,
            &Value::Null,
            p.beta,
            p.loss.clone(),
        )?;
        o.compute_reference(&reference)?;
        Ok(o)
    };
    let obj = load(&work.join("train.jsonl"))?;
    let eval = if ev.is_empty() {
        None
    } else {
        Some(load(&work.join("eval.jsonl"))?)
    };
    let run = work.join("run");
    let s = train(
        &policy,
        &obj,
        eval.as_ref().map(|e| e as &dyn Objective),
        &p.train,
        &RunPaths { out: run.clone() },
        &parse_device(&device)?,
        &quiet(),
    )?;
    record(ctx, &s);
    let (picked, step) = better_of_last_two(&run, &s)?;
    ctx.metric("picked_step", step as f64);
    publish(ctx, &picked, &run.join("metrics.jsonl"))
}

/// The final model or the last intermediate checkpoint, whichever has the lower held-out loss
/// (the final one when there is no held-out set or no intermediate checkpoint).
fn better_of_last_two(run: &Path, s: &TrainSummary) -> Result<(PathBuf, usize), BoxError> {
    let mut eval_loss: BTreeMap<usize, f64> = BTreeMap::new();
    for l in std::fs::read_to_string(run.join("metrics.jsonl"))?.lines() {
        let v: Value = serde_json::from_str(l)?;
        if let (Some(st), Some(el)) = (v["step"].as_u64(), v["eval/loss"].as_f64()) {
            eval_loss.insert(st as usize, el);
        }
    }
    let last_ck = std::fs::read_dir(run)?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let st: usize = n.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("model/config.json").is_file().then_some(st)
        })
        .filter(|&st| st < s.steps)
        .max();
    if let (Some(c), Some(&final_loss)) = (last_ck, eval_loss.get(&s.steps)) {
        if eval_loss.get(&c).is_some_and(|&l| l < final_loss) {
            return Ok((run.join(format!("checkpoint-{c}")).join("model"), c));
        }
    }
    Ok((s.model.clone(), s.steps))
}

/// One model answers one category's held-out items greedily; the answers are scored by the
/// category's verifier and written as an eval result the report reads.
pub fn eval(ctx: &mut StepCtx) -> R {
    let input: String = field(ctx, "model")?;
    let label: String = field(ctx, "label")?;
    let role: String = field(ctx, "role")?;
    let category: Category = field(ctx, "category")?;
    let stage: EvalStage = field(ctx, "eval")?;
    let device: String = field(ctx, "device")?;
    let tasks = read_tasks(ctx.input("suite")?)?;
    let bench = match stage.dev_per_skill {
        0 => data::benchmark(&tasks, category, stage.max_new_tokens),
        n => {
            let mix: BTreeMap<Category, f64> = field(ctx, "target_mix")?;
            data::dev_benchmark(&tasks, category, n, &mix, stage.max_new_tokens)
        }
    };
    let dir = ctx.input(&input)?.to_path_buf();
    let code = match category {
        Category::Code => Some(code_options(stage.jobs)?),
        _ => None,
    };
    let spec = EvalSpec {
        label: &label,
        role: &role,
        category: category.name(),
        device: &device,
        slots: stage.slots,
        code,
        paper: None,
    };
    evaluate_checkpoint(ctx, &bench, &dir, &spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DpoPair, Message};

    fn pair(id: &str, category: Category) -> DpoPair {
        DpoPair {
            prompt_id: id.into(),
            dataset: "d".into(),
            category,
            source: "s".into(),
            prompt: vec![Message::new("user", "q")],
            chosen: vec![Message::new("assistant", "c")],
            rejected: vec![Message::new("assistant", "r")],
            chosen_index: 0,
            rejected_index: 1,
            chosen_score: Some(1.0),
            rejected_score: Some(0.0),
        }
    }

    fn answer(
        id: &str,
        i: u32,
        text: &str,
        score: f64,
        correct: Option<bool>,
    ) -> (Sample, Annotation) {
        let s = Sample {
            prompt_id: id.into(),
            source: "sft".into(),
            sample_index: i,
            seed: 0,
            text: text.into(),
            tokens: 1,
            finish: "stop_token".into(),
        };
        let a = Annotation {
            prompt_id: id.into(),
            source: "sft".into(),
            sample_index: i,
            score: Some(score),
            correct,
            reason: None,
        };
        (s, a)
    }

    #[test]
    fn the_target_prefers_its_best_eligible_answer() {
        let pairs = [
            pair("i", Category::Instruction),
            pair("m", Category::Math),
            pair("c", Category::Code),
        ];
        let (samples, notes): (Vec<_>, Vec<_>) = [
            // Instruction: the highest score wins; a tie goes to the first sample; a blank
            // answer never does.
            answer("i", 0, "a", 0.5, None),
            answer("i", 1, "b", 0.9, None),
            answer("i", 2, "c", 0.9, None),
            answer("i", 3, " ", 5.0, None),
            // Math: only a correct answer is eligible, however the RM scores a wrong one.
            answer("m", 0, "wrong", 3.0, Some(false)),
            answer("m", 1, "right", 1.0, Some(true)),
            // Code: nothing passes, so nothing is preferred (the pair falls back).
            answer("c", 0, "fails", 2.0, Some(false)),
        ]
        .into_iter()
        .unzip();
        let best = target_preferred(&pairs, &samples, &notes);
        assert_eq!(best.get("i").map(String::as_str), Some("b"));
        assert_eq!(best.get("m").map(String::as_str), Some("right"));
        assert_eq!(best.get("c"), None);
    }
}
