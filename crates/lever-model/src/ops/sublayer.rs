//! A decoder block's two residual halves, each as one training op with its own backward, for
//! the training path on the CPU when every projection is a plain trainable f32 weight
//! (pretraining, full fine-tuning):
//!
//! - attention: x + o(attention(q(n), k(n), v(n))), n = rms_norm(x) ⊙ w (the attention core
//!   is [`CausalAttention`]: RoPE, grouped heads, causal softmax);
//! - MLP: x + down(silu(gate(n)) ⊙ up(n)).
//!
//! The same arithmetic as the block's separate ops (the same kernels: [`rms_norm_rows`],
//! [`gemm_into`], [`CausalAttention`], [`silu_mul_rows`]), but one graph node per half
//! instead of about ten. For each node candle's backward allocates a zeroed gradient and adds
//! the incoming one into it, per input; at a small model's sizes (768 × 128 activations) that
//! bookkeeping, and the thread hand-offs of candle's element-wise ops (its own spinning pool
//! beside rayon's), took about as long as the matrix products. Here the backward of a half is
//! a straight sequence of products over activations the forward kept in the op (as llm.c's
//! `gpt2_backward` reads what `gpt2_forward` stored; at short contexts the attention
//! probabilities too, see `CausalAttention::forward_kept`): weight gradients go to each
//! layer's `WeightGrad` slot (`linear.rs`), the norm weight's and x's to candle.
//!
//! Dimensions: M rows (B·T), C width, Q = H·D query width, K = KVH·D key/value width, F MLP
//! width.

use std::sync::{Mutex, MutexGuard};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::grad::{
    AttnKept, CausalAttention, rms_norm_backward_rows, rms_norm_rows, silu_mul_backward_rows,
    silu_mul_rows,
};
use super::host::{Gemm, Mat, f32_slice, gemm_into, gemm_new, with_host};
use crate::linear::TrainedWeight;

/// y (M, N) = x (M, K) · Wᵀ for W (N, K).
fn project(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    gemm_new(Mat::rows(x, k), Mat::t(w, k), Gemm::new(m, n, k))
}

/// dW (N, K) = dyᵀ · x for dy (M, N), x (M, K), as a tensor shaped like W, into W's slot.
fn weight_grad(tw: &TrainedWeight, dy: &[f32], x: &[f32], m: usize) -> Result<()> {
    let (n, k) = tw.w.dims2()?;
    let dw = gemm_new(Mat::t(dy, n), Mat::rows(x, k), Gemm::new(n, k, m));
    tw.grad.add(Tensor::from_vec(dw, (n, k), tw.w.device())?)
}

/// dx (M, K) = dy (M, N) · W for W (N, K).
fn back_project(dy: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    gemm_new(Mat::rows(dy, n), Mat::rows(w, k), Gemm::new(m, k, n))
}

/// dx (M, K) += dy (M, N) · W for W (N, K).
fn back_project_add(dx: &mut [f32], dy: &[f32], w: &[f32], m: usize, n: usize, k: usize) {
    let g = Gemm::new(m, k, n).accumulate();
    gemm_into(dx, Mat::rows(dy, n), Mat::rows(w, k), g);
}

/// What a half's forward keeps for its backward.
fn kept<T>(slot: &Mutex<Option<T>>) -> MutexGuard<'_, Option<T>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Check that a weight is (out, in) and return out.
fn rows_of(w: &[f32], inputs: usize, what: &str) -> Result<usize> {
    if inputs == 0 || !w.len().is_multiple_of(inputs) {
        candle_core::bail!("{what}: a weight of {} values for {inputs} inputs", w.len());
    }
    Ok(w.len() / inputs)
}

/// The attention half of a block: x (B, T, C) + o(attention(q(n), k(n), v(n))).
#[derive(Debug)]
struct AttentionHalf {
    eps: f32,
    attn: CausalAttention,
    /// q, k, v, o.
    proj: [TrainedWeight; 4],
    saved: Mutex<Option<AttentionSaved>>,
}

#[derive(Debug)]
struct AttentionSaved {
    n: Vec<f32>, // (M, C) normed input
    r: Vec<f32>, // (M,) 1/rms per row
    core: AttnKept,
    y: Vec<f32>, // (M, Q) attention output
}

impl CustomOp2 for AttentionHalf {
    fn name(&self) -> &'static str {
        "lever-attention-half"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, nw) = (f32_slice(s1, l1, name)?, f32_slice(s2, l2, name)?);
        let c = nw.len();
        if l1.dims().last() != Some(&c) {
            candle_core::bail!("{name}: input {:?} for a norm of {c}", l1.dims());
        }
        let m = x.len() / c;
        let [pq, pk, pv, po] = &self.proj;
        let (out, saved) = with_host(&[&pq.w, &pk.w, &pv.w, &po.w], name, |w| {
            let (qd, kd) = (rows_of(w[0], c, name)?, rows_of(w[1], c, name)?);
            if rows_of(w[2], c, name)? != kd || w[3].len() != c * qd {
                candle_core::bail!("{name}: projections do not fit a width of {c}");
            }
            let mut n = vec![0f32; m * c];
            let mut r = vec![0f32; m];
            rms_norm_rows(x, nw, self.eps, &mut n, &mut r);
            let q = project(&n, w[0], m, qd, c); // (M, Q)
            let k = project(&n, w[1], m, kd, c); // (M, K)
            let v = project(&n, w[2], m, kd, c); // (M, K)
            let (y, core) = self.attn.forward_kept(&q, &k, &v); // (M, Q)
            let mut out = x.to_vec(); // the residual
            gemm_into(
                &mut out,
                Mat::rows(&y, qd),
                Mat::t(w[3], qd),
                Gemm::new(m, c, qd).accumulate(),
            );
            Ok((out, AttentionSaved { n, r, core, y }))
        })?;
        *kept(&self.saved) = Some(saved);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        nw: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let saved = kept(&self.saved);
        let Some(s) = saved.as_ref() else {
            candle_core::bail!("{name}: backward without a forward");
        };
        let grad = grad.contiguous()?;
        let [pq, pk, pv, po] = &self.proj;
        let (dx, dnw) = with_host(&[x, nw, &grad, &pq.w, &pk.w, &pv.w, &po.w], name, |h| {
            let (xs, nws, g) = (h[0], h[1], h[2]);
            let (wq, wk, wv, wo) = (h[3], h[4], h[5], h[6]);
            let c = nws.len();
            let m = xs.len() / c;
            let qd = s.y.len() / m;
            let kd = wk.len() / c;
            // out = x + y·Woᵀ: dWo = gᵀ·y, dy = g·Wo.
            weight_grad(po, g, &s.y, m)?;
            let dy = back_project(g, wo, m, c, qd);
            let (dq, dk, dv) = self.attn.backward_kept(&s.core, &dy);
            // q = n·Wqᵀ etc.: dW = dqᵀ·n; dn = dq·Wq + dk·Wk + dv·Wv.
            weight_grad(pq, &dq, &s.n, m)?;
            weight_grad(pk, &dk, &s.n, m)?;
            weight_grad(pv, &dv, &s.n, m)?;
            let mut dn = back_project(&dq, wq, m, qd, c);
            back_project_add(&mut dn, &dk, wk, m, kd, c);
            back_project_add(&mut dn, &dv, wv, m, kd, c);
            let mut dx = g.to_vec(); // the residual's gradient
            let dnw = rms_norm_backward_rows(xs, nws, &s.r, &dn, &mut dx);
            Ok((dx, dnw))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dnw, nw.shape(), nw.device())?),
        ))
    }
}

/// The MLP half of a block: x (B, T, C) + down(silu(gate(n)) ⊙ up(n)).
#[derive(Debug)]
struct MlpHalf {
    eps: f32,
    /// gate, up, down.
    proj: [TrainedWeight; 3],
    saved: Mutex<Option<MlpSaved>>,
}

#[derive(Debug)]
struct MlpSaved {
    n: Vec<f32>, // (M, C)
    r: Vec<f32>, // (M,)
    g: Vec<f32>, // (M, F) gate
    u: Vec<f32>, // (M, F) up
    h: Vec<f32>, // (M, F) silu(g) ⊙ u
}

impl CustomOp2 for MlpHalf {
    fn name(&self) -> &'static str {
        "lever-mlp-half"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, nw) = (f32_slice(s1, l1, name)?, f32_slice(s2, l2, name)?);
        let c = nw.len();
        if l1.dims().last() != Some(&c) {
            candle_core::bail!("{name}: input {:?} for a norm of {c}", l1.dims());
        }
        let m = x.len() / c;
        let [pg, pu, pd] = &self.proj;
        let (out, saved) = with_host(&[&pg.w, &pu.w, &pd.w], name, |w| {
            let f = rows_of(w[0], c, name)?;
            if w[1].len() != f * c || w[2].len() != c * f {
                candle_core::bail!("{name}: projections do not fit a width of {c}");
            }
            let mut n = vec![0f32; m * c];
            let mut r = vec![0f32; m];
            rms_norm_rows(x, nw, self.eps, &mut n, &mut r);
            let g = project(&n, w[0], m, f, c); // (M, F)
            let u = project(&n, w[1], m, f, c); // (M, F)
            let mut h = vec![0f32; m * f];
            silu_mul_rows(&g, &u, &mut h);
            let mut out = x.to_vec(); // the residual
            gemm_into(
                &mut out,
                Mat::rows(&h, f),
                Mat::t(w[2], f),
                Gemm::new(m, c, f).accumulate(),
            );
            Ok((out, MlpSaved { n, r, g, u, h }))
        })?;
        *kept(&self.saved) = Some(saved);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        nw: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let saved = kept(&self.saved);
        let Some(s) = saved.as_ref() else {
            candle_core::bail!("{name}: backward without a forward");
        };
        let grad = grad.contiguous()?;
        let [pg, pu, pd] = &self.proj;
        let (dx, dnw) = with_host(&[x, nw, &grad, &pg.w, &pu.w, &pd.w], name, |h| {
            let (xs, nws, g) = (h[0], h[1], h[2]);
            let (wg, wu, wd) = (h[3], h[4], h[5]);
            let c = nws.len();
            let m = xs.len() / c;
            let f = s.g.len() / m;
            // out = x + h·Wdᵀ: dWd = gᵀ·h, dh = g·Wd.
            weight_grad(pd, g, &s.h, m)?;
            let dh = back_project(g, wd, m, c, f);
            let (mut dgate, mut dup) = (vec![0f32; m * f], vec![0f32; m * f]);
            silu_mul_backward_rows(&s.g, &s.u, &dh, &mut dgate, &mut dup);
            drop(dh);
            weight_grad(pg, &dgate, &s.n, m)?;
            weight_grad(pu, &dup, &s.n, m)?;
            let mut dn = back_project(&dgate, wg, m, f, c);
            back_project_add(&mut dn, &dup, wu, m, f, c);
            let mut dx = g.to_vec(); // the residual's gradient
            let dnw = rms_norm_backward_rows(xs, nws, &s.r, &dn, &mut dx);
            Ok((dx, dnw))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dnw, nw.shape(), nw.device())?),
        ))
    }
}

/// x + o(attention(q(n), k(n), v(n))) with n = rms_norm(x) ⊙ norm, x: (B, T, C), as one op
/// differentiable in x and norm; the projections' gradients go to their slots.
pub(crate) fn attention_half(
    x: &Tensor,
    norm: &Tensor,
    eps: f32,
    attn: CausalAttention,
    proj: [TrainedWeight; 4],
) -> Result<Tensor> {
    let op = AttentionHalf {
        eps,
        attn,
        proj,
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&norm.contiguous()?, op)
}

/// x + down(silu(gate(n)) ⊙ up(n)) with n = rms_norm(x) ⊙ norm, x: (B, T, C), as one op
/// differentiable in x and norm; the projections' gradients go to their slots.
pub(crate) fn mlp_half(
    x: &Tensor,
    norm: &Tensor,
    eps: f32,
    proj: [TrainedWeight; 3],
) -> Result<Tensor> {
    let op = MlpHalf {
        eps,
        proj,
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&norm.contiguous()?, op)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::linear::{Linear, Weight};
    use crate::ops::grad::{self, AttnShape};
    use crate::ops::{Rope, RopeStyle, RopeTables};
    use crate::testing::max_abs_diff_tensors as max_diff;
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};

    const EPS: f32 = 1e-5;

    /// A tiny block's trainable weights: the two norms and q, k, v, o, gate, up, down.
    struct Weights {
        norms: [Var; 2],
        proj: Vec<Var>,
        shape: AttnShape,
        rope: std::sync::Arc<RopeTables>,
        round_kv: bool,
    }

    fn var(seed: u64, shape: &[usize], scale: f32, shift: f32) -> Var {
        let mut rng = crate::rng::SplitMix64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() * scale + shift).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    impl Weights {
        /// Width 16 (4 heads of 4, 2 kv heads), MLP 24, batch 2 of 5 tokens.
        fn new(style: RopeStyle, round_kv: bool) -> Self {
            let (b, t, h, kh, d, f) = (2, 5, 4, 2, 4, 24);
            let c = h * d;
            let shapes = [
                [h * d, c],
                [kh * d, c],
                [kh * d, c],
                [c, h * d],
                [f, c],
                [f, c],
                [c, f],
            ];
            let proj = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| var(20 + i as u64, s, 0.3, 0.0))
                .collect();
            let rope = Rope::new(d, 10_000.0, t, style, round_kv, &Device::Cpu)
                .unwrap()
                .upto(t)
                .unwrap();
            Weights {
                norms: [var(10, &[c], 0.2, 1.0), var(11, &[c], 0.2, 1.0)],
                proj,
                shape: AttnShape::causal(b, t, h, kh, d),
                rope,
                round_kv,
            }
        }

        /// Linear layers on the weights, each collecting its weight gradient.
        fn linears(&self) -> Vec<Linear> {
            self.proj
                .iter()
                .map(|w| {
                    let mut l = Linear::new(Weight::Float(w.as_tensor().clone()), None).unwrap();
                    l.collect_weight_grad();
                    l
                })
                .collect()
        }

        fn fused(&self, x: &Tensor, ls: &[Linear]) -> Tensor {
            let tw: Vec<TrainedWeight> = ls.iter().map(|l| l.trained_weight().unwrap()).collect();
            let core = CausalAttention::new(self.shape, &self.rope, self.round_kv).unwrap();
            let attn = [tw[0].clone(), tw[1].clone(), tw[2].clone(), tw[3].clone()];
            let x = attention_half(x, self.norms[0].as_tensor(), EPS, core, attn).unwrap();
            let mlp = [tw[4].clone(), tw[5].clone(), tw[6].clone()];
            mlp_half(&x, self.norms[1].as_tensor(), EPS, mlp).unwrap()
        }

        /// The block as the decoder computes it op by op.
        fn separate(&self, x: &Tensor, ls: &[Linear]) -> Tensor {
            let n = grad::rms_norm(x, self.norms[0].as_tensor(), EPS).unwrap();
            let (q, k, v) = (
                ls[0].forward(&n).unwrap(),
                ls[1].forward(&n).unwrap(),
                ls[2].forward(&n).unwrap(),
            );
            let y =
                grad::causal_attention(&q, &k, &v, self.shape, &self.rope, self.round_kv).unwrap();
            let x = (x + ls[3].forward(&y).unwrap()).unwrap();
            let n = grad::rms_norm(&x, self.norms[1].as_tensor(), EPS).unwrap();
            let h =
                grad::silu_mul(&ls[4].forward(&n).unwrap(), &ls[5].forward(&n).unwrap()).unwrap();
            (&x + ls[6].forward(&h).unwrap()).unwrap()
        }

        /// Gradients of Σ out ⊙ weights, the layers' collected ones moved in.
        fn grads(&self, out: &Tensor, ls: &[Linear], weights: &Tensor) -> GradStore {
            let mut g = (out * weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for l in ls {
                l.take_weight_grad(&mut g).unwrap();
            }
            g
        }

        fn all_vars<'a>(&'a self, x: &'a Var) -> Vec<&'a Var> {
            let mut v = vec![x, &self.norms[0], &self.norms[1]];
            v.extend(self.proj.iter());
            v
        }
    }

    /// Both halves fused give the values and the gradients (x, both norms, all seven
    /// projections) of the separate ops within 1e-5, with grouped heads, both rotation
    /// styles, and keys and values rounded to f16.
    #[test]
    fn fused_halves_equal_the_separate_ops() {
        for (style, round) in [(RopeStyle::Neox, false), (RopeStyle::Interleaved, true)] {
            let w = Weights::new(style, round);
            let x = var(1, &[2, 5, 16], 1.0, 0.0);
            let weights = var(2, &[2, 5, 16], 1.0, 0.0);
            let (lf, ls) = (w.linears(), w.linears());
            let fused = w.fused(x.as_tensor(), &lf);
            let plain = w.separate(x.as_tensor(), &ls);
            let d = max_diff(&fused, &plain);
            assert!(d < 1e-5, "values differ by {d}");
            let gf = w.grads(&fused, &lf, weights.as_tensor());
            let gp = w.grads(&plain, &ls, weights.as_tensor());
            for (i, v) in w.all_vars(&x).into_iter().enumerate() {
                let (a, b) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gp.get(v.as_tensor()).unwrap(),
                );
                let d = max_diff(a, b);
                assert!(d < 1e-5, "{style:?} {round}: gradient {i} differs by {d}");
            }
        }
    }

    /// Against central finite differences of the loss (in f64 from f32 evaluations) for a
    /// few entries of x, a norm weight and every projection.
    #[test]
    fn fused_halves_gradients_match_finite_differences() {
        let w = Weights::new(RopeStyle::Neox, false);
        let x = var(3, &[2, 5, 16], 1.0, 0.0);
        let weights = var(4, &[2, 5, 16], 1.0, 0.0);
        let lf = w.linears();
        let loss = |x: &Tensor| -> f64 {
            let out = w.fused(x, &lf);
            (out * weights.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let g = w.grads(&w.fused(x.as_tensor(), &lf), &lf, weights.as_tensor());
        let h = 1e-2f32;
        for (i, v) in w.all_vars(&x).into_iter().enumerate() {
            let analytic = g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            let analytic = analytic.to_vec1::<f32>().unwrap();
            let n = analytic.len();
            for j in [0, n / 3, n - 1] {
                let base = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let at = |delta: f32| {
                    let mut p = base.clone();
                    p[j] += delta;
                    v.set(&Tensor::from_vec(p, v.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    let l = loss(x.as_tensor());
                    v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    l
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
                let a = analytic[j] as f64;
                assert!(
                    (numeric - a).abs() < 2e-2 * (1.0 + a.abs()),
                    "variable {i}, entry {j}: finite differences {numeric}, backward {a}"
                );
            }
        }
    }

    /// The gradients are the same bits on any number of threads (a resumed run must repeat
    /// an uninterrupted one exactly).
    #[test]
    fn fused_halves_backward_is_the_same_bits_on_any_number_of_threads() {
        let w = Weights::new(RopeStyle::Interleaved, false);
        let x = var(5, &[2, 5, 16], 1.0, 0.0);
        let weights = var(6, &[2, 5, 16], 1.0, 0.0);
        let grads = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let lf = w.linears();
                let g = w.grads(&w.fused(x.as_tensor(), &lf), &lf, weights.as_tensor());
                w.all_vars(&x)
                    .into_iter()
                    .map(|v| {
                        let t = g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
                        t.to_vec1::<f32>().unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        };
        let one = grads(1);
        for threads in [2, 3] {
            assert!(grads(threads) == one, "{threads} threads");
        }
    }
}
