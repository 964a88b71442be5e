//! `--backend URL`: generate through an OpenAI-compatible server (lever-server's client).

use std::io::Write;

use anyhow::{Result, anyhow};
use lever_server::client::{Backend, Params};

use crate::cli::{BackendArg, SamplingArgs};

/// What a remote generation gives back.
pub struct Answer {
    pub text: String,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    pub backend: String,
}

pub fn backend(b: &BackendArg) -> Result<Option<Backend>> {
    match &b.backend {
        None => Ok(None),
        Some(url) => Backend::parse(url, b.backend_key.clone(), b.backend_model.clone())
            .map(Some)
            .map_err(|e| anyhow!("--backend {e}")),
    }
}

/// Only what the user set is sent: the server applies its own defaults for the rest.
pub fn params(s: &SamplingArgs) -> Params {
    Params {
        max_tokens: s.max_tokens,
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        seed: Some(s.seed),
        stop: s.stop.clone(),
    }
}

/// Chat (`messages` as role, content) or, with `raw`, a text completion of `raw`; the
/// answer streams to stdout unless `quiet`.
pub fn generate(
    b: &Backend,
    messages: &[(String, String)],
    raw: Option<&str>,
    s: &SamplingArgs,
    quiet: bool,
) -> Result<Answer> {
    let mut stdout = std::io::stdout();
    let mut on_text = |t: &str| -> bool {
        quiet
            || stdout
                .write_all(t.as_bytes())
                .and_then(|()| stdout.flush())
                .is_ok()
    };
    let p = params(s);
    let r = match raw {
        Some(prompt) => b.complete(prompt, &p, &mut on_text),
        None => b.chat(messages, &p, &mut on_text),
    }
    .map_err(|e| anyhow!(e))?;
    Ok(Answer {
        text: r.text,
        prompt_tokens: r.prompt_tokens,
        completion_tokens: r.completion_tokens,
        finish_reason: r.finish_reason,
        backend: b.url(),
    })
}
