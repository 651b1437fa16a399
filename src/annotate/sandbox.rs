//! Running untrusted Python in a sandbox: namespaces (user, mount, pid, network, ipc, uts), a
//! read-only system, a private `/tmp`, only its own work dir writable, rlimits, a wall-clock limit,
//! capped output, and nothing left running afterwards.
//!
//! Built on `hakoniwa` (namespaces + pivot_root + rlimits in one audited crate) rather than our own
//! clone/mount code: the sandbox must get every detail right, and that crate is maintained for
//! exactly this. Where the kernel refuses namespaces the run falls back to rlimits and a process
//! group, and the result says so (`Isolation::RlimitsOnly`): never silently weaker.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What one check may use.
#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    /// Wall clock, measured by us; the process tree is killed when it runs out.
    pub wall: Duration,
    /// CPU seconds (RLIMIT_CPU).
    pub cpu_s: u64,
    /// Address space in bytes (RLIMIT_AS): a 16 GiB allocation fails with MemoryError.
    pub memory_bytes: u64,
    /// Largest file it may write (RLIMIT_FSIZE).
    pub file_bytes: u64,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: u64,
    /// Processes of its user (RLIMIT_NPROC): a fork flood stops here.
    pub processes: u64,
    /// Bytes of stdout and of stderr kept; the rest is read and dropped.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall: Duration::from_secs(10),
            cpu_s: 10,
            memory_bytes: 2 << 30,
            file_bytes: 16 << 20,
            open_files: 64,
            processes: 32,
            output_bytes: 64 << 10,
        }
    }
}

/// How strongly a run was isolated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "why")]
pub enum Isolation {
    /// User, mount, pid, network, ipc and uts namespaces; read-only system; private /tmp.
    Namespaces,
    /// The kernel refused namespaces: rlimits and a process group only (network and files exposed).
    RlimitsOnly(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no Python interpreter: {0} (install one, e.g. `apt-get install python3`, or pass --python)")]
    NoPython(String),
    #[error("the sandbox could not start: {0}")]
    Start(String),
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Killed by us at the wall-clock limit.
    Timeout,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunOutput {
    pub exit: Exit,
    #[serde(skip)]
    pub stdout: Vec<u8>,
    #[serde(skip)]
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub wall_s: f64,
}

/// A Python interpreter usable inside the sandbox: its executable and the prefix to mount.
#[derive(Clone, Debug, Serialize)]
pub struct Python {
    pub executable: PathBuf,
    /// Mounted read-only at the same path when it is outside the system directories.
    pub prefix: PathBuf,
}

impl Python {
    /// `python` (a path or a name on PATH) resolved to its real executable and prefix.
    pub fn find(python: &str) -> Result<Python, SandboxError> {
        let out = std::process::Command::new(python)
            .args([
                "-I",
                "-c",
                "import sys; print(sys.executable); print(sys.base_prefix)",
            ])
            .output()
            .map_err(|e| SandboxError::NoPython(format!("`{python}`: {e}")))?;
        if !out.status.success() {
            return Err(SandboxError::NoPython(format!(
                "`{python}` exited with {}",
                out.status
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let (Some(exe), Some(prefix)) = (lines.next(), lines.next()) else {
            return Err(SandboxError::NoPython(format!(
                "`{python}` did not report its location"
            )));
        };
        Ok(Python {
            executable: PathBuf::from(exe),
            prefix: PathBuf::from(prefix),
        })
    }

    /// The system's `/usr/bin/python3` when present (readable by any user, inside the system
    /// directories the sandbox mounts anyway), else `python3` from PATH.
    pub fn default_choice() -> Result<Python, SandboxError> {
        if Path::new("/usr/bin/python3").is_file() {
            return Python::find("/usr/bin/python3");
        }
        Python::find("python3")
    }
}

/// Where the check's files live: a fresh temporary directory, removed afterwards.
pub struct WorkDir {
    dir: tempfile::TempDir,
}

impl WorkDir {
    pub fn new() -> Result<WorkDir, SandboxError> {
        let dir = tempfile::Builder::new()
            .prefix("fuselab-check-")
            .tempdir()
            .map_err(|e| SandboxError::Io {
                path: std::env::temp_dir(),
                source: e,
            })?;
        Ok(WorkDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, text: &str) -> Result<(), SandboxError> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).map_err(|e| SandboxError::Io { path: p, source: e })
    }
}

/// The path the work dir has inside the sandbox.
pub const INSIDE: &str = "/sandbox";

/// uid the sandboxed code runs as (inside its user namespace): not root, so it holds no
/// capabilities, even over the namespaces made for it.
const SANDBOX_UID: u32 = 1000;

/// A pids cgroup (the v1 hierarchy at /sys/fs/cgroup/pids) for one run: `pids.max` bounds a fork
/// flood for host root too, whom RLIMIT_NPROC does not bind, and `cgroup.procs` lists every process
/// the run made, so all of them can be killed at the end. The spawning *thread* joins it just for
/// the fork (v1 places threads individually), so the child is born inside.
struct PidsCgroup {
    dir: PathBuf,
    parent_tasks: PathBuf,
}

const PIDS_ROOT: &str = "/sys/fs/cgroup/pids";

impl PidsCgroup {
    fn create(max: u64) -> Option<PidsCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own
            .lines()
            .find_map(|l| l.split_once(":pids:").map(|(_, p)| p.to_string()))?;
        let base = Path::new(PIDS_ROOT).join(rel.trim_start_matches('/'));
        let dir = base.join(crate::fs::unique_name("fuselab-sandbox"));
        std::fs::create_dir(&dir).ok()?;
        if std::fs::write(dir.join("pids.max"), max.to_string()).is_err() {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(PidsCgroup {
            dir,
            parent_tasks: base.join("tasks"),
        })
    }

    fn enter(&self) -> bool {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        std::fs::write(self.dir.join("tasks"), tid.to_string()).is_ok()
    }

    fn leave(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let _ = std::fs::write(&self.parent_tasks, tid.to_string());
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl PidsCgroup {
    /// SIGKILL every process of the run until none is left (or 5 s have passed).
    fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for p in pids {
                // SAFETY: signalling processes of the run's own cgroup.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        self.kill_all();
        // Killed processes leave the cgroup when the kernel has finished tearing them down; until
        // then rmdir says EBUSY.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Run `spawn` with the calling thread inside `cgroup` (when there is one), so the child is born
/// in it; the thread leaves right after.
fn spawn_in<T>(cgroup: &Option<PidsCgroup>, spawn: impl FnOnce() -> T) -> T {
    let joined = cgroup.as_ref().is_some_and(PidsCgroup::enter);
    let out = spawn();
    if joined {
        cgroup.as_ref().expect("joined").leave();
    }
    out
}

/// Threads draining a child's stdout and stderr, each keeping at most `cap` bytes.
struct Drain {
    out: Option<std::thread::JoinHandle<(Vec<u8>, bool)>>,
    err: Option<std::thread::JoinHandle<(Vec<u8>, bool)>>,
}

impl Drain {
    fn start(
        out: Option<impl Read + Send + 'static>,
        err: Option<impl Read + Send + 'static>,
        cap: usize,
    ) -> Drain {
        Drain {
            out: out.map(|r| std::thread::spawn(move || read_capped(r, cap))),
            err: err.map(|r| std::thread::spawn(move || read_capped(r, cap))),
        }
    }

    /// The kept bytes and whether anything was dropped, once both pipes are closed.
    fn finish(self, exit: Exit, started: Instant) -> RunOutput {
        let join = |h: Option<std::thread::JoinHandle<(Vec<u8>, bool)>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        let (stdout, stdout_truncated) = join(self.out);
        let (stderr, stderr_truncated) = join(self.err);
        RunOutput {
            exit,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            wall_s: started.elapsed().as_secs_f64(),
        }
    }
}

/// Poll `try_wait` until it reports an exit or `wall` has passed since `started`; true in the second
/// field when the time ran out (the caller kills).
fn wait_until<S, E>(
    started: Instant,
    wall: Duration,
    mut try_wait: impl FnMut() -> Result<Option<S>, E>,
) -> Result<(Option<S>, bool), E> {
    loop {
        if let Some(s) = try_wait()? {
            return Ok((Some(s), false));
        }
        if started.elapsed() >= wall {
            return Ok((None, true));
        }
        // Short polls: most checks end within tens of milliseconds.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Read at most `cap` bytes, then drain (so the child never blocks on a full pipe).
fn read_capped(mut r: impl Read, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buf = [0u8; 64 << 10];
    let mut truncated = false;
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}

fn rlimits() -> [(hakoniwa::Rlimit, libc::__rlimit_resource_t); 5] {
    use hakoniwa::Rlimit;
    [
        (Rlimit::Cpu, libc::RLIMIT_CPU),
        (Rlimit::As, libc::RLIMIT_AS),
        (Rlimit::Fsize, libc::RLIMIT_FSIZE),
        (Rlimit::Nofile, libc::RLIMIT_NOFILE),
        (Rlimit::Nproc, libc::RLIMIT_NPROC),
    ]
}

fn limit_values(l: &Limits) -> [u64; 5] {
    [
        l.cpu_s,
        l.memory_bytes,
        l.file_bytes,
        l.open_files,
        l.processes,
    ]
}

/// Run `python args...` with `work` as its writable directory, inside namespaces.
pub fn run_python(
    python: &Python,
    work: &WorkDir,
    args: &[&str],
    stdin: Option<&[u8]>,
    limits: &Limits,
    isolation: &Isolation,
) -> Result<RunOutput, SandboxError> {
    match isolation {
        Isolation::Namespaces => run_namespaced(python, work, args, stdin, limits),
        Isolation::RlimitsOnly(_) => run_rlimits_only(python, work, args, stdin, limits),
    }
}

/// Feed `input` to a child's stdin on a thread (then close it), so a child that never reads cannot
/// block us.
fn feed(w: Option<impl std::io::Write + Send + 'static>, input: Option<&[u8]>) {
    if let Some(mut w) = w {
        let data = input.map(<[u8]>::to_vec).unwrap_or_default();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
}

fn run_namespaced(
    python: &Python,
    work: &WorkDir,
    args: &[&str],
    stdin: Option<&[u8]>,
    limits: &Limits,
) -> Result<RunOutput, SandboxError> {
    use hakoniwa::{Container, Namespace, Stdio};
    let mut c = Container::new();
    c.rootfs("/")
        .map_err(|e| SandboxError::Start(e.to_string()))?
        .unshare(Namespace::Network)
        .unshare(Namespace::Ipc)
        .unshare(Namespace::Uts)
        .devfsmount("/dev")
        .tmpfsmount("/tmp")
        .bindmount_rw(&work.path().to_string_lossy(), INSIDE);
    let prefix = python.prefix.to_string_lossy().into_owned();
    let system = ["/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc"];
    if !system.iter().any(|s| prefix.starts_with(s)) {
        c.bindmount_ro(&prefix, &prefix);
    }
    // A non-root uid inside its namespace: execve drops every capability, so the code holds none,
    // not even over the namespaces made for it. (It maps to our own uid outside: an unprivileged
    // process may only map itself.)
    c.uidmap(SANDBOX_UID);
    c.gidmap(SANDBOX_UID);
    for ((r, _), v) in rlimits().into_iter().zip(limit_values(limits)) {
        c.setrlimit(r, v, v);
    }
    let exe = python.executable.to_string_lossy().into_owned();
    let mut cmd = c.command(&exe);
    cmd.args(args.iter().copied())
        .current_dir(INSIDE)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONHASHSEED", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Every process the run makes is in this cgroup; it is killed at the end, whatever happened.
    let cgroup = PidsCgroup::create(limits.processes + 4);
    let started = Instant::now();
    let mut child =
        spawn_in(&cgroup, || cmd.spawn()).map_err(|e| SandboxError::Start(e.to_string()))?;
    feed(child.stdin.take(), stdin);
    let drain = Drain::start(
        child.stdout.take(),
        child.stderr.take(),
        limits.output_bytes,
    );
    let (status, timed_out) = wait_until(started, limits.wall, || child.try_wait())
        .map_err(|e| SandboxError::Start(e.to_string()))?;
    let status = if timed_out {
        // The intermediate process dies; its child (pid 1 of the sandbox's pid namespace) has
        // PDEATHSIG=SIGKILL, and when pid 1 dies the kernel kills every process in it.
        let _ = child.kill();
        let _ = child.wait();
        None
    } else {
        status
    };
    // Nothing of the run may outlive it (and hold our pipes open).
    if let Some(cg) = &cgroup {
        cg.kill_all();
    }
    let exit = match status {
        None => Exit::Timeout,
        Some(s) => match s.exit_code {
            Some(c) => Exit::Code(c),
            None if s.code > 128 => Exit::Signal(s.code - 128),
            // 125 without an exit code: the container itself could not be set up.
            None => return Err(SandboxError::Start(s.reason)),
        },
    };
    Ok(drain.finish(exit, started))
}

fn run_rlimits_only(
    python: &Python,
    work: &WorkDir,
    args: &[&str],
    stdin: Option<&[u8]>,
    limits: &Limits,
) -> Result<RunOutput, SandboxError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(&python.executable);
    cmd.args(args)
        .current_dir(work.path())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", work.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONHASHSEED", "0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let values = limit_values(limits);
    // SAFETY: only async-signal-safe calls (setsid, setrlimit, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            for ((_, res), v) in rlimits().into_iter().zip(values) {
                let r = libc::rlimit {
                    rlim_cur: v,
                    rlim_max: v,
                };
                libc::setrlimit(res, &r);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let cgroup = PidsCgroup::create(limits.processes + 4);
    let started = Instant::now();
    let mut child = spawn_in(&cgroup, || cmd.spawn()).map_err(|e| SandboxError::Io {
        path: python.executable.clone(),
        source: e,
    })?;
    let pgid = child.id() as libc::pid_t;
    feed(child.stdin.take(), stdin);
    let drain = Drain::start(
        child.stdout.take(),
        child.stderr.take(),
        limits.output_bytes,
    );
    let (status, timed_out) =
        wait_until(started, limits.wall, || child.try_wait()).map_err(|e| SandboxError::Io {
            path: python.executable.clone(),
            source: e,
        })?;
    // Whatever it left behind in its process group (and its cgroup) goes too.
    // SAFETY: signalling a process group we created.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let status = status.or_else(|| child.wait().ok());
    if let Some(cg) = &cgroup {
        cg.kill_all();
    }
    use std::os::unix::process::ExitStatusExt;
    let exit = match (timed_out, status) {
        (true, _) => Exit::Timeout,
        (false, Some(s)) => match (s.code(), s.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(sig)) => Exit::Signal(sig),
            _ => Exit::Code(-1),
        },
        (false, None) => Exit::Code(-1),
    };
    Ok(drain.finish(exit, started))
}

/// Which isolation this machine gives: namespaces if a trivial sandboxed run works, else rlimits
/// only, with the reason.
pub fn probe(python: &Python) -> Isolation {
    let work = match WorkDir::new() {
        Ok(w) => w,
        Err(e) => return Isolation::RlimitsOnly(e.to_string()),
    };
    let limits = Limits {
        wall: Duration::from_secs(20),
        ..Limits::default()
    };
    match run_namespaced(python, &work, &["-c", "print('ok')"], None, &limits) {
        Ok(o) if o.exit == Exit::Code(0) && o.stdout.starts_with(b"ok") => Isolation::Namespaces,
        Ok(o) => Isolation::RlimitsOnly(format!(
            "a sandboxed test run failed ({:?}): {}",
            o.exit,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Isolation::RlimitsOnly(e.to_string()),
    }
}
