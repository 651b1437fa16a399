//! The recipe engine: experiments declared as DAGs of cached steps, their keys, run records, locking,
//! executors, lineage and verification.
//!
//! An experiment is a Rust function that declares steps notebook-style:
//! ```text
//! let corpus = exp.source("corpus", &p.corpus)?;
//! let words = exp.step("words", &p.words, &[corpus], |ctx| { ... })?;
//! ```
//! Declaring runs nothing. The engine then computes each step's cache key from its kind, code version,
//! parameters, seed and the digests of its inputs, reuses stored outputs when the key is known, and
//! otherwise executes the body (possibly in parallel with independent steps, possibly in another
//! process via `fuselab exec-step <key>`).

mod ctx;
mod engine;
mod key;
pub mod lineage;
mod params;
pub mod records;
pub mod slurm;

pub use ctx::StepCtx;
pub use engine::{
    exec_step, plan, run, verify, ExecutorKind, PlanEntry, PlanStatus, RunOptions, RunReport,
    StepReport, StepStatus, VerifyEntry, VerifyStatus,
};
pub use key::{fuselab_version, SpecInput, StepSpec};

pub use params::set_param;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::fs::PathError;
use crate::store::{Digest, StoreError};

/// The error type step bodies return; any error converts into it with `?`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What a step body returns.
pub type StepResult = Result<(), BoxError>;

pub(crate) type Body = Arc<dyn Fn(&mut StepCtx) -> StepResult + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("unknown experiment `{name}` (known: {})", known.join(", "))]
    UnknownExperiment { name: String, known: Vec<String> },
    #[error("experiment `{experiment}` has no step `{step}` (steps: {})", known.join(", "))]
    UnknownStep {
        experiment: String,
        step: String,
        known: Vec<String>,
    },
    #[error("experiment `{experiment}` declares step `{step}` twice")]
    DuplicateStep { experiment: String, step: String },
    #[error("--set {arg}: {reason}")]
    BadSet { arg: String, reason: String },
    #[error("parameters of experiment `{experiment}`: {reason}")]
    BadParams { experiment: String, reason: String },
    #[error("step `{step}`: input `{name}` is missing: {}", path.display())]
    MissingInput {
        step: String,
        name: String,
        path: PathBuf,
    },
    #[error("step `{step}` of experiment `{experiment}` failed: {message}")]
    StepFailed {
        experiment: String,
        step: String,
        message: String,
    },
    #[error("step `{step}` panicked: {message}")]
    StepPanicked { step: String, message: String },
    #[error("{}: unreadable record: {reason}", path.display())]
    BadRecord { path: PathBuf, reason: String },
    #[error("no step spec for key {key} (specs are written by `fuselab run --executor process` and `fuselab plan --write-specs`)")]
    UnknownKey { key: String },
    #[error("the spec for {key} no longer matches the code of step `{step}` (recomputed key {now}); its code version or parameters changed")]
    StaleSpec {
        key: Digest,
        step: String,
        now: Digest,
    },
    #[error("`{what}` matches no run, invocation or artifact")]
    NotFound { what: String },
    #[error("step `{step}` in a subprocess: {message}")]
    Subprocess { step: String, message: String },
    #[error("experiment `{experiment}` cannot run: its inputs are not ready:\n  {}", problems.join("\n  "))]
    InputsNotReady {
        experiment: String,
        problems: Vec<String>,
    },
}

pub type Result<T, E = RecipeError> = std::result::Result<T, E>;

/// Whether a step's outputs must be bit-identical when re-executed (`fuselab verify`).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Determinism {
    /// Outputs must have the same digest.
    Exact,
    /// Outputs may differ; metrics must agree within a relative tolerance.
    Metrics { rel_tol: f64 },
}

/// What a step is expected to cost, declared by the recipe for `fuselab plan`. Advisory: it is not
/// part of the step's key, and `basis` says how the figures were derived.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Estimate {
    /// Parameters of the model the step trains or runs (the largest, where there are several).
    pub parameters: u64,
    /// Tokens processed (read and generated).
    pub tokens: f64,
    pub flops: f64,
    /// Accelerator hours on the reference GPU the recipe names in `basis`.
    pub gpu_hours: f64,
    /// Accelerator memory the step needs in all (weights, optimizer state, caches, activations).
    pub memory_bytes: f64,
    /// The fewest reference GPUs that hold `memory_bytes`.
    pub gpus: u32,
    pub basis: String,
}

/// How a step is named and versioned. `"name".into()` gives version 1, seed 0.
#[derive(Clone, Debug)]
pub struct StepDef {
    pub name: String,
    pub version: u32,
    pub seed: u64,
    pub kind: Option<String>,
    pub determinism: Determinism,
    pub estimate: Option<Estimate>,
    /// What a batch job for this step asks the workload manager for.
    pub resources: Resources,
}

/// A step's request to a workload manager (`--cpus-per-task`, `--mem`, `--gres=gpu:N`, `--time`).
/// Not part of the key. `fuselab run --executor slurm --set slurm.<step>.<field>=<value>` (or
/// `slurm.default.<field>`) overrides it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub mem_mb: u64,
    pub gpus: u32,
    /// Wall-clock limit in minutes (the partition's default when absent).
    pub time_min: Option<u32>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: 1,
            mem_mb: 2048,
            gpus: 0,
            time_min: None,
        }
    }
}

/// Start a step definition: `exp.step(step("train").version(3).seed(42), ...)`.
pub fn step(name: &str) -> StepDef {
    StepDef {
        name: name.to_string(),
        version: 1,
        seed: 0,
        kind: None,
        determinism: Determinism::Exact,
        estimate: None,
        resources: Resources::default(),
    }
}

impl StepDef {
    /// Bump this whenever the step's code changes what it produces: the key changes, so the step and
    /// everything downstream re-executes.
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }
    pub fn seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }
    /// Share cached outputs between experiments that run the same code (default: `<experiment>/<name>`).
    pub fn kind(mut self, k: &str) -> Self {
        self.kind = Some(k.to_string());
        self
    }
    /// What the step is expected to cost (shown by `fuselab plan`).
    pub fn estimate(mut self, e: Estimate) -> Self {
        self.estimate = Some(e);
        self
    }
    /// What a batch job for this step needs (see [`Resources`]).
    pub fn resources(mut self, r: Resources) -> Self {
        self.resources = r;
        self
    }
    /// Declare that re-execution may give different bytes (e.g. multithreaded float reductions).
    pub fn nondeterministic(mut self, rel_tol: f64) -> Self {
        self.determinism = Determinism::Metrics { rel_tol };
        self
    }
}

impl From<&str> for StepDef {
    fn from(name: &str) -> StepDef {
        step(name)
    }
}

/// A declared step's output, to pass as another step's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle(pub(crate) usize);

pub(crate) enum NodeKind {
    Source { path: PathBuf },
    Step { body: Body },
}

pub(crate) struct Node {
    pub def: StepDef,
    pub params: Value,
    pub inputs: Vec<usize>,
    pub kind: NodeKind,
}

/// An experiment being declared (and, once declared, the DAG the engine runs).
pub struct Experiment {
    pub(crate) name: String,
    pub(crate) params: Value,
    pub(crate) nodes: Vec<Node>,
    pub(crate) problems: Vec<String>,
}

impl Experiment {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The resolved experiment parameters (defaults with `--set` overrides applied).
    pub fn params(&self) -> &Value {
        &self.params
    }

    /// Record why the experiment cannot run yet (an unset or broken input): `plan` still shows the
    /// DAG and lists these, `run` refuses with all of them.
    pub fn problem(&mut self, what: impl Into<String>) {
        self.problems.push(what.into());
    }

    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    pub fn step_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.def.name.clone()).collect()
    }

    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.def.name == name)
            .ok_or_else(|| RecipeError::UnknownStep {
                experiment: self.name.clone(),
                step: name.to_string(),
                known: self.step_names(),
            })
    }

    fn check_new(&self, name: &str) -> Result<()> {
        if self.nodes.iter().any(|n| n.def.name == name) {
            return Err(RecipeError::DuplicateStep {
                experiment: self.name.clone(),
                step: name.to_string(),
            });
        }
        Ok(())
    }

    /// A raw input: a file or directory of the project, hashed into the store when the run starts.
    pub fn source(&mut self, name: &str, path: impl AsRef<Path>) -> Result<Handle> {
        self.check_new(name)?;
        self.nodes.push(Node {
            def: step(name),
            params: Value::Null,
            inputs: Vec::new(),
            kind: NodeKind::Source {
                path: path.as_ref().to_path_buf(),
            },
        });
        Ok(Handle(self.nodes.len() - 1))
    }

    /// Declare a step. `params` are part of its key; `inputs` are earlier handles, available to the
    /// body by the producing step's name; the body writes its outputs under `ctx.out_dir()`.
    pub fn step<P, F>(
        &mut self,
        def: impl Into<StepDef>,
        params: &P,
        inputs: &[Handle],
        body: F,
    ) -> Result<Handle>
    where
        P: Serialize + ?Sized,
        F: Fn(&mut StepCtx) -> StepResult + Send + Sync + 'static,
    {
        let def = def.into();
        self.check_new(&def.name)?;
        let params = serde_json::to_value(params).map_err(|e| RecipeError::BadParams {
            experiment: self.name.clone(),
            reason: format!("step `{}`: {e}", def.name),
        })?;
        self.nodes.push(Node {
            def,
            params,
            inputs: inputs.iter().map(|h| h.0).collect(),
            kind: NodeKind::Step {
                body: Arc::new(body),
            },
        });
        Ok(Handle(self.nodes.len() - 1))
    }
}

type BuildFn = Box<dyn Fn(&mut Experiment, &Value) -> Result<()> + Send + Sync>;

/// A registered experiment: its name, default parameters and the function that declares its steps.
pub struct ExperimentDef {
    pub name: &'static str,
    pub description: &'static str,
    defaults: Value,
    build: BuildFn,
}

impl ExperimentDef {
    pub fn new<P>(
        name: &'static str,
        description: &'static str,
        build: fn(&mut Experiment, &P) -> Result<()>,
    ) -> ExperimentDef
    where
        P: Serialize + DeserializeOwned + Default + 'static,
    {
        let defaults = serde_json::to_value(P::default()).expect("default parameters serialise");
        ExperimentDef::from_value(name, description, defaults, build)
    }

    /// Several experiments of one parameter type that differ in their defaults (one recipe per
    /// target model, say).
    pub fn from_value<P>(
        name: &'static str,
        description: &'static str,
        defaults: Value,
        build: fn(&mut Experiment, &P) -> Result<()>,
    ) -> ExperimentDef
    where
        P: DeserializeOwned + 'static,
    {
        ExperimentDef {
            name,
            description,
            defaults,
            build: Box::new(move |exp, v| {
                let p: P =
                    serde_json::from_value(v.clone()).map_err(|e| RecipeError::BadParams {
                        experiment: exp.name.clone(),
                        reason: e.to_string(),
                    })?;
                build(exp, &p)
            }),
        }
    }

    pub fn defaults(&self) -> &Value {
        &self.defaults
    }

    /// Defaults with `key.path=value` overrides applied; unknown keys and wrong types are errors.
    pub fn resolve_params(&self, sets: &[String]) -> Result<Value> {
        let mut v = self.defaults.clone();
        for s in sets {
            set_param(&mut v, s)?;
        }
        Ok(v)
    }

    /// Declare the experiment's steps for these parameters.
    pub fn instantiate(&self, params: &Value) -> Result<Experiment> {
        let mut exp = Experiment {
            name: self.name.to_string(),
            params: params.clone(),
            nodes: Vec::new(),
            problems: Vec::new(),
        };
        (self.build)(&mut exp, params)?;
        Ok(exp)
    }
}

/// Find an experiment by name in a registry.
pub fn find<'a>(registry: &'a [ExperimentDef], name: &str) -> Result<&'a ExperimentDef> {
    registry
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| RecipeError::UnknownExperiment {
            name: name.to_string(),
            known: registry.iter().map(|e| e.name.to_string()).collect(),
        })
}

/// Parameters as a flat `a.b.c -> value` map, for diffs and listings.
pub fn flatten(v: &Value) -> BTreeMap<String, Value> {
    fn go(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    go(&p, x, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), v.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    go("", v, &mut out);
    out
}
