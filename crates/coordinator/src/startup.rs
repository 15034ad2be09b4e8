//! Start-up: checks the configuration, loads the base model, the dev set and the store,
//! resumes from the last commit (or commits round 0 on a fresh start), and picks up what
//! an interrupted round left behind: its accepted updates and whom it had selected.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use fedmicse_federation::{ServerState, trainable_names};
use fedmicse_runtime::sts::{self, StsPair};
use fedmicse_runtime::{BaseModel, ModelRuntime};
use tokio::sync::{Notify, Semaphore, watch};

use crate::commit::evaluate;
use crate::error::Error;
use crate::rounds::{Phase, State};
use crate::store::{self, GlobalModel, RoundRecord, Store};
use crate::{Coordinator, CoordinatorConfig, Faults, Shared, metrics, pending, revoke};

/// The model to start from and what came with it.
struct Resumed {
    global: GlobalModel,
    history: Vec<RoundRecord>,
    server_state: ServerState,
    /// No round was ever committed.
    fresh: bool,
}

impl Coordinator {
    /// Opens the base model with `runtime` and the store (resuming from the last commit if
    /// there is one). Blocking: call from a blocking context.
    pub fn new(config: CoordinatorConfig, runtime: Arc<dyn ModelRuntime>) -> Result<Self, Error> {
        Self::with_faults(config, runtime, Faults::default())
    }

    /// [`Coordinator::new`] with faults injected (tests only).
    pub fn with_faults(
        config: CoordinatorConfig,
        runtime: Arc<dyn ModelRuntime>,
        faults: Faults,
    ) -> Result<Self, Error> {
        config.validate().map_err(Error::Config)?;
        let model_err = |source| Error::Model {
            path: config.federation.model.clone(),
            source,
        };
        let template = runtime
            .open(&config.federation.model, config.federation.device)
            .map_err(model_err)?;
        let base = template.base().map_err(model_err)?;
        let store = Store::open(
            &config.federation.state_dir,
            config.federation.keep_checkpoints,
        )?
        .with_export_files(base.export_files.clone());
        let dev = load_dev(&config)?;
        let pending = pending::Pending::open(&config.federation.state_dir)?;
        let resumed = resume(&config, base, &store)?;
        // Fail now, not at the first round, if the task does not fit the model.
        if trainable_names(&resumed.global.tensors, &config.task.trainable).is_empty() {
            return Err(Error::Trainable(config.task.trainable.clone()));
        }
        let state = interrupted_round(&config, &pending, &resumed);
        let fresh = resumed.fresh;
        let shared = Arc::new(Shared {
            uploads: Semaphore::new(config.federation.max_concurrent_uploads),
            downloads: Arc::new(Semaphore::new(config.federation.max_concurrent_downloads)),
            uploads_in_flight: Default::default(),
            downloads_in_flight: Default::default(),
            grpc_conns: Default::default(),
            http_conns: Default::default(),
            inference_permits: Semaphore::new(config.inference.max_concurrent.max(1)),
            done_tx: watch::channel(matches!(state.phase, Phase::Done)).0,
            state: std::sync::Mutex::new(state),
            global: ArcSwap::from_pointee(resumed.global),
            serving: ArcSwap::from_pointee(None),
            wake: Notify::new(),
            metrics: metrics::Metrics::new(),
            secure: crate::secure::Secure::new(config.secure_aggregation.clone()),
            store,
            pending,
            revocations: revoke::Revocations::new(
                config.tls.as_ref().and_then(|t| t.revocation_list.clone()),
            ),
            server_state: std::sync::Mutex::new(resumed.server_state),
            template,
            dev,
            faults,
            config,
        });
        start_serving(&shared, fresh)?;
        Ok(Coordinator { shared })
    }
}

fn load_dev(config: &CoordinatorConfig) -> Result<Option<Vec<StsPair>>, Error> {
    let Some(p) = &config.eval.dev_file else {
        return Ok(None);
    };
    let mut pairs = sts::read_task(p).map_err(|e| Error::DevFile(e.to_string()))?;
    if config.eval.max_pairs > 0 {
        pairs.truncate(config.eval.max_pairs);
    }
    Ok(Some(pairs))
}

/// The last committed model, or the base model with its training head (from the model
/// directory, or seeded) on a fresh start.
fn resume(config: &CoordinatorConfig, base: BaseModel, store: &Store) -> Result<Resumed, Error> {
    if let Some((global, history, server_state)) = store.load()? {
        tracing::info!(
            round = global.round,
            "resuming from the last committed round"
        );
        return Ok(Resumed {
            global,
            history,
            server_state,
            fresh: false,
        });
    }
    let mut tensors = base.tensors;
    let head_file = config.federation.model.join("training_head.safetensors");
    if head_file.is_file() {
        tensors.extend(fedmicse_tensors::safetensors::read(&head_file)?);
    } else {
        tensors.extend(store::seeded_head(base.hidden_size, config.federation.seed));
    }
    Ok(Resumed {
        global: GlobalModel::new(0, tensors, base.files),
        history: Vec::new(),
        server_state: ServerState::default(),
        fresh: true,
    })
}

/// The round state at start-up, with what an interrupted round left: its accepted
/// updates, and the agents it had selected (waited for during the restart grace).
fn interrupted_round(
    config: &CoordinatorConfig,
    pending: &pending::Pending,
    resumed: &Resumed,
) -> State {
    let f = &config.federation;
    let done = resumed.global.round;
    // Updates of rounds already committed are stale; those of the next round were
    // accepted before a crash and count when it reopens.
    pending.clear_through(done);
    let next = done + 1;
    let recovered = pending.list(next);
    if !recovered.is_empty() {
        tracing::info!(
            round = next,
            updates = recovered.len(),
            clients = ?recovered.iter().map(|r| r.client.as_str()).collect::<Vec<_>>(),
            "recovered accepted updates of the interrupted round"
        );
    }
    let selected_before: BTreeSet<String> = if resumed.fresh {
        Default::default()
    } else {
        pending.load_selected(next)
    };
    if !selected_before.is_empty() {
        tracing::info!(
            round = next,
            selected = ?selected_before,
            grace_ms = f.restart_grace().as_millis() as u64,
            "waiting for the agents selected before the restart"
        );
    }
    let phase = if done >= f.rounds {
        Phase::Done
    } else {
        Phase::Waiting { next }
    };
    let mut state = State::new(phase, resumed.history.clone());
    state.recovered = recovered;
    state.grace_until = (!selected_before.is_empty()).then(|| Instant::now() + f.restart_grace());
    state.selected_before = selected_before;
    state
}

/// Serves (and evaluates) the current model; round 0 is committed on a fresh start so a
/// restart before the first round finds it.
fn start_serving(shared: &Shared, fresh: bool) -> Result<(), Error> {
    let global = shared.global.load_full();
    let embedder = shared.template.embedder(global.encoder_tensors())?;
    if fresh {
        let record = RoundRecord {
            round: 0,
            stsb_dev: evaluate(shared, &*embedder),
            ..Default::default()
        };
        shared
            .store
            .commit(&global, &ServerState::default(), &record, &[])?;
        shared.lock().history.push(record);
    }
    shared
        .serving
        .store(Arc::new(Some((global.round, embedder))));
    Ok(())
}
