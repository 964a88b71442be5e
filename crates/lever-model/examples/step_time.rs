//! Time of one batched decoding step (`Decoder::step_batch`) for several batch sizes: what
//! continuous batching in `lever serve` can gain before HTTP and sampling.
//!
//!   cargo run --release --example step_time -p lever-model MODEL.gguf
//!   BS=1,8 STEPS=100 LEVER_PACKED=0 cargo run ...   # batch sizes, steps, lane-order kernels
//!
//! Weights are packed as `lever serve` packs them, unless LEVER_PACKED=0.
use std::time::Instant;

use candle_core::{Device, Tensor};
use lever_model::{Logits, Model};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn env_list(name: &str, default: &[usize]) -> Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .map_err(|e| format!("{name}: {x:?}: {e}").into())
            })
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

fn main() -> Result<()> {
    lever_model::qweight::set_packing(true);
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: step_time MODEL.gguf")?;
    let model = Model::load_gguf(std::path::Path::new(&path), &Device::Cpu)?;
    let dec = &model.decoder;
    let batches = env_list("BS", &[1, 2, 4, 8, 16])?;
    let steps = env_list("STEPS", &[40])?
        .first()
        .copied()
        .unwrap_or(40)
        .max(1);
    let prompt: Vec<u32> = (0..40).map(|i| 100 + i * 7).collect();
    for b in batches {
        let mut caches = Vec::with_capacity(b);
        let t0 = Instant::now();
        for _ in 0..b {
            let mut c = dec.new_cache();
            let input = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            dec.forward(&input, &mut c, Logits::Last)?;
            caches.push(c);
        }
        let prefill_ms = t0.elapsed().as_secs_f64() * 1000.0 / b as f64;
        let ids: Vec<u32> = (0..b as u32).map(|i| 200 + i).collect();
        let t = Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            dec.step_batch(&ids, &mut refs)?.to_vec2::<f32>()?;
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0 / steps as f64;
        println!(
            "B={b:2} step {ms:7.2} ms  {:7.1} tok/s  (prefill of {} tokens {prefill_ms:.1} ms)",
            b as f64 * 1000.0 / ms,
            prompt.len()
        );
    }
    Ok(())
}
