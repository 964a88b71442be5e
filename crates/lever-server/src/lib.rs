//! lever-server: `lever serve`, an OpenAI-compatible HTTP API over lever's models.
//!
//! Routes: `POST /v1/chat/completions` and `/v1/completions` (streaming over server-sent
//! events, or not), `POST /v1/embeddings`, `GET /v1/models`, `GET /health`. Request and
//! response shapes follow OpenAI's API reference (`usage`, `finish_reason`, `stop`,
//! `max_tokens`, `temperature`, `top_p`, `seed`, `stream_options.include_usage`); errors use
//! OpenAI's `{"error": {"message", "type", "param", "code"}}` with the matching status.
//! Generation goes through the [`engine`], which batches every running request into one step.
//!
//! Safety: a request can only name the models the server was started with (never a path);
//! bodies and `max_tokens` are bounded; with an API key every route but `/health` needs
//! `Authorization: Bearer KEY`.

// Request checks return the ready error response; they run once per request, so its size
// (clippy: result_large_err) costs nothing worth boxing for.
#![allow(clippy::result_large_err)]

pub mod engine;

/// The OpenAI client (for `--backend`) lives in lever-generate.
pub use lever_generate::remote as client;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lever_generate::{FinishReason, SamplingParams};
use lever_model::chat::Message;
use lever_model::{Encoder, Model};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::engine::{Engine, Event, Job, Refused};

/// Served models: index 0 is the base; adapters are `base:name`.
pub struct Served {
    pub variants: Vec<(String, Arc<Model>)>,
    pub embedder: Option<(String, Arc<Encoder>)>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// The most a request may ask for.
    pub max_tokens: usize,
    /// What a request that does not say gets.
    pub default_max_tokens: usize,
    pub max_batch: usize,
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            api_key: None,
            max_body_bytes: 1 << 20,
            max_tokens: 4096,
            default_max_tokens: 512,
            max_batch: 16,
            queue: 64,
        }
    }
}

struct AppState {
    engine: Engine,
    variants: Vec<(String, Arc<Model>)>,
    embedder: Option<(String, Arc<Encoder>)>,
    limits: Limits,
    next_id: AtomicU64,
}

/// Serve on `listener` until `shutdown` resolves; then stop taking connections, let the
/// requests in flight finish (streams end cleanly), and return.
pub async fn serve(
    listener: tokio::net::TcpListener,
    served: Served,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = Engine::start(
        served.variants.iter().map(|(_, m)| m.clone()).collect(),
        limits.max_batch,
        limits.queue,
    );
    let state = Arc::new(AppState {
        engine,
        variants: served.variants,
        embedder: served.embedder,
        limits: limits.clone(),
        next_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// An OpenAI-shaped error response.
fn error(
    status: StatusCode,
    kind: &str,
    message: impl Into<String>,
    param: Option<&str>,
) -> Response {
    let code = match status {
        StatusCode::NOT_FOUND => Some("model_not_found"),
        StatusCode::UNAUTHORIZED => Some("invalid_api_key"),
        StatusCode::TOO_MANY_REQUESTS => Some("rate_limit_exceeded"),
        StatusCode::PAYLOAD_TOO_LARGE => Some("request_too_large"),
        _ => None,
    };
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}});
    (status, axum::Json(body)).into_response()
}

fn bad_request(message: impl Into<String>, param: Option<&str>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        param,
    )
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.limits.api_key
        && req.uri().path() != "/health"
    {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "a valid API key is required: Authorization: Bearer KEY",
                None,
            );
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route {} {}", req.method(), req.uri().path()),
        None,
    )
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let s = st.engine.stats();
    axum::Json(json!({
        "status": "ok",
        "running": s.running.load(Ordering::Relaxed),
        "waiting": s.waiting.load(Ordering::Relaxed),
        "max_batch_seen": s.max_batch_seen.load(Ordering::Relaxed),
        "prompt_tokens_reused": s.prompt_tokens_reused.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    let mut data: Vec<Value> = st
        .variants
        .iter()
        .map(|(id, _)| json!({"id": id, "object": "model", "created": 0, "owned_by": "lever"}))
        .collect();
    if let Some((id, _)) = &st.embedder {
        data.push(json!({"id": id, "object": "model", "created": 0, "owned_by": "lever"}));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Parse a JSON body, or the error response for it.
fn parse<T: for<'de> Deserialize<'de>>(body: Result<Bytes, BytesRejection>) -> Result<T, Response> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "the request body is larger than the server's limit",
                None,
            )
        } else {
            bad_request(r.body_text(), None)
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("invalid JSON body: {e}"), None))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What chat and completion requests share.
#[derive(Debug, Deserialize)]
struct GenParams {
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    n: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    params: GenParams,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany,
    #[serde(flatten)]
    params: GenParams,
}

struct Checked {
    variant: usize,
    model_id: String,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

impl AppState {
    fn variant(&self, model: Option<&str>) -> Result<usize, Response> {
        let Some(name) = model else { return Ok(0) };
        self.variants
            .iter()
            .position(|(id, _)| id == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.variants.iter().map(|(id, _)| id.as_str()).collect();
                error(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "the model `{name}` does not exist (served: {})",
                        known.join(", ")
                    ),
                    Some("model"),
                )
            })
    }

    fn check(&self, p: GenParams) -> Result<Checked, Response> {
        let variant = self.variant(p.model.as_deref())?;
        if let Some(n) = p.n
            && n != 1
        {
            return Err(bad_request("only n = 1 is supported", Some("n")));
        }
        let max_tokens = match p.max_completion_tokens.or(p.max_tokens) {
            None => self.limits.default_max_tokens,
            Some(m) if m < 1 => {
                return Err(bad_request(
                    "max_tokens must be at least 1",
                    Some("max_tokens"),
                ));
            }
            Some(m) if m as u64 > self.limits.max_tokens as u64 => {
                return Err(bad_request(
                    format!(
                        "max_tokens {m} is more than this server allows ({})",
                        self.limits.max_tokens
                    ),
                    Some("max_tokens"),
                ));
            }
            Some(m) => m as usize,
        };
        let temperature = p.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(bad_request(
                "temperature must be within 0..2",
                Some("temperature"),
            ));
        }
        let top_p = p.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad_request("top_p must be within (0, 1]", Some("top_p")));
        }
        let stop = p.stop.map(OneOrMany::into_vec).unwrap_or_default();
        if stop.len() > 4 {
            return Err(bad_request("at most 4 stop sequences", Some("stop")));
        }
        let seed = p.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(Checked {
            variant,
            model_id: self.variants[variant].0.clone(),
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                seed,
                ..SamplingParams::greedy()
            },
            stop,
            stream: p.stream,
            include_usage: p.stream_options.is_some_and(|o| o.include_usage),
        })
    }

    fn id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:016x}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Tokenize and check the prompt against the context.
    fn prompt_ids(&self, variant: usize, text: &str) -> Result<Vec<u32>, Response> {
        let model = &self.variants[variant].1;
        let ids = model
            .tokenizer
            .encode(text, true)
            .map_err(|e| bad_request(e.to_string(), None))?;
        if ids.is_empty() {
            return Err(bad_request("the prompt is empty", Some("prompt")));
        }
        let ctx = model.decoder.config().max_seq_len;
        if ids.len() >= ctx {
            return Err(bad_request(
                format!(
                    "the prompt is {} tokens; this model's context is {ctx} tokens",
                    ids.len()
                ),
                Some("messages"),
            ));
        }
        Ok(ids)
    }
}

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eog | FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Context => "length",
        FinishReason::Cancelled => "stop",
    }
}

async fn chat(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: ChatRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let c = match st.check(req.params) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return bad_request(
                format!("messages[{i}].role: unknown role {:?}", m.role),
                Some("messages"),
            );
        }
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return bad_request(
                            format!(
                                "messages[{i}].content: only text parts are supported (got {:?})",
                                p.kind
                            ),
                            Some("messages"),
                        );
                    }
                    text.push_str(p.text.as_deref().unwrap_or_default());
                }
                text
            }
        };
        messages.push(Message::new(&role, content));
    }
    if messages.is_empty() {
        return bad_request("messages must not be empty", Some("messages"));
    }
    let model = &st.variants[c.variant].1;
    let Some(template) = &model.chat_template else {
        return bad_request(
            "this model has no chat template: use /v1/completions",
            Some("model"),
        );
    };
    let text = match template.render(&messages, true) {
        Ok(t) => t,
        Err(e) => return bad_request(e.to_string(), Some("messages")),
    };
    let ids = match st.prompt_ids(c.variant, &text) {
        Ok(ids) => ids,
        Err(e) => return e,
    };
    generate(st, c, ids, Kind::Chat).await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: CompletionRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let prompts = req.prompt.into_vec();
    if prompts.len() != 1 {
        return bad_request("one prompt per request is supported", Some("prompt"));
    }
    let c = match st.check(req.params) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let ids = match st.prompt_ids(c.variant, &prompts[0]) {
        Ok(ids) => ids,
        Err(e) => return e,
    };
    generate(st, c, ids, Kind::Completion).await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn generate(st: Arc<AppState>, c: Checked, ids: Vec<u32>, kind: Kind) -> Response {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        variant: c.variant,
        prompt: ids,
        max_tokens: c.max_tokens,
        sampling: c.sampling.clone(),
        stop: c.stop.clone(),
        events: tx,
    };
    match st.engine.submit(job) {
        Ok(()) => {}
        Err(Refused::Busy) => {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "the server is at capacity ({} running, {} waiting); retry later",
                    st.limits.max_batch, st.limits.queue
                ),
                None,
            );
        }
        Err(Refused::Stopped) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
                None,
            );
        }
    }
    let (id, created, model) = (
        st.id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created(),
        c.model_id.clone(),
    );
    if !c.stream {
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Failed(m) => {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m, None);
                }
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
                    let choice = if kind == Kind::Chat {
                        json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish_reason(finish)})
                    } else {
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason(finish)})
                    };
                    let object = if kind == Kind::Chat {
                        "chat.completion"
                    } else {
                        "text_completion"
                    };
                    return axum::Json(json!({
                        "id": id, "object": object, "created": created, "model": model,
                        "choices": [choice], "usage": usage,
                    }))
                    .into_response();
                }
            }
        }
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the engine stopped",
            None,
        );
    }
    // Streaming: a task turns engine events into SSE chunks. When the client goes away the
    // SSE body is dropped, the task's send fails, it drops `rx`, and the engine drops the
    // sequence at its next step.
    let (out, body) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let include_usage = c.include_usage;
    tokio::spawn(async move {
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |choice: Value, usage: Option<Value>| {
            let mut v = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
            if let Some(u) = usage {
                v["choices"] = json!([]);
                v["usage"] = u;
            }
            Ok(SseEvent::default().data(v.to_string()))
        };
        let text_choice = |t: &str| {
            if kind == Kind::Chat {
                json!({"index": 0, "delta": {"content": t}, "logprobs": null, "finish_reason": null})
            } else {
                json!({"index": 0, "text": t, "logprobs": null, "finish_reason": null})
            }
        };
        if kind == Kind::Chat
            && out
                .send(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}), None))
                .await
                .is_err()
        {
            return;
        }
        while let Some(ev) = rx.recv().await {
            let sent = match ev {
                Event::Text(t) => out.send(chunk(text_choice(&t), None)).await,
                Event::Failed(m) => {
                    let err = json!({"error": {"message": m, "type": "server_error", "param": null, "code": null}});
                    let _ = out
                        .send(Ok(SseEvent::default().data(err.to_string())))
                        .await;
                    break;
                }
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let last = if kind == Kind::Chat {
                        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(finish)})
                    } else {
                        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason(finish)})
                    };
                    if out.send(chunk(last, None)).await.is_err() {
                        return;
                    }
                    if include_usage {
                        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
                        if out.send(chunk(Value::Null, Some(usage))).await.is_err() {
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

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    model: Option<String>,
    input: Value,
    encoding_format: Option<String>,
}

async fn embeddings(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: EmbeddingRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Some((id, enc)) = st.embedder.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this server has no embedder (start it with --embedder)",
            Some("model"),
        );
    };
    if let Some(m) = &req.model
        && m != &id
    {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{m}` does not exist (embedder served: {id})"),
            Some("model"),
        );
    }
    // The openai Python client asks for base64 (little-endian f32 bytes) by default.
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return bad_request(
                format!("encoding_format {other:?}: expected \"float\" or \"base64\""),
                Some("encoding_format"),
            );
        }
    };
    let texts: Vec<String> = match req.input {
        Value::String(s) => vec![s],
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_string) => a
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => {
            return bad_request(
                "input must be a string or a non-empty list of strings",
                Some("input"),
            );
        }
    };
    if texts.len() > 2048 {
        return bad_request("at most 2048 inputs per request", Some("input"));
    }
    let out = tokio::task::spawn_blocking(move || -> Result<(Vec<Vec<f32>>, usize), String> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens: usize = enc
            .tokenize(&refs)
            .map_err(|e| e.to_string())?
            .iter()
            .map(|t| t.ids.len())
            .sum();
        let e = enc.embed(&refs).map_err(|e| e.to_string())?;
        Ok((e.vectors, tokens))
    })
    .await;
    match out {
        Ok(Ok((vectors, tokens))) => {
            let data: Vec<Value> = vectors
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let embedding = if base64 {
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        json!(base64_encode(&bytes))
                    } else {
                        json!(v)
                    };
                    json!({"object": "embedding", "index": i, "embedding": embedding})
                })
                .collect();
            axum::Json(json!({
                "object": "list", "data": data, "model": id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }))
            .into_response()
        }
        Ok(Err(m)) => error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m, None),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
            None,
        ),
    }
}

/// Standard base64 (RFC 4648, with padding).
fn base64_encode(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64_encode(raw.as_bytes()), enc);
        }
    }
}
