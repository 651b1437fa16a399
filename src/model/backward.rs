//! The decoder's hand-written backward pass for training. candle's generic backprop allocates a
//! zero tensor and an add for every node's gradient and keeps the whole op graph alive; here the
//! forward records only the activations the gradient formulas need (a [`Tape`]) and the backward
//! computes each weight's gradient directly, layer by layer. The formulas are checked against
//! candle's autograd (itself checked against finite differences) for all four families in
//! `model::tests`.

use std::collections::BTreeMap;

use candle_core::{Tensor, D};

use super::config::{Activation, Family};
use super::decoder::{acc, rms_denom, Decoder, Linear, GELU_C, GELU_K};
use super::{fused, CandleContext, ModelError};

type Res<T> = Result<T, ModelError>;

/// What one layer's backward needs from its forward.
pub(crate) struct LayerTape {
    /// Layer input (the attention residual).
    pub(crate) h_in: Tensor,
    /// Normalised input of the q/k/v projections.
    pub(crate) x: Tensor,
    /// Rotated queries `[b, nh, t, hd]`, rotated keys and values `[b, nkv, t, hd]`.
    pub(crate) q: Tensor,
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    /// Attention probabilities `[b, nh, t, t]` (reduction dtype), and `tanh(s / cap)` when capped.
    pub(crate) probs: Tensor,
    pub(crate) cap_tanh: Option<Tensor>,
    /// Attention output before the o-projection, `[b, t, nh * hd]`.
    pub(crate) a: Tensor,
    /// Gemma: the o-projection output (input of the post-attention norm).
    pub(crate) post_attn: Option<Tensor>,
    /// Residual after attention and the normalised MLP input.
    pub(crate) h_mid: Tensor,
    pub(crate) x2: Tensor,
    /// Gate pre-activation, up projection, `act(gate) * up`.
    pub(crate) g: Tensor,
    pub(crate) u: Tensor,
    pub(crate) m: Tensor,
    /// Gemma: the down-projection output (input of the post-feed-forward norm).
    pub(crate) post_ff: Option<Tensor>,
}

/// One chunk of language-model-head rows: its logits after capping (reduction dtype) and the cap's
/// tanh, kept when small enough, recomputed otherwise.
pub(crate) struct HeadChunk {
    start: usize,
    len: usize,
    logits: Option<Tensor>,
    cap_tanh: Option<Tensor>,
}

/// Activations recorded by a training forward.
#[derive(Default)]
pub struct Tape {
    pub(crate) ids: Option<Tensor>,
    pub(crate) rope: Option<(Tensor, Tensor)>,
    pub(crate) layers: Vec<LayerTape>,
    /// Input of the final norm.
    pub(crate) final_norm: Option<Tensor>,
    head_rows: Option<Tensor>,
    targets: Option<Tensor>,
    chunks: Vec<HeadChunk>,
    shape: (usize, usize),
}

/// Log-probs from a training forward, with what their backward needs.
pub struct Traced {
    /// `[b, t-1]` per-token log-probs (f32; f64 for f64 models), not attached to any graph.
    pub logps: Tensor,
    tape: Tape,
    model: Decoder,
}

/// Saved head logits beyond this many values are recomputed in the backward instead (a real
/// vocabulary times a long batch would hold gigabytes).
const KEEP_HEAD_VALUES: usize = 64 << 20;

impl Decoder {
    /// A copy whose weights are cut from any autograd graph (they share storage).
    fn detached(&self) -> Res<Decoder> {
        let w = self
            .weights()
            .into_iter()
            .map(|(k, v)| (k, v.detach()))
            .collect();
        Decoder::new(self.config.clone(), w)
    }

    /// Per-token log-probs `[b, t-1]` as [`Decoder::token_logprobs`], recorded for
    /// [`Traced::backward`] instead of candle's autograd.
    pub fn traced_logprobs(&self, ids: &[Vec<u32>], attn: &[Vec<u8>]) -> Res<Traced> {
        let model = self.detached()?;
        let mut tape = Tape::default();
        let logps = model.logprobs_recorded(ids, attn, Some(&mut tape))?;
        Ok(Traced { logps, tape, model })
    }

    /// The head part of [`Decoder::token_logprobs`]: chunked logits and log-softmax at the targets.
    pub(crate) fn logprobs_recorded(
        &self,
        ids: &[Vec<u32>],
        attn: &[Vec<u8>],
        mut tape: Option<&mut Tape>,
    ) -> Res<Tensor> {
        let (b, t) = (ids.len(), ids.first().map_or(0, Vec::len));
        if t < 2 {
            return Err(ModelError::Invalid(
                "log-probs need at least two tokens".into(),
            ));
        }
        let h = self.hidden_recorded(ids, attn, None, tape.as_deref_mut())?;
        let mut go = || -> candle_core::Result<Tensor> {
            // Rows of logits in chunks of at most 4M values: the full [b*t, vocab] matrix (and its
            // gradient) would be hundreds of MiB of short-lived memory for a large vocabulary.
            let rows = b * (t - 1);
            let vocab = self.config.vocab_size;
            let h = h
                .narrow(1, 0, t - 1)?
                .contiguous()?
                .reshape((rows, self.config.hidden_size))?;
            let targets: Vec<u32> = ids.iter().flat_map(|r| r[1..].iter().copied()).collect();
            let targets = Tensor::from_vec(targets, rows, self.device())?;
            let chunk = ((4usize << 20) / vocab).max(1);
            let keep = rows * vocab <= KEEP_HEAD_VALUES;
            let mut parts = Vec::new();
            let mut start = 0;
            while start < rows {
                let n = chunk.min(rows - start);
                let (logits, cap_tanh) = self.head_parts(&h.narrow(0, start, n)?)?;
                let logits = logits.to_dtype(acc(self.dtype()))?;
                parts.push(fused::log_softmax_gather(
                    &logits,
                    &targets.narrow(0, start, n)?,
                )?);
                if let Some(tp) = tape.as_deref_mut() {
                    tp.chunks.push(HeadChunk {
                        start,
                        len: n,
                        logits: keep.then_some(logits),
                        cap_tanh: if keep { cap_tanh } else { None },
                    });
                }
                start += n;
            }
            if let Some(tp) = tape.as_deref_mut() {
                tp.head_rows = Some(h);
                tp.targets = Some(targets);
                tp.shape = (b, t);
            }
            Tensor::cat(&parts, 0)?.reshape((b, t - 1))
        };
        go().ctx(|| "log-probs".into())
    }

    /// Logits (after the final soft-cap, if any) and the cap's `tanh`.
    pub(crate) fn head_parts(&self, h: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let logits = Linear {
            w: self.lm_head.clone(),
            b: None,
        }
        .forward(h)?;
        match self.config.final_logit_softcapping {
            Some(cap) => {
                let th = (logits / cap)?.tanh()?;
                Ok(((&th * cap)?, Some(th)))
            }
            None => Ok((logits, None)),
        }
    }
}

/// Gradients of a linear layer: `(dx, dW, db)` for `y = x W^T + b`.
fn linear_bwd(
    lin: &Linear,
    x: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let (out, inner) = lin.w.dims2()?;
    let rows = dy.elem_count() / out;
    let x2 = x.reshape((rows, inner))?;
    let dy2 = dy.reshape((rows, out))?;
    let dw = dy2.t()?.matmul(&x2)?;
    let dx = dy2.matmul(&lin.w)?.reshape(x.shape())?;
    let db = match &lin.b {
        Some(_) => Some(dy2.sum(0)?),
        None => None,
    };
    Ok((dx, dw, db))
}

/// Gradients of [`super::decoder::rms_norm`]: `(dx, dw)`.
fn norm_bwd(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    one_plus: bool,
) -> candle_core::Result<(Tensor, Tensor)> {
    if let Some(r) = fused::rms_norm_backward(x, w, dy, eps, one_plus)? {
        return Ok(r);
    }
    let dt = x.dtype();
    let ac = acc(dt);
    let n = x.dim(D::Minus1)?;
    let rows = x.elem_count() / n;
    let xf = x.to_dtype(ac)?;
    // Recomputed rather than recorded: one reduction per row, the same ops as the forward.
    let denom = &rms_denom(&xf, eps)?;
    let normed = xf.broadcast_div(denom)?;
    let (dnormed, dw) = if one_plus {
        let dyf = dy.to_dtype(ac)?;
        let dw = (&dyf * &normed)?.reshape((rows, n))?.sum(0)?.to_dtype(dt)?;
        (dyf.broadcast_mul(&(w.to_dtype(ac)? + 1.0)?)?, dw)
    } else {
        let dw = (dy * normed.to_dtype(dt)?)?.reshape((rows, n))?.sum(0)?;
        (dy.broadcast_mul(w)?.to_dtype(ac)?, dw)
    };
    // d/dx of x / s with s = sqrt(mean(x^2) + eps): dn / s - x * sum(dn * x) / (n s^3)
    let k = (dnormed.mul(&xf)?.sum_keepdim(D::Minus1)? / (denom.powf(3.0)? * n as f64)?)?;
    let dx = (dnormed.broadcast_div(denom)? - xf.broadcast_mul(&k)?)?;
    Ok((dx.to_dtype(dt)?, dw))
}

/// Gradients of `act(g) * u` with respect to `g` and `u`.
fn mlp_act_bwd(
    act: Activation,
    g: &Tensor,
    u: &Tensor,
    dm: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    if let Some(r) = fused::swiglu_backward(act, g, u, dm)? {
        return Ok(r);
    }
    let (a, da) = match act {
        Activation::Silu => {
            let s = (g.neg()?.exp()? + 1.0)?.recip()?;
            let a = (g * &s)?;
            // silu' = s (1 + g (1 - s))
            let da = (&s * ((g * s.affine(-1.0, 1.0)?)? + 1.0)?)?;
            (a, da)
        }
        Activation::GeluTanh => {
            let g2 = g.sqr()?;
            let th = ((g + (g * &g2)? * GELU_K)? * GELU_C)?.tanh()?;
            let a = ((g * 0.5)? * (&th + 1.0)?)?;
            let inner = (((&g2 * (3.0 * GELU_K))? + 1.0)? * GELU_C)?;
            let sech2 = th.sqr()?.affine(-1.0, 1.0)?;
            let da = (((&th + 1.0)? * 0.5)? + ((g * 0.5)? * sech2 * inner)?)?;
            (a, da)
        }
    };
    let du = (dm * a)?;
    let dg = ((dm * u)? * da)?;
    Ok((dg, du))
}

/// Inverse of `apply_rope` for gradients: `dy * cos + R^T (dy * sin)` with `R^T [z1, z2] = [z2, -z1]`.
fn rope_bwd(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = dy.dim(D::Minus1)?;
    let z = dy.broadcast_mul(sin)?;
    let z1 = z.narrow(D::Minus1, 0, d / 2)?;
    let z2 = z.narrow(D::Minus1, d / 2, d / 2)?;
    dy.broadcast_mul(cos)? + Tensor::cat(&[&z2, &z1.neg()?], D::Minus1)?
}

/// Weight gradients, accumulated by Hugging Face name.
struct Grads(BTreeMap<String, Tensor>);

impl Grads {
    fn add(&mut self, name: String, g: Tensor) -> candle_core::Result<()> {
        let g = match self.0.remove(&name) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        self.0.insert(name, g);
        Ok(())
    }
    fn linear(&mut self, prefix: &str, dw: Tensor, db: Option<Tensor>) -> candle_core::Result<()> {
        self.add(format!("{prefix}.weight"), dw)?;
        if let Some(db) = db {
            self.add(format!("{prefix}.bias"), db)?;
        }
        Ok(())
    }
}

/// Final hidden states from a training forward, with what their backward needs (reward heads).
pub struct TracedHidden {
    /// `[b, t, hidden]`, not attached to any graph.
    pub hidden: Tensor,
    tape: Tape,
    model: Decoder,
}

impl Decoder {
    /// Final hidden states `[b, t, hidden]` as [`Decoder::hidden`], recorded for
    /// [`TracedHidden::backward`].
    pub fn traced_hidden(&self, ids: &[Vec<u32>], attn: &[Vec<u8>]) -> Res<TracedHidden> {
        let model = self.detached()?;
        let mut tape = Tape::default();
        let hidden = model.hidden_recorded(ids, attn, None, Some(&mut tape))?;
        tape.shape = (ids.len(), ids.first().map_or(0, Vec::len));
        Ok(TracedHidden {
            hidden,
            tape,
            model,
        })
    }
}

impl TracedHidden {
    /// Gradients of `sum(dhidden * hidden)` for every backbone weight, by Hugging Face name.
    pub fn backward(self, dhidden: &Tensor) -> Res<BTreeMap<String, Tensor>> {
        let TracedHidden { tape, model, .. } = self;
        let mut grads = Grads(BTreeMap::new());
        body_backward(&model, &tape, dhidden, &mut grads).ctx(|| "backward".into())?;
        Ok(grads.0)
    }
}

impl Traced {
    /// Gradients of `sum(dlogps * logps)` for every weight, by Hugging Face name, in the model's
    /// dtype (tied embeddings: one entry with both contributions).
    pub fn backward(self, dlogps: &Tensor) -> Res<BTreeMap<String, Tensor>> {
        let Traced { tape, model, .. } = self;
        backward(&model, tape, dlogps).ctx(|| "backward".into())
    }
}

fn backward(
    m: &Decoder,
    tape: Tape,
    dlogps: &Tensor,
) -> candle_core::Result<BTreeMap<String, Tensor>> {
    let cfg = &m.config;
    let dt = m.dtype();
    let ac = acc(dt);
    let (b, t) = tape.shape;
    let hidden = cfg.hidden_size;
    let mut grads = Grads(BTreeMap::new());
    let missing = || candle_core::Error::Msg("backward without a recorded forward".into());
    let rows_h = tape.head_rows.as_ref().ok_or_else(missing)?;
    let targets = tape.targets.as_ref().ok_or_else(missing)?;
    let dlp = dlogps.to_dtype(ac)?.flatten_all()?;

    // Head: per chunk, d logits = g (onehot - softmax), through the soft-cap, into W and h.
    let mut dlm: Option<Tensor> = None;
    let mut dh_rows = Vec::with_capacity(tape.chunks.len());
    for c in &tape.chunks {
        let hc = rows_h.narrow(0, c.start, c.len)?;
        let (logits, th) = match &c.logits {
            Some(l) => (l.clone(), c.cap_tanh.clone()),
            None => {
                let (l, th) = m.head_parts(&hc)?;
                (l.to_dtype(ac)?, th)
            }
        };
        let mut dl = fused::log_softmax_gather_backward(
            &logits,
            &targets.narrow(0, c.start, c.len)?,
            &dlp.narrow(0, c.start, c.len)?,
        )?
        .to_dtype(dt)?;
        if let Some(th) = th {
            dl = (dl * th.sqr()?.affine(-1.0, 1.0)?)?;
        }
        let dw = dl.t()?.matmul(&hc)?;
        dlm = Some(match dlm {
            Some(x) => (x + dw)?,
            None => dw,
        });
        dh_rows.push(dl.matmul(&m.lm_head)?);
    }
    let dh_rows = Tensor::cat(&dh_rows, 0)?.reshape((b, t - 1, hidden))?;
    let dhf = Tensor::cat(
        &[&dh_rows, &Tensor::zeros((b, 1, hidden), dt, m.device())?],
        1,
    )?;
    body_backward(m, &tape, &dhf, &mut grads)?;
    let dlm = dlm.ok_or_else(missing)?;
    if cfg.tie_word_embeddings {
        grads.add("model.embed_tokens.weight".into(), dlm)?;
    } else {
        grads.add("lm_head.weight".into(), dlm)?;
    }
    Ok(grads.0)
}

/// From the gradient of the final norm's output `[b, t, hidden]` down through every layer into the
/// embeddings: the part of the backward shared by the language-model head and reward heads.
fn body_backward(
    m: &Decoder,
    tape: &Tape,
    dhf: &Tensor,
    grads: &mut Grads,
) -> candle_core::Result<()> {
    let cfg = &m.config;
    let dt = m.dtype();
    let ac = acc(dt);
    let gemma = cfg.family == Family::Gemma2;
    let (b, t) = tape.shape;
    let hidden = cfg.hidden_size;
    let missing = || candle_core::Error::Msg("backward without a recorded forward".into());
    let dhf = dhf.to_dtype(dt)?;
    let eps = cfg.rms_norm_eps;
    let hf_in = tape.final_norm.as_ref().ok_or_else(missing)?;
    let (mut dh, dwn) = norm_bwd(hf_in, &m.norm, &dhf, eps, gemma)?;
    grads.add("model.norm.weight".into(), dwn)?;

    let (cos, sin) = tape.rope.as_ref().ok_or_else(missing)?;
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let rep = nh / nkv;
    let scale = m.attn_scale();
    for (li, (layer, lt)) in m.layers.iter().zip(&tape.layers).enumerate().rev() {
        let p = format!("model.layers.{li}");
        // MLP half: out = h_mid + [post_ff_norm](down(act(gate(x2)) * up(x2))).
        let dd = match (&lt.post_ff, &layer.post_ff_norm) {
            (Some(d), Some(w)) => {
                let (dd, dw) = norm_bwd(d, w, &dh, eps, true)?;
                grads.add(format!("{p}.post_feedforward_layernorm.weight"), dw)?;
                dd
            }
            _ => dh.clone(),
        };
        let (dmm, dw, db) = linear_bwd(&layer.down, &lt.m, &dd)?;
        grads.linear(&format!("{p}.mlp.down_proj"), dw, db)?;
        let (dg, du) = mlp_act_bwd(cfg.activation, &lt.g, &lt.u, &dmm)?;
        let (dx2g, dw, db) = linear_bwd(&layer.gate, &lt.x2, &dg)?;
        grads.linear(&format!("{p}.mlp.gate_proj"), dw, db)?;
        let (dx2u, dw, db) = linear_bwd(&layer.up, &lt.x2, &du)?;
        grads.linear(&format!("{p}.mlp.up_proj"), dw, db)?;
        let ff_w = if gemma {
            layer.pre_ff_norm.as_ref().ok_or_else(missing)?
        } else {
            &layer.post_attn_norm
        };
        let (dhm, dw) = norm_bwd(&lt.h_mid, ff_w, &(dx2g + dx2u)?, eps, gemma)?;
        grads.add(
            if gemma {
                format!("{p}.pre_feedforward_layernorm.weight")
            } else {
                format!("{p}.post_attention_layernorm.weight")
            },
            dw,
        )?;
        let dh_mid = (&dh + dhm)?;

        // Attention half: h_mid = h_in + [post_attn_norm](o(attn(x))).
        let d_o = match &lt.post_attn {
            Some(o) => {
                let (d_o, dw) = norm_bwd(o, &layer.post_attn_norm, &dh_mid, eps, true)?;
                grads.add(format!("{p}.post_attention_layernorm.weight"), dw)?;
                d_o
            }
            None => dh_mid.clone(),
        };
        let (da, dw, db) = linear_bwd(&layer.o, &lt.a, &d_o)?;
        grads.linear(&format!("{p}.self_attn.o_proj"), dw, db)?;
        let d_out = da
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, nkv, rep * t, hd))?;
        let probs_g = lt.probs.to_dtype(dt)?.reshape((b, nkv, rep * t, t))?;
        let dv = probs_g.t()?.matmul(&d_out)?;
        let dp = d_out
            .matmul(&lt.v.t()?)?
            .reshape((b, nh, t, t))?
            .to_dtype(ac)?;
        let mut ds = fused::softmax_backward(&lt.probs, &dp)?;
        if let Some(th) = &lt.cap_tanh {
            ds = (ds * th.sqr()?.affine(-1.0, 1.0)?)?;
        }
        let ds = (ds * scale)?.to_dtype(dt)?.reshape((b, nkv, rep * t, t))?;
        let dq = ds.matmul(&lt.k)?.reshape((b, nh, t, hd))?;
        let dk = ds.t()?.matmul(&lt.q.reshape((b, nkv, rep * t, hd))?)?;
        let flat = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            x.transpose(1, 2)?.reshape((b, t, n * hd))
        };
        let unrotate = |d: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            match fused::rope_heads_backward(d, cos, sin)? {
                Some(x) => x.reshape((b, t, n * hd)),
                None => flat(rope_bwd(d, cos, sin)?, n),
            }
        };
        let dq = unrotate(&dq, nh)?;
        let dk = unrotate(&dk, nkv)?;
        let dv = flat(dv, nkv)?;
        let (dxq, dw, db) = linear_bwd(&layer.q, &lt.x, &dq)?;
        grads.linear(&format!("{p}.self_attn.q_proj"), dw, db)?;
        let (dxk, dw, db) = linear_bwd(&layer.k, &lt.x, &dk)?;
        grads.linear(&format!("{p}.self_attn.k_proj"), dw, db)?;
        let (dxv, dw, db) = linear_bwd(&layer.v, &lt.x, &dv)?;
        grads.linear(&format!("{p}.self_attn.v_proj"), dw, db)?;
        let dx = ((dxq + dxk)? + dxv)?;
        let (dhi, dw) = norm_bwd(&lt.h_in, &layer.input_norm, &dx, eps, gemma)?;
        grads.add(format!("{p}.input_layernorm.weight"), dw)?;
        dh = (dh_mid + dhi)?;
    }

    let mut dh = dh.reshape((b * t, hidden))?;
    if gemma {
        let n = Tensor::new(&[(hidden as f32).sqrt()], m.device())?.to_dtype(dt)?;
        dh = dh.broadcast_mul(&n)?;
    }
    let ids = tape.ids.as_ref().ok_or_else(missing)?;
    let de = Tensor::zeros(m.embed.shape(), dt, m.device())?.index_add(ids, &dh, 0)?;
    grads.add("model.embed_tokens.weight".into(), de)
}
