//! Bounded influence: how much any one update may move the global model. Applied to the
//! round's accepted updates at aggregation time, when the round's medians are known, and
//! to the aggregated step before it is committed. Pure arithmetic; see [`UpdateRules`] for
//! which bound covers which attack.

use crate::{TensorMap, UpdateRules};

/// What the coordinator knows of one accepted update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    /// Samples the update claims.
    pub num_samples: u64,
    /// Shard size the agent declared at Join (0 = unknown).
    pub declared: u64,
    /// L2 norm of the delta as received.
    pub norm: f64,
    /// Factor from the fixed `max_norm` clip (1 when not clipped).
    pub scale: f64,
}

/// The weight and scale an update enters the aggregate with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Influence {
    pub weight: f64,
    pub scale: f64,
}

impl Influence {
    /// Whether the bounds changed anything for an update with these stats.
    pub fn bounded(&self, s: &UpdateStats) -> bool {
        self.weight < s.num_samples as f64 || self.scale < s.scale
    }
}

/// The lower median: with an even count the smaller middle value, so with two updates a
/// hostile one can never set the bound by itself.
fn lower_median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[(v.len() - 1) / 2])
}

/// Caps every update's weight (claimed samples ≤ declared shard ≤ `max_weight` ≤
/// `max_weight_ratio` × median) and scale (norm ≤ `norm_multiplier` × median norm).
pub fn bound_influence(stats: &[UpdateStats], rules: &UpdateRules) -> Vec<Influence> {
    let mut weights: Vec<f64> = stats
        .iter()
        .map(|s| {
            let mut w = s.num_samples;
            if s.declared > 0 {
                w = w.min(s.declared);
            }
            if rules.max_weight > 0 {
                w = w.min(rules.max_weight);
            }
            w as f64
        })
        .collect();
    if rules.max_weight_ratio > 0.0
        && let Some(m) = lower_median(weights.clone())
    {
        let cap = rules.max_weight_ratio * m;
        for w in &mut weights {
            *w = w.min(cap);
        }
    }
    let bound = (rules.norm_multiplier > 0.0)
        .then(|| lower_median(stats.iter().map(|s| s.norm * s.scale).collect()))
        .flatten()
        .map(|m| rules.norm_multiplier * m);
    stats
        .iter()
        .zip(weights)
        .map(|(s, weight)| {
            let mut scale = s.scale;
            let norm = s.norm * s.scale;
            // A zero median says nothing about a fair size (or norms were not recorded).
            if let Some(b) = bound
                && b > 0.0
                && norm > b
            {
                scale *= b / norm;
            }
            Influence { weight, scale }
        })
        .collect()
}

/// Why an aggregated step was not committed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepRefusal {
    #[error("the new global model has {count} non-finite value(s) in {name}")]
    NonFinite { name: String, count: usize },
    #[error(
        "the step's norm {step:.4} is {ratio:.3} of the model's norm {model:.4}, above the bound {bound}"
    )]
    TooLarge {
        step: f64,
        model: f64,
        ratio: f64,
        bound: f64,
    },
}

impl StepRefusal {
    pub fn kind(&self) -> &'static str {
        match self {
            StepRefusal::NonFinite { .. } => "non_finite",
            StepRefusal::TooLarge { .. } => "step_norm",
        }
    }
}

/// Norms of a commit: ‖W_new − W_old‖ and ‖W_old‖ over the tensors of `new` that `old` has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepNorms {
    pub step: f64,
    pub model: f64,
}

impl StepNorms {
    pub fn ratio(&self) -> f64 {
        if self.model > 0.0 {
            self.step / self.model
        } else if self.step > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    }
}

/// Checks a new global model against the one it replaces: every value finite, and the
/// change within `max_step_ratio` of the old model's norm. `names` are the trained tensors.
pub fn check_step(
    old: &TensorMap,
    new: &TensorMap,
    names: &[String],
    rules: &UpdateRules,
) -> Result<StepNorms, StepRefusal> {
    let (mut step, mut model) = (0f64, 0f64);
    for name in names {
        let (Some(o), Some(n)) = (old.get(name), new.get(name)) else {
            continue;
        };
        let bad = n.data.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            return Err(StepRefusal::NonFinite {
                name: name.clone(),
                count: bad,
            });
        }
        for (&a, &b) in o.data.iter().zip(&n.data) {
            let d = b as f64 - a as f64;
            step += d * d;
            model += a as f64 * a as f64;
        }
    }
    let norms = StepNorms {
        step: step.sqrt(),
        model: model.sqrt(),
    };
    if !norms.step.is_finite() {
        return Err(StepRefusal::NonFinite {
            name: "(step norm)".into(),
            count: 1,
        });
    }
    if rules.max_step_ratio > 0.0 && norms.ratio() > rules.max_step_ratio {
        return Err(StepRefusal::TooLarge {
            step: norms.step,
            model: norms.model,
            ratio: norms.ratio(),
            bound: rules.max_step_ratio,
        });
    }
    Ok(norms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostTensor;

    fn stats(n: u64, declared: u64, norm: f64) -> UpdateStats {
        UpdateStats {
            num_samples: n,
            declared,
            norm,
            scale: 1.0,
        }
    }

    #[test]
    fn inflated_samples_count_as_a_bounded_multiple_of_the_median() {
        let rules = UpdateRules::default();
        let s = [
            stats(100, 100, 1.0),
            stats(120, 120, 1.1),
            stats(90, 90, 0.9),
            stats(110, 110, 1.0),
            stats(10_000_000, 10_000_000, 1.0),
        ];
        let inf = bound_influence(&s, &rules);
        // Median weight 110: the liar counts as 220, the honest as they claim.
        assert_eq!(inf[4].weight, 220.0);
        assert_eq!(inf[0].weight, 100.0);
        let total: f64 = inf.iter().map(|i| i.weight).sum();
        assert!(inf[4].weight / total < 0.35);
        // Claims above the Join declaration are capped to it, and to max_weight.
        let inf = bound_influence(&[stats(500, 50, 1.0)], &rules);
        assert_eq!(inf[0].weight, 50.0);
        let r = UpdateRules {
            max_weight: 30,
            ..UpdateRules::none()
        };
        assert_eq!(bound_influence(&[stats(500, 0, 1.0)], &r)[0].weight, 30.0);
        // No bounds: the claim stands.
        assert_eq!(
            bound_influence(&s, &UpdateRules::none())[4].weight,
            10_000_000.0
        );
    }

    #[test]
    fn huge_norms_are_scaled_to_a_multiple_of_the_median() {
        let rules = UpdateRules::default();
        let s = [stats(10, 0, 1.0), stats(10, 0, 1e30)];
        let inf = bound_influence(&s, &rules);
        // Lower median of two = the honest norm; the other is scaled to 2× it.
        assert_eq!(inf[0].scale, 1.0);
        assert!((inf[1].scale * 1e30 - 2.0).abs() < 1e-9);
        assert!(inf[1].bounded(&s[1]) && !inf[0].bounded(&s[0]));
        let s = [stats(10, 0, 1.0), stats(10, 0, 1.5), stats(10, 0, 0.8)];
        assert!(
            bound_influence(&s, &rules)
                .iter()
                .all(|i| i.scale == 1.0 && i.weight == 10.0)
        );
    }

    #[test]
    fn steps_that_explode_or_leave_the_bound_are_refused() {
        let t = |v: &[f32]| {
            TensorMap::from([("w".to_string(), HostTensor::new(vec![v.len()], v.to_vec()))])
        };
        let names = vec!["w".to_string()];
        let rules = UpdateRules::default();
        let n = check_step(&t(&[3.0, 4.0]), &t(&[3.3, 4.4]), &names, &rules).unwrap();
        assert!((n.ratio() - 0.1).abs() < 1e-6);
        let e = check_step(&t(&[3.0, 4.0]), &t(&[6.0, 8.0]), &names, &rules).unwrap_err();
        assert_eq!(e.kind(), "step_norm");
        let e = check_step(&t(&[3.0, 4.0]), &t(&[f32::NAN, 8.0]), &names, &rules).unwrap_err();
        assert_eq!(e.kind(), "non_finite");
        let e = check_step(&t(&[3.0, 4.0]), &t(&[3e38, 3e38]), &names, &rules).unwrap_err();
        assert_eq!(e.kind(), "step_norm", "{e}");
        let e = check_step(&t(&[3.0, 4.0]), &t(&[f32::INFINITY, 0.0]), &names, &rules);
        assert_eq!(e.unwrap_err().kind(), "non_finite");
        // Without the ratio bound only finiteness is checked.
        check_step(
            &t(&[3.0, 4.0]),
            &t(&[6.0, 8.0]),
            &names,
            &UpdateRules::none(),
        )
        .unwrap();
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::{HostTensor, validate_update};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            any::<f32>(),
            -1e3f32..1e3,
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(3e38f32)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Arbitrary updates (names, shapes, values, sample claims) are accepted or refused,
        /// never a panic; whatever is accepted enters the aggregate with a weight and scale
        /// inside every bound.
        #[test]
        fn arbitrary_rounds_stay_bounded(
            updates in proptest::collection::vec(
                (proptest::collection::vec(value(), 0..6), 0u64..u64::MAX, 0u64..1000, any::<bool>()),
                1..8,
            ),
        ) {
            let rules = UpdateRules::default();
            let expected = BTreeMap::from([("w".to_string(), vec![4usize])]);
            let mut stats = Vec::new();
            for (data, claim, declared, rename) in &updates {
                let name = if *rename { "v" } else { "w" };
                let map = TensorMap::from([(
                    name.to_string(),
                    HostTensor::new(vec![data.len()], data.clone()),
                )]);
                if let Ok(scale) = validate_update(&map, &expected, *claim, &rules) {
                    prop_assert!(data.len() == 4 && data.iter().all(|x| x.is_finite()));
                    prop_assert!(*claim >= 1 && *claim <= rules.max_samples);
                    stats.push(UpdateStats {
                        num_samples: *claim,
                        declared: *declared,
                        norm: crate::l2_norm(&map),
                        scale,
                    });
                }
            }
            let inf = bound_influence(&stats, &rules);
            prop_assert_eq!(inf.len(), stats.len());
            let mut weights: Vec<f64> = stats
                .iter()
                .map(|s| {
                    let w = if s.declared > 0 { s.num_samples.min(s.declared) } else { s.num_samples };
                    w.min(rules.max_weight) as f64
                })
                .collect();
            weights.sort_by(f64::total_cmp);
            let mut norms: Vec<f64> = stats.iter().map(|s| s.norm * s.scale).collect();
            norms.sort_by(f64::total_cmp);
            for (s, i) in stats.iter().zip(&inf) {
                prop_assert!(i.weight >= 0.0 && i.weight <= s.num_samples as f64);
                prop_assert!(i.weight <= rules.max_weight as f64);
                if s.declared > 0 {
                    prop_assert!(i.weight <= s.declared as f64);
                }
                let med_w = weights[(weights.len() - 1) / 2];
                prop_assert!(i.weight <= rules.max_weight_ratio * med_w + 1e-9);
                prop_assert!(i.scale >= 0.0 && i.scale <= 1.0);
                let med_n = norms[(norms.len() - 1) / 2];
                if med_n > 0.0 {
                    prop_assert!(s.norm * i.scale <= rules.norm_multiplier * med_n * (1.0 + 1e-9));
                }
            }
        }
    }
}
