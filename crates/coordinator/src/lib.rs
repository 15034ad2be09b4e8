//! The coordinator daemon: runs federation rounds over mutual-TLS gRPC, aggregates
//! agents' weight deltas with FedAvg, commits a HuggingFace checkpoint after every round,
//! evaluates it on an STS dev file and serves embeddings from the newest global model.

pub mod config;
mod http;
mod inference;
mod limits;
mod metrics;
pub mod pending;
mod revoke;
pub mod rounds;
mod service;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use fedmicse_encoder::{Encoder, parse_device};
use fedmicse_federation::{
    ServerHyper, ServerState, StepRefusal, bound_influence, check_step, server_step,
    trainable_names,
};
use fedmicse_training::run::DevSet;
use fedmicse_wire::pb::federation_server::FederationServer;
use fedmicse_wire::pb::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

pub use config::CoordinatorConfig;
use rounds::{OpenRound, Phase, State};
pub use store::{GlobalModel, RoundRecord, Store};

/// What handlers and the round driver share.
pub(crate) struct Shared {
    config: CoordinatorConfig,
    store: Store,
    pending: pending::Pending,
    revocations: revoke::Revocations,
    /// The server optimizer's moments (FedAvgM, FedAdam), committed with each round.
    server_state: std::sync::Mutex<ServerState>,
    /// The base model's encoder: tokenizer and config for building inference encoders.
    template: Encoder,
    dev: Option<DevSet>,
    state: std::sync::Mutex<State>,
    global: ArcSwap<GlobalModel>,
    /// The newest global model as an encoder, with its round (None until first built).
    serving: ArcSwap<Option<(u64, Arc<Encoder>)>>,
    wake: Notify,
    uploads: Semaphore,
    downloads: Arc<Semaphore>,
    /// Agents with an upload / a download in flight (one each at most).
    uploads_in_flight: limits::InFlight,
    downloads_in_flight: limits::InFlight,
    /// What the gRPC and HTTP listeners closed (over the cap, idle).
    grpc_conns: Arc<fedmicse_wire::listen::ConnCounters>,
    http_conns: Arc<fedmicse_wire::listen::ConnCounters>,
    inference_permits: Semaphore,
    metrics: metrics::Metrics,
    done_tx: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A coordinator ready to serve.
pub struct Coordinator {
    shared: Arc<Shared>,
}

/// A serving coordinator.
pub struct Running {
    pub addr: SocketAddr,
    /// Where /health, /ready and /metrics are served, if configured.
    pub http_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    driver: tokio::task::JoinHandle<()>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl Coordinator {
    /// Loads the base model and the store (resuming from the last commit if there is one).
    /// Blocking: call from a blocking context.
    pub fn new(config: CoordinatorConfig) -> Result<Self, String> {
        config.validate()?;
        let device = parse_device(&config.federation.device).map_err(|e| e.to_string())?;
        let template = Encoder::load(&config.federation.model, &device)
            .map_err(|e| format!("model {}: {e}", config.federation.model.display()))?;
        let store = Store::open(
            &config.federation.state_dir,
            config.federation.keep_checkpoints,
        )?;
        let dev = match &config.eval.dev_file {
            Some(p) => {
                let mut d = DevSet::load(p).map_err(|e| format!("eval.dev_file: {e}"))?;
                if config.eval.max_pairs > 0 {
                    d.pairs.truncate(config.eval.max_pairs);
                }
                Some(d)
            }
            None => None,
        };
        let pending = pending::Pending::open(&config.federation.state_dir)?;
        let (global, history, fresh, server_state) = match store.load()? {
            Some((model, history, server_state)) => {
                tracing::info!(
                    round = model.round,
                    "resuming from the last committed round"
                );
                (model, history, false, server_state)
            }
            None => {
                let mut tensors = template.tensors().map_err(|e| e.to_string())?;
                let head_dir = &config.federation.model;
                let head_file = head_dir.join("training_head.safetensors");
                if head_file.is_file() {
                    tensors.extend(
                        fedmicse_encoder::weights::read_safetensors_map(&head_file)
                            .map_err(|e| e.to_string())?,
                    );
                } else {
                    tensors.extend(store::seeded_head(
                        template.config.hidden_size,
                        config.federation.seed,
                    ));
                }
                let files = template.files().map_err(|e| e.to_string())?;
                (
                    GlobalModel::new(0, tensors, files),
                    Vec::new(),
                    true,
                    ServerState::default(),
                )
            }
        };
        // Updates of rounds already committed are stale; those of the next round were
        // accepted before a crash and count when it reopens.
        pending.clear_through(global.round);
        let recovered = pending.list(global.round + 1);
        if !recovered.is_empty() {
            tracing::info!(
                round = global.round + 1,
                updates = recovered.len(),
                clients = ?recovered.iter().map(|r| r.client.as_str()).collect::<Vec<_>>(),
                "recovered accepted updates of the interrupted round"
            );
        }
        // Fail now, not at the first round, if the task does not fit the model.
        let names = trainable_names(&global.tensors, &config.task.trainable);
        if names.is_empty() {
            return Err(format!(
                "task.trainable {:?} matches no tensor of the model",
                config.task.trainable
            ));
        }
        let next = global.round + 1;
        // Who was selected for the interrupted round: it waits a grace period for them to
        // come back before reopening, and takes them back whenever they return.
        let selected_before = if fresh {
            Default::default()
        } else {
            pending.load_selected(next)
        };
        let grace_until = (!selected_before.is_empty())
            .then(|| Instant::now() + config.federation.restart_grace());
        if !selected_before.is_empty() {
            tracing::info!(
                round = next,
                selected = ?selected_before,
                grace_ms = config.federation.restart_grace().as_millis() as u64,
                "waiting for the agents selected before the restart"
            );
        }
        let phase = if global.round >= config.federation.rounds {
            Phase::Done
        } else {
            Phase::Waiting { next }
        };
        let (done_tx, _) = watch::channel(matches!(phase, Phase::Done));
        let shared = Arc::new(Shared {
            uploads: Semaphore::new(config.federation.max_concurrent_uploads),
            downloads: Arc::new(Semaphore::new(config.federation.max_concurrent_downloads)),
            uploads_in_flight: Default::default(),
            downloads_in_flight: Default::default(),
            grpc_conns: Default::default(),
            http_conns: Default::default(),
            inference_permits: Semaphore::new(config.inference.max_concurrent.max(1)),
            state: std::sync::Mutex::new(State {
                phase,
                agents: HashMap::new(),
                history,
                refused_total: BTreeMap::new(),
                abandoned_rounds: 0,
                closed: None,
                recovered,
                selected_before,
                grace_until,
            }),
            global: ArcSwap::from_pointee(global),
            serving: ArcSwap::from_pointee(None),
            wake: Notify::new(),
            metrics: metrics::Metrics::new(),
            done_tx,
            store,
            pending,
            revocations: revoke::Revocations::new(
                config.tls.as_ref().and_then(|t| t.revocation_list.clone()),
            ),
            server_state: std::sync::Mutex::new(server_state),
            template,
            dev,
            config,
        });
        // Serve (and evaluate) the current model; round 0 is committed on a fresh start so a
        // restart before the first round finds it.
        let global = shared.global.load_full();
        let encoder = Arc::new(
            shared
                .template
                .with_tensors(global.encoder_tensors())
                .map_err(|e| e.to_string())?,
        );
        if fresh {
            let stsb_dev = evaluate(&shared, &encoder);
            let record = RoundRecord {
                round: 0,
                clients: 0,
                mean_loss: None,
                stsb_dev,
                bytes_up: 0,
                bytes_down: 0,
                seconds: 0.0,
                refused: BTreeMap::new(),
                bounded: 0,
                step_ratio: None,
                digest: None,
            };
            shared
                .store
                .commit(&global, &ServerState::default(), &record, &[])?;
            shared.lock().history.push(record);
        }
        shared
            .serving
            .store(Arc::new(Some((global.round, encoder))));
        Ok(Coordinator { shared })
    }

    /// Serves on `listener` until [`Running::shutdown`].
    pub async fn serve(self, listener: TcpListener) -> Result<Running, String> {
        let shared = self.shared;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let srv = &shared.config.server;
        let mut builder = tonic::transport::Server::builder()
            // Long local training leaves connections idle: keep them alive (the pings also
            // keep honest connections clear of the idle timeout).
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .max_concurrent_streams(Some(64));
        if let Some(tls) = &shared.config.tls {
            let files = fedmicse_wire::TlsFiles {
                ca: tls.ca.clone(),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
            };
            let handshake = Duration::from_secs(srv.tls_handshake_timeout_secs);
            builder = builder
                .tls_config(
                    files
                        .server_config()
                        .map_err(|e| e.to_string())?
                        .timeout(handshake),
                )
                .map_err(|e| format!("TLS: {e}"))?;
        } else {
            tracing::warn!(
                "serving PLAINTEXT without client certificates (server.allow_plaintext): local experiments only"
            );
        }
        let federation = FederationServer::new(service::FederationService::new(shared.clone()))
            .max_decoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES);
        let inference = InferenceServer::new(inference::InferenceService::new(shared.clone()))
            .max_decoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(64 << 20);
        let (stop, mut stop_rx) = watch::channel(false);
        let mut stop_rx2 = stop.subscribe();
        let limits = fedmicse_wire::listen::ConnLimits {
            max_connections: srv.max_connections,
            idle: Duration::from_secs(srv.connection_idle_secs),
        };
        let incoming =
            fedmicse_wire::listen::limited_incoming(listener, limits, shared.grpc_conns.clone());
        let router = builder
            .layer(limits::CallTimeoutLayer {
                unary: Duration::from_secs(srv.call_timeout_secs),
            })
            .add_service(federation)
            .add_service(inference);
        let server = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await
        });
        let http_addr = match shared.config.http.listen {
            Some(listen) => {
                let l = TcpListener::bind(listen)
                    .await
                    .map_err(|e| format!("HTTP listen {listen}: {e}"))?;
                let a = l.local_addr().map_err(|e| e.to_string())?;
                let app = http::router(shared.clone());
                let mut stop_http = stop.subscribe();
                let h = &shared.config.http;
                let limits = fedmicse_wire::listen::ConnLimits {
                    max_connections: h.max_connections,
                    idle: Duration::from_secs(h.idle_secs),
                };
                tokio::spawn(fedmicse_wire::listen::serve_http(
                    l,
                    app,
                    limits,
                    Duration::from_secs(h.header_timeout_secs),
                    shared.http_conns.clone(),
                    async move {
                        let _ = stop_http.wait_for(|s| *s).await;
                    },
                ));
                tracing::info!(addr = %a, embeddings_api = shared.config.http.embeddings_api, "HTTP listening (/health, /ready, /metrics)");
                Some(a)
            }
            None => None,
        };
        let driver_shared = shared.clone();
        let driver = tokio::spawn(async move {
            tokio::select! {
                _ = drive(driver_shared) => {}
                _ = stop_rx2.wait_for(|s| *s) => {}
            }
        });
        tracing::info!(%addr, tls = shared.config.tls.is_some(), "coordinator listening");
        Ok(Running {
            addr,
            http_addr,
            shared,
            stop,
            server,
            driver,
        })
    }
}

impl Running {
    /// Resolves when every round is committed.
    pub async fn wait_done(&self) {
        let mut rx = self.shared.done_tx.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// The round log so far (round 0 is the starting model).
    pub fn history(&self) -> Vec<RoundRecord> {
        self.shared.lock().history.clone()
    }

    /// The newest committed global model.
    pub fn global(&self) -> Arc<GlobalModel> {
        self.shared.global.load_full()
    }

    /// Directory of a committed round's checkpoint.
    pub fn checkpoint_dir(&self, round: u64) -> std::path::PathBuf {
        self.shared.store.checkpoint_dir(round)
    }

    /// Refusals by check, since start.
    pub fn refusals(&self) -> BTreeMap<String, u64> {
        self.shared.lock().refused_total.clone()
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.driver.await;
        match self.server.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "server stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "server task failed"),
            Ok(Ok(())) => {}
        }
    }
}

/// Spearman ×100 of an encoder on the dev set, or None without one (or on failure, logged).
fn evaluate(shared: &Shared, encoder: &Encoder) -> Option<f64> {
    let dev = shared.dev.as_ref()?;
    match dev.score(encoder) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "evaluation failed");
            None
        }
    }
}

enum Action {
    Nothing,
    Close(Box<OpenRound>),
}

/// What became of a closed round.
enum Commit {
    Committed,
    /// The aggregate failed its checks: nothing was committed.
    Refused(StepRefusal),
}

/// The round driver: opens rounds when enough agents are connected, closes them when all
/// selected agents answered or the deadline passed, and commits.
async fn drive(shared: Arc<Shared>) {
    let f = shared.config.federation.clone();
    let timeout = Duration::from_secs(f.agent_timeout_secs);
    let revoked = |id: &str, serial: &str| shared.revocations.is_revoked(id, serial);
    let allowed = |id: &str| f.allowlist.is_empty() || f.allowlist.iter().any(|a| a == id);
    // After a failed commit (a full disk, say): how long to wait before trying again.
    let mut commit_backoff = Duration::ZERO;
    loop {
        let action = {
            let mut guard = shared.lock();
            let st: &mut State = &mut guard;
            let connected = st.connected(timeout, revoked);
            // After a restart, the round reopens once everyone selected before is back or
            // the grace period is over, whichever comes first.
            let in_grace = st.grace_until.is_some_and(|t| Instant::now() < t)
                && !st.selected_before.iter().all(|id| connected.contains(id));
            match &mut st.phase {
                Phase::Done => return,
                Phase::Waiting { next } if connected.len() >= f.min_clients && !in_grace => {
                    let round = *next;
                    let mut selected =
                        rounds::select(&connected, f.fraction, f.min_clients, f.seed, round);
                    st.grace_until = None;
                    let selected_before: BTreeSet<String> = std::mem::take(&mut st.selected_before)
                        .into_iter()
                        .filter(|id| {
                            let serial = st.agents.get(id).map_or("", |a| a.serial.as_str());
                            allowed(id) && !revoked(id, serial)
                        })
                        .collect();
                    selected.extend(
                        selected_before
                            .iter()
                            .filter(|id| connected.contains(id))
                            .cloned(),
                    );
                    // Updates accepted before a restart (or an abandoned attempt) count;
                    // their senders are selected — unless no longer allowed or revoked.
                    let recovered: Vec<pending::Stored> = std::mem::take(&mut st.recovered)
                        .into_iter()
                        .filter(|r| {
                            let ok = allowed(&r.client) && !revoked(&r.client, &r.serial);
                            if !ok {
                                tracing::warn!(client = %r.client, "recovered update dropped: the agent is no longer allowed");
                                shared.pending.discard(&r.path);
                            }
                            ok
                        })
                        .collect();
                    selected.extend(recovered.iter().map(|r| r.client.clone()));
                    let global = shared.global.load();
                    let expected: BTreeMap<String, Vec<usize>> =
                        trainable_names(&global.tensors, &shared.config.task.trainable)
                            .into_iter()
                            .map(|n| {
                                let shape = global.tensors[&n].shape.clone();
                                (n, shape)
                            })
                            .collect();
                    let deadline = Duration::from_secs(f.round_deadline_secs);
                    tracing::info!(round, selected = ?selected, connected = connected.len(), "round opened");
                    // Kept on disk, so a restart reopens the round for the same agents.
                    shared
                        .pending
                        .save_selected(round, &selected.union(&selected_before).cloned().collect());
                    st.phase = Phase::Training(Box::new(OpenRound {
                        round,
                        selected,
                        failed: Default::default(),
                        selected_before,
                        submitted: recovered
                            .into_iter()
                            .map(|r| (r.client.clone(), r))
                            .collect(),
                        expected: Arc::new(expected),
                        opened: Instant::now(),
                        deadline: Instant::now() + deadline,
                        deadline_unix_ms: unix_ms(SystemTime::now() + deadline),
                        bytes_up: 0,
                        bytes_down: 0,
                        refused: BTreeMap::new(),
                    }));
                    Action::Nothing
                }
                Phase::Training(open) => {
                    // Revocation takes effect in the open round too: a revoked agent is no
                    // longer waited for, and an update it sent before does not count.
                    let gone: Vec<String> = open
                        .selected
                        .iter()
                        .filter(|id| {
                            let serial = st.agents.get(*id).map_or("", |a| a.serial.as_str());
                            let serial = open
                                .submitted
                                .get(*id)
                                .map_or(serial, |u| u.serial.as_str());
                            revoked(id, serial)
                        })
                        .cloned()
                        .collect();
                    for id in gone {
                        if let Some(u) = open.drop_agent(&id) {
                            shared.pending.discard(&u.path);
                        }
                        tracing::warn!(client = %id, round = open.round, "revoked agent dropped from the round");
                    }
                    // Liveness: agents send a heartbeat while they train; a selected agent
                    // silent for the agent timeout is gone, and the round stops waiting.
                    let silent: Vec<String> = open
                        .selected
                        .iter()
                        .filter(|id| {
                            open.awaits(id)
                                && st
                                    .agents
                                    .get(*id)
                                    .is_none_or(|a| a.last_seen.elapsed() > timeout)
                        })
                        .cloned()
                        .collect();
                    for id in silent {
                        open.drop_agent(&id);
                        shared.metrics.agents_dropped.inc();
                        tracing::warn!(client = %id, round = open.round, timeout_secs = timeout.as_secs(), "agent silent past the agent timeout: dropped from the round");
                    }
                    // Slots of dropped agents go to connected agents the round has not
                    // selected, so a round can still reach min_clients without waiting for
                    // its deadline.
                    // (An agent whose update was refused keeps its slot: it may still send a
                    // corrected one while the round is open.)
                    let live = open.selected.len();
                    if live < f.min_clients {
                        let candidates: Vec<String> = connected
                            .iter()
                            .filter(|id| !open.selected.contains(*id))
                            .cloned()
                            .collect();
                        let need = f.min_clients - live;
                        let added = rounds::select(&candidates, 0.0, need, f.seed, open.round);
                        if !added.is_empty() {
                            for id in added {
                                tracing::info!(client = %id, round = open.round, "agent selected in place of a dropped one");
                                open.selected.insert(id);
                            }
                            let all = open
                                .selected
                                .union(&open.selected_before)
                                .cloned()
                                .collect();
                            shared.pending.save_selected(open.round, &all);
                        }
                    }
                    let answered = open.submitted.len();
                    let complete = open.is_complete() && answered >= f.min_clients;
                    let late = Instant::now() >= open.deadline;
                    if complete || (late && answered >= f.min_clients) {
                        let round = open.round;
                        let Phase::Training(open) =
                            std::mem::replace(&mut st.phase, Phase::Aggregating { round })
                        else {
                            unreachable!()
                        };
                        st.closed = Some((
                            round,
                            open.submitted
                                .iter()
                                .map(|(id, s)| (id.clone(), s.digest.clone()))
                                .collect(),
                        ));
                        Action::Close(open)
                    } else if late {
                        tracing::warn!(
                            round = open.round,
                            answered,
                            min_clients = f.min_clients,
                            "deadline passed without enough updates: round abandoned, global model unchanged; retrying"
                        );
                        let next = open.round;
                        st.abandoned_rounds += 1;
                        // The updates that did arrive stay valid (same global model): they
                        // count again when the round reopens.
                        let Phase::Training(open) =
                            std::mem::replace(&mut st.phase, Phase::Waiting { next })
                        else {
                            unreachable!()
                        };
                        st.recovered = open.submitted.into_values().collect();
                        Action::Nothing
                    } else {
                        Action::Nothing
                    }
                }
                _ => Action::Nothing,
            }
        };
        if let Action::Close(open) = action {
            let s = shared.clone();
            let result = tokio::task::spawn_blocking(move || {
                let r = commit_round(&s, &open);
                (r, open)
            })
            .await;
            let failure = match result {
                Ok((Ok(Commit::Committed), _)) => {
                    commit_backoff = Duration::ZERO;
                    None
                }
                Ok((Ok(Commit::Refused(why)), open)) => {
                    // The aggregate would have broken the model: it is not committed, the
                    // previous model stays served, and the round is retried with fresh
                    // updates (these ones produced the refused step).
                    tracing::error!(round = open.round, check = why.kind(), reason = %why, "aggregate refused; the round will be retried with new updates");
                    shared.metrics.rounds_refused.inc();
                    for u in open.submitted.values() {
                        shared.pending.discard(&u.path);
                    }
                    let mut st = shared.lock();
                    *st.refused_total
                        .entry(format!("aggregate_{}", why.kind()))
                        .or_default() += 1;
                    st.closed = None;
                    if let Phase::Aggregating { round } = st.phase {
                        st.phase = Phase::Waiting { next: round };
                    }
                    None
                }
                Ok((Err(e), open)) => Some((e, Some(open))),
                Err(e) => Some((e.to_string(), None)),
            };
            if let Some((e, open)) = failure {
                // Capped exponential backoff: a full disk is not fixed by retrying at once.
                commit_backoff = (commit_backoff * 2).clamp(COMMIT_BACKOFF_MIN, COMMIT_BACKOFF_MAX);
                shared.metrics.commit_failures.inc();
                commit_failed(&shared, e, open, commit_backoff);
                tokio::time::sleep(commit_backoff).await;
            }
            continue;
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

const COMMIT_BACKOFF_MIN: Duration = Duration::from_secs(1);
const COMMIT_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Nothing was committed: the previous global model stands. The stored updates stay on
/// disk and count again when the round reopens (after `retry_in`).
fn commit_failed(shared: &Shared, e: String, open: Option<Box<OpenRound>>, retry_in: Duration) {
    tracing::error!(error = %e, retry_in_secs = retry_in.as_secs(), "commit failed; the round will be retried");
    let mut st = shared.lock();
    if let Phase::Aggregating { round } = st.phase {
        st.phase = Phase::Waiting { next: round };
        st.recovered = match open {
            Some(o) => o.submitted.into_values().collect(),
            None => shared.pending.list(round),
        };
    }
}

/// Aggregates a closed round with every update's influence bounded, checks the new model,
/// evaluates, commits and starts serving it.
fn commit_round(shared: &Shared, open: &OpenRound) -> Result<Commit, String> {
    let started = Instant::now();
    tracing::info!(
        round = open.round,
        updates = open.submitted.len(),
        "aggregating"
    );
    // Fault-injection hook for the crash-safety tests: a window to kill the process in.
    if let Some(ms) = std::env::var("FEDMICSE_AGGREGATION_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let a = &shared.config.aggregation;
    let rules = &shared.config.updates;
    let stored: Vec<pending::Stored> = open.submitted.values().cloned().collect();
    let stats: Vec<_> = stored.iter().map(pending::Stored::stats).collect();
    let influence = bound_influence(&stats, rules);
    let mut bounded = 0u32;
    for ((s, st), inf) in stored.iter().zip(&stats).zip(&influence) {
        if inf.bounded(st) {
            bounded += 1;
            tracing::warn!(
                client = %s.client,
                samples = s.num_samples,
                weight = inf.weight,
                norm = s.norm,
                scale = inf.scale,
                "update's influence bounded"
            );
        }
    }
    let step = pending::aggregate(
        &stored,
        &influence,
        &open.expected,
        a.strategy,
        a.trim_fraction,
    )?;
    let global = shared.global.load_full();
    let mut tensors = global.tensors.clone();
    let mut server_state = shared
        .server_state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let hyper = ServerHyper {
        lr: shared.config.federation.server_lr,
        momentum: a.momentum,
        beta1: a.beta1,
        beta2: a.beta2,
        tau: a.tau,
    };
    server_step(
        a.server_optimizer,
        &hyper,
        &mut server_state,
        &mut tensors,
        &step,
    );
    let names: Vec<String> = open.expected.keys().cloned().collect();
    let norms = match check_step(&global.tensors, &tensors, &names, rules) {
        Ok(n) => n,
        Err(why) => return Ok(Commit::Refused(why)),
    };
    let model = GlobalModel::new(open.round, tensors, global.files.clone());
    shared.metrics.bytes_in.inc_by(open.bytes_up);
    shared.metrics.bytes_out.inc_by(open.bytes_down);
    let encoder = Arc::new(
        shared
            .template
            .with_tensors(model.encoder_tensors())
            .map_err(|e| e.to_string())?,
    );
    let stsb_dev = evaluate(shared, &encoder);
    let mut record = open.record(stsb_dev);
    record.bounded = bounded;
    record.step_ratio = Some(norms.ratio());
    let history = shared.lock().history.clone();
    shared
        .store
        .commit(&model, &server_state, &record, &history)?;
    shared.pending.clear_through(model.round);
    *shared
        .server_state
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = server_state;
    tracing::info!(
        round = record.round,
        clients = record.clients,
        bounded,
        mean_loss = ?record.mean_loss,
        stsb_dev = ?record.stsb_dev,
        step_ratio = format!("{:.4}", norms.ratio()),
        bytes_up = record.bytes_up,
        bytes_down = record.bytes_down,
        seconds = format!("{:.1}", record.seconds),
        aggregation_seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "round committed"
    );
    shared
        .metrics
        .aggregation_seconds
        .observe(started.elapsed().as_secs_f64());
    let round = model.round;
    shared.global.store(Arc::new(model));
    shared.serving.store(Arc::new(Some((round, encoder))));
    let mut st = shared.lock();
    st.history.push(record);
    if round >= shared.config.federation.rounds {
        st.phase = Phase::Done;
        shared.done_tx.send_replace(true);
        tracing::info!(rounds = round, "federation finished");
    } else {
        st.phase = Phase::Waiting { next: round + 1 };
    }
    Ok(Commit::Committed)
}
