//! Each fused operation against its composed twin (outputs and gradients), and the scalar
//! maths against reference definitions.

use burn::tensor::{Tensor, TensorData};

use super::maths::{exp, gelu_and_slope};
use super::*;

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
    let wc = Tensor::<3>::from_data(TensorData::new(values(b * s * h, 8.0), [b, s, h]), &device);
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
        let bias = Tensor::<1>::from_data(TensorData::new(values(d_out, 3.0), [d_out]), &device)
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
