//! `lever pretrain`: resolve the recipe, read the token shards and their tokenizer, build the
//! decoder with GPT-2's initialization, train with a progress bar (loss, tokens/s, MFU, ETA),
//! log every step to metrics.jsonl, evaluate and print a sample every N steps, checkpoint,
//! and write the result: RUN/model/ (a Hugging Face folder with the trained tokenizer) and
//! with --gguf RUN/model.gguf. Everything that can be refused (the recipe, the data, the
//! tokenizer, the run folder, --gguf) is checked before the first step.
//!
//! Under `mpirun` (the `mpi` feature, ranks.rs) every rank trains its share of each global
//! batch and averages gradients with the others; rank 0 alone prints, logs, plots and writes
//! the run folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lever_data::{ShardSet, Split};
use lever_generate::{Sampler, SamplingParams};
use lever_model::{Decoder, GenerationConfig, Model, ModelInfo, Tokenizer};
use lever_train::peak::{self, Peak};
use lever_train::pretrain::{Coverage, Poison, evaluate_split, next_token_logits};
use lever_train::{Dist, Pretrainer, Recipe, RunDir, Size, Start};
use serde_json::json;

use crate::cli::PretrainArgs;
use crate::spikes::{Guard, Handled};

/// `--debug-poison-step`'s learning-rate multiplier: an update that visibly damages the
/// model when it is applied.
const POISON_LR_FACTOR: f64 = 300.0;

/// The end-of-text token lever's tokenizers and GPT-2's have; shards made without a
/// manifest are assumed to use it.
const END_OF_TEXT: &str = "<|endoftext|>";

/// Tokens of text printed at each evaluation: 120 for small models, 32 for large ones (each
/// token is a forward pass over the window, about a second at 135M parameters).
fn sample_tokens(params: usize) -> usize {
    if params < 20_000_000 { 120 } else { 32 }
}

pub fn run(a: PretrainArgs) -> Result<()> {
    if a.supervise.supervise {
        return crate::supervise::run(&a.out, &a.supervise);
    }
    let dist = Arc::new(Dist::from_env()?);
    let result = train(a, &dist);
    crate::ranks::finish(dist, result)
}

fn train(a: PretrainArgs, dist: &Arc<Dist>) -> Result<()> {
    let root = dist.is_root();
    // Rank 0 alone prints.
    macro_rules! say {
        ($($arg:tt)*) => {
            if root {
                eprintln!($($arg)*);
            }
        };
    }
    let init = a.init.as_deref().map(Init::load).transpose()?;
    let recipe = resolve_recipe(&a, init.as_ref())?;
    if let Some(init) = &init {
        init.check_shards(&a.data)?;
    }
    let tokenizer = match &init {
        Some(i) => Some(i.tokenizer_json.as_path()),
        None => a.tokenizer.as_deref(),
    };
    let data = Data::open(&a.data, tokenizer)?;
    // A model trained further keeps its embedding table: its rows are the vocabulary.
    let vocab = match &init {
        Some(i) => i.model.decoder.config().vocab_size,
        None => data.tokenizer.vocab_size(),
    };
    data.check(&recipe, vocab)?;
    if a.gguf && init.is_none() {
        check_gguf_tokenizer(&data.tokenizer_path)?;
    }
    let mut settings = recipe_settings(&recipe)?;
    let sha = lever_data::shards::sha256_file(&data.tokenizer_path)?;
    if let Some(m) = settings.as_object_mut() {
        for (k, v) in [
            ("data", json!(a.data.display().to_string())),
            ("tokenizer_sha256", json!(sha)),
            ("tokens.train", json!(data.train.len())),
            ("tokens.val", json!(data.val.len())),
            ("vocab_size", json!(vocab)),
            ("gguf", json!(a.gguf)),
            ("init", json!(a.init)),
        ] {
            m.insert(k.into(), v);
        }
        if dist.size() > 1 {
            // The global batch: a checkpoint continues exactly at any world size with the
            // same one (ranks.rs).
            m.insert("batch_size".into(), json!(recipe.batch_size * dist.size()));
        }
    }
    if dist.size() > 1 {
        crate::ranks::agree(
            dist,
            &settings,
            &[
                ("data_sha256", json!(crate::ranks::shards_digest(&data.set))),
                ("save_every", json!(a.save_every)),
                ("resume", json!(a.resume)),
            ],
        )?;
    }
    let start = match (a.resume, a.force) {
        (true, _) => Start::Resume,
        (false, true) => Start::Over,
        (false, false) => Start::New,
    };
    // Rank 0 alone has the run folder.
    let run = root.then(|| RunDir::open(&a.out, start)).transpose()?;

    // A resumed run must have the settings it started with: checked before anything is
    // written or measured.
    // The checkpoint too: the newest intact one, found before anything is loaded.
    let resume = match (a.resume, &run) {
        (true, Some(run)) => {
            run.check_resume(&settings)?;
            Some(resume_from(run)?)
        }
        _ => None,
    };

    let (mut decoder, base) = match init {
        Some(i) => {
            say!(
                "init: {} ({} {}, dequantized to f32), context {}",
                i.reference,
                i.model.info.format,
                i.model.info.quantization,
                i.model.decoder.config().max_seq_len
            );
            let Model {
                decoder,
                tokenizer,
                chat_template,
                info,
            } = i.model;
            (decoder, Some((tokenizer, chat_template, info)))
        }
        None => {
            let cfg = recipe.decoder_config(vocab);
            let d = lever_train::init::new_decoder(&cfg, recipe.seed, &crate::device())?;
            (d, None)
        }
    };
    let vars = decoder.make_trainable()?;
    let mut trainer = Pretrainer::new(recipe.clone(), vars)?.with_dist(dist.clone());
    let size = Size::of(&recipe, vocab);
    let nanogpt = Size::nanogpt_reference(&recipe, vocab);
    let ranks = dist.size();
    say!(
        "model: {} layers, {} heads ({} key/value), width {}, MLP {}, context {}, vocabulary {vocab}: \
         {} parameters, {} FLOPs per token (nanoGPT's GPT-2 block at this size: {} parameters, {} FLOPs per token)",
        recipe.model.layers,
        recipe.model.heads,
        recipe.model.kv_heads,
        recipe.model.width,
        recipe.model.mlp_width,
        recipe.model.context,
        size.params,
        size.flops_per_token,
        nanogpt.params,
        nanogpt.flops_per_token
    );
    say!(
        "data: {} training tokens, {} validation tokens ({}); {} tokens per step{}",
        data.train.len(),
        data.val.len(),
        data.set.dir.display(),
        recipe.tokens_per_step() * ranks,
        crate::ranks::describe(ranks, recipe.batch_size)
    );
    // Every rank measures its own peak at once; MFU is over their sum.
    let mut peak = peak::measure(Duration::from_secs(1))?;
    let mut sum = [peak.flops_per_s];
    dist.all_reduce_sum_f64(&mut sum)?;
    peak.flops_per_s = sum[0];
    say!(
        "peak: {:.1} GFLOP/s (f32 {n}×{n}×{n} products through the training matmul{})",
        peak.flops_per_s / 1e9,
        crate::ranks::summed(ranks),
        n = peak.size
    );

    let mut manifest = json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "lever_version": env!("CARGO_PKG_VERSION"),
        "settings": settings,
        "tokenizer": data.tokenizer_path.display().to_string(),
        "model": {"params": size.params, "flops_per_token": size.flops_per_token},
        "nanogpt_reference": {
            "params": nanogpt.params, "flops_per_token": nanogpt.flops_per_token,
            "note": "nanoGPT's GPT-2 block (LayerNorm, learned positions, GELU MLP of 4x width, no biases, tied embedding) at the same layers, width, context and vocabulary; N counts every weight but the positions, as its get_num_params",
        },
        "flops_per_token_formula": "6*N + 12*L*H*Q*T (nanoGPT estimate_mfu, llm.c)",
        "peak": {"flops_per_s": peak.flops_per_s, "method": Peak::METHOD, "repetitions": peak.repetitions},
        "save_every": a.save_every, "keep": a.keep, "keep_every": a.keep_every,
    });
    if ranks > 1 {
        manifest["ranks"] = json!({"world_size": ranks, "batch_size_per_rank": recipe.batch_size});
    }
    if let Some(b) = a.spikes.debug_poison_step {
        trainer.poison = Some(Poison {
            batch: b,
            lr_factor: POISON_LR_FACTOR,
        });
    }
    if a.resume {
        let mut from = String::new();
        if let (Some(run), Some(dir)) = (&run, &resume) {
            trainer.load_checkpoint(dir)?;
            run.truncate_metrics(trainer.step)?;
            from = format!(" ({})", lever_train::run::name_in(run.dir(), dir));
        }
        trainer.broadcast_state()?;
        manifest["resumed_at_step"] = json!(trainer.step);
        say!("resuming at step {}{from}", trainer.step);
    }
    crate::ranks::agree_weights(dist, trainer.step, || trainer.weights_digest())?;
    let mut guard = Guard::new(&a.spikes, run.as_ref(), dist)?;
    manifest["spikes"] = guard.settings();
    let mut metrics = match &run {
        Some(run) => {
            run.write_manifest(&manifest)?;
            Some(run.metrics()?)
        }
        None => None,
    };
    // Every rank evaluates its share of the windows; rank 0 prints the loss and a sample.
    let evaluate_at = |step: usize, decoder: &Decoder| -> Result<f64> {
        let cover = if step == recipe.steps {
            Coverage::Whole
        } else {
            Coverage::Sample
        };
        let v = evaluate_split(decoder, &recipe, &data.val, cover, dist)?;
        if root {
            eprintln!("step {step}: validation loss {v:.4}");
            let n = sample_tokens(size.params);
            let text = sample(decoder, &data.tokenizer, &recipe, data.eot, step, n)?;
            eprintln!("sample: {}", text.replace('\n', "\n        "));
        }
        Ok(v)
    };
    if !a.resume {
        let v = evaluate_at(0, &decoder)?;
        if let Some(metrics) = &mut metrics {
            writeln!(metrics, "{}", json!({"step": 0, "val_loss": v}))?;
            metrics.flush()?;
        }
    }

    let steps = recipe.steps;
    let bar = if root {
        crate::progress::bar(
            steps as u64,
            "pretrain [{bar:30}] {pos}/{len} {msg} eta {eta}",
            "",
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(trainer.step as u64);
    let started = Instant::now();
    let (mut tokens, mut train_secs) = (0usize, 0f64);
    let mut last_val = None;
    while trainer.step < steps {
        if a.spikes.debug_drop_batch == Some(trainer.batches() + 1) {
            trainer.skip_batches(1, &data.train)?;
        }
        let t0 = Instant::now();
        let (m, applied) = trainer.step_with(&decoder, &data.train, |m| guard.allows(m))?;
        let secs = t0.elapsed().as_secs_f64();
        let spike = guard.handle(&m, &mut trainer, run.as_ref(), dist, &data.train)?;
        if let Some((handled, said)) = &spike {
            if root {
                bar.suspend(|| eprintln!("{said}"));
            }
            if let Handled::RolledBack = handled {
                if let Some(run) = &run {
                    // metrics.jsonl was cut back (a new file): append to that one.
                    metrics = Some(run.metrics()?);
                    run.plot()?;
                }
                bar.set_position(trainer.step as u64);
                continue;
            }
        }
        if applied && !m.loss.is_finite() {
            bail!("step {}: the loss is {} (lower --lr?)", m.step, m.loss);
        }
        tokens += m.tokens;
        train_secs += secs;
        let tps = m.tokens as f64 / secs;
        let mfu = tps * size.flops_per_token as f64 / peak.flops_per_s;
        let mut line = serde_json::to_value(&m)?;
        line["tokens_per_s"] = json!(tps);
        line["mfu"] = json!(mfu);
        line["elapsed_s"] = json!(started.elapsed().as_secs_f64());
        if spike.is_some() {
            line["spike"] = json!(true);
        }
        if !applied {
            line["skipped"] = json!(true);
        }
        let eval_due =
            m.step == steps || (recipe.eval_every > 0 && m.step % recipe.eval_every == 0);
        if eval_due {
            let v = bar.suspend(|| evaluate_at(m.step, &decoder))?;
            line["val_loss"] = json!(v);
            last_val = Some(v);
        }
        bar.set_message(format!(
            "loss {:.4} | {tps:.0} tok/s | MFU {:.1}%",
            m.loss,
            100.0 * mfu
        ));
        bar.inc(1);
        let save_due = a.save_every > 0 && m.step % a.save_every == 0 && m.step < steps;
        if save_due {
            dist.barrier();
        }
        let (Some(run), Some(metrics)) = (&run, &mut metrics) else {
            continue;
        };
        writeln!(metrics, "{line}")?;
        if eval_due || spike.is_some() {
            metrics.flush()?;
            run.plot()?;
        }
        if save_due {
            metrics.sync_data()?;
            trainer.save_checkpoint(&run.checkpoint())?;
            lever_train::checkpoint::snapshot_and_prune(
                &run.checkpoints(),
                m.step as u64,
                a.keep,
                a.keep_every as u64,
            )?;
        }
    }
    bar.finish_and_clear();
    crate::ranks::agree_weights(dist, trainer.step, || trainer.weights_digest())?;
    let (Some(run), Some(mut metrics)) = (run, metrics) else {
        return Ok(()); // Rank 0 writes the result.
    };
    metrics.flush()?;
    run.plot()?;

    let model = match base {
        // Trained further: the model's own tokenizer, chat template and metadata, its
        // weights now f32.
        Some((tokenizer, chat_template, info)) => Model {
            decoder,
            tokenizer,
            chat_template,
            info: ModelInfo {
                quantization: "F32".into(),
                ..info
            },
        },
        None => Model {
            decoder,
            tokenizer: data.tokenizer.clone(),
            chat_template: None,
            info: ModelInfo {
                path: data.tokenizer_path.clone(),
                format: "pretrained",
                quantization: "F32".into(),
                generation: GenerationConfig::default(),
                adapter: None,
            },
        },
    };
    let model_dir = run.dir().join("model");
    lever_model::formats::export::write_hf(&model, &model_dir)?;
    let gguf = run.dir().join("model.gguf");
    if a.gguf {
        lever_model::formats::export::write_gguf(
            &model,
            &gguf,
            candle_core::quantized::GgmlDType::F32,
        )?;
    }
    let val_loss = match last_val {
        Some(v) => Some(v),
        None => run.val_loss_at(steps),
    };
    manifest["result"] = json!({
        "steps": steps, "val_loss": val_loss,
        "seconds": started.elapsed().as_secs_f64(), "train_seconds": train_secs,
        "tokens": tokens, "tokens_per_s": tokens as f64 / train_secs.max(1e-9),
        "mfu": tokens as f64 / train_secs.max(1e-9) * size.flops_per_token as f64 / peak.flops_per_s,
        "model": "model", "gguf": a.gguf.then_some("model.gguf"),
    });
    run.write_manifest(&manifest)?;
    eprintln!(
        "trained {} steps in {:.1}s ({:.0} tokens/s); validation loss {}; model written to {}{}",
        steps - manifest["resumed_at_step"].as_u64().unwrap_or(0) as usize,
        train_secs,
        tokens as f64 / train_secs.max(1e-9),
        val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        model_dir.display(),
        if a.gguf {
            format!(" and {}", gguf.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// The model `--init` names, loaded, and the tokenizer.json its shards must have been made
/// with.
struct Init {
    reference: String,
    model: Model,
    tokenizer_json: PathBuf,
}

impl Init {
    fn load(reference: &str) -> Result<Init> {
        let model = crate::load_model(&crate::cli::ModelArg {
            model: reference.into(),
            adapter: None,
        })?;
        let tokenizer_json = crate::pretrain_data::tokenizer_json(reference)?;
        Ok(Init {
            reference: reference.into(),
            model,
            tokenizer_json,
        })
    }

    /// Shards made with another tokenizer than the model's are refused, naming both.
    fn check_shards(&self, dir: &Path) -> Result<()> {
        let Ok(set) = ShardSet::open(dir) else {
            return Ok(()); // Data::open names the problem.
        };
        let Some(m) = &set.manifest else {
            return Ok(()); // llm.c's or nanoGPT's shards: no tokenizer named to compare.
        };
        let sha = lever_data::shards::sha256_file(&self.tokenizer_json)?;
        if sha != m.tokenizer.sha256 {
            bail!(
                "{}: the shards were made with tokenizer {}, not with {}'s; make them again \
                 with `lever data shard ... --tokenizer {}`",
                dir.display(),
                m.tokenizer.path,
                self.reference,
                self.reference
            );
        }
        Ok(())
    }
}

/// The recipe with the command line's overrides, checked. With --init the model's shape
/// replaces the recipe's, and the default recipe is smollm2-135m's at a tenth of its
/// learning rate (a model trained further should not be shaken out of what it knows).
fn resolve_recipe(a: &PretrainArgs, init: Option<&Init>) -> Result<Recipe> {
    let mut r = Recipe::load(a.config.as_deref().unwrap_or("smollm2-135m"))?;
    if let Some(i) = init {
        let cfg = i.model.decoder.config();
        if let Some(c) = a.context.filter(|&c| c > cfg.max_seq_len) {
            bail!(
                "--context {c}: longer than {}'s context of {} tokens",
                i.reference,
                cfg.max_seq_len
            );
        }
        r.with_model_of(cfg, a.context.unwrap_or(r.model.context));
        if a.config.is_none() {
            r.name = format!("continued:{}", i.reference);
            r.lr = 1e-4;
            r.min_lr = 1e-5;
        }
    } else if let Some(c) = a.context {
        r.model.context = c;
    }
    if let Some(s) = a.steps {
        // With --init the warmup is at most a tenth of a shorter run.
        if init.is_some() {
            r.warmup_steps = r.warmup_steps.min(s / 10);
        }
        // The cosine follows the steps, as nanoGPT's README sets lr_decay_iters = max_iters.
        if r.decay_steps == r.steps {
            r.decay_steps = s;
        }
        r.steps = s;
    }
    let set = |dst: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *dst = v;
        }
    };
    set(&mut r.batch_size, a.batch_size);
    set(&mut r.grad_accum, a.grad_accum);
    set(&mut r.eval_every, a.eval_every);
    if let Some(lr) = a.lr {
        r.lr = lr;
        r.min_lr = r.min_lr.min(lr);
    }
    if let Some(s) = a.seed {
        r.seed = s;
    }
    r.validate()?;
    Ok(r)
}

/// The recipe as flat settings ("lr", "model.layers", ...), so that a resumed run with
/// another value is refused naming that one.
fn recipe_settings(recipe: &Recipe) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    if let serde_json::Value::Object(fields) = serde_json::to_value(recipe)? {
        for (k, v) in fields {
            match v {
                serde_json::Value::Object(inner) => {
                    for (k2, v2) in inner {
                        out.insert(format!("{k}.{k2}"), v2);
                    }
                }
                v => {
                    out.insert(k, v);
                }
            }
        }
    }
    Ok(serde_json::Value::Object(out))
}

/// The token shards, read whole, and the tokenizer they were made with.
struct Data {
    set: ShardSet,
    train: Vec<u32>,
    val: Vec<u32>,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    eot: u32,
}

impl Data {
    fn open(dir: &Path, tokenizer: Option<&Path>) -> Result<Data> {
        let set = ShardSet::open(dir)?;
        let (path, eot_name) = match (&set.manifest, tokenizer) {
            (Some(m), t) => {
                let path = t.map_or_else(|| PathBuf::from(&m.tokenizer.path), Path::to_path_buf);
                if !path.is_file() {
                    bail!(
                        "{}: the shards' tokenizer {} is not there; pass --tokenizer",
                        dir.display(),
                        path.display()
                    );
                }
                m.check_tokenizer(dir, &path)?;
                (path, m.tokenizer.eot.clone())
            }
            (None, Some(t)) => (t.to_path_buf(), END_OF_TEXT.to_string()),
            (None, None) => bail!(
                "{}: shards without a manifest (llm.c's or nanoGPT's); name their tokenizer with --tokenizer",
                dir.display()
            ),
        };
        let tokenizer = Tokenizer::from_file(&path, Some(&eot_name), Some(&eot_name))?;
        let eot = tokenizer.token_to_id(&eot_name).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no end-of-text token `{eot_name}` (documents start with it)",
                path.display()
            )
        })?;
        let train = set.read_all(Split::Train)?;
        let val = set.read_all(Split::Val)?;
        Ok(Data {
            set,
            train,
            val,
            tokenizer,
            tokenizer_path: path,
            eot,
        })
    }

    /// Refuse data the recipe cannot train on: empty splits, splits shorter than a window,
    /// token ids outside the tokenizer's vocabulary.
    fn check(&self, recipe: &Recipe, vocab: usize) -> Result<()> {
        let t = recipe.model.context;
        for (name, tokens) in [("training", &self.train), ("validation", &self.val)] {
            if tokens.is_empty() {
                bail!(
                    "{}: no {name} tokens (empty shards)",
                    self.set.dir.display()
                );
            }
            if tokens.len() <= t {
                bail!(
                    "{}: {} {name} tokens, fewer than one window of the context ({t}) plus one; \
                     use a shorter context or more data",
                    self.set.dir.display(),
                    tokens.len()
                );
            }
            if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
                bail!(
                    "{}: {name} token id {id} is outside the tokenizer's vocabulary of {vocab}",
                    self.set.dir.display()
                );
            }
        }
        Ok(())
    }
}

/// llama.cpp reads byte-level BPE vocabularies (its `gpt2` tokenizer model): refuse --gguf
/// for any other before training rather than after.
fn check_gguf_tokenizer(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let tk: serde_json::Value =
        serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let model = tk.pointer("/model/type").and_then(|v| v.as_str());
    let decoder = tk.pointer("/decoder/type").and_then(|v| v.as_str());
    if model != Some("BPE") || decoder != Some("ByteLevel") {
        bail!(
            "--gguf: {} is a {} tokenizer; llama.cpp's GGUF needs a byte-level BPE one \
             (`lever tokenizer train --kind bpe`), or leave out --gguf",
            path.display(),
            model.unwrap_or("non-BPE")
        );
    }
    Ok(())
}

/// A short text from the model after the end-of-text token (temperature 0.8, top-k 200,
/// as nanoGPT's sample.py), seeded by the step.
fn sample(
    decoder: &Decoder,
    tokenizer: &Tokenizer,
    recipe: &Recipe,
    eot: u32,
    step: usize,
    n: usize,
) -> Result<String> {
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.8,
        top_k: 200,
        seed: recipe.seed ^ step as u64,
        ..SamplingParams::greedy()
    });
    let mut ids = vec![eot];
    for _ in 0..n {
        let logits = next_token_logits(decoder, &ids)?;
        let next = sampler.sample(&logits, &ids);
        if next == eot {
            break;
        }
        ids.push(next);
    }
    Ok(tokenizer.decode(&ids[1..]))
}

/// The newest complete, intact checkpoint of the run, with a one-line warning for each newer
/// one that is torn or corrupt (shared with `lever finetune`).
pub fn resume_from(run: &RunDir) -> Result<PathBuf> {
    let (good, skipped) = run.resume_checkpoint()?;
    for s in &skipped {
        eprintln!(
            "warning: skipping checkpoint {}: {}; resuming from {} (step {})",
            s.dir.display(),
            s.problem,
            lever_train::run::name_in(run.dir(), &good.dir),
            good.step
        );
    }
    Ok(good.dir)
}
