//! Checks an update must pass before it is aggregated. Each refusal names the check.

use std::collections::BTreeMap;

use crate::TensorMap;

/// Limits on updates, from the coordinator's configuration.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct UpdateRules {
    /// Largest accepted L2 norm of a delta (`None`: no bound).
    pub max_norm: Option<f64>,
    /// Scale updates above `max_norm` down to it instead of refusing them.
    pub clip: bool,
    /// Largest accepted sample count of one update.
    pub max_samples: u64,
}

impl Default for UpdateRules {
    fn default() -> Self {
        UpdateRules {
            max_norm: None,
            clip: false,
            max_samples: 10_000_000,
        }
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
}

impl Refusal {
    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::WrongRound { .. } => "wrong_round",
            Refusal::NoRound => "no_round",
            Refusal::NotSelected(_) => "not_selected",
            Refusal::Duplicate(_) => "duplicate",
            Refusal::Samples { .. } => "samples",
            Refusal::Names { .. } => "names",
            Refusal::Shape { .. } => "shape",
            Refusal::NonFinite { .. } => "non_finite",
            Refusal::Norm { .. } => "norm",
            Refusal::Digest(_) => "digest",
            Refusal::DType(_) => "dtype",
            Refusal::Stream(_) => "stream",
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
    use fedmicse_encoder::HostTensor;

    #[test]
    fn each_check_refuses_with_its_kind() {
        let expected = BTreeMap::from([("w".to_string(), vec![2])]);
        let ok = TensorMap::from([("w".to_string(), HostTensor::new(vec![2], vec![3.0, 4.0]))]);
        let rules = UpdateRules {
            max_norm: Some(10.0),
            clip: false,
            max_samples: 100,
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
