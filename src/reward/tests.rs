//! Reward scores against transformers' `AutoModelForSequenceClassification` (and ArmoRM's published
//! head) on the fixtures of tests/fixtures/make_reward_fixtures.py.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;

use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reward")
        .join(name)
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap())
        .unwrap()
}

fn close(got: &[Vec<f32>], want: &Value, what: &str) {
    let want: Vec<Vec<f64>> = serde_json::from_value(want.clone()).unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            assert!((*a as f64 - b).abs() < 1e-4, "{what}: {a} vs {b}");
        }
    }
}

#[test]
fn scores_match_transformers_for_each_family_and_armorm() {
    for name in ["llama", "qwen2", "qwen2_nopad", "gemma2", "armorm"] {
        let ck = Checkpoint::open(&fixture(name)).unwrap();
        let rm = RewardModel::load(&ck, &Device::Cpu, DType::F32).unwrap();
        let exp = expected(name);
        let convs: Vec<Value> = serde_json::from_value(exp["conversations"].clone()).unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(exp["input_ids"].clone()).unwrap();
        // Our chat template + tokenizer give transformers' apply_chat_template ids.
        let scores = rm.score_conversations(&ck, &convs, 1, &mut |_| {}).unwrap();
        close(&scores, &exp["logits"], &format!("{name} one at a time"));
        let mut rendered = Vec::new();
        for c in &convs {
            let text = ck
                .template()
                .unwrap()
                .render(c, false, &Value::Null)
                .unwrap();
            rendered.push(
                ck.tokenizer()
                    .unwrap()
                    .encode(text.as_str(), false)
                    .unwrap()
                    .get_ids()
                    .to_vec(),
            );
        }
        assert_eq!(rendered, ids, "{name}: token ids");
        // Batched, right-padded with the pad token: the same scores as transformers' batch.
        if !exp["batch_logits"].is_null() {
            close(
                &rm.score_ids(&ids).unwrap(),
                &exp["batch_logits"],
                &format!("{name} batched"),
            );
            let batched = rm.score_conversations(&ck, &convs, 4, &mut |_| {}).unwrap();
            close(
                &batched,
                &exp["logits"],
                &format!("{name} batched == alone"),
            );
        }
    }
}

#[test]
fn unknown_architectures_and_missing_heads_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(fixture("qwen2")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let d = copy("causal");
    let cfg = d.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = RewardModel::load(&Checkpoint::open(&d).unwrap(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("Qwen2ForCausalLM") && e.contains("config.json"),
        "{e}"
    );
    // A classifier whose weights lack the score head.
    let d = copy("headless");
    let f = d.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    t.remove("score.weight").unwrap();
    candle_core::safetensors::save(&t, &f).unwrap();
    let e = RewardModel::load(&Checkpoint::open(&d).unwrap(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("score.weight") && e.contains("model.safetensors"),
        "{e}"
    );
}

fn write_rows(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let p = dir.join(name);
    let body: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(&p, body.join("\n") + "\n").unwrap();
    p
}

fn pad_of(ck: &Checkpoint) -> Option<u32> {
    ck.config
        .raw
        .get("pad_token_id")
        .and_then(Value::as_u64)
        .map(|x| x as u32)
}

#[test]
fn first_reward_loss_matches_trl_reward_trainer() {
    use crate::train::Objective;
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("trl_reward.json")).unwrap())
            .unwrap();
    let ck = Checkpoint::open(&fixture("qwen2")).unwrap();
    let rm = RewardModel::load(&ck, &Device::Cpu, DType::F32).unwrap();
    let Head::Linear { weight, .. } = &rm.head else {
        panic!("linear head")
    };
    let heads: crate::train::objective::Heads = [(SCORE.to_string(), weight.clone())].into();
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = serde_json::from_value(fx["rows"].clone()).unwrap();
    for (key, rows) in [
        (
            "plain",
            rows.iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.as_object_mut().unwrap().remove("margin");
                    r
                })
                .collect::<Vec<_>>(),
        ),
        ("margin", rows.clone()),
    ] {
        let data = write_rows(tmp.path(), &format!("{key}.jsonl"), &rows);
        let obj = RewardObjective::load(
            &data,
            ck.template().unwrap(),
            ck.tokenizer().unwrap(),
            256,
            pad_of(&ck),
            None,
        )
        .unwrap();
        for i in 0..obj.len() {
            let (c, r) = obj.ids(i);
            assert_eq!(
                c,
                fx["chosen_ids"][i]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect::<Vec<_>>()
            );
            assert_eq!(
                r,
                fx["rejected_ids"][i]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect::<Vec<_>>()
            );
        }
        let all: Vec<usize> = (0..obj.len()).collect();
        let out = obj
            .micro_loss(&rm.decoder, &heads, &all, 0, 1, obj.normaliser(&all))
            .unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        let want = fx[format!("loss_{key}")].as_f64().unwrap();
        assert!((loss - want).abs() < 1e-4, "{key}: {loss} vs TRL {want}");
    }
}

/// Pairs the reward model can learn to separate: counting up is preferred to counting down.
fn counting_pairs(range: std::ops::Range<u32>) -> Vec<Value> {
    range
        .map(|k| {
            let up: Vec<String> = (k..k + 4).map(|x| (x % 10).to_string()).collect();
            let down: Vec<String> = up.iter().rev().cloned().collect();
            serde_json::json!({
                "prompt": [{"role": "user", "content": format!("Count from {}.", k % 10)}],
                "chosen": [{"role": "assistant", "content": up.join(" ")}],
                "rejected": [{"role": "assistant", "content": down.join(" ")}],
            })
        })
        .collect()
}

#[test]
fn reward_training_separates_held_out_pairs() {
    use crate::train::{train, Hooks, RunPaths, TrainConfig};
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("qwen2");
    let ck = Checkpoint::open(&base).unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &counting_pairs(0..40));
    let held: Vec<Value> = counting_pairs(40..60)
        .into_iter()
        .enumerate()
        // Held-out pairs in both orders of presentation are still judged chosen > rejected.
        .map(|(i, mut v)| {
            if i % 2 == 1 {
                v["prompt"][0]["content"] = format!("Please count from {}.", (40 + i) % 10).into();
            }
            v
        })
        .collect();
    let obj = RewardObjective::load(
        &data,
        ck.template().unwrap(),
        ck.tokenizer().unwrap(),
        128,
        pad_of(&ck),
        None,
    )
    .unwrap();
    let cfg = TrainConfig {
        lr: 3e-3,
        epochs: 6,
        batch_size: 8,
        grad_accum: 1,
        max_len: 128,
        warmup_ratio: 0.1,
        max_grad_norm: 1.0,
        adamw: Default::default(),
        seed: 1,
        save_steps: 0,
        keep_last: 1,
        compute_dtype: "f32".into(),
    };
    let paths = RunPaths {
        out: tmp.path().join("rm"),
    };
    let summary = train(
        &base,
        &obj,
        None,
        &cfg,
        &paths,
        &Device::Cpu,
        &Hooks {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(summary.steps, 30);
    // The saved model is a classifier that transformers' layout (and our loader) reads back.
    let trained = Checkpoint::open(&paths.model()).unwrap();
    assert_eq!(
        trained.config.raw["architectures"][0],
        "Qwen2ForSequenceClassification"
    );
    let rm = RewardModel::load(&trained, &Device::Cpu, DType::F32).unwrap();
    let score = |msgs: &Value| {
        rm.score_conversations(&trained, std::slice::from_ref(msgs), 1, &mut |_| {})
            .unwrap()[0][0]
    };
    let conv = |v: &Value, k: &str| {
        let mut m = v["prompt"].as_array().unwrap().clone();
        m.extend(v[k].as_array().unwrap().iter().cloned());
        Value::Array(m)
    };
    let before = RewardModel::load(&ck, &Device::Cpu, DType::F32).unwrap();
    let score0 = |msgs: &Value| {
        before
            .score_conversations(&ck, std::slice::from_ref(msgs), 1, &mut |_| {})
            .unwrap()[0][0]
    };
    let acc = pair_accuracy(
        &held
            .iter()
            .map(|v| (score(&conv(v, "chosen")), score(&conv(v, "rejected"))))
            .collect::<Vec<_>>(),
    );
    let acc0 = pair_accuracy(
        &held
            .iter()
            .map(|v| (score0(&conv(v, "chosen")), score0(&conv(v, "rejected"))))
            .collect::<Vec<_>>(),
    );
    eprintln!("held-out pair accuracy {acc} (before training {acc0})");
    assert!(acc0 < 0.9, "the task must need training: {acc0} before");
    assert!(
        acc >= 0.9,
        "held-out pair accuracy {acc} (before training {acc0})"
    );
}
