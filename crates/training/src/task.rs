//! The one mapping from training hyper-parameters (a federated [`TaskConfig`], or the
//! `train` command's flags put into one) to a [`TrainConfig`].

use fedmicse_federation::TaskConfig;
use fedmicse_federation::task::Objective;

use crate::data::batches_per_epoch;
use crate::objective::ObjectiveConfig;
use crate::trainer::{TrainConfig, default_ami_layers};

/// How a task meets the sentences it is trained on: the one rule in which `fedmicse train`
/// and an agent differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// `fedmicse train`: the hyper-parameters as given; the trainer refuses impossible ones
    /// (a batch of fewer than 2 sentences, no AMI samples).
    AsGiven,
    /// An agent obeys a coordinator's task on whatever shard it holds: the batch shrinks to
    /// the shard (never below 2), and at least one AMI sample is drawn (a task may say 0).
    ToShard,
}

/// The trainer configuration for `task` on `sentences` sentences with a model of
/// `num_layers` layers:
///
/// - λ = 0 for SimCSE, `task.lambda` for miCSE;
/// - AMI layers `task.ami_layers` when given as `[start, end]`, else the paper's default for
///   the depth ([`default_ami_layers`]);
/// - total steps `task.steps`, or (when 0) `task.epochs` × batches per epoch, at least 1;
/// - gradient clipping off when `max_grad_norm` ≤ 0;
/// - no warm-up (tasks have none; `train --warmup-steps` sets it on the result);
/// - batch size and AMI samples as `fit` says.
pub fn train_config(
    task: &TaskConfig,
    num_layers: usize,
    sentences: usize,
    seed: u64,
    fit: Fit,
) -> TrainConfig {
    let (batch_size, target_samples) = match fit {
        Fit::AsGiven => (task.batch_size as usize, task.ami_samples as usize),
        Fit::ToShard => (
            (task.batch_size as usize).min(sentences).max(2),
            task.ami_samples.max(1) as usize,
        ),
    };
    let total_steps = if task.steps > 0 {
        task.steps as usize
    } else {
        task.epochs as usize * batches_per_epoch(sentences, batch_size)
    };
    TrainConfig {
        objective: ObjectiveConfig {
            temperature: task.temperature,
            alpha: 1.0,
            lambda: match task.objective {
                Objective::Simcse => 0.0,
                Objective::Micse => task.lambda,
            },
            target_samples,
        },
        ami_layers: match task.ami_layers.as_slice() {
            [a, b] => *a as usize..*b as usize,
            _ => default_ami_layers(num_layers),
        },
        batch_size,
        max_len: task.max_len as usize,
        lr: task.lr,
        weight_decay: task.weight_decay,
        warmup_steps: 0,
        total_steps: total_steps.max(1),
        max_grad_norm: (task.max_grad_norm > 0.0).then_some(task.max_grad_norm),
        seed,
        trainable: task.trainable.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_maps_field_by_field() {
        let task = TaskConfig {
            steps: 7,
            lambda: 5e-4,
            ami_layers: vec![2, 6],
            ami_samples: 80,
            max_grad_norm: 0.0,
            trainable: vec!["encoder.layer.5.".into()],
            ..Default::default()
        };
        let c = train_config(&task, 12, 1000, 9, Fit::AsGiven);
        assert_eq!(c.objective.lambda, 5e-4);
        assert_eq!(c.objective.temperature, 0.05);
        assert_eq!(c.objective.target_samples, 80);
        assert_eq!(c.ami_layers, 2..6);
        assert_eq!((c.batch_size, c.max_len, c.total_steps), (64, 32, 7));
        assert_eq!((c.lr, c.weight_decay, c.warmup_steps), (1e-5, 0.0, 0));
        assert_eq!(c.max_grad_norm, None);
        assert_eq!(c.seed, 9);
        assert_eq!(c.trainable, task.trainable);
        // SimCSE drops the AMI term; no layers given: the paper's for the depth.
        let simcse = TaskConfig {
            objective: Objective::Simcse,
            ..Default::default()
        };
        let c = train_config(&simcse, 6, 1000, 9, Fit::AsGiven);
        assert_eq!(c.objective.lambda, 0.0);
        assert_eq!(c.ami_layers, default_ami_layers(6));
        assert_eq!(c.max_grad_norm, Some(1.0));
        // One epoch of 1000 sentences in batches of 64.
        assert_eq!(c.total_steps, 15);
    }

    #[test]
    fn only_an_agent_fits_the_task_to_its_shard() {
        let task = TaskConfig {
            batch_size: 64,
            epochs: 3,
            ami_samples: 0,
            ..Default::default()
        };
        let shard = train_config(&task, 12, 10, 1, Fit::ToShard);
        assert_eq!(shard.batch_size, 10);
        assert_eq!(shard.objective.target_samples, 1);
        assert_eq!(shard.total_steps, 3);
        let tiny = train_config(&task, 12, 1, 1, Fit::ToShard);
        assert_eq!(tiny.batch_size, 2);
        let given = train_config(&task, 12, 10, 1, Fit::AsGiven);
        assert_eq!(given.batch_size, 64);
        assert_eq!(given.objective.target_samples, 0);
        assert_eq!(given.total_steps, 3);
        // Zero epochs still make one step.
        let none = TaskConfig { epochs: 0, ..task };
        assert_eq!(train_config(&none, 12, 10, 1, Fit::ToShard).total_steps, 1);
    }
}
