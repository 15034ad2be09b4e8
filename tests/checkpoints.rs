//! Loading HuggingFace checkpoints in their variants, rejecting malformed ones with clear
//! errors, and saving back.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use fedmicse_encoder::weights::{read_checkpoint, read_safetensors_map, write_safetensors};
use fedmicse_encoder::{EmbedOptions, Encoder, HostTensor, Pooling, TensorMap};

const SENTENCES: &[&str] = &[
    "A man is playing a guitar.",
    "Zürich's café opens at 7:30!",
    "",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
];

fn embeddings(dir: &Path) -> Vec<Vec<f32>> {
    let enc = Encoder::load(dir, &fedmicse_encoder::device::cpu()).unwrap();
    let opts = EmbedOptions {
        pooling: Pooling::Pooler,
        max_len: Some(32),
        ..Default::default()
    };
    let mut v = enc.embed(SENTENCES, &opts).unwrap();
    v.extend(
        enc.embed(
            SENTENCES,
            &EmbedOptions {
                pooling: Pooling::Mean,
                ..opts
            },
        )
        .unwrap(),
    );
    v
}

/// A model directory with MiniLM's config and tokenizer files but other weights.
fn variant_dir(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::copy(minilm().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn original_tensors() -> TensorMap {
    read_checkpoint(&minilm().join("model.safetensors")).unwrap()
}

fn load_err(dir: &Path) -> String {
    match Encoder::load(dir, &fedmicse_encoder::device::cpu()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Writes tensors the way `torch.save(state_dict)` does: a zip archive with a protocol-2
/// pickle of an OrderedDict of `_rebuild_tensor_v2` calls and one raw storage per tensor.
fn write_pytorch_bin(path: &Path, tensors: &[(String, HostTensor)]) {
    fn global(p: &mut Vec<u8>, module: &str, name: &str) {
        p.push(b'c');
        p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn string(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    fn int(p: &mut Vec<u8>, v: usize) {
        p.push(b'J');
        p.extend_from_slice(&(v as i32).to_le_bytes());
    }
    fn tuple(p: &mut Vec<u8>, items: &[usize]) {
        p.push(b'(');
        for &i in items {
            int(p, i);
        }
        p.push(b't');
    }
    let mut p = vec![0x80, 2];
    global(&mut p, "collections", "OrderedDict");
    p.push(b')');
    p.push(b'R');
    p.push(b'(');
    for (key, (name, t)) in tensors.iter().enumerate() {
        string(&mut p, name);
        global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.push(b'(');
        // persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel)
        p.push(b'(');
        string(&mut p, "storage");
        global(&mut p, "torch", "FloatStorage");
        string(&mut p, &key.to_string());
        string(&mut p, "cpu");
        int(&mut p, t.data.len());
        p.push(b't');
        p.push(b'Q');
        int(&mut p, 0); // storage offset
        tuple(&mut p, &t.shape);
        let mut strides = vec![1usize; t.shape.len()];
        for i in (0..t.shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * t.shape[i + 1];
        }
        tuple(&mut p, &strides);
        p.push(0x89); // requires_grad = False
        global(&mut p, "collections", "OrderedDict");
        p.push(b')');
        p.push(b'R');
        p.push(b't');
        p.push(b'R');
    }
    p.push(b'u');
    p.push(b'.');

    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&p).unwrap();
    for (key, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        zip.write_all(bytemuck::cast_slice(&t.data)).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

const CONFIG_AND_TOKENIZER: &[&str] = &["config.json", "tokenizer.json", "tokenizer_config.json"];

#[test]
fn checkpoint_variants_load_to_the_same_embeddings() {
    let want = embeddings(&minilm());

    // `bert.` prefix, LayerNorm gamma/beta, pre-training heads and buffers beside the weights.
    let dir = variant_dir(CONFIG_AND_TOKENIZER);
    let mut legacy = TensorMap::new();
    for (name, t) in original_tensors() {
        let name = name
            .replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta");
        legacy.insert(format!("bert.{name}"), t);
    }
    legacy.insert(
        "cls.predictions.bias".into(),
        HostTensor::new(vec![30522], vec![0.0; 30522]),
    );
    legacy.insert(
        "mlp.dense.bias".into(),
        HostTensor::new(vec![384], vec![0.0; 384]),
    );
    write_safetensors(&dir.path().join("model.safetensors"), &legacy).unwrap();
    assert_eq!(embeddings(dir.path()), want, "bert. prefix + gamma/beta");

    // pytorch_model.bin instead of safetensors.
    let dir = variant_dir(CONFIG_AND_TOKENIZER);
    let tensors: Vec<(String, HostTensor)> = original_tensors()
        .into_iter()
        .map(|(n, t)| (format!("bert.{n}"), t))
        .collect();
    write_pytorch_bin(&dir.path().join("pytorch_model.bin"), &tensors);
    assert_eq!(embeddings(dir.path()), want, "pytorch_model.bin");

    // vocab.txt instead of tokenizer.json.
    let dir = variant_dir(&["config.json", "model.safetensors", "vocab.txt"]);
    assert_eq!(embeddings(dir.path()), want, "vocab.txt tokenizer");
}

#[test]
fn malformed_checkpoints_are_rejected_with_clear_errors() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.contains("model directory not found"), "{e}");

    let dir = variant_dir(&["model.safetensors", "tokenizer.json"]);
    let e = load_err(dir.path());
    assert!(e.contains("no config.json"), "{e}");

    let dir = variant_dir(&["config.json", "tokenizer.json"]);
    let e = load_err(dir.path());
    assert!(
        e.contains("no model.safetensors or pytorch_model.bin"),
        "{e}"
    );

    let dir = variant_dir(&["config.json", "model.safetensors"]);
    let e = load_err(dir.path());
    assert!(e.contains("no tokenizer.json and no vocab.txt"), "{e}");

    let dir = variant_dir(&["model.safetensors", "tokenizer.json"]);
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt2", "n_layer": 12}"#,
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("not a BERT checkpoint") && e.contains("gpt2"),
        "{e}"
    );

    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("not valid JSON"),
        "{e}"
    );

    // A config that promises more layers than the weights have.
    let config = std::fs::read_to_string(minilm().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 7"),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("lacks") && e.contains("encoder.layer.6.attention.self.query.weight"),
        "{e}"
    );

    let dir = variant_dir(CONFIG_AND_TOKENIZER);
    let weights = dir.path().join("model.safetensors");

    let mut t = original_tensors();
    t.insert(
        "encoder.layer.3.attention.self.query.weight".into(),
        HostTensor::new(vec![384, 383], vec![0.0; 384 * 383]),
    );
    write_safetensors(&weights, &t).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("encoder.layer.3.attention.self.query.weight")
            && e.contains("[384, 384]")
            && e.contains("[384, 383]"),
        "{e}"
    );

    let mut t = original_tensors();
    t.remove("encoder.layer.5.output.dense.bias");
    write_safetensors(&weights, &t).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("lacks 1 tensor") && e.contains("encoder.layer.5.output.dense.bias"),
        "{e}"
    );

    let mut t = original_tensors();
    t.insert(
        "encoder.layer.9.output.dense.bias".into(),
        HostTensor::new(vec![384], vec![0.0; 384]),
    );
    write_safetensors(&weights, &t).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("not part of a BERT model") && e.contains("encoder.layer.9.output.dense.bias"),
        "{e}"
    );

    std::fs::write(&weights, b"definitely not safetensors").unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("cannot read weights") && e.contains("model.safetensors"),
        "{e}"
    );

    std::fs::remove_file(&weights).unwrap();
    std::fs::write(
        dir.path().join("pytorch_model.bin"),
        b"PK\x03\x04 truncated",
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("cannot read weights") && e.contains("pytorch_model.bin"),
        "{e}"
    );
}

#[test]
fn save_then_load_is_identical() {
    let device = fedmicse_encoder::device::cpu();
    let original = Encoder::load(minilm(), &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    original.save(out.path()).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ] {
        assert!(out.path().join(f).is_file(), "{f} written");
    }
    // sentence-transformers metadata: the BERT module, then [CLS] pooling of its width.
    let modules: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("modules.json")).unwrap()).unwrap();
    assert_eq!(modules[1]["path"], "1_Pooling");
    assert_eq!(modules[1]["type"], "sentence_transformers.models.Pooling");
    let pooling: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("1_Pooling/config.json")).unwrap())
            .unwrap();
    assert_eq!(pooling["pooling_mode_cls_token"], true);
    assert_eq!(pooling["pooling_mode_mean_tokens"], false);
    assert_eq!(
        pooling["word_embedding_dimension"],
        original.config.hidden_size
    );
    // The weights written are bit-identical to the checkpoint's, under the same names.
    assert_eq!(
        read_safetensors_map(&out.path().join("model.safetensors")).unwrap(),
        original_tensors()
    );
    let reloaded = Encoder::load(out.path(), &device).unwrap();
    assert_eq!(reloaded.config, original.config);
    assert_eq!(embeddings(out.path()), embeddings(&minilm()));
    // And saving the reloaded model again gives the same file.
    let again = tempfile::tempdir().unwrap();
    reloaded.save(again.path()).unwrap();
    assert_eq!(
        std::fs::read(again.path().join("model.safetensors")).unwrap(),
        std::fs::read(out.path().join("model.safetensors")).unwrap()
    );
}
