//! Vectors in the ring Z_2^k (1 ≤ k ≤ 32), stored as `u32` and reduced by a
//! bit mask: addition, subtraction, signed encoding, bit-packing, and masks
//! expanded from a seed with ChaCha20.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::Error;
use crate::kdf;

/// Largest supported ring width.
pub const MAX_BITS: u32 = 32;

fn check_bits(k: u32) -> Result<(), Error> {
    if (1..=MAX_BITS).contains(&k) {
        Ok(())
    } else {
        Err(Error::InvalidRingBits(k))
    }
}

/// The bit mask of Z_2^k.
pub fn ring_mask(k: u32) -> u32 {
    if k >= 32 { u32::MAX } else { (1u32 << k) - 1 }
}

/// Smallest k such that the sum of `n_agents` signed `value_bits`-bit values
/// (each in [−2^(b−1), 2^(b−1)−1]) decodes without wrap ambiguity:
/// k = b + ⌈log2 n⌉.
pub fn ring_bits(value_bits: u32, n_agents: usize) -> Result<u32, Error> {
    let extra = n_agents.max(1).next_power_of_two().trailing_zeros();
    let k = value_bits.saturating_add(extra);
    check_bits(value_bits)?;
    check_bits(k)?;
    Ok(k)
}

/// `a += b` in Z_2^k.
pub fn add_assign(a: &mut [u32], b: &[u32], k: u32) {
    let m = ring_mask(k);
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y) & m;
    }
}

/// `a −= b` in Z_2^k.
pub fn sub_assign(a: &mut [u32], b: &[u32], k: u32) {
    let m = ring_mask(k);
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_sub(*y) & m;
    }
}

/// Two's complement of `v` in Z_2^k (values outside the signed k-bit range wrap).
pub fn encode_signed(v: i64, k: u32) -> u32 {
    (v as u32) & ring_mask(k)
}

/// The signed value in [−2^(k−1), 2^(k−1)) that `v` represents.
pub fn decode_signed(v: u32, k: u32) -> i64 {
    let v = (v & ring_mask(k)) as i64;
    if v >= 1i64 << (k - 1) {
        v - (1i64 << k)
    } else {
        v
    }
}

/// Bytes of `len` values packed at k bits each.
pub fn packed_len(len: usize, k: u32) -> usize {
    (len * k as usize).div_ceil(8)
}

/// Packs the low `k` bits of each value, little-endian bit order, no padding
/// between values (a 10-bit ring costs 10 bits per value).
pub fn pack(values: &[u32], k: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(packed_len(values.len(), k));
    let (mut acc, mut bits) = (0u64, 0u32);
    for &v in values {
        acc |= ((v & ring_mask(k)) as u64) << bits;
        bits += k;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(acc as u8);
    }
    out
}

/// Inverse of [`pack`]; the byte length must be exactly `packed_len(len, k)`.
pub fn unpack(bytes: &[u8], k: u32, len: usize) -> Result<Vec<u32>, Error> {
    check_bits(k)?;
    if bytes.len() != packed_len(len, k) {
        return Err(Error::BadLength {
            expected: packed_len(len, k),
            got: bytes.len(),
        });
    }
    let mut out = Vec::with_capacity(len);
    let (mut acc, mut bits) = (0u64, 0u32);
    let mut input = bytes.iter();
    for _ in 0..len {
        while bits < k {
            // Length was checked above, so the bytes cannot run out.
            let byte = input.next().copied().unwrap_or(0);
            acc |= (byte as u64) << bits;
            bits += 8;
        }
        out.push(acc as u32 & ring_mask(k));
        acc >>= k;
        bits -= k;
    }
    Ok(out)
}

/// What a mask is for. Part of the PRG key, so a self-mask, a pairwise mask
/// and masks of different rounds never reuse a ChaCha20 stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskDomain {
    SelfMask { round: u64 },
    Pairwise { round: u64 },
}

impl MaskDomain {
    fn info(self) -> [u8; 9] {
        let (tag, round) = match self {
            MaskDomain::SelfMask { round } => (1u8, round),
            MaskDomain::Pairwise { round } => (2u8, round),
        };
        let mut info = [0u8; 9];
        info[0] = tag;
        info[1..].copy_from_slice(&round.to_le_bytes());
        info
    }
}

fn mask_stream(seed: &[u8; 32], domain: MaskDomain) -> ChaCha20Rng {
    ChaCha20Rng::from_seed(kdf::derive(seed, "fedmicse-secagg/mask/v1", &domain.info()))
}

/// `len` uniform elements of Z_2^k from ChaCha20 keyed by HKDF(seed, domain).
pub fn expand_mask(seed: &[u8; 32], domain: MaskDomain, len: usize, k: u32) -> Vec<u32> {
    let mut rng = mask_stream(seed, domain);
    let m = ring_mask(k);
    // 2^k divides 2^32, so masking a uniform u32 is uniform in Z_2^k.
    (0..len).map(|_| rng.next_u32() & m).collect()
}

/// `target += expand_mask(seed, domain, target.len(), k)`, streamed: model
/// updates are large, so the mask is never held as a second vector.
pub fn add_mask(target: &mut [u32], seed: &[u8; 32], domain: MaskDomain, k: u32) {
    let mut rng = mask_stream(seed, domain);
    let m = ring_mask(k);
    for t in target.iter_mut() {
        *t = t.wrapping_add(rng.next_u32()) & m;
    }
}

/// `target −= expand_mask(seed, domain, target.len(), k)`, streamed.
pub fn sub_mask(target: &mut [u32], seed: &[u8; 32], domain: MaskDomain, k: u32) {
    let mut rng = mask_stream(seed, domain);
    let m = ring_mask(k);
    for t in target.iter_mut() {
        *t = t.wrapping_sub(rng.next_u32()) & m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trip_every_k() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for k in 1..=32 {
            for len in [0, 1, 7, 8, 9, 33, 1000] {
                let values: Vec<u32> = (0..len).map(|_| rng.next_u32() & ring_mask(k)).collect();
                let bytes = pack(&values, k);
                assert_eq!(bytes.len(), packed_len(len, k), "k={k} len={len}");
                assert_eq!(unpack(&bytes, k, len).unwrap(), values, "k={k} len={len}");
            }
        }
    }

    #[test]
    fn unpack_rejects_wrong_length() {
        let bytes = pack(&[1, 2, 3], 10);
        assert!(matches!(
            unpack(&bytes[..3], 10, 3),
            Err(Error::BadLength { .. })
        ));
        assert!(matches!(
            unpack(&bytes, 0, 3),
            Err(Error::InvalidRingBits(0))
        ));
    }

    #[test]
    fn signed_round_trip_and_sum() {
        let k = ring_bits(8, 10).unwrap();
        assert_eq!(k, 12);
        let values: Vec<i64> = vec![-128, 127, -128, -128, 127, 0, -1, -128, -128, -128];
        let mut acc = vec![0u32];
        for &v in &values {
            add_assign(&mut acc, &[encode_signed(v, k)], k);
        }
        assert_eq!(decode_signed(acc[0], k), values.iter().sum::<i64>());
        for k in 1..=32 {
            let lo = -(1i64 << (k - 1));
            let hi = (1i64 << (k - 1)) - 1;
            for v in [lo, hi, 0, -1i64.max(lo)] {
                assert_eq!(decode_signed(encode_signed(v, k), k), v, "k={k} v={v}");
            }
        }
    }

    #[test]
    fn ring_bits_extremes() {
        assert_eq!(ring_bits(16, 1).unwrap(), 16);
        assert_eq!(ring_bits(16, 2).unwrap(), 17);
        assert_eq!(ring_bits(16, 1000).unwrap(), 26);
        assert!(ring_bits(30, 8).is_err());
        // Worst case at the bound: n · (−2^(b−1)) is exactly −2^(k−1).
        let k = ring_bits(4, 8).unwrap();
        let mut acc = vec![0u32];
        for _ in 0..8 {
            add_assign(&mut acc, &[encode_signed(-8, k)], k);
        }
        assert_eq!(decode_signed(acc[0], k), -64);
    }

    #[test]
    fn add_sub_wrap() {
        let mut a = vec![1020, 3];
        add_assign(&mut a, &[10, 1022], 10);
        assert_eq!(a, vec![6, 1]);
        sub_assign(&mut a, &[10, 1022], 10);
        assert_eq!(a, vec![1020, 3]);
    }

    #[test]
    fn masks_are_domain_separated_and_deterministic() {
        let seed = [9u8; 32];
        let a = expand_mask(&seed, MaskDomain::SelfMask { round: 1 }, 64, 32);
        assert_eq!(
            a,
            expand_mask(&seed, MaskDomain::SelfMask { round: 1 }, 64, 32)
        );
        assert_ne!(
            a,
            expand_mask(&seed, MaskDomain::Pairwise { round: 1 }, 64, 32)
        );
        assert_ne!(
            a,
            expand_mask(&seed, MaskDomain::SelfMask { round: 2 }, 64, 32)
        );
        let short = expand_mask(&seed, MaskDomain::SelfMask { round: 1 }, 64, 5);
        assert!(short.iter().all(|&v| v < 32));
        // Streaming add/sub agree with the expanded mask.
        let domain = MaskDomain::Pairwise { round: 3 };
        let mut y = vec![7u32; 64];
        add_mask(&mut y, &seed, domain, 10);
        let mut expected = vec![7u32; 64];
        add_assign(&mut expected, &expand_mask(&seed, domain, 64, 10), 10);
        assert_eq!(y, expected);
        sub_mask(&mut y, &seed, domain, 10);
        assert_eq!(y, vec![7u32; 64]);
    }
}
