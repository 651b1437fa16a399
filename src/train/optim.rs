//! AdamW with state we own (candle's keeps its moments private, so it cannot resume exactly), global
//! gradient-norm clipping, and the cosine schedule with linear warmup.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::fused::{contiguous, contiguous_mut};
use crate::model::{CandleContext, ModelError};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // transformers' TrainingArguments defaults.
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> AdamW {
        AdamW {
            config,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One update, torch.optim.AdamW's arithmetic: decoupled decay, bias-corrected moments.
    pub fn update(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> Result<(), ModelError> {
        self.step += 1;
        let bc1 = 1.0 - self.config.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.config.beta2.powi(self.step as i32);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let p = var.as_tensor();
            let fused = p.device().is_cpu()
                && matches!(p.dtype(), DType::F32 | DType::F64)
                && g.dtype() == p.dtype()
                && p.is_contiguous();
            let res = if fused {
                self.update_in_place(name, p, g, lr, bc1, bc2)
            } else {
                self.update_composed(name, var, g, lr, bc1, bc2)
            };
            res.ctx(|| format!("AdamW update of `{name}`"))?;
        }
        Ok(())
    }

    /// CPU: three passes that write the moments and the weights where they are, no temporaries
    /// (the composed form below allocates a dozen parameter-sized tensors per weight).
    fn update_in_place(
        &mut self,
        name: &str,
        p: &Tensor,
        g: &Tensor,
        lr: f64,
        bc1: f64,
        bc2: f64,
    ) -> candle_core::Result<()> {
        let c = &self.config;
        let g = g.contiguous()?;
        let m = match self.m.get(name) {
            Some(m) => m.clone(),
            None => p.zeros_like()?,
        };
        let v = match self.v.get(name) {
            Some(v) => v.clone(),
            None => p.zeros_like()?,
        };
        m.inplace_op2(
            &g,
            &Moment {
                beta: c.beta1,
                square: false,
            },
        )?;
        v.inplace_op2(
            &g,
            &Moment {
                beta: c.beta2,
                square: true,
            },
        )?;
        p.inplace_op3(
            &m,
            &v,
            &Step {
                decay: 1.0 - lr * c.weight_decay,
                lr,
                bc1,
                bc2,
                eps: c.eps,
            },
        )?;
        self.m.insert(name.to_string(), m);
        self.v.insert(name.to_string(), v);
        Ok(())
    }

    fn update_composed(
        &mut self,
        name: &str,
        var: &Var,
        g: &Tensor,
        lr: f64,
        bc1: f64,
        bc2: f64,
    ) -> candle_core::Result<()> {
        let c = &self.config;
        let m = match self.m.get(name) {
            Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
            None => (g * (1.0 - c.beta1))?,
        };
        let v = match self.v.get(name) {
            Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
            None => (g.sqr()? * (1.0 - c.beta2))?,
        };
        let mut p = var.as_tensor().clone();
        if c.weight_decay != 0.0 {
            p = (&p * (1.0 - lr * c.weight_decay))?;
        }
        let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
        let upd = ((&m / bc1)? / denom)?;
        var.set(&(p - (upd * lr)?)?)?;
        self.m.insert(name.to_string(), m);
        self.v.insert(name.to_string(), v);
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (k, x) in &self.m {
            t.insert(format!("m.{k}"), x.clone());
        }
        for (k, x) in &self.v {
            t.insert(format!("v.{k}"), x.clone());
        }
        let step = Tensor::new(&[self.step as i64], &Device::Cpu).ctx(|| "step".into())?;
        t.insert("__step__".into(), step);
        candle_core::safetensors::save(&t, path).ctx(|| format!("writing {}", path.display()))
    }

    pub fn load(config: AdamWConfig, path: &Path, device: &Device) -> Result<AdamW, ModelError> {
        let t = candle_core::safetensors::load(path, device)
            .ctx(|| format!("reading optimizer state {}", path.display()))?;
        let mut o = AdamW::new(config);
        for (k, x) in t {
            if k == "__step__" {
                o.step = x
                    .to_dtype(DType::I64)
                    .and_then(|x| x.to_vec1::<i64>())
                    .ctx(|| "step".into())?[0] as u64;
            } else if let Some(n) = k.strip_prefix("m.") {
                o.m.insert(n.to_string(), x);
            } else if let Some(n) = k.strip_prefix("v.") {
                o.v.insert(n.to_string(), x);
            }
        }
        Ok(o)
    }
}

/// `m = beta m + (1 - beta) g` (or `g^2`), in place.
struct Moment {
    beta: f64,
    square: bool,
}

/// `p = p decay - lr (m / bc1) / (sqrt(v / bc2) + eps)`, in place.
struct Step {
    decay: f64,
    lr: f64,
    bc1: f64,
    bc2: f64,
    eps: f64,
}

macro_rules! moment {
    ($t:ty, $m:expr, $g:expr, $beta:expr, $square:expr) => {{
        let (b, k) = ($beta as $t, (1.0 - $beta) as $t);
        $m.par_chunks_mut(1 << 15)
            .zip($g.par_chunks(1 << 15))
            .for_each(|(mc, gc)| {
                for (mi, &gi) in mc.iter_mut().zip(gc) {
                    let x = if $square { gi * gi } else { gi };
                    *mi = *mi * b + x * k;
                }
            });
    }};
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        match (dst, g) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => {
                moment!(
                    f32,
                    contiguous_mut(m, dst_l)?,
                    contiguous(g, gl)?,
                    self.beta,
                    self.square
                )
            }
            (CpuStorage::F64(m), CpuStorage::F64(g)) => {
                moment!(
                    f64,
                    contiguous_mut(m, dst_l)?,
                    contiguous(g, gl)?,
                    self.beta,
                    self.square
                )
            }
            _ => candle_core::bail!("in-place AdamW: unsupported dtypes"),
        }
        Ok(())
    }
}

macro_rules! step {
    ($t:ty, $p:expr, $m:expr, $v:expr, $s:expr) => {{
        let (decay, lr, ibc1, ibc2, eps) = (
            $s.decay as $t,
            $s.lr as $t,
            (1.0 / $s.bc1) as $t,
            (1.0 / $s.bc2) as $t,
            $s.eps as $t,
        );
        $p.par_chunks_mut(1 << 15)
            .zip($m.par_chunks(1 << 15).zip($v.par_chunks(1 << 15)))
            .for_each(|(pc, (mc, vc))| {
                for ((pi, &mi), &vi) in pc.iter_mut().zip(mc).zip(vc) {
                    *pi = *pi * decay - lr * (mi * ibc1) / ((vi * ibc2).sqrt() + eps);
                }
            });
    }};
}

impl InplaceOp3 for Step {
    fn name(&self) -> &'static str {
        "adamw-step"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        match (dst, m, v) {
            (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                step!(
                    f32,
                    contiguous_mut(p, dst_l)?,
                    contiguous(m, ml)?,
                    contiguous(v, vl)?,
                    self
                )
            }
            (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                step!(
                    f64,
                    contiguous_mut(p, dst_l)?,
                    contiguous(m, ml)?,
                    contiguous(v, vl)?,
                    self
                )
            }
            _ => candle_core::bail!("in-place AdamW: unsupported dtypes"),
        }
        Ok(())
    }
}

/// Add `b` into `a` (gradient accumulation over micro-batches).
pub fn accumulate(
    a: &mut BTreeMap<String, Tensor>,
    b: BTreeMap<String, Tensor>,
) -> Result<(), ModelError> {
    for (k, g) in b {
        let sum = match a.remove(&k) {
            Some(x) => (x + g).ctx(|| format!("accumulating `{k}`"))?,
            None => g,
        };
        a.insert(k, sum);
    }
    Ok(())
}

/// Scale gradients so their global L2 norm is at most `max_norm` (torch's clip_grad_norm_);
/// returns the norm before clipping.
pub fn clip_grad_norm(
    grads: &mut BTreeMap<String, Tensor>,
    max_norm: f64,
) -> Result<f64, ModelError> {
    let mut total = 0.0f64;
    for (k, g) in grads.iter() {
        total += g
            .to_dtype(DType::F64)
            .and_then(|g| g.sqr()?.sum_all()?.to_scalar::<f64>())
            .ctx(|| format!("norm of `{k}`"))?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for (k, g) in grads.iter_mut() {
                *g = (&*g * coef).ctx(|| format!("clipping `{k}`"))?;
            }
        }
    }
    Ok(norm)
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup over
/// `ceil(warmup_ratio * total)` steps, then cosine decay to 0 (transformers'
/// `get_cosine_schedule_with_warmup`).
pub fn cosine_lr(base: f64, step: usize, total: usize, warmup_ratio: f64) -> f64 {
    let warmup = (warmup_ratio * total as f64).ceil() as usize;
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_transformers_values() {
        // Values of transformers' get_cosine_schedule_with_warmup lambda (num_cycles 0.5, warmup
        // ceil(ratio * total) as TRL computes it), printed by CPython for these settings; not
        // re-derived from our formula.
        let expected: [(usize, f64, &[f64]); 2] = [
            (
                10,
                0.1,
                &[
                    0.0,
                    1.0,
                    0.9698463103929542,
                    0.883022221559489,
                    0.75,
                    0.5868240888334653,
                    0.41317591116653485,
                    0.2500000000000001,
                    0.11697777844051105,
                    0.03015368960704584,
                ],
            ),
            (
                7,
                0.3,
                &[
                    0.0,
                    0.3333333333333333,
                    0.6666666666666666,
                    1.0,
                    0.8535533905932737,
                    0.5,
                    0.14644660940672627,
                ],
            ),
        ];
        for (total, ratio, values) in expected {
            for (step, want) in values.iter().enumerate() {
                let got = cosine_lr(2.0, step, total, ratio);
                assert!(
                    (got - 2.0 * want).abs() < 1e-12,
                    "total {total} ratio {ratio} step {step}: {got} vs {}",
                    2.0 * want
                );
            }
        }
    }

    #[test]
    fn adamw_matches_hand_computation_and_round_trips() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &dev).unwrap()).unwrap();
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(cfg.clone());
        let g = BTreeMap::from([("w".to_string(), Tensor::new(&[0.5f64, -1.0], &dev).unwrap())]);
        opt.update(&vars, &g, 0.01).unwrap();
        // Step 1: m_hat = g, v_hat = g^2 -> update = g/|g| = sign(g); decay 1 - 0.001.
        let w: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        assert!((w[0] - (1.0 * 0.999 - 0.01 * 0.5 / (0.5 + 1e-8))).abs() < 1e-12);
        assert!((w[1] - (-2.0 * 0.999 + 0.01 * 1.0 / (1.0 + 1e-8))).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        opt.save(&dir.path().join("o.safetensors")).unwrap();
        let mut o2 = AdamW::load(cfg, &dir.path().join("o.safetensors"), &dev).unwrap();
        assert_eq!(o2.step, 1);
        // A separate copy of the weights (Var::from_tensor on a Var would share its storage).
        let v2 = Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap();
        let vars2 = BTreeMap::from([("w".to_string(), v2.clone())]);
        opt.update(&vars, &g, 0.01).unwrap();
        o2.update(&vars2, &g, 0.01).unwrap();
        let a: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        let b: Vec<f64> = v2.as_tensor().to_vec1().unwrap();
        assert_eq!(a, b, "a restored optimizer continues bit-identically");
    }

    #[test]
    fn in_place_update_equals_the_composed_one() {
        let dev = Device::Cpu;
        let mut rng = crate::generate::Rng::new(3, 0);
        let mut r = |n: usize| -> Tensor {
            let v: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect();
            Tensor::from_vec(v, n, &dev).unwrap()
        };
        let w0 = r(1000);
        let (a, b) = (
            Var::from_tensor(&w0.copy().unwrap()).unwrap(),
            Var::from_tensor(&w0.copy().unwrap()).unwrap(),
        );
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let (mut oa, mut ob) = (AdamW::new(cfg.clone()), AdamW::new(cfg));
        for step in 1..=3 {
            let g = r(1000);
            let bc1 = 1.0 - 0.9f64.powi(step);
            let bc2 = 1.0 - 0.999f64.powi(step);
            oa.update_in_place("w", a.as_tensor(), &g, 1e-3, bc1, bc2)
                .unwrap();
            ob.update_composed("w", &b, &g, 1e-3, bc1, bc2).unwrap();
        }
        use crate::model::max_abs_diff;
        assert!(max_abs_diff(a.as_tensor(), b.as_tensor()) < 1e-6);
        assert!(max_abs_diff(a.as_tensor(), &w0) > 1e-3);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let mut g = BTreeMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32], &dev).unwrap()),
            ("b".to_string(), Tensor::new(&[4.0f32], &dev).unwrap()),
        ]);
        assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-6);
        let a = g["a"].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5);
    }
}
