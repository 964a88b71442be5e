//! Cross-entropy over the vocabulary as one operation: per row, logsumexp(z) − z[target]; its
//! gradient, softmax(z) − onehot(target) scaled by the incoming gradient, is written straight
//! into one (N, V) buffer. candle's elementary log_softmax + gather would allocate several
//! (N, V) tensors forward and backward, and at a 49k vocabulary they are the largest tensors of
//! a training step (PyTorch fuses the same way in `cross_entropy`).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Per-row −log softmax(z)[target] of (N, V) logits.
#[derive(Debug, Clone)]
struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

/// The gradient of `CrossEntropy` for given per-row output gradients.
#[derive(Debug, Clone)]
struct CrossEntropyGrad {
    targets: Arc<Vec<u32>>,
    scales: Vec<f32>,
}

fn rows<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(z) = storage else {
        candle_core::bail!("cross-entropy expects f32 logits");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("cross-entropy expects contiguous logits");
    };
    let (n, v) = layout.shape().dims2()?;
    Ok((&z[start..end], n, v))
}

fn check_targets(targets: &[u32], n: usize, v: usize) -> Result<()> {
    if targets.len() != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len());
    }
    if let Some(t) = targets.iter().find(|t| **t as usize >= v) {
        candle_core::bail!("cross-entropy: target {t} outside a vocabulary of {v}");
    }
    Ok(())
}

/// (max, Σ exp(z − max)) of a row.
fn row_stats(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (max, lever_model::ops::sum_exp(row, max))
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "lever-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (z, n, v) = rows(storage, layout)?;
        check_targets(&self.targets, n, v)?;
        let loss: Vec<f32> = z
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let (max, sum) = row_stats(row);
                max + sum.ln() - row[t as usize]
            })
            .collect();
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyGrad {
            targets: self.targets.clone(),
            scales: grad_res.to_vec1::<f32>()?,
        };
        Ok(Some(arg.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "lever-cross-entropy-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (z, n, v) = rows(storage, layout)?;
        check_targets(&self.targets, n, v)?;
        let mut grad = vec![0f32; n * v];
        grad.par_chunks_mut(v)
            .zip(z.par_chunks(v))
            .zip(self.targets.par_iter().zip(self.scales.par_iter()))
            .for_each(|((g, row), (&t, &scale))| {
                let (max, sum) = row_stats(row);
                let k = scale / sum;
                for (g, z) in g.iter_mut().zip(row) {
                    *g = lever_model::ops::exp(z - max) * k;
                }
                g[t as usize] -= scale;
            });
        Ok((CpuStorage::F32(grad), Shape::from((n, v))))
    }
}

/// Per-row cross-entropy of (N, V) f32 logits against `targets` (N ids): (N,) losses, with a
/// backward pass.
pub fn cross_entropy(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: Arc::new(targets),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    /// Loss and gradient equal candle's elementary log_softmax + gather (within 1e-5).
    #[test]
    fn fused_cross_entropy_equals_the_elementary_one() {
        let dev = Device::Cpu;
        let mut rng = lever_model::rng::SplitMix64(7);
        let (n, v) = (5, 37);
        let z: Vec<f32> = (0..n * v).map(|_| rng.normal() * 3.0).collect();
        let targets: Vec<u32> = vec![0, 36, 5, 5, 20];
        let weights = Tensor::new(&[1f32, 0.0, 2.0, 0.5, 1.0], &dev).unwrap();

        let a = Var::from_tensor(&Tensor::from_vec(z.clone(), (n, v), &dev).unwrap()).unwrap();
        let fused = cross_entropy(a.as_tensor(), targets.clone()).unwrap();
        let fused_sum = (&fused * &weights).unwrap().sum_all().unwrap();
        let ga = fused_sum.backward().unwrap();

        let b = Var::from_tensor(&Tensor::from_vec(z, (n, v), &dev).unwrap()).unwrap();
        let logp = candle_nn::ops::log_softmax(b.as_tensor(), D::Minus1).unwrap();
        let t = Tensor::from_vec(targets, (n, 1), &dev).unwrap();
        let nll = logp
            .gather(&t, D::Minus1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let plain_sum = (&nll * &weights).unwrap().sum_all().unwrap();
        let gb = plain_sum.backward().unwrap();

        let d = (fused - nll).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        let g = (ga.get(a.as_tensor()).unwrap() - gb.get(b.as_tensor()).unwrap()).unwrap();
        let d = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "gradient differs by {d}");
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let z = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(cross_entropy(&z, vec![0, 4]).is_err());
    }
}
