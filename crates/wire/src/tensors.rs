//! Streaming named f32 tensors in chunks, and putting them back together safely.
//!
//! Tensors are sent in name order, each as consecutive chunks of at most [`CHUNK_BYTES`]
//! with increasing offsets. The digest (SHA-256 over name, shape, dtype and bytes of every
//! tensor, in name order) is computed by the sender before streaming and checked by the
//! receiver after the last chunk, so a corrupted or truncated stream is refused whole.

use bytes::Bytes;
use fedmicse_tensors::digest::{decode, encode, hash_header};
pub use fedmicse_tensors::digest::{digest, digest_as, total_bytes_as};
use fedmicse_tensors::{ElementType as DType, HostTensor, TensorMap};
use sha2::{Digest, Sha256};

use crate::pb::TensorChunk;

/// Payload bytes per chunk (1 MiB: far under gRPC's 4 MiB message limit).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Total payload bytes of a tensor set sent as f32.
pub fn total_bytes(map: &TensorMap) -> u64 {
    total_bytes_as(map, DType::F32)
}

/// The chunks of a tensor set as f32, in order, made lazily.
pub fn chunk_tensors(map: &TensorMap) -> impl Iterator<Item = TensorChunk> + '_ {
    chunk_tensors_as(map, DType::F32)
}

/// The chunks of a tensor set in `dtype`, in order, made lazily: one chunk's bytes exist
/// at a time, so streaming a model costs a chunk of memory, not a copy of the model.
pub fn chunk_tensors_as(map: &TensorMap, dtype: DType) -> impl Iterator<Item = TensorChunk> + '_ {
    let per_chunk = dtype.values_within(CHUNK_BYTES);
    map.iter().flat_map(move |(name, t)| {
        let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        // A zero-sized tensor still gets one (empty) chunk so its name and shape arrive.
        let n = t.data.len().div_ceil(per_chunk).max(1);
        (0..n).map(move |i| {
            let start = i * per_chunk;
            let end = (start + per_chunk).min(t.data.len());
            TensorChunk {
                name: name.clone(),
                shape: shape.clone(),
                dtype: dtype.tag(),
                // A chunk starts on a block boundary, so this is its byte offset.
                offset: dtype.encoded_len(start) as u64,
                data: Bytes::from(encode(&t.data[start..end], dtype).into_owned()),
            }
        })
    })
}

/// Bytes reserved up front for one tensor; beyond this the buffer grows with the data
/// that actually arrives (the largest tensor of a BERT-base is ~94 MB).
const MAX_PREALLOC: u64 = 64 << 20;

/// What a receiver accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_tensors: usize,
    pub max_total_bytes: u64,
    /// The only element type accepted; `None` accepts any.
    pub dtype: Option<DType>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AssemblyError {
    #[error(
        "tensor {name}: chunk at byte {found}, expected {expected} (chunks out of order or lost)"
    )]
    Offset {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("tensor {name} arrived before {previous}: tensors must come in name order, once each")]
    Order { name: String, previous: String },
    #[error("tensor {name}: shape {shape:?} changed between chunks (first {first:?})")]
    ShapeChanged {
        name: String,
        first: Vec<u64>,
        shape: Vec<u64>,
    },
    #[error("tensor {name}: {received} of {expected} bytes arrived")]
    Truncated {
        name: String,
        received: u64,
        expected: u64,
    },
    #[error("tensor {name}: {found} bytes for shape {shape:?} ({expected} expected)")]
    Overflow {
        name: String,
        shape: Vec<u64>,
        expected: u64,
        found: u64,
    },
    #[error("tensor {name}: element type {dtype} is not the one the task asks for")]
    DType { name: String, dtype: i32 },
    #[error("more than {0} tensors")]
    TooManyTensors(usize),
    #[error("more than {0} bytes")]
    TooLarge(u64),
    #[error(
        "{declared_tensors} tensors / {declared_bytes} bytes declared, {tensors} / {bytes} arrived"
    )]
    CountMismatch {
        declared_tensors: u64,
        declared_bytes: u64,
        tensors: u64,
        bytes: u64,
    },
    #[error(
        "digest mismatch: the data arrived corrupted (declared {declared}, computed {computed})"
    )]
    Digest { declared: String, computed: String },
    #[error("tensor {name}: bad name or shape")]
    Malformed { name: String },
}

struct Pending {
    name: String,
    shape: Vec<u64>,
    dtype: DType,
    expected: u64,
    buf: Vec<u8>,
}

/// Reassembles chunks into tensors, checking order, offsets, sizes, limits and the digest.
/// f16, bf16, int8 and int4 tensors are widened to f32 (the digest covers the bytes as sent).
pub struct Assembler {
    limits: Limits,
    tensors: TensorMap,
    pending: Option<Pending>,
    last_name: Option<String>,
    hasher: Sha256,
    bytes: u64,
}

impl Assembler {
    pub fn new(limits: Limits) -> Self {
        Assembler {
            limits,
            tensors: TensorMap::new(),
            pending: None,
            last_name: None,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes
    }

    pub fn push(&mut self, chunk: TensorChunk) -> Result<(), AssemblyError> {
        let same = self.pending.as_ref().is_some_and(|p| p.name == chunk.name);
        if !same {
            self.finish_pending()?;
            self.start_tensor(&chunk)?;
        }
        let p = self.pending.as_mut().expect("pending tensor");
        if chunk.shape != p.shape || chunk.dtype != p.dtype.tag() {
            return Err(AssemblyError::ShapeChanged {
                name: chunk.name,
                first: p.shape.clone(),
                shape: chunk.shape,
            });
        }
        let have = p.buf.len() as u64;
        if chunk.offset != have {
            return Err(AssemblyError::Offset {
                name: chunk.name,
                expected: have,
                found: chunk.offset,
            });
        }
        let after = have + chunk.data.len() as u64;
        if after > p.expected {
            return Err(AssemblyError::Overflow {
                name: chunk.name,
                shape: p.shape.clone(),
                expected: p.expected,
                found: after,
            });
        }
        self.hasher.update(&chunk.data);
        p.buf.extend_from_slice(&chunk.data);
        self.bytes += chunk.data.len() as u64;
        Ok(())
    }

    /// Checks the header of a new tensor's first chunk (name, order, count, element type,
    /// shape, byte budget) and opens its buffer.
    fn start_tensor(&mut self, chunk: &TensorChunk) -> Result<(), AssemblyError> {
        if chunk.name.is_empty() || chunk.name.len() > 256 {
            return Err(AssemblyError::Malformed {
                name: chunk.name.clone(),
            });
        }
        if let Some(prev) = &self.last_name
            && chunk.name.as_str() <= prev.as_str()
        {
            return Err(AssemblyError::Order {
                name: chunk.name.clone(),
                previous: prev.clone(),
            });
        }
        if self.tensors.len() >= self.limits.max_tensors {
            return Err(AssemblyError::TooManyTensors(self.limits.max_tensors));
        }
        let dtype = DType::from_tag(chunk.dtype)
            .filter(|d| self.limits.dtype.is_none_or(|want| want == *d))
            .ok_or_else(|| AssemblyError::DType {
                name: chunk.name.clone(),
                dtype: chunk.dtype,
            })?;
        let elems = chunk
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|_| chunk.shape.len() <= 8)
            .ok_or_else(|| AssemblyError::Malformed {
                name: chunk.name.clone(),
            })?;
        let expected = usize::try_from(elems)
            .ok()
            .filter(|&n| n <= usize::MAX / 8)
            .map(|n| dtype.encoded_len(n) as u64)
            .ok_or_else(|| AssemblyError::Malformed {
                name: chunk.name.clone(),
            })?;
        if self.bytes.saturating_add(expected) > self.limits.max_total_bytes {
            return Err(AssemblyError::TooLarge(self.limits.max_total_bytes));
        }
        hash_header(
            &mut self.hasher,
            &chunk.name,
            &to_usize(&chunk.shape),
            dtype,
        );
        self.last_name = Some(chunk.name.clone());
        self.pending = Some(Pending {
            name: chunk.name.clone(),
            shape: chunk.shape.clone(),
            dtype,
            expected,
            // Room for what is declared, but at most [`MAX_PREALLOC`] up front: a
            // stream that declares a huge tensor and sends little costs what it sends.
            buf: Vec::with_capacity(expected.min(MAX_PREALLOC) as usize),
        });
        Ok(())
    }

    fn finish_pending(&mut self) -> Result<(), AssemblyError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if p.buf.len() as u64 != p.expected {
            return Err(AssemblyError::Truncated {
                name: p.name,
                received: p.buf.len() as u64,
                expected: p.expected,
            });
        }
        let n = to_usize(&p.shape).iter().product();
        let data = decode(&p.buf, p.dtype, n).expect("length checked against the shape");
        self.tensors
            .insert(p.name, HostTensor::new(to_usize(&p.shape), data));
        Ok(())
    }

    /// Completes assembly: checks the declared counts and the digest.
    pub fn finish(
        mut self,
        declared_tensors: u64,
        declared_bytes: u64,
        declared_digest: &[u8],
    ) -> Result<TensorMap, AssemblyError> {
        self.finish_pending()?;
        let tensors = self.tensors.len() as u64;
        if tensors != declared_tensors || self.bytes != declared_bytes {
            return Err(AssemblyError::CountMismatch {
                declared_tensors,
                declared_bytes,
                tensors,
                bytes: self.bytes,
            });
        }
        let computed = self.hasher.finalize().to_vec();
        if computed != declared_digest {
            return Err(AssemblyError::Digest {
                declared: hex::encode(declared_digest),
                computed: hex::encode(computed),
            });
        }
        Ok(self.tensors)
    }
}

fn to_usize(shape: &[u64]) -> Vec<usize> {
    shape.iter().map(|&d| d as usize).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TensorMap {
        let mut m = TensorMap::new();
        m.insert(
            "a".into(),
            HostTensor::new(vec![2, 3], (0..6).map(|i| i as f32).collect()),
        );
        // Spans several chunks.
        let n = CHUNK_BYTES / 4 * 2 + 17;
        m.insert(
            "b.big".into(),
            HostTensor::new(vec![n], (0..n).map(|i| i as f32 * 0.5).collect()),
        );
        m.insert("c".into(), HostTensor::new(vec![0], vec![]));
        m
    }

    fn limits() -> Limits {
        Limits {
            max_tensors: 10,
            max_total_bytes: 1 << 30,
            dtype: None,
        }
    }

    fn assemble(chunks: Vec<TensorChunk>, map: &TensorMap) -> Result<TensorMap, AssemblyError> {
        let mut a = Assembler::new(limits());
        for c in chunks {
            a.push(c)?;
        }
        a.finish(map.len() as u64, total_bytes(map), &digest(map))
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let chunks: Vec<_> = chunk_tensors(&m).collect();
        assert_eq!(chunks.len(), 1 + 3 + 1);
        assert!(chunks.iter().all(|c| c.data.len() <= CHUNK_BYTES));
        assert_eq!(assemble(chunks, &m).unwrap(), m);
    }

    #[test]
    fn half_precision_round_trip() {
        let m = sample();
        for dt in [DType::F16, DType::Bf16] {
            let mut a = Assembler::new(Limits {
                dtype: Some(dt),
                ..limits()
            });
            for c in chunk_tensors_as(&m, dt) {
                a.push(c).unwrap();
            }
            let got = a
                .finish(m.len() as u64, total_bytes_as(&m, dt), &digest_as(&m, dt))
                .unwrap();
            // Relative precision: 11 significant bits for f16, 8 for bf16; f16 saturates
            // to infinity from 65520 on.
            let tol = if dt == DType::F16 { 1e-3 } else { 1e-2 };
            for (n, t) in &m {
                for (a, b) in t.data.iter().zip(&got[n].data) {
                    if dt == DType::F16 && a.abs() >= 65520.0 {
                        assert!(b.is_infinite());
                    } else {
                        assert!((a - b).abs() <= tol * a.abs().max(1e-3), "{n}: {a} vs {b}");
                    }
                }
            }
        }
        // A receiver that wants f32 refuses f16 chunks.
        let mut a = Assembler::new(Limits {
            dtype: Some(DType::F32),
            ..limits()
        });
        let c = chunk_tensors_as(&m, DType::F16).next().unwrap();
        assert!(matches!(a.push(c), Err(AssemblyError::DType { .. })));
    }

    #[test]
    fn integer_codes_stream_across_chunks_and_arrive_exactly() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for dt in [DType::Int8, DType::Int4] {
            // On the grid, as an agent sends them: what arrives is what was sent, bit for bit.
            let mut m = sample();
            // More than two chunks even at half a byte per value.
            let n = CHUNK_BYTES * 5 + 3;
            let huge = (0..n).map(|i| ((i % 251) as f32 - 125.0) * 1e-4).collect();
            m.insert("d.huge".into(), HostTensor::new(vec![n], huge));
            let m: TensorMap = m
                .into_iter()
                .map(|(n, t)| {
                    let data = fedmicse_tensors::quantize::round_to_grid(&t.data, dt, &mut rng);
                    (n, HostTensor::new(t.shape, data))
                })
                .collect();
            let chunks: Vec<_> = chunk_tensors_as(&m, dt).collect();
            assert!(chunks.iter().all(|c| c.data.len() <= CHUNK_BYTES));
            assert!(chunks.len() >= 3 + 3, "{dt}: the huge tensor spans chunks");
            let mut a = Assembler::new(Limits {
                dtype: Some(dt),
                ..limits()
            });
            for c in chunks {
                a.push(c).unwrap();
            }
            let bytes = total_bytes_as(&m, dt);
            let got = a.finish(m.len() as u64, bytes, &digest_as(&m, dt)).unwrap();
            assert_eq!(got, m, "{dt}");
            let ratio = bytes as f64 / total_bytes(&m) as f64;
            let (lo, hi) = if dt == DType::Int8 {
                (0.25, 0.27)
            } else {
                (0.125, 0.145)
            };
            assert!((lo..hi).contains(&ratio), "{dt}: {ratio} of f32 bytes");
        }
    }

    #[test]
    fn corruption_is_caught() {
        let m = sample();
        let mut chunks: Vec<_> = chunk_tensors(&m).collect();
        let mut data = chunks[2].data.to_vec();
        data[5] ^= 1;
        chunks[2].data = data.into();
        assert!(matches!(
            assemble(chunks, &m),
            Err(AssemblyError::Digest { .. })
        ));

        let mut chunks: Vec<_> = chunk_tensors(&m).collect();
        chunks.remove(2);
        assert!(matches!(
            assemble(chunks, &m),
            Err(AssemblyError::Offset { .. })
        ));

        let mut chunks: Vec<_> = chunk_tensors(&m).collect();
        chunks.swap(0, 1);
        assert!(assemble(chunks, &m).is_err());

        let mut chunks: Vec<_> = chunk_tensors(&m).collect();
        chunks.pop();
        chunks.pop();
        assert!(assemble(chunks, &m).is_err());

        let mut chunks: Vec<_> = chunk_tensors(&m).collect();
        chunks[0].shape = vec![u64::MAX, 2];
        assert!(matches!(
            assemble(chunks, &m),
            Err(AssemblyError::Malformed { .. })
        ));

        let mut a = Assembler::new(Limits {
            max_tensors: 10,
            max_total_bytes: 100,
            dtype: None,
        });
        let err = chunk_tensors(&m).try_for_each(|c| a.push(c)).unwrap_err();
        assert_eq!(err, AssemblyError::TooLarge(100));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use prost::Message;

        fn chunk() -> impl Strategy<Value = TensorChunk> {
            (
                prop_oneof!["a", "b", "c", "[a-z.]{0,300}"],
                prop::collection::vec(prop_oneof![0u64..5, any::<u64>()], 0..10),
                -2i32..5,
                prop_oneof![0u64..64, any::<u64>()],
                prop::collection::vec(any::<u8>(), 0..64),
            )
                .prop_map(|(name, shape, dtype, offset, data)| TensorChunk {
                    name,
                    shape,
                    dtype,
                    offset,
                    data: data.into(),
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Arbitrary chunk sequences end in a value or an error, never a panic.
            #[test]
            fn reassembly_never_panics(chunks in prop::collection::vec(chunk(), 0..12),
                                        tensors in 0u64..5, bytes in 0u64..1000,
                                        digest in prop::collection::vec(any::<u8>(), 0..40),
                                        max in 0u64..2000) {
                let mut a = Assembler::new(Limits { max_tensors: 4, max_total_bytes: max, dtype: None });
                let mut failed = false;
                for c in chunks {
                    if a.push(c).is_err() {
                        failed = true;
                        break;
                    }
                }
                if !failed {
                    let _ = a.finish(tensors, bytes, &digest);
                }
            }

            /// Whatever arrives, the assembler never holds more than its byte limit, and a
            /// finished map (were a digest ever to match) stays under it too.
            #[test]
            fn reassembly_stays_under_the_byte_limit(
                chunks in prop::collection::vec(chunk(), 0..16),
                max_tensors in 0usize..6,
                max in prop_oneof![0u64..256, any::<u64>()],
            ) {
                let limits = Limits { max_tensors, max_total_bytes: max, dtype: None };
                let mut a = Assembler::new(limits);
                let mut failed = false;
                for c in chunks {
                    failed = a.push(c).is_err();
                    prop_assert!(a.bytes_received() <= max);
                    if failed {
                        break;
                    }
                }
                if !failed {
                    let bytes = a.bytes_received();
                    if let Ok(map) = a.finish(0, bytes, &[]) {
                        // Every element took at least 2 bytes on the wire.
                        let elems: u64 = map.values().map(|t| t.data.len() as u64).sum();
                        prop_assert!(elems * 2 <= max && map.len() <= max_tensors);
                    }
                }
            }

            /// Well-formed streams of random tensors: accepted exactly when they fit the
            /// limits, and never more than the limit held along the way.
            #[test]
            fn well_formed_streams_respect_the_limits(
                shapes in prop::collection::vec(prop::collection::vec(0usize..40, 0..3), 0..5),
                dtype in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::Bf16)],
                max_tensors in 0usize..6,
                max in 0u64..20_000,
            ) {
                let map: TensorMap = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let n = s.iter().product::<usize>();
                        (format!("t{i}"), HostTensor::new(s.clone(), vec![0.5; n]))
                    })
                    .collect();
                let total = total_bytes_as(&map, dtype);
                let limits = Limits { max_tensors, max_total_bytes: max, dtype: None };
                let mut a = Assembler::new(limits);
                let mut result = Ok(());
                for c in chunk_tensors_as(&map, dtype) {
                    result = a.push(c);
                    prop_assert!(a.bytes_received() <= max);
                    if result.is_err() {
                        break;
                    }
                }
                let fits = total <= max && map.len() <= max_tensors;
                match result.and_then(|()| {
                    a.finish(map.len() as u64, total, &digest_as(&map, dtype))
                }) {
                    Ok(got) => {
                        prop_assert!(fits);
                        prop_assert!(total_bytes_as(&got, dtype) <= max);
                        prop_assert_eq!(got.len(), map.len());
                    }
                    Err(_) => prop_assert!(!fits),
                }
            }

            /// Arbitrary bytes decode to a message or an error.
            #[test]
            fn decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = crate::pb::UpdateChunk::decode(bytes.as_slice());
                let _ = crate::pb::ModelChunk::decode(bytes.as_slice());
                let _ = crate::pb::JoinRequest::decode(bytes.as_slice());
                let _ = crate::pb::EmbedRequest::decode(bytes.as_slice());
            }
        }
    }
}
