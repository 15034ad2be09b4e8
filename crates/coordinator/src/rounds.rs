//! Round bookkeeping: who is connected, who is selected, what has arrived.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::seq::IndexedRandom;

use crate::pending::Stored;
use crate::store::RoundRecord;

#[derive(Debug, Clone)]
pub struct AgentSeen {
    pub last_seen: Instant,
    pub shard_size: u64,
    /// Serial of the certificate it last joined with (empty over plaintext), so a revoked
    /// serial stops it being selected.
    pub serial: String,
}

/// A round accepting updates.
#[derive(Debug)]
pub struct OpenRound {
    pub round: u64,
    pub selected: BTreeSet<String>,
    /// Selected agents whose update was refused for its content: resending it cannot
    /// succeed, so the round no longer waits for them (a corrected update is still taken).
    pub failed: BTreeSet<String>,
    /// Agents selected for this round before a coordinator restart: taken back into the
    /// round when they return, so their training is not wasted.
    pub selected_before: BTreeSet<String>,
    /// Accepted updates by client id, stored on disk (a retry with the same digest is a
    /// no-op).
    pub submitted: BTreeMap<String, Stored>,
    /// Tensor names and shapes an update must have.
    pub expected: Arc<BTreeMap<String, Vec<usize>>>,
    pub opened: Instant,
    pub deadline: Instant,
    pub deadline_unix_ms: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub refused: BTreeMap<String, u64>,
    /// Under secure aggregation: the round's step as the secure sum gave it.
    pub secure: Option<crate::secure::SecureOutcome>,
    /// Under secure aggregation: the protocol failed (too few agents left), abandon now.
    pub secure_failed: bool,
}

impl OpenRound {
    /// Every selected agent answered, with an update or a refused one (agents dropped
    /// from the round no longer count).
    pub fn is_complete(&self) -> bool {
        self.selected
            .iter()
            .all(|id| self.submitted.contains_key(id) || self.failed.contains(id))
    }

    /// Updates the round holds: accepted ones, or those the secure sum holds.
    pub fn answered(&self) -> usize {
        self.secure
            .as_ref()
            .map_or(self.submitted.len(), |s| s.clients as usize)
    }

    /// Whether the round still expects an update from `id`.
    pub fn awaits(&self, id: &str) -> bool {
        self.selected.contains(id) && !self.submitted.contains_key(id) && !self.failed.contains(id)
    }

    /// Takes an agent selected before a restart back into the round. True if it may send.
    pub fn readmit(&mut self, id: &str) -> bool {
        if !self.selected.contains(id) && self.selected_before.contains(id) {
            self.selected.insert(id.to_string());
            tracing::info!(client = %id, round = self.round, "agent selected before the restart rejoined its round");
        }
        self.selected.contains(id)
    }

    /// Takes an agent out of the round (a stalled upload, a revoked certificate): the round
    /// no longer waits for it. Returns its accepted update, if it had one.
    pub fn drop_agent(&mut self, id: &str) -> Option<Stored> {
        self.selected.remove(id);
        self.failed.remove(id);
        self.submitted.remove(id)
    }

    pub fn record(&self, stsb_dev: Option<f64>, now: Instant) -> RoundRecord {
        let losses: Vec<(u64, f64)> = self
            .submitted
            .values()
            .filter_map(|s| s.mean_loss.map(|l| (s.num_samples, l)))
            .collect();
        let n: u64 = losses.iter().map(|(n, _)| n).sum();
        let mean_loss =
            (n > 0).then(|| losses.iter().map(|(k, l)| *k as f64 * l).sum::<f64>() / n as f64);
        RoundRecord {
            round: self.round,
            clients: self.answered() as u32,
            mean_loss,
            stsb_dev,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            seconds: now.saturating_duration_since(self.opened).as_secs_f64(),
            refused: self.refused.clone(),
            bounded: 0,
            step_ratio: None,
            digest: None,
        }
    }
}

pub enum Phase {
    /// Waiting for enough agents to open `next`.
    Waiting {
        next: u64,
    },
    Training(Box<OpenRound>),
    Aggregating {
        round: u64,
    },
    Done,
}

pub struct State {
    pub phase: Phase,
    pub agents: HashMap<String, AgentSeen>,
    pub history: Vec<RoundRecord>,
    /// Refusals by check, over the coordinator's life (for metrics).
    pub refused_total: BTreeMap<String, u64>,
    pub abandoned_rounds: u64,
    /// Digests accepted in the last closed round, so a late retry of one is acknowledged.
    pub closed: Option<(u64, BTreeMap<String, Vec<u8>>)>,
    /// Updates recovered from disk after a restart, counted when their round reopens.
    pub recovered: Vec<Stored>,
    /// Agents selected for the next round before a restart: it waits for them until
    /// `grace_until` before reopening, and takes them back whenever they return.
    pub selected_before: BTreeSet<String>,
    pub grace_until: Option<Instant>,
}

impl State {
    /// A coordinator's state at start-up, in `phase`, with the round log so far.
    pub fn new(phase: Phase, history: Vec<RoundRecord>) -> Self {
        State {
            phase,
            agents: HashMap::new(),
            history,
            refused_total: BTreeMap::new(),
            abandoned_rounds: 0,
            closed: None,
            recovered: Vec::new(),
            selected_before: BTreeSet::new(),
            grace_until: None,
        }
    }

    /// Agents heard from within `timeout` before `now` whose certificate `revoked` does
    /// not name.
    pub fn connected(
        &self,
        now: Instant,
        timeout: Duration,
        revoked: impl Fn(&str, &str) -> bool,
    ) -> Vec<String> {
        let mut ids: Vec<String> = self
            .agents
            .iter()
            .filter(|(id, a)| {
                now.saturating_duration_since(a.last_seen) <= timeout && !revoked(id, &a.serial)
            })
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    pub fn refuse(&mut self, kind: &str) {
        *self.refused_total.entry(kind.to_string()).or_default() += 1;
        if let Phase::Training(open) = &mut self.phase {
            *open.refused.entry(kind.to_string()).or_default() += 1;
        }
    }
}

/// Picks `max(min_clients, ⌈fraction · |connected|⌉)` agents, reproducibly for a round.
pub fn select(
    connected: &[String],
    fraction: f64,
    min_clients: usize,
    seed: u64,
    round: u64,
) -> BTreeSet<String> {
    let k = ((fraction * connected.len() as f64).ceil() as usize)
        .max(min_clients)
        .min(connected.len());
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    connected.choose_multiple(&mut rng, k).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_respects_fraction_and_minimum() {
        let ids: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
        assert_eq!(select(&ids, 0.3, 2, 1, 1).len(), 3);
        assert_eq!(select(&ids, 0.1, 2, 1, 1).len(), 2);
        assert_eq!(select(&ids, 1.0, 2, 1, 1).len(), 10);
        // More than are connected cannot be selected; nobody connected selects nobody.
        assert_eq!(select(&ids, 0.1, 20, 1, 1).len(), 10);
        assert!(select(&[], 0.5, 2, 1, 1).is_empty());
    }

    #[test]
    fn selection_is_a_reproducible_subset_that_varies_by_round_and_seed() {
        let ids: Vec<String> = (0..100).map(|i| format!("a{i:03}")).collect();
        let pool: BTreeSet<String> = ids.iter().cloned().collect();
        let base = select(&ids, 0.3, 2, 1, 4);
        assert_eq!(base.len(), 30);
        assert!(base.is_subset(&pool), "selected agents come from the pool");
        // The same inputs give the same selection, also from a fresh call with copied input.
        assert_eq!(base, select(&ids.clone(), 0.3, 2, 1, 4));
        // Another round or another seed picks another subset (C(100, 30) of them).
        let other_round = select(&ids, 0.3, 2, 1, 5);
        let other_seed = select(&ids, 0.3, 2, 2, 4);
        for other in [&other_round, &other_seed] {
            assert_eq!(other.len(), 30);
            assert!(other.is_subset(&pool));
            assert_ne!(&base, other);
        }
        // Over many rounds every agent gets its turn (not a fixed prefix of the pool).
        let ever: BTreeSet<String> = (1..=40).flat_map(|r| select(&ids, 0.3, 2, 1, r)).collect();
        assert_eq!(ever, pool);
    }
}
