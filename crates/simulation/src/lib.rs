//! A federation on one machine: a coordinator and N agents in one process, over real gRPC
//! and mutual TLS on 127.0.0.1, each agent with its own shard of a sentence file.
//!
//! - [`config`]: `simulate.toml`, command-line overrides and the adversary (hostile agents,
//!   attack, defences, aggregation).
//! - [`shard`]: IID or topic (k-means + Dirichlet) shards.
//! - [`setup`]: the coordinator's and the agents' configurations, certificates.
//! - [`run`](mod@run): a [`Plan`] checked before anything starts, and [`run()`] returning the round
//!   records.
//! - [`report`]: the round table, `rounds.json`, round plots, reading round logs back.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use fedmicse_simulation::{Adversary, Plan, SimulateConfig, report};
//! let config = SimulateConfig::from_file("configs/simulate.toml".as_ref())?;
//! let plan = Plan::new(config, Adversary::default())?;
//! let outcome = fedmicse_simulation::run(&plan, |r| println!("{}", report::Row::from(r)), std::future::pending()).await?;
//! report::write_outputs(&plan, &outcome)?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod report;
pub mod run;
pub mod setup;
pub mod shard;

pub use config::{Adversary, Defences, Overrides, SimulateConfig};
pub use run::{Outcome, Plan, run};
