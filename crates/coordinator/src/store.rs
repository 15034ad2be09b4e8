//! The coordinator's durable state: one HuggingFace checkpoint per committed round, the
//! round log, and `state.json` naming the last committed round. Every file is written to a
//! temporary name, fsynced and renamed, and `state.json` is written last, so a crash at any
//! point leaves the previous commit intact.

use std::path::{Path, PathBuf};

use fedmicse_encoder::weights::{
    read_checkpoint, read_safetensors_map, write_atomic, write_safetensors,
};
use fedmicse_encoder::{HostTensor, TensorMap};
use fedmicse_federation::ServerState;
use serde::{Deserialize, Serialize};

/// Tensors of the training head live under this prefix, beside the encoder's.
pub const HEAD_PREFIX: &str = "mlp.";
const HEAD_FILE: &str = "training_head.safetensors";
/// Server optimizer moments (FedAvgM, FedAdam), beside the checkpoint they led to.
const SERVER_FILE: &str = "server_state.safetensors";

/// One committed round, as logged in `rounds.jsonl` (round 0 is the starting model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Committed {
    round: u64,
    checkpoint: String,
    digest: String,
}

/// The command that rolls a damaged state directory back, as errors name it.
pub const RECOVER_COMMAND: &str = "fedmicse coordinator --config FILE --recover";

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

pub struct Store {
    dir: PathBuf,
    keep: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

/// The round of a `round-NNNNNN` directory name (not of `.partial`, `.corrupted`, `.stale`).
fn round_of(name: &str) -> Option<u64> {
    name.strip_prefix("round-")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
}

/// The rounds of the `round-NNNNNN` directories in `dir`, ascending.
fn rounds_in(dir: &Path) -> Vec<u64> {
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

/// `path` renamed to `path.SUFFIX` (or `path.SUFFIX.2`, … when taken): nothing is deleted.
fn move_aside(path: &Path, suffix: &str) -> Result<PathBuf, String> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut to = path.with_file_name(format!("{name}.{suffix}"));
    let mut n = 2;
    while to.exists() {
        to = path.with_file_name(format!("{name}.{suffix}.{n}"));
        n += 1;
    }
    std::fs::rename(path, &to).map_err(io(path))?;
    Ok(to)
}

/// The digest recorded for each committed round: `Some(hex)`, or `None` for rounds logged
/// before digests were recorded. `state.json` vouches for its own round.
fn recorded_digests(
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
    pub fn open(dir: &Path, keep: usize) -> Result<Self, String> {
        std::fs::create_dir_all(dir.join("checkpoints")).map_err(io(dir))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
        })
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
    pub fn load(&self) -> Result<Option<(GlobalModel, Vec<RoundRecord>, ServerState)>, String> {
        let c = match self.read_committed() {
            Ok(Some(c)) => c,
            Ok(None) if self.checkpoint_rounds().is_empty() => return Ok(None),
            Ok(None) => {
                let known = recorded_digests(&self.read_log()?, None);
                let state = self.dir.join("state.json");
                return Err(match self.newest_intact(None, &known) {
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
                });
            }
            Err(e) => {
                let known = recorded_digests(&self.read_log()?, None);
                return Err(format!(
                    "{e} (state.json is corrupted); {}",
                    self.way_back(None, &known)
                ));
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
                Err(format!(
                    "the checkpoint of round {} is corrupted ({e}); {}",
                    c.round,
                    self.way_back(Some(c.round), &known)
                ))
            }
        }
    }

    /// Rolls a damaged state directory back to its newest intact checkpoint: one that loads
    /// and whose digest matches the one recorded for its round (in `rounds.jsonl` or
    /// `state.json`; rounds logged without a digest only need to load). Checkpoint
    /// directories of later rounds are moved aside as `round-NNNNNN.corrupted` and stored
    /// updates of later rounds as `pending/round-NNNNNN.stale` (nothing is deleted),
    /// `rounds.jsonl` is cut after the restored round and `state.json` rewritten last, so
    /// a crash during recovery leaves a state that `recover` still repairs. Also rebuilds a
    /// missing or unreadable `state.json`. A healthy state is left as it is.
    pub fn recover(&self) -> Result<RecoverReport, String> {
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
            return Err(format!(
                "cannot recover {}: {problem}, and no older checkpoint is intact to roll back \
                 to; nothing was changed. Move the state directory away to start over from the \
                 base model",
                self.dir.display()
            ));
        };
        let on_disk = self.checkpoint_rounds();
        let newest_known = [
            previous,
            log.iter().map(|r| r.round).max(),
            on_disk.last().copied(),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(round);

        // Checkpoints of later rounds (damaged, or never committed) go aside first: a crash
        // from here on leaves state.json naming a missing or damaged checkpoint, which a
        // second `recover` repairs the same way.
        let mut report = RecoverReport {
            round: Some(round),
            previous,
            problem: Some(problem),
            ..Default::default()
        };
        for r in on_disk.into_iter().filter(|&r| r > round) {
            let from = self.checkpoint_dir(r);
            let to = move_aside(&from, "corrupted")?;
            report.moved_checkpoints.push((from, to));
        }
        sync_dir(&self.dir.join("checkpoints"));
        // Updates stored for a later round were trained from a model that is gone (those of
        // the next round are kept unless the state was rolled back).
        let pending = self.dir.join("pending");
        for r in rounds_in(&pending) {
            if r > round + 1 || (r == round + 1 && newest_known > round) {
                let from = pending.join(format!("round-{r:06}"));
                let to = move_aside(&from, "stale")?;
                report.moved_updates.push((from, to));
            }
        }
        sync_dir(&pending);

        let mut text = String::new();
        for r in &log {
            if r.round <= round {
                text.push_str(&serde_json::to_string(r).expect("json"));
                text.push('\n');
            } else {
                report.dropped_rounds.push(r.round);
            }
        }
        write_atomic(&self.dir.join("rounds.jsonl"), text.as_bytes()).map_err(|e| e.to_string())?;
        self.write_committed(&model)?;
        Ok(report)
    }

    /// `state.json`, if there is one (an error when it cannot be read or parsed).
    fn read_committed(&self) -> Result<Option<Committed>, String> {
        let state = self.dir.join("state.json");
        if !state.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&state).map_err(io(&state))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", state.display()))
    }

    fn write_committed(&self, model: &GlobalModel) -> Result<(), String> {
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
        )
        .map_err(|e| e.to_string())
    }

    /// Rounds with a checkpoint directory (`round-NNNNNN`; `.partial` and `.corrupted`
    /// ones do not count), ascending.
    fn checkpoint_rounds(&self) -> Vec<u64> {
        rounds_in(&self.dir.join("checkpoints"))
    }

    /// Reads the checkpoint `checkpoints/NAME` of `round` and checks its digest against
    /// `digest` (hex) when one is given.
    fn verified(
        &self,
        round: u64,
        name: &str,
        digest: Option<&str>,
    ) -> Result<(GlobalModel, ServerState), String> {
        let dir = self.dir.join("checkpoints").join(name);
        if !dir.is_dir() {
            return Err(format!("{}: checkpoint directory missing", dir.display()));
        }
        let mut tensors =
            read_checkpoint(&dir.join("model.safetensors")).map_err(|e| e.to_string())?;
        let head = dir.join(HEAD_FILE);
        if head.is_file() {
            tensors.extend(read_safetensors_map(&head).map_err(|e| e.to_string())?);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let p = entry.map_err(io(&dir))?.path();
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let metadata = fedmicse_encoder::SENTENCE_TRANSFORMERS_FILES.contains(&name.as_str());
            if (name.ends_with(".json") || name == "vocab.txt") && !metadata {
                files.push((name, std::fs::read(&p).map_err(io(&p))?));
            }
        }
        files.sort();
        let model = GlobalModel::new(round, tensors, files);
        if let Some(want) = digest
            && hex::encode(&model.digest) != want
        {
            return Err(format!(
                "{}: checkpoint digest {} differs from the committed {}",
                dir.display(),
                hex::encode(&model.digest),
                want
            ));
        }
        let server = dir.join(SERVER_FILE);
        let server_state = if server.is_file() {
            ServerState::from_map(read_safetensors_map(&server).map_err(|e| e.to_string())?)
        } else {
            ServerState::default()
        };
        Ok((model, server_state))
    }

    /// The newest intact checkpoint of a round below `below` (of any round when None): it
    /// loads and matches the digest `known` records for its round. Rounds `known` lacks
    /// were never committed and do not count, unless nothing is known at all (no log).
    fn newest_intact(
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

    fn read_log(&self) -> Result<Vec<RoundRecord>, String> {
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
    ) -> Result<RoundRecord, String> {
        let dir = self.checkpoint_dir(model.round);
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        // A failed write (a full disk) leaves nothing behind that keeps the disk full.
        if let Err(e) = write_checkpoint(&tmp, model, server_state) {
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
        write_atomic(&self.dir.join("rounds.jsonl"), log.as_bytes()).map_err(|e| e.to_string())?;

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

/// Writes a checkpoint directory's files (model, head, model files, sentence-transformers
/// metadata, server optimizer state) into `tmp`.
fn write_checkpoint(
    tmp: &Path,
    model: &GlobalModel,
    server_state: &ServerState,
) -> Result<(), String> {
    std::fs::create_dir_all(tmp).map_err(io(tmp))?;
    write_safetensors(&tmp.join("model.safetensors"), &model.encoder_tensors())
        .map_err(|e| e.to_string())?;
    let head = model.head_tensors();
    if !head.is_empty() {
        write_safetensors(&tmp.join(HEAD_FILE), &head).map_err(|e| e.to_string())?;
    }
    for (name, bytes) in &model.files {
        write_atomic(&tmp.join(name), bytes).map_err(|e| e.to_string())?;
    }
    // So that `SentenceTransformer(checkpoint)` pools [CLS] like the coordinator does.
    if let Some((_, bytes)) = model.files.iter().find(|(n, _)| n == "config.json") {
        let text = String::from_utf8_lossy(bytes);
        let config = fedmicse_encoder::BertConfig::from_json(&text, &tmp.join("config.json"))
            .map_err(|e| e.to_string())?;
        fedmicse_encoder::write_sentence_transformers_files(tmp, &config)
            .map_err(|e| e.to_string())?;
    }
    let server = server_state.to_map();
    if !server.is_empty() {
        write_safetensors(&tmp.join(SERVER_FILE), &server).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
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
mod tests {
    use super::*;

    fn model(round: u64) -> GlobalModel {
        let v = round as f32;
        let tensors = TensorMap::from([
            (
                "embeddings.word_embeddings.weight".to_string(),
                HostTensor::new(vec![4, 3], (0..12).map(|i| i as f32 * 0.5 + v).collect()),
            ),
            (
                "mlp.dense.bias".to_string(),
                HostTensor::new(vec![3], vec![v; 3]),
            ),
        ]);
        GlobalModel::new(round, tensors, Vec::new())
    }

    fn server(round: u64) -> ServerState {
        ServerState {
            m: TensorMap::from([(
                "mlp.dense.bias".to_string(),
                HostTensor::new(vec![3], vec![round as f32 + 0.25; 3]),
            )]),
            v: TensorMap::new(),
        }
    }

    fn record(round: u64) -> RoundRecord {
        RoundRecord {
            round,
            clients: 2,
            mean_loss: Some(1.0 / (round + 1) as f64),
            stsb_dev: None,
            bytes_up: 10,
            bytes_down: 20,
            seconds: 1.0,
            refused: Default::default(),
            bounded: 0,
            step_ratio: None,
            digest: None,
        }
    }

    /// Rounds 0..=`newest` committed the way the coordinator commits them (its history
    /// keeps the records it built, without digests).
    fn committed(dir: &Path, newest: u64, keep: usize) -> (Store, Vec<GlobalModel>) {
        let store = Store::open(dir, keep).unwrap();
        let mut history = Vec::new();
        let mut models = Vec::new();
        for r in 0..=newest {
            let m = model(r);
            let rec = record(r);
            let logged = store.commit(&m, &server(r), &rec, &history).unwrap();
            assert_eq!(logged.digest, Some(hex::encode(&m.digest)));
            history.push(rec);
            models.push(m);
        }
        (store, models)
    }

    fn state_round(dir: &Path) -> u64 {
        let c: Committed =
            serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
        c.round
    }

    fn log_rounds(dir: &Path) -> Vec<u64> {
        std::fs::read_to_string(dir.join("rounds.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<RoundRecord>(l).unwrap().round)
            .collect()
    }

    fn load_err(store: &Store) -> String {
        match store.load() {
            Ok(Some((m, ..))) => panic!("loaded round {} but should not", m.round),
            Ok(None) => panic!("loaded nothing (a silent fresh start) but should fail"),
            Err(e) => e,
        }
    }

    fn truncate(path: &Path) {
        let len = std::fs::metadata(path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len / 2).unwrap();
    }

    /// Alters tensor data and leaves the file a valid safetensors file.
    fn flip_data(path: &Path) {
        let mut bytes = std::fs::read(path).unwrap();
        let n = bytes.len();
        bytes[n - 4] ^= 0x5a;
        std::fs::write(path, &bytes).unwrap();
        fedmicse_encoder::weights::read_checkpoint(path).expect("still parseable");
    }

    /// Round 3 is damaged by `damage`: loading names it corrupted and the way back; recovery
    /// rolls back to round 2, which then loads as committed.
    fn rolls_back_to_round_2(damage: fn(&Path)) {
        let dir = tempfile::tempdir().unwrap();
        let (store, models) = committed(dir.path(), 3, 5);
        damage(&store.checkpoint_dir(3).join("model.safetensors"));
        // Updates accepted for round 4 were trained from the damaged round 3.
        let stale = dir.path().join("pending/round-000004");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("a.safetensors"), b"update").unwrap();

        let err = load_err(&store);
        assert!(err.contains("round 3 is corrupted"), "{err}");
        assert!(err.contains("newest intact checkpoint is round 2"), "{err}");
        assert!(err.contains(RECOVER_COMMAND), "{err}");

        let report = store.recover().unwrap();
        assert!(report.changed());
        assert_eq!(report.round, Some(2));
        assert_eq!(report.previous, Some(3));
        assert_eq!(report.dropped_rounds, vec![3]);
        let aside = dir.path().join("checkpoints/round-000003.corrupted");
        assert_eq!(
            report.moved_checkpoints,
            vec![(store.checkpoint_dir(3), aside.clone())]
        );
        assert_eq!(
            report.moved_updates,
            vec![(stale.clone(), dir.path().join("pending/round-000004.stale"))]
        );
        let text = report.to_string();
        assert!(
            text.contains(
                "rolled back from round 3 to round 2; rounds 3 dropped from the log; \
                 checkpoints/round-000003 moved to round-000003.corrupted"
            ),
            "{text}"
        );
        assert!(aside.is_dir(), "nothing deleted");
        assert!(!stale.exists());
        assert_eq!(state_round(dir.path()), 2);
        assert_eq!(log_rounds(dir.path()), vec![0, 1, 2]);

        let (got, history, server_state) = store.load().unwrap().unwrap();
        assert_eq!(got.round, 2);
        assert_eq!(got.tensors, models[2].tensors);
        assert_eq!(got.digest, models[2].digest);
        assert_eq!(server_state, server(2));
        assert_eq!(history.len(), 3);
        assert_eq!(history[2].digest, Some(hex::encode(&models[2].digest)));

        // Healthy now: a second recovery changes nothing.
        let again = store.recover().unwrap();
        assert!(!again.changed(), "{again}");
        assert_eq!(again.round, Some(2));
    }

    #[test]
    fn truncated_checkpoint_is_corrupted_and_recovers_to_the_previous_round() {
        rolls_back_to_round_2(truncate);
    }

    #[test]
    fn altered_checkpoint_is_corrupted_and_recovers_to_the_previous_round() {
        rolls_back_to_round_2(flip_data);
    }

    #[test]
    fn missing_checkpoint_file_is_corrupted() {
        rolls_back_to_round_2(|model| std::fs::remove_file(model).unwrap());
    }

    #[test]
    fn missing_checkpoint_directory_is_corrupted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, models) = committed(dir.path(), 3, 5);
        std::fs::remove_dir_all(store.checkpoint_dir(3)).unwrap();
        let err = load_err(&store);
        assert!(err.contains("checkpoint directory missing"), "{err}");
        assert!(err.contains("round 3 is corrupted"), "{err}");
        assert!(err.contains("newest intact checkpoint is round 2"), "{err}");
        let report = store.recover().unwrap();
        assert_eq!(report.round, Some(2));
        assert!(report.moved_checkpoints.is_empty());
        assert_eq!(store.load().unwrap().unwrap().0.tensors, models[2].tensors);
    }

    #[test]
    fn every_logged_round_carries_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (_, models) = committed(dir.path(), 3, 5);
        let text = std::fs::read_to_string(dir.path().join("rounds.jsonl")).unwrap();
        let logged: Vec<RoundRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(logged.len(), 4);
        for (r, m) in logged.iter().zip(&models) {
            assert_eq!(r.digest, Some(hex::encode(&m.digest)), "round {}", r.round);
        }
        // Records without a digest (logs of older versions) still parse, and are written
        // without the field.
        let json = serde_json::to_string(&record(1)).unwrap();
        assert!(!json.contains("digest"), "{json}");
        let parsed: RoundRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, record(1));
    }

    #[test]
    fn an_older_checkpoint_that_differs_from_its_logged_digest_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (store, models) = committed(dir.path(), 3, 5);
        truncate(&store.checkpoint_dir(3).join("model.safetensors"));
        flip_data(&store.checkpoint_dir(2).join("model.safetensors"));
        let err = load_err(&store);
        assert!(err.contains("newest intact checkpoint is round 1"), "{err}");
        let report = store.recover().unwrap();
        assert_eq!(report.round, Some(1));
        assert_eq!(report.dropped_rounds, vec![2, 3]);
        assert_eq!(report.moved_checkpoints.len(), 2);
        assert!(
            dir.path()
                .join("checkpoints/round-000002.corrupted")
                .is_dir()
        );
        let (got, history, _) = store.load().unwrap().unwrap();
        assert_eq!(got.tensors, models[1].tensors);
        assert_eq!(history.len(), 2);
    }

    #[test]
    fn rounds_logged_without_a_digest_only_need_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let (store, models) = committed(dir.path(), 3, 5);
        // A log as written before digests were recorded.
        let log = dir.path().join("rounds.jsonl");
        let text: String = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| {
                let mut r: RoundRecord = serde_json::from_str(l).unwrap();
                r.digest = None;
                serde_json::to_string(&r).unwrap() + "\n"
            })
            .collect();
        std::fs::write(&log, text).unwrap();
        flip_data(&store.checkpoint_dir(3).join("model.safetensors"));
        let err = load_err(&store);
        assert!(err.contains("newest intact checkpoint is round 2"), "{err}");
        assert_eq!(store.recover().unwrap().round, Some(2));
        assert_eq!(store.load().unwrap().unwrap().0.tensors, models[2].tensors);
    }

    #[test]
    fn missing_state_json_beside_checkpoints_is_an_error_and_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let (store, models) = committed(dir.path(), 3, 5);
        std::fs::remove_file(dir.path().join("state.json")).unwrap();
        let err = load_err(&store);
        assert!(
            err.contains("state.json is missing but checkpoints exist (newest intact: round 3)"),
            "{err}"
        );
        assert!(err.contains(RECOVER_COMMAND), "{err}");
        assert!(err.contains("to start over"), "{err}");

        let report = store.recover().unwrap();
        assert!(report.changed());
        assert_eq!(report.round, Some(3));
        assert_eq!(report.previous, None);
        assert!(report.dropped_rounds.is_empty());
        assert!(report.moved_checkpoints.is_empty());
        assert!(
            report.to_string().contains("rebuilt state.json at round 3"),
            "{report}"
        );
        let (got, history, server_state) = store.load().unwrap().unwrap();
        assert_eq!(got.round, 3);
        assert_eq!(got.tensors, models[3].tensors);
        assert_eq!(server_state, server(3));
        assert_eq!(history.len(), 4);
    }

    #[test]
    fn missing_state_json_and_a_damaged_newest_checkpoint_rebuild_at_the_older_round() {
        let dir = tempfile::tempdir().unwrap();
        let (store, models) = committed(dir.path(), 3, 5);
        std::fs::remove_file(dir.path().join("state.json")).unwrap();
        truncate(&store.checkpoint_dir(3).join("model.safetensors"));
        let err = load_err(&store);
        assert!(err.contains("newest intact: round 2"), "{err}");
        let report = store.recover().unwrap();
        assert_eq!(report.round, Some(2));
        assert_eq!(report.dropped_rounds, vec![3]);
        assert!(
            dir.path()
                .join("checkpoints/round-000003.corrupted")
                .is_dir()
        );
        assert_eq!(store.load().unwrap().unwrap().0.tensors, models[2].tensors);
    }

    #[test]
    fn unreadable_state_json_is_corrupted_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = committed(dir.path(), 2, 5);
        std::fs::write(dir.path().join("state.json"), b"{\"round\": 2, \"chec").unwrap();
        let err = load_err(&store);
        assert!(err.contains("state.json is corrupted"), "{err}");
        assert!(err.contains("newest intact checkpoint is round 2"), "{err}");
        assert_eq!(store.recover().unwrap().round, Some(2));
        assert_eq!(store.load().unwrap().unwrap().0.round, 2);
    }

    #[test]
    fn nothing_intact_is_an_error_that_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = committed(dir.path(), 2, 5);
        for r in 0..=2 {
            truncate(&store.checkpoint_dir(r).join("model.safetensors"));
        }
        let err = load_err(&store);
        assert!(err.contains("corrupted"), "{err}");
        assert!(err.contains("no intact checkpoint is left"), "{err}");
        assert!(err.contains("start over"), "{err}");
        let err = store.recover().unwrap_err();
        assert!(err.contains("no older checkpoint is intact"), "{err}");
        assert!(err.contains("nothing was changed"), "{err}");
        assert!(err.contains("start over"), "{err}");
        assert_eq!(state_round(dir.path()), 2);
        assert_eq!(log_rounds(dir.path()), vec![0, 1, 2]);
        assert!(store.checkpoint_dir(2).is_dir());

        // The same without state.json.
        std::fs::remove_file(dir.path().join("state.json")).unwrap();
        let err = load_err(&store);
        assert!(err.contains("none of the checkpoints"), "{err}");
        assert!(store.recover().is_err());
    }

    #[test]
    fn an_empty_store_is_a_fresh_start_and_needs_no_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 5).unwrap();
        assert!(store.load().unwrap().is_none());
        let report = store.recover().unwrap();
        assert!(!report.changed());
        assert_eq!(report.round, None);
        // Unfinished or moved-aside checkpoint directories alone are not a commit.
        std::fs::create_dir_all(dir.path().join("checkpoints/round-000001.partial")).unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoints/round-000002.corrupted")).unwrap();
        assert!(store.load().unwrap().is_none());
    }

    #[test]
    fn prune_keeps_checkpoints_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = committed(dir.path(), 3, 2);
        flip_data(&store.checkpoint_dir(3).join("model.safetensors"));
        assert_eq!(store.recover().unwrap().round, Some(2));
        let (mut global, mut history, _) = store.load().unwrap().unwrap();
        for r in 3..=6 {
            global = GlobalModel::new(r, model(r).tensors, global.files.clone());
            let rec = record(r);
            store.commit(&global, &server(r), &rec, &history).unwrap();
            history.push(rec);
        }
        let mut left: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["round-000003.corrupted", "round-000005", "round-000006"]
        );
        assert_eq!(log_rounds(dir.path()), (0..=6).collect::<Vec<_>>());
        assert!(store.load().unwrap().is_some());
    }
}
