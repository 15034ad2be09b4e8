//! The Inference gRPC service: embeddings and similarities from the newest global model.
//! A request holds its own reference to the model it started with, so a model swap after a
//! round never disturbs it.

use std::sync::Arc;

use fedmicse_encoder::{EmbedOptions, Pooling, cosine};
use fedmicse_wire::pb::{
    self, EmbedRequest, EmbedResponse, SimilarityRequest, SimilarityResponse, Vector,
    inference_server::Inference,
};
use tonic::{Request, Response, Status};

use crate::Shared;

pub struct InferenceService {
    shared: Arc<Shared>,
}

impl InferenceService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        InferenceService { shared }
    }

    fn check(&self, sentences: &[&str]) -> Result<(), Status> {
        let c = &self.shared.config.inference;
        if !c.enabled {
            return Err(Status::unimplemented(
                "inference is disabled on this coordinator",
            ));
        }
        if sentences.is_empty() {
            return Err(Status::invalid_argument("no sentences"));
        }
        if sentences.len() > c.max_sentences {
            return Err(Status::invalid_argument(format!(
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
            return Err(Status::invalid_argument(format!(
                "sentence {i} has {} bytes; the limit is {}",
                s.len(),
                c.max_sentence_bytes
            )));
        }
        Ok(())
    }

    /// Embeds on a blocking thread with the model current at the call.
    async fn embed(
        &self,
        sentences: Vec<String>,
        pooling: Pooling,
        normalize: bool,
    ) -> Result<(u64, Vec<Vec<f32>>), Status> {
        let serving = self.shared.serving.load_full();
        let Some((round, encoder)) = serving.as_ref().clone() else {
            return Err(Status::unavailable("no model loaded yet"));
        };
        let _permit = self
            .shared
            .inference_permits
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let opts = EmbedOptions {
            pooling,
            normalize,
            max_len: Some(self.shared.config.inference.max_len),
            batch_size: 64,
        };
        let vectors = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
            encoder.embed(&refs, &opts)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok((round, vectors))
    }
}

fn pooling(p: i32) -> Result<Pooling, Status> {
    pb::Pooling::try_from(p)
        .map(Pooling::from)
        .map_err(|_| Status::invalid_argument(format!("unknown pooling {p}")))
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn embed(&self, req: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        crate::service::identify(&self.shared, &req, crate::service::Role::Operator)?;
        let r = req.into_inner();
        self.check(&r.sentences.iter().map(String::as_str).collect::<Vec<_>>())?;
        let (round, vectors) =
            InferenceService::embed(self, r.sentences, pooling(r.pooling)?, r.normalize).await?;
        Ok(Response::new(EmbedResponse {
            dimension: vectors.first().map_or(0, |v| v.len() as u32),
            embeddings: vectors
                .into_iter()
                .map(|values| Vector { values })
                .collect(),
            model_round: round,
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
        self.check(&all.iter().map(String::as_str).collect::<Vec<_>>())?;
        let (round, vectors) =
            InferenceService::embed(self, all, pooling(r.pooling)?, false).await?;
        let scores = vectors[1..]
            .iter()
            .map(|v| cosine(&vectors[0], v))
            .collect();
        Ok(Response::new(SimilarityResponse {
            scores,
            model_round: round,
        }))
    }
}
