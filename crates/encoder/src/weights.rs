//! Reading and writing HuggingFace BERT weights.
//!
//! Checkpoints are read into a [`TensorMap`] of canonical HF names (no `bert.` prefix,
//! LayerNorm `weight`/`bias`, linear weights `[out, in]`), checked against the config, and
//! turned into a [`BertModel`]. The same map is what federation code averages and what
//! `model.safetensors` is written from.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
pub use fedmicse_tensors::{HostTensor, TensorMap, name_matches};

use crate::config::BertConfig;
use crate::error::{EncoderError, Result};
use crate::model::{BertModel, Dense, Dims, Embeddings, Layer, Norm, Pooler};

/// A burn tensor read back to the host.
fn host_tensor<const D: usize>(t: Tensor<D>) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| EncoderError::Backend(format!("{e:?}")))?;
    Ok(HostTensor::new(shape, data))
}

fn to_tensor<const D: usize>(t: HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.data, t.shape), device)
}

/// Prefixes of tensors that belong to task heads or training code, not to `BertModel`:
/// skipped on load, as `transformers` does for `BertModel`.
const FOREIGN_PREFIXES: &[&str] = &["cls.", "mlp.", "lm_head.", "qa_outputs.", "classifier."];
/// Buffers some checkpoints store beside the weights.
const BUFFERS: &[&str] = &["embeddings.position_ids", "embeddings.token_type_ids"];

/// The weight file of a model directory: `model.safetensors`, else `pytorch_model.bin`.
pub fn weights_file(dir: &Path) -> Result<std::path::PathBuf> {
    for name in ["model.safetensors", "pytorch_model.bin"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(EncoderError::MissingFile(format!(
        "{}: no model.safetensors or pytorch_model.bin (is this a HuggingFace model directory?)",
        dir.display()
    )))
}

/// Reads a checkpoint file and returns its tensors under canonical names.
pub fn read_checkpoint(path: &Path) -> Result<TensorMap> {
    let raw = if path.extension().is_some_and(|e| e == "safetensors") {
        read_safetensors(path)?
    } else {
        read_pytorch(path)?
    };
    canonicalize(raw)
}

fn weights_err(path: &Path, message: impl Into<String>) -> EncoderError {
    EncoderError::Weights {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Raw tensors of a file, by their stored names; non-float tensors come back as `None`
/// (buffers such as `position_ids`), so naming can decide whether they matter.
type RawMap = Vec<(String, Option<HostTensor>)>;

fn read_safetensors(path: &Path) -> Result<RawMap> {
    fedmicse_tensors::safetensors::read_raw(path).map_err(|e| match e {
        fedmicse_tensors::TensorError::Format { path, message } => {
            EncoderError::Weights { path, message }
        }
        other => other.into(),
    })
}

fn read_pytorch(path: &Path) -> Result<RawMap> {
    use fedmicse_tensors::safetensors::{Dtype, to_f32};
    use pytorch_reader::DType as P;
    let reader =
        pytorch_reader::PytorchReader::new(path).map_err(|e| weights_err(path, e.to_string()))?;
    let mut out = Vec::new();
    for (name, t) in reader.into_tensors() {
        let dtype = match t.dtype() {
            P::F32 => Dtype::F32,
            P::F16 => Dtype::F16,
            P::BF16 => Dtype::BF16,
            P::F64 => Dtype::F64,
            _ => {
                out.push((name, None));
                continue;
            }
        };
        let bytes = t.read().map_err(|e| weights_err(path, e.to_string()))?;
        out.push((
            name,
            to_f32(dtype, &bytes).map(|d| HostTensor::new(t.shape().to_vec(), d)),
        ));
    }
    Ok(out)
}

/// Canonical name of a stored tensor: without `bert.`, LayerNorm `gamma`/`beta` renamed
/// `weight`/`bias`. `None` for tensors that are not part of `BertModel`.
fn canonical_name(name: &str) -> Option<String> {
    let n = name.strip_prefix("bert.").unwrap_or(name);
    if FOREIGN_PREFIXES.iter().any(|p| n.starts_with(p)) || BUFFERS.contains(&n) {
        return None;
    }
    let n = if let Some(stem) = n.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight")
    } else if let Some(stem) = n.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias")
    } else {
        n.to_string()
    };
    Some(n)
}

fn canonicalize(raw: RawMap) -> Result<TensorMap> {
    let mut map = TensorMap::new();
    let mut skipped = Vec::new();
    let mut not_float = Vec::new();
    for (name, tensor) in raw {
        let Some(canon) = canonical_name(&name) else {
            skipped.push(name);
            continue;
        };
        let Some(tensor) = tensor else {
            not_float.push(name);
            continue;
        };
        if map.insert(canon.clone(), tensor).is_some() {
            return Err(EncoderError::Input(format!(
                "checkpoint stores {canon} twice (with and without the `bert.` prefix, or as both gamma/beta and weight/bias)"
            )));
        }
    }
    if !not_float.is_empty() {
        return Err(EncoderError::Input(format!(
            "checkpoint tensors with a non-float dtype: {}",
            not_float.join(", ")
        )));
    }
    if !skipped.is_empty() {
        tracing::debug!(
            count = skipped.len(),
            "skipped tensors that are not part of BertModel"
        );
    }
    Ok(map)
}

/// Every tensor `BertModel` has for this config, with its HF shape. The pooler is optional.
pub fn expected_tensors(config: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let h = config.hidden_size;
    let i = config.intermediate_size;
    let mut v = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![config.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![config.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![config.type_vocab_size, h],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            v.push((format!("{p}.{name}.weight"), vec![out, inp]));
            v.push((format!("{p}.{name}.bias"), vec![out]));
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            v.push((format!("{p}.{name}.weight"), vec![h]));
            v.push((format!("{p}.{name}.bias"), vec![h]));
        }
    }
    v
}

const POOLER: [&str; 2] = ["pooler.dense.weight", "pooler.dense.bias"];

/// Checks names and shapes of `map` against `config`: every tensor present, none unknown,
/// every shape as expected. The pooler may be absent (both tensors) or present (both).
pub fn check_tensors(config: &BertConfig, map: &TensorMap) -> Result<bool> {
    let h = config.hidden_size;
    let mut expected = expected_tensors(config);
    let pooler_count = POOLER.iter().filter(|n| map.contains_key(**n)).count();
    let has_pooler = pooler_count > 0;
    if has_pooler {
        expected.push((POOLER[0].into(), vec![h, h]));
        expected.push((POOLER[1].into(), vec![h]));
    }
    let missing: Vec<String> = expected
        .iter()
        .filter(|(n, _)| !map.contains_key(n))
        .map(|(n, _)| n.clone())
        .collect();
    if !missing.is_empty() {
        return Err(EncoderError::MissingTensors(missing));
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let unknown: Vec<String> = map
        .keys()
        .filter(|n| !known.contains(n.as_str()))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(EncoderError::UnknownTensors(unknown));
    }
    for (name, shape) in &expected {
        let found = &map[name].shape;
        if found != shape {
            return Err(EncoderError::ShapeMismatch {
                name: name.clone(),
                expected: shape.clone(),
                found: found.clone(),
            });
        }
    }
    Ok(has_pooler)
}

/// Builds the model from checked tensors.
pub fn build_model(config: &BertConfig, mut map: TensorMap, device: &Device) -> Result<BertModel> {
    let has_pooler = check_tensors(config, &map)?;
    let mut t = Taker {
        map: &mut map,
        device,
        eps: config.layer_norm_eps,
    };
    let embeddings = Embeddings {
        word: t.table("embeddings.word_embeddings.weight"),
        position: t.table("embeddings.position_embeddings.weight"),
        token_type: t.table("embeddings.token_type_embeddings.weight"),
        norm: t.norm("embeddings.LayerNorm"),
    };
    let layers = (0..config.num_hidden_layers)
        .map(|l| {
            let p = format!("encoder.layer.{l}");
            Layer {
                query: t.dense(&format!("{p}.attention.self.query")),
                key: t.dense(&format!("{p}.attention.self.key")),
                value: t.dense(&format!("{p}.attention.self.value")),
                attention_output: t.dense(&format!("{p}.attention.output.dense")),
                attention_norm: t.norm(&format!("{p}.attention.output.LayerNorm")),
                intermediate: t.dense(&format!("{p}.intermediate.dense")),
                output: t.dense(&format!("{p}.output.dense")),
                output_norm: t.norm(&format!("{p}.output.LayerNorm")),
            }
        })
        .collect();
    let pooler = has_pooler.then(|| Pooler {
        dense: t.dense("pooler.dense"),
    });
    Ok(BertModel {
        embeddings,
        layers,
        pooler,
        dims: Dims::from_config(config),
    })
}

/// Moves checked tensors out of the map into parameters.
struct Taker<'a> {
    map: &'a mut TensorMap,
    device: &'a Device,
    eps: f64,
}

impl Taker<'_> {
    fn take(&mut self, name: &str) -> HostTensor {
        self.map
            .remove(name)
            .expect("presence checked by check_tensors")
    }

    fn table(&mut self, name: &str) -> Param<Tensor<2>> {
        Param::from_tensor(to_tensor(self.take(name), self.device))
    }

    fn vector(&mut self, name: &str) -> Param<Tensor<1>> {
        Param::from_tensor(to_tensor(self.take(name), self.device))
    }

    fn norm(&mut self, prefix: &str) -> Norm {
        Norm {
            gamma: self.vector(&format!("{prefix}.weight")),
            beta: self.vector(&format!("{prefix}.bias")),
            eps: self.eps,
        }
    }

    fn dense(&mut self, prefix: &str) -> Dense {
        let weight = self.take(&format!("{prefix}.weight")).transposed();
        Dense {
            weight: Param::from_tensor(to_tensor(weight, self.device)),
            bias: self.vector(&format!("{prefix}.bias")),
        }
    }
}

/// The model's parameters under canonical HF names and shapes (linear weights `[out, in]`).
pub fn model_tensors(model: &BertModel) -> Result<TensorMap> {
    let mut map = TensorMap::new();
    let e = &model.embeddings;
    let put2 = |map: &mut TensorMap, name: String, p: &Param<Tensor<2>>| -> Result<()> {
        map.insert(name, host_tensor(p.val())?);
        Ok(())
    };
    put2(
        &mut map,
        "embeddings.word_embeddings.weight".into(),
        &e.word,
    )?;
    put2(
        &mut map,
        "embeddings.position_embeddings.weight".into(),
        &e.position,
    )?;
    put2(
        &mut map,
        "embeddings.token_type_embeddings.weight".into(),
        &e.token_type,
    )?;
    let norm = |map: &mut TensorMap, prefix: String, n: &Norm| -> Result<()> {
        map.insert(format!("{prefix}.weight"), host_tensor(n.gamma.val())?);
        map.insert(format!("{prefix}.bias"), host_tensor(n.beta.val())?);
        Ok(())
    };
    let dense = |map: &mut TensorMap, prefix: String, d: &Dense| -> Result<()> {
        map.insert(
            format!("{prefix}.weight"),
            host_tensor(d.weight.val())?.transposed(),
        );
        map.insert(format!("{prefix}.bias"), host_tensor(d.bias.val())?);
        Ok(())
    };
    norm(&mut map, "embeddings.LayerNorm".into(), &e.norm)?;
    for (l, layer) in model.layers.iter().enumerate() {
        let p = format!("encoder.layer.{l}");
        dense(&mut map, format!("{p}.attention.self.query"), &layer.query)?;
        dense(&mut map, format!("{p}.attention.self.key"), &layer.key)?;
        dense(&mut map, format!("{p}.attention.self.value"), &layer.value)?;
        dense(
            &mut map,
            format!("{p}.attention.output.dense"),
            &layer.attention_output,
        )?;
        norm(
            &mut map,
            format!("{p}.attention.output.LayerNorm"),
            &layer.attention_norm,
        )?;
        dense(
            &mut map,
            format!("{p}.intermediate.dense"),
            &layer.intermediate,
        )?;
        dense(&mut map, format!("{p}.output.dense"), &layer.output)?;
        norm(
            &mut map,
            format!("{p}.output.LayerNorm"),
            &layer.output_norm,
        )?;
    }
    if let Some(p) = &model.pooler {
        dense(&mut map, "pooler.dense".into(), &p.dense)?;
    }
    Ok(map)
}

/// Marks parameters whose HF name satisfies `frozen` as not trainable (no gradient, left
/// unchanged by the optimizer).
pub fn freeze(mut model: BertModel, frozen: &dyn Fn(&str) -> bool) -> BertModel {
    fn p<const D: usize>(
        param: Param<Tensor<D>>,
        name: &str,
        frozen: &dyn Fn(&str) -> bool,
    ) -> Param<Tensor<D>> {
        if frozen(name) {
            param.set_require_grad(false)
        } else {
            param
        }
    }
    fn norm(n: Norm, prefix: &str, frozen: &dyn Fn(&str) -> bool) -> Norm {
        Norm {
            gamma: p(n.gamma, &format!("{prefix}.weight"), frozen),
            beta: p(n.beta, &format!("{prefix}.bias"), frozen),
            eps: n.eps,
        }
    }
    fn dense(d: Dense, prefix: &str, frozen: &dyn Fn(&str) -> bool) -> Dense {
        Dense {
            weight: p(d.weight, &format!("{prefix}.weight"), frozen),
            bias: p(d.bias, &format!("{prefix}.bias"), frozen),
        }
    }
    let e = model.embeddings;
    model.embeddings = Embeddings {
        word: p(e.word, "embeddings.word_embeddings.weight", frozen),
        position: p(e.position, "embeddings.position_embeddings.weight", frozen),
        token_type: p(
            e.token_type,
            "embeddings.token_type_embeddings.weight",
            frozen,
        ),
        norm: norm(e.norm, "embeddings.LayerNorm", frozen),
    };
    model.layers = std::mem::take(&mut model.layers)
        .into_iter()
        .enumerate()
        .map(|(l, layer)| {
            let x = format!("encoder.layer.{l}");
            Layer {
                query: dense(layer.query, &format!("{x}.attention.self.query"), frozen),
                key: dense(layer.key, &format!("{x}.attention.self.key"), frozen),
                value: dense(layer.value, &format!("{x}.attention.self.value"), frozen),
                attention_output: dense(
                    layer.attention_output,
                    &format!("{x}.attention.output.dense"),
                    frozen,
                ),
                attention_norm: norm(
                    layer.attention_norm,
                    &format!("{x}.attention.output.LayerNorm"),
                    frozen,
                ),
                intermediate: dense(
                    layer.intermediate,
                    &format!("{x}.intermediate.dense"),
                    frozen,
                ),
                output: dense(layer.output, &format!("{x}.output.dense"), frozen),
                output_norm: norm(layer.output_norm, &format!("{x}.output.LayerNorm"), frozen),
            }
        })
        .collect();
    model.pooler = model.pooler.map(|pl| Pooler {
        dense: dense(pl.dense, "pooler.dense", frozen),
    });
    model
}

/// Writes tensors as a safetensors checkpoint (f32, `format: pt` metadata as
/// `transformers` requires), atomically.
pub fn write_safetensors(path: &Path, tensors: &TensorMap) -> Result<()> {
    let meta = fedmicse_tensors::safetensors::pt_metadata();
    Ok(fedmicse_tensors::safetensors::write(path, tensors, &meta)?)
}

/// Reads a safetensors file of float tensors by their stored names (no canonicalisation).
pub fn read_safetensors_map(path: &Path) -> Result<TensorMap> {
    Ok(fedmicse_tensors::safetensors::read(path)?)
}

/// See [`fedmicse_tensors::write_atomic`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(fedmicse_tensors::write_atomic(path, bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        assert_eq!(
            canonical_name("bert.encoder.layer.0.output.LayerNorm.gamma").as_deref(),
            Some("encoder.layer.0.output.LayerNorm.weight")
        );
        assert_eq!(
            canonical_name("embeddings.LayerNorm.beta").as_deref(),
            Some("embeddings.LayerNorm.bias")
        );
        assert_eq!(canonical_name("cls.predictions.bias"), None);
        assert_eq!(canonical_name("bert.embeddings.position_ids"), None);
        assert_eq!(canonical_name("mlp.dense.weight"), None);
    }
}
