//! `lever tokenize`, `lever perplexity`, `lever bench`.

use anyhow::{Context, Result};
use serde_json::json;

use crate::cli::{BenchArgs, PerplexityArgs, QuantizeArgs, TokenizeArgs};

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    // The vocabulary only: no weights, and no need for lever to run the architecture.
    let home = lever_model::registry::lever_home();
    let source =
        lever_model::model::resolve(&a.model.model, &home, &mut crate::progress::provisioning())?;
    let tokenizer = lever_model::model::load_tokenizer(&source)?;
    let ids = tokenizer.encode(&a.text, !a.no_bos)?;
    if a.json {
        println!("{}", json!({ "ids": ids }));
    } else {
        for id in ids {
            println!("{id:>6} {:?}", tokenizer.token_text(id));
        }
    }
    Ok(())
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let bytes = std::fs::read(&a.file).with_context(|| format!("{}", a.file.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 (byte {})",
            a.file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let model = crate::load_model(&a.model)?;
    let tokens = model.tokenizer.encode(&text, true)?;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let chunks = a.chunks.map(|c| c as usize);
    let r = lever_generate::perplexity(
        &model,
        &tokens,
        a.ctx as usize,
        chunks,
        &mut |done, total| {
            if !a.json {
                bar.get_or_insert_with(|| {
                    crate::progress::counter(total as u64, "perplexity chunks")
                })
                .set_position(done as u64);
            }
        },
    )
    .with_context(|| format!("{}", a.file.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        println!(
            "{}",
            json!({"ppl": r.ppl, "nll": r.nll, "scored_tokens": r.scored_tokens, "chunks": r.chunks, "ctx": r.ctx})
        );
    } else {
        println!(
            "PPL = {:.4} (ctx {}, {} chunks, {} scored tokens)",
            r.ppl, r.ctx, r.chunks, r.scored_tokens
        );
    }
    Ok(())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    use lever_generate::bench::{generation_tps, peak_rss_mb, prompt_tps};
    let model = crate::load_model(&a.model)?;
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Warm-up: page in the weights and the kernels' buffers.
    prompt_tps(&model, 16.min(a.pp.max(1)))?;
    let reps = a.reps.max(1);
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..reps {
        if a.pp > 0 {
            pp.push(prompt_tps(&model, a.pp)?);
        }
        if a.tg > 0 {
            tg.push(generation_tps(&model, a.tg)?);
        }
    }
    let pp_tps = median(&mut pp);
    let tg_tps = median(&mut tg);
    let bytes = model.decoder.weight_bytes_per_token() as f64;
    let bw = tg_tps.map(|t| t * bytes / 1e9);
    let rss = peak_rss_mb();
    if a.json {
        println!(
            "{}",
            json!({
                "pp_tps": pp_tps, "tg_tps": tg_tps, "peak_rss_mb": rss,
                "pp": a.pp, "tg": a.tg, "reps": reps, "threads": threads,
                "weight_bytes_per_token": bytes as u64, "weight_gbs": bw,
                "model": model.info.path, "quantization": model.info.quantization,
            })
        );
    } else {
        println!(
            "model      {} ({})",
            model.info.path.display(),
            model.info.quantization
        );
        println!("threads    {threads}");
        if let Some(v) = pp_tps {
            println!("pp{:<7} {v:.1} tok/s", a.pp);
        }
        if let Some(v) = tg_tps {
            println!("tg{:<7} {v:.1} tok/s", a.tg);
        }
        if let Some(b) = bw {
            println!(
                "weights    {:.1} MB/token, {b:.2} GB/s during tg",
                bytes / 1e6
            );
        }
        if let Some(r) = rss {
            println!("peak RSS   {r:.0} MB");
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    crate::check_target(&a.output, a.force)?;
    // A model file goes into a folder that exists, as llama-quantize's does: a missing folder
    // is more often a typo than a wish.
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        anyhow::bail!(
            "{}: folder {} does not exist; create it first",
            a.output.display(),
            parent.display()
        );
    }
    let home = lever_model::registry::lever_home();
    let source =
        lever_model::model::resolve(&a.input, &home, &mut crate::progress::provisioning())?;
    let mut bar: Option<indicatif::ProgressBar> = None;
    match &source {
        lever_model::ModelSource::Gguf(src) => lever_model::formats::quantize::quantize_gguf(
            src,
            &a.output,
            a.qtype,
            &mut |done, total| {
                bar.get_or_insert_with(|| {
                    crate::progress::counter(total as u64, "quantizing tensors")
                })
                .set_position(done as u64);
            },
        )?,
        lever_model::ModelSource::HfFolder(dir) => {
            lever_model::formats::quantize::convert_hf(dir, &a.output, a.qtype)?
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({:?}, {:.1} MB)",
        a.output.display(),
        a.qtype,
        size as f64 / 1e6
    );
    Ok(())
}
