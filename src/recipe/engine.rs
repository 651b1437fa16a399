//! Planning and executing an experiment's DAG: cache lookups, per-step locks, parallel scheduling,
//! executors (in-process, or one subprocess per step through `fuselab exec-step`), and verification.

use std::collections::BTreeMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::ctx::StepCtx;
use super::key::source_key;
use super::records::{
    git_info, CacheEntry, GitInfo, Invocation, InvocationStep, JobInfo, Records, RunRecord,
    RunStatus, Tools, RECORD_FORMAT,
};
use super::{
    Body, Determinism, Estimate, Experiment, ExperimentDef, NodeKind, RecipeError, Result,
    SpecInput, StepSpec,
};
use crate::fs::{self as xfs, FileLock, IoContext};
use crate::store::{ArtifactRef, Digest, Store};
use crate::util::{compact_timestamp, rfc3339, unix_now};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Outputs reused from the store (possibly computed meanwhile by a concurrent run).
    Cached,
    /// Executed by this invocation.
    Ran,
    Failed,
    /// Not attempted: an upstream step failed.
    Skipped,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepReport {
    pub step: String,
    pub key: Option<Digest>,
    pub status: StepStatus,
    pub run_id: Option<String>,
    pub outputs: Option<ArtifactRef>,
    pub duration_s: f64,
    pub error: Option<String>,
    /// The batch job that ran the step (Slurm executor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobInfo>,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub invocation: String,
    pub experiment: String,
    pub params: serde_json::Value,
    pub steps: Vec<StepReport>,
    pub duration_s: f64,
    pub error: Option<String>,
    /// The first failure, for the caller to turn into an exit code.
    #[serde(skip)]
    pub failure: Option<RecipeError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutorKind {
    InProcess,
    /// Each executed step runs as `fuselab exec-step <key>` in a child process.
    Process,
}

pub struct RunOptions {
    pub force: Vec<String>,
    pub until: Option<String>,
    pub jobs: usize,
    pub executor: ExecutorKind,
    /// The project directory (for git provenance).
    pub project: PathBuf,
    pub overrides: Vec<String>,
    pub progress: MultiProgress,
}

/// Where a step runs. The in-process executor calls the body directly; others must be able to
/// rebuild the step from its [`StepSpec`] alone.
pub trait Executor: Sync {
    fn name(&self) -> &'static str;
    fn execute(&self, env: &Env, spec: &StepSpec, body: &Body, force: bool) -> Result<Executed>;
}

pub struct Executed {
    pub entry: CacheEntry,
    /// False when another process produced the outputs while this one waited for the lock.
    pub ran: bool,
}

/// What executors share during one invocation.
pub struct Env {
    pub store: Store,
    pub records: Records,
    pub project: PathBuf,
    pub invocation: Option<String>,
    pub progress: MultiProgress,
    git: OnceLock<Option<GitInfo>>,
}

impl Env {
    pub fn new(
        store: &Store,
        project: &Path,
        invocation: Option<String>,
        progress: MultiProgress,
    ) -> Env {
        Env {
            store: store.clone(),
            records: Records::new(store),
            project: project.to_path_buf(),
            invocation,
            progress,
            git: OnceLock::new(),
        }
    }

    /// Collected once, and only when some step actually executes.
    fn git(&self) -> Option<GitInfo> {
        self.git
            .get_or_init(|| git_info(&self.store, &self.project))
            .clone()
    }

    pub fn log(&self, line: impl AsRef<str>) {
        log(&self.progress, line.as_ref());
    }
}

/// Print a status line on stderr without tearing progress bars.
pub fn log(progress: &MultiProgress, line: &str) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        let _ = progress.println(line);
    }
}

pub(super) fn new_id(started: f64, tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{tag}-{}{}",
        compact_timestamp(started),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Run a step's body in a fresh scratch directory. Returns the scratch directory (whose `out/` holds
/// the outputs) and the metrics; on failure the scratch directory is already removed.
fn invoke_body(
    store: &Store,
    work: PathBuf,
    spec: &StepSpec,
    body: &Body,
    progress: &MultiProgress,
) -> Result<(PathBuf, BTreeMap<String, f64>)> {
    let mut inputs = Vec::new();
    for i in &spec.inputs {
        // Inputs are re-hashed before every execution: a corrupted object must fail the step
        // loudly rather than flow silently into a checkpoint or a score.
        store.verify_artifact(&i.artifact)?;
        inputs.push((i.name.clone(), store.materialize(&i.artifact)?));
    }
    let scratch = store.scratch_dir("step")?;
    let out = scratch.join("out");
    fs::create_dir_all(&out).at(&out)?;
    let mut ctx = StepCtx {
        step: spec.step.clone(),
        inputs,
        out,
        work,
        params: spec.params.clone(),
        seed: spec.seed,
        metrics: BTreeMap::new(),
        progress: progress.clone(),
    };
    let result = catch_unwind(AssertUnwindSafe(|| body(&mut ctx)));
    let err = match result {
        Ok(Ok(())) => return Ok((scratch, ctx.metrics)),
        Ok(Err(e)) => RecipeError::StepFailed {
            experiment: spec.experiment.clone(),
            step: spec.step.clone(),
            message: error_chain(e.as_ref()),
        },
        Err(p) => RecipeError::StepPanicked {
            step: spec.step.clone(),
            message: panic_message(p.as_ref()),
        },
    };
    let _ = xfs::remove_tree(&scratch);
    Err(err)
}

pub(super) fn base_record(env: &Env, spec: &StepSpec, run_id: String, started: f64) -> RunRecord {
    RunRecord {
        format: RECORD_FORMAT,
        run_id,
        invocation: env.invocation.clone(),
        key: spec.key,
        experiment: spec.experiment.clone(),
        step: spec.step.clone(),
        kind: spec.kind.clone(),
        version: spec.version,
        params: spec.params.clone(),
        seed: spec.seed,
        inputs: spec.inputs.clone(),
        outputs: None,
        status: RunStatus::Failed,
        error: None,
        metrics: BTreeMap::new(),
        source_path: None,
        git: env.git(),
        host: xfs::hostname(),
        pid: std::process::id(),
        started_at: rfc3339(started),
        duration_s: unix_now() - started,
        executor: String::new(),
        tools: Tools::current(),
        job: JobInfo::from_slurm_env(),
    }
}

/// Take the step's lock (waiting, and saying for whom), then execute unless a cache entry appeared.
/// Outputs are stored before the run record, and the record before the cache entry, so a crash at
/// any point leaves either nothing visible or a complete, consistent result.
pub fn execute_locked(
    env: &Env,
    spec: &StepSpec,
    body: &Body,
    force: bool,
    executor: &str,
) -> Result<Executed> {
    let lock_path = env.records.lock_path(&spec.key);
    let mut lock = match FileLock::try_lock(&lock_path, true).at(&lock_path)? {
        Some(l) => l,
        None => {
            let holder = fs::read_to_string(&lock_path).unwrap_or_default();
            env.log(format!(
                "  waiting {:<16} running in another process ({})",
                spec.step,
                holder.trim()
            ));
            FileLock::lock(&lock_path, true).at(&lock_path)?
        }
    };
    let _ = lock.write_holder(&format!(
        "pid {} on {} since {}",
        std::process::id(),
        xfs::hostname(),
        rfc3339(unix_now())
    ));
    if !force {
        if let Some(entry) = env.records.cache_get(&spec.key)? {
            return Ok(Executed { entry, ran: false });
        }
    }
    let spinner = env.progress.add(ProgressBar::new_spinner());
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {prefix:>14} running {elapsed}").expect("valid"),
    );
    spinner.set_prefix(spec.step.clone());
    spinner.enable_steady_tick(Duration::from_millis(120));
    let started = unix_now();
    let work = env.records.work_dir(&spec.key);
    let outcome =
        invoke_body(&env.store, work, spec, body, &env.progress).and_then(|(scratch, metrics)| {
            let stored = env.store.put_owned_dir(&scratch.join("out"));
            let _ = xfs::remove_tree(&scratch);
            Ok((stored?, metrics))
        });
    spinner.finish_and_clear();
    let run_id = new_id(started, &spec.key.short());
    let mut record = base_record(env, spec, run_id.clone(), started);
    record.executor = executor.to_string();
    match outcome {
        Ok((outputs, metrics)) => {
            record.status = RunStatus::Succeeded;
            record.outputs = Some(outputs.clone());
            record.metrics = metrics.clone();
            env.records.write_run(&record)?;
            let entry = CacheEntry {
                key: spec.key,
                experiment: spec.experiment.clone(),
                step: spec.step.clone(),
                run_id,
                outputs,
                metrics,
            };
            env.records.cache_put(&entry)?;
            let _ = xfs::remove_tree(&env.records.work_dir(&spec.key));
            drop(lock);
            Ok(Executed { entry, ran: true })
        }
        Err(e) => {
            record.error = Some(e.to_string());
            // Best effort: the failure itself is what the caller must see.
            let _ = env.records.write_run(&record);
            Err(e)
        }
    }
}

struct InProcess;

impl Executor for InProcess {
    fn name(&self) -> &'static str {
        "in-process"
    }
    fn execute(&self, env: &Env, spec: &StepSpec, body: &Body, force: bool) -> Result<Executed> {
        execute_locked(env, spec, body, force, self.name())
    }
}

/// Runs each step as `fuselab exec-step <key>`: the shape a cluster executor (Slurm) takes, with the
/// step spec as the only thing that crosses the process boundary.
struct Subprocess;

impl Executor for Subprocess {
    fn name(&self) -> &'static str {
        "process"
    }
    fn execute(&self, env: &Env, spec: &StepSpec, _body: &Body, force: bool) -> Result<Executed> {
        env.records.write_spec(spec)?;
        let exe = std::env::current_exe().at(Path::new("/proc/self/exe"))?;
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--store")
            .arg(env.store.root())
            .arg("exec-step")
            .arg(spec.key.to_string())
            .current_dir(&env.project)
            .stdout(std::process::Stdio::piped());
        if let Some(inv) = &env.invocation {
            cmd.arg("--invocation").arg(inv);
        }
        if force {
            cmd.arg("--force");
        }
        // The child dies with the thread that spawned it: a `kill -9` of `fuselab run` must not leave
        // an `exec-step` running on (holding the step lock, writing into the store).
        {
            use std::os::unix::process::CommandExt;
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died between fork and prctl.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::other("parent exited"));
                    }
                    Ok(())
                });
            }
        }
        let out = cmd.output().at(&exe)?;
        if !out.status.success() {
            return Err(RecipeError::Subprocess {
                step: spec.step.clone(),
                message: format!(
                    "`fuselab exec-step {}` exited with {}",
                    spec.key, out.status
                ),
            });
        }
        let reply: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| RecipeError::Subprocess {
                step: spec.step.clone(),
                message: format!("unreadable reply from exec-step: {e}"),
            })?;
        let entry = env
            .records
            .cache_get(&spec.key)?
            .ok_or_else(|| RecipeError::Subprocess {
                step: spec.step.clone(),
                message: "exec-step succeeded but left no cache entry".into(),
            })?;
        Ok(Executed {
            entry,
            ran: reply["status"] == "ran",
        })
    }
}

/// Run one step from its spec file: what `fuselab exec-step <key>` does, in this or another process.
pub fn exec_step(
    store: &Store,
    registry: &[ExperimentDef],
    key: &str,
    force: bool,
    project: &Path,
    invocation: Option<String>,
    progress: MultiProgress,
) -> Result<(StepSpec, Executed)> {
    let _lock = store.lock_shared()?;
    let env = Env::new(store, project, invocation, progress);
    let spec = env.records.spec(key)?;
    let def = super::find(registry, &spec.experiment)?;
    let exp = def.instantiate(&spec.experiment_params)?;
    let idx = exp.index_of(&spec.step)?;
    let node = &exp.nodes[idx];
    let NodeKind::Step { body } = &node.kind else {
        return Err(RecipeError::UnknownStep {
            experiment: exp.name.clone(),
            step: spec.step.clone(),
            known: exp.step_names(),
        });
    };
    let now = spec_for(&exp, idx, spec.inputs.clone()).key;
    if now != spec.key {
        return Err(RecipeError::StaleSpec {
            key: spec.key,
            step: spec.step.clone(),
            now,
        });
    }
    let done = execute_locked(&env, &spec, body, force, "process")?;
    Ok((spec, done))
}

pub(super) fn spec_for(exp: &Experiment, idx: usize, inputs: Vec<SpecInput>) -> StepSpec {
    let node = &exp.nodes[idx];
    let kind = node
        .def
        .kind
        .clone()
        .unwrap_or_else(|| format!("{}/{}", exp.name, node.def.name));
    StepSpec::new(
        &exp.name,
        &node.def.name,
        &kind,
        node.def.version,
        node.params.clone(),
        node.def.seed,
        inputs,
        exp.params.clone(),
    )
}

/// The project-relative form of a source path, for keys and records.
fn display_source(project: &Path, path: &Path) -> String {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        project.join(path)
    };
    abs.strip_prefix(project)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| abs.display().to_string())
}

fn source_path(project: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        project.join(path)
    }
}

/// Hash a raw input into the store and record where it came from (once per distinct content).
pub(super) fn ingest_source(
    env: &Env,
    exp: &Experiment,
    idx: usize,
    path: &Path,
) -> Result<(CacheEntry, bool)> {
    let name = &exp.nodes[idx].def.name;
    let abs = source_path(&env.project, path);
    if fs::symlink_metadata(&abs).is_err() {
        return Err(RecipeError::MissingInput {
            step: name.clone(),
            name: path.display().to_string(),
            path: abs,
        });
    }
    let started = unix_now();
    let artifact = env.store.put_path(&abs)?;
    let shown = display_source(&env.project, path);
    let key = source_key(&shown, &artifact);
    if let Some(e) = env.records.cache_get(&key)? {
        return Ok((e, false));
    }
    let lock_path = env.records.lock_path(&key);
    let _lock = FileLock::lock(&lock_path, true).at(&lock_path)?;
    if let Some(e) = env.records.cache_get(&key)? {
        return Ok((e, false));
    }
    let spec = StepSpec {
        key,
        experiment: exp.name.clone(),
        step: name.clone(),
        kind: "source".into(),
        version: 1,
        params: serde_json::json!({ "path": shown }),
        seed: 0,
        inputs: Vec::new(),
        experiment_params: serde_json::Value::Null,
    };
    let run_id = new_id(started, &key.short());
    let mut record = base_record(env, &spec, run_id.clone(), started);
    record.status = RunStatus::Succeeded;
    record.outputs = Some(artifact.clone());
    record.source_path = Some(shown);
    record.executor = "source".into();
    env.records.write_run(&record)?;
    let entry = CacheEntry {
        key,
        experiment: exp.name.clone(),
        step: name.clone(),
        run_id,
        outputs: artifact,
        metrics: BTreeMap::new(),
    };
    env.records.cache_put(&entry)?;
    Ok((entry, true))
}

/// Nodes needed to produce `until` (itself and its ancestors), or all nodes.
pub(super) fn selection(exp: &Experiment, until: Option<&str>) -> Result<Vec<bool>> {
    let Some(name) = until else {
        return Ok(vec![true; exp.nodes.len()]);
    };
    let target = exp.index_of(name)?;
    let mut sel = vec![false; exp.nodes.len()];
    let mut stack = vec![target];
    while let Some(i) = stack.pop() {
        if !sel[i] {
            sel[i] = true;
            stack.extend(&exp.nodes[i].inputs);
        }
    }
    Ok(sel)
}

#[derive(Clone)]
enum State {
    Pending,
    Running,
    Done(ArtifactRef),
    Failed,
    Skipped,
}

/// What every executor checks before it runs anything: inputs ready, forced steps known; returns
/// the selected nodes (`--until`).
pub(super) fn checked_selection(exp: &Experiment, opts: &RunOptions) -> Result<Vec<bool>> {
    if !exp.problems.is_empty() {
        return Err(RecipeError::InputsNotReady {
            experiment: exp.name.clone(),
            problems: exp.problems.clone(),
        });
    }
    for f in &opts.force {
        exp.index_of(f)?;
    }
    selection(exp, opts.until.as_deref())
}

/// Execute an experiment: reuse what is cached, run the rest (independent steps in parallel).
pub fn run(store: &Store, exp: &Experiment, opts: &RunOptions) -> Result<RunReport> {
    let selected = checked_selection(exp, opts)?;
    let _lock = store.lock_shared()?;
    let started = unix_now();
    let invocation = new_id(started, "inv");
    let env = Env::new(
        store,
        &opts.project,
        Some(invocation.clone()),
        opts.progress.clone(),
    );
    let executor: &dyn Executor = match opts.executor {
        ExecutorKind::InProcess => &InProcess,
        ExecutorKind::Process => &Subprocess,
    };
    let n = exp.nodes.len();
    let mut state = vec![State::Pending; n];
    let mut reports: Vec<Option<StepReport>> = vec![None; n];
    let mut failure: Option<RecipeError> = None;
    let jobs = opts.jobs.max(1);

    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, StepSpec, f64, Result<Executed>)>();
        let mut running = 0usize;
        loop {
            let mut progressed = true;
            while progressed && failure.is_none() {
                progressed = false;
                for i in 0..n {
                    if !selected[i] || !matches!(state[i], State::Pending) {
                        continue;
                    }
                    let node = &exp.nodes[i];
                    let mut inputs = Vec::new();
                    let mut ready = true;
                    for &j in &node.inputs {
                        match &state[j] {
                            State::Done(a) => inputs.push(SpecInput {
                                name: exp.nodes[j].def.name.clone(),
                                artifact: a.clone(),
                            }),
                            _ => ready = false,
                        }
                    }
                    if !ready {
                        continue;
                    }
                    match &node.kind {
                        NodeKind::Source { path } => {
                            let t0 = unix_now();
                            match ingest_source(&env, exp, i, path) {
                                Ok((e, new)) => {
                                    reports[i] = Some(source_report(&node.def.name, &e, new, t0));
                                    state[i] = State::Done(e.outputs);
                                }
                                Err(e) => {
                                    reports[i] = Some(failed_report(&node.def.name, None, &e));
                                    state[i] = State::Failed;
                                    failure = Some(e);
                                    break;
                                }
                            }
                            progressed = true;
                        }
                        NodeKind::Step { body } => {
                            let spec = spec_for(exp, i, inputs);
                            let forced = opts.force.contains(&node.def.name);
                            if !forced {
                                match env.records.cache_get(&spec.key) {
                                    Ok(Some(e)) => {
                                        env.log(format!(
                                            "  cached  {:<16} {}",
                                            node.def.name,
                                            spec.key.short()
                                        ));
                                        reports[i] = Some(StepReport {
                                            step: node.def.name.clone(),
                                            key: Some(spec.key),
                                            status: StepStatus::Cached,
                                            run_id: Some(e.run_id),
                                            outputs: Some(e.outputs.clone()),
                                            duration_s: 0.0,
                                            error: None,
                                            job: None,
                                        });
                                        state[i] = State::Done(e.outputs);
                                        progressed = true;
                                        continue;
                                    }
                                    Ok(None) => {}
                                    Err(e) => {
                                        reports[i] =
                                            Some(failed_report(&node.def.name, Some(spec.key), &e));
                                        state[i] = State::Failed;
                                        failure = Some(e);
                                        break;
                                    }
                                }
                            }
                            if running >= jobs {
                                continue;
                            }
                            state[i] = State::Running;
                            running += 1;
                            let tx = tx.clone();
                            let env = &env;
                            let body = body.clone();
                            scope.spawn(move || {
                                let t0 = unix_now();
                                let r = executor.execute(env, &spec, &body, forced);
                                let _ = tx.send((i, spec, t0, r));
                            });
                        }
                    }
                }
            }
            if running == 0 {
                break;
            }
            let (i, spec, t0, result) = rx.recv().expect("a running step always reports");
            running -= 1;
            let name = exp.nodes[i].def.name.clone();
            let dt = unix_now() - t0;
            match result {
                Ok(done) => {
                    let status = if done.ran {
                        StepStatus::Ran
                    } else {
                        StepStatus::Cached
                    };
                    env.log(format!(
                        "  {:<7} {:<16} {}  {:.2}s",
                        if done.ran { "ran" } else { "cached" },
                        name,
                        spec.key.short(),
                        dt
                    ));
                    reports[i] = Some(StepReport {
                        step: name,
                        key: Some(spec.key),
                        status,
                        run_id: Some(done.entry.run_id),
                        outputs: Some(done.entry.outputs.clone()),
                        duration_s: dt,
                        error: None,
                        job: None,
                    });
                    state[i] = State::Done(done.entry.outputs);
                }
                Err(e) => {
                    env.log(format!("  FAILED  {name:<16} {e}"));
                    reports[i] = Some(failed_report(&name, Some(spec.key), &e));
                    state[i] = State::Failed;
                    if failure.is_none() {
                        failure = Some(e);
                    }
                }
            }
        }
    });

    let mut steps = Vec::new();
    for i in 0..n {
        if !selected[i] {
            continue;
        }
        let report = reports[i].take().unwrap_or_else(|| StepReport {
            step: exp.nodes[i].def.name.clone(),
            key: None,
            status: StepStatus::Skipped,
            run_id: None,
            outputs: None,
            duration_s: 0.0,
            error: None,
            job: None,
        });
        if matches!(state[i], State::Pending) {
            state[i] = State::Skipped;
        }
        steps.push(report);
    }
    finish_run(&env, exp, opts, invocation, started, steps, failure)
}

/// Write the invocation summary and, after a complete successful run, the experiment's ref; the
/// executors' shared ending.
pub(super) fn finish_run(
    env: &Env,
    exp: &Experiment,
    opts: &RunOptions,
    invocation: String,
    started: f64,
    steps: Vec<StepReport>,
    failure: Option<RecipeError>,
) -> Result<RunReport> {
    let store = &env.store;
    let duration_s = unix_now() - started;
    let inv = Invocation {
        format: RECORD_FORMAT,
        id: invocation.clone(),
        experiment: exp.name.clone(),
        params: exp.params.clone(),
        overrides: opts.overrides.clone(),
        started_at: rfc3339(started),
        duration_s,
        succeeded: failure.is_none(),
        error: failure.as_ref().map(|e| e.to_string()),
        steps: steps
            .iter()
            .map(|s| InvocationStep {
                step: s.step.clone(),
                key: s.key,
                status: s.status,
                run_id: s.run_id.clone(),
                outputs: s.outputs.clone(),
                duration_s: s.duration_s,
                job: s.job.clone(),
            })
            .collect(),
    };
    env.records.write_invocation(&inv)?;
    if failure.is_none() && opts.until.is_none() {
        let pins = steps
            .iter()
            .filter_map(|s| s.outputs.clone().map(|o| (s.step.clone(), o)))
            .collect();
        let name: crate::store::RefName = format!("experiments/{}", exp.name).parse()?;
        store.set_ref(&name, pins)?;
    }
    Ok(RunReport {
        invocation,
        experiment: exp.name.clone(),
        params: exp.params.clone(),
        steps,
        duration_s,
        error: failure.as_ref().map(|e| e.to_string()),
        failure,
    })
}

/// The report of a raw input: `ran` the first time its content was seen, else `cached`.
pub(super) fn source_report(name: &str, e: &CacheEntry, new: bool, t0: f64) -> StepReport {
    StepReport {
        step: name.to_string(),
        key: Some(e.key),
        status: if new {
            StepStatus::Ran
        } else {
            StepStatus::Cached
        },
        run_id: Some(e.run_id.clone()),
        outputs: Some(e.outputs.clone()),
        duration_s: unix_now() - t0,
        error: None,
        job: None,
    }
}

pub(super) fn failed_report(step: &str, key: Option<Digest>, e: &RecipeError) -> StepReport {
    StepReport {
        step: step.to_string(),
        key,
        status: StepStatus::Failed,
        run_id: None,
        outputs: None,
        duration_s: 0.0,
        error: Some(e.to_string()),
        job: None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanStatus {
    /// Outputs are in the store; nothing to do.
    Cached,
    /// Will execute: its key is known and not cached.
    Run,
    /// Will execute after upstream steps; its key depends on their outputs.
    Pending,
    /// A raw input that does not exist.
    Missing,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanEntry {
    pub step: String,
    pub kind: String,
    pub version: u32,
    pub inputs: Vec<String>,
    pub status: PlanStatus,
    pub key: Option<Digest>,
    pub outputs: Option<ArtifactRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
}

/// The inputs of node `i` if every producer's output is known.
fn known_inputs(
    exp: &Experiment,
    i: usize,
    known: &[Option<ArtifactRef>],
) -> Option<Vec<SpecInput>> {
    exp.nodes[i]
        .inputs
        .iter()
        .map(|&j| {
            known[j].clone().map(|artifact| SpecInput {
                name: exp.nodes[j].def.name.clone(),
                artifact,
            })
        })
        .collect()
}

/// What `run` would do, without executing or storing anything (sources are hashed, not stored).
/// With `write_specs`, the spec of every step whose key is known is written for `exec-step`.
pub fn plan(
    store: &Store,
    exp: &Experiment,
    project: &Path,
    write_specs: bool,
) -> Result<Vec<PlanEntry>> {
    let records = Records::new(store);
    let mut known: Vec<Option<ArtifactRef>> = vec![None; exp.nodes.len()];
    let mut out = Vec::new();
    for (i, node) in exp.nodes.iter().enumerate() {
        let inputs: Vec<String> = node
            .inputs
            .iter()
            .map(|&j| exp.nodes[j].def.name.clone())
            .collect();
        let (kind, version, status, key) = match &node.kind {
            NodeKind::Source { path } => {
                let abs = source_path(project, path);
                if fs::symlink_metadata(&abs).is_err() {
                    ("source".to_string(), 1, PlanStatus::Missing, None)
                } else {
                    let artifact = store.peek_path(&abs)?;
                    let key = source_key(&display_source(project, path), &artifact);
                    known[i] = Some(artifact);
                    let status = if records.cache_get(&key)?.is_some() {
                        PlanStatus::Cached
                    } else {
                        PlanStatus::Run
                    };
                    ("source".to_string(), 1, status, Some(key))
                }
            }
            NodeKind::Step { .. } => {
                let resolved = known_inputs(exp, i, &known);
                match resolved {
                    None => (String::new(), node.def.version, PlanStatus::Pending, None),
                    Some(inputs) => {
                        let spec = spec_for(exp, i, inputs);
                        if write_specs {
                            records.write_spec(&spec)?;
                        }
                        let status = match records.cache_get(&spec.key)? {
                            Some(e) => {
                                known[i] = Some(e.outputs);
                                PlanStatus::Cached
                            }
                            None => PlanStatus::Run,
                        };
                        (spec.kind.clone(), node.def.version, status, Some(spec.key))
                    }
                }
            }
        };
        let kind = if kind.is_empty() {
            node.def
                .kind
                .clone()
                .unwrap_or_else(|| format!("{}/{}", exp.name, node.def.name))
        } else {
            kind
        };
        out.push(PlanEntry {
            step: node.def.name.clone(),
            kind,
            version,
            inputs,
            status,
            key,
            outputs: known[i].clone(),
            estimate: node.def.estimate.clone(),
        });
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyStatus {
    /// Re-execution produced byte-identical outputs.
    Identical,
    /// A step declared non-deterministic: outputs differ, metrics agree within its tolerance.
    WithinTolerance,
    /// Re-execution produced different outputs (or metrics out of tolerance).
    Differs,
    /// Never completed with these inputs: nothing to compare with.
    NotRun,
    /// Re-execution failed.
    Failed,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyEntry {
    pub step: String,
    pub status: VerifyStatus,
    pub key: Option<Digest>,
    pub recorded: Option<Digest>,
    pub reexecuted: Option<Digest>,
    pub detail: Option<String>,
}

/// Re-execute every step that has cached outputs, from the recorded inputs, and compare.
pub fn verify(
    store: &Store,
    exp: &Experiment,
    project: &Path,
    progress: &MultiProgress,
) -> Result<Vec<VerifyEntry>> {
    let _lock = store.lock_shared()?;
    let records = Records::new(store);
    let mut known: Vec<Option<ArtifactRef>> = vec![None; exp.nodes.len()];
    let mut out = Vec::new();
    for (i, node) in exp.nodes.iter().enumerate() {
        let entry = |status, key, recorded, reexecuted, detail| VerifyEntry {
            step: node.def.name.clone(),
            status,
            key,
            recorded,
            reexecuted,
            detail,
        };
        match &node.kind {
            NodeKind::Source { path } => {
                let abs = source_path(project, path);
                if fs::symlink_metadata(&abs).is_err() {
                    out.push(entry(
                        VerifyStatus::NotRun,
                        None,
                        None,
                        None,
                        Some(format!("{} is missing", abs.display())),
                    ));
                    continue;
                }
                let fresh = Store::digest_path(&abs)?;
                let key = source_key(&display_source(project, path), &fresh);
                let cached = records.cache_get(&key)?;
                known[i] = Some(fresh.clone());
                out.push(match cached {
                    Some(c) => entry(
                        VerifyStatus::Identical,
                        Some(key),
                        Some(c.outputs.digest),
                        Some(fresh.digest),
                        None,
                    ),
                    None => entry(
                        VerifyStatus::NotRun,
                        Some(key),
                        None,
                        Some(fresh.digest),
                        Some("source content not yet ingested by a run".into()),
                    ),
                });
            }
            NodeKind::Step { body } => {
                let inputs = known_inputs(exp, i, &known);
                let Some(inputs) = inputs else {
                    out.push(entry(
                        VerifyStatus::NotRun,
                        None,
                        None,
                        None,
                        Some("an upstream step has not run".into()),
                    ));
                    continue;
                };
                let spec = spec_for(exp, i, inputs);
                let Some(cached) = records.cache_get(&spec.key)? else {
                    out.push(entry(
                        VerifyStatus::NotRun,
                        Some(spec.key),
                        None,
                        None,
                        None,
                    ));
                    continue;
                };
                known[i] = Some(cached.outputs.clone());
                log(
                    progress,
                    &format!("  verify  {:<16} {}", node.def.name, spec.key.short()),
                );
                // The step's lock keeps verify from racing a `run` of the same key, and a private
                // work dir keeps verify's checkpoints from ever being resumed by a later run (or a
                // later verify): each re-execution starts from nothing, and leaves nothing.
                let lock_path = records.lock_path(&spec.key);
                let _step_lock = FileLock::lock(&lock_path, true).at(&lock_path)?;
                let work = store.scratch_dir("verify-work")?;
                let result = invoke_body(store, work.clone(), &spec, body, progress);
                let _ = xfs::remove_tree(&work);
                match result {
                    Err(e) => out.push(entry(
                        VerifyStatus::Failed,
                        Some(spec.key),
                        Some(cached.outputs.digest),
                        None,
                        Some(e.to_string()),
                    )),
                    Ok((scratch, metrics)) => {
                        let fresh = Store::digest_dir(&scratch.join("out"));
                        let _ = xfs::remove_tree(&scratch);
                        let fresh = fresh?;
                        let same = fresh.digest == cached.outputs.digest;
                        let (status, detail) = match (&node.def.determinism, same) {
                            (_, true) => (VerifyStatus::Identical, None),
                            (Determinism::Exact, false) => {
                                (VerifyStatus::Differs, Some("outputs differ".to_string()))
                            }
                            (Determinism::Metrics { rel_tol }, false) => {
                                match metrics_differ(&cached.metrics, &metrics, *rel_tol) {
                                    None => (VerifyStatus::WithinTolerance, None),
                                    Some(d) => (VerifyStatus::Differs, Some(d)),
                                }
                            }
                        };
                        out.push(entry(
                            status,
                            Some(spec.key),
                            Some(cached.outputs.digest),
                            Some(fresh.digest),
                            detail,
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn metrics_differ(
    a: &BTreeMap<String, f64>,
    b: &BTreeMap<String, f64>,
    rel_tol: f64,
) -> Option<String> {
    if a.keys().ne(b.keys()) {
        return Some("metric names differ".into());
    }
    for (k, x) in a {
        let y = b[k];
        let scale = x.abs().max(y.abs()).max(f64::MIN_POSITIVE);
        if (x - y).abs() / scale > rel_tol {
            return Some(format!("metric `{k}`: recorded {x}, re-executed {y}"));
        }
    }
    None
}
