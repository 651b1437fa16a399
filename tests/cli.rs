//! The one integration-test binary: drives the real `fuselab` CLI (and, where a test needs code the
//! CLI cannot change, the library's recipe API) on temporary projects and stores.

mod annotate;
mod cluster;
mod data;
mod eval;
mod fusion;
mod hardening;
mod scale;
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use util::{outputs, steps_with, Lcg, TestContext};

const ALL: [&str; 5] = ["corpus", "words", "counts", "lengths", "summary"];

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn rerun_is_a_noop_and_a_parameter_reexecutes_exactly_its_descendants() {
    let t = TestContext::new();
    let first = t.run_hello(&[]);
    assert_eq!(
        sorted(steps_with(&first, "ran")),
        sorted(ALL.map(String::from).to_vec())
    );

    let again = t.run_hello(&[]);
    assert!(steps_with(&again, "ran").is_empty(), "{again:#}");
    assert_eq!(outputs(&again), outputs(&first));

    let cases: [(&str, &[&str]); 3] = [
        ("min_len=4", &["counts", "summary"]),
        ("top_k=3", &["summary"]),
        (
            "lowercase=false",
            &["words", "counts", "lengths", "summary"],
        ),
    ];
    for (set, expected) in cases {
        let r = t.run_hello(&["--set", set]);
        assert_eq!(
            sorted(steps_with(&r, "ran")),
            sorted(expected.iter().map(|s| s.to_string()).collect()),
            "--set {set}"
        );
        // Running the same configuration again is a no-op too.
        let r2 = t.run_hello(&["--set", set]);
        assert!(steps_with(&r2, "ran").is_empty(), "--set {set} twice");
    }
    // Back to defaults: everything is still cached.
    assert!(steps_with(&t.run_hello(&[]), "ran").is_empty());

    // Editing a raw input re-executes everything downstream of it.
    fs::write(t.project.join("corpus/extra.txt"), "one more file of words").unwrap();
    let r = t.run_hello(&[]);
    assert_eq!(
        sorted(steps_with(&r, "ran")),
        sorted(ALL.map(String::from).to_vec())
    );
}

#[test]
fn force_and_until_select_steps() {
    let t = TestContext::new();
    let r = t.run_hello(&["--until", "counts"]);
    assert_eq!(sorted(steps_with(&r, "ran")), ["corpus", "counts", "words"]);
    assert_eq!(r["steps"].as_array().unwrap().len(), 3);
    let r = t.run_hello(&["--force", "words"]);
    // words re-executes; its outputs are identical, so only the never-run steps execute after it.
    assert_eq!(
        sorted(steps_with(&r, "ran")),
        ["lengths", "summary", "words"]
    );
    assert_eq!(
        t.run_records()
            .iter()
            .filter(|r| r["step"] == "words")
            .count(),
        2
    );
}

mod code_version {
    //! A step's code version is part of its key. The CLI cannot edit code, so this test declares the
    //! "same" experiment twice through the library, once with a bumped version.
    use fuselab::recipe::{self, step, Experiment, ExperimentDef, StepStatus};
    use fuselab::store::Store;
    use serde::{Deserialize, Serialize};

    #[derive(Default, Serialize, Deserialize)]
    struct P {
        n: u32,
    }

    /// `version_b` stands for the code of step `b`: version 2 writes a different output (a real code
    /// change); version 3 is a refactor that writes the same bytes as version 2.
    fn build(exp: &mut Experiment, p: &P, version_b: u32) -> recipe::Result<()> {
        let a = exp.step("a", &p.n, &[], |ctx| {
            std::fs::write(ctx.out("a.txt")?, format!("{}", ctx.params::<u32>()?))?;
            Ok(())
        })?;
        let b = exp.step(step("b").version(version_b), &(), &[a], move |ctx| {
            let a = std::fs::read_to_string(ctx.input("a")?.join("a.txt"))?;
            let text = if version_b == 1 {
                format!("b({a})")
            } else {
                format!("b2({a})")
            };
            std::fs::write(ctx.out("b.txt")?, text)?;
            Ok(())
        })?;
        let c = exp.step("c", &(), &[b], |ctx| {
            let b = std::fs::read_to_string(ctx.input("b")?.join("b.txt"))?;
            std::fs::write(ctx.out("c.txt")?, format!("c({b})"))?;
            Ok(())
        })?;
        exp.step("d", &(), &[a], |ctx| {
            let a = std::fs::read_to_string(ctx.input("a")?.join("a.txt"))?;
            std::fs::write(ctx.out("d.txt")?, a)?;
            Ok(())
        })?;
        let _ = c;
        Ok(())
    }

    fn ran(store: &Store, def: &ExperimentDef) -> Vec<String> {
        let exp = def.instantiate(def.defaults()).unwrap();
        let opts = crate::util::quiet_options(2, std::env::temp_dir());
        let r = recipe::run(store, &exp, &opts).unwrap();
        assert!(r.failure.is_none());
        let mut v: Vec<String> = r
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Ran)
            .map(|s| s.step.clone())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn editing_a_steps_code_version_reexecutes_it_and_its_descendants() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("artifacts")).unwrap();
        let v1 = ExperimentDef::new("versions", "", |e, p: &P| build(e, p, 1));
        let v2 = ExperimentDef::new("versions", "", |e, p: &P| build(e, p, 2));
        let v3 = ExperimentDef::new("versions", "", |e, p: &P| build(e, p, 3));
        assert_eq!(ran(&store, &v1), ["a", "b", "c", "d"]);
        assert!(ran(&store, &v1).is_empty());
        assert_eq!(ran(&store, &v2), ["b", "c"]);
        assert!(ran(&store, &v2).is_empty());
        // Going back to version 1 finds its outputs still cached.
        assert!(ran(&store, &v1).is_empty());
        // Keys follow input *content*: a version bump that reproduces the same bytes re-executes the
        // step, and its descendants are reused (early cutoff).
        assert_eq!(ran(&store, &v3), ["b"]);
    }
}

#[test]
fn kill_dash_nine_at_random_points_never_corrupts_the_store() {
    // The reference: one uninterrupted run in its own store.
    let reference = TestContext::new();
    let slow = ["--set", "delay_ms=60"];
    let expected = outputs(&reference.run_hello(&slow));

    let t = TestContext::new();
    let mut rng = Lcg(0x5eed);
    let steps = ["words", "counts", "lengths", "summary"];
    let mut killed_mid_run = 0;
    for i in 0..24 {
        let mut args = vec![
            "run".to_string(),
            "hello".into(),
            "--set".into(),
            "corpus=corpus".into(),
            "--set".into(),
            "delay_ms=60".into(),
        ];
        // Forcing steps keeps work in flight even once everything is cached.
        for s in steps {
            args.push("--force".into());
            args.push(s.into());
        }
        if i % 2 == 0 {
            args.push("--jobs".into());
            args.push("1".into());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = t
            .cmd(&argv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(170)));
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
    }
    assert!(
        killed_mid_run >= 20,
        "only {killed_mid_run} kills landed mid-run"
    );

    let fsck_before = t.output(&["fsck"]);
    assert!(
        fsck_before.status.success(),
        "fsck after crashes: {}",
        String::from_utf8_lossy(&fsck_before.stdout)
    );
    let finished = t.run_hello(&slow);
    assert_eq!(outputs(&finished), expected);
    let fsck = t.json(&["fsck"]);
    assert_eq!(fsck["clean"], true, "{fsck:#}");
    // No record claims success for outputs that are not there.
    for r in t.run_records() {
        if r["status"] == "succeeded" {
            let d = r["outputs"]["digest"].as_str().unwrap();
            assert!(t
                .store
                .join("objects")
                .join(&d[..2])
                .join(&d[2..])
                .is_file());
        }
    }
    // And gc leaves a clean, smaller-or-equal store that still runs as a no-op.
    t.ok(&["gc"]);
    let fsck = t.json(&["fsck"]);
    assert_eq!(fsck["clean"], true);
    assert!(fsck["report"]["orphaned"].as_array().unwrap().is_empty());
    assert!(steps_with(&t.run_hello(&slow), "ran").is_empty());
}

#[test]
fn concurrent_runs_both_succeed_and_each_step_runs_once() {
    let t = TestContext::new();
    for round in 0..3 {
        let set = format!("min_len={}", round + 2);
        let args = [
            "run",
            "hello",
            "--set",
            "corpus=corpus",
            "--set",
            "delay_ms=80",
            "--set",
            &set,
            "--json",
        ];
        let a = t
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let b = t
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
        assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
        let ra: Value = serde_json::from_slice(&a.stdout).unwrap();
        let rb: Value = serde_json::from_slice(&b.stdout).unwrap();
        assert_eq!(outputs(&ra), outputs(&rb));
        let ran_a: BTreeSet<String> = steps_with(&ra, "ran").into_iter().collect();
        let ran_b: BTreeSet<String> = steps_with(&rb, "ran").into_iter().collect();
        assert!(
            ran_a.is_disjoint(&ran_b),
            "round {round}: both ran {:?}",
            ran_a.intersection(&ran_b).collect::<Vec<_>>()
        );
    }
    // Each key was executed exactly once over all rounds.
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for r in t.run_records() {
        assert_eq!(r["status"], "succeeded");
        *per_key
            .entry(r["key"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(per_key.values().all(|&n| n == 1), "{per_key:?}");
    // corpus + words + lengths once; counts + summary once per round.
    assert_eq!(per_key.len(), 3 + 2 * 3);
}

#[test]
fn lineage_answers_both_directions() {
    let t = TestContext::new();
    let r = t.run_hello(&[]);
    let out = outputs(&r);
    let summary = &out["summary"];
    let corpus = &out["corpus"];

    let up = t.json_lineage(&[summary, "--format", "json"]);
    assert_eq!(up["direction"], "up");
    let steps: BTreeSet<&str> = up["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ALL.into_iter().collect());
    let raw: Vec<&Value> = up["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| !a["raw_input"].is_null())
        .collect();
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0]["raw_input"], "corpus");
    assert_eq!(raw[0]["digest"], corpus.as_str());
    let summary_run = up["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["step"] == "summary")
        .unwrap();
    assert_eq!(summary_run["params"]["top_k"], 10);
    assert_eq!(
        up["edges"].as_array().unwrap().len(),
        5,
        "corpus->words, words->counts, words->lengths, counts->summary, lengths->summary"
    );

    let down = t.json_lineage(&[corpus, "--reverse", "--format", "json"]);
    assert_eq!(down["direction"], "down");
    let reached: BTreeSet<&str> = down["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["digest"].as_str().unwrap())
        .collect();
    for s in ["words", "counts", "lengths", "summary"] {
        assert!(
            reached.contains(out[s].as_str()),
            "{s} not downstream of corpus"
        );
    }

    // A second configuration shares upstream artifacts: reverse lineage finds both summaries.
    let r2 = t.run_hello(&["--set", "top_k=2"]);
    let down = t.json_lineage(&[&out["counts"], "--reverse", "--format", "json"]);
    let reached: BTreeSet<&str> = down["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["digest"].as_str().unwrap())
        .collect();
    assert!(
        reached.contains(summary.as_str()) && reached.contains(outputs(&r2)["summary"].as_str())
    );

    let text = t.ok(&["lineage", &summary[..10]]);
    assert!(
        text.contains("hello/summary") && text.contains("raw input `corpus`"),
        "{text}"
    );
    let dot = t.ok(&["lineage", summary, "--format", "dot"]);
    assert!(dot.starts_with("digraph lineage"));
    let err = t.fails(&["lineage", "0000000000"]);
    assert!(err.contains("0000000000"), "{err}");
}

impl TestContext {
    fn json_lineage(&self, args: &[&str]) -> Value {
        let mut a = vec!["lineage"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
}

#[test]
fn process_executor_and_exec_step_match_in_process_results() {
    let reference = TestContext::new();
    let expected = outputs(&reference.run_hello(&[]));

    let t = TestContext::new();
    let r = t.run_hello(&["--executor", "process"]);
    assert_eq!(outputs(&r), expected);
    assert_eq!(
        sorted(steps_with(&r, "ran")),
        sorted(ALL.map(String::from).to_vec())
    );
    assert!(t
        .run_records()
        .iter()
        .filter(|r| r["step"] != "corpus")
        .all(|r| r["executor"] == "process"));

    // plan --write-specs, then run one step by key, as a cluster node would.
    let t2 = TestContext::new();
    t2.ok(&["run", "hello", "--set", "corpus=corpus", "--until", "words"]);
    let plan = t2.json(&["plan", "hello", "--set", "corpus=corpus", "--write-specs"]);
    let counts = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["step"] == "counts")
        .unwrap();
    assert_eq!(counts["status"], "run");
    let key = counts["key"].as_str().unwrap();
    let reply: Value = serde_json::from_str(&t2.ok(&["exec-step", &key[..16]])).unwrap();
    assert_eq!(reply["status"], "ran");
    assert_eq!(reply["outputs"]["digest"], expected["counts"].as_str());
    let again: Value = serde_json::from_str(&t2.ok(&["exec-step", key])).unwrap();
    assert_eq!(again["status"], "cached");
    let err = t2.fails(&["exec-step", "abcdef"]);
    assert!(err.contains("no step spec for key abcdef"), "{err}");
}

#[test]
fn verify_reexecutes_and_detects_differences() {
    let t = TestContext::new();
    let r = t.run_hello(&[]);
    let v = t.json(&["verify", "hello", "--set", "corpus=corpus"]);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] == "identical"),
        "{v:#}"
    );

    // Make the cache claim that `counts` produced something else, as a non-deterministic step would.
    let counts_key = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "counts")
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let entry_path = t.store.join("keys").join(format!("{counts_key}.json"));
    let mut entry: Value = serde_json::from_slice(&fs::read(&entry_path).unwrap()).unwrap();
    entry["outputs"] = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "lengths")
        .unwrap()["outputs"]
        .clone();
    fs::write(&entry_path, serde_json::to_vec(&entry).unwrap()).unwrap();
    let out = t.output(&["verify", "hello", "--set", "corpus=corpus"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DIFFERS           counts"), "{text}");
}

#[test]
fn plan_list_show_and_diff() {
    let t = TestContext::new();
    let plan = t.json(&["plan", "hello", "--set", "corpus=corpus"]);
    let statuses: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["run", "run", "pending", "pending", "pending"]);
    let a = t.run_hello(&[]);
    let plan = t.json(&["plan", "hello", "--set", "corpus=corpus"]);
    assert!(plan
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["status"] == "cached"));
    let plan = t.json(&[
        "plan",
        "hello",
        "--set",
        "corpus=corpus",
        "--set",
        "top_k=1",
    ]);
    let statuses: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["cached", "cached", "cached", "cached", "run"]);

    let b = t.run_hello(&["--set", "min_len=5"]);
    let list = t.json(&["list"]);
    let names: Vec<&str> = list["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "fusechat-tiny", "the flagship is listed first");
    assert!(names.contains(&"hello"), "{names:?}");
    assert_eq!(list["recent_runs"].as_array().unwrap().len(), 2);

    let d = t.json(&[
        "diff",
        a["invocation"].as_str().unwrap(),
        b["invocation"].as_str().unwrap(),
    ]);
    let changed: BTreeSet<&str> = d["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert!(changed.contains("params.min_len"), "{d:#}");
    assert!(changed.contains("counts.outputs") && changed.contains("summary.outputs"));
    assert!(!changed.contains("words.outputs"));

    let run_id = a["steps"][4]["run_id"].as_str().unwrap();
    let shown = t.json(&["show", run_id]);
    assert_eq!(shown["step"], "summary");
    assert_eq!(shown["status"], "succeeded");
    assert_eq!(shown["tools"]["fuselab"], env!("CARGO_PKG_VERSION"));
    // The SIMD level that picked the numeric kernels, for bit-for-bit audits across machines: checked
    // against the kernel's own list of CPU flags, not against the function that produced it.
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo is readable");
    let flags: BTreeSet<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .expect("/proc/cpuinfo lists the CPU flags");
    let expected: Vec<&str> = ["avx512f", "avx2", "fma"]
        .into_iter()
        .filter(|f| flags.contains(f))
        .collect();
    assert_eq!(shown["tools"]["cpu_features"], expected.join(","));
    let text = t.ok(&["show", run_id]);
    assert!(text.contains("hello/summary"));
    let digest = a["steps"][4]["outputs"]["digest"].as_str().unwrap();
    let art = t.json(&["show", &digest[..12]]);
    assert_eq!(art["kind"], "tree");
    assert_eq!(art["entries"][0]["path"], "summary.md");
    let inv = t.ok(&["show", a["invocation"].as_str().unwrap()]);
    assert!(inv.contains("summary"));
}

#[test]
fn bad_input_gives_clear_errors_and_leaves_the_store_consistent() {
    let t = TestContext::new();
    let err = t.fails(&["run", "nope"]);
    assert!(
        err.contains("unknown experiment `nope`") && err.contains("hello"),
        "{err}"
    );
    for (args, needle) in [
        (vec!["--force", "wrods"], "no step `wrods`"),
        (vec!["--until", "wrods"], "no step `wrods`"),
        (vec!["--set", "min_len"], "expected key=value"),
        (vec!["--set", "min_lenn=3"], "unknown parameter `min_lenn`"),
        (
            vec!["--set", "min_len=three"],
            "--set min_len=three: expected a non-negative integer",
        ),
        (vec!["--set", "corpus=does/not/exist"], "does/not/exist"),
    ] {
        let mut a = vec!["run", "hello"];
        if !args.iter().any(|x| x.starts_with("corpus=")) {
            a.extend(["--set", "corpus=corpus"]);
        }
        a.extend(args.iter().copied());
        let err = t.fails(&a);
        assert!(err.contains(needle), "{a:?}: {err}");
    }
    // A step failure names the step and the file; nothing claims success.
    let empty = t.project.join("empty");
    fs::create_dir_all(&empty).unwrap();
    fs::write(empty.join("notes.md"), "not a txt file").unwrap();
    let err = t.fails(&["run", "hello", "--set", "corpus=empty"]);
    assert!(
        err.contains("step `words`") && err.contains("no .txt files"),
        "{err}"
    );
    let recs = t.run_records();
    assert!(recs
        .iter()
        .any(|r| r["step"] == "words" && r["status"] == "failed"));
    assert!(!recs
        .iter()
        .any(|r| r["step"] == "words" && r["status"] == "succeeded"));
    assert!(t.output(&["fsck"]).status.success());

    // A corrupted object: the step that reads it fails naming the object, and fsck reports it.
    let r = t.run_hello(&[]);
    let words = r["steps"][1]["outputs"]["digest"].as_str().unwrap();
    let tree: Value = serde_json::from_slice(
        &fs::read(t.store.join("objects").join(&words[..2]).join(&words[2..])).unwrap(),
    )
    .unwrap();
    let file = tree["entries"][0]["digest"].as_str().unwrap();
    let obj = t.store.join("objects").join(&file[..2]).join(&file[2..]);
    let mut perms = fs::metadata(&obj).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&obj, perms).unwrap();
    let mut bytes = fs::read(&obj).unwrap();
    bytes[0] ^= 1;
    fs::write(&obj, bytes).unwrap();
    let err = t.fails(&[
        "run",
        "hello",
        "--set",
        "corpus=corpus",
        "--force",
        "counts",
    ]);
    assert!(err.contains(&format!("object {file} is corrupt")), "{err}");
    let fsck = t.output(&["fsck"]);
    assert_eq!(fsck.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&fsck.stdout).contains(&format!("corrupt  {file}")));

    // A store written by a newer fuselab is refused by every command.
    let t2 = TestContext::new();
    t2.run_hello(&[]);
    fs::write(t2.store.join("FORMAT"), r#"{"store_format": 2}"#).unwrap();
    let err = t2.fails(&["run", "hello", "--set", "corpus=corpus"]);
    assert!(
        err.contains("FORMAT") && err.contains("store format 2"),
        "{err}"
    );
    let err = t2.fails(&["fsck"]);
    assert!(err.contains("newer fuselab"), "{err}");
}

mod panics {
    use fuselab::recipe::{self, records::Records, Experiment, ExperimentDef};
    use fuselab::store::Store;

    #[derive(Default, serde::Serialize, serde::Deserialize)]
    struct P {}

    fn build(exp: &mut Experiment, _: &P) -> recipe::Result<()> {
        let ok = exp.step("fine", &(), &[], |ctx| {
            std::fs::write(ctx.out("x")?, "x")?;
            Ok(())
        })?;
        exp.step("boom", &(), &[ok], |ctx| {
            std::fs::write(ctx.out("partial")?, "half")?;
            panic!("the body blew up");
        })?;
        Ok(())
    }

    #[test]
    fn a_panicking_step_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("artifacts")).unwrap();
        let def = ExperimentDef::new("panics", "", build);
        let exp = def.instantiate(def.defaults()).unwrap();
        let opts = crate::util::quiet_options(1, dir.path().to_path_buf());
        let r = recipe::run(&store, &exp, &opts).unwrap();
        let err = r.failure.expect("the panic is reported").to_string();
        assert!(
            err.contains("step `boom` panicked: the body blew up"),
            "{err}"
        );
        let records = Records::new(&store);
        let (runs, _) = records.runs().unwrap();
        let boom: Vec<_> = runs.iter().filter(|r| r.step == "boom").collect();
        assert_eq!(boom.len(), 1);
        assert_eq!(boom[0].status, recipe::records::RunStatus::Failed);
        assert!(boom[0].outputs.is_none());
        assert!(records.cache_get(&boom[0].key).unwrap().is_none());
        let roots = records.roots().unwrap();
        let fsck = store
            .fsck(&roots, &indicatif::ProgressBar::hidden())
            .unwrap();
        assert!(
            fsck.is_clean() && fsck.orphaned.is_empty() && fsck.temp_files == 0,
            "{fsck:?}"
        );
    }
}

/// A tmpfs too small for the corpus: writes fail with ENOSPC.
#[test]
fn a_full_disk_is_a_clear_error_and_leaves_the_store_consistent() {
    let t = TestContext::new();
    let mnt = t.dir.path().join("tiny");
    fs::create_dir_all(&mnt).unwrap();
    // 400 KiB of words: more than the disk holds.
    let line = "lorem ipsum dolor sit amet consectetur adipiscing elit\n".repeat(7500);
    fs::write(t.project.join("corpus/big.txt"), line).unwrap();
    let store = mnt.join("artifacts");
    // A 256 KiB tmpfs in a mount namespace of its own (unshare works for root and, with
    // --map-root-user, for anyone with user namespaces): nothing to clean up on the host, and a
    // machine where it cannot be made fails this test loudly instead of skipping it.
    let script = r#"mount -t tmpfs -o size=256k tmpfs "$1" || exit 97
cd "$2" || exit 98
"$3" --store "$1/artifacts" run hello --set corpus=corpus 2>"$1.run.err"; echo "RUN_EXIT=$?"
"$3" --store "$1/artifacts" fsck > "$1.fsck.out" 2>&1; echo "FSCK_EXIT=$?""#;
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--map-root-user", "sh", "-c", script, "sh"])
        .arg(&mnt)
        .arg(&t.project)
        .arg(util::BIN)
        .output()
        .expect("unshare(1) runs (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("RUN_EXIT="),
        "could not set up a private tmpfs (exit {}): {}{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("RUN_EXIT=0"),
        "the run must fail: {stdout}"
    );
    let err = fs::read_to_string(format!("{}.run.err", mnt.display())).unwrap();
    assert!(
        err.contains("No space left on device") && err.contains(&store.display().to_string()),
        "{err}"
    );
    let fsck = fs::read_to_string(format!("{}.fsck.out", mnt.display())).unwrap();
    assert!(stdout.contains("FSCK_EXIT=0"), "{stdout}\n{fsck}");
}

#[test]
fn store_add_pin_checkout_and_gc() {
    let t = TestContext::new();
    let file = t.project.join("corpus/fusion.txt");
    let added = t.json(&["store", "add", file.to_str().unwrap()]);
    let d = added["digest"].as_str().unwrap().to_string();
    let hashed = t.ok(&["store", "hash", file.to_str().unwrap()]);
    assert!(hashed.starts_with(&d));
    assert_eq!(
        t.ok(&["store", "cat", &d[..8]]),
        fs::read_to_string(&file).unwrap()
    );
    let dest = t.dir.path().join("checked-out.txt");
    t.ok(&[
        "store",
        "checkout",
        &d,
        dest.to_str().unwrap(),
        "--mode",
        "copy",
    ]);
    assert_eq!(fs::read(&dest).unwrap(), fs::read(&file).unwrap());

    // Unpinned and unreferenced: gc removes it (dry run first lists it).
    let dry = t.json(&["gc", "--dry-run"]);
    assert_eq!(dry["removed_objects"][0][0], d.as_str());
    assert!(t
        .store
        .join("objects")
        .join(&d[..2])
        .join(&d[2..])
        .is_file());
    t.ok(&["gc"]);
    assert!(!t
        .store
        .join("objects")
        .join(&d[..2])
        .join(&d[2..])
        .is_file());

    // Pinned: gc keeps it; run outputs are kept too.
    t.ok(&["store", "add", file.to_str().unwrap(), "--pin", "notes"]);
    let r = t.run_hello(&[]);
    let gc = t.json(&["gc"]);
    assert!(
        gc["removed_objects"].as_array().unwrap().is_empty(),
        "{gc:#}"
    );
    assert!(t
        .store
        .join("objects")
        .join(&d[..2])
        .join(&d[2..])
        .is_file());
    assert!(steps_with(&t.run_hello(&[]), "ran").is_empty());
    let _ = r;
}

mod model_cli {
    //! `fuselab model ...` on the transformers-made fixtures (tests/fixtures/hf).
    use super::*;

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/hf/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn expected(name: &str) -> Value {
        serde_json::from_str(
            &fs::read_to_string(format!("{}/expected.json", fixture(name))).unwrap(),
        )
        .unwrap()
    }

    fn join(ids: &[Value]) -> String {
        ids.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn inspect_logprobs_and_greedy_generate_match_the_reference() {
        let t = TestContext::new();
        for name in ["llama", "qwen2", "mistral", "gemma2"] {
            let info = t.json(&["model", "inspect", &fixture(name)]);
            assert_eq!(info["family"], name);
            assert_eq!(info["layers"], 2);
            assert!(info["parameters"].as_u64().unwrap() > 90_000);

            let exp = expected(name);
            let row = exp["input_ids"][0].as_array().unwrap();
            let lp = t.json(&[
                "model",
                "logprobs",
                "--model",
                &fixture(name),
                "--prompt-ids",
                &join(&row[..4]),
                "--completion-ids",
                &join(&row[4..]),
            ]);
            let want = &exp["logprobs"][0].as_array().unwrap()[3..];
            let got = lp["logprobs"].as_array().unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4,
                    "{name}"
                );
            }

            let prompt = exp["prompts"][1].as_array().unwrap();
            let g = t.json(&[
                "model",
                "generate",
                "--model",
                &fixture(name),
                "--prompt-ids",
                &join(prompt),
                "--max-new-tokens",
                "10",
            ]);
            // The fixture's eos (id 4) may stop us earlier than transformers, which ignored eos.
            let want: Vec<u64> = exp["greedy_new_tokens"][1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            let got: Vec<u64> = g["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            let stop = want.iter().position(|&x| x == 4).unwrap_or(want.len());
            assert_eq!(got, want[..stop], "{name}");
        }
    }

    #[test]
    fn render_and_template_errors() {
        let t = TestContext::new();
        let msgs = t.dir.path().join("m.json");
        fs::write(
            &msgs,
            r#"[{"role":"system","content":"S"},{"role":"user","content":"Hi"}]"#,
        )
        .unwrap();
        let out = t.ok(&[
            "model",
            "render",
            "--model",
            &fixture("qwen2"),
            "--messages",
            msgs.to_str().unwrap(),
            "--add-generation-prompt",
        ]);
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");

        // Gemma-2's real template refuses a system turn: the error names the template and line.
        let g = t.dir.path().join("gemma");
        fs::create_dir_all(&g).unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            fs::copy(format!("{}/{f}", fixture("gemma2")), g.join(f)).unwrap();
        }
        fs::copy(
            format!(
                "{}/../shared/data/chat_templates/google-gemma-2-2b-it.jinja",
                env!("CARGO_MANIFEST_DIR")
            ),
            g.join("chat_template.jinja"),
        )
        .unwrap();
        let err = t.fails(&[
            "model",
            "render",
            "--model",
            g.to_str().unwrap(),
            "--messages",
            msgs.to_str().unwrap(),
        ]);
        assert!(
            err.contains("chat_template.jinja: line 1")
                && err.contains("System role not supported"),
            "{err}"
        );

        // An unsupported architecture names its config file.
        let f = t.dir.path().join("falcon");
        fs::create_dir_all(&f).unwrap();
        fs::write(
            f.join("config.json"),
            r#"{"model_type": "falcon", "hidden_size": 8}"#,
        )
        .unwrap();
        let err = t.fails(&["model", "inspect", f.to_str().unwrap()]);
        assert!(
            err.contains("falcon/config.json") && err.contains("unsupported architecture `falcon`"),
            "{err}"
        );

        // Saving converts dtype and the result loads again.
        let out = t.dir.path().join("resaved");
        t.ok(&[
            "model",
            "save",
            "--model",
            &fixture("llama"),
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            "bf16",
        ]);
        let info = t.json(&["model", "inspect", out.to_str().unwrap()]);
        assert_eq!(info["dtype"], "bfloat16");
    }
}

mod train_cli {
    //! `fuselab train ...`: a run killed with SIGKILL and resumed ends with the same bytes.
    use super::*;

    fn rows(n: u32) -> String {
        util::sft_rows(n)
    }

    fn model() -> String {
        format!("{}/tests/fixtures/hf/llama", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn sft_killed_and_resumed_matches_an_uninterrupted_run() {
        let t = TestContext::new();
        let data = t.dir.path().join("sft.jsonl");
        fs::write(&data, rows(16)).unwrap();
        let args = |out: &str| -> Vec<String> {
            [
                "train",
                "sft",
                "--model",
                &model(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                out,
                "--epochs",
                "30",
                "--batch-size",
                "4",
                "--save-steps",
                "5",
                "--lr",
                "1e-3",
                "--max-len",
                "64",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let a = t.dir.path().join("a");
        let started = std::time::Instant::now();
        let argv = args(a.to_str().unwrap());
        t.ok(&argv.iter().map(String::as_str).collect::<Vec<_>>());
        let full = started.elapsed();
        let b = t.dir.path().join("b");
        let argv = args(b.to_str().unwrap());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut rng = Lcg(11);
        // Kill until a kill lands mid-training after at least one checkpoint was written, so that
        // the final invocation must resume from it.
        let newest_checkpoint = || -> Option<u64> {
            fs::read_dir(&b)
                .ok()?
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("checkpoint-")?
                        .parse()
                        .ok()
                })
                .max()
        };
        let mut resumable = None;
        for _ in 0..6 {
            let mut child = t
                .cmd(&argv)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let at = full.as_millis() as u64 * (20 + rng.below(60)) / 100;
            std::thread::sleep(Duration::from_millis(at));
            let mid = child.try_wait().unwrap().is_none();
            child.kill().unwrap();
            child.wait().unwrap();
            if mid && !b.join("model").exists() {
                if let Some(n) = newest_checkpoint() {
                    resumable = Some(n);
                    break;
                }
            }
        }
        let resumable = resumable.expect("no kill landed mid-training after a checkpoint");
        let out = t.ok(&[argv.as_slice(), &["--json"]].concat());
        let summary: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(summary["steps"], 120);
        assert_eq!(
            summary["resumed_from"], resumable,
            "the re-run must resume from the newest checkpoint the killed run left"
        );
        let wa = fs::read(a.join("model/model.safetensors")).unwrap();
        let wb = fs::read(b.join("model/model.safetensors")).unwrap();
        assert!(wa == wb, "weights after kill -9 and resume differ");
        assert_eq!(
            fs::read_to_string(b.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .count(),
            120
        );
    }

    #[test]
    fn sft_packing_packs_rows_and_trains() {
        let t = TestContext::new();
        let data = t.dir.path().join("sft.jsonl");
        fs::write(&data, rows(16)).unwrap();
        let out = t.dir.path().join("packed");
        let o = t.output(&[
            "train",
            "sft",
            "--packing",
            "--model",
            &model(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "2",
            "--max-len",
            "256",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        let line = err
            .lines()
            .find(|l| l.starts_with("packed 16 conversations into "))
            .unwrap_or_else(|| panic!("no packing report in {err}"));
        let rows: usize = line.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert!((1..16).contains(&rows), "{line}");
        let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
        // One epoch of `rows` packed rows, two per step.
        assert_eq!(summary["steps"], rows.div_ceil(2));
        assert!(out.join("model/model.safetensors").exists());
    }

    #[test]
    fn dpo_cli_streams_metrics_and_rejects_bad_rows() {
        let t = TestContext::new();
        let pairs = t.dir.path().join("pairs.jsonl");
        let row = |i: u32| {
            let k = i % 5 + 1;
            serde_json::json!({"prompt": [{"role": "user", "content": format!("Count from {k}.")}],
                               "chosen": [{"role": "assistant", "content": format!("{k} {}", k + 1)}],
                               "chosen_target": [{"role": "assistant", "content": format!("{k}")}],
                               "rejected": [{"role": "assistant", "content": format!("{} {k}", k + 1)}]})
            .to_string()
        };
        fs::write(&pairs, (0..8).map(row).collect::<Vec<_>>().join("\n")).unwrap();
        for loss in ["sigmoid", "ln-dpo", "wrpo"] {
            let out = t.dir.path().join(loss);
            t.ok(&[
                "train",
                "dpo",
                "--policy",
                &model(),
                "--data",
                pairs.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--loss",
                loss,
                "--beta",
                "0.1",
                "--batch-size",
                "4",
                "--lr",
                "1e-3",
                "--save-steps",
                "0",
            ]);
            let last: Value = serde_json::from_str(
                fs::read_to_string(out.join("metrics.jsonl"))
                    .unwrap()
                    .lines()
                    .last()
                    .unwrap(),
            )
            .unwrap();
            for k in [
                "loss",
                "rewards/chosen",
                "rewards/rejected",
                "rewards/margins",
                "rewards/accuracies",
                "logps/chosen",
                "logps/rejected",
                "learning_rate",
                "grad_norm",
            ] {
                assert!(last.get(k).is_some(), "{loss}: {k} missing from {last}");
            }
            assert!(out.join("reference_logps.json").is_file());
            assert!(out.join("model/config.json").is_file());
        }
        fs::write(
            &pairs,
            format!(
                "{}\n{{\"prompt\": [{{\"role\": \"user\", \"content\": \"x\"}}]}}\n",
                row(0)
            ),
        )
        .unwrap();
        let err = t.fails(&[
            "train",
            "dpo",
            "--policy",
            &model(),
            "--data",
            pairs.to_str().unwrap(),
            "--out",
            t.dir.path().join("bad").to_str().unwrap(),
        ]);
        assert!(err.contains("pairs.jsonl:2: no `chosen`"), "{err}");
    }
}

#[test]
fn sft_then_dpo_run_as_cached_steps_of_an_experiment() {
    let t = TestContext::new();
    let base = format!(
        "base_model={}/tests/fixtures/hf/llama",
        env!("CARGO_MANIFEST_DIR")
    );
    let r = t.json(&["run", "sft-dpo-demo", "--set", &base]);
    assert_eq!(
        sorted(steps_with(&r, "ran")),
        [
            "base",
            "bench-base",
            "bench-dpo",
            "bench-sft",
            "data",
            "dpo",
            "eval",
            "sft"
        ]
    );
    let eval_tree = outputs(&r)["eval"].clone();
    let tree: Value = t.json(&["show", &eval_tree]);
    let blob = tree["entries"][0]["digest"].as_str().unwrap().to_string();
    let report: Value = serde_json::from_str(&t.ok(&["store", "cat", &blob])).unwrap();
    let f = |m: &str, k: &str| report[m][k].as_f64().unwrap();
    assert!(
        f("sft", "eval_nll") < 0.6 * f("base", "eval_nll"),
        "{report:#}"
    );
    assert!(
        f("dpo", "reward_accuracy") >= 0.8 && f("dpo", "reward_margin") > 0.0,
        "{report:#}"
    );
    assert!(steps_with(&t.json(&["run", "sft-dpo-demo", "--set", &base]), "ran").is_empty());
    // A DPO hyperparameter re-executes dpo and what reads it (eval, bench-dpo) only.
    let r2 = t.json(&[
        "run",
        "sft-dpo-demo",
        "--set",
        &base,
        "--set",
        "dpo.beta=0.2",
    ]);
    assert_eq!(sorted(steps_with(&r2, "ran")), ["bench-dpo", "dpo", "eval"]);
    // The trained checkpoint's lineage reaches the base model and the data step.
    let up = t.json_lineage(&[&outputs(&r)["dpo"], "--format", "json"]);
    let steps: BTreeSet<&str> = up["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["base", "data", "dpo", "sft"].into_iter().collect());
    // Training on CPU is bit-reproducible: re-executing every step gives identical outputs.
    let v = t.json(&["verify", "sft-dpo-demo", "--set", &base]);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] == "identical"),
        "{v:#}"
    );
}

mod work_dir {
    //! A step's work dir survives a failed attempt (where trainers keep checkpoints) and is removed
    //! once the step's outputs are stored.
    use fuselab::recipe::{self, records::Records, Experiment, ExperimentDef};
    use fuselab::store::Store;

    #[derive(Default, serde::Serialize, serde::Deserialize)]
    struct P {}

    fn build(exp: &mut Experiment, _: &P) -> recipe::Result<()> {
        exp.step("long", &(), &[], |ctx| {
            let marker = ctx.work_dir()?.join("checkpoint");
            if !marker.exists() {
                std::fs::write(&marker, "half done")?;
                return Err("interrupted".into());
            }
            std::fs::write(ctx.out("resumed.txt")?, std::fs::read(&marker)?)?;
            Ok(())
        })?;
        Ok(())
    }

    #[test]
    fn work_dir_survives_a_failed_attempt_and_is_cleared_on_success() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("artifacts")).unwrap();
        let def = ExperimentDef::new("resumable", "", build);
        let exp = def.instantiate(def.defaults()).unwrap();
        let opts = || crate::util::quiet_options(1, dir.path().to_path_buf());
        let first = recipe::run(&store, &exp, &opts()).unwrap();
        assert!(first.failure.is_some());
        let second = recipe::run(&store, &exp, &opts()).unwrap();
        assert!(second.failure.is_none());
        let key = second.steps[0].key.unwrap();
        assert!(!Records::new(&store).work_dir(&key).exists());
        let out = store
            .materialize(second.steps[0].outputs.as_ref().unwrap())
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("resumed.txt")).unwrap(),
            "half done"
        );
    }
}
