//! The client agent beside a data silo: joins the federation with its certificate, and for
//! every round it is selected for pulls the global encoder, trains miCSE on the silo's
//! sentences and sends back the weight delta `Δ = W_local − W_global`. The sentences never
//! leave the machine. Reconnects with backoff when the coordinator is away.

pub mod attack;
pub mod config;
pub mod feedback;
pub mod metrics;
mod secure;

use std::sync::Arc;
use std::time::Duration;

use fedmicse_federation::{TaskConfig, delta, trainable_names};
use fedmicse_runtime::{LocalTrainer, ModelParts, TrainReport};
use fedmicse_tensors::TensorMap;
use fedmicse_wire::client::{Connection, PullError, PulledModel, Target};
use fedmicse_wire::pb::{self, LocalMetrics};
use tokio::sync::{Semaphore, watch};
use tonic::Code;

pub use config::AgentConfig;

/// Why an agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("connecting: {0}")]
    Connect(String),
    #[error("HTTP listen: {0}")]
    Http(String),
    /// The state directory (error-feedback residual) cannot be read or written.
    #[error("state: {0}")]
    State(#[from] fedmicse_tensors::TensorError),
    /// Revoked, not on the allowlist, a certificate the coordinator does not accept.
    #[error("coordinator refused us: {0}")]
    Refused(String),
}

/// What an agent did, for logs and simulations.
#[derive(Debug, Clone, Default)]
pub struct AgentReport {
    pub client_id: String,
    pub rounds_trained: Vec<u64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// An update kept until the coordinator has it, so a coordinator restart costs a resend,
/// not a retraining.
struct Pending {
    round: u64,
    model_digest: Vec<u8>,
    num_samples: u64,
    metrics: LocalMetrics,
    /// The delta the agent wants received: trained − global, plus the carried residual.
    want: Arc<TensorMap>,
    /// Seeds the stochastic rounding of `want` (a resend rounds the same way).
    seed: u64,
}

pub struct Agent {
    target: Target,
    shard: Arc<Vec<String>>,
    /// What trains: burn in the binary, a fake in tests of the agent's logic.
    trainer: Arc<dyn LocalTrainer>,
    retry: config::RetryConfig,
    /// Limits how many agents of a process train at once (simulation mode).
    train_gate: Option<Arc<Semaphore>>,
    name: String,
    http: Option<std::net::SocketAddr>,
    pub metrics: Arc<metrics::AgentMetrics>,
    /// A hostile agent (attack simulations); `None` for every real agent.
    attack: Option<attack::Attack>,
    /// The most this agent accepts in a pulled model (`[limits]`).
    pull_limits: fedmicse_wire::client::PullLimits,
    /// What rounding updates onto the wire's grid dropped, carried to the next round.
    feedback: std::sync::Mutex<feedback::ErrorFeedback>,
}

/// How a round attempt went wrong, and what the agent does about it.
#[derive(Debug)]
pub(crate) enum RoundError {
    /// The coordinator refuses this agent (revoked, not on the allowlist, bad certificate):
    /// the agent stops.
    Permanent(String),
    /// The update was refused for what it holds: resending it cannot help, so it is dropped
    /// and the agent waits for its next round.
    UpdateRefused(String),
    /// Not now (not selected, the round closed or moved on): wait for the next round.
    NotNow(String),
    /// Anything else (network, coordinator busy or restarting, a download cut short):
    /// retried after a backoff while the round is open.
    Temporary(String),
}

impl From<tonic::Status> for RoundError {
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented => {
                RoundError::Permanent(msg)
            }
            Code::InvalidArgument => RoundError::UpdateRefused(msg),
            Code::FailedPrecondition => RoundError::NotNow(msg),
            _ => RoundError::Temporary(msg),
        }
    }
}

/// Capped exponential backoff with jitter. Reset only by progress (an update delivered),
/// not by a Join alone, so a coordinator that answers Join but cannot take updates is not
/// hammered.
struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    fn new(retry: &config::RetryConfig) -> Self {
        let initial = Duration::from_millis(retry.initial_ms.max(1));
        Backoff {
            next: initial,
            initial,
            max: Duration::from_millis(retry.max_ms.max(retry.initial_ms.max(1))),
        }
    }

    /// The next wait: half the current step plus a random share of the other half (agents
    /// that failed together do not retry together), then the step doubles up to the cap.
    fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Aborts a background task when dropped (the heartbeat of a round).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Agent {
    /// An agent for `shard` (already read and sampled) that trains with `trainer`.
    pub fn new(
        config: &AgentConfig,
        shard: Vec<String>,
        trainer: Arc<dyn LocalTrainer>,
    ) -> Result<Self, AgentError> {
        config.validate().map_err(AgentError::Config)?;
        let tls = config.tls.clone();
        Ok(Agent {
            name: config
                .plaintext_client_id
                .clone()
                .or_else(|| {
                    tls.as_ref()
                        .and_then(|t| t.cert.file_stem())
                        .map(|s| s.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| "agent".into()),
            target: Target {
                url: config.coordinator.clone(),
                tls,
                domain: config.domain(),
                plaintext_client_id: config.plaintext_client_id.clone(),
            },
            shard: Arc::new(shard),
            trainer,
            retry: config.retry.clone(),
            train_gate: None,
            http: config.http.listen,
            metrics: Arc::new(metrics::AgentMetrics::new()),
            attack: None,
            pull_limits: (&config.limits).into(),
            feedback: std::sync::Mutex::new(feedback::ErrorFeedback::open(
                config.state_dir.as_deref(),
            )?),
        })
    }

    pub fn with_train_gate(mut self, gate: Arc<Semaphore>) -> Self {
        self.train_gate = Some(gate);
        self
    }

    /// Makes this agent hostile: it trains honestly, then corrupts what it sends
    /// (attack simulations only).
    pub fn with_attack(mut self, a: attack::Attack) -> Self {
        self.attack = Some(a);
        self
    }

    /// The shard size declared at Join (a sample-inflation attacker lies here).
    fn join_shard_size(&self) -> u64 {
        let honest = self.shard.len() as u64;
        self.attack.map_or(honest, |a| a.join_shard_size(honest))
    }

    /// Runs until the federation is done, `stop` is set, or a permanent error (refused
    /// identity) occurs.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<AgentReport, AgentError> {
        if let Some(listen) = self.http {
            let addr = metrics::serve(listen, self.metrics.clone())
                .await
                .map_err(AgentError::Http)?;
            tracing::info!(%addr, "agent HTTP listening (/health, /metrics)");
        }
        let mut conn =
            Connection::new(&self.target).map_err(|e| AgentError::Connect(e.to_string()))?;
        let mut report = AgentReport {
            client_id: self.name.clone(),
            ..Default::default()
        };
        let mut backoff = Backoff::new(&self.retry);
        let mut pending: Option<Pending> = None;
        loop {
            if *stop.borrow() {
                return Ok(report);
            }
            let wait = match conn.join(self.join_shard_size()).await {
                Err(status) => match RoundError::from(status) {
                    RoundError::Permanent(why) => return Err(AgentError::Refused(why)),
                    e => {
                        let w = backoff.next_wait();
                        tracing::warn!(agent = %self.name, error = ?e, retry_in_ms = w.as_millis() as u64, "coordinator unreachable");
                        w
                    }
                },
                Ok(resp) => {
                    report.client_id = resp.client_id.clone();
                    let poll = Duration::from_millis(resp.poll_after_ms.max(50) as u64);
                    match pb::Phase::try_from(resp.phase).unwrap_or(pb::Phase::Unspecified) {
                        pb::Phase::Done => {
                            tracing::info!(agent = %report.client_id, rounds = ?report.rounds_trained, "federation finished");
                            return Ok(report);
                        }
                        pb::Phase::Training if resp.selected => {
                            match self
                                .round(&mut conn, &resp, &mut pending, &mut report)
                                .await
                            {
                                Ok(()) => {
                                    backoff.reset();
                                    Duration::ZERO
                                }
                                Err(RoundError::Permanent(why)) => {
                                    return Err(AgentError::Refused(why));
                                }
                                Err(RoundError::UpdateRefused(why)) => {
                                    self.metrics.failures.inc();
                                    tracing::error!(agent = %report.client_id, round = resp.round, reason = %why, "the coordinator refused this update; it is dropped and the agent waits for its next round");
                                    pending.take();
                                    poll
                                }
                                Err(RoundError::NotNow(why)) => {
                                    tracing::info!(agent = %report.client_id, round = resp.round, reason = %why, "not taken in this round; waiting for the next");
                                    poll
                                }
                                Err(RoundError::Temporary(why)) => {
                                    self.metrics.failures.inc();
                                    let w = backoff.next_wait();
                                    tracing::warn!(agent = %report.client_id, round = resp.round, error = %why, retry_in_ms = w.as_millis() as u64, "round failed; will retry while it is open");
                                    w
                                }
                            }
                        }
                        _ => poll,
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One selected round: pull, train (or reuse a pending update for the same model), submit.
    async fn round(
        &self,
        conn: &mut Connection,
        resp: &pb::JoinResponse,
        pending: &mut Option<Pending>,
        report: &mut AgentReport,
    ) -> Result<(), RoundError> {
        let _heartbeat = self.heartbeat(conn, resp);
        let task = resp
            .task
            .as_ref()
            .ok_or_else(|| "selected without a task".to_string())
            .and_then(TaskConfig::try_from)
            .map_err(|e| refuse(&report.client_id, resp.round, "task", e))?;
        let reusable = pending
            .as_ref()
            .is_some_and(|p| p.round == resp.round && p.model_digest == resp.model_digest);
        if !reusable {
            *pending = Some(self.pull_and_train(conn, resp, &task, report).await?);
        }
        let p = pending.as_ref().expect("pending update");
        let (bytes, residual, reply) = match &resp.secure {
            Some(params) => {
                let sent = secure::submit(conn, resp.round, params, &p.want, p.seed).await?;
                (
                    sent.bytes,
                    sent.residual,
                    format!("in the secure sum of {} agents", sent.summed),
                )
            }
            None => {
                let (bytes, residual, r) = self.submit_plain(conn, p, task.update_dtype).await?;
                (bytes, residual, r.message)
            }
        };
        report.bytes_up += bytes;
        report.rounds_trained.push(p.round);
        *pending = None;
        self.keep_residual(residual);
        self.metrics.bytes_up.inc_by(bytes);
        self.metrics.rounds.inc();
        tracing::info!(agent = %report.client_id, round = resp.round, bytes, reply = %reply, "update sent");
        Ok(())
    }

    /// Sends the update in the clear (over mTLS), rounded onto the task's element type.
    /// Returns the bytes sent, the rounding's residual and the coordinator's answer.
    async fn submit_plain(
        &self,
        conn: &mut Connection,
        p: &Pending,
        dtype: fedmicse_wire::ElementType,
    ) -> Result<(u64, TensorMap, pb::SubmitResponse), RoundError> {
        let rounded = feedback::ErrorFeedback::round(&p.want, dtype, p.seed);
        let bytes = fedmicse_wire::tensors::total_bytes_as(&rounded.sent, dtype);
        let (num_samples, delta) = attack::before_submit(
            self.attack,
            &self.target,
            p.round,
            p.num_samples,
            p.metrics,
            &Arc::new(rounded.sent),
            dtype,
        )
        .await?;
        let r = conn
            .submit_as(p.round, num_samples, p.metrics, delta, dtype)
            .await?;
        Ok((bytes, rounded.residual, r))
    }

    /// Carries an accepted update's rounding residual to the next round. A failed write
    /// is logged and counted, and the residual kept in memory; the update itself is in.
    fn keep_residual(&self, residual: TensorMap) {
        let mut ef = self.feedback.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = ef.commit(residual) {
            self.metrics.failures.inc();
            tracing::error!(agent = %self.name, error = %e, "could not keep the error-feedback residual on disk");
        }
    }

    /// While this agent pulls, trains and uploads it tells the coordinator it is alive, so a
    /// dead agent is told apart from a slow one within a few polls. Stops when dropped.
    fn heartbeat(&self, conn: &Connection, resp: &pb::JoinResponse) -> AbortOnDrop {
        let mut hb = conn.clone();
        let shard_size = self.join_shard_size();
        let every = Duration::from_millis(resp.poll_after_ms.max(100) as u64);
        AbortOnDrop(
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let _ = hb.join(shard_size).await;
                }
            })
            .abort_handle(),
        )
    }

    /// Pulls the round's model, checks it is the announced one, and trains on the shard
    /// (at most `train_gate` agents of a process at once).
    async fn pull_and_train(
        &self,
        conn: &mut Connection,
        resp: &pb::JoinResponse,
        task: &TaskConfig,
        report: &mut AgentReport,
    ) -> Result<Pending, RoundError> {
        let pulled = conn
            .pull_with(resp.round, &self.pull_limits)
            .await
            .map_err(|e| match e {
                PullError::Status(s) => RoundError::from(s),
                // Beyond this agent's limits, or not what its own header declared.
                PullError::Refused(why) => refuse(&report.client_id, resp.round, "model", why),
            })?;
        check_pulled(&pulled, resp)
            .map_err(|e| refuse(&report.client_id, resp.round, "model", e))?;
        report.bytes_down += pulled.bytes;
        self.metrics.bytes_down.inc_by(pulled.bytes);
        tracing::info!(agent = %report.client_id, round = resp.round, bytes = pulled.bytes, "pulled the global model");
        let seed = round_seed(task.seed, &report.client_id, resp.round);
        let (shard, trainer, task2) = (self.shard.clone(), self.trainer.clone(), task.clone());
        let _permit = match &self.train_gate {
            Some(g) => Some(
                g.clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| RoundError::Temporary(e.to_string()))?,
            ),
            None => None,
        };
        let (delta, metrics) = tokio::task::spawn_blocking(move || {
            train_round(trainer.as_ref(), pulled, &shard, &task2, seed)
        })
        .await
        .map_err(|e| RoundError::Temporary(e.to_string()))?
        .map_err(|e| RoundError::Temporary(e.to_string()))?;
        tracing::info!(agent = %report.client_id, round = resp.round, steps = metrics.steps, mean_loss = metrics.mean_loss, seconds = format!("{:.1}", metrics.seconds), "trained locally");
        self.metrics.steps.inc_by(metrics.steps as u64);
        self.metrics.loss.set(metrics.mean_loss);
        let rows = (metrics.steps as f64) * (task.batch_size as f64).min(self.shard.len() as f64);
        if metrics.seconds > 0.0 {
            self.metrics
                .sentences_per_second
                .set(rows / metrics.seconds);
        }
        let want = self
            .feedback
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .carry(&delta);
        Ok(Pending {
            round: resp.round,
            model_digest: resp.model_digest.clone(),
            num_samples: self.shard.len() as u64,
            metrics,
            want: Arc::new(want),
            seed,
        })
    }
}

/// A task or model the agent will not train on: logged as an error with the reason; the
/// round fails (counted in `failures`, retried after a backoff while it is open).
fn refuse(agent: &str, round: u64, what: &str, reason: String) -> RoundError {
    tracing::error!(agent, round, refused = what, %reason, "refusing what the coordinator sent");
    RoundError::Temporary(format!("refused the {what}: {reason}"))
}

/// The pulled model must be the one the Join answer announced: the global model the open
/// round `resp.round` starts from (committed as round `resp.round - 1`), with its digest.
fn check_pulled(pulled: &PulledModel, resp: &pb::JoinResponse) -> Result<(), String> {
    if pulled.digest != resp.model_digest {
        return Err(format!(
            "its digest {} is not the {} announced for round {}",
            hex(&pulled.digest),
            hex(&resp.model_digest),
            resp.round
        ));
    }
    if pulled.round.checked_add(1) != Some(resp.round) {
        return Err(format!(
            "it is the model of round {}, but round {} starts from round {}",
            pulled.round,
            resp.round,
            resp.round.wrapping_sub(1)
        ));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Distinct seeds per agent and round (dropout masks, AMI samples, batch order).
fn round_seed(base: u64, id: &str, round: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    base ^ h ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Trains the pulled model on the shard and returns the delta of the trainable tensors.
fn train_round(
    trainer: &dyn LocalTrainer,
    pulled: PulledModel,
    shard: &[String],
    task: &TaskConfig,
    seed: u64,
) -> Result<(TensorMap, LocalMetrics), fedmicse_runtime::RuntimeError> {
    let global = pulled.tensors;
    let names = trainable_names(&global, &task.trainable);
    let start = ModelParts {
        tensors: &global,
        files: &pulled.files,
    };
    let (trained, report) = trainer.train(start, shard, task, seed)?;
    Ok((delta(&trained, &global, &names), local_metrics(report)))
}

fn local_metrics(r: TrainReport) -> LocalMetrics {
    LocalMetrics {
        steps: r.steps,
        mean_loss: r.mean_loss,
        last_loss: r.last_loss,
        mean_ami: r.mean_ami,
        seconds: r.seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets_only_on_progress() {
        let mut b = Backoff::new(&config::RetryConfig {
            initial_ms: 100,
            max_ms: 1000,
        });
        let steps = [100u64, 200, 400, 800, 1000, 1000];
        for step in steps {
            let w = b.next_wait().as_millis() as u64;
            assert!((step / 2..=step).contains(&w), "{w} ms for step {step}");
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
        // Jitter: agents that failed together do not all retry at the same instant.
        let waits: std::collections::BTreeSet<u128> = (0..20)
            .map(|_| {
                b.reset();
                b.next_wait().as_micros()
            })
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }

    #[test]
    fn status_codes_map_to_what_the_agent_does() {
        use tonic::Status;
        let kind = |s: Status| match RoundError::from(s) {
            RoundError::Permanent(_) => "stop",
            RoundError::UpdateRefused(_) => "drop the update",
            RoundError::NotNow(_) => "wait for the next round",
            RoundError::Temporary(_) => "retry with backoff",
        };
        assert_eq!(kind(Status::permission_denied("revoked")), "stop");
        assert_eq!(kind(Status::unauthenticated("no cert")), "stop");
        assert_eq!(
            kind(Status::failed_precondition("not selected")),
            "wait for the next round"
        );
        assert_eq!(kind(Status::invalid_argument("nan")), "drop the update");
        assert_eq!(kind(Status::unavailable("disk full")), "retry with backoff");
        assert_eq!(
            kind(Status::resource_exhausted("busy")),
            "retry with backoff"
        );
        assert_eq!(kind(Status::data_loss("digest")), "retry with backoff");
    }
}
