//! `config.json` of a HuggingFace BERT checkpoint.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EncoderError, Result, io_err};

/// The fields of HuggingFace's `BertConfig` that change the computation. Every other field of
/// the file (`architectures`, `_name_or_path`, ...) is kept in `extra` and written back on save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}

/// Activation of the feed-forward block, as named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` with erf (HF "gelu").
    Gelu,
    /// Tanh approximation (HF "gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
}

impl BertConfig {
    /// A BERT configuration with HuggingFace's defaults for everything but the sizes.
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        intermediate_size: usize,
    ) -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("architectures".into(), serde_json::json!(["BertModel"]));
        BertConfig {
            model_type: default_model_type(),
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            hidden_act: default_act(),
            hidden_dropout_prob: default_dropout(),
            attention_probs_dropout_prob: default_dropout(),
            max_position_embeddings: default_max_positions(),
            type_vocab_size: default_type_vocab(),
            layer_norm_eps: default_eps(),
            pad_token_id: 0,
            position_embedding_type: default_position_type(),
            extra,
        }
    }

    /// Shapes of bert-base-uncased (12 layers, hidden 768).
    pub fn bert_base() -> Self {
        Self::new(30522, 768, 12, 12, 3072)
    }

    /// Shapes of all-MiniLM-L6-v2 (6 layers, hidden 384).
    pub fn minilm_l6() -> Self {
        Self::new(30522, 384, 6, 12, 1536)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| EncoderError::Config {
            path: path.to_path_buf(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        // Check the architecture before the fields, so a RoBERTa or GPT config says so
        // instead of complaining about a missing BERT field.
        if let Some(found) = value.get("model_type").and_then(|v| v.as_str())
            && found != "bert"
        {
            return Err(EncoderError::NotBert {
                path: path.to_path_buf(),
                found: found.to_string(),
            });
        }
        let config: BertConfig = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        config.validate().map_err(bad)?;
        Ok(config)
    }

    /// Checks the values the model code relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model_type != "bert" {
            return Err(format!(
                "model_type is {:?}, expected \"bert\"",
                self.model_type
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive, found 0"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?} is not supported, expected \"absolute\"",
                self.position_embedding_type
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} must be in [0, 1), found {p}"));
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps must be positive, found {}",
                self.layer_norm_eps
            ));
        }
        self.activation()?;
        Ok(())
    }

    pub fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(format!(
                "hidden_act {other:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)"
            )),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The JSON written to `config.json` on save: the original fields plus what a
    /// `transformers` loader needs to pick `BertModel`.
    pub fn to_json(&self) -> String {
        let mut value = serde_json::to_value(self).expect("config serialises");
        let obj = value.as_object_mut().expect("config is an object");
        obj.entry("architectures")
            .or_insert_with(|| serde_json::json!(["BertModel"]));
        serde_json::to_string_pretty(&value).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_other_architectures_and_bad_values() {
        let p = Path::new("config.json");
        let err = BertConfig::from_json(r#"{"model_type":"roberta"}"#, p).unwrap_err();
        assert!(err.to_string().contains("not a BERT checkpoint"), "{err}");
        let err = BertConfig::from_json("{", p).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        let err = BertConfig::from_json(r#"{"model_type":"bert","vocab_size":10}"#, p).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
        let mut c = BertConfig::minilm_l6();
        c.num_attention_heads = 7;
        let err = BertConfig::from_json(&c.to_json(), p).unwrap_err();
        assert!(err.to_string().contains("multiple"), "{err}");
    }

    #[test]
    fn round_trips_extra_fields() {
        let p = Path::new("config.json");
        let mut c = BertConfig::minilm_l6();
        c.extra.insert("_name_or_path".into(), "x".into());
        let back = BertConfig::from_json(&c.to_json(), p).unwrap();
        assert_eq!(back, c);
    }
}
