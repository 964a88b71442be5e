//! lever-server: `lever serve`, an OpenAI-compatible HTTP API over lever's models.
//!
//! Routes: `POST /v1/chat/completions` and `/v1/completions` (streaming over server-sent
//! events, or not), `POST /v1/embeddings`, `GET /v1/models`, `GET /health`. Request and
//! response shapes follow OpenAI's API reference (`usage`, `finish_reason`, `stop`,
//! `max_tokens`, `temperature`, `top_p`, `seed`, `stream_options.include_usage`); errors use
//! OpenAI's `{"error": {"message", "type", "param", "code"}}` with the matching status, on
//! every route (404 for an unknown path, 405 for a wrong method). A parameter OpenAI defines
//! but lever does not implement (`logit_bias`, `functions`, penalties, `n` > 1,
//! ...) is a 400 naming it, and an unknown one is a 400 as OpenAI gives; the prompt and
//! `max_tokens` must fit the model's context together.
//!
//! Parts, in the order a request meets them:
//! - `http`: connections, HTTP/1.1 over hyper, the header read timeout, the shutdown deadline;
//! - `routes`: the API key, the body (size limit, early 413, body timeout), the handlers;
//! - [`openai`]: the request and response types and the checks of their parameters;
//! - [`error`]: [`ApiError`], the error answer;
//! - [`engine`]: generation — one thread that batches every running request into one
//!   decoding step and computes new prompts in chunks between those steps.
//!
//! Safety: a request can only name the models the server was started with (never a path);
//! bodies, `max_tokens`, the time to send a request and the time to stop are bounded; with an
//! API key every route but `/health` needs `Authorization: Bearer KEY`.

pub mod engine;
pub mod error;
mod http;
pub mod openai;
mod routes;

pub use error::ApiError;
pub use http::Stopped;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lever_model::{Encoder, Model};

use crate::engine::{Engine, EngineConfig};
use crate::routes::AppState;

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
    /// What a request that does not say gets (less when the context has less room).
    pub default_max_tokens: usize,
    pub max_batch: usize,
    pub queue: usize,
    /// Time for a request line and headers to arrive (and for an idle keep-alive connection
    /// to send its next request).
    pub header_timeout: Duration,
    /// Time for a request body to arrive once its headers have.
    pub body_timeout: Duration,
    /// After the shutdown signal, time for the requests in flight to finish; then the
    /// connections still open are closed.
    pub shutdown_timeout: Duration,
    /// Prompt tokens computed at a time, between decoding steps of the running requests.
    pub prefill_chunk: usize,
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
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            prefill_chunk: engine::DEFAULT_PREFILL_CHUNK,
        }
    }
}

/// Serve on `listener` until `shutdown` resolves; then stop taking connections, let the
/// requests in flight finish (streams end cleanly) for up to `Limits::shutdown_timeout`,
/// close what is still open, and return.
pub async fn serve(
    listener: tokio::net::TcpListener,
    served: Served,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<Stopped> {
    let engine = Engine::start(
        served.variants.iter().map(|(_, m)| m.clone()).collect(),
        EngineConfig {
            max_batch: limits.max_batch,
            queue: limits.queue,
            prefill_chunk: limits.prefill_chunk,
        },
    );
    let state = Arc::new(AppState::new(
        engine,
        served.variants,
        served.embedder,
        limits.clone(),
    ));
    let app = routes::router(state);
    Ok(http::serve_connections(
        listener,
        app,
        limits.header_timeout,
        limits.shutdown_timeout,
        shutdown,
    )
    .await)
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
