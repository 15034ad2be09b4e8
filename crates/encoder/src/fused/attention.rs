//! Attention kernels on burn-ndarray: probabilities `softmax(q kᵀ / sqrt(dh) + key_bias)`,
//! context `P v`, both in one pass for inference, and their gradients. Each works one
//! sequence per rayon task on strided per-head views of `[batch, seq, hidden]` activations,
//! so heads are never split into or merged from copies.

use burn::backend::TensorMetadata;
use burn::backend::ndarray::NdArrayTensor;
use rayon::prelude::*;

use super::maths::{softmax_in_place, sum_of};
use super::parallel::{elements, host, simd, tensor, zeros};

/// `[batch, heads, seq, seq]` probabilities of `q`, `k` (`[batch, seq, hidden]`) with
/// `key_bias` (`[batch, seq]`) added to every query's scores.
pub(super) fn probs(
    q: &NdArrayTensor,
    k: &NdArrayTensor,
    key_bias: &NdArrayTensor,
    heads: usize,
) -> NdArrayTensor {
    let a = Attention::of(q, heads);
    let (q, k, bias) = (elements(q), elements(k), elements(key_bias));
    let probs = a.per_sequence(a.heads * a.seq * a.seq, |bi, p| {
        simd(|| a.probs_row(bi, &q, &k, &bias, p))
    });
    tensor(a.probs_shape(), probs)
}

/// `probs · v` per head, heads side by side in the `[batch, seq, hidden]` result.
pub(super) fn context(probs: &NdArrayTensor, v: &NdArrayTensor) -> NdArrayTensor {
    let (pshape, probs) = host(probs);
    let (shape, v) = host(v);
    let a = Attention::new(&shape, pshape[1]);
    let context = a.per_sequence(a.seq * a.hidden, |bi, c| a.context_row(bi, &probs, &v, c));
    tensor(shape, context)
}

/// [`context`] of [`probs`] without the probabilities of the whole batch: one sequence's at
/// a time, in a per-thread scratch buffer.
pub(super) fn one_pass(
    q: &NdArrayTensor,
    k: &NdArrayTensor,
    v: &NdArrayTensor,
    key_bias: &NdArrayTensor,
    heads: usize,
) -> NdArrayTensor {
    let a = Attention::of(q, heads);
    let (q, k, v, bias) = (elements(q), elements(k), elements(v), elements(key_bias));
    let mut context = zeros(v.len());
    context
        .par_chunks_mut(a.seq * a.hidden)
        .enumerate()
        .for_each_init(
            || vec![0.0; a.heads * a.seq * a.seq],
            |p, (bi, c)| {
                a.probs_row(bi, &q, &k, &bias, p);
                a.context_row(0, p, &v[bi * a.seq * a.hidden..], c);
            },
        );
    tensor(a.activations_shape(), context)
}

/// Gradients of [`probs`] with respect to `q` and `k`, given the probabilities and their
/// gradient `grad`.
pub(super) fn probs_backward(
    q: &NdArrayTensor,
    k: &NdArrayTensor,
    probs: &NdArrayTensor,
    grad: &NdArrayTensor,
    heads: usize,
) -> (NdArrayTensor, NdArrayTensor) {
    let a = Attention::of(q, heads);
    let (q, k, probs, g) = (elements(q), elements(k), elements(probs), elements(grad));
    let (mut dq, mut dk) = (zeros(q.len()), zeros(k.len()));
    let row = a.seq * a.hidden;
    dq.par_chunks_mut(row)
        .zip(dk.par_chunks_mut(row))
        .enumerate()
        .for_each_init(
            || vec![0.0; a.seq * a.seq],
            |ds, (bi, (dq, dk))| a.probs_backward_row(bi, &q, &k, &probs, &g, ds, dq, dk),
        );
    (
        tensor(a.activations_shape(), dq),
        tensor(a.activations_shape(), dk),
    )
}

/// Gradients of [`context`] with respect to the probabilities and `v`, given the context's
/// gradient `grad`.
pub(super) fn context_backward(
    probs: &NdArrayTensor,
    v: &NdArrayTensor,
    grad: &NdArrayTensor,
) -> (NdArrayTensor, NdArrayTensor) {
    let (pshape, probs) = host(probs);
    let (shape, v) = host(v);
    let a = Attention::new(&shape, pshape[1]);
    let g = elements(grad);
    let (mut dprobs, mut dv) = (zeros(probs.len()), zeros(v.len()));
    dprobs
        .par_chunks_mut(a.heads * a.seq * a.seq)
        .zip(dv.par_chunks_mut(a.seq * a.hidden))
        .enumerate()
        .for_each(|(bi, (dp, dv))| a.context_backward_row(bi, &probs, &v, &g, dp, dv));
    (tensor(pshape, dprobs), tensor(shape, dv))
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

    /// A buffer of `len` elements per sequence, sequence `bi`'s filled by `fill(bi, chunk)`,
    /// one sequence per rayon task.
    fn per_sequence(&self, len: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
        let mut out = zeros(self.batch * len);
        out.par_chunks_mut(len)
            .enumerate()
            .for_each(|(bi, chunk)| fill(bi, chunk));
        out
    }

    /// The shapes of attention over `x` (`[batch, seq, hidden]`) with `heads` heads.
    fn of(x: &NdArrayTensor, heads: usize) -> Self {
        Self::new(&x.shape(), heads)
    }

    /// `[batch, seq, hidden]`: q, k, v, the context and their gradients.
    fn activations_shape(&self) -> Vec<usize> {
        vec![self.batch, self.seq, self.hidden]
    }

    /// `[batch, heads, seq, seq]`: the probabilities and their gradient.
    fn probs_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.seq, self.seq]
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
