//! Lineage from run records: which runs, parameters, commits and raw inputs produced an artifact
//! (upstream), and everything that was derived from it (downstream).
//!
//! The JSON form (`fuselab lineage --format json`) is a graph:
//! ```json
//! { "root": "<digest>", "direction": "up" | "down",
//!   "artifacts": [ { "digest", "kind", "size", "raw_input": "<project path>" | null } ],
//!   "runs": [ { "run_id", "key", "experiment", "step", "kind", "version", "params", "seed",
//!               "inputs": [ { "name", "digest" } ], "output": "<digest>",
//!               "git": { "commit", "branch", "dirty", "diff" } | null, "started_at", "host" } ],
//!   "edges": [ { "from": "<digest>", "to": "<digest>", "run": "<run_id>", "input": "<name>" } ] }
//! ```
//! An edge reads "artifact `from` was input `input` of run `run`, which produced `to`". Raw inputs are
//! artifacts produced by a `source` run, whose `raw_input` names the file or directory they were read
//! from. When one key was executed several times (forced re-runs), the first successful run stands for it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use super::records::{GitInfo, RunRecord, RunStatus};
use crate::store::{ArtifactKind, Digest};

#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
}

#[derive(Debug, Serialize)]
pub struct LineageArtifact {
    pub digest: Digest,
    pub kind: ArtifactKind,
    pub size: u64,
    pub raw_input: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LineageInput {
    pub name: String,
    pub digest: Digest,
}

#[derive(Debug, Serialize)]
pub struct LineageRun {
    pub run_id: String,
    pub key: Digest,
    pub experiment: String,
    pub step: String,
    pub kind: String,
    pub version: u32,
    pub params: serde_json::Value,
    pub seed: u64,
    pub inputs: Vec<LineageInput>,
    pub output: Digest,
    pub git: Option<GitInfo>,
    pub started_at: String,
    pub host: String,
}

#[derive(Debug, Serialize)]
pub struct LineageEdge {
    pub from: Digest,
    pub to: Digest,
    pub run: String,
    pub input: String,
}

#[derive(Debug, Serialize)]
pub struct Lineage {
    pub root: Digest,
    pub direction: Direction,
    pub artifacts: Vec<LineageArtifact>,
    pub runs: Vec<LineageRun>,
    pub edges: Vec<LineageEdge>,
}

/// Index of successful runs by the artifacts they produced and consumed.
pub struct LineageIndex {
    runs: Vec<RunRecord>,
    producers: BTreeMap<Digest, usize>,
    consumers: BTreeMap<Digest, Vec<usize>>,
}

impl LineageIndex {
    pub fn new(all: Vec<RunRecord>) -> LineageIndex {
        // One representative run per key: the first that succeeded.
        let mut seen_keys = BTreeSet::new();
        let runs: Vec<RunRecord> = all
            .into_iter()
            .filter(|r| r.status == RunStatus::Succeeded && r.outputs.is_some())
            .filter(|r| seen_keys.insert(r.key))
            .collect();
        let mut producers: BTreeMap<Digest, usize> = BTreeMap::new();
        let mut consumers: BTreeMap<Digest, Vec<usize>> = BTreeMap::new();
        for (i, r) in runs.iter().enumerate() {
            let out = r.outputs.as_ref().expect("filtered").digest;
            // A raw input's content may be recorded under several paths; prefer a derived producer.
            match producers.get(&out) {
                Some(&j) if runs[j].source_path.is_none() => {}
                _ => {
                    producers.insert(out, i);
                }
            }
            for inp in &r.inputs {
                consumers.entry(inp.artifact.digest).or_default().push(i);
            }
        }
        LineageIndex {
            runs,
            producers,
            consumers,
        }
    }

    pub fn knows(&self, d: &Digest) -> bool {
        self.producers.contains_key(d) || self.consumers.contains_key(d)
    }

    /// Every digest the records mention, for resolving prefixes.
    pub fn digests(&self) -> impl Iterator<Item = &Digest> {
        self.producers.keys().chain(self.consumers.keys())
    }

    fn artifact(&self, d: &Digest) -> LineageArtifact {
        if let Some(&i) = self.producers.get(d) {
            let r = &self.runs[i];
            let o = r.outputs.as_ref().expect("filtered");
            return LineageArtifact {
                digest: *d,
                kind: o.kind,
                size: o.size,
                raw_input: r.source_path.clone(),
            };
        }
        for &i in self.consumers.get(d).into_iter().flatten() {
            if let Some(inp) = self.runs[i].inputs.iter().find(|x| &x.artifact.digest == d) {
                return LineageArtifact {
                    digest: *d,
                    kind: inp.artifact.kind,
                    size: inp.artifact.size,
                    raw_input: None,
                };
            }
        }
        LineageArtifact {
            digest: *d,
            kind: ArtifactKind::Blob,
            size: 0,
            raw_input: None,
        }
    }

    fn run(&self, i: usize) -> LineageRun {
        let r = &self.runs[i];
        LineageRun {
            run_id: r.run_id.clone(),
            key: r.key,
            experiment: r.experiment.clone(),
            step: r.step.clone(),
            kind: r.kind.clone(),
            version: r.version,
            params: r.params.clone(),
            seed: r.seed,
            inputs: r
                .inputs
                .iter()
                .map(|x| LineageInput {
                    name: x.name.clone(),
                    digest: x.artifact.digest,
                })
                .collect(),
            output: r.outputs.as_ref().expect("filtered").digest,
            git: r.git.clone(),
            started_at: r.started_at.clone(),
            host: r.host.clone(),
        }
    }

    /// Walk from `root` in `direction`, breadth first.
    pub fn walk(&self, root: Digest, direction: Direction) -> Lineage {
        let mut artifacts = vec![self.artifact(&root)];
        let mut seen_artifacts = BTreeSet::from([root]);
        let mut seen_runs = BTreeSet::new();
        let mut runs = Vec::new();
        let mut edges = Vec::new();
        let mut queue = VecDeque::from([root]);
        while let Some(d) = queue.pop_front() {
            let run_ids: Vec<usize> = match direction {
                Direction::Up => self.producers.get(&d).copied().into_iter().collect(),
                Direction::Down => self.consumers.get(&d).cloned().unwrap_or_default(),
            };
            for i in run_ids {
                let r = &self.runs[i];
                let out = r.outputs.as_ref().expect("filtered").digest;
                if seen_runs.insert(i) {
                    runs.push(self.run(i));
                    for inp in &r.inputs {
                        edges.push(LineageEdge {
                            from: inp.artifact.digest,
                            to: out,
                            run: r.run_id.clone(),
                            input: inp.name.clone(),
                        });
                    }
                }
                let next: Vec<Digest> = match direction {
                    Direction::Up => r.inputs.iter().map(|x| x.artifact.digest).collect(),
                    Direction::Down => vec![out],
                };
                for n in next {
                    if seen_artifacts.insert(n) {
                        artifacts.push(self.artifact(&n));
                        queue.push_back(n);
                    }
                }
            }
        }
        Lineage {
            root,
            direction,
            artifacts,
            runs,
            edges,
        }
    }
}

/// Writes the upstream tree, one artifact per line, indented by depth.
struct UpWriter<'a> {
    runs: &'a BTreeMap<Digest, &'a LineageRun>,
    arts: &'a BTreeMap<Digest, &'a LineageArtifact>,
    describe: &'a dyn Fn(&LineageRun) -> String,
    seen: BTreeSet<Digest>,
    out: &'a mut String,
}

impl UpWriter<'_> {
    fn write(&mut self, d: Digest, depth: usize, label: &str) {
        let pad = "  ".repeat(depth);
        let a = self.arts.get(&d);
        let kind = a
            .map(|a| format!("{:?}", a.kind).to_lowercase())
            .unwrap_or_default();
        self.out
            .push_str(&format!("{pad}{label}{} {kind}", d.short()));
        match (self.runs.get(&d), a.and_then(|a| a.raw_input.as_ref())) {
            (_, Some(path)) => self.out.push_str(&format!("  raw input `{path}`\n")),
            (Some(r), None) => {
                let r = *r;
                self.out.push_str(&format!("  <- {}\n", (self.describe)(r)));
                if !self.seen.insert(d) {
                    return;
                }
                for i in &r.inputs {
                    self.write(i.digest, depth + 1, &format!("{}: ", i.name));
                }
            }
            (None, None) => self.out.push_str("  (no run record)\n"),
        }
    }
}

impl Lineage {
    /// An indented tree for people.
    pub fn to_text(&self) -> String {
        let runs_by_output: BTreeMap<Digest, &LineageRun> =
            self.runs.iter().map(|r| (r.output, r)).collect();
        let artifacts: BTreeMap<Digest, &LineageArtifact> =
            self.artifacts.iter().map(|a| (a.digest, a)).collect();
        let mut out = String::new();
        let describe_run = |r: &LineageRun| -> String {
            let git = match &r.git {
                Some(g) => format!(
                    " commit {}{}",
                    g.commit
                        .as_deref()
                        .map(|c| &c[..c.len().min(10)])
                        .unwrap_or("none"),
                    if g.dirty { " (dirty)" } else { "" }
                ),
                None => String::new(),
            };
            let params = if r.params.is_null() {
                String::new()
            } else {
                format!(" params {}", r.params)
            };
            format!(
                "{}/{} v{} run {}{params}{git}",
                r.experiment, r.step, r.version, r.run_id
            )
        };
        match self.direction {
            Direction::Up => {
                let mut w = UpWriter {
                    runs: &runs_by_output,
                    arts: &artifacts,
                    describe: &describe_run,
                    seen: BTreeSet::new(),
                    out: &mut out,
                };
                w.write(self.root, 0, "");
            }
            Direction::Down => {
                out.push_str(&format!(
                    "{} and everything derived from it:\n",
                    self.root.short()
                ));
                for r in &self.runs {
                    let from: Vec<String> = r
                        .inputs
                        .iter()
                        .filter(|i| artifacts.contains_key(&i.digest))
                        .map(|i| format!("{} {}", i.name, i.digest.short()))
                        .collect();
                    out.push_str(&format!(
                        "  {} <- {}  from {}\n",
                        r.output.short(),
                        describe_run(r),
                        from.join(", ")
                    ));
                }
            }
        }
        out
    }

    /// Graphviz: artifacts as boxes, runs as ellipses.
    pub fn to_dot(&self) -> String {
        let mut s = String::from("digraph lineage {\n  rankdir=LR;\n");
        for a in &self.artifacts {
            let label = match &a.raw_input {
                Some(p) => format!("{}\\n{}", a.digest.short(), p.replace('"', "'")),
                None => a.digest.short(),
            };
            s.push_str(&format!(
                "  \"a{}\" [shape=box,label=\"{label}\"];\n",
                a.digest
            ));
        }
        for r in &self.runs {
            s.push_str(&format!(
                "  \"r{}\" [shape=ellipse,label=\"{}/{} v{}\"];\n  \"r{}\" -> \"a{}\";\n",
                r.run_id, r.experiment, r.step, r.version, r.run_id, r.output
            ));
        }
        for e in &self.edges {
            s.push_str(&format!(
                "  \"a{}\" -> \"r{}\" [label=\"{}\"];\n",
                e.from, e.run, e.input
            ));
        }
        s.push_str("}\n");
        s
    }
}
