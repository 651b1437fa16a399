//! Row surgery on a batched KV cache, for continuous batching: drop finished rows, append new
//! ones (left-padding whichever side is shorter so every row has the same length), copy one
//! prefilled prompt into N rows, and cut leading columns that every row has as padding. Each
//! operation also keeps the cache's record of which rows start with the same positions
//! (`KvCache::share`), which decode attention uses to read a shared prompt once per group.

use candle_core::{Result, Tensor};

use super::decoder::KvLayer;
use super::KvCache;

impl KvCache {
    /// Batch rows.
    pub fn rows(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|l| l.k.dim(0).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Keep the rows `keep`, in that order (a row may be kept several times: its copies share
    /// all their positions).
    pub fn select_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.is_empty() {
            self.layers.clear();
            self.share.clear();
            return Ok(());
        }
        self.share = select_share(&self.share, keep, self.len());
        for l in self.layers.iter_mut().flatten() {
            let dev = l.k.device().clone();
            let idx = Tensor::from_vec(keep.iter().map(|&i| i as u32).collect(), keep.len(), &dev)?;
            // The whole buffers (index_select needs contiguous input): the copy keeps their
            // spare room and is this cache's own.
            *l = KvLayer::owned(
                l.k.index_select(&idx, 0)?,
                l.v.index_select(&idx, 0)?,
                l.len,
            );
        }
        Ok(())
    }

    /// Drop the first `n` positions of every row.
    pub fn trim_front(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for (_, cols) in self.share.iter_mut() {
            *cols = cols.saturating_sub(n);
        }
        for l in self.layers.iter_mut().flatten() {
            let (k, v) = l.filled()?;
            let len = l.len;
            *l = KvLayer::full(
                k.narrow(2, n, len - n)?.contiguous()?,
                v.narrow(2, n, len - n)?.contiguous()?,
            )?;
        }
        Ok(())
    }

    /// `n` copies of this cache's single row.
    pub fn repeat_row(&self, n: usize) -> Result<KvCache> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(match l {
                Some(l) => {
                    let (k, v) = l.filled()?;
                    Some(KvLayer::full(
                        k.contiguous()?.repeat((n, 1, 1, 1))?,
                        v.contiguous()?.repeat((n, 1, 1, 1))?,
                    )?)
                }
                None => None,
            });
        }
        let len = self.len();
        Ok(KvCache {
            layers,
            share: (0..n)
                .map(|r| if r == 0 { (0, 0) } else { (0, len) })
                .collect(),
        })
    }

    /// Append `other`'s rows after this cache's. The shorter side is left-padded with zeros (the
    /// caller masks those positions); returns how many positions (this, other) were padded by.
    pub fn append_rows(&mut self, other: KvCache) -> Result<(usize, usize)> {
        if self.rows() == 0 {
            *self = other;
            return Ok((0, 0));
        }
        let (a, b) = (self.len(), other.len());
        let len = a.max(b);
        // Left padding is zeros in every row of a side: shared spans grow by it.
        let (mine, theirs) = (self.rows(), other.rows());
        let side = |share: &[(usize, usize)], rows: usize, pad: usize, at: usize| {
            (0..rows)
                .map(|r| match share.get(r) {
                    Some(&(lead, cols)) if cols > 0 => (lead + at, cols + pad),
                    _ => (r + at, 0),
                })
                .collect::<Vec<_>>()
        };
        let mut share = side(&self.share, mine, len - a, 0);
        share.extend(side(&other.share, theirs, len - b, mine));
        self.share = share;
        let pad = |t: &Tensor, by: usize| -> Result<Tensor> {
            if by == 0 {
                return Ok(t.clone());
            }
            let (r, h, _, d) = t.dims4()?;
            let z = Tensor::zeros((r, h, by, d), t.dtype(), t.device())?;
            Tensor::cat(&[&z, t], 2)
        };
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            if let (Some(m), Some(t)) = (mine.as_mut(), theirs) {
                let ((mk, mv), (tk, tv)) = (m.filled()?, t.filled()?);
                let k = Tensor::cat(&[&pad(&mk, len - a)?, &pad(&tk, len - b)?], 0)?;
                let v = Tensor::cat(&[&pad(&mv, len - a)?, &pad(&tv, len - b)?], 0)?;
                *m = KvLayer::full(k, v)?;
            }
        }
        Ok((len - a, len - b))
    }
}

/// The share records after keeping rows `keep` of a cache whose rows are `len` positions long.
/// A repeated row shares everything with its first copy; otherwise a row's group (the rows whose
/// leader was the same) is led by its first kept member, with which it shares the shorter of
/// the two spans each had with the old leader.
fn select_share(old: &[(usize, usize)], keep: &[usize], len: usize) -> Vec<(usize, usize)> {
    let old_of = |x: usize| match old.get(x) {
        Some(&(lead, cols)) if cols > 0 => (lead, cols),
        _ => (x, len),
    };
    let mut first_copy = std::collections::HashMap::new();
    let mut first_of_group: std::collections::HashMap<usize, (usize, usize)> =
        std::collections::HashMap::new();
    keep.iter()
        .enumerate()
        .map(|(t, &x)| {
            if let Some(&f) = first_copy.get(&x) {
                return (f, len);
            }
            first_copy.insert(x, t);
            let (lead, cols) = old_of(x);
            match first_of_group.get(&lead) {
                Some(&(tf, cf)) => (tf, cols.min(cf)),
                None => {
                    first_of_group.insert(lead, (t, cols));
                    (t, 0)
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A cache whose every position holds a value unique to (row, position) unless copied.
    fn cache(rows: usize, len: usize, salt: f32) -> KvCache {
        let v: Vec<f32> = (0..rows * 2 * len * 4).map(|i| salt + i as f32).collect();
        let t = Tensor::from_vec(v, (rows, 2, len, 4), &Device::Cpu).unwrap();
        KvCache {
            layers: vec![Some(KvLayer::full(t.clone(), (t * 2.0).unwrap()).unwrap())],
            share: vec![],
        }
    }

    /// Every share record is true of the data: the row's first `cols` positions equal its
    /// leader's, in keys and values.
    fn check(c: &KvCache) {
        let (k, v) = c.layers[0].as_ref().unwrap().filled().unwrap();
        for (r, &(lead, cols)) in c.share.iter().enumerate() {
            for t in [&k, &v] {
                let row = |i: usize| {
                    t.narrow(0, i, 1)
                        .unwrap()
                        .narrow(2, 0, cols)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                assert_eq!(
                    row(r),
                    row(lead),
                    "row {r} vs leader {lead}, {cols} positions"
                );
            }
        }
    }

    #[test]
    fn share_records_stay_true_through_row_surgery() {
        // The sampler's sequence: prompts with a common opening, copies per sample, admission
        // beside running rows, finished rows dropped (leaders included), padding trimmed.
        let mut prompts = cache(1, 5, 0.0).repeat_row(3).unwrap();
        check(&prompts);
        // Each prompt's own rest (different per row) after the common 5 positions.
        for l in prompts.layers.iter_mut().flatten() {
            let rest = Tensor::rand(0f32, 1.0, (3, 2, 3, 4), &Device::Cpu).unwrap();
            l.push(&rest, &(&rest * 3.0).unwrap()).unwrap();
        }
        assert_eq!(prompts.share, vec![(0, 0), (0, 5), (0, 5)]);
        prompts.select_rows(&[0, 0, 0, 1, 1, 2]).unwrap();
        check(&prompts);
        assert_eq!(
            prompts.share,
            vec![(0, 0), (0, 8), (0, 8), (0, 5), (3, 8), (0, 5)]
        );
        let mut running = cache(2, 11, 1000.0);
        let (pad_old, pad_new) = running.append_rows(prompts).unwrap();
        assert_eq!((pad_old, pad_new), (0, 3));
        check(&running);
        // Drop the leaders (rows 2 and 5 of the merged cache are rows 0 and 3 of the prompts).
        running.select_rows(&[1, 3, 4, 6, 7]).unwrap();
        check(&running);
        // Old row 6 was a copy of old row 5, which is gone: it now leads its own group.
        assert_eq!(running.share, vec![(0, 0), (1, 0), (1, 11), (3, 0), (1, 8)]);
        running.trim_front(2).unwrap();
        check(&running);
        assert_eq!(running.share, vec![(0, 0), (1, 0), (1, 9), (3, 0), (1, 6)]);
        assert!(running.share.iter().all(|&(l, _)| l < running.rows()));
    }
}
