//! `lever ask`: one question, streamed answer (or one JSON object).

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, Result, bail};
use lever_generate::{Flow, Session, generate};
use lever_model::{Message, Model};
use serde_json::json;

use crate::cli::AskArgs;

pub fn run(a: AskArgs) -> Result<()> {
    let question = question(&a)?;
    if let Some(b) = crate::backend::backend(&a.backend)? {
        // The server applies its own chat template; --raw sends a text completion.
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(("system".to_string(), s.clone()));
        }
        messages.push(("user".to_string(), question.clone()));
        let raw = a.raw.then(|| match &a.system {
            Some(s) => format!("{s}\n\n{question}"),
            None => question.clone(),
        });
        let out = crate::backend::generate(&b, &messages, raw.as_deref(), &a.sampling, a.json)?;
        if a.json {
            let v = json!({
                "text": out.text,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "finish_reason": out.finish_reason,
                "backend": out.backend,
            });
            println!("{v}");
        } else {
            println!();
        }
        return Ok(());
    }
    let model = crate::load_model(&a.model)?;
    let prompt = build_prompt(&model, a.system.as_deref(), &question, a.raw)?;
    let ids = model.tokenizer.encode(&prompt, true)?;
    let mut session = Session::new(&model);
    let req = a.sampling.request(&model);
    let mut stdout = std::io::stdout();
    let json_mode = a.json;
    let out = generate(&model, &mut session, &ids, &req, &mut |piece| {
        if !json_mode {
            // A closed pipe (e.g. `| head`) ends the answer, not with an error.
            if stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return Flow::Stop;
            }
        }
        Flow::Continue
    })?;
    if json_mode {
        let v = json!({
            "text": out.text,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "prompt_ms": out.prompt_ms,
            "generation_ms": out.generation_ms,
            "finish_reason": out.finish_reason,
            "model": model.info.path,
            "sampling": {
                "temperature": req.sampling.temperature,
                "top_k": req.sampling.top_k,
                "top_p": req.sampling.top_p,
                "min_p": req.sampling.min_p,
                "repeat_penalty": req.sampling.repeat_penalty,
                "seed": req.sampling.seed,
                "defaults_from": model.info.generation.source,
            },
        });
        println!("{v}");
    } else {
        println!();
    }
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

/// The text the model sees: the chat template applied to (system, user), or the raw text.
pub fn build_prompt(model: &Model, system: Option<&str>, user: &str, raw: bool) -> Result<String> {
    if raw {
        return Ok(match system {
            Some(s) => format!("{s}\n\n{user}"),
            None => user.to_string(),
        });
    }
    let Some(tmpl) = &model.chat_template else {
        bail!(
            "{}: the model has no chat template; use --raw to send the text as is",
            model.info.path.display()
        );
    };
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message::new("system", s));
    }
    messages.push(Message::new("user", user));
    // The template comes from the model file: name it, as every bad-input error does.
    tmpl.render(&messages, true)
        .with_context(|| model.info.path.display().to_string())
}
