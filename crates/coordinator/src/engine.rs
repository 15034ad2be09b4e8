//! The round state machine: when a round opens, whom it selects, whom it stops waiting
//! for, when it closes or is abandoned, and when a failed commit is retried.
//!
//! It does no IO and reads no clock. The driver (`drive.rs`) feeds it the time
//! ([`Engine::tick`]) and the outcome of each commit, and performs the [`Action`]s it
//! returns (pending files, metrics, logs). The gRPC handlers record joins, heartbeats and
//! updates in the shared [`State`] under the same lock, so the engine sees them at the next
//! tick. Every rule here is unit-tested with hand-made times, without sockets or sleeps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::FederationConfig;
use crate::pending::Stored;
use crate::rounds::{self, OpenRound, Phase, State};
use crate::store::RoundRecord;

/// After a failed commit (a full disk, say) the round is retried after a capped
/// exponential backoff: retrying at once would not fix the disk.
pub const COMMIT_BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const COMMIT_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The federation settings the round rules read.
#[derive(Debug, Clone)]
pub struct Rules {
    pub rounds: u64,
    pub min_clients: usize,
    pub fraction: f64,
    pub seed: u64,
    pub agent_timeout: Duration,
    pub round_deadline: Duration,
    /// Empty: every agent is allowed.
    pub allowlist: Vec<String>,
}

impl Rules {
    pub fn new(f: &FederationConfig) -> Self {
        Rules {
            rounds: f.rounds,
            min_clients: f.min_clients,
            fraction: f.fraction,
            seed: f.seed,
            agent_timeout: Duration::from_secs(f.agent_timeout_secs),
            round_deadline: Duration::from_secs(f.round_deadline_secs),
            allowlist: f.allowlist.clone(),
        }
    }

    fn allowed(&self, id: &str) -> bool {
        self.allowlist.is_empty() || self.allowlist.iter().any(|a| a == id)
    }
}

/// The time of a tick: monotonic for deadlines, wall-clock for what agents are told.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: Instant,
    pub unix_ms: u64,
}

/// Whether a certificate (client id, serial) is revoked.
pub type Revoked<'a> = &'a dyn Fn(&str, &str) -> bool;

/// What the driver must do, in order.
#[derive(Debug)]
pub enum Action {
    /// An update recovered from disk whose agent is no longer allowed: delete its file.
    DiscardRecovered { client: String, path: PathBuf },
    /// A round opened (for the log).
    Opened {
        round: u64,
        selected: BTreeSet<String>,
        connected: usize,
    },
    /// Keep a round's selection on disk, so a restart reopens it for the same agents.
    SaveSelected {
        round: u64,
        agents: BTreeSet<String>,
    },
    /// A revoked agent left the open round; its update, if any, no longer counts.
    DropRevoked {
        client: String,
        round: u64,
        update: Option<PathBuf>,
    },
    /// A selected agent went silent past the agent timeout and left the open round.
    DropSilent { client: String, round: u64 },
    /// A connected agent took the slot of a dropped one.
    Replaced { client: String, round: u64 },
    /// The round closed: aggregate and commit it, then report with
    /// [`Engine::committed`], [`Engine::aggregate_refused`] or [`Engine::commit_failed`].
    Commit(Box<OpenRound>),
    /// The deadline passed without `min_clients` updates: the round reopens later with
    /// the updates that did arrive.
    Abandoned { round: u64, answered: usize },
    /// Every round is committed: the driver stops.
    Finish,
}

pub struct Engine {
    rules: Rules,
    /// Tensor names and shapes an update must have (the same for every round).
    expected: Arc<BTreeMap<String, Vec<usize>>>,
    commit_backoff: Duration,
    /// After a failed commit, the round does not reopen before this.
    retry_at: Option<Instant>,
}

impl Engine {
    pub fn new(rules: Rules, expected: Arc<BTreeMap<String, Vec<usize>>>) -> Self {
        Engine {
            rules,
            expected,
            commit_backoff: Duration::ZERO,
            retry_at: None,
        }
    }

    /// Applies the rules at `clock`: opens, watches, closes or abandons the round.
    pub fn tick(&mut self, st: &mut State, clock: Clock, revoked: Revoked) -> Vec<Action> {
        let next = match &st.phase {
            Phase::Done => return vec![Action::Finish],
            Phase::Waiting { next } => *next,
            Phase::Training(_) => return self.watch(st, clock, revoked),
            Phase::Aggregating { .. } => return Vec::new(),
        };
        if self.retry_at.is_some_and(|t| clock.now < t) {
            return Vec::new();
        }
        let connected = st.connected(clock.now, self.rules.agent_timeout, revoked);
        // After a restart, the round reopens once everyone selected before is back or the
        // grace period is over, whichever comes first.
        let in_grace = st.grace_until.is_some_and(|t| clock.now < t)
            && !st.selected_before.iter().all(|id| connected.contains(id));
        if connected.len() < self.rules.min_clients || in_grace {
            return Vec::new();
        }
        self.open(st, next, &connected, clock, revoked)
    }

    fn open(
        &mut self,
        st: &mut State,
        round: u64,
        connected: &[String],
        clock: Clock,
        revoked: Revoked,
    ) -> Vec<Action> {
        let r = &self.rules;
        let mut actions = Vec::new();
        let mut selected = rounds::select(connected, r.fraction, r.min_clients, r.seed, round);
        st.grace_until = None;
        let selected_before: BTreeSet<String> = std::mem::take(&mut st.selected_before)
            .into_iter()
            .filter(|id| {
                let serial = st.agents.get(id).map_or("", |a| a.serial.as_str());
                r.allowed(id) && !revoked(id, serial)
            })
            .collect();
        selected.extend(
            selected_before
                .iter()
                .filter(|id| connected.contains(id))
                .cloned(),
        );
        // Updates accepted before a restart (or an abandoned attempt) count; their senders
        // are selected — unless no longer allowed or revoked.
        let mut recovered = Vec::new();
        for u in std::mem::take(&mut st.recovered) {
            if r.allowed(&u.client) && !revoked(&u.client, &u.serial) {
                recovered.push(u);
            } else {
                actions.push(Action::DiscardRecovered {
                    client: u.client,
                    path: u.path,
                });
            }
        }
        selected.extend(recovered.iter().map(|u| u.client.clone()));
        actions.push(Action::Opened {
            round,
            selected: selected.clone(),
            connected: connected.len(),
        });
        actions.push(Action::SaveSelected {
            round,
            agents: selected.union(&selected_before).cloned().collect(),
        });
        st.phase = Phase::Training(Box::new(OpenRound {
            round,
            selected,
            failed: Default::default(),
            selected_before,
            submitted: recovered
                .into_iter()
                .map(|u| (u.client.clone(), u))
                .collect(),
            expected: self.expected.clone(),
            opened: clock.now,
            deadline: clock.now + r.round_deadline,
            deadline_unix_ms: clock.unix_ms + r.round_deadline.as_millis() as u64,
            bytes_up: 0,
            bytes_down: 0,
            refused: BTreeMap::new(),
            secure: None,
            secure_failed: false,
        }));
        actions
    }

    /// The open round: drops revoked and silent agents, refills their slots, then closes
    /// the round (complete, or late with a quorum) or abandons it (late without one).
    fn watch(&mut self, st: &mut State, clock: Clock, revoked: Revoked) -> Vec<Action> {
        let connected = st.connected(clock.now, self.rules.agent_timeout, revoked);
        let Phase::Training(open) = &mut st.phase else {
            return Vec::new();
        };
        let mut actions = drop_gone(open, &st.agents, clock.now, &self.rules, revoked);
        actions.extend(self.refill(open, &connected));
        let min = self.rules.min_clients;
        let answered = open.answered();
        // A secure round is complete once its sum is revealed: the protocol only reveals
        // one holding at least its threshold of agents (a strict majority of those
        // selected, and never fewer than 3), whoever dropped out on the way.
        let complete = open.secure.is_some() || (open.is_complete() && answered >= min);
        let late = clock.now >= open.deadline || open.secure_failed || open.secure.is_some();
        let round = open.round;
        if complete || (late && answered >= min) {
            let Phase::Training(open) =
                std::mem::replace(&mut st.phase, Phase::Aggregating { round })
            else {
                unreachable!()
            };
            let digests = open
                .submitted
                .iter()
                .map(|(id, s)| (id.clone(), s.digest.clone()))
                .collect();
            st.closed = Some((round, digests));
            actions.push(Action::Commit(open));
        } else if late {
            st.abandoned_rounds += 1;
            // The updates that did arrive stay valid (same global model): they count again
            // when the round reopens.
            let Phase::Training(open) =
                std::mem::replace(&mut st.phase, Phase::Waiting { next: round })
            else {
                unreachable!()
            };
            st.recovered = open.submitted.into_values().collect();
            actions.push(Action::Abandoned { round, answered });
        }
        actions
    }

    /// Slots of dropped agents go to connected agents the round has not selected, so a
    /// round can still reach min_clients without waiting for its deadline. (An agent whose
    /// update was refused keeps its slot: it may still send a corrected one.)
    fn refill(&self, open: &mut OpenRound, connected: &[String]) -> Vec<Action> {
        let r = &self.rules;
        let live = open.selected.len();
        if live >= r.min_clients {
            return Vec::new();
        }
        let candidates: Vec<String> = connected
            .iter()
            .filter(|id| !open.selected.contains(*id))
            .cloned()
            .collect();
        let added = rounds::select(&candidates, 0.0, r.min_clients - live, r.seed, open.round);
        if added.is_empty() {
            return Vec::new();
        }
        let mut actions = Vec::new();
        for id in added {
            actions.push(Action::Replaced {
                client: id.clone(),
                round: open.round,
            });
            open.selected.insert(id);
        }
        actions.push(Action::SaveSelected {
            round: open.round,
            agents: open
                .selected
                .union(&open.selected_before)
                .cloned()
                .collect(),
        });
        actions
    }

    /// The round's new model is committed and served. True when it was the last round.
    pub fn committed(&mut self, st: &mut State, record: RoundRecord) -> bool {
        self.commit_backoff = Duration::ZERO;
        self.retry_at = None;
        let round = record.round;
        st.history.push(record);
        if round >= self.rules.rounds {
            st.phase = Phase::Done;
            true
        } else {
            st.phase = Phase::Waiting { next: round + 1 };
            false
        }
    }

    /// The aggregate failed its checks: nothing was committed, and the round is retried
    /// with fresh updates (the driver discards the ones that produced the refused step).
    pub fn aggregate_refused(&mut self, st: &mut State, check: &str) {
        *st.refused_total
            .entry(format!("aggregate_{check}"))
            .or_default() += 1;
        st.closed = None;
        if let Phase::Aggregating { round } = st.phase {
            st.phase = Phase::Waiting { next: round };
        }
    }

    /// Nothing was committed: the previous model stands and the round reopens after the
    /// returned backoff, with its stored updates (from `open`, or listed from disk by
    /// `stored` when the commit task was lost).
    pub fn commit_failed(
        &mut self,
        st: &mut State,
        open: Option<Box<OpenRound>>,
        now: Instant,
        stored: impl FnOnce(u64) -> Vec<Stored>,
    ) -> Duration {
        self.commit_backoff =
            (self.commit_backoff * 2).clamp(COMMIT_BACKOFF_MIN, COMMIT_BACKOFF_MAX);
        self.retry_at = Some(now + self.commit_backoff);
        if let Phase::Aggregating { round } = st.phase {
            st.phase = Phase::Waiting { next: round };
            st.recovered = match open {
                Some(o) => o.submitted.into_values().collect(),
                None => stored(round),
            };
        }
        self.commit_backoff
    }
}

/// Revoked agents (no longer waited for; an update sent before does not count) and
/// selected agents silent past the agent timeout (agents heartbeat while they train).
fn drop_gone(
    open: &mut OpenRound,
    agents: &std::collections::HashMap<String, rounds::AgentSeen>,
    now: Instant,
    rules: &Rules,
    revoked: Revoked,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let gone: Vec<String> = open
        .selected
        .iter()
        .filter(|id| {
            let serial = agents.get(*id).map_or("", |a| a.serial.as_str());
            let serial = open
                .submitted
                .get(*id)
                .map_or(serial, |u| u.serial.as_str());
            revoked(id, serial)
        })
        .cloned()
        .collect();
    for id in gone {
        let update = open.drop_agent(&id).map(|u| u.path);
        actions.push(Action::DropRevoked {
            client: id,
            round: open.round,
            update,
        });
    }
    let silent: Vec<String> = open
        .selected
        .iter()
        .filter(|id| {
            open.awaits(id)
                && agents.get(*id).is_none_or(|a| {
                    now.saturating_duration_since(a.last_seen) > rules.agent_timeout
                })
        })
        .cloned()
        .collect();
    for id in silent {
        open.drop_agent(&id);
        actions.push(Action::DropSilent {
            client: id,
            round: open.round,
        });
    }
    actions
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
