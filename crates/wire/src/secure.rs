//! Secure aggregation on the wire: the protobuf form of `fedmicse_secagg`'s messages, and
//! the agent's side of the `SecureAggregation` service.

use bytes::Bytes;
use fedmicse_secagg::{
    AdvertiseKeys, EncryptedShare, MaskedInput, Neighbourhood, RevealedShare, RoundConfig,
    ShareKeys, UnmaskRequest, UnmaskResponse,
};
use tonic::Status;

use crate::pb;

/// Masked vectors travel in pieces of at most this many bytes.
pub const MASKED_CHUNK_BYTES: usize = 1 << 20;

fn key32(bytes: &[u8], what: &str) -> Result<[u8; 32], String> {
    bytes
        .try_into()
        .map_err(|_| format!("{what}: {} bytes, expected 32", bytes.len()))
}

/// The round's protocol parameters as the agent reads them from its Join answer.
pub fn round_config(round: u64, s: &pb::SecureRound) -> Result<RoundConfig, String> {
    let neighbourhood = if s.half_degree == 0 {
        Neighbourhood::Full
    } else {
        Neighbourhood::Sparse {
            half_degree: s.half_degree as usize,
            seed: key32(&s.graph_seed, "graph_seed")?,
        }
    };
    Ok(RoundConfig {
        round,
        ring_bits: s.ring_bits,
        len: usize::try_from(s.len).map_err(|_| "len does not fit".to_string())?,
        threshold: s.threshold as usize,
        neighbourhood,
    })
}

pub fn keys_to_pb(round: u64, k: &AdvertiseKeys) -> pb::SecureKeys {
    pb::SecureKeys {
        round,
        agent: k.agent,
        c_pk: k.c_pk.to_vec(),
        s_pk: k.s_pk.to_vec(),
    }
}

pub fn keys_from_pb(k: &pb::SecureKeys) -> Result<AdvertiseKeys, String> {
    Ok(AdvertiseKeys {
        agent: k.agent,
        c_pk: key32(&k.c_pk, "c_pk")?,
        s_pk: key32(&k.s_pk, "s_pk")?,
    })
}

pub fn shares_to_pb(round: u64, agent: u32, shares: &[EncryptedShare]) -> pb::SecureShares {
    pb::SecureShares {
        round,
        agent,
        shares: shares
            .iter()
            .map(|s| pb::EncryptedShare {
                from: s.from,
                to: s.to,
                ciphertext: s.ciphertext.clone(),
            })
            .collect(),
    }
}

pub fn shares_from_pb(s: &pb::SecureShares) -> ShareKeys {
    ShareKeys {
        agent: s.agent,
        shares: s
            .shares
            .iter()
            .map(|e| EncryptedShare {
                from: e.from,
                to: e.to,
                ciphertext: e.ciphertext.clone(),
            })
            .collect(),
    }
}

pub fn unmask_request_to_pb(r: &UnmaskRequest) -> pb::UnmaskRequest {
    pb::UnmaskRequest {
        survivors: r.survivors.clone(),
        dropped: r.dropped.clone(),
    }
}

pub fn unmask_request_from_pb(r: &pb::UnmaskRequest) -> UnmaskRequest {
    UnmaskRequest {
        survivors: r.survivors.clone(),
        dropped: r.dropped.clone(),
    }
}

fn revealed_to_pb(r: &[RevealedShare]) -> Vec<pb::RevealedShare> {
    r.iter()
        .map(|s| pb::RevealedShare {
            owner: s.owner,
            y: s.y.to_vec(),
        })
        .collect()
}

fn revealed_from_pb(r: &[pb::RevealedShare]) -> Result<Vec<RevealedShare>, String> {
    r.iter()
        .map(|s| {
            Ok(RevealedShare {
                owner: s.owner,
                y: s.y.as_slice().try_into().map_err(|_| {
                    format!("share of agent {}: {} field elements", s.owner, s.y.len())
                })?,
            })
        })
        .collect()
}

pub fn unmask_to_pb(round: u64, r: &UnmaskResponse) -> pb::UnmaskShares {
    pb::UnmaskShares {
        round,
        agent: r.agent,
        self_mask_shares: revealed_to_pb(&r.self_mask_shares),
        key_shares: revealed_to_pb(&r.key_shares),
    }
}

pub fn unmask_from_pb(r: &pb::UnmaskShares) -> Result<UnmaskResponse, String> {
    Ok(UnmaskResponse {
        agent: r.agent,
        self_mask_shares: revealed_from_pb(&r.self_mask_shares)?,
        key_shares: revealed_from_pb(&r.key_shares)?,
    })
}

/// The chunks of a masked input, in order.
pub fn masked_chunks(round: u64, m: &MaskedInput) -> Vec<pb::MaskedChunk> {
    let total = m.packed.len() as u64;
    let mut out: Vec<pb::MaskedChunk> = m
        .packed
        .chunks(MASKED_CHUNK_BYTES)
        .enumerate()
        .map(|(i, c)| pb::MaskedChunk {
            round,
            agent: m.agent,
            total_bytes: total,
            offset: (i * MASKED_CHUNK_BYTES) as u64,
            data: Bytes::copy_from_slice(c),
        })
        .collect();
    if out.is_empty() {
        out.push(pb::MaskedChunk {
            round,
            agent: m.agent,
            total_bytes: 0,
            offset: 0,
            data: Bytes::new(),
        });
    }
    out
}

/// Puts a masked input back together from its chunks: in order, one agent and round,
/// exactly `expected` bytes (what the round's ring and length give), nothing more.
pub struct MaskedAssembler {
    expected: u64,
    head: Option<(u64, u32)>,
    buf: Vec<u8>,
}

impl MaskedAssembler {
    pub fn new(expected_bytes: u64) -> Self {
        MaskedAssembler {
            expected: expected_bytes,
            head: None,
            buf: Vec::new(),
        }
    }

    pub fn push(&mut self, c: pb::MaskedChunk) -> Result<(), Status> {
        let head = *self.head.get_or_insert((c.round, c.agent));
        if head != (c.round, c.agent) {
            return Err(Status::invalid_argument(
                "chunks of two agents or rounds in one stream",
            ));
        }
        if c.total_bytes != self.expected {
            return Err(Status::invalid_argument(format!(
                "masked input of {} bytes; this round's is {}",
                c.total_bytes, self.expected
            )));
        }
        if c.offset != self.buf.len() as u64 {
            return Err(Status::invalid_argument(format!(
                "chunk at byte {}, expected {}",
                c.offset,
                self.buf.len()
            )));
        }
        if self.buf.len() as u64 + c.data.len() as u64 > self.expected {
            return Err(Status::invalid_argument("more bytes than declared"));
        }
        if self.buf.is_empty() {
            self.buf.reserve_exact(self.expected as usize);
        }
        self.buf.extend_from_slice(&c.data);
        Ok(())
    }

    /// The round, the agent and its masked input, once every byte arrived.
    pub fn finish(self) -> Result<(u64, MaskedInput), Status> {
        let Some((round, agent)) = self.head else {
            return Err(Status::invalid_argument("an empty stream"));
        };
        if self.buf.len() as u64 != self.expected {
            return Err(Status::invalid_argument(format!(
                "{} of {} bytes arrived",
                self.buf.len(),
                self.expected
            )));
        }
        Ok((
            round,
            MaskedInput {
                agent,
                packed: self.buf,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_inputs_round_trip_and_bad_streams_are_refused() {
        let m = MaskedInput {
            agent: 3,
            packed: (0..(MASKED_CHUNK_BYTES * 2 + 5)).map(|i| i as u8).collect(),
        };
        let chunks = masked_chunks(7, &m);
        assert_eq!(chunks.len(), 3);
        let mut a = MaskedAssembler::new(m.packed.len() as u64);
        for c in chunks.clone() {
            a.push(c).unwrap();
        }
        assert_eq!(a.finish().unwrap(), (7, m.clone()));

        let mut a = MaskedAssembler::new(m.packed.len() as u64);
        assert!(a.push(chunks[1].clone()).is_err(), "out of order");
        let mut a = MaskedAssembler::new(10);
        assert!(a.push(chunks[0].clone()).is_err(), "wrong size");
        let mut a = MaskedAssembler::new(m.packed.len() as u64);
        a.push(chunks[0].clone()).unwrap();
        assert!(a.finish().is_err(), "truncated");
        let mut a = MaskedAssembler::new(m.packed.len() as u64);
        a.push(chunks[0].clone()).unwrap();
        let mut other = chunks[1].clone();
        other.agent = 4;
        assert!(a.push(other).is_err(), "another agent's chunk");
    }

    #[test]
    fn keys_of_the_wrong_size_are_refused() {
        let k = pb::SecureKeys {
            round: 1,
            agent: 0,
            c_pk: vec![1; 31],
            s_pk: vec![2; 32],
        };
        assert!(keys_from_pb(&k).unwrap_err().contains("c_pk"));
    }
}
