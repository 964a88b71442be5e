//! The `lever` binary: parse (cli.rs), resolve settings, call a library, print.
//! Exit codes: 0 ok, 1 failure, 2 bad usage.

mod ask;
mod chat;
mod cli;
mod embed;
mod eval;
mod export;
mod finetune;
mod generator;
mod ladder;
mod ladder_report;
mod measure;
mod models;
mod plan;
mod pretrain;
mod pretrain_data;
mod progress;
mod rag;
mod rag_setting;
mod rag_train;
mod ranks;
mod serve;
mod spikes;
mod supervise;

use std::process::ExitCode;

use anyhow::Result;
use candle_core::Device;
use clap::Parser;
use lever_model::Model;

use crate::cli::{Cli, Command, ModelArg};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        set_threads(n);
    }
    cap_threads();
    // `plan --calibrate` measures training steps: under the settings training runs with.
    let calibrating = matches!(&cli.command, Command::Plan(a) if a.calibrate);
    if calibrating || matches!(cli.command, Command::Finetune(_) | Command::Pretrain(_)) {
        short_spins();
    }
    keep_freed_memory();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Print a command's error as one line; a supervised training also tells its supervisor
/// why it stopped (supervise.rs).
fn report(e: &anyhow::Error) {
    let line = format!("error: {}", one_line(e));
    eprintln!("{line}");
    if let Some(path) = std::env::var_os(supervise::ERROR_FILE_ENV) {
        let _ = std::fs::write(path, line + "\n");
    }
}

/// Bad usage found after parsing (arguments missing together, a name not in a list): one
/// line, exit 2, as clap's own usage errors.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// candle's CPU kernels and rayon size their pools from RAYON_NUM_THREADS when first used.
#[allow(unsafe_code)]
fn set_threads(n: usize) {
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
}

/// More threads than cores only wait for each other: candle's barrier pool (lever's matrix
/// kernels use it for small jobs) spins in every worker and in the caller until all workers
/// are done, so a spinning thread holds the core a worker needs (measured on 2 cores: 3 tokens
/// took 58.6 s with --threads 256 instead of 0.4 s), and rayon's matrix products split into
/// pieces that take turns (a 331-token prompt about twice as slow). Both pools are capped at
/// the cores this process may use, with a warning.
#[allow(unsafe_code)]
fn cap_threads() {
    let Some(asked) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    else {
        return;
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if asked > cores {
        eprintln!(
            "warning: {asked} threads asked for, more than the {cores} cores here; using {cores}"
        );
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cores.to_string()) };
    }
}

/// Training interleaves candle's spinning barrier pool with rayon (matrix products) on the
/// same cores; a worker that spins long after its work starves the others (measured: 31 →
/// 61 tokens/s with a short spin). Generation keeps the long spin, which is what makes
/// token-by-token steps fast. An explicit CANDLE_BARRIER_POOL_SPIN_LIMIT wins.
#[allow(unsafe_code)]
fn short_spins() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200") };
    }
}

/// Training and inference free and allocate the same activation buffers every step. glibc
/// returns blocks above its mmap threshold to the system at each free and the next step
/// faults them in again, zeroed (measured on shakespeare-char: 3,600 page faults and 8 ms of
/// kernel time per 70 ms step; on a 512-token prompt, a tenth of the time in the kernel's
/// page faults); raising the thresholds keeps them in the heap for reuse.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ask(a) => ask::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Tokenize(a) => measure::tokenize(a),
        Command::Embed(a) => embed::run(a),
        Command::Perplexity(a) => measure::perplexity(a),
        Command::Bench(a) => measure::bench(a),
        Command::Quantize(a) => measure::quantize(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Export(a) => export::export(a),
        Command::Merge(a) => export::merge(a),
        Command::Index(c) => rag::index(c),
        Command::Rag(c) => rag::rag(c),
        Command::Eval(a) => match a.command {
            Some(c) => rag::eval(c),
            None => eval::task(a.task),
        },
        Command::Fewshot(c) => match c {
            cli::FewshotCommand::Search(a) => eval::fewshot_search(a),
        },
        Command::Serve(a) => serve::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Models(m) => models::run(m),
        Command::Tokenizer(c) => pretrain_data::tokenizer(c),
        Command::Data(c) => pretrain_data::data(c),
        Command::Ladder(a) => ladder::run(a),
    }
}

/// Never write over what a user made: an existing file, or a folder with anything in it, is
/// refused unless `force`. Empty folders and missing paths are fine.
pub fn check_target(path: &std::path::Path, force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    let taken = match std::fs::read_dir(path) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => path.exists(),
    };
    if taken {
        let what = if path.is_dir() {
            "a folder that is not empty"
        } else {
            "a file"
        };
        anyhow::bail!(
            "{}: already exists ({what}); choose another path, or pass --force to replace it",
            path.display()
        );
    }
    Ok(())
}

/// Write a file atomically (lever_model::fsutil::write_atomic); errors name `path`.
pub fn write_file(path: &std::path::Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    lever_model::fsutil::write_atomic(path, |tmp| {
        std::fs::write(tmp, bytes)
            .map_err(|e| anyhow::Error::new(e).context(path.display().to_string()))
    })
}

pub fn device() -> Device {
    Device::Cpu
}

/// Resolve (provisioning on first use) and load a generator.
pub fn load_model(arg: &ModelArg) -> Result<Model> {
    let home = lever_model::registry::lever_home();
    let source = lever_model::model::resolve(&arg.model, &home, &mut progress::provisioning())?;
    let mut model = Model::load(&source, &device())?;
    if let Some(dir) = &arg.adapter {
        let n = lever_train::load_peft(&mut model.decoder, dir)?;
        eprintln!("adapter: {} ({n} projections)", dir.display());
        model.info.adapter = Some(dir.clone());
    }
    Ok(model)
}

/// An error as one line: its chain of causes joined by ": ", leaving out a cause that the text
/// before it already ends with (the libraries' `Io` errors print their source themselves,
/// `"{path}: {source}"`, and also name it as their source).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_one_line_and_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::IsADirectory, "Is a directory");
        let e = anyhow::Error::from(lever_data::Error::Io {
            path: "corpus".into(),
            source: io,
        });
        assert_eq!(one_line(&e), "corpus: Is a directory");
        let e = anyhow::anyhow!("line one\nline two").context("reading x");
        assert_eq!(one_line(&e), "reading x: line one line two");
    }
}
