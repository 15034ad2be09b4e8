//! The protocol's messages: plain serde structs (the protobuf mapping lives
//! with the transport). `wire_bytes` gives each message's payload size with
//! ids as 4 bytes, keys as 32 and byte strings as their length, without any
//! framing, so per-agent traffic can be computed before a benchmark.

use serde::{Deserialize, Serialize};

use crate::AgentId;
use crate::shamir::CHUNKS;

const ID_BYTES: usize = 4;
/// A share pair (two × five field elements of 8 bytes) plus the AEAD tag.
pub const SHARE_CIPHERTEXT_BYTES: usize = 16 * CHUNKS + crate::keys::TAG_BYTES;

/// Round 0, agent → coordinator: the round's two public keys
/// (`c_pk` encrypts shares, `s_pk` agrees pairwise mask seeds).
/// The coordinator broadcasts all of them (the set U1) back as the directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    pub agent: AgentId,
    pub c_pk: [u8; 32],
    pub s_pk: [u8; 32],
}

/// One encrypted share pair (self-mask seed share, s-key share) for `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    pub from: AgentId,
    pub to: AgentId,
    pub ciphertext: Vec<u8>,
}

/// Round 1, agent → coordinator: one encrypted share pair per neighbour.
/// The coordinator routes each to its recipient (the senders are U2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareKeys {
    pub agent: AgentId,
    pub shares: Vec<EncryptedShare>,
}

/// Round 2, agent → coordinator: the masked input, bit-packed at k bits per
/// value (the senders are U3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    pub agent: AgentId,
    pub packed: Vec<u8>,
}

/// Round 3, coordinator → every survivor: who is counted (U3) and who dropped
/// after sharing keys (U2 \ U3). Sorted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    pub survivors: Vec<AgentId>,
    pub dropped: Vec<AgentId>,
}

/// A share revealed at unmasking; its x-coordinate is the sender's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    pub owner: AgentId,
    pub y: [u64; CHUNKS],
}

/// Round 3, agent → coordinator: shares of survivors' self-mask seeds and of
/// dropped agents' s-keys — never both for the same owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    pub agent: AgentId,
    pub self_mask_shares: Vec<RevealedShare>,
    pub key_shares: Vec<RevealedShare>,
}

/// What one agent sends in a round without dropouts, with `neighbours`
/// neighbours (n − 1 for SecAgg, 2·half_degree for SecAgg+), `len` values
/// and ring width `k`: 68 + (4 + 104·d) + (4 + ⌈len·k/8⌉) + (4 + 44·(d + 1)).
/// With dropouts the last term only shrinks.
pub fn agent_upload_bytes(neighbours: usize, len: usize, k: u32) -> usize {
    let share = ID_BYTES + 8 * CHUNKS;
    (ID_BYTES + 64)
        + (ID_BYTES + (2 * ID_BYTES + SHARE_CIPHERTEXT_BYTES) * neighbours)
        + (ID_BYTES + crate::ring::packed_len(len, k))
        + (ID_BYTES + share * (neighbours + 1))
}

/// What the coordinator sends one agent: the directory of `n` agents, its
/// inbox of `neighbours` shares, and the unmask request naming `n2` agents.
pub fn agent_download_bytes(n: usize, neighbours: usize, n2: usize) -> usize {
    (ID_BYTES + 64) * n + (2 * ID_BYTES + SHARE_CIPHERTEXT_BYTES) * neighbours + ID_BYTES * n2
}

/// Payload size of a message, for traffic estimates.
pub trait WireBytes {
    fn wire_bytes(&self) -> usize;
}

/// 68 bytes.
impl WireBytes for AdvertiseKeys {
    fn wire_bytes(&self) -> usize {
        ID_BYTES + 32 + 32
    }
}

/// 8 + ciphertext (80 plaintext + 16 tag) = 104 bytes.
impl WireBytes for EncryptedShare {
    fn wire_bytes(&self) -> usize {
        2 * ID_BYTES + self.ciphertext.len()
    }
}

/// 4 + 104 · neighbours.
impl WireBytes for ShareKeys {
    fn wire_bytes(&self) -> usize {
        ID_BYTES + self.shares.iter().map(WireBytes::wire_bytes).sum::<usize>()
    }
}

/// 4 + ⌈len · k / 8⌉.
impl WireBytes for MaskedInput {
    fn wire_bytes(&self) -> usize {
        ID_BYTES + self.packed.len()
    }
}

/// 4 · (survivors + dropped).
impl WireBytes for UnmaskRequest {
    fn wire_bytes(&self) -> usize {
        ID_BYTES * (self.survivors.len() + self.dropped.len())
    }
}

/// 4 + 44 · revealed shares (at most one per neighbour, plus its own).
impl WireBytes for UnmaskResponse {
    fn wire_bytes(&self) -> usize {
        let share = ID_BYTES + 8 * CHUNKS;
        ID_BYTES + share * (self.self_mask_shares.len() + self.key_shares.len())
    }
}
