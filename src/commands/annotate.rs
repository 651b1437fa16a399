//! `annotate code`: sandboxed verdicts on code completions.

use std::time::Duration;

use anyhow::bail;
use fuselab::annotate::sandbox::{Isolation, Limits, Python};
use fuselab::annotate::{check_code_files, CodeOptions};
use indicatif::{ProgressBar, ProgressStyle};

use super::{print_json, Status};
use crate::cli::AnnotateCommand;

pub(crate) fn code_options(
    jobs: usize,
    timeout: f64,
    memory_mib: u64,
    python: &Option<String>,
) -> anyhow::Result<CodeOptions> {
    if !(timeout.is_finite() && timeout > 0.0) {
        bail!("--timeout: {timeout} must be a positive number of seconds");
    }
    if jobs == 0 {
        bail!("--jobs: must be at least 1");
    }
    let python = match python {
        Some(p) => Python::find(p)?,
        None => Python::default_choice()?,
    };
    Ok(CodeOptions {
        jobs,
        limits: Limits {
            wall: Duration::from_secs_f64(timeout),
            cpu_s: timeout.ceil() as u64 + 1,
            memory_bytes: memory_mib << 20,
            ..Limits::default()
        },
        python,
        isolation: None,
    })
}

pub fn annotate(cmd: &AnnotateCommand) -> Status {
    match cmd {
        AnnotateCommand::Samples {
            prompts,
            samples,
            reward_model,
            out,
            batch_size,
            jobs,
            timeout,
            memory_mib,
            python,
            device,
            json,
        } => {
            use fuselab::data::{read_records, write_records, Prompt, Sample};
            use fuselab::model::{parse_device, parse_dtype, Checkpoint};
            use fuselab::reward::RewardModel;
            let opts = code_options(*jobs, *timeout, *memory_mib, python)?;
            let ps: Vec<Prompt> = read_records(prompts)?;
            let ss: Vec<Sample> = read_records(samples)?;
            let rm = match reward_model {
                Some(dir) => {
                    let ck = Checkpoint::open(dir)?;
                    let rm = RewardModel::load(
                        &ck,
                        &parse_device(&device.device)?,
                        parse_dtype(&device.dtype)?,
                    )?;
                    Some((rm, ck))
                }
                None => None,
            };
            let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
            let started = std::time::Instant::now();
            let notes = fuselab::annotate::samples::annotate_samples(
                &ps,
                &ss,
                rm.as_ref().map(|(m, c)| (m, c, *batch_size)),
                &opts,
                &|stage, done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                    bar.set_message(stage.to_string());
                },
            )?;
            bar.finish_and_clear();
            write_records(&notes, out)?;
            let correct = notes.iter().filter(|a| a.correct == Some(true)).count();
            let checked = notes.iter().filter(|a| a.correct.is_some()).count();
            let summary = serde_json::json!({
                "out": out, "annotations": notes.len(), "scored": notes.iter().filter(|a| a.score.is_some()).count(),
                "checked": checked, "correct": correct, "seconds": started.elapsed().as_secs_f64(),
            });
            if *json {
                print_json(&summary);
            } else {
                println!(
                    "{} annotations ({} scored, {checked} checked, {correct} correct) -> {}",
                    notes.len(),
                    summary["scored"],
                    out.display()
                );
            }
            Ok(0)
        }
        AnnotateCommand::Reward {
            model,
            samples,
            batch_size,
            device,
            json,
        } => {
            use fuselab::model::{parse_device, parse_dtype, Checkpoint};
            use fuselab::reward::RewardModel;
            let ck = Checkpoint::open(model)?;
            let rm = RewardModel::load(
                &ck,
                &parse_device(&device.device)?,
                parse_dtype(&device.dtype)?,
            )?;
            let rows = fuselab::data::read_values(samples)?;
            let mut ids = Vec::with_capacity(rows.len());
            let mut convs = Vec::with_capacity(rows.len());
            for (line, row) in &rows {
                let id = row.get("id").cloned().unwrap_or(serde_json::Value::Null);
                let msgs = row
                    .get("messages")
                    .filter(|m| m.is_array())
                    .ok_or_else(|| {
                        anyhow::anyhow!("{}:{line}: no `messages` list", samples.display())
                    })?;
                ids.push(id);
                convs.push(msgs.clone());
            }
            let bar = ProgressBar::with_draw_target(
                Some(rows.len() as u64),
                indicatif::ProgressDrawTarget::stderr(),
            );
            let scores = rm.score_conversations(&ck, &convs, *batch_size, &mut |n| {
                bar.set_position(n as u64)
            })?;
            bar.finish_and_clear();
            let out: Vec<serde_json::Value> = ids
                .into_iter()
                .zip(scores)
                .map(|(id, s)| {
                    let mut v = serde_json::json!({"id": id, "score": s[0]});
                    if s.len() > 1 {
                        v["logits"] = serde_json::json!(s);
                    }
                    v
                })
                .collect();
            if *json {
                print_json(&out);
            } else {
                for v in out {
                    println!("{}\t{}", v["id"], v["score"]);
                }
            }
            Ok(0)
        }
        AnnotateCommand::Math {
            answers,
            gold_field,
            answer_field,
            json,
        } => {
            let started = std::time::Instant::now();
            let rows = fuselab::annotate::math::judge_file(answers, gold_field, answer_field)?;
            if *json {
                print_json(&rows);
            } else {
                let correct = rows.iter().filter(|r| r.verdict.correct).count();
                let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
                for r in &rows {
                    *reasons.entry(r.verdict.reason).or_default() += 1;
                }
                println!(
                    "n {}  correct {}  accuracy {:.4}  time {:.3}s",
                    rows.len(),
                    correct,
                    correct as f64 / rows.len() as f64,
                    started.elapsed().as_secs_f64()
                );
                for (reason, n) in reasons {
                    println!("  {reason}: {n}");
                }
            }
            Ok(0)
        }
        AnnotateCommand::Code {
            problems,
            completions,
            jobs,
            timeout,
            memory_mib,
            python,
            json,
        } => {
            let opts = code_options(*jobs, *timeout, *memory_mib, python)?;
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "annotate code {bar:30} {pos} checks [{elapsed_precise}, {per_sec}]",
                )
                .expect("valid template"),
            );
            let report = check_code_files(problems, completions, &opts, &|n| {
                bar.set_position(n as u64)
            })?;
            bar.finish_and_clear();
            if let Isolation::RlimitsOnly(why) = &report.isolation {
                eprintln!(
                    "WARNING: the kernel refused namespaces ({why}); checks ran with rlimits and a \
                     process group only: the code could reach the network and the host's files"
                );
            }
            if *json {
                print_json(&report.results);
            } else {
                let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
                for r in report.results.iter().filter(|r| !r.passed) {
                    *reasons.entry(r.reason.as_str()).or_default() += 1;
                }
                println!(
                    "n {}  passed {}  pass@1 {:.4}  time {:.1}s ({:.1} checks/s)  isolation {}",
                    report.n,
                    report.passed,
                    report.pass_at_1,
                    report.wall_s,
                    report.n as f64 / report.wall_s.max(1e-9),
                    match &report.isolation {
                        Isolation::Namespaces => "namespaces",
                        Isolation::RlimitsOnly(_) => "RLIMITS ONLY",
                    }
                );
                for (reason, n) in reasons {
                    println!("  {reason}: {n}");
                }
            }
            Ok(0)
        }
    }
}
