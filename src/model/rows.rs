//! Decode-time `x W^T` for a batch of a few dozen to a few hundred rows (every sequence of a
//! continuous batch, one new token each) on AVX-512, with the same bits as candle's GEMM.
//!
//! candle's matmul hands this product to the gemm crate, which packs the whole weight into its
//! panel layout on every call and returns `W x^T`, which the caller then transposes: at 64 rows
//! the packing and the transposed copy cost more than half as much as the multiply, and the
//! linear layers ran at about 40% of what PyTorch's GEMM reaches on the same shapes. Here the
//! weight is read in place, six rows at a time (each of them a contiguous stream), the rows of
//! `x` are transposed once into 16-lane panels, and every output element is computed exactly as
//! the gemm crate's kernel computes it: a chain of fused multiply-adds over `k` in order, in
//! blocks of at most [`KC`] whose results are added in order. Same bits, so the decoding digests
//! of every recipe step stay what they were (a unit test holds it to candle's output bit for bit).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{available, contiguous};

/// Rows below this go to [`super::fused::small_matmul_t`]; above [`MAX_ROWS`], to GEMM (at 1024 rows
/// this kernel still took 2.7 ms where GEMM took 4.9; past it, x^T panels grow with the batch).
pub const MAX_ROWS: usize = 1024;

/// The gemm crate's depth block on every common L1 (its `kernel_params` gives at least 512 and
/// splits a longer depth into equal blocks).
const KC: usize = 512;
/// Rows per register tile: four 16-lane vectors.
const MR: usize = 64;
/// Weight rows (output columns) per register tile.
const NR: usize = 6;

/// `x [m, k] · w [n, k]^T -> [m, n]` for an f32 `x` of at most [`MAX_ROWS`] rows on a CPU with
/// AVX-512F; `None` where that does not apply (the caller takes GEMM).
pub fn rows_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !fits(x, &[w])? {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(&w.contiguous()?, RowsT)?))
}

/// Whether the kernel takes `x` against every weight of `ws`: f32 matrices on a CPU with
/// AVX-512F, at most [`MAX_ROWS`] rows, one inner dimension.
fn fits(x: &Tensor, ws: &[&Tensor]) -> Result<bool> {
    let f32_2d = |t: &Tensor| t.dtype() == candle_core::DType::F32 && t.rank() == 2;
    Ok(available(x)
        && has_avx512()
        && f32_2d(x)
        && x.dim(0)? <= MAX_ROWS
        && ws
            .iter()
            .all(|w| f32_2d(w) && w.dim(1).ok() == x.dim(1).ok()))
}

/// [`rows_t`] for several weights of one input (`x` transposed once, one parallel pass):
/// `None` where any of them would not take it, or where `x` is part of a gradient graph.
pub fn rows_t_many(x: &Tensor, ws: &[&Tensor]) -> Result<Option<Vec<Tensor>>> {
    if x.track_op() || ws.iter().any(|w| w.track_op() || w.is_variable()) || !fits(x, ws)? {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let x = x.contiguous()?;
    let ws: Vec<Tensor> = ws.iter().map(|w| w.contiguous()).collect::<Result<_>>()?;
    let (xs, _) = x.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(xd)) = &*xs else {
        return Ok(None);
    };
    let xd = contiguous(xd, x.layout())?;
    let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ws.len());
    for ((g, _), w) in guards.iter().zip(&ws) {
        let candle_core::Storage::Cpu(CpuStorage::F32(d)) = &**g else {
            return Ok(None);
        };
        slices.push(contiguous(d, w.layout())?);
    }
    let outs = rows_t_many_f32(xd, &slices, m, k);
    let dev = x.device();
    outs.into_iter()
        .zip(&ws)
        .map(|(o, w)| Tensor::from_vec(o, (m, w.dim(0)?), dev))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The depth blocks: `k` split into the fewest blocks of at most [`KC`], as equal as the gemm
/// crate makes them (`ceil(k / ceil(k / KC))` each, the last one shorter).
fn block_len(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC)).max(1)
}

/// A destination written by several threads at disjoint columns.
struct Out(*mut f32);
// SAFETY: every task writes only the columns of its own tiles.
unsafe impl Sync for Out {}

fn rows_t_f32(x: &[f32], w: &[f32], m: usize, k: usize) -> Vec<f32> {
    rows_t_many_f32(x, &[w], m, k).pop().expect("one weight")
}

/// `x W_i^T` for several weights `W_i [n_i, k]` of one input: `x` is transposed once, and the
/// tiles of all the weights share one parallel pass (the query, key and value projections of a
/// layer; its gate and up projections).
fn rows_t_many_f32(x: &[f32], ws: &[&[f32]], m: usize, k: usize) -> Vec<Vec<f32>> {
    let ns: Vec<usize> = ws.iter().map(|w| w.len() / k.max(1)).collect();
    if m == 0 || k == 0 || ns.iter().all(|&n| n == 0) {
        return ns.iter().map(|&n| vec![0.0f32; m * n]).collect();
    }
    // Every element is written exactly once below (each (row, column) by the tile that owns
    // the column): zeroing it first was a pass of its own over up to megabytes per call.
    let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| Vec::with_capacity(m * n)).collect();
    // x^T in panels of MR rows: panel p holds k groups of MR lanes (rows past m are zero).
    let panels = m.div_ceil(MR);
    let mut xt = vec![0.0f32; panels * k * MR];
    // Sixteen depth steps at a time: sixteen contiguous values of each row of x go down a 4 KiB
    // block of the panel (writing each row down a whole panel column touched a new cache line
    // per element); blocks on every core.
    let blocks: Vec<(usize, usize, &mut [f32])> = xt
        .chunks_mut(k * MR)
        .enumerate()
        .flat_map(|(p, panel)| {
            panel
                .chunks_mut(16 * MR)
                .enumerate()
                .map(move |(b, block)| (p, b * 16, block))
        })
        .collect();
    blocks
        .into_par_iter()
        .with_min_len(8)
        .for_each(|(p, k0, block)| {
            let (rows, steps) = (MR.min(m - p * MR), 16.min(k - k0));
            for lane in 0..rows {
                let src = &x[(p * MR + lane) * k + k0..][..steps];
                for (i, &v) in src.iter().enumerate() {
                    block[i * MR + lane] = v;
                }
            }
        });
    // (weight, first column) of every tile, weight after weight.
    let tiles: Vec<(usize, usize)> = ns
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| (0..n.div_ceil(NR)).map(move |t| (i, t * NR)))
        .collect();
    let dsts: Vec<Out> = outs
        .iter_mut()
        .map(|o| Out(o.spare_capacity_mut().as_mut_ptr().cast::<f32>()))
        .collect();
    let kc = block_len(k);
    // Contiguous runs of tiles, a few per thread so that an early finisher can steal.
    let groups = (rayon::current_num_threads() * 2).clamp(1, tiles.len());
    (0..groups).into_par_iter().for_each(|g| {
        let dsts = &dsts;
        let run = &tiles[tiles.len() * g / groups..tiles.len() * (g + 1) / groups];
        let mut chain = vec![0.0f32; run.len() * NR * MR];
        let mut sums = vec![0.0f32; run.len() * NR * MR];
        for p in 0..panels {
            let rows = MR.min(m - p * MR);
            let panel = &xt[p * k * MR..(p + 1) * k * MR];
            let mut k0 = 0;
            while k0 < k {
                let kb = kc.min(k - k0);
                // The depth in L1-sized steps (KSUB x MR lanes of x^T), every tile of the run
                // over one step before the next: the FMA chains continue through memory
                // (stored and reloaded unrounded), so the sums are those of one pass.
                let mut ks = k0;
                while ks < k0 + kb {
                    let len = KSUB.min(k0 + kb - ks);
                    let (start, end) = (ks == k0, ks + len == k0 + kb);
                    for (&(i, c0), (c, s)) in run.iter().zip(
                        chain
                            .chunks_exact_mut(NR * MR)
                            .zip(sums.chunks_exact_mut(NR * MR)),
                    ) {
                        let cols = NR.min(ns[i] - c0);
                        let rows_w: [usize; NR] =
                            std::array::from_fn(|j| (c0 + j.min(cols - 1)) * k + ks);
                        // SAFETY: the CPU has AVX-512F (checked by the callers); the kernel
                        // reads `len` lane groups of the panel from `ks` and `len` values of
                        // each weight row from `ks`, all inside the slices.
                        unsafe {
                            tile_f32(
                                panel[ks * MR..].as_ptr(),
                                ws[i].as_ptr(),
                                len,
                                rows_w,
                                start,
                                end.then_some(k0 == 0),
                                c,
                                s,
                            )
                        };
                    }
                    ks += len;
                }
                k0 += kb;
            }
            for (&(i, c0), s) in run.iter().zip(sums.chunks_exact(NR * MR)) {
                let (n, cols) = (ns[i], NR.min(ns[i] - c0));
                for lane in 0..rows {
                    for j in 0..cols {
                        // SAFETY: row p * MR + lane < m and column c0 + j < n of weight i; no
                        // other task writes that column.
                        unsafe { *dsts[i].0.add((p * MR + lane) * n + c0 + j) = s[j * MR + lane] };
                    }
                }
            }
        }
    });
    for (o, &n) in outs.iter_mut().zip(&ns) {
        // SAFETY: the tiles wrote all m * n elements of each output (rows < m of every panel,
        // columns < n of every tile of its weight).
        unsafe { o.set_len(m * n) };
    }
    outs
}

/// Depth per step of the tile loop: `KSUB * MR` floats of x^T (32 KiB) stay in L1 while every
/// tile of a run passes over them.
const KSUB: usize = 128;

/// `len` steps of one `MR x NR` tile's FMA chains: lane `l` of column `j` runs
/// `acc = fma(xt[kk * MR + l], w[rows[j] + kk], acc)` for `kk` in `0..len`, from zero when
/// `start`, else from `chain`. At the end of a depth block (`end = Some(first)`) the block's sums
/// go to `sums` (the first block) or are added to them; otherwise they wait in `chain`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32(
    xt: *const f32,
    w: *const f32,
    len: usize,
    rows: [usize; NR],
    start: bool,
    end: Option<bool>,
    chain: &mut [f32],
    sums: &mut [f32],
) {
    use std::arch::x86_64::*;
    let rows: [*const f32; NR] = std::array::from_fn(|j| w.add(rows[j]));
    let (cp, sp) = (chain.as_mut_ptr(), sums.as_mut_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; NR];
    if !start {
        for (j, aj) in acc.iter_mut().enumerate() {
            for (i, a) in aj.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(cp.add(j * MR + 16 * i));
            }
        }
    }
    for kk in 0..len {
        let base = xt.add(kk * MR);
        let a = [
            _mm512_loadu_ps(base),
            _mm512_loadu_ps(base.add(16)),
            _mm512_loadu_ps(base.add(32)),
            _mm512_loadu_ps(base.add(48)),
        ];
        for (j, row) in rows.iter().enumerate() {
            let b = _mm512_set1_ps(*row.add(kk));
            for (i, &ai) in a.iter().enumerate() {
                acc[j][i] = _mm512_fmadd_ps(ai, b, acc[j][i]);
            }
        }
    }
    for (j, aj) in acc.iter().enumerate() {
        for (i, &a) in aj.iter().enumerate() {
            let o = j * MR + 16 * i;
            match end {
                None => _mm512_storeu_ps(cp.add(o), a),
                Some(true) => _mm512_storeu_ps(sp.add(o), a),
                Some(false) => {
                    _mm512_storeu_ps(sp.add(o), _mm512_add_ps(_mm512_loadu_ps(sp.add(o)), a))
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32(
    _xt: *const f32,
    _w: *const f32,
    _len: usize,
    _rows: [usize; NR],
    _start: bool,
    _end: Option<bool>,
    _chain: &mut [f32],
    _sums: &mut [f32],
) {
    unreachable!("rows_t applies only where AVX-512F is detected")
}

struct RowsT;

impl CustomOp2 for RowsT {
    fn name(&self) -> &'static str {
        "rows-matmul-t"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("rows matmul: inner dimensions {k} and {k2} differ");
        }
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("rows matmul: f32 only");
        };
        let out = rows_t_f32(contiguous(x, l1)?, contiguous(w, l2)?, m, k);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        super::fused::matmul_t_bwd(x, w, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn same_bits_as_candles_gemm() {
        // What Linear computed before for 17..=256 rows: `w x^T` by GEMM, transposed. Depths of
        // one block, of three (1376 = 459 + 459 + 458), and an odd one; row counts below, at and
        // past one panel; column counts that leave a partial tile.
        if !has_avx512() {
            panic!("this CPU has no AVX-512F: the kernel under test cannot run here");
        }
        let mut rng = crate::generate::Rng::new(11, 0);
        let mut rand = |shape: (usize, usize)| {
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        for (m, k, n) in [
            (64, 512, 512),
            (17, 512, 1376),
            (64, 1376, 512),
            (130, 75, 37),
            (256, 1100, 70),
            (336, 512, 1376),
        ] {
            let x = rand((m, k));
            let w = rand((n, k));
            let want = w.matmul(&x.t().unwrap()).unwrap().t().unwrap();
            // and what it computed above 256 rows: `x w^T` (the gemm crate transposes the
            // problem, not the arithmetic of an element).
            let other = x.matmul(&w.t().unwrap()).unwrap();
            let got = rows_t(&x, &w).unwrap().expect("applies");
            let bits = |t: &Tensor| -> Vec<u32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect()
            };
            assert_eq!(bits(&got), bits(&want), "{m}x{k}x{n}");
            assert_eq!(bits(&got), bits(&other), "{m}x{k}x{n}");
            // Several weights in one pass: each output the same bits as its own call.
            let w2 = rand((n + 5, k));
            let many = rows_t_many(&x, &[&w, &w2]).unwrap().expect("applies");
            assert_eq!(bits(&many[0]), bits(&want), "{m}x{k}x{n}, first of two");
            let want2 = rows_t(&x, &w2).unwrap().expect("applies");
            assert_eq!(bits(&many[1]), bits(&want2), "{m}x{k}x{n}, second of two");
        }
        if std::env::var("ROWS_BENCH").is_ok() {
            for (m, k, n) in [
                (64, 512, 1376),
                (64, 512, 8192),
                (64, 1376, 512),
                (336, 512, 1376),
                (1024, 512, 512),
            ] {
                let (x, w) = (rand((m, k)), rand((n, k)));
                let time = |f: &dyn Fn() -> Tensor| {
                    f();
                    (0..5)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            for _ in 0..40 {
                                f();
                            }
                            t.elapsed().as_secs_f64() / 40.0 * 1e3
                        })
                        .fold(f64::MAX, f64::min)
                };
                let a = time(&|| rows_t(&x, &w).unwrap().unwrap());
                let b = time(&|| {
                    w.matmul(&x.t().unwrap())
                        .unwrap()
                        .t()
                        .unwrap()
                        .contiguous()
                        .unwrap()
                });
                eprintln!("{m}x{k}x{n}: rows {a:.3} ms, candle {b:.3} ms");
            }
        }
        assert!(rows_t(&rand((MAX_ROWS + 1, 4)), &rand((3, 4)))
            .unwrap()
            .is_none());
    }
}
