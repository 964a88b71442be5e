//! GFLOP/s of lever's training matmul (a float Linear with gradients) at the shapes of the
//! shakespeare-char recipe (768 rows) and at 1024³: fastest of many repetitions.
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use lever_model::{Linear, Weight};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    for (m, n, k) in [
        (768, 128, 128),
        (768, 384, 128),
        (768, 344, 128),
        (768, 128, 344),
        (768, 336, 128),
        (768, 128, 336),
        (768, 352, 128),
        (768, 128, 352),
        (768, 320, 128),
        (768, 128, 320),
        (768, 65, 128),
        (1024, 1024, 1024),
    ] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev)?)?;
        let l = Linear::new(Weight::Float(w), None)?;
        let mut best = f64::INFINITY;
        let reps = if m * n * k > 1 << 28 { 20 } else { 300 };
        for _ in 0..reps {
            let t0 = Instant::now();
            let y = l.forward(x.as_tensor())?;
            drop(y);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "{m}x{n}x{k}: {:.1} µs, {:.1} GFLOP/s",
            best * 1e6,
            2.0 * (m * n * k) as f64 / best / 1e9
        );
    }
    Ok(())
}
