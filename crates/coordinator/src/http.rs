//! The coordinator's HTTP server: `/health`, `/ready`, `/metrics` and, when enabled, an
//! embeddings API following text-embeddings-inference (`/embed`, `/similarity`) and
//! OpenAI (`/v1/embeddings`) conventions, with the same limits as the gRPC service.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fedmicse_runtime::Pooling;
use fedmicse_runtime::sts::cosine;
use serde::Deserialize;
use serde_json::json;

use crate::Shared;
use crate::inference::{InferError, infer};

pub fn router(shared: Arc<Shared>) -> Router {
    let c = &shared.config.http;
    let mut r = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics));
    if c.embeddings_api {
        r = r
            .route("/embed", post(embed))
            .route("/similarity", post(similarity))
            .route("/v1/embeddings", post(openai));
    }
    r.layer(DefaultBodyLimit::max(c.max_body_bytes))
        .with_state(shared)
}

async fn ready(State(s): State<Arc<Shared>>) -> Response {
    match s.serving.load().as_ref() {
        Some((round, _)) => (
            StatusCode::OK,
            format!("ready: global model of round {round}\n"),
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no model loaded yet\n").into_response(),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let body = s.metrics.render(&s);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// One string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Inputs {
    One(String),
    Many(Vec<String>),
}

impl Inputs {
    fn into_vec(self) -> Vec<String> {
        match self {
            Inputs::One(s) => vec![s],
            Inputs::Many(v) => v,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedBody {
    inputs: Inputs,
    #[serde(default = "default_true")]
    normalize: bool,
    /// Accepted for compatibility; over-long inputs are always truncated.
    #[serde(default)]
    #[allow(dead_code)]
    truncate: Option<bool>,
    /// "cls" (default, the miCSE embedding) or "mean".
    #[serde(default)]
    pooling: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimilarityInputs {
    source_sentence: String,
    sentences: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimilarityBody {
    inputs: SimilarityInputs,
    #[serde(default)]
    pooling: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiBody {
    input: Inputs,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// A text-embeddings-inference style error.
fn tei_error(code: StatusCode, kind: &str, message: String) -> Response {
    (
        code,
        axum::Json(json!({"error": message, "error_type": kind})),
    )
        .into_response()
}

fn tei_infer_error(e: InferError) -> Response {
    let code = match e {
        InferError::TooMany(_) => StatusCode::PAYLOAD_TOO_LARGE,
        InferError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        InferError::Disabled => StatusCode::NOT_IMPLEMENTED,
        InferError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        InferError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tei_error(code, "Validation", e.message())
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("malformed JSON body: {e}"))
}

fn parse_pooling(p: Option<String>) -> Result<Pooling, String> {
    match p.as_deref() {
        None | Some("cls") => Ok(Pooling::Cls),
        Some("mean") => Ok(Pooling::Mean),
        Some(other) => Err(format!("pooling {other:?}: expected \"cls\" or \"mean\"")),
    }
}

async fn embed(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let b: EmbedBody = match parse(&body) {
        Ok(b) => b,
        Err(m) => return tei_error(StatusCode::BAD_REQUEST, "Validation", m),
    };
    let pooling = match parse_pooling(b.pooling) {
        Ok(p) => p,
        Err(m) => return tei_error(StatusCode::BAD_REQUEST, "Validation", m),
    };
    match infer(&s, "http_embed", b.inputs.into_vec(), pooling, b.normalize).await {
        Ok(out) => axum::Json(out.vectors).into_response(),
        Err(e) => tei_infer_error(e),
    }
}

async fn similarity(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let b: SimilarityBody = match parse(&body) {
        Ok(b) => b,
        Err(m) => return tei_error(StatusCode::BAD_REQUEST, "Validation", m),
    };
    let pooling = match parse_pooling(b.pooling) {
        Ok(p) => p,
        Err(m) => return tei_error(StatusCode::BAD_REQUEST, "Validation", m),
    };
    let mut all = vec![b.inputs.source_sentence];
    all.extend(b.inputs.sentences);
    match infer(&s, "http_similarity", all, pooling, false).await {
        Ok(out) => {
            let scores: Vec<f32> = out.vectors[1..]
                .iter()
                .map(|v| cosine(&out.vectors[0], v))
                .collect();
            axum::Json(scores).into_response()
        }
        Err(e) => tei_infer_error(e),
    }
}

fn openai_error(code: StatusCode, message: String) -> Response {
    (
        code,
        axum::Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})),
    )
        .into_response()
}

async fn openai(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let b: OpenAiBody = match parse(&body) {
        Ok(b) => b,
        Err(m) => return openai_error(StatusCode::BAD_REQUEST, m),
    };
    if let Some(f) = &b.encoding_format
        && f != "float"
    {
        return openai_error(
            StatusCode::BAD_REQUEST,
            format!("encoding_format {f:?}: only \"float\" is supported"),
        );
    }
    if b.dimensions.is_some() {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "dimensions: this model's vectors cannot be shortened".into(),
        );
    }
    let model = b.model.unwrap_or_else(|| "fedmicse".into());
    match infer(&s, "http_openai", b.input.into_vec(), Pooling::Cls, true).await {
        Ok(out) => {
            let data: Vec<serde_json::Value> = out
                .vectors
                .into_iter()
                .enumerate()
                .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
                .collect();
            axum::Json(json!({
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
            }))
            .into_response()
        }
        Err(e) => {
            let code = match e {
                InferError::TooMany(_) => StatusCode::PAYLOAD_TOO_LARGE,
                InferError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                InferError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
                InferError::Disabled => StatusCode::NOT_IMPLEMENTED,
                InferError::Invalid(_) => StatusCode::BAD_REQUEST,
            };
            openai_error(code, e.message())
        }
    }
}
