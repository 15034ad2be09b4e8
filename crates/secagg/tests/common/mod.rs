//! An in-memory round: every agent and the coordinator, with chosen dropouts.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use fedmicse_secagg::ring::{encode_signed, ring_mask};
use fedmicse_secagg::{
    AgentId, Aggregate, Error, Neighbourhood, RoundConfig, ServerKeys, WireBytes, agent,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Non-contiguous ids, so nothing relies on ids being 0..n.
pub fn ids(n: usize) -> Vec<AgentId> {
    (0..n as AgentId).map(|i| 3 * i + 7).collect()
}

pub fn config(n: usize, value_bits: u32, len: usize, rule: Neighbourhood) -> RoundConfig {
    let holders = match &rule {
        Neighbourhood::Sparse { half_degree, .. } if 2 * half_degree + 1 < n => 2 * half_degree + 1,
        _ => n,
    };
    RoundConfig {
        round: 42,
        ring_bits: fedmicse_secagg::ring_bits(value_bits, n).unwrap(),
        len,
        threshold: holders / 2 + 1,
        neighbourhood: rule,
    }
}

/// Random signed `value_bits`-bit inputs per agent.
pub fn inputs(
    ids: &[AgentId],
    value_bits: u32,
    len: usize,
    seed: u64,
) -> BTreeMap<AgentId, Vec<i64>> {
    let mut r = rng(seed);
    let half = 1i64 << (value_bits - 1);
    ids.iter()
        .map(|&id| (id, (0..len).map(|_| r.random_range(-half..half)).collect()))
        .collect()
}

pub fn plain_sum(
    inputs: &BTreeMap<AgentId, Vec<i64>>,
    who: &BTreeSet<AgentId>,
    len: usize,
) -> Vec<i64> {
    let mut sum = vec![0i64; len];
    for id in who {
        for (s, v) in sum.iter_mut().zip(&inputs[id]) {
            *s += v;
        }
    }
    sum
}

/// Who goes silent before which step.
#[derive(Default)]
pub struct Dropouts {
    pub before_share: BTreeSet<AgentId>,
    pub before_mask: BTreeSet<AgentId>,
    pub before_unmask: BTreeSet<AgentId>,
}

/// Bytes each agent sent, by agent.
pub type Traffic = BTreeMap<AgentId, usize>;

pub fn run(
    config: &RoundConfig,
    inputs: &BTreeMap<AgentId, Vec<i64>>,
    drops: &Dropouts,
    seed: u64,
) -> Result<(Aggregate, Traffic), Error> {
    let mut r = rng(seed);
    let k = config.ring_bits;
    let mut traffic = Traffic::new();
    let mut server = ServerKeys::new(config.clone())?;
    let mut advertised = BTreeMap::new();
    for &id in inputs.keys() {
        let (state, msg) = agent::advertise(config.clone(), id, &mut r)?;
        *traffic.entry(id).or_default() += msg.wire_bytes();
        server.receive(msg)?;
        advertised.insert(id, state);
    }
    let (mut server, directory) = server.close()?;
    let mut shared = BTreeMap::new();
    for (id, state) in advertised {
        if drops.before_share.contains(&id) {
            continue;
        }
        let (state, msg) = state.share_keys(&directory, &mut r)?;
        *traffic.entry(id).or_default() += msg.wire_bytes();
        server.receive(msg)?;
        shared.insert(id, state);
    }
    let (mut server, inboxes) = server.close()?;
    let mut masked = BTreeMap::new();
    for (id, state) in shared {
        if drops.before_mask.contains(&id) {
            continue;
        }
        let x: Vec<u32> = inputs[&id].iter().map(|&v| encode_signed(v, k)).collect();
        let (state, msg) = state.mask_input(&inboxes[&id], &x)?;
        *traffic.entry(id).or_default() += msg.wire_bytes();
        server.receive(msg)?;
        masked.insert(id, state);
    }
    let (mut server, request) = server.close()?;
    for (id, state) in masked {
        if drops.before_unmask.contains(&id) {
            continue;
        }
        let msg = state.unmask(&request)?;
        *traffic.entry(id).or_default() += msg.wire_bytes();
        server.receive(msg)?;
    }
    Ok((server.finish()?, traffic))
}

/// Fills a 32-byte seed.
pub fn seed32(seed: u64) -> [u8; 32] {
    let mut s = [0u8; 32];
    rng(seed).fill_bytes(&mut s);
    s
}

pub fn in_ring(v: u32, k: u32) -> bool {
    v <= ring_mask(k)
}

/// A round run up to the masked-input step: the coordinator waiting for
/// masked inputs, each agent of U2 with its inbox.
pub struct AtMask {
    pub server: fedmicse_secagg::ServerMasked,
    pub agents: BTreeMap<AgentId, fedmicse_secagg::AgentShared>,
    pub inboxes: BTreeMap<AgentId, Vec<fedmicse_secagg::EncryptedShare>>,
}

pub fn at_mask(config: &RoundConfig, ids: &[AgentId], seed: u64) -> AtMask {
    let mut r = rng(seed);
    let mut server = ServerKeys::new(config.clone()).unwrap();
    let mut advertised = Vec::new();
    for &id in ids {
        let (state, msg) = agent::advertise(config.clone(), id, &mut r).unwrap();
        server.receive(msg).unwrap();
        advertised.push((id, state));
    }
    let (mut server, directory) = server.close().unwrap();
    let mut agents = BTreeMap::new();
    for (id, state) in advertised {
        let (state, msg) = state.share_keys(&directory, &mut r).unwrap();
        server.receive(msg).unwrap();
        agents.insert(id, state);
    }
    let (server, inboxes) = server.close().unwrap();
    AtMask {
        server,
        agents,
        inboxes,
    }
}

/// A round run up to unmasking with zero inputs and no dropouts.
pub struct AtUnmask {
    pub server: fedmicse_secagg::ServerUnmask,
    pub agents: BTreeMap<AgentId, fedmicse_secagg::AgentMasked>,
    pub request: fedmicse_secagg::UnmaskRequest,
}

pub fn at_unmask(
    config: &RoundConfig,
    ids: &[AgentId],
    skip_mask: &[AgentId],
    seed: u64,
) -> AtUnmask {
    let AtMask {
        mut server,
        agents,
        inboxes,
    } = at_mask(config, ids, seed);
    let mut masked = BTreeMap::new();
    for (id, state) in agents {
        if skip_mask.contains(&id) {
            continue;
        }
        let zeros = vec![0u32; config.len];
        let (state, msg) = state.mask_input(&inboxes[&id], &zeros).unwrap();
        server.receive(msg).unwrap();
        masked.insert(id, state);
    }
    let (server, request) = server.close().unwrap();
    AtUnmask {
        server,
        agents: masked,
        request,
    }
}
