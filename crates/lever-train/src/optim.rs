//! AdamW with decoupled weight decay (Loshchilov & Hutter, arXiv:1711.05101), written out so
//! that its state (step count, first and second moments) can be saved and restored exactly;
//! the update is PyTorch's `torch.optim.AdamW` (amsgrad off):
//!   θ ← θ·(1 − lr·λ);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
//!   θ ← θ − lr·(m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

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

pub struct AdamW {
    pub params: AdamWParams,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far.
    pub t: usize,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<AdamW> {
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW {
            params,
            vars,
            m,
            v,
            t: 0,
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One update from the gradients of the variables (those without one are left alone).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let p = self.params;
        let c1 = 1.0 - p.beta1.powi(self.t as i32);
        let c2 = 1.0 - p.beta2.powi(self.t as i32);
        for ((var, m), v) in self.vars.iter().zip(&mut self.m).zip(&mut self.v) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            *m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            *v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((&*v / c2)?.sqrt()? + p.eps)?;
            let update = ((&*m / c1)? / denom)?;
            let theta = (var.as_tensor() * (1.0 - p.lr * p.weight_decay))?;
            var.set(&(theta - (update * p.lr)?)?)?;
        }
        Ok(())
    }

    /// The moments, in variable order, for checkpoints.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
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
        self.m = m;
        self.v = v;
        self.t = t;
        Ok(())
    }
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
}
