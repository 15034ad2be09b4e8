//! The local training task the coordinator hands to agents each round.

use fedmicse_tensors::ElementType;
use serde::{Deserialize, Serialize};

/// The local training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// InfoNCE plus attention alignment (λ > 0).
    #[default]
    Micse,
    /// InfoNCE alone (λ = 0).
    Simcse,
}

impl Objective {
    pub fn as_str(self) -> &'static str {
        match self {
            Objective::Micse => "micse",
            Objective::Simcse => "simcse",
        }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "micse" => Ok(Objective::Micse),
            "simcse" => Ok(Objective::Simcse),
            other => Err(format!(
                "unknown objective {other:?}: expected \"micse\" or \"simcse\""
            )),
        }
    }
}

/// Hyper-parameters of a round's local training (the `[task]` table of the coordinator's
/// configuration). Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// "micse" or "simcse".
    pub objective: Objective,
    /// Local epochs over the agent's shard per round (ignored when `steps` is set).
    pub epochs: u32,
    /// Local steps per round instead of epochs (0 = use epochs).
    pub steps: u32,
    pub batch_size: u32,
    pub max_len: u32,
    pub lr: f64,
    pub temperature: f64,
    /// AMI weight λ (the paper's 1e-3 for low-shot data).
    pub lambda: f64,
    /// AMI layers `[start, end)`; empty = the paper's default for the model's depth.
    pub ami_layers: Vec<u32>,
    pub ami_samples: u32,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Base seed; agents mix in the round number and their id.
    pub seed: u64,
    /// Tensors trained and exchanged (names, or prefixes ending in '.'); empty = all.
    pub trainable: Vec<String>,
    /// Element type of updates on the wire: "f32", or "f16"/"bf16" to halve the upload.
    pub update_dtype: ElementType,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            objective: Objective::Micse,
            epochs: 1,
            steps: 0,
            batch_size: 64,
            max_len: 32,
            lr: 1e-5,
            temperature: 0.05,
            lambda: 1e-3,
            ami_layers: Vec::new(),
            ami_samples: 150,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 48,
            trainable: Vec::new(),
            update_dtype: ElementType::F32,
        }
    }
}

// Ceilings on what a task may ask. They are far above any sensible setting and exist so
// that an agent never obeys an absurd task (a compromised coordinator asking for a billion
// steps, a 1 M-token sequence or a million AMI samples would make it train forever or run
// out of memory), and so that a coordinator never sends one.

/// Most local steps per round.
pub const MAX_STEPS: u32 = 1_000_000;
/// Most local epochs per round.
pub const MAX_EPOCHS: u32 = 10_000;
/// Largest batch.
pub const MAX_BATCH_SIZE: u32 = 65_536;
/// Longest sequence in tokens (BERT-style encoders have 512 positions).
pub const MAX_LEN: u32 = 4096;
/// Most AMI samples per step.
pub const MAX_AMI_SAMPLES: u32 = 1_000_000;
/// Highest AMI layer index (no encoder here has anywhere near this many layers).
pub const MAX_LAYERS: u32 = 1024;
/// Most entries in `trainable`, and the longest entry.
pub const MAX_TRAINABLE: usize = 4096;
pub const MAX_TRAINABLE_NAME: usize = 256;

impl TaskConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.epochs == 0 && self.steps == 0 {
            return Err("task: set epochs or steps above 0".into());
        }
        if self.batch_size < 2 {
            return Err("task.batch_size must be at least 2".into());
        }
        if self.max_len < 3 {
            return Err("task.max_len must be at least 3".into());
        }
        if self.steps > MAX_STEPS {
            return Err(format!("task.steps {} exceeds {MAX_STEPS}", self.steps));
        }
        if self.epochs > MAX_EPOCHS {
            return Err(format!("task.epochs {} exceeds {MAX_EPOCHS}", self.epochs));
        }
        if self.batch_size > MAX_BATCH_SIZE {
            return Err(format!(
                "task.batch_size {} exceeds {MAX_BATCH_SIZE}",
                self.batch_size
            ));
        }
        if self.max_len > MAX_LEN {
            return Err(format!("task.max_len {} exceeds {MAX_LEN}", self.max_len));
        }
        if self.ami_samples > MAX_AMI_SAMPLES {
            return Err(format!(
                "task.ami_samples {} exceeds {MAX_AMI_SAMPLES}",
                self.ami_samples
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("task.lr {} must be positive and finite", self.lr));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "task.temperature {} must be positive and finite",
                self.temperature
            ));
        }
        for (name, v) in [
            ("lambda", self.lambda),
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("task.{name} {v} must be finite and not negative"));
            }
        }
        if self.trainable.len() > MAX_TRAINABLE
            || self
                .trainable
                .iter()
                .any(|t| t.is_empty() || t.len() > MAX_TRAINABLE_NAME)
        {
            return Err(format!(
                "task.trainable: at most {MAX_TRAINABLE} names of 1 to {MAX_TRAINABLE_NAME} bytes"
            ));
        }
        if !self.ami_layers.is_empty() {
            let ok = self.ami_layers.len() == 2
                && self.ami_layers[0] < self.ami_layers[1]
                && self.ami_layers[1] <= MAX_LAYERS
                && (self.ami_layers[1] - self.ami_layers[0]) % 2 == 0;
            if !ok {
                return Err(format!(
                    "task.ami_layers {:?}: expected [start, end) with an even, positive count",
                    self.ami_layers
                ));
            }
        }
        Ok(())
    }
}
