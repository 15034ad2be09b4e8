//! The operations as the model calls them: each picks the fused kernel where the tensor
//! lives on burn-ndarray at f32 (and [`Kernels::Fused`] is chosen), its composed twin of burn
//! tensor operations elsewhere, and [`FusedOps`] routes a fused call to burn-ndarray or to
//! autodiff over it.

use std::f32::consts::FRAC_1_SQRT_2;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, backend_extension};
use burn::tensor::activation::softmax as composed_softmax;
use burn::tensor::module::layer_norm as composed_layer_norm;
use burn::tensor::{DType, Tensor};

/// Which implementation of the operations in this module a model uses.
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
        let (w, b) = (weight.into_dispatch(), bias.into_dispatch());
        return Tensor::from_dispatch(Dispatch::fused_linear(x.into_dispatch(), w, b));
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
        return Tensor::from_dispatch(Dispatch::fused_add(a.into_dispatch(), b.into_dispatch()));
    }
    a + b
}

/// `x ⊙ mask` for a constant `mask` of `x`'s shape (dropout), in parallel on the fused path.
pub fn mul_mask<const D: usize>(x: Tensor<D>, mask: Tensor<D>, kernels: Kernels) -> Tensor<D> {
    if fused_here(&x, kernels) && x.dims() == mask.dims() {
        let (x, mask) = (x.into_dispatch(), mask.into_dispatch());
        return Tensor::from_dispatch(Dispatch::fused_mul_mask(x, mask));
    }
    x * mask
}

/// Exact GELU, `x Φ(x)`.
pub fn gelu<const D: usize>(x: Tensor<D>, kernels: Kernels) -> Tensor<D> {
    if fused_here(&x, kernels) {
        return Tensor::from_dispatch(Dispatch::fused_gelu(x.into_dispatch()));
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
        let (g, b) = (gamma.into_dispatch(), beta.into_dispatch());
        return Tensor::from_dispatch(Dispatch::fused_layer_norm(x.into_dispatch(), g, b, eps));
    }
    composed_layer_norm(x, gamma, Some(beta), eps)
}

/// Softmax over the last dimension.
pub fn softmax<const D: usize>(x: Tensor<D>, kernels: Kernels) -> Tensor<D> {
    if fused_here(&x, kernels) {
        return Tensor::from_dispatch(Dispatch::fused_softmax(x.into_dispatch()));
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
        let (q, k) = (q.into_dispatch(), k.into_dispatch());
        let bias = key_bias.into_dispatch();
        return Tensor::from_dispatch(Dispatch::fused_attention_probs(q, k, bias, heads));
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
        let (probs, v) = (probs.into_dispatch(), v.into_dispatch());
        return Tensor::from_dispatch(Dispatch::fused_attention_context(probs, v));
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
        let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
        let bias = key_bias.into_dispatch();
        return Tensor::from_dispatch(Dispatch::fused_attention(q, k, v, bias, heads));
    }
    let probs = attention_probs(q, k, key_bias, heads, kernels);
    attention_context(probs, v, kernels)
}

/// Whether `x` can take the fused path: burn-ndarray (the CPU device) at f32.
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
    /// Attention in one call; by default its two halves (differentiable each, so autodiff
    /// takes this), burn-ndarray has a one-pass kernel.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        let probs = Self::fused_attention_probs(q, k, key_bias, heads);
        Self::fused_attention_context(probs, v)
    }
}
