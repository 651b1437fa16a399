//! Row surgery on a batched KV cache, for continuous batching: drop finished rows, append new
//! ones (left-padding whichever side is shorter so every row has the same length), copy one
//! prefilled prompt into N rows, and cut leading columns that every row has as padding.

use candle_core::{Result, Tensor};

use super::KvCache;

impl KvCache {
    /// Batch rows.
    pub fn rows(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(0).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Keep the rows `keep`, in that order.
    pub fn select_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.is_empty() {
            self.layers.clear();
            return Ok(());
        }
        for l in self.layers.iter_mut().flatten() {
            let dev = l.0.device().clone();
            let idx = Tensor::from_vec(keep.iter().map(|&i| i as u32).collect(), keep.len(), &dev)?;
            *l = (l.0.index_select(&idx, 0)?, l.1.index_select(&idx, 0)?);
        }
        Ok(())
    }

    /// Drop the first `n` positions of every row.
    pub fn trim_front(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for l in self.layers.iter_mut().flatten() {
            let len = l.0.dim(2)?;
            *l = (
                l.0.narrow(2, n, len - n)?.contiguous()?,
                l.1.narrow(2, n, len - n)?.contiguous()?,
            );
        }
        Ok(())
    }

    /// `n` copies of this cache's single row.
    pub fn repeat_row(&self, n: usize) -> Result<KvCache> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(match l {
                Some((k, v)) => Some((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?)),
                None => None,
            });
        }
        Ok(KvCache { layers })
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
                let k = Tensor::cat(&[&pad(&m.0, len - a)?, &pad(&t.0, len - b)?], 0)?;
                let v = Tensor::cat(&[&pad(&m.1, len - a)?, &pad(&t.1, len - b)?], 0)?;
                *m = (k, v);
            }
        }
        Ok((len - a, len - b))
    }
}
