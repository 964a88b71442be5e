//! Chat and prompt templates: the model's own Jinja chat template (GGUF
//! `tokenizer.chat_template` or tokenizer_config.json), rendered with minijinja plus Python
//! compatibility (`.strip()`, `.startswith()`…), with the same whitespace options transformers
//! uses (`trim_blocks`, `lstrip_blocks`: transformers `utils/chat_template_utils.py`).

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
    Error::Template {
        what,
        message,
        line: e.line(),
        col,
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
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
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| template_error(e, &self.source, "chat template"))
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
    env.get_template("prompt")
        .and_then(|t| t.render(ctx))
        .map_err(|e| template_error(e, source, "prompt template"))
}
