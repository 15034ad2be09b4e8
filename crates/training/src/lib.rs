//! miCSE training on a local shard, and SentEval-style STS evaluation.

pub mod data;
pub mod error;
pub mod local_trainer;
pub mod objective;
pub mod run;
pub use fedmicse_runtime::sts;
pub mod task;
pub mod trainer;

pub use error::{Result, TrainError};
pub use local_trainer::BurnTrainer;
pub use run::{Budget, DevSet, Observer, RunConfig, RunSummary};
pub use task::{Fit, train_config};
pub use trainer::{MlpHead, StepMetrics, TrainConfig, Trainer, default_ami_layers, paper_lambda};
