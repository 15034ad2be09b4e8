//! Accepted updates of the open round, kept on disk until the round is committed: a
//! coordinator killed mid-round counts them again after a restart instead of losing them,
//! and aggregation streams them slice by slice, whatever the number of agents.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fedmicse_federation::{Influence, Strategy, UpdateStats, combine};
use fedmicse_tensors::safetensors::TensorFile;
use fedmicse_tensors::{HostTensor, TensorMap, write_atomic};

use crate::error::StoreError;

/// One stored update.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub client: String,
    pub num_samples: u64,
    /// Factor from norm clipping (1 when not clipped).
    pub scale: f64,
    pub mean_loss: Option<f64>,
    pub digest: Vec<u8>,
    pub path: PathBuf,
    /// L2 norm of the delta as received (before any clipping).
    pub norm: f64,
    /// Shard size the agent declared at Join (0 = unknown).
    pub declared: u64,
    /// Serial of the certificate it arrived with (empty over plaintext).
    pub serial: String,
}

impl Stored {
    pub fn stats(&self) -> UpdateStats {
        UpdateStats {
            num_samples: self.num_samples,
            declared: self.declared,
            norm: self.norm,
            scale: self.scale,
        }
    }
}

/// Suffix of an update being written, before it is accepted.
const PARTIAL: &str = "partial";
/// The selection of a round, kept beside its updates.
const SELECTED: &str = "selected.json";

pub struct Pending {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    StoreError::io(path)
}

impl Pending {
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("pending");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        // Spool files never accepted (the coordinator stopped while one was being checked).
        for round in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            for f in std::fs::read_dir(round.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = f.path();
                let partial = p.extension().is_some_and(|x| x == PARTIAL || x == "tmp");
                if partial {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        Ok(Pending { dir })
    }

    fn round_dir(&self, round: u64) -> PathBuf {
        self.dir.join(format!("round-{round:06}"))
    }

    /// Writes a checked update durably under a temporary name of its own; it counts only
    /// once [`Pending::accept`] gives it its final name. Nothing is left behind on failure.
    pub fn spool(
        &self,
        round: u64,
        s: &Stored,
        tensors: &TensorMap,
    ) -> Result<PathBuf, StoreError> {
        let dir = self.round_dir(round);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let meta = BTreeMap::from([
            ("client".to_string(), s.client.clone()),
            ("num_samples".to_string(), s.num_samples.to_string()),
            ("scale".to_string(), s.scale.to_string()),
            (
                "mean_loss".to_string(),
                s.mean_loss.map_or(String::new(), |l| l.to_string()),
            ),
            ("digest".to_string(), hex::encode(&s.digest)),
            ("norm".to_string(), s.norm.to_string()),
            ("declared".to_string(), s.declared.to_string()),
            ("serial".to_string(), s.serial.clone()),
        ]);
        // The client id was checked against the certificate-name rule, so it is a plain
        // file name; the nonce keeps two writers apart whatever happens.
        let nonce: u64 = rand::random();
        let path = dir.join(format!("{}.{nonce:016x}.{PARTIAL}", s.client));
        if let Err(e) = fedmicse_tensors::safetensors::write(&path, tensors, &meta) {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        Ok(path)
    }

    /// Gives a spooled update its final name (`CLIENT.safetensors`): from now on it counts,
    /// also after a crash. Call with the round state locked.
    pub fn accept(&self, partial: &Path, client: &str) -> Result<PathBuf, StoreError> {
        let dir = partial
            .parent()
            .ok_or_else(|| StoreError::Invalid("spool file has no folder".into()))?;
        let path = dir.join(format!("{client}.safetensors"));
        std::fs::rename(partial, &path).map_err(io(&path))?;
        fedmicse_tensors::sync_dir(dir);
        Ok(path)
    }

    /// Records who was selected for `round`, so that after a restart the round reopens for
    /// them (their training is not wasted). Best effort: a failure is logged.
    pub fn save_selected(&self, round: u64, selected: &BTreeSet<String>) {
        let dir = self.round_dir(round);
        let result = std::fs::create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                let json = serde_json::to_vec(selected).expect("json");
                write_atomic(&dir.join(SELECTED), &json).map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            tracing::warn!(round, error = %e, "could not record the round's selection");
        }
    }

    /// Who was selected for `round` before a restart (empty when not recorded).
    pub fn load_selected(&self, round: u64) -> BTreeSet<String> {
        std::fs::read(self.round_dir(round).join(SELECTED))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Removes a spooled or accepted update file.
    pub fn discard(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }

    /// The complete stored updates of `round`.
    pub fn list(&self, round: u64) -> Vec<Stored> {
        let dir = self.round_dir(round);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "safetensors") {
                continue;
            }
            match read_meta(&path) {
                Ok(s) => out.push(s),
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "ignoring an unreadable stored update")
                }
            }
        }
        out.sort_by(|a, b| a.client.cmp(&b.client));
        out
    }

    /// Deletes stored updates of rounds up to `round` (they are in a commit now, or stale).
    pub fn clear_through(&self, round: u64) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let r = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("round-"))
                .and_then(|n| n.parse::<u64>().ok());
            if r.is_some_and(|r| r <= round) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn read_meta(path: &Path) -> Result<Stored, StoreError> {
    let file = TensorFile::open(path)?;
    let m = file.metadata();
    let invalid = |why: String| StoreError::Invalid(why);
    let get = |k: &str| {
        m.get(k)
            .cloned()
            .ok_or_else(|| invalid(format!("metadata lacks {k}")))
    };
    let client = get("client")?;
    fedmicse_wire::certs::check_agent_id(&client).map_err(|e| invalid(e.to_string()))?;
    if path.file_stem().and_then(|s| s.to_str()) != Some(client.as_str()) {
        return Err(invalid(format!(
            "names client {client:?} but is not its file"
        )));
    }
    Ok(Stored {
        norm: m.get("norm").and_then(|v| v.parse().ok()).unwrap_or(0.0),
        declared: m.get("declared").and_then(|v| v.parse().ok()).unwrap_or(0),
        serial: m.get("serial").cloned().unwrap_or_default(),
        client,
        num_samples: get("num_samples")?
            .parse()
            .map_err(|_| invalid("bad num_samples".into()))?,
        scale: get("scale")?
            .parse()
            .map_err(|_| invalid("bad scale".into()))?,
        mean_loss: get("mean_loss")?.parse().ok(),
        digest: hex::decode(get("digest")?).map_err(|_| invalid("bad digest".into()))?,
        path: path.to_path_buf(),
    })
}

/// Elements combined at once per update (4 MiB of f32 each): the memory bound of
/// aggregation is this times the number of updates, not the model size.
const SLICE: usize = 1 << 20;

/// Combines stored updates into one step, tensor by tensor and slice by slice, each with
/// the weight and scale its bounded influence allows.
pub fn aggregate(
    stored: &[Stored],
    influence: &[Influence],
    expected: &BTreeMap<String, Vec<usize>>,
    strategy: Strategy,
    trim_fraction: f64,
) -> Result<TensorMap, StoreError> {
    assert_eq!(stored.len(), influence.len());
    let files = stored
        .iter()
        .map(|s| TensorFile::open(&s.path))
        .collect::<Result<Vec<_>, _>>()?;
    let weights: Vec<f64> = influence.iter().map(|i| i.weight).collect();
    let scales: Vec<f64> = influence.iter().map(|i| i.scale).collect();
    let mut buffers = vec![vec![0f32; SLICE]; stored.len()];
    let mut out = TensorMap::new();
    for (name, shape) in expected {
        let len: usize = shape.iter().product();
        let mut combined = vec![0f32; len];
        let mut start = 0;
        while start < len {
            let end = (start + SLICE).min(len);
            for (f, buf) in files.iter().zip(buffers.iter_mut()) {
                f.read_slice(name, start, &mut buf[..end - start])?;
            }
            let cols: Vec<&[f32]> = buffers.iter().map(|b| &b[..end - start]).collect();
            combine(
                strategy,
                trim_fraction,
                &cols,
                &weights,
                &scales,
                &mut combined[start..end],
            );
            start = end;
        }
        out.insert(name.clone(), HostTensor::new(shape.clone(), combined));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_list_aggregate() {
        let dir = tempfile::tempdir().unwrap();
        let p = Pending::open(dir.path()).unwrap();
        let expected = BTreeMap::from([("w".to_string(), vec![3])]);
        for (i, (client, n)) in [("a", 1u64), ("b", 3)].iter().enumerate() {
            let t =
                TensorMap::from([("w".to_string(), HostTensor::new(vec![3], vec![i as f32; 3]))]);
            let s = Stored {
                client: client.to_string(),
                num_samples: *n,
                scale: 1.0,
                mean_loss: Some(0.5),
                digest: vec![i as u8],
                path: PathBuf::new(),
                norm: 1.5,
                declared: 7,
                serial: "ab".into(),
            };
            let partial = p.spool(4, &s, &t).unwrap();
            // Not counted until accepted.
            assert_eq!(p.list(4).len(), i);
            p.accept(&partial, client).unwrap();
        }
        // A spooled update never accepted (a crash mid-check) does not count, and is
        // removed when the coordinator starts again.
        let s = Stored {
            client: "c".into(),
            num_samples: 1,
            scale: 1.0,
            mean_loss: None,
            digest: vec![],
            path: PathBuf::new(),
            norm: 0.0,
            declared: 0,
            serial: String::new(),
        };
        let t = TensorMap::from([("w".to_string(), HostTensor::new(vec![3], vec![9.0; 3]))]);
        let orphan = p.spool(4, &s, &t).unwrap();
        let listed = p.list(4);
        assert_eq!(listed.len(), 2);
        let p = Pending::open(dir.path()).unwrap();
        assert!(!orphan.exists());
        assert_eq!(listed[1].num_samples, 3);
        assert_eq!((listed[1].norm, listed[1].declared), (1.5, 7));
        assert_eq!(listed[1].serial, "ab");
        let inf: Vec<Influence> = listed
            .iter()
            .map(|s| Influence {
                weight: s.num_samples as f64,
                scale: 1.0,
            })
            .collect();
        let step = aggregate(&listed, &inf, &expected, Strategy::Fedavg, 0.0).unwrap();
        assert_eq!(step["w"].data, vec![0.75; 3]);
        p.clear_through(4);
        assert!(p.list(4).is_empty());
    }
}
