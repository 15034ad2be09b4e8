//! Aggregation rules and server optimizers (Reddi et al., 2021, "Adaptive Federated
//! Optimization"). Rules combine one coordinate range of all updates at a time, so a caller
//! can stream large tensors in slices and keep memory flat.

use serde::{Deserialize, Serialize};

use crate::TensorMap;
use fedmicse_tensors::HostTensor;

/// How the round's updates are combined into one step, coordinate by coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Σ nᵢΔᵢ / Σ nᵢ (FedAvg).
    Fedavg,
    /// Coordinate-wise median (unweighted): robust to a minority of arbitrary updates.
    Median,
    /// Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values.
    TrimmedMean,
}

/// Updates trimmed at each end by trimmed_mean with `n` updates: ⌊fraction · n⌋, at most
/// what leaves one.
pub fn trim_count(trim_fraction: f64, n: usize) -> usize {
    ((trim_fraction * n as f64).floor() as usize).min(n.saturating_sub(1) / 2)
}

/// Whether `strategy` can outvote one arbitrary update among `n`: the median needs 3,
/// trimmed mean a trim count of at least 1.
pub fn robust_enough(strategy: Strategy, trim_fraction: f64, n: usize) -> Result<(), String> {
    match strategy {
        Strategy::Fedavg => Ok(()),
        Strategy::Median if n < 3 => Err(format!(
            "the median of {n} update(s) cannot outvote a hostile one (3 needed)"
        )),
        Strategy::TrimmedMean if trim_count(trim_fraction, n) == 0 => Err(format!(
            "trimmed mean with trim_fraction {trim_fraction} trims nothing of {n} update(s)"
        )),
        _ => Ok(()),
    }
}

/// Combines `columns[i][k]` (update i, coordinate k) into `out[k]`. `weights` are the
/// sample counts (FedAvg only); `scales` per-update factors (norm clipping).
pub fn combine(
    strategy: Strategy,
    trim_fraction: f64,
    columns: &[&[f32]],
    weights: &[f64],
    scales: &[f64],
    out: &mut [f32],
) {
    let n = columns.len();
    assert!(n > 0 && weights.len() == n && scales.len() == n);
    match strategy {
        Strategy::Fedavg => {
            let total: f64 = weights.iter().sum();
            for (k, o) in out.iter_mut().enumerate() {
                let mut acc = 0.0f64;
                for i in 0..n {
                    acc += weights[i] * scales[i] * columns[i][k] as f64;
                }
                *o = (acc / total) as f32;
            }
        }
        Strategy::Median | Strategy::TrimmedMean => {
            let trim = if strategy == Strategy::TrimmedMean {
                trim_count(trim_fraction, n)
            } else {
                0
            };
            let mut v = vec![0f64; n];
            for (k, o) in out.iter_mut().enumerate() {
                for i in 0..n {
                    v[i] = scales[i] * columns[i][k] as f64;
                }
                v.sort_unstable_by(f64::total_cmp);
                *o = if strategy == Strategy::Median {
                    if n % 2 == 1 {
                        v[n / 2] as f32
                    } else {
                        ((v[n / 2 - 1] + v[n / 2]) / 2.0) as f32
                    }
                } else {
                    let kept = &v[trim..n - trim];
                    (kept.iter().sum::<f64>() / kept.len() as f64) as f32
                };
            }
        }
    }
}

/// How the combined step moves the global model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerOptimizer {
    /// W ← W + η·Δ (FedAvg when η = 1).
    Sgd,
    /// FedAvgM: v ← β·v + Δ; W ← W + η·v.
    Fedavgm,
    /// FedAdam: m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²; W ← W + η·m / (√v + τ).
    Fedadam,
}

/// Hyper-parameters of the server optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ServerHyper {
    pub lr: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
}

/// The server optimizer's moments, persisted with every commit (`m.NAME`, `v.NAME`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerState {
    pub m: TensorMap,
    pub v: TensorMap,
}

impl ServerState {
    /// As one tensor map for storage.
    pub fn to_map(&self) -> TensorMap {
        let mut out = TensorMap::new();
        for (n, t) in &self.m {
            out.insert(format!("m.{n}"), t.clone());
        }
        for (n, t) in &self.v {
            out.insert(format!("v.{n}"), t.clone());
        }
        out
    }

    pub fn from_map(map: TensorMap) -> Self {
        let mut s = ServerState::default();
        for (n, t) in map {
            if let Some(rest) = n.strip_prefix("m.") {
                s.m.insert(rest.to_string(), t);
            } else if let Some(rest) = n.strip_prefix("v.") {
                s.v.insert(rest.to_string(), t);
            }
        }
        s
    }
}

/// Applies one server step `delta` (the combined update) to `global`.
pub fn server_step(
    opt: ServerOptimizer,
    h: &ServerHyper,
    state: &mut ServerState,
    global: &mut TensorMap,
    delta: &TensorMap,
) {
    for (name, d) in delta {
        let w = global.get_mut(name).expect("validated name");
        match opt {
            ServerOptimizer::Sgd => {
                for (x, &g) in w.data.iter_mut().zip(&d.data) {
                    *x = (*x as f64 + h.lr * g as f64) as f32;
                }
            }
            ServerOptimizer::Fedavgm => {
                let m = state
                    .m
                    .entry(name.clone())
                    .or_insert_with(|| HostTensor::new(d.shape.clone(), vec![0.0; d.data.len()]));
                for ((x, mv), &g) in w.data.iter_mut().zip(m.data.iter_mut()).zip(&d.data) {
                    *mv = (h.momentum * *mv as f64 + g as f64) as f32;
                    *x = (*x as f64 + h.lr * *mv as f64) as f32;
                }
            }
            ServerOptimizer::Fedadam => {
                let zeros = || HostTensor::new(d.shape.clone(), vec![0.0; d.data.len()]);
                let m = state.m.entry(name.clone()).or_insert_with(zeros);
                let v = state.v.entry(name.clone()).or_insert_with(zeros);
                for (((x, mv), vv), &g) in w
                    .data
                    .iter_mut()
                    .zip(m.data.iter_mut())
                    .zip(v.data.iter_mut())
                    .zip(&d.data)
                {
                    let g = g as f64;
                    *mv = (h.beta1 * *mv as f64 + (1.0 - h.beta1) * g) as f32;
                    *vv = (h.beta2 * *vv as f64 + (1.0 - h.beta2) * g * g) as f32;
                    *x = (*x as f64 + h.lr * *mv as f64 / ((*vv as f64).sqrt() + h.tau)) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(strategy: Strategy, cols: &[&[f32]], w: &[f64]) -> Vec<f32> {
        let mut out = vec![0.0; cols[0].len()];
        combine(strategy, 0.2, cols, w, &vec![1.0; cols.len()], &mut out);
        out
    }

    #[test]
    fn rules() {
        let cols: Vec<&[f32]> = vec![
            &[1.0, 10.0],
            &[2.0, 20.0],
            &[3.0, 30.0],
            &[4.0, 40.0],
            &[1000.0, -1000.0],
        ];
        let w = [1.0; 5];
        assert_eq!(run(Strategy::Median, &cols, &w), vec![3.0, 20.0]);
        // 20% of 5 = 1 trimmed on each side.
        assert_eq!(run(Strategy::TrimmedMean, &cols, &w), vec![3.0, 20.0]);
        assert_eq!(
            run(Strategy::Fedavg, &cols[..2], &[1.0, 3.0]),
            vec![1.75, 17.5]
        );
        assert_eq!(
            run(Strategy::Median, &cols[..2], &[1.0, 1.0]),
            vec![1.5, 15.0]
        );
    }

    #[test]
    fn optimizers() {
        let h = ServerHyper {
            lr: 1.0,
            momentum: 0.5,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let d = TensorMap::from([("w".to_string(), HostTensor::new(vec![1], vec![1.0]))]);
        let mut g = TensorMap::from([("w".to_string(), HostTensor::new(vec![1], vec![0.0]))]);
        let mut s = ServerState::default();
        server_step(ServerOptimizer::Fedavgm, &h, &mut s, &mut g, &d);
        server_step(ServerOptimizer::Fedavgm, &h, &mut s, &mut g, &d);
        assert_eq!(g["w"].data, vec![1.0 + 1.5]);
        let mut g = TensorMap::from([("w".to_string(), HostTensor::new(vec![1], vec![0.0]))]);
        let mut s = ServerState::default();
        server_step(ServerOptimizer::Fedadam, &h, &mut s, &mut g, &d);
        // m = 0.1, v = 0.01 → step 0.1 / (0.1 + 1e-3)
        assert!((g["w"].data[0] as f64 - 0.1 / 0.101).abs() < 1e-6);
        assert_eq!(ServerState::from_map(s.to_map()), s);
    }
}
