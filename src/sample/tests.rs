use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::job::{self, JobOptions, Model, SourceSpec};
use super::*;
use crate::data::{Category, Message, Prompt};
use crate::generate::generate;
use crate::model::{load_weights, Checkpoint};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// f64 weights: batch composition then changes logits only in the last bits, far below any gap
/// between the top two tokens, so greedy and seeded choices are comparable across batchings.
fn decoder(name: &str) -> (Checkpoint, Decoder) {
    let dir = fixture(name);
    let ck = Checkpoint::open(&dir).unwrap();
    let w = load_weights(&dir, &ck.config, &Device::Cpu, DType::F64).unwrap();
    let d = Decoder::new(ck.config.clone(), w).unwrap();
    (ck, d)
}

fn requests() -> Vec<Request> {
    (0..5)
        .map(|i| Request {
            prompt_id: format!("p{i}"),
            tokens: (0..(3 + 2 * i as u32))
                .map(|t| (7 * t + 11 * i as u32 + 1) % 90 + 2)
                .collect(),
            n: [1, 3, 2, 4, 1][i],
        })
        .collect()
}

fn run(dec: &Decoder, reqs: &[Request], p: &SamplingParams, slots: usize) -> (Vec<Answer>, Stats) {
    sample(
        dec,
        reqs,
        "src",
        p,
        slots,
        &|_| String::new(),
        &mut |_, _| {},
    )
    .unwrap()
}

#[test]
fn greedy_continuous_batching_equals_one_prompt_at_a_time() {
    for fam in ["llama", "gemma2"] {
        let (_, dec) = decoder(fam);
        let p = SamplingParams {
            max_new_tokens: 6,
            stop_token_ids: vec![5],
            ..Default::default()
        };
        let reqs = requests();
        let (got, stats) = run(&dec, &reqs, &p, 3);
        assert_eq!(got.len(), reqs.iter().map(|r| r.n as usize).sum::<usize>());
        // Each prompt is prefilled once, whatever its number of samples.
        assert_eq!(
            stats.prefill_tokens,
            reqs.iter().map(|r| r.tokens.len() as u64).sum::<u64>()
        );
        for a in &got {
            let want = generate(
                &dec,
                std::slice::from_ref(&reqs[a.request].tokens),
                &p,
                &|_| String::new(),
            )
            .unwrap()
            .pop()
            .unwrap();
            assert_eq!(
                (&a.tokens, a.finish),
                (&want.tokens, want.finish),
                "{fam} request {}",
                a.request
            );
        }
    }
}

/// Prompts opening with the same 12 tokens (a system prompt), then 1 to 7 of their own.
fn requests_sharing_a_prefix() -> Vec<Request> {
    let prefix: Vec<u32> = (0..12).map(|t| (5 * t + 3) % 90 + 2).collect();
    (0..6)
        .map(|i| Request {
            prompt_id: format!("s{i}"),
            tokens: prefix
                .iter()
                .copied()
                .chain((0..1 + i as u32).map(|t| (13 * t + 17 * i as u32 + 4) % 90 + 2))
                .collect(),
            n: [1, 2, 1, 3, 1, 2][i],
        })
        .collect()
}

#[test]
fn a_shared_prefix_is_prefilled_once_and_changes_no_answer() {
    for fam in ["llama", "mistral", "gemma2"] {
        let (_, dec) = decoder(fam);
        let reqs = requests_sharing_a_prefix();
        let all: u64 = reqs.iter().map(|r| r.tokens.len() as u64).sum();
        let greedy = SamplingParams {
            max_new_tokens: 6,
            ..Default::default()
        };
        // 16 slots: the six prompts are prefilled in one batch, the 12 shared tokens once.
        let (got, stats) = run(&dec, &reqs, &greedy, 16);
        assert_eq!(stats.shared_prefix_tokens, 12 * 5, "{fam}");
        assert_eq!(stats.prefill_tokens, all - 12 * 5, "{fam}");
        for a in &got {
            let want = generate(
                &dec,
                std::slice::from_ref(&reqs[a.request].tokens),
                &greedy,
                &|_| String::new(),
            )
            .unwrap()
            .pop()
            .unwrap();
            assert_eq!(a.tokens, want.tokens, "{fam} request {}", a.request);
        }
        // Seeded sampling: the same answers as one prompt at a time (nothing shared).
        let sampled = SamplingParams {
            max_new_tokens: 6,
            temperature: 1.0,
            top_p: 0.9,
            seed: 3,
            ..Default::default()
        };
        let (one, s1) = run(&dec, &reqs, &sampled, 1);
        assert_eq!(s1.shared_prefix_tokens, 0);
        assert_eq!(run(&dec, &reqs, &sampled, 16).0, one, "{fam}");
    }
}

#[test]
fn sampled_answers_do_not_depend_on_the_batch() {
    let (_, dec) = decoder("qwen2");
    let p = SamplingParams {
        max_new_tokens: 8,
        temperature: 1.0,
        top_p: 0.95,
        seed: 13,
        ..Default::default()
    };
    let reqs = requests();
    let (one, _) = run(&dec, &reqs, &p, 1);
    for slots in [2, 4, 16] {
        assert_eq!(run(&dec, &reqs, &p, slots).0, one, "{slots} slots");
    }
    // The samples of one prompt differ (their own streams), and another seed changes them.
    let p1: Vec<_> = one
        .iter()
        .filter(|a| a.request == 3)
        .map(|a| a.tokens.clone())
        .collect();
    assert_eq!(p1.len(), 4);
    assert!(p1.iter().any(|t| t != &p1[0]), "{p1:?}");
    let other = run(
        &dec,
        &reqs,
        &SamplingParams {
            seed: 14,
            ..p.clone()
        },
        4,
    )
    .0;
    assert_ne!(other, one);
    // A sample's stream is fixed by (seed, prompt id, source, index): a prompt alone draws the same.
    let alone = run(&dec, &reqs[3..4], &p, 2).0;
    let want: Vec<_> = one
        .iter()
        .filter(|a| a.request == 3)
        .map(|a| &a.tokens)
        .collect();
    assert_eq!(alone.iter().map(|a| &a.tokens).collect::<Vec<_>>(), want);
}

#[test]
fn lengths_and_context_are_respected() {
    let (_, dec) = decoder("mistral");
    let p = SamplingParams {
        max_new_tokens: 4,
        ..Default::default()
    };
    for a in run(&dec, &requests(), &p, 2).0 {
        assert_eq!(a.tokens.len(), 4);
        assert_eq!(a.finish, crate::generate::FinishReason::Length);
    }
    let zero = SamplingParams {
        max_new_tokens: 0,
        ..p.clone()
    };
    assert!(run(&dec, &requests(), &zero, 2)
        .0
        .iter()
        .all(|a| a.tokens.is_empty()));
    let ctx = dec.config.max_position_embeddings;
    let long = vec![Request {
        prompt_id: "long".into(),
        tokens: vec![3; ctx],
        n: 1,
    }];
    let e = sample(&dec, &long, "s", &p, 2, &|_| String::new(), &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("`long`"), "{e}");
}

fn prompts(n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|i| Prompt {
            id: format!("q{i}"),
            dataset: "d".into(),
            category: if i % 2 == 0 {
                Category::Instruction
            } else {
                Category::Code
            },
            messages: vec![Message::new("user", format!("Say something about {i}."))],
            gold: None,
            tests: None,
            entry_point: None,
            language: "en".into(),
        })
        .collect()
}

#[test]
fn chunked_job_resumes_and_ignores_worker_count() {
    let (ck, dec) = decoder("llama");
    let model = Model {
        decoder: &dec,
        tokenizer: ck.tokenizer().unwrap(),
        template: ck.template().unwrap(),
        identity: "llama-fixture".into(),
    };
    let spec = SourceSpec {
        name: "llama".into(),
        sampling: SamplingParams {
            max_new_tokens: 5,
            temperature: 0.8,
            top_p: 0.95,
            seed: 42,
            ..Default::default()
        },
        samples_per_category: [(Category::Instruction, 2), (Category::Code, 3)].into(),
    };
    let opts = JobOptions {
        chunk_size: 3,
        slots: 4,
    };
    let ps = prompts(8);
    let tmp = tempfile::tempdir().unwrap();
    let run = |dir: &str, workers| {
        job::run(
            &model,
            &ps,
            &spec,
            &opts,
            workers,
            &tmp.path().join(dir),
            &|_, _| {},
        )
        .unwrap()
    };
    let (a, stats) = run("a", 1);
    assert_eq!(a.len(), 4 * 2 + 4 * 3);
    assert_eq!((stats.chunks, stats.chunks_resumed), (3, 0));
    let (b, _) = run("b", 2);
    assert_eq!(a, b, "two workers, same samples");
    // Lose one chunk: only it is recomputed.
    let chunk = std::fs::read_dir(tmp.path().join("a"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("chunk-00001"))
        .unwrap();
    std::fs::remove_file(&chunk).unwrap();
    let (c, stats) = run("a", 2);
    assert_eq!((stats.chunks, stats.chunks_resumed), (3, 2));
    assert_eq!(c, a);
    // A torn chunk (no trailer) is recomputed, not trusted.
    let text = std::fs::read_to_string(&chunk).unwrap();
    std::fs::write(&chunk, &text[..text.len() / 2]).unwrap();
    let (d, stats) = run("a", 1);
    assert_eq!((d, stats.chunks_resumed), (a.clone(), 2));
    // Another seed makes other chunk names: nothing stale is reused.
    let mut spec2 = spec.clone();
    spec2.sampling.seed = 43;
    let (e, stats) = job::run(
        &model,
        &ps,
        &spec2,
        &opts,
        1,
        &tmp.path().join("a"),
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(stats.chunks_resumed, 0);
    assert_ne!(e, a);
    assert!(a.iter().all(|s| s.source == "llama" && s.text.len() <= 200));
}
