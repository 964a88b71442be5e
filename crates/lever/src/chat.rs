//! `lever chat`: a multi-turn REPL. History lives across turns (and the KV cache with it, so a
//! turn only computes its new tokens). Commands: /reset, /system TEXT, /save FILE, /load FILE,
//! /exit. Ctrl-C stops the current answer, not the session. With stdin piped, each line is one
//! user turn.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use lever_generate::{Flow, Generator, Output, Prompt, Request};
use lever_model::Message;
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

pub fn run(a: ChatArgs) -> Result<()> {
    // A bad constraint file is said before the model loads.
    a.constraint.constraint()?;
    // In-process, the session's KV cache lives across turns. With --backend the server keeps
    // no state: each turn sends the whole conversation.
    let mut generator =
        crate::generator::resolve(&a.backend, || Ok(Arc::new(crate::load_model(&a.model)?)))?;
    if !generator.can_chat() {
        bail!(
            "{}: the model has no chat template, so it cannot chat",
            generator.source()
        );
    }
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
        eprintln!(
            "lever chat with {} — /reset, /system TEXT, /save FILE, /load FILE, /exit; Ctrl-C stops an answer",
            generator.source()
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
                    generator.reset();
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
        match turn(generator.as_mut(), &conv, &a, &cancel) {
            Ok(out) => {
                if out.finish_reason.cancelled() {
                    eprintln!("\n(stopped)");
                }
                conv.messages.push(Message::new("assistant", out.text));
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

/// One answer to the conversation so far, streamed to stdout.
fn turn(
    generator: &mut dyn Generator,
    conv: &Conversation,
    a: &ChatArgs,
    cancel: &AtomicBool,
) -> Result<Output> {
    let constraint = a.constraint.constraint()?;
    let req = Request {
        constraint: constraint.as_ref(),
        prompt: Prompt::Chat(&conv.messages),
        max_tokens: a.sampling.max_tokens,
        stop: &a.sampling.stop,
        sampling: a.sampling.sampling(),
    };
    let out = generator.generate(&req, &mut |piece| {
        if cancel.load(Ordering::SeqCst) {
            return Flow::Stop;
        }
        crate::generator::print_text(piece)
    })?;
    println!();
    Ok(out)
}
