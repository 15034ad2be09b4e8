//! The whole protocol in memory: exact sums with and without dropouts, and
//! abandoned rounds.

mod common;

use std::collections::BTreeSet;

use common::{Dropouts, config, ids, inputs, plain_sum, run};
use fedmicse_secagg::{Error, Neighbourhood, Stage};

const BITS: u32 = 16;
const LEN: usize = 257;

fn survivors_without(all: &[u32], gone: &[u32]) -> BTreeSet<u32> {
    all.iter().copied().filter(|v| !gone.contains(v)).collect()
}

#[test]
fn exact_sum_without_dropouts() {
    for n in [3, 5, 10] {
        let ids = ids(n);
        let cfg = config(n, BITS, LEN, Neighbourhood::Full);
        let x = inputs(&ids, BITS, LEN, n as u64);
        let (sum, _) = run(&cfg, &x, &Dropouts::default(), 1).unwrap();
        let all = survivors_without(&ids, &[]);
        assert_eq!(sum.signed(), plain_sum(&x, &all, LEN), "n={n}");
        assert_eq!(sum.survivors, ids);
    }
}

#[test]
fn extreme_values_do_not_wrap() {
    let n = 5;
    let ids = ids(n);
    let cfg = config(n, BITS, 4, Neighbourhood::Full);
    let min = -(1i64 << (BITS - 1));
    let max = (1i64 << (BITS - 1)) - 1;
    let x = ids.iter().map(|&id| (id, vec![min, max, 0, -1])).collect();
    let (sum, _) = run(&cfg, &x, &Dropouts::default(), 2).unwrap();
    assert_eq!(sum.signed(), vec![5 * min, 5 * max, 0, -5]);
}

#[test]
fn dropout_after_sharing_keys_is_left_out() {
    // The agent set up pairwise masks with everyone, then never sent its
    // masked input: the others' masks with it are rebuilt and removed.
    for n in [3, 5, 10] {
        let ids = ids(n);
        let cfg = config(n, BITS, LEN, Neighbourhood::Full);
        let x = inputs(&ids, BITS, LEN, 10 + n as u64);
        let gone = ids[1];
        let drops = Dropouts {
            before_mask: [gone].into(),
            ..Default::default()
        };
        let (sum, _) = run(&cfg, &x, &drops, 3).unwrap();
        let rest = survivors_without(&ids, &[gone]);
        assert_eq!(sum.signed(), plain_sum(&x, &rest, LEN), "n={n}");
        assert!(!sum.survivors.contains(&gone));
    }
}

#[test]
fn dropout_after_masked_input_is_still_counted() {
    // Its masked input arrived; its self-mask is rebuilt from others' shares.
    let n = 5;
    let ids = ids(n);
    let cfg = config(n, BITS, LEN, Neighbourhood::Full);
    let x = inputs(&ids, BITS, LEN, 20);
    let drops = Dropouts {
        before_unmask: [ids[4]].into(),
        ..Default::default()
    };
    let (sum, _) = run(&cfg, &x, &drops, 4).unwrap();
    assert_eq!(
        sum.signed(),
        plain_sum(&x, &survivors_without(&ids, &[]), LEN)
    );
}

#[test]
fn dropouts_before_sharing_keys_are_left_out() {
    let n = 10;
    let ids = ids(n);
    let cfg = config(n, BITS, LEN, Neighbourhood::Full);
    let x = inputs(&ids, BITS, LEN, 30);
    let gone = [ids[0], ids[7]];
    let drops = Dropouts {
        before_share: gone.into(),
        ..Default::default()
    };
    let (sum, _) = run(&cfg, &x, &drops, 5).unwrap();
    assert_eq!(
        sum.signed(),
        plain_sum(&x, &survivors_without(&ids, &gone), LEN)
    );
}

#[test]
fn dropouts_at_every_step_together() {
    let n = 10; // t = 6
    let ids = ids(n);
    let cfg = config(n, BITS, LEN, Neighbourhood::Full);
    let x = inputs(&ids, BITS, LEN, 40);
    let drops = Dropouts {
        before_share: [ids[2]].into(),
        before_mask: [ids[3], ids[9]].into(),
        before_unmask: [ids[5]].into(),
    };
    let (sum, _) = run(&cfg, &x, &drops, 6).unwrap();
    let counted = survivors_without(&ids, &[ids[2], ids[3], ids[9]]);
    assert_eq!(sum.signed(), plain_sum(&x, &counted, LEN));
}

#[test]
fn more_than_n_minus_t_dropped_abandons() {
    let n = 5; // t = 3, so 3 dropouts leave 2
    let ids = ids(n);
    let cfg = config(n, BITS, LEN, Neighbourhood::Full);
    let x = inputs(&ids, BITS, LEN, 50);
    let gone: BTreeSet<u32> = ids[..3].iter().copied().collect();
    let at_mask = Dropouts {
        before_mask: gone.clone(),
        ..Default::default()
    };
    let err = run(&cfg, &x, &at_mask, 7).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Abandon {
                stage: Stage::MaskedInput,
                have: 2,
                need: 3
            }
        ),
        "{err}"
    );
    let at_share = Dropouts {
        before_share: gone.clone(),
        ..Default::default()
    };
    let err = run(&cfg, &x, &at_share, 7).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Abandon {
                stage: Stage::ShareKeys,
                ..
            }
        ),
        "{err}"
    );
    let at_unmask = Dropouts {
        before_unmask: gone,
        ..Default::default()
    };
    let err = run(&cfg, &x, &at_unmask, 7).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Abandon {
                stage: Stage::Unmask,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn secagg_plus_fifty_agents_two_dropouts() {
    let n = 50;
    let ids = ids(n);
    let rule = Neighbourhood::logarithmic(n, 1.0, common::seed32(9));
    let cfg = config(n, BITS, LEN, rule);
    assert_eq!(
        cfg.threshold, 7,
        "holder sets of 13: degree 12 = 2·⌈log2 50⌉"
    );
    let x = inputs(&ids, BITS, LEN, 60);
    let gone = [ids[11], ids[30]];
    let drops = Dropouts {
        before_mask: [gone[0]].into(),
        before_share: [gone[1]].into(),
        ..Default::default()
    };
    let (sum, traffic) = run(&cfg, &x, &drops, 8).unwrap();
    assert_eq!(
        sum.signed(),
        plain_sum(&x, &survivors_without(&ids, &gone), LEN)
    );
    // Each agent sends shares to 12 neighbours, not 49.
    let masked = 4 + fedmicse_secagg::ring::packed_len(LEN, cfg.ring_bits);
    let max_unmask = 4 + 44 * 13;
    assert!(
        traffic
            .values()
            .all(|&b| b <= 68 + 4 + 104 * 12 + masked + max_unmask)
    );
}
