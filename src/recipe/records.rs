//! What the engine writes beside the objects: cache entries (key -> outputs), append-only run records,
//! invocation summaries and step specs; plus the provenance (git, host, tools) that records carry.
//!
//! ```text
//! keys/<key>.json         cache entry: the outputs of a successful execution of that key
//! runs/<run-id>.json      one record per executed step, success or failure; never rewritten
//! invocations/<id>.json   one summary per `fuselab run`
//! specs/<key>.json        step specs for out-of-process executors
//! locks/<key>.lock        per-step flock, holder pid/host inside
//! work/<key>/             a step's resumable scratch space (checkpoints), kept across crashes
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::key::{cargo_lock_digest, fuselab_version};
use super::{RecipeError, Result, SpecInput, StepSpec};
use crate::fs::{self as xfs, IoContext, PathError};
use crate::store::{
    ArtifactKind, ArtifactRef, Digest, RecordId, Root, RootSet, Store, UnreadableFile,
};

pub const RECORD_FORMAT: u32 = 1;

/// Cache entries with the file each was read from.
pub type CacheEntries = Vec<(PathBuf, CacheEntry)>;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheEntry {
    pub key: Digest,
    pub experiment: String,
    pub step: String,
    pub run_id: String,
    pub outputs: ArtifactRef,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Succeeded,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitInfo {
    /// HEAD commit, absent in a repository without commits.
    pub commit: Option<String>,
    pub branch: Option<String>,
    /// Tracked changes or untracked, non-ignored files present.
    pub dirty: bool,
    /// The stored `git diff HEAD` (untracked files included) when dirty.
    pub diff: Option<Digest>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Tools {
    pub fuselab: String,
    pub rustc: String,
    pub cargo_lock: Digest,
    pub target: String,
    pub profile: String,
    /// SIMD features the numeric kernels picked at run time (GEMM width, vectorised exp): results
    /// are bit-identical between machines only when these match.
    #[serde(default)]
    pub cpu_features: String,
}

/// The run-time-detected CPU features that select numeric code paths.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = Vec::new();
        if std::arch::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        f.join(",")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        String::new()
    }
}

impl Tools {
    pub fn current() -> Tools {
        Tools {
            fuselab: fuselab_version().to_string(),
            rustc: env!("FUSELAB_RUSTC").to_string(),
            cargo_lock: cargo_lock_digest(),
            target: env!("FUSELAB_TARGET").to_string(),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_string(),
            cpu_features: cpu_features(),
        }
    }
}

/// One executed step. Written once, atomically, after its outputs are stored; never modified.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub format: u32,
    pub run_id: String,
    pub invocation: Option<String>,
    pub key: Digest,
    pub experiment: String,
    pub step: String,
    pub kind: String,
    pub version: u32,
    pub params: Value,
    pub seed: u64,
    pub inputs: Vec<SpecInput>,
    pub outputs: Option<ArtifactRef>,
    pub status: RunStatus,
    pub error: Option<String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// For raw inputs: the project path they were read from.
    pub source_path: Option<String>,
    pub git: Option<GitInfo>,
    pub host: String,
    pub pid: u32,
    pub started_at: String,
    pub duration_s: f64,
    pub executor: String,
    pub tools: Tools,
    /// The batch job the step ran in (Slurm's SLURM_JOB_ID and node), when it ran in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobInfo>,
}

/// A workload manager's job, as a run record or an invocation names it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub scheduler: String,
    pub id: String,
    pub node: Option<String>,
    /// The job's final state (`COMPLETED`, `FAILED`, `TIMEOUT`, `OUT_OF_MEMORY`, ...) and exit code,
    /// known only to the driver, so absent from the record the job writes about itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<String>,
}

impl JobInfo {
    /// The Slurm job this process runs in, from the variables slurmd sets.
    pub fn from_slurm_env() -> Option<JobInfo> {
        let id = std::env::var("SLURM_JOB_ID").ok()?;
        Some(JobInfo {
            scheduler: "slurm".into(),
            id,
            node: std::env::var("SLURMD_NODENAME").ok(),
            state: None,
            exit_code: None,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InvocationStep {
    pub step: String,
    pub key: Option<Digest>,
    pub status: super::StepStatus,
    pub run_id: Option<String>,
    pub outputs: Option<ArtifactRef>,
    pub duration_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobInfo>,
}

/// One `fuselab run`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Invocation {
    pub format: u32,
    pub id: String,
    pub experiment: String,
    pub params: Value,
    pub overrides: Vec<String>,
    pub started_at: String,
    pub duration_s: f64,
    pub succeeded: bool,
    pub error: Option<String>,
    pub steps: Vec<InvocationStep>,
}

/// Access to the engine's files inside a store.
#[derive(Clone, Debug)]
pub struct Records {
    store: Store,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RecipeError::BadRecord {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PathError::new(path, e).into()),
    }
}

fn list_json(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    match fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                let p = e.at(dir)?.path();
                if p.extension().is_some_and(|x| x == "json") {
                    out.push(p);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(PathError::new(dir, e).into()),
    }
    out.sort();
    Ok(out)
}

impl Records {
    pub fn new(store: &Store) -> Records {
        Records {
            store: store.clone(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.store.root().join(name)
    }

    fn write(&self, path: &Path, value: &impl Serialize, durable: bool) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value).expect("records serialise");
        xfs::atomic_write(&self.store.tmp_dir(), path, &bytes, durable).at(path)?;
        Ok(())
    }

    pub fn cache_path(&self, key: &Digest) -> PathBuf {
        self.dir("keys").join(format!("{key}.json"))
    }

    /// The cache entry for `key`, if its outputs are still present. An entry that cannot be parsed
    /// (torn by a crash, edited by hand) or that names another key is a miss: the step runs again and
    /// its new entry replaces the bad one.
    pub fn cache_get(&self, key: &Digest) -> Result<Option<CacheEntry>> {
        let entry: Option<CacheEntry> = match read_json(&self.cache_path(key)) {
            Ok(e) => e,
            Err(RecipeError::BadRecord { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(entry.filter(|e| &e.key == key && self.store.has(&e.outputs.digest)))
    }

    pub fn cache_put(&self, entry: &CacheEntry) -> Result<()> {
        self.write(&self.cache_path(&entry.key), entry, true)
    }

    /// Every cache entry that parses, and the files that do not.
    pub fn cache_entries(&self) -> Result<(CacheEntries, Vec<UnreadableFile>)> {
        let (mut out, mut bad) = (Vec::new(), Vec::new());
        for p in list_json(&self.dir("keys"))? {
            match read_json(&p) {
                Ok(Some(e)) => out.push((p, e)),
                Ok(None) => {}
                Err(RecipeError::BadRecord { path, reason }) => {
                    bad.push(UnreadableFile { path, reason })
                }
                Err(e) => return Err(e),
            }
        }
        Ok((out, bad))
    }

    pub fn write_run(&self, r: &RunRecord) -> Result<()> {
        self.write(
            &self.dir("runs").join(format!("{}.json", r.run_id)),
            r,
            true,
        )
    }

    pub fn run(&self, run_id: &RecordId) -> Result<Option<RunRecord>> {
        read_json(&self.dir("runs").join(format!("{run_id}.json")))
    }

    /// Every run record that can be read, oldest first, and the record files that cannot (a
    /// truncated record must not stop the tools that diagnose it).
    pub fn runs(&self) -> Result<(Vec<RunRecord>, Vec<UnreadableFile>)> {
        let (mut out, mut bad) = (Vec::new(), Vec::new());
        for p in list_json(&self.dir("runs"))? {
            match read_json::<RunRecord>(&p) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(RecipeError::BadRecord { path, reason }) => {
                    bad.push(UnreadableFile { path, reason })
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then(a.run_id.cmp(&b.run_id))
        });
        Ok((out, bad))
    }

    pub fn write_invocation(&self, inv: &Invocation) -> Result<()> {
        // An index for humans; losing the last one in a crash costs nothing, so skip fsync.
        self.write(
            &self.dir("invocations").join(format!("{}.json", inv.id)),
            inv,
            false,
        )
    }

    pub fn invocation(&self, id: &RecordId) -> Result<Option<Invocation>> {
        read_json(&self.dir("invocations").join(format!("{id}.json")))
    }

    /// Invocations, newest first.
    pub fn invocations(&self) -> Result<Vec<Invocation>> {
        let mut out = Vec::new();
        for p in list_json(&self.dir("invocations"))?.into_iter().rev() {
            // An index for humans (written without fsync): a torn one is skipped.
            if let Ok(Some(i)) = read_json(&p) {
                out.push(i);
            }
        }
        Ok(out)
    }

    pub fn spec_path(&self, key: &Digest) -> PathBuf {
        self.dir("specs").join(format!("{key}.json"))
    }

    pub fn write_spec(&self, spec: &StepSpec) -> Result<()> {
        self.write(&self.spec_path(&spec.key), spec, true)
    }

    /// The spec of `key`: a full key or a unique prefix (hex digits only, so it names a file in
    /// `specs/` and nothing else).
    pub fn spec(&self, key: &str) -> Result<StepSpec> {
        if key.len() < 4 || key.len() > 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RecipeError::UnknownKey {
                key: format!("{key} (a key is 4 to 64 hexadecimal digits)"),
            });
        }
        let key = key.to_ascii_lowercase();
        let key = key.as_str();
        let path = if key.len() == 64 {
            self.dir("specs").join(format!("{key}.json"))
        } else {
            let matches: Vec<PathBuf> = list_json(&self.dir("specs"))?
                .into_iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(key))
                })
                .collect();
            match matches.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(RecipeError::UnknownKey {
                        key: key.to_string(),
                    })
                }
            }
        };
        read_json(&path)?.ok_or_else(|| RecipeError::UnknownKey {
            key: key.to_string(),
        })
    }

    pub fn lock_path(&self, key: &Digest) -> PathBuf {
        self.dir("locks").join(format!("{key}.lock"))
    }

    pub fn work_dir(&self, key: &Digest) -> PathBuf {
        self.dir("work").join(key.to_string())
    }

    /// Everything that must survive gc: outputs, inputs and stored diffs of every run record, every
    /// cache entry, and the pinned refs.
    pub fn roots(&self) -> Result<RootSet> {
        let mut set = self.store.refs()?;
        let (runs, bad_runs) = self.runs()?;
        set.unreadable.extend(bad_runs);
        let roots = &mut set.roots;
        for r in runs {
            let origin = format!("run {} ({}/{})", r.run_id, r.experiment, r.step);
            if let Some(o) = &r.outputs {
                roots.push(Root {
                    artifact: o.clone(),
                    origin: origin.clone(),
                });
            }
            for i in &r.inputs {
                roots.push(Root {
                    artifact: i.artifact.clone(),
                    origin: origin.clone(),
                });
            }
            if let Some(d) = r.git.as_ref().and_then(|g| g.diff) {
                roots.push(Root {
                    artifact: ArtifactRef {
                        kind: ArtifactKind::Blob,
                        digest: d,
                        size: 0,
                    },
                    origin: format!("{origin} git diff"),
                });
            }
        }
        let (entries, bad_entries) = self.cache_entries()?;
        for (p, e) in entries {
            roots.push(Root {
                artifact: e.outputs,
                origin: format!("cache entry {}", p.display()),
            });
        }
        // A torn cache entry only names outputs that its run record names too (the record is
        // written first), so it does not make reachability unknowable; fsck still reports it.
        set.torn_cache_entries.extend(bad_entries);
        Ok(set)
    }
}

/// Provenance of the working copy: HEAD, dirty flag, and the diff stored as an object.
pub fn git_info(store: &Store, project: &Path) -> Option<GitInfo> {
    let repo = git2::Repository::discover(project).ok()?;
    let head = repo.head().ok();
    let commit = head
        .as_ref()
        .and_then(|h| h.peel_to_commit().ok())
        .map(|c| c.id().to_string());
    let branch = head
        .as_ref()
        .and_then(|h| h.shorthand().map(str::to_string));
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(false);
    let dirty = repo
        .statuses(Some(&mut opts))
        .map(|s| !s.is_empty())
        .unwrap_or(false);
    let diff = if dirty {
        let tree = head.as_ref().and_then(|h| h.peel_to_tree().ok());
        let mut dopts = git2::DiffOptions::new();
        dopts
            .include_untracked(true)
            .recurse_untracked_dirs(true)
            .show_untracked_content(true);
        repo.diff_tree_to_workdir_with_index(tree.as_ref(), Some(&mut dopts))
            .ok()
            .and_then(|d| {
                let mut text = Vec::new();
                d.print(git2::DiffFormat::Patch, |_, _, line| {
                    if matches!(line.origin(), '+' | '-' | ' ') {
                        text.push(line.origin() as u8);
                    }
                    text.extend_from_slice(line.content());
                    true
                })
                .ok()?;
                store.put_bytes(&text).ok()
            })
    } else {
        None
    };
    Some(GitInfo {
        commit,
        branch,
        dirty,
        diff,
    })
}
