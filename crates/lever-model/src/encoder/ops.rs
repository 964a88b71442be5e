//! The memory-bound steps of the encoder layer (masked softmax, bias + GELU, bias + residual +
//! LayerNorm, per-text attention) in the two kernel sets of [`Kernels`]: candle's elementary
//! ops (differentiable) or one-pass CPU loops (fused).

use candle_core::{CpuStorage, CustomOp3, InplaceOp1, InplaceOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::model::{Kernels, LayerNorm, Mask};
use crate::error::Result;
use crate::ops::host::{f32_slice, f32_slice_mut};

/// softmax over keys with padding keys excluded, as transformers does it: finfo.min added
/// to the scores of padding keys. scores: (B, H, T, T) -> (B, H, T, T).
///
/// When the scores carry a graph (training) the softmax is candle's composite one, whose
/// backward exists: `candle_nn::ops::softmax_last_dim` is a one-pass op without a backward
/// (`apply_op1_no_bwd`), which would silently cut the gradient to the queries and keys.
pub(super) fn masked_softmax(scores: &Tensor, mask: &Mask) -> Result<Tensor> {
    let bias = ((mask.ones.ones_like()? - &mask.ones)? * f32::MIN as f64)?
        .reshape((mask.b, 1, 1, mask.t))?; // (B, 1, 1, T)
    let masked = scores.broadcast_add(&bias)?;
    Ok(if masked.track_op() {
        candle_nn::ops::softmax(&masked, candle_core::D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&masked)?
    })
}

/// gelu(x + b) with the exact (erf) GELU. x: (N, F), b: (F,). Fused: in place on x (fresh).
pub(super) fn bias_gelu(x: Tensor, b: &Tensor, k: Kernels) -> Result<Tensor> {
    Ok(match k {
        Kernels::Elementary => x.broadcast_add(b)?.gelu_erf()?,
        Kernels::Fused => {
            let x = x.contiguous()?;
            x.inplace_op1(&BiasGelu { bias: b.to_vec1()? })?;
            x
        }
    })
}

/// LayerNorm(x + b + residual). x, residual: (N, C), b: (C,). Fused: in place on x (fresh).
pub(super) fn add_norm(
    x: Tensor,
    b: &Tensor,
    residual: &Tensor,
    ln: &LayerNorm,
    k: Kernels,
) -> Result<Tensor> {
    Ok(match k {
        Kernels::Elementary => {
            let y = (x.broadcast_add(b)? + residual)?;
            candle_nn::ops::layer_norm_slow(&y, &ln.weight, &ln.bias, ln.eps)?
        }
        Kernels::Fused => {
            let x = x.contiguous()?;
            x.inplace_op2(
                &residual.contiguous()?,
                &AddNorm {
                    bias: b.to_vec1()?,
                    weight: ln.weight.to_vec1()?,
                    beta: ln.bias.to_vec1()?,
                    eps: ln.eps,
                },
            )?;
            x
        }
    })
}

/// Rows of work per rayon task for the row-wise kernels.
const ROWS_PER_TASK: usize = 16;

/// Defines a function whose body also runs in copies compiled for AVX-512 (else AVX2), picked
/// when the CPU has them. lever builds for baseline x86-64, where the row loops below (exp,
/// erf, the lane sums) vectorize 4 lanes wide; here they take 16. The lane sums fix their order
/// and nothing is contracted into FMAs, so the results are the same bits on every path.
///
/// The body is an `#[inline(always)]` function called straight from each copy: a closure
/// handed to a generic `#[target_feature]` function is not reliably inlined into it (LLVM kept
/// it out of line, compiled for the baseline, and the copy only jumped to it).
macro_rules! wide_fn {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(unsafe_code)]
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2")]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU has the features `avx512` is compiled for (checked above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above, for AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Sum and maximum in 8 independent lanes, so that the compiler vectorizes them (a single
/// f32 accumulator is a serial dependency it must keep in order).
#[inline(always)]
fn lanes_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
fn lanes_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().fold(rest, |m, x| m.max(*x))
}

#[inline(always)]
fn lanes_sum_sq(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Attention of each text over its own tokens only, so padding costs nothing and needs no
/// mask: per text and head, S = q·kᵀ (n × n, n the text's length), softmax by rows, S·v,
/// written to the head's columns of the output. q (already scaled), k, v: (B·T, C) ->
/// (B·T, C), padding rows zero. Texts run in parallel; their matrix products call gemm
/// single-threaded (candle's batched matmul would split each small product over the
/// threads and synchronize 2·B·H times per layer).
pub(super) struct TextAttention {
    pub(super) t: usize,
    pub(super) heads: usize,
    pub(super) lens: Vec<usize>,
}

impl CustomOp3 for TextAttention {
    fn name(&self) -> &'static str {
        "lever-text-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, c) = l1.shape().dims2()?;
        let (t, h) = (self.t, self.heads);
        if l2.dims() != l1.dims()
            || l3.dims() != l1.dims()
            || rows != self.lens.len() * t
            || c % h != 0
            || self.lens.iter().any(|&n| n > t)
        {
            candle_core::bail!(
                "text attention: q {:?} k {:?} v {:?}, {} texts of {t} rows, {h} heads",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                self.lens.len()
            );
        }
        let q = f32_slice(s1, l1, self.name())?;
        let k = f32_slice(s2, l2, self.name())?;
        let v = f32_slice(s3, l3, self.name())?;
        let mut out = vec![0f32; rows * c];
        out.par_chunks_mut(t * c)
            .zip(&self.lens)
            .enumerate()
            .for_each(|(i, (out, &n))| {
                let span = i * t * c..(i + 1) * t * c;
                text_attention(&q[span.clone()], &k[span.clone()], &v[span], out, n, c, h);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// One text: q, k, v and out are its (T, C) rows (row-major, C = heads·D), of which the
/// first n are tokens.
#[allow(unsafe_code)]
fn text_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    n: usize,
    c: usize,
    heads: usize,
) {
    let d = c / heads;
    // The gemm calls below read rows 0..n and columns hd..hd+D of q, k, v (each of
    // length ≥ n·C), read and write all of `scores` (n·n), and write rows 0..n, columns
    // hd..hd+D of `out`; these checks make every such index in bounds.
    assert!(d * heads == c && q.len() >= n * c && k.len() >= n * c && v.len() >= n * c);
    assert!(out.len() >= n * c);
    let mut scores = vec![0f32; n * n];
    let (ci, ni) = (c as isize, n as isize);
    for hd in (0..c).step_by(d) {
        // SAFETY: bounds as checked above; `scores` and `out` are exclusively borrowed and
        // do not overlap the inputs. gemm: dst[i·rs + j·cs] = Σ lhs[i·rs + l·cs]·rhs[l·rs + j·cs].
        unsafe {
            // scores (n, n) = q_h (n, D) · k_hᵀ (D, n)
            gemm::gemm(
                n,
                n,
                d,
                scores.as_mut_ptr(),
                1,
                ni,
                false,
                q.as_ptr().add(hd),
                1,
                ci,
                k.as_ptr().add(hd),
                ci,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        softmax_rows(&mut scores, n);
        // SAFETY: as above.
        unsafe {
            // out_h (n, D) = probs (n, n) · v_h (n, D)
            gemm::gemm(
                n,
                d,
                n,
                out.as_mut_ptr().add(hd),
                1,
                ci,
                false,
                scores.as_ptr(),
                1,
                ni,
                v.as_ptr().add(hd),
                1,
                ci,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

wide_fn! {
    /// Softmax of each row of n; `scores` holds whole rows.
    fn softmax_rows(scores: &mut [f32], n: usize) {
        // Plain loops, not `for_each`: its fold stays out of line, outside the wide copies.
        for row in scores.chunks_mut(n) {
            softmax_in_place(row);
        }
    }
}

wide_fn! {
    /// gelu(x + b) on each row of `rows` (whole rows of the bias' width).
    fn bias_gelu_rows(rows: &mut [f32], bias: &[f32]) {
        for row in rows.chunks_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu(*v + b);
            }
        }
    }
}

#[inline(always)]
fn softmax_in_place(x: &mut [f32]) {
    let max = lanes_max(x);
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / lanes_sum(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

struct BiasGelu {
    bias: Vec<f32>,
}

impl InplaceOp1 for BiasGelu {
    fn name(&self) -> &'static str {
        "lever-bias-gelu"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let f = self.bias.len();
        if l.dims().last() != Some(&f) {
            candle_core::bail!("bias gelu: {:?} with a bias of {f}", l.dims());
        }
        let x = f32_slice_mut(s, l, self.name())?;
        x.par_chunks_mut(f * ROWS_PER_TASK)
            .for_each(|rows| bias_gelu_rows(rows, &self.bias));
        Ok(())
    }
}

struct AddNorm {
    bias: Vec<f32>,
    weight: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

wide_fn! {
    /// LayerNorm(x + b + r) in place on xs; xs, rs: whole rows of width C.
    fn add_norm_rows(op: &AddNorm, xs: &mut [f32], rs: &[f32]) {
        let c = op.weight.len();
        for (x, r) in xs.chunks_mut(c).zip(rs.chunks(c)) {
            for ((x, r), b) in x.iter_mut().zip(r).zip(&op.bias) {
                *x += b + r;
            }
            let mean = lanes_sum(x) / c as f32;
            for v in x.iter_mut() {
                *v -= mean;
            }
            let inv = 1.0 / (lanes_sum_sq(x) / c as f32 + op.eps).sqrt();
            for ((v, w), b) in x.iter_mut().zip(&op.weight).zip(&op.beta) {
                *v = *v * inv * w + b;
            }
        }
    }
}

impl InplaceOp2 for AddNorm {
    fn name(&self) -> &'static str {
        "lever-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let c = self.weight.len();
        if l1.dims() != l2.dims() || l1.dims().last() != Some(&c) || self.bias.len() != c {
            candle_core::bail!("add-norm: {:?} + {:?}, width {c}", l1.dims(), l2.dims());
        }
        let r = f32_slice(s2, l2, self.name())?;
        let x = f32_slice_mut(s1, l1, self.name())?;
        x.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(r.par_chunks(c * ROWS_PER_TASK))
            .for_each(|(xs, rs)| add_norm_rows(self, xs, rs));
        Ok(())
    }
}

/// e^x in f32 from arithmetic only (so loops over it vectorize): Cephes `expf` — range
/// reduction x = n·ln2 + r, a degree-6 polynomial for e^r, then 2^n in the exponent bits.
/// Relative error < 2e-7 on [-87, 88].
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.0, 88.0);
    let fx = x * LOG2E + 0.5;
    // floor without a library call: truncate, then step down for negatives.
    let t = fx as i32;
    let n = if (t as f32) > fx { t - 1 } else { t };
    let nf = n as f32;
    let r = x - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    y * f32::from_bits(((n + 127) as u32) << 23)
}

/// erf(x) in f32 (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7), arithmetic only.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let e = 1.0 - poly * exp(-a * a);
    e.copysign(x)
}

/// The exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)) (Hendrycks & Gimpel 2016).
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_erf_match_the_library_ones() {
        let mut worst_exp = 0f32;
        let mut worst_erf = 0f64;
        for i in -8000..=1000 {
            let x = i as f32 * 0.01;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst_exp = worst_exp.max(rel as f32);
        }
        for i in -600..=600 {
            let x = i as f32 * 0.01;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst_erf = worst_erf.max((erf(x) as f64 - want).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 3e-7, "erf absolute error {worst_erf}");
    }
}
