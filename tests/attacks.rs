//! Attack simulations end to end: `fedmicse simulate --byzantine K --attack NAME` with a
//! tiny random model, once with the default defences and once without any.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::fed::*;
use fedmicse_encoder::TensorMap;
use fedmicse_encoder::weights::read_safetensors_map;

fn simulate(config: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedmicse"))
        .args(["simulate", "--config"])
        .arg(config)
        .args(["--clients", "3", "--rounds", "2", "--output"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn weights(dir: &Path) -> TensorMap {
    read_safetensors_map(&dir.join("model.safetensors")).unwrap()
}

/// ‖a − b‖ over the tensors both have, and the largest |value| of `a` (infinite when `a`
/// holds a non-finite value).
fn distance_and_max(a: &TensorMap, b: &TensorMap) -> (f64, f64) {
    let (mut d2, mut max) = (0f64, 0f64);
    for (name, t) in a {
        for &x in &t.data {
            max = max.max(if x.is_finite() {
                x.abs() as f64
            } else {
                f64::INFINITY
            });
        }
        if let Some(u) = b.get(name) {
            for (&x, &y) in t.data.iter().zip(&u.data) {
                d2 += (x as f64 - y as f64).powi(2);
            }
        }
    }
    (d2.sqrt(), max)
}

#[test]
fn byzantine_scale_attack_is_contained_by_the_default_defences() {
    let dir = tempfile::tempdir().unwrap();
    let (model, config) = small_simulation(dir.path(), "");
    let start = weights(&model);
    let (_, start_max) = distance_and_max(&start, &start);

    // Default defences.
    let out = dir.path().join("defended");
    let o = simulate(&config, &out, &["--byzantine", "1", "--attack", "scale"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("hostile agents [\"agent-3\"] (attack scale)"),
        "{stderr}"
    );
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("rounds.json")).unwrap()).unwrap();
    assert_eq!(log["byzantine"], serde_json::json!(["agent-3"]));
    assert_eq!(log["attack"], "scale");
    assert_eq!(log["defences"], "default");
    assert_eq!(log["aggregation"], "fedavg");
    let rounds = log["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "round 0 and 2 committed rounds: {log}");
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i);
        assert!(r["stsb_dev"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
    let defended = weights(&out.join("global"));
    let (moved, max) = distance_and_max(&defended, &start);
    assert!(max.is_finite(), "non-finite values in the defended model");
    assert!(moved > 0.0, "the defended model did not change");
    assert!(
        max < start_max * 2.0 + 1.0,
        "defended model grew: {max} vs {start_max}"
    );

    // No defences: the hostile update is averaged in at full strength.
    let out = dir.path().join("open");
    let o = simulate(
        &config,
        &out,
        &[
            "--byzantine",
            "1",
            "--attack",
            "scale",
            "--defences",
            "none",
        ],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("rounds.json")).unwrap()).unwrap();
    assert_eq!(log["defences"], "none");
    assert_eq!(log["rounds"].as_array().unwrap().len(), 3, "{log}");
    let open = weights(&out.join("global"));
    let (blown, _) = distance_and_max(&open, &start);
    eprintln!("moved: defended {moved:.4}, undefended {blown:.4}");
    assert!(
        !blown.is_finite() || blown > 50.0 * moved,
        "without defences the attacker should dominate: moved {blown} vs {moved} defended"
    );
}

#[test]
fn byzantine_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sim.toml");
    std::fs::write(
        &config,
        "model = \"nowhere\"\ndata = \"nothing.txt\"\noutput = \"out\"\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let o = simulate(&config, &dir.path().join("out"), extra);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(&["--byzantine", "3", "--attack", "nan"]);
    assert!(
        e.contains("must be less than the number of clients (3)"),
        "{e}"
    );
    let e = run(&["--byzantine", "1"]);
    assert!(e.contains("needs --attack"), "{e}");
    let e = run(&["--byzantine", "1", "--attack", "flood"]);
    assert!(e.contains("unknown attack"), "{e}");
    let e = run(&["--defences", "some"]);
    assert!(e.contains("--defences"), "{e}");
    let e = run(&["--aggregation", "mean"]);
    assert!(e.contains("unknown aggregation"), "{e}");
}
