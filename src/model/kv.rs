//! Row surgery on a batched KV cache, for continuous batching: drop finished rows, append new
//! ones (left-padding whichever side is shorter so every row has the same length), copy one
//! prefilled prompt into N rows, and cut leading columns that every row has as padding.

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

    /// Keep the rows `keep`, in that order.
    pub fn select_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.is_empty() {
            self.layers.clear();
            return Ok(());
        }
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
                let ((mk, mv), (tk, tv)) = (m.filled()?, t.filled()?);
                let k = Tensor::cat(&[&pad(&mk, len - a)?, &pad(&tk, len - b)?], 0)?;
                let v = Tensor::cat(&[&pad(&mv, len - a)?, &pad(&tv, len - b)?], 0)?;
                *m = KvLayer::full(k, v)?;
            }
        }
        Ok((len - a, len - b))
    }
}
