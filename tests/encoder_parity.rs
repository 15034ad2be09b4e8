//! The encoder against PyTorch/transformers reference outputs for all-MiniLM-L6-v2
//! (tests/fixtures, made with transformers 5.24 / torch 2.15 on CPU).

mod common;

use common::*;
use fedmicse_encoder::fused::Kernels;
use fedmicse_encoder::{
    BatchTensors, Dropout, EmbedOptions, Encoder, ForwardOptions, Pooling, TokenBatch, cls,
    mean_pool,
};

fn fixture_batch(tokens: &serde_json::Value, key: &str) -> TokenBatch {
    let enc = &tokens["encodings"][key];
    let flat = |name: &str| -> Vec<i64> {
        enc[name]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(ints)
            .collect()
    };
    let seq_len = enc["seq_len"].as_u64().unwrap() as usize;
    let attention_mask = flat("attention_mask");
    let batch = attention_mask.len() / seq_len;
    let lengths = attention_mask
        .chunks(seq_len)
        .map(|r| r.iter().filter(|&&m| m == 1).count())
        .collect();
    TokenBatch {
        input_ids: flat("input_ids"),
        attention_mask,
        token_type_ids: flat("token_type_ids"),
        batch,
        seq_len,
        lengths,
    }
}

#[test]
fn tokenizer_matches_transformers() {
    let enc = Encoder::load(minilm(), &fedmicse_encoder::device::cpu()).unwrap();
    let fx = fixture("minilm_tokens.json");
    let sentences = sentences(&fx);
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    for (key, max_len) in [("max_len_32", 32), ("max_len_128", 128)] {
        let ours = enc.tokenizer.encode_batch(&refs, max_len).unwrap();
        let theirs = fixture_batch(&fx, key);
        assert_eq!(ours.seq_len, theirs.seq_len, "{key}: seq_len");
        assert_eq!(ours.input_ids, theirs.input_ids, "{key}: input_ids");
        assert_eq!(
            ours.attention_mask, theirs.attention_mask,
            "{key}: attention_mask"
        );
        assert_eq!(
            ours.token_type_ids, theirs.token_type_ids,
            "{key}: token_type_ids"
        );
    }
    for (i, s) in refs.iter().enumerate() {
        let want: Vec<String> = fx["tokens"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            enc.tokenizer.token_strings(s).unwrap(),
            want,
            "tokens of sentence {i}"
        );
    }
}

#[test]
fn vocab_txt_tokenizer_matches_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(minilm().join("vocab.txt"), dir.path().join("vocab.txt")).unwrap();
    let from_vocab = fedmicse_encoder::TextTokenizer::from_dir(dir.path()).unwrap();
    let fx = fixture("minilm_tokens.json");
    let sentences = sentences(&fx);
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let ours = from_vocab.encode_batch(&refs, 128).unwrap();
    assert_eq!(ours.input_ids, fixture_batch(&fx, "max_len_128").input_ids);
}

#[test]
fn embeddings_match_transformers() {
    let device = fedmicse_encoder::device::cpu();
    let mut enc = Encoder::load(minilm(), &device).unwrap();
    let tokens = fixture("minilm_tokens.json");
    let fx = fixture("minilm_embeddings.json");
    // The fused CPU kernels (the default) and their composed twin both match transformers.
    for kernels in [Kernels::Fused, Kernels::Composed] {
        enc.model.dims.kernels = kernels;
        for key in ["max_len_32", "max_len_128"] {
            let batch = BatchTensors::new(&fixture_batch(&tokens, key), &device);
            let want = &fx["embeddings"][key];
            for (pooling, field) in [
                (Pooling::Cls, "cls"),
                (Pooling::Mean, "mean"),
                (Pooling::Pooler, "pooler_output"),
            ] {
                let opts = EmbedOptions {
                    pooling,
                    ..Default::default()
                };
                let got = enc.embed_batch(&batch, &opts).unwrap();
                let got: Vec<f32> = got.into_data().try_into_vec().unwrap();
                let want: Vec<f32> = rows_f32(&want[field]).concat();
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff < 1e-4,
                    "{kernels:?} {key} {field}: max abs diff {diff}"
                );
            }
        }
    }
}

#[test]
fn embed_api_sorts_batches_and_keeps_input_order() {
    // Through the public API: sentences batched by length (other padding than the fixture's
    // single batch), small batches, returned in input order.
    let enc = Encoder::load(minilm(), &fedmicse_encoder::device::cpu()).unwrap();
    let fx = fixture("minilm_embeddings.json");
    let sentences = sentences(&fx);
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let opts = EmbedOptions {
        pooling: Pooling::Mean,
        max_len: Some(128),
        batch_size: 5,
        ..Default::default()
    };
    let got = enc.embed(&refs, &opts).unwrap();
    let want = rows_f32(&fx["embeddings"]["max_len_128"]["mean"]);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let diff = max_abs_diff(g, w);
        assert!(diff < 1e-4, "sentence {i}: max abs diff {diff}");
    }
    // Normalised vectors have unit length and the same direction.
    let normed = enc
        .embed(
            &refs[..3],
            &EmbedOptions {
                normalize: true,
                ..opts.clone()
            },
        )
        .unwrap();
    for (n, g) in normed.iter().zip(&got) {
        let len: f32 = n.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((len - 1.0).abs() < 1e-5, "norm {len}");
        assert!(fedmicse_encoder::cosine(n, g) > 0.99999);
    }
}

#[test]
fn length_buckets_leave_embeddings_unchanged() {
    // A GPU pads each batch up to a multiple of 8 tokens so shapes repeat; forced here on the
    // CPU, with CLS and mean pooling, both against the transformers fixtures.
    let mut enc = Encoder::load(minilm(), &fedmicse_encoder::device::cpu()).unwrap();
    assert_eq!(
        enc.pad_multiple(),
        1,
        "the CPU pads to the longest row only"
    );
    let fx = fixture("minilm_embeddings.json");
    let sentences = sentences(&fx);
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    for multiple in [8, 48] {
        enc.set_pad_multiple(multiple);
        for pooling in [Pooling::Cls, Pooling::Mean] {
            let opts = EmbedOptions {
                pooling,
                max_len: Some(128),
                batch_size: 3,
                ..Default::default()
            };
            let got = enc.embed(&refs, &opts).unwrap();
            let key = if pooling == Pooling::Cls {
                "cls"
            } else {
                "mean"
            };
            let want = rows_f32(&fx["embeddings"]["max_len_128"][key]);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let diff = max_abs_diff(g, w);
                assert!(
                    diff < 1e-4,
                    "multiple {multiple}, {key}, sentence {i}: {diff}"
                );
            }
        }
    }
}

#[test]
fn attention_probabilities_match_transformers() {
    let device = fedmicse_encoder::device::cpu();
    let enc = Encoder::load(minilm(), &device).unwrap();
    let tokens = fixture("minilm_tokens.json");
    let fx_all = fixture("minilm_embeddings.json");
    let fx = &fx_all["attention_probs"];
    let batch = BatchTensors::new(&fixture_batch(&tokens, "max_len_32"), &device);
    let out = enc.model.forward(
        &batch,
        &ForwardOptions {
            attention_layers: 0..6,
        },
        &mut Dropout::Off,
    );
    assert_eq!(out.attentions.len(), 6);
    // The hidden states the attentions came from give the fixture's vectors too.
    let cls_vecs: Vec<f32> = cls(out.hidden.clone()).into_data().try_into_vec().unwrap();
    let mean_vecs: Vec<f32> = mean_pool(out.hidden, batch.mask.clone())
        .into_data()
        .try_into_vec()
        .unwrap();
    assert_eq!(cls_vecs.len(), 24 * 384);
    assert_eq!(mean_vecs.len(), 24 * 384);
    let want_embeddings = &fx_all["embeddings"]["max_len_32"];
    for (got, field) in [(&cls_vecs, "cls"), (&mean_vecs, "mean")] {
        let want: Vec<f32> = rows_f32(&want_embeddings[field]).concat();
        assert_eq!(want.len(), 24 * 384, "{field}: fixture size");
        let diff = max_abs_diff(got, &want);
        assert!(
            diff < 1e-4,
            "{field} from the attention pass: max abs diff {diff}"
        );
    }
    for (layer, head) in [(0usize, 0usize), (5, 11)] {
        let probs = out.attentions[layer].clone();
        let [b, h, s, s2] = probs.dims();
        assert_eq!((b, h, s, s2), (24, 12, 32, 32));
        let all: Vec<f32> = probs.into_data().try_into_vec().unwrap();
        for sentence in 0..2 {
            let key = format!("layer{layer}_head{head}_sentence{sentence}");
            let want = f32s(&fx[&key]["data"]);
            let start = ((sentence * h + head) * s) * s;
            let got = &all[start..start + s * s];
            let diff = max_abs_diff(got, &want);
            assert!(diff < 1e-5, "{key}: max abs diff {diff}");
            // Padded keys get exactly zero probability.
            let n = fx["n_tokens"][sentence].as_u64().unwrap() as usize;
            for q in 0..s {
                for k in n..s {
                    assert_eq!(got[q * s + k], 0.0, "{key}: padded key {k} of query {q}");
                }
            }
        }
    }
}
