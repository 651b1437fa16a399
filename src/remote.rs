//! A store's mirror on an object store — any S3-compatible service, or a directory on a shared
//! filesystem — through the `object_store` crate: `push`, `pull`, and one step's inputs and results
//! for a job on another node. Every object is hashed on the way in and installed only if it matches
//! its name, so a corrupted remote object is refused, never installed.
//!
//! Remote layout under the URL's prefix mirrors the store's: `objects/ab/cdef…` (blobs and tree
//! manifests), `runs/`, `keys/`, `invocations/`, `specs/`, `refs/`. Objects and run records are
//! written create-only (put-if-absent: content-addressed or never rewritten); refs are overwritten
//! (last writer wins). A push sends objects before the records that name them, and records before
//! the cache entries, so a reader never sees an entry whose outputs are not there yet.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use crate::fs::{self as xfs, IoContext, PathError};
use crate::recipe::records::{CacheEntry, Invocation, Records, RunRecord};
use crate::recipe::StepSpec;
use crate::store::{
    ArtifactKind, ArtifactRef, Digest, RecordId, RefFile, RefName, Store, StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("`{text}` is not a remote: {reason} (expected s3://BUCKET/PREFIX, file:///DIR or an absolute directory)")]
    BadUrl { text: String, reason: String },
    /// The client's message already holds its whole cause chain (each level repeats the one
    /// below), so it is kept as text rather than as a source.
    #[error("{url}: {message}")]
    Client { url: String, message: String },
    #[error("{url}: object {digest} is not on the remote")]
    Missing { url: String, digest: Digest },
    #[error("{url}: remote object {digest} is corrupt (its content hashes to {actual}); it was not installed")]
    Corrupt {
        url: String,
        digest: Digest,
        actual: Digest,
    },
    #[error("{} remote object(s) refused, so no record was pulled: {}", .failures.len(), .failures.join("; "))]
    Refused { failures: Vec<String> },
    #[error("{url}: not a valid {what}: {reason}")]
    BadRecord {
        url: String,
        what: &'static str,
        reason: String,
    },
    #[error("{url}: {reason}")]
    Credentials { url: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("starting the async runtime for the remote: {0}")]
    Runtime(std::io::Error),
}

pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

/// A validated remote location: `s3://bucket[/prefix]` or a shared directory (`file:///dir` or
/// an absolute path). Parsed at the CLI boundary; nothing else becomes a remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteUrl {
    S3 { bucket: String, prefix: String },
    Dir(PathBuf),
}

impl FromStr for RemoteUrl {
    type Err = RemoteError;
    fn from_str(text: &str) -> Result<RemoteUrl> {
        let bad = |reason: &str| RemoteError::BadUrl {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            // S3's bucket naming rules (3-63 of a-z 0-9 . -), so a typo fails here, not as a 403.
            let ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                });
            if !ok {
                return Err(bad(
                    "the bucket name must be 3 to 63 of a-z, 0-9, `.` and `-`",
                ));
            }
            let prefix = prefix.trim_matches('/').to_string();
            if prefix
                .split('/')
                .any(|s| s == "." || s == ".." || (s.is_empty() && !prefix.is_empty()))
            {
                return Err(bad("the prefix has an empty, `.` or `..` segment"));
            }
            return Ok(RemoteUrl::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        let path = text.strip_prefix("file://").unwrap_or(text);
        if text.contains("://") && !text.starts_with("file://") {
            return Err(bad("unknown scheme"));
        }
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(bad("a directory remote must be an absolute path"));
        }
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad("`..` is not allowed"));
        }
        Ok(RemoteUrl::Dir(path))
    }
}

impl fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RemoteUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            RemoteUrl::Dir(p) => write!(f, "file://{}", p.display()),
        }
    }
}

/// Transfer tuning. Objects above `multipart_threshold` bytes go up in `part_size` parts (S3 needs
/// parts of at least 5 MiB except the last), `concurrency` transfers at a time.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    pub multipart_threshold: u64,
    pub part_size: usize,
    pub concurrency: usize,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
            concurrency: 8,
        }
    }
}

/// What a push or pull moved.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyncReport {
    pub objects_sent: usize,
    pub objects_received: usize,
    pub objects_already_there: usize,
    pub bytes: u64,
    pub multipart_uploads: usize,
    pub records: usize,
}

/// The record directories a remote mirrors, in the order a push writes them.
const RECORD_DIRS: [&str; 5] = ["runs", "specs", "keys", "invocations", "refs"];

/// An opened remote.
pub struct Remote {
    url: RemoteUrl,
    os: Arc<dyn ObjectStore>,
    prefix: Option<ObjPath>,
    rt: tokio::runtime::Runtime,
    pub options: RemoteOptions,
}

/// AWS credentials and region from the shared files (`~/.aws/credentials`, `~/.aws/config`, the
/// profile in AWS_PROFILE or `default`), for what the environment does not set: object_store reads
/// only the AWS_* variables.
fn profile_settings() -> Vec<(String, String)> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let file = |var: &str, rel: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(rel)))
    };
    let mut out = Vec::new();
    let sections = [
        (
            file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"),
            profile.clone(),
        ),
        (
            file("AWS_CONFIG_FILE", ".aws/config"),
            if profile == "default" {
                profile.clone()
            } else {
                format!("profile {profile}")
            },
        ),
    ];
    for (path, section) in sections {
        let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
            continue;
        };
        let mut inside = false;
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = name.trim() == section;
            } else if inside {
                if let Some((k, v)) = line.split_once('=') {
                    out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
        }
    }
    out
}

impl Remote {
    pub fn open(url: &RemoteUrl, options: RemoteOptions) -> Result<Remote> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        let client = |e: object_store::Error| RemoteError::Client {
            url: url.to_string(),
            message: e.to_string(),
        };
        let (os, prefix): (Arc<dyn ObjectStore>, Option<ObjPath>) = match url {
            RemoteUrl::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                let env_set = |k: &str| std::env::var_os(k).is_some();
                for (k, v) in profile_settings() {
                    match k.as_str() {
                        "aws_access_key_id" if !env_set("AWS_ACCESS_KEY_ID") => {
                            b = b.with_access_key_id(v)
                        }
                        "aws_secret_access_key" if !env_set("AWS_SECRET_ACCESS_KEY") => {
                            b = b.with_secret_access_key(v)
                        }
                        "aws_session_token" if !env_set("AWS_SESSION_TOKEN") => b = b.with_token(v),
                        "region" if !env_set("AWS_REGION") && !env_set("AWS_DEFAULT_REGION") => {
                            b = b.with_region(v)
                        }
                        "endpoint_url"
                            if !env_set("AWS_ENDPOINT_URL") && !env_set("AWS_ENDPOINT") =>
                        {
                            b = b.with_endpoint(v)
                        }
                        _ => {}
                    }
                }
                let endpoint = std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .unwrap_or_default();
                if endpoint.starts_with("http://") {
                    // A loopback or in-cluster gateway (SeaweedFS, MinIO) without TLS.
                    b = b.with_allow_http(true);
                }
                if !endpoint.is_empty() {
                    // Such gateways serve buckets as paths, not as virtual hosts.
                    b = b.with_virtual_hosted_style_request(false);
                }
                let os = rt.block_on(async { b.build() }).map_err(client)?;
                let prefix = (!prefix.is_empty()).then(|| ObjPath::from(prefix.as_str()));
                (Arc::new(os), prefix)
            }
            RemoteUrl::Dir(dir) => {
                xfs::create_dir_all_durable(dir).at(dir)?;
                let os = LocalFileSystem::new_with_prefix(dir).map_err(client)?;
                (Arc::new(os), None)
            }
        };
        Ok(Remote {
            url: url.clone(),
            os,
            prefix,
            rt,
            options,
        })
    }

    pub fn url(&self) -> &RemoteUrl {
        &self.url
    }

    fn path(&self, rel: &str) -> ObjPath {
        match &self.prefix {
            Some(p) => ObjPath::from(format!("{p}/{rel}")),
            None => ObjPath::from(rel),
        }
    }

    fn object_rel(d: &Digest) -> String {
        let hex = d.to_string();
        format!("objects/{}/{}", &hex[..2], &hex[2..])
    }

    /// The full URL of a remote path, for messages.
    fn show(&self, p: &ObjPath) -> String {
        match &self.url {
            RemoteUrl::S3 { bucket, .. } => format!("s3://{bucket}/{p}"),
            RemoteUrl::Dir(d) => format!("file://{}/{p}", d.display()),
        }
    }

    fn client_err(&self, p: &ObjPath, source: object_store::Error) -> RemoteError {
        RemoteError::Client {
            url: self.show(p),
            message: source.to_string(),
        }
    }

    /// Names (relative to `dir/`) of everything under a remote directory.
    async fn list(&self, dir: &str) -> Result<Vec<String>> {
        let base = self.path(dir);
        let metas: Vec<_> = self
            .os
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(|e| self.client_err(&base, e))?;
        let strip = format!("{base}/");
        Ok(metas
            .into_iter()
            .filter_map(|m| m.location.as_ref().strip_prefix(&strip).map(str::to_string))
            .collect())
    }

    async fn remote_objects(&self) -> Result<BTreeSet<Digest>> {
        Ok(self
            .list("objects")
            .await?
            .into_iter()
            .filter_map(|n| n.replace('/', "").parse().ok())
            .collect())
    }

    /// Upload one local object unless the remote has it. Returns (sent, multipart).
    async fn upload(&self, store: &Store, d: Digest) -> Result<(bool, bool, u64)> {
        // Never spread a corrupt local object: hash it first.
        store.verify_object(&d)?;
        let src = store.object_path(&d);
        let size = std::fs::metadata(&src).at(&src)?.len();
        let dest = self.path(&Self::object_rel(&d));
        if size <= self.options.multipart_threshold {
            let bytes = std::fs::read(&src).at(&src)?;
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            return match self.os.put_opts(&dest, PutPayload::from(bytes), opts).await {
                Ok(_) => Ok((true, false, size)),
                Err(object_store::Error::AlreadyExists { .. }) => Ok((false, false, 0)),
                Err(e) => Err(self.client_err(&dest, e)),
            };
        }
        // Multipart uploads cannot be conditional; content addressing makes a racing writer's
        // copy identical, so look first and overwrite harmlessly if two race.
        if self.os.head(&dest).await.is_ok() {
            return Ok((false, false, 0));
        }
        let upload = self
            .os
            .put_multipart(&dest)
            .await
            .map_err(|e| self.client_err(&dest, e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, self.options.part_size);
        let mut f = std::fs::File::open(&src).at(&src)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; self.options.part_size.min(8 << 20)];
        loop {
            let n = f.read(&mut buf).at(&src)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            w.wait_for_capacity(4)
                .await
                .map_err(|e| self.client_err(&dest, e))?;
            w.write(&buf[..n]);
        }
        let actual = Digest(*hasher.finalize().as_bytes());
        if actual != d {
            let _ = w.abort().await;
            return Err(StoreError::Corrupt {
                digest: d,
                path: src,
                actual,
            }
            .into());
        }
        w.finish().await.map_err(|e| self.client_err(&dest, e))?;
        Ok((true, true, size))
    }

    /// Download one object into the store, verified. Returns its size.
    async fn download(&self, store: &Store, d: Digest) -> Result<u64> {
        let src = self.path(&Self::object_rel(&d));
        let got = match self.os.get(&src).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::Missing {
                    url: self.show(&src),
                    digest: d,
                })
            }
            Err(e) => return Err(self.client_err(&src, e)),
        };
        let tmp = store.tmp_dir().join(xfs::unique_name("pull"));
        let mut f = std::fs::File::create(&tmp).at(&tmp)?;
        let mut stream = got.into_stream();
        let mut size = 0u64;
        let mut hasher = blake3::Hasher::new();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(self.client_err(&src, e));
                }
            };
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if let Err(e) = f.write_all(&chunk) {
                let _ = std::fs::remove_file(&tmp);
                return Err(PathError::new(&tmp, e).into());
            }
        }
        let actual = Digest(*hasher.finalize().as_bytes());
        if actual != d {
            let _ = std::fs::remove_file(&tmp);
            return Err(RemoteError::Corrupt {
                url: self.show(&src),
                digest: d,
                actual,
            });
        }
        if let Err(e) = f.sync_all() {
            let _ = std::fs::remove_file(&tmp);
            return Err(PathError::new(&tmp, e).into());
        }
        drop(f);
        store.adopt(&tmp, &d)?;
        Ok(size)
    }

    async fn get_bytes(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let p = self.path(rel);
        match self.os.get(&p).await {
            Ok(g) => Ok(Some(
                g.bytes()
                    .await
                    .map_err(|e| self.client_err(&p, e))?
                    .to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.client_err(&p, e)),
        }
    }

    async fn put_bytes(&self, rel: &str, bytes: Vec<u8>, create_only: bool) -> Result<bool> {
        let p = self.path(rel);
        let opts = PutOptions {
            mode: if create_only {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            ..Default::default()
        };
        match self.os.put_opts(&p, PutPayload::from(bytes), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.client_err(&p, e)),
        }
    }

    async fn upload_all(
        &self,
        store: &Store,
        digests: Vec<Digest>,
        report: &mut SyncReport,
        progress: &indicatif::ProgressBar,
    ) -> Result<()> {
        progress.set_length(digests.len() as u64);
        let mut results = futures::stream::iter(digests)
            .map(|d| self.upload(store, d))
            .buffer_unordered(self.options.concurrency.max(1));
        while let Some(r) = results.next().await {
            let (sent, multipart, bytes) = r?;
            if sent {
                report.objects_sent += 1;
            } else {
                report.objects_already_there += 1;
            }
            report.multipart_uploads += multipart as usize;
            report.bytes += bytes;
            progress.inc(1);
        }
        Ok(())
    }

    /// Download the given objects; corrupt or missing ones are collected, not fatal, so every good
    /// object still arrives and the caller names all the bad ones at once.
    async fn download_all(
        &self,
        store: &Store,
        digests: Vec<Digest>,
        report: &mut SyncReport,
        progress: &indicatif::ProgressBar,
    ) -> Result<Vec<String>> {
        progress.set_length(digests.len() as u64);
        let mut failures = Vec::new();
        let mut results = futures::stream::iter(digests)
            .map(|d| self.download(store, d))
            .buffer_unordered(self.options.concurrency.max(1));
        while let Some(r) = results.next().await {
            match r {
                Ok(bytes) => {
                    report.objects_received += 1;
                    report.bytes += bytes;
                }
                Err(e @ (RemoteError::Corrupt { .. } | RemoteError::Missing { .. })) => {
                    failures.push(e.to_string())
                }
                Err(e) => return Err(e),
            }
            progress.inc(1);
        }
        Ok(failures)
    }

    /// Send every local object the remote lacks, then every record.
    pub fn push(&self, store: &Store, progress: &indicatif::ProgressBar) -> Result<SyncReport> {
        let _lock = store.lock_shared()?;
        self.rt.block_on(async {
            let mut report = SyncReport::default();
            let there = self.remote_objects().await?;
            let local = store.objects()?;
            report.objects_already_there = local.iter().filter(|d| there.contains(d)).count();
            let missing: Vec<Digest> = local.into_iter().filter(|d| !there.contains(d)).collect();
            self.upload_all(store, missing, &mut report, progress)
                .await?;
            for dir in RECORD_DIRS {
                let remote: BTreeSet<String> = self.list(dir).await?.into_iter().collect();
                for rel in local_records(store, dir)? {
                    let overwrite = dir == "refs";
                    if !overwrite && remote.contains(&rel) {
                        continue;
                    }
                    let path = store.root().join(dir).join(&rel);
                    let bytes = std::fs::read(&path).at(&path)?;
                    if overwrite
                        && self.get_bytes(&format!("{dir}/{rel}")).await?.as_deref()
                            == Some(&bytes[..])
                    {
                        continue;
                    }
                    if self
                        .put_bytes(&format!("{dir}/{rel}"), bytes, !overwrite)
                        .await?
                    {
                        report.records += 1;
                    }
                }
            }
            Ok(report)
        })
    }

    /// Fetch every remote object the store lacks (each verified), then every record it lacks. A
    /// corrupt or missing object fails the pull before any record is installed.
    pub fn pull(&self, store: &Store, progress: &indicatif::ProgressBar) -> Result<SyncReport> {
        let _lock = store.lock_shared()?;
        self.rt.block_on(async {
            let mut report = SyncReport::default();
            let there = self.remote_objects().await?;
            let mut want = Vec::new();
            for d in there {
                if store.has_intact(&d) {
                    report.objects_already_there += 1;
                } else {
                    want.push(d);
                }
            }
            let failures = self
                .download_all(store, want, &mut report, progress)
                .await?;
            if !failures.is_empty() {
                return Err(RemoteError::Refused { failures });
            }
            for dir in RECORD_DIRS {
                let local: BTreeSet<String> = local_records(store, dir)?.into_iter().collect();
                for rel in self.list(dir).await? {
                    let overwrite = dir == "refs";
                    if !overwrite && local.contains(&rel) {
                        continue;
                    }
                    if self.install_record(store, dir, &rel).await? {
                        report.records += 1;
                    }
                }
            }
            Ok(report)
        })
    }

    /// Fetch, check and install one record file. Returns whether anything changed.
    async fn install_record(&self, store: &Store, dir: &str, rel: &str) -> Result<bool> {
        let remote_rel = format!("{dir}/{rel}");
        let url = self.show(&self.path(&remote_rel));
        let Some(bytes) = self.get_bytes(&remote_rel).await? else {
            return Ok(false);
        };
        let dest = check_record(store, dir, rel, &bytes, &url)?;
        if std::fs::read(&dest).ok().as_deref() == Some(&bytes[..]) {
            return Ok(false);
        }
        if let Some(parent) = dest.parent() {
            xfs::create_dir_all_durable(parent).at(parent)?;
        }
        xfs::atomic_write(&store.tmp_dir(), &dest, &bytes, true).at(&dest)?;
        Ok(true)
    }

    /// Make one artifact present locally: its tree manifest and every file object, fetched from the
    /// remote where missing and verified. Returns how many objects were fetched.
    pub fn fetch_artifact(&self, store: &Store, a: &ArtifactRef) -> Result<usize> {
        self.rt.block_on(self.fetch_artifact_async(store, a))
    }

    async fn fetch_artifact_async(&self, store: &Store, a: &ArtifactRef) -> Result<usize> {
        let mut report = SyncReport::default();
        let quiet = indicatif::ProgressBar::hidden();
        let mut want = Vec::new();
        if !store.has_intact(&a.digest) {
            want.push(a.digest);
        }
        let failures = self.download_all(store, want, &mut report, &quiet).await?;
        if let Some(f) = failures.into_iter().next() {
            return Err(RemoteError::Refused { failures: vec![f] });
        }
        if a.kind == ArtifactKind::Tree {
            let tree = store.read_tree(&a.digest)?;
            let want: Vec<Digest> = tree
                .entries
                .iter()
                .map(|e| e.digest)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|d| !store.has_intact(d))
                .collect();
            let failures = self.download_all(store, want, &mut report, &quiet).await?;
            if !failures.is_empty() {
                return Err(RemoteError::Refused { failures });
            }
        }
        Ok(report.objects_received)
    }

    fn artifact_objects(store: &Store, a: &ArtifactRef) -> Result<Vec<Digest>> {
        let mut out = vec![a.digest];
        if a.kind == ArtifactKind::Tree {
            out.extend(store.read_tree(&a.digest)?.entries.iter().map(|e| e.digest));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// For a job on another node: the step spec of `key` (local, or fetched and installed) and
    /// every input artifact, fetched from the remote. Returns the spec.
    pub fn prepare_step(&self, store: &Store, key: &Digest) -> Result<StepSpec> {
        let records = Records::new(store);
        let rel = format!("{key}.json");
        self.rt.block_on(async {
            if !records.spec_path(key).is_file() {
                self.install_record(store, "specs", &rel).await?;
            }
            Ok::<_, RemoteError>(())
        })?;
        let spec = records
            .spec(&key.to_string())
            .map_err(|e| RemoteError::BadRecord {
                url: self.show(&self.path(&format!("specs/{rel}"))),
                what: "step spec",
                reason: e.to_string(),
            })?;
        for i in &spec.inputs {
            self.fetch_artifact(store, &i.artifact)?;
        }
        Ok(spec)
    }

    /// The remote's cache entry for `key`, installed locally with its run record and outputs when it
    /// exists (a job whose step another node already finished).
    pub fn pull_entry(&self, store: &Store, key: &Digest) -> Result<Option<CacheEntry>> {
        let rel = format!("{key}.json");
        let Some(bytes) = self.rt.block_on(self.get_bytes(&format!("keys/{rel}")))? else {
            return Ok(None);
        };
        let url = self.show(&self.path(&format!("keys/{rel}")));
        let entry: CacheEntry =
            serde_json::from_slice(&bytes).map_err(|e| RemoteError::BadRecord {
                url: url.clone(),
                what: "cache entry",
                reason: e.to_string(),
            })?;
        self.fetch_artifact(store, &entry.outputs)?;
        self.rt.block_on(async {
            self.install_record(store, "runs", &format!("{}.json", entry.run_id))
                .await?;
            self.install_record(store, "keys", &rel).await
        })?;
        Ok(Some(entry))
    }

    /// Publish a finished step: its outputs' objects, its run record, then its cache entry.
    pub fn push_entry(&self, store: &Store, entry: &CacheEntry) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        let objects = Self::artifact_objects(store, &entry.outputs)?;
        let quiet = indicatif::ProgressBar::hidden();
        self.rt.block_on(async {
            let there = self.remote_objects().await?;
            let missing = objects.into_iter().filter(|d| !there.contains(d)).collect();
            self.upload_all(store, missing, &mut report, &quiet).await?;
            for (dir, rel) in [
                ("runs", format!("{}.json", entry.run_id)),
                ("keys", format!("{}.json", entry.key)),
            ] {
                let path = store.root().join(dir).join(&rel);
                let bytes = std::fs::read(&path).at(&path)?;
                report.records += self
                    .put_bytes(&format!("{dir}/{rel}"), bytes, dir == "runs")
                    .await? as usize;
            }
            Ok(report)
        })
    }

    /// Make the objects of `artifacts` and the spec of each key available on the remote, for jobs
    /// that will read them from there alone.
    pub fn push_step_inputs(&self, store: &Store, spec: &StepSpec) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        let mut objects = BTreeSet::new();
        for i in &spec.inputs {
            objects.extend(Self::artifact_objects(store, &i.artifact)?);
        }
        let quiet = indicatif::ProgressBar::hidden();
        let records = Records::new(store);
        self.rt.block_on(async {
            let there = self.remote_objects().await?;
            let missing = objects.into_iter().filter(|d| !there.contains(d)).collect();
            self.upload_all(store, missing, &mut report, &quiet).await?;
            let path = records.spec_path(&spec.key);
            let bytes = std::fs::read(&path).at(&path)?;
            report.records += self
                .put_bytes(&format!("specs/{}.json", spec.key), bytes, false)
                .await? as usize;
            Ok(report)
        })
    }
}

/// Record files under a store directory, as `/`-separated paths relative to it (refs nest).
fn local_records(store: &Store, dir: &str) -> Result<Vec<String>> {
    let base = store.root().join(dir);
    let mut out = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(PathError::new(&d, e).into()),
        };
        for e in rd {
            let e = e.at(&d)?;
            let p = e.path();
            let t = e.file_type().at(&p)?;
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() && p.extension().is_some_and(|x| x == "json") {
                let rel = p.strip_prefix(&base).expect("under base");
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Check a record fetched from a remote before it may enter the store: its name must be a valid
/// identifier of its kind (so it names a file inside the store and nothing else), it must parse,
/// it must be about the thing its name says, and every artifact it points at must be present.
/// Returns the local path it goes to.
fn check_record(store: &Store, dir: &str, rel: &str, bytes: &[u8], url: &str) -> Result<PathBuf> {
    let bad = |what: &'static str, reason: String| RemoteError::BadRecord {
        url: url.to_string(),
        what,
        reason,
    };
    let stem = rel
        .strip_suffix(".json")
        .ok_or_else(|| bad("record", "not a .json file".into()))?;
    let need = |a: &ArtifactRef, what: &'static str| {
        if store.has(&a.digest) {
            Ok(())
        } else {
            Err(bad(
                what,
                format!("names object {} that is not on the remote", a.digest),
            ))
        }
    };
    match dir {
        "runs" => {
            let id: RecordId = stem
                .parse()
                .map_err(|e: StoreError| bad("run record", e.to_string()))?;
            let r: RunRecord =
                serde_json::from_slice(bytes).map_err(|e| bad("run record", e.to_string()))?;
            if r.run_id != id.as_str() {
                return Err(bad("run record", format!("it holds run {}", r.run_id)));
            }
            if let Some(o) = &r.outputs {
                need(o, "run record")?;
            }
        }
        "keys" => {
            let key: Digest = stem
                .parse()
                .map_err(|e: StoreError| bad("cache entry", e.to_string()))?;
            let e: CacheEntry =
                serde_json::from_slice(bytes).map_err(|e| bad("cache entry", e.to_string()))?;
            if e.key != key {
                return Err(bad(
                    "cache entry",
                    format!("it is the entry of key {}", e.key),
                ));
            }
            need(&e.outputs, "cache entry")?;
        }
        "specs" => {
            let key: Digest = stem
                .parse()
                .map_err(|e: StoreError| bad("step spec", e.to_string()))?;
            let s: StepSpec =
                serde_json::from_slice(bytes).map_err(|e| bad("step spec", e.to_string()))?;
            if s.key != key {
                return Err(bad("step spec", format!("it is the spec of key {}", s.key)));
            }
        }
        "invocations" => {
            let id: RecordId = stem
                .parse()
                .map_err(|e: StoreError| bad("invocation", e.to_string()))?;
            let i: Invocation =
                serde_json::from_slice(bytes).map_err(|e| bad("invocation", e.to_string()))?;
            if i.id != id.as_str() {
                return Err(bad("invocation", format!("it holds invocation {}", i.id)));
            }
        }
        "refs" => {
            let _: RefName = stem
                .parse()
                .map_err(|e: StoreError| bad("ref", e.to_string()))?;
            let r: RefFile =
                serde_json::from_slice(bytes).map_err(|e| bad("ref", e.to_string()))?;
            for a in r.artifacts.values() {
                need(a, "ref")?;
            }
        }
        _ => unreachable!("only RECORD_DIRS are synced"),
    }
    Ok(store.root().join(dir).join(rel))
}
