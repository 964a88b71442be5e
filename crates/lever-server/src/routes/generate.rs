//! `POST /v1/chat/completions` and `POST /v1/completions`: check the request, build the
//! prompt's tokens, hand a job to the engine, and answer whole or as server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use lever_generate::{Constraint, FinishReason, Guide, SamplingParams};
use lever_model::chat::Message;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{AppState, created};
use crate::engine::{Event, Job, Refused, TokenLogprob};
use crate::error::ApiError;
use crate::openai::{
    AssistantMessage, CHAT_FIELDS, COMPLETION_FIELDS, ChatChoice, ChatChunk, ChatCompletion,
    ChatLogprobs, ChatRequest, ChatTokenLogprob, ChunkChoice, Completion, CompletionLogprobs,
    CompletionRequest, Content, Delta, FunctionCall, GenParams, OnePrompt, TextChoice, ToolCall,
    TopLogprob, Usage, known, parse,
};
use lever_model::Tokenizer;

/// A generation request, checked: what the engine and the response need.
struct Checked {
    variant: usize,
    model_id: String,
    /// max_tokens as asked, and under which name (None: the server's default applies).
    max_tokens: Option<(usize, &'static str)>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Constrained decoding: the request's guide, handed to the engine.
    guide: Option<Guide>,
    /// Log-probabilities of the answer's tokens, with this many alternatives each.
    logprobs: Option<usize>,
    /// Completions' `echo`: the prompt's text (and, with logprobs, its tokens' log-
    /// probabilities) come first in the answer.
    echo: Option<String>,
    /// Chat with tools: an answer that is a call becomes `tool_calls`.
    tools: bool,
}

impl AppState {
    fn variant(&self, model: Option<&str>) -> Result<usize, ApiError> {
        let Some(name) = model else { return Ok(0) };
        self.variants
            .iter()
            .position(|(id, _)| id == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.variants.iter().map(|(id, _)| id.as_str()).collect();
                ApiError::model_not_found(format!(
                    "the model `{name}` does not exist (served: {})",
                    known.join(", ")
                ))
            })
    }

    /// `zero_ok`: max_tokens 0 is allowed (echo: the prompt's log-probabilities only).
    fn check(
        &self,
        p: GenParams,
        max_completion_tokens: Option<i64>,
        zero_ok: bool,
    ) -> Result<Checked, ApiError> {
        let variant = self.variant(p.model.as_deref())?;
        let asked = match (max_completion_tokens, p.max_tokens) {
            (Some(m), _) => Some((m, "max_completion_tokens")),
            (None, Some(m)) => Some((m, "max_tokens")),
            (None, None) => None,
        };
        let max_tokens = match asked {
            None => None,
            Some((0, _)) if zero_ok => Some((0, "max_tokens")),
            Some((m, name)) if m < 1 => {
                return Err(ApiError::bad_param(
                    name,
                    if zero_ok {
                        format!("{name} must be at least 0")
                    } else {
                        format!("{name} must be at least 1 (0 only with \"echo\": true)")
                    },
                ));
            }
            Some((m, name)) if m as u64 > self.limits.max_tokens as u64 => {
                return Err(ApiError::bad_param(
                    name,
                    format!(
                        "{name} {m} is more than this server allows ({})",
                        self.limits.max_tokens
                    ),
                ));
            }
            Some((m, name)) => Some((m as usize, name)),
        };
        // What a request leaves out comes from the model's published generation settings
        // (as vLLM's `--generation-config auto`), else llama.cpp's defaults.
        let d = SamplingParams::for_model(&self.variants[variant].1.info.generation);
        let temperature = p.temperature.unwrap_or(d.temperature);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_param(
                "temperature",
                "temperature must be within 0..2",
            ));
        }
        let top_p = p.top_p.unwrap_or(d.top_p);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_param("top_p", "top_p must be within (0, 1]"));
        }
        let top_k = match p.top_k {
            None => d.top_k,
            // vLLM's "off".
            Some(-1 | 0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(_) => return Err(ApiError::bad_param("top_k", "top_k must be -1, 0 or more")),
        };
        let min_p = p.min_p.unwrap_or(d.min_p);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad_param("min_p", "min_p must be within 0..1"));
        }
        let repeat_penalty = p.repetition_penalty.unwrap_or(d.repeat_penalty);
        if !(repeat_penalty > 0.0 && repeat_penalty.is_finite()) {
            return Err(ApiError::bad_param(
                "repetition_penalty",
                "repetition_penalty must be above 0",
            ));
        }
        let stop = p
            .stop
            .map(crate::openai::OneOrMany::into_vec)
            .unwrap_or_default();
        if stop.len() > 4 {
            return Err(ApiError::bad_param("stop", "at most 4 stop sequences"));
        }
        let seed = p.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let stream = p.stream.unwrap_or(false);
        if p.stream_options.is_some() && !stream {
            return Err(ApiError::bad_param(
                "stream_options",
                "stream_options is only allowed with \"stream\": true",
            ));
        }
        Ok(Checked {
            variant,
            model_id: self.variants[variant].0.clone(),
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                repeat_penalty,
                seed,
                ..SamplingParams::greedy()
            },
            stop,
            stream,
            include_usage: p.stream_options.is_some_and(|o| o.include_usage),
            guide: None,
            logprobs: None,
            echo: None,
            tools: false,
        })
    }

    /// The guide for a request's constraint; a constraint that cannot be compiled is a 400
    /// naming the parameter it came from, with llguidance's message (the keyword; for a
    /// schema that is not one, the path inside it).
    fn guide(
        &self,
        variant: usize,
        constraint: Option<(Constraint, &'static str)>,
    ) -> Result<Option<Guide>, ApiError> {
        let Some((c, param)) = constraint else {
            return Ok(None);
        };
        let g = self.grammars(variant)?;
        g.guide(&c)
            .map(Some)
            .map_err(|e| ApiError::bad_param(param, e.to_string()))
    }

    /// Tokenize the prompt and fit it and the answer into the context: a prompt that fills
    /// the context, or an explicit max_tokens that does not fit after the prompt, is a 400;
    /// without one the answer gets the server's default or what is left, whichever is less.
    fn prompt_ids(
        &self,
        c: &Checked,
        prompt: &OnePrompt,
        param: &str,
    ) -> Result<(Vec<u32>, usize), ApiError> {
        let model = &self.variants[c.variant].1;
        let ids = match prompt {
            OnePrompt::Text(text) => model
                .tokenizer
                .encode(text, true)
                .map_err(|e| ApiError::bad_param(param, e.to_string()))?,
            OnePrompt::Ids(ids) => {
                let vocab = model.decoder.config().vocab_size;
                if let Some((i, id)) = ids
                    .iter()
                    .enumerate()
                    .find(|(_, id)| **id as usize >= vocab)
                {
                    return Err(ApiError::bad_param(
                        param,
                        format!(
                            "{param}[{i}]: token id {id} is outside the vocabulary ({vocab} tokens)"
                        ),
                    ));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(ApiError::bad_param(param, "the prompt is empty"));
        }
        let ctx = model.decoder.config().max_seq_len;
        let n = ids.len();
        if n >= ctx {
            return Err(ApiError::bad_param(
                param,
                format!("the prompt is {n} tokens; this model's context is {ctx} tokens"),
            )
            .code("context_length_exceeded"));
        }
        let max_tokens = match c.max_tokens {
            Some((m, name)) if n + m > ctx => {
                return Err(ApiError::bad_param(
                    name,
                    format!(
                        "this model's context is {ctx} tokens, but {} were asked for: {n} in the \
                         prompt and {m} ({name}) for the answer; ask for at most {}",
                        n + m,
                        ctx - n
                    ),
                )
                .code("context_length_exceeded"));
            }
            Some((m, _)) => m,
            None => self.limits.default_max_tokens.min(ctx - n),
        };
        Ok((ids, max_tokens))
    }
}

pub(super) async fn chat(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    match chat_request(&st, &body) {
        Ok((c, ids, max_tokens)) => generate(st, c, ids, max_tokens, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

fn chat_request(st: &AppState, body: &[u8]) -> Result<(Checked, Vec<u32>, usize), ApiError> {
    let req: ChatRequest = parse(body, known(CHAT_FIELDS, true))?;
    if let Some(e) = req.unsupported() {
        return Err(e);
    }
    let mut constraint = req.constraint()?;
    let logprobs = req.logprobs()?;
    let tools = req.tools()?;
    if let Some((tools, choice)) = &tools {
        if let Some((_, name)) = &constraint {
            return Err(ApiError::bad_param(
                name,
                format!("give tools or {name}, not both"),
            ));
        }
        let c = lever_generate::tools::constraint(tools, choice)
            .map_err(|e| ApiError::bad_param("tools", e.to_string()))?;
        constraint = Some((c, "tools"));
    }
    let mut c = st.check(req.params, req.max_completion_tokens, false)?;
    c.guide = st.guide(c.variant, constraint)?;
    c.logprobs = logprobs;
    c.tools = tools.is_some();
    let Some(messages) = req.messages else {
        return Err(ApiError::bad_param(
            "messages",
            "missing required parameter: messages",
        ));
    };
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(ApiError::bad_param(
                "messages",
                format!("messages[{i}].role: unknown role {:?}", m.role),
            ));
        }
        for (field, set) in [
            ("name", m.name.is_some()),
            (
                "tool_calls",
                m.role != "assistant" && m.tool_calls.as_ref().is_some_and(|v| !v.is_null()),
            ),
            ("tool_call_id", m.role != "tool" && m.tool_call_id.is_some()),
            (
                "function_call",
                m.function_call.as_ref().is_some_and(|v| !v.is_null()),
            ),
            ("refusal", m.refusal.is_some()),
        ] {
            if set {
                return Err(ApiError::bad_param(
                    "messages",
                    format!(
                        "messages[{i}].{field} is not supported by lever serve (the chat \
                         template renders role, content, and an assistant's tool calls)"
                    ),
                )
                .code("unsupported_parameter"));
            }
        }
        // A tool's result is a user turn (see lever_generate::tools).
        let role = match m.role.as_str() {
            "developer" => "system".to_string(),
            "tool" => "user".to_string(),
            _ => m.role.clone(),
        };
        let calls = match m.tool_calls.as_ref().filter(|v| !v.is_null()) {
            None => String::new(),
            Some(v) => rendered_calls(v).map_err(|e| {
                ApiError::bad_param("messages", format!("messages[{i}].tool_calls: {e}"))
            })?,
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::bad_param(
                            "messages",
                            format!(
                                "messages[{i}].content: only text parts are supported (got {:?})",
                                p.kind
                            ),
                        ));
                    }
                    text.push_str(p.text.as_deref().unwrap_or_default());
                }
                text
            }
        };
        let content = if m.role == "tool" {
            lever_generate::tools::render_result(&content)
        } else if calls.is_empty() {
            content
        } else if content.is_empty() {
            calls
        } else {
            format!("{content}\n{calls}")
        };
        out.push(Message::new(&role, content));
    }
    if out.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "messages must not be empty",
        ));
    }
    if let Some((tools, _)) = &tools {
        // The documented system-prompt form: after the caller's own system message.
        let listing = lever_generate::tools::system_prompt(tools);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{listing}", first.content);
            }
            _ => out.insert(0, Message::new("system", listing)),
        }
    }
    let model = &st.variants[c.variant].1;
    let Some(template) = &model.chat_template else {
        return Err(ApiError::bad_param(
            "model",
            "this model has no chat template: use /v1/completions",
        ));
    };
    let text = template
        .render(&out, true)
        .map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
    let (ids, max_tokens) = st.prompt_ids(&c, &OnePrompt::Text(text), "messages")?;
    Ok((c, ids, max_tokens))
}

/// An assistant message's `tool_calls` as the model writes calls.
fn rendered_calls(v: &serde_json::Value) -> Result<String, String> {
    let calls = v.as_array().ok_or("must be a list")?;
    let mut out = Vec::with_capacity(calls.len());
    for (j, c) in calls.iter().enumerate() {
        let f = c
            .get("function")
            .ok_or(format!("[{j}]: `function` is required"))?;
        let name = f
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or(format!("[{j}].function.name (a string) is required"))?;
        let arguments = match f.get("arguments") {
            Some(serde_json::Value::String(a)) => serde_json::from_str(a)
                .map_err(|e| format!("[{j}].function.arguments is not JSON: {e}"))?,
            Some(other) => other.clone(),
            None => serde_json::json!({}),
        };
        out.push(lever_generate::tools::render_call(
            &lever_generate::tools::Call {
                name: name.to_string(),
                arguments,
            },
        ));
    }
    Ok(out.join("\n"))
}

pub(super) async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    match completion_request(&st, &body) {
        Ok((c, ids, max_tokens)) => generate(st, c, ids, max_tokens, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

fn completion_request(st: &AppState, body: &[u8]) -> Result<(Checked, Vec<u32>, usize), ApiError> {
    let req: CompletionRequest = parse(body, known(COMPLETION_FIELDS, true))?;
    if let Some(e) = req.unsupported() {
        return Err(e);
    }
    let logprobs = req.logprobs()?;
    let Some(prompt) = req.prompt else {
        return Err(ApiError::bad_param(
            "prompt",
            "missing required parameter: prompt",
        ));
    };
    let prompts = prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::bad_param(
            "prompt",
            "one prompt per request is supported",
        ));
    }
    let constraint = req.params.constraint()?;
    let echo = req.echo == Some(true);
    let mut c = st.check(req.params, None, echo)?;
    c.guide = st.guide(c.variant, constraint)?;
    c.logprobs = logprobs;
    let (ids, max_tokens) = st.prompt_ids(&c, &prompts[0], "prompt")?;
    if echo {
        c.echo = Some(match &prompts[0] {
            OnePrompt::Text(t) => t.clone(),
            OnePrompt::Ids(_) => st.variants[c.variant].1.tokenizer.decode(&ids),
        });
    }
    Ok((c, ids, max_tokens))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eog | FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Context => "length",
        FinishReason::Cancelled => "stop",
    }
}

/// A token's text as the logprobs fields show it (bytes that are not whole UTF-8 characters
/// become U+FFFD, as vLLM shows them).
fn token_text(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(tok.token_bytes(id)).into_owned()
}

/// Chat's `logprobs.content` for these tokens.
fn chat_logprobs(tok: &Tokenizer, tokens: &[TokenLogprob]) -> ChatLogprobs {
    let entry = |id: u32, lp: f32| TopLogprob {
        token: token_text(tok, id),
        logprob: lp,
        bytes: tok.token_bytes(id).to_vec(),
    };
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: token_text(tok, t.id),
                logprob: t.logprob.unwrap_or(f32::NEG_INFINITY),
                bytes: tok.token_bytes(t.id).to_vec(),
                top_logprobs: t.top.iter().map(|&(id, lp)| entry(id, lp)).collect(),
            })
            .collect(),
        refusal: None,
    }
}

/// A log-probability as the f64 that its shortest f32 text reads as, so that the same number
/// written in `token_logprobs` (a float) and in `top_logprobs` (a map's value) reads back
/// equal in a client (lm-evaluation-harness compares them with `!=`).
fn lp64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

/// The completions shape for these tokens, their text starting at character `offset` of the
/// choice's text; also the offset after them. Each position's alternatives map text to
/// log-probability and hold the token itself too (as vLLM's do), so that lm-evaluation-
/// harness's `is_greedy` (the token's log-probability is the map's largest) reads right.
fn completion_logprobs(
    tok: &Tokenizer,
    tokens: &[TokenLogprob],
    mut offset: usize,
) -> (CompletionLogprobs, usize) {
    let mut out = CompletionLogprobs::default();
    for t in tokens {
        let text = token_text(tok, t.id);
        out.text_offset.push(offset);
        offset += text.chars().count();
        out.token_logprobs.push(t.logprob.map(lp64));
        out.top_logprobs.push(t.logprob.map(|lp| {
            let mut m = serde_json::Map::new();
            for &(id, v) in &t.top {
                m.entry(token_text(tok, id)).or_insert(lp64(v).into());
            }
            m.entry(text.clone()).or_insert(lp64(lp).into());
            m
        }));
        out.tokens.push(text);
    }
    (out, offset)
}

/// Log-probabilities for one response piece, in the route's shape.
enum PieceLogprobs {
    Chat(ChatLogprobs),
    Text(CompletionLogprobs),
}

/// What the response's pieces share.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// The served model (its tokenizer spells the log-probabilities' tokens).
    served: Arc<lever_model::Model>,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
    /// Chat with tools: the id a call in the answer gets.
    call_id: Option<String>,
}

impl Meta {
    /// The answer as a tool call, when the request has tools and the answer is one.
    fn tool_call(&self, text: &str) -> Option<ToolCall> {
        let id = self.call_id.clone()?;
        let call = lever_generate::tools::parse_call(text)?;
        Some(ToolCall {
            index: None,
            id,
            kind: "function",
            function: FunctionCall {
                name: call.name,
                arguments: serde_json::to_string(&call.arguments).unwrap_or_default(),
            },
        })
    }

    fn tok(&self) -> &Tokenizer {
        &self.served.tokenizer
    }

    /// The log-probabilities of these tokens for a piece whose text starts at `offset`
    /// (completions), or None when the request did not ask; and the offset after them.
    fn piece_logprobs(
        &self,
        tokens: &[TokenLogprob],
        offset: usize,
    ) -> (Option<PieceLogprobs>, usize) {
        if !self.logprobs {
            return (None, offset);
        }
        match self.kind {
            Kind::Chat => (
                Some(PieceLogprobs::Chat(chat_logprobs(self.tok(), tokens))),
                offset,
            ),
            Kind::Completion => {
                let (lp, end) = completion_logprobs(self.tok(), tokens, offset);
                (Some(PieceLogprobs::Text(lp)), end)
            }
        }
    }

    fn whole(
        &self,
        text: String,
        finish: FinishReason,
        usage: Usage,
        prompt: &[TokenLogprob],
        tokens: &[TokenLogprob],
    ) -> Response {
        let mut finish = finish_reason(finish);
        match self.kind {
            Kind::Chat => {
                let call = self.tool_call(&text);
                if call.is_some() {
                    finish = "tool_calls";
                }
                axum::Json(ChatCompletion {
                    id: self.id.clone(),
                    object: "chat.completion",
                    created: self.created,
                    model: self.model.clone(),
                    choices: vec![ChatChoice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: if call.is_some() { None } else { Some(text) },
                            tool_calls: call.map(|c| vec![c]),
                        },
                        logprobs: self.logprobs.then(|| chat_logprobs(self.tok(), tokens)),
                        finish_reason: finish,
                    }],
                    usage,
                })
                .into_response()
            }
            Kind::Completion => {
                let logprobs = self.logprobs.then(|| {
                    let all: Vec<TokenLogprob> = prompt.iter().chain(tokens).cloned().collect();
                    completion_logprobs(self.tok(), &all, 0).0
                });
                axum::Json(Completion {
                    id: self.id.clone(),
                    object: "text_completion",
                    created: self.created,
                    model: self.model.clone(),
                    choices: vec![TextChoice {
                        index: 0,
                        text,
                        logprobs,
                        finish_reason: Some(finish),
                    }],
                    usage: Some(usage),
                })
                .into_response()
            }
        }
    }

    /// One streamed piece: text, the opening role (chat), the finish, or the usage alone.
    fn chunk(
        &self,
        role: bool,
        text: Option<String>,
        finish: Option<FinishReason>,
        usage: Option<Usage>,
        logprobs: Option<PieceLogprobs>,
    ) -> SseEvent {
        self.chunk_with(role, text, finish.map(finish_reason), usage, logprobs, None)
    }

    /// `chunk`, with a finish reason as sent and, for chat, tool calls in the delta.
    fn chunk_with(
        &self,
        role: bool,
        text: Option<String>,
        finish_reason: Option<&'static str>,
        usage: Option<Usage>,
        logprobs: Option<PieceLogprobs>,
        tool_calls: Option<Vec<ToolCall>>,
    ) -> SseEvent {
        match self.kind {
            Kind::Chat => event(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: if usage.is_some() {
                    Vec::new()
                } else {
                    vec![ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: role.then_some("assistant"),
                            content: text,
                            tool_calls,
                        },
                        logprobs: match logprobs {
                            Some(PieceLogprobs::Chat(c)) => Some(c),
                            _ => None,
                        },
                        finish_reason,
                    }]
                },
                usage,
            }),
            Kind::Completion => event(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: if usage.is_some() {
                    Vec::new()
                } else {
                    vec![TextChoice {
                        index: 0,
                        text: text.unwrap_or_default(),
                        logprobs: match logprobs {
                            Some(PieceLogprobs::Text(c)) => Some(c),
                            _ => None,
                        },
                        finish_reason,
                    }]
                },
                usage,
            }),
        }
    }
}

fn event<T: Serialize>(v: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(v).unwrap_or_default())
}

async fn generate(
    st: Arc<AppState>,
    mut c: Checked,
    ids: Vec<u32>,
    max_tokens: usize,
    kind: Kind,
) -> Response {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        variant: c.variant,
        prompt: ids,
        max_tokens,
        sampling: c.sampling.clone(),
        stop: c.stop.clone(),
        guide: c.guide.take(),
        logprobs: c.logprobs,
        echo: c.echo.is_some() && c.logprobs.is_some(),
        events: tx,
    };
    match st.engine.submit(job) {
        Ok(()) => {}
        Err(Refused::Busy) => {
            return ApiError::busy(format!(
                "the server is at capacity ({} running, {} waiting); retry later",
                st.limits.max_batch, st.limits.queue
            ))
            .into_response();
        }
        Err(Refused::Stopped) => return ApiError::stopping().into_response(),
    }
    let meta = Meta {
        id: st.id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: created(),
        model: c.model_id.clone(),
        kind,
        served: st.variants[c.variant].1.clone(),
        logprobs: c.logprobs.is_some(),
        call_id: c.tools.then(|| st.id("call")),
    };
    let echo = c.echo.take();
    if !c.stream {
        let mut text = echo.unwrap_or_default();
        let (mut prompt, mut tokens) = (Vec::new(), Vec::new());
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Prompt(p) => prompt = p,
                Event::Token(t) => tokens.push(t),
                Event::Failed(m) => return ApiError::internal(m).into_response(),
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let usage = Usage::new(prompt_tokens, completion_tokens);
                    return meta.whole(text, finish, usage, &prompt, &tokens);
                }
            }
        }
        return ApiError::internal("the engine stopped").into_response();
    }
    // Streaming: a task turns engine events into SSE chunks. When the client goes away the
    // SSE body is dropped (hyper sees the connection's end even while no event is due, as
    // during a long prefill); the task notices, drops `rx`, and the engine drops the
    // sequence at its next step or before the next chunk of its prompt. A token's
    // log-probabilities ride with the next piece of text sent (text held back while it may
    // be the start of a stop sequence comes later than its token).
    let (out, body) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let include_usage = c.include_usage;
    tokio::spawn(async move {
        if kind == Kind::Chat
            && out
                .send(Ok(meta.chunk(true, Some(String::new()), None, None, None)))
                .await
                .is_err()
        {
            return;
        }
        // Completions' echo without logprobs: the prompt's text is the first piece.
        if let Some(t) = echo.as_ref().filter(|_| !meta.logprobs)
            && out
                .send(Ok(meta.chunk(false, Some(t.clone()), None, None, None)))
                .await
                .is_err()
        {
            return;
        }
        let mut pending: Vec<TokenLogprob> = Vec::new();
        let mut offset = 0;
        // With tools, an answer whose first character is '<' is a call (the grammar lets
        // text answers start with anything else): it is held back and sent as `tool_calls`
        // once whole, with the log-probabilities of its tokens.
        let mut call_text: Option<String> = None;
        let mut decided = meta.call_id.is_none();
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                () = out.closed() => return,
            };
            let Some(ev) = ev else { break };
            let sent = match ev {
                Event::Token(t) => {
                    pending.push(t);
                    Ok(())
                }
                Event::Prompt(p) => {
                    let text = echo.clone().unwrap_or_default();
                    let (lp, _) = meta.piece_logprobs(&p, 0);
                    offset = text.chars().count();
                    out.send(Ok(meta.chunk(false, Some(text), None, None, lp)))
                        .await
                }
                Event::Text(t) if !decided && t.is_empty() => Ok(()),
                Event::Text(t) if !decided && t.starts_with('<') => {
                    decided = true;
                    call_text = Some(t);
                    Ok(())
                }
                Event::Text(t) if call_text.is_some() => {
                    if let Some(c) = call_text.as_mut() {
                        c.push_str(&t);
                    }
                    Ok(())
                }
                Event::Text(t) => {
                    decided = true;
                    let (lp, end) = meta.piece_logprobs(&pending, offset);
                    pending.clear();
                    offset = end;
                    out.send(Ok(meta.chunk(false, Some(t), None, None, lp)))
                        .await
                }
                Event::Failed(m) => {
                    let _ = out.send(Ok(event(&ApiError::internal(m).body()))).await;
                    break;
                }
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut text = (kind == Kind::Completion).then(String::new);
                    let (lp, _) = if pending.is_empty() {
                        (None, offset)
                    } else {
                        meta.piece_logprobs(&pending, offset)
                    };
                    let mut finish = Some(finish_reason(finish));
                    let mut calls = None;
                    if let Some(held) = call_text.take() {
                        match meta.tool_call(&held) {
                            Some(mut call) => {
                                call.index = Some(0);
                                calls = Some(vec![call]);
                                finish = Some("tool_calls");
                            }
                            // Cut short (the token budget ran out): the text as it is.
                            None => text = Some(held),
                        }
                    }
                    // A call goes in a delta of its own, then the finish (OpenAI's order).
                    let lp = if calls.is_some() {
                        if out
                            .send(Ok(meta.chunk_with(false, None, None, None, lp, calls)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        None
                    } else {
                        lp
                    };
                    if out
                        .send(Ok(meta.chunk_with(false, text, finish, None, lp, None)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if include_usage {
                        let usage = Usage::new(prompt_tokens, completion_tokens);
                        if out
                            .send(Ok(meta.chunk(false, None, None, Some(usage), None)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    break;
                }
            };
            if sent.is_err() {
                return;
            }
        }
        let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(body))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
