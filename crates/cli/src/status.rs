//! `fedmicse status`: a coordinator's phase, agents and rounds.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use fedmicse_agent::AgentConfig;
use fedmicse_simulation::report::{Row, table_header};
use fedmicse_wire::client::{Connection, Target};
use fedmicse_wire::{TlsFiles, pb};

use crate::runtime::runtime;

#[derive(Args, Debug)]
pub struct StatusCmd {
    /// Coordinator URL, e.g. https://fed.example.org:7443
    #[arg(long, value_name = "URL")]
    pub coordinator: String,
    /// CA certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate of an agent or operator (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Expected name in the coordinator's certificate [default: the URL's host].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Client id for a plaintext coordinator.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Print the raw status as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_status(cmd: StatusCmd) -> Result<()> {
    let tls = match (&cmd.ca, &cmd.cert, &cmd.key) {
        (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None, None) => None,
        _ => bail!("give all of --ca, --cert and --key, or none (plaintext)"),
    };
    let probe = AgentConfig {
        coordinator: cmd.coordinator.clone(),
        server_name: cmd.server_name.clone(),
        tls: None,
        plaintext_client_id: None,
        data: fedmicse_agent::config::DataConfig {
            file: PathBuf::new(),
            sample: None,
            seed: 0,
        },
        device: Default::default(),
        retry: Default::default(),
        http: Default::default(),
        limits: Default::default(),
        state_dir: None,
    };
    let target = Target {
        url: cmd.coordinator.clone(),
        tls,
        domain: probe.domain(),
        plaintext_client_id: cmd.client_id.clone(),
    };
    let rt = runtime()?;
    let s = rt.block_on(async move {
        let mut conn = Connection::new(&target).map_err(anyhow::Error::msg)?;
        conn.status()
            .await
            .map_err(|s| anyhow::anyhow!("status: {}", s.message()))
    })?;
    let phase = pb::Phase::try_from(s.phase)
        .map(|p| p.as_str_name())
        .unwrap_or("?");
    let history: Vec<Row> = s.history.iter().map(Row::from).collect();
    if cmd.json {
        let v = serde_json::json!({"phase": phase, "round": s.round, "rounds_total": s.rounds_total,
            "connected": s.connected, "selected": s.selected, "answered": s.answered,
            "min_clients": s.min_clients, "model": s.model, "history": history});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "phase {phase}, round {}/{}, model {}",
        s.round, s.rounds_total, s.model
    );
    println!(
        "agents: {} connected, {} selected, {} answered (min {})",
        s.connected, s.selected, s.answered, s.min_clients
    );
    if !history.is_empty() {
        println!("\n{}", table_header());
        for row in &history {
            println!("{row}");
        }
    }
    Ok(())
}
