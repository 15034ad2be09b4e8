//! The coordinator daemon: runs federation rounds over mutual-TLS gRPC, aggregates
//! agents' weight deltas with FedAvg, commits a HuggingFace checkpoint after every round,
//! evaluates it on an STS dev file and serves embeddings from the newest global model.

mod commit;
pub mod config;
mod drive;
pub mod engine;
mod error;
mod http;
mod inference;
mod limits;
mod metrics;
pub mod pending;
pub mod recover;
mod revoke;
pub mod rounds;
mod secure;
mod secure_service;
mod serve;
mod service;
mod startup;
pub mod store;
mod upload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use fedmicse_federation::ServerState;
use fedmicse_runtime::sts::StsPair;
use fedmicse_runtime::{Embedder, ModelTemplate};
use tokio::sync::{Notify, Semaphore, watch};

pub use config::CoordinatorConfig;
pub use error::{Error, StoreError};
pub use recover::RecoverReport;
use rounds::State;
pub use store::{GlobalModel, RoundRecord, Store};

/// Faults injected into a coordinator by tests; none by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Sleep this long before aggregating each round: a window for crash-safety tests to
    /// kill the process in mid-commit.
    pub aggregation_delay: Option<Duration>,
}

/// What handlers and the round driver share.
pub(crate) struct Shared {
    config: CoordinatorConfig,
    store: Store,
    pending: pending::Pending,
    revocations: revoke::Revocations,
    /// The server optimizer's moments (FedAvgM, FedAdam), committed with each round.
    server_state: std::sync::Mutex<ServerState>,
    /// The base model's architecture and tokenizer, for building embedders from weights.
    template: Box<dyn ModelTemplate>,
    faults: Faults,
    /// STS pairs every committed model is scored on.
    dev: Option<Vec<StsPair>>,
    state: std::sync::Mutex<State>,
    global: ArcSwap<GlobalModel>,
    /// The newest global model as an encoder, with its round (None until first built).
    serving: ArcSwap<Option<(u64, Arc<dyn Embedder>)>>,
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
    /// Secure aggregation sessions (unused unless `[secure_aggregation]` is enabled).
    secure: secure::Secure,
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
        // Secure-aggregation steps wait for other agents; release them so the server's
        // graceful shutdown does not wait for their timeouts.
        self.shared.secure.stop();
        let _ = self.driver.await;
        match self.server.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "server stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "server task failed"),
            Ok(Ok(())) => {}
        }
    }
}
