//! Accepted updates of the open round, kept on disk until the round is committed: a
//! coordinator killed mid-round counts them again after a restart instead of losing them,
//! and aggregation streams them slice by slice, whatever the number of agents.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fedmicse_encoder::TensorMap;
use fedmicse_encoder::weights::write_atomic;
use fedmicse_federation::{Strategy, combine};
use safetensors::{Dtype, SafeTensors};

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
}

pub struct Pending {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

impl Pending {
    pub fn open(state_dir: &Path) -> Result<Self, String> {
        let dir = state_dir.join("pending");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Pending { dir })
    }

    fn round_dir(&self, round: u64) -> PathBuf {
        self.dir.join(format!("round-{round:06}"))
    }

    /// Writes an accepted update durably (temporary file, fsync, rename).
    pub fn save(&self, round: u64, s: &Stored, tensors: &TensorMap) -> Result<PathBuf, String> {
        let dir = self.round_dir(round);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, t)| {
                let v = safetensors::tensor::TensorView::new(
                    Dtype::F32,
                    t.shape.clone(),
                    bytemuck::cast_slice(&t.data),
                )
                .expect("shape matches data");
                (n.clone(), v)
            })
            .collect();
        let meta = HashMap::from([
            ("client".to_string(), s.client.clone()),
            ("num_samples".to_string(), s.num_samples.to_string()),
            ("scale".to_string(), s.scale.to_string()),
            (
                "mean_loss".to_string(),
                s.mean_loss.map_or(String::new(), |l| l.to_string()),
            ),
            ("digest".to_string(), hex::encode(&s.digest)),
        ]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())?;
        let path = dir.join(format!("{}.safetensors", s.client));
        write_atomic(&path, &bytes).map_err(|e| e.to_string())?;
        Ok(path)
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

fn read_meta(path: &Path) -> Result<Stored, String> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
    let m = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        m.get(k)
            .cloned()
            .ok_or_else(|| format!("metadata lacks {k}"))
    };
    Ok(Stored {
        client: get("client")?,
        num_samples: get("num_samples")?.parse().map_err(|_| "bad num_samples")?,
        scale: get("scale")?.parse().map_err(|_| "bad scale")?,
        mean_loss: get("mean_loss")?.parse().ok(),
        digest: hex::decode(get("digest")?).map_err(|_| "bad digest")?,
        path: path.to_path_buf(),
    })
}

/// Elements combined at once per update (4 MiB of f32 each): the memory bound of
/// aggregation is this times the number of updates, not the model size.
const SLICE: usize = 1 << 20;

/// Combines stored updates into one step, tensor by tensor and slice by slice, reading the
/// files through memory maps.
pub fn aggregate(
    stored: &[Stored],
    expected: &BTreeMap<String, Vec<usize>>,
    strategy: Strategy,
    trim_fraction: f64,
) -> Result<TensorMap, String> {
    let maps = stored
        .iter()
        .map(|s| {
            let f = std::fs::File::open(&s.path).map_err(io(&s.path))?;
            // SAFETY: the files are written once (atomically renamed) and never modified.
            unsafe { memmap2::Mmap::map(&f) }.map_err(io(&s.path))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let parsed = maps
        .iter()
        .zip(stored)
        .map(|(m, s)| SafeTensors::deserialize(m).map_err(|e| format!("{}: {e}", s.path.display())))
        .collect::<Result<Vec<_>, String>>()?;
    let weights: Vec<f64> = stored.iter().map(|s| s.num_samples as f64).collect();
    let scales: Vec<f64> = stored.iter().map(|s| s.scale).collect();
    let mut out = TensorMap::new();
    for (name, shape) in expected {
        let datas = parsed
            .iter()
            .zip(stored)
            .map(|(p, s)| {
                let v = p
                    .tensor(name)
                    .map_err(|e| format!("{}: {name}: {e}", s.path.display()))?;
                Ok(floats(v.data()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let len: usize = shape.iter().product();
        if let Some(bad) = datas.iter().position(|d| d.len() != len) {
            return Err(format!(
                "{}: {name} has the wrong size",
                stored[bad].path.display()
            ));
        }
        let mut combined = vec![0f32; len];
        let mut start = 0;
        while start < len {
            let end = (start + SLICE).min(len);
            let cols: Vec<&[f32]> = datas.iter().map(|d| &d[start..end]).collect();
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
        out.insert(
            name.clone(),
            fedmicse_encoder::HostTensor::new(shape.clone(), combined),
        );
    }
    Ok(out)
}

/// f32 values of little-endian bytes, without a copy when aligned.
fn floats(bytes: &[u8]) -> std::borrow::Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<u8, f32>(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmicse_encoder::HostTensor;

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
            };
            p.save(4, &s, &t).unwrap();
        }
        let listed = p.list(4);
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].num_samples, 3);
        let step = aggregate(&listed, &expected, Strategy::Fedavg, 0.0).unwrap();
        assert_eq!(step["w"].data, vec![0.75; 3]);
        p.clear_through(4);
        assert!(p.list(4).is_empty());
    }
}
