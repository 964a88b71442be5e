//! The measurements behind `lever bench`, shaped like llama.cpp's `llama-bench`: pp = one
//! forward pass over n prompt tokens from an empty cache; tg = n single-token steps from an
//! empty cache. Tokens are arbitrary ids (llama-bench uses random ones too).

use std::time::Instant;

use candle_core::Tensor;
use lever_model::{Logits, Model};

use crate::Result;

/// Prompt processing: tokens/s for one batch of `n` tokens.
pub fn prompt_tps(model: &Model, n: usize) -> Result<f64> {
    let dev = model.decoder.device();
    let v = model.decoder.config().vocab_size as u32;
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % v).collect();
    let input = Tensor::new(ids.as_slice(), dev)?.unsqueeze(0)?;
    let mut cache = model.decoder.new_cache();
    let t = Instant::now();
    let logits = model.decoder.forward(&input, &mut cache, Logits::Last)?;
    logits.to_vec2::<f32>()?; // make sure the work is done
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Text generation: tokens/s over `n` single-token steps.
pub fn generation_tps(model: &Model, n: usize) -> Result<f64> {
    let dev = model.decoder.device();
    let mut cache = model.decoder.new_cache();
    let mut next = model.tokenizer.bos().unwrap_or(0);
    let t = Instant::now();
    for _ in 0..n {
        let input = Tensor::new(&[next], dev)?.unsqueeze(0)?;
        let logits = model.decoder.forward(&input, &mut cache, Logits::Last)?;
        next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
