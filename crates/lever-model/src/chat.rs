//! Chat and prompt templates: the model's own Jinja chat template (GGUF
//! `tokenizer.chat_template` or tokenizer_config.json), rendered with minijinja plus Python
//! compatibility (`.strip()`, `.startswith()`…), with the same whitespace options transformers
//! uses (`trim_blocks`, `lstrip_blocks`: transformers `utils/chat_template_utils.py`).
//!
//! A template comes from a model file or a user's file, so it is untrusted input: every render
//! runs on a budget of [`FUEL`] engine instructions (minijinja's `fuel`) and writes at most
//! [`MAX_OUTPUT_BYTES`], so a template of nested 100,000-step loops fails in well under a
//! second instead of running for hours.

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: String,
    eos: String,
}

/// Engine instructions one render may execute. SmolLM2's template takes about 200 for a
/// two-message chat (a few per message and character of framing); this leaves room for
/// conversations of tens of thousands of messages and stops a runaway loop in well under a
/// second.
pub const FUEL: u64 = 5_000_000;

/// Bytes one render may write: 64 MiB, the text of 16M tokens (the longest context lever
/// accepts, `config::MAX_CONTEXT`) at four bytes a token.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// The output buffer of a render, refusing to grow past its limit.
struct Bounded {
    out: Vec<u8>,
    limit: usize,
    over: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.over = true;
            return Err(std::io::Error::other("template output limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Render `tmpl` with fuel and output bounds; errors carry the template's line.
fn render_bounded<S: Serialize>(
    tmpl: &minijinja::Template<'_, '_>,
    ctx: S,
    source: &str,
    what: &'static str,
) -> Result<String> {
    let mut out = Bounded {
        out: Vec::new(),
        limit: MAX_OUTPUT_BYTES,
        over: false,
    };
    match tmpl.render_captured_to(ctx, &mut out) {
        Ok(_) => String::from_utf8(out.out).map_err(|_| Error::Template {
            what,
            message: "output is not UTF-8".into(),
            line: None,
            col: None,
        }),
        Err(e) if out.over => {
            let mut err = template_error(e, source, what);
            if let Error::Template { message, .. } = &mut err {
                *message = format!(
                    "output longer than {} MiB (a runaway loop?)",
                    MAX_OUTPUT_BYTES >> 20
                );
            }
            Err(err)
        }
        Err(e) => Err(template_error(e, source, what)),
    }
}

fn template_error(e: minijinja::Error, source: &str, what: &'static str) -> Error {
    let col = e.range().map(|r| {
        let before = &source[..r.start.min(source.len())];
        r.start - before.rfind('\n').map_or(0, |i| i + 1) + 1
    });
    let mut message = e
        .detail()
        .map_or_else(|| e.kind().to_string(), str::to_string);
    if e.kind() == ErrorKind::InvalidOperation && message.is_empty() {
        message = e.to_string();
    }
    if e.kind() == ErrorKind::OutOfFuel {
        message = format!("ran out of fuel after {FUEL} steps (a loop that runs too long?)");
    }
    Error::Template {
        what,
        message,
        line: e.line(),
        col,
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |_fmt: String| -> String {
        // Templates use it for "today's date" in system prompts; a fixed value keeps
        // renders reproducible.
        "01 Jan 2026".to_string()
    });
    env
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = environment();
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| template_error(e, source, "chat template"))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's answer begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| template_error(e, &self.source, "chat template"))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        };
        render_bounded(&tmpl, ctx, &self.source, "chat template")
    }
}

/// Render a user's prompt template (`lever ask --template FILE --var k=v`).
pub fn render_prompt_template(source: &str, vars: &[(String, String)]) -> Result<String> {
    let mut env = environment();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template_owned("prompt", source.to_string())
        .map_err(|e| template_error(e, source, "prompt template"))?;
    let ctx: std::collections::BTreeMap<&str, &str> =
        vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let tmpl = env
        .get_template("prompt")
        .map_err(|e| template_error(e, source, "prompt template"))?;
    render_bounded(&tmpl, ctx, source, "prompt template")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's own template (tokenizer_config.json; also in its GGUF).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn a_real_template_renders_a_long_chat_within_the_fuel() {
        let t = ChatTemplate::new(SMOLLM2, "", "<|im_end|>").unwrap();
        let mut messages = Vec::new();
        for i in 0..10_000 {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(Message::new(role, format!("message {i}")));
        }
        let out = t.render(&messages, true).unwrap();
        assert!(out.starts_with("<|im_start|>system\nYou are a helpful AI assistant."));
        assert!(out.ends_with("message 9999<|im_end|>\n<|im_start|>assistant\n"));
    }

    /// Regression: a template of nested 100,000-step loops ran for hours.
    #[test]
    fn nested_loops_run_out_of_fuel_quickly() {
        let src =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t0 = std::time::Instant::now();
        let e = ChatTemplate::new(src, "", "")
            .unwrap()
            .render(&[Message::new("user", "hi")], true)
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed().as_secs_f64() < 5.0, "{:?}", t0.elapsed());
        assert!(e.starts_with("chat template (line 1"), "{e}");
        assert!(e.contains("ran out of fuel after 5000000 steps"), "{e}");
        // The same bound for a user's prompt template.
        let e = render_prompt_template(src, &[]).unwrap_err().to_string();
        assert!(e.starts_with("prompt template"), "{e}");
        assert!(e.contains("ran out of fuel"), "{e}");
    }

    /// Few instructions, much output: each step writes a 10 MB string.
    #[test]
    fn output_beyond_the_limit_is_an_error() {
        let src = "{% for i in range(100) %}{{ 'x' * 10000000 }}{% endfor %}";
        let e = render_prompt_template(src, &[]).unwrap_err().to_string();
        assert!(e.contains("output longer than 64 MiB"), "{e}");
        let ok =
            render_prompt_template("{{ 'x' * 1000 }}{{ a }}", &[("a".into(), "b".into())]).unwrap();
        assert_eq!(ok.len(), 1001);
    }
}
