//! `lever ask`: one question, streamed answer (or one JSON object).

use std::io::{IsTerminal, Read};

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use lever_generate::{Flow, Prompt, Request, Source};
use lever_model::Message;
use serde_json::json;

use crate::cli::AskArgs;

pub fn run(a: AskArgs) -> Result<()> {
    let question = question(&a)?;
    let constraint = a.constraint.constraint()?;
    let mut generator =
        crate::generator::resolve(&a.backend, || Ok(Arc::new(crate::load_model(&a.model)?)))?;
    // The chat template is the model's in-process and the server's own remotely; --raw
    // sends the text as it is (a text completion).
    let raw = a.raw.then(|| match &a.system {
        Some(s) => format!("{s}\n\n{question}"),
        None => question.clone(),
    });
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new("system", s.clone()));
    }
    messages.push(Message::new("user", question.clone()));
    let req = Request {
        constraint: constraint.as_ref(),
        prompt: match &raw {
            Some(text) => Prompt::Text(text),
            None => Prompt::Chat(&messages),
        },
        max_tokens: a.sampling.max_tokens,
        stop: &a.sampling.stop,
        sampling: a.sampling.sampling(),
    };
    let json_mode = a.json;
    let out = generator.generate(&req, &mut |piece| {
        if json_mode {
            Flow::Continue
        } else {
            crate::generator::print_text(piece)
        }
    })?;
    if !json_mode {
        println!();
        if out.valid == Some(false) {
            eprintln!(
                "warning: the answer is incomplete under the constraint ({}); raise --max-tokens",
                crate::generator::finish_words(&out.finish_reason)
            );
        }
        return Ok(());
    }
    let mut v = json!({
        "text": out.text,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
    });
    if let Some(t) = out.timings {
        v["prompt_ms"] = json!(t.prompt_ms);
        v["generation_ms"] = json!(t.generation_ms);
        if let Some((ms, n)) = t.mask {
            v["mask_ms"] = json!(ms);
            v["mask_ms_per_token"] = json!(if n > 0 { ms / n as f64 } else { 0.0 });
        }
    }
    v["finish_reason"] = json!(out.finish_reason);
    if let Some(valid) = out.valid {
        v["valid"] = json!(valid);
    }
    match generator.source() {
        Source::Model(path) => v["model"] = json!(path),
        Source::Server(url) => v["backend"] = json!(url),
    }
    if let Some(used) = &out.sampling {
        let s = &used.params;
        v["sampling"] = json!({
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty,
            "seed": s.seed,
            "defaults_from": used.defaults_from,
        });
    }
    println!("{v}");
    Ok(())
}

fn question(a: &AskArgs) -> Result<String> {
    let text = match (&a.template, &a.prompt) {
        (Some(path), _) => {
            if a.prompt.is_some() {
                bail!("give either a PROMPT or --template, not both");
            }
            let src =
                std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
            lever_model::chat::render_prompt_template(&src, &a.vars)
                .with_context(|| format!("{}", path.display()))?
        }
        (None, Some(p)) => p.clone(),
        (None, None) => {
            if std::io::stdin().is_terminal() {
                bail!("no prompt: give one as an argument or on stdin");
            }
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            s
        }
    };
    if text.trim().is_empty() {
        bail!("the prompt is empty");
    }
    Ok(text)
}
