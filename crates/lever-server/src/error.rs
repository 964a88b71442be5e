//! The server's error: what a request gets back when it cannot be answered, in OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`, API reference "Error codes") with the
//! matching HTTP status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::openai::{ErrorBody, ErrorDetail};

/// An error answer: the status and the four fields of OpenAI's error object.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    pub message: String,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Close the connection after the answer (the request's body was not read).
    pub close: bool,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            close: false,
        }
    }

    /// 400: the request is malformed or asks for something lever does not do.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the parameter at fault.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).param(param)
    }

    /// 400 for a parameter lever knows but does not implement (rather than ignoring it).
    pub fn unsupported(param: &str, what: &str) -> Self {
        Self::bad_param(
            param,
            format!("`{param}` is not supported by lever serve ({what})"),
        )
        .code("unsupported_parameter")
    }

    /// 401: no or a wrong API key.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "a valid API key is required: Authorization: Bearer KEY",
        )
        .code("invalid_api_key")
    }

    /// 404 for a model the server does not serve.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
            .param("model")
            .code("model_not_found")
    }

    /// 404 for a path no route has.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route {method} {path}"),
        )
        .code("unknown_url")
    }

    /// 405 for a route that exists under another method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{path} does not take {method}"),
        )
        .code("method_not_allowed")
    }

    /// 408: the body did not arrive in time; the connection closes.
    pub fn body_timeout(secs: f64) -> Self {
        let mut e = Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body did not arrive within {secs} s"),
        )
        .code("request_timeout");
        e.close = true;
        e
    }

    /// 413: a body over the limit (from Content-Length, before reading it, or while reading).
    pub fn too_large(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
        .code("request_too_large");
        e.close = true;
        e
    }

    /// 429: running and waiting places are all taken.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            .code("rate_limit_exceeded")
    }

    /// 503: the server is stopping.
    pub fn stopping() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        )
    }

    /// 500: the model failed on this request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body, also sent as a server-sent event when a stream fails midway.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.close {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}
