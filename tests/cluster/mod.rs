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
