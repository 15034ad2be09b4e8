//! Integer codes for updates: int8 and int4 in blocks of [`BLOCK`] values, each block
//! with its own f32 scale (absmax / 127 or / 7), symmetric around zero.
//!
//! On the wire a block is its scale (f32, little-endian) followed by its codes: one byte
//! per value for int8, two values per byte for int4 (low nibble first). A block never
//! straddles a chunk, so a tensor can be encoded and sent piece by piece.
//!
//! Two roundings:
//! - [`encode`](crate::digest::encode) rounds to the nearest code (deterministic, so the
//!   sender's digest and its stream agree);
//! - [`round_to_grid`] rounds stochastically first (the expectation of the result is the
//!   input: averaging many agents' updates is unbiased) and returns values that encode
//!   and decode exactly, so what the receiver reads is what the sender kept for its error
//!   feedback, to the bit.
//!
//! Exactness comes from the scale: it keeps 16 of f32's 24 significant bits (rounded up,
//! so no value exceeds the largest code), hence `code × scale` needs at most 23 bits and is
//! exact in f32, and `(code × scale) / scale` gives the code back.

use rand::Rng;

use crate::ElementType;

/// Values per block (one scale each): 4 bytes of scale per 64 values is 6 % of an int8
/// upload and 11 % of an int4 one.
pub const BLOCK: usize = 64;

/// Mantissa bits dropped from a scale so that `code × scale` is exact (see the module docs).
const DROPPED_BITS: u32 = 7;

/// The largest code of an integer element type (127 or 7); `None` for floats.
pub(crate) fn max_code(dtype: ElementType) -> Option<i32> {
    match dtype {
        ElementType::Int8 => Some(127),
        ElementType::Int4 => Some(7),
        _ => None,
    }
}

fn code_bytes(dtype: ElementType, values: usize) -> usize {
    match dtype {
        ElementType::Int4 => values.div_ceil(2),
        _ => values,
    }
}

/// Bytes of `n` values of an integer element type: scales and codes.
pub(crate) fn encoded_len(dtype: ElementType, n: usize) -> usize {
    let full = n / BLOCK;
    let rest = n % BLOCK;
    full * (4 + code_bytes(dtype, BLOCK))
        + if rest > 0 {
            4 + code_bytes(dtype, rest)
        } else {
            0
        }
}

/// `absmax / max_code`, rounded up to 16 significant bits. NaN when the block holds a
/// non-finite value, so the receiver's finiteness check still sees it.
fn block_scale(block: &[f32], max_code: i32) -> f32 {
    if block.iter().any(|x| !x.is_finite()) {
        return f32::NAN;
    }
    let absmax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
    let s = absmax / max_code as f32;
    let low = s.to_bits() & ((1 << DROPPED_BITS) - 1);
    if low == 0 || !s.is_finite() {
        return s;
    }
    // Clearing the low bits and adding one unit of the kept precision carries into the
    // exponent when it must: this is rounding up.
    f32::from_bits((s.to_bits() & !((1 << DROPPED_BITS) - 1)) + (1 << DROPPED_BITS))
}

fn code_of(x: f32, scale: f32, max_code: i32) -> i32 {
    if scale == 0.0 || !scale.is_finite() {
        return 0;
    }
    ((x / scale).round() as i32).clamp(-max_code, max_code)
}

/// Encodes values block by block (nearest code).
pub(crate) fn encode(data: &[f32], dtype: ElementType) -> Vec<u8> {
    let max = max_code(dtype).expect("integer element type");
    let mut out = Vec::with_capacity(encoded_len(dtype, data.len()));
    for block in data.chunks(BLOCK) {
        let scale = block_scale(block, max);
        out.extend_from_slice(&scale.to_le_bytes());
        let codes = block.iter().map(|&x| code_of(x, scale, max) as i8);
        match dtype {
            ElementType::Int4 => {
                let codes: Vec<i8> = codes.collect();
                out.extend(codes.chunks(2).map(|p| {
                    let hi = p.get(1).copied().unwrap_or(0);
                    (p[0] as u8 & 0x0f) | ((hi as u8 & 0x0f) << 4)
                }));
            }
            _ => out.extend(codes.map(|c| c as u8)),
        }
    }
    out
}

/// Sign-extends a 4-bit two's-complement nibble.
fn nibble(v: u8) -> i8 {
    ((v << 4) as i8) >> 4
}

/// Decodes `n` values; `None` when `bytes` is not exactly their encoding's length.
pub(crate) fn decode(bytes: &[u8], dtype: ElementType, n: usize) -> Option<Vec<f32>> {
    if bytes.len() != encoded_len(dtype, n) {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    let mut rest = bytes;
    let mut left = n;
    while left > 0 {
        let m = left.min(BLOCK);
        let (head, tail) = rest.split_at(4 + code_bytes(dtype, m));
        let scale = f32::from_le_bytes(head[..4].try_into().ok()?);
        let codes = &head[4..];
        match dtype {
            ElementType::Int4 => {
                out.extend((0..m).map(|i| nibble(codes[i / 2] >> (4 * (i % 2))) as f32 * scale))
            }
            _ => out.extend(codes.iter().map(|&c| c as i8 as f32 * scale)),
        }
        rest = tail;
        left -= m;
    }
    Some(out)
}

/// Rounds values onto `dtype`'s grid: stochastically for int8/int4 (unbiased; each
/// block's largest magnitude maps to the largest code, as the deterministic encoder maps
/// it), to the nearest representable value for f16/bf16, unchanged for f32. What comes
/// back encodes and decodes to itself exactly.
pub fn round_to_grid(data: &[f32], dtype: ElementType, rng: &mut impl Rng) -> Vec<f32> {
    let Some(max) = max_code(dtype) else {
        let bytes = crate::digest::encode(data, dtype);
        return crate::digest::decode(&bytes, dtype, data.len()).expect("own encoding");
    };
    let mut out = Vec::with_capacity(data.len());
    for block in data.chunks(BLOCK) {
        let scale = block_scale(block, max);
        if scale == 0.0 || !scale.is_finite() {
            out.extend(block.iter().map(|_| scale * 0.0));
            continue;
        }
        let absmax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        out.extend(block.iter().map(|&x| {
            let code = if x.abs() == absmax {
                max * x.signum() as i32
            } else {
                ((x / scale + rng.random::<f32>()).floor() as i32).clamp(-max, max)
            };
            code as f32 * scale
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(7)
    }

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 1e-3 * (1 + i % 5) as f32)
            .collect()
    }

    #[test]
    fn sizes_are_a_quarter_and_an_eighth_plus_scales() {
        for dtype in [ElementType::Int8, ElementType::Int4] {
            for n in [0, 1, 63, 64, 65, 130, 1000] {
                assert_eq!(
                    encode(&sample(n), dtype).len(),
                    encoded_len(dtype, n),
                    "{dtype} {n}"
                );
            }
        }
        // 64 values: 4 bytes of scale plus 64 (int8) or 32 (int4) bytes of codes.
        assert_eq!(encoded_len(ElementType::Int8, 64), 68);
        assert_eq!(encoded_len(ElementType::Int4, 64), 36);
        assert_eq!(encoded_len(ElementType::Int4, 65), 36 + 4 + 1);
    }

    #[test]
    fn nearest_code_error_is_at_most_half_a_step() {
        let x = sample(1000);
        for dtype in [ElementType::Int8, ElementType::Int4] {
            let back = decode(&encode(&x, dtype), dtype, x.len()).unwrap();
            for (block, got) in x.chunks(BLOCK).zip(back.chunks(BLOCK)) {
                let step = block_scale(block, max_code(dtype).unwrap());
                for (a, b) in block.iter().zip(got) {
                    assert!((a - b).abs() <= step * 0.5 + 1e-12, "{dtype}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn grid_values_encode_and_decode_to_themselves_exactly() {
        let x = sample(777);
        for dtype in [
            ElementType::Int8,
            ElementType::Int4,
            ElementType::F16,
            ElementType::Bf16,
        ] {
            let g = round_to_grid(&x, dtype, &mut rng());
            let back = crate::digest::decode(&crate::digest::encode(&g, dtype), dtype, g.len());
            assert_eq!(back.unwrap(), g, "{dtype}");
            assert_ne!(g, x, "{dtype} changed nothing");
        }
        assert_eq!(round_to_grid(&x, ElementType::F32, &mut rng()), x);
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        // One block; the mean of many roundings converges to the input, where the nearest
        // code would be off by up to half a step for good.
        let x: Vec<f32> = (0..BLOCK).map(|i| (i as f32 - 31.3) * 0.0137).collect();
        for dtype in [ElementType::Int8, ElementType::Int4] {
            let step = block_scale(&x, max_code(dtype).unwrap());
            let trials = 4000;
            let mut mean = vec![0f64; x.len()];
            let mut r = rng();
            for _ in 0..trials {
                for (m, g) in mean.iter_mut().zip(round_to_grid(&x, dtype, &mut r)) {
                    *m += g as f64 / trials as f64;
                }
            }
            let worst = x
                .iter()
                .zip(&mean)
                .map(|(a, m)| (*a as f64 - m).abs() / step as f64)
                .fold(0f64, f64::max);
            // sd of one rounding ≤ step/2, of the mean ≤ step/(2·√4000) ≈ 0.008 step.
            assert!(worst < 0.05, "{dtype}: mean off by {worst} steps");
        }
    }

    #[test]
    fn non_finite_values_stay_visible_and_zero_blocks_stay_zero() {
        let mut x = sample(130);
        x[70] = f32::NAN;
        for dtype in [ElementType::Int8, ElementType::Int4] {
            let back = decode(&encode(&x, dtype), dtype, x.len()).unwrap();
            assert!(back[64..128].iter().all(|v| v.is_nan()), "{dtype}");
            assert!(back[..64].iter().all(|v| v.is_finite()), "{dtype}");
            let g = round_to_grid(&x, dtype, &mut rng());
            assert!(g[70].is_nan());
            let zeros = vec![0f32; 100];
            assert_eq!(round_to_grid(&zeros, dtype, &mut rng()), zeros);
            assert_eq!(decode(&encode(&zeros, dtype), dtype, 100).unwrap(), zeros);
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let bytes = encode(&sample(100), ElementType::Int4);
        assert!(decode(&bytes, ElementType::Int4, 98).is_none());
        assert!(decode(&bytes[..bytes.len() - 1], ElementType::Int4, 100).is_none());
        assert!(decode(&bytes, ElementType::Int8, 100).is_none());
    }
}
