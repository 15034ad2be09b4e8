//! The Federation gRPC service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        {
            let mut st = self.shared.lock();
            match &mut st.phase {
                Phase::Training(open) if open.round == round => {
                    if !open.readmit(&id) {
                        // Temporary: the agent may be selected for a later round.
                        return Err(Status::failed_precondition(format!(
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
        let idle = std::time::Duration::from_secs(self.shared.config.server.stream_idle_secs);
        tokio::spawn(async move {
            let _slot = slot;
            // Bounded memory: a few chunks per download, a bounded number of downloads.
            let Ok(_permit) = downloads.acquire_owned().await else {
                return;
            };
            // A reader that stops reading loses its download after `idle`, freeing its
            // permit for the others.
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
            let head = Ok(ModelChunk {
                part: Some(model_chunk::Part::Header(header)),
            });
            if let Err(why) = send(head).await {
                tracing::warn!(client = %id, why, "model download interrupted");
                return;
            }
            for chunk in chunk_tensors(&global.tensors) {
                sent += chunk.data.len() as u64;
                let msg = ModelChunk {
                    part: Some(model_chunk::Part::Tensor(chunk)),
                };
                if let Err(why) = send(Ok(msg)).await {
                    tracing::warn!(client = %id, why, "model download interrupted");
                    return;
                }
            }
            drop(tx);
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
        let result = receive_update(&s, &caller, req.into_inner()).await;
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

fn assembly_refusal(e: fedmicse_wire::AssemblyError) -> Refusal {
    use fedmicse_wire::AssemblyError as A;
    match e {
        A::Digest { .. } => Refusal::Digest(e.to_string()),
        A::DType { .. } => Refusal::DType(e.to_string()),
        other => Refusal::Stream(other.to_string()),
    }
}

/// The next message of an upload, or a refusal when none comes within `idle`.
async fn next_chunk(
    stream: &mut Streaming<UpdateChunk>,
    idle: Duration,
) -> Result<Option<UpdateChunk>, Refusal> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(r) => r.map_err(|e| Refusal::Stream(e.message().to_string())),
        Err(_) => Err(Refusal::Idle(idle.as_secs())),
    }
}

/// Receives, checks and stores one update. The caller holds the agent's upload slot.
async fn receive_update(
    s: &Arc<Shared>,
    caller: &Caller,
    mut stream: Streaming<UpdateChunk>,
) -> Result<SubmitResponse, Refusal> {
    let id = caller.id.as_str();
    let idle = Duration::from_secs(s.config.server.stream_idle_secs);
    let first = next_chunk(&mut stream, idle)
        .await?
        .ok_or_else(|| Refusal::Stream("empty stream".into()))?;
    let Some(update_chunk::Part::Header(header)) = first.part else {
        return Err(Refusal::Stream(
            "the first message must be the update header".into(),
        ));
    };
    // Cheap checks before any data is read.
    let expected = {
        let mut st = s.lock();
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
        let Phase::Training(open) = &mut st.phase else {
            return Err(Refusal::NoRound);
        };
        if open.round != header.round {
            return Err(Refusal::WrongRound {
                got: header.round,
                open: open.round,
            });
        }
        if !open.readmit(id) {
            return Err(Refusal::NotSelected(open.round));
        }
        if Instant::now() >= open.deadline {
            return Err(Refusal::Late(open.round));
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
        if header.num_samples == 0 || header.num_samples > s.config.updates.max_samples {
            return Err(Refusal::Samples {
                got: header.num_samples,
                max: s.config.updates.max_samples,
            });
        }
        open.expected.clone()
    };
    let dtype = s.config.task.update_dtype;
    let elem = dtype.size() as u64;
    let expected_bytes: u64 = expected
        .values()
        .map(|s| s.iter().product::<usize>() as u64 * elem)
        .sum();
    // Bounded memory: only so many updates are held at once; others wait here, their
    // streams held back by HTTP/2 flow control. Every holder is bounded by the idle timeout.
    let _permit = s.uploads.acquire().await.expect("semaphore open");
    let mut assembler = Assembler::new(Limits {
        max_tensors: expected.len(),
        max_total_bytes: expected_bytes,
        dtype: Some(dtype),
    });
    let mut received: u64 = 0;
    let outcome: Result<_, Refusal> = async {
        while let Some(msg) = next_chunk(&mut stream, idle).await? {
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
        norm: 0.0,
        declared: 0,
        serial: caller.serial.clone(),
    };
    // Check, then spool durably under a name of its own; it counts once renamed below.
    let shared = s.clone();
    let round = header.round;
    let stored = tokio::task::spawn_blocking(move || {
        stored.scale = validate_update(&update, &expected, n, &rules)?;
        stored.norm = fedmicse_federation::l2_norm(&update);
        if stored.scale < 1.0 {
            tracing::info!(client = %stored.client, scale = stored.scale, "update clipped to the norm bound");
        }
        stored.path = shared
            .pending
            .spool(round, &stored, &update)
            .map_err(|e| Refusal::Storage(e.to_string()))?;
        Ok::<_, Refusal>(stored)
    })
    .await
    .map_err(|e| Refusal::Storage(e.to_string()))??;
    let spooled = stored.path.clone();
    let accepted = accept(s, caller, &header, stored, received);
    if accepted.is_err() {
        s.pending.discard(&spooled);
    }
    let resp = accepted?;
    s.wake.notify_one();
    Ok(resp)
}

/// Admits a checked, spooled update to the open round, under the state lock: the round,
/// the agent's certificate and its slot are checked again (all may have changed while the
/// update streamed in), and only then does the file get its final name.
fn accept(
    s: &Shared,
    caller: &Caller,
    header: &pb::UpdateHeader,
    mut stored: Stored,
    received: u64,
) -> Result<SubmitResponse, Refusal> {
    let id = caller.id.as_str();
    if s.revocations.is_revoked(id, &caller.serial) {
        return Err(Refusal::Revoked);
    }
    let mut st = s.lock();
    let declared = st.agents.get(id).map_or(0, |a| a.shard_size);
    let Phase::Training(open) = &mut st.phase else {
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
    // Exactly at the deadline: an update that finished streaming later does not count.
    if Instant::now() >= open.deadline {
        return Err(Refusal::Late(open.round));
    }
    if open.submitted.contains_key(id) {
        return Err(Refusal::Duplicate(open.round));
    }
    stored.declared = declared;
    stored.path = s
        .pending
        .accept(&stored.path, id)
        .map_err(|e| Refusal::Storage(e.to_string()))?;
    let n = stored.num_samples;
    open.failed.remove(id);
    open.submitted.insert(id.to_string(), stored);
    let round = open.round;
    tracing::info!(
        client = %id,
        round,
        samples = n,
        declared,
        bytes = received,
        answered = open.submitted.len(),
        selected = open.selected.len(),
        "update accepted"
    );
    Ok(SubmitResponse {
        accepted: true,
        round,
        message: "accepted".into(),
    })
}
