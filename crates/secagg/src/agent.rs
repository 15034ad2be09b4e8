//! The agent's side of one round, as a chain of states. Each step consumes
//! the previous state, so no step can be repeated — in particular an agent
//! answers at most one unmask request per round.

use std::collections::{BTreeMap, BTreeSet};

use rand::CryptoRng;
use zeroize::Zeroizing;

use crate::config::{RoundConfig, share_x};
use crate::graph::Graph;
use crate::keys::{KeyPair, open_share, pairwise_seed, seal_share};
use crate::messages::{
    AdvertiseKeys, EncryptedShare, MaskedInput, RevealedShare, ShareKeys, UnmaskRequest,
    UnmaskResponse,
};
use crate::ring::{self, MaskDomain};
use crate::shamir::{self, CHUNKS};
use crate::{AgentId, Error, Stage};

type Y = [u64; CHUNKS];

/// What an agent holds of one owner's secrets: y-values of the self-mask seed
/// share and of the s-key share.
#[derive(Clone)]
struct Held {
    b: Y,
    s: Y,
}

const PLAINTEXT_BYTES: usize = 16 * CHUNKS;

/// Round 0 done: keys made and advertised.
pub struct AgentAdvertised {
    config: RoundConfig,
    id: AgentId,
    c: KeyPair,
    s: KeyPair,
}

/// Round 1 done: shares sent; waiting for the shares addressed to it.
pub struct AgentShared {
    config: RoundConfig,
    id: AgentId,
    c: KeyPair,
    s: KeyPair,
    b: Zeroizing<[u8; 32]>,
    graph: Graph,
    directory: BTreeMap<AgentId, AdvertiseKeys>,
    own: Held,
}

/// Round 2 done: masked input sent; only the held shares remain.
pub struct AgentMasked {
    config: RoundConfig,
    id: AgentId,
    neighbours: Vec<AgentId>,
    held: BTreeMap<AgentId, Held>,
}

/// Round 0: makes this round's key pairs; send the message to the coordinator.
pub fn advertise(
    config: RoundConfig,
    id: AgentId,
    rng: &mut impl CryptoRng,
) -> Result<(AgentAdvertised, AdvertiseKeys), Error> {
    config.validate()?;
    let (c, s) = (KeyPair::generate(rng), KeyPair::generate(rng));
    let msg = AdvertiseKeys {
        agent: id,
        c_pk: c.public(),
        s_pk: s.public(),
    };
    Ok((AgentAdvertised { config, id, c, s }, msg))
}

/// Checks the broadcast key directory (U1): no duplicate agents or keys,
/// and this agent's own keys present unchanged.
fn check_directory(
    directory: &[AdvertiseKeys],
    mine: &AdvertiseKeys,
) -> Result<BTreeMap<AgentId, AdvertiseKeys>, Error> {
    let mut by_id = BTreeMap::new();
    let mut keys = BTreeSet::new();
    for entry in directory {
        if !keys.insert(entry.c_pk) || !keys.insert(entry.s_pk) {
            return Err(Error::DuplicateKey(entry.agent));
        }
        if by_id.insert(entry.agent, entry.clone()).is_some() {
            return Err(Error::Duplicate(entry.agent));
        }
    }
    if by_id.get(&mine.agent) != Some(mine) {
        return Err(Error::DirectoryMismatch);
    }
    Ok(by_id)
}

impl AgentAdvertised {
    /// Round 1: given the directory U1, Shamir-shares a fresh self-mask seed
    /// and the s secret key among its holders and encrypts each pair to its
    /// recipient. Send the message to the coordinator.
    pub fn share_keys(
        self,
        directory: &[AdvertiseKeys],
        rng: &mut impl CryptoRng,
    ) -> Result<(AgentShared, ShareKeys), Error> {
        let mine = AdvertiseKeys {
            agent: self.id,
            c_pk: self.c.public(),
            s_pk: self.s.public(),
        };
        let directory = check_directory(directory, &mine)?;
        let ids: Vec<AgentId> = directory.keys().copied().collect();
        let graph = self.config.graph(&ids)?;
        let holders = graph.holders(self.id);
        let xs: Vec<u64> = holders.iter().map(|&v| share_x(v)).collect();
        let mut b = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(b.as_mut());
        let t = self.config.threshold;
        let b_shares = shamir::split(&b, t, &xs, rng)?;
        let s_shares = shamir::split(&self.s.secret_bytes(), t, &xs, rng)?;
        let mut own = None;
        let mut shares = Vec::with_capacity(holders.len());
        for ((&v, bs), ss) in holders.iter().zip(b_shares).zip(s_shares) {
            let held = Held { b: bs.y, s: ss.y };
            if v == self.id {
                own = Some(held);
                continue;
            }
            let ciphertext = self.seal(&held, &directory[&v])?;
            shares.push(EncryptedShare {
                from: self.id,
                to: v,
                ciphertext,
            });
        }
        let own = own.ok_or(Error::DirectoryMismatch)?;
        let msg = ShareKeys {
            agent: self.id,
            shares,
        };
        let state = AgentShared {
            config: self.config,
            id: self.id,
            c: self.c,
            s: self.s,
            b,
            graph,
            directory,
            own,
        };
        Ok((state, msg))
    }

    fn seal(&self, held: &Held, to: &AdvertiseKeys) -> Result<Vec<u8>, Error> {
        let mut plaintext = Zeroizing::new([0u8; PLAINTEXT_BYTES]);
        plaintext[..8 * CHUNKS].copy_from_slice(&shamir::y_to_bytes(&held.b));
        plaintext[8 * CHUNKS..].copy_from_slice(&shamir::y_to_bytes(&held.s));
        let round = self.config.round;
        seal_share(
            &self.c,
            &to.c_pk,
            round,
            self.id,
            to.agent,
            plaintext.as_ref(),
        )
    }
}

impl AgentShared {
    /// Round 2: opens the shares addressed to it (their senders are its view
    /// of U2), then masks `input` (values in Z_2^k, length `config.len`) with
    /// its self-mask and the pairwise masks of those senders. Send the message
    /// to the coordinator. The seeds and keys are dropped here.
    pub fn mask_input(
        self,
        inbox: &[EncryptedShare],
        input: &[u32],
    ) -> Result<(AgentMasked, MaskedInput), Error> {
        let k = self.config.ring_bits;
        if input.len() != self.config.len || input.iter().any(|&v| v > ring::ring_mask(k)) {
            return Err(Error::InputOutOfRange);
        }
        let held = self.open_inbox(inbox)?;
        if held.len() < self.config.threshold {
            return Err(Error::Abandon {
                stage: Stage::ShareKeys,
                have: held.len(),
                need: self.config.threshold,
            });
        }
        let mut y = input.to_vec();
        self.add_masks(&mut y, held.keys().copied())?;
        let msg = MaskedInput {
            agent: self.id,
            packed: ring::pack(&y, k),
        };
        let state = AgentMasked {
            neighbours: self.graph.neighbours(self.id),
            config: self.config,
            id: self.id,
            held,
        };
        Ok((state, msg))
    }

    /// Decrypts the inbox; every share must come from a distinct neighbour and
    /// be addressed to this agent. Includes its own share pair.
    fn open_inbox(&self, inbox: &[EncryptedShare]) -> Result<BTreeMap<AgentId, Held>, Error> {
        let neighbours = self.graph.neighbours(self.id);
        let mut held = BTreeMap::from([(self.id, self.own.clone())]);
        for e in inbox {
            if e.to != self.id {
                return Err(Error::Misrouted {
                    from: e.from,
                    to: e.to,
                });
            }
            let sender = match neighbours.binary_search(&e.from) {
                Ok(_) => &self.directory[&e.from],
                Err(_) => {
                    return Err(Error::NotNeighbour {
                        from: e.from,
                        to: e.to,
                    });
                }
            };
            let round = self.config.round;
            let pt = open_share(&self.c, &sender.c_pk, round, e.from, e.to, &e.ciphertext)?;
            if pt.len() != PLAINTEXT_BYTES {
                return Err(Error::CorruptShares);
            }
            let (b, s) = pt.split_at(8 * CHUNKS);
            let pair = Held {
                b: shamir::y_from_bytes(b)?,
                s: shamir::y_from_bytes(s)?,
            };
            if held.insert(e.from, pair).is_some() {
                return Err(Error::Duplicate(e.from));
            }
        }
        Ok(held)
    }

    /// y += PRG(b) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv), over `peers` ≠ u.
    fn add_masks(&self, y: &mut [u32], peers: impl Iterator<Item = AgentId>) -> Result<(), Error> {
        let (round, k) = (self.config.round, self.config.ring_bits);
        ring::add_mask(y, &self.b, MaskDomain::SelfMask { round }, k);
        for v in peers.filter(|&v| v != self.id) {
            let seed = pairwise_seed(&self.s, &self.directory[&v].s_pk, round, self.id, v)?;
            let domain = MaskDomain::Pairwise { round };
            if v > self.id {
                ring::add_mask(y, &seed, domain, k);
            } else {
                ring::sub_mask(y, &seed, domain, k);
            }
        }
        Ok(())
    }
}

impl AgentMasked {
    /// Round 3: checks the coordinator's request and reveals, for each owner
    /// whose shares it holds, the self-mask share if the owner survived or
    /// the s-key share if it dropped. Refuses a request that names an agent
    /// as both, omits this agent, names agents it never heard from, or leaves
    /// fewer than t survivors among its holders. Consumes the state: one
    /// answer per round.
    pub fn unmask(self, request: &UnmaskRequest) -> Result<UnmaskResponse, Error> {
        let survivors: BTreeSet<AgentId> = request.survivors.iter().copied().collect();
        let dropped: BTreeSet<AgentId> = request.dropped.iter().copied().collect();
        if let Some(&both) = survivors.intersection(&dropped).next() {
            return Err(Error::RefusedBothSecrets(both));
        }
        if !survivors.contains(&self.id) {
            return Err(Error::NotSurvivor);
        }
        // Of its own neighbours, the request may only name those it heard from.
        let named = survivors.iter().chain(&dropped);
        if let Some(&v) = named
            .filter(|v| self.neighbours.binary_search(v).is_ok())
            .find(|v| !self.held.contains_key(v))
        {
            return Err(Error::InconsistentRequest(v));
        }
        let live = self.held.keys().filter(|v| survivors.contains(v)).count();
        if live < self.config.threshold {
            return Err(Error::TooFewSurvivors {
                have: live,
                need: self.config.threshold,
            });
        }
        let mut response = UnmaskResponse {
            agent: self.id,
            self_mask_shares: Vec::new(),
            key_shares: Vec::new(),
        };
        for (&owner, held) in &self.held {
            if survivors.contains(&owner) {
                response
                    .self_mask_shares
                    .push(RevealedShare { owner, y: held.b });
            } else if dropped.contains(&owner) {
                response.key_shares.push(RevealedShare { owner, y: held.s });
            }
        }
        Ok(response)
    }
}
