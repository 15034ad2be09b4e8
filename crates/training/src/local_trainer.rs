//! [`BurnTrainer`]: the runtime's [`LocalTrainer`] in burn, what every real agent uses.
//! Builds the pulled model (encoder and training head), runs the round's steps over the
//! shard and reads the trained weights back.

use burn::tensor::Device;
use fedmicse_encoder::{Encoder, TensorMap};
use fedmicse_federation::TaskConfig;
use fedmicse_runtime::{DeviceSpec, LocalTrainer, ModelParts, RuntimeError, TrainReport};

use crate::data::epoch_batches;
use crate::trainer::{HEAD_PREFIX, MlpHead, Trainer};

/// Trains on one device (`cpu`, `cuda`, `cuda:N`...).
pub struct BurnTrainer {
    device: Device,
}

impl BurnTrainer {
    /// A trainer on `spec`'s device (opened and probed now).
    pub fn new(spec: DeviceSpec) -> Result<Self, RuntimeError> {
        let device = fedmicse_encoder::device::device(spec)
            .map_err(|e| RuntimeError::Model(e.to_string()))?;
        Ok(BurnTrainer { device })
    }
}

impl LocalTrainer for BurnTrainer {
    fn train(
        &self,
        start: ModelParts<'_>,
        shard: &[String],
        task: &TaskConfig,
        seed: u64,
    ) -> Result<(TensorMap, TrainReport), RuntimeError> {
        if shard.len() < 2 {
            return Err(RuntimeError::Shard(format!(
                "the shard has {} sentence(s); training needs at least 2",
                shard.len()
            )));
        }
        let model = |e: &dyn std::fmt::Display| RuntimeError::Model(e.to_string());
        let (head_tensors, encoder_tensors): (TensorMap, TensorMap) = start
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .partition(|(n, _)| n.starts_with(HEAD_PREFIX));
        let encoder = Encoder::from_memory(start.files.to_vec(), encoder_tensors, &self.device)
            .map_err(|e| model(&e))?;
        let head = MlpHead::from_tensors(&head_tensors, encoder.config.hidden_size, &self.device)
            .map_err(|e| model(&e))?;
        run_steps(&encoder, head, shard, task, seed)
    }
}

/// The round's steps over the shard, in the seeded epoch order.
fn run_steps(
    start: &Encoder,
    head: MlpHead,
    shard: &[String],
    task: &TaskConfig,
    seed: u64,
) -> Result<(TensorMap, TrainReport), RuntimeError> {
    let failed = |e: crate::TrainError| RuntimeError::Training(e.to_string());
    let config = crate::train_config(
        task,
        start.model.num_layers(),
        shard.len(),
        seed,
        crate::Fit::ToShard,
    );
    let total = config.total_steps;
    let batch_size = config.batch_size;
    let mut trainer = Trainer::new(start, Some(head), config).map_err(failed)?;
    let started = std::time::Instant::now();
    let (mut losses, mut amis) = (Vec::new(), Vec::new());
    let mut epoch = 0u64;
    'outer: loop {
        for batch in epoch_batches(shard.len(), batch_size, seed, epoch) {
            if trainer.steps_done() >= total {
                break 'outer;
            }
            let refs: Vec<&str> = batch.iter().map(|&i| shard[i].as_str()).collect();
            let m = trainer.step(&refs).map_err(failed)?;
            tracing::debug!(step = m.step, loss = m.loss, ami = ?m.ami, "local step");
            losses.push(m.loss);
            amis.extend(m.ami);
        }
        epoch += 1;
    }
    let read_back = |e: &dyn std::fmt::Display| RuntimeError::Training(e.to_string());
    let mut tensors = trainer
        .encoder(start)
        .tensors()
        .map_err(|e| read_back(&e))?;
    tensors.extend(trainer.head().tensors().map_err(|e| read_back(&e))?);
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let report = TrainReport {
        steps: losses.len() as u32,
        mean_loss: mean(&losses),
        last_loss: losses.last().copied().unwrap_or(0.0),
        mean_ami: mean(&amis),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((tensors, report))
}
