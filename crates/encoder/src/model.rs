//! BERT as HuggingFace's `BertModel` computes it: word + position + token-type embeddings,
//! post-LayerNorm transformer blocks, exact (erf) GELU, LayerNorm eps from the config.
//!
//! Written from `Linear`-like parameters rather than burn's `TransformerEncoder`, which
//! differs from BERT (LayerNorm eps, dropout placement) and discards the attention maps AMI
//! needs.

use std::ops::Range;

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu_approximate, relu, tanh};
use burn::tensor::module::embedding;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::config::{Activation, BertConfig};
use crate::fused::{self, Kernels};
use crate::tokenize::TokenBatch;

/// A dense layer with its weight stored `[in, out]` (HF stores `[out, in]`; the loader
/// transposes so the forward pass is a plain matmul).
#[derive(Module, Debug)]
pub struct Dense {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

impl Dense {
    pub fn new(d_in: usize, d_out: usize, std: f64, device: &Device) -> Self {
        Dense {
            weight: Param::from_tensor(Tensor::random(
                [d_in, d_out],
                Distribution::Normal(0.0, std),
                device,
            )),
            bias: Param::from_tensor(Tensor::zeros([d_out], device)),
        }
    }

    /// `x W + b` over the last dimension, with the fused CPU kernel where there is one
    /// (unless `FEDMICSE_KERNELS=composed`).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_with(x, Kernels::from_env())
    }

    pub fn forward_with<const D: usize>(&self, x: Tensor<D>, kernels: Kernels) -> Tensor<D> {
        fused::linear(x, self.weight.val(), self.bias.val(), kernels)
    }
}

/// LayerNorm over the last dimension.
#[derive(Module, Debug)]
pub struct Norm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    pub eps: f64,
}

impl Norm {
    pub fn new(d: usize, eps: f64, device: &Device) -> Self {
        Norm {
            gamma: Param::from_tensor(Tensor::ones([d], device)),
            beta: Param::from_tensor(Tensor::zeros([d], device)),
            eps,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>, kernels: Kernels) -> Tensor<D> {
        fused::layer_norm(x, self.gamma.val(), self.beta.val(), self.eps, kernels)
    }
}

/// Where dropout masks come from. Dropout is inverted: kept entries are divided by `1 − p`,
/// dropped ones are exactly 0 (AMI's validity mask relies on that).
pub enum Dropout {
    /// Inference: no dropout.
    Off,
    /// The backend's random generator (fast on a GPU; seeded per process with
    /// `Device::seed`, so concurrent trainings in one process share it).
    Device,
    /// Masks drawn on the host from a generator of our own and uploaded: reproducible per
    /// trainer whatever else runs in the process. The default on CPU.
    Seeded(Box<ChaCha8Rng>),
}

/// Mask entries per parallel block of the seeded generator.
const MASK_BLOCK: usize = 64 * 1024;

impl Dropout {
    pub fn seeded(seed: u64) -> Self {
        Dropout::Seeded(Box::new(ChaCha8Rng::seed_from_u64(seed)))
    }

    pub fn is_active(&self) -> bool {
        !matches!(self, Dropout::Off)
    }

    pub fn apply<const D: usize>(&mut self, x: Tensor<D>, p: f64, kernels: Kernels) -> Tensor<D> {
        if p <= 0.0 {
            return x;
        }
        let keep = 1.0 - p;
        match self {
            Dropout::Off => x,
            Dropout::Device => {
                let mask = x.random_like(Distribution::Bernoulli(keep));
                x * mask * (1.0 / keep)
            }
            Dropout::Seeded(rng) => {
                let shape = x.shape();
                let n = shape.num_elements();
                // One u32 per entry against a threshold: 0 or 1/keep, scale folded in.
                let threshold = (keep * 4_294_967_296.0) as u64;
                let scale = (1.0 / keep) as f32;
                // Drawn in parallel blocks, each seeking to its own place in the stream:
                // the same values as one sequential pass, at any thread count.
                let start = rng.get_word_pos();
                let mut mask = fused::zeros(n);
                mask.par_chunks_mut(MASK_BLOCK)
                    .enumerate()
                    .for_each(|(i, block)| {
                        let mut rng = rng.as_ref().clone();
                        rng.set_word_pos(start + (i * MASK_BLOCK) as u128);
                        for m in block {
                            *m = if (rng.next_u32() as u64) < threshold {
                                scale
                            } else {
                                0.0
                            };
                        }
                    });
                rng.set_word_pos(start + n as u128);
                let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &x.device());
                fused::mul_mask(x, mask, kernels)
            }
        }
    }
}

#[derive(Module, Debug)]
pub struct Embeddings {
    pub word: Param<Tensor<2>>,
    pub position: Param<Tensor<2>>,
    pub token_type: Param<Tensor<2>>,
    pub norm: Norm,
}

#[derive(Module, Debug)]
pub struct Layer {
    pub query: Dense,
    pub key: Dense,
    pub value: Dense,
    pub attention_output: Dense,
    pub attention_norm: Norm,
    pub intermediate: Dense,
    pub output: Dense,
    pub output_norm: Norm,
}

/// The optional pooler: `tanh(W h_cls + b)`.
#[derive(Module, Debug)]
pub struct Pooler {
    pub dense: Dense,
}

/// Hyper-parameters the forward pass reads, copied from [`BertConfig`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub activation: Activation,
    /// Fused CPU kernels or burn composition (the tests' reference); not from the config.
    pub kernels: Kernels,
}

#[derive(Module, Debug)]
pub struct BertModel {
    pub embeddings: Embeddings,
    pub layers: Vec<Layer>,
    pub pooler: Option<Pooler>,
    #[module(skip)]
    pub dims: Dims,
}

/// What a forward pass should return besides hidden states.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Layers whose attention probabilities (after attention dropout) are returned.
    pub attention_layers: Range<usize>,
}

pub struct BertOutput {
    /// `[batch, seq, hidden]`
    pub hidden: Tensor<3>,
    /// `[batch, heads, seq, seq]` for each layer in `ForwardOptions::attention_layers`.
    pub attentions: Vec<Tensor<4>>,
}

/// A token batch on a device.
pub struct BatchTensors {
    pub input_ids: Tensor<2, Int>,
    pub token_type_ids: Tensor<2, Int>,
    /// `[batch, seq]`, 1.0 for tokens, 0.0 for padding.
    pub mask: Tensor<2>,
}

impl BatchTensors {
    pub fn new(batch: &TokenBatch, device: &Device) -> Self {
        let shape = [batch.batch, batch.seq_len];
        let ints =
            |v: &[i64]| Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), shape), device);
        let mask: Vec<f32> = batch.attention_mask.iter().map(|&m| m as f32).collect();
        BatchTensors {
            input_ids: ints(&batch.input_ids),
            token_type_ids: ints(&batch.token_type_ids),
            mask: Tensor::from_data(TensorData::new(mask, shape), device),
        }
    }
}

impl BertModel {
    /// A randomly initialised model (normal(0, 0.02) weights as HF initialises BERT).
    pub fn random(config: &BertConfig, with_pooler: bool, device: &Device) -> Self {
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let std = 0.02;
        let table = |rows: usize| {
            Param::from_tensor(Tensor::random(
                [rows, h],
                Distribution::Normal(0.0, std),
                device,
            ))
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| Layer {
                query: Dense::new(h, h, std, device),
                key: Dense::new(h, h, std, device),
                value: Dense::new(h, h, std, device),
                attention_output: Dense::new(h, h, std, device),
                attention_norm: Norm::new(h, eps, device),
                intermediate: Dense::new(h, config.intermediate_size, std, device),
                output: Dense::new(config.intermediate_size, h, std, device),
                output_norm: Norm::new(h, eps, device),
            })
            .collect();
        BertModel {
            embeddings: Embeddings {
                word: table(config.vocab_size),
                position: table(config.max_position_embeddings),
                token_type: table(config.type_vocab_size),
                norm: Norm::new(h, eps, device),
            },
            layers,
            pooler: with_pooler.then(|| Pooler {
                dense: Dense::new(h, h, std, device),
            }),
            dims: Dims::from_config(config),
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Inference forward pass: no dropout, no attention maps.
    pub fn infer(&self, batch: &BatchTensors) -> Tensor<3> {
        self.forward(batch, &ForwardOptions::default(), &mut Dropout::Off)
            .hidden
    }

    pub fn forward(
        &self,
        batch: &BatchTensors,
        opts: &ForwardOptions,
        dropout: &mut Dropout,
    ) -> BertOutput {
        let d = self.dims;
        let s = batch.input_ids.dims()[1];
        let e = &self.embeddings;
        let positions = e.position.val().narrow(0, 0, s).unsqueeze::<3>();
        let x = embedding(e.word.val(), batch.input_ids.clone())
            + positions
            + embedding(e.token_type.val(), batch.token_type_ids.clone());
        let mut x = dropout.apply(e.norm.forward(x, d.kernels), d.hidden_dropout, d.kernels);

        // HF's extended attention mask: (1 - mask) * finfo(f32).min added to the scores, so
        // padded keys get probability exactly 0.
        let key_bias = (batch.mask.clone().neg() + 1.0).mul_scalar(f32::MIN);

        let mut attentions = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let keep = opts.attention_layers.contains(&i);
            let (out, probs) = layer.forward(x, key_bias.clone(), d, dropout, keep);
            x = out;
            if let Some(p) = probs {
                attentions.push(p);
            }
        }
        BertOutput {
            hidden: x,
            attentions,
        }
    }

    /// `tanh(W h_cls + b)`, or `None` when the checkpoint has no pooler.
    pub fn pool(&self, cls: Tensor<2>) -> Option<Tensor<2>> {
        self.pooler.as_ref().map(|p| tanh(p.dense.forward(cls)))
    }
}

impl Dims {
    pub fn from_config(config: &BertConfig) -> Self {
        Dims {
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            hidden_dropout: config.hidden_dropout_prob,
            attention_dropout: config.attention_probs_dropout_prob,
            activation: config.activation().expect("validated config"),
            kernels: Kernels::from_env(),
        }
    }
}

impl Layer {
    fn forward(
        &self,
        x: Tensor<3>,
        key_bias: Tensor<2>,
        d: Dims,
        dropout: &mut Dropout,
        keep_probs: bool,
    ) -> (Tensor<3>, Option<Tensor<4>>) {
        let q = self.query.forward_with(x.clone(), d.kernels);
        let k = self.key.forward_with(x.clone(), d.kernels);
        let v = self.value.forward_with(x.clone(), d.kernels);
        let (context, probs) = if keep_probs || (dropout.is_active() && d.attention_dropout > 0.0) {
            let probs = fused::attention_probs(q, k, key_bias, d.heads, d.kernels);
            let probs = dropout.apply(probs, d.attention_dropout, d.kernels);
            let context = fused::attention_context(probs.clone(), v, d.kernels);
            (context, keep_probs.then_some(probs))
        } else {
            let context = fused::attention(q, k, v, key_bias, d.heads, d.kernels);
            (context, None)
        };

        let attn = dropout.apply(
            self.attention_output.forward_with(context, d.kernels),
            d.hidden_dropout,
            d.kernels,
        );
        let attn = self
            .attention_norm
            .forward(fused::add(attn, x, d.kernels), d.kernels);

        let inter = self.intermediate.forward_with(attn.clone(), d.kernels);
        let inter = match d.activation {
            Activation::Gelu => fused::gelu(inter, d.kernels),
            Activation::GeluTanh => gelu_approximate(inter),
            Activation::Relu => relu(inter),
        };
        let out = dropout.apply(
            self.output.forward_with(inter, d.kernels),
            d.hidden_dropout,
            d.kernels,
        );
        let out = self
            .output_norm
            .forward(fused::add(out, attn, d.kernels), d.kernels);
        (out, probs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel mask draw gives what one sequential pass over the generator gives, and
    /// leaves the generator where that pass would.
    #[test]
    fn seeded_dropout_masks_equal_a_sequential_draw() {
        let device = crate::device::cpu();
        let n = 3 * MASK_BLOCK + 123;
        let mut dropout = Dropout::seeded(5);
        let first: Vec<f32> = dropout
            .apply(Tensor::<1>::ones([n], &device), 0.1, Kernels::Fused)
            .into_data()
            .try_into_vec()
            .unwrap();
        let second: Vec<f32> = dropout
            .apply(Tensor::<1>::ones([10], &device), 0.1, Kernels::Fused)
            .into_data()
            .try_into_vec()
            .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let threshold = (0.9f64 * 4_294_967_296.0) as u64;
        let mut draw = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    if (rng.next_u32() as u64) < threshold {
                        (1.0 / 0.9f64) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        assert_eq!(first, draw(n));
        assert_eq!(second, draw(10));
        let dropped = first.iter().filter(|&&m| m == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.01, "dropped {dropped}");
    }
}
