//! One decoder for the four families. Every op here has a backward pass in candle (no fused
//! `rms_norm`/`softmax_last_dim`/`rope`/`sdpa`, which silently drop gradients), so the same forward
//! serves training and inference; inference adds a KV cache.
//!
//! Covered: GQA, qkv bias (Qwen2), tied embeddings, Llama-3 rope scaling, Mistral/Gemma-2 sliding
//! windows, Gemma-2's embedding scaling, (1+w) RMSNorm, pre/post feed-forward norms, GELU-tanh,
//! attention and final logit soft-capping and `query_pre_attn_scalar`.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var, D};

use super::backward::{LayerTape, Tape};
use super::config::{Activation, Family, ModelConfig};
use super::{CandleContext, ModelError};

type Res<T> = Result<T, ModelError>;

pub(crate) struct Linear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
}

impl Linear {
    /// Several linear layers of one input (`[.., k]`): in one pass of [`super::rows::rows_t_many`]
    /// where every weight is frozen and the rows fit it (the same bits as one call each), else
    /// one [`Linear::forward`] each.
    pub(crate) fn forward_many(lins: &[&Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let dims = x.dims();
        let lead = &dims[..dims.len() - 1];
        let rows: usize = lead.iter().product();
        if rows > super::fused::SMALL_ROWS {
            let ws: Vec<&Tensor> = lins.iter().map(|l| &l.w).collect();
            let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
            if let Some(ys) = super::rows::rows_t_many(&x2, &ws)? {
                return ys
                    .into_iter()
                    .zip(lins)
                    .map(|(y, l)| l.shaped(y, lead))
                    .collect();
            }
        }
        lins.iter().map(|l| l.forward(x)).collect()
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // One 2-D GEMM over all tokens: a broadcast batched matmul would also make the weight's
        // gradient a per-batch tensor summed afterwards.
        let dims = x.dims();
        let lead = &dims[..dims.len() - 1];
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
        let frozen = !self.w.is_variable();
        let y = if let Some(y) = super::fused::small_matmul_t(&x2, &self.w)? {
            y
        } else if let Some(y) = match frozen {
            true => super::rows::rows_t(&x2, &self.w)?,
            false => None,
        } {
            y
        } else if rows <= 256 && frozen {
            self.w.matmul(&x2.t()?)?.t()?.contiguous()?
        } else {
            x2.matmul(&self.w.t()?)?
        };
        self.shaped(y, lead)
    }

    /// A `[rows, out]` product as `[lead.., out]`, plus the bias.
    fn shaped(&self, y: Tensor, lead: &[usize]) -> candle_core::Result<Tensor> {
        let mut out_dims = lead.to_vec();
        out_dims.push(self.w.dim(0)?);
        let y = y.reshape(out_dims)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

pub(crate) struct Layer {
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    pub(crate) input_norm: Tensor,
    pub(crate) post_attn_norm: Tensor,
    pub(crate) pre_ff_norm: Option<Tensor>,
    pub(crate) post_ff_norm: Option<Tensor>,
    pub(crate) window: Option<usize>,
}

/// Keys and values of every layer for the tokens seen so far.
#[derive(Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<KvLayer>>,
    /// Per row, `(leader, cols)`: the row's first `cols` positions hold the same keys and values
    /// as row `leader`'s (copies of one prefill: the samples of a prompt, prompts with a common
    /// opening). Empty, or one entry per row. Decode attention reads those positions from the
    /// leader's buffers, so the rows of a group share one stream of cache reads.
    pub(crate) share: Vec<(usize, usize)>,
}

/// One layer's keys and values: buffers `[b, kv heads, capacity, head dim]` whose first `len`
/// positions are filled, so that a decode step writes its new position in place instead of
/// copying the whole cache (`Tensor::cat`) every step.
pub(crate) struct KvLayer {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) len: usize,
    /// Whether no other cache shares these buffers (a clone shares them until either side
    /// writes: the writer then copies first).
    exclusive: std::cell::Cell<bool>,
}

impl KvLayer {
    /// Buffers that are exactly `k` and `v` (no spare capacity), owned by this layer.
    pub(crate) fn full(k: Tensor, v: Tensor) -> candle_core::Result<KvLayer> {
        let len = k.dim(2)?;
        Ok(KvLayer {
            k,
            v,
            len,
            exclusive: std::cell::Cell::new(false),
        })
    }

    /// Freshly allocated buffers (no other cache holds them) with `len` positions filled.
    pub(crate) fn owned(k: Tensor, v: Tensor, len: usize) -> KvLayer {
        KvLayer {
            k,
            v,
            len,
            exclusive: std::cell::Cell::new(true),
        }
    }

    /// The filled positions, `[b, kv heads, len, head dim]` (a view into the buffers).
    pub(crate) fn filled(&self) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// Append `k`, `v` (`[b, kv heads, t, head dim]`): in place when there is room in buffers
    /// no one else holds, else into new buffers with twice the room needed.
    pub(crate) fn push(&mut self, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
        let t = k.dim(2)?;
        let cap = self.k.dim(2)?;
        if self.exclusive.get() && self.len + t <= cap {
            self.k.slice_set(&k.contiguous()?, 2, self.len)?;
            self.v.slice_set(&v.contiguous()?, 2, self.len)?;
            self.len += t;
            return Ok(());
        }
        let room = 2 * (self.len + t);
        let grow = |old: &Tensor, new: &Tensor| -> candle_core::Result<Tensor> {
            let (b, h, _, d) = old.dims4()?;
            let spare = Tensor::zeros((b, h, room - self.len - t, d), old.dtype(), old.device())?;
            Tensor::cat(&[&old.narrow(2, 0, self.len)?, new, &spare], 2)
        };
        self.k = grow(&self.k, k)?;
        self.v = grow(&self.v, v)?;
        self.len += t;
        self.exclusive.set(true);
        Ok(())
    }
}

impl Clone for KvLayer {
    fn clone(&self) -> KvLayer {
        self.exclusive.set(false);
        KvLayer {
            k: self.k.clone(),
            v: self.v.clone(),
            len: self.len,
            exclusive: std::cell::Cell::new(false),
        }
    }
}

impl Clone for KvCache {
    fn clone(&self) -> KvCache {
        KvCache {
            layers: self.layers.clone(),
            share: self.share.clone(),
        }
    }
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Decoder {
    pub config: ModelConfig,
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Tensor,
    inv_freq: Vec<f64>,
    device: Device,
    dtype: DType,
}

/// HF's rotary inverse frequencies, with Llama-3 scaling when configured.
fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| {
            // transformers computes these in float32; keep the same rounding.
            let x = 1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32);
            x as f64
        })
        .collect();
    let Some(s) = &cfg.rope_llama3 else {
        return base;
    };
    let low_wl = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wl = s.original_max_position_embeddings / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let f = f as f32;
            let wl = 2.0 * std::f32::consts::PI / f;
            let scaled = if wl > low_wl as f32 {
                f / s.factor as f32
            } else {
                f
            };
            let smooth = (s.original_max_position_embeddings as f32 / wl
                - s.low_freq_factor as f32)
                / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
            let smoothed = (1.0 - smooth) * scaled / s.factor as f32 + smooth * scaled;
            // transformers: ~(wl < high_wl) & ~(wl > low_wl); wavelengths are never NaN.
            let medium = wl >= high_wl as f32 && wl <= low_wl as f32;
            (if medium { smoothed } else { scaled }) as f64
        })
        .collect()
}

/// The dtype reductions run in: float32, or float64 for f64 models (gradient checks).
pub(crate) fn acc(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `sqrt(mean(x^2) + eps)` over the last dimension, in the reduction dtype.
pub(crate) fn rms_denom(xf: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()
}

pub(crate) fn rms_norm(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    one_plus: bool,
) -> candle_core::Result<Tensor> {
    if let Some(y) = super::fused::rms_norm(x, w, eps, one_plus)? {
        return Ok(y);
    }
    let dt = x.dtype();
    let xf = x.to_dtype(acc(dt))?;
    let normed = xf.broadcast_div(&rms_denom(&xf, eps)?)?;
    if one_plus {
        // Gemma: (1 + w) multiplied in float32, then cast.
        normed
            .broadcast_mul(&(w.to_dtype(acc(dt))? + 1.0)?)?
            .to_dtype(dt)
    } else {
        // Llama/Qwen/Mistral: cast first, then the weight.
        normed.to_dtype(dt)?.broadcast_mul(w)
    }
}

/// GELU-tanh's `sqrt(2 / pi)` and cubic coefficient (also used by the fused kernels and the
/// hand-written backward).
pub(crate) const GELU_C: f64 = 0.797_884_560_802_865_4;
pub(crate) const GELU_K: f64 = 0.044715;

/// GELU, tanh approximation, from primitives: candle's fused `gelu` backward uses 6-digit constants,
/// which puts its gradients ~1e-4 (relative) off transformers' on small values.
pub(crate) fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    let inner = ((x + (x.powf(3.0)? * GELU_K)?)? * GELU_C)?;
    (x * 0.5)? * (inner.tanh()? + 1.0)?
}

fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

impl Decoder {
    /// Build from loaded weights (inference: tensors are used as they are).
    pub fn new(config: ModelConfig, mut w: HashMap<String, Tensor>) -> Res<Decoder> {
        let mut take = |name: &str| -> Res<Tensor> {
            w.remove(name)
                .ok_or_else(|| ModelError::Invalid(format!("weight `{name}` missing")))
        };
        let embed = take("model.embed_tokens.weight")?;
        let device = embed.device().clone();
        let dtype = embed.dtype();
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |n: &str, bias: bool| -> Res<Linear> {
                Ok(Linear {
                    w: take(&format!("{p}.{n}.weight"))?,
                    b: if bias {
                        Some(take(&format!("{p}.{n}.bias"))?)
                    } else {
                        None
                    },
                })
            };
            let q = lin("self_attn.q_proj", config.qkv_bias)?;
            let k = lin("self_attn.k_proj", config.qkv_bias)?;
            let v = lin("self_attn.v_proj", config.qkv_bias)?;
            let o = lin("self_attn.o_proj", config.o_bias)?;
            let gate = lin("mlp.gate_proj", config.mlp_bias)?;
            let up = lin("mlp.up_proj", config.mlp_bias)?;
            let down = lin("mlp.down_proj", config.mlp_bias)?;
            let gemma = config.family == Family::Gemma2;
            layers.push(Layer {
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
                input_norm: take(&format!("{p}.input_layernorm.weight"))?,
                post_attn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                pre_ff_norm: if gemma {
                    Some(take(&format!("{p}.pre_feedforward_layernorm.weight"))?)
                } else {
                    None
                },
                post_ff_norm: if gemma {
                    Some(take(&format!("{p}.post_feedforward_layernorm.weight"))?)
                } else {
                    None
                },
                window: config.layer_windows[l],
            });
        }
        let norm = take("model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight")?
        };
        Ok(Decoder {
            inv_freq: inv_freq(&config),
            config,
            embed,
            layers,
            norm,
            lm_head,
            device,
            dtype,
        })
    }

    /// Build with every weight a trainable `Var` (fp32 master weights belong to the caller's dtype
    /// choice). Tied embeddings share one Var.
    pub fn trainable(
        config: ModelConfig,
        w: HashMap<String, Tensor>,
    ) -> Res<(Decoder, BTreeMap<String, Var>)> {
        let mut vars = BTreeMap::new();
        let mut tensors = HashMap::new();
        for (name, t) in w {
            let v = Var::from_tensor(&t).ctx(|| format!("making `{name}` trainable"))?;
            tensors.insert(name.clone(), v.as_tensor().clone());
            vars.insert(name, v);
        }
        Ok((Decoder::new(config, tensors)?, vars))
    }

    /// A compute copy of f32 master weights in `dtype` (e.g. bf16). The casts are differentiable, so
    /// gradients land on the f32 `Var`s; rebuild after every optimizer step.
    pub fn from_vars(
        config: ModelConfig,
        vars: &BTreeMap<String, Var>,
        dtype: DType,
    ) -> Res<Decoder> {
        let mut tensors = HashMap::new();
        for (name, v) in vars {
            let t = v
                .as_tensor()
                .to_dtype(dtype)
                .ctx(|| format!("casting `{name}` for compute"))?;
            tensors.insert(name.clone(), t);
        }
        Decoder::new(config, tensors)
    }

    /// The current weights by Hugging Face name (for saving).
    pub fn weights(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        out.insert("model.embed_tokens.weight".into(), self.embed.clone());
        out.insert("model.norm.weight".into(), self.norm.clone());
        if !self.config.tie_word_embeddings {
            out.insert("lm_head.weight".into(), self.lm_head.clone());
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let mut put = |n: &str, lin: &Linear| {
                out.insert(format!("{p}.{n}.weight"), lin.w.clone());
                if let Some(b) = &lin.b {
                    out.insert(format!("{p}.{n}.bias"), b.clone());
                }
            };
            put("self_attn.q_proj", &layer.q);
            put("self_attn.k_proj", &layer.k);
            put("self_attn.v_proj", &layer.v);
            put("self_attn.o_proj", &layer.o);
            put("mlp.gate_proj", &layer.gate);
            put("mlp.up_proj", &layer.up);
            put("mlp.down_proj", &layer.down);
            out.insert(
                format!("{p}.input_layernorm.weight"),
                layer.input_norm.clone(),
            );
            out.insert(
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attn_norm.clone(),
            );
            if let Some(n) = &layer.pre_ff_norm {
                out.insert(format!("{p}.pre_feedforward_layernorm.weight"), n.clone());
            }
            if let Some(n) = &layer.post_ff_norm {
                out.insert(format!("{p}.post_feedforward_layernorm.weight"), n.clone());
            }
        }
        out
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// cos/sin tables `[b, 1, t, head_dim]` for the given positions.
    fn rope_tables(&self, positions: &[Vec<u32>]) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, t) = (positions.len(), positions[0].len());
        let d = self.config.head_dim;
        let mut cos = Vec::with_capacity(b * t * d);
        let mut sin = Vec::with_capacity(b * t * d);
        for row in positions {
            for &p in row {
                // cos/sin of cat(freqs, freqs): the two halves repeat.
                for _ in 0..2 {
                    for f in &self.inv_freq {
                        // float32 product, as transformers computes it.
                        let a = (p as f32 * *f as f32) as f64;
                        cos.push(a.cos() as f32);
                        sin.push(a.sin() as f32);
                    }
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, 1, t, d), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (b, 1, t, d), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Additive mask `[b, 1, q, k]` (0 or f32::MIN) for queries at the last `q` of `k` positions.
    fn mask(
        &self,
        attn: &[Vec<u8>],
        q: usize,
        window: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        let (b, k) = (attn.len(), attn[0].len());
        let mut m = Vec::with_capacity(b * q * k);
        for row in attn {
            // The window counts real tokens, not columns: a row may hold padding between a
            // shared prompt prefix and its own rest.
            let real: Vec<usize> = row
                .iter()
                .scan(0usize, |c, &m| {
                    *c += (m != 0) as usize;
                    Some(*c)
                })
                .collect();
            for i in 0..q {
                let qi = k - q + i;
                for (j, &keep) in row.iter().enumerate() {
                    let ok = keep != 0
                        && keep == row[qi]
                        && j <= qi
                        && window.is_none_or(|w| real[qi] - real[j] < w);
                    m.push(if ok { 0.0f32 } else { f32::MIN });
                }
            }
        }
        Tensor::from_vec(m, (b, 1, q, k), &self.device)
    }

    /// Logits `[b, t, vocab]` for `ids` (`[b][t]`, the new tokens). `attn` (`[b][past + t]`) marks real
    /// tokens (1) and padding (0) over the cached and the new positions. Positions follow the
    /// mask (cumulative count of real tokens), as transformers' generate does for left padding.
    /// Packed rows number their segments 1, 2, 3, ...: a token attends only within its segment
    /// and positions restart at each one (block-diagonal attention, as padding-free packing).
    pub fn forward(
        &self,
        ids: &[Vec<u32>],
        attn: &[Vec<u8>],
        cache: Option<&mut KvCache>,
    ) -> Res<Tensor> {
        let h = self.hidden(ids, attn, cache)?;
        self.head(&h).ctx(|| "language-model head".into())
    }

    /// Logits `[b, vocab]` of each row's last position only, as [`Decoder::forward`] would give
    /// at `t - 1`: generation needs no other, and a prefill of long prompts spends a large share of
    /// its time in the language-model head otherwise (transformers' `logits_to_keep=1`).
    pub fn last_logits(
        &self,
        ids: &[Vec<u32>],
        attn: &[Vec<u8>],
        cache: Option<&mut KvCache>,
    ) -> Res<Tensor> {
        let h = self.hidden(ids, attn, cache)?;
        let t = h.dim(1).ctx(|| "hidden states".into())?;
        h.narrow(1, t - 1, 1)
            .and_then(|x| x.squeeze(1))
            .and_then(|x| self.head(&x))
            .ctx(|| "language-model head".into())
    }

    /// Final hidden states `[b, t, hidden]` (after the last norm); see [`Decoder::forward`].
    pub fn hidden(
        &self,
        ids: &[Vec<u32>],
        attn: &[Vec<u8>],
        cache: Option<&mut KvCache>,
    ) -> Res<Tensor> {
        self.hidden_recorded(ids, attn, cache, None)
    }

    /// [`Decoder::hidden`], optionally recording what the hand-written backward needs.
    pub(crate) fn hidden_recorded(
        &self,
        ids: &[Vec<u32>],
        attn: &[Vec<u8>],
        cache: Option<&mut KvCache>,
        tape: Option<&mut Tape>,
    ) -> Res<Tensor> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        if b == 0 || t == 0 || attn.len() != b || ids.iter().any(|r| r.len() != t) {
            return Err(ModelError::Invalid(
                "forward needs a non-empty rectangular batch with one mask row per sequence".into(),
            ));
        }
        let k_len = attn[0].len();
        let past = cache.as_ref().map_or(0, |c| c.len());
        if k_len != past + t || attn.iter().any(|r| r.len() != k_len) {
            return Err(ModelError::Invalid(format!(
                "attention mask covers {k_len} positions, expected {} cached + {t} new",
                past
            )));
        }
        if let Some(&bad) = ids
            .iter()
            .flatten()
            .find(|&&x| x as usize >= self.config.vocab_size)
        {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.config.vocab_size
            )));
        }
        let positions: Vec<Vec<u32>> = attn
            .iter()
            .map(|row| {
                // Positions restart with each packed segment (a new non-zero mask value).
                let (mut c, mut seg) = (0u32, 0u8);
                let all: Vec<u32> = row
                    .iter()
                    .map(|&m| {
                        if m != 0 {
                            if m != seg {
                                (seg, c) = (m, 0);
                            }
                            c += 1;
                        }
                        c.saturating_sub(1)
                    })
                    .collect();
                all[k_len - t..].to_vec()
            })
            .collect();
        self.forward_inner(ids, attn, &positions, cache, tape)
            .ctx(|| format!("{} forward", self.config.family.model_type()))
    }

    pub(crate) fn forward_inner(
        &self,
        ids: &[Vec<u32>],
        attn: &[Vec<u8>],
        positions: &[Vec<u32>],
        mut cache: Option<&mut KvCache>,
        mut tape: Option<&mut Tape>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, t) = (ids.len(), ids[0].len());
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let idx = Tensor::from_vec(flat, b * t, &self.device)?;
        let mut h = self
            .embed
            .index_select(&idx, 0)?
            .reshape((b, t, cfg.hidden_size))?;
        let gemma = cfg.family == Family::Gemma2;
        if gemma {
            // transformers casts the normaliser to the hidden dtype before multiplying.
            let n = Tensor::new(&[(cfg.hidden_size as f32).sqrt()], &self.device)?
                .to_dtype(self.dtype)?;
            h = h.broadcast_mul(&n)?;
        }
        let (cos, sin) = self.rope_tables(positions)?;
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        for w in &cfg.layer_windows {
            if !masks.iter().any(|(x, _)| x == w) {
                masks.push((*w, self.mask(attn, t, *w)?));
            }
        }
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                c.layers = vec![None; self.layers.len()];
                c.share.clear();
            }
        }
        if let Some(tp) = tape.as_deref_mut() {
            tp.ids = Some(idx.clone());
            tp.rope = Some((cos.clone(), sin.clone()));
        }
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let rep = nh / nkv;
        let scale = self.attn_scale();
        let acc_dt = acc(self.dtype);
        // Per (sequence, kv head) of the cache: read a shared prompt from its leader's buffers.
        let share: Option<Vec<(usize, usize)>> = cache
            .as_deref()
            .filter(|c| c.share.len() == b && c.share.iter().any(|&(_, cols)| cols > 0))
            .map(|c| {
                c.share
                    .iter()
                    .flat_map(|&(lead, cols)| (0..nkv).map(move |h| (lead * nkv + h, cols)))
                    .collect()
            });
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = h.clone();
            let x = rms_norm(&h, &layer.input_norm, cfg.rms_norm_eps, gemma)?;
            let [pq, pk, pv]: [Tensor; 3] =
                Linear::forward_many(&[&layer.q, &layer.k, &layer.v], &x)?
                    .try_into()
                    .expect("three projections");
            let heads = |p: Tensor| p.transpose(1, 2)?.contiguous();
            let rotated = |p: Tensor, n: usize| -> candle_core::Result<Tensor> {
                let p = p.reshape((b, t, n, hd))?;
                match super::fused::rope_heads(&p, &cos, &sin)? {
                    Some(r) => Ok(r),
                    None => apply_rope(&heads(p)?, &cos, &sin),
                }
            };
            let q = rotated(pq, nh)?;
            let mut k = rotated(pk, nkv)?;
            let mut v = heads(pv.reshape((b, t, nkv, hd))?)?;
            // The cache's buffers, `[b * nkv, capacity, hd]`, for the decode kernels to read in
            // place.
            let mut buffers = None;
            if let Some(c) = cache.as_deref_mut() {
                match &mut c.layers[li] {
                    Some(l) => l.push(&k, &v)?,
                    empty => *empty = Some(KvLayer::full(k.clone(), v.clone())?),
                }
                let l = c.layers[li].as_ref().expect("just filled");
                let cap = l.k.dim(2)?;
                buffers = Some((
                    l.k.reshape((b * nkv, cap, hd))?.narrow(1, 0, l.len)?,
                    l.v.reshape((b * nkv, cap, hd))?.narrow(1, 0, l.len)?,
                ));
                (k, v) = l.filled()?;
            }
            let kl = k.dim(2)?;
            // Grouped-query attention without repeating K/V: the `rep` query heads that share a
            // key/value head are stacked along the query axis, `[b, nkv, rep * t, hd]`.
            let qg = q.to_dtype(acc_dt)?.reshape((b, nkv, rep * t, hd))?;
            // Decoding (a cache, few new tokens, nothing recorded): one parallel pass over every
            // (sequence, kv head) instead of a GEMM call per pair.
            let decoding =
                cache.is_some() && tape.is_none() && rep * t <= super::attend::FEW_QUERIES;
            let in_place = buffers.as_ref().filter(|(bk, _)| bk.dtype() == acc_dt);
            let raw = match (decoding, in_place) {
                (true, Some((bk, _))) => super::attend::scores(
                    &qg.reshape((b * nkv, rep * t, hd))?,
                    bk,
                    share.as_deref(),
                )?,
                (true, None) => {
                    let q3 = qg.reshape((b * nkv, rep * t, hd))?;
                    let k3 = k
                        .to_dtype(acc_dt)?
                        .contiguous()?
                        .reshape((b * nkv, kl, hd))?;
                    super::attend::scores(&q3, &k3, None)?
                }
                (false, _) => None,
            };
            let raw = match raw {
                Some(s) => s,
                None => qg.matmul(&k.to_dtype(acc_dt)?.contiguous()?.t()?)?,
            };
            let mut scores = (raw.reshape((b, nh, t, kl))? * scale)?;
            let mut cap_tanh = None;
            if let Some(cap) = cfg.attn_logit_softcapping {
                let th = (scores / cap)?.tanh()?;
                scores = (&th * cap)?;
                cap_tanh = Some(th);
            }
            let mask = &masks
                .iter()
                .find(|(w, _)| *w == layer.window)
                .expect("a mask per window")
                .1;
            let scores = scores.broadcast_add(&mask.to_dtype(acc_dt)?)?;
            let probs = super::fused::softmax_last_dim(&scores)?;
            let pg = probs.to_dtype(self.dtype)?.reshape((b, nkv, rep * t, kl))?;
            let mixed = match (decoding, &buffers) {
                (true, Some((_, bv))) => {
                    super::attend::mix(&pg.reshape((b * nkv, rep * t, kl))?, bv, share.as_deref())?
                }
                (true, None) => super::attend::mix(
                    &pg.reshape((b * nkv, rep * t, kl))?,
                    &v.contiguous()?.reshape((b * nkv, kl, hd))?,
                    None,
                )?,
                (false, _) => None,
            };
            let mixed = match mixed {
                Some(m) => m,
                None => pg.matmul(&v.contiguous()?)?,
            };
            let a = mixed
                .reshape((b, nh, t, hd))?
                .transpose(1, 2)?
                .reshape((b, t, nh * hd))?;
            let o = layer.o.forward(&a)?;
            let (x2, post_attn, post_ff, g, u, m, out);
            if gemma {
                let an = rms_norm(&o, &layer.post_attn_norm, cfg.rms_norm_eps, true)?;
                post_attn = Some(o.clone());
                h = (&residual + an)?;
                let pre = layer.pre_ff_norm.as_ref().expect("gemma");
                x2 = rms_norm(&h, pre, cfg.rms_norm_eps, true)?;
                (g, u, m) = self.mlp_parts(layer, &x2)?;
                let d = layer.down.forward(&m)?;
                let post = layer.post_ff_norm.as_ref().expect("gemma");
                let dn = rms_norm(&d, post, cfg.rms_norm_eps, true)?;
                post_ff = Some(d);
                out = (&h + dn)?;
            } else {
                post_attn = None;
                post_ff = None;
                h = (&residual + o)?;
                x2 = rms_norm(&h, &layer.post_attn_norm, cfg.rms_norm_eps, false)?;
                (g, u, m) = self.mlp_parts(layer, &x2)?;
                out = (&h + layer.down.forward(&m)?)?;
            }
            if let Some(tp) = tape.as_deref_mut() {
                tp.layers.push(LayerTape {
                    h_in: residual,
                    x,
                    q,
                    k,
                    v,
                    probs,
                    cap_tanh,
                    a,
                    post_attn,
                    h_mid: h.clone(),
                    x2,
                    g,
                    u,
                    m,
                    post_ff,
                });
            }
            h = out;
        }
        let y = rms_norm(&h, &self.norm, cfg.rms_norm_eps, gemma)?;
        if let Some(tp) = tape {
            tp.final_norm = Some(h);
        }
        Ok(y)
    }

    /// `1/sqrt(head_dim)`, or Gemma-2's `query_pre_attn_scalar^-1/2`.
    pub(crate) fn attn_scale(&self) -> f64 {
        match self.config.query_pre_attn_scalar {
            Some(s) => s.powf(-0.5),
            None => (self.config.head_dim as f64).powf(-0.5),
        }
    }

    /// Logits from final hidden states (any leading shape).
    pub(crate) fn head(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.head_parts(h)?.0)
    }

    /// Gate pre-activation, up projection and their product `act(gate) * up`.
    fn mlp_parts(
        &self,
        layer: &Layer,
        x: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let [g, u]: [Tensor; 2] = Linear::forward_many(&[&layer.gate, &layer.up], x)?
            .try_into()
            .expect("two projections");
        if let Some(m) = super::fused::gated_activation(self.config.activation, &g, &u)? {
            return Ok((g, u, m));
        }
        let act = match self.config.activation {
            Activation::Silu => g.silu()?,
            Activation::GeluTanh => gelu_tanh(&g)?,
        };
        let m = (act * &u)?;
        Ok((g, u, m))
    }

    /// Log-probabilities `[b, t-1]` (f32; f64 for f64 models) of each token given the ones before it; differentiable.
    /// Entries at padded targets are meaningless: mask them with `attn[.., 1..]`.
    pub fn token_logprobs(&self, ids: &[Vec<u32>], attn: &[Vec<u8>]) -> Res<Tensor> {
        self.logprobs_recorded(ids, attn, None)
    }
}
