//! Test harness: a temporary project with its own corpus and store, driving the real `fuselab` binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_fuselab");

pub struct TestContext {
    pub dir: tempfile::TempDir,
    pub project: PathBuf,
    pub store: PathBuf,
}

impl TestContext {
    /// A project holding a copy of the hello corpus under `corpus/`, and an empty store.
    pub fn new() -> TestContext {
        let dir = tempfile::tempdir().expect("tempdir");
        let project = dir.path().join("project");
        let corpus = project.join("corpus");
        fs::create_dir_all(&corpus).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/data/hello");
        for e in fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), corpus.join(e.file_name())).unwrap();
        }
        let store = dir.path().join("artifacts");
        TestContext {
            dir,
            project,
            store,
        }
    }

    /// `fuselab --store <store> <args>` in the project directory.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--store")
            .arg(&self.store)
            .args(args)
            .current_dir(&self.project)
            .env_remove("FUSELAB_STORE");
        c
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("runs fuselab")
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "fuselab {args:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            !out.status.success(),
            "fuselab {args:?} should have failed\nstdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("--json prints JSON")
    }

    /// `run hello` with the project's corpus and extra arguments; returns the JSON report.
    pub fn run_hello(&self, extra: &[&str]) -> Value {
        let mut a = vec!["run", "hello", "--set", "corpus=corpus"];
        a.extend_from_slice(extra);
        self.json(&a)
    }

    pub fn run_records(&self) -> Vec<Value> {
        let dir = self.store.join("runs");
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd {
                let bytes = fs::read(e.unwrap().path()).unwrap();
                out.push(serde_json::from_slice(&bytes).unwrap());
            }
        }
        out
    }
}

/// Names of steps with a given status in a run report.
pub fn steps_with(report: &Value, status: &str) -> Vec<String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == status)
        .map(|s| s["step"].as_str().unwrap().to_string())
        .collect()
}

/// step -> output digest.
pub fn outputs(report: &Value) -> BTreeMap<String, String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().to_string(),
                s["outputs"]["digest"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A small deterministic generator for crash timings.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Run options for library-level tests: in-process, no progress bars.
pub fn quiet_options(jobs: usize, project: std::path::PathBuf) -> fuselab::recipe::RunOptions {
    fuselab::recipe::RunOptions {
        force: vec![],
        until: None,
        jobs,
        executor: fuselab::recipe::ExecutorKind::InProcess,
        project,
        overrides: vec![],
        progress: indicatif::MultiProgress::with_draw_target(
            indicatif::ProgressDrawTarget::hidden(),
        ),
    }
}

/// SFT rows of the counting task ("Count from k." -> "k k+1 k+2 k+3"), one JSON object a line.
pub fn sft_rows(n: u32) -> String {
    (0..n)
        .map(|i| {
            let k = i % 5 + 1;
            let ans: Vec<String> = (k..k + 4).map(|x| x.to_string()).collect();
            serde_json::json!({"messages": [{"role": "user", "content": format!("Count from {k}.")},
                                            {"role": "assistant", "content": ans.join(" ")}]})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Stops a loopback server when the test ends, however it ends.
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback HTTP server that answers every POST with `status` and `body` (the failure modes a
/// real server shows only by accident); it counts requests in `hits`.
pub fn broken_server(status: u16, body: &str, hits: &Path) -> (Server, u16) {
    let port = free_port();
    let script = format!(
        r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open({hits:?}, "a") as f: f.write("x")
        self.send_response({status}); self.end_headers(); self.wfile.write({body:?}.encode())
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
"#,
        hits = hits.to_str().unwrap(),
    );
    let child = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (Server(child), port)
}

/// Kills the `scripts/openai-server.sh` server whose pid file it holds when dropped.
pub struct ServeGuard(pub PathBuf);

impl Drop for ServeGuard {
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// A real OpenAI-compatible server (`transformers serve`) on a free loopback port, serving the
/// checkpoint `model`; installed and started by the project's own script.
pub fn openai_server(scratch: &Path, model: &Path) -> (ServeGuard, u16) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let port = free_port();
    let pidfile = scratch.join(format!("serve-{port}.pid"));
    let started = Command::new("bash")
        .arg(root.join("scripts/openai-server.sh"))
        .args([
            "start",
            &port.to_string(),
            model.to_str().unwrap(),
            pidfile.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(
        started.success(),
        "transformers serve did not start (see scripts/openai-server.sh)"
    );
    (ServeGuard(pidfile), port)
}

/// The GGUF backend's source: a tiny Llama on the Llama 3 tokenizer converted by llama.cpp's own
/// convert_hf_to_gguf.py, with transformers' greedy reference (`scripts/gguf-fixture.sh`, cached
/// outside the clone).
pub fn gguf_fixture() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/gguf-fixture.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/gguf-fixture.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}
