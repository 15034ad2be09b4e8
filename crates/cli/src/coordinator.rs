//! `fedmicse coordinator`: the daemon, until its last round (or for ever, serving
//! inference); `--recover` first rolls a damaged state back.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fedmicse_coordinator::{Coordinator, CoordinatorConfig, Faults, Store};

use crate::runtime::{runtime, shutdown_signal};

#[derive(Args, Debug)]
pub struct CoordinatorCmd {
    /// Coordinator configuration (commented example: configs/coordinator.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Exit after the last round instead of going on serving inference.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Before starting, roll back a damaged state directory to its newest intact checkpoint
    /// (rebuilds state.json, truncates rounds.jsonl, moves damaged checkpoints aside as
    /// round-N.corrupted).
    ///
    /// Use it when the coordinator refuses to start because a checkpoint or state.json is
    /// corrupted or missing. A checkpoint is intact when it loads and its digest matches the
    /// one recorded for its round. Stored updates of rounds after the restored one are moved
    /// aside as pending/round-N.stale; nothing is deleted. The rounds after the restored one
    /// run again. A healthy state is left as it is.
    #[arg(long)]
    pub recover: bool,
}

pub fn run_coordinator(cmd: CoordinatorCmd) -> Result<()> {
    let config = CoordinatorConfig::from_file(&cmd.config)?;
    if cmd.recover {
        recover_state(&config)?;
    }
    let listen = config.server.listen;
    // With --exit-when-done, serve "done" a few more polls so agents learn the federation
    // finished and exit cleanly, instead of retrying a coordinator that is gone.
    let linger = std::time::Duration::from_millis(3 * u64::from(config.federation.poll_ms))
        .min(std::time::Duration::from_secs(10));
    let rt = runtime()?;
    rt.block_on(async move {
        let faults = injected_faults();
        let coordinator = tokio::task::spawn_blocking(move || Coordinator::with_faults(config, fedmicse_encoder::BurnRuntime::shared(), faults))
            .await?
            .map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let running = coordinator.serve(listener).await.map_err(anyhow::Error::msg)?;
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("shutting down"),
            _ = async { running.wait_done().await; if !cmd.exit_when_done { std::future::pending::<()>().await } } => {
                tokio::time::sleep(linger).await;
                tracing::info!("all rounds done; exiting (--exit-when-done)");
            }
        }
        running.shutdown().await;
        Ok(())
    })
}

/// Faults the crash-safety tests inject through the environment (none otherwise).
fn injected_faults() -> Faults {
    Faults {
        aggregation_delay: std::env::var("FEDMICSE_AGGREGATION_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(std::time::Duration::from_millis),
    }
}

/// `--recover`: rolls the state directory back to its newest intact checkpoint.
fn recover_state(config: &CoordinatorConfig) -> Result<()> {
    let dir = &config.federation.state_dir;
    let store = Store::open(dir, config.federation.keep_checkpoints).map_err(anyhow::Error::msg)?;
    let report = store
        .recover()
        .map_err(anyhow::Error::msg)
        .context("--recover")?;
    if report.changed() {
        let moved: Vec<String> = report
            .moved_checkpoints
            .iter()
            .chain(&report.moved_updates)
            .map(|(from, to)| format!("{} -> {}", from.display(), to.display()))
            .collect();
        tracing::warn!(
            state_dir = %dir.display(),
            round = report.round,
            previous_round = report.previous,
            dropped_rounds = ?report.dropped_rounds,
            moved = ?moved,
            "state recovered: {report}"
        );
    } else {
        tracing::info!(state_dir = %dir.display(), "--recover: {report}");
    }
    Ok(())
}
