//! Judged pairwise benchmarks against a baseline's answers: AlpacaEval 2's raw and
//! length-controlled win rates, Arena-Hard's Bradley-Terry score, and the parsers that turn a
//! judge's reply into a preference. Pure: judgments come in, numbers go out.

use std::collections::BTreeMap;

use super::logistic::{self, Row};
use super::stats::{mean, quantile};
use crate::generate::Rng;

/// One judged item of an AlpacaEval-style comparison.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LcItem {
    /// Probability that the model's answer beats the baseline's (0.5 = a draw); `None` = the judge's
    /// reply could not be read. Such items are counted, excluded from the fit and the means.
    pub preference: Option<f64>,
    /// Answer lengths in characters (Unicode scalar values, as Python's `len`).
    pub len_model: usize,
    pub len_baseline: usize,
    /// The instruction's difficulty term of the GLM (AlpacaEval estimates it from many models'
    /// annotations per instruction; a benchmark supplies its own, 0 when it has none).
    pub difficulty: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LcResult {
    pub win_rate: f64,
    pub standard_error: f64,
    pub length_controlled_winrate: f64,
    pub lc_standard_error: f64,
    pub n_wins: usize,
    pub n_wins_base: usize,
    pub n_draws: usize,
    pub n_total: usize,
    pub n_unscored: usize,
    /// GLM weights: tanh(standardised length difference), instruction difficulty, model term.
    pub weights: [f64; 3],
    /// The inverse regularisation strength chosen by cross-validation.
    pub c: f64,
}

fn sem(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return f64::NAN;
    }
    let m = mean(xs);
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
    (var / xs.len() as f64).sqrt()
}

/// AlpacaEval 2's length-controlled win rate (alpaca_eval `glm_winrate`, formula
/// `tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline - 1`): a logistic GLM with an
/// L1 penalty, soft labels, its inverse strength C picked from 10 values in [1e-4, 1e4] by 5-fold
/// cross-validation grouped by item, refitted on everything; the LC win rate is the mean predicted
/// preference with the length difference set to zero. The unregularised variant
/// (`length_controlled_noreg`): the default variant's pull towards gpt-4's weights needs
/// AlpacaEval's own annotations of "gamed" models, which only exist for its 805 instructions.
pub fn length_controlled(items: &[LcItem]) -> LcResult {
    let scored: Vec<&LcItem> = items.iter().filter(|i| i.preference.is_some()).collect();
    let prefs: Vec<f64> = scored.iter().map(|i| i.preference.unwrap()).collect();
    let n_draws = prefs.iter().filter(|&&p| p == 0.5).count();
    let n_wins = prefs.iter().filter(|&&p| p > 0.5).count();
    let n_wins_base = prefs.iter().filter(|&&p| p < 0.5).count();
    // Baseline minus model, standardised by the sample standard deviation (pandas' ddof = 1).
    let deltas: Vec<f64> = scored
        .iter()
        .map(|i| i.len_baseline as f64 - i.len_model as f64)
        .collect();
    let sd = {
        let m = mean(&deltas);
        (deltas.iter().map(|d| (d - m).powi(2)).sum::<f64>() / (deltas.len().max(2) - 1) as f64)
            .sqrt()
    };
    let rows: Vec<Row> = scored
        .iter()
        .zip(&deltas)
        .map(|(item, d)| Row {
            x: vec![
                if sd > 0.0 { (d / sd).tanh() } else { 0.0 },
                item.difficulty,
                1.0,
            ],
            p: item.preference.unwrap(),
            weight: 1.0,
        })
        .collect();
    let (weights, c) = if rows.is_empty() {
        (vec![0.0; 3], f64::NAN)
    } else {
        fit_cv(&rows)
    };
    let predicted: Vec<f64> = scored
        .iter()
        .map(|i| logistic::predict(&[0.0, i.difficulty, 1.0], &weights))
        .collect();
    LcResult {
        win_rate: mean(&prefs) * 100.0,
        standard_error: sem(&prefs) * 100.0,
        length_controlled_winrate: mean(&predicted) * 100.0,
        lc_standard_error: sem(&predicted) * 100.0,
        n_wins,
        n_wins_base,
        n_draws,
        n_total: prefs.len(),
        n_unscored: items.len() - scored.len(),
        weights: [weights[0], weights[1], weights[2]],
        c,
    }
}

/// scikit-learn's LogisticRegressionCV as alpaca_eval configures it: Cs = logspace(-4, 4, 10), the
/// mean held-out log loss over 5 group folds, the first best C, a refit on all rows.
fn fit_cv(rows: &[Row]) -> (Vec<f64>, f64) {
    let folds = 5.min(rows.len());
    // GroupKFold with equal group sizes deals groups to folds in reverse order, round robin.
    let fold_of = |i: usize| (rows.len() - 1 - i) % folds;
    let cs: Vec<f64> = (0..10)
        .map(|k| 10f64.powf(-4.0 + 8.0 * k as f64 / 9.0))
        .collect();
    let mut best = (f64::INFINITY, cs[0]);
    if folds >= 2 {
        for &c in &cs {
            let mut total = 0.0;
            for f in 0..folds {
                let train: Vec<Row> = rows
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| fold_of(*i) != f)
                    .map(|(_, r)| r.clone())
                    .collect();
                let test: Vec<Row> = rows
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| fold_of(*i) == f)
                    .map(|(_, r)| r.clone())
                    .collect();
                let w = logistic::fit(&train, 3, c, true);
                total += logistic::mean_log_loss(&test, &w);
            }
            let loss = total / folds as f64;
            if loss < best.0 {
                best = (loss, c);
            }
        }
    } else {
        best.1 = 100.0;
    }
    (logistic::fit(rows, 3, best.1, true), best.1)
}

/// A judge's five-point verdict on answers shown as A and B (Arena-Hard's `[[A>>B]]` labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Verdict {
    #[serde(rename = "A>>B")]
    AMuchBetter,
    #[serde(rename = "A>B")]
    ABetter,
    #[serde(rename = "A=B")]
    Tie,
    #[serde(rename = "B>A")]
    BBetter,
    #[serde(rename = "B>>A")]
    BMuchBetter,
}

impl Verdict {
    pub fn parse_label(s: &str) -> Option<Verdict> {
        Some(match s {
            "A>>B" => Verdict::AMuchBetter,
            "A>B" => Verdict::ABetter,
            "A=B" => Verdict::Tie,
            "B>A" => Verdict::BBetter,
            "B>>A" => Verdict::BMuchBetter,
            _ => return None,
        })
    }
    pub fn label(self) -> &'static str {
        match self {
            Verdict::AMuchBetter => "A>>B",
            Verdict::ABetter => "A>B",
            Verdict::Tie => "A=B",
            Verdict::BBetter => "B>A",
            Verdict::BMuchBetter => "B>>A",
        }
    }
}

/// Arena-Hard's verdict extraction: every `[[...]]` label in the reply; exactly one distinct label
/// that is one of the five, else unreadable.
pub fn parse_arena_verdict(reply: &str) -> Option<Verdict> {
    let mut found: Option<&str> = None;
    let mut rest = reply;
    while let Some(start) = rest.find("[[") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("]]") else { break };
        let label = &after[..end];
        if !label.is_empty()
            && label
                .chars()
                .all(|c| matches!(c, 'A' | 'B' | '<' | '>' | '='))
        {
            match found {
                Some(prev) if prev != label => return None,
                _ => found = Some(label),
            }
        }
        rest = &after[end + 2..];
    }
    found.and_then(|l| Verdict::parse_label(l.trim()))
}

/// Both games of one item: game 1 shows the baseline as A and the model as B, game 2 the reverse.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ArenaGame {
    pub question_id: String,
    pub model: String,
    pub game1: Option<Verdict>,
    pub game2: Option<Verdict>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Winner {
    Model,
    Baseline,
    Tie,
}

/// One battle row (strong verdicts already repeated `weight` times).
#[derive(Debug, Clone, PartialEq)]
struct Battle {
    model: usize,
    winner: Winner,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ArenaScore {
    pub model: String,
    /// Bradley-Terry rating, the baseline anchored at 1000.
    pub elo: f64,
    /// Predicted win rate against the baseline, percent, with the bootstrap percentile interval.
    pub score: f64,
    pub lower: f64,
    pub upper: f64,
    pub battles: usize,
    /// Games whose verdict could not be read (they enter no battle).
    pub unscored_games: usize,
}

fn battles(games: &[ArenaGame], models: &[String], weight: usize) -> Vec<Battle> {
    let mut out = Vec::new();
    for g in games {
        let m = models
            .iter()
            .position(|x| *x == g.model)
            .expect("model listed");
        for (verdict, model_is_b) in [(g.game1, true), (g.game2, false)] {
            let Some(v) = verdict else { continue };
            let (winner, strong) = match (v, model_is_b) {
                (Verdict::Tie, _) => (Winner::Tie, false),
                (Verdict::AMuchBetter, b) => {
                    (if b { Winner::Baseline } else { Winner::Model }, true)
                }
                (Verdict::ABetter, b) => (if b { Winner::Baseline } else { Winner::Model }, false),
                (Verdict::BBetter, b) => (if b { Winner::Model } else { Winner::Baseline }, false),
                (Verdict::BMuchBetter, b) => {
                    (if b { Winner::Model } else { Winner::Baseline }, true)
                }
            };
            for _ in 0..if strong { weight } else { 1 } {
                out.push(Battle { model: m, winner });
            }
        }
    }
    out
}

/// The Bradley-Terry MLE of every model against the baseline (rating 400 * log10-odds + 1000, the
/// baseline at 1000). A tie counts as one win for each side, as Arena-Hard's duplicated-battle fit.
fn bt_elo(battles: &[Battle], n_models: usize) -> Vec<f64> {
    // Aggregate per model: total weight and share won by the model.
    let mut won = vec![0.0; n_models];
    let mut total = vec![0.0; n_models];
    for b in battles {
        total[b.model] += 2.0;
        won[b.model] += match b.winner {
            Winner::Model => 2.0,
            Winner::Tie => 1.0,
            Winner::Baseline => 0.0,
        };
    }
    let ln10 = std::f64::consts::LN_10;
    let rows: Vec<Row> = (0..n_models)
        .filter(|&m| total[m] > 0.0)
        .map(|m| {
            let mut x = vec![0.0; n_models];
            x[m] = ln10;
            Row {
                x,
                p: won[m] / total[m],
                weight: total[m],
            }
        })
        .collect();
    let w = logistic::fit(&rows, n_models, 1.0, false);
    w.iter().map(|v| 400.0 * v + 1000.0).collect()
}

fn win_rate(elo: f64) -> f64 {
    100.0 / (1.0 + 10f64.powf((1000.0 - elo) / 400.0))
}

/// Arena-Hard v0.1's score: battles from both games (strong verdicts `weight` times), the BT fit,
/// the win rate against the baseline, and `rounds` bootstrap resamples of the battles for the
/// 2.5 / 97.5 percentile interval.
pub fn arena_scores(
    games: &[ArenaGame],
    weight: usize,
    rounds: usize,
    seed: u64,
) -> Vec<ArenaScore> {
    let mut models: Vec<String> = games.iter().map(|g| g.model.clone()).collect();
    models.sort();
    models.dedup();
    let all = battles(games, &models, weight);
    let elo = bt_elo(&all, models.len());
    let mut rng = Rng::new(seed, 0x6172_656e);
    let mut boots: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); models.len()];
    for _ in 0..rounds {
        let sample: Vec<Battle> = (0..all.len())
            .map(|_| all[rng.below(all.len())].clone())
            .collect();
        for (m, e) in bt_elo(&sample, models.len()).into_iter().enumerate() {
            boots[m].push(e);
        }
    }
    models
        .iter()
        .enumerate()
        .map(|(m, name)| {
            let mut b = boots[m].clone();
            b.sort_by(f64::total_cmp);
            let unscored = games
                .iter()
                .filter(|g| g.model == *name)
                .map(|g| g.game1.is_none() as usize + g.game2.is_none() as usize)
                .sum();
            ArenaScore {
                model: name.clone(),
                elo: elo[m],
                score: win_rate(elo[m]),
                lower: if b.is_empty() {
                    f64::NAN
                } else {
                    win_rate(quantile(&b, 0.025))
                },
                upper: if b.is_empty() {
                    f64::NAN
                } else {
                    win_rate(quantile(&b, 0.975))
                },
                battles: all.iter().filter(|x| x.model == m).count(),
                unscored_games: unscored,
            }
        })
        .collect()
}

/// AlpacaEval's logprob parser (`weighted_alpaca_eval_gpt4_turbo`): the judge names the better
/// output `m` (output 1) or `M` (output 2) in one token; P(output 1 better) = p(m) / (p(m) + p(M))
/// over the first token's top logprobs. `None` when neither token is among them.
pub fn logprob_preference(top_logprobs: &BTreeMap<String, f64>) -> Option<f64> {
    let m = top_logprobs.get("m").copied();
    let big = top_logprobs.get("M").copied();
    match (m, big) {
        (None, None) => None,
        (Some(_), None) => Some(1.0),
        (None, Some(_)) => Some(0.0),
        (Some(a), Some(b)) => {
            let max = a.max(b);
            let (ea, eb) = ((a - max).exp(), (b - max).exp());
            Some(ea / (ea + eb))
        }
    }
}

/// The judge's text reply read as AlpacaEval's binary verdict: exactly `m` or `M`.
pub fn text_preference(reply: &str) -> Option<f64> {
    match reply.trim() {
        "m" => Some(1.0),
        "M" => Some(0.0),
        _ => None,
    }
}

/// MT-Bench's rating extraction: the first `[[x]]`, else the first `[x]`, as a number (1-10).
pub fn parse_rating(reply: &str) -> Option<f64> {
    fn find(reply: &str, open: &str, close: &str) -> Option<f64> {
        let mut rest = reply;
        while let Some(s) = rest.find(open) {
            let after = &rest[s + open.len()..];
            if let Some(e) = after.find(close) {
                let inner = &after[..e];
                let valid = !inner.is_empty()
                    && inner.chars().next().is_some_and(|c| c.is_ascii_digit())
                    && inner.chars().all(|c| c.is_ascii_digit() || c == '.')
                    && inner.matches('.').count() <= 1;
                if valid {
                    return inner.parse().ok();
                }
            }
            rest = &rest[s + open.len()..];
        }
        None
    }
    find(reply, "[[", "]]").or_else(|| find(reply, "[", "]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_verdicts_parse_like_arena_hard() {
        assert_eq!(
            parse_arena_verdict("... final: [[A>>B]]"),
            Some(Verdict::AMuchBetter)
        );
        assert_eq!(
            parse_arena_verdict("[[B>A]] and again [[B>A]]"),
            Some(Verdict::BBetter)
        );
        assert_eq!(parse_arena_verdict("[[A>B]] then [[B>A]]"), None);
        assert_eq!(parse_arena_verdict("no verdict"), None);
        assert_eq!(parse_arena_verdict("[[A<B]]"), None);
        assert_eq!(
            parse_arena_verdict("see [[note]] then [[A=B]]"),
            Some(Verdict::Tie)
        );
    }

    #[test]
    fn ratings_parse_like_fastchat() {
        assert_eq!(parse_rating("Rating: [[7]]"), Some(7.0));
        assert_eq!(parse_rating("Rating: [[8.5]] ok"), Some(8.5));
        assert_eq!(parse_rating("the answer [5] is fine"), Some(5.0));
        assert_eq!(parse_rating("[[x]] no"), None);
        assert_eq!(parse_rating("nothing"), None);
    }

    #[test]
    fn logprob_preference_is_the_normalised_probability() {
        let lp: BTreeMap<String, f64> = [
            ("m".to_string(), (0.25f64).ln()),
            ("M".to_string(), (0.75f64).ln()),
            ("x".into(), -0.1),
        ]
        .into();
        assert!((logprob_preference(&lp).unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(logprob_preference(&BTreeMap::new()), None);
        assert_eq!(text_preference(" M\n"), Some(0.0));
        assert_eq!(text_preference("both"), None);
    }

    #[test]
    fn two_model_bt_equals_the_weighted_win_share() {
        let g = |v1, v2| ArenaGame {
            question_id: "q".into(),
            model: "m".into(),
            game1: v1,
            game2: v2,
        };
        // Model as B in game 1 wins strongly (3), as A in game 2 loses (1 baseline win); one tie.
        let games = vec![
            g(Some(Verdict::BMuchBetter), Some(Verdict::BBetter)),
            g(Some(Verdict::Tie), None),
        ];
        let s = &arena_scores(&games, 3, 50, 1)[0];
        // wins: 3 model + 0.5 tie of 5 battles = 70%
        assert_eq!(s.battles, 5);
        assert_eq!(s.unscored_games, 1);
        assert!((s.score - 70.0).abs() < 1e-6, "{s:?}");
    }
}
