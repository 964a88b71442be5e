//! `lever finetune`: read and tokenize the dataset, attach LoRA adapters, train with a progress
//! bar, log every step to metrics.jsonl, evaluate on the held-out split, and write the adapter
//! in PEFT's layout. The run folder is never left half-written: files go to temporary names
//! and are renamed into place.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use lever_data::sft::{self, Overlong, Prepared};
use lever_data::{Dataset, Fields};
use lever_train::trainer::evaluate;
use lever_train::{LoraConfig, LoraSet, TrainConfig, Trainer};

use crate::cli::FinetuneArgs;

pub fn run(a: FinetuneArgs) -> Result<()> {
    let mut fields = Fields::default();
    for f in &a.fields {
        fields.set(f)?;
    }
    if a.model.adapter.is_some() && a.show_mask.is_none() {
        bail!(
            "--adapter: continuing training from an adapter is not supported yet; train a fresh one"
        );
    }
    let data = Dataset::read(&a.data, a.format, &fields)?;
    let mut model = crate::load_model(&a.model)?;
    let template = model.chat_template.clone();

    if let Some(n) = a.show_mask {
        let Some((line, example)) = data.examples.get(n) else {
            bail!(
                "--show-mask {n}: {} has {} examples (0-based)",
                a.data.display(),
                data.examples.len()
            );
        };
        let t = sft::tokenize(&model.tokenizer, template.as_ref(), example, *line)?;
        print!("{}", sft::show_mask(&model.tokenizer, &t));
        return Ok(());
    }
    let out = a.out.clone().context("--out is required")?;
    let checkpoint = out.join("checkpoints").join("last");
    if a.resume {
        if !checkpoint.join("trainer.json").exists() {
            bail!("{}: no checkpoint to resume from", checkpoint.display());
        }
    } else if out.join("metrics.jsonl").exists() {
        bail!(
            "{}: already holds a run (metrics.jsonl); choose another --out, or --resume",
            out.display()
        );
    }

    let overlong = if a.overlong == "truncate" {
        Overlong::Truncate
    } else {
        Overlong::Skip
    };
    let prepared = Prepared::new(
        &data,
        &model.tokenizer,
        template.as_ref(),
        a.seq_len,
        overlong,
        a.val_fraction,
        a.seed,
    )?;
    eprintln!(
        "data: {} examples ({}) → {} train, {} validation; {} truncated, {} skipped as too long, {} without trained tokens",
        data.examples.len(),
        data.format.name(),
        prepared.train.len(),
        prepared.validation.len(),
        prepared.truncated,
        prepared.skipped_long,
        prepared.skipped_untrained
    );

    let lora = LoraConfig {
        r: a.lora_r,
        alpha: a.lora_alpha,
        targets: LoraConfig::parse_targets(&a.lora_targets)?,
    };
    let adapters = LoraSet::attach(&mut model.decoder, &lora, a.seed)?;
    eprintln!(
        "lora: r={} alpha={} on {} projections, {} trainable parameters",
        lora.r,
        lora.alpha,
        adapters.adapters.len(),
        adapters.parameter_count()
    );
    let config = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr,
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        seed: a.seed,
    };
    let mut trainer = Trainer::new(config.clone(), adapters.vars())?;

    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    let model_path = model.info.path.display().to_string();
    let settings = serde_json::json!({
        "model": model_path,
        "data": a.data.display().to_string(),
        "format": data.format.name(),
        "seq_len": a.seq_len,
        "overlong": a.overlong,
        "val_fraction": a.val_fraction,
        "train": config,
        "lora": {"r": lora.r, "alpha": lora.alpha, "targets": lora.targets},
        "examples": {
            "read": data.examples.len(), "train": prepared.train.len(),
            "validation": prepared.validation.len(), "truncated": prepared.truncated,
            "skipped_long": prepared.skipped_long, "skipped_untrained": prepared.skipped_untrained,
        },
        "fields": a.fields,
    });
    let mut manifest = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "lever_version": env!("CARGO_PKG_VERSION"),
        "settings": settings,
    });
    if a.resume {
        // The run continues only with exactly the settings it started with.
        let path = out.join("manifest.json");
        let old: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path).with_context(|| path.display().to_string())?,
        )
        .with_context(|| path.display().to_string())?;
        if let Some(map) = settings.as_object() {
            for (k, v) in map {
                if old["settings"].get(k) != Some(v) {
                    bail!(
                        "--resume: `{k}` was {} in {}, now {v}; resume with the same settings",
                        old["settings"].get(k).unwrap_or(&serde_json::Value::Null),
                        path.display()
                    );
                }
            }
        }
        trainer.load_checkpoint(&checkpoint)?;
        truncate_metrics(&out.join("metrics.jsonl"), trainer.step)?;
        manifest["resumed_at_step"] = serde_json::json!(trainer.step);
        eprintln!("resuming at step {}", trainer.step);
    }
    write_atomic(&out.join("manifest.json"), &pretty(&manifest))?;

    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| metrics_path.display().to_string())?;
    let val = |trainer_step: usize, decoder: &lever_model::Decoder| -> Result<Option<f64>> {
        if prepared.validation.is_empty() {
            return Ok(None);
        }
        let v = evaluate(decoder, &prepared.validation, a.batch_size)?;
        eprintln!("step {trainer_step}: validation loss {v:.4}");
        Ok(Some(v))
    };
    let val_before = if a.resume {
        read_val_loss(&metrics_path, 0)
    } else {
        let v = val(0, &model.decoder)?;
        if let Some(v) = v {
            writeln!(metrics, "{}", serde_json::json!({"step": 0, "val_loss": v}))?;
        }
        v
    };

    let bar = ProgressBar::new(a.steps as u64);
    bar.set_position(trainer.step as u64);
    bar.set_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut tokens = 0usize;
    let mut last_val = val_before;
    while trainer.step < a.steps {
        let t0 = Instant::now();
        let m = trainer.step(&model.decoder, &prepared.train)?;
        if !m.loss.is_finite() {
            bail!("step {}: the loss is {} (lower --lr?)", m.step, m.loss);
        }
        tokens += m.tokens;
        let tps = m.tokens as f64 / t0.elapsed().as_secs_f64();
        let mut line = serde_json::to_value(&m)?;
        line["tokens_per_s"] = serde_json::json!(tps);
        line["elapsed_s"] = serde_json::json!(started.elapsed().as_secs_f64());
        writeln!(metrics, "{line}")?;
        bar.set_message(format!("loss {:.4} lr {:.2e} {tps:.0} tok/s", m.loss, m.lr));
        bar.inc(1);
        if a.eval_every > 0 && m.step % a.eval_every == 0 && m.step < a.steps {
            bar.suspend(|| -> Result<()> {
                last_val = val(m.step, &model.decoder)?;
                Ok(())
            })?;
            if let Some(v) = last_val {
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"step": m.step, "val_loss": v})
                )?;
            }
        }
        if a.save_every > 0 && m.step % a.save_every == 0 && m.step < a.steps {
            metrics.sync_data()?;
            trainer.save_checkpoint(&checkpoint)?;
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let val_after = val(a.steps, &model.decoder)?;
    if let Some(v) = val_after {
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"step": a.steps, "val_loss": v})
        )?;
    }
    metrics.flush()?;
    let base = model
        .info
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    adapters.save_peft(&model.decoder, &out.join("adapter"), &base)?;
    manifest["result"] = serde_json::json!({
        "val_loss_before": val_before, "val_loss_after": val_after,
        "seconds": secs, "tokens": tokens, "tokens_per_s": tokens as f64 / secs,
        "adapter": "adapter",
    });
    write_atomic(&out.join("manifest.json"), &pretty(&manifest))?;
    eprintln!(
        "trained {} steps in {secs:.1}s ({:.0} tok/s); adapter written to {}",
        a.steps,
        tokens as f64 / secs,
        out.join("adapter").display()
    );
    Ok(())
}

/// Keep the metrics of steps up to `step` (what the checkpoint holds); later lines are
/// recomputed by the resumed run. Rewritten atomically.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    write_atomic(path, &body)
}

fn read_val_loss(path: &Path, step: usize) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["step"].as_u64() == Some(step as u64) && v.get("val_loss").is_some())
        .and_then(|v| v["val_loss"].as_f64())
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// Write to a temporary name beside the target, then rename over it.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(())
}
