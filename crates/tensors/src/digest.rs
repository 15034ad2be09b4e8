//! How tensors look on the wire: little-endian bytes in an [`ElementType`], and the
//! SHA-256 digest over name, shape, element type and bytes of every tensor in name order.
//! Sender and receiver compute the same digest, so a corrupted stream is refused whole.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::{ElementType, TensorMap};

/// Little-endian bytes of `data` in `dtype` (borrowed for f32; int8 / int4 round to the
/// nearest code).
pub fn encode(data: &[f32], dtype: ElementType) -> Cow<'_, [u8]> {
    match dtype {
        ElementType::F32 => Cow::Borrowed(bytemuck::cast_slice(data)),
        ElementType::F16 => Cow::Owned(
            data.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        ),
        ElementType::Bf16 => Cow::Owned(
            data.iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        ),
        ElementType::Int8 | ElementType::Int4 => Cow::Owned(crate::quantize::encode(data, dtype)),
    }
}

/// The `n` values of little-endian `bytes` in `dtype`; `None` when the length is not
/// their encoding's.
pub fn decode(bytes: &[u8], dtype: ElementType, n: usize) -> Option<Vec<f32>> {
    if bytes.len() != dtype.encoded_len(n) {
        return None;
    }
    Some(match dtype {
        ElementType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(bytes),
        ElementType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        ElementType::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        ElementType::Int8 | ElementType::Int4 => return crate::quantize::decode(bytes, dtype, n),
    })
}

/// The digest of a tensor set sent as f32.
pub fn digest(map: &TensorMap) -> Vec<u8> {
    digest_as(map, ElementType::F32)
}

/// The digest of a tensor set as sent in `dtype` (the bytes on the wire are hashed).
pub fn digest_as(map: &TensorMap, dtype: ElementType) -> Vec<u8> {
    let mut h = Sha256::new();
    for (name, t) in map {
        hash_header(&mut h, name, &t.shape, dtype);
        h.update(encode(&t.data, dtype));
    }
    h.finalize().to_vec()
}

/// Adds one tensor's header (name, shape, element type) to a digest; the receiver hashes
/// headers as tensors arrive and the bytes chunk by chunk.
pub fn hash_header(h: &mut Sha256, name: &str, shape: &[usize], dtype: ElementType) {
    h.update(name.as_bytes());
    h.update([0u8]);
    for &d in shape {
        h.update((d as u64).to_le_bytes());
    }
    h.update([dtype.tag() as u8]);
}

/// Payload bytes of a tensor set in `dtype`.
pub fn total_bytes_as(map: &TensorMap, dtype: ElementType) -> u64 {
    map.values()
        .map(|t| dtype.encoded_len(t.data.len()) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostTensor;

    fn sample() -> TensorMap {
        TensorMap::from([
            ("a".into(), HostTensor::new(vec![2], vec![1.0, -2.5])),
            ("b".into(), HostTensor::new(vec![1, 1], vec![0.125])),
        ])
    }

    #[test]
    fn encode_decode_round_trip() {
        let x = [1.0f32, -2.5, 0.125, 3.0e-3];
        for d in [ElementType::F32, ElementType::F16, ElementType::Bf16] {
            let back = decode(&encode(&x, d), d, x.len()).unwrap();
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 1e-2, "{d}: {a} vs {b}");
            }
        }
        assert_eq!(decode(&[0u8; 3], ElementType::F16, 1), None);
        assert_eq!(decode(&[0u8; 4], ElementType::F16, 1), None);
    }

    #[test]
    fn digest_sees_names_shapes_types_and_values() {
        let base = digest(&sample());
        let mut renamed = sample();
        let t = renamed.remove("b").unwrap();
        renamed.insert("c".into(), t);
        let mut reshaped = sample();
        reshaped.get_mut("b").unwrap().shape = vec![1];
        let mut changed = sample();
        changed.get_mut("a").unwrap().data[1] = -2.0;
        for other in [renamed, reshaped, changed] {
            assert_ne!(digest(&other), base);
        }
        assert_ne!(digest_as(&sample(), ElementType::F16), base);
        assert_eq!(digest(&sample()), base);
        assert_eq!(total_bytes_as(&sample(), ElementType::Bf16), 6);
    }
}
