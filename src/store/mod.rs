//! The blake3 content-addressed store: immutable objects, tree manifests, stat cache, checkout, fsck, gc.
//!
//! Layout under the store root (`artifacts/` by default):
//! ```text
//! FORMAT               {"store_format":1}; a newer number is refused
//! LOCK                 flock: shared while a process writes, exclusive for gc
//! objects/ab/cdef...   read-only blobs named by their blake3 digest
//! tmp/                 temporary files, renamed into objects/ once complete
//! statcache/           (dev, inode, size, mtime, ctime) -> digest of files outside the store
//! checkouts/<digest>/  read-only materialised trees (hardlinks) used as step inputs
//! refs/                pinned artifact references (gc roots)
//! ```
//! The recipe engine keeps its own directories (keys/, runs/, invocations/, locks/, specs/) beside these.

mod digest;
mod names;
mod tree;

pub use digest::Digest;
pub use names::{RecordId, RefName};
pub use tree::{Tree, TreeEntry};

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fs::{self as xfs, FileLock, IoContext, LinkMode, PathError, StatKey};

/// The directories of an empty store.
const SKELETON: [&str; 5] = ["objects", "tmp", "statcache", "checkouts", "refs"];

/// The on-disk format this build reads and writes.
pub const STORE_FORMAT: u32 = 1;

/// What an artifact digest names: a single file, or a tree manifest listing files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    Blob,
    Tree,
}

/// How files from outside the store get in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingest {
    /// Copy (reflink where the filesystem can): the original stays writable and independent.
    Copy,
    /// Hardlink the original into the store and make it read-only (DVC's `hardlink` cache type):
    /// no data is written, so adding costs one hashing pass. Editing the file in place afterwards
    /// would corrupt the object (fsck detects it); replace it instead.
    Link,
}

/// A reference to a stored artifact; this is what run records and cache entries hold.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub kind: ArtifactKind,
    pub digest: Digest,
    /// Bytes of content (for a tree: the sum of its files).
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("{}: store format {found} was written by a newer fuselab; this build reads format {supported}", path.display())]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{}: not a fuselab store format file: {reason}", path.display())]
    BadFormatFile { path: PathBuf, reason: String },
    #[error("object {digest} is not in the store")]
    MissingObject { digest: Digest },
    #[error("object {digest} is corrupt: {} hashes to {actual}", path.display())]
    Corrupt {
        digest: Digest,
        path: PathBuf,
        actual: Digest,
    },
    #[error("object {digest} is not a valid tree manifest: {reason}")]
    BadTree { digest: Digest, reason: String },
    #[error("{}: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("{}: changed while it was being added to the store; try again", path.display())]
    Changed { path: PathBuf },
    #[error("{}: already exists; checkout needs a path that does not exist", path.display())]
    DestinationExists { path: PathBuf },
    #[error("`{prefix}` matches no object in the store")]
    UnknownPrefix { prefix: String },
    #[error("`{prefix}` is ambiguous: it matches {} objects ({})", matches.len(), matches.iter().take(4).map(|d| d.to_string()).collect::<Vec<_>>().join(", "))]
    AmbiguousPrefix {
        prefix: String,
        matches: Vec<Digest>,
    },
    #[error("`{text}` is not a digest: {reason}")]
    BadDigest { text: String, reason: String },
    #[error("{}: not a fuselab store (no FORMAT file); only `run` and `store add` create a store, and only in an empty or missing directory", path.display())]
    NotAStore { path: PathBuf },
    #[error("{}: not a fuselab store and not empty; refusing to turn it into one", path.display())]
    ForeignDirectory { path: PathBuf },
    #[error("`{text}` is not a valid {what}: {reason}")]
    BadName {
        what: &'static str,
        text: String,
        reason: String,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An opened store. Cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct FormatFile {
    store_format: u32,
}

#[derive(Serialize, Deserialize)]
struct StatEntry {
    path: PathBuf,
    stat: StatKey,
    digest: Digest,
    /// When the entry was made (ns since the epoch). Entries older than format 2 lack it and are
    /// never trusted.
    #[serde(default)]
    cached_at_ns: i128,
}

/// A file whose mtime or ctime lies this close to the moment its digest was cached may have been
/// rewritten within the same timestamp tick, with identical stat, after it was hashed (git's
/// "racy clean" problem). Such entries are not trusted: the file is hashed again. Two seconds covers
/// the coarsest common timestamps (FAT's); ext4/xfs/btrfs tick far finer.
const RACY_WINDOW_NS: i128 = 2_000_000_000;

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// The result of checking every object.
#[derive(Debug, Default, Serialize)]
pub struct FsckReport {
    pub objects_checked: usize,
    pub bytes_checked: u64,
    /// Objects whose content no longer matches their name.
    pub corrupt: Vec<CorruptObject>,
    /// Objects that a root or tree refers to but that are absent.
    pub missing: Vec<MissingRef>,
    /// Objects that nothing reaches (left by an interrupted write, or by gc-able history).
    pub orphaned: Vec<Digest>,
    /// Files in objects/ whose names are not digests.
    pub stray_files: Vec<PathBuf>,
    /// Temporary files left behind by interrupted writers (removed by gc).
    pub temp_files: usize,
    /// Tree manifests a root names that cannot be read: their files cannot be checked for presence.
    pub unreadable_trees: Vec<UnreadableTree>,
    /// Run records, cache entries or refs that cannot be parsed.
    pub unreadable_records: Vec<UnreadableFile>,
    /// Materialised checkouts that differ from their tree (rebuilt on next use; gc removes them).
    pub damaged_checkouts: Vec<DamagedCheckout>,
}

#[derive(Debug, Serialize)]
pub struct CorruptObject {
    pub digest: Digest,
    pub path: PathBuf,
    pub actual: String,
}

#[derive(Debug, Serialize)]
pub struct MissingRef {
    pub digest: Digest,
    pub referenced_by: String,
}

impl FsckReport {
    /// Clean means: nothing corrupt, nothing missing, nothing unexplained in objects/.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.missing.is_empty()
            && self.stray_files.is_empty()
            && self.unreadable_trees.is_empty()
            && self.unreadable_records.is_empty()
            && self.damaged_checkouts.is_empty()
    }
}

/// What gc removed (or would remove with a dry run).
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub removed_objects: Vec<(Digest, u64)>,
    pub removed_checkouts: usize,
    pub removed_temp_files: usize,
    pub bytes_freed: u64,
    pub objects_kept: usize,
    /// Why no object was removed: unreadable records or tree manifests make reachability unknowable.
    pub kept_everything_because: Vec<String>,
}

/// The roots gc and fsck start from, and the files that should have held roots but cannot be read.
#[derive(Debug, Default, Clone)]
pub struct RootSet {
    pub roots: Vec<Root>,
    /// Files that may name roots but cannot be read: gc keeps every object while any exist.
    pub unreadable: Vec<UnreadableFile>,
    /// Torn cache entries: reported by fsck, but they name nothing their run record does not.
    pub torn_cache_entries: Vec<UnreadableFile>,
}

impl From<Vec<Root>> for RootSet {
    fn from(roots: Vec<Root>) -> RootSet {
        RootSet {
            roots,
            ..Default::default()
        }
    }
}

/// A record, ref or cache file that exists but cannot be parsed.
#[derive(Debug, Clone, Serialize)]
pub struct UnreadableFile {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct UnreadableTree {
    pub digest: Digest,
    pub referenced_by: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct DamagedCheckout {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Default)]
struct Reach {
    seen: BTreeSet<Digest>,
    missing: Vec<MissingRef>,
    unreadable_trees: Vec<UnreadableTree>,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the gc roots")]
    Roots(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<PathError> for GcError {
    fn from(e: PathError) -> GcError {
        GcError::Store(e.into())
    }
}

/// A root of reachability for fsck and gc, with a description for messages.
#[derive(Debug, Clone)]
pub struct Root {
    pub artifact: ArtifactRef,
    pub origin: String,
}

impl Store {
    /// Open the existing store at `root`; a directory without `FORMAT` is refused, so a typo in
    /// `--store` can never make `gc` clean up someone else's `tmp/`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        let store = Store { root };
        let format_path = store.root.join("FORMAT");
        match fs::read(&format_path) {
            Ok(bytes) => store.check_format(&format_path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotAStore { path: store.root })
            }
            Err(e) => return Err(PathError::new(&format_path, e).into()),
        }
        Ok(store)
    }

    /// Open the store at `root`, creating it when the directory is missing or empty (what `run` and
    /// `store add` do). A non-empty directory without `FORMAT` is refused.
    pub fn open_or_create(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        let format_path = root.join("FORMAT");
        if format_path.exists() {
            return Store::open(root);
        }
        match fs::read_dir(&root) {
            Ok(rd) => {
                // Empty, or a store another process is creating right now (empty skeleton
                // directories, its FORMAT temp file): anything else is someone's directory.
                for e in rd {
                    let e = e.at(&root)?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name == "FORMAT" {
                        // Created by another process since the check above.
                        return Store::open(root);
                    }
                    let skeleton = SKELETON.contains(&name.as_str())
                        && e.file_type().is_ok_and(|t| t.is_dir())
                        && fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_none());
                    if !(skeleton || name.starts_with(".FORMAT")) {
                        // A store created by another process since the first check (it may
                        // already be writing objects) is a store, not a foreign directory.
                        if format_path.exists() {
                            return Store::open(root);
                        }
                        return Err(StoreError::ForeignDirectory { path: root });
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(PathError::new(&root, e).into()),
        }
        let store = Store { root };
        for d in SKELETON {
            let p = store.root.join(d);
            xfs::create_dir_all_durable(&p).at(&p)?;
        }
        let bytes = serde_json::to_vec(&FormatFile {
            store_format: STORE_FORMAT,
        })
        .expect("serialises");
        // The temp file lives in the root, not in tmp/, so a concurrent creator still sees tmp/ empty.
        let tmp = store.root.join(xfs::unique_name(".FORMAT"));
        let res = fs::write(&tmp, &bytes).and_then(|_| xfs::publish(&tmp, &format_path, true));
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.at(&format_path)?;
        Ok(store)
    }

    /// For read-only views (`plan`) of a store that may not exist yet: a missing directory reads as
    /// an empty store and nothing is created; an existing one must be a store.
    pub fn open_or_absent(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        if !root.exists() {
            return Ok(Store { root });
        }
        Store::open(root)
    }

    fn check_format(&self, format_path: &Path, bytes: &[u8]) -> Result<()> {
        let f: FormatFile =
            serde_json::from_slice(bytes).map_err(|e| StoreError::BadFormatFile {
                path: format_path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if f.store_format > STORE_FORMAT {
            return Err(StoreError::NewerFormat {
                path: format_path.to_path_buf(),
                found: f.store_format,
                supported: STORE_FORMAT,
            });
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh, empty directory inside the store's tmp/ (same filesystem as objects/).
    pub fn scratch_dir(&self, prefix: &str) -> Result<PathBuf> {
        let p = self.tmp_dir().join(xfs::unique_name(prefix));
        fs::create_dir_all(&p).at(&p)?;
        Ok(p)
    }

    /// Shared lock held by every process that writes objects; gc takes it exclusively.
    pub fn lock_shared(&self) -> Result<FileLock> {
        let p = self.root.join("LOCK");
        Ok(FileLock::lock(&p, false).at(&p)?)
    }

    pub fn object_path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_string();
        self.root.join("objects").join(&hex[..2]).join(&hex[2..])
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.object_path(d).is_file()
    }

    /// Move a complete, fsynced temporary file into place as object `d`. An object already there is
    /// kept only if it verifies; a corrupt one is replaced by this good copy (re-running the step
    /// that produced an object repairs it).
    fn install(&self, tmp: &Path, d: &Digest) -> Result<()> {
        let dest = self.object_path(d);
        let dir = dest.parent().expect("object paths have a parent");
        xfs::create_dir_all_durable(dir).at(dir)?;
        xfs::set_readonly(tmp).at(tmp)?;
        xfs::rename_durable(tmp, &dest).at(&dest)?;
        Ok(())
    }

    /// True when object `d` is present and its content hashes to its name.
    pub fn has_intact(&self, d: &Digest) -> bool {
        self.has(d) && self.verify_object(d).is_ok()
    }

    /// Install a complete temporary file (in this store's `tmp/`) as object `d` once it hashes to
    /// `d`; otherwise it is removed and nothing is installed. This is how bytes from elsewhere (a
    /// remote) enter: their name is a claim until the content is hashed here.
    pub fn adopt(&self, tmp: &Path, d: &Digest) -> Result<()> {
        let actual = match Self::hash_file(tmp) {
            Ok(a) => a,
            Err(e) => {
                let _ = fs::remove_file(tmp);
                return Err(e);
            }
        };
        if &actual != d {
            let _ = fs::remove_file(tmp);
            return Err(StoreError::Corrupt {
                digest: *d,
                path: tmp.to_path_buf(),
                actual,
            });
        }
        if self.has_intact(d) {
            let _ = fs::remove_file(tmp);
            return Ok(());
        }
        if let Err(e) = self.install(tmp, d) {
            let _ = fs::remove_file(tmp);
            return Err(e);
        }
        Ok(())
    }

    /// Store bytes; returns their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest(*blake3::hash(bytes).as_bytes());
        if !self.has_intact(&d) {
            let tmp = self.tmp_dir().join(xfs::unique_name("obj"));
            let write = || -> io::Result<()> {
                let mut f = fs::File::create(&tmp)?;
                io::Write::write_all(&mut f, bytes)?;
                f.sync_all()
            };
            if let Err(e) = write() {
                let _ = fs::remove_file(&tmp);
                return Err(PathError::new(&tmp, e).into());
            }
            if let Err(e) = self.install(&tmp, &d) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        Ok(d)
    }

    /// Hash a file by streaming it (memory-mapped, multithreaded for large files).
    pub fn hash_file(path: &Path) -> Result<Digest> {
        xfs::require_regular(path).at(path)?;
        let mut h = blake3::Hasher::new();
        h.update_mmap_rayon(path).at(path)?;
        Ok(Digest(*h.finalize().as_bytes()))
    }

    fn statcache_path(&self, path: &Path) -> PathBuf {
        let h = blake3::hash(path.as_os_str().as_encoded_bytes()).to_hex();
        self.root.join("statcache").join(&h.as_str()[..32])
    }

    fn statcache_get(&self, abs: &Path, stat: &StatKey) -> Option<Digest> {
        let bytes = fs::read(self.statcache_path(abs)).ok()?;
        let e: StatEntry = serde_json::from_slice(&bytes).ok()?;
        let settled = e.stat.mtime_ns.max(e.stat.ctime_ns) + RACY_WINDOW_NS <= e.cached_at_ns;
        (e.path == abs && &e.stat == stat && settled).then_some(e.digest)
    }

    fn statcache_put(&self, abs: &Path, stat: StatKey, digest: Digest) {
        let entry = StatEntry {
            path: abs.to_path_buf(),
            stat,
            digest,
            cached_at_ns: now_ns(),
        };
        let bytes = serde_json::to_vec(&entry).expect("serialises");
        // A cache: losing an entry only costs a re-hash, so no fsync.
        let _ = xfs::atomic_write(&self.tmp_dir(), &self.statcache_path(abs), &bytes, false);
    }

    /// Add a file that lives outside the store (it is copied; the original is untouched).
    /// Unchanged files are recognised by the stat cache and not re-hashed.
    pub fn put_file(&self, path: &Path) -> Result<ArtifactRef> {
        self.put_file_with(path, Ingest::Copy)
    }

    /// Add a file from outside the store, copying or hardlinking it.
    pub fn put_file_with(&self, path: &Path, ingest: Ingest) -> Result<ArtifactRef> {
        let abs = std::path::absolute(path).at(path)?;
        let meta = fs::metadata(&abs).at(&abs)?;
        if !meta.is_file() {
            return Err(StoreError::Unsupported {
                path: abs,
                reason: "not a regular file".into(),
            });
        }
        let stat = StatKey::of(&meta);
        let size = meta.len();
        if let Some(d) = self.statcache_get(&abs, &stat) {
            if self.has(&d) {
                return Ok(ArtifactRef {
                    kind: ArtifactKind::Blob,
                    digest: d,
                    size,
                });
            }
        }
        let d = Self::hash_file(&abs)?;
        let mut stat = stat;
        if !self.has_intact(&d) {
            let tmp = self.tmp_dir().join(xfs::unique_name("obj"));
            let placed = match ingest {
                Ingest::Link => match fs::hard_link(&abs, &tmp) {
                    Ok(()) => fs::File::open(&tmp).and_then(|f| f.sync_all()),
                    // Another filesystem: a link is impossible, so copy.
                    Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                        xfs::copy_durable(&abs, &tmp)
                    }
                    Err(e) => Err(e),
                },
                Ingest::Copy => xfs::copy_durable(&abs, &tmp),
            };
            let res = placed.at(&tmp).map_err(StoreError::from).and_then(|_| {
                // The copy happened after hashing: make sure the file did not change in between.
                // (Linking changes the ctime, so compare what content changes must touch.)
                let after = StatKey::of(&fs::metadata(&abs).at(&abs)?);
                if (after.ino, after.size, after.mtime_ns) != (stat.ino, stat.size, stat.mtime_ns) {
                    return Err(StoreError::Changed { path: abs.clone() });
                }
                self.install(&tmp, &d)
            });
            if let Err(e) = res {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            if ingest == Ingest::Link {
                stat = StatKey::of(&fs::metadata(&abs).at(&abs)?);
            }
        }
        self.statcache_put(&abs, stat, d);
        Ok(ArtifactRef {
            kind: ArtifactKind::Blob,
            digest: d,
            size,
        })
    }

    /// Add a file that this process owns and will not touch again (a step's output): it is moved
    /// into the store rather than copied.
    fn put_owned_file(&self, path: &Path) -> Result<(Digest, u64)> {
        let d = Self::hash_file(path)?;
        let size = fs::metadata(path).at(path)?.len();
        if self.has_intact(&d) {
            fs::remove_file(path).at(path)?;
        } else {
            fs::File::open(path).and_then(|f| f.sync_all()).at(path)?;
            self.install(path, &d)?;
        }
        Ok((d, size))
    }

    /// Relative, '/'-separated paths of all regular files under `dir`, sorted.
    fn walk(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), dir.to_path_buf())];
        while let Some((prefix, d)) = stack.pop() {
            for entry in fs::read_dir(&d).at(&d)? {
                let entry = entry.at(&d)?;
                let p = entry.path();
                let name =
                    entry
                        .file_name()
                        .into_string()
                        .map_err(|_| StoreError::Unsupported {
                            path: p.clone(),
                            reason: "file names must be UTF-8".into(),
                        })?;
                let rel = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                let ft = entry.file_type().at(&p)?;
                if ft.is_dir() {
                    stack.push((rel, p));
                } else if ft.is_file() {
                    out.push((rel, p));
                } else {
                    return Err(StoreError::Unsupported {
                        path: p,
                        reason: "only regular files and directories can be stored (symlink or special file)".into(),
                    });
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn put_tree(&self, tree: &Tree) -> Result<ArtifactRef> {
        let d = self.put_bytes(&tree.to_bytes())?;
        Ok(ArtifactRef {
            kind: ArtifactKind::Tree,
            digest: d,
            size: tree.size(),
        })
    }

    /// Add a directory from outside the store (copied).
    pub fn put_dir(&self, dir: &Path) -> Result<ArtifactRef> {
        self.put_dir_with(dir, Ingest::Copy)
    }

    pub fn put_dir_with(&self, dir: &Path, ingest: Ingest) -> Result<ArtifactRef> {
        let mut entries = Vec::new();
        for (rel, p) in Self::walk(dir)? {
            let a = self.put_file_with(&p, ingest)?;
            entries.push(TreeEntry {
                path: rel,
                digest: a.digest,
                size: a.size,
            });
        }
        self.put_tree(&Tree::new(entries))
    }

    /// Add a directory this process owns (a step's finished output): files are moved in.
    pub fn put_owned_dir(&self, dir: &Path) -> Result<ArtifactRef> {
        let mut entries = Vec::new();
        for (rel, p) in Self::walk(dir)? {
            let (digest, size) = self.put_owned_file(&p)?;
            entries.push(TreeEntry {
                path: rel,
                digest,
                size,
            });
        }
        self.put_tree(&Tree::new(entries))
    }

    /// Add a file or a directory from outside the store.
    pub fn put_path(&self, path: &Path) -> Result<ArtifactRef> {
        self.put_path_with(path, Ingest::Copy)
    }

    pub fn put_path_with(&self, path: &Path, ingest: Ingest) -> Result<ArtifactRef> {
        let meta = fs::metadata(path).at(path)?;
        if meta.is_dir() {
            self.put_dir_with(path, ingest)
        } else {
            self.put_file_with(path, ingest)
        }
    }

    /// The digest a directory would have as a tree, computed without storing anything.
    pub fn digest_dir(dir: &Path) -> Result<ArtifactRef> {
        let tree = Tree::new(Self::file_digests(dir)?);
        Ok(ArtifactRef {
            kind: ArtifactKind::Tree,
            digest: Digest(*blake3::hash(&tree.to_bytes()).as_bytes()),
            size: tree.size(),
        })
    }

    /// Every regular file under `dir` with its '/'-separated relative path, size and fresh digest,
    /// sorted by path (symlinks and special files are errors).
    pub fn file_digests(dir: &Path) -> Result<Vec<TreeEntry>> {
        let mut entries = Vec::new();
        for (rel, p) in Self::walk(dir)? {
            let size = fs::metadata(&p).at(&p)?.len();
            entries.push(TreeEntry {
                path: rel,
                digest: Self::hash_file(&p)?,
                size,
            });
        }
        Ok(entries)
    }

    /// The digest a file or directory has, freshly hashed, without storing anything.
    pub fn digest_path(path: &Path) -> Result<ArtifactRef> {
        let meta = fs::metadata(path).at(path)?;
        if meta.is_dir() {
            return Self::digest_dir(path);
        }
        Ok(ArtifactRef {
            kind: ArtifactKind::Blob,
            digest: Self::hash_file(path)?,
            size: meta.len(),
        })
    }

    /// Like [`Store::digest_path`] but trusting the stat cache for unchanged files (used by `plan`).
    pub fn peek_path(&self, path: &Path) -> Result<ArtifactRef> {
        let digest_of = |p: &Path| -> Result<(Digest, u64)> {
            let abs = std::path::absolute(p).at(p)?;
            let meta = fs::metadata(&abs).at(&abs)?;
            match self.statcache_get(&abs, &StatKey::of(&meta)) {
                Some(d) => Ok((d, meta.len())),
                None => Ok((Self::hash_file(&abs)?, meta.len())),
            }
        };
        if !fs::metadata(path).at(path)?.is_dir() {
            let (digest, size) = digest_of(path)?;
            return Ok(ArtifactRef {
                kind: ArtifactKind::Blob,
                digest,
                size,
            });
        }
        let mut entries = Vec::new();
        for (rel, p) in Self::walk(path)? {
            let (digest, size) = digest_of(&p)?;
            entries.push(TreeEntry {
                path: rel,
                digest,
                size,
            });
        }
        let tree = Tree::new(entries);
        Ok(ArtifactRef {
            kind: ArtifactKind::Tree,
            digest: Digest::of(&tree.to_bytes()),
            size: tree.size(),
        })
    }

    /// Read a whole (small) object, verifying its digest.
    pub fn read_bytes(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.object_path(d);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingObject { digest: *d })
            }
            Err(e) => return Err(PathError::new(&p, e).into()),
        };
        let actual = Digest(*blake3::hash(&bytes).as_bytes());
        if &actual != d {
            return Err(StoreError::Corrupt {
                digest: *d,
                path: p,
                actual,
            });
        }
        Ok(bytes)
    }

    pub fn read_tree(&self, d: &Digest) -> Result<Tree> {
        let bytes = self.read_bytes(d)?;
        Tree::from_bytes(&bytes).map_err(|reason| StoreError::BadTree { digest: *d, reason })
    }

    /// Re-hash an object and compare with its name.
    pub fn verify_object(&self, d: &Digest) -> Result<()> {
        let p = self.object_path(d);
        if !p.is_file() {
            return Err(StoreError::MissingObject { digest: *d });
        }
        let actual = Self::hash_file(&p)?;
        if &actual != d {
            return Err(StoreError::Corrupt {
                digest: *d,
                path: p,
                actual,
            });
        }
        Ok(())
    }

    /// Re-hash every object of an artifact (all files of a tree), in parallel.
    pub fn verify_artifact(&self, a: &ArtifactRef) -> Result<()> {
        match a.kind {
            ArtifactKind::Blob => self.verify_object(&a.digest),
            ArtifactKind::Tree => {
                let tree = self.read_tree(&a.digest)?;
                tree.entries
                    .par_iter()
                    .try_for_each(|e| self.verify_object(&e.digest))
            }
        }
    }

    /// The kind of a stored object, told by content: a tree is an object that parses as a manifest.
    /// The object is verified first, so a corrupt tree is an error, never mistaken for a blob.
    pub fn artifact_of(&self, d: &Digest) -> Result<ArtifactRef> {
        let p = self.object_path(d);
        let size = fs::metadata(&p)
            .map_err(|_| StoreError::MissingObject { digest: *d })?
            .len();
        self.verify_object(d)?;
        let bytes = self.read_bytes(d)?;
        Ok(match Tree::from_bytes(&bytes) {
            Ok(t) => ArtifactRef {
                kind: ArtifactKind::Tree,
                digest: *d,
                size: t.size(),
            },
            Err(_) => ArtifactRef {
                kind: ArtifactKind::Blob,
                digest: *d,
                size,
            },
        })
    }

    /// Check out an artifact at `dest` (which must not exist), for a person to use. Every object is
    /// verified first, the files are written to a temporary path beside `dest` and renamed into
    /// place, so a failure leaves no partial `dest`. `Auto` reflinks or copies; hardlinks (which
    /// share the object's inode, so an in-place edit would corrupt the store) only on request.
    pub fn checkout(&self, a: &ArtifactRef, dest: &Path, mode: LinkMode) -> Result<()> {
        if fs::symlink_metadata(dest).is_ok() {
            return Err(StoreError::DestinationExists {
                path: dest.to_path_buf(),
            });
        }
        self.verify_artifact(a)?;
        let staging = xfs::temp_dir_beside(dest).at(dest)?;
        let res = (|| -> Result<()> {
            let staged = staging.join("x");
            self.place_artifact(a, &staged, mode)?;
            xfs::publish(&staged, dest, false).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    StoreError::DestinationExists {
                        path: dest.to_path_buf(),
                    }
                } else {
                    PathError::new(dest, e).into()
                }
            })
        })();
        let _ = xfs::remove_tree(&staging);
        res
    }

    /// Lay out an artifact's files at `dest` (no verification, no atomicity: callers stage).
    fn place_artifact(&self, a: &ArtifactRef, dest: &Path, mode: LinkMode) -> Result<()> {
        let entries = match a.kind {
            ArtifactKind::Blob => {
                let src = self.object_path(&a.digest);
                if !src.is_file() {
                    return Err(StoreError::MissingObject { digest: a.digest });
                }
                xfs::place(&src, dest, mode).at(dest)?;
                return Ok(());
            }
            ArtifactKind::Tree => self.read_tree(&a.digest)?.entries,
        };
        fs::create_dir_all(dest).at(dest)?;
        for e in &entries {
            let src = self.object_path(&e.digest);
            if !src.is_file() {
                return Err(StoreError::MissingObject { digest: e.digest });
            }
            let target = dest.join(&e.path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            xfs::place(&src, &target, mode).at(&target)?;
        }
        Ok(())
    }

    fn checkout_path(&self, d: &Digest) -> PathBuf {
        self.root.join("checkouts").join(d.to_string())
    }

    /// Does the materialised checkout at `dir` hold exactly the tree's files with the tree's content?
    /// Files that are hardlinks of the (already verified) object are accepted by inode; any other file
    /// is re-hashed. Returns the first difference found.
    pub fn check_checkout(&self, tree: &Tree, dir: &Path) -> Result<Option<String>> {
        use std::os::unix::fs::MetadataExt;
        let present = match Self::walk(dir) {
            Ok(p) => p,
            Err(e) => return Ok(Some(format!("unreadable: {e}"))),
        };
        let wanted: BTreeSet<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
        for (rel, _) in &present {
            if !wanted.contains(rel.as_str()) {
                return Ok(Some(format!("extra file `{rel}`")));
            }
        }
        if present.len() != tree.entries.len() {
            let have: BTreeSet<&str> = present.iter().map(|(r, _)| r.as_str()).collect();
            let gone = wanted.iter().find(|w| !have.contains(*w)).unwrap_or(&"?");
            return Ok(Some(format!("file `{gone}` is missing")));
        }
        for e in &tree.entries {
            let f = dir.join(&e.path);
            let (Ok(fm), Ok(om)) = (fs::metadata(&f), fs::metadata(self.object_path(&e.digest)))
            else {
                return Ok(Some(format!("file `{}` is unreadable", e.path)));
            };
            if (fm.dev(), fm.ino()) == (om.dev(), om.ino()) {
                continue;
            }
            if fm.len() != e.size || Self::hash_file(&f).ok() != Some(e.digest) {
                return Ok(Some(format!("file `{}` differs from the tree", e.path)));
            }
        }
        Ok(None)
    }

    /// A read-only path holding the artifact's content, shared by every step that reads it. A tree's
    /// checkout (read-only files in read-only directories) is checked against the tree every time it
    /// is handed out, and rebuilt if anything in it was changed, added or removed.
    pub fn materialize(&self, a: &ArtifactRef) -> Result<PathBuf> {
        match a.kind {
            ArtifactKind::Blob => {
                let p = self.object_path(&a.digest);
                if !p.is_file() {
                    return Err(StoreError::MissingObject { digest: a.digest });
                }
                Ok(p)
            }
            ArtifactKind::Tree => {
                let dest = self.checkout_path(&a.digest);
                let tree = self.read_tree(&a.digest)?;
                if dest.is_dir() {
                    if self.check_checkout(&tree, &dest)?.is_none() {
                        return Ok(dest);
                    }
                    // Damaged: move it aside (atomically, so a concurrent reader never sees it half
                    // deleted) and rebuild.
                    let aside = self.tmp_dir().join(xfs::unique_name("damaged-co"));
                    if xfs::rename_durable(&dest, &aside).is_ok() {
                        let _ = xfs::remove_tree(&aside);
                    }
                }
                let scratch = self.scratch_dir("co")?;
                let staged = scratch.join("tree");
                let res = self
                    .place_artifact(a, &staged, LinkMode::Hardlink)
                    .or_else(|_| {
                        let _ = xfs::remove_tree(&staged);
                        self.place_artifact(a, &staged, LinkMode::Copy)
                    })
                    .and_then(|_| {
                        for e in &tree.entries {
                            let f = staged.join(&e.path);
                            xfs::set_readonly(&f).at(&f)?;
                        }
                        xfs::set_tree_readonly(&staged).at(&staged)?;
                        match xfs::publish(&staged, &dest, false) {
                            Ok(()) => Ok(()),
                            // Another process materialised it first; theirs is identical.
                            Err(_) if dest.is_dir() => Ok(()),
                            Err(e) => Err(PathError::new(&dest, e).into()),
                        }
                    });
                let _ = xfs::remove_tree(&scratch);
                res.map(|_| dest)
            }
        }
    }

    /// Every object present (not verified), sorted.
    pub fn objects(&self) -> Result<Vec<Digest>> {
        Ok(self.list_objects()?.0)
    }

    /// Every digest present in objects/, plus files there that are not objects.
    fn list_objects(&self) -> Result<(Vec<Digest>, Vec<PathBuf>)> {
        let mut digests = Vec::new();
        let mut stray = Vec::new();
        let objects = self.root.join("objects");
        for fan in fs::read_dir(&objects).at(&objects)? {
            let fan = fan.at(&objects)?;
            let fan_name = fan.file_name().to_string_lossy().into_owned();
            if !fan.file_type().at(&fan.path())?.is_dir() {
                stray.push(fan.path());
                continue;
            }
            for obj in fs::read_dir(fan.path()).at(&fan.path())? {
                let obj = obj.at(&fan.path())?;
                let name = format!("{fan_name}{}", obj.file_name().to_string_lossy());
                // Anything but a regular file (a FIFO would block the hashing forever) is stray.
                let regular = obj.file_type().map(|t| t.is_file()).unwrap_or(false);
                match name.parse::<Digest>() {
                    Ok(d) if regular => digests.push(d),
                    _ => stray.push(obj.path()),
                }
            }
        }
        digests.sort();
        Ok((digests, stray))
    }

    /// Resolve a unique digest prefix (at least 4 hex characters) to a stored object.
    pub fn resolve_prefix(&self, prefix: &str) -> Result<Digest> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(StoreError::BadDigest {
                text: prefix,
                reason: "expected at least 4 hexadecimal characters".into(),
            });
        }
        if prefix.len() == 64 {
            return prefix.parse();
        }
        let dir = self.root.join("objects").join(&prefix[..2]);
        let mut matches = Vec::new();
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = format!("{}{}", &prefix[..2], e.file_name().to_string_lossy());
                if name.starts_with(&prefix) {
                    if let Ok(d) = name.parse() {
                        matches.push(d);
                    }
                }
            }
        }
        match matches.len() {
            0 => Err(StoreError::UnknownPrefix { prefix }),
            1 => Ok(matches[0]),
            _ => Err(StoreError::AmbiguousPrefix { prefix, matches }),
        }
    }

    /// All digests reachable from `roots` (trees expanded). Missing objects and trees that cannot be
    /// read (absent, corrupt, not a manifest) are reported rather than aborting the walk.
    fn reachable(&self, roots: &[Root]) -> Reach {
        let mut reach = Reach::default();
        for r in roots {
            if !reach.seen.insert(r.artifact.digest) {
                continue;
            }
            if !self.has(&r.artifact.digest) {
                reach.missing.push(MissingRef {
                    digest: r.artifact.digest,
                    referenced_by: r.origin.clone(),
                });
                continue;
            }
            if r.artifact.kind == ArtifactKind::Tree {
                match self.read_tree(&r.artifact.digest) {
                    Ok(tree) => {
                        for e in tree.entries {
                            if reach.seen.insert(e.digest) && !self.has(&e.digest) {
                                reach.missing.push(MissingRef {
                                    digest: e.digest,
                                    referenced_by: format!(
                                        "{} (tree {}, path {})",
                                        r.origin, r.artifact.digest, e.path
                                    ),
                                });
                            }
                        }
                    }
                    Err(e) => reach.unreadable_trees.push(UnreadableTree {
                        digest: r.artifact.digest,
                        referenced_by: r.origin.clone(),
                        reason: e.to_string(),
                    }),
                }
            }
        }
        reach
    }

    /// Verify every object, and report what the roots reference but is absent, and what nothing reaches.
    pub fn fsck(&self, roots: &RootSet, progress: &indicatif::ProgressBar) -> Result<FsckReport> {
        let (digests, stray) = self.list_objects()?;
        progress.set_length(digests.len() as u64);
        let results: Vec<(Digest, u64, Option<CorruptObject>)> = digests
            .par_iter()
            .map(|d| {
                let p = self.object_path(d);
                let size = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                let bad = match Self::hash_file(&p) {
                    Ok(actual) if &actual == d => None,
                    Ok(actual) => Some(CorruptObject {
                        digest: *d,
                        path: p,
                        actual: actual.to_string(),
                    }),
                    Err(e) => Some(CorruptObject {
                        digest: *d,
                        path: p,
                        actual: format!("unreadable: {e}"),
                    }),
                };
                progress.inc(1);
                (*d, size, bad)
            })
            .collect();
        let reach = self.reachable(&roots.roots);
        let mut report = FsckReport {
            stray_files: stray,
            missing: reach.missing,
            unreadable_trees: reach.unreadable_trees,
            unreadable_records: roots
                .unreadable
                .iter()
                .chain(&roots.torn_cache_entries)
                .cloned()
                .collect(),
            ..Default::default()
        };
        // The scan above has just hashed every object: checkouts are judged by its result rather
        // than by hashing their objects a second time.
        let intact: BTreeSet<Digest> = results
            .iter()
            .filter(|(_, _, bad)| bad.is_none())
            .map(|(d, _, _)| *d)
            .collect();
        report.damaged_checkouts = self.damaged_checkouts(&|d| intact.contains(d))?;
        let reach = reach.seen;
        for (d, size, bad) in results {
            report.objects_checked += 1;
            report.bytes_checked += size;
            if let Some(b) = bad {
                report.corrupt.push(b);
            }
            if !reach.contains(&d) {
                report.orphaned.push(d);
            }
        }
        report.temp_files = fs::read_dir(self.tmp_dir())
            .map(|rd| rd.count())
            .unwrap_or(0);
        Ok(report)
    }

    /// Remove every object no root reaches, stale temporary files, and unused or damaged checkouts.
    /// The store lock is taken exclusively *before* `roots` is called, so no writer can commit an
    /// object and the record or ref that reaches it between the two (that race lost data). When some
    /// record or tree manifest cannot be read, gc cannot prove any object unreachable, so it keeps
    /// every object and says why.
    pub fn gc(
        &self,
        roots: impl FnOnce(&Store) -> Result<RootSet, Box<dyn std::error::Error + Send + Sync>>,
        dry_run: bool,
        waiting: impl FnOnce(),
    ) -> Result<GcReport, GcError> {
        let lock_path = self.root.join("LOCK");
        let _lock = match FileLock::try_lock(&lock_path, true).at(&lock_path)? {
            Some(l) => l,
            None => {
                waiting();
                FileLock::lock(&lock_path, true).at(&lock_path)?
            }
        };
        let roots = roots(self).map_err(GcError::Roots)?;
        let (digests, _) = self.list_objects()?;
        let reach = self.reachable(&roots.roots);
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        for u in &roots.unreadable {
            report
                .kept_everything_because
                .push(format!("{}: {}", u.path.display(), u.reason));
        }
        for t in &reach.unreadable_trees {
            report.kept_everything_because.push(format!(
                "tree {} (referenced by {}) cannot be read: {}",
                t.digest, t.referenced_by, t.reason
            ));
        }
        let keep_all = !report.kept_everything_because.is_empty();
        for d in digests {
            if keep_all || reach.seen.contains(&d) {
                report.objects_kept += 1;
                continue;
            }
            let p = self.object_path(&d);
            let size = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                fs::remove_file(&p).at(&p)?;
            }
            report.bytes_freed += size;
            report.removed_objects.push((d, size));
        }
        let damaged: BTreeSet<PathBuf> = self
            .damaged_checkouts(&|d| self.verify_object(d).is_ok())?
            .into_iter()
            .map(|c| c.path)
            .collect();
        let checkouts = self.root.join("checkouts");
        if let Ok(rd) = fs::read_dir(&checkouts) {
            for e in rd.flatten() {
                let keep = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<Digest>().ok())
                    .is_some_and(|d| reach.seen.contains(&d) || keep_all)
                    && !damaged.contains(&e.path());
                if !keep {
                    report.removed_checkouts += 1;
                    if !dry_run {
                        xfs::remove_tree(&e.path()).at(&e.path())?;
                    }
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.tmp_dir()) {
            for e in rd.flatten() {
                report.removed_temp_files += 1;
                if !dry_run {
                    xfs::remove_tree(&e.path()).at(&e.path())?;
                }
            }
        }
        Ok(report)
    }

    /// Materialised checkouts that no longer match their tree (edited, added or removed files), or
    /// whose tree cannot be read. `intact` tells whether an object is present and verifies.
    pub fn damaged_checkouts(
        &self,
        intact: &dyn Fn(&Digest) -> bool,
    ) -> Result<Vec<DamagedCheckout>> {
        let mut out = Vec::new();
        let dir = self.root.join("checkouts");
        let Ok(rd) = fs::read_dir(&dir) else {
            return Ok(out);
        };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let reason = match e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Digest>().ok())
            {
                None => Some("not named by a digest".to_string()),
                Some(d) => match self.read_tree(&d) {
                    Err(err) => Some(format!("its tree cannot be read: {err}")),
                    Ok(tree) => {
                        // Hardlinks are accepted by inode only for objects that verify.
                        let bad_object = tree.entries.iter().find(|t| !intact(&t.digest));
                        match bad_object {
                            Some(t) => {
                                Some(format!("object {} of `{}` is damaged", t.digest, t.path))
                            }
                            None => self.check_checkout(&tree, &path)?,
                        }
                    }
                },
            };
            if let Some(reason) = reason {
                out.push(DamagedCheckout { path, reason });
            }
        }
        Ok(out)
    }

    /// Pinned references under refs/ (each file holds an ArtifactRef or a list of them). Unreadable
    /// ref files are listed in `unreadable`, not fatal: fsck must still run, gc must keep everything.
    pub fn refs(&self) -> Result<RootSet> {
        let mut out = RootSet::default();
        let dir = self.root.join("refs");
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let name = p
                    .strip_prefix(&self.root)
                    .unwrap_or(&p)
                    .display()
                    .to_string();
                let parsed = fs::read(&p).map_err(|e| e.to_string()).and_then(|bytes| {
                    serde_json::from_slice::<RefFile>(&bytes)
                        .map(|r| r.artifacts.into_values().collect::<Vec<_>>())
                        .map_err(|e| e.to_string())
                });
                match parsed {
                    Ok(refs) => out.roots.extend(refs.into_iter().map(|artifact| Root {
                        artifact,
                        origin: name.clone(),
                    })),
                    Err(reason) => out.unreadable.push(UnreadableFile { path: p, reason }),
                }
            }
        }
        Ok(out)
    }

    /// Pin named artifacts under refs/<name>.json so gc keeps them.
    pub fn set_ref(&self, name: &RefName, artifacts: BTreeMap<String, ArtifactRef>) -> Result<()> {
        let path = self.root.join("refs").join(format!("{name}.json"));
        let bytes = serde_json::to_vec_pretty(&RefFile { artifacts }).expect("serialises");
        xfs::atomic_write(&self.tmp_dir(), &path, &bytes, true).at(&path)?;
        Ok(())
    }

    /// Copy an object's bytes to a writer. The object is verified before the first byte is written
    /// (a reader must never receive corrupt bytes followed by an error), and again while streaming,
    /// in case it changes in between.
    pub fn cat(&self, d: &Digest, out: &mut dyn io::Write) -> Result<()> {
        self.verify_object(d)?;
        let p = self.object_path(d);
        let mut f = match fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingObject { digest: *d })
            }
            Err(e) => return Err(PathError::new(&p, e).into()),
        };
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).at(&p)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).at(Path::new("<stdout>"))?;
        }
        let actual = Digest(*h.finalize().as_bytes());
        if &actual != d {
            return Err(StoreError::Corrupt {
                digest: *d,
                path: p,
                actual,
            });
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
pub struct RefFile {
    pub artifacts: BTreeMap<String, ArtifactRef>,
}

#[cfg(test)]
mod tests;
