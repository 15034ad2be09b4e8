//! The miCSE objective against the reference (tests/fixtures/micse_loss.json: the authors'
//! `cl_forward` in float64 autograd): InfoNCE, AMI, total loss and gradients.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use common::*;
use fedmicse_training::objective::{
    AmiStatus, ObjectiveConfig, SamplePlan, ValidMask, attention_rows, micse_loss, plan_samples,
};
use rand::SeedableRng;

fn tensor<const D: usize>(v: &serde_json::Value, device: &Device) -> Tensor<D> {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    Tensor::from_data(TensorData::new(f32s(&v["data"]), shape), device)
}

fn split_layers(att: &Tensor<5>) -> Vec<Tensor<4>> {
    let [b, l, h, t, _] = att.dims();
    (0..l)
        .map(|i| att.clone().narrow(1, i, 1).reshape([b, h, t, t]))
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn assert_grad(got: Option<Tensor<2>>, want: &serde_json::Value, what: &str) {
    let got: Vec<f32> = got.expect(what).into_data().try_into_vec().unwrap();
    let want: Vec<f32> = f64s(&want["data"]).iter().map(|&x| x as f32).collect();
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{what}: max abs diff {diff}");
}

#[test]
fn loss_and_gradients_match_reference() {
    let device = fedmicse_encoder::device::cpu().autodiff();
    let fx = fixture("micse_loss.json");
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let c = &case["config"];
        let inputs = &case["inputs"];
        let inter = &case["intermediate"];
        let expected = &case["expected"];
        let config = ObjectiveConfig {
            temperature: c["temp"].as_f64().unwrap(),
            alpha: c["task_alpha"].as_f64().unwrap(),
            lambda: c["task_lambda"].as_f64().unwrap(),
            target_samples: c["target_samples"].as_u64().unwrap() as usize,
        };
        let z1: Tensor<2> = tensor(&inputs["z1"], &device).require_grad();
        let z2: Tensor<2> = tensor(&inputs["z2"], &device).require_grad();
        let att1: Tensor<5> = tensor(&inputs["att1"], &device).require_grad();
        let att2: Tensor<5> = tensor(&inputs["att2"], &device);
        let (l1, l2) = (split_layers(&att1), split_layers(&att2));

        // Our validity mask, row choice and scale agree with the reference's intermediates.
        let x = attention_rows(&l1);
        let y = attention_rows(&l2);
        assert_eq!(
            x.dims(),
            [
                inter["n_rows"].as_u64().unwrap() as usize,
                inter["n_cols"].as_u64().unwrap() as usize
            ],
            "{name}"
        );
        let mask = ValidMask::new(&x, &y);
        let counts: Vec<i64> = (0..mask.n_rows).map(|r| mask.count(r) as i64).collect();
        assert_eq!(
            counts,
            ints(&inter["valid_count_per_row"]),
            "{name}: valid counts"
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let ours = plan_samples(&mask, config.target_samples, &mut rng);

        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let parts = if inter["status"] == "zero_samples" {
            assert!(ours.is_none(), "{name}: no samples");
            micse_loss(z1.clone(), z2.clone(), &l1, &l2, &config, None, &mut rng)
        } else {
            let ours = ours.expect("a plan");
            let rows: Vec<usize> = ints(&inter["rows_used"])
                .iter()
                .map(|&r| r as usize)
                .collect();
            assert_eq!(ours.rows, rows, "{name}: rows used");
            assert_eq!(
                ours.samples as u64,
                inter["samples"].as_u64().unwrap(),
                "{name}: samples"
            );
            assert_eq!(
                ours.fallback,
                inter["fallback"].as_bool().unwrap(),
                "{name}: fallback"
            );
            assert!(
                rel(ours.scale, inter["scale"].as_f64().unwrap()) < 1e-12,
                "{name}: scale"
            );
            // The reference's sampled columns, so no RNG is involved in the comparison.
            let columns: Vec<usize> = ints(&inputs["sample_idx"]["data"])
                .into_iter()
                .map(|c| c as usize)
                .collect();
            let plan = SamplePlan { columns, ..ours };
            micse_loss(
                z1.clone(),
                z2.clone(),
                &l1,
                &l2,
                &config,
                Some(&plan),
                &mut rng,
            )
        };

        let scalar = |t: &Tensor<1>| t.clone().into_scalar::<f32>() as f64;
        let info = scalar(&parts.info_nce);
        let loss = scalar(&parts.loss);
        let ami = parts.ami.as_ref().map(scalar).unwrap_or(0.0);
        let tol = 1e-5;
        assert!(
            rel(info, expected["infonce"].as_f64().unwrap()) < tol,
            "{name}: infonce {info}"
        );
        assert!(
            rel(loss, expected["loss"].as_f64().unwrap()) < tol,
            "{name}: loss {loss}"
        );
        let want_ami = expected["ami"].as_f64().unwrap();
        if want_ami == 0.0 {
            assert_eq!(ami, 0.0, "{name}");
            assert_eq!(parts.status, AmiStatus::ZeroSamples);
        } else {
            assert!(rel(ami, want_ami) < tol, "{name}: ami {ami} vs {want_ami}");
        }

        let grads = parts.loss.backward();
        assert_grad(
            z1.grad(&grads),
            &expected["grad_z1"],
            &format!("{name}: grad z1"),
        );
        assert_grad(
            z2.grad(&grads),
            &expected["grad_z2"],
            &format!("{name}: grad z2"),
        );
        let want_att = &expected["grad_att1"];
        match att1.grad(&grads) {
            Some(g) => {
                let [b, l, h, t, _] = g.dims();
                assert_grad(
                    Some(g.reshape([b * l * h, t * t])),
                    want_att,
                    &format!("{name}: grad att1"),
                );
            }
            None => {
                assert!(
                    !expected["ami_has_gradient"].as_bool().unwrap(),
                    "{name}: att1 has a gradient"
                );
                assert!(f64s(&want_att["data"]).iter().all(|&g| g == 0.0));
            }
        }
    }
}

#[test]
fn sampled_positions_are_valid_distinct_and_counted() {
    // Random attention-like rows with dropout holes and padding, many seeds.
    let device = fedmicse_encoder::device::cpu();
    for seed in 0..20u64 {
        use rand::Rng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (rows, cols) = (24, 64);
        let make = |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f32> {
            (0..rows * cols)
                .map(|i| {
                    let pad = (i % cols) >= cols - (i / cols) * 2; // later rows have more padding
                    if pad || rng.random_bool(0.15) {
                        0.0
                    } else {
                        rng.random_range(0.001..1.0)
                    }
                })
                .collect()
        };
        let x = Tensor::<2>::from_data(TensorData::new(make(&mut rng), [rows, cols]), &device);
        let y = Tensor::<2>::from_data(TensorData::new(make(&mut rng), [rows, cols]), &device);
        let mask = ValidMask::new(&x, &y);
        for target in [5, 20, 40, 1000] {
            let Some(plan) = plan_samples(&mask, target, &mut rng) else {
                assert!((0..rows).any(|r| mask.count(r) == 0));
                continue;
            };
            let min = (0..rows).map(|r| mask.count(r)).min().unwrap();
            if plan.fallback {
                assert_eq!(plan.rows.len(), rows);
                assert_eq!(plan.samples, min.min(target));
                assert!((0..rows).all(|r| mask.count(r) < target));
            } else {
                assert_eq!(plan.samples, target);
                for r in 0..rows {
                    assert_eq!(plan.rows.contains(&r), mask.count(r) >= target);
                }
            }
            for (i, &r) in plan.rows.iter().enumerate() {
                let cols_i = &plan.columns[i * plan.samples..(i + 1) * plan.samples];
                let mut sorted = cols_i.to_vec();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), plan.samples, "distinct within row {r}");
                assert!(
                    cols_i.iter().all(|&c| mask.row(r)[c]),
                    "valid in both views"
                );
            }
        }
    }
}
