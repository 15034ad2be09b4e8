//! Inference from the newest global model, for the gRPC service and the HTTP API alike. A
//! request holds its own reference to the model it started with, so a model swap after a
//! round never disturbs it.

use std::sync::Arc;
use std::time::Instant;

use fedmicse_runtime::sts::cosine;
use fedmicse_runtime::{EmbedOptions, Pooling};
use fedmicse_wire::pb::{
    self, EmbedRequest, EmbedResponse, SimilarityRequest, SimilarityResponse, Vector,
    inference_server::Inference,
};
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::metrics::RequestLabel;

/// Why an inference request failed; each maps to a gRPC status and an HTTP code.
#[derive(Debug)]
pub enum InferError {
    Disabled,
    Invalid(String),
    TooMany(String),
    Unavailable(String),
    Internal(String),
}

impl InferError {
    pub fn label(&self) -> &'static str {
        match self {
            InferError::Disabled => "disabled",
            InferError::Invalid(_) => "invalid",
            InferError::TooMany(_) => "too_many",
            InferError::Unavailable(_) => "unavailable",
            InferError::Internal(_) => "internal",
        }
    }

    pub fn message(&self) -> String {
        match self {
            InferError::Disabled => "inference is disabled on this coordinator".into(),
            InferError::Invalid(m)
            | InferError::TooMany(m)
            | InferError::Unavailable(m)
            | InferError::Internal(m) => m.clone(),
        }
    }
}

impl From<InferError> for Status {
    fn from(e: InferError) -> Self {
        let m = e.message();
        match e {
            InferError::Disabled => Status::unimplemented(m),
            InferError::Invalid(_) | InferError::TooMany(_) => Status::invalid_argument(m),
            InferError::Unavailable(_) => Status::unavailable(m),
            InferError::Internal(_) => Status::internal(m),
        }
    }
}

/// What inference returns: the round of the model used, vectors, and tokens counted.
pub struct Inferred {
    pub round: u64,
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
}

/// Checks limits, embeds on a blocking thread, records metrics.
pub async fn infer(
    shared: &Arc<Shared>,
    endpoint: &str,
    sentences: Vec<String>,
    pooling: Pooling,
    normalize: bool,
) -> Result<Inferred, InferError> {
    let started = Instant::now();
    let result = infer_inner(shared, sentences, pooling, normalize).await;
    let status = match &result {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    shared
        .metrics
        .requests
        .get_or_create(&RequestLabel {
            endpoint: endpoint.into(),
            status: status.into(),
        })
        .inc();
    shared
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn infer_inner(
    shared: &Arc<Shared>,
    sentences: Vec<String>,
    pooling: Pooling,
    normalize: bool,
) -> Result<Inferred, InferError> {
    let c = &shared.config.inference;
    if !c.enabled {
        return Err(InferError::Disabled);
    }
    if sentences.is_empty() {
        return Err(InferError::Invalid("no sentences".into()));
    }
    if sentences.len() > c.max_sentences {
        return Err(InferError::TooMany(format!(
            "{} sentences in one request; the limit is {}",
            sentences.len(),
            c.max_sentences
        )));
    }
    if let Some((i, s)) = sentences
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > c.max_sentence_bytes)
    {
        return Err(InferError::Invalid(format!(
            "sentence {i} has {} bytes; the limit is {}",
            s.len(),
            c.max_sentence_bytes
        )));
    }
    let serving = shared.serving.load_full();
    let Some((round, encoder)) = serving.as_ref().clone() else {
        return Err(InferError::Unavailable("no model loaded yet".into()));
    };
    if pooling == Pooling::Pooler && !encoder.has_pooler() {
        return Err(InferError::Invalid(
            "this model has no pooler weights".into(),
        ));
    }
    let _permit = shared
        .inference_permits
        .acquire()
        .await
        .map_err(|_| InferError::Unavailable("shutting down".into()))?;
    let opts = EmbedOptions {
        pooling,
        normalize,
        max_len: Some(c.max_len),
        batch_size: 64,
    };
    let max_len = c.max_len;
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
        let tokens = refs.iter().map(|s| encoder.count_tokens(s, max_len)).sum();
        encoder.embed(&refs, &opts).map(|vectors| Inferred {
            round,
            vectors,
            tokens,
        })
    })
    .await
    .map_err(|e| InferError::Internal(e.to_string()))?
    .map_err(|e| InferError::Invalid(e.to_string()))
}

pub struct InferenceService {
    shared: Arc<Shared>,
}

impl InferenceService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        InferenceService { shared }
    }
}

fn pooling(p: i32) -> Result<Pooling, Status> {
    pb::Pooling::try_from(p)
        .map(|p| match p {
            pb::Pooling::Cls => Pooling::Cls,
            pb::Pooling::Mean => Pooling::Mean,
            pb::Pooling::Pooler => Pooling::Pooler,
        })
        .map_err(|_| Status::invalid_argument(format!("unknown pooling {p}")))
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn embed(&self, req: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        crate::service::identify(&self.shared, &req, crate::service::Role::Operator)?;
        let r = req.into_inner();
        let out = infer(
            &self.shared,
            "grpc_embed",
            r.sentences,
            pooling(r.pooling)?,
            r.normalize,
        )
        .await?;
        Ok(Response::new(EmbedResponse {
            dimension: out.vectors.first().map_or(0, |v| v.len() as u32),
            embeddings: out
                .vectors
                .into_iter()
                .map(|values| Vector { values })
                .collect(),
            model_round: out.round,
        }))
    }

    async fn similarity(
        &self,
        req: Request<SimilarityRequest>,
    ) -> Result<Response<SimilarityResponse>, Status> {
        crate::service::identify(&self.shared, &req, crate::service::Role::Operator)?;
        let r = req.into_inner();
        let mut all = vec![r.source];
        all.extend(r.sentences);
        let out = infer(
            &self.shared,
            "grpc_similarity",
            all,
            pooling(r.pooling)?,
            false,
        )
        .await?;
        let scores = out.vectors[1..]
            .iter()
            .map(|v| cosine(&out.vectors[0], v))
            .collect();
        Ok(Response::new(SimilarityResponse {
            scores,
            model_round: out.round,
        }))
    }
}
