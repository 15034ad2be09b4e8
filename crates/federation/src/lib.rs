//! The arithmetic and rules of federated averaging, independent of sockets and files.
//!
//! Parameter sets are [`TensorMap`]s keyed by HuggingFace names (the encoder's tensors plus
//! the training head's `mlp.dense.*`). An agent sends `Δ = W_local − W_global` for the
//! round's trainable tensors; the coordinator validates each update, adds `n·Δ` to a running
//! sum (memory stays one model however many agents answer), and commits
//! `W ← W + η · Σ nᵢΔᵢ / Σ nᵢ`.

pub mod aggregate;
pub mod config_file;
pub mod influence;
pub mod partition;
pub mod robust;
pub mod task;
pub mod validate;

pub use aggregate::{WeightedSum, apply_step, delta, l2_norm};
pub use fedmicse_tensors::{HostTensor, TensorMap};
pub use influence::{Influence, StepNorms, StepRefusal, UpdateStats, bound_influence, check_step};
pub use robust::{ServerHyper, ServerOptimizer, ServerState, Strategy, combine, server_step};
pub use task::TaskConfig;
pub use validate::{Refusal, UpdateRules, validate_update};

/// Names of the tensors a task trains: all of `global` when `trainable` is empty, else the
/// names equal to an entry or starting with an entry that ends in '.'.
pub fn trainable_names(global: &TensorMap, trainable: &[String]) -> Vec<String> {
    global
        .keys()
        .filter(|name| fedmicse_tensors::name_matches(name, trainable))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_selection() {
        let mut g = TensorMap::new();
        for n in [
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.output.dense.bias",
            "mlp.dense.weight",
        ] {
            g.insert(n.into(), HostTensor::new(vec![1], vec![0.0]));
        }
        assert_eq!(trainable_names(&g, &[]).len(), 3);
        assert_eq!(
            trainable_names(&g, &["encoder.".into(), "mlp.dense.weight".into()]),
            vec!["encoder.layer.0.output.dense.bias", "mlp.dense.weight"]
        );
    }
}
