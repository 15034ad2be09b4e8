//! BERT sentence encoder in burn.
//!
//! Loads HuggingFace BERT checkpoints (`config.json`, `model.safetensors` or
//! `pytorch_model.bin`, `tokenizer.json` or `vocab.txt`), computes exactly what `BertModel`
//! computes, returns per-layer attention probabilities for training objectives, pools
//! sentence vectors (`cls`, `mean`, `pooler`) and saves back in the same format.
//! Knows nothing of training or networking.

pub mod config;
pub mod device;
pub mod encoder;
pub mod error;
pub mod fused;
pub mod model;
pub mod runtime;
pub mod tokenize;
pub mod weights;

pub use config::BertConfig;
pub use device::parse_device;
pub use encoder::{
    EmbedOptions, Encoder, Pooling, SENTENCE_TRANSFORMERS_FILES, cls, l2_normalize, mean_pool,
    sentence_transformers_files, write_sentence_transformers_files,
};
pub use error::{EncoderError, Result};
pub use fedmicse_runtime::sts::cosine;
pub use model::{BatchTensors, BertModel, BertOutput, Dropout, ForwardOptions};
pub use runtime::BurnRuntime;
pub use tokenize::{TextTokenizer, TokenBatch, Tokens};
pub use weights::{HostTensor, TensorMap};
