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

/// Create `dir` and every missing parent, fsyncing each new directory's parent so that the new
/// entries survive a crash (a rename into a directory whose own creation was never synced can vanish).
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(p) = cur {
        if p.as_os_str().is_empty() || p.is_dir() {
            break;
        }
        missing.push(p);
        cur = p.parent();
    }
    for p in missing.into_iter().rev() {
        match fs::create_dir(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => continue,
            Err(e) => return Err(e),
        }
        if let Some(parent) = p.parent().filter(|q| !q.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// fsync every regular file and directory under `root` (the content of a tree about to be renamed
/// into place), the root last.
pub fn sync_tree(root: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(root)?;
    if meta.is_dir() {
        for e in fs::read_dir(root)? {
            sync_tree(&e?.path())?;
        }
        sync_dir(root)
    } else if meta.is_file() {
        File::open(root)?.sync_all()
    } else {
        Ok(())
    }
}

/// The one way a finished temporary file or directory becomes visible: its content is fsynced, it is
/// renamed to `dest` (whose parents are created durably), and `dest`'s directory is fsynced. With
/// `replace` false an existing `dest` is never overwritten (`AlreadyExists`).
pub fn publish(tmp: &Path, dest: &Path, replace: bool) -> io::Result<()> {
    sync_tree(tmp)?;
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dir_all_durable(parent)?;
    if replace {
        fs::rename(tmp, dest)?;
    } else {
        rename_noreplace(tmp, dest)?;
    }
    sync_dir(parent)?;
    if let Some(tp) = tmp
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && *p != parent)
    {
        sync_dir(tp)?;
    }
    Ok(())
}

/// Publish the finished directory `tmp` at `dest`, replacing a `dest` directory that the caller owns
/// (one it wrote itself earlier) by an atomic exchange: readers see the old or the new, never
/// neither. The old content ends up at `tmp`, which the caller removes.
pub fn publish_replacing_dir(tmp: &Path, dest: &Path) -> io::Result<()> {
    if fs::symlink_metadata(dest).is_err() {
        return publish(tmp, dest, false);
    }
    sync_tree(tmp)?;
    if let Err(err) = renameat2(tmp, dest, libc::RENAME_EXCHANGE) {
        if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(err);
        }
        // No RENAME_EXCHANGE here: move the old one aside, then the new one in.
        let aside = tmp.with_file_name(unique_name(".replaced"));
        fs::rename(dest, &aside)?;
        fs::rename(tmp, dest)?;
        fs::rename(&aside, tmp)?;
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// renameat2(2) with `flags` (errno read right after the call, before anything can clobber it).
fn renameat2(src: &Path, dest: &Path, flags: libc::c_uint) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let s = CString::new(src.as_os_str().as_bytes())?;
    let d = CString::new(dest.as_os_str().as_bytes())?;
    // SAFETY: both strings are valid, NUL-terminated paths for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            s.as_ptr(),
            libc::AT_FDCWD,
            d.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Rename a file that is already fsynced (an object whose bytes were synced when written) and fsync
/// the destination directory, so the new name survives a crash.
pub fn rename_durable(src: &Path, dest: &Path) -> io::Result<()> {
    fs::rename(src, dest)?;
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// rename(2) that fails with `AlreadyExists` instead of replacing `dest` (renameat2 NOREPLACE).
pub fn rename_noreplace(src: &Path, dest: &Path) -> io::Result<()> {
    let Err(err) = renameat2(src, dest, libc::RENAME_NOREPLACE) else {
        return Ok(());
    };
    match err.raw_os_error() {
        // Filesystems without RENAME_NOREPLACE: check, then rename (not atomic against a racer).
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if fs::symlink_metadata(dest).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "destination exists",
                ));
            }
            fs::rename(src, dest)
        }
        _ => Err(err),
    }
}

/// Write `bytes` to `dest` atomically: temp file in `tmp_dir` (same filesystem), fsync, rename, fsync
/// dir (and the dirs it had to create). `durable: false` skips the fsyncs, for caches.
pub fn atomic_write(tmp_dir: &Path, dest: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let tmp = tmp_dir.join(unique_name("w"));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        drop(f);
        if durable {
            publish(&tmp, dest, true)
        } else {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&tmp, dest)
        }
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Write `bytes` to `dest` atomically using a temp file beside it (for files outside the store).
pub fn write_durable(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dir_all_durable(dir)?;
    atomic_write(dir, dest, bytes, true)
}

/// A temporary directory beside `dest` (same filesystem, so publishing it is a rename), named so
/// that it is recognisably ours: `.<name>.tmp-<unique>`.
pub fn temp_dir_beside(dest: &Path) -> io::Result<PathBuf> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dir_all_durable(parent)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = parent.join(unique_name(&format!(".{name}.tmp")));
    fs::create_dir(&tmp)?;
    Ok(tmp)
}

/// Refuse anything but a regular file (a FIFO would block the reader forever, a device never ends).
pub fn require_regular(path: &Path) -> io::Result<fs::Metadata> {
    let meta = fs::metadata(path)?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            use std::os::unix::fs::FileTypeExt;
            let ft = meta.file_type();
            if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_char_device() || ft.is_block_device() {
                "a device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            }
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}; only regular files are read"),
        ));
    }
    Ok(meta)
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

/// Make every directory under `root` (and `root`) read-only; files keep their modes.
pub fn set_tree_readonly(root: &Path) -> io::Result<()> {
    for e in fs::read_dir(root)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_tree_readonly(&e.path())?;
        }
    }
    set_readonly(root)
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
    /// Reflink where the filesystem can, else copy: the result never shares an inode with an object.
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
                set_writable(dest)?;
                return Ok(LinkMode::Reflink);
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
