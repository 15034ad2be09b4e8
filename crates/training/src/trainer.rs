//! One miCSE (or SimCSE) training step at a time, on burn's autodiff device.
//!
//! A batch is tokenised once and encoded as one doubled batch with dropout active: rows
//! `0..B` are view 1, rows `B..2B` view 2 (independent dropout masks). The training-only MLP
//! head (dense + tanh) sits on the [CLS] vector, as in SimCSE/miCSE.

use std::ops::Range;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use burn::tensor::activation::tanh;
use fedmicse_encoder::model::Dense;
use fedmicse_encoder::weights::{self, HostTensor, TensorMap};
use fedmicse_encoder::{BatchTensors, BertModel, Dropout, Encoder, ForwardOptions, cls};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, TrainError};
use crate::objective::{AmiStatus, LossParts, ObjectiveConfig, micse_loss};

/// The training-only projection on [CLS]: `tanh(W x + b)`. Stored as `mlp.dense.*` (SimCSE's
/// names) in `training_head.safetensors` beside a checkpoint, never in `model.safetensors`.
#[derive(Module, Debug)]
pub struct MlpHead {
    pub dense: Dense,
}

pub const HEAD_FILE: &str = "training_head.safetensors";
/// Tensors of the training head are named under this prefix, beside the encoder's.
pub const HEAD_PREFIX: &str = "mlp.";
const HEAD_W: &str = "mlp.dense.weight";
const HEAD_B: &str = "mlp.dense.bias";

impl MlpHead {
    /// HF-style initialisation: normal(0, 0.02) weights, zero bias, from the device's
    /// generator.
    pub fn new(hidden: usize, device: &burn::tensor::Device) -> Self {
        MlpHead {
            dense: Dense::new(hidden, hidden, 0.02, device),
        }
    }

    /// As [`new`](Self::new), drawn from a generator seeded with `seed` (reproducible).
    pub fn seeded(hidden: usize, seed: u64, device: &burn::tensor::Device) -> Self {
        use rand_distr::{Distribution, Normal};
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
        let w: Vec<f32> = (0..hidden * hidden)
            .map(|_| normal.sample(&mut rng))
            .collect();
        let weight =
            Tensor::<2>::from_data(burn::tensor::TensorData::new(w, [hidden, hidden]), device);
        MlpHead {
            dense: Dense {
                weight: Param::from_tensor(weight),
                bias: Param::from_tensor(Tensor::zeros([hidden], device)),
            },
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        tanh(self.dense.forward(x))
    }

    /// `mlp.dense.weight` (`[out, in]`) and `mlp.dense.bias`.
    pub fn tensors(&self) -> Result<TensorMap> {
        let host = |t: Tensor<2>| -> Result<HostTensor> {
            let [r, c] = t.dims();
            let data = t
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| TrainError::Data(format!("{e:?}")))?;
            Ok(HostTensor::new(vec![r, c], data))
        };
        let w = host(self.dense.weight.val().transpose())?;
        let b = host(self.dense.bias.val().unsqueeze::<2>())?;
        let mut map = TensorMap::new();
        map.insert(HEAD_W.into(), w);
        map.insert(HEAD_B.into(), HostTensor::new(vec![b.data.len()], b.data));
        Ok(map)
    }

    /// From `mlp.dense.*` tensors; checks shapes against `hidden`.
    pub fn from_tensors(
        map: &TensorMap,
        hidden: usize,
        device: &burn::tensor::Device,
    ) -> Result<Self> {
        let get = |name: &str, shape: Vec<usize>| -> Result<HostTensor> {
            let t = map
                .get(name)
                .ok_or_else(|| TrainError::Data(format!("training head lacks {name}")))?;
            if t.shape != shape {
                return Err(TrainError::Data(format!(
                    "training head tensor {name}: expected shape {shape:?}, found {:?}",
                    t.shape
                )));
            }
            Ok(t.clone())
        };
        let w = get(HEAD_W, vec![hidden, hidden])?;
        let b = get(HEAD_B, vec![hidden])?;
        let w = Tensor::<2>::from_data(burn::tensor::TensorData::new(w.data, w.shape), device)
            .transpose();
        let b = Tensor::<1>::from_data(burn::tensor::TensorData::new(b.data, b.shape), device);
        Ok(MlpHead {
            dense: Dense {
                weight: Param::from_tensor(w),
                bias: Param::from_tensor(b),
            },
        })
    }

    /// The head saved beside a checkpoint, if there is one.
    pub fn load(dir: &Path, hidden: usize, device: &burn::tensor::Device) -> Result<Option<Self>> {
        let path = dir.join(HEAD_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let map = weights::read_safetensors_map(&path)?;
        Ok(Some(Self::from_tensors(&map, hidden, device)?))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        weights::write_safetensors(&dir.join(HEAD_FILE), &self.tensors()?)?;
        Ok(())
    }
}

/// Encoder plus training head: what the optimizer updates.
#[derive(Module, Debug)]
pub struct TrainModel {
    pub bert: BertModel,
    pub head: MlpHead,
}

/// Everything a training step needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub objective: ObjectiveConfig,
    /// Layers whose attention maps AMI aligns, `[min, max)`, an even count.
    pub ami_layers: Range<usize>,
    pub batch_size: usize,
    pub max_len: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Linear warm-up steps, then linear decay to 0 at `total_steps`.
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// Clip the global gradient norm (PyTorch's `clip_grad_norm_`); `None` = no clipping.
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// Tensors trained (HF names, or prefixes ending in '.'; the head is `mlp.dense.*`);
    /// empty = all. The others stay frozen.
    pub trainable: Vec<String>,
}

impl TrainConfig {
    /// The paper's settings: batch 64, max length 32, lr 1e-5, τ 0.05, K 150, no weight
    /// decay or warm-up (HF Trainer defaults), gradient norm clipped at 1.
    pub fn paper(num_layers: usize, lambda: f64) -> Self {
        TrainConfig {
            objective: ObjectiveConfig {
                lambda,
                ..ObjectiveConfig::default()
            },
            ami_layers: default_ami_layers(num_layers),
            batch_size: 64,
            max_len: 32,
            lr: 1e-5,
            weight_decay: 0.0,
            warmup_steps: 0,
            total_steps: 1,
            max_grad_norm: Some(1.0),
            seed: 48,
            trainable: Vec::new(),
        }
    }

    pub fn validate(&self, num_layers: usize) -> Result<()> {
        let r = &self.ami_layers;
        if self.objective.lambda != 0.0 {
            if r.start >= r.end || r.end > num_layers {
                return Err(TrainError::Config(format!(
                    "AMI layers {}..{} are not inside the model's {num_layers} layers",
                    r.start, r.end
                )));
            }
            if (r.end - r.start) % 2 != 0 {
                return Err(TrainError::Config(format!(
                    "AMI layers {}..{} select {} layers; the count must be even (the maps are taken in pairs)",
                    r.start,
                    r.end,
                    r.end - r.start
                )));
            }
        }
        if self.batch_size < 2 {
            return Err(TrainError::Config(
                "batch size must be at least 2 (InfoNCE contrasts each sentence with the others)"
                    .into(),
            ));
        }
        if self.max_len < 3 {
            return Err(TrainError::Config(format!(
                "max length {} is below 3",
                self.max_len
            )));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(TrainError::Config(format!(
                "learning rate {} must be positive",
                self.lr
            )));
        }
        if !(self.objective.temperature > 0.0) {
            return Err(TrainError::Config("temperature must be positive".into()));
        }
        if self.objective.target_samples == 0 {
            return Err(TrainError::Config("AMI samples must be at least 1".into()));
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based): linear warm-up, then linear decay to 0.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let total = self.total_steps.max(1);
        let decay = total.saturating_sub(self.warmup_steps).max(1);
        let left = total.saturating_sub(step) as f64 / decay as f64;
        self.lr * left.clamp(0.0, 1.0)
    }
}

/// The paper's AMI layers, scaled: BERT-base (12 layers) aligns layers 7..11; a 6-layer
/// model such as MiniLM-L6 uses 2..6. In general the four layers ending at `min(L, 11)`.
pub fn default_ami_layers(num_layers: usize) -> Range<usize> {
    let end = num_layers.min(11);
    if end >= 4 {
        end - 4..end
    } else {
        0..end - end % 2
    }
}

/// λ by data size, as the paper sets it: 1e-3 up to 1,000 sentences (≤ 0.1 % of its 1M),
/// 1e-4 up to 10,000 (1 %), 5e-4 beyond (10 %).
pub fn paper_lambda(sentences: usize) -> f64 {
    match sentences {
        0..=1_000 => 1e-3,
        1_001..=10_000 => 1e-4,
        _ => 5e-4,
    }
}

/// What one step reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub info_nce: f64,
    /// `None` when the AMI term was off or skipped (see `ami_status`).
    pub ami: Option<f64>,
    pub ami_status: AmiStatus,
    pub lr: f64,
    pub grad_norm: f64,
    pub sentences: usize,
    pub seconds: f64,
}

/// Trains an encoder in place, step by step.
pub struct Trainer {
    model: Option<TrainModel>,
    optim: ModuleOptimizer,
    config: TrainConfig,
    tokenizer: fedmicse_encoder::TextTokenizer,
    /// AMI sampling.
    rng: ChaCha8Rng,
    dropout: Dropout,
    step: usize,
}

impl Trainer {
    /// Starts from `encoder`'s weights and `head` (a fresh head when `None`), on the
    /// autodiff form of the encoder's device.
    pub fn new(encoder: &Encoder, head: Option<MlpHead>, config: TrainConfig) -> Result<Self> {
        config.validate(encoder.model.num_layers())?;
        let device = encoder.device();
        device.seed(config.seed);
        let head = head
            .unwrap_or_else(|| MlpHead::seeded(encoder.config.hidden_size, config.seed, device));
        // On CPU, dropout masks come from this trainer's own generator, so runs are
        // reproducible even with other trainings in the process (simulation mode); a GPU
        // draws them on the device.
        let dropout = if fedmicse_encoder::device::is_host(device) {
            Dropout::seeded(config.seed.wrapping_add(1))
        } else {
            Dropout::Device
        };
        let trainable = config.trainable.clone();
        let frozen = move |name: &str| !weights::name_matches(name, &trainable);
        let mut head = head;
        if frozen(HEAD_W) {
            head.dense.weight = head.dense.weight.set_require_grad(false);
        }
        if frozen(HEAD_B) {
            head.dense.bias = head.dense.bias.set_require_grad(false);
        }
        let model = TrainModel {
            bert: weights::freeze(encoder.model.clone(), &frozen),
            head,
        }
        .train();
        // Clipping is global (all parameters together, as PyTorch), done in `step`, not by
        // burn's per-tensor option.
        let adam = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(config.weight_decay as f32);
        Ok(Trainer {
            model: Some(model),
            optim: adam.init(),
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            dropout,
            tokenizer: encoder.tokenizer.clone(),
            config,
            step: 0,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn steps_done(&self) -> usize {
        self.step
    }

    fn model(&self) -> &TrainModel {
        self.model.as_ref().expect("model present between steps")
    }

    /// The miCSE loss of a doubled batch (`b` sentences twice: two dropout views).
    fn losses(&mut self, model: &TrainModel, tensors: &BatchTensors, b: usize) -> LossParts {
        let use_ami = self.config.objective.lambda != 0.0;
        let out = model.bert.forward(
            tensors,
            &ForwardOptions {
                attention_layers: if use_ami {
                    self.config.ami_layers.clone()
                } else {
                    0..0
                },
            },
            &mut self.dropout,
        );
        let z = model.head.forward(cls(out.hidden));
        let z1 = z.clone().narrow(0, 0, b);
        let z2 = z.narrow(0, b, b);
        let split = |views: &[Tensor<4>], start: usize| -> Vec<Tensor<4>> {
            views
                .iter()
                .map(|a| a.clone().narrow(0, start, b))
                .collect()
        };
        let (att1, att2) = (split(&out.attentions, 0), split(&out.attentions, b));
        micse_loss(
            z1,
            z2,
            &att1,
            &att2,
            &self.config.objective,
            None,
            &mut self.rng,
        )
    }

    /// One optimisation step on `sentences` (at least 2).
    pub fn step(&mut self, sentences: &[&str]) -> Result<StepMetrics> {
        if sentences.len() < 2 {
            return Err(TrainError::Data(format!(
                "a training batch needs at least 2 sentences, got {}",
                sentences.len()
            )));
        }
        let started = std::time::Instant::now();
        let b = sentences.len();
        let doubled: Vec<&str> = sentences.iter().chain(sentences).copied().collect();
        let batch = self.tokenizer.encode_batch(&doubled, self.config.max_len)?;
        let model = self.model.take().expect("model present");
        let device = model.bert.embeddings.word.val().device();
        let tensors = BatchTensors::new(&batch, &device);
        let parts = self.losses(&model, &tensors, b);
        let loss_value: f64 = parts.loss.clone().into_scalar::<f32>() as f64;
        if !loss_value.is_finite() {
            self.model = Some(model);
            return Err(TrainError::Data(format!(
                "loss is {loss_value} at step {}: lower the learning rate",
                self.step
            )));
        }
        let info_nce: f64 = parts.info_nce.clone().into_scalar::<f32>() as f64;
        let ami = parts
            .ami
            .as_ref()
            .map(|a| a.clone().into_scalar::<f32>() as f64);
        let forward_done = started.elapsed();
        let grads = parts.loss.backward();
        let mut grads = GradientsParams::from_grads(grads, &model);
        let backward_done = started.elapsed();
        let grad_norm = clip_global_norm(&model, &mut grads, self.config.max_grad_norm);
        let clip_done = started.elapsed();
        let lr = self.config.lr_at(self.step);
        let model = self.optim.step(lr, model, grads);
        // Where a step's time goes (on CPU; GPU backends run asynchronously).
        tracing::debug!(
            forward_s = forward_done.as_secs_f64(),
            backward_s = (backward_done - forward_done).as_secs_f64(),
            clip_s = (clip_done - backward_done).as_secs_f64(),
            optimizer_s = (started.elapsed() - clip_done).as_secs_f64(),
            "step timing"
        );
        self.model = Some(model);
        self.step += 1;
        Ok(StepMetrics {
            step: self.step,
            loss: loss_value,
            info_nce,
            ami,
            ami_status: parts.status,
            lr,
            grad_norm,
            sentences: b,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The current weights as an inference encoder (no autodiff, dropout off).
    pub fn encoder(&self, template: &Encoder) -> Encoder {
        template.with_model(self.model().bert.valid())
    }

    /// The current training head (no autodiff).
    pub fn head(&self) -> MlpHead {
        self.model().head.valid()
    }
}

/// Sums squared gradients of every parameter (rank by rank, as the visitor is generic).
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads
                .register::<D>(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// Global L2 norm of all gradients; scales them to `max_norm` when above (torch's
/// `clip_grad_norm_` with its 1e-6 guard). Returns the norm before clipping.
fn clip_global_norm(model: &TrainModel, grads: &mut GradientsParams, max_norm: Option<f64>) -> f64 {
    let mut sq = SquaredNorm { grads, total: None };
    model.visit(&mut sq);
    let norm = sq
        .total
        .map_or(0.0, |t| (t.into_scalar::<f32>() as f64).sqrt());
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            model.visit(&mut Scale {
                grads,
                factor: coef,
            });
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_and_decays_to_zero() {
        let mut c = TrainConfig::paper(6, 1e-3);
        c.lr = 1.0;
        c.warmup_steps = 2;
        c.total_steps = 6;
        let lrs: Vec<f64> = (0..6).map(|s| c.lr_at(s)).collect();
        assert_eq!(lrs, vec![0.5, 1.0, 1.0, 0.75, 0.5, 0.25]);
        c.warmup_steps = 0;
        c.total_steps = 4;
        assert_eq!(c.lr_at(0), 1.0);
        assert_eq!(c.lr_at(3), 0.25);
    }

    #[test]
    fn ami_layer_defaults_follow_the_paper() {
        assert_eq!(default_ami_layers(12), 7..11);
        assert_eq!(default_ami_layers(6), 2..6);
        assert_eq!(default_ami_layers(3), 0..2);
        let mut c = TrainConfig::paper(6, 1e-3);
        c.ami_layers = 2..5;
        assert!(c.validate(6).unwrap_err().to_string().contains("even"));
        c.ami_layers = 4..8;
        assert!(c.validate(6).unwrap_err().to_string().contains("inside"));
    }
}
