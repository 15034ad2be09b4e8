//! Between protocol messages and the crates' own types.

use fedmicse_federation::TaskConfig;

use crate::pb;

impl From<&TaskConfig> for pb::Task {
    fn from(t: &TaskConfig) -> Self {
        let (start, end) = match t.ami_layers.as_slice() {
            [a, b] => (*a, *b),
            _ => (0, 0),
        };
        pb::Task {
            objective: t.objective.clone(),
            epochs: if t.steps > 0 { 0 } else { t.epochs },
            steps: t.steps,
            batch_size: t.batch_size,
            max_len: t.max_len,
            lr: t.lr,
            temperature: t.temperature,
            lambda: t.lambda,
            ami_layer_start: start,
            ami_layer_end: end,
            ami_samples: t.ami_samples,
            weight_decay: t.weight_decay,
            max_grad_norm: t.max_grad_norm,
            seed: t.seed,
            trainable: t.trainable.clone(),
            update_dtype: crate::tensors::parse_dtype(&t.update_dtype)
                .unwrap_or(pb::ElementType::F32) as i32,
        }
    }
}

impl From<&pb::Task> for TaskConfig {
    fn from(t: &pb::Task) -> Self {
        TaskConfig {
            objective: t.objective.clone(),
            epochs: t.epochs,
            steps: t.steps,
            batch_size: t.batch_size,
            max_len: t.max_len,
            lr: t.lr,
            temperature: t.temperature,
            lambda: t.lambda,
            ami_layers: if t.ami_layer_end > t.ami_layer_start {
                vec![t.ami_layer_start, t.ami_layer_end]
            } else {
                Vec::new()
            },
            ami_samples: t.ami_samples,
            weight_decay: t.weight_decay,
            max_grad_norm: t.max_grad_norm,
            seed: t.seed,
            trainable: t.trainable.clone(),
            update_dtype: match pb::ElementType::try_from(t.update_dtype) {
                Ok(pb::ElementType::F16) => "f16",
                Ok(pb::ElementType::Bf16) => "bf16",
                _ => "f32",
            }
            .into(),
        }
    }
}

impl From<fedmicse_encoder::Pooling> for pb::Pooling {
    fn from(p: fedmicse_encoder::Pooling) -> Self {
        match p {
            fedmicse_encoder::Pooling::Cls => pb::Pooling::Cls,
            fedmicse_encoder::Pooling::Mean => pb::Pooling::Mean,
            fedmicse_encoder::Pooling::Pooler => pb::Pooling::Pooler,
        }
    }
}

impl From<pb::Pooling> for fedmicse_encoder::Pooling {
    fn from(p: pb::Pooling) -> Self {
        match p {
            pb::Pooling::Cls => fedmicse_encoder::Pooling::Cls,
            pb::Pooling::Mean => fedmicse_encoder::Pooling::Mean,
            pb::Pooling::Pooler => fedmicse_encoder::Pooling::Pooler,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_round_trip() {
        let t = TaskConfig {
            ami_layers: vec![2, 6],
            trainable: vec!["encoder.".into()],
            ..Default::default()
        };
        assert_eq!(TaskConfig::from(&pb::Task::from(&t)), t);
    }
}
