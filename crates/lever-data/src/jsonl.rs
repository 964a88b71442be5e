//! JSONL datasets: one JSON object per line, in one of four shapes, read whole with every bad
//! line reported by number. Field names can be remapped, including paths into nested values
//! (`--field output=instances/0/output`), so datasets that merely rename the Alpaca fields
//! (GSM8K's `question`/`answer`, Self-Instruct's nested instances) need no conversion script.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use lever_model::Message;
use serde_json::Value;

use crate::error::{Error, Result};

/// The shape of each line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"instruction", "input"?, "output", "system"?}` (Stanford Alpaca).
    Alpaca,
    /// `{"messages": [{"role", "content"}, …]}` (OpenAI / Hugging Face chat).
    Chat,
    /// `{"conversations": [{"from", "value"}, …]}` (ShareGPT; from: system/human/gpt).
    ShareGpt,
    /// `{"text"}`: plain text, every token trained.
    Text,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Chat => "chat",
            Format::ShareGpt => "sharegpt",
            Format::Text => "text",
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "alpaca" => Ok(Format::Alpaca),
            "chat" | "messages" => Ok(Format::Chat),
            "sharegpt" | "conversations" => Ok(Format::ShareGpt),
            "text" => Ok(Format::Text),
            other => Err(format!(
                "unknown format `{other}` (alpaca, chat, sharegpt, text)"
            )),
        }
    }
}

/// Where each format finds its fields: a key, or a `/`-separated path whose numeric parts
/// index arrays (`instances/0/output`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub system: String,
    pub messages: String,
    pub conversations: String,
    pub text: String,
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            system: "system".into(),
            messages: "messages".into(),
            conversations: "conversations".into(),
            text: "text".into(),
        }
    }
}

impl Fields {
    /// Apply one `name=path` override, e.g. `instruction=question`.
    pub fn set(&mut self, spec: &str) -> Result<()> {
        let usage = |problem: String| Error::Usage {
            what: format!("--field {spec}"),
            problem,
        };
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| usage("expected NAME=PATH".into()))?;
        if path.is_empty() {
            return Err(usage("empty path".into()));
        }
        let slot = match name {
            "instruction" => &mut self.instruction,
            "input" => &mut self.input,
            "output" => &mut self.output,
            "system" => &mut self.system,
            "messages" => &mut self.messages,
            "conversations" => &mut self.conversations,
            "text" => &mut self.text,
            other => {
                return Err(usage(format!(
                    "unknown field `{other}` (instruction, input, output, system, messages, conversations, text)"
                )));
            }
        };
        *slot = path.to_string();
        Ok(())
    }
}

/// One training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// Turns rendered with the chat template; assistant turns are trained.
    Conversation(Vec<Message>),
    /// Raw text; all of it is trained.
    Text(String),
}

/// A dataset read from one file: the examples with the line each came from.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: Format,
    pub examples: Vec<(usize, Example)>,
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('/').try_fold(v, |v, part| match v {
        Value::Object(m) => m.get(part),
        Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// The file as text: a UTF-8 byte-order mark (which editors on Windows write) is skipped, and
/// bytes that are not UTF-8 are an error naming their line.
fn utf8_text<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        let column = at
            - bytes[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        let problem = match bytes[..2.min(bytes.len())] {
            [0xFF, 0xFE] | [0xFE, 0xFF] => "the file is UTF-16 (save it as UTF-8)".to_string(),
            _ => format!("byte 0x{:02X} at column {column} is not UTF-8", bytes[at]),
        };
        Error::Text {
            path: path.into(),
            line,
            problem,
        }
    })
}

impl Dataset {
    /// Read `path`; the format is detected from the first line unless given.
    pub fn read(path: &Path, format: Option<Format>, fields: &Fields) -> Result<Dataset> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let text = utf8_text(path, &bytes)?;
        let mut format = format;
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line).map_err(|e| Error::Json {
                path: path.into(),
                line: line_no,
                message: e.to_string(),
            })?;
            if !value.is_object() {
                return Err(Error::Json {
                    path: path.into(),
                    line: line_no,
                    message: "expected a JSON object".into(),
                });
            }
            let f = match format {
                Some(f) => f,
                None => {
                    let f = detect(&value, fields).ok_or_else(|| {
                        let keys: Vec<&str> = value
                            .as_object()
                            .map(|m| m.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        Error::Dataset {
                            path: path.into(),
                            problem: format!(
                                "line {line_no}: cannot tell the format from keys {keys:?}; pass --format, or --field NAME=PATH to map fields"
                            ),
                        }
                    })?;
                    format = Some(f);
                    f
                }
            };
            examples.push((line_no, parse(&value, f, fields, path, line_no)?));
        }
        let format = match (format, examples.is_empty()) {
            (Some(f), false) => f,
            _ => {
                return Err(Error::Dataset {
                    path: path.into(),
                    problem: "no examples (the file is empty)".into(),
                });
            }
        };
        Ok(Dataset {
            path: path.into(),
            format,
            examples,
        })
    }
}

fn detect(v: &Value, fields: &Fields) -> Option<Format> {
    if lookup(v, &fields.messages).is_some() {
        Some(Format::Chat)
    } else if lookup(v, &fields.conversations).is_some() {
        Some(Format::ShareGpt)
    } else if lookup(v, &fields.output).is_some() || lookup(v, &fields.instruction).is_some() {
        Some(Format::Alpaca)
    } else if lookup(v, &fields.text).is_some() {
        Some(Format::Text)
    } else {
        None
    }
}

fn parse(v: &Value, format: Format, fields: &Fields, path: &Path, line: usize) -> Result<Example> {
    let err = |field: &str, problem: &str| Error::Field {
        path: path.into(),
        line,
        field: field.into(),
        problem: problem.into(),
    };
    let string = |field: &str, required: bool| -> Result<Option<String>> {
        match lookup(v, field) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Null) | None if !required => Ok(None),
            None => Err(err(field, "missing")),
            Some(_) => Err(err(field, "expected a string")),
        }
    };
    match format {
        Format::Text => Ok(Example::Text(
            string(&fields.text, true)?.unwrap_or_default(),
        )),
        Format::Alpaca => {
            let instruction = string(&fields.instruction, true)?.unwrap_or_default();
            let input = string(&fields.input, false)?.unwrap_or_default();
            let output = string(&fields.output, true)?.unwrap_or_default();
            let mut messages = Vec::new();
            if let Some(system) = string(&fields.system, false)?.filter(|s| !s.is_empty()) {
                messages.push(Message::new("system", system));
            }
            // Alpaca's own prompt puts the input after the instruction, separated by a blank
            // line; the chat template then adds the model's turn markers.
            let user = if input.trim().is_empty() {
                instruction
            } else {
                format!("{instruction}\n\n{input}")
            };
            messages.push(Message::new("user", user));
            messages.push(Message::new("assistant", output));
            Ok(Example::Conversation(messages))
        }
        Format::Chat | Format::ShareGpt => {
            let (list_field, role_key, text_key) = match format {
                Format::Chat => (&fields.messages, "role", "content"),
                _ => (&fields.conversations, "from", "value"),
            };
            let list = match lookup(v, list_field) {
                Some(Value::Array(a)) => a,
                None => return Err(err(list_field, "missing")),
                Some(_) => return Err(err(list_field, "expected an array of turns")),
            };
            let mut messages = Vec::with_capacity(list.len());
            for (i, turn) in list.iter().enumerate() {
                let at = |k: &str| format!("{list_field}/{i}/{k}");
                let role = match turn.get(role_key) {
                    Some(Value::String(s)) => s.as_str(),
                    None => return Err(err(&at(role_key), "missing")),
                    Some(_) => return Err(err(&at(role_key), "expected a string")),
                };
                let content = match turn.get(text_key) {
                    Some(Value::String(s)) => s.clone(),
                    None => return Err(err(&at(text_key), "missing")),
                    Some(_) => return Err(err(&at(text_key), "expected a string")),
                };
                let role = match role.to_ascii_lowercase().as_str() {
                    "system" => "system",
                    "user" | "human" => "user",
                    "assistant" | "gpt" | "chatgpt" | "model" | "bot" => "assistant",
                    "tool" | "function" | "ipython" => "tool",
                    _ => {
                        return Err(err(
                            &at(role_key),
                            &format!(
                                "unknown role `{role}` (system, user/human, assistant/gpt, tool)"
                            ),
                        ));
                    }
                };
                messages.push(Message::new(role, content));
            }
            if messages.is_empty() {
                return Err(err(list_field, "no turns"));
            }
            Ok(Example::Conversation(messages))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(lines: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), lines).unwrap();
        f
    }

    #[test]
    fn a_bom_is_skipped_and_bytes_that_are_not_utf8_name_their_line() {
        let f = write("\u{feff}{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
        let d = Dataset::read(f.path(), None, &Fields::default()).unwrap();
        assert_eq!(d.examples.len(), 2);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"{\"text\": \"a\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
        let e = Dataset::read(f.path(), None, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(":2: byte 0xE9 at column 14 is not UTF-8"),
            "{e}"
        );
        std::fs::write(f.path(), b"\xff\xfe{\x00").unwrap();
        let e = Dataset::read(f.path(), None, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(":1: the file is UTF-16"), "{e}");
    }

    #[test]
    fn each_format_is_detected_and_becomes_turns() {
        let cases = [
            (
                r#"{"instruction": "Add.", "input": "2 3", "output": "5"}"#,
                Format::Alpaca,
                vec![
                    Message::new("user", "Add.\n\n2 3"),
                    Message::new("assistant", "5"),
                ],
            ),
            (
                r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}"#,
                Format::Chat,
                vec![
                    Message::new("system", "S"),
                    Message::new("user", "U"),
                    Message::new("assistant", "A"),
                ],
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]}"#,
                Format::ShareGpt,
                vec![Message::new("user", "U"), Message::new("assistant", "A")],
            ),
        ];
        for (line, format, want) in cases {
            let f = write(&format!("\n{line}\n"));
            let d = Dataset::read(f.path(), None, &Fields::default()).unwrap();
            assert_eq!(d.format, format);
            assert_eq!(d.examples, vec![(2, Example::Conversation(want))]);
        }
        let f = write("{\"text\": \"hello\"}\n");
        let d = Dataset::read(f.path(), None, &Fields::default()).unwrap();
        assert_eq!(d.examples, vec![(1, Example::Text("hello".into()))]);
    }

    #[test]
    fn remapped_fields_reach_into_nested_values() {
        let f = write(r#"{"q": "Why?", "instances": [{"input": "", "output": "Because."}]}"#);
        let mut fields = Fields::default();
        for spec in [
            "instruction=q",
            "input=instances/0/input",
            "output=instances/0/output",
        ] {
            fields.set(spec).unwrap();
        }
        let d = Dataset::read(f.path(), None, &fields).unwrap();
        assert_eq!(d.format, Format::Alpaca);
        assert_eq!(
            d.examples[0].1,
            Example::Conversation(vec![
                Message::new("user", "Why?"),
                Message::new("assistant", "Because.")
            ])
        );
        assert!(
            fields
                .set("answer=x")
                .unwrap_err()
                .to_string()
                .contains("unknown field `answer`")
        );
    }

    #[test]
    fn bad_lines_are_named() {
        let cases = [
            ("{\"text\": \"a\"}\n{\"text\": \n", ":2: not valid JSON"),
            ("{\"instruction\": \"a\"}\n", ":1: field `output`: missing"),
            (
                "{\"instruction\": \"a\", \"output\": 3}\n",
                ":1: field `output`: expected a string",
            ),
            (
                "{\"messages\": [{\"role\": \"user\"}]}\n",
                ":1: field `messages/0/content`: missing",
            ),
            (
                "{\"conversations\": [{\"from\": \"alien\", \"value\": \"x\"}]}\n",
                "unknown role `alien`",
            ),
            ("[1, 2]\n", ":1: not valid JSON: expected a JSON object"),
            ("\n\n", "no examples"),
            (
                "{\"foo\": 1}\n",
                "cannot tell the format from keys [\"foo\"]",
            ),
        ];
        for (text, want) in cases {
            let f = write(text);
            let e = Dataset::read(f.path(), None, &Fields::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.starts_with(&f.path().display().to_string()), "{e}");
        }
    }
}
