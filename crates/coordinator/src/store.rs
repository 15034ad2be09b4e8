//! The coordinator's durable state: one HuggingFace checkpoint per committed round, the
//! round log, and `state.json` naming the last committed round. Every file is written to a
//! temporary name, fsynced and renamed, and `state.json` is written last, so a crash at any
//! point leaves the previous commit intact.

use std::path::{Path, PathBuf};

use fedmicse_federation::ServerState;
use fedmicse_tensors::safetensors::{pt_metadata, read as read_safetensors};
use fedmicse_tensors::{HostTensor, TensorMap, sync_dir, write_atomic};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// Tensors of the training head live under this prefix, beside the encoder's.
pub const HEAD_PREFIX: &str = "mlp.";
const HEAD_FILE: &str = "training_head.safetensors";
/// Server optimizer moments (FedAvgM, FedAdam), beside the checkpoint they led to.
const SERVER_FILE: &str = "server_state.safetensors";

/// One committed round, as logged in `rounds.jsonl` (round 0 is the starting model).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub clients: u32,
    /// Mean local training loss of the round's updates, weighted by their sample counts.
    pub mean_loss: Option<f64>,
    /// Spearman ×100 of the global model on the configured dev file (STS-B dev by default).
    pub stsb_dev: Option<f64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub seconds: f64,
    /// Updates refused in this round, by check.
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Updates whose weight or norm the influence bounds reduced.
    #[serde(default)]
    pub bounded: u32,
    /// ‖W_new − W_old‖ / ‖W_old‖ over the trained tensors.
    #[serde(default)]
    pub step_ratio: Option<f64>,
    /// Hex SHA-256 of the committed model's tensors (as in `state.json`), so that any
    /// kept checkpoint can be verified when rolling back. [`Store::commit`] fills it in;
    /// absent in logs written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// The global model of a committed round.
#[derive(Debug, Clone)]
pub struct GlobalModel {
    pub round: u64,
    /// Encoder and training-head tensors under HF names.
    pub tensors: TensorMap,
    pub digest: Vec<u8>,
    /// config.json and tokenizer files, sent to agents with the weights.
    pub files: Vec<(String, Vec<u8>)>,
}

impl GlobalModel {
    pub fn new(round: u64, tensors: TensorMap, files: Vec<(String, Vec<u8>)>) -> Self {
        let digest = fedmicse_wire::digest(&tensors);
        GlobalModel {
            round,
            tensors,
            digest,
            files,
        }
    }

    /// The encoder's tensors (without the training head).
    pub fn encoder_tensors(&self) -> TensorMap {
        self.tensors
            .iter()
            .filter(|(n, _)| !n.starts_with(HEAD_PREFIX))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    }

    pub fn head_tensors(&self) -> TensorMap {
        self.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(HEAD_PREFIX))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    }
}

/// `state.json`: the last committed round and its checkpoint's digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Committed {
    pub round: u64,
    pub checkpoint: String,
    pub digest: String,
}

/// The command that rolls a damaged state directory back, as errors name it.
pub const RECOVER_COMMAND: &str = "fedmicse coordinator --config FILE --recover";

pub struct Store {
    dir: PathBuf,
    keep: usize,
    /// Written beside every checkpoint so other tools read it as the runtime does
    /// (sentence-transformers' module list and pooling); not part of the model.
    export_files: Vec<(String, Vec<u8>)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    StoreError::io(path)
}

/// The round of a `round-NNNNNN` directory name (not of `.partial`, `.corrupted`, `.stale`).
fn round_of(name: &str) -> Option<u64> {
    name.strip_prefix("round-")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
}

/// The rounds of the `round-NNNNNN` directories in `dir`, ascending.
pub(crate) fn rounds_in(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut rounds: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(round_of))
        .collect();
    rounds.sort_unstable();
    rounds
}

/// The digest recorded for each committed round: `Some(hex)`, or `None` for rounds logged
/// before digests were recorded. `state.json` vouches for its own round.
pub(crate) fn recorded_digests(
    log: &[RoundRecord],
    committed: Option<&Committed>,
) -> std::collections::BTreeMap<u64, Option<String>> {
    let mut known: std::collections::BTreeMap<u64, Option<String>> =
        log.iter().map(|r| (r.round, r.digest.clone())).collect();
    if let Some(c) = committed {
        known.insert(c.round, Some(c.digest.clone()));
    }
    known
}

impl Store {
    pub fn open(dir: &Path, keep: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir.join("checkpoints")).map_err(io(dir))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
            export_files: Vec::new(),
        })
    }

    /// The store, writing `files` (relative path, bytes) beside every checkpoint it commits.
    pub fn with_export_files(mut self, files: Vec<(String, Vec<u8>)>) -> Self {
        self.export_files = files;
        self
    }

    /// The state directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn checkpoint_dir(&self, round: u64) -> PathBuf {
        self.dir
            .join("checkpoints")
            .join(format!("round-{round:06}"))
    }

    /// The last committed model, the round log up to it and the server optimizer's state,
    /// if the store has a commit.
    ///
    /// A damaged state is an error that names the problem and the way back: a corrupted
    /// (unreadable, truncated, missing or altered) committed checkpoint or `state.json`,
    /// or a missing `state.json` beside existing checkpoints. Never a silent fresh start.
    pub fn load(&self) -> Result<Option<(GlobalModel, Vec<RoundRecord>, ServerState)>, StoreError> {
        let c = match self.read_committed() {
            Ok(Some(c)) => c,
            Ok(None) if self.checkpoint_rounds().is_empty() => return Ok(None),
            Ok(None) => {
                let known = recorded_digests(&self.read_log()?, None);
                let state = self.dir.join("state.json");
                return Err(StoreError::Damaged(
                    match self.newest_intact(None, &known) {
                        Some((r, ..)) => format!(
                            "{}: state.json is missing but checkpoints exist (newest intact: round \
                         {r}); run `{RECOVER_COMMAND}` to rebuild state.json from them, or move \
                         the state directory {} away to start over",
                            state.display(),
                            self.dir.display()
                        ),
                        None => format!(
                            "{}: state.json is missing and none of the checkpoints beside it is \
                         intact; move the state directory {} away to start over",
                            state.display(),
                            self.dir.display()
                        ),
                    },
                ));
            }
            Err(e) => {
                let known = recorded_digests(&self.read_log()?, None);
                return Err(StoreError::Damaged(format!(
                    "{e} (state.json is corrupted); {}",
                    self.way_back(None, &known)
                )));
            }
        };
        let log = self.read_log()?;
        match self.verified(c.round, &c.checkpoint, Some(&c.digest)) {
            Ok((model, server_state)) => {
                let mut history = log;
                history.retain(|r| r.round <= c.round);
                Ok(Some((model, history, server_state)))
            }
            Err(e) => {
                let known = recorded_digests(&log, Some(&c));
                Err(StoreError::Damaged(format!(
                    "the checkpoint of round {} is corrupted ({e}); {}",
                    c.round,
                    self.way_back(Some(c.round), &known)
                )))
            }
        }
    }

    /// `state.json`, if there is one (an error when it cannot be read or parsed).
    pub(crate) fn read_committed(&self) -> Result<Option<Committed>, StoreError> {
        let state = self.dir.join("state.json");
        if !state.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&state).map_err(io(&state))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", state.display())))
    }

    pub(crate) fn write_committed(&self, model: &GlobalModel) -> Result<(), StoreError> {
        let committed = Committed {
            round: model.round,
            checkpoint: format!("round-{:06}", model.round),
            digest: hex::encode(&model.digest),
        };
        write_atomic(
            &self.dir.join("state.json"),
            serde_json::to_string_pretty(&committed)
                .expect("json")
                .as_bytes(),
        )?;
        Ok(())
    }

    /// Rounds with a checkpoint directory (`round-NNNNNN`; `.partial` and `.corrupted`
    /// ones do not count), ascending.
    pub(crate) fn checkpoint_rounds(&self) -> Vec<u64> {
        rounds_in(&self.dir.join("checkpoints"))
    }

    /// Reads the checkpoint `checkpoints/NAME` of `round` and checks its digest against
    /// `digest` (hex) when one is given.
    pub(crate) fn verified(
        &self,
        round: u64,
        name: &str,
        digest: Option<&str>,
    ) -> Result<(GlobalModel, ServerState), StoreError> {
        let dir = self.dir.join("checkpoints").join(name);
        if !dir.is_dir() {
            return Err(StoreError::Invalid(format!(
                "{}: checkpoint directory missing",
                dir.display()
            )));
        }
        // Written by `commit` under the model's own (HF) names: no renaming to undo.
        let mut tensors = read_safetensors(&dir.join("model.safetensors"))?;
        let head = dir.join(HEAD_FILE);
        if head.is_file() {
            tensors.extend(read_safetensors(&head)?);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let p = entry.map_err(io(&dir))?.path();
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let metadata = self.export_files.iter().any(|(n, _)| *n == name);
            if (name.ends_with(".json") || name == "vocab.txt") && !metadata {
                files.push((name, std::fs::read(&p).map_err(io(&p))?));
            }
        }
        files.sort();
        let model = GlobalModel::new(round, tensors, files);
        if let Some(want) = digest
            && hex::encode(&model.digest) != want
        {
            return Err(StoreError::Invalid(format!(
                "{}: checkpoint digest {} differs from the committed {}",
                dir.display(),
                hex::encode(&model.digest),
                want
            )));
        }
        let server = dir.join(SERVER_FILE);
        let server_state = if server.is_file() {
            ServerState::from_map(read_safetensors(&server)?)
        } else {
            ServerState::default()
        };
        Ok((model, server_state))
    }

    /// The newest intact checkpoint of a round below `below` (of any round when None): it
    /// loads and matches the digest `known` records for its round. Rounds `known` lacks
    /// were never committed and do not count, unless nothing is known at all (no log).
    pub(crate) fn newest_intact(
        &self,
        below: Option<u64>,
        known: &std::collections::BTreeMap<u64, Option<String>>,
    ) -> Option<(u64, GlobalModel, ServerState)> {
        for r in self.checkpoint_rounds().into_iter().rev() {
            if below.is_some_and(|b| r >= b) {
                continue;
            }
            let digest = match known.get(&r) {
                Some(d) => d.as_deref(),
                None if known.is_empty() => None,
                None => continue,
            };
            match self.verified(r, &format!("round-{r:06}"), digest) {
                Ok((model, server)) => return Some((r, model, server)),
                Err(e) => tracing::debug!(round = r, error = %e, "checkpoint not intact"),
            }
        }
        None
    }

    /// How to get out of a damaged state: roll back to the newest intact checkpoint below
    /// `below`, or start over.
    fn way_back(
        &self,
        below: Option<u64>,
        known: &std::collections::BTreeMap<u64, Option<String>>,
    ) -> String {
        match self.newest_intact(below, known) {
            Some((r, ..)) => format!(
                "the newest intact checkpoint is round {r}: run `{RECOVER_COMMAND}` to roll \
                 back to it (damaged checkpoints are moved aside as round-NNNNNN.corrupted, \
                 nothing is deleted), or move the state directory {} away to start over",
                self.dir.display()
            ),
            None => format!(
                "no intact checkpoint is left to roll back to: move the state directory {} \
                 away to start over from the base model",
                self.dir.display()
            ),
        }
    }

    pub(crate) fn read_log(&self) -> Result<Vec<RoundRecord>, StoreError> {
        let path = self.dir.join("rounds.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(Vec::new());
        };
        // A torn last line (crash while appending) is ignored; it belongs to no commit.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Commits `model` with its record: checkpoint directory, round log, then state.json.
    /// Returns the record as logged, with the model's digest filled in (earlier records of
    /// `history` without one keep the digest the log already holds for their round).
    pub fn commit(
        &self,
        model: &GlobalModel,
        server_state: &ServerState,
        record: &RoundRecord,
        history: &[RoundRecord],
    ) -> Result<RoundRecord, StoreError> {
        let dir = self.checkpoint_dir(model.round);
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        // A failed write (a full disk) leaves nothing behind that keeps the disk full.
        if let Err(e) = write_checkpoint(&tmp, model, server_state, &self.export_files) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        sync_dir(&self.dir.join("checkpoints"));

        // The log is rewritten whole (it is small): no torn appends to reason about.
        let mut record = record.clone();
        record.digest = Some(hex::encode(&model.digest));
        let logged: std::collections::BTreeMap<u64, String> = self
            .read_log()?
            .into_iter()
            .filter_map(|r| Some((r.round, r.digest?)))
            .collect();
        let mut log = String::new();
        for r in history.iter().filter(|r| r.round < record.round) {
            let mut r = r.clone();
            if r.digest.is_none() {
                r.digest = logged.get(&r.round).cloned();
            }
            log.push_str(&serde_json::to_string(&r).expect("json"));
            log.push('\n');
        }
        log.push_str(&serde_json::to_string(&record).expect("json"));
        log.push('\n');
        write_atomic(&self.dir.join("rounds.jsonl"), log.as_bytes())?;

        self.write_committed(model)?;
        self.prune(model.round);
        Ok(record)
    }

    /// Deletes all but the `keep` newest checkpoints up to `newest`. Directories moved
    /// aside (`.corrupted`) and unfinished ones (`.partial`) are not checkpoints here.
    fn prune(&self, newest: u64) {
        let rounds: Vec<u64> = self
            .checkpoint_rounds()
            .into_iter()
            .filter(|&r| r <= newest)
            .collect();
        let excess = rounds.len().saturating_sub(self.keep);
        for r in &rounds[..excess] {
            let _ = std::fs::remove_dir_all(self.checkpoint_dir(*r));
        }
    }
}

/// Writes a checkpoint directory's files (model, head, model files, export files, server
/// optimizer state) into `tmp`.
fn write_checkpoint(
    tmp: &Path,
    model: &GlobalModel,
    server_state: &ServerState,
    export_files: &[(String, Vec<u8>)],
) -> Result<(), StoreError> {
    std::fs::create_dir_all(tmp).map_err(io(tmp))?;
    let write = |path: &Path, tensors: &TensorMap| {
        fedmicse_tensors::safetensors::write(path, tensors, &pt_metadata())
    };
    write(&tmp.join("model.safetensors"), &model.encoder_tensors())?;
    let head = model.head_tensors();
    if !head.is_empty() {
        write(&tmp.join(HEAD_FILE), &head)?;
    }
    for (name, bytes) in model.files.iter().chain(export_files) {
        let path = tmp.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        write_atomic(&path, bytes)?;
    }
    let server = server_state.to_map();
    if !server.is_empty() {
        write(&tmp.join(SERVER_FILE), &server)?;
    }
    Ok(())
}

/// A seeded training head (`mlp.dense.*`, normal(0, 0.02), zero bias) for a model that has
/// none yet, so every agent starts the federation from the same head.
pub fn seeded_head(hidden: usize, seed: u64) -> TensorMap {
    use rand::SeedableRng;
    use rand_distr_like::normal;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<f32> = (0..hidden * hidden)
        .map(|_| normal(&mut rng) * 0.02)
        .collect();
    TensorMap::from([
        (
            "mlp.dense.weight".to_string(),
            HostTensor::new(vec![hidden, hidden], w),
        ),
        (
            "mlp.dense.bias".to_string(),
            HostTensor::new(vec![hidden], vec![0.0; hidden]),
        ),
    ])
}

mod rand_distr_like {
    /// A standard normal draw (Box–Muller).
    pub fn normal(rng: &mut impl rand::Rng) -> f32 {
        let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
