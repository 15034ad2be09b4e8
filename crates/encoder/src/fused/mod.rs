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
//!
//! # Layout
//! - `ops`: what the model calls — one function per operation that picks the fused kernel
//!   or its composed twin, and the [`FusedOps`] backend extension that routes to a backend.
//! - `cpu`: the burn-ndarray kernels, forward and backward, on host slices.
//! - `attention`: per-sequence attention kernels on strided views of the heads.
//! - `autodiff`: the operations over `Autodiff<NdArray>`, all sharing one backward skeleton.
//! - `parallel`: tensors to slices and back, zeroed buffers, splitting work over rayon and
//!   AVX2.
//! - `maths`: scalar kernels (`exp`, `erf`, GELU, softmax and LayerNorm rows, sums).

// burn-ndarray is deprecated upstream in favour of flex, but it is the fastest CPU backend
// measured here (BENCHMARKS.md), so the kernels target it.
#![allow(deprecated)]

mod attention;
mod autodiff;
mod cpu;
mod maths;
mod ops;
mod parallel;
#[cfg(test)]
mod tests;

pub use ops::{
    FusedOps, Kernels, add, attention, attention_context, attention_probs, gelu, layer_norm,
    linear, mul_mask, softmax,
};
pub(crate) use parallel::zeros;
