//! The coordinator's side of one round, as a chain of states. It routes
//! ciphertexts it cannot read, keeps only the running sum of masked inputs
//! (never an individual one), and at the end removes the masks from the sum.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{RoundConfig, share_x};
use crate::graph::Graph;
use crate::keys::{KeyPair, pairwise_seed};
use crate::messages::{
    AdvertiseKeys, EncryptedShare, MaskedInput, RevealedShare, ShareKeys, UnmaskRequest,
    UnmaskResponse,
};
use crate::ring::{self, MaskDomain};
use crate::shamir::{self, Share};
use crate::{AgentId, Error, Stage};

/// The output of a round: Σ x_u over the survivors U3, in Z_2^k.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregate {
    pub values: Vec<u32>,
    pub ring_bits: u32,
    pub survivors: Vec<AgentId>,
}

impl Aggregate {
    /// The sum read as two's-complement signed integers.
    pub fn signed(&self) -> Vec<i64> {
        let k = self.ring_bits;
        self.values
            .iter()
            .map(|&v| ring::decode_signed(v, k))
            .collect()
    }
}

fn abandon(stage: Stage, have: usize, need: usize) -> Result<(), Error> {
    if have < need {
        return Err(Error::Abandon { stage, have, need });
    }
    Ok(())
}

/// Round 0: collecting public keys.
pub struct ServerKeys {
    config: RoundConfig,
    keys: BTreeMap<AgentId, AdvertiseKeys>,
    seen_keys: BTreeSet<[u8; 32]>,
}

/// Round 1: collecting encrypted shares.
pub struct ServerShares {
    config: RoundConfig,
    keys: BTreeMap<AgentId, AdvertiseKeys>,
    graph: Graph,
    sent: BTreeMap<AgentId, Vec<EncryptedShare>>,
}

/// Round 2: summing masked inputs.
pub struct ServerMasked {
    config: RoundConfig,
    keys: BTreeMap<AgentId, AdvertiseKeys>,
    graph: Graph,
    u2: BTreeSet<AgentId>,
    u3: BTreeSet<AgentId>,
    sum: Vec<u32>,
}

/// Round 3: collecting revealed shares.
pub struct ServerUnmask {
    config: RoundConfig,
    keys: BTreeMap<AgentId, AdvertiseKeys>,
    graph: Graph,
    survivors: BTreeSet<AgentId>,
    dropped: BTreeSet<AgentId>,
    sum: Vec<u32>,
    responders: BTreeSet<AgentId>,
    b_shares: BTreeMap<AgentId, Vec<Share>>,
    s_shares: BTreeMap<AgentId, Vec<Share>>,
}

impl ServerKeys {
    pub fn new(config: RoundConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            config,
            keys: BTreeMap::new(),
            seen_keys: BTreeSet::new(),
        })
    }

    /// Records an agent's keys. Repeated agents or reused keys are refused.
    pub fn receive(&mut self, msg: AdvertiseKeys) -> Result<(), Error> {
        if self.keys.contains_key(&msg.agent) {
            return Err(Error::Duplicate(msg.agent));
        }
        if msg.c_pk == msg.s_pk
            || self.seen_keys.contains(&msg.c_pk)
            || self.seen_keys.contains(&msg.s_pk)
        {
            return Err(Error::DuplicateKey(msg.agent));
        }
        self.seen_keys.extend([msg.c_pk, msg.s_pk]);
        self.keys.insert(msg.agent, msg);
        Ok(())
    }

    /// Closes round 0: the directory (U1, sorted) to broadcast to its members.
    pub fn close(self) -> Result<(ServerShares, Vec<AdvertiseKeys>), Error> {
        let ids: Vec<AgentId> = self.keys.keys().copied().collect();
        let graph = self.config.graph(&ids)?;
        let directory = self.keys.values().cloned().collect();
        let next = ServerShares {
            config: self.config,
            keys: self.keys,
            graph,
            sent: BTreeMap::new(),
        };
        Ok((next, directory))
    }
}

impl ServerShares {
    /// Records an agent's shares: from a member of U1, once, exactly one
    /// ciphertext per neighbour.
    pub fn receive(&mut self, msg: ShareKeys) -> Result<(), Error> {
        let id = msg.agent;
        if !self.keys.contains_key(&id) {
            return Err(Error::UnknownAgent(id));
        }
        if self.sent.contains_key(&id) {
            return Err(Error::Duplicate(id));
        }
        let recipients: Vec<AgentId> = msg.shares.iter().map(|e| e.to).collect();
        let all_from_sender = msg.shares.iter().all(|e| e.from == id);
        let mut sorted = recipients.clone();
        sorted.sort_unstable();
        if !all_from_sender || sorted != self.graph.neighbours(id) {
            return Err(Error::BadShareSet(id));
        }
        self.sent.insert(id, msg.shares);
        Ok(())
    }

    /// Closes round 1 (the senders are U2): each member of U2's inbox, the
    /// ciphertexts addressed to it by other members of U2.
    pub fn close(self) -> Result<(ServerMasked, BTreeMap<AgentId, Vec<EncryptedShare>>), Error> {
        abandon(Stage::ShareKeys, self.sent.len(), self.config.threshold)?;
        let u2: BTreeSet<AgentId> = self.sent.keys().copied().collect();
        let mut inboxes: BTreeMap<AgentId, Vec<EncryptedShare>> =
            u2.iter().map(|&u| (u, Vec::new())).collect();
        for e in self.sent.into_values().flatten() {
            if let Some(inbox) = inboxes.get_mut(&e.to) {
                inbox.push(e);
            }
        }
        let next = ServerMasked {
            sum: vec![0; self.config.len],
            config: self.config,
            keys: self.keys,
            graph: self.graph,
            u2,
            u3: BTreeSet::new(),
        };
        Ok((next, inboxes))
    }
}

impl ServerMasked {
    /// Adds a member of U2's masked input to the running sum (once each).
    pub fn receive(&mut self, msg: MaskedInput) -> Result<(), Error> {
        if !self.u2.contains(&msg.agent) {
            return Err(Error::UnknownAgent(msg.agent));
        }
        let k = self.config.ring_bits;
        let y = ring::unpack(&msg.packed, k, self.config.len)?;
        if !self.u3.insert(msg.agent) {
            return Err(Error::Duplicate(msg.agent));
        }
        ring::add_assign(&mut self.sum, &y, k);
        Ok(())
    }

    /// Closes round 2 (the senders are U3): the request to send to every
    /// survivor. Abandons if some secret could no longer be rebuilt.
    pub fn close(self) -> Result<(ServerUnmask, UnmaskRequest), Error> {
        let t = self.config.threshold;
        abandon(Stage::MaskedInput, self.u3.len(), t)?;
        let dropped: BTreeSet<AgentId> = self.u2.difference(&self.u3).copied().collect();
        for owner in self.u3.iter().chain(&dropped) {
            let alive = self.live_holders(*owner);
            abandon(Stage::MaskedInput, alive, t)?;
        }
        let request = UnmaskRequest {
            survivors: self.u3.iter().copied().collect(),
            dropped: dropped.iter().copied().collect(),
        };
        let next = ServerUnmask {
            config: self.config,
            keys: self.keys,
            graph: self.graph,
            survivors: self.u3,
            dropped,
            sum: self.sum,
            responders: BTreeSet::new(),
            b_shares: BTreeMap::new(),
            s_shares: BTreeMap::new(),
        };
        Ok((next, request))
    }

    fn live_holders(&self, owner: AgentId) -> usize {
        let holders = self.graph.holders(owner);
        holders.iter().filter(|v| self.u3.contains(v)).count()
    }
}

impl ServerUnmask {
    /// Records a survivor's revealed shares: self-mask shares only of
    /// survivors, key shares only of dropped agents, only for owners the
    /// sender holds shares of, once per sender.
    pub fn receive(&mut self, msg: UnmaskResponse) -> Result<(), Error> {
        let id = msg.agent;
        if !self.survivors.contains(&id) {
            return Err(Error::UnknownAgent(id));
        }
        if self.responders.contains(&id) {
            return Err(Error::Duplicate(id));
        }
        let valid = |shares: &[RevealedShare], owners: &BTreeSet<AgentId>| {
            let mut seen = BTreeSet::new();
            shares.iter().all(|r| {
                owners.contains(&r.owner)
                    && seen.insert(r.owner)
                    && (r.owner == id || self.graph.are_neighbours(r.owner, id))
            })
        };
        if !valid(&msg.self_mask_shares, &self.survivors) || !valid(&msg.key_shares, &self.dropped)
        {
            return Err(Error::BadShareSet(id));
        }
        self.responders.insert(id);
        let x = share_x(id);
        for (list, store) in [
            (msg.self_mask_shares, &mut self.b_shares),
            (msg.key_shares, &mut self.s_shares),
        ] {
            for r in list {
                store.entry(r.owner).or_default().push(Share { x, y: r.y });
            }
        }
        Ok(())
    }

    /// Rebuilds the secrets, removes every mask, and returns the sum of the
    /// survivors' inputs — the only thing the coordinator ever learns.
    pub fn finish(mut self) -> Result<Aggregate, Error> {
        let (round, k) = (self.config.round, self.config.ring_bits);
        let mut sum = std::mem::take(&mut self.sum);
        for &u in &self.survivors {
            let b = self.rebuild(&self.b_shares, u)?;
            ring::sub_mask(&mut sum, &b, MaskDomain::SelfMask { round }, k);
        }
        for &v in &self.dropped {
            let s = KeyPair::from_secret_bytes(*self.rebuild(&self.s_shares, v)?);
            if s.public() != self.keys[&v].s_pk {
                return Err(Error::ReconstructedKeyMismatch(v));
            }
            for u in self.graph.neighbours(v) {
                if !self.survivors.contains(&u) {
                    continue;
                }
                let seed = pairwise_seed(&s, &self.keys[&u].s_pk, round, v, u)?;
                let domain = MaskDomain::Pairwise { round };
                // u added +mask for a larger peer and −mask for a smaller one.
                if v > u {
                    ring::sub_mask(&mut sum, &seed, domain, k);
                } else {
                    ring::add_mask(&mut sum, &seed, domain, k);
                }
            }
        }
        Ok(Aggregate {
            values: sum,
            ring_bits: k,
            survivors: self.survivors.into_iter().collect(),
        })
    }

    fn rebuild(
        &self,
        store: &BTreeMap<AgentId, Vec<Share>>,
        owner: AgentId,
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, Error> {
        let shares = store.get(&owner).map(Vec::as_slice).unwrap_or_default();
        let t = self.config.threshold;
        abandon(Stage::Unmask, shares.len(), t)?;
        shamir::combine(shares, t).map(zeroize::Zeroizing::new)
    }
}
