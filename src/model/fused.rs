//! Fused CPU kernels (f32/f64). Differentiable ones keep their own backward (candle's fused softmax
//! has none): last-dim softmax, log-softmax-and-gather, the few-row matmul used for decoding. The rest
//! serve tensors outside autograd — the recorded forward and the hand-written backward
//! (`model::backward`), and inference: RMSNorm, rotary embedding with the head transpose, the gated
//! activation, and the gradients of these and of softmax / log-softmax-gather. Each is one pass over
//! the rows instead of several allocating ops. On other devices and dtypes the functions return
//! `None` or fall back to composed ops.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

use super::config::Activation;
use super::decoder::{GELU_C, GELU_K};

/// Whether the fused path applies to this tensor.
pub(super) fn available(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

pub(super) trait Float:
    Copy
    + Send
    + Sync
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    fn to64(self) -> f64;
    fn from64(x: f64) -> Self;
    /// `exp` in the type's own precision (f32 `exp` is several times cheaper than f64's; sums
    /// still accumulate in f64).
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    /// `v[i] = exp(v[i])` for a whole slice (vectorised for f32 where the CPU allows).
    fn exp_slice(v: &mut [Self]) {
        for x in v {
            *x = x.exp();
        }
    }
    /// Dot product with AVX2+FMA where the type has such a kernel (callers check the CPU).
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_avx2(_a: &[Self], _b: &[Self]) -> Option<Self> {
        None
    }
}
impl Float for f32 {
    fn to64(self) -> f64 {
        self as f64
    }
    fn from64(x: f64) -> f32 {
        x as f32
    }
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    fn tanh(self) -> f32 {
        f32::tanh(self)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> Option<f32> {
        Some(dot_f32_avx2(a, b))
    }
    fn exp_slice(v: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { exp_f32_avx2(v) };
            return;
        }
        for x in v {
            *x = x.exp();
        }
    }
}

/// `exp` over a slice, eight lanes at a time: Cephes' range reduction `x = n ln2 + r` and a degree-5
/// polynomial for `e^r` (about 1 ulp from libm's `expf`), scaled by `2^n` through the exponent bits.
/// Inputs below the smallest normal's log give 0 (softmax masks send -3.4e38 here); the few above
/// 88.3 (where `2^n` would overflow the exponent field) go to `expf`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_f32_avx2(v: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = v.len() / 8 * 8;
    let p = v.as_mut_ptr();
    let lo = _mm256_set1_ps(-87.336_55);
    let hi = _mm256_set1_ps(88.3);
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    let (c1, c2) = (_mm256_set1_ps(0.693_359_4), _mm256_set1_ps(-2.121_944_4e-4));
    let k = [
        1.987_569_1e-4f32,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let x0 = _mm256_loadu_ps(p.add(i));
        let x = _mm256_min_ps(_mm256_max_ps(x0, lo), hi);
        let f = _mm256_round_ps(
            _mm256_mul_ps(x, log2e),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(f, c2, _mm256_fnmadd_ps(f, c1, x));
        let mut y = _mm256_set1_ps(k[0]);
        for &c in &k[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(f), _mm256_set1_epi32(127)),
            23,
        );
        let mut out = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
        out = _mm256_and_ps(out, _mm256_cmp_ps(x0, lo, _CMP_GE_OQ));
        // NaN in, NaN out.
        out = _mm256_blendv_ps(out, x0, _mm256_cmp_ps(x0, x0, _CMP_UNORD_Q));
        _mm256_storeu_ps(p.add(i), out);
        if _mm256_movemask_ps(_mm256_cmp_ps(x0, hi, _CMP_GT_OQ)) != 0 {
            // 2^n overflows the exponent field above `hi`; libm handles the rare large input.
            let mut orig = [0f32; 8];
            _mm256_storeu_ps(orig.as_mut_ptr(), x0);
            for (j, x) in orig.into_iter().enumerate() {
                if x > 88.3 {
                    *p.add(i + j) = x.exp();
                }
            }
        }
        i += 8;
    }
    for x in &mut v[n..] {
        *x = x.exp();
    }
}

/// Four 8-lane FMA chains, then a horizontal sum. The compiler's own vectorisation of the
/// portable loop used 4-lane multiplies and adds without FMA (2.5x slower decoding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut s = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (q, acc) in s.iter_mut().enumerate() {
            let o = i + 8 * q;
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        s[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    let mut t = _mm_cvtss_f32(h);
    while i < n {
        t += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    t
}
impl Float for f64 {
    fn to64(self) -> f64 {
        self
    }
    fn from64(x: f64) -> f64 {
        x
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
}

/// The elements of a contiguous CPU storage slice under `l` (custom ops receive whole storages).
pub(crate) fn contiguous<'a, T>(data: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op needs a contiguous input"),
    }
}

/// [`contiguous`] for the destination of an in-place op.
pub(crate) fn contiguous_mut<'a, T>(data: &'a mut [T], l: &Layout) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("in-place op needs a contiguous destination"),
    }
}

/// Runs `$body` over the contiguous slices of same-dtype f32 or f64 CPU storages and wraps the
/// result in a storage of that dtype.
macro_rules! per_float_impl {
    ($what:expr; $($v:ident = $s:expr, $l:expr);+ => $body:expr) => {{
        #[allow(unused_parens)]
        match ($($s),+) {
            ($(CpuStorage::F32($v)),+) => {
                $(let $v = contiguous($v, $l)?;)+
                CpuStorage::F32($body)
            }
            ($(CpuStorage::F64($v)),+) => {
                $(let $v = contiguous($v, $l)?;)+
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: unsupported dtypes", $what),
        }
    }};
}

pub(super) use per_float_impl as per_float;

fn row_max<T: Float>(row: &[T]) -> T {
    row.iter()
        .copied()
        .fold(T::from64(f64::NEG_INFINITY), |m, v| {
            if v.to64() > m.to64() {
                v
            } else {
                m
            }
        })
}

fn softmax_rows<T: Float>(x: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::from64(0.0); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, row)| {
            let max = row_max(row);
            for (oi, &v) in o.iter_mut().zip(row) {
                *oi = v - max;
            }
            T::exp_slice(o);
            let sum: f64 = o.iter().map(|v| v.to64()).sum();
            let inv = T::from64(1.0 / sum);
            for oi in o.iter_mut() {
                *oi = *oi * inv;
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
        let out = per_float!("fused softmax"; v = s, l => softmax_rows(v, d));
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

/// Row maximum, and `exp(row - max)` written into `buf` with its sum.
fn shifted_exp<T: Float>(row: &[T], buf: &mut [T]) -> (T, f64) {
    let max = row_max(row);
    for (b, &v) in buf.iter_mut().zip(row) {
        *b = v - max;
    }
    T::exp_slice(buf);
    (max, buf.iter().map(|v| v.to64()).sum())
}

fn lsg_fwd<T: Float>(x: &[T], t: &[u32], d: usize) -> Vec<T> {
    x.par_chunks(d)
        .zip(t.par_iter())
        .map_init(
            || vec![T::from64(0.0); d],
            |buf, (row, &ti)| {
                let (max, sum) = shifted_exp(row, buf);
                T::from64((row[ti as usize] - max).to64() - sum.ln())
            },
        )
        .collect()
}

fn lsg_bwd<T: Float>(x: &[T], t: &[u32], g: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::from64(0.0); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(t.par_iter().zip(g.par_iter()))
        .for_each(|((o, row), (&ti, &gi))| {
            // One exp per logit: the softmax numerators go straight into the output row.
            let (_, sum) = shifted_exp(row, o);
            let k = T::from64(-gi.to64() / sum);
            for oi in o.iter_mut() {
                *oi = *oi * k;
            }
            o[ti as usize] = o[ti as usize] + gi;
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
        let out = per_float!("fused log-softmax"; v = s1, l1 => lsg_fwd(v, &t, d));
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

/// Gradient of [`log_softmax_gather`] for upstream gradient `g` (`[...]`): `g (onehot - softmax)`.
/// Not itself differentiable (the hand-written backward calls it).
pub fn log_softmax_gather_backward(
    logits: &Tensor,
    targets: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    if available(logits) {
        let g = g.to_dtype(logits.dtype())?.contiguous()?;
        logits
            .contiguous()?
            .apply_op3(&targets.contiguous()?, &g, LsgBackward)
    } else {
        let p = candle_nn::ops::softmax_last_dim(logits)?;
        let g = g.to_dtype(logits.dtype())?.unsqueeze(D::Minus1)?;
        p.broadcast_mul(&g.neg()?)?
            .scatter_add(&targets.unsqueeze(D::Minus1)?, &g, D::Minus1)
    }
}

struct LsgBackward;

impl CustomOp3 for LsgBackward {
    fn name(&self) -> &'static str {
        "fused-log-softmax-gather-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l1.dims()[l1.dims().len() - 1];
        let t = targets(s2, l2)?;
        let out = per_float!("fused log-softmax backward"; x = s1, l1; g = s3, l3 => lsg_bwd(x, &t, g, d));
        Ok((out, l1.shape().clone()))
    }
}

/// Gradient of a last-dim softmax with output `p`, for upstream gradient `dp`: `p (dp - sum(p dp))`.
pub fn softmax_backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    if available(p) && p.dtype() == dp.dtype() {
        p.contiguous()?
            .apply_op2(&dp.contiguous()?, SoftmaxBackward)
    } else {
        let s = (p * dp)?.sum_keepdim(D::Minus1)?;
        p * dp.broadcast_sub(&s)?
    }
}

struct SoftmaxBackward;

fn softmax_bwd_rows<T: Float>(p: &[T], dp: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::from64(0.0); p.len()];
    out.par_chunks_mut(d)
        .zip(p.par_chunks(d).zip(dp.par_chunks(d)))
        .for_each(|(o, (pr, gr))| {
            let s: f64 = pr.iter().zip(gr).map(|(&a, &b)| (a * b).to64()).sum();
            let s = T::from64(s);
            for ((oi, &a), &b) in o.iter_mut().zip(pr).zip(gr) {
                *oi = a * (b - s);
            }
        });
    out
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l1.dims()[l1.dims().len() - 1];
        let out = per_float!("fused softmax backward"; p = s1, l1; g = s2, l2 => softmax_bwd_rows(p, g, d));
        Ok((out, l1.shape().clone()))
    }
}

/// `act(g) * u` in one pass for tensors outside autograd (the recorded forward, inference); `None`
/// where it does not apply.
pub fn gated_activation(act: Activation, g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    if !available(g) || u.dtype() != g.dtype() || g.track_op() || u.track_op() {
        return Ok(None);
    }
    Ok(Some(
        g.contiguous()?.apply_op2(&u.contiguous()?, Gated(act))?,
    ))
}

struct Gated(Activation);

fn gated_rows<T: Float>(act: Activation, g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::from64(0.0); g.len()];
    const CHUNK: usize = 1 << 14;
    let one = T::from64(1.0);
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let (gc, uc) = (&g[c * CHUNK..][..o.len()], &u[c * CHUNK..][..o.len()]);
        match act {
            Activation::Silu => {
                for (oi, &x) in o.iter_mut().zip(gc) {
                    *oi = -x;
                }
                T::exp_slice(o);
                for ((oi, &x), &up) in o.iter_mut().zip(gc).zip(uc) {
                    *oi = x / (one + *oi) * up;
                }
            }
            Activation::GeluTanh => {
                let k = T::from64(GELU_K);
                let cst = T::from64(GELU_C);
                let half = T::from64(0.5);
                for ((oi, &x), &up) in o.iter_mut().zip(gc).zip(uc) {
                    *oi = half * x * (one + (cst * (x + k * x * x * x)).tanh()) * up;
                }
            }
        }
    });
    out
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "fused-gated-activation"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            candle_core::bail!("fused gated activation: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        let out = per_float!("fused gated activation"; g = s1, l1; u = s2, l2 => gated_rows(self.0, g, u));
        Ok((out, l1.shape().clone()))
    }
}

/// Gradients `(dg, du)` of `act(g) * u` for upstream `dm`, in one pass; `None` where the fused
/// kernel does not apply (the caller composes them).
pub fn swiglu_backward(
    act: Activation,
    g: &Tensor,
    u: &Tensor,
    dm: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    if !available(g) || u.dtype() != g.dtype() || dm.dtype() != g.dtype() {
        return Ok(None);
    }
    let both = g
        .contiguous()?
        .apply_op3(&u.contiguous()?, &dm.contiguous()?, ActBackward(act))?;
    Ok(Some((both.get(0)?, both.get(1)?)))
}

struct ActBackward(Activation);

fn act_bwd<T: Float>(act: Activation, g: &[T], u: &[T], dm: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::from64(0.0); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    const CHUNK: usize = 1 << 14;
    let one = T::from64(1.0);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (dgc, duc))| {
            let base = c * CHUNK;
            if act == Activation::Silu {
                // exp(-g) for the chunk, vectorised, parked in the du output until it is written.
                for (e, &x) in duc.iter_mut().zip(&g[base..]) {
                    *e = -x;
                }
                T::exp_slice(duc);
            }
            for i in 0..dgc.len() {
                let (x, up, d) = (g[base + i], u[base + i], dm[base + i]);
                let (a, da) = match act {
                    Activation::Silu => {
                        let s = one / (one + duc[i]);
                        (x * s, s * (one + x * (one - s)))
                    }
                    Activation::GeluTanh => {
                        let c = T::from64(GELU_C);
                        let k = T::from64(GELU_K);
                        let half = T::from64(0.5);
                        let th = (c * (x + k * x * x * x)).tanh();
                        let inner = c * (one + T::from64(3.0) * k * x * x);
                        (
                            half * x * (one + th),
                            half * (one + th) + half * x * (one - th * th) * inner,
                        )
                    }
                };
                duc[i] = d * a;
                dgc[i] = d * up * da;
            }
        });
    out
}

impl CustomOp3 for ActBackward {
    fn name(&self) -> &'static str {
        "fused-gated-activation-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = per_float!("fused activation backward"; g = s1, l1; u = s2, l2; d = s3, l3 => act_bwd(self.0, g, u, d));
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// RMSNorm in two passes over each row, for tensors outside any autograd graph (the hand-written
/// backward pairs it with [`rms_norm_backward`]). `w` is applied as `w`, or `1 + w` (Gemma). `None`
/// where it does not apply: other devices or dtypes, or inputs that track gradients (those take the
/// composed, differentiable form).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, one_plus: bool) -> Result<Option<Tensor>> {
    if !available(x) || x.track_op() || w.track_op() || w.dtype() != x.dtype() {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(
        &w.contiguous()?,
        RmsNormFwd { eps, one_plus },
    )?))
}

struct RmsNormFwd {
    eps: f64,
    one_plus: bool,
}

/// `w`, or `1 + w` for Gemma's norms.
fn norm_weight<T: Float>(w: &[T], one_plus: bool) -> Vec<T> {
    w.iter()
        .map(|&v| if one_plus { v + T::from64(1.0) } else { v })
        .collect()
}

fn rms_fwd_rows<T: Float>(x: &[T], w: &[T], eps: f64, one_plus: bool) -> Vec<T> {
    let n = w.len();
    let wf = norm_weight(w, one_plus);
    let mut y = vec![T::from64(0.0); x.len()];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(yr, xr)| {
            let s = rms_denom(xr, eps);
            for ((yi, &xi), &wi) in yr.iter_mut().zip(xr).zip(&wf) {
                *yi = xi / s * wi;
            }
        });
    y
}

impl CustomOp2 for RmsNormFwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims()[l1.dims().len() - 1] != l2.shape().elem_count() {
            candle_core::bail!("fused rms norm: weight does not match the last dimension");
        }
        let out = per_float!("fused rms norm"; x = s1, l1; w = s2, l2 => rms_fwd_rows(x, w, self.eps, self.one_plus));
        Ok((out, l1.shape().clone()))
    }
}

/// Gradients `(dx, dw)` of [`rms_norm`] for upstream `dy`, given its input (denominators are
/// recomputed as the forward computes them), in one pass over the rows (per-thread partial sums for
/// `dw`). `None` where the fused form does not apply.
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    one_plus: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let same = [w, dy].iter().all(|t| t.dtype() == x.dtype());
    if !available(x) || !same {
        return Ok(None);
    }
    let n = x.dim(D::Minus1)?;
    let rows = x.elem_count() / n;
    let both = x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &dy.contiguous()?,
        RmsNormBwd { n, eps, one_plus },
    )?;
    let dx = both.narrow(0, 0, rows * n)?.reshape(x.shape())?;
    let dw = both.narrow(0, rows * n, n)?.reshape(w.shape())?;
    Ok(Some((dx, dw)))
}

struct RmsNormBwd {
    n: usize,
    eps: f64,
    one_plus: bool,
}

fn rms_denom<T: Float>(xr: &[T], eps: f64) -> T {
    let ss: f64 = xr.iter().map(|&v| (v * v).to64()).sum();
    T::from64((ss / xr.len() as f64 + eps).sqrt())
}

fn rms_bwd_rows<T: Float>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    eps: f64,
    one_plus: bool,
) -> Vec<T> {
    let rows = dy.len() / n;
    let wf = norm_weight(w, one_plus);
    let mut out = vec![T::from64(0.0); rows * n + n];
    let (dx, dw) = out.split_at_mut(rows * n);
    const BLOCK: usize = 64;
    let partial: Vec<Vec<f64>> = dx
        .par_chunks_mut(BLOCK * n)
        .enumerate()
        .map(|(bi, dxb)| {
            let mut acc = vec![0.0f64; n];
            for (ri, dxr) in dxb.chunks_mut(n).enumerate() {
                let r = bi * BLOCK + ri;
                let (xr, gr) = (&x[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
                let s = rms_denom(xr, eps);
                let dot: f64 = xr
                    .iter()
                    .zip(gr)
                    .zip(&wf)
                    .map(|((&xi, &gi), &wi)| (gi * wi * xi).to64())
                    .sum();
                let k = T::from64(dot / (n as f64 * s.to64().powi(3)));
                for i in 0..n {
                    dxr[i] = gr[i] * wf[i] / s - xr[i] * k;
                    acc[i] += (gr[i] * (xr[i] / s)).to64();
                }
            }
            acc
        })
        .collect();
    for p in partial {
        for (d, v) in dw.iter_mut().zip(p) {
            *d = *d + T::from64(v);
        }
    }
    out
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let len = l3.shape().elem_count();
        let out = per_float!("fused rms norm backward"; x = s1, l1; w = s2, l2; dy = s3, l3
            => rms_bwd_rows(x, w, dy, self.n, self.eps, self.one_plus));
        Ok((out, Shape::from(len + self.n)))
    }
}

/// Rotary embedding fused with the head transpose, for tensors outside autograd: projections
/// `[b, t, n, hd]` in, rotated heads `[b, n, t, hd]` out (`cos`/`sin` `[b, 1, t, hd]`), one pass
/// instead of a transpose copy and six allocating ops. `None` where it does not apply.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    rope_op(x, cos, sin, false)
}

/// The gradient of [`rope_heads`]: `dy` `[b, n, t, hd]` in, `dx` `[b, t, n, hd]` out.
pub fn rope_heads_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    rope_op(dy, cos, sin, true)
}

fn rope_op(x: &Tensor, cos: &Tensor, sin: &Tensor, backward: bool) -> Result<Option<Tensor>> {
    let same = cos.dtype() == x.dtype() && sin.dtype() == x.dtype();
    if !available(x) || !same || x.track_op() || x.dims().len() != 4 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { backward },
    )?))
}

struct Rope {
    backward: bool,
}

/// `dims` are the input's `[b, a, c, hd]`; the output swaps `a` and `c`.
fn rope_rows<T: Float>(x: &[T], cos: &[T], sin: &[T], dims: [usize; 4], backward: bool) -> Vec<T> {
    let [_, a, c, hd] = dims;
    let half = hd / 2;
    let mut out = vec![T::from64(0.0); x.len()];
    out.par_chunks_mut(hd).enumerate().for_each(|(row, o)| {
        // Output row index over [b, c, a]; its source row is [b, a, c].
        let (bi, ci, ai) = (row / (c * a), (row / a) % c, row % a);
        let src = &x[((bi * a + ai) * c + ci) * hd..][..hd];
        // Positions are the forward's t: the input's `a` in the forward ([b, t, n] in), its `c`
        // in the backward ([b, n, t] in).
        let (ti, t) = if backward { (ci, c) } else { (ai, a) };
        let cs = &cos[(bi * t + ti) * hd..][..hd];
        let sn = &sin[(bi * t + ti) * hd..][..hd];
        for i in 0..half {
            if backward {
                // dx = dy cos + R^T (dy sin), R^T [z1, z2] = [z2, -z1]
                o[i] = src[i] * cs[i] + src[i + half] * sn[i + half];
                o[i + half] = src[i + half] * cs[i + half] - src[i] * sn[i];
            } else {
                // y = x cos + R x sin, R [x1, x2] = [-x2, x1]
                o[i] = src[i] * cs[i] + (-src[i + half]) * sn[i];
                o[i + half] = src[i + half] * cs[i + half] + src[i] * sn[i + half];
            }
        }
    });
    out
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope-heads"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l1.dims();
        let dims = [d[0], d[1], d[2], d[3]];
        let t = if self.backward { d[2] } else { d[1] };
        if l2.dims() != [d[0], 1, t, d[3]] || l3.dims() != l2.dims() || !d[3].is_multiple_of(2) {
            candle_core::bail!("fused rope: cos/sin {:?} do not fit {:?}", l2.dims(), d);
        }
        let out = per_float!("fused rope"; x = s1, l1; c = s2, l2; s = s3, l3
            => rope_rows(x, c, s, dims, self.backward));
        Ok((out, Shape::from((d[0], d[2], d[1], d[3]))))
    }
}

/// At most this many rows go through [`small_matmul_t`] instead of GEMM.
pub const SMALL_ROWS: usize = 16;

/// `x w^T` for a handful of rows `x [m, k]` (decoding) and a weight `w [n, k]`, differentiable.
/// GEMM packs the whole weight into its panel layout on every call, which for a few rows costs
/// more than the multiply; here each weight row is read once, in place, and dotted with every row
/// of `x`. `None` where it does not apply (other devices, dtypes, or more rows).
pub fn small_matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !available(x) || w.dtype() != x.dtype() || x.dims().len() != 2 || x.dim(0)? > SMALL_ROWS {
        return Ok(None);
    }
    Ok(Some(
        x.contiguous()?.apply_op2(&w.contiguous()?, SmallMatmulT)?,
    ))
}

struct SmallMatmulT;

#[inline(always)]
fn dot_rows<T: Float>(x: &[T], w: &[T], k: usize, out: &mut [T], n: usize, j0: usize) {
    // out is [m, n] row-major; this fills columns j0.. for the weight rows in `w`.
    let m = x.len() / k;
    for (jj, wr) in w.chunks_exact(k).enumerate() {
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            // Eight independent partial sums so the loop vectorises without reassociation.
            let mut acc = [T::from64(0.0); 8];
            let (xc, wc) = (xr.chunks_exact(8), wr.chunks_exact(8));
            let (xt, wt) = (xc.remainder(), wc.remainder());
            for (a, b) in xc.zip(wc) {
                for l in 0..8 {
                    acc[l] = acc[l] + a[l] * b[l];
                }
            }
            let mut s =
                ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (a, b) in xt.iter().zip(wt) {
                s = s + *a * *b;
            }
            out[r * n + j0 + jj] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2<T: Float>(x: &[T], w: &[T], k: usize, out: &mut [T], n: usize, j0: usize) {
    let m = x.len() / k;
    for (jj, wr) in w.chunks_exact(k).enumerate() {
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            match T::dot_avx2(xr, wr) {
                Some(v) => out[r * n + j0 + jj] = v,
                None => dot_rows(xr, wr, k, &mut out[r * n + j0 + jj..], 1, 0),
            }
        }
    }
}

fn small_matmul_rows<T: Float>(x: &[T], w: &[T], k: usize) -> Vec<T> {
    let (m, n) = (x.len() / k, w.len() / k);
    const BLOCK: usize = 64;
    let parts: Vec<(usize, Vec<T>)> = w
        .par_chunks(BLOCK * k)
        .enumerate()
        .map(|(bi, wb)| {
            let nb = wb.len() / k;
            let mut part = vec![T::from64(0.0); m * nb];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the features the function was compiled for.
                unsafe { dot_rows_avx2(x, wb, k, &mut part, nb, 0) };
                return (bi * BLOCK, part);
            }
            dot_rows(x, wb, k, &mut part, nb, 0);
            (bi * BLOCK, part)
        })
        .collect();
    let mut out = vec![T::from64(0.0); m * n];
    for (j0, part) in parts {
        let nb = part.len() / m;
        for r in 0..m {
            out[r * n + j0..r * n + j0 + nb].copy_from_slice(&part[r * nb..(r + 1) * nb]);
        }
    }
    out
}

impl CustomOp2 for SmallMatmulT {
    fn name(&self) -> &'static str {
        "small-matmul-t"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = (l1.dims()[0], l1.dims()[1]);
        let (n, k2) = (l2.dims()[0], l2.dims()[1]);
        if k != k2 {
            candle_core::bail!("small matmul: inner dimensions {k} and {k2} differ");
        }
        let out = per_float!("small matmul"; x = s1, l1; w = s2, l2 => small_matmul_rows(x, w, k));
        Ok((out, Shape::from((m, n))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        matmul_t_bwd(x, w, grad)
    }
}

/// Gradients `(dx, dW)` of `y = x W^T` (`x [m, k]`, `w [n, k]`) for the kernels that compute it.
pub(super) fn matmul_t_bwd(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    Ok((Some(grad.matmul(w)?), Some(grad.t()?.matmul(x)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::model::max_abs_diff;

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
        assert!(max_abs_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-12);
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
        assert!(max_abs_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-12);
    }

    #[test]
    fn small_matmul_equals_gemm_forward_and_backward() {
        for (m, k, n) in [(1, 7, 5), (8, 70, 130), (16, 64, 3)] {
            let x = Var::from_tensor(&rand(&[m, k], 4)).unwrap();
            let w = Var::from_tensor(&rand(&[n, k], 5)).unwrap();
            let g = rand(&[m, n], 6);
            let small = small_matmul_t(&x, &w).unwrap().expect("applies");
            let gemm = x.matmul(&w.t().unwrap()).unwrap();
            assert!(max_abs_diff(&small, &gemm) < 1e-12, "{m}x{k}x{n}");
            let gs = (small * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (gemm * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                assert!(max_abs_diff(gs.get(v).unwrap(), gg.get(v).unwrap()) < 1e-12);
            }
        }
        // f32 takes the AVX2/FMA dot product where the CPU has it; k = 75 covers its tails.
        for (m, k, n) in [(1, 75, 9), (8, 512, 200)] {
            let x = rand(&[m, k], 9).to_dtype(DType::F32).unwrap();
            let w = rand(&[n, k], 10).to_dtype(DType::F32).unwrap();
            let small = small_matmul_t(&x, &w).unwrap().expect("applies");
            let gemm = x.matmul(&w.t().unwrap()).unwrap();
            let d = max_abs_diff(&small, &gemm);
            assert!(d < 1e-3, "f32 {m}x{k}x{n}: off by {d}");
        }
        assert!(
            small_matmul_t(&rand(&[SMALL_ROWS + 1, 4], 7), &rand(&[3, 4], 8))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn vectorised_exp_matches_libm() {
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0443).collect();
        xs.extend([
            f32::MIN,
            -1e30,
            -100.0,
            -87.4,
            -87.3,
            88.7,
            88.8,
            1e30,
            f32::MAX,
            0.0,
            -0.0,
        ]);
        let mut got = xs.clone();
        <f32 as Float>::exp_slice(&mut got);
        for (&x, &y) in xs.iter().zip(&got) {
            let want = x.exp();
            if want < 1.2e-38 {
                assert!(y < 1.2e-38, "exp({x}) = {y}, want {want}");
            } else if want.is_infinite() {
                assert_eq!(y, f32::INFINITY, "exp({x})");
            } else {
                let rel = ((y - want) / want).abs();
                assert!(rel < 5e-7, "exp({x}) = {y}, want {want} (rel {rel})");
            }
        }
        let mut nan = [f32::NAN; 9];
        <f32 as Float>::exp_slice(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()));
    }
}
