//! `fuselab eval` and `fuselab compare`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use fuselab::eval::bench::{self, Benchmark, Kind};
use fuselab::eval::judge::{Backend, EndpointJudge, LocalJudge, RewardJudge};
use fuselab::eval::score::{self, Answer, BenchResult, JudgeSetup};
use fuselab::eval::stats;
use fuselab::sample::openai::Endpoint;

use super::{print_json, Status};
use crate::cli::{CompareArgs, EvalArgs, ReportArgs, SynthArgs};

/// A checkpoint whose architecture is a sequence classifier or ArmoRM's reward model.
fn is_reward_checkpoint(dir: &Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["architectures"][0].as_str().map(str::to_string))
        .is_some_and(|a| a.ends_with("ForSequenceClassification") || a.contains("RewardModel"))
}

fn is_url(p: &Path) -> Option<&str> {
    p.to_str()
        .filter(|m| m.starts_with("http://") || m.starts_with("https://"))
}

fn endpoint(
    url: &str,
    model: Option<String>,
    a: &EvalArgs,
    flag: &str,
) -> anyhow::Result<Endpoint> {
    let Some(model) = model else {
        bail!("{flag}: a server needs the model name each request carries");
    };
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        bail!(
            "--timeout: {} must be a positive number of seconds",
            a.timeout
        );
    }
    Ok(Endpoint {
        base_url: url.to_string(),
        model,
        api_key: std::env::var("OPENAI_API_KEY").ok(),
        timeout_s: a.timeout,
        retries: a.retries,
        concurrency: a.concurrency.max(1),
    })
}

fn bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what}  {{msg}}  eta {{eta}}"
        ))
        .expect("style"),
    );
    bar
}

/// The answers of the model under test.
fn generate(
    bench: &Benchmark,
    a: &EvalArgs,
    store: &Path,
    name: &str,
    out: &Path,
) -> anyhow::Result<(Vec<Answer>, Value)> {
    use fuselab::eval::answer::{self, Answerer, Settings};
    use fuselab::model::{load_weights, parse_device, parse_dtype, Checkpoint, Decoder};
    use fuselab::sample::job::Model;

    let model_path = a.model.as_ref().expect("clap: --model or --answers");
    let local;
    let server;
    let (answerer, stops) = if let Some(url) = is_url(model_path) {
        server = endpoint(url, a.served_model.clone(), a, "--served-model")?;
        (Answerer::Server(&server), vec![])
    } else {
        let ck = Checkpoint::open(model_path)?;
        let device = parse_device(&a.device.device)?;
        let w = load_weights(&ck.dir, &ck.config, &device, parse_dtype(&a.device.dtype)?)?;
        local = (Decoder::new(ck.config.clone(), w)?, ck);
        let m = Model {
            decoder: &local.0,
            tokenizer: local.1.tokenizer()?,
            template: local.1.template()?,
            identity: fuselab::train::model_identity(&local.1.dir)?,
        };
        let stops = if a.ignore_eos {
            vec![]
        } else {
            local.1.stop_token_ids()
        };
        (Answerer::Local(m), stops)
    };
    let settings = Settings {
        name: name.to_string(),
        samples: a.samples,
        temperature: a.temperature.unwrap_or(bench.generation.temperature),
        max_new_tokens: a.max_new_tokens.unwrap_or(bench.generation.max_new_tokens),
        seed: a.seed,
        slots: a.slots,
        stop_token_ids: stops,
    };
    let started = std::time::Instant::now();
    let bar = bar(0, "answers");
    let on = |turn: usize, done: u64, total: u64, toks: u64| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(format!(
            "turn {}  {:.0} tok/s",
            turn + 1,
            toks as f64 / started.elapsed().as_secs_f64().max(1e-9)
        ));
    };
    let (answers, stats) = answer::answer(
        bench,
        &answerer,
        &settings,
        out,
        &store.join("request-cache"),
        &on,
    )?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let info = json!({"model": model_path, "settings": settings, "stats": stats, "seconds": secs,
                      "items_per_s": bench.items.len() as f64 / secs.max(1e-9)});
    Ok((answers, info))
}

/// Answers made elsewhere, matched to items by id (or by instruction for alpaca_eval's layout).
fn read_answers(bench: &Benchmark, path: &Path) -> anyhow::Result<Vec<Answer>> {
    let rows = fuselab::data::read_values(path)?;
    let by_instruction: BTreeMap<&str, &str> = bench
        .items
        .iter()
        .map(|i| (i.turns[0].as_str(), i.id.as_str()))
        .collect();
    let mut count: BTreeMap<String, u32> = BTreeMap::new();
    let mut out = Vec::new();
    for (line, v) in rows {
        let at = || format!("{}:{line}", path.display());
        let id = ["id", "task_id", "question_id", "item"]
            .iter()
            .find_map(|k| match v.get(*k) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            })
            .or_else(|| {
                v.get("instruction")
                    .and_then(Value::as_str)
                    .and_then(|i| by_instruction.get(i))
                    .map(|s| s.to_string())
            })
            .with_context(|| {
                format!(
                    "{}: no item id (`id`, `task_id`, `question_id`) or known `instruction`",
                    at()
                )
            })?;
        let turns: Vec<String> = if let Some(Value::Array(t)) =
            v.get("turns").or_else(|| v.pointer("/choices/0/turns"))
        {
            t.iter()
                .map(|x| x.as_str().unwrap_or("").to_string())
                .collect()
        } else {
            let text = ["completion", "output", "answer", "text", "response"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str))
                .with_context(|| {
                    format!(
                        "{}: no answer text (`completion`, `output`, `answer`, `text`, `turns`)",
                        at()
                    )
                })?;
            vec![text.to_string()]
        };
        let n = count.entry(id.clone()).or_default();
        out.push(Answer {
            item: id,
            sample: *n,
            turns,
        });
        *n += 1;
    }
    Ok(out)
}

fn model_name(a: &EvalArgs) -> String {
    if let Some(n) = &a.name {
        return n.clone();
    }
    let p = a.model.as_ref().or(a.answers.as_ref()).expect("clap");
    if let Some(url) = is_url(p) {
        return a.served_model.clone().unwrap_or_else(|| url.to_string());
    }
    p.canonicalize()
        .ok()
        .and_then(|p| p.file_stem().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into())
}

pub fn eval(store: &Path, a: &EvalArgs) -> Status {
    let mut bench = bench::load(&a.bench, a.kind)?;
    if let Some(n) = a.limit {
        bench.items.truncate(n);
    }
    if a.samples == 0 {
        bail!("--samples: must be at least 1");
    }
    let name = model_name(a);
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("eval").join(format!("{}-{}", bench.name, name)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let started = std::time::Instant::now();
    let (answers, generation) = match &a.answers {
        Some(p) => (read_answers(&bench, p)?, json!({"answers": p})),
        None => generate(&bench, a, store, &name, &out)?,
    };
    let (verdicts, judge, games) = match bench.kind {
        Kind::Exact | Kind::FinalLine | Kind::Math | Kind::Choice => {
            (score::score_text(&bench, &answers)?, None, vec![])
        }
        Kind::Code => {
            let opts =
                super::annotate::code_options(a.jobs, a.check_timeout, a.memory_mib, &a.python)?;
            let bar = bar(answers.len() as u64, "checks");
            let v = score::score_code(&bench, &answers, &opts, &|d| bar.set_position(d as u64))?;
            bar.finish_and_clear();
            (v, None, vec![])
        }
        Kind::Pairwise | Kind::Arena | Kind::MtBench => {
            let Some(jpath) = &a.judge else {
                bail!("--judge: {} is a judged benchmark; give a judge checkpoint or an OpenAI-compatible URL", bench.kind.name());
            };
            let local;
            let local_judge;
            let server;
            let reward;
            let reward_judge;
            let backend: &dyn Backend = if let Some(url) = is_url(jpath) {
                server =
                    EndpointJudge::new(endpoint(url, a.judge_model.clone(), a, "--judge-model")?);
                &server
            } else if is_reward_checkpoint(jpath) {
                use fuselab::model::{parse_device, parse_dtype, Checkpoint};
                let ck = Checkpoint::open(jpath)?;
                let rm = fuselab::reward::RewardModel::load(
                    &ck,
                    &parse_device(&a.device.device)?,
                    parse_dtype(&a.device.dtype)?,
                )?;
                let identity = fuselab::train::model_identity(&ck.dir)?;
                reward = (rm, ck);
                reward_judge = RewardJudge {
                    model: &reward.0,
                    checkpoint: &reward.1,
                    identity,
                };
                &reward_judge
            } else {
                use fuselab::model::{
                    load_weights, parse_device, parse_dtype, Checkpoint, Decoder,
                };
                let ck = Checkpoint::open(jpath)?;
                let device = parse_device(&a.device.device)?;
                let w = load_weights(&ck.dir, &ck.config, &device, parse_dtype(&a.device.dtype)?)?;
                local = (Decoder::new(ck.config.clone(), w)?, ck);
                local_judge = LocalJudge {
                    decoder: &local.0,
                    tokenizer: local.1.tokenizer()?,
                    template: local.1.template()?,
                    stop_token_ids: local.1.stop_token_ids(),
                    identity: fuselab::train::model_identity(&local.1.dir)?,
                };
                &local_judge
            };
            let bar = bar(0, "judgments");
            let setup = JudgeSetup {
                backend,
                cache_dir: &store.join("judge-cache"),
                seed: a.seed,
                max_tokens: a.judge_max_tokens,
                prompt_override: a.judge_prompt.as_deref(),
                progress: &|d| bar.set_position(d),
            };
            let (v, info, games) = score::score_judged(&bench, &answers, &setup)?;
            bar.finish_and_clear();
            (v, Some(info), games)
        }
    };
    let result = score::summarise(&bench, &name, &answers, verdicts, judge, &games, a.seed);
    let mut extra = json!({"generation": generation, "seconds": started.elapsed().as_secs_f64()});
    if let Some(v) = a.paper {
        extra["paper"] = json!(v);
    }
    let record = fuselab::eval::output::write(
        &out,
        &bench,
        &result,
        &answers,
        a.role.as_deref(),
        a.category.as_deref(),
        extra,
    )?;
    if a.json {
        print_json(&record);
    } else {
        print_summary(&result, &out);
    }
    Ok(0)
}

fn print_summary(r: &BenchResult, out: &Path) {
    let unit = if r.scale == "rating" { "" } else { "%" };
    println!(
        "{} on {}: {:.2}{unit} [{:.2}, {:.2}] over {} items ({} unscored)",
        r.model, r.bench, r.score.value, r.score.lo, r.score.hi, r.n_items, r.n_unscored
    );
    for (k, v) in &r.pass_at_k {
        println!("  pass@{k}: {v:.2}%");
    }
    if let Some(lc) = &r.lc {
        println!(
            "  win rate {:.2}% (LC {:.2}%), {} wins / {} losses / {} draws",
            lc.win_rate, lc.length_controlled_winrate, lc.n_wins, lc.n_wins_base, lc.n_draws
        );
    }
    if let Some(j) = &r.judge {
        println!(
            "  judge: {} asked, {} cached, {} requests, {} failed",
            j.stats.asked, j.stats.cache_hits, j.stats.requests, j.stats.failed
        );
    }
    if r.per_category.len() > 1 {
        for c in &r.per_category {
            println!("  {:<20} {:>8.2}{unit}  (n={})", c.category, c.score, c.n);
        }
    }
    let unscored: Vec<_> = r.verdicts.iter().filter(|v| v.score.is_none()).collect();
    for v in unscored.iter().take(5) {
        println!("  unscored {}: {}", v.item, v.reason);
    }
    println!("  -> {}", out.display());
}

/// An eval result: a `result.json`, a directory holding one, or (when no such path exists) the
/// digest prefix of an eval step's output tree in the store.
fn load_result(store: &Path, p: &Path) -> anyhow::Result<BenchResult> {
    let bytes = if p.exists() {
        let file = if p.is_dir() {
            p.join("result.json")
        } else {
            p.to_path_buf()
        };
        std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?
    } else {
        let prefix = p.to_str().unwrap_or("");
        if !(4..=64).contains(&prefix.len()) || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "{}: no such file, and not a digest prefix (4 to 64 hexadecimal digits)",
                p.display()
            );
        }
        let store = super::open_store(store)?;
        let d = store.resolve_prefix(prefix)?;
        let tree = store
            .read_tree(&d)
            .with_context(|| format!("{prefix}: not an eval step's output tree"))?;
        let e = tree
            .entries
            .iter()
            .find(|e| e.path == "result.json")
            .with_context(|| {
                format!("{prefix}: the tree holds no result.json (not an eval step's outputs)")
            })?;
        store.verify_object(&e.digest)?;
        store.read_bytes(&e.digest)?
    };
    let v: Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", p.display()))?;
    let r = v.get("result").cloned().unwrap_or(v);
    serde_json::from_value(r).with_context(|| format!("{}: not a fuselab eval result", p.display()))
}

pub fn compare(store: &Path, a: &CompareArgs) -> Status {
    let (x, y) = (load_result(store, &a.a)?, load_result(store, &a.b)?);
    if x.bench != y.bench {
        bail!(
            "{} is {} but {} is {}: a paired comparison needs the same benchmark",
            a.a.display(),
            x.bench,
            a.b.display(),
            y.bench
        );
    }
    let ys: BTreeMap<&str, Option<f64>> = y
        .item_scores
        .iter()
        .map(|(i, s)| (i.as_str(), *s))
        .collect();
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    for (item, s) in &x.item_scores {
        if let (Some(p), Some(Some(q))) = (s, ys.get(item.as_str())) {
            sa.push(*p);
            sb.push(*q);
        }
    }
    if sa.is_empty() {
        bail!("no item is scored in both results");
    }
    let p = stats::paired(&sa, &sb, stats::DEFAULT_ROUNDS, a.seed);
    let unit = if x.scale == "rating" { 1.0 } else { 100.0 };
    let out = json!({
        "bench": x.bench, "a": {"model": x.model, "score": x.score}, "b": {"model": y.model, "score": y.score},
        "paired_items": sa.len(), "diff": p.diff.value * unit, "diff_lo": p.diff.lo * unit, "diff_hi": p.diff.hi * unit,
        "p_bootstrap": p.p_bootstrap, "p_exact": p.p_exact, "test": p.test,
        "a_better": p.a_better, "b_better": p.b_better, "ties": p.ties,
    });
    if a.json {
        print_json(&out);
    } else {
        println!("{:<24} {:>10} {:>22}", "model", "score", "95% interval");
        for r in [&x, &y] {
            println!(
                "{:<24} {:>10.2} {:>22}",
                r.model,
                r.score.value,
                format!("[{:.2}, {:.2}]", r.score.lo, r.score.hi)
            );
        }
        println!(
            "{} - {} on {} paired items: {:+.2} [{:+.2}, {:+.2}]  p = {:.4} (paired bootstrap), {:.4} ({})  better/worse/tied {}/{}/{}",
            x.model, y.model, sa.len(), p.diff.value * unit, p.diff.lo * unit, p.diff.hi * unit, p.p_bootstrap, p.p_exact, p.test,
            p.a_better, p.b_better, p.ties
        );
    }
    Ok(0)
}

pub fn report(store: &Path, a: &ReportArgs) -> Status {
    let (html, json_path, data) = if a.results.is_empty() {
        let store = super::open_store(store)?;
        fuselab::report::write(&store, &a.experiment, &a.out, a.seed)?
    } else {
        let mut evals = Vec::new();
        for d in &a.results {
            let digest = fuselab::store::Store::digest_path(d)
                .with_context(|| format!("hashing {}", d.display()))?
                .digest
                .to_string();
            let step = d.display().to_string();
            match fuselab::report::gather::read_eval_dir(d, &digest, &step)? {
                Some(e) => evals.push(e),
                None => bail!(
                    "{}: no result.json (not a `fuselab eval` output directory)",
                    d.display()
                ),
            }
        }
        let data = fuselab::report::gather::assemble(
            &a.experiment,
            "",
            "",
            None,
            false,
            evals,
            vec![],
            None,
            vec![],
            a.seed,
        );
        let (h, j) = fuselab::report::write_data(&data, &a.out)?;
        (h, j, data)
    };
    if a.json {
        print_json(&data);
    } else {
        println!(
            "{}: {} benchmarks x {} models, {} training curves -> {} ({})",
            a.experiment,
            data.benches.len(),
            data.models.len(),
            data.curves.len(),
            html.display(),
            json_path.display()
        );
    }
    Ok(0)
}

pub fn synth(a: &SynthArgs) -> Status {
    use fuselab::synth::{suite, Split, SuiteParams};
    let p = SuiteParams {
        seed: a.seed,
        train_per_skill: a.train,
        sampling_per_skill: a.sampling,
        eval_per_skill: a.eval,
        sampling_per_skill_by_category: Default::default(),
    };
    let tasks = suite(&p)?;
    let mut lines = String::new();
    for t in &tasks {
        lines.push_str(&serde_json::to_string(t)?);
        lines.push('\n');
    }
    let write = |rel: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let path = a.out.join(rel);
        fuselab::fs::write_durable(&path, bytes)
            .with_context(|| format!("writing {}", path.display()))
    };
    write("tasks.jsonl", lines.as_bytes())?;
    let mut counts = serde_json::Map::new();
    for split in Split::ALL {
        let prompts: Vec<fuselab::data::Prompt> = tasks
            .iter()
            .filter(|t| t.split == split)
            .map(|t| t.to_prompt())
            .collect();
        let path = a.out.join(format!("{}.prompts.jsonl", split.name()));
        fuselab::data::write_records(&prompts, &path)?;
        counts.insert(split.name().into(), json!(prompts.len()));
    }
    let summary = json!({"out": a.out, "tasks": tasks.len(), "splits": counts, "params": p});
    if a.json {
        print_json(&summary);
    } else {
        println!(
            "{} tasks -> {} ({})",
            tasks.len(),
            a.out.display(),
            serde_json::Value::Object(counts)
        );
    }
    Ok(0)
}
