//! A client of the coordinator: what agents, `fedmicse status` and tests use.

use std::sync::Arc;
use std::time::Duration;

use fedmicse_tensors::TensorMap;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::pb::{
    self, JoinRequest, JoinResponse, LocalMetrics, PullRequest, StatusRequest, StatusResponse,
    SubmitResponse, UpdateChunk, UpdateHeader, federation_client::FederationClient,
    inference_client::InferenceClient, model_chunk,
    secure_aggregation_client::SecureAggregationClient, update_chunk,
};
use crate::tensors::{Assembler, Limits, chunk_tensors_as, digest_as, total_bytes_as};
use crate::tls::TlsFiles;
use fedmicse_tensors::ElementType;

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

/// What an agent accepts in a pulled model, whatever the coordinator's header declares:
/// a compromised or buggy coordinator must not make an agent allocate without bound.
/// The defaults leave room for models far larger than a BERT-base (~110 M parameters,
/// 440 MB in f32, 200 tensors, a few small files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullLimits {
    /// Tensors in the model.
    pub max_tensors: usize,
    /// Payload bytes of all tensors together.
    pub max_total_bytes: u64,
    /// Bytes of each file sent in the header (config.json, tokenizer.json, ...).
    pub max_file_bytes: u64,
    /// Files sent in the header.
    pub max_files: usize,
}

impl Default for PullLimits {
    fn default() -> Self {
        PullLimits {
            max_tensors: 4096,
            max_total_bytes: 8 << 30,
            max_file_bytes: 64 << 20,
            max_files: 32,
        }
    }
}

/// Checks a model header against the agent's limits, before anything is allocated for
/// the tensors it announces.
pub fn check_model_header(header: &pb::ModelHeader, limits: &PullLimits) -> Result<(), String> {
    if header.tensor_count as u64 > limits.max_tensors as u64 {
        return Err(format!(
            "the model declares {} tensors; this agent accepts at most {}",
            header.tensor_count, limits.max_tensors
        ));
    }
    if header.total_bytes > limits.max_total_bytes {
        return Err(format!(
            "the model declares {} bytes; this agent accepts at most {}",
            header.total_bytes, limits.max_total_bytes
        ));
    }
    if header.files.len() > limits.max_files {
        return Err(format!(
            "the model comes with {} files; this agent accepts at most {}",
            header.files.len(),
            limits.max_files
        ));
    }
    if let Some(f) = header
        .files
        .iter()
        .find(|f| f.content.len() as u64 > limits.max_file_bytes)
    {
        return Err(format!(
            "model file {:?} has {} bytes; this agent accepts at most {} per file",
            f.name,
            f.content.len(),
            limits.max_file_bytes
        ));
    }
    Ok(())
}

/// Why a pull failed: the call itself, or a model this side refuses (beyond its limits,
/// or not what its own header declared).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Status),
    #[error("model refused: {0}")]
    Refused(String),
}

impl From<Status> for PullError {
    fn from(s: Status) -> Self {
        PullError::Status(s)
    }
}

impl From<PullError> for Status {
    fn from(e: PullError) -> Self {
        match e {
            PullError::Status(s) => s,
            PullError::Refused(why) => Status::data_loss(why),
        }
    }
}

#[derive(Clone)]
pub struct Connection {
    federation: FederationClient<Svc>,
    inference: InferenceClient<Svc>,
    secure: SecureAggregationClient<Svc>,
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

/// Why a connection could not even be set up (nothing was sent yet).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("coordinator URL {0:?}: {1}")]
    Url(String, String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("client id {0:?} is not a valid header value")]
    ClientId(String),
}

impl Connection {
    /// A lazily connecting channel: calls fail (and reconnect) instead of `connect`.
    pub fn new(target: &Target) -> Result<Self, ConnectError> {
        let mut endpoint = Endpoint::from_shared(target.url.clone())
            .map_err(|e| ConnectError::Url(target.url.clone(), e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(Duration::from_secs(60)));
        if let Some(tls) = &target.tls {
            endpoint = endpoint
                .tls_config(
                    tls.client_config(&target.domain)
                        .map_err(|e| ConnectError::Tls(e.to_string()))?,
                )
                .map_err(|e| ConnectError::Tls(e.to_string()))?;
        }
        let id = match &target.plaintext_client_id {
            Some(s) => Some(s.parse().map_err(|_| ConnectError::ClientId(s.clone()))?),
            None => None,
        };
        let channel = endpoint.connect_lazy();
        let max = crate::MAX_MESSAGE_BYTES;
        Ok(Connection {
            federation: FederationClient::with_interceptor(channel.clone(), ClientId(id.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            inference: InferenceClient::with_interceptor(channel.clone(), ClientId(id.clone()))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(max),
            secure: SecureAggregationClient::with_interceptor(channel, ClientId(id))
                .max_decoding_message_size(max)
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

    /// Downloads and checks the global model of `round`, within the default [`PullLimits`].
    pub async fn pull(&mut self, round: u64) -> Result<PulledModel, Status> {
        Ok(self.pull_with(round, &PullLimits::default()).await?)
    }

    /// Downloads and checks the global model of `round`: a header beyond `limits` is
    /// refused before anything is allocated, and the tensors may exceed neither the
    /// header's counts nor the limits.
    pub async fn pull_with(
        &mut self,
        round: u64,
        limits: &PullLimits,
    ) -> Result<PulledModel, PullError> {
        let refused = |why: String| PullError::Refused(why);
        let mut stream = self
            .federation
            .pull_model(PullRequest { round })
            .await?
            .into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| refused("empty model stream".into()))?;
        let Some(model_chunk::Part::Header(header)) = first.part else {
            return Err(refused("model stream did not start with a header".into()));
        };
        check_model_header(&header, limits).map_err(refused)?;
        let mut asm = Assembler::new(Limits {
            max_tensors: (header.tensor_count as usize).min(limits.max_tensors),
            max_total_bytes: header.total_bytes.min(limits.max_total_bytes),
            dtype: None,
        });
        while let Some(msg) = stream.message().await? {
            match msg.part {
                Some(model_chunk::Part::Tensor(c)) => {
                    asm.push(c).map_err(|e| refused(e.to_string()))?
                }
                _ => return Err(refused("unexpected header in model stream".into())),
            }
        }
        let bytes = asm.bytes_received();
        let tensors = asm
            .finish(
                header.tensor_count as u64,
                header.total_bytes,
                &header.digest,
            )
            .map_err(|e| refused(e.to_string()))?;
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

    /// Secure aggregation, step 0: returns every participant's keys once the step closes.
    pub async fn advertise_keys(
        &mut self,
        keys: pb::SecureKeys,
    ) -> Result<pb::SecureDirectory, Status> {
        Ok(self.secure.advertise_keys(keys).await?.into_inner())
    }

    /// Step 1: returns the shares encrypted to this agent once the step closes.
    pub async fn share_keys(
        &mut self,
        shares: pb::SecureShares,
    ) -> Result<pb::SecureShares, Status> {
        Ok(self.secure.share_keys(shares).await?.into_inner())
    }

    /// Step 2: streams the masked input; returns the unmask request once the step closes.
    pub async fn submit_masked(
        &mut self,
        round: u64,
        masked: &fedmicse_secagg::MaskedInput,
    ) -> Result<pb::UnmaskRequest, Status> {
        let chunks = crate::secure::masked_chunks(round, masked);
        let stream = tokio_stream::iter(chunks);
        Ok(self.secure.submit_masked(stream).await?.into_inner())
    }

    /// Step 3: the shares that unmask the sum.
    pub async fn unmask(&mut self, shares: pb::UnmaskShares) -> Result<pb::SecureDone, Status> {
        Ok(self.secure.unmask(shares).await?.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> impl Strategy<Value = pb::ModelHeader> {
        (
            any::<u64>(),
            prop_oneof![0u32..10, any::<u32>()],
            prop_oneof![0u64..5000, any::<u64>()],
            prop::collection::vec(any::<u8>(), 0..40),
            prop::collection::vec(("[a-z.]{0,12}", 0usize..300), 0..8),
        )
            .prop_map(|(round, tensor_count, total_bytes, digest, files)| {
                pb::ModelHeader {
                    round,
                    tensor_count,
                    total_bytes,
                    digest,
                    files: files
                        .into_iter()
                        .map(|(name, n)| pb::ModelFile {
                            name,
                            content: vec![7; n],
                        })
                        .collect(),
                }
            })
    }

    fn limits() -> impl Strategy<Value = PullLimits> {
        (0usize..10, 0u64..5000, 0u64..300, 0usize..8).prop_map(
            |(max_tensors, max_total_bytes, max_file_bytes, max_files)| PullLimits {
                max_tensors,
                max_total_bytes,
                max_file_bytes,
                max_files,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any header is accepted exactly when it is within every limit.
        #[test]
        fn header_check_refuses_anything_above_the_limits(h in header(), l in limits()) {
            let within = h.tensor_count as usize <= l.max_tensors
                && h.total_bytes <= l.max_total_bytes
                && h.files.len() <= l.max_files
                && h.files.iter().all(|f| f.content.len() as u64 <= l.max_file_bytes);
            prop_assert_eq!(check_model_header(&h, &l).is_ok(), within);
        }

        /// The defaults refuse the huge declarations a hostile coordinator could make.
        #[test]
        fn default_limits_refuse_huge_headers(h in header()) {
            let l = PullLimits::default();
            if check_model_header(&h, &l).is_ok() {
                prop_assert!(h.total_bytes <= 8 << 30 && h.tensor_count <= 4096);
            }
        }
    }

    #[test]
    fn defaults_accept_a_bert_base() {
        let h = pb::ModelHeader {
            round: 3,
            tensor_count: 201,
            total_bytes: 440_000_000,
            digest: vec![0; 32],
            files: vec![pb::ModelFile {
                name: "tokenizer.json".into(),
                content: vec![b' '; 700_000],
            }],
        };
        check_model_header(&h, &PullLimits::default()).unwrap();
        let mut big = h.clone();
        big.total_bytes = (8 << 30) + 1;
        assert!(check_model_header(&big, &PullLimits::default()).is_err());
    }
}
