//! The one mapping from a federation task (the coordinator's `[task]`) to a
//! [`TrainConfig`].

use fedmicse_federation::TaskConfig;
use fedmicse_federation::task::Objective;

use crate::data::batches_per_epoch;
use crate::objective::ObjectiveConfig;
use crate::trainer::{TrainConfig, default_ami_layers};

/// The trainer configuration for a task on a shard of `n` sentences.
pub fn task_config(task: &TaskConfig, num_layers: usize, n: usize, seed: u64) -> TrainConfig {
    let batch_size = (task.batch_size as usize).min(n).max(2);
    let total_steps = if task.steps > 0 {
        task.steps as usize
    } else {
        task.epochs as usize * batches_per_epoch(n, batch_size)
    };
    TrainConfig {
        objective: ObjectiveConfig {
            temperature: task.temperature,
            alpha: 1.0,
            lambda: if task.objective == Objective::Simcse {
                0.0
            } else {
                task.lambda
            },
            target_samples: task.ami_samples.max(1) as usize,
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
