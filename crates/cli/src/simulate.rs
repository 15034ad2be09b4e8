//! `fedmicse simulate`: flags → [`fedmicse_simulation::Plan`] → run → report.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use fedmicse_agent::attack::Attack;
use fedmicse_federation::robust::Strategy;
use fedmicse_simulation::config::{parse_strategy, strategy_name};
use fedmicse_simulation::report::{self, Row};
use fedmicse_simulation::{Adversary, Defences, Overrides, Plan, SimulateConfig};

use crate::runtime::{runtime, shutdown_signal};

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
    pub partition: Option<fedmicse_federation::partition::Partition>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output directory [overrides `output`].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Element type of updates: f32, f16, bf16, int8 (~26 % of f32's bytes) or int4
    /// (~14 %), rounded stochastically with error feedback [overrides `[task].update_dtype`].
    #[arg(long, value_name = "TYPE")]
    pub update_dtype: Option<fedmicse_wire::ElementType>,
    /// Secure aggregation: the coordinator learns only the sum of each round's updates
    /// (SecAgg; `secagg+` masks with O(log n) neighbours instead of all). Updates are
    /// integers: --update-dtype int8 or int4 (f32 sends 16-bit integers).
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "secagg",
          value_parser = parse_secure_mode)]
    pub secure_aggregation: Option<fedmicse_coordinator::config::SecureMode>,
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

impl SimulateCmd {
    /// The configuration file with the flags applied, and the adversary.
    fn into_settings(self) -> Result<(SimulateConfig, Adversary)> {
        let mut config = SimulateConfig::from_file(&self.config)?;
        config.apply(Overrides {
            model: self.model,
            clients: self.clients,
            rounds: self.rounds,
            sample: self.sample,
            partition: self.partition,
            seed: self.seed,
            output: self.output,
            update_dtype: self.update_dtype,
            secure_aggregation: self.secure_aggregation,
        });
        let adversary = Adversary {
            byzantine: self.byzantine,
            attack: self.attack,
            defences: self.defences,
            aggregation: self.aggregation,
        };
        Ok((config, adversary))
    }
}

pub fn run_simulate(cmd: SimulateCmd) -> Result<()> {
    let (config, adversary) = cmd.into_settings()?;
    let plan = Plan::new(config, adversary)?;
    announce(&plan);
    println!("{}", report::table_header());
    let outcome = runtime()?.block_on(fedmicse_simulation::run(
        &plan,
        |r| println!("{}", Row::from(r)),
        shutdown_signal(),
    ))?;
    report::write_outputs(&plan, &outcome)?;
    let history = &outcome.history;
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
        plan.config.output.display()
    );
    Ok(())
}

/// What is about to run, on stderr.
fn announce(plan: &Plan) {
    let c = &plan.config;
    let sizes: Vec<usize> = plan.shards.iter().map(Vec::len).collect();
    eprintln!(
        "simulating {} agents × {} rounds on {} sentences ({}: shards {:?}), model {}",
        c.clients,
        c.rounds,
        plan.sentences,
        plan.partition,
        sizes,
        c.model.display()
    );
    let aggregation = strategy_name(c.aggregation.strategy);
    match plan.attack {
        Some(attack) => eprintln!(
            "hostile agents {:?} (attack {attack}); defences {}, aggregation {aggregation}",
            plan.hostile, plan.defences
        ),
        None => eprintln!(
            "no hostile agents; defences {}, aggregation {aggregation}",
            plan.defences
        ),
    }
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
    fn attack_flags_parse() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            (c.byzantine, c.attack, c.defences, c.aggregation),
            (0, None, Defences::Default, None)
        );
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
        assert_eq!(c.byzantine, 1);
        assert_eq!(c.attack, Some(Attack::SampleInflation));
        assert_eq!(c.defences, Defences::None);
        assert_eq!(c.aggregation, Some(Strategy::TrimmedMean));

        assert!(parse(&["--attack", "flood"]).is_err());
        assert!(parse(&["--defences", "some"]).is_err());
        assert!(parse(&["--aggregation", "mean"]).is_err());
        assert!(parse(&["--byzantine", "-1"]).is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim.toml");
        std::fs::write(&path, "model = \"m\"\ndata = \"d\"\noutput = \"o\"\n").unwrap();
        let cli = Cli::try_parse_from([
            "simulate",
            "--config",
            path.to_str().unwrap(),
            "--clients",
            "5",
            "--seed",
            "9",
            "--byzantine",
            "2",
            "--attack",
            "nan",
        ])
        .unwrap();
        let (c, a) = cli.cmd.into_settings().unwrap();
        assert_eq!((c.clients, c.seed, c.rounds), (5, 9, 3));
        assert_eq!(c.model, dir.path().join("m"));
        assert_eq!((a.byzantine, a.attack), (2, Some(Attack::Nan)));
    }
}

fn parse_secure_mode(s: &str) -> Result<fedmicse_coordinator::config::SecureMode, String> {
    use fedmicse_coordinator::config::SecureMode;
    match s {
        "secagg" => Ok(SecureMode::Secagg),
        "secagg+" => Ok(SecureMode::SecaggPlus),
        other => Err(format!("{other:?}: expected secagg or secagg+")),
    }
}
