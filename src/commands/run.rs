//! `run`, `plan`, `verify`, `exec-step`: the commands that execute experiments.

use std::collections::BTreeMap;

use anyhow::Context;
use fuselab::experiments::registry;
use fuselab::recipe::{self, ExecutorKind, PlanStatus, RunOptions, StepStatus, VerifyStatus};

use super::{create_store, open_store, print_json, progress, project_dir, Status};
use crate::cli::{
    CancelArgs, ExecNodeArgs, ExecStepArgs, ExecutorArg, ExperimentArgs, PlanArgs, RunArgs,
};

fn instantiate(args: &ExperimentArgs) -> anyhow::Result<recipe::Experiment> {
    let reg = registry();
    let def = recipe::find(&reg, &args.experiment)?;
    let params = def.resolve_params(&args.set)?;
    Ok(def.instantiate(&params)?)
}

/// Set by SIGINT / SIGTERM while a Slurm driver waits: it cancels its jobs and stops.
static CANCEL: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(flag) = CANCEL.get() {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Per-step Slurm resource overrides: step (or `default`) -> field -> value.
type SlurmSets = BTreeMap<String, BTreeMap<String, String>>;

/// `--set slurm.<step>.<field>=<value>` are the Slurm executor's, not the experiment's.
fn split_slurm_sets(sets: &[String]) -> anyhow::Result<(Vec<String>, SlurmSets)> {
    let mut rest = Vec::new();
    let mut slurm = SlurmSets::new();
    for s in sets {
        let Some(tail) = s.strip_prefix("slurm.") else {
            rest.push(s.clone());
            continue;
        };
        let (path, value) = tail
            .split_once('=')
            .with_context(|| format!("--set {s}: expected slurm.<step>.<field>=<value>"))?;
        let (step, field) = path
            .rsplit_once('.')
            .with_context(|| format!("--set {s}: expected slurm.<step>.<field>=<value>"))?;
        slurm
            .entry(step.to_string())
            .or_default()
            .insert(field.to_string(), value.to_string());
    }
    Ok((rest, slurm))
}

pub fn run(store_path: &std::path::Path, args: &RunArgs) -> Status {
    let (sets, slurm_sets) = split_slurm_sets(&args.exp.set)?;
    let exp = {
        let reg = registry();
        let def = recipe::find(&reg, &args.exp.experiment)?;
        def.instantiate(&def.resolve_params(&sets)?)?
    };
    if !slurm_sets.is_empty() && !matches!(args.executor, ExecutorArg::Slurm) {
        anyhow::bail!("--set slurm.*: only with --executor slurm");
    }
    for step in slurm_sets.keys() {
        if step != "default" {
            exp.index_of(step)?;
        }
    }
    let store = create_store(store_path)?;
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let opts = RunOptions {
        force: args.force.clone(),
        until: args.until.clone(),
        jobs,
        executor: match args.executor {
            ExecutorArg::InProcess | ExecutorArg::Slurm => ExecutorKind::InProcess,
            ExecutorArg::Process => ExecutorKind::Process,
        },
        project: project_dir()?,
        overrides: args.exp.set.clone(),
        progress: progress(),
    };
    let mut report = if matches!(args.executor, ExecutorArg::Slurm) {
        let cancel = CANCEL.get_or_init(Default::default).clone();
        // SAFETY: the handler only stores to an atomic that is initialised before it is installed.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
        let slurm = recipe::slurm::SlurmOptions {
            partition: args.partition.clone(),
            account: args.account.clone(),
            qos: args.qos.clone(),
            overrides: slurm_sets,
            poll_s: args.poll,
            cancel,
        };
        recipe::slurm::run(&store, &exp, &opts, &slurm)?
    } else {
        recipe::run(&store, &exp, &opts)?
    };
    if args.exp.json {
        print_json(&report);
    } else {
        let ran = report
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Ran)
            .count();
        eprintln!(
            "{}: {} steps, {ran} executed, {} cached in {:.2}s (invocation {})",
            report.experiment,
            report.steps.len(),
            report
                .steps
                .iter()
                .filter(|s| s.status == StepStatus::Cached)
                .count(),
            report.duration_s,
            report.invocation
        );
    }
    // The report is the last stage of every experiment that evaluates models: rendered from the
    // store after a complete run (cached or not), so it always shows the latest results.
    // A report that cannot be written does not undo a completed run: it is reported, and
    // `fuselab report` can render it later.
    if report.failure.is_none() && args.until.is_none() {
        let written =
            fuselab::report::gather::gather(&store, &report.experiment, 0).and_then(|data| {
                if data.benches.is_empty() {
                    return Ok(None);
                }
                let dir = project_dir()
                    .map_err(|e| fuselab::report::ReportError::Render(e.to_string()))?;
                fuselab::report::write_data(&data, &dir.join("reports")).map(|p| Some(p.0))
            });
        match written {
            Ok(Some(html)) if !args.exp.json => eprintln!("report: {}", html.display()),
            Ok(_) => {}
            Err(e) => eprintln!(
                "warning: the report of {} was not written: {e}",
                report.experiment
            ),
        }
    }
    match report.failure.take() {
        Some(e) => Err(anyhow::Error::new(e).context(format!(
            "experiment `{}` did not complete (invocation {})",
            report.experiment, report.invocation
        ))),
        None => Ok(0),
    }
}

pub fn plan(store_path: &std::path::Path, args: &PlanArgs) -> Status {
    let exp = instantiate(&args.exp)?;
    let store = if args.write_specs {
        create_store(store_path)?
    } else {
        fuselab::store::Store::open_or_absent(store_path)
            .with_context(|| format!("opening the store at {}", store_path.display()))?
    };
    let entries = recipe::plan(&store, &exp, &project_dir()?, args.write_specs)?;
    if args.exp.json {
        print_json(&entries);
        for p in exp.problems() {
            eprintln!("input not ready: {p}");
        }
        return Ok(0);
    }
    println!("experiment {}", exp.name());
    for e in &entries {
        let status = match e.status {
            PlanStatus::Cached => "cached",
            PlanStatus::Run => "run",
            PlanStatus::Pending => "run (after inputs)",
            PlanStatus::Missing => "MISSING",
        };
        let key = e.key.map(|k| k.short()).unwrap_or_else(|| "-".repeat(12));
        let inputs = if e.inputs.is_empty() {
            String::new()
        } else {
            format!(" <- {}", e.inputs.join(", "))
        };
        println!(
            "  {:<18} {key}  {:<20} {} v{}{inputs}",
            status, e.step, e.kind, e.version
        );
    }
    let estimated: Vec<_> = entries
        .iter()
        .filter_map(|e| e.estimate.as_ref().map(|x| (e.step.as_str(), x)))
        .collect();
    if !estimated.is_empty() {
        println!();
        println!(
            "  {:<28} {:>10} {:>12} {:>12} {:>10} {:>10} {:>5}",
            "estimate", "params", "tokens", "FLOPs", "GPU-hours", "memory", "GPUs"
        );
        let (mut tokens, mut flops, mut hours) = (0.0, 0.0, 0.0);
        for (step, x) in &estimated {
            tokens += x.tokens;
            flops += x.flops;
            hours += x.gpu_hours;
            println!(
                "  {:<28} {:>10} {:>12} {:>12} {:>10.1} {:>10} {:>5}",
                step,
                if x.parameters > 0 {
                    si(x.parameters as f64, "")
                } else {
                    "-".into()
                },
                si(x.tokens, ""),
                si(x.flops, ""),
                x.gpu_hours,
                if x.memory_bytes > 0.0 {
                    si(x.memory_bytes, "B")
                } else {
                    "-".into()
                },
                if x.gpus > 0 {
                    x.gpus.to_string()
                } else {
                    "-".into()
                },
            );
        }
        println!(
            "  {:<28} {:>10} {:>12} {:>12} {:>10.1}",
            "total",
            "",
            si(tokens, ""),
            si(flops, ""),
            hours
        );
        let mut bases: Vec<&str> = Vec::new();
        for (step, x) in &estimated {
            if !x.basis.is_empty() && !bases.contains(&x.basis.as_str()) {
                bases.push(&x.basis);
                println!("  basis ({step}...): {}", x.basis);
            }
        }
    }
    if !exp.problems().is_empty() {
        println!();
        println!("inputs not ready (`run` refuses until each is fixed):");
        for p in exp.problems() {
            println!("  - {p}");
        }
    }
    Ok(0)
}

/// `1.2G`-style figures for the plan's estimates.
fn si(x: f64, unit: &str) -> String {
    let (v, p) = [
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ]
    .iter()
    .find(|(v, _)| x >= *v)
    .map(|(v, p)| (x / v, *p))
    .unwrap_or((x, ""));
    format!("{v:.1}{p}{unit}")
}

pub fn verify(store_path: &std::path::Path, args: &ExperimentArgs) -> Status {
    let exp = instantiate(args)?;
    let store = open_store(store_path)?;
    let entries = recipe::verify(&store, &exp, &project_dir()?, &progress())?;
    let bad = entries
        .iter()
        .filter(|e| matches!(e.status, VerifyStatus::Differs | VerifyStatus::Failed))
        .count();
    if args.json {
        print_json(&entries);
    } else {
        for e in &entries {
            let status = match e.status {
                VerifyStatus::Identical => "identical",
                VerifyStatus::WithinTolerance => "within tolerance",
                VerifyStatus::Differs => "DIFFERS",
                VerifyStatus::NotRun => "not run",
                VerifyStatus::Failed => "FAILED",
            };
            let detail = e
                .detail
                .as_deref()
                .map(|d| format!("  {d}"))
                .unwrap_or_default();
            println!("  {status:<17} {}{detail}", e.step);
        }
        println!(
            "{}: {} of {} steps reproduced",
            exp.name(),
            entries
                .iter()
                .filter(|e| matches!(
                    e.status,
                    VerifyStatus::Identical | VerifyStatus::WithinTolerance
                ))
                .count(),
            entries.len()
        );
    }
    Ok(if bad > 0 { 1 } else { 0 })
}

pub fn exec_step(store_path: &std::path::Path, args: &ExecStepArgs) -> Status {
    // With --remote, a node that shares only the remote with the driver: its own store (created if
    // empty) is a cache; the spec and inputs come from the remote, the results go back to it.
    let remote = match &args.remote {
        None => None,
        Some(url) => {
            let key: fuselab::store::Digest = args
                .key
                .0
                .parse()
                .context("exec-step --remote needs the full 64-digit key")?;
            Some((key, fuselab::remote::Remote::open(url, Default::default())?))
        }
    };
    let store = match &remote {
        None => open_store(store_path)?,
        Some(_) => create_store(store_path)?,
    };
    if let Some((key, r)) = &remote {
        if !args.force {
            if let Some(entry) = r.pull_entry(&store, key)? {
                print_exec(key, &entry.step, &entry, false);
                return Ok(0);
            }
        }
        r.prepare_step(&store, key)?;
    }
    let (spec, done) = recipe::exec_step(
        &store,
        &registry(),
        &args.key.0,
        args.force,
        &project_dir()?,
        args.invocation.clone(),
        progress(),
    )?;
    if let Some((_, r)) = &remote {
        r.push_entry(&store, &done.entry)?;
    }
    print_exec(&spec.key, &spec.step, &done.entry, done.ran);
    Ok(0)
}

fn print_exec(
    key: &fuselab::store::Digest,
    step: &str,
    entry: &recipe::records::CacheEntry,
    ran: bool,
) {
    print_json(&serde_json::json!({
        "key": key,
        "step": step,
        "status": if ran { "ran" } else { "cached" },
        "run_id": entry.run_id,
        "outputs": entry.outputs,
    }));
}

pub fn exec_node(store_path: &std::path::Path, args: &ExecNodeArgs) -> Status {
    let store = open_store(store_path)?;
    let (spec, done) = recipe::slurm::exec_node(
        &store,
        &registry(),
        &args.plan,
        &args.step,
        &project_dir()?,
        args.invocation.as_ref().map(|i| i.to_string()),
        progress(),
    )?;
    print_exec(&spec.key, &spec.step, &done.entry, done.ran);
    Ok(0)
}

pub fn cancel(store_path: &std::path::Path, args: &CancelArgs) -> Status {
    let store = open_store(store_path)?;
    let n = recipe::slurm::cancel_invocation(&store, &args.invocation)?;
    println!("cancelled {n} job(s) of {}", args.invocation);
    Ok(0)
}
