//! One round's local training on the silo's shard.

use fedmicse_encoder::{Encoder, TensorMap};
use fedmicse_federation::TaskConfig;
use fedmicse_training::data::epoch_batches;
use fedmicse_training::{Fit, MlpHead, Trainer, train_config};
use fedmicse_wire::pb::LocalMetrics;

/// Trains from `start` (encoder + head) on `shard` and returns the trained tensors (encoder
/// and head, HF names) and the metrics to report.
pub fn train_locally(
    start: &Encoder,
    head: MlpHead,
    shard: &[String],
    task: &TaskConfig,
    seed: u64,
) -> Result<(TensorMap, LocalMetrics), String> {
    if shard.len() < 2 {
        return Err(format!(
            "the shard has {} sentence(s); training needs at least 2",
            shard.len()
        ));
    }
    // The task's batch may be larger than the shard: fit it (see `Fit::ToShard`).
    let config = train_config(
        task,
        start.model.num_layers(),
        shard.len(),
        seed,
        Fit::ToShard,
    );
    let total = config.total_steps;
    let batch_size = config.batch_size;
    let mut trainer = Trainer::new(start, Some(head), config).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let (mut losses, mut amis) = (Vec::new(), Vec::new());
    let mut epoch = 0u64;
    'outer: loop {
        for batch in epoch_batches(shard.len(), batch_size, seed, epoch) {
            if trainer.steps_done() >= total {
                break 'outer;
            }
            let refs: Vec<&str> = batch.iter().map(|&i| shard[i].as_str()).collect();
            let m = trainer.step(&refs).map_err(|e| e.to_string())?;
            tracing::debug!(step = m.step, loss = m.loss, ami = ?m.ami, "local step");
            losses.push(m.loss);
            if let Some(a) = m.ami {
                amis.push(a);
            }
        }
        epoch += 1;
    }
    let mut tensors = trainer
        .encoder(start)
        .tensors()
        .map_err(|e| e.to_string())?;
    tensors.extend(trainer.head().tensors().map_err(|e| e.to_string())?);
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let metrics = LocalMetrics {
        steps: losses.len() as u32,
        mean_loss: mean(&losses),
        last_loss: losses.last().copied().unwrap_or(0.0),
        mean_ami: mean(&amis),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((tensors, metrics))
}
