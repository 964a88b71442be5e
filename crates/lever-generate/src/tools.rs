//! Tool (function) calls, as OpenAI's Chat Completions API defines them, for models whose chat
//! template has no tools section (SmolLM2's and Gemma 3's have none).
//!
//! The documented system-prompt form: the functions are listed in a system message, and a call
//! is written `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (the Hermes / Qwen form,
//! which many small instruction-tuned models have seen). The call is produced by constrained
//! decoding ([`Constraint::Lark`] with the call's JSON Schema inside, compiled by llguidance),
//! so its name is one of the tools and its arguments are valid against that tool's parameters
//! schema by construction:
//! - `required` / a named function: the answer is exactly one call;
//! - `auto`: the answer is one call, or text that does not start with `<` (the first byte
//!   decides which, so a streamed answer knows at once whether it is a call).
//!
//! A call in the conversation history (an assistant message's `tool_calls`) is written back in
//! the same form, and a tool's result goes in a user turn as `<tool_response>…</tool_response>`,
//! so every chat template (even one that insists on alternating user and assistant turns)
//! renders a round trip.

use serde_json::{Map, Value, json};

use crate::Constraint;
use crate::{Error, Result};

pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema for the arguments object (`{"type": "object", "properties": {}}` when the
    /// function takes none).
    pub parameters: Value,
}

/// Whether and which function must be called (`tool_choice`; "none" is the caller's: no tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// A call or a text answer, as the model chooses.
    Auto,
    /// Exactly one call, to any of the tools.
    Required,
    /// Exactly one call, to this function.
    Named(String),
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: Value,
}

impl Tool {
    /// A tool, checked: a name of 1–64 letters, digits, `_` or `-` (OpenAI's rule), and a
    /// parameters schema that is a JSON Schema (the error names the path inside it).
    pub fn new(name: &str, description: Option<String>, parameters: Option<Value>) -> Result<Tool> {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
            return Err(Error::Constraint(format!(
                "function name {name:?}: use 1 to 64 letters, digits, '_' or '-'"
            )));
        }
        let parameters = parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        if let Err(e) = jsonschema::meta::validate(&parameters) {
            let path = e.instance_path.to_string();
            return Err(Error::Constraint(format!(
                "function {name}: parameters, at {}: {e}",
                if path.is_empty() { "the top" } else { &path }
            )));
        }
        Ok(Tool {
            name: name.to_string(),
            description,
            parameters,
        })
    }

    /// The JSON Schema of a call to this tool: `{"name": <its name>, "arguments": {…}}`.
    fn call_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"name": {"const": self.name}, "arguments": self.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    }
}

/// The system-prompt text that lists the tools and says how to call one.
pub fn system_prompt(tools: &[Tool]) -> String {
    let mut s = String::from(
        "You can call functions. To call one, answer with only\n\
         <tool_call>{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}</tool_call>\n\
         and nothing else. The functions:\n",
    );
    for t in tools {
        let mut f = Map::new();
        f.insert("name".into(), json!(t.name));
        if let Some(d) = &t.description {
            f.insert("description".into(), json!(d));
        }
        f.insert("parameters".into(), t.parameters.clone());
        s.push_str(&serde_json::to_string(&Value::Object(f)).unwrap_or_default());
        s.push('\n');
    }
    s
}

/// The constraint an answer meets under `choice`: a Lark grammar whose call is the JSON of
/// one of the allowed tools (compact JSON, as the other JSON constraints write it).
pub fn constraint(tools: &[Tool], choice: &ToolChoice) -> Result<Constraint> {
    let allowed: Vec<&Tool> = match choice {
        ToolChoice::Named(name) => {
            let t = tools.iter().find(|t| &t.name == name).ok_or_else(|| {
                Error::Constraint(format!(
                    "tool_choice names {name:?}, which is not among the tools ({})",
                    tools
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            vec![t]
        }
        _ => tools.iter().collect(),
    };
    if allowed.is_empty() {
        return Err(Error::Constraint("no tools to call".into()));
    }
    let mut schema = if allowed.len() == 1 {
        allowed[0].call_schema()
    } else {
        json!({"anyOf": allowed.iter().map(|t| t.call_schema()).collect::<Vec<_>>()})
    };
    if let Some(o) = schema.as_object_mut() {
        o.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    let call = format!(
        "call: {} %json {} {}\n",
        serde_json::to_string(CALL_OPEN).unwrap_or_default(),
        serde_json::to_string(&schema).unwrap_or_default(),
        serde_json::to_string(CALL_CLOSE).unwrap_or_default(),
    );
    Ok(Constraint::Lark(match choice {
        ToolChoice::Auto => format!("start: call | text\n{call}text: /[^<][\\s\\S]*/\n"),
        _ => format!("start: call\n{call}"),
    }))
}

/// A call written as the model writes one.
pub fn render_call(call: &Call) -> String {
    let body = json!({"name": call.name, "arguments": call.arguments});
    format!(
        "{CALL_OPEN}{}{CALL_CLOSE}",
        serde_json::to_string(&body).unwrap_or_default()
    )
}

/// A tool's result as the next user turn shows it.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// The call in an answer, when the answer is one (`<tool_call>{…}</tool_call>`, whitespace
/// around it allowed): None for a text answer, or for a call cut short (a token budget ran
/// out first).
pub fn parse_call(text: &str) -> Option<Call> {
    let inner = text
        .trim()
        .strip_prefix(CALL_OPEN)?
        .strip_suffix(CALL_CLOSE)?;
    let v: Value = serde_json::from_str(inner.trim()).ok()?;
    Some(Call {
        name: v.get("name")?.as_str()?.to_string(),
        arguments: v.get("arguments")?.clone(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool::new(
            "get_weather",
            Some("The weather in a city".into()),
            Some(
                json!({"type": "object", "properties": {"city": {"type": "string"}},
                        "required": ["city"]}),
            ),
        )
        .unwrap()
    }

    #[test]
    fn calls_round_trip_and_bad_tools_are_named() {
        let call = Call {
            name: "get_weather".into(),
            arguments: json!({"city": "Paris"}),
        };
        let text = render_call(&call);
        assert_eq!(
            text,
            r#"<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>"#
        );
        assert_eq!(parse_call(&format!(" {text}\n")), Some(call));
        assert_eq!(parse_call("The weather is fine."), None);
        assert_eq!(
            parse_call(r#"<tool_call>{"name": "get_weather", "argu"#),
            None
        );
        assert!(Tool::new("bad name", None, None).is_err());
        let e = Tool::new("f", None, Some(json!({"type": "strnig"}))).unwrap_err();
        assert!(e.to_string().contains("function f: parameters"), "{e}");
        assert!(system_prompt(&[weather()]).contains(r#""name":"get_weather""#));
    }

    #[test]
    fn the_grammar_allows_only_the_chosen_tools() {
        let other = Tool::new("get_time", None, None).unwrap();
        let tools = [weather(), other];
        let Constraint::Lark(g) = constraint(&tools, &ToolChoice::Required).unwrap() else {
            panic!()
        };
        assert!(g.contains("get_weather") && g.contains("get_time") && !g.contains("text"));
        let Constraint::Lark(g) =
            constraint(&tools, &ToolChoice::Named("get_time".into())).unwrap()
        else {
            panic!()
        };
        assert!(!g.contains("get_weather"));
        let Constraint::Lark(g) = constraint(&tools, &ToolChoice::Auto).unwrap() else {
            panic!()
        };
        assert!(g.starts_with("start: call | text"));
        let e = constraint(&tools, &ToolChoice::Named("nope".into())).unwrap_err();
        assert!(e.to_string().contains("get_weather, get_time"), "{e}");
    }
}
