//! Committing a closed round: aggregation with every update's influence bounded, the
//! server optimizer step, the step's checks, evaluation, the durable commit, and serving
//! the new model.

use std::sync::Arc;
use std::time::Instant;

use fedmicse_federation::{ServerHyper, StepRefusal, bound_influence, check_step, server_step};
use fedmicse_runtime::{EmbedOptions, Embedder, sts};

use fedmicse_tensors::TensorMap;

use crate::Shared;
use crate::error::Error;
use crate::pending;
use crate::rounds::OpenRound;
use crate::store::{GlobalModel, RoundRecord};

/// What became of a closed round.
pub(crate) enum Commit {
    /// Committed and served; the driver records it.
    Committed(RoundRecord),
    /// The aggregate failed its checks: nothing was committed.
    Refused(StepRefusal),
}

/// Spearman ×100 of a model on the dev set with [CLS] pooling (the miCSE embedding), or
/// None without one (or on failure, logged).
pub(crate) fn evaluate(shared: &Shared, embedder: &dyn Embedder) -> Option<f64> {
    let dev = shared.dev.as_ref()?;
    match sts::evaluate(embedder, dev, &EmbedOptions::default()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "evaluation failed");
            None
        }
    }
}

/// Aggregates a closed round with every update's influence bounded, checks the new model,
/// evaluates, commits and starts serving it.
pub(crate) fn commit_round(shared: &Shared, open: &OpenRound) -> Result<Commit, Error> {
    let started = Instant::now();
    tracing::info!(
        round = open.round,
        updates = open.submitted.len(),
        "aggregating"
    );
    // Fault injection for the crash-safety tests: a window to kill the process in.
    if let Some(delay) = shared.faults.aggregation_delay {
        std::thread::sleep(delay);
    }
    let (step, bounded) = aggregate(shared, open)?;
    let global = shared.global.load_full();
    let mut tensors = global.tensors.clone();
    let mut server_state = shared
        .server_state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let a = &shared.config.aggregation;
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
    let norms = match check_step(&global.tensors, &tensors, &names, &shared.config.updates) {
        Ok(n) => n,
        Err(why) => return Ok(Commit::Refused(why)),
    };
    let model = GlobalModel::new(open.round, tensors, global.files.clone());
    shared.metrics.bytes_in.inc_by(open.bytes_up);
    shared.metrics.bytes_out.inc_by(open.bytes_down);
    let embedder = shared.template.embedder(model.encoder_tensors())?;
    let stsb_dev = evaluate(shared, &*embedder);
    let mut record = open.record(stsb_dev, Instant::now());
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
    log_committed(shared, &record, norms.ratio(), started);
    let round = model.round;
    shared.global.store(Arc::new(model));
    shared.serving.store(Arc::new(Some((round, embedder))));
    Ok(Commit::Committed(record))
}

/// The round's combined step, each update's influence bounded first; and how many were.
/// Under secure aggregation, the mean the secure sum gave (no single update exists here).
fn aggregate(shared: &Shared, open: &OpenRound) -> Result<(TensorMap, u32), Error> {
    if let Some(s) = &open.secure {
        return Ok((s.step.clone(), 0));
    }
    let a = &shared.config.aggregation;
    let stored: Vec<pending::Stored> = open.submitted.values().cloned().collect();
    let stats: Vec<_> = stored.iter().map(pending::Stored::stats).collect();
    let influence = bound_influence(&stats, &shared.config.updates);
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
    Ok((step, bounded))
}

fn log_committed(shared: &Shared, record: &RoundRecord, step_ratio: f64, started: Instant) {
    tracing::info!(
        round = record.round,
        clients = record.clients,
        bounded = record.bounded,
        mean_loss = ?record.mean_loss,
        stsb_dev = ?record.stsb_dev,
        step_ratio = format!("{step_ratio:.4}"),
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
}
