//! Reading and writing HuggingFace BERT weights.
//!
//! Checkpoints are read into a [`TensorMap`] of canonical HF names (no `bert.` prefix,
//! LayerNorm `weight`/`bias`, linear weights `[out, in]`), checked against the config, and
//! turned into a [`BertModel`]. The same map is what federation code averages and what
//! `model.safetensors` is written from.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::config::BertConfig;
use crate::error::{EncoderError, Result, io_err};
use crate::model::{BertModel, Dense, Dims, Embeddings, Layer, Norm, Pooler};

/// A host tensor in f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data }
    }

    fn from_tensor<const D: usize>(t: Tensor<D>) -> Result<Self> {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| EncoderError::Backend(format!("{e:?}")))?;
        Ok(HostTensor { shape, data })
    }

    /// `[r, c]` → `[c, r]`
    fn transposed(&self) -> HostTensor {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = self.data[i * c + j];
            }
        }
        HostTensor::new(vec![c, r], out)
    }

    fn into_tensor<const D: usize>(self, device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(self.data, self.shape), device)
    }
}

/// Tensors by canonical HF name, sorted (a stable order for digests and files).
pub type TensorMap = BTreeMap<String, HostTensor>;

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
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| weights_err(path, e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => Some(bytemuck::pod_collect_to_vec::<u8, f32>(data)),
            Dtype::F16 => Some(
                bytemuck::pod_collect_to_vec::<u8, half::f16>(data)
                    .into_iter()
                    .map(f32::from)
                    .collect(),
            ),
            Dtype::BF16 => Some(
                bytemuck::pod_collect_to_vec::<u8, half::bf16>(data)
                    .into_iter()
                    .map(f32::from)
                    .collect(),
            ),
            Dtype::F64 => Some(
                bytemuck::pod_collect_to_vec::<u8, f64>(data)
                    .into_iter()
                    .map(|v| v as f32)
                    .collect(),
            ),
            _ => None,
        };
        out.push((name, values.map(|d| HostTensor::new(shape, d))));
    }
    Ok(out)
}

fn read_pytorch(path: &Path) -> Result<RawMap> {
    use pytorch_reader::DType as P;
    let reader =
        pytorch_reader::PytorchReader::new(path).map_err(|e| weights_err(path, e.to_string()))?;
    let mut out = Vec::new();
    for (name, t) in reader.into_tensors() {
        let shape = t.shape().to_vec();
        let float = matches!(t.dtype(), P::F32 | P::F16 | P::BF16 | P::F64);
        if !float {
            out.push((name, None));
            continue;
        }
        let bytes = t.read().map_err(|e| weights_err(path, e.to_string()))?;
        let data: Vec<f32> = match t.dtype() {
            P::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes),
            P::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes)
                .into_iter()
                .map(f32::from)
                .collect(),
            P::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(&bytes)
                .into_iter()
                .map(f32::from)
                .collect(),
            _ => bytemuck::pod_collect_to_vec::<u8, f64>(&bytes)
                .into_iter()
                .map(|v| v as f32)
                .collect(),
        };
        out.push((name, Some(HostTensor::new(shape, data))));
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
        Param::from_tensor(self.take(name).into_tensor(self.device))
    }

    fn vector(&mut self, name: &str) -> Param<Tensor<1>> {
        Param::from_tensor(self.take(name).into_tensor(self.device))
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
            weight: Param::from_tensor(weight.into_tensor(self.device)),
            bias: self.vector(&format!("{prefix}.bias")),
        }
    }
}

/// The model's parameters under canonical HF names and shapes (linear weights `[out, in]`).
pub fn model_tensors(model: &BertModel) -> Result<TensorMap> {
    let mut map = TensorMap::new();
    let e = &model.embeddings;
    let put2 = |map: &mut TensorMap, name: String, p: &Param<Tensor<2>>| -> Result<()> {
        map.insert(name, HostTensor::from_tensor(p.val())?);
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
        map.insert(
            format!("{prefix}.weight"),
            HostTensor::from_tensor(n.gamma.val())?,
        );
        map.insert(
            format!("{prefix}.bias"),
            HostTensor::from_tensor(n.beta.val())?,
        );
        Ok(())
    };
    let dense = |map: &mut TensorMap, prefix: String, d: &Dense| -> Result<()> {
        map.insert(
            format!("{prefix}.weight"),
            HostTensor::from_tensor(d.weight.val())?.transposed(),
        );
        map.insert(
            format!("{prefix}.bias"),
            HostTensor::from_tensor(d.bias.val())?,
        );
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

/// Whether an HF tensor name is selected by `patterns`: equal to one, or starting with one
/// that ends in '.'. An empty pattern list selects everything.
pub fn name_matches(name: &str, patterns: &[String]) -> bool {
    patterns.is_empty()
        || patterns
            .iter()
            .any(|p| name == p || (p.ends_with('.') && name.starts_with(p.as_str())))
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

/// Writes tensors as a safetensors file (f32, `format: pt` metadata as `transformers`
/// requires), atomically: temporary file, fsync, rename.
pub fn write_safetensors(path: &Path, tensors: &TensorMap) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            let view = safetensors::tensor::TensorView::new(
                Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .expect("shape matches data");
            (name.clone(), view)
        })
        .collect();
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let bytes =
        safetensors::serialize(views, metadata).map_err(|e| weights_err(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Reads a safetensors file of f32 tensors by their stored names (no canonicalisation).
pub fn read_safetensors_map(path: &Path) -> Result<TensorMap> {
    let mut map = TensorMap::new();
    for (name, t) in read_safetensors(path)? {
        let t = t.ok_or_else(|| weights_err(path, format!("{name}: not a float tensor")))?;
        map.insert(name, t);
    }
    Ok(map)
}

/// Write to `path.tmp`, fsync, rename over `path`, fsync the directory: a crash leaves the
/// old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // A full disk must not be made fuller by what failed to fit.
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
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

    #[test]
    fn transpose_round_trip() {
        let t = HostTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let tt = t.transposed();
        assert_eq!(tt.shape, vec![3, 2]);
        assert_eq!(tt.data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(tt.transposed(), t);
    }
}
