//! The round's public parameters, which the coordinator announces and every
//! party must use identically.

use serde::{Deserialize, Serialize};

use crate::graph::{Graph, Neighbourhood};
use crate::{AgentId, Error, Stage, ring};

/// Parameters of one secure-aggregation round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundConfig {
    /// Round id; bound into every key, mask stream and ciphertext.
    pub round: u64,
    /// Ring width k: values live in Z_2^k (see [`ring::ring_bits`]).
    pub ring_bits: u32,
    /// Values per input vector.
    pub len: usize,
    /// Shamir threshold t: shares needed to rebuild a secret, and survivors
    /// needed (per holder set) to finish the round. Must exceed half of every
    /// holder set, so a coordinator that tells different agents different
    /// stories can never gather t shares of both secrets of one agent.
    pub threshold: usize,
    /// SecAgg (complete graph) or SecAgg+ (sparse graph).
    pub neighbourhood: Neighbourhood,
}

impl RoundConfig {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if !(1..=ring::MAX_BITS).contains(&self.ring_bits) {
            return Err(Error::InvalidRingBits(self.ring_bits));
        }
        // t = 1 would let one share (or one survivor) reveal everything.
        if self.threshold < 2 {
            return Err(Error::ThresholdBelowTwo(self.threshold));
        }
        Ok(())
    }

    /// The round's graph over the agents in U1, after checking the threshold
    /// fits it: enough agents, and t a strict majority of every holder set.
    pub(crate) fn graph(&self, u1: &[AgentId]) -> Result<Graph, Error> {
        if u1.len() < self.threshold {
            return Err(Error::Abandon {
                stage: Stage::AdvertiseKeys,
                have: u1.len(),
                need: self.threshold,
            });
        }
        let graph = Graph::new(u1, &self.neighbourhood, self.round);
        if graph.min_holders() < self.threshold {
            return Err(Error::ThresholdTooHigh {
                t: self.threshold,
                holders: graph.min_holders(),
            });
        }
        if 2 * self.threshold <= graph.max_holders() {
            return Err(Error::ThresholdTooLow {
                t: self.threshold,
                holders: graph.max_holders(),
            });
        }
        Ok(graph)
    }
}

/// Shamir x-coordinate of an agent (never 0).
pub(crate) fn share_x(id: AgentId) -> u64 {
    id as u64 + 1
}
