//! The agent's Prometheus metrics and its small HTTP server (/health, /metrics).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct AgentMetrics {
    registry: Registry,
    pub steps: Counter,
    pub rounds: Counter,
    pub loss: Gauge<f64, AtomicU64>,
    pub sentences_per_second: Gauge<f64, AtomicU64>,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub failures: Counter,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fedmicse_agent");
        let m = AgentMetrics {
            registry: Registry::default(),
            steps: Counter::default(),
            rounds: Counter::default(),
            loss: Gauge::default(),
            sentences_per_second: Gauge::default(),
            bytes_up: Counter::default(),
            bytes_down: Counter::default(),
            failures: Counter::default(),
        };
        registry.register("local_steps", "Local training steps", m.steps.clone());
        registry.register(
            "rounds",
            "Rounds whose update was accepted",
            m.rounds.clone(),
        );
        registry.register("loss", "Mean local loss of the last round", m.loss.clone());
        registry.register(
            "sentences_per_second",
            "Local training throughput of the last round",
            m.sentences_per_second.clone(),
        );
        registry.register("bytes_up", "Update bytes sent", m.bytes_up.clone());
        registry.register("bytes_down", "Model bytes received", m.bytes_down.clone());
        registry.register(
            "round_failures",
            "Rounds that failed and were retried",
            m.failures.clone(),
        );
        AgentMetrics { registry, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("text encoding");
        out
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves /health and /metrics until the process ends.
pub async fn serve(
    listen: std::net::SocketAddr,
    metrics: Arc<AgentMetrics>,
) -> Result<std::net::SocketAddr, String> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("HTTP listen {listen}: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        );
    // Same limits as the coordinator's listener: a few scrapers, no half-sent requests.
    let limits = fedmicse_wire::listen::ConnLimits {
        max_connections: 64,
        idle: std::time::Duration::from_secs(60),
    };
    tokio::spawn(fedmicse_wire::listen::serve_http(
        l,
        app,
        limits,
        std::time::Duration::from_secs(10),
        Default::default(),
        std::future::pending(),
    ));
    Ok(addr)
}
