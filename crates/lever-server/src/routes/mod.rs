//! The HTTP routes and what every request passes through first: the API key, then the body
//! read under the size limit and the body timeout (an early 413 from Content-Length, before
//! any of the body is read). Unknown paths are 404 and known paths under another method 405,
//! both in OpenAI's error shape.

mod embeddings;
mod generate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lever_generate::Grammars;
use lever_model::{Encoder, Model};
use serde::Serialize;

use crate::Limits;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::openai::{ModelCard, ModelList};

pub(crate) struct AppState {
    pub engine: Engine,
    pub variants: Vec<(String, Arc<Model>)>,
    pub embedder: Option<(String, Arc<Encoder>)>,
    pub limits: Limits,
    next_id: AtomicU64,
    /// Each variant's token trie for constrained decoding, built on its first constrained
    /// request (the variants of one base share a tokenizer, but the trie is cheap).
    grammars: Vec<OnceLock<Result<Grammars, String>>>,
}

impl AppState {
    pub fn new(
        engine: Engine,
        variants: Vec<(String, Arc<Model>)>,
        embedder: Option<(String, Arc<Encoder>)>,
        limits: Limits,
    ) -> Self {
        Self {
            grammars: variants.iter().map(|_| OnceLock::new()).collect(),
            engine,
            variants,
            embedder,
            limits,
            next_id: AtomicU64::new(1),
        }
    }

    /// Variant `v`'s token trie for constrained decoding.
    fn grammars(&self, v: usize) -> Result<&Grammars, ApiError> {
        let built = self.grammars[v].get_or_init(|| {
            let model = &self.variants[v].1;
            Grammars::new(&model.tokenizer, model.decoder.config().vocab_size)
                .map_err(|e| e.to_string())
        });
        built.as_ref().map_err(|e| ApiError::internal(e.clone()))
    }

    /// A response id: the prefix and a counter.
    fn id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:016x}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }
}

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The body is read (bounded) by `read_body`; the extractor's own limit is not needed.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// Every route but `/health` needs the API key, when the server has one.
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
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Read the whole body before the handler runs: refused at once (413, before reading) when
/// Content-Length says it is over the limit, cut off (413) when a chunked body grows past
/// it, and answered 408 when it has not all arrived within `Limits::body_timeout` — a
/// client that sends half a body holds a connection for that long, not forever.
async fn read_body(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit = st.limits.max_body_bytes;
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::too_large(limit).into_response();
    }
    let read = tokio::time::timeout(st.limits.body_timeout, axum::body::to_bytes(body, limit));
    let bytes = match read.await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let mut err = if too_large {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            };
            err.close = true;
            return err.into_response();
        }
        Err(_) => {
            return ApiError::body_timeout(st.limits.body_timeout.as_secs_f64()).into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn not_found(req: Request) -> Response {
    ApiError::no_route(req.method().as_str(), req.uri().path()).into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path();
    let allow = match path {
        "/health" | "/v1/models" => "GET,HEAD",
        _ => "POST",
    };
    let mut r = ApiError::method_not_allowed(req.method().as_str(), path).into_response();
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// `GET /health`: the engine's counters (no API key needed).
#[derive(Serialize)]
struct Health {
    status: &'static str,
    /// Sequences decoding (one token per batched step).
    running: usize,
    /// Sequences whose prompt is being computed, chunk by chunk.
    prefilling: usize,
    /// Requests queued for a place.
    waiting: usize,
    max_batch_seen: usize,
    prompt_tokens_reused: usize,
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let s = st.engine.stats();
    let n = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed);
    axum::Json(Health {
        status: "ok",
        running: n(&s.running),
        prefilling: n(&s.prefilling),
        waiting: n(&s.waiting),
        max_batch_seen: n(&s.max_batch_seen),
        prompt_tokens_reused: n(&s.prompt_tokens_reused),
    })
    .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    let card = |id: &str| ModelCard {
        id: id.to_string(),
        object: "model",
        created: 0,
        owned_by: "lever",
    };
    let data = st
        .variants
        .iter()
        .map(|(id, _)| card(id))
        .chain(st.embedder.iter().map(|(id, _)| card(id)))
        .collect();
    axum::Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

/// Seconds since the epoch, for `created`.
fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
