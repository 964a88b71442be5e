//! Chunked prefill on the real default model, with the packed kernels `lever serve` uses: a
//! prompt computed in the engine's chunks gives the same logits, bit for bit, as the prompt
//! computed at once (and the same keys and values: the next decoding step agrees too), while
//! a last chunk shorter than `MIN_PREFILL_CHUNK` would not — the reason for that minimum.
//!
//! Needs the default model provisioned in `$LEVER_HOME` (CI does: `lever models pull`).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lever_model::{Cache, Logits, Model};
use lever_server::engine::{MIN_PREFILL_CHUNK, chunk_end};

fn model() -> Model {
    let home = lever_model::registry::lever_home();
    let entry = lever_model::registry::find(lever_model::registry::DEFAULT_GENERATOR).unwrap();
    assert!(
        entry.is_provisioned(&home),
        "{} is not provisioned in {} (run `lever models pull`)",
        entry.name,
        home.display()
    );
    lever_model::qweight::set_packing(true);
    Model::load_gguf(&entry.main_path(&home), &Device::Cpu).unwrap()
}

/// Feed `ids[..]` split at `ends` (each the end of a chunk); the last chunk's last logits.
fn prefill(m: &Model, ids: &[u32], ends: &[usize]) -> (Vec<f32>, Cache) {
    let mut cache = m.decoder.new_cache();
    let mut start = 0;
    let mut logits = Vec::new();
    for &end in ends {
        let x = Tensor::new(&ids[start..end], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = m
            .decoder
            .forward(&x, &mut cache, Logits::Last)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        start = end;
    }
    (logits, cache)
}

fn next_step(m: &Model, cache: &mut Cache, id: u32) -> Vec<f32> {
    m.decoder
        .step_batch(&[id], &mut [cache])
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_prompt_in_chunks_gives_the_logits_of_a_prompt_at_once() {
    let m = model();
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/tinyshakespeare/input.txt"),
    )
    .unwrap();
    let text: String = text.chars().take(2400).collect();
    let ids = m.tokenizer.encode(&text, true).unwrap();
    let n = ids.len();
    assert!((560..900).contains(&n), "{n} tokens");
    let chunk = 256;
    let mut ends = Vec::new();
    let mut done = 0;
    while done < n {
        done = chunk_end(done, n, chunk);
        ends.push(done);
    }
    assert!(ends.len() >= 2, "{ends:?}");

    let (whole, mut whole_cache) = prefill(&m, &ids, &[n]);
    let (chunked, mut chunked_cache) = prefill(&m, &ids, &ends);
    let d = max_diff(&whole, &chunked);
    eprintln!("{n} tokens in chunks {ends:?}: max |logit difference| {d}");
    assert_eq!(whole, chunked);
    let next = 1234;
    let a = next_step(&m, &mut whole_cache, next);
    let b = next_step(&m, &mut chunked_cache, next);
    assert_eq!(a, b, "the next step differs: {}", max_diff(&a, &b));

    // A last chunk under the minimum takes the one-query f16 attention path: other numbers.
    let short = n - (MIN_PREFILL_CHUNK / 2);
    let (split, _) = prefill(&m, &ids, &[short, n]);
    let d = max_diff(&whole, &split);
    eprintln!("with a last chunk of {} tokens: {d}", n - short);
    assert!(d > 0.0);
}
