//! The data stage through the CLI: `data import|show|export`, `sample` (kill -9 and resume,
//! workers), `annotate reward`, `construct`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{broken_server, gguf_fixture, openai_server, TestContext};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let body: Vec<String> = rows.iter().map(Value::to_string).collect();
    fs::write(path, body.join("\n") + "\n").unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn import_maps_fields_and_refuses_bad_rows_without_writing() {
    let t = TestContext::new();
    let src = t.project.join("math.jsonl");
    write_jsonl(
        &src,
        &[
            json!({"uid": "a", "problem": "What is 2+3?", "expected_answer": "5", "extra": 1}),
            json!({"uid": "b", "problem": "What is 2*3?", "expected_answer": "6"}),
        ],
    );
    let out = t.project.join("prompts.parquet");
    let args = [
        "data",
        "import",
        s(&src),
        "--out",
        s(&out),
        "--prompt-field",
        "problem",
        "--gold-field",
        "expected_answer",
        "--id-field",
        "uid",
        "--category",
        "math",
        "--dataset",
        "openmathinstruct2",
    ];
    t.ok(&args);
    let shown = t.json(&["data", "show", s(&out)]);
    assert_eq!(shown["kind"], "prompts");
    assert_eq!(shown["rows"], 2);
    assert_eq!(shown["head"][0]["id"], "a");
    assert_eq!(shown["head"][0]["gold"], "5");
    assert_eq!(shown["head"][1]["messages"][0]["content"], "What is 2*3?");
    assert_eq!(shown["head"][0]["category"], "math");

    let bad = |rows: &[Value], extra: &[&str], want: &str| {
        write_jsonl(&src, rows);
        let out = t.project.join("bad.parquet");
        let mut a: Vec<&str> = vec!["data", "import", s(&src), "--out", s(&out)];
        a.extend_from_slice(extra);
        let err = t.fails(&a);
        assert!(err.contains(want), "want {want:?} in:\n{err}");
        assert!(!out.exists(), "no partial artifact");
    };
    let mapping = [
        "--prompt-field",
        "problem",
        "--gold-field",
        "answer",
        "--category",
        "math",
        "--dataset",
        "d",
    ];
    bad(
        &[
            json!({"problem": "x", "answer": "1"}),
            json!({"problem": "y", "expected": "2"}),
        ],
        &mapping,
        "math.jsonl:2: no field `answer`",
    );
    bad(
        &[
            json!({"problem": "x", "answer": "1", "id": "q"}),
            json!({"problem": "y", "answer": "2", "id": "q"}),
        ],
        &mapping,
        "math.jsonl:2: duplicate prompt id `q` (first at line 1)",
    );
    bad(
        &[json!({"problem": "   ", "answer": "1"})],
        &mapping,
        "math.jsonl:1: the prompt has no text",
    );
    bad(
        &[json!({"problem": "x", "answer": null})],
        &mapping,
        "math.jsonl:1: field `answer` is empty; a math prompt needs a gold answer",
    );
    bad(
        &[json!({"problem": "x"})],
        &[
            "--prompt-field",
            "problem",
            "--category",
            "code",
            "--dataset",
            "d",
        ],
        "a code prompt needs tests",
    );
    fs::write(&src, "{\"problem\": \"x\"}\n{not json\n").unwrap();
    let err = t.fails(&[
        "data",
        "import",
        s(&src),
        "--out",
        s(&out),
        "--dataset",
        "d",
        "--category",
        "instruction",
    ]);
    assert!(err.contains("math.jsonl:2: not JSON"), "{err}");
}

#[test]
fn released_fusechat_layouts_import_and_export_round_trip() {
    let t = TestContext::new();
    let sft = t.project.join("train.json");
    fs::write(
        &sft,
        serde_json::to_string(&json!([
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
             "dataset": "UltraFeedback", "source_model": "gemma-2-27b-it"},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
             "dataset": "OpenMathInstruct-2", "source_model": "Llama-3.1-405B-Instruct"},
        ]))
        .unwrap(),
    )
    .unwrap();
    let table = t.project.join("sft.parquet");
    t.ok(&["data", "import", s(&sft), "--out", s(&table)]);
    let shown = t.json(&["data", "show", s(&table)]);
    assert_eq!(shown["kind"], "sft");
    assert_eq!(shown["head"][1]["category"], "math");
    assert_eq!(shown["head"][0]["source"], "gemma-2-27b-it");
    let back = t.project.join("back.jsonl");
    t.ok(&[
        "data",
        "export",
        s(&table),
        "--out",
        s(&back),
        "--layout",
        "fusechat",
    ]);
    let rows: Vec<Value> = fs::read_to_string(&back)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows[0]["conversations"],
        json!([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}])
    );
    assert_eq!(rows[0]["dataset"], "UltraFeedback");
    assert_eq!(rows[0]["source_model"], "gemma-2-27b-it");
    let trl = t.project.join("trl.jsonl");
    t.ok(&[
        "data",
        "export",
        s(&table),
        "--out",
        s(&trl),
        "--layout",
        "trl",
    ]);
    let first: Value =
        serde_json::from_str(fs::read_to_string(&trl).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(
        first["messages"][1],
        json!({"role": "assistant", "content": "Hello!"})
    );
    // The export imports again to the same table.
    let again = t.project.join("again.parquet");
    t.ok(&["data", "import", s(&back), "--out", s(&again)]);
    assert_eq!(t.json(&["data", "show", s(&again)])["head"], shown["head"]);

    let dpo = t.project.join("dpo.jsonl");
    write_jsonl(
        &dpo,
        &[
            json!({"prompt": [{"role": "user", "content": "Name a colour."}],
                 "chosen": [{"role": "assistant", "content": "Blue."}],
                 "rejected": [{"role": "assistant", "content": "Seven."}],
                 "dataset": "HelpSteer2", "source_model": "Qwen2.5-72B-Instruct"}),
        ],
    );
    let dt = t.project.join("dpo.parquet");
    t.ok(&["data", "import", s(&dpo), "--out", s(&dt)]);
    let out = t.project.join("dpo_out.parquet");
    t.ok(&["data", "export", s(&dt), "--out", s(&out)]);
    let shown = t.json(&["data", "show", s(&out)]);
    assert_eq!(shown["head"][0]["chosen"][0]["content"], "Blue.");
    assert_eq!(shown["head"][0]["source_model"], "Qwen2.5-72B-Instruct");
}

/// Prompts for the sampling tests: `n` short instructions.
fn prompt_table(t: &TestContext, n: usize) -> PathBuf {
    let src = t.project.join("prompts.jsonl");
    let rows: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("p{i:03}"), "instruction": format!("Tell me about {i}.")}))
        .collect();
    write_jsonl(&src, &rows);
    let out = t.project.join("prompts.parquet");
    t.ok(&[
        "data",
        "import",
        s(&src),
        "--out",
        s(&out),
        "--dataset",
        "d",
        "--category",
        "instruction",
    ]);
    out
}

fn sample_args<'a>(
    prompts: &'a str,
    out: &'a str,
    work: &'a str,
    workers: &'a str,
) -> Vec<&'a str> {
    vec![
        "sample",
        "--model",
        "tests/fixtures/hf/llama",
        "--prompts",
        prompts,
        "--out",
        out,
        "--n",
        "3",
        "--max-new-tokens",
        "24",
        "--temperature",
        "0.9",
        "--seed",
        "5",
        "--chunk-size",
        "2",
        "--slots",
        "4",
        "--work-dir",
        work,
        "--workers",
        workers,
        "--json",
    ]
}

#[test]
fn sampling_survives_kill_9_and_ignores_the_worker_count() {
    let t = TestContext::new();
    let root = root();
    let prompts = prompt_table(&t, 24);
    let dir = t.project.join("runs");
    fs::create_dir_all(&dir).unwrap();
    let run = |name: &str, workers: &str| -> (PathBuf, Value) {
        let out = dir.join(format!("{name}.parquet"));
        let work = dir.join(format!("{name}.chunks"));
        let mut c = t.cmd(&sample_args(s(&prompts), s(&out), s(&work), workers));
        c.current_dir(&root);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (out, serde_json::from_slice(&o.stdout).unwrap())
    };
    let (one, summary) = run("one", "1");
    assert_eq!(summary["samples"], 72);
    assert_eq!(summary["chunks"], 12);
    let (two, _) = run("two", "2");
    assert_eq!(
        fs::read(&one).unwrap(),
        fs::read(&two).unwrap(),
        "2 workers: same bytes"
    );
    let shown = t.json(&["data", "show", s(&one), "--limit", "4"]);
    assert_eq!(shown["kind"], "samples");
    assert_eq!(shown["head"][3]["prompt_id"], "p001");
    assert_eq!(shown["head"][3]["sample_index"], 0);

    // Kill -9 once some chunks are done, then finish.
    let out = dir.join("killed.parquet");
    let work = dir.join("killed.chunks");
    let mut c = t.cmd(&sample_args(s(&prompts), s(&out), s(&work), "1"));
    c.current_dir(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let started = Instant::now();
    loop {
        // Finished chunks only: a chunk being written is a temp file beside them.
        let done = fs::read_dir(&work)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with("chunk-") && n.ends_with(".jsonl")
                    })
                    .count()
            })
            .unwrap_or(0);
        if done >= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no chunk appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "the merged table appears only at the end");
    let mut c = t.cmd(&sample_args(s(&prompts), s(&out), s(&work), "1"));
    c.current_dir(&root);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let resumed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        resumed["chunks_resumed"].as_u64().unwrap() >= 3,
        "{resumed}"
    );
    assert!(
        resumed["chunks_resumed"].as_u64().unwrap() < 12,
        "{resumed}"
    );
    assert_eq!(
        fs::read(&out).unwrap(),
        fs::read(&one).unwrap(),
        "byte-identical after kill -9"
    );
}

#[test]
fn reward_cli_prints_transformers_scores() {
    let t = TestContext::new();
    let root = root();
    let exp: Value = serde_json::from_str(
        &fs::read_to_string(root.join("tests/fixtures/reward/qwen2/expected.json")).unwrap(),
    )
    .unwrap();
    let samples = t.project.join("samples.jsonl");
    let rows: Vec<Value> = exp["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"id": format!("s{i}"), "messages": c}))
        .collect();
    write_jsonl(&samples, &rows);
    let mut c = t.cmd(&[
        "annotate",
        "reward",
        "--model",
        "tests/fixtures/reward/qwen2",
        "--samples",
        s(&samples),
        "--json",
        "--batch-size",
        "3",
    ]);
    c.current_dir(&root);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g["id"], format!("s{i}"));
        let want = exp["logits"][i][0].as_f64().unwrap();
        assert!(
            (g["score"].as_f64().unwrap() - want).abs() < 1e-4,
            "{g} vs {want}"
        );
    }
    let mut c = t.cmd(&[
        "annotate",
        "reward",
        "--model",
        "tests/fixtures/hf/qwen2",
        "--samples",
        s(&samples),
    ]);
    c.current_dir(&root);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("Qwen2ForCausalLM"),
        "{err}"
    );
}

#[test]
fn construct_cli_writes_sets_and_a_composition_that_adds_up() {
    let t = TestContext::new();
    let p = t.project.join("prompts.jsonl");
    let mut prompts = Vec::new();
    let mut samples = Vec::new();
    let mut notes = Vec::new();
    for i in 0..30 {
        let (cat, gold) = if i % 3 == 0 {
            ("math", json!("4"))
        } else {
            ("instruction", Value::Null)
        };
        prompts.push(json!({"id": format!("q{i}"), "question": format!("question number {i}"), "category": cat, "gold": gold}));
        for (si, src) in ["a", "b"].iter().enumerate() {
            for k in 0..3u32 {
                samples.push(json!({"prompt_id": format!("q{i}"), "source": src, "text": format!("answer {i} {src} {k}"), "sample_index": k}));
                let score = 0.5 + 0.03 * k as f64 + 0.01 * si as f64 + 0.001 * i as f64;
                let correct = if cat == "math" {
                    json!(k != 1)
                } else {
                    Value::Null
                };
                notes.push(json!({"prompt_id": format!("q{i}"), "source": src, "sample_index": k, "score": score, "correct": correct, "reason": null}));
            }
        }
    }
    write_jsonl(&p, &prompts);
    let pt = t.project.join("prompts.parquet");
    t.ok(&[
        "data",
        "import",
        s(&p),
        "--out",
        s(&pt),
        "--dataset",
        "mix",
        "--category-field",
        "category",
        "--gold-field",
        "gold",
    ]);
    let sj = t.project.join("answers.jsonl");
    write_jsonl(&sj, &samples);
    let st = t.project.join("samples.parquet");
    t.ok(&[
        "data",
        "import",
        s(&sj),
        "--out",
        s(&st),
        "--layout",
        "answers",
    ]);
    let an = t.project.join("annotations.jsonl");
    write_jsonl(&an, &notes);
    let eval = t.project.join("eval.jsonl");
    write_jsonl(&eval, &[json!({"question": "question number 7"})]);
    let out = t.project.join("constructed");
    let r = t.json(&[
        "construct",
        "--prompts",
        s(&pt),
        "--samples",
        s(&st),
        "--annotations",
        s(&an),
        "--eval",
        s(&eval),
        "--out",
        s(&out),
    ]);
    let all = r["composition"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(all["prompts"], 30);
    let dropped: u64 = all["dropped"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        all["sft"].as_u64().unwrap() + all["dpo"].as_u64().unwrap() + dropped,
        30
    );
    assert_eq!(all["dropped"]["contaminated"], 1);
    assert!(
        r["sft"].as_u64().unwrap() > 0 && r["dpo"].as_u64().unwrap() > 0,
        "{r}"
    );
    for f in [
        "sft.parquet",
        "dpo.parquet",
        "dropped.jsonl",
        "composition.json",
        "composition.txt",
        "params.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let sft = t.json(&["data", "show", s(&out.join("sft.parquet"))]);
    assert_eq!(sft["kind"], "sft");
    // Same inputs, same seed: the same bytes; a re-run replaces the earlier output atomically.
    let before = fs::read(out.join("dpo.parquet")).unwrap();
    t.ok(&[
        "construct",
        "--prompts",
        s(&pt),
        "--samples",
        s(&st),
        "--annotations",
        s(&an),
        "--eval",
        s(&eval),
        "--out",
        s(&out),
    ]);
    assert_eq!(before, fs::read(out.join("dpo.parquet")).unwrap());
    // An annotation missing for a sample is an error naming it, and the output is untouched.
    write_jsonl(&an, &notes[1..]);
    let other = t.project.join("other");
    let err = t.fails(&[
        "construct",
        "--prompts",
        s(&pt),
        "--samples",
        s(&st),
        "--annotations",
        s(&an),
        "--out",
        s(&other),
    ]);
    assert!(err.contains("answer 0 of source a to prompt q0"), "{err}");
    assert!(!other.exists());
    // A directory that is not ours is refused.
    let mine = t.project.join("mine");
    fs::create_dir_all(&mine).unwrap();
    fs::write(mine.join("notes.txt"), "keep").unwrap();
    write_jsonl(&an, &notes);
    let err = t.fails(&[
        "construct",
        "--prompts",
        s(&pt),
        "--samples",
        s(&st),
        "--annotations",
        s(&an),
        "--out",
        s(&mine),
    ]);
    assert!(err.contains("not an earlier construction output"), "{err}");
    assert_eq!(fs::read_to_string(mine.join("notes.txt")).unwrap(), "keep");
}

#[test]
fn gguf_source_matches_transformers_greedy_and_samples_every_prompt() {
    let t = TestContext::new();
    let fx = gguf_fixture();
    let prompts = t.project.join("gguf-prompts.parquet");
    t.ok(&[
        "data",
        "import",
        s(&fx.join("prompts.jsonl")),
        "--out",
        s(&prompts),
        "--dataset",
        "d",
        "--category",
        "instruction",
    ]);
    let reference: Value =
        serde_json::from_str(&fs::read_to_string(fx.join("reference.json")).unwrap()).unwrap();
    let reference = reference.as_array().unwrap();

    // f32, greedy: the tokenizer rebuilt from the file's metadata, its chat template and
    // candle-transformers' quantized Llama give transformers' 16 greedy tokens on every prompt.
    let greedy = t.project.join("gguf-greedy.jsonl");
    let r = t.json(&[
        "sample",
        "--model",
        s(&fx.join("model-f32.gguf")),
        "--prompts",
        s(&prompts),
        "--out",
        s(&greedy),
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
    ]);
    let prompt_tokens: usize = reference
        .iter()
        .map(|x| x["prompt_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        r["prefill_tokens"].as_u64(),
        Some(prompt_tokens as u64),
        "{r}"
    );
    let rows: Vec<Value> = fs::read_to_string(&greedy)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), reference.len());
    for (row, want) in rows.iter().zip(reference) {
        assert_eq!(row["prompt_id"], want["id"]);
        assert_eq!(row["text"], want["greedy_text"], "prompt {}", want["id"]);
        assert_eq!(
            row["tokens"].as_u64(),
            Some(want["greedy_ids"].as_array().unwrap().len() as u64)
        );
    }

    // q8_0 (llama.cpp's 8-bit blocks), sampled: every prompt answered n times, and the samples
    // do not depend on the number of workers or the chunking's parallelism.
    let sampled = |out: &Path, workers: &str| {
        t.json(&[
            "sample",
            "--model",
            s(&fx.join("model-q8_0.gguf")),
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--n",
            "3",
            "--temperature",
            "0.8",
            "--seed",
            "5",
            "--max-new-tokens",
            "12",
            "--chunk-size",
            "1",
            "--slots",
            "2",
            "--workers",
            workers,
        ])
    };
    let one = t.project.join("gguf-q8-1.parquet");
    let two = t.project.join("gguf-q8-2.parquet");
    assert_eq!(sampled(&one, "1")["samples"].as_u64(), Some(12));
    assert_eq!(sampled(&two, "2")["chunks"].as_u64(), Some(4));
    assert_eq!(fs::read(&one).unwrap(), fs::read(&two).unwrap());
    let shown = t.json(&["data", "show", s(&one), "--limit", "12"]);
    let head = shown["head"].as_array().unwrap();
    for (i, row) in head.iter().enumerate() {
        assert_eq!(row["prompt_id"], reference[i / 3]["id"]);
        assert_eq!(row["sample_index"], (i % 3) as u64);
        assert_eq!(row["tokens"].as_u64(), Some(12), "{row}");
    }
    let texts: std::collections::BTreeSet<&str> =
        head.iter().map(|r| r["text"].as_str().unwrap()).collect();
    assert!(texts.len() > 6, "samples should differ: {texts:?}");

    // Not a GGUF file: named.
    let fake = t.project.join("fake.gguf");
    fs::write(&fake, b"not gguf at all").unwrap();
    let err = t.fails(&[
        "sample",
        "--model",
        s(&fake),
        "--prompts",
        s(&prompts),
        "--out",
        s(&t.project.join("never.parquet")),
    ]);
    assert!(
        err.contains("fake.gguf") && err.contains("not a readable GGUF file"),
        "{err}"
    );
    assert!(!t.project.join("never.parquet").exists());
}

#[test]
fn openai_endpoint_samples_every_prompt_from_a_real_server_and_caches() {
    let t = TestContext::new();
    let root = root();
    let model = root.join("tests/fixtures/hf/llama");
    let (_server, port) = openai_server(t.dir.path(), &model);
    let prompts = prompt_table(&t, 6);
    let url = format!("http://127.0.0.1:{port}/v1");
    let cache = t.dir.path().join("request-cache");
    let run = |out: &Path| {
        t.json(&[
            "sample",
            "--model",
            &url,
            "--served-model",
            s(&model),
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--n",
            "2",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--concurrency",
            "3",
            "--cache-dir",
            s(&cache),
        ])
    };
    let first_out = t.project.join("served.parquet");
    let r = run(&first_out);
    assert_eq!(
        (
            r["samples"].as_u64(),
            r["requests"].as_u64(),
            r["cache_hits"].as_u64()
        ),
        (Some(12), Some(12), Some(0)),
        "{r}"
    );
    let shown = t.json(&["data", "show", s(&first_out), "--limit", "12"]);
    assert_eq!(shown["rows"], 12);
    for (i, row) in shown["head"].as_array().unwrap().iter().enumerate() {
        assert_eq!(row["prompt_id"], format!("p{:03}", i / 2));
        assert_eq!(row["sample_index"], (i % 2) as u64);
        assert!(row["tokens"].as_u64().unwrap() > 0, "{row}");
    }
    // A re-run is answered from the cache alone: no request reaches the server.
    let second_out = t.project.join("cached.parquet");
    let r = run(&second_out);
    assert_eq!(
        (r["requests"].as_u64(), r["cache_hits"].as_u64()),
        (Some(0), Some(12)),
        "{r}"
    );
    assert_eq!(
        fs::read(&first_out).unwrap(),
        fs::read(&second_out).unwrap()
    );

    // A server that fails is retried, then named; one that answers garbage is named too.
    for (status, body, want, tries) in [
        (500u16, "boom", "HTTP 500 after 3 attempts: boom", 3),
        (
            200,
            "<html>not json</html>",
            "not a chat completion (not JSON)",
            1,
        ),
    ] {
        let hits = t.dir.path().join(format!("hits-{status}"));
        let (_server, port) = broken_server(status, body, &hits);
        let url = format!("http://127.0.0.1:{port}/v1");
        let out = t.project.join(format!("broken-{status}.parquet"));
        let err = t.fails(&[
            "sample",
            "--model",
            &url,
            "--served-model",
            "m",
            "--prompts",
            s(&prompts),
            "--out",
            s(&out),
            "--n",
            "1",
            "--retries",
            "2",
            "--concurrency",
            "1",
            "--cache-dir",
            s(&t.dir.path().join(format!("c{status}"))),
        ]);
        assert!(
            err.contains(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
                && err.contains(want),
            "{err}"
        );
        assert!(!out.exists());
        assert_eq!(fs::read_to_string(&hits).unwrap().len(), tries);
    }
}

#[test]
fn annotate_samples_scores_and_checks_then_feeds_construction() {
    let t = TestContext::new();
    let root = root();
    let p = t.project.join("prompts.jsonl");
    write_jsonl(
        &p,
        &[
            json!({"id": "m1", "question": "What is 6 times 7?", "gold": "42", "category": "math"}),
            json!({"id": "c1", "question": "Write add(a, b).", "tests": "assert add(1, 2) == 3\nassert add(-1, 1) == 0", "category": "code"}),
            json!({"id": "i1", "question": "Say hello.", "category": "instruction"}),
        ],
    );
    let pt = t.project.join("prompts.parquet");
    t.ok(&[
        "data",
        "import",
        s(&p),
        "--out",
        s(&pt),
        "--dataset",
        "d",
        "--category-field",
        "category",
        "--gold-field",
        "gold",
        "--tests-field",
        "tests",
    ]);
    let a = t.project.join("answers.jsonl");
    write_jsonl(
        &a,
        &[
            json!({"prompt_id": "m1", "source": "x", "text": "6 * 7 = 42, so the answer is \\boxed{42}."}),
            json!({"prompt_id": "m1", "source": "x", "text": "The answer is 41."}),
            json!({"prompt_id": "c1", "source": "x", "text": "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"}),
            json!({"prompt_id": "c1", "source": "x", "text": "```python\ndef add(a, b):\n    return a - b\n```"}),
            json!({"prompt_id": "i1", "source": "x", "text": "Hello!"}),
        ],
    );
    let st = t.project.join("samples.parquet");
    t.ok(&[
        "data",
        "import",
        s(&a),
        "--out",
        s(&st),
        "--layout",
        "answers",
    ]);
    let an = t.project.join("annotations.parquet");
    let mut c = t.cmd(&[
        "annotate",
        "samples",
        "--prompts",
        s(&pt),
        "--samples",
        s(&st),
        "--reward-model",
        "tests/fixtures/reward/qwen2",
        "--out",
        s(&an),
        "--json",
    ]);
    c.current_dir(&root);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            r["annotations"].as_u64(),
            r["scored"].as_u64(),
            r["checked"].as_u64(),
            r["correct"].as_u64()
        ),
        (Some(5), Some(5), Some(4), Some(2)),
        "{r}"
    );
    let shown = t.json(&["data", "show", s(&an), "--limit", "5"]);
    assert_eq!(shown["kind"], "annotations");
    let rows = shown["head"].as_array().unwrap();
    assert_eq!(rows[0]["correct"], true);
    assert_eq!(rows[1]["correct"], false);
    assert_eq!(rows[2]["correct"], true);
    assert_eq!(rows[3]["correct"], false);
    assert!(
        rows[3]["reason"].as_str().unwrap().starts_with("assertion"),
        "{}",
        rows[3]
    );
    assert!(rows[4]["correct"].is_null() && rows[4]["score"].is_f64());
    let out = t.project.join("sets");
    let r = t.json(&[
        "construct",
        "--prompts",
        s(&pt),
        "--samples",
        s(&st),
        "--annotations",
        s(&an),
        "--out",
        s(&out),
        "--sft-fraction",
        "1",
    ]);
    assert_eq!(r["sft"], 3, "{r}");
}
