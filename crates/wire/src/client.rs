//! A client of the coordinator: what agents, `fedmicse status` and tests use.

use std::sync::Arc;
use std::time::Duration;

use fedmicse_encoder::TensorMap;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::pb::ElementType;
use crate::pb::{
    self, JoinRequest, JoinResponse, LocalMetrics, PullRequest, StatusRequest, StatusResponse,
    SubmitResponse, UpdateChunk, UpdateHeader, federation_client::FederationClient,
    inference_client::InferenceClient, model_chunk, update_chunk,
};
use crate::tensors::{Assembler, Limits, chunk_tensors_as, digest_as, total_bytes_as};
use crate::tls::TlsFiles;

/// Adds the client-id header on plaintext connections (ignored by a TLS coordinator).
#[derive(Clone)]
pub struct ClientId(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for ClientId {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("x-fedmicse-client-id", v.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, ClientId>;

/// A model received from the coordinator.
pub struct PulledModel {
    pub round: u64,
    pub tensors: TensorMap,
    pub files: Vec<(String, Vec<u8>)>,
    pub digest: Vec<u8>,
    pub bytes: u64,
}

#[derive(Clone)]
pub struct Connection {
    federation: FederationClient<Svc>,
    inference: InferenceClient<Svc>,
}

/// How to reach a coordinator.
#[derive(Debug, Clone)]
pub struct Target {
    /// `https://HOST:PORT`, or `http://HOST:PORT` for a plaintext coordinator.
    pub url: String,
    pub tls: Option<TlsFiles>,
    /// Expected name in the coordinator's certificate.
    pub domain: String,
    /// Sent as a header over plaintext.
    pub plaintext_client_id: Option<String>,
}

impl Connection {
    /// A lazily connecting channel: calls fail (and reconnect) instead of `connect`.
    pub fn new(target: &Target) -> Result<Self, String> {
        let mut endpoint = Endpoint::from_shared(target.url.clone())
            .map_err(|e| format!("coordinator URL {:?}: {e}", target.url))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(Duration::from_secs(60)));
        if let Some(tls) = &target.tls {
            endpoint = endpoint
                .tls_config(
                    tls.client_config(&target.domain)
                        .map_err(|e| e.to_string())?,
                )
                .map_err(|e| format!("TLS: {e}"))?;
        }
        let id = match &target.plaintext_client_id {
            Some(s) => Some(
                s.parse()
                    .map_err(|_| format!("client id {s:?} is not a valid header value"))?,
            ),
            None => None,
        };
        let channel = endpoint.connect_lazy();
        let max = crate::MAX_MESSAGE_BYTES;
        Ok(Connection {
            federation: FederationClient::with_interceptor(channel.clone(), ClientId(id.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            inference: InferenceClient::with_interceptor(channel, ClientId(id))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(max),
        })
    }

    pub async fn join(&mut self, shard_size: u64) -> Result<JoinResponse, Status> {
        let req = JoinRequest {
            shard_size,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        Ok(self.federation.join(req).await?.into_inner())
    }

    pub async fn status(&mut self) -> Result<StatusResponse, Status> {
        Ok(self.federation.status(StatusRequest {}).await?.into_inner())
    }

    /// Downloads and checks the global model of `round`.
    pub async fn pull(&mut self, round: u64) -> Result<PulledModel, Status> {
        let mut stream = self
            .federation
            .pull_model(PullRequest { round })
            .await?
            .into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::data_loss("empty model stream"))?;
        let Some(model_chunk::Part::Header(header)) = first.part else {
            return Err(Status::data_loss(
                "model stream did not start with a header",
            ));
        };
        let mut asm = Assembler::new(Limits {
            max_tensors: header.tensor_count as usize,
            max_total_bytes: header.total_bytes,
            dtype: None,
        });
        while let Some(msg) = stream.message().await? {
            match msg.part {
                Some(model_chunk::Part::Tensor(c)) => {
                    asm.push(c).map_err(|e| Status::data_loss(e.to_string()))?
                }
                _ => return Err(Status::data_loss("unexpected header in model stream")),
            }
        }
        let bytes = asm.bytes_received();
        let tensors = asm
            .finish(
                header.tensor_count as u64,
                header.total_bytes,
                &header.digest,
            )
            .map_err(|e| Status::data_loss(e.to_string()))?;
        Ok(PulledModel {
            round: header.round,
            tensors,
            files: header
                .files
                .into_iter()
                .map(|f| (f.name, f.content))
                .collect(),
            digest: header.digest,
            bytes,
        })
    }

    /// Streams an update (a delta for `round` weighing `num_samples`) in f32 chunks.
    pub async fn submit(
        &mut self,
        round: u64,
        num_samples: u64,
        metrics: LocalMetrics,
        delta: Arc<TensorMap>,
    ) -> Result<SubmitResponse, Status> {
        self.submit_as(round, num_samples, metrics, delta, ElementType::F32)
            .await
    }

    /// Streams an update with its values in `dtype` (f16/bf16 halve the bytes).
    pub async fn submit_as(
        &mut self,
        round: u64,
        num_samples: u64,
        metrics: LocalMetrics,
        delta: Arc<TensorMap>,
        dtype: ElementType,
    ) -> Result<SubmitResponse, Status> {
        let header = UpdateHeader {
            round,
            num_samples,
            tensor_count: delta.len() as u32,
            total_bytes: total_bytes_as(&delta, dtype),
            digest: digest_as(&delta, dtype),
            metrics: Some(metrics),
        };
        self.submit_raw(header, delta, dtype).await
    }

    /// Streams a header and the tensors as given (tests use it to send malformed updates).
    pub async fn submit_raw(
        &mut self,
        header: UpdateHeader,
        delta: Arc<TensorMap>,
        dtype: ElementType,
    ) -> Result<SubmitResponse, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel::<UpdateChunk>(4);
        tokio::spawn(async move {
            let head = UpdateChunk {
                part: Some(update_chunk::Part::Header(header)),
            };
            if tx.send(head).await.is_err() {
                return;
            }
            for chunk in chunk_tensors_as(&delta, dtype) {
                let msg = UpdateChunk {
                    part: Some(update_chunk::Part::Tensor(chunk)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(self.federation.submit_update(stream).await?.into_inner())
    }

    pub async fn embed(
        &mut self,
        sentences: Vec<String>,
        pooling: pb::Pooling,
        normalize: bool,
    ) -> Result<pb::EmbedResponse, Status> {
        let req = pb::EmbedRequest {
            sentences,
            pooling: pooling as i32,
            normalize,
        };
        Ok(self.inference.embed(req).await?.into_inner())
    }

    pub async fn similarity(
        &mut self,
        source: String,
        sentences: Vec<String>,
        pooling: pb::Pooling,
    ) -> Result<pb::SimilarityResponse, Status> {
        let req = pb::SimilarityRequest {
            source,
            sentences,
            pooling: pooling as i32,
        };
        Ok(self.inference.similarity(req).await?.into_inner())
    }
}
