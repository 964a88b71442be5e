//! AdamW with decoupled weight decay (Loshchilov & Hutter, arXiv:1711.05101), written out so
//! that its state (step count, first and second moments) can be saved and restored exactly;
//! the update is PyTorch's `torch.optim.AdamW` (amsgrad off):
//!   θ ← θ·(1 − lr·λ);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
//!   θ ← θ − lr·(m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)
//!
//! A contiguous f32 CPU variable (every variable lever trains today) is updated by one fused
//! pass that reads the gradient once and writes θ, m and v in place, in the same f32 operations
//! as the tensor formula: as a chain of candle ops the step made about fourteen full-size
//! temporaries per variable, a 540 MB pass each at 135M parameters, which cost fine-tuning
//! more than the optimizer's arithmetic. Any other variable (another device or dtype) takes
//! the tensor formula, which is also the fused pass's reference in the tests.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::error::Result;

/// Elements per parallel work item of the fused kernels: big enough to amortise the
/// scheduling, small enough to split the 576-wide norms from the 28M-element embedding.
const CHUNK: usize = 1 << 15;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One variable's first and second moments.
enum Moments {
    /// Plain buffers the fused pass updates in place (contiguous f32 CPU variables).
    Fused { m: Vec<f32>, v: Vec<f32> },
    /// Tensors the tensor formula replaces each step (anything else).
    Tensors { m: Tensor, v: Tensor },
}

pub struct AdamW {
    pub params: AdamWParams,
    vars: Vec<Var>,
    state: Vec<Moments>,
    /// Whether each variable takes weight decay (all of them unless `decay_only` says).
    decays: Vec<bool>,
    /// Each variable's learning rate as a multiple of `params.lr` (1 unless `lr_scales` says).
    lr_scales: Vec<f64>,
    /// Updates applied so far.
    pub t: usize,
}

/// Whether `t` can be updated in place by the fused pass.
fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<AdamW> {
        Self::with_moments(vars, params, true)
    }

    /// The same optimizer with every variable on the tensor formula: the fused pass's
    /// reference in tests.
    #[cfg(test)]
    fn new_unfused(vars: Vec<Var>, params: AdamWParams) -> Result<AdamW> {
        Self::with_moments(vars, params, false)
    }

    /// Zero moments, kept as plain vectors for the fused pass where `fuse` allows it.
    fn with_moments(vars: Vec<Var>, params: AdamWParams, fuse: bool) -> Result<AdamW> {
        let state = vars
            .iter()
            .map(|var| {
                Ok(if fuse && fusable(var.as_tensor()) {
                    let n = var.elem_count();
                    Moments::Fused {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    Moments::Tensors {
                        m: var.as_tensor().zeros_like()?,
                        v: var.as_tensor().zeros_like()?,
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            decays: vec![true; vars.len()],
            lr_scales: vec![1.0; vars.len()],
            vars,
            state,
            t: 0,
        })
    }

    /// Weight decay only on the variables `decays` marks (one flag per variable, in order):
    /// nanoGPT's two parameter groups, matrices decayed, norms and biases not.
    pub fn decay_only(mut self, decays: Vec<bool>) -> Result<AdamW> {
        if decays.len() != self.vars.len() {
            return Err(crate::Error::Config {
                what: "optimizer".into(),
                problem: format!(
                    "{} weight-decay flags for {} variables",
                    decays.len(),
                    self.vars.len()
                ),
            });
        }
        self.decays = decays;
        Ok(self)
    }

    /// Per-variable learning rates, as multiples of the schedule's (one per variable, in
    /// order): parameter groups, e.g. a pretrained encoder fine-tuned at a tenth of an
    /// adapter's rate.
    pub fn lr_scales(mut self, scales: Vec<f64>) -> Result<AdamW> {
        if scales.len() != self.vars.len() {
            return Err(crate::Error::Config {
                what: "optimizer".into(),
                problem: format!(
                    "{} learning-rate scales for {} variables",
                    scales.len(),
                    self.vars.len()
                ),
            });
        }
        self.lr_scales = scales;
        Ok(self)
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One update from the gradients of the variables (those without one are left alone).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// One update from the gradients multiplied by `scale`. Clipping by global norm passes
    /// its factor here, so no scaled copy of the gradients is ever made; a scale of 1 leaves
    /// them exactly as they are.
    pub fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<()> {
        self.t += 1;
        let c1 = 1.0 - self.params.beta1.powi(self.t as i32);
        let c2 = 1.0 - self.params.beta2.powi(self.t as i32);
        let per_var = self.vars.iter().zip(&mut self.state).zip(&self.decays);
        for (((var, state), &decays), &lr_scale) in per_var.zip(&self.lr_scales) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = AdamWParams {
                lr: self.params.lr * lr_scale,
                weight_decay: if decays {
                    self.params.weight_decay
                } else {
                    0.0
                },
                ..self.params
            };
            match state {
                Moments::Fused { m, v } => {
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    let k = Coefficients::new(&p, c1, c2, scale);
                    let op = FusedStep {
                        m: RefCell::new(m),
                        v: RefCell::new(v),
                        k,
                    };
                    var.as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Tensors { m, v } => {
                    let scaled;
                    let g = if scale == 1.0 {
                        g
                    } else {
                        scaled = (g * scale)?;
                        &scaled
                    };
                    let theta = tensor_step(var.as_tensor(), m, v, g, &p, c1, c2)?;
                    var.set(&theta)?;
                }
            }
        }
        Ok(())
    }

    /// The moments, in variable order, for checkpoints (copies of the fused pass's buffers).
    pub fn moments(&self) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (mut ms, mut vs) = (Vec::new(), Vec::new());
        for (var, state) in self.vars.iter().zip(&self.state) {
            let (m, v) = match state {
                Moments::Fused { m, v } => (
                    Tensor::from_slice(m, var.shape(), &Device::Cpu)?,
                    Tensor::from_slice(v, var.shape(), &Device::Cpu)?,
                ),
                Moments::Tensors { m, v } => (m.clone(), v.clone()),
            };
            ms.push(m);
            vs.push(v);
        }
        Ok((ms, vs))
    }

    /// Restore moments and step count saved by `moments`.
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, t: usize) -> Result<()> {
        for (i, (a, b)) in m.iter().zip(&v).enumerate() {
            let want = self.vars[i].shape();
            if a.shape() != want || b.shape() != want {
                return Err(crate::Error::Config {
                    what: "checkpoint".into(),
                    problem: format!(
                        "optimizer moment {i} has shape {:?}, the variable {:?}",
                        a.dims(),
                        want.dims()
                    ),
                });
            }
        }
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            return Err(crate::Error::Config {
                what: "checkpoint".into(),
                problem: format!(
                    "{} optimizer moments for {} variables",
                    m.len(),
                    self.vars.len()
                ),
            });
        }
        for ((state, m), v) in self.state.iter_mut().zip(m).zip(v) {
            *state = match state {
                Moments::Fused { .. } => Moments::Fused {
                    m: m.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
                    v: v.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
                },
                Moments::Tensors { .. } => Moments::Tensors { m, v },
            };
        }
        self.t = t;
        Ok(())
    }
}

/// The tensor formula: updates `m` and `v` and returns the new θ.
fn tensor_step(
    theta: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    g: &Tensor,
    p: &AdamWParams,
    c1: f64,
    c2: f64,
) -> Result<Tensor> {
    *m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
    *v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
    let denom = ((&*v / c2)?.sqrt()? + p.eps)?;
    let update = ((&*m / c1)? / denom)?;
    let theta = (theta * (1.0 - p.lr * p.weight_decay))?;
    Ok((theta - (update * p.lr)?)?)
}

/// The step's scalars as f32, rounded as candle rounds a tensor-by-f64 operation
/// (`x * a` is `affine(a, 0)`, `x / a` is `affine(1/a, 0)`), so the fused pass does the
/// tensor formula's f32 operations in the same order.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_c1: f32,
    inv_c2: f32,
    eps: f32,
    decay: f32,
    lr: f32,
}

impl Coefficients {
    fn new(p: &AdamWParams, c1: f64, c2: f64, scale: f64) -> Coefficients {
        Coefficients {
            scale: scale as f32,
            beta1: p.beta1 as f32,
            one_minus_beta1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
            inv_c1: (1.0 / c1) as f32,
            inv_c2: (1.0 / c2) as f32,
            eps: p.eps as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            lr: p.lr as f32,
        }
    }

    /// One chunk of the update, every slice the same length.
    fn apply(&self, theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let k = *self;
        for (((theta, &g), m), v) in theta.iter_mut().zip(g).zip(m).zip(v) {
            let g = g * k.scale;
            *m = *m * k.beta1 + g * k.one_minus_beta1;
            *v = *v * k.beta2 + (g * g) * k.one_minus_beta2;
            let denom = (*v * k.inv_c2).sqrt() + k.eps;
            let update = (*m * k.inv_c1) / denom;
            *theta = *theta * k.decay - update * k.lr;
        }
    }
}

/// The fused update as a candle in-place op on θ, reading the gradient and holding the
/// moment buffers (candle lends the op only its destination mutably).
struct FusedStep<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    k: Coefficients,
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-fused-step"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        theta_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(g)) = (theta, g) else {
            candle_core::bail!("{}: θ and its gradient must be f32", self.name())
        };
        let (Some((t0, t1)), Some((g0, g1))) =
            (theta_l.contiguous_offsets(), g_l.contiguous_offsets())
        else {
            candle_core::bail!("{}: θ and its gradient must be contiguous", self.name())
        };
        let (theta, g) = (&mut theta[t0..t1], &g[g0..g1]);
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if g.len() != theta.len() || m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!(
                "{}: θ has {} elements, its gradient {}, the moments {} and {}",
                self.name(),
                theta.len(),
                g.len(),
                m.len(),
                v.len()
            )
        }
        let k = self.k;
        theta
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((theta, g), m), v)| k.apply(theta, g, m, v));
        Ok(())
    }
}

/// Σ g² over every element of `g`, accumulated in f64 (one read pass for a contiguous f32
/// CPU tensor; chunks are summed in order, so the result does not depend on the threads).
pub fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if fusable(g) {
        let (storage, layout) = g.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            let partial: Vec<f64> = data[a..b].par_chunks(CHUNK).map(chunk_squares).collect();
            return Ok(partial.iter().sum());
        }
    }
    Ok(g.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// Σ x² of one chunk in eight f64 lanes, which the compiler can vectorise.
fn chunk_squares(xs: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut rows = xs.chunks_exact(8);
    for row in &mut rows {
        for (acc, &x) in lanes.iter_mut().zip(row) {
            *acc += x as f64 * x as f64;
        }
    }
    let tail: f64 = rows.remainder().iter().map(|&x| x as f64 * x as f64).sum();
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the closed form for a constant gradient: after t steps with no decay,
    /// m̂ = g and v̂ = g², so each step moves θ by −lr·g/(|g| + ε).
    #[test]
    fn constant_gradient_moves_by_lr_per_step() {
        let x = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![x.clone()],
            AdamWParams {
                lr: 0.1,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..3 {
            // loss = 3·x0 − 0.5·x1 → g = (3, −0.5)
            let loss = (x.as_tensor() * &Tensor::new(&[3.0f32, -0.5], &Device::Cpu).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.7).abs() < 1e-5 && (got[1] + 1.7).abs() < 1e-5,
            "{got:?}"
        );
        assert_eq!(opt.t, 3);
    }

    /// Seeded values in [-scale, scale).
    fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = lever_model::rng::SplitMix64(seed);
        (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    /// The fused pass against the tensor formula it replaces: several chunks and a ragged
    /// tail, weight decay, a clipping factor and a step without one, and an f64 variable
    /// that stays on the tensor formula.
    #[test]
    fn fused_step_matches_the_tensor_formula() {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 3] = [&[3 * CHUNK + 77], &[24, 5], &[7]];
        let make = || -> Vec<Var> {
            let mut vars: Vec<Var> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let n = s.iter().product();
                    Var::from_vec(noise(n, i as u64, 1.0), *s, &dev).unwrap()
                })
                .collect();
            vars.push(Var::new(&[0.5f64, -0.25, 2.0], &dev).unwrap());
            vars
        };
        let p = AdamWParams {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        };
        let (fused_vars, reference_vars) = (make(), make());
        let mut fused = AdamW::new(fused_vars.clone(), p).unwrap();
        let mut reference = AdamW::new_unfused(reference_vars.clone(), p).unwrap();
        assert!(matches!(fused.state[0], Moments::Fused { .. }));
        assert!(matches!(fused.state[3], Moments::Tensors { .. }));
        let mut worst = 0f64;
        for (step, scale) in [0.3, 1.0, 0.05, 1.0].into_iter().enumerate() {
            // loss = Σ θ·g has gradient g, the same for both optimizers.
            let grads = |vars: &[Var]| {
                let mut loss = Tensor::new(0f32, &dev).unwrap();
                for (i, var) in vars.iter().enumerate() {
                    let n = var.elem_count();
                    let g = Tensor::from_vec(noise(n, 100 + (step * 10 + i) as u64, 3.0), n, &dev)
                        .unwrap()
                        .reshape(var.shape())
                        .unwrap()
                        .to_dtype(var.dtype())
                        .unwrap();
                    let term = (var.as_tensor() * g).unwrap().sum_all().unwrap();
                    loss = (loss + term.to_dtype(DType::F32).unwrap()).unwrap();
                }
                loss.backward().unwrap()
            };
            fused.step_scaled(&grads(&fused_vars), scale).unwrap();
            reference
                .step_scaled(&grads(&reference_vars), scale)
                .unwrap();
            let (fm, fv) = fused.moments().unwrap();
            let (rm, rv) = reference.moments().unwrap();
            let pairs = fused_vars
                .iter()
                .map(|v| v.as_tensor().clone())
                .zip(reference_vars.iter().map(|v| v.as_tensor().clone()))
                .chain(fm.into_iter().zip(rm))
                .chain(fv.into_iter().zip(rv));
            for (a, b) in pairs {
                let a = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
                let b = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
                for (x, y) in a
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .zip(b.to_vec1::<f64>().unwrap())
                {
                    let rel = (x - y).abs() / y.abs().max(1e-30);
                    worst = worst.max(rel);
                    assert!(
                        rel <= 1e-6,
                        "step {}: fused {x} vs tensor formula {y}",
                        step + 1
                    );
                }
            }
        }
        eprintln!(
            "fused AdamW vs the tensor formula, 4 steps: max relative difference {worst:.2e}"
        );
    }

    /// The fused step's moments survive a save (`moments`) and `restore` into a fresh
    /// optimizer: both then take the same next step.
    #[test]
    fn fused_moments_restore_exactly() {
        let dev = Device::Cpu;
        let n = CHUNK + 5;
        let step = |opt: &mut AdamW, x: &Var, seed: u64| {
            let g = Tensor::from_vec(noise(n, seed, 1.0), n, &dev).unwrap();
            let loss = (x.as_tensor() * g).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        };
        let a = Var::from_vec(noise(n, 1, 1.0), n, &dev).unwrap();
        let mut opt_a = AdamW::new(vec![a.clone()], AdamWParams::default()).unwrap();
        step(&mut opt_a, &a, 2);
        step(&mut opt_a, &a, 3);
        let b = Var::from_tensor(&a.as_tensor().copy().unwrap()).unwrap();
        let mut opt_b = AdamW::new(vec![b.clone()], AdamWParams::default()).unwrap();
        let (m, v) = opt_a.moments().unwrap();
        opt_b.restore(m, v, opt_a.t).unwrap();
        step(&mut opt_a, &a, 4);
        step(&mut opt_b, &b, 4);
        assert_eq!(
            a.as_tensor().to_vec1::<f32>().unwrap(),
            b.as_tensor().to_vec1::<f32>().unwrap()
        );
    }

    /// With `decay_only`, a variable left out of weight decay keeps its value under a zero
    /// gradient while a decayed one shrinks by lr·λ.
    #[test]
    fn decay_applies_only_where_asked() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let b = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let p = AdamWParams {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![a.clone(), b.clone()], p)
            .unwrap()
            .decay_only(vec![true, false])
            .unwrap();
        let zero = Tensor::zeros(2, DType::F32, &dev).unwrap();
        let loss = ((a.as_tensor() + b.as_tensor()).unwrap() * zero)
            .unwrap()
            .sum_all()
            .unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        assert_eq!(a.as_tensor().to_vec1::<f32>().unwrap(), [0.95, 1.9]);
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert!(AdamW::new(vec![a], p).unwrap().decay_only(vec![]).is_err());
    }

    /// One read pass in f64 against the tensor formula in f64, for a fused tensor and a
    /// non-contiguous one.
    #[test]
    fn sum_of_squares_matches_the_tensor_formula() {
        let dev = Device::Cpu;
        let n = 2 * CHUNK + 13;
        let g = Tensor::from_vec(noise(n, 9, 2.0), n, &dev).unwrap();
        let want = g
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let got = sum_of_squares(&g).unwrap();
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        let t = Tensor::from_vec(noise(600, 10, 2.0), (20, 30), &dev)
            .unwrap()
            .t()
            .unwrap();
        let want = t
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((sum_of_squares(&t).unwrap() - want).abs() <= 1e-12 * want);
    }
}
