//! safetensors files: the format of HuggingFace checkpoints, of updates the coordinator
//! spools to disk, and of the model it commits.
//!
//! [`read`] / [`read_raw`] load a whole file; [`write`] saves f32 tensors with string
//! metadata atomically; [`TensorFile`] opens a file by its header alone and reads slices of
//! single tensors with positioned reads (no mapping), so aggregation holds a slice of each
//! update in memory, not the updates.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

pub use safetensors::Dtype;
use safetensors::SafeTensors;

use crate::error::{Result, TensorError};
use crate::{HostTensor, TensorMap, write_atomic};

/// Largest header accepted (safetensors' own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Tensors of a file by their stored names, in file order. Float tensors (f32, f16, bf16,
/// f64) come back as f32; others as `None` (buffers such as `position_ids`), so the caller
/// decides whether they matter.
pub fn read_raw(path: &Path) -> Result<Vec<(String, Option<HostTensor>)>> {
    let bytes = std::fs::read(path).map_err(TensorError::io(path))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| TensorError::format(path, format!("not a safetensors file: {e}")))?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = to_f32(view.dtype(), view.data());
            (
                name,
                values.map(|d| HostTensor::new(view.shape().to_vec(), d)),
            )
        })
        .collect())
}

/// Float values of raw little-endian bytes as f32; `None` for non-float types.
pub fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    fn widen<T: bytemuck::Pod>(data: &[u8], f: impl Fn(T) -> f32) -> Vec<f32> {
        bytemuck::pod_collect_to_vec::<u8, T>(data)
            .into_iter()
            .map(f)
            .collect()
    }
    match dtype {
        Dtype::F32 => Some(bytemuck::pod_collect_to_vec::<u8, f32>(data)),
        Dtype::F16 => Some(widen(data, f32::from as fn(half::f16) -> f32)),
        Dtype::BF16 => Some(widen(data, f32::from as fn(half::bf16) -> f32)),
        Dtype::F64 => Some(widen(data, |v: f64| v as f32)),
        _ => None,
    }
}

/// A file of float tensors by their stored names; a non-float tensor is an error.
pub fn read(path: &Path) -> Result<TensorMap> {
    read_raw(path)?
        .into_iter()
        .map(|(name, t)| match t {
            Some(t) => Ok((name, t)),
            None => Err(TensorError::format(
                path,
                format!("{name}: not a float tensor"),
            )),
        })
        .collect()
}

/// Writes tensors as f32 with string `metadata`, atomically (see [`write_atomic`]).
/// HuggingFace checkpoints want `{"format": "pt"}`.
pub fn write(path: &Path, tensors: &TensorMap, metadata: &BTreeMap<String, String>) -> Result<()> {
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            let view = safetensors::tensor::TensorView::new(
                Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .expect("shape matches data");
            (name.as_str(), view)
        })
        .collect();
    let metadata: HashMap<String, String> = metadata.clone().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| TensorError::format(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

/// `{"format": "pt"}`, the metadata `transformers` requires of a checkpoint.
pub fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// An f32 safetensors file opened by its header: names, shapes, metadata, and slice reads.
pub struct TensorFile {
    path: PathBuf,
    file: std::fs::File,
    data_start: u64,
    tensors: BTreeMap<String, (Vec<usize>, u64, u64)>,
    metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Reads and checks the header: every tensor f32, its byte range the size its shape
    /// says and inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(TensorError::io(path))?;
        let file_len = file.metadata().map_err(TensorError::io(path))?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(TensorError::io(path))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || 8 + n > file_len {
            return Err(TensorError::format(
                path,
                format!("implausible header size {n}"),
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(TensorError::io(path))?;
        let mut json: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| TensorError::format(path, format!("header: {e}")))?;
        let metadata = match json.remove("__metadata__") {
            Some(m) => serde_json::from_value(m)
                .map_err(|e| TensorError::format(path, format!("metadata: {e}")))?,
            None => BTreeMap::new(),
        };
        let data_start = 8 + n;
        let mut tensors = BTreeMap::new();
        for (name, v) in json {
            let e: Entry = serde_json::from_value(v)
                .map_err(|e| TensorError::format(path, format!("{name}: {e}")))?;
            let (start, end) = e.data_offsets;
            let elems: usize = e.shape.iter().product();
            if e.dtype != "F32" {
                return Err(TensorError::format(
                    path,
                    format!("{name}: {} is not F32", e.dtype),
                ));
            }
            if start > end || end - start != elems as u64 * 4 || data_start + end > file_len {
                return Err(TensorError::format(
                    path,
                    format!(
                        "{name}: byte range {start}..{end} does not fit its shape and the file"
                    ),
                ));
            }
            tensors.insert(name, (e.shape, start, end));
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            file,
            data_start,
            tensors,
            metadata,
        })
    }

    /// The string metadata of the header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Tensor names and shapes, in name order.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors
            .iter()
            .map(|(n, (s, _, _))| (n.as_str(), s.as_slice()))
    }

    /// Elements `[from, from + out.len())` of tensor `name` into `out`.
    pub fn read_slice(&self, name: &str, from: usize, out: &mut [f32]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let (_, start, end) = self
            .tensors
            .get(name)
            .ok_or_else(|| TensorError::format(&self.path, format!("lacks {name}")))?;
        let offset = start + from as u64 * 4;
        if offset + out.len() as u64 * 4 > *end {
            return Err(TensorError::format(
                &self.path,
                format!("{name}: shorter than expected"),
            ));
        }
        self.file
            .read_exact_at(bytemuck::cast_slice_mut(out), self.data_start + offset)
            .map_err(TensorError::io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TensorMap {
        TensorMap::from([
            (
                "a.weight".into(),
                HostTensor::new(vec![2, 3], (0..6).map(|i| i as f32).collect()),
            ),
            (
                "b".into(),
                HostTensor::new(vec![4], vec![0.5, -1.0, 2.0, 8.0]),
            ),
        ])
    }

    #[test]
    fn write_read_and_slices_agree() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let meta = BTreeMap::from([("client".to_string(), "alice".to_string())]);
        write(&p, &sample(), &meta).unwrap();
        assert_eq!(read(&p).unwrap(), sample());
        let f = TensorFile::open(&p).unwrap();
        assert_eq!(f.metadata(), &meta);
        let shapes: Vec<_> = f
            .shapes()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect();
        assert_eq!(
            shapes,
            vec![("a.weight".into(), vec![2, 3]), ("b".into(), vec![4])]
        );
        let mut out = [0f32; 3];
        f.read_slice("a.weight", 2, &mut out).unwrap();
        assert_eq!(out, [2.0, 3.0, 4.0]);
        assert!(
            f.read_slice("a.weight", 4, &mut out).is_err(),
            "past the end"
        );
        assert!(f.read_slice("c", 0, &mut out).is_err());
    }

    #[test]
    fn truncated_and_foreign_files_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        write(&p, &sample(), &BTreeMap::new()).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
        let e = TensorFile::open(&cut).err().expect("truncated");
        assert!(e.to_string().contains("cut.safetensors"), "{e}");
        assert!(read(&cut).is_err());
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"\xff\xff\xff\xff\xff\xff\xff\xffnot json").unwrap();
        assert!(TensorFile::open(&junk).is_err());
        assert!(read(&junk).is_err());
    }

    #[test]
    fn half_precision_files_load_as_f32() {
        let data: Vec<u8> = [1.5f32, -0.25]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(Dtype::BF16, vec![2], &data).unwrap();
        let bytes = safetensors::serialize([("h", view)], None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.safetensors");
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(read(&p).unwrap()["h"].data, vec![1.5, -0.25]);
        assert!(TensorFile::open(&p).is_err(), "slice reads are f32 only");
    }
}
