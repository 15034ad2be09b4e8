//! The burn encoder behind the runtime traits the coordinator calls
//! ([`fedmicse_runtime::ModelRuntime`], [`ModelTemplate`], [`Embedder`]).

use std::path::Path;
use std::sync::Arc;

use fedmicse_runtime::{
    BaseModel, DeviceSpec, EmbedOptions, Embedder, ModelRuntime, ModelTemplate, RuntimeError,
};
use fedmicse_tensors::TensorMap;

use crate::{Encoder, EncoderError, device, sentence_transformers_files};

/// Opens checkpoints as burn encoders.
#[derive(Debug, Clone, Copy, Default)]
pub struct BurnRuntime;

impl BurnRuntime {
    /// The runtime as the coordinator takes it.
    pub fn shared() -> Arc<dyn ModelRuntime> {
        Arc::new(BurnRuntime)
    }
}

fn model_err(e: EncoderError) -> RuntimeError {
    RuntimeError::Model(e.to_string())
}

impl ModelRuntime for BurnRuntime {
    fn open(&self, dir: &Path, spec: DeviceSpec) -> Result<Box<dyn ModelTemplate>, RuntimeError> {
        let device = device::device(spec).map_err(model_err)?;
        Ok(Box::new(Encoder::load(dir, &device).map_err(model_err)?))
    }
}

impl ModelTemplate for Encoder {
    fn base(&self) -> Result<BaseModel, RuntimeError> {
        Ok(BaseModel {
            tensors: self.tensors().map_err(model_err)?,
            files: self.files().map_err(model_err)?,
            hidden_size: self.config.hidden_size,
            export_files: sentence_transformers_files(&self.config),
        })
    }

    fn embedder(&self, tensors: TensorMap) -> Result<Arc<dyn Embedder>, RuntimeError> {
        Ok(Arc::new(self.with_tensors(tensors).map_err(model_err)?))
    }
}

impl Embedder for Encoder {
    fn embed(
        &self,
        sentences: &[&str],
        opts: &EmbedOptions,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        Encoder::embed(self, sentences, opts).map_err(|e| RuntimeError::Embed(e.to_string()))
    }

    fn count_tokens(&self, sentence: &str, max_len: usize) -> usize {
        self.tokenizer
            .tokenize(sentence, max_len)
            .map(|t| t.ids.len())
            .unwrap_or(0)
    }

    fn has_pooler(&self) -> bool {
        self.model.pooler.is_some()
    }
}
