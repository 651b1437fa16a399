//! Decode-time attention products for a few query rows per key/value head: the scores `q k^T` and
//! the mix `p v`, batched over (sequence, kv head) in one parallel pass. candle's batched matmul
//! issues one GEMM call per batch element — at 64 sequences x 8 heads x 8 layers that is thousands
//! of tiny GEMMs per decode step, each paying operand packing and a thread-pool dispatch. Both
//! ops are differentiable (their backward is two matmuls), though only inference uses them.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{available, contiguous, Float};

/// At most this many query rows per batch element take these kernels.
pub const FEW_QUERIES: usize = 8;

fn applies(a: &Tensor, b: &Tensor) -> Result<bool> {
    Ok(available(a)
        && a.dtype() == b.dtype()
        && a.rank() == 3
        && b.rank() == 3
        && a.dim(1)? <= FEW_QUERIES)
}

/// `a [B, r, d] · b [B, n, d]^T -> [B, r, n]`; `None` where it does not apply. `b` may be a
/// view of the first `n` positions of a longer cache buffer (rows of `d` contiguous, batch
/// elements any stride apart): it is read in place.
pub fn scores(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !applies(a, b)? {
        return Ok(None);
    }
    Ok(Some(a.contiguous()?.apply_op2(&rows_in_place(b)?, Scores)?))
}

/// `p [B, r, n] · v [B, n, d] -> [B, r, d]`; `None` where it does not apply. `v` as `b` of
/// [`scores`].
pub fn mix(p: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    if !applies(p, v)? {
        return Ok(None);
    }
    Ok(Some(p.contiguous()?.apply_op2(&rows_in_place(v)?, Mix)?))
}

/// `t` itself when [`batch_rows`] can read it, else a contiguous copy.
fn rows_in_place(t: &Tensor) -> Result<Tensor> {
    if batch_stride(t.layout()).is_some() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The stride between batch elements of a `[B, n, d]` layout whose `n x d` block is
/// contiguous, `None` for any other layout.
fn batch_stride(l: &Layout) -> Option<usize> {
    let (bn, n, d) = l.shape().dims3().ok()?;
    let st = l.stride();
    let rows_ok = (st[2] == 1 || d <= 1) && (st[1] == d || n <= 1);
    let batch = if bn <= 1 { n * d } else { st[0] };
    (rows_ok && (bn <= 1 || batch >= n * d)).then_some(batch)
}

/// The storage from `l`'s first element, and its batch stride.
fn batch_rows<'a, T>(data: &'a [T], l: &Layout) -> Result<(&'a [T], usize)> {
    let Some(stride) = batch_stride(l) else {
        candle_core::bail!("decode attention: unsupported layout {:?}", l.stride());
    };
    Ok((&data[l.start_offset()..], stride))
}

#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the kernel is compiled for.
        if let Some(v) = unsafe { T::dot_avx2(a, b) } {
            return v;
        }
    }
    let mut acc = [T::from64(0.0); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in at.iter().zip(bt) {
        s = s + *x * *y;
    }
    s
}

/// Per-type kernels for one batch element's scores or mix block; `false` where the type has none
/// for this CPU (the portable loops run instead).
trait Kernels: Float {
    fn scores_block(_a: &[Self], _b: &[Self], _r: usize, _d: usize, _o: &mut [Self]) -> bool {
        false
    }
    fn mix_block(_p: &[Self], _v: &[Self], _r: usize, _d: usize, _o: &mut [Self]) -> bool {
        false
    }
}

impl Kernels for f64 {}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

impl Kernels for f32 {
    #[cfg(target_arch = "x86_64")]
    fn scores_block(a: &[f32], b: &[f32], r: usize, d: usize, o: &mut [f32]) -> bool {
        if !avx2() {
            return false;
        }
        // SAFETY: the CPU has the features the kernel is compiled for.
        unsafe { scores_block_f32(a, b, r, d, o) };
        true
    }
    #[cfg(target_arch = "x86_64")]
    fn mix_block(p: &[f32], v: &[f32], r: usize, d: usize, o: &mut [f32]) -> bool {
        if !avx2() {
            return false;
        }
        // SAFETY: as above.
        unsafe { mix_block_f32(p, v, r, d, o) };
        true
    }
}

/// The scores of one batch element, every dot product the one [`dot`] takes (so the same bits),
/// with the CPU check and the call hoisted out of the `r x n` loop: per call they cost as much as
/// a 64-wide dot product itself.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_block_f32(a: &[f32], b: &[f32], r: usize, d: usize, o: &mut [f32]) {
    let n = b.len() / d;
    for i in 0..r {
        let ai = &a[i * d..(i + 1) * d];
        for (j, bj) in b.chunks_exact(d).enumerate() {
            o[i * n + j] = super::fused::dot_f32_avx2(ai, bj);
        }
    }
}

/// The mix of one batch element: each output lane is `x = x + p_j * v_j` over `j` in order, a
/// multiply and an add (no FMA), exactly as the portable loop rounds; 32 lanes are held in
/// registers across all `j` instead of being loaded and stored for every key.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mix_block_f32(p: &[f32], v: &[f32], r: usize, d: usize, o: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = v.len() / d;
    let vp = v.as_ptr();
    for i in 0..r {
        let pi = &p[i * n..(i + 1) * n];
        let oi = &mut o[i * d..(i + 1) * d];
        let mut c = 0;
        while c + 32 <= d {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (j, &w) in pi.iter().enumerate() {
                let w = _mm256_set1_ps(w);
                let row = vp.add(j * d + c);
                for (q, x) in acc.iter_mut().enumerate() {
                    *x = _mm256_add_ps(*x, _mm256_mul_ps(w, _mm256_loadu_ps(row.add(8 * q))));
                }
            }
            for (q, x) in acc.iter().enumerate() {
                _mm256_storeu_ps(oi.as_mut_ptr().add(c + 8 * q), *x);
            }
            c += 32;
        }
        while c + 8 <= d {
            let mut x = _mm256_setzero_ps();
            for (j, &w) in pi.iter().enumerate() {
                x = _mm256_add_ps(
                    x,
                    _mm256_mul_ps(_mm256_set1_ps(w), _mm256_loadu_ps(vp.add(j * d + c))),
                );
            }
            _mm256_storeu_ps(oi.as_mut_ptr().add(c), x);
            c += 8;
        }
        for (l, x) in oi.iter_mut().enumerate().skip(c) {
            let mut s = 0.0f32;
            for (j, &w) in pi.iter().enumerate() {
                s += w * v[j * d + l];
            }
            *x = s;
        }
    }
}

fn scores_rows<T: Kernels>(
    a: &[T],
    (b, bs): (&[T], usize),
    r: usize,
    n: usize,
    d: usize,
) -> Vec<T> {
    let batches = a.len() / (r * d);
    let mut out = vec![T::from64(0.0); batches * r * n];
    out.par_chunks_mut(r * n).enumerate().for_each(|(bi, o)| {
        let (a, b) = (
            &a[bi * r * d..(bi + 1) * r * d],
            &b[bi * bs..bi * bs + n * d],
        );
        if !T::scores_block(a, b, r, d, o) {
            scores_block(a, b, r, d, o);
        }
    });
    out
}

fn scores_block<T: Float>(a: &[T], b: &[T], r: usize, d: usize, o: &mut [T]) {
    let n = b.len() / d;
    for i in 0..r {
        let ai = &a[i * d..(i + 1) * d];
        for (j, bj) in b.chunks_exact(d).enumerate() {
            o[i * n + j] = dot(ai, bj);
        }
    }
}

fn mix_rows<T: Kernels>(p: &[T], (v, vs): (&[T], usize), r: usize, n: usize, d: usize) -> Vec<T> {
    let batches = p.len() / (r * n);
    let mut out = vec![T::from64(0.0); batches * r * d];
    out.par_chunks_mut(r * d).enumerate().for_each(|(bi, o)| {
        let (p, v) = (
            &p[bi * r * n..(bi + 1) * r * n],
            &v[bi * vs..bi * vs + n * d],
        );
        if !T::mix_block(p, v, r, d, o) {
            mix_block(p, v, r, d, o);
        }
    });
    out
}

fn mix_block<T: Float>(p: &[T], v: &[T], r: usize, d: usize, o: &mut [T]) {
    let n = v.len() / d;
    for i in 0..r {
        let oi = &mut o[i * d..(i + 1) * d];
        oi.fill(T::from64(0.0));
        for (j, vj) in v.chunks_exact(d).enumerate() {
            let w = p[i * n + j];
            for (x, y) in oi.iter_mut().zip(vj) {
                *x = *x + w * *y;
            }
        }
    }
}

struct Scores;

impl CustomOp2 for Scores {
    fn name(&self) -> &'static str {
        "decode-attention-scores"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ba, r, d) = l1.shape().dims3()?;
        let (bb, n, d2) = l2.shape().dims3()?;
        if ba != bb || d != d2 {
            candle_core::bail!(
                "attention scores: {:?} and {:?} do not fit",
                l1.dims(),
                l2.dims()
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(scores_rows(contiguous(a, l1)?, batch_rows(b, l2)?, r, n, d))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(scores_rows(contiguous(a, l1)?, batch_rows(b, l2)?, r, n, d))
            }
            _ => candle_core::bail!("attention scores: unsupported dtypes"),
        };
        Ok((out, Shape::from((ba, r, n))))
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(grad.matmul(b)?),
            Some(grad.transpose(1, 2)?.matmul(a)?),
        ))
    }
}

struct Mix;

impl CustomOp2 for Mix {
    fn name(&self) -> &'static str {
        "decode-attention-mix"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bp, r, n) = l1.shape().dims3()?;
        let (bv, n2, d) = l2.shape().dims3()?;
        if bp != bv || n != n2 {
            candle_core::bail!(
                "attention mix: {:?} and {:?} do not fit",
                l1.dims(),
                l2.dims()
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(v)) => {
                CpuStorage::F32(mix_rows(contiguous(p, l1)?, batch_rows(v, l2)?, r, n, d))
            }
            (CpuStorage::F64(p), CpuStorage::F64(v)) => {
                CpuStorage::F64(mix_rows(contiguous(p, l1)?, batch_rows(v, l2)?, r, n, d))
            }
            _ => candle_core::bail!("attention mix: unsupported dtypes"),
        };
        Ok((out, Shape::from((bp, r, d))))
    }
    fn bwd(
        &self,
        p: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(grad.matmul(&v.transpose(1, 2)?)?),
            Some(p.transpose(1, 2)?.matmul(grad)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::generate::Rng::new(seed, 0);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| r.next_f64() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn f32_kernels_round_as_the_portable_loops() {
        // Bit for bit: decoding's samples must not depend on which CPU path ran. Head sizes with
        // 32-lane blocks, an 8-lane block and a scalar tail; several query rows.
        let mut rng = crate::generate::Rng::new(3, 0);
        let mut rand =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect() };
        for (r, n, d) in [(1, 37, 64), (3, 5, 75), (2, 1, 40), (1, 9, 7)] {
            let (a, b, p) = (rand(r * d), rand(n * d), rand(r * n));
            let (mut want, mut got) = (vec![0.0f32; r * n], vec![7.0f32; r * n]);
            scores_block(&a, &b, r, d, &mut want);
            if !f32::scores_block(&a, &b, r, d, &mut got) {
                scores_block(&a, &b, r, d, &mut got);
            }
            assert_eq!(bits(&want), bits(&got), "scores {r}x{n}x{d}");
            let (mut want, mut got) = (vec![0.0f32; r * d], vec![7.0f32; r * d]);
            mix_block(&p, &b, r, d, &mut want);
            if !f32::mix_block(&p, &b, r, d, &mut got) {
                mix_block(&p, &b, r, d, &mut got);
            }
            assert_eq!(bits(&want), bits(&got), "mix {r}x{n}x{d}");
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn match_batched_matmul_forward_and_backward() {
        let a = Var::from_tensor(&rand(&[6, 3, 37], 1)).unwrap();
        let b = Var::from_tensor(&rand(&[6, 11, 37], 2)).unwrap();
        let fused = scores(&a, &b).unwrap().unwrap();
        let plain = a.matmul(&b.t().unwrap()).unwrap();
        assert!(crate::model::max_abs_diff(&fused, &plain) < 1e-12);
        let w = rand(&[6, 3, 11], 3);
        let (gf, gp) = (
            (&fused * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap(),
            (&plain * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap(),
        );
        assert!(crate::model::max_abs_diff(gf.get(&a).unwrap(), gp.get(&a).unwrap()) < 1e-12);
        assert!(crate::model::max_abs_diff(gf.get(&b).unwrap(), gp.get(&b).unwrap()) < 1e-12);

        let p = Var::from_tensor(&rand(&[6, 3, 11], 4)).unwrap();
        let fused = mix(&p, &b).unwrap().unwrap();
        let plain = p.matmul(&b).unwrap();
        assert!(crate::model::max_abs_diff(&fused, &plain) < 1e-12);
        let w = rand(&[6, 3, 37], 5);
        let (gf, gp) = (
            (&fused * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap(),
            (&plain * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap(),
        );
        assert!(crate::model::max_abs_diff(gf.get(&p).unwrap(), gp.get(&p).unwrap()) < 1e-12);
        assert!(crate::model::max_abs_diff(gf.get(&b).unwrap(), gp.get(&b).unwrap()) < 1e-12);
        // f32 too, and more than FEW_QUERIES rows is left to GEMM.
        let a32 = rand(&[2, 2, 16], 6)
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let b32 = rand(&[2, 5, 16], 7)
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let d = (scores(&a32, &b32).unwrap().unwrap() - a32.matmul(&b32.t().unwrap()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
        assert!(scores(&rand(&[1, 9, 4], 8), &rand(&[1, 3, 4], 9))
            .unwrap()
            .is_none());
    }
}
