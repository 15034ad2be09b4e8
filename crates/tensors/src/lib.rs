//! Host tensors and their files, without a tensor library.
//!
//! Everything that moves model weights around without computing with them lives here:
//! the wire protocol, the aggregation maths and the coordinator's storage depend on this
//! crate, not on the encoder, so they build without burn.
//!
//! - [`HostTensor`] / [`TensorMap`]: named row-major f32 tensors in name order.
//! - [`safetensors`]: whole-file read and write (f32 out; f32/f16/bf16/f64 in), and a
//!   [`safetensors::TensorFile`] that reads slices of one tensor with positioned reads,
//!   so a process can combine many updates while holding only a slice of each.
//! - [`write_atomic`]: a crash leaves the old file or the new one, never half of one.
//! - [`ElementType`] and [`digest`]: how tensors are encoded and hashed on the wire;
//!   [`quantize`]: the int8 / int4 block codes and the stochastic rounding onto them.
//! - [`name_matches`]: the one rule for selecting tensors by name or prefix.

mod atomic;
pub mod digest;
mod element;
mod error;
pub mod quantize;
pub mod safetensors;

use std::collections::BTreeMap;

pub use atomic::{sync_dir, write_atomic};
pub use element::ElementType;
pub use error::{Result, TensorError};

/// A host tensor in f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data }
    }

    /// `[r, c]` → `[c, r]` (HF stores linear weights `[out, in]`, burn wants `[in, out]`).
    pub fn transposed(&self) -> HostTensor {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = self.data[i * c + j];
            }
        }
        HostTensor::new(vec![c, r], out)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Tensors by canonical HF name, sorted (a stable order for digests and files).
pub type TensorMap = BTreeMap<String, HostTensor>;

/// Whether a tensor name is selected by `patterns`: equal to one, or starting with one that
/// ends in '.'. An empty pattern list selects everything.
pub fn name_matches(name: &str, patterns: &[String]) -> bool {
    patterns.is_empty()
        || patterns
            .iter()
            .any(|p| name == p || (p.ends_with('.') && name.starts_with(p.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_round_trip() {
        let t = HostTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let tt = t.transposed();
        assert_eq!(tt.shape, vec![3, 2]);
        assert_eq!(tt.data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(tt.transposed(), t);
    }

    #[test]
    fn names_match_exactly_or_by_dotted_prefix() {
        let p = vec![
            "pooler.dense.weight".to_string(),
            "encoder.layer.5.".to_string(),
        ];
        assert!(name_matches("pooler.dense.weight", &p));
        assert!(!name_matches("pooler.dense.bias", &p));
        assert!(name_matches("encoder.layer.5.output.dense.bias", &p));
        assert!(!name_matches("encoder.layer.50.output.dense.bias", &p));
        assert!(name_matches("anything", &[]));
    }
}
