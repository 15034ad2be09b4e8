//! Start-up: checks the configuration, loads the base model, the dev set and the store,
//! resumes from the last commit (or commits round 0 on a fresh start), and picks up what
//! an interrupted round left behind: its accepted updates and whom it had selected.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use fedmicse_encoder::{Encoder, parse_device};
use fedmicse_federation::{ServerState, trainable_names};
use fedmicse_training::run::DevSet;
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
    /// Loads the base model and the store (resuming from the last commit if there is one).
    /// Blocking: call from a blocking context.
    pub fn new(config: CoordinatorConfig) -> Result<Self, Error> {
        Self::with_faults(config, Faults::default())
    }

    /// [`Coordinator::new`] with faults injected (tests only).
    pub fn with_faults(config: CoordinatorConfig, faults: Faults) -> Result<Self, Error> {
        config.validate().map_err(Error::Config)?;
        let device = parse_device(&config.federation.device).map_err(Error::Device)?;
        let template =
            Encoder::load(&config.federation.model, &device).map_err(|source| Error::Model {
                path: config.federation.model.clone(),
                source,
            })?;
        let store = Store::open(
            &config.federation.state_dir,
            config.federation.keep_checkpoints,
        )?;
        let dev = load_dev(&config)?;
        let pending = pending::Pending::open(&config.federation.state_dir)?;
        let resumed = resume(&config, &template, &store)?;
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

fn load_dev(config: &CoordinatorConfig) -> Result<Option<DevSet>, Error> {
    let Some(p) = &config.eval.dev_file else {
        return Ok(None);
    };
    let mut d = DevSet::load(p).map_err(|e| Error::DevFile(e.to_string()))?;
    if config.eval.max_pairs > 0 {
        d.pairs.truncate(config.eval.max_pairs);
    }
    Ok(Some(d))
}

/// The last committed model, or the base model with its training head (from the model
/// directory, or seeded) on a fresh start.
fn resume(config: &CoordinatorConfig, template: &Encoder, store: &Store) -> Result<Resumed, Error> {
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
    let mut tensors = template.tensors()?;
    let head_file = config.federation.model.join("training_head.safetensors");
    if head_file.is_file() {
        tensors.extend(fedmicse_tensors::safetensors::read(&head_file)?);
    } else {
        tensors.extend(store::seeded_head(
            template.config.hidden_size,
            config.federation.seed,
        ));
    }
    let files = template.files()?;
    Ok(Resumed {
        global: GlobalModel::new(0, tensors, files),
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
    let encoder = Arc::new(shared.template.with_tensors(global.encoder_tensors())?);
    if fresh {
        let record = RoundRecord {
            round: 0,
            stsb_dev: evaluate(shared, &encoder),
            ..Default::default()
        };
        shared
            .store
            .commit(&global, &ServerState::default(), &record, &[])?;
        shared.lock().history.push(record);
    }
    shared
        .serving
        .store(Arc::new(Some((global.round, encoder))));
    Ok(())
}
