//! What a step body sees: its inputs as read-only paths, its output directory, parameters, seed,
//! a resumable work directory, metrics and progress bars.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::BoxError;

pub struct StepCtx {
    pub(crate) step: String,
    pub(crate) inputs: Vec<(String, PathBuf)>,
    pub(crate) out: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) params: Value,
    pub(crate) seed: u64,
    pub(crate) metrics: BTreeMap<String, f64>,
    pub(crate) progress: MultiProgress,
}

impl StepCtx {
    pub fn step(&self) -> &str {
        &self.step
    }

    /// The read-only path of the input produced by step (or source) `name`.
    pub fn input(&self, name: &str) -> Result<&Path, BoxError> {
        self.inputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_path())
            .ok_or_else(|| {
                let known: Vec<&str> = self.inputs.iter().map(|(n, _)| n.as_str()).collect();
                format!(
                    "step `{}` has no input `{name}` (inputs: {})",
                    self.step,
                    known.join(", ")
                )
                .into()
            })
    }

    /// The directory whose contents become this step's output tree.
    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// A path under the output directory, with its parent directories created.
    pub fn out(&self, rel: &str) -> Result<PathBuf, BoxError> {
        let p = self.out.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(p)
    }

    /// A directory that survives a crash of this step (same key) and is removed once the step's
    /// outputs are stored: where long jobs keep checkpoints to resume from.
    pub fn work_dir(&self) -> Result<&Path, BoxError> {
        std::fs::create_dir_all(&self.work)?;
        Ok(&self.work)
    }

    /// This step's parameters, typed.
    pub fn params<P: DeserializeOwned>(&self) -> Result<P, BoxError> {
        serde_json::from_value(self.params.clone())
            .map_err(|e| format!("step `{}`: bad parameters: {e}", self.step).into())
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Record a scalar metric in the run record (and compare it under `fuselab verify`).
    pub fn metric(&mut self, name: &str, value: f64) {
        self.metrics.insert(name.to_string(), value);
    }

    /// A progress bar for `len` units of work, drawn while the terminal is interactive.
    pub fn progress(&self, len: u64, what: &str) -> ProgressBar {
        let bar = self.progress.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(
                "  {prefix:>14} {bar:30} {pos}/{len} {msg} [{elapsed_precise} eta {eta}]",
            )
            .expect("valid template"),
        );
        bar.set_prefix(self.step.clone());
        bar.set_message(what.to_string());
        bar
    }
}
