//! Deltas and their weighted average.

use crate::TensorMap;
use fedmicse_tensors::HostTensor;

/// `local − global` for `names` (both maps must hold them with equal shapes).
pub fn delta(local: &TensorMap, global: &TensorMap, names: &[String]) -> TensorMap {
    names
        .iter()
        .map(|n| {
            let (l, g) = (&local[n], &global[n]);
            assert_eq!(l.shape, g.shape, "{n}: shapes differ");
            let data = l.data.iter().zip(&g.data).map(|(a, b)| a - b).collect();
            (n.clone(), HostTensor::new(l.shape.clone(), data))
        })
        .collect()
}

/// Euclidean norm of all values together.
pub fn l2_norm(map: &TensorMap) -> f64 {
    map.values()
        .flat_map(|t| t.data.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// `Σ nᵢ Δᵢ` and `Σ nᵢ`, accumulated in f64 one update at a time.
#[derive(Debug, Default, Clone)]
pub struct WeightedSum {
    sum: std::collections::BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    weight: f64,
    count: usize,
}

impl WeightedSum {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `weight · update`, scaled by `scale` (≤ 1 when the update was clipped).
    pub fn add(&mut self, update: &TensorMap, weight: f64, scale: f64) {
        let w = weight * scale;
        for (name, t) in update {
            let entry = self
                .sum
                .entry(name.clone())
                .or_insert_with(|| (t.shape.clone(), vec![0.0; t.data.len()]));
            for (acc, &x) in entry.1.iter_mut().zip(&t.data) {
                *acc += w * x as f64;
            }
        }
        self.weight += weight;
        self.count += 1;
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn total_weight(&self) -> f64 {
        self.weight
    }

    /// `Σ nᵢ Δᵢ / Σ nᵢ`; empty when nothing was added.
    pub fn mean(&self) -> TensorMap {
        if self.weight == 0.0 {
            return TensorMap::new();
        }
        self.sum
            .iter()
            .map(|(n, (shape, v))| {
                let data = v.iter().map(|x| (x / self.weight) as f32).collect();
                (n.clone(), HostTensor::new(shape.clone(), data))
            })
            .collect()
    }
}

/// `global ← global + η · step` for the tensors in `step`.
pub fn apply_step(global: &mut TensorMap, step: &TensorMap, eta: f64) {
    for (name, s) in step {
        let g = global.get_mut(name).expect("validated name");
        for (w, &d) in g.data.iter_mut().zip(&s.data) {
            *w = (*w as f64 + eta * d as f64) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: &[f32]) -> TensorMap {
        TensorMap::from([("w".to_string(), HostTensor::new(vec![v.len()], v.to_vec()))])
    }

    #[test]
    fn fedavg_weights_by_samples() {
        let mut s = WeightedSum::new();
        s.add(&map(&[1.0, 0.0]), 1.0, 1.0);
        s.add(&map(&[0.0, 4.0]), 3.0, 1.0);
        let m = s.mean();
        assert_eq!(m["w"].data, vec![0.25, 3.0]);
        let mut g = map(&[10.0, 10.0]);
        apply_step(&mut g, &m, 0.5);
        assert_eq!(g["w"].data, vec![10.125, 11.5]);
        assert_eq!(l2_norm(&map(&[3.0, 4.0])), 5.0);
        let d = delta(&map(&[3.0, 4.0]), &map(&[1.0, 1.0]), &["w".into()]);
        assert_eq!(d["w"].data, vec![2.0, 3.0]);
    }
}
