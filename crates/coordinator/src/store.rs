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

pub struct Store {
    dir: PathBuf,
    keep: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
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
    pub fn load(&self) -> Result<Option<(GlobalModel, Vec<RoundRecord>, ServerState)>, String> {
        let state = self.dir.join("state.json");
        if !state.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&state).map_err(io(&state))?;
        let c: Committed =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", state.display()))?;
        let dir = self.dir.join("checkpoints").join(&c.checkpoint);
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
        let model = GlobalModel::new(c.round, tensors, files);
        if hex::encode(&model.digest) != c.digest {
            return Err(format!(
                "{}: checkpoint digest {} differs from the committed {} (the checkpoint is corrupted)",
                dir.display(),
                hex::encode(&model.digest),
                c.digest
            ));
        }
        let server = dir.join(SERVER_FILE);
        let server_state = if server.is_file() {
            ServerState::from_map(read_safetensors_map(&server).map_err(|e| e.to_string())?)
        } else {
            ServerState::default()
        };
        let mut history = self.read_log()?;
        history.retain(|r| r.round <= c.round);
        Ok(Some((model, history, server_state)))
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
    pub fn commit(
        &self,
        model: &GlobalModel,
        server_state: &ServerState,
        record: &RoundRecord,
        history: &[RoundRecord],
    ) -> Result<(), String> {
        let dir = self.checkpoint_dir(model.round);
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
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
            fedmicse_encoder::write_sentence_transformers_files(&tmp, &config)
                .map_err(|e| e.to_string())?;
        }
        let server = server_state.to_map();
        if !server.is_empty() {
            write_safetensors(&tmp.join(SERVER_FILE), &server).map_err(|e| e.to_string())?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        sync_dir(&self.dir.join("checkpoints"));

        // The log is rewritten whole (it is small): no torn appends to reason about.
        let mut log = String::new();
        for r in history
            .iter()
            .filter(|r| r.round < record.round)
            .chain([record])
        {
            log.push_str(&serde_json::to_string(r).expect("json"));
            log.push('\n');
        }
        write_atomic(&self.dir.join("rounds.jsonl"), log.as_bytes()).map_err(|e| e.to_string())?;

        let committed = Committed {
            round: model.round,
            checkpoint: dir.file_name().unwrap().to_string_lossy().into_owned(),
            digest: hex::encode(&model.digest),
        };
        write_atomic(
            &self.dir.join("state.json"),
            serde_json::to_string_pretty(&committed)
                .expect("json")
                .as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        self.prune(model.round);
        Ok(())
    }

    fn prune(&self, newest: u64) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("checkpoints")) else {
            return;
        };
        let mut rounds: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("round-"))
                    .and_then(|n| n.parse().ok())
            })
            .filter(|&r| r <= newest)
            .collect();
        rounds.sort_unstable();
        let excess = rounds.len().saturating_sub(self.keep);
        for r in &rounds[..excess] {
            let _ = std::fs::remove_dir_all(self.checkpoint_dir(*r));
        }
    }
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
