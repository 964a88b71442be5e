//! OpenAI's request and response shapes (API reference: Chat, Completions (legacy),
//! Embeddings, Models), as typed serde structs.
//!
//! Requests are read in two passes: first the body's top-level keys are checked against the
//! route's list of known parameters (OpenAI answers an unknown one with 400 "Unrecognized
//! request argument supplied: X", and so does lever), then the typed struct is built with the
//! path of a wrongly typed value kept for the error. Parameters that OpenAI defines but lever
//! does not implement are typed too, so that a request setting them gets a 400 naming them
//! (`unsupported`) instead of an answer that silently ignores them; their neutral values
//! (`"n": 1`, `"logprobs": false`, `"presence_penalty": 0`, ...) are accepted.

use lever_generate::Constraint;
use lever_generate::tools::{Tool, ToolChoice};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;

// ---------------------------------------------------------------------------------------
// Requests

/// One string or a list of them (`stop`, `prompt`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A completion's `prompt`: text, texts, token ids, or lists of token ids (lm-evaluation-
/// harness's `local-completions` sends ids).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// One prompt of a request, as given.
#[derive(Debug, Clone, PartialEq)]
pub enum OnePrompt {
    Text(String),
    Ids(Vec<u32>),
}

impl Prompt {
    pub fn into_vec(self) -> Vec<OnePrompt> {
        match self {
            Prompt::Text(s) => vec![OnePrompt::Text(s)],
            Prompt::Texts(v) => v.into_iter().map(OnePrompt::Text).collect(),
            Prompt::Ids(v) => vec![OnePrompt::Ids(v)],
            Prompt::IdLists(v) => v.into_iter().map(OnePrompt::Ids).collect(),
        }
    }
}

/// The most alternatives `logprobs` / `top_logprobs` may ask for (OpenAI's chat limit; vLLM's
/// default `max_logprobs` is 20 as well).
pub const MAX_LOGPROBS: i64 = 20;

/// A message's content: a string, or a list of parts of which lever reads text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A chat message. `name`, `tool_calls`, `tool_call_id` and `function_call` are typed so a
/// message carrying them is refused by name (the chat template would drop them).
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
    pub function_call: Option<Value>,
    /// An assistant's refusal text from an earlier turn; lever's answers never have one.
    pub refusal: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What chat and text completions share: the parameters lever implements, then the ones it
/// refuses unless they hold their neutral value.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GenParams {
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Beyond OpenAI's parameters, as vLLM and llama.cpp's server name them.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<i64>,
    /// End-user id: recorded by OpenAI for abuse monitoring; changes nothing in the answer.
    pub user: Option<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<Map<String, Value>>,
    /// Constrained decoding as vLLM (and SGLang) name it: a JSON Schema, a regular
    /// expression, one of a set of strings, a grammar (llguidance's Lark).
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ChatRequest {
    pub messages: Option<Vec<ChatMessage>>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub functions: Option<Vec<Value>>,
    pub function_call: Option<Value>,
    pub response_format: Option<ResponseFormat>,
    pub store: Option<bool>,
    pub metadata: Option<Map<String, Value>>,
    pub modalities: Option<Vec<String>>,
    pub audio: Option<Value>,
    pub prediction: Option<Value>,
    pub reasoning_effort: Option<String>,
    pub service_tier: Option<String>,
    pub web_search_options: Option<Value>,
    pub verbosity: Option<String>,
    /// Routing hints for OpenAI's own caches and abuse checks; no effect on the answer.
    pub prompt_cache_key: Option<String>,
    pub safety_identifier: Option<String>,
    #[serde(flatten)]
    pub params: GenParams,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    /// With `"type": "json_schema"`: `{"name", "schema", "strict", "description"}`.
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
    pub description: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CompletionRequest {
    pub prompt: Option<Prompt>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub params: GenParams,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: Option<Value>,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
    pub user: Option<String>,
}

const GEN_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "n",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];

/// The top-level parameters of a chat request (OpenAI's reference, 2025), known to lever
/// whether it implements them or not.
pub const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "store",
    "metadata",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "service_tier",
    "web_search_options",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
];

pub const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo", "best_of", "suffix"];

pub const EMBEDDING_FIELDS: &[&str] = &["model", "input", "encoding_format", "dimensions", "user"];

/// Which parameters a route knows: its own and, for the generating routes, the shared ones.
pub fn known(route_fields: &[&str], generates: bool) -> impl Fn(&str) -> bool {
    let own: Vec<String> = route_fields.iter().map(|s| s.to_string()).collect();
    move |k: &str| own.iter().any(|f| f == k) || (generates && GEN_FIELDS.contains(&k))
}

/// Read a request body: a JSON object whose every key `known` accepts, into `T`.
pub fn parse<T: DeserializeOwned>(
    bytes: &[u8],
    known: impl Fn(&str) -> bool,
) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    if let Some(k) = map.keys().find(|k| !known(k)) {
        return Err(ApiError::bad_param(
            k,
            format!("Unrecognized request argument supplied: {k}"),
        ));
    }
    let err = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    // The path names the value at fault, except inside `#[serde(flatten)]` (the shared
    // parameters), which serde reads from a buffer that loses it: then the parameter is
    // found by reading each one alone (every field of the request types is optional).
    let mut path = err.path().to_string();
    if path.is_empty() || path == "." {
        path = map
            .iter()
            .find(|(k, v)| {
                let alone = Value::Object(Map::from_iter([((*k).clone(), (*v).clone())]));
                serde_json::from_value::<T>(alone).is_err()
            })
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
    }
    let param = path.split(['.', '[']).next().unwrap_or_default();
    let e = ApiError::bad_request(format!("invalid value for `{path}`: {}", err.inner()));
    Err(if param.is_empty() { e } else { e.param(param) })
}

impl GenParams {
    /// The constraint vLLM's `guided_*` parameters ask for (at most one of them).
    pub fn constraint(&self) -> Result<Option<(Constraint, &'static str)>, ApiError> {
        let mut given: Vec<(Constraint, &'static str)> = Vec::new();
        if let Some(s) = &self.guided_json {
            given.push((Constraint::JsonSchema(s.clone()), "guided_json"));
        }
        if let Some(r) = &self.guided_regex {
            given.push((Constraint::Regex(r.clone()), "guided_regex"));
        }
        if let Some(c) = &self.guided_choice {
            given.push((Constraint::Choice(c.clone()), "guided_choice"));
        }
        if let Some(g) = &self.guided_grammar {
            given.push((Constraint::Lark(g.clone()), "guided_grammar"));
        }
        if given.len() > 1 {
            return Err(ApiError::bad_param(
                given[1].1,
                "give one of guided_json, guided_regex, guided_choice, guided_grammar",
            ));
        }
        Ok(given.pop())
    }

    /// The first parameter set to something lever would have to ignore.
    pub fn unsupported(&self) -> Option<ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Some(ApiError::unsupported("n", "one choice per request: n = 1"));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Some(ApiError::unsupported(name, "only 0"));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Some(ApiError::unsupported("logit_bias", "only {}"));
        }
        None
    }
}

impl ChatRequest {
    /// What the answer must be: `response_format` (OpenAI's), else a `guided_*` parameter.
    pub fn constraint(&self) -> Result<Option<(Constraint, &'static str)>, ApiError> {
        let from_format = match &self.response_format {
            None => None,
            Some(f) => match f.kind.as_str() {
                "json_object" => Some(Constraint::JsonObject),
                "json_schema" => {
                    let schema = f
                        .json_schema
                        .as_ref()
                        .and_then(|j| j.schema.clone())
                        .ok_or_else(|| {
                            ApiError::bad_param(
                                "response_format",
                                "response_format.json_schema.schema is required with \"type\": \"json_schema\"",
                            )
                        })?;
                    Some(Constraint::JsonSchema(schema))
                }
                _ => None,
            },
        };
        let guided = self.params.constraint()?;
        match (from_format, guided) {
            (Some(_), Some((_, name))) => Err(ApiError::bad_param(
                name,
                format!("give response_format or {name}, not both"),
            )),
            (Some(c), None) => Ok(Some((c, "response_format"))),
            (None, g) => Ok(g),
        }
    }

    pub fn unsupported(&self) -> Option<ApiError> {
        let set = |v: &Option<Value>, neutral: &[&str]| {
            v.as_ref().is_some_and(|v| match v {
                Value::Null => false,
                Value::String(s) => !neutral.contains(&s.as_str()),
                _ => true,
            })
        };
        let checks: [(&str, bool, &str); 12] = [
            (
                "functions",
                self.functions.as_ref().is_some_and(|f| !f.is_empty()),
                "no function calls",
            ),
            (
                "function_call",
                set(&self.function_call, &["none"]),
                "only \"none\"",
            ),
            (
                "response_format",
                self.response_format.as_ref().is_some_and(|f| {
                    !["text", "json_object", "json_schema"].contains(&f.kind.as_str())
                }),
                "\"text\", \"json_object\" or \"json_schema\"",
            ),
            ("store", self.store == Some(true), "nothing is stored"),
            (
                "metadata",
                self.metadata.as_ref().is_some_and(|m| !m.is_empty()),
                "nothing is stored",
            ),
            (
                "modalities",
                self.modalities
                    .as_ref()
                    .is_some_and(|m| m.iter().any(|x| x != "text")),
                "only [\"text\"]",
            ),
            ("audio", set(&self.audio, &[]), "text only"),
            (
                "prediction",
                set(&self.prediction, &[]),
                "no predicted outputs",
            ),
            (
                "reasoning_effort",
                self.reasoning_effort.is_some(),
                "not a reasoning model",
            ),
            (
                "service_tier",
                self.service_tier
                    .as_deref()
                    .is_some_and(|t| t != "auto" && t != "default"),
                "one tier",
            ),
            (
                "web_search_options",
                set(&self.web_search_options, &[]),
                "no web search",
            ),
            (
                "verbosity",
                self.verbosity.is_some(),
                "not a reasoning model",
            ),
        ];
        if let Some((name, _, what)) = checks.iter().find(|(_, bad, _)| *bad) {
            return Some(ApiError::unsupported(name, what));
        }
        self.params.unsupported()
    }

    /// The tools the answer may call and how (`tools`, `tool_choice`); None when there are
    /// none or `tool_choice` is "none". Errors name the parameter and the tool.
    pub fn tools(&self) -> Result<Option<(Vec<Tool>, ToolChoice)>, ApiError> {
        let mut tools = Vec::new();
        for (i, t) in self.tools.iter().flatten().enumerate() {
            let bad = |m: String| ApiError::bad_param("tools", format!("tools[{i}]: {m}"));
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad(
                    "only {\"type\": \"function\"} tools are supported".into()
                ));
            }
            let Some(f) = t.get("function").and_then(Value::as_object) else {
                return Err(bad("`function` (an object) is required".into()));
            };
            let Some(name) = f.get("name").and_then(Value::as_str) else {
                return Err(bad("`function.name` (a string) is required".into()));
            };
            let description = f
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string);
            let parameters = f.get("parameters").cloned();
            tools.push(Tool::new(name, description, parameters).map_err(|e| bad(e.to_string()))?);
        }
        let bad_choice = |m: &str| ApiError::bad_param("tool_choice", m.to_string());
        let choice = match &self.tool_choice {
            None | Some(Value::Null) => {
                if tools.is_empty() {
                    return Ok(None);
                }
                ToolChoice::Auto
            }
            Some(Value::String(s)) => match s.as_str() {
                "none" => return Ok(None),
                "auto" if tools.is_empty() => return Ok(None),
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                _ => {
                    return Err(bad_choice(
                        "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
                    ));
                }
            },
            Some(v) => match v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                    ToolChoice::Named(name.to_string())
                }
                _ => {
                    return Err(bad_choice(
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": …}}",
                    ));
                }
            },
        };
        if tools.is_empty() {
            return Err(bad_choice("tool_choice needs tools"));
        }
        if let ToolChoice::Named(n) = &choice
            && !tools.iter().any(|t| &t.name == n)
        {
            return Err(bad_choice(&format!(
                "tool_choice names {n:?}, which is not among the tools"
            )));
        }
        Ok(Some((tools, choice)))
    }

    /// How many alternatives per generated token (`top_logprobs`), when `logprobs` is on.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let on = self.logprobs == Some(true);
        match self.top_logprobs {
            Some(n) if !(0..=MAX_LOGPROBS).contains(&n) => Err(ApiError::bad_param(
                "top_logprobs",
                format!("top_logprobs must be within 0..{MAX_LOGPROBS}"),
            )),
            Some(n) if n > 0 && !on => Err(ApiError::bad_param(
                "top_logprobs",
                "top_logprobs needs \"logprobs\": true",
            )),
            n => Ok(on.then_some(n.unwrap_or(0) as usize)),
        }
    }
}

impl CompletionRequest {
    /// How many alternatives per token (`logprobs`: 0 gives the chosen token's only).
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            Some(n) if !(0..=MAX_LOGPROBS).contains(&n) => Err(ApiError::bad_param(
                "logprobs",
                format!("logprobs must be within 0..{MAX_LOGPROBS}"),
            )),
            n => Ok(n.map(|n| n as usize)),
        }
    }

    pub fn unsupported(&self) -> Option<ApiError> {
        if self.best_of.is_some_and(|n| n != 1) {
            return Some(ApiError::unsupported("best_of", "only 1"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Some(ApiError::unsupported("suffix", "no insertion"));
        }
        self.params.unsupported()
    }
}

// ---------------------------------------------------------------------------------------
// Responses

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// An assistant's answer: text, or (with `tools`) a call, whose content is then null.
#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A function call in an answer (`message.tool_calls[]`); streamed, each carries its `index`.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's shape: a string the client parses).
    pub arguments: String,
}

/// One token's log-probability in a chat answer (OpenAI's `choices[].logprobs.content[]`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// `choices[].logprobs` of a chat answer or chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    pub refusal: Option<()>,
}

/// `choices[].logprobs` of a text completion (the legacy shape): per token its text, its
/// log-probability (null for a prompt's first token), the alternatives as a map from text to
/// log-probability, and where the token starts in the choice's text (characters).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f64>>,
    pub top_logprobs: Vec<Option<Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

/// A whole chat answer (`object: "chat.completion"`).
#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// One server-sent event of a streamed chat answer (`object: "chat.completion.chunk"`); the
/// last one, with `stream_options.include_usage`, has no choices and the usage.
#[derive(Debug, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A text completion, whole or one streamed piece of it (`object: "text_completion"` both).
#[derive(Debug, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A vector as a list of floats, or base64 of its little-endian f32 bytes.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct Embedding {
    pub object: &'static str,
    pub index: usize,
    pub embedding: Vector,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingList {
    pub object: &'static str,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

/// `{"error": {...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        parse(body.as_bytes(), known(CHAT_FIELDS, true))
    }

    #[test]
    fn unknown_parameters_are_named() {
        let e = chat(r#"{"messages": [], "temprature": 0.5}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temprature"));
        assert!(
            e.message
                .contains("Unrecognized request argument supplied: temprature")
        );
        // Completion-only parameters are unknown to chat.
        let e = chat(r#"{"messages": [], "echo": true}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("echo"));
    }

    #[test]
    fn a_wrongly_typed_value_names_its_parameter() {
        let e = chat(r#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e:?}");
        let e = chat(r#"{"messages": [{"role": 3}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(e.message.contains("messages[0].role"), "{}", e.message);
        assert!(chat("[1]").is_err());
    }

    #[test]
    fn unsupported_parameters_are_refused_and_neutral_values_accepted() {
        let neutral = r#"{"messages": [], "n": 1, "logprobs": false, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "store": false, "user": "u", "modalities": ["text"]}"#;
        assert!(chat(neutral).unwrap().unsupported().is_none());
        for (body, param) in [
            (r#"{"logit_bias": {"1": 5}}"#, "logit_bias"),
            (r#"{"functions": [{}]}"#, "functions"),
            (
                r#"{"response_format": {"type": "grammar"}}"#,
                "response_format",
            ),
            (r#"{"presence_penalty": 0.5}"#, "presence_penalty"),
            (r#"{"frequency_penalty": -1}"#, "frequency_penalty"),
            (r#"{"n": 2}"#, "n"),
        ] {
            let e = chat(body).unwrap().unsupported().unwrap();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert_eq!(e.status, 400);
        }
        let completion = |b: &str| -> CompletionRequest {
            parse(b.as_bytes(), known(COMPLETION_FIELDS, true)).unwrap()
        };
        for (body, param) in [
            (r#"{"best_of": 3}"#, "best_of"),
            (r#"{"suffix": "end"}"#, "suffix"),
        ] {
            let e = completion(body).unsupported().unwrap();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        assert!(
            completion(r#"{"echo": false, "best_of": 1, "suffix": ""}"#)
                .unsupported()
                .is_none()
        );
    }

    #[test]
    fn tools_and_tool_choice_are_read_and_bad_ones_named() {
        let t = |b: &str| chat(b).unwrap().tools();
        let f = r#"{"type": "function", "function": {"name": "f", "parameters":
            {"type": "object", "properties": {"x": {"type": "integer"}}}}}"#;
        assert_eq!(t(r#"{}"#).unwrap(), None);
        assert_eq!(
            t(&format!(r#"{{"tools": [{f}], "tool_choice": "none"}}"#)).unwrap(),
            None
        );
        let (tools, choice) = t(&format!(r#"{{"tools": [{f}]}}"#)).unwrap().unwrap();
        assert_eq!((tools[0].name.as_str(), choice), ("f", ToolChoice::Auto));
        let named = format!(
            r#"{{"tools": [{f}], "tool_choice": {{"type": "function", "function": {{"name": "f"}}}}}}"#
        );
        assert_eq!(t(&named).unwrap().unwrap().1, ToolChoice::Named("f".into()));
        for (body, param) in [
            (r#"{"tools": [{"type": "retrieval"}]}"#.to_string(), "tools"),
            (r#"{"tools": [{"type": "function", "function": {}}]}"#.to_string(), "tools"),
            (
                r#"{"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strnig"}}}]}"#.to_string(),
                "tools",
            ),
            (r#"{"tool_choice": "required"}"#.to_string(), "tool_choice"),
            (format!(r#"{{"tools": [{f}], "tool_choice": "always"}}"#), "tool_choice"),
            (
                format!(
                    r#"{{"tools": [{f}], "tool_choice": {{"type": "function", "function": {{"name": "g"}}}}}}"#
                ),
                "tool_choice",
            ),
        ] {
            let e = t(&body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
    }

    #[test]
    fn logprobs_are_read_within_their_bounds() {
        let lp = |b: &str| chat(b).unwrap().logprobs();
        assert_eq!(lp(r#"{"logprobs": false}"#).unwrap(), None);
        assert_eq!(lp(r#"{"logprobs": true}"#).unwrap(), Some(0));
        assert_eq!(
            lp(r#"{"logprobs": true, "top_logprobs": 5}"#).unwrap(),
            Some(5)
        );
        for body in [
            r#"{"top_logprobs": 2}"#,
            r#"{"logprobs": true, "top_logprobs": 21}"#,
            r#"{"logprobs": true, "top_logprobs": -1}"#,
        ] {
            let e = lp(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("top_logprobs"), "{body}");
        }
        let completion = |b: &str| -> CompletionRequest {
            parse(b.as_bytes(), known(COMPLETION_FIELDS, true)).unwrap()
        };
        assert_eq!(
            completion(r#"{"logprobs": 1}"#).logprobs().unwrap(),
            Some(1)
        );
        assert_eq!(
            completion(r#"{"logprobs": 0}"#).logprobs().unwrap(),
            Some(0)
        );
        assert!(completion(r#"{"logprobs": 99}"#).logprobs().is_err());
        // Every shape of prompt OpenAI's reference allows.
        for (body, want) in [
            (r#"{"prompt": "a b"}"#, vec![OnePrompt::Text("a b".into())]),
            (
                r#"{"prompt": ["a", "b"]}"#,
                vec![OnePrompt::Text("a".into()), OnePrompt::Text("b".into())],
            ),
            (r#"{"prompt": [1, 2]}"#, vec![OnePrompt::Ids(vec![1, 2])]),
            (
                r#"{"prompt": [[1, 2], [3]]}"#,
                vec![OnePrompt::Ids(vec![1, 2]), OnePrompt::Ids(vec![3])],
            ),
        ] {
            let p = completion(body).prompt.unwrap().into_vec();
            assert_eq!(p, want, "{body}");
        }
    }

    #[test]
    fn response_format_and_guided_parameters_name_one_constraint() {
        let c = |b: &str| chat(b).unwrap().constraint();
        assert_eq!(
            c(r#"{"response_format": {"type": "json_object"}}"#).unwrap(),
            Some((Constraint::JsonObject, "response_format"))
        );
        let schema = r#"{"response_format": {"type": "json_schema", "json_schema":
            {"name": "p", "strict": true, "schema": {"type": "integer"}}}}"#;
        assert_eq!(
            c(schema).unwrap(),
            Some((
                Constraint::JsonSchema(serde_json::json!({"type": "integer"})),
                "response_format"
            ))
        );
        assert_eq!(
            c(r#"{"guided_choice": ["a", "b"]}"#).unwrap(),
            Some((
                Constraint::Choice(vec!["a".into(), "b".into()]),
                "guided_choice"
            ))
        );
        assert_eq!(c(r#"{"response_format": {"type": "text"}}"#).unwrap(), None);
        for (body, param) in [
            (
                r#"{"response_format": {"type": "json_schema"}}"#,
                "response_format",
            ),
            (
                r#"{"response_format": {"type": "json_object"}, "guided_regex": "a"}"#,
                "guided_regex",
            ),
            (
                r#"{"guided_regex": "a", "guided_choice": ["b"]}"#,
                "guided_choice",
            ),
        ] {
            let e = c(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert_eq!(e.status, 400);
        }
    }

    #[test]
    fn responses_have_openai_fields() {
        let c = ChatChunk {
            id: "x".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v["choices"][0],
            serde_json::json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})
        );
        assert!(v.get("usage").is_none());
        let e = ApiError::unsupported("tools", "no tool calls").body();
        let v = serde_json::to_value(e).unwrap();
        assert_eq!(v["error"]["param"], "tools");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
}
