//! Model-stack and trainer throughput, one scenario per process so peak memory is measured per
//! scenario. Driven by `benches/model.sh`, which runs the PyTorch peer (`benches/model_torch.py`) on
//! the same checkpoint, same shapes, same machine, in the same run.
//!
//! `cargo bench --bench model -- init <dir>`            write a random Llama checkpoint
//! `cargo bench --bench model -- train <dir> <steps>`   SFT step: forward + backward + AdamW
//! `cargo bench --bench model -- dpo <dir> <steps>`     DPO step (policy + cached reference log-probs)
//! `cargo bench --bench model -- generate <dir> <batch> <new>`  greedy decoding with a KV cache

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use fuselab::generate::{generate, Rng, SamplingParams};
use fuselab::model::{load_weights, save_checkpoint, Checkpoint, Decoder, ModelConfig};
use fuselab::train::optim::{accumulate, clip_grad_norm, AdamW, AdamWConfig};

const VOCAB: usize = 8192;
const SEQ: usize = 256;
const BATCH: usize = 8;

fn config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
        "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "hidden_act": "silu", "dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2
    })
}

fn tokens(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n)
        .map(|_| 3 + (rng.next_u64() % (VOCAB as u64 - 3)) as u32)
        .collect()
}

fn load(dir: &Path) -> (ModelConfig, std::collections::HashMap<String, Tensor>) {
    let ck = Checkpoint::open(dir).unwrap();
    let w = load_weights(dir, &ck.config, &Device::Cpu, DType::F32).unwrap();
    (ck.config, w)
}

fn report(what: &str, tokens: usize, secs: f64) {
    println!(
        "{{\"scenario\": \"{what}\", \"tokens\": {tokens}, \"seconds\": {secs:.4}, \"tokens_per_s\": {:.1}}}",
        tokens as f64 / secs
    );
}

fn main() {
    fuselab::util::tune_allocator(true);
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let dir = Path::new(&args[1]);
    let mut rng = Rng::new(1, 0);
    match args[0].as_str() {
        "init" => {
            let cfg = ModelConfig::from_value(config(), &dir.join("config.json")).unwrap();
            let mut w = BTreeMap::new();
            for (name, shape) in cfg.expected_tensors() {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = if name.ends_with("norm.weight") {
                    vec![1.0; n]
                } else {
                    (0..n)
                        .map(|_| (rng.next_f64() as f32 - 0.5) * 0.04)
                        .collect()
                };
                w.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
            }
            save_checkpoint(dir, &cfg, &w, DType::F32, None).unwrap();
        }
        "train" | "dpo" => {
            let steps: usize = args[2].parse().unwrap();
            let (cfg, w) = load(dir);
            let (model, vars) = Decoder::trainable(cfg, w).unwrap();
            let mut opt = AdamW::new(AdamWConfig::default());
            let ids: Vec<Vec<u32>> = (0..BATCH).map(|_| tokens(&mut rng, SEQ)).collect();
            let mask = vec![vec![1u8; SEQ]; BATCH];
            // DPO: 4 pairs = 8 sequences of 256 (128 prompt + 128 answer); reference log-probs are
            // computed once beforehand (as the trainer does), so a step is one policy forward/backward.
            let ref_logps = Tensor::zeros(BATCH / 2, DType::F32, &Device::Cpu).unwrap();
            let comp: Vec<f32> = (0..BATCH)
                .flat_map(|_| (1..SEQ).map(|j| (j >= SEQ / 2) as u8 as f32))
                .collect();
            let comp = Tensor::from_vec(comp, (BATCH, SEQ - 1), &Device::Cpu).unwrap();
            let mut total = 0.0;
            for s in 0..=steps {
                let t0 = Instant::now();
                // The trainer's path: a recorded forward, the loss on the log-probs by autograd, then
                // the hand-written backward through the model.
                let traced = model.traced_logprobs(&ids, &mask).unwrap();
                let lpv = Var::from_tensor(&traced.logps).unwrap();
                let lp = lpv.as_tensor().clone();
                let loss = if args[0] == "train" {
                    (lp.sum_all().unwrap().neg().unwrap() / (BATCH * (SEQ - 1)) as f64).unwrap()
                } else {
                    let seq = (lp * &comp).unwrap().sum(1).unwrap();
                    let c = seq.narrow(0, 0, BATCH / 2).unwrap();
                    let r = seq.narrow(0, BATCH / 2, BATCH / 2).unwrap();
                    let d = ((c - &ref_logps).unwrap() - (r - &ref_logps).unwrap()).unwrap();
                    let z = (d * 0.1).unwrap();
                    // -log sigmoid(z) = softplus(-z)
                    let sp = (z.neg().unwrap().exp().unwrap() + 1.0)
                        .unwrap()
                        .log()
                        .unwrap();
                    sp.mean_all().unwrap()
                };
                let t1 = Instant::now();
                let g = loss.backward().unwrap();
                let mut grads = BTreeMap::new();
                accumulate(&mut grads, traced.backward(g.get(&lpv).unwrap()).unwrap()).unwrap();
                let t2 = Instant::now();
                clip_grad_norm(&mut grads, 1.0).unwrap();
                opt.update(&vars, &grads, 1e-4).unwrap();
                if std::env::var_os("FUSELAB_BENCH_BREAKDOWN").is_some() {
                    eprintln!(
                        "forward {:.3}s backward {:.3}s optimizer {:.3}s",
                        (t1 - t0).as_secs_f64(),
                        (t2 - t1).as_secs_f64(),
                        t2.elapsed().as_secs_f64()
                    );
                }
                if s > 0 {
                    // The first step warms allocators and thread pools.
                    total += t0.elapsed().as_secs_f64();
                }
            }
            report(&args[0], steps * BATCH * SEQ, total);
        }
        "generate" => {
            let batch: usize = args[2].parse().unwrap();
            let new: usize = args[3].parse().unwrap();
            let (cfg, w) = load(dir);
            let model = Decoder::new(cfg, w).unwrap();
            let prompts: Vec<Vec<u32>> = (0..batch).map(|_| tokens(&mut rng, 16)).collect();
            let params = SamplingParams {
                max_new_tokens: new,
                ..Default::default()
            };
            let _ = generate(
                &model,
                &prompts,
                &SamplingParams {
                    max_new_tokens: 2,
                    ..params.clone()
                },
                &|_| String::new(),
            );
            let t0 = Instant::now();
            let out = generate(&model, &prompts, &params, &|_| String::new()).unwrap();
            let n: usize = out.iter().map(|g| g.tokens.len()).sum();
            report(&format!("generate_b{batch}"), n, t0.elapsed().as_secs_f64());
        }
        other => panic!("unknown scenario {other}"),
    }
}
