//! `fusechat-micro`: every step of the FuseChat-3.0 recipe on models trained here, for real, at the
//! smallest sizes — reruns execute nothing, `verify` reproduces every digest, lineage reaches the
//! sources, the reward model, the tokenizer and the samples, and the report is written.

use std::collections::BTreeSet;
use std::fs;

use serde_json::Value;

use crate::util::{outputs, steps_with, TestContext};

fn steps_of(lineage: &Value) -> BTreeSet<String> {
    lineage["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["step"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn fusechat_micro_runs_every_step_reproducibly_with_full_lineage() {
    let t = TestContext::new();
    let r = t.json(&["run", "fusechat-micro"]);
    let ran = steps_with(&r, "ran");
    let sources = ["llama", "qwen2", "mistral", "gemma2"];
    let mut expected: BTreeSet<String> = [
        "chat-template",
        "suite",
        "tokenizer",
        "base",
        "reward-model",
        "annotate",
        "construct",
        "sft",
        "dpo",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in sources {
        expected.insert(s.into());
        expected.insert(format!("sample-{s}"));
    }
    for m in [
        "base", "sft", "fused", "llama", "qwen2", "mistral", "gemma2",
    ] {
        for c in ["instruction", "math", "code", "second-language"] {
            expected.insert(format!("eval-{m}-{c}"));
        }
    }
    assert_eq!(ran.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(t.project.join("reports/fusechat-micro.html").is_file());
    // The report states the fusion claim's numbers: pooled paired tests, the gap closed per category.
    let data: Value =
        serde_json::from_slice(&fs::read(t.project.join("reports/fusechat-micro.json")).unwrap())
            .unwrap();
    let f = &data["fusion"];
    assert_eq!(
        (f["tests"][0]["a"].as_str(), f["tests"][0]["b"].as_str()),
        (Some("fused"), Some("base"))
    );
    assert_eq!(
        f["tests"][0]["items"], 18,
        "9 skills x 2 held-out items, pooled"
    );
    assert_eq!(f["gaps"].as_array().unwrap().len(), 4, "{f:#}");
    assert!(
        f["beats_every_source"].is_boolean(),
        "four sources were evaluated"
    );
    for g in f["gaps"].as_array().unwrap() {
        let (b, x, s) = (
            g["base"].as_f64().unwrap(),
            g["fused"].as_f64().unwrap(),
            g["best_source_score"].as_f64().unwrap(),
        );
        match g["closed"].as_f64() {
            Some(c) => assert!((c - (x - b) / (s - b)).abs() < 1e-9, "{g}"),
            None => assert!(s <= b, "{g}"),
        }
    }

    // Each source is a checkpoint of its own family, on the tokenizer trained here.
    let out = outputs(&r);
    for (s, arch) in [
        ("llama", "LlamaForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
        ("mistral", "MistralForCausalLM"),
        ("gemma2", "Gemma2ForCausalLM"),
    ] {
        let tree = t.json(&["show", &out[s]]);
        let files: Vec<&str> = tree["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap())
            .collect();
        assert!(files.contains(&"model.safetensors"), "{s}: {files:?}");
        let config = tree["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == "config.json")
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let c: Value = serde_json::from_str(&t.ok(&["store", "cat", &config])).unwrap();
        assert_eq!(c["architectures"][0], arch, "{s}");
    }
    // The tokenizer carries the Qwen2.5 chat template unchanged.
    let tok = t.json(&["show", &out["tokenizer"]]);
    let tc = tok["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "tokenizer_config.json")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let tc: Value = serde_json::from_str(&t.ok(&["store", "cat", &tc])).unwrap();
    let qwen = fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/chat_templates/Qwen-Qwen2.5-7B-Instruct.jinja"),
    )
    .unwrap();
    assert_eq!(tc["chat_template"].as_str().unwrap(), qwen);

    // A second run executes nothing.
    assert!(steps_with(&t.json(&["run", "fusechat-micro"]), "ran").is_empty());

    // The fused checkpoint's lineage: the four sources, their samples, the annotations, the
    // reward model, the tokenizer, the suite, the base and the SFT stage.
    let lineage = |args: &[&str]| -> Value {
        let mut a = vec!["lineage"];
        a.extend_from_slice(args);
        a.extend(["--format", "json"]);
        serde_json::from_str(&t.ok(&a)).unwrap()
    };
    let up = lineage(&[&out["dpo"]]);
    let steps = steps_of(&up);
    for s in [
        "llama",
        "qwen2",
        "mistral",
        "gemma2",
        "sample-llama",
        "sample-qwen2",
        "sample-mistral",
        "sample-gemma2",
        "annotate",
        "reward-model",
        "tokenizer",
        "suite",
        "base",
        "construct",
        "sft",
        "dpo",
    ] {
        assert!(steps.contains(s), "{s} missing from {steps:?}");
    }
    assert!(
        up["runs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r.get("params").is_some()),
        "every run names its parameters"
    );
    // Reverse lineage of one source: everything it fed, and nothing it did not.
    let down = lineage(&[&out["mistral"], "--reverse"]);
    let reached: BTreeSet<&str> = down["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["digest"].as_str().unwrap())
        .collect();
    for s in [
        "sample-mistral",
        "annotate",
        "construct",
        "sft",
        "dpo",
        "eval-mistral-code",
        "eval-fused-code",
    ] {
        assert!(reached.contains(out[s].as_str()), "{s} not downstream");
    }
    assert!(!reached.contains(out["sample-llama"].as_str()));
    assert!(!reached.contains(out["base"].as_str()));

    // A variant (plain sigmoid DPO) re-executes only dpo and the fused evals, and its report shows
    // the default run's fused model beside it.
    let v = t.json(&[
        "run",
        "fusechat-micro",
        "--set",
        r#"dpo.loss={"type":"sigmoid","label_smoothing":0.0}"#,
    ]);
    let mut again = steps_with(&v, "ran");
    again.sort();
    assert_eq!(
        again,
        [
            "dpo",
            "eval-fused-code",
            "eval-fused-instruction",
            "eval-fused-math",
            "eval-fused-second-language"
        ]
    );
    let data: Value =
        serde_json::from_slice(&fs::read(t.project.join("reports/fusechat-micro.json")).unwrap())
            .unwrap();
    assert!(data["variant"]["overrides"][0]
        .as_str()
        .unwrap()
        .starts_with("dpo.loss="));
    let models: Vec<&str> = data["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    assert!(
        models.contains(&"fused") && models.contains(&"fused (default)"),
        "{models:?}"
    );

    // WRPO needs the target's own preferred answers: the SFT model answers the DPO prompts, the
    // reward model and verifiers judge them, and DPO trains on three answers per row.
    let w = t.json(&[
        "run",
        "fusechat-micro",
        "--set",
        r#"dpo.loss={"type":"wrpo","alpha":0.1,"dynamic":true,"label_smoothing":0.0}"#,
    ]);
    let mut ran = steps_with(&w, "ran");
    ran.sort();
    assert_eq!(
        ran,
        [
            "annotate-target",
            "dpo",
            "eval-fused-code",
            "eval-fused-instruction",
            "eval-fused-math",
            "eval-fused-second-language",
            "sample-target"
        ]
    );

    // Re-executing every step reproduces every digest bit for bit.
    let v = t.json(&["verify", "fusechat-micro"]);
    let bad: Vec<&Value> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] != "identical")
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}
