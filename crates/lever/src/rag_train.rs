//! `lever rag train`: the retriever's query encoder and a LoRA adapter on the generator,
//! trained together on the marginal likelihood of each question's answer over its top-k
//! passages (lever-train's rag.rs; Lewis et al. 2020 §2). The index and its document vectors
//! stay as they are. The run folder is fine-tuning's: manifest, metrics.jsonl, loss.png,
//! checkpoints with exact resume; the results are RUN/query-encoder/ (a sentence-transformers
//! folder) and RUN/adapter/ (PEFT).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use lever_rag::embedder::BertEmbed;
use lever_rag::prompt::{self, Passage};
use lever_rag::{Embed, Index};
use lever_train::rag::{Documents, Formulation, QaExample, RagSetup};
use lever_train::{LoraConfig, LoraSet, RunDir, Start, TrainConfig, Trainer};
use serde_json::{Value, json};

use crate::cli::RagTrainArgs;

/// A question of the training or validation file.
struct Question {
    example: QaExample,
    gold_ids: Vec<String>,
}

/// Read a questions file: every line a JSON object with a non-empty `text` and a non-empty
/// list of `answers` (the first one is trained); `gold_ids` optional. Errors name the line.
fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{at}: invalid JSON ({e})"))?;
        let question = match v.get("text").and_then(Value::as_str) {
            Some(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => bail!("{at}: field `text` is missing or empty (the question)"),
        };
        let answers = v.get("answers").and_then(Value::as_array);
        let answer = match answers.and_then(|a| a.first()).and_then(Value::as_str) {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ => bail!(
                "{at}: field `answers` is missing, empty or not a list of strings (a question to train on needs an answer)"
            ),
        };
        let gold_ids = v
            .get("gold_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Question {
            example: QaExample { question, answer },
            gold_ids,
        });
    }
    if out.is_empty() {
        bail!("{}: no questions", path.display());
    }
    Ok(out)
}

/// The passages of an index as `rag ask` shows them to the model, read once each.
struct Passages<'a> {
    index: &'a Index,
    cwd: Option<PathBuf>,
    cache: RefCell<HashMap<u64, Passage>>,
    /// Lines of the JSONL sources, for the `_id` of a passage.
    sources: RefCell<HashMap<PathBuf, Vec<String>>>,
}

impl<'a> Passages<'a> {
    fn new(index: &'a Index) -> Self {
        Self {
            index,
            cwd: std::env::current_dir().ok(),
            cache: RefCell::new(HashMap::new()),
            sources: RefCell::new(HashMap::new()),
        }
    }

    /// Chunk `id` as a passage, its path shown relative to the working directory (as
    /// `lever_rag::answer::passages` does).
    fn get(&self, id: u64) -> Result<Passage> {
        if let Some(p) = self.cache.borrow().get(&id) {
            return Ok(p.clone());
        }
        let c = self.index.chunk(id as i64)?.ok_or_else(|| {
            anyhow::anyhow!("{}: chunk {id} vanished", self.index.dir().display())
        })?;
        let p = Passage::from_chunk(c, 0.0, self.cwd.as_deref());
        self.cache.borrow_mut().insert(id, p.clone());
        Ok(p)
    }

    /// The user turn grounding `question` on passage `id` alone: `rag ask`'s prompt with one
    /// passage.
    fn user_turn(&self, question: &str, id: u64) -> Result<String> {
        Ok(prompt::user_turn(question, &[self.get(id)?.block(1)]))
    }

    /// The `_id` of the JSONL record passage `id` came from (a record is cited by its line),
    /// for recall of gold ids; None for other sources.
    fn record_id(&self, id: u64) -> Result<Option<String>> {
        let c = self.index.chunk(id as i64)?;
        let Some(c) = c else { return Ok(None) };
        if c.path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
            return Ok(None);
        }
        let mut sources = self.sources.borrow_mut();
        if !sources.contains_key(&c.path) {
            let text = std::fs::read_to_string(&c.path)
                .with_context(|| format!("{} (a source of the index)", c.path.display()))?;
            sources.insert(c.path.clone(), text.lines().map(str::to_string).collect());
        }
        let line = sources[&c.path].get(c.line_start.saturating_sub(1));
        Ok(line
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| v.get("_id").and_then(Value::as_str).map(str::to_string)))
    }
}

/// Mean loss and recall@1/5/20 of the gold ids over held-out questions.
struct ValReport {
    loss: f64,
    /// recall@1, @5, @20: the fraction of questions with gold ids that have one among the
    /// first 1, 5, 20 passages (None when no question has gold ids).
    recall: [Option<f64>; 3],
}

const RECALL_AT: [usize; 3] = [1, 5, 20];

fn validate(setup: &RagSetup<'_>, passages: &Passages<'_>, val: &[Question]) -> Result<ValReport> {
    let mut loss = 0f64;
    let (mut hits, mut judged) = ([0usize; 3], 0usize);
    for q in val {
        loss += setup
            .question_loss(&q.example)?
            .nll
            .detach()
            .to_scalar::<f32>()? as f64;
        if q.gold_ids.is_empty() {
            continue;
        }
        let v = setup.encoder.embed(&[q.example.question.as_str()])?;
        let rows = setup.docs.top_k(&v.vectors[0], RECALL_AT[2]);
        let mut ids = Vec::new();
        for r in rows {
            ids.push(passages.record_id(setup.docs.ids[r])?);
        }
        let gold = |id: &Option<String>| id.as_ref().is_some_and(|x| q.gold_ids.contains(x));
        judged += 1;
        for (h, k) in hits.iter_mut().zip(RECALL_AT) {
            *h += ids.iter().take(k).any(gold) as usize;
        }
    }
    Ok(ValReport {
        loss: loss / val.len() as f64,
        recall: hits.map(|h| (judged > 0).then(|| h as f64 / judged as f64)),
    })
}

pub fn run(a: RagTrainArgs) -> Result<()> {
    let formulation: Formulation = a.formulation.parse().map_err(anyhow::Error::msg)?;
    let encoder_layers = match a.encoder_layers.as_str() {
        "all" => None,
        n => Some(n.parse::<usize>().map_err(|_| {
            anyhow::anyhow!("--encoder-layers {n}: expected `all` or a number of layers")
        })?),
    };
    let questions = read_questions(&a.data)?;
    let val = a.val.as_deref().map(read_questions).transpose()?;
    let index = crate::rag::open(&a.index.index)?;
    let chunks = index.stats()?.chunks as usize;
    if chunks == 0 {
        return Err(lever_rag::Error::EmptyIndex {
            path: index.dir().to_path_buf(),
        }
        .into());
    }
    if a.k > chunks {
        bail!(
            "-k {}: the index {} holds only {chunks} passages",
            a.k,
            index.dir().display()
        );
    }
    // The query encoder starts from the index's own encoder, and nothing else.
    let embed = BertEmbed::new(crate::embed::load_encoder(&a.index.embedder, 32)?)?;
    index.check_embedder(&embed)?;
    let document_encoder = embed.id();
    let mut encoder = embed.encoder().clone();
    drop(embed);
    // Never cut silently: a question past the encoder's limit is cut as sentence-transformers
    // cuts it, and counted.
    let texts: Vec<&str> = questions
        .iter()
        .chain(val.iter().flatten())
        .map(|q| q.example.question.as_str())
        .collect();
    let cut = encoder
        .tokenize(&texts)?
        .iter()
        .filter(|t| t.truncated)
        .count();
    if cut > 0 {
        eprintln!(
            "warning: {cut} question(s) are longer than the encoder's {} tokens and are cut to it",
            encoder.max_tokens()
        );
    }
    let matrix = index.load_vectors()?;
    let docs = Documents {
        dim: matrix.dim,
        ids: matrix.ids,
        data: matrix.data,
    };

    let mut model = crate::load_model(&a.model.without_adapter())?;
    let Some(template) = model.chat_template.clone() else {
        bail!(
            "{}: the generator has no chat template (rag train prompts as `rag ask` does)",
            model.info.path.display()
        );
    };
    let lora = LoraConfig {
        r: a.lora_r,
        alpha: a.lora_alpha,
        dropout: a.lora_dropout,
        targets: LoraConfig::parse_targets(&a.lora_targets)?,
    };
    let adapters = LoraSet::attach(&mut model.decoder, &lora, a.seed)?;
    let enc_vars = encoder
        .model
        .make_trainable(encoder_layers)
        .map_err(|e| anyhow::anyhow!("--encoder-layers {}: {e}", a.encoder_layers))?;
    let enc_params: usize = enc_vars.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "query encoder: {} ({} tensors, {enc_params} trainable parameters); generator adapter: r={} on {} projections, {} parameters; {} passages in the index",
        if encoder_layers.is_none() {
            "all weights".to_string()
        } else {
            format!("top {} layers", a.encoder_layers)
        },
        enc_vars.len(),
        lora.r,
        adapters.adapters.len(),
        adapters.parameter_count(),
        docs.len()
    );
    let mut vars: Vec<candle_core::Var> = enc_vars.iter().map(|(_, v)| v.clone()).collect();
    let mut scales = vec![a.encoder_lr / a.lr; vars.len()];
    vars.extend(adapters.vars());
    scales.resize(vars.len(), 1.0);
    let config = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: 1,
        lr: a.lr,
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        seed: a.seed,
        checkpoint: false,
    };
    let mut trainer = Trainer::new(config.clone(), vars.clone())?
        .with_lr_scales(scales)?
        .with_dropout_key(adapters.dropout_key.clone());

    let start = match (a.resume, a.force) {
        (true, _) => Start::Resume,
        (false, true) => Start::Over,
        (false, false) => Start::New,
    };
    let settings = json!({
        "model": model.info.path.display().to_string(),
        "data": a.data.display().to_string(),
        "index": a.index.index.display().to_string(),
        "embedder": document_encoder,
        "formulation": formulation.name(),
        "k": a.k,
        "doc_temperature": a.doc_temperature,
        "train": config,
        "encoder_lr": a.encoder_lr,
        "encoder_layers": a.encoder_layers,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets},
        "questions": questions.len(),
        "val": a.val.as_ref().map(|p| p.display().to_string()),
    });
    let run = RunDir::open(&a.out, start)?;
    eprintln!("run folder: {}", run.dir().display());
    let mut manifest = json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "lever_version": env!("CARGO_PKG_VERSION"),
        "settings": settings,
    });
    if a.resume {
        run.check_resume(&settings)?;
        trainer.load_checkpoint(&crate::pretrain::resume_from(&run)?)?;
        run.truncate_metrics(trainer.step)?;
        manifest["resumed_at_step"] = json!(trainer.step);
        eprintln!("resuming at step {}", trainer.step);
    }
    run.write_manifest(&manifest)?;
    let mut metrics = run.metrics()?;

    let passages = Passages::new(&index);
    let ground = |question: &str, id: u64| -> lever_train::Result<String> {
        passages
            .user_turn(question, id)
            .map_err(|e| lever_train::Error::Config {
                what: index.dir().display().to_string(),
                problem: format!("{e:#}"),
            })
    };
    let examples: Vec<QaExample> = questions.iter().map(|q| q.example.clone()).collect();

    let val_line = |step: usize, r: &ValReport| json!({"step": step, "val_loss": r.loss, "recall@1": r.recall[0], "recall@5": r.recall[1], "recall@20": r.recall[2]});
    let say_val = |when: &str, r: &ValReport| {
        let pct = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.1}%", 100.0 * x));
        eprintln!(
            "validation {when}: loss {:.4}, recall@1 {}, recall@5 {}, recall@20 {}",
            r.loss,
            pct(r.recall[0]),
            pct(r.recall[1]),
            pct(r.recall[2])
        );
    };
    let setup = RagSetup {
        encoder: &encoder,
        decoder: &model.decoder,
        tokenizer: &model.tokenizer,
        template: &template,
        docs: &docs,
        ground: &ground,
        k: a.k,
        temperature: a.doc_temperature,
        formulation,
    };
    let val_before = match (&val, a.resume) {
        (Some(v), false) => {
            let r = validate(&setup, &passages, v)?;
            say_val("before", &r);
            writeln!(metrics, "{}", val_line(0, &r))?;
            Some(val_line(0, &r))
        }
        // A resumed run keeps the first start's line.
        (Some(_), true) => std::fs::read_to_string(run.metrics_path())?
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["step"] == 0 && v.get("val_loss").is_some()),
        (None, _) => None,
    };

    let bar = crate::progress::bar(
        a.steps as u64,
        "rag train [{bar:30}] {pos}/{len} {msg} eta {eta}",
        "",
    );
    bar.set_position(trainer.step as u64);
    let started = Instant::now();
    let mut tokens = 0usize;
    while trainer.step < a.steps {
        let t0 = Instant::now();
        let m = trainer.step_with(
            examples.len(),
            |_| 1,
            |idx, divisor| setup.micro_step(&examples, idx, divisor, &vars),
        )?;
        if !m.loss.is_finite() {
            bail!("step {}: the loss is {} (lower --lr?)", m.step, m.loss);
        }
        tokens += m.tokens;
        let tps = m.tokens as f64 / t0.elapsed().as_secs_f64();
        let mut line = serde_json::to_value(&m)?;
        line["questions"] = json!(a.batch_size);
        line["tokens_per_s"] = json!(tps);
        line["elapsed_s"] = json!(started.elapsed().as_secs_f64());
        writeln!(metrics, "{line}")?;
        bar.set_message(format!("loss {:.4} lr {:.2e} {tps:.0} tok/s", m.loss, m.lr));
        bar.inc(1);
        if a.save_every > 0 && m.step % a.save_every == 0 && m.step < a.steps {
            metrics.sync_data()?;
            trainer.save_checkpoint(&run.checkpoint())?;
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let val_after = match &val {
        Some(v) => {
            let r = validate(&setup, &passages, v)?;
            say_val("after", &r);
            writeln!(metrics, "{}", val_line(a.steps, &r))?;
            Some(val_line(a.steps, &r))
        }
        None => None,
    };
    metrics.flush()?;

    let out = run.dir().to_path_buf();
    let pairing = json!({
        "document_encoder": document_encoder,
        "index": a.index.index.display().to_string(),
        "note": "a query encoder trained by `lever rag train` for the index whose vectors document_encoder made",
    });
    encoder.write_folder(
        &out.join("query-encoder"),
        &[(
            "lever_query_encoder.json",
            serde_json::to_string_pretty(&pairing)? + "\n",
        )],
    )?;
    let base = model
        .info
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    adapters.save_peft(&model.decoder, &out.join("adapter"), &base)?;
    run.plot()?;
    manifest["result"] = json!({
        "val_before": val_before, "val_after": val_after,
        "seconds": secs, "tokens": tokens, "tokens_per_s": tokens as f64 / secs.max(1e-9),
        "query_encoder": "query-encoder", "adapter": "adapter",
    });
    run.write_manifest(&manifest)?;
    eprintln!(
        "trained {} steps in {secs:.1}s ({:.0} tok/s); query encoder and adapter written to {}",
        a.steps,
        tokens as f64 / secs.max(1e-9),
        out.display()
    );
    Ok(())
}
