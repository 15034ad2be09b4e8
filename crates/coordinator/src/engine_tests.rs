//! The round rules, driven with hand-made times: no sockets, no sleeps.

use super::*;
use crate::rounds::AgentSeen;

const DEADLINE: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(10);

fn rules(min_clients: usize, fraction: f64) -> Rules {
    Rules {
        rounds: 3,
        min_clients,
        fraction,
        seed: 7,
        agent_timeout: TIMEOUT,
        round_deadline: DEADLINE,
        allowlist: Vec::new(),
    }
}

fn engine(min_clients: usize, fraction: f64) -> Engine {
    let expected = BTreeMap::from([("w".to_string(), vec![2, 2])]);
    Engine::new(rules(min_clients, fraction), Arc::new(expected))
}

/// A fresh coordinator waiting for round 1.
fn state() -> State {
    State::new(Phase::Waiting { next: 1 }, Vec::new())
}

/// The start time, an engine and a fresh state.
fn fresh(min_clients: usize, fraction: f64) -> (Instant, Engine, State) {
    (Instant::now(), engine(min_clients, fraction), state())
}

fn at(t0: Instant, secs: u64) -> Clock {
    Clock {
        now: t0 + Duration::from_secs(secs),
        unix_ms: 1_000_000 + secs * 1000,
    }
}

/// `id` joins or heartbeats at `t`.
fn seen(st: &mut State, id: &str, t: Instant) {
    let agent = AgentSeen {
        last_seen: t,
        shard_size: 10,
        serial: format!("serial-{id}"),
    };
    st.agents.insert(id.to_string(), agent);
}

fn update(client: &str) -> Stored {
    Stored {
        client: client.to_string(),
        num_samples: 10,
        scale: 1.0,
        mean_loss: Some(0.5),
        digest: client.as_bytes().to_vec(),
        path: PathBuf::from(format!("/pending/{client}.safetensors")),
        norm: 1.0,
        declared: 10,
        serial: format!("serial-{client}"),
    }
}

fn submit(st: &mut State, client: &str) {
    open_round(st)
        .submitted
        .insert(client.to_string(), update(client));
}

fn open_round(st: &mut State) -> &mut OpenRound {
    match &mut st.phase {
        Phase::Training(open) => open,
        _ => panic!("no open round"),
    }
}

fn nobody_revoked(_: &str, _: &str) -> bool {
    false
}

fn tick(e: &mut Engine, st: &mut State, clock: Clock) -> Vec<Action> {
    e.tick(st, clock, &nobody_revoked)
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// a, b, c connected at `t0` and round 1 opened for all three.
fn opened(e: &mut Engine, t0: Instant) -> State {
    let mut st = state();
    for id in ["a", "b", "c"] {
        seen(&mut st, id, t0);
    }
    tick(e, &mut st, at(t0, 0));
    assert_eq!(open_round(&mut st).selected, set(&["a", "b", "c"]));
    st
}

/// [`opened`] with a new engine.
fn fresh_open(min_clients: usize, fraction: f64) -> (Instant, Engine, State) {
    let (t0, mut e, _) = fresh(min_clients, fraction);
    let st = opened(&mut e, t0);
    (t0, e, st)
}

/// Every agent heartbeats at `t`.
fn all_seen(st: &mut State, t: Instant) {
    let ids: Vec<String> = st.agents.keys().cloned().collect();
    for id in ids {
        seen(st, &id, t);
    }
}

/// Round 1 open for a, b and c, updates from a and b in, everyone heard from `secs` in.
fn two_of_three(e: &mut Engine, t0: Instant, secs: u64) -> State {
    let mut st = opened(e, t0);
    submit(&mut st, "a");
    submit(&mut st, "b");
    all_seen(&mut st, t0 + Duration::from_secs(secs));
    st
}

#[test]
fn a_round_opens_once_min_clients_are_connected() {
    let (t0, mut e, mut st) = fresh(2, 1.0);
    seen(&mut st, "a", t0);
    assert!(tick(&mut e, &mut st, at(t0, 0)).is_empty());
    assert!(matches!(st.phase, Phase::Waiting { next: 1 }));
    seen(&mut st, "b", t0);
    let actions = tick(&mut e, &mut st, at(t0, 1));
    assert!(
        matches!(&actions[0], Action::Opened { round: 1, connected: 2, selected } if *selected == set(&["a", "b"]))
    );
    assert!(
        matches!(&actions[1], Action::SaveSelected { round: 1, agents } if *agents == set(&["a", "b"]))
    );
    let open = open_round(&mut st);
    assert_eq!(open.deadline, t0 + Duration::from_secs(1) + DEADLINE);
    assert_eq!(open.deadline_unix_ms, 1_001_000 + 60_000);
    assert_eq!(open.expected["w"], vec![2, 2]);
}

#[test]
fn an_agent_silent_past_the_timeout_is_not_counted_as_connected() {
    let (t0, mut e, mut st) = fresh(2, 1.0);
    seen(&mut st, "a", t0);
    seen(&mut st, "b", t0 + Duration::from_secs(5));
    // a was last heard 11 s ago: only b is connected.
    assert!(tick(&mut e, &mut st, at(t0, 11)).is_empty());
    assert!(matches!(st.phase, Phase::Waiting { next: 1 }));
}

#[test]
fn a_complete_round_commits_before_its_deadline() {
    let t0 = Instant::now();
    let mut e = engine(2, 1.0);
    let mut st = two_of_three(&mut e, t0, 5);
    assert!(
        tick(&mut e, &mut st, at(t0, 5)).is_empty(),
        "c still trains"
    );
    submit(&mut st, "c");
    let actions = tick(&mut e, &mut st, at(t0, 6));
    assert!(matches!(&actions[..], [Action::Commit(o)] if o.submitted.len() == 3));
    assert!(matches!(st.phase, Phase::Aggregating { round: 1 }));
    let (round, digests) = st
        .closed
        .clone()
        .expect("closed digests kept for late retries");
    assert_eq!(round, 1);
    assert_eq!(digests["b"], b"b".to_vec());
}

#[test]
fn the_deadline_with_a_quorum_commits_what_arrived() {
    let t0 = Instant::now();
    let mut e = engine(2, 1.0);
    // c keeps heartbeating but never sends: the round waits until the exact deadline.
    let mut st = two_of_three(&mut e, t0, 59);
    assert!(tick(&mut e, &mut st, at(t0, 59)).is_empty());
    let actions = tick(&mut e, &mut st, at(t0, 60));
    assert!(
        matches!(&actions[..], [Action::Commit(o)] if o.submitted.keys().cloned().collect::<BTreeSet<_>>() == set(&["a", "b"]))
    );
}

#[test]
fn the_deadline_without_a_quorum_abandons_and_keeps_the_updates() {
    let (t0, mut e, mut st) = fresh_open(2, 1.0);
    submit(&mut st, "a");
    all_seen(&mut st, t0 + Duration::from_secs(59));
    let actions = tick(&mut e, &mut st, at(t0, 60));
    assert!(matches!(
        &actions[..],
        [Action::Abandoned {
            round: 1,
            answered: 1
        }]
    ));
    assert!(matches!(st.phase, Phase::Waiting { next: 1 }));
    assert_eq!(st.abandoned_rounds, 1);
    assert_eq!(st.recovered, vec![update("a")]);
    // The same round reopens with a's update counted and a selected.
    let actions = tick(&mut e, &mut st, at(t0, 61));
    assert!(matches!(&actions[0], Action::Opened { round: 1, .. }));
    let open = open_round(&mut st);
    assert_eq!(open.submitted["a"], update("a"));
    assert!(open.selected.contains("a"));
    assert_eq!(open.deadline, t0 + Duration::from_secs(61) + DEADLINE);
}

#[test]
fn a_silent_agent_is_dropped_and_its_slot_refilled() {
    let t0 = Instant::now();
    // Three connected, two selected (⌈0.5 · 3⌉ = 2).
    let mut e = engine(2, 0.5);
    let mut st = state();
    for id in ["a", "b", "c"] {
        seen(&mut st, id, t0);
    }
    tick(&mut e, &mut st, at(t0, 0));
    let selected = open_round(&mut st).selected.clone();
    assert_eq!(selected.len(), 2);
    let silent = selected.iter().next().unwrap().clone();
    let spare = ["a", "b", "c"]
        .into_iter()
        .find(|id| !selected.contains(*id))
        .unwrap();
    // Everyone but `silent` heartbeats; 11 s on, `silent` is past the timeout.
    for id in ["a", "b", "c"].into_iter().filter(|id| *id != silent) {
        seen(&mut st, id, t0 + Duration::from_secs(11));
    }
    let actions = tick(&mut e, &mut st, at(t0, 11));
    assert!(matches!(&actions[0], Action::DropSilent { client, round: 1 } if *client == silent));
    assert!(matches!(&actions[1], Action::Replaced { client, round: 1 } if client == spare));
    let open = open_round(&mut st);
    assert!(!open.selected.contains(&silent));
    assert!(open.selected.contains(spare));
    assert_eq!(open.selected.len(), 2);
    assert!(matches!(&actions[2], Action::SaveSelected { agents, .. } if *agents == open.selected));
}

#[test]
fn an_agent_whose_update_was_refused_keeps_its_slot() {
    let (t0, mut e, mut st) = fresh_open(3, 1.0);
    seen(&mut st, "d", t0);
    open_round(&mut st).failed.insert("a".into());
    submit(&mut st, "b");
    // a is silent, but its update was refused: it is not dropped, nobody replaces it, and
    // it may still send a corrected update.
    seen(&mut st, "b", t0 + Duration::from_secs(20));
    seen(&mut st, "c", t0 + Duration::from_secs(20));
    seen(&mut st, "d", t0 + Duration::from_secs(20));
    assert!(tick(&mut e, &mut st, at(t0, 20)).is_empty());
    let open = open_round(&mut st);
    assert!(open.selected.contains("a"));
    assert!(!open.selected.contains("d"));
    submit(&mut st, "c");
    // Everyone answered but only two updates arrived: min_clients 3 is not reached.
    assert!(tick(&mut e, &mut st, at(t0, 21)).is_empty());
    open_round(&mut st).failed.remove("a");
    submit(&mut st, "a");
    let actions = tick(&mut e, &mut st, at(t0, 22));
    assert!(matches!(&actions[..], [Action::Commit(o)] if o.submitted.len() == 3));
}

#[test]
fn a_revoked_agent_leaves_the_round_and_its_update_is_discarded() {
    let (t0, mut e, mut st) = fresh_open(2, 1.0);
    submit(&mut st, "b");
    let revoked = |id: &str, _: &str| id == "b";
    let actions = e.tick(&mut st, at(t0, 1), &revoked);
    assert!(
        matches!(&actions[0], Action::DropRevoked { client, update: Some(p), .. } if client == "b" && *p == update("b").path)
    );
    let open = open_round(&mut st);
    assert!(!open.selected.contains("b"));
    assert!(open.submitted.is_empty());
}

/// Restarted with a and b selected for round 1 before, a grace of 5 s, and a and c
/// heard from `secs` in.
fn restarted(t0: Instant, secs: u64) -> State {
    let mut st = state();
    st.selected_before = set(&["a", "b"]);
    st.grace_until = Some(t0 + Duration::from_secs(5));
    seen(&mut st, "a", t0 + Duration::from_secs(secs));
    seen(&mut st, "c", t0 + Duration::from_secs(secs));
    st
}

#[test]
fn after_a_restart_the_round_waits_for_its_agents_within_the_grace() {
    let t0 = Instant::now();
    let mut e = engine(2, 1.0);
    let mut st = restarted(t0, 0);
    assert!(tick(&mut e, &mut st, at(t0, 1)).is_empty(), "b is awaited");
    seen(&mut st, "b", t0 + Duration::from_secs(2));
    tick(&mut e, &mut st, at(t0, 2));
    assert_eq!(open_round(&mut st).selected, set(&["a", "b", "c"]));
    assert_eq!(st.grace_until, None);
}

#[test]
fn past_the_grace_the_round_reopens_and_readmits_latecomers() {
    let t0 = Instant::now();
    let mut e = engine(2, 1.0);
    let mut st = restarted(t0, 4);
    assert!(tick(&mut e, &mut st, at(t0, 4)).is_empty());
    let actions = tick(&mut e, &mut st, at(t0, 5));
    // b is still listed for the round on disk, so another restart waits for it too.
    assert!(
        matches!(&actions[1], Action::SaveSelected { agents, .. } if *agents == set(&["a", "b", "c"]))
    );
    let open = open_round(&mut st);
    assert_eq!(open.selected, set(&["a", "c"]));
    assert!(open.readmit("b"), "selected before the restart: taken back");
    assert!(open.awaits("b"));
    assert!(!open.readmit("d"), "never selected");
}

#[test]
fn recovered_updates_of_agents_no_longer_allowed_are_discarded() {
    let t0 = Instant::now();
    let mut e = engine(1, 1.0);
    e.rules.allowlist = vec!["a".into()];
    let mut st = state();
    st.recovered = vec![update("a"), update("x")];
    seen(&mut st, "a", t0);
    let actions = tick(&mut e, &mut st, at(t0, 0));
    assert!(matches!(&actions[0], Action::DiscardRecovered { client, .. } if client == "x"));
    let open = open_round(&mut st);
    assert_eq!(open.submitted.keys().collect::<Vec<_>>(), vec!["a"]);
}

/// Round 1 closed and handed to the driver for commit.
fn closed(e: &mut Engine, t0: Instant) -> (State, Box<OpenRound>) {
    let mut st = opened(e, t0);
    for id in ["a", "b", "c"] {
        submit(&mut st, id);
    }
    let mut actions = tick(e, &mut st, at(t0, 1));
    let Some(Action::Commit(open)) = actions.pop() else {
        panic!("round not closed");
    };
    (st, open)
}

#[test]
fn a_failed_commit_is_retried_after_a_growing_capped_backoff() {
    let t0 = Instant::now();
    let mut e = engine(2, 1.0);
    let (mut st, open) = closed(&mut e, t0);
    let failed_at = t0 + Duration::from_secs(2);
    let wait = e.commit_failed(&mut st, Some(open), failed_at, |_| unreachable!());
    assert_eq!(wait, COMMIT_BACKOFF_MIN);
    assert!(matches!(st.phase, Phase::Waiting { next: 1 }));
    all_seen(&mut st, failed_at);
    // Not before the backoff; then the same round reopens with the stored updates.
    assert!(tick(&mut e, &mut st, at(t0, 2)).is_empty());
    let actions = tick(&mut e, &mut st, at(t0, 3));
    assert!(matches!(&actions[0], Action::Opened { round: 1, .. }));
    assert_eq!(open_round(&mut st).submitted.len(), 3);
    // Each failure in a row doubles the wait, up to a minute.
    let mut now = 3;
    let mut waits = Vec::new();
    for _ in 0..7 {
        let open = match tick(&mut e, &mut st, at(t0, now)).pop() {
            Some(Action::Commit(open)) => open,
            other => panic!("expected a commit, got {other:?}"),
        };
        let wait = e.commit_failed(&mut st, Some(open), at(t0, now).now, |_| unreachable!());
        waits.push(wait.as_secs());
        all_seen(&mut st, t0 + Duration::from_secs(now + wait.as_secs()));
        assert!(tick(&mut e, &mut st, at(t0, now + wait.as_secs() - 1)).is_empty());
        now += wait.as_secs();
        assert!(matches!(
            &tick(&mut e, &mut st, at(t0, now))[0],
            Action::Opened { .. }
        ));
    }
    assert_eq!(waits, vec![2, 4, 8, 16, 32, 60, 60]);
    // A success resets it.
    let Some(Action::Commit(open)) = tick(&mut e, &mut st, at(t0, now)).pop() else {
        panic!("expected a commit");
    };
    assert!(!e.committed(&mut st, open.record(None, t0)));
    assert!(matches!(st.phase, Phase::Waiting { next: 2 }));
    let (mut st, _) = closed(&mut e, t0);
    assert_eq!(
        e.commit_failed(&mut st, None, t0, |_| Vec::new()),
        COMMIT_BACKOFF_MIN
    );
}

#[test]
fn a_lost_commit_task_lists_the_stored_updates_again() {
    let t0 = Instant::now();
    let mut e = engine(2, 1.0);
    let (mut st, _) = closed(&mut e, t0);
    let mut asked = None;
    e.commit_failed(&mut st, None, t0, |round| {
        asked = Some(round);
        vec![update("b")]
    });
    assert_eq!(asked, Some(1));
    assert_eq!(st.recovered, vec![update("b")]);
}

#[test]
fn a_refused_aggregate_reopens_the_round_for_fresh_updates() {
    let t0 = Instant::now();
    let mut e = engine(2, 1.0);
    let (mut st, _) = closed(&mut e, t0);
    e.aggregate_refused(&mut st, "step_norm");
    assert!(matches!(st.phase, Phase::Waiting { next: 1 }));
    assert_eq!(st.refused_total["aggregate_step_norm"], 1);
    assert!(st.closed.is_none());
    assert!(
        st.recovered.is_empty(),
        "the refused updates do not count again"
    );
}

#[test]
fn committing_the_last_round_finishes() {
    let t0 = Instant::now();
    let mut e = engine(2, 1.0);
    e.rules.rounds = 1;
    let (mut st, open) = closed(&mut e, t0);
    let record = open.record(Some(80.0), t0 + Duration::from_secs(4));
    assert_eq!(record.clients, 3);
    assert_eq!(record.seconds, 4.0);
    assert!(e.committed(&mut st, record));
    assert!(matches!(st.phase, Phase::Done));
    assert_eq!(st.history.len(), 1);
    assert!(matches!(
        &tick(&mut e, &mut st, at(t0, 5))[..],
        [Action::Finish]
    ));
}
