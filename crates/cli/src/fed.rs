//! `fedmicse coordinator`, `agent`, `certs` and `status`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use fedmicse_agent::{Agent, AgentConfig};
use fedmicse_coordinator::{Coordinator, CoordinatorConfig, Faults, Store};
use fedmicse_training::data::{read_sentences, sample};
use fedmicse_wire::client::{Connection, Target};
use fedmicse_wire::{TlsFiles, certs, pb};

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

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
    let config = CoordinatorConfig::from_file(&cmd.config).map_err(anyhow::Error::msg)?;
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
        let coordinator =
            tokio::task::spawn_blocking(move || Coordinator::with_faults(config, faults))
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

#[derive(Args, Debug)]
pub struct AgentCmd {
    /// Agent configuration (commented example: configs/agent.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub fn run_agent(cmd: AgentCmd) -> Result<()> {
    let config = AgentConfig::from_file(&cmd.config).map_err(anyhow::Error::msg)?;
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
    let agent = Agent::new(&config, shard).map_err(anyhow::Error::msg)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let report = agent.run(stop_rx).await.map_err(anyhow::Error::msg)?;
        tracing::info!(rounds = ?report.rounds_trained, bytes_up = report.bytes_up, bytes_down = report.bytes_down, "agent finished");
        Ok(())
    })
}

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create the federation's CA and the coordinator's certificate in DIR
    /// (ca.pem, ca.key, coordinator.pem, coordinator.key). Keep ca.key offline.
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Extra DNS names or IP addresses of the coordinator (localhost and 127.0.0.1 are
        /// always included). Repeat for several.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Validity of the coordinator certificate in days (the CA gets five times that).
        #[arg(long, default_value_t = certs::DEFAULT_DAYS)]
        days: i64,
        /// Replace existing files in DIR. A new CA invalidates every certificate issued by
        /// the old one. Without it, init refuses to overwrite any key or certificate.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent certificate: OUT/ID.pem, OUT/ID.key and a copy of ca.pem. The id is
    /// the certificate's common name; put it on the coordinator's allowlist.
    Issue {
        /// Directory with ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Client id (letters, digits, '-', '_', '.').
        #[arg(long, value_name = "ID")]
        name: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = certs::DEFAULT_DAYS)]
        days: i64,
        /// Replace an existing OUT/ID.pem and OUT/ID.key (and a different OUT/ca.pem).
        /// Without it, issue refuses to overwrite any key or certificate.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a certificate (by its serial, with --cert) or every certificate of a client id
    /// (--name): appends to the revocation list the coordinator re-reads while running.
    Revoke {
        /// The coordinator's revocation list (tls.revocation_list).
        #[arg(long, value_name = "FILE")]
        list: PathBuf,
        #[arg(long, value_name = "ID", required_unless_present = "cert")]
        name: Option<String>,
        #[arg(long, value_name = "PEM")]
        cert: Option<PathBuf>,
    },
}

pub fn run_certs(cmd: CertsCmd) -> Result<()> {
    match cmd {
        CertsCmd::Init {
            out,
            hosts,
            days,
            force,
        } => {
            let o = certs::init_with(&out, &hosts, days, force)?;
            println!(
                "CA:          {} (key {}: keep it offline)",
                o.ca_cert.display(),
                o.ca_key.display()
            );
            println!(
                "coordinator: {} (key {})",
                o.server_cert.display(),
                o.server_key.display()
            );
        }
        CertsCmd::Issue {
            ca,
            name,
            out,
            days,
            force,
        } => {
            let serial = certs::issue_with(&ca, &name, &out, days, force)?;
            println!(
                "agent {name}: {}/{name}.pem (key {}/{name}.key), serial {serial}",
                out.display(),
                out.display()
            );
            println!("add \"{name}\" to federation.allowlist in the coordinator's configuration");
        }
        CertsCmd::Revoke { list, name, cert } => {
            let entry = certs::revoke(&list, name.as_deref(), cert.as_deref())?;
            println!("revoked {entry} in {}", list.display());
        }
    }
    Ok(())
}

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
        device: "cpu".into(),
        retry: Default::default(),
        http: Default::default(),
        limits: Default::default(),
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
    if cmd.json {
        let history: Vec<serde_json::Value> = s
            .history
            .iter()
            .map(|h| {
                serde_json::json!({"round": h.round, "clients": h.clients, "mean_loss": h.mean_loss,
                "stsb_dev": h.dev_spearman, "bytes_up": h.bytes_up, "bytes_down": h.bytes_down, "seconds": h.seconds})
            })
            .collect();
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
    if !s.history.is_empty() {
        println!("\n{}", crate::simulate::table_header());
        for h in &s.history {
            println!(
                "{}",
                crate::simulate::table_row(
                    h.round,
                    h.clients,
                    (!h.mean_loss.is_nan()).then_some(h.mean_loss),
                    (!h.dev_spearman.is_nan()).then_some(h.dev_spearman),
                    h.bytes_up,
                    h.bytes_down,
                    h.seconds
                )
            );
        }
    }
    Ok(())
}
