//! The generator a command uses, resolved once from the flags: `--backend URL`'s server, else
//! the local model. The commands then call the `Generator` and never ask which it is.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use lever_generate::{Flow, Generator, Local, Remote, Sampling, Unset};
use lever_model::Model;

use crate::cli::{BackendArg, SamplingArgs};

/// `--backend`'s server, or the model `load` gives (called only then: a command that
/// generates on a server loads no model unless it needs one for something else).
pub fn resolve(
    b: &BackendArg,
    load: impl FnOnce() -> Result<Arc<Model>>,
) -> Result<Box<dyn Generator>> {
    Ok(match &b.backend {
        Some(url) => Box::new(
            Remote::parse(url, b.backend_key.clone(), b.backend_model.clone())
                .map_err(|e| anyhow!("--backend {e}"))?,
        ),
        None => Box::new(Local::new(load()?)),
    })
}

impl SamplingArgs {
    /// The flags given; the rest is the generator's (the model's published settings
    /// in-process, the server's own defaults remotely).
    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: Some(self.repeat_last_n),
            seed: Some(self.seed),
            unset: Unset::ModelDefaults,
        }
    }
}

/// Streams text to stdout; a closed pipe (e.g. `| head`) ends the answer, not with an error.
pub fn print_text(piece: &str) -> Flow {
    let mut stdout = std::io::stdout();
    match stdout
        .write_all(piece.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Stop,
    }
}
