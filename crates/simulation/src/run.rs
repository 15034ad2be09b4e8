//! The orchestration: a [`Plan`] decided before anything starts (settings checked, sentences
//! read and sharded, hostile agents named), then [`run`]: the coordinator and the agents in
//! one process until the last round, returning the round records.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use fedmicse_agent::attack::Attack;
use fedmicse_agent::{Agent, AgentReport};
use fedmicse_coordinator::{Coordinator, RoundRecord, Running};
use fedmicse_federation::UpdateRules;
use fedmicse_federation::partition::Partition;
use fedmicse_training::data::{read_sentences, sample};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Adversary, Defences, SimulateConfig, check_byzantine};
use crate::setup::{Dirs, agent_config, agent_ids, coordinator_config};
use crate::shard::make_shards;

/// A simulation ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The configuration with the adversary's defences and aggregation applied.
    pub config: SimulateConfig,
    pub partition: Partition,
    /// Sentences read (after sampling).
    pub sentences: usize,
    /// One shard per agent, in the order of `ids`.
    pub shards: Vec<Vec<String>>,
    pub ids: Vec<String>,
    /// Ids of the hostile agents (the last `byzantine` ones; empty without).
    pub hostile: Vec<String>,
    pub attack: Option<Attack>,
    pub defences: Defences,
}

impl Plan {
    /// Checks the settings, applies the adversary, reads, samples and shards the sentences.
    pub fn new(mut c: SimulateConfig, adversary: Adversary) -> Result<Plan> {
        if c.clients == 0 {
            bail!("clients must be at least 1");
        }
        if c.max_concurrent_training == 0 {
            bail!("max_concurrent_training must be at least 1");
        }
        let secure = c.secure_aggregation.enabled;
        let attack = check_byzantine(adversary.byzantine, adversary.attack, c.clients, secure)?;
        if adversary.defences == Defences::None {
            c.updates = UpdateRules::none();
        }
        if let Some(s) = adversary.aggregation {
            c.aggregation.strategy = s;
        }
        let partition = c.partition;
        fedmicse_encoder::encoder::model_dir(&c.model)?;
        let mut sentences = read_sentences(&c.data)?;
        if c.sample > 0 {
            sentences = sample(&sentences, c.sample, c.seed);
        }
        let shards = make_shards(&sentences, c.clients, partition, c.seed, &c.model, c.device)?;
        let ids = agent_ids(c.clients);
        let hostile = ids[c.clients - adversary.byzantine..].to_vec();
        Ok(Plan {
            partition,
            sentences: sentences.len(),
            shards,
            ids,
            hostile,
            attack,
            defences: adversary.defences,
            config: c,
        })
    }

    /// Agents that may commit a round without the hostile ones.
    pub fn honest(&self) -> usize {
        self.ids.len() - self.hostile.len()
    }
}

/// What a finished simulation leaves.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// One record per committed round (round 0: the starting model).
    pub history: Vec<RoundRecord>,
    /// The coordinator's checkpoint of the last committed round.
    pub last_checkpoint: PathBuf,
}

/// Runs the plan: certificates and a fresh state under `output`, the coordinator on a free
/// port of 127.0.0.1, one agent per shard. Calls `on_round` once per committed round, in
/// order, as rounds commit. Resolving `stop` interrupts the run (an error, after the
/// coordinator and the agents have stopped).
pub async fn run(
    plan: &Plan,
    mut on_round: impl FnMut(&RoundRecord),
    stop: impl Future<Output = ()>,
) -> Result<Outcome> {
    let c = &plan.config;
    let dirs = Dirs::new(&c.output);
    dirs.prepare(&c.output, &plan.ids)?;
    let coordinator_config = coordinator_config(c, &plan.ids, plan.honest(), &dirs);
    coordinator_config.validate().map_err(anyhow::Error::msg)?;
    let coordinator = tokio::task::spawn_blocking(move || {
        Coordinator::new(coordinator_config, fedmicse_encoder::BurnRuntime::shared())
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = coordinator
        .serve(listener)
        .await
        .map_err(anyhow::Error::msg)?;
    let (stop_agents, agents_stop) = watch::channel(false);
    let agents = match start_agents(plan, running.addr.port(), &dirs, agents_stop) {
        Ok(agents) => agents,
        Err(e) => {
            running.shutdown().await;
            return Err(e);
        }
    };
    let interrupted = watch_rounds(&running, &mut on_round, stop).await;
    let _ = stop_agents.send(true);
    for a in agents {
        log_agent_end(tokio::time::timeout(Duration::from_secs(30), a).await);
    }
    let history = running.history();
    let last_checkpoint = running.checkpoint_dir(history.last().map_or(0, |r| r.round));
    running.shutdown().await;
    if interrupted {
        bail!("interrupted");
    }
    Ok(Outcome {
        history,
        last_checkpoint,
    })
}

type AgentTask = JoinHandle<std::result::Result<AgentReport, fedmicse_agent::AgentError>>;

/// One task per agent, at most `max_concurrent_training` of them training at a time; the
/// hostile ones run the plan's attack.
fn start_agents(
    plan: &Plan,
    port: u16,
    dirs: &Dirs,
    stop: watch::Receiver<bool>,
) -> Result<Vec<AgentTask>> {
    let gate = Arc::new(tokio::sync::Semaphore::new(
        plan.config.max_concurrent_training,
    ));
    let trainer = Arc::new(fedmicse_training::BurnTrainer::new(plan.config.device)?);
    let mut agents = Vec::new();
    for (id, shard) in plan.ids.iter().zip(&plan.shards) {
        let cfg = agent_config(&plan.config, id, port, dirs);
        let mut agent =
            Agent::new(&cfg, shard.clone(), trainer.clone())?.with_train_gate(gate.clone());
        if let Some(a) = plan.attack
            && plan.hostile.contains(id)
        {
            agent = agent.with_attack(a);
        }
        agents.push(tokio::spawn(agent.run(stop.clone())));
    }
    Ok(agents)
}

/// Reports new rounds every 500 ms until the coordinator is done (false) or `stop`
/// resolves (true).
async fn watch_rounds(
    running: &Running,
    on_round: &mut impl FnMut(&RoundRecord),
    stop: impl Future<Output = ()>,
) -> bool {
    let mut reported = 0;
    let mut report_new = |history: &[RoundRecord]| {
        history[reported.min(history.len())..]
            .iter()
            .for_each(&mut *on_round);
        reported = history.len();
    };
    tokio::pin!(stop);
    let interrupted = loop {
        tokio::select! {
            _ = running.wait_done() => break false,
            _ = &mut stop => break true,
            _ = tokio::time::sleep(Duration::from_millis(500)) => report_new(&running.history()),
        }
    };
    report_new(&running.history());
    interrupted
}

/// An agent's task, joined within a timeout.
type Joined = std::result::Result<
    std::result::Result<
        std::result::Result<AgentReport, fedmicse_agent::AgentError>,
        tokio::task::JoinError,
    >,
    tokio::time::error::Elapsed,
>;

fn log_agent_end(joined: Joined) {
    match joined {
        Ok(Ok(Ok(report))) => {
            tracing::debug!(agent = %report.client_id, up = report.bytes_up, down = report.bytes_down, "agent done")
        }
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "agent failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "agent task panicked"),
        Err(_) => tracing::warn!("agent did not stop in time"),
    }
}
