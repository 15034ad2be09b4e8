//! Message sizes: the formulas match what the protocol really sends, and a
//! small table of bytes per agent (run with `--nocapture` to see it).

mod common;

use common::{Dropouts, config, ids, inputs, run};
use fedmicse_secagg::{
    AdvertiseKeys, MaskedInput, Neighbourhood, UnmaskRequest, agent_upload_bytes, ring,
};

#[test]
fn upload_formula_matches_the_protocol() {
    for (n, rule) in [
        (10, Neighbourhood::Full),
        (40, Neighbourhood::logarithmic(40, 1.0, common::seed32(1))),
    ] {
        let ids = ids(n);
        let cfg = config(n, 12, 1000, rule.clone());
        let x = inputs(&ids, 12, 1000, 2);
        let (_, traffic) = run(&cfg, &x, &Dropouts::default(), 3).unwrap();
        let degree = match rule {
            Neighbourhood::Full => n - 1,
            Neighbourhood::Sparse { half_degree, .. } => 2 * half_degree,
        };
        let expected = agent_upload_bytes(degree, 1000, cfg.ring_bits);
        assert!(
            traffic.values().all(|&b| b == expected),
            "n={n}: {traffic:?} vs {expected}"
        );
    }
}

#[test]
fn bytes_per_agent_table() {
    println!(
        "{:>6} {:>4} {:>8} {:>6} {:>12} {:>12} {:>8}",
        "n", "k", "len", "deg", "upload B", "plain f32 B", "ratio"
    );
    for n in [10usize, 100, 1000] {
        for (value_bits, len) in [(8u32, 1_000_000usize), (16, 1_000_000)] {
            let k = ring::ring_bits(value_bits, n).unwrap();
            for degree in [n - 1, 2 * (n as f64).log2().ceil() as usize] {
                let up = agent_upload_bytes(degree.min(n - 1), len, k);
                let plain = 4 * len;
                println!(
                    "{n:>6} {k:>4} {len:>8} {degree:>6} {up:>12} {plain:>12} {:>8.3}",
                    up as f64 / plain as f64
                );
            }
        }
    }
    // The masked vector dominates and costs k bits per value.
    assert_eq!(agent_upload_bytes(0, 8, 10), 68 + 4 + (4 + 10) + (4 + 44));
}

#[test]
fn messages_survive_serde() {
    let msgs = (
        AdvertiseKeys {
            agent: 1,
            c_pk: [2; 32],
            s_pk: [3; 32],
        },
        MaskedInput {
            agent: 4,
            packed: ring::pack(&[1, 2, 3], 10),
        },
        UnmaskRequest {
            survivors: vec![1, 2],
            dropped: vec![3],
        },
    );
    let json = serde_json::to_string(&msgs).unwrap();
    let back: (AdvertiseKeys, MaskedInput, UnmaskRequest) = serde_json::from_str(&json).unwrap();
    assert_eq!(back, msgs);
}
