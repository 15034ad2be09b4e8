//! `simulate.toml` and what may override it: the command line's settings and the adversary
//! (hostile agents, their attack, the coordinator's defences and aggregation).

use fedmicse_federation::config_file::{base_of, load_toml, resolve};
use fedmicse_federation::partition::Partition;
use fedmicse_runtime::DeviceSpec;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use fedmicse_agent::attack::Attack;
use fedmicse_coordinator::config::{AggregationConfig, EvalConfig};
use fedmicse_federation::robust::Strategy;
use fedmicse_federation::{TaskConfig, UpdateRules};
use serde::{Deserialize, Serialize};

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
    pub partition: Partition,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// rounds.json, rounds.png, global/ (the final model), coordinator/ (its state), certs/.
    pub output: PathBuf,
    /// Agents training at the same time (each uses every core; 1 suits small machines).
    #[serde(default = "d_one")]
    pub max_concurrent_training: usize,
    #[serde(default = "d_device")]
    pub device: DeviceSpec,
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
    /// The coordinator's `[secure_aggregation]`.
    #[serde(default)]
    pub secure_aggregation: fedmicse_coordinator::config::SecureAggregationConfig,
}

/// `[federation]` of `simulate.toml`: the few coordinator settings a simulation varies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimFederation {
    /// Updates needed to commit a round [default: all honest clients].
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
fn d_partition() -> Partition {
    Partition::Iid
}
fn d_seed() -> u64 {
    48
}
fn d_one() -> usize {
    1
}
fn d_device() -> DeviceSpec {
    DeviceSpec::Cpu
}

impl SimulateConfig {
    /// Reads a `simulate.toml`; relative paths in it are taken from the file's directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut c: SimulateConfig = load_toml(path)?;
        let base = base_of(path);
        let dev = c.eval.dev_file.as_mut();
        for p in [&mut c.model, &mut c.data, &mut c.output]
            .into_iter()
            .chain(dev)
        {
            resolve(base, p);
        }
        Ok(c)
    }

    /// Replaces the settings that `overrides` gives.
    pub fn apply(&mut self, overrides: Overrides) {
        let Overrides {
            model,
            clients,
            rounds,
            sample,
            partition,
            seed,
            output,
            update_dtype,
            secure_aggregation,
        } = overrides;
        if let Some(mode) = secure_aggregation {
            self.secure_aggregation.enabled = true;
            self.secure_aggregation.mode = mode;
        }
        self.model = model.unwrap_or(std::mem::take(&mut self.model));
        self.output = output.unwrap_or(std::mem::take(&mut self.output));
        self.partition = partition.unwrap_or(self.partition);
        self.clients = clients.unwrap_or(self.clients);
        self.rounds = rounds.unwrap_or(self.rounds);
        self.sample = sample.unwrap_or(self.sample);
        self.seed = seed.unwrap_or(self.seed);
        self.task.update_dtype = update_dtype.unwrap_or(self.task.update_dtype);
    }
}

/// Settings given on the command line, each replacing the configuration's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub model: Option<PathBuf>,
    pub clients: Option<usize>,
    pub rounds: Option<u64>,
    pub sample: Option<usize>,
    pub partition: Option<Partition>,
    pub seed: Option<u64>,
    pub output: Option<PathBuf>,
    pub update_dtype: Option<fedmicse_wire::ElementType>,
    /// Turns secure aggregation on, in this mode.
    pub secure_aggregation: Option<fedmicse_coordinator::config::SecureMode>,
}

/// The coordinator's bounds on updates in a simulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Defences {
    /// The `[updates]` bounds of the configuration (their defaults when absent).
    #[default]
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

/// Hostile agents and what the coordinator does about them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Adversary {
    /// The last `byzantine` agents are hostile.
    pub byzantine: usize,
    /// What they send (required when `byzantine` > 0).
    pub attack: Option<Attack>,
    pub defences: Defences,
    /// Replaces `[aggregation].strategy`.
    pub aggregation: Option<Strategy>,
}

/// `fedavg`, `median` or `trimmed_mean` (also `trimmed-mean`).
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

/// The name [`parse_strategy`] reads (and `rounds.json` writes).
pub fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::Fedavg => "fedavg",
        Strategy::Median => "median",
        Strategy::TrimmedMean => "trimmed_mean",
    }
}

/// Checks `--byzantine K` against the number of clients, `--attack` and secure
/// aggregation; returns the attack the hostile agents run (`None` without hostile agents).
pub fn check_byzantine(
    k: usize,
    attack: Option<Attack>,
    clients: usize,
    secure: bool,
) -> Result<Option<Attack>> {
    if k > 0 && secure {
        bail!(
            "--byzantine with secure aggregation: the simulated attacks corrupt plain updates, which a secure round never sends; run them without --secure-aggregation"
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byzantine_settings_are_checked() {
        assert_eq!(check_byzantine(0, None, 3, false).unwrap(), None);
        assert_eq!(
            check_byzantine(1, Some(Attack::SampleInflation), 5, false).unwrap(),
            Some(Attack::SampleInflation)
        );
        let e = check_byzantine(3, Some(Attack::Nan), 3, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("less than the number of clients (3)"), "{e}");
        let e = check_byzantine(1, None, 3, false).unwrap_err().to_string();
        assert!(e.contains("needs --attack"), "{e}");
        let e = check_byzantine(0, Some(Attack::Nan), 3, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs --byzantine"), "{e}");
        let e = check_byzantine(1, Some(Attack::Scale), 5, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("without --secure-aggregation"), "{e}");
        assert_eq!(check_byzantine(0, None, 3, true).unwrap(), None);
    }

    #[test]
    fn strategies_parse_and_name_themselves() {
        for s in [Strategy::Fedavg, Strategy::Median, Strategy::TrimmedMean] {
            assert_eq!(parse_strategy(strategy_name(s)).unwrap(), s);
            // rounds.json names the strategy as the coordinator's config does.
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::from(strategy_name(s))
            );
        }
        assert_eq!(
            parse_strategy("trimmed-mean").unwrap(),
            Strategy::TrimmedMean
        );
        assert!(parse_strategy("mean").is_err());
    }

    #[test]
    fn file_paths_are_relative_to_the_file_and_overrides_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim.toml");
        std::fs::write(
            &path,
            "model = \"m\"\ndata = \"/abs/d.txt\"\noutput = \"out\"\nclients = 4\n\
             [eval]\ndev_file = \"dev.tsv\"\n",
        )
        .unwrap();
        let mut c = SimulateConfig::from_file(&path).unwrap();
        assert_eq!(c.model, dir.path().join("m"));
        assert_eq!(c.data, PathBuf::from("/abs/d.txt"));
        assert_eq!(c.eval.dev_file, Some(dir.path().join("dev.tsv")));
        assert_eq!((c.clients, c.rounds, c.seed), (4, 3, 48));
        c.apply(Overrides {
            rounds: Some(7),
            partition: Some(Partition::Dirichlet(0.5)),
            output: Some("elsewhere".into()),
            ..Default::default()
        });
        assert_eq!((c.clients, c.rounds), (4, 7));
        assert_eq!(c.partition, Partition::Dirichlet(0.5));
        assert_eq!(c.output, PathBuf::from("elsewhere"));
        assert_eq!(c.model, dir.path().join("m"));
        std::fs::write(
            &path,
            "model = \"m\"\ndata = \"d\"\noutput = \"o\"\nclient = 4\n",
        )
        .unwrap();
        assert!(SimulateConfig::from_file(&path).is_err());
    }
}
