//! Per-step time of the `shakespeare-char` recipe on tinyshakespeare with a character
//! vocabulary built here (nanoGPT's `prepare.py`: the sorted distinct characters, 90/10
//! split). `cargo run --release -p lever-train --example pretrain_speed -- INPUT.txt [STEPS [noeval]]`
//! prints the mean time of a step after two warm-up steps, tokens/s and the validation loss.

use std::time::Instant;

use candle_core::Device;
use lever_train::init::new_decoder;
use lever_train::pretrain::{Coverage, evaluate};
use lever_train::{Pretrainer, Recipe};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: pretrain_speed INPUT.txt [STEPS]")?;
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let text = std::fs::read_to_string(path)?;
    let mut chars: Vec<char> = text.chars().collect();
    chars.sort_unstable();
    chars.dedup();
    let ids: Vec<u32> = text
        .chars()
        .map(|c| chars.binary_search(&c).map(|i| i as u32))
        .collect::<Result<_, _>>()
        .map_err(|_| "character outside the vocabulary")?;
    let n = ids.len() * 9 / 10;
    let (train, val) = ids.split_at(n);
    let mut recipe = Recipe::preset("shakespeare-char").ok_or("preset")?;
    recipe.steps = steps.max(recipe.steps);
    let mut decoder = new_decoder(
        &recipe.decoder_config(chars.len()),
        recipe.seed,
        &Device::Cpu,
    )?;
    let vars = decoder.make_trainable()?;
    let mut p = Pretrainer::new(recipe.clone(), vars)?;
    for _ in 0..2 {
        p.step(&decoder, train)?;
    }
    let t0 = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = p.step(&decoder, train)?.loss;
    }
    let secs = t0.elapsed().as_secs_f64();
    let ms = secs * 1e3 / steps as f64;
    let tps = (steps * recipe.tokens_per_step()) as f64 / secs;
    if args.get(3).is_some_and(|a| a == "noeval") {
        println!("{ms:.2} ms/step, {tps:.0} tokens/s over {steps} steps | train loss {loss:.4}");
        return Ok(());
    }
    let t1 = Instant::now();
    let v = evaluate(&decoder, &recipe, val, Coverage::Whole)?;
    println!(
        "vocab {} | {ms:.2} ms/step, {tps:.0} tokens/s over {steps} steps | train loss {loss:.4} | val loss {v:.4} ({:.2}s)",
        chars.len(),
        t1.elapsed().as_secs_f64()
    );
    Ok(())
}
