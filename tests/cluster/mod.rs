//! Scale-out against real services on loopback, started by the project's own scripts: the remote
//! store on SeaweedFS's S3 API (and on a shared directory), and jobs on a "second node" — a second
//! store directory — that read their inputs from the remote alone.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::util::{outputs, TestContext};

/// A SeaweedFS `weed mini` for one test, killed when dropped.
pub struct S3Server {
    pidfile: PathBuf,
    pub endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new("bash")
            .arg(root.join("scripts/seaweedfs.sh"))
            .arg("stop")
            .arg(&self.pidfile)
            .status();
    }
}

/// Ten ports in a row (base+0..4 and base+10..14) that are free now.
fn free_port_block() -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    let mut x = seed;
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let base = 20_000 + ((x >> 33) % 2_000) as u16 * 16;
        let all_free = (0..5)
            .chain(10..15)
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free block of loopback ports for SeaweedFS");
}

pub fn s3_server(scratch: &Path) -> S3Server {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = free_port_block();
    let dir = scratch.join(format!("seaweedfs-{base}"));
    let pidfile = scratch.join(format!("seaweedfs-{base}.pid"));
    let status = Command::new("bash")
        .arg(root.join("scripts/seaweedfs.sh"))
        .arg("start")
        .arg(&dir)
        .arg(base.to_string())
        .arg(&pidfile)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "SeaweedFS did not start (scripts/seaweedfs.sh)"
    );
    S3Server {
        pidfile,
        endpoint: format!("http://127.0.0.1:{}", base + 3),
    }
}

/// `fuselab` with the S3 gateway's endpoint and credentials in the usual AWS variables.
fn with_s3(mut c: Command, s3: &S3Server) -> Command {
    c.env("AWS_ENDPOINT_URL", &s3.endpoint)
        .env("AWS_ACCESS_KEY_ID", "fuselab")
        .env("AWS_SECRET_ACCESS_KEY", "fuselab-secret")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_PROFILE");
    c
}

/// Another store in the same project.
fn beside(t: &TestContext, store: &Path) -> TestContext {
    TestContext {
        dir: tempfile::tempdir().unwrap(),
        project: t.project.clone(),
        store: store.to_path_buf(),
    }
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run_fails(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "{c:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

/// Every record file under a store directory, by relative path, with its bytes.
fn records(store: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["runs", "keys", "invocations", "refs"] {
        let mut stack = vec![store.join(dir)];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(store).unwrap().display().to_string();
                    out.push((rel, fs::read(&p).unwrap()));
                }
            }
        }
    }
    out.sort();
    out
}

fn objects(store: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for fan in fs::read_dir(store.join("objects")).unwrap() {
        let fan = fan.unwrap();
        for o in fs::read_dir(fan.path()).unwrap() {
            out.push(format!(
                "{}{}",
                fan.file_name().to_string_lossy(),
                o.unwrap().file_name().to_string_lossy()
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn push_then_pull_into_an_empty_store_reproduces_every_object_and_record_and_refuses_a_corrupt_one()
{
    let t = TestContext::new();
    let s3 = s3_server(t.dir.path());
    let report = t.run_hello(&[]);
    // One object big enough for a multipart upload (threshold 8 MiB, 5 MiB parts).
    let big = t.dir.path().join("big.bin");
    let mut bytes = vec![0u8; 13 << 20];
    let mut x = 7u64;
    for b in bytes.iter_mut() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        *b = (x >> 56) as u8;
    }
    fs::write(&big, &bytes).unwrap();
    t.ok(&["store", "add", big.to_str().unwrap(), "--pin", "big"]);
    let shared = t.dir.path().join("shared-fs");
    let remotes = [
        "s3://fuselab/round-trip".to_string(),
        shared.display().to_string(),
    ];
    let summary = outputs(&report)["summary"].clone();
    for remote in &remotes {
        let push = |args: &[&str]| {
            let mut c = t.cmd(&[
                "push",
                remote,
                "--multipart-threshold-mib",
                "8",
                "--part-size-mib",
                "5",
                "--json",
            ]);
            c.args(args);
            serde_json::from_str::<Value>(&run_ok(with_s3(c, &s3))).unwrap()
        };
        let first = push(&[]);
        assert_eq!(
            first["objects_sent"],
            objects(&t.store).len(),
            "{remote}: {first}"
        );
        assert_eq!(first["multipart_uploads"], 1, "{remote}: {first}");
        let again = push(&[]);
        assert_eq!(
            again["objects_sent"], 0,
            "{remote}: a second push sends nothing: {again}"
        );
        assert_eq!(again["records"], 0, "{remote}: {again}");

        let other = t.dir.path().join(format!("pulled-{}", remote.len()));
        let o = beside(&t, &other);
        let pulled: Value =
            serde_json::from_str(&run_ok(with_s3(o.cmd(&["pull", remote, "--json"]), &s3)))
                .unwrap();
        assert_eq!(
            pulled["objects_received"],
            objects(&t.store).len(),
            "{pulled}"
        );
        assert_eq!(objects(&other), objects(&t.store), "{remote}");
        assert_eq!(
            records(&other),
            records(&t.store),
            "{remote}: records differ"
        );
        let fsck = o.json(&["fsck"]);
        assert_eq!(fsck["clean"], true, "{remote}: {fsck:#}");
        assert_eq!(
            o.ok(&["lineage", &summary]),
            t.ok(&["lineage", &summary]),
            "{remote}: lineage differs"
        );
        // The pulled store answers for the experiment: nothing re-executes.
        let rerun = o.run_hello(&[]);
        assert_eq!(outputs(&rerun), outputs(&report));
        assert!(
            crate::util::steps_with(&rerun, "ran").is_empty(),
            "{rerun:#}"
        );
    }

    // Corrupt one object on the S3 remote (a signed PUT over it, as a bad copy or bit rot would).
    let victim = outputs(&report)["words"].clone();
    let rel = format!("round-trip/objects/{}/{}", &victim[..2], &victim[2..]);
    let junk = t.dir.path().join("junk");
    fs::write(&junk, "not the words\n").unwrap();
    let put = Command::new("curl")
        .args([
            "-sf",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            "fuselab:fuselab-secret",
            "-T",
        ])
        .arg(&junk)
        .arg(format!("{}/fuselab/{rel}", s3.endpoint))
        .status()
        .unwrap();
    assert!(put.success(), "curl could not overwrite the remote object");
    let fresh = t.dir.path().join("pulled-after-corruption");
    let c = beside(&t, &fresh).cmd(&["pull", "s3://fuselab/round-trip"]);
    let err = run_fails(with_s3(c, &s3));
    assert!(
        err.contains(&format!("remote object {victim} is corrupt")),
        "{err}"
    );
    assert!(
        err.contains("it was not installed") && err.contains("no record was pulled"),
        "{err}"
    );
    assert!(
        !objects(&fresh).contains(&victim),
        "the corrupt object was installed"
    );
    assert!(
        records(&fresh).is_empty(),
        "records were pulled beside a refused object"
    );

    // Wrong credentials are the service's refusal, named with the URL.
    let mut c = with_s3(t.cmd(&["pull", "s3://fuselab/round-trip"]), &s3);
    c.env("AWS_SECRET_ACCESS_KEY", "wrong");
    let err = run_fails(c);
    assert!(
        err.contains("s3://fuselab/round-trip/objects") && err.contains("403"),
        "{err}"
    );
    let err = t.fails(&["push", "s3://No_Such/x"]);
    assert!(err.contains("is not a remote"), "{err}");
}

#[test]
fn a_job_on_a_second_node_reads_its_inputs_from_s3_alone_and_its_result_comes_back() {
    let t = TestContext::new();
    let s3 = s3_server(t.dir.path());
    let remote = "s3://fuselab/jobs";
    let full = t.run_hello(&[]);
    let expected = outputs(&full);

    // The driver: a fresh store with `corpus` and `words` done and the spec of `counts` written.
    let driver = TestContext::new();
    driver.ok(&["run", "hello", "--set", "corpus=corpus", "--until", "words"]);
    let plan = driver.json(&["plan", "hello", "--set", "corpus=corpus", "--write-specs"]);
    let counts = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["step"] == "counts")
        .unwrap();
    let key = counts["key"].as_str().unwrap().to_string();
    run_ok(with_s3(driver.cmd(&["push", remote]), &s3));

    // The node: an empty store elsewhere, no project corpus; only the remote.
    let node = tempfile::tempdir().unwrap();
    let node_store = node.path().join("node-store");
    let mut c = Command::new(crate::util::BIN);
    c.arg("--store")
        .arg(&node_store)
        .args(["exec-step", &key, "--remote", remote])
        .current_dir(node.path());
    let reply: Value = serde_json::from_str(&run_ok(with_s3(c, &s3))).unwrap();
    assert_eq!(reply["status"], "ran", "{reply}");
    assert_eq!(reply["outputs"]["digest"], expected["counts"].as_str());
    let short = &key[..16];
    let err = driver.fails(&["exec-step", short, "--remote", remote]);
    assert!(err.contains("needs the full 64-digit key"), "{err}");

    // Back on the driver: the result arrives by pull with its run record, and the run uses it.
    run_ok(with_s3(driver.cmd(&["pull", remote]), &s3));
    let report = driver.run_hello(&[]);
    let step = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "counts")
        .unwrap();
    assert_eq!(step["status"], "cached", "{report:#}");
    assert_eq!(step["run_id"], reply["run_id"]);
    assert_eq!(outputs(&report), expected);
    let rec = driver.json(&["show", reply["run_id"].as_str().unwrap()]);
    assert_eq!(rec["host"].as_str(), Some(fuselab::fs::hostname().as_str()));

    // A second node asked for the same key finds it done on the remote and runs nothing.
    let node2 = tempfile::tempdir().unwrap();
    let mut c = Command::new(crate::util::BIN);
    c.arg("--store")
        .arg(node2.path().join("s"))
        .args(["exec-step", &key, "--remote", remote])
        .current_dir(node2.path());
    let again: Value = serde_json::from_str(&run_ok(with_s3(c, &s3))).unwrap();
    assert_eq!(again["status"], "cached", "{again}");
    assert_eq!(again["run_id"], reply["run_id"]);
}

/// A private single-node Slurm (scripts/slurm.sh) for one test, stopped when dropped.
pub struct Slurm {
    pub dir: PathBuf,
    pub conf: PathBuf,
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new("bash")
            .arg(root.join("scripts/slurm.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

pub fn slurm(scratch: &Path) -> Slurm {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = free_port_block();
    let dir = scratch.join(format!("slurm-{base}"));
    let status = Command::new("bash")
        .arg(root.join("scripts/slurm.sh"))
        .arg("start")
        .arg(&dir)
        .arg(base.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "Slurm did not start (scripts/slurm.sh)");
    Slurm {
        conf: dir.join("slurm.conf"),
        dir,
    }
}

impl Slurm {
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// (job name, state) of every job this cluster has finished, from `sacct` (the job-completion
    /// log: this test cluster has no slurmdbd), plus those still queued or running.
    fn jobs(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let done = run_ok({
            let mut c = self.cmd("sacct");
            c.args(["--completion", "-n", "-P", "-o", "JobName,State"]);
            c
        });
        let live = run_ok({
            let mut c = self.cmd("squeue");
            c.args(["-h", "-o", "%j|%T"]);
            c
        });
        for line in done.lines().chain(live.lines()) {
            if let Some((name, state)) = line.split_once('|') {
                out.push((name.to_string(), state.to_string()));
            }
        }
        out
    }
}

fn slurm_run(t: &TestContext, cluster: &Slurm, args: &[&str]) -> Command {
    let mut c = t.cmd(&["run"]);
    c.args(args)
        .args(["--executor", "slurm", "--poll", "0.2", "--json"])
        .env("SLURM_CONF", &cluster.conf);
    c
}

#[test]
fn fusechat_micro_through_slurm_matches_in_process_and_a_killed_driver_resumes_without_resubmitting(
) {
    let reference = TestContext::new();
    let expected = outputs(&reference.json(&["run", "fusechat-micro"]));

    let t = TestContext::new();
    let cluster = slurm(t.dir.path());
    // Start the driver, let it submit and some jobs finish, then kill -9 it.
    let mut driver = slurm_run(
        &t,
        &cluster,
        &["fusechat-micro", "--set", "slurm.sft.gpus=1"],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let finished = cluster
            .jobs()
            .iter()
            .filter(|(_, s)| s == "COMPLETED")
            .count();
        if finished >= 6 {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 120,
            "no Slurm job finished within 120 s"
        );
        assert!(
            driver.try_wait().unwrap().is_none(),
            "the driver ended before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    driver.kill().unwrap();
    driver.wait().unwrap();
    let before = cluster.jobs();
    assert!(
        before.iter().any(|(_, s)| s != "COMPLETED"),
        "every job had finished before the kill; the test proves nothing: {before:?}"
    );

    // The restarted driver re-attaches and finishes.
    let out = slurm_run(
        &t,
        &cluster,
        &["fusechat-micro", "--set", "slurm.sft.gpus=1"],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        outputs(&report),
        expected,
        "Slurm digests differ from the in-process run"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("attach"), "{log}");

    // Exactly one job per executed step, none resubmitted (sacct counts them).
    let jobs = cluster.jobs();
    let mut names: Vec<&String> = jobs.iter().map(|(n, _)| n).collect();
    names.sort();
    let unique = names.len();
    names.dedup();
    assert_eq!(unique, names.len(), "a step was submitted twice: {jobs:?}");
    let steps = reference
        .run_records()
        .iter()
        .filter(|r| r["executor"] != "source")
        .count();
    assert_eq!(jobs.len(), steps, "{jobs:?}");
    assert!(jobs.iter().all(|(_, s)| s == "COMPLETED"), "{jobs:?}");

    // Job id, node and exit state are recorded.
    let recs = t.run_records();
    let slurm_recs: Vec<&Value> = recs.iter().filter(|r| r["executor"] == "slurm").collect();
    assert_eq!(slurm_recs.len(), steps);
    assert!(slurm_recs
        .iter()
        .all(|r| r["job"]["id"].is_string() && r["job"]["node"].is_string()));
    let ran: Vec<&Value> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "ran")
        .collect();
    assert!(!ran.is_empty());
    assert!(
        ran.iter()
            .all(|s| s["job"]["state"] == "COMPLETED" && s["job"]["exit_code"] == "0:0"),
        "{ran:?}"
    );

    // The SFT job asked for one of the node's two (fake) GPUs through gres.
    let sbatch = fs::read_dir(t.store.join("slurm"))
        .unwrap()
        .map(|e| e.unwrap().path().join("sft.sbatch"))
        .find(|p| p.is_file())
        .unwrap();
    let script = fs::read_to_string(sbatch).unwrap();
    assert!(script.contains("#SBATCH --gres=gpu:1"), "{script}");
    assert!(script.contains(" exec-node "), "{script}");

    // A rerun submits nothing.
    let again: Value = serde_json::from_str(&run_ok(slurm_run(
        &t,
        &cluster,
        &["fusechat-micro", "--set", "slurm.sft.gpus=1"],
    )))
    .unwrap();
    assert!(crate::util::steps_with(&again, "ran").is_empty());
    assert_eq!(cluster.jobs().len(), steps);
}

#[test]
fn a_failed_slurm_job_fails_its_descendants_with_its_log_and_cancel_stops_the_jobs() {
    let t = TestContext::new();
    let cluster = slurm(t.dir.path());
    let empty = t.project.join("empty");
    fs::create_dir_all(&empty).unwrap();
    fs::write(empty.join("notes.md"), "no text files here\n").unwrap();
    let out = slurm_run(&t, &cluster, &["hello", "--set", "corpus=empty"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no .txt files in the corpus"),
        "the job's log tail is missing: {err}"
    );
    assert!(err.contains("ended FAILED"), "{err}");
    let _ = report;
    let jobs = cluster.jobs();
    let cancelled = jobs.iter().filter(|(_, s)| s == "CANCELLED").count();
    assert!(cancelled >= 3, "descendants were not cancelled: {jobs:?}");

    // Per-step resources reach sbatch, and an unknown field is refused before anything is submitted.
    let err = t.fails(&[
        "run",
        "hello",
        "--set",
        "corpus=corpus",
        "--executor",
        "slurm",
        "--set",
        "slurm.words.colour=red",
    ]);
    assert!(err.contains("slurm.words.colour"), "{err}");

    // More GPUs than the node has: sbatch refuses, and the error says so.
    let out = slurm_run(
        &t,
        &cluster,
        &[
            "hello",
            "--set",
            "corpus=corpus",
            "--set",
            "slurm.words.gpus=3",
        ],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sbatch"), "{err}");
    assert!(
        err.to_lowercase().contains("node configuration") || err.contains("gres"),
        "{err}"
    );

    // cancel: a slow run is submitted, its driver dies, `fuselab cancel` stops its jobs.
    let mut driver = slurm_run(
        &t,
        &cluster,
        &[
            "hello",
            "--set",
            "corpus=corpus",
            "--set",
            "delay_ms=60000",
            "--set",
            "slurm.default.mem_mb=200",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let inv_dir = t.store.join("slurm/invocations");
    let earlier: Vec<PathBuf> = fs::read_dir(&inv_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let t0 = std::time::Instant::now();
    let inv = loop {
        let found = fs::read_dir(&inv_dir).ok().and_then(|rd| {
            rd.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                !earlier.contains(p)
                    && fs::read(p)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
                        .is_some_and(|v| v.len() == 4)
            })
        });
        if let Some(p) = found {
            break p.file_stem().unwrap().to_string_lossy().into_owned();
        }
        assert!(t0.elapsed().as_secs() < 60, "the driver did not submit");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    driver.kill().unwrap();
    driver.wait().unwrap();
    let live = |c: &Slurm| {
        run_ok({
            let mut q = c.cmd("squeue");
            q.args(["-h", "-o", "%i"]);
            q
        })
    };
    assert!(
        !live(&cluster).trim().is_empty(),
        "the jobs should outlive the killed driver"
    );
    let said = run_ok({
        let mut c = t.cmd(&["cancel", &inv]);
        c.env("SLURM_CONF", &cluster.conf);
        c
    });
    assert!(said.contains("cancelled 4 job(s)"), "{said}");
    let t0 = std::time::Instant::now();
    while !live(&cluster).trim().is_empty() {
        assert!(
            t0.elapsed().as_secs() < 30,
            "jobs still queued after cancel"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `accelerate` of the project's TRL venv (scripts/trl-venv.sh installs it when missing).
pub fn trl_accelerate() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/trl-venv.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the TRL venv could not be installed (scripts/trl-venv.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn metrics_losses(store: &Path, digest: &str) -> Vec<f64> {
    let t = TestContext {
        dir: tempfile::tempdir().unwrap(),
        project: store.to_path_buf(),
        store: store.to_path_buf(),
    };
    let dest = t.dir.path().join("out");
    t.ok(&["store", "checkout", digest, dest.to_str().unwrap()]);
    fs::read_to_string(dest.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn the_trl_dpo_step_enters_the_store_with_lineage_and_matches_our_trainer_step_by_step() {
    let accelerate = trl_accelerate();
    let t = TestContext::new();
    // One batch holds every pair, so both trainers see the same rows at every step whatever
    // order they shuffle in; no warm-up, so the first update moves the policy.
    let base = format!(
        "base_model={}/tests/fixtures/hf/llama",
        env!("CARGO_MANIFEST_DIR")
    );
    let same = [
        "--set",
        &base,
        "--set",
        "dpo.train.batch_size=16",
        "--set",
        "dpo.train.grad_accum=1",
        "--set",
        "dpo.train.warmup_ratio=0",
        "--set",
        "dpo.train.epochs=3",
    ];
    let ours = t.json(&[&["run", "sft-dpo-demo"][..], &same[..]].concat());
    let mut c = t.cmd(
        &[
            &["run", "sft-dpo-demo", "--set", "dpo.engine=trl", "--json"][..],
            &same[..],
        ]
        .concat(),
    );
    c.env("FUSELAB_ACCELERATE", &accelerate);
    let trl: Value = serde_json::from_str(&run_ok(c)).unwrap();
    let (a, b) = (outputs(&ours), outputs(&trl));
    assert_eq!(
        a["sft"], b["sft"],
        "both DPO runs start from the same SFT checkpoint"
    );
    assert_ne!(a["dpo"], b["dpo"]);
    let (la, lb) = (
        metrics_losses(&t.store, &a["dpo"]),
        metrics_losses(&t.store, &b["dpo"]),
    );
    assert_eq!(la.len(), 3);
    assert_eq!(lb.len(), 3, "{lb:?}");
    for (i, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!((x - y).abs() < 1e-4, "step {}: ours {x} vs TRL {y}", i + 1);
    }
    assert!(
        (la[2] - la[0]).abs() > 0.1,
        "training moved the loss: {la:?}"
    );

    // The TRL checkpoint is an artifact like any other: lineage back to the data and the SFT model,
    // the launch files beside it, and our eval step loads it.
    let lineage = t.ok(&["lineage", &b["dpo"]]);
    assert!(
        lineage.contains("sft-dpo-demo/sft") && lineage.contains("sft-dpo-demo/data"),
        "{lineage}"
    );
    let show = t.ok(&["show", &b["dpo"]]);
    for f in [
        "model.safetensors",
        "config.json",
        "engine.json",
        "launch/accelerate.yaml",
        "launch/train.py",
    ] {
        assert!(
            show.contains(f),
            "{f} missing from the TRL step's outputs:\n{show}"
        );
    }
    assert!(!show.contains("training_args.bin"), "{show}");
    let eval = trl["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "eval")
        .unwrap();
    assert_eq!(eval["status"], "ran");

    // A launcher that cannot start is named, with what to set.
    let mut c = t.cmd(
        &[
            &[
                "run",
                "sft-dpo-demo",
                "--set",
                "dpo.engine=trl",
                "--set",
                "dpo.beta=0.2",
            ][..],
            &same[..],
        ]
        .concat(),
    );
    c.env("FUSELAB_ACCELERATE", "/nonexistent/accelerate");
    let err = run_fails(c);
    assert!(err.contains("FUSELAB_ACCELERATE"), "{err}");
}
