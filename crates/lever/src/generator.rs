//! The generator a command uses, resolved once from the flags: `--backend URL`'s server, else
//! the local model. The commands then call the `Generator` and never ask which it is.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use lever_generate::{
    Constraint, Finish, FinishReason, Flow, Generator, Local, Remote, Sampling, Unset,
};
use lever_model::Model;

use crate::cli::{BackendArg, ConstraintArgs, SamplingArgs};

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

/// Why a generation ended, in words for a message.
pub fn finish_words(f: &Finish) -> String {
    match f {
        Finish::Local(FinishReason::Length) => "the token budget ran out".into(),
        Finish::Local(FinishReason::Context) => "the context is full".into(),
        Finish::Local(r) => format!("finish: {r:?}").to_lowercase(),
        Finish::Server(r) => format!("finish: {}", r.as_deref().unwrap_or("none")),
    }
}

impl ConstraintArgs {
    /// The constraint the flags ask for (at most one kind; clap refuses two), its file read
    /// and, for a schema, parsed: errors name the file and the line.
    pub fn constraint(&self) -> Result<Option<Constraint>> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| anyhow!("{}: {e}", p.display()))
        };
        let given = [
            self.json_schema.is_some(),
            self.json_object,
            self.regex.is_some(),
            self.grammar.is_some(),
            !self.choices.is_empty(),
        ]
        .iter()
        .filter(|&&g| g)
        .count();
        if given > 1 {
            return Err(anyhow!(
                "give one of --json-schema, --json-object, --regex, --grammar, --choice"
            ));
        }
        Ok(if let Some(p) = &self.json_schema {
            let schema: serde_json::Value = serde_json::from_str(&read(p)?)
                .map_err(|e| anyhow!("{}: line {}: not JSON: {e}", p.display(), e.line()))?;
            Some(Constraint::JsonSchema(schema))
        } else if self.json_object {
            Some(Constraint::JsonObject)
        } else if let Some(rx) = &self.regex {
            Some(Constraint::Regex(rx.clone()))
        } else if let Some(p) = &self.grammar {
            Some(Constraint::Lark(read(p)?))
        } else if !self.choices.is_empty() {
            Some(Constraint::Choice(self.choices.clone()))
        } else {
            None
        })
    }
}
