//! Fused operations with their own backward pass, for training on CPU: causal softmax (scale
//! and mask inside), RMS norm and SwiGLU. The elementary candle versions keep four to six
//! intermediate tensors of each activation alive until the backward pass; these keep their
//! input and output only, which is most of a training step's memory and much of its time.
//! Each is checked against the elementary version (values and gradients) in the tests below.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expects f32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: expects a contiguous tensor");
    };
    Ok(&v[a..b])
}

/// softmax(scale · x + causal mask) over the last dimension of (..., T, P) scores, where
/// query i (of T) sits at position past + i and sees keys 0..=past + i.
#[derive(Debug, Clone, Copy)]
struct CausalSoftmax {
    scale: f32,
    past: usize,
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
                let max = x[..keys]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, v| m.max(v * self.scale));
                let mut sum = 0f32;
                for (y, x) in y[..keys].iter_mut().zip(&x[..keys]) {
                    *y = (x * self.scale - max).exp();
                    sum += *y;
                }
                y[..keys].iter_mut().for_each(|y| *y /= sum);
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
/// positions past.., normalized. Differentiable.
pub fn causal_softmax(scores: &Tensor, scale: f64, past: usize) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
        past,
    })
}

/// y = x / rms(x) ⊙ w over the last dimension.
#[derive(Debug, Clone, Copy)]
struct RmsNorm(f32);

impl RmsNorm {
    fn inv_rms(&self, x: &[f32]) -> f32 {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        1.0 / (ms + self.0).sqrt()
    }
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
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(y, x)| {
            let r = self.inv_rms(x);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // n = x·r, y = n ⊙ w: dw = Σ_rows g ⊙ n; dx = r · (g⊙w − n · mean(g⊙w⊙n)).
        let c = w.elem_count();
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let gs = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.len()];
        let dws: Vec<Vec<f32>> = dx
            .par_chunks_mut(c)
            .zip(xs.par_chunks(c).zip(gs.par_chunks(c)))
            .fold(
                || vec![0f32; c],
                |mut dw, (dx, (x, g))| {
                    let r = self.inv_rms(x);
                    let mut dot = 0f32;
                    for i in 0..c {
                        let n = x[i] * r;
                        dw[i] += g[i] * n;
                        dot += g[i] * ws[i] * n;
                    }
                    let mean = dot / c as f32;
                    for i in 0..c {
                        dx[i] = r * (g[i] * ws[i] - x[i] * r * mean);
                    }
                    dw
                },
            )
            .collect();
        let mut dw = vec![0f32; c];
        for part in dws {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMS norm over the last dimension with weight w: (C,). Differentiable in x and w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm(eps))
}

/// SwiGLU's product silu(g) ⊙ u.
#[derive(Debug, Clone, Copy)]
struct SiluMul;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
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
        y.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(y, (g, u))| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(*g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gs = g.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let us = u.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ds = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dg = vec![0f32; gs.len()];
        let mut du = vec![0f32; gs.len()];
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(
                gs.par_chunks(4096)
                    .zip(us.par_chunks(4096))
                    .zip(ds.par_chunks(4096)),
            )
            .for_each(|((dg, du), ((g, u), d))| {
                for i in 0..g.len() {
                    let s = sigmoid(g[i]);
                    du[i] = d[i] * g[i] * s;
                    dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// silu(g) ⊙ u, differentiable in both.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn var(seed: u64, shape: &[usize]) -> Var {
        let mut rng = crate::weights::SplitMix64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
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
        let fused = causal_softmax(x.as_tensor(), 0.125, past).unwrap();
        let mask = crate::ops::causal_mask(t, past, &Device::Cpu).unwrap();
        let plain = (x.as_tensor() * 0.125)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let plain = candle_nn::ops::softmax(&plain, D::Minus1).unwrap();
        check(&[&x], fused, plain, "causal softmax");
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
}
