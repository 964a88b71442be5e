//! The machine's peak for model FLOPs utilization (MFU): nanoGPT divides by an A100's
//! datasheet bf16 peak, which says nothing on a CPU. Here the peak is measured: a large f32
//! matrix product, (1024 × 1024) · (1024 × 1024)ᵀ, through the very path training multiplies
//! with (a float `Linear` with gradients flowing: lever's dense matmul on the `gemm` crate),
//! repeated for about a second on the threads training will use; the fastest repetition
//! counts. MFU is then the training FLOPs per second (6·N + attention, per token) over it.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};
use lever_model::{Linear, Weight};
use serde::Serialize;

use crate::error::Result;

/// A measured peak.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Peak {
    /// FLOPs per second of the fastest repetition.
    pub flops_per_s: f64,
    /// The product's sizes (M = N = K).
    pub size: usize,
    pub repetitions: usize,
    pub seconds: f64,
}

impl Peak {
    /// How the peak was measured, for manifests and the README.
    pub const METHOD: &'static str = "fastest of ~1 s of f32 (1024x1024)·(1024x1024)ᵀ products through lever's training matmul (Linear with gradients, gemm crate), same threads as training";
}

/// Measure for about `budget` (at least three repetitions).
pub fn measure(budget: Duration) -> Result<Peak> {
    let n = 1024;
    let dev = Device::Cpu;
    let mut rng = lever_model::rng::SplitMix64(0x9ea4);
    let mut fill = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal()).collect() };
    let w = Tensor::from_vec(fill(n * n), (n, n), &dev)?;
    let x = Var::from_vec(fill(n * n), (n, n), &dev)?;
    let layer = Linear::new(Weight::Float(w), None)?;
    let flops = 2.0 * (n * n * n) as f64;
    let started = Instant::now();
    let (mut best, mut reps) = (f64::INFINITY, 0usize);
    while reps < 3 || started.elapsed() < budget {
        let t0 = Instant::now();
        let y = layer.forward(x.as_tensor())?;
        drop(y);
        best = best.min(t0.elapsed().as_secs_f64());
        reps += 1;
    }
    Ok(Peak {
        flops_per_s: flops / best,
        size: n,
        repetitions: reps,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_peak_is_measured() {
        let p = measure(Duration::from_millis(50)).unwrap();
        assert!(p.repetitions >= 3);
        // Any CPU lever runs on does more than 1 GFLOP/s and less than 100 TFLOP/s in f32.
        assert!(p.flops_per_s > 1e9 && p.flops_per_s < 1e14, "{p:?}");
    }
}
