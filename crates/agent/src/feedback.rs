//! Error feedback for lossy updates. Rounding a delta onto the wire's grid (int8 / int4
//! codes, f16 / bf16) drops a little of it; the agent keeps what was dropped — the
//! residual — and adds it to its next delta, so over rounds the coordinator receives the
//! agent's whole training signal, not a rounded one. The residual lives in
//! `state_dir/residual.safetensors` (written atomically once the coordinator has accepted
//! the update it belongs to), so it survives a restart of the agent.

use std::path::{Path, PathBuf};

use fedmicse_tensors::quantize::round_to_grid;
use fedmicse_tensors::{ElementType, HostTensor, TensorError, TensorMap};
use rand::SeedableRng;

const FILE: &str = "residual.safetensors";

/// An agent's residual, in memory and (with a state directory) on disk.
#[derive(Debug, Default)]
pub struct ErrorFeedback {
    file: Option<PathBuf>,
    residual: TensorMap,
}

/// A delta as it will be sent, and the residual once it has been.
#[derive(Debug, Clone)]
pub struct Rounded {
    pub sent: TensorMap,
    pub residual: TensorMap,
}

impl ErrorFeedback {
    /// The residual kept in `state_dir` (none yet: zero); memory only without a directory.
    pub fn open(state_dir: Option<&Path>) -> Result<Self, TensorError> {
        let Some(dir) = state_dir else {
            return Ok(ErrorFeedback::default());
        };
        std::fs::create_dir_all(dir).map_err(|source| TensorError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let file = dir.join(FILE);
        let residual = if file.is_file() {
            fedmicse_tensors::safetensors::read(&file)?
        } else {
            TensorMap::new()
        };
        Ok(ErrorFeedback {
            file: Some(file),
            residual,
        })
    }

    pub fn residual(&self) -> &TensorMap {
        &self.residual
    }

    /// What the agent wants the coordinator to receive: `delta` plus the residual. A
    /// residual tensor whose name or shape the delta no longer has (the task changed) is
    /// dropped.
    pub fn carry(&self, delta: &TensorMap) -> TensorMap {
        delta
            .iter()
            .map(|(name, t)| {
                let data = match self.residual.get(name).filter(|r| r.shape == t.shape) {
                    Some(r) => t.data.iter().zip(&r.data).map(|(d, r)| d + r).collect(),
                    None => t.data.clone(),
                };
                (name.clone(), HostTensor::new(t.shape.clone(), data))
            })
            .collect()
    }

    /// `want` rounded onto `dtype`'s grid (stochastically for int8 / int4, from `seed`, so
    /// a resend rounds the same way), and what that rounding leaves for next time.
    pub fn round(want: &TensorMap, dtype: ElementType, seed: u64) -> Rounded {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut sent = TensorMap::new();
        let mut left = Vec::new();
        for (name, t) in want {
            let grid = round_to_grid(&t.data, dtype, &mut rng);
            left.push(residual_of(name, t, &grid));
            sent.insert(name.clone(), HostTensor::new(t.shape.clone(), grid));
        }
        Rounded {
            sent,
            residual: left.into_iter().flatten().collect(),
        }
    }

    /// Keeps `residual` from now on (call once the update it belongs to was accepted):
    /// written to disk first, so memory and disk never disagree.
    pub fn commit(&mut self, residual: TensorMap) -> Result<(), TensorError> {
        if let Some(file) = &self.file {
            if residual.is_empty() {
                match std::fs::remove_file(file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(TensorError::Io {
                            path: file.clone(),
                            source: e,
                        });
                    }
                    _ => {}
                }
            } else {
                fedmicse_tensors::safetensors::write(file, &residual, &Default::default())?;
            }
        }
        self.residual = residual;
        Ok(())
    }
}

/// `want − sent` for one tensor, or nothing when they are equal.
pub fn residual_of(name: &str, want: &HostTensor, sent: &[f32]) -> Option<(String, HostTensor)> {
    let left: Vec<f32> = want.data.iter().zip(sent).map(|(w, g)| w - g).collect();
    left.iter()
        .any(|v| *v != 0.0)
        .then(|| (name.to_string(), HostTensor::new(want.shape.clone(), left)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(k: usize) -> TensorMap {
        let data = (0..200)
            .map(|i| (((i * 37 + k * 11) % 97) as f32 - 48.0) * 1e-4)
            .collect();
        TensorMap::from([("w".into(), HostTensor::new(vec![200], data))])
    }

    #[test]
    fn what_was_sent_plus_the_residual_is_what_was_trained_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut sent_sum = vec![0f64; 200];
        let mut true_sum = vec![0f64; 200];
        for round in 0..6 {
            // A restart between every round: the residual comes back from disk.
            let mut ef = ErrorFeedback::open(Some(dir.path())).unwrap();
            let d = delta(round);
            let r = ErrorFeedback::round(&ef.carry(&d), ElementType::Int4, round as u64);
            for i in 0..200 {
                sent_sum[i] += r.sent["w"].data[i] as f64;
                true_sum[i] += d["w"].data[i] as f64;
            }
            ef.commit(r.residual).unwrap();
        }
        let carried = ErrorFeedback::open(Some(dir.path())).unwrap();
        let res = &carried.residual()["w"].data;
        for i in 0..200 {
            let err = (sent_sum[i] + res[i] as f64 - true_sum[i]).abs();
            assert!(err < 1e-6, "value {i}: off by {err}");
        }
        // Without feedback the int4 rounding error of one value would be up to a step.
        assert!(res.iter().any(|v| v.abs() > 1e-6));
    }

    #[test]
    fn f32_leaves_no_residual_and_a_changed_task_drops_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut ef = ErrorFeedback::open(Some(dir.path())).unwrap();
        let r = ErrorFeedback::round(&ef.carry(&delta(0)), ElementType::Int8, 1);
        ef.commit(r.residual).unwrap();
        assert!(dir.path().join(FILE).is_file());
        // f32 sends the residual along and leaves nothing behind.
        let r = ErrorFeedback::round(&ef.carry(&delta(1)), ElementType::F32, 2);
        assert!(r.residual.is_empty());
        ef.commit(r.residual).unwrap();
        assert!(!dir.path().join(FILE).exists());
        // A residual for a tensor of another shape is not added to it.
        ef.commit(TensorMap::from([(
            "w".into(),
            HostTensor::new(vec![2], vec![1.0, 1.0]),
        )]))
        .unwrap();
        assert_eq!(ef.carry(&delta(1)), delta(1));
    }
}
