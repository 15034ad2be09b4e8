//! Between protocol messages and the crates' own types.

use fedmicse_federation::TaskConfig;
use fedmicse_federation::task::Objective;
use fedmicse_tensors::ElementType;

use crate::pb;

impl From<&TaskConfig> for pb::Task {
    fn from(t: &TaskConfig) -> Self {
        let (start, end) = match t.ami_layers.as_slice() {
            [a, b] => (*a, *b),
            _ => (0, 0),
        };
        pb::Task {
            objective: t.objective.to_string(),
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
            update_dtype: t.update_dtype.tag(),
        }
    }
}

/// A task as received by an agent: refused, never guessed at, when a value is unknown (an
/// element type or objective this build does not know) or absurd (see the ceilings of
/// [`TaskConfig::validate`]). Every `Ok` value passes `validate`.
impl TryFrom<&pb::Task> for TaskConfig {
    type Error = String;

    fn try_from(t: &pb::Task) -> Result<Self, String> {
        let update_dtype = ElementType::from_tag(t.update_dtype)
            .ok_or_else(|| format!("task.update_dtype: unknown element type {}", t.update_dtype))?;
        let objective = t
            .objective
            .parse::<Objective>()
            .map_err(|e| format!("task.objective: {e}"))?;
        // (0, 0) is "the default layers" (what an empty `ami_layers` is sent as).
        let ami_layers = match (t.ami_layer_start, t.ami_layer_end) {
            (0, 0) => Vec::new(),
            (a, b) => vec![a, b],
        };
        let task = TaskConfig {
            objective,
            epochs: t.epochs,
            steps: t.steps,
            batch_size: t.batch_size,
            max_len: t.max_len,
            lr: t.lr,
            temperature: t.temperature,
            lambda: t.lambda,
            ami_layers,
            ami_samples: t.ami_samples,
            weight_decay: t.weight_decay,
            max_grad_norm: t.max_grad_norm,
            seed: t.seed,
            trainable: t.trainable.clone(),
            update_dtype,
        };
        task.validate()?;
        Ok(task)
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
        assert_eq!(TaskConfig::try_from(&pb::Task::from(&t)).unwrap(), t);
        let t = TaskConfig {
            steps: 7,
            update_dtype: ElementType::Bf16,
            objective: Objective::Simcse,
            ..Default::default()
        };
        let mut back = TaskConfig::try_from(&pb::Task::from(&t)).unwrap();
        back.epochs = t.epochs;
        assert_eq!(back, t);
    }

    #[test]
    fn unknown_or_absurd_tasks_are_refused() {
        let good = pb::Task::from(&TaskConfig::default());
        TaskConfig::try_from(&good).unwrap();
        let refused = |f: &dyn Fn(&mut pb::Task), what: &str| {
            let mut t = good.clone();
            f(&mut t);
            let e = TaskConfig::try_from(&t).unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        };
        refused(&|t| t.update_dtype = 7, "update_dtype");
        refused(&|t| t.update_dtype = -1, "update_dtype");
        refused(&|t| t.objective = String::new(), "objective");
        refused(&|t| t.objective = "micse2".into(), "objective");
        refused(&|t| t.steps = 1_000_001, "steps");
        refused(&|t| t.max_len = 4097, "max_len");
        refused(&|t| t.batch_size = u32::MAX, "batch_size");
        refused(&|t| t.ami_samples = 1_000_001, "ami_samples");
        refused(&|t| t.lr = f64::NAN, "lr");
        refused(&|t| t.lr = f64::INFINITY, "lr");
        refused(&|t| t.temperature = f64::NAN, "temperature");
        refused(&|t| t.lambda = f64::INFINITY, "lambda");
        refused(&|t| t.weight_decay = f64::NAN, "weight_decay");
        refused(&|t| t.max_grad_norm = -1.0, "max_grad_norm");
        refused(
            &|t| (t.ami_layer_start, t.ami_layer_end) = (4, 2),
            "ami_layers",
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn float() -> impl Strategy<Value = f64> {
            prop_oneof![
                Just(0.0),
                Just(-1.0),
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY),
                0.0f64..2.0,
                any::<f64>(),
            ]
        }

        fn small_or_any() -> impl Strategy<Value = u32> {
            prop_oneof![0u32..10, Just(0), any::<u32>()]
        }

        fn task() -> impl Strategy<Value = pb::Task> {
            (
                (
                    prop_oneof![
                        Just("micse".to_string()),
                        Just("simcse".to_string()),
                        ".{0,8}"
                    ],
                    small_or_any(),
                    small_or_any(),
                    small_or_any(),
                    small_or_any(),
                    float(),
                    float(),
                    float(),
                ),
                (
                    small_or_any(),
                    small_or_any(),
                    small_or_any(),
                    float(),
                    float(),
                    any::<u64>(),
                    prop::collection::vec(".{0,6}", 0..3),
                    prop_oneof![-2i32..5, any::<i32>()],
                ),
            )
                .prop_map(
                    |(
                        (objective, epochs, steps, batch_size, max_len, lr, temperature, lambda),
                        (
                            ami_layer_start,
                            ami_layer_end,
                            ami_samples,
                            weight_decay,
                            max_grad_norm,
                            seed,
                            trainable,
                            update_dtype,
                        ),
                    )| pb::Task {
                        objective,
                        epochs,
                        steps,
                        batch_size,
                        max_len,
                        lr,
                        temperature,
                        lambda,
                        ami_layer_start,
                        ami_layer_end,
                        ami_samples,
                        weight_decay,
                        max_grad_norm,
                        seed,
                        trainable,
                        update_dtype,
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            /// Any task converts or is refused, never panics; what converts is valid and
            /// asks for no unknown element type.
            #[test]
            fn received_tasks_are_valid_or_refused(t in task()) {
                if let Ok(c) = TaskConfig::try_from(&t) {
                    prop_assert!(c.validate().is_ok());
                    prop_assert!(fedmicse_tensors::ElementType::from_tag(t.update_dtype).is_some());
                    prop_assert!(c.steps <= fedmicse_federation::task::MAX_STEPS);
                    prop_assert!(c.max_len <= fedmicse_federation::task::MAX_LEN);
                    prop_assert!(c.lr.is_finite() && c.temperature.is_finite());
                    // And it travels back unchanged.
                    let again = TaskConfig::try_from(&pb::Task::from(&c));
                    prop_assert!(again.is_ok());
                }
            }
        }
    }
}
