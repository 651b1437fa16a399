//! The Slurm executor: each step that is not cached becomes a batch job running `fuselab exec-node`
//! (this binary), with `--dependency=afterok:` edges for the DAG and the step's declared resources.
//! The driver keeps its jobs in the store (`slurm/<plan>/`), so a restarted driver re-attaches to
//! them instead of submitting again; a failed job fails its descendants with the job's log tail.
//!
//! A job cannot be handed its step key at submission: the key covers the inputs' content, which
//! exists only once the parent jobs have finished. So the driver writes a *plan* — experiment,
//! parameters and the digests of the raw inputs — and the job recomputes its inputs' keys from it
//! when it starts, finding each parent's outputs through its cache entry. The plan's digest and the
//! step name identify the job (its Slurm job name), across driver restarts.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::MultiProgress;
use serde::{Deserialize, Serialize};

use super::engine::{
    checked_selection, execute_locked, failed_report, finish_run, ingest_source, new_id, selection,
    source_report, spec_for, Env, Executed, RunOptions, RunReport, StepReport, StepStatus,
};
use super::records::JobInfo;
use super::{ExperimentDef, NodeKind, RecipeError, Resources, Result, SpecInput, StepSpec};
use crate::fs::{self as xfs, IoContext};
use crate::store::{ArtifactRef, Digest, Store};
use crate::util::{canonical_json, rfc3339, unix_now};

/// How the driver talks to Slurm.
#[derive(Clone, Debug, Default)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Per-step overrides of the declared resources; the key `default` applies to every step.
    pub overrides: BTreeMap<String, BTreeMap<String, String>>,
    /// Seconds between polls of the job states.
    pub poll_s: f64,
    /// Set (by a Ctrl-C handler) to cancel every job of this driver and stop.
    pub cancel: Arc<AtomicBool>,
}

/// What a job needs to rebuild its step: written once per distinct plan, read by `exec-node`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SlurmPlan {
    pub experiment: String,
    pub experiment_params: serde_json::Value,
    /// Raw inputs by node name, as the driver ingested them.
    pub sources: BTreeMap<String, ArtifactRef>,
    pub force: Vec<String>,
}

/// The driver's note of a submitted job (`slurm/<plan>/<step>.job.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JobFile {
    job_id: String,
    step: String,
    submitted_at: String,
    invocation: String,
}

/// A job's state as Slurm reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobStatus {
    pub state: String,
    pub exit_code: String,
    pub node: Option<String>,
    pub reason: String,
}

impl JobStatus {
    fn live(&self) -> bool {
        matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "REQUEUED"
                | "RESIZING"
                | "SUSPENDED"
                | "STAGE_OUT"
                | "SIGNALING"
        )
    }
}

fn plan_dir(store: &Store, plan: &Digest) -> PathBuf {
    store.root().join("slurm").join(plan.to_string())
}

fn slurm_err(step: &str, message: String) -> RecipeError {
    RecipeError::Subprocess {
        step: step.to_string(),
        message,
    }
}

/// Run a Slurm client command; its stdout, or an error quoting its stderr.
fn client(step: &str, cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| {
        slurm_err(
            step,
            format!("{shown}: {e} (is Slurm installed and SLURM_CONF set?)"),
        )
    })?;
    if !out.status.success() {
        return Err(slurm_err(
            step,
            format!(
                "{shown} exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The state of one job: `scontrol` while slurmctld remembers it, then the accounting database
/// (`sacct`), then the job-completion log (`sacct --completion`, clusters without slurmdbd).
pub fn job_status(job: &str) -> Option<JobStatus> {
    let out = Command::new("scontrol")
        .args(["show", "job", "-o", job])
        .output()
        .ok()?;
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        if let Some(state) = field("JobState") {
            return Some(JobStatus {
                state,
                exit_code: field("ExitCode").unwrap_or_default(),
                node: field("NodeList").filter(|n| n != "(null)" && !n.is_empty()),
                reason: field("Reason").unwrap_or_default(),
            });
        }
    }
    for extra in [&[][..], &["--completion"][..]] {
        let out = Command::new("sacct")
            .args(["-X", "-n", "-P", "-o", "State,ExitCode,NodeList", "-j", job])
            .args(extra)
            .output()
            .ok()?;
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().find(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split('|').collect();
            return Some(JobStatus {
                // "CANCELLED by 0" -> "CANCELLED"
                state: f[0].split_whitespace().next().unwrap_or("").to_string(),
                exit_code: f.get(1).unwrap_or(&"").to_string(),
                node: f
                    .get(2)
                    .map(|s| s.to_string())
                    .filter(|n| n != "(null)" && !n.is_empty() && n != "None assigned"),
                reason: String::new(),
            });
        }
    }
    None
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The resources a step's job asks for: its declaration, then `slurm.default.*`, then
/// `slurm.<step>.*`.
pub fn resources_for(step: &str, declared: &Resources, opts: &SlurmOptions) -> Result<Resources> {
    let mut r = declared.clone();
    for scope in ["default", step] {
        let Some(map) = opts.overrides.get(scope) else {
            continue;
        };
        for (field, value) in map {
            let bad = |reason: &str| RecipeError::BadSet {
                arg: format!("slurm.{scope}.{field}={value}"),
                reason: reason.to_string(),
            };
            match field.as_str() {
                "cpus" => r.cpus = value.parse().map_err(|_| bad("expected a whole number"))?,
                "mem_mb" => r.mem_mb = value.parse().map_err(|_| bad("expected megabytes"))?,
                "gpus" => r.gpus = value.parse().map_err(|_| bad("expected a whole number"))?,
                "time_min" => {
                    r.time_min = Some(value.parse().map_err(|_| bad("expected minutes"))?)
                }
                _ => return Err(bad("fields are cpus, mem_mb, gpus, time_min")),
            }
        }
    }
    Ok(r)
}

/// The batch script for one step: everything Slurm needs is in its `#SBATCH` lines, so `sbatch
/// <script>` by hand resubmits it.
#[allow(clippy::too_many_arguments)]
pub fn sbatch_script(
    exe: &Path,
    store: &Path,
    project: &Path,
    plan: &Digest,
    step: &str,
    invocation: &str,
    r: &Resources,
    opts: &SlurmOptions,
    log: &Path,
) -> String {
    let mut s = String::from("#!/bin/bash\n");
    s += &format!("#SBATCH --job-name={}\n", job_name(plan, step));
    s += &format!("#SBATCH --output={}\n", log.display());
    s += &format!("#SBATCH --chdir={}\n", project.display());
    s += "#SBATCH --nodes=1\n#SBATCH --ntasks=1\n";
    s += &format!("#SBATCH --cpus-per-task={}\n", r.cpus.max(1));
    s += &format!("#SBATCH --mem={}M\n", r.mem_mb.max(1));
    if r.gpus > 0 {
        s += &format!("#SBATCH --gres=gpu:{}\n", r.gpus);
    }
    if let Some(t) = r.time_min {
        s += &format!("#SBATCH --time={t}\n");
    }
    for (flag, v) in [
        ("partition", &opts.partition),
        ("account", &opts.account),
        ("qos", &opts.qos),
    ] {
        if let Some(v) = v {
            s += &format!("#SBATCH --{flag}={v}\n");
        }
    }
    // A job whose parent failed is cancelled by Slurm at once instead of pending forever.
    s += "#SBATCH --kill-on-invalid-dep=yes\n";
    s += &format!(
        "exec {} --store {} exec-node {plan} {step} --invocation {invocation}\n",
        shell_quote(&exe.display().to_string()),
        shell_quote(&store.display().to_string()),
    );
    s
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn job_name(plan: &Digest, step: &str) -> String {
    format!("fuselab-{}-{step}", &plan.to_string()[..12])
}

/// Execute one step of a plan inside a batch job: rebuild the experiment, find every input's
/// outputs through its cache entry (the parents' jobs finished before this one started), then run
/// under the usual lock and commit order.
pub fn exec_node(
    store: &Store,
    registry: &[ExperimentDef],
    plan_digest: &Digest,
    step: &str,
    project: &Path,
    invocation: Option<String>,
    progress: MultiProgress,
) -> Result<(StepSpec, Executed)> {
    let _lock = store.lock_shared()?;
    let path = plan_dir(store, plan_digest).join("plan.json");
    let bytes = fs::read(&path).at(&path)?;
    let plan: SlurmPlan = serde_json::from_slice(&bytes).map_err(|e| RecipeError::BadRecord {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let def = super::find(registry, &plan.experiment)?;
    let exp = def.instantiate(&plan.experiment_params)?;
    let target = exp.index_of(step)?;
    let env = Env::new(store, project, invocation, progress);
    let mut outputs: Vec<Option<ArtifactRef>> = vec![None; exp.nodes.len()];
    let sel = selection(&exp, Some(step))?;
    let mut spec = None;
    for i in 0..exp.nodes.len() {
        if !sel[i] {
            continue;
        }
        let node = &exp.nodes[i];
        match &node.kind {
            NodeKind::Source { .. } => {
                let a = plan.sources.get(&node.def.name).ok_or_else(|| {
                    slurm_err(
                        step,
                        format!("the plan has no raw input `{}`", node.def.name),
                    )
                })?;
                outputs[i] = Some(a.clone());
            }
            NodeKind::Step { .. } => {
                let inputs = node
                    .inputs
                    .iter()
                    .map(|&j| SpecInput {
                        name: exp.nodes[j].def.name.clone(),
                        artifact: outputs[j].clone().expect("inputs come first"),
                    })
                    .collect();
                let s = spec_for(&exp, i, inputs);
                if i == target {
                    spec = Some(s);
                    break;
                }
                let entry = env.records.cache_get(&s.key)?.ok_or_else(|| {
                    slurm_err(
                        step,
                        format!(
                            "input step `{}` (key {}) has no result in the store",
                            node.def.name,
                            s.key.short()
                        ),
                    )
                })?;
                outputs[i] = Some(entry.outputs);
            }
        }
    }
    let spec = spec.ok_or_else(|| slurm_err(step, "not a step".into()))?;
    let NodeKind::Step { body } = &exp.nodes[target].kind else {
        unreachable!("checked above")
    };
    env.records.write_spec(&spec)?;
    let force = plan.force.iter().any(|f| f == step);
    let done = execute_locked(&env, &spec, body, force, "slurm")?;
    Ok((spec, done))
}

#[derive(Clone)]
enum State {
    Pending,
    Job { id: String, log: PathBuf },
    Done(ArtifactRef),
    Failed,
    Skipped,
}

/// `fuselab run --executor slurm`: submit every step not cached, wait for the jobs, report.
pub fn run(
    store: &Store,
    exp: &super::Experiment,
    opts: &RunOptions,
    slurm: &SlurmOptions,
) -> Result<RunReport> {
    let selected = checked_selection(exp, opts)?;
    // Every override is checked before anything is submitted.
    let mut resources = Vec::new();
    for node in &exp.nodes {
        resources.push(resources_for(&node.def.name, &node.def.resources, slurm)?);
    }
    let _lock = store.lock_shared()?;
    let started = unix_now();
    let invocation = new_id(started, "inv");
    let env = Env::new(
        store,
        &opts.project,
        Some(invocation.clone()),
        opts.progress.clone(),
    );
    let n = exp.nodes.len();
    let mut state = vec![State::Pending; n];
    let mut reports: Vec<Option<StepReport>> = vec![None; n];
    let mut failure: Option<RecipeError> = None;

    // Raw inputs are hashed here, on the driver; the plan names them by digest.
    let mut sources = BTreeMap::new();
    for i in 0..n {
        if let NodeKind::Source { path } = &exp.nodes[i].kind {
            if !selected[i] {
                continue;
            }
            let t0 = unix_now();
            match ingest_source(&env, exp, i, path) {
                Ok((e, new)) => {
                    sources.insert(exp.nodes[i].def.name.clone(), e.outputs.clone());
                    reports[i] = Some(source_report(&exp.nodes[i].def.name, &e, new, t0));
                    state[i] = State::Done(e.outputs);
                }
                Err(e) => {
                    reports[i] = Some(failed_report(&exp.nodes[i].def.name, None, &e));
                    state[i] = State::Failed;
                    failure = Some(e);
                }
            }
        }
    }
    let plan = SlurmPlan {
        experiment: exp.name.clone(),
        experiment_params: exp.params.clone(),
        sources,
        force: opts.force.clone(),
    };
    let plan_bytes = canonical_json(&plan);
    let plan_digest = Digest(*blake3::hash(&plan_bytes).as_bytes());
    let dir = plan_dir(store, &plan_digest);
    xfs::create_dir_all_durable(&dir).at(&dir)?;
    let plan_path = dir.join("plan.json");
    if !plan_path.is_file() {
        xfs::atomic_write(&store.tmp_dir(), &plan_path, &plan_bytes, true).at(&plan_path)?;
    }
    let exe = std::env::current_exe().at(Path::new("/proc/self/exe"))?;
    let store_abs = fs::canonicalize(store.root()).at(store.root())?;
    let mut submitted = 0usize;
    let mut attached = 0usize;

    // Walk the DAG once in declaration order (inputs come first): resolve what is cached, attach to
    // jobs already submitted for this plan, submit the rest with afterok edges.
    if failure.is_none() {
        for i in 0..n {
            let node = &exp.nodes[i];
            if !selected[i] || !matches!(node.kind, NodeKind::Step { .. }) {
                continue;
            }
            let name = node.def.name.clone();
            let mut deps = Vec::new();
            let mut inputs = Vec::new();
            for &j in &node.inputs {
                match &state[j] {
                    State::Done(a) => inputs.push(SpecInput {
                        name: exp.nodes[j].def.name.clone(),
                        artifact: a.clone(),
                    }),
                    State::Job { id, .. } => deps.push(id.clone()),
                    _ => unreachable!("every input was resolved or submitted first"),
                }
            }
            let forced = opts.force.contains(&name);
            if deps.is_empty() && !forced {
                let spec = spec_for(exp, i, inputs);
                if let Some(e) = env.records.cache_get(&spec.key)? {
                    env.log(format!("  cached  {name:<16} {}", spec.key.short()));
                    reports[i] = Some(StepReport {
                        step: name.clone(),
                        key: Some(spec.key),
                        status: StepStatus::Cached,
                        run_id: Some(e.run_id),
                        outputs: Some(e.outputs.clone()),
                        duration_s: 0.0,
                        error: None,
                        job: None,
                    });
                    state[i] = State::Done(e.outputs);
                    continue;
                }
            }
            // One log per job (`%j`), so a resubmitted step keeps the failed attempt's log.
            let log_of = |id: &str| dir.join(format!("{name}-{id}.log"));
            let job_path = dir.join(format!("{name}.job.json"));
            // A job of this plan and step that Slurm still runs, or that finished well, is reused:
            // a restarted driver never submits twice.
            let known: Option<JobFile> = fs::read(&job_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(j) = known {
                if let Some(st) = job_status(&j.job_id) {
                    // A completed job is reused only while its step's key is still unknown here
                    // (its parents ran in jobs too); otherwise the cache answered above.
                    if st.live() || (st.state == "COMPLETED" && !deps.is_empty()) {
                        env.log(format!(
                            "  attach  {name:<16} job {} ({})",
                            j.job_id, st.state
                        ));
                        let log = log_of(&j.job_id);
                        state[i] = State::Job { id: j.job_id, log };
                        attached += 1;
                        continue;
                    }
                }
            }
            let r = &resources[i];
            let script = sbatch_script(
                &exe,
                &store_abs,
                &opts.project,
                &plan_digest,
                &name,
                &invocation,
                r,
                slurm,
                &dir.join(format!("{name}-%j.log")),
            );
            let script_path = dir.join(format!("{name}.sbatch"));
            xfs::atomic_write(&store.tmp_dir(), &script_path, script.as_bytes(), true)
                .at(&script_path)?;
            let mut cmd = Command::new("sbatch");
            cmd.arg("--parsable");
            if !deps.is_empty() {
                cmd.arg(format!("--dependency=afterok:{}", deps.join(":")));
            }
            cmd.arg(&script_path).current_dir(&opts.project);
            let id = match client(&name, &mut cmd) {
                Ok(out) => out.trim().split(';').next().unwrap_or("").to_string(),
                Err(e) => {
                    reports[i] = Some(failed_report(&name, None, &e));
                    state[i] = State::Failed;
                    failure = Some(e);
                    break;
                }
            };
            let jf = JobFile {
                job_id: id.clone(),
                step: name.clone(),
                submitted_at: rfc3339(unix_now()),
                invocation: invocation.clone(),
            };
            let bytes = serde_json::to_vec_pretty(&jf).expect("serialises");
            xfs::atomic_write(&store.tmp_dir(), &job_path, &bytes, true).at(&job_path)?;
            env.log(format!("  submit  {name:<16} job {id}"));
            submitted += 1;
            let log = log_of(&id);
            state[i] = State::Job { id, log };
        }
    }
    env.log(format!(
        "  slurm   {submitted} job(s) submitted, {attached} re-attached (plan {})",
        plan_digest.short()
    ));
    let ours: Vec<String> = state
        .iter()
        .filter_map(|s| match s {
            State::Job { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    let list_path = store
        .root()
        .join("slurm")
        .join("invocations")
        .join(format!("{invocation}.json"));
    if let Some(parent) = list_path.parent() {
        xfs::create_dir_all_durable(parent).at(parent)?;
    }
    let bytes = serde_json::to_vec_pretty(&ours).expect("serialises");
    xfs::atomic_write(&store.tmp_dir(), &list_path, &bytes, true).at(&list_path)?;
    if failure.is_some() {
        cancel_jobs(&ours);
    }

    // Wait: resolve finished jobs in DAG order, so a job's outputs are read after its parents'.
    let t_wait = unix_now();
    // When each job was first not found by scontrol or sacct (a cluster without accounting
    // forgets finished jobs after MinJobAge): past UNKNOWN_AFTER_S the step fails instead of
    // being waited for forever.
    const UNKNOWN_AFTER_S: f64 = 300.0;
    let mut unknown_since: Vec<Option<f64>> = vec![None; n];
    loop {
        if slurm.cancel.load(Ordering::SeqCst) {
            cancel_jobs(&ours);
            failure.get_or_insert(slurm_err(
                "(driver)",
                format!("cancelled: scancel sent to {} job(s)", ours.len()),
            ));
            for s in state.iter_mut() {
                if matches!(s, State::Job { .. }) {
                    *s = State::Skipped;
                }
            }
            break;
        }
        let mut waiting = 0;
        for i in 0..n {
            let State::Job { id, log } = state[i].clone() else {
                continue;
            };
            let name = exp.nodes[i].def.name.clone();
            let Some(st) = job_status(&id) else {
                let since = *unknown_since[i].get_or_insert_with(unix_now);
                if unix_now() - since < UNKNOWN_AFTER_S {
                    waiting += 1;
                    continue;
                }
                let e = slurm_err(
                    &name,
                    format!(
                        "job {id} is unknown to scontrol and sacct for {UNKNOWN_AFTER_S:.0} s \
                         (no accounting storage, and slurmctld forgot it); its log: {}",
                        log.display()
                    ),
                );
                reports[i] = Some(failed_report(&name, None, &e));
                state[i] = State::Failed;
                failure.get_or_insert(e);
                continue;
            };
            if st.live() {
                waiting += 1;
                continue;
            }
            let job = Some(JobInfo {
                scheduler: "slurm".into(),
                id: id.clone(),
                node: st.node.clone(),
                state: Some(st.state.clone()),
                exit_code: Some(st.exit_code.clone()),
            });
            if st.state == "COMPLETED" {
                let inputs: Option<Vec<SpecInput>> = exp.nodes[i]
                    .inputs
                    .iter()
                    .map(|&j| match &state[j] {
                        State::Done(a) => Some(SpecInput {
                            name: exp.nodes[j].def.name.clone(),
                            artifact: a.clone(),
                        }),
                        _ => None,
                    })
                    .collect();
                let Some(inputs) = inputs else {
                    // A parent is still being resolved this round.
                    waiting += 1;
                    continue;
                };
                let spec = spec_for(exp, i, inputs);
                match env.records.cache_get(&spec.key)? {
                    Some(e) => {
                        env.log(format!(
                            "  ran     {name:<16} {}  job {id}",
                            spec.key.short()
                        ));
                        reports[i] = Some(StepReport {
                            step: name,
                            key: Some(spec.key),
                            status: StepStatus::Ran,
                            run_id: Some(e.run_id),
                            outputs: Some(e.outputs.clone()),
                            duration_s: unix_now() - t_wait,
                            error: None,
                            job,
                        });
                        state[i] = State::Done(e.outputs);
                    }
                    None => {
                        let e = slurm_err(
                            &name,
                            format!(
                                "job {id} completed but left no result for key {}; its log:\n{}",
                                spec.key.short(),
                                log_tail(&log, 20)
                            ),
                        );
                        let mut r = failed_report(&name, Some(spec.key), &e);
                        r.job = job;
                        reports[i] = Some(r);
                        state[i] = State::Failed;
                        failure.get_or_insert(e);
                    }
                }
            } else if st.state == "CANCELLED"
                && (st.reason.contains("Dependency") || failure.is_some())
            {
                // Cancelled by Slurm because a parent failed (--kill-on-invalid-dep), or by us.
                state[i] = State::Skipped;
            } else {
                let e = slurm_err(
                    &name,
                    format!(
                        "job {id} ended {} (exit {}) on {}; the last lines of {}:\n{}",
                        st.state,
                        st.exit_code,
                        st.node.as_deref().unwrap_or("no node"),
                        log.display(),
                        log_tail(&log, 20)
                    ),
                );
                env.log(format!("  FAILED  {name:<16} job {id} {}", st.state));
                let mut r = failed_report(&name, None, &e);
                r.job = job;
                reports[i] = Some(r);
                state[i] = State::Failed;
                failure.get_or_insert(e);
            }
        }
        if waiting == 0 {
            break;
        }
        std::thread::sleep(Duration::from_secs_f64(slurm.poll_s.max(0.05)));
    }

    let mut steps = Vec::new();
    for i in 0..n {
        if !selected[i] {
            continue;
        }
        steps.push(reports[i].take().unwrap_or_else(|| StepReport {
            step: exp.nodes[i].def.name.clone(),
            key: None,
            status: StepStatus::Skipped,
            run_id: None,
            outputs: None,
            duration_s: 0.0,
            error: None,
            job: None,
        }));
    }
    finish_run(&env, exp, opts, invocation, started, steps, failure)
}

/// `scancel` every job still known to Slurm; best effort (a finished one is simply gone).
fn cancel_jobs(ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let _ = Command::new("scancel").args(ids).output();
}

/// `fuselab cancel <invocation>`: cancel the jobs a Slurm driver submitted. Returns how many of
/// them Slurm still ran or queued.
pub fn cancel_invocation(store: &Store, invocation: &crate::store::RecordId) -> Result<usize> {
    let path = store
        .root()
        .join("slurm")
        .join("invocations")
        .join(format!("{invocation}.json"));
    let bytes = fs::read(&path).map_err(|_| RecipeError::NotFound {
        what: format!("{invocation} (no Slurm jobs recorded for this invocation)"),
    })?;
    let ids: Vec<String> = serde_json::from_slice(&bytes).map_err(|e| RecipeError::BadRecord {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let live: Vec<String> = ids
        .into_iter()
        .filter(|id| job_status(id).is_some_and(|s| s.live()))
        .collect();
    cancel_jobs(&live);
    Ok(live.len())
}
