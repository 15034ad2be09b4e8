//! Update intake: one agent's upload read from its stream, checked against the open round
//! (cheaply before any data, fully after), spooled durably and admitted to the round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmicse_federation::{Refusal, validate_update};
use fedmicse_tensors::TensorMap;
use fedmicse_wire::pb::{self, SubmitResponse, UpdateChunk, update_chunk};
use fedmicse_wire::{Assembler, Limits};
use tonic::Streaming;

use crate::Shared;
use crate::pending::Stored;
use crate::rounds::{OpenRound, Phase};
use crate::service::Caller;

type Expected = Arc<std::collections::BTreeMap<String, Vec<usize>>>;

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
pub(crate) async fn receive_update(
    s: &Arc<Shared>,
    caller: &Caller,
    mut stream: Streaming<UpdateChunk>,
) -> Result<SubmitResponse, Refusal> {
    let idle = Duration::from_secs(s.config.server.stream_idle_secs);
    let first = next_chunk(&mut stream, idle)
        .await?
        .ok_or_else(|| Refusal::Stream("empty stream".into()))?;
    let Some(update_chunk::Part::Header(header)) = first.part else {
        return Err(Refusal::Stream(
            "the first message must be the update header".into(),
        ));
    };
    let expected = match precheck(s, &caller.id, &header)? {
        Precheck::Expect(expected) => expected,
        Precheck::Received(resp) => return Ok(resp),
    };
    let (update, received) = receive_tensors(s, &header, &mut stream, &expected, idle).await?;
    let stored = check_and_spool(s, caller, &header, update, expected).await?;
    let spooled = stored.path.clone();
    let accepted = accept(s, caller, &header, stored, received);
    if accepted.is_err() {
        s.pending.discard(&spooled);
    }
    let resp = accepted?;
    s.wake.notify_one();
    Ok(resp)
}

/// What the header alone decides.
enum Precheck {
    /// Read the update: it must have these tensors.
    Expect(Expected),
    /// A retry of an update already received: acknowledged without reading it.
    Received(SubmitResponse),
}

/// The open round, if it is `round`.
fn open_for(phase: &mut Phase, round: u64) -> Result<&mut OpenRound, Refusal> {
    let Phase::Training(open) = phase else {
        return Err(Refusal::NoRound);
    };
    if open.round != round {
        return Err(Refusal::WrongRound {
            got: round,
            open: open.round,
        });
    }
    Ok(open)
}

/// Cheap checks before any data is read: the round, the agent's slot, the deadline,
/// duplicates and the declared sample count.
fn precheck(s: &Shared, id: &str, header: &pb::UpdateHeader) -> Result<Precheck, Refusal> {
    let mut st = s.lock();
    if let Some((round, digests)) = &st.closed
        && *round == header.round
        && digests.get(id) == Some(&header.digest)
    {
        return Ok(Precheck::Received(SubmitResponse {
            accepted: true,
            round: *round,
            message: "already received (retry ignored; the round is closed)".into(),
        }));
    }
    let open = open_for(&mut st.phase, header.round)?;
    if !open.readmit(id) {
        return Err(Refusal::NotSelected(open.round));
    }
    if Instant::now() >= open.deadline {
        return Err(Refusal::Late(open.round));
    }
    if let Some(prev) = open.submitted.get(id) {
        if prev.digest == header.digest {
            return Ok(Precheck::Received(SubmitResponse {
                accepted: true,
                round: open.round,
                message: "already received (retry ignored)".into(),
            }));
        }
        return Err(Refusal::Duplicate(open.round));
    }
    let max = s.config.updates.max_samples;
    if header.num_samples == 0 || header.num_samples > max {
        return Err(Refusal::Samples {
            got: header.num_samples,
            max,
        });
    }
    Ok(Precheck::Expect(open.expected.clone()))
}

/// Reads the update's tensors, bounded by what the round expects; the bytes received
/// count for the round whatever the outcome. Returns the update and its size.
async fn receive_tensors(
    s: &Shared,
    header: &pb::UpdateHeader,
    stream: &mut Streaming<UpdateChunk>,
    expected: &Expected,
    idle: Duration,
) -> Result<(TensorMap, u64), Refusal> {
    let dtype = s.config.task.update_dtype;
    let expected_bytes: u64 = expected
        .values()
        .map(|s| dtype.encoded_len(s.iter().product::<usize>()) as u64)
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
        while let Some(msg) = next_chunk(stream, idle).await? {
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
    Ok((outcome?, received))
}

/// Checks the update's content (clipping it to the norm bound), then spools it durably
/// under a name of its own; it counts once [`accept`] renames it.
async fn check_and_spool(
    s: &Arc<Shared>,
    caller: &Caller,
    header: &pb::UpdateHeader,
    update: TensorMap,
    expected: Expected,
) -> Result<Stored, Refusal> {
    let rules = s.config.updates.clone();
    let n = header.num_samples;
    let mut stored = Stored {
        client: caller.id.clone(),
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
    let shared = s.clone();
    let round = header.round;
    tokio::task::spawn_blocking(move || {
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
    .map_err(|e| Refusal::Storage(e.to_string()))?
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
    let open = open_for(&mut st.phase, header.round)?;
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
