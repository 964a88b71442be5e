//! `lever finetune`: read and tokenize the dataset, attach LoRA adapters (or make every weight
//! trainable), train with a progress bar, log every step to metrics.jsonl, evaluate on the
//! held-out split, keep the best weights, and write the result: an adapter in PEFT's layout or
//! a Hugging Face model folder. The run folder is never left half-written: files go to
//! temporary names and are renamed into place.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use lever_data::sft::{self, Overlong, Prepared};
use lever_data::{Dataset, Fields};
use lever_model::Model;
use lever_train::trainer::evaluate;
use lever_train::{LoraConfig, LoraSet, TrainConfig, Trainer};

use crate::cli::FinetuneArgs;

pub fn run(a: FinetuneArgs) -> Result<()> {
    let mut fields = Fields::default();
    for f in &a.fields {
        fields.set(f)?;
    }
    let data = Dataset::read(&a.data, a.format, &fields)?;
    let mut model = crate::load_model(&a.model.without_adapter())?;
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
    let method = if a.lora { "lora" } else { "full" };
    let out = run_dir(&a, method)?;
    eprintln!("run folder: {}", out.display());
    let checkpoint = out.join("checkpoints").join("last");
    if a.resume {
        if !checkpoint.join("trainer.json").exists() {
            bail!("{}: no checkpoint to resume from", checkpoint.display());
        }
    } else if out.join("metrics.jsonl").exists() && !a.force {
        bail!(
            "{}: already holds a run (metrics.jsonl); choose another --out, --resume it, or --force to start over",
            out.display()
        );
    } else if a.force {
        // Start over: only what a run writes is removed; other files stay.
        for name in RUN_FILES {
            let p = out.join(name);
            if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else if p.exists() {
                std::fs::remove_file(&p)
            } else {
                Ok(())
            }
            .with_context(|| p.display().to_string())?;
        }
    } else {
        crate::check_target(&out, false).context("--out holds other files")?;
    }

    let overlong = match a.overlong.as_str() {
        "truncate" => Overlong::Truncate,
        "error" => Overlong::Error,
        _ => Overlong::Skip,
    };
    let context = model.decoder.config().max_seq_len;
    if a.seq_len > context {
        bail!(
            "--seq-len {} is longer than the model's context of {context} tokens",
            a.seq_len
        );
    }
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
        dropout: a.lora_dropout,
        targets: LoraConfig::parse_targets(&a.lora_targets)?,
    };
    let trainable = if a.lora {
        let adapters = LoraSet::attach(&mut model.decoder, &lora, a.seed)?;
        eprintln!(
            "lora: r={} alpha={} dropout={} on {} projections, {} trainable parameters",
            lora.r,
            lora.alpha,
            lora.dropout,
            adapters.adapters.len(),
            adapters.parameter_count()
        );
        Trainable::Lora(adapters)
    } else {
        let vars = model.decoder.make_trainable()?;
        let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        eprintln!(
            "full fine-tuning: {} tensors, {n} trainable parameters (f32)",
            vars.len()
        );
        Trainable::Full(vars.into_iter().map(|(_, v)| v).collect())
    };
    if a.warmup >= a.steps {
        eprintln!(
            "warning: --warmup {} is not shorter than --steps {}: the learning rate never reaches its peak",
            a.warmup, a.steps
        );
    }
    let config = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr.unwrap_or(if a.lora { 2e-4 } else { 2e-5 }),
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        seed: a.seed,
        checkpoint: a.grad_checkpoint,
    };
    let mut trainer = Trainer::new(config.clone(), trainable.vars())?;
    if let Trainable::Lora(set) = &trainable {
        trainer = trainer.with_dropout_key(set.dropout_key.clone());
    }

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
        "method": method,
        "lora": if a.lora {
            serde_json::json!({"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets})
        } else {
            serde_json::Value::Null
        },
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
        "grad_checkpoint": a.grad_checkpoint,
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
    crate::write_file(&out.join("manifest.json"), pretty(&manifest))?;

    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| metrics_path.display().to_string())?;
    let val = |trainer_step: usize, decoder: &lever_model::Decoder| -> Result<Option<f64>> {
        if prepared.validation.is_empty() || a.eval_every == 0 {
            return Ok(None);
        }
        let v = evaluate(decoder, &prepared.validation, a.batch_size)?;
        eprintln!("step {trainer_step}: validation loss {v:.4}");
        Ok(Some(v))
    };
    let base = model
        .info
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The best validation loss so far, and where its weights are kept.
    let best_dir = out.join("best");
    let mut best = if a.resume {
        best_val_loss(&metrics_path, trainer.step)
    } else {
        None
    };
    let mut keep_best = |step: usize, v: Option<f64>, model: &Model| -> Result<()> {
        let Some(v) = v else { return Ok(()) };
        if step == 0 || best.is_some_and(|(_, b)| b <= v) {
            return Ok(());
        }
        trainable.save(model, &best_dir, &base)?;
        best = Some((step, v));
        Ok(())
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

    let bar = crate::progress::bar(
        a.steps as u64,
        "train [{bar:30}] {pos}/{len} {msg} eta {eta}",
        "",
    );
    bar.set_position(trainer.step as u64);
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
            metrics.flush()?;
            keep_best(m.step, last_val, &model)?;
            plot(&out)?;
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
    keep_best(a.steps, val_after, &model)?;
    let result = trainable.result_name();
    trainable.save(&model, &out.join(result), &base)?;
    plot(&out)?;
    let best_step = best_val_loss(&metrics_path, a.steps).map(|(s, _)| s);
    manifest["result"] = serde_json::json!({
        "val_loss_before": val_before, "val_loss_after": val_after,
        "best_step": best_step, "best_val_loss": best_val_loss(&metrics_path, a.steps).map(|(_, v)| v),
        "seconds": secs, "tokens": tokens, "tokens_per_s": tokens as f64 / secs,
        result: result, "best": best_step.map(|_| "best"),
    });
    crate::write_file(&out.join("manifest.json"), pretty(&manifest))?;
    eprintln!(
        "trained {} steps in {secs:.1}s ({:.0} tok/s); {result} written to {}",
        a.steps,
        tokens as f64 / secs,
        out.join(result).display()
    );
    Ok(())
}

/// What is trained: adapters on a frozen base, or every weight.
enum Trainable {
    Lora(LoraSet),
    Full(Vec<candle_core::Var>),
}

impl Trainable {
    fn vars(&self) -> Vec<candle_core::Var> {
        match self {
            Trainable::Lora(set) => set.vars(),
            Trainable::Full(vars) => vars.clone(),
        }
    }

    /// The result folder's name in the run folder.
    fn result_name(&self) -> &'static str {
        match self {
            Trainable::Lora(_) => "adapter",
            Trainable::Full(_) => "model",
        }
    }

    /// The adapter (PEFT layout) or the whole model (Hugging Face folder), atomically.
    fn save(&self, model: &Model, dir: &Path, base: &str) -> Result<()> {
        match self {
            Trainable::Lora(set) => set.save_peft(&model.decoder, dir, base)?,
            Trainable::Full(_) => lever_model::formats::export::write_hf(model, dir)?,
        }
        Ok(())
    }
}

/// What a run writes into its folder (`--force` removes these and nothing else).
const RUN_FILES: [&str; 7] = [
    "manifest.json",
    "metrics.jsonl",
    "loss.png",
    "checkpoints",
    "best",
    "adapter",
    "model",
];

/// --out, or runs/<name> with a name from the data file and the method (a new one per run;
/// --resume continues the newest).
fn run_dir(a: &FinetuneArgs, method: &str) -> Result<PathBuf> {
    if let Some(out) = &a.out {
        return Ok(out.clone());
    }
    let name = match &a.name {
        Some(n) => {
            lever_eval::task::check_name(n).map_err(|p| anyhow::anyhow!("--name {n:?}: {p}"))?;
            n.clone()
        }
        None => {
            let stem = a
                .data
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "data".into());
            format!("{stem}-{method}")
        }
    };
    let runs = PathBuf::from("runs");
    let taken = |p: &Path| p.join("metrics.jsonl").exists();
    let mut dir = runs.join(&name);
    if a.name.is_some() || a.resume {
        if a.resume && a.name.is_none() {
            // The newest run of this name.
            let mut n = 2;
            while taken(&runs.join(format!("{name}-{n}"))) {
                dir = runs.join(format!("{name}-{n}"));
                n += 1;
            }
        }
        return Ok(dir);
    }
    let mut n = 2;
    while taken(&dir) {
        dir = runs.join(format!("{name}-{n}"));
        n += 1;
    }
    Ok(dir)
}

/// The lowest validation loss after step 0 up to `step`, and its step.
fn best_val_loss(path: &Path, step: usize) -> Option<(usize, f64)> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()? as usize, v.get("val_loss")?.as_f64()?)))
        .filter(|(s, _)| *s > 0 && *s <= step)
        .fold(None, |best: Option<(usize, f64)>, (s, v)| match best {
            Some((_, b)) if b <= v => best,
            _ => Some((s, v)),
        })
}

/// loss.png from metrics.jsonl: training loss per step and validation loss.
fn plot(out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            train.push((step, l));
        }
        if let Some(l) = v.get("val_loss").and_then(|l| l.as_f64()) {
            val.push((step, l));
        }
    }
    lever_train::plot::write_loss_curve(&out.join("loss.png"), &train, &val)
        .with_context(|| out.join("loss.png").display().to_string())
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
    crate::write_file(path, &body)
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
