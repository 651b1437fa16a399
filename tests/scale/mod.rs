//! The full-scale recipes (`fusechat3-<target>`): each plans here with METHOD.md's models and
//! data volumes, its estimates follow from the published configs, and every missing or broken
//! input is named before anything runs.

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::util::TestContext;

const RECIPES: [(&str, &str, u64); 5] = [
    ("fusechat3-llama31-8b", "llama31-8b", 8_030_261_248),
    ("fusechat3-qwen25-7b", "qwen25-7b", 7_615_616_512),
    ("fusechat3-gemma2-9b", "gemma2-9b", 9_241_705_984),
    ("fusechat3-llama32-3b", "llama32-3b", 3_212_749_824),
    ("fusechat3-llama32-1b", "llama32-1b", 1_235_814_400),
];

fn entry<'a>(plan: &'a Value, step: &str) -> &'a Value {
    plan.as_array()
        .unwrap()
        .iter()
        .find(|e| e["step"] == step)
        .unwrap_or_else(|| panic!("no step {step} in the plan"))
}

#[test]
fn every_full_scale_recipe_plans_with_estimates_and_refuses_to_run_without_its_checkpoints() {
    let t = TestContext::new();
    for (exp, target, params) in RECIPES {
        let plan = t.json(&["plan", exp]);
        // The whole DAG is there even with nothing given.
        for s in [
            "target",
            "reward-model",
            "prompts",
            "sample-mistral-large",
            "sample-qwen25-math-72b",
            "annotate",
            "construct",
            "sft",
            "dpo",
            "eval-fused-humaneval",
        ] {
            entry(&plan, s);
        }
        assert_eq!(entry(&plan, "target")["status"], "missing");
        // Parameter counts are the published ones, from the bundled configs.
        for s in ["sft", "dpo", &format!("eval-{target}-humaneval")] {
            assert_eq!(
                entry(&plan, s)["estimate"]["parameters"],
                params,
                "{exp} {s}"
            );
        }
        assert_eq!(
            entry(&plan, "sample-mistral-large")["estimate"]["parameters"],
            122_610_069_504u64
        );
        let sft = &entry(&plan, "sft")["estimate"];
        let dpo = &entry(&plan, "dpo")["estimate"];
        // 6N per trained token is a floor (attention adds to it); training state alone is 16 B/param.
        let n = params as f64;
        let tokens = sft["tokens"].as_f64().unwrap();
        assert!(
            sft["flops"].as_f64().unwrap() >= 6.0 * n * tokens * 0.8,
            "{exp}"
        );
        assert!(sft["memory_bytes"].as_f64().unwrap() > 16.0 * n);
        assert!(dpo["memory_bytes"].as_f64().unwrap() > sft["memory_bytes"].as_f64().unwrap());
        assert!(sft["gpu_hours"].as_f64().unwrap() > 0.0 && sft["gpus"].as_u64().unwrap() >= 1);
        // The text plan shows the table and lists what is missing; `run` refuses with all of it.
        let text = t.ok(&["plan", exp]);
        assert!(
            text.contains("GPU-hours") && text.contains("total"),
            "{text}"
        );
        assert!(text.contains("`target.path` is not set"), "{text}");
        let err = t.fails(&["run", exp]);
        for key in [
            "target.path",
            "sources.gemma2-27b.path",
            "reward_model.path",
            "datasets.OpenMathInstruct-2.path",
        ] {
            assert!(err.contains(key), "{exp}: {key} not named in:\n{err}");
        }
        assert!(
            !t.store.join("runs").exists(),
            "a refused run stored nothing"
        );
    }
}

fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if !skip.contains(&name.as_str()) {
            fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn broken_inputs_are_each_named_with_the_file_at_fault() {
    let t = TestContext::new();
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let d = t.dir.path();
    // A checkpoint without weights, one missing a shard, one without a template, a causal LM
    // given as the reward model, a llama checkpoint where Mistral is expected.
    copy_dir(&fx.join("hf/llama"), &d.join("no-weights"), &[]);
    for e in fs::read_dir(d.join("no-weights")).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().contains("safetensors") {
            fs::remove_file(p).unwrap();
        }
    }
    copy_dir(
        &fx.join("hf/llama"),
        &d.join("no-shard"),
        &["model-00003-of-00009.safetensors"],
    );
    let qwen = fx.join("hf/qwen2");
    let math = d.join("math.jsonl");
    fs::write(
        &math,
        "{\"prompt\": \"What is 2+2?\"}\n{\"prompt\": \"And 3+3?\"}\n",
    )
    .unwrap();
    let bad_json = d.join("bad.jsonl");
    fs::write(&bad_json, "{\"prompt\": \"ok\"}\n{not json\n").unwrap();
    let set = |k: &str, p: &Path| format!("{k}={}", p.display());
    let args = [
        "plan".to_string(),
        "fusechat3-llama31-8b".into(),
        "--set".into(),
        set("target.path", &d.join("no-weights")),
        "--set".into(),
        set("sources.llama31-70b.path", &d.join("no-shard")),
        "--set".into(),
        set("sources.mistral-large.path", &fx.join("hf/llama")),
        "--set".into(),
        set("sources.qwen25-72b.path", &qwen),
        "--set".into(),
        set("reward_model.path", &fx.join("hf/gemma2")),
        "--set".into(),
        set("datasets.OpenMathInstruct-2.path", &math),
        "--set".into(),
        set("datasets.UltraFeedback.path", &bad_json),
        "--set".into(),
        set("datasets.leetcode.path", &d.join("nowhere.jsonl")),
    ];
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = t.ok(&a);
    let expect = [
        "`target.path`: ".to_string()
            + &d.join("no-weights").display().to_string()
            + ": no weights",
        "names shard model-00003-of-00009.safetensors, which is missing".into(),
        "holds a llama checkpoint, but mistralai/Mistral-Large-Instruct-2407 is mistral".into(),
        "is not a reward model".into(),
        format!("{}:1: a math prompt needs a gold answer", math.display()),
        "--set datasets.OpenMathInstruct-2.gold_field=NAME".into(),
        format!("{}:2", bad_json.display()),
        format!("{}: no such file", d.join("nowhere.jsonl").display()),
    ];
    for e in &expect {
        assert!(text.contains(e.as_str()), "missing `{e}` in:\n{text}");
    }
    // The Qwen source is a complete checkpoint: nothing is said about it.
    assert!(!text.contains("sources.qwen25-72b.path"), "{text}");
    // Estimates come from the given checkpoint's own config where it is readable.
    let plan = t.json(&a);
    assert_eq!(
        entry(&plan, "sample-qwen25-72b")["estimate"]["parameters"],
        fuselab::model::ModelConfig::from_file(&qwen.join("config.json"))
            .unwrap()
            .parameter_count() as u64
    );
}

/// Every step of a full-scale recipe executed for real on the tiny HF fixtures standing in for
/// the checkpoints (same families as the real ones), with small prompt files.
#[test]
fn a_full_scale_recipe_runs_end_to_end_on_fixture_checkpoints() {
    let t = TestContext::new();
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let d = t.dir.path();
    let write = |name: &str, rows: &[Value]| {
        let p = d.join(name);
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        fs::write(&p, text).unwrap();
        p
    };
    let instr = write(
        "instr.jsonl",
        &[
            serde_json::json!({"prompt": "Name a colour."}),
            serde_json::json!({"prompt": "Say hello politely."}),
            serde_json::json!({"prompt": "List two fruits."}),
        ],
    );
    let math = write(
        "math.jsonl",
        &[
            serde_json::json!({"prompt": "What is 2+3?", "gold": "5"}),
            serde_json::json!({"prompt": "What is 4*2?", "gold": "8"}),
        ],
    );
    let code = write(
        "code.jsonl",
        &[serde_json::json!({
            "prompt": "Write a Python function add_one(x) that returns x + 1.",
            "tests": "def check(candidate):\n    assert candidate(1) == 2\n",
            "entry_point": "add_one"
        })],
    );
    let zh = write("zh.jsonl", &[serde_json::json!({"prompt": "请说你好。"})]);
    let mut sets: Vec<String> = vec![
        format!("target.path={}", fx.join("hf/llama").display()),
        format!("sources.gemma2-27b.path={}", fx.join("hf/gemma2").display()),
        format!(
            "sources.mistral-large.path={}",
            fx.join("hf/mistral").display()
        ),
        format!("sources.qwen25-72b.path={}", fx.join("hf/qwen2").display()),
        format!("sources.llama31-70b.path={}", fx.join("hf/llama").display()),
        format!(
            "sources.qwen25-math-72b.path={}",
            fx.join("hf/qwen2").display()
        ),
        format!("reward_model.path={}", fx.join("reward/armorm").display()),
        "device=cpu".into(),
        r#"construct.gap={"min":0.0,"max":1000.0,"min_inclusive":true,"max_inclusive":true}"#
            .into(),
        "sft.batch_size=2".into(),
        "sft.grad_accum=1".into(),
        "sft.max_len=128".into(),
        "sft.epochs=1".into(),
        "sft.compute_dtype=f32".into(),
        "dpo.train.batch_size=2".into(),
        "dpo.train.grad_accum=1".into(),
        "dpo.train.max_len=128".into(),
        "dpo.train.save_steps=1".into(),
        "dpo.train.compute_dtype=f32".into(),
        "dpo.eval_fraction=0.5".into(),
        // HumanEval's prompts are longer than the fixtures' 256-token context.
        "eval.benchmarks=[]".into(),
    ];
    for (name, file) in [
        ("UltraFeedback", &instr),
        ("Magpie-Pro-DPO", &instr),
        ("HelpSteer2", &instr),
        ("OpenMathInstruct-2", &math),
        ("leetcode", &code),
        ("self-oss-instruct-sc2", &code),
        ("alpaca_gpt4_zh", &zh),
        ("Magpie-Qwen2-Pro-zh", &zh),
    ] {
        sets.push(format!("datasets.{name}.path={}", file.display()));
    }
    sets.push("datasets.OpenMathInstruct-2.gold_field=gold".into());
    for name in ["leetcode", "self-oss-instruct-sc2"] {
        sets.push(format!("datasets.{name}.tests_field=tests"));
        sets.push(format!("datasets.{name}.entry_point_field=entry_point"));
    }
    for s in [
        "gemma2-27b",
        "mistral-large",
        "qwen25-72b",
        "llama31-70b",
        "qwen25-math-72b",
    ] {
        sets.push(format!("sources.{s}.sampling.max_new_tokens=6"));
    }
    let mut args = vec!["plan", "fusechat3-llama32-1b"];
    for s in &sets {
        args.push("--set");
        args.push(s);
    }
    let text = t.ok(&args);
    assert!(!text.contains("inputs not ready"), "{text}");
    args[0] = "run";
    let r = t.json(&args);
    let ran = crate::util::steps_with(&r, "ran");
    for s in [
        "prompts",
        "sample-gemma2-27b",
        "sample-qwen25-math-72b",
        "annotate",
        "construct",
        "sft",
        "dpo",
    ] {
        assert!(ran.iter().any(|x| x == s), "{s} did not run: {ran:?}");
    }
    // A second run executes nothing.
    let again = t.json(&args);
    assert!(crate::util::steps_with(&again, "ran").is_empty());

    // The DPO step on TRL instead (on the CPU here; the recipe's default launch is 8 GPUs with
    // ZeRO-3): only it re-executes, with the recipe's beta and loss in TRL's config.
    let accelerate = crate::cluster::trl_accelerate();
    args.extend([
        "--set",
        "dpo.engine=trl",
        "--set",
        r#"dpo.launch={"processes":1,"zero3":false,"cpu":true,"bf16":false}"#,
        "--json",
    ]);
    let mut c = t.cmd(&args);
    c.env("FUSELAB_ACCELERATE", &accelerate);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trl: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        crate::util::steps_with(&trl, "ran"),
        vec!["dpo".to_string()]
    );
    let dpo = crate::util::outputs(&trl)["dpo"].clone();
    let dest = d.join("trl-dpo");
    t.ok(&["store", "checkout", &dpo, dest.to_str().unwrap()]);
    let cfg: Value =
        serde_json::from_slice(&fs::read(dest.join("launch/config.json")).unwrap()).unwrap();
    let run_id = trl["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "dpo")
        .unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let record = t.json(&["show", &run_id]);
    let dpo_params = &record["params"]["dpo"];
    assert_eq!(cfg["args"]["beta"], dpo_params["beta"]);
    let ln = dpo_params["loss"]["type"] == "ln_dpo";
    assert_eq!(
        cfg["args"]["loss_type"],
        if ln { "sigmoid_norm" } else { "sigmoid" },
        "{cfg:#} vs {dpo_params:#}"
    );
    assert!(dest.join("model.safetensors").is_file() && dest.join("engine.json").is_file());
}
