//! `lever tokenizer train` and `lever data shard`: a tokenizer and token shards for
//! pretraining. Their clap definitions are here (cli.rs names the two command groups); the
//! work is lever-data's (`tokenizer_train.rs`, `sharding.rs`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::ProgressBar;
use lever_data::sharding::{ShardOptions, ShardProgress};
use lever_data::tokenizer_train::{self, END_OF_TEXT, Kind, TrainEvent, TrainOptions};
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Train a tokenizer on UTF-8 text files: byte-level BPE (the `tokenizers` crate's
    /// trainer) or a character vocabulary (nanoGPT's shakespeare_char). Writes
    /// OUT/tokenizer.json (Hugging Face's format) and OUT/tokenizer_config.json.
    Train(TokenizerTrainArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Byte-level BPE, as GPT-2's.
    Bpe,
    /// Every distinct character of the corpus, in code-point order, then the special tokens.
    Char,
}

#[derive(Debug, Args)]
pub struct TokenizerTrainArgs {
    /// The corpus: UTF-8 text files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Vocabulary size, special tokens included. BPE: required, at least 256 + the special
    /// tokens. char: the corpus's alphabet + the special tokens (checked when given).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// The folder to write.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "bpe")]
    pub kind: KindArg,
    /// BPE: merge a pair only if it occurs at least this often (default 0, as Hugging Face's
    /// BpeTrainer).
    #[arg(long)]
    pub min_frequency: Option<u64>,
    /// The end-of-text token (the first special token).
    #[arg(long, default_value = END_OF_TEXT, value_name = "TOKEN")]
    pub eot: String,
    /// More special tokens, after the end-of-text token (repeatable).
    #[arg(long = "special", value_name = "TOKEN")]
    pub special: Vec<String>,
    /// Replace OUT if it exists and holds files.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Token shards for pretraining in llm.c's format (256 × int32 header, then uint16 or
    /// uint32 tokens) and OUT/manifest.json, from text files, folders and JSONL (`text`).
    Shard(DataShardArgs),
}

#[derive(Debug, Args)]
pub struct DataShardArgs {
    /// Text files, folders (searched for .txt, .text, .md and .jsonl) and JSONL files.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// The tokenizer: a tokenizer.json, a folder holding one (a Hugging Face model), or a
    /// model whose tokenizer to use (a .gguf file or a registry name: its tokenizer is
    /// written out once to lever's cache), for continued pretraining with `--init`.
    #[arg(long, value_name = "FILE|DIR|MODEL")]
    pub tokenizer: String,
    /// The folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The share of the input (its last bytes) that becomes the validation split.
    #[arg(long, default_value_t = 0.005, value_parser = fraction)]
    pub val_fraction: f64,
    /// Tokens per shard (llm.c's --shard_size).
    #[arg(long, default_value_t = 100_000_000, value_parser = shard_tokens)]
    pub shard_tokens: u64,
    /// The end-of-text token every document starts with.
    #[arg(long, default_value = END_OF_TEXT, value_name = "TOKEN")]
    pub eot: String,
    /// Replace OUT if it exists and holds files.
    #[arg(long)]
    pub force: bool,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..1.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?} is not a fraction in [0, 1)")),
    }
}

fn shard_tokens(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n >= 1 && n <= i32::MAX as u64 => Ok(n),
        _ => Err(format!(
            "{s:?} is not a token count in 1..={} (llm.c's header holds an int32)",
            i32::MAX
        )),
    }
}

pub fn tokenizer(c: TokenizerCommand) -> Result<()> {
    match c {
        TokenizerCommand::Train(a) => train(a),
    }
}

pub fn data(c: DataCommand) -> Result<()> {
    match c {
        DataCommand::Shard(a) => shard(a),
    }
}

fn train(a: TokenizerTrainArgs) -> Result<()> {
    crate::check_target(&a.out, a.force)?;
    let kind = match a.kind {
        KindArg::Bpe => Kind::Bpe,
        KindArg::Char => Kind::Char,
    };
    if kind == Kind::Char && a.min_frequency.is_some() {
        anyhow::bail!(
            "--min-frequency: merges are BPE's; a character vocabulary keeps every character"
        );
    }
    let opts = TrainOptions {
        kind,
        vocab_size: a.vocab_size,
        min_frequency: a.min_frequency.unwrap_or(0),
        special: std::iter::once(a.eot.clone()).chain(a.special).collect(),
    };
    let t0 = Instant::now();
    let bar: Mutex<Option<ProgressBar>> = Mutex::new(None);
    let show = !a.json;
    let on_event = |e: TrainEvent| {
        if !show {
            return;
        }
        let Ok(mut bar) = bar.lock() else { return };
        match e {
            TrainEvent::Read { bytes, total } => bar
                .get_or_insert_with(|| {
                    crate::progress::bar(
                        total,
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        "reading the corpus",
                    )
                })
                .set_position(bytes),
            TrainEvent::Merging { words } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let b = crate::progress::bar(
                    0,
                    "{msg} {spinner} {elapsed}",
                    &format!("learning merges over {words} distinct words"),
                );
                b.enable_steady_tick(std::time::Duration::from_millis(200));
                *bar = Some(b);
            }
        }
    };
    let trained = tokenizer_train::train(&a.files, &opts, &on_event)?;
    if let Some(b) = bar.lock().ok().and_then(|mut b| b.take()) {
        b.finish_and_clear();
    }
    trained.write(&a.out)?;
    let secs = t0.elapsed().as_secs_f64();
    let path = a.out.join("tokenizer.json");
    if a.json {
        println!(
            "{}",
            json!({
                "tokenizer": path, "kind": a.kind.to_possible_value().map(|v| v.get_name().to_string()),
                "vocab_size": trained.vocab_size, "alphabet": trained.alphabet,
                "merges": trained.merges, "special": opts.special, "eot_id": trained.eot_id,
                "bytes": trained.bytes, "seconds": secs,
            })
        );
        return Ok(());
    }
    let parts = match kind {
        Kind::Bpe => format!(
            "{} bytes + {} merges + {} special",
            trained.alphabet,
            trained.merges,
            opts.special.len()
        ),
        Kind::Char => format!(
            "{} characters + {} special",
            trained.alphabet,
            opts.special.len()
        ),
    };
    println!(
        "wrote {}: vocabulary {} ({parts}), {} id {}; {:.1} MB read in {secs:.1} s",
        path.display(),
        trained.vocab_size,
        a.eot,
        trained.eot_id,
        trained.bytes as f64 / 1e6
    );
    if let Some(asked) = a
        .vocab_size
        .filter(|&v| v > trained.vocab_size && kind == Kind::Bpe)
    {
        eprintln!(
            "note: {asked} asked for, but the corpus has no more pairs to merge{}",
            if opts.min_frequency > 0 {
                format!(" at least {} times", opts.min_frequency)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// The tokenizer.json that `reference` names: a .json file or a folder as they are, the
/// tokenizer.json of a Hugging Face model folder, or the tokenizer of a GGUF model (a file or a
/// registry name) written out as a tokenizer.json under lever's cache, named by its sha256, so
/// that shards made with it and `lever pretrain --init` of the same model agree on its hash.
pub fn tokenizer_json(reference: &str) -> Result<PathBuf> {
    let path = Path::new(reference);
    if path.is_dir() {
        return Ok(path.join("tokenizer.json"));
    }
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if path.is_file() && !is_gguf {
        return Ok(path.to_path_buf());
    }
    if !path.exists() && lever_model::registry::find(reference).is_none() {
        // Named as a file that is not there: the loader says so, naming it.
        return Ok(path.to_path_buf());
    }
    let home = lever_model::registry::lever_home();
    let source =
        lever_model::model::resolve(reference, &home, &mut crate::progress::provisioning())?;
    match source {
        lever_model::ModelSource::HfFolder(dir) => Ok(dir.join("tokenizer.json")),
        lever_model::ModelSource::Gguf(file) => gguf_tokenizer_json(&file, &home),
    }
}

/// The tokenizer of a GGUF file as a tokenizer.json in `home`'s cache (written once).
fn gguf_tokenizer_json(gguf: &Path, home: &Path) -> Result<PathBuf> {
    let source = lever_model::ModelSource::Gguf(gguf.to_path_buf());
    let json = lever_model::Model::load(&source, &crate::device())?
        .tokenizer
        .to_hf_json()?;
    let sha: String = Sha256::digest(json.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stem = gguf
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy());
    let dir = home
        .join("cache")
        .join("tokenizers")
        .join(format!("{stem}-{}", &sha[..12]));
    let file = dir.join("tokenizer.json");
    if !file.is_file() {
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        lever_model::fsutil::write_atomic(&file, |tmp| -> Result<()> {
            std::fs::write(tmp, &json).with_context(|| file.display().to_string())
        })?;
    }
    Ok(file)
}

fn shard(a: DataShardArgs) -> Result<()> {
    crate::check_target(&a.out, a.force)?;
    let opts = ShardOptions {
        tokenizer: tokenizer_json(&a.tokenizer)?,
        eot: a.eot.clone(),
        val_fraction: a.val_fraction,
        shard_tokens: a.shard_tokens,
    };
    let t0 = Instant::now();
    let mut bar: Option<ProgressBar> = None;
    let mut on_progress = |p: ShardProgress| {
        if a.json {
            return;
        }
        let b = bar.get_or_insert_with(|| {
            crate::progress::bar(
                p.total_bytes,
                "{msg} [{bar:30}] {bytes}/{total_bytes} eta {eta}",
                "sharding",
            )
        });
        let tps = p.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        b.set_message(format!("sharding: {} tokens, {tps:.0} tokens/s", p.tokens));
        b.set_position(p.bytes);
    };
    let done = lever_data::sharding::shard(&a.inputs, &a.out, &opts, &mut on_progress)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let secs = t0.elapsed().as_secs_f64();
    let m = &done.manifest;
    if a.json {
        println!("{}", serde_json::to_string(m)?);
        return Ok(());
    }
    for (path, why) in &done.skipped {
        eprintln!("skipped {}: {why}", path.display());
    }
    let total = m.tokens.train + m.tokens.val;
    println!(
        "wrote {}: {} train + {} val tokens in {} shard(s) ({}), {} document(s), {:.1} s, \
         {:.0} tokens/s; tokenizer {} (vocabulary {}, {} id {}, sha256 {})",
        a.out.display(),
        m.tokens.train,
        m.tokens.val,
        m.shards.len(),
        match m.dtype {
            lever_data::shards::Dtype::U16 => "uint16",
            lever_data::shards::Dtype::U32 => "uint32",
        },
        m.documents,
        secs,
        total as f64 / secs.max(1e-9),
        m.tokenizer.path,
        m.tokenizer.vocab_size,
        m.tokenizer.eot,
        m.tokenizer.eot_id,
        &m.tokenizer.sha256[..12],
    );
    if !done.piecewise {
        eprintln!(
            "note: this tokenizer's pre-tokenizer is not one lever can cut at line ends, so \
             each text file was encoded whole"
        );
    }
    Ok(())
}
