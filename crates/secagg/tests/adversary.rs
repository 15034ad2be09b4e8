//! What a curious or misbehaving coordinator (or agent) cannot get away with.

mod common;

use common::{at_mask, at_unmask, config, ids, rng};
use fedmicse_secagg::ring::{self, encode_signed};
use fedmicse_secagg::{Error, MaskedInput, Neighbourhood, ServerKeys, UnmaskRequest, agent};
use rand::Rng;

#[test]
fn request_for_both_secrets_of_one_agent_is_refused() {
    let ids = ids(5);
    let cfg = config(5, 8, 16, Neighbourhood::Full);
    let mut round = at_unmask(&cfg, &ids, &[], 1);
    let me = ids[0];
    // The coordinator claims ids[3] dropped while also counting it.
    let greedy = UnmaskRequest {
        survivors: ids.clone(),
        dropped: vec![ids[3]],
    };
    let state = round.agents.remove(&me).unwrap();
    assert!(matches!(state.unmask(&greedy), Err(Error::RefusedBothSecrets(v)) if v == ids[3]));
}

#[test]
fn request_with_too_few_survivors_is_refused() {
    let ids = ids(5); // t = 3
    let cfg = config(5, 8, 16, Neighbourhood::Full);
    let mut round = at_unmask(&cfg, &ids, &[], 2);
    let thin = UnmaskRequest {
        survivors: vec![ids[0], ids[1]],
        dropped: vec![ids[2], ids[3], ids[4]],
    };
    let state = round.agents.remove(&ids[0]).unwrap();
    assert!(matches!(
        state.unmask(&thin),
        Err(Error::TooFewSurvivors { have: 2, need: 3 })
    ));
}

#[test]
fn request_must_list_the_agent_and_only_agents_it_heard_from() {
    let ids = ids(5);
    let cfg = config(5, 8, 16, Neighbourhood::Full);
    let mut round = at_unmask(&cfg, &ids, &[], 3);
    let without_me = UnmaskRequest {
        survivors: ids[1..].to_vec(),
        dropped: vec![],
    };
    let a = round.agents.remove(&ids[0]).unwrap();
    assert!(matches!(a.unmask(&without_me), Err(Error::NotSurvivor)));
    // A neighbour that never sent shares to ids[1] cannot be called dropped.
    let mut at_mask_round = at_mask(&cfg, &ids, 5);
    let inbox: Vec<_> = at_mask_round.inboxes[&ids[1]]
        .iter()
        .filter(|e| e.from != ids[4])
        .cloned()
        .collect();
    let b = at_mask_round.agents.remove(&ids[1]).unwrap();
    let (b, _) = b.mask_input(&inbox, &[0; 16]).unwrap();
    let lying = UnmaskRequest {
        survivors: ids[..4].to_vec(),
        dropped: vec![ids[4]],
    };
    assert!(matches!(b.unmask(&lying), Err(Error::InconsistentRequest(v)) if v == ids[4]));
}

#[test]
fn tampered_share_ciphertext_does_not_decrypt() {
    let ids = ids(3);
    let cfg = config(3, 8, 16, Neighbourhood::Full);
    let mut round = at_mask(&cfg, &ids, 6);
    let me = ids[2];
    let mut inbox = round.inboxes[&me].clone();
    inbox[0].ciphertext[5] ^= 0x40;
    let from = inbox[0].from;
    let state = round.agents.remove(&me).unwrap();
    let err = state.mask_input(&inbox, &[0; 16]).err().unwrap();
    assert!(
        matches!(err, Error::Decrypt { from: f } if f == from),
        "{err}"
    );
}

#[test]
fn share_for_someone_else_does_not_decrypt() {
    let ids = ids(3);
    let cfg = config(3, 8, 16, Neighbourhood::Full);
    let mut round = at_mask(&cfg, &ids, 7);
    // ids[0]'s share for ids[1], handed to ids[2] with the address rewritten.
    let mut stolen = round.inboxes[&ids[1]]
        .iter()
        .find(|e| e.from == ids[0])
        .unwrap()
        .clone();
    let victim = ids[2];
    let mut inbox: Vec<_> = round.inboxes[&victim]
        .iter()
        .filter(|e| e.from != ids[0])
        .cloned()
        .collect();
    stolen.to = victim;
    inbox.push(stolen.clone());
    let state = round.agents.remove(&victim).unwrap();
    assert!(matches!(
        state.mask_input(&inbox, &[0; 16]),
        Err(Error::Decrypt { .. })
    ));
    // Left addressed to ids[1], it is refused before decryption.
    stolen.to = ids[1];
    let mut round = at_mask(&cfg, &ids, 7);
    let state = round.agents.remove(&victim).unwrap();
    assert!(matches!(
        state.mask_input(&[stolen], &[0; 16]),
        Err(Error::Misrouted { .. })
    ));
}

#[test]
fn masked_input_alone_is_uniform_and_uncorrelated() {
    const LEN: usize = 100_000;
    let ids = ids(3);
    let mut cfg = config(3, 16, LEN, Neighbourhood::Full);
    cfg.ring_bits = 16;
    let mut round = at_mask(&cfg, &ids, 8);
    let me = ids[1];
    // A strongly structured input: a ramp over the whole ring.
    let mut r = rng(80);
    let x: Vec<u32> = (0..LEN)
        .map(|i| ((i * 7) % 65536) as u32 ^ (r.random::<u32>() & 1))
        .collect();
    let state = round.agents.remove(&me).unwrap();
    let (_, msg) = state.mask_input(&round.inboxes[&me], &x).unwrap();
    let y = ring::unpack(&msg.packed, 16, LEN).unwrap();
    let r_xy = pearson(&x, &y);
    assert!(r_xy.abs() < 0.01, "Pearson r = {r_xy}");
    // 16 equal bins of Z_2^16, each within 4% of LEN/16 (σ ≈ 1%).
    let mut bins = [0usize; 16];
    for v in &y {
        bins[(v >> 12) as usize] += 1;
    }
    let expected = LEN as f64 / 16.0;
    for b in bins {
        assert!(
            (b as f64 - expected).abs() < 0.04 * expected,
            "bins {bins:?}"
        );
    }
}

fn pearson(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len() as f64;
    let mean = |v: &[u32]| v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (ma, mb) = (mean(a), mean(b));
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

#[test]
fn lying_key_share_is_detected() {
    let ids = ids(3);
    let cfg = config(3, 8, 16, Neighbourhood::Full);
    let mut round = at_unmask(&cfg, &ids, &[ids[2]], 9);
    for (id, state) in std::mem::take(&mut round.agents) {
        let mut msg = state.unmask(&round.request).unwrap();
        if id == ids[0] {
            msg.key_shares[0].y[1] ^= 1;
        }
        round.server.receive(msg).unwrap();
    }
    let err = round.server.finish().unwrap_err();
    assert!(
        matches!(
            err,
            Error::ReconstructedKeyMismatch(_) | Error::CorruptShares
        ),
        "{err}"
    );
}

#[test]
fn coordinator_refuses_malformed_messages() {
    let ids = ids(3);
    let cfg = config(3, 8, 16, Neighbourhood::Full);
    let mut round = at_mask(&cfg, &ids, 10);
    let short = MaskedInput {
        agent: ids[0],
        packed: vec![0; 3],
    };
    assert!(matches!(
        round.server.receive(short),
        Err(Error::BadLength { .. })
    ));
    let stranger = MaskedInput {
        agent: 999,
        packed: vec![0; 16],
    };
    assert!(matches!(
        round.server.receive(stranger),
        Err(Error::UnknownAgent(999))
    ));
    let ok = MaskedInput {
        agent: ids[0],
        packed: vec![0; ring::packed_len(16, cfg.ring_bits)],
    };
    round.server.receive(ok.clone()).unwrap();
    assert!(matches!(round.server.receive(ok), Err(Error::Duplicate(_))));
}

#[test]
fn coordinator_refuses_repeated_agents_keys_and_incomplete_share_sets() {
    let cfg = config(3, 8, 16, Neighbourhood::Full);
    let mut r = rng(11);
    let mut server = ServerKeys::new(cfg.clone()).unwrap();
    let mut states = Vec::new();
    for id in [1, 2, 3] {
        let (state, msg) = agent::advertise(cfg.clone(), id, &mut r).unwrap();
        server.receive(msg.clone()).unwrap();
        assert!(matches!(
            server.receive(msg.clone()),
            Err(Error::Duplicate(_))
        ));
        let copycat = fedmicse_secagg::AdvertiseKeys {
            agent: 10 + id,
            ..msg
        };
        assert!(matches!(
            server.receive(copycat),
            Err(Error::DuplicateKey(_))
        ));
        states.push(state);
    }
    let (mut server, directory) = server.close().unwrap();
    let (_, mut msg) = states.remove(0).share_keys(&directory, &mut r).unwrap();
    msg.shares.pop();
    assert!(matches!(server.receive(msg), Err(Error::BadShareSet(1))));
}

#[test]
fn agent_refuses_a_directory_without_its_keys() {
    let cfg = config(3, 8, 16, Neighbourhood::Full);
    let mut r = rng(12);
    let (state, mut mine) = agent::advertise(cfg.clone(), 1, &mut r).unwrap();
    let (_, b) = agent::advertise(cfg.clone(), 2, &mut r).unwrap();
    let (_, c) = agent::advertise(cfg.clone(), 3, &mut r).unwrap();
    mine.s_pk = c.c_pk; // the coordinator substitutes a key of its choosing
    mine.s_pk[0] ^= 1;
    let err = state.share_keys(&[mine, b, c], &mut r).err().unwrap();
    assert!(matches!(err, Error::DirectoryMismatch), "{err}");
}

#[test]
fn threshold_must_be_a_majority_of_holders() {
    let mut cfg = config(6, 8, 16, Neighbourhood::Full);
    cfg.threshold = 3; // 2·3 ≤ 6: two disjoint groups of 3 could be played off
    let mut r = rng(13);
    let mut server = ServerKeys::new(cfg.clone()).unwrap();
    for id in 0..6 {
        server
            .receive(agent::advertise(cfg.clone(), id, &mut r).unwrap().1)
            .unwrap();
    }
    assert!(matches!(
        server.close().err(),
        Some(Error::ThresholdTooLow { t: 3, holders: 6 })
    ));
    cfg.threshold = 1;
    assert!(matches!(
        ServerKeys::new(cfg).err(),
        Some(Error::ThresholdBelowTwo(1))
    ));
}

#[test]
fn inputs_outside_the_ring_are_refused() {
    let ids = ids(3);
    let cfg = config(3, 8, 16, Neighbourhood::Full);
    let mut round = at_mask(&cfg, &ids, 14);
    let state = round.agents.remove(&ids[0]).unwrap();
    let mut x = vec![encode_signed(-1, cfg.ring_bits); 16];
    x[3] = 1 << cfg.ring_bits;
    assert!(matches!(
        state.mask_input(&round.inboxes[&ids[0]], &x),
        Err(Error::InputOutOfRange)
    ));
}
