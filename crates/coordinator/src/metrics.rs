//! Prometheus metrics of the coordinator. Gauges that mirror the round state are read from
//! it at scrape time; counters and histograms are updated where things happen.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::Shared;
use crate::rounds::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub endpoint: String,
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    round: Gauge,
    rounds_total: Gauge,
    phase: Family<PhaseLabel, Gauge>,
    connected: Gauge,
    selected: Gauge,
    answered: Gauge,
    refused: Family<ReasonLabel, Counter>,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub aggregation_seconds: Histogram,
    dev_spearman: Gauge<f64, AtomicU64>,
    abandoned: Gauge,
    pub rounds_refused: Counter,
    pub commit_failures: Counter,
    pub agents_dropped: Counter,
    connections_refused: Family<ReasonLabel, Gauge>,
    pub requests: Family<RequestLabel, Counter>,
    pub latency: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fedmicse");
        let m = Metrics {
            round: Gauge::default(),
            rounds_total: Gauge::default(),
            phase: Family::default(),
            connected: Gauge::default(),
            selected: Gauge::default(),
            answered: Gauge::default(),
            refused: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            aggregation_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            dev_spearman: Gauge::default(),
            abandoned: Gauge::default(),
            rounds_refused: Counter::default(),
            commit_failures: Counter::default(),
            agents_dropped: Counter::default(),
            connections_refused: Family::default(),
            requests: Family::default(),
            latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            registry: Registry::default(),
        };
        m.register(&mut registry);
        Metrics { registry, ..m }
    }

    /// Names and helps of every metric (the names are an interface: dashboards use them).
    fn register(&self, registry: &mut Registry) {
        macro_rules! register {
            ($($name:literal, $help:literal, $field:ident;)*) => {
                $(registry.register($name, $help, self.$field.clone());)*
            };
        }
        register! {
            "round", "Current round (open, aggregating, or last committed)", round;
            "rounds_total", "Rounds the federation runs", rounds_total;
            "phase", "1 for the current phase", phase;
            "agents_connected", "Agents heard from within the agent timeout", connected;
            "agents_selected", "Agents selected for the open round", selected;
            "agents_answered", "Updates accepted in the open round", answered;
            "updates_refused", "Updates refused, by failed check", refused;
            "bytes_received", "Update payload bytes received", bytes_in;
            "bytes_sent", "Model payload bytes sent", bytes_out;
            "aggregation_seconds", "Time to aggregate, evaluate and commit a round", aggregation_seconds;
            "global_dev_spearman", "STS dev Spearman ×100 of the newest global model", dev_spearman;
            "rounds_abandoned", "Rounds retried for lack of updates at the deadline", abandoned;
            "rounds_refused", "Aggregates not committed because the new model failed its checks", rounds_refused;
            "commit_failures", "Commits that failed (e.g. a full disk); retried with a capped exponential backoff", commit_failures;
            "agents_dropped", "Selected agents dropped from an open round: silent past the agent timeout, or stalled", agents_dropped;
            "connections_closed", "Connections closed by a limit, by listener and reason", connections_refused;
            "inference_requests", "Inference requests by endpoint and status", requests;
            "inference_latency_seconds", "Inference request latency", latency;
        }
    }

    /// Prometheus text exposition, gauges refreshed from the round state.
    pub fn render(&self, shared: &Shared) -> String {
        {
            let st = shared.lock();
            let f = &shared.config.federation;
            self.rounds_total.set(f.rounds as i64);
            self.connected.set(
                st.connected(
                    std::time::Instant::now(),
                    std::time::Duration::from_secs(f.agent_timeout_secs),
                    |id, serial| shared.revocations.is_revoked(id, serial),
                )
                .len() as i64,
            );
            use std::sync::atomic::Ordering::Relaxed;
            for (reason, n) in [
                (
                    "grpc_over_limit",
                    shared.grpc_conns.over_limit.load(Relaxed),
                ),
                ("grpc_idle", shared.grpc_conns.idle_closed.load(Relaxed)),
                (
                    "http_over_limit",
                    shared.http_conns.over_limit.load(Relaxed),
                ),
                ("http_idle", shared.http_conns.idle_closed.load(Relaxed)),
            ] {
                self.connections_refused
                    .get_or_create(&ReasonLabel {
                        reason: reason.into(),
                    })
                    .set(n as i64);
            }
            let (name, round, selected, answered) = match &st.phase {
                Phase::Waiting { next } => ("waiting", next.saturating_sub(1), 0, 0),
                Phase::Training(o) => ("training", o.round, o.selected.len(), o.submitted.len()),
                Phase::Aggregating { round } => ("aggregating", *round, 0, 0),
                Phase::Done => ("done", shared.global.load().round, 0, 0),
            };
            for p in ["waiting", "training", "aggregating", "done"] {
                self.phase
                    .get_or_create(&PhaseLabel { phase: p.into() })
                    .set((p == name) as i64);
            }
            self.round.set(round as i64);
            self.selected.set(selected as i64);
            self.answered.set(answered as i64);
            self.abandoned.set(st.abandoned_rounds as i64);
            for (reason, n) in &st.refused_total {
                let c = self.refused.get_or_create(&ReasonLabel {
                    reason: reason.clone(),
                });
                let have = c.get();
                if *n > have {
                    c.inc_by(n - have);
                }
            }
            if let Some(d) = st.history.iter().rev().find_map(|r| r.stsb_dev) {
                self.dev_spearman.set(d);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("text encoding");
        out
    }
}
