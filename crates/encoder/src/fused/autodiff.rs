//! The fused operations over `Autodiff<NdArray>`: the burn-ndarray forward pass, recorded on
//! the autodiff graph with a hand-written backward pass.
//!
//! Every operation shares one skeleton, written once here: [`record`] prepares the
//! operation, runs the forward pass and keeps its state only when an input needs a gradient;
//! [`Step`] is the one burn [`Backward`] implementation, which takes the output's gradient,
//! asks the operation's [`GradientsFn`] for its inputs' gradients and registers them. What
//! differs per operation — the state the forward pass keeps and the gradient maths — is the
//! pair of closures it hands to [`record`], or to [`record_unary`] where one input takes a
//! gradient computed from one kept tensor (dropout, GELU, softmax).

use std::fmt::Debug;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, NdArray};

use super::attention;
use super::cpu;
use super::ops::FusedOps;

/// One operation's backward maths: its inputs' gradients from the state its forward pass
/// kept and the output's gradient. The flags say which of the `N` differentiable inputs need
/// a gradient; where one does not, the result may be `None` (the work skipped) and is dropped
/// either way.
type GradientsFn<S, const N: usize> = fn(S, NdArrayTensor, [bool; N]) -> [Option<NdArrayTensor>; N];

/// The burn backward step of every fused operation. It holds only which maths to run (a
/// function pointer, no data, as burn asks of `Backward` types); the tensors it needs travel
/// as burn's `Ops` state.
#[derive(Debug)]
struct Step<S, const N: usize> {
    gradients: GradientsFn<S, N>,
}

impl<S, const N: usize> Backward<NdArray, N> for Step<S, N>
where
    S: Clone + Send + Debug + 'static,
{
    type State = S;

    fn backward(self, ops: Ops<S, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<NdArray>(&ops.node);
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let inputs = (self.gradients)(ops.state, grad, wanted);
        for (parent, input) in ops.parents.into_iter().zip(inputs) {
            if let (Some(node), Some(input)) = (parent, input) {
                grads.register::<NdArray>(node.id, input);
            }
        }
    }
}

/// Runs `forward`, which returns the output and the state for the backward pass, and records
/// `gradients` as the output's backward step when any of `nodes` needs a gradient (the state
/// is dropped otherwise). `nodes` are the differentiable inputs' guards, taken before their
/// primitives are consumed; constant inputs (dropout masks, the key bias) are not among them.
fn record<C, S, const N: usize>(
    nodes: [NodeGuard; N],
    forward: impl FnOnce() -> (NdArrayTensor, S),
    gradients: GradientsFn<S, N>,
) -> FloatTensor<Autodiff<NdArray, C>>
where
    C: CheckpointStrategy,
    S: Clone + Send + Debug + 'static,
{
    match (Step { gradients })
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, state) = forward();
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward().0),
    }
}

/// The gradient of a one-input operation from the tensor its forward pass kept and the
/// output's gradient.
type UnaryGradientFn = fn(NdArrayTensor, NdArrayTensor) -> NdArrayTensor;

/// [`record`] for an operation of one differentiable input whose forward pass keeps one
/// tensor. `gradient` travels with that tensor in the state, so one [`GradientsFn`] serves
/// every such operation.
fn record_unary<C: CheckpointStrategy>(
    node: NodeGuard,
    forward: impl FnOnce() -> (NdArrayTensor, NdArrayTensor),
    gradient: UnaryGradientFn,
) -> FloatTensor<Autodiff<NdArray, C>> {
    let forward = || {
        let (out, kept) = forward();
        (out, (kept, gradient))
    };
    record::<C, _, 1>([node], forward, |(kept, gradient), grad, [want]| {
        [want.then(|| gradient(kept, grad))]
    })
}

// The trait's `fused_attention` (its two halves, each differentiable) serves autodiff.
impl<C: CheckpointStrategy> FusedOps for Autodiff<NdArray, C> {
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), weight.node(), bias.node()];
        let (x, w) = (x.into_primitive(), weight.into_primitive());
        // Kept: the input and the weight.
        let forward = || {
            let out = NdArray::fused_linear(x.clone(), w.clone(), bias.into_primitive());
            (out, (x, w))
        };
        record::<C, _, 3>(nodes, forward, |(x, w), grad, wanted| {
            cpu::linear_backward(&x, &w, &grad, wanted)
        })
    }

    fn fused_add(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [a.node(), b.node()];
        let forward = || {
            let out = NdArray::fused_add(a.into_primitive(), b.into_primitive());
            (out, ())
        };
        record::<C, _, 2>(nodes, forward, |(), grad, [a, b]| {
            // Both inputs get the output's gradient as it is (shared, not copied).
            [a.then(|| grad.clone()), b.then_some(grad)]
        })
    }

    fn fused_mul_mask(x: FloatTensor<Self>, mask: FloatTensor<Self>) -> FloatTensor<Self> {
        // The mask is a constant: no gradient flows to it, but the backward pass needs it.
        let mask = mask.into_primitive();
        let node = x.node();
        let forward = || {
            let out = NdArray::fused_mul_mask(x.into_primitive(), mask.clone());
            (out, mask)
        };
        record_unary::<C>(node, forward, |mask, grad| {
            NdArray::fused_mul_mask(grad, mask)
        })
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let node = x.node();
        let x = x.into_primitive();
        // Kept: the input.
        let forward = || (NdArray::fused_gelu(x.clone()), x);
        record_unary::<C>(node, forward, |x, grad| cpu::gelu_backward(&x, &grad))
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), gamma.node(), beta.node()];
        let (x, gamma) = (x.into_primitive(), gamma.into_primitive());
        // Kept: the input and gamma; mean and variance are recomputed (one cheap pass) rather
        // than kept for every row between forward and backward.
        let forward = || {
            let out =
                NdArray::fused_layer_norm(x.clone(), gamma.clone(), beta.into_primitive(), eps);
            (out, (x, gamma, eps as f32))
        };
        record::<C, _, 3>(nodes, forward, |(x, gamma, eps), grad, wanted| {
            cpu::layer_norm_backward(&x, &gamma, &grad, eps, wanted)
        })
    }

    fn fused_softmax(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let node = x.node();
        // Kept: the output, as `dx = y ⊙ (g − Σ g ⊙ y)` needs nothing else.
        let forward = || {
            let out = NdArray::fused_softmax(x.into_primitive());
            (out.clone(), out)
        };
        record_unary::<C>(node, forward, |y, grad| cpu::softmax_backward(&y, &grad))
    }

    fn fused_attention_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        // The key bias is a constant (the padding mask): it takes no gradient.
        let key_bias = key_bias.into_primitive();
        let nodes = [q.node(), k.node()];
        let (q, k) = (q.into_primitive(), k.into_primitive());
        // Kept: q, k and the probabilities.
        let forward = || {
            let probs = NdArray::fused_attention_probs(q.clone(), k.clone(), key_bias, heads);
            (probs.clone(), (q, k, probs, heads))
        };
        record::<C, _, 2>(
            nodes,
            forward,
            |(q, k, probs, heads), grad, [want_q, want_k]| {
                let (dq, dk) = attention::probs_backward(&q, &k, &probs, &grad, heads);
                [want_q.then_some(dq), want_k.then_some(dk)]
            },
        )
    }

    fn fused_attention_context(
        probs: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [probs.node(), v.node()];
        let (probs, v) = (probs.into_primitive(), v.into_primitive());
        // Kept: the probabilities and v.
        let forward = || {
            let out = NdArray::fused_attention_context(probs.clone(), v.clone());
            (out, (probs, v))
        };
        record::<C, _, 2>(nodes, forward, |(probs, v), grad, [want_p, want_v]| {
            let (dprobs, dv) = attention::context_backward(&probs, &v, &grad);
            [want_p.then_some(dprobs), want_v.then_some(dv)]
        })
    }
}
