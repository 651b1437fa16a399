//! Fused CPU kernels that keep their backward pass (candle's own fused softmax has none): a last-dim
//! softmax and a log-softmax-and-gather (the per-token log-prob of a target). Each row is one pass
//! instead of the five or six allocating ops of the composed form, forward and backward. On other
//! devices, and for other dtypes, callers use the composed (differentiable) ops instead.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape,
    Tensor, D,
};
use rayon::prelude::*;

/// Whether the fused path applies to this tensor.
pub fn available(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

trait Float: Copy + Send + Sync + 'static {
    fn to64(self) -> f64;
    fn from64(x: f64) -> Self;
}
impl Float for f32 {
    fn to64(self) -> f64 {
        self as f64
    }
    fn from64(x: f64) -> f32 {
        x as f32
    }
}
impl Float for f64 {
    fn to64(self) -> f64 {
        self
    }
    fn from64(x: f64) -> f64 {
        x
    }
}

fn contiguous<'a, T>(data: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op needs a contiguous input"),
    }
}

fn softmax_rows<T: Float>(x: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::from64(0.0); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, row)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to64()));
            let mut sum = 0.0;
            for (oi, v) in o.iter_mut().zip(row) {
                let e = (v.to64() - max).exp();
                sum += e;
                *oi = T::from64(e);
            }
            for oi in o.iter_mut() {
                *oi = T::from64(oi.to64() / sum);
            }
        });
    out
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims()[l.dims().len() - 1];
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(softmax_rows(contiguous(v, l)?, d)),
            CpuStorage::F64(v) => CpuStorage::F64(softmax_rows(contiguous(v, l)?, d)),
            _ => candle_core::bail!("fused softmax: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx = y * (g - sum(g * y))
        let gy = (grad * res)?;
        let s = gy.sum_keepdim(D::Minus1)?;
        Ok(Some((gy - res.broadcast_mul(&s)?)?))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if available(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct LogSoftmaxGather;

fn lsg_fwd<T: Float>(x: &[T], t: &[u32], d: usize) -> Vec<T> {
    x.par_chunks(d)
        .zip(t.par_iter())
        .map(|(row, &ti)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to64()));
            let sum: f64 = row.iter().map(|v| (v.to64() - max).exp()).sum();
            T::from64(row[ti as usize].to64() - max - sum.ln())
        })
        .collect()
}

fn lsg_bwd<T: Float>(x: &[T], t: &[u32], g: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::from64(0.0); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(t.par_iter().zip(g.par_iter()))
        .for_each(|((o, row), (&ti, &gi))| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to64()));
            let sum: f64 = row.iter().map(|v| (v.to64() - max).exp()).sum();
            let gi = gi.to64();
            for (oi, v) in o.iter_mut().zip(row) {
                *oi = T::from64(-gi * (v.to64() - max).exp() / sum);
            }
            o[ti as usize] = T::from64(o[ti as usize].to64() + gi);
        });
    out
}

fn targets(s: &CpuStorage, l: &Layout) -> Result<Vec<u32>> {
    match s {
        CpuStorage::U32(v) => Ok(contiguous(v, l)?.to_vec()),
        _ => candle_core::bail!("targets must be u32"),
    }
}

impl CustomOp2 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "fused-log-softmax-gather"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l1.dims()[l1.dims().len() - 1];
        let n = l1.shape().elem_count() / d;
        let t = targets(s2, l2)?;
        if t.len() != n || t.iter().any(|&x| x as usize >= d) {
            candle_core::bail!("targets do not match the logits");
        }
        let out = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(lsg_fwd(contiguous(v, l1)?, &t, d)),
            CpuStorage::F64(v) => CpuStorage::F64(lsg_fwd(contiguous(v, l1)?, &t, d)),
            _ => candle_core::bail!("fused log-softmax: unsupported dtype {:?}", s1.dtype()),
        };
        Ok((out, Shape::from(l1.dims()[..l1.dims().len() - 1].to_vec())))
    }
    fn bwd(
        &self,
        logits: &Tensor,
        tg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = logits.dim(D::Minus1)?;
        let t: Vec<u32> = tg.flatten_all()?.to_vec1()?;
        let g = grad.flatten_all()?;
        let x = logits.flatten_all()?;
        let out = match logits.dtype() {
            DType::F32 => {
                let v = lsg_bwd(&x.to_vec1::<f32>()?, &t, &g.to_vec1::<f32>()?, d);
                Tensor::from_vec(v, logits.shape(), logits.device())?
            }
            DType::F64 => {
                let v = lsg_bwd(&x.to_vec1::<f64>()?, &t, &g.to_vec1::<f64>()?, d);
                Tensor::from_vec(v, logits.shape(), logits.device())?
            }
            other => candle_core::bail!("fused log-softmax: unsupported dtype {other:?}"),
        };
        Ok((Some(out), None))
    }
}

/// `log_softmax(logits)[..., target]` for logits `[..., V]` and u32 targets `[...]`, differentiable
/// with respect to the logits.
pub fn log_softmax_gather(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if available(logits) {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, LogSoftmaxGather)
    } else {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        logp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::generate::Rng::new(seed, 0);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| r.next_f64() * 6.0 - 3.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_ops_match_composed_ops_forward_and_backward() {
        let x = Var::from_tensor(&rand(&[3, 4, 7], 1)).unwrap();
        let w = rand(&[3, 4, 7], 2);
        let fused = (softmax_last_dim(&x).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap();
        let plain = (candle_nn::ops::softmax(&x, D::Minus1).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap();
        let (gf, gp) = (fused.backward().unwrap(), plain.backward().unwrap());
        let diff = (gf.get(&x).unwrap() - gp.get(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
        assert!(
            (fused.to_scalar::<f64>().unwrap() - plain.to_scalar::<f64>().unwrap()).abs() < 1e-12
        );

        let t = Tensor::new(&[[0u32, 6, 3, 1], [2, 2, 5, 0], [6, 1, 1, 4]], &Device::Cpu).unwrap();
        let gw = rand(&[3, 4], 3);
        let fused = (log_softmax_gather(&x, &t).unwrap() * &gw)
            .unwrap()
            .sum_all()
            .unwrap();
        let lp = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
        let plain = (lp
            .gather(&t.unsqueeze(2).unwrap(), 2)
            .unwrap()
            .squeeze(2)
            .unwrap()
            * &gw)
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(
            (fused.to_scalar::<f64>().unwrap() - plain.to_scalar::<f64>().unwrap()).abs() < 1e-12
        );
        let (gf, gp) = (fused.backward().unwrap(), plain.backward().unwrap());
        let diff = (gf.get(&x).unwrap() - gp.get(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
    }
}
