//! Fused CPU kernels for a BERT layer — linear layers, attention, exact GELU, LayerNorm,
//! softmax, residual adds and dropout products — each one parallel pass with a hand-written
//! backward, plugged into burn through its backend-extension API.
//!
//! Why: burn 0.22 on CPU runs these as chains of separate tensor operations, each allocating
//! a tensor and, in training, recording an autodiff node (LayerNorm is eight forward
//! operations and more backward), many of them on one thread; attention splits and merges
//! heads with strided copies; exact GELU calls a scalar libm `erf` per element, and burn's
//! GELU backward is the derivative of the *tanh approximation*. Here GEMMs run one block of
//! rows per rayon thread, attention works on strided per-head views, element-wise work is
//! vectorised (AVX2 where the CPU has it), and GELU's gradient is the exact one.
//! BENCHMARKS.md has what each step gained.
//!
//! Only burn-ndarray at f32, with or without autodiff, has these kernels. Everywhere else
//! (CUDA, flex, other precisions) and with [`Kernels::Composed`] the same maths is composed
//! from burn tensor operations: the slow twin the parity tests compare against.

// burn-ndarray is deprecated upstream in favour of flex, but it is the fastest CPU backend
// measured here (BENCHMARKS.md), so the kernels target it.
#![allow(deprecated)]

use std::borrow::Cow;
use std::f32::consts::FRAC_1_SQRT_2;

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Dispatch, NdArray, backend_extension};
use burn::tensor::activation::softmax as composed_softmax;
use burn::tensor::module::layer_norm as composed_layer_norm;
use burn::tensor::{DType, Tensor};
use ndarray::linalg::general_mat_mul;
use ndarray::{ArcArray, ArrayView2, ArrayViewMut2, IxDyn, s};
use rayon::prelude::*;

/// Which implementation of the operations above a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused kernels where they exist (burn-ndarray, f32), composition elsewhere.
    #[default]
    Fused,
    /// Always burn tensor operations: the reference the fused kernels are tested against.
    Composed,
}

impl Kernels {
    /// [`Kernels::Fused`] unless the environment sets `FEDMICSE_KERNELS=composed`: an escape
    /// hatch to rule the fused kernels in or out when a result looks wrong.
    pub fn from_env() -> Self {
        static CHOICE: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| match std::env::var("FEDMICSE_KERNELS").as_deref() {
            Ok("composed") => Kernels::Composed,
            _ => Kernels::Fused,
        })
    }
}

/// `x W + b` over the last dimension of `x`; `weight` is `[in, out]`.
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    kernels: Kernels,
) -> Tensor<D> {
    if fused_here(&x, kernels) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
        ));
    }
    // One 2-D matmul over all leading rows, not `burn::tensor::module::linear`: under burn
    // 0.22's run-time dispatch that falls back to a batched matmul against a broadcast
    // weight whenever `seq` is a multiple of 32, and autodiff then builds a weight gradient
    // per sequence (`[batch, in, out]`, 288 MiB for MiniLM's FFN at batch 128) before summing.
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    dims[D - 1] = weight.dims()[1];
    let y = x.reshape([rows, d_in]).matmul(weight) + bias.unsqueeze::<2>();
    y.reshape(dims)
}

/// `a + b` for tensors of one shape (residual connections), in parallel on the fused path.
pub fn add<const D: usize>(a: Tensor<D>, b: Tensor<D>, kernels: Kernels) -> Tensor<D> {
    if fused_here(&a, kernels) && a.dims() == b.dims() {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_add(
            a.into_dispatch(),
            b.into_dispatch(),
        ));
    }
    a + b
}

/// `x ⊙ mask` for a constant `mask` of `x`'s shape (dropout), in parallel on the fused path.
pub fn mul_mask<const D: usize>(x: Tensor<D>, mask: Tensor<D>, kernels: Kernels) -> Tensor<D> {
    if fused_here(&x, kernels) && x.dims() == mask.dims() {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_mul_mask(
            x.into_dispatch(),
            mask.into_dispatch(),
        ));
    }
    x * mask
}

/// Exact GELU, `x Φ(x)`.
pub fn gelu<const D: usize>(x: Tensor<D>, kernels: Kernels) -> Tensor<D> {
    if fused_here(&x, kernels) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()));
    }
    // Composed from `erf` so autodiff differentiates the exact function (burn's own `gelu`
    // backward is the tanh approximation's derivative).
    let cdf = (x.clone() * FRAC_1_SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5);
    x * cdf
}

/// LayerNorm over the last dimension: `(x − mean) / sqrt(var + eps) · gamma + beta`.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
    kernels: Kernels,
) -> Tensor<D> {
    if fused_here(&x, kernels) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_layer_norm(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            eps,
        ));
    }
    composed_layer_norm(x, gamma, Some(beta), eps)
}

/// Softmax over the last dimension.
pub fn softmax<const D: usize>(x: Tensor<D>, kernels: Kernels) -> Tensor<D> {
    if fused_here(&x, kernels) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_softmax(x.into_dispatch()));
    }
    composed_softmax(x, D - 1)
}

/// Scaled dot-product attention probabilities `softmax(q kᵀ / sqrt(dh) + key_bias)` per head.
///
/// `q`, `k`: `[batch, seq, hidden]` with heads side by side in `hidden` (as the projections
/// produce them: no head split copy); `key_bias`: `[batch, seq]`, added to every query's
/// scores (0 for tokens, `f32::MIN` for padding). Returns `[batch, heads, seq, seq]`.
pub fn attention_probs(
    q: Tensor<3>,
    k: Tensor<3>,
    key_bias: Tensor<2>,
    heads: usize,
    kernels: Kernels,
) -> Tensor<4> {
    if fused_here(&q, kernels) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention_probs(
            q.into_dispatch(),
            k.into_dispatch(),
            key_bias.into_dispatch(),
            heads,
        ));
    }
    let [b, s, h] = q.dims();
    let dh = h / heads;
    let split = |t: Tensor<3>| t.reshape([b, s, heads, dh]).swap_dims(1, 2);
    let scores = split(q)
        .matmul(split(k).swap_dims(2, 3))
        .mul_scalar(1.0 / (dh as f64).sqrt())
        + key_bias.reshape([b, 1, 1, s]);
    composed_softmax(scores, 3)
}

/// `probs · v` per head, heads merged back: `[batch, heads, seq, seq]` × `[batch, seq, hidden]`
/// → `[batch, seq, hidden]`.
pub fn attention_context(probs: Tensor<4>, v: Tensor<3>, kernels: Kernels) -> Tensor<3> {
    if fused_here(&v, kernels) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention_context(
            probs.into_dispatch(),
            v.into_dispatch(),
        ));
    }
    let [b, heads, s, _] = probs.dims();
    let h = v.dims()[2];
    let v = v.reshape([b, s, heads, h / heads]).swap_dims(1, 2);
    probs.matmul(v).swap_dims(1, 2).reshape([b, s, h])
}

/// Attention for inference: [`attention_context`] of [`attention_probs`] without
/// materialising the probabilities of the whole batch on the fused path.
pub fn attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    key_bias: Tensor<2>,
    heads: usize,
    kernels: Kernels,
) -> Tensor<3> {
    if fused_here(&q, kernels) && !q.is_autodiff() {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            key_bias.into_dispatch(),
            heads,
        ));
    }
    let probs = attention_probs(q, k, key_bias, heads, kernels);
    attention_context(probs, v, kernels)
}

fn fused_here<const D: usize>(x: &Tensor<D>, kernels: Kernels) -> bool {
    kernels == Kernels::Fused && x.dtype() == DType::F32 && x.device() == crate::device::cpu()
}

/// The operations, as a burn backend extension: implemented for burn-ndarray and for autodiff
/// over it; `Dispatch` routes a call to whichever of the two the tensor lives on.
#[backend_extension(NdArray, Autodiff)]
pub trait FusedOps: burn::backend::Backend {
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    fn fused_add(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_mul_mask(x: FloatTensor<Self>, mask: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    fn fused_softmax(x: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_attention_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
    fn fused_attention_context(probs: FloatTensor<Self>, v: FloatTensor<Self>)
    -> FloatTensor<Self>;
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
}

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
        let rows = x.len() / d_in;
        let mut y = zeros(rows * d_out);
        let block = row_block(rows);
        y.par_chunks_mut(block * d_out)
            .zip(x.par_chunks(block * d_in))
            .for_each(|(y, x)| {
                let n = x.len() / d_in;
                y.chunks_mut(d_out)
                    .for_each(|row| row.copy_from_slice(&bias));
                let x = ArrayView2::from_shape((n, d_in), x).expect("row block");
                let mut y = ArrayViewMut2::from_shape((n, d_out), y).expect("row block");
                general_mat_mul(1.0, &x, &w, 1.0, &mut y);
            });
        *shape.last_mut().expect("rank ≥ 1") = d_out;
        tensor(shape, y)
    }

    fn fused_add(a: NdArrayTensor, b: NdArrayTensor) -> NdArrayTensor {
        let (shape, a) = host(&a);
        let (_, b) = host(&b);
        let mut y = zeros(a.len());
        par_elementwise2(&mut y, &a, &b, |y, a, b| {
            for i in 0..y.len() {
                y[i] = a[i] + b[i];
            }
        });
        tensor(shape, y)
    }

    fn fused_mul_mask(x: NdArrayTensor, mask: NdArrayTensor) -> NdArrayTensor {
        let (shape, x) = host(&x);
        let (_, m) = host(&mask);
        let mut y = zeros(x.len());
        par_elementwise2(&mut y, &x, &m, |y, x, m| {
            for i in 0..y.len() {
                y[i] = x[i] * m[i];
            }
        });
        tensor(shape, y)
    }

    fn fused_gelu(x: NdArrayTensor) -> NdArrayTensor {
        let (shape, x) = host(&x);
        let mut y = zeros(x.len());
        par_elementwise(&mut y, &x, |y, x| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = gelu_and_slope(x).0;
            }
        });
        tensor(shape, y)
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
        let (shape, q) = host(&q);
        let (_, k) = host(&k);
        let (_, bias) = host(&key_bias);
        let a = Attention::new(&shape, heads);
        let mut probs = zeros(a.batch * a.heads * a.seq * a.seq);
        probs
            .par_chunks_mut(a.heads * a.seq * a.seq)
            .enumerate()
            .for_each(|(bi, p)| simd(|| a.probs_row(bi, &q, &k, &bias, p)));
        tensor(vec![a.batch, a.heads, a.seq, a.seq], probs)
    }

    fn fused_attention_context(probs: NdArrayTensor, v: NdArrayTensor) -> NdArrayTensor {
        let (pshape, probs) = host(&probs);
        let (shape, v) = host(&v);
        let a = Attention::new(&shape, pshape[1]);
        let mut context = zeros(v.len());
        context
            .par_chunks_mut(a.seq * a.hidden)
            .enumerate()
            .for_each(|(bi, c)| a.context_row(bi, &probs, &v, c));
        tensor(shape, context)
    }

    fn fused_attention(
        q: NdArrayTensor,
        k: NdArrayTensor,
        v: NdArrayTensor,
        key_bias: NdArrayTensor,
        heads: usize,
    ) -> NdArrayTensor {
        let (shape, q) = host(&q);
        let (_, k) = host(&k);
        let (_, v) = host(&v);
        let (_, bias) = host(&key_bias);
        let a = Attention::new(&shape, heads);
        let mut context = zeros(v.len());
        context
            .par_chunks_mut(a.seq * a.hidden)
            .enumerate()
            .for_each_init(
                || vec![0.0; a.heads * a.seq * a.seq],
                |p, (bi, c)| {
                    // One sequence's probabilities at a time, in a per-thread scratch buffer.
                    a.probs_row(bi, &q, &k, &bias, p);
                    a.context_row(0, p, &v[bi * a.seq * a.hidden..], c);
                },
            );
        tensor(shape, context)
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<NdArray, C> {
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearBackward;

        impl Backward<NdArray, 3> for LinearBackward {
            /// The input and the weight.
            type State = (NdArrayTensor, NdArrayTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<NdArray>(&ops.node);
                let [node_x, node_w, node_b] = ops.parents;
                let (x, w) = ops.state;
                let (xshape, x) = host(&x);
                let (wshape, w) = host(&w);
                let (_, g) = host(&grad);
                let (d_in, d_out) = (wshape[0], wshape[1]);
                let rows = x.len() / d_in;
                let xv = ArrayView2::from_shape((rows, d_in), &x).expect("input rows");
                let gv = ArrayView2::from_shape((rows, d_out), &g).expect("gradient rows");
                if let Some(node) = node_x {
                    // dx = g Wᵀ, by blocks of rows.
                    let wt = ArrayView2::from_shape((d_in, d_out), &w).expect("weight");
                    let wt = wt.t();
                    let mut dx = zeros(rows * d_in);
                    let block = row_block(rows);
                    dx.par_chunks_mut(block * d_in)
                        .zip(g.par_chunks(block * d_out))
                        .for_each(|(dx, g)| {
                            let n = g.len() / d_out;
                            let g = ArrayView2::from_shape((n, d_out), g).expect("row block");
                            let mut dx =
                                ArrayViewMut2::from_shape((n, d_in), dx).expect("row block");
                            general_mat_mul(1.0, &g, &wt, 0.0, &mut dx);
                        });
                    grads.register::<NdArray>(node.id, tensor(xshape, dx));
                }
                if let Some(node) = node_w {
                    // dW = xᵀ g, by blocks of W's rows (input features).
                    let mut dw = zeros(d_in * d_out);
                    let block = row_block(d_in);
                    dw.par_chunks_mut(block * d_out)
                        .enumerate()
                        .for_each(|(i, dw)| {
                            let n = dw.len() / d_out;
                            let xt = xv.slice(s![.., i * block..i * block + n]);
                            let mut dw =
                                ArrayViewMut2::from_shape((n, d_out), dw).expect("row block");
                            general_mat_mul(1.0, &xt.t(), &gv, 0.0, &mut dw);
                        });
                    grads.register::<NdArray>(node.id, tensor(wshape, dw));
                }
                if let Some(node) = node_b {
                    let block = row_block(rows);
                    let db = g
                        .par_chunks(block * d_out)
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
                        );
                    grads.register::<NdArray>(node.id, tensor(vec![d_out], db));
                }
            }
        }

        match LinearBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (x.into_primitive(), weight.into_primitive());
                let out = NdArray::fused_linear(x.clone(), w.clone(), bias.into_primitive());
                prep.finish((x, w), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(NdArray::fused_linear(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
            )),
        }
    }

    fn fused_add(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AddBackward;

        impl Backward<NdArray, 2> for AddBackward {
            type State = ();

            fn backward(self, ops: Ops<(), 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<NdArray>(&ops.node);
                let [node_a, node_b] = ops.parents;
                // Both inputs get the output's gradient as it is (shared, not copied).
                if let Some(node) = node_a {
                    grads.register::<NdArray>(node.id, grad.clone());
                }
                if let Some(node) = node_b {
                    grads.register::<NdArray>(node.id, grad);
                }
            }
        }

        match AddBackward
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                (),
                NdArray::fused_add(a.into_primitive(), b.into_primitive()),
            ),
            OpsKind::UnTracked(prep) => {
                prep.finish(NdArray::fused_add(a.into_primitive(), b.into_primitive()))
            }
        }
    }

    fn fused_mul_mask(x: FloatTensor<Self>, mask: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MulMaskBackward;

        impl Backward<NdArray, 1> for MulMaskBackward {
            /// The mask.
            type State = NdArrayTensor;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<NdArray>(&ops.node);
                let [parent] = ops.parents;
                if let Some(parent) = parent {
                    grads.register::<NdArray>(parent.id, NdArray::fused_mul_mask(grad, ops.state));
                }
            }
        }

        // The mask is a constant: no gradient flows to it.
        let mask = mask.into_primitive();
        match MulMaskBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = NdArray::fused_mul_mask(x.into_primitive(), mask.clone());
                prep.finish(mask, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(NdArray::fused_mul_mask(x.into_primitive(), mask))
            }
        }
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward;

        impl Backward<NdArray, 1> for GeluBackward {
            /// The input.
            type State = NdArrayTensor;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<NdArray>(&ops.node);
                let [parent] = ops.parents;
                if let Some(parent) = parent {
                    let (shape, x) = host(&ops.state);
                    let (_, g) = host(&grad);
                    let mut dx = zeros(x.len());
                    par_elementwise2(&mut dx, &x, &g, |dx, x, g| {
                        for i in 0..dx.len() {
                            dx[i] = g[i] * gelu_and_slope(x[i]).1;
                        }
                    });
                    grads.register::<NdArray>(parent.id, tensor(shape, dx));
                }
            }
        }

        match GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = x.into_primitive();
                let out = NdArray::fused_gelu(input.clone());
                prep.finish(input, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(NdArray::fused_gelu(x.into_primitive())),
        }
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormBackward;

        impl Backward<NdArray, 3> for LayerNormBackward {
            /// The input and gamma; mean and variance are recomputed (one cheap pass) rather
            /// than kept for every row between forward and backward.
            type State = (NdArrayTensor, NdArrayTensor, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<NdArray>(&ops.node);
                let [node_x, node_gamma, node_beta] = ops.parents;
                let (x, gamma, eps) = ops.state;
                let (shape, x) = host(&x);
                let (_, gamma) = host(&gamma);
                let (_, g) = host(&grad);
                let (dx, dgamma, dbeta) = layer_norm_backward(&x, &gamma, &g, eps);
                let d = gamma.len();
                if let Some(node) = node_x {
                    grads.register::<NdArray>(node.id, tensor(shape, dx));
                }
                if let Some(node) = node_gamma {
                    grads.register::<NdArray>(node.id, tensor(vec![d], dgamma));
                }
                if let Some(node) = node_beta {
                    grads.register::<NdArray>(node.id, tensor(vec![d], dbeta));
                }
            }
        }

        match LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, gamma) = (x.into_primitive(), gamma.into_primitive());
                let out =
                    NdArray::fused_layer_norm(x.clone(), gamma.clone(), beta.into_primitive(), eps);
                prep.finish((x, gamma, eps as f32), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(NdArray::fused_layer_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                eps,
            )),
        }
    }

    fn fused_softmax(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SoftmaxBackward;

        impl Backward<NdArray, 1> for SoftmaxBackward {
            /// The output: `dx = y ⊙ (g − Σ g ⊙ y)` needs nothing else.
            type State = NdArrayTensor;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<NdArray>(&ops.node);
                let [parent] = ops.parents;
                if let Some(parent) = parent {
                    let (shape, y) = host(&ops.state);
                    let (_, g) = host(&grad);
                    let n = *shape.last().expect("softmax of a scalar");
                    let mut dx = zeros(y.len());
                    par_rows2(&mut dx, &y, &g, n, |dx, y, g| {
                        let dot = sum_of(n, |i| y[i] * g[i]);
                        for i in 0..n {
                            dx[i] = y[i] * (g[i] - dot);
                        }
                    });
                    grads.register::<NdArray>(parent.id, tensor(shape, dx));
                }
            }
        }

        match SoftmaxBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = NdArray::fused_softmax(x.into_primitive());
                prep.finish(out.clone(), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(NdArray::fused_softmax(x.into_primitive())),
        }
    }
    fn fused_attention_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ProbsBackward;

        impl Backward<NdArray, 2> for ProbsBackward {
            /// q, k and the probabilities.
            type State = (NdArrayTensor, NdArrayTensor, NdArrayTensor, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<NdArray>(&ops.node);
                let [node_q, node_k] = ops.parents;
                let (q, k, probs, heads) = ops.state;
                let (shape, q) = host(&q);
                let (_, k) = host(&k);
                let (_, probs) = host(&probs);
                let (_, g) = host(&grad);
                let a = Attention::new(&shape, heads);
                let mut dq = zeros(q.len());
                let mut dk = zeros(k.len());
                let row = a.seq * a.hidden;
                dq.par_chunks_mut(row)
                    .zip(dk.par_chunks_mut(row))
                    .enumerate()
                    .for_each_init(
                        || vec![0.0; a.seq * a.seq],
                        |ds, (bi, (dq, dk))| {
                            a.probs_backward_row(bi, &q, &k, &probs, &g, ds, dq, dk)
                        },
                    );
                if let Some(node) = node_q {
                    grads.register::<NdArray>(node.id, tensor(shape.clone(), dq));
                }
                if let Some(node) = node_k {
                    grads.register::<NdArray>(node.id, tensor(shape, dk));
                }
            }
        }

        // The key bias is a constant (the padding mask): it takes no gradient.
        let key_bias = key_bias.into_primitive();
        match ProbsBackward
            .prepare::<C>([q.node(), k.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k) = (q.into_primitive(), k.into_primitive());
                let probs = NdArray::fused_attention_probs(q.clone(), k.clone(), key_bias, heads);
                prep.finish((q, k, probs.clone(), heads), probs)
            }
            OpsKind::UnTracked(prep) => prep.finish(NdArray::fused_attention_probs(
                q.into_primitive(),
                k.into_primitive(),
                key_bias,
                heads,
            )),
        }
    }

    fn fused_attention_context(
        probs: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ContextBackward;

        impl Backward<NdArray, 2> for ContextBackward {
            /// The probabilities and v.
            type State = (NdArrayTensor, NdArrayTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<NdArray>(&ops.node);
                let [node_probs, node_v] = ops.parents;
                let (probs, v) = ops.state;
                let (pshape, probs) = host(&probs);
                let (shape, v) = host(&v);
                let (_, g) = host(&grad);
                let a = Attention::new(&shape, pshape[1]);
                let mut dprobs = zeros(probs.len());
                let mut dv = zeros(v.len());
                dprobs
                    .par_chunks_mut(a.heads * a.seq * a.seq)
                    .zip(dv.par_chunks_mut(a.seq * a.hidden))
                    .enumerate()
                    .for_each(|(bi, (dp, dv))| a.context_backward_row(bi, &probs, &v, &g, dp, dv));
                if let Some(node) = node_probs {
                    grads.register::<NdArray>(node.id, tensor(pshape, dprobs));
                }
                if let Some(node) = node_v {
                    grads.register::<NdArray>(node.id, tensor(shape, dv));
                }
            }
        }

        match ContextBackward
            .prepare::<C>([probs.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (probs, v) = (probs.into_primitive(), v.into_primitive());
                let out = NdArray::fused_attention_context(probs.clone(), v.clone());
                prep.finish((probs, v), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(NdArray::fused_attention_context(
                probs.into_primitive(),
                v.into_primitive(),
            )),
        }
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        // Differentiable as its two halves.
        let probs = Self::fused_attention_probs(q, k, key_bias, heads);
        Self::fused_attention_context(probs, v)
    }
}

/// Shapes of one attention call and the per-sequence kernels, which work on strided views
/// of `[batch, seq, hidden]` activations (head `j` is columns `j·dh .. (j+1)·dh`).
struct Attention {
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dh: usize,
}

impl Attention {
    fn new(shape: &[usize], heads: usize) -> Self {
        let &[batch, seq, hidden] = shape else {
            panic!("attention expects [batch, seq, hidden], got {shape:?}");
        };
        assert!(
            heads > 0 && hidden % heads == 0,
            "{hidden} hidden not divisible by {heads} heads"
        );
        Attention {
            batch,
            seq,
            hidden,
            heads,
            dh: hidden / heads,
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.dh as f32).sqrt()
    }

    /// Sequence `bi`'s probabilities, `[heads, seq, seq]`, into `p`.
    fn probs_row(&self, bi: usize, q: &[f32], k: &[f32], bias: &[f32], p: &mut [f32]) {
        let (s, h, dh) = (self.seq, self.hidden, self.dh);
        let base = bi * s * h;
        let bias = &bias[bi * s..(bi + 1) * s];
        for (j, p) in p.chunks_mut(s * s).enumerate() {
            let at = base + j * dh;
            // scores = scale · Q_j K_jᵀ
            gemm(
                s,
                dh,
                s,
                self.scale(),
                &q[at..],
                (h, 1),
                &k[at..],
                (1, h),
                0.0,
                p,
                (s, 1),
            );
            for row in p.chunks_mut(s) {
                row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                softmax_in_place(row);
            }
        }
    }

    /// Sequence `bi`'s context `[seq, hidden]` into `c`: `P_j V_j` for each head `j`.
    fn context_row(&self, bi: usize, probs: &[f32], v: &[f32], c: &mut [f32]) {
        let (s, h, dh) = (self.seq, self.hidden, self.dh);
        let probs = &probs[bi * self.heads * s * s..];
        let v = &v[bi * s * h..];
        for j in 0..self.heads {
            let p = &probs[j * s * s..];
            gemm(
                s,
                s,
                dh,
                1.0,
                p,
                (s, 1),
                &v[j * dh..],
                (h, 1),
                0.0,
                &mut c[j * dh..],
                (h, 1),
            );
        }
    }

    /// Gradients of [`Self::probs_row`] for sequence `bi`: with `dS = P ⊙ (dP − Σ dP ⊙ P)`,
    /// `dQ_j = scale · dS K_j` and `dK_j = scale · dSᵀ Q_j`.
    #[allow(clippy::too_many_arguments)]
    fn probs_backward_row(
        &self,
        bi: usize,
        q: &[f32],
        k: &[f32],
        probs: &[f32],
        dprobs: &[f32],
        ds: &mut [f32],
        dq: &mut [f32],
        dk: &mut [f32],
    ) {
        let (s, h, dh) = (self.seq, self.hidden, self.dh);
        let (q, k) = (&q[bi * s * h..], &k[bi * s * h..]);
        let at = bi * self.heads * s * s;
        for j in 0..self.heads {
            let p = &probs[at + j * s * s..at + (j + 1) * s * s];
            let g = &dprobs[at + j * s * s..at + (j + 1) * s * s];
            for ((ds, p), g) in ds.chunks_mut(s).zip(p.chunks(s)).zip(g.chunks(s)) {
                let dot = sum_of(s, |i| p[i] * g[i]);
                for i in 0..s {
                    ds[i] = p[i] * (g[i] - dot);
                }
            }
            let c = j * dh;
            gemm(
                s,
                s,
                dh,
                self.scale(),
                ds,
                (s, 1),
                &k[c..],
                (h, 1),
                0.0,
                &mut dq[c..],
                (h, 1),
            );
            gemm(
                s,
                s,
                dh,
                self.scale(),
                ds,
                (1, s),
                &q[c..],
                (h, 1),
                0.0,
                &mut dk[c..],
                (h, 1),
            );
        }
    }

    /// Gradients of [`Self::context_row`]: `dP_j = dC_j V_jᵀ`, `dV_j = P_jᵀ dC_j`.
    fn context_backward_row(
        &self,
        bi: usize,
        probs: &[f32],
        v: &[f32],
        dc: &[f32],
        dprobs: &mut [f32],
        dv: &mut [f32],
    ) {
        let (s, h, dh) = (self.seq, self.hidden, self.dh);
        let (v, dc) = (&v[bi * s * h..], &dc[bi * s * h..]);
        let probs = &probs[bi * self.heads * s * s..];
        for j in 0..self.heads {
            let c = j * dh;
            let dp = &mut dprobs[j * s * s..];
            gemm(
                s,
                dh,
                s,
                1.0,
                &dc[c..],
                (h, 1),
                &v[c..],
                (1, h),
                0.0,
                dp,
                (s, 1),
            );
            let p = &probs[j * s * s..];
            gemm(
                s,
                s,
                dh,
                1.0,
                p,
                (1, s),
                &dc[c..],
                (h, 1),
                0.0,
                &mut dv[c..],
                (h, 1),
            );
        }
    }
}

/// `c ← alpha · a b + beta · c` for an `m×k` matrix `a` and a `k×n` matrix `b`, each given as
/// a slice starting at its first element and its (row, column) strides; one thread
/// (matrixmultiply), as callers already run one sequence per rayon task.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && k > 0 && n > 0);
    assert!(last(m, k, rsa, csa) < a.len(), "gemm: a out of bounds");
    assert!(last(k, n, rsb, csb) < b.len(), "gemm: b out of bounds");
    assert!(last(m, n, rsc, csc) < c.len(), "gemm: c out of bounds");
    // SAFETY: every element the strides address lies inside its slice (checked above), and
    // `c` is borrowed mutably, so it aliases neither input.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        )
    }
}

fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    let inv = 1.0 / sum_of(row.len(), |i| row[i]);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// `dx`, `dgamma`, `dbeta` of LayerNorm over rows of `gamma.len()`, given the output
/// gradient `g`: `dx = rstd (g γ − mean(g γ) − x̂ mean(g γ x̂))`, `dγ = Σ g x̂`, `dβ = Σ g`.
fn layer_norm_backward(
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

/// Mean and `1 / sqrt(var + eps)` of one row (biased variance, as PyTorch's LayerNorm).
#[inline]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum_of(x.len(), |i| x[i]) / n;
    let var = sum_of(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `Σ term(i)` for `i < n` with eight independent partial sums: a single running sum is a
/// chain of dependent additions the compiler may not reorder, so it cannot vectorise.
#[inline(always)]
fn sum_of(n: usize, term: impl Fn(usize) -> f32) -> f32 {
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

/// Runs `f` compiled for AVX2 and FMA where the CPU has them (the element-wise loops are
/// then 8 lanes wide instead of SSE2's 4), as is elsewhere.
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        static HAS_AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *HAS_AVX2.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }) {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `(gelu(x), gelu'(x))` for exact GELU: `x Φ(x)` and `Φ(x) + x φ(x)`.
#[inline(always)]
fn gelu_and_slope(x: f32) -> (f32, f32) {
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
fn exp(x: f32) -> f32 {
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

/// Rows per task for the GEMMs: one block per rayon thread, so each core runs one large
/// single-threaded GEMM (OpenBLAS's own thread pool is set to one thread, see
/// [`single_threaded_blas`]; its spinning workers cost ~15 % of a step next to rayon's).
fn row_block(rows: usize) -> usize {
    single_threaded_blas();
    rows.div_ceil(rayon::current_num_threads()).max(1)
}

/// Makes OpenBLAS single-threaded, once: the fused GEMMs parallelise over rayon instead.
fn single_threaded_blas() {
    #[cfg(feature = "blas")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            unsafe extern "C" {
                fn openblas_set_num_threads(num_threads: std::ffi::c_int);
            }
            // SAFETY: OpenBLAS documents this as callable at any time; it sets the thread
            // count of the calls that start afterwards.
            unsafe { openblas_set_num_threads(1) };
        });
    }
}

/// Work per rayon task: small enough to share two cores evenly, large enough that
/// scheduling costs nothing next to it.
const TASK_ELEMENTS: usize = 16 * 1024;

fn par_elementwise(y: &mut [f32], x: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) {
    y.par_chunks_mut(TASK_ELEMENTS)
        .zip(x.par_chunks(TASK_ELEMENTS))
        .for_each(|(y, x)| simd(|| f(y, x)));
}

fn par_elementwise2(
    y: &mut [f32],
    a: &[f32],
    b: &[f32],
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) {
    y.par_chunks_mut(TASK_ELEMENTS)
        .zip(a.par_chunks(TASK_ELEMENTS))
        .zip(b.par_chunks(TASK_ELEMENTS))
        .for_each(|((y, a), b)| simd(|| f(y, a, b)));
}

/// Applies `f` to each row of `n` elements, rows spread over rayon tasks.
fn par_rows(y: &mut [f32], x: &[f32], n: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) {
    let chunk = (TASK_ELEMENTS / n).max(1) * n;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| simd(|| y.chunks_mut(n).zip(x.chunks(n)).for_each(|(y, x)| f(y, x))));
}

fn par_rows2(
    y: &mut [f32],
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) {
    let chunk = (TASK_ELEMENTS / n).max(1) * n;
    y.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk))
        .zip(b.par_chunks(chunk))
        .for_each(|((y, a), b)| {
            simd(|| {
                for ((y, a), b) in y.chunks_mut(n).zip(a.chunks(n)).zip(b.chunks(n)) {
                    f(y, a, b)
                }
            })
        });
}

/// The shape and the elements, in row-major order, of an f32 ndarray tensor: borrowed when
/// already contiguous, copied otherwise (a transposed view, say).
fn host(t: &NdArrayTensor) -> (Vec<usize>, Cow<'_, [f32]>) {
    let NdArrayTensor::F32(storage) = t else {
        panic!("fused kernels take f32 tensors, got {:?}", t.dtype());
    };
    let view = storage.view();
    let shape = view.shape().to_vec();
    let data = match view.to_slice() {
        Some(slice) => Cow::Borrowed(slice),
        None => Cow::Owned(view.iter().copied().collect()),
    };
    (shape, data)
}

/// A zeroed output buffer, zeroed (and its fresh pages faulted in) by all rayon threads:
/// `vec![0.0; n]` would do it on the calling thread while the others wait.
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    (0..n).into_par_iter().map(|_| 0.0).collect_into_vec(&mut v);
    v
}

fn tensor(shape: Vec<usize>, data: Vec<f32>) -> NdArrayTensor {
    let array = ArcArray::from_shape_vec(IxDyn(&shape), data).expect("shape matches the data");
    NdArrayTensor::from(array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn exp_matches_std_and_underflows_to_zero() {
        let mut worst = 0.0f32;
        for i in -87_000..=88_000 {
            let x = i as f32 / 1000.0;
            let rel = (exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        // erf from its Taylor series in f64 (|x| ≤ 5, so cancellation costs < 6 of 16 digits).
        fn erf64(z: f64) -> f64 {
            let (mut term, mut sum, mut k) = (z, z, 0.0);
            while term.abs() > 1e-17 * sum.abs().max(1e-300) || k < 5.0 {
                k += 1.0;
                term *= -z * z / k;
                sum += term / (2.0 * k + 1.0);
                if k > 200.0 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        for i in -250..=250 {
            let x = i as f32 / 50.0;
            let xd = x as f64;
            let cdf = 0.5 * (1.0 + erf64(xd / std::f64::consts::SQRT_2));
            let pdf = (-xd * xd / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (y, dy) = gelu_and_slope(x);
            assert!((y as f64 - xd * cdf).abs() < 1e-6, "gelu({x}) = {y}");
            assert!(
                (dy as f64 - (cdf + xd * pdf)).abs() < 1e-6,
                "gelu'({x}) = {dy}"
            );
        }
    }

    /// Deterministic "random" values in [-3, 3), with a stride pattern no kernel can align to.
    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| 3.0 * ((i as f32 * 0.618 + seed).sin() * 1.7).sin())
            .collect()
    }

    fn close(what: &str, a: Tensor<3>, b: Tensor<3>, tol: f32) {
        let a: Vec<f32> = a.into_data().try_into_vec().unwrap();
        let b: Vec<f32> = b.into_data().try_into_vec().unwrap();
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= tol * scale,
            "{what}: max abs diff {diff} (scale {scale})"
        );
    }

    /// Each fused operation against its composed twin: outputs and the gradients of a
    /// weighted sum with respect to every input, on a transposed (non-contiguous) input and
    /// with masked softmax entries at `f32::MIN`.
    #[test]
    fn fused_ops_match_composed_ops_forward_and_backward() {
        let device = crate::device::cpu().autodiff();
        let [a, b, c] = [3, 5, 37];
        let input = |seed: f32| {
            // Built as [a, c, b] and transposed: the kernels must read strided views.
            Tensor::<3>::from_data(TensorData::new(values(a * b * c, seed), [a, c, b]), &device)
                .swap_dims(1, 2)
                .require_grad()
        };
        let weights =
            Tensor::<3>::from_data(TensorData::new(values(a * b * c, 9.0), [a, b, c]), &device);
        let gamma =
            || Tensor::<1>::from_data(TensorData::new(values(c, 4.0), [c]), &device).require_grad();
        let beta =
            || Tensor::<1>::from_data(TensorData::new(values(c, 5.0), [c]), &device).require_grad();

        type Op = fn(Tensor<3>, Tensor<1>, Tensor<1>, Kernels) -> Tensor<3>;
        let ops: [(&str, Op); 5] = [
            ("gelu", |x, _, _, k| gelu(x, k)),
            ("add", |x, _, _, k| {
                add(x.clone(), x.clone().mul_scalar(0.5).sin(), k)
            }),
            ("mul_mask", |x, _, _, k| {
                let [a, b, c] = x.dims();
                let mask: Vec<f32> = (0..a * b * c).map(|i| (i % 4) as f32 * 0.5).collect();
                let mask = Tensor::<3>::from_data(TensorData::new(mask, [a, b, c]), &x.device());
                mul_mask(x, mask, k)
            }),
            ("layer_norm", |x, g, b, k| layer_norm(x, g, b, 1e-12, k)),
            ("softmax", |x, _, _, k| {
                // Mask every third key of every row the way attention does.
                let [a, b, c] = x.dims();
                let mask: Vec<f32> = (0..a * b * c)
                    .map(|i| if i % 3 == 1 { f32::MIN } else { 0.0 })
                    .collect();
                let mask = Tensor::<3>::from_data(TensorData::new(mask, [a, b, c]), &x.device());
                softmax(x + mask, k)
            }),
        ];
        for (name, op) in ops {
            let run = |kernels| {
                let (x, g, bt) = (input(1.0), gamma(), beta());
                let y = op(x.clone(), g.clone(), bt.clone(), kernels);
                let grads = (y.clone() * weights.clone()).sum().backward();
                let gx = x.grad(&grads).expect("x has a gradient");
                let gg = g.grad(&grads).map(|t| t.reshape([1, 1, c]));
                let gb = bt.grad(&grads).map(|t| t.reshape([1, 1, c]));
                (y, gx, gg, gb)
            };
            let (y, gx, gg, gb) = run(Kernels::Fused);
            let (y0, gx0, gg0, gb0) = run(Kernels::Composed);
            close(&format!("{name} forward"), y, y0, 1e-5);
            close(&format!("{name} d/dx"), gx, gx0, 1e-4);
            assert_eq!(
                gg.is_some(),
                gg0.is_some(),
                "{name}: gamma gradient presence"
            );
            if let (Some(gg), Some(gg0), Some(gb), Some(gb0)) = (gg, gg0, gb, gb0) {
                close(&format!("{name} d/dgamma"), gg, gg0, 1e-4);
                close(&format!("{name} d/dbeta"), gb, gb0, 1e-4);
            }
        }
    }

    /// Attention on the fused path against the composed one: probabilities, context and the
    /// gradients with respect to q, k and v, with padded keys; and inference's one-pass
    /// `attention` against the two halves.
    #[test]
    fn fused_attention_matches_composed_attention() {
        let device = crate::device::cpu().autodiff();
        let (b, s, heads, dh) = (3, 7, 4, 5);
        let h = heads * dh;
        let act = |seed: f32| {
            Tensor::<3>::from_data(TensorData::new(values(b * s * h, seed), [b, s, h]), &device)
                .require_grad()
        };
        // Sequence i has 7 - 2i real tokens; the rest are padding.
        let bias: Vec<f32> = (0..b * s)
            .map(|i| {
                if i % s < s - 2 * (i / s) {
                    0.0
                } else {
                    f32::MIN
                }
            })
            .collect();
        let bias = Tensor::<2>::from_data(TensorData::new(bias, [b, s]), &device);
        let wp = Tensor::<4>::from_data(
            TensorData::new(values(b * heads * s * s, 7.0), [b, heads, s, s]),
            &device,
        );
        let wc =
            Tensor::<3>::from_data(TensorData::new(values(b * s * h, 8.0), [b, s, h]), &device);
        let run = |kernels| {
            let (q, k, v) = (act(1.0), act(2.0), act(3.0));
            let probs = attention_probs(q.clone(), k.clone(), bias.clone(), heads, kernels);
            let context = attention_context(probs.clone(), v.clone(), kernels);
            // Gradients reach the probabilities both through the context and directly (AMI).
            let loss = (context.clone() * wc.clone()).sum() + (probs.clone() * wp.clone()).sum();
            let grads = loss.backward();
            let g = |t: &Tensor<3>| t.grad(&grads).expect("gradient");
            (
                probs.reshape([b * heads, s, s]),
                context,
                g(&q),
                g(&k),
                g(&v),
            )
        };
        let (p, c, gq, gk, gv) = run(Kernels::Fused);
        let (p0, c0, gq0, gk0, gv0) = run(Kernels::Composed);
        close("probs", p.clone(), p0, 1e-5);
        close("context", c.clone(), c0, 1e-5);
        close("d/dq", gq, gq0, 1e-4);
        close("d/dk", gk, gk0, 1e-4);
        close("d/dv", gv, gv0, 1e-4);
        let padded: Vec<f32> = p.into_data().try_into_vec().unwrap();
        assert_eq!(
            padded[(2 * heads) * s * s + s - 1],
            0.0,
            "padded key has probability 0"
        );

        let plain = crate::device::cpu();
        let on = |t: Tensor<3>| Tensor::<3>::from_data(t.into_data(), &plain);
        let one_pass = attention(
            on(act(1.0)),
            on(act(2.0)),
            on(act(3.0)),
            Tensor::<2>::from_data(bias.into_data(), &plain),
            heads,
            Kernels::Fused,
        );
        close("one-pass attention", one_pass, on(c), 1e-6);
    }

    /// The fused linear layer against `x.matmul(W) + b`: output and gradients with respect to
    /// input, weight and bias, with more rows than threads and an odd number of features.
    #[test]
    fn fused_linear_matches_composed_linear() {
        let device = crate::device::cpu().autodiff();
        let (a, b, d_in, d_out) = (3, 67, 37, 11);
        let weights = Tensor::<3>::from_data(
            TensorData::new(values(a * b * d_out, 9.0), [a, b, d_out]),
            &device,
        );
        let run = |kernels| {
            let x = Tensor::<3>::from_data(
                TensorData::new(values(a * b * d_in, 1.0), [a, b, d_in]),
                &device,
            )
            .require_grad();
            let w = Tensor::<2>::from_data(
                TensorData::new(values(d_in * d_out, 2.0), [d_in, d_out]),
                &device,
            )
            .require_grad();
            let bias =
                Tensor::<1>::from_data(TensorData::new(values(d_out, 3.0), [d_out]), &device)
                    .require_grad();
            let y = linear(x.clone(), w.clone(), bias.clone(), kernels);
            let grads = (y.clone() * weights.clone()).sum().backward();
            let gx = x.grad(&grads).unwrap();
            let gw = w.grad(&grads).unwrap().reshape([1, d_in, d_out]);
            let gb = bias.grad(&grads).unwrap().reshape([1, 1, d_out]);
            (y, gx, gw, gb)
        };
        let (y, gx, gw, gb) = run(Kernels::Fused);
        let (y0, gx0, gw0, gb0) = run(Kernels::Composed);
        close("linear forward", y, y0, 1e-5);
        close("linear d/dx", gx, gx0, 1e-5);
        close("linear d/dW", gw, gw0, 1e-5);
        close("linear d/db", gb, gb0, 1e-5);
    }

    #[test]
    fn masked_softmax_entries_are_exactly_zero_and_rows_sum_to_one() {
        let device = crate::device::cpu();
        let x = Tensor::<3>::from_data(
            TensorData::new(vec![1.0, f32::MIN, 2.0, f32::MIN, -0.5, 0.25], [1, 2, 3]),
            &device,
        );
        let y: Vec<f32> = softmax(x, Kernels::Fused)
            .into_data()
            .try_into_vec()
            .unwrap();
        assert_eq!(y[1], 0.0);
        assert_eq!(y[3], 0.0);
        assert!((y[0] + y[2] - 1.0).abs() < 1e-6 && (y[4] + y[5] - 1.0).abs() < 1e-6);
    }
}
