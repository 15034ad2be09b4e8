//! The Federation gRPC service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmicse_federation::Refusal;
use fedmicse_wire::pb::{
    self, JoinRequest, JoinResponse, ModelChunk, ModelFile, ModelHeader, PullRequest,
    StatusRequest, StatusResponse, SubmitResponse, UpdateChunk, federation_server::Federation,
    model_chunk,
};
use fedmicse_wire::{chunk_tensors, peer_identity};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::rounds::{AgentSeen, Phase};
use crate::{GlobalModel, Shared};

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

/// Who is calling: the client id (checked by the certificate-name rule, so it is safe as a
/// file name) and the serial of its certificate (empty over plaintext).
pub(crate) struct Caller {
    pub id: String,
    pub serial: String,
}

/// The caller's identity: from its certificate (mTLS), or from a header when plaintext is
/// explicitly allowed. Checked against the allowlist (agents) or the operators list.
pub(crate) fn identify<T>(shared: &Shared, req: &Request<T>, role: Role) -> Result<Caller, Status> {
    let (id, serial) = match req.peer_certs() {
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
            (peer.id, peer.serial)
        }
        None if shared.config.server.allow_plaintext => {
            let id = req
                .metadata()
                .get(CLIENT_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| {
                    Status::unauthenticated(format!(
                        "plaintext callers must send {CLIENT_ID_HEADER}"
                    ))
                })?;
            if shared.revocations.is_revoked(&id, "") {
                return Err(Status::permission_denied(format!(
                    "client id {id:?} is revoked"
                )));
            }
            (id, String::new())
        }
        None => return Err(Status::unauthenticated("no client certificate")),
    };
    // One rule for ids everywhere: the one `fedmicse certs` issues names by.
    if let Err(e) = fedmicse_wire::certs::check_agent_id(&id) {
        tracing::warn!(client = ?id, "refused: malformed client id");
        return Err(Status::unauthenticated(e.to_string()));
    }
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
    Ok(Caller { id, serial })
}

fn refusal_status(r: &Refusal) -> Status {
    let msg = format!("update refused ({}): {r}", r.kind());
    match r {
        // Temporary: the agent waits for a round it is selected for.
        Refusal::WrongRound { .. }
        | Refusal::NoRound
        | Refusal::NotSelected(_)
        | Refusal::Late(_) => Status::failed_precondition(msg),
        Refusal::Duplicate(_) => Status::already_exists(msg),
        Refusal::Stream(_) | Refusal::Digest(_) => Status::data_loss(msg),
        Refusal::Idle(_) => Status::deadline_exceeded(msg),
        Refusal::Busy => Status::resource_exhausted(msg),
        // Permanent: the agent stops.
        Refusal::Revoked => Status::permission_denied(msg),
        // The coordinator's own trouble (a full disk): not the agent's fault, try later.
        Refusal::Storage(_) => Status::unavailable(msg),
        _ => Status::invalid_argument(msg),
    }
}

type ModelStream = Pin<Box<dyn Stream<Item = Result<ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let Caller { id, serial } = identify(&self.shared, &req, Role::Agent)?;
        let req = req.into_inner();
        let s = &self.shared;
        let global = s.global.load();
        let mut guard = s.lock();
        let st = &mut *guard;
        let first = !st.agents.contains_key(&id);
        st.agents.insert(
            id.clone(),
            AgentSeen {
                last_seen: Instant::now(),
                shard_size: req.shard_size,
                serial,
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
        match &mut st.phase {
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
                open.readmit(&id);
                if open.awaits(&id) {
                    resp.selected = true;
                    resp.task = Some((&s.config.task).into());
                    if s.secure.config.enabled {
                        let largest = st.agents.values().map(|a| a.shard_size).max().unwrap_or(1);
                        let params = s.secure.params_for(
                            open,
                            &id,
                            s.config.federation.allowlist.len(),
                            &s.config.task,
                            largest,
                        );
                        resp.secure = Some(params.map_err(|e| {
                            tracing::error!(round = open.round, error = %e, "secure aggregation cannot start");
                            Status::internal(format!("secure aggregation cannot start: {e}"))
                        })?);
                    }
                }
            }
        }
        drop(guard);
        s.wake.notify_one();
        Ok(Response::new(resp))
    }

    type PullModelStream = ModelStream;

    async fn pull_model(&self, req: Request<PullRequest>) -> Result<Response<ModelStream>, Status> {
        let id = identify(&self.shared, &req, Role::Agent)?.id;
        let round = req.into_inner().round;
        let Some(slot) = self.shared.downloads_in_flight.reserve(&id) else {
            return Err(Status::resource_exhausted(
                "a model download for this agent is already in flight",
            ));
        };
        may_pull(&self.shared, &id, round)?;
        let global = self.shared.global.load_full();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ModelChunk, Status>>(2);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Bounded memory: a few chunks per download, a bounded number of downloads.
            let Ok(_permit) = shared.downloads.clone().acquire_owned().await else {
                return;
            };
            match stream_model(&shared, &global, tx).await {
                Ok(sent) => {
                    let mut st = shared.lock();
                    if let Phase::Training(open) = &mut st.phase
                        && open.round == round
                    {
                        open.bytes_down += sent;
                    }
                }
                Err(why) => tracing::warn!(client = %id, why, "model download interrupted"),
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
        let caller = identify(&self.shared, &req, Role::Agent)?;
        let id = caller.id.clone();
        let s = self.shared.clone();
        // One upload per agent at a time: a second one in parallel could only be a retry
        // racing the first, or an attempt to overwrite it.
        let Some(_slot) = s.uploads_in_flight.reserve(&id) else {
            let refusal = Refusal::Busy;
            tracing::warn!(client = %id, check = refusal.kind(), reason = %refusal, "update refused");
            s.lock().refuse(refusal.kind());
            return Err(refusal_status(&refusal));
        };
        let result = crate::upload::receive_update(&s, &caller, req.into_inner()).await;
        match result {
            Ok(resp) => Ok(Response::new(resp)),
            Err(refusal) => {
                tracing::warn!(client = %id, check = refusal.kind(), reason = %refusal, "update refused");
                let mut st = s.lock();
                st.refuse(refusal.kind());
                // A stalled upload takes its agent out of the round, and an update refused
                // for its content stops holding the round up: the round does not wait for
                // either until its deadline.
                if let Phase::Training(open) = &mut st.phase
                    && open.awaits(&id)
                {
                    if matches!(refusal, Refusal::Idle(_)) {
                        open.drop_agent(&id);
                        tracing::warn!(client = %id, round = open.round, "stalled agent dropped from the round");
                    } else if refusal.is_content() {
                        open.failed.insert(id.clone());
                        tracing::warn!(client = %id, round = open.round, "the round no longer waits for this agent (its update was refused)");
                    }
                    drop(st);
                    s.wake.notify_one();
                }
                Err(refusal_status(&refusal))
            }
        }
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let _ = identify(&self.shared, &req, Role::Operator)?;
        Ok(Response::new(status(&self.shared)))
    }
}

/// Whether `id` may download the model of `round`: the round is open and selected it.
fn may_pull(shared: &Shared, id: &str, round: u64) -> Result<(), Status> {
    let mut st = shared.lock();
    match &mut st.phase {
        Phase::Training(open) if open.round == round => {
            if open.readmit(id) {
                Ok(())
            } else {
                // Temporary: the agent may be selected for a later round.
                Err(Status::failed_precondition(format!(
                    "not selected for round {round}"
                )))
            }
        }
        _ => Err(Status::failed_precondition(format!(
            "round {round} is not open"
        ))),
    }
}

/// Streams the global model (header with its files, then tensor chunks) into `tx`.
/// Returns the bytes sent; a reader that stops reading loses its download after the
/// stream idle time, freeing its permit for the others.
async fn stream_model(
    shared: &Shared,
    global: &GlobalModel,
    tx: tokio::sync::mpsc::Sender<Result<ModelChunk, Status>>,
) -> Result<u64, &'static str> {
    let idle = Duration::from_secs(shared.config.server.stream_idle_secs);
    let send = |msg| {
        let tx = tx.clone();
        async move {
            match tokio::time::timeout(idle, tx.send(msg)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err("the agent closed the stream"),
                Err(_) => Err("the agent stopped reading"),
            }
        }
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
    send(Ok(ModelChunk {
        part: Some(model_chunk::Part::Header(header)),
    }))
    .await?;
    for chunk in chunk_tensors(&global.tensors) {
        sent += chunk.data.len() as u64;
        let msg = ModelChunk {
            part: Some(model_chunk::Part::Tensor(chunk)),
        };
        send(Ok(msg)).await?;
    }
    Ok(sent)
}

pub(crate) fn status(s: &Shared) -> StatusResponse {
    let st = s.lock();
    let f = &s.config.federation;
    let connected = st
        .connected(
            Instant::now(),
            std::time::Duration::from_secs(f.agent_timeout_secs),
            |id, serial| s.revocations.is_revoked(id, serial),
        )
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
