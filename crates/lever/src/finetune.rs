//! `lever finetune`: read and tokenize the dataset, attach LoRA adapters (or make every weight
//! trainable), train with a progress bar, log every step to metrics.jsonl, evaluate on the
//! held-out split, keep the best weights, and write the result: an adapter in PEFT's layout or
//! a Hugging Face model folder. The run folder is never left half-written: files go to
//! temporary names and are renamed into place.
//!
//! Under `mpirun` (the `mpi` feature, ranks.rs) every rank trains its share of each global
//! batch and the gradients are summed over the ranks; rank 0 alone prints, logs, plots and
//! writes the run folder.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use lever_data::sft::{self, Overlong, Prepared};
use lever_data::{Dataset, Fields};
use lever_model::Model;
use lever_train::trainer::evaluate_split;
use lever_train::{Best, Dist, LoraConfig, LoraSet, RunDir, Start, TrainConfig, Trainer};
use serde_json::json;

use crate::cli::FinetuneArgs;

pub fn run(a: FinetuneArgs) -> Result<()> {
    if a.supervise.supervise {
        // Restarts resume the run in its folder: it must be named, not chosen anew.
        let Some(out) = &a.out else {
            bail!("--supervise needs --out: the run folder each restart resumes");
        };
        return crate::supervise::run(out, &a.supervise);
    }
    let dist = Arc::new(Dist::from_env()?);
    let result = train(a, &dist);
    crate::ranks::finish(dist, result)
}

fn train(a: FinetuneArgs, dist: &Arc<Dist>) -> Result<()> {
    let root = dist.is_root();
    // Rank 0 alone prints.
    macro_rules! say {
        ($($arg:tt)*) => {
            if root {
                eprintln!($($arg)*);
            }
        };
    }
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
    // Said before any run folder is made: full fine-tuning of a Gemma 3 GGUF (its quantized
    // weights made trainable) is not tested yet; LoRA on it works, and so does full
    // fine-tuning of the Hugging Face folder `lever export` writes from it.
    if model.decoder.config().arch == lever_model::Arch::Gemma3
        && !a.lora
        && model.info.format != "hf"
    {
        bail!(
            "{}: full fine-tuning of a gemma3 model from {} is not supported yet; use --lora, \
             or write it as a Hugging Face folder (`lever export --out DIR`) and fine-tune that",
            model.info.path.display(),
            model.info.format
        );
    }
    let method = if a.lora { "lora" } else { "full" };
    let start = match (a.resume, a.force) {
        (true, _) => Start::Resume,
        (false, true) => Start::Over,
        (false, false) => Start::New,
    };
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
    // --name is used as given; a name made from the data file gets a new folder per run.
    let dir = RunDir::locate(
        a.out.as_deref(),
        Path::new("runs"),
        &name,
        a.name.is_none(),
        start,
    );
    say!("run folder: {}", dir.display());

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
    say!(
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
        say!(
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
        say!(
            "full fine-tuning: {} tensors, {n} trainable parameters (f32)",
            vars.len()
        );
        Trainable::Full(vars.into_iter().map(|(_, v)| v).collect())
    };
    if a.warmup >= a.steps {
        say!(
            "warning: --warmup {} is not shorter than --steps {}: the learning rate never reaches its peak",
            a.warmup,
            a.steps
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
    let mut trainer = Trainer::new(config.clone(), trainable.vars())?.with_dist(dist.clone());
    // The key only matters with dropout on (it stays off otherwise), and without it the
    // trainer may spread a micro-batch over the threads.
    if let Trainable::Lora(set) = &trainable
        && a.lora_dropout > 0.0
    {
        trainer = trainer.with_dropout_key(set.dropout_key.clone());
    }

    let model_path = model.info.path.display().to_string();
    let mut settings = serde_json::json!({
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
    let ranks = dist.size();
    if ranks > 1 {
        // The global batch: a checkpoint continues exactly at any world size with the same one.
        settings["train"]["batch_size"] = json!(a.batch_size * ranks);
        crate::ranks::agree(
            dist,
            &settings,
            &[
                (
                    "data_sha256",
                    json!(lever_data::shards::sha256_file(&a.data)?),
                ),
                ("eval_every", json!(a.eval_every)),
                ("save_every", json!(a.save_every)),
                ("resume", json!(a.resume)),
            ],
        )?;
    }
    // Rank 0 alone has the run folder.
    let run = root.then(|| RunDir::open(&dir, start)).transpose()?;
    let mut manifest = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "lever_version": env!("CARGO_PKG_VERSION"),
        "settings": settings,
        "grad_checkpoint": a.grad_checkpoint,
    });
    if ranks > 1 {
        manifest["ranks"] = json!({"world_size": ranks, "batch_size_per_rank": a.batch_size});
    }
    if a.resume {
        if let Some(run) = &run {
            run.check_resume(&settings)?;
            trainer.load_checkpoint(&crate::pretrain::resume_from(run)?)?;
            run.truncate_metrics(trainer.step)?;
        }
        trainer.broadcast_state()?;
        manifest["resumed_at_step"] = serde_json::json!(trainer.step);
        say!("resuming at step {}", trainer.step);
    }
    crate::ranks::agree_weights(dist, trainer.step, || trainer.weights_digest())?;
    let mut metrics = match &run {
        Some(run) => {
            run.write_manifest(&manifest)?;
            Some(run.metrics()?)
        }
        None => None,
    };
    // Every rank scores its share of the validation examples; rank 0 prints.
    let val = |trainer_step: usize, decoder: &lever_model::Decoder| -> Result<Option<f64>> {
        if prepared.validation.is_empty() || a.eval_every == 0 {
            return Ok(None);
        }
        let v = evaluate_split(decoder, &prepared.validation, a.batch_size, dist)?;
        say!("step {trainer_step}: validation loss {v:.4}");
        Ok(Some(v))
    };
    let base = model
        .info
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The best validation loss so far, and where its weights are kept (rank 0).
    let best_dir = dir.join("best");
    let mut best = Best(match (&run, a.resume) {
        (Some(run), true) => run.best_val_loss(trainer.step),
        _ => None,
    });
    let mut keep_best = |step: usize, v: Option<f64>, model: &Model| -> Result<()> {
        if let Some(v) = v
            && root
            && best.improves(step, v)
        {
            trainable.save(model, &best_dir, &base)?;
        }
        Ok(())
    };
    let val_before = if a.resume {
        run.as_ref().and_then(|r| r.val_loss_at(0))
    } else {
        let v = val(0, &model.decoder)?;
        if let (Some(v), Some(metrics)) = (v, &mut metrics) {
            writeln!(metrics, "{}", serde_json::json!({"step": 0, "val_loss": v}))?;
        }
        v
    };

    let bar = if root {
        crate::progress::bar(
            a.steps as u64,
            "train [{bar:30}] {pos}/{len} {msg} eta {eta}",
            "",
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
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
        if let Some(metrics) = &mut metrics {
            writeln!(metrics, "{line}")?;
        }
        bar.set_message(format!("loss {:.4} lr {:.2e} {tps:.0} tok/s", m.loss, m.lr));
        bar.inc(1);
        if a.eval_every > 0 && m.step % a.eval_every == 0 && m.step < a.steps {
            bar.suspend(|| -> Result<()> {
                last_val = val(m.step, &model.decoder)?;
                Ok(())
            })?;
            if let Some(metrics) = &mut metrics {
                if let Some(v) = last_val {
                    writeln!(
                        metrics,
                        "{}",
                        serde_json::json!({"step": m.step, "val_loss": v})
                    )?;
                }
                metrics.flush()?;
            }
            keep_best(m.step, last_val, &model)?;
            if let Some(run) = &run {
                run.plot()?;
            }
        }
        if a.save_every > 0 && m.step % a.save_every == 0 && m.step < a.steps {
            dist.barrier();
            if let (Some(run), Some(metrics)) = (&run, &mut metrics) {
                metrics.sync_data()?;
                trainer.save_checkpoint(&run.checkpoint())?;
            }
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let val_after = val(a.steps, &model.decoder)?;
    crate::ranks::agree_weights(dist, trainer.step, || trainer.weights_digest())?;
    let (Some(run), Some(mut metrics)) = (run, metrics) else {
        return Ok(()); // Rank 0 writes the result.
    };
    let out = run.dir().to_path_buf();
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
    run.plot()?;
    let best = run.best_val_loss(a.steps);
    let best_step = best.map(|(s, _)| s);
    manifest["result"] = serde_json::json!({
        "val_loss_before": val_before, "val_loss_after": val_after,
        "best_step": best_step, "best_val_loss": best.map(|(_, v)| v),
        "seconds": secs, "tokens": tokens, "tokens_per_s": tokens as f64 / secs,
        result: result, "best": best_step.map(|_| "best"),
    });
    run.write_manifest(&manifest)?;
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
