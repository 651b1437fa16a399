//! Trainers against TRL/transformers fixtures, learning on small tasks, exact resume, bad data.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::*;
use crate::model::{load_weights, Checkpoint, Decoder};

fn hf(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn trl() -> Value {
    serde_json::from_str(&std::fs::read_to_string(hf("trl.json")).unwrap()).unwrap()
}

fn write_jsonl(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let p = dir.join(name);
    let body: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&p, body.join("\n") + "\n").unwrap();
    p
}

fn decoder(name: &str) -> Decoder {
    let ck = Checkpoint::open(&hf(name)).unwrap();
    let w = load_weights(&ck.dir, &ck.config, &Device::Cpu, DType::F32).unwrap();
    Decoder::new(ck.config.clone(), w).unwrap()
}

fn dpo_objective(dir: &Path, rows: &[Value], loss: DpoLoss) -> DpoObjective {
    let ck = Checkpoint::open(&hf("llama")).unwrap();
    let data = write_jsonl(dir, "pairs.jsonl", rows);
    DpoObjective::load(
        &data,
        ck.template().unwrap(),
        ck.tokenizer().unwrap(),
        2048,
        &Value::Null,
        0.1,
        loss,
    )
    .unwrap()
}

#[test]
fn dpo_step_zero_matches_trl() {
    let fx = trl();
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = fx["dpo_rows"].as_array().unwrap().clone();
    for (loss_name, loss) in [
        (
            "sigmoid",
            DpoLoss::Sigmoid {
                label_smoothing: 0.0,
            },
        ),
        ("sigmoid_norm", DpoLoss::LnDpo),
    ] {
        let mut obj = dpo_objective(tmp.path(), &rows, loss);
        // Same tokenisation as TRL.
        for (p, t) in obj.pairs().zip(fx["tokenized"].as_array().unwrap()) {
            let ids = |k: &str| -> Vec<u32> { serde_json::from_value(t[k].clone()).unwrap() };
            assert_eq!(p.prompt, ids("prompt_ids"));
            assert_eq!(p.chosen, ids("chosen_ids"));
            assert_eq!(p.rejected, ids("rejected_ids"));
        }
        obj.compute_reference(&decoder("qwen2")).unwrap();
        let policy = decoder("llama");
        let all: Vec<usize> = (0..3).collect();
        let out = obj
            .micro_loss(&policy, &Default::default(), &all, 0, 1, 3.0)
            .unwrap();
        let loss: f64 = out.loss.to_dtype(DType::F64).unwrap().to_scalar().unwrap();
        let want = &fx["dpo"][loss_name];
        assert!(
            (loss - want["loss"].as_f64().unwrap()).abs() < 1e-4,
            "{loss_name}: {loss} vs {}",
            want["loss"]
        );
        let m = obj.finish_metrics(&out.sums, 3);
        for k in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ] {
            let (g, w) = (m[k], want[k].as_f64().unwrap());
            assert!(
                (g - w).abs() < 1e-4 * w.abs().max(1.0),
                "{loss_name} {k}: {g} vs {w}"
            );
        }
    }
}

/// `data` tokenised for SFT with `ck`'s template and tokenizer.
fn sft_objective(ck: &Checkpoint, data: &Path, max_len: usize) -> SftObjective {
    SftObjective::load(
        data,
        ck.template().unwrap(),
        ck.tokenizer().unwrap(),
        max_len,
        &Value::Null,
    )
    .unwrap()
}

/// The SFT conversations of the TRL fixture, written as a JSONL data file.
fn trl_sft_rows(fx: &Value, dir: &Path) -> PathBuf {
    let rows: Vec<Value> = fx["sft"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| json!({"messages": r["messages"]}))
        .collect();
    write_jsonl(dir, "sft.jsonl", &rows)
}

#[test]
fn sft_loss_matches_transformers_masked_loss() {
    let fx = trl();
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open(&hf("llama")).unwrap();
    let data = trl_sft_rows(&fx, tmp.path());
    let obj = sft_objective(&ck, &data, 2048);
    for (i, r) in fx["sft"]["rows"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
        let mask: Vec<u8> = serde_json::from_value(r["assistant_mask"].clone()).unwrap();
        assert_eq!(obj.examples[i].1, ids);
        assert_eq!(obj.examples[i].2, mask, "assistant mask of row {i}");
    }
    let model = decoder("llama");
    let all = [0usize, 1];
    let out = obj
        .micro_loss(
            &model,
            &Default::default(),
            &all,
            0,
            1,
            obj.normaliser(&all),
        )
        .unwrap();
    let loss: f64 = out.loss.to_dtype(DType::F64).unwrap().to_scalar().unwrap();
    let want = fx["sft"]["batch_loss"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-4, "{loss} vs {want}");
}

/// Weight gradients of a micro-batch loss, through the hand-written backward.
fn micro_grads(out: super::objective::MicroOut) -> BTreeMap<String, Tensor> {
    let g = out.loss.backward().unwrap();
    let mut acc = BTreeMap::new();
    for (leaf, traced) in out.traces {
        let d = g.get(&leaf).expect("the loss uses the log-probs");
        super::optim::accumulate(&mut acc, traced.backward(d).unwrap()).unwrap();
    }
    acc
}

#[test]
fn packing_changes_neither_loss_nor_gradients() {
    let fx = trl();
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open(&hf("llama")).unwrap();
    let data = trl_sft_rows(&fx, tmp.path());
    let load = || sft_objective(&ck, &data, 2048);
    let plain = load();
    let mut packed = load();
    assert_eq!(packed.pack(4096), 1, "both conversations fit one row");
    let total: usize = plain.examples.iter().map(|e| e.1.len()).sum();
    assert_eq!(packed.examples[0].1.len(), total);
    let model = decoder("llama");
    let loss = |o: &super::objective::MicroOut| -> f64 {
        o.loss.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
    };
    let all = [0usize, 1];
    let u = plain
        .micro_loss(
            &model,
            &Default::default(),
            &all,
            0,
            1,
            plain.normaliser(&all),
        )
        .unwrap();
    let p = packed
        .micro_loss(
            &model,
            &Default::default(),
            &[0],
            0,
            1,
            packed.normaliser(&[0]),
        )
        .unwrap();
    assert_eq!(plain.normaliser(&all), packed.normaliser(&[0]));
    assert!(
        (loss(&u) - loss(&p)).abs() < 1e-5,
        "{} vs {}",
        loss(&u),
        loss(&p)
    );
    let (gu, gp) = (micro_grads(u), micro_grads(p));
    assert_eq!(gu.len(), gp.len());
    for (name, a) in &gu {
        let scale = crate::model::max_abs(a);
        let d = crate::model::max_abs_diff(a, &gp[name]);
        assert!(
            d <= 1e-4 * scale.max(1e-3),
            "`{name}`: packed gradient off by {d} (scale {scale})"
        );
    }
    // A row too short for both keeps them apart.
    let mut apart = load();
    assert_eq!(apart.pack(total - 1), 2);
}

/// A small task the tiny model can learn: count up from a number.
fn count_rows(range: std::ops::Range<u32>) -> Vec<Value> {
    range
        .map(|i| {
            let n = i % 5 + 1;
            let ans: Vec<String> = (n..n + 4).map(|x| x.to_string()).collect();
            json!({"messages": [{"role": "user", "content": format!("Count from {n}.")},
                                {"role": "assistant", "content": ans.join(" ")}]})
        })
        .collect()
}

fn quick_cfg(steps_lr: f64) -> TrainConfig {
    TrainConfig {
        lr: steps_lr,
        epochs: 6,
        batch_size: 4,
        grad_accum: 2,
        max_len: 64,
        warmup_ratio: 0.1,
        max_grad_norm: 1.0,
        adamw: Default::default(),
        seed: 3,
        save_steps: 4,
        keep_last: 2,
        compute_dtype: "f32".into(),
    }
}

/// Train the llama fixture with SFT on the counting task; returns the held-out loss before and
/// after, the summary and the run's paths (inside `tmp`).
fn sft_on_counting(
    tmp: &Path,
    cfg: &TrainConfig,
    with_eval: bool,
) -> (f64, f64, TrainSummary, RunPaths) {
    let ck = Checkpoint::open(&hf("llama")).unwrap();
    let train_p = write_jsonl(tmp, "train.jsonl", &count_rows(0..16));
    let eval_p = write_jsonl(tmp, "eval.jsonl", &count_rows(100..105));
    let (t, k) = (ck.template().unwrap(), ck.tokenizer().unwrap());
    let train_o = SftObjective::load(&train_p, t, k, 64, &Value::Null).unwrap();
    let eval_o = SftObjective::load(&eval_p, t, k, 64, &Value::Null).unwrap();
    let before = evaluate(&decoder("llama"), &Default::default(), &eval_o)
        .unwrap()
        .0;
    let paths = RunPaths {
        out: tmp.join("run"),
    };
    let hooks = Hooks {
        quiet: true,
        ..Default::default()
    };
    let eval = with_eval.then_some(&eval_o as &dyn Objective);
    let s = train(
        &hf("llama"),
        &train_o,
        eval,
        cfg,
        &paths,
        &Device::Cpu,
        &hooks,
    )
    .unwrap();
    let trained = Checkpoint::open(&s.model).unwrap();
    let w = load_weights(&s.model, &trained.config, &Device::Cpu, DType::F32).unwrap();
    let after = evaluate(
        &Decoder::new(trained.config.clone(), w).unwrap(),
        &Default::default(),
        &eval_o,
    )
    .unwrap()
    .0;
    (before, after, s, paths)
}

#[test]
fn sft_lowers_held_out_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let (before, after, s, paths) = sft_on_counting(tmp.path(), &quick_cfg(3e-3), true);
    assert_eq!(s.steps, 12);
    assert!(after < 0.5 * before, "held-out loss {before} -> {after}");
    // Metrics stream: one line per step with the usual fields.
    let lines: Vec<Value> = std::fs::read_to_string(paths.metrics())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    for k in [
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "epoch",
    ] {
        assert!(lines[5].get(k).is_some(), "{k}");
    }
    assert!(lines[11].get("eval/loss").is_some());
}

/// keep-last must prune: more checkpoints are saved (2, 4, ..., 10) than kept (the last two, plus
/// the best by held-out loss).
#[test]
fn keep_last_prunes_older_checkpoints_but_keeps_the_best() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        save_steps: 2,
        keep_last: 2,
        ..quick_cfg(3e-3)
    };
    let (_, _, s, paths) = sft_on_counting(tmp.path(), &cfg, true);
    assert_eq!(s.steps, 12);
    let cks: std::collections::BTreeSet<usize> =
        paths.checkpoints().into_iter().map(|c| c.0).collect();
    let best = s
        .best_checkpoint
        .expect("held-out data picks a best checkpoint");
    let mut want: std::collections::BTreeSet<usize> = [8, 10].into();
    want.insert(best);
    assert_eq!(cks, want, "best {best}");
    assert!(
        !cks.contains(&2) || best == 2,
        "checkpoint-2 should have been pruned: {cks:?}"
    );
}

#[test]
fn dpo_raises_held_out_reward_accuracy_and_margin() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = |i: u32| {
        let n = i % 5 + 1;
        let up: Vec<String> = (n..n + 4).map(|x| x.to_string()).collect();
        let mut down = up.clone();
        down.reverse();
        json!({"prompt": [{"role": "user", "content": format!("Count from {n}.")}],
               "chosen": [{"role": "assistant", "content": up.join(" ")}],
               "rejected": [{"role": "assistant", "content": down.join(" ")}]})
    };
    let ck = Checkpoint::open(&hf("llama")).unwrap();
    let (t, k) = (ck.template().unwrap(), ck.tokenizer().unwrap());
    let mk = |name: &str, r: std::ops::Range<u32>| {
        let rows: Vec<Value> = r.map(pair).collect();
        let p = write_jsonl(tmp.path(), name, &rows);
        let mut o = DpoObjective::load(
            &p,
            t,
            k,
            64,
            &Value::Null,
            0.1,
            DpoLoss::Sigmoid {
                label_smoothing: 0.0,
            },
        )
        .unwrap();
        o.compute_reference(&decoder("llama")).unwrap();
        o
    };
    let train_o = mk("train.jsonl", 0..16);
    let eval_o = mk("eval.jsonl", 100..105);
    let (_, m0) = evaluate(&decoder("llama"), &Default::default(), &eval_o).unwrap();
    assert_eq!(
        m0["rewards/margins"], 0.0,
        "policy = reference at the start"
    );
    let paths = RunPaths {
        out: tmp.path().join("run"),
    };
    let hooks = Hooks {
        quiet: true,
        ..Default::default()
    };
    let s = train(
        &hf("llama"),
        &train_o,
        Some(&eval_o),
        &quick_cfg(2e-3),
        &paths,
        &Device::Cpu,
        &hooks,
    )
    .unwrap();
    let trained = Checkpoint::open(&s.model).unwrap();
    let w = load_weights(&s.model, &trained.config, &Device::Cpu, DType::F32).unwrap();
    let (_, m1) = evaluate(
        &Decoder::new(trained.config.clone(), w).unwrap(),
        &Default::default(),
        &eval_o,
    )
    .unwrap();
    assert!(m1["rewards/accuracies"] >= 0.8, "{m1:?}");
    assert!(m1["rewards/margins"] > 0.5, "{m1:?}");
}

#[test]
fn resume_after_a_crash_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open(&hf("qwen2")).unwrap();
    let data = write_jsonl(tmp.path(), "train.jsonl", &count_rows(0..16));
    let obj = sft_objective(&ck, &data, 64);
    let cfg = TrainConfig {
        save_steps: 3,
        ..quick_cfg(1e-3)
    };
    let quiet = Hooks {
        quiet: true,
        ..Default::default()
    };
    let a = RunPaths {
        out: tmp.path().join("a"),
    };
    train(&hf("qwen2"), &obj, None, &cfg, &a, &Device::Cpu, &quiet).unwrap();
    let b = RunPaths {
        out: tmp.path().join("b"),
    };
    let crash = Hooks {
        crash_after_step: Some(8),
        quiet: true,
    };
    assert!(train(&hf("qwen2"), &obj, None, &cfg, &b, &Device::Cpu, &crash).is_err());
    let s = train(&hf("qwen2"), &obj, None, &cfg, &b, &Device::Cpu, &quiet).unwrap();
    assert_eq!(s.resumed_from, Some(6));
    let wa = std::fs::read(a.model().join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.model().join("model.safetensors")).unwrap();
    assert!(
        wa == wb,
        "resumed weights differ from the uninterrupted run"
    );
    // The metric stream is the same too, apart from timings.
    let strip = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("tokens_per_s");
                v
            })
            .collect()
    };
    assert_eq!(strip(&a.metrics()), strip(&b.metrics()));
}

#[test]
fn resume_refuses_changed_settings_or_data() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open(&hf("llama")).unwrap();
    let data = write_jsonl(tmp.path(), "train.jsonl", &count_rows(0..16));
    let load = || sft_objective(&ck, &data, 64);
    let obj = load();
    let cfg = TrainConfig {
        save_steps: 2,
        ..quick_cfg(1e-3)
    };
    let run = RunPaths {
        out: tmp.path().join("run"),
    };
    let crash = Hooks {
        crash_after_step: Some(3),
        quiet: true,
    };
    let quiet = Hooks {
        quiet: true,
        ..Default::default()
    };
    assert!(train(&hf("llama"), &obj, None, &cfg, &run, &Device::Cpu, &crash).is_err());
    let other_lr = TrainConfig {
        lr: 2e-3,
        ..cfg.clone()
    };
    let e = train(
        &hf("llama"),
        &obj,
        None,
        &other_lr,
        &run,
        &Device::Cpu,
        &quiet,
    )
    .expect_err("a changed learning rate must not resume")
    .to_string();
    assert!(
        e.contains("checkpoint-2") && e.contains("lr 0.001 -> 0.002"),
        "{e}"
    );
    let mut packed = load();
    packed.pack(64);
    assert!(packed.len() < obj.len());
    let e = train(
        &hf("llama"),
        &packed,
        None,
        &cfg,
        &run,
        &Device::Cpu,
        &quiet,
    )
    .expect_err("packed data must not resume an unpacked run")
    .to_string();
    assert!(e.contains("training examples differ"), "{e}");
    // Where the results are written may change; the run then completes.
    let more_ckpts = TrainConfig {
        save_steps: 5,
        keep_last: 1,
        ..cfg.clone()
    };
    let s = train(
        &hf("llama"),
        &obj,
        None,
        &more_ckpts,
        &run,
        &Device::Cpu,
        &quiet,
    )
    .unwrap();
    assert_eq!(s.resumed_from, Some(2));
}

#[test]
fn bad_rows_are_errors_or_counted_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open(&hf("llama")).unwrap();
    let (t, k) = (ck.template().unwrap(), ck.tokenizer().unwrap());
    let p = |c: &str| json!([{"role": "user", "content": c}]);
    let a = |c: &str| json!([{"role": "assistant", "content": c}]);
    let good = json!({"prompt": p("hi"), "chosen": a("yes"), "rejected": a("no")});
    for (bad, needle) in [
        (
            json!({"prompt": p("hi"), "rejected": a("no")}),
            "pairs.jsonl:2: no `chosen`",
        ),
        (
            json!({"prompt": p("hi"), "chosen": a("  "), "rejected": a("no")}),
            "pairs.jsonl:2: `chosen`[0]: empty assistant response",
        ),
        (
            json!({"prompt": "hi", "chosen": a("x"), "rejected": a("no")}),
            "pairs.jsonl:2: `prompt` is not a list",
        ),
    ] {
        let data = write_jsonl(tmp.path(), "pairs.jsonl", &[good.clone(), bad]);
        let e = DpoObjective::load(&data, t, k, 64, &Value::Null, 0.1, DpoLoss::LnDpo)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
    // A prompt longer than max_len is skipped and counted.
    let long = json!({"prompt": p(&"word ".repeat(200)), "chosen": a("yes"), "rejected": a("no")});
    let data = write_jsonl(tmp.path(), "pairs.jsonl", &[good.clone(), long]);
    let o = DpoObjective::load(&data, t, k, 64, &Value::Null, 0.1, DpoLoss::LnDpo).unwrap();
    assert_eq!((o.len(), o.skipped()), (1, 1));
    // NaN weights are refused when the model is loaded, naming the tensor (finding 20).
    let nan_dir = tmp.path().join("nan");
    let cfgm = ck.config.clone();
    let mut w = load_weights(&ck.dir, &cfgm, &Device::Cpu, DType::F32).unwrap();
    let clean = w["model.norm.weight"].clone();
    w.insert(
        "model.norm.weight".into(),
        (clean.clone() * f64::NAN).unwrap(),
    );
    let weights: BTreeMap<String, Tensor> = w.clone().into_iter().collect();
    crate::model::save_checkpoint(&nan_dir, &cfgm, &weights, DType::F32, Some(&ck.dir)).unwrap();
    let e = load_weights(&nan_dir, &cfgm, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.norm.weight") && e.contains("NaN"), "{e}");
    // Finite weights so large that the logits overflow: the non-finite loss stops training before
    // any update, naming the step and rows.
    let big_dir = tmp.path().join("big");
    w.insert("model.norm.weight".into(), (clean * 1e38).unwrap());
    let weights: BTreeMap<String, Tensor> = w.into_iter().collect();
    crate::model::save_checkpoint(&big_dir, &cfgm, &weights, DType::F32, Some(&ck.dir)).unwrap();
    let data = write_jsonl(tmp.path(), "sft.jsonl", &count_rows(0..4));
    let obj = SftObjective::load(&data, t, k, 64, &Value::Null).unwrap();
    let paths = RunPaths {
        out: tmp.path().join("nanrun"),
    };
    let e = train(
        &big_dir,
        &obj,
        None,
        &quick_cfg(1e-3),
        &paths,
        &Device::Cpu,
        &Hooks {
            quiet: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("non-finite") && e.contains("step 1") && e.contains("no update"),
        "{e}"
    );
}

#[test]
fn wrpo_alpha_blends_source_and_target_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let row = json!({"prompt": [{"role": "user", "content": "Count from 1."}],
                     "chosen": [{"role": "assistant", "content": "1 2 3 4"}],
                     "chosen_target": [{"role": "assistant", "content": "1 2 3"}],
                     "rejected": [{"role": "assistant", "content": "4 3 2 1"}]});
    let loss_at = |alpha: f64, dynamic: bool, step: usize| {
        let mut o = dpo_objective(
            tmp.path(),
            std::slice::from_ref(&row),
            DpoLoss::Wrpo {
                alpha,
                dynamic,
                label_smoothing: 0.0,
            },
        );
        o.compute_reference(&decoder("qwen2")).unwrap();
        let out = o
            .micro_loss(&decoder("llama"), &Default::default(), &[0], step, 10, 1.0)
            .unwrap();
        out.loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let sig = |chosen: &str| {
        let r = json!({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": chosen}], "rejected": row["rejected"]});
        let mut o = dpo_objective(
            tmp.path(),
            &[r],
            DpoLoss::Sigmoid {
                label_smoothing: 0.0,
            },
        );
        o.compute_reference(&decoder("qwen2")).unwrap();
        let out = o
            .micro_loss(&decoder("llama"), &Default::default(), &[0], 0, 10, 1.0)
            .unwrap();
        out.loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    // alpha_t = 0 at step 0 (dynamic): pure target answer; constant alpha 1: pure source answer.
    assert!((loss_at(0.5, true, 0) - sig("1 2 3")).abs() < 1e-6);
    assert!((loss_at(1.0, false, 7) - sig("1 2 3 4")).abs() < 1e-6);
    let mid = loss_at(1.0, true, 5);
    assert!(mid != sig("1 2 3") && mid != sig("1 2 3 4"));
}

#[test]
fn parquet_rows_load_like_jsonl() {
    let fx = trl();
    let ck = Checkpoint::open(&hf("llama")).unwrap();
    let (t, k) = (ck.template().unwrap(), ck.tokenizer().unwrap());
    let loss = DpoLoss::Sigmoid {
        label_smoothing: 0.0,
    };
    let pq = DpoObjective::load(
        &hf("dpo_rows.parquet"),
        t,
        k,
        2048,
        &Value::Null,
        0.1,
        loss.clone(),
    )
    .unwrap();
    for (p, want) in pq.pairs().zip(fx["tokenized"].as_array().unwrap()) {
        let ids: Vec<u32> = serde_json::from_value(want["chosen_ids"].clone()).unwrap();
        assert_eq!(p.chosen, ids);
    }
    assert_eq!(pq.len(), 3);
    let sft = SftObjective::load(&hf("sft_rows.parquet"), t, k, 2048, &Value::Null).unwrap();
    let want: Vec<u32> = serde_json::from_value(fx["sft"]["rows"][1]["input_ids"].clone()).unwrap();
    assert_eq!(sft.examples[1].1, want);
}

#[test]
fn bf16_compute_trains_f32_master_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        compute_dtype: "bf16".into(),
        save_steps: 0,
        ..quick_cfg(3e-3)
    };
    let (before, after, s, _) = sft_on_counting(tmp.path(), &cfg, false);
    let trained = Checkpoint::open(&s.model).unwrap();
    assert_eq!(
        trained.config.raw["dtype"], "float32",
        "masters are saved in f32"
    );
    assert!(
        after < 0.6 * before,
        "bf16 compute: held-out loss {before} -> {after}"
    );
}
