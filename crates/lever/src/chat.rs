//! `lever chat`: a multi-turn REPL. History lives across turns (and the KV cache with it, so a
//! turn only computes its new tokens). Commands: /reset, /system TEXT, /save FILE, /load FILE,
//! /exit. Ctrl-C stops the current answer, not the session. With stdin piped, each line is one
//! user turn.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use lever_generate::{FinishReason, Flow, Session, generate};
use lever_model::{Message, Model};
use serde::{Deserialize, Serialize};

use crate::cli::ChatArgs;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Conversation {
    messages: Vec<Message>,
}

impl Conversation {
    fn system(&self) -> Option<&str> {
        self.messages
            .first()
            .filter(|m| m.role == "system")
            .map(|m| m.content.as_str())
    }

    fn set_system(&mut self, text: Option<String>) {
        if self.system().is_some() {
            self.messages.remove(0);
        }
        if let Some(t) = text {
            self.messages.insert(0, Message::new("system", t));
        }
    }

    fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let c: Conversation = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a saved conversation", path.display()))?;
        c.check()
            .map_err(|problem| anyhow::anyhow!("{}: {problem}", path.display()))?;
        Ok(c)
    }

    /// A conversation the chat template can render: a system message only first, then user and
    /// assistant turns, starting with the user.
    fn check(&self) -> std::result::Result<(), String> {
        let mut expect_user = true;
        for (i, m) in self.messages.iter().enumerate() {
            match m.role.as_str() {
                "system" if i == 0 => {}
                "system" => return Err(format!("messages[{i}]: a system message must come first")),
                "user" | "assistant" => {
                    let is_user = m.role == "user";
                    if is_user != expect_user {
                        return Err(format!(
                            "messages[{i}]: role \"{}\" where \"{}\" was expected (turns alternate, user first)",
                            m.role,
                            if expect_user { "user" } else { "assistant" }
                        ));
                    }
                    expect_user = !expect_user;
                }
                other => {
                    return Err(format!(
                        "messages[{i}]: unknown role {other:?} (system, user or assistant)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Written atomically: a crash never leaves half a file.
    fn save(&self, path: &Path) -> Result<()> {
        crate::write_file(path, serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// Where the answers come from.
enum Engine {
    Local(Box<Model>, Session),
    /// `--backend`: the server keeps no state; each turn sends the whole conversation.
    Remote(lever_server::client::Backend),
}

pub fn run(a: ChatArgs) -> Result<()> {
    let mut engine = match crate::backend::backend(&a.backend)? {
        Some(b) => Engine::Remote(b),
        None => {
            let model = crate::load_model(&a.model)?;
            if model.chat_template.is_none() {
                bail!(
                    "{}: the model has no chat template, so it cannot chat",
                    model.info.path.display()
                );
            }
            let session = Session::new(&model);
            Engine::Local(Box::new(model), session)
        }
    };
    let mut conv = match &a.load {
        Some(p) => Conversation::load(p)?,
        None => Conversation::default(),
    };
    if a.system.is_some() {
        conv.set_system(a.system.clone());
    }
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || cancel.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        let with = match &engine {
            Engine::Local(model, _) => model.info.path.display().to_string(),
            Engine::Remote(b) => b.url(),
        };
        eprintln!(
            "lever chat with {with} — /reset, /system TEXT, /save FILE, /load FILE, /exit; Ctrl-C stops an answer"
        );
    }
    let mut failed_turns = 0;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        cancel.store(false, Ordering::SeqCst);
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let arg = arg.trim();
            match name {
                "exit" | "quit" => break,
                "reset" => {
                    let system = conv.system().map(str::to_string);
                    conv = Conversation::default();
                    conv.set_system(system);
                    if let Engine::Local(_, session) = &mut engine {
                        session.reset();
                    }
                    eprintln!("(history cleared)");
                }
                "system" => {
                    conv.set_system((!arg.is_empty()).then(|| arg.to_string()));
                    eprintln!(
                        "(system prompt {})",
                        if arg.is_empty() { "removed" } else { "set" }
                    );
                }
                "save" if !arg.is_empty() => match conv.save(Path::new(arg)) {
                    Ok(()) => eprintln!("(saved {} messages to {arg})", conv.messages.len()),
                    Err(e) => eprintln!("error: {e:#}"),
                },
                "load" if !arg.is_empty() => match Conversation::load(Path::new(arg)) {
                    Ok(c) => {
                        conv = c;
                        eprintln!("(loaded {} messages from {arg})", conv.messages.len());
                    }
                    Err(e) => eprintln!("error: {e:#}"),
                },
                _ => eprintln!(
                    "unknown command /{name}: /reset, /system TEXT, /save FILE, /load FILE, /exit"
                ),
            }
            continue;
        }
        conv.messages.push(Message::new("user", line));
        let result = match &mut engine {
            Engine::Local(model, session) => turn(model, session, &conv, &a, &cancel),
            Engine::Remote(b) => remote_turn(b, &conv, &a, &cancel),
        };
        match result {
            Ok((text, finish)) => {
                if finish == FinishReason::Cancelled {
                    eprintln!("\n(stopped)");
                }
                conv.messages.push(Message::new("assistant", text));
            }
            Err(e) => {
                conv.messages.pop();
                failed_turns += 1;
                eprintln!("error: {e:#}");
            }
        }
    }
    // Scripts piping turns in learn from the exit code that a turn failed.
    if failed_turns > 0 && !interactive {
        bail!("{failed_turns} chat turn(s) failed");
    }
    Ok(())
}

fn turn(
    model: &Model,
    session: &mut Session,
    conv: &Conversation,
    a: &ChatArgs,
    cancel: &AtomicBool,
) -> Result<(String, FinishReason)> {
    let tmpl = model
        .chat_template
        .as_ref()
        .context("the model has no chat template")?;
    let prompt = tmpl
        .render(&conv.messages, true)
        .with_context(|| model.info.path.display().to_string())?;
    let ids = model.tokenizer.encode(&prompt, true)?;
    let mut stdout = std::io::stdout();
    let out = generate(
        model,
        session,
        &ids,
        &a.sampling.request(model),
        &mut |piece| {
            if cancel.load(Ordering::SeqCst) {
                return Flow::Stop;
            }
            if stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return Flow::Stop;
            }
            Flow::Continue
        },
    )?;
    println!();
    Ok((out.text, out.finish_reason))
}

fn remote_turn(
    b: &lever_server::client::Backend,
    conv: &Conversation,
    a: &ChatArgs,
    cancel: &AtomicBool,
) -> Result<(String, FinishReason)> {
    let messages: Vec<(String, String)> = conv
        .messages
        .iter()
        .map(|m| (m.role.clone(), m.content.clone()))
        .collect();
    let p = crate::backend::params(&a.sampling);
    let mut stdout = std::io::stdout();
    let out = b
        .chat(&messages, &p, &mut |t| {
            !cancel.load(Ordering::SeqCst)
                && stdout
                    .write_all(t.as_bytes())
                    .and_then(|()| stdout.flush())
                    .is_ok()
        })
        .map_err(anyhow::Error::msg)?;
    println!();
    let finish = match out.finish_reason.as_deref() {
        Some("cancelled") => FinishReason::Cancelled,
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    Ok((out.text, finish))
}
