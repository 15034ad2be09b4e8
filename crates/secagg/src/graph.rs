//! Who masks with whom, and who holds whose shares.
//!
//! SecAgg: everyone with everyone (complete graph). SecAgg+: a Harary-style
//! graph on a random ring — the round's agents are shuffled with a ChaCha20
//! stream keyed by a public seed, and each is joined to the `half_degree`
//! agents on either side. Every party computes the same graph from the same
//! (sorted) agent list and seed, and the graph is symmetric.

use std::collections::BTreeMap;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::AgentId;
use crate::kdf;

/// The neighbourhood rule, part of the round configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Neighbourhood {
    /// SecAgg: every agent is every other agent's neighbour.
    Full,
    /// SecAgg+: `half_degree` neighbours on each side of a shuffled ring
    /// (degree 2·half_degree), from a seed every party knows.
    Sparse { half_degree: usize, seed: [u8; 32] },
}

impl Neighbourhood {
    /// SecAgg+ with half degree ⌈c·log2 n⌉ (Bell et al. suggest degree O(log n)).
    pub fn logarithmic(n_agents: usize, c: f64, seed: [u8; 32]) -> Self {
        let log_n = (n_agents.max(2) as f64).log2();
        Neighbourhood::Sparse {
            half_degree: (c * log_n).ceil().max(1.0) as usize,
            seed,
        }
    }
}

/// The neighbour graph of one round, over the agents that advertised keys.
#[derive(Clone, Debug)]
pub enum Graph {
    Full(Vec<AgentId>),
    Sparse(BTreeMap<AgentId, Vec<AgentId>>),
}

impl Graph {
    /// Builds the graph over `agents` (sorted, distinct).
    pub fn new(agents: &[AgentId], rule: &Neighbourhood, round: u64) -> Self {
        match rule {
            Neighbourhood::Sparse { half_degree, seed } if 2 * half_degree + 1 < agents.len() => {
                Graph::Sparse(ring_graph(agents, *half_degree, seed, round))
            }
            // A ring that wraps onto itself is the complete graph.
            _ => Graph::Full(agents.to_vec()),
        }
    }

    /// `id`'s neighbours, sorted, without `id` itself.
    pub fn neighbours(&self, id: AgentId) -> Vec<AgentId> {
        match self {
            Graph::Full(all) => all.iter().copied().filter(|&v| v != id).collect(),
            Graph::Sparse(map) => map.get(&id).cloned().unwrap_or_default(),
        }
    }

    /// Who holds shares of `id`'s secrets: its neighbours and itself, sorted.
    pub fn holders(&self, id: AgentId) -> Vec<AgentId> {
        let mut h = self.neighbours(id);
        if self.contains(id) {
            let at = h.partition_point(|&v| v < id);
            h.insert(at, id);
        }
        h
    }

    /// Whether `a` and `b` (distinct) are neighbours.
    pub fn are_neighbours(&self, a: AgentId, b: AgentId) -> bool {
        match self {
            Graph::Full(_) => a != b && self.contains(a) && self.contains(b),
            Graph::Sparse(map) => map.get(&a).is_some_and(|n| n.binary_search(&b).is_ok()),
        }
    }

    pub fn contains(&self, id: AgentId) -> bool {
        match self {
            Graph::Full(all) => all.binary_search(&id).is_ok(),
            Graph::Sparse(map) => map.contains_key(&id),
        }
    }

    /// The size of the largest holder set.
    pub fn max_holders(&self) -> usize {
        match self {
            Graph::Full(all) => all.len(),
            Graph::Sparse(map) => map.values().map(|n| n.len() + 1).max().unwrap_or(0),
        }
    }

    /// The size of the smallest holder set.
    pub fn min_holders(&self) -> usize {
        match self {
            Graph::Full(all) => all.len(),
            Graph::Sparse(map) => map.values().map(|n| n.len() + 1).min().unwrap_or(0),
        }
    }
}

/// Uniform in 0..bound by rejection, written out so the graph does not depend
/// on how a `rand` version happens to sample ranges.
fn below(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % bound);
    loop {
        let v = rng.next_u64();
        if v < zone {
            return v % bound;
        }
    }
}

fn ring_graph(
    agents: &[AgentId],
    half: usize,
    seed: &[u8; 32],
    round: u64,
) -> BTreeMap<AgentId, Vec<AgentId>> {
    let key = kdf::derive(seed, "fedmicse-secagg/graph/v1", &round.to_le_bytes());
    let mut rng = ChaCha20Rng::from_seed(key);
    let mut order = agents.to_vec();
    for i in (1..order.len()).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let n = order.len();
    let mut map = BTreeMap::new();
    for (pos, &id) in order.iter().enumerate() {
        let mut near: Vec<AgentId> = (1..=half)
            .flat_map(|d| [order[(pos + d) % n], order[(pos + n - d) % n]])
            .collect();
        near.sort_unstable();
        map.insert(id, near);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_graph_is_symmetric_regular_and_deterministic() {
        let agents: Vec<AgentId> = (0..50).collect();
        let rule = Neighbourhood::logarithmic(50, 1.0, [3; 32]);
        let g = Graph::new(&agents, &rule, 1);
        for &u in &agents {
            let nu = g.neighbours(u);
            assert_eq!(nu.len(), 12, "degree 2·⌈log2 50⌉");
            assert!(!nu.contains(&u));
            for v in nu {
                assert!(g.neighbours(v).contains(&u), "{u}–{v} not symmetric");
            }
        }
        let again = Graph::new(&agents, &rule, 1);
        assert!(
            agents
                .iter()
                .all(|&u| g.neighbours(u) == again.neighbours(u))
        );
        let other_round = Graph::new(&agents, &rule, 2);
        assert!(
            agents
                .iter()
                .any(|&u| g.neighbours(u) != other_round.neighbours(u))
        );
    }

    #[test]
    fn small_sparse_graph_is_complete() {
        let agents: Vec<AgentId> = (0..5).collect();
        let rule = Neighbourhood::Sparse {
            half_degree: 2,
            seed: [0; 32],
        };
        let g = Graph::new(&agents, &rule, 1);
        assert_eq!(g.neighbours(2), vec![0, 1, 3, 4]);
        assert_eq!(g.holders(2), vec![0, 1, 2, 3, 4]);
    }
}
