//! Checks an update must pass before it is aggregated. Each refusal names the check.

use std::collections::BTreeMap;

use crate::TensorMap;

/// Limits on updates and on the influence of any one agent, from the coordinator's
/// configuration (`[updates]`). The defaults are the defences a federation of partners who
/// do not fully trust each other needs; [`UpdateRules::none`] turns every bound off (a
/// trusted federation, or the baseline of an attack simulation).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateRules {
    /// Fixed ceiling on a delta's L2 norm (`None`: none). Refused above it, or scaled down to
    /// it when `clip` is set.
    pub max_norm: Option<f64>,
    /// Scale updates above `max_norm` down to it instead of refusing them.
    pub clip: bool,
    /// Adaptive norm bound: at aggregation every update is scaled down to at most this
    /// multiple of the round's median update norm (0 = off). Covers scaled, noisy and
    /// sign-flipped updates: no update moves the model more than this many honest ones.
    pub norm_multiplier: f64,
    /// Largest sample count an update may claim; refused above.
    pub max_samples: u64,
    /// Ceiling on one update's aggregation weight (samples counted at most this many;
    /// 0 = none). Weights are also capped by the shard size the agent declared at Join.
    pub max_weight: u64,
    /// An update weighs at most this multiple of the round's median weight (0 = off).
    /// Covers sample-count inflation: a claimed 10,000,000 samples count as 2 medians.
    pub max_weight_ratio: f64,
    /// The committed change of the global model, ‖W_new − W_old‖, may be at most this share
    /// of ‖W_old‖ over the trained tensors (0 = off). A failing round is refused, the
    /// previous model stays served and the round is retried with fresh updates.
    pub max_step_ratio: f64,
}

impl Default for UpdateRules {
    fn default() -> Self {
        UpdateRules {
            max_norm: None,
            clip: false,
            norm_multiplier: 2.0,
            max_samples: 10_000_000,
            max_weight: 1_000_000,
            max_weight_ratio: 2.0,
            max_step_ratio: 0.25,
        }
    }
}

impl UpdateRules {
    /// No bound on influence: plain FedAvg of every well-formed update (NaN, shapes, names,
    /// digests and sample counts are still checked).
    pub fn none() -> Self {
        UpdateRules {
            max_norm: None,
            clip: false,
            norm_multiplier: 0.0,
            max_samples: u64::MAX,
            max_weight: 0,
            max_weight_ratio: 0.0,
            max_step_ratio: 0.0,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(m) = self.max_norm
            && !(m > 0.0 && m.is_finite())
        {
            return Err(format!("updates.max_norm {m} must be positive"));
        }
        for (name, v) in [
            ("norm_multiplier", self.norm_multiplier),
            ("max_weight_ratio", self.max_weight_ratio),
            ("max_step_ratio", self.max_step_ratio),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("updates.{name} {v} must be 0 (off) or positive"));
            }
        }
        if self.norm_multiplier > 0.0 && self.norm_multiplier < 1.0 {
            return Err(format!(
                "updates.norm_multiplier {} would clip the median update itself: use 0 (off) or at least 1",
                self.norm_multiplier
            ));
        }
        if self.max_weight_ratio > 0.0 && self.max_weight_ratio < 1.0 {
            return Err(format!(
                "updates.max_weight_ratio {} would cap the median weight itself: use 0 (off) or at least 1",
                self.max_weight_ratio
            ));
        }
        if self.max_samples == 0 {
            return Err("updates.max_samples must be at least 1".into());
        }
        Ok(())
    }
}

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("update answers round {got}, but round {open} is open")]
    WrongRound { got: u64, open: u64 },
    #[error("no round is open")]
    NoRound,
    #[error("not selected for round {0}")]
    NotSelected(u64),
    #[error("round {0} passed its deadline")]
    Late(u64),
    #[error("already submitted a different update for round {0}")]
    Duplicate(u64),
    #[error("sample count {got} is outside 1..={max}")]
    Samples { got: u64, max: u64 },
    #[error("tensor set differs from the task's: missing {missing:?}, unexpected {unexpected:?}")]
    Names {
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error("tensor {name}: shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name}: {count} non-finite value(s) (NaN or infinity)")]
    NonFinite { name: String, count: usize },
    #[error("update norm {norm:.4} exceeds the bound {bound}")]
    Norm { norm: f64, bound: f64 },
    #[error("digest mismatch: {0}")]
    Digest(String),
    #[error("element type: {0}")]
    DType(String),
    #[error("malformed update stream: {0}")]
    Stream(String),
    #[error("no data for {0} s: the upload was closed")]
    Idle(u64),
    #[error("an upload from this agent is already in flight")]
    Busy,
    #[error("the agent's certificate was revoked")]
    Revoked,
    #[error("the coordinator could not store the update: {0}")]
    Storage(String),
}

impl Refusal {
    /// Refused for what the update holds (not for when or how it arrived): sending the same
    /// update again cannot succeed, so its sender stops holding the round up.
    pub fn is_content(&self) -> bool {
        matches!(
            self,
            Refusal::Samples { .. }
                | Refusal::Names { .. }
                | Refusal::Shape { .. }
                | Refusal::NonFinite { .. }
                | Refusal::Norm { .. }
                | Refusal::DType(_)
        )
    }

    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::WrongRound { .. } => "wrong_round",
            Refusal::NoRound => "no_round",
            Refusal::NotSelected(_) => "not_selected",
            Refusal::Late(_) => "late",
            Refusal::Duplicate(_) => "duplicate",
            Refusal::Samples { .. } => "samples",
            Refusal::Names { .. } => "names",
            Refusal::Shape { .. } => "shape",
            Refusal::NonFinite { .. } => "non_finite",
            Refusal::Norm { .. } => "norm",
            Refusal::Digest(_) => "digest",
            Refusal::DType(_) => "dtype",
            Refusal::Stream(_) => "stream",
            Refusal::Idle(_) => "idle",
            Refusal::Busy => "busy",
            Refusal::Revoked => "revoked",
            Refusal::Storage(_) => "storage",
        }
    }
}

/// Checks names, shapes, finiteness, sample count and norm. Returns the factor to scale the
/// update by (1, or < 1 when clipping is configured and the norm exceeds the bound).
pub fn validate_update(
    update: &TensorMap,
    expected: &BTreeMap<String, Vec<usize>>,
    num_samples: u64,
    rules: &UpdateRules,
) -> Result<f64, Refusal> {
    if num_samples == 0 || num_samples > rules.max_samples {
        return Err(Refusal::Samples {
            got: num_samples,
            max: rules.max_samples,
        });
    }
    let missing: Vec<String> = expected
        .keys()
        .filter(|n| !update.contains_key(*n))
        .cloned()
        .collect();
    let unexpected: Vec<String> = update
        .keys()
        .filter(|n| !expected.contains_key(*n))
        .cloned()
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        let cut = |mut v: Vec<String>| {
            v.truncate(5);
            v
        };
        return Err(Refusal::Names {
            missing: cut(missing),
            unexpected: cut(unexpected),
        });
    }
    for (name, t) in update {
        let shape = &expected[name];
        if &t.shape != shape {
            return Err(Refusal::Shape {
                name: name.clone(),
                expected: shape.clone(),
                found: t.shape.clone(),
            });
        }
        let bad = t.data.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            return Err(Refusal::NonFinite {
                name: name.clone(),
                count: bad,
            });
        }
    }
    let Some(bound) = rules.max_norm else {
        return Ok(1.0);
    };
    let norm = crate::l2_norm(update);
    if norm <= bound {
        Ok(1.0)
    } else if rules.clip {
        Ok(bound / norm)
    } else {
        Err(Refusal::Norm { norm, bound })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmicse_tensors::HostTensor;

    #[test]
    fn each_check_refuses_with_its_kind() {
        let expected = BTreeMap::from([("w".to_string(), vec![2])]);
        let ok = TensorMap::from([("w".to_string(), HostTensor::new(vec![2], vec![3.0, 4.0]))]);
        let rules = UpdateRules {
            max_norm: Some(10.0),
            clip: false,
            max_samples: 100,
            ..UpdateRules::default()
        };
        assert_eq!(validate_update(&ok, &expected, 5, &rules), Ok(1.0));
        let kind = |u: &TensorMap, n: u64, r: &UpdateRules| {
            validate_update(u, &expected, n, r).unwrap_err().kind()
        };
        assert_eq!(kind(&ok, 0, &rules), "samples");
        assert_eq!(kind(&ok, 101, &rules), "samples");
        let extra = TensorMap::from([("v".to_string(), HostTensor::new(vec![2], vec![0.0, 0.0]))]);
        assert_eq!(kind(&extra, 5, &rules), "names");
        let shape =
            TensorMap::from([("w".to_string(), HostTensor::new(vec![1, 2], vec![0.0, 0.0]))]);
        assert_eq!(kind(&shape, 5, &rules), "shape");
        let nan = TensorMap::from([(
            "w".to_string(),
            HostTensor::new(vec![2], vec![f32::NAN, 0.0]),
        )]);
        assert_eq!(kind(&nan, 5, &rules), "non_finite");
        let big = TensorMap::from([("w".to_string(), HostTensor::new(vec![2], vec![30.0, 40.0]))]);
        assert_eq!(kind(&big, 5, &rules), "norm");
        let clip = UpdateRules {
            clip: true,
            ..rules
        };
        assert_eq!(validate_update(&big, &expected, 5, &clip), Ok(0.2));
    }
}
