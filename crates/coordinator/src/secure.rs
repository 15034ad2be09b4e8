//! Secure aggregation rounds: the coordinator's side of the SecAgg / SecAgg+ protocol
//! (`fedmicse_secagg`), around the open round.
//!
//! When a round opens under `[secure_aggregation]`, the first Join of a selected agent
//! starts a session for it: the round's parameters (ring, threshold, neighbourhood, each
//! trainable tensor's clip) and each agent's index. Agents then go through the four steps
//! of the `SecureAggregation` service; each step closes when every expected agent
//! answered, or when its time is up (then the silent ones count as dropped). The last step
//! yields the sum of the survivors' quantized updates — never one of them — which becomes
//! the round's step: the mean of the survivors' deltas. A session that cannot finish
//! (fewer than the threshold left) abandons the round; the model stays as it was, and the
//! round reopens with fresh keys. The session lives in memory only: a coordinator restart
//! abandons the round it was in.
//!
//! The clips adapt: each masked vector ends with one statistic per tensor (the agent's
//! largest |value| over the clip, quantized stochastically in eighths of the range), whose
//! revealed sum gives the mean of the agents' largest values, the next round's clip. What
//! clipping and rounding drop, agents carry into their next update (error feedback).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmicse_secagg::{
    AdvertiseKeys, EncryptedShare, MaskedInput, Neighbourhood, RoundConfig, ServerKeys,
    ServerMasked, ServerShares, ServerUnmask, ShareKeys, UnmaskRequest, UnmaskResponse, WireBytes,
    ring, ring_bits,
};
use fedmicse_tensors::{HostTensor, TensorMap};
use fedmicse_wire::pb;
use tokio::sync::watch;
use tonic::Status;

use crate::config::{SecureAggregationConfig, SecureMode};
use crate::rounds::OpenRound;

/// Statistics are quantized over [0, STAT_RANGE] clips.
pub const STAT_RANGE: f64 = 8.0;

/// The round's step as the secure sum gave it.
#[derive(Debug, Clone)]
pub struct SecureOutcome {
    /// Mean delta of the survivors, per trainable tensor.
    pub step: TensorMap,
    pub clients: u32,
}

/// Where a session stands.
enum Step {
    Keys(ServerKeys),
    Shares(ServerShares, Arc<Vec<AdvertiseKeys>>),
    Masked(ServerMasked, Arc<BTreeMap<u32, Vec<EncryptedShare>>>),
    Unmask(ServerUnmask, Arc<UnmaskRequest>),
    /// Finished: the outcome is in the open round, or the round is abandoned (why).
    Done(Option<String>),
    /// Between two steps (never seen outside a transition).
    Moving,
}

impl Step {
    fn number(&self) -> u8 {
        match self {
            Step::Keys(_) => 0,
            Step::Shares(..) => 1,
            Step::Masked(..) => 2,
            Step::Unmask(..) => 3,
            Step::Done(_) | Step::Moving => 4,
        }
    }
}

struct Session {
    round: u64,
    /// When the open round it belongs to opened (a reopened round is a new session).
    opened: Instant,
    params: pb::SecureRound,
    config: RoundConfig,
    /// Trainable tensors in name order, with their shapes.
    tensors: Vec<(String, Vec<usize>)>,
    index: BTreeMap<String, u32>,
    step: Step,
    /// Who answered the current step.
    answered: BTreeSet<u32>,
    /// Who the current step waits for (after step 0: those who answered the previous one).
    waiting_for: BTreeSet<u32>,
    step_opened: Instant,
    bytes_up: u64,
}

/// The coordinator's secure-aggregation state.
pub(crate) struct Secure {
    pub config: SecureAggregationConfig,
    session: std::sync::Mutex<Option<Session>>,
    /// (round, step) of the session, so handlers can wait for a step to close.
    progress: watch::Sender<(u64, u8)>,
    /// The clip of each trainable tensor for the next round (empty: none learnt yet).
    clips: std::sync::Mutex<Vec<f32>>,
}

/// What a step gives the agents that answered it.
enum Output {
    Directory(Arc<Vec<AdvertiseKeys>>),
    Inbox(Vec<EncryptedShare>),
    Unmask(Arc<UnmaskRequest>),
}

/// A protocol message the session refuses: the caller's fault.
fn refused(e: fedmicse_secagg::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

impl Secure {
    pub fn new(config: SecureAggregationConfig) -> Self {
        Secure {
            config,
            session: Default::default(),
            progress: watch::channel((0, 0)).0,
            clips: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Session>> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The parameters `id` gets with its Join answer for `open` (a session is started on
    /// the round's first call). `shard_sizes` bound the local steps of round 1's clips.
    pub fn params_for(
        &self,
        open: &OpenRound,
        id: &str,
        allowlist: usize,
        task: &fedmicse_federation::TaskConfig,
        largest_shard: u64,
    ) -> Result<pb::SecureRound, String> {
        let mut guard = self.lock();
        let stale = guard
            .as_ref()
            .is_none_or(|s| s.round != open.round || s.opened != open.opened);
        if stale {
            *guard = Some(self.start(open, allowlist, task, largest_shard)?);
            self.progress.send_replace((open.round, 0));
        }
        let s = guard.as_mut().expect("session");
        let next = s.index.len() as u32;
        let index = *s.index.entry(id.to_string()).or_insert(next);
        Ok(pb::SecureRound {
            agent_index: index,
            ..s.params.clone()
        })
    }

    fn start(
        &self,
        open: &OpenRound,
        allowlist: usize,
        task: &fedmicse_federation::TaskConfig,
        largest_shard: u64,
    ) -> Result<Session, String> {
        let c = &self.config;
        let tensors: Vec<(String, Vec<usize>)> = open
            .expected
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let values: usize = tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let n = open.selected.len().max(1);
        // Public: it only has to be the same for every agent of the session.
        let seed: [u8; 32] = rand::random();
        let (neighbourhood, half_degree, threshold) = neighbourhood(c.mode, n, seed);
        let value_bits = crate::config::secure_value_bits(task.update_dtype).ok_or_else(|| {
            format!(
                "update_dtype {} under secure aggregation",
                task.update_dtype
            )
        })?;
        let k = ring_bits(value_bits, allowlist.max(n)).map_err(|e| e.to_string())?;
        let clips = self.clips_for(&tensors, task, largest_shard);
        let config = RoundConfig {
            round: open.round,
            ring_bits: k,
            len: values + tensors.len(),
            threshold,
            neighbourhood,
        };
        let params = pb::SecureRound {
            ring_bits: k,
            value_bits,
            len: config.len as u64,
            threshold: threshold as u32,
            half_degree,
            graph_seed: seed.to_vec(),
            clips,
            agent_index: 0,
        };
        tracing::info!(
            round = open.round,
            agents = n,
            threshold,
            ring_bits = k,
            half_degree,
            "secure aggregation session started"
        );
        Ok(Session {
            round: open.round,
            opened: open.opened,
            step: Step::Keys(ServerKeys::new(config.clone()).map_err(|e| e.to_string())?),
            params,
            config,
            tensors,
            index: BTreeMap::new(),
            answered: BTreeSet::new(),
            waiting_for: BTreeSet::new(),
            step_opened: Instant::now(),
            bytes_up: 0,
        })
    }

    /// The learnt clips, or for a first round the most an AdamW step can move a value,
    /// learning rate × local steps (Adam's steps are about lr in size each).
    fn clips_for(
        &self,
        tensors: &[(String, Vec<usize>)],
        task: &fedmicse_federation::TaskConfig,
        largest_shard: u64,
    ) -> Vec<f32> {
        let learnt = self.clips.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if learnt.len() == tensors.len() {
            return learnt;
        }
        let steps = if task.steps > 0 {
            task.steps as u64
        } else {
            task.epochs as u64 * largest_shard.max(1).div_ceil(task.batch_size.max(1) as u64)
        };
        vec![(task.lr * steps.max(1) as f64) as f32; tensors.len()]
    }

    /// Checks that `id` is the session's agent `agent` of `round`.
    fn session_for<'a>(
        guard: &'a mut Option<Session>,
        round: u64,
        id: &str,
        agent: u32,
    ) -> Result<&'a mut Session, Status> {
        let s = guard.as_mut().filter(|s| s.round == round).ok_or_else(|| {
            Status::failed_precondition(format!("no secure session for round {round}"))
        })?;
        // Not permission_denied: an agent whose session was restarted (the round reopened)
        // only needs to join again for its new index.
        if s.index.get(id) != Some(&agent) {
            return Err(Status::failed_precondition(format!(
                "{id:?} is not agent {agent} of round {round}'s session: join again"
            )));
        }
        Ok(s)
    }

    /// Step 0: `id`'s keys; the directory once the step closed.
    pub async fn advertise(
        &self,
        round: u64,
        id: &str,
        keys: AdvertiseKeys,
        until: Instant,
    ) -> Result<Arc<Vec<AdvertiseKeys>>, Status> {
        let agent = keys.agent;
        let take = |st: &mut Step| match st {
            Step::Keys(server) => server.receive(keys).map_err(refused),
            _ => Err(Status::failed_precondition("the key step is closed")),
        };
        match self.answer(round, id, agent, 68, take, until).await? {
            Output::Directory(d) => Ok(d),
            _ => Err(Status::internal("step output")),
        }
    }

    /// Step 1: `id`'s encrypted shares; the shares for it once the step closed.
    pub async fn share(
        &self,
        round: u64,
        id: &str,
        shares: ShareKeys,
        until: Instant,
    ) -> Result<Vec<EncryptedShare>, Status> {
        let (agent, bytes) = (shares.agent, shares.wire_bytes() as u64);
        let take = |st: &mut Step| match st {
            Step::Shares(server, _) => server.receive(shares).map_err(refused),
            _ => Err(Status::failed_precondition("the share step is closed")),
        };
        match self.answer(round, id, agent, bytes, take, until).await? {
            Output::Inbox(inbox) => Ok(inbox),
            _ => Err(Status::internal("step output")),
        }
    }

    /// Step 2: `id`'s masked input (added to the running sum at once; the input itself is
    /// not kept); who survived once the step closed.
    pub async fn masked(
        &self,
        round: u64,
        id: &str,
        input: MaskedInput,
        until: Instant,
    ) -> Result<Arc<UnmaskRequest>, Status> {
        let (agent, bytes) = (input.agent, input.wire_bytes() as u64);
        let take = |st: &mut Step| match st {
            Step::Masked(server, _) => server.receive(input).map_err(refused),
            _ => Err(Status::failed_precondition(
                "the masked-input step is closed",
            )),
        };
        match self.answer(round, id, agent, bytes, take, until).await? {
            Output::Unmask(r) => Ok(r),
            _ => Err(Status::internal("step output")),
        }
    }

    /// Step 3: `id`'s revealed shares. Nothing to wait for.
    pub fn unmask(&self, round: u64, id: &str, shares: UnmaskResponse) -> Result<(), Status> {
        let (agent, bytes) = (shares.agent, shares.wire_bytes() as u64);
        let take = |st: &mut Step| match st {
            Step::Unmask(server, _) => server.receive(shares).map_err(refused),
            _ => Err(Status::failed_precondition("the unmask step is closed")),
        };
        self.take(round, id, agent, bytes, take).map(|_| ())
    }

    /// Feeds one agent's message to the current step, then waits for the step to close;
    /// what the agent gets from it.
    async fn answer(
        &self,
        round: u64,
        id: &str,
        agent: u32,
        bytes: u64,
        take: impl FnOnce(&mut Step) -> Result<(), Status>,
        until: Instant,
    ) -> Result<Output, Status> {
        let step = self.take(round, id, agent, bytes, take)?;
        self.wait(round, step, agent, until).await
    }

    /// Feeds one agent's message to the current step; returns the step's number.
    fn take(
        &self,
        round: u64,
        id: &str,
        agent: u32,
        bytes: u64,
        take: impl FnOnce(&mut Step) -> Result<(), Status>,
    ) -> Result<u8, Status> {
        let mut guard = self.lock();
        let s = Self::session_for(&mut guard, round, id, agent)?;
        let step = s.step.number();
        if step > 0 && !s.waiting_for.contains(&agent) {
            return Err(Status::failed_precondition(
                "not part of this step (counted as dropped)",
            ));
        }
        take(&mut s.step)?;
        s.answered.insert(agent);
        s.bytes_up += bytes;
        Ok(step)
    }

    /// Waits until step `step` of `round` closed; what agent `agent` gets from it.
    async fn wait(
        &self,
        round: u64,
        step: u8,
        agent: u32,
        until: Instant,
    ) -> Result<Output, Status> {
        let mut rx = self.progress.subscribe();
        let closed = rx.wait_for(|&(r, st)| r != round || st > step);
        if !matches!(
            tokio::time::timeout_at(until.into(), closed).await,
            Ok(Ok(_))
        ) {
            return Err(Status::deadline_exceeded("the step did not close in time"));
        }
        let guard = self.lock();
        let s = guard
            .as_ref()
            .filter(|s| s.round == round)
            .ok_or_else(|| Status::aborted("the round was abandoned"))?;
        match &s.step {
            Step::Shares(_, dir) if step == 0 => Ok(Output::Directory(dir.clone())),
            Step::Masked(_, inboxes) if step == 1 => Ok(Output::Inbox(
                inboxes.get(&agent).cloned().unwrap_or_default(),
            )),
            Step::Unmask(_, req) if step == 2 => Ok(Output::Unmask(req.clone())),
            Step::Done(Some(why)) => Err(Status::aborted(format!("round abandoned: {why}"))),
            _ => Err(Status::aborted("the session moved on without this agent")),
        }
    }

    /// Bytes the session received, for the round record.
    pub fn bytes_up(&self, round: u64) -> u64 {
        self.lock()
            .as_ref()
            .filter(|s| s.round == round)
            .map_or(0, |s| s.bytes_up)
    }

    /// Packed bytes of one masked input this round.
    pub fn masked_bytes(&self, round: u64) -> Option<u64> {
        self.lock()
            .as_ref()
            .filter(|s| s.round == round)
            .map(|s| ring::packed_len(s.config.len, s.config.ring_bits) as u64)
    }

    /// Closes steps whose answers are in or whose time is up. `selected`: the agents the
    /// open round still counts on; `keys_until`: when step 0 stops waiting for them.
    /// Returns the outcome once the last step closed: the mean step, or why the round
    /// must be abandoned.
    pub fn tick(
        &self,
        round: u64,
        selected: &BTreeSet<String>,
        keys_until: Instant,
        now: Instant,
    ) -> Option<Result<SecureOutcome, String>> {
        let mut guard = self.lock();
        let s = guard.as_mut().filter(|s| s.round == round)?;
        let timeout = Duration::from_secs(self.config.step_timeout_secs);
        let outcome = loop {
            let all_in = match s.step {
                Step::Keys(_) => selected
                    .iter()
                    .all(|id| s.index.get(id).is_some_and(|i| s.answered.contains(i))),
                Step::Done(_) => return None,
                _ => s.waiting_for.is_subset(&s.answered),
            };
            let late = match s.step {
                Step::Keys(_) => now >= keys_until,
                _ => now >= s.step_opened + timeout,
            };
            if !(all_in || late) {
                return None;
            }
            match advance(s, now) {
                Ok(None) => {
                    self.progress.send_replace((round, s.step.number()));
                    continue;
                }
                Ok(Some(out)) => break Ok(out),
                Err(why) => break Err(why),
            }
        };
        let result = outcome.and_then(|sum| self.decode(s, sum));
        s.step = Step::Done(result.as_ref().err().cloned());
        self.progress.send_replace((round, 4));
        Some(result)
    }

    /// The survivors' mean delta from the revealed sum, and the next round's clips.
    fn decode(
        &self,
        s: &Session,
        sum: fedmicse_secagg::Aggregate,
    ) -> Result<SecureOutcome, String> {
        let n = sum.survivors.len();
        let signed = sum.signed();
        let levels = ((1u64 << (s.params.value_bits - 1)) - 1) as f64;
        let mut at = 0;
        let mut step = TensorMap::new();
        for ((name, shape), clip) in s.tensors.iter().zip(&s.params.clips) {
            let len: usize = shape.iter().product();
            let unit = *clip as f64 / levels / n as f64;
            let data = signed[at..at + len]
                .iter()
                .map(|&v| (v as f64 * unit) as f32)
                .collect();
            step.insert(name.clone(), HostTensor::new(shape.clone(), data));
            at += len;
        }
        let stats = &signed[at..];
        let next: Vec<f32> = s
            .params
            .clips
            .iter()
            .zip(stats)
            .map(|(clip, &st)| {
                let mean_ratio = st as f64 / n as f64 / levels * STAT_RANGE;
                // A tensor nobody moved keeps its clip.
                if mean_ratio > 0.0 {
                    (*clip as f64 * mean_ratio) as f32
                } else {
                    *clip
                }
            })
            .collect();
        *self.clips.lock().unwrap_or_else(|p| p.into_inner()) = next;
        tracing::info!(
            round = s.round,
            survivors = n,
            "secure sum revealed (no single update seen)"
        );
        Ok(SecureOutcome {
            step,
            clients: n as u32,
        })
    }

    /// Ends any session (the coordinator is stopping): agents waiting in a step are told
    /// the round was abandoned at once, rather than holding the shutdown up.
    pub fn stop(&self) {
        *self.lock() = None;
        self.progress.send_modify(|(round, step)| {
            *round = round.wrapping_add(1);
            *step = 0;
        });
    }

    /// Ends the session of `round` (the round was abandoned or committed).
    pub fn end(&self, round: u64) {
        let mut guard = self.lock();
        if guard.as_ref().is_some_and(|s| s.round == round) {
            *guard = None;
            self.progress.send_replace((round, 5));
        }
    }
}

/// Who masks with whom among `n` agents, the SecAgg+ half degree (0: everyone), and the
/// Shamir threshold: a strict majority of every holder set, so two disjoint groups can
/// never both rebuild one agent's secrets; and at least 3, so no revealed sum is of two
/// agents (either of whom could subtract its own update from it).
fn neighbourhood(mode: SecureMode, n: usize, seed: [u8; 32]) -> (Neighbourhood, u32, usize) {
    let rule = match mode {
        SecureMode::Secagg => Neighbourhood::Full,
        SecureMode::SecaggPlus => Neighbourhood::logarithmic(n, 1.0, seed),
    };
    let (half_degree, holders) = match &rule {
        Neighbourhood::Sparse { half_degree, .. } => (*half_degree, n.min(2 * half_degree + 1)),
        Neighbourhood::Full => (0, n),
    };
    (rule, half_degree as u32, (holders / 2 + 1).max(3))
}

/// Closes the current step: Ok(None) moved to the next one, Ok(Some) is the final sum.
fn advance(s: &mut Session, now: Instant) -> Result<Option<fedmicse_secagg::Aggregate>, String> {
    let err = |e: fedmicse_secagg::Error| e.to_string();
    let answered = std::mem::take(&mut s.answered);
    s.step_opened = now;
    s.step = match std::mem::replace(&mut s.step, Step::Moving) {
        Step::Keys(server) => {
            let (next, dir) = server.close().map_err(err)?;
            s.waiting_for = answered;
            Step::Shares(next, Arc::new(dir))
        }
        Step::Shares(server, _) => {
            let (next, inboxes) = server.close().map_err(err)?;
            s.waiting_for = answered;
            Step::Masked(next, Arc::new(inboxes))
        }
        Step::Masked(server, _) => {
            let (next, req) = server.close().map_err(err)?;
            s.waiting_for = req.survivors.iter().copied().collect();
            Step::Unmask(next, Arc::new(req))
        }
        Step::Unmask(server, _) => return server.finish().map(Some).map_err(err),
        done => done,
    };
    Ok(None)
}
