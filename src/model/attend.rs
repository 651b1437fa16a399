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
/// elements any stride apart): it is read in place. `share[e] = (lead, cols)` says that batch
/// element `e`'s first `cols` rows of `b` equal element `lead`'s: they are read from `lead`
/// (the same values, so the same result), which keeps one copy of a shared prompt in cache for
/// every sample decoding from it.
pub fn scores(a: &Tensor, b: &Tensor, share: Option<&[(usize, usize)]>) -> Result<Option<Tensor>> {
    if !applies(a, b)? {
        return Ok(None);
    }
    let op = Scores(checked_share(share, b)?);
    Ok(Some(a.contiguous()?.apply_op2(&rows_in_place(b)?, op)?))
}

/// `p [B, r, n] · v [B, n, d] -> [B, r, d]`; `None` where it does not apply. `v` and `share` as
/// `b` and `share` of [`scores`].
pub fn mix(p: &Tensor, v: &Tensor, share: Option<&[(usize, usize)]>) -> Result<Option<Tensor>> {
    if !applies(p, v)? {
        return Ok(None);
    }
    let op = Mix(checked_share(share, v)?);
    Ok(Some(p.contiguous()?.apply_op2(&rows_in_place(v)?, op)?))
}

/// `share` as the kernels take it: one entry per batch element, leaders inside the batch, spans
/// inside the rows; an error otherwise (a wrong record would read another sequence's cache).
fn checked_share(
    share: Option<&[(usize, usize)]>,
    b: &Tensor,
) -> Result<Option<Vec<(usize, usize)>>> {
    let Some(share) = share else {
        return Ok(None);
    };
    let (bn, n, _) = b.dims3()?;
    if share.len() != bn || share.iter().any(|&(lead, cols)| lead >= bn || cols > n) {
        candle_core::bail!(
            "decode attention: a share record for {} elements does not fit {bn} elements of {n} rows",
            share.len()
        );
    }
    Ok(Some(share.to_vec()))
}

/// One batch element's keys (or values): its first `cols` rows from `pre` (the leader's), the
/// rest from `own`.
struct Rows<'a, T> {
    pre: &'a [T],
    own: &'a [T],
    cols: usize,
    n: usize,
    d: usize,
}

impl<'a, T> Rows<'a, T> {
    #[inline(always)]
    fn row(&self, j: usize) -> &'a [T] {
        let src = if j < self.cols { self.pre } else { self.own };
        &src[j * self.d..(j + 1) * self.d]
    }
}

/// Batch element `bi`'s rows of `b` (stride `bs`), with its share record.
fn element<'a, T>(
    b: &'a [T],
    bs: usize,
    bi: usize,
    share: &Option<Vec<(usize, usize)>>,
    n: usize,
    d: usize,
) -> Rows<'a, T> {
    let own = &b[bi * bs..bi * bs + n * d];
    let (lead, cols) = share.as_ref().map_or((bi, 0), |s| s[bi]);
    Rows {
        pre: &b[lead * bs..lead * bs + cols * d],
        own,
        cols,
        n,
        d,
    }
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
    if avx2() {
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
    fn scores_block(_a: &[Self], _b: &Rows<'_, Self>, _r: usize, _o: &mut [Self]) -> bool {
        false
    }
    fn mix_block(_p: &[Self], _v: &Rows<'_, Self>, _r: usize, _o: &mut [Self]) -> bool {
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
    fn scores_block(a: &[f32], b: &Rows<'_, f32>, r: usize, o: &mut [f32]) -> bool {
        if !avx2() {
            return false;
        }
        // SAFETY: the CPU has the features the kernel is compiled for.
        unsafe { scores_block_f32(a, b, r, o) };
        true
    }
    #[cfg(target_arch = "x86_64")]
    fn mix_block(p: &[f32], v: &Rows<'_, f32>, r: usize, o: &mut [f32]) -> bool {
        if !avx2() {
            return false;
        }
        // SAFETY: as above.
        unsafe { mix_block_f32(p, v, r, o) };
        true
    }
}

/// The scores of one batch element, every dot product the one [`dot`] takes (so the same bits),
/// with the CPU check and the call hoisted out of the `r x n` loop: per call they cost as much as
/// a 64-wide dot product itself.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_block_f32(a: &[f32], b: &Rows<'_, f32>, r: usize, o: &mut [f32]) {
    let (n, d) = (b.n, b.d);
    for i in 0..r {
        let ai = &a[i * d..(i + 1) * d];
        for j in 0..n {
            o[i * n + j] = super::fused::dot_f32_avx2(ai, b.row(j));
        }
    }
}

/// The mix of one batch element: each output lane is `x = x + p_j * v_j` over `j` in order, a
/// multiply and an add (no FMA), exactly as the portable loop rounds; 32 lanes are held in
/// registers across all `j` instead of being loaded and stored for every key.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mix_block_f32(p: &[f32], v: &Rows<'_, f32>, r: usize, o: &mut [f32]) {
    use std::arch::x86_64::*;
    let (n, d) = (v.n, v.d);
    for i in 0..r {
        let pi = &p[i * n..(i + 1) * n];
        let oi = &mut o[i * d..(i + 1) * d];
        let mut c = 0;
        while c + 32 <= d {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (j, &w) in pi.iter().enumerate() {
                let w = _mm256_set1_ps(w);
                let row = v.row(j)[c..].as_ptr();
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
                let row = v.row(j)[c..].as_ptr();
                x = _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(w), _mm256_loadu_ps(row)));
            }
            _mm256_storeu_ps(oi.as_mut_ptr().add(c), x);
            c += 8;
        }
        for (l, x) in oi.iter_mut().enumerate().skip(c) {
            let mut s = 0.0f32;
            for (j, &w) in pi.iter().enumerate() {
                s += w * v.row(j)[l];
            }
            *x = s;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn scores_rows<T: Kernels>(
    a: &[T],
    (b, bs): (&[T], usize),
    share: &Option<Vec<(usize, usize)>>,
    r: usize,
    n: usize,
    d: usize,
) -> Vec<T> {
    let batches = a.len() / (r * d);
    let mut out = vec![T::from64(0.0); batches * r * n];
    out.par_chunks_mut(r * n).enumerate().for_each(|(bi, o)| {
        let a = &a[bi * r * d..(bi + 1) * r * d];
        let b = element(b, bs, bi, share, n, d);
        if !T::scores_block(a, &b, r, o) {
            scores_block(a, &b, r, o);
        }
    });
    out
}

fn scores_block<T: Float>(a: &[T], b: &Rows<'_, T>, r: usize, o: &mut [T]) {
    let (n, d) = (b.n, b.d);
    for i in 0..r {
        let ai = &a[i * d..(i + 1) * d];
        for j in 0..n {
            o[i * n + j] = dot(ai, b.row(j));
        }
    }
}

fn mix_rows<T: Kernels>(
    p: &[T],
    (v, vs): (&[T], usize),
    share: &Option<Vec<(usize, usize)>>,
    r: usize,
    n: usize,
    d: usize,
) -> Vec<T> {
    let batches = p.len() / (r * n);
    let mut out = vec![T::from64(0.0); batches * r * d];
    out.par_chunks_mut(r * d).enumerate().for_each(|(bi, o)| {
        let p = &p[bi * r * n..(bi + 1) * r * n];
        let v = element(v, vs, bi, share, n, d);
        if !T::mix_block(p, &v, r, o) {
            mix_block(p, &v, r, o);
        }
    });
    out
}

fn mix_block<T: Float>(p: &[T], v: &Rows<'_, T>, r: usize, o: &mut [T]) {
    let (n, d) = (v.n, v.d);
    for i in 0..r {
        let oi = &mut o[i * d..(i + 1) * d];
        oi.fill(T::from64(0.0));
        for j in 0..n {
            let w = p[i * n + j];
            for (x, y) in oi.iter_mut().zip(v.row(j)) {
                *x = *x + w * *y;
            }
        }
    }
}

struct Scores(Option<Vec<(usize, usize)>>);

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
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(scores_rows(
                contiguous(a, l1)?,
                batch_rows(b, l2)?,
                &self.0,
                r,
                n,
                d,
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(scores_rows(
                contiguous(a, l1)?,
                batch_rows(b, l2)?,
                &self.0,
                r,
                n,
                d,
            )),
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

struct Mix(Option<Vec<(usize, usize)>>);

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
            (CpuStorage::F32(p), CpuStorage::F32(v)) => CpuStorage::F32(mix_rows(
                contiguous(p, l1)?,
                batch_rows(v, l2)?,
                &self.0,
                r,
                n,
                d,
            )),
            (CpuStorage::F64(p), CpuStorage::F64(v)) => CpuStorage::F64(mix_rows(
                contiguous(p, l1)?,
                batch_rows(v, l2)?,
                &self.0,
                r,
                n,
                d,
            )),
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
        // 32-lane blocks, an 8-lane block and a scalar tail; several query rows; keys split
        // between a leader's prefix and the element's own rows.
        let mut rng = crate::generate::Rng::new(3, 0);
        let mut rand =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect() };
        for (r, n, d, cols) in [(1, 37, 64, 20), (3, 5, 75, 0), (2, 1, 40, 1), (1, 9, 7, 9)] {
            let (a, b, p, pre) = (rand(r * d), rand(n * d), rand(r * n), rand(n * d));
            let rows = Rows {
                pre: &pre[..cols * d],
                own: &b,
                cols,
                n,
                d,
            };
            let (mut want, mut got) = (vec![0.0f32; r * n], vec![7.0f32; r * n]);
            scores_block(&a, &rows, r, &mut want);
            if !f32::scores_block(&a, &rows, r, &mut got) {
                scores_block(&a, &rows, r, &mut got);
            }
            assert_eq!(bits(&want), bits(&got), "scores {r}x{n}x{d}");
            let (mut want, mut got) = (vec![0.0f32; r * d], vec![7.0f32; r * d]);
            mix_block(&p, &rows, r, &mut want);
            if !f32::mix_block(&p, &rows, r, &mut got) {
                mix_block(&p, &rows, r, &mut got);
            }
            assert_eq!(bits(&want), bits(&got), "mix {r}x{n}x{d}");
        }
    }

    #[test]
    fn shared_prefixes_read_from_the_leader_give_the_same_bits() {
        // Elements 1 and 2 copy element 0's first 6 rows (a prompt prefilled once, three
        // samples); reading them from element 0 changes nothing, and a record that lies (element
        // 3 does not start like element 0) is what the output would show.
        let mut rng = crate::generate::Rng::new(5, 0);
        let (bn, n, d) = (4, 9, 64);
        let mut kv: Vec<f32> = (0..bn * n * d)
            .map(|_| rng.next_f64() as f32 - 0.5)
            .collect();
        for e in 1..3 {
            let (head, rest) = kv.split_at_mut(e * n * d);
            rest[..6 * d].copy_from_slice(&head[..6 * d]);
        }
        let kv = Tensor::from_vec(kv, (bn, n, d), &Device::Cpu).unwrap();
        let q = Tensor::from_vec(
            (0..bn * d)
                .map(|_| rng.next_f64() as f32 - 0.5)
                .collect::<Vec<_>>(),
            (bn, 1, d),
            &Device::Cpu,
        )
        .unwrap();
        let p = Tensor::from_vec(
            (0..bn * n)
                .map(|_| rng.next_f64() as f32)
                .collect::<Vec<_>>(),
            (bn, 1, n),
            &Device::Cpu,
        )
        .unwrap();
        let share = [(0, 0), (0, 6), (0, 6), (3, 0)];
        let all = |t: Tensor| bits(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let plain = all(scores(&q, &kv, None).unwrap().unwrap());
        assert_eq!(all(scores(&q, &kv, Some(&share)).unwrap().unwrap()), plain);
        let plain_mix = all(mix(&p, &kv, None).unwrap().unwrap());
        assert_eq!(all(mix(&p, &kv, Some(&share)).unwrap().unwrap()), plain_mix);
        let lie = [(0, 0), (0, 6), (0, 6), (0, 6)];
        assert_ne!(all(scores(&q, &kv, Some(&lie)).unwrap().unwrap()), plain);
        assert!(scores(&q, &kv, Some(&[(0, 0); 3])).is_err());
        assert!(mix(&p, &kv, Some(&[(0, 0), (0, 10), (0, 0), (0, 0)])).is_err());
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn match_batched_matmul_forward_and_backward() {
        let a = Var::from_tensor(&rand(&[6, 3, 37], 1)).unwrap();
        let b = Var::from_tensor(&rand(&[6, 11, 37], 2)).unwrap();
        let fused = scores(&a, &b, None).unwrap().unwrap();
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
        let fused = mix(&p, &b, None).unwrap().unwrap();
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
        let d = (scores(&a32, &b32, None).unwrap().unwrap()
            - a32.matmul(&b32.t().unwrap()).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!(d < 1e-5, "{d}");
        assert!(scores(&rand(&[1, 9, 4], 8), &rand(&[1, 3, 4], 9), None)
            .unwrap()
            .is_none());
    }
}
