//! The model stack against references made by Hugging Face transformers
//! (tests/fixtures/make_model_fixtures.py), plus gradients against finite differences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::*;
use crate::generate::{generate, SamplingParams};

const FAMILIES: [&str; 4] = ["llama", "qwen2", "mistral", "gemma2"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

fn load(name: &str) -> (Checkpoint, Decoder, Value) {
    let dir = fixtures().join(name);
    let ck = Checkpoint::open(&dir).unwrap();
    let w = load_weights(&dir, &ck.config, &Device::Cpu, DType::F32).unwrap();
    let dec = Decoder::new(ck.config.clone(), w).unwrap();
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (ck, dec, exp)
}

fn rows<T: serde::de::DeserializeOwned>(v: &Value) -> Vec<T> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn logprobs_match_transformers_for_every_family() {
    for name in FAMILIES {
        let (_, dec, exp) = load(name);
        let ids: Vec<Vec<u32>> = rows(&exp["input_ids"]);
        let mask: Vec<Vec<u8>> = rows(&exp["attention_mask"]);
        let want: Vec<Vec<Option<f64>>> = rows(&exp["logprobs"]);
        let got: Vec<Vec<f32>> = dec.token_logprobs(&ids, &mask).unwrap().to_vec2().unwrap();
        let mut worst = 0.0f64;
        let mut checked = 0;
        for (g, w) in got.iter().zip(&want) {
            for (x, y) in g.iter().zip(w) {
                if let Some(y) = y {
                    worst = worst.max((*x as f64 - y).abs());
                    checked += 1;
                }
            }
        }
        assert!(checked >= 19, "{name}: only {checked} tokens compared");
        assert!(worst < 1e-4, "{name}: max |logprob diff| {worst:e}");
    }
}

#[test]
fn greedy_continuations_match_transformers_token_for_token() {
    for name in FAMILIES {
        let (_, dec, exp) = load(name);
        let prompts: Vec<Vec<u32>> = rows(&exp["prompts"]);
        let want: Vec<Vec<u32>> = rows(&exp["greedy_new_tokens"]);
        let params = SamplingParams {
            max_new_tokens: exp["max_new_tokens"].as_u64().unwrap() as usize,
            ..Default::default()
        };
        let got = generate(&dec, &prompts, &params, &|_| String::new()).unwrap();
        let got: Vec<Vec<u32>> = got.into_iter().map(|g| g.tokens).collect();
        assert_eq!(got, want, "{name}: batched, left-padded greedy decoding");
        // Each prompt alone gives the same tokens as in the batch.
        for (p, w) in prompts.iter().zip(&want) {
            let one = generate(&dec, std::slice::from_ref(p), &params, &|_| String::new()).unwrap();
            assert_eq!(&one[0].tokens, w, "{name}: unbatched");
        }
    }
}

#[test]
fn kv_cache_matches_full_forward() {
    let (_, dec, exp) = load("gemma2");
    let ids: Vec<Vec<u32>> = rows(&exp["input_ids"]);
    let ids = vec![ids[0].clone()];
    let mask = vec![vec![1u8; ids[0].len()]];
    let full: Vec<Vec<f32>> = dec
        .forward(&ids, &mask, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut cache = KvCache::new();
    let split = 7;
    dec.forward(
        &[ids[0][..split].to_vec()],
        &[mask[0][..split].to_vec()],
        Some(&mut cache),
    )
    .unwrap();
    for i in split..ids[0].len() {
        let step: Vec<Vec<f32>> = dec
            .forward(
                &[vec![ids[0][i]]],
                &[mask[0][..=i].to_vec()],
                Some(&mut cache),
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let diff = step[0]
            .iter()
            .zip(&full[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "position {i}: {diff}");
    }
}

#[test]
fn config_layouts_are_both_understood() {
    // mistral's fixture config is in the transformers 4.x layout, the others in 5.x.
    let m = ModelConfig::from_file(&fixtures().join("mistral/config.json")).unwrap();
    assert!(m.raw.get("torch_dtype").is_some() && m.raw.get("rope_parameters").is_none());
    assert_eq!(m.rope_theta, 10000.0);
    assert_eq!(m.layer_windows, vec![Some(6), Some(6)]);
    let l = ModelConfig::from_file(&fixtures().join("llama/config.json")).unwrap();
    assert!(l.raw.get("rope_parameters").is_some());
    assert_eq!(l.rope_theta, 500000.0);
    assert_eq!(l.rope_llama3.as_ref().unwrap().factor, 8.0);
    let g = ModelConfig::from_file(&fixtures().join("gemma2/config.json")).unwrap();
    assert_eq!(g.layer_windows, vec![Some(6), None]);
    assert!(g.tie_word_embeddings && g.query_pre_attn_scalar == Some(24.0));
    let q = ModelConfig::from_file(&fixtures().join("qwen2/config.json")).unwrap();
    assert!(q.qkv_bias && !q.o_bias && q.tie_word_embeddings);
    assert_eq!(q.dtype.as_deref(), Some("bfloat16"));
}

#[test]
fn saved_checkpoints_reload_identically() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let (ck, dec, exp) = load(name);
        let out = tmp.path().join(name);
        save_checkpoint(&out, &ck.config, &dec.weights(), DType::F32, Some(&ck.dir)).unwrap();
        let ck2 = Checkpoint::open(&out).unwrap();
        let w = load_weights(&out, &ck2.config, &Device::Cpu, DType::F32).unwrap();
        let dec2 = Decoder::new(ck2.config.clone(), w).unwrap();
        let ids: Vec<Vec<u32>> = rows(&exp["input_ids"]);
        let mask: Vec<Vec<u8>> = rows(&exp["attention_mask"]);
        let a: Vec<Vec<f32>> = dec.token_logprobs(&ids, &mask).unwrap().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = dec2.token_logprobs(&ids, &mask).unwrap().to_vec2().unwrap();
        assert_eq!(a, b, "{name}");
        assert!(out.join("tokenizer.json").is_file());
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], name);
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap(),
    )
    .unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/chat_templates");
    let mut n = 0;
    for c in cases["cases"].as_array().unwrap() {
        let path = dir.join(c["template"].as_str().unwrap());
        let t = ChatTemplate::new(
            std::fs::read_to_string(&path).unwrap(),
            path,
            c["bos_token"].as_str().map(str::to_string),
            c["eos_token"].as_str().map(str::to_string),
        );
        let got = t.render(
            &c["messages"],
            c["add_generation_prompt"].as_bool().unwrap(),
            &c["extra"],
        );
        let label = format!(
            "{} / {} / gen={}",
            c["template"], c["conversation"], c["add_generation_prompt"]
        );
        match (c.get("rendered"), got) {
            (Some(want), Ok(got)) => assert_eq!(got, want.as_str().unwrap(), "{label}"),
            (None, Err(e)) => {
                let msg = c["error"].as_str().unwrap();
                assert!(
                    e.to_string().contains(msg),
                    "{label}: {e} should contain {msg}"
                );
                assert!(
                    e.to_string().contains("gemma"),
                    "errors name the template file: {e}"
                );
            }
            (want, got) => panic!("{label}: expected {want:?}, got {got:?}"),
        }
        n += 1;
    }
    assert_eq!(n, 48);
}

#[test]
fn real_tokenizers_load_and_encode_rendered_text() {
    use std::io::Read;
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("real_tokenizers.json")).unwrap(),
    )
    .unwrap();
    let mut loaded: HashMap<String, tokenizers::Tokenizer> = HashMap::new();
    for c in &cases {
        let name = c["tokenizer"].as_str().unwrap();
        let tok = loaded.entry(name.to_string()).or_insert_with(|| {
            let gz = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/data/tokenizers")
                .join(name)
                .join("tokenizer.json.gz");
            let mut s = String::new();
            flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap())
                .read_to_string(&mut s)
                .unwrap();
            s.parse().unwrap()
        });
        let ids = tok
            .encode(c["text"].as_str().unwrap(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        let want: Vec<u32> = rows(&c["ids"]);
        assert_eq!(ids, want, "{name}");
    }
    assert!(loaded.len() == 3 && cases.len() >= 9);
}

/// A tiny random model of a family, built in memory.
fn tiny(family: &str) -> (ModelConfig, HashMap<String, Tensor>) {
    let raw = serde_json::json!({
        "model_type": family, "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 3,
        "attn_logit_softcapping": 4.0, "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 6,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": family != "llama",
        "attention_bias": family == "llama",
    });
    let cfg = ModelConfig::from_value(raw, Path::new("tiny/config.json")).unwrap();
    let mut rng = crate::generate::Rng::new(7, family.len() as u64);
    let mut w = HashMap::new();
    for (name, shape) in cfg.expected_tensors() {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| rng.next_f64() - 0.5).collect();
        w.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    }
    (cfg, w)
}

fn loss(dec: &Decoder) -> Tensor {
    let ids = vec![vec![1u32, 5, 7, 2, 9, 3], vec![4, 4, 8, 10, 0, 0]];
    let mask = vec![vec![1u8; 6], vec![1, 1, 1, 1, 0, 0]];
    let lp = dec.token_logprobs(&ids, &mask).unwrap();
    let m = Tensor::new(
        &[[1f64, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    (lp * m).unwrap().sum_all().unwrap().neg().unwrap()
}

#[test]
fn every_weight_gets_a_gradient_that_agrees_with_finite_differences() {
    for family in FAMILIES {
        let (cfg, w) = tiny(family);
        let (dec, vars) = Decoder::trainable(cfg.clone(), w).unwrap();
        let l = loss(&dec);
        let grads = l.backward().unwrap();
        for (name, var) in &vars {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{family}: no gradient reaches `{name}`"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(norm > 0.0, "{family}: zero gradient on `{name}`");
        }
        // Central differences on a few coordinates of every tensor, in f64.
        let base: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let mut worst = 0.0f64;
        for (name, var) in &vars {
            let g: Vec<f64> = grads
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let flat: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
            for &k in &[0usize, flat.len() / 2, flat.len() - 1] {
                let eps = 1e-5;
                let at = |delta: f64| {
                    let mut f = flat.clone();
                    f[k] += delta;
                    let mut w = base.clone();
                    w.insert(
                        name.clone(),
                        Tensor::from_vec(f, var.dims(), &Device::Cpu).unwrap(),
                    );
                    let d = Decoder::new(cfg.clone(), w).unwrap();
                    loss(&d).to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                let rel = (fd - g[k]).abs() / fd.abs().max(g[k].abs()).max(1e-3);
                worst = worst.max(rel);
                assert!(
                    rel < 1e-4,
                    "{family} `{name}`[{k}]: backward {} vs finite difference {fd}",
                    g[k]
                );
            }
        }
        assert!(worst < 1e-4);
    }
}

#[test]
fn bad_checkpoints_give_errors_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let d = tmp.path().join(format!("{name}-{}", rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    // A missing shard.
    let d = copy("llama");
    std::fs::remove_file(d.join("model-00003-of-00009.safetensors")).unwrap();
    let ck = Checkpoint::open(&d).unwrap();
    let e = load_weights(&d, &ck.config, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("model-00003-of-00009.safetensors"),
        "{e}"
    );
    // An unsupported architecture.
    let d = copy("qwen2");
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"qwen2\"", "\"falcon\"");
    std::fs::write(&cfg, text).unwrap();
    let e = Checkpoint::open(&d).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("unsupported architecture `falcon`"),
        "{e}"
    );
    // Shapes that disagree with the config.
    let d = copy("mistral");
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    let ck = Checkpoint::open(&d).unwrap();
    let e = load_weights(&d, &ck.config, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.safetensors")
            && e.contains("mlp.gate_proj.weight")
            && e.contains("[128, 64]"),
        "{e}"
    );
    // Malformed JSON names the line.
    let d = copy("gemma2");
    std::fs::write(
        d.join("config.json"),
        "{\n  \"model_type\": \"gemma2\",\n  oops\n}",
    )
    .unwrap();
    let e = Checkpoint::open(&d).err().unwrap().to_string();
    assert!(e.contains("config.json") && e.contains("line 3"), "{e}");
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn hand_written_backward_equals_autograd_for_every_family() {
    let ids = vec![vec![1u32, 5, 7, 2, 9, 3], vec![4, 4, 8, 10, 0, 0]];
    let mask = vec![vec![1u8; 6], vec![1, 1, 1, 1, 0, 0]];
    let m = Tensor::new(
        &[[1f64, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    for family in FAMILIES {
        let (cfg, w) = tiny(family);
        let (dec, vars) = Decoder::trainable(cfg.clone(), w).unwrap();
        let auto = loss(&dec).backward().unwrap();
        let traced = dec.traced_logprobs(&ids, &mask).unwrap();
        let plain = dec.token_logprobs(&ids, &mask).unwrap();
        let d = super::max_abs_diff(&traced.logps, &plain);
        assert!(d < 1e-12, "{family}: traced forward differs by {d}");
        let hand = traced.backward(&m.neg().unwrap()).unwrap();
        assert_eq!(
            hand.keys().collect::<Vec<_>>(),
            vars.keys().collect::<Vec<_>>(),
            "{family}: gradient names"
        );
        for (name, var) in &vars {
            let a = auto.get(var).unwrap();
            let h = &hand[name];
            assert_eq!(a.dims(), h.dims(), "{family} `{name}`");
            let scale = super::max_abs(a);
            assert!(scale > 0.0, "{family}: zero gradient on `{name}`");
            let diff = super::max_abs_diff(a, h);
            assert!(
                diff <= 1e-10 * scale.max(1.0),
                "{family} `{name}`: hand-written gradient off by {diff} (scale {scale})"
            );
        }
    }
}
