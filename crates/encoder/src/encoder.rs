//! The sentence encoder: a checkpoint directory in, sentence vectors out.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};

use crate::config::BertConfig;
use crate::error::{EncoderError, Result, io_err};
use crate::model::{BatchTensors, BertModel};
use crate::tokenize::{TextTokenizer, Tokens};
use crate::weights::{self, TensorMap};

pub use fedmicse_runtime::{EmbedOptions, Pooling};

/// Tokenizer-side files copied verbatim into a saved checkpoint.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// sentence-transformers metadata written beside a saved checkpoint (not model files: loaders
/// of fedmicse checkpoints skip them).
pub const SENTENCE_TRANSFORMERS_FILES: &[&str] = &[
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// The sentence-transformers description of a checkpoint: the BERT module followed by [CLS]
/// pooling, so `SentenceTransformer(DIR)` gives the miCSE embedding that `embed` gives by
/// default (a plain BERT directory would get mean pooling). Paths as in
/// [`SENTENCE_TRANSFORMERS_FILES`].
pub fn sentence_transformers_files(config: &BertConfig) -> Vec<(String, Vec<u8>)> {
    let json = |v: serde_json::Value| serde_json::to_vec_pretty(&v).expect("json");
    vec![
        (
            "modules.json".into(),
            json(serde_json::json!([
                {"idx": 0, "name": "0", "path": "",
                 "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling",
                 "type": "sentence_transformers.models.Pooling"},
            ])),
        ),
        (
            "sentence_bert_config.json".into(),
            json(serde_json::json!({
                "max_seq_length": config.max_position_embeddings.min(512),
                "do_lower_case": false,
            })),
        ),
        (
            "1_Pooling/config.json".into(),
            json(serde_json::json!({
                "word_embedding_dimension": config.hidden_size,
                "pooling_mode_cls_token": true,
                "pooling_mode_mean_tokens": false,
                "pooling_mode_max_tokens": false,
                "pooling_mode_mean_sqrt_len_tokens": false,
                "pooling_mode_weightedmean_tokens": false,
                "pooling_mode_lasttoken": false,
                "include_prompt": true,
            })),
        ),
    ]
}

/// Writes [`sentence_transformers_files`] into a checkpoint directory.
pub fn write_sentence_transformers_files(dir: &Path, config: &BertConfig) -> Result<()> {
    for (name, bytes) in sentence_transformers_files(config) {
        let path = dir.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        weights::write_atomic(&path, &bytes)?;
    }
    Ok(())
}

/// A BERT sentence encoder on a device.
pub struct Encoder {
    pub model: BertModel,
    pub tokenizer: TextTokenizer,
    pub config: BertConfig,
    device: Device,
    /// Tokenizer files of the source directory, written back on save.
    tokenizer_files: Vec<(String, Vec<u8>)>,
    /// Inference batches are padded to a multiple of this many tokens.
    pad_multiple: usize,
}

impl Encoder {
    /// Loads a HuggingFace model directory: `config.json`, `model.safetensors` or
    /// `pytorch_model.bin`, `tokenizer.json` or `vocab.txt`.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(EncoderError::MissingFile(format!(
                "{}: model directory not found",
                dir.display()
            )));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(EncoderError::MissingFile(format!(
                "{}: no config.json (is this a HuggingFace model directory?)",
                dir.display()
            )));
        }
        let config = BertConfig::from_file(&config_path)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let tensors = weights::read_checkpoint(&weights::weights_file(dir)?)?;
        let model = weights::build_model(&config, tensors, device)?;
        let mut tokenizer_files = Vec::new();
        for name in TOKENIZER_FILES {
            let p = dir.join(name);
            if p.is_file() {
                tokenizer_files.push((name.to_string(), std::fs::read(&p).map_err(io_err(&p))?));
            }
        }
        tracing::debug!(dir = %dir.display(), layers = config.num_hidden_layers, hidden = config.hidden_size, "loaded encoder");
        Ok(Encoder {
            tokenizer_files,
            ..Self::from_parts(model, tokenizer, config, device)
        })
    }

    /// An encoder from parts (e.g. a model being trained and its tokenizer).
    pub fn from_parts(
        model: BertModel,
        tokenizer: TextTokenizer,
        config: BertConfig,
        device: &Device,
    ) -> Self {
        Encoder {
            model,
            tokenizer,
            config,
            device: device.clone(),
            tokenizer_files: Vec::new(),
            pad_multiple: crate::device::pad_multiple(device),
        }
    }

    /// Same tokenizer and config, other weights (checked against the config).
    pub fn with_tensors(&self, tensors: TensorMap) -> Result<Self> {
        Ok(self.with_model(weights::build_model(&self.config, tensors, &self.device)?))
    }

    /// Same tokenizer and config, another model.
    pub fn with_model(&self, model: BertModel) -> Self {
        Encoder {
            model,
            tokenizer: self.tokenizer.clone(),
            config: self.config.clone(),
            device: self.device.clone(),
            tokenizer_files: self.tokenizer_files.clone(),
            pad_multiple: self.pad_multiple,
        }
    }

    /// The same encoder with its weights copied to `device`.
    pub fn to_device(&self, device: &Device) -> Self {
        let mut moved =
            self.with_model(burn::module::Module::to_device(self.model.clone(), device));
        moved.device = device.clone();
        moved.pad_multiple = crate::device::pad_multiple(device);
        moved
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Inference pads each batch's sequence length up to a multiple of this (see
    /// [`device::pad_multiple`](crate::device::pad_multiple)); embeddings do not change.
    pub fn pad_multiple(&self) -> usize {
        self.pad_multiple
    }

    /// Overrides [`pad_multiple`](Self::pad_multiple) (1: pad to the longest row only).
    pub fn set_pad_multiple(&mut self, multiple: usize) {
        self.pad_multiple = multiple.max(1);
    }

    /// The weights under their HuggingFace names.
    pub fn tensors(&self) -> Result<TensorMap> {
        weights::model_tensors(&self.model)
    }

    /// Writes a HuggingFace model directory (`config.json`, `model.safetensors`, tokenizer
    /// files) that `transformers.AutoModel.from_pretrained` loads.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        weights::write_safetensors(&dir.join("model.safetensors"), &self.tensors()?)?;
        for (name, bytes) in self.files()? {
            weights::write_atomic(&dir.join(name), &bytes)?;
        }
        write_sentence_transformers_files(dir, &self.config)
    }

    /// Every file of a saved checkpoint except the weights: `config.json`, `tokenizer.json`
    /// (generated when the source had only `vocab.txt`), `tokenizer_config.json` and the
    /// other tokenizer files of the source.
    pub fn files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = vec![(
            "config.json".to_string(),
            self.config.to_json().into_bytes(),
        )];
        files.extend(self.tokenizer_files.iter().cloned());
        let has = |files: &[(String, Vec<u8>)], n: &str| files.iter().any(|(f, _)| f == n);
        if !has(&files, "tokenizer.json") {
            files.push((
                "tokenizer.json".into(),
                self.tokenizer.to_json()?.into_bytes(),
            ));
        }
        if !has(&files, "tokenizer_config.json") {
            let cfg = serde_json::json!({
                "tokenizer_class": "BertTokenizer",
                "do_lower_case": true,
                "model_max_length": self.config.max_position_embeddings,
            });
            files.push((
                "tokenizer_config.json".into(),
                serde_json::to_vec_pretty(&cfg).expect("json"),
            ));
        }
        Ok(files)
    }

    /// Builds an encoder from [`files`](Self::files) and weights held in memory (a model
    /// received over the network). Needs `config.json` and `tokenizer.json`.
    pub fn from_memory(
        files: Vec<(String, Vec<u8>)>,
        tensors: TensorMap,
        device: &Device,
    ) -> Result<Self> {
        let get = |name: &str| {
            files
                .iter()
                .find(|(f, _)| f == name)
                .map(|(_, b)| b.as_slice())
                .ok_or_else(|| EncoderError::MissingFile(format!("model files lack {name}")))
        };
        let config_text = std::str::from_utf8(get("config.json")?)
            .map_err(|_| EncoderError::Input("config.json is not UTF-8".into()))?;
        let config = BertConfig::from_json(config_text, Path::new("config.json"))?;
        let tokenizer = TextTokenizer::from_json_bytes(get("tokenizer.json")?)?;
        let model = weights::build_model(&config, tensors, device)?;
        let tokenizer_files = files
            .into_iter()
            .filter(|(f, _)| TOKENIZER_FILES.contains(&f.as_str()))
            .collect();
        Ok(Encoder {
            tokenizer_files,
            ..Self::from_parts(model, tokenizer, config, device)
        })
    }

    /// The effective maximum length: the requested one, capped by the position table.
    pub fn max_len(&self, requested: Option<usize>) -> usize {
        let cap = self.config.max_position_embeddings;
        requested.map_or(cap, |m| m.min(cap))
    }

    /// Embeds sentences; vectors come back in input order.
    pub fn embed(&self, sentences: &[&str], opts: &EmbedOptions) -> Result<Vec<Vec<f32>>> {
        self.embed_with_progress(sentences, opts, |_| {})
    }

    /// As [`embed`](Self::embed), calling `progress(n)` after each batch of `n` sentences.
    pub fn embed_with_progress(
        &self,
        sentences: &[&str],
        opts: &EmbedOptions,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        if opts.batch_size == 0 {
            return Err(EncoderError::Input("batch size must be at least 1".into()));
        }
        if opts.pooling == Pooling::Pooler && self.model.pooler.is_none() {
            return Err(EncoderError::Input(
                "pooling \"pooler\" needs pooler weights, which this checkpoint lacks".into(),
            ));
        }
        let max_len = self.max_len(opts.max_len);
        let tokens = sentences
            .iter()
            .map(|s| self.tokenizer.tokenize(s, max_len))
            .collect::<Result<Vec<Tokens>>>()?;
        // Longest first: batches of similar lengths pad little, and the largest batch (the
        // memory peak) comes first.
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(tokens[i].ids.len()));
        let mut out = vec![Vec::new(); sentences.len()];
        for chunk in order.chunks(opts.batch_size) {
            let rows: Vec<&Tokens> = chunk.iter().map(|&i| &tokens[i]).collect();
            let batch = self.tokenizer.pad_rounded(
                &rows,
                self.pad_multiple,
                self.config.max_position_embeddings,
            );
            let vectors = self.embed_batch(&BatchTensors::new(&batch, &self.device), opts)?;
            let dim = vectors.dims()[1];
            let flat = vectors
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| EncoderError::Backend(format!("{e:?}")))?;
            for (row, &i) in chunk.iter().enumerate() {
                out[i] = flat[row * dim..(row + 1) * dim].to_vec();
            }
            progress(chunk.len());
        }
        Ok(out)
    }

    /// Pooled (and optionally normalised) vectors of one batch, `[batch, hidden]`.
    pub fn embed_batch(&self, batch: &BatchTensors, opts: &EmbedOptions) -> Result<Tensor<2>> {
        let hidden = self.model.infer(batch);
        let pooled = match opts.pooling {
            Pooling::Cls => cls(hidden),
            Pooling::Mean => mean_pool(hidden, batch.mask.clone()),
            Pooling::Pooler => self.model.pool(cls(hidden)).ok_or_else(|| {
                EncoderError::Input("this checkpoint has no pooler weights".into())
            })?,
        };
        Ok(if opts.normalize {
            l2_normalize(pooled)
        } else {
            pooled
        })
    }
}

/// `[CLS]` hidden state: `[batch, seq, hidden]` → `[batch, hidden]`.
pub fn cls(hidden: Tensor<3>) -> Tensor<2> {
    let [b, _, h] = hidden.dims();
    hidden.narrow(1, 0, 1).reshape([b, h])
}

/// Attention-masked mean over the sequence; `mask` is `[batch, seq]` of 1/0.
pub fn mean_pool(hidden: Tensor<3>, mask: Tensor<2>) -> Tensor<2> {
    let [b, s, h] = hidden.dims();
    let counts = mask.clone().sum_dim(1); // [b, 1]
    let summed = (hidden * mask.reshape([b, s, 1]))
        .sum_dim(1)
        .reshape([b, h]);
    summed / counts
}

/// Rows divided by their L2 norm (norms below 1e-12 left as 1e-12, as torch's normalize).
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Resolves a model path given on the command line (checks it exists).
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        Ok(path.to_path_buf())
    } else {
        Err(EncoderError::MissingFile(format!(
            "{}: model directory not found (run deploy/fetch-model for the default MiniLM checkpoint)",
            path.display()
        )))
    }
}
