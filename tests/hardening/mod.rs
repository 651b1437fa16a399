//! Regression tests for the hardening findings (issue #8), numbered as there: each failed on the code
//! before the fix. Store tests drive the real CLI; a few use the library where the CLI cannot reach.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{self, outputs, sft_rows, Lcg, TestContext};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/hf/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn object_path(store: &Path, digest: &str) -> PathBuf {
    store.join("objects").join(&digest[..2]).join(&digest[2..])
}

/// Overwrite an object's bytes in place (as root, or a stray editor, could).
fn tamper(path: &Path, bytes: &[u8]) {
    let mut p = fs::metadata(path).unwrap().permissions();
    p.set_mode(0o644);
    fs::set_permissions(path, p).unwrap();
    fs::write(path, bytes).unwrap();
}

/// Make every directory under `root` writable again (checkouts are read-only trees).
fn writable_dirs(root: &Path) {
    let mut p = fs::metadata(root).unwrap().permissions();
    p.set_mode(0o755);
    fs::set_permissions(root, p).unwrap();
    for e in fs::read_dir(root).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            writable_dirs(&e.path());
        }
    }
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn fsck_json(t: &TestContext) -> (bool, Value) {
    let out = t.output(&["fsck", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("fsck --json prints JSON");
    (out.status.success(), v)
}

// ---------------------------------------------------------------- data loss

/// Finding 1: `model save --out .` in someone's project deleted the project.
#[test]
fn f01_model_save_never_deletes_a_directory_it_did_not_write() {
    let t = TestContext::new();
    let p = t.dir.path().join("p");
    fs::create_dir_all(p.join("src")).unwrap();
    fs::create_dir_all(p.join(".git")).unwrap();
    fs::write(p.join("src/a"), "x").unwrap();
    let out = Command::new(util::BIN)
        .args(["model", "save", "--model", &fixture("llama"), "--out", "."])
        .current_dir(&p)
        .output()
        .unwrap();
    assert!(!out.status.success(), "saving over a project must fail");
    assert!(stderr_of(&out).contains("refusing"), "{}", stderr_of(&out));
    assert_eq!(fs::read_to_string(p.join("src/a")).unwrap(), "x");
    assert!(p.join(".git").is_dir());
    // A new directory, and then the same one again (a checkpoint we wrote), both work; no temp dirs
    // are left beside it.
    let dest = t.dir.path().join("saved");
    let dest_s = dest.to_str().unwrap();
    t.ok(&[
        "model",
        "save",
        "--model",
        &fixture("llama"),
        "--out",
        dest_s,
    ]);
    t.ok(&[
        "model",
        "save",
        "--model",
        &fixture("llama"),
        "--out",
        dest_s,
    ]);
    assert!(dest.join("model.safetensors").is_file());
    let leftovers: Vec<_> = fs::read_dir(t.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Start `args` in the background, then `gc` after a random delay; returns both outputs.
fn race_gc(
    t: &TestContext,
    args: &[&str],
    delay_ms: u64,
) -> (std::process::Output, std::process::Output) {
    let writer = t
        .cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(delay_ms));
    let gc = t.output(&["gc"]);
    (writer.wait_with_output().unwrap(), gc)
}

/// Finding 2: gc computed its roots before taking the exclusive lock, so it deleted what a concurrent run
/// committed while gc waited. 20 rounds of gc racing `run`.
#[test]
fn f02_gc_racing_run_loses_nothing_20_rounds() {
    let t = TestContext::new();
    t.run_hello(&[]);
    let mut rng = Lcg(2);
    for round in 0..20 {
        let min_len = format!("min_len={}", round % 7 + 1);
        let top_k = format!("top_k={}", round + 3);
        let (run, gc) = race_gc(
            &t,
            &[
                "run",
                "hello",
                "--set",
                "corpus=corpus",
                "--set",
                "delay_ms=40",
                "--set",
                &min_len,
                "--set",
                &top_k,
                "--force",
                "words",
            ],
            rng.below(250),
        );
        assert!(run.status.success(), "round {round}: {}", stderr_of(&run));
        assert!(gc.status.success(), "round {round}: {}", stderr_of(&gc));
        let (clean, report) = fsck_json(&t);
        assert!(
            clean && report["report"]["missing"].as_array().unwrap().is_empty(),
            "round {round}: {report:#}"
        );
    }
}

/// Finding 2: The same race with `store add --pin`: the pinned object must survive.
#[test]
fn f02_gc_racing_store_add_pin_loses_nothing_20_rounds() {
    let t = TestContext::new();
    t.run_hello(&[]);
    let mut rng = Lcg(3);
    for round in 0..20 {
        let f = t.dir.path().join(format!("data-{round}.bin"));
        // Big enough that adding takes a while (copy + fsync).
        let bytes: Vec<u8> = (0..8_000_000u32).map(|i| (i ^ round) as u8).collect();
        fs::write(&f, &bytes).unwrap();
        let pin = format!("p{round}");
        let (add, gc) = race_gc(
            &t,
            &["store", "add", f.to_str().unwrap(), "--pin", &pin, "--json"],
            rng.below(40),
        );
        assert!(add.status.success(), "round {round}: {}", stderr_of(&add));
        assert!(gc.status.success(), "round {round}: {}", stderr_of(&gc));
        let added: Value = serde_json::from_slice(&add.stdout).unwrap();
        let digest = added["digest"].as_str().unwrap();
        assert!(
            object_path(&t.store, digest).is_file(),
            "round {round}: gc deleted the object pinned as {pin}"
        );
        let (clean, report) = fsck_json(&t);
        assert!(clean, "round {round}: {report:#}");
    }
}

/// Finding 3: A corrupt tree manifest made gc delete all of that tree's intact files.
#[test]
fn f03_gc_keeps_everything_when_a_tree_cannot_be_read() {
    let t = TestContext::new();
    let r = t.run_hello(&[]);
    let tree = outputs(&r)["counts"].clone();
    let listing = t.json(&["show", &tree]);
    let files: Vec<String> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["digest"].as_str().unwrap().to_string())
        .collect();
    assert!(!files.is_empty());
    let manifest = object_path(&t.store, &tree);
    let mut bytes = fs::read(&manifest).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x01;
    tamper(&manifest, &bytes);
    let gc = t.output(&["gc"]);
    assert!(gc.status.success(), "{}", stderr_of(&gc));
    assert!(
        stderr_of(&gc).contains("kept every object"),
        "{}",
        stderr_of(&gc)
    );
    for f in &files {
        assert!(
            object_path(&t.store, f).is_file(),
            "gc deleted {f} of the unreadable tree"
        );
    }
    let (clean, report) = fsck_json(&t);
    assert!(!clean);
    assert!(
        !report["report"]["unreadable_trees"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{report:#}"
    );
}

/// Finding 4: Any directory given as `--store` silently became a store, and gc emptied its tmp/.
#[test]
fn f04_only_run_and_store_add_create_a_store() {
    let t = TestContext::new();
    let d = t.dir.path().join("d");
    fs::create_dir_all(d.join("tmp")).unwrap();
    fs::write(d.join("tmp/n"), "hi").unwrap();
    let gc = Command::new(util::BIN)
        .args(["--store", d.to_str().unwrap(), "gc"])
        .output()
        .unwrap();
    assert!(!gc.status.success());
    assert!(
        stderr_of(&gc).contains("not a fuselab store"),
        "{}",
        stderr_of(&gc)
    );
    assert_eq!(fs::read_to_string(d.join("tmp/n")).unwrap(), "hi");
    assert!(!d.join("FORMAT").exists());
    // A typo path is not "clean".
    let fsck = Command::new(util::BIN)
        .args([
            "--store",
            t.dir.path().join("typo").to_str().unwrap(),
            "fsck",
        ])
        .output()
        .unwrap();
    assert!(!fsck.status.success());
    assert!(!t.dir.path().join("typo").exists());
    // `run` refuses a non-empty foreign directory too, and creates a store in an empty one.
    let run = Command::new(util::BIN)
        .args([
            "--store",
            d.to_str().unwrap(),
            "run",
            "hello",
            "--set",
            "corpus=corpus",
        ])
        .current_dir(&t.project)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(stderr_of(&run).contains("not empty"), "{}", stderr_of(&run));
    t.run_hello(&[]);
    assert!(t.store.join("FORMAT").is_file());
}

// ---------------------------------------------------------------- integrity and escapes

/// Finding 5: Checkouts that steps read were writable and never checked: an edited checkout fed the step
/// while its record named the clean digest.
#[test]
fn f05_materialised_checkouts_are_read_only_checked_and_rebuilt() {
    let t = TestContext::new();
    let clean = t.run_hello(&[]);
    let corpus = outputs(&clean)["corpus"].clone();
    let co = t.store.join("checkouts").join(&corpus);
    assert!(co.is_dir());
    assert!(fs::metadata(&co).unwrap().permissions().readonly());
    for e in fs::read_dir(&co).unwrap().flatten() {
        assert!(
            e.metadata().unwrap().permissions().readonly(),
            "{:?}",
            e.path()
        );
    }
    // Damage it: one file removed, one added.
    writable_dirs(&co);
    let victim = fs::read_dir(&co).unwrap().flatten().next().unwrap().path();
    fs::remove_file(&victim).unwrap();
    fs::write(co.join("intruder.txt"), "injected words injected words").unwrap();
    let (ok, report) = fsck_json(&t);
    assert!(!ok, "fsck must notice a damaged checkout");
    assert!(
        !report["report"]["damaged_checkouts"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{report:#}"
    );
    let forced = t.run_hello(&["--force", "words"]);
    assert_eq!(
        outputs(&forced)["words"],
        outputs(&clean)["words"],
        "the step read the damaged checkout"
    );
    assert!(!co.join("intruder.txt").exists() && victim.exists());
    let (ok, report) = fsck_json(&t);
    assert!(ok, "{report:#}");
}

/// Finding 6: `store checkout` hardlinked into the user's directory by default (an in-place edit corrupted
/// the store), checked out corrupt objects with exit 0, and `store cat` wrote bytes before failing.
#[test]
fn f06_user_checkouts_are_independent_verified_and_all_or_nothing() {
    let t = TestContext::new();
    let r = t.run_hello(&[]);
    let tree = outputs(&r)["counts"].clone();
    let dest = t.dir.path().join("co");
    t.ok(&["store", "checkout", &tree, dest.to_str().unwrap()]);
    let listing = t.json(&["show", &tree]);
    let entry = &listing["entries"][0];
    let file = dest.join(entry["path"].as_str().unwrap());
    let obj = object_path(&t.store, entry["digest"].as_str().unwrap());
    assert_ne!(
        fs::metadata(&file).unwrap().ino(),
        fs::metadata(&obj).unwrap().ino(),
        "default checkout shares the object's inode"
    );
    fs::write(&file, "edited in place").unwrap();
    let (ok, report) = fsck_json(&t);
    assert!(
        ok,
        "editing a checked-out file corrupted the store: {report:#}"
    );
    // Hardlinks only on request.
    let linked = t.dir.path().join("linked");
    t.ok(&[
        "store",
        "checkout",
        &tree,
        linked.to_str().unwrap(),
        "--mode",
        "hardlink",
    ]);
    assert_eq!(
        fs::metadata(linked.join(entry["path"].as_str().unwrap()))
            .unwrap()
            .ino(),
        fs::metadata(&obj).unwrap().ino()
    );
    // A corrupt object: checkout fails and leaves nothing; cat prints nothing.
    let digest = entry["digest"].as_str().unwrap();
    let len = fs::metadata(&obj).unwrap().len() as usize;
    tamper(&obj, &vec![b'#'; len]);
    let bad = t.dir.path().join("bad");
    let out = t.output(&["store", "checkout", &tree, bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("corrupt"), "{}", stderr_of(&out));
    assert!(
        !bad.exists(),
        "a failed checkout left a partial destination"
    );
    let out = t.output(&["store", "checkout", digest, bad.to_str().unwrap()]);
    assert!(!out.status.success() && !bad.exists());
    let cat = t.output(&["store", "cat", digest]);
    assert!(!cat.status.success());
    assert!(
        cat.stdout.is_empty(),
        "store cat wrote {} bytes before failing",
        cat.stdout.len()
    );
}

/// Finding 7: A corrupt object could not be repaired by re-running its step: the good copy was discarded
/// because the name existed.
#[test]
fn f07_rerunning_a_step_repairs_its_corrupt_output() {
    let t = TestContext::new();
    let r = t.run_hello(&[]);
    let tree = outputs(&r)["summary"].clone();
    let listing = t.json(&["show", &tree]);
    let digest = listing["entries"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let obj = object_path(&t.store, &digest);
    let len = fs::metadata(&obj).unwrap().len() as usize;
    tamper(&obj, &vec![b'!'; len]);
    assert!(!fsck_json(&t).0);
    let again = t.run_hello(&["--force", "summary"]);
    assert_eq!(outputs(&again)["summary"], tree);
    let (ok, report) = fsck_json(&t);
    assert!(ok, "the re-run did not repair the object: {report:#}");
}

/// Finding 8: Identifiers joined into paths unchecked: pins, diff, exec-step keys, shard names.
#[test]
fn f08_identifiers_cannot_escape_the_store() {
    let t = TestContext::new();
    t.run_hello(&[]);
    let x = t.dir.path().join("x");
    fs::create_dir_all(&x).unwrap();
    let file = t.project.join("corpus/fusion.txt");
    // The store sits at <dir>/artifacts; refs/pins/../../../x/config would be <dir>/x/config.json.
    let out = t.output(&[
        "store",
        "add",
        file.to_str().unwrap(),
        "--pin",
        "../../../x/config",
    ]);
    assert!(!out.status.success());
    assert!(
        !x.join("config.json").exists(),
        "a pin wrote outside the store"
    );
    fs::write(x.join("r.json"), "{}").unwrap();
    let out = t.output(&["diff", "../../x/r", "../../x/r"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("not a valid"),
        "{}",
        stderr_of(&out)
    );
    // A 64-character "key" that walks out of specs/.
    let evil = format!("../../x/{}", "a".repeat(56));
    assert_eq!(evil.len(), 64);
    fs::write(x.join(format!("{}.json", "a".repeat(56))), "{}").unwrap();
    let out = t.output(&["exec-step", &evil]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("not a step key"),
        "{}",
        stderr_of(&out)
    );
    // A sharded checkpoint whose index points outside its directory.
    let ck = t.dir.path().join("ck");
    fs::create_dir_all(&ck).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        fs::copy(Path::new(&fixture("llama")).join(f), ck.join(f)).unwrap();
    }
    for shard in ["../x/model.safetensors", "/etc/passwd"] {
        let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": shard}});
        fs::write(ck.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let out = t.output(&[
            "model",
            "logprobs",
            "--model",
            ck.to_str().unwrap(),
            "--prompt-ids",
            "1,2",
            "--completion-ids",
            "3",
        ]);
        assert!(!out.status.success());
        assert!(
            stderr_of(&out).contains("not a file name"),
            "{shard}: {}",
            stderr_of(&out)
        );
    }
}

fn sft_args(data: &Path, out: &Path, model: &str) -> Vec<String> {
    [
        "train",
        "sft",
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--save-steps",
        "2",
        "--keep-last",
        "5",
        "--lr",
        "1e-3",
        "--max-len",
        "64",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Finding 9: Resume trusted checkpoints blindly: a flipped weight byte, an edited step, NaN optimizer
/// state, or another starting model were all accepted.
#[test]
fn f09_damaged_checkpoints_are_reported_and_passed_over() {
    let t = TestContext::new();
    let data = t.dir.path().join("sft.jsonl");
    fs::write(&data, sft_rows(16)).unwrap();
    let out = t.dir.path().join("run");
    let argv = sft_args(&data, &out, &fixture("llama"));
    let first: Value = serde_json::from_str(&t.ok(&strs(&argv))).unwrap();
    assert_eq!(first["steps"], 12);
    let reference = fs::read(out.join("model/model.safetensors")).unwrap();
    // Damage the newest checkpoint three ways in turn; each re-run must pass over it, resume from
    // the one before, and still end with the uninterrupted run's weights.
    type Damage = (&'static str, fn(&Path));
    let damages: [Damage; 3] = [
        ("model/model.safetensors", |p| {
            let mut b = fs::read(p).unwrap();
            let n = b.len();
            b[n - 10] ^= 0x40;
            fs::write(p, b).unwrap();
        }),
        ("optimizer.safetensors", |p| {
            let mut b = fs::read(p).unwrap();
            let n = b.len();
            // f32 NaN in the last value of the state.
            b[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
            fs::write(p, b).unwrap();
        }),
        ("trainer_state.json", |p| {
            let mut v: Value = serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
            v["step"] = 1_000_000.into();
            fs::write(p, v.to_string()).unwrap();
        }),
    ];
    for (file, damage) in damages {
        damage(&out.join("checkpoint-10").join(file));
        let o = t.output(&strs(&argv));
        assert!(o.status.success(), "{file}: {}", stderr_of(&o));
        let s: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(s["resumed_from"], 8, "{file}: {s:#}");
        let skipped = s["skipped_checkpoints"].as_array().unwrap();
        assert!(
            skipped.len() == 1 && skipped[0][0].as_str().unwrap().ends_with("checkpoint-10"),
            "{file}: {s:#}"
        );
        assert_eq!(
            fs::read(out.join("model/model.safetensors")).unwrap(),
            reference,
            "{file}: the resumed run's weights differ"
        );
    }
    // Resuming with --model pointing at another checkpoint is refused.
    let mistral = sft_args(&data, &out, &fixture("mistral"));
    let o = t.output(&strs(&mistral));
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("another starting model"),
        "{}",
        stderr_of(&o)
    );
}

/// Finding 10: The reference log-prob cache was written without fsync, and a torn one failed the command.
#[test]
fn f10_a_torn_reference_cache_is_recomputed() {
    let t = TestContext::new();
    let pairs = t.dir.path().join("pairs.jsonl");
    let rows: Vec<String> = (0..4)
        .map(|i| {
            serde_json::json!({"prompt": [{"role": "user", "content": format!("Count from {i}.")}],
                               "chosen": [{"role": "assistant", "content": "1 2 3"}],
                               "rejected": [{"role": "assistant", "content": "3 1 2"}]})
            .to_string()
        })
        .collect();
    fs::write(&pairs, rows.join("\n")).unwrap();
    let out = t.dir.path().join("dpo");
    fs::create_dir_all(&out).unwrap();
    fs::write(
        out.join("reference_logps.json"),
        "{\"tag\": \"abc\", \"logps\": [[1.0, ",
    )
    .unwrap();
    let args = [
        "train",
        "dpo",
        "--policy",
        &fixture("llama"),
        "--data",
        pairs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--beta",
        "0.1",
        "--batch-size",
        "2",
        "--save-steps",
        "0",
    ];
    t.ok(&args);
    let cache: Value =
        serde_json::from_str(&fs::read_to_string(out.join("reference_logps.json")).unwrap())
            .unwrap();
    assert_eq!(cache["logps"].as_array().unwrap().len(), 4);
}

/// Finding 10: One durability helper: no file outside `src/fs.rs` renames or deletes trees by itself.
#[test]
fn f10_renames_and_tree_removals_go_through_the_durability_helpers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p == src.join("fs.rs") || p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            for (i, line) in fs::read_to_string(&p).unwrap().lines().enumerate() {
                if line.contains("fs::rename(") || line.contains("remove_dir_all(") {
                    offenders.push(format!("{}:{}: {}", p.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "{}", offenders.join("\n"));
}

/// Finding 12: verify reused a step's work dir without its lock and left it behind, so a later run
/// resumed from verify's checkpoints.
#[test]
fn f12_verify_leaves_no_work_dir_behind() {
    let t = TestContext::new();
    let base = format!("base_model={}", fixture("llama"));
    t.json(&["run", "sft-dpo-demo", "--set", &base]);
    let work = t.store.join("work");
    let entries = |p: &Path| fs::read_dir(p).map(|r| r.count()).unwrap_or(0);
    assert_eq!(entries(&work), 0);
    let v = t.json(&["verify", "sft-dpo-demo", "--set", &base]);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] != "differs"),
        "{v:#}"
    );
    assert_eq!(entries(&work), 0, "verify left work dirs behind");
}

/// Finding 13: Two trainers on one --out were not locked out of each other.
#[test]
fn f13_two_trainers_cannot_share_an_output_directory() {
    let t = TestContext::new();
    let data = t.dir.path().join("sft.jsonl");
    fs::write(&data, sft_rows(16)).unwrap();
    let out = t.dir.path().join("run");
    let mut argv = sft_args(&data, &out, &fixture("llama"));
    assert_eq!(argv[8], "--epochs");
    argv[9] = "200".into(); // long enough to still be running
    let mut first = t
        .cmd(&strs(&argv))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !out.join("metrics.jsonl").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first trainer never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = t.output(&strs(&argv));
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!second.status.success());
    assert!(
        stderr_of(&second).contains("another training process"),
        "{}",
        stderr_of(&second)
    );
}

/// Processes whose command line mentions `needle`, other than this test binary.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Finding 13: `kill -9` of `run --executor process` left its `exec-step` child running.
#[test]
fn f13_killing_run_kills_its_exec_step_child() {
    let t = TestContext::new();
    let mut run = t
        .cmd(&[
            "run",
            "hello",
            "--set",
            "corpus=corpus",
            "--set",
            "delay_ms=30000",
            "--executor",
            "process",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = t.store.display().to_string();
    let started = Instant::now();
    while !processes_mentioning(&store).iter().any(|&p| p != run.id()) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no exec-step child appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_mentioning(&store);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "exec-step children survived: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- bounded on hostile input

/// A copy of a fixture checkpoint at `dest`, leaving out the files named in `except`.
fn copy_fixture(name: &str, dest: &Path, except: &[&str]) {
    fs::create_dir_all(dest).unwrap();
    for e in fs::read_dir(fixture(name)).unwrap().flatten() {
        let n = e.file_name();
        if !except.contains(&n.to_str().unwrap()) {
            fs::copy(e.path(), dest.join(&n)).unwrap();
        }
    }
}

fn template_dir(t: &TestContext, template: &str) -> PathBuf {
    let d = t.dir.path().join("tmpl");
    copy_fixture("llama", &d, &["tokenizer_config.json"]);
    let cfg =
        serde_json::json!({"chat_template": template, "eos_token": "</s>", "bos_token": "<s>"});
    fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    d
}

/// Finding 14: Chat templates ran without limits: nested loops forever, string doubling to gigabytes.
#[test]
fn f14_hostile_chat_templates_end_with_an_error() {
    let t = TestContext::new();
    let msgs = t.dir.path().join("m.json");
    fs::write(&msgs, r#"[{"role": "user", "content": "hi"}]"#).unwrap();
    for template in [
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    ] {
        let d = template_dir(&t, template);
        let started = Instant::now();
        let out = bounded(
            t.cmd(&["model", "render", "--model", d.to_str().unwrap(), "--messages", msgs.to_str().unwrap()]),
            Duration::from_secs(30),
            template,
        );
        assert!(!out.status.success(), "{template}");
        assert!(stderr_of(&out).contains("work budget"), "{}", stderr_of(&out));
        assert!(started.elapsed() < Duration::from_secs(30), "{template}: {:?}", started.elapsed());
        fs::remove_dir_all(&d).unwrap();
    }
}

/// Run `fuselab args` and return (exit ok, stderr, peak RSS in KiB) of the child.
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its rusage
fn peak_rss(t: &TestContext, args: &[&str]) -> (bool, String, i64) {
    let child = t
        .cmd(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid);
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (ok, reader.join().unwrap(), usage.ru_maxrss)
}

/// Finding 15: One huge row was tokenised whole before truncation (10 GB RSS for 100 MB), and a prompt past
/// the context length allocated gigabytes before aborting.
#[test]
fn f15_per_row_work_is_bounded() {
    let t = TestContext::new();
    let data = t.dir.path().join("huge.jsonl");
    let huge = "count one two three ".repeat(1_500_000); // 30 MB in one row
    let mut rows = sft_rows(4);
    rows.push('\n');
    rows.push_str(
        &serde_json::json!({"messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": huge}]})
            .to_string(),
    );
    fs::write(&data, rows).unwrap();
    let out = t.dir.path().join("run");
    let (ok, err, rss_kib) = peak_rss(
        &t,
        &[
            "train",
            "sft",
            "--model",
            &fixture("llama"),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-len",
            "64",
            "--batch-size",
            "5",
            "--save-steps",
            "0",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        rss_kib < 1024 * 1024,
        "peak RSS {} MiB for one 30 MB row",
        rss_kib / 1024
    );
    let prompt = "word ".repeat(20_000);
    let (ok, err, rss_kib) = peak_rss(
        &t,
        &[
            "model",
            "generate",
            "--model",
            &fixture("llama"),
            "--prompt",
            &prompt,
            "--max-new-tokens",
            "2",
        ],
    );
    assert!(!ok);
    assert!(err.contains("context length 256"), "{err}");
    assert!(rss_kib < 1024 * 1024, "peak RSS {} MiB", rss_kib / 1024);
}

/// Finding 16: Absurd configs allocated terabytes or divided by zero before any weight was checked.
#[test]
fn f16_absurd_configs_are_refused_before_allocating() {
    let t = TestContext::new();
    for (key, value, says) in [
        (
            "num_hidden_layers",
            serde_json::json!(1_000_000_000_000u64),
            "num_hidden_layers",
        ),
        (
            "num_attention_heads",
            serde_json::json!(0),
            "num_attention_heads",
        ),
        (
            "num_key_value_heads",
            serde_json::json!(0),
            "num_key_value_heads",
        ),
        ("num_hidden_layers", serde_json::json!(40), "hold 2 layers"),
    ] {
        let d = t.dir.path().join(format!("cfg-{key}-{value}"));
        copy_fixture("llama", &d, &["config.json"]);
        let mut cfg: Value = serde_json::from_str(
            &fs::read_to_string(Path::new(&fixture("llama")).join("config.json")).unwrap(),
        )
        .unwrap();
        cfg[key] = value.clone();
        fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        let (ok, err, rss) = peak_rss(
            &t,
            &[
                "model",
                "logprobs",
                "--model",
                d.to_str().unwrap(),
                "--prompt-ids",
                "1,2",
                "--completion-ids",
                "3",
            ],
        );
        assert!(!ok, "{key}={value}");
        assert!(
            err.contains(says) && !err.contains("panicked"),
            "{key}={value}: {err}"
        );
        assert!(rss < 512 * 1024, "{key}={value}: {} MiB", rss / 1024);
    }
}

/// Run with a time limit; returns the output, or panics naming the command if it hangs.
fn bounded(mut cmd: Command, limit: Duration, what: &str) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("{what} did not return within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Finding 17: fsck blocked forever on a FIFO in objects/; `store hash` of a FIFO or /dev/zero never ended.
#[test]
fn f17_non_regular_files_are_refused() {
    let t = TestContext::new();
    t.run_hello(&[]);
    let fifo = t.store.join("objects/ab").join("c".repeat(62));
    fs::create_dir_all(fifo.parent().unwrap()).unwrap();
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let out = bounded(
        t.cmd(&["fsck"]),
        Duration::from_secs(20),
        "fsck with a FIFO in objects/",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("stray"));
    for p in [fifo.to_str().unwrap(), "/dev/zero"] {
        let out = bounded(
            t.cmd(&["store", "hash", p]),
            Duration::from_secs(20),
            "store hash",
        );
        assert!(!out.status.success(), "{p}");
        assert!(
            stderr_of(&out).contains("only regular files"),
            "{p}: {}",
            stderr_of(&out)
        );
    }
}

/// Finding 18: `fsck | head -2`, `gc --dry-run | head -1`, `show <tree> | head -1` panicked on the closed pipe.
#[test]
fn f18_a_closed_pipe_ends_output_quietly() {
    let t = TestContext::new();
    let r = t.run_hello(&[]);
    // Orphans make gc --dry-run and fsck print several lines.
    for i in 0..30 {
        let f = t.dir.path().join(format!("orphan{i}"));
        fs::write(&f, format!("orphan {i}")).unwrap();
        t.ok(&["store", "add", f.to_str().unwrap()]);
    }
    let tree = outputs(&r)["words"].clone();
    for args in [
        vec!["fsck"],
        vec!["gc", "--dry-run"],
        vec!["show", tree.as_str()],
    ] {
        // The reader is gone before the first line is written (`| head -0`), so every write of
        // the command meets a closed pipe.
        let mut child = t
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = stderr_of(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Finding 19: One truncated run record aborted fsck, gc, lineage and show; a bad cache entry aborted run.
#[test]
fn f19_unreadable_records_are_reported_not_fatal() {
    let t = TestContext::new();
    let r = t.run_hello(&[]);
    let victim = &fs::read_dir(t.store.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            fs::read_to_string(p)
                .unwrap()
                .contains("\"step\": \"lengths\"")
        })
        .expect("a run record of the lengths step");
    let text = fs::read_to_string(victim).unwrap();
    fs::write(victim, &text[..text.len() / 2]).unwrap();
    let (ok, report) = fsck_json(&t);
    assert!(!ok);
    let bad = report["report"]["unreadable_records"].as_array().unwrap();
    assert!(
        bad.iter().any(|b| b["path"]
            .as_str()
            .unwrap()
            .ends_with(victim.file_name().unwrap().to_str().unwrap())),
        "{report:#}"
    );
    let orphan = t.dir.path().join("orphan");
    fs::write(&orphan, "nobody references me").unwrap();
    let added = t.json(&["store", "add", orphan.to_str().unwrap()]);
    let gc = t.output(&["gc"]);
    assert!(gc.status.success(), "{}", stderr_of(&gc));
    assert!(
        stderr_of(&gc).contains("kept every object"),
        "{}",
        stderr_of(&gc)
    );
    assert!(object_path(&t.store, added["digest"].as_str().unwrap()).is_file());
    let summary = outputs(&r)["summary"].clone();
    t.ok(&["lineage", &summary]);
    t.ok(&["show", &summary]);
    // A torn cache entry is a miss: run re-executes that step and succeeds.
    let keys: Vec<PathBuf> = fs::read_dir(t.store.join("keys"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    for k in &keys {
        fs::write(k, "{\"key\": ").unwrap();
    }
    let again = t.run_hello(&[]);
    assert_eq!(outputs(&again), outputs(&r));
    assert!(!crate::util::steps_with(&again, "ran").is_empty());
}

/// Each `extra` appended to `base` must fail with an error naming its flag.
fn each_refused(t: &TestContext, base: &[&str], cases: &[(&[&str], &str)]) {
    for (extra, flag) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let out = t.output(&args);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(
            stderr_of(&out).contains(flag),
            "{extra:?}: {}",
            stderr_of(&out)
        );
    }
}

/// Finding 20: out-of-range numbers were accepted with exit 0.
#[test]
fn f20_out_of_range_numbers_name_their_flag() {
    let t = TestContext::new();
    let model = fixture("llama");
    each_refused(
        &t,
        &[
            "model",
            "generate",
            "--model",
            &model,
            "--prompt",
            "Count",
            "--max-new-tokens",
            "2",
        ],
        &[
            (&["--temperature=-1"], "--temperature"),
            (&["--temperature", "NaN"], "--temperature"),
            (&["--temperature", "1", "--top-p", "0"], "--top-p"),
            (&["--temperature", "1", "--top-p", "1.5"], "--top-p"),
            (&["--repetition-penalty", "0"], "--repetition-penalty"),
            (&["--stop", ""], "--stop"),
        ],
    );
    let data = t.dir.path().join("sft.jsonl");
    fs::write(&data, sft_rows(4)).unwrap();
    let out_dir = t.dir.path().join("run");
    let (data_s, out_s) = (data.to_str().unwrap(), out_dir.to_str().unwrap());
    each_refused(
        &t,
        &[
            "train",
            "sft",
            "--model",
            &model,
            "--data",
            data_s,
            "--out",
            out_s,
            "--save-steps",
            "0",
        ],
        &[
            (&["--lr=-1"], "--lr"),
            (&["--lr", "NaN"], "--lr"),
            (&["--warmup-ratio", "1.5"], "--warmup-ratio"),
            (&["--max-len", "100000"], "--max-len"),
        ],
    );
    let pairs = t.dir.path().join("pairs.jsonl");
    fs::write(&pairs, serde_json::json!({"prompt": [{"role": "user", "content": "Count."}],
        "chosen": [{"role": "assistant", "content": "1 2"}], "rejected": [{"role": "assistant", "content": "2 1"}]}).to_string()).unwrap();
    each_refused(
        &t,
        &[
            "train",
            "dpo",
            "--policy",
            &model,
            "--data",
            pairs.to_str().unwrap(),
            "--out",
            out_s,
        ],
        &[
            (&["--beta", "0"], "--beta"),
            (
                &["--beta", "0.1", "--label-smoothing", "0.5"],
                "--label-smoothing",
            ),
        ],
    );
    assert!(!out_dir.join("model").exists());
}

/// Finding 4, the other side: the store-creation rule must not refuse a store that another process
/// is creating at the same moment. Four first runs on a missing store, ten times.
#[test]
fn f04_concurrent_first_runs_all_create_or_join_the_store() {
    let t = TestContext::new();
    for round in 0..10 {
        let store = t.dir.path().join(format!("fresh-{round}"));
        let runs: Vec<_> = (0..4)
            .map(|_| {
                Command::new(util::BIN)
                    .arg("--store")
                    .arg(&store)
                    .args(["run", "hello", "--set", "corpus=corpus"])
                    .current_dir(&t.project)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for r in runs {
            let out = r.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: {}", stderr_of(&out));
        }
    }
}
