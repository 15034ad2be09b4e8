//! The Federation gRPC service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use fedmicse_federation::{Refusal, validate_update};
use fedmicse_wire::pb::{
    self, JoinRequest, JoinResponse, ModelChunk, ModelFile, ModelHeader, PullRequest,
    StatusRequest, StatusResponse, SubmitResponse, UpdateChunk, federation_server::Federation,
    model_chunk, update_chunk,
};
use fedmicse_wire::{Assembler, Limits, chunk_tensors, peer_identity};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::Shared;
use crate::pending::Stored;
use crate::rounds::{AgentSeen, Phase};

pub struct FederationService {
    shared: Arc<Shared>,
}

impl FederationService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        FederationService { shared }
    }
}

/// Header the client id travels in when plaintext is allowed (no certificate to read it from).
pub const CLIENT_ID_HEADER: &str = "x-fedmicse-client-id";

/// Who may call what.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Join rounds (and everything an operator may do).
    Agent,
    /// Status and inference only.
    Operator,
}

/// The caller's client id: from its certificate (mTLS), or from a header when plaintext is
/// explicitly allowed. Checked against the allowlist (agents) or the operators list.
pub(crate) fn identify<T>(shared: &Shared, req: &Request<T>, role: Role) -> Result<String, Status> {
    let id = match req.peer_certs() {
        Some(certs) => {
            let leaf = certs
                .first()
                .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
            let peer =
                peer_identity(leaf.as_ref()).map_err(|e| Status::unauthenticated(e.to_string()))?;
            if shared.revocations.is_revoked(&peer.id, &peer.serial) {
                tracing::warn!(client = %peer.id, serial = %peer.serial, "refused: certificate revoked");
                return Err(Status::permission_denied(format!(
                    "the certificate of {:?} (serial {}) is revoked",
                    peer.id, peer.serial
                )));
            }
            peer.id
        }
        None if shared.config.server.allow_plaintext => req
            .metadata()
            .get(CLIENT_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| {
                Status::unauthenticated(format!("plaintext callers must send {CLIENT_ID_HEADER}"))
            })?,
        None => return Err(Status::unauthenticated("no client certificate")),
    };
    let f = &shared.config.federation;
    let open = f.allowlist.is_empty() && shared.config.tls.is_none();
    let agent = f.allowlist.iter().any(|a| a == &id);
    let operator = f.operators.iter().any(|a| a == &id);
    let allowed = open || agent || (role == Role::Operator && operator);
    if !allowed {
        tracing::warn!(client = %id, "refused: not on the allowlist");
        return Err(Status::permission_denied(format!(
            "client id {id:?} is not on the coordinator's allowlist"
        )));
    }
    Ok(id)
}

fn refusal_status(r: &Refusal) -> Status {
    let msg = format!("update refused ({}): {r}", r.kind());
    match r {
        Refusal::WrongRound { .. } | Refusal::NoRound => Status::failed_precondition(msg),
        Refusal::NotSelected(_) => Status::permission_denied(msg),
        Refusal::Duplicate(_) => Status::already_exists(msg),
        Refusal::Stream(_) | Refusal::Digest(_) => Status::data_loss(msg),
        _ => Status::invalid_argument(msg),
    }
}

type ModelStream = Pin<Box<dyn Stream<Item = Result<ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let id = identify(&self.shared, &req, Role::Agent)?;
        let req = req.into_inner();
        let s = &self.shared;
        let global = s.global.load();
        let mut st = s.lock();
        let first = !st.agents.contains_key(&id);
        st.agents.insert(
            id.clone(),
            AgentSeen {
                last_seen: Instant::now(),
                shard_size: req.shard_size,
            },
        );
        if first {
            tracing::info!(client = %id, shard_size = req.shard_size, version = %req.agent_version, "agent joined");
        }
        let mut resp = JoinResponse {
            client_id: id.clone(),
            poll_after_ms: s.config.federation.poll_ms,
            rounds_total: s.config.federation.rounds,
            model_digest: global.digest.clone(),
            round: global.round,
            ..Default::default()
        };
        match &st.phase {
            Phase::Waiting { .. } => resp.phase = pb::Phase::Waiting as i32,
            Phase::Aggregating { round } => {
                resp.phase = pb::Phase::Aggregating as i32;
                resp.round = *round;
            }
            Phase::Done => resp.phase = pb::Phase::Done as i32,
            Phase::Training(open) => {
                resp.phase = pb::Phase::Training as i32;
                resp.round = open.round;
                resp.deadline_unix_ms = open.deadline_unix_ms;
                if open.selected.contains(&id) && !open.submitted.contains_key(&id) {
                    resp.selected = true;
                    resp.task = Some((&s.config.task).into());
                }
            }
        }
        drop(st);
        s.wake.notify_one();
        Ok(Response::new(resp))
    }

    type PullModelStream = ModelStream;

    async fn pull_model(&self, req: Request<PullRequest>) -> Result<Response<ModelStream>, Status> {
        let id = identify(&self.shared, &req, Role::Agent)?;
        let round = req.into_inner().round;
        {
            let st = self.shared.lock();
            match &st.phase {
                Phase::Training(open) if open.round == round => {
                    if !open.selected.contains(&id) {
                        return Err(Status::permission_denied(format!(
                            "not selected for round {round}"
                        )));
                    }
                }
                _ => {
                    return Err(Status::failed_precondition(format!(
                        "round {round} is not open"
                    )));
                }
            }
        }
        let global = self.shared.global.load_full();
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ModelChunk, Status>>(2);
        let downloads = self.shared.downloads.clone();
        tokio::spawn(async move {
            // Bounded memory: a few chunks per download, a bounded number of downloads.
            let Ok(_permit) = downloads.acquire_owned().await else {
                return;
            };
            let header = ModelHeader {
                round: global.round,
                tensor_count: global.tensors.len() as u32,
                total_bytes: fedmicse_wire::tensors::total_bytes(&global.tensors),
                digest: global.digest.clone(),
                files: global
                    .files
                    .iter()
                    .map(|(name, content)| ModelFile {
                        name: name.clone(),
                        content: content.clone(),
                    })
                    .collect(),
            };
            let mut sent = header
                .files
                .iter()
                .map(|f| f.content.len() as u64)
                .sum::<u64>();
            if tx
                .send(Ok(ModelChunk {
                    part: Some(model_chunk::Part::Header(header)),
                }))
                .await
                .is_err()
            {
                return;
            }
            for chunk in chunk_tensors(&global.tensors) {
                sent += chunk.data.len() as u64;
                let msg = ModelChunk {
                    part: Some(model_chunk::Part::Tensor(chunk)),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    tracing::warn!(client = %id, "model download interrupted");
                    return;
                }
            }
            let mut st = shared.lock();
            if let Phase::Training(open) = &mut st.phase
                && open.round == round
            {
                open.bytes_down += sent;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn submit_update(
        &self,
        req: Request<Streaming<UpdateChunk>>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let id = identify(&self.shared, &req, Role::Agent)?;
        let s = self.shared.clone();
        let result = receive_update(&s, &id, req.into_inner()).await;
        match result {
            Ok(resp) => Ok(Response::new(resp)),
            Err(refusal) => {
                tracing::warn!(client = %id, check = refusal.kind(), reason = %refusal, "update refused");
                s.lock().refuse(refusal.kind());
                Err(refusal_status(&refusal))
            }
        }
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        identify(&self.shared, &req, Role::Operator)?;
        Ok(Response::new(status(&self.shared)))
    }
}

pub(crate) fn status(s: &Shared) -> StatusResponse {
    let st = s.lock();
    let f = &s.config.federation;
    let connected = st
        .connected(std::time::Duration::from_secs(f.agent_timeout_secs))
        .len() as u32;
    let global_round = s.global.load().round;
    let mut r = StatusResponse {
        round: global_round,
        rounds_total: f.rounds,
        connected,
        min_clients: f.min_clients as u32,
        model: f.model.display().to_string(),
        history: st
            .history
            .iter()
            .map(|h| pb::RoundSummary {
                round: h.round,
                clients: h.clients,
                mean_loss: h.mean_loss.unwrap_or(f64::NAN),
                dev_spearman: h.stsb_dev.unwrap_or(f64::NAN),
                bytes_up: h.bytes_up,
                bytes_down: h.bytes_down,
                seconds: h.seconds,
            })
            .collect(),
        ..Default::default()
    };
    r.phase = match &st.phase {
        Phase::Waiting { .. } => pb::Phase::Waiting,
        Phase::Aggregating { round } => {
            r.round = *round;
            pb::Phase::Aggregating
        }
        Phase::Done => pb::Phase::Done,
        Phase::Training(open) => {
            r.round = open.round;
            r.selected = open.selected.len() as u32;
            r.answered = open.submitted.len() as u32;
            r.deadline_unix_ms = open.deadline_unix_ms;
            pb::Phase::Training
        }
    } as i32;
    r
}

fn assembly_refusal(e: fedmicse_wire::AssemblyError) -> Refusal {
    use fedmicse_wire::AssemblyError as A;
    match e {
        A::Digest { .. } => Refusal::Digest(e.to_string()),
        A::DType { .. } => Refusal::DType(e.to_string()),
        other => Refusal::Stream(other.to_string()),
    }
}

/// Receives, checks and stores one update.
async fn receive_update(
    s: &Arc<Shared>,
    id: &str,
    mut stream: Streaming<UpdateChunk>,
) -> Result<SubmitResponse, Refusal> {
    let first = stream
        .message()
        .await
        .map_err(|e| Refusal::Stream(e.message().to_string()))?
        .ok_or_else(|| Refusal::Stream("empty stream".into()))?;
    let Some(update_chunk::Part::Header(header)) = first.part else {
        return Err(Refusal::Stream(
            "the first message must be the update header".into(),
        ));
    };
    // Cheap checks before any data is read.
    let expected = {
        let st = s.lock();
        if let Some((round, digests)) = &st.closed
            && *round == header.round
            && digests.get(id) == Some(&header.digest)
        {
            return Ok(SubmitResponse {
                accepted: true,
                round: *round,
                message: "already received (retry ignored; the round is closed)".into(),
            });
        }
        let Phase::Training(open) = &st.phase else {
            return Err(Refusal::NoRound);
        };
        if open.round != header.round {
            return Err(Refusal::WrongRound {
                got: header.round,
                open: open.round,
            });
        }
        if !open.selected.contains(id) {
            return Err(Refusal::NotSelected(open.round));
        }
        if let Some(prev) = open.submitted.get(id) {
            if prev.digest == header.digest {
                return Ok(SubmitResponse {
                    accepted: true,
                    round: open.round,
                    message: "already received (retry ignored)".into(),
                });
            }
            return Err(Refusal::Duplicate(open.round));
        }
        open.expected.clone()
    };
    let elem = match s.config.task.update_dtype.as_str() {
        "f16" | "bf16" => 2,
        _ => 4,
    };
    let expected_bytes: u64 = expected
        .values()
        .map(|s| s.iter().product::<usize>() as u64 * elem)
        .sum();
    // Bounded memory: only so many updates are held at once; others wait here, their
    // streams held back by HTTP/2 flow control.
    let _permit = s.uploads.acquire().await.expect("semaphore open");
    let dtype = fedmicse_wire::tensors::parse_dtype(&s.config.task.update_dtype)
        .unwrap_or(pb::ElementType::F32);
    let mut assembler = Assembler::new(Limits {
        max_tensors: expected.len(),
        max_total_bytes: expected_bytes,
        dtype: Some(dtype),
    });
    let mut received: u64 = 0;
    let outcome: Result<_, Refusal> = async {
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|e| Refusal::Stream(e.message().to_string()))?
        {
            match msg.part {
                Some(update_chunk::Part::Tensor(chunk)) => {
                    received += chunk.data.len() as u64;
                    assembler.push(chunk).map_err(assembly_refusal)?;
                }
                _ => return Err(Refusal::Stream("a second header in the stream".into())),
            }
        }
        assembler
            .finish(
                header.tensor_count as u64,
                header.total_bytes,
                &header.digest,
            )
            .map_err(assembly_refusal)
    }
    .await;
    {
        let mut st = s.lock();
        if let Phase::Training(open) = &mut st.phase
            && open.round == header.round
        {
            open.bytes_up += received;
        }
    }
    let update = outcome?;
    let rules = s.config.updates.clone();
    let n = header.num_samples;
    let mut stored = Stored {
        client: id.to_string(),
        num_samples: n,
        scale: 1.0,
        mean_loss: header
            .metrics
            .as_ref()
            .map(|m| m.mean_loss)
            .filter(|l| l.is_finite()),
        digest: header.digest.clone(),
        path: Default::default(),
    };
    // Check, then store durably before acknowledging: an accepted update survives a crash.
    let shared = s.clone();
    let round = header.round;
    let stored = tokio::task::spawn_blocking(move || {
        stored.scale = validate_update(&update, &expected, n, &rules)?;
        if stored.scale < 1.0 {
            tracing::info!(client = %stored.client, scale = stored.scale, "update clipped to the norm bound");
        }
        stored.path = shared
            .pending
            .save(round, &stored, &update)
            .map_err(|e| Refusal::Stream(format!("could not store the update: {e}")))?;
        Ok::<_, Refusal>(stored)
    })
    .await
    .map_err(|e| Refusal::Stream(e.to_string()))??;
    let mut st = s.lock();
    let Phase::Training(open) = &mut st.phase else {
        return Err(Refusal::NoRound);
    };
    if open.round != header.round {
        return Err(Refusal::WrongRound {
            got: header.round,
            open: open.round,
        });
    }
    if open.submitted.contains_key(id) {
        return Err(Refusal::Duplicate(open.round));
    }
    open.submitted.insert(id.to_string(), stored);
    let round = open.round;
    tracing::info!(
        client = %id,
        round,
        samples = n,
        bytes = received,
        answered = open.submitted.len(),
        selected = open.selected.len(),
        "update accepted"
    );
    drop(st);
    s.wake.notify_one();
    Ok(SubmitResponse {
        accepted: true,
        round,
        message: "accepted".into(),
    })
}
