//! The model runtime as the federation sees it.
//!
//! Agents and the coordinator move weights around and decide what to train; computing
//! with a model is someone else's job. This crate names that job in small types and a
//! trait, so the federation crates build and test without burn:
//!
//! - [`Pooling`] and [`EmbedOptions`]: how sentence vectors are read off a model.
//! - [`LocalTrainer`]: train from given weights on a shard of sentences and hand back
//!   the trained weights. `fedmicse_training::BurnTrainer` is the real one; tests of agent
//!   logic use a fake that answers in microseconds.
//! - [`ModelRuntime`], [`ModelTemplate`] and [`Embedder`]: open a checkpoint directory,
//!   build embedders from weights, embed sentences. The coordinator serves and evaluates
//!   through them; `fedmicse_encoder::BurnRuntime` is the real one.
//! - [`sts`]: STS files, Spearman, and the evaluation of any [`Embedder`].
//!
//! Dependency direction: `tensors` ← `federation` ← `runtime` ← `agent`, `coordinator`;
//! the binary wires the burn implementations in.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub mod sts;

use fedmicse_federation::TaskConfig;
use fedmicse_tensors::TensorMap;

/// How a sentence vector is read off the last hidden state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The `[CLS]` token's hidden state (miCSE's embedding).
    #[default]
    Cls,
    /// Attention-masked mean over the real tokens (sentence-transformers).
    Mean,
    /// BERT's pooler, `tanh(W h_cls + b)`; needs the checkpoint's pooler weights.
    Pooler,
}

impl FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            "pooler" => Ok(Pooling::Pooler),
            other => Err(format!(
                "unknown pooling {other:?}: expected cls, mean or pooler"
            )),
        }
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
            Pooling::Pooler => "pooler",
        })
    }
}

/// Where a model computes: `cpu`, `flex` (burn's pure-Rust CPU backend, when built with
/// it), `cuda` or `cuda:N`. Written the same way in configuration files and flags; an
/// unknown name is refused when the file is read, not at the first kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Flex,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let spec = s.trim().to_ascii_lowercase();
        match spec.as_str() {
            "cpu" | "ndarray" => Ok(DeviceSpec::Cpu),
            "flex" => Ok(DeviceSpec::Flex),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            s => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| format!("{spec:?}: expected cuda:N with N a GPU index")),
                None => Err(format!(
                    "unknown device {spec:?}: expected cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Flex => f.write_str("flex"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// How to embed sentences.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedOptions {
    pub pooling: Pooling,
    /// Divide each vector by its L2 norm.
    pub normalize: bool,
    /// Tokens per sentence, special tokens included; `None` = the model's maximum positions.
    pub max_len: Option<usize>,
    /// Sentences per forward pass.
    pub batch_size: usize,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        EmbedOptions {
            pooling: Pooling::Cls,
            normalize: false,
            max_len: None,
            batch_size: 64,
        }
    }
}

/// A model as it travels: its tensors (encoder and training head, HF names) and the small
/// files that describe it (`config.json`, the tokenizer), by file name.
#[derive(Debug, Clone, Copy)]
pub struct ModelParts<'a> {
    pub tensors: &'a TensorMap,
    pub files: &'a [(String, Vec<u8>)],
}

/// What one round of local training reports (no sentences, only figures).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TrainReport {
    pub steps: u32,
    pub mean_loss: f64,
    pub last_loss: f64,
    /// Mean attention-alignment term (0 for SimCSE).
    pub mean_ami: f64,
    pub seconds: f64,
}

/// Why a runtime could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An input file (STS pairs, say) is malformed.
    #[error("{0}")]
    Data(String),
    /// Embedding failed (tokenizer, device).
    #[error("embedding: {0}")]
    Embed(String),
    /// The shard cannot be trained on (too small, say).
    #[error("{0}")]
    Shard(String),
    /// The model could not be built from what was given.
    #[error("model: {0}")]
    Model(String),
    /// Training itself failed (device, numerics).
    #[error("training: {0}")]
    Training(String),
}

impl RuntimeError {
    /// Wraps an I/O error with the path it concerns (for `map_err`).
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> RuntimeError {
        let path = path.into();
        move |source| RuntimeError::Io { path, source }
    }
}

/// Trains a model on a silo's sentences: the one thing an agent needs from a runtime.
pub trait LocalTrainer: Send + Sync {
    /// Trains from `start` on `shard` as `task` says, with `seed` for dropout masks, AMI
    /// samples and batch order. Returns every trained tensor (encoder and head, the names
    /// of `start.tensors`) and the figures to report.
    fn train(
        &self,
        start: ModelParts<'_>,
        shard: &[String],
        task: &TaskConfig,
        seed: u64,
    ) -> Result<(TensorMap, TrainReport), RuntimeError>;
}

/// A model that turns sentences into vectors: what serving and evaluation need.
pub trait Embedder: Send + Sync {
    /// One vector per sentence, in order.
    fn embed(&self, sentences: &[&str], opts: &EmbedOptions)
    -> Result<Vec<Vec<f32>>, RuntimeError>;
    /// Tokens the sentence is read as, special tokens included, at most `max_len`.
    fn count_tokens(&self, sentence: &str, max_len: usize) -> usize;
    /// Whether [`Pooling::Pooler`] can be used (the checkpoint has pooler weights).
    fn has_pooler(&self) -> bool;
}

/// A checkpoint as a model runtime opened it.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// Encoder tensors under HuggingFace names.
    pub tensors: TensorMap,
    /// The files that describe it (`config.json`, the tokenizer), by file name.
    pub files: Vec<(String, Vec<u8>)>,
    pub hidden_size: usize,
    /// Files written beside every exported checkpoint so other tools read it as this
    /// runtime does (sentence-transformers' module list and pooling), by relative path.
    pub export_files: Vec<(String, Vec<u8>)>,
}

/// An opened checkpoint's architecture and tokenizer: builds embedders from weights.
pub trait ModelTemplate: Send + Sync {
    /// The checkpoint itself.
    fn base(&self) -> Result<BaseModel, RuntimeError>;
    /// An embedder with this architecture and tokenizer and the given encoder tensors.
    fn embedder(&self, tensors: TensorMap) -> Result<Arc<dyn Embedder>, RuntimeError>;
}

/// Opens checkpoint directories on a device: what the coordinator needs from a runtime.
pub trait ModelRuntime: Send + Sync {
    fn open(&self, dir: &Path, device: DeviceSpec) -> Result<Box<dyn ModelTemplate>, RuntimeError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (text, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("CUDA", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("flex", DeviceSpec::Flex),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), d);
            assert_eq!(d.to_string().parse::<DeviceSpec>().unwrap(), d);
        }
        assert!(
            "cuda:x"
                .parse::<DeviceSpec>()
                .unwrap_err()
                .contains("GPU index")
        );
        assert!(
            "gpu"
                .parse::<DeviceSpec>()
                .unwrap_err()
                .contains("cpu, cuda or cuda:N")
        );
    }

    #[test]
    fn pooling_names_round_trip_and_unknown_ones_are_explained() {
        for p in [Pooling::Cls, Pooling::Mean, Pooling::Pooler] {
            assert_eq!(p.to_string().parse::<Pooling>().unwrap(), p);
        }
        let e = "max".parse::<Pooling>().unwrap_err();
        assert!(e.contains("cls, mean or pooler"), "{e}");
    }
}
