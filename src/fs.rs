//! All low-level file IO: atomic writes, fsync, read-only marking, reflink/hardlink/copy, advisory locks.
//!
//! Everything that must survive `kill -9` goes through here: data is written to a temporary file in the
//! same directory tree, flushed with `fsync`, and only then renamed into place, so readers see either the
//! old state or the complete new one, never a partial file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A name for a temporary file that is unique across processes and threads of this host.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:08x}", std::process::id())
}

/// fsync a directory so that a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `bytes` to `dest` atomically: temp file in `tmp_dir` (same filesystem), fsync, rename, fsync dir.
pub fn atomic_write(tmp_dir: &Path, dest: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let tmp = tmp_dir.join(unique_name("w"));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(&tmp, dest)?;
        if durable {
            if let Some(parent) = dest.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Remove write permission for everyone (objects in the store are immutable).
pub fn set_readonly(path: &Path) -> io::Result<()> {
    let mut perms = fs::metadata(path)?.permissions();
    perms.set_mode(perms.mode() & 0o555);
    fs::set_permissions(path, perms)
}

/// Make a file or directory writable again (needed before deleting read-only trees).
pub fn set_writable(path: &Path) -> io::Result<()> {
    let mut perms = fs::symlink_metadata(path)?.permissions();
    perms.set_mode(perms.mode() | 0o200);
    fs::set_permissions(path, perms)
}

/// Recursively delete a directory even if it contains read-only directories.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => return fs::remove_file(path),
        Ok(_) => {}
    }
    let _ = set_writable(path);
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let p = entry.path();
        if entry.file_type()?.is_dir() {
            remove_tree(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    fs::remove_dir(path)
}

/// How a stored object is placed at a working path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkMode {
    /// Try reflink, then a read-only hardlink, then a copy.
    Auto,
    /// Copy-on-write clone (btrfs, xfs, apfs); fails elsewhere.
    Reflink,
    /// A hardlink to the read-only object: no space used, the file cannot be edited in place.
    Hardlink,
    /// A plain, writable copy.
    Copy,
}

impl std::str::FromStr for LinkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LinkMode::Auto),
            "reflink" => Ok(LinkMode::Reflink),
            "hardlink" => Ok(LinkMode::Hardlink),
            "copy" => Ok(LinkMode::Copy),
            other => Err(format!(
                "unknown link mode `{other}` (expected auto, reflink, hardlink or copy)"
            )),
        }
    }
}

/// Copy-on-write clone of `src` to a new file `dest` (Linux FICLONE).
pub fn reflink(src: &Path, dest: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        const FICLONE: libc::c_ulong = 0x4004_9409;
        let s = File::open(src)?;
        let d = OpenOptions::new().write(true).create_new(true).open(dest)?;
        // SAFETY: both descriptors are open for the duration of the call.
        let rc = unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            drop(d);
            let _ = fs::remove_file(dest);
            return Err(err);
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (src, dest);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "reflink is only implemented on Linux",
        ))
    }
}

/// Place `src` at `dest` using `mode`; returns the mode actually used.
pub fn place(src: &Path, dest: &Path, mode: LinkMode) -> io::Result<LinkMode> {
    match mode {
        LinkMode::Reflink => reflink(src, dest).map(|_| LinkMode::Reflink),
        LinkMode::Hardlink => fs::hard_link(src, dest).map(|_| LinkMode::Hardlink),
        LinkMode::Copy => {
            fs::copy(src, dest)?;
            set_writable(dest)?;
            Ok(LinkMode::Copy)
        }
        LinkMode::Auto => {
            if reflink(src, dest).is_ok() {
                return Ok(LinkMode::Reflink);
            }
            if fs::hard_link(src, dest).is_ok() {
                return Ok(LinkMode::Hardlink);
            }
            place(src, dest, LinkMode::Copy)
        }
    }
}

/// Copy `src` into a new file `dest` (reflink when possible), fsync it. Used to ingest foreign files.
pub fn copy_durable(src: &Path, dest: &Path) -> io::Result<()> {
    if reflink(src, dest).is_err() {
        // std::fs::copy uses copy_file_range, so the data never passes through user space.
        fs::copy(src, dest)?;
    }
    File::open(dest)?.sync_all()
}

/// The identity of a file's current contents as far as `stat` can tell.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl StatKey {
    pub fn of(meta: &fs::Metadata) -> StatKey {
        StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

/// An exclusive or shared advisory lock (flock) held until dropped. The kernel releases it when the
/// holder dies, so a `kill -9` can never leave a lock that blocks forever.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    fn open(path: &Path) -> io::Result<File> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    }

    fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
        loop {
            // SAFETY: flock on an open descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(false),
                _ => return Err(err),
            }
        }
    }

    /// Try to take the lock without waiting; `None` if another process holds it.
    pub fn try_lock(path: &Path, exclusive: bool) -> io::Result<Option<FileLock>> {
        let file = Self::open(path)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        } | libc::LOCK_NB;
        Ok(Self::flock(&file, op)?.then(|| FileLock {
            file,
            path: path.to_path_buf(),
        }))
    }

    /// Wait for the lock.
    pub fn lock(path: &Path, exclusive: bool) -> io::Result<FileLock> {
        let file = Self::open(path)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        Self::flock(&file, op)?;
        Ok(FileLock {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Record who holds the lock, for the messages of processes that wait on it.
    pub fn write_holder(&mut self, holder: &str) -> io::Result<()> {
        self.file.set_len(0)?;
        use std::io::Seek;
        self.file.seek(io::SeekFrom::Start(0))?;
        self.file.write_all(holder.as_bytes())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Is a process with this pid alive on this host?
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence/permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Read a file, attaching its path to the error.
pub fn read(path: &Path) -> Result<Vec<u8>, PathError> {
    fs::read(path).map_err(|e| PathError::new(path, e))
}

/// An IO error together with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct PathError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl PathError {
    pub fn new(path: &Path, source: io::Error) -> PathError {
        PathError {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Attach a path to io errors: `fs::read(p).at(p)?`.
pub trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, PathError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, PathError> {
        self.map_err(|e| PathError::new(path, e))
    }
}
