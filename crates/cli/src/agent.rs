//! `fedmicse agent`: a client agent beside a data silo.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use fedmicse_agent::{Agent, AgentConfig};
use fedmicse_training::data::{read_sentences, sample};

use crate::runtime::{runtime, shutdown_signal};

#[derive(Args, Debug)]
pub struct AgentCmd {
    /// Agent configuration (commented example: configs/agent.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub fn run_agent(cmd: AgentCmd) -> Result<()> {
    let config = AgentConfig::from_file(&cmd.config)?;
    let mut shard = read_sentences(&config.data.file)?;
    if let Some(n) = config.data.sample {
        shard = sample(&shard, n, config.data.seed);
    }
    if shard.len() < 2 {
        bail!(
            "{}: the shard needs at least 2 distinct sentences",
            config.data.file.display()
        );
    }
    tracing::info!(sentences = shard.len(), coordinator = %config.coordinator, "agent starting");
    let trainer = std::sync::Arc::new(fedmicse_training::BurnTrainer::new(config.device)?);
    let agent = Agent::new(&config, shard, trainer)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let report = agent.run(stop_rx).await?;
        tracing::info!(rounds = ?report.rounds_trained, bytes_up = report.bytes_up, bytes_down = report.bytes_down, "agent finished");
        Ok(())
    })
}
