//! Scalar maths the kernels share, written so the loops around them vectorise: `exp` and
//! `erf` without libm calls, exact GELU and its slope, softmax and LayerNorm statistics of
//! one row, and sums with independent partial accumulators.

use std::f32::consts::FRAC_1_SQRT_2;

/// Softmax of one row, in place (max subtracted first, so large scores cannot overflow).
pub(super) fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    let inv = 1.0 / sum_of(row.len(), |i| row[i]);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Mean and `1 / sqrt(var + eps)` of one row (biased variance, as PyTorch's LayerNorm).
#[inline]
pub(super) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum_of(x.len(), |i| x[i]) / n;
    let var = sum_of(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `Σ term(i)` for `i < n` with eight independent partial sums: a single running sum is a
/// chain of dependent additions the compiler may not reorder, so it cannot vectorise.
#[inline(always)]
pub(super) fn sum_of(n: usize, term: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let whole = n / 8 * 8;
    for base in (0..whole).step_by(8) {
        for (lane, a) in acc.iter_mut().enumerate() {
            *a += term(base + lane);
        }
    }
    let tail: f32 = (whole..n).map(&term).sum();
    acc.iter().sum::<f32>() + tail
}

/// `(gelu(x), gelu'(x))` for exact GELU: `x Φ(x)` and `Φ(x) + x φ(x)`.
#[inline(always)]
pub(super) fn gelu_and_slope(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let z = x * FRAC_1_SQRT_2;
    let e = exp(-z * z);
    let cdf = 0.5 * (1.0 + erf_given_exp(z, e));
    (x * cdf, cdf + x * e * FRAC_1_SQRT_2PI)
}

/// `erf(z)` given `e = exp(−z²)`, Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7),
/// branch-free so the loops around it vectorise.
#[inline(always)]
fn erf_given_exp(z: f32, e: f32) -> f32 {
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * e).copysign(z)
}

/// `exp(x)` to about 2 ulp without a libm call (Cephes `expf`), so loops vectorise. Returns
/// exactly 0 below −87 (masked attention scores sit near `f32::MIN` and must give probability
/// 0) and saturates at `exp(88)` above 88.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to the nearest integer without a libm call (SSE2 has no
    // `roundps`); the integer sits in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * LOG2E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    let n = shifted.to_bits() as i32 - ROUNDER.to_bits() as i32;
    let scale = f32::from_bits(((n + 127) << 23) as u32);
    if x < -87.0 { 0.0 } else { er * scale }
}
