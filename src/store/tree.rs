//! Tree manifests: a directory artifact is the sorted list of (relative path, digest, size) of its files.

use serde::{Deserialize, Serialize};

use super::Digest;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// '/'-separated, relative, without `.` or `..` components.
    pub path: String,
    pub digest: Digest,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tree {
    pub entries: Vec<TreeEntry>,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    fuselab_tree: u32,
    entries: Vec<TreeEntry>,
}

impl Tree {
    pub fn new(mut entries: Vec<TreeEntry>) -> Tree {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Tree { entries }
    }

    pub fn size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    pub fn get(&self, path: &str) -> Option<&TreeEntry> {
        self.entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The canonical manifest bytes; the tree's digest is the blake3 of these.
    pub fn to_bytes(&self) -> Vec<u8> {
        crate::util::canonical_json(&Manifest {
            fuselab_tree: 1,
            entries: self.entries.clone(),
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Tree, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.fuselab_tree != 1 {
            return Err(format!("unknown tree format {}", m.fuselab_tree));
        }
        for w in m.entries.windows(2) {
            if w[0].path >= w[1].path {
                return Err(format!(
                    "entries not sorted or duplicated at `{}`",
                    w[1].path
                ));
            }
        }
        for e in &m.entries {
            let bad = e.path.is_empty()
                || e.path.starts_with('/')
                || e.path
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..");
            if bad {
                return Err(format!(
                    "entry path `{}` is not a clean relative path",
                    e.path
                ));
            }
        }
        Ok(Tree { entries: m.entries })
    }
}
