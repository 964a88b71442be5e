//! `POST /v1/embeddings`: sentence vectors from the served encoder, as floats or base64.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::Value;

use super::AppState;
use crate::error::ApiError;
use crate::openai::{
    EMBEDDING_FIELDS, Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage, Vector, known,
    parse,
};

/// The most texts one request may embed (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

pub(super) async fn embeddings(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    match embed(st, &body).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn embed(st: Arc<AppState>, body: &[u8]) -> Result<EmbeddingList, ApiError> {
    let req: EmbeddingRequest = parse(body, known(EMBEDDING_FIELDS, false))?;
    let Some((id, enc)) = st.embedder.clone() else {
        return Err(ApiError::model_not_found(
            "this server has no embedder (start it with --embedder)",
        ));
    };
    if let Some(m) = &req.model
        && m != &id
    {
        return Err(ApiError::model_not_found(format!(
            "the model `{m}` does not exist (embedder served: {id})"
        )));
    }
    if let Some(d) = req.dimensions
        && d != enc.dim() as i64
    {
        return Err(ApiError::unsupported(
            "dimensions",
            &format!("{id} gives {} dimensions only", enc.dim()),
        ));
    }
    // The openai Python client asks for base64 (little-endian f32 bytes) by default.
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_param(
                "encoding_format",
                format!("encoding_format {other:?}: expected \"float\" or \"base64\""),
            ));
        }
    };
    let texts: Vec<String> = match req.input {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => a
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => {
            return Err(ApiError::bad_param(
                "input",
                "input must be a string or a non-empty list of strings",
            ));
        }
    };
    if texts.len() > MAX_INPUTS {
        return Err(ApiError::bad_param(
            "input",
            format!("at most {MAX_INPUTS} inputs per request"),
        ));
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
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::internal)?;
    let (vectors, tokens) = out;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| Embedding {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Vector::Float(v)
            },
        })
        .collect();
    Ok(EmbeddingList {
        object: "list",
        data,
        model: id,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
}
