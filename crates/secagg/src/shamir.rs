//! t-of-n Shamir secret sharing of 32-byte secrets over GF(p), p = 2^61 − 1.
//!
//! A secret is cut into five 7-byte chunks (56 bits < 61, so every chunk is a
//! field element and reconstruction can tell a corrupt result by a chunk ≥ 2^56).
//! Each chunk is shared with its own random polynomial; all chunks use the same
//! x-coordinate per holder.

use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::Error;

/// The Mersenne prime 2^61 − 1.
pub const P: u64 = (1 << 61) - 1;
/// Field elements per 32-byte secret (5 × 7 bytes ≥ 32).
pub const CHUNKS: usize = 5;
const CHUNK_BYTES: usize = 7;
/// Bytes of one share on the wire: x then the chunk values, u64 little-endian each.
pub const SHARE_BYTES: usize = 8 * (1 + CHUNKS);

/// One holder's share of one secret: the polynomials evaluated at `x`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub x: u64,
    pub y: [u64; CHUNKS],
}

fn reduce(v: u128) -> u64 {
    // 2^61 ≡ 1 (mod p): fold the high bits onto the low ones twice.
    let folded = (v & P as u128) + (v >> 61);
    let folded = (folded & P as u128) + (folded >> 61);
    let r = folded as u64;
    if r >= P { r - P } else { r }
}

fn add(a: u64, b: u64) -> u64 {
    reduce(a as u128 + b as u128)
}

fn sub(a: u64, b: u64) -> u64 {
    reduce(a as u128 + (P - b) as u128)
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(a as u128 * b as u128)
}

fn inv(a: u64) -> u64 {
    // Fermat: a^(p−2). Callers never pass 0 (x-coordinates are checked distinct).
    let (mut base, mut exp, mut acc) = (a, P - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

/// A uniform field element, by rejection (values ≥ p are redrawn, so no bias).
fn random_element(rng: &mut impl RngCore) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < P {
            return v;
        }
    }
}

fn chunks_of(secret: &[u8; 32]) -> [u64; CHUNKS] {
    let mut padded = [0u8; CHUNKS * CHUNK_BYTES];
    padded[..32].copy_from_slice(secret);
    let mut out = [0u64; CHUNKS];
    for (i, chunk) in padded.chunks(CHUNK_BYTES).enumerate() {
        let mut word = [0u8; 8];
        word[..CHUNK_BYTES].copy_from_slice(chunk);
        out[i] = u64::from_le_bytes(word);
    }
    padded.zeroize();
    out
}

fn secret_of(chunks: &[u64; CHUNKS]) -> Result<[u8; 32], Error> {
    let mut padded = [0u8; CHUNKS * CHUNK_BYTES];
    for (i, &c) in chunks.iter().enumerate() {
        if c >> (8 * CHUNK_BYTES) != 0 {
            return Err(Error::CorruptShares);
        }
        padded[i * CHUNK_BYTES..(i + 1) * CHUNK_BYTES].copy_from_slice(&c.to_le_bytes()[..7]);
    }
    if padded[32..].iter().any(|&b| b != 0) {
        return Err(Error::CorruptShares);
    }
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&padded[..32]);
    padded.zeroize();
    Ok(secret)
}

fn check_xs(xs: impl Iterator<Item = u64>) -> Result<(), Error> {
    let mut seen = std::collections::BTreeSet::new();
    for x in xs {
        if x == 0 || x >= P {
            return Err(Error::InvalidShareX(x));
        }
        if !seen.insert(x) {
            return Err(Error::DuplicateShareX(x));
        }
    }
    Ok(())
}

/// Shares `secret` among the holders at `xs` (nonzero, distinct) so that any
/// `t` of them reconstruct it and any `t − 1` learn nothing.
pub fn split(
    secret: &[u8; 32],
    t: usize,
    xs: &[u64],
    rng: &mut impl CryptoRng,
) -> Result<Vec<Share>, Error> {
    if t == 0 || t > xs.len() {
        return Err(Error::InvalidThreshold { t, n: xs.len() });
    }
    check_xs(xs.iter().copied())?;
    let mut secret_chunks = chunks_of(secret);
    let mut shares: Vec<Share> = xs.iter().map(|&x| Share { x, y: [0; CHUNKS] }).collect();
    for (c, &s) in secret_chunks.iter().enumerate() {
        // coeffs[0] is the secret chunk; the other t − 1 are uniform.
        let mut coeffs: Vec<u64> = std::iter::once(s)
            .chain((1..t).map(|_| random_element(rng)))
            .collect();
        for share in &mut shares {
            share.y[c] = coeffs
                .iter()
                .rev()
                .fold(0, |acc, &a| add(mul(acc, share.x), a));
        }
        coeffs.zeroize();
    }
    secret_chunks.zeroize();
    Ok(shares)
}

/// The polynomial through `points` evaluated at `at`, chunk by chunk (Lagrange).
pub(crate) fn interpolate(points: &[Share], at: u64) -> [u64; CHUNKS] {
    let mut out = [0u64; CHUNKS];
    for (i, pi) in points.iter().enumerate() {
        let (mut num, mut den) = (1u64, 1u64);
        for (j, pj) in points.iter().enumerate() {
            if i != j {
                num = mul(num, sub(at, pj.x));
                den = mul(den, sub(pi.x, pj.x));
            }
        }
        let basis = mul(num, inv(den));
        for (o, &y) in out.iter_mut().zip(&pi.y) {
            *o = add(*o, mul(basis, y));
        }
    }
    out
}

/// Reconstructs the secret from the first `t` of `shares`. Fewer than `t`,
/// duplicate or zero x-coordinates, and out-of-range values are errors.
pub fn combine(shares: &[Share], t: usize) -> Result<[u8; 32], Error> {
    if t == 0 || shares.len() < t {
        return Err(Error::TooFewShares {
            have: shares.len(),
            need: t,
        });
    }
    let used = &shares[..t];
    check_xs(used.iter().map(|s| s.x))?;
    if used.iter().flat_map(|s| s.y).any(|y| y >= P) {
        return Err(Error::CorruptShares);
    }
    let mut chunks = interpolate(used, 0);
    let secret = secret_of(&chunks);
    chunks.zeroize();
    secret
}

/// Share values on the wire (the x-coordinate is implied by the holder).
pub(crate) fn y_to_bytes(y: &[u64; CHUNKS]) -> [u8; 8 * CHUNKS] {
    let mut out = [0u8; 8 * CHUNKS];
    for (o, v) in out.chunks_mut(8).zip(y) {
        o.copy_from_slice(&v.to_le_bytes());
    }
    out
}

pub(crate) fn y_from_bytes(bytes: &[u8]) -> Result<[u64; CHUNKS], Error> {
    if bytes.len() != 8 * CHUNKS {
        return Err(Error::CorruptShares);
    }
    let mut y = [0u64; CHUNKS];
    for (v, b) in y.iter_mut().zip(bytes.chunks(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(b);
        *v = u64::from_le_bytes(word);
        if *v >= P {
            return Err(Error::CorruptShares);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn secret(rng: &mut ChaCha20Rng) -> [u8; 32] {
        let mut s = [0u8; 32];
        rng.fill_bytes(&mut s);
        s
    }

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1); // (−1)² = 1
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
        for a in [1, 2, 12345, P - 2, 1 << 60] {
            assert_eq!(mul(a, inv(a)), 1);
        }
    }

    #[test]
    fn any_t_of_n_reconstruct() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let s = secret(&mut rng);
        let xs: Vec<u64> = (1..=7).collect();
        let shares = split(&s, 4, &xs, &mut rng).unwrap();
        // Every 4-subset of the 7 shares, in two orders.
        for mask in 0u32..(1 << 7) {
            if mask.count_ones() != 4 {
                continue;
            }
            let mut subset: Vec<Share> = (0..7)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| shares[i].clone())
                .collect();
            assert_eq!(combine(&subset, 4).unwrap(), s);
            subset.reverse();
            assert_eq!(combine(&subset, 4).unwrap(), s);
        }
    }

    #[test]
    fn t_minus_one_shares_are_consistent_with_every_secret() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let s = secret(&mut rng);
        let shares = split(&s, 3, &[10, 20, 30, 40], &mut rng).unwrap();
        let seen = &shares[..2];
        assert!(matches!(combine(seen, 3), Err(Error::TooFewShares { .. })));
        // For any candidate secret, a degree-2 polynomial through (0, candidate)
        // and the two seen shares exists: the two shares rule nothing out.
        for _ in 0..20 {
            let candidate = secret(&mut rng);
            let mut points = seen.to_vec();
            points.push(Share {
                x: 0,
                y: chunks_of(&candidate),
            });
            let third = Share {
                x: 99,
                y: interpolate(&points, 99),
            };
            let forged = [seen[0].clone(), seen[1].clone(), third];
            assert_eq!(combine(&forged, 3).unwrap(), candidate);
        }
    }

    #[test]
    fn bad_coordinates_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let s = secret(&mut rng);
        assert!(matches!(
            split(&s, 2, &[1, 2, 2], &mut rng),
            Err(Error::DuplicateShareX(2))
        ));
        assert!(matches!(
            split(&s, 2, &[0, 1], &mut rng),
            Err(Error::InvalidShareX(0))
        ));
        assert!(matches!(
            split(&s, 3, &[1, 2], &mut rng),
            Err(Error::InvalidThreshold { .. })
        ));
        let shares = split(&s, 2, &[1, 2, 3], &mut rng).unwrap();
        let dup = [shares[0].clone(), shares[0].clone()];
        assert!(matches!(combine(&dup, 2), Err(Error::DuplicateShareX(1))));
    }

    #[test]
    fn tampered_share_detected_or_wrong() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let s = secret(&mut rng);
        let mut shares = split(&s, 2, &[1, 2], &mut rng).unwrap();
        shares[0].y[0] = add(shares[0].y[0], 1);
        // A tampered share never yields the original secret.
        assert_ne!(combine(&shares, 2).ok(), Some(s));
    }

    #[test]
    fn share_bytes_round_trip() {
        let y = [1, 2, 3, P - 1, 0];
        assert_eq!(y_from_bytes(&y_to_bytes(&y)).unwrap(), y);
        let mut bad = y_to_bytes(&y);
        bad[..8].copy_from_slice(&P.to_le_bytes());
        assert!(y_from_bytes(&bad).is_err());
    }
}
