//! The burn-ndarray kernels: [`FusedOps`] for `NdArray` (forward passes) and the backward
//! passes the autodiff module calls, each one parallel pass over host slices.

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayTensor;
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, s};
use rayon::prelude::*;

use super::attention;
use super::maths::{gelu_and_slope, row_stats, softmax_in_place, sum_of};
use super::ops::FusedOps;
use super::parallel::{
    TASK_ELEMENTS, host, par_elementwise, par_elementwise2, par_rows, par_rows2, row_block, simd,
    tensor, zeros,
};

impl FusedOps for NdArray {
    fn fused_linear(x: NdArrayTensor, weight: NdArrayTensor, bias: NdArrayTensor) -> NdArrayTensor {
        let (mut shape, x) = host(&x);
        let (wshape, w) = host(&weight);
        let (_, bias) = host(&bias);
        let (d_in, d_out) = (wshape[0], wshape[1]);
        assert_eq!(
            shape.last(),
            Some(&d_in),
            "linear: input does not match the weight"
        );
        assert_eq!(bias.len(), d_out, "linear: bias does not match the weight");
        let w = ArrayView2::from_shape((d_in, d_out), &w).expect("weight shape");
        let mut y = zeros(x.len() / d_in * d_out);
        // y = x W + b: each block of rows starts as copies of the bias.
        gemm_row_blocks(&x, w, 1.0, &mut y, |y| {
            y.chunks_mut(d_out)
                .for_each(|row| row.copy_from_slice(&bias))
        });
        *shape.last_mut().expect("rank ≥ 1") = d_out;
        tensor(shape, y)
    }

    fn fused_add(a: NdArrayTensor, b: NdArrayTensor) -> NdArrayTensor {
        zip_map(&a, &b, |a, b| a + b)
    }

    fn fused_mul_mask(x: NdArrayTensor, mask: NdArrayTensor) -> NdArrayTensor {
        zip_map(&x, &mask, |x, m| x * m)
    }

    fn fused_gelu(x: NdArrayTensor) -> NdArrayTensor {
        map(&x, |x| gelu_and_slope(x).0)
    }

    fn fused_layer_norm(
        x: NdArrayTensor,
        gamma: NdArrayTensor,
        beta: NdArrayTensor,
        eps: f64,
    ) -> NdArrayTensor {
        let (shape, x) = host(&x);
        let (_, gamma) = host(&gamma);
        let (_, beta) = host(&beta);
        let d = gamma.len();
        assert_eq!(
            shape.last(),
            Some(&d),
            "layer_norm: gamma does not match the last dim"
        );
        assert_eq!(
            beta.len(),
            d,
            "layer_norm: beta does not match the last dim"
        );
        let eps = eps as f32;
        let mut y = zeros(x.len());
        par_rows(&mut y, &x, d, |y, x| {
            let (mean, rstd) = row_stats(x, eps);
            for i in 0..d {
                y[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
            }
        });
        tensor(shape, y)
    }

    fn fused_softmax(x: NdArrayTensor) -> NdArrayTensor {
        let (shape, x) = host(&x);
        let n = *shape.last().expect("softmax of a scalar");
        let mut y = zeros(x.len());
        par_rows(&mut y, &x, n, |y, x| {
            y.copy_from_slice(x);
            softmax_in_place(y);
        });
        tensor(shape, y)
    }

    fn fused_attention_probs(
        q: NdArrayTensor,
        k: NdArrayTensor,
        key_bias: NdArrayTensor,
        heads: usize,
    ) -> NdArrayTensor {
        attention::probs(&q, &k, &key_bias, heads)
    }

    fn fused_attention_context(probs: NdArrayTensor, v: NdArrayTensor) -> NdArrayTensor {
        attention::context(&probs, &v)
    }

    fn fused_attention(
        q: NdArrayTensor,
        k: NdArrayTensor,
        v: NdArrayTensor,
        key_bias: NdArrayTensor,
        heads: usize,
    ) -> NdArrayTensor {
        attention::one_pass(&q, &k, &v, &key_bias, heads)
    }
}

/// `f` of each element of `x`, a tensor of `x`'s shape (`f` runs inside the vectorised loop).
#[inline(always)]
fn map(x: &NdArrayTensor, f: impl Fn(f32) -> f32 + Sync) -> NdArrayTensor {
    let (shape, x) = host(x);
    let mut y = zeros(x.len());
    par_elementwise(&mut y, &x, |y, x| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = f(x);
        }
    });
    tensor(shape, y)
}

/// `f` of matching elements of `a` and `b` (one shape), a tensor of that shape.
#[inline(always)]
fn zip_map(
    a: &NdArrayTensor,
    b: &NdArrayTensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> NdArrayTensor {
    let (shape, a) = host(a);
    let (_, b) = host(b);
    let mut y = zeros(a.len());
    par_elementwise2(&mut y, &a, &b, |y, a, b| {
        for i in 0..y.len() {
            y[i] = f(a[i], b[i]);
        }
    });
    tensor(shape, y)
}

/// Gradients of [`FusedOps::fused_linear`] with respect to input, weight and bias, each
/// computed only where `wanted`.
pub(super) fn linear_backward(
    x: &NdArrayTensor,
    w: &NdArrayTensor,
    grad: &NdArrayTensor,
    wanted: [bool; 3],
) -> [Option<NdArrayTensor>; 3] {
    let (xshape, x) = host(x);
    let (wshape, w) = host(w);
    let (_, g) = host(grad);
    let (d_in, d_out) = (wshape[0], wshape[1]);
    let rows = x.len() / d_in;
    let [want_x, want_w, want_b] = wanted;
    [
        want_x.then(|| tensor(xshape, linear_input_grad(&g, &w, rows, d_in, d_out))),
        want_w.then(|| tensor(wshape, linear_weight_grad(&x, &g, rows, d_in, d_out))),
        want_b.then(|| tensor(vec![d_out], column_sums(&g, rows, d_out))),
    ]
}

/// `dx = g Wᵀ`, by blocks of rows.
fn linear_input_grad(g: &[f32], w: &[f32], rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let wt = ArrayView2::from_shape((d_in, d_out), w).expect("weight");
    let mut dx = zeros(rows * d_in);
    gemm_row_blocks(g, wt.t(), 0.0, &mut dx, |_| {});
    dx
}

/// `y ← x b + beta · y` for `x` of `k` columns, `b` of `k × n` and `y` of `n` columns, one
/// block of rows per rayon thread (see [`row_block`]); each block of `y` goes through `init`
/// first.
fn gemm_row_blocks(
    x: &[f32],
    b: ArrayView2<'_, f32>,
    beta: f32,
    y: &mut [f32],
    init: impl Fn(&mut [f32]) + Sync,
) {
    let (k, n) = b.dim();
    let block = row_block(x.len() / k);
    y.par_chunks_mut(block * n)
        .zip(x.par_chunks(block * k))
        .for_each(|(y, x)| {
            init(y);
            let m = x.len() / k;
            let x = ArrayView2::from_shape((m, k), x).expect("row block");
            let mut y = ArrayViewMut2::from_shape((m, n), y).expect("row block");
            general_mat_mul(1.0, &x, &b, beta, &mut y);
        });
}

/// `dW = xᵀ g`, by blocks of W's rows (input features).
fn linear_weight_grad(x: &[f32], g: &[f32], rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let xv = ArrayView2::from_shape((rows, d_in), x).expect("input rows");
    let gv = ArrayView2::from_shape((rows, d_out), g).expect("gradient rows");
    let mut dw = zeros(d_in * d_out);
    let block = row_block(d_in);
    dw.par_chunks_mut(block * d_out)
        .enumerate()
        .for_each(|(i, dw)| {
            let n = dw.len() / d_out;
            let xt = xv.slice(s![.., i * block..i * block + n]);
            let mut dw = ArrayViewMut2::from_shape((n, d_out), dw).expect("row block");
            general_mat_mul(1.0, &xt.t(), &gv, 0.0, &mut dw);
        });
    dw
}

/// Sums of `g`'s `rows` rows of `d_out` (the bias gradient): partial sums per block of rows,
/// then added together.
fn column_sums(g: &[f32], rows: usize, d_out: usize) -> Vec<f32> {
    let block = row_block(rows);
    g.par_chunks(block * d_out)
        .map(|g| {
            let mut sum = vec![0.0f32; d_out];
            for row in g.chunks(d_out) {
                sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sum
        })
        .reduce(
            || vec![0.0; d_out],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// Gradient of exact GELU at `x`: `g ⊙ gelu'(x)`.
pub(super) fn gelu_backward(x: &NdArrayTensor, grad: &NdArrayTensor) -> NdArrayTensor {
    zip_map(x, grad, |x, g| g * gelu_and_slope(x).1)
}

/// Gradient of softmax from its output `y` alone: `dx = y ⊙ (g − Σ g ⊙ y)` per row.
pub(super) fn softmax_backward(y: &NdArrayTensor, grad: &NdArrayTensor) -> NdArrayTensor {
    let (shape, y) = host(y);
    let (_, g) = host(grad);
    let n = *shape.last().expect("softmax of a scalar");
    let mut dx = zeros(y.len());
    par_rows2(&mut dx, &y, &g, n, |dx, y, g| {
        let dot = sum_of(n, |i| y[i] * g[i]);
        for i in 0..n {
            dx[i] = y[i] * (g[i] - dot);
        }
    });
    tensor(shape, dx)
}

/// Gradients of LayerNorm with respect to input, gamma and beta, each kept only where
/// `wanted`; mean and variance are recomputed from `x` (one cheap pass).
pub(super) fn layer_norm_backward(
    x: &NdArrayTensor,
    gamma: &NdArrayTensor,
    grad: &NdArrayTensor,
    eps: f32,
    wanted: [bool; 3],
) -> [Option<NdArrayTensor>; 3] {
    let (shape, x) = host(x);
    let (_, gamma) = host(gamma);
    let (_, g) = host(grad);
    let (dx, dgamma, dbeta) = layer_norm_grads(&x, &gamma, &g, eps);
    let d = gamma.len();
    let [want_x, want_gamma, want_beta] = wanted;
    [
        want_x.then(|| tensor(shape, dx)),
        want_gamma.then(|| tensor(vec![d], dgamma)),
        want_beta.then(|| tensor(vec![d], dbeta)),
    ]
}

/// `dx`, `dgamma`, `dbeta` of LayerNorm over rows of `gamma.len()`, given the output
/// gradient `g`: `dx = rstd (g γ − mean(g γ) − x̂ mean(g γ x̂))`, `dγ = Σ g x̂`, `dβ = Σ g`.
fn layer_norm_grads(
    x: &[f32],
    gamma: &[f32],
    g: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let mut dx = zeros(x.len());
    let rows_per_task = (TASK_ELEMENTS / d).max(1);
    let chunk = rows_per_task * d;
    let (dgamma, dbeta) = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(g.par_chunks(chunk))
        .map(|((dx, x), g)| {
            simd(|| {
                let mut dgamma = vec![0.0f32; d];
                let mut dbeta = vec![0.0f32; d];
                let mut xhat = vec![0.0f32; d];
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let (mean, rstd) = row_stats(x, eps);
                    for i in 0..d {
                        xhat[i] = (x[i] - mean) * rstd;
                        dgamma[i] += g[i] * xhat[i];
                        dbeta[i] += g[i];
                    }
                    let m1 = sum_of(d, |i| g[i] * gamma[i]) / d as f32;
                    let m2 = sum_of(d, |i| g[i] * gamma[i] * xhat[i]) / d as f32;
                    for i in 0..d {
                        dx[i] = rstd * (g[i] * gamma[i] - m1 - xhat[i] * m2);
                    }
                }
                (dgamma, dbeta)
            })
        })
        .reduce(
            || (vec![0.0; d], vec![0.0; d]),
            |(mut ga, mut ba), (gb, bb)| {
                ga.iter_mut().zip(gb).for_each(|(a, b)| *a += b);
                ba.iter_mut().zip(bb).for_each(|(a, b)| *a += b);
                (ga, ba)
            },
        );
    (dx, dgamma, dbeta)
}
