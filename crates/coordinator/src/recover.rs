//! `--recover`: rolls a damaged state directory back to its newest intact checkpoint.
//! Nothing is deleted: damaged checkpoints and stale stored updates are moved aside, and
//! [`RecoverReport`] says what was found and done.

use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::store::{RoundRecord, Store, recorded_digests, rounds_in};

/// What [`Store::recover`] found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoverReport {
    /// The committed round after recovery (None: the store holds no commit at all).
    pub round: Option<u64>,
    /// The round `state.json` named before (None when it was missing or unreadable).
    pub previous: Option<u64>,
    /// What was wrong (None: the state was healthy and nothing was changed).
    pub problem: Option<String>,
    /// Rounds removed from `rounds.jsonl`.
    pub dropped_rounds: Vec<u64>,
    /// Checkpoint directories moved aside, as (from, to).
    pub moved_checkpoints: Vec<(PathBuf, PathBuf)>,
    /// Stored updates of later rounds moved aside, as (from, to): they were trained from a
    /// model that is no longer the committed one.
    pub moved_updates: Vec<(PathBuf, PathBuf)>,
}

impl RecoverReport {
    /// Whether recovery changed anything (false: the state was healthy).
    pub fn changed(&self) -> bool {
        self.problem.is_some()
    }
}

/// `checkpoints/round-000003` of a path.
fn parent_and_name(p: &Path) -> String {
    let name = |p: &Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    match p.parent() {
        Some(parent) => format!("{}/{}", name(parent), name(p)),
        None => name(p),
    }
}

impl std::fmt::Display for RecoverReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(problem) = &self.problem else {
            return match self.round {
                Some(r) => write!(
                    f,
                    "state is healthy (committed round {r}); nothing to recover"
                ),
                None => write!(f, "the state directory holds no commit; nothing to recover"),
            };
        };
        let round = self.round.unwrap_or_default();
        match self.previous {
            Some(p) if p != round => {
                write!(f, "{problem}; rolled back from round {p} to round {round}")?
            }
            _ => write!(f, "{problem}; rebuilt state.json at round {round}")?,
        }
        if !self.dropped_rounds.is_empty() {
            let list: Vec<String> = self.dropped_rounds.iter().map(u64::to_string).collect();
            write!(f, "; rounds {} dropped from the log", list.join(", "))?;
        }
        for (from, to) in self.moved_checkpoints.iter().chain(&self.moved_updates) {
            let to = to.file_name().unwrap_or_default().to_string_lossy();
            write!(f, "; {} moved to {to}", parent_and_name(from))?;
        }
        Ok(())
    }
}

/// `path` renamed to `path.SUFFIX` (or `path.SUFFIX.2`, … when taken): nothing is deleted.
fn move_aside(path: &Path, suffix: &str) -> Result<PathBuf, StoreError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut to = path.with_file_name(format!("{name}.{suffix}"));
    let mut n = 2;
    while to.exists() {
        to = path.with_file_name(format!("{name}.{suffix}.{n}"));
        n += 1;
    }
    std::fs::rename(path, &to).map_err(StoreError::io(path))?;
    Ok(to)
}

impl Store {
    /// Rolls a damaged state directory back to its newest intact checkpoint: one that loads
    /// and whose digest matches the one recorded for its round (in `rounds.jsonl` or
    /// `state.json`; rounds logged without a digest only need to load). Checkpoint
    /// directories of later rounds are moved aside as `round-NNNNNN.corrupted` and stored
    /// updates of later rounds as `pending/round-NNNNNN.stale` (nothing is deleted),
    /// `rounds.jsonl` is cut after the restored round and `state.json` rewritten last, so
    /// a crash during recovery leaves a state that `recover` still repairs. Also rebuilds a
    /// missing or unreadable `state.json`. A healthy state is left as it is.
    pub fn recover(&self) -> Result<RecoverReport, StoreError> {
        let committed = self.read_committed();
        let log = self.read_log()?;
        let (previous, problem) = match &committed {
            Ok(Some(c)) => match self.verified(c.round, &c.checkpoint, Some(&c.digest)) {
                Ok(_) => {
                    return Ok(RecoverReport {
                        round: Some(c.round),
                        previous: Some(c.round),
                        ..Default::default()
                    });
                }
                Err(e) => (
                    Some(c.round),
                    format!("the checkpoint of round {} is corrupted ({e})", c.round),
                ),
            },
            Ok(None) if self.checkpoint_rounds().is_empty() => {
                return Ok(RecoverReport::default());
            }
            Ok(None) => (None, "state.json was missing".to_string()),
            Err(e) => (None, format!("state.json was unreadable ({e})")),
        };
        let committed = committed.ok().flatten();
        let known = recorded_digests(&log, committed.as_ref());
        let Some((round, model, _)) = self.newest_intact(previous, &known) else {
            return Err(StoreError::Damaged(format!(
                "cannot recover {}: {problem}, and no older checkpoint is intact to roll back \
                 to; nothing was changed. Move the state directory away to start over from the \
                 base model",
                self.dir().display()
            )));
        };
        let newest_known = [
            previous,
            log.iter().map(|r| r.round).max(),
            self.checkpoint_rounds().last().copied(),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(round);
        let mut report = RecoverReport {
            round: Some(round),
            previous,
            problem: Some(problem),
            ..Default::default()
        };
        self.move_later_rounds(round, newest_known, &mut report)?;
        report.dropped_rounds = self.cut_log(&log, round)?;
        self.write_committed(&model)?;
        Ok(report)
    }

    /// Moves aside what belongs to rounds after `round`: their checkpoints, and the updates
    /// stored for them (trained from a model that is gone; those of the next round are
    /// kept unless the state was rolled back from a round after `round`).
    fn move_later_rounds(
        &self,
        round: u64,
        newest_known: u64,
        report: &mut RecoverReport,
    ) -> Result<(), StoreError> {
        // Checkpoints go first: a crash from here on leaves state.json naming a missing or
        // damaged checkpoint, which a second `recover` repairs the same way.
        for r in self.checkpoint_rounds().into_iter().filter(|&r| r > round) {
            let from = self.checkpoint_dir(r);
            let to = move_aside(&from, "corrupted")?;
            report.moved_checkpoints.push((from, to));
        }
        fedmicse_tensors::sync_dir(&self.dir().join("checkpoints"));
        let pending = self.dir().join("pending");
        for r in rounds_in(&pending) {
            if r > round + 1 || (r == round + 1 && newest_known > round) {
                let from = pending.join(format!("round-{r:06}"));
                let to = move_aside(&from, "stale")?;
                report.moved_updates.push((from, to));
            }
        }
        fedmicse_tensors::sync_dir(&pending);
        Ok(())
    }

    /// Rewrites `rounds.jsonl` up to `round`; returns the rounds dropped from it.
    fn cut_log(&self, log: &[RoundRecord], round: u64) -> Result<Vec<u64>, StoreError> {
        let mut text = String::new();
        let mut dropped = Vec::new();
        for r in log {
            if r.round <= round {
                text.push_str(&serde_json::to_string(r).expect("json"));
                text.push('\n');
            } else {
                dropped.push(r.round);
            }
        }
        fedmicse_tensors::write_atomic(&self.dir().join("rounds.jsonl"), text.as_bytes())?;
        Ok(dropped)
    }
}
