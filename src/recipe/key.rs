//! Step specs and cache keys: everything that determines a step's outputs, hashed canonically.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::store::{ArtifactRef, Digest};
use crate::util::canonical_json;

/// Version of the key encoding itself; bumping it invalidates every cache entry.
const KEY_FORMAT: u32 = 1;

/// One resolved input of a step: the producing step's name and the artifact it produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecInput {
    pub name: String,
    pub artifact: ArtifactRef,
}

/// A step described as data: enough to recompute its key and to execute it in another process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepSpec {
    pub key: Digest,
    pub experiment: String,
    pub step: String,
    pub kind: String,
    pub version: u32,
    pub params: Value,
    pub seed: u64,
    pub inputs: Vec<SpecInput>,
    /// Not part of the key: how `exec-step` re-declares the experiment to find the step's code.
    pub experiment_params: Value,
}

/// The digest of the Cargo.lock this binary was built from.
pub fn cargo_lock_digest() -> Digest {
    static LOCK: std::sync::OnceLock<Digest> = std::sync::OnceLock::new();
    *LOCK.get_or_init(|| Digest::of(include_bytes!("../../Cargo.lock")))
}

pub fn fuselab_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

impl StepSpec {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        experiment: &str,
        step: &str,
        kind: &str,
        version: u32,
        params: Value,
        seed: u64,
        inputs: Vec<SpecInput>,
        experiment_params: Value,
    ) -> StepSpec {
        let mut spec = StepSpec {
            key: Digest([0; 32]),
            experiment: experiment.into(),
            step: step.into(),
            kind: kind.into(),
            version,
            params,
            seed,
            inputs,
            experiment_params,
        };
        spec.key = spec.compute_key();
        spec
    }

    /// blake3 over the canonical JSON of kind, code version, parameters, seed, input digests,
    /// the fuselab version and the Cargo.lock digest.
    pub fn compute_key(&self) -> Digest {
        let inputs: Vec<Value> = self
            .inputs
            .iter()
            .map(|i| json!({"name": i.name, "kind": i.artifact.kind, "digest": i.artifact.digest}))
            .collect();
        let material = json!({
            "key_format": KEY_FORMAT,
            "kind": self.kind,
            "version": self.version,
            "params": self.params,
            "seed": self.seed,
            "inputs": inputs,
            "fuselab_version": fuselab_version(),
            "cargo_lock": cargo_lock_digest(),
        });
        Digest::of(&canonical_json(&material))
    }
}

/// Key of a raw input: its project-relative path and content digest.
pub fn source_key(path: &str, artifact: &ArtifactRef) -> Digest {
    Digest::of(&canonical_json(&json!({
        "key_format": KEY_FORMAT,
        "source": path,
        "kind": artifact.kind,
        "digest": artifact.digest,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ArtifactKind;

    fn spec(version: u32, params: Value, seed: u64, digest: u8) -> StepSpec {
        StepSpec::new(
            "e",
            "s",
            "e/s",
            version,
            params,
            seed,
            vec![SpecInput {
                name: "in".into(),
                artifact: ArtifactRef {
                    kind: ArtifactKind::Tree,
                    digest: Digest([digest; 32]),
                    size: 3,
                },
            }],
            json!({"ignored": true}),
        )
    }

    #[test]
    fn key_depends_on_everything_that_matters() {
        let base = spec(1, json!({"a": 1, "b": [1, 2]}), 0, 7).key;
        assert_eq!(
            base,
            spec(1, json!({"b": [1, 2], "a": 1}), 0, 7).key,
            "key order is irrelevant"
        );
        assert_ne!(base, spec(2, json!({"a": 1, "b": [1, 2]}), 0, 7).key);
        assert_ne!(base, spec(1, json!({"a": 2, "b": [1, 2]}), 0, 7).key);
        assert_ne!(base, spec(1, json!({"a": 1, "b": [1, 2]}), 1, 7).key);
        assert_ne!(base, spec(1, json!({"a": 1, "b": [1, 2]}), 0, 8).key);
        let mut other = spec(1, json!({"a": 1, "b": [1, 2]}), 0, 7);
        other.experiment_params = json!({"different": 1});
        assert_eq!(
            base,
            other.compute_key(),
            "experiment params enter only through step params"
        );
    }
}
