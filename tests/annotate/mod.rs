//! `fuselab annotate code`: HumanEval verdicts and hostile completions that must not escape the
//! sandbox. Each hostile test checks the effect on the host, not just the verdict.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::TestContext;

fn humaneval() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/humaneval/HumanEval.jsonl.gz")
}

fn humaneval_rows() -> Vec<Value> {
    let bytes = fs::read(humaneval()).expect("../shared/data/humaneval/HumanEval.jsonl.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let body: Vec<String> = rows.iter().map(Value::to_string).collect();
    fs::write(path, body.join("\n")).unwrap();
}

/// Verdicts of `annotate code --json` on the given completions of HumanEval.
fn check(t: &TestContext, problems: &Path, completions: &[Value], extra: &[&str]) -> Vec<Value> {
    let c = t.dir.path().join("completions.jsonl");
    write_jsonl(&c, completions);
    let mut args = vec![
        "annotate",
        "code",
        "--problems",
        problems.to_str().unwrap(),
        "--completions",
        c.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = t.cmd(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("WARNING"),
        "the sandbox must run with namespaces on this machine: {stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn humaneval_canonical_solutions_pass_and_pass_bodies_fail() {
    let t = TestContext::new();
    let rows = humaneval_rows();
    assert_eq!(rows.len(), 164);
    let canonical: Vec<Value> = rows
        .iter()
        .map(|r| json!({"task_id": r["task_id"], "completion": r["canonical_solution"]}))
        .collect();
    let v = check(&t, &humaneval(), &canonical, &["--jobs", "2"]);
    let passed = v.iter().filter(|r| r["passed"] == true).count();
    assert_eq!(
        passed,
        164,
        "{:#}",
        Value::Array(v.into_iter().filter(|r| r["passed"] != true).collect())
    );
    let stubs: Vec<Value> = rows
        .iter()
        .map(|r| json!({"task_id": r["task_id"], "completion": "    pass\n"}))
        .collect();
    let v = check(&t, &humaneval(), &stubs, &["--jobs", "2"]);
    assert_eq!(v.iter().filter(|r| r["passed"] == true).count(), 0);
    assert!(v
        .iter()
        .all(|r| r["reason"] == "assertion" || r["reason"] == "exception"));
}

/// One problem `f() == 1` and the hostile body to check against it.
fn hostile(t: &TestContext, body: &str, timeout: &str) -> Value {
    let p = t.dir.path().join("problem.jsonl");
    write_jsonl(
        &p,
        &[
            json!({"task_id": "h", "prompt": "def f():\n", "entry_point": "f",
                 "test": "def check(c):\n    assert c() == 1\n"}),
        ],
    );
    let v = check(
        t,
        &p,
        &[json!({"task_id": "h", "completion": body})],
        &["--timeout", timeout],
    );
    v[0].clone()
}

#[test]
fn an_infinite_loop_times_out() {
    let t = TestContext::new();
    let started = Instant::now();
    let v = hostile(&t, "    while True:\n        pass\n", "2");
    assert_eq!(v["reason"], "timeout", "{v}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Processes whose name (comm) is `name`, anywhere on the machine.
fn processes_named(name: &str) -> usize {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

#[test]
fn a_fork_flood_is_bounded_and_nothing_survives() {
    let t = TestContext::new();
    // The flood renames itself (PR_SET_NAME, inherited by every child) so that this test can count
    // its processes while it runs and after.
    let body = "    import ctypes, os
    ctypes.CDLL(None).prctl(15, b'fuselabflood', 0, 0, 0)
    while True:
        try:
            os.fork()
        except OSError:
            pass
";
    let done = std::sync::atomic::AtomicBool::new(false);
    let peak = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(processes_named("fuselabflood"));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        let v = hostile(&t, body, "3");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(v["passed"], false, "{v}");
        assert_eq!(v["reason"], "timeout", "{v}");
        watcher.join().unwrap()
    });
    assert!(
        peak >= 2,
        "the flood never forked (peak {peak}): the test shows nothing"
    );
    assert!(
        peak <= 40,
        "{peak} flood processes at once: the process limit did not hold"
    );
    // Processes SIGKILLed at the end may take a moment to be torn down; one that is still there
    // after 3 s survived.
    let deadline = Instant::now() + Duration::from_secs(3);
    while processes_named("fuselabflood") > 0 {
        assert!(
            Instant::now() < deadline,
            "flood processes survived the check"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_16_gib_allocation_is_a_memory_verdict() {
    let t = TestContext::new();
    let v = hostile(&t, "    x = bytearray(16 << 30)\n    return 1\n", "10");
    assert_eq!(v["reason"], "memory", "{v}");
}

#[test]
fn writing_outside_its_dir_leaves_no_file() {
    let t = TestContext::new();
    let target = t.dir.path().join("ESCAPED");
    let project = t.project.join("ESCAPED");
    let body = format!(
        "    for p in [{:?}, {:?}, '/usr/ESCAPED', '/etc/ESCAPED']:\n        try:\n            open(p, 'w').write('x')\n        except OSError:\n            pass\n    return 1\n",
        target.display().to_string(),
        project.display().to_string()
    );
    let v = hostile(&t, &body, "10");
    assert_eq!(v["passed"], true, "{v}");
    for p in [
        target,
        project,
        PathBuf::from("/usr/ESCAPED"),
        PathBuf::from("/etc/ESCAPED"),
    ] {
        assert!(
            !p.exists(),
            "{} was written from inside the sandbox",
            p.display()
        );
    }
}

#[test]
fn a_socket_to_loopback_reaches_nothing() {
    let t = TestContext::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = format!(
        "    import socket\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n    s.sendall(b'leak')\n    return 1\n"
    );
    let v = hostile(&t, &body, "10");
    assert_eq!(v["passed"], false, "{v}");
    assert_eq!(v["reason"], "exception", "{v}");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the listener on the host's loopback got a connection"
    );
}

#[test]
fn killing_its_parent_or_its_group_leaves_the_checker_running() {
    let t = TestContext::new();
    for body in [
        "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return 0\n",
        "    import os, signal\n    os.killpg(0, signal.SIGKILL)\n    return 0\n",
        "    import os, signal\n    os.kill(-1, signal.SIGKILL)\n    return 0\n",
    ] {
        // `check` asserts that the checker exited 0 and printed a verdict for the completion.
        let v = hostile(&t, body, "10");
        assert_eq!(v["passed"], false, "{body}: {v}");
    }
}

#[test]
fn closing_stdout_still_gives_a_verdict() {
    let t = TestContext::new();
    let v = hostile(
        &t,
        "    import os\n    os.close(1)\n    os.close(2)\n    return 2\n",
        "10",
    );
    assert_eq!(v["reason"], "assertion", "{v}");
}

#[test]
fn printing_gigabytes_is_capped_and_times_out() {
    let t = TestContext::new();
    let p = t.dir.path().join("problem.jsonl");
    write_jsonl(
        &p,
        &[
            json!({"task_id": "h", "prompt": "def f():\n", "entry_point": "f",
                 "test": "def check(c):\n    assert c() == 1\n"}),
        ],
    );
    let c = t.dir.path().join("c.jsonl");
    write_jsonl(
        &c,
        &[
            json!({"task_id": "h", "completion": "    import sys\n    while True:\n        sys.stdout.write('x' * 1000000)\n"}),
        ],
    );
    let mut child = t
        .cmd(&[
            "annotate",
            "code",
            "--problems",
            p.to_str().unwrap(),
            "--completions",
            c.to_str().unwrap(),
            "--timeout",
            "3",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak_kib = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Ok(s) = fs::read_to_string(format!("/proc/{pid}/status")) {
            for l in s.lines().filter(|l| l.starts_with("VmRSS:")) {
                let kib: u64 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
                peak_kib = peak_kib.max(kib);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["reason"], "timeout", "{v}");
    assert!(
        peak_kib < 200 * 1024,
        "the checker's RSS reached {} MiB",
        peak_kib / 1024
    );
}

#[test]
fn syntax_errors_and_skipped_checks_are_their_own_verdicts() {
    let t = TestContext::new();
    let v = hostile(&t, "    return (1\n", "10");
    assert_eq!(v["reason"], "syntax error", "{v}");
    let v = hostile(&t, "    import os\n    os._exit(0)\n", "10");
    assert_eq!(
        (v["passed"].clone(), v["reason"].clone()),
        (json!(false), json!("no verdict")),
        "{v}"
    );
}

#[test]
fn mbpp_and_stdin_stdout_layouts() {
    let t = TestContext::new();
    let p = t.dir.path().join("mixed.jsonl");
    write_jsonl(
        &p,
        &[
            json!({"task_id": 11, "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}),
            json!({"task_id": "io", "tests": [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}]}),
        ],
    );
    let v = check(
        &t,
        &p,
        &[
            json!({"task_id": 11, "completion": "def add(a, b):\n    return a + b\n"}),
            json!({"task_id": 11, "completion": "def add(a, b):\n    return a - b\n"}),
            json!({"task_id": "io", "completion": "a, b = map(int, input().split())\nprint(a + b)\n"}),
            json!({"task_id": "io", "completion": "a, b = map(int, input().split())\nprint(a * b)\n"}),
        ],
        &[],
    );
    let got: Vec<(bool, &str)> = v
        .iter()
        .map(|r| (r["passed"] == true, r["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (true, "passed"),
            (false, "assertion"),
            (true, "passed"),
            (false, "wrong output")
        ]
    );
    assert_eq!(v[1]["completion_index"], 1);
}

#[test]
fn bad_input_names_file_and_line() {
    let t = TestContext::new();
    let p = t.dir.path().join("p.jsonl");
    write_jsonl(
        &p,
        &[json!({"task_id": "a", "prompt": "def f():\n", "test": "", "entry_point": "f"})],
    );
    let c = t.dir.path().join("c.jsonl");
    let run = |c: &Path, extra: &[&str]| -> String {
        let mut args = vec![
            "annotate",
            "code",
            "--problems",
            p.to_str().unwrap(),
            "--completions",
            c.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        t.fails(&args)
    };
    fs::write(
        &c,
        "{\"task_id\": \"a\", \"completion\": \"x\"}\nnot json\n",
    )
    .unwrap();
    let e = run(&c, &[]);
    assert!(e.contains("c.jsonl:2") && e.contains("not JSON"), "{e}");
    fs::write(&c, "{\"task_id\": \"zz\", \"completion\": \"x\"}\n").unwrap();
    let e = run(&c, &[]);
    assert!(
        e.contains("c.jsonl:1") && e.contains("unknown task `zz`"),
        "{e}"
    );
    fs::write(&c, "").unwrap();
    let e = run(&c, &[]);
    assert!(e.contains("empty file"), "{e}");
    fs::write(
        &c,
        "{\"task_id\": \"a\", \"completion\": \"    return 1\\n\"}\n",
    )
    .unwrap();
    let e = run(&c, &["--python", "/nonexistent/python3"]);
    assert!(
        e.contains("no Python interpreter") && e.contains("install"),
        "{e}"
    );
}

#[test]
fn annotate_math_judges_a_file_and_names_bad_lines() {
    let t = TestContext::new();
    let f = t.dir.path().join("answers.jsonl");
    write_jsonl(
        &f,
        &[
            json!({"task_id": "gsm/1", "gold": "Janet sells 9 eggs.\n#### 18", "answer": "She makes 9 * 2 = $18.\n#### 18"}),
            json!({"task_id": "math/1", "gold": "So $p = \\boxed{\\frac{1}{2}}$.", "answer": "The answer is $\\boxed{0.5}$"}),
            json!({"task_id": "math/2", "gold": "\\boxed{(1,2)}", "answer": "\\boxed{12}"}),
            json!({"id": 7, "gold": "5", "answer": "no idea"}),
        ],
    );
    let v: Value = t.json(&["annotate", "math", "--answers", f.to_str().unwrap()]);
    let got: Vec<(String, bool, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["task_id"].as_str().unwrap().to_string(),
                r["correct"].as_bool().unwrap(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("gsm/1".to_string(), true, "normalised".to_string()),
            ("math/1".to_string(), true, "numeric".to_string()),
            ("math/2".to_string(), false, "different".to_string()),
            ("7".to_string(), false, "no answer found".to_string()),
        ]
    );
    let text = t.ok(&["annotate", "math", "--answers", f.to_str().unwrap()]);
    assert!(text.contains("n 4  correct 2  accuracy 0.5000"), "{text}");
    // Other field names.
    let g = t.dir.path().join("other.jsonl");
    write_jsonl(&g, &[json!({"expected_answer": "3", "response": "x = 3"})]);
    let v = t.json(&[
        "annotate",
        "math",
        "--answers",
        g.to_str().unwrap(),
        "--gold-field",
        "expected_answer",
        "--answer-field",
        "response",
    ]);
    assert_eq!(v[0]["correct"], true);
    // Bad input.
    fs::write(&g, "{\"gold\": \"1\", \"answer\": \"1\"}\n{broken\n").unwrap();
    let e = t.fails(&["annotate", "math", "--answers", g.to_str().unwrap()]);
    assert!(e.contains("other.jsonl:2") && e.contains("not JSON"), "{e}");
    fs::write(&g, "{\"gold\": \"1\"}\n").unwrap();
    let e = t.fails(&["annotate", "math", "--answers", g.to_str().unwrap()]);
    assert!(e.contains("other.jsonl:1") && e.contains("`answer`"), "{e}");
    fs::write(&g, "\n").unwrap();
    let e = t.fails(&["annotate", "math", "--answers", g.to_str().unwrap()]);
    assert!(e.contains("empty file"), "{e}");
}
