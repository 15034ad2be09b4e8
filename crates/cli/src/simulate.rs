//! `fedmicse simulate`: a coordinator and N agents in one process, over real gRPC and
//! mutual TLS on 127.0.0.1, each agent with its own shard of a sentence file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use fedmicse_agent::attack::Attack;
use fedmicse_agent::{Agent, AgentConfig};
use fedmicse_coordinator::config::{
    AggregationConfig, EvalConfig, FederationConfig, InferenceConfig, ServerConfig, TlsConfig,
};
use fedmicse_coordinator::{Coordinator, CoordinatorConfig, RoundRecord};
use fedmicse_encoder::{EmbedOptions, Encoder, Pooling, parse_device};
use fedmicse_federation::partition::{self, Partition};
use fedmicse_federation::robust::Strategy;
use fedmicse_federation::{TaskConfig, UpdateRules};
use fedmicse_plot::{Panel, Series, line_panels};
use fedmicse_training::data::{read_sentences, sample};
use fedmicse_wire::certs;
use serde::{Deserialize, Serialize};

use crate::fed::{runtime, shutdown_signal};

/// `simulate.toml`. Paths are relative to the file's directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulateConfig {
    /// Starting checkpoint (HuggingFace BERT directory).
    pub model: PathBuf,
    /// Sentences to spread over the agents, one per line.
    pub data: PathBuf,
    /// Draw this many sentences from `data` first (0 = all).
    #[serde(default)]
    pub sample: usize,
    #[serde(default = "d_clients")]
    pub clients: usize,
    #[serde(default = "d_rounds")]
    pub rounds: u64,
    /// "iid" or "dirichlet:ALPHA" (non-IID over k-means clusters of the sentences).
    #[serde(default = "d_partition")]
    pub partition: String,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// rounds.json, rounds.png, global/ (the final model), coordinator/ (its state), certs/.
    pub output: PathBuf,
    /// Agents training at the same time (each uses every core; 1 suits small machines).
    #[serde(default = "d_one")]
    pub max_concurrent_training: usize,
    #[serde(default = "d_device")]
    pub device: String,
    #[serde(default)]
    pub federation: SimFederation,
    #[serde(default)]
    pub task: TaskConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub updates: UpdateRules,
    /// How the coordinator combines updates (the coordinator's `[aggregation]`).
    #[serde(default)]
    pub aggregation: AggregationConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimFederation {
    /// Updates needed to commit a round [default: all clients].
    pub min_clients: Option<usize>,
    pub fraction: f64,
    pub server_lr: f64,
    pub round_deadline_secs: u64,
}

impl Default for SimFederation {
    fn default() -> Self {
        SimFederation {
            min_clients: None,
            fraction: 1.0,
            server_lr: 1.0,
            round_deadline_secs: 3600,
        }
    }
}

fn d_clients() -> usize {
    3
}
fn d_rounds() -> u64 {
    3
}
fn d_partition() -> String {
    "iid".into()
}
fn d_seed() -> u64 {
    48
}
fn d_one() -> usize {
    1
}
fn d_device() -> String {
    "cpu".into()
}

#[derive(Args, Debug)]
pub struct SimulateCmd {
    /// Simulation configuration (commented example: configs/simulate.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Starting checkpoint [overrides `model`].
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Number of agents [overrides `clients`].
    #[arg(long)]
    pub clients: Option<usize>,
    /// Federation rounds [overrides `rounds`].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Sentences drawn from the data file [overrides `sample`].
    #[arg(long)]
    pub sample: Option<usize>,
    /// iid or dirichlet:ALPHA [overrides `partition`].
    #[arg(long)]
    pub partition: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output directory [overrides `output`].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Make the last K agents hostile (K < clients); they train honestly, then send what
    /// --attack says. `min_clients` becomes clients − K unless the config sets it.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub byzantine: usize,
    /// What the hostile agents do: scale (×1000), sign-flip (×−10), nan, sample-inflation
    /// (claim 10,000,000 samples, send ×−10), noise (100× the norm), stall (send the header,
    /// then nothing). Required with --byzantine.
    #[arg(long, value_name = "NAME", value_parser = |s: &str| s.parse::<Attack>())]
    pub attack: Option<Attack>,
    /// The coordinator's bounds on updates: default (the config's `[updates]`) or none
    /// (plain FedAvg of every well-formed update: the baseline of an attack).
    #[arg(long, value_enum, default_value = "default")]
    pub defences: Defences,
    /// fedavg, median or trimmed_mean [overrides `[aggregation].strategy`].
    #[arg(long, value_name = "STRATEGY", value_parser = parse_strategy)]
    pub aggregation: Option<Strategy>,
}

/// `--defences`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Defences {
    /// The `[updates]` bounds of the configuration (their defaults when absent).
    Default,
    /// `UpdateRules::none()`: no bound on any agent's influence.
    None,
}

impl std::fmt::Display for Defences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Defences::Default => "default",
            Defences::None => "none",
        })
    }
}

pub fn parse_strategy(s: &str) -> Result<Strategy, String> {
    match s {
        "fedavg" => Ok(Strategy::Fedavg),
        "median" => Ok(Strategy::Median),
        "trimmed_mean" | "trimmed-mean" => Ok(Strategy::TrimmedMean),
        _ => Err(format!(
            "unknown aggregation {s:?}: fedavg, median or trimmed_mean"
        )),
    }
}

fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::Fedavg => "fedavg",
        Strategy::Median => "median",
        Strategy::TrimmedMean => "trimmed_mean",
    }
}

/// What `rounds.json` holds: the setting of the run and one record per committed round.
#[derive(Debug, Serialize)]
pub struct RunLog<'a> {
    pub clients: usize,
    /// Ids of the hostile agents (empty without --byzantine).
    pub byzantine: Vec<String>,
    pub attack: Option<Attack>,
    pub defences: Defences,
    pub aggregation: &'static str,
    pub updates: &'a UpdateRules,
    pub rounds: &'a [RoundRecord],
}

/// Reads a `rounds.json` written by `simulate` (an object with `rounds`, or the bare array
/// of older versions) or a coordinator's `rounds.jsonl`.
pub fn read_rounds(path: &Path) -> Result<Vec<RoundRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let whole: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    let records: Vec<RoundRecord> = match whole {
        Some(v @ serde_json::Value::Array(_)) => {
            serde_json::from_value(v).with_context(|| format!("{}", path.display()))?
        }
        Some(serde_json::Value::Object(mut o)) if o.get("rounds").is_some_and(|r| r.is_array()) => {
            serde_json::from_value(o.remove("rounds").expect("rounds"))
                .with_context(|| format!("{}", path.display()))?
        }
        _ => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
            })
            .collect::<Result<_>>()?,
    };
    if records.is_empty() {
        bail!("{}: no rounds", path.display());
    }
    Ok(records)
}

impl SimulateConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut c: SimulateConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.model, &mut c.data, &mut c.output] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(d) = &mut c.eval.dev_file
            && d.is_relative()
        {
            *d = base.join(&*d);
        }
        Ok(c)
    }
}

pub fn table_header() -> String {
    format!(
        "{:>5} {:>7} {:>10} {:>9} {:>10} {:>10} {:>8}",
        "round", "clients", "mean_loss", "stsb_dev", "bytes_up", "bytes_down", "seconds"
    )
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2}G", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}M", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}K", b as f64 / 1024.0),
        b => format!("{b}"),
    }
}

pub fn table_row(
    round: u64,
    clients: u32,
    mean_loss: Option<f64>,
    dev: Option<f64>,
    up: u64,
    down: u64,
    seconds: f64,
) -> String {
    let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    format!(
        "{:>5} {:>7} {:>10} {:>9} {:>10} {:>10} {:>8.1}",
        round,
        clients,
        opt(mean_loss, 4),
        opt(dev, 2),
        human(up),
        human(down),
        seconds
    )
}

fn row(r: &RoundRecord) -> String {
    table_row(
        r.round,
        r.clients,
        r.mean_loss,
        r.stsb_dev,
        r.bytes_up,
        r.bytes_down,
        r.seconds,
    )
}

/// Splits sentences over clients. Non-IID clusters by k-means on the starting model's
/// sentence embeddings (topics), then spreads each cluster with Dirichlet proportions.
fn make_shards(
    sentences: &[String],
    clients: usize,
    how: Partition,
    seed: u64,
    model: &Path,
    device: &str,
) -> Result<Vec<Vec<String>>> {
    let idx = match how {
        Partition::Iid => partition::iid(sentences.len(), clients, seed),
        Partition::Dirichlet(alpha) => {
            let device = parse_device(device)?;
            let enc = Encoder::load(model, &device)?;
            let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
            let opts = EmbedOptions {
                pooling: Pooling::Mean,
                normalize: true,
                max_len: Some(32),
                batch_size: 64,
            };
            let vectors = enc.embed(&refs, &opts)?;
            let k = (sentences.len() / 25).clamp(2, 10);
            let labels = partition::kmeans(&vectors, k, seed, 50);
            partition::dirichlet(&labels, clients, alpha, seed, 2)
        }
    };
    Ok(idx
        .into_iter()
        .map(|s| s.into_iter().map(|i| sentences[i].clone()).collect())
        .collect())
}

/// Checks `--byzantine K` against the number of clients and `--attack`; returns the attack
/// the hostile agents run (`None` without hostile agents).
pub fn check_byzantine(k: usize, attack: Option<Attack>, clients: usize) -> Result<Option<Attack>> {
    if k == 0 {
        if let Some(a) = attack {
            bail!("--attack {a} needs --byzantine K (how many agents are hostile)");
        }
        return Ok(None);
    }
    if k >= clients {
        bail!(
            "--byzantine {k} must be less than the number of clients ({clients}): at least one agent must be honest"
        );
    }
    match attack {
        Some(a) => Ok(Some(a)),
        None => bail!(
            "--byzantine {k} needs --attack: scale, sign-flip, nan, sample-inflation, noise or stall"
        ),
    }
}

pub fn run_simulate(cmd: SimulateCmd) -> Result<()> {
    let mut c = SimulateConfig::from_file(&cmd.config)?;
    if let Some(m) = cmd.model {
        c.model = m;
    }
    if let Some(n) = cmd.clients {
        c.clients = n;
    }
    if let Some(r) = cmd.rounds {
        c.rounds = r;
    }
    if let Some(s) = cmd.sample {
        c.sample = s;
    }
    if let Some(p) = cmd.partition {
        c.partition = p;
    }
    if let Some(s) = cmd.seed {
        c.seed = s;
    }
    if let Some(o) = cmd.output {
        c.output = o;
    }
    if c.clients == 0 {
        bail!("clients must be at least 1");
    }
    if c.max_concurrent_training == 0 {
        bail!("max_concurrent_training must be at least 1");
    }
    let hostile = check_byzantine(cmd.byzantine, cmd.attack, c.clients)?;
    if cmd.defences == Defences::None {
        c.updates = UpdateRules::none();
    }
    if let Some(s) = cmd.aggregation {
        c.aggregation.strategy = s;
    }
    let how: Partition = c.partition.parse().map_err(anyhow::Error::msg)?;
    fedmicse_encoder::encoder::model_dir(&c.model)?;

    let mut sentences = read_sentences(&c.data)?;
    if c.sample > 0 {
        sentences = sample(&sentences, c.sample, c.seed);
    }
    let shards = make_shards(&sentences, c.clients, how, c.seed, &c.model, &c.device)?;
    if let Some((i, s)) = shards.iter().enumerate().find(|(_, s)| s.len() < 2) {
        bail!(
            "agent {} would get {} sentence(s): use more sentences or fewer clients",
            i + 1,
            s.len()
        );
    }
    let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
    eprintln!(
        "simulating {} agents × {} rounds on {} sentences ({}: shards {:?}), model {}",
        c.clients,
        c.rounds,
        sentences.len(),
        how,
        sizes,
        c.model.display()
    );

    let out = c.output.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // A simulation starts from scratch: throw away state and certificates of a previous run.
    let state_dir = out.join("coordinator");
    let certs_dir = out.join("certs");
    for d in [&state_dir, &certs_dir] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    certs::init(&certs_dir, &[], 7)?;
    let ids: Vec<String> = (1..=c.clients).map(|i| format!("agent-{i}")).collect();
    // The last K agents are the hostile ones.
    let byzantine: Vec<String> = ids[c.clients - cmd.byzantine..].to_vec();
    if let Some(attack) = hostile {
        eprintln!(
            "hostile agents {byzantine:?} (attack {attack}); defences {}, aggregation {}",
            cmd.defences,
            strategy_name(c.aggregation.strategy)
        );
    } else {
        eprintln!(
            "no hostile agents; defences {}, aggregation {}",
            cmd.defences,
            strategy_name(c.aggregation.strategy)
        );
    }
    for id in &ids {
        certs::issue(&certs_dir, id, &certs_dir, 7)?;
    }

    let coordinator_config = CoordinatorConfig {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            allow_plaintext: false,
            ..Default::default()
        },
        tls: Some(TlsConfig {
            ca: certs_dir.join("ca.pem"),
            cert: certs_dir.join("coordinator.pem"),
            key: certs_dir.join("coordinator.key"),
            revocation_list: None,
        }),
        federation: FederationConfig {
            allowlist: ids.clone(),
            rounds: c.rounds,
            // Honest agents alone can commit a round.
            min_clients: c
                .federation
                .min_clients
                .unwrap_or(c.clients - cmd.byzantine)
                .min(c.clients),
            fraction: c.federation.fraction,
            round_deadline_secs: c.federation.round_deadline_secs,
            server_lr: c.federation.server_lr,
            agent_timeout_secs: 15,
            poll_ms: 200,
            keep_checkpoints: (c.rounds as usize + 1).max(1),
            seed: c.seed,
            device: c.device.clone(),
            ..FederationConfig::new(c.model.clone(), state_dir.clone())
        },
        updates: c.updates.clone(),
        task: c.task.clone(),
        eval: c.eval.clone(),
        inference: InferenceConfig::default(),
        aggregation: c.aggregation.clone(),
        http: Default::default(),
    };
    coordinator_config.validate().map_err(anyhow::Error::msg)?;

    let rt = runtime()?;
    let history = rt.block_on(async {
        let coordinator = tokio::task::spawn_blocking(move || Coordinator::new(coordinator_config))
            .await?
            .map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let running = coordinator.serve(listener).await.map_err(anyhow::Error::msg)?;
        let port = running.addr.port();
        let gate = Arc::new(tokio::sync::Semaphore::new(c.max_concurrent_training));
        let device: fedmicse_runtime::DeviceSpec = c.device.parse().map_err(anyhow::Error::msg)?;
        let trainer = Arc::new(fedmicse_training::BurnTrainer::new(device)?);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut agents = Vec::new();
        for (id, shard) in ids.iter().zip(shards) {
            let cfg = AgentConfig {
                coordinator: format!("https://127.0.0.1:{port}"),
                server_name: Some("localhost".into()),
                tls: Some(fedmicse_wire::TlsFiles {
                    ca: certs_dir.join("ca.pem"),
                    cert: certs_dir.join(format!("{id}.pem")),
                    key: certs_dir.join(format!("{id}.key")),
                }),
                plaintext_client_id: None,
                data: fedmicse_agent::config::DataConfig {
                    file: PathBuf::from("(in memory)"),
                    sample: None,
                    seed: c.seed,
                },
                device,
                retry: Default::default(),
                http: Default::default(),
                limits: Default::default(),
            };
            let mut agent =
                Agent::new(&cfg, shard, trainer.clone())?.with_train_gate(gate.clone());
            if let Some(a) = hostile
                && byzantine.contains(id)
            {
                agent = agent.with_attack(a);
            }
            agents.push(tokio::spawn(agent.run(stop_rx.clone())));
        }

        println!("{}", table_header());
        let mut printed = 0;
        let mut print_new = |history: &[RoundRecord]| {
            for r in &history[printed.min(history.len())..] {
                println!("{}", row(r));
            }
            printed = history.len();
        };
        let interrupted = loop {
            tokio::select! {
                _ = running.wait_done() => break false,
                _ = shutdown_signal() => break true,
                _ = tokio::time::sleep(Duration::from_millis(500)) => print_new(&running.history()),
            }
        };
        print_new(&running.history());
        let _ = stop_tx.send(true);
        for a in agents {
            match tokio::time::timeout(Duration::from_secs(30), a).await {
                Ok(Ok(Ok(report))) => tracing::debug!(agent = %report.client_id, up = report.bytes_up, down = report.bytes_down, "agent done"),
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "agent failed"),
                Ok(Err(e)) => tracing::error!(error = %e, "agent task panicked"),
                Err(_) => tracing::warn!("agent did not stop in time"),
            }
        }
        let history = running.history();
        let last = running.checkpoint_dir(history.last().map_or(0, |r| r.round));
        running.shutdown().await;
        if interrupted {
            bail!("interrupted");
        }
        anyhow::Ok((history, last))
    })?;
    let (history, last_dir) = history;

    let json = serde_json::to_string_pretty(&RunLog {
        clients: c.clients,
        byzantine: byzantine.clone(),
        attack: hostile,
        defences: cmd.defences,
        aggregation: strategy_name(c.aggregation.strategy),
        updates: &c.updates,
        rounds: &history,
    })?;
    std::fs::write(out.join("rounds.json"), json)?;
    plot_rounds(&out.join("rounds.png"), &history)?;
    let global = out.join("global");
    if global.exists() {
        std::fs::remove_dir_all(&global)?;
    }
    std::fs::create_dir_all(&global)?;
    copy_dir(&last_dir, &global)?;
    if let (Some(first), Some(last)) = (history.first(), history.last())
        && let (Some(a), Some(b)) = (first.stsb_dev, last.stsb_dev)
    {
        eprintln!(
            "STS dev Spearman: {a:.2} before, {b:.2} after {} rounds",
            last.round
        );
    }
    eprintln!(
        "wrote {0}/rounds.json, {0}/rounds.png and the final model {0}/global/",
        out.display()
    );
    Ok(())
}

/// Copies a checkpoint directory (files and the sentence-transformers `1_Pooling/`).
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// STS dev, mean local loss and traffic per round.
pub fn plot_rounds(path: &Path, history: &[RoundRecord]) -> Result<()> {
    let pts = |f: &dyn Fn(&RoundRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|r| f(r).map(|v| (r.round as f64, v)))
            .collect()
    };
    let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
    let panels = vec![
        Panel {
            title: "Global model: STS dev Spearman ×100".into(),
            x_label: "round".into(),
            y_label: "Spearman".into(),
            series: vec![Series::marked("dev", pts(&|r| r.stsb_dev))],
            y_from_zero: false,
        },
        Panel {
            title: "Mean local training loss".into(),
            x_label: "round".into(),
            y_label: "loss".into(),
            series: vec![Series::marked("loss", pts(&|r| r.mean_loss))],
            y_from_zero: false,
        },
        Panel {
            title: "Traffic per round".into(),
            x_label: "round".into(),
            y_label: "MiB".into(),
            series: vec![
                Series::marked(
                    "up (deltas)",
                    pts(&|r| (r.round > 0).then(|| mb(r.bytes_up))),
                ),
                Series::marked(
                    "down (models)",
                    pts(&|r| (r.round > 0).then(|| mb(r.bytes_down))),
                ),
            ],
            y_from_zero: true,
        },
    ];
    line_panels(path, "fedmicse federation", &panels, 900).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        cmd: SimulateCmd,
    }

    fn parse(args: &[&str]) -> Result<SimulateCmd, clap::Error> {
        let mut all = vec!["simulate", "--config", "sim.toml"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|c| c.cmd)
    }

    #[test]
    fn attack_flags_parse_and_are_checked() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            (c.byzantine, c.attack, c.defences, c.aggregation),
            (0, None, Defences::Default, None)
        );
        assert_eq!(check_byzantine(c.byzantine, c.attack, 3).unwrap(), None);

        let c = parse(&[
            "--byzantine",
            "1",
            "--attack",
            "sample-inflation",
            "--defences",
            "none",
            "--aggregation",
            "trimmed_mean",
        ])
        .unwrap();
        assert_eq!(c.attack, Some(Attack::SampleInflation));
        assert_eq!(c.defences, Defences::None);
        assert_eq!(c.aggregation, Some(Strategy::TrimmedMean));
        assert_eq!(
            check_byzantine(1, c.attack, 5).unwrap(),
            Some(Attack::SampleInflation)
        );

        assert!(parse(&["--attack", "flood"]).is_err());
        assert!(parse(&["--defences", "some"]).is_err());
        assert!(parse(&["--aggregation", "mean"]).is_err());
        assert!(parse(&["--byzantine", "-1"]).is_err());

        let e = check_byzantine(3, Some(Attack::Nan), 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("less than the number of clients (3)"), "{e}");
        let e = check_byzantine(1, None, 3).unwrap_err().to_string();
        assert!(e.contains("needs --attack"), "{e}");
        let e = check_byzantine(0, Some(Attack::Nan), 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs --byzantine"), "{e}");
    }

    #[test]
    fn rounds_json_names_the_setting_and_reads_back() {
        let rounds = vec![RoundRecord {
            round: 0,
            clients: 0,
            mean_loss: None,
            stsb_dev: Some(82.0),
            bytes_up: 0,
            bytes_down: 0,
            seconds: 0.0,
            refused: Default::default(),
            bounded: 0,
            step_ratio: None,
            digest: None,
        }];
        let rules = UpdateRules::none();
        let log = RunLog {
            clients: 5,
            byzantine: vec!["agent-5".into()],
            attack: Some(Attack::SignFlip),
            defences: Defences::None,
            aggregation: strategy_name(Strategy::Median),
            updates: &rules,
            rounds: &rounds,
        };
        let v = serde_json::to_value(&log).unwrap();
        assert_eq!(v["byzantine"][0], "agent-5");
        assert_eq!(v["attack"], "sign-flip");
        assert_eq!(v["defences"], "none");
        assert_eq!(v["aggregation"], "median");
        assert_eq!(v["rounds"][0]["stsb_dev"], 82.0);
        let dir = std::env::temp_dir().join(format!("fedmicse-runlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("rounds.json");
        std::fs::write(&p, serde_json::to_string_pretty(&log).unwrap()).unwrap();
        assert_eq!(read_rounds(&p).unwrap(), rounds);
        std::fs::write(&p, serde_json::to_string(&rounds[0]).unwrap() + "\n").unwrap();
        assert_eq!(read_rounds(&p).unwrap(), rounds);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
