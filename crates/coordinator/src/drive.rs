//! The round driver: a thin async loop around the [`Engine`]. It ticks the engine when a
//! handler wakes it (or every 200 ms), performs the actions it returns (pending files,
//! metrics, logs), runs commits on a blocking thread and reports their outcome back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fedmicse_federation::trainable_names;

use crate::commit::{Commit, commit_round};
use crate::engine::{Action, Clock, Engine, Rules};
use crate::rounds::{OpenRound, Phase};
use crate::{Shared, unix_ms};

/// Runs rounds until every one is committed.
pub(crate) async fn drive(shared: Arc<Shared>) {
    let mut engine = Engine::new(Rules::new(&shared.config.federation), expected(&shared));
    loop {
        let actions = {
            let mut st = shared.lock();
            let clock = Clock {
                now: Instant::now(),
                unix_ms: unix_ms(SystemTime::now()),
            };
            secure_tick(&shared, &mut st, clock.now);
            engine.tick(&mut st, clock, &|id, serial| {
                shared.revocations.is_revoked(id, serial)
            })
        };
        let mut closed = None;
        for action in actions {
            match action {
                Action::Finish => return,
                Action::Commit(open) => closed = Some(open),
                other => perform(&shared, other),
            }
        }
        if let Some(open) = closed {
            close(&shared, &mut engine, open).await;
            continue;
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Advances the open round's secure-aggregation session: closes steps whose answers are
/// in or whose time is up, and hands the revealed mean (or the failure) to the round.
fn secure_tick(shared: &Shared, st: &mut crate::rounds::State, now: Instant) {
    let Phase::Training(open) = &mut st.phase else {
        return;
    };
    if !shared.secure.config.enabled || open.secure.is_some() || open.secure_failed {
        return;
    }
    // The key step stops waiting for slow trainers early enough for the other three.
    let steps = Duration::from_secs(3 * shared.secure.config.step_timeout_secs);
    let keys_until = open
        .deadline
        .checked_sub(steps)
        .unwrap_or(open.opened)
        .max(open.opened);
    match shared
        .secure
        .tick(open.round, &open.selected, keys_until, now)
    {
        Some(Ok(outcome)) => {
            open.bytes_up += shared.secure.bytes_up(open.round);
            open.secure = Some(outcome);
        }
        Some(Err(why)) => {
            tracing::warn!(round = open.round, reason = %why, "secure aggregation could not finish; the round is abandoned");
            open.secure_failed = true;
        }
        None => {}
    }
}

/// Names and shapes of the trainable tensors: what every update must have.
fn expected(shared: &Shared) -> Arc<BTreeMap<String, Vec<usize>>> {
    let global = shared.global.load();
    let names = trainable_names(&global.tensors, &shared.config.task.trainable);
    Arc::new(
        names
            .into_iter()
            .map(|n| {
                let shape = global.tensors[&n].shape.clone();
                (n, shape)
            })
            .collect(),
    )
}

/// Performs one of the engine's actions (all but commits and finishing).
fn perform(shared: &Shared, action: Action) {
    match action {
        Action::DiscardRecovered { client, path } => {
            tracing::warn!(client = %client, "recovered update dropped: the agent is no longer allowed");
            shared.pending.discard(&path);
        }
        Action::Opened {
            round,
            selected,
            connected,
        } => {
            tracing::info!(round, selected = ?selected, connected, "round opened");
        }
        Action::SaveSelected { round, agents } => shared.pending.save_selected(round, &agents),
        Action::DropRevoked {
            client,
            round,
            update,
        } => {
            if let Some(path) = update {
                shared.pending.discard(&path);
            }
            tracing::warn!(client = %client, round, "revoked agent dropped from the round");
        }
        Action::DropSilent { client, round } => {
            shared.metrics.agents_dropped.inc();
            let timeout_secs = shared.config.federation.agent_timeout_secs;
            tracing::warn!(client = %client, round, timeout_secs, "agent silent past the agent timeout: dropped from the round");
        }
        Action::Replaced { client, round } => {
            tracing::info!(client = %client, round, "agent selected in place of a dropped one");
        }
        Action::Abandoned { round, answered } => {
            shared.secure.end(round);
            tracing::warn!(
                round,
                answered,
                min_clients = shared.config.federation.min_clients,
                "deadline passed without enough updates: round abandoned, global model unchanged; retrying"
            );
        }
        Action::Commit(_) | Action::Finish => unreachable!("handled by the driver"),
    }
}

/// Commits a closed round and reports the outcome to the engine.
async fn close(shared: &Arc<Shared>, engine: &mut Engine, open: Box<OpenRound>) {
    let s = shared.clone();
    let result = tokio::task::spawn_blocking(move || {
        let r = commit_round(&s, &open);
        (r, open)
    })
    .await;
    let (error, open) = match result {
        Ok((Ok(Commit::Committed(record)), _)) => {
            let round = record.round;
            shared.secure.end(round);
            if engine.committed(&mut shared.lock(), record) {
                shared.done_tx.send_replace(true);
                tracing::info!(rounds = round, "federation finished");
            }
            return;
        }
        Ok((Ok(Commit::Refused(why)), open)) => {
            // The aggregate would have broken the model: it is not committed, the previous
            // model stays served, and the round is retried with fresh updates (these ones
            // produced the refused step).
            tracing::error!(round = open.round, check = why.kind(), reason = %why, "aggregate refused; the round will be retried with new updates");
            shared.metrics.rounds_refused.inc();
            for u in open.submitted.values() {
                shared.pending.discard(&u.path);
            }
            engine.aggregate_refused(&mut shared.lock(), why.kind());
            return;
        }
        Ok((Err(e), open)) => (e.to_string(), Some(open)),
        Err(e) => (e.to_string(), None),
    };
    // Nothing was committed: the previous global model stands. The stored updates stay on
    // disk and count again when the round reopens.
    shared.metrics.commit_failures.inc();
    let retry_in = {
        let mut st = shared.lock();
        engine.commit_failed(&mut st, open, Instant::now(), |round| {
            shared.pending.list(round)
        })
    };
    tracing::error!(error = %error, retry_in_secs = retry_in.as_secs(), "commit failed; the round will be retried");
    tokio::time::sleep(retry_in).await;
}
