//! Fixed-point quantization of clipped f32 updates into Z_2^k and back.
//!
//! Values are clipped to [−clip, clip] and scaled to signed integers in
//! [−L, L], L = 2^(b−1) − 1, with stochastic rounding: weight deltas are
//! often far smaller than one step, and rounding to nearest would turn them
//! all into zero, while stochastic rounding keeps the sum unbiased.

use rand::Rng;

use crate::{Error, ring};

/// How updates become b-bit integers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantizer {
    /// Largest magnitude kept; larger values are clipped.
    pub clip: f32,
    /// Bits per value b (2..=31); pick the ring width with [`ring::ring_bits`].
    pub value_bits: u32,
}

impl Quantizer {
    pub fn new(clip: f32, value_bits: u32) -> Result<Self, Error> {
        if !(2..=31).contains(&value_bits) {
            return Err(Error::InvalidRingBits(value_bits));
        }
        if !(clip.is_finite() && clip > 0.0) {
            return Err(Error::InvalidClip);
        }
        Ok(Self { clip, value_bits })
    }

    fn levels(&self) -> f64 {
        ((1u64 << (self.value_bits - 1)) - 1) as f64
    }

    /// The value of one integer step.
    pub fn step(&self) -> f64 {
        self.clip as f64 / self.levels()
    }

    /// Clips, scales and stochastically rounds `values` into Z_2^k.
    /// NaN counts as 0.
    pub fn encode(&self, values: &[f32], k: u32, rng: &mut impl Rng) -> Vec<u32> {
        let clip = self.clip as f64;
        values
            .iter()
            .map(|&v| {
                let v = if v.is_nan() {
                    0.0
                } else {
                    (v as f64).clamp(-clip, clip)
                };
                let scaled = v / self.step();
                let floor = scaled.floor();
                let up = rng.random::<f64>() < scaled - floor;
                let q =
                    (floor as i64 + up as i64).clamp(-self.levels() as i64, self.levels() as i64);
                ring::encode_signed(q, k)
            })
            .collect()
    }

    /// The sum of encoded vectors (e.g. an aggregate) back in f32 units.
    pub fn decode_sum(&self, sum: &[u32], k: u32) -> Vec<f32> {
        let step = self.step();
        sum.iter()
            .map(|&v| (ring::decode_signed(v, k) as f64 * step) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn round_trip_within_one_step_and_clipped() {
        let q = Quantizer::new(1.0, 10).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let values = [0.0, 0.5, -0.25, 1.0, -1.0, 7.0, -7.0, f32::NAN];
        let back = q.decode_sum(&q.encode(&values, 12, &mut rng), 12);
        let expected = [0.0, 0.5, -0.25, 1.0, -1.0, 1.0, -1.0, 0.0];
        for (b, e) in back.iter().zip(expected) {
            assert!((*b as f64 - e).abs() <= q.step(), "{b} vs {e}");
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased_for_tiny_values() {
        let q = Quantizer::new(1.0, 8).unwrap();
        let tiny = (0.3 * q.step()) as f32;
        let n = 20_000;
        let k = ring::ring_bits(8, n).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut sum = vec![0u32];
        for _ in 0..n {
            ring::add_assign(&mut sum, &q.encode(&[tiny], k, &mut rng), k);
        }
        let mean = q.decode_sum(&sum, k)[0] as f64 / n as f64;
        assert!(
            (mean / tiny as f64 - 1.0).abs() < 0.05,
            "mean {mean} vs {tiny}"
        );
    }

    #[test]
    fn bad_parameters_refused() {
        assert!(Quantizer::new(0.0, 8).is_err());
        assert!(Quantizer::new(f32::INFINITY, 8).is_err());
        assert!(Quantizer::new(1.0, 1).is_err());
        assert!(Quantizer::new(1.0, 32).is_err());
    }
}
