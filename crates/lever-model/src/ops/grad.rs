//! Fused operations with their own backward pass, for training on CPU: causal softmax (scale
//! and mask inside), RMS norm and SwiGLU. The elementary candle versions keep four to six
//! intermediate tensors of each activation alive until the backward pass; these keep their
//! input and output only, which is most of a training step's memory and much of its time.
//! Each is checked against the elementary version (values and gradients) in the tests below.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::host::{Gemm, HostRows, Mat, f32_slice, gemm_into, with_host};
use super::{RopeStyle, RopeTables};

/// softmax(scale · x + causal mask) over the last dimension of (..., T, P) scores, where
/// query i (of T) sits at position past + i and sees keys 0..=past + i.
#[derive(Debug, Clone, Copy)]
struct CausalSoftmax {
    scale: f32,
    past: usize,
    /// Local attention: query p also may not see keys j ≤ p − W.
    window: Option<usize>,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "lever-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let dims = l.dims();
        let (t, p) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(p)
            .zip(x.par_chunks(p))
            .enumerate()
            .for_each(|(row, (y, x))| {
                let keys = (self.past + row % t + 1).min(p);
                let first = self.window.map_or(0, |w| keys.saturating_sub(w));
                let max = x[first..keys]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, v| m.max(v * self.scale));
                y[first..keys].copy_from_slice(&x[first..keys]);
                let sum = super::exp_in_place(&mut y[first..keys], self.scale, max);
                y[first..keys].iter_mut().for_each(|y| *y /= sum);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&g, &SoftmaxGrad(self.scale))?))
    }
}

/// dx = scale · y ⊙ (g − Σ g ⊙ y), row by row.
#[derive(Debug, Clone, Copy)]
struct SoftmaxGrad(f32);

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "lever-causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let p = *l1.dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(p)
            .zip(y.par_chunks(p).zip(g.par_chunks(p)))
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = self.0 * y * (g - dot);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Causal softmax of raw attention scores (B, H, T, P): scaled, masked for queries at
/// positions past.. (and, with a window W, for keys W or more positions back), normalized.
/// Differentiable.
pub(crate) fn causal_softmax(
    scores: &Tensor,
    scale: f64,
    past: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
        past,
        window,
    })
}

/// y = x / rms(x) ⊙ w over the last dimension.
#[derive(Debug, Clone, Copy)]
struct RmsNorm(f32);

impl RmsNorm {
    fn inv_rms(&self, x: &[f32]) -> f32 {
        inv_rms(x, self.0)
    }
}

/// 1 / rms(x) = 1 / √(mean(x²) + eps).
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// RMS norm of rows x (M, C) with weight w (C,): y = x · r ⊙ w, and each row's r = 1/rms
/// into `r` (M,), in parallel over blocks of rows.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], r: &mut [f32]) {
    let c = w.len();
    let rows = c * RMS_ROWS_PER_TASK;
    y.par_chunks_mut(rows)
        .zip(x.par_chunks(rows))
        .zip(r.par_chunks_mut(RMS_ROWS_PER_TASK))
        .for_each(|((y, x), r)| {
            for ((y, x), r) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(r) {
                *r = inv_rms(x, eps);
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * *r * w;
                }
            }
        });
}

/// RMS norm's backward over rows: with n = x·r and y = n ⊙ w, for the gradient g of y,
/// dx += r · (g⊙w − n · mean(g⊙w⊙n)) (added to what dx holds) and dw = Σ_rows g ⊙ n,
/// returned. `r` holds each row's 1/rms, as [`rms_norm_rows`] wrote it.
pub(crate) fn rms_norm_backward_rows(
    x: &[f32],
    w: &[f32],
    r: &[f32],
    g: &[f32],
    dx: &mut [f32],
) -> Vec<f32> {
    let c = w.len();
    let rows = c * RMS_ROWS_PER_TASK;
    // dw's partial sums over fixed blocks of rows, added in block order: the same bits
    // whatever the threads do. (A rayon `fold` grouped rows by how work was stolen, so a
    // run and its resumed twin differed in the last bits under load.)
    let dws: Vec<Vec<f32>> = dx
        .par_chunks_mut(rows)
        .zip(x.par_chunks(rows).zip(g.par_chunks(rows)))
        .zip(r.par_chunks(RMS_ROWS_PER_TASK))
        .map(|((dx, (x, g)), r)| {
            let mut dw = vec![0f32; c];
            for (((dx, x), g), &r) in dx
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(g.chunks_exact(c))
                .zip(r)
            {
                let mut dot = 0f32;
                for i in 0..c {
                    let n = x[i] * r;
                    dw[i] += g[i] * n;
                    dot += g[i] * w[i] * n;
                }
                let mean = dot / c as f32;
                for i in 0..c {
                    dx[i] += r * (g[i] * w[i] - x[i] * r * mean);
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; c];
    for part in dws {
        dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    dw
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "lever-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let mut y = vec![0f32; x.len()];
        let mut r = vec![0f32; x.len() / w.len().max(1)];
        rms_norm_rows(x, w, self.0, &mut y, &mut r);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let gs = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let r: Vec<f32> = xs
            .chunks(ws.len().max(1))
            .map(|x| self.inv_rms(x))
            .collect();
        let mut dx = vec![0f32; xs.len()];
        let dw = rms_norm_backward_rows(&xs, &ws, &r, &gs, &mut dx);
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Rows per task of RMS norm's backward.
const RMS_ROWS_PER_TASK: usize = 32;

/// RMS norm over the last dimension with weight w: (C,). Differentiable in x and w.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm(eps))
}

/// SwiGLU's product silu(g) ⊙ u.
#[derive(Debug, Clone, Copy)]
struct SiluMul;

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + super::exp(-v))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "lever-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, self.name())?;
        let u = f32_slice(s2, l2, self.name())?;
        if g.len() != u.len() {
            candle_core::bail!("silu-mul: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        let mut y = vec![0f32; g.len()];
        silu_mul_rows(g, u, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Read in place: the three inputs are the largest activations of a step.
        let (hg, hu, hd) = (HostRows::new(g)?, HostRows::new(u)?, HostRows::new(grad)?);
        let name = self.name();
        let (dg, du) = hg.with(name, |gs| {
            hu.with(name, |us| {
                hd.with(name, |ds| {
                    if us.len() != gs.len() || ds.len() != gs.len() {
                        candle_core::bail!("{name}: backward of mismatched sizes");
                    }
                    let mut dg = vec![0f32; gs.len()];
                    let mut du = vec![0f32; gs.len()];
                    silu_mul_backward_rows(gs, us, ds, &mut dg, &mut du);
                    Ok((dg, du))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// Values per task of the element-wise SwiGLU passes.
const SILU_CHUNK: usize = 4096;

/// y = silu(g) ⊙ u, in parallel.
pub(crate) fn silu_mul_rows(g: &[f32], u: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(SILU_CHUNK)
        .zip(g.par_chunks(SILU_CHUNK).zip(u.par_chunks(SILU_CHUNK)))
        .for_each(|(y, (g, u))| {
            for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                *y = g * sigmoid(*g) * u;
            }
        });
}

/// SwiGLU's backward: for the gradient d of y = silu(g) ⊙ u, dg and du (overwritten).
pub(crate) fn silu_mul_backward_rows(
    g: &[f32],
    u: &[f32],
    d: &[f32],
    dg: &mut [f32],
    du: &mut [f32],
) {
    dg.par_chunks_mut(SILU_CHUNK)
        .zip(du.par_chunks_mut(SILU_CHUNK))
        .zip(
            g.par_chunks(SILU_CHUNK)
                .zip(u.par_chunks(SILU_CHUNK))
                .zip(d.par_chunks(SILU_CHUNK)),
        )
        .for_each(|((dg, du), ((g, u), d))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                du[i] = d[i] * g[i] * s;
                dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
}

/// silu(g) ⊙ u, differentiable in both.
pub(crate) fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)
}

/// Shapes of a fused attention call: q (B, T, H·D), k and v (B, T, K·D).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub(crate) batch: usize,
    pub(crate) len: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    /// The factor of q·k: 1/√D for the llama family, the model's own for Gemma 3
    /// (`query_pre_attn_scalar`^-1/2).
    pub(crate) scale: f32,
    /// Local attention (Gemma 3's sliding layers): query i sees keys i − W < j ≤ i only.
    pub(crate) window: Option<usize>,
}

impl AttnShape {
    /// The llama family's shape: scores scaled by 1/√D, every earlier key seen.
    pub(crate) fn causal(
        batch: usize,
        len: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            batch,
            len,
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: None,
        }
    }

    /// The first key query row `i` sees.
    fn first_key(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }
}

/// The whole attention core of a decoder layer on a prefix (no cache): RoPE on q and k,
/// grouped-query heads, causal softmax(q·kᵀ/√D)·v, heads merged back to (B, T, H·D), with
/// keys and values optionally rounded to f16 after the rotation (llama.cpp's cache; the
/// gradient passes straight through the rounding). One graph node instead of the twenty-odd
/// of the elementary version (reshapes, transposes, copies, the rotation's pieces, the
/// repeated heads, two products, the softmax), none of whose (B, H, T, T) scores are kept:
/// the backward recomputes them head by head, as FlashAttention does (Dao et al. 2022,
/// arXiv:2205.14135, §3.1), which costs one small product per head.
#[derive(Debug, Clone)]
pub(crate) struct CausalAttention {
    shape: AttnShape,
    /// (T, D/2) each, positions 0..T.
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    style: RopeStyle,
    round_kv: bool,
}

/// Head `h` of token rows (B, T, heads·D) for batch row `b`: (T, D), copied.
fn head_rows(x: &[f32], b: usize, h: usize, s: &AttnShape, heads: usize) -> Vec<f32> {
    let (t, d) = (s.len, s.head_dim);
    let mut out = Vec::with_capacity(t * d);
    for ti in 0..t {
        let at = (b * t + ti) * heads * d + h * d;
        out.extend_from_slice(&x[at..at + d]);
    }
    out
}

/// Write (T, D) rows back as head `h` of (B, T, heads·D).
fn put_head(x: &mut [f32], rows: &[f32], b: usize, h: usize, s: &AttnShape, heads: usize) {
    let (t, d) = (s.len, s.head_dim);
    for ti in 0..t {
        let at = (b * t + ti) * heads * d + h * d;
        x[at..at + d].copy_from_slice(&rows[ti * d..ti * d + d]);
    }
}

fn round_f16(x: &mut [f32]) {
    x.iter_mut()
        .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
}

impl CausalAttention {
    /// RoPE on (T, D) rows in place; `inverse` applies the transposed rotation (the backward).
    fn rotate(&self, x: &mut [f32], inverse: bool) {
        let d = self.shape.head_dim;
        let half = d / 2;
        for (ti, row) in x.chunks_exact_mut(d).enumerate() {
            let cos = &self.cos[ti * half..ti * half + half];
            let sin = &self.sin[ti * half..ti * half + half];
            for i in 0..half {
                let (a, b) = match self.style {
                    RopeStyle::Neox => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x0, x1, c, s) = (row[a], row[b], cos[i], sin[i]);
                if inverse {
                    row[a] = x0 * c + x1 * s;
                    row[b] = x1 * c - x0 * s;
                } else {
                    row[a] = x0 * c - x1 * s;
                    row[b] = x0 * s + x1 * c;
                }
            }
        }
    }

    /// Rotated (and rounded) keys and values of kv head g, batch row b: (T, D) each.
    fn keys_values(&self, k: &[f32], v: &[f32], b: usize, g: usize) -> (Vec<f32>, Vec<f32>) {
        let s = &self.shape;
        let mut kr = head_rows(k, b, g, s, s.kv_heads);
        let mut vv = head_rows(v, b, g, s, s.kv_heads);
        self.rotate(&mut kr, false);
        if self.round_kv {
            round_f16(&mut kr);
            round_f16(&mut vv);
        }
        (kr, vv)
    }

    /// Rotated query head h of batch row b: (T, D).
    fn query(&self, q: &[f32], b: usize, h: usize) -> Vec<f32> {
        let s = &self.shape;
        let mut qr = head_rows(q, b, h, s, s.heads);
        self.rotate(&mut qr, false);
        qr
    }

    /// Probabilities of query rows i0..i1 over keys 0..i1 into p (i1 − i0, i1): row i zero
    /// past key i. The keys after i1 are masked for every row of the block, so they are
    /// never computed: blocks of rows make the products follow the causal triangle.
    fn block_probs(&self, qr: &[f32], kr: &[f32], i0: usize, i1: usize, p: &mut [f32]) {
        let d = self.shape.head_dim;
        let q = &qr[i0 * d..i1 * d];
        gemm_into(
            p,
            Mat::rows(q, d),
            Mat::t(&kr[..i1 * d], d),
            Gemm::new(i1 - i0, i1, d).serial(),
        );
        let scale = self.shape.scale;
        for (r, row) in p.chunks_exact_mut(i1).enumerate() {
            let (seen, masked) = row.split_at_mut(i0 + r + 1);
            let (old, seen) = seen.split_at_mut(self.shape.first_key(i0 + r));
            let max = seen.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v * scale));
            let sum = super::exp_in_place(seen, scale, max);
            seen.iter_mut().for_each(|v| *v /= sum);
            old.fill(0.0);
            masked.fill(0.0);
        }
    }
    /// One (batch row, kv head) unit's rotated (and rounded) inputs.
    fn unit(&self, q: &[f32], k: &[f32], v: &[f32], u: usize) -> AttnUnit {
        let s = &self.shape;
        let rep = s.heads / s.kv_heads;
        let (b, g) = (u / s.kv_heads, u % s.kv_heads);
        let (kr, vv) = self.keys_values(k, v, b, g);
        let mut qr = Vec::with_capacity(rep * s.len * s.head_dim);
        for r in 0..rep {
            qr.extend(self.query(q, b, g * rep + r));
        }
        AttnUnit {
            qr,
            kr,
            vv,
            probs: Vec::new(),
        }
    }

    /// A unit's outputs (rep, T, D); with `keep`, its probabilities stay in `unit.probs`
    /// for the backward.
    fn unit_forward(&self, unit: &mut AttnUnit, keep: bool) -> Vec<f32> {
        let (t, d) = (self.shape.len, self.shape.head_dim);
        let rep = self.shape.heads / self.shape.kv_heads;
        let per_head = probs_len(t);
        let AttnUnit { qr, kr, vv, probs } = unit;
        *probs = vec![0f32; if keep { rep * per_head } else { 0 }];
        let mut scratch = vec![0f32; if keep { 0 } else { QUERY_BLOCK.min(t) * t }];
        let mut out = vec![0f32; rep * t * d];
        for (r, out) in out.chunks_exact_mut(t * d).enumerate() {
            let qr = &qr[r * t * d..(r + 1) * t * d];
            let mut at = r * per_head;
            for (i0, i1) in row_blocks(t) {
                let len = (i1 - i0) * i1;
                let p = if keep {
                    &mut probs[at..at + len]
                } else {
                    &mut scratch[..len]
                };
                at += len;
                self.block_probs(qr, kr, i0, i1, p);
                gemm_into(
                    &mut out[i0 * d..i1 * d],
                    Mat::rows(p, i1),
                    Mat::rows(vv, d),
                    Gemm::new(i1 - i0, d, i1).serial(),
                );
            }
        }
        out
    }

    /// A unit's backward from the gradient of its outputs: dq (rep, T, D) and dk, dv (T, D),
    /// rotated back. The probabilities are the kept ones, or recomputed.
    fn unit_backward(
        &self,
        unit: &AttnUnit,
        dys: &[f32],
        u: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = self.shape;
        let (t, d, rep) = (s.len, s.head_dim, s.heads / s.kv_heads);
        let (b, g) = (u / s.kv_heads, u % s.kv_heads);
        let scale = s.scale;
        let per_head = probs_len(t);
        let kept = !unit.probs.is_empty();
        let (kr, vv) = (&unit.kr, &unit.vv);
        let rows = QUERY_BLOCK.min(t) * t;
        let mut scratch = vec![0f32; if kept { 0 } else { rows }];
        let mut ds = vec![0f32; rows];
        let mut dq = vec![0f32; rep * t * d];
        let (mut dk, mut dv) = (vec![0f32; t * d], vec![0f32; t * d]);
        for (r, dq) in dq.chunks_exact_mut(t * d).enumerate() {
            let qr = &unit.qr[r * t * d..(r + 1) * t * d];
            let dy = head_rows(dys, b, g * rep + r, &s, s.heads);
            let mut at = r * per_head;
            for (i0, i1) in row_blocks(t) {
                let m = i1 - i0;
                let ds = &mut ds[..m * i1];
                let p: &[f32] = if kept {
                    &unit.probs[at..at + m * i1]
                } else {
                    let p = &mut scratch[..m * i1];
                    self.block_probs(qr, kr, i0, i1, p);
                    p
                };
                at += m * i1;
                let dy = &dy[i0 * d..i1 * d];
                // dv[..i1] += pᵀ·dy; dp = dy·v[..i1]ᵀ
                let dv = &mut dv[..i1 * d];
                gemm_into(
                    dv,
                    Mat::t(p, i1),
                    Mat::rows(dy, d),
                    Gemm::new(i1, d, m).accumulate().serial(),
                );
                gemm_into(
                    ds,
                    Mat::rows(dy, d),
                    Mat::t(&vv[..i1 * d], d),
                    Gemm::new(m, i1, d).serial(),
                );
                // ds = scale · p ⊙ (dp − Σ_j dp ⊙ p), row by row (zero where p is).
                for (ds, p) in ds.chunks_exact_mut(i1).zip(p.chunks_exact(i1)) {
                    let dot: f32 = ds.iter().zip(p.iter()).map(|(a, b)| a * b).sum();
                    ds.iter_mut()
                        .zip(p.iter())
                        .for_each(|(ds, p)| *ds = scale * p * (*ds - dot));
                }
                // dq_rot = ds·k_rot[..i1]; dk_rot[..i1] += dsᵀ·q_rot
                let dq = &mut dq[i0 * d..i1 * d];
                gemm_into(
                    dq,
                    Mat::rows(ds, i1),
                    Mat::rows(kr, d),
                    Gemm::new(m, d, i1).serial(),
                );
                let (dk, q) = (&mut dk[..i1 * d], &qr[i0 * d..i1 * d]);
                gemm_into(
                    dk,
                    Mat::t(ds, i1),
                    Mat::rows(q, d),
                    Gemm::new(i1, d, m).accumulate().serial(),
                );
            }
            self.rotate(dq, true);
        }
        self.rotate(&mut dk, true);
        (dq, dk, dv)
    }

    /// dq, dk, dv (shaped as q, k, v) from the units' backward passes.
    fn gather_grads(
        &self,
        units: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>,
        lens: (usize, usize),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = self.shape;
        let (t, d, rep) = (s.len, s.head_dim, s.heads / s.kv_heads);
        let (mut dq, mut dk, mut dv) = (vec![0f32; lens.0], vec![0f32; lens.1], vec![0f32; lens.1]);
        for (u, (uq, uk, uv)) in units.iter().enumerate() {
            let (b, g) = (u / s.kv_heads, u % s.kv_heads);
            for (r, rows) in uq.chunks_exact(t * d).enumerate() {
                put_head(&mut dq, rows, b, g * rep + r, &s, s.heads);
            }
            put_head(&mut dk, uk, b, g, &s, s.kv_heads);
            put_head(&mut dv, uv, b, g, &s, s.kv_heads);
        }
        (dq, dk, dv)
    }

    /// The backward pass on host values: dq, dk, dv, each shaped as its input. The
    /// probabilities are recomputed head by head.
    fn backward(
        &self,
        qs: &[f32],
        ks: &[f32],
        vs: &[f32],
        dys: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = self.shape;
        let units = (0..s.batch * s.kv_heads)
            .into_par_iter()
            .map(|u| self.unit_backward(&self.unit(qs, ks, vs, u), dys, u))
            .collect();
        self.gather_grads(units, (qs.len(), ks.len()))
    }

    /// The forward pass on host values q (B, T, H·D), k, v (B, T, K·D): (B, T, H·D), and
    /// what [`Self::backward_kept`] needs: each unit's rotated inputs and, when the context
    /// is short enough that they are no larger than a few times the inputs
    /// ([`KEEP_PROBS_LEN`]), its probabilities, which the backward then reads instead of
    /// recomputing (FlashAttention's recomputation pays at long contexts, not at 64 tokens).
    pub(crate) fn forward_kept(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, AttnKept) {
        let s = self.shape;
        let keep = s.len <= KEEP_PROBS_LEN;
        let units: Vec<(Vec<f32>, AttnUnit)> = (0..s.batch * s.kv_heads)
            .into_par_iter()
            .map(|u| {
                let mut unit = self.unit(q, k, v, u);
                let out = self.unit_forward(&mut unit, keep);
                (out, unit)
            })
            .collect();
        let (outs, units): (Vec<_>, Vec<_>) = units.into_iter().unzip();
        let y = self.gather_outputs(&outs, q.len());
        let kept = AttnKept {
            units,
            lens: (q.len(), k.len()),
        };
        (y, kept)
    }

    /// The backward pass from what [`Self::forward_kept`] kept: dq, dk, dv.
    pub(crate) fn backward_kept(
        &self,
        kept: &AttnKept,
        dys: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let units = kept
            .units
            .par_iter()
            .enumerate()
            .map(|(u, unit)| self.unit_backward(unit, dys, u))
            .collect();
        self.gather_grads(units, kept.lens)
    }

    /// The units' outputs (rep, T, D) each, as (B, T, H·D).
    fn gather_outputs(&self, outs: &[Vec<f32>], len: usize) -> Vec<f32> {
        let s = self.shape;
        let (t, d, rep) = (s.len, s.head_dim, s.heads / s.kv_heads);
        let mut y = vec![0f32; len];
        for (u, out) in outs.iter().enumerate() {
            let (b, g) = (u / s.kv_heads, u % s.kv_heads);
            for (r, rows) in out.chunks_exact(t * d).enumerate() {
                put_head(&mut y, rows, b, g * rep + r, &s, s.heads);
            }
        }
        y
    }
}

/// One (batch row, kv head) of a causal attention call: its rep query heads rotated
/// (rep, T, D), its key head rotated and its value head (T, D) each (rounded when the op
/// rounds), and, when kept, the probabilities of each query head, block after block.
#[derive(Debug)]
struct AttnUnit {
    qr: Vec<f32>,
    kr: Vec<f32>,
    vv: Vec<f32>,
    probs: Vec<f32>,
}

/// What [`CausalAttention::forward_kept`] keeps for the backward.
#[derive(Debug)]
pub(crate) struct AttnKept {
    units: Vec<AttnUnit>,
    /// Lengths of q and of k (= v).
    lens: (usize, usize),
}

/// Contexts up to which the fused training op keeps the attention probabilities, (T, T)
/// per head, at most 8 times a head's (T, D) inputs for D ≥ 32.
const KEEP_PROBS_LEN: usize = 256;

/// Values of one head's probabilities over the causal row blocks.
fn probs_len(t: usize) -> usize {
    row_blocks(t).map(|(i0, i1)| (i1 - i0) * i1).sum()
}

/// Query rows per block of the causal attention products.
const QUERY_BLOCK: usize = 64;

/// (i0, i1) row blocks of 0..t.
fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(QUERY_BLOCK)
        .map(move |i0| (i0, (i0 + QUERY_BLOCK).min(t)))
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "lever-causal-attention"
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
        let (q, k, v) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
            f32_slice(s3, l3, self.name())?,
        );
        Ok((CpuStorage::F32(self.forward(q, k, v)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // q, k, v (contiguous, as the forward took them) and the incoming gradient, read in
        // place.
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = with_host(&[q, k, v, &grad], self.name(), |h| {
            Ok(self.backward(h[0], h[1], h[2], h[3]))
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

impl CausalAttention {
    /// The attention of a prefix of `shape.len` positions, rotated by `rope`'s tables.
    pub(crate) fn new(shape: AttnShape, rope: &RopeTables, round_kv: bool) -> Result<Self> {
        let AttnShape {
            len: t,
            heads: h,
            kv_heads: kh,
            head_dim: d,
            ..
        } = shape;
        if kh == 0 || h % kh != 0 || d % 2 != 0 || t == 0 {
            candle_core::bail!("causal attention: bad shape {shape:?}");
        }
        let (cos, sin) = rope.host_tables(0, t);
        Ok(CausalAttention {
            shape,
            cos: Arc::new(cos.to_vec()),
            sin: Arc::new(sin.to_vec()),
            style: rope.style(),
            round_kv,
        })
    }

    /// The forward pass on host values q (B, T, H·D), k, v (B, T, K·D): (B, T, H·D).
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let s = self.shape;
        let outs: Vec<Vec<f32>> = (0..s.batch * s.kv_heads)
            .into_par_iter()
            .map(|u| self.unit_forward(&mut self.unit(q, k, v, u), false))
            .collect();
        self.gather_outputs(&outs, q.len())
    }
}

/// Causal self-attention over a whole prefix (positions 0..T, no cache) from projected
/// q: (B, T, H·D), k, v: (B, T, K·D) to (B, T, H·D): RoPE, grouped heads, scaled causal
/// softmax, with keys and values rounded to f16 when `round_kv`. Differentiable in q, k, v.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: AttnShape,
    rope: &RopeTables,
    round_kv: bool,
) -> Result<Tensor> {
    let op = CausalAttention::new(shape, rope, round_kv)?;
    let AttnShape {
        batch: b,
        len: t,
        heads: h,
        kv_heads: kh,
        head_dim: d,
        ..
    } = shape;
    for (x, heads) in [(q, h), (k, kh), (v, kh)] {
        if x.dims() != [b, t, heads * d] {
            candle_core::bail!("causal attention: {:?} for {shape:?}", x.dims());
        }
    }
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff_tensors as max_diff;
    use candle_core::{D, DType, Device, Var};

    fn var(seed: u64, shape: &[usize]) -> Var {
        let mut rng = crate::rng::SplitMix64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Values and gradients (of a weighted sum, so every output counts differently) agree
    /// with candle's elementary ops within 1e-5.
    fn check(vars: &[&Var], fused: Tensor, plain: Tensor, label: &str) {
        assert!(max_diff(&fused, &plain) < 1e-5, "{label}: values");
        let w = var(99, fused.dims());
        let gf = (&fused * w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in vars.iter().enumerate() {
            let d = max_diff(
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "{label}: gradient {i} differs by {d}");
        }
    }

    #[test]
    fn causal_softmax_equals_scale_mask_softmax() {
        let (t, past) = (3, 2);
        let x = var(1, &[2, 2, t, past + t]);
        let fused = causal_softmax(x.as_tensor(), 0.125, past, None).unwrap();
        let mask = crate::ops::causal_mask(t, past, &Device::Cpu).unwrap();
        let plain = (x.as_tensor() * 0.125)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let plain = candle_nn::ops::softmax(&plain, D::Minus1).unwrap();
        check(&[&x], fused, plain, "causal softmax");
    }

    /// Gemma 3's local layers: the window's mask (transformers' sliding-window overlay) inside.
    #[test]
    fn windowed_causal_softmax_equals_scale_window_mask_softmax() {
        let (t, past, w) = (5, 3, 3);
        let x = var(11, &[2, 2, t, past + t]);
        let fused = causal_softmax(x.as_tensor(), 0.3, past, Some(w)).unwrap();
        let mask = crate::ops::causal_mask_window(t, past, w, &Device::Cpu).unwrap();
        let plain = (x.as_tensor() * 0.3).unwrap().broadcast_add(&mask).unwrap();
        let plain = candle_nn::ops::softmax(&plain, D::Minus1).unwrap();
        check(&[&x], fused, plain, "windowed causal softmax");
    }

    #[test]
    fn rms_norm_backward_is_the_same_bits_on_any_number_of_threads() {
        let x = var(7, &[300, 24]);
        let w = var(8, &[24]);
        let g = var(9, &[300, 24]);
        let grads = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
                let gs = (y * g.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let dw = gs.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
                let dx = gs.get(x.as_tensor()).unwrap().flatten_all().unwrap();
                (dw, dx.to_vec1::<f32>().unwrap())
            })
        };
        let one = grads(1);
        for threads in [2, 3, 8] {
            assert!(grads(threads) == one, "{threads} threads");
        }
    }

    #[test]
    fn rms_norm_equals_the_elementary_one() {
        let x = var(2, &[2, 3, 8]);
        let w = var(3, &[8]);
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let plain = candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        check(&[&x, &w], fused, plain, "rms norm");
    }

    #[test]
    fn silu_mul_equals_the_elementary_one() {
        let g = var(4, &[2, 3, 5]);
        let u = var(5, &[2, 3, 5]);
        let fused = silu_mul(g.as_tensor(), u.as_tensor()).unwrap();
        let plain = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
        check(&[&g, &u], fused, plain, "silu mul");
    }

    /// The fused attention core equals the decoder's elementary one (RoPE, repeated kv heads,
    /// q·kᵀ, scaled causal softmax, ·v, heads merged), values and gradients in q, k and v, for
    /// both rotation styles, grouped heads, and with keys and values rounded to f16.
    #[test]
    fn causal_attention_equals_the_elementary_one() {
        // Two blocks of query rows, the second partial.
        let (b, t, h, kh, d) = (2, QUERY_BLOCK + 6, 4, 2, 8);
        let dev = Device::Cpu;
        // The last case is Gemma 3's local layer: its own scale and a window shorter than
        // a block of query rows.
        for (style, round, scale, window) in [
            (RopeStyle::Neox, false, None, None),
            (RopeStyle::Interleaved, false, None, None),
            (RopeStyle::Interleaved, true, None, None),
            (RopeStyle::Neox, true, Some(0.2f32), Some(5)),
        ] {
            let rope = crate::ops::Rope::new(d, 10000.0, t, style, round, &dev)
                .unwrap()
                .upto(t)
                .unwrap();
            let q = var(6, &[b, t, h * d]);
            let k = var(7, &[b, t, kh * d]);
            let v = var(8, &[b, t, kh * d]);
            let plain_shape = AttnShape::causal(b, t, h, kh, d);
            let shape = AttnShape {
                scale: scale.unwrap_or(plain_shape.scale),
                window,
                ..plain_shape
            };
            let fused = causal_attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                shape,
                &rope,
                round,
            )
            .unwrap();
            let heads = |x: &Var, n: usize| {
                x.as_tensor()
                    .reshape((b, t, n, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
            };
            let qr = rope.apply(&heads(&q, h), 0).unwrap();
            let mut kr = rope.apply(&heads(&k, kh), 0).unwrap();
            let mut vr = heads(&v, kh);
            if round {
                // Straight through: the rounded value, the gradient of the identity.
                let r = |x: Tensor| {
                    let rounded = x
                        .to_dtype(DType::F16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap();
                    (&x + (rounded - &x).unwrap().detach()).unwrap()
                };
                (kr, vr) = (r(kr), r(vr));
            }
            let kr = crate::ops::repeat_kv(kr, h / kh)
                .unwrap()
                .contiguous()
                .unwrap();
            let vr = crate::ops::repeat_kv(vr, h / kh)
                .unwrap()
                .contiguous()
                .unwrap();
            let att = qr.matmul(&kr.t().unwrap()).unwrap();
            let att = causal_softmax(&att, shape.scale as f64, 0, window).unwrap();
            let plain = att
                .matmul(&vr)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap();
            check(
                &[&q, &k, &v],
                fused,
                plain,
                &format!("attention {style:?} {round} {window:?}"),
            );
        }
    }
}
